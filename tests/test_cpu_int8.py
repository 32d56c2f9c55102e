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


@pytest.mark.parametrize("m", [1, 2, 3, 16, 17, 64])
@pytest.mark.parametrize("k", [1, 31, 32, 33, 96 + 5, 128 + 64 + 5, 4096 + 7])
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


# ---- one MoE layer-step's experts in one call (cpu_moe_forward / cpu_expert_routes) ----------------------

def _stack(experts, hidden, inter, seed, smooth=False, rotation=None, full_range=False):
    from vllm_haq.offload import ExpertTensors

    g = torch.Generator().manual_seed(seed)
    w13 = torch.randint(-127, 128, (experts, 2 * inter, hidden), generator=g, dtype=torch.int8)
    w2 = torch.randint(-127, 128, (experts, hidden, inter), generator=g, dtype=torch.int8)
    if full_range:
        w13[:, 0, :] = -128  # llm-compressor's weights may hold -128
        w2[:, -1, :] = -128
    sm = torch.rand(experts, hidden, generator=g) + 0.5 if smooth else None
    if smooth == "shared":  # one smoothing for every expert: the kernel quantizes each token once
        sm = sm[:1].expand(experts, hidden).contiguous()
    return ExpertTensors(w13, torch.rand(experts, 2 * inter, 1, generator=g) * 1e-2 + 1e-3, w2,
                         torch.rand(experts, hidden, 1, generator=g) * 1e-2 + 1e-3, sm, down_rotation=rotation)


def _loop(x, weights, ids, stack):
    """int8_moe_forward over per-expert ScaledInt8Gemm (the path without the kernel), float32 throughout."""
    from vllm_haq.kernels import int8_moe_forward

    g13, g2 = zip(*(stack.gemms(e, torch.float32, backend="torch") for e in range(stack.count)))
    return int8_moe_forward(x, weights, ids, list(g13), list(g2))


@pytest.mark.parametrize("tokens", [1, 2, 5, 33])
@pytest.mark.parametrize("case", ["plain", "smooth", "shared-smooth", "rotation", "odd-shapes", "full-range"])
def test_one_call_gives_the_per_expert_loop_result(tokens, case):
    """Same int8 products, scales and quantization as the per-expert loop: the only float step computed
    differently is SiLU's exp, so the results agree to float rounding (most often bit for bit)."""
    from vllm_haq.kernels import cpu_moe_forward

    hidden, inter = (72, 44) if case == "odd-shapes" else (128, 96)  # K tails, short row tiles
    stack = _stack(6, hidden, inter, seed=tokens, smooth={"smooth": True, "shared-smooth": "shared"}.get(case, False),
                   rotation=32 if case == "rotation" else None, full_range=case == "full-range")
    g = torch.Generator().manual_seed(100 + tokens)
    x = torch.randn(tokens, hidden, generator=g) * 3
    ids = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(tokens)]).int()
    weights = torch.rand(tokens, 2, generator=g)
    got, want = cpu_moe_forward(x, weights, ids, stack), _loop(x, weights, ids, stack)
    assert got.dtype == torch.float32 and got.shape == (tokens, hidden)
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= 2e-3, err  # one int8 step of one intermediate at most, where the two exps round apart


def test_threads_and_stack_rows_do_not_change_the_result():
    """Any team size, and experts addressed through cache-slot rows, give the same bits."""
    from vllm_haq.kernels import RouteGroups, cpu_expert_routes, new_route_buffer
    from vllm_haq.offload import ExpertTensors

    stack = _stack(5, 96, 64, seed=7, smooth=True)
    x, weights = torch.randn(9, 96), torch.rand(9, 2)
    ids = torch.randint(0, 5, (9, 2))
    groups = RouteGroups(ids, 5)
    experts = list(groups.routed)
    outs = []
    for threads in (1, 2, 3):
        routes = new_route_buffer(x, 2)
        cpu_expert_routes(x, weights, groups, stack, experts, routes, threads=threads)
        outs.append(routes)
    assert all(torch.equal(o, outs[0]) for o in outs)
    perm = [3, 0, 4, 1, 2]  # slot s holds expert perm[s]
    slots = ExpertTensors(stack.w13[perm], stack.w13_scale[perm], stack.w2[perm], stack.w2_scale[perm],
                          stack.smooth[perm])
    routes = new_route_buffer(x, 2)
    cpu_expert_routes(x, weights, groups, slots, experts, routes, index=[perm.index(e) for e in experts])
    assert torch.equal(routes, outs[0])


