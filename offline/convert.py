"""``haq convert``: layer-by-layer conversion of a Hugging Face checkpoint to HAQ int8.

Memory stays bounded by one decoder layer plus the calibration activations: the calibration batch is embedded once,
then each decoder layer is loaded from the safetensors, (for calibrated methods) run in float to collect input
statistics, smoothed and quantized (offline.haq), run quantized — so the next layer calibrates on what the served model
will really see — written as its own shard and freed. ``--device cuda`` computes each layer on the GPU (its weights and
the calibration activations copied there for the layer, the results copied back before being written; offline.device).

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
from dataclasses import asdict, dataclass

import torch

from vllm_haq import __version__
from vllm_haq.kernels.cpu_int8 import native_quantize_input
from vllm_haq.format import ROUTING_FILE, ROUTING_METADATA_KEY, SAFETENSORS_INDEX, WEIGHT_SCALE, write_json_atomic
from vllm_haq.quant import quantize_weight_per_channel, relative_weight_error

from offline.haq import METHODS as METHOD_SPECS, MIN_EXPERT_TOKENS, LayerOptions, WorkingTensors, quantize_calibrated
from offline.haq.progress import NO_PROGRESS, LayerProgress, calibrated_units
from offline.card import write_card_files
from offline.commit import CommitWriter, torch_save_atomic
from offline.corpus import CalibrationError, calibration_batch, load_documents, tokenize_documents
from offline.device import resolve_device, to_device, to_host
from offline.models import LayerTensors, ModelSpec, global_tensor_names
from offline.plan import (METHODS, ConversionPlan, ConvertError, ConvertOptions, _read_json, haq_target,
                          layer_targets, plan_conversion)
from offline.recipe import RECIPE_FILE, write_recipe
from offline.routing import RoutingStats
from offline.source import SourceError
from offline.threads import quiet_openblas_waits

log = logging.getLogger("haq.convert")

PROGRESS = "progress.json"
HIDDEN = "calib_hidden.pt"
ROUTING_PARTIAL = "routing_partial.pt"


@dataclass
class LayerReport:
    index: int
    seconds: float
    quantized: int
    max_rel_error: float  # largest per-module relative weight reconstruction error


class ConvertEvents:
    """Optional progress callbacks of a conversion (``haq convert`` draws progress bars with them); no-ops here."""

    def calibration(self, step: str, done: int, total: int) -> None:
        """Calibration set-up: ``step`` starts now, ``done`` of ``total`` steps (each source read, tokenizing,
        embedding) are finished (``step`` is "done" when ``done == total``)."""

    def layers(self, done: int, total: int) -> None:
        """The layer loop starts; ``done`` layers are already converted (``--resume``)."""

    def unit_done(self, layer: int, done: int, total: int, what: str) -> None:
        """Inside layer ``layer`` (0-based), ``done`` of its ``total`` units are finished; ``what`` is the step and
        the linears of the unit just done ("statistics samples 1-8", "search self_attn.q_proj+k_proj+v_proj",
        "GPTQ block_sparse_moe.experts.3.w2", "rounding ...", "forward samples 1-8"). A layer's first call has
        ``done`` 0 ("loading"): it starts. Not overriding this method keeps the conversion from counting at all."""


def convert(model_dir: str, out_dir: str, opts: ConvertOptions, progress=None,
            events: ConvertEvents | None = None) -> list[LayerReport]:
    """Convert ``model_dir`` into a checkpoint at ``out_dir`` in ``opts.format``; returns per-layer reports.

    ``progress(report, num_layers)`` is called after each layer is committed; ``events`` gets the other steps.
    The checkpoint holds the recipe of ``opts`` (``offline.recipe.RECIPE_FILE``), written with the rest before
    ``out_dir`` appears. --format compressed-tensors converts into ``OUT_DIR.haq`` (``plan.haq_target``; resumable:
    with ``resume`` a finished one is reused, as after a crash during the export), exports it and removes it.
    """
    quiet_openblas_waits()  # before transformers imports scipy (offline.threads)
    haq_dir, haq_opts = haq_target(model_dir, out_dir, opts)
    reports = []
    if opts.format == "haq" or not (opts.resume and os.path.isdir(haq_dir)):
        conv = _Conversion(plan_conversion(model_dir, haq_dir, haq_opts), opts)
        if events is not None:
            conv.events = events
        reports = conv.run(progress)
    if opts.format != "haq":
        from offline.interop import export_compressed_tensors

        export_compressed_tensors(haq_dir, out_dir, overwrite=opts.overwrite, keep_recipe=True)
        shutil.rmtree(haq_dir)
    return reports


class _Conversion:
    """State of carrying out one ``ConversionPlan``: work directory, calibration activations, routing statistics,
    the smoothing records of the layers done. What to do comes from the plan (shared with ``--dry-run``)."""

    events = ConvertEvents()

    def __init__(self, plan: ConversionPlan, recipe: ConvertOptions):
        self.plan, self.opts, self.model_dir = plan, plan.opts, plan.model_dir
        self.recipe = recipe  # the options asked for (plan.opts for --format haq), written as the recipe
        self.config, self.spec, self.src = plan.config, plan.spec, plan.source
        self.out_dir, self.work = plan.out_dir, plan.out_dir + ".partial"
        self.needs_calibration, self.shard_names = plan.needs_calibration, plan.shard_names
        self.fingerprint = _fingerprint(plan.model_dir, plan.opts)
        self.stats = RoutingStats(plan.moe_layers, self.spec.num_experts) if plan.routing_stats else None
        self.smoothing: dict[str, dict] = {}  # layer -> smoothing record (see ConversionPlan.quantization_config)
        self.device = resolve_device(plan.opts.device)  # checked by plan_conversion: where each layer is computed

    def run(self, progress) -> list[LayerReport]:
        try:
            done = _prepare_workdir(self.work, self.fingerprint, self.opts)
        except OSError as exc:
            raise ConvertError(f"{self.work}: cannot create the work directory ({exc.strerror or exc}); "
                               "check that the output's parent exists and is writable") from exc
        self._writer = CommitWriter()
        try:
            hidden = self._start(done)
            self.events.layers(done, self.spec.num_layers)
            reports = []
            for i in range(done, self.spec.num_layers):
                t0 = time.time()
                hidden, n_quantized, err = self._convert_layer(i, hidden)
                self._commit(i, hidden)
                reports.append(LayerReport(i, time.time() - t0, n_quantized, err))
                if progress is not None:
                    progress(reports[-1], self.spec.num_layers)
            self._writer.close()
            self._finish()
            return reports
        except OSError as exc:  # disk full, read-only file system, ...: the committed layers stay resumable
            self._writer.close(quiet=True)
            if done == 0:
                _discard_if_empty(self.work)
            kept = (f"the finished layers are kept in {self.work}; fix it and rerun with --resume"
                    if os.path.isdir(self.work) else "nothing was kept")
            raise ConvertError(f"{getattr(exc, 'filename', None) or self.work}: write failed "
                               f"({exc.strerror or exc}); {kept}") from exc
        except BaseException:
            self._writer.close(quiet=True)
            if done == 0:
                _discard_if_empty(self.work)
            raise

    def _path(self, name: str) -> str:
        return os.path.join(self.work, name)

    def _start(self, done: int) -> torch.Tensor | None:
        """Write the non-layer shard (fresh start) and return the calibration activations, if needed."""
        if done > 0:
            self.smoothing = _read_json(self._path(PROGRESS), "conversion progress").get("smoothing", {})
            if not self.needs_calibration:
                return None
            if self.stats is not None:
                state = torch.load(self._path(ROUTING_PARTIAL), weights_only=True)
                self.stats.load_state_dict(state, int(state.pop("_tokens").item()))
            return torch.load(self._path(HIDDEN), weights_only=True)
        globals_ = {n: self.src.get(n) for n in global_tensor_names(self.spec, self.src.names())}
        hidden = None
        if self.needs_calibration:
            ids = _calibration_ids(self.model_dir, self.opts, self.events)
            hidden = self.spec.embed(globals_, ids)
            self.events.calibration("done", len(self.opts.calib) + 2, len(self.opts.calib) + 2)
        _save_atomic(globals_, self._path(self.shard_names[0]))
        return hidden

    def _convert_layer(self, i: int, hidden: torch.Tensor | None):
        """Convert layer ``i`` on ``self.device`` (its weights and ``hidden`` copied there, see offline.device);
        returns the host's next calibration activations, the number of linears quantized and the worst error."""
        prefix = self.spec.layer_prefix(i)
        progress = self._layer_progress(i, hidden)
        progress.start("loading")
        tensors = to_device(self.src.load_prefix(prefix), self.device)
        if not tensors:
            raise SourceError(f"{self.model_dir}: no tensors for decoder layer {i} ({prefix}*)")
        x = None if hidden is None else hidden.to(self.device)  # on the CPU: the same tensor
        qtensors, n_quantized, err, record = quantize_layer(self.spec, i, prefix, tensors, self.opts, x, progress)
        if record:
            self.smoothing[str(i)] = record
        hidden = None
        if x is not None:
            lt = LayerTensors(qtensors, rotations=record.get("rotation"), quantize=native_quantize_input)
            hidden = _run_layer(self.spec, i, lt, x, self.stats, self.opts.chunk, progress).cpu()
        del x
        qtensors = to_host(qtensors)
        _save_atomic({prefix + k: v for k, v in qtensors.items()}, self._path(self.shard_names[i + 1]))
        return hidden, n_quantized, err

    def _layer_progress(self, i: int, hidden: torch.Tensor | None) -> LayerProgress:
        """Layer ``i``'s unit counter, reporting to ``events.unit_done``; the shared no-op one (no total to
        compute) when the events do not override it."""
        unit_done = getattr(type(self.events), "unit_done", ConvertEvents.unit_done)
        if unit_done is ConvertEvents.unit_done:
            return NO_PROGRESS
        targets = layer_targets(self.spec, i, self.opts.ignore)
        if self.opts.method == "rtn":
            total = len(targets)
        else:
            total = calibrated_units(self.spec, i, targets, _layer_options(self.opts), hidden.shape[0])
        if hidden is not None:
            total += -(-hidden.shape[0] // self.opts.chunk)  # the quantized layer's forward chunks
        return LayerProgress(total, lambda done, n, what: self.events.unit_done(i, done, n, what))

    def _commit(self, i: int, hidden: torch.Tensor | None) -> None:
        """Persist what resuming after layer ``i`` needs, then mark the layer done (each write atomic), on the
        commit thread (offline.commit) from snapshots: ``hidden`` is only read from here on, the routing counts
        and the smoothing record are copied (the next layer adds to them)."""
        state = None
        if self.stats is not None:
            state = {k: v.clone() for k, v in self.stats.state_dict().items()}
            state["_tokens"] = torch.tensor(self.stats.tokens)
        progress = {"fingerprint": self.fingerprint, "done_layers": i + 1,
                    "smoothing": json.loads(json.dumps(self.smoothing))}
        self._writer.submit(self._write_commit, hidden, state, progress)

    def _write_commit(self, hidden: torch.Tensor | None, state: dict | None, progress: dict) -> None:
        if hidden is not None:
            torch_save_atomic(hidden, self._path(HIDDEN))
        if state is not None:
            torch_save_atomic(state, self._path(ROUTING_PARTIAL))
        write_json_atomic(self._path(PROGRESS), progress)

    def _finish(self) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        weight_map, total = {}, 0
        for name in self.shard_names:
            total += os.path.getsize(self._path(name))
            with safe_open(self._path(name), framework="pt") as f:
                weight_map.update({t: name for t in f.keys()})
        write_json_atomic(self._path(SAFETENSORS_INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map})
        if self.stats is not None:
            info = {"tokens": self.stats.tokens, "corpus": self.plan.corpus()}
            # One metadata key: safetensors writes several in hash order, which would make files differ run to run.
            save_file(self.stats.export(), self._path(ROUTING_FILE),
                      metadata={ROUTING_METADATA_KEY: json.dumps(info, sort_keys=True)})
        write_json_atomic(self._path("config.json"), self.plan.output_config(self.smoothing))
        write_recipe(self.recipe, self._path(RECIPE_FILE))
        for fname in self.plan.copied_files():
            shutil.copy2(os.path.join(self.model_dir, fname), self._path(fname))
        write_card_files(self.plan, self.work)
        for fname in (PROGRESS, HIDDEN, ROUTING_PARTIAL):
            if os.path.exists(self._path(fname)):
                os.remove(self._path(fname))
        if os.path.exists(self.out_dir):  # --overwrite: replace only now that the new one is complete
            shutil.rmtree(self.out_dir)
        os.replace(self.work, self.out_dir)


def _discard_if_empty(work: str) -> None:
    """Remove a work directory in which no layer was committed: there is nothing to resume."""
    try:
        with open(os.path.join(work, PROGRESS)) as f:
            if json.load(f).get("done_layers", 0) == 0:
                shutil.rmtree(work, ignore_errors=True)
    except (OSError, ValueError):
        pass


def _layer_options(opts: ConvertOptions) -> LayerOptions:
    """The layer-independent options of the calibrated methods (not --method rtn)."""
    return LayerOptions(method=METHOD_SPECS[opts.method], alpha=opts.alpha, gptq=opts.gptq_config(),
                        moe_smoothing=opts.moe_smoothing, chunk=opts.chunk, rotation=opts.rotation_mode)


def quantize_layer(spec: ModelSpec, i: int, prefix: str, tensors: dict[str, torch.Tensor], opts: ConvertOptions,
                   hidden: torch.Tensor | None = None, progress: LayerProgress = NO_PROGRESS):
    """Quantize every target of layer ``i``; returns (tensors, #quantized, worst weight error, smoothing record).
    ``progress`` is told each unit done (a rounded linear for rtn; see ``offline.haq.progress``).

    Calibrated methods first run the float layer on ``hidden`` to collect input statistics. Takes ownership of
    ``tensors``: source weights are dropped from it once quantized (routed experts: once the expert is done).
    """
    targets = layer_targets(spec, i, opts.ignore)
    for module in targets:
        full = prefix + module
        w = tensors.get(f"{module}.weight")
        if w is None:
            raise SourceError(f"tensor {full}.weight is missing from the checkpoint")
        if not torch.isfinite(w).all():
            raise SourceError(f"tensor {full}.weight has non-finite values (NaN/inf); the source model is damaged")
    if opts.method != "rtn":
        # float32 while smoothing and rounding (materialized per tensor); untouched and folded tensors keep their dtype
        result = quantize_calibrated(spec, i, WorkingTensors(tensors), targets, hidden, _layer_options(opts), progress)
        if result.fallbacks:
            log.info("layer %d: %d experts with < %d calibration tokens rounded to nearest", i, len(result.fallbacks),
                     MIN_EXPERT_TOKENS)
        return result.tensors, len(targets), result.worst_error, result.record.to_json(prefix)
    out, worst = dict(tensors), 0.0
    for module in targets:
        w = tensors.pop(f"{module}.weight")
        q, scale = quantize_weight_per_channel(w)
        out[f"{module}.weight"], out[f"{module}.{WEIGHT_SCALE}"] = q, scale
        worst = max(worst, relative_weight_error(w, q, scale))
        progress.unit("rounding", module)
    return out, len(targets), worst, {}


def _run_layer(spec: ModelSpec, i: int, lt: LayerTensors, hidden: torch.Tensor, stats, chunk: int,
               progress: LayerProgress = NO_PROGRESS) -> torch.Tensor:
    routes: list[torch.Tensor] = []
    sink = (lambda _i, ids: routes.append(ids)) if stats is not None and spec.is_moe_layer(i) else None
    outs = []
    with torch.no_grad():
        for s in range(0, hidden.shape[0], chunk):
            outs.append(spec.layer_forward(i, lt, hidden[s : s + chunk], sink))
            progress.unit("forward", f"samples {s + 1}-{min(s + chunk, hidden.shape[0])}")
    if sink is not None:
        stats.record(i, torch.cat(routes).cpu())  # the statistics are counted on the host
    return torch.cat(outs)


def _calibration_ids(model_dir: str, opts: ConvertOptions, events: ConvertEvents = ConvertEvents()) -> torch.Tensor:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:
        raise ConvertError(f"{model_dir}: cannot load the tokenizer needed for calibration text ({exc})") from exc
    docs = []
    render = _chat_renderer(tok, model_dir) if opts.calib_chat_template else None
    steps = len(opts.calib) + 2  # each source, tokenizing, embedding (by the caller)
    for k, source in enumerate(opts.calib):
        events.calibration(f"reading {os.path.basename(source)}", k, steps)
        docs += load_documents(source, "calib", data_split=opts.calib_split, field=opts.calib_field,
                               render_chat=render)
    events.calibration(f"tokenizing {len(docs)} documents", steps - 2, steps)
    tokens = tokenize_documents(tok, docs)
    events.calibration(f"embedding {opts.samples} x {opts.seq_len} of {tokens.numel()} tokens", steps - 1, steps)
    return calibration_batch(tokens, opts.samples, opts.seq_len, opts.seed, ", ".join(opts.calib))


def _chat_renderer(tok, model_dir: str):
    """--calib-chat-template: a conversation -> the text of the tokenizer's own chat template applied to it."""
    if not getattr(tok, "chat_template", None):
        raise CalibrationError(f"--calib-chat-template: the tokenizer of {model_dir} has no chat template "
                               f"(tokenizer_config.json chat_template or chat_template.jinja)")
    return lambda messages: tok.apply_chat_template(messages, tokenize=False)


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
    write_json_atomic(progress_file, {"fingerprint": fingerprint, "done_layers": 0})
    return 0


def _fingerprint(model_dir: str, opts: ConvertOptions) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        st = os.stat(os.path.join(model_dir, name))
        h.update(f"{name}:{st.st_size}:{int(st.st_mtime)}".encode())
    d = asdict(opts)
    for k in ("resume", "overwrite", "format"):  # format: the work directory always holds a HAQ conversion
        d.pop(k)
    d.pop("cache_dir")  # where the hub cache is does not change the model (its snapshot's files are listed above)
    d.pop("device")  # where the layers are computed: a conversion may resume on another device
    for k in ("calib_split", "calib_field", "calib_chat_template", "revision"):  # in only when given: older
        if not d[k]:  # .partial directories resume
            d.pop(k)
    h.update(json.dumps(d, sort_keys=True).encode())
    h.update(__version__.encode())
    return h.hexdigest()


def _save_atomic(tensors: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)


# ConvertOptions, ConvertError and METHODS live in offline.plan (shared with offline.estimate); importable here too
__all__ = ["convert", "ConvertOptions", "ConvertError", "ConvertEvents", "CalibrationError", "METHODS"]
