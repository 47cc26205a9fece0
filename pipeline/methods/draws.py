"""Counter-based random draws: sample ``i``'s numbers are a pure function of ``(seed, i)``.

Draw ``j`` of sample ``i`` under ``seed`` is ``(v + 0.5) * 2**-52``, a float64 strictly inside
(0, 1) (exact: ``v + 0.5`` needs 53 bits), where ``v`` is the top 52 bits of a 64-bit word of the Philox4x32-10 block (Salmon et
al., 2011; the Random123 reference, whose known answers the tests check) with

- key ``(seed mod 2**32, seed >> 32)`` (so ``0 <= seed < 2**64``),
- counter ``(j // 2, i mod 2**32, i >> 32, 0)``,
- ``v = (x0 << 32 | x1) >> 12`` for even ``j`` and ``(x2 << 32 | x3) >> 12`` for odd ``j``.

Every sample thus has its own unbounded stream: the draws of a range equal the draws made one
sample at a time, a sample's first ``n`` draws do not depend on how many more are taken, and a
whole range is computed at once by vectorized NumPy (no Python loop over samples).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["philox4x32", "uniforms", "to_device"]

_MULTIPLIERS = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_KEY_STEPS = (np.uint64(0x9E3779B9), np.uint64(0xBB67AE85))
_LOW32 = np.uint64(0xFFFFFFFF)
_ROUNDS = 10


def philox4x32(counters: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 blocks of ``counters`` ``[..., 4]`` (32-bit words) under ``key``, uint64 ``[..., 4]``
    holding 32-bit words."""
    x0, x1, x2, x3 = (np.ascontiguousarray(counters[..., index], dtype=np.uint64) & _LOW32 for index in range(4))
    key0, key1 = np.uint64(key[0] & 0xFFFFFFFF), np.uint64(key[1] & 0xFFFFFFFF)
    shift = np.uint64(32)
    high0, high1 = np.empty_like(x0), np.empty_like(x0)
    for round_index in range(_ROUNDS):
        if round_index:
            key0, key1 = (key0 + _KEY_STEPS[0]) & _LOW32, (key1 + _KEY_STEPS[1]) & _LOW32
        np.multiply(x0, _MULTIPLIERS[0], out=x0)  # x0 becomes the product hi:lo of word 0
        np.multiply(x2, _MULTIPLIERS[1], out=x2)  # likewise for word 2
        np.right_shift(x2, shift, out=high1)
        np.right_shift(x0, shift, out=high0)
        np.bitwise_xor(high1, x1, out=high1)
        np.bitwise_xor(high1, key0, out=high1)
        np.bitwise_xor(high0, x3, out=high0)
        np.bitwise_xor(high0, key1, out=high0)
        np.bitwise_and(x2, _LOW32, out=x2)
        np.bitwise_and(x0, _LOW32, out=x0)
        # (hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0)
        x0, x1, x2, x3, high0, high1 = high1, x2, high0, x0, x1, x3
    return np.stack([x0, x1, x2, x3], axis=-1)


def uniforms(seed: int, start: int, stop: int, n_draws: int) -> np.ndarray:
    """The first ``n_draws`` draws of samples ``start .. stop-1``, float64 ``[stop - start, n_draws]`` in (0, 1)."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in 0 .. 2**64 - 1, got {seed}")
    if not 0 <= start <= stop:
        raise ValueError(f"sample range must satisfy 0 <= start <= stop, got start={start}, stop={stop}")
    if n_draws < 0:
        raise ValueError(f"n_draws must be >= 0, got {n_draws}")
    samples = np.arange(start, stop, dtype=np.uint64)
    blocks = np.arange((n_draws + 1) // 2, dtype=np.uint64)
    counters = np.empty((samples.size, blocks.size, 4), dtype=np.uint64)
    counters[..., 0] = blocks[None, :]
    counters[..., 1] = (samples & _LOW32)[:, None]
    counters[..., 2] = (samples >> np.uint64(32))[:, None]
    counters[..., 3] = 0
    words = philox4x32(counters, (seed & 0xFFFFFFFF, seed >> 32))
    pairs = (words[..., 0::2] << np.uint64(32)) | words[..., 1::2]
    top = (pairs >> np.uint64(12)).reshape(samples.size, 2 * blocks.size)[:, :n_draws]
    return (top.astype(np.float64) + 0.5) * 2.0**-52


def to_device(array: np.ndarray, device: torch.device | str) -> Tensor:
    """``array`` as a tensor on ``device``: one copy, from pinned memory and non-blocking on CUDA."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
