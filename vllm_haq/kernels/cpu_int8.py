"""Exact int8 GEMM on the CPU at memory bandwidth: a small AVX2 / VNNI C++ extension, built on first use.

Why: the exact fallback (:func:`vllm_haq.kernels.int8_gemm.exact_int8_mm` through fp32 BLAS in K-chunks)
converts the whole int8 weight into fresh fp32 temporaries on every call (a Mixtral-8x7B expert: 0.7 GB of
float32, page faults each time): 2% of the host's read bandwidth at decode. This kernel reads the int8
weight once per call (``cpu/int8_gemm.cpp``: vpabsb/vpsignb + vpmaddubsw + vpmaddwd, exact for activations in
[-127, 127] and any int8 weight) with its own OpenMP threads, however many torch was told to use (vLLM sets one
in its workers). Hosts with AVX-512 VNNI or AVX-VNNI get the same source built with vpdpbusd (:data:`BUILDS`).

Built with ``torch.utils.cpp_extension.load`` by :mod:`vllm_haq.native` (g++, ninja; cached in torch's
extensions directory, ~30 s the first time). Where the CPU lacks AVX2, no compiler is found, the build fails, or
``HAQ_CPU_INT8_KERNEL=off``, :func:`available` is False, the reason is logged once and callers keep the BLAS
path. The call is one opaque op, ``vllm_haq::cpu_int8_mm``, so torch.compile (vLLM's CPU build) does not trace into it.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import NamedTuple

import torch

from vllm_haq import native
from vllm_haq.quant import quantize_input

log = logging.getLogger("vllm_haq.kernels")

ENV_SWITCH = "HAQ_CPU_INT8_KERNEL"  # "off": never build or use it; a build's name (BUILDS): that build
ENV_THREADS = "HAQ_CPU_GEMM_THREADS"  # threads per call (default: the cores this process may run on)
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu", "int8_gemm.cpp")


class Build(NamedTuple):
    extension: str  # the extension's name (one build directory each)
    cflags: tuple[str, ...]  # beyond -mavx2 -mfma
    cpu_flags: tuple[str, ...]  # /proc/cpuinfo names of what the build's instructions need
    isa: str
    step: str  # the instructions of one step

    def what(self) -> str:
        return f"{self.isa} exact int8 GEMM ({self.step})"

    def compiler_flags(self) -> list[str]:
        return ["-mavx2", "-mfma", *self.cflags]

    def missing(self, cpu_flags: set[str]) -> list[str]:
        """What the build's instructions need that a CPU with ``cpu_flags`` lacks (it would die of an illegal
        instruction)."""
        return [flag for flag in self.cpu_flags if flag not in cpu_flags]


# The builds of cpu/int8_gemm.cpp, the host's first match chosen. AVX-512 VNNI: one vpdpbusd per 32 or 64
# products (the AVX2 step is three instructions), 32 registers for 4-token groups and 64-byte tiles at 16 tokens.
# AVX-VNNI (Intel client cores since Alder Lake, Sierra Forest: no AVX-512): the same vpdpbusd, VEX-encoded at 32
# bytes, in the AVX2 register budget; on a Zen 5 core it took 4 and 16 tokens an expert 1.35-1.8x faster than the
# AVX2 build. Decode (1-2 tokens) is memory-bound in every build.
BUILDS = {
    "avx512_vnni": Build("haq_cpu_int8_vnni", ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-DHAQ_VNNI"),
                         ("avx512_vnni", "avx512vl", "avx512bw"), "AVX-512 VNNI", "vpdpbusd"),
    "avx_vnni": Build("haq_cpu_int8_avxvnni", ("-mavxvnni", "-DHAQ_AVX_VNNI"), ("avx_vnni",), "AVX-VNNI",
                      "256-bit VEX vpdpbusd"),
    "avx2": Build("haq_cpu_int8", (), (), "AVX2", "vpmaddubsw + vpmaddwd"),
}
_DEFAULT = ("", "on", "auto", "1", "true", "yes")  # values of the switch that leave the choice to the host


def _cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere: the AVX2 build is chosen then)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _candidates(switch: str) -> list[tuple[Build, str]]:
    """(build, reason) to try in turn: the first of :data:`BUILDS` whose instructions the CPU has, or the one
    ``$HAQ_CPU_INT8_KERNEL`` names (where the CPU can run it: a build it cannot would die of an illegal
    instruction, so the host's choice serves instead, and the reason says so); then the CPU's other builds after
    it (a compiler without -mavxvnni still gets the AVX2 build). Any other value of the switch is an error."""
    if switch not in BUILDS and switch not in _DEFAULT:
        raise ValueError(f"{ENV_SWITCH}={switch!r}: expected off, on, or one of {', '.join(BUILDS)}")
    flags = _cpu_flags()
    runs = [name for name, b in BUILDS.items() if not b.missing(flags)]
    if switch in runs:
        first, why = switch, f"{ENV_SWITCH}={switch}"
    elif switch in BUILDS:
        first = runs[0]
        lacks = ", ".join(BUILDS[switch].missing(flags))
        why = f"{ENV_SWITCH}={switch} asks for a build this CPU cannot run (no {lacks})"
    else:
        first = runs[0]
        why = "; ".join(f"no {b.isa} on this CPU" for n, b in BUILDS.items() if n not in runs) or "this CPU's best"
    later = runs[runs.index(first) + 1:]
    return [(BUILDS[first], why)] + [(BUILDS[n], f"the {BUILDS[first].isa} build failed") for n in later]


def _build():
    off = native.switched_off(ENV_SWITCH)
    if off:
        return None, off
    switch = os.environ.get(ENV_SWITCH, "").strip().lower()
    capability = torch.backends.cpu.get_cpu_capability()
    if "AVX2" not in capability and "AVX512" not in capability:
        return None, f"this CPU has no AVX2 (torch reports {capability})"
    failed = []
    for build, why in _candidates(switch):
        module, msg = native.try_load(build.extension, _SOURCE, build.compiler_flags(), f"{build.what()}; {why}")
        if module is not None:
            return module, "; ".join([msg, *failed])
        failed.append(msg)
    return None, "; ".join(failed)


_extension = native.Extension("CPU int8 kernel", _build, log)
_state = _extension.state  # "module" and "why", once decided


def _module():
    """The built extension or None (decided once per process, the reason logged)."""
    return _extension.module()


def available() -> bool:
    return _module() is not None


def isa() -> str | None:
    """Which build serves this process: "avx512_vnni", "avx_vnni", "avx2" (:data:`BUILDS`), or None (the BLAS
    path)."""
    module = _module()
    return None if module is None else module.isa


_local = threading.local()


def host_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_threads_for_this_thread(threads: int) -> None:
    """This Python thread's GEMM calls use ``threads`` (an offload engine's CPU workers run side by side: each
    takes its share of the cores instead of every call starting a team as large as the host)."""
    _local.threads = max(1, int(threads))


def default_threads() -> int:
    """``$HAQ_CPU_GEMM_THREADS``, else this thread's share (:func:`set_threads_for_this_thread`), else all cores."""
    value = os.environ.get(ENV_THREADS)
    if value:
        return max(1, int(value))
    return getattr(_local, "threads", None) or host_cores()


