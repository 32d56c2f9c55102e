"""The int8 numerics (vllm_haq.quant) and the CPU kernels (vllm_haq.kernels) against float64 references."""

import os
import subprocess
import sys

import pytest
import torch

from vllm_haq.kernels import ScaledInt8Gemm, int8_moe_forward
from vllm_haq.kernels.int8_gemm import (ONEDNN_EXACT, ONEDNN_SATURATING, exact_int8_mm, onednn_int8_arithmetic,
                                        torch_scaled_int8_mm)
from vllm_haq.quant import (
    dequantize,
    int8_matmul_int16_saturating,
    int8_matmul_reference,
    quantize_per_token,
    quantize_weight_per_channel,
    w8a8_linear_reference,
)


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def test_weight_quantization_is_symmetric_per_channel_and_within_half_step():
    w = torch.randn(64, 96) * torch.logspace(-2, 1, 64).unsqueeze(1)  # channels of very different ranges
    q, s = quantize_weight_per_channel(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (64, 1)
    assert int(q.abs().max(dim=1).values.min()) == 127  # every channel uses the full range
    assert int(q.min()) >= -127  # symmetric: -128 never used
    err = (dequantize(q, s) - w).abs()
    assert bool((err <= s / 2 + 1e-7).all())  # round to nearest


def test_zero_channel_gets_a_finite_positive_scale():
    w = torch.randn(4, 8)
    w[2] = 0
    q, s = quantize_weight_per_channel(w)
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all()) and int(q[2].abs().max()) == 0


def test_per_token_quantization_with_smoothing():
    x = torch.randn(5, 32) * 3
    smooth = torch.rand(32) + 0.5
    q, s = quantize_per_token(x, smooth)
    assert s.shape == (5, 1)
    assert bool(((dequantize(q, s) - x / smooth).abs() <= s / 2 + 1e-6).all())


def test_exact_int8_mm_matches_integer_math_across_k_chunks():
    a = torch.randint(-127, 128, (7, 3000), dtype=torch.int8)
    b = torch.randint(-127, 128, (3000, 33), dtype=torch.int8)
    # all-extreme rows exceed 2**24 partial sums in one fp32 matmul: chunking must keep them exact
    a[0] = 127
    b[:, 0] = 127
    got = exact_int8_mm(a, b)
    assert got.dtype == torch.int32
    assert torch.equal(got.long(), (a.long() @ b.long()))


def test_cuda_int8_mm_op_pads_small_m_per_call_under_compile():
    """The CUDA _int_mm path (cuBLASLt needs M > 16) is one opaque op: compiled once with dynamic M and no
    guards (as vLLM compiles), it still pads M = 3 and not M = 30. torch._int_mm also runs on CPU tensors."""
    x = torch.randint(-127, 128, (30, 64), dtype=torch.int8)
    w_t = torch.randint(-127, 128, (64, 40), dtype=torch.int8)
    exact = (x.long() @ w_t.long()).int()
    fn = torch.compile(lambda a: torch.ops.vllm_haq.cuda_int8_mm(a, w_t), backend="eager", dynamic=True,
                       fullgraph=True, options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe})
    assert torch.equal(fn(x), exact)
    assert torch.equal(fn(x[:3]), exact[:3])


