"""``haq convert``: layer-by-layer conversion of a Hugging Face checkpoint to HAQ int8.

Memory stays bounded by one decoder layer plus the calibration activations:
the calibration batch is embedded once, then each decoder layer is loaded
from the safetensors, quantized, run (quantized, so the next layer calibrates
on what the served model will really see), written as its own shard and freed.

Crash safety: all work happens in ``OUT_DIR.partial``; after every layer the
shard, the calibration activations and the routing statistics are written
atomically and ``progress.json`` records the layer as done. ``--resume``
continues from there. ``OUT_DIR`` appears (by one rename) only when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field

import torch

from vllm_haq import __version__
from vllm_haq.format import (
    DEFAULT_IGNORE,
    ROUTING_FILE,
    ROUTING_METADATA_KEY,
    SAFETENSORS_INDEX,
    WEIGHT_SCALE,
    HAQQuantConfig,
    is_ignored,
)
from vllm_haq.quant import quantize_weight_per_channel

from offline.calib import CalibrationError, calibration_batch, load_documents, tokenize_documents
from offline.models import LayerTensors, ModelSpec, global_tensor_names, spec_for
from offline.routing import RoutingStats
from offline.source import SafetensorsCheckpoint, SourceError

log = logging.getLogger("haq.convert")

METHODS = ("rtn",)
COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja", "added_tokens.json",
)
PROGRESS = "progress.json"
HIDDEN = "calib_hidden.pt"
ROUTING_PARTIAL = "routing_partial.pt"


class ConvertError(RuntimeError):
    """Conversion cannot proceed; the message says why and what to do."""


@dataclass
class ConvertOptions:
    method: str = "rtn"
    calib: list[str] = field(default_factory=list)
    samples: int = 32
    seq_len: int = 512
    seed: int = 0
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))
    routing_stats: bool = True
    resume: bool = False
    overwrite: bool = False
    chunk: int = 8  # calibration samples per forward chunk (bounds attention memory)


@dataclass
class LayerReport:
    index: int
    seconds: float
    quantized: int
    max_rel_error: float  # largest per-module relative weight reconstruction error


def convert(model_dir: str, out_dir: str, opts: ConvertOptions, progress=None) -> list[LayerReport]:
    """Convert ``model_dir`` into a HAQ checkpoint at ``out_dir``; returns per-layer reports."""
    if opts.method not in METHODS:
        raise ConvertError(f"--method {opts.method!r} is not available; choose from {list(METHODS)}")
    config = _read_json(os.path.join(model_dir, "config.json"), "model config")
    if "quantization_config" in config:
        raise ConvertError(f"{model_dir}/config.json: the model is already quantized "
                           f"({config['quantization_config'].get('quant_method')!r}); convert the original model")
    spec = spec_for(config, os.path.join(model_dir, "config.json"))
    src = SafetensorsCheckpoint(model_dir)
    out_dir = os.path.abspath(out_dir.rstrip("/"))
    if os.path.exists(out_dir):
        if not opts.overwrite:
            raise ConvertError(f"{out_dir} already exists; pass --overwrite to replace it")
    work = out_dir + ".partial"
    fingerprint = _fingerprint(model_dir, opts)

    moe_layers = [i for i in range(spec.num_layers) if spec.is_moe_layer(i)]
    want_stats = bool(moe_layers) and opts.routing_stats
    need_calib = want_stats  # RTN needs activations only for routing statistics
    if need_calib and not opts.calib:
        raise ConvertError(
            "this is an MoE model: routing statistics need calibration text. Pass --calib FILE.txt "
            "(or wikitext2/c4/pile with network access), or --no-routing-stats"
        )

    done = _prepare_workdir(work, fingerprint, opts)
    reports: list[LayerReport] = []
    try:
        _convert_layers(model_dir, work, out_dir, config, spec, src, opts, done, fingerprint, moe_layers,
                        want_stats, need_calib, progress, reports)
    except BaseException:
        if done == 0:
            _discard_if_empty(work)
        raise
    return reports


def _discard_if_empty(work: str) -> None:
    """Remove a work directory in which no layer was committed: there is nothing to resume."""
    try:
        with open(os.path.join(work, PROGRESS)) as f:
            if json.load(f).get("done_layers", 0) == 0:
                shutil.rmtree(work, ignore_errors=True)
    except (OSError, ValueError):
        pass


def _convert_layers(model_dir, work, out_dir, config, spec, src, opts, done, fingerprint, moe_layers,
                    want_stats, need_calib, progress, reports) -> None:
    n_shards = spec.num_layers + 1
    shard_name = [f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors" for k in range(n_shards)]
    stats = RoutingStats(moe_layers, spec.num_experts) if want_stats else None

    names = src.names()
    globals_ = {n: src.get(n) for n in global_tensor_names(spec, names)}
    hidden = None
    if need_calib:
        if done > 0:
            hidden = torch.load(os.path.join(work, HIDDEN), weights_only=True)
            if stats is not None:
                st = torch.load(os.path.join(work, ROUTING_PARTIAL), weights_only=True)
                stats.load_state_dict(st, int(st.pop("_tokens").item()))
        else:
            ids = _calibration_ids(model_dir, opts)
            hidden = spec.embed(globals_, ids)
    if done == 0:
        _save_atomic(globals_, os.path.join(work, shard_name[0]))
    del globals_

    for i in range(done, spec.num_layers):
        t0 = time.time()
        prefix = spec.layer_prefix(i)
        tensors = src.load_prefix(prefix)
        if not tensors:
            raise SourceError(f"{model_dir}: no tensors for decoder layer {i} ({prefix}*)")
        qtensors, n_q, err = quantize_layer(spec, i, prefix, tensors, opts)
        if hidden is not None:
            hidden = _run_layer(spec, i, LayerTensors(qtensors), hidden, stats, opts.chunk)
        _save_atomic({prefix + k: v for k, v in qtensors.items()}, os.path.join(work, shard_name[i + 1]))
        if hidden is not None:
            torch.save(hidden, os.path.join(work, HIDDEN + ".tmp"))
            os.replace(os.path.join(work, HIDDEN + ".tmp"), os.path.join(work, HIDDEN))
        if stats is not None:
            st = stats.state_dict()
            st["_tokens"] = torch.tensor(stats.tokens)
            torch.save(st, os.path.join(work, ROUTING_PARTIAL + ".tmp"))
            os.replace(os.path.join(work, ROUTING_PARTIAL + ".tmp"), os.path.join(work, ROUTING_PARTIAL))
        _write_json(os.path.join(work, PROGRESS), {"fingerprint": fingerprint, "done_layers": i + 1})
        rep = LayerReport(i, time.time() - t0, n_q, err)
        reports.append(rep)
        if progress is not None:
            progress(rep, spec.num_layers)
        del tensors, qtensors

    _finish(model_dir, work, out_dir, config, spec, shard_name, stats, opts)


def quantize_layer(spec: ModelSpec, i: int, prefix: str, tensors: dict[str, torch.Tensor], opts: ConvertOptions):
    """Replace every quantization target of layer ``i`` by int8 weight + per-channel scale."""
    out = dict(tensors)
    n, worst = 0, 0.0
    for module in spec.linear_modules(i):
        full = prefix + module
        if is_ignored(full, opts.ignore):
            continue
        wname = f"{module}.weight"
        if wname not in tensors:
            raise SourceError(f"tensor {full}.weight is missing from the checkpoint")
        w = tensors[wname]
        if not torch.isfinite(w).all():
            raise SourceError(f"tensor {full}.weight has non-finite values (NaN/inf); the source model is damaged")
        q, scale = quantize_weight_per_channel(w)
        rel = ((q.float() * scale - w.float()).norm() / w.float().norm().clamp(min=1e-12)).item()
        worst = max(worst, rel)
        out[wname] = q
        out[f"{module}.{WEIGHT_SCALE}"] = scale
        n += 1
    return out, n, worst


def _run_layer(spec: ModelSpec, i: int, lt: LayerTensors, hidden: torch.Tensor, stats, chunk: int) -> torch.Tensor:
    routes: list[torch.Tensor] = []
    sink = (lambda _i, ids: routes.append(ids)) if stats is not None and spec.is_moe_layer(i) else None
    outs = []
    with torch.no_grad():
        for s in range(0, hidden.shape[0], chunk):
            outs.append(spec.layer_forward(i, lt, hidden[s : s + chunk], sink))
    if sink is not None:
        stats.record(i, torch.cat(routes))
    return torch.cat(outs)


def _calibration_ids(model_dir: str, opts: ConvertOptions) -> torch.Tensor:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:
        raise ConvertError(f"{model_dir}: cannot load the tokenizer needed for calibration text ({exc})") from exc
    docs = []
    for source in opts.calib:
        docs += load_documents(source, "calib")
    tokens = tokenize_documents(tok, docs)
    return calibration_batch(tokens, opts.samples, opts.seq_len, opts.seed, ", ".join(opts.calib))


def _finish(model_dir, work, out_dir, config, spec, shard_name, stats, opts) -> None:
    weight_map, total = {}, 0
    from safetensors import safe_open

    for name in shard_name:
        path = os.path.join(work, name)
        total += os.path.getsize(path)
        with safe_open(path, framework="pt") as f:
            for t in f.keys():
                weight_map[t] = name
    _write_json(os.path.join(work, SAFETENSORS_INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
    if stats is not None:
        from safetensors.torch import save_file

        info = {"tokens": stats.tokens, "corpus": [os.path.basename(c) for c in opts.calib]}
        # One metadata key: safetensors writes several in hash order, which would make files differ run to run.
        save_file(stats.export(), os.path.join(work, ROUTING_FILE),
                  metadata={ROUTING_METADATA_KEY: json.dumps(info, sort_keys=True)})
    qcfg = HAQQuantConfig(
        ignore=list(opts.ignore),
        smoothing={"method": "none", "folded": [], "explicit": []},
        routing_statistics=ROUTING_FILE if stats is not None else None,
        producer={
            "tool": "vllm-haq", "version": __version__, "method": opts.method,
            "calibration": [os.path.basename(c) for c in opts.calib], "samples": opts.samples,
            "seq_len": opts.seq_len, "seed": opts.seed,
        },
    )
    new_config = dict(config)
    new_config["quantization_config"] = qcfg.to_dict()
    _write_json(os.path.join(work, "config.json"), new_config)
    for fname in COPIED_FILES:
        if os.path.exists(os.path.join(model_dir, fname)):
            shutil.copy2(os.path.join(model_dir, fname), os.path.join(work, fname))
    for fname in (PROGRESS, HIDDEN, ROUTING_PARTIAL):
        if os.path.exists(os.path.join(work, fname)):
            os.remove(os.path.join(work, fname))
    if os.path.exists(out_dir):  # --overwrite: replace only now that the new one is complete
        shutil.rmtree(out_dir)
    os.replace(work, out_dir)


def _prepare_workdir(work: str, fingerprint: str, opts: ConvertOptions) -> int:
    """Create or reopen ``work``; return the number of layers already done."""
    progress_file = os.path.join(work, PROGRESS)
    if os.path.exists(work):
        if not opts.resume:
            raise ConvertError(
                f"{work} holds an interrupted conversion; pass --resume to continue it, or delete it to start over"
            )
        if not os.path.exists(progress_file):
            shutil.rmtree(work)
        else:
            prog = _read_json(progress_file, "conversion progress")
            if prog.get("fingerprint") != fingerprint:
                raise ConvertError(
                    f"{work} was started with a different model or options; delete it or rerun with the same options"
                )
            return int(prog["done_layers"])
    os.makedirs(work)
    _write_json(progress_file, {"fingerprint": fingerprint, "done_layers": 0})
    return 0


def _fingerprint(model_dir: str, opts: ConvertOptions) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        st = os.stat(os.path.join(model_dir, name))
        h.update(f"{name}:{st.st_size}:{int(st.st_mtime)}".encode())
    d = asdict(opts)
    for k in ("resume", "overwrite"):
        d.pop(k)
    h.update(json.dumps(d, sort_keys=True).encode())
    h.update(__version__.encode())
    return h.hexdigest()


def _save_atomic(tensors: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise SourceError(f"{path}: {what} not found") from None
    except ValueError as exc:
        raise SourceError(f"{path}: {what} is not valid JSON ({exc})") from exc


__all__ = ["convert", "ConvertOptions", "ConvertError", "CalibrationError", "METHODS"]
