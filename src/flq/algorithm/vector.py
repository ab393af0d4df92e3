"""Small vector helpers shared by the algorithm modules."""

from __future__ import annotations

import numpy as np


def squared_norm(v: np.ndarray) -> float:
    """``||v||^2`` accumulated in float64, as a Python float.

    Deliberately not ``np.dot``: a BLAS call starts BLAS's own thread pool,
    which then fights PyTorch's threads for the cores (measured here: local
    training 3x slower). Pairwise summation is also deterministic.
    """
    return float(np.square(v, dtype=np.float64).sum())
