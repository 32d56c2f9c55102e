"""CPU experts at real shapes: ms per expert MLP, GB/s of int8 weights read, % of measured read bandwidth.

One expert as the offload engine computes it on the host (``vllm_haq.kernels.expert_mlp`` over two
``ScaledInt8Gemm``: per-token quantization, w13, SwiGLU, quantization, w2), for Mixtral-8x7B
(H 4096, I 14336) and Qwen3-30B-A3B (H 2048, I 768) experts, M in {1, 4, 16}, 1 thread and all threads.
Methods, interleaved in one process: ``one call`` and ``kernel`` (vllm_haq.kernels.cpu_int8), ``blas`` (the
previous exact path: fp32 BLAS in K-chunks), fbgemm's dynamic int8 linear (torch's quantized engine, the
same int8 weights), dense ``fp32`` and ``bf16`` torch. Int8 experts are rotated through enough copies to come
from DRAM, and each row is timed after a warm-up pass over them (``_warm``). Read bandwidth: a streaming int64
sum over 1 GiB with the same thread count, measured right before each row's timing (the host's memory
bandwidth moved by up to 2x within one run on the shared 2-core machines, so one measurement at the start made
"% of bandwidth" move with it). Error: max |method - exact W8A8 reference| / max |reference|. KTransformers'
kt-kernel and llama.cpp are not run (see the note the report carries: NOT_RUN).

    .venv/bin/python benchmarks/cpu_experts.py --out benchmarks/results/cpu_experts.md
    # make gpu-check's reduced run: the engine's own paths and fbgemm, one thread and the engine's team
    .venv/bin/python benchmarks/cpu_experts.py --m 1 16 --threads 1 engine --methods one-call kernel fbgemm
"""

from __future__ import annotations

import argparse
import datetime
import functools
import glob
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

SHAPES = {"mixtral-8x7b": (4096, 14336, 2), "qwen3-30b-a3b": (2048, 768, 24)}  # hidden, inter, copies
PER_STEP = {"mixtral-8x7b": 2, "qwen3-30b-a3b": 8}  # experts one layer-step routes (top-k)


def _llc_bytes() -> int:
    """The host's largest cache (sysfs), 0 where unknown: int8 experts rotate through twice this many bytes."""
    sizes = [0]
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        text = open(path).read().strip().upper()
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes)


def _copies(hidden, inter, at_least):
    """Expert copies rotated through: ``at_least``, and enough to exceed twice the last-level cache (the H200
    host has 300 MiB of L3: two Mixtral experts would be timed from it)."""
    return max(at_least, math.ceil(2 * _llc_bytes() / (3 * hidden * inter)) + 1)


def _experts(hidden, inter, copies, gen):
    out = []
    for _ in range(copies):
        w13 = torch.randint(-127, 128, (2 * inter, hidden), generator=gen, dtype=torch.int8)
        w2 = torch.randint(-127, 128, (hidden, inter), generator=gen, dtype=torch.int8)
        out.append((w13, torch.rand(2 * inter, 1, generator=gen) * 1e-3 + 1e-4, w2,
                    torch.rand(hidden, 1, generator=gen) * 1e-3 + 1e-4))
    return out


def _time(fn, reps):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _warm(fn, seconds=0.25, calls=64):
    """Call ``fn`` until every expert copy it rotates through has been read (at most ``calls`` calls, or
    ``seconds``): with one call, the first timed calls of Qwen3's 24 copies read 16 never-read copies and timed
    0.28 ms an expert against 0.16 in steady state (the page walks of a first pass)."""
    end = time.perf_counter() + seconds
    for _ in range(calls):
        fn()
        if time.perf_counter() > end:
            break


@functools.cache
def _big() -> torch.Tensor:
    return torch.ones(2**27, dtype=torch.int64)  # 1 GiB, allocated once: read before every row


def _bandwidth(threads):
    torch.set_num_threads(threads)
    big = _big()
    s = _time(lambda: big.sum(), 5)
    return big.numel() * 8 / s / 1e9