@pytest.mark.parametrize("backend", ["torch", "onednn"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_scaled_int8_gemm_backends_match_reference(backend, out_dtype):
    """oneDNN is held to the arithmetic the self-check found on this CPU: HAQ's exact products where it is
    exact (VNNI/AMX; the backend ``auto`` picks there), the int16-saturating model of it elsewhere (AVX2;
    never picked, but an explicit HAQ_INT8_BACKEND=onednn gets exactly that), so its wiring (scales, bias,
    output dtype, HAQ's quantization) is checked on every x86 host."""
    arithmetic = onednn_int8_arithmetic() if backend == "onednn" else ONEDNN_EXACT
    if arithmetic not in (ONEDNN_EXACT, ONEDNN_SATURATING):
        pytest.skip(f"vLLM's oneDNN int8 GEMM is {arithmetic} on this CPU: no reference for it")
    torch.manual_seed(0)
    w = torch.randn(80, 200)
    q, s = quantize_weight_per_channel(w)
    x = torch.randn(9, 200) * 2
    bias = torch.randn(80)
    out = torch.full((9, 80), float("nan"))
    out[:] = ScaledInt8Gemm(q, s, out_dtype, backend=backend)(x.to(out_dtype), bias.to(out_dtype)).float()
    xf = x.to(out_dtype).float()
    if arithmetic == ONEDNN_EXACT:
        ref = w8a8_linear_reference(xf, q, s, bias.to(out_dtype).float())
    else:
        x_q, x_s = quantize_per_token(xf)
        ref = (int8_matmul_int16_saturating(x_q, q).double() * x_s.double() * s.double().t()
               + bias.to(out_dtype).double())
        assert _rel(ref, w8a8_linear_reference(xf, q, s, bias.to(out_dtype).float())) > 1e-3  # it does saturate
    tol = 1e-5 if out_dtype == torch.float32 else 1e-2
    assert _rel(out, ref) <= tol


def test_onednn_self_check_recognises_the_arithmetic_of_this_cpu():
    """Exact with VNNI/AMX, int16-saturating on AVX2 alone; anything else would leave the backend unchecked."""
    arithmetic = onednn_int8_arithmetic()
    if arithmetic is None:
        pytest.skip("this vLLM build has no oneDNN int8 ops")
    flags = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()
    int8_dot = sorted(f for f in flags if "vnni" in f or "amx" in f)
    assert arithmetic in (ONEDNN_EXACT, ONEDNN_SATURATING), f"{arithmetic} (CPU's VNNI/AMX flags: {int8_dot})"
    if not int8_dot:
        assert arithmetic == ONEDNN_SATURATING, "no VNNI/AMX, yet oneDNN's int8 GEMM does not saturate"


@pytest.mark.parametrize("isa", [None, "AVX2"])
def test_int8_products_stay_exact_whichever_path_the_probe_picks(isa):
    """``int8_products`` takes oneDNN's int8 GEMM only where a probe found it exact. With oneDNN held to AVX2
    (``ONEDNN_MAX_CPU_ISA``: the arithmetic of CPUs without VNNI, which saturates int16 pair sums) the probe
    must refuse it, and the products must stay exact on data that saturates that path."""
    code = """if True:
        import torch
        from vllm_haq.quant.int8 import _probe_onednn, int8_products
        exact, why = _probe_onednn()
        x = torch.full((9, 700), 127, dtype=torch.int8)
        w = torch.randint(-127, 128, (700, 33), dtype=torch.int8)
        w[:, 0] = 127
        ok = torch.equal(int8_products(x, w).long(), x.long() @ w.long())
        raw = torch.equal(torch._int_mm(x, w).long(), x.long() @ w.long())
        print(exact, ok, raw, why)
    """
    env = dict(os.environ, **({"ONEDNN_MAX_CPU_ISA": isa} if isa else {}))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    exact, ok, raw = out.stdout.split()[:3]
    assert ok == "True", out.stdout
    if raw == "False":  # oneDNN saturates here: the probe must have seen it
        assert exact == "False", out.stdout
    if isa == "AVX2":
        assert (exact, raw) == ("False", "False"), out.stdout


def test_int8_products_switched_off_uses_blas(monkeypatch):
    from vllm_haq.quant import int8 as int8_mod

    monkeypatch.setenv("HAQ_ONEDNN_INT8", "off")
    assert int8_mod._probe_onednn() == (False, "HAQ_ONEDNN_INT8=off")


def test_int16_saturating_model_saturates_pairs_and_is_exact_below():
    """The model of oneDNN without VNNI: (x+128)·w summed over adjacent pairs in int16 with saturation,
    minus 128·Σw. Small operands never saturate (exact); a pair of 127s against 127s does."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-60, 61, (5, 33), generator=gen, dtype=torch.int8)  # (60+128)·60·2 = 22560 < 32767
    w = torch.randint(-60, 61, (7, 33), generator=gen, dtype=torch.int8)
    assert torch.equal(int8_matmul_int16_saturating(x, w), x.long() @ w.long().t())
    x = torch.tensor([[127, 127, -127, 0]], dtype=torch.int8)
    w = torch.tensor([[127, 127, 5, -3]], dtype=torch.int8)
    # pairs: (255·127 + 255·127) = 64770 -> 32767; (1·5 + 128·(-3)) = -379; shift back: 128·(127+127+5-3)
    assert int(int8_matmul_int16_saturating(x, w)) == 32767 - 379 - 128 * 256
    assert int(x.long() @ w.long().t()) == 2 * 127 * 127 - 635


def test_reference_matmul_is_exact_integer_product_times_scales():
    xq = torch.randint(-127, 128, (3, 50), dtype=torch.int8)
    xq[:, 0] = 127  # so that re-quantizing dequantize(xq, xs) gives back xq exactly
    wq = torch.randint(-127, 128, (4, 50), dtype=torch.int8)
    xs, ws = torch.rand(3, 1) + 0.1, torch.rand(4, 1) + 0.1
    ref = int8_matmul_reference(xq, xs, wq, ws)
    manual = torch.tensor([[sum(int(xq[i, k]) * int(wq[j, k]) for k in range(50)) * float(xs[i]) * float(ws[j])
                            for j in range(4)] for i in range(3)], dtype=torch.float64)
    assert torch.allclose(ref, manual, rtol=1e-6)
    y = torch_scaled_int8_mm(dequantize(xq, xs), wq.t(), ws, None, torch.float32)
    assert _rel(y, ref) < 1e-5


def test_int8_moe_forward_matches_per_token_loop_with_empty_and_ragged_experts():
    torch.manual_seed(1)
    e, h, inter, m, k = 6, 32, 24, 11, 2
    w13 = [quantize_weight_per_channel(torch.randn(2 * inter, h)) for _ in range(e)]
    w2 = [quantize_weight_per_channel(torch.randn(h, inter)) for _ in range(e)]
    x = torch.randn(m, h)
    ids = torch.randint(0, 4, (m, k))  # experts 4 and 5 get no tokens
    ids[:, 1] = (ids[:, 0] + 1) % 4
    weights = torch.softmax(torch.randn(m, k), -1)
    g13 = [ScaledInt8Gemm(q, s, torch.float32, backend="torch") for q, s in w13]
    g2 = [ScaledInt8Gemm(q, s, torch.float32, backend="torch") for q, s in w2]
    got = int8_moe_forward(x, weights, ids.int(), g13, g2)
    ref = torch.zeros(m, h, dtype=torch.float64)
    for t in range(m):
        for j in range(k):
            ex = int(ids[t, j])
            gu = w8a8_linear_reference(x[t : t + 1], *w13[ex])
            act = torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]
            ref[t] += float(weights[t, j]) * w8a8_linear_reference(act, *w2[ex])[0].double()
    assert _rel(got, ref) <= 1e-5
    # non-resident experts with routed tokens are an error, not a silent zero
    g13[0] = None
    with pytest.raises(RuntimeError, match="expert 0"):
        int8_moe_forward(x, weights, torch.zeros(m, k, dtype=torch.int32), g13, g2)


def test_route_groups_refuse_out_of_range_expert_ids_and_keep_a_host_copy():
    from vllm_haq.kernels import RouteGroups

    ids = torch.tensor([[3, 0], [0, 1], [3, 2]], dtype=torch.int32)
    g = RouteGroups(ids, 4)
    assert g.counts == [2, 1, 1, 2] and g.starts == [0, 2, 3, 4] and g.routed == {0: 2, 1: 1, 2: 1, 3: 2}
    assert torch.equal(g.ids_host, ids.long())
    t, j = g.routes_of(3)
    assert t.tolist() == [0, 2] and j.tolist() == [0, 0]
    for bad in (4, -1):
        with pytest.raises(ValueError, match=r"out of range \[0, 4\)"):
            RouteGroups(torch.tensor([[0, bad]], dtype=torch.int32), 4)


def test_route_groups_carry_activations_in_the_same_transfer():
    """On CUDA the engine brings a decode step's activations and router weights to the host with the ids
    (one blocking transfer per layer-step): they arrive as float32 host copies of the same values."""
    from vllm_haq.kernels import RouteGroups

    ids = torch.tensor([[3, 0], [0, 1], [3, 2]], dtype=torch.int32)
    x = torch.randn(3, 5).to(torch.bfloat16)
    w = torch.rand(3, 2)
    g = RouteGroups(ids, 4, carry=(x, w))
    x_host, w_host = g.carried
    assert x_host.dtype == torch.float32 and torch.equal(x_host, x.float()) and torch.equal(w_host, w)
    assert torch.equal(g.ids_host, ids.long()) and g.counts == [2, 1, 1, 2]
    assert RouteGroups(ids, 4).carried is None
