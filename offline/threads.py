"""How the converter's libraries wait for work: settings that change how fast a conversion runs, never what it
computes (the same threads split the same work; only idle threads behave differently)."""

from __future__ import annotations

import os

# OpenBLAS's own variable (read once, when the library loads): log2 of the CPU cycles an idle worker thread spins
# before it sleeps. Its default, 28 (~0.1 s), left a core spinning after every LAPACK call of GPTQ's
# factorizations (scipy's OpenBLAS, 16 a SmolLM2 layer), taken from the torch threads that ran next; 16 (~20 µs)
# still keeps a worker awake between the BLAS calls inside one factorization.
OPENBLAS_THREAD_TIMEOUT = ("OPENBLAS_THREAD_TIMEOUT", "16")


def quiet_openblas_waits() -> None:
    """Set OPENBLAS_THREAD_TIMEOUT for the OpenBLAS that scipy loads, unless the user set it. Effective only before
    scipy.linalg is first imported (transformers imports it), so ``offline.convert.convert`` calls it first.

    A 4-layer SmolLM2 conversion (64 x 512 tokens, 2 cores): 23.0-23.9 s with the default, 19.8-20.2 s with 4;
    the α search of one layer 1.15-1.3 s, 0.7-0.85 s with 4 to 20; the checkpoint the same bits."""
    name, value = OPENBLAS_THREAD_TIMEOUT
    os.environ.setdefault(name, value)
