"""DeepSeek-V2 (DeepSeek-V2's layout scaled down, tests/tiny_models.py: latent attention with q_lora_rank 64 and
kv_lora_rank 512, layer 0 dense, layer 1 an MoE of 2 shared + 16 routed experts, top-4 of the 2 best of 4 groups,
routed_scaling_factor 2.5, default RoPE), V2-Lite's variant (q_proj instead of q_a/q_b, greedy routing over one
group, YaRN RoPE) and DeepSeek-V3 (the same layout, V3's routing: sigmoid scores, a random e_score_correction_bias,
renormalized top-k; YaRN RoPE, so the served V3 checks YaRN's tables and softmax scale in vLLM too).

The reference forward equals transformers' for all three; the routing equals vLLM's CPU router and transformers'
router on random logits; every smoothing fold is exact and none divides q_a_proj/kv_a_proj_with_mqa's output
(the latent norms follow them), the q_a_layernorm fold is input-side; kv_b_proj stays float (vLLM's MLA folds it
into the attention) and is listed in quantization_config.ignore; the options transformers and vLLM would compute
differently are refused by name; ``haq convert`` (rtn and haq) writes valid checkpoints with routing statistics of
the MoE layer only; vLLM serves the rtn conversion as the int8 reference computes it (CPU_MLA attention backend),
and with one expert slot per layer gives the all-resident greedy tokens (tests/moe_checks.py). Measured in the
suite (rtn): V2 mean |Δ| 1.0e-4, max 7.1e-3 (1.6% of positions above 1e-3); V3 (YaRN) mean 2.3e-7, max 1.4e-6. The
haq conversions, served once the same way outside the suite (two more engine starts each): V2 mean 4.4e-6, max
1.0e-3 (0.4% above 1e-3), V3 mean 2.0e-6, max 4.4e-4, each with 9 clear-margin greedy steps equal to the
reference's. The rtn V2 conversion served compiled (vLLM's default on CPU, torch.compile) once: the same numbers."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from moe_checks import (assert_converted, assert_reference_matches_transformers, assert_served_and_offloaded,
                        assert_smoothing_folds_exact)
from offline.models import UnsupportedModelError, spec_for
from offline.models.deepseek import grouped_topk
from tiny_models import DEEPSEEK_V2_LITE, build_tiny_model
from vllm_haq.format import moe_layout, validate_checkpoint

FAMILY = "deepseek_v2"
BOTH = ("deepseek_v2", "deepseek_v3")
LATENT = ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa")


@pytest.fixture(scope="module")
def lite_dir(tmp_path_factory):
    return build_tiny_model(FAMILY, str(tmp_path_factory.mktemp("tiny-deepseek-lite")), **DEEPSEEK_V2_LITE)


def _config(d: str) -> dict:
    return json.load(open(os.path.join(d, "config.json")))


def test_reference_forward_matches_transformers(tiny_dir, lite_dir):
    """Random latent-norm weights (q_a_layernorm 64 wide, kv_a_layernorm 512); both attention variants."""
    src = load_file(os.path.join(tiny_dir(FAMILY), "model.safetensors"))
    assert src["model.layers.0.self_attn.kv_a_layernorm.weight"].shape == (512,)
    assert float(src["model.layers.1.self_attn.q_a_layernorm.weight"].float().std()) > 0.1
    assert "model.layers.0.self_attn.q_proj.weight" in load_file(os.path.join(lite_dir, "model.safetensors"))
    v3 = load_file(os.path.join(tiny_dir("deepseek_v3"), "model.safetensors"))
    assert float(v3["model.layers.1.mlp.gate.e_score_correction_bias"].float().std()) > 0.05
    for d in (tiny_dir(FAMILY), lite_dir, tiny_dir("deepseek_v3")):
        assert_reference_matches_transformers(d)


def _logits(seed: int, m: int = 64, e: int = 16) -> torch.Tensor:
    return torch.randn(m, e, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("cfg", [
    dict(topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=2.5),
    dict(topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0),
])
def test_routing_matches_transformers_router(cfg):
    """DeepseekV2TopkRouter (softmax, the limited groups, the scaling) chooses the same experts, same weights; the
    groups matter: plain top-4 of the softmax chooses differently for some tokens."""
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    config = DeepseekV2Config(hidden_size=16, num_attention_heads=2, n_routed_experts=16, num_experts_per_tok=4, **cfg)
    router = DeepseekV2TopkRouter(config)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 16, generator=torch.Generator().manual_seed(6)))
        logits, w_ref, id_ref = router(x)
    w, ids = grouped_topk(logits, 4, cfg, renormalize=False)
    order, order_ref = ids.argsort(-1), id_ref.argsort(-1)
    assert torch.equal(ids.gather(1, order), id_ref.gather(1, order_ref))
    assert torch.allclose(w.gather(1, order), w_ref.gather(1, order_ref), atol=1e-6)
    plain = logits.softmax(-1).topk(4).indices.sort(-1).values
    assert torch.equal(plain, ids.sort(-1).values) == (cfg["n_group"] == 1)


@pytest.mark.parametrize("scoring,bias,renorm", [("softmax", False, False), ("sigmoid", True, True),
                                                 ("sigmoid", False, True)])
def test_routing_matches_vllm_cpu_router(scoring, bias, renorm):
    """vLLM's own CPU grouped top-k (what FusedMoE hands the MoE method, cpu_router.py:_grouped_topk): the same
    experts and weights, for V2's softmax and V3's sigmoid with and without e_score_correction_bias."""
    from vllm.model_executor.layers.fused_moe.router.cpu_router import _grouped_topk

    logits = _logits(7)
    b = torch.randn(16, generator=torch.Generator().manual_seed(8)) * 0.3 if bias else None
    cfg = dict(scoring_func=scoring, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    w, ids = grouped_topk(logits, 4, cfg, renorm, b)
    w_ref, id_ref = _grouped_topk(logits, 4, renorm, 4, 2, scoring, 2.5, b)
    order, order_ref = ids.argsort(-1), id_ref.long().argsort(-1)
    assert torch.equal(ids.gather(1, order), id_ref.long().gather(1, order_ref))
    assert torch.allclose(w.gather(1, order), w_ref.gather(1, order_ref), atol=1e-6)
    if bias:  # the bias steers the choice (on the tiny V3 model's calibration tokens: 74% of the routes)
        assert not torch.equal(ids.sort(-1).values, grouped_topk(logits, 4, cfg, renorm)[1].sort(-1).values)


def test_layout_and_folds(tiny_dir, lite_dir):
    """Layer 0 dense, layer 1 MoE (n_routed_experts 16, shared experts ungated); the latent attention's linears
    (kv_b_proj not among them); every fold exact at α 0.5, none into q_a_proj/kv_a_proj_with_mqa's output."""
    for d, attn in ((tiny_dir(FAMILY), ["q_a_proj", "kv_a_proj_with_mqa", "q_b_proj", "o_proj"]),
                    (lite_dir, ["q_proj", "kv_a_proj_with_mqa", "o_proj"]),
                    (tiny_dir("deepseek_v3"), ["q_a_proj", "kv_a_proj_with_mqa", "q_b_proj", "o_proj"])):
        spec = spec_for(_config(d))
        assert moe_layout(_config(d)) == ([1], 16) and spec.num_experts == 16 and spec.top_k == 4
        assert spec.moe_block(0) is None and spec.moe_block(1) == ("mlp", ("gate_proj", "up_proj", "down_proj"))
        assert spec.attention_linears == [f"self_attn.{n}" for n in attn]
        assert len(spec.linear_modules(1)) == len(attn) + 16 * 3 + 3
        assert spec.linear_modules(1)[-3:] == [f"mlp.shared_experts.{p}" for p in ("gate_proj", "up_proj",
                                                                                    "down_proj")]
        assert set(spec.facts.no_output_folds) == set(LATENT)
        norms = {g.norm for i in range(2) for g in spec.smoothing_groups(i)}
        assert ("self_attn.q_a_layernorm" in norms) == (d != lite_dir)
        assert_smoothing_folds_exact(d)


