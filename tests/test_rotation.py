"""Block-Hadamard input rotation (format v2): exact in float64, it lowers the W8A8 error where a few tokens carry
a huge value in one channel and haq's search picks it there, and a rotated checkpoint is served by vLLM as the
int8 reference computes it (and not as the same weights unrotated)."""

import json
import os
import shutil

import pytest
import torch

from offline.convert import ConvertError, ConvertOptions, convert
from offline.perplexity import hf_token_nll
from offline.haq import InputStats, WorkingTensors, search_alpha, weight_absmax
from offline.interop import InteropError, export_compressed_tensors
from offline.models import SmoothGroup
from vllm_haq.format import validate_checkpoint
from vllm_haq.quant import quantize_per_token, quantize_weight_per_channel
from vllm_haq.quant.gptq import GPTQConfig
from vllm_haq.quant.rotation import check_block, hadamard, rotate, rotate_hessian, rotation_block


def test_rotation_is_orthogonal_and_exact_in_float64():
    for b in (2, 16, 128):
        h = hadamard(b)
        assert torch.equal(h, h.t()) and torch.allclose(h @ h, torch.eye(b, dtype=torch.float64), atol=1e-12)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 384, dtype=torch.float64, generator=gen)
    w = torch.randn(96, 384, dtype=torch.float64, generator=gen)
    for b in (16, 128):
        assert torch.allclose(rotate(x, b) @ rotate(w, b).t(), x @ w.t(), rtol=0, atol=1e-10)
        assert torch.allclose(rotate_hessian(x.t() @ x, b), rotate(x, b).t() @ rotate(x, b), rtol=0, atol=1e-9)
        assert not torch.allclose(rotate(x, b), x)
    assert [rotation_block(n) for n in (576, 1536, 4096, 14336, 4104)] == [64, 128, 128, 128, None]
    with pytest.raises(ValueError, match="rotation block 48 is not a power of two"):
        check_block(48, 96, "x")
    with pytest.raises(ValueError, match="rotation block 16 does not divide the 40 input features"):
        rotate(torch.zeros(2, 40), 16)


def _w8a8_error(x: torch.Tensor, w: torch.Tensor, block: int | None) -> float:
    xr, wr = (x, w) if block is None else (rotate(x, block), rotate(w, block))
    (xq, xs), (wq, ws) = quantize_per_token(xr), quantize_weight_per_channel(wr)
    y = (xq.double() @ wq.double().t()) * xs.double() * ws.double().t()
    return float((y - x.double() @ w.double().t()).pow(2).sum())


