"""Fused int8 MoE over expert cache slots in Triton.

Same arithmetic as :func:`vllm_haq.kernels.moe.int8_moe_forward` (float32 GEMM
outputs): x is quantized per token once (every expert's w13 would quantize the
same row identically), ``h = silu(gate) * up`` is computed in float32 from the
scaled int32 products and quantized per token again before w2, and
``weight * w2(h)`` is summed over a token's routes in float32.

Steps (four or five launches, no host synchronization, so nothing waits on the GPU):

1. :func:`align_routes` (torch): routes sorted by cache slot and padded to whole
   ``block_m`` row blocks; routes whose expert has no slot (-1) are dropped. Where the
   routing is already on the host (the offload engine), :func:`align_routes_host`
   builds the same rows there and sends them in one copy: on the device the ~17 small
   torch ops cost ~0.9 ms of host time per MoE layer-step on an H200 host.
2. ``_moe_w13_swiglu_kernel``: grouped GEMM of gathered x rows with the block's
   slot of w13, gate and up tiles side by side, SwiGLU in the epilogue. At decode
   (up to ``QUANTIZE_IN_W13_TOKENS``) it quantizes its x rows itself; above, x is
   quantized per token by :func:`triton_quantize_per_token` first (one more launch).
3. :func:`triton_quantize_per_token` on the intermediate rows (rotated first when
   the checkpoint rotates the down projections' input).
4. ``_moe_w2_kernel``: grouped GEMM with w2, router weight in the epilogue, one
   output row per route; ``_moe_sum_routes_kernel`` then adds a token's routes in
   top-k order into ``out`` — deterministic, no atomics.

The number of row blocks is bounded without reading the counts on the host:
Σ_s ceil(c_s / B) ≤ floor(R / B) + min(S, R) for R routes over S slots. Blocks
past the end carry slot -1 and only write zeros.

CUDA kernels; on CPU they run under ``TRITON_INTERPRET=1`` (tests only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from vllm_haq.kernels.triton_gemm import GemmConfig
from vllm_haq.kernels.triton_quant import _quantize, _token_scale, triton_quantize_per_token
from vllm_haq.quant.int8 import _MIN_AMAX, INT8_MAX
from vllm_haq.quant.rotation import rotate


# Up to this many tokens (decode) the w13 kernel quantizes x itself: one launch fewer per MoE layer-step, where
# host launch time (~30-50 us a Triton launch) exceeds the kernels' device time. Every program re-quantizes its
# rows, which costs nothing at decode but would re-read x (inter / BLOCK_N) times over at prefill.
QUANTIZE_IN_W13_TOKENS = 32


def moe_config(num_tokens: int) -> GemmConfig:
    """Tiles for the grouped GEMMs: decode (few routes per expert) or prefill."""
    if num_tokens <= 32:
        return GemmConfig(16, 64, 128, num_warps=4, num_stages=4)
    return GemmConfig(64, 128, 128, num_warps=8, num_stages=3)


def align_routes(topk_ids: torch.Tensor, expert_to_slot: torch.Tensor, num_slots: int, block_m: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routes grouped by slot in blocks of ``block_m`` rows.

    Returns ``route_of_row`` int32 [blocks * block_m] (route = token * k + j; padding
    holds the route count R), ``slot_of_block`` int32 [blocks] (-1 past the last
    block) and ``slot_of_route`` int64 [R] (-1 where the expert is not resident).
    """
    routes = topk_ids.numel()
    device = topk_ids.device
    slot_of_route = expert_to_slot.to(device=device, dtype=torch.long)[topk_ids.reshape(-1).long()]
    key = torch.where(slot_of_route >= 0, slot_of_route, num_slots)  # skipped routes sort last
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(num_slots + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))  # bincount would synchronize on CUDA
    counts = counts[:num_slots]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    sorted_key = key[order]
    in_slot = sorted_key.clamp(max=num_slots - 1)
    rank = torch.arange(routes, device=device) - (torch.cumsum(counts, 0) - counts)[in_slot]
    blocks = routes // block_m + min(num_slots, routes)
    rows = blocks * block_m
    row = torch.where(sorted_key < num_slots, padded_end[in_slot] - padded[in_slot] + rank, rows)
    route_of_row = torch.full((rows + 1,), routes, dtype=torch.int32, device=device)
    route_of_row.scatter_(0, row, order.to(torch.int32))  # row `rows` collects the skipped routes
    block_start = torch.arange(blocks, device=device) * block_m
    slot_of_block = torch.searchsorted(padded_end, block_start, right=True)
    slot_of_block = torch.where(slot_of_block < num_slots, slot_of_block, -1).to(torch.int32)
    return route_of_row[:rows], slot_of_block, slot_of_route


HOST_PY_ROUTES = 256  # up to this many routes aligned by plain Python, more by torch on the host


