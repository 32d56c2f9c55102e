"""Int8 mixture-of-experts forward over per-expert prepared GEMMs.

Tokens are grouped by expert (one sort), each expert runs its SwiGLU MLP as two
W8A8 GEMMs (``w13`` = [w1; w3] fused, then ``w2``), and every route's
router-weighted result is written to its own row of a float32 route buffer
[M, k, H], which is then summed over k in top-k order. Because each route has
its own row, the result does not depend on which experts were computed where or
in what order — the offload engine computes some experts on cache slots and
others on CPU workers, in parallel, and still matches the all-resident forward
bit for bit where both run the same float arithmetic (the CPU build; the int8
products are exact integers on every backend). On CUDA the slot experts' SiLU,
exp and division (Triton/CUDA approximations) and the CPU experts' are not the
same float functions: a bf16 intermediate, and so the int8 scale of the down
projection's input, may round one ulp apart. GPU checks state a tolerance
(``benchmarks/gpucheck``: 2e-2 relative for the engine), never bit equality.
"""

from __future__ import annotations

from typing import Callable, Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F

from vllm_haq.kernels import cpu_int8

Gemm = Callable[[torch.Tensor], torch.Tensor]


def group_by_expert(topk_ids: torch.Tensor, num_experts: int):
    """(token index, top-k slot, per-expert counts) of all routes, sorted by expert."""
    flat = topk_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    k = topk_ids.shape[1]
    return order // k, order % k, counts