def _mlp(method, experts, x, threads):
    from vllm_haq.kernels import ScaledInt8Gemm, expert_mlp
    from vllm_haq.kernels import int8_gemm

    os.environ["HAQ_CPU_GEMM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    if method == "fp32":
        w13, w2 = experts  # float32 [H, 2I] and [I, H]
        inter = w13.shape[1] // 2
        return lambda: (torch.nn.functional.silu(x @ w13[:, :inter]) * (x @ w13[:, inter:])) @ w2
    gemms = [(ScaledInt8Gemm(a, sa, torch.float32, backend="torch"), ScaledInt8Gemm(b, sb, torch.float32,
                                                                                   backend="torch"))
             for a, sa, b, sb in experts]
    if method == "blas":  # the torch steps around exact_int8_mm (patched below), not the kernel's fused linear
        for g in (g for pair in gemms for g in pair):
            g._cpu_linear = False
    real = int8_gemm.exact_int8_mm
    it = iter(range(10**9))

    def run():
        g13, g2 = gemms[next(it) % len(gemms)]
        if method == "blas":
            int8_gemm.exact_int8_mm = lambda x_q, w_t, cpu_kernel=None: int8_gemm.blas_int8_mm(x_q, w_t)
        try:
            return expert_mlp(x, g13, g2)
        finally:
            int8_gemm.exact_int8_mm = real
    return run


def _fbgemm_packs(experts):
    """fbgemm's dynamic int8 linears over the same int8 weights and scales (torch's quantized engine): per-tensor
    asymmetric uint8 activations computed per call, vpmaddubsw without our sign step (it saturates int16 pair
    sums on AVX2, hence inexact), so it is a speed reference, not an equal."""
    torch.backends.quantized.engine = "fbgemm"
    packs = []
    for a, sa, b, sb in experts:
        pair = []
        for w, s in ((a, sa), (b, sb)):
            q = torch._make_per_channel_quantized_tensor(w, s.reshape(-1).double(),
                                                         torch.zeros(w.shape[0], dtype=torch.long), 0)
            pair.append(torch.ops.quantized.linear_prepack(q, None))
        packs.append(pair)
    return packs


def _fbgemm_mlp(packs, x, threads):
    torch.set_num_threads(threads)
    it = iter(range(10**9))

    def run():
        p13, p2 = packs[next(it) % len(packs)]
        gu = torch.ops.quantized.linear_dynamic(x, p13, False)
        inter = gu.shape[1] // 2
        return torch.ops.quantized.linear_dynamic(torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:], p2, False)
    return run


def _onednn_mlp(experts, x, threads):
    """The expert MLP with ``torch._int_mm`` on the CPU (oneDNN's s8 x s8 -> s32 GEMM; AMX where the host has
    it) and torch for the rest: HAQ's arithmetic where oneDNN is exact (VNNI, AMX), not on AVX2 hosts (their
    s8 kernel saturates int16 pair sums: err shows it). None where this torch has no CPU ``_int_mm``."""
    from vllm_haq.quant import quantize_per_token

    torch.set_num_threads(threads)
    try:
        torch._int_mm(torch.zeros(1, 64, dtype=torch.int8), torch.zeros(64, 64, dtype=torch.int8))
    except (RuntimeError, NotImplementedError):
        return None
    it = iter(range(10**9))

    def linear(v, w, s):
        q, qs = quantize_per_token(v)
        return torch._int_mm(q, w.t()).float() * qs * s.t()

    def run():
        a, sa, b, sb = experts[next(it) % len(experts)]
        gu = linear(x, a, sa)
        inter = gu.shape[1] // 2
        return linear(torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:], b, sb)
    return run


def _reference(experts, x):
    from vllm_haq.quant import w8a8_linear_reference

    a, sa, b, sb = experts[0]
    gu = w8a8_linear_reference(x, a, sa)
    inter = gu.shape[1] // 2
    return w8a8_linear_reference(torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:], b, sb)


def _rel_error(got, ref):
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


def _layer_step(stack, x, threads, per_call, build=None):
    """One ``moe_routes`` call per layer-step: every token routed to ``per_call`` experts (rotating through
    the stack so that they come from DRAM), as the engine hands a step's CPU experts over (``build``: another
    build of the kernel than this host's, from ``cpu_int8.load_build``)."""
    from vllm_haq.kernels import RouteGroups, cpu_expert_routes

    m = x.shape[0]
    routes = torch.zeros(m, per_call, x.shape[1])
    weights = torch.ones(m, per_call)
    it = iter(range(10**9))

    def run():
        first = next(it) * per_call
        ids = torch.tensor([[(first + j) % stack.count for j in range(per_call)]] * m)
        groups = RouteGroups(ids, stack.count)
        cpu_expert_routes(x, weights, groups, stack, list(groups.routed), routes, threads=threads, build=build)
    return run


def _layer_step_error(stack, x, build=None):
    """max |one-call result - exact W8A8 chain| / max |ref| for expert 0 (all tokens, weight 1)."""
    from vllm_haq.kernels import RouteGroups, cpu_expert_routes
    from vllm_haq.quant import w8a8_linear_reference

    groups = RouteGroups(torch.zeros(x.shape[0], 1, dtype=torch.int64), stack.count)
    routes = torch.zeros(x.shape[0], 1, x.shape[1])
    cpu_expert_routes(x, torch.ones(x.shape[0], 1), groups, stack, [0], routes, build=build)
    got = routes[:, 0]
    gu = w8a8_linear_reference(x, stack.w13[0], stack.w13_scale[0])
    inter = gu.shape[1] // 2
    ref = w8a8_linear_reference(torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:], stack.w2[0], stack.w2_scale[0])
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


