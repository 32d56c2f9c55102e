"""Calibration-driven quantization of one decoder layer: smoothing, then GPTQ or round-to-nearest.

Methods (``haq convert --method``):

* ``rtn``          round to nearest, no calibration;
* ``gptq``         GPTQ on the original weights;
* ``smoothquant``  smoothing with one fixed α (``--alpha``), then round to nearest;
* ``haq``          smoothing with α searched per layer and producer (none, or a grid),
                   optionally followed by a block-Hadamard rotation of the consumers'
                   input (``vllm_haq.quant.rotation``), chosen by the output error of the
                   quantized W8A8 consumers on calibration rows, rounded as they will be
                   (the shortlist is re-scored with GPTQ), then GPTQ with the Hessians of
                   the *smoothed and rotated* activations.

Smoothing is folded exactly into the producers (norms, v_proj, up_proj/w3,
OPT's fc1 through ReLU). For the experts of an MoE layer, which share one input
norm with the router, two options (``--moe-smoothing``): ``shared`` folds one
vector into that norm (router and shared expert absorb it too); ``per-expert``
gives every expert its own vector from the tokens routed to it, kept explicit as
``input_smooth`` of its w1/w3 (gate/up) and applied by the runtime during that
expert's per-token quantization; the shared expert then stays unsmoothed.
Experts that saw fewer than ``MIN_EXPERT_TOKENS`` calibration tokens are
rounded to nearest (their Hessian is too low-rank to steer GPTQ). Rotation is
offered to groups whose consumers are all quantized; the routed experts' down
projections of a layer are rotated all alike or not at all (the fused MoE
runtime rotates every expert's intermediate rows the same way).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from vllm_haq.quant import quantize_per_token, quantize_weight_per_channel, relative_weight_error
from vllm_haq.quant.gptq import GPTQConfig, GPTQSolver, HessianAccumulator
from vllm_haq.quant.rotation import rotate, rotate_hessian, rotation_block
from vllm_haq.quant.smoothing import fold_into_norm, fold_into_producer_rows, smooth_weight, smoothing_factors

from offline.models import LayerTensors, ModelSpec, SmoothGroup

log = logging.getLogger("haq.convert")


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
# Up to 0.95: with 0.8 as the end most of SmolLM2's groups chose 0.8; ending at 1.0 did worse on the validation splits.
ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
SEARCH_ROWS = 1024  # calibration rows kept per observed input for the α search
SEARCH_ROW_STRIDE = 4  # of which every SEARCH_ROW_STRIDE-th observed row is kept
GPTQ_SHORTLIST = 2  # α values (best by the round-to-nearest score) scored again with GPTQ, besides no smoothing
MIN_EXPERT_TOKENS = 16
# α values (None: no smoothing) offered together with rotation. SmolLM2's conversion rotated every group and
# chose α 0.6–0.8 for the norm outputs, none or 0.5–0.7 for o_proj's and down_proj's inputs.
ROTATION_ALPHAS = (None, 0.3, 0.5, 0.6, 0.7, 0.8)
# --rotation: "search" offers rotated candidates to haq's search, "all" offers only those (every group
# that can be rotated is), "none" offers none.
ROTATION_MODES = ("search", "all", "none")
# Linears that always see exactly the same input as another one: one set of statistics serves both.
_SAME_INPUT_AS = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj", "w3": "w1"}


def input_key(module: str) -> str:
    """The module whose statistics describe ``module``'s input."""
    head, _, last = module.rpartition(".")
    twin = _SAME_INPUT_AS.get(last)
    return f"{head}.{twin}" if twin else module


MOE_SMOOTHING = ("shared", "per-expert")


