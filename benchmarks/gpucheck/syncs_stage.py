"""Stage ``syncs``: blocking device->host synchronizations per MoE layer-step, counted.

A decode step that waits for the GPU at every MoE layer cannot overlap the host's planning with the
device's compute, and none of it can be captured in a CUDA graph. ``torch.cuda.set_sync_debug_mode
("warn")`` makes every synchronizing CUDA call (``.item()``, ``.tolist()``, ``.cpu()``, blocking copies,
stream/device synchronize) emit a warning; each warning is counted with the innermost vllm_haq frame
that caused it. Targets: 0 for the linear and the fused Triton MoE (launch-only by design), <= 1 per
layer-step for the offload engine (the routing must reach the host once to plan). A count over target
is a FAIL with the count and its sources; the stage continues.
"""

from __future__ import annotations

import collections
import os
import sys
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpucheck import plan  # noqa: E402
from gpucheck.common import Stage  # noqa: E402
from gpucheck.engine_driver import Shape, make_layers, make_trace, new_engine, routing_prior, serve  # noqa: E402

SHAPE = Shape(layers=4, experts=16, top_k=4, hidden=1024, inter=512)
WARMUP, STEPS = 4, 16  # steps before counting (engine start, calibration, Triton compiles), steps counted


class SyncCounter:
    """Counts synchronizing CUDA calls (sync debug warnings) by their innermost vllm_haq source line."""

    def __init__(self, torch):
        self.torch = torch
        self.sources: collections.Counter = collections.Counter()
        self.active = False

    def __enter__(self):
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._show
        self.torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        self.torch.cuda.set_sync_debug_mode("default")
        self._warnings.__exit__(*exc)

    def _show(self, message, category, filename, lineno, file=None, line=None):
        if not self.active or "synchroniz" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1] if "vllm_haq" in f.filename]
        where = (f"{os.path.relpath(frames[-1].filename, os.getcwd())}:{frames[-1].lineno} {frames[-1].name}"
                 if frames else f"{os.path.basename(filename)}:{lineno}")
        self.sources[where] += 1

    @property
    def total(self) -> int:
        return sum(self.sources.values())


def report(counter: SyncCounter, layer_steps: int, target: int):
    per = counter.total / layer_steps
    top = "; ".join(f"{n}x {w}" for w, n in counter.sources.most_common(4))
    detail = f"{per:.2f} blocking syncs per layer-step (target <= {target}) over {layer_steps}" + \
        (f"; sources: {top}" if top else "")
    return per <= target, detail, {"per_layer_step": per, "sources": dict(counter.sources)}


def kernel_case(torch, case: str):
    """The linear (Mixtral q/o, M=1) or the fused MoE (Qwen3 experts, M=1) called WARMUP + STEPS times."""
    from vllm_haq.kernels import ScaledInt8Gemm, triton_int8_moe_forward

    dev = "cuda"
    if case == "linear-triton":
        n, k = plan.LINEAR_SHAPES["mixtral-qo"]
        gemm = ScaledInt8Gemm(torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev),
                              torch.rand(n, 1, device=dev) * 1e-4, torch.bfloat16, backend="triton")
        x = torch.randn(1, k, device=dev).to(torch.bfloat16)
        return lambda: gemm(x)
    experts, top_k, hidden, inter = plan.MOE_SHAPES["qwen3"]
    slots = experts // 2
    w13 = torch.randint(-127, 128, (slots, 2 * inter, hidden), dtype=torch.int8, device=dev)
    w2 = torch.randint(-127, 128, (slots, hidden, inter), dtype=torch.int8, device=dev)
    s13, s2 = torch.rand(slots, 2 * inter, 1, device=dev) * 1e-4, torch.rand(slots, hidden, 1, device=dev) * 1e-4
    e2s = torch.cat([torch.arange(slots, dtype=torch.int32), torch.full((experts - slots,), -1, dtype=torch.int32)])
    e2s = e2s.to(dev)
    x = torch.randn(1, hidden, device=dev).to(torch.bfloat16)
    weights, ids = torch.topk(torch.softmax(torch.randn(1, experts, device=dev), -1), top_k)
    return lambda: triton_int8_moe_forward(x, weights, ids.int(), e2s, w13, s13, w2, s2)


def count_kernel(torch, case: str):
    fn = kernel_case(torch, case)
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    with SyncCounter(torch) as counter:
        counter.active = True
        for _ in range(STEPS):
            fn()
        counter.active = False
    torch.cuda.synchronize()
    return report(counter, STEPS, 0)


def count_engine(torch, layers, trace, prior, policy: str | None):
    """The engine's decode step, batch 1, routing on the device as vLLM's router leaves it."""
    from vllm_haq.offload import OffloadConfig

    config = OffloadConfig() if policy is None else OffloadConfig(policy=policy, slots_per_layer=1)
    engine = new_engine(torch, layers, config, "cuda", torch.bfloat16, prior)
    try:
        with SyncCounter(torch) as counter:
            def on_step(i):
                if i == WARMUP:
                    torch.cuda.synchronize()  # the warm-up's work done: only the counted steps' syncs count
                counter.active = WARMUP <= i < len(trace)
            serve(torch, engine, trace, "cuda", warmup=WARMUP, on_step=on_step)
    finally:
        engine.close()
    return report(counter, STEPS * SHAPE.layers, 1)


def main() -> int:
    st = Stage("syncs")
    names = plan.checks("syncs")
    st.plan(names)
    if st.dry:
        st.skip_all(names)
        return st.finish()
    import torch

    for case in ("linear-triton", "moe-triton"):
        st.run(f"syncs/{case}", count_kernel, torch, case)
    layers = [x.pinned() for x in make_layers(torch, SHAPE)]
    trace = make_trace(torch, SHAPE, WARMUP + STEPS, tokens=1)
    # the trace's inputs go to the device before counting: only the engine's own syncs are counted
    trace = [[(x.cuda(), w.cuda(), ids.cuda()) for x, w, ids in step] for step in trace]
    prior = routing_prior(torch, [[(x, w, ids.cpu()) for x, w, ids in step] for step in trace], SHAPE)
    st.run("syncs/engine-resident", count_engine, torch, layers, trace, prior, None)
    for policy in ("haq", "lru", "static"):
        st.run(f"syncs/engine-{policy}-1slot", count_engine, torch, layers, trace, prior, policy)
    for layer in layers:
        layer.release()
    return st.finish()


if __name__ == "__main__":
    sys.exit(main())
