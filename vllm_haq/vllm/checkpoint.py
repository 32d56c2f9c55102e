"""Where a served checkpoint's files are: its directory, or the snapshot of a hub id, found as vLLM finds it.

The plugin reads files of the checkpoint itself: every shard's header (the validation before loading) and
``haq_routing.safetensors`` (the offload planner's prior). vLLM 0.32 leaves ``model_config.model`` a hub id
when the hub is online (with ``HF_HUB_OFFLINE=1`` its EngineArgs already replaces a cached id by the snapshot
path: vllm/engine/arg_utils.py:907-921, through transformers_utils/repo_utils.py:286 ``get_model_path``), and
downloads the files it needs itself (paths below under vllm/model_executor/model_loader/): from ModelScope when
``VLLM_USE_MODELSCOPE`` (``maybe_download_from_modelscope``, weight_utils.py:156-188), else with
``huggingface_hub.snapshot_download`` at ``model_config.revision`` into ``load_config.download_dir`` with
``local_files_only=HF_HUB_OFFLINE``, under ``get_lock(model, download_dir)`` (weight_utils.py:91): the config
files in ``get_quant_config`` (weight_utils.py:323-345), the weights in ``download_weights_from_hf``
(weight_utils.py:432-537; ``local_only`` at :461, the call at :514-523), called by the default loader's
``_prepare_weights`` when the model is not a directory (default_loader.py:163 and :213-221). Resolving the
same way here (same source, revision, cache and lock) reads the very files vLLM loads, and fetches the routing
statistics, which vLLM itself skips when an index lists the weights (weight_utils.py:476-491).
``HAQConfig.maybe_update_config`` gets the id and revision but not ``download_dir`` (vllm/config/vllm.py:914-918),
hence the resolution at its first ``get_quant_method``.
"""

from __future__ import annotations

import os

from vllm_haq.format import CHECKPOINT_FILES, resolve_model


def checkpoint_dir(model: str, revision: str | None = None, download_dir: str | None = None) -> str:
    """The local directory holding ``model``'s checkpoint files (a ``ModelNotFoundError`` if there is none)."""
    if os.path.isdir(model):
        return model
    from vllm.model_executor.model_loader.weight_utils import get_lock, maybe_download_from_modelscope

    local = maybe_download_from_modelscope(model, revision, download_dir, allow_patterns=list(CHECKPOINT_FILES))
    if local:
        return local
    with get_lock(model, download_dir):
        return resolve_model(model, revision, download_dir, allow_patterns=CHECKPOINT_FILES, ignore_patterns=())
