"""Tensor parallelism: the all-shard per-token max that makes sharded W8A8 layers quantize like TP=1.

A row-parallel linear (o_proj, down_proj) and the experts' down projection under
tensor parallelism read a shard of their input on each rank. Per-token int8
quantization of a shard would pick each rank's own scale — a different model from
TP=1. With the max over all shards every rank quantizes a token exactly as the
unsharded layer does, the int32 partial products add up to the unsharded product,
and only the float summation of vLLM's all-reduce differs.
"""

from __future__ import annotations

import torch
from vllm.utils.torch_utils import direct_register_custom_op


def _tp_max_all_reduce(t: torch.Tensor) -> torch.Tensor:
    from vllm.distributed import get_tp_group

    out = t.clone()
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX, group=get_tp_group().device_group)
    return out


def _tp_max_all_reduce_fake(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t)


# A custom op: torch.compile traces the layers' apply() and must not trace into the collective.
direct_register_custom_op("haq_tp_max_all_reduce", _tp_max_all_reduce, mutates_args=[],
                          fake_impl=_tp_max_all_reduce_fake)


def tp_shard_amax(sharded: bool):
    """The all-shard max function for a layer whose input is sharded over the TP group, else None."""
    from vllm.distributed import get_tensor_model_parallel_world_size

    if not sharded or get_tensor_model_parallel_world_size() == 1:
        return None
    return torch.ops.vllm.haq_tp_max_all_reduce
