"""W8A8 int8 fused-MoE method: all experts resident, or served by the offload engine.

With an expert budget in ``additional_config={"haq": {...}}`` (or ``HAQ_*`` environment
variables, see :mod:`vllm_haq.offload.options`) the experts stay in host memory and
one :class:`vllm_haq.offload.OffloadEngine` per model serves every MoE layer from its
device cache, CPU workers and prefetcher.
"""

from __future__ import annotations

import itertools
import logging
import os
import re

import torch
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.utils import set_weight_attrs
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_haq.format import (SCALE_DTYPE, WEIGHT_DTYPE, CheckpointError, check_scale_values, read_config,
                             validate_routing_stats)
from vllm_haq.kernels import (ScaledInt8Gemm, cpu_fused_ok, cpu_moe_forward, int8_moe_forward, select_backend,
                              triton_int8_moe_forward)
from vllm_haq.offload import ExpertTensors, OffloadConfig, OffloadEngine, parse_offload_config
from vllm_haq.quant.rotation import rotate
from vllm_haq.vllm.linear import check_loaded
from vllm_haq.vllm.tp import tp_shard_amax

log = logging.getLogger("vllm_haq")

# Layer key → method, so the opaque custom op can find its layer. The op hides the
# data-dependent expert loop from torch.compile (which traces into `apply` on CPU).
_LAYERS: dict[str, "HAQMoEMethod"] = {}
_ids = itertools.count()


def _haq_moe_forward(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     layer_key: str) -> torch.Tensor:
    return _LAYERS[layer_key].forward(x, topk_weights, topk_ids)


def _haq_moe_forward_fake(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                          layer_key: str) -> torch.Tensor:
    return torch.empty_like(x)


direct_register_custom_op("haq_moe_forward", _haq_moe_forward, mutates_args=[], fake_impl=_haq_moe_forward_fake)


