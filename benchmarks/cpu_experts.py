"""CPU experts at real shapes: ms per expert MLP, GB/s of int8 weights read, % of measured read bandwidth.

One expert as the offload engine computes it on the host (``vllm_haq.kernels.expert_mlp`` over two
``ScaledInt8Gemm``: per-token quantization, w13, SwiGLU, quantization, w2), for Mixtral-8x7B
(H 4096, I 14336) and Qwen3-30B-A3B (H 2048, I 768) experts, M in {1, 4, 16}, 1 thread and all threads.
Methods, interleaved in one process: ``kernel`` (vllm_haq.kernels.cpu_int8), ``blas`` (the previous exact
path: fp32 BLAS in K-chunks), ``fp32`` (dense float32 torch, 4x the bytes). Qwen experts are rotated
through enough copies to come from DRAM. Read bandwidth: a streaming int64 sum over 1 GiB with the same
thread count, measured in the same run. Error: max |kernel - exact W8A8 reference| / max |reference|.

    .venv/bin/python benchmarks/cpu_experts.py --out benchmarks/results/cpu_experts.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time

import torch

SHAPES = {"mixtral-8x7b": (4096, 14336, 2), "qwen3-30b-a3b": (2048, 768, 24)}  # hidden, inter, copies
PER_STEP = {"mixtral-8x7b": 2, "qwen3-30b-a3b": 8}  # experts one layer-step routes (top-k)


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


def _bandwidth(threads):
    torch.set_num_threads(threads)
    big = torch.ones(2**27, dtype=torch.int64)  # 1 GiB
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
    real = int8_gemm.exact_int8_mm
    it = iter(range(10**9))

    def run():
        g13, g2 = gemms[next(it) % len(gemms)]
        if method == "blas":
            int8_gemm.exact_int8_mm = int8_gemm.blas_int8_mm
        try:
            return expert_mlp(x, g13, g2)
        finally:
            int8_gemm.exact_int8_mm = real
    return run


def _layer_step(stack, x, threads, per_call):
    """One ``moe_routes`` call per layer-step: every token routed to ``per_call`` experts (rotating through
    the stack so that they come from DRAM), as the engine hands a step's CPU experts over."""
    from vllm_haq.kernels import RouteGroups, cpu_expert_routes

    m = x.shape[0]
    routes = torch.zeros(m, per_call, x.shape[1])
    weights = torch.ones(m, per_call)
    it = iter(range(10**9))

    def run():
        first = next(it) * per_call
        ids = torch.tensor([[(first + j) % stack.count for j in range(per_call)]] * m)
        groups = RouteGroups(ids, stack.count)
        cpu_expert_routes(x, weights, groups, stack, list(groups.routed), routes, threads=threads)
    return run


def _layer_step_error(stack, x):
    """max |one-call result - exact W8A8 chain| / max |ref| for expert 0 (all tokens, weight 1)."""
    from vllm_haq.kernels import cpu_moe_forward
    from vllm_haq.quant import w8a8_linear_reference

    got = cpu_moe_forward(x, torch.ones(x.shape[0], 1), torch.zeros(x.shape[0], 1, dtype=torch.int64), stack)
    gu = w8a8_linear_reference(x, stack.w13[0], stack.w13_scale[0])
    inter = gu.shape[1] // 2
    ref = w8a8_linear_reference(torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:], stack.w2[0], stack.w2_scale[0])
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


def _error(experts, x):
    from vllm_haq.kernels import ScaledInt8Gemm, expert_mlp
    from vllm_haq.quant import w8a8_linear_reference

    a, sa, b, sb = experts[0]
    got = expert_mlp(x, ScaledInt8Gemm(a, sa, torch.float32, backend="torch"),
                     ScaledInt8Gemm(b, sb, torch.float32, backend="torch"))
    gu = w8a8_linear_reference(x, a, sa)
    inter = gu.shape[1] // 2
    ref = w8a8_linear_reference(torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:], b, sb)
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max())


