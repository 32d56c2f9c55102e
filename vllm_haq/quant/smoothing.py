"""SmoothQuant-style smoothing: move activation outliers into the weights before int8 quantization.

For a linear layer y = x Wᵀ and per-input-channel factors s > 0,
y = (x / s)(W · s)ᵀ exactly. With s_j = max|x_j|^α / max|W_:,j|^(1−α) the
activation channels that carry outliers shrink and the weights absorb them, so
per-token int8 activations lose less. The division by s is either *folded*
into the producer of x (a norm's weight and bias, v_proj's rows for o_proj,
up_proj's rows for down_proj) or kept *explicit* as the checkpoint's
``input_smooth`` and applied during per-token quantization.
"""

from __future__ import annotations

import torch

_MIN = 1e-5


def smoothing_factors(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|x|^α / max|W|^(1−α) per input channel (float32, > 0, finite).

    ``weight_absmax`` is the column max over every weight that consumes x (all
    linears fed by the same producer share one s).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    a = act_absmax.double().clamp(min=_MIN)
    w = weight_absmax.double().clamp(min=_MIN)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
    return s.clamp(min=_MIN).float()


_ROWS_PER_CHUNK = 1024  # float64 temporaries of a few rows, not of a whole Mixtral expert (28672 x 4096)


def _rowwise(w: torch.Tensor, dtype: torch.dtype, fn) -> torch.Tensor:
    """``fn(rows.double()).to(dtype)`` of ``w`` in row chunks: the same values as on the whole matrix."""
    out = torch.empty(w.shape, dtype=dtype, device=w.device)
    for r0 in range(0, w.shape[0], _ROWS_PER_CHUNK):
        out[r0 : r0 + _ROWS_PER_CHUNK] = fn(w[r0 : r0 + _ROWS_PER_CHUNK].double(), r0).to(dtype)
    return out


def smooth_weight(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W · s along the input dimension (the consumer's side of the smoothing), rounded once from the float64
    product.

    For float32 W and s that is the float32 product itself: two 24-bit significands multiply exactly in float64's
    53 bits (float32's exponents stay far inside float64's range), so rounding it to float32 is the one correct
    rounding IEEE float32 multiplication gives (tests/test_smoothing_gptq.py compares the bits), without float64
    copies of the rows (the converter reads every smoothed weight several times a layer)."""
    if w.dtype == torch.float32 and s.dtype == torch.float32:
        return w * s.unsqueeze(0)
    s = s.double().unsqueeze(0)
    return _rowwise(w, w.dtype if w.is_floating_point() else torch.float32, lambda rows, r0: rows * s)


def fold_into_norm(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor):
    """A norm whose output is divided by s: weight / s and bias / s."""
    w = (weight.double() / s.double()).to(weight.dtype)
    b = None if bias is None else (bias.double() / s.double()).to(bias.dtype)
    return w, b


def fold_into_producer_rows(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor):
    """A linear producer (v_proj for o_proj, up_proj for down_proj) whose outputs are divided by s."""
    s64 = s.double().unsqueeze(1)
    w = _rowwise(weight, weight.dtype, lambda rows, r0: rows / s64[r0 : r0 + rows.shape[0]])
    b = None if bias is None else (bias.double() / s.double()).to(bias.dtype)
    return w, b
