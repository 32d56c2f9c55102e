"""Expert offloading engine (host store, device cache, planner, CPU workers, prefetcher); see docs/architecture.md.

No vLLM imports: :mod:`vllm_haq.vllm.moe_method` drives :class:`OffloadEngine` when an expert
budget below "all" is configured, and ``benchmarks/offload.py`` drives it on a bare
torch + Triton install.
"""

from vllm_haq.offload.options import (BUDGET_KEYS, ENV_VARS, POLICIES, OffloadConfig, OffloadConfigError,
                                     parse_offload_config)
from vllm_haq.offload.engine import OffloadEngine
from vllm_haq.offload.store import ExpertTensors

__all__ = ["BUDGET_KEYS", "ENV_VARS", "POLICIES", "OffloadConfig", "OffloadConfigError", "parse_offload_config",
           "OffloadEngine", "ExpertTensors"]
