"""Interop with the quantization ecosystem: HAQ <-> compressed-tensors W8A8 int8 checkpoints.

llm-compressor's W8A8 int8 scheme (int8 symmetric per-channel weights, dynamic
symmetric per-token int8 activations, format "int-quantized") is the same
arithmetic as HAQ's; only names and dtypes of the metadata differ. The scheme is
described once, in :mod:`vllm_haq.format` (``to_compressed_tensors`` /
``from_compressed_tensors``, built from ``WEIGHT_SCHEME`` / ``ACTIVATION_SCHEME``),
and used by both directions here and by the ``haq`` vLLM method, which serves
llm-compressor checkpoints directly.

* :func:`export_compressed_tensors` (``haq export``, ``haq convert --format
  compressed-tensors``): HAQ -> a checkpoint stock vLLM and transformers (with the
  ``compressed-tensors`` package) load without this plugin. The tensors are
  HAQ's, unchanged (int8 ``weight``, float32 ``weight_scale`` [out, 1]: vLLM keeps
  float32 scales, so it serves exactly HAQ's numbers); ``config.json`` gets
  llm-compressor's ``quantization_config`` with an explicit ``ignore`` list of the
  modules kept in float. Explicit (per-expert) ``input_smooth`` has no
  compressed-tensors equivalent and is refused; smoothing folded into norms and
  producers is plain weights and exports as is. Block-Hadamard input rotations
  (``input_rotation``) become the config's ``transform_config`` (online
  ``hadamard`` schemes, ``head_dim`` = block) plus the ±1 matrices stock vLLM
  loads (one more shard); rotated MoE experts, biased or unevenly rotated fused
  linears, which stock vLLM would not run as HAQ does, are refused.
  ``haq_routing.safetensors`` stays beside the weights: the safetensors index lists only the weight shards, and
  vLLM and transformers read the shards the index names.
* :func:`import_compressed_tensors` (``haq import``): compressed-tensors -> HAQ:
  ``weight_scale`` stored as float32, all-zero zero points dropped, Mixtral experts
  renamed from llm-compressor's ``gate_proj/up_proj/down_proj`` to HAQ's
  ``w1/w3/w2``; routing statistics a HAQ export carried along come back, and a
  HAQ-form ``transform_config`` becomes ``input_rotation`` again.
"""

from __future__ import annotations

import os
import shutil

import torch

from vllm_haq import __version__
from vllm_haq.errors import HAQError
from vllm_haq.format import (
    COMPRESSED_TENSORS,
    EXPORT_KEY,
    INPUT_SMOOTH,
    QUANT_METHOD,
    SAFETENSORS_INDEX,
    WEIGHT,
    WEIGHT_SCALE,
    WEIGHT_ZERO_POINT,
    CheckpointError,
    from_compressed_tensors,
    is_ignored,
    read_config,
    read_json,
    read_tensor_headers,
    shard_files,
    to_compressed_tensors,
    transform_tensor_name,
    validate_checkpoint,
    write_json_atomic,
)
from vllm_haq.quant.rotation import sylvester

from offline.recipe import RECIPE_FILE

FORMATS = (QUANT_METHOD, COMPRESSED_TENSORS)  # `haq convert --format`
# recipe.yaml: llm-compressor's (its modifiers, not ours); RECIPE_FILE: ours, which reproduces the HAQ checkpoint
# it was converted into, not an export of it (haq convert --format compressed-tensors carries its own along)
_SKIP_ON_COPY = ("*.safetensors", SAFETENSORS_INDEX, "config.json", "recipe.yaml", RECIPE_FILE, "*.tmp")
# llm-compressor (transformers >= 5) names Mixtral's experts like Llama MLPs; HAQ keeps the w1/w3/w2 of the
# original Mixtral checkpoints (vLLM maps both; transformers' Mixtral loader reads only w1/w3/w2)
_MIXTRAL_EXPERT_NAMES = {".gate_proj.": ".w1.", ".up_proj.": ".w3.", ".down_proj.": ".w2."}
# The export's extra shard: the input rotations' matrices, which stock vLLM loads like weights
ROTATION_SHARD = "model-rotation.safetensors"
# Linears vLLM fuses into one (same input): their input rotations must agree
_FUSED_LINEARS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


