"""HAQ checkpoint format, version 1: schema, names and validation.

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

Everything a loader must reject is checked here, with errors that name the
file and tensor, because vLLM's own loaders copy tensors without checking
dtypes (a bf16 tensor is silently truncated into an int8 parameter).
"""

from __future__ import annotations

import json

import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

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


class CheckpointError(ValueError):
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
#
# llm-compressor's W8A8 int8 scheme ("int-quantized": int8 symmetric per-channel weights, dynamic symmetric
# per-token int8 activations) is HAQ's arithmetic; only names and dtypes of the metadata differ. One
# description serves both directions: to_compressed_tensors() is what `haq export` / `haq convert --format
# compressed-tensors` write, from_compressed_tensors() what `haq import` and the `haq` vLLM method accept.

COMPRESSED_TENSORS = "compressed-tensors"
CT_FORMAT = "int-quantized"  # what llm-compressor writes for W8A8 int8, and what the export writes
CT_READ_FORMATS = ("int-quantized", "naive-quantized")  # both store int8 weights for an 8-bit int scheme
CT_SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # llm-compressor: the model dtype
WEIGHT_ZERO_POINT = "weight_zero_point"  # older compressed-tensors wrote all-zero ones for symmetric schemes
# config.json key of a HAQ export with what quantization_config leaves out (provenance, routing statistics file)
EXPORT_KEY = "haq_export"
# compressed-tensors' QuantizationArgs defaults, for keys a config leaves out
_CT_ARG_DEFAULTS = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": False, "strategy": None,
                    "group_size": None, "block_structure": None}


def _ct_args(scheme: dict) -> dict:
    """One of HAQ's schemes as a complete compressed-tensors QuantizationArgs dict (llm-compressor's key set)."""
    return {"actorder": None, "block_structure": None, "dynamic": scheme["dynamic"], "group_size": None,
            "num_bits": scheme["num_bits"], "observer": None, "observer_kwargs": {}, "scale_dtype": None,
            "strategy": scheme["strategy"], "symmetric": scheme["symmetric"], "type": scheme["type"],
            "zp_dtype": None}


def to_compressed_tensors(ignore: list[str], version: str | None = None) -> dict:
    """``quantization_config`` of a compressed-tensors W8A8 int8 checkpoint, as llm-compressor writes it.

    ``ignore`` should list module names (compressed-tensors matches plain names exactly, not as suffixes).
    """
    return {
        "config_groups": {"group_0": {
            "format": CT_FORMAT, "input_activations": _ct_args(ACTIVATION_SCHEME), "output_activations": None,
            "targets": ["Linear"], "weights": _ct_args(WEIGHT_SCHEME),
        }},
        "format": CT_FORMAT, "global_compression_ratio": None, "ignore": list(ignore), "kv_cache_scheme": None,
        "quant_method": COMPRESSED_TENSORS, "quantization_status": "compressed", "sparsity_config": {},
        "transform_config": {}, "version": version,
    }


def from_compressed_tensors(cfg: Any, source: str = "quantization_config") -> HAQQuantConfig:
    """The HAQ view of a compressed-tensors ``quantization_config``, or CheckpointError naming what differs."""
    if not isinstance(cfg, dict) or cfg.get("quant_method") != COMPRESSED_TENSORS:
        got = cfg.get("quant_method") if isinstance(cfg, dict) else type(cfg).__name__
        raise CheckpointError(f"{source}: not a compressed-tensors config (quant_method {got!r})")
    fmt = cfg.get("format")
    if fmt not in CT_READ_FORMATS:
        raise CheckpointError(f"{source}: format is {fmt!r}; HAQ reads W8A8 int8 stored as {list(CT_READ_FORMATS)}")
    groups = cfg.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise CheckpointError(f"{source}: config_groups must hold exactly one group (one scheme for every "
                              f"Linear), got {len(groups) if isinstance(groups, dict) else groups!r}")
    ((gname, group),) = groups.items()
    where = f"{source}: config_groups.{gname}"
    if group.get("format") not in (None, *CT_READ_FORMATS):
        raise CheckpointError(f"{where}.format is {group.get('format')!r}; HAQ reads {list(CT_READ_FORMATS)}")
    if group.get("targets") != ["Linear"]:
        raise CheckpointError(f"{where}.targets is {group.get('targets')!r}; HAQ needs ['Linear'] "
                              "(every Linear quantized except those in ignore)")
    for part, want in (("weights", WEIGHT_SCHEME), ("input_activations", ACTIVATION_SCHEME)):
        got = group.get(part)
        if not isinstance(got, dict):
            raise CheckpointError(f"{where}.{part} is {got!r}; HAQ needs W8A8 ({part} quantized)")
        for key, value in {**want, "group_size": None, "block_structure": None}.items():
            have = got.get(key, _CT_ARG_DEFAULTS.get(key))
            if have != value:
                raise CheckpointError(f"{where}.{part}.{key} is {have!r}; HAQ needs {value!r}")
    if group.get("output_activations"):
        raise CheckpointError(f"{where}.output_activations is set; HAQ quantizes only weights and input activations")
    for key in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if cfg.get(key):
            raise CheckpointError(f"{source}: {key} is set ({cfg[key]!r}); HAQ serves plain W8A8 int8 only")
    ignore = cfg.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        raise CheckpointError(f"{source}: ignore must be a list of strings, got {ignore!r}")
    return HAQQuantConfig(ignore=list(ignore), source_format=COMPRESSED_TENSORS,
                          producer={"tool": "llm-compressor/compressed-tensors", "source": COMPRESSED_TENSORS,
                                    "version": cfg.get("version")})


