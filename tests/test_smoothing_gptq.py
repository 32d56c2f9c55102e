"""Smoothing folds are exact (float64) and GPTQ beats round-to-nearest on the Hessian-weighted error."""

import pytest
import torch
import torch.nn.functional as F

from vllm_haq.quant import quantize_weight_per_channel
from vllm_haq.quant.gptq import GPTQConfig, HessianAccumulator, gptq_quantize, hessian_weighted_error
from vllm_haq.quant.smoothing import fold_into_norm, fold_into_producer_rows, smooth_weight, smoothing_factors

D = torch.float64


def _outlier_acts(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g, dtype=D)
    x[:, :3] *= 30  # a few outlier channels, as in real LLM activations
    return x


def test_factors_follow_the_formula_and_stay_positive():
    a = torch.tensor([10.0, 1.0, 0.0, 4.0])
    w = torch.tensor([0.5, 2.0, 1.0, 0.0])
    s = smoothing_factors(a, w, 0.5)
    expected = torch.tensor([10.0**0.5 / 0.5**0.5, 1 / 2**0.5, 1e-5**0.5 / 1, 4**0.5 / 1e-5**0.5], dtype=D)
    assert torch.allclose(s.double(), expected, rtol=1e-5)
    assert bool((s > 0).all()) and bool(torch.isfinite(s).all())
    with pytest.raises(ValueError, match="alpha"):
        smoothing_factors(a, w, 1.5)


def test_fold_into_rmsnorm_and_layernorm_is_exact():
    x = _outlier_acts(7, 16)
    w = torch.randn(24, 16, dtype=D)
    s = smoothing_factors(x.abs().amax(0), w.abs().amax(0), 0.6).double()
    g, b = torch.rand(16, dtype=D) + 0.5, torch.randn(16, dtype=D)
    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    gf, _ = fold_into_norm(g, None, s)
    assert torch.allclose((rms * gf) @ smooth_weight(w, s).t(), (rms * g) @ w.t(), rtol=1e-12, atol=1e-12)
    ln = F.layer_norm(x, (16,), eps=1e-5)
    gf, bf = fold_into_norm(g, b, s)
    assert torch.allclose((ln * gf + bf) @ smooth_weight(w, s).t(), (ln * g + b) @ w.t(), rtol=1e-12, atol=1e-12)


