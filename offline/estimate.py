"""``haq convert --dry-run``: estimated disk, peak RAM and time of a conversion, without loading a tensor.

Everything comes from the model's ``config.json`` and the safetensors headers (names, dtypes, shapes), and every
decision from the ``ConversionPlan`` that ``offline.convert`` carries out (``offline.plan``: which tensors are
quantized, the shard names, the copied files, whether calibration text is embedded, ``quantization_config``).

* **Disk** is computed, not guessed: int8 weights (1 byte per element) + float32 scales (4 bytes per output
  channel) + every other tensor in its source dtype + explicit per-expert ``input_smooth`` (float32) + the
  routing statistics (int64 counts) + safetensors headers, the index, ``config.json`` and the copied tokenizer
  files. The work directory also holds the calibration activations (float32) between layers.
* **Peak RAM** models what this converter keeps alive, phase by phase (writing the global tensors, embedding
  the calibration text, and per decoder layer: statistics forward, quantization, quantized forward; see
  ``offline/convert.py``, ``offline/haq/``, ``vllm_haq/quant/gptq.py``), and reports the largest:
  the Python process (+ transformers and the tokenizer when calibrating); the layer's source tensors, which
  safetensors maps and which stay resident until the layer is written (layer 0 also keeps the global tensors
  that share its files mapped); its int8 output; the calibration activations (the layer's input, its output
  chunks and their concatenation: 3 x samples x seq_len x hidden x 4 bytes; calibrated MoE layers also keep the
  MoE input rows); one forward chunk's temporaries (the quantized forward accumulates in float64); the
  α-search row samples and each candidate's int8 copy of them; the GPTQ Hessians (every non-expert input's
  Hessian is collected during the forward and alive until its turn; HAQ's α search factorizes a copy of one of
  them at a time; expert Hessians are rebuilt one at a time and factorized in their own memory,
  float64 up to ``FLOAT64_MAX_INPUTS`` inputs, float32 above, + the float32 factor); float32 copies
  of the largest weight group (the per-layer model: ``offline.estimate_ram``). Checked against the measured
  peak RSS (GNU time) of 1-layer Llama-7B-width ``rtn`` (-7%) and ``smoothquant`` (+1%) conversions and a
  2048-wide ``gptq`` layer with a 9000-wide MLP (-4%).
  An estimate: allocator slack and the tokenizer's working memory on a large corpus are approximate.
* **Time** is coarse: measured throughputs of this converter's pieces (below) applied to the parameter count,
  the calibration tokens and the GPTQ problem sizes. Measured on this project's machine (2-core AMD EPYC,
  AVX2, under load from other jobs); a faster host divides it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from vllm_haq.format import WEIGHT_SCALE, read_safetensors_header, shard_files
from vllm_haq.quant.gptq import FLOAT64_MAX_INPUTS

from offline.haq import GPTQ_SHORTLIST, METHODS, SEARCH_ROW_STRIDE, SEARCH_ROWS, input_key
from offline.estimate_ram import layer_memory, nbytes, numel, peak_ram, search_candidates
from offline.models import global_tensor_names
from offline.card import card_bytes
from offline.plan import ConversionPlan, ConvertOptions, haq_target, plan_conversion
from offline.recipe import dump_recipe

# ---- measured constants (2-core AMD EPYC, AVX2, torch 2.13 CPU, loaded host; see the module docstring) ----
PROCESS_BYTES = 230 * 2**20  # RSS of the converter process before any tensor (Python, torch, safetensors)
TOKENIZER_BYTES = 370 * 2**20  # + transformers and the tokenizer, loaded when calibrating
RTN_PARAMS_PER_S = 2.5e7  # round-to-nearest incl. reading and writing: 4096x4096 bf16 weights measured at 2.2e7/s;
#                           a 2-layer Mixtral-8x7B-width RTN conversion took 126 s for 2.9e9 parameters
FORWARD_FLOPS = 4.0e10  # float32 GEMM throughput of the calibration forward (F.linear 2048x4096x4096: 42 GFLOP/s)
# GPTQ's solve of a [rows, n] stack (the idle AVX-512 host; fitted within 2% to 1024-4096 inputs x 512-16384 rows):
GPTQ_S_PER_COLUMN = 4.8e-5  # the Python column loop's fixed cost per input column
GPTQ_S_PER_WEIGHT = 4.8e-8  # its per-element work within a 128-column block
GPTQ_UPDATE_FLOPS = 2.8e11  # the lazy block updates, 2 rows n^2 flops in all (float32 GEMM)
# in-place potrf + potri + potrf, counted as 4/3 n^3 flops (idle host: 54 GFLOP/s float64 at n = 4096, 105 float32
# at n = 8193). Check: a Mixtral-8x7B-width layer (2 jobs sharing the 2 cores): 511 s of GPTQ measured, 550 s estimated
FACTORIZE_FLOPS = {"float64": 5.4e10, "float32": 1.05e11}  # by the Hessian dtype (float64 up to FLOAT64_MAX_INPUTS)
STARTUP_S = 5.0  # interpreter, torch and safetensors imports (a tiny RTN conversion took 4.5-5.4 s in all)
TOKENIZER_S = 12.0  # + transformers and the tokenizer when calibrating (measured 10-19 s on the loaded host)
# what the time estimate rests on, reported with it
TIME_BASIS = ("measured throughputs of this converter on a loaded 2-core AVX2 EPYC "
              f"(rtn {RTN_PARAMS_PER_S:.2g} params/s, forward {FORWARD_FLOPS / 1e9:.0f} GFLOP/s, "
              f"start-up {STARTUP_S:.0f} s + {TOKENIZER_S:.0f} s with calibration) and of GPTQ on the "
              f"idle 2-core AVX-512 EPYC ({GPTQ_S_PER_COLUMN * 1e6:.0f} us per column + "
              f"{GPTQ_S_PER_WEIGHT * 1e9:.0f} ns per weight + block updates at "
              f"{GPTQ_UPDATE_FLOPS / 1e9:.0f} GFLOP/s, factorization at "
              f"{FACTORIZE_FLOPS['float64'] / 1e9:.0f}/{FACTORIZE_FLOPS['float32'] / 1e9:.0f} "
              "GFLOP/s float64/float32); offline/estimate.py")


def source_tensors(model_dir: str) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype, shape) of every weight of a checkpoint, from its headers."""
    return {name: (dtype, shape) for name, (dtype, shape, _) in _source_headers(model_dir).items()}


