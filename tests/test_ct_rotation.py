"""HAQ's block-Hadamard input rotation exported as compressed-tensors transforms (``transform_config``).

What each reader does with the export (vLLM 0.32 CPU build, compressed-tensors 0.17, transformers 5.19):

* compressed-tensors' own ``apply_transform_config`` (online ``hadamard`` scheme at ``input``, ``head_dim`` =
  block) computes exactly HAQ's rotation: the same Sylvester matrix (``deterministic_hadamard_matrix``, ±1,
  divided by √block), applied block-diagonally to contiguous blocks of ``head_dim`` input features.
* stock vLLM builds the model with a ``HadamardTransform`` on every rotated linear (the fused q/k/v and gate/up
  included) and loads the stored matrices, then needs its CUDA-only ``hadacore_transform`` op at the first
  forward: the CPU build has no such op, so it cannot serve any online transform (docs/interop.md). Where the op
  exists, the test compares it with HAQ's reference like the unrotated dense export.
* transformers loads the export but ignores ``transform_config`` (its compressed-tensors quantizer applies the
  quantization config only): the model is wrong until ``apply_transform_config`` is called on it.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from offline.interop import (ROTATION_SHARD, InteropError, export_compressed_tensors, import_compressed_tensors)
from vllm_haq.format import (SAFETENSORS_INDEX, CheckpointError, rotation_from_transform_config, to_transform_config,
                             transform_tensor_name, validate_checkpoint)
from vllm_haq.quant.rotation import hadamard, rotate, sylvester

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.transform import (TransformConfig, apply_transform_config,  # noqa: E402
                                          deterministic_hadamard_matrix)


@pytest.fixture(scope="module")
def rotated_llama(converted):
    """A tiny llama converted by haq with every dense layer rotated (blocks of 128; down_proj: 2 blocks)."""
    return converted("llama", method="haq", rotation="all")


def _weights(ckpt: str) -> dict:
    out = {}
    for f in sorted(os.listdir(ckpt)):
        if f.endswith(".safetensors") and f.startswith("model"):
            out.update(load_file(os.path.join(ckpt, f)))
    return out


def test_haqs_rotation_is_compressed_tensors_hadamard_transform():
    """Same matrix, same ordering and signs, same block-diagonal layout, through the library's own code."""
    for block in (2, 4, 16, 64, 128, 512):
        h = deterministic_hadamard_matrix(block, torch.float64)
        assert torch.equal(sylvester(block), h), block
        eye = torch.eye(block, dtype=torch.float64)
        assert torch.equal(rotate(eye, block), h / block ** 0.5) and torch.equal(hadamard(block), h / block ** 0.5)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(64, 256, bias=False)
            self.down = torch.nn.Linear(256, 64, bias=False)

        def forward(self, x):
            return self.down(self.up(x))

    torch.manual_seed(0)
    model = Tiny().double()
    x = torch.randn(5, 64, dtype=torch.float64)
    up, down = model.up.weight.detach().clone(), model.down.weight.detach().clone()
    config = TransformConfig.model_validate(to_transform_config({"up": 64, "down": 128}))
    for name, scheme in config.config_groups.items():  # float64, to compare the functions, not the roundings
        config.config_groups[name] = scheme.model_copy(update={"precision": torch.float64})
    apply_transform_config(model, config)
    want = torch.nn.functional.linear(rotate(torch.nn.functional.linear(rotate(x, 64), up), 128), down)
    torch.testing.assert_close(model(x), want, rtol=0, atol=1e-12)


