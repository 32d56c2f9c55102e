"""The CPU int8 kernel (vllm_haq.kernels.cpu_int8): exact int32 products at every shape, any thread count,
and the exact BLAS path, with the reason logged, where it is switched off or cannot be built."""

import os
import subprocess
import sys

import pytest
import torch

from vllm_haq.kernels import cpu_int8
from vllm_haq.kernels.int8_gemm import exact_int8_mm

pytestmark = pytest.mark.skipif(not cpu_int8.available(), reason="the CPU int8 kernel is not built on this host "
                                "(no AVX2 or no compiler; the BLAS path serves, see test_switched_off...)")


def _exact(x, w):
    return (x.long() @ w.long().t()).int()


@pytest.mark.parametrize("m", [1, 3, 16, 17, 64])
@pytest.mark.parametrize("k", [1, 31, 32, 33, 4096 + 7])
@pytest.mark.parametrize("n", [1, 5, 64])
def test_products_are_exact_at_every_shape(m, k, n):
    g = torch.Generator().manual_seed(m * 10007 + k * 31 + n)
    x = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    x[0, :] = 127  # the largest pair sums: 2 * 128 * 127 must not saturate
    w[0, :] = -128  # llm-compressor's int8 weights use -128; HAQ's never do
    x[-1, :] = -127
    assert torch.equal(cpu_int8.cpu_int8_mm(x, w, 1), _exact(x, w))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_count_does_not_change_the_result(threads):
    x = torch.randint(-127, 128, (5, 1000), dtype=torch.int8)
    w = torch.randint(-127, 128, (203, 1000), dtype=torch.int8)
    assert torch.equal(cpu_int8.cpu_int8_mm(x, w, threads), _exact(x, w))


def test_exact_int8_mm_uses_it_for_a_transposed_weight_view_and_blas_otherwise():
    x = torch.randint(-127, 128, (4, 300), dtype=torch.int8)
    w = torch.randint(-127, 128, (40, 300), dtype=torch.int8)
    assert torch.equal(exact_int8_mm(x, w.t()), _exact(x, w))  # the view ScaledInt8Gemm holds
    assert torch.equal(exact_int8_mm(x, w.t().contiguous()), _exact(x, w))  # another layout: BLAS chunks


def test_non_contiguous_and_wrong_inputs():
    x = torch.randint(-127, 128, (6, 64), dtype=torch.int8)
    w = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    assert torch.equal(cpu_int8.cpu_int8_mm(x[::2], w[::2]), _exact(x[::2], w[::2]))  # made contiguous
    with pytest.raises(RuntimeError, match="int8 operands"):
        cpu_int8.cpu_int8_mm(x.float(), w)
    with pytest.raises(RuntimeError, match=r"\[M, K\]"):
        cpu_int8.cpu_int8_mm(x, w[:, :32])


def test_compiled_callers_see_one_opaque_op():
    w = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    fn = torch.compile(lambda a: torch.ops.vllm_haq.cpu_int8_mm(a, w, 1), backend="eager", dynamic=True,
                       fullgraph=True)
    for m in (5, 1):
        x = torch.randint(-127, 128, (m, 64), dtype=torch.int8)
        assert torch.equal(fn(x), _exact(x, w))


def test_switched_off_it_is_not_built_and_the_blas_path_stays_exact():
    code = ("import logging, torch; logging.basicConfig(level=logging.INFO)\n"
            "from vllm_haq.kernels import cpu_int8\n"
            "from vllm_haq.kernels.int8_gemm import exact_int8_mm\n"
            "x = torch.randint(-127, 128, (3, 70), dtype=torch.int8); w = torch.randint(-127, 128, (9, 70), "
            "dtype=torch.int8)\n"
            "assert not cpu_int8.available()\n"
            "assert torch.equal(exact_int8_mm(x, w.t()), (x.long() @ w.long().t()).int())\n")
    env = dict(os.environ, HAQ_CPU_INT8_KERNEL="off")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CPU int8 kernel not used (HAQ_CPU_INT8_KERNEL=off)" in proc.stderr


def test_worker_threads_take_their_share_of_the_cores(monkeypatch):
    """An offload engine's CPU workers each set their share; other threads keep the default."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.delenv(cpu_int8.ENV_THREADS, raising=False)
    with ThreadPoolExecutor(2, initializer=cpu_int8.set_threads_for_this_thread, initargs=(1,)) as pool:
        assert pool.submit(cpu_int8.default_threads).result() == 1
    assert cpu_int8.default_threads() == cpu_int8.host_cores()
    monkeypatch.setenv(cpu_int8.ENV_THREADS, "3")
    assert cpu_int8.default_threads() == 3
