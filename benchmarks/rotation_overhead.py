"""Run-time cost of the block-Hadamard input rotation: one W8A8 linear with and without it, side by side.

    .venv/bin/python benchmarks/rotation_overhead.py --out benchmarks/results/rotation_overhead.md [--device cuda]

Needs only torch (never vLLM). Per layer shape and token count M it times ``ScaledInt8Gemm`` (this machine's
int8 backend) on the same activations, unrotated and with the rotation the converter would choose for that
width (``rotation_block``), interleaved repetitions, median; the ratio is what a rotated layer costs relative to
the unrotated one. It first checks the rotated layer against the float product it stands for (the same weights
rotated in float64), so a wrong rotation cannot produce a table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# name -> (out N, in K) of the weight
SHAPES = {
    "SmolLM2-135M q/k/v 960x576": (960, 576),
    "SmolLM2-135M gate/up 3072x576": (3072, 576),
    "SmolLM2-135M down 576x1536": (576, 1536),
    "Llama-7B down 4096x11008": (4096, 11008),
    "Mixtral-8x7B attn q 4096x4096": (4096, 4096),
    "Mixtral-8x7B expert down 4096x14336": (4096, 14336),  # per expert, on the tokens routed to it
}
TOKENS = (1, 16, 256)


def _time(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> int:
    import torch

    from quality import machine  # benchmarks/ is on sys.path when this script runs
    from vllm_haq.kernels import ScaledInt8Gemm
    from vllm_haq.quant import quantize_weight_per_channel, rotate, rotation_block

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", default=None, help="markdown file to write (default: stdout only)")
    ap.add_argument("--reps", type=int, default=7, help="interleaved repetitions (median)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, (n, k) in SHAPES.items():
        block = rotation_block(k)
        w = torch.randn(n, k, generator=gen) * 0.05
        plain = ScaledInt8Gemm(*(t.to(dev) for t in quantize_weight_per_channel(w)), torch.float32)
        rotated = ScaledInt8Gemm(*(t.to(dev) for t in quantize_weight_per_channel(rotate(w, block))), torch.float32,
                                 rotation=block)
        for m in TOKENS:
            x = (torch.randn(m, k, generator=gen) * (1 + 20 * (torch.rand(k, generator=gen) > 0.99))).to(dev)
            ref = x.double().cpu() @ w.double().t()
            err = float((rotated(x).double().cpu() - ref).norm() / ref.norm())
            if not err < 0.02:
                raise SystemExit(f"{name} M={m}: rotated W8A8 product is off by {err:.3g} (relative); not timing")
            inner = max(1, int(2e8 // (2 * m * n * k)))  # ~0.1 s of int8 work per sample

            def run(layer):
                def f():
                    for _ in range(inner):
                        layer(x)
                    sync()
                return f

            run(plain)(), run(rotated)()  # warm-up
            t_plain, t_rot = [], []
            for _ in range(args.reps):
                t_plain.append(_time(run(plain), 1) / inner)
                t_rot.append(_time(run(rotated), 1) / inner)
            p, r = statistics.median(t_plain), statistics.median(t_rot)
            rows.append((name, block, m, p, r, err))
            print(f"{name} M={m}: {p * 1e3:.3f} ms vs rotated {r * 1e3:.3f} ms ({r / p:.2f}x)", flush=True)

    backend = plain.backend
    where = (f"{platform.machine()} {torch.cuda.get_device_name()}" if dev.type == "cuda"
             else machine())  # quality.py's description of this host
    lines = ["# Run-time cost of the input rotation (one W8A8 linear)", "",
             f"Date: {datetime.date.today()}; machine: {where}; torch {torch.__version__}; "
             f"int8 backend `{backend}`; command: `{' '.join(['python', *sys.argv])}`.", "",
             "Same layer and activations, unrotated vs rotated (activations × block-Hadamard in PyTorch, then the "
             "same int8 GEMM), median of interleaved repetitions. \"rel. error\" is the rotated W8A8 product against "
             "the float product of the unrotated weights (the check done before timing).", "",
             "| layer (N x K) | block | M tokens | unrotated ms | rotated ms | rotated / unrotated | rel. error |",
             "|---|---|---|---|---|---|---|"]
    for name, block, m, p, r, err in rows:
        lines.append(f"| {name} | {block} | {m} | {p * 1e3:.3f} | {r * 1e3:.3f} | {r / p:.2f} | {err:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
