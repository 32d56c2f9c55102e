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
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            return
        # XᵀX of one batch in float32 (float64 input stays float64); the running mean is float64.
        x = x if x.dtype == torch.float64 else x.float()
        total = self.n + x.shape[0]
        self.h.mul_(self.n / total).add_((x.t() @ x).double(), alpha=2.0 / total)
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0).double())
        self.n = total


def hessian_weighted_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ): the expected squared output error of replacing W by Ŵ."""
    d = (w.double() - w_hat.double())
    return float(torch.einsum("oi,ij,oj->", d, h.double(), d))


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, cfg: GPTQConfig = GPTQConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 weights [out, in] and float32 scales [out, 1] for ``w`` given input Hessian ``h`` [in, in].

    Output rows are independent given ``h``: the weights of several linears that read the same
    input can be stacked into one call (one Cholesky factorization) with the same result.
    """
    return GPTQSolver(h, cfg).quantize(w)


class GPTQSolver:
    """The ``h``-dependent part of GPTQ (dead inputs, act-order permutation, dampened Cholesky of H⁻¹),
    computed once and reused for every weight that reads this input.

    Runs in float32 like the reference implementation (Frantar et al.); the lazy-batch update
    applies each block's accumulated error to the remaining columns with one matmul.
    """

    def __init__(self, h: torch.Tensor, cfg: GPTQConfig = GPTQConfig()):
        h = h.double().clone()
        n_in = h.shape[0]
        self.cfg = cfg
        self.dead = torch.diag(h) == 0  # inputs never seen: their weights cannot matter on calibration data
        h[self.dead, self.dead] = 1.0
        self.perm = torch.argsort(torch.diag(h), descending=True) if cfg.act_order else torch.arange(n_in)
        self.inv_perm = torch.argsort(self.perm)
        h = h[self.perm][:, self.perm]
        h += torch.eye(n_in, dtype=torch.float64) * (cfg.dampening * torch.mean(torch.diag(h)))
        self.hinv = _upper_cholesky_of_inverse(h).float()

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = w.float().clone()
        n_in = w.shape[1]
        scale = weight_scale_from_amax(w.abs().amax(dim=1, keepdim=True))
        w[:, self.dead] = 0.0
        w = w[:, self.perm].contiguous()
        hinv = self.hinv
        q = torch.empty_like(w)
        bs = self.cfg.block_size
        for b0 in range(0, n_in, bs):
            b1 = min(b0 + bs, n_in)
            w_blk = w[:, b0:b1].clone()
            q_blk = q[:, b0:b1]
            err_blk = torch.empty_like(w_blk)
            hinv_blk = hinv[b0:b1, b0:b1]
            for j in range(b1 - b0):
                col = w_blk[:, j : j + 1]
                qcol = torch.round(col / scale).clamp_(-INT8_MAX, INT8_MAX)
                q_blk[:, j : j + 1] = qcol
                err = (col - qcol * scale) / hinv_blk[j, j]
                w_blk[:, j + 1 :].sub_(err * hinv_blk[j : j + 1, j + 1 :])
                err_blk[:, j : j + 1] = err
            if b1 < n_in:
                w[:, b1:].sub_(err_blk @ hinv[b0:b1, b1:])
        return q[:, self.inv_perm].to(torch.int8), scale


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
