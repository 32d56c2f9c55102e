"""Int8 compute kernels and backend selection (no vLLM import needed; vLLM ops used when present)."""

from vllm_haq.kernels.int8_gemm import BACKENDS, ScaledInt8Gemm, select_backend, torch_scaled_int8_mm
from vllm_haq.kernels.moe import group_by_expert, int8_moe_forward

__all__ = ["BACKENDS", "ScaledInt8Gemm", "select_backend", "torch_scaled_int8_mm", "group_by_expert",
           "int8_moe_forward"]
