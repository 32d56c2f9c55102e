"""Qwen3-MoE (Qwen3-30B-A3B's layout scaled down: q/k-norm, 32 experts, top-8, renormalized top-k weights).

The reference forward equals transformers'; every smoothing fold is exact and none divides q_proj/k_proj's
output; ``haq convert`` (rtn and haq) writes valid checkpoints with routing statistics; vLLM serves the rtn
conversion as the int8 reference computes it, and with one expert slot per layer gives the all-resident run's
greedy tokens and log-probabilities (two engine starts in all). The haq conversion served the same way measured
mean |Δ| 4.4e-4, max 0.008, but 13.5% of positions above 1e-3: per-token rounding flips after ~1e-7 float-order
differences, as tests/test_families.py documents for the smoothed dense checkpoints."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from offline.haq import InputStats, WorkingTensors, apply_smoothing, group_factors, weight_absmax
from offline.models import LayerTensors, spec_for
from offline.perplexity import hf_token_nll
from test_reference_models import reference_logits
from vllm_haq.format import ROUTING_FILE, moe_layout, validate_checkpoint

FAMILY = "qwen3_moe"


def test_reference_forward_matches_transformers(tiny_dir):
    from transformers import AutoModelForCausalLM

    d = tiny_dir(FAMILY)
    ids = torch.randint(2, 500, (2, 48), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    with torch.no_grad():
        theirs = model(ids).logits
    assert theirs.std() > 0.1
    assert float((reference_logits(d, ids) - theirs).abs().max()) < 1e-4


def test_layout_and_folds(tiny_dir):
    """32 experts on both layers (transformers 5 writes num_local_experts, the Hub's configs num_experts: both
    read alike); smoothing every group at α 0.5 leaves each layer unchanged, none folds into q_proj/k_proj."""
    d = tiny_dir(FAMILY)
    cfg = json.load(open(os.path.join(d, "config.json")))
    spec = spec_for(cfg)
    hub = {k: v for k, v in cfg.items() if k != "num_local_experts"} | {"num_experts": 32}
    assert moe_layout(cfg) == moe_layout(hub) == ([0, 1], 32) and spec_for(hub).num_experts == spec.num_experts == 32
    assert spec.top_k == 8 and spec.moe_block(0) == ("mlp", ("gate_proj", "up_proj", "down_proj"))
    tensors = load_file(os.path.join(d, "model.safetensors"))
    h = torch.randn(2, 24, 128, generator=torch.Generator().manual_seed(1))
    for i in range(spec.num_layers):
        p = spec.layer_prefix(i)
        t = WorkingTensors({k[len(p):]: v.double() for k, v in tensors.items() if k.startswith(p)}, torch.float64)
        stats = InputStats()
        ref = spec.layer_forward(i, LayerTensors({k: t[k].float() for k in t.names()}, observer=stats), h)
        groups = spec.smoothing_groups(i)
        assert not {g.producer for g in groups} & {"self_attn.q_proj", "self_attn.k_proj"}
        for g in groups:
            if stats.seen(g.observed_module):  # an expert no token reached has no statistics
                s = group_factors(stats.absmax[g.observed_module], weight_absmax(t, g.consumers), g, 0.5).double()
                apply_smoothing(t, g, s, stats)
        out = spec.layer_forward(i, LayerTensors({k: t[k].float() for k in t.names()}), h)
        assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("method", ["rtn", "haq"])
def test_conversion(method, tiny_dir, converted):
    out = converted(FAMILY, method=method)
    assert validate_checkpoint(out).routing_statistics == ROUTING_FILE
    stats = load_file(os.path.join(out, ROUTING_FILE))
    assert stats["expert_counts"].shape == (2, 32) and int(stats["expert_counts"].sum(1)[0]) == 4 * 64 * 8
    ids = torch.randint(2, 500, (4, 64), generator=torch.Generator().manual_seed(3))
    drift = float((hf_token_nll(out, ids) - hf_token_nll(tiny_dir(FAMILY), ids)).abs().mean())
    assert 0 < drift <= 0.05, f"W8A8 vs float mean |Δnll| {drift:.3e}"


def test_served_and_offloaded_by_vllm(tiny_dir, converted):
    from test_vllm_e2e import reference_next_logits
    from test_vllm_offload import _check_same_as_resident, _run

    ckpt = converted(FAMILY, method="rtn")
    windows = torch.randint(2, 500, (4, 64), generator=torch.Generator().manual_seed(1234))
    resident = _run(ckpt, None, windows)
    diff = (resident["logprobs"] + hf_token_nll(ckpt, windows).double()).abs()
    measured = {"mean": float(diff.mean()), "max": float(diff.max()), "off": float((diff > 1e-3).double().mean())}
    print(f"{FAMILY} rtn served: {measured}")
    assert measured["mean"] <= 1e-3 and measured["off"] <= 0.05 and measured["max"] <= 0.15, measured
    prompt, gen, checked = windows[0, :16].tolist(), resident["tokens"][0], 0
    for step, token in enumerate(gen):
        top2 = torch.topk(torch.log_softmax(reference_next_logits(ckpt, prompt + list(gen[:step])), -1), 2)
        if float(top2.values[0] - top2.values[1]) > 0.05:
            assert token == int(top2.indices[0]), f"step {step}: vLLM {token}, reference {int(top2.indices[0])}"
            checked += 1
    assert checked >= 6, "too few clear-margin steps to check greedy decoding"
    haq = {"slots_per_layer": 1, "policy": "lru"}
    s = _check_same_as_resident(_run(ckpt, haq, windows), resident, haq)
    assert s["experts_per_layer"] == 32
    print(f"{FAMILY} {haq}: {s}")
