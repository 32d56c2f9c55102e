"""Interop with the quantization ecosystem: compressed-tensors W8A8 int8 checkpoints -> HAQ.

llm-compressor's W8A8 int8 scheme (int8 symmetric per-channel weights, dynamic
symmetric per-token int8 activations, "int-quantized" format) is the same
arithmetic as HAQ's; only names and dtypes of the metadata differ. Importing
rewrites ``quantization_config``, stores ``weight_scale`` as float32 and drops
all-zero zero points, so the checkpoint is served by the ``haq`` method (and
gains its validation and, later, its expert offloading).
"""

from __future__ import annotations

import json
import os
import shutil

from vllm_haq import __version__
from vllm_haq.format import SAFETENSORS_INDEX, HAQQuantConfig, validate_checkpoint


class InteropError(ValueError):
    """The checkpoint is not a compressed-tensors W8A8 int8 checkpoint HAQ can serve."""


_WANT_WEIGHTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
_WANT_ACTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def import_compressed_tensors(src: str, out: str) -> str:
    """Write a HAQ checkpoint at ``out`` from the compressed-tensors W8A8 checkpoint ``src``."""
    from safetensors.torch import load_file, save_file

    cfg_path = os.path.join(src, "config.json")
    with open(cfg_path) as f:
        config = json.load(f)
    qc = config.get("quantization_config") or config.get("compression_config")
    if not qc or qc.get("quant_method") != "compressed-tensors":
        raise InteropError(f"{cfg_path}: not a compressed-tensors checkpoint (quant_method {qc and qc.get('quant_method')!r})")
    if qc.get("format") not in ("int-quantized", "naive-quantized"):
        raise InteropError(f"{cfg_path}: compressed-tensors format {qc.get('format')!r}; HAQ reads int-quantized W8A8")
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise InteropError(f"{cfg_path}: expected one config group, got {len(groups)}")
    for part, want in (("weights", _WANT_WEIGHTS), ("input_activations", _WANT_ACTS)):
        got = groups[0].get(part) or {}
        for k, v in want.items():
            if got.get(k) != v:
                raise InteropError(f"{cfg_path}: config_groups.{part}.{k} is {got.get(k)!r}, HAQ needs {v!r}")

    tmp = out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.safetensors", SAFETENSORS_INDEX, "recipe.yaml"))
    shards = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    weight_map = {}
    for shard in shards:
        tensors = load_file(os.path.join(src, shard))
        kept = {}
        for name, t in tensors.items():
            if name.endswith(".weight_zero_point") or name.endswith(".input_zero_point"):
                if bool(t.ne(0).any()):
                    raise InteropError(f"{os.path.join(src, shard)}: {name} is non-zero: asymmetric, not W8A8 symmetric")
                continue
            if name.endswith(".weight_scale"):
                t = t.float().reshape(-1, 1)
            kept[name] = t.contiguous()
            weight_map[name] = shard
        save_file(kept, os.path.join(tmp, shard), metadata={"format": "pt"})
    with open(os.path.join(tmp, SAFETENSORS_INDEX), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    config.pop("compression_config", None)
    config["quantization_config"] = HAQQuantConfig(
        ignore=list(qc.get("ignore") or []),
        producer={"tool": "vllm-haq import", "version": __version__, "source": "compressed-tensors",
                  "source_dir": os.path.abspath(src)},
    ).to_dict()
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    validate_checkpoint(tmp)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
