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


def smooth_weight(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W · s along the input dimension (the consumer's side of the smoothing)."""
    return (w.double() * s.double().unsqueeze(0)).to(w.dtype if w.is_floating_point() else torch.float32)


def fold_into_norm(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor):
    """A norm whose output is divided by s: weight / s and bias / s."""
    w = (weight.double() / s.double()).to(weight.dtype)
    b = None if bias is None else (bias.double() / s.double()).to(bias.dtype)
    return w, b


def fold_into_producer_rows(weight: torch.Tensor, bias: torch.Tensor | None, s: torch.Tensor):
    """A linear producer (v_proj for o_proj, up_proj for down_proj) whose outputs are divided by s."""
    w = (weight.double() / s.double().unsqueeze(1)).to(weight.dtype)
    b = None if bias is None else (bias.double() / s.double()).to(bias.dtype)
    return w, b
