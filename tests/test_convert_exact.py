"""The converter's shortcuts change no bit of its output: each one against the path it replaces, on tiny models of
the families whose forwards differ (OPT's relu MLP, Llama's SwiGLU, Mixtral's experts, Qwen2-MoE's shared expert)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from offline.convert import ConvertOptions, convert
from offline.models import ModelSpec, spec_for

FAMILIES = ("opt", "llama", "mixtral", "qwen2_moe")


def _tensors(out: str) -> dict[str, torch.Tensor]:
    found = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".safetensors"):
            found.update({f"{name}:{k}": v for k, v in load_file(os.path.join(out, name)).items()})
    return found


def _convert(src: str, out: str, calib: str) -> dict[str, torch.Tensor]:
    convert(src, out, ConvertOptions(calib=[calib], samples=4, seq_len=64, method="haq"))
    with open(os.path.join(out, "config.json")) as f:
        config = f.read()
    return {**_tensors(out), "config": config}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if k == "config":
            assert a[k] == b[k]
        else:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("family", FAMILIES)
def test_float_pass_without_the_down_projections_outputs(family, tiny_dir, calib_file, tmp_path, monkeypatch):
    """The statistics pass observes the down projections' inputs but skips their products (its output is dropped):
    the checkpoint is the one computing them gives."""
    src = tiny_dir(family)
    fast = _convert(src, str(tmp_path / "fast"), calib_file)
    monkeypatch.setattr(ModelSpec, "adds_to_output", lambda self, i, module: False)
    _assert_same(fast, _convert(src, str(tmp_path / "full"), calib_file))


def test_adds_to_output_names_the_down_projections_only(tiny_dir):
    import json

    def spec(family):
        with open(os.path.join(tiny_dir(family), "config.json")) as f:
            return spec_for(json.load(f))

    llama, opt, mixtral, qwen = spec("llama"), spec("opt"), spec("mixtral"), spec("qwen2_moe")
    assert [m for m in llama.linear_modules(0) if llama.adds_to_output(0, m)] == ["mlp.down_proj"]
    assert [m for m in opt.linear_modules(0) if opt.adds_to_output(0, m)] == ["fc2"]
    assert {m.rpartition(".")[2] for m in mixtral.linear_modules(0) if mixtral.adds_to_output(0, m)} == {"w2"}
    downs = [m for m in qwen.linear_modules(0) if qwen.adds_to_output(0, m)]
    assert "mlp.shared_expert.down_proj" in downs and len(downs) == qwen.num_experts + 1


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_native_input_quantization(family, tiny_dir, calib_file, tmp_path, monkeypatch):
    """The quantized forward and the search quantize their inputs with the CPU kernel's quantize_rows where it is
    built: the checkpoint is the one torch's quantize_input gives."""
    import offline.convert
    import offline.haq.search
    from vllm_haq.quant import quantize_input

    src = tiny_dir(family)
    fast = _convert(src, str(tmp_path / "fast"), calib_file)
    monkeypatch.setattr(offline.convert, "native_quantize_input", quantize_input)
    monkeypatch.setattr(offline.haq.search, "native_quantize_input", quantize_input)
    _assert_same(fast, _convert(src, str(tmp_path / "torch"), calib_file))


def test_native_quantize_input_gives_quantize_inputs_bits():
    from vllm_haq.kernels import cpu_int8
    from vllm_haq.quant import quantize_input

    from vllm_haq.kernels.cpu_int8 import native_quantize_input

    g = torch.Generator().manual_seed(0)
    for k, block in ((576, 64), (1536, 128), (96, None)):
        x = torch.randn(3, 50, k, generator=g) * torch.rand(k, generator=g) * 8
        x[1, 7, 5] = 500.0
        for smooth in (None, torch.rand(k, generator=g) + 0.25):
            for rows in (x, x.double()):  # float64 rows: quantize_input itself
                got, want = native_quantize_input(rows, smooth, block), quantize_input(rows, smooth, block)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (k, block)
    if not cpu_int8.available():
        pytest.skip("the CPU int8 kernel is not built here: only the fallback was compared")


def test_openblas_idle_wait_is_shortened_unless_set(monkeypatch):
    """offline.threads: how OpenBLAS's idle workers wait (set before scipy loads it), never what it computes;
    a user's own setting stays."""
    from offline.threads import OPENBLAS_THREAD_TIMEOUT, quiet_openblas_waits

    name, value = OPENBLAS_THREAD_TIMEOUT
    monkeypatch.delenv(name, raising=False)
    quiet_openblas_waits()
    assert os.environ[name] == value
    monkeypatch.setenv(name, "28")
    quiet_openblas_waits()
    assert os.environ[name] == "28"
