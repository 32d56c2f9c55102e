"""Int8 compute kernels and backend selection (no vLLM import needed; vLLM ops used when present).

The Triton kernels are reached through the lazy wrappers below and are imported
on first call only (see :mod:`vllm_haq.kernels.int8_gemm` for why).
"""

from vllm_haq.kernels.int8_gemm import BACKENDS, ScaledInt8Gemm, select_backend, torch_scaled_int8_mm
from vllm_haq.kernels.moe import (ExpertStack, RouteGroups, cpu_expert_routes, cpu_fused_ok, cpu_moe_forward,
                                  expert_inter, expert_mlp, expert_routes, group_by_expert, int8_moe_forward,
                                  new_route_buffer, write_routes)


def triton_w8a8_linear(*args, **kwargs):
    """:func:`vllm_haq.kernels.triton_gemm.triton_w8a8_linear`, imported on first call."""
    from vllm_haq.kernels.triton_gemm import triton_w8a8_linear as impl  # noqa: PLC0415

    return impl(*args, **kwargs)


def triton_int8_moe_forward(*args, **kwargs):
    """:func:`vllm_haq.kernels.triton_moe.triton_int8_moe_forward`, imported on first call."""
    from vllm_haq.kernels.triton_moe import triton_int8_moe_forward as impl  # noqa: PLC0415

    return impl(*args, **kwargs)


__all__ = ["BACKENDS", "ScaledInt8Gemm", "select_backend", "torch_scaled_int8_mm", "group_by_expert",
           "ExpertStack", "RouteGroups", "cpu_expert_routes", "cpu_fused_ok", "cpu_moe_forward", "expert_inter",
           "expert_mlp", "expert_routes", "new_route_buffer", "write_routes", "int8_moe_forward",
           "triton_w8a8_linear", "triton_int8_moe_forward"]