@pytest.mark.parametrize("build", ["avx2", "avx_vnni", "avx512_vnni"])
def test_every_build_gives_the_same_bits(build):
    """The builds differ in their integer steps only (exact in each) and share every float step: a layer-step
    on another build the CPU runs (``load_build``, what ``cpu_experts.py --builds`` times) gives this host's
    bits, at decode's row streams and the tiles (1, 4, 17 and 33 tokens, rotation, K tails)."""
    from vllm_haq.kernels import RouteGroups, cpu_expert_routes, new_route_buffer

    if not all(flag in cpu_int8._cpu_flags() for flag in cpu_int8.BUILDS[build].cpu_flags):
        with pytest.raises(ValueError, match=f"the {build} build needs"):
            cpu_int8.load_build(build)
        return
    module = cpu_int8.load_build(build)
    for tokens, (hidden, inter) in ((1, (200, 72)), (4, (128, 96)), (17, (72, 44)), (33, (136, 64))):
        stack = _stack(5, hidden, inter, seed=tokens, smooth=True, rotation=4)
        g = torch.Generator().manual_seed(tokens)
        x, weights = torch.randn(tokens, hidden, generator=g) * 3, torch.rand(tokens, 2, generator=g)
        groups = RouteGroups(torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(tokens)]), 5)
        want, got = new_route_buffer(x, 2), new_route_buffer(x, 2)
        cpu_expert_routes(x, weights, groups, stack, list(groups.routed), want)
        cpu_expert_routes(x, weights, groups, stack, list(groups.routed), got, build=module)
        assert torch.equal(got, want), (build, tokens)


def test_experts_left_out_leave_their_rows_alone():
    """The engine fills one route buffer from several calls (cache slots, CPU jobs): each writes its rows only."""
    from vllm_haq.kernels import RouteGroups, cpu_expert_routes, new_route_buffer

    stack = _stack(4, 64, 32, seed=3)
    x, weights, ids = torch.randn(6, 64), torch.rand(6, 2), torch.randint(0, 4, (6, 2))
    groups = RouteGroups(ids, 4)
    whole, parts = new_route_buffer(x, 2), new_route_buffer(x, 2)
    cpu_expert_routes(x, weights, groups, stack, list(groups.routed), whole)
    experts = list(groups.routed)
    cpu_expert_routes(x, weights, groups, stack, experts[::2], parts)
    untouched = parts.clone()
    cpu_expert_routes(x, weights, groups, stack, experts[1::2], parts)
    assert torch.equal(parts, whole)
    rows = torch.cat([groups.routes_of(e)[0] * 2 + groups.routes_of(e)[1] for e in experts[1::2]])
    assert untouched.view(-1, 64)[rows].abs().sum() == 0


def test_bad_stacks_are_refused_by_name():
    from vllm_haq.kernels import cpu_int8 as k

    stack = _stack(2, 64, 32, seed=1)
    x, routes, w = torch.randn(1, 64), torch.zeros(1, 1, 64), torch.ones(1, 1)
    tok, slot = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    args = [x, routes, w, stack.w13, stack.w13_scale, stack.w2, stack.w2_scale, None, tok, slot]
    with pytest.raises(RuntimeError, match="w13 must be int8"):
        k.moe_routes(*args[:3], stack.w13.float(), *args[4:], [0], [0], [1], None)
    with pytest.raises(RuntimeError, match="index out of range"):
        k.moe_routes(*args, [2], [0], [1], None)
    with pytest.raises(RuntimeError, match="route range out of bounds"):
        k.moe_routes(*args, [0], [0], [2], None)
    with pytest.raises(RuntimeError, match="x float32"):
        k.moe_routes(x.double(), *args[1:], [0], [0], [1], None)
    with pytest.raises(RuntimeError, match="rotation block"):
        k.moe_routes(*args, [0], [0], [1], 24)