def _source_headers(model_dir: str) -> dict[str, tuple[str, list[int], str]]:
    """name -> (dtype, shape, file) of every weight of a checkpoint."""
    files = shard_files(model_dir)
    out = {}
    for fname in files:
        for name, info in read_safetensors_header(os.path.join(model_dir, fname)).items():
            out[name] = (info["dtype"], list(info["shape"]), fname)
    return out


def weights_bytes(model_dir: str) -> int:
    """Bytes of a checkpoint's weight files (those its index names, else every ``*.safetensors`` but routing)."""
    files = shard_files(model_dir)
    return sum(os.path.getsize(os.path.join(model_dir, f)) for f in files)


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _header_bytes(entries: dict[str, tuple[str, list[int]]], metadata: dict | None = None) -> int:
    """Size of a safetensors header for these tensors (JSON + 8-byte length, padded to 8 bytes)."""
    header, off = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, (dtype, shape) in entries.items():
        n = nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    n = len(json.dumps(header, separators=(",", ":")))
    return 8 + n + (-n) % 8


def _json_file_bytes(obj) -> int:
    return len(json.dumps(obj, indent=2)) + 1  # vllm_haq.format.write_json_atomic: indent 2 and a newline


def dry_run(model_dir: str, out_dir: str, opts: ConvertOptions) -> dict:
    """What ``convert`` would refuse (raised the same way: both make their ``ConversionPlan`` with
    ``plan_conversion``, of ``OUT_DIR.haq`` for --format compressed-tensors), else the estimate; writes nothing and
    reads no tensor data (config.json and the safetensors headers only)."""
    from offline.corpus import resolve_source

    plan = plan_conversion(model_dir, *haq_target(model_dir, out_dir, opts))
    if plan.needs_calibration:
        for source in opts.calib:  # syntax and local files; a dataset itself is only loaded by the conversion
            resolve_source(source, "calib", opts.calib_split, opts.calib_field)
    return estimate(plan, opts.format, opts)


