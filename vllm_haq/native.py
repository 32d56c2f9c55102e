"""vllm-haq's C++ extensions, built on first use: the one place that builds, caches, locks and loads them.

Why a module of its own: the runtime's CPU int8 kernel (:mod:`vllm_haq.kernels.cpu_int8`) and the converter's
GPTQ column loop (:mod:`vllm_haq.quant.gptq_cpu`) are built the same way, and ``vllm_haq.quant`` may not import
``vllm_haq.kernels`` (docs/architecture.md). Imports the standard library and torch only.

Each extension is built with ``torch.utils.cpp_extension.load`` (g++, ninja; cached in torch's extensions
directory), into one build directory per source text, with ``-O3 -ffp-contract=off`` (no fused multiply-adds the
source did not write: the kernels reproduce torch's float steps bit for bit). Where no compiler is found or the
build fails, :class:`Extension` records the reason, logs it once, and callers keep their torch path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from typing import Callable

STALE_LOCK_S = 600  # a build lock older than this was left by a process killed while holding it
CFLAGS = ["-O3", "-ffp-contract=off", "-fopenmp"]
OFF = ("off", "0", "false", "no")  # values of an extension's environment switch that turn it off


log = logging.getLogger("vllm_haq")


def switched_off(env: str) -> str | None:
    """The reason to leave an extension unused when ``$env`` turns it off (``off``, ``0``, ``false``, ``no``)."""
    value = os.environ.get(env, "")
    return f"{env}={value}" if value.lower() in OFF else None


def _source_hash(source: str) -> str:
    """The hash of ``source``'s text and of the local headers it includes (``#include "x.h"``, next to it): a
    changed header must not reuse a build of the old one."""
    digest = hashlib.sha256()
    with open(source, "rb") as f:
        text = f.read()
    digest.update(text)
    for header in re.findall(rb'^#include "([^"]+)"', text, flags=re.M):
        with open(os.path.join(os.path.dirname(source), header.decode()), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


def load(name: str, source: str, cflags: list[str]):
    """The extension ``name`` + the hash of ``source``'s text (and its local headers), built from ``source`` with
    :data:`CFLAGS` and ``cflags`` (and OpenMP) unless already built; raises where it cannot be built.

    One build directory per source text: checkouts of different versions (git worktrees, an upgrade beside a
    running server) would otherwise rebuild torch's one directory of that name under each other. torch's
    ``load`` takes a lock file in the build directory on every call, even to find the build up to date, and a
    process killed while holding it (a stopped server, a timed-out job) leaves it behind: every later load then
    waits forever. A built module is therefore imported without the lock, and a build lock older than
    ``STALE_LOCK_S`` is removed (with a warning) before building."""
    from torch.utils import cpp_extension  # noqa: PLC0415 (needs a compiler only when used)

    name = f"{name}_{_source_hash(source)}"
    build_dir = cpp_extension._get_build_directory(name, verbose=False)
    if os.path.exists(os.path.join(build_dir, name + cpp_extension.LIB_EXT)):
        return cpp_extension._import_module_from_library(name, build_dir, True)
    lock = os.path.join(build_dir, "lock")
    if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > STALE_LOCK_S:
        log.warning("vllm-haq: removing the stale build lock %s (left by a killed process)", lock)
        os.remove(lock)
    return cpp_extension.load(name=name, sources=[source], extra_cflags=[*CFLAGS, *cflags],
                              extra_ldflags=["-fopenmp"], verbose=False)


def try_load(name: str, source: str, cflags: list[str], why: str) -> tuple[object, str]:
    """(module, ``why``) from :func:`load`, or (None, the failure) where it cannot be built: the last step of an
    :class:`Extension`'s ``build``."""
    try:
        return load(name, source, cflags), why
    except Exception as exc:  # noqa: BLE001 - no compiler, failed build: the caller keeps its torch path
        return None, f"building {source} ({name}) failed: {type(exc).__name__}: {str(exc).strip()[-300:]}"


class Extension:
    """One extension, decided once per process: ``build()`` returns (module or None, reason), and the outcome
    is logged once on ``logger`` as "vllm-haq: <what> enabled (reason)" or "... not used (reason)".

    ``state`` holds "module" and "why" once decided (absent before: a caller can tell that nothing was built)."""

    def __init__(self, what: str, build: Callable[[], tuple[object, str]], logger: logging.Logger):
        self.what, self._build, self._log = what, build, logger
        self.state: dict = {}
        self._lock = threading.Lock()

    def module(self):
        """The built extension or None."""
        if "module" not in self.state:
            with self._lock:
                if "module" not in self.state:
                    module, why = self._build()
                    self.state["module"], self.state["why"] = module, why
                    self._log.log(logging.INFO if module else logging.WARNING, "vllm-haq: %s %s (%s)", self.what,
                                  "enabled" if module else "not used", why)
        return self.state["module"]
