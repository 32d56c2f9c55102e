"""Calibrated conversion methods: smoothing folds leave every family's layers unchanged; all methods
produce valid checkpoints whose int8 models stay close to the float model."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from offline.convert import METHODS, ConvertOptions, convert
from offline.perplexity import hf_token_nll
from offline.haq import (ALPHA_GRID, GPTQ_SHORTLIST, ExpertInputs, InputStats, WorkingTensors, apply_smoothing,
                         group_factors, search_alpha, weight_absmax)
from offline.models import LayerTensors, SmoothGroup, spec_for
from fold_walk import float64_layers
from tiny_models import FAMILIES
from vllm_haq.format import validate_checkpoint
from vllm_haq.quant import quantize_per_token, quantize_weight_per_channel
from vllm_haq.quant.gptq import GPTQConfig, gptq_quantize
from vllm_haq.quant.smoothing import smooth_weight


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_smoothing_leaves_each_layer_unchanged(family, tiny_dir):
    torch.manual_seed(0)
    h = torch.randn(2, 24, 128)
    for layer in float64_layers(tiny_dir(family), h):
        spec, i, t, stats, ref = layer.spec, layer.index, layer.t, layer.stats, layer.ref
        targets = spec.linear_modules(i)
        for g in spec.smoothing_groups(i):
            consumers = [c for c in g.consumers if c in targets]
            s = group_factors(stats.absmax[g.observed_module], weight_absmax(t, consumers), g, 0.5).double()
            apply_smoothing(t, g, s, stats)
        out = spec.layer_forward(i, LayerTensors({k: t[k].float() for k in t.names()}), h)
        assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5


def _first_moe_layer(model_dir: str, seed: int):
    """(spec, index, float32 tensors by layer-relative name, random input [3, 40, hidden]) of a tiny model's
    first MoE layer."""
    spec = spec_for(json.load(open(os.path.join(model_dir, "config.json"))))
    tensors = load_file(os.path.join(model_dir, "model.safetensors"))
    i = next(i for i in range(spec.num_layers) if spec.moe_block(i))
    p = spec.layer_prefix(i)
    t = {k[len(p):]: v.float() for k, v in tensors.items() if k.startswith(p)}
    h = torch.randn(3, 40, int(spec.config["hidden_size"]), generator=torch.Generator().manual_seed(seed))
    return spec, i, t, h


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_expert_hessians_recomputed_one_at_a_time_equal_the_observed_ones(family, tiny_dir):
    """The converter builds an expert's Hessians only when it quantizes that expert (bounded memory): from the
    MoE input rows and the routing, through the unsmoothed expert, divided by the smoothing applied since."""
    spec, i, t, h = _first_moe_layer(tiny_dir(family), seed=1)
    block, names = spec.moe_block(i)
    eager = InputStats()
    spec.layer_forward(i, LayerTensors(t, observer=eager), h)
    deferred = InputStats(hessians=lambda key: not key.startswith(f"{block}.experts."), keep_all=[f"{block}.gate"])
    routes = []
    spec.layer_forward(i, LayerTensors(t, observer=deferred), h, lambda _i, ids: routes.append(ids))
    deferred.recompute = ExpertInputs(block, names, torch.cat(deferred.all_rows.pop(f"{block}.gate")),
                                      torch.cat(routes), t, chunk_rows=7)
    keys = [k for k in eager.count if k.startswith(f"{block}.experts.")]
    assert len(keys) >= 2 * 3 and not any(k in deferred.hessians for k in keys)
    gen = torch.Generator().manual_seed(2)
    for key in keys:  # smoothing applied after the forward: both must describe the smoothed input
        s = torch.rand(eager.absmax[key].shape[0], generator=gen) + 0.5
        eager.rescale(key, s)
        deferred.rescale(key, s)
    for key in keys:
        a, b = eager.take_hessian(key), deferred.take_hessian(key)
        assert a.n == b.n == deferred.count[key] > 0
        assert torch.allclose(b.h.double(), a.h.double(), rtol=1e-4, atol=1e-5 * float(a.h.abs().max())), key
        assert torch.allclose(b.absmax, eager.absmax[key])
    with pytest.raises(KeyError):
        deferred.take_hessian(f"{block}.experts.0.nonexistent")


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_the_shared_expert_input_search_scores_each_expert_on_its_routed_tokens(family, tiny_dir):
    """The α/rotation search of the experts' shared gate/up input measures each expert's W8A8 error on the
    calibration rows the router sends to it (the error the MoE layer makes), a shared expert on every row."""
    from offline.haq import input_key, output_error, scored_candidates

    spec, i, t, h = _first_moe_layer(tiny_dir(family), seed=4)
    block, names = spec.moe_block(i)
    stats = InputStats(keep_rows_every=1, hessians=lambda key: False, keep_all=[f"{block}.gate"])
    routes = []
    spec.layer_forward(i, LayerTensors(t, observer=stats), h, lambda _i, ids: routes.append(ids))
    ids = torch.cat(routes)
    stats.recompute = ExpertInputs(block, names, torch.cat(stats.all_rows.pop(f"{block}.gate")), ids, t)
    g = next(g for g in spec.smoothing_groups(i) if g.experts)
    x = stats.sample(g.observed_module)
    assert x.shape[0] == ids.shape[0] == 120
    scored = dict(scored_candidates(WorkingTensors(t), g, g.consumers, stats, torch.ones(x.shape[1])))
    want, shared = 0.0, 0
    for c in g.consumers:
        e = stats.recompute.expert_of(input_key(c))
        rows = torch.arange(x.shape[0]) if e is None else (ids == e).any(-1).nonzero().squeeze(-1)
        shared += e is None
        w = t[f"{c}.weight"]
        want += output_error(x[rows] @ w.t(), quantize_per_token(x[rows]), quantize_weight_per_channel(w))
    assert shared == (2 if family == "qwen2_moe" else 0)
    assert scored[(None, None)] == pytest.approx(want, rel=1e-5)


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
    from vllm_haq.vllm.scoring import make_llm, prompt_token_logprobs

    out = str(tmp_path / "ckpt")
    convert(tiny_dir("mixtral"), out, ConvertOptions(method="haq", moe_smoothing="per-expert", calib=[calib_file],
                                                     samples=4, seq_len=64))
    qcfg = validate_checkpoint(out)
    assert qcfg.smoothing["explicit"] == [f"model.layers.{i}.block_sparse_moe.experts" for i in (0, 1)]
    # haq's search rotates these experts' down projections too: the runtime must serve both side by side
    assert sum(m.endswith(".w2") for m in qcfg.input_rotation) in (8, 16)
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


def _w8a8_error(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor | None, wq) -> float:
    xq, xsc = quantize_per_token(x if s is None else x / s)
    return float(((xq.double() @ wq[0].double().t()) * xsc.double() * wq[1].double().t() - x.double() @ w.double().t())
                 .pow(2).sum())


def test_alpha_search_scores_its_shortlist_with_the_rounding_gptq_will_do():
    """HAQ's α is chosen for GPTQ-rounded weights: none and the two best α by the round-to-nearest score are
    scored again with GPTQ under each candidate's smoothed Hessian, recomputed here from the smoothed rows."""
    picked_differently = 0
    for seed in range(8):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(512, 64, generator=gen) * (1 + 30 * (torch.rand(64, generator=gen) > 0.9))  # outliers
        columns = torch.exp(torch.randn(64, generator=gen)) * 0.05  # input channels of uneven weight ranges
        weights = {"attn.q_proj": torch.randn(96, 64, generator=gen) * columns,
                   "attn.k_proj": torch.randn(32, 64, generator=gen) * columns}
        stats = InputStats(keep_rows_every=1)
        stats("attn.q_proj", x)  # k_proj reads the same input: one Hessian for both, as the converter keeps it
        g = SmoothGroup(list(weights), norm="norm")
        t = WorkingTensors({f"{m}.weight": w for m, w in weights.items()})
        w_absmax = weight_absmax(t, g.consumers)
        rtn, gptq = {}, {}
        for a in (None, *ALPHA_GRID):
            s = None if a is None else group_factors(stats.absmax["attn.q_proj"], w_absmax, g, a)
            xs = x.double() if s is None else x.double() / s.double()
            h = 2 / x.shape[0] * xs.t() @ xs
            rtn[a] = gptq[a] = 0.0
            for w in weights.values():
                ws = w if s is None else smooth_weight(w, s)
                rtn[a] += _w8a8_error(x, w, s, quantize_weight_per_channel(ws))
                gptq[a] += _w8a8_error(x, w, s, gptq_quantize(ws, h, GPTQConfig()))
        by_rtn = min(rtn, key=rtn.get)
        shortlist = [None] + sorted(ALPHA_GRID, key=rtn.get)[:GPTQ_SHORTLIST]
        expected = min(shortlist, key=gptq.get)
        assert search_alpha(t, g, g.consumers, stats, w_absmax) == (by_rtn, None)
        before = stats.hessians["attn.q_proj"].h.clone()
        assert search_alpha(t, g, g.consumers, stats, w_absmax, GPTQConfig()) == (expected, None)
        assert torch.equal(stats.hessians["attn.q_proj"].h, before)  # scoring works on copies
        picked_differently += expected != by_rtn
    assert picked_differently  # the re-scoring changes the choice for some of these layers


def test_layer_record_serializes_in_the_order_the_checkpoint_has_always_had():
    """The record's JSON (config.json, progress.json): α entries in the order chosen, ``rotation`` where the first
    rotated group was recorded, ``explicit`` (full block names) last; an empty record is an empty dict."""
    from offline.haq import LayerRecord

    assert LayerRecord().to_json("model.layers.0.") == {} and not LayerRecord()
    r = LayerRecord()
    r.set_alpha("attn.q_proj", 0.5)
    r.set_alpha("attn.o_proj", None)
    r.set_rotation("attn.o_proj", 128)
    r.set_alpha("mlp.gate_proj", 0.7)
    r.set_rotation("mlp.gate_proj", 64)
    r.explicit.append("mlp")
    got = r.to_json("model.layers.3.")
    assert list(got) == ["attn.q_proj", "attn.o_proj", "rotation", "mlp.gate_proj", "explicit"]
    assert got["rotation"] == {"attn.o_proj": 128, "mlp.gate_proj": 64} and got["explicit"] == ["model.layers.3.mlp"]
    unrotated = LayerRecord({"a": 0.3, "b": None}, explicit=["moe"])
    assert list(unrotated.to_json()) == ["a", "b", "explicit"]