def checkpoint_quant_config(cfg: Any, source: str = "quantization_config") -> HAQQuantConfig:
    """A HAQ ``quantization_config`` or a compressed-tensors W8A8 int8 one, validated."""
    if isinstance(cfg, dict) and cfg.get("quant_method") == COMPRESSED_TENSORS:
        return from_compressed_tensors(cfg, source)
    return parse_quantization_config(cfg, source)


# --------------------------------------------------------------------------- model facts


def moe_layout(hf_config: dict) -> tuple[list[int], int] | None:
    """(decoder-layer indices that are MoE layers, experts per layer), or None for dense models."""
    n_layers = int(hf_config.get("num_hidden_layers", 0))
    if "num_local_experts" in hf_config:  # Mixtral
        return list(range(n_layers)), int(hf_config["num_local_experts"])
    if hf_config.get("num_experts"):  # Qwen2-MoE family
        step = int(hf_config.get("decoder_sparse_step", 1) or 1)
        dense = set(hf_config.get("mlp_only_layers") or [])
        layers = [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]
        return layers, int(hf_config["num_experts"])
    return None


# --------------------------------------------------------------------------- tensors


def _shard_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, SAFETENSORS_INDEX)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{index}: unreadable safetensors index ({exc})") from exc
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.exists(os.path.join(model_dir, name)):
                holders = [t for t, f in weight_map.items() if f == name][:3]
                raise CheckpointError(
                    f"{index}: shard {name!r} (holding e.g. {holders}) does not exist in {model_dir}"
                )
        return files
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors") and f != ROUTING_FILE)
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors weight files")
    return files


def read_tensor_headers(model_dir: str) -> dict[str, tuple[str, torch.dtype, tuple[int, ...]]]:
    """name → (file, dtype, shape) for every tensor of the checkpoint, reading headers only."""
    from safetensors import safe_open

    out: dict[str, tuple[str, torch.dtype, tuple[int, ...]]] = {}
    for fname in _shard_files(model_dir):
        path = os.path.join(model_dir, fname)
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    dtype = _ST_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {sl.get_dtype()}")
                    if name in out:
                        raise CheckpointError(f"{path}: tensor {name!r} also stored in {out[name][0]}")
                    out[name] = (fname, dtype, tuple(sl.get_shape()))
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
        _check_file_size(path)
    return out


def _check_index_matches(model_dir: str, headers: dict) -> None:
    """Every tensor the index names is in the shard it names (loaders trust the index)."""
    index = os.path.join(model_dir, SAFETENSORS_INDEX)
    if not os.path.exists(index):
        return
    with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    for name, fname in weight_map.items():
        if name not in headers:
            raise CheckpointError(f"{index}: tensor {name!r} is mapped to {fname!r}, which does not hold it")
        if headers[name][0] != fname:
            raise CheckpointError(f"{index}: tensor {name!r} is mapped to {fname!r} but stored in {headers[name][0]!r}")
    unlisted = sorted(set(headers) - set(weight_map))
    if unlisted:
        raise CheckpointError(f"{index}: tensors {unlisted[:4]} stored in {headers[unlisted[0]][0]!r} are not in "
                              "the index (loaders would skip them)")


def _check_file_size(path: str) -> None:
    """Catch truncated shards, which safe_open maps lazily and would fail only on read."""
    import struct

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise CheckpointError(f"{path}: file is {size} bytes but its header describes {8 + n + end} (truncated or padded)")


