"""Random numbers keyed by sample: an evaluation attack's random start that no batch or process layout can change.

A ``torch.Generator`` hands out one stream: which noise a sample gets depends on how many numbers were drawn
before it, so on the batch size and, under DDP, on how the split is sharded. :class:`SampleNoise` instead makes
each number a hash of (seed, sample index, draw, position in the sample): the image with index 17 of the
validation split gets the same random start in a batch of 64 or of 256, on one process or on rank 3 of 8, on
the CPU or on a GPU (integer arithmetic only, exact everywhere).

The hash is Wellons' ``lowbias32`` (C. Wellons, "Prospecting for hash functions", 2018), computed in int64 with
the 32-bit products split in 16-bit halves so no intermediate overflows; the float comes from the top 24 bits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from confspec_lightning.validation import check_int

_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, constant: int) -> Tensor:
    """(x * constant) mod 2^32 for x in [0, 2^32) held in int64, without an int64 overflow."""
    low, high = x & 0xFFFF, x >> 16
    return (low * constant + (((high * constant) & 0xFFFF) << 16)) & _MASK32


def hash32(x: Tensor) -> Tensor:
    """Wellons' lowbias32 integer hash of int64 values in [0, 2^32) (elementwise; the result is in [0, 2^32))."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


class SampleNoise:
    """Uniform and normal noise for a batch, each sample's drawn from (seed, its index in the split) alone.

    Successive calls are successive draws (0, 1, ...), as successive calls on a generator would be: a fresh
    object per batch gives every evaluation the same noise.

    Args:
        seed: the evaluation seed (``RobustFairLitModule(eval_seed=...)``), an integer >= 0.
        indices: (B,) int64 index of each sample of the batch in its split.
    """

    def __init__(self, seed: int, indices: Tensor) -> None:
        check_int("seed", seed, 0)
        if not isinstance(indices, Tensor) or indices.ndim != 1 or indices.is_floating_point():
            raise ValueError(f"indices must be a 1-D integer tensor (one index per sample); got {indices!r}.")
        self.seed = seed
        self.indices = indices.long()
        self.draws = 0

    def _bits(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """(B, *shape) int64 hashes in [0, 2^32) of (seed, index, draw, position)."""
        draw = self.draws
        self.draws += 1
        index = self.indices.to(device)
        key = hash32(torch.full_like(index, (self.seed * 0x9E3779B1 + draw * 0x85EBCA77) & _MASK32))
        key = hash32(key ^ (index & _MASK32)) ^ hash32((index >> 32) + 0x632BE5AB)
        positions = hash32(torch.arange(math.prod(shape), device=device, dtype=torch.long) + 0x27D4EB2F)
        return hash32(key[:, None] ^ positions[None, :]).reshape(index.shape[0], *shape)

    def uniform(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        """``(B, *shape)`` values in [0, 1) (multiples of 2^-24)."""
        return ((self._bits(shape, device) >> 8).to(torch.float32) * 2.0**-24).to(dtype)

    def normal(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        """``(B, *shape)`` standard normal values (Box-Muller on two uniform draws)."""
        u1 = ((self._bits(shape, device) >> 8).to(torch.float32) + 0.5) * 2.0**-24  # in (0, 1)
        u2 = (self._bits(shape, device) >> 8).to(torch.float32) * 2.0**-24
        return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).to(dtype)


#: What an attack's random start draws from: a generator's stream, or per-sample keyed noise.
RandomSource = torch.Generator | SampleNoise | None


def uniform_like(x: Tensor, source: RandomSource, shape: tuple[int, ...] | None = None) -> Tensor:
    """Uniform [0, 1) noise of ``shape`` (default ``x.shape``) on ``x``'s device and dtype, from ``source``."""
    shape = tuple(x.shape) if shape is None else shape
    if isinstance(source, SampleNoise):
        return source.uniform(shape[1:], x.device, x.dtype)
    return torch.rand(shape, generator=source, device=x.device, dtype=x.dtype)


def normal_like(x: Tensor, source: RandomSource) -> Tensor:
    """Standard normal noise of ``x``'s shape, device and dtype, from ``source``."""
    if isinstance(source, SampleNoise):
        return source.normal(tuple(x.shape[1:]), x.device, x.dtype)
    return torch.randn(x.shape, generator=source, device=x.device, dtype=x.dtype)