class RouteGroups:
    """The routes of one forward step grouped by expert (host-side counts, computed once).

    One device->host transfer per step: the routed ids (on CUDA every further host read — ``int(min)``,
    ``bincount``'s size probe, ``.tolist()`` of a device tensor — would be another blocking sync per MoE layer
    and step). Everything else is built on the host from that copy: a decode step's few routes by plain
    Python (a handful of torch ops would cost more than the experts of a small MoE), larger batches by torch
    on host tensors. ``tok``/``slot`` (on the ids' device) follow as one host-to-device copy.
    """

    PY_ROUTES = 256  # up to this many routes per step, grouped in Python

    def __init__(self, topk_ids: torch.Tensor, num_experts: int, carry: Sequence[torch.Tensor] = ()):
        """``carry``: tensors the host will need too (the offload engine's activations and router weights
        for its CPU experts), brought along in the same transfer as float32 host copies (``carried``)."""
        self.top_k = k = topk_ids.shape[1]
        if carry:
            host, self.carried = _one_transfer(topk_ids, carry)
        else:
            host = topk_ids.to("cpu") if topk_ids.device.type != "cpu" else topk_ids  # the one transfer
            self.carried = None
        self.ids_host = host.long()  # int64 [M, k], for statistics and planning
        flat = self.ids_host.reshape(-1)
        self._rows: list[list[int]] | None = None
        if flat.numel() <= self.PY_ROUTES:
            ids = flat.tolist()
            self._rows = [ids[i : i + k] for i in range(0, len(ids), k)]
            _check_range(min(ids, default=0), max(ids, default=0), num_experts)
            counts = [0] * num_experts
            for e in ids:
                counts[e] += 1
            order_list = sorted(range(len(ids)), key=ids.__getitem__)  # stable
            self._host_routes = tuple(torch.tensor([[r // k for r in order_list], [r % k for r in order_list]],
                                                   dtype=torch.int64))
        else:
            _check_range(int(flat.min()), int(flat.max()), num_experts)
            counts = torch.bincount(flat, minlength=num_experts).tolist()
            order = torch.argsort(flat, stable=True)
            self._host_routes = (order // k, order % k)
        self.counts = counts
        if topk_ids.device.type == "cpu":
            self.tok, self.slot = self._host_routes
        else:
            self.tok, self.slot = (t.to(topk_ids.device, non_blocking=True) for t in self._host_routes)
        self.starts, start = [], 0
        for n in counts:
            self.starts.append(start)
            start += n
        self.routed = {e: n for e, n in enumerate(counts) if n}  # expert -> routed tokens

    def id_rows(self) -> list[list[int]]:
        """Each token's routed expert ids (host lists)."""
        if self._rows is None:
            self._rows = self.ids_host.tolist()
        return self._rows

    def host_routes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(token index, top-k position) of every route sorted by expert, as host tensors (the CPU kernel's
        route lists): the order of ``tok``/``slot``."""
        return self._host_routes

    def routes_of(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(token indices, top-k positions) of the routes to ``expert``."""
        a, n = self.starts[expert], self.counts[expert]
        return self.tok[a : a + n], self.slot[a : a + n]


def _one_transfer(ids: torch.Tensor, carry: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``ids`` (as int64) and ``carry`` (as float32) packed as bytes, moved to the host in one copy, unpacked."""
    parts = [ids.reshape(-1).long()] + [t.detach().reshape(-1).float() for t in carry]
    host = torch.cat([p.contiguous().view(torch.uint8) for p in parts]).to("cpu")
    out, at = [], 0
    for p, like in zip(parts, [ids, *carry]):
        n = p.numel() * p.element_size()
        out.append(host[at : at + n].view(p.dtype).view(like.shape))
        at += n
    return out[0], out[1:]


def _check_range(lo: int, hi: int, num_experts: int) -> None:
    if lo < 0 or hi >= num_experts:
        raise ValueError(f"topk_ids out of range [0, {num_experts}): min {lo}, max {hi}")


def all_shard_route_amax(inters: Mapping[int, tuple[torch.Tensor, Gemm]], groups: RouteGroups, num_tokens: int,
                         shard_amax: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> torch.Tensor:
    """Tensor parallelism: each route's down-projection input max over all shards, [M·k, 1] in route order
    (row ``t·k + j``). ``inters``: expert -> (its routes' down-projection inputs, its w2 ScaledInt8Gemm). The
    exchange has the same size and order on every rank, whatever each rank computed where."""
    amax = torch.zeros(num_tokens * groups.top_k, 1, dtype=torch.float32, device=device)
    for e, (h, w2) in inters.items():
        amax[route_rows(groups, e)] = w2.token_amax(h).to(device)
    return shard_amax(amax)


def route_rows(groups: RouteGroups, expert: int) -> torch.Tensor:
    """Rows ``t·k + j`` of ``expert``'s routes in a per-route [M·k, ...] buffer."""
    t, j = groups.routes_of(expert)
    return t * groups.top_k + j


def expert_inter(x: torch.Tensor, w13: Gemm) -> torch.Tensor:
    """``silu(w1 x) * w3 x`` for one expert: the down projection's input."""
    gate_up = w13(x)
    inter = gate_up.shape[-1] // 2
    return F.silu(gate_up[:, :inter]) * gate_up[:, inter:]


def expert_mlp(x: torch.Tensor, w13: Gemm, w2: Gemm) -> torch.Tensor:
    """``w2(silu(w1 x) * w3 x)`` for one expert, float32 [n, H]."""
    return w2(expert_inter(x, w13)).float()


def expert_routes(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    groups: RouteGroups,
    expert: int,
    w13: Gemm,
    w2: Gemm,
    routes: torch.Tensor,
) -> int:
    """Write ``weight * mlp(x[t])`` of every route (t, j) to ``expert`` into ``routes[t, j]``.

    Returns the number of tokens computed. Disjoint experts write disjoint rows, so
    different threads may fill one buffer concurrently.
    """
    t, j = groups.routes_of(expert)
    if t.numel() == 0:
        return 0
    write_routes(routes, topk_weights, groups, expert, expert_mlp(x[t], w13, w2))
    return t.numel()


def write_routes(routes: torch.Tensor, topk_weights: torch.Tensor, groups: RouteGroups, expert: int,
                 y: torch.Tensor) -> None:
    """Store ``weight * y`` (``y``: ``expert``'s MLP output for its routes, any device) in each route's row."""
    t, j = groups.routes_of(expert)
    routes[t, j] = y.to(routes.device) * topk_weights[t, j].float().unsqueeze(-1)


def new_route_buffer(x: torch.Tensor, top_k: int) -> torch.Tensor:
    return torch.zeros(x.shape[0], top_k, x.shape[1], dtype=torch.float32, device=x.device)


def int8_moe_forward(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    w13: Sequence[Gemm | None] | Mapping[int, Gemm],
    w2: Sequence[Gemm | None] | Mapping[int, Gemm],
    out: torch.Tensor | None = None,
    shard_amax: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sum over routes of ``weight * w2(silu(w1 x) * w3 x)``, all experts resident.

    ``out`` (float32 [M, H]) is accumulated into when given. Returns float32 [M, H].
    ``shard_amax``: the experts' intermediate dimension is a tensor-parallel shard (``w2`` are
    ScaledInt8Gemm built with the same ``shard_amax``); every route's down-projection input is
    quantized with its max over all shards, exchanged in one call of fixed size [M·k, 1] per step.
    """
    groups = RouteGroups(topk_ids, len(w13))
    routes = new_route_buffer(x, topk_ids.shape[1])
    for e in groups.routed:
        if w13[e] is None or w2[e] is None:
            raise RuntimeError(f"expert {e} has routed tokens but no resident weights")
    if shard_amax is None:
        for e in groups.routed:
            expert_routes(x, topk_weights, groups, e, w13[e], w2[e], routes)
    else:
        inters = {e: (expert_inter(x[groups.routes_of(e)[0]], w13[e]), w2[e]) for e in groups.routed}
        amax = all_shard_route_amax(inters, groups, x.shape[0], shard_amax, x.device)
        for e, (h, g2) in inters.items():
            write_routes(routes, topk_weights, groups, e, g2(h, amax=amax[route_rows(groups, e)]).float())
    total = routes.sum(1)
    return total if out is None else out.add_(total)


class ExpertStack(Protocol):
    """Stacked experts as the CPU kernel reads them (``vllm_haq.offload.ExpertTensors`` is one): int8 ``w13``
    [N, 2I, H] and ``w2`` [N, H, I], float32 scales [N, 2I, 1] / [N, H, 1], optional per-expert input
    smoothing [N, H] and the block-Hadamard order of the down projections' input."""

    w13: torch.Tensor
    w13_scale: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor
    smooth: torch.Tensor | None
    down_rotation: int | None


def cpu_fused_ok(w13: torch.Tensor) -> bool:
    """Whether the CPU kernel serves experts stacked in ``w13`` in one call per step: host tensors and the
    kernel built (else the per-expert loop of :func:`int8_moe_forward`, with the reason logged once)."""
    return w13.device.type == "cpu" and cpu_int8.available()


def cpu_expert_routes(x: torch.Tensor, topk_weights: torch.Tensor, groups: RouteGroups, stack: ExpertStack,
                      experts: Sequence[int], routes: torch.Tensor, index: Sequence[int] | None = None,
                      threads: int = 0, build=None) -> None:
    """Write every route of ``experts`` into ``routes`` [M, k, H] (float32, host) in one call of the CPU
    kernel (:func:`vllm_haq.kernels.cpu_int8.moe_routes`; ``build``: another of its builds, for benchmarks).
    ``index``: each expert's row in ``stack`` (its cache slot), by default the expert id itself. ``x`` and
    ``topk_weights`` are host tensors."""
    if not experts:
        return
    tok, slot = groups.host_routes()
    cpu_int8.moe_routes(x.float().contiguous(), routes, topk_weights.float().contiguous(), stack.w13,
                        stack.w13_scale, stack.w2, stack.w2_scale, stack.smooth, tok, slot,
                        list(experts) if index is None else list(index), [groups.starts[e] for e in experts],
                        [groups.counts[e] for e in experts], stack.down_rotation, threads, build)


def cpu_moe_forward(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    stack: ExpertStack) -> torch.Tensor:
    """All experts resident in host memory: :func:`int8_moe_forward`'s result (float32 [M, H]) from one
    kernel call per step instead of a Python loop over experts."""
    groups = RouteGroups(topk_ids, stack.w13.shape[0])
    routes = new_route_buffer(x, topk_ids.shape[1])
    cpu_expert_routes(x, topk_weights, groups, stack, list(groups.routed), routes)
    return routes.sum(1)