def test_alpha_search_scores_each_expert_on_the_rows_routed_to_it(tiny_dir):
    """The α search measures an expert's error on the search rows the calibration run routed to it (V3: sigmoid
    scores, groups, bias), not on the top-k of the router's logits, which picks other experts for many rows."""
    from offline.haq import LayerOptions, WorkingTensors, collect_statistics, routed_rows
    from offline.haq.methods import METHODS
    from offline.models import LayerTensors

    d = tiny_dir("deepseek_v3")
    spec, p = spec_for(_config(d)), "model.layers.1."
    src = {k[len(p):]: v for k, v in load_file(os.path.join(d, "model.safetensors")).items() if k.startswith(p)}
    t = WorkingTensors(src)
    hidden = torch.randn(4, 32, 128, generator=torch.Generator().manual_seed(9))
    stats = collect_statistics(spec, 1, t, spec.linear_modules(1), hidden, LayerOptions(METHODS["haq"]))
    g = next(g for g in spec.smoothing_groups(1) if g.experts)
    x = stats.sample(g.observed_module)
    assert 0 < x.shape[0] < 4 * 32  # a strided sample
    rows = routed_rows(t, g, stats, x)
    _, ids = spec.moe_route(1, LayerTensors({k: t[k] for k in t.names()}), x, "mlp", renormalize=True)
    plain = (x @ t["mlp.gate.weight"].float().t()).topk(4, dim=-1).indices
    for e in range(16):
        assert torch.equal(rows(f"mlp.experts.{e}.gate_proj"), (ids == e).any(-1).nonzero().squeeze(-1)), e
    assert not torch.equal(ids.sort(-1).values, plain.sort(-1).values)


