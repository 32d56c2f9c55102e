"""What the conversion of one layer produces: its tensors and a typed record of the choices it made."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerRecord:
    """The smoothing and rotation chosen for one decoder layer, by layer-relative module name.

    ``alpha``: the first consumer of each smoothed group (or, with per-expert smoothing, each expert's gate
    input) → its α, None where the group was left unsmoothed. ``rotation``: each rotated consumer → its
    block-Hadamard order. ``explicit``: the MoE blocks whose experts keep their smoothing explicit
    (``input_smooth``). :meth:`to_json` gives the layer's entry of ``quantization_config.smoothing.alpha``.
    """

    alpha: dict[str, float | None] = field(default_factory=dict)
    rotation: dict[str, int] = field(default_factory=dict)
    explicit: list[str] = field(default_factory=list)
    # How many alpha entries preceded the first rotation: see to_json.
    rotation_position: int | None = field(default=None, init=False, repr=False, compare=False)

    def set_alpha(self, module: str, alpha: float | None) -> None:
        self.alpha[module] = alpha

    def set_rotation(self, module: str, block: int) -> None:
        """Record ``module``'s rotation (noting, at the first one, where ``"rotation"`` goes in :meth:`to_json`)."""
        if not self.rotation:
            self.rotation_position = len(self.alpha)
        self.rotation[module] = block

    def __bool__(self) -> bool:
        return bool(self.alpha or self.rotation or self.explicit)

    def to_json(self, prefix: str = "") -> dict:
        """The layer's entry in the checkpoint's smoothing record (config.json, and progress.json while
        converting): the α entries with ``"rotation"`` and ``"explicit"`` (``prefix``-qualified block names)
        as two more keys.

        ``"rotation"`` stands where the first rotated group was recorded, among the α entries, and
        ``"explicit"`` last: the order in which the record was built before it was typed, kept so that
        checkpoints stay byte-identical to those converted before.
        """
        items = list(self.alpha.items())
        at = len(items) if self.rotation_position is None else self.rotation_position
        out: dict = dict(items[:at])
        if self.rotation:
            out["rotation"] = dict(self.rotation)
        out.update(items[at:])
        if self.explicit:
            out["explicit"] = [prefix + block for block in self.explicit]
        return out


@dataclass
class LayerResult:
    """What :func:`offline.haq.quantize_calibrated` returns for one layer.

    ``tensors``: the layer's output tensors by layer-relative name (non-targets in their source dtype, int8
    targets with their scales, explicit ``input_smooth`` vectors); ``record``: the choices made;
    ``fallbacks``: the GPTQ targets rounded to nearest instead (experts with too few calibration tokens);
    ``worst_error``: the largest relative weight error of a quantized target.
    """

    tensors: dict[str, torch.Tensor]
    record: LayerRecord
    fallbacks: list[str]
    worst_error: float
