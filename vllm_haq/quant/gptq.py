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
from typing import Iterable

import torch

from vllm_haq.quant import gptq_cpu
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
    """Running H = 2/n · Σ xᵀx and per-channel max |x| of one linear layer's inputs, on ``device`` (the inputs'
    own: the converter accumulates on the device its layer runs on). ``track_absmax`` False: no max |x| (None),
    for a caller that keeps its own (the converter's InputStats: one pass over each batch fewer)."""

    def __init__(self, in_features: int, device: torch.device | str | None = None, track_absmax: bool = True):
        self.h = torch.zeros(in_features, in_features, dtype=hessian_dtype(in_features), device=device)
        self.absmax = torch.zeros(in_features, dtype=torch.float64, device=device) if track_absmax else None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            return
        # XᵀX of one batch in float32 (float64 input stays float64); the running mean is in H's dtype.
        x = x if x.dtype == torch.float64 else x.float()
        total = self.n + x.shape[0]
        if self.h.dtype == torch.float32 and x.dtype == torch.float32:  # wide inputs: no n×n temporary
            self.h.addmm_(x.t(), x, beta=self.n / total, alpha=2.0 / total)
        else:
            self.h.mul_(self.n / total).add_(gram(x).to(self.h.dtype), alpha=2.0 / total)
        if self.absmax is not None:
            self.absmax = torch.maximum(self.absmax, x.abs().amax(0).double())
        self.n = total

    def take(self) -> torch.Tensor:
        """H, handed over: the accumulator lets go of it so that a solver may overwrite and free it."""
        h, self.h = self.h, None
        return h


GRAM_BLOCKS = 4  # column blocks of xᵀx: the upper (b+1)/2b of the products (62.5% at 4), the rest mirrored