@pytest.mark.parametrize("option,value", [
    ("n_group", None), ("topk_method", "noaux_tc"), ("norm_topk_prob", True), ("scoring_func", "sigmoid"),
    ("rms_norm_eps", 1e-5), ("moe_layer_freq", 2), ("attention_bias", True), ("num_key_value_heads", 1),
    ("rope_parameters", {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0, "mscale": 1.0}),
    ("rope_parameters", {**DEEPSEEK_V2_LITE["rope_parameters"], "attention_factor": 1.0}),
])
def test_options_transformers_and_vllm_disagree_on_are_refused(option, value, tiny_dir):
    cfg = _config(tiny_dir(FAMILY))
    with pytest.raises(UnsupportedModelError, match=r"^x/config.json: DeepSeek.* is not supported"):
        spec_for({**cfg, option: value}, "x/config.json")
    greedy = {**cfg, "topk_method": "greedy"}
    with pytest.raises(UnsupportedModelError, match="greedy and topk_group < n_group"):
        spec_for(greedy)
    spec_for({**greedy, "n_group": 1, "topk_group": 1, "moe_layer_freq": 1})


@pytest.mark.parametrize("option,value", [("scoring_func", "softmax"), ("topk_method", "greedy"),
                                          ("rope_interleave", False), ("topk_group", None)])
def test_v3_options_vllm_would_compute_otherwise_are_refused(option, value, tiny_dir):
    cfg = _config(tiny_dir("deepseek_v3"))
    with pytest.raises(UnsupportedModelError, match=r"^x/config.json: DeepSeek-V3 .* is not supported"):
        spec_for({**cfg, option: value}, "x/config.json")
    spec_for({**cfg, "rope_interleave": True})


@pytest.mark.parametrize("method", ["rtn", "haq"])
@pytest.mark.parametrize("family", BOTH)
def test_conversion(family, method, tiny_dir, converted):
    """Routing statistics of the one MoE layer; kv_b_proj and the latent norms' unfolded parts float; q_b_proj int8
    and, with haq, its input factors folded into q_a_layernorm; V3's router bias unchanged."""
    out = converted(family, method=method)
    assert_converted(out, tiny_dir(family), experts=16, layers=1, top_k=4)
    qcfg = validate_checkpoint(out)
    assert qcfg.is_ignored("model.layers.1.self_attn.kv_b_proj") and not qcfg.is_ignored(
        "model.layers.1.self_attn.q_b_proj")
    assert "kv_b_proj" in open(os.path.join(out, "README.md")).read()  # the model card says it is kept float
    ours = {k: v for f in os.listdir(out) if f.endswith(".safetensors") for k, v in load_file(f"{out}/{f}").items()}
    src = load_file(os.path.join(tiny_dir(family), "model.safetensors"))
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert (bias in src) == (family == "deepseek_v3") and (bias not in src or torch.equal(ours[bias], src[bias]))
    p = "model.layers.1.self_attn."
    assert ours[f"{p}kv_b_proj.weight"].dtype == torch.bfloat16 and torch.equal(ours[f"{p}kv_b_proj.weight"],
                                                                                 src[f"{p}kv_b_proj.weight"])
    assert torch.equal(ours[f"{p}kv_a_layernorm.weight"], src[f"{p}kv_a_layernorm.weight"])
    for name in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj"):
        assert ours[f"{p}{name}.weight"].dtype == torch.int8, name
    assert torch.equal(ours[f"{p}q_a_layernorm.weight"], src[f"{p}q_a_layernorm.weight"]) == (method == "rtn")


def test_offline_generation_offloaded_equals_resident_and_reference(converted):
    """Without vLLM: offline.generate serves V3's experts through the runtime's MoE kernel (all resident) and its
    offload engine (one slot per layer, lru), both after the family's routing: the same tokens and logits, and
    the first step's logits are the int8 reference's."""
    from offline.generate import generate
    from test_vllm_e2e import reference_next_logits

    out, prompt = converted("deepseek_v3", method="rtn"), list(range(5, 21))
    resident = generate(out, prompt, 8)
    offloaded = generate(out, prompt, 8, offload={"slots_per_layer": 1, "policy": "lru"})
    assert offloaded.tokens == resident.tokens and torch.equal(offloaded.logits, resident.logits)
    assert offloaded.offload_stats["misses"] > 0 and resident.offload_stats is None
    assert float((resident.logits[0] - reference_next_logits(out, prompt)).abs().max()) < 1e-3


@pytest.mark.parametrize("family", BOTH)
def test_served_and_offloaded_by_vllm(family, converted):
    print(f"{family} rtn: {assert_served_and_offloaded(converted(family, method='rtn'), experts=16)}")
