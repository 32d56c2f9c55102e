"""Expert offloading: MoE time per decoded token for every serving policy, side by side, in one run.

    .venv/bin/python benchmarks/offload.py --device cpu --out benchmarks/results/offload.md
    python benchmarks/offload.py --device cuda --out benchmarks/results/offload.md   # GPU host, no vLLM needed

A stack of MoE layers of one ``--topology`` (default Mixtral-8x7B, GPU: 32 layers, hidden 4096,
8 experts of 14336, top-2; also Qwen3-30B-A3B and DeepSeek-V2-Lite, see offload_traces.TOPOLOGIES;
``--device cpu``: the same topology scaled down to hidden 256 so it runs anywhere) with random int8
weights, driven by routing traces (the recorded ones exist for Mixtral's topology only):

* real traces of ../shared/models/tiny-mixtral-32l (32 MoE layers, 8 experts, top-2) on
  wiki.test and sotu.test (``benchmarks/record_traces.py``; its wiki.train trace is the
  planner's prior, as a checkpoint's calibration statistics would be) — the default of
  ``--device cpu`` only: they need ../shared (or the git-ignored benchmarks/traces/), which a
  GPU host does not have, so ``--device cuda`` runs the synthetic trace unless ``--traces`` asks;
* a synthetic trace generated to Mixtral-8x7B's published locality (the next token keeps
  its top-1 expert ~20% of the time, arXiv 2401.04088 Table 5; the fixture's traces are
  more local), with an independent sample of the same generator as prior.

Policies (one engine or loop each, same weights, same trace, same process):
all-resident; UVA-style streaming (every routed expert's bytes cross the bus at every
step, no cache — what ``--cpu-offload-gb`` does); LRU on-demand (Mixtral-offloading's
cache); CPU computes all misses (Fiddler: hottest experts placed statically); HAQ
planner (this project); and an oracle lower bound: Belady's cache with perfect knowledge
of the trace, each layer-step's misses served by the best split over copy engine and
CPU at the measured costs, hidden behind one layer of resident compute (a perfect
prefetcher) — ``resident time + Σ max(0, misses' makespan − resident layer time)``.

On CUDA the full-size stack is 45 GB of host memory: it is generated on the GPU (torch's CPU
generator makes ~270 M int8/s), page-locked once and shared by every engine (each engine would
otherwise lock and unlock all of it), and the first engine's calibrated cost model is reused by the
others (calibration runs full-size experts on the CPU), so every policy plans with the same costs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # offload_traces

from vllm_haq.kernels import RouteGroups, expert_routes, new_route_buffer  # noqa: E402
from vllm_haq.offload import ExpertTensors, OffloadConfig, OffloadEngine  # noqa: E402
from vllm_haq.offload.store import copy_expert  # noqa: E402

from offload_traces import (RECORDED, TOPOLOGIES, belady_misses, locality, oracle_bound, prior_of,  # noqa: E402
                            real_traces, streams, synthetic_trace)

BUDGETS = (0.125, 0.25, 0.5, 1.0)
POLICIES = ("all-resident", "UVA streaming", "LRU on-demand", "Fiddler (CPU misses)", "HAQ planner", "oracle bound")


# ---- model and traces ------------------------------------------------------------------------
def build_stack(layers: int, experts: int, hidden: int, inter: int, seed: int = 0, device: str = "cpu"
                ) -> list[ExpertTensors]:
    """Random int8 experts with per-channel scales, in host memory (``device`` "cuda": generated there and
    copied to the host, ~100x faster than the CPU generator)."""
    if device == "cuda":
        return [_gpu_experts(experts, hidden, inter, seed * 1000 + i) for i in range(layers)]
    g = torch.Generator().manual_seed(seed)
    stack = []
    for _ in range(layers):
        stack.append(ExpertTensors(
            torch.randint(-127, 128, (experts, 2 * inter, hidden), dtype=torch.int8, generator=g),
            torch.rand(experts, 2 * inter, 1, generator=g) * 1e-3 + 1e-4,
            torch.randint(-127, 128, (experts, hidden, inter), dtype=torch.int8, generator=g),
            torch.rand(experts, hidden, 1, generator=g) * 1e-3 + 1e-4))
    return stack


def _gpu_experts(experts: int, hidden: int, inter: int, seed: int) -> ExpertTensors:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def on_host(t: torch.Tensor) -> torch.Tensor:
        host = torch.empty(t.shape, dtype=t.dtype)
        host.copy_(t)
        return host

    w13 = on_host(torch.randint(-127, 128, (experts, 2 * inter, hidden), dtype=torch.int8, device="cuda", generator=g))
    w2 = on_host(torch.randint(-127, 128, (experts, hidden, inter), dtype=torch.int8, device="cuda", generator=g))
    scale = lambda *shape: on_host(torch.rand(*shape, device="cuda", generator=g) * 1e-3 + 1e-4)  # noqa: E731
    return ExpertTensors(w13, scale(experts, 2 * inter, 1), w2, scale(experts, hidden, 1))


# ---- policies -------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_SHARED_COST: dict = {}  # CUDA: the first engine's calibrated cost model, reused by the later engines


def serve_like_vllm(device: torch.device) -> None:
    """On CUDA, run the model thread's torch with one intra-op thread, as vLLM serves: its GPU worker calls
    ``set_torch_threads_for_runtime`` (vllm/v1/worker/gpu_worker.py 610; vllm/utils/torch_utils.py 269-300:
    multi-threaded CPU ops in the step's hot loop leave OpenMP workers spin-waiting). With torch's default
    (all cores) the engine's small host-side torch ops compete with the CPU expert worker's threads (the
    first H200 profiles: ~0.5 ms per routing-statistics ``index_add_``). The CPU build computes with torch's
    threads: left as they are."""
    if device.type == "cuda":
        torch.set_num_threads(1)


def new_engine(stack, config: OffloadConfig, device, prior) -> OffloadEngine:
    """An engine over ``stack``'s layers as the benchmarks run it (CUDA: bf16 out, the first engine's calibrated
    costs reused, copies on the copy stream; CPU: float32, a copier thread)."""
    cuda = device.type == "cuda"
    engine = OffloadEngine(config, device, torch.bfloat16 if cuda else torch.float32, routing=prior,
                           cost=_SHARED_COST.get("cost") if cuda else None, copy_thread=not cuda)
    for i, experts in enumerate(stack):
        engine.add_layer(i, experts)
    return engine


def close_engine(engine: OffloadEngine, device) -> None:
    """Close ``engine``; on CUDA its calibrated costs serve the later engines (calibration is slow there)."""
    if device.type == "cuda":
        _SHARED_COST.setdefault("cost", engine.cost)
    engine.close()


def run_engine(stack, config: OffloadConfig, routes: torch.Tensor, steps: int, warmup: int, device, prior) -> dict:
    engine = new_engine(stack, config, device, prior)
    batch, hidden, top_k = routes.shape[0], stack[0].w13.shape[2], routes.shape[-1]
    weights = torch.full((batch, top_k), 1.0 / top_k, device=device)
    x = torch.randn(batch, hidden, device=device)
    elapsed = 0.0
    for step in range(warmup + steps):
        ids = routes[:, step].to(device)  # [B, L, k]
        _sync(device)
        t0 = time.perf_counter()
        for layer in range(len(stack)):
            engine.forward(layer, x, weights, ids[:, layer].int(), record=step >= warmup)
        _sync(device)
        if step >= warmup:
            elapsed += time.perf_counter() - t0
    s = engine.stats()
    close_engine(engine, device)
    return {"ms_per_step": elapsed / steps * 1e3, "hit_rate": s["hit_rate"],
            "mb_h2d_per_step": s["bytes_h2d"] / steps / 2**20,
            "cpu_tokens_per_step": s["cpu_expert_tokens"] / steps, "slots_per_layer": s["slots_per_layer"],
            "cost": s["cost_model"], "device_cache_bytes": s["device_cache_bytes"],
            "prefetch_accuracy": s["prefetch_accuracy"]}


def run_streaming(stack, routes: torch.Tensor, steps: int, warmup: int, device) -> dict:
    """No cache: every routed expert is copied host -> device into a staging buffer, every step."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch, hidden, top_k, n_experts = routes.shape[0], stack[0].w13.shape[2], routes.shape[-1], stack[0].count
    staging = ExpertTensors.empty_like(stack[0], min(n_experts, batch * top_k), device)  # distinct per layer-step
    weights = torch.full((batch, top_k), 1.0 / top_k, device=device)
    x = torch.randn(batch, hidden, device=device)
    elapsed, moved = 0.0, 0
    for step in range(warmup + steps):
        ids = routes[:, step]
        _sync(device)
        t0 = time.perf_counter()
        for layer, experts in enumerate(stack):
            groups = RouteGroups(ids[:, layer], n_experts)
            out = new_route_buffer(x, top_k)
            for slot, e in enumerate(groups.routed):
                n = _copy(staging, slot, experts, e, non_blocking=True)
                g13, g2 = staging.gemms(slot, dtype)
                expert_routes(x, weights, _on(groups, device), e, g13, g2, out)
                moved += n if step >= warmup else 0
            out.sum(1)
        _sync(device)
        if step >= warmup:
            elapsed += time.perf_counter() - t0
    return {"ms_per_step": elapsed / steps * 1e3, "hit_rate": 0.0, "mb_h2d_per_step": moved / steps / 2**20,
            "cpu_tokens_per_step": 0.0}


