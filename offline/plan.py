"""The plan of one conversion: every decision ``haq convert`` makes before it loads a tensor, made once.

``offline.convert`` carries a plan out and ``offline.estimate`` (``--dry-run``) sizes it. Both used to decide
for themselves which files are copied, how the shards are named, whether calibration text is needed and what
``quantization_config`` holds, and the estimate's copy had drifted (its ``producer`` block lacked
``rotation``); now both read it from a ``ConversionPlan``. A plan comes from the model's ``config.json``, the
safetensors files (opened, no tensor data read) and the ``ConvertOptions``.

This module is also the one source of the converter's defaults and choices: ``ConvertOptions``' field
defaults (its GPTQ ones are ``GPTQConfig``'s) and the tables ``METHODS``, ``MOE_SMOOTHING``, ``ROTATION_MODES``
and ``FORMATS``, from which ``haq convert``'s argparse takes its own (``offline.cli``).
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


@dataclass
class ConvertOptions:
    """The options of one conversion (``haq convert``'s flags). Its field defaults are the command line's too:
    offline.cli takes them from here (``option_default``) rather than repeating them."""

    method: str = "haq"  # the product's method; "rtn" converts without calibration text (dense models)
    calib: list[str] = field(default_factory=list)
    # datasets sources (offline.corpus): split and field read (None: the preset's / train, and the first of
    # text/messages/conversations), and whether conversations go through the tokenizer's chat template
    calib_split: str | None = None
    calib_field: str | None = None
    calib_chat_template: bool = False
    samples: int = 64  # calibration windows (why 64: the README's --samples row)
    seq_len: int = 512
    seed: int = 0
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))
    routing_stats: bool = True
    resume: bool = False
    overwrite: bool = False
    alpha: float = 0.5  # smoothing strength of --method smoothquant (haq searches it per layer)
    moe_smoothing: str = "shared"  # or "per-expert": explicit input_smooth per expert (see offline.haq)
    # block-Hadamard rotation of dense layers' inputs (format v2, see vllm_haq.quant.rotation): "search" (haq's
    # default), "all" or "none" (every other method); see offline.haq.ROTATION_MODES
    rotation: str | None = None

    @property
    def rotation_mode(self) -> str:
        return self.rotation or ("search" if self.method == "haq" else "none")
    gptq_block_size: int = _GPTQ.block_size
    gptq_dampening: float = _GPTQ.dampening
    act_order: bool = _GPTQ.act_order
    chunk: int = 8  # calibration samples per forward chunk (bounds attention memory)
    # a Hugging Face id as the model: its revision (branch, tag or commit; None: main) and the hub cache to use
    # (None: HF_HUB_CACHE); see vllm_haq.format.hub
    revision: str | None = None
    cache_dir: str | None = None

    def gptq_config(self) -> GPTQConfig:
        return GPTQConfig(block_size=self.gptq_block_size, dampening=self.gptq_dampening, act_order=self.act_order)


def option_default(name: str):
    """``ConvertOptions``' default of field ``name``: ``haq convert``'s argparse takes its defaults from here, so
    that the library and the command line cannot disagree."""
    f = next(f for f in dataclasses.fields(ConvertOptions) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def check_options(opts: ConvertOptions, model_dir: str | None = None) -> None:
    """Refuse choices outside the tables (the library is called without argparse too), rotation without haq and
    a revision of a local directory."""
    if opts.method not in METHODS:
        raise ConvertError(f"--method {opts.method!r} is not available; choose from {list(METHODS)}")
    if opts.moe_smoothing not in MOE_SMOOTHING:
        raise ConvertError(f"--moe-smoothing {opts.moe_smoothing!r} is not one of {list(MOE_SMOOTHING)}")
    if opts.rotation_mode not in ROTATION_MODES:
        raise ConvertError(f"--rotation {opts.rotation!r} is not one of {list(ROTATION_MODES)}")
    if opts.revision is not None and model_dir is not None and os.path.isdir(model_dir):
        raise ConvertError(f"--revision {opts.revision}: {model_dir} is a local directory; a revision selects the "
                           "version of a Hugging Face model id (ORG/NAME)")
    if opts.rotation_mode != "none" and opts.method != "haq":
        raise ConvertError(f"--rotation {opts.rotation} needs --method haq (its per-layer search chooses the "
                           f"smoothing that goes with the rotation); --method {opts.method} converts unrotated")


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

    def quantization_config(self, records: dict[str, dict]) -> dict:
        """The checkpoint's ``quantization_config``, given each layer's smoothing record (layer -> first consumer of
        each producer -> alpha, null if left unsmoothed; "explicit" blocks; "rotation": module -> block)."""
        method = METHOD_SPECS[self.opts.method]
        qcfg = HAQQuantConfig(
            ignore=list(self.opts.ignore),
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
