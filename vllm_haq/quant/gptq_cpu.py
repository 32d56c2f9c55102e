"""GPTQ's column loop as compiled C++ on the CPU (``cpu/gptq_columns.cpp``), built on first use.

Why: :meth:`vllm_haq.quant.gptq.GPTQSolver._columns` in torch issues ~8 tiny ops per column, ~6.5 µs of dispatch
each: 6.7 ms per 128-column block, of which ~0.2 ms is arithmetic (a tenth of SmolLM2-135M's conversion time).
The extension runs a block in one call, the same float32 operations in the same order (bit-identical q and
err; tests/test_gptq_native.py), rows spread over OpenMP threads.

Built by :mod:`vllm_haq.native` (g++, ninja; ~20 s the first time, then cached). Where no compiler is found, the
build fails, or ``HAQ_GPTQ_CPU_KERNEL=off``, :func:`usable` is False (the build's outcome logged once) and the
torch loop runs; it also runs for tensors off the CPU.
"""

from __future__ import annotations

import logging
import os

import torch

from vllm_haq import native

log = logging.getLogger("vllm_haq.quant")

ENV_SWITCH = "HAQ_GPTQ_CPU_KERNEL"  # "off": never build or use it (read at every call: tests turn it off)
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu", "gptq_columns.cpp")


def _build():
    capability = torch.backends.cpu.get_cpu_capability()
    if "AVX2" in capability or "AVX512" in capability:  # 8-float vectors in one register, vroundps
        return native.try_load("haq_gptq_columns_avx2", _SOURCE, ["-mavx2"], "C++, AVX2")
    return native.try_load("haq_gptq_columns", _SOURCE, [], f"C++, portable (torch reports {capability})")


_extension = native.Extension("GPTQ CPU column loop", _build, log)


def usable(*tensors: torch.Tensor) -> bool:
    """Whether :func:`columns` serves these tensors: all float32 on the CPU, the extension built and not off."""
    if native.switched_off(ENV_SWITCH) or not all(t.device.type == "cpu" and t.dtype == torch.float32
                                                  for t in tensors):
        return False
    return _extension.module() is not None


def columns(w_t: torch.Tensor, scale: torch.Tensor, hinv_blk: torch.Tensor, q_t: torch.Tensor,
            err_t: torch.Tensor, threads: int = 0) -> None:
    """GPTQSolver._columns' loop over ``w_t`` [n, rows] (contiguous, updated in place), ``scale`` [rows] and
    ``hinv_blk`` [n, n] (rows may be strided), into ``q_t`` (int8) and ``err_t`` (float32) [n, rows], with up to
    ``threads`` OpenMP threads (0: torch's thread count). Releases the GIL."""
    _extension.module().columns(w_t, scale, hinv_blk, q_t, err_t, threads or torch.get_num_threads())