def test_fold_v_into_o_through_grouped_query_attention_is_exact():
    t, nh, nkv, hd = 5, 4, 2, 8
    x = torch.randn(t, 32, dtype=D)
    wq, wk = torch.randn(nh * hd, 32, dtype=D), torch.randn(nkv * hd, 32, dtype=D)
    wv, bv = torch.randn(nkv * hd, 32, dtype=D), torch.randn(nkv * hd, dtype=D)
    wo = torch.randn(32, nh * hd, dtype=D)

    def attn(wv_, bv_, wo_):
        q = (x @ wq.t()).view(t, nh, hd).transpose(0, 1)
        k = (x @ wk.t()).view(t, nkv, hd).transpose(0, 1).repeat_interleave(nh // nkv, 0)
        v = (x @ wv_.t() + bv_).view(t, nkv, hd).transpose(0, 1).repeat_interleave(nh // nkv, 0)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return a.transpose(0, 1).reshape(t, nh * hd) @ wo_.t()

    s_kv = torch.rand(nkv * hd, dtype=D) + 0.2  # one factor per v channel, shared by its query heads
    s_o = s_kv.view(nkv, 1, hd).expand(nkv, nh // nkv, hd).reshape(-1)
    wv_f, bv_f = fold_into_producer_rows(wv, bv, s_kv)
    assert torch.allclose(attn(wv_f, bv_f, smooth_weight(wo, s_o)), attn(wv, bv, wo), rtol=1e-10, atol=1e-10)


def test_fold_up_into_down_is_exact():
    x = torch.randn(6, 16, dtype=D)
    wg, wu, wd = torch.randn(40, 16, dtype=D), torch.randn(40, 16, dtype=D), torch.randn(16, 40, dtype=D)
    s = torch.rand(40, dtype=D) + 0.1
    wu_f, _ = fold_into_producer_rows(wu, None, s)
    ref = (F.silu(x @ wg.t()) * (x @ wu.t())) @ wd.t()
    got = (F.silu(x @ wg.t()) * (x @ wu_f.t())) @ smooth_weight(wd, s).t()
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_on_hessian_weighted_error(act_order):
    torch.manual_seed(0)
    for trial in range(3):
        k = 96
        mix = torch.randn(k, k, dtype=D) / k**0.5 + torch.eye(k, dtype=D)  # correlated inputs
        x = _outlier_acts(512, k, seed=trial) @ mix
        w = torch.randn(64, k)
        acc = HessianAccumulator(k)
        for chunk in x.split(100):
            acc.add(chunk)
        assert acc.n == 512 and torch.allclose(acc.h, 2 * x.t() @ x / 512)
        q_rtn, s_rtn = quantize_weight_per_channel(w)
        q_g, s_g = gptq_quantize(w, acc.h, GPTQConfig(block_size=32, act_order=act_order))
        assert q_g.dtype == torch.int8 and torch.equal(s_g, s_rtn)  # same format and scales as RTN
        e_rtn = hessian_weighted_error(w, q_rtn.double() * s_rtn.double(), acc.h)
        e_gptq = hessian_weighted_error(w, q_g.double() * s_g.double(), acc.h)
        assert e_gptq < 0.7 * e_rtn, (trial, e_gptq, e_rtn)


def test_gptq_handles_dead_inputs_and_singular_hessians():
    w = torch.randn(8, 16)
    x = torch.randn(4, 16, dtype=D)  # rank 4 < 16: singular XᵀX
    x[:, 5] = 0  # an input never seen
    acc = HessianAccumulator(16)
    acc.add(x)
    q, s = gptq_quantize(w, acc.h)
    assert bool((q[:, 5] == 0).all()) and bool(torch.isfinite(s).all())


def test_gptq_on_stacked_weights_equals_gptq_per_weight():
    """Linears that read one input (q/k/v) are quantized in one stacked call: same result as one by one."""
    torch.manual_seed(1)
    x = _outlier_acts(256, 48) @ (torch.randn(48, 48, dtype=D) / 48**0.5 + torch.eye(48, dtype=D))
    acc = HessianAccumulator(48)
    acc.add(x)
    ws = [torch.randn(n, 48) for n in (32, 16, 16)]
    cfg = GPTQConfig(block_size=16)
    q_all, s_all = gptq_quantize(torch.cat(ws), acc.h, cfg)
    for w, q, s in zip(ws, q_all.split([32, 16, 16]), s_all.split([32, 16, 16])):
        q1, s1 = gptq_quantize(w, acc.h, cfg)
        assert torch.equal(q, q1) and torch.equal(s, s1)
    # the converter's form: the weights streamed one at a time (bf16 as in a checkpoint) into one solve
    from vllm_haq.quant.gptq import GPTQSolver

    solver = GPTQSolver(acc.h, cfg)
    q_s, s_s = solver.quantize((w.bfloat16() for w in ws), rows=64)
    q_b, s_b = solver.quantize(torch.cat(ws).bfloat16())
    assert torch.equal(q_s, q_b) and torch.equal(s_s, s_b)
    with pytest.raises(ValueError, match="65 weight rows expected, got 64"):
        solver.quantize(iter(ws), rows=65)


def test_relative_weight_error_in_row_chunks_equals_the_whole_norm():
    from vllm_haq.quant import relative_weight_error

    w = torch.randn(300, 40)
    q, s = quantize_weight_per_channel(w)
    want = float((q.float() * s - w).double().norm() / w.double().norm())
    assert abs(relative_weight_error(w, q, s, rows_per_chunk=64) - want) < 1e-6 * want


def test_int8_matmul_reference_is_exact_at_the_int8_extremes():
    """The float32-chunked CPU path keeps integer sums exact even when |sum| exceeds 2**24."""
    from vllm_haq.quant import int8_matmul_reference

    k = 3000  # 3000 * 127**2 > 2**24: a single float32 dot product would round
    x = torch.full((3, k), 127, dtype=torch.int8)
    x[1] = -127
    x[2, ::2] = 1
    w = torch.full((2, k), 127, dtype=torch.int8)
    w[1, 1::3] = -127
    one = torch.ones(3, 1)
    got = int8_matmul_reference(x, one, w, torch.ones(2, 1))
    exact = (x.long() @ w.long().t()).double()
    assert torch.equal(got, exact)


def _reference_inverse_upper_cholesky(h: torch.Tensor, perm: torch.Tensor, damp: float) -> torch.Tensor:
    """GPTQ's factorization written out with torch (three n×n matrices): upper Cholesky factor of H⁻¹."""
    h = h[perm][:, perm].double()
    h = h + damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("act_order", [True, False])
def test_in_place_factorization_equals_the_torch_reference(dtype, act_order):
    from vllm_haq.quant.gptq import GPTQSolver

    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 96, generator=g, dtype=torch.float64) * torch.linspace(0.1, 5, 96, dtype=torch.float64)
    h = (2 / 400 * x.t() @ x).to(dtype)
    solver = GPTQSolver(h, GPTQConfig(act_order=act_order))
    want = _reference_inverse_upper_cholesky(h.double(), solver.perm, 0.01)
    assert torch.equal(solver.perm, torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(96))
    tol = 1e-6 if dtype == torch.float64 else 2e-5  # the factor is float32 either way
    assert torch.allclose(solver.hinv.double(), want, rtol=tol, atol=tol * float(want.abs().max()))
    assert torch.equal(solver.hinv, torch.triu(solver.hinv))


def test_not_positive_definite_hessian_gets_extra_dampening_in_place():
    from vllm_haq.quant.gptq import _inverse_upper_cholesky_

    g = torch.Generator().manual_seed(4)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    eig = torch.linspace(1.0, 2.0, 64, dtype=torch.float64)
    eig[0] = -3e-7  # slightly indefinite: the first extra step (1e-6 of the mean diagonal) fixes it
    h = q @ torch.diag(eig) @ q.t()
    h = (h + h.t()) / 2
    fixed = h + 1e-6 * float(torch.diag(h).mean()) * torch.eye(64, dtype=torch.float64)
    u = _inverse_upper_cholesky_(h.clone())
    assert torch.allclose(u.t() @ u @ fixed, torch.eye(64, dtype=torch.float64), atol=1e-6)
    with pytest.raises(RuntimeError, match="not positive definite even after extra dampening"):
        _inverse_upper_cholesky_(-torch.eye(8, dtype=torch.float64))


def _textbook_gptq(solver, w: torch.Tensor) -> torch.Tensor:
    """GPTQ's column loop as written before the transposed block (the reference for its bits): each column of
    ``w[:, j]`` rounded, its error divided by H⁻¹'s diagonal and spread over the block's later columns."""
    from vllm_haq.quant.int8 import INT8_MAX, weight_scale_from_amax

    w = w.float()[:, solver.perm].clone()
    scale = weight_scale_from_amax(w.abs().amax(1, keepdim=True))
    w[:, solver.dead[solver.perm]] = 0.0
    q, bs, n_in = torch.empty(w.shape, dtype=torch.int8), solver.cfg.block_size, w.shape[1]
    for b0 in range(0, n_in, bs):
        b1 = min(b0 + bs, n_in)
        w_blk, err_blk, h = w[:, b0:b1].clone(), torch.empty(w.shape[0], b1 - b0), solver.hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = w_blk[:, j : j + 1]
            qcol = torch.round(col / scale).clamp_(-INT8_MAX, INT8_MAX)
            q[:, b0 + j : b0 + j + 1] = qcol
            err = (col - qcol * scale) / h[j, j]
            w_blk[:, j + 1 :].sub_(err * h[j : j + 1, j + 1 :])
            err_blk[:, j : j + 1] = err
        if b1 < n_in:
            w[:, b1:].addmm_(err_blk, solver.hinv[b0:b1, b1:], alpha=-1.0)
    return q[:, solver.inv_perm]


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_column_loop_keeps_the_textbook_bits(act_order):
    """The transposed, buffered column loop (2-4x faster) performs the textbook loop's float operations: the
    same int8 weights, bit for bit, over several blocks and a short last block."""
    from vllm_haq.quant.gptq import GPTQSolver

    x = _outlier_acts(300, 200) @ (torch.randn(200, 200, dtype=D) / 200**0.5 + torch.eye(200, dtype=D))
    x[:, 7] = 0
    acc = HessianAccumulator(200)
    acc.add(x)
    solver = GPTQSolver(acc.h, GPTQConfig(block_size=64, act_order=act_order))
    w = torch.randn(96, 200)
    q, _ = solver.quantize(w)
    assert torch.equal(q, _textbook_gptq(solver, w))