def test_worker_threads_beside_the_model_thread_give_the_serial_bits():
    """Concurrency stress: on a GPU host the offload engine's CPU workers compute experts while the model
    thread keeps running its own work, for the whole life of the server. Here three worker threads run the
    one-call MoE kernel and an engine with real worker threads serves steps, while the model thread runs
    int8 GEMMs; every result must be the bits it is when computed alone.

    The defect this guards against was in what the workers used to call on vLLM's CPU build: vLLM's oneDNN
    int8 GEMM (csrc/cpu/dnnl_helper.cpp) hands every handler one process-wide scratchpad buffer
    (``DNNLScratchPadManager::get_dnnl_scratchpad_manager()``, ``scratchpad_mode::user``) and keeps its
    primitive caches in unsynchronized std::list/unordered_map LRUs shared by all handlers of one shape, so two
    threads in oneDNN GEMMs at once share scratch memory and cache lists. The workers now run this kernel,
    whose buffers are per call."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from vllm_haq.kernels import cpu_moe_forward
    from vllm_haq.offload import OffloadConfig, OffloadEngine

    stack = _stack(8, 256, 128, seed=11, smooth=True)
    g = torch.Generator().manual_seed(5)
    cases = []
    for i in range(12):
        m = 1 + i % 5
        ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(m)])
        cases.append((torch.randn(m, 256, generator=g), torch.rand(m, 2, generator=g), ids))
    expected = [cpu_moe_forward(x, w, ids, stack) for x, w, ids in cases]
    gx = torch.randint(-127, 128, (7, 512), generator=g, dtype=torch.int8)
    gw = torch.randint(-127, 128, (96, 512), generator=g, dtype=torch.int8)
    gemm_expected = _exact(gx, gw)
    errors: list[str] = []

    def worker(i):
        cpu_int8.set_threads_for_this_thread(1)
        for it in range(30):
            c = (i * 7 + it) % len(cases)
            if not torch.equal(cpu_moe_forward(*cases[c], stack), expected[c]):
                errors.append(f"worker {i} call {it} case {c}")

    engine = OffloadEngine(OffloadConfig(policy="static", slots_per_layer=2), "cpu", torch.float32)
    engine.add_layer(0, stack)
    engine._start()
    engine._pool = ThreadPoolExecutor(2, thread_name_prefix="stress")  # as on a GPU host: real worker threads
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for it in range(60):
        if not torch.equal(cpu_int8.cpu_int8_mm(gx, gw, 2), gemm_expected):
            errors.append(f"model thread GEMM {it}")
        x, w, ids = cases[it % len(cases)]
        if not torch.equal(engine.forward(0, x, w, ids), expected[it % len(cases)]):
            errors.append(f"engine step {it}")
    for t in threads:
        t.join()
    engine.close()
    assert not errors, errors[:5]


def test_the_kernel_lets_the_model_thread_run_while_it_computes():
    """On a GPU host a layer-step's CPU experts are one moe_routes call on a worker thread while the model thread
    issues the step's copies and device kernels. Holding the GIL, the call froze the model thread for its whole
    length (the first H200 run: HAQ's CPU experts and fetches summed instead of overlapping). Here the model
    thread counts loop turns between the worker entering the call and leaving it: none when the GIL is held.
    The switch interval is raised to 1 s for the test, so that holding the GIL would keep the model thread out for
    all 20 calls (~15 ms), and the calls are many enough that a loaded host's scheduling delay does not eat them
    (3 calls, ~2 ms, on a host with one core busy elsewhere: 0 turns with the GIL released)."""
    import threading

    stack = _stack(2, 1024, 4096, seed=3)
    x, routes, weights = torch.randn(1, 1024), torch.zeros(1, 2, 1024), torch.rand(1, 2)
    tok, slot = torch.zeros(2, dtype=torch.int64), torch.arange(2)
    inside, done = threading.Event(), threading.Event()

    def worker():
        for _ in range(20):  # ~25 MB of weights a call: ~0.7 ms at one thread
            inside.set()
            cpu_int8.moe_routes(x, routes, weights, stack.w13, stack.w13_scale, stack.w2, stack.w2_scale, None,
                                tok, slot, [0, 1], [0, 1], [1, 1], None, threads=1)
        done.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    try:
        t = threading.Thread(target=worker)
        t.start()
        inside.wait()
        turns = 0
        while not done.is_set():
            turns += 1
        t.join()
    finally:
        sys.setswitchinterval(interval)
    assert turns > 1000, f"the model thread ran {turns} loop turns during 20 kernel calls: the GIL is held"


def test_a_fresh_process_compiles_a_linear_through_the_kernel():
    """vLLM's CPU build traces every linear with torch.compile (fullgraph) in a fresh worker process. Loading the
    kernel there happened under a lock at the first call, inside the trace, and Dynamo refuses a lock: every
    `haq serve` / `haq eval` through vLLM on an AVX2 host failed at start-up. The layer now decides at load."""
    code = """
import torch
from vllm_haq.kernels import ScaledInt8Gemm
from vllm_haq.kernels import cpu_int8
from vllm_haq.quant import quantize_weight_per_channel
assert "module" not in cpu_int8._state, "the kernel must not be loaded before the layer is built"
w_q, w_s = quantize_weight_per_channel(torch.randn(48, 64))
gemm = ScaledInt8Gemm(w_q, w_s, torch.float32, backend="torch")
fn = torch.compile(lambda x: gemm(x), fullgraph=True, dynamic=True)
x = torch.randn(5, 64)
assert torch.equal(fn(x), gemm(x))
assert cpu_int8._state.get("module") is not None, "served by the kernel"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def _host_build() -> str:
    flags = cpu_int8._cpu_flags()
    if all(flag in flags for flag in ("avx512_vnni", "avx512vl", "avx512bw")):
        return "avx512_vnni"
    return "avx_vnni" if "avx_vnni" in flags else "avx2"


@pytest.mark.parametrize("forced", ["avx2", "avx_vnni"])
def test_the_build_follows_the_host_and_a_build_can_be_forced(forced):
    """Each host gets its best build (every test above checks its products there); the switch forces another
    the CPU can run, which must give the same integers at the tiles' and decode's shapes; the choice is logged
    with its reason. AVX-VNNI can be forced only where the CPU has it (Zen 5, Intel since Alder Lake)."""
    assert cpu_int8.isa() == _host_build()
    if forced not in cpu_int8._cpu_flags() and forced != "avx2":
        pytest.skip(f"this CPU has no {forced}")
    code = ("import logging, torch; logging.basicConfig(level=logging.INFO)\n"
            "from vllm_haq.kernels import cpu_int8\n"
            "g = torch.Generator().manual_seed(5)\n"
            f"assert cpu_int8.isa() == {forced!r}, cpu_int8.isa()\n"
            "for m, k in ((17, 4103), (16, 800), (4, 96), (1, 197), (2, 4103)):  # tiles, decode's row streams\n"
            "    x = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)\n"
            "    w = torch.randint(-128, 128, (37, k), generator=g, dtype=torch.int8)\n"
            "    assert torch.equal(cpu_int8.cpu_int8_mm(x, w, 2), (x.long() @ w.long().t()).int()), (m, k)\n")
    env = dict(os.environ, HAQ_CPU_INT8_KERNEL=forced)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"CPU int8 kernel enabled ({cpu_int8.BUILDS[forced].isa} exact int8 GEMM" in proc.stderr
    assert f"HAQ_CPU_INT8_KERNEL={forced}" in proc.stderr


def test_the_build_switch_rejects_unknown_values_and_unrunnable_builds(monkeypatch):
    """A misspelt switch is an error naming it; a build the CPU cannot run (it would die of an illegal
    instruction) gives way to the host's, saying why; a failed VNNI build falls back to the AVX2 one."""
    with pytest.raises(ValueError, match="HAQ_CPU_INT8_KERNEL='avx512'.*avx512_vnni, avx_vnni, avx2"):
        cpu_int8._candidates("avx512")
    monkeypatch.setattr(cpu_int8, "_cpu_flags", lambda: {"avx2", "fma"})
    (build, why), = cpu_int8._candidates("avx_vnni")
    assert build.isa == "AVX2" and "asks for a build this CPU cannot run (no avx_vnni)" in why
    (build, why), = cpu_int8._candidates("")
    assert build.isa == "AVX2" and "no AVX-512 VNNI on this CPU; no AVX-VNNI on this CPU" == why
    monkeypatch.setattr(cpu_int8, "_cpu_flags", lambda: {"avx2", "fma", "avx_vnni"})
    assert [(b.isa, w) for b, w in cpu_int8._candidates("on")] == [
        ("AVX-VNNI", "no AVX-512 VNNI on this CPU"), ("AVX2", "the AVX-VNNI build failed")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,n,rotation,smooth,bias", [(1, 576, 96, None, False, False),
                                                       (37, 1536, 40, 512, True, True),
                                                       (300, 2048, 9, 128, False, True), (5, 64, 7, 16, True, False),
                                                       (3, 70, 5, None, True, False)])  # vector tails
