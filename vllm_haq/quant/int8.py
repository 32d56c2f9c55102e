"""Symmetric int8 quantization: the one definition of HAQ's W8A8 arithmetic.

Both the offline converter and the runtime import these functions, so a
checkpoint is produced and consumed with exactly the same conventions:

* weights: int8, symmetric, one float32 scale per output channel,
  ``w ≈ weight.float() * weight_scale`` with ``weight_scale`` of shape [out, 1];
* activations: int8, symmetric, dynamic, one float32 scale per token
  (row), computed at run time from the row's absolute maximum;
* products: int8 × int8 accumulated exactly in int32, then scaled by
  ``act_scale[m] * weight_scale[n]`` in float32.
"""

from __future__ import annotations

import logging
import os
import threading

import torch

from vllm_haq.quant.rotation import rotate

INT8_MAX = 127
# A zero row (or channel) would give scale 0 and 0/0 = NaN; clamp the amax.
_MIN_AMAX = 1e-8
_EXACT_K = 1024  # int8 products a float32 sum holds exactly (1024 * 127**2 < 2**24)
ENV_ONEDNN = "HAQ_ONEDNN_INT8"  # "off": never use torch._int_mm for exact int8 products on the CPU
_onednn: dict = {}
_onednn_lock = threading.Lock()
log = logging.getLogger("vllm_haq.quant")


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest int8 quantization of ``weight`` [out, in] per output channel.

    Returns ``(qweight int8 [out, in], scale float32 [out, 1])``.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    w = weight.float()
    scale = weight_scale_from_amax(w.abs().amax(dim=1, keepdim=True))
    return quantize_with_scale(w, scale), scale


def weight_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """float32 symmetric scale that maps ``amax`` to 127, correctly rounded on every device.

    The divisor is a tensor on ``amax``'s device, not a Python number: for a number, torch's CUDA division
    multiplies by its reciprocal (pytorch aten/src/ATen/native/cuda/BinaryDivTrueKernel.cu, lines 36-43:
    ``iter.is_cpu_scalar(2)`` -> ``a * (1 / b)``, "may lose one bit of precision"). That moves 4.4%
    of random amaxes by an ulp, and then rare int8 roundings flip against the kernels (the Triton quantizer
    and the CPU kernel divide with IEEE rounding, as torch does on the CPU): seen in make gpu-check."""
    amax = amax.float().clamp(min=_MIN_AMAX)
    return amax / torch.full((), INT8_MAX, dtype=torch.float32, device=amax.device)


def relative_weight_error(weight: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                          rows_per_chunk: int = 4096) -> float:
    """‖qweight · scale − weight‖ / ‖weight‖ (Frobenius), in row chunks: no full-size float temporaries beside
    a large weight (a Mixtral expert's gate/up is 28672 × 4096)."""
    err = ref = 0.0
    for r0 in range(0, weight.shape[0], rows_per_chunk):
        w = weight[r0 : r0 + rows_per_chunk].float()
        err += float((qweight[r0 : r0 + rows_per_chunk].float() * scale[r0 : r0 + rows_per_chunk] - w).pow(2).sum())
        ref += float(w.pow(2).sum())
    return (err / max(ref, 1e-24)) ** 0.5


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``round(x / scale)`` clamped to [-127, 127] as int8 (round half to even, like torch.round)."""
    return torch.round(x.float() / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)


def dequantize(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 values represented by an int8 tensor and its broadcastable scale."""
    return qweight.float() * scale.float()


