"""Serving policies as objects: the engine asks its policy, never tests a policy name.

A policy decides four things; the engine keeps the mechanics (copies, waves, CPU jobs, statistics):

* :meth:`Policy.slots` — how a cache budget is split over layers (at start);
* :meth:`Policy.split` — which of a step's misses are fetched and which the CPU computes;
* :meth:`Policy.victim` — which slot a fetch overwrites (or none worth giving up);
* :attr:`Policy.prefetches` — whether layer l+1's likely experts are copied once layer l has routed.

``haq`` (this project's planner), ``lru`` (Mixtral-offloading's on-demand cache) and ``static`` (Fiddler: the
hottest experts placed once, misses on the CPU) are the three users choose from (``OffloadConfig.policy``).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from vllm_haq.offload.cost import CostModel
from vllm_haq.offload.planner import eviction_scores, even_slots, greedy_slots, list_schedule

Admission = Callable[[], tuple[dict[int, float], list[float]]]


class SlotState(Protocol):
    """What a policy reads of a layer's cache (the engine's ``_Layer``)."""

    last_use: list[int]  # per slot: the layer step it was last computed at (-1: never)
    expert_of_slot: list[int]  # per slot: its expert (-1: empty)
    predicted: torch.Tensor | None  # P(used at this layer's next step) from the layer before, or None


class Policy:
    name = ""
    prefetches = False

    def slots(self, total: int, shares: torch.Tensor) -> list[int]:
        """Cache slots per layer for ``total`` slots (``shares`` [L, E]: expected route shares)."""
        return greedy_slots(total, shares)

    def split(self, misses: dict[int, int], cost: CostModel, num_slots: int, device_busy_s: float = 0.0,
              admission: Admission | None = None) -> tuple[list[int], list[int]]:
        """(experts to fetch, experts for the CPU) of a step's ``misses`` {expert: tokens}, largest first."""
        raise NotImplementedError

    def victim(self, layer: SlotState, candidates: list[int], step: int, share: Callable[[], torch.Tensor],
               keep_above: float | None = None) -> int | None:
        """The slot among ``candidates`` (non-empty) a fetch overwrites; None when every candidate's keep-value
        is at least ``keep_above`` (a prefetch must not evict something worth more than it brings)."""
        scores = eviction_scores(share(), [layer.last_use[s] for s in candidates], step, layer.predicted,
                                 [layer.expert_of_slot[s] for s in candidates])
        best = min(range(len(candidates)), key=lambda i: (scores[i], candidates[i]))
        if keep_above is not None and scores[best] >= keep_above:
            return None
        return candidates[best]


def _largest_first(misses: dict[int, int]) -> list[int]:
    return sorted(misses, key=lambda e: (-misses[e], e))


class HaqPolicy(Policy):
    """Slots by expected hit-rate gain; misses list-scheduled over copy engine, device and CPU with the cost
    model and cache admission; eviction by frequency, recency and predicted next use; prefetching."""

    name, prefetches = "haq", True

    def split(self, misses, cost, num_slots, device_busy_s=0.0, admission=None):
        if num_slots == 0:
            return [], _largest_first(misses)
        return list_schedule(misses, _largest_first(misses), cost, device_busy_s, admission)


class LruPolicy(Policy):
    """Every miss fetched on demand into the least recently used slot; slots spread evenly over layers."""

    name = "lru"

    def slots(self, total, shares):
        return even_slots(total, shares.shape[0], shares.shape[1])

    def split(self, misses, cost, num_slots, device_busy_s=0.0, admission=None):
        order = _largest_first(misses)
        return (order, []) if num_slots else ([], order)

    def victim(self, layer, candidates, step, share, keep_above=None):
        return min(candidates, key=lambda s: (layer.last_use[s], s))


class StaticPolicy(Policy):
    """The hottest experts placed once (slots by expected gain) and never evicted; misses on the CPU."""

    name = "static"

    def split(self, misses, cost, num_slots, device_busy_s=0.0, admission=None):
        return [], _largest_first(misses)


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (HaqPolicy, LruPolicy, StaticPolicy)}
POLICY_NAMES = tuple(POLICIES)  # what OffloadConfig accepts


def make_policy(name: str) -> Policy:
    """The policy called ``name`` (``OffloadConfig`` has validated it)."""
    if name not in POLICIES:
        raise ValueError(f"offload policy {name!r} is not one of {sorted(POLICIES)}")
    return POLICIES[name]()