@torch.library.custom_op("vllm_haq::cpu_int8_mm", mutates_args=())
def cpu_int8_mm(x_q: torch.Tensor, w_q: torch.Tensor, threads: int = 0) -> torch.Tensor:
    """int32 [M, N] = int8 ``x_q`` [M, K] @ int8 ``w_q`` [N, K]ᵀ, exactly (``x_q`` in [-127, 127], as HAQ's
    quantization writes it; ``w_q`` any int8).

    ``w_q`` is the row-major checkpoint weight (not transposed). ``threads`` 0: :func:`default_threads`."""
    return _loaded().int8_mm(x_q.contiguous(), w_q.contiguous(), threads or default_threads())


@cpu_int8_mm.register_fake
def _(x_q, w_q, threads=0):
    return x_q.new_empty((x_q.shape[0], w_q.shape[0]), dtype=torch.int32)


@torch.library.custom_op("vllm_haq::cpu_quantize_rows", mutates_args=())
def cpu_quantize_rows(x: torch.Tensor, smooth: torch.Tensor | None, rotation: int,
                      threads: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [M, K], float32 scales [M, 1]) of float32 or bf16 ``x`` [M, K]: divided by ``smooth``, rotated by
    the block-Hadamard of order ``rotation`` (0: none), quantized per token, bit for bit as
    ``ScaledInt8Gemm._transformed`` + ``quant.quantize_per_token`` do it in torch (tests/test_cpu_int8.py),
    in one pass per row instead of ~6 + log2(rotation) passes over the whole activation matrix."""
    return tuple(_loaded().quantize_rows(x.contiguous(), smooth, rotation, threads or default_threads()))


@cpu_quantize_rows.register_fake
def _(x, smooth, rotation, threads=0):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0], 1), dtype=torch.float32)


@torch.library.custom_op("vllm_haq::cpu_scaled_int8_mm", mutates_args=())
def cpu_scaled_int8_mm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None, out_dtype: torch.dtype, threads: int = 0) -> torch.Tensor:
    """[M, N] = (int32 products * x_scale) * w_scale (+ bias) in float32, stored as ``out_dtype`` (float32 or
    bfloat16): ``torch_scaled_int8_mm``'s float steps in its order, written once."""
    if out_dtype not in (torch.float32, torch.bfloat16):
        return cpu_scaled_int8_mm(x_q, x_scale, w_q, w_scale, bias, torch.float32, threads).to(out_dtype)
    return _loaded().scaled_mm(x_q.contiguous(), x_scale, w_q.contiguous(), w_scale, bias,
                               out_dtype == torch.bfloat16, threads or default_threads())


