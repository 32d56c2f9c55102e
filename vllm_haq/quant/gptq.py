"""GPTQ: Hessian-aware rounding of a linear layer's weights to int8 (per output channel).

Quantizes input columns one at a time and spreads each column's rounding error
over the not-yet-quantized columns through the inverse Hessian of the layer's
inputs, H = 2/n · XᵀX, minimizing the output error ‖(W − Q)X‖² rather than the
weight error. Follows Frantar et al. (GPTQ, 2022): Cholesky form of H⁻¹,
lazy block updates, dampening, optional activation order. Scales are fixed per
output channel from the weight's range before rounding, so the result is in
the same int8 format as round-to-nearest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_haq.quant.int8 import INT8_MAX, weight_scale_from_amax


@dataclass
class GPTQConfig:
    block_size: int = 128
    dampening: float = 0.01  # fraction of the mean Hessian diagonal added to the diagonal
    act_order: bool = True  # quantize columns with the largest Hessian diagonal first


class HessianAccumulator:
    """Running H = 2/n · Σ xᵀx and per-channel max |x| of one linear layer's inputs (float64)."""

    def __init__(self, in_features: int):
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.absmax = torch.zeros(in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        if x.shape[0] == 0:
            return
        total = self.n + x.shape[0]
        self.h.mul_(self.n / total).add_(x.t() @ x, alpha=2.0 / total)
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0))
        self.n = total


def hessian_weighted_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ): the expected squared output error of replacing W by Ŵ."""
    d = (w.double() - w_hat.double())
    return float(torch.einsum("oi,ij,oj->", d, h.double(), d))


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, cfg: GPTQConfig = GPTQConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 weights [out, in] and float32 scales [out, 1] for ``w`` given input Hessian ``h`` [in, in]."""
    w = w.double().clone()
    h = h.double().clone()
    n_in = w.shape[1]
    scale = weight_scale_from_amax(w.abs().amax(dim=1, keepdim=True)).double()

    dead = torch.diag(h) == 0  # inputs never seen: their weights cannot matter on calibration data
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if cfg.act_order else torch.arange(n_in)
    w, h = w[:, perm], h[perm][:, perm]
    h += torch.eye(n_in, dtype=torch.float64) * (cfg.dampening * torch.mean(torch.diag(h)))
    hinv = _upper_cholesky_of_inverse(h)

    q = torch.zeros_like(w)
    for b0 in range(0, n_in, cfg.block_size):
        b1 = min(b0 + cfg.block_size, n_in)
        w_blk = w[:, b0:b1].clone()
        err_blk = torch.zeros_like(w_blk)
        hinv_blk = hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = w_blk[:, j]
            qcol = torch.round(col / scale[:, 0]).clamp(-INT8_MAX, INT8_MAX)
            q[:, b0 + j] = qcol
            err = (col - qcol * scale[:, 0]) / hinv_blk[j, j]
            w_blk[:, j:] -= err.unsqueeze(1) * hinv_blk[j, j:].unsqueeze(0)
            err_blk[:, j] = err
        w[:, b1:] -= err_blk @ hinv[b0:b1, b1:]
    q = q[:, torch.argsort(perm)]
    return q.to(torch.int8), scale.float()


def _upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹, adding dampening until H is numerically positive definite."""
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    extra = 0.0
    for _ in range(8):
        try:
            low = torch.linalg.cholesky(h + extra * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(low), upper=True)
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            extra = max(extra * 10, 1e-6 * float(torch.mean(torch.diag(h))))
    raise RuntimeError("GPTQ: the input Hessian is not positive definite even after extra dampening")
