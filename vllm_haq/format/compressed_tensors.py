"""compressed-tensors (llm-compressor's format) as a view of HAQ's schema, in both directions.

llm-compressor's W8A8 int8 scheme ("int-quantized": int8 symmetric per-channel weights, dynamic symmetric
per-token int8 activations) is HAQ's arithmetic; only names and dtypes of the metadata differ. One
description serves both directions: to_compressed_tensors() is what `haq export` / `haq convert --format
compressed-tensors` write, from_compressed_tensors() what `haq import` and the `haq` vLLM method accept.
"""

from __future__ import annotations

from typing import Any

from vllm_haq.format.schema import (ACTIVATION_SCHEME, COMPRESSED_TENSORS, WEIGHT_SCHEME, CheckpointError,
                                    HAQQuantConfig, parse_quantization_config)

CT_FORMAT = "int-quantized"  # what llm-compressor writes for W8A8 int8, and what the export writes
CT_READ_FORMATS = ("int-quantized", "naive-quantized")  # both store int8 weights for an 8-bit int scheme
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