def emulate_link(gb_per_s: float) -> None:
    """``--device cpu``: every host -> "device" expert copy takes bytes / ``gb_per_s``, as over PCIe.

    The memcpy, then a sleep for the rest of the transfer time: a sleeping thread holds no core
    and no GIL, like a DMA engine, so the policies' overlap of copies with compute is measured.
    Patches the engine's copy (its calibration then measures this link too) and the streaming loop's.
    """
    import vllm_haq.offload.engine as engine_module

    def link_copy(dst, slot, src, expert, non_blocking=False):
        t0 = time.perf_counter()
        n = copy_expert(dst, slot, src, expert, non_blocking)
        rest = n / (gb_per_s * 1e9) - (time.perf_counter() - t0)
        if rest > 0:
            time.sleep(rest)
        return n

    global _copy
    engine_module.copy_expert = _copy = link_copy


_copy = copy_expert  # the streaming loop's copy (emulate_link replaces it)


def _on(groups: RouteGroups, device) -> RouteGroups:
    if device.type != "cpu":
        groups.tok, groups.slot = groups.tok.to(device), groups.slot.to(device)
    return groups


def best_of(repeats: int, runs: list) -> list[dict]:
    """Each run's fastest of ``repeats`` tries, the runs interleaved so that drifts of a shared machine hit
    every policy alike (timeit's rule: the minimum is the run least disturbed by other work)."""
    best: list[dict | None] = [None] * len(runs)
    for _ in range(repeats):
        for i, run in enumerate(runs):
            r = run()
            if best[i] is None or r["ms_per_step"] < best[i]["ms_per_step"]:
                best[i] = r
    return best


