"""Block-Hadamard rotation of a linear layer's input: spread activation outliers before int8 quantization.

For an orthogonal R, y = x Wᵀ = (x R)(W R)ᵀ exactly. With R block-diagonal of
normalized Walsh–Hadamard blocks of size b, one channel's outlier is spread
evenly over the b channels of its block, so a token's absolute maximum (its
per-token int8 scale) shrinks by up to √b and the other channels keep their
resolution. Smoothing only rescales channels and cannot do that for the few
tokens with a huge value in one channel (SiLU(gate)·up of SmolLM2's
``down_proj`` input, OPT's LayerNorm outputs).

Unlike smoothing, R cannot be folded into a norm or an elementwise product,
so the runtime applies it to the activations (after any explicit
``input_smooth``) right before per-token quantization; the checkpoint stores
W R, and ``quantization_config.input_rotation`` names the layers and block sizes.
"""

from __future__ import annotations

import math

import torch

# Run-time cost grows with log2(block). On SmolLM2's down_proj input, blocks of 512 left ~10% less W8A8 error
# than 128; a tensor-parallel shard must hold whole blocks.
MAX_BLOCK = 128
MIN_BLOCK = 16

_CACHE: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def rotation_block(in_features: int, max_block: int = MAX_BLOCK) -> int | None:
    """The largest power of two ≤ ``max_block`` dividing ``in_features`` (None below MIN_BLOCK)."""
    b = 1
    while b * 2 <= max_block and in_features % (b * 2) == 0:
        b *= 2
    return b if b >= MIN_BLOCK else None


def is_block_size(block) -> bool:
    """A rotation block size: an int power of two ≥ 2 (the checkpoint's ``input_rotation`` values)."""
    return isinstance(block, int) and not isinstance(block, bool) and block >= 2 and not block & (block - 1)


def check_block(block: int, in_features: int, where: str) -> None:
    """A usable block: a power of two ≥ 2 dividing ``in_features``; ValueError naming ``where`` otherwise."""
    if not is_block_size(block):
        raise ValueError(f"{where}: rotation block {block!r} is not a power of two >= 2")
    if in_features % block:
        raise ValueError(f"{where}: rotation block {block} does not divide the {in_features} input features")


def sylvester(block: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The unnormalized (±1) Sylvester–Hadamard matrix of order ``block``: H_2n = [[H_n, H_n], [H_n, -H_n]].

    What compressed-tensors stores for a ``hadamard`` transform (its ``deterministic_hadamard_matrix``; the
    readers divide by √block), so a HAQ export writes exactly this; every entry is exact in any float dtype.
    """
    check_block(block, block, "hadamard")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h.to(dtype)


def hadamard(block: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> torch.Tensor:
    """The normalized Sylvester–Hadamard matrix of order ``block`` (symmetric and orthogonal: H H = I)."""
    key = (block, dtype, torch.device(device))
    h = _CACHE.get(key)
    if h is None:
        h = (sylvester(block) / math.sqrt(block)).to(dtype=dtype, device=device)
        _CACHE[key] = h
    return h


def rotate(x: torch.Tensor, block: int) -> torch.Tensor:
    """x R along the last dimension (R = diag(H_block, H_block, ...)), in x's floating dtype.

    The same function rotates activations at run time and weights in the converter (W R: a weight's rows are
    indexed by output channel, its last dimension by input channel). A fast Walsh–Hadamard transform: log2(block)
    butterfly stages of elementwise sums and differences, then one scaling, so every row's result is the same
    bits whatever else is in the batch (a BLAS product can round differently for different batch shapes, and
    the runtime rotates all tokens of an MoE layer at once where the reference rotates each expert's tokens).
    """
    n = x.shape[-1]
    check_block(block, n, "rotate")
    y = x.reshape(-1, n)
    if torch.compiler.is_compiling():  # traced (vLLM's CPU build): out= into views is not for Dynamo
        return _rotate_traceable(x, y, block)
    rows = max(1, _CHUNK_ELEMENTS // n)
    if y.shape[0] <= rows or y.device.type != "cpu":  # a GPU: one launch per stage, not per block of rows
        return (_butterflies(y, block) * (1.0 / math.sqrt(block))).to(x.dtype).reshape(x.shape)
    out = torch.empty(y.shape, dtype=x.dtype, device=y.device)
    for r0 in range(0, y.shape[0], rows):  # a block of rows through every stage while it is in cache
        out[r0 : r0 + rows] = _butterflies(y[r0 : r0 + rows], block) * (1.0 / math.sqrt(block))
    return out.reshape(x.shape)


_CHUNK_ELEMENTS = 1 << 20  # rows of rotate()'s CPU input at a time (4 MiB of float32): whole [4096, 1536]
# activations went through memory 14 times (20 ms; 11 ms in such blocks; smaller blocks pay per-op overhead)


def _butterflies(y: torch.Tensor, block: int) -> torch.Tensor:
    """The log2(block) butterfly stages of ``y`` [rows, n] (unscaled), each written straight into a buffer
    (stacking a + b and a - b copied them again): 2-10x faster, the same operations and bits. ``y`` itself is
    never written."""
    n = y.shape[-1]
    spare = None
    h = 1
    while h < block:
        out = torch.empty_like(y) if spare is None else spare
        src, dst = y.view(-1, n // (2 * h), 2, h), out.view(-1, n // (2 * h), 2, h)
        torch.add(src[:, :, 0], src[:, :, 1], out=dst[:, :, 0])
        torch.sub(src[:, :, 0], src[:, :, 1], out=dst[:, :, 1])
        spare = y if h > 1 else None  # never write into the caller's tensor
        y = out
        h *= 2
    return y


def _rotate_traceable(x: torch.Tensor, y: torch.Tensor, block: int) -> torch.Tensor:
    """:func:`rotate`'s stages as new tensors (same operations, same bits) for torch.compile."""
    n, h = y.shape[-1], 1
    while h < block:
        pairs = y.reshape(-1, n // (2 * h), 2, h)
        y = torch.stack((pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]), dim=2)
        h *= 2
    return (y.reshape(x.shape) * (1.0 / math.sqrt(block))).to(x.dtype)


def rotate_hessian(h: torch.Tensor, block: int) -> torch.Tensor:
    """Rᵀ H R: the Hessian (Xᵀ X) of the rotated inputs X R."""
    return rotate(rotate(h, block).t().contiguous(), block).t().contiguous()
