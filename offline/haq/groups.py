"""Choosing the smoothing and rotation of every group of one layer, and applying them.

Groups are decided one at a time, in the model's order, each on statistics that already include the
transforms chosen before it. Two kinds of group need more than a search per group: with per-expert smoothing
the experts' shared gate/up input gets one explicit vector per expert (:func:`smooth_expert_explicitly`), and
the routed experts' down projections share one rotation decision (:func:`smooth_expert_downs`).
"""

from __future__ import annotations

import torch

from vllm_haq.quant.smoothing import smooth_weight

from offline.haq.methods import MIN_EXPERT_TOKENS, LayerOptions
from offline.haq.progress import NO_PROGRESS, LayerProgress
from offline.haq.records import LayerRecord
from offline.haq.search import Candidate, scored_candidates, search_alpha
from offline.haq.statistics import InputStats, input_key, input_twin
from offline.haq.transforms import group_factors, rotation_for, transform_group, weight_absmax
from offline.haq.working import WorkingTensors
from offline.models import ModelSpec, SmoothGroup


def smooth_layer(spec: ModelSpec, i: int, t: WorkingTensors, targets: list[str], stats: InputStats,
                 opts: LayerOptions, progress: LayerProgress = NO_PROGRESS
                 ) -> tuple[LayerRecord, dict[str, torch.Tensor]]:
    """Choose and apply the smoothing (and rotation) of every group of layer ``i``; returns the record and the
    explicit ``input_smooth`` tensors of per-expert smoothing, by layer-relative name. One ``progress`` unit per
    group (per expert with per-expert smoothing), when its decision is made."""
    record = LayerRecord()
    explicit: dict[str, torch.Tensor] = {}
    if not opts.method.smooth:
        return record, explicit
    expert_downs = []
    step = "search" if opts.method.search_alpha else "smoothing"
    for g in spec.smoothing_groups(i):
        if g.experts and opts.moe_smoothing == "per-expert":
            for e_in in g.experts:
                record.set_alpha(e_in, smooth_expert_explicitly(t, e_in, targets, stats, opts, explicit))
                progress.unit(step, [e_in, input_twin(e_in)])
            record.explicit.append(g.experts[0].rsplit(".", 2)[0])
        elif is_routed_expert_down(g, stats):
            expert_downs.append(g)  # decided together, after the other groups
        else:
            _smooth_group(t, g, [c for c in g.consumers if c in targets], stats, opts, record)
            progress.unit(step, g.consumers)
    if expert_downs:
        smooth_expert_downs(t, expert_downs, targets, stats, opts, record, progress)
    return record, explicit


def _smooth_group(t: WorkingTensors, g: SmoothGroup, consumers: list[str], stats: InputStats, opts: LayerOptions,
                  record: LayerRecord) -> None:
    """One ordinary group: the fixed α, or the searched candidate (rotation offered where possible). A group
    without quantized consumers, or whose input no calibration token reached, is left as it is."""
    if not consumers or not stats.seen(g.observed_module):
        return
    w_absmax = weight_absmax(t, consumers)
    a, block = opts.alpha, None
    if opts.method.search_alpha:
        block = rotation_for(t, g, consumers) if opts.rotation != "none" else None
        a, block = search_alpha(t, g, consumers, stats, w_absmax, opts.gptq_search, block,
                                only_rotated=opts.rotation == "all")
    transform_group(t, g, consumers, stats, w_absmax, a, block, record)


def is_routed_expert_down(g: SmoothGroup, stats: InputStats) -> bool:
    """Whether ``g`` is a routed expert's down projection (its input exists only inside the fused MoE)."""
    return not g.experts and stats.recompute is not None and any(
        stats.recompute.expert_of(input_key(c)) is not None for c in g.consumers)


