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

import torch

from vllm_haq.offload.cost import CostModel

RECENCY_DECAY = 0.8  # per step of the layer
W_FREQUENCY, W_RECENCY, W_PREDICTED = 1.0, 0.5, 1.0


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
                 pcie_busy_s: float = 0.0) -> tuple[list[int], list[int]]:
    """(experts to fetch, experts to compute on CPU) for this step's ``misses`` {expert: tokens}."""
    order = sorted(misses, key=lambda e: (-misses[e], e))
    if num_slots == 0 or policy == "static":
        return [], order
    if policy == "lru":
        return order, []
    fetch, cpu = [], []
    pcie_t, cpu_t = pcie_busy_s, 0.0
    for e in order:
        t_fetch, t_cpu = cost.fetch_s(), cost.cpu_s(misses[e])
        if pcie_t + t_fetch <= cpu_t + t_cpu:
            fetch.append(e)
            pcie_t += t_fetch
        else:
            cpu.append(e)
            cpu_t += t_cpu
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