def test_transform_config_round_trip_and_what_haq_refuses():
    rotation = {"model.layers.0.mlp.down_proj": 128, "model.layers.0.self_attn.q_proj": 64,
                "model.layers.0.self_attn.k_proj": 64}
    tc = to_transform_config(rotation)
    assert json.dumps(tc) == json.dumps(tc, sort_keys=True)
    assert set(tc["config_groups"]) == {"haq_rotation_64", "haq_rotation_128"}
    scheme = tc["config_groups"]["haq_rotation_64"]
    assert scheme["type"] == "hadamard" and scheme["head_dim"] == 64 and scheme["randomize"] is False
    assert scheme["apply"] == [{"targets": ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj"],
                                "location": "input", "inverse": False, "ignore": []}]
    assert rotation_from_transform_config(tc) == rotation and rotation_from_transform_config({}) == {}
    assert transform_tensor_name("a.q_proj", 64) == "a.q_proj.haq_rotation_64_input.weight"
    cases = (
        (("type",), "random-hadamard", r"haq_rotation_64\.type is 'random-hadamard'"),
        (("randomize",), True, r"haq_rotation_64\.randomize is True"),
        (("head_dim",), None, r"haq_rotation_64\.head_dim is None"),
        (("apply", 0, "location"), "output", r"apply\[0\]: location 'output'"),
        (("apply", 0, "inverse"), True, r"inverse True"),
        (("apply", 0, "targets"), ["re:.*q_proj"], r"targets has 're:\.\*q_proj'"),
        (("apply", 0, "targets"), ["Linear"], r"targets has 'Linear'"),
        (("no_such_key",), 1, r"compressed-tensors \S+ rejects it"),
    )
    for path, value, match in cases:
        bad = json.loads(json.dumps(tc))
        node = bad["config_groups"]["haq_rotation_64"]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(CheckpointError, match=match):
            rotation_from_transform_config(bad, "x/config.json: quantization_config.transform_config")
    twice = json.loads(json.dumps(tc))
    twice["config_groups"]["haq_rotation_128"]["apply"][0]["targets"].append("model.layers.0.self_attn.q_proj")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.q_proj' is rotated by two schemes"):
        rotation_from_transform_config(twice)


def test_rotated_export_round_trip(rotated_llama, tmp_path):
    from offline.perplexity import hf_token_nll
    from vllm_haq.vllm.config import HAQConfig

    qcfg = validate_checkpoint(rotated_llama)
    assert len(qcfg.input_rotation) == 14 and set(qcfg.input_rotation.values()) == {128}
    out = export_compressed_tensors(rotated_llama, str(tmp_path / "ct"))
    cfg = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert cfg["transform_config"] == to_transform_config(qcfg.input_rotation)
    assert validate_checkpoint(out).input_rotation == qcfg.input_rotation  # the compressed-tensors reading
    # HAQ's tensors unchanged, plus one ±1 Sylvester matrix per rotated linear, in the index like any weight
    got, want = _weights(out), _weights(rotated_llama)
    extra = {transform_tensor_name(m, b) for m, b in qcfg.input_rotation.items()}
    assert set(got) == set(want) | extra and all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(got[k].double(), sylvester(128)) for k in extra)
    index = json.load(open(os.path.join(out, SAFETENSORS_INDEX)))["weight_map"]
    assert {k for k, v in index.items() if v == ROTATION_SHARD} == extra
    # HAQ's reference reads the rotation from transform_config: the same function as the HAQ checkpoint
    ids = torch.randint(2, 500, (2, 32), generator=torch.Generator().manual_seed(3))
    assert torch.equal(hf_token_nll(out, ids), hf_token_nll(rotated_llama, ids))
    back = import_compressed_tensors(out, str(tmp_path / "haq"))
    assert validate_checkpoint(back).input_rotation == qcfg.input_rotation
    again = _weights(back)
    assert again.keys() == want.keys() and all(torch.equal(again[k], want[k]) for k in want)
    # the plugin serves compressed-tensors only without transforms: it points to haq import
    with pytest.raises(CheckpointError, match=r"transform_config rotates layer inputs.*haq import"):
        HAQConfig.override_quantization_method(cfg, "haq")
    # a stored matrix that is not the scheme's is named, file and tensor
    name = sorted(extra)[0]
    path = os.path.join(out, ROTATION_SHARD)
    tensors = load_file(path)
    tensors[name] = -tensors[name]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{ROTATION_SHARD}: tensor '{name}' is not the ±1 Sylvester"):
        validate_checkpoint(out)
    with pytest.raises(InteropError, match=rf"{ROTATION_SHARD}: {name} is not the ±1 Sylvester"):
        import_compressed_tensors(out, str(tmp_path / "bad"))


