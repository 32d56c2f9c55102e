"""Validation of a checkpoint directory: everything a loader must reject, with errors naming file and tensor.

vLLM's own loaders copy tensors without checking dtypes (a bf16 tensor is silently truncated into an int8
parameter), so the plugin and ``haq`` check here first: tensor dtypes and shapes, scale values, the index,
agreement with config.json, and the routing statistics.
"""

from __future__ import annotations

import os
import re

import torch

from vllm_haq.format.compressed_tensors import (EXPORT_KEY, WEIGHT_ZERO_POINT, checkpoint_quant_config,
                                                transform_tensor_name)
from vllm_haq.format.files import index_weight_map, load_tensor, read_config, read_tensor_headers
from vllm_haq.format.schema import (COMPRESSED_TENSORS, CONFIG_FILE, INPUT_SMOOTH, SAFETENSORS_INDEX, SCALE_DTYPE,
                                    WEIGHT, WEIGHT_DTYPE, WEIGHT_SCALE, CheckpointError, HAQQuantConfig, moe_layout)
from vllm_haq.quant.rotation import sylvester


def check_index_matches(model_dir: str, headers: dict) -> None:
    """Every tensor the index names is in the shard it names (loaders trust the index)."""
    weight_map = index_weight_map(model_dir)
    if weight_map is None:
        return
    index = os.path.join(model_dir, SAFETENSORS_INDEX)
    for name, fname in weight_map.items():
        if name not in headers:
            raise CheckpointError(f"{index}: tensor {name!r} is mapped to {fname!r}, which does not hold it")
        if headers[name][0] != fname:
            raise CheckpointError(f"{index}: tensor {name!r} is mapped to {fname!r} but stored in {headers[name][0]!r}")
    unlisted = sorted(set(headers) - set(weight_map))
    if unlisted:
        raise CheckpointError(f"{index}: tensors {unlisted[:4]} stored in {headers[unlisted[0]][0]!r} are not in "
                              "the index (loaders would skip them)")


def check_scale_values(scale: torch.Tensor, where: str) -> None:
    """Scales must be finite and > 0: a zero or NaN scale silently zeroes or poisons a layer."""
    bad = ~torch.isfinite(scale) | (scale <= 0)
    if bool(bad.any()):
        idx = int(bad.flatten().nonzero()[0])
        raise CheckpointError(
            f"{where}: {int(bad.sum())} of {scale.numel()} scales are non-finite or <= 0 "
            f"(first at flat index {idx}: {float(scale.flatten()[idx])})"
        )


