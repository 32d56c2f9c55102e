"""Int8 mixture-of-experts forward over per-expert prepared GEMMs.

Tokens are grouped by expert (one sort), each expert runs its SwiGLU MLP as two
W8A8 GEMMs (``w13`` = [w1; w3] fused, then ``w2``), and the router-weighted
results are accumulated in float32. The expert → GEMM lookup is a list that may
hold ``None`` for experts that are not resident (the offload engine serves those).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

Gemm = Callable[[torch.Tensor], torch.Tensor]


def group_by_expert(topk_ids: torch.Tensor, num_experts: int):
    """(token index, top-k slot, per-expert counts) of all routes, sorted by expert."""
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    k = topk_ids.shape[1]
    return order // k, order % k, counts


def int8_moe_forward(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: Sequence[Gemm | None],
    w2: Sequence[Gemm | None],
    experts: Sequence[int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over routes of ``weight * w2(silu(w1 x) * w3 x)`` for the experts in ``experts``.

    ``out`` (float32 [M, H]) is accumulated into when given, so callers can add
    the contributions of experts served elsewhere. Returns float32 [M, H].
    """
    m, hidden = x.shape
    if out is None:
        out = torch.zeros(m, hidden, dtype=torch.float32, device=x.device)
    tok, slot, counts = group_by_expert(topk_ids, len(w13))
    starts = torch.cumsum(counts, 0) - counts
    counts_l, starts_l = counts.tolist(), starts.tolist()
    wanted = range(len(w13)) if experts is None else experts
    for e in wanted:
        n = counts_l[e]
        if n == 0:
            continue
        if w13[e] is None or w2[e] is None:
            raise RuntimeError(f"expert {e} has routed tokens but no resident weights")
        t = tok[starts_l[e] : starts_l[e] + n]
        s = slot[starts_l[e] : starts_l[e] + n]
        gate_up = w13[e](x[t])
        inter = gate_up.shape[-1] // 2
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = w2[e](h)
        out.index_add_(0, t, y.float() * topk_weights[t, s].float().unsqueeze(-1))
    return out
