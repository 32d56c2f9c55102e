"""Calibration-driven quantization of one decoder layer: smoothing, then GPTQ or round-to-nearest.

Methods (``haq convert --method``):

* ``rtn``          round to nearest, no calibration;
* ``gptq``         GPTQ on the original weights;
* ``smoothquant``  smoothing with one fixed α (``--alpha``), then round to nearest;
* ``haq``          smoothing with α searched per layer and producer (none, or a grid),
                   by the output error of the quantized W8A8 consumers on calibration
                   rows, then GPTQ with the Hessians of the *smoothed* activations.

Smoothing is folded exactly into the producers (norms, v_proj, up_proj/w3,
OPT's fc1 through ReLU). For the experts of an MoE layer, which share one input
norm with the router, two options (``--moe-smoothing``): ``shared`` folds one
vector into that norm (router and shared expert absorb it too); ``per-expert``
gives every expert its own vector from the tokens routed to it, kept explicit as
``input_smooth`` of its w1/w3 (gate/up) and applied by the runtime during that
expert's per-token quantization; the shared expert then stays unsmoothed.
Experts that saw fewer than ``MIN_EXPERT_TOKENS`` calibration tokens are
rounded to nearest (their Hessian is too low-rank to steer GPTQ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_haq.quant import quantize_per_token, quantize_weight_per_channel
from vllm_haq.quant.gptq import GPTQConfig, GPTQSolver, HessianAccumulator
from vllm_haq.quant.smoothing import fold_into_norm, fold_into_producer_rows, smooth_weight, smoothing_factors

from offline.models import ModelSpec, SmoothGroup


@dataclass(frozen=True)
class Method:
    smooth: bool
    search_alpha: bool
    gptq: bool


METHODS = {
    "rtn": Method(smooth=False, search_alpha=False, gptq=False),
    "gptq": Method(smooth=False, search_alpha=False, gptq=True),
    "smoothquant": Method(smooth=True, search_alpha=False, gptq=False),
    "haq": Method(smooth=True, search_alpha=True, gptq=True),
}
ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
SEARCH_ROWS = 1024  # calibration rows kept per observed input for the α search
MIN_EXPERT_TOKENS = 16
# Linears that always see exactly the same input as another one: one set of statistics serves both.
_SAME_INPUT_AS = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj", "w3": "w1"}


def input_key(module: str) -> str:
    """The module whose statistics describe ``module``'s input."""
    head, _, last = module.rpartition(".")
    twin = _SAME_INPUT_AS.get(last)
    return f"{head}.{twin}" if twin else module


class InputStats:
    """Observer for LayerTensors: Hessian, channel max and a row sample of every distinct linear input."""

    def __init__(self, keep_rows_every: int = 4):
        self.acc: dict[str, HessianAccumulator] = {}
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.every = keep_rows_every

    def __call__(self, module: str, x: torch.Tensor) -> None:
        if input_key(module) != module:
            return
        x2 = x.reshape(-1, x.shape[-1])
        if module not in self.acc:
            self.acc[module] = HessianAccumulator(x2.shape[-1])
            self.rows[module] = []
        self.acc[module].add(x2)
        kept = sum(r.shape[0] for r in self.rows[module])
        if kept < SEARCH_ROWS:
            self.rows[module].append(x2[:: self.every][: SEARCH_ROWS - kept].float().clone())

    def sample(self, module: str) -> torch.Tensor:
        return torch.cat(self.rows[input_key(module)])

    def rescale(self, module: str, s: torch.Tensor) -> None:
        """The input of ``module`` is now x / s: update its statistics exactly."""
        key = input_key(module)
        if key not in self.acc:
            return
        sd = s.double()
        acc = self.acc[key]
        acc.h /= torch.outer(sd, sd)
        acc.absmax /= sd
        self.rows[key] = [r / s for r in self.rows[key]]


MOE_SMOOTHING = ("shared", "per-expert")


def quantize_calibrated(spec: ModelSpec, i: int, t: dict[str, torch.Tensor], targets: list[str],
                        stats: InputStats, method: Method, alpha: float, gptq_cfg: GPTQConfig,
                        moe_smoothing: str = "shared"):
    """Smooth (in place in ``t``) and quantize ``targets``.

    Returns (tensors, smoothing record, explicit-smoothing expert blocks, GPTQ fallbacks).
    """
    record: dict[str, float | None] = {}
    explicit: dict[str, torch.Tensor] = {}
    explicit_blocks: list[str] = []
    if method.smooth:
        for g in spec.smoothing_groups(i):
            consumers = [c for c in g.consumers if c in targets]
            if g.experts and moe_smoothing == "per-expert":
                for e_in in g.experts:
                    record[e_in] = _smooth_expert_explicitly(t, e_in, targets, stats, method, alpha, explicit)
                explicit_blocks.append(g.experts[0].rsplit(".", 2)[0])
                continue
            if not consumers or input_key(g.observed_module) not in stats.acc:
                continue
            a = alpha
            if method.search_alpha:
                a = _search_alpha(t, g, consumers, stats)
            record[g.consumers[0]] = a
            if a is not None:
                _apply_smoothing(t, g, _factors(t, g, consumers, stats, a), stats)
    out = dict(t)
    fallbacks = []
    by_input: dict[str, list[str]] = {}
    for module in targets:
        by_input.setdefault(input_key(module), []).append(module)
    for key, modules in by_input.items():
        acc = stats.acc.get(key)
        if method.gptq and acc is not None and acc.n >= MIN_EXPERT_TOKENS:
            # Linears reading the same input (q/k/v, gate/up) share H: GPTQ's rows are independent
            # given H, so one stacked call (one factorization of H) gives each linear's own result.
            ws = [t[f"{m}.weight"] for m in modules]
            q, s = GPTQSolver(acc.h, gptq_cfg).quantize(torch.cat([w.float() for w in ws]))
            sizes = [w.shape[0] for w in ws]
            for m, qm, sm in zip(modules, q.split(sizes), s.split(sizes)):
                out[f"{m}.weight"], out[f"{m}.weight_scale"] = qm.contiguous(), sm.contiguous()
            continue
        for module in modules:
            if method.gptq:
                fallbacks.append(module)
            out[f"{module}.weight"], out[f"{module}.weight_scale"] = quantize_weight_per_channel(t[f"{module}.weight"])
    out.update(explicit)
    return out, record, explicit_blocks, fallbacks


