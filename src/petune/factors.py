"""Integer splits of layer sizes that several methods share (no torch: `petune plan` counts with them too)."""

from __future__ import annotations


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into (m, n), m n = dimension, LyCORIS's rule (so files have the same shapes).

    A `factor` that divides `dimension` gives (factor, dimension / factor). Otherwise m is the largest
    divisor not above `factor` (-1: no limit) met while walking divisors up to the square root (the first
    divisor past it counts, then the pair is sorted): 32 -> (4, 8), 64 -> (8, 8), 127 -> (1, 127).
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m = 1
    for divisor in range(2, dimension + 1):
        if dimension % divisor:
            continue
        if divisor > limit:
            break
        m = divisor
        if divisor >= dimension // divisor:
            break
    return min(m, dimension // m), max(m, dimension // m)


def nearest_divisor(dimension: int, value: int) -> int:
    """`value` if it divides `dimension`, else the nearest divisor (the smaller one on a tie); `dimension` itself
    for a value at or above it (OFT's block count or size, as HF PEFT adjusts it)."""
    if dimension % value == 0:
        return value
    if value >= dimension:
        return dimension
    lower = next(d for d in range(value, 0, -1) if dimension % d == 0)
    higher = next(d for d in range(value, dimension + 1) if dimension % d == 0)
    return lower if value - lower <= higher - value else higher