# ---- report ---------------------------------------------------------------------------------
def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU (device tier = host memory)"
    return f"{gpu}; {cpu}, {os.cpu_count()} cores; torch {torch.__version__}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--topology", choices=tuple(TOPOLOGIES), default=RECORDED)
    p.add_argument("--layers", type=int, help="MoE layers (default: the topology's)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps per run (default cpu 24, cuda 96)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--repeats", type=int, default=None, help="tries per policy, fastest kept (default cpu 3, cuda 1)")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--traces", default=None,
                   help="comma-separated wiki,sotu,synthetic (default: all three on cpu with Mixtral's topology; "
                        "synthetic on cuda, whose hosts have neither ../shared nor the recorded traces, and for "
                        "the other topologies)")
    p.add_argument("--cpu-link-gbps", type=float, default=1.0,
                   help="--device cpu: emulated host->device link in GB/s (0: plain memcpy)")
    p.add_argument("--out", help="append the tables to this markdown file")
    p.add_argument("--json", help="write raw results here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    serve_like_vllm(device)
    topo = TOPOLOGIES[args.topology]
    hidden, inter = topo[args.device]
    shape = dict(layers=args.layers or topo["layers"], experts=topo["experts"], hidden=hidden, inter=inter)
    steps = args.steps or (24 if device.type == "cpu" else 96)
    args.repeats = args.repeats or (3 if device.type == "cpu" else 1)
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    if device.type == "cpu":
        # The "device" tier is the main thread and the CPU workers are a second thread: one BLAS
        # thread each, so they share the cores the way a GPU and its host would not contend
        # (multi-threaded BLAS on both oversubscribes the cores and measures spin-waits instead).
        torch.set_num_threads(1)
        if args.cpu_link_gbps > 0:
            emulate_link(args.cpu_link_gbps)

    traces, priors = _traces(args, shape, topo)

    t_build = time.time()
    stack = build_stack(**shape, device=device.type)
    if device.type == "cuda":  # page-locked once, shared by every engine and the streaming loop
        stack = [s.pinned() for s in stack]
    build_s = time.time() - t_build
    try:
        rows = measure(args, device, shape, steps, batches, traces, priors, stack)
    finally:
        if device.type == "cuda":
            for s in stack:
                s.release()
    report = render(rows, args, device, shape, steps, build_s, stack)
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, default=str)


