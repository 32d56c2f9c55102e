"""``haq convert --dry-run``: estimated disk, peak RAM and time of a conversion, without loading a tensor.

Everything comes from the model's ``config.json`` and the safetensors headers (names, dtypes, shapes): which
tensors the converter quantizes is decided exactly as ``offline.convert`` decides it (``ModelSpec.linear_modules``
minus ``--ignore``).

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
  of the largest weight group. Checked against the measured peak RSS (GNU time) of 1-layer Llama-7B-width
  ``rtn`` (-7%) and ``smoothquant`` (+1%) conversions and a 2048-wide ``gptq`` layer with a 9000-wide MLP (-4%).
  An estimate: allocator slack and the tokenizer's working memory on a large corpus are approximate.
* **Time** is coarse: measured throughputs of this converter's pieces (below) applied to the parameter count,
  the calibration tokens and the GPTQ problem sizes. Measured on this project's machine (2-core AMD EPYC,
  AVX2, under load from other jobs); a faster host divides it.
"""

from __future__ import annotations

import json
import math
import os
import struct

from vllm_haq.format import ROUTING_FILE, SAFETENSORS_INDEX, WEIGHT_SCALE, is_ignored
from vllm_haq.quant.gptq import FLOAT64_MAX_INPUTS

from offline.convert import COPIED_FILES
from offline.haq import ALPHA_GRID, GPTQ_SHORTLIST, METHODS, ROTATION_ALPHAS, SEARCH_ROW_STRIDE, SEARCH_ROWS, input_key
from offline.models import ModelSpec, global_tensor_names

DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}

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


def read_safetensors_header(path: str) -> dict[str, dict]:
    """The header of one safetensors file (tensor name -> dtype, shape, data_offsets); reads no tensor data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def source_tensors(model_dir: str) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype, shape) of every weight of a checkpoint, from its headers."""
    return {name: (dtype, shape) for name, (dtype, shape, _) in _source_headers(model_dir).items()}


def _source_headers(model_dir: str) -> dict[str, tuple[str, list[int], str]]:
    """name -> (dtype, shape, file) of every weight of a checkpoint."""
    index = os.path.join(model_dir, SAFETENSORS_INDEX)
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors") and f != ROUTING_FILE)
    out = {}
    for fname in files:
        for name, info in read_safetensors_header(os.path.join(model_dir, fname)).items():
            out[name] = (info["dtype"], list(info["shape"]), fname)
    return out


def weights_bytes(model_dir: str) -> int:
    """Bytes of a checkpoint's weight files (those its index names, else every ``*.safetensors`` but routing)."""
    index = os.path.join(model_dir, SAFETENSORS_INDEX)
    if os.path.exists(index):
        with open(index) as f:
            files = set(json.load(f)["weight_map"].values())
    else:
        files = {f for f in os.listdir(model_dir) if f.endswith(".safetensors") and f != ROUTING_FILE}
    return sum(os.path.getsize(os.path.join(model_dir, f)) for f in files)


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _numel(shape: list[int]) -> int:
    return math.prod(shape) if shape else 1


def _nbytes(dtype: str, shape: list[int]) -> int:
    return _numel(shape) * DTYPE_BYTES.get(dtype, 4)


def _header_bytes(entries: dict[str, tuple[str, list[int]]], metadata: dict | None = None) -> int:
    """Size of a safetensors header for these tensors (JSON + 8-byte length, padded to 8 bytes)."""
    header, off = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, (dtype, shape) in entries.items():
        n = _nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    n = len(json.dumps(header, separators=(",", ":")))
    return 8 + n + (-n) % 8


def _json_file_bytes(obj) -> int:
    return len(json.dumps(obj, indent=2)) + 1  # offline.convert._write_json: indent 2 and a newline


def _hessian_bytes(n: int) -> int:
    return n * n * (8 if n <= FLOAT64_MAX_INPUTS else 4)


