"""compressed-tensors (llm-compressor's format) as a view of HAQ's schema, in both directions.

llm-compressor's W8A8 int8 scheme ("int-quantized": int8 symmetric per-channel weights, dynamic symmetric
per-token int8 activations; compressed-tensors' ``W8A8`` preset) is HAQ's arithmetic; only names and dtypes of
the metadata differ. Both directions go through compressed-tensors' own pydantic models (``QuantizationConfig``,
``QuantizationScheme``, ``QuantizationArgs``), so key sets, defaults and what counts as a valid config follow the
installed library: to_compressed_tensors() is what `haq export` / `haq convert --format compressed-tensors`
write, from_compressed_tensors() what `haq import` and the `haq` vLLM method accept.

The library is imported on first use only: ``import compressed_tensors`` takes seconds (it imports
transformers and torch.compile machinery), and this package is imported by the vLLM plugin and the converter.
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
# QuantizationArgs fields that fix the arithmetic: HAQ's schemes, and no groups or blocks
SCHEME_KEYS = ("num_bits", "type", "symmetric", "strategy", "dynamic", "group_size", "block_structure")
# quantization_config keys ModelCompressor.update_config writes beside QuantizationConfig.model_dump()
_COMPRESSOR_KEYS = ("version", "quant_method", "sparsity_config", "transform_config")


def ct_version() -> str:
    """The version of the compressed-tensors package this process uses (imports it)."""
    import compressed_tensors

    return compressed_tensors.__version__


def _sorted(value: Any) -> Any:
    """``value`` with every dict's keys sorted: llm-compressor writes config.json with ``sort_keys=True``."""
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def _haq_scheme(part: str) -> dict:
    """The QuantizationArgs values HAQ needs for ``part`` (weights / input_activations)."""
    scheme = WEIGHT_SCHEME if part == "weights" else ACTIVATION_SCHEME
    return {**scheme, "group_size": None, "block_structure": None}


def to_compressed_tensors(ignore: list[str], version: str | None = None) -> dict:
    """``quantization_config`` of a compressed-tensors W8A8 int8 checkpoint, as llm-compressor writes it.

    Built as compressed-tensors' ``QuantizationConfig`` of one ``["Linear"]`` group and serialized the way
    ``ModelCompressor.update_config`` does (``model_dump()`` without quant_method, then version, quant_method,
    an empty sparsity_config and transform_config; keys sorted). ``version`` defaults to the installed
    library's. ``ignore`` should list module names (compressed-tensors matches plain names exactly).
    """
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    group = QuantizationScheme(targets=["Linear"], format=CT_FORMAT, weights=QuantizationArgs(**WEIGHT_SCHEME),
                               input_activations=QuantizationArgs(**ACTIVATION_SCHEME))
    qc = QuantizationConfig(config_groups={"group_0": group}, format=CT_FORMAT, ignore=list(ignore),
                            quantization_status="compressed")
    written = {"version": version or ct_version(), "quant_method": COMPRESSED_TENSORS, "sparsity_config": {},
               "transform_config": {}, **qc.model_dump(mode="json", exclude={"quant_method"})}
    return _sorted(written)


def _arg_defaults() -> dict:
    """compressed-tensors' QuantizationArgs defaults, for the keys a raw config leaves out."""
    from compressed_tensors.quantization import QuantizationArgs

    return {k: f.get_default(call_default_factory=True) for k, f in QuantizationArgs.model_fields.items()}


def _check_scheme(group: dict, where: str, defaults: dict) -> None:
    """HAQ's checks of one config group (a dict: parsed and dumped, or raw with the library's defaults)."""
    if group.get("format") not in (None, *CT_READ_FORMATS):
        raise CheckpointError(f"{where}.format is {group.get('format')!r}; HAQ reads {list(CT_READ_FORMATS)}")
    if group.get("targets") != ["Linear"]:
        raise CheckpointError(f"{where}.targets is {group.get('targets')!r}; HAQ needs ['Linear'] "
                              "(every Linear quantized except those in ignore)")
    for part in ("weights", "input_activations"):
        got = group.get(part)
        if not isinstance(got, dict):
            raise CheckpointError(f"{where}.{part} is {got!r}; HAQ needs W8A8 ({part} quantized)")
        for key, value in _haq_scheme(part).items():
            have = got.get(key, defaults.get(key))
            if have != value:
                raise CheckpointError(f"{where}.{part}.{key} is {have!r}; HAQ needs {value!r}")
    if group.get("output_activations"):
        raise CheckpointError(f"{where}.output_activations is set; HAQ quantizes only weights and input activations")


def _parse(cfg: dict, source: str, where: str) -> dict:
    """``cfg`` through compressed-tensors' ``QuantizationConfig.model_validate``, dumped (presets expanded,
    defaults filled, strategies inferred); a config the library rejects is a CheckpointError naming ``source``,
    with HAQ's own message when the scheme is not HAQ's."""
    from compressed_tensors.quantization import QuantizationConfig

    try:
        return QuantizationConfig.model_validate(cfg).model_dump(mode="json")
    except (ValueError, TypeError, KeyError, NotImplementedError) as exc:  # pydantic's ValidationError is a ValueError
        group = next(iter(cfg["config_groups"].values()))
        if isinstance(group, dict):
            _check_scheme(group, where, _arg_defaults())
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise CheckpointError(f"{source}: compressed-tensors {ct_version()} rejects it: {' '.join(lines[:3])}"
                              ) from None


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
    ignore = cfg.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        raise CheckpointError(f"{source}: ignore must be a list of strings, got {ignore!r}")
    (gname,) = groups
    where = f"{source}: config_groups.{gname}"
    parsed = _parse(cfg, source, where)
    _check_scheme(parsed["config_groups"][gname], where, {})
    for key in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if parsed.get(key, cfg.get(key)):
            raise CheckpointError(f"{source}: {key} is set ({cfg[key]!r}); HAQ serves plain W8A8 int8 only")
    return HAQQuantConfig(ignore=list(parsed.get("ignore") or []), source_format=COMPRESSED_TENSORS,
                          producer={"tool": "llm-compressor/compressed-tensors", "source": COMPRESSED_TENSORS,
                                    "version": cfg.get("version")})


def checkpoint_quant_config(cfg: Any, source: str = "quantization_config") -> HAQQuantConfig:
    """A HAQ ``quantization_config`` or a compressed-tensors W8A8 int8 one, validated."""
    if isinstance(cfg, dict) and cfg.get("quant_method") == COMPRESSED_TENSORS:
        return from_compressed_tensors(cfg, source)
    return parse_quantization_config(cfg, source)
