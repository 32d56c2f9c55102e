"""Calibrated conversion methods: smoothing folds leave every family's layers unchanged; all methods
produce valid checkpoints whose int8 models stay close to the float model."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from offline.calibrated import InputStats, _apply_smoothing, _factors
from offline.convert import METHODS, ConvertOptions, convert
from offline.evaluate import hf_token_nll
from offline.models import LayerTensors, spec_for
from tiny_models import FAMILIES
from vllm_haq.format import validate_checkpoint


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_smoothing_leaves_each_layer_unchanged(family, tiny_dir):
    d = tiny_dir(family)
    spec = spec_for(json.load(open(os.path.join(d, "config.json"))))
    tensors = load_file(os.path.join(d, "model.safetensors"))
    torch.manual_seed(0)
    h = torch.randn(2, 24, 128)
    for i in range(spec.num_layers):
        p = spec.layer_prefix(i)
        t = {k[len(p):]: v.double() for k, v in tensors.items() if k.startswith(p)}
        stats = InputStats()
        ref = spec.layer_forward(i, LayerTensors({k: v.float() for k, v in t.items()}, observer=stats), h)
        targets = spec.linear_modules(i)
        for g in spec.smoothing_groups(i):
            _apply_smoothing(t, g, _factors(t, g, [c for c in g.consumers if c in targets], stats, 0.5).double(), stats)
        out = spec.layer_forward(i, LayerTensors({k: v.float() for k, v in t.items()}), h)
        assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("method", [m for m in METHODS if m != "rtn"])
@pytest.mark.parametrize("family", ["opt", "mixtral", "qwen2_moe"])
def test_calibrated_methods_convert_and_stay_close_to_float(method, family, tiny_dir, calib_file, tmp_path):
    out = str(tmp_path / "ckpt")
    convert(tiny_dir(family), out, ConvertOptions(method=method, calib=[calib_file], samples=4, seq_len=64))
    qcfg = validate_checkpoint(out)
    assert qcfg.producer["method"] == method
    if method in ("smoothquant", "haq"):
        assert set(qcfg.smoothing["alpha"]) == {"0", "1"}  # every layer recorded its choice
    ids = torch.randint(2, 500, (2, 48), generator=torch.Generator().manual_seed(3))
    drift = (hf_token_nll(out, ids) - hf_token_nll(tiny_dir(family), ids)).abs().mean()
    assert float(drift) < 0.05


def test_per_expert_smoothing_round_trips_into_the_runtime(tiny_dir, calib_file, tmp_path):
    """Explicit per-expert input_smooth: written by the converter, validated, applied by vLLM like the reference."""
    from conftest import shutdown_llm
    from vllm_haq.vllm.evaluate import make_llm, prompt_token_logprobs

    out = str(tmp_path / "ckpt")
    convert(tiny_dir("mixtral"), out, ConvertOptions(method="haq", moe_smoothing="per-expert", calib=[calib_file],
                                                     samples=4, seq_len=64))
    qcfg = validate_checkpoint(out)
    assert qcfg.smoothing["explicit"] == [f"model.layers.{i}.block_sparse_moe.experts" for i in (0, 1)]
    tensors = {}
    for f in os.listdir(out):
        if f.startswith("model-"):
            tensors.update(load_file(os.path.join(out, f)))
    smooth = [tensors[f"model.layers.0.block_sparse_moe.experts.{e}.w1.input_smooth"] for e in range(8)]
    assert all(torch.equal(s, tensors[f"model.layers.0.block_sparse_moe.experts.{e}.w3.input_smooth"])
               for e, s in enumerate(smooth))
    assert any(not torch.equal(s, torch.ones_like(s)) for s in smooth)  # real per-expert factors
    assert not torch.equal(smooth[0], smooth[1]) or not torch.equal(smooth[2], smooth[3])

    ids = torch.randint(2, 500, (3, 48), generator=torch.Generator().manual_seed(5))
    llm = make_llm(out, max_model_len=128, dtype="float32", enforce_eager=True)
    try:
        served = prompt_token_logprobs(llm, ids)
    finally:
        shutdown_llm(llm)
    diff = (served + hf_token_nll(out, ids).double()).abs()
    assert float(diff.mean()) < 1e-3 and float(diff.max()) < 0.15