def estimate(model_dir: str, spec: ModelSpec, config: dict, opts, fmt: str = "haq", routing_stats: bool | None = None,
             needs_calibration: bool | None = None) -> dict:
    """The dry-run estimate of converting ``model_dir`` with ``ConvertOptions`` ``opts`` (see the module doc)."""
    method = METHODS[opts.method]
    headers_ = _source_headers(model_dir)
    src = {name: (dtype, shape) for name, (dtype, shape, _) in headers_.items()}
    moe_layers = [i for i in range(spec.num_layers) if spec.is_moe_layer(i)]
    if routing_stats is None:
        routing_stats = bool(moe_layers) and opts.routing_stats
    if needs_calibration is None:
        needs_calibration = routing_stats or opts.method != "rtn"
    samples, seq_len = (opts.samples, opts.seq_len) if needs_calibration else (0, 0)
    tokens = samples * seq_len
    hidden_size = int(config["hidden_size"])
    act_bytes = tokens * hidden_size * 4  # calibration activations [samples, seq_len, hidden] float32

    # ---- output tensors, shard by shard (shard 1: everything outside the decoder layers) ----
    globals_ = {n: src[n] for n in global_tensor_names(spec, list(src))}
    shards = [globals_]
    parts = {"int8_weights": 0, "scales": 0, "unquantized": sum(_nbytes(*v) for v in globals_.values()),
             "input_smooth": 0}
    layers = []  # per layer: what the RAM model needs
    params = sum(_numel(s) for _, s in src.values())
    quantized_params = 0
    for i in range(spec.num_layers):
        prefix = spec.layer_prefix(i)
        tensors = {n[len(prefix):]: v for n, v in src.items() if n.startswith(prefix)}
        targets = [m for m in spec.linear_modules(i) if not is_ignored(prefix + m, opts.ignore)]
        moe = spec.moe_block(i)
        out: dict[str, tuple[str, list[int]]] = {}
        for name, (dtype, shape) in tensors.items():
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and module in targets:
                out[name] = ("I8", shape)
                out[f"{module}.{WEIGHT_SCALE}"] = ("F32", [shape[0], 1])
                parts["int8_weights"] += _numel(shape)
                parts["scales"] += shape[0] * 4
                quantized_params += _numel(shape)
            else:
                out[name] = (dtype, shape)
                parts["unquantized"] += _nbytes(dtype, shape)
        if moe and method.smooth and opts.moe_smoothing == "per-expert":
            block, (gate, up, _down) = moe
            for e in range(spec.num_experts):
                for lin in (gate, up):
                    m = f"{block}.experts.{e}.{lin}"
                    if m in targets and f"{m}.weight" in tensors:
                        out[f"{m}.input_smooth"] = ("F32", [tensors[f"{m}.weight"][1][1]])
                        parts["input_smooth"] += tensors[f"{m}.weight"][1][1] * 4
        shards.append({prefix + k: v for k, v in out.items()})
        layers.append(_layer_memory(spec, i, tensors, targets, out, method, opts, act_bytes, hidden_size))
        if i == 0:
            # safetensors maps its files; pages read stay resident while anything from the mapping is alive. The
            # handles opened for the global tensors are reused (and only then let go) by the first layer's load, so
            # global tensors in a file that also holds layer 0 stay mapped while layer 0 is converted.
            files0 = {headers_[prefix + k][2] for k in tensors}
            mapped = sum(_nbytes(*src[n]) for n in globals_ if headers_[n][2] in files0)
            for comps in layers[0].values():
                comps["global_tensors_mapped"] = mapped

    n = spec.num_layers + 1
    names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    headers = sum(_header_bytes(s, {"format": "pt"}) for s in shards)
    weight_total = sum(sum(_nbytes(*v) for v in s.values()) for s in shards) + headers
    index = _json_file_bytes({"metadata": {"total_size": weight_total},
                              "weight_map": {t: nm for s, nm in zip(shards, names) for t in s}})
    routing = 0
    if routing_stats:
        m, e = len(moe_layers), spec.num_experts
        ent = {"expert_counts": ("I64", [m, e]), "layer_indices": ("I64", [m]),
               "transition_counts": ("I64", [max(m - 1, 0), e, e])}
        info = json.dumps({"corpus": [os.path.basename(c) for c in opts.calib], "tokens": tokens}, sort_keys=True)
        routing = sum(_nbytes(*v) for v in ent.values()) + _header_bytes(ent, {"haq_routing": info})
    copied = sum(os.path.getsize(os.path.join(model_dir, f)) for f in COPIED_FILES
                 if os.path.exists(os.path.join(model_dir, f)))
    config_bytes = _config_bytes(config, spec, opts, method, routing_stats)
    other = index + config_bytes + copied
    output = weight_total + routing + other
    work_extra = act_bytes if needs_calibration else 0  # calib_hidden.pt beside the finished layers
    peak_disk = output + work_extra + (output if fmt == "compressed-tensors" else 0)  # OUT.haq, then OUT

    # ---- peak RAM: the largest phase over the embedding and every decoder layer ----
    process = PROCESS_BYTES + (TOKENIZER_BYTES if needs_calibration else 0)
    embeddings = [n_ for n_ in globals_ if "embed_" in n_]
    phases = [("writing the global tensors", {"process": process,
                                               "global_tensors": sum(_nbytes(*v) for v in globals_.values()),
                                               "calibration_activations": act_bytes})]
    if needs_calibration:
        phases.append(("embedding the calibration text", {
            "process": process, "embeddings": sum(_nbytes(*src[n_]) for n_ in embeddings),
            "float32_embeddings": sum(_numel(src[n_][1]) * 4 for n_ in embeddings),
            "calibration_activations": act_bytes, "calibration_text": _calib_text_bytes(opts.calib)}))
    for i, lm in enumerate(layers):
        for phase, comps in lm.items():
            phases.append((f"layer {i}: {phase}", {"process": process, **comps}))
    peak_phase, peak_comps = max(phases, key=lambda p: sum(p[1].values()))
    by_kind: dict[str, int] = {}  # phase -> its largest total over the layers
    for name, comps in phases:
        kind = name.split(": ", 1)[-1]
        by_kind[kind] = max(by_kind.get(kind, 0), sum(comps.values()))
    peak_ram = sum(peak_comps.values())
    largest_layer = max((sum(_nbytes(*v) for n_, v in src.items() if n_.startswith(spec.layer_prefix(i)))
                         for i in range(spec.num_layers)), default=0)

    time_s, time_parts = _time(spec, src, params, tokens, method, opts)
    return {
        "estimate": True,
        "model": os.path.abspath(model_dir),
        "family": spec.family,
        "layers": spec.num_layers,
        "experts": spec.num_experts,
        "method": opts.method,
        "format": fmt,
        "calibration_tokens": tokens,
        "parameters": params,
        "quantized_parameters": quantized_params,
        "source_weights_bytes": weights_bytes(model_dir),
        "largest_layer_bytes": largest_layer,
        "disk": {"output_bytes": output, "peak_bytes": peak_disk, "int8_weights_bytes": parts["int8_weights"],
                 "scales_bytes": parts["scales"], "unquantized_bytes": parts["unquantized"],
                 "input_smooth_bytes": parts["input_smooth"], "routing_stats_bytes": routing,
                 "safetensors_headers_bytes": headers, "other_files_bytes": other,
                 "calibration_activations_bytes": work_extra},
        "ram": {"peak_bytes": peak_ram, "phase": peak_phase, "components": peak_comps, "phases": by_kind},
        "time": {"seconds": time_s, "parts": time_parts,
                 "basis": "measured throughputs of this converter on a loaded 2-core AVX2 EPYC "
                          f"(rtn {RTN_PARAMS_PER_S:.2g} params/s, forward {FORWARD_FLOPS / 1e9:.0f} GFLOP/s, "
                          f"start-up {STARTUP_S:.0f} s + {TOKENIZER_S:.0f} s with calibration) and of GPTQ on the "
                          f"idle 2-core AVX-512 EPYC ({GPTQ_S_PER_COLUMN * 1e6:.0f} us per column + "
                          f"{GPTQ_S_PER_WEIGHT * 1e9:.0f} ns per weight + block updates at "
                          f"{GPTQ_UPDATE_FLOPS / 1e9:.0f} GFLOP/s, factorization at "
                          f"{FACTORIZE_FLOPS['float64'] / 1e9:.0f}/{FACTORIZE_FLOPS['float32'] / 1e9:.0f} "
                          "GFLOP/s float64/float32); offline/estimate.py"},
    }


