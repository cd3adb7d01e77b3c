"""Evaluation statistics."""

from __future__ import annotations

import numpy as np


def mean_ci95(values) -> tuple[float, float]:
    """Mean and half-width of the normal-approximation 95% confidence interval.

    >>> mean_ci95([1.0, 2.0, 3.0])
    (2.0, 1.1316...)
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size < 2:
        raise ValueError(f"need at least 2 values for a confidence interval, got {values.size}.")
    return float(values.mean()), float(1.96 * values.std(ddof=1) / np.sqrt(values.size))
