"""The lazy (skip) rule of LAQ-style uploads (docs/algorithm.md, "One round", steps 1 and 4).

A worker uploads only when its quantized innovation is large compared with
how much the global model moved recently; otherwise it skips the round and
keeps what it did not send in its error-feedback residual.
"""

from __future__ import annotations

from typing import Sequence


def history_energy(delta_sq_norms: Sequence[float], ck: float) -> float:
    """``me_k = sum_{d=1..} (ck / d) * ||delta_d||^2`` (step 1).

    Args:
        delta_sq_norms: ``||theta^(k-d+1) - theta^(k-d)||^2`` for d = 1, 2, ...
            (most recent first), at most ``D`` of them; fewer in early rounds.
        ck: energy weight.
    """
    return float(sum((ck / d) * float(sq) for d, sq in enumerate(delta_sq_norms, start=1)))


def lazy_threshold(me_k: float, lr: float, num_workers: int, e: float, e_hat: float, thr_scale: float) -> float:
    """``thr_scale * (me_k / (lr^2 M^2) + 3 (e + e_hat))`` (step 4)."""
    return thr_scale * (me_k / (lr * lr * num_workers * num_workers) + 3.0 * (e + e_hat))


def is_candidate(
    innovation_sq: float,
    me_k: float,
    lr: float,
    num_workers: int,
    e: float,
    e_hat: float,
    thr_scale: float,
    round_index: int,
    warmup: int,
    clock: int,
    max_clock: float,
) -> bool:
    """Whether a bbit/bin worker offers an upload this round (step 4).

    Args:
        innovation_sq: ``||q - ref_up||^2`` (the quantized innovation).
        me_k: history energy of this round.
        lr, num_workers: the master's learning rate and ``M``.
        e: this round's quantization error ``||q - g_eff||^2``.
        e_hat: the last committed quantization error.
        thr_scale: 0 makes every worker a candidate.
        round_index: ``k`` (0-based); rounds ``k < warmup`` always upload.
        clock: rounds since this worker's last upload; ``clock >= C`` forces one.
        max_clock: ``C``.
    """
    if round_index < warmup or clock >= max_clock:
        return True
    return innovation_sq >= lazy_threshold(me_k, lr, num_workers, e, e_hat, thr_scale)


def next_clock(clock: int, selected: bool, max_clock: float) -> int:
    """Lazy clock after a round: 0 when selected, else ``min(clock + 1, C + 1)`` (steps 7-8)."""
    if selected:
        return 0
    return int(min(clock + 1, max_clock + 1))