def estimate(plan: ConversionPlan, fmt: str = "haq", recipe: ConvertOptions | None = None) -> dict:
    """The dry-run estimate of carrying out ``plan`` (see the module doc); ``fmt`` is ``haq convert --format``,
    ``recipe`` the options written as the checkpoint's recipe (default: the plan's)."""
    opts, spec = plan.opts, plan.spec
    headers_ = _source_headers(plan.model_dir)
    src = {name: (dtype, shape) for name, (dtype, shape, _) in headers_.items()}
    tokens = opts.samples * opts.seq_len if plan.needs_calibration else 0
    act_bytes = tokens * int(plan.config["hidden_size"]) * 4  # calibration activations [samples, seq, hidden] f32
    output = _output(plan, src, headers_, act_bytes)
    params = sum(numel(s) for _, s in src.values())
    largest_layer = max((sum(nbytes(*v) for n_, v in src.items() if n_.startswith(spec.layer_prefix(i)))
                         for i in range(spec.num_layers)), default=0)
    time_s, time_parts = _time(plan, src, params, tokens)
    return {
        "estimate": True,
        "model": os.path.abspath(plan.model_dir),
        "family": spec.family,
        "layers": spec.num_layers,
        "experts": spec.num_experts,
        "method": opts.method,
        "format": fmt,
        "calibration_tokens": tokens,
        "parameters": params,
        "quantized_parameters": output.quantized_params,
        "source_weights_bytes": weights_bytes(plan.model_dir),
        "largest_layer_bytes": largest_layer,
        "disk": _disk(plan, output, tokens, act_bytes, fmt, recipe or plan.opts),
        "ram": peak_ram(PROCESS_BYTES + (TOKENIZER_BYTES if plan.needs_calibration else 0), src, output.shards[0],
                        output.layers, act_bytes, plan.opts.calib if plan.needs_calibration else None),
        "time": {"seconds": time_s, "parts": time_parts, "basis": TIME_BASIS},
    }


@dataclass
class _Output:
    """The output tensors, shard by shard (shard 1: everything outside the decoder layers), their bytes by kind,
    and each layer's RAM phases (``offline.estimate_ram``)."""

    shards: list[dict] = field(default_factory=list)
    parts: dict = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    quantized_params: int = 0


def _output(plan: ConversionPlan, src, headers_, act_bytes: int) -> _Output:
    spec = plan.spec
    globals_ = {n: src[n] for n in global_tensor_names(spec, list(src))}
    o = _Output(shards=[globals_], parts={"int8_weights": 0, "scales": 0, "input_smooth": 0,
                                          "unquantized": sum(nbytes(*v) for v in globals_.values())})
    for i in range(spec.num_layers):
        prefix = spec.layer_prefix(i)
        tensors = {n[len(prefix):]: v for n, v in src.items() if n.startswith(prefix)}
        targets = plan.targets(i)
        out = _layer_output(plan, i, tensors, targets, o)
        o.shards.append({prefix + k: v for k, v in out.items()})
        o.layers.append(layer_memory(spec, i, tensors, targets, out, METHODS[plan.opts.method], plan.opts,
                                     act_bytes, int(plan.config["hidden_size"])))
        if i == 0:
            # safetensors maps its files; pages read stay resident while anything from the mapping is alive. The
            # handles opened for the global tensors are reused (and only then let go) by the first layer's load, so
            # global tensors in a file that also holds layer 0 stay mapped while layer 0 is converted.
            files0 = {headers_[prefix + k][2] for k in tensors}
            mapped = sum(nbytes(*src[n]) for n in globals_ if headers_[n][2] in files0)
            for comps in o.layers[0].values():
                comps["global_tensors_mapped"] = mapped
    return o


def _layer_output(plan: ConversionPlan, i: int, tensors, targets, o: _Output) -> dict[str, tuple[str, list[int]]]:
    """Layer ``i``'s output tensors (relative to its prefix); adds their bytes to ``o.parts``."""
    parts = o.parts
    out: dict[str, tuple[str, list[int]]] = {}
    for name, (dtype, shape) in tensors.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in targets:
            out[name] = ("I8", shape)
            out[f"{module}.{WEIGHT_SCALE}"] = ("F32", [shape[0], 1])
            parts["int8_weights"] += numel(shape)
            parts["scales"] += shape[0] * 4
            o.quantized_params += numel(shape)
        else:
            out[name] = (dtype, shape)
            parts["unquantized"] += nbytes(dtype, shape)
    moe = plan.spec.moe_block(i)
    if moe and METHODS[plan.opts.method].smooth and plan.opts.moe_smoothing == "per-expert":
        block, (gate, up, _down) = moe
        for e in range(plan.spec.num_experts):
            for lin in (gate, up):
                m = f"{block}.experts.{e}.{lin}"
                if m in targets and f"{m}.weight" in tensors:
                    out[f"{m}.input_smooth"] = ("F32", [tensors[f"{m}.weight"][1][1]])
                    parts["input_smooth"] += tensors[f"{m}.weight"][1][1] * 4
    return out


