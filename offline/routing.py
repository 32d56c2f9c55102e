"""Expert routing statistics gathered while calibration text flows through the model."""

from __future__ import annotations

import torch


class RoutingStats:
    """Per-MoE-layer expert counts and layer-to-next-layer transition counts.

    ``expert_counts[l, e]``: routes of calibration tokens to expert e at MoE layer l.
    ``transition_counts[l, a, b]``: (token, a at layer l, b at layer l+1) triples —
    how often a token routed to a at one MoE layer is routed to b at the next.
    """

    def __init__(self, layer_indices: list[int], num_experts: int):
        self.layer_indices = list(layer_indices)
        self.num_experts = num_experts
        n = len(layer_indices)
        self.expert_counts = torch.zeros(n, num_experts, dtype=torch.int64)
        self.transition_counts = torch.zeros(max(n - 1, 0), num_experts, num_experts, dtype=torch.int64)
        self.tokens = 0
        self._prev: torch.Tensor | None = None  # [N, E] route indicator of the previous MoE layer

    def record(self, layer_index: int, topk_ids: torch.Tensor) -> None:
        """Add one MoE layer's routes; layers must arrive in order, each covering all tokens."""
        pos = self.layer_indices.index(layer_index)
        routed = torch.zeros(topk_ids.shape[0], self.num_experts, dtype=torch.int64)
        routed.scatter_(1, topk_ids.long(), 1)
        self.expert_counts[pos] += routed.sum(0)
        if pos == 0:
            self.tokens = topk_ids.shape[0]
        elif self._prev is not None:
            self.transition_counts[pos - 1] += self._prev.t() @ routed
        self._prev = routed

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {
            "expert_counts": self.expert_counts,
            "transition_counts": self.transition_counts,
            "layer_indices": torch.tensor(self.layer_indices, dtype=torch.int64),
        }
        if self._prev is not None:
            out["_prev"] = self._prev
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor], tokens: int) -> None:
        self.expert_counts = state["expert_counts"].clone()
        self.transition_counts = state["transition_counts"].clone()
        self._prev = state.get("_prev")
        self.tokens = tokens

    def export(self) -> dict[str, torch.Tensor]:
        """The tensors of ``haq_routing.safetensors`` (see vllm_haq.format)."""
        return {k: v.contiguous() for k, v in self.state_dict().items() if not k.startswith("_")}