def _traces(args, shape: dict, topo: dict) -> tuple[dict, dict]:
    """{name: trace} and {name: prior} of the traces asked for (the recorded ones: Mixtral's topology only)."""
    recorded = args.topology == RECORDED
    args.traces = args.traces or ("wiki,sotu,synthetic" if args.device == "cpu" and recorded else "synthetic")
    wanted = args.traces.split(",")
    if {"wiki", "sotu"} & set(wanted) and not recorded:
        sys.exit(f"--traces wiki/sotu: recorded for {RECORDED} only, not --topology {args.topology}")
    traces, priors, layers, experts = {}, {}, shape["layers"], shape["experts"]
    if {"wiki", "sotu"} & set(wanted):
        real = real_traces()
        for name in ("wiki", "sotu"):
            if name in wanted:
                traces[name] = real[name][:, :, :layers]
                priors[name] = prior_of(real["wiki-train"][:, :, :layers], experts)
    if "synthetic" in wanted:
        gen = dict(experts=experts, top_k=topo["top_k"])
        traces["synthetic"] = synthetic_trace(8, 512, layers, seed=1, **gen)
        priors["synthetic"] = prior_of(synthetic_trace(4, 512, layers, seed=2, **gen), experts)
    return traces, priors


def measure(args, device, shape, steps, batches, traces, priors, stack) -> list[dict]:
    """Every trace x batch x budget x policy."""
    rows = []
    for name, trace in traces.items():
        loc = locality(trace, shape["experts"])
        for batch in batches:
            routes = streams(trace, batch)
            n = min(steps, routes.shape[1] - args.warmup)
            def engine_run(**cfg):
                return run_engine(stack, OffloadConfig(**cfg), routes, n, args.warmup, device, priors[name])

            resident = best_of(args.repeats, [lambda: engine_run()])[0]
            streaming = best_of(args.repeats, [lambda: run_streaming(stack, routes, n, args.warmup, device)])[0]
            for budget in BUDGETS:
                cfg = dict(expert_fraction=budget) if budget < 1 else {}
                res = {"all-resident": resident, "UVA streaming": streaming}
                if budget < 1:
                    res["LRU on-demand"], res["Fiddler (CPU misses)"], res["HAQ planner"] = best_of(args.repeats, [
                        lambda: engine_run(policy="lru", **cfg), lambda: engine_run(policy="static", **cfg),
                        lambda: engine_run(policy="haq", **cfg)])
                else:  # every expert fits: each policy serves all-resident (the same engine configuration)
                    res["LRU on-demand"] = res["Fiddler (CPU misses)"] = res["HAQ planner"] = resident
                slots = res["HAQ planner"]["slots_per_layer"]
                misses = belady_misses(routes, slots, args.warmup, n, shape["experts"])
                res["oracle bound"] = oracle_bound(resident["ms_per_step"], misses, res["HAQ planner"]["cost"],
                                                   shape["layers"], n)
                rows.append({"trace": name, "locality": loc, "batch": batch, "budget": budget, "steps": n,
                             "results": res})
                print(json.dumps({"trace": name, "batch": batch, "budget": budget,
                                  **{k: round(v["ms_per_step"], 3) for k, v in res.items()}}), flush=True)
    return rows