def quantize_per_token(
    x: torch.Tensor, smooth: torch.Tensor | None = None, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token int8 quantization of activations ``x`` [..., in].

    ``smooth`` (float32 [in]), when given, divides the activations channel-wise
    before quantization (the explicit ``input_smooth`` of a checkpoint: the
    matching weight columns were multiplied by it). ``amax`` [..., 1], when given,
    replaces each token's own max |x| (after smoothing): a tensor-parallel shard
    quantizes with the max over all shards, at least its own.
    Returns ``(q int8 [..., in], scale float32 [..., 1])``.
    """
    xf = x.float()
    if smooth is not None:
        xf = xf / smooth
    scale = weight_scale_from_amax(xf.abs().amax(dim=-1, keepdim=True) if amax is None else amax.float())
    return quantize_with_scale(xf, scale), scale


def exact_int8_products(x_q: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """int32 [M, N] = int8 [M, K] @ int8 [K, N] exactly, through float32 BLAS in K-chunks.

    float32 holds every partial sum of at most _EXACT_K int8 products (|sum| <= 1024 * 127² < 2**24), so
    each chunk is an exact integer; int32 holds the total for any K below 2**31 / 127² (133 million). The
    one exact int8 product for hosts without an int8 kernel, and the references' fast path on the CPU."""
    acc = None
    for k0 in range(0, x_q.shape[1], _EXACT_K):
        part = (x_q[:, k0 : k0 + _EXACT_K].float() @ w_t[k0 : k0 + _EXACT_K].float()).to(torch.int32)
        acc = part if acc is None else acc + part
    if acc is None:
        acc = torch.zeros(x_q.shape[0], w_t.shape[1], dtype=torch.int32, device=x_q.device)
    return acc


def int8_products(x_q: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """int32 [M, N] = int8 [M, K] @ int8 [K, N] exactly, by the fastest exact means on the CPU: oneDNN's int8
    GEMM (``torch._int_mm``) where :func:`onednn_int8_is_exact` found it exact (VNNI and AMX hosts: ~9x the
    float32 path at the converter's shapes), else :func:`exact_int8_products`."""
    if x_q.device.type == "cpu" and onednn_int8_is_exact():
        return torch._int_mm(x_q, w_t)
    return exact_int8_products(x_q, w_t)


def onednn_int8_is_exact() -> bool:
    """Whether ``torch._int_mm`` gives the exact int32 products on this CPU, probed once.

    On CPUs with AVX-512 VNNI or AMX oneDNN accumulates int8 products in int32 (exact); on AVX2 it adds 128 to
    the activations and sums adjacent products in int16 with saturation (:func:`int8_matmul_int16_saturating`),
    up to 23% off. The probe runs shapes from one row to wide inputs on data that saturates that path (every
    value ±127) and on random data, against :func:`exact_int8_products`; ``HAQ_ONEDNN_INT8=off`` skips it."""
    with _onednn_lock:
        if "exact" not in _onednn:
            _onednn["exact"], why = _probe_onednn()
            log.info("vllm-haq: exact int8 products on the CPU %s (%s)",
                     "by oneDNN (torch._int_mm)" if _onednn["exact"] else "through float32 BLAS", why)
        return _onednn["exact"]


def _probe_onednn() -> tuple[bool, str]:
    if os.environ.get(ENV_ONEDNN, "").lower() in ("off", "0", "false", "no"):
        return False, f"{ENV_ONEDNN}={os.environ[ENV_ONEDNN]}"
    g = torch.Generator().manual_seed(0)
    for m, k, n in ((1, 63, 40), (17, 64, 1), (33, 130, 40), (128, 1536, 96)):
        cases = [(torch.full((m, k), 127, dtype=torch.int8), torch.full((k, n), sign * 127, dtype=torch.int8))
                 for sign in (1, -1)]
        cases.append((torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8),
                      torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).t()))
        for x, w in cases:
            try:
                got = torch._int_mm(x, w)
            except RuntimeError as exc:
                return False, f"torch._int_mm failed on [{m}, {k}] x [{k}, {n}]: {exc}"
            if not torch.equal(got, exact_int8_products(x, w)):
                return False, f"torch._int_mm is inexact on this CPU ([{m}, {k}] x [{k}, {n}])"
    return True, "torch._int_mm exact on every probed shape"


