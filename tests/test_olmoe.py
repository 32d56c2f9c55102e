"""OLMoE (allenai/OLMoE-1B-7B's layout scaled down: q/k-norm over the whole q_proj/k_proj outputs, every layer an
MoE of 32 experts, top-8, the top-k weights not renormalized, no shared expert).

The reference forward equals transformers' (random q/k-norm weights, 128 and 64 wide); every smoothing fold
is exact and none divides q_proj/k_proj's output; the options vLLM's OLMoE would silently compute otherwise are
refused by name; ``haq convert`` (rtn and haq) writes valid checkpoints with routing statistics; vLLM serves the
rtn conversion as the int8 reference computes it, and with one expert slot per layer gives the all-resident
run's greedy tokens (two engine starts; checks shared with Qwen3-MoE: tests/moe_checks.py). The rtn conversion
served measured mean |Δ| 1.3e-5, max 3.3e-3 (0.4% of positions above 1e-3); the haq conversion, served once the
same way outside the suite (one more engine start), mean 2.0e-7, max 1.4e-6, and 11 clear-margin greedy steps
equal to the reference's."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from moe_checks import (assert_converted, assert_reference_matches_transformers, assert_served_and_offloaded,
                        assert_smoothing_folds_exact)
from offline.models import UnsupportedModelError, spec_for
from vllm_haq.format import moe_layout

FAMILY = "olmoe"


def test_reference_forward_matches_transformers(tiny_dir):
    """With random q/k-norm weights (q's 128 wide: both heads under one norm, one weight per channel)."""
    d = tiny_dir(FAMILY)
    src = load_file(os.path.join(d, "model.safetensors"))
    assert src["model.layers.0.self_attn.q_norm.weight"].shape == (128,)
    assert src["model.layers.0.self_attn.k_norm.weight"].shape == (64,)
    assert float(src["model.layers.0.self_attn.q_norm.weight"].float().std()) > 0.1
    assert_reference_matches_transformers(d)


def test_layout_and_folds(tiny_dir):
    """Every layer an MoE of 32 experts (OLMoE's configs say num_experts), top-8 not renormalized; smoothing
    every group at α 0.5 leaves each layer unchanged, none folds into q_proj/k_proj."""
    d = tiny_dir(FAMILY)
    cfg = json.load(open(os.path.join(d, "config.json")))
    spec = spec_for(cfg)
    assert "num_experts" in cfg and moe_layout(cfg) == ([0, 1], 32) and spec.num_experts == 32
    assert spec.top_k == 8 and spec.moe_block(1) == ("mlp", ("gate_proj", "up_proj", "down_proj"))
    assert spec.facts.moe.renormalize is False and spec.facts.moe.shared_expert is None
    assert set(spec.facts.no_output_folds) == {"self_attn.q_proj", "self_attn.k_proj"}
    assert len(spec.linear_modules(0)) == 4 + 32 * 3
    assert_smoothing_folds_exact(d)


@pytest.mark.parametrize("option,value", [("clip_qkv", 8.0), ("attention_bias", True), ("norm_topk_prob", True),
                                          ("rms_norm_eps", 1e-6), ("head_dim", 32)])
def test_options_vllm_would_ignore_are_refused(option, value, tiny_dir):
    cfg = json.load(open(os.path.join(tiny_dir(FAMILY), "config.json")))
    with pytest.raises(UnsupportedModelError, match=f"^x/config.json: OLMoE with {option}.* is not supported"):
        spec_for({**cfg, option: value}, "x/config.json")
    spec_for({**cfg, "clip_qkv": None, "head_dim": 64})  # the defaults spelled out are fine


@pytest.mark.parametrize("method", ["rtn", "haq"])
def test_conversion(method, tiny_dir, converted):
    out = converted(FAMILY, method=method)
    assert_converted(out, tiny_dir(FAMILY), experts=32, layers=2, top_k=8)
    ours = {k: v for f in os.listdir(out) if f.endswith(".safetensors") for k, v in load_file(f"{out}/{f}").items()}
    src = load_file(os.path.join(tiny_dir(FAMILY), "model.safetensors"))
    for name in ("model.layers.0.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight"):
        assert torch.equal(ours[name], src[name]), name  # nothing folds into the q/k-norms


def test_served_and_offloaded_by_vllm(converted):
    print(f"{FAMILY} rtn: {assert_served_and_offloaded(converted(FAMILY, method='rtn'), experts=32)}")
