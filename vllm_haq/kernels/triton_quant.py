"""Per-token dynamic int8 quantization of activations in one Triton pass (smoothing fused).

Bit-exact with :func:`vllm_haq.quant.quantize_per_token`: every float32 operation
torch performs there is performed here with the same IEEE rounding —

* smoothing and the scale use ``div_rn`` (Triton's plain ``/`` on float32 compiles
  to the approximate ``div.full.f32`` on CUDA, which would move values across
  rounding boundaries);
* rounding is half-to-even like ``torch.round``, through the float32 addition of
  1.5 * 2**23 (exact for |v| < 2**22; quantized values are within ±127.0001).

Rows up to ``_MAX_ROW_BLOCK`` columns are held in registers: x is read once and
int8 + scale are written once. Longer rows (OPT-66B's 36864-wide FFN input) take
two sweeps over the row, the second mostly from L2.

CUDA kernels; on CPU they run under ``TRITON_INTERPRET=1`` (tests only), which
must be set before Triton is first imported in the process.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_haq.quant.int8 import _MIN_AMAX, INT8_MAX

_MAX_ROW_BLOCK = 16384  # one program holds a row this wide in registers (32 values a thread at 16 warps)
_SWEEP_BLOCK = 4096  # chunk width of the two-sweep path for wider rows


@triton.jit
def _round_half_even(v):
    # For |v| < 2**22, v + 1.5 * 2**23 lands in [2**23, 2**24), where float32 spacing is 1,
    # so round-to-nearest-even of the addition is torch.round of v. No fast-math reassociation
    # in Triton folds (v + c) - c.
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _token_scale(amax, INT8_LIMIT: tl.constexpr, MIN_AMAX: tl.constexpr):
    # vllm_haq.quant.quantize_per_token's scale, max(amax, MIN_AMAX) / 127, correctly rounded; every Triton kernel
    # that quantizes a token row takes its scale from here
    return tl.math.div_rn(tl.maximum(amax, MIN_AMAX), INT8_LIMIT)


@triton.jit
def _quantize(x, scale, INT8_LIMIT: tl.constexpr):
    q = _round_half_even(tl.math.div_rn(x, scale))
    return tl.minimum(tl.maximum(q, -INT8_LIMIT), INT8_LIMIT).to(tl.int8)


@triton.jit
def _quant_per_token_kernel(
    x_ptr, smooth_ptr, q_ptr, scale_ptr, n_cols, stride_x_row, stride_q_row,
    HAS_SMOOTH: tl.constexpr, BLOCK: tl.constexpr, ONE_SWEEP: tl.constexpr,
    INT8_LIMIT: tl.constexpr, MIN_AMAX: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x_row
    q_row = q_ptr + row * stride_q_row
    cols = tl.arange(0, BLOCK)
    if ONE_SWEEP:
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = tl.math.div_rn(x, tl.load(smooth_ptr + cols, mask=mask, other=1.0))
        scale = _token_scale(tl.max(tl.abs(x), axis=0), INT8_LIMIT, MIN_AMAX)
        tl.store(q_row + cols, _quantize(x, scale, INT8_LIMIT), mask=mask)
    else:
        running_max = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                x = tl.math.div_rn(x, tl.load(smooth_ptr + start + cols, mask=mask, other=1.0))
            running_max = tl.maximum(running_max, tl.abs(x))
        scale = _token_scale(tl.max(running_max, axis=0), INT8_LIMIT, MIN_AMAX)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                x = tl.math.div_rn(x, tl.load(smooth_ptr + start + cols, mask=mask, other=1.0))
            tl.store(q_row + start + cols, _quantize(x, scale, INT8_LIMIT), mask=mask)
    tl.store(scale_ptr + row, scale)


def triton_quantize_per_token(x: torch.Tensor, smooth: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_per_token(x, smooth)`` in one kernel: int8 [..., K] and float32 scales [..., 1]."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows, n_cols = x2.shape
    q = torch.empty((rows, n_cols), dtype=torch.int8, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows > 0 and n_cols > 0:
        if smooth is not None:
            smooth = smooth.to(device=x.device, dtype=torch.float32).contiguous()
        block = triton.next_power_of_2(n_cols)
        one_sweep = block <= _MAX_ROW_BLOCK
        if not one_sweep:
            block = _SWEEP_BLOCK
        _quant_per_token_kernel[(rows,)](
            x2, smooth if smooth is not None else scale, q, scale, n_cols, x2.stride(0), q.stride(0),
            HAS_SMOOTH=smooth is not None, BLOCK=block, ONE_SWEEP=one_sweep,
            INT8_LIMIT=float(INT8_MAX), MIN_AMAX=_MIN_AMAX,
            num_warps=min(max(block // 512, 1), 16),
        )
    return q.reshape(shape), scale.reshape(*shape[:-1], 1)