def test_export_refuses_rotations_stock_vllm_cannot_run(rotated_llama, haq_dir, tiny_dir, calib_file, tmp_path,
                                                         capsys):
    """Biased linears (tiny OPT), MoE experts (tiny Mixtral) and fused linears rotated unevenly are refused,
    naming the module; `haq convert` refuses the first two before converting anything."""
    import shutil

    from conftest import shared_path
    from offline.cli import main

    out = str(tmp_path / "ct")
    for model, what in ((shared_path("models", "tiny-opt"), "'model.decoder.layers.0.fc1' has a bias"),
                        (tiny_dir("mixtral"), "'model.layers.0.block_sparse_moe.experts.0.w1.weight' belongs to MoE "
                                              "experts")):
        capsys.readouterr()  # building the tiny model writes progress bars
        rc = main(["convert", model, out, "--format", "compressed-tensors", "--method", "haq", "--rotation", "search",
                   "--calib", calib_file, "--samples", "4", "--seq-len", "64"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and what in err[0] and "--rotation none" in err[0], err
        assert not os.listdir(tmp_path)

    def with_rotation(src: str, name: str, rotation: dict) -> str:
        """``src`` with ``rotation`` in its input_rotation: what the export reads to decide (tensors as they are)."""
        ckpt = shutil.copytree(src, str(tmp_path / name))
        cfg = json.load(open(os.path.join(ckpt, "config.json")))
        cfg["quantization_config"].update(format_version=2, input_rotation={
            **cfg["quantization_config"].get("input_rotation", {}), **rotation})
        json.dump(cfg, open(os.path.join(ckpt, "config.json"), "w"))
        return ckpt

    biased = with_rotation(haq_dir("opt"), "opt", {"model.decoder.layers.1.fc2": 128})
    experts = with_rotation(haq_dir("mixtral"), "mixtral", {f"model.layers.0.block_sparse_moe.experts.{e}.w2": 64
                                                           for e in range(8)})
    uneven = with_rotation(rotated_llama, "uneven", {"model.layers.1.self_attn.v_proj": 64})
    for ckpt, match in ((biased, r"'model\.decoder\.layers\.1\.fc2', which has a bias: stock vLLM"),
                        (experts, r"'model\.layers\.0\.block_sparse_moe\.experts\.0\.w2', an MoE expert: stock"),
                        (uneven, r"'model\.layers\.1\.self_attn\.k_proj' with block 128 but "
                                 r"'model\.layers\.1\.self_attn\.v_proj' with 64")):
        with pytest.raises(InteropError, match=match):
            export_compressed_tensors(ckpt, out)
        assert not os.path.exists(out) and not os.path.exists(out + ".partial")


def test_transformers_runs_the_rotated_export_after_apply_transform_config(rotated_llama, tiny_dir, tmp_path):
    """transformers ignores transform_config (wrong model); with compressed-tensors' apply_transform_config the
    weights-only model equals HAQ's dequantized function and W8A8 is within W8A8 noise of HAQ's reference."""
    from transformers import AutoModelForCausalLM

    from compressed_tensors.transform.factory.base import TransformBase
    from offline.models import log_softmax_nll
    from offline.perplexity import hf_token_nll

    out = export_compressed_tensors(rotated_llama, str(tmp_path / "ct"))
    windows = torch.randint(2, 500, (4, 64), generator=torch.Generator().manual_seed(1234))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = hf_token_nll(rotated_llama, windows).double()
    drift = float((ref - hf_token_nll(tiny_dir("llama"), windows).double()).abs().mean())
    with torch.no_grad():
        ignored = log_softmax_nll(model(windows).logits, windows).double()
        assert not any(isinstance(m, TransformBase) for m in model.modules()), "transformers now applies transforms"
        assert float((ignored - ref).abs().mean()) > 10 * drift  # unrotated inputs into W R: a wrong model
        tc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]["transform_config"]
        apply_transform_config(model, TransformConfig.model_validate(tc))
        w8a8 = log_softmax_nll(model(windows).logits, windows).double()
        for m in model.modules():
            if getattr(m, "quantization_scheme", None) is not None:
                m.quantization_enabled = False
        w8a16 = log_softmax_nll(model(windows).logits, windows).double()
    weights_only = hf_token_nll(_unrotated_dequantized(rotated_llama, str(tmp_path / "deq")), windows).double()
    err = float((w8a16 - weights_only).abs().max())
    own = float((w8a8 - ref).abs().mean())
    wrong = float((ignored - ref).abs().mean())
    print(f"transformers + apply_transform_config: weights-only max |Δ| {err:.2e}; W8A8 vs HAQ reference mean "
          f"{own:.2e} (W8A8 vs bf16 drift {drift:.2e}; without the transforms {wrong:.2f})")
    assert err <= 1e-4, err
    assert own <= 2 * drift, f"compressed-tensors W8A8 vs HAQ reference {own:.3e}, drift {drift:.3e}"


def _unrotated_dequantized(ckpt: str, out: str) -> str:
    """A plain float checkpoint of the same function: weight * scale, the rotation taken back out ((W R) R = W:
    the normalized Sylvester matrix is symmetric and orthogonal), so it needs no transform."""
    rotation = validate_checkpoint(ckpt).input_rotation
    tensors = _weights(ckpt)
    deq = {}
    for name, t in tensors.items():
        if name.endswith(".weight_scale"):
            continue
        module = name[: -len(".weight")]
        t = t.double() * tensors[name + "_scale"].double() if t.dtype == torch.int8 else t
        deq[name] = (rotate(t, rotation[module]) if module in rotation else t).float().contiguous()
    os.makedirs(out)
    save_file(deq, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    config = json.load(open(os.path.join(ckpt, "config.json")))
    config.pop("quantization_config")
    json.dump(config, open(os.path.join(out, "config.json"), "w"))
    return out


def _transforms(model) -> dict:
    """vLLM model -> {linear name: (scheme type, head_dim, loaded matrix)} of its compressed-tensors transforms."""
    from vllm.model_executor.layers.quantization.compressed_tensors.transform.module import HadamardTransform

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, HadamardTransform):
            tfm = next(iter(module.transforms.values()))  # one input transform for all parts of a fused linear
            assert tfm.args.location == "input" and name.endswith(f".{tfm.scheme_name}_input")
            out[name.rsplit(".", 1)[0]] = (tfm.scheme.type, tfm.scheme.head_dim,
                                           module.weight.partitions[0].data.cpu().clone())
    return out


def test_stock_vllm_builds_the_rotated_export_and_runs_it_where_it_has_hadacore(rotated_llama, tiny_dir, tmp_path,
                                                                                monkeypatch):
    """No plugin in the engine. vLLM puts a HadamardTransform (head_dim 128) on every rotated linear, fused
    q/k/v and gate/up included, and loads the matrices (divided by √128 at load: HAQ's normalized Sylvester
    matrix). Its forward calls the CUDA-only ``hadacore_transform`` op; the CPU build lacks it, so there the
    first forward fails (documented in docs/interop.md). Where the op exists, the e2e check of the unrotated
    dense export applies: logprobs against HAQ's reference with stock vLLM's arithmetic."""
    from vllm import LLM
    from vllm.platforms import current_platform
    from vllm.plugins import load_general_plugins

    from conftest import shutdown_llm
    from offline.perplexity import hf_token_nll
    from test_interop import _prompt_logprobs, _reproduce_stock_vllm_w8a8

    out = export_compressed_tensors(rotated_llama, str(tmp_path / "ct"))
    windows = torch.randint(2, 500, (4, 64), generator=torch.Generator().manual_seed(1234))
    load_general_plugins()  # see test_interop.test_stock_vllm_serves_the_dense_export
    monkeypatch.setenv("VLLM_PLUGINS", "")
    llm = LLM(out, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=256, seed=0)
    try:
        assert llm.llm_engine.model_config.quantization == "compressed-tensors"
        (transforms,) = llm.apply_model(_transforms)
        fused = {f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.qkv_proj", "self_attn.o_proj",
                                                                 "mlp.gate_up_proj", "mlp.down_proj")}
        assert set(transforms) == fused
        for name, (kind, head_dim, matrix) in transforms.items():
            assert kind == "hadamard" and head_dim == 128, name
            torch.testing.assert_close(matrix.double(), hadamard(128), rtol=0, atol=1e-7)
        try:
            served = _prompt_logprobs(llm, windows)
        except AttributeError as exc:
            assert current_platform.is_cpu() and "hadacore_transform" in str(exc), exc
            return  # vLLM's CPU build has no online-transform op: a vLLM limitation (docs/interop.md)
    finally:
        shutdown_llm(llm)
    arithmetic = _reproduce_stock_vllm_w8a8(monkeypatch)
    reproduced = not arithmetic.startswith("not reproduced")
    diff = (served + hf_token_nll(rotated_llama, windows).double()).abs()
    print(f"stock vLLM vs HAQ reference ({arithmetic}): mean {float(diff.mean()):.2e} max {float(diff.max()):.2e}")
    mean_tol, max_tol = (1e-3, 0.15) if reproduced else (0.02, 0.3)
    assert float(diff.mean()) <= mean_tol and float(diff.max()) <= max_tol, (float(diff.mean()), float(diff.max()))
