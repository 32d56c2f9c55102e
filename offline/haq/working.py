"""The converter's view of one decoder layer's tensors: source tensors plus the exact rescalings applied so far."""

from __future__ import annotations

from typing import Callable

import torch


class WorkingTensors:
    """One decoder layer's tensors as the converter sees them: ``dtype`` copies of the source with the smoothing
    applied so far.

    Smoothing only records an exact rescaling per tensor; a tensor is materialized (source → ``dtype``, then
    each rescaling in order) when it is read. Materializing every smoothed weight at once would hold the layer in
    float32, twice its bf16 size (5.4 GiB for one Mixtral-8x7B layer), next to the Hessians. Takes ownership of
    ``source``: :meth:`release` removes a tensor from it, so a finished expert's weights can be freed.
    """

    def __init__(self, source: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
        self.source = source
        self.dtype = dtype
        self.rescalings: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        v = self.source[name]
        if v.is_floating_point():
            v = v.to(self.dtype)
        for rescale in self.rescalings.get(name, ()):
            v = rescale(v)
        return v

    def __contains__(self, name: str) -> bool:
        return name in self.source

    @property
    def device(self) -> torch.device:
        """Where the layer's tensors are (``haq convert --device``; all on one); the CPU for an empty layer."""
        return next(iter(self.source.values())).device if self.source else torch.device("cpu")

    def shape(self, name: str) -> torch.Size:
        """The tensor's shape, without materializing it."""
        return self.source[name].shape

    def get(self, name: str, default=None):
        return self[name] if name in self.source else default

    def names(self) -> list[str]:
        return list(self.source)

    def rescale(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` to ``name`` whenever it is read from now on (after the rescalings recorded before)."""
        self.rescalings.setdefault(name, []).append(fn)

    def release(self, name: str) -> None:
        """Forget ``name`` and its rescalings, so that its source storage can be freed."""
        self.source.pop(name, None)
        self.rescalings.pop(name, None)