@cpu_scaled_int8_mm.register_fake
def _(x_q, x_scale, w_q, w_scale, bias, out_dtype, threads=0):
    return x_q.new_empty((x_q.shape[0], w_q.shape[0]), dtype=out_dtype)


def native_quantize_input(x: torch.Tensor, smooth: torch.Tensor | None = None, rotation: int | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`vllm_haq.quant.quantize_input` by the CPU int8 kernel's ``quantize_rows`` where it serves (float32
    rows on the CPU, the kernel built and not ``HAQ_CPU_INT8_KERNEL=off``), else by quantize_input itself (here,
    beside the op: the converter's one place to choose).

    The same bits (the kernel's contract, tests/test_cpu_int8.py and tests/test_convert_exact.py) in one pass
    per row instead of log2(block) butterfly passes and ~6 more over the whole matrix: 3-5x faster with a
    rotation, where the converter's quantized forward and its search quantize every calibration row."""
    if (x.device.type == "cpu" and x.dtype == torch.float32
            and (smooth is None or smooth.dtype == torch.float32) and available()):
        return cpu_quantize_rows(x.reshape(-1, x.shape[-1]).contiguous(),
                                 None if smooth is None else smooth.contiguous(), rotation or 0, 0)
    return quantize_input(x, smooth, rotation)


def w8a8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                smooth: torch.Tensor | None, rotation: int | None, out_dtype: torch.dtype) -> torch.Tensor:
    """HAQ's W8A8 linear on the CPU in two opaque ops: ``out_dtype`` [M, N] of ``x`` [M, K] and the row-major
    int8 ``w_q`` [N, K] with float32 ``w_scale`` [N] (and float32 ``bias`` [N], ``smooth`` [K])."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    x_q, x_s = torch.ops.vllm_haq.cpu_quantize_rows(x.contiguous(), smooth, rotation or 0, 0)
    return torch.ops.vllm_haq.cpu_scaled_int8_mm(x_q, x_s, w_q, w_scale, bias, out_dtype, 0)


def load_build(name: str):
    """The extension of ``BUILDS[name]``, built on first use, beside the one this process serves with (so that
    ``benchmarks/cpu_experts.py --builds`` compares builds in one run). Raises where this CPU cannot run it."""
    build = BUILDS[name]
    missing = build.missing(_cpu_flags())
    if missing:
        raise ValueError(f"the {name} build needs {', '.join(missing)}, which this CPU lacks")
    return native.load(build.extension, _SOURCE, build.compiler_flags())


def _loaded():
    module = _module()
    if module is None:
        raise RuntimeError(f"vllm-haq: the CPU int8 kernel is not available ({_state.get('why')})")
    return module


def moe_routes(x: torch.Tensor, routes: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
               w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor, smooth: torch.Tensor | None,
               tok: torch.Tensor, slot: torch.Tensor, index: list[int], starts: list[int], counts: list[int],
               rotation: int | None, threads: int = 0, build=None) -> None:
    """Every route of the experts at ``index`` of the stacks (expert ids, or cache slots) in one call:
    ``routes[t, j] = topk_weights[t, j] * w2(SwiGLU(w13(x[t])))``, HAQ's W8A8 arithmetic (per-token int8
    inputs after the expert's ``smooth``, exact int32 products, scales; the down projection's input rotated
    by the block-Hadamard of order ``rotation``). ``tok``/``slot``: the step's routes sorted by expert; job
    ``i``'s are ``[starts[i], starts[i] + counts[i])``. All host tensors; ``x``, ``routes`` and the weights
    float32. One OpenMP team of ``threads`` (0: :func:`default_threads`) runs all experts' tiles together.

    Not a torch.library op: it writes into ``routes`` and is called from eager MoE code only (vLLM runs the
    MoE layer as its own opaque op), where a custom op's Python dispatch would cost more than a small expert.
    ``build``: a module from :func:`load_build` instead of this process's (benchmarks compare builds)."""
    (build or _loaded()).moe_routes(x, routes, topk_weights, w13, w13_scale, w2, w2_scale, smooth, tok, slot, index,
                                    starts, counts, rotation or 0, threads or default_threads())