def _error(experts, x):
    from vllm_haq.kernels import ScaledInt8Gemm, expert_mlp

    a, sa, b, sb = experts[0]
    got = expert_mlp(x, ScaledInt8Gemm(a, sa, torch.float32, backend="torch"),
                     ScaledInt8Gemm(b, sb, torch.float32, backend="torch"))
    return _rel_error(got, _reference(experts, x))


METHODS = ("one-call", "kernel", "blas", "fbgemm", "onednn", "fp32", "bf16")  # --methods keys, in row order


def _methods(name, m, experts, stack, fp32, packs, x, threads, keys, builds):
    """(method, callable, weight bytes read per call, experts per call, error) of one shape, M and thread count,
    for the methods named in ``keys`` (``builds``: name -> module, the one-call path on other kernel builds)."""
    nbytes = experts[0][0].numel() + experts[0][2].numel()
    ref = _reference(experts, x)
    per_call = PER_STEP[name]
    one_call = ({"": None} if "one-call" in keys else {}) | {f", {b} build": module for b, module in builds.items()}
    out = [(f"one call ({per_call} experts){label}", _layer_step(stack, x, threads, per_call, module), nbytes,
            per_call, _layer_step_error(stack, x, module)) for label, module in one_call.items()]
    if "kernel" in keys:
        out.append(("kernel", _mlp("kernel", experts, x, threads), nbytes, 1, _error(experts, x)))
    if "blas" in keys and not (name.startswith("mixtral") and m > 1):  # ~0.4-1 s a Mixtral call: M=1 shows it
        out.append(("blas", _mlp("blas", experts, x, threads), nbytes, 1, None))
    if "fbgemm" in keys:
        fb = _fbgemm_mlp(packs, x, threads)
        out.append(("fbgemm dynamic int8", fb, nbytes, 1, _rel_error(fb(), ref)))
    onednn = _onednn_mlp(experts, x, threads) if "onednn" in keys else None
    if onednn is not None:
        out.append(("oneDNN _int_mm", onednn, nbytes, 1, _rel_error(_onednn_mlp(experts[:1], x, threads)(), ref)))
    if "fp32" in keys:
        out.append(("fp32", _mlp("fp32", fp32, x, threads), 4 * nbytes, 1, None))
    if "bf16" in keys and m == 1:  # without native bf16 (AVX2 hosts) ~2 s a Mixtral call at M = 1, 28 s at 16
        bf16 = tuple(w.bfloat16() for w in fp32)
        out.append(("bf16", _mlp("fp32", bf16, x.bfloat16(), threads), 2 * nbytes, 1, None))
    return out


def _thread_counts(requested):
    """``--threads`` values: counts, ``all`` (every core of this process) or ``engine`` (the CPU expert team the
    offload engine sizes beside a GPU, ``cpu_worker_plan``: the cores but two)."""
    from vllm_haq.kernels.cpu_int8 import host_cores
    from vllm_haq.offload.serving import cpu_worker_plan

    named = {"all": host_cores(), "engine": cpu_worker_plan(True, None, host_cores())[1]}
    return sorted({named[t] if t in named else int(t) for t in requested})


def run(args):
    from vllm_haq.kernels import cpu_int8
    from vllm_haq.offload import ExpertTensors

    gen = torch.Generator().manual_seed(0)
    keys = set(args.methods)
    builds = {b: cpu_int8.load_build(b) for b in args.builds}
    thread_counts = _thread_counts(args.threads)
    bw: dict[int, list[float]] = {t: [] for t in thread_counts}  # every row's adjacent measurement
    rows = []
    for name in args.shapes:
        hidden, inter, copies = SHAPES[name]
        experts = _experts(hidden, inter, _copies(hidden, inter, copies), gen)
        stack = ExpertTensors(*(torch.stack([e[i] for e in experts]) for i in range(4)))
        packs = _fbgemm_packs(experts) if "fbgemm" in keys else None
        fp32 = None
        if keys & {"fp32", "bf16"}:
            fp32 = (experts[0][0].float().t().contiguous() * experts[0][1].t(), experts[0][2].float().t().contiguous())
        for m in args.m:
            x = torch.randn(m, hidden, generator=gen)
            for threads in thread_counts:
                for method, fn, read, per_call, err in _methods(name, m, experts, stack, fp32, packs, x, threads,
                                                                keys, builds):
                    bw[threads].append(_bandwidth(threads))
                    _warm(fn)
                    s = _time(fn, 3 if method == "blas" else args.reps) / per_call
                    rows.append((name, m, threads, method, s * 1e3, read / s / 1e9,
                                 100 * read / s / 1e9 / bw[threads][-1], err))
                    print(rows[-1], flush=True)
        del experts, stack, packs
    return bw, rows


