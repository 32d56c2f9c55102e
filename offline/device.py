"""Where ``haq convert`` computes: ``--device auto|cpu|cuda[:N]`` checked and resolved, and layers moved there.

The converter works one decoder layer at a time; with a CUDA device the layer's weights and its calibration
activations are copied there for the layer (the float run, the Hessians, the α/rotation search, GPTQ and the
quantized run), and its results come back to the host before they are written. The host keeps what it keeps on
the CPU too (the calibration activations between layers, the finished layer until written), so a GPU changes
where the arithmetic runs, not what is held where between layers.

The device is checked before any work (``offline.plan.check_options``): a CUDA device on a host without CUDA, an
index the host does not have, or a string torch cannot read is an error naming ``--device``, not a crash in the
middle of the first layer.
"""

from __future__ import annotations

import torch

DEVICES = "auto, cpu, cuda or cuda:N"


def device_problem(device: str) -> str | None:
    """What keeps ``device`` from being used on this host ("needs CUDA, ..."), or None; the caller names the
    option. Only ``auto``, ``cpu``, ``cuda`` and ``cuda:N`` are offered: the converter's numerics are written for
    those two (other torch devices would fail somewhere inside a layer)."""
    if device == "auto":
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return f"is not a device (expected {DEVICES})"
    if dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        return f"is not supported (expected {DEVICES})"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return (f"needs CUDA, which this host does not have (torch {torch.__version__}: "
                    "torch.cuda.is_available() is false); use cpu, or auto to take CUDA where it is")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            return f"is out of range: this host has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    return None


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA where ``torch.cuda.is_available()``, else the CPU; ``cuda`` -> the current CUDA device (a
    definite index, so that every tensor of a layer lands on the same one). ValueError for what
    :func:`device_problem` refuses."""
    problem = device_problem(device)
    if problem:
        raise ValueError(f"device {device!r} {problem}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``tensors`` on ``device``, emptying the given dict as it goes: each host tensor is let go once copied, so a
    layer is never held twice on the host (and on the CPU, where ``.to`` returns the tensor itself, nothing
    changes)."""
    out = {}
    for name in list(tensors):
        out[name] = tensors.pop(name).to(device)
    return out


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` on the CPU (results of a layer computed on a device, before they are written), in order."""
    return {name: t.cpu() for name, t in tensors.items()}
