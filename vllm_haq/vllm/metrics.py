"""Expert-offloading statistics on vLLM's Prometheus ``/metrics``: a stat-logger plugin.

vLLM loads the classes of the ``vllm.stat_logger_plugins`` entry-point group (``STAT_LOGGER_PLUGINS_GROUP``,
vllm/plugins/__init__.py:26; ``load_stat_logger_plugin_factories``, vllm/v1/metrics/loggers.py:84, which
requires a ``StatLoggerBase`` subclass). ``AsyncLLM`` (vllm/v1/engine/async_llm.py:146-204) adds them to its
``StatLoggerManager``, which builds one per engine as ``factory(vllm_config, engine_index)``
(``PerEngineStatLoggerAdapter``, loggers.py:434) in the API-server process, and calls ``record()`` after
every batch of engine outputs (async_llm.py ``output_handler``) and ``log()`` every
``VLLM_LOG_STATS_INTERVAL`` s. ``/metrics`` serves prometheus_client's default ``REGISTRY`` (or a
multiprocess collector when ``PROMETHEUS_MULTIPROC_DIR`` is set: vllm/v1/metrics/prometheus.py:40,
vllm/entrypoints/serve/instrumentator/metrics.py), so metrics this logger creates with prometheus_client,
as ``PrometheusStatLogger`` does (loggers.py:473), appear there.

The channel: the offload engine runs in the engine-core/worker process, the logger in the API server. Both
see the same ``VllmConfig``, whose ``instance_id`` is set once in the API server (the time in ns, in
``VllmConfig.__post_init__``, vllm/config/vllm.py:1417) and travels, pickled, with the config to the engine
core. The worker of tensor-parallel rank 0 of each engine (data-parallel rank) and pipeline stage writes its
counters to a memory-mapped :class:`~vllm_haq.offload.board.CounterBoard` at :func:`board_path`; the logger
reads the boards of its engine on each ``record()`` and advances its Prometheus counters by the difference. Why not
``collective_rpc``: a stat logger has no handle on the engine client, and an RPC per engine step would
stall serving; why not the JSON ``stats_file``: see :mod:`vllm_haq.offload.board`. Nothing to configure:
the board exists while an engine offloads experts (the engine and the logger remove it at exit).

Metrics (labels ``model_name`` and ``engine`` as vLLM's own, ``layer`` = the model's decoder-layer index):
``vllm_haq_offload_{steps,hits,misses,fetches,prefetches,prefetch_hits,cpu_experts,cpu_expert_tokens,
bytes_h2d,recovered_faults}_total``, gauges ``vllm_haq_offload_hit_rate`` and
``vllm_haq_offload_prefetch_accuracy``, and per layer ``vllm_haq_offload_layer_{hits,misses,fetches,
cpu_expert_tokens}_total``. With several API servers (``--api-server-count`` > 1) each would add the same
differences, so the counters would be multiplied; vLLM itself then disables its logging stat logger.
"""

from __future__ import annotations

import atexit
import os
import tempfile

from prometheus_client import Counter, Gauge
from vllm.v1.metrics.loggers import StatLoggerBase

from vllm_haq.offload.board import PER_LAYER, TOTALS, read_board, remove_board

_HELP = {
    "steps": "MoE layer forward calls served with expert offloading",
    "hits": "Routed experts found in the device cache",
    "misses": "Routed experts not in the device cache",
    "fetches": "Misses copied into a device cache slot on demand",
    "prefetches": "Experts copied to the device ahead of use by the prefetcher",
    "prefetch_hits": "Prefetched experts routed at the step they were fetched for",
    "cpu_experts": "Misses computed by the CPU expert workers",
    "cpu_expert_tokens": "Tokens the CPU-computed experts covered",
    "bytes_h2d": "Expert bytes copied host to device (fetches and prefetches)",
    "recovered_faults": "Failed CPU jobs or copies recomputed from host memory",
}
_LABELS = ["model_name", "engine"]
_metrics: dict | None = None  # one set per process: prometheus_client refuses a name registered twice


