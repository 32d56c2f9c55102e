"""Decisions of the offload engine: slots per layer, what to do with each miss, what to evict.

The policies that use them are objects in :mod:`vllm_haq.offload.policy` (``haq``, ``lru``, ``static``);
these are the computations they share: slot allocation (greedy by expected hit-rate gain, or even), the
list scheduling of misses over copy engine, device and CPU with cache admission, and the keep-values that
choose eviction victims.
"""

from __future__ import annotations

import heapq
from typing import Callable

import torch

from vllm_haq.offload.cost import CostModel

RECENCY_DECAY = 0.8  # per step of the layer
W_FREQUENCY, W_RECENCY, W_PREDICTED = 1.0, 0.5, 1.0
EVICTION_HORIZON_STEPS = 1 / (1 - RECENCY_DECAY)  # steps an eviction is paid for (the recency time scale)


def greedy_slots(total: int, shares: torch.Tensor) -> list[int]:
    """Split ``total`` cache slots over layers (``shares`` [L, E] expected route shares) greedily by marginal
    hit-rate gain: the k-th slot of a layer is worth that layer's k-th largest expert share."""
    num_layers, num_experts = shares.shape
    total = max(0, min(total, num_layers * num_experts))
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


def even_slots(total: int, num_layers: int, num_experts: int) -> list[int]:
    """``total`` slots spread as evenly as possible over the layers."""
    base, extra = divmod(max(0, min(total, num_layers * num_experts)), num_layers)
    return [base + (1 if i < extra else 0) for i in range(num_layers)]


def list_schedule(misses: dict[int, int], order: list[int], cost: CostModel, device_busy_s: float = 0.0,
                  admission: Callable[[], tuple[dict[int, float], list[float]]] | None = None,
                  pcie_busy_s: float = 0.0) -> tuple[list[int], list[int]]:
    """(experts to fetch, experts to compute on CPU) for this step's ``misses`` {expert: tokens}, visited in
    ``order`` (largest first).

    List scheduling: each miss goes to the side where it finishes earlier —
    fetched: after the copies before it, then computed on the device once the device is free
    (``device_busy_s``: the hits, computed while the first copies run); on the CPU: after the
    CPU jobs before it (the first CPU miss also pays the call's fixed cost, ``cost.cpu_call_s``: a
    layer-step's CPU experts are one call). So the step's makespan over copy engine, device and CPU workers is
    balanced with the calibrated costs, whatever the hardware's ratios. A fetch also evicts:
    with ``admission`` (called once, when a fetch is first worth considering: the keep-values
    of the misses and of the residents, lowest first), the i-th fetch pays for evicting a more
    valuable expert than it brings: ``(victim - incoming)`` uses per step over the keep-values'
    horizon, times a miss's cost (a later wave evicts this step's earlier fetches) — so a step
    does not churn the cache for a cold expert the CPU serves about as fast (cache admission),
    while a miss with many tokens (prefill) is still fetched.
    """
    if not misses:
        return [], []
    fetch, cpu = [], []
    pcie_t, device_t, cpu_t = pcie_busy_s, device_busy_s, 0.0
    typical_miss_s = cost.miss_s(max(1, round(sum(misses.values()) / len(misses))))
    keep: dict[int, float] | None = None
    victims: list[float] = []
    for e in order:
        fetched_done = max(device_t, pcie_t + cost.fetch_s()) + cost.device_s(misses[e])
        cpu_done = (cpu_t if cpu else cost.cpu_call_s) + cost.cpu_s(misses[e])
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
    """Keep-value of each resident expert (higher = keep): frequency, recency, predicted next use.

    Read as Python lists once: indexing the tensors per expert cost ~70 us a call at 128 experts, and a step
    calls this per fetch, on the model thread."""
    share_of = share.tolist()
    predicted_of = predicted.tolist() if predicted is not None else None
    scores = []
    for e, used in zip(experts, last_use):
        recency = RECENCY_DECAY ** max(step - used, 0) if used >= 0 else 0.0
        p = predicted_of[e] if predicted_of is not None else 0.0
        scores.append(W_FREQUENCY * share_of[e] * len(share_of) / 2 + W_RECENCY * recency + W_PREDICTED * p)
    return scores
