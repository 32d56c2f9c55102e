"""Synthetic MoE layers and routing for driving :class:`vllm_haq.offload.OffloadEngine` outside vLLM
(the ``offload`` and ``syncs`` stages)."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    layers: int
    experts: int
    top_k: int
    hidden: int
    inter: int


def make_layers(torch, shape: Shape, seed: int = 0) -> list:
    """Random int8 experts with per-channel scales in host memory (generated on the GPU when there is one:
    torch's CPU generator makes ~270 M int8/s)."""
    from vllm_haq.offload import ExpertTensors

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(seed)
    e, h, i = shape.experts, shape.hidden, shape.inter

    def ints(*size):
        return torch.randint(-127, 128, size, dtype=torch.int8, generator=gen, device=dev).cpu()

    def scales(*size, k):  # outputs of order 1 for full-range weights and randn inputs
        return ((torch.rand(*size, generator=gen, device=dev) * 0.5 + 0.75) / (40 * math.sqrt(k))).float().cpu()

    return [ExpertTensors(ints(e, 2 * i, h), scales(e, 2 * i, 1, k=h), ints(e, h, i), scales(e, h, 1, k=i))
            for _ in range(shape.layers)]


def make_trace(torch, shape: Shape, steps: int, tokens: int, seed: int = 1) -> list[list[tuple]]:
    """[step][layer] -> (x [T, H], topk weights [T, k], topk ids int32 [T, k]) on the CPU: skewed per-layer
    popularity, and each token keeps its previous step's experts half of the time (temporal locality)."""
    g = torch.Generator().manual_seed(seed)
    pop = torch.rand(shape.layers, shape.experts, generator=g) ** 3 + 0.01  # a few hot experts per layer
    prev = [torch.multinomial(pop[layer], shape.top_k, generator=g).repeat(tokens, 1) for layer in range(shape.layers)]
    trace = []
    for _ in range(steps):
        step = []
        for layer in range(shape.layers):
            ids = torch.stack([prev[layer][t] if torch.rand(1, generator=g) < 0.5
                               else torch.multinomial(pop[layer], shape.top_k, generator=g) for t in range(tokens)])
            prev[layer] = ids
            w = torch.softmax(torch.randn(tokens, shape.top_k, generator=g), -1)
            step.append((torch.randn(tokens, shape.hidden, generator=g), w, ids.int()))
        trace.append(step)
    return trace


def routing_prior(torch, trace, shape: Shape) -> dict:
    """The trace's routing counts in the checkpoint's statistics format (what `haq convert` records)."""
    counts = torch.zeros(shape.layers, shape.experts, dtype=torch.int64)
    for step in trace:
        for layer, (_, _, ids) in enumerate(step):
            counts[layer] += torch.bincount(ids.reshape(-1).long(), minlength=shape.experts)
    trans = torch.ones(shape.layers - 1, shape.experts, shape.experts, dtype=torch.int64)
    return {"expert_counts": counts, "transition_counts": trans, "layer_indices": torch.arange(shape.layers)}


def new_engine(torch, layers: list, config, device: str, out_dtype, prior=None, cost=None, engine_cls=None):
    from vllm_haq.offload import OffloadEngine

    # on the CPU (dry runs) the copies go to a copier thread, as they go to a copy stream on CUDA: the checks of
    # asynchronous fills (delayed copies, the sabotaged wait) need copies that land later
    engine = (engine_cls or OffloadEngine)(config, device, out_dtype, routing=prior, cost=cost, name="gpu-check",
                                           copy_thread=device == "cpu")
    for i, experts in enumerate(layers):
        engine.add_layer(i, experts)
    return engine


def serve(torch, engine, trace, device: str, warmup: int = 0, on_step=None) -> list:
    """Run every layer-step of ``trace`` through ``engine``; returns the outputs (float32, on ``device``).
    ``on_step(i)`` runs before step ``i`` and ``on_step(len(trace))`` after the last (the syncs stage counts
    between those calls)."""
    outs = []
    for i, step in enumerate(trace):
        if on_step is not None:
            on_step(i)
        for layer, (x, w, ids) in enumerate(step):
            outs.append(engine.forward(layer, x.to(device), w.to(device), ids.to(device), record=i >= warmup))
    if on_step is not None:
        on_step(len(trace))
    if device == "cuda":
        torch.cuda.synchronize()
    return outs


@contextlib.contextmanager
def delayed_copies(torch, cpu_delay_s: float = 0.005, gpu_cycles: int = 2_000_000):
    """Every asynchronous slot fill (copy stream on CUDA, copier thread on the CPU) first writes garbage into
    the slot, then waits (a spin kernel of ``gpu_cycles`` on the copy stream, ~1 ms on an H200, or a sleep of
    ``cpu_delay_s``), then copies. A reader that does not wait for the fill reads garbage or the evicted expert;
    one that waits sees the real expert. Synchronous fills (the initial placement) are left alone."""
    import vllm_haq.offload.engine as engine_module

    real = engine_module.copy_expert

    def slow_copy(dst, slot, src, expert, non_blocking=False):
        on_cuda = dst.w13.is_cuda
        asynchronous = (torch.cuda.current_stream() != torch.cuda.default_stream() if on_cuda
                        else threading.current_thread() is not threading.main_thread())
        if asynchronous:
            for t in dst.parts():
                t[slot].fill_(1)
            if on_cuda:
                torch.cuda._sleep(gpu_cycles)
            else:
                time.sleep(cpu_delay_s)
        return real(dst, slot, src, expert, non_blocking)

    engine_module.copy_expert = slow_copy
    try:
        yield
    finally:
        engine_module.copy_expert = real
