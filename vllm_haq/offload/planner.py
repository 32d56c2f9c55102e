"""Decisions of the offload engine: slots per layer, what to do with each miss, what to evict.

Policies:

* ``haq``    — slots split across layers by expected hit-rate gain; each step, misses
  (largest first) go to whichever of the copy engine and the CPU workers finishes
  them first given the work already queued on each (cost model); eviction by a
  score of frequency (prior + online), recency and predicted next use; the
  prefetcher fills layer l+1 from transition statistics once layer l has routed.
* ``lru``    — every miss is fetched on demand, the least recently used slot is
  evicted (Mixtral-offloading's expert cache, without its speculative loading).
* ``static`` — the hottest experts (routing statistics) are placed once and never
  evicted; every miss is computed on the CPU workers (Fiddler).

With 0 slots every routed expert is computed on the CPU, whatever the policy.
"""

from __future__ import annotations

import heapq
from typing import Callable

import torch

from vllm_haq.offload.cost import CostModel

RECENCY_DECAY = 0.8  # per step of the layer
W_FREQUENCY, W_RECENCY, W_PREDICTED = 1.0, 0.5, 1.0
EVICTION_HORIZON_STEPS = 1 / (1 - RECENCY_DECAY)  # steps an eviction is paid for (the recency time scale)


def allocate_slots(total: int, shares: torch.Tensor, policy: str) -> list[int]:
    """Split ``total`` cache slots over layers (``shares`` [L, E] expected route shares).

    ``haq``/``static``: greedy by marginal hit-rate gain — the k-th slot of a layer is
    worth that layer's k-th largest expert share. ``lru``: as even as possible.
    """
    num_layers, num_experts = shares.shape
    total = max(0, min(total, num_layers * num_experts))
    if policy == "lru":
        base, extra = divmod(total, num_layers)
        return [base + (1 if i < extra else 0) for i in range(num_layers)]
    ranked = torch.sort(shares, dim=1, descending=True).values.tolist()
    slots = [0] * num_layers
    heap = [(-ranked[layer][0], layer) for layer in range(num_layers)]
    heapq.heapify(heap)
    for _ in range(total):
        _, layer = heapq.heappop(heap)
        slots[layer] += 1
        if slots[layer] < num_experts:
            heapq.heappush(heap, (-ranked[layer][slots[layer]] + 1e-12 * layer, layer))
    return slots


def split_misses(misses: dict[int, int], cost: CostModel, policy: str, num_slots: int,
                 device_busy_s: float = 0.0, pcie_busy_s: float = 0.0,
                 admission: Callable[[], tuple[dict[int, float], list[float]]] | None = None,
                 ) -> tuple[list[int], list[int]]:
    """(experts to fetch, experts to compute on CPU) for this step's ``misses`` {expert: tokens}.

    ``haq``: list scheduling, largest miss first, each to the side where it finishes earlier —
    fetched: after the copies before it, then computed on the device once the device is free
    (``device_busy_s``: the hits, computed while the first copies run); on the CPU: after the
    CPU jobs before it. So the step's makespan over copy engine, device and CPU workers is
    balanced with the calibrated costs, whatever the hardware's ratios. A fetch also evicts:
    with ``admission`` (called once, when a fetch is first worth considering: the keep-values
    of the misses and of the residents, lowest first), the i-th fetch pays for evicting a more
    valuable expert than it brings: ``(victim - incoming)`` uses per step over the keep-values'
    horizon, times a miss's cost (a later wave evicts this step's earlier fetches) — so a step
    does not churn the cache for a cold expert the CPU serves about as fast (cache admission),
    while a miss with many tokens (prefill) is still fetched.
    """
    order = sorted(misses, key=lambda e: (-misses[e], e))
    if not misses:
        return [], []
    if num_slots == 0 or policy == "static":
        return [], order
    if policy == "lru":
        return order, []
    fetch, cpu = [], []
    pcie_t, device_t, cpu_t = pcie_busy_s, device_busy_s, 0.0
    typical_miss_s = cost.miss_s(max(1, round(sum(misses.values()) / len(misses))))
    keep: dict[int, float] | None = None
    victims: list[float] = []
    for e in order:
        fetched_done = max(device_t, pcie_t + cost.fetch_s()) + cost.device_s(misses[e])
        cpu_done = cpu_t + cost.cpu_s(misses[e])
        penalty = 0.0
        if admission is not None and fetched_done <= cpu_done:
            if keep is None:
                keep, victims = admission()
            i = len(fetch)
            if i < len(victims):
                victim = victims[i]
            else:  # a later wave evicts this step's earlier fetches
                victim = keep[fetch[(i - len(victims)) % len(fetch)]] if fetch else 0.0
            penalty = max(0.0, victim - keep[e]) * EVICTION_HORIZON_STEPS * typical_miss_s
        if fetched_done + penalty <= cpu_done:
            fetch.append(e)
            pcie_t, device_t = pcie_t + cost.fetch_s(), fetched_done
        else:
            cpu.append(e)
            cpu_t = cpu_done
    return fetch, cpu


def eviction_scores(share: torch.Tensor, last_use: list[int], step: int, predicted: torch.Tensor | None,
                    experts: list[int]) -> list[float]:
    """Keep-value of each resident expert (higher = keep): frequency, recency, predicted next use."""
    scores = []
    for e, used in zip(experts, last_use):
        recency = RECENCY_DECAY ** max(step - used, 0) if used >= 0 else 0.0
        p = float(predicted[e]) if predicted is not None else 0.0
        scores.append(W_FREQUENCY * float(share[e]) * len(share) / 2 + W_RECENCY * recency + W_PREDICTED * p)
    return scores
