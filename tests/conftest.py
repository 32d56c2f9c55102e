"""Shared fixtures: tiny random models, converted checkpoints, ../shared paths, vLLM engines."""

from __future__ import annotations

import gc
import os
import sys

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# vLLM's engine core and its worker run in the test process: a new engine then starts in ~3 s instead of
# ~30 s (two fresh processes, each importing torch and vLLM), which keeps the suite within its time budget.
# Tensor-parallel engines still start their workers as processes. Tests that need the separate processes
# of a real deployment start `haq serve` or a script in a subprocess.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, os.path.dirname(__file__))

from tiny_models import build_tiny_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("HAQ_SHARED_DIR", os.path.join(os.path.dirname(REPO), "shared"))
CORPORA = os.path.join(SHARED, "data", "corpora")
MODELS = os.path.join(SHARED, "models")


def shared_path(*parts: str) -> str:
    """Path under ../shared, or skip the test with the reason (a user's clone has no ../shared)."""
    path = os.path.join(SHARED, *parts)
    if not os.path.exists(path):
        pytest.skip(f"needs {path} (the project's shared fixtures; absent outside the project's machines)")
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """family -> directory of a tiny random bf16 model (built once per session)."""
    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            cache[family] = build_tiny_model(family, str(tmp_path_factory.mktemp(f"tiny-{family}")))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    """A local calibration text (no ../shared needed)."""
    from tiny_models import CORPUS

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join([CORPUS[i : i + 400] for i in range(0, len(CORPUS), 400)]))
    return str(path)


@pytest.fixture(scope="session")
def converted(tiny_dir, calib_file, tmp_path_factory):
    """(family, **ConvertOptions fields) -> directory of that conversion of the tiny model (once per session;
    calibrated on ``calib_file``, 4 windows of 64 tokens)."""
    from offline.convert import ConvertOptions, convert

    cache: dict[tuple, str] = {}

    def get(family: str, **opts) -> str:
        key = (family, tuple(sorted(opts.items())))
        if key not in cache:
            out = str(tmp_path_factory.mktemp(f"haq-{family}") / "ckpt")
            convert(tiny_dir(family), out, ConvertOptions(calib=[calib_file], samples=4, seq_len=64, **opts))
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="session")
def haq_dir(converted):
    """family -> directory of the HAQ checkpoint converted from the tiny model (round to nearest)."""
    return lambda family: converted(family, method="rtn")


def shutdown_llm(llm) -> None:
    """Stop an LLM's engine processes before the next engine starts (CPU memory is shared)."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()
