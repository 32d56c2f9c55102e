"""vLLM adapter: the only package of vllm-haq that imports vLLM.

``register()`` is the ``vllm.general_plugins`` entry point; vLLM calls it once in
every process (API server, engine core, workers). Importing the config module
registers ``HAQConfig`` under the name "haq" (idempotent: a re-registration just
replaces the class with itself).
"""


def register() -> None:
    import vllm_haq.vllm.config  # noqa: F401  (registers "haq")
