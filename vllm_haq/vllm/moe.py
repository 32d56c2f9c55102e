"""W8A8 int8 fused-MoE method (all experts resident; offloading plugs in here later)."""

from __future__ import annotations

import itertools

import torch
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.utils import set_weight_attrs
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_haq.format import SCALE_DTYPE, WEIGHT_DTYPE, CheckpointError, check_scale_values
from vllm_haq.kernels import ScaledInt8Gemm, int8_moe_forward, select_backend, triton_int8_moe_forward

# Layer key → method, so the opaque custom op can find its layer. The op hides the
# data-dependent expert loop from torch.compile (which traces into `apply` on CPU).
_LAYERS: dict[str, "HAQMoEMethod"] = {}
_ids = itertools.count()


def _haq_moe_forward(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_key: str) -> torch.Tensor:
    return _LAYERS[layer_key].forward(x, topk_weights, topk_ids)


def _haq_moe_forward_fake(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_key: str) -> torch.Tensor:
    return torch.empty_like(x)


direct_register_custom_op("haq_moe_forward", _haq_moe_forward, mutates_args=[], fake_impl=_haq_moe_forward_fake)


def _checked_moe_loader(inner, where: str, name: str, dtype: torch.dtype):
    """vLLM's expert loader with dtype and scale-value checks (it truncates bf16 into int8 silently)."""

    def load(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
        what = f"{where}: checkpoint tensor {weight_name!r} (expert {expert_id}, {shard_id}) for {name}"
        if loaded_weight.dtype != dtype:
            raise CheckpointError(f"{what} has dtype {loaded_weight.dtype}, expected {dtype}")
        if dtype == SCALE_DTYPE:
            check_scale_values(loaded_weight, what)
        return inner(param, loaded_weight, weight_name, shard_id, expert_id, return_success)

    return load


class HAQMoEMethod(FusedMoEMethodBase):
    """Experts as int8 ``w13_weight`` [E, 2I, H] / ``w2_weight`` [E, H, I] with per-channel scales."""

    def __init__(self, quant_config, moe, prefix: str):
        super().__init__(moe)
        self.quant_config = quant_config
        self.prefix = prefix
        self.layer_key = f"{prefix}#{next(_ids)}"

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
        for name, (shape, dtype) in shapes.items():
            param = torch.nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
            layer.register_parameter(name, param)
            attrs = {"weight_loader": _checked_moe_loader(loader, self.prefix, name, dtype)}
            if dtype == SCALE_DTYPE:
                attrs["quant_method"] = "channel"
            set_weight_attrs(param, attrs)
        self.explicit_smoothing = self.prefix in self.quant_config.explicit_smoothing
        if self.explicit_smoothing:
            # Per-expert smoothing of the experts' input (checkpoint: experts.{e}.w1/w3.input_smooth).
            param = torch.nn.Parameter(torch.empty(num_experts, hidden_size, dtype=SCALE_DTYPE), requires_grad=False)
            layer.register_parameter("w13_input_smooth", param)
            set_weight_attrs(param, {"weight_loader": self._input_smooth_loader(layer)})
        self.out_dtype = params_dtype

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
        e = layer.w13_weight.shape[0]
        # CUDA: the fused Triton MoE (all experts resident: slot = expert id). It has no per-expert
        # smoothing input, so explicitly smoothed layers take the per-expert GEMM loop below.
        self.fused = None
        if layer.w13_weight.is_cuda and not self.explicit_smoothing and select_backend(layer.w13_weight.device) == "triton":
            slots = torch.arange(e, dtype=torch.int32, device=layer.w13_weight.device)
            weights = (layer.w13_weight.data, layer.w13_weight_scale.data, layer.w2_weight.data, layer.w2_weight_scale.data)
            self.fused = (slots, weights)
            return
        smooth = layer.w13_input_smooth.data if self.explicit_smoothing else [None] * e
        self.w13 = [ScaledInt8Gemm(layer.w13_weight.data[i], layer.w13_weight_scale.data[i], self.out_dtype,
                                   smooth=smooth[i]) for i in range(e)]
        self.w2 = [ScaledInt8Gemm(layer.w2_weight.data[i], layer.w2_weight_scale.data[i], self.out_dtype)
                   for i in range(e)]

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            slots, weights = self.fused
            return triton_int8_moe_forward(x, topk_weights, topk_ids, slots, *weights).to(x.dtype)
        return int8_moe_forward(x, topk_weights, topk_ids, self.w13, self.w2).to(x.dtype)

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
        return torch.ops.vllm.haq_moe_forward(x, topk_weights, topk_ids, self.layer_key)