def run(args):
    gen = torch.Generator().manual_seed(0)
    all_threads = len(os.sched_getaffinity(0))
    bw = {t: _bandwidth(t) for t in sorted({1, all_threads})}
    rows = []
    for name, (hidden, inter, copies) in SHAPES.items():
        from vllm_haq.offload import ExpertTensors

        experts = _experts(hidden, inter, copies, gen)
        stack = ExpertTensors(*(torch.stack([e[i] for e in experts]) for i in range(4)))
        nbytes = experts[0][0].numel() + experts[0][2].numel()
        fp32 = (experts[0][0].float().t().contiguous() * experts[0][1].t(), experts[0][2].float().t().contiguous())
        for m in args.m:
            x = torch.randn(m, hidden, generator=gen)
            err = _error(experts, x)
            step_err = _layer_step_error(stack, x)
            for threads in sorted({1, all_threads}):
                per_call = PER_STEP[name]
                fn = _layer_step(stack, x, threads, per_call)
                fn()
                s = _time(fn, args.reps) / per_call
                rows.append((name, m, threads, f"one call ({per_call} experts)", s * 1e3, nbytes / s / 1e9,
                             100 * nbytes / s / 1e9 / bw[threads], step_err))
                print(rows[-1], flush=True)
                for method in ("kernel", "blas", "fp32"):  # kernel: per expert, two GEMM calls from Python
                    if method == "blas" and name.startswith("mixtral") and m > 1:
                        continue  # ~0.4-1 s a call: M=1 shows the point
                    fn = _mlp(method, fp32 if method == "fp32" else experts, x, threads)
                    fn()
                    s = _time(fn, 3 if method == "blas" else args.reps)
                    read = nbytes * (4 if method == "fp32" else 1)
                    rows.append((name, m, threads, method, s * 1e3, read / s / 1e9, 100 * read / s / 1e9 / bw[threads],
                                 err if method == "kernel" else None))
                    print(rows[-1], flush=True)
        del experts, stack
    return bw, rows


def render(bw, rows, args):
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln for ln in cpu.splitlines() if ln.startswith("Flags")), "")
    isa = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f" {f}" in flags)
    out = [f"# CPU experts ({datetime.date.today()})", "",
           f"Machine: {model}, {len(os.sched_getaffinity(0))} cores, ISA {isa}; torch {torch.__version__}, "
           f"{platform.python_version()}. Command: `.venv/bin/python benchmarks/cpu_experts.py "
           f"--out {args.out}`.", "",
           "Read bandwidth (int64 sum over 1 GiB, same process): "
           + ", ".join(f"{t} thread{'s' if t > 1 else ''} {v:.1f} GB/s" for t, v in bw.items()) + ".", "",
           "ms per expert MLP (w13, SwiGLU, w2, with per-token quantization). `one call`: one `moe_routes` call "
           "serving a layer-step's experts (Mixtral top-2, Qwen3 top-8) as the engine now does, per expert; "
           "`kernel`: the same int8 GEMM kernel called per expert from Python (two ScaledInt8Gemm); `blas`: the "
           "previous exact path; `fp32`: dense float32 torch. GB/s counts "
           "weight bytes read (fp32: 4x the int8 bytes). err: max |kernel - exact W8A8 reference| / max |ref| "
           "(the int32 products are exact; what differs is float32 scaling order).", "",
           "| expert | M | threads | method | ms | GB/s | % of bandwidth | err |", "|---|---|---|---|---|---|---|---|"]
    out.insert(len(out) - 2, "fp32 keeps one copy of the expert (not rotated): the Qwen rows can come from cache "
               "(above 100%). Against the issue's targets (M=1 at >= 75% of bandwidth, M=16 at most 3x M=1): see "
               "the kernel rows.\n")
    for name, m, t, method, ms, gbs, pct, err in rows:
        out.append(f"| {name} | {m} | {t} | {method} | {ms:.2f} | {gbs:.1f} | {pct:.0f}% | "
                   f"{'' if err is None else f'{err:.1e}'} |")
    return "\n".join(out) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/cpu_experts.md")
    p.add_argument("--m", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    bw, rows = run(args)
    with open(args.out, "w") as f:
        f.write(render(bw, rows, args))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
