"""Triton int8 kernels vs torch._int_mm and bf16, at Mixtral-8x7B and OPT-66B shapes.

    python benchmarks/kernels.py --device cuda --out benchmarks/results/kernels.md
    python benchmarks/kernels.py --device cpu          # smoke run: tiny shapes, Triton interpreter
    python benchmarks/kernels.py --device cuda --shapes "Mixtral attn q/o 4096x4096" --linear-m 1,16  # a subset

Needs only torch and Triton (never vLLM). Per shape and M it first checks every
kernel against torch (per-token quant bit-exact, GEMM and MoE to relative 1e-3),
then times it: CUDA events around batches of calls, warm-up, median over
repetitions, inputs rotated over enough copies (>= 256 MB) that L2 cannot serve
them. On CUDA each timed batch is one CUDA graph of its calls, replayed: a
decode-size GEMM takes a few microseconds, less than launching it from Python,
so eager back-to-back calls would time the launches (vLLM replays graphs too).
The per-expert loops read routing counts on the host, cannot be captured and
are timed as eager launches, which is their real cost; the "timing" column says
which. Rows: Triton quant+GEMM, Triton GEMM on int8 input, torch._int_mm + torch
epilogue, torch quant + _int_mm + epilogue, bf16 torch.matmul; MoE: the fused
Triton MoE vs the per-expert torch._int_mm loop and a per-expert bf16 loop.
Percentages are of the ceilings measured on an H200 (docs/architecture.md), upper ends:
int8 900 TOPS, bf16 740 TFLOPS, HBM 4 TB/s (read + write); GB/s counts the ideal
traffic (each operand read once, each result written once). "speedup vs torch
int8" compares each Triton kernel with its torch counterpart (torch quant,
_int_mm + epilogue, torch quant + _int_mm + epilogue, the _int_mm expert loop).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import shlex
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INT8_PEAK_TOPS = 900.0  # torch._int_mm at M=4096 measured 825-900
BF16_PEAK_TFLOPS = 740.0  # measured 705-740
HBM_GBPS = 4000.0  # device copy ~4 TB/s (read + write)
ROTATE_BYTES = 256 << 20  # > 4x H200's L2

# name -> (N, K) of the weight [N, K]
LINEAR_SHAPES = {
    "cuda": {
        "Mixtral attn q/o 4096x4096": (4096, 4096),
        "Mixtral attn k/v 1024x4096": (1024, 4096),
        "OPT-66B attn 9216x9216": (9216, 9216),
        "OPT-66B fc1 36864x9216": (36864, 9216),
        "OPT-66B fc2 9216x36864": (9216, 36864),
    },
    "cpu": {"tiny attn 64x64": (64, 64), "tiny fc1 160x64": (160, 64), "tiny fc2 64x160": (64, 160)},
}
LINEAR_M = {"cuda": (1, 16, 256, 4096), "cpu": (1, 16)}
# name -> (experts, top_k, hidden, intermediate); every expert resident
MOE_SHAPES = {"cuda": {"Mixtral-8x7B MoE": (8, 2, 4096, 14336), "Qwen3-30B-A3B MoE": (128, 8, 2048, 768)},
              "cpu": {"tiny MoE": (4, 2, 64, 96)}}
MOE_M = {"cuda": (1, 16), "cpu": (1, 16)}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", help="write the markdown table here (default: stdout only)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (median; default 25 cuda, 3 cpu)")
    p.add_argument("--shapes", default=None, help="comma-separated shape names to run (default: all of the device's)")
    p.add_argument("--linear-m", default=None, help="comma-separated M of the linear layers (default: all)")
    p.add_argument("--moe-m", default=None, help="comma-separated M of the MoE (default: all)")
    return p.parse_args()


def selection(args) -> tuple[dict, tuple, dict, tuple]:
    """(linear shapes, linear M, MoE shapes, MoE M) after --shapes / --linear-m / --moe-m."""
    linear, moe = LINEAR_SHAPES[args.device], MOE_SHAPES[args.device]
    if args.shapes:
        wanted = [s.strip() for s in args.shapes.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in linear and s not in moe]
        if unknown:
            sys.exit(f"--shapes: unknown {unknown}; {args.device} shapes: {list(linear) + list(moe)}")
        linear = {k: v for k, v in linear.items() if k in wanted}
        moe = {k: v for k, v in moe.items() if k in wanted}

    def ms(text, default):
        return tuple(int(m) for m in text.split(",")) if text else default

    return linear, ms(args.linear_m, LINEAR_M[args.device]), moe, ms(args.moe_m, MOE_M[args.device])


def main() -> None:
    args = parse_args()
    if args.device == "cpu":
        # The interpreter must be chosen before Triton is first imported; this is our own process.
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, REPO)
    import torch
    import triton

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible (use --device cpu for the smoke run)")
    bench = Bench(args.device, args.reps or (25 if args.device == "cuda" else 3))
    lines = bench.header(torch, triton)
    print("\n".join(lines), flush=True)
    linear_rows, moe_rows = [], []
    linear_shapes, linear_m, moe_shapes, moe_m = selection(args)
    for name, (n, k) in linear_shapes.items():
        for m in linear_m:
            linear_rows += bench.linear(name, m, n, k)
    for name, (experts, top_k, hidden, inter) in moe_shapes.items():
        for m in moe_m:
            moe_rows += bench.moe(name, m, experts, top_k, hidden, inter)
    lines += ["", "## Linear layers (x bf16 [M, K], W [N, K], bf16 out)", "", *table(linear_rows),
              "", "## MoE (x bf16 [M, H], top-k routing, all experts resident, float32 out)", "", *table(moe_rows),
              "", "## Correctness (checked before timing, against torch)", "", *table(bench.checks)]
    assert "vllm" not in sys.modules, "the kernel benchmark must not import vLLM"
    text = "\n".join(lines) + "\n"
    print("\n".join(lines[len(bench.header_lines):]))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}")
    if any(c["result"] != "ok" for c in bench.checks):
        sys.exit("correctness failures (see the table); their shapes were not timed")


def table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(none)"]
    cols = list(rows[0])
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
            *("| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows)]


class Bench:
    def __init__(self, device: str, reps: int):
        import torch

        self.torch = torch
        self.device = device
        self.reps = reps
        self.max_copies = 32 if device == "cuda" else 2  # the interpreter is slow; CPU numbers are a smoke test
        self.checks: list[dict] = []
        self.header_lines: list[str] = []

    # ------------------------------------------------------------ infrastructure

    def header(self, torch, triton) -> list[str]:
        dev = torch.cuda.get_device_name() if self.device == "cuda" else "CPU (Triton interpreter)"
        lines = [
            "# Kernel benchmark: Triton int8 vs torch._int_mm vs bf16",
            "",
            f"date {datetime.date.today().isoformat()}; device {dev}; torch {torch.__version__}; "
            f"triton {triton.__version__}",
            f"command: `python benchmarks/kernels.py {shlex.join(sys.argv[1:])}`; median of {self.reps} repetitions; "
            + (f"inputs rotated over >= {ROTATE_BYTES >> 20} MB of copies" if self.device == "cuda"
               else f"inputs rotated over {self.max_copies} copies"),
            *(["timing: each timed batch of calls is one CUDA graph, replayed between CUDA events (launch overhead "
               "excluded, as in vLLM's graph replays); loops that read routing on the host are timed as eager "
               "launches (column \"timing\")"] if self.device == "cuda" else []),
            f"ceilings (H200, measured): int8 {INT8_PEAK_TOPS:.0f} TOPS (torch._int_mm 825-900 at M=4096), "
            f"bf16 {BF16_PEAK_TFLOPS:.0f} TFLOPS (705-740), HBM {HBM_GBPS / 1000:.0f} TB/s (device copy, r+w)",
        ]
        if self.device == "cpu":
            lines += ["", "**SMOKE RUN on CPU: tiny shapes through the Triton interpreter (numpy). These numbers mean "
                          "nothing for GPU speed; they only show that the script and its correctness checks run.**"]
        self.header_lines = lines
        return list(lines)

    def sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def time_ms(self, fn, copies: int, graph: bool = True) -> tuple[float, str]:
        """(median milliseconds per call, how it was timed); each timed batch cycles through all rotating copies.

        On CUDA with ``graph`` the batch is captured once as a CUDA graph and its replays are timed, so that
        launch overhead (a few microseconds per Python launch, as long as a decode GEMM) is not measured."""
        calls = max(copies, 4 if self.device == "cuda" else 1)
        for i in range(calls * (2 if self.device == "cuda" else 1)):  # warm-up (and Triton compiles)
            fn(i % copies)
        self.sync()
        if self.device == "cuda" and graph:
            replay = self.capture(fn, calls, copies)
            if replay is not None:
                return self.time_replays(replay, calls), "CUDA graph"
        samples = []
        for _ in range(self.reps):
            if self.device == "cuda":
                start, end = self.torch.cuda.Event(enable_timing=True), self.torch.cuda.Event(enable_timing=True)
                start.record()
                for i in range(calls):
                    fn(i % copies)
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / calls)
            else:
                t0 = time.perf_counter()
                for i in range(calls):
                    fn(i % copies)
                samples.append((time.perf_counter() - t0) * 1e3 / calls)
        return statistics.median(samples), ("eager launches" if self.device == "cuda" else "wall clock")

    def capture(self, fn, calls: int, copies: int):
        """A CUDA graph of ``calls`` calls of ``fn`` over the rotating copies, or None if it cannot be captured."""
        torch = self.torch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # capture-time allocations settle on a side stream first
            for i in range(copies):
                fn(i % copies)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                for i in range(calls):
                    fn(i % copies)
        except Exception as exc:  # noqa: BLE001 - e.g. a host synchronization inside fn
            print(f"CUDA graph capture failed ({type(exc).__name__}: {exc}); timing eager launches", flush=True)
            torch.cuda.synchronize()
            return None
        return graph

    def time_replays(self, graph, calls: int) -> float:
        torch = self.torch
        graph.replay()  # first replay uploads the graph
        torch.cuda.synchronize()
        samples = []
        for _ in range(self.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / calls)
        return statistics.median(samples)

    def row(self, shape: str, m: int, impl: str, ms: float, ops: float, bytes_moved: float, int8: bool,
            baseline_ms: float | None, bf16_ms: float | None, timing: str = "") -> dict:
        tops = ops / ms / 1e9
        gbps = bytes_moved / ms / 1e6
        gpu = self.device == "cuda"
        peak = INT8_PEAK_TOPS if int8 else BF16_PEAK_TFLOPS
        ratio = lambda ref: f"{ref / ms:.2f}x" if ref else "-"  # noqa: E731
        return {
            "shape": shape, "M": m, "implementation": impl, "ms": f"{ms:.4g}",
            **({"timing": timing} if gpu else {}),
            "T(FL)OPS": f"{tops:.3g}" if ops else "-",
            "% compute peak": (f"{100 * tops / peak:.0f}%" if gpu else "n/a") if ops else "-",
            "GB/s": f"{gbps:.3g}", "% HBM": f"{100 * gbps / HBM_GBPS:.0f}%" if gpu else "n/a",
            "speedup vs torch int8": ratio(baseline_ms), "speedup vs bf16": ratio(bf16_ms),
        }

    def check(self, what: str, shape: str, m: int, ok: bool, detail: str) -> bool:
        """Record a correctness result; a failed shape is reported and not timed."""
        self.checks.append({"kernel": what, "shape": shape, "M": m, "result": "ok" if ok else "FAIL", "detail": detail})
        if not ok:
            print(f"CORRECTNESS FAILURE: {what} {shape} M={m}: {detail}", flush=True)
        return ok

    @staticmethod
    def rel_err(got, ref) -> float:
        return float((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp(min=1e-30))

    # ------------------------------------------------------------ linear layers

    def linear(self, shape: str, m: int, n: int, k: int) -> list[dict]:
        torch = self.torch
        from vllm_haq.kernels.int8_gemm import exact_int8_mm, torch_scaled_int8_mm
        from vllm_haq.kernels.triton_gemm import triton_scaled_int8_mm, triton_w8a8_linear
        from vllm_haq.kernels.triton_quant import triton_quantize_per_token
        from vllm_haq.quant import quantize_per_token, quantize_weight_per_channel

        dev = self.device
        copies = max(1, min(self.max_copies, math.ceil(ROTATE_BYTES / (n * k))))
        sets = []
        for _ in range(copies):
            w = torch.randn(n, k, device=dev) * 0.02
            w_q, w_s = quantize_weight_per_channel(w)
            x = torch.randn(m, k, device=dev)
            x[:, :: max(1, k // 8)] *= 20  # a few outlier channels, as in real activations
            x = x.to(torch.bfloat16)
            x_q, x_s = quantize_per_token(x)
            sets.append(dict(x=x, w_q=w_q, w_s=w_s, w_t=w_q.t().contiguous(), x_q=x_q, x_s=x_s,
                             w_bf16=w.to(torch.bfloat16), bias=None))
            del w

        # correctness before timing
        s = sets[0]
        q, qs = triton_quantize_per_token(s["x"])
        ok = self.check("triton quant", shape, m, torch.equal(q, s["x_q"]) and torch.equal(qs, s["x_s"]),
                        f"int8 mismatches {int((q != s['x_q']).sum())}, scales equal {torch.equal(qs, s['x_s'])}")
        exact = exact_int8_mm(s["x_q"], s["w_t"]).double() * s["x_s"].double() * s["w_s"].double().t()
        got = triton_scaled_int8_mm(s["x_q"], s["x_s"], s["w_q"], s["w_s"], out_dtype=torch.float32)
        err = self.rel_err(got, exact)
        ok &= self.check("triton gemm (fp32 out)", shape, m, err <= 1e-5, f"rel err {err:.1e} vs exact int32 GEMM")
        ref = torch_scaled_int8_mm(s["x"], s["w_t"], s["w_s"], None, torch.float32)
        err = self.rel_err(triton_w8a8_linear(s["x"], s["w_q"], s["w_s"], out_dtype=torch.float32), ref)
        ok &= self.check("triton quant+gemm", shape, m, err <= 1e-3, f"rel err {err:.1e} vs torch quant + _int_mm")
        err = self.rel_err(triton_w8a8_linear(s["x"], s["w_q"], s["w_s"]), ref)
        ok &= self.check("triton quant+gemm (bf16 out)", shape, m, err <= 1e-2,
                         f"rel err {err:.1e} (bf16 output rounding)")
        if not ok:
            return []
        # cuBLASLt's int8 GEMM prefers a column-major B: the weight's transposed view, if _int_mm takes it
        try:
            exact_int8_mm(s["x_q"], s["w_q"].t())
            int_mm_b = "w_q_t_view"
        except RuntimeError:
            int_mm_b = "w_t"

        def b_operand(c):  # what ScaledInt8Gemm's torch backend passes (the first H200 run timed the
            return c["w_q"].t() if int_mm_b == "w_q_t_view" else c["w_t"]  # row-major copy: 10x slower at M=1)

        def epilogue_int_mm(i):
            c = sets[i]
            return (exact_int8_mm(c["x_q"], b_operand(c)).float() * c["x_s"] * c["w_s"].reshape(1, -1)).to(
                torch.bfloat16)

        timings = {
            "triton quant": lambda i: triton_quantize_per_token(sets[i]["x"]),
            "torch quant": lambda i: quantize_per_token(sets[i]["x"]),
            "triton gemm (int8 in)": lambda i: triton_scaled_int8_mm(sets[i]["x_q"], sets[i]["x_s"], sets[i]["w_q"],
                                                                     sets[i]["w_s"], out_dtype=torch.bfloat16),
            "_int_mm + epilogue (int8 in)": epilogue_int_mm,
            "torch._int_mm alone (int32 out)": lambda i: exact_int8_mm(sets[i]["x_q"], b_operand(sets[i])),
            "triton quant+gemm": lambda i: triton_w8a8_linear(sets[i]["x"], sets[i]["w_q"], sets[i]["w_s"]),
            "torch quant + _int_mm + epilogue": lambda i: torch_scaled_int8_mm(
                sets[i]["x"], b_operand(sets[i]), sets[i]["w_s"], None, torch.bfloat16),
            "bf16 matmul": lambda i: torch.matmul(sets[i]["x"], sets[i]["w_bf16"].t()),
        }
        timed = {impl: self.time_ms(fn, copies) for impl, fn in timings.items()}
        ms = {impl: t for impl, (t, _) in timed.items()}
        torch_counterpart = {"triton quant": "torch quant", "triton gemm (int8 in)": "_int_mm + epilogue (int8 in)",
                             "triton quant+gemm": "torch quant + _int_mm + epilogue"}
        # ideal traffic: each operand read once, each result written once
        quant_bytes = m * k * 2 + m * k + m * 4
        gemm_bytes = n * k + m * k + m * n * 2 + 4 * (m + n)
        rows = []
        for impl, t in ms.items():
            has_counterpart = "matmul" not in impl and "alone" not in impl
            baseline = ms.get(torch_counterpart.get(impl, impl)) if has_counterpart else None
            how = timed[impl][1]
            if impl.endswith(" quant"):
                rows.append(self.row(shape, m, impl, t, 0.0, quant_bytes, True, baseline, None, how))
            elif impl == "bf16 matmul":
                rows.append(self.row(shape, m, impl, t, 2.0 * m * n * k, 2 * (n * k + m * k + m * n), False,
                                     None, t, how))
            else:  # quant+gemm reads bf16 x: one more byte per element than the int8 GEMM alone
                rows.append(self.row(shape, m, impl, t, 2.0 * m * n * k,
                                     gemm_bytes + (m * k if "quant" in impl else 0), True, baseline, ms["bf16 matmul"],
                                     how))
        print(f"{shape} M={m}: " + ", ".join(f"{impl} {t:.4f} ms" for impl, t in ms.items()), flush=True)
        return rows

    # ------------------------------------------------------------ MoE

    def moe(self, shape: str, m: int, experts: int, top_k: int, hidden: int, inter: int) -> list[dict]:
        torch = self.torch
        import torch.nn.functional as F

        from vllm_haq.kernels import ScaledInt8Gemm, group_by_expert, int8_moe_forward
        from vllm_haq.kernels.triton_moe import triton_int8_moe_forward
        from vllm_haq.quant import quantize_weight_per_channel

        dev = self.device
        w13_f = torch.randn(experts, 2 * inter, hidden, device=dev) * 0.02
        w2_f = torch.randn(experts, hidden, inter, device=dev) * 0.02
        w13, w13_s = zip(*(quantize_weight_per_channel(w) for w in w13_f))
        w2, w2_s = zip(*(quantize_weight_per_channel(w) for w in w2_f))
        w13, w13_s, w2, w2_s = (torch.stack(t) for t in (w13, w13_s, w2, w2_s))
        w13_bf16, w2_bf16 = w13_f.to(torch.bfloat16), w2_f.to(torch.bfloat16)
        del w13_f, w2_f
        slots = torch.arange(experts, dtype=torch.int32, device=dev)  # all resident, slot = expert
        copies = min(8, self.max_copies)  # routing and activations rotate; the weights (GBs) exceed L2 anyway
        inputs = []
        for _ in range(copies):
            logits = torch.randn(m, experts, device=dev)
            weights, ids = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)
            inputs.append((torch.randn(m, hidden, device=dev).to(torch.bfloat16), weights, ids.to(torch.int32)))
        g13 = [ScaledInt8Gemm(w13[e], w13_s[e], torch.float32, backend="torch") for e in range(experts)]
        g2 = [ScaledInt8Gemm(w2[e], w2_s[e], torch.float32, backend="torch") for e in range(experts)]

        x, wts, ids = inputs[0]
        ref = int8_moe_forward(x, wts, ids, g13, g2)
        err = self.rel_err(triton_int8_moe_forward(x, wts, ids, slots, w13, w13_s, w2, w2_s), ref)
        if not self.check("triton MoE", shape, m, err <= 1e-3, f"rel err {err:.1e} vs int8_moe_forward (_int_mm loop)"):
            return []

        def bf16_loop(i):
            x, wts, ids = inputs[i]
            out = torch.zeros(m, hidden, dtype=torch.float32, device=dev)
            tok, slot, counts = group_by_expert(ids, experts)
            start = 0
            for e, c in enumerate(counts.tolist()):
                if c:
                    t, s = tok[start : start + c], slot[start : start + c]
                    gate_up = torch.matmul(x[t], w13_bf16[e].t())
                    y = torch.matmul(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], w2_bf16[e].t())
                    out.index_add_(0, t, y.float() * wts[t, s].unsqueeze(-1))
                start += c
            return out

        timings = {
            "triton fused MoE": lambda i: triton_int8_moe_forward(*inputs[i], slots, w13, w13_s, w2, w2_s),
            "torch _int_mm expert loop": lambda i: int8_moe_forward(*inputs[i], g13, g2),
            "bf16 expert loop": bf16_loop,
        }
        host_loops = ("torch _int_mm expert loop", "bf16 expert loop")  # read routing counts on the host
        timed = {impl: self.time_ms(fn, copies, graph=impl not in host_loops) for impl, fn in timings.items()}
        ms = {impl: t for impl, (t, _) in timed.items()}
        touched = statistics.mean(len(set(inp[2].reshape(-1).tolist())) for inp in inputs)
        flops = 2.0 * m * top_k * 3 * hidden * inter
        io_bytes = m * hidden * 2 + m * hidden * 4  # bf16 x in, float32 out
        rows = []
        for impl, t in ms.items():
            int8 = impl != "bf16 expert loop"
            weight_bytes = touched * 3 * hidden * inter * (1 if int8 else 2)  # experts actually routed to
            rows.append(self.row(shape, m, impl, t, flops, weight_bytes + io_bytes, int8,
                                 ms["torch _int_mm expert loop"] if int8 else None, ms["bf16 expert loop"],
                                 timed[impl][1]))
        print(f"{shape} M={m}: " + ", ".join(f"{impl} {t:.4f} ms" for impl, t in ms.items()), flush=True)
        return rows


if __name__ == "__main__":
    main()
