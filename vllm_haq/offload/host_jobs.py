"""CPU-served experts of the offload engine: handing a step's misses to the CPU, gathering them, and
recomputing once from host memory when a job or a copy failed.

With the CPU kernel (``cpu_int8.moe_routes``) all of a step's CPU experts are one job; under tensor
parallelism, or without the kernel, each expert is a job of two ``ScaledInt8Gemm``.
"""

from __future__ import annotations

import logging

import torch

from vllm_haq.kernels import RouteGroups, cpu_expert_routes
from vllm_haq.offload.serving import Layer, StepOutputs, in_inference_mode, on_host

log = logging.getLogger("vllm_haq.offload")


class HostJobs:
    """Mixin of :class:`vllm_haq.offload.engine.OffloadEngine` (uses its pool, counters, name and job)."""

    def _submit_cpu(self, layer: Layer, x: torch.Tensor, groups: RouteGroups, experts: list[int],
                    outputs: StepOutputs):
        """Hand ``experts`` to the CPU workers: one kernel call for all of them (fused), else a job each."""
        if not experts:
            return []
        x_host, w_host = _host_inputs(x, groups, outputs)
        if self._fused:
            groups.host_routes()  # built here, not raced for by the worker
            target = outputs.host_buffer()
            job = self._pool.submit(in_inference_mode, cpu_expert_routes, x_host, w_host, groups, layer.host,
                                    experts, target)
            return [(tuple(experts), job, target)]
        return [(e, self._pool.submit(in_inference_mode, self._job, *self._host_job(layer, x_host, groups, e)), None)
                for e in experts]

    def _gather_cpu(self, layer: Layer, x: torch.Tensor, groups: RouteGroups, experts: list[int], jobs: list,
                    outputs: StepOutputs) -> None:
        """Wait for the CPU jobs and put their routes with the device's (a failed job is recomputed once)."""
        for e, job, target in jobs:
            if target is None:
                try:
                    y = job.result()
                except Exception as exc:  # noqa: BLE001 - any CPU job failure: recompute once
                    y = self._recover(layer, x, groups, e, "its CPU job", exc)
                outputs.put(e, y, None)
                continue
            try:
                job.result()
            except Exception as exc:  # noqa: BLE001 - recompute the experts of the failed call once (their
                # rows are all rewritten; the other rows are not theirs)
                self._recover_fused(layer, x, groups, list(e), target, outputs, "its CPU job", exc)
            outputs.merge_host(target)

    def _recover_fused(self, layer: Layer, x: torch.Tensor, groups: RouteGroups, experts: list[int],
                       target: torch.Tensor, outputs: StepOutputs, what: str, exc: BaseException) -> None:
        """:meth:`_recover` for the fused path: ``experts`` once more from host memory into the host buffer
        ``target`` (the step's routes themselves on the CPU build)."""
        log.warning("vllm-haq offload (%s): layer %d experts %s: %s failed (%s: %s); recomputing from host memory",
                    self.name, layer.index, experts, what, type(exc).__name__, exc)
        try:
            in_inference_mode(cpu_expert_routes, *_host_inputs(x, groups, outputs), groups, layer.host, experts,
                              target)
        except Exception as again:
            raise RuntimeError(f"offload engine {self.name}: layer {layer.index} experts {experts}: {what} failed "
                               f"({exc}) and recomputing them from host memory failed too ({again})") from again
        self.counters.recovered_faults += 1

    def _host_job(self, layer: Layer, x_host: torch.Tensor, groups: RouteGroups, expert: int):
        """(rows, w13, w2) to compute ``expert``'s routes from host memory."""
        t, _ = groups.routes_of(expert)
        return (x_host[t.to(x_host.device)], *self._host_gemms(layer, expert))

    def _host_gemms(self, layer: Layer, expert: int) -> tuple:
        if expert not in layer.host_gemms:
            layer.host_gemms[expert] = layer.host.gemms(expert, self.out_dtype, shard_amax=self.shard_amax)
        return layer.host_gemms[expert]

    def _recover(self, layer: Layer, x: torch.Tensor, groups: RouteGroups, expert: int, what: str,
                 exc: BaseException) -> torch.Tensor:
        """A CPU job or a copy failed: compute the expert once more from host memory, in this thread.

        Inside vLLM an exception here would stop the engine for every request of the batch, so a
        transient fault is absorbed (and counted); a second failure is this step's error.
        """
        log.warning("vllm-haq offload (%s): layer %d expert %d: %s failed (%s: %s); recomputing it from host "
                    "memory", self.name, layer.index, expert, what, type(exc).__name__, exc)
        try:
            y = in_inference_mode(self._job, *self._host_job(layer, on_host(x), groups, expert))
        except Exception as again:
            raise RuntimeError(f"offload engine {self.name}: layer {layer.index} expert {expert}: {what} failed "
                               f"({exc}) and recomputing it from host memory failed too ({again})") from again
        self.counters.recovered_faults += 1
        return y

    def _from_host_after_fault(self, layer: Layer, x, groups: RouteGroups, expert: int, outputs: StepOutputs,
                               exc: BaseException) -> None:
        if not self._fused:
            outputs.put(expert, self._recover(layer, x, groups, expert, "its copy to the device", exc), None)
            return
        target = outputs.host_buffer()
        self._recover_fused(layer, x, groups, [expert], target, outputs, "its copy to the device", exc)
        outputs.merge_host(target)


def _host_inputs(x: torch.Tensor, groups: RouteGroups, outputs: StepOutputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's activations and router weights on the host: the copies that came with the routed ids at
    decode on CUDA, else copied now."""
    return groups.carried or (on_host(x), on_host(outputs.topk_weights))
