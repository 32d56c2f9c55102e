"""Lazy, per-tensor access to a Hugging Face safetensors checkpoint (single file or sharded)."""

from __future__ import annotations

import os

import torch

from vllm_haq.errors import HAQError
from vllm_haq.format import CheckpointError, index_weight_map, shard_files


class SourceError(HAQError, ValueError):
    """The input model directory is missing something or holds unusable tensors."""


class SafetensorsCheckpoint:
    """Reads tensors on demand so that only the layer being converted is in memory."""

    def __init__(self, model_dir: str):
        from safetensors import safe_open

        self.dir = model_dir
        if not os.path.isdir(model_dir):
            raise SourceError(f"{model_dir}: not a directory")
        try:
            weight_map = index_weight_map(model_dir)
            files = shard_files(model_dir) if weight_map is None else []
        except CheckpointError as exc:
            raise SourceError(str(exc)) from exc
        self.file_of = weight_map or {}
        for fname in files:
            try:
                with safe_open(os.path.join(model_dir, fname), framework="pt") as f:
                    for name in f.keys():
                        self.file_of[name] = fname
            except Exception as exc:
                path = os.path.join(model_dir, fname)
                raise SourceError(f"{path}: not a readable safetensors file ({exc})") from exc
        self._handles: dict = {}

    def names(self) -> list[str]:
        return list(self.file_of)

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        fname = self.file_of.get(name)
        if fname is None:
            raise SourceError(f"{self.dir}: tensor {name!r} not found in the checkpoint")
        path = os.path.join(self.dir, fname)
        try:
            if fname not in self._handles:
                self._handles[fname] = safe_open(path, framework="pt")
            return self._handles[fname].get_tensor(name)
        except Exception as exc:
            raise SourceError(f"{path}: cannot read tensor {name!r} ({exc})") from exc

    def load_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors whose names start with ``prefix``, keyed by the rest of the name.

        The tensors map their file; the open files are let go afterwards, so a tensor's pages leave memory
        as soon as the caller drops it (otherwise every layer converted so far would stay resident).
        """
        tensors = {n[len(prefix):]: self.get(n) for n in self.file_of if n.startswith(prefix)}
        self._handles.clear()
        return tensors
