"""The plan of one conversion: every decision ``haq convert`` makes before it loads a tensor, made once.

``offline.convert`` carries a plan out and ``offline.estimate`` (``--dry-run``) sizes it. Both used to decide
for themselves which files are copied, how the shards are named, whether calibration text is needed and what
``quantization_config`` holds, and the estimate's copy had drifted (its ``producer`` block lacked
``rotation``); now both read it from a ``ConversionPlan``. A plan comes from the model's ``config.json``, the
safetensors files (opened, no tensor data read) and the ``ConvertOptions``.

This module is also the one source of the converter's options: ``ConvertOptions``' field defaults (its GPTQ ones
are ``GPTQConfig``'s) and the tables ``METHODS``, ``MOE_SMOOTHING``, ``ROTATION_MODES`` and ``FORMATS``, from
which ``haq convert``'s argparse takes its own (``offline.cli``), and each field's metadata (its recipe key, flag,
choices and bounds), from which ``offline.recipe`` reads and writes recipes and ``check_options`` checks.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from vllm_haq import __version__
from vllm_haq.errors import HAQError
from vllm_haq.format import (DEFAULT_IGNORE, ROUTING_FILE, HAQQuantConfig, is_ignored, read_json, resolve_model,
                             snapshot_commit)
from vllm_haq.quant.gptq import GPTQConfig

from offline.corpus import source_label
from offline.device import device_problem
from offline.haq import METHODS as METHOD_SPECS
from offline.haq import MOE_SMOOTHING, ROTATION_MODES
from offline.models import ModelSpec, spec_for
from offline.source import SafetensorsCheckpoint, SourceError

METHODS = tuple(METHOD_SPECS)  # --method: rtn, gptq, smoothquant, haq (offline.haq.METHODS)
# --format: the converter always writes a HAQ checkpoint; "compressed-tensors" exports it (offline.interop)
FORMATS = ("haq", "compressed-tensors")
COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja", "added_tokens.json",
)
_GPTQ = GPTQConfig()  # the GPTQ defaults: vllm_haq.quant.gptq owns them


class ConvertError(HAQError, RuntimeError):
    """Conversion cannot proceed; the message says why and what to do."""


def _option(default=dataclasses.MISSING, *, key: str | None, flag: str | None, factory=None, choices=None,
            least=None, most=None, note: str | None = None):
    """A ``ConvertOptions`` field with what is known about it beside its default, kept here so that nothing repeats
    the list of options: ``key``, its place in a recipe (``offline.recipe``; None: not a recipe option), ``flag``,
    ``haq convert``'s flag (named in errors), ``choices`` and the bounds ``least`` / ``most`` (``check_options``),
    ``note``: what a written recipe says of it beside the flag (what null means)."""
    meta = {"recipe": key, "flag": flag, "choices": choices, "least": least, "most": most, "note": note}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ConvertOptions:
    """The options of one conversion (``haq convert``'s flags, a recipe's keys). Its field defaults are the command
    line's and the recipes' too: offline.cli takes them from here (``option_default``), offline.recipe its keys,
    types and checks (each field's metadata, see ``_option``), rather than repeating them."""

    # the product's method; "rtn" converts without calibration text (dense models)
    method: str = _option("haq", key="method", flag="--method", choices=METHODS)
    calib: list[str] = _option(key="calibration.dataset", flag="--calib", factory=list)
    # datasets sources (offline.corpus): split and field read (None: the preset's / train, and the first of
    # text/messages/conversations), and whether conversations go through the tokenizer's chat template
    calib_split: str | None = _option(None, key="calibration.split", flag="--calib-split",
                                      note="null: the preset's, else train")
    calib_field: str | None = _option(None, key="calibration.field", flag="--calib-field",
                                      note="null: the first of text, messages, conversations")
    calib_chat_template: bool = _option(False, key="calibration.chat_template", flag="--calib-chat-template")
    # calibration windows (why 64: the README's --samples row)
    samples: int = _option(64, key="calibration.samples", flag="--samples", least=1)
    seq_len: int = _option(512, key="calibration.seq_len", flag="--seq-len", least=1)
    seed: int = _option(0, key="calibration.seed", flag="--seed")
    ignore: list[str] = _option(key="ignore", flag="--ignore", factory=lambda: list(DEFAULT_IGNORE))
    routing_stats: bool = _option(True, key="calibration.routing_stats", flag="--no-routing-stats")
    # how this run proceeds, not what it produces: no recipe keys
    resume: bool = _option(False, key=None, flag="--resume")
    overwrite: bool = _option(False, key=None, flag="--overwrite")
    # smoothing strength of --method smoothquant (haq searches it per layer)
    alpha: float = _option(0.5, key="smoothing.alpha", flag="--alpha", least=0.0, most=1.0)
    # or "per-expert": explicit input_smooth per expert (see offline.haq)
    moe_smoothing: str = _option("shared", key="smoothing.moe", flag="--moe-smoothing", choices=MOE_SMOOTHING)
    # block-Hadamard rotation of dense layers' inputs (format v2, see vllm_haq.quant.rotation): "search" (haq's
    # default), "all" or "none" (every other method's, and --format compressed-tensors'); see
    # offline.haq.ROTATION_MODES and ``rotation_mode``
    rotation: str | None = _option(None, key="rotation", flag="--rotation", choices=ROTATION_MODES,
                                   note="null: search for haq into a HAQ checkpoint, else none")
    gptq_block_size: int = _option(_GPTQ.block_size, key="gptq.block_size", flag="--gptq-block-size", least=1)
    gptq_dampening: float = _option(_GPTQ.dampening, key="gptq.dampening", flag="--gptq-dampening", least=0.0)
    act_order: bool = _option(_GPTQ.act_order, key="gptq.act_order", flag="--no-act-order")
    # calibration samples per forward chunk (bounds attention memory); no flag
    chunk: int = _option(8, key="calibration.batch_size", flag=None, least=1,
                         note="no flag: calibration windows run through a layer at once")
    # what is written: a HAQ checkpoint, or one exported to compressed-tensors (offline.convert)
    format: str = _option(FORMATS[0], key="format", flag="--format", choices=FORMATS)
    # a Hugging Face id as the model: its revision (branch, tag or commit; None: main), part of what is converted,
    # and the hub cache to read it from (None: HF_HUB_CACHE), where this run looks: see vllm_haq.format.hub
    revision: str | None = _option(None, key="revision", flag="--revision", note="null: main (Hugging Face ids)")
    cache_dir: str | None = _option(None, key=None, flag="--cache-dir")
    # where the layers are computed (offline.device): "auto" (CUDA where available, else cpu), "cpu", "cuda" or
    # "cuda:N". Like cache_dir, how this run proceeds, not what it makes: no recipe key, so a recipe replays on
    # any host (a CUDA run's rounding may differ from the CPU's in the last bits; docs/configuration.md)
    device: str = _option("auto", key=None, flag="--device")

    @property
    def rotation_mode(self) -> str:
        """The rotation carried out: ``rotation``, else ``search`` for haq into a HAQ checkpoint, else ``none``
        (compressed-tensors cannot express a rotated input)."""
        return self.rotation or ("search" if self.method == "haq" and self.format == "haq" else "none")

    def gptq_config(self) -> GPTQConfig:
        return GPTQConfig(block_size=self.gptq_block_size, dampening=self.gptq_dampening, act_order=self.act_order)


def option_default(name: str):
    """``ConvertOptions``' default of field ``name``: ``haq convert``'s argparse takes its defaults from here, so
    that the library and the command line cannot disagree."""
    f = next(f for f in dataclasses.fields(ConvertOptions) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def option_problem(f: dataclasses.Field, value) -> str | None:
    """What is wrong with ``value`` (of the right type) for option field ``f`` — "is not one of [...]", "is below
    1" — or None; the one check behind ``check_options`` (flags) and ``offline.recipe`` (keys)."""
    meta = f.metadata
    if value is None:
        return None
    if meta.get("choices") and value not in meta["choices"]:
        return f"is not one of {list(meta['choices'])}"
    if meta.get("least") is not None and value < meta["least"]:
        return f"is below {meta['least']}"
    if meta.get("most") is not None and value > meta["most"]:
        return f"is above {meta['most']}"
    return None


def check_options(opts: ConvertOptions, model_dir: str | None = None) -> None:
    """Refuse values outside the choices and bounds (the library is called without argparse too), a device this
    host cannot compute on, rotation without haq, what compressed-tensors cannot express and a revision of a local
    directory, before any work."""
    for f in dataclasses.fields(ConvertOptions):
        problem = option_problem(f, getattr(opts, f.name))
        if problem:
            raise ConvertError(f"{f.metadata.get('flag') or f.name} {getattr(opts, f.name)!r} {problem}")
    problem = device_problem(opts.device)
    if problem:
        raise ConvertError(f"--device {opts.device!r} {problem}")
    if opts.revision is not None and model_dir is not None and os.path.isdir(model_dir):
        raise ConvertError(f"--revision {opts.revision}: {model_dir} is a local directory; a revision selects the "
                           "version of a Hugging Face model id (ORG/NAME)")
    if opts.rotation_mode != "none" and opts.method != "haq":
        raise ConvertError(f"--rotation {opts.rotation} needs --method haq (its per-layer search chooses the "
                           f"smoothing that goes with the rotation); --method {opts.method} converts unrotated")
    if opts.format == "compressed-tensors":
        if opts.moe_smoothing == "per-expert":
            raise ConvertError("--format compressed-tensors cannot express --moe-smoothing per-expert (explicit "
                               "per-expert input_smooth); use --moe-smoothing shared, or --format haq")


def haq_target(model: str, out_dir: str, opts: ConvertOptions) -> tuple[str, ConvertOptions]:
    """Where and with which options the HAQ checkpoint is converted: ``out_dir`` itself, or for --format
    compressed-tensors ``OUT_DIR.haq`` (replaced, resumable), exported to ``out_dir`` afterwards — refused at once if
    ``out_dir`` exists without --overwrite, or if ``model`` has layers whose rotation the export would refuse
    (``offline.interop.check_rotation_exportable``), since the conversion would otherwise run for nothing."""
    if opts.format == "haq":
        return out_dir, opts
    check_options(opts)
    out = os.path.abspath(out_dir.rstrip("/"))
    if os.path.exists(out) and not opts.overwrite:
        raise ConvertError(f"{out} already exists; pass --overwrite to replace it")
    if opts.rotation_mode != "none":
        from offline.interop import check_rotation_exportable  # noqa: PLC0415 (interop imports the recipe, plan)

        check_rotation_exportable(resolve_model(model, opts.revision, opts.cache_dir), opts.ignore)
    return out + ".haq", dataclasses.replace(opts, format="haq", rotation=opts.rotation_mode, overwrite=True)


def layer_targets(spec: ModelSpec, i: int, ignore: list[str]) -> list[str]:
    """The linears of decoder layer ``i`` that get quantized, relative to its prefix and in the converter's order:
    ``ModelSpec.linear_modules`` minus ``--ignore``."""
    prefix = spec.layer_prefix(i)
    return [m for m in spec.linear_modules(i) if not is_ignored(prefix + m, ignore)]


def shard_names(num_layers: int) -> list[str]:
    """Output shard file names: shard 1 holds the embeddings, final norm and LM head; shard i + 2 layer i."""
    n = num_layers + 1
    return [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]


@dataclass
class ConversionPlan:
    """What converting ``model_dir`` with ``opts`` will do; made by ``plan_conversion``, which refuses what cannot
    be done."""

    model_dir: str
    out_dir: str  # absolute, no trailing slash
    opts: ConvertOptions
    config: dict  # the source's config.json
    spec: ModelSpec
    source: SafetensorsCheckpoint
    moe_layers: list[int]
    routing_stats: bool  # collect expert routing statistics (MoE models unless --no-routing-stats)
    # the calibration batch is embedded and run through the layers: every method but rtn calibrates, and rtn
    # needs activations for routing statistics
    needs_calibration: bool
    shard_names: list[str]
    # the model as a Hugging Face id: {"repo_id", "revision" (as asked; main by default), "commit"}; None for a
    # local directory (recorded in producer.base_model and the model card)
    hub_source: dict | None = None

    def targets(self, i: int) -> list[str]:
        return layer_targets(self.spec, i, self.opts.ignore)

    def copied_files(self) -> list[str]:
        """The tokenizer and generation files of the source that are copied beside the weights."""
        return [f for f in COPIED_FILES if os.path.exists(os.path.join(self.model_dir, f))]

    def corpus(self) -> list[str]:
        """The calibration sources as recorded in the checkpoint (local files by name, not path; hf:ID[:CONFIG]
        and preset names as given)."""
        return [source_label(c) for c in self.opts.calib]

    def calibration_options(self) -> dict:
        """The --calib-split / --calib-field / --calib-chat-template given (null: the default), for the producer
        block; empty when none is (then the block is what it was before they existed)."""
        o = self.opts
        if o.calib_split is None and o.calib_field is None and not o.calib_chat_template:
            return {}
        return {"calibration_options": {"split": o.calib_split, "field": o.calib_field,
                                        "chat_template": o.calib_chat_template}}

    def producer(self) -> dict:
        """``quantization_config.producer``: the tool and every option that shaped the weights."""
        opts = self.opts
        return {
            "tool": "vllm-haq", "version": __version__, "method": opts.method,
            "calibration": self.corpus(), "samples": opts.samples,
            "seq_len": opts.seq_len, "seed": opts.seed, "alpha": opts.alpha,
            "gptq": {"block_size": opts.gptq_block_size, "dampening": opts.gptq_dampening,
                     "act_order": opts.act_order},
            "rotation": opts.rotation_mode, **self.calibration_options(),
            **({"base_model": self.hub_source} if self.hub_source else {}),
        }

    @property
    def ignore(self) -> list[str]:
        """``quantization_config.ignore``: ``--ignore`` plus what the family always keeps float (DeepSeek's
        kv_b_proj)."""
        return list(self.opts.ignore) + [p for p in self.spec.facts.kept_float if p not in self.opts.ignore]

    def quantization_config(self, records: dict[str, dict]) -> dict:
        """The checkpoint's ``quantization_config``, given each layer's smoothing record (layer -> first consumer of
        each producer -> alpha, null if left unsmoothed; "explicit" blocks; "rotation": module -> block)."""
        method = METHOD_SPECS[self.opts.method]
        qcfg = HAQQuantConfig(
            ignore=self.ignore,
            smoothing={
                "method": "none" if not method.smooth else ("searched" if method.search_alpha else "fixed"),
                "alpha": records, "folded": bool(records),
                "explicit": sorted(b for rec in records.values() for b in rec.get("explicit", [])),
            },
            input_rotation={self.spec.layer_prefix(int(i)) + m: block for i, rec in records.items()
                            for m, block in rec.get("rotation", {}).items()},
            routing_statistics=ROUTING_FILE if self.routing_stats else None,
            producer=self.producer(),
        )
        return qcfg.to_dict()

    def output_config(self, records: dict[str, dict]) -> dict:
        """The checkpoint's config.json: the source's plus its ``quantization_config``."""
        return {**self.config, "quantization_config": self.quantization_config(records)}


def plan_conversion(model: str, out_dir: str, opts: ConvertOptions) -> ConversionPlan:
    """The plan, or the ``ConvertError`` / ``SourceError`` / ``ModelNotFoundError`` a conversion raises before any
    work, in this order: the options, the model (a directory, else a Hugging Face id resolved through the hub
    cache), config.json (readable, not already quantized, a supported family), the safetensors files, an
    existing ``out_dir`` without ``--overwrite``, missing calibration text."""
    check_options(opts, model)
    model_dir = resolve_model(model, opts.revision, opts.cache_dir)
    hub_source = None if model_dir == model else {"repo_id": model, "revision": opts.revision or "main",
                                                  "commit": snapshot_commit(model_dir)}
    config = _read_json(os.path.join(model_dir, "config.json"), "model config")
    if "quantization_config" in config:
        raise ConvertError(
            f"{model_dir}/config.json: the model is already quantized "
            f"({config['quantization_config'].get('quant_method')!r}); convert the original model"
        )
    spec = spec_for(config, os.path.join(model_dir, "config.json"))
    source = SafetensorsCheckpoint(model_dir)
    out_dir = os.path.abspath(out_dir.rstrip("/"))
    if os.path.exists(out_dir) and not opts.overwrite:
        raise ConvertError(f"{out_dir} already exists; pass --overwrite to replace it")
    moe_layers = [i for i in range(spec.num_layers) if spec.is_moe_layer(i)]
    routing_stats = bool(moe_layers) and opts.routing_stats
    needs_calibration = routing_stats or opts.method != "rtn"
    if needs_calibration and not opts.calib:
        why = (f"--method {opts.method}{' (the default)' if opts.method == 'haq' else ''} calibrates on text"
               if opts.method != "rtn" else "this is an MoE model: routing statistics need calibration text")
        raise ConvertError(
            f"{why}. Pass --calib FILE.txt (or a datasets source: hf:ID[:CONFIG], a .parquet/.csv/.json file, "
            f"wikitext2/c4/pile)"
            + (", or --method rtn to round without calibration (dense models)" if opts.method != "rtn"
               else ", or --no-routing-stats")
        )
    return ConversionPlan(model_dir, out_dir, opts, config, spec, source, moe_layers, routing_stats,
                          needs_calibration, shard_names(spec.num_layers), hub_source)


def _read_json(path: str, what: str) -> dict:
    return read_json(path, f"{what} not found", f"{what} is not valid JSON", SourceError)