class WorkingTensors:
    """One decoder layer's tensors as the converter sees them: ``dtype`` copies of the source with the smoothing
    applied so far.

    Smoothing only records an exact rescaling per tensor; a tensor is materialized (source → ``dtype``, then
    each rescaling in order) when it is read. Materializing every smoothed weight at once would hold the layer in
    float32, twice its bf16 size (5.4 GiB for one Mixtral-8x7B layer), next to the Hessians. Takes ownership of
    ``source``: :meth:`release` removes a tensor from it, so a finished expert's weights can be freed.
    """

    def __init__(self, source: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
        self.source = source
        self.dtype = dtype
        self.rescalings: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        v = self.source[name]
        if v.is_floating_point():
            v = v.to(self.dtype)
        for rescale in self.rescalings.get(name, ()):
            v = rescale(v)
        return v

    def __contains__(self, name: str) -> bool:
        return name in self.source

    def shape(self, name: str) -> torch.Size:
        """The tensor's shape, without materializing it."""
        return self.source[name].shape

    def get(self, name: str, default=None):
        return self[name] if name in self.source else default

    def names(self) -> list[str]:
        return list(self.source)

    def rescale(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.rescalings.setdefault(name, []).append(fn)

    def release(self, name: str) -> None:
        self.source.pop(name, None)
        self.rescalings.pop(name, None)


class InputStats:
    """Observer for LayerTensors: per distinct linear input, its channel max |x|, a row sample for the α search
    and, for the inputs in ``hessians``, the GPTQ Hessian.

    The other inputs' Hessians are built one at a time by :meth:`take_hessian` from ``recompute`` (an MoE layer's
    experts: eight 14336² Hessians of Mixtral's down projections would not fit beside the layer). ``keep_all``
    inputs keep every row as observed, before any smoothing (the MoE input the experts' inputs are recomputed
    from). Smoothing divides an input by s; :meth:`rescale` updates everything kept for it exactly.
    """

    def __init__(self, keep_rows_every: int = SEARCH_ROW_STRIDE, hessians: Callable[[str], bool] = lambda key: True,
                 keep_all: Iterable[str] = ()):
        self.absmax: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.hessians: dict[str, HessianAccumulator] = {}
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.all_rows: dict[str, list[torch.Tensor]] = {key: [] for key in keep_all}
        self.scale: dict[str, torch.Tensor] = {}  # inputs without a Hessian yet: the divisor applied since observed
        self.rotation: dict[str, int] = {}  # inputs without a Hessian yet: the rotation applied after that divisor
        self.every = keep_rows_every
        self.wants_hessian = hessians
        self.recompute: Callable[[str], Iterable[torch.Tensor]] | None = None

    def __call__(self, module: str, x: torch.Tensor) -> None:
        if input_key(module) != module:
            return
        x2 = x.reshape(-1, x.shape[-1])
        if module not in self.count:
            self.count[module] = 0
            self.absmax[module] = torch.zeros(x2.shape[-1], dtype=torch.float64)
            self.rows[module] = []
            if self.wants_hessian(module):
                self.hessians[module] = HessianAccumulator(x2.shape[-1])
        if module in self.hessians:
            self.hessians[module].add(x2)
        if x2.shape[0]:
            self.absmax[module] = torch.maximum(self.absmax[module], x2.float().abs().amax(0).double())
        self.count[module] += x2.shape[0]
        if module in self.all_rows:
            self.all_rows[module].append(x2.float().clone())
        kept = sum(r.shape[0] for r in self.rows[module])
        if kept < SEARCH_ROWS:
            self.rows[module].append(x2[:: self.every][: SEARCH_ROWS - kept].float().clone())

    def seen(self, module: str) -> bool:
        return input_key(module) in self.count

    def sample(self, module: str) -> torch.Tensor:
        return torch.cat(self.rows[input_key(module)])

    def rescale(self, module: str, s: torch.Tensor) -> None:
        """The input of ``module`` is now x / s: update its statistics exactly."""
        key = input_key(module)
        if key not in self.count:
            return
        sd = s.double()
        self.absmax[key] /= sd
        self.rows[key] = [r / s for r in self.rows[key]]
        if key in self.hessians:
            self.hessians[key].h /= torch.outer(sd, sd)
        else:
            self.scale[key] = self.scale[key] * sd if key in self.scale else sd

    def rotate(self, module: str, block: int) -> None:
        """The input of ``module`` is now x R (block-Hadamard; after every smoothing): rotate what is kept for it.

        Its channel max is taken again over the kept rows (it is no longer a function of the old one); nothing
        reads it after the group's smoothing and rotation are chosen. A recomputed Hessian is rotated when built.
        """
        key = input_key(module)
        if key not in self.count:  # an expert no calibration token was routed to
            return
        self.rows[key] = [rotate(r, block) for r in self.rows[key]]
        self.absmax[key] = torch.cat(self.rows[key]).abs().amax(0).double()
        if key in self.hessians:
            self.hessians[key].h = rotate_hessian(self.hessians[key].h, block)
        else:
            self.rotation[key] = block

    def take_hessian(self, key: str) -> HessianAccumulator:
        """The Hessian of input ``key`` (of its current, smoothed values), handed over to the caller."""
        if key in self.hessians:
            return self.hessians.pop(key)
        if self.recompute is None:
            raise RuntimeError(f"no Hessian was collected for {key} and it cannot be recomputed")
        acc = HessianAccumulator(self.absmax[key].shape[0])
        s, block = self.scale.get(key), self.rotation.get(key)
        for x in self.recompute(key):
            x = x if s is None else x / s.float()
            acc.add(x if block is None else rotate(x, block))
        if acc.n != self.count[key]:
            raise RuntimeError(f"{key}: recomputed {acc.n} calibration rows, observed {self.count[key]}")
        return acc


class ExpertInputs:
    """The unsmoothed inputs of one MoE layer's routed experts, recomputed from the MoE input and the routing.

    ``rows`` are the MoE block's input rows and ``ids`` their top-k experts, both in calibration order; the
    gate/up input of expert e is ``rows`` routed to e, its down input silu(x Wgᵀ) · (x Wuᵀ) of those rows.
    """

    def __init__(self, block: str, names: tuple[str, str, str], rows: torch.Tensor, ids: torch.Tensor,
                 source: dict[str, torch.Tensor], chunk_rows: int = 4096):
        self.prefix, self.names = f"{block}.experts.", names
        self.rows, self.ids, self.source, self.chunk_rows = rows, ids, source, chunk_rows

    def expert_of(self, key: str) -> int | None:
        """The expert whose gate/up or down input ``key`` is, else None."""
        if not key.startswith(self.prefix):
            return None
        e, _, linear = key[len(self.prefix):].partition(".")
        return int(e) if e.isdigit() and linear in (self.names[0], self.names[2]) else None

    def __call__(self, key: str) -> Iterator[torch.Tensor]:
        e = self.expert_of(key)
        gate, up, down = (f"{self.prefix}{e}.{n}.weight" for n in self.names)
        tok = (self.ids == e).any(-1).nonzero().squeeze(-1)
        is_down = key.endswith(f".{self.names[2]}")
        wg, wu = (self.source[gate].float(), self.source[up].float()) if is_down else (None, None)
        for c in range(0, tok.numel(), self.chunk_rows):
            x = self.rows[tok[c : c + self.chunk_rows]]
            yield F.silu(F.linear(x, wg)) * F.linear(x, wu) if is_down else x


def quantize_calibrated(spec: ModelSpec, i: int, t: WorkingTensors, targets: list[str], hidden: torch.Tensor,
                        method: Method, alpha: float, gptq_cfg: GPTQConfig, moe_smoothing: str = "shared",
                        chunk: int = 8, rotation: str = "none"):
    """Run layer ``i`` in float on ``hidden`` to collect input statistics, smooth ``t`` and quantize ``targets``.

    Returns (non-target tensors in their source dtype + int8 targets with scales + explicit smoothing,
    smoothing record, explicit-smoothing expert blocks, GPTQ fallbacks, worst relative weight error).
    """
    t0 = time.time()
    dtypes = {k: v.dtype for k, v in t.source.items()}
    moe = spec.moe_block(i)
    target_inputs = {input_key(m) for m in targets}
    stats = InputStats(hessians=lambda key: method.gptq and key in target_inputs and not _is_routed_expert(moe, key),
                       keep_all=[f"{moe[0]}.gate"] if moe else [])
    routes: list[torch.Tensor] = []
    sink = (lambda _i, ids: routes.append(ids)) if moe else None
    lt = LayerTensors(t, observer=stats)
    with torch.no_grad():
        for c in range(0, hidden.shape[0], chunk):
            spec.layer_forward(i, lt, hidden[c : c + chunk], sink)
    if moe:
        block, names = moe
        stats.recompute = ExpertInputs(block, names, torch.cat(stats.all_rows.pop(f"{block}.gate")),
                                       torch.cat(routes), t.source)

    t1 = time.time()
    record, explicit, explicit_blocks = _smooth(spec, i, t, targets, stats, method, alpha, moe_smoothing,
                                                gptq_cfg if method.gptq else None, rotation)
    stats.rows.clear()  # the α search is done; GPTQ needs only the Hessians
    t2 = time.time()

    out = {k: t[k].to(dtypes[k]) for k in t.names() if k.removesuffix(".weight") not in targets}
    fallbacks, worst = [], 0.0
    by_input: dict[str, list[str]] = {}
    for module in targets:
        by_input.setdefault(input_key(module), []).append(module)
    for key, modules in by_input.items():
        if method.gptq and stats.count.get(key, 0) >= MIN_EXPERT_TOKENS:
            # Linears reading the same input (q/k/v, gate/up) share H: GPTQ's rows are independent
            # given H, so one stacked call (one factorization of H) gives each linear's own result.
            solver = GPTQSolver.from_accumulator(stats.take_hessian(key), gptq_cfg)
            # each weight is materialized (float32, smoothed) only while it is copied into the solver's stack
            sizes = [t.shape(f"{m}.weight")[0] for m in modules]
            q, s = solver.quantize((t[f"{m}.weight"] for m in modules), rows=sum(sizes))
            del solver
            quantized = [(qm.contiguous(), sm.contiguous()) for qm, sm in zip(q.split(sizes), s.split(sizes))]
            del q
        else:
            if method.gptq:
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
    out.update(explicit)
    log.info("layer %d: statistics %.1fs, smoothing %.1fs, %s %.1fs", i, t1 - t0, t2 - t1,
              "GPTQ" if method.gptq else "rounding", time.time() - t2)
    return out, record, explicit_blocks, fallbacks, worst


def _is_routed_expert(moe: tuple[str, tuple[str, str, str]] | None, key: str) -> bool:
    return moe is not None and key.startswith(f"{moe[0]}.experts.")


def _smooth(spec: ModelSpec, i: int, t: WorkingTensors, targets: list[str], stats: InputStats, method: Method,
            alpha: float, moe_smoothing: str, gptq_cfg: GPTQConfig | None = None, rotation: str = "none"):
    """Choose and apply the smoothing of every group of layer ``i``; returns (record, explicit tensors, blocks)."""
    record: dict[str, float | None] = {}
    explicit: dict[str, torch.Tensor] = {}
    explicit_blocks: list[str] = []
    if not method.smooth:
        return record, explicit, explicit_blocks
    expert_downs = []
    for g in spec.smoothing_groups(i):
        consumers = [c for c in g.consumers if c in targets]
        if g.experts and moe_smoothing == "per-expert":
            for e_in in g.experts:
                record[e_in] = _smooth_expert_explicitly(t, e_in, targets, stats, method, alpha, explicit)
            explicit_blocks.append(g.experts[0].rsplit(".", 2)[0])
            continue
        if _is_routed_expert_down(g, stats):
            expert_downs.append(g)
            continue
        if not consumers or not stats.seen(g.observed_module):
            continue
        w_absmax = _weight_absmax(t, consumers)
        a, block = alpha, None
        if method.search_alpha:
            block = _rotation_for(t, g, consumers) if rotation != "none" else None
            a, block = _search_alpha(t, g, consumers, stats, w_absmax, gptq_cfg, block, only_rotated=rotation == "all")
        _transform_group(t, g, consumers, stats, w_absmax, a, block, record)
    if expert_downs:
        _smooth_expert_downs(t, expert_downs, targets, stats, method, alpha, rotation, record)
    return record, explicit, explicit_blocks


def _transform_group(t: WorkingTensors, g: SmoothGroup, consumers: list[str], stats: InputStats,
                     w_absmax: torch.Tensor | None, a: float | None, block: int | None, record: dict) -> None:
    """Apply smoothing ``a`` (None: none) and rotation ``block`` (None: none) to group ``g`` and record them."""
    record[g.consumers[0]] = a
    if a is not None:
        _apply_smoothing(t, g, _factors(stats.absmax[input_key(g.observed_module)], w_absmax, g, a), stats)
    if block is not None:
        for c in consumers:
            t.rescale(f"{c}.weight", lambda w, b=block: rotate(w, b))  # bound now: block changes per group
            record.setdefault("rotation", {})[c] = block
        for key in {input_key(c) for c in consumers}:
            stats.rotate(key, block)


def _is_routed_expert_down(g: SmoothGroup, stats: InputStats) -> bool:
    """Whether ``g`` is a routed expert's down projection (its input exists only inside the fused MoE)."""
    return not g.experts and stats.recompute is not None and any(
        stats.recompute.expert_of(input_key(c)) is not None for c in g.consumers)


def _smooth_expert_downs(t: WorkingTensors, groups: list[SmoothGroup], targets: list[str], stats: InputStats,
                         method: Method, alpha: float, rotation: str, record: dict) -> None:
    """The routed experts' down projections of one MoE layer: each expert's own smoothing (folded into its up
    projection), and one rotation for all of them or none, because the MoE runtime rotates every expert's
    intermediate rows alike. ``search`` rotates them where the experts' best rotated candidates have a smaller
    summed output error than their best unrotated ones; experts no calibration token reached follow the others
    (rotation is exact in float, the rounding of W R is as good as that of W)."""
    consumers = [[c for c in g.consumers if c in targets] for g in groups]
    block = None
    if method.search_alpha and rotation != "none" and all(cs and sorted(cs) == sorted(g.consumers)
                                                          for g, cs in zip(groups, consumers)):
        block = _rotation_for(t, groups[0], consumers[0])
    seen = [bool(cs) and stats.seen(g.observed_module) for g, cs in zip(groups, consumers)]
    w_absmax = [_weight_absmax(t, cs) if ok else None for cs, ok in zip(consumers, seen)]
    if not method.search_alpha:
        chosen = [alpha if ok else None for ok in seen]
    else:
        scored = [_scored_candidates(t, g, cs, stats, wa, None, block, only_rotated=rotation == "all") if ok else []
                  for g, cs, wa, ok in zip(groups, consumers, w_absmax, seen)]

        def best(cands: list, rotated: bool) -> tuple[tuple[float | None, int | None], float]:
            return min(((c, e) for c, e in cands if (c[1] is not None) == rotated), key=lambda ce: ce[1],
                       default=((None, None), float("inf")))

        if block is not None and rotation == "search":
            total = {r: sum(best(cands, r)[1] for cands in scored if cands) for r in (False, True)}
            block = block if total[True] < total[False] else None
        chosen = [best(cands, block is not None)[0][0] if cands else None for cands in scored]
    for g, cs, wa, a, ok in zip(groups, consumers, w_absmax, chosen, seen):
        if cs and (ok or block is not None):
            _transform_group(t, g, cs, stats, wa, a if ok else None, block, record)


def _rotation_for(t: WorkingTensors, g: SmoothGroup, consumers: list[str]) -> int | None:
    """The block-Hadamard order offered to group ``g``, or None where rotation is not possible: groups with an
    unquantized consumer, widths without a power-of-two block of at least MIN_BLOCK. (The shared gate/up input
    of all experts is rotated once, the router reads it unrotated; the routed experts' down projections are
    rotated all alike or not at all, see :func:`_smooth_expert_downs`.)"""
    if sorted(consumers) != sorted(g.consumers):
        return None
    return rotation_block(t.shape(f"{consumers[0]}.weight")[1])


def _smooth_expert_explicitly(t: WorkingTensors, e_in: str, targets: list[str], stats: InputStats, method: Method,
                              alpha: float, explicit: dict[str, torch.Tensor]) -> float | None:
    """Smooth one expert's gate/up by its own tokens; the factors become its ``input_smooth``."""
    head, _, last = e_in.rpartition(".")
    twin = next(k for k, v in _SAME_INPUT_AS.items() if v == last)
    consumers = [c for c in (e_in, f"{head}.{twin}") if c in targets]
    a = None
    if consumers and stats.count.get(e_in, 0) >= MIN_EXPERT_TOKENS:
        g = SmoothGroup(consumers, observed=e_in)
        w_absmax = _weight_absmax(t, consumers)
        a = _search_alpha(t, g, consumers, stats, w_absmax)[0] if method.search_alpha else alpha
    s = torch.ones(t[f"{consumers[0]}.weight"].shape[1]) if a is None else _factors(stats.absmax[e_in], w_absmax, g, a)
    for c in consumers:
        t.rescale(f"{c}.weight", lambda w, s=s: smooth_weight(w, s))
        explicit[f"{c}.input_smooth"] = s.float().clone()  # one tensor per name: safetensors refuses shared storage
    stats.rescale(e_in, s)
    return a


def _weight_absmax(t: WorkingTensors, consumers: list[str]) -> torch.Tensor:
    """Per input channel max |W| over every consumer (materialized one at a time)."""
    return torch.stack([t[f"{c}.weight"].float().abs().amax(0) for c in consumers]).amax(0)


def _factors(act_absmax: torch.Tensor, w_absmax: torch.Tensor, g: SmoothGroup, alpha: float) -> torch.Tensor:
    if g.heads is None:
        return smoothing_factors(act_absmax, w_absmax, alpha)
    nkv, rep, hd = g.heads  # one factor per v channel, repeated over the query heads that read it
    s = smoothing_factors(act_absmax.view(nkv, rep, hd).amax(1).flatten(),
                          w_absmax.view(nkv, rep, hd).amax(1).flatten(), alpha)
    return s.view(nkv, 1, hd).expand(nkv, rep, hd).reshape(-1)


def _apply_smoothing(t: WorkingTensors, g: SmoothGroup, s: torch.Tensor, stats: InputStats) -> None:
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


def _search_alpha(t: WorkingTensors, g: SmoothGroup, consumers: list[str], stats: InputStats,
                  w_absmax: torch.Tensor, gptq_cfg: GPTQConfig | None = None, rotation: int | None = None,
                  only_rotated: bool = False) -> tuple[float | None, int | None]:
    """(α or None: no smoothing, rotation block or None) minimizing the W8A8 output error of the group's
    consumers on calibration rows (see :func:`_scored_candidates`; ties: the earlier candidate)."""
    cands = _scored_candidates(t, g, consumers, stats, w_absmax, gptq_cfg, rotation, only_rotated)
    return min(cands, key=lambda ce: ce[1])[0]


def _scored_candidates(t: WorkingTensors, g: SmoothGroup, consumers: list[str], stats: InputStats,
                       w_absmax: torch.Tensor, gptq_cfg: GPTQConfig | None = None, rotation: int | None = None,
                       only_rotated: bool = False) -> list[tuple[tuple[float | None, int | None], float]]:
    """((α, rotation block), W8A8 output error of the group's consumers on calibration rows) of the candidates
    that compete for group ``g``, in the order ties go to. The candidates are no smoothing, each α of
    ALPHA_GRID and, with ``rotation``, each of ROTATION_ALPHAS followed by the block-Hadamard rotation of that
    order (with ``only_rotated``, only those).

    Every candidate is first scored with the consumers' weights rounded to nearest (materialized one at a
    time: an MoE group has two per expert, each scored on the rows routed to it, see :func:`_routed_rows`). With ``gptq_cfg`` (the layer is rounded by GPTQ afterwards),
    no smoothing and the GPTQ_SHORTLIST best candidates are scored again with the weights GPTQ will round,
    those whose Hessian is at hand (non-expert inputs), rounded by GPTQ under that candidate's smoothed
    (and rotated) Hessian: smoothing trades activation error for weight error and GPTQ removes much of the
    weight part, so the best candidate for round-to-nearest is not the best one for GPTQ, and GPTQ alone
    (no smoothing) can win. Only that shortlist competes then.
    """
    x = stats.sample(g.observed_module)
    act_absmax = stats.absmax[input_key(g.observed_module)]
    choices = [(None, None)] + [(a, None) for a in ALPHA_GRID]
    if rotation is not None:
        choices = [] if only_rotated else choices
        choices += [(a, rotation) for a in ROTATION_ALPHAS]
    factors = {a: None if a is None else _factors(act_absmax, w_absmax, g, a) for a, _ in choices}

    def transformed(v: torch.Tensor, k: int, weight: bool) -> torch.Tensor:
        """Input rows (or a weight) as candidate k presents them to the quantizer."""
        a, block = choices[k]
        s = factors[a]
        if s is not None:
            v = smooth_weight(v, s) if weight else v / s
        return v if block is None else rotate(v, block)

    quantized_x = [quantize_per_token(transformed(x, k, weight=False)) for k in range(len(choices))]
    by_key: dict[str, list[str]] = {}  # consumers GPTQ will round, by the input whose Hessian it uses
    for c in consumers:
        if gptq_cfg is not None and input_key(c) in stats.hessians:
            by_key.setdefault(input_key(c), []).append(c)
    gptq_rounded = {c for cs in by_key.values() for c in cs}
    errors = [0.0] * len(choices)  # of every consumer, rounded to nearest
    rtn_only = [0.0] * len(choices)  # of the consumers GPTQ will not round
    outputs: dict[str, torch.Tensor] = {}  # the float outputs of the GPTQ-rounded consumers, for the re-scoring
    rows_of = _routed_rows(t, g, stats, x)
    for c in consumers:
        r = rows_of(c)
        if r is not None and r.numel() == 0:
            continue  # no search row is routed to this expert
        w = t[f"{c}.weight"].float()
        y = (x if r is None else x[r]) @ w.t()
        if c in gptq_rounded:
            outputs[c] = y
        for k, xq in enumerate(quantized_x):
            xq = xq if r is None else (xq[0][r], xq[1][r])  # per-token quantization: a row's values are its own
            e = _output_error(y, xq, quantize_weight_per_channel(transformed(w, k, weight=True)))
            errors[k] += e
            if c not in gptq_rounded:
                rtn_only[k] += e
    if not by_key:  # ties: no smoothing, then the smaller α, unrotated
        return list(zip(choices, errors))
    shortlist = [0] + sorted(range(1, len(choices)), key=errors.__getitem__)[:GPTQ_SHORTLIST]
    return [(choices[k], rtn_only[k] + sum(_gptq_output_error(t, cs, stats.hessians[key].h, factors[choices[k][0]],
                                                              choices[k][1], outputs, quantized_x[k], gptq_cfg)
                                           for key, cs in by_key.items()))
            for k in shortlist]


def _routed_rows(t: WorkingTensors, g: SmoothGroup, stats: InputStats, x: torch.Tensor
                 ) -> Callable[[str], torch.Tensor | None]:
    """consumer -> the search rows ``x`` it computes: for the routed experts of the shared gate/up group, the rows
    whose top-k routes (the router applied to them) include that expert, so each expert's error is measured on
    the tokens it serves (and a quarter of the work for Mixtral's top-2 of 8); None (every row) elsewhere."""
    if not g.experts or stats.recompute is None:
        return lambda c: None
    top_k = stats.recompute.ids.shape[1]
    ids = (x @ t[f"{g.observed_module}.weight"].float().t()).topk(top_k, dim=-1).indices

    def rows(c: str) -> torch.Tensor | None:
        e = stats.recompute.expert_of(input_key(c))
        return None if e is None else (ids == e).any(-1).nonzero().squeeze(-1)

    return rows


def _output_error(y: torch.Tensor, xq: tuple[torch.Tensor, torch.Tensor], wq: tuple[torch.Tensor, torch.Tensor]
                  ) -> float:
    """‖Q(x)·Q(W)ᵀ − y‖² of a W8A8 product (per-token activation scales, per-channel weight scales)."""
    (xi, xsc), (wi, wsc) = xq, wq
    return float(((xi.float() @ wi.float().t()) * xsc * wsc.t() - y).pow(2).sum())


def _gptq_output_error(t: WorkingTensors, consumers: list[str], h: torch.Tensor, s: torch.Tensor | None,
                       block: int | None, outputs: dict[str, torch.Tensor], xq: tuple[torch.Tensor, torch.Tensor],
                       cfg: GPTQConfig) -> float:
    """Output error of ``consumers`` (one input, Hessian ``h``; float ``outputs`` on the search rows, whose
    quantized smoothed and rotated values are ``xq``) smoothed by ``s``, rotated by the block-Hadamard R of
    order ``block`` and rounded by GPTQ under the transformed Hessian Rᵀ·diag(1/s)·H·diag(1/s)·R; one copy
    of H, factorized in place."""
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
        err += _output_error(outputs[c], xq, (q[r : r + n], scale[r : r + n]))
        r += n
    return err
