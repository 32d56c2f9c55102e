"""Routing statistics the planner predicts with, and the counters users read.

Offline statistics (the checkpoint's ``haq_routing.safetensors``: expert counts per
MoE layer and layer-to-next-layer transition counts) are the prior; online counts
of served steps refine them with exponential decay, so a workload that routes
differently from the calibration text takes over within a few hundred steps.
Warm-up and profiling passes are not recorded (the caller says which steps count).

Beside the decayed counts the planner uses, the exact (undecayed) counts of every served
step are kept for ``haq stats --live``: :meth:`RoutingStatistics.served` is written as the
``"routing"`` key of the engine's ``stats_file``, with the schema of the checkpoint's
routing statistics (see :data:`LIVE_ROUTING_KEY`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ONLINE_DECAY = 0.995  # per served step; half-life ~140 steps
PRIOR_WEIGHT = 64.0  # the prior counts as this many routed tokens per layer
# Key of the engine's stats_file JSON holding the served routing counts:
# {"layer_indices": [L], "tokens": [L] (tokens routed per MoE layer), "expert_counts": [L][E],
#  "transition_counts": [L-1][E][E] (a token's routes at MoE layer l -> its routes at layer l+1)}
LIVE_ROUTING_KEY = "routing"


class RoutingStatistics:
    """Expert shares per layer and next-layer predictions, from prior counts plus decayed online counts."""

    def __init__(self, num_layers: int, num_experts: int, counts: torch.Tensor | None = None,
                 transitions: torch.Tensor | None = None):
        self.num_layers, self.num_experts = num_layers, num_experts
        uniform = torch.full((num_layers, num_experts), 1.0 / num_experts, dtype=torch.float64)
        if counts is not None:
            c = counts.double()
            prior = c / c.sum(1, keepdim=True).clamp_min(1)
            prior[c.sum(1) == 0] = 1.0 / num_experts
        else:
            prior = uniform
        self.prior_share = prior
        self.has_prior = counts is not None
        t = torch.full((max(num_layers - 1, 0), num_experts, num_experts), 1.0 / num_experts, dtype=torch.float64)
        if transitions is not None:
            tr = transitions.double()
            rows = tr.sum(2, keepdim=True)
            t = torch.where(rows > 0, tr / rows.clamp_min(1), t)
        self.prior_transition = t  # [l, a, b]: P(b at layer l+1 | a at layer l)
        self.online = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.online_transition = torch.zeros_like(t)
        # exact counts of all served steps (for haq stats --live; the planner reads the decayed ones)
        self.served_tokens = torch.zeros(num_layers, dtype=torch.int64)
        self.served_counts = torch.zeros(num_layers, num_experts, dtype=torch.int64)
        self.served_transitions = torch.zeros(t.shape, dtype=torch.int64)
        self._pending: list[tuple[int, list[int], list[list[int]] | None, list[list[int]]]] = []

    def record(self, layer: int, counts: list[int], prev_ids: list[list[int]] | None, ids: list[list[int]]) -> None:
        """Add one served step of layer ``layer``: ``counts`` [E] routes per expert, ``ids`` each token's routed
        experts and ``prev_ids`` the same tokens' experts at the layer before (None: no transition).

        Buffered as Python lists and folded into the tensors once per model step (every ``num_layers``
        records): a handful of torch ops per MoE layer-step would cost more than a small MoE's experts. The
        planner reads statistics at most one model step old; :meth:`flush` brings them up to date."""
        self._pending.append((layer, counts, prev_ids, ids))
        if len(self._pending) >= self.num_layers:
            self.flush()

    def flush(self) -> None:
        """Fold the buffered steps in: per layer, ``online = decay^n · online + Σ decay^(n-1-i) · counts_i``
        (the same sums as decaying at every step), transitions alike, exact counts added as integers."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        layers, weights, counts, tokens = [], [], [], []
        trans: dict[tuple[int, int, int], list] = {}  # (tokens, k before, k after) -> [(layer-1, weight, prev, ids)]
        seen: dict[int, int] = {}
        seen_t: dict[int, int] = {}
        for layer, c, prev, ids in reversed(pending):  # newest first: a record's weight is decay^(newer records)
            layers.append(layer)
            weights.append(ONLINE_DECAY ** seen.get(layer, 0))
            seen[layer] = seen.get(layer, 0) + 1
            counts.append(c)
            tokens.append(len(ids))
            if layer > 0 and prev is not None and len(prev) == len(ids) and ids:
                w = ONLINE_DECAY ** seen_t.get(layer - 1, 0)
                seen_t[layer - 1] = seen_t.get(layer - 1, 0) + 1
                trans.setdefault((len(ids), len(prev[0]), len(ids[0])), []).append((layer - 1, w, prev, ids))
        idx = torch.tensor(layers, dtype=torch.int64)
        c = torch.tensor(counts, dtype=torch.float64)
        self.online.mul_(torch.tensor([ONLINE_DECAY ** seen.get(i, 0) for i in range(self.num_layers)],
                                      dtype=torch.float64).unsqueeze(1))
        self.online.index_add_(0, idx, c * torch.tensor(weights, dtype=torch.float64).unsqueeze(1))
        self.served_counts.index_add_(0, idx, c.long())
        self.served_tokens.index_add_(0, idx, torch.tensor(tokens, dtype=torch.int64))
        if trans:
            decay = [ONLINE_DECAY ** seen_t.get(i, 0) for i in range(self.num_layers - 1)]
            self.online_transition.mul_(torch.tensor(decay, dtype=torch.float64).view(-1, 1, 1))
        for (m, ka, kb), records in trans.items():
            self._add_pairs(m, ka, kb, records)

    def _add_pairs(self, m: int, ka: int, kb: int, records: list) -> None:
        """Every (expert before, expert after) pair of each token, for records of one shape, in one index_put."""
        r = len(records)
        shape = (r, m, ka, kb)
        layer = torch.tensor([rec[0] for rec in records], dtype=torch.int64).view(r, 1, 1, 1).expand(shape)
        weight = torch.tensor([rec[1] for rec in records], dtype=torch.float64).view(r, 1, 1, 1).expand(shape)
        before = torch.tensor([rec[2] for rec in records], dtype=torch.int64).view(r, m, ka, 1).expand(shape)
        after = torch.tensor([rec[3] for rec in records], dtype=torch.int64).view(r, m, 1, kb).expand(shape)
        where = (layer.reshape(-1), before.reshape(-1), after.reshape(-1))
        self.online_transition.index_put_(where, weight.reshape(-1), accumulate=True)
        self.served_transitions.index_put_(where, torch.ones(where[0].numel(), dtype=torch.int64), accumulate=True)

    def served(self, layer_indices: list[int]) -> dict:
        """Exact routing counts of all served steps as JSON-able lists (``LIVE_ROUTING_KEY`` schema)."""
        self.flush()
        return {
            "layer_indices": [int(i) for i in layer_indices],
            "tokens": self.served_tokens.tolist(),
            "expert_counts": self.served_counts.tolist(),
            "transition_counts": self.served_transitions.tolist(),
        }

    def share(self, layer: int) -> torch.Tensor:
        """Expected share of routes per expert at ``layer`` (sums to 1)."""
        online = self.online[layer]
        return (self.prior_share[layer] * PRIOR_WEIGHT + online) / (PRIOR_WEIGHT + online.sum())

    def predict_next(self, layer: int, counts: torch.Tensor) -> torch.Tensor:
        """P(expert e is used at layer+1 by these tokens) from this step's ``counts`` at ``layer``."""
        prior = self.prior_transition[layer] * PRIOR_WEIGHT
        online = self.online_transition[layer]
        trans = (prior + online) / (PRIOR_WEIGHT + online.sum(1, keepdim=True))
        c = counts.double()
        if c.sum() == 0:
            return self.share(layer + 1)
        return (c @ trans) / c.sum()


@dataclass
class OffloadCounters:
    """What the engine did in served (non-warm-up) steps."""

    steps: int = 0  # layer forward calls counted
    hits: int = 0  # routed experts found in the device cache
    misses: int = 0  # routed experts not in the cache
    fetches: int = 0  # misses copied into a cache slot on demand
    prefetches: int = 0  # experts copied ahead of use by the prefetcher
    prefetch_hits: int = 0  # prefetched experts that were routed at the step they were fetched for
    cpu_experts: int = 0  # misses computed by CPU workers
    cpu_expert_tokens: int = 0  # tokens those CPU computations covered
    bytes_h2d: int = 0  # expert bytes copied host -> device (fetches + prefetches)
    recovered_faults: int = 0  # failed CPU jobs or copies whose expert was recomputed from host memory
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        routed = self.hits + self.misses
        d["hit_rate"] = round(self.hits / routed, 4) if routed else None
        d["prefetch_accuracy"] = round(self.prefetch_hits / self.prefetches, 4) if self.prefetches else None
        d.update(self.extra)
        return d
