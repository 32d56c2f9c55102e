"""How the calibration budget and its random draw move HAQ against SmoothQuant-only (a benchmark, not a test).

    .venv/bin/python benchmarks/calibration_size.py --out benchmarks/results/calibration_size.md \\
        --model tiny-opt --samples 16 64 --seeds 0 1 2 3

For every calibration size (512-token windows drawn from wiki.train + sotu.train) and seed, converts the model
with each method and scores it on the whole wiki.test and sotu.test splits with the hf backend (the same int8
arithmetic as the served model; quality.md checks that the two backends agree), all in one run: perplexity
change against bf16, the paired HAQ − SmoothQuant difference over the same windows, and KL(bf16 || method) per
token on the first --kl-windows windows of each corpus. The quality table (quality.md) calibrates on one draw;
this shows how much of a small perplexity difference between two methods is that draw.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import (CALIB, TEST_CORPORA, json_path, kl_to_reference, machine, models,  # noqa: E402
                     paired_difference, score, timed_subprocess)

METHODS = {"SmoothQuant": ["--method", "smoothquant", "--alpha", "0.5"], "HAQ": ["--method", "haq"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="markdown file to write (its .json beside it keeps the raw numbers)")
    ap.add_argument("--work", default="/tmp/haq-calibration-size", help="where checkpoints are written")
    ap.add_argument("--model", default="tiny-opt", choices=list(models()))
    ap.add_argument("--samples", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--kl-windows", type=int, default=40)
    args = ap.parse_args()

    import torch

    from offline.perplexity import eval_token_windows, hf_final_hidden

    src = models()[args.model]()
    windows = {c: eval_token_windows(src, p, 512) for c, p in TEST_CORPORA.items()}
    kl_windows = {c: w[: args.kl_windows] for c, w in windows.items()}
    reference = hf_final_hidden(src, torch.cat(list(kl_windows.values())))
    bf16_ppl, bf16_nll = score(src, windows, "hf")
    run = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
           "command": ".venv/bin/python benchmarks/calibration_size.py " + " ".join(sys.argv[1:]), "model": args.model,
           "windows": {c: int(w.shape[0]) for c, w in windows.items()}, "kl_windows": args.kl_windows,
           "bf16": {"ppl": bf16_ppl, "window_nll": bf16_nll}, "results": []}
    os.makedirs(args.work, exist_ok=True)
    for n in args.samples:
        for seed in args.seeds:
            entry = {"samples": n, "seed": seed, "ppl": {}, "window_nll": {}, "kl": {}, "seconds": {}}
            for method, opts in METHODS.items():
                out = os.path.join(args.work, f"{args.model}-{method}-{n}-{seed}")
                shutil.rmtree(out, ignore_errors=True)
                cost = timed_subprocess([sys.executable, "-m", "offline.cli", "convert", src, out, "--calib", *CALIB,
                                         "--samples", str(n), "--seed", str(seed), "--no-progress", *opts])
                if not cost["ok"]:
                    raise SystemExit(f"{method} samples={n} seed={seed}: conversion failed: {cost.get('error')}")
                entry["seconds"][method] = cost["seconds"]
                entry["ppl"][method], entry["window_nll"][method] = score(out, windows, "hf")
                kl = kl_to_reference(out, kl_windows, reference)
                entry["kl"][method] = {c: statistics.fmean(v) for c, v in kl.items()}
                shutil.rmtree(out, ignore_errors=True)
            run["results"].append(entry)
            print(json.dumps({k: entry[k] for k in ("samples", "seed", "ppl", "kl")}), flush=True)
            if args.out:
                write(run, args.out)
    print(render(run))
    return 0


def write(run: dict, md_path: str) -> None:
    with open(json_path(md_path), "w") as f:
        json.dump(run, f, indent=1)
    with open(md_path, "w") as f:
        f.write(render(run))


def render(run: dict) -> str:
    corp = list(run["windows"])

    def pct(c: str, ppl: float) -> float:
        """Perplexity change vs bf16 on corpus ``c``, in %."""
        return 100.0 * (ppl / run["bf16"]["ppl"][c] - 1.0)

    lines = [f"# Calibration size and seed: HAQ vs SmoothQuant-only on {run['model']}", "",
             f"{run['date']} — {run['machine']}", "", f"Command: `{run['command']}` (from the repository root, "
             f"git commit of the run in the commit that adds this file or later).", "",
             "Scored with the hf backend on the whole test splits ("
             + ", ".join(f"{c}: {w} windows of 512 tokens" for c, w in run["windows"].items())
             + "); bf16 perplexity " + ", ".join(f"{c} {run['bf16']['ppl'][c]:.3f}" for c in corp)
             + f". KL(bf16 ‖ method) in 10⁻³ nats per token over the first {run['kl_windows']} windows of each corpus. "
             "Paired: HAQ − SmoothQuant over the same windows, as a perplexity ratio in % with its 95% interval. "
             "Calibration: `--samples N` windows of 512 tokens from wiki.train + sotu.train drawn with `--seed`.", "",
             "| samples | seed | " + " | ".join(f"{c} SQ | {c} HAQ | {c} paired HAQ−SQ" for c in corp)
             + " | KL SQ | KL HAQ |", "|" + "---|" * (2 + 3 * len(corp) + 2)]
    for e in run["results"]:
        cells = []
        for c in corp:
            nll = e["window_nll"]
            d, lo, hi = (100.0 * v for v in paired_difference(nll["HAQ"][c], nll["SmoothQuant"][c]))
            cells += [f"{pct(c, e['ppl']['SmoothQuant'][c]):+.3f}%", f"{pct(c, e['ppl']['HAQ'][c]):+.3f}%",
                      f"{d:+.3f}% [{lo:+.3f}, {hi:+.3f}]"]
        kl = {m: 1e3 * statistics.fmean(e["kl"][m].values()) for m in METHODS}
        lines.append(f"| {e['samples']} | {e['seed']} | " + " | ".join(cells)
                     + f" | {kl['SmoothQuant']:.3f} | {kl['HAQ']:.3f} |")
    lines += ["", "Mean ± standard deviation over the seeds (perplexity change vs bf16):", "",
              "| samples | seeds | " + " | ".join(f"{c} SQ | {c} HAQ" for c in corp) + " | HAQ ≤ SQ |",
              "|" + "---|" * (3 + 2 * len(corp))]
    for n in sorted({e["samples"] for e in run["results"]}):
        es = [e for e in run["results"] if e["samples"] == n]
        cells = []
        for c in corp:
            for m in METHODS:
                v = [pct(c, e["ppl"][m][c]) for e in es]
                cells.append(f"{statistics.fmean(v):+.3f}% ± {statistics.stdev(v) if len(v) > 1 else math.nan:.3f}")
        wins = sum(e["ppl"]["HAQ"][c] <= e["ppl"]["SmoothQuant"][c] for e in es for c in corp)
        lines.append(f"| {n} | {len(es)} | " + " | ".join(cells) + f" | {wins} of {len(es) * len(corp)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