class _TensorChecks:
    """One check per kind of tensor a HAQ checkpoint holds (``weight_scale``, ``input_smooth``, ``weight``),
    each naming the file and tensor it rejects."""

    def __init__(self, model_dir: str, qcfg: HAQQuantConfig, headers: dict):
        self.dir, self.qcfg, self.headers = model_dir, qcfg, headers

    def where(self, name: str) -> str:
        return f"{os.path.join(self.dir, self.headers[name][0])}: tensor {name!r}"

    def check(self, name: str) -> None:
        for suffix, checker in ((WEIGHT_SCALE, self.scale), (WEIGHT_ZERO_POINT, self.zero_point),
                                (INPUT_SMOOTH, self.smooth), (WEIGHT, self.weight)):
            if name.endswith("." + suffix):
                checker(name, name[: -len(suffix) - 1])
                return

    def scale(self, name: str, module: str) -> None:
        _, dtype, shape = self.headers[name]
        wname = f"{module}.{WEIGHT}"
        if wname not in self.headers:
            raise CheckpointError(f"{self.where(name)} has no matching {wname!r}")
        if dtype not in self.qcfg.scale_dtypes:
            raise CheckpointError(f"{self.where(name)} has dtype {dtype}, expected "
                                  + " or ".join(str(d) for d in self.qcfg.scale_dtypes))
        out = self.headers[wname][2][0] if self.headers[wname][2] else None
        if shape != (out, 1):
            raise CheckpointError(f"{self.where(name)} has shape {list(shape)}, expected [{out}, 1]")
        check_scale_values(load_tensor(self.dir, self.headers, name), self.where(name))

    def zero_point(self, name: str, module: str) -> None:
        raise CheckpointError(
            f"{self.where(name)}: zero points (written by older compressed-tensors versions) are not served "
            "directly; `haq import SRC OUT` drops them (they must be all zero: HAQ is symmetric) and OUT "
            "serves with quantization='haq'"
        )

    def smooth(self, name: str, module: str) -> None:
        _, dtype, shape = self.headers[name]
        wname = f"{module}.{WEIGHT}"
        if wname not in self.headers or self.headers[wname][1] != WEIGHT_DTYPE:
            raise CheckpointError(f"{self.where(name)} belongs to no int8 weight {wname!r}")
        if dtype != SCALE_DTYPE or shape != (self.headers[wname][2][1],):
            raise CheckpointError(
                f"{self.where(name)} is {dtype} {list(shape)}, expected {SCALE_DTYPE} [{self.headers[wname][2][1]}]"
            )
        check_scale_values(load_tensor(self.dir, self.headers, name), self.where(name))

    def weight(self, name: str, module: str) -> None:
        _, dtype, shape = self.headers[name]
        has_scale = f"{module}.{WEIGHT_SCALE}" in self.headers
        if dtype == WEIGHT_DTYPE:
            if not has_scale:
                raise CheckpointError(f"{self.where(name)} is int8 but {module}.{WEIGHT_SCALE!s} is missing")
            if len(shape) != 2:
                raise CheckpointError(f"{self.where(name)} has shape {list(shape)}, expected 2-D [out, in]")
        elif has_scale:
            raise CheckpointError(f"{self.where(name)} has dtype {dtype}, expected {WEIGHT_DTYPE} "
                                  "(it has a weight_scale)")
        elif _looks_quantizable(module) and not self.qcfg.is_ignored(module) and len(shape) == 2:
            raise CheckpointError(
                f"{self.where(name)} has dtype {dtype}, expected {WEIGHT_DTYPE}: the module is not in "
                f"quantization_config.ignore, so the runtime would read it as int8"
            )

    def rotations(self) -> None:
        for module, block in self.qcfg.input_rotation.items():
            wname = f"{module}.{WEIGHT}"
            if wname not in self.headers or self.headers[wname][1] != WEIGHT_DTYPE:
                raise CheckpointError(f"{self.dir}: quantization_config.input_rotation names {module!r}, which has "
                                      f"no int8 weight {wname!r}")
            width = self.headers[wname][2][1]
            if width % block:
                raise CheckpointError(f"{self.where(wname)}: its {width} input features are not a multiple of the "
                                      f"rotation block {block} in quantization_config.input_rotation")
            if self.qcfg.source_format == COMPRESSED_TENSORS:
                self.transform(transform_tensor_name(module, block), block)

    def transform(self, name: str, block: int) -> None:
        """A compressed-tensors rotation's stored matrix: stock vLLM will not load the model without it, and
        a HAQ export holds the ±1 Sylvester matrix its ``hadamard`` scheme stands for (vLLM's CUDA kernel
        computes that matrix whatever is stored; its dense fallback multiplies by the stored one)."""
        if name not in self.headers:
            raise CheckpointError(f"{self.dir}: no tensor {name!r}: quantization_config.transform_config rotates "
                                  "its module, and vLLM loads the rotation matrix from the checkpoint")
        _, dtype, shape = self.headers[name]
        if shape != (block, block) or not dtype.is_floating_point:
            raise CheckpointError(f"{self.where(name)} is {dtype} {list(shape)}, expected a float [{block}, {block}]")
        if not torch.equal(load_tensor(self.dir, self.headers, name).double(), sylvester(block)):
            raise CheckpointError(f"{self.where(name)} is not the ±1 Sylvester-Hadamard matrix of order {block} "
                                  "(the transform_config's hadamard scheme)")


def validate_tensors(model_dir: str, qcfg: HAQQuantConfig, headers: dict | None = None) -> dict:
    """Check every quantized tensor group of the checkpoint; return the headers."""
    headers = read_tensor_headers(model_dir) if headers is None else headers
    checks = _TensorChecks(model_dir, qcfg, headers)
    for name in headers:
        checks.check(name)
    checks.rotations()
    return headers


# Linear modules of the supported families; anything else (norms, embeddings) is never quantized.
_LINEAR_NAME = re.compile(
    r".*\.(q_proj|k_proj|v_proj|o_proj|out_proj|qkv_proj|gate_proj|up_proj|down_proj|fc1|fc2|w1|w2|w3|"
    r"gate_up_proj)$"
)


def _looks_quantizable(module: str) -> bool:
    return bool(_LINEAR_NAME.match(module))


