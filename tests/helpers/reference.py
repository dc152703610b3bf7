"""Comparing lcmkit's output with a reference (diffusers, or a formula written out in a test).

One assertion for every parity check, so each failure reads the same: what was compared, the largest difference,
where it is, and the tolerance it broke.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def as_float64(x: Any) -> np.ndarray:
    """A tensor, array, PIL image or nested list as a float64 array (PIL images keep their 0..255 values)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def max_abs_diff(a: Any, b: Any) -> float:
    """max |a - b| in float64; shapes must match exactly (no broadcasting hides a wrong shape)."""
    a, b = as_float64(a), as_float64(b)
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {a.shape} vs {b.shape}")
    return float(np.abs(a - b).max()) if a.size else 0.0


def assert_close_to_reference(
    actual: Any, expected: Any, *, atol: float, rtol: float = 0.0, what: str = "output"
) -> None:
    """Fail unless |actual - expected| <= atol + rtol * |expected| everywhere (NaN never passes).

    `actual` is lcmkit's side, `expected` the reference's; both are compared in float64 and must have the same
    shape. The message names `what`, the worst element's index and values, and how many elements are outside.
    """
    a, e = as_float64(actual), as_float64(expected)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {a.shape} != reference shape {e.shape}")
    if a.size == 0:
        return
    diff = np.abs(a - e)
    allowed = atol + rtol * np.abs(e)
    bad = ~(diff <= allowed)  # NaN compares false, so a NaN on either side counts as outside
    if not bad.any():
        return
    excess = np.where(np.isnan(diff), np.inf, diff - allowed)
    where = np.unravel_index(int(np.argmax(excess)), a.shape)
    index = tuple(int(i) for i in where)
    tolerance = f"atol {atol:g}" + (f" + rtol {rtol:g} * |reference|" if rtol else "")
    raise AssertionError(
        f"{what}: max abs diff {float(diff.max()):.3g} "
        f"exceeds {tolerance}; worst at index {index}: {a[where]:.6g} vs reference {e[where]:.6g} "
        f"({int(bad.sum())} of {a.size} elements outside)"
    )
