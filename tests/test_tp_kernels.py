"""Tensor-parallel int8 arithmetic without vLLM: shards of a row-parallel linear or of the experts'
intermediate dimension, each quantizing a token with the max over all shards (exchanged by a
collective, simulated here by threads meeting at a barrier), add up to the unsharded layer."""

import threading

import pytest
import torch

from vllm_haq.kernels import ScaledInt8Gemm, int8_moe_forward
from vllm_haq.offload import ExpertTensors
from vllm_haq.quant import quantize_weight_per_channel


@pytest.fixture(autouse=True)
def _thread_safe_backend(monkeypatch):
    """The ranks here are threads of one process, and vLLM's oneDNN int8 handlers (the auto backend on CPUs
    where that GEMM is exact: VNNI, AMX; vllm/_custom_ops.py 3765 create_onednn_scaled_mm, its handler in vLLM's
    csrc/cpu/dnnl_helper.cpp) share one process-wide scratchpad and primitive caches, so two rank
    threads in them at once corrupt each other: on an AVX-512 VNNI host the per-rank offload test failed in
    about one fresh process in six, and never with this package's thread-safe backend. Real ranks are
    processes, each with its own oneDNN state; the arithmetic under test is the same on both backends."""
    monkeypatch.setenv("HAQ_INT8_BACKEND", "torch")


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
    """torch, and vLLM's oneDNN wherever its arithmetic is known: exact (VNNI/AMX) or int16-saturating (AVX2).
    Saturation happens per adjacent pair of K; shards of whole pairs keep every pair, so the shards still add
    up to the unsharded product."""
    from vllm_haq.kernels.int8_gemm import ONEDNN_EXACT, ONEDNN_SATURATING, onednn_int8_arithmetic

    arithmetic = onednn_int8_arithmetic()
    usable = arithmetic in (ONEDNN_EXACT, ONEDNN_SATURATING)
    return ["torch", pytest.param("onednn", marks=pytest.mark.skipif(
        not usable, reason=f"vLLM's oneDNN int8 GEMM is {arithmetic} on this CPU (None: absent)"))]


def test_a_shard_gemm_keeps_its_weight_as_loaded():
    """The all-shard max enters through quantization, not an extra input column: K stays what it was
    (torch._int_mm needs K % 8 == 0) and the weight is a view of the layer's parameter, not a second copy."""
    w_q, w_s = quantize_weight_per_channel(torch.randn(64, 128))
    gemm = ScaledInt8Gemm(w_q, w_s, torch.float32, backend="torch", shard_amax=lambda a: a)
    assert gemm.k == 128 and gemm.w_t.data_ptr() == w_q.data_ptr()


@pytest.mark.parametrize("rotation", [None, 32], ids=["unrotated", "rotated"])
@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("tp", [2, 4])
def test_row_parallel_shards_quantize_with_the_unsharded_scale(tp, backend, rotation):
    """(rotated: blocks of 32 never straddle the shards, and each shard's max is taken after its rotation)"""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 256, generator=gen)
    x[:, 3] *= 20  # one outlier channel, in one shard only: per-shard scales would differ a lot
    w_q, w_s = quantize_weight_per_channel(torch.randn(64, 256, generator=gen))
    full = ScaledInt8Gemm(w_q, w_s, torch.float32, backend=backend, rotation=rotation)(x).double()
    shard = 256 // tp
    coll = MaxAllReduce(tp)

    def gemm(r, shard_amax):
        return ScaledInt8Gemm(w_q[:, r * shard:(r + 1) * shard].contiguous(), w_s, torch.float32, backend=backend,
                              shard_amax=shard_amax, rotation=rotation)

    if backend == "onednn":  # one process-wide oneDNN state (see _thread_safe_backend): ranks one after another,
        xs = [x[:, r * shard:(r + 1) * shard] for r in range(tp)]  # the shared max exchanged between the passes
        top = torch.stack([gemm(r, lambda a: a).token_amax(xs[r]) for r in range(tp)]).amax(0)
        summed = sum(gemm(r, lambda a: torch.maximum(a, top))(xs[r]).double() for r in range(tp))
    else:
        summed = sum(_run_ranks(lambda r: gemm(r, coll.member(r))(x[:, r * shard:(r + 1) * shard]).double(), tp))
        assert coll.calls == 1
    assert torch.allclose(summed, full, rtol=1e-5, atol=1e-5 * float(full.abs().max()))
    # Without the shared max each shard uses its own scale: a visibly different result.
    own = sum(ScaledInt8Gemm(w_q[:, r * shard:(r + 1) * shard].contiguous(), w_s, torch.float32, backend="torch",
                             rotation=rotation)(x[:, r * shard:(r + 1) * shard]).double() for r in range(tp))
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


