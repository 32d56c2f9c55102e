"""Time of ``GPTQSolver(h).quantize(w)`` with GPTQ's column loop in torch vs compiled (vllm_haq.quant.gptq_cpu).

Why: the torch loop's ~8 tiny ops per column were a tenth of a SmolLM2-135M conversion's CPU time. Both loops
run in one process on the same solver (``HAQ_GPTQ_CPU_KERNEL=off`` selects the torch loop per call), alternated,
median of ``--runs``, at each thread count; the factorization (done once per shape) is not timed. Prints a
Markdown table (and checks that both loops give the same int8 weights).

    .venv/bin/python benchmarks/gptq_columns.py --threads 1 2 --runs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from vllm_haq.quant import gptq_cpu
from vllm_haq.quant.gptq import GPTQSolver, _restore_upper_, hessian_dtype

# (name, inputs, rows): SmolLM2-135M's stacked q/k/v, gate/up, down; Mixtral-8x7B's expert down projection
SHAPES = [("SmolLM2 qkv", 576, 576 + 192 + 192), ("SmolLM2 gate+up", 576, 3072), ("SmolLM2 down", 1536, 576),
          ("Mixtral down", 14336, 4096)]


def _solver(n: int) -> GPTQSolver:
    """A solver of a synthetic symmetric, diagonally dominant (positive definite) Hessian."""
    g = torch.Generator().manual_seed(n)
    h = torch.rand(n, n, generator=g, dtype=hessian_dtype(n))
    _restore_upper_(h, h.diagonal() + n)
    return GPTQSolver.from_owned(h)


def _time(solver: GPTQSolver, w: torch.Tensor, compiled: bool) -> tuple[float, torch.Tensor]:
    if compiled:
        os.environ.pop(gptq_cpu.ENV_SWITCH, None)
    else:
        os.environ[gptq_cpu.ENV_SWITCH] = "off"
    t0 = time.perf_counter()
    q, _ = solver.quantize(w)
    return time.perf_counter() - t0, q


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--shapes", nargs="+", default=[s[0] for s in SHAPES], choices=[s[0] for s in SHAPES])
    args = parser.parse_args()
    assert gptq_cpu.usable(torch.zeros(1)), gptq_cpu._extension.state
    print("| shape | in x rows | threads | torch loop (ms) | compiled (ms) | speed-up |\n|---|---|---|---|---|---|")
    for name, n_in, rows in (s for s in SHAPES if s[0] in args.shapes):
        solver = _solver(n_in)
        w = torch.randn(rows, n_in, generator=torch.Generator().manual_seed(rows))
        for threads in args.threads:
            torch.set_num_threads(threads)
            before, after = [], []
            for _ in range(args.runs):
                seconds, q_torch = _time(solver, w, compiled=False)
                before.append(seconds)
                seconds, q = _time(solver, w, compiled=True)
                after.append(seconds)
                assert torch.equal(q, q_torch), f"{name}: the loops disagree"
            t0, t1 = statistics.median(before) * 1e3, statistics.median(after) * 1e3
            print(f"| {name} | {n_in} x {rows} | {threads} | {t0:.1f} | {t1:.1f} | {t0 / t1:.1f}x |", flush=True)
    os.environ.pop(gptq_cpu.ENV_SWITCH, None)


if __name__ == "__main__":
    main()
