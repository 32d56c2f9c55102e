"""Serving under load: the OpenAI server with the plugin and expert offloading vs the same model in bf16.

    .venv/bin/python benchmarks/load.py --out benchmarks/results/load.md

Starts ``haq serve`` on 127.0.0.1 twice in one run — the bf16 source model, then its HAQ
int8 checkpoint with a small expert budget (``--additional-config``) — and for each sends
every prompt alone (the reference), then ``--rounds`` rounds of all ``--requests`` prompts
at once (greedy completions). Reports failures, outputs that differ from the same prompt
alone, latency percentiles and throughput per server, plus the offload statistics the
server wrote. Default model: ../shared/models/tiny-mixtral (converted with RTN on
wiki.train into --work when missing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARED = os.environ.get("HAQ_SHARED_DIR", os.path.join(os.path.dirname(REPO), "shared"))
STARTUP_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``haq serve MODEL`` in its own process group; stopped on exit."""

    def __init__(self, model: str, extra: list[str], log_path: str):
        self.model, self.port = model, _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "offline.cli", "serve", model, "--host", "127.0.0.1", "--port", str(self.port),
               "--max-model-len", "256", "--gpu-memory-utilization", "0.3", "--enforce-eager", "--dtype", "float32",
               *extra]
        self.log_path = log_path
        with open(log_path, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)

    def wait_healthy(self) -> float:
        t0 = time.time()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return time.time() - t0
            except OSError:
                pass
            if time.time() - t0 > STARTUP_TIMEOUT_S:
                raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT_S}s; see {self.log_path}")
            time.sleep(1)

    def complete(self, prompt: str, max_tokens: int) -> tuple[str | None, float, int, str | None]:
        """(text, latency s, completion tokens, error)."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        req = urllib.request.Request(self.base + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                out = json.loads(r.read())
            return out["choices"][0]["text"], time.perf_counter() - t0, out["usage"]["completion_tokens"], None
        except Exception as exc:  # counted as a failure, with its message
            return None, time.perf_counter() - t0, 0, f"{type(exc).__name__}: {exc}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


def prompts_from(path: str, n: int, words: int = 24) -> list[str]:
    text = open(path, encoding="utf-8").read().split()
    step = max(1, (len(text) - words) // n)
    return [" ".join(text[i * step: i * step + words]) for i in range(n)]


def measure(server: Server, prompts: list[str], rounds: int, max_tokens: int) -> dict:
    """Each prompt alone, then one warm-up round (checked, not timed: the first large batches build
    their kernels) and ``rounds`` timed rounds of all prompts at once."""
    alone = [server.complete(p, max_tokens) for p in prompts]
    result = {"alone_failures": sum(1 for a in alone if a[3]), "rounds": []}
    for i in range(rounds + 1):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(lambda p: server.complete(p, max_tokens), prompts))
        wall = time.perf_counter() - t0
        lat = sorted(g[1] for g in got if g[3] is None)
        result["rounds"].append({
            "warmup": i == 0,
            "failures": [g[3] for g in got if g[3]],
            "differ_from_alone": sum(1 for g, a in zip(got, alone) if g[3] is None and g[0] != a[0]),
            "p50_s": statistics.median(lat) if lat else None,
            "p90_s": lat[int(0.9 * (len(lat) - 1))] if lat else None,
            "p99_s": lat[int(0.99 * (len(lat) - 1))] if lat else None,
            "wall_s": wall,
            "tokens_per_s": sum(g[2] for g in got) / wall,
        })
    return result


def haq_checkpoint(src: str, work: str) -> str:
    out = os.path.join(work, "tiny-mixtral-rtn")
    if not os.path.exists(out):
        calib = os.path.join(SHARED, "data", "corpora", "wiki.train.txt")
        subprocess.run([sys.executable, "-m", "offline.cli", "convert", src, out, "--method", "rtn", "--calib", calib,
                        "--samples", "8", "--seq-len", "256"], check=True, cwd=REPO)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=os.path.join(SHARED, "models", "tiny-mixtral"), help="bf16 source model")
    ap.add_argument("--haq", default=None, help="its HAQ checkpoint (default: converted into --work)")
    ap.add_argument("--work", default="/tmp/haq-load")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--offload", default='{"slots_per_layer": 2, "policy": "haq"}',
                    help="the HAQ server's additional_config['haq'] (JSON)")
    ap.add_argument("--note", action="append", default=[], help="a line to add to the report")
    ap.add_argument("--out", help="append the results to this markdown file")
    args = ap.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    haq = args.haq or haq_checkpoint(args.model, args.work)
    prompts = prompts_from(os.path.join(SHARED, "data", "corpora", "sotu.test.txt"), args.requests)
    stats_file = os.path.join(args.work, "offload-stats.json")
    offload = dict(json.loads(args.offload), stats_file=stats_file, stats_interval_s=5)
    configs = [("bf16", args.model, []),
               ("HAQ int8 + offloading", haq, ["--additional-config", json.dumps({"haq": offload})])]
    results = {}
    for name, model, extra in configs:
        server = Server(model, extra, os.path.join(args.work, f"server-{len(results)}.log"))
        try:
            startup = server.wait_healthy()
            results[name] = {"startup_s": startup, **measure(server, prompts, args.rounds, args.max_tokens)}
        finally:
            server.stop()
        print(json.dumps({name: results[name]}, default=str), flush=True)
    stats = json.load(open(stats_file)) if os.path.exists(stats_file) else None
    report = render(results, stats, args, haq)
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write(report)
    bad = sum(len(r["failures"]) + r["differ_from_alone"] for res in results.values() for r in res["rounds"])
    return 1 if bad else 0


def render(results: dict, stats: dict | None, args, haq: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [f"\n## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             "",
             f"- machine: {cpu}, {os.cpu_count()} cores, no GPU; vLLM CPU build, float32 activations, --enforce-eager",
             f"- command: `.venv/bin/python benchmarks/load.py {shlex.join(sys.argv[1:])}`",
             f"- model: {args.model} (bf16) and its HAQ checkpoint {haq} served with "
             f"`additional_config={{\"haq\": {args.offload}}}`",
             f"- {args.requests} distinct prompts (24 words of sotu.test each), greedy, max_tokens {args.max_tokens}; "
             f"each prompt first alone, then a warm-up round and {args.rounds} timed rounds of all {args.requests} "
             "at once (every round checked)",
             *[f"- note: {n}" for n in args.note],
             "",
             "| server | round | failures | outputs differing from the prompt alone | p50 latency s | p90 s | p99 s | "
             "round wall s | completion tokens/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for i, r in enumerate(res["rounds"]):
            lines.append(f"| {name} | {'warm-up' if r['warmup'] else i} | {len(r['failures'])} | "
                         f"{r['differ_from_alone']} | {r['p50_s']:.2f} | {r['p90_s']:.2f} | {r['p99_s']:.2f} | "
                         f"{r['wall_s']:.1f} | {r['tokens_per_s']:.1f} |")
    if len(results) == 2:
        (a, ra), (b, rb) = results.items()
        ta = statistics.median(r["tokens_per_s"] for r in ra["rounds"] if not r["warmup"])
        tb = statistics.median(r["tokens_per_s"] for r in rb["rounds"] if not r["warmup"])
        pa = statistics.median(r["p50_s"] for r in ra["rounds"] if not r["warmup"])
        pb = statistics.median(r["p50_s"] for r in rb["rounds"] if not r["warmup"])
        lines += ["", f"- {b} / {a}: throughput {tb / ta:.2f}x, p50 latency {pb / pa:.2f}x "
                  "(medians of the timed rounds)"]
    if stats:
        keep = ("hit_rate", "hits", "misses", "fetches", "cpu_expert_tokens", "bytes_h2d", "prefetches",
                "slots_per_layer", "device_cache_bytes", "all_experts_bytes")
        lines.append("- offload statistics the HAQ server wrote (whole run, warm-up excluded): "
                     + ", ".join(f"{k} {stats.get(k)}" for k in keep))
    failures = [f for res in results.values() for r in res["rounds"] for f in r["failures"]]
    if failures:
        lines.append(f"- first failure: {failures[0]}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