def _layer_memory(spec: ModelSpec, i: int, tensors, targets, out, method, opts, act_bytes: int, hidden: int) -> dict:
    """The RAM components of layer ``i``'s phases (bytes), following offline/convert.py and offline/haq/."""
    src_bytes = sum(_nbytes(*v) for v in tensors.values())
    out_bytes = sum(_nbytes(*v) for v in out.values())
    moe = spec.moe_block(i)
    expert_prefix = f"{moe[0]}.experts." if moe else None
    shapes = {m: tensors[f"{m}.weight"][1] for m in targets if f"{m}.weight" in tensors}
    max_numel = max((_numel(s) for s in shapes.values()), default=0)
    max_inter = max((s[0] for s in shapes.values()), default=hidden)
    calibrating = act_bytes > 0
    calibrated = opts.method != "rtn"
    windows_per_chunk = min(opts.chunk, opts.samples) if calibrating else 0
    chunk_act = windows_per_chunk * opts.seq_len * 4
    # one float forward chunk: the float32 weight being applied + a few [chunk, seq, width] float32 intermediates
    forward_tmp = 4 * max_numel + chunk_act * (3 * max_inter + 4 * hidden)
    # one quantized forward chunk (vllm_haq.quant.int8.int8_matmul_reference): a float64 accumulator and two float64
    # temporaries of the widest output, the float32 K-chunk of the weight, the other float32 intermediates
    qforward_tmp = chunk_act * 2 * 3 * max_inter + 4 * 1024 * max_inter + chunk_act * (2 * max_inter + 4 * hidden)

    if not calibrated:
        phases = {"round to nearest": {"layer_source": src_bytes, "layer_int8_output": out_bytes,
                                       "calibration_activations": act_bytes, "float32_copies": 3 * 4 * max_numel}}
        if calibrating:  # routing statistics: the quantized layer runs on the calibration activations
            # rounding popped every target's source (offline/convert.py): only the rest stays mapped
            rest = sum(_nbytes(*v) for k, v in tensors.items() if k.removesuffix(".weight") not in targets)
            phases["quantized forward"] = {"layer_source": rest, "layer_int8_output": out_bytes,
                                           "calibration_activations": 3 * act_bytes, "forward_chunk": qforward_tmp}
        return phases

    # inputs in the converter's order; which Hessians are collected during the forward (non-expert inputs)
    by_input: dict[str, list[str]] = {}
    for m in targets:
        by_input.setdefault(input_key(m), []).append(m)
    in_features = {k: shapes[ms[0]][1] for k, ms in by_input.items() if ms[0] in shapes}
    out_rows = {k: sum(shapes[m][0] for m in ms if m in shapes) for k, ms in by_input.items()}
    collected = [k for k in by_input if method.gptq and not (expert_prefix and k.startswith(expert_prefix))]
    hess_collected = sum(_hessian_bytes(in_features[k]) for k in collected if k in in_features)
    moe_rows = act_bytes if moe else 0  # the MoE input rows, kept for the experts' Hessians
    search_rows = sum(min(SEARCH_ROWS, opts.samples * opts.seq_len) * n * 4 for n in in_features.values())
    stats_phase = {"layer_source": src_bytes, "calibration_activations": act_bytes, "moe_input_rows": moe_rows,
                   "alpha_search_rows": search_rows, "gptq_hessians": hess_collected, "forward_chunk": forward_tmp}
    # GPTQ (or rounding) input by input: the Hessians not used yet + this one's factorization or solve. GPTQSolver
    # factorizes the Hessian in its own memory (LAPACK in place; benchmarks/results/gptq_factorization.md): the
    # Hessian + the float32 factor of a float64 Hessian. Solve: the float32 factor + the permuted float32 stack of the
    # weights that read this input (each weight materialized only while it is copied in) + the int8 result and
    # its un-permuted copy.
    order = list(by_input)

    def gptq_work(k: str) -> int:
        n, rows = in_features.get(k, 0), out_rows.get(k, 0)
        dt = 8 if n <= FLOAT64_MAX_INPUTS else 4
        factorize = n * n * dt + (n * n * 4 if dt == 8 else 0)
        largest = max((shapes[m][0] for m in by_input[k] if m in shapes), default=0)
        solve = n * n * 4 + 4 * rows * n + 4 * largest * n + 2 * rows * n
        return max(factorize, solve)

    worst = 0
    for pos, k in enumerate(order):
        if method.gptq:
            later = sum(_hessian_bytes(in_features[c]) for c in collected if c in in_features and order.index(c) > pos)
            work = later + gptq_work(k)
        else:
            work = 3 * 4 * out_rows.get(k, 0) * in_features.get(k, 0)
        worst = max(worst, work)
    # An MoE layer lets go of each expert's source once the expert is quantized (offline/haq/layer.py): the experts'
    # int8 output replaces their larger bf16 source, so at most one expert's output adds to the mapped source, and the
    # quantized forward runs with only the non-expert source mapped (measured at Mixtral width: the file-mapped RSS
    # falls from 3.1 GB to 0.3 GB over the experts).
    def non_expert(d):
        return sum(_nbytes(*v) for k, v in d.items() if not (expert_prefix and k.startswith(expert_prefix)))

    expert_out = max((_nbytes(*v) * 3 for k, v in out.items() if expert_prefix and k.startswith(f"{expert_prefix}0.")
                      and k.endswith(".weight")), default=0)  # about one expert's int8 weights (w1, w2, w3 alike)
    quant_out = non_expert(out) + expert_out if moe else out_bytes
    quant_phase = {"layer_source": src_bytes, "layer_int8_output": quant_out, "calibration_activations": act_bytes,
                   "moe_input_rows": moe_rows, ("gptq_work" if method.gptq else "float32_copies"): worst}
    run_phase = {"layer_source": non_expert(tensors) if moe else src_bytes, "layer_int8_output": out_bytes,
                 "calibration_activations": 3 * act_bytes, "forward_chunk": qforward_tmp}
    phases = {"statistics forward": stats_phase}
    if method.search_alpha:  # one group at a time: every candidate's int8 copy of its row sample; with GPTQ, the
        # shortlist is scored by factorizing and solving a copy of one collected Hessian at a time, while every
        # collected Hessian and the row samples are still held
        widest = max(in_features.values(), default=0)
        candidates = _search_candidates(opts) * min(SEARCH_ROWS, opts.samples * opts.seq_len) * (widest + 4)
        scoring = max((gptq_work(k) for k in collected if k in in_features), default=0)
        phases["α search"] = {**{k: v for k, v in stats_phase.items() if k != "forward_chunk"},
                              "candidate_rows": candidates, "gptq_scoring": scoring}
    phases.update({"quantization": quant_phase, "quantized forward": run_phase})
    return phases