NOT_RUN = ("Not run here: KTransformers' kt-kernel (0.7.2 pins torch 2.9.1 and ships top-level packages whose "
           "names vLLM also imports, so it cannot share this environment; on AVX2 it has no W8A8 int8 method, "
           "and its AMXINT8 method needs AMX) and llama.cpp's Q8_0 (PyPI has llama-cpp-python only as a source "
           "distribution, and its Python API has no GEMM call to time one expert).")


def _kernel_isa():
    from vllm_haq.kernels import cpu_int8

    return cpu_int8.isa() or "none (BLAS path)"


def _ratios(rows):
    """M=16 / M=1 time per (expert, threads, method): the issue's compute-bound target (at most 3x)."""
    t = {(r[0], r[2], r[3], r[1]): r[4] for r in rows}
    lines = [f"| {name} | {threads} | {method} | {ms / t[(name, threads, method, 1)]:.1f}x |"
             for (name, threads, method, m), ms in t.items() if m == 16 and (name, threads, method, 1) in t]
    if not lines:
        return []
    return ["", "M = 16 time over M = 1 time (same run):", "", "| expert | threads | method | M=16 / M=1 |",
            "|---|---|---|---|", *lines]


def render(bw, rows, args):
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln for ln in cpu.splitlines() if ln.startswith("Flags")), "")
    isa = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f" {f}" in flags)
    out = [f"# CPU experts ({datetime.date.today()})", "",
           f"Machine: {model}, {len(os.sched_getaffinity(0))} cores, ISA {isa}; torch {torch.__version__}, "
           f"{platform.python_version()}; CPU int8 kernel build: {_kernel_isa()}. "
           f"Command: `python benchmarks/cpu_experts.py {' '.join(sys.argv[1:])}`. Int8 experts rotate through "
           f"copies beyond twice the last-level cache ({_llc_bytes() / 2**20:.0f} MiB).", "",
           "Read bandwidth (int64 sum over 1 GiB, same process, measured before each row: its range over the run): "
           + ", ".join(f"{t} thread{'s' if t > 1 else ''} {min(v):.1f}-{max(v):.1f} GB/s" for t, v in bw.items())
           + ". Each row's % is against the measurement taken right before it.", "",
           "ms per expert MLP (w13, SwiGLU, w2, with per-token quantization). `one call`: one `moe_routes` call "
           "serving a layer-step's experts (Mixtral top-2, Qwen3 top-8) as the engine now does, per expert; "
           "`kernel`: the same int8 GEMM kernel called per expert from Python (two ScaledInt8Gemm); `blas`: the "
           "previous exact path; `fbgemm dynamic int8`: torch's fbgemm engine over the same int8 weights and scales "
           "(per-tensor uint8 activations, int16-saturating on AVX2: inexact); `oneDNN _int_mm`: torch's CPU int8 "
           "GEMM (exact on VNNI and AMX hosts, saturating on AVX2) with torch around it; `fp32` / `bf16`: dense torch. "
           "GB/s counts weight bytes read (fp32: 4x the int8 bytes, bf16 2x). err: max |method - exact W8A8 "
           "reference| / max |ref| (the kernel's int32 products are exact; what differs is float32 scaling "
           "order).", "",
           "| expert | M | threads | method | ms | GB/s | % of bandwidth | err |", "|---|---|---|---|---|---|---|---|"]
    out.insert(len(out) - 2, "fp32 and bf16 keep one copy of the expert (not rotated): the Qwen rows can come from "
               "cache (above 100%). Against the issue's targets (M=1 at >= 75% of bandwidth, M=16 at most 3x M=1): see "
               "the kernel rows.\n")
    for name, m, t, method, ms, gbs, pct, err in rows:
        out.append(f"| {name} | {m} | {t} | {method} | {ms:.{2 if ms >= 1 else 3}f} | {gbs:.1f} | {pct:.0f}% | "
                   f"{'' if err is None else f'{err:.1e}'} |")
    out += _ratios(rows) + ["", NOT_RUN]
    return "\n".join(out) + "\n"


def _thread_arg(value: str) -> str:
    if value in ("all", "engine") or (value.isdigit() and int(value) > 0):
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is not a positive count, 'all' or 'engine'")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/cpu_experts.md")
    p.add_argument("--m", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", nargs="+", type=_thread_arg, default=["1", "all"],
                   help="thread counts; 'all': this process's cores, 'engine': the offload engine's CPU expert team "
                        "(default: 1 all)")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    from vllm_haq.kernels.cpu_int8 import BUILDS

    p.add_argument("--builds", nargs="+", default=[], choices=list(BUILDS),
                   help="also time the one-call path on these builds of the CPU kernel (beside this host's own)")
    args = p.parse_args()
    bw, rows = run(args)
    with open(args.out, "w") as f:
        f.write(render(bw, rows, args))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