def board_path(vllm_config, dp_rank: int, pp_rank: int) -> str:
    """Where the engine of data-parallel rank ``dp_rank`` (pipeline stage ``pp_rank``) of the server whose
    config is ``vllm_config`` keeps its counter board; the API server and the workers compute the same."""
    name = f"vllm-haq-offload-{vllm_config.instance_id}-dp{dp_rank}-pp{pp_rank}.bin"
    return os.path.join(tempfile.gettempdir(), name)


def _get_metrics() -> dict:
    global _metrics
    if _metrics is None:
        m = {k: Counter(f"vllm_haq_offload_{k}", h, _LABELS) for k, h in _HELP.items()}
        for k in PER_LAYER:
            m["layer_" + k] = Counter(f"vllm_haq_offload_layer_{k}", _HELP[k] + ", per MoE layer",
                                      _LABELS + ["layer"])
        m["hit_rate"] = Gauge("vllm_haq_offload_hit_rate", "hits / (hits + misses) since start",
                              _LABELS, multiprocess_mode="mostrecent")
        m["prefetch_accuracy"] = Gauge("vllm_haq_offload_prefetch_accuracy", "prefetch_hits / prefetches since start",
                                       _LABELS, multiprocess_mode="mostrecent")
        _metrics = m
    return _metrics


class HAQOffloadStatLogger(StatLoggerBase):
    """Per engine: mirrors the offload counters of that engine's workers into Prometheus (see the module)."""

    def __init__(self, vllm_config, engine_index: int = 0):
        self.labels = [str(vllm_config.model_config.served_model_name), str(engine_index)]
        pp = vllm_config.parallel_config.pipeline_parallel_size
        self.paths = [board_path(vllm_config, engine_index, p) for p in range(pp)]
        self.metrics = _get_metrics()
        self._seen: dict[tuple, int] = {}  # (stage, metric, layer) -> value already added
        self._children: dict[tuple, object] = {}  # (metric, layer) -> its labelled series
        self._pids: list[int | None] = [None] * pp
        for path in self.paths:  # a killed engine core leaves its board behind; the API server outlives it
            atexit.register(remove_board, path)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        self.refresh()

    def log(self) -> None:
        self.refresh()

    def log_engine_initialized(self) -> None:
        pass

    def refresh(self) -> None:
        """Advance the counters to the boards' values (microseconds: one small file read per pipeline stage)."""
        totals = dict.fromkeys(TOTALS, 0)
        found = False
        for stage, path in enumerate(self.paths):
            board = read_board(path)
            if board is None:
                continue
            found = True
            if board["pid"] != self._pids[stage]:  # a new engine process counts from zero again
                self._pids[stage] = board["pid"]
                self._seen = {k: v for k, v in self._seen.items() if k[0] != stage}
            for k, v in board["totals"].items():
                totals[k] += v
                self._advance((stage, k, None), v)
            for layer, row in board["layers"].items():
                for k, v in row.items():
                    self._advance((stage, "layer_" + k, str(layer)), v)
        if found:
            self._gauges(totals)

    def _advance(self, key: tuple, value: int) -> None:
        """``key``: (stage, metric, layer or None). The series exists (at 0) from the first board on."""
        _, metric, layer = key
        child = self._children.get((metric, layer))
        if child is None:
            extra = () if layer is None else (layer,)
            child = self._children[(metric, layer)] = self.metrics[metric].labels(*self.labels, *extra)
        delta = value - self._seen.get(key, 0)
        if delta > 0:
            self._seen[key] = value
            child.inc(delta)

    def _gauges(self, t: dict) -> None:
        routed = t["hits"] + t["misses"]
        if routed:
            self.metrics["hit_rate"].labels(*self.labels).set(t["hits"] / routed)
        if t["prefetches"]:
            self.metrics["prefetch_accuracy"].labels(*self.labels).set(t["prefetch_hits"] / t["prefetches"])