class InteropError(HAQError, ValueError):
    """The checkpoint cannot be expressed in (or read from) the other format; the message says why."""


def _publish(tmp: str, out: str, overwrite: bool) -> str:
    """Rename the finished ``tmp`` to ``out`` (replacing ``out`` only now, and only with ``overwrite``)."""
    if os.path.exists(out):
        if not overwrite:
            raise InteropError(f"{out} already exists; pass --overwrite to replace it")
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _start(out: str, overwrite: bool) -> tuple[str, str]:
    out = os.path.abspath(out.rstrip("/"))
    if os.path.exists(out) and not overwrite:
        raise InteropError(f"{out} already exists; pass --overwrite to replace it")
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    return out, tmp


def float_linear_modules(headers: dict) -> list[str]:
    """Modules with a float 2-D ``weight`` that are not embeddings: the Linears a checkpoint keeps unquantized."""
    names = set()
    for name, (_, dtype, shape) in headers.items():
        if not name.endswith("." + WEIGHT) or len(shape) != 2 or not dtype.is_floating_point:
            continue
        module = name[: -len(WEIGHT) - 1]
        if module.rsplit(".", 1)[-1].startswith("embed"):
            continue
        names.add(module)
    return sorted(names)


def _check_servable_rotation(haq_dir: str, module: str, block: int, rotation: dict, headers: dict) -> None:
    """Refuse (naming the module) a rotation stock vLLM would not run as HAQ does; see docs/interop.md.

    vLLM 0.32 puts compressed-tensors transforms on its Linear layers only (``CompressedTensorsConfig.
    get_quant_method``): MoE experts would run unrotated. Its transform method asserts there is no bias
    (``CompressedTensorsLinearTransformMethod.apply``), and wants one input transform for all parts of a fused
    linear (q/k/v, gate/up: ``_validate_tfm_schemes``).
    """
    where = f"{haq_dir}: quantization_config.input_rotation rotates the input of {module!r}"
    if ".experts." in module:
        raise InteropError(f"{where}, an MoE expert: stock vLLM applies compressed-tensors transforms to dense "
                           "Linear layers only (its experts would run unrotated); convert with --rotation none to "
                           "export, or serve the HAQ checkpoint with the plugin")
    if f"{module}.bias" in headers:
        raise InteropError(f"{where}, which has a bias: stock vLLM's compressed-tensors transforms take no bias "
                           "(CompressedTensorsLinearTransformMethod.apply asserts it); convert with --rotation none "
                           "to export, or serve the HAQ checkpoint with the plugin")
    parent, leaf = module.rsplit(".", 1)
    for fused in (f for f in _FUSED_LINEARS if leaf in f):
        parts = [f"{parent}.{m}" for m in fused if f"{parent}.{m}.{WEIGHT}" in headers]
        odd = [m for m in parts if rotation.get(m) != block]
        if odd:
            raise InteropError(f"{where} with block {block} but {odd[0]!r} with {rotation.get(odd[0])}: vLLM fuses "
                               "them into one linear, which takes one input transform for all its parts")


def check_rotation_exportable(model_dir: str, ignore: list[str]) -> None:
    """Refuse, before converting ``model_dir`` (the source model) for ``--format compressed-tensors --rotation
    search|all``, a model whose rotated layers the export would refuse: a quantized linear with a bias, or MoE
    experts (see :func:`_check_servable_rotation`), naming the first one, so that no conversion is wasted."""
    headers = read_tensor_headers(model_dir)
    for name in sorted(headers):
        module = name[: -len(".bias")]
        weight = headers.get(f"{module}.{WEIGHT}")
        if (not name.endswith(".bias") or weight is None or len(weight[2]) != 2 or is_ignored(module, ignore)
                or module.rsplit(".", 1)[-1].startswith("embed")):
            continue
        raise InteropError(f"{model_dir}: {module!r} has a bias, and stock vLLM's compressed-tensors transforms "
                           "take none, so --format compressed-tensors cannot carry its rotation; use --rotation none, "
                           "or --format haq (served with the plugin)")
    expert = next((n for n in sorted(headers) if ".experts." in n), None)
    if expert is not None:
        raise InteropError(f"{model_dir}: {expert!r} belongs to MoE experts, whose inputs stock vLLM does not "
                           "transform, so --format compressed-tensors cannot carry their rotation; use --rotation "
                           "none, or --format haq (served with the plugin)")


