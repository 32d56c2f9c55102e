"""vLLM adapter: the only package of vllm-haq that imports vLLM.

``register()`` is the ``vllm.general_plugins`` entry point; vLLM calls it once in
every process (API server, engine core, workers). Importing the config module
registers ``HAQConfig`` under the name "haq" (idempotent: a re-registration just
replaces the class with itself); the workers also get the ``haq_offload_stats``
RPC behind :func:`offload_stats`.
"""


def register() -> None:
    import vllm_haq.vllm.config  # noqa: F401  (registers "haq")
    from vllm_haq.vllm.engine_stats import install_worker_rpc

    install_worker_rpc()


def offload_stats(llm):
    """Per-worker offloading statistics of a ``vllm.LLM`` (see :mod:`vllm_haq.vllm.engine_stats`)."""
    from vllm_haq.vllm.engine_stats import offload_stats as impl

    return impl(llm)