def align_routes_host(topk_ids: torch.Tensor, slot_of: list[int], num_slots: int, block_m: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`align_routes` of host ``topk_ids`` [M, k] and the expert -> slot map ``slot_of`` (-1: not
    resident), computed on the host and moved to ``device`` in one non-blocking copy: the same rows (routes of
    a slot in route order, padding R, ``slot_of_block`` -1 past the last block), all three int32."""
    if topk_ids.numel() > HOST_PY_ROUTES:
        parts = align_routes(topk_ids, torch.tensor(slot_of, dtype=torch.int32), num_slots, block_m)
        sizes, packed = [p.numel() for p in parts], torch.cat([p.to(torch.int32) for p in parts])
    else:
        lists = _align_lists(topk_ids.reshape(-1).tolist(), slot_of, num_slots, block_m)
        sizes, packed = [len(v) for v in lists], torch.tensor([i for v in lists for i in v], dtype=torch.int32)
    return tuple(packed.to(device, non_blocking=True).split(sizes))  # one copy, split again on the device


def _align_lists(ids: list[int], slot_of: list[int], num_slots: int, block_m: int
                 ) -> tuple[list[int], list[int], list[int]]:
    """:func:`align_routes` of the flat routed ids in plain Python (a decode step's few routes: a handful of
    torch ops would cost more)."""
    routes = len(ids)
    slot_of_route = [slot_of[e] for e in ids]
    counts = [0] * num_slots
    for s in slot_of_route:
        if s >= 0:
            counts[s] += 1
    blocks = routes // block_m + min(num_slots, routes)
    route_of_row = [routes] * (blocks * block_m)
    fill, end, padded_end = [], 0, []
    for c in counts:
        fill.append(end)
        end += (c + block_m - 1) // block_m * block_m
        padded_end.append(end)
    for r, s in enumerate(slot_of_route):  # ascending r: the stable sort's order within a slot
        if s >= 0:
            route_of_row[fill[s]] = r
            fill[s] += 1
    slot_of_block, s = [], 0
    for b in range(blocks):  # searchsorted(padded_end, b * block_m, right=True)
        while s < num_slots and padded_end[s] <= b * block_m:
            s += 1
        slot_of_block.append(s if s < num_slots else -1)
    return route_of_row, slot_of_block, slot_of_route


@triton.jit
def _row_scales(x_ptrs, offs_k, n_cols, k_end, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                INT8_LIMIT: tl.constexpr, MIN_AMAX: tl.constexpr):
    """Per-token scales of the float rows at ``x_ptrs`` [BLOCK_M, BLOCK_K] (columns < n_cols, read up to
    ``k_end``), as _quant_per_token_kernel computes them: max |x| is exact in any order."""
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k_start in range(0, k_end, BLOCK_K):
        xv = tl.load(x_ptrs + k_start, mask=offs_k[None, :] < n_cols - k_start, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(xv), axis=1))
    return _token_scale(amax, INT8_LIMIT, MIN_AMAX)


@triton.jit
def _moe_w13_swiglu_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_ptr, h_ptr, route_of_row_ptr, slot_of_block_ptr,
    num_routes, top_k, inter, hidden,
    stride_xm, stride_w_slot, stride_wn, stride_ws_slot, stride_hm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, LIBDEVICE_EXP: tl.constexpr,
    QUANTIZE_X: tl.constexpr = False, INT8_LIMIT: tl.constexpr = 127.0, MIN_AMAX: tl.constexpr = 1e-8,
):
    # QUANTIZE_X (decode): ``xq_ptr`` is x itself (float), quantized per token here, as _quant_per_token_kernel
    # does (same operations, so the same int8 values and scales; ``xs_ptr`` unused), sparing a launch
    block = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    slot = tl.load(slot_of_block_ptr + block)
    route = tl.load(route_of_row_ptr + offs_r)
    token = tl.where(route < num_routes, route // top_k, 0).to(tl.int64)
    n_mask = offs_n < inter
    cols = tl.where(n_mask, offs_n, 0).to(tl.int64)
    w_slot = w_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_w_slot
    a_ptrs = xq_ptr + token[:, None] * stride_xm + offs_k[None, :]
    gate_ptrs = w_slot + cols[None, :] * stride_wn + offs_k[:, None]
    up_ptrs = gate_ptrs + inter * stride_wn

    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    k_end = tl.where(slot >= 0, hidden, 0)  # blocks past the end skip the GEMM and write zeros
    if QUANTIZE_X:
        x_scale = _row_scales(a_ptrs, offs_k, hidden, k_end, BLOCK_M, BLOCK_K, INT8_LIMIT, MIN_AMAX)
    else:
        x_scale = tl.load(xs_ptr + token)
    for k_start in range(0, k_end, BLOCK_K):
        k_left = hidden - k_start
        if QUANTIZE_X:
            xv = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0).to(tl.float32)
            a = _quantize(xv, x_scale[:, None], INT8_LIMIT)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
        acc_gate = tl.dot(a, tl.load(gate_ptrs, mask=offs_k[:, None] < k_left, other=0), acc_gate,
                          out_dtype=tl.int32)
        acc_up = tl.dot(a, tl.load(up_ptrs, mask=offs_k[:, None] < k_left, other=0), acc_up,
                        out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K

    ws_slot = ws_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_ws_slot
    gate = acc_gate.to(tl.float32) * x_scale[:, None] * tl.load(ws_slot + cols)[None, :]
    up = acc_up.to(tl.float32) * x_scale[:, None] * tl.load(ws_slot + inter + cols)[None, :]
    # silu as torch's CUDA kernel computes it, x / (1 + expf(-x)): libdevice's expf (tl.exp is the approximate
    # ex2.approx) and a correctly rounded division (plain / is div.full.f32). Otherwise h differs from the
    # per-expert path in the last bit, and rare int8 roundings of h flip (seen at M=4096 on an H200).
    # The interpreter has no libdevice: numpy's exp there.
    if LIBDEVICE_EXP:
        e = libdevice.exp(-gate)
    else:
        e = tl.exp(-gate)
    h = tl.math.div_rn(gate, 1.0 + e) * up
    h_ptrs = h_ptr + offs_r[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
    tl.store(h_ptrs, h, mask=n_mask[None, :])


@triton.jit
def _moe_w2_kernel(
    hq_ptr, hs_ptr, w_ptr, ws_ptr, topk_weights_ptr, route_out_ptr, route_of_row_ptr, slot_of_block_ptr,
    num_routes, hidden, inter,
    stride_hm, stride_w_slot, stride_wn, stride_ws_slot, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    block = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    slot = tl.load(slot_of_block_ptr + block)
    route = tl.load(route_of_row_ptr + offs_r)
    valid = route < tl.where(slot >= 0, num_routes, 0)  # padding rows and blocks past the end
    n_mask = offs_n < hidden
    cols = tl.where(n_mask, offs_n, 0).to(tl.int64)
    w_slot = w_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_w_slot
    a_ptrs = hq_ptr + offs_r[:, None].to(tl.int64) * stride_hm + offs_k[None, :]
    b_ptrs = w_slot + cols[None, :] * stride_wn + offs_k[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    k_end = tl.where(slot >= 0, inter, 0)
    for k_start in range(0, k_end, BLOCK_K):
        k_left = inter - k_start
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    h_scale = tl.load(hs_ptr + offs_r)
    w_scale = tl.load(ws_ptr + tl.maximum(slot, 0).to(tl.int64) * stride_ws_slot + cols)
    safe_route = tl.where(valid, route, 0).to(tl.int64)
    router_weight = tl.load(topk_weights_ptr + safe_route, mask=valid, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * h_scale[:, None] * w_scale[None, :] * router_weight[:, None]
    out_ptrs = route_out_ptr + safe_route[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, y, mask=valid[:, None] & n_mask[None, :])


@triton.jit
def _moe_sum_routes_kernel(route_out_ptr, slot_of_route_ptr, out_ptr, hidden, stride_rm, stride_om,
                           TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    out_ptrs = out_ptr + token * stride_om + cols
    acc = tl.load(out_ptrs, mask=mask, other=0.0)
    for j in tl.static_range(TOP_K):
        # a non-resident route's row was never written: read nothing from it
        cols_end = tl.where(tl.load(slot_of_route_ptr + token * TOP_K + j) >= 0, hidden, 0)
        acc += tl.load(route_out_ptr + (token * TOP_K + j) * stride_rm + cols, mask=cols < cols_end, other=0.0)
    tl.store(out_ptrs, acc, mask=mask)


def _moe_output(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """Check the weights' dtypes and shapes against ``x`` [M, H]; ``out``, or a new zeroed float32 [M, H]."""
    m, hidden = x.shape
    inter = w13.shape[1] // 2
    if (w13.dtype != torch.int8 or w2.dtype != torch.int8 or w13.shape[2] != hidden
            or tuple(w2.shape[1:]) != (hidden, inter)):
        raise ValueError(f"expected int8 w13 [S, 2I, {hidden}] and w2 [S, {hidden}, I], got "
                         f"{w13.dtype} {tuple(w13.shape)} and {w2.dtype} {tuple(w2.shape)}")
    if out is None:
        return torch.zeros(m, hidden, dtype=torch.float32, device=x.device)
    if out.dtype != torch.float32 or tuple(out.shape) != (m, hidden) or out.stride(-1) != 1:
        raise ValueError(f"out must be contiguous float32 [{m}, {hidden}], got {out.dtype} {tuple(out.shape)}")
    return out


def _slot_operands(w13, w13_scale, w2, w2_scale):
    """The kernels' operands: weights with unit stride in K, scales as contiguous float32 [S, N]."""
    num_slots, two_inter, hidden = w13.shape
    return (w13 if w13.stride(-1) == 1 else w13.contiguous(),
            w13_scale.reshape(num_slots, two_inter).float().contiguous(),
            w2 if w2.stride(-1) == 1 else w2.contiguous(),
            w2_scale.reshape(num_slots, hidden).float().contiguous())


def triton_int8_moe_forward(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    expert_to_slot: torch.Tensor,
    w13: torch.Tensor,
    w13_scale: torch.Tensor,
    w2: torch.Tensor,
    w2_scale: torch.Tensor,
    out: torch.Tensor | None = None,
    config: GemmConfig | None = None,
    down_rotation: int | None = None,
    host_routing: tuple[torch.Tensor, list[int]] | None = None,
) -> torch.Tensor:
    """Sum over routes of ``weight * w2(silu(w1 x) * w3 x)`` for the experts that have a cache slot.

    ``x`` [M, H] float; ``topk_weights`` [M, k]; ``topk_ids`` [M, k] expert ids; ``expert_to_slot`` int32 [E]
    (-1: not resident, its routes are skipped); ``w13`` int8 [S, 2I, H] (rows :I gate, I: up) with ``w13_scale``
    [S, 2I, 1]; ``w2`` int8 [S, H, I] with ``w2_scale`` [S, H, 1]. ``out`` (float32 [M, H]), when given, is
    accumulated into (the offload engine adds the non-resident experts' contributions). ``down_rotation``: the
    block-Hadamard order of the down projections' input (``w2`` holds W R), applied to the intermediate rows
    before their quantization. ``host_routing``: (``topk_ids`` on the host, expert -> slot list) where the
    caller has them (the offload engine): the rows are aligned on the host. Returns float32 [M, H]."""
    m, hidden = x.shape
    num_slots, two_inter, _ = w13.shape
    inter = two_inter // 2
    top_k = topk_ids.shape[1]
    out = _moe_output(x, w13, w2, out)
    if m == 0 or num_slots == 0:
        return out
    cfg = config or moe_config(m)
    w13, w13_scale, w2, w2_scale = _slot_operands(w13, w13_scale, w2, w2_scale)
    weights = topk_weights.reshape(-1).float().contiguous()

    route_of_row, slot_of_block, slot_of_route = (
        align_routes(topk_ids, expert_to_slot, num_slots, cfg.block_m) if host_routing is None
        else align_routes_host(*host_routing, num_slots, cfg.block_m, x.device))
    rows, blocks, fuse = route_of_row.numel(), slot_of_block.numel(), m <= QUANTIZE_IN_W13_TOKENS
    x_q, x_scale = (x.contiguous(), weights) if fuse else triton_quantize_per_token(x)  # (weights: unused)
    h = torch.empty(rows, inter, dtype=torch.float32, device=x.device)
    _moe_w13_swiglu_kernel[(blocks, triton.cdiv(inter, cfg.block_n))](
        x_q, x_scale, w13, w13_scale, h, route_of_row, slot_of_block,
        m * top_k, top_k, inter, hidden,
        x_q.stride(0), w13.stride(0), w13.stride(1), w13_scale.stride(0), h.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, LIBDEVICE_EXP=x.is_cuda,
        QUANTIZE_X=fuse, INT8_LIMIT=float(INT8_MAX), MIN_AMAX=_MIN_AMAX,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if down_rotation is not None:  # batch-invariant butterflies: each row as the per-expert loop rotates it
        h = rotate(h, down_rotation)
    h_q, h_scale = triton_quantize_per_token(h)
    route_out = torch.empty(m * top_k, hidden, dtype=torch.float32, device=x.device)
    _moe_w2_kernel[(blocks, triton.cdiv(hidden, cfg.block_n))](
        h_q, h_scale, w2, w2_scale, weights, route_out, route_of_row, slot_of_block,
        m * top_k, hidden, inter,
        h_q.stride(0), w2.stride(0), w2.stride(1), w2_scale.stride(0), route_out.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return _sum_routes(route_out, slot_of_route, out, top_k)


def _sum_routes(route_out: torch.Tensor, slot_of_route: torch.Tensor, out: torch.Tensor, top_k: int) -> torch.Tensor:
    """``out`` [M, H] += the sum of each token's resident routes' rows of ``route_out`` [M·k, H]."""
    m, hidden = out.shape
    sum_block = min(triton.next_power_of_2(hidden), 1024)
    _moe_sum_routes_kernel[(m, triton.cdiv(hidden, sum_block))](
        route_out, slot_of_route, out, hidden, route_out.stride(0), out.stride(0),
        TOP_K=top_k, BLOCK=sum_block, num_warps=4,
    )
    return out
