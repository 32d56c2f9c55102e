"""What the offload engine tells users: counters of served steps, the routing it saw, the statistics file.

A mixin of :class:`vllm_haq.offload.engine.OffloadEngine` (its counters, routing statistics and config).
With ``metrics_file`` set (the vLLM adapter does, see :mod:`vllm_haq.vllm.metrics`) every served step's
counters also go to a :class:`~vllm_haq.offload.board.CounterBoard` that vLLM's API server exports to Prometheus.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from vllm_haq.format import write_json_atomic
from vllm_haq.kernels import RouteGroups
from vllm_haq.offload.board import CounterBoard
from vllm_haq.offload.serving import Layer
from vllm_haq.offload.routing_stats import LIVE_ROUTING_KEY

log = logging.getLogger("vllm_haq.offload")


class Reporting:
    metrics_file: str | None = None  # where the counter board goes; None: no board
    _board: CounterBoard | None = None

    def _record(self, layer: Layer, groups: RouteGroups, topk_ids, hits, misses, fetch, cpu, moved) -> None:
        c = self.counters
        c.steps += 1
        c.hits += len(hits)
        c.misses += len(misses)
        c.fetches += len(fetch)
        c.cpu_experts += len(cpu)
        c.cpu_expert_tokens += sum(misses[e] for e in cpu)
        c.bytes_h2d += moved
        c.prefetch_hits += sum(1 for e in groups.routed if e in layer.prefetched)
        if self.metrics_file:
            self._publish(layer, (len(hits), len(misses), len(fetch), sum(misses[e] for e in cpu)))
        ids = groups.id_rows()  # the host copy RouteGroups made: no second transfer
        prev = self._prev_routed[1] if self._prev_routed and self._prev_routed[0] == layer.pos - 1 else None
        self.stats_model.record(layer.pos, groups.counts, prev, ids)
        self._prev_routed = (layer.pos, ids)
        if self.config.stats_file and time.monotonic() - self._last_report >= self.config.stats_interval_s:
            self.report()

    def _publish(self, layer: Layer, per_layer: tuple[int, int, int, int]) -> None:
        if self._board is None:  # first served step: every layer is known
            self._board = CounterBoard(self.metrics_file, [x.index for x in self.order])
        self._board.publish(self.counters, layer.pos, per_layer, totals=layer.pos == len(self.order) - 1)

    def _close_board(self) -> None:
        if self._board is not None:
            self._board.close()
            self._board = None

    def stats(self) -> dict:
        """Counters of served steps plus the cache layout and the calibrated cost model."""
        d = self.counters.as_dict()
        d["started"] = self._started
        return d

    def report(self) -> None:
        """Log the statistics and write them to ``stats_file`` (atomically) when configured."""
        self._last_report = time.monotonic()
        s = self.stats()
        log.info("vllm-haq offload (%s): hit rate %s, hits %d, misses %d, fetches %d, prefetches %d "
                 "(accuracy %s), CPU expert-tokens %d, %.1f MiB host->device", self.name, s["hit_rate"], s["hits"],
                 s["misses"], s["fetches"], s["prefetches"], s["prefetch_accuracy"], s["cpu_expert_tokens"],
                 s["bytes_h2d"] / 2**20)
        path = self.config.stats_file
        if path:
            dump = {"time": time.time(), "pid": os.getpid(), "model": self.name, **s}
            if self.stats_model is not None:  # served routing counts, read by haq stats --live
                dump[LIVE_ROUTING_KEY] = self.stats_model.served([layer.index for layer in self.order])
            write_json_atomic(path, dump, indent=None, per_process=True)

    def routing_counts(self) -> torch.Tensor | None:
        """Online (decayed) expert counts [L, E] of served steps, for ``haq stats --live``."""
        if self.stats_model is None:
            return None
        self.stats_model.flush()
        return self.stats_model.online.clone()
