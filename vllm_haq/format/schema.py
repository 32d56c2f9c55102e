"""HAQ checkpoint schema: names, the two int8 schemes, ``quantization_config`` and model facts.

A HAQ checkpoint is an ordinary Hugging Face model directory whose
``config.json`` carries ``quantization_config = {"quant_method": "haq",
"format_version": 1, ...}``. Per quantized linear (or expert projection) ``P``:

* ``P.weight``        int8    [out, in]
* ``P.weight_scale``  float32 [out, 1]   (per output channel, > 0, finite)
* ``P.input_smooth``  float32 [in]       optional: activations are divided by it
                                          before per-token quantization
* ``P.bias``          unchanged (model dtype)

Format version 2 adds ``quantization_config.input_rotation``: module name →
block size b. Such a layer's activations are rotated by the block-diagonal
normalized Hadamard matrix R of order b (after any ``input_smooth``) before
per-token quantization, and its ``weight`` holds W R (``vllm_haq.quant.rotation``).
A checkpoint without rotated layers is written as version 1, which every
reader understands; a version-1 reader refuses version 2 instead of serving
the rotated layers unrotated.

Routing statistics of MoE models live in ``haq_routing.safetensors``:
``expert_counts`` int64 [L, E], ``transition_counts`` int64 [L-1, E, E]
(routes of a token at MoE layer l → its routes at MoE layer l+1) and
``layer_indices`` int64 [L] (decoder-layer index of each MoE layer); the file's
metadata key ``haq_routing`` holds JSON ``{"tokens": N, "corpus": [...]}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from vllm_haq.errors import HAQError
from vllm_haq.quant.rotation import is_block_size

QUANT_METHOD = "haq"
FORMAT_VERSION = 1
ROTATION_FORMAT_VERSION = 2  # the first version with quantization_config.input_rotation
SUPPORTED_FORMAT_VERSIONS = (1, 2)
ROUTING_FILE = "haq_routing.safetensors"
ROUTING_METADATA_KEY = "haq_routing"  # safetensors metadata: JSON {"tokens": int, "corpus": [names]}
CONFIG_FILE = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"

WEIGHT = "weight"
WEIGHT_SCALE = "weight_scale"
INPUT_SMOOTH = "input_smooth"

WEIGHT_DTYPE = torch.int8
SCALE_DTYPE = torch.float32

COMPRESSED_TENSORS = "compressed-tensors"
CT_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # llm-compressor: the model dtype

# compressed-tensors' QuantizationArgs vocabulary for the two schemes.
WEIGHT_SCHEME = {
    "num_bits": 8,
    "type": "int",
    "symmetric": True,
    "strategy": "channel",
    "dynamic": False,
}
ACTIVATION_SCHEME = {
    "num_bits": 8,
    "type": "int",
    "symmetric": True,
    "strategy": "token",
    "dynamic": True,
}

# Modules kept in the model dtype unless the user says otherwise: embeddings,
# the LM head, MoE routers (and Qwen2-MoE's shared-expert gate). Patterns use
# compressed-tensors' syntax: a plain name matches a module-name suffix,
# "re:" prefixes a regular expression matched against the full module name.
DEFAULT_IGNORE = [
    "lm_head",
    "re:.*embed_tokens$",
    "re:.*embed_positions$",
    "re:.*block_sparse_moe\\.gate$",
    "re:.*mlp\\.gate$",
    "re:.*shared_expert_gate$",
]


class CheckpointError(HAQError, ValueError):
    """A HAQ checkpoint (or its config) is malformed; the message names what and where."""


@dataclass
class HAQQuantConfig:
    """Parsed and validated ``quantization_config`` of a HAQ checkpoint."""

    format_version: int = FORMAT_VERSION
    weights: dict = field(default_factory=lambda: dict(WEIGHT_SCHEME))
    input_activations: dict = field(default_factory=lambda: dict(ACTIVATION_SCHEME))
    ignore: list[str] = field(default_factory=lambda: list(DEFAULT_IGNORE))
    smoothing: dict = field(default_factory=dict)
    routing_statistics: str | None = None
    producer: dict = field(default_factory=dict)
    input_rotation: dict[str, int] = field(default_factory=dict)  # module name -> block-Hadamard order
    # the checkpoint's own format: "haq", or "compressed-tensors" when its config.json is llm-compressor's
    # (served or imported as is; not written by to_dict)
    source_format: str = QUANT_METHOD

    @property
    def scale_dtypes(self) -> tuple[torch.dtype, ...]:
        """``weight_scale`` dtypes the checkpoint may hold (llm-compressor stores them in the model dtype)."""
        return (SCALE_DTYPE,) if self.source_format == QUANT_METHOD else CT_SCALE_DTYPES

    def to_dict(self) -> dict:
        rotation = {"input_rotation": dict(sorted(self.input_rotation.items()))} if self.input_rotation else {}
        return {
            "quant_method": QUANT_METHOD,
            "format_version": ROTATION_FORMAT_VERSION if self.input_rotation else FORMAT_VERSION,
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": dict(self.weights),
                    "input_activations": dict(self.input_activations),
                }
            },
            "ignore": list(self.ignore),
            "smoothing": dict(self.smoothing),
            "routing_statistics": self.routing_statistics,
            "producer": dict(self.producer),
            **rotation,
        }

    def rotation_of(self, module_names: Iterable[str], where: str) -> int | None:
        """The rotation block shared by ``module_names`` (the checkpoint modules vLLM fuses into one layer)."""
        blocks = {self.input_rotation.get(m) for m in module_names}
        if len(blocks) > 1:
            raise CheckpointError(f"quantization_config.input_rotation gives {sorted(map(str, blocks))} for "
                                  f"{list(module_names)}, which vLLM fuses into one layer {where!r}: they read "
                                  "one input, so they need one rotation")
        return blocks.pop() if blocks else None

    def is_ignored(self, module_name: str) -> bool:
        return is_ignored(module_name, self.ignore)


def is_ignored(module_name: str, patterns: Iterable[str]) -> bool:
    """True if ``module_name`` matches one of compressed-tensors-style ``patterns``."""
    for pat in patterns:
        if pat.startswith("re:"):
            if re.match(pat[3:], module_name):
                return True
        elif module_name == pat or module_name.endswith("." + pat):
            return True
    return False


def parse_quantization_config(cfg: Any, source: str = "quantization_config") -> HAQQuantConfig:
    """Validate a ``quantization_config`` dict; raise CheckpointError naming ``source``."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    method = cfg.get("quant_method")
    if method != QUANT_METHOD:
        raise CheckpointError(f"{source}: quant_method is {method!r}, expected {QUANT_METHOD!r}")
    version = cfg.get("format_version")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        raise CheckpointError(
            f"{source}: unknown format_version {version!r}; this vllm-haq reads "
            f"{list(SUPPORTED_FORMAT_VERSIONS)} (upgrade vllm-haq or re-convert the model)"
        )
    groups = cfg.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise CheckpointError(f"{source}: config_groups must hold exactly one group, got {groups!r}")
    (group,) = groups.values()
    weights = group.get("weights") or {}
    acts = group.get("input_activations") or {}
    for name, got, want in (("weights", weights, WEIGHT_SCHEME), ("input_activations", acts, ACTIVATION_SCHEME)):
        for key, value in want.items():
            if got.get(key) != value:
                raise CheckpointError(
                    f"{source}: config_groups.{name}.{key} is {got.get(key)!r}; "
                    f"HAQ format v1 supports only {value!r}"
                )
    ignore = cfg.get("ignore", list(DEFAULT_IGNORE))
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        raise CheckpointError(f"{source}: ignore must be a list of strings, got {ignore!r}")
    for pat in ignore:
        if pat.startswith("re:"):
            try:
                re.compile(pat[3:])
            except re.error as exc:
                raise CheckpointError(f"{source}: ignore pattern {pat!r} is not a valid regex: {exc}")
    routing = cfg.get("routing_statistics")
    if routing is not None and not isinstance(routing, str):
        raise CheckpointError(f"{source}: routing_statistics must be a file name or null, got {routing!r}")
    rotation = cfg.get("input_rotation") or {}
    if not isinstance(rotation, dict):
        raise CheckpointError(f"{source}: input_rotation must map module names to block sizes, got {rotation!r}")
    if rotation and version < ROTATION_FORMAT_VERSION:
        raise CheckpointError(f"{source}: input_rotation needs format_version {ROTATION_FORMAT_VERSION}, "
                              f"the config says {version}")
    for module, block in rotation.items():
        if not is_block_size(block):
            raise CheckpointError(f"{source}: input_rotation[{module!r}] is {block!r}, expected a power of two >= 2")
    return HAQQuantConfig(
        format_version=version,
        weights=dict(weights),
        input_activations=dict(acts),
        ignore=list(ignore),
        smoothing=dict(cfg.get("smoothing") or {}),
        routing_statistics=routing,
        producer=dict(cfg.get("producer") or {}),
        input_rotation=dict(rotation),
    )


