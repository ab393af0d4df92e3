"""Tests for flq.algorithm.lazy: history energy, the LAQ skip rule and the
lazy clock (docs/algorithm.md, "One round", steps 1, 4, 7-8)."""

from __future__ import annotations

import pytest

from flq.algorithm.lazy import history_energy, is_candidate, lazy_threshold, next_clock


def test_history_energy_hand_example():
    # norms [4, 2, 1], ck 0.8: 0.8/1*4 + 0.8/2*2 + 0.8/3*1 = 3.2 + 0.8 + 0.2666... = 4.2666...
    assert history_energy([4.0, 2.0, 1.0], 0.8) == pytest.approx(4.0 + 0.8 / 3, rel=1e-15)
    assert history_energy([4.0, 2.0, 1.0], 0.8) == pytest.approx(4.266666666666667, rel=1e-15)


def test_history_energy_edge_cases():
    assert history_energy([], 0.8) == 0.0  # round 0: no history
    assert history_energy([5.0], 0.8) == 4.0  # 0.8 * 5
    assert history_energy([1.0, 1.0, 1.0, 1.0], 0.0) == 0.0
    # weights 1/d: ck=1, all ones, D=4 -> 1 + 1/2 + 1/3 + 1/4 = 25/12
    assert history_energy([1.0] * 4, 1.0) == pytest.approx(25 / 12, rel=1e-15)
    # the most recent change has the largest weight: order matters
    assert history_energy([8.0, 0.0], 1.0) == 8.0
    assert history_energy([0.0, 8.0], 1.0) == 4.0
    assert isinstance(history_energy([1], 1), float)


# Hand example with exactly representable numbers: lr = 0.5, M = 2 ->
# lr^2 M^2 = 1. me_k = 2, e = 0.25, e_hat = 0.5 -> 3 (e + e_hat) = 2.25.
# threshold = thr_scale * (2 + 2.25) = 4.25 * thr_scale.
HAND = dict(me_k=2.0, lr=0.5, num_workers=2, e=0.25, e_hat=0.5)


def test_lazy_threshold_hand_example():
    assert lazy_threshold(thr_scale=1.0, **HAND) == 4.25
    assert lazy_threshold(thr_scale=2.0, **HAND) == 8.5
    assert lazy_threshold(thr_scale=0.0, **HAND) == 0.0
    # me_k / (lr^2 M^2): lr 0.25, M 4 -> lr^2 M^2 = 1; lr 0.5, M 4 -> 4
    assert lazy_threshold(8.0, 0.5, 4, 0.0, 0.0, 1.0) == 2.0
    assert lazy_threshold(8.0, 0.25, 4, 0.0, 0.0, 1.0) == 8.0
    # 3 (e + e_hat) only
    assert lazy_threshold(0.0, 1.0, 1, 1.0, 2.0, 1.0) == 9.0


def _cand(innovation_sq, thr_scale=1.0, k=5, warmup=0, clock=0, C=1e9):
    return is_candidate(
        innovation_sq,
        HAND["me_k"],
        HAND["lr"],
        HAND["num_workers"],
        HAND["e"],
        HAND["e_hat"],
        thr_scale,
        k,
        warmup,
        clock,
        C,
    )


def test_is_candidate_skips_below_threshold():
    assert _cand(4.0) is False  # 4.0 < 4.25
    assert _cand(4.2499) is False
    assert _cand(8.0, thr_scale=2.0) is False  # 8 < 8.5


def test_is_candidate_passes_at_or_above_threshold():
    assert _cand(4.25) is True  # >=
    assert _cand(5.0) is True
    assert _cand(8.5, thr_scale=2.0) is True


def test_thr_scale_zero_always_passes():
    assert _cand(0.0, thr_scale=0.0) is True
    assert is_candidate(0.0, 1e30, 1e-3, 20, 1e10, 1e10, 0.0, 100, 0, 0, 1e9) is True


def test_warmup_forces_upload():
    # k < warmup -> candidate even with innovation 0
    assert _cand(0.0, k=0, warmup=3) is True
    assert _cand(0.0, k=2, warmup=3) is True
    assert _cand(0.0, k=3, warmup=3) is False
    assert _cand(0.0, k=0, warmup=0) is False


def test_clock_forces_upload():
    # clock >= C forces an upload although 0 < 4.25
    assert _cand(0.0, clock=5, C=5) is True
    assert _cand(0.0, clock=6, C=5) is True
    assert _cand(0.0, clock=4, C=5) is False  # clock = C - 1
    assert _cand(0.0, clock=0, C=0) is True  # C = 0: always
    assert _cand(0.0, clock=10**6, C=1e9) is False


def test_next_clock():
    assert next_clock(3, True, 5) == 0
    assert next_clock(0, False, 5) == 1
    assert next_clock(3, False, 5) == 4
    assert next_clock(4, False, 5) == 5
    assert next_clock(5, False, 5) == 6  # cap C + 1
    assert next_clock(6, False, 5) == 6
    assert next_clock(100, False, 5) == 6
    assert next_clock(7, True, 5) == 0
    assert next_clock(0, False, 0) == 1  # C = 0 -> cap 1
    assert next_clock(1, False, 0) == 1
    v = next_clock(41, False, 1e9)
    assert v == 42 and type(v) is int
    v = next_clock(int(1e9), False, 1e9)
    assert v == 1_000_000_001 and type(v) is int
    assert next_clock(1_000_000_001, False, 1e9) == 1_000_000_001
