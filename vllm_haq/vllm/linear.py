"""W8A8 linear method: int8 weights, per-channel scales, dynamic per-token int8 activations."""

from __future__ import annotations

from typing import Callable

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.parameter import ChannelQuantScaleParameter, ModelWeightParameter

from vllm_haq.format import SCALE_DTYPE, WEIGHT_DTYPE, CheckpointError, check_scale_values
from vllm_haq.kernels import ScaledInt8Gemm
from vllm_haq.vllm.tp import tp_shard_amax


def check_loaded(tensor: torch.Tensor, what: str, dtypes: tuple[torch.dtype, ...], width: int | None = None) -> None:
    """The checks every HAQ weight loader (linear and expert) makes before vLLM copies ``tensor`` into a
    parameter: its dtype is one of ``dtypes``, its last dimension ``width`` (when known), and scales are
    finite and > 0. ``what`` names the tensor in the error."""
    if tensor.dtype not in dtypes:
        raise CheckpointError(f"{what} has dtype {tensor.dtype}, expected " + " or ".join(str(d) for d in dtypes))
    if width is not None and (tensor.dim() < 2 or tensor.shape[-1] != width):
        raise CheckpointError(f"{what} has shape {list(tensor.shape)}, expected [*, {width}]")
    if SCALE_DTYPE in dtypes:
        check_scale_values(tensor, what)


def checked_loader(inner: Callable, where: str, name: str, dtype: torch.dtype | tuple[torch.dtype, ...],
                   width: int | None) -> Callable:
    """Wrap a vLLM weight loader with the checks vLLM's loaders skip.

    vLLM copies tensors into parameters without checking dtypes, so a bf16 weight
    would be silently truncated into int8; scales are checked for finite, > 0 values.
    ``dtype`` may be a tuple of accepted dtypes (llm-compressor's scales come in the
    model dtype; the float32 parameter takes them exactly). ``width`` is the expected
    size of the last (input) dimension, when known.
    """
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)

    def load(param, loaded_weight: torch.Tensor, *args, **kwargs):
        shard = f" (shard {args[0]!r})" if args and args[0] is not None else ""
        check_loaded(loaded_weight, f"checkpoint tensor for {where}.{name}{shard}", dtypes, width)
        return inner(param, loaded_weight, *args, **kwargs)

    return load


@register_weight_loader_v2_supported_method
class HAQLinearMethod(LinearMethodBase):
    """Linear layer of a HAQ checkpoint (``weight`` int8 [N, K], ``weight_scale`` float32 [N, 1]; a
    compressed-tensors checkpoint's scales may be bf16/fp16 and are held as float32). ``rotation``: the
    block-Hadamard order its input is rotated by before quantization (format v2 ``input_rotation``)."""

    def __init__(self, quant_config, prefix: str, rotation: int | None = None):
        self.quant_config = quant_config
        self.prefix = prefix
        self.rotation = rotation

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        loader = extra_weight_attrs["weight_loader"]
        layer.logical_widths = output_partition_sizes
        n = sum(output_partition_sizes)
        weight = ModelWeightParameter(
            data=torch.empty(n, input_size_per_partition, dtype=WEIGHT_DTYPE),
            input_dim=1, output_dim=0,
            weight_loader=checked_loader(loader, self.prefix, "weight", WEIGHT_DTYPE, input_size),
        )
        scale = ChannelQuantScaleParameter(
            data=torch.empty(n, 1, dtype=SCALE_DTYPE),
            output_dim=0,
            weight_loader=checked_loader(loader, self.prefix, "weight_scale", self.quant_config.qcfg.scale_dtypes, 1),
        )
        layer.register_parameter("weight", weight)
        layer.register_parameter("weight_scale", scale)
        layer.haq_out_dtype = params_dtype
        layer.haq_input_sharded = input_size_per_partition != input_size  # row-parallel under TP
        if self.rotation is not None and input_size_per_partition % self.rotation:
            raise CheckpointError(
                f"{self.prefix}: quantization_config.input_rotation block {self.rotation} does not divide this "
                f"rank's {input_size_per_partition} input features (tensor parallelism splits the input); use a "
                "tensor-parallel size that keeps whole blocks per rank")

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        # Plain Parameters from here on: the vLLM parameter subclasses only matter for loading.
        layer.weight = torch.nn.Parameter(layer.weight.data, requires_grad=False)
        layer.weight_scale = torch.nn.Parameter(layer.weight_scale.data, requires_grad=False)
        self.gemm = ScaledInt8Gemm(layer.weight.data, layer.weight_scale.data, layer.haq_out_dtype,
                                   shard_amax=tp_shard_amax(layer.haq_input_sharded), rotation=self.rotation)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.gemm(x, bias)
