"""``make gpu-check`` in its dry mode: the GPU host's driver, run on this CPU host at tiny shapes.

A GPU host runs ``benchmarks/gpu_check.py`` once, unattended, and hands back what it wrote; a driver
that breaks on a renamed API or a missing file would waste that run. So the dry mode runs every stage
in its own subprocess with the same arguments and must report every planned check, fail none, and
write the same files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from gpucheck import plan  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"), "--dry",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    return proc, out, time.time() - t0


def test_dry_run_reports_every_check_and_fails_none(dry_run):
    proc, out, wall = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            check, status, *_ = line.split(" ", 3)[1:] + [""]
            results[check] = status
    expected = [c for stage in plan.STAGES for c in plan.checks(stage, plan.DRY_BACKENDS)]
    assert [c for c in expected if c not in results] == []
    assert {c: s for c, s in results.items() if s == "FAIL"} == {}
    # what needs CUDA is skipped, everything else ran
    cuda_only = plan.checks("graphs") + plan.checks("syncs") + ["offload/pinned-in-place"]
    assert {c for c, s in results.items() if s == "skip"} == set(cuda_only)
    assert wall < 240, f"dry run took {wall:.0f} s (about 45-60 s on 2 idle cores)"


def test_dry_run_writes_summary_tables_and_logs(dry_run):
    proc, out, _ = dry_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "dry" and summary["ok"] is True and summary["counts"]["FAIL"] == 0
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == list(plan.STAGES)
    for name, s in stages.items():
        assert s["status"] in ("ok", "skip") and s["rc"] == 0 and not s["timed_out"], s
        assert 0 < s["wall_s"] <= s["timeout_s"]
        assert {c["check"] for c in s["checks"]} >= set(plan.checks(name, plan.DRY_BACKENDS))
        assert (out / "logs" / f"{name}.log").exists()
    last = json.loads(proc.stdout.strip().splitlines()[-1])  # the JSON summary line
    assert last["gpu_check"] == "ok" and set(last["stages"]) == set(plan.STAGES)
    for table, heading in (("kernels.md", "## Linear layers"), ("offload.md", "### trace synthetic"),
                           ("checks.md", "| check | status | detail |"), ("profile/summary.md", "| haq-25 |"),
                           ("profile/haq-25.cprofile.txt", "engine.py")):
        assert heading in (out / table).read_text(), table
    assert (out / "results.txt").read_text().count("RESULT ") == sum(summary["counts"].values())
    assert not (out / "work").exists(), "the stages' scratch directory is removed"


def test_a_stage_that_dies_fails_its_checks_without_stopping_the_driver(tmp_path):
    """A timed-out stage: its checks are FAILs saying so, the next stage still runs, the exit status is 1."""
    last = plan.checks("e2e", plan.DRY_BACKENDS)[-1]
    env = dict(os.environ, HAQ_GPU_CHECK_STALL=last)  # that check hangs: the stage cannot finish on any host
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "gpu_check.py"), "--dry", "--out",
                           str(tmp_path), "--stages", "e2e,graphs", "--budget-s", "6", "--jobs", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stdout
    assert f"RESULT {last} FAIL not reached: stage e2e timed out after 6 s" in proc.stdout
    assert "RESULT e2e FAIL stage e2e timed out" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["status"] for s in summary["stages"]] == ["FAIL", "FAIL"]  # graphs: no budget left after e2e
    assert "not run: budget of 6 s spent" in (tmp_path / "results.txt").read_text()