def validate_routing_stats(path: str, hf_config: dict) -> dict[str, torch.Tensor]:
    """Load ``haq_routing.safetensors`` and check it against the model's MoE layout."""
    from safetensors.torch import load_file

    layout = moe_layout(hf_config)
    if layout is None:
        raise CheckpointError(f"{path}: routing statistics given for a dense model (no experts in config.json)")
    layers, n_exp = layout
    try:
        stats = load_file(path)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    n_moe = len(layers)
    want = {
        "expert_counts": (n_moe, n_exp),
        "transition_counts": (max(n_moe - 1, 0), n_exp, n_exp),
        "layer_indices": (n_moe,),
    }
    for key, shape in want.items():
        if key not in stats:
            raise CheckpointError(f"{path}: tensor {key!r} is missing")
        t = stats[key]
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {list(t.shape)}, but the model has {n_moe} MoE layers "
                f"of {n_exp} experts, so expected {list(shape)}"
            )
        if t.dtype != torch.int64:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {t.dtype}, expected torch.int64")
        if bool((t < 0).any()):
            raise CheckpointError(f"{path}: tensor {key!r} has negative counts")
    if stats["layer_indices"].tolist() != layers:
        raise CheckpointError(
            f"{path}: layer_indices {stats['layer_indices'].tolist()} do not match the model's MoE layers {layers}"
        )
    return stats


_LAYER_OF = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT_OF = re.compile(r"\.experts\.(\d+)\.")
_READS_HIDDEN = re.compile(r".*\.(q_proj|k_proj|v_proj|gate_proj|up_proj|fc1|w1|w3)$")


def check_config_agreement(model_dir: str, config: dict, headers: dict) -> None:
    """The tensors describe the model config.json describes: its decoder layers (no more, none missing),
    its experts per MoE layer, and its hidden size as the input of every layer that reads the residual."""
    cfg_path = os.path.join(model_dir, CONFIG_FILE)
    n_layers = config.get("num_hidden_layers")
    hidden = config.get("hidden_size")
    layout = moe_layout(config)
    seen_layers: set[int] = set()
    experts_of: dict[int, set[int]] = {}
    for name, (fname, _, shape) in headers.items():
        m = _LAYER_OF.search(name)
        if m is None:
            continue
        layer = int(m.group(1))
        where = f"{os.path.join(model_dir, fname)}: tensor {name!r}"
        if n_layers is not None and layer >= int(n_layers):
            raise CheckpointError(f"{where} belongs to decoder layer {layer}, but {cfg_path} says "
                                  f"num_hidden_layers={n_layers}")
        seen_layers.add(layer)
        e = _EXPERT_OF.search(name)
        if e is not None and layout is not None:
            expert = int(e.group(1))
            if expert >= layout[1]:
                raise CheckpointError(f"{where} belongs to expert {expert}, but {cfg_path} gives {layout[1]} "
                                      "experts per MoE layer")
            experts_of.setdefault(layer, set()).add(expert)
        if (hidden is not None and name.endswith("." + WEIGHT) and len(shape) == 2 and e is None
                and _READS_HIDDEN.match(name[: -len(WEIGHT) - 1]) and shape[1] != int(hidden)):
            raise CheckpointError(f"{where} has {shape[1]} input features, but {cfg_path} says "
                                  f"hidden_size={hidden}")
    if n_layers is not None and seen_layers:
        missing = sorted(set(range(int(n_layers))) - seen_layers)
        if missing:
            raise CheckpointError(f"{model_dir}: no tensors for decoder layers {missing[:8]} of the "
                                  f"num_hidden_layers={n_layers} in {cfg_path}")
    if layout is not None:
        for layer in layout[0]:
            have = experts_of.get(layer, set())
            if have and len(have) != layout[1]:
                absent = sorted(set(range(layout[1])) - have)
                raise CheckpointError(f"{model_dir}: MoE layer {layer} has no tensors for experts {absent[:8]} "
                                      f"of the {layout[1]} in {cfg_path}")



def validate_checkpoint(model_dir: str) -> HAQQuantConfig:
    """Full structural check of a HAQ checkpoint directory (headers, scale values, routing stats).

    A compressed-tensors W8A8 int8 checkpoint (llm-compressor's) passes too, read through
    :func:`from_compressed_tensors`: its scales may be in the model dtype.
    """
    config = read_config(model_dir)
    if "quantization_config" not in config:
        raise CheckpointError(f"{os.path.join(model_dir, CONFIG_FILE)}: no quantization_config (not a HAQ checkpoint)")
    qcfg = checkpoint_quant_config(
        config["quantization_config"], f"{os.path.join(model_dir, CONFIG_FILE)}: quantization_config"
    )
    if qcfg.source_format == COMPRESSED_TENSORS:  # a HAQ export keeps its routing statistics beside the weights
        routing = (config.get(EXPORT_KEY) or {}).get("routing_statistics")
        qcfg.routing_statistics = routing if routing and os.path.exists(os.path.join(model_dir, routing)) else None
    headers = validate_tensors(model_dir, qcfg)
    check_index_matches(model_dir, headers)
    check_config_agreement(model_dir, config, headers)
    if qcfg.routing_statistics:
        path = os.path.join(model_dir, qcfg.routing_statistics)
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: routing statistics named in config.json are missing")
        validate_routing_stats(path, config)
    return qcfg