def test_the_fused_cpu_linear_is_the_torch_linear_bit_for_bit(m, k, n, rotation, smooth, bias, dtype):
    """ScaledInt8Gemm on the kernel's two ops (quantize_rows, scaled_mm) gives the same bits as the torch steps
    (widening, smoothing, rotation, quantize_per_token, exact products, scaling, bias, the output dtype), over
    several token blocks."""
    from vllm_haq.kernels.int8_gemm import ScaledInt8Gemm, torch_scaled_int8_mm
    from vllm_haq.quant import quantize_per_token
    from vllm_haq.quant.rotation import rotate

    g = torch.Generator().manual_seed(m + k + n)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    w_scale = torch.rand(n, 1, generator=g) * 1e-2
    s = torch.rand(k, generator=g) + 0.5 if smooth else None
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(m, k, generator=g) * 3
    x[0, 0] = 0.0 if m == 1 else 40.0  # an outlier (or a zero), as real activations have
    x = x.to(dtype)
    gemm = ScaledInt8Gemm(w, w_scale, dtype, smooth=s, backend="torch", rotation=rotation)
    assert gemm._cpu_linear
    t = x.float() if s is None else x.float() / s
    t = t if rotation is None else rotate(t, rotation)
    q, q_s = quantize_per_token(t)
    got_q, got_s = cpu_int8.cpu_quantize_rows(x, s, rotation or 0, 2)
    assert torch.equal(got_q, q) and torch.equal(got_s, q_s)
    got = gemm(x, b)
    assert got.dtype == dtype and torch.equal(got, torch_scaled_int8_mm(t, w.t(), w_scale, b, dtype, None, True))
    zeros = cpu_int8.cpu_quantize_rows(torch.zeros(3, k), None, 0, 1)  # all-zero rows: scale 1e-8 / 127, q 0
    assert not zeros[0].any() and torch.equal(zeros[1], quantize_per_token(torch.zeros(3, k))[1])