def _best(cands: list[tuple[Candidate, float]], rotated: bool) -> tuple[Candidate, float]:
    """The best scored candidate that is (or is not) rotated; (no candidate, inf) when there is none."""
    return min(((c, e) for c, e in cands if (c[1] is not None) == rotated), key=lambda ce: ce[1],
               default=(Candidate(None, None), float("inf")))


def smooth_expert_downs(t: WorkingTensors, groups: list[SmoothGroup], targets: list[str], stats: InputStats,
                        opts: LayerOptions, record: LayerRecord, progress: LayerProgress = NO_PROGRESS) -> None:
    """The routed experts' down projections of one MoE layer: each expert's own smoothing (folded into its up
    projection), and one rotation for all of them or none, because the MoE runtime rotates every expert's
    intermediate rows alike. ``search`` rotates them where the experts' best rotated candidates have a smaller
    summed output error than their best unrotated ones; experts no calibration token reached follow the others
    (rotation is exact in float, the rounding of W R is as good as that of W). One ``progress`` unit per group:
    when it is scored (search), else when it is transformed."""
    consumers = [[c for c in g.consumers if c in targets] for g in groups]
    block = None
    if opts.method.search_alpha and opts.rotation != "none" and all(
            cs and sorted(cs) == sorted(g.consumers) for g, cs in zip(groups, consumers)):
        block = rotation_for(t, groups[0], consumers[0])
    seen = [bool(cs) and stats.seen(g.observed_module) for g, cs in zip(groups, consumers)]
    w_absmax = [weight_absmax(t, cs) if ok else None for cs, ok in zip(consumers, seen)]
    if not opts.method.search_alpha:
        chosen = [opts.alpha if ok else None for ok in seen]
    else:
        scored = []
        for g, cs, wa, ok in zip(groups, consumers, w_absmax, seen):
            scored.append(scored_candidates(t, g, cs, stats, wa, None, block, only_rotated=opts.rotation == "all")
                          if ok else [])
            progress.unit("search", g.consumers)
        if block is not None and opts.rotation == "search":
            total = {r: sum(_best(cands, r)[1] for cands in scored if cands) for r in (False, True)}
            block = block if total[True] < total[False] else None
        chosen = [_best(cands, block is not None)[0][0] if cands else None for cands in scored]
    for g, cs, wa, a, ok in zip(groups, consumers, w_absmax, chosen, seen):
        if cs and (ok or block is not None):
            transform_group(t, g, cs, stats, wa, a if ok else None, block, record)
        if not opts.method.search_alpha:
            progress.unit("smoothing", g.consumers)


def smooth_expert_explicitly(t: WorkingTensors, e_in: str, targets: list[str], stats: InputStats,
                             opts: LayerOptions, explicit: dict[str, torch.Tensor]) -> float | None:
    """Smooth one expert's gate/up by its own tokens; the factors become its ``input_smooth`` (in ``explicit``),
    since the norm before the MoE is shared by all experts and cannot absorb them. An expert with fewer than
    MIN_EXPERT_TOKENS tokens gets factors of one. Returns the α (None: none)."""
    consumers = [c for c in (e_in, input_twin(e_in)) if c in targets]
    a = None
    if consumers and stats.count.get(e_in, 0) >= MIN_EXPERT_TOKENS:
        g = SmoothGroup(consumers, observed=e_in)
        w_absmax = weight_absmax(t, consumers)
        a = search_alpha(t, g, consumers, stats, w_absmax)[0] if opts.method.search_alpha else opts.alpha
    if a is None:
        s = torch.ones(t.shape(f"{consumers[0]}.weight")[1], device=t.device)
    else:
        s = group_factors(stats.absmax[e_in], w_absmax, g, a)
    for c in consumers:
        t.rescale(f"{c}.weight", lambda w, s=s: smooth_weight(w, s))
        explicit[f"{c}.input_smooth"] = s.float().clone()  # one tensor per name: safetensors refuses shared storage
    stats.rescale(e_in, s)
    return a