def _checked_moe_loader(inner, where: str, name: str, dtype: torch.dtype | tuple[torch.dtype, ...]):
    """vLLM's expert loader with dtype and scale-value checks (it truncates bf16 into int8 silently).

    ``dtype`` may be a tuple of accepted dtypes (compressed-tensors scales come in the model dtype)."""
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)

    def load(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
        check_loaded(loaded_weight, f"{where}: checkpoint tensor {weight_name!r} (expert {expert_id}, {shard_id}) for "
                     f"{name}", dtypes)
        return inner(param, loaded_weight, weight_name, shard_id, expert_id, return_success)

    return load


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_OP_NAME = "vllm::haq_moe_forward"


def _serving_step() -> bool:
    """False for vLLM's warm-up, profiling and CUDA-graph capture passes (kept out of routing statistics)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available() or not get_forward_context().attn_metadata:
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _real_tokens(num_tokens: int) -> int:
    """How many of this step's ``num_tokens`` rows are real tokens, not CUDA-graph padding (a suffix).

    With CUDA graphs vLLM pads a batch to a captured size (v1/worker/gpu_model_runner.py: the forward
    context gets ``num_tokens=num_tokens_padded``; ``_prepare_padding_mask`` marks the tail), and the
    eager MoE between graph pieces sees the padded rows. Routed, they would be fetched, computed and
    recorded in the live statistics. Every v1 attention backend's metadata carries the unpadded count as
    a host int (``num_actual_tokens``), so no device sync is needed. Under data parallelism the MoE input
    holds other ranks' tokens too, and micro-batching gives a list of metadata: then nothing is trimmed.
    """
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return num_tokens
    ctx = get_forward_context()
    if ctx.dp_metadata is not None or not isinstance(ctx.attn_metadata, dict):
        return num_tokens
    for meta in ctx.attn_metadata.values():
        actual = getattr(meta, "num_actual_tokens", None)
        if isinstance(actual, int):
            return min(actual, num_tokens)
    return num_tokens


def _offload_settings(quant_config) -> tuple[OffloadConfig, object]:
    """The model's offload settings (parsed once per model) and its vLLM config."""
    from vllm.config import get_current_vllm_config

    vllm_config = get_current_vllm_config()
    if getattr(quant_config, "offload_config", None) is None:
        quant_config.offload_config = parse_offload_config(vllm_config.additional_config)
    return quant_config.offload_config, vllm_config


def _metrics_file(vllm_config) -> str | None:
    """The counter board of this worker's engine for the API server's Prometheus exporter
    (:mod:`vllm_haq.vllm.metrics`): written by tensor-parallel rank 0 only, whose counters stand for the engine."""
    from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

    from vllm_haq.vllm.metrics import board_path

    try:
        tp_rank, pp_rank = get_tensor_model_parallel_rank(), get_pp_group().rank_in_group
    except AssertionError:  # no distributed state (an engine built outside vLLM's workers)
        return None
    if tp_rank != 0:
        return None
    return board_path(vllm_config, vllm_config.parallel_config.data_parallel_rank, pp_rank)


def _routing_prior(vllm_config, routing_file: str | None, model_dir: str | None) -> dict | None:
    """The checkpoint's routing statistics (validated), or None when it has none. ``model_dir``: the checkpoint's
    directory as ``HAQConfig`` validated it (a hub id's snapshot in vLLM's cache: vllm_haq.vllm.checkpoint)."""
    model_dir = model_dir if model_dir and os.path.isdir(model_dir) else vllm_config.model_config.model
    if not routing_file or not os.path.isdir(model_dir):
        log.warning("vllm-haq offload: %s has no routing statistics; the planner starts from uniform expert "
                    "statistics and learns online", model_dir)
        return None
    return validate_routing_stats(os.path.join(model_dir, routing_file), read_config(model_dir))


# The ops through which vLLM calls an MoE layer in a compiled model on CUDA (every platform but CPU and TPU):
# its own opaque vllm::moe_forward / moe_forward_shared (fused_moe/runner/moe_runner.py, _select_forward and
# the direct_register_custom_op calls), which run the layer, and so haq_moe_forward, eagerly. Only CPU and TPU
# trace into the layer, where haq_moe_forward itself shows in the graph.
_VLLM_MOE_OPS = ("vllm::moe_forward", "vllm::moe_forward_shared")


def moe_ops_in_graph(cpu_or_tpu: bool) -> tuple[str, ...]:
    """The MoE op names a compiled graph holds: what a graph split must name to keep MoE layers out of it."""
    return (_OP_NAME,) if cpu_or_tpu else _VLLM_MOE_OPS


def _keep_moe_out_of_cuda_graphs(vllm_config, cpu_or_tpu: bool = False) -> None:
    """Offloading decides on the host per step: graphs may not capture the MoE op (PIECEWISE, op split out)."""
    from vllm.config import CUDAGraphMode

    cc = vllm_config.compilation_config
    if cc.cudagraph_mode == CUDAGraphMode.NONE:
        return
    if cc.splitting_ops is None:
        cc.splitting_ops = []
    ops = moe_ops_in_graph(cpu_or_tpu)
    cc.splitting_ops.extend(op for op in ops if op not in cc.splitting_ops)
    if cc.cudagraph_mode != CUDAGraphMode.PIECEWISE:
        log.info("vllm-haq offload: cudagraph_mode %s -> PIECEWISE with %s split out", cc.cudagraph_mode, ops)
        cc.cudagraph_mode = CUDAGraphMode.PIECEWISE


_EXPERT_INPUT = re.compile(r"\.(\d+)\.(w1|w3|gate_proj|up_proj|w2|down_proj)$")
_DOWN = ("w2", "down_proj")


def _expert_rotation(qcfg, prefix: str, num_experts: int, explicit_smoothing: bool) -> tuple[int | None, int | None]:
    """The block-Hadamard orders (shared gate/up input, down projections' input) of the experts under ``prefix``
    (``input_rotation`` entries), None where not rotated. Each is one rotation for every expert: the gate/up input
    is rotated once for all experts (the router reads it unrotated) and the fused computation rotates all
    experts' intermediate rows alike. Explicitly smoothed experts have no gate/up rotation (the runtime serves
    one or the other)."""
    names = {k: v for k, v in qcfg.input_rotation.items() if k.startswith(prefix + ".")}
    where = f"quantization_config.input_rotation for the experts of {prefix!r}"
    parsed = {k: _EXPERT_INPUT.search(k[len(prefix):]) for k in names}
    bad = sorted(k for k, m in parsed.items() if m is None)
    if bad:
        raise CheckpointError(f"{where}: {bad[0]!r} is not an expert's gate, up or down projection")
    down = {k: v for k, v in names.items() if parsed[k].group(2) in _DOWN}
    gate_up = {k: v for k, v in names.items() if k not in down}
    if gate_up and explicit_smoothing:
        raise CheckpointError(f"{where}: these experts also carry explicit per-expert input_smooth; the MoE runtime "
                              "serves one or the other for their gate/up input")

    def one_block(entries: dict[str, int], per_expert: int, what: str) -> int | None:
        if not entries:
            return None
        blocks = set(entries.values())
        experts = {int(parsed[k].group(1)) for k in entries}
        if len(blocks) > 1 or len(entries) != per_expert * num_experts or experts != set(range(num_experts)):
            raise CheckpointError(f"{where}: entries for {len(entries)} of the {per_expert * num_experts} {what}, "
                                  f"with blocks {sorted(blocks)}; the MoE runtime rotates that input alike for every "
                                  f"expert, so all {num_experts} experts' {what} need the same block")
        return blocks.pop()

    return one_block(gate_up, 2, "gate and up projections"), one_block(down, 1, "down projections")


class HAQMoEMethod(FusedMoEMethodBase):
    """Experts as int8 ``w13_weight`` [E, 2I, H] / ``w2_weight`` [E, H, I] with per-channel scales.

    Routing is vLLM's, done before ``apply`` (``fused_moe/runner/moe_runner.py:629``, ``router.select_experts``):
    ``apply`` gets the top-k weights and ids and returns the routed experts' weighted sum, for every family. For
    DeepSeek that includes the grouped top-k, softmax or sigmoid scores and ``e_score_correction_bias``
    (``router/cpu_router.py:26-79``); ``routed_scaling_factor`` is left out of the weights
    (``fused_moe/layer.py:305-311``, DeepSeek's layers ask for it on the output,
    ``models/deepseek_v2.py:1335-1336``) and applied by the runner to what ``apply`` returns
    (``runner/moe_runner.py:403-419``), and the shared experts are computed by the runner beside the routed ones
    (``moe_runner.py:924``), so neither is this method's business. The offline reference puts the same factor on
    the weights (``offline/models/deepseek.py:grouped_topk``): the same sum."""

    @property
    def requires_device_loading(self) -> bool:
        """False when offloading: vLLM's loader would otherwise run process_weights_after_loading inside
        ``device_loading_context`` (model_loader/utils.py: process_weights_after_loading, device_loading_context),
        which first moves every CPU parameter to the GPU — all the host experts, the model that does not fit —
        and the engine would then be handed CUDA tensors to pin."""
        return not self.offload.offloading

    def __init__(self, quant_config, moe, prefix: str):
        super().__init__(moe)
        self.quant_config = quant_config
        self.prefix = prefix
        self.layer_key = f"{prefix}#{next(_ids)}"
        self.offload, self._vllm_config = _offload_settings(quant_config)
        self.engine: OffloadEngine | None = None
        self.fused = None  # (slots, weights) of the fused Triton MoE, when all experts are resident on CUDA
        self.host_stack: ExpertTensors | None = None  # all experts resident in host memory: the CPU kernel
        match = _LAYER_INDEX.search(prefix)
        self.layer_index = int(match.group(1)) if match else None
        if self.offload.offloading and self.layer_index is None:
            raise ValueError(f"vllm-haq offload: cannot find the decoder layer index in {prefix!r}")

    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        loader = extra_weight_attrs.pop("weight_loader")
        inter = intermediate_size_per_partition
        shapes = {
            "w13_weight": ((num_experts, 2 * inter, hidden_size), WEIGHT_DTYPE),
            "w2_weight": ((num_experts, hidden_size, inter), WEIGHT_DTYPE),
            "w13_weight_scale": ((num_experts, 2 * inter, 1), SCALE_DTYPE),
            "w2_weight_scale": ((num_experts, hidden_size, 1), SCALE_DTYPE),
        }
        self.offload.check_slots(num_experts, self.prefix)  # at load, before any weight is read
        parallel = self.moe.moe_parallel_config
        if parallel.use_ep:
            raise ValueError(f"vllm-haq: {self.prefix}: expert parallelism (enable_expert_parallel) is not supported "
                             "by the haq MoE method; use tensor parallelism without it")
        # Under TP every rank holds a shard of each expert's intermediate dimension (w13 rows, w2 columns);
        # with offloading each rank's engine caches its own shards (the budget is per rank).
        self.shard_amax = tp_shard_amax(parallel.tp_size > 1)
        # offloaded experts live in host memory (the engine pins them and owns the device cache)
        device = "cpu" if self.offload.offloading else None
        self.explicit_smoothing = self.prefix in self.quant_config.explicit_smoothing
        # Only the fused kernel may be captured in a CUDA graph: offloading plans on the host every step, and the
        # per-expert loop reads its routes' counts on the host (RouteGroups: bincount, .tolist()), which a
        # capturing stream refuses. Both run eagerly, split out of vLLM's graphs.
        if torch.cuda.is_available() and not self._fused(torch.device("cuda")):
            from vllm.platforms import current_platform

            _keep_moe_out_of_cuda_graphs(self._vllm_config, current_platform.is_cpu() or current_platform.is_tpu())
        for name, (shape, dtype) in shapes.items():
            param = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
            layer.register_parameter(name, param)
            accepted = self.quant_config.qcfg.scale_dtypes if dtype == SCALE_DTYPE else dtype
            attrs = {"weight_loader": _checked_moe_loader(loader, self.prefix, name, accepted)}
            if dtype == SCALE_DTYPE:
                attrs["quant_method"] = "channel"
            set_weight_attrs(param, attrs)
        self.rotation, self.down_rotation = _expert_rotation(self.quant_config.qcfg, self.prefix, num_experts,
                                                             self.explicit_smoothing)
        if self.down_rotation is not None and inter % self.down_rotation:
            raise CheckpointError(f"{self.prefix}: quantization_config.input_rotation block {self.down_rotation} of "
                                  f"the experts' down projections does not divide this rank's {inter} intermediate "
                                  f"features (tensor parallel size {parallel.tp_size}); use a tensor parallel size "
                                  "that keeps whole blocks on each rank")
        if self.explicit_smoothing:
            # Per-expert smoothing of the experts' input (checkpoint: experts.{e}.w1/w3.input_smooth).
            param = torch.nn.Parameter(torch.empty(num_experts, hidden_size, dtype=SCALE_DTYPE, device=device),
                                       requires_grad=False)
            layer.register_parameter("w13_input_smooth", param)
            set_weight_attrs(param, {"weight_loader": self._input_smooth_loader(layer)})
        self.out_dtype = params_dtype

    def _fused(self, device: torch.device) -> bool:
        """All experts resident on CUDA run as one fused Triton MoE (slot = expert id). It has no per-expert
        smoothing input and no TP all-shard max, so those layers, and other backends, take the per-expert loop."""
        return (device.type == "cuda" and not self.offload.offloading and not self.explicit_smoothing
                and self.shard_amax is None and select_backend(device) == "triton")

    def get_fused_moe_quant_config(self, layer):
        return None  # not a vLLM modular kernel

    def _input_smooth_loader(self, layer):
        loaded_from: dict[int, torch.Tensor] = {}

        def load(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
            what = f"{self.prefix}: checkpoint tensor {weight_name!r} (expert {expert_id}, {shard_id})"
            if loaded_weight.dtype != SCALE_DTYPE or tuple(loaded_weight.shape) != tuple(param.shape[1:]):
                raise CheckpointError(f"{what} is {loaded_weight.dtype} {list(loaded_weight.shape)}, "
                                      f"expected {SCALE_DTYPE} {list(param.shape[1:])}")
            check_scale_values(loaded_weight, what)
            if expert_id in loaded_from and not torch.equal(loaded_from[expert_id], loaded_weight):
                raise CheckpointError(f"{what} differs from the same expert's other input_smooth: w1 and w3 "
                                      f"read the same input, so they must share one smoothing vector")
            loaded_from[expert_id] = loaded_weight.clone()
            local = layer._map_global_expert_id_to_local_expert_id(expert_id)
            if local == -1:
                return False if return_success else None
            param.data[local].copy_(loaded_weight)
            return True if return_success else None

        return load

    def process_weights_after_loading(self, layer) -> None:
        _LAYERS[self.layer_key] = self
        if self.offload.offloading:
            self._register_with_engine(layer)
            return
        e = layer.w13_weight.shape[0]
        if self._fused(layer.w13_weight.device):
            slots = torch.arange(e, dtype=torch.int32, device=layer.w13_weight.device)
            weights = (layer.w13_weight.data, layer.w13_weight_scale.data,
                       layer.w2_weight.data, layer.w2_weight_scale.data)
            self.fused = (slots, weights)
            return
        if self.shard_amax is None and cpu_fused_ok(layer.w13_weight.data):
            self.host_stack = self._stack(layer)  # one CPU kernel call per step for all routed experts
            return
        smooth = layer.w13_input_smooth.data if self.explicit_smoothing else [None] * e
        self.w13 = [ScaledInt8Gemm(layer.w13_weight.data[i], layer.w13_weight_scale.data[i], self.out_dtype,
                                   smooth=smooth[i]) for i in range(e)]
        self.w2 = [ScaledInt8Gemm(layer.w2_weight.data[i], layer.w2_weight_scale.data[i], self.out_dtype,
                                  shard_amax=self.shard_amax, rotation=self.down_rotation) for i in range(e)]

    def _register_with_engine(self, layer) -> None:
        qc = self.quant_config
        if getattr(qc, "offload_engine", None) is None:
            device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                      else torch.device("cpu"))
            qc.offload_engine = OffloadEngine(self.offload, device, self.out_dtype,
                                              routing=_routing_prior(self._vllm_config, qc.qcfg.routing_statistics,
                                                                     qc.checkpoint_dir),
                                              name=str(self._vllm_config.model_config.model),
                                              shard_amax=self.shard_amax)
            qc.offload_engine.metrics_file = _metrics_file(self._vllm_config)
        self.engine = qc.offload_engine
        self.engine.add_layer(self.layer_index, self._stack(layer))

    def _stack(self, layer) -> ExpertTensors:
        """The layer's experts as one stack (views of its parameters)."""
        smooth = layer.w13_input_smooth.data if self.explicit_smoothing else None
        return ExpertTensors(layer.w13_weight.data, layer.w13_weight_scale.data, layer.w2_weight.data,
                             layer.w2_weight_scale.data, smooth, down_rotation=self.down_rotation)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        if self.rotation is not None:  # every expert's gate/up reads the same rotated input; the router did not
            x = rotate(x.float(), self.rotation).to(x.dtype)
        if self.fused is None and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"vllm-haq: {self.prefix}: the MoE op is being captured in a CUDA graph; offloading "
                               "and the per-expert loop must run eagerly (cudagraph_mode PIECEWISE with "
                               f"{', '.join(_VLLM_MOE_OPS)} in splitting_ops, or enforce_eager=True)")
        if self.fused is not None:  # may be inside a captured graph: computes the padding rows too
            slots, weights = self.fused
            return triton_int8_moe_forward(x, topk_weights, topk_ids, slots, *weights,
                                           down_rotation=self.down_rotation).to(x.dtype)
        real = _real_tokens(x.shape[0])
        if real == x.shape[0]:
            return self._eager_experts(x, topk_weights, topk_ids)
        out = x.new_zeros(x.shape)  # padding rows: their outputs are never read
        out[:real] = self._eager_experts(x[:real], topk_weights[:real], topk_ids[:real])
        return out

    def _eager_experts(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """The engine or the per-expert loop, on real tokens only."""
        if self.engine is not None:
            record = _serving_step()
            return self.engine.forward(self.layer_index, x, topk_weights, topk_ids, record=record).to(x.dtype)
        if self.host_stack is not None:
            return cpu_moe_forward(x, topk_weights, topk_ids, self.host_stack).to(x.dtype)
        return int8_moe_forward(x, topk_weights, topk_ids, self.w13, self.w2, shard_amax=self.shard_amax).to(x.dtype)

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
        return torch.ops.vllm.haq_moe_forward(x, topk_weights, topk_ids, self.layer_key)
