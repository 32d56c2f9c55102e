"""Tensor-parallel int8 arithmetic without vLLM: shards of a row-parallel linear or of the experts'
intermediate dimension, each quantizing a token with the max over all shards (exchanged by a
collective, simulated here by threads meeting at a barrier), add up to the unsharded layer."""

import threading

import pytest
import torch

from vllm_haq.kernels import ScaledInt8Gemm, int8_moe_forward
from vllm_haq.quant import quantize_weight_per_channel


class MaxAllReduce:
    """An all-reduce(MAX) among ``n`` threads, like torch.distributed's across tensor-parallel ranks."""

    def __init__(self, n: int):
        self.barrier = threading.Barrier(n)
        self.parts: dict[int, torch.Tensor] = {}
        self.calls = 0

    def member(self, rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.parts[rank] = t.clone()
            self.barrier.wait()
            out = torch.stack([self.parts[r] for r in sorted(self.parts)]).amax(0)
            self.barrier.wait()
            if rank == 0:
                self.calls += 1
            return out
        return reduce


def _run_ranks(fn, n: int):
    results, errors = [None] * n, []

    def target(r):
        try:
            results[r] = fn(r)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def _cpu_backends():
    from vllm_haq.kernels.int8_gemm import _onednn_is_exact, _vllm_ops

    ops = _vllm_ops()
    usable = ops is not None and hasattr(ops, "create_onednn_scaled_mm") and _onednn_is_exact()
    return ["torch", pytest.param("onednn", marks=pytest.mark.skipif(not usable, reason="vLLM's oneDNN int8 ops "
                                                                    "are absent or inexact on this CPU"))]


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("tp", [2, 4])
def test_row_parallel_shards_quantize_with_the_unsharded_scale(tp, backend):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 256, generator=gen)
    x[:, 3] *= 20  # one outlier channel, in one shard only: per-shard scales would differ a lot
    w_q, w_s = quantize_weight_per_channel(torch.randn(64, 256, generator=gen))
    full = ScaledInt8Gemm(w_q, w_s, torch.float32, backend=backend)(x).double()
    shard = 256 // tp
    coll = MaxAllReduce(tp)

    def rank(r):
        g = ScaledInt8Gemm(w_q[:, r * shard:(r + 1) * shard].contiguous(), w_s, torch.float32, backend=backend,
                           shard_amax=coll.member(r))
        return g(x[:, r * shard:(r + 1) * shard]).double()

    summed = sum(_run_ranks(rank, tp))
    assert coll.calls == 1
    assert torch.allclose(summed, full, rtol=1e-5, atol=1e-5 * float(full.abs().max()))
    # Without the shared max each shard uses its own scale: a visibly different result.
    own = sum(ScaledInt8Gemm(w_q[:, r * shard:(r + 1) * shard].contiguous(), w_s, torch.float32, backend="torch")(
        x[:, r * shard:(r + 1) * shard]).double() for r in range(tp))
    assert float((own - full).abs().max()) > 100 * float((summed - full).abs().max())


def test_moe_intermediate_shards_add_up_to_the_unsharded_experts():
    gen = torch.Generator().manual_seed(1)
    e, h, inter, tp, m, k = 4, 64, 96, 2, 11, 2
    w1, w3, w2 = (torch.randn(e, inter, h, generator=gen), torch.randn(e, inter, h, generator=gen),
                  torch.randn(e, h, inter, generator=gen))
    x = torch.randn(m, h, generator=gen)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(m)])
    ids[0] = torch.tensor([0, 1])
    weights = torch.softmax(torch.randn(m, k, generator=gen), -1)

    def w13_gemms(rows: slice):  # w1/w3 rows are output channels: their scales are the same sharded or not
        return [ScaledInt8Gemm(*quantize_weight_per_channel(torch.cat([w1[i, rows], w3[i, rows]])), torch.float32,
                               backend="torch") for i in range(e)]

    # w2's scales are per output channel over the whole intermediate row: quantize first, then shard.
    qw2 = [quantize_weight_per_channel(w2[i]) for i in range(e)]
    full_w13 = w13_gemms(slice(None))
    full_w2 = [ScaledInt8Gemm(q, s, torch.float32, backend="torch") for q, s in qw2]
    full = int8_moe_forward(x, weights, ids, full_w13, full_w2).double()
    shard = inter // tp
    coll = MaxAllReduce(tp)

    def rank(r):
        rows = slice(r * shard, (r + 1) * shard)
        member = coll.member(r)
        w13 = w13_gemms(rows)
        w2s = [ScaledInt8Gemm(q[:, rows].contiguous(), s, torch.float32, backend="torch", shard_amax=member)
               for q, s in qw2]
        return int8_moe_forward(x, weights, ids, w13, w2s, shard_amax=member).double()

    summed = sum(_run_ranks(rank, tp))
    assert coll.calls == 1  # one exchange per step, not one per expert
    assert torch.allclose(summed, full, rtol=1e-5, atol=1e-5 * float(full.abs().max()))