def _calib_text_bytes(sources: list[str]) -> int:
    """Calibration text in memory: the string, its token ids (int64) and the tokenizer's encoding (~12x the file)."""
    return 12 * sum(os.path.getsize(s) for s in sources if os.path.isfile(s))


def _config_bytes(config: dict, spec: ModelSpec, opts, method, routing_stats: bool) -> int:
    from vllm_haq import __version__
    from vllm_haq.format import HAQQuantConfig

    smoothing = {}
    if method.smooth:
        for i in range(spec.num_layers):
            smoothing[str(i)] = {g.consumers[0]: 0.5 for g in spec.smoothing_groups(i)}
    qcfg = HAQQuantConfig(
        ignore=list(opts.ignore),
        smoothing={"method": "fixed", "alpha": smoothing, "folded": bool(smoothing), "explicit": []},
        routing_statistics=ROUTING_FILE if routing_stats else None,
        producer={"tool": "vllm-haq", "version": __version__, "method": opts.method,
                  "calibration": [os.path.basename(c) for c in opts.calib], "samples": opts.samples,
                  "seq_len": opts.seq_len, "seed": opts.seed, "alpha": opts.alpha,
                  "gptq": {"block_size": opts.gptq_block_size, "dampening": opts.gptq_dampening,
                           "act_order": opts.act_order}},
    )
    return _json_file_bytes({**config, "quantization_config": qcfg.to_dict()})