def _write_rotation_shard(tmp: str, rotation: dict[str, int]) -> None:
    """Add the rotation matrices stock vLLM loads (``{module}.{scheme}_input.weight``, the ±1 Sylvester matrix,
    bf16: exact) as one more shard, listed in the index like the others."""
    from safetensors.torch import save_file

    matrices = {block: sylvester(block, torch.bfloat16) for block in set(rotation.values())}
    tensors = {transform_tensor_name(m, b): matrices[b].clone() for m, b in sorted(rotation.items())}
    save_file(tensors, os.path.join(tmp, ROTATION_SHARD), metadata={"format": "pt"})
    index_path = os.path.join(tmp, SAFETENSORS_INDEX)
    index = read_json(index_path, "missing (the export copies the HAQ checkpoint's index)")
    index["weight_map"].update({name: ROTATION_SHARD for name in tensors})
    meta = index.setdefault("metadata", {})
    meta["total_size"] = int(meta.get("total_size", 0)) + sum(t.numel() * t.element_size() for t in tensors.values())
    write_json_atomic(index_path, index)


def export_compressed_tensors(haq_dir: str, out: str, overwrite: bool = False, keep_recipe: bool = False) -> str:
    """Write at ``out`` a compressed-tensors W8A8 int8 checkpoint with the tensors of HAQ checkpoint ``haq_dir``.

    ``out`` appears only when complete (written as ``out.partial``, then renamed). ``keep_recipe``: copy
    ``haq_dir``'s recipe too (``offline.convert`` for --format compressed-tensors, whose recipe says so); else it
    stays behind, since replaying it would make the HAQ checkpoint, not this export.
    """
    qcfg = validate_checkpoint(haq_dir)
    if qcfg.source_format != QUANT_METHOD:
        raise InteropError(f"{haq_dir} is already a {qcfg.source_format} checkpoint")
    explicit = list(qcfg.smoothing.get("explicit") or [])
    headers = read_tensor_headers(haq_dir)
    smooth = sorted(n for n in headers if n.endswith("." + INPUT_SMOOTH))
    if explicit or smooth:
        what = f"tensor {smooth[0]!r}" if smooth else f"MoE block {explicit[0]!r}"
        raise InteropError(
            f"{haq_dir}: {what} carries explicit per-expert smoothing (input_smooth, from --moe-smoothing "
            "per-expert), which compressed-tensors cannot express; convert with --moe-smoothing shared "
            "(smoothing folded into the norm) to export"
        )
    for module, block in sorted(qcfg.input_rotation.items()):
        _check_servable_rotation(haq_dir, module, block, qcfg.input_rotation, headers)
    config = read_config(haq_dir)
    out, tmp = _start(out, overwrite)
    shutil.copytree(haq_dir, tmp, ignore=shutil.ignore_patterns(*_SKIP_ON_COPY))
    # The tensors are exported as they are: copy the shards and their index byte for byte.
    routing = [qcfg.routing_statistics] if qcfg.routing_statistics else []
    recipe = [RECIPE_FILE] if keep_recipe and os.path.exists(os.path.join(haq_dir, RECIPE_FILE)) else []
    for fname in shard_files(haq_dir) + [SAFETENSORS_INDEX] + routing + recipe:
        shutil.copy2(os.path.join(haq_dir, fname), os.path.join(tmp, fname))
    if qcfg.input_rotation:
        _write_rotation_shard(tmp, qcfg.input_rotation)
    # compressed-tensors matches plain ignore names exactly (HAQ: as suffixes), so list the modules by name,
    # as llm-compressor does; lm_head is a Linear in transformers even when tied to the embeddings.
    ignore = sorted(set(float_linear_modules(headers)) | {"lm_head"})
    # as the installed compressed-tensors writes it; rotations as its transform_config
    config["quantization_config"] = to_compressed_tensors(ignore, input_rotation=qcfg.input_rotation)
    config[EXPORT_KEY] = {
        "tool": "vllm-haq export", "version": __version__, "ignore": list(qcfg.ignore),
        "smoothing": qcfg.smoothing, "routing_statistics": qcfg.routing_statistics, "producer": qcfg.producer,
    }
    write_json_atomic(os.path.join(tmp, "config.json"), config)
    try:
        validate_checkpoint(tmp)  # the compressed-tensors reading of the result agrees with its tensors
    except CheckpointError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _publish(tmp, out, overwrite)


