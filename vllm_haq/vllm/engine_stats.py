"""Offloading statistics from a running vLLM engine (Python API)."""

from __future__ import annotations

_RPC = "haq_offload_stats"
_WEIGHTS_RPC = "haq_weight_bytes"


def _worker_offload_stats(worker) -> dict | None:
    """Runs in each worker: the statistics of the model's offload engine, or None without offloading."""
    from vllm_haq.vllm.moe_method import HAQMoEMethod

    for module in worker.get_model().modules():
        method = getattr(module, "quant_method", None)
        if isinstance(method, HAQMoEMethod) and method.engine is not None:
            return method.engine.stats()
    return None


def _worker_weight_bytes(worker) -> dict:
    """Runs in each worker: vLLM's own measurement of the memory model loading took (GPU model runner;
    None where the runner does not measure it, like the CPU build's) and the bytes of the loaded model's
    parameters (shared ones once) by dtype. The CPU build moves unquantized linear weights into oneDNN
    handles and leaves empty parameters behind, so there the parameter bytes cover what stays a parameter
    (HAQ's int8 weights and scales, embeddings, norms), not the bf16 linear weights."""
    model = worker.get_model()
    by_dtype: dict[str, int] = {}
    for p in model.parameters():  # tied parameters are yielded once
        key = str(p.dtype).replace("torch.", "")
        by_dtype[key] = by_dtype.get(key, 0) + p.numel() * p.element_size()
    measured = getattr(getattr(worker, "model_runner", None), "model_memory_usage", None)
    return {"model_memory_usage": None if measured is None else int(measured),
            "parameter_bytes": sum(by_dtype.values()), "parameter_bytes_by_dtype": by_dtype}


def install_worker_rpc() -> None:
    """Give vLLM's workers ``haq_offload_stats`` and ``haq_weight_bytes`` methods (what
    ``worker_extension_cls`` would add)."""
    from vllm.v1.worker.worker_base import WorkerBase

    if not hasattr(WorkerBase, _RPC):
        setattr(WorkerBase, _RPC, _worker_offload_stats)
    if not hasattr(WorkerBase, _WEIGHTS_RPC):
        setattr(WorkerBase, _WEIGHTS_RPC, _worker_weight_bytes)


def offload_stats(llm) -> list[dict | None]:
    """Per-worker offload statistics of ``llm`` (a ``vllm.LLM``): hits, misses, fetches, CPU
    expert-tokens, bytes moved, prefetch accuracy, cache layout and the calibrated cost model.
    None for a worker that serves without offloading."""
    return llm.collective_rpc(_RPC)


def weight_bytes(llm) -> list[dict]:
    """Per worker: ``model_memory_usage`` (vLLM's measurement of model loading, GPU runner only, else None)
    and the bytes of the model's parameters by dtype as vLLM holds them after loading (HAQ's int8 weights
    stay int8; with expert offloading the host copies of all experts are parameters, the engine's device
    cache is ``offload_stats``' ``device_cache_bytes``). See ``_worker_weight_bytes`` for the CPU build."""
    return llm.collective_rpc(_WEIGHTS_RPC)
