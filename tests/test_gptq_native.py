"""GPTQ's compiled CPU column loop (vllm_haq.quant.gptq_cpu): the torch loop's bits at every shape and thread
count, end to end through GPTQSolver.quantize, and the torch loop where it is switched off or cannot be built."""

import logging
import os
import subprocess
import sys

import pytest
import torch

from vllm_haq import native
from vllm_haq.quant import gptq_cpu
from vllm_haq.quant.gptq import GPTQConfig, GPTQSolver, HessianAccumulator

built = pytest.mark.skipif(not gptq_cpu.usable(torch.zeros(1)), reason="the GPTQ CPU extension cannot be built on "
                           f"this host ({gptq_cpu._extension.state.get('why')}): only the torch loop runs here")


def _block(n, rows, seed):
    """(w_t, scale, hinv block view) that exercise the rounding's corners: exact .5 ties (power-of-two scales
    in even rows; columns 0, 3, 6, ... keep their values because hinv's entries above them are zero), values
    far past ±127 (clamped), ±0, and a strided hinv block whose lower triangle is garbage the loop must not read."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(rows, generator=g) * 0.02 + 1e-3
    scale[::2] = 2.0 ** -torch.randint(3, 9, (len(scale[::2]),), generator=g).float()
    w_t = torch.randn(n, rows, generator=g) * scale * 60
    ties = (torch.randint(-130, 130, (n, rows), generator=g) + 0.5) * scale  # exact: scale a power of two
    w_t[:, ::2] = ties[:, ::2]
    w_t[:, 1::5] = torch.randn(n, len(scale[1::5]), generator=g).sign() * 200 * scale[1::5]
    if rows >= 8:
        w_t[-1, -3:] = torch.tensor([0.0, -0.0, 1e-30])
    big = torch.randn(n + 3, n + 5, generator=g) * 0.3
    hinv = big[1 : n + 1, 2 : n + 2]  # a block of a larger factor, as quantize passes it
    hinv.diagonal().copy_(torch.rand(n, generator=g) + 0.2)
    above_kept_columns = torch.ones(n, n, dtype=torch.bool).triu(1) & (torch.arange(n) % 3 == 0)
    hinv.masked_fill_(above_kept_columns, 0.0)
    return w_t, scale, hinv


def _torch_loop(monkeypatch, w_t, scale, hinv):
    monkeypatch.setenv(gptq_cpu.ENV_SWITCH, "off")
    n, rows = w_t.shape
    buffers = [torch.empty(n, rows) for _ in range(3)]
    q_t, err_t = GPTQSolver._columns(w_t, scale, hinv, buffers)
    monkeypatch.delenv(gptq_cpu.ENV_SWITCH)
    return q_t, err_t.clone()


@built
@pytest.mark.parametrize("rows", [1, 7, 300, 3072])
@pytest.mark.parametrize("n", [1, 5, 128])
def test_the_compiled_loop_gives_the_torch_loops_bits(monkeypatch, rows, n):
    w_t, scale, hinv = _block(n, rows, seed=rows * 131 + n)
    w_ref = w_t.clone()
    q_ref, err_ref = _torch_loop(monkeypatch, w_ref, scale, hinv)
    if rows > 1:
        assert (q_ref.abs() == 127).any() and ((w_ref / scale) % 1 == 0.5).any(), "clamped values and ties"
    for threads in (1, 2, 3):
        w = w_t.clone()
        q, err = torch.empty(n, rows, dtype=torch.int8), torch.empty(n, rows)
        gptq_cpu.columns(w, scale, hinv, q, err, threads)
        assert torch.equal(q, q_ref), f"q differs at {threads} threads"
        assert torch.equal(err.view(torch.int32), err_ref.view(torch.int32)), f"err bits differ at {threads} threads"
        assert torch.equal(w.view(torch.int32), w_ref.view(torch.int32)), "w_t is left as the torch loop leaves it"


@built
def test_ties_round_half_to_even():
    scale = torch.full((16,), 0.5)
    w_t = (torch.arange(-8, 8).float() + 0.5).reshape(1, 16) * 0.5  # k + 0.5 exactly, after / scale
    q, err = torch.empty(1, 16, dtype=torch.int8), torch.empty(1, 16)
    gptq_cpu.columns(w_t, scale, torch.ones(1, 1), q, err, 1)
    assert torch.equal(q[0], torch.round(torch.arange(-8, 8).float() + 0.5).to(torch.int8))
    assert (q[0] % 2 == 0).all()


def _solver_and_weight(act_order, n_in=300, rows=200):
    g = torch.Generator().manual_seed(n_in + act_order)
    x = torch.randn(3 * n_in, n_in, generator=g, dtype=torch.float64)
    x[:, :3] *= 30
    x[:, 11] = 0  # a dead input
    acc = HessianAccumulator(n_in)
    acc.add(x)
    return GPTQSolver(acc.h, GPTQConfig(block_size=128, act_order=act_order)), torch.randn(rows, n_in, generator=g)


@built
@pytest.mark.parametrize("act_order", [True, False])
def test_quantize_end_to_end_equals_the_torch_loop(monkeypatch, act_order):
    solver, w = _solver_and_weight(act_order)
    calls = []
    compiled = gptq_cpu.columns
    monkeypatch.setattr(gptq_cpu, "columns", lambda *a: calls.append(1) or compiled(*a))
    q, scale = solver.quantize(w)
    assert len(calls) == 3, "every block (128 + 128 + 44 columns) ran compiled"
    monkeypatch.setenv(gptq_cpu.ENV_SWITCH, "off")
    q_ref, scale_ref = solver.quantize(w)
    assert len(calls) == 3, "switched off: the torch loop ran"
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)


def test_usable_only_for_float32_cpu_tensors(monkeypatch):
    assert not gptq_cpu.usable(torch.zeros(2, device="meta"))  # as on CUDA: the torch loop
    assert not gptq_cpu.usable(torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    monkeypatch.setenv(gptq_cpu.ENV_SWITCH, "off")
    assert not gptq_cpu.usable(torch.zeros(2))


def test_an_extension_that_cannot_be_built_leaves_the_torch_loop(monkeypatch, caplog):
    why = native.try_load("haq_missing", "/nonexistent/gptq_columns.cpp", [], "unused")
    assert why[0] is None and "building /nonexistent/gptq_columns.cpp" in why[1]
    broken = native.Extension("GPTQ CPU column loop", lambda: why, logging.getLogger("vllm_haq.quant"))
    monkeypatch.setattr(gptq_cpu, "_extension", broken)
    with caplog.at_level(logging.WARNING):
        assert not gptq_cpu.usable(torch.zeros(1))
        assert not gptq_cpu.usable(torch.zeros(1))
    assert [r.getMessage() for r in caplog.records].count(f"vllm-haq: GPTQ CPU column loop not used ({why[1]})") == 1
    solver, w = _solver_and_weight(False, n_in=140, rows=9)
    q, _ = solver.quantize(w)
    assert q.dtype == torch.int8 and q.shape == (9, 140)


def test_switched_off_nothing_is_built():
    code = ("import torch\nfrom vllm_haq.quant import gptq_cpu\nfrom vllm_haq.quant.gptq import gptq_quantize\n"
            "x = torch.randn(64, 32, dtype=torch.float64)\n"
            "q, _ = gptq_quantize(torch.randn(5, 32), x.t() @ x)\n"
            "assert q.shape == (5, 32) and 'module' not in gptq_cpu._extension.state\n")
    env = dict(os.environ, **{gptq_cpu.ENV_SWITCH: "off"})
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
