"""Calibration-driven quantization of one decoder layer: smoothing, then GPTQ or round-to-nearest.

Methods (``haq convert --method``):

* ``rtn``          round to nearest, no calibration;
* ``gptq``         GPTQ on the original weights;
* ``smoothquant``  smoothing with one fixed α (``--alpha``), then round to nearest;
* ``haq``          smoothing with α searched per layer and producer (none, or a grid),
                   optionally followed by a block-Hadamard rotation of the consumers'
                   input (``vllm_haq.quant.rotation``), chosen by the output error of the
                   quantized W8A8 consumers on calibration rows, rounded as they will be
                   (the shortlist is re-scored with GPTQ), then GPTQ with the Hessians of
                   the *smoothed and rotated* activations.

Smoothing is folded exactly into the producers (norms, v_proj, up_proj/w3,
OPT's fc1 through ReLU). For the experts of an MoE layer, which share one input
norm with the router, two options (``--moe-smoothing``): ``shared`` folds one
vector into that norm (router and shared expert absorb it too); ``per-expert``
gives every expert its own vector from the tokens routed to it, kept explicit as
``input_smooth`` of its w1/w3 (gate/up) and applied by the runtime during that
expert's per-token quantization; the shared expert then stays unsmoothed.
Experts that saw fewer than ``MIN_EXPERT_TOKENS`` calibration tokens are
rounded to nearest (their Hessian is too low-rank to steer GPTQ). Rotation is
offered to groups whose consumers are all quantized; the routed experts' down
projections of a layer are rotated all alike or not at all (the fused MoE
runtime rotates every expert's intermediate rows the same way).

Modules, from the bottom up:

* ``methods``     the methods, the search constants and :class:`LayerOptions`;
* ``working``     :class:`WorkingTensors`, the layer's tensors with the rescalings applied so far;
* ``records``     :class:`LayerRecord` (the choices made) and :class:`LayerResult` (the driver's output);
* ``statistics``  :class:`InputStats` and :class:`ExpertInputs`, what the float run leaves;
* ``transforms``  applying one group's smoothing and rotation, exactly;
* ``search``      scoring the candidates of one group (round-to-nearest, then GPTQ);
* ``groups``      choosing and applying the transforms of every group of a layer;
* ``layer``       the per-layer driver, :func:`quantize_calibrated`.
"""

from offline.haq.groups import is_routed_expert_down, smooth_expert_downs, smooth_expert_explicitly, smooth_layer
from offline.haq.layer import collect_statistics, quantize_calibrated
from offline.haq.methods import (ALPHA_GRID, GPTQ_SHORTLIST, METHODS, MIN_EXPERT_TOKENS, MOE_SMOOTHING, ROTATION_ALPHAS,
                                 ROTATION_MODES, SEARCH_ROW_STRIDE, SEARCH_ROWS, LayerOptions, Method)
from offline.haq.records import LayerRecord, LayerResult
from offline.haq.search import (Candidate, candidates, gptq_output_error, output_error, routed_rows,
                                scored_candidates, search_alpha)
from offline.haq.statistics import ExpertInputs, InputStats, input_key, input_twin
from offline.haq.transforms import apply_smoothing, group_factors, rotation_for, transform_group, weight_absmax
from offline.haq.working import WorkingTensors

__all__ = [
    "ALPHA_GRID", "GPTQ_SHORTLIST", "METHODS", "MIN_EXPERT_TOKENS", "MOE_SMOOTHING", "ROTATION_ALPHAS",
    "ROTATION_MODES", "SEARCH_ROW_STRIDE", "SEARCH_ROWS", "Candidate", "ExpertInputs", "InputStats", "LayerOptions",
    "LayerRecord", "LayerResult", "Method", "WorkingTensors", "apply_smoothing", "candidates", "collect_statistics",
    "gptq_output_error", "group_factors", "input_key", "input_twin", "is_routed_expert_down", "output_error",
    "quantize_calibrated", "rotation_for", "routed_rows", "scored_candidates", "search_alpha", "smooth_expert_downs",
    "smooth_expert_explicitly", "smooth_layer", "transform_group", "weight_absmax",
]