def _disk(plan: ConversionPlan, o: _Output, tokens: int, act_bytes: int, fmt: str, recipe: ConvertOptions) -> dict:
    """Output bytes by kind, and the peak while converting (work directory, ``OUT.haq`` before an export)."""
    headers = sum(_header_bytes(s, {"format": "pt"}) for s in o.shards)
    weight_total = sum(sum(nbytes(*v) for v in s.values()) for s in o.shards) + headers
    index = _json_file_bytes({"metadata": {"total_size": weight_total},
                              "weight_map": {t: nm for s, nm in zip(o.shards, plan.shard_names) for t in s}})
    routing = _routing_bytes(plan, tokens)
    copied = sum(os.path.getsize(os.path.join(plan.model_dir, f)) for f in plan.copied_files()) + card_bytes(plan)
    other = (index + _json_file_bytes(plan.output_config(_placeholder_records(plan))) + copied
             + len(dump_recipe(recipe).encode()))
    output = weight_total + routing + other
    work_extra = act_bytes if plan.needs_calibration else 0  # calib_hidden.pt beside the finished layers
    peak_disk = output + work_extra + (output if fmt == "compressed-tensors" else 0)  # OUT.haq, then OUT
    return {"output_bytes": output, "peak_bytes": peak_disk, "int8_weights_bytes": o.parts["int8_weights"],
            "scales_bytes": o.parts["scales"], "unquantized_bytes": o.parts["unquantized"],
            "input_smooth_bytes": o.parts["input_smooth"], "routing_stats_bytes": routing,
            "safetensors_headers_bytes": headers, "other_files_bytes": other,
            "calibration_activations_bytes": work_extra}


def _routing_bytes(plan: ConversionPlan, tokens: int) -> int:
    """The routing statistics file (offline.routing): int64 counts and a header with one metadata key."""
    if not plan.routing_stats:
        return 0
    m, e = len(plan.moe_layers), plan.spec.num_experts
    ent = {"expert_counts": ("I64", [m, e]), "layer_indices": ("I64", [m]),
           "transition_counts": ("I64", [max(m - 1, 0), e, e])}
    info = json.dumps({"corpus": plan.corpus(), "tokens": tokens}, sort_keys=True)
    return sum(nbytes(*v) for v in ent.values()) + _header_bytes(ent, {"haq_routing": info})


def _placeholder_records(plan: ConversionPlan) -> dict[str, dict]:
    """Smoothing records of about the size the conversion writes into config.json (which α each group gets, which
    blocks stay explicit and which inputs are rotated is known only once converted): α 0.5 for the first consumer
    of every smoothing group of a smoothing method."""
    if not METHODS[plan.opts.method].smooth:
        return {}
    return {str(i): {g.consumers[0]: 0.5 for g in plan.spec.smoothing_groups(i)} for i in range(plan.spec.num_layers)}


def _time(plan: ConversionPlan, src, params: int, tokens: int):
    spec, opts, method = plan.spec, plan.opts, METHODS[plan.opts.method]
    parts = {"startup": STARTUP_S + (TOKENIZER_S if tokens else 0), "read_round_write": params / RTN_PARAMS_PER_S}
    # every linear: (parameters, the share of the tokens it computes: top_k / experts for a routed expert,
    # else 1, quantized?)
    linears = []
    for i in range(spec.num_layers):
        prefix, targets = spec.layer_prefix(i), set(plan.targets(i))
        moe = spec.moe_block(i)
        for m in spec.linear_modules(i):
            shape = src.get(f"{prefix}{m}.weight", (None, None))[1]
            if shape:
                share = spec.top_k / max(spec.num_experts, 1) if moe and m.startswith(f"{moe[0]}.experts.") else 1
                linears.append((numel(shape), share, m in targets))
    if tokens:
        per_token = sum(n * share for n, share, _ in linears)
        passes = 1 if opts.method == "rtn" else 2  # statistics forward (float) + quantized forward
        parts["calibration_forward"] = passes * 2 * per_token * tokens / FORWARD_FLOPS
    if method.search_alpha:  # per candidate (none + the grid [+ rotated]) and consumer: round the weight, one
        # [rows, in] x [in, out] product on the kept search rows (a routed expert: the rows routed to it)
        rows = min(SEARCH_ROWS, math.ceil(tokens / SEARCH_ROW_STRIDE))
        work = sum(n * (1 / RTN_PARAMS_PER_S + 2 * rows * share / FORWARD_FLOPS) for n, share, q in linears if q)
        parts["alpha_search"] = search_candidates(opts) * work
    if method.gptq:
        seconds, scoring = _gptq_time(plan, src)
        parts["gptq"] = seconds
        if scoring:
            parts["alpha_search_gptq"] = scoring
    total = sum(parts.values())
    return total, parts


