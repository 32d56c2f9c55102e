"""The offload engine: serves MoE layers whose experts do not all fit on the device.

Per layer, the host store holds every expert and a device cache holds a few (the
slots). Per forward step, after routing:

1. misses the planner gives to the CPU are submitted to the CPU worker pool first
   (they run while the device works);
2. the first wave of misses the planner fetches starts copying into free slots
   (victims by policy; copy stream on CUDA, inline memcpy on the CPU build);
3. hits are computed on the device from their slots meanwhile, then each fetched
   wave as it lands (waves when a step routes to more experts than free slots);
4. CPU results are gathered into the same per-route buffer, which is summed over
   top-k in a fixed order — so the result is the all-resident result, whatever
   was served where (see :mod:`vllm_haq.kernels.moe`);
5. the prefetcher starts copying layer l+1's likely experts (haq policy).

Under tensor parallelism each rank holds a shard of every expert's intermediate
dimension and runs its own engine (its own cache, sized by its own shard bytes).
A route's down-projection input must then be quantized with its max over all
shards, so every job above computes only the gate/up half; one all-shard max of
fixed size [M·k, 1] is exchanged per layer and step (whatever each rank served
where), and the down projections follow (``_down_projections``).

The engine's parts: :mod:`.policy` decides (slots, splits, victims, prefetching), :mod:`.host_jobs` serves
the CPU's experts, :mod:`.serving` holds the per-step pieces, :mod:`.reporting` the counters and files.

No vLLM imports: the benchmark drives the same engine on a bare torch install.
The "device" may be the CPU itself (vLLM's CPU build): every path then runs, the
cache is a second host buffer and copies are memcpy.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from vllm_haq.kernels import (RouteGroups, cpu_expert_routes, cpu_fused_ok, cpu_moe_forward, expert_mlp,
                              select_backend, write_routes)
from vllm_haq.kernels.moe import all_shard_route_amax, route_rows
from vllm_haq.kernels import cpu_int8
from vllm_haq.offload.options import OffloadConfig
from vllm_haq.offload.cost import CPU_CALL_EXPERTS, CostModel, calibrate, cold_experts
from vllm_haq.offload.planner import eviction_scores
from vllm_haq.offload.policy import make_policy
from vllm_haq.offload.routing_stats import OffloadCounters, RoutingStatistics
from vllm_haq.offload.host_jobs import HostJobs
from vllm_haq.offload.reporting import Reporting
from vllm_haq.offload.serving import (InlineExecutor, Layer, StepOutputs, cpu_worker_plan, gate_up,
                                      in_inference_mode, on_host)
from vllm_haq.offload.store import ExpertTensors, copy_expert

log = logging.getLogger("vllm_haq.offload")

PREFETCH_MIN_P = 0.15  # prefetch an expert when P(used at the next layer) is at least this
CARRY_MAX_TOKENS = 64  # up to this many tokens, x travels to the host with the routed ids every step


class OffloadEngine(HostJobs, Reporting):
    """Expert cache + CPU workers + prefetcher for all MoE layers of one model."""

    def __init__(self, config: OffloadConfig, device: torch.device | str, out_dtype: torch.dtype,
                 routing: dict[str, torch.Tensor] | None = None, name: str = "model", cost: CostModel | None = None,
                 shard_amax: Callable[[torch.Tensor], torch.Tensor] | None = None, copy_thread: bool = False):
        """``cost``: a known cost model instead of calibrating at start (deterministic plans in tests).
        ``shard_amax``: the experts are tensor-parallel shards of their intermediate dimension; this maps a
        per-route max [M·k, 1] to the max over all ranks (a collective: called once per layer and step).
        ``copy_thread``: the CPU build copies experts on a copier thread instead of inline (a benchmark's
        emulated host->device link sleeps there, holding no core, like a DMA engine)."""
        self._copy_thread = copy_thread
        self.config = config
        self.policy = make_policy(config.policy)
        self.shard_amax = shard_amax
        self._job = expert_mlp if shard_amax is None else gate_up
        self.device = torch.device(device)
        self.out_dtype = out_dtype
        self.routing = routing
        self.name = name
        self.layers: dict[int, Layer] = {}
        self.order: list[Layer] = []
        self.counters = OffloadCounters()
        self.cost: CostModel | None = cost
        self.stats_model: RoutingStatistics | None = None
        self._started = False
        self._lock = threading.Lock()
        self._prev_routed: tuple[int, list[list[int]]] | None = None
        self._last_report = time.monotonic()
        self._pool: ThreadPoolExecutor | None = None
        self._copier: ThreadPoolExecutor | None = None
        self._copy_stream = None
        self._backend = select_backend(self.device)
        self._fused = False  # host experts (and on the CPU build the cache's) served by one CPU kernel call per step
        # how hits run: "cpu" (one kernel call), "triton" (one fused MoE), "loop" (per expert)
        self.slot_kernel = "loop"

    # ---- set-up -------------------------------------------------------------------------
    def add_layer(self, layer_index: int, host: ExpertTensors) -> None:
        """Register a layer's experts (host tensors); before the first forward only."""
        if self._started:
            raise RuntimeError(f"offload engine {self.name}: layer {layer_index} added after serving started")
        if self.device.type == "cuda":
            host = host.pinned()
        self.layers[layer_index] = Layer(layer_index, host)

    def _start(self) -> None:
        with self._lock:
            if self._started:
                return
            self.order = [self.layers[i] for i in sorted(self.layers)]
            for pos, layer in enumerate(self.order):
                layer.pos = pos
            num_layers, num_experts = len(self.order), self.order[0].num_experts
            if any(layer.num_experts != num_experts for layer in self.order):
                raise ValueError(f"offload engine {self.name}: MoE layers have different expert counts")
            self.stats_model = self._routing_statistics(num_layers, num_experts)
            # the largest expert (layers with explicit smoothing carry a vector more): a GiB budget holds
            expert_bytes = max(layer.host.expert_bytes() for layer in self.order)
            total = self.config.slots_for(num_layers, num_experts, expert_bytes)
            if total is None:
                per_layer = [num_experts] * num_layers
            elif self.config.slots_per_layer is not None:
                per_layer = [self.config.slots_per_layer] * num_layers
            else:
                per_layer = self.policy.slots(total, self.stats_model.prior_share)
            for layer, slots in zip(self.order, per_layer):
                self._allocate(layer, slots)
            cache_bytes = sum(layer.cache.nbytes() for layer in self.order if layer.cache is not None)
            self._fused = self.shard_amax is None and cpu_fused_ok(self.order[0].host.w13)
            threads, share = cpu_worker_plan(self._fused, self.config.cpu_threads, cpu_int8.host_cores())
            if self.device.type == "cpu":
                self._pool = InlineExecutor()
            else:
                self._pool = ThreadPoolExecutor(threads, thread_name_prefix="haq-cpu-expert",
                                                initializer=cpu_int8.set_threads_for_this_thread, initargs=(share,))
            if self.device.type == "cuda":
                self._copy_stream = torch.cuda.Stream(self.device)
            else:  # the CPU build: a copy is a memcpy on the same cores as the "device" work; a copier thread
                # would only add a hand-off to each (tiny experts: more than the copy itself)
                self._copier = (ThreadPoolExecutor(1, thread_name_prefix="haq-copy") if self._copy_thread
                                else InlineExecutor())
            self.slot_kernel = self._slot_kernel()
            if self.cost is None:
                self.cost = self._calibrate()
            self.counters.extra.update({
                "policy": self.config.policy,
                "layers": num_layers,
                "experts_per_layer": num_experts,
                "slots_per_layer": per_layer,
                "slots": sum(per_layer),
                "expert_bytes": expert_bytes,
                "device_cache_bytes": cache_bytes,
                "all_experts_bytes": sum(layer.num_experts * layer.host.expert_bytes() for layer in self.order),
                "cpu_threads": 0 if self.device.type == "cpu" else threads,  # 0: inline in the model thread
                "cpu_kernel_threads": share if self.device.type != "cpu" else cpu_int8.default_threads(),
                "cost_model": self.cost.as_dict(),
            })
            self._started = True
            log.info("vllm-haq offload (%s): policy %s, %d/%d experts on %s (%.1f MiB), slots per layer %s, "
                     "%d CPU workers of %d threads; H2D %.2f GB/s, CPU call %.3f ms + %.3f ms an expert + "
                     "%.3f ms/token", self.name, self.config.policy, sum(per_layer), num_layers * num_experts,
                     self.device, cache_bytes / 2**20, per_layer, threads, share, self.cost.h2d_bytes_per_s / 1e9,
                     self.cost.cpu_call_s * 1e3, self.cost.cpu_overhead_s * 1e3, self.cost.cpu_s_per_token * 1e3)

    def _routing_statistics(self, num_layers: int, num_experts: int) -> RoutingStatistics:
        r = self.routing
        indices = [layer.index for layer in self.order]
        if r is not None:
            if r["layer_indices"].tolist() == indices and r["expert_counts"].shape[1] == num_experts:
                return RoutingStatistics(num_layers, num_experts, r["expert_counts"], r["transition_counts"])
            log.warning("vllm-haq offload: routing statistics cover layers %s, the model has MoE layers %s; "
                        "starting from uniform statistics", r["layer_indices"].tolist(), indices)
        return RoutingStatistics(num_layers, num_experts)

    def _allocate(self, layer: Layer, slots: int) -> None:
        layer.slots = slots
        layer.expert_of_slot = [-1] * slots
        layer.last_use = [-1] * slots
        if slots == 0:
            return
        layer.cache = ExpertTensors.empty_like(layer.host, slots, self.device)
        share = self.stats_model.prior_share[layer.pos]
        hottest = sorted(range(layer.num_experts), key=lambda e: (-float(share[e]), e))[:slots]
        for slot, expert in enumerate(hottest):
            copy_expert(layer.cache, slot, layer.host, expert)
            layer.place(slot, expert)

    def _calibrate(self) -> CostModel:
        first = self.order[0]
        scratch = ExpertTensors.empty_like(first.host, 1, self.device)
        hidden = first.host.w13.shape[2]
        k = min(CPU_CALL_EXPERTS, first.num_experts)
        cold = cold_experts(self.order, k)

        def fused(stack: ExpertTensors, tokens: int, experts: list[int]) -> None:  # these experts' tokens, one call
            n = len(experts)
            cpu_moe_forward(torch.randn(tokens, hidden), torch.ones(tokens, n),
                            torch.tensor(experts, dtype=torch.int64).expand(tokens, n), stack)

        def cpu_mlp(tokens: int, n: int) -> None:  # as the engine runs a layer-step's CPU experts: on workers,
            layer, experts = next(cold)  # waited for; cold experts
            experts = experts[:n]
            if self._fused:
                self._pool.submit(in_inference_mode, fused, layer.host, tokens, experts).result()
            else:
                jobs = [self._pool.submit(in_inference_mode, expert_mlp, torch.randn(tokens, hidden),
                                          *layer.host.gemms(e, self.out_dtype)) for e in experts]
                for job in jobs:
                    job.result()

        def device_mlp(tokens: int) -> None:  # from a cache slot, as hits are computed
            if self._fused and self.device.type == "cpu":
                return fused(scratch, tokens, [0])
            rows = torch.randn(tokens, hidden, device=self.device)
            expert_mlp(rows, *scratch.gemms(0, self.out_dtype, self._backend))

        def issue_prefetch() -> None:
            if self._copy_stream is not None:
                with torch.cuda.stream(self._copy_stream):
                    copy_expert(scratch, 0, first.host, 0, non_blocking=True)
            else:
                self._copier.submit(in_inference_mode, copy_expert, scratch, 0, first.host, 0).result()

        cost = calibrate(lambda: copy_expert(scratch, 0, first.host, 0, non_blocking=True), cpu_mlp, self.device,
                         issue_prefetch, device_mlp, cpu_call_experts=k)
        if isinstance(self._copier, InlineExecutor):  # a prefetch is the copy itself, in the model thread
            cost.prefetch_issue_s = cost.fetch_s()
        if self._copy_stream is not None:
            self._copy_stream.synchronize()  # scratch is freed on return
        return cost

    # ---- serving --------------------------------------------------------------------------
    def forward(self, layer_index: int, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                record: bool = True) -> torch.Tensor:
        """The MoE output (float32 [M, H]) of layer ``layer_index``; ``record`` False for warm-up steps."""
        if not self._started:
            self._start()
        layer = self.layers[layer_index]
        # decode on CUDA: the activations and router weights come to the host with the ids (CPU experts need
        # them; one blocking transfer per layer-step instead of three), unless every expert has a slot
        carry = ((x, topk_weights) if x.device.type != "cpu" and x.shape[0] <= CARRY_MAX_TOKENS
                 and layer.slots < layer.num_experts else ())
        groups = RouteGroups(topk_ids, layer.num_experts, carry=carry)
        step = layer.step
        layer.step += 1
        routed = groups.routed
        hits = [e for e in routed if layer.slot_of_expert[e] >= 0]
        misses = {e: n for e, n in routed.items() if layer.slot_of_expert[e] < 0}
        hits_s = sum(self.cost.device_s(routed[e]) for e in hits)
        fetch, cpu = self.policy.split(misses, self.cost, layer.slots, device_busy_s=hits_s,
                                  admission=lambda: self._admission_values(layer, misses, hits, step))
        outputs = StepOutputs(x, topk_weights, groups, sharded=self.shard_amax is not None, topk_ids=topk_ids)

        jobs = self._submit_cpu(layer, x, groups, cpu, outputs)
        pending = list(fetch)
        wave, moved = self._issue_wave(layer, pending, exclude={layer.slot_of_expert[e] for e in hits}, step=step)
        if self.policy.prefetches and self.config.prefetch != "off" and layer.pos + 1 < len(self.order):
            # as soon as this layer has routed: the copies queue behind this layer's first demand wave and
            # run while this layer (and the next one's attention) computes
            self._prefetch(self.order[layer.pos + 1], layer, groups, record)
        moved += self._serve_on_device(layer, x, groups, hits, wave, pending, outputs, step)
        self._gather_cpu(layer, x, groups, cpu, jobs, outputs)
        if self.shard_amax is not None:
            self._down_projections(layer, x, outputs)
        out = outputs.result()

        if record:
            self._record(layer, groups, topk_ids, hits, misses, fetch, cpu, moved)
        layer.prefetched.clear()
        return out

    def _compute_on_device(self, layer: Layer, x, groups: RouteGroups, experts: list[int],
                           outputs: StepOutputs, step: int) -> None:
        ready = []
        for e in experts:
            s = layer.slot_of_expert[e]
            try:
                self._slot_ready(layer, s)  # only the slots this step reads wait: wrong prefetches stall nothing
            except Exception as exc:  # noqa: BLE001 - the slot is evicted; serve this expert from the host
                self._from_host_after_fault(layer, x, groups, e, outputs, exc)
                continue
            ready.append((e, s))
        if not ready:
            return
        if self.slot_kernel != "loop":
            for _, s in ready:
                layer.last_use[s] = step
            if self.slot_kernel == "cpu":  # the CPU build: all ready slots in one kernel call
                cpu_expert_routes(x, outputs.topk_weights, groups, layer.cache, [e for e, _ in ready],
                                  outputs.routes, index=[s for _, s in ready])
            else:
                self._triton_hits(layer, x, ready, outputs)
            return
        for e, s in ready:
            if s not in layer.slot_gemms:
                layer.slot_gemms[s] = layer.cache.gemms(s, self.out_dtype, self._backend, shard_amax=self.shard_amax)
            outputs.put(e, self._job(x[groups.routes_of(e)[0]], *layer.slot_gemms[s]), s)
            layer.last_use[s] = step

    def _slot_kernel(self) -> str:
        """How cache hits are computed, chosen once: on the CPU build one CPU kernel call per step; on CUDA one
        fused Triton MoE launch over the ready slots (its expert->slot map skips everything else) unless the
        experts carry explicit smoothing or TP shards (the per-expert loop serves those)."""
        first = self.order[0].host
        if self.device.type == "cpu":
            return "cpu" if self._fused else "loop"
        if self.shard_amax is None and first.smooth is None and self._backend == "triton":
            return "triton"
        return "loop"

    def _triton_hits(self, layer: Layer, x: torch.Tensor, ready: list[tuple[int, int]],
                     outputs: StepOutputs) -> None:
        """The ready slots' routes in one Triton MoE launch, summed into ``outputs.summed`` (no weights copied:
        the kernel reads each route's expert from its slot)."""
        from vllm_haq.kernels import triton_int8_moe_forward  # noqa: PLC0415 (imported on first use)

        slot_of = [-1] * layer.num_experts
        for e, s in ready:
            slot_of[e] = s
        if outputs.summed is None:
            outputs.summed = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        c = layer.cache
        # the routing is on the host already (RouteGroups): the kernel's rows are aligned there, sent in one copy
        triton_int8_moe_forward(x, outputs.topk_weights, outputs.topk_ids, None, c.w13, c.w13_scale, c.w2, c.w2_scale,
                                out=outputs.summed, down_rotation=c.down_rotation,
                                host_routing=(outputs.groups.ids_host, slot_of))

    def _down_projections(self, layer: Layer, x: torch.Tensor, outputs: StepOutputs) -> None:
        """Tensor parallelism: the down projections of every expert computed this step.

        Each route's input is quantized with its max over all ranks, exchanged in one call of fixed size
        [M·k, 1] (every rank makes it once per layer and step, whatever it served where). An expert runs on
        the slot it was computed from while that slot still holds it, else from host memory (a CPU job, a
        recovered fault, or a slot a later wave of this step reused)."""
        groups = outputs.groups
        plan = {}
        for e, (h, slot) in outputs.inters.items():
            if slot is not None and layer.expert_of_slot[slot] == e:
                plan[e] = (h, layer.slot_gemms[slot][1])
            else:
                plan[e] = (on_host(h), self._host_gemms(layer, e)[1])
        amax = all_shard_route_amax(plan, groups, x.shape[0], self.shard_amax, x.device)
        jobs = []
        for e, (h, w2) in plan.items():
            a = amax[route_rows(groups, e)].to(h.device)
            if h.device == x.device:
                write_routes(outputs.routes, outputs.topk_weights, groups, e, w2(h, amax=a).float())
            else:
                jobs.append((e, self._pool.submit(in_inference_mode, w2, h, None, a)))
        for e, job in jobs:
            write_routes(outputs.routes, outputs.topk_weights, groups, e, job.result().float())

    def _serve_on_device(self, layer: Layer, x, groups: RouteGroups, hits: list[int], wave: list,
                         pending: list[int], outputs: StepOutputs, step: int) -> int:
        """Compute the hits and the first ``wave`` of fetches, then each later wave as it lands, issuing the
        ``pending`` rest into the slots computed (a step may route to more experts than there are free slots).
        Returns the bytes of the later waves.

        With the fused Triton MoE the hits and the first wave are one launch, queued behind the wave's copy
        event: a launch costs ~0.6 ms of host time on an H200 host (five kernels and their Python) and the
        hits ~20 us of device time, so computing the hits apart, while the copies ran, cost more than it
        hid. Per-expert and CPU-kernel hits are computed first, overlapping the copies."""
        moved = 0
        first = [e for e, _ in wave]
        if self.slot_kernel == "triton":
            experts = hits + first
        else:
            self._compute_on_device(layer, x, groups, hits, outputs, step)
            experts = first
        while True:
            self._compute_on_device(layer, x, groups, experts, outputs, step)
            if not pending:
                return moved
            wave, n = self._issue_wave(layer, pending, exclude=set(), step=step)  # computed slots are free again
            if not wave:
                raise RuntimeError(f"offload engine {self.name}: layer {layer.index} has no slot to fetch into")
            moved += n
            experts = [e for e, _ in wave]

    def _issue_wave(self, layer: Layer, pending: list[int], exclude: set[int], step: int):
        """Start copying experts from the front of ``pending`` into slots not in ``exclude``, as many as
        there are such slots, as one batch; returns ([(expert, copy handle)], bytes)."""
        picks, busy = [], set(exclude)
        while pending:
            slot = self._victim(layer, exclude=busy, step=step)  # the slots picked before are excluded
            if slot is None:
                break
            busy.add(slot)
            picks.append((slot, pending.pop(0)))
        handles, moved = self._copy_batch(layer, picks)
        return [(e, h) for (_, e), h in zip(picks, handles)], moved

    def _copy_batch(self, layer: Layer, picks: list[tuple[int, int]]) -> tuple[list, int]:
        """Copy each (slot, expert) of ``picks`` off the model thread: on CUDA one stream switch and one event
        for the whole batch on the copy stream; on the CPU build inline (or on the copier thread). Returns
        (a handle per pick, bytes)."""
        if not picks:
            return [], 0
        for slot, expert in picks:
            layer.place(slot, expert)
        if self._copy_stream is not None:
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))  # the slots' last readers
            with torch.cuda.stream(self._copy_stream):
                try:
                    moved = sum(copy_expert(layer.cache, s, layer.host, e, non_blocking=True) for s, e in picks)
                except BaseException:
                    for s, _ in picks:
                        layer.evict(s)  # never serve a half-issued copy as a hit
                    raise
                event = torch.cuda.Event()
                event.record(self._copy_stream)
            handles = [event] * len(picks)
        else:
            handles = [self._copier.submit(in_inference_mode, copy_expert, layer.cache, s, layer.host, e)
                       for s, e in picks]
            moved = layer.expert_bytes * len(picks)
        for (slot, _), handle in zip(picks, handles):
            layer.copying[slot] = handle  # a later copy into this slot queues behind it (one copy queue, FIFO)
        return handles, moved

    def _slot_ready(self, layer: Layer, slot: int) -> None:
        """Wait for the copy into ``slot`` if one is in flight (a worker's copy error surfaces here)."""
        handle = layer.copying.pop(slot, None)
        if handle is None:
            return
        if isinstance(handle, Future):
            try:
                handle.result()
            except BaseException:
                layer.evict(slot)  # its contents are unknown: never serve them as a hit
                raise
        else:
            torch.cuda.current_stream(self.device).wait_event(handle)

    def _victim(self, layer: Layer, exclude: set[int], step: int, keep_above: float | None = None) -> int | None:
        candidates = [s for s in range(layer.slots) if s not in exclude]
        if not candidates:
            return None
        return self.policy.victim(layer, candidates, step, lambda: self.stats_model.share(layer.pos), keep_above)

    def _admission_values(self, layer: Layer, misses: dict[int, int], hits: list[int], step: int):
        """Keep-values of the misses and of the residents they would evict, lowest first (hits count as
        used now: once computed, a later wave may evict them)."""
        share = self.stats_model.share(layer.pos)
        hit_slots = {layer.slot_of_expert[e] for e in hits}
        slots = [s for s in range(layer.slots) if layer.expert_of_slot[s] >= 0]
        victims = eviction_scores(share, [step if s in hit_slots else layer.last_use[s] for s in slots], step,
                                  layer.predicted, [layer.expert_of_slot[s] for s in slots])
        victims = sorted(victims + [0.0] * (layer.slots - len(slots)))  # empty slots cost nothing to fill
        experts = list(misses)
        keep = dict(zip(experts, eviction_scores(share, [step] * len(experts), step, layer.predicted, experts)))
        return keep, victims

    # ---- prefetch -------------------------------------------------------------------------------
    def _prefetch(self, nxt: Layer, layer: Layer, groups: RouteGroups, record: bool) -> None:
        if self.config.prefetch == "auto" and not self.cost.prefetch_pays(1.0):
            return  # not even a certain hit would repay issuing a copy on this machine
        if nxt.slots >= nxt.num_experts:
            return  # every expert of the next layer has a slot: no copy, no eviction to predict for
        counts = torch.tensor(groups.counts, dtype=torch.float64)
        pred = self.stats_model.predict_next(layer.pos, counts)
        nxt.predicted = pred
        if nxt.slots == 0:
            return
        p = pred.tolist()  # one read, not one tensor index per expert (128 experts: ~0.4 ms a layer-step)
        want = [e for e in sorted(range(nxt.num_experts), key=lambda e: -p[e])
                if p[e] >= PREFETCH_MIN_P and nxt.slot_of_expert[e] < 0
                and (self.config.prefetch == "always" or self.cost.prefetch_pays(p[e]))]
        planned: set[int] = set()
        for e in want[: max(1, nxt.slots // 2)]:
            # evict only experts predicted less likely than the one coming in
            slot = self._victim(nxt, exclude=planned, step=nxt.step, keep_above=self._keep_value(nxt, e))
            if slot is None:
                break
            planned.add(slot)
            moved = self._prefetch_copy(nxt, slot, e)
            nxt.prefetched.add(e)
            if record:
                self.counters.prefetches += 1
                self.counters.bytes_h2d += moved

    def _keep_value(self, layer: Layer, expert: int) -> float:
        """Keep-value ``expert`` would have once resident (no recency yet)."""
        return eviction_scores(self.stats_model.share(layer.pos), [-1], layer.step, layer.predicted, [expert])[0]

    def _prefetch_copy(self, layer: Layer, slot: int, expert: int) -> int:
        return self._copy_batch(layer, [(slot, expert)])[1]

    def close(self) -> None:
        if self._started and self.config.stats_file:
            self.report()
        self._close_board()
        for pool in (self._pool, self._copier):
            if pool is not None:
                pool.shutdown(wait=True)
        if self._copy_stream is not None:  # prefetches still copying into the cache must land before it is freed
            self._copy_stream.synchronize()
        for layer in self.layers.values():  # host pages locked in place (vLLM's parameters) are unlocked
            layer.host.release()
