"""``HAQConfig``: the ``haq`` quantization method as vLLM sees it."""

from __future__ import annotations

import logging
from typing import Any

import torch
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.platforms import current_platform

from vllm_haq.format import (COMPRESSED_TENSORS, QUANT_METHOD, CheckpointError, HAQQuantConfig,
                             checkpoint_quant_config, from_compressed_tensors, validate_checkpoint)

log = logging.getLogger("vllm_haq")

_NOT_A_HAQ_CHECKPOINT = (
    "quantization='haq' needs a HAQ checkpoint: this model's config.json has no quantization_config. "
    "Convert it first: haq convert MODEL_DIR OUT_DIR"
)


@register_quantization_config(QUANT_METHOD)
class HAQConfig(QuantizationConfig):
    """W8A8 int8 (per-channel weights, dynamic per-token activations) from a HAQ checkpoint.

    Also serves llm-compressor's compressed-tensors W8A8 int8 checkpoints as they are, when asked to
    (``quantization="haq"``): their scheme is HAQ's arithmetic (``vllm_haq.format.from_compressed_tensors``),
    so they get HAQ's checks, kernels and expert offloading (without routing statistics: the planner
    starts uniform and learns online).
    """

    # the local directory of the validated checkpoint (a hub id's snapshot); (id, revision) until it is resolved
    checkpoint_dir: str | None = None
    pending_model: tuple[str, str | None] | None = None
    _checked_rope = False  # native_latent_rope_on_cpu ran (once, at the first layer of the model build)

    def __init__(self, qcfg: HAQQuantConfig | None = None):
        super().__init__()
        if qcfg is None:  # vLLM builds the class without arguments when config.json has no quantization_config
            raise CheckpointError(_NOT_A_HAQ_CHECKPOINT)
        self.qcfg = qcfg
        # MoE expert blocks (vLLM prefixes) whose experts carry explicit per-expert input_smooth
        self.explicit_smoothing = set(qcfg.smoothing.get("explicit") or [])

    def __repr__(self) -> str:
        return f"HAQConfig(format_version={self.qcfg.format_version}, ignore={self.qcfg.ignore})"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75  # int8 tensor cores (Turing and newer)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "HAQConfig":
        if not config:
            raise CheckpointError(_NOT_A_HAQ_CHECKPOINT)
        return cls(checkpoint_quant_config(config, "config.json: quantization_config"))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        if user_quant != QUANT_METHOD:
            return None  # never take a checkpoint the user did not ask HAQ to serve
        method = hf_quant_cfg.get("quant_method")
        if method == QUANT_METHOD:
            return QUANT_METHOD
        if method == COMPRESSED_TENSORS:
            # Asked for explicitly: a scheme HAQ cannot serve is an error naming the config key, not
            # vLLM's generic "does not match" message.
            if from_compressed_tensors(hf_quant_cfg, "config.json: quantization_config").input_rotation:
                # its rotation matrices are checkpoint tensors this method registers no parameter for
                raise CheckpointError("config.json: quantization_config.transform_config rotates layer inputs; "
                                      "quantization='haq' serves compressed-tensors checkpoints without transforms: "
                                      "`haq import SRC OUT` gives the HAQ checkpoint (input_rotation) it serves")
            return QUANT_METHOD
        return None

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        """Validate the whole checkpoint once, before any weight is loaded into the model.

        A hub id is validated at the first ``get_quant_method`` instead: its files are resolved into
        vLLM's ``load_config.download_dir`` (vllm_haq.vllm.checkpoint), which vLLM does not pass here but
        has set as the current config by then (model construction, before any weight is loaded)."""
        import os

        if os.path.isdir(model_name):
            self._validate(model_name)
        else:
            self.pending_model = (model_name, revision)

    def _validate(self, checkpoint_dir: str) -> None:
        # a compressed-tensors export of a HAQ checkpoint names its routing statistics outside
        # quantization_config: they seed the offload planner here too
        self.qcfg.routing_statistics = validate_checkpoint(checkpoint_dir).routing_statistics
        self.checkpoint_dir = checkpoint_dir

    def _resolve_pending(self) -> None:
        """Resolve and validate a hub id's checkpoint (see ``maybe_update_config``), once per process."""
        from vllm.config import get_current_vllm_config

        from vllm_haq.vllm.checkpoint import checkpoint_dir

        model, revision = self.pending_model
        self.pending_model = None
        self._validate(checkpoint_dir(model, revision, get_current_vllm_config().load_config.download_dir))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        from vllm_haq.vllm.linear import HAQLinearMethod
        from vllm_haq.vllm.moe_method import HAQMoEMethod

        if self.pending_model is not None:
            self._resolve_pending()
        if not self._checked_rope:
            self._checked_rope = True
            native_latent_rope_on_cpu()
        if isinstance(layer, LinearBase):
            if self._skipped(prefix):
                return UnquantizedLinearMethod()
            return HAQLinearMethod(self, prefix, self.qcfg.rotation_of(self._checkpoint_names(prefix), prefix))
        if isinstance(layer, RoutedExperts):
            return HAQMoEMethod(self, layer.moe_config, prefix)
        if isinstance(layer, ParallelLMHead) and current_platform.is_cpu():
            from vllm_haq.vllm.head import Float32ChunkedHeadMethod

            return Float32ChunkedHeadMethod()
        return None

    def _skipped(self, prefix: str) -> bool:
        """True if the module (or, for fused modules, its checkpoint shards) is in ``ignore``."""
        shards = self._checkpoint_names(prefix)
        skipped = [self.qcfg.is_ignored(s) for s in shards]
        if any(skipped) and not all(skipped):
            raise CheckpointError(
                f"quantization_config.ignore covers only some of {shards}, which vLLM fuses into one "
                f"layer {prefix!r}; ignore all of them or none"
            )
        return all(skipped)

    def _checkpoint_names(self, prefix: str) -> list[str]:
        last = prefix.rsplit(".", 1)[-1]
        parts = self.packed_modules_mapping.get(last)
        if not parts:
            return [prefix]
        base = prefix[: -len(last)]
        return [base + p for p in parts]


def native_latent_rope_on_cpu() -> None:
    """Serve DeepSeek's latent attention on vLLM's CPU build with the torch RoPE instead of the C++ one.

    vLLM 0.32's CPU ``rotary_embedding`` op (``model_executor/layers/rotary_embedding/base.py:298-318``,
    ``_custom_ops.rotary_embedding``) rotates a 3-D query [tokens, heads, rotary dim] wrongly when heads > 1 (the
    2-D [tokens, heads * dim] tensors of other models are right), and the latent attention passes exactly that
    (``model_executor/layers/mla.py:227-230``): stock vLLM's DeepSeek on CPU drifts from position 1 on
    (tests/test_deepseek.py measured |Δ log p| up to 0.8 on a tiny model; 2e-6 with the torch path). Called while
    the model is built (the current config is set, and the first linear comes before the attention's RoPE is
    made): adds ``-rotary_embedding`` to ``compilation_config.custom_ops`` unless the user named the op."""
    from vllm.config import get_current_vllm_config

    if not current_platform.is_cpu():
        return
    vllm_config = get_current_vllm_config()
    if vllm_config.model_config is None or not getattr(vllm_config.model_config, "use_mla", False):
        return
    ops = vllm_config.compilation_config.custom_ops
    if "+rotary_embedding" not in ops and "-rotary_embedding" not in ops:
        ops.append("-rotary_embedding")
        log.warning("vllm-haq: latent attention on CPU: RoPE runs in torch (vLLM's CPU rotary_embedding op "
                    "mis-rotates multi-head 3-D queries)")