def _smooth_expert_explicitly(t, e_in: str, targets: list[str], stats: InputStats, method: Method, alpha: float,
                              explicit: dict[str, torch.Tensor]) -> float | None:
    """Smooth one expert's gate/up by its own tokens; the factors become its ``input_smooth``."""
    head, _, last = e_in.rpartition(".")
    twin = next(k for k, v in _SAME_INPUT_AS.items() if v == last)
    consumers = [c for c in (e_in, f"{head}.{twin}") if c in targets]
    acc = stats.acc.get(e_in)
    a = None
    if consumers and acc is not None and acc.n >= MIN_EXPERT_TOKENS:
        g = SmoothGroup(consumers, observed=e_in)
        a = _search_alpha(t, g, consumers, stats) if method.search_alpha else alpha
    s = torch.ones(t[f"{consumers[0]}.weight"].shape[1]) if a is None else _factors(t, g, consumers, stats, a)
    for c in consumers:
        t[f"{c}.weight"] = smooth_weight(t[f"{c}.weight"], s)
        explicit[f"{c}.input_smooth"] = s.float().clone()  # one tensor per name: safetensors refuses shared storage
    stats.rescale(e_in, s)
    return a


def _factors(t, g: SmoothGroup, consumers: list[str], stats: InputStats, alpha: float) -> torch.Tensor:
    a = stats.acc[input_key(g.observed_module)].absmax
    w = torch.stack([t[f"{c}.weight"].float().abs().amax(0) for c in consumers]).amax(0)
    if g.heads is None:
        return smoothing_factors(a, w, alpha)
    nkv, rep, hd = g.heads  # one factor per v channel, repeated over the query heads that read it
    s = smoothing_factors(a.view(nkv, rep, hd).amax(1).flatten(), w.view(nkv, rep, hd).amax(1).flatten(), alpha)
    return s.view(nkv, 1, hd).expand(nkv, rep, hd).reshape(-1)


def _apply_smoothing(t, g: SmoothGroup, s: torch.Tensor, stats: InputStats) -> None:
    if g.norm is not None:
        w, b = fold_into_norm(t[f"{g.norm}.weight"], t.get(f"{g.norm}.bias"), s)
        t[f"{g.norm}.weight"] = w
        if b is not None:
            t[f"{g.norm}.bias"] = b
    else:
        rows = s if g.heads is None else s.view(g.heads).amax(1).flatten()  # producer has kv channels only
        w, b = fold_into_producer_rows(t[f"{g.producer}.weight"], t.get(f"{g.producer}.bias"), rows)
        t[f"{g.producer}.weight"] = w
        if b is not None:
            t[f"{g.producer}.bias"] = b
    for c in g.consumers + g.also_scaled:
        t[f"{c}.weight"] = smooth_weight(t[f"{c}.weight"], s)
    for c in {input_key(c) for c in g.consumers} | {g.observed_module}:
        stats.rescale(c, s)


def _search_alpha(t, g: SmoothGroup, consumers: list[str], stats: InputStats) -> float | None:
    """α (or None: no smoothing) minimizing the W8A8 output error of the group's consumers."""
    x = stats.sample(g.observed_module)
    weights = [t[f"{c}.weight"].float() for c in consumers]
    ref = [x @ w.t() for w in weights]

    def error(s: torch.Tensor | None) -> float:
        xs = x if s is None else x / s
        xq, xsc = quantize_per_token(xs)
        total = 0.0
        for w, y in zip(weights, ref):
            ws = w if s is None else w * s
            wq, wsc = quantize_weight_per_channel(ws)
            y_hat = (xq.float() @ wq.float().t()) * xsc * wsc.t()
            total += float((y_hat - y).pow(2).sum())
        return total

    best_alpha, best = None, error(None)
    for alpha in ALPHA_GRID:
        e = error(_factors(t, g, consumers, stats, alpha))
        if e < best:
            best_alpha, best = alpha, e
    return best_alpha
