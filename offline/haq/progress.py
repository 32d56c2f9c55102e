"""Counting the units of one layer's conversion (statistics chunks, group searches, GPTQ calls, forward chunks),
so that a conversion whose layer takes twenty minutes can say how far into the layer it is.

The total is known before the layer starts (:func:`calibrated_units` mirrors the loops that report), so a
listener can draw a bar and an ETA from the first unit on. Counting never changes what is computed: it is a
call after each unit, and with nobody listening (``report`` None) only an integer increment.
"""

from __future__ import annotations

import math
from typing import Callable

from offline.haq.methods import LayerOptions
from offline.haq.statistics import input_key
from offline.models import ModelSpec

Report = Callable[[int, int, str], None]  # (done, total, what): what is "STEP NAME", e.g. "GPTQ self_attn.o_proj"


class LayerProgress:
    """The finished units of one layer, out of ``total``, told to ``report`` (None: nobody listens)."""

    def __init__(self, total: int, report: Report | None = None):
        self.total, self.done, self.report = total, 0, report

    def start(self, what: str) -> None:
        """The layer starts (``done`` 0 of ``total``): listeners time the layer from here."""
        if self.report is not None:
            self.report(0, self.total, what)

    def unit(self, step: str, modules: str | list[str]) -> None:
        """One unit of ``step`` (statistics, search, smoothing, GPTQ, rounding, forward) on ``modules`` is done."""
        self.done += 1
        if self.report is not None:
            self.report(self.done, self.total, f"{step} {label(modules)}")


NO_PROGRESS = LayerProgress(0)  # shared by callers that pass none: its count is never read


def label(modules: str | list[str]) -> str:
    """A short name for the linears of one unit: ``self_attn.q_proj+k_proj+v_proj`` (their common prefix once),
    or the first and how many (a shared MoE group has two linears per expert)."""
    if isinstance(modules, str):
        return modules
    if len(modules) > 3:
        return f"{modules[0]} and {len(modules) - 1} more"
    head, _, _ = modules[0].rpartition(".")
    if head and all(m.rpartition(".")[0] == head for m in modules):
        return head + "." + "+".join(m.rpartition(".")[2] for m in modules)
    return "+".join(modules)


def calibrated_units(spec: ModelSpec, i: int, targets: list[str], opts: LayerOptions, samples: int) -> int:
    """The units :func:`offline.haq.quantize_calibrated` reports for layer ``i``: a statistics chunk of ``samples``
    calibration windows each, a smoothing decision per group (per expert with per-expert smoothing) and a
    rounding call per input of the targets."""
    units = math.ceil(samples / opts.chunk)
    if opts.method.smooth:
        units += sum(len(g.experts) if g.experts and opts.moe_smoothing == "per-expert" else 1
                     for g in spec.smoothing_groups(i))
    return units + len({input_key(m) for m in targets})