def int8_matmul_reference(
    x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Reference W8A8 product in float64: exact integer dot products, then both scales (the result cast to
    ``out_dtype``, float64 by default).

    ``x_q`` int8 [M, K], ``x_scale`` [M, 1], ``w_q`` int8 [N, K], ``w_scale`` [N, 1].
    Integer sums of int8 products with K < 2**37 are exact in float64.
    """
    if x_q.device.type == "cpu" and torch.get_float32_matmul_precision() == "highest":
        acc = int8_products(x_q, w_q.t())  # faster than float64 BLAS, and the same integers
        return _scaled_rows(acc, x_scale.double(), w_scale.double().t(), out_dtype)
    acc = x_q.double() @ w_q.double().t()
    return (acc * x_scale.double() * w_scale.double().t()).to(out_dtype)


_SCALE_ROWS = 64  # rows of the float64 epilogue at a time: [64, N] float64 stays in the core's cache


def _scaled_rows(acc: torch.Tensor, xs: torch.Tensor, ws_t: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``(acc · xs · ws_t)`` in float64 (the same operations in the same order, so the same bits), cast to
    ``out_dtype``, a block of rows at a time in one reused buffer: whole-matrix float64 temporaries (fresh
    [M, N] tensors, paid in page faults) took 43 ms of the converter's 4096 x 1536 products on 2 cores, this 3."""
    out = torch.empty(acc.shape, dtype=out_dtype)
    buf = torch.empty(min(_SCALE_ROWS, acc.shape[0]), acc.shape[1], dtype=torch.float64)
    for r0 in range(0, acc.shape[0], _SCALE_ROWS):
        b = buf[: min(_SCALE_ROWS, acc.shape[0] - r0)]
        b.copy_(acc[r0 : r0 + _SCALE_ROWS])
        b.mul_(xs[r0 : r0 + _SCALE_ROWS]).mul_(ws_t)
        out[r0 : r0 + _SCALE_ROWS].copy_(b)
    return out


_U8_SHIFT = 128  # s8 -> u8: what x86 int8 kernels without VNNI add to the activations
_SAT_ELEMENTS = 1 << 24  # int32 pair sums held at once by int8_matmul_int16_saturating (64 MiB)


def int8_matmul_int16_saturating(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """The integer products [M, N] (int64) of oneDNN's int8 GEMM on x86 CPUs without VNNI or AMX.

    Not HAQ's arithmetic: a model of a defect, so that it can be recognised (the start-up self-check of
    :mod:`vllm_haq.kernels.int8_gemm`) and reproduced (the reference for stock vLLM's W8A8 kernel on such
    hosts in the tests). On AVX2 (``vpmaddubsw``) oneDNN shifts each int8 activation to uint8 (+128),
    multiplies adjacent pairs along K with the int8 weights, sums each pair in int16 *with saturation*
    (a pair reaches 2·255·127 = 64770 > 32767), adds the pair sums in int32 and takes the shift back out
    as 128·Σw. Measured bit-identical to vLLM 0.32's ``onednn_scaled_mm`` on a 2-core AVX2 EPYC; on
    full-range data it is 14–23% off the exact product. ``x_q`` int8 [M, K], ``w_q`` int8 [N, K].
    """
    if x_q.shape[1] % 2:  # an odd K ends in a zero-weight column: its pair sum is the last product alone
        x_q = torch.nn.functional.pad(x_q, (0, 1))
        w_q = torch.nn.functional.pad(w_q, (0, 1))
    m, k = x_q.shape
    x = x_q.to(torch.int32) + _U8_SHIFT
    w = w_q.to(torch.int32)
    w_even, w_odd = w[:, 0::2], w[:, 1::2]
    rows = max(1, _SAT_ELEMENTS // max(1, w.shape[0] * (k // 2)))
    out = []
    for r0 in range(0, m, rows):
        xe, xo = x[r0 : r0 + rows, None, 0::2], x[r0 : r0 + rows, None, 1::2]
        pairs = (xe * w_even + xo * w_odd).clamp_(-32768, 32767)
        out.append(pairs.sum(-1, dtype=torch.int64))
    acc = torch.cat(out) if out else torch.zeros(0, w.shape[0], dtype=torch.int64)
    return acc - _U8_SHIFT * w.sum(-1, dtype=torch.int64)


def w8a8_linear_reference(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    rotation: int | None = None,
    quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """float32 output of a W8A8 linear layer computed the way the runtime does.

    The activations are divided by ``smooth``, then rotated by the block-Hadamard
    of order ``rotation`` (``vllm_haq.quant.rotation``), then quantized per token
    (:func:`quantize_input`; ``quantized``: its result for this ``x``, computed once
    for the linears that share an input); int32-exact accumulation via float64, then
    scales, then bias. This is the pure-PyTorch path the converter uses to run
    quantized layers and tests use as the reference for the served model.
    """
    shape = x.shape
    x_q, x_s = quantize_input(x, smooth, rotation) if quantized is None else quantized
    y = int8_matmul_reference(x_q, x_s, w_q, w_scale, torch.float32)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*shape[:-1], w_q.shape[0])


def quantize_input(x: torch.Tensor, smooth: torch.Tensor | None = None, rotation: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A W8A8 linear's int8 input rows [-1, in] and per-token scales: ``x`` divided by ``smooth``, rotated by
    the block-Hadamard of order ``rotation``, quantized per token (as :func:`w8a8_linear_reference` runs it)."""
    x2 = x.reshape(-1, x.shape[-1])
    if rotation is not None:
        x2 = rotate(x2.float() if smooth is None else x2.float() / smooth, rotation)
        smooth = None
    return quantize_per_token(x2, smooth)
