"""Peak-RAM model of a conversion's phases (each decoder layer's, and the peak over all), for ``haq convert --dry-run``.

Split from ``offline/estimate.py`` so that each stays readable: this module follows what ``offline/convert.py``,
``offline/haq/`` and ``vllm_haq/quant/gptq.py`` keep alive while one layer is converted (statistics
forward, α search, quantization, quantized forward) and returns the bytes of each component per phase; the
module docstring of ``offline.estimate`` says what is counted and how it was checked. Sizes come from the
safetensors headers only: tensors are ``name -> (safetensors dtype, shape)``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from vllm_haq.quant.gptq import FLOAT64_MAX_INPUTS

from offline.haq import ALPHA_GRID, ROTATION_ALPHAS, SEARCH_ROWS, input_key
from offline.models import ModelSpec

DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def numel(shape: list[int]) -> int:
    return math.prod(shape) if shape else 1


def nbytes(dtype: str, shape: list[int]) -> int:
    return numel(shape) * DTYPE_BYTES.get(dtype, 4)


def hessian_bytes(n: int) -> int:
    return n * n * (8 if n <= FLOAT64_MAX_INPUTS else 4)


def search_candidates(opts) -> int:
    """Candidates haq's search scores per group, at most: none + the α grid, plus the rotated ones (upper bound:
    groups that cannot be rotated score fewer)."""
    rotation = {"search": 1 + len(ALPHA_GRID) + len(ROTATION_ALPHAS), "all": len(ROTATION_ALPHAS)}
    return rotation.get(opts.rotation_mode, 1 + len(ALPHA_GRID))


@dataclass
class _Layer:
    """What every phase of one layer's model needs: its source and output tensors and their sizes."""

    tensors: dict  # the layer's source tensors, relative to its prefix
    targets: list[str]  # the quantized linears
    out: dict  # the layer's output tensors
    expert_prefix: str | None  # "<moe block>.experts." of an MoE layer
    shapes: dict  # quantized linear -> its weight's shape
    src_bytes: int
    out_bytes: int
    act_bytes: int  # the calibration activations (0 without calibration)
    forward_tmp: int  # one float forward chunk's temporaries
    qforward_tmp: int  # one quantized forward chunk's temporaries

    def is_expert(self, name: str) -> bool:
        return bool(self.expert_prefix) and name.startswith(self.expert_prefix)


def layer_memory(spec: ModelSpec, i: int, tensors, targets, out, method, opts, act_bytes: int, hidden: int) -> dict:
    """The RAM components of layer ``i``'s phases (bytes), following offline/convert.py and offline/haq/."""
    moe = spec.moe_block(i)
    shapes = {m: tensors[f"{m}.weight"][1] for m in targets if f"{m}.weight" in tensors}
    max_numel = max((numel(s) for s in shapes.values()), default=0)
    max_inter = max((s[0] for s in shapes.values()), default=hidden)
    windows_per_chunk = min(opts.chunk, opts.samples) if act_bytes > 0 else 0
    chunk_act = windows_per_chunk * opts.seq_len * 4
    layer = _Layer(
        tensors, targets, out, f"{moe[0]}.experts." if moe else None, shapes,
        src_bytes=sum(nbytes(*v) for v in tensors.values()), out_bytes=sum(nbytes(*v) for v in out.values()),
        act_bytes=act_bytes,
        # one float forward chunk: the float32 weight being applied + a few [chunk, seq, width] float32 intermediates
        forward_tmp=4 * max_numel + chunk_act * (3 * max_inter + 4 * hidden),
        # one quantized forward chunk (vllm_haq.quant.int8.int8_matmul_reference): a float64 accumulator and two
        # float64 temporaries of the widest output, the float32 K-chunk of the weight, the other float32 intermediates
        qforward_tmp=chunk_act * 2 * 3 * max_inter + 4 * 1024 * max_inter + chunk_act * (2 * max_inter + 4 * hidden),
    )
    if opts.method == "rtn":
        return _rtn_phases(layer, max_numel)
    return _calibrated_phases(layer, method, opts)