def render(rows, args, device, shape, steps, build_s, stack) -> str:
    expert_bytes = stack[0].expert_bytes()
    lines = [f"\n## {datetime.date.today().isoformat()} — `--device {device.type}`\n",
             f"- machine: {machine(device)}",
             f"- command: `python benchmarks/offload.py {' '.join(sys.argv[1:])}`",
             f"- stack ({args.topology}): {shape['layers']} MoE layers, hidden {shape['hidden']}, {shape['experts']} "
             f"experts of {shape['inter']}, top-{TOPOLOGIES[args.topology]['top_k']}, int8; one expert "
             f"{expert_bytes / 2**20:.2f} MiB, all experts "
             f"{shape['layers'] * shape['experts'] * expert_bytes / 2**30:.2f} GiB (built in {build_s:.0f} s"
             + (", generated on the GPU, page-locked once for all engines" if device.type == "cuda" else "") + ")",
             f"- {steps} timed decode steps per run after {args.warmup} warm-up steps, fastest of {args.repeats} "
             "interleaved tries per policy; MoE layers only (no attention)",
             *(["- `--device cpu`: the \"device\" tier is host memory computed by the main thread, CPU-served "
                "experts run in the same thread (the CPU build computes them inline), and a \"fetch\" is a memcpy on "
                "a copier thread "
                + (f"padded to an emulated {args.cpu_link_gbps:g} GB/s host->device link (a sleeping copier holds no "
                   "core, like a DMA engine)" if args.cpu_link_gbps > 0 else "at memory speed")
                + ". Unlike a GPU, the device computes no faster than the CPU, so CPU-computed misses can beat "
                "all-resident and the oracle \"bound\" (which assumes the GPU's case: all-resident is the "
                "fastest). The table shows the policies' mechanics (hit rates, bytes, CPU work, overlap), not "
                "H200 speed-ups"]
               if device.type == "cpu" else []),
             "- cells: MoE ms per decode step (one token per sequence) and, in parentheses, the ratio to the "
             "HAQ planner",
             ""]
    for (trace, batch) in dict.fromkeys((r["trace"], r["batch"]) for r in rows):
        sub = [r for r in rows if r["trace"] == trace and r["batch"] == batch]
        loc = sub[0]["locality"]
        lines += [f"### trace {trace}, batch {batch} (same top-1 as previous token {loc['same_top1']:.0%}, "
                  f"mean top-expert share {loc['top_share']:.0%})", "",
                  "| budget | " + " | ".join(POLICIES) + " | HAQ hit rate | HAQ MiB H2D/step | "
                  "HAQ CPU expert-tokens/step | LRU hit rate | LRU MiB H2D/step | Fiddler CPU expert-tokens/step | "
                  "HAQ prefetch accuracy |",
                  "|---|" + "---|" * (len(POLICIES) + 7)]
        for r in sub:
            res = r["results"]
            haq = res["HAQ planner"]["ms_per_step"]
            cells = [f"{res[p]['ms_per_step']:.2f} ({res[p]['ms_per_step'] / haq:.2f}x)" for p in POLICIES]
            h, lru, fid = res["HAQ planner"], res["LRU on-demand"], res["Fiddler (CPU misses)"]
            lines.append(f"| {r['budget']:.1%} | " + " | ".join(cells) +
                         f" | {h['hit_rate']} | {h['mb_h2d_per_step']:.2f} | {h['cpu_tokens_per_step']:.2f} | "
                         f"{lru['hit_rate']} | {lru['mb_h2d_per_step']:.2f} | {fid['cpu_tokens_per_step']:.2f} | "
                         f"{h['prefetch_accuracy']} |")
        lines.append("")
    cost = rows[0]["results"]["HAQ planner"]["cost"]
    first = "the first engine's, shared by all" if device.type == "cuda" else "first HAQ run"
    lines.append(f"- calibrated cost model ({first}): H2D {cost['h2d_bytes_per_s'] / 1e9:.2f} GB/s "
                 f"(one expert {cost['fetch_ms']:.3f} ms), CPU: a layer-step's call "
                 f"{cost.get('cpu_call_s', 0) * 1e3:.3f} ms + {cost['cpu_overhead_s'] * 1e3:.3f} ms an expert + "
                 f"{cost['cpu_s_per_token'] * 1e3:.3f} ms/token")
    if args.topology == RECORDED:
        lines.append(mixtral_memory_line())
    return "\n".join(lines) + "\n"


def mixtral_memory_line() -> str:
    """Device memory of Mixtral-8x7B int8 with a 25% expert budget vs its bf16 size (from its config)."""
    h, inter, layers, vocab, kv = 4096, 14336, 32, 32000, 1024
    expert = 3 * h * inter  # int8 bytes (+ per-channel scales below)
    scales = (2 * inter + h) * 4
    attn = layers * (h * h * 2 + h * kv * 2)  # q, o + k, v (int8)
    experts = TOPOLOGIES[RECORDED]["experts"]
    bf16_total = 2 * (layers * experts * expert + attn + 2 * vocab * h + layers * (h * experts + 2 * h) + h)
    int8_25 = (layers * experts * (expert + scales)) // 4 + attn + 2 * (2 * vocab * h + layers * (h * experts + 2 * h))
    return (f"- Mixtral-8x7B device memory (weights, from its config): bf16 {bf16_total / 1e9:.1f} GB; int8 with a 25% "
            f"expert budget {int8_25 / 1e9:.1f} GB = {int8_25 / bf16_total:.1%} of bf16 (embeddings, router, norms "
            f"stay bf16; KV cache not included)")


if __name__ == "__main__":
    main()