_ST_DTYPES = {
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def load_tensor(model_dir: str, headers: dict, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(os.path.join(model_dir, headers[name][0]), framework="pt") as f:
        return f.get_tensor(name)


def check_scale_values(scale: torch.Tensor, where: str) -> None:
    """Scales must be finite and > 0: a zero or NaN scale silently zeroes or poisons a layer."""
    bad = ~torch.isfinite(scale) | (scale <= 0)
    if bool(bad.any()):
        idx = int(bad.flatten().nonzero()[0])
        raise CheckpointError(
            f"{where}: {int(bad.sum())} of {scale.numel()} scales are non-finite or <= 0 "
            f"(first at flat index {idx}: {float(scale.flatten()[idx])})"
        )


def validate_tensors(model_dir: str, qcfg: HAQQuantConfig, headers: dict | None = None) -> dict:
    """Check every quantized tensor group of the checkpoint; return the headers."""
    headers = read_tensor_headers(model_dir) if headers is None else headers

    def where(name: str) -> str:
        return f"{os.path.join(model_dir, headers[name][0])}: tensor {name!r}"

    for name, (_, dtype, shape) in headers.items():
        if name.endswith("." + WEIGHT_SCALE):
            module = name[: -len(WEIGHT_SCALE) - 1]
            wname = f"{module}.{WEIGHT}"
            if wname not in headers:
                raise CheckpointError(f"{where(name)} has no matching {wname!r}")
            if dtype not in qcfg.scale_dtypes:
                raise CheckpointError(f"{where(name)} has dtype {dtype}, expected "
                                      + " or ".join(str(d) for d in qcfg.scale_dtypes))
            out = headers[wname][2][0] if headers[wname][2] else None
            if shape != (out, 1):
                raise CheckpointError(f"{where(name)} has shape {list(shape)}, expected [{out}, 1]")
            check_scale_values(load_tensor(model_dir, headers, name), where(name))
        elif name.endswith("." + WEIGHT_ZERO_POINT):
            raise CheckpointError(
                f"{where(name)}: zero points (written by older compressed-tensors versions) are not served "
                "directly; `haq import SRC OUT` drops them (they must be all zero: HAQ is symmetric) and OUT "
                "serves with quantization='haq'"
            )
        elif name.endswith("." + INPUT_SMOOTH):
            module = name[: -len(INPUT_SMOOTH) - 1]
            wname = f"{module}.{WEIGHT}"
            if wname not in headers or headers[wname][1] != WEIGHT_DTYPE:
                raise CheckpointError(f"{where(name)} belongs to no int8 weight {wname!r}")
            if dtype != SCALE_DTYPE or shape != (headers[wname][2][1],):
                raise CheckpointError(
                    f"{where(name)} is {dtype} {list(shape)}, expected {SCALE_DTYPE} [{headers[wname][2][1]}]"
                )
            check_scale_values(load_tensor(model_dir, headers, name), where(name))
        elif name.endswith("." + WEIGHT):
            module = name[: -len(WEIGHT) - 1]
            has_scale = f"{module}.{WEIGHT_SCALE}" in headers
            if dtype == WEIGHT_DTYPE:
                if not has_scale:
                    raise CheckpointError(f"{where(name)} is int8 but {module}.{WEIGHT_SCALE!s} is missing")
                if len(shape) != 2:
                    raise CheckpointError(f"{where(name)} has shape {list(shape)}, expected 2-D [out, in]")
            elif has_scale:
                raise CheckpointError(f"{where(name)} has dtype {dtype}, expected {WEIGHT_DTYPE} (it has a weight_scale)")
            elif _looks_quantizable(module) and not qcfg.is_ignored(module) and len(shape) == 2:
                raise CheckpointError(
                    f"{where(name)} has dtype {dtype}, expected {WEIGHT_DTYPE}: the module is not in "
                    f"quantization_config.ignore, so the runtime would read it as int8"
                )
    for module, block in qcfg.input_rotation.items():
        wname = f"{module}.{WEIGHT}"
        if wname not in headers or headers[wname][1] != WEIGHT_DTYPE:
            raise CheckpointError(f"{model_dir}: quantization_config.input_rotation names {module!r}, which has no "
                                  f"int8 weight {wname!r}")
        width = headers[wname][2][1]
        if width % block:
            raise CheckpointError(f"{where(wname)}: its {width} input features are not a multiple of the "
                                  f"rotation block {block} in quantization_config.input_rotation")
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


def is_quantized_checkpoint(model_dir: str) -> bool:
    """Whether ``model_dir``'s config.json carries a ``quantization_config`` (HAQ or compressed-tensors): such a
    checkpoint is served with ``quantization="haq"``, an unquantized one as it is."""
    with open(os.path.join(model_dir, "config.json")) as f:
        return "quantization_config" in json.load(f)


def read_config(model_dir: str) -> dict:
    path = os.path.join(model_dir, CONFIG_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a Hugging Face model directory)") from None
    except ValueError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from exc


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
    _check_index_matches(model_dir, headers)
    check_config_agreement(model_dir, config, headers)
    if qcfg.routing_statistics:
        path = os.path.join(model_dir, qcfg.routing_statistics)
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: routing statistics named in config.json are missing")
        validate_routing_stats(path, config)
    return qcfg


