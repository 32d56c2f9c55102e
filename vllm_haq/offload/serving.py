"""The offload engine's per-step pieces: layer state, where a step's results go, and how jobs are run.

Kept apart from :mod:`vllm_haq.offload.engine` (the step itself) so that each reads on its own.
"""

from __future__ import annotations

from concurrent.futures import Future

import torch

from vllm_haq.kernels import RouteGroups, expert_inter, new_route_buffer, write_routes
from vllm_haq.offload.store import ExpertTensors


def in_inference_mode(fn, *args):
    """Run ``fn`` on a worker thread under inference mode, like the model thread (vLLM's cache tensors
    are inference tensors; writing them outside inference mode is refused)."""
    with torch.inference_mode():
        return fn(*args)


def on_host(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to("cpu", torch.float32) if x.device.type != "cpu" else x


class InlineExecutor:
    """Runs each job at once in the calling thread, with a worker's interface (the CPU build: there the
    "device" is the same cores, so CPU experts and copies gain nothing from another thread)."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # surfaces at .result(), like a worker's
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass


def gate_up(x: torch.Tensor, w13, w2) -> torch.Tensor:
    """An expert job under tensor parallelism: the down projection's input only (see ``_down_projections``)."""
    return expert_inter(x, w13)


class StepOutputs:
    """Where one step's expert results go: each expert's weighted output straight into its route rows, or
    under tensor parallelism its down-projection input and the cache slot it was computed from (None: from
    host memory), kept until the all-shard max is known."""

    def __init__(self, x: torch.Tensor, topk_weights: torch.Tensor, groups: RouteGroups, sharded: bool,
                 topk_ids: torch.Tensor | None = None):
        self.topk_weights, self.groups, self.topk_ids = topk_weights, groups, topk_ids
        self._x, self._routes = x, None
        self.summed: torch.Tensor | None = None  # float32 [M, H]: the Triton MoE's hits, already summed over k
        self.inters: dict[int, tuple[torch.Tensor, int | None]] | None = {} if sharded else None

    @property
    def routes(self) -> torch.Tensor:
        """The step's per-route rows [M, k, H], zeroed when first needed: a step whose experts all ran in the
        fused Triton MoE (all-resident decode on a GPU) never allocates, zeroes or sums it."""
        if self._routes is None:
            self._routes = new_route_buffer(self._x, self.groups.top_k)
        return self._routes

    def result(self) -> torch.Tensor:
        """The MoE output, float32 [M, H]: the routes summed over k, plus the fused MoE's sum."""
        if self._routes is None:
            return self.summed if self.summed is not None else torch.zeros(self._x.shape, dtype=torch.float32,
                                                                            device=self._x.device)
        out = self._routes.sum(1)
        if self.summed is not None:
            out += self.summed
        return out

    def host_buffer(self) -> torch.Tensor:
        """Where experts computed from host memory write their routes: the step's route buffer itself on the CPU
        build, else a zeroed host buffer that :meth:`merge_host` adds in."""
        return self.routes if self.routes.device.type == "cpu" else torch.zeros(self.routes.shape)

    def merge_host(self, buffer: torch.Tensor) -> None:
        """Add a :meth:`host_buffer` to the routes (its experts' rows are zero on the device, the others here)."""
        if buffer is not self.routes:
            self.routes.add_(buffer.to(self.routes.device, non_blocking=True))

    def put(self, expert: int, y: torch.Tensor, slot: int | None) -> None:
        if self.inters is None:
            write_routes(self.routes, self.topk_weights, self.groups, expert, y)
        else:
            self.inters[expert] = (y, slot)


def cpu_worker_plan(fused: bool, requested: int | None, cores: int) -> tuple[int, int]:
    """(worker threads, kernel threads per worker) of the CPU-served experts beside a GPU (the CPU build runs
    them inline). ``requested``: the ``cpu_threads`` option.

    Fused (the CPU kernel): a layer-step's CPU experts are one call, and the step waits for it before the
    layer ends, so one worker is busy at a time: it gets the cores but two (or ``requested``): one for the model
    thread, one for the rest of a vLLM server (the API server process, the engine core's I/O threads). The call's
    OpenMP team waits at its barrier for its slowest thread, so one thread too many makes a rare call wait a
    scheduler slice: on a 2-core host with one other busy process, a team of 2 took 0.10 ms median but up to
    24 ms, a team of 1 at most 0.47 ms (a Qwen3 expert pair, 200 calls). The first H200 run had 4 workers of
    cores / 4 threads each, so a step's experts ran on 4 of 16 cores.
    Otherwise each expert is a job of two ScaledInt8Gemm: ``requested`` or cores / 4 (<= 8) workers, each an
    equal share of the cores. vLLM sets its GPU workers' OMP_NUM_THREADS (vllm/v1/executor/multiproc_executor.py
    1112-1122, vllm/v1/engine/utils.py 221-232); the kernel passes its thread count to every parallel region
    (``num_threads``), so that setting does not size these threads."""
    if fused:
        return 1, requested or max(1, cores - 2 if cores >= 4 else cores - 1)
    workers = requested or max(1, min(8, cores // 4))
    return workers, max(1, cores // workers)


class Layer:
    """One MoE layer's host store, cache slots and residency map."""

    def __init__(self, index: int, host: ExpertTensors):
        self.index = index
        self.host = host
        self.num_experts = host.count
        self.expert_bytes = host.expert_bytes()
        self.pos = -1
        self.slots = 0
        self.cache: ExpertTensors | None = None
        self.expert_of_slot: list[int] = []
        self.slot_of_expert = [-1] * self.num_experts
        self.last_use: list[int] = []
        self.step = 0
        self.slot_gemms: dict[int, tuple] = {}
        self.host_gemms: dict[int, tuple] = {}
        self.copying: dict[int, object] = {}  # slot -> its copy in flight (future on CPU, event on CUDA)
        self.prefetched: set[int] = set()
        self.predicted: torch.Tensor | None = None

    def place(self, slot: int, expert: int) -> int:
        """Residency bookkeeping for ``expert`` now in ``slot``; returns the evicted expert or -1."""
        old = self.expert_of_slot[slot]
        self.evict(slot)
        self.expert_of_slot[slot] = expert
        self.slot_of_expert[expert] = slot
        return old

    def evict(self, slot: int) -> None:
        """Mark ``slot`` empty."""
        old = self.expert_of_slot[slot]
        if old >= 0:
            self.slot_of_expert[old] = -1
        self.expert_of_slot[slot] = -1
        self.slot_gemms.pop(slot, None)