def _shard_experts(full: ExpertTensors, r: int, tp: int) -> ExpertTensors:
    """Rank ``r``'s experts as vLLM loads them: w1/w3 rows and w2 columns of the intermediate dimension
    (w2's per-output-channel scales, taken over the whole row, are replicated)."""
    inter = full.w2.shape[2]
    rows = slice(r * inter // tp, (r + 1) * inter // tp)

    def w13_rows(t):
        return torch.cat([t[:, :inter][:, rows], t[:, inter:][:, rows]], dim=1).contiguous()

    return ExpertTensors(w13_rows(full.w13), w13_rows(full.w13_scale), full.w2[:, :, rows].contiguous(),
                         full.w2_scale.clone(), None if full.smooth is None else full.smooth.clone(),
                         full.down_rotation)  # blocks of 16 never straddle the shards of 48


@pytest.mark.parametrize("budget", [{"policy": "lru", "slots_per_layer": 1},  # waves reuse the one slot
                                    {"policy": "static", "slots_per_layer": 0},  # every expert a CPU job
                                    {"policy": "haq", "expert_fraction": 0.5, "prefetch": "always"}])
def test_offload_engine_per_rank_adds_up_to_the_unsharded_experts(budget):
    """Each rank runs its own offload engine on its shards (its own cache); the ranks' outputs add up to
    the unsharded all-resident MoE, with one all-shard exchange per layer and step (layer 1's experts have
    explicit smoothing, layer 2's a rotated down-projection input)."""
    from vllm_haq.offload import OffloadConfig, OffloadEngine
    from vllm_haq.offload.cost import CostModel

    e, h, inter, tp, k, layers, steps = 8, 64, 96, 2, 2, 3, 6
    gen = torch.Generator().manual_seed(5)

    def experts(smooth: bool, down_rotation: int | None) -> ExpertTensors:
        w13 = [quantize_weight_per_channel(torch.randn(2 * inter, h, generator=gen)) for _ in range(e)]
        w2 = [quantize_weight_per_channel(torch.randn(h, inter, generator=gen)) for _ in range(e)]
        return ExpertTensors(torch.stack([q for q, _ in w13]), torch.stack([s for _, s in w13]).float(),
                             torch.stack([q for q, _ in w2]), torch.stack([s for _, s in w2]).float(),
                             torch.rand(e, h, generator=gen) + 0.5 if smooth else None, down_rotation)

    full = [experts(smooth=(i == 1), down_rotation=16 if i == 2 else None) for i in range(layers)]
    trace = []
    for step in range(steps):
        m = 1 if step % 2 else 7  # decode-like and prefill-like steps
        ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(m)]).int()
        trace.append((torch.randn(m, h, generator=gen), ids,
                      [torch.softmax(torch.randn(m, k, generator=gen), -1) for _ in range(layers)]))
    coll = MaxAllReduce(tp)
    cost = CostModel(h2d_bytes_per_s=1e12, expert_bytes=19_000, cpu_overhead_s=1e-3, cpu_s_per_token=1e-4)

    def rank(r):
        engine = OffloadEngine(OffloadConfig(**budget), "cpu", torch.float32, cost=cost, shard_amax=coll.member(r))
        for i in range(layers):
            engine.add_layer(i, _shard_experts(full[i], r, tp))
        outs = [[engine.forward(i, x, w[i], ids).double() for i in range(layers)] for x, ids, w in trace]
        stats = engine.stats()
        engine.close()
        return outs, stats

    (outs0, stats0), (outs1, stats1) = _run_ranks(rank, tp)
    assert coll.calls == layers * steps  # one exchange per layer and step, whatever each rank served where
    for s, (x, ids, w) in enumerate(trace):
        for i in range(layers):
            g13, g2 = zip(*(full[i].gemms(j, torch.float32) for j in range(e)))
            want = int8_moe_forward(x, w[i], ids, list(g13), list(g2)).double()
            got = outs0[s][i] + outs1[s][i]
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max())), (s, i)
    for stats in (stats0, stats1):  # each rank's own cache holds its shards: half an unsharded expert each
        assert stats["misses"] > 0
        assert stats["expert_bytes"] < full[1].expert_bytes() * 0.6
        assert stats["device_cache_bytes"] <= stats["slots"] * stats["expert_bytes"]
    if budget["policy"] == "lru":
        assert stats0["fetches"] > layers * steps  # more routed experts than slots: later waves reuse the slot
    if budget["policy"] == "static":
        assert stats0["cpu_experts"] == stats0["misses"]
