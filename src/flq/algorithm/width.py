"""Adaptive uplink width (docs/algorithm.md, "Adaptive width").

With ``adaptive_width`` a worker picks, each round, the bit width ``b`` of
its upload from ``2..b_up`` by weighing the error a width adds against the
bits it costs:

    J(b) = w * e(b) / ||x||^2  +  R(b) / share

* ``x = g_eff - ref_up`` is the innovation the upload quantizes;
* ``e(b) = ||q_b - g_eff||^2`` is the quantization error at ``b`` bits, the
  same ``e`` the lazy rule charges and error feedback carries;
* ``R(b)`` is the real charged size of the encoded upload at ``b`` bits
  (:func:`~flq.algorithm.packing.charged_bits`);
* ``share = up_budget_bits / M`` is the worker's share of the round's budget;
* ``w`` is ``width_error_weight`` (default 4).

With ``w = 1`` spending the whole share is priced like an error as large as
the whole innovation: the budget's shadow price if an error cost no more than
an undelivered innovation. It costs more: what is not sent stays in error
feedback and arrives later, while stochastic rounding's noise enters the
model, and Adam divides each coordinate by its own gradient scale, so noise
on small coordinates is amplified. Measured on the paper configuration over
400 rounds, ``w = 1`` settled on 3 bits after round 10 and ended 3.8 points
of test accuracy below fixed 4 bits; ``w = 4`` is the default.

Stochastic rounding's error falls about fourfold per extra bit while the
coded size grows by well under ``n`` bits, so ``J`` first falls
and then rises; widths are tried from the narrowest up and the scan stops at
the first width whose ``J`` is not lower than the one before (the chosen
width). Without a budget (``sel_clients`` set or ``up_budget_bits`` 0) the
share is infinite and the widest width is chosen.

Every width is quantized with the same random draws (the generator is
rewound between tries), so the uplink stream advances exactly as one
quantization would whatever width is chosen: the choice is deterministic
given the seed, and the simulator and the cluster make the same one.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, Tuple

import numpy as np

from .quantize import QuantizedVector

#: ``encode_at(bits, rng) -> (wire form, value q, payload, J)``: quantize,
#: encode and score one width, drawing from the generator given.
EncodeAt = Callable[[int, np.random.Generator], Tuple[QuantizedVector, np.ndarray, bytes, float]]


def budget_share(up_budget_bits: float, sel_clients: int, total_workers: int) -> float:
    """Bits of the round's budget one worker's upload may take: ``up_budget_bits
    / M`` when selection is by budget (``sel_clients`` 0, a budget set), else
    infinity."""
    if sel_clients == 0 and up_budget_bits > 0:
        return float(up_budget_bits) / total_workers
    return math.inf


def width_score(
    error: float, innovation_sq: float, charged_bits: int, share_bits: float, error_weight: float = 4.0
) -> float:
    """``J = w e / ||x||^2 + R / share`` (module docstring); an innovation of
    zero energy has no error to weigh, so then ``J = R / share``."""
    relative_error = error / innovation_sq if innovation_sq > 0 else 0.0
    return error_weight * relative_error + charged_bits / share_bits


def choose_width(
    encode_at: EncodeAt, widths: Sequence[int], rng: np.random.Generator
) -> Tuple[QuantizedVector, np.ndarray, bytes]:
    """Try ``widths`` in ascending order and keep the last before ``J`` stops
    falling (the narrowest when it never falls, the widest when it always does).

    Args:
        encode_at: quantizes, encodes and scores a width.
        widths: the allowed widths (at least one).
        rng: the uplink stream; left as the chosen width's quantization leaves it.

    Returns:
        The chosen width's wire form, value ``q`` and payload.
    """
    start = rng.bit_generator.state
    best = None
    for bits in sorted(widths):
        rng.bit_generator.state = start
        qv, q, payload, score = encode_at(bits, rng)
        if best is not None and score >= best[3]:
            break
        best = (qv, q, payload, score, rng.bit_generator.state)
    if best is None:
        raise ValueError("choose_width needs at least one width")
    rng.bit_generator.state = best[4]
    return best[0], best[1], best[2]
