"""The compressed-tensors interop against the library's latest release, beside vLLM's pin (0.17.0, installed).

vLLM pins compressed-tensors, but transformers users and llm-compressor run newer releases, which read HAQ's
exports and write the checkpoints `haq import` and ``quantization="haq"`` take. The newest wheel goes into
``.ct-latest`` (``pip install --no-deps --target``: never into the venv; git-ignored; fetched again when a week
old), and the library-only tests (config round trip, rotations as transforms) run in a subprocess with that
directory first on PYTHONPATH; configs written by either version are read by the other. Without network the
tests skip, saying so. Measured: compressed-tensors 0.20.1 (2026-12), whose serializer leaves unset fields out.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from vllm_haq.format import from_compressed_tensors, to_compressed_tensors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CT_LATEST = os.path.join(REPO, ".ct-latest")
STAMP = os.path.join(CT_LATEST, ".fetched")
REFRESH_S = 7 * 24 * 3600
# the tests that use only compressed-tensors (no vLLM: it runs with its pinned version)
LIBRARY_TESTS = ["tests/test_ct_config.py",
                 "tests/test_ct_rotation.py::test_haqs_rotation_is_compressed_tensors_hadamard_transform",
                 "tests/test_ct_rotation.py::test_transform_config_round_trip_and_what_haq_refuses"]
IGNORE = ["lm_head", "model.layers.0.block_sparse_moe.gate"]
ROTATION = {"model.layers.0.mlp.down_proj": 128, "model.layers.0.self_attn.q_proj": 64}


def _latest_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([CT_LATEST, REPO])}


# run with .ct-latest first on PYTHONPATH: where the library comes from, and the pinned version's export read
# (HAQ's view of it) and rewritten by the latest release
_READ_AND_WRITE = """
import json, os, sys
import compressed_tensors
from vllm_haq.format import from_compressed_tensors, to_compressed_tensors
ignore, rotation, written = json.load(sys.stdin)
qcfg = from_compressed_tensors(written, "the pinned version's export")
print(json.dumps({"version": compressed_tensors.__version__, "dir": os.path.dirname(os.path.dirname(
    compressed_tensors.__file__)), "read": [qcfg.ignore, qcfg.input_rotation],
    "written": to_compressed_tensors(ignore, input_rotation=rotation)}))
"""


@pytest.fixture(scope="module")
def ct_latest() -> dict:
    """What the latest release in .ct-latest makes of the pinned version's export (version, dir, read, written),
    (re)installing the newest wheel there when absent or a week old."""
    if not os.path.exists(STAMP) or time.time() - os.path.getmtime(STAMP) > REFRESH_S:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--retries", "1",
               "--timeout", "30", "--target", CT_LATEST, "compressed-tensors"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip(f"downloading compressed-tensors into {CT_LATEST} timed out (no network?)")
        if done.returncode:
            why = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
            pytest.skip(f"cannot download the latest compressed-tensors into {CT_LATEST}: {why}")
        open(STAMP, "w").close()
    pinned = to_compressed_tensors(IGNORE, input_rotation=ROTATION)
    done = subprocess.run([sys.executable, "-c", _READ_AND_WRITE], input=json.dumps([IGNORE, ROTATION, pinned]),
                          env=_latest_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert os.path.samefile(got["dir"], CT_LATEST), f"compressed-tensors {got['version']} came from {got['dir']}"
    return {**got, "pinned": pinned}


def test_library_tests_pass_against_the_latest_release(ct_latest):
    import compressed_tensors

    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *LIBRARY_TESTS],
                          env=_latest_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    tail = "\n".join(done.stdout.strip().splitlines()[-15:])
    print(f"compressed-tensors {ct_latest['version']} (installed: {compressed_tensors.__version__}): "
          f"{tail.splitlines()[-1]}")
    assert done.returncode == 0 and " passed" in tail and "skipped" not in tail, tail


def test_configs_cross_between_the_pinned_and_the_latest_release(ct_latest):
    """An export written with vLLM's pin is read by the latest release, and the latest's by the pin."""
    assert ct_latest["read"] == [IGNORE, ROTATION]
    latest = ct_latest["written"]
    assert latest["version"] == ct_latest["version"]
    assert latest["transform_config"] == ct_latest["pinned"]["transform_config"]
    back = from_compressed_tensors(latest, f"compressed-tensors {ct_latest['version']} export")
    assert back.ignore == IGNORE and back.input_rotation == ROTATION