# --------------------------------------------------------------------------- compressed-tensors interop


# Config keys giving the routed experts per MoE layer (first present wins): Mixtral's, the Qwen-MoE style
# (Qwen2-MoE, Qwen3-MoE; transformers 5 writes Qwen3-MoE's as num_local_experts, the Hub's configs num_experts),
# and DeepSeek's (n_routed_experts; its n_shared_experts are always-on linears, not routed experts).
MOE_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
# Keys that place MoE layers among dense ones (Qwen-MoE style): without them every layer is an MoE layer.
MOE_SPARSITY_KEYS = ("decoder_sparse_step", "mlp_only_layers")
# DeepSeek's: the first first_k_dense_replace layers are dense, then every moe_layer_freq-th layer is MoE
# (vLLM 0.32 model_executor/models/deepseek_v2.py:1293-1297).
MOE_DENSE_FIRST_KEYS = ("first_k_dense_replace", "moe_layer_freq")


def moe_layout(hf_config: dict) -> tuple[list[int], int] | None:
    """(decoder-layer indices that are MoE layers, experts per layer), or None for dense models."""
    n_layers = int(hf_config.get("num_hidden_layers", 0))
    experts = next((int(hf_config[k]) for k in MOE_EXPERT_KEYS if hf_config.get(k)), 0)
    if not experts:
        return None
    if any(k in hf_config for k in MOE_DENSE_FIRST_KEYS):
        first, freq = int(hf_config.get("first_k_dense_replace") or 0), int(hf_config.get("moe_layer_freq") or 1)
        return [i for i in range(n_layers) if i >= first and i % freq == 0], experts
    if not any(k in hf_config for k in MOE_SPARSITY_KEYS):  # Mixtral: every layer
        return list(range(n_layers)), experts
    step = int(hf_config.get("decoder_sparse_step", 1) or 1)
    dense = set(hf_config.get("mlp_only_layers") or [])
    return [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0], experts