def _time(spec: ModelSpec, src, params: int, tokens: int, method, opts):
    parts = {"startup": STARTUP_S + (TOKENIZER_S if tokens else 0), "read_round_write": params / RTN_PARAMS_PER_S}
    # every linear: (parameters, the share of the tokens it computes: top_k / experts for a routed expert,
    # else 1, quantized?)
    linears = []
    for i in range(spec.num_layers):
        prefix = spec.layer_prefix(i)
        moe = spec.moe_block(i)
        for m in spec.linear_modules(i):
            shape = src.get(f"{prefix}{m}.weight", (None, None))[1]
            if shape:
                share = spec.top_k / max(spec.num_experts, 1) if moe and m.startswith(f"{moe[0]}.experts.") else 1
                linears.append((_numel(shape), share, not is_ignored(prefix + m, opts.ignore)))
    if tokens:
        per_token = sum(n * share for n, share, _ in linears)
        passes = 1 if opts.method == "rtn" else 2  # statistics forward (float) + quantized forward
        parts["calibration_forward"] = passes * 2 * per_token * tokens / FORWARD_FLOPS
    if method.search_alpha:  # per candidate (none + the grid [+ rotated]) and consumer: round the weight, one
        # [rows, in] x [in, out] product on the kept search rows (a routed expert: the rows routed to it)
        rows = min(SEARCH_ROWS, math.ceil(tokens / SEARCH_ROW_STRIDE))
        work = sum(n * (1 / RTN_PARAMS_PER_S + 2 * rows * share / FORWARD_FLOPS) for n, share, q in linears if q)
        parts["alpha_search"] = _search_candidates(opts) * work
    if method.gptq:  # one solve per distinct input: the linears that read it are stacked
        seconds, scoring = 0.0, 0.0
        for i in range(spec.num_layers):
            prefix = spec.layer_prefix(i)
            stacks: dict[str, list[int]] = {}  # input -> [rows, inputs]
            for m in spec.linear_modules(i):
                shape = src.get(f"{prefix}{m}.weight", (None, None))[1]
                if shape and not is_ignored(prefix + m, opts.ignore):
                    stacks.setdefault(input_key(m), [0, shape[1]])[0] += shape[0]
            moe = spec.moe_block(i)
            for key, (rows, n) in stacks.items():
                solve = (n * GPTQ_S_PER_COLUMN + rows * n * GPTQ_S_PER_WEIGHT + 2 * rows * n * n / GPTQ_UPDATE_FLOPS
                         + 4 / 3 * n ** 3 / FACTORIZE_FLOPS["float64" if n <= FLOAT64_MAX_INPUTS else "float32"])
                seconds += solve
                if method.search_alpha and not (moe and key.startswith(f"{moe[0]}.experts.")):
                    scoring += (1 + GPTQ_SHORTLIST) * solve  # non-expert inputs: the α shortlist scored with GPTQ
        parts["gptq"] = seconds
        if scoring:
            parts["alpha_search_gptq"] = scoring
    total = sum(parts.values())
    return total, parts


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


def _search_candidates(opts) -> int:
    """Candidates haq's search scores per group, at most: none + the α grid, plus the rotated ones (upper bound:
    groups that cannot be rotated score fewer)."""
    rotation = {"search": 1 + len(ALPHA_GRID) + len(ROTATION_ALPHAS), "all": len(ROTATION_ALPHAS)}
    return rotation.get(opts.rotation_mode, 1 + len(ALPHA_GRID))
