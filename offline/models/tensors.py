"""A decoder layer's tensors, and the linear, norm and MLP pieces every family's forward is made of.

Linear layers dispatch on the stored tensors: int8 ``weight`` + ``weight_scale`` (+ ``input_smooth``, + the
input rotation named in the config) run W8A8 via :mod:`vllm_haq.quant` (the numerics live there once), float
weights run a plain matmul. So the same forward serves calibration (float source), the ``hf`` evaluation
backend and the tests (converted checkpoints).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from vllm_haq.format import COMPRESSED_TENSORS, rotation_from_transform_config
from vllm_haq.quant import quantize_input, w8a8_linear_reference


class LayerTensors:
    """The tensors of one decoder layer, by name relative to the layer prefix."""

    def __init__(self, tensors: dict[str, torch.Tensor], observer: Callable[[str, torch.Tensor], None] | None = None,
                 rotations: dict[str, int] | None = None, inputs_only: Callable[[str], bool] | None = None,
                 quantize: Callable[..., tuple[torch.Tensor, torch.Tensor]] = quantize_input):
        self.t = tensors
        self.quantize = quantize  # quantize_input, or the same bits faster (the converter: native_quantize_input)
        self.observer = observer  # sees every linear's input (calibration statistics)
        # linears whose output this pass does not need: observed, but their output is zeros (see :meth:`linear`)
        self.inputs_only = inputs_only
        self.rotations = rotations or {}  # module -> block-Hadamard order of its input (quantization_config)
        self._last_input: tuple | None = None  # (x, its version, smooth, rotation, quantized x) of the last W8A8 call

    def get(self, name: str) -> torch.Tensor | None:
        return self.t.get(name)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.t[name]

    def linear(self, module: str, x: torch.Tensor) -> torch.Tensor:
        """Apply linear ``module`` to float32 ``x``: W8A8 if its weight is int8, else float."""
        if self.observer is not None:
            self.observer(module, x)
        if self.inputs_only is not None and self.inputs_only(module):
            # The converter's float pass keeps only the linears' inputs and drops the layer's output: the down
            # projections', which only add into it, were a quarter of its float products (~9 s of SmolLM2's).
            return x.new_zeros(()).expand(*x.shape[:-1], self._out_features(module))
        w = self.t[f"{module}.weight"]
        bias = self.t.get(f"{module}.bias")
        if w.dtype == torch.int8:
            smooth, rotation = self.t.get(f"{module}.input_smooth"), self.rotations.get(module)
            return w8a8_linear_reference(x, w, self.t[f"{module}.weight_scale"], bias, smooth, rotation,
                                         self._quantized_input(x, smooth, rotation))
        return F.linear(x, w.float(), None if bias is None else bias.float())

    def _out_features(self, module: str) -> int:
        shape = getattr(self.t, "shape", None)  # the converter's WorkingTensors: without materializing the weight
        return (shape(f"{module}.weight") if callable(shape) else self.t[f"{module}.weight"].shape)[0]

    def _quantized_input(self, x: torch.Tensor, smooth: torch.Tensor | None, rotation: int | None):
        """``quantize_input(x, smooth, rotation)``, reused while the same unchanged ``x`` feeds linears with the
        same smoothing and rotation (q/k/v, gate/up): rotating and quantizing it once per linear cost ~10 s of a
        SmolLM2 conversion."""
        version = None if x.is_inference() else x._version  # inference tensors keep no version counter
        last = self._last_input
        if last is not None and last[0] is x and last[1] == version and last[2] is smooth and last[3] == rotation:
            return last[4]
        quantized = self.quantize(x, smooth, rotation)
        self._last_input = (x, version, smooth, rotation, quantized)
        return quantized


def layer_rotations(config: dict, prefix: str) -> dict[str, int]:
    """The input rotations (module relative to ``prefix`` -> block) that ``config.json`` gives one layer: HAQ's
    ``input_rotation``, or a compressed-tensors export's ``transform_config`` (the same rotations)."""
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") == COMPRESSED_TENSORS:
        rotation = rotation_from_transform_config(qc.get("transform_config"), "config.json: quantization_config."
                                                  "transform_config")
    else:
        rotation = qc.get("input_rotation") or {}
    return {name[len(prefix):]: block for name, block in rotation.items() if name.startswith(prefix)}


def swiglu(lt: LayerTensors, block: str, names: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) of the linears ``block``.``names`` (gate, up, down)."""
    gate, up, down = names
    return lt.linear(f"{block}.{down}", F.silu(lt.linear(f"{block}.{gate}", x)) * lt.linear(f"{block}.{up}", x))


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """OPT's LayerNorm (eps 1e-5, with bias)."""
    return F.layer_norm(x, x.shape[-1:], w.float(), b.float(), 1e-5)


def sliding_causal_mask(t: int, window: int, device: torch.device | str) -> torch.Tensor:
    """Boolean [t, t] mask: position i attends j when i - window < j <= i (transformers' sliding window)."""
    i = torch.arange(t, device=device).unsqueeze(1)
    j = torch.arange(t, device=device).unsqueeze(0)
    return (j <= i) & (j > i - window)
