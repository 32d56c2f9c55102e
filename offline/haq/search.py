"""The α/rotation search: score each candidate smoothing (and rotation) of a group by the W8A8 output error of
its consumers on calibration rows, rounded as they will be.

Smoothing trades activation error for weight error, and GPTQ removes much of the weight part: the best
candidate for round-to-nearest is not the best one for GPTQ, and GPTQ alone (no smoothing) can win. So where
the layer is GPTQ-rounded afterwards, a shortlist is scored again with the weights GPTQ will round.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from vllm_haq.kernels.cpu_int8 import native_quantize_input
from vllm_haq.quant import int8_products
from vllm_haq.quant.gptq import GPTQConfig, GPTQSolver
from vllm_haq.quant.rotation import rotate, rotate_hessian
from vllm_haq.quant.smoothing import smooth_weight

from offline.haq.methods import ALPHA_GRID, GPTQ_SHORTLIST, ROTATION_ALPHAS
from offline.haq.statistics import InputStats, input_key
from offline.haq.transforms import group_factors
from offline.haq.working import WorkingTensors
from offline.models import SmoothGroup

QuantizedRows = tuple[torch.Tensor, torch.Tensor]  # int8 values and per-row (token or channel) scales


class Candidate(NamedTuple):
    """One way to present a group's input to the quantizer: smoothing α (None: none), then the block-Hadamard
    rotation of order ``rotation`` (None: none). Compares equal to the plain (α, rotation) tuple."""

    alpha: float | None
    rotation: int | None


def search_alpha(t: WorkingTensors, g: SmoothGroup, consumers: list[str], stats: InputStats,
                 w_absmax: torch.Tensor, gptq_cfg: GPTQConfig | None = None, rotation: int | None = None,
                 only_rotated: bool = False) -> Candidate:
    """The candidate minimizing the W8A8 output error of the group's consumers on calibration rows (see
    :func:`scored_candidates`; ties: the earlier candidate)."""
    cands = scored_candidates(t, g, consumers, stats, w_absmax, gptq_cfg, rotation, only_rotated)
    return min(cands, key=lambda ce: ce[1])[0]


def candidates(rotation: int | None = None, only_rotated: bool = False) -> list[Candidate]:
    """The candidates that compete for a group, in the order ties go to: no smoothing, each α of ALPHA_GRID and,
    with ``rotation``, each of ROTATION_ALPHAS followed by the rotation of that order (with ``only_rotated``,
    only those)."""
    choices = [Candidate(None, None)] + [Candidate(a, None) for a in ALPHA_GRID]
    if rotation is not None:
        choices = [] if only_rotated else choices
        choices += [Candidate(a, rotation) for a in ROTATION_ALPHAS]
    return choices


@dataclass
class _CandidateSet:
    """A group's candidates with what scoring each one needs: its smoothing factors (by α) and its quantized
    search rows, computed once per candidate rather than once per consumer."""

    choices: list[Candidate]
    factors: dict[float | None, torch.Tensor | None]
    quantized_x: list[QuantizedRows]

    @classmethod
    def build(cls, g: SmoothGroup, stats: InputStats, w_absmax: torch.Tensor, x: torch.Tensor,
              choices: list[Candidate]) -> _CandidateSet:
        act_absmax = stats.absmax[input_key(g.observed_module)]
        factors = {a: None if a is None else group_factors(act_absmax, w_absmax, g, a) for a, _ in choices}
        cs = cls(choices, factors, [])
        # quantize_per_token(rotate(x / s, block)): smoothed, rotated and quantized in one native pass
        cs.quantized_x = [native_quantize_input(x, factors[a], block) for a, block in choices]
        return cs

    def quantized_weight(self, w: torch.Tensor, k: int) -> QuantizedRows:
        """``quantize_weight_per_channel(rotate(smooth_weight(w, s), block))``: a weight's rows quantize as tokens do
        (one scale per row from its max |w|), so the rotation and rounding run in one native pass."""
        a, block = self.choices[k]
        s = self.factors[a]
        return native_quantize_input(w if s is None else smooth_weight(w, s), None, block)


def scored_candidates(t: WorkingTensors, g: SmoothGroup, consumers: list[str], stats: InputStats,
                      w_absmax: torch.Tensor, gptq_cfg: GPTQConfig | None = None, rotation: int | None = None,
                      only_rotated: bool = False) -> list[tuple[Candidate, float]]:
    """(candidate, W8A8 output error of the group's consumers on calibration rows) of the :func:`candidates`
    that compete for group ``g``, in the order ties go to.

    Every candidate is first scored with the consumers' weights rounded to nearest (see :func:`_rtn_scores`).
    With ``gptq_cfg`` (the layer is rounded by GPTQ afterwards), no smoothing and the GPTQ_SHORTLIST best
    candidates are scored again with the weights GPTQ will round, those whose Hessian is at hand (non-expert
    inputs), rounded by GPTQ under that candidate's smoothed (and rotated) Hessian. Only that shortlist
    competes then.
    """
    x = stats.sample(g.observed_module)
    cs = _CandidateSet.build(g, stats, w_absmax, x, candidates(rotation, only_rotated))
    by_key: dict[str, list[str]] = {}  # consumers GPTQ will round, by the input whose Hessian it uses
    for c in consumers:
        if gptq_cfg is not None and input_key(c) in stats.hessians:
            by_key.setdefault(input_key(c), []).append(c)
    gptq_rounded = {c for group in by_key.values() for c in group}
    errors, rtn_only, outputs = _rtn_scores(t, g, consumers, stats, x, cs, gptq_rounded)
    if not by_key:  # ties: no smoothing, then the smaller α, unrotated
        return list(zip(cs.choices, errors))
    shortlist = [0] + sorted(range(1, len(cs.choices)), key=errors.__getitem__)[:GPTQ_SHORTLIST]
    return [(cs.choices[k], rtn_only[k] + sum(gptq_output_error(t, group, stats.hessians[key].h,
                                                                cs.factors[cs.choices[k][0]], cs.choices[k][1],
                                                                outputs, cs.quantized_x[k], gptq_cfg)
                                              for key, group in by_key.items()))
            for k in shortlist]


def _rtn_scores(t: WorkingTensors, g: SmoothGroup, consumers: list[str], stats: InputStats, x: torch.Tensor,
                cs: _CandidateSet, gptq_rounded: set[str]
                ) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """Per candidate, the output error of every consumer with its weight rounded to nearest, and that of the
    consumers not in ``gptq_rounded`` alone; plus the float outputs of those in it, for GPTQ's re-scoring.

    Weights are materialized one at a time: an MoE group has two per expert, each scored on the rows routed
    to it (see :func:`routed_rows`)."""
    errors = [0.0] * len(cs.choices)  # of every consumer, rounded to nearest
    rtn_only = [0.0] * len(cs.choices)  # of the consumers GPTQ will not round
    outputs: dict[str, torch.Tensor] = {}
    rows_of = routed_rows(t, g, stats, x)
    for c in consumers:
        r = rows_of(c)
        if r is not None and r.numel() == 0:
            continue  # no search row is routed to this expert
        w = t[f"{c}.weight"].float()
        y = (x if r is None else x[r]) @ w.t()
        if c in gptq_rounded:
            outputs[c] = y
        for k, xq in enumerate(cs.quantized_x):
            xq = xq if r is None else (xq[0][r], xq[1][r])  # per-token quantization: a row's values are its own
            e = output_error(y, xq, cs.quantized_weight(w, k))
            errors[k] += e
            if c not in gptq_rounded:
                rtn_only[k] += e
    return errors, rtn_only, outputs


def routed_rows(t: WorkingTensors, g: SmoothGroup, stats: InputStats, x: torch.Tensor
                ) -> Callable[[str], torch.Tensor | None]:
    """consumer -> the search rows ``x`` it computes: for the routed experts of the shared gate/up group, the rows
    whose routes (the calibration run's, by the family's routing: DeepSeek's groups and bias too) include that
    expert, so each expert's error is measured on the tokens it serves (and a quarter of the work for Mixtral's
    top-2 of 8); None (every row) elsewhere. Without recorded search-row indices: the top-k of the router's
    logits (the same experts for softmax routing)."""
    if not g.experts or stats.recompute is None:
        return lambda c: None
    index = stats.search_index.get(g.observed_module)
    if index:
        ids = stats.recompute.ids[torch.cat(index)]
    else:
        top_k = stats.recompute.ids.shape[1]
        ids = (x @ t[f"{g.observed_module}.weight"].float().t()).topk(top_k, dim=-1).indices

    def rows(c: str) -> torch.Tensor | None:
        e = stats.recompute.expert_of(input_key(c))
        return None if e is None else (ids == e).any(-1).nonzero().squeeze(-1)

    return rows


def output_error(y: torch.Tensor, xq: QuantizedRows, wq: QuantizedRows) -> float:
    """‖Q(x)·Q(W)ᵀ − y‖² of a W8A8 product (per-token activation scales, per-channel weight scales); the
    integer products exact (:func:`int8_products`; on the CPU ~9x faster than float32 where oneDNN is exact)."""
    (xi, xsc), (wi, wsc) = xq, wq
    acc = int8_products(xi, wi.t()) if xi.device.type == "cpu" else xi.float() @ wi.float().t()
    d = acc.float()  # (acc · xsc · wscᵀ − y)², each step in place: the same operations as new tensors, one buffer
    d.mul_(xsc).mul_(wsc.t()).sub_(y).pow_(2)
    return float(d.sum())


def gptq_output_error(t: WorkingTensors, consumers: list[str], h: torch.Tensor, s: torch.Tensor | None,
                      block: int | None, outputs: dict[str, torch.Tensor], xq: QuantizedRows,
                      cfg: GPTQConfig) -> float:
    """Output error of ``consumers`` (one input, Hessian ``h``; float ``outputs`` on the search rows, whose
    quantized smoothed and rotated values are ``xq``) smoothed by ``s``, rotated by the block-Hadamard R of
    order ``block`` and rounded by GPTQ under the transformed Hessian Rᵀ·diag(1/s)·H·diag(1/s)·R; one copy
    of H, factorized in place (the search must not disturb the Hessian GPTQ uses afterwards)."""
    hs = h.clone()
    if s is not None:
        sd = s.to(hs.dtype)
        hs.div_(sd.unsqueeze(1)).div_(sd.unsqueeze(0))
    if block is not None:
        hs = rotate_hessian(hs, block)
    solver = GPTQSolver.from_owned(hs, cfg)
    del hs
    sizes = [t.shape(f"{c}.weight")[0] for c in consumers]

    def weight(c: str) -> torch.Tensor:
        w = t[f"{c}.weight"].float()
        w = w if s is None else smooth_weight(w, s)
        return w if block is None else rotate(w, block)

    weights = (weight(c) for c in consumers)
    q, scale = solver.quantize(weights, rows=sum(sizes))
    del solver
    err, r = 0.0, 0
    for c, n in zip(consumers, sizes):
        err += output_error(outputs[c], xq, (q[r : r + n], scale[r : r + n]))
        r += n
    return err
