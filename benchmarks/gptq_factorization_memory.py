"""Peak memory and time of GPTQ's Hessian factorization: in place (vllm_haq) vs torch's three-matrix form.

Each variant runs in its own subprocess on the same synthetic symmetric positive definite Hessian
(float32 above FLOAT64_MAX_INPUTS inputs, as the converter keeps it); peak RSS is read from
getrusage after the Hessian exists, so the table shows what factorizing adds on top of the Hessian.

    .venv/bin/python benchmarks/gptq_factorization_memory.py --n 8193 14336 \
        --out benchmarks/results/gptq_factorization.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

VARIANTS = ("torch_reference", "in_place")


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _run_one(variant: str, n: int) -> dict:
    import torch

    from vllm_haq.quant.gptq import GPTQConfig, GPTQSolver, _restore_upper_, hessian_dtype

    dtype = hessian_dtype(n)
    g = torch.Generator().manual_seed(0)
    h = torch.rand(n, n, generator=g, dtype=dtype)
    # symmetric (mirrored block by block: no second n x n matrix), diagonally dominant: positive definite
    _restore_upper_(h, h.diagonal() + n)
    del g
    base = _rss_peak_bytes()
    t0 = time.perf_counter()
    if variant == "in_place":
        solver = GPTQSolver.__new__(GPTQSolver)
        solver._factorize([h], GPTQConfig())  # what GPTQSolver.from_accumulator does with a Hessian it owns
        del h
    else:  # the same steps with torch: permuted copy, cholesky, cholesky_inverse, cholesky(upper)
        perm = torch.argsort(torch.diag(h), descending=True)
        h = h.index_select(0, perm).index_select(1, perm)
        h.diagonal().add_(0.01 * torch.mean(torch.diag(h)))
        low = torch.linalg.cholesky(h)
        del h
        inv = torch.cholesky_inverse(low)
        del low
        torch.linalg.cholesky(inv, upper=True).float()  # the factor, freed at once: only the peak matters here
        del inv
    seconds = time.perf_counter() - t0
    matrix = n * n * torch.finfo(dtype).bits // 8
    return {"variant": variant, "n": n, "dtype": str(dtype).replace("torch.", ""), "hessian_bytes": matrix,
            "added_peak_bytes": max(0, _rss_peak_bytes() - base), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[8193])
    ap.add_argument("--out", help="write a markdown table here")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(_run_one(args._child[0], int(args._child[1]))))
        return
    rows = []
    for n in args.n:
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--_child", variant, str(n)], check=True,
                                 capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    lines = ["| inputs n | Hessian dtype | Hessian | variant | added peak RSS | × Hessian | time s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['dtype']} | {r['hessian_bytes'] / 2**20:.0f} MiB | {r['variant']} | "
                     f"{r['added_peak_bytes'] / 2**20:.0f} MiB | {r['added_peak_bytes'] / r['hessian_bytes']:.2f} | "
                     f"{r['seconds']:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        head = (f"# GPTQ Hessian factorization memory\n\n{datetime.date.today()}, {platform.node()} "
                f"({os.cpu_count()} cores, shared), command: `.venv/bin/python benchmarks/gptq_factorization_memory.py "
                f"--n {' '.join(map(str, args.n))} --out {args.out}`\n\nPeak RSS added on top of the Hessian itself "
                "while factorizing it (each variant in its own process).\n\n")
        with open(args.out, "w") as f:
            f.write(head + table + "\n")


if __name__ == "__main__":
    main()