def _rtn_phases(layer: _Layer, max_numel: int) -> dict:
    phases = {"round to nearest": {"layer_source": layer.src_bytes, "layer_int8_output": layer.out_bytes,
                                   "calibration_activations": layer.act_bytes, "float32_copies": 3 * 4 * max_numel}}
    if layer.act_bytes > 0:  # routing statistics: the quantized layer runs on the calibration activations
        # rounding popped every target's source (offline/convert.py): only the rest stays mapped
        rest = sum(nbytes(*v) for k, v in layer.tensors.items() if k.removesuffix(".weight") not in layer.targets)
        phases["quantized forward"] = {"layer_source": rest, "layer_int8_output": layer.out_bytes,
                                       "calibration_activations": 3 * layer.act_bytes,
                                       "forward_chunk": layer.qforward_tmp}
    return phases


@dataclass
class _Inputs:
    """The layer's linear inputs in the converter's order and which Hessians the forward collects."""

    by_input: dict[str, list[str]]  # input -> the linears that read it
    in_features: dict[str, int]
    out_rows: dict[str, int]  # input -> rows of the stacked weights that read it
    collected: list[str]  # inputs whose GPTQ Hessian is collected during the forward (non-expert inputs)

    def gptq_work(self, k: str, shapes: dict) -> int:
        """GPTQSolver factorizes the Hessian in its own memory (LAPACK in place; benchmarks/results/
        gptq_factorization.md): the Hessian + the float32 factor of a float64 Hessian. Solve: the float32 factor +
        the permuted float32 stack of the weights that read this input (each weight materialized only while it is
        copied in) + the int8 result and its un-permuted copy."""
        n, rows = self.in_features.get(k, 0), self.out_rows.get(k, 0)
        dt = 8 if n <= FLOAT64_MAX_INPUTS else 4
        factorize = n * n * dt + (n * n * 4 if dt == 8 else 0)
        largest = max((shapes[m][0] for m in self.by_input[k] if m in shapes), default=0)
        solve = n * n * 4 + 4 * rows * n + 4 * largest * n + 2 * rows * n
        return max(factorize, solve)


def _inputs(layer: _Layer, method) -> _Inputs:
    by_input: dict[str, list[str]] = {}
    for m in layer.targets:
        by_input.setdefault(input_key(m), []).append(m)
    shapes = layer.shapes
    return _Inputs(
        by_input,
        in_features={k: shapes[ms[0]][1] for k, ms in by_input.items() if ms[0] in shapes},
        out_rows={k: sum(shapes[m][0] for m in ms if m in shapes) for k, ms in by_input.items()},
        collected=[k for k in by_input if method.gptq and not layer.is_expert(k)],
    )


def _worst_quantization_work(layer: _Layer, inputs: _Inputs, method) -> int:
    """GPTQ (or rounding) input by input: the Hessians not used yet + this one's factorization or solve."""
    order, worst = list(inputs.by_input), 0
    for pos, k in enumerate(order):
        if method.gptq:
            later = sum(hessian_bytes(inputs.in_features[c]) for c in inputs.collected
                        if c in inputs.in_features and order.index(c) > pos)
            work = later + inputs.gptq_work(k, layer.shapes)
        else:
            work = 3 * 4 * inputs.out_rows.get(k, 0) * inputs.in_features.get(k, 0)
        worst = max(worst, work)
    return worst


