"""What the float run of one layer leaves for smoothing, the α search and GPTQ: per-input statistics, and the
routed experts' inputs recomputed on demand (they would not fit in memory all at once)."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from vllm_haq.quant.gptq import HessianAccumulator
from vllm_haq.quant.rotation import rotate, rotate_hessian

from offline.haq.methods import SEARCH_ROW_STRIDE, SEARCH_ROWS

# Linears that always see exactly the same input as another one: one set of statistics serves both.
_SAME_INPUT_AS = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj", "w3": "w1"}


def input_key(module: str) -> str:
    """The module whose statistics describe ``module``'s input."""
    head, _, last = module.rpartition(".")
    twin = _SAME_INPUT_AS.get(last)
    return f"{head}.{twin}" if twin else module


def input_twin(module: str) -> str:
    """The first linear that reads the same input as ``module`` and is keyed by it (an expert's w1 → its w3,
    gate_proj → up_proj): the consumers an expert's explicit smoothing must scale along with ``module``."""
    head, _, last = module.rpartition(".")
    twin = next(k for k, v in _SAME_INPUT_AS.items() if v == last)
    return f"{head}.{twin}"


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
        # inputs kept whole: the indices (among all their rows) of the search rows, so rows and routes line up
        self.search_index: dict[str, list[torch.Tensor]] = {key: [] for key in keep_all}
        self.scale: dict[str, torch.Tensor] = {}  # inputs without a Hessian yet: the divisor applied since observed
        self.rotation: dict[str, int] = {}  # inputs without a Hessian yet: the rotation applied after that divisor
        self.every = keep_rows_every
        self.wants_hessian = hessians
        self.recompute: ExpertInputs | None = None

    def __call__(self, module: str, x: torch.Tensor) -> None:
        """Observe input ``x`` of ``module`` (once per distinct input: the twins reading the same one are skipped).
        For the search it keeps every ``every``-th row of the first chunks observed, up to SEARCH_ROWS."""
        if input_key(module) != module:
            return
        x2 = x.reshape(-1, x.shape[-1])
        if module not in self.count:
            self.count[module] = 0
            self.absmax[module] = torch.zeros(x2.shape[-1], dtype=torch.float64, device=x2.device)
            self.rows[module] = []
            if self.wants_hessian(module):
                self.hessians[module] = HessianAccumulator(x2.shape[-1], x2.device, track_absmax=False)
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
            if module in self.search_index:
                first = self.count[module] - x2.shape[0]
                self.search_index[module].append(first + torch.arange(self.rows[module][-1].shape[0]) * self.every)

    def seen(self, module: str) -> bool:
        """Whether ``module``'s input was observed at all (an expert may receive no calibration token)."""
        return input_key(module) in self.count

    def sample(self, module: str) -> torch.Tensor:
        """The search rows kept for ``module``'s input, as currently smoothed and rotated."""
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
        acc = HessianAccumulator(self.absmax[key].shape[0], self.absmax[key].device)
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
        """The rows of expert input ``key`` in chunks of ``chunk_rows``, so a down projection's intermediate
        activations are never held for all of the expert's tokens at once."""
        e = self.expert_of(key)
        gate, up, down = (f"{self.prefix}{e}.{n}.weight" for n in self.names)
        tok = (self.ids == e).any(-1).nonzero().squeeze(-1)
        is_down = key.endswith(f".{self.names[2]}")
        wg, wu = (self.source[gate].float(), self.source[up].float()) if is_down else (None, None)
        for c in range(0, tok.numel(), self.chunk_rows):
            x = self.rows[tok[c : c + self.chunk_rows]]
            yield F.silu(F.linear(x, wg)) * F.linear(x, wu) if is_down else x
