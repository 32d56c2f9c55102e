"""The walk every smoothing/rotation fold test makes over a tiny model's decoder layers."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from offline.haq import InputStats, WorkingTensors
from offline.models import LayerTensors, ModelSpec, spec_for


@dataclass
class FloatLayer:
    spec: ModelSpec
    index: int
    prefix: str
    tensors: dict[str, torch.Tensor]  # the model's tensors as stored
    t: WorkingTensors  # this layer's, float64, by layer-relative name: what a fold changes
    stats: InputStats  # its inputs' statistics from the float32 forward of ``h``
    ref: torch.Tensor  # that forward's output


def float64_layers(model_dir: str, h: torch.Tensor):
    """Each decoder layer of ``model_dir`` in float64 working tensors, with its float32 output on ``h`` (the
    reference a fold must leave unchanged) and the statistics that forward observed."""
    spec = spec_for(json.load(open(os.path.join(model_dir, "config.json"))))
    tensors = load_file(os.path.join(model_dir, "model.safetensors"))
    for i in range(spec.num_layers):
        p = spec.layer_prefix(i)
        t = WorkingTensors({k[len(p):]: v.double() for k, v in tensors.items() if k.startswith(p)}, torch.float64)
        stats = InputStats()
        ref = spec.layer_forward(i, LayerTensors({k: t[k].float() for k in t.names()}, observer=stats), h)
        yield FloatLayer(spec, i, p, tensors, t, stats, ref)
