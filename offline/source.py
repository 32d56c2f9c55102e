"""Lazy, per-tensor access to a Hugging Face safetensors checkpoint (single file or sharded)."""

from __future__ import annotations

import json
import os

import torch

from vllm_haq.format import ROUTING_FILE, SAFETENSORS_INDEX


class SourceError(ValueError):
    """The input model directory is missing something or holds unusable tensors."""


class SafetensorsCheckpoint:
    """Reads tensors on demand so that only the layer being converted is in memory."""

    def __init__(self, model_dir: str):
        from safetensors import safe_open

        self.dir = model_dir
        if not os.path.isdir(model_dir):
            raise SourceError(f"{model_dir}: not a directory")
        index = os.path.join(model_dir, SAFETENSORS_INDEX)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    self.file_of = dict(json.load(f)["weight_map"])
            except (OSError, ValueError, KeyError) as exc:
                raise SourceError(f"{index}: unreadable safetensors index ({exc})") from exc
        else:
            files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors") and f != ROUTING_FILE)
            if not files:
                raise SourceError(f"{model_dir}: no *.safetensors weights (only safetensors checkpoints are supported)")
            self.file_of = {}
            for fname in files:
                try:
                    with safe_open(os.path.join(model_dir, fname), framework="pt") as f:
                        for name in f.keys():
                            self.file_of[name] = fname
                except Exception as exc:
                    raise SourceError(f"{os.path.join(model_dir, fname)}: not a readable safetensors file ({exc})") from exc
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
