"""Where a decode step's time goes in the offload engine: Python host time per function and device kernel time.

    python benchmarks/profile_step.py --device cuda --out out/profile      # GPU host
    python benchmarks/profile_step.py --device cpu --hidden 256 --out /tmp/p  # smoke run

``benchmarks/offload.py`` gives one number per policy (ms per decode step). This splits it: the same engine
configurations (all-resident, HAQ and LRU at a 25% budget) on the same synthetic trace and Mixtral-width
stack, each run twice after a warm-up, once under ``cProfile`` (host time per function: planning, route
bookkeeping, kernel launches, and the blocking device-to-host transfers where the host waits for the GPU) and
once under ``torch.profiler`` (time of each device kernel and copy). On a GPU the wall time of a step minus the
device's busy time is the host time that is not hidden behind the device: what a faster decode step removes.

Output (``--out``): ``<config>.cprofile.txt`` (top functions by cumulative and by own time),
``<config>.kernels.txt`` (device and host ops by total time) and ``summary.md`` (one line per config: ms per
step unprofiled, under each profiler, and the device busy time per step).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from offload import _sync, build_stack, close_engine, new_engine, serve_like_vllm  # noqa: E402
from offload_traces import TOPOLOGIES, prior_of, streams, synthetic_trace  # noqa: E402

from vllm_haq.offload import OffloadConfig  # noqa: E402

CONFIGS = {"resident": {}, "haq-25": {"policy": "haq", "expert_fraction": 0.25},
           "lru-25": {"policy": "lru", "expert_fraction": 0.25},
           "static-25": {"policy": "static", "expert_fraction": 0.25}}  # Fiddler's: misses on the CPU


def _steps(engine, routes, first, count, x, weights, device) -> float:
    """Run decode steps [first, first + count) of ``routes``; wall seconds per step."""
    _sync(device)
    t0 = time.perf_counter()
    for step in range(first, first + count):
        ids = routes[:, step].to(device)
        for layer in range(routes.shape[2]):
            engine.forward(layer, x, weights, ids[:, layer].int())
    _sync(device)
    return (time.perf_counter() - t0) / count


def _cprofile_text(prof: cProfile.Profile, top: int) -> str:
    out = io.StringIO()
    for key in ("cumulative", "tottime"):
        out.write(f"==== by {key} ====\n")
        pstats.Stats(prof, stream=out).strip_dirs().sort_stats(key).print_stats(top)
    return out.getvalue()


def _device_busy_s(prof) -> float:
    """Total time of device kernels and copies (CUDA), summed over the profile."""
    total = 0.0
    for evt in prof.key_averages():
        total += getattr(evt, "self_device_time_total", 0.0) or 0.0
    return total / 1e6


def profile_config(name, cfg, stack, routes, prior, device, args) -> str:
    batch, top_k, hidden = routes.shape[0], routes.shape[-1], stack[0].w13.shape[2]
    weights = torch.full((batch, top_k), 1.0 / top_k, device=device)
    x = torch.randn(batch, hidden, device=device)
    engine = new_engine(stack, OffloadConfig(**cfg), device, prior)
    n, w = args.steps, args.warmup
    _steps(engine, routes, 0, w, x, weights, device)
    plain = _steps(engine, routes, w, n, x, weights, device)
    prof = cProfile.Profile()
    prof.enable()
    under_cprofile = _steps(engine, routes, w + n, n, x, weights, device)
    prof.disable()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                    if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as tprof:
        under_torch = _steps(engine, routes, w + 2 * n, n, x, weights, device)
    stats = engine.stats()
    close_engine(engine, device)
    with open(os.path.join(args.out, f"{name}.cprofile.txt"), "w") as f:
        f.write(_cprofile_text(prof, args.top))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(os.path.join(args.out, f"{name}.kernels.txt"), "w") as f:
        f.write(tprof.key_averages().table(sort_by=sort, row_limit=args.top))
    busy = _device_busy_s(tprof) / n
    return (f"| {name} | {plain * 1e3:.2f} | {under_cprofile * 1e3:.2f} | {under_torch * 1e3:.2f} | "
            f"{busy * 1e3:.2f} | {stats['hit_rate']} | {stats['cpu_expert_tokens']} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--topology", choices=tuple(TOPOLOGIES), default="mixtral-8x7b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, help="shrink hidden (intermediate in proportion): smoke runs")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    unknown = sorted(set(args.configs.split(",")) - set(CONFIGS))
    if unknown:
        p.error(f"--configs: unknown {', '.join(unknown)} (known: {', '.join(CONFIGS)})")
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    serve_like_vllm(device)
    topo = TOPOLOGIES[args.topology]
    hidden, inter = topo[args.device]
    if args.hidden:
        inter, hidden = max(8, inter * args.hidden // hidden), args.hidden
    stack = build_stack(args.layers, topo["experts"], hidden, inter, device=args.device)
    gen = dict(experts=topo["experts"], top_k=topo["top_k"])
    routes = streams(synthetic_trace(8, 512, args.layers, seed=1, **gen), args.batch)
    prior = prior_of(synthetic_trace(4, 512, args.layers, seed=2, **gen), topo["experts"])
    assert routes.shape[1] >= args.warmup + 3 * args.steps, "trace too short for the steps asked"
    lines = [f"# decode-step profile: {args.topology}, {args.layers} layers, hidden {hidden}, batch {args.batch}, "
             f"{args.device}", "", f"command: `python benchmarks/profile_step.py {' '.join(sys.argv[1:])}`", "",
             "| config | ms/step | ms/step under cProfile | ms/step under torch.profiler | device busy ms/step "
             "| hit rate | CPU expert-tokens |", "|---|---|---|---|---|---|---|"]
    for name in args.configs.split(","):
        lines.append(profile_config(name, CONFIGS[name], stack, routes, prior, device, args))
        print(lines[-1], flush=True)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
