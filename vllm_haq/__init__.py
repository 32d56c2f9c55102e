"""vllm-haq: Hessian-aware W8A8 int8 quantization and expert offloading for vLLM.

Importing this package does not import vLLM; the vLLM adapter lives in
``vllm_haq.vllm`` and is registered through the ``vllm.general_plugins`` entry point.
"""

__version__ = "0.1.0"
