"""The per-layer driver: run the float layer for statistics, choose and apply smoothing and rotation, then
round every target (GPTQ or round-to-nearest)."""

from __future__ import annotations

import logging
import time

import torch

from vllm_haq.quant import quantize_weight_per_channel, relative_weight_error
from vllm_haq.quant.gptq import GPTQSolver

from offline.haq.groups import smooth_layer
from offline.haq.methods import MIN_EXPERT_TOKENS, LayerOptions
from offline.haq.progress import NO_PROGRESS, LayerProgress
from offline.haq.records import LayerResult
from offline.haq.statistics import ExpertInputs, InputStats, input_key
from offline.haq.working import WorkingTensors
from offline.models import LayerTensors, ModelSpec

log = logging.getLogger("haq.convert")

MoEBlock = tuple[str, tuple[str, str, str]]  # ModelSpec.moe_block: (block, (gate, up, down) linear names)


def quantize_calibrated(spec: ModelSpec, i: int, t: WorkingTensors, targets: list[str], hidden: torch.Tensor,
                        opts: LayerOptions, progress: LayerProgress = NO_PROGRESS) -> LayerResult:
    """Run layer ``i`` in float on ``hidden`` to collect input statistics, smooth ``t`` and quantize ``targets``;
    each unit of :func:`offline.haq.progress.calibrated_units` is told to ``progress`` when done."""
    t0 = time.time()
    dtypes = {k: v.dtype for k, v in t.source.items()}
    moe = spec.moe_block(i)
    stats = collect_statistics(spec, i, t, targets, hidden, opts, progress)
    t1 = time.time()
    record, explicit = smooth_layer(spec, i, t, targets, stats, opts, progress)
    stats.rows.clear()  # the α search is done; GPTQ needs only the Hessians
    t2 = time.time()
    out = {k: t[k].to(dtypes[k]) for k in t.names() if k.removesuffix(".weight") not in targets}
    fallbacks, worst = _quantize_targets(t, targets, stats, opts, moe, out, progress)
    out.update(explicit)
    log.info("layer %d: statistics %.1fs, smoothing %.1fs, %s %.1fs", i, t1 - t0, t2 - t1,
             "GPTQ" if opts.method.gptq else "rounding", time.time() - t2)
    return LayerResult(out, record, fallbacks, worst)


def collect_statistics(spec: ModelSpec, i: int, t: WorkingTensors, targets: list[str], hidden: torch.Tensor,
                       opts: LayerOptions, progress: LayerProgress = NO_PROGRESS) -> InputStats:
    """The float run of layer ``i`` on ``hidden`` (in chunks of ``opts.chunk`` samples, bounding attention's
    memory), observed by an :class:`InputStats`. Its output is dropped, so the linears that only add into it
    (the down projections) are observed but not computed.

    GPTQ's Hessians are accumulated during the run for the targets' inputs, except the routed experts': those
    are recomputed one expert at a time from the MoE input rows and the routing kept here (all of them at once
    would not fit beside the layer)."""
    moe = spec.moe_block(i)
    target_inputs = {input_key(m) for m in targets}

    def wants_hessian(key: str) -> bool:
        return opts.method.gptq and key in target_inputs and not _is_routed_expert(moe, key)

    stats = InputStats(hessians=wants_hessian, keep_all=[f"{moe[0]}.gate"] if moe else [])
    routes: list[torch.Tensor] = []
    sink = (lambda _i, ids: routes.append(ids)) if moe else None
    lt = LayerTensors(t, observer=stats, inputs_only=lambda module: spec.adds_to_output(i, module))
    with torch.no_grad():
        for c in range(0, hidden.shape[0], opts.chunk):
            spec.layer_forward(i, lt, hidden[c : c + opts.chunk], sink)
            progress.unit("statistics", f"samples {c + 1}-{min(c + opts.chunk, hidden.shape[0])}")
    if moe:
        block, names = moe
        stats.recompute = ExpertInputs(block, names, torch.cat(stats.all_rows.pop(f"{block}.gate")),
                                       torch.cat(routes), t.source)
    return stats


def _is_routed_expert(moe: MoEBlock | None, key: str) -> bool:
    """Whether ``key`` is a routed expert's input, whose Hessian is recomputed when the expert is rounded."""
    return moe is not None and key.startswith(f"{moe[0]}.experts.")


def _quantize_targets(t: WorkingTensors, targets: list[str], stats: InputStats, opts: LayerOptions,
                      moe: MoEBlock | None, out: dict[str, torch.Tensor], progress: LayerProgress = NO_PROGRESS
                      ) -> tuple[list[str], float]:
    """Round every target into ``out`` (int8 weight and per-channel scale), one input at a time; returns the
    targets GPTQ could not round (too few calibration tokens) and the largest relative weight error.

    Linears reading the same input (q/k/v, gate/up) share H: GPTQ's rows are independent given H, so one
    stacked call (one factorization of H) gives each linear's own result. A routed expert's weights are
    released once its last input (the down projection's) is done, so the layer shrinks as it is rounded."""
    fallbacks, worst = [], 0.0
    by_input: dict[str, list[str]] = {}
    for module in targets:
        by_input.setdefault(input_key(module), []).append(module)
    for key, modules in by_input.items():
        gptq = opts.method.gptq and stats.count.get(key, 0) >= MIN_EXPERT_TOKENS
        if gptq:
            quantized = _gptq_round(t, key, modules, stats, opts)
        else:
            if opts.method.gptq:
                fallbacks += modules
            quantized = [quantize_weight_per_channel(t[f"{m}.weight"]) for m in modules]
        for m, (qm, sm) in zip(modules, quantized):
            out[f"{m}.weight"], out[f"{m}.weight_scale"] = qm, sm
            worst = max(worst, relative_weight_error(t[f"{m}.weight"], qm, sm))
        del quantized
        e = stats.recompute.expert_of(key) if moe else None
        if e is not None and key.endswith(f".{moe[1][2]}"):  # the expert's last input: free its weights
            for n in moe[1]:
                t.release(f"{moe[0]}.experts.{e}.{n}.weight")
        progress.unit("GPTQ" if gptq else "rounding", modules)
    return fallbacks, worst


def _gptq_round(t: WorkingTensors, key: str, modules: list[str], stats: InputStats, opts: LayerOptions
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """GPTQ-round ``modules`` (all reading input ``key``) in one stacked call under that input's Hessian, handed
    over by ``stats``; each weight is materialized (float32, smoothed) only while it is copied into the solver's
    stack, so the layer is never held in float32 at once."""
    solver = GPTQSolver.from_accumulator(stats.take_hessian(key), opts.gptq)
    sizes = [t.shape(f"{m}.weight")[0] for m in modules]
    q, s = solver.quantize((t[f"{m}.weight"] for m in modules), rows=sum(sizes))
    del solver
    quantized = [(qm.contiguous(), sm.contiguous()) for qm, sm in zip(q.split(sizes), s.split(sizes))]
    del q
    return quantized
