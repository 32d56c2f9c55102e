"""Numerics shared by the converter and the runtime (imports torch only)."""

from vllm_haq.quant.int8 import (
    INT8_MAX,
    dequantize,
    exact_int8_products,
    int8_products,
    int8_matmul_int16_saturating,
    int8_matmul_reference,
    quantize_input,
    quantize_per_token,
    quantize_weight_per_channel,
    quantize_with_scale,
    relative_weight_error,
    w8a8_linear_reference,
    weight_scale_from_amax,
)
from vllm_haq.quant.rotation import hadamard, rotate, rotate_hessian, rotation_block

__all__ = [
    "INT8_MAX",
    "dequantize",
    "exact_int8_products",
    "int8_products",
    "hadamard",
    "int8_matmul_int16_saturating",
    "int8_matmul_reference",
    "quantize_input",
    "quantize_per_token",
    "quantize_weight_per_channel",
    "quantize_with_scale",
    "relative_weight_error",
    "rotate",
    "rotate_hessian",
    "rotation_block",
    "w8a8_linear_reference",
    "weight_scale_from_amax",
]
