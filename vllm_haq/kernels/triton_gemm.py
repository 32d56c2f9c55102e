"""Scaled int8 GEMM in Triton: int8 x [M, K] · int8 W [N, K]ᵀ → int32 → scales (+ bias) → bf16/fp16/fp32.

The weight is read in its checkpoint layout (row-major [N, K]), which is the
K-major operand Hopper's int8 wgmma wants, so nothing is transposed or
repacked at load time. Products accumulate exactly in int32; the epilogue is
``(acc * x_scale[m]) * w_scale[n] + bias[n]`` in float32, in the order of the
torch backend, then one cast to the output dtype.

Block sizes come from a small table keyed by M (decode M ≤ 16: weight
streaming, narrow N tiles so that enough programs cover the SMs; prefill
M ≥ 256: 128×256 tiles with grouped ordering for L2 reuse). The table is an
educated first guess for Hopper, to be revised with ``benchmarks/kernels.py``.

CUDA kernels; on CPU they run under ``TRITON_INTERPRET=1`` (tests only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vllm_haq.kernels.triton_quant import triton_quantize_per_token
from vllm_haq.quant import quantize_per_token


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 4


def gemm_config(m: int, n: int, k: int) -> GemmConfig:
    """Tile shape for an [M, K] × [K, N] int8 GEMM (decode / small batch / prefill)."""
    if m <= 16:
        # Memory-bound weight streaming: one M tile, and N tiles narrow enough to give
        # every one of the H200's 132 SMs a program even for N = 4096.
        return GemmConfig(16, 32 if n <= 8192 else 64, 256, group_m=1, num_warps=4, num_stages=4)
    if m <= 64:
        return GemmConfig(64, 64, 128, num_warps=4, num_stages=4)
    if m < 256:
        return GemmConfig(128, 128, 128, num_warps=8, num_stages=4)
    return GemmConfig(128, 256, 128, num_warps=8, num_stages=3)


@triton.jit
def _scaled_int8_mm_kernel(
    a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, c_ptr,
    M, N, K, stride_am, stride_bn, stride_cm,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped program order: GROUP_M row tiles sweep the N tiles together, sharing W in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns read row 0 (in bounds, unmasked loads) and are never stored.
    rows = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
    cols = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + cols[None, :] * stride_bn + offs_k[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k_start in range(0, K, BLOCK_K):
        k_left = K - k_start
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    m_mask = offs_m < M
    n_mask = offs_n < N
    a_scale = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)
    b_scale = tl.load(b_scale_ptr + offs_n, mask=n_mask, other=0.0)
    c = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    if HAS_BIAS:
        c += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, c.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def triton_scaled_int8_mm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                          bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                          config: GemmConfig | None = None) -> torch.Tensor:
    """``(x_q @ w_qᵀ) * x_scale * w_scaleᵀ + bias`` for int8 ``x_q`` [M, K], ``w_q`` [N, K] → [M, N]."""
    if x_q.dtype != torch.int8 or w_q.dtype != torch.int8 or x_q.shape[1] != w_q.shape[1]:
        raise ValueError(f"expected int8 [M, K] and [N, K], got {x_q.dtype} {tuple(x_q.shape)} "
                         f"and {w_q.dtype} {tuple(w_q.shape)}")
    m, k = x_q.shape
    n = w_q.shape[0]
    x_q = x_q if x_q.stride(-1) == 1 else x_q.contiguous()
    w_q = w_q if w_q.stride(-1) == 1 else w_q.contiguous()
    x_scale = x_scale.reshape(m).float().contiguous()
    w_scale = w_scale.reshape(n).float().contiguous()
    if bias is not None:
        bias = bias.contiguous()
    out = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(m, n))
    cfg = config or gemm_config(m, n, k)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _scaled_int8_mm_kernel[grid](
        x_q, w_q, x_scale, w_scale, bias if bias is not None else w_scale, out,
        m, n, k, x_q.stride(0), w_q.stride(0), out.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def triton_w8a8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                       smooth: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                       config: GemmConfig | None = None, amax: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 linear on activations ``x`` [..., K]: per-token quant (smoothing fused), then the scaled GEMM.

    ``amax`` [M, 1]: quantize with it instead of each token's own max (a tensor-parallel shard; see
    ``ScaledInt8Gemm``), in torch with HAQ's numerics. Without an explicit ``config`` it goes through the
    opaque op ``vllm_haq::triton_w8a8_linear``, so that the tile is chosen from each call's real M (see
    :func:`_linear_op`)."""
    if config is None:
        return torch.ops.vllm_haq.triton_w8a8_linear(x, w_q, w_scale, bias, smooth, out_dtype or x.dtype, amax)
    return _linear(x, w_q, w_scale, bias, smooth, out_dtype or x.dtype, config, amax)


def _linear(x, w_q, w_scale, bias, smooth, out_dtype, config, amax=None):
    shape = x.shape
    if amax is None:
        x_q, x_scale = triton_quantize_per_token(x.reshape(-1, shape[-1]), smooth)
    else:
        x_q, x_scale = quantize_per_token(x.reshape(-1, shape[-1]), smooth, amax.reshape(-1, 1))
    out = triton_scaled_int8_mm(x_q, x_scale, w_q, w_scale, bias, out_dtype, config)
    return out.reshape(*shape[:-1], w_q.shape[0])


@torch.library.custom_op("vllm_haq::triton_w8a8_linear", mutates_args=())
def _linear_op(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
               smooth: torch.Tensor | None, out_dtype: torch.dtype, amax: torch.Tensor | None) -> torch.Tensor:
    """The linear as one opaque op: torch.compile must not trace into it.

    Traced, ``gemm_config(m)`` would run once on the symbolic M's hint (vLLM traces at its profiling batch
    size) and vLLM drops every guard (vllm/compilation/wrapper.py, TorchCompileWithNoGuardsWrapper: with
    the default ``dynamic_shapes_config.evaluate_guards=False`` its ``guard_filter_fn`` is
    ``torch.compiler.skip_all_guards_unsafe``), so decode at M = 1 would run the prefill tile. Opaque, the
    op chooses per call, also when a CUDA graph is captured per batch size.
    """
    return _linear(x, w_q, w_scale, bias, smooth, out_dtype, None, amax)


@_linear_op.register_fake
def _(x, w_q, w_scale, bias, smooth, out_dtype, amax):
    return x.new_empty((*x.shape[:-1], w_q.shape[0]), dtype=out_dtype)
