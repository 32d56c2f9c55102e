"""The Triton kernels (vllm_haq.kernels.triton_*) against float64 references of the same int8 arithmetic.

On CUDA the checks run in this process. Without a GPU they run in Triton's
interpreter in ONE child process whose environment alone has TRITON_INTERPRET=1:
Triton fixes a kernel as compiled or interpreted when its module is imported
(and its own standard library at Triton's first import), and kernels imported
under the variable fail to launch once it is removed (Triton 3.9 asserts in its
lazily imported gluon module). Setting it here would therefore either fail (vLLM
imported Triton earlier in the session) or leak into the vLLM engine processes
that later tests start.

Every check draws fresh random inputs (its seed is in the failure message),
poisons every tensor the kernels allocate (NaN, or -128 for int8, which
quantization never produces) so unwritten elements fail, and uses small shapes:
the interpreter runs a kernel program as numpy code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from vllm_haq.quant import (
    int8_matmul_reference,
    quantize_per_token,
    quantize_weight_per_channel,
    w8a8_linear_reference,
)
from vllm_haq.quant.rotation import rotate

ON_CUDA = torch.cuda.is_available()
REL_TOL = 1e-3


# ---------------------------------------------------------------- helpers (both processes)

def _rel_err(got: torch.Tensor, ref: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> float:
    """max |got - ref| / max |ref|, after forgiving the final cast of each output to a 16-bit float.

    A full ulp (eps * |ref|) is forgiven, not half: Triton 3.9's interpreter truncates
    float32 -> bfloat16 where CUDA rounds to nearest.
    """
    got, ref = got.double().cpu(), ref.double().cpu()
    err = (got - ref).abs()
    if out_dtype != torch.float32:
        err = (err - torch.finfo(out_dtype).eps * ref.abs()).clamp(min=0)
    return float(err.max() / ref.abs().max().clamp(min=1e-30))


@contextlib.contextmanager
def _poisoned_allocations():
    """Every torch.empty inside the block comes back filled with NaN / -128 / int32 sentinels."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            return t.fill_(float("nan"))
        return t.fill_(-128 if t.dtype == torch.int8 else -(2 ** 30))

    with mock.patch("torch.empty", poisoned):
        yield


