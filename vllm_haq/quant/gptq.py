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


# Hessians of inputs wider than this are kept and factorized in float32, as in the reference GPTQ: a float64
# Hessian of Mixtral's 14336-wide expert down projection is 1.6 GB, and factorizing it needs two at once.
FLOAT64_MAX_INPUTS = 8192


def hessian_dtype(in_features: int) -> torch.dtype:
    """float64 (exact enough at any calibration size) unless the input is wider than FLOAT64_MAX_INPUTS."""
    return torch.float64 if in_features <= FLOAT64_MAX_INPUTS else torch.float32


class HessianAccumulator:
    """Running H = 2/n · Σ xᵀx and per-channel max |x| of one linear layer's inputs."""

    def __init__(self, in_features: int):
        self.h = torch.zeros(in_features, in_features, dtype=hessian_dtype(in_features))
        self.absmax = torch.zeros(in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            return
        # XᵀX of one batch in float32 (float64 input stays float64); the running mean is in H's dtype.
        x = x if x.dtype == torch.float64 else x.float()
        total = self.n + x.shape[0]
        self.h.mul_(self.n / total).add_((x.t() @ x).to(self.h.dtype), alpha=2.0 / total)
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0).double())
        self.n = total

    def take(self) -> torch.Tensor:
        """H, handed over: the accumulator lets go of it so that a solver may overwrite and free it."""
        h, self.h = self.h, None
        return h


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

    Factorizes in ``hessian_dtype`` (float64 up to FLOAT64_MAX_INPUTS inputs) and runs the column updates in
    float32 like the reference implementation (Frantar et al.); the lazy-batch update applies each block's
    accumulated error to the remaining columns with one matmul. At most two n×n matrices exist at a time.
    """

    def __init__(self, h: torch.Tensor, cfg: GPTQConfig = GPTQConfig()):
        self._factorize([h.to(hessian_dtype(h.shape[0]), copy=True)], cfg)

    @classmethod
    def from_accumulator(cls, acc: HessianAccumulator, cfg: GPTQConfig = GPTQConfig()) -> "GPTQSolver":
        """Factorize ``acc``'s Hessian in place (``acc`` is emptied): one n×n matrix fewer than a copy."""
        solver = cls.__new__(cls)
        h = acc.take()
        solver._factorize([h if h.dtype == hessian_dtype(h.shape[0]) else h.to(hessian_dtype(h.shape[0]))], cfg)
        return solver

    def _factorize(self, owned: list[torch.Tensor], cfg: GPTQConfig) -> None:
        # ``owned`` holds the only reference to a Hessian this solver may overwrite; each step drops the previous
        # matrix so that at most two n×n matrices are alive.
        h = owned.pop()
        n_in = h.shape[0]
        self.cfg = cfg
        self.dead = torch.diag(h) == 0  # inputs never seen: their weights cannot matter on calibration data
        h[self.dead, self.dead] = 1.0
        self.perm = torch.argsort(torch.diag(h), descending=True) if cfg.act_order else torch.arange(n_in)
        self.inv_perm = torch.argsort(self.perm)
        if cfg.act_order:
            h = h.index_select(0, self.perm)
            h = h.index_select(1, self.perm)
        h.diagonal().add_(cfg.dampening * torch.mean(torch.diag(h)))
        low = _cholesky_adding_dampening(h)
        del h
        inv = torch.cholesky_inverse(low)
        del low
        self.hinv = torch.linalg.cholesky(inv, upper=True).float()  # upper Cholesky factor of H⁻¹

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = w.float()
        n_in = w.shape[1]
        scale = weight_scale_from_amax(w.abs().amax(dim=1, keepdim=True))
        w = w[:, self.perm]  # a copy: the caller's weight stays untouched
        w[:, self.dead[self.perm]] = 0.0
        hinv = self.hinv
        q = torch.empty(w.shape, dtype=torch.int8)
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
        return q[:, self.inv_perm], scale


def _cholesky_adding_dampening(h: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of ``h``, adding to its diagonal (in place) until it is numerically positive definite."""
    base = 1e-6 * float(torch.mean(torch.diag(h)))
    added = 0.0
    for _ in range(8):
        low, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            return low
        del low
        step = max(added * 9, base)  # total extra dampening: base, 10·base, 100·base, ...
        h.diagonal().add_(step)
        added += step
    raise RuntimeError("GPTQ: the input Hessian is not positive definite even after extra dampening")
