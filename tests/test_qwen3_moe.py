"""Qwen3-MoE (Qwen3-30B-A3B's layout scaled down: q/k-norm, 32 experts, top-8, renormalized top-k weights).

The reference forward equals transformers'; every smoothing fold is exact and none divides q_proj/k_proj's
output; ``haq convert`` (rtn and haq) writes valid checkpoints with routing statistics; vLLM serves the rtn
conversion as the int8 reference computes it, and with one expert slot per layer gives the all-resident run's
greedy tokens and log-probabilities (two engine starts in all). The haq conversion served the same way measured
mean |Δ| 4.4e-4, max 0.008, but 13.5% of positions above 1e-3: per-token rounding flips after ~1e-7 float-order
differences, as tests/test_families.py documents for the smoothed dense checkpoints. The checks are shared with
the other MoE families (tests/moe_checks.py)."""

import json
import os

import pytest

from moe_checks import (assert_converted, assert_reference_matches_transformers, assert_served_and_offloaded,
                        assert_smoothing_folds_exact)
from offline.models import spec_for
from vllm_haq.format import moe_layout

FAMILY = "qwen3_moe"


def test_reference_forward_matches_transformers(tiny_dir):
    assert_reference_matches_transformers(tiny_dir(FAMILY))


def test_layout_and_folds(tiny_dir):
    """32 experts on both layers (transformers 5 writes num_local_experts, the Hub's configs num_experts: both
    read alike); smoothing every group at α 0.5 leaves each layer unchanged, none folds into q_proj/k_proj."""
    d = tiny_dir(FAMILY)
    cfg = json.load(open(os.path.join(d, "config.json")))
    spec = spec_for(cfg)
    hub = {k: v for k, v in cfg.items() if k != "num_local_experts"} | {"num_experts": 32}
    assert moe_layout(cfg) == moe_layout(hub) == ([0, 1], 32) and spec_for(hub).num_experts == spec.num_experts == 32
    assert spec.top_k == 8 and spec.moe_block(0) == ("mlp", ("gate_proj", "up_proj", "down_proj"))
    assert_smoothing_folds_exact(d)


@pytest.mark.parametrize("method", ["rtn", "haq"])
def test_conversion(method, tiny_dir, converted):
    assert_converted(converted(FAMILY, method=method), tiny_dir(FAMILY), experts=32, layers=2, top_k=8)


def test_served_and_offloaded_by_vllm(converted):
    print(f"{FAMILY} rtn: {assert_served_and_offloaded(converted(FAMILY, method='rtn'), experts=32)}")
