"""Checkpoint files: the one shard lister, safetensors header reader and atomic JSON writer.

Everything that reads a model directory's weights (the loaders' validation, the converter, the
estimate, the interop rewrites, the demo's size report) lists its shards and reads their headers
here, so an index that names a missing shard, or a truncated file, is reported the same way
everywhere: as a CheckpointError naming the file.
"""

from __future__ import annotations

import json
import os
import struct

import torch

from vllm_haq.format.schema import CONFIG_FILE, ROUTING_FILE, SAFETENSORS_INDEX, CheckpointError

ST_DTYPES = {
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def index_weight_map(model_dir: str) -> dict[str, str] | None:
    """tensor name → shard file from ``model.safetensors.index.json``, or None when there is no index."""
    index = os.path.join(model_dir, SAFETENSORS_INDEX)
    if not os.path.exists(index):
        return None
    try:
        with open(index) as f:
            return dict(json.load(f)["weight_map"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: unreadable safetensors index ({exc})") from exc


def shard_files(model_dir: str) -> list[str]:
    """The weight files of a checkpoint, sorted: those its index names (each must exist), else every
    ``*.safetensors`` but the routing statistics (which are not weights)."""
    weight_map = index_weight_map(model_dir)
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.exists(os.path.join(model_dir, name)):
                holders = [t for t, f in weight_map.items() if f == name][:3]
                raise CheckpointError(f"{os.path.join(model_dir, SAFETENSORS_INDEX)}: shard {name!r} (holding e.g. "
                                      f"{holders}) does not exist in {model_dir}")
        return files
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"{model_dir}: not a directory")
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors") and f != ROUTING_FILE)
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors weight files (only safetensors checkpoints are "
                              "supported)")
    return files


def read_safetensors_header(path: str) -> dict[str, dict]:
    """The header of one safetensors file (tensor name → dtype, shape, data_offsets); reads no tensor data."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    header.pop("__metadata__", None)
    return header


def read_tensor_headers(model_dir: str) -> dict[str, tuple[str, torch.dtype, tuple[int, ...]]]:
    """name → (file, dtype, shape) for every tensor of the checkpoint, reading headers only.

    A truncated or padded shard is refused here too: safetensors checks when opening a file that its header
    covers exactly the bytes that follow (tests/test_format.py keeps both cases)."""
    from safetensors import safe_open

    out: dict[str, tuple[str, torch.dtype, tuple[int, ...]]] = {}
    for fname in shard_files(model_dir):
        path = os.path.join(model_dir, fname)
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    dtype = ST_DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {sl.get_dtype()}")
                    if name in out:
                        raise CheckpointError(f"{path}: tensor {name!r} also stored in {out[name][0]}")
                    out[name] = (fname, dtype, tuple(sl.get_shape()))
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    return out


def load_tensor(model_dir: str, headers: dict, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(os.path.join(model_dir, headers[name][0]), framework="pt") as f:
        return f.get_tensor(name)


def write_json_atomic(path: str, obj, indent: int | None = 2, per_process: bool = False) -> None:
    """Write ``obj`` as JSON through a temporary file and a rename: readers never see half a file, and a crash
    leaves the previous version (the converter's progress record relies on it). ``per_process`` names the
    temporary file after the process, for files several processes rewrite (the offload statistics of
    tensor-parallel workers)."""
    tmp = f"{path}.tmp{os.getpid()}" if per_process else path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
        if indent is not None:
            f.write("\n")
    os.replace(tmp, path)


def read_json(path: str, missing: str, invalid: str = "invalid JSON", error: type[Exception] = CheckpointError):
    """The JSON object in ``path``, or ``error`` naming the file: ``{path}: {missing}`` when it does not exist,
    ``{path}: {invalid} (why)`` when it does not parse. The one JSON reader of the project's input files."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except ValueError as exc:
        raise error(f"{path}: {invalid} ({exc})") from exc


def read_config(model_dir: str) -> dict:
    return read_json(os.path.join(model_dir, CONFIG_FILE), "missing (not a Hugging Face model directory)")


def is_quantized_checkpoint(model_dir: str) -> bool:
    """Whether ``model_dir``'s config.json carries a ``quantization_config`` (HAQ or compressed-tensors): such a
    checkpoint is served with ``quantization="haq"``, an unquantized one as it is."""
    return "quantization_config" in read_config(model_dir)
