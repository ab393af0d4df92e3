"""Adaptive uplink width (docs/algorithm.md, "Adaptive width").

With ``adaptive_width`` a worker picks, each round, the bit width of its
upload from ``2..b_up``: the widest width whose *real* (entropy-coded) size
fits its share of the round's uplink budget, ``up_budget_bits / M``. Widths
are tried from the narrowest up and the scan stops at the first that does not
fit, so a worker whose innovation codes compactly sends more precision and
one whose innovation is spread out sends less, and every worker that offers
can be heard within the budget. Quantization variance falls about fourfold
per extra bit while the coded size grows by at most ``n`` bits, so this is
the least-variance width the budget allows (the constrained form of
rate-distortion optimisation), measured rather than modelled.

Every width is quantized with the same random draws (the generator is
rewound between tries), so the uplink stream advances exactly as one
quantization would whatever width is chosen: the choice is deterministic
given the seed, and the simulator and the cluster make the same one.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence, Tuple

import numpy as np

from .packing import charged_bits
from .quantize import QuantizedVector

#: ``encode_at(bits, rng) -> (wire form, reconstructed value, payload bytes)``.
EncodeAt = Callable[[int, np.random.Generator], Tuple[QuantizedVector, np.ndarray, bytes]]


def budget_share(up_budget_bits: float, sel_clients: int, total_workers: int) -> float:
    """Bits one upload may cost: ``up_budget_bits / M`` when selection is by
    budget (``sel_clients`` 0, a budget set), else infinity (then the widest
    width is always chosen)."""
    if sel_clients == 0 and up_budget_bits > 0:
        return float(up_budget_bits) / total_workers
    return math.inf


def choose_width(
    encode_at: EncodeAt, widths: Sequence[int], rng: np.random.Generator, share_bits: float
) -> Tuple[QuantizedVector, np.ndarray, bytes]:
    """Encode at each of ``widths`` (ascending) until one costs more than
    ``share_bits``; return the last that fit (the narrowest when none fits).

    Args:
        encode_at: quantizes and encodes at a width, drawing from the
            generator it is given.
        widths: the allowed widths (at least one).
        rng: the uplink stream; left as the chosen width's quantization
            leaves it.
        share_bits: the most one upload may be charged (bits).

    Returns:
        The chosen width's wire form, value and payload.
    """
    start = rng.bit_generator.state
    chosen = None
    for bits in sorted(widths):
        rng.bit_generator.state = start
        qv, q, payload = encode_at(bits, rng)
        if chosen is not None and charged_bits(payload) > share_bits:
            break
        chosen = (qv, q, payload, rng.bit_generator.state)
    assert chosen is not None, "no width given"
    rng.bit_generator.state = chosen[3]
    return chosen[0], chosen[1], chosen[2]