def _calibrated_phases(layer: _Layer, method, opts) -> dict:
    inputs = _inputs(layer, method)
    act_bytes = layer.act_bytes
    hess_collected = sum(hessian_bytes(inputs.in_features[k]) for k in inputs.collected if k in inputs.in_features)
    moe_rows = act_bytes if layer.expert_prefix else 0  # the MoE input rows, kept for the experts' Hessians
    search_rows = sum(min(SEARCH_ROWS, opts.samples * opts.seq_len) * n * 4 for n in inputs.in_features.values())
    stats_phase = {"layer_source": layer.src_bytes, "calibration_activations": act_bytes, "moe_input_rows": moe_rows,
                   "alpha_search_rows": search_rows, "gptq_hessians": hess_collected,
                   "forward_chunk": layer.forward_tmp}
    worst = _worst_quantization_work(layer, inputs, method)
    # An MoE layer lets go of each expert's source once the expert is quantized (offline/haq/): the experts'
    # int8 output replaces their larger bf16 source, so at most one expert's output adds to the mapped source, and the
    # quantized forward runs with only the non-expert source mapped (measured at Mixtral width: the file-mapped RSS
    # falls from 3.1 GB to 0.3 GB over the experts).
    def non_expert(d):
        return sum(nbytes(*v) for k, v in d.items() if not layer.is_expert(k))

    expert_out = max((nbytes(*v) * 3 for k, v in layer.out.items() if layer.is_expert(k)
                      and k.startswith(f"{layer.expert_prefix}0.") and k.endswith(".weight")),
                     default=0)  # about one expert's int8 weights (w1, w2, w3 alike)
    quant_out = non_expert(layer.out) + expert_out if layer.expert_prefix else layer.out_bytes
    quant_phase = {"layer_source": layer.src_bytes, "layer_int8_output": quant_out,
                   "calibration_activations": act_bytes, "moe_input_rows": moe_rows,
                   ("gptq_work" if method.gptq else "float32_copies"): worst}
    run_phase = {"layer_source": non_expert(layer.tensors) if layer.expert_prefix else layer.src_bytes,
                 "layer_int8_output": layer.out_bytes, "calibration_activations": 3 * act_bytes,
                 "forward_chunk": layer.qforward_tmp}
    phases = {"statistics forward": stats_phase}
    if method.search_alpha:  # one group at a time: every candidate's int8 copy of its row sample; with GPTQ, the
        # shortlist is scored by factorizing and solving a copy of one collected Hessian at a time, while every
        # collected Hessian and the row samples are still held
        widest = max(inputs.in_features.values(), default=0)
        candidates = search_candidates(opts) * min(SEARCH_ROWS, opts.samples * opts.seq_len) * (widest + 4)
        scoring = max((inputs.gptq_work(k, layer.shapes) for k in inputs.collected if k in inputs.in_features),
                      default=0)
        phases["α search"] = {**{k: v for k, v in stats_phase.items() if k != "forward_chunk"},
                              "candidate_rows": candidates, "gptq_scoring": scoring}
    phases.update({"quantization": quant_phase, "quantized forward": run_phase})
    return phases


def peak_ram(process: int, src, globals_, layers: list[dict], act_bytes: int, calib: list[str] | None) -> dict:
    """Peak RAM: the largest phase over writing the global tensors, embedding the calibration text (``calib``: its
    sources, None without calibration) and every decoder layer's phases (``layer_memory``); ``process``: the
    converter process's own bytes."""
    embeddings = [n_ for n_ in globals_ if "embed_" in n_]
    phases = [("writing the global tensors", {"process": process,
                                               "global_tensors": sum(nbytes(*v) for v in globals_.values()),
                                               "calibration_activations": act_bytes})]
    if calib is not None:
        phases.append(("embedding the calibration text", {
            "process": process, "embeddings": sum(nbytes(*src[n_]) for n_ in embeddings),
            "float32_embeddings": sum(numel(src[n_][1]) * 4 for n_ in embeddings),
            "calibration_activations": act_bytes, "calibration_text": _calib_text_bytes(calib)}))
    for i, lm in enumerate(layers):
        for phase, comps in lm.items():
            phases.append((f"layer {i}: {phase}", {"process": process, **comps}))
    peak_phase, peak_comps = max(phases, key=lambda p: sum(p[1].values()))
    by_kind: dict[str, int] = {}  # phase -> its largest total over the layers
    for name, comps in phases:
        kind = name.split(": ", 1)[-1]
        by_kind[kind] = max(by_kind.get(kind, 0), sum(comps.values()))
    return {"peak_bytes": sum(peak_comps.values()), "phase": peak_phase, "components": peak_comps,
            "phases": by_kind}


def _calib_text_bytes(sources: list[str]) -> int:
    """Calibration text in memory: the string, its token ids (int64) and the tokenizer's encoding (~12x the file)."""
    return 12 * sum(os.path.getsize(s) for s in sources if os.path.isfile(s))
