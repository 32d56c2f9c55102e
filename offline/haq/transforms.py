"""Applying a chosen smoothing and rotation to a group of one layer.

Everything here is exact in float: the producer (norm, or the linear before the consumers) is divided by the
smoothing factors s, the consumers' weights multiplied by them, and a rotation R is applied to the consumers'
weights and, at run time, to their input. The statistics of the affected inputs are updated alike, so the next
group's search and GPTQ's Hessians see the transformed layer.
"""

from __future__ import annotations

import torch

from vllm_haq.quant.rotation import rotate, rotation_block
from vllm_haq.quant.smoothing import fold_into_norm, fold_into_producer_rows, smooth_weight, smoothing_factors

from offline.haq.records import LayerRecord
from offline.haq.statistics import InputStats, input_key
from offline.haq.working import WorkingTensors
from offline.models import SmoothGroup


def weight_absmax(t: WorkingTensors, consumers: list[str]) -> torch.Tensor:
    """Per input channel max |W| over every consumer (materialized one at a time)."""
    return torch.stack([t[f"{c}.weight"].float().abs().amax(0) for c in consumers]).amax(0)


def group_factors(act_absmax: torch.Tensor, w_absmax: torch.Tensor, g: SmoothGroup, alpha: float) -> torch.Tensor:
    """The smoothing factors of group ``g`` at strength ``alpha``. Where the producer is v_proj (``g.heads``),
    its output has one channel per kv channel, so every query head reading it must share that channel's
    factor: one factor per v channel, from the max over the heads that read it, repeated over them."""
    if g.heads is None:
        return smoothing_factors(act_absmax, w_absmax, alpha)
    nkv, rep, hd = g.heads
    s = smoothing_factors(act_absmax.view(nkv, rep, hd).amax(1).flatten(),
                          w_absmax.view(nkv, rep, hd).amax(1).flatten(), alpha)
    return s.view(nkv, 1, hd).expand(nkv, rep, hd).reshape(-1)


def apply_smoothing(t: WorkingTensors, g: SmoothGroup, s: torch.Tensor, stats: InputStats) -> None:
    """Fold x / s into group ``g``'s producer (its norm, or the producer's rows and bias), x · s into its
    consumers' (and ``also_scaled``) weights, and rescale the statistics of their inputs by s."""
    if g.norm is not None:
        for name in (f"{g.norm}.weight", f"{g.norm}.bias"):
            if name in t:
                t.rescale(name, lambda v: fold_into_norm(v, None, s)[0])
    else:
        rows = s if g.heads is None else s.view(g.heads).amax(1).flatten()  # producer has kv channels only
        t.rescale(f"{g.producer}.weight", lambda w: fold_into_producer_rows(w, None, rows)[0])
        if f"{g.producer}.bias" in t:
            t.rescale(f"{g.producer}.bias", lambda b: fold_into_norm(b, None, rows)[0])  # b / s, like the rows
    for c in g.consumers + g.also_scaled:
        t.rescale(f"{c}.weight", lambda w: smooth_weight(w, s))
    for c in {input_key(c) for c in g.consumers} | {g.observed_module}:
        stats.rescale(c, s)


def transform_group(t: WorkingTensors, g: SmoothGroup, consumers: list[str], stats: InputStats,
                    w_absmax: torch.Tensor | None, a: float | None, block: int | None, record: LayerRecord) -> None:
    """Apply smoothing ``a`` (None: none) and rotation ``block`` (None: none) to group ``g`` and record them.

    The rotation comes after the smoothing, as the runtime applies it (x / s, then R)."""
    record.set_alpha(g.consumers[0], a)
    if a is not None:
        apply_smoothing(t, g, group_factors(stats.absmax[input_key(g.observed_module)], w_absmax, g, a), stats)
    if block is not None:
        for c in consumers:
            t.rescale(f"{c}.weight", lambda w, b=block: rotate(w, b))  # bound now: block changes per group
            record.set_rotation(c, block)
        for key in {input_key(c) for c in consumers}:
            stats.rotate(key, block)


def rotation_for(t: WorkingTensors, g: SmoothGroup, consumers: list[str]) -> int | None:
    """The block-Hadamard order offered to group ``g``, or None where rotation is not possible: groups with an
    unquantized consumer (the runtime rotates only quantized linears' inputs), widths without a power-of-two
    block of at least MIN_BLOCK. (The shared gate/up input of all experts is rotated once, the router reads it
    unrotated; the routed experts' down projections are rotated all alike or not at all, see
    :func:`offline.haq.groups.smooth_expert_downs`.)"""
    if sorted(consumers) != sorted(g.consumers):
        return None
    return rotation_block(t.shape(f"{consumers[0]}.weight")[1])
