"""``haq convert --device``: parsing and refusals (before any work), the CPU's output unchanged by it, and the
GPU-only branches (torch.linalg's factorization, the index_select permutation) run on the CPU against the
CPU's own (LAPACK, in place); the CUDA run itself is ``benchmarks/gpucheck/convert_stage.py``'s."""

from __future__ import annotations

import filecmp
import os

import pytest
import torch
from safetensors.torch import load_file

from offline.cli import main
from offline.convert import ConvertError, ConvertOptions, convert
from offline.device import device_problem, resolve_device, to_device, to_host
from offline.recipe import RecipeError, build_options, dump_recipe
from vllm_haq.quant import gptq
from vllm_haq.quant.gptq import GPTQConfig, GPTQSolver, HessianAccumulator


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)


def test_auto_and_cpu_resolve_to_the_cpu_without_cuda(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert device_problem("auto") is None and device_problem("cpu") is None


def test_cuda_resolves_to_a_definite_index(two_gpus):
    assert resolve_device("auto") == torch.device("cuda", 1)  # the current device
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert "out of range: this host has 2 CUDA device(s), cuda:0 to cuda:1" in device_problem("cuda:2")


@pytest.mark.parametrize("value, problem", [
    ("cuda", "needs CUDA, which this host does not have"), ("cuda:1", "needs CUDA"),
    ("gpu", "is not a device"), ("cuda:x", "is not a device"), ("", "is not a device"),
    ("meta", "is not supported"), ("cpu:1", "is not supported"),
])
def test_bad_devices_are_refused_naming_the_option(no_cuda, value, problem):
    assert problem in device_problem(value)
    with pytest.raises(ValueError, match=problem):
        resolve_device(value)
    with pytest.raises(ConvertError, match=f"^--device {value!r} {problem}"):
        build_options(None, {"device": value}, flags=True)


def test_cuda_without_cuda_fails_before_any_work(no_cuda, tiny_dir, calib_file, tmp_path, capsys):
    out = str(tmp_path / "out")
    rc = main(["convert", tiny_dir("llama"), out, "--calib", calib_file, "--device", "cuda", "--no-progress"])
    assert rc == 1
    assert "haq convert: error: --device 'cuda' needs CUDA, which this host does not have" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # not even OUT_DIR.partial
    with pytest.raises(ConvertError, match="--device 'cuda:3' needs CUDA"):
        convert(tiny_dir("llama"), out, ConvertOptions(calib=[calib_file], device="cuda:3"))
    assert os.listdir(tmp_path) == []


def test_device_is_no_recipe_key(tmp_path):
    assert "device" not in dump_recipe(ConvertOptions(device="cpu"))
    assert dump_recipe(ConvertOptions(device="cpu")) == dump_recipe(ConvertOptions())
    path = tmp_path / "r.yaml"
    path.write_text("device: cpu\n")
    with pytest.raises(RecipeError, match=r"'device' is no recipe key.*--device"):
        build_options(str(path))


def test_to_device_and_back_on_the_cpu_keep_the_tensors():
    a, b = torch.randn(3), torch.arange(4)
    given = {"a": a, "b": b}
    moved = to_device(given, torch.device("cpu"))
    assert given == {} and list(moved) == ["a", "b"] and moved["a"] is a  # the host's dict is let go
    back = to_host(moved)
    assert back["b"] is b and list(back) == ["a", "b"]


def _same_files(a: str, b: str) -> None:
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert mismatch == [] and errors == []


def test_device_cpu_output_is_byte_identical_to_the_default(tiny_dir, calib_file, tmp_path):
    """Every file, the recipe included (device is no key): auto is the CPU on this host, and the CPU path is
    the one the converter always had."""
    opts = dict(calib=[calib_file], samples=4, seq_len=64)
    convert(tiny_dir("mixtral"), str(tmp_path / "default"), ConvertOptions(**opts))
    convert(tiny_dir("mixtral"), str(tmp_path / "cpu"), ConvertOptions(**opts, device="cpu"))
    _same_files(str(tmp_path / "default"), str(tmp_path / "cpu"))


def _hessian(n: int, rank: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    acc = HessianAccumulator(n)
    x = torch.randn(4 * n, rank, generator=g) @ torch.randn(rank, n, generator=g)
    acc.add(x * torch.linspace(0.1, 3.0, n))  # uneven channels: act-order permutes
    return acc.take().to(dtype)


@pytest.mark.parametrize("dtype, rank", [(torch.float64, 96), (torch.float32, 96), (torch.float64, 40)])
def test_torch_linalg_factor_agrees_with_lapack(dtype, rank):
    """The GPU's factorization (torch.linalg) run on the CPU: the same upper factor of H⁻¹ as the in-place LAPACK
    one, also where H is singular (rank 40 of 96) and both add the same extra dampening."""
    h = _hessian(96, rank, dtype)
    h.diagonal().add_(0.0 if rank < 96 else 1e-3 * float(h.diagonal().mean()))
    if rank < 96:
        h[5, 5] = h[5, 5] * 0  # and one dead-looking input: potrf fails part-way, the restore path runs
    lapack = gptq._inverse_upper_cholesky_(h.clone())
    linalg = gptq._inverse_upper_cholesky_torch(h.clone())
    tol = 1e-9 if dtype == torch.float64 else 2e-3
    assert torch.allclose(linalg, lapack, rtol=tol, atol=tol * float(lapack.abs().max()))


def test_index_select_permutation_equals_the_in_place_one():
    h = _hessian(64, 64)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    a, b = h.clone(), h.clone()
    gptq._permute_symmetric_(a, perm, by_rows=True)
    gptq._permute_symmetric_(b, perm, by_rows=False)
    assert torch.equal(a, b) and torch.equal(a, h[perm][:, perm])


def test_gptq_with_torch_linalg_agrees_with_lapack(monkeypatch):
    """GPTQ rounding through the GPU's branches (forced on the CPU) against the CPU's: same scales, and the int8
    weights equal but for rare ±1 flips of values rounding within float error of a half."""
    h = _hessian(256, 256, torch.float64)
    w = torch.randn(192, 256, generator=torch.Generator().manual_seed(2))
    q_ref, s_ref = GPTQSolver(h, GPTQConfig(block_size=32)).quantize(w)
    monkeypatch.setattr(gptq, "_inverse_upper_cholesky_", gptq._inverse_upper_cholesky_torch)
    real_permute = gptq._permute_symmetric_
    monkeypatch.setattr(gptq, "_permute_symmetric_", lambda h, p: real_permute(h, p, by_rows=False))
    q, s = GPTQSolver(h, GPTQConfig(block_size=32)).quantize(w)
    assert torch.equal(s, s_ref)
    diff = (q.int() - q_ref.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3


def test_conversion_through_the_gpu_branches_on_the_cpu(tiny_dir, calib_file, tmp_path, monkeypatch):
    """A whole haq conversion of the tiny Mixtral with the GPU's factorization and permutation (on the CPU): the
    same choices and int8 weights within the rare flips of the test above."""
    opts = ConvertOptions(calib=[calib_file], samples=4, seq_len=64, device="cpu")
    convert(tiny_dir("mixtral"), str(tmp_path / "lapack"), opts)
    monkeypatch.setattr(gptq, "_inverse_upper_cholesky_", gptq._inverse_upper_cholesky_torch)
    real_permute = gptq._permute_symmetric_
    monkeypatch.setattr(gptq, "_permute_symmetric_", lambda h, p: real_permute(h, p, by_rows=False))
    convert(tiny_dir("mixtral"), str(tmp_path / "linalg"), opts)
    differing = total = 0
    for shard in sorted(f for f in os.listdir(tmp_path / "lapack") if f.startswith("model-")):
        a, b = load_file(str(tmp_path / "lapack" / shard)), load_file(str(tmp_path / "linalg" / shard))
        assert a.keys() == b.keys()
        for name, t in a.items():
            if t.dtype == torch.int8:
                d = (t.int() - b[name].int()).abs()
                assert int(d.max()) <= 1, name
                differing, total = differing + int((d > 0).sum()), total + t.numel()
    assert differing / total < 1e-3
    cfg = [open(tmp_path / d / "config.json").read() for d in ("lapack", "linalg")]
    assert cfg[0] == cfg[1]  # the same smoothing and rotation choices