def test_a_changed_header_is_a_new_build(tmp_path):
    """The build directory is named by the hash of the source and of the local headers it includes: a checkout
    whose int8_tile.h changed must not import the build of the old one."""
    from vllm_haq import native

    (tmp_path / "tile.h").write_text("constexpr int A = 1;\n")
    source = tmp_path / "op.cpp"
    source.write_text('#include <vector>\n#include "tile.h"\nint f() { return A; }\n')
    before = native._source_hash(str(source))
    (tmp_path / "tile.h").write_text("constexpr int A = 2;\n")
    assert native._source_hash(str(source)) != before
    kernels = os.path.join(os.path.dirname(cpu_int8.__file__), "cpu")
    assert native._source_hash(os.path.join(kernels, "int8_gemm.cpp")) in cpu_int8._module().__name__


def test_a_lock_left_by_a_killed_process_does_not_block_loading():
    """torch's build lock, left behind by a process killed while loading the extension (a timed-out job), must not
    make later processes wait forever: a built extension is imported without it."""
    from torch.utils import cpp_extension

    name = cpu_int8._module().__name__
    lock = os.path.join(cpp_extension._get_build_directory(name, verbose=False), "lock")
    open(lock, "w").close()
    try:
        code = "from vllm_haq.kernels import cpu_int8; assert cpu_int8.available(), cpu_int8._state"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
    finally:
        os.remove(lock)