def _import_shards(src: str, tmp: str, shards: list[str], haq_name,
                   rotations: dict[str, int]) -> tuple[dict[str, str], int]:
    """Rewrite ``src``'s weight shards into ``tmp`` in HAQ's layout: all-zero zero points dropped (non-zero ones
    refused), scales as float32 [out, 1], names through ``haq_name``, the rotation matrices (``rotations``:
    tensor name -> block) dropped once checked (HAQ's runtime computes them). Returns (weight map, total bytes)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    weight_map, total = {}, 0
    for shard in shards:
        path = os.path.join(src, shard)
        kept = {}
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if name in rotations:
                    if not torch.equal(t.double(), sylvester(rotations[name])):
                        raise InteropError(f"{path}: {name} is not the ±1 Sylvester-Hadamard matrix of order "
                                           f"{rotations[name]} (a hadamard transform_config scheme)")
                    continue
                if name.endswith("." + WEIGHT_ZERO_POINT) or name.endswith(".input_zero_point"):
                    if bool(t.ne(0).any()):
                        raise InteropError(f"{path}: {name} is non-zero: asymmetric, not W8A8 symmetric")
                    continue
                if name.endswith("." + WEIGHT_SCALE):
                    t = t.float().reshape(-1, 1)
                kept[haq_name(name)] = t.contiguous()
        if not kept:
            continue  # the export's rotation shard
        weight_map.update({name: shard for name in kept})
        save_file(kept, os.path.join(tmp, shard), metadata={"format": "pt"})
        total += os.path.getsize(os.path.join(tmp, shard))
    return weight_map, total


def import_compressed_tensors(src: str, out: str, overwrite: bool = True) -> str:
    """Write a HAQ checkpoint at ``out`` from the compressed-tensors W8A8 int8 checkpoint ``src``."""
    cfg_path = os.path.join(src, "config.json")
    config = read_config(src)
    qc = config.get("quantization_config") or config.get("compression_config")
    try:
        qcfg = from_compressed_tensors(qc, f"{cfg_path}: quantization_config")
    except CheckpointError as exc:
        raise InteropError(str(exc)) from None
    rename = _MIXTRAL_EXPERT_NAMES if config.get("model_type") == "mixtral" else {}

    def haq_name(name: str) -> str:
        if ".experts." in name:
            for old, new in rename.items():
                name = name.replace(old, new)
        return name

    out, tmp = _start(out, overwrite)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(*_SKIP_ON_COPY))
    shards = shard_files(src)
    try:
        rotations = {transform_tensor_name(m, b): b for m, b in qcfg.input_rotation.items()}
        weight_map, total = _import_shards(src, tmp, shards, haq_name, rotations)
        write_json_atomic(os.path.join(tmp, SAFETENSORS_INDEX),
                          {"metadata": {"total_size": total}, "weight_map": weight_map})
        exported = config.pop(EXPORT_KEY, None) or {}
        config.pop("compression_config", None)
        qcfg.producer = {"tool": "vllm-haq import", "version": __version__, "source": COMPRESSED_TENSORS,
                         "source_dir": os.path.abspath(src)}
        if exported.get("producer"):
            qcfg.producer["exported_from"] = exported["producer"]
        qcfg.smoothing = dict(exported.get("smoothing") or {})
        routing = exported.get("routing_statistics")
        if routing and os.path.exists(os.path.join(src, routing)):  # a HAQ export: its routing statistics return
            shutil.copy2(os.path.join(src, routing), os.path.join(tmp, routing))
            qcfg.routing_statistics = routing
        else:
            qcfg.routing_statistics = None
        qcfg.source_format = QUANT_METHOD
        config["quantization_config"] = qcfg.to_dict()
        write_json_atomic(os.path.join(tmp, "config.json"), config)
        validate_checkpoint(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _publish(tmp, out, overwrite)
