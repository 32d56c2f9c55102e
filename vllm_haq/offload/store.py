"""Where expert weights live: the host store (all experts) and the device cache (a few slots per layer).

One expert = its int8 ``w13`` [2I, H] and ``w2`` [H, I], their float32 per-channel
scales and, for per-expert smoothed checkpoints, its input smoothing vector [H]
(a rotation of the down projections' input is one block size for all of a layer's experts).
Host tensors are page-locked where they lie when a CUDA device is the target, so
slot fills are asynchronous DMA copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_haq.kernels import ScaledInt8Gemm

PARTS = ("w13", "w13_scale", "w2", "w2_scale")


@dataclass
class ExpertTensors:
    """Stacked experts (leading dim = experts for the host store, slots for the cache)."""

    w13: torch.Tensor  # int8 [N, 2I, H]
    w13_scale: torch.Tensor  # float32 [N, 2I, 1]
    w2: torch.Tensor  # int8 [N, H, I]
    w2_scale: torch.Tensor  # float32 [N, H, 1]
    smooth: torch.Tensor | None = None  # float32 [N, H] or None
    down_rotation: int | None = None  # block-Hadamard order of every expert's down-projection input, or None
    registered: list[int] = field(default_factory=list, repr=False, compare=False)  # see pinned()

    def __post_init__(self):
        n = self.w13.shape[0]
        if self.w13.dtype != torch.int8 or self.w2.dtype != torch.int8 or self.w13.dim() != 3 or self.w2.dim() != 3:
            raise ValueError(f"expert weights must be int8 [N, 2I, H] / [N, H, I], got {self.w13.dtype} "
                             f"{tuple(self.w13.shape)} / {self.w2.dtype} {tuple(self.w2.shape)}")
        if (self.w2.shape[0] != n or self.w2.shape[1] != self.w13.shape[2] or 2 * self.w2.shape[2] != self.w13.shape[1]
                or self.w13_scale.shape[:2] != self.w13.shape[:2] or self.w2_scale.shape[:2] != self.w2.shape[:2]):
            raise ValueError(f"inconsistent expert shapes: w13 {tuple(self.w13.shape)}, w2 {tuple(self.w2.shape)}, "
                             f"scales {tuple(self.w13_scale.shape)} / {tuple(self.w2_scale.shape)}")

    @property
    def count(self) -> int:
        return self.w13.shape[0]

    def parts(self) -> list[torch.Tensor]:
        out = [self.w13, self.w13_scale, self.w2, self.w2_scale]
        return out + ([self.smooth] if self.smooth is not None else [])

    def expert_bytes(self) -> int:
        """Bytes of one expert (what one fetch moves)."""
        return sum(t[0].numel() * t.element_size() for t in self.parts()) if self.count else 0

    def nbytes(self) -> int:
        """Bytes of all its experts (or cache slots), as allocated."""
        return sum(t.numel() * t.element_size() for t in self.parts())

    def gemms(self, i: int, out_dtype: torch.dtype, backend: str | None = None,
              shard_amax=None) -> tuple[ScaledInt8Gemm, ScaledInt8Gemm]:
        """Prepared (w13, w2) GEMMs of expert/slot ``i`` (views, no weight copies on the torch backend).

        ``shard_amax``: the intermediate dimension is a tensor-parallel shard (see ScaledInt8Gemm); w2 is
        then called with the all-shard max."""
        smooth = None if self.smooth is None else self.smooth[i]
        return (ScaledInt8Gemm(self.w13[i], self.w13_scale[i], out_dtype, smooth=smooth, backend=backend),
                ScaledInt8Gemm(self.w2[i], self.w2_scale[i], out_dtype, backend=backend, shard_amax=shard_amax,
                               rotation=self.down_rotation))

    @classmethod
    def empty_like(cls, other: "ExpertTensors", count: int, device: torch.device) -> "ExpertTensors":
        def new(t):
            return None if t is None else torch.zeros((count, *t.shape[1:]), dtype=t.dtype, device=device)

        return cls(new(other.w13), new(other.w13_scale), new(other.w2), new(other.w2_scale), new(other.smooth),
                   other.down_rotation)

    def pinned(self) -> "ExpertTensors":
        """The same experts page-locked for asynchronous host-to-device copies (needs CUDA).

        The bytes are locked where they lie (``cudaHostRegister``), not copied: vLLM has loaded the experts
        into pageable parameters, and ``pin_memory()`` copies would hold every expert twice in host RAM, each
        copy rounded up to a power of two by PyTorch's caching host allocator (a Mixtral layer's 940 MB of
        w13 takes 1 GiB). Only a non-contiguous part is copied into pinned memory. The caller keeps these
        tensors alive and calls :meth:`release` before they are freed.
        """
        registered: list[int] = []

        def lock(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None or t.numel() == 0 or t.is_pinned():
                return t
            if not t.is_contiguous():
                return t.contiguous().pin_memory()
            torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0))
            registered.append(t.data_ptr())
            return t

        parts = [lock(t) for t in (self.w13, self.w13_scale, self.w2, self.w2_scale, self.smooth)]
        return ExpertTensors(*parts, down_rotation=self.down_rotation, registered=registered)

    def release(self) -> None:
        """Unlock what :meth:`pinned` locked in place (before the tensors are freed)."""
        while self.registered:
            torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(self.registered.pop()))


def copy_expert(dst: ExpertTensors, slot: int, src: ExpertTensors, expert: int, non_blocking: bool = False) -> int:
    """Copy expert ``expert`` of ``src`` into slot ``slot`` of ``dst``; returns bytes moved."""
    moved = 0
    for d, s in zip(dst.parts(), src.parts()):
        d[slot].copy_(s[expert], non_blocking=non_blocking)
        moved += s[expert].numel() * s.element_size()
    return moved
