"""Scaled int8 GEMM with dynamic per-token activation quantization, per backend.

``y = (q(x) @ W_q^T) * x_scale * w_scale + bias`` where ``q`` is the per-token
symmetric int8 quantization of ``x`` (optionally divided by a smoothing vector
first) — the arithmetic defined in :mod:`vllm_haq.quant`.

Backends (chosen in one place, :func:`select_backend`):

* ``onednn``  — CPU, vLLM's oneDNN int8 ops (prepacked weights; what vLLM's own
  W8A8 uses on CPU) behind HAQ's own per-token quantization. Chosen only where a
  start-up self-check (:func:`onednn_int8_arithmetic`) finds it exact: on CPUs
  without VNNI/AMX (AVX2 only) oneDNN's int8 path saturates its int16 pair sums
  (:func:`vllm_haq.quant.int8_matmul_int16_saturating`, 14–23% off on full-range data).
* ``triton``  — CUDA, this package's Triton kernels (:mod:`.triton_quant`,
  :mod:`.triton_gemm`): fused smoothing + per-token quant, then the scaled GEMM
  reading the checkpoint's row-major weight. Needs only torch and Triton. The
  modules are imported on first use, never when this package is imported: a
  Triton kernel is fixed as compiled or interpreted when its module is imported
  (``TRITON_INTERPRET``), and vLLM's processes must not inherit a test's choice.
* ``cutlass`` — CUDA, vLLM's CUTLASS ``cutlass_scaled_mm`` (the GEMM vLLM's own W8A8
  runs and tests) behind HAQ's per-token quantization (vLLM's ``scaled_int8_quant``
  is not asked to round like HAQ). ``auto`` takes it for every linear whose shape
  and output dtype CUTLASS takes and that has no explicit smoothing (which the
  Triton quantization fuses); the rest, and the MoE's cache-slot kernels, stay Triton.
* ``torch``   — exact int32 products without vLLM: ``torch._int_mm`` on CUDA; on
  CPU this package's AVX2 kernel (:mod:`.cpu_int8`, near memory bandwidth at
  decode), else the same integers via float32 BLAS in K-chunks of 1024, each chunk
  exact because 1024 * 127**2 < 2**24 (the CPU's ``_int_mm`` is oneDNN, which
  saturates int16 pair sums without VNNI/AMX; the converter takes it only where
  :func:`vllm_haq.quant.int8.onednn_int8_is_exact` finds it exact). Weights stay
  int8 in memory either way.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

from vllm_haq.kernels import cpu_int8
from vllm_haq.quant import exact_int8_products, int8_matmul_int16_saturating, quantize_per_token
from vllm_haq.quant.rotation import check_block, rotate

log = logging.getLogger("vllm_haq.kernels")

BACKENDS = ("onednn", "cutlass", "triton", "torch")
_ENV_BACKEND = "HAQ_INT8_BACKEND"
# This package's Triton int8 kernels (tl.dot of int8 into int32) are written and checked for sm_80 and newer;
# vLLM's config accepts sm_75 (Turing int8 tensor cores), where CUTLASS or torch._int_mm serve instead.
TRITON_MIN_CAPABILITY = (8, 0)


def _vllm_ops():
    try:
        import vllm._custom_ops as ops  # noqa: PLC0415 (optional dependency)

        return ops
    except Exception:  # vLLM absent or built without its C extension
        return None


def cutlass_fits(n: int, k: int, out_dtype: torch.dtype, smooth: bool) -> bool:
    """Whether vLLM's CUTLASS int8 GEMM serves an [N, K] weight exactly as this layer needs it.

    vllm/_custom_ops.py ``cutlass_scaled_mm`` asserts a bf16/fp16 output and falls back to its own Triton
    kernel unless N and K are multiples of 16; an explicit smoothing vector is fused into this package's
    Triton quantization, so such a layer keeps the Triton path."""
    return out_dtype in (torch.bfloat16, torch.float16) and n % 16 == 0 and k % 16 == 0 and not smooth


def select_backend(device: torch.device | str, requested: str | None = None, cutlass_ok: bool = False) -> str:
    """The int8 GEMM backend for ``device``: ``requested``, ``$HAQ_INT8_BACKEND``, or the best available.

    ``cutlass_ok``: the layer fits vLLM's CUTLASS GEMM (:func:`cutlass_fits`); callers that do not say
    (the MoE's per-slot GEMMs) get this package's kernels."""
    device = torch.device(device)
    requested = requested or _env_backend(device)
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"{_ENV_BACKEND}/backend {requested!r} is not one of {BACKENDS + ('auto',)}")
        return requested
    ops = _vllm_ops()
    if device.type == "cpu" and ops is not None and hasattr(ops, "create_onednn_scaled_mm"):
        arithmetic = onednn_int8_arithmetic()
        if arithmetic == ONEDNN_EXACT:
            return _chosen(device, "onednn", "vLLM oneDNN int8 ops, exact on this CPU")
        return _chosen(device, "torch", f"vLLM's oneDNN int8 GEMM is {arithmetic} on this CPU, not exact; "
                       "exact fp32-BLAS int8 GEMM")
    if device.type == "cuda":
        ampere = torch.cuda.get_device_capability(device) >= TRITON_MIN_CAPABILITY
        if cutlass_ok and ops is not None and hasattr(ops, "cutlass_scaled_mm"):
            return _chosen(device, "cutlass", "vLLM's CUTLASS int8 GEMM behind HAQ's quantization")
        if _triton_available() and ampere:
            return _chosen(device, "triton", "Triton int8 kernels")
        if ops is not None and hasattr(ops, "cutlass_scaled_mm"):
            why = "Triton is not importable" if ampere else "this GPU is older than sm_80 (Triton's int8 tl.dot)"
            return _chosen(device, "cutlass", f"{why}; vLLM CUTLASS int8 ops")
    return _chosen(device, "torch", "no usable Triton or vLLM int8 ops: torch._int_mm on CUDA, exact fp32-BLAS "
                   "chunks on CPU", level=logging.WARNING)


# The device types each backend runs on. $HAQ_INT8_BACKEND applies where its backend runs and leaves the
# other devices to "auto": on a GPU host the offload engine also computes experts from host memory, and
# HAQ_INT8_BACKEND=triton (or cutlass) must not launch GPU kernels on those CPU tensors.
_RUNS_ON = {"onednn": ("cpu",), "cutlass": ("cuda",), "triton": ("cuda",), "torch": ("cpu", "cuda")}


def _env_backend(device: torch.device) -> str:
    """``$HAQ_INT8_BACKEND`` for ``device``: its value where that backend runs on this device type, else "auto"."""
    value = os.environ.get(_ENV_BACKEND) or "auto"
    if value == "auto" or value not in _RUNS_ON or device.type in _RUNS_ON[value]:
        return value  # an unknown name is refused by select_backend
    if ("env", device.type, value) not in _LOGGED:
        _LOGGED.add(("env", device.type, value))
        log.info("vllm-haq: %s=%s does not run on %s; the %s backend is chosen automatically", _ENV_BACKEND,
                 value, device.type, device.type)
    return "auto"


_LOGGED: set[tuple[str, ...]] = set()


def _chosen(device: torch.device, backend: str, why: str, level: int = logging.INFO) -> str:
    """Log the automatic choice once per device type, backend and reason (it is made for every layer)."""
    if (device.type, backend, why) not in _LOGGED:
        _LOGGED.add((device.type, backend, why))
        log.log(level, "vllm-haq: int8 GEMM backend for %s: %s (%s)", device.type, backend, why)
    return backend


_TRITON_OK: bool | None = None


def _triton_available() -> bool:
    """Whether Triton imports (cached); importing it does not import this package's kernels."""
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401, PLC0415 (optional dependency)

            _TRITON_OK = True
        except Exception as exc:  # noqa: BLE001 - absent or broken: fall back
            log.info("vllm-haq: Triton is not importable (%s)", exc)
            _TRITON_OK = False
    return _TRITON_OK


ONEDNN_EXACT = "exact"
ONEDNN_SATURATING = "int16-saturating"  # vllm_haq.quant.int8_matmul_int16_saturating: x86 without VNNI/AMX
_ONEDNN_ARITHMETIC: list[str | None] = []  # cached answer of onednn_int8_arithmetic()


def onednn_int8_arithmetic() -> str | None:
    """What vLLM's oneDNN int8 GEMM computes on this CPU (cached): ``"exact"`` (int32-exact products),
    ``"int16-saturating"`` (bit-identical to :func:`~vllm_haq.quant.int8_matmul_int16_saturating`, the
    arithmetic of CPUs without VNNI/AMX), ``"unknown"`` (neither, or the self-check failed), or ``None``
    where vLLM has no oneDNN int8 ops.

    One full-range GEMM decides it. Its activations pin each row's max at 127 so that quantization is the
    identity and only the GEMM is judged. The handler keeps raw pointers to the weight scales (vLLM holds
    them as layer parameters), so they must outlive every call: a temporary here made the check read freed
    memory and fail on every CPU.
    """
    if not _ONEDNN_ARITHMETIC:
        _ONEDNN_ARITHMETIC.append(_measure_onednn_arithmetic())
        log.info("vllm-haq: vLLM's oneDNN int8 GEMM on this CPU: %s", _ONEDNN_ARITHMETIC[0])
    return _ONEDNN_ARITHMETIC[0]


def _measure_onednn_arithmetic() -> str | None:
    ops = _vllm_ops()
    if ops is None or not hasattr(ops, "create_onednn_scaled_mm"):
        return None
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randint(-127, 128, (64, 512), generator=gen, dtype=torch.int8)
        x = torch.randint(-127, 128, (16, 512), generator=gen).float()
        x[:, 0] = 127.0
        w_scale = torch.ones(64, 1)  # referenced by the handler: alive until the GEMM below has run
        handler = ops.create_onednn_scaled_mm(w.t(), w_scale, torch.float32, True, False, 32)
        x_q, x_s = quantize_per_token(x)
        out = torch.full((16, 64), float("nan"))
        ops.onednn_scaled_mm(handler, x_q, out, x_s, None, None, None)
        del handler, w_scale
    except Exception as exc:  # noqa: BLE001 - any failure means: do not use it
        log.info("vllm-haq: oneDNN int8 self-check failed (%s)", exc)
        return "unknown"
    got = out.double()
    if torch.equal(got, (x_q.double() @ w.double().t())):
        return ONEDNN_EXACT
    if torch.equal(got, int8_matmul_int16_saturating(x_q, w).double()):
        return ONEDNN_SATURATING
    return "unknown"


def _onednn_is_exact() -> bool:
    """Whether vLLM's oneDNN int8 GEMM computes HAQ's exact int32 products on this CPU."""
    return onednn_int8_arithmetic() == ONEDNN_EXACT


TokenAmax = Callable[[torch.Tensor], torch.Tensor]


class ScaledInt8Gemm:
    """One prepared int8 weight matrix ``w_q`` [N, K] with scales [N, 1], callable on activations.

    ``shard_amax`` is for a tensor-parallel shard of the input (row-parallel layers): it maps this
    shard's per-token max |x| [M, 1] to the max over all shards, so that each rank quantizes a token
    with the scale of the unsharded layer and the ranks' int32 partial products add up to the
    unsharded product. Every backend then quantizes with that max (HAQ's ``quantize_per_token`` with
    ``amax``) and multiplies the weight as loaded: no extra column, no copy of the weight, K unchanged
    (``torch._int_mm`` needs K % 8 == 0, Triton specializes on K % 16).
    """

    def __init__(self, w_q: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype,
                 smooth: torch.Tensor | None = None, backend: str | None = None,
                 shard_amax: TokenAmax | None = None, rotation: int | None = None):
        if w_q.dtype != torch.int8 or w_q.dim() != 2:
            raise ValueError(f"expected int8 [N, K] weight, got {w_q.dtype} {tuple(w_q.shape)}")
        self.shard_amax = shard_amax
        self.n, self.k = w_q.shape
        self.out_dtype = out_dtype
        self.smooth = None if smooth is None else smooth.float()
        self.rotation = rotation  # block-Hadamard order applied to the (smoothed) activations, or None
        if rotation is not None:
            check_block(rotation, self.k, "ScaledInt8Gemm")
        self.w_scale = w_scale.float().reshape(self.n, 1).contiguous()
        self.backend = select_backend(w_q.device, backend, cutlass_fits(self.n, self.k, out_dtype, smooth is not None))
        ops = _vllm_ops() if self.backend in ("onednn", "cutlass") else None
        if self.backend == "onednn":
            # oneDNN prepacks the weight: the handler owns it, w_q can be freed by the caller.
            self._ops = ops
            self._handler = ops.create_onednn_scaled_mm(w_q.t(), self.w_scale, out_dtype, True, False, 32)
        elif self.backend == "cutlass":
            self._ops = ops
            self.w_t = w_q.t()  # column-major [K, N] as CUTLASS expects
        elif self.backend == "triton":
            from vllm_haq.kernels.triton_gemm import triton_w8a8_linear  # noqa: PLC0415 (see module doc)

            self._triton_linear = triton_w8a8_linear
            self.w_q = w_q.contiguous()  # row-major [N, K], the layout the kernel reads
        else:
            # A view, not a copy: exact_int8_mm reads row blocks of it on CPU, and on CUDA a
            # transposed row-major weight is the column-major operand cuBLASLt's int8 GEMM wants.
            self.w_t = w_q.t()
            # Decided here, at load time: vLLM's CPU build traces __call__ with torch.compile (fullgraph), and
            # the first check builds or loads the kernel under a lock, which Dynamo cannot trace.
            self.cpu_kernel = w_q.device.type == "cpu" and cpu_int8.available()
            # The whole linear in the kernel's two ops (transform + quantization, GEMM + scaling): a
            # tensor-parallel shard's shared max keeps the torch steps.
            self._cpu_linear = self.cpu_kernel and shard_amax is None
            if self._cpu_linear:
                self._w_scale_n = self.w_scale.reshape(-1)

    def _transformed(self, x: torch.Tensor) -> torch.Tensor:
        """The activations this GEMM quantizes, float32 [M, K]: ``x`` divided by the smoothing, then rotated."""
        x = x.reshape(-1, x.shape[-1]).float()
        x = x if self.smooth is None else x / self.smooth
        return x if self.rotation is None else rotate(x, self.rotation)

    def token_amax(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token max |x| [M, 1] (float32) of the activations this GEMM quantizes (after smoothing and rotation)."""
        return self._transformed(x).abs().amax(-1, keepdim=True)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None,
                 amax: torch.Tensor | None = None) -> torch.Tensor:
        """``amax`` (with ``shard_amax``): the all-shard per-token max when the caller already has it."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if getattr(self, "_cpu_linear", False):
            out = cpu_int8.w8a8_linear(x, self.w_t.t(), self._w_scale_n, None if bias is None else bias.float(),
                                       self.smooth, self.rotation, self.out_dtype)
            return out.reshape(*shape[:-1], self.n)
        smooth = self.smooth
        if self.rotation is not None or self.shard_amax is not None:
            # block-diagonal rotation: a shard of whole blocks rotates on its own
            x, smooth = self._transformed(x), None
        if self.shard_amax is not None:  # the shards' max of what they quantize
            amax = self.shard_amax(x.abs().amax(-1, keepdim=True)) if amax is None else amax
        else:
            amax = None
        if self.backend == "triton":  # smoothing is fused into its quantization
            out = self._triton_linear(x, self.w_q, self.w_scale, bias, smooth, self.out_dtype, amax=amax)
            return out.reshape(*shape[:-1], self.n)
        if smooth is not None:
            x = x.float() / smooth
        if self.backend == "onednn":
            x_q, x_s = quantize_per_token(x, amax=amax)  # HAQ's rounding (vLLM's op rounds some ties the other way)
            out = torch.empty((x.shape[0], self.n), dtype=self.out_dtype, device=x.device)
            self._ops.onednn_scaled_mm(self._handler, x_q, out, x_s, None, None, bias)
        elif self.backend == "cutlass":
            out = torch.ops.vllm_haq.cutlass_w8a8_linear(x, self.w_t, self.w_scale, bias, amax, self.out_dtype)
        else:
            out = torch_scaled_int8_mm(x, self.w_t, self.w_scale, bias, self.out_dtype, amax, self.cpu_kernel)
        return out.reshape(*shape[:-1], self.n)


def torch_scaled_int8_mm(x: torch.Tensor, w_t: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None, out_dtype: torch.dtype,
                         amax: torch.Tensor | None = None, cpu_kernel: bool | None = None) -> torch.Tensor:
    """Per-token quantize ``x`` [M, K] (with ``amax`` instead of its own max, when given), exact int32
    ``torch._int_mm`` with ``w_t`` [K, N], scale, bias. ``cpu_kernel``: see :func:`exact_int8_mm`."""
    x_q, x_s = quantize_per_token(x, amax=amax)
    y = exact_int8_mm(x_q, w_t, cpu_kernel).float() * x_s * w_scale.reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def exact_int8_mm(x_q: torch.Tensor, w_t: torch.Tensor, cpu_kernel: bool | None = None) -> torch.Tensor:
    """int32 [M, N] = int8 [M, K] @ int8 [K, N], exactly, fast on both CPU and CUDA.

    ``cpu_kernel``: whether the CPU int8 kernel is available, as the caller found out eagerly (compiled
    callers must: see ScaledInt8Gemm); None asks :func:`vllm_haq.kernels.cpu_int8.available` now."""
    if x_q.is_cuda:
        return torch.ops.vllm_haq.cuda_int8_mm(x_q, w_t)
    if cpu_kernel is None:
        cpu_kernel = cpu_int8.available()
    if w_t.t().is_contiguous() and cpu_kernel:  # w_t: a transposed view of the row-major weight
        return torch.ops.vllm_haq.cpu_int8_mm(x_q, w_t.t(), 0)
    return blas_int8_mm(x_q, w_t)


def blas_int8_mm(x_q: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """The same integers through float32 BLAS in K-chunks (CPUs without the int8 kernel; benchmarks' baseline)."""
    return exact_int8_products(x_q, w_t)


@torch.library.custom_op("vllm_haq::cuda_int8_mm", mutates_args=())
def _cuda_int8_mm(x_q: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm`` for any M, as one opaque op. cuBLASLt's int8 GEMM needs M > 16, so small M is padded;
    traced by torch.compile, that branch would be decided once on the symbolic M's hint and kept for every
    size, since vLLM drops all guards (see :func:`vllm_haq.kernels.triton_gemm._linear_op`)."""
    m = x_q.shape[0]
    if m <= 16:
        x_q = torch.nn.functional.pad(x_q, (0, 0, 0, 17 - m))
    return torch._int_mm(x_q, w_t)[:m]


@_cuda_int8_mm.register_fake
def _(x_q, w_t):
    return x_q.new_empty((x_q.shape[0], w_t.shape[1]), dtype=torch.int32)


@torch.library.custom_op("vllm_haq::cutlass_w8a8_linear", mutates_args=())
def _cutlass_linear(x: torch.Tensor, w_t: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                    amax: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """HAQ's per-token quantization (Triton's one-kernel version when there is no given max), then vLLM's
    CUTLASS GEMM on the column-major weight ``w_t`` [K, N]; opaque to torch.compile like the other CUDA ops."""
    if amax is None and _triton_available():
        from vllm_haq.kernels.triton_quant import triton_quantize_per_token  # noqa: PLC0415 (see module doc)

        x_q, x_s = triton_quantize_per_token(x)
    else:
        x_q, x_s = quantize_per_token(x, amax=amax)
    return _vllm_ops().cutlass_scaled_mm(x_q, w_t, scale_a=x_s, scale_b=w_scale, out_dtype=out_dtype, bias=bias)


@_cutlass_linear.register_fake
def _(x, w_t, w_scale, bias, amax, out_dtype):
    return x.new_empty((x.shape[0], w_t.shape[1]), dtype=out_dtype)
