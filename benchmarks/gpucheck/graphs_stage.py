"""Stage ``graphs``: CUDA-graph capture/replay of the int8 linear and the fused MoE equals eager.

vLLM captures its decode steps as CUDA graphs, so every kernel launch must be capturable and must
not bake host-side values (routing, M-dependent tiles, pointers of temporaries) into the graph. Each
case is warmed up on a side stream, captured once on static inputs, then replayed on three fresh
inputs copied into them (fresh routing too) and compared with an eager call on the same inputs:
bit for bit, since the same deterministic kernels (no atomics) run on the same data.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpucheck import plan  # noqa: E402
from gpucheck.common import Stage  # noqa: E402

LINEAR = plan.LINEAR_SHAPES["mixtral-qo"]
MOE = plan.MOE_SHAPES["qwen3"]


def capture(torch, fn, static: list):
    """Warm ``fn(*static)`` up on a side stream (Triton compiles there), then capture it: (graph, output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*static)
    return graph, out


def linear_case(torch, backend: str, m: int):
    """(fn, make_inputs) for a bf16 ScaledInt8Gemm at Mixtral's q/o shape."""
    from vllm_haq.kernels import ScaledInt8Gemm

    n, k = LINEAR
    gen = torch.Generator(device="cuda").manual_seed(m)
    w_q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen, device="cuda")
    w_s = torch.rand(n, 1, generator=gen, device="cuda") * 1e-4 + 1e-5
    gemm = ScaledInt8Gemm(w_q, w_s, torch.bfloat16, backend=backend)
    return gemm, lambda: [torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)]


def moe_case(torch, m: int):
    """(fn, make_inputs) for the fused Triton MoE at Qwen3-30B-A3B's expert shape, half the experts in slots."""
    from vllm_haq.kernels import triton_int8_moe_forward

    experts, top_k, hidden, inter = MOE
    slots = experts // 2
    gen = torch.Generator(device="cuda").manual_seed(100 + m)
    w13 = torch.randint(-127, 128, (slots, 2 * inter, hidden), dtype=torch.int8, generator=gen, device="cuda")
    w2 = torch.randint(-127, 128, (slots, hidden, inter), dtype=torch.int8, generator=gen, device="cuda")
    w13_s = torch.rand(slots, 2 * inter, 1, generator=gen, device="cuda") * 1e-4 + 1e-5
    w2_s = torch.rand(slots, hidden, 1, generator=gen, device="cuda") * 1e-4 + 1e-5
    e2s = torch.full((experts,), -1, dtype=torch.int32, device="cuda")
    e2s[torch.randperm(experts, device="cuda", generator=gen)[:slots]] = torch.arange(slots, dtype=torch.int32,
                                                                                      device="cuda")

    def inputs():
        weights, ids = torch.topk(torch.softmax(torch.randn(m, experts, generator=gen, device="cuda"), -1), top_k)
        return [torch.randn(m, hidden, generator=gen, device="cuda").to(torch.bfloat16), weights, ids.int()]

    def fn(x, weights, ids):
        return triton_int8_moe_forward(x, weights, ids, e2s, w13, w13_s, w2, w2_s)

    return fn, inputs


def check(torch, case: str, m: int):
    fn, inputs = moe_case(torch, m) if case == "moe-triton" else linear_case(torch, case.split("-")[1], m)
    static = inputs()
    graph, out = capture(torch, fn, static)
    diffs = []
    for trial in range(3):
        fresh = inputs()
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        eager = fn(*fresh)
        torch.cuda.synchronize()
        if not torch.equal(out, eager):
            diffs.append(f"replay {trial}: {int((out != eager).sum())} of {out.numel()} outputs differ "
                         f"(max {float((out.float() - eager.float()).abs().max()):.3g})")
    shape = f"[E={MOE[0]} top-{MOE[1]} H={MOE[2]} I={MOE[3]}]" if case == "moe-triton" else f"[{LINEAR[0]}x{LINEAR[1]}]"
    return not diffs, f"{shape} M={m}: " + ("; ".join(diffs) or "3 replays on fresh inputs bit-identical to eager"), {}


def main() -> int:
    st = Stage("graphs")
    names = plan.checks("graphs")
    st.plan(names)
    if st.dry:
        st.skip_all(names)
        return st.finish()
    import torch

    for case in plan.GRAPH_CASES:
        for m in plan.GRAPH_M:
            st.run(f"graphs/{case}/M{m}", check, torch, case, m)
    return st.finish()


if __name__ == "__main__":
    sys.exit(main())