def gram(x: torch.Tensor, blocks: int = GRAM_BLOCKS) -> torch.Tensor:
    """xᵀx [K, K] of ``x`` [M, K] from its upper block triangle only, each product one BLAS call, mirrored.

    xᵀx is symmetric but a GEMM computes both halves; the converter's Hessian accumulation spent ~1 s a
    SmolLM2 layer in it on 2 cores (its inputs: 32k calibration rows). Exactly symmetric; each element is a
    dot product of the same columns as the full GEMM's, summed in the BLAS's own order."""
    k = x.shape[1]
    if blocks <= 1 or k < 2 * blocks:
        return x.t() @ x
    out = torch.empty(k, k, dtype=x.dtype, device=x.device)
    edges = [k * i // blocks for i in range(blocks + 1)]
    for i in range(blocks):
        a0, a1 = edges[i], edges[i + 1]
        xa = x[:, a0:a1]
        out[a0:a1, a0:].copy_(xa.t() @ x[:, a0:])
        out[a1:, a0:a1].copy_(out[a0:a1, a1:].t())
    return out


def hessian_weighted_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ): the expected squared output error of replacing W by Ŵ."""
    d = (w.double() - w_hat.double())
    return float(torch.einsum("oi,ij,oj->", d, h.double(), d))


def gptq_quantize(w: torch.Tensor, h: torch.Tensor,
                  cfg: GPTQConfig = GPTQConfig()) -> tuple[torch.Tensor, torch.Tensor]:
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
    accumulated error to the remaining columns with one matmul. The Hessian is factorized in its own memory.
    Works on the Hessian's device: the quantized weights and scales are made there (weights given elsewhere are
    copied there as they come); see :func:`_inverse_upper_cholesky_` for the factorization on each device.
    """

    def __init__(self, h: torch.Tensor, cfg: GPTQConfig = GPTQConfig()):
        self._factorize([h.to(hessian_dtype(h.shape[0]), copy=True)], cfg)

    @classmethod
    def from_accumulator(cls, acc: HessianAccumulator, cfg: GPTQConfig = GPTQConfig()) -> "GPTQSolver":
        """Factorize ``acc``'s Hessian in place (``acc`` is emptied): one n×n matrix fewer than a copy."""
        return cls.from_owned(acc.take(), cfg)

    @classmethod
    def from_owned(cls, h: torch.Tensor, cfg: GPTQConfig = GPTQConfig()) -> "GPTQSolver":
        """Factorize ``h`` in its own memory: the caller hands it over and must not use it afterwards."""
        solver = cls.__new__(cls)
        solver._factorize([h if h.dtype == hessian_dtype(h.shape[0]) else h.to(hessian_dtype(h.shape[0]))], cfg)
        return solver

    def _factorize(self, owned: list[torch.Tensor], cfg: GPTQConfig) -> None:
        # ``owned`` holds the only reference to a Hessian this solver may overwrite: every step below works in
        # its memory, so factorizing needs no n×n matrix besides it (a float64 Hessian: plus its float32 factor).
        h = owned.pop()
        n_in = h.shape[0]
        self.cfg = cfg
        self.dead = torch.diag(h) == 0  # inputs never seen: their weights cannot matter on calibration data
        self.any_dead = bool(self.dead.any())
        h[self.dead, self.dead] = 1.0
        self.perm = (torch.argsort(torch.diag(h), descending=True) if cfg.act_order
                     else torch.arange(n_in, device=h.device))
        self.inv_perm = torch.argsort(self.perm)
        if cfg.act_order:
            _permute_symmetric_(h, self.perm)
        h.diagonal().add_(cfg.dampening * torch.mean(torch.diag(h)))
        self.hinv = _inverse_upper_cholesky_(h).float()  # upper Cholesky factor of H⁻¹

    def quantize(self, w: torch.Tensor | Iterable[torch.Tensor], rows: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Int8 weights and float32 scales of ``w`` [out, in] (left untouched), or of the weights an iterable
        yields (``rows`` in all), stacked in order: each is copied into the permuted float32 working matrix
        as it comes and can be let go, so no second stacked copy exists."""
        parts = [w] if isinstance(w, torch.Tensor) else w
        n_in = self.perm.numel()
        if rows is None:
            parts = list(parts)
            rows = sum(p.shape[0] for p in parts)
        dev = self.hinv.device
        scale = torch.empty(rows, 1, dtype=torch.float32, device=dev)
        work = torch.empty(rows, n_in, dtype=torch.float32, device=dev)
        r = 0
        for part in parts:
            k = part.shape[0]
            if r + k > rows or part.dim() != 2 or part.shape[1] != n_in:
                raise ValueError(f"GPTQ: weights of {rows} rows x {n_in} inputs expected, got one of shape "
                                 f"{tuple(part.shape)} at row {r}")
            part = part.to(device=dev, dtype=torch.float32)
            # max |w| per row: the same values as vector_norm(inf), 20x faster on the CPU
            scale[r : r + k] = weight_scale_from_amax(part.abs().amax(dim=1, keepdim=True))
            torch.index_select(part, 1, self.perm, out=work[r : r + k])
            r += k
            del part
        if r != rows:
            raise ValueError(f"GPTQ: {rows} weight rows expected, got {r}")
        w = work
        if self.any_dead:
            w[:, self.dead[self.perm]] = 0.0
        hinv = self.hinv
        q = torch.empty(w.shape, dtype=torch.int8, device=dev)
        bs = self.cfg.block_size
        buffers = [torch.empty(min(bs, n_in), rows, dtype=torch.float32, device=dev) for _ in range(3)]
        for b0 in range(0, n_in, bs):
            b1 = min(b0 + bs, n_in)
            q_t, err_t = self._columns(w[:, b0:b1].t().contiguous(), scale.reshape(-1), hinv[b0:b1, b0:b1], buffers)
            q[:, b0:b1] = q_t.t()
            if b1 < n_in:  # in place: no [out, in] temporary for the product
                w[:, b1:].addmm_(err_t.t().contiguous(), hinv[b0:b1, b1:], alpha=-1.0)
        return q[:, self.inv_perm], scale

    @staticmethod
    def _columns(w_t: torch.Tensor, scale: torch.Tensor, hinv_blk: torch.Tensor, buffers: list[torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """One block's columns in order, each rounded and its error spread over the block's later columns.

        The block is held transposed (``w_t`` [columns, rows]): a column is a contiguous row, and every step
        writes into preallocated buffers. The same float operations as the textbook column loop over
        ``w[:, j]`` (tests/test_smoothing_gptq.py compares the bits), 2-4x faster on the CPU. There, compiled
        (:mod:`vllm_haq.quant.gptq_cpu`: one call instead of ~8 torch ops per column), unless it cannot be
        built or ``HAQ_GPTQ_CPU_KERNEL=off``; the same bits (tests/test_gptq_native.py)."""
        n = w_t.shape[0]
        q_t, err_t, tmp = (b[:n] for b in buffers)
        if gptq_cpu.usable(w_t, scale, hinv_blk):
            q_t = torch.empty(w_t.shape, dtype=torch.int8)
            gptq_cpu.columns(w_t, scale, hinv_blk, q_t, err_t)
            return q_t, err_t
        for j in range(n):
            col, qcol, err = w_t[j], q_t[j], err_t[j]
            torch.div(col, scale, out=qcol)
            qcol.round_().clamp_(-INT8_MAX, INT8_MAX)
            torch.mul(qcol, scale, out=err)
            torch.sub(col, err, out=err)
            err.div_(hinv_blk[j, j])
            if j + 1 < n:
                update = tmp[: n - j - 1]
                torch.mul(hinv_blk[j, j + 1 :].unsqueeze(1), err.unsqueeze(0), out=update)
                w_t[j + 1 :].sub_(update)
        return q_t.to(torch.int8), err_t


ROW_PERMUTE_MIN = 4096  # Hessians at least this wide are permuted in place on the CPU (an n×n temporary is large)


def _permute_symmetric_(h: torch.Tensor, perm: torch.Tensor, by_rows: bool | None = None) -> None:
    """``h ← h[perm][:, perm]`` in place, ``by_rows`` (the CPU's default for Hessians of ROW_PERMUTE_MIN inputs
    or more) one row (then column) at a time along the permutation's cycles, with no n×n temporary; else (a
    GPU's, where one small copy per row would cost a kernel launch each and memory is not the limit, and small
    Hessians, where the Python loop over rows cost more than the copy: 5 s of a SmolLM2 conversion) by indexing
    rows, then columns. Exact either way: a permutation."""
    if by_rows is None:
        by_rows = h.device.type == "cpu" and h.shape[0] >= ROW_PERMUTE_MIN
    if not by_rows:  # advanced indexing: 2.7x faster than two index_selects on the CPU (a column one is slow)
        h.copy_(h[perm][:, perm])
        return
    order = perm.tolist()
    for view in (h, h.t()):  # rows, then columns (rows of the transposed view)
        done = [False] * len(order)
        for start in range(len(order)):
            if done[start] or order[start] == start:
                done[start] = True
                continue
            saved = view[start].clone()
            i = start
            while order[i] != start:
                view[i].copy_(view[order[i]])
                done[i] = True
                i = order[i]
            view[i].copy_(saved)
            done[i] = True


def _inverse_upper_cholesky_(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU) of a symmetric positive definite ``h``, computed in
    ``h``'s own memory with LAPACK (potrf, potri, potrf) and returned as ``h``.

    The reference computes the same with torch's cholesky, cholesky_inverse and cholesky(upper=True), which
    hold three n×n matrices at once (1.6 GB of float32 beside a Mixtral expert's 14336-wide down projection
    Hessian, which is 0.8 GB itself). Where H is not numerically positive definite, dampening is added to its
    diagonal (1e-6, 1e-5, ... of its mean) until it is.

    LAPACK through scipy needs the matrix in host memory: off the CPU, :func:`_inverse_upper_cholesky_torch`.
    """
    if h.device.type != "cpu":
        return _inverse_upper_cholesky_torch(h)
    from scipy.linalg import lapack  # noqa: PLC0415 (the converter's numerics only)

    if not h.is_contiguous() or h.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"expected a contiguous float32/float64 Hessian, got {h.dtype} {tuple(h.shape)}")
    potrf, potri = lapack.get_lapack_funcs(("potrf", "potri"), dtype=h.numpy().dtype)
    # LAPACK is column-major: the transpose of h's row-major memory is h itself (h is symmetric), and its
    # "lower" triangle is h's upper one. potrf(clean=0) leaves h's strict lower triangle, i.e. H, untouched.
    a = h.numpy().T
    diag = h.diagonal().clone()
    base = 1e-6 * float(diag.mean())
    added = 0.0
    for _ in range(8):
        low, info = potrf(a, lower=1, clean=0, overwrite_a=1)
        if info == 0:
            break
        if info < 0:
            raise RuntimeError(f"GPTQ: LAPACK potrf rejected argument {-info}")
        _restore_upper_(h, diag)  # potrf stopped part-way through: rebuild H from its untouched half
        step = max(added * 9, base)  # total extra dampening: base, 10·base, 100·base, ...
        h.diagonal().add_(step)
        diag.add_(step)
        added += step
    else:
        raise RuntimeError("GPTQ: the input Hessian is not positive definite even after extra dampening")
    inv, info = potri(low, lower=1, overwrite_c=1)  # lower triangle of H⁻¹ (column-major)
    if info != 0:
        raise RuntimeError(f"GPTQ: inverting the Hessian's Cholesky factor failed (LAPACK potri info {info})")
    low, info = potrf(inv, lower=1, clean=1, overwrite_a=1)  # H⁻¹ = L Lᵀ, and U = Lᵀ is h's upper triangle
    if info != 0:
        raise RuntimeError(f"GPTQ: the inverse Hessian is not numerically positive definite (LAPACK potrf info {info})")
    if not (low.ctypes.data == h.data_ptr() and low.flags.f_contiguous):
        raise RuntimeError("GPTQ: LAPACK worked on a copy of the Hessian, not in place")
    return h  # clean=1 zeroed h's strict lower triangle: h is U (a triu_ on it cost 16 passes a SmolLM2 layer)