def _gptq_time(plan: ConversionPlan, src) -> tuple[float, float]:
    """GPTQ's seconds, and haq's scoring of the α shortlist with it: one solve per distinct input (the linears
    that read it are stacked)."""
    spec, search_alpha = plan.spec, METHODS[plan.opts.method].search_alpha
    seconds, scoring = 0.0, 0.0
    for i in range(spec.num_layers):
        prefix = spec.layer_prefix(i)
        stacks: dict[str, list[int]] = {}  # input -> [rows, inputs]
        for m in plan.targets(i):
            shape = src.get(f"{prefix}{m}.weight", (None, None))[1]
            if shape:
                stacks.setdefault(input_key(m), [0, shape[1]])[0] += shape[0]
        moe = spec.moe_block(i)
        for key, (rows, n) in stacks.items():
            solve = (n * GPTQ_S_PER_COLUMN + rows * n * GPTQ_S_PER_WEIGHT + 2 * rows * n * n / GPTQ_UPDATE_FLOPS
                     + 4 / 3 * n ** 3 / FACTORIZE_FLOPS["float64" if n <= FLOAT64_MAX_INPUTS else "float32"])
            seconds += solve
            if search_alpha and not (moe and key.startswith(f"{moe[0]}.experts.")):
                scoring += (1 + GPTQ_SHORTLIST) * solve  # non-expert inputs: the α shortlist scored with GPTQ
    return seconds, scoring



def _gb(n: float) -> str:
    if n >= 1e8:
        return f"{n / 1e9:.3g} GB ({n / 2**30:.3g} GiB)"
    return f"{n / 1e6:.3g} MB" if n >= 1e6 else f"{n / 1e3:.3g} kB"


def _count(n: float) -> str:
    return next((f"{n / d:.3g}{u}" for d, u in ((1e9, "B"), (1e6, "M"), (1e3, "k")) if n >= d), f"{n:.0f}")


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def format_estimate(e: dict) -> str:
    """The human-readable dry-run report."""
    d, r, t = e["disk"], e["ram"], e["time"]
    calib = f", {e['calibration_tokens']} calibration tokens" if e["calibration_tokens"] else ""
    lines = [
        f"haq convert --dry-run (estimates; nothing was written): {e['model']}",
        f"  model      {e['family']}, {e['layers']} layers" + (f", {e['experts']} experts" if e["experts"] else "")
        + f", {_count(e['parameters'])} parameters ({_count(e['quantized_parameters'])} quantized), "
        f"weights {_gb(e['source_weights_bytes'])}; largest decoder layer {_gb(e['largest_layer_bytes'])}",
        f"  method     {e['method']}, format {e['format']}{calib}",
        f"  disk       output {_gb(d['output_bytes'])}: int8 weights {_gb(d['int8_weights_bytes'])}, float32 scales "
        f"{_gb(d['scales_bytes'])}, unquantized tensors {_gb(d['unquantized_bytes'])}"
        + (f", input_smooth {_gb(d['input_smooth_bytes'])}" if d["input_smooth_bytes"] else "")
        + (f", routing statistics {_gb(d['routing_stats_bytes'])}" if d["routing_stats_bytes"] else "")
        + f", headers/index/config/tokenizer {_gb(d['safetensors_headers_bytes'] + d['other_files_bytes'])}",
        f"             at most {_gb(d['peak_bytes'])} while converting (work directory"
        + (" + calibration activations" if d["calibration_activations_bytes"] else "")
        + (" + OUT.haq before the export" if e["format"] == "compressed-tensors" else "") + ")",
        f"  peak RAM   ~{_gb(r['peak_bytes'])} (estimate, in {r['phase']}): "
        + ", ".join(f"{k.replace('_', ' ')} {_gb(v)}" for k, v in r["components"].items() if v),
        f"  time       ~{_duration(t['seconds'])} (coarse: "
        + ", ".join(f"{k.replace('_', ' ')} {_duration(v)}" for k, v in t["parts"].items() if v >= 0.5)
        + f"; {t['basis']})",
    ]
    return "\n".join(lines) + "\n"

