"""Offloading statistics from a running vLLM engine (Python API)."""

from __future__ import annotations

_RPC = "haq_offload_stats"


def _worker_offload_stats(worker) -> dict | None:
    """Runs in each worker: the statistics of the model's offload engine, or None without offloading."""
    from vllm_haq.vllm.moe import HAQMoEMethod

    for module in worker.get_model().modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, HAQMoEMethod) and method.engine is not None:
            return method.engine.stats()
    return None


def install_worker_rpc() -> None:
    """Give vLLM's workers a ``haq_offload_stats`` method (what ``worker_extension_cls`` would add)."""
    from vllm.v1.worker.worker_base import WorkerBase

    if not hasattr(WorkerBase, _RPC):
        setattr(WorkerBase, _RPC, _worker_offload_stats)


def offload_stats(llm) -> list[dict | None]:
    """Per-worker offload statistics of ``llm`` (a ``vllm.LLM``): hits, misses, fetches, CPU
    expert-tokens, bytes moved, prefetch accuracy, cache layout and the calibrated cost model.
    None for a worker that serves without offloading."""
    return llm.collective_rpc(_RPC)