def _moe_reference(x, weights, ids, expert_to_slot, experts13, experts2, inter, out_init, down_rotation=None):
    """float64 per-route loop of int8_moe_forward's arithmetic (float32 GEMM outputs), resident experts only.

    Also returns, per token, how far the output may move when the kernel rounds a down projection's input the
    other way: an element of the (rotated) SwiGLU output that lies within float32 noise of a rounding tie can
    quantize to either neighbour, since the kernel's Hadamard and SiLU sum in another order (about 1 seed in
    170 hit one). Each such element may shift the row by its step times its weight column; every other element
    must agree, so the bound stays 0 and the comparison strict where no element is near a tie.
    """
    ref = out_init.double().clone()
    slack = torch.zeros(x.shape[0], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if int(expert_to_slot[e]) < 0:
                continue
            gate_up = w8a8_linear_reference(x[t : t + 1].float(), *experts13[e])
            h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
            ref[t] += float(weights[t, j]) * w8a8_linear_reference(h, *experts2[e], rotation=down_rotation)[0].double()
            slack[t] += float(weights[t, j]) * _tie_slack(h, *experts2[e], down_rotation)
    return ref, slack


def _tie_slack(h, w_q, w_scale, rotation):
    """Largest output change if every element of quantize_input(h)'s input near a .5 tie rounds the other way."""
    v = (rotate(h, rotation) if rotation else h).double()[0]
    step = v.abs().max() / 127
    near_tie = ((v / step).abs().frac() - 0.5).abs() < 1e-3
    w = w_q.double() * w_scale.double().reshape(-1, 1)
    return float(step * w[:, near_tie].abs().sum(1).max()) if near_tie.any() else 0.0


# ---------------------------------------------------------------- checks (run on "cuda" or in the interpreter)

def check_quant_matches_quantize_per_token(device, dtype, smooth, cols):
    from vllm_haq.kernels.triton_quant import triton_quantize_per_token

    x = (torch.randn(9, cols) * torch.logspace(-3, 2, 9).unsqueeze(1)).to(dtype)
    x[3] = 0  # zero row: the clamped amax must give scale 1e-8/127, not NaN
    # exact .5 ties: amax 127 makes the scale exactly 1.0, so x / scale = k + 0.5
    x[4] = (torch.randint(-126, 126, (cols,)) + 0.5).to(dtype)
    x[4, 0] = 127.0
    s = None
    if smooth:
        s = torch.rand(cols) * 1.5 + 0.5
        s[: cols // 2] = 1.0  # row 4 keeps its ties in the unsmoothed half ...
        x[4, cols // 2 :] /= 4  # ... and its amax of 127
    with _poisoned_allocations():
        q, scale = triton_quantize_per_token(x.to(device), None if s is None else s.to(device))
    ref_q, ref_scale = quantize_per_token(x, s)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (9, 1)
    # bit-exact, ties included: div_rn and round-half-even do what torch does in float32
    mismatches = int((q.cpu() != ref_q).sum())
    assert mismatches == 0, f"{mismatches} int8 values differ from quantize_per_token"
    assert torch.equal(scale.cpu(), ref_scale), "scales differ from quantize_per_token"


def check_gemm(device, m, bias, out_dtype, n=97, k=300, smooth=False, config=None):
    from vllm_haq.kernels.triton_gemm import GemmConfig, triton_w8a8_linear

    w_q, w_scale = quantize_weight_per_channel(torch.randn(n, k))
    x = (torch.randn(m, k) * 3).to(out_dtype)
    b = torch.randn(n).to(out_dtype) if bias else None
    s = torch.rand(k) + 0.5 if smooth else None
    cfg = GemmConfig(*config) if config else None
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    with _poisoned_allocations():
        y = triton_w8a8_linear(on(x), on(w_q), on(w_scale), on(b), on(s), config=cfg)
    assert y.dtype == out_dtype and y.shape == (m, n)
    ref = w8a8_linear_reference(x.float(), w_q, w_scale, None if b is None else b.float(), s)
    assert torch.isfinite(y).all(), "unwritten (NaN) outputs"
    assert _rel_err(y, ref, out_dtype) <= REL_TOL


def check_gemm_full_range_int8(device):
    """Full-range int8 operands (|acc| near 2**22) through the bare scaled GEMM, tiles on every edge."""
    from vllm_haq.kernels.triton_gemm import GemmConfig, triton_scaled_int8_mm

    m, n, k = 33, 45, 260
    x_q = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    x_q[0], w_q[0] = 127, 127
    x_s, w_s = torch.rand(m, 1) + 0.01, torch.rand(n, 1) + 0.01
    with _poisoned_allocations():
        y = triton_scaled_int8_mm(x_q.to(device), x_s.to(device), w_q.to(device), w_s.to(device),
                                  out_dtype=torch.float32, config=GemmConfig(16, 16, 64, group_m=2))
    assert _rel_err(y, int8_matmul_reference(x_q, x_s, w_q, w_s)) <= 1e-6


def check_scaled_int8_gemm_dispatches_to_triton(device):
    from vllm_haq.kernels import ScaledInt8Gemm

    w_q, w_scale = quantize_weight_per_channel(torch.randn(40, 72))
    s = torch.rand(72) + 0.5
    x, b = torch.randn(2, 3, 72), torch.randn(40)
    gemm = ScaledInt8Gemm(w_q.to(device), w_scale.to(device), torch.float32, smooth=s.to(device), backend="triton")
    with _poisoned_allocations():
        y = gemm(x.to(device), b.to(device))
    assert gemm.backend == "triton" and y.shape == (2, 3, 40)
    assert _rel_err(y, w8a8_linear_reference(x, w_q, w_scale, b, s)) <= REL_TOL


def check_shard_gemm_quantizes_with_the_given_max(device):
    """A tensor-parallel shard (shard_amax) on the Triton backend: quantized with the all-shard max, the weight
    used as loaded (no extra column, no copy), the torch backend's result."""
    from vllm_haq.kernels import ScaledInt8Gemm

    w_q, w_scale = quantize_weight_per_channel(torch.randn(40, 64))
    x = torch.randn(5, 64)
    wide = x.abs().amax(-1, keepdim=True) * torch.tensor([[1.0], [3.0], [1.5], [8.0], [1.0]])  # other shards' max
    ref = ScaledInt8Gemm(w_q, w_scale, torch.float32, backend="torch", shard_amax=lambda a: wide)(x)
    w_dev = w_q.to(device)
    gemm = ScaledInt8Gemm(w_dev, w_scale.to(device), torch.float32, backend="triton",
                          shard_amax=lambda a: wide.to(device))
    assert gemm.k == 64 and gemm.w_q.data_ptr() == w_dev.data_ptr(), "the shard's weight was copied or widened"
    with _poisoned_allocations():
        y = gemm(x.to(device))
    # the same float32 epilogue order; on CUDA the compiler may contract it into FMAs
    assert torch.equal(y.cpu(), ref) if device == "cpu" else _rel_err(y, ref) <= REL_TOL


def check_moe(device, m, top_k=2, holes=True, accumulate=True, x_dtype=torch.bfloat16, config=None, inter=40,
              down_rotation=None, host_routing=False):
    """Ragged groups, experts without tokens, non-resident experts (slot -1), accumulation into ``out``, the
    down projections' input rotated (``w2`` holds W R); ``host_routing``: the rows aligned on the host, as the
    offload engine passes them."""
    from vllm_haq.kernels import triton_int8_moe_forward
    from vllm_haq.kernels.triton_gemm import GemmConfig

    num_experts, hidden = 7, 48
    experts13 = [quantize_weight_per_channel(torch.randn(2 * inter, hidden)) for _ in range(num_experts)]
    experts2 = [quantize_weight_per_channel(torch.randn(hidden, inter)) for _ in range(num_experts)]
    # slots in a shuffled order; with holes, experts 1 and 4 are not resident
    resident = [e for e in range(num_experts) if not (holes and e in (1, 4))]
    slot_order = [resident[i] for i in torch.randperm(len(resident)).tolist()]
    expert_to_slot = torch.full((num_experts,), -1, dtype=torch.int32)
    for slot, e in enumerate(slot_order):
        expert_to_slot[e] = slot
    w13 = torch.stack([experts13[e][0] for e in slot_order])
    w13_scale = torch.stack([experts13[e][1] for e in slot_order])
    w2 = torch.stack([experts2[e][0] for e in slot_order])
    w2_scale = torch.stack([experts2[e][1] for e in slot_order])

    x = torch.randn(m, hidden).to(x_dtype)
    # experts 5 and 6 never chosen; skewed choice makes ragged groups
    ids = torch.multinomial(torch.tensor([8.0, 4, 3, 2, 1, 0, 0]), top_k * m, replacement=True).view(m, top_k)
    if top_k > 1:  # distinct experts per token, as a router gives
        ids[:, 1] = (ids[:, 0] + 1 + torch.randint(0, 3, (m,))) % 5
    if holes:
        ids[0] = torch.tensor([1, 4] + [1] * (top_k - 2))[:top_k]  # token 0: no resident expert at all
    weights = torch.softmax(torch.randn(m, top_k), -1)
    out_init = torch.randn(m, hidden) if accumulate else torch.zeros(m, hidden)
    cfg = GemmConfig(*config) if config else None
    out = out_init.clone().to(device) if accumulate else None
    with _poisoned_allocations():
        got = triton_int8_moe_forward(x.to(device), weights.to(device), ids.int().to(device), expert_to_slot.to(device),
                                      w13.to(device), w13_scale.to(device), w2.to(device), w2_scale.to(device),
                                      out=out, config=cfg, down_rotation=down_rotation,
                                      host_routing=(ids, expert_to_slot.tolist()) if host_routing else None)
    if accumulate:
        assert got.data_ptr() == out.data_ptr(), "must accumulate into the given output"
    ref, slack = _moe_reference(x, weights, ids, expert_to_slot, experts13, experts2, inter, out_init,
                                down_rotation)
    assert got.dtype == torch.float32 and torch.isfinite(got).all(), "unwritten (NaN) outputs"
    err = (got.double().cpu() - ref).abs().amax(-1)
    bound = REL_TOL * ref.abs().max() + slack
    assert (err <= bound).all(), f"rows {(err > bound).nonzero().flatten().tolist()}: {_rel_err(got, ref):.2e}"
    if holes:  # skipped routes contribute nothing, bit for bit
        assert torch.equal(got[0].cpu(), out_init[0])


def check_moe_fused_x_quantization(device):
    """At decode the w13 kernel quantizes x itself: the same bits as quantizing it in its own launch first."""
    from vllm_haq.kernels import triton_moe

    m, hidden, inter, experts = 5, 200, 40, 4
    w13 = torch.randint(-127, 128, (experts, 2 * inter, hidden), dtype=torch.int8)
    w2 = torch.randint(-127, 128, (experts, hidden, inter), dtype=torch.int8)
    s13, s2 = torch.rand(experts, 2 * inter, 1) * 1e-3, torch.rand(experts, hidden, 1) * 1e-3
    x = (torch.randn(m, hidden) * torch.logspace(-2, 2, m).unsqueeze(1)).to(torch.bfloat16)  # unlike scales
    ids = torch.stack([torch.randperm(experts)[:2] for _ in range(m)]).int()
    args = [t.to(device) for t in (x, torch.rand(m, 2), ids, torch.arange(experts, dtype=torch.int32), w13, s13,
                                   w2, s2)]
    fused = triton_moe.triton_int8_moe_forward(*args)
    limit = triton_moe.QUANTIZE_IN_W13_TOKENS
    triton_moe.QUANTIZE_IN_W13_TOKENS = 0
    try:
        separate = triton_moe.triton_int8_moe_forward(*args)
    finally:
        triton_moe.QUANTIZE_IN_W13_TOKENS = limit
    assert m <= limit and torch.equal(fused, separate), float((fused - separate).abs().max())


def check_moe_nothing_resident_leaves_out_unchanged(device):
    from vllm_haq.kernels import triton_int8_moe_forward

    m, hidden, inter = 3, 32, 32
    out_init = torch.randn(m, hidden)
    w13 = torch.randint(-127, 128, (2, 2 * inter, hidden), dtype=torch.int8)
    w2 = torch.randint(-127, 128, (2, hidden, inter), dtype=torch.int8)
    ones = lambda *shape: torch.ones(*shape, device=device)  # noqa: E731
    ids = torch.zeros(m, 2, dtype=torch.int32, device=device)  # every route to expert 0, which has no slot
    expert_to_slot = torch.tensor([-1, -1, 0, 1], dtype=torch.int32, device=device)
    got = triton_int8_moe_forward(torch.randn(m, hidden, device=device), ones(m, 2), ids, expert_to_slot,
                                  w13.to(device), ones(2, 2 * inter, 1), w2.to(device), ones(2, hidden, 1),
                                  out=out_init.clone().to(device))
    assert torch.equal(got.cpu(), out_init)


def check_compiled_linear_chooses_its_tile_per_call(device):
    """Under torch.compile with dynamic M and vLLM's guard-free mode, the tile still follows each call's M.

    vLLM compiles once (traced at its profiling batch size) and drops every guard; a linear traced into
    would keep that trace's tile for decode. The op must stay opaque in the graph, compile once for both
    sizes, and choose the decode tile at M = 1.
    """
    from vllm_haq.kernels import triton_gemm

    w_q, w_scale = quantize_weight_per_channel(torch.randn(48, 64))
    w_q, w_scale = w_q.to(device), w_scale.to(device)
    graphs, seen_m = [], []
    real_config = triton_gemm.gemm_config

    def spy(m, n, k):
        seen_m.append(int(m))
        return real_config(m, n, k)

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fn = torch.compile(lambda x: triton_gemm.triton_w8a8_linear(x, w_q, w_scale, out_dtype=torch.float32),
                       backend=backend, dynamic=True, fullgraph=True,
                       options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe})
    with mock.patch.object(triton_gemm, "gemm_config", spy):
        for m in (64, 1):
            x = torch.randn(m, 64, device=device)
            ref = w8a8_linear_reference(x.float().cpu(), w_q.cpu(), w_scale.cpu())
            assert _rel_err(fn(x), ref) <= REL_TOL, f"M={m}: compiled output differs from the reference"
    ops = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert len(graphs) == 1, f"compiled {len(graphs)} graphs for two sizes (expected one, guard-free)"
    assert any("vllm_haq.triton_w8a8_linear" in o for o in ops), f"the linear is not one opaque op: {ops}"
    assert seen_m == [64, 1], f"gemm_config saw M = {seen_m}, expected each call's M (64, then 1)"


def check_engine_hits_in_one_triton_launch(device):
    """The offload engine's CUDA hit path: every ready slot of a step in one fused Triton MoE launch (cache
    slots in any order, misses fetched in waves or left to the CPU), the all-resident result within tolerance.
    Without a GPU the engine runs on the CPU and the Triton path is selected by hand."""
    from vllm_haq.kernels import int8_moe_forward
    from vllm_haq.offload import ExpertTensors, OffloadConfig, OffloadEngine

    experts, hidden, inter, top_k = 6, 32, 32, 2
    q13 = [quantize_weight_per_channel(torch.randn(2 * inter, hidden)) for _ in range(experts)]
    q2 = [quantize_weight_per_channel(torch.randn(hidden, inter)) for _ in range(experts)]
    host = ExpertTensors(torch.stack([q for q, _ in q13]), torch.stack([s for _, s in q13]),
                         torch.stack([q for q, _ in q2]), torch.stack([s for _, s in q2]))
    g13, g2 = zip(*(host.gemms(e, torch.float32, backend="torch") for e in range(experts)))
    for policy in ("lru", "haq"):
        engine = OffloadEngine(OffloadConfig(policy=policy, slots_per_layer=3), device, torch.float32)
        engine.add_layer(0, host)
        engine._start()
        engine.slot_kernel = "triton"
        for step in range(6):
            m = 1 + step % 3
            ids = torch.stack([torch.randperm(experts)[:top_k] for _ in range(m)]).int()
            x, w = torch.randn(m, hidden), torch.softmax(torch.randn(m, top_k), -1)
            got = engine.forward(0, x.to(device), w.to(device), ids.to(device))
            ref = int8_moe_forward(x, w, ids, list(g13), list(g2))
            assert _rel_err(got, ref) <= REL_TOL, f"{policy} step {step}: {_rel_err(got, ref):.2e}"
        assert engine.stats()["hits"] > 0, "no hit was served by the Triton launch"
        engine.close()


def _cases():
    cases = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for smooth in (False, True):
            cases[f"quant-{str(dtype)[6:]}-{'smooth' if smooth else 'plain'}"] = (
                check_quant_matches_quantize_per_token, dict(dtype=dtype, smooth=smooth, cols=300))
    cases["quant-two-sweep-row-20000"] = (check_quant_matches_quantize_per_token,
                                          dict(dtype=torch.bfloat16, smooth=True, cols=20000))
    for m in (1, 5, 17, 64):
        for bias in (False, True):
            for out_dtype in (torch.float32, torch.bfloat16):
                cases[f"gemm-m{m}-{'bias' if bias else 'nobias'}-{str(out_dtype)[6:]}"] = (
                    check_gemm, dict(m=m, bias=bias, out_dtype=out_dtype))
    cases["gemm-m64-fp16-smooth-small-tiles"] = (check_gemm, dict(m=64, bias=True, out_dtype=torch.float16, smooth=True,
                                                                  config=(16, 32, 64, 2)))
    cases["gemm-full-range-int8"] = (check_gemm_full_range_int8, {})
    cases["scaled-int8-gemm-triton-backend"] = (check_scaled_int8_gemm_dispatches_to_triton, {})
    cases["shard-gemm-given-max"] = (check_shard_gemm_quantizes_with_the_given_max, {})
    cases["compiled-linear-tile-per-call"] = (check_compiled_linear_chooses_its_tile_per_call, {})
    cases["moe-decode-m1"] = (check_moe, dict(m=1, holes=False))
    cases["moe-decode-m6-holes"] = (check_moe, dict(m=6))
    cases["moe-prefill-m37-holes-fp32-x"] = (check_moe, dict(m=37, x_dtype=torch.float32))
    cases["moe-m37-small-blocks-no-out"] = (check_moe, dict(m=37, accumulate=False, config=(16, 32, 32)))
    cases["moe-k1-holes"] = (check_moe, dict(m=9, top_k=1))
    cases["moe-m17-down-rotation"] = (check_moe, dict(m=17, inter=64, down_rotation=32))
    cases["moe-decode-m6-holes-host-aligned"] = (check_moe, dict(m=6, host_routing=True))
    cases["moe-prefill-m300-host-aligned"] = (check_moe, dict(m=300, host_routing=True, accumulate=False))
    cases["moe-x-quantized-in-w13-same-bits"] = (check_moe_fused_x_quantization, {})
    cases["moe-nothing-resident"] = (check_moe_nothing_resident_leaves_out_unchanged, {})
    cases["engine-hits-one-triton-launch"] = (check_engine_hits_in_one_triton_launch, {})
    return cases


CASES = _cases()


def _run_case(name: str, device: str) -> None:
    fn, kwargs = CASES[name]
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    try:
        fn(device, **kwargs)
    except BaseException as exc:
        raise AssertionError(f"{name} (torch seed {seed}): {exc}") from exc


# ---------------------------------------------------------------- the interpreter child

def _child_main(out_path: str) -> None:
    """Run every case in the interpreter; write {name: null | traceback, "__seconds__": {...}} to out_path."""
    import vllm_haq.kernels  # noqa: F401 (must not import the Triton modules yet)

    results = {"lazy-import": None}
    eager = sorted(m for m in sys.modules if m.startswith("vllm_haq.kernels.triton"))
    if eager:
        results["lazy-import"] = f"importing vllm_haq.kernels imported {eager}"
    seconds = {}
    for name in CASES:
        start = time.perf_counter()
        try:
            _run_case(name, "cpu")
            results[name] = None
        except BaseException:  # noqa: BLE001 - report every failure, keep going
            results[name] = traceback.format_exc(limit=-6)
        seconds[name] = round(time.perf_counter() - start, 2)
    results["__seconds__"] = seconds
    with open(out_path, "w") as f:
        json.dump(results, f)


def _interpreter_results(tmp_dir: str) -> dict:
    out_path = os.path.join(tmp_dir, "triton_interpreter_results.json")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--interpreter-child", out_path],
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not os.path.exists(out_path):
        raise AssertionError(f"interpreter child failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    with open(out_path) as f:
        results = json.load(f)
    logging.getLogger(__name__).info("interpreter seconds per case: %s", results["__seconds__"])
    return results


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    if ON_CUDA:
        return None
    return _interpreter_results(str(tmp_path_factory.mktemp("triton")))


def _compile_child() -> None:
    """Compile every kernel for sm_90 ahead of time (no GPU needed); print what the PTX says as JSON.

    The interpreter runs kernels as numpy and accepts programs the compiler rejects;
    this catches those, and checks properties the numerics and speed rely on.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vllm_haq.kernels import triton_gemm, triton_moe, triton_quant

    def ptx(fn, types, constexprs, num_warps, num_stages=3):
        sig = {a: types.get(a, "i32" if a in types.get("__ints__", ()) else "constexpr") for a in fn.arg_names}
        # what a JIT launch specializes on: 16-byte aligned pointers, strides and widths divisible by 16
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if sig[a].startswith("*") or (sig[a] == "i32" and a not in ("M", "num_routes", "top_k"))}
        src = ASTSource(fn, sig, constexprs, attrs)
        return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages}).asm["ptx"]

    out = {}
    ints = ("n_cols", "stride_x_row", "stride_q_row")
    for one_sweep in (True, False):
        text = ptx(triton_quant._quant_per_token_kernel,
                   {"x_ptr": "*bf16", "smooth_ptr": "*fp32", "q_ptr": "*i8", "scale_ptr": "*fp32", "__ints__": ints},
                   {"HAS_SMOOTH": True, "BLOCK": 16384 if one_sweep else 4096, "ONE_SWEEP": one_sweep,
                    "INT8_LIMIT": 127.0, "MIN_AMAX": 1e-8}, num_warps=16 if one_sweep else 8)
        out[f"quant-one-sweep-{one_sweep}"] = {"div.full": text.count("div.full"), "div.rn": text.count("div.rn.f32")}
    ints = ("M", "N", "K", "stride_am", "stride_bn", "stride_cm")
    for m in (1, 64, 4096):
        cfg = triton_gemm.gemm_config(m, 14336, 4096)
        text = ptx(triton_gemm._scaled_int8_mm_kernel,
                   {"a_ptr": "*i8", "b_ptr": "*i8", "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32", "bias_ptr": "*bf16",
                    "c_ptr": "*bf16", "__ints__": ints},
                   {"HAS_BIAS": True, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                    "GROUP_M": cfg.group_m}, cfg.num_warps, cfg.num_stages)
        out[f"gemm-m{m}"] = {"block_m": cfg.block_m, "wgmma": "wgmma" in text, "cp.async": "cp.async" in text}
    for m in (1, 4096):
        cfg = triton_moe.moe_config(m)
        consts = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k}
        w13_consts = {**consts, "QUANTIZE_X": m <= triton_moe.QUANTIZE_IN_W13_TOKENS, "INT8_LIMIT": 127.0,
                      "MIN_AMAX": 1e-8, "LIBDEVICE_EXP": True}
        ptrs = {"route_of_row_ptr": "*i32", "slot_of_block_ptr": "*i32"}
        text = ptx(triton_moe._moe_w13_swiglu_kernel,
                   {"xq_ptr": "*bf16" if w13_consts["QUANTIZE_X"] else "*i8", "xs_ptr": "*fp32", "w_ptr": "*i8",
                    "ws_ptr": "*fp32", "h_ptr": "*fp32", **ptrs,
                    "__ints__": ("num_routes", "top_k", "inter", "hidden", "stride_xm", "stride_w_slot", "stride_wn",
                                 "stride_ws_slot", "stride_hm")}, w13_consts, cfg.num_warps, cfg.num_stages)
        out[f"moe-w13-m{m}"] = {"block_m": cfg.block_m, "wgmma": "wgmma" in text, "cp.async": "cp.async" in text}
        if w13_consts["QUANTIZE_X"]:  # x quantized in the kernel: exact divisions, as in the quant kernel
            out[f"moe-w13-m{m}"].update({"div.full": text.count("div.full"), "div.rn": text.count("div.rn.f32")})
        text = ptx(triton_moe._moe_w2_kernel,
                   {"hq_ptr": "*i8", "hs_ptr": "*fp32", "w_ptr": "*i8", "ws_ptr": "*fp32", "topk_weights_ptr": "*fp32",
                    "route_out_ptr": "*fp32", **ptrs,
                    "__ints__": ("num_routes", "hidden", "inter", "stride_hm", "stride_w_slot", "stride_wn",
                                 "stride_ws_slot", "stride_om")}, consts, cfg.num_warps, cfg.num_stages)
        out[f"moe-w2-m{m}"] = {"block_m": cfg.block_m, "wgmma": "wgmma" in text, "cp.async": "cp.async" in text}
    ptx(triton_moe._moe_sum_routes_kernel,
        {"route_out_ptr": "*fp32", "slot_of_route_ptr": "*i64", "out_ptr": "*fp32",
         "__ints__": ("hidden", "stride_rm", "stride_om")}, {"TOP_K": 2, "BLOCK": 1024}, num_warps=4)
    print(json.dumps(out))


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("name", list(CASES))
def test_triton_kernel(name, interpreter_results):
    if ON_CUDA:
        _run_case(name, "cuda")
        return
    failure = interpreter_results[name]
    if failure is not None:
        pytest.fail(f"in the Triton interpreter (child process):\n{failure}", pytrace=False)


@pytest.mark.parametrize("m,top_k,experts,slots,block_m", [(1, 2, 8, 2, 16), (5, 2, 8, 8, 16), (16, 8, 128, 32, 16),
                                                           (3, 6, 64, 0, 16), (200, 2, 8, 3, 64), (40, 8, 16, 16, 4)])
def test_host_alignment_gives_the_device_rows(m, top_k, experts, slots, block_m):
    """The offload engine aligns the Triton MoE's rows on the host (its routing is there already): the same
    three arrays as the torch version, in the plain-Python range and above it."""
    from vllm_haq.kernels.triton_moe import align_routes, align_routes_host

    g = torch.Generator().manual_seed(m * 131 + experts)
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(m)])
    slot_of = [-1] * experts
    for s, e in enumerate(torch.randperm(experts, generator=g)[:slots].tolist()):
        slot_of[e] = s
    want = align_routes(ids, torch.tensor(slot_of, dtype=torch.int32), max(slots, 1), block_m)
    got = align_routes_host(ids, slot_of, max(slots, 1), block_m, torch.device("cpu"))
    for name, w, h in zip(("route_of_row", "slot_of_block", "slot_of_route"), want, got):
        assert h.dtype == torch.int32 and torch.equal(h.long(), w.long()), name


def test_importing_the_kernels_package_does_not_import_triton_kernels(interpreter_results):
    if ON_CUDA:
        code = ("import sys, vllm_haq.kernels; "
                "bad = [m for m in sys.modules if m.startswith('vllm_haq.kernels.triton')]; assert not bad, bad")
        subprocess.run([sys.executable, "-c", code], check=True)
        return
    assert interpreter_results["lazy-import"] is None, interpreter_results["lazy-import"]


def test_this_process_never_sets_triton_interpret():
    assert "TRITON_INTERPRET" not in os.environ or ON_CUDA


def test_kernels_compile_for_hopper():
    """sm_90 ahead-of-time compilation (no GPU needed): exact division in quant, pipelined loads, wgmma tiles."""
    import triton

    if not os.path.isdir(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia")):
        pytest.skip("this Triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")  # silence Triton 3.9's notice
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--compile-child"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ptx = json.loads(proc.stdout.strip().splitlines()[-1])
    for variant in ("quant-one-sweep-True", "quant-one-sweep-False", "moe-w13-m1"):
        # an approximate division (Triton's plain / on float32) would break bit-exactness with torch
        assert ptx[variant]["div.full"] == 0 and ptx[variant]["div.rn"] > 0, ptx[variant]
    for name, info in ptx.items():
        if not name.startswith("quant"):
            assert info["cp.async"], f"{name}: loads are not pipelined"
            assert info["wgmma"] == (info["block_m"] >= 64), f"{name}: expected wgmma exactly for 64+ row tiles"


def test_auto_backend_on_cuda_is_vllms_cutlass_where_a_layer_fits_else_triton(monkeypatch):
    """vLLM's CUTLASS GEMM (what its own W8A8 runs and tests) for linears it serves as they are; Triton for
    fused smoothing, shapes/dtypes CUTLASS refuses, and the MoE's per-slot GEMMs; unchanged on CPU."""
    from vllm_haq.kernels import int8_gemm

    fits = int8_gemm.cutlass_fits
    assert fits(4096, 14336, torch.bfloat16, smooth=False) and fits(48, 64, torch.float16, smooth=False)
    assert not fits(4096, 4096, torch.bfloat16, smooth=True)  # smoothing fused into Triton's quantization
    assert not fits(4096, 4096, torch.float32, smooth=False)  # cutlass_scaled_mm asserts a 16-bit output
    assert not fits(4104 - 1, 4096, torch.bfloat16, smooth=False)  # vLLM would fall back to its Triton GEMM

    class CutlassOnly:
        cutlass_scaled_mm = staticmethod(lambda *a, **k: None)

    monkeypatch.delenv("HAQ_INT8_BACKEND", raising=False)
    monkeypatch.setattr(int8_gemm, "_vllm_ops", lambda: CutlassOnly)
    monkeypatch.setattr(int8_gemm, "_triton_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert int8_gemm.select_backend("cuda") == "cutlass"  # Turing: vLLM accepts it, Triton's int8 kernels do not
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert int8_gemm.select_backend("cuda") == "triton"
    assert int8_gemm.select_backend("cuda", cutlass_ok=True) == "cutlass"
    assert int8_gemm.select_backend("cuda", "cutlass") == "cutlass"  # still selectable explicitly
    assert int8_gemm.select_backend("cpu") == "torch"  # no oneDNN ops: exact torch path, never Triton
    monkeypatch.setattr(int8_gemm, "_triton_available", lambda: False)
    assert int8_gemm.select_backend("cuda") == "cutlass"
    monkeypatch.setattr(int8_gemm, "_vllm_ops", lambda: None)
    assert int8_gemm.select_backend("cuda") == "torch"
    monkeypatch.setattr(int8_gemm, "_triton_available", lambda: True)
    assert int8_gemm.select_backend("cuda", cutlass_ok=True) == "triton"  # no vLLM (make gpu-check's hosts)
    with pytest.raises(ValueError, match="triton"):
        int8_gemm.select_backend("cuda", "tritonn")


def test_backend_override_applies_only_where_that_backend_runs(monkeypatch):
    """HAQ_INT8_BACKEND=triton on a GPU host must not reach the offload engine's GEMMs on host tensors."""
    from vllm_haq.kernels import int8_gemm

    monkeypatch.setattr(int8_gemm, "_triton_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.delenv("HAQ_INT8_BACKEND", raising=False)
    auto = {d: int8_gemm.select_backend(d) for d in ("cpu", "cuda")}
    assert auto["cuda"] == "triton" and auto["cpu"] in ("torch", "onednn")
    for value, want in (("triton", {"cuda": "triton", "cpu": auto["cpu"]}),
                        ("cutlass", {"cuda": "cutlass", "cpu": auto["cpu"]}),
                        ("onednn", {"cuda": "triton", "cpu": "onednn"}),
                        ("torch", {"cuda": "torch", "cpu": "torch"})):
        monkeypatch.setenv("HAQ_INT8_BACKEND", value)
        assert {d: int8_gemm.select_backend(d) for d in ("cpu", "cuda")} == want, value
    assert int8_gemm.select_backend("cpu", "triton") == "triton"  # an explicit argument is taken as given
    monkeypatch.setenv("HAQ_INT8_BACKEND", "tritonn")
    for device in ("cpu", "cuda"):
        with pytest.raises(ValueError, match="HAQ_INT8_BACKEND.*tritonn"):
            int8_gemm.select_backend(device)


if __name__ == "__main__" and sys.argv[1:2] == ["--interpreter-child"]:
    _child_main(sys.argv[2])
elif __name__ == "__main__" and sys.argv[1:2] == ["--compile-child"]:
    _compile_child()