def _inverse_upper_cholesky_torch(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor U of H⁻¹ by ``torch.linalg`` (cholesky, cholesky_inverse, cholesky(upper)) on
    ``h``'s device — a GPU's, where scipy cannot reach — with the same extra dampening as the LAPACK path (1e-6,
    1e-5, ... of the mean diagonal, added to ``h`` in place) where H is not numerically positive definite.

    Holds up to three n×n matrices at once (``h``, the factor, the inverse; 2.4 GiB for a float32 14336-wide
    Hessian), which a GPU converting one layer at a time has room for; the CPU keeps the in-place LAPACK path.
    """
    if h.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"expected a float32/float64 Hessian, got {h.dtype} {tuple(h.shape)}")
    base = 1e-6 * float(h.diagonal().mean())
    added = 0.0
    for _ in range(8):
        low, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            break
        step = max(added * 9, base)  # total extra dampening: base, 10·base, 100·base, ...
        h.diagonal().add_(step)
        added += step
    else:
        raise RuntimeError("GPTQ: the input Hessian is not positive definite even after extra dampening")
    inv = torch.cholesky_inverse(low)
    del low
    up, info = torch.linalg.cholesky_ex(inv, upper=True)
    if int(info) != 0:
        raise RuntimeError(f"GPTQ: the inverse Hessian is not numerically positive definite (cholesky info {info})")
    return up


def _restore_upper_(h: torch.Tensor, diag: torch.Tensor, block: int = 1024) -> None:
    """Copy ``h``'s strict lower triangle onto its upper one and set its diagonal (a symmetric H again)."""
    n = h.shape[0]
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        h[i0:i1, i1:].copy_(h[i1:, i0:i1].t())
        d = h[i0:i1, i0:i1]
        d.copy_(torch.tril(d, -1) + torch.tril(d, -1).t())
    h.diagonal().copy_(diag)
