"""``make gpu-check``: everything a GPU host must confirm, in one command, within 8 minutes on an H200.

    python benchmarks/gpu_check.py --out out/gpu_check      # GPU host: torch + Triton + transformers, no vLLM
    python benchmarks/gpu_check.py --dry --out /tmp/gc      # CPU host: the same driver, tiny shapes (make test)

Stages (``benchmarks/gpucheck/*_stage.py``; what each checks and why its tolerance, in its docstring;
their time budgets in ``benchmarks/gpucheck/plan.py``): kernels, graphs, offload, syncs, e2e, benches,
convert.
Each runs in its own subprocess with a timeout, so a crash, a hang or a CUDA error in one stage costs
only that stage. Nothing is read from the network, from vLLM or from ../shared: every input is generated.

Output: one ``RESULT <check> ok|FAIL|skip <detail>`` line per check as it finishes, one ``STAGE`` line
per stage with its wall time, and at the end a JSON summary line. Files in ``--out``: ``results.txt``
(the RESULT lines), ``summary.json``, ``checks.md`` (one table), ``kernels.md``, ``offload.md`` and ``profile/`` (the
benchmark tables), ``logs/<stage>.log`` (each stage's full output), ``stages/<stage>.json``.

Dry mode (``--dry``, and the default where torch sees no CUDA device) runs every stage in its subprocess
with the same arguments on the CPU at tiny shapes: kernels against the references (Triton in its
interpreter), the offload engine on device "cpu", conversion + generation on the CPU, both benchmarks'
smoke runs; what needs CUDA (graphs, sync counting) reports ``skip (dry: needs CUDA)``. Exit status 0
when no check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from gpucheck import plan  # noqa: E402

RESULT_RE = re.compile(r"^RESULT (\S+) (ok|FAIL|skip)\b ?(.*)$")
_print_lock = threading.Lock()


def say(line: str) -> None:
    with _print_lock:
        print(line, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", default=os.path.join(REPO, "out", "gpu_check"), help="results directory (created)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry", action="store_true", help="CPU dry run (default where no CUDA device is visible)")
    mode.add_argument("--gpu", action="store_true", help="the GPU run; refuse to fall back to the dry run")
    p.add_argument("--stages", default=",".join(plan.STAGES), help="comma-separated subset of the stages")
    p.add_argument("--jobs", type=int, default=None, help="stages run at once (default: 1 on a GPU, 2 dry)")
    p.add_argument("--budget-s", type=float, default=None, help="total time budget (default: plan.TOTAL_BUDGET_S)")
    return p.parse_args(argv)


def choose_mode(args) -> str:
    if args.dry:
        return "dry"
    import torch  # the driver itself never touches the GPU; the stages do

    if torch.cuda.is_available():
        return "gpu"
    if args.gpu:
        sys.exit("--gpu: torch sees no CUDA device (torch %s)" % torch.__version__)
    say("gpu-check: torch sees no CUDA device: dry mode")
    return "dry"


class StageRun:
    """One stage's subprocess: its PLAN and RESULT lines, exit status and wall time."""

    def __init__(self, name: str, mode: str, out: str, timeout: float):
        self.name, self.mode, self.out, self.timeout = name, mode, out, timeout
        self.planned: list[str] = []
        self.results: dict[str, dict] = {}
        self.rc: int | None = None
        self.timed_out = False
        self.wall = 0.0

    def run(self) -> "StageRun":
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([REPO, os.path.join(REPO, "benchmarks")]
                                            + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        cmd = [sys.executable, "-m", f"gpucheck.{self.name}_stage", "--mode", self.mode, "--out", self.out]
        log_path = os.path.join(self.out, "logs", f"{self.name}.log")
        t0 = time.monotonic()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, bufsize=1, start_new_session=True)
            lines: queue.Queue = queue.Queue()
            reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)],
                                      daemon=True)
            reader.start()
            deadline = t0 + self.timeout
            while True:
                try:
                    line = lines.get(timeout=max(0.05, deadline - time.monotonic()))
                except queue.Empty:
                    if time.monotonic() >= deadline:
                        self.timed_out = True
                        self._kill(proc)
                        break
                    continue
                if line is None:
                    break
                log.write(line)
                self._line(line.rstrip("\n"))
            self.rc = proc.wait()
        self.wall = time.monotonic() - t0
        self._close()
        return self

    @staticmethod
    def _kill(proc) -> None:
        """The stage and every process it started (the benchmarks): its own session's group."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _line(self, line: str) -> None:
        if line.startswith("PLAN "):
            self.planned.append(line[5:].strip())
            return
        m = RESULT_RE.match(line)
        if m:
            check, status, detail = m.groups()
            self.results[check] = {"check": check, "status": status, "detail": detail}
            say(line)

    def _close(self) -> None:
        """Checks planned (or known from the plan) but never reported are FAILs: the stage died first."""
        if self.ok_exit:
            why = "not reported although the stage exited 0"
        elif self.timed_out:
            why = f"not reached: stage {self.name} timed out after {self.timeout:.0f} s"
        else:
            why = f"not reached: stage {self.name} exited with {self.rc}"
        known = self.planned or [c for c in plan.checks(self.name) if c not in self.results]
        for check in known:
            if check not in self.results:
                self.results[check] = {"check": check, "status": "FAIL", "detail": why}
                say(f"RESULT {check} FAIL {why}")
        if not self.ok_exit:
            detail = f"{why.split(': ', 1)[1]} (log logs/{self.name}.log)"
            self.results[self.name] = {"check": self.name, "status": "FAIL", "detail": detail}
            say(f"RESULT {self.name} FAIL {detail}")

    @property
    def ok_exit(self) -> bool:
        return self.rc == 0 and not self.timed_out

    @property
    def status(self) -> str:
        statuses = {r["status"] for r in self.results.values()}
        return "FAIL" if "FAIL" in statuses or not self.ok_exit else ("ok" if "ok" in statuses else "skip")

    def summary(self) -> dict:
        extra = {}
        path = os.path.join(self.out, "stages", f"{self.name}.json")
        if os.path.exists(path):  # the stage's own record: per-check measurements
            with open(path) as f:
                extra = {r["check"]: r for r in json.load(f).get("results", [])}
        checks = [{**extra.get(c, {}), **r} for c, r in self.results.items()]
        return {"name": self.name, "status": self.status, "wall_s": round(self.wall, 3), "timeout_s": self.timeout,
                "rc": self.rc, "timed_out": self.timed_out, "checks": checks}


def run_all(names: list[str], mode: str, out: str, jobs: int, budget: float) -> list[dict]:
    deadline = time.monotonic() + budget

    def one(name: str) -> dict:
        left = deadline - time.monotonic()
        timeout = min(plan.STAGES[name][0 if mode == "gpu" else 1], left)
        if timeout < 5:
            r = StageRun(name, mode, out, 0)
            for check in plan.checks(name):
                r.results[check] = {"check": check, "status": "FAIL",
                                    "detail": f"not run: budget of {budget:.0f} s spent"}
                say(f"RESULT {check} FAIL not run: budget of {budget:.0f} s spent")
            return {**r.summary(), "status": "FAIL"}
        say(f"== stage {name}: {plan.STAGES[name][2]} (timeout {timeout:.0f} s)")
        s = StageRun(name, mode, out, timeout).run().summary()
        say(f"STAGE {name} {s['status']} {s['wall_s']:.1f} s (timeout {timeout:.0f} s)")
        return s

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        return list(pool.map(one, names))


def write_outputs(out: str, summary: dict) -> None:
    checks = [c for s in summary["stages"] for c in s["checks"]]
    with open(os.path.join(out, "results.txt"), "w") as f:
        f.writelines(f"RESULT {c['check']} {c['status']} {c['detail']}".rstrip() + "\n" for c in checks)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    lines = [f"# gpu-check ({summary['mode']}): {summary['counts']}", "",
             f"{summary['device']}; {summary['date']}; total {summary['wall_s']:.0f} s "
             f"of a {summary['budget_s']:.0f} s budget", "",
             "| stage | status | wall s | timeout s |", "|---|---|---|---|",
             *(f"| {s['name']} | {s['status']} | {s['wall_s']:.1f} | {s['timeout_s']:.0f} |"
               for s in summary["stages"]),
             "", "| check | status | detail |", "|---|---|---|",
             *(f"| {c['check']} | {c['status']} | {c['detail'].replace('|', '/')} |" for c in checks)]
    with open(os.path.join(out, "checks.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def device_name(mode: str) -> str:
    if mode == "dry":
        return "dry run on the CPU"
    import torch

    return f"{torch.cuda.get_device_name()}; torch {torch.__version__}"


def main(argv=None) -> int:
    args = parse_args(argv)
    mode = choose_mode(args)
    names = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [n for n in names if n not in plan.STAGES]
    if unknown:
        sys.exit(f"--stages: unknown {unknown}; stages: {list(plan.STAGES)}")
    out = os.path.abspath(args.out)
    for sub in ("logs", "stages"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    budget = args.budget_s or plan.TOTAL_BUDGET_S[mode]
    t0 = time.monotonic()
    stages = run_all(names, mode, out, args.jobs or (1 if mode == "gpu" else 2), budget)
    shutil.rmtree(os.path.join(out, "work"), ignore_errors=True)  # stages' scratch (the e2e checkpoints)
    statuses = [c["status"] for s in stages for c in s["checks"]]
    counts = {k: statuses.count(k) for k in ("ok", "FAIL", "skip")}
    summary = {"mode": mode, "device": device_name(mode), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "wall_s": round(time.monotonic() - t0, 1), "budget_s": budget, "ok": counts["FAIL"] == 0,
               "counts": counts, "stages": stages}
    write_outputs(out, summary)
    say(json.dumps({"gpu_check": "ok" if summary["ok"] else "FAIL", "mode": mode, "wall_s": summary["wall_s"],
                    "counts": counts, "stages": {s["name"]: [s["status"], s["wall_s"]] for s in stages},
                    "out": out}))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