def test_rotation_cuts_the_error_of_token_sparse_outliers_and_the_search_picks_it():
    """A few tokens with one huge channel (SmolLM2's down_proj input has them): per-token scales of those tokens
    waste int8's range on one channel, which smoothing can only rescale and a rotation spreads over its block."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 256, generator=gen)
    x[::50, 7] = 300.0 * (1 + torch.rand(x[::50, 7].shape, generator=gen))
    x[3::90, 200] = -150.0
    w = torch.randn(96, 256, generator=gen) * 0.05
    assert _w8a8_error(x, w, 128) * 3 < _w8a8_error(x, w, None)

    stats = InputStats(keep_rows_every=1)
    stats("mlp.down_proj", x)
    g = SmoothGroup(["mlp.down_proj"], producer="mlp.up_proj")
    t = WorkingTensors({"mlp.down_proj.weight": w})
    w_absmax = weight_absmax(t, g.consumers)
    assert search_alpha(t, g, g.consumers, stats, w_absmax, GPTQConfig())[1] is None  # not offered
    alpha, block = search_alpha(t, g, g.consumers, stats, w_absmax, GPTQConfig(), rotation=128)
    assert block == 128
    only = search_alpha(t, g, g.consumers, stats, w_absmax, GPTQConfig(), rotation=128, only_rotated=True)
    assert only == (alpha, block)


def test_the_experts_down_projections_are_rotated_all_alike_or_not_at_all():
    """The fused MoE rotates every expert's intermediate rows the same way, so haq's search decides once per layer
    for all routed experts' down projections (by their summed error): an expert no calibration token reached is
    rotated with the others, and no expert is rotated when one of them stays unquantized."""
    from offline.haq import METHODS, LayerOptions, LayerRecord, smooth_expert_downs

    gen = torch.Generator().manual_seed(2)
    experts = [f"mlp.experts.{e}" for e in range(3)]
    source = {}
    for x in experts:
        source[f"{x}.w3.weight"] = torch.randn(256, 64, generator=gen)
        source[f"{x}.w2.weight"] = torch.randn(64, 256, generator=gen) * 0.05

    def run(targets, rotation):
        stats = InputStats(keep_rows_every=1)
        for x in experts[:2]:  # expert 2 saw no calibration token
            h = torch.randn(512, 256, generator=gen)
            h[::40, 11] = 400.0  # token-sparse outliers, as in the test above: rotation wins
            stats(f"{x}.w2", h)
        t = WorkingTensors(dict(source))
        groups = [SmoothGroup([f"{x}.w2"], producer=f"{x}.w3") for x in experts]
        record = LayerRecord()
        smooth_expert_downs(t, groups, targets, stats, LayerOptions(METHODS["haq"], alpha=0.5, rotation=rotation),
                            record)
        return t, record

    every = [f"{x}.w2" for x in experts]
    t, record = run(every, "search")
    assert record.rotation == {m: 128 for m in every}
    assert torch.allclose(t["mlp.experts.2.w2.weight"], rotate(source["mlp.experts.2.w2.weight"], 128))
    assert record.alpha.get("mlp.experts.2.w2") is None  # nothing to smooth it by
    assert not run(every, "none")[1].rotation
    assert not run(every[:2], "all")[1].rotation  # expert 2's down projection stays float


@pytest.fixture(scope="module")
def rotated(converted):
    """family -> a haq checkpoint converted with --rotation all."""
    return lambda family: converted(family, method="haq", rotation="all")


def _unrotated_copy(ckpt: str, out: str) -> str:
    """The same tensors with quantization_config.input_rotation removed (format v1): a wrong model."""
    shutil.copytree(ckpt, out)
    path = os.path.join(out, "config.json")
    cfg = json.load(open(path))
    cfg["quantization_config"].pop("input_rotation")
    cfg["quantization_config"]["format_version"] = 1
    json.dump(cfg, open(path, "w"))
    return out


@pytest.mark.parametrize("family,offload", [("llama", None), ("mixtral", None), ("mixtral", {"slots_per_layer": 2})],
                         ids=["llama", "mixtral", "mixtral-offloaded"])
def test_rotated_checkpoint_round_trips_into_the_runtime(family, offload, rotated, tiny_dir, tmp_path):
    from conftest import shutdown_llm
    from vllm_haq.vllm.scoring import make_llm, prompt_token_logprobs

    ckpt = rotated(family)
    qcfg = validate_checkpoint(ckpt)
    attention = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    rotated_modules = {m: 128 for m in attention} | {
        "llama": {"mlp.gate_proj": 128, "mlp.up_proj": 128, "mlp.down_proj": 128},
        "mixtral": {f"block_sparse_moe.experts.{e}.{w}": 64 if w == "w2" else 128
                    for e in range(8) for w in ("w1", "w3", "w2")}}[family]
    # every linear: hidden 128 and llama's intermediate 256 -> blocks of 128, mixtral's intermediate 192 -> 64
    assert qcfg.input_rotation == {f"model.layers.{i}.{m}": b for i in (0, 1) for m, b in rotated_modules.items()}
    assert json.load(open(os.path.join(ckpt, "config.json")))["quantization_config"]["format_version"] == 2

    ids = torch.randint(2, 500, (3, 48), generator=torch.Generator().manual_seed(5))
    reference = hf_token_nll(ckpt, ids).double()
    assert float((reference - hf_token_nll(tiny_dir(family), ids).double()).abs().mean()) < 0.05
    unrotated = hf_token_nll(_unrotated_copy(ckpt, str(tmp_path / "unrotated")), ids).double()
    assert float((unrotated - reference).abs().mean()) > 0.05  # the rotation is what makes the weights right

    extra = {"additional_config": {"haq": offload}} if offload else {}  # offloaded: the engine serves the experts
    llm = make_llm(ckpt, max_model_len=128, dtype="float32", enforce_eager=True, **extra)
    try:
        served = prompt_token_logprobs(llm, ids)
    finally:
        shutdown_llm(llm)
    diff = (served + reference).abs()
    # most positions agree to float32 rounding; an activation that vLLM's float ops put on the other side of an
    # int8 rounding boundary shifts the later positions of its row by ~1e-3..1e-2 (the unrotated model: > 0.05)
    assert float(diff.median()) < 1e-5 and float(diff.mean()) < 5e-3 and float(diff.max()) < 0.15, diff


def test_rotation_is_refused_where_it_cannot_be_expressed(rotated, tiny_dir, calib_file, tmp_path, capsys):
    from offline.cli import main

    with pytest.raises(ConvertError, match="--rotation all needs --method haq"):
        convert(tiny_dir("llama"), str(tmp_path / "g"), ConvertOptions(method="gptq", rotation="all",
                                                                        calib=[calib_file], samples=4, seq_len=64))
    with pytest.raises(ConvertError, match="--rotation 'sideways' is not one of"):
        convert(tiny_dir("llama"), str(tmp_path / "g"), ConvertOptions(rotation="sideways", calib=[calib_file]))
    # compressed-tensors expresses dense rotations as transform_config (tests/test_ct_rotation.py), MoE experts not
    out = str(tmp_path / "ct")
    with pytest.raises(InteropError, match=r"input of 'model\.layers\.0\.block_sparse_moe\.experts\.0\.w1', an MoE "
                                           r"expert.*--rotation none"):
        export_compressed_tensors(rotated("mixtral"), out)
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")
    rc = main(["convert", tiny_dir("llama"), out, "--format", "compressed-tensors", "--rotation", "all",
               "--calib", calib_file, "--samples", "4", "--seq-len", "64"])
    assert rc == 0 and sorted(os.listdir(tmp_path)) == ["ct"], capsys.readouterr().err
    assert validate_checkpoint(out).input_rotation == validate_checkpoint(rotated("llama")).input_rotation


def test_the_moe_runtime_takes_one_rotation_per_expert_input():
    """One block for all experts' shared gate/up input and one for all their down projections' inputs."""
    from vllm_haq.format import CheckpointError, HAQQuantConfig
    from vllm_haq.vllm.moe_method import _expert_rotation

    prefix = "model.layers.0.block_sparse_moe.experts"
    gate_up = {f"{prefix}.{e}.{w}": 64 for e in range(4) for w in ("w1", "w3")}
    down = {f"{prefix}.{e}.w2": 32 for e in range(4)}
    assert _expert_rotation(HAQQuantConfig(input_rotation={"model.layers.0.self_attn.q_proj": 64}), prefix, 4,
                            False) == (None, None)
    assert _expert_rotation(HAQQuantConfig(input_rotation=gate_up), prefix, 4, False) == (64, None)
    assert _expert_rotation(HAQQuantConfig(input_rotation={**gate_up, **down}), prefix, 4, False) == (64, 32)
    assert _expert_rotation(HAQQuantConfig(input_rotation=down), prefix, 4, True) == (None, 32)
    cases = {
        "one down projection": ({**gate_up, f"{prefix}.2.w2": 64}, False,
                                r"entries for 1 of the 4 down projections, with blocks \[64\].*all 4 experts' down"),
        "not an expert linear": ({f"{prefix}.2.w9": 64}, False,
                                 r"'model\.layers\.0\.block_sparse_moe\.experts\.2\.w9' is not an expert's gate, up"),
        "explicit smoothing": (gate_up, True, "also carry explicit per-expert input_smooth"),
        "two blocks": ({**gate_up, f"{prefix}.3.w3": 128}, False, r"blocks \[64, 128\]"),
        "an expert left out": ({k: v for k, v in gate_up.items() if ".1." not in k}, False,
                               "all 4 experts' gate and up projections need the same block"),
        "two down blocks": ({**down, f"{prefix}.0.w2": 64}, False, r"4 of the 4 down projections, with blocks \[32, "),
    }
    for rotation, explicit, pattern in cases.values():
        with pytest.raises(CheckpointError, match=pattern):
            _expert_rotation(HAQQuantConfig(input_rotation=rotation), prefix, 4, explicit)


def test_rotating_in_blocks_of_rows_gives_each_rows_own_bits():
    """rotate() takes large CPU inputs a block of rows at a time (through every butterfly stage while it is in
    cache): each row's result must be the bits of that row rotated alone."""
    from vllm_haq.quant import rotation as rot

    x = torch.randn((rot._CHUNK_ELEMENTS // 256) * 2 + 3, 256, generator=torch.Generator().manual_seed(1))
    got = rot.rotate(x, 128)
    assert torch.equal(got[:5], torch.cat([rot.rotate(x[i : i + 1], 128) for i in range(5)]))
    assert torch.equal(got[-3:], torch.cat([rot.rotate(x[i : i + 1], 128) for i in range(x.shape[0] - 3, x.shape[0])]))
