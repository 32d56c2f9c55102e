"""compressed-tensors (llm-compressor's format) as a view of HAQ's schema, in both directions.

llm-compressor's W8A8 int8 scheme ("int-quantized": int8 symmetric per-channel weights, dynamic symmetric
per-token int8 activations; compressed-tensors' ``W8A8`` preset) is HAQ's arithmetic; only names and dtypes of
the metadata differ. Both directions go through compressed-tensors' own pydantic models (``QuantizationConfig``,
``QuantizationScheme``, ``QuantizationArgs``), so key sets, defaults and what counts as a valid config follow the
installed library: to_compressed_tensors() is what `haq export` / `haq convert --format compressed-tensors`
write, from_compressed_tensors() what `haq import` and the `haq` vLLM method accept.

HAQ's block-Hadamard input rotation (``quantization_config.input_rotation``) is written as compressed-tensors'
``transform_config``: one ``hadamard`` TransformScheme per block size (``head_dim`` = block, not randomized),
applied online at ``input`` of exactly the rotated modules (to_transform_config / rotation_from_transform_config);
each rotated module also gets the transform tensor stock vLLM loads, ``{module}.{scheme}_input.weight`` (the ±1
Sylvester matrix of the block; transform_tensor_name).

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
# transform_config scheme of HAQ's rotations of one block size: "haq_rotation_<block>"
ROTATION_SCHEME_PREFIX = "haq_rotation_"
_TRANSFORM_TYPE = "hadamard"  # compressed-tensors' deterministic Sylvester matrix; vLLM's hadacore kernel


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


def transform_tensor_name(module: str, block: int) -> str:
    """The checkpoint tensor holding ``module``'s input rotation matrix: vLLM registers the transform of scheme
    S at location ``input`` as submodule ``{S}_input`` of the linear, with parameter ``weight``."""
    return f"{module}.{ROTATION_SCHEME_PREFIX}{block}_input.weight"


def to_transform_config(input_rotation: dict[str, int]) -> dict:
    """compressed-tensors' ``TransformConfig`` (dumped) of HAQ's ``input_rotation`` (module -> block).

    One scheme per block size, so that ``head_dim`` (the size of the diagonal blocks) is the block; targets are
    the module names (matched exactly), location ``input`` (online: applied to the activations at run time,
    the weights already hold W R), not inverted, not randomized (the plain Sylvester matrix HAQ uses).
    """
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme

    by_block: dict[int, list[str]] = {}
    for module, block in input_rotation.items():
        by_block.setdefault(block, []).append(module)
    groups = {f"{ROTATION_SCHEME_PREFIX}{block}": TransformScheme(
        type=_TRANSFORM_TYPE, head_dim=block, randomize=False,
        apply=[TransformArgs(targets=sorted(modules), location="input")])
        for block, modules in sorted(by_block.items())}
    return _sorted(TransformConfig(config_groups=groups).model_dump(mode="json"))


def _rotation_scheme(name: str, scheme: dict, where: str) -> tuple[int, list[str]]:
    """(block, modules) of one parsed transform scheme, or CheckpointError naming the key HAQ cannot serve."""
    for key, want in (("type", _TRANSFORM_TYPE), ("randomize", False), ("requires_grad", False)):
        if scheme.get(key) != want:
            raise CheckpointError(f"{where}.{name}.{key} is {scheme.get(key)!r}; HAQ's rotation is {want!r}")
    block = scheme.get("head_dim")
    if not isinstance(block, int) or block < 2 or block & (block - 1):
        raise CheckpointError(f"{where}.{name}.head_dim is {block!r}; HAQ needs the block size (a power of two)")
    modules = []
    for i, args in enumerate(scheme.get("apply") or []):
        at = f"{where}.{name}.apply[{i}]"
        if args.get("location") != "input" or args.get("inverse") or args.get("ignore"):
            raise CheckpointError(f"{at}: location {args.get('location')!r}, inverse {args.get('inverse')!r}, "
                                  f"ignore {args.get('ignore')!r}; HAQ rotates inputs only (input, False, [])")
        bad = [t for t in args.get("targets") or [] if t.startswith("re:") or "." not in t]
        if bad:
            raise CheckpointError(f"{at}.targets has {bad[0]!r}; HAQ reads module names, not regexes or classes")
        modules += args.get("targets") or []
    return block, modules


def rotation_from_transform_config(cfg: Any, source: str = "quantization_config.transform_config") -> dict:
    """HAQ's ``input_rotation`` (module -> block) from a compressed-tensors ``transform_config`` of the form
    :func:`to_transform_config` writes; CheckpointError naming the key for anything else."""
    from compressed_tensors.transform import TransformConfig

    if not cfg:
        return {}
    try:
        parsed = TransformConfig.model_validate(cfg).model_dump(mode="json")
    except (ValueError, TypeError) as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise CheckpointError(f"{source}: compressed-tensors {ct_version()} rejects it: {' '.join(lines[:3])}"
                              ) from None
    rotation: dict[str, int] = {}
    for name, scheme in parsed["config_groups"].items():
        block, modules = _rotation_scheme(name, scheme, f"{source}.config_groups")
        for module in modules:
            if rotation.setdefault(module, block) != block:
                raise CheckpointError(f"{source}: {module!r} is rotated by two schemes ({rotation[module]} and "
                                      f"{block})")
    return rotation


def to_compressed_tensors(ignore: list[str], version: str | None = None,
                          input_rotation: dict[str, int] | None = None) -> dict:
    """``quantization_config`` of a compressed-tensors W8A8 int8 checkpoint, as llm-compressor writes it.

    Built as compressed-tensors' ``QuantizationConfig`` of one ``["Linear"]`` group and serialized the way
    ``ModelCompressor.update_config`` does (``model_dump()`` without quant_method, then version, quant_method,
    an empty sparsity_config and the transform_config; keys sorted). ``version`` defaults to the installed
    library's. ``ignore`` should list module names (compressed-tensors matches plain names exactly).
    ``input_rotation`` (HAQ's, module -> block) becomes the transform_config (:func:`to_transform_config`).
    """
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    group = QuantizationScheme(targets=["Linear"], format=CT_FORMAT, weights=QuantizationArgs(**WEIGHT_SCHEME),
                               input_activations=QuantizationArgs(**ACTIVATION_SCHEME))
    qc = QuantizationConfig(config_groups={"group_0": group}, format=CT_FORMAT, ignore=list(ignore),
                            quantization_status="compressed")
    written = {"version": version or ct_version(), "quant_method": COMPRESSED_TENSORS, "sparsity_config": {},
               "transform_config": to_transform_config(input_rotation) if input_rotation else {},
               **qc.model_dump(mode="json", exclude={"quant_method"})}
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
    for key in ("kv_cache_scheme", "sparsity_config"):
        if parsed.get(key, cfg.get(key)):
            raise CheckpointError(f"{source}: {key} is set ({cfg[key]!r}); HAQ serves plain W8A8 int8 only")
    rotation = rotation_from_transform_config(cfg.get("transform_config"), f"{source}.transform_config")
    return HAQQuantConfig(ignore=list(parsed.get("ignore") or []), source_format=COMPRESSED_TENSORS,
                          input_rotation=rotation,
                          producer={"tool": "llm-compressor/compressed-tensors", "source": COMPRESSED_TENSORS,
                                    "version": cfg.get("version")})


def checkpoint_quant_config(cfg: Any, source: str = "quantization_config") -> HAQQuantConfig:
    """A HAQ ``quantization_config`` or a compressed-tensors W8A8 int8 one, validated."""
    if isinstance(cfg, dict) and cfg.get("quant_method") == COMPRESSED_TENSORS:
        return from_compressed_tensors(cfg, source)
    return parse_quantization_config(cfg, source)
