"""Checks shared by the tests of the MoE families added after Mixtral and Qwen2-MoE (tests/test_qwen3_moe.py,
tests/test_olmoe.py): each family's tiny model (tests/tiny_models.py: 2 layers, 32 experts, top-8)."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from fold_walk import float64_layers
from offline.haq import apply_smoothing, group_factors, weight_absmax
from offline.models import LayerTensors
from offline.perplexity import hf_token_nll
from test_reference_models import reference_logits
from vllm_haq.format import ROUTING_FILE, validate_checkpoint

QK = {"self_attn.q_proj", "self_attn.k_proj"}


def assert_reference_matches_transformers(model_dir: str) -> torch.Tensor:
    """The reference forward's float32 logits equal transformers' (max |Δ| < 1e-4); returns transformers'."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(2, 500, (2, 48), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        theirs = model(ids).logits
    assert theirs.std() > 0.1
    assert float((reference_logits(model_dir, ids) - theirs).abs().max()) < 1e-4
    return theirs


def assert_smoothing_folds_exact(model_dir: str) -> None:
    """Smoothing every group at α 0.5 leaves each layer's float output unchanged; no group folds into
    q_proj/k_proj's output, and the q/k-norm weights stay untouched."""
    h = torch.randn(2, 24, 128, generator=torch.Generator().manual_seed(1))
    for layer in float64_layers(model_dir, h):
        spec, i, p, t, stats, ref = layer.spec, layer.index, layer.prefix, layer.t, layer.stats, layer.ref
        groups = spec.smoothing_groups(i)
        assert not {g.producer for g in groups} & QK
        for g in groups:
            if stats.seen(g.observed_module):  # an expert no token reached has no statistics
                s = group_factors(stats.absmax[g.observed_module], weight_absmax(t, g.consumers), g, 0.5).double()
                apply_smoothing(t, g, s, stats)
        out = spec.layer_forward(i, LayerTensors({k: t[k].float() for k in t.names()}), h)
        assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5
        for norm in spec.facts.qk_norm or ():
            assert torch.equal(t[f"{norm}.weight"], layer.tensors[f"{p}{norm}.weight"].double())


def assert_converted(out: str, src: str, experts: int, layers: int, top_k: int) -> None:
    """A valid checkpoint with routing statistics of every calibration token (4 x 64) on each MoE layer, close to
    the float model."""
    assert validate_checkpoint(out).routing_statistics == ROUTING_FILE
    stats = load_file(os.path.join(out, ROUTING_FILE))
    assert stats["expert_counts"].shape == (layers, experts)
    assert stats["expert_counts"].sum(1).tolist() == [4 * 64 * top_k] * layers
    ids = torch.randint(2, 500, (4, 64), generator=torch.Generator().manual_seed(3))
    drift = float((hf_token_nll(out, ids) - hf_token_nll(src, ids)).abs().mean())
    assert 0 < drift <= 0.05, f"W8A8 vs float mean |Δnll| {drift:.3e}"


def assert_served_and_offloaded(ckpt: str, experts: int) -> dict:
    """vLLM (eager, float32) serves ``ckpt`` as the int8 reference computes it (tests/test_vllm_e2e.py's eager
    tolerances, greedy tokens at clear margins), and with one expert slot per layer (lru) gives the all-resident
    run's greedy tokens and log-probabilities: two engine starts. Returns what was measured."""
    from test_vllm_e2e import reference_next_logits
    from test_vllm_offload import _check_same_as_resident, _run

    windows = torch.randint(2, 500, (4, 64), generator=torch.Generator().manual_seed(1234))
    resident = _run(ckpt, None, windows)
    diff = (resident["logprobs"] + hf_token_nll(ckpt, windows).double()).abs()
    measured = {"mean": float(diff.mean()), "max": float(diff.max()), "off": float((diff > 1e-3).double().mean())}
    assert measured["mean"] <= 1e-3 and measured["off"] <= 0.05 and measured["max"] <= 0.15, measured
    prompt, gen, checked = windows[0, :16].tolist(), resident["tokens"][0], 0
    for step, token in enumerate(gen):
        top2 = torch.topk(torch.log_softmax(reference_next_logits(ckpt, prompt + list(gen[:step])), -1), 2)
        if float(top2.values[0] - top2.values[1]) > 0.05:
            assert token == int(top2.indices[0]), f"step {step}: vLLM {token}, reference {int(top2.indices[0])}"
            checked += 1
    assert checked >= 6, "too few clear-margin steps to check greedy decoding"
    haq = {"slots_per_layer": 1, "policy": "lru"}
    offloaded = _check_same_as_resident(_run(ckpt, haq, windows), resident, haq)
    assert offloaded["experts_per_layer"] == experts
    return {"served": measured, "greedy_checked": checked, "offloaded": offloaded}
