"""Tests for flq.algorithm.selection: priority order and budget selection
(docs/algorithm.md, "One round", steps 5-6)."""

from __future__ import annotations

import pytest

from flq.algorithm.selection import Candidate, priority_order, select

# gain / cost: id0 8/4 = 2, id1 3/1 = 3, id2 2/1 = 2, id3 10/10 = 1, id4 6/2 = 3
# -> by ratio descending, ties to the lower id: [1, 4, 0, 2, 3]
OFFERS = [
    Candidate(3, 10.0, 10.0),
    Candidate(4, 6.0, 2.0),
    Candidate(0, 8.0, 4.0),
    Candidate(2, 2.0, 1.0),
    Candidate(1, 3.0, 1.0),
]
ORDER = [1, 4, 0, 2, 3]


def test_priority_order_exact():
    assert [c.worker_id for c in priority_order(OFFERS)] == ORDER
    assert [c.worker_id for c in priority_order(reversed(OFFERS))] == ORDER
    assert [c.worker_id for c in priority_order(sorted(OFFERS, key=lambda c: c.worker_id))] == ORDER


def test_priority_ties_lower_id_first():
    same = [Candidate(m, 1.0, 2.0) for m in (5, 2, 9, 0)]
    assert [c.worker_id for c in priority_order(same)] == [0, 2, 5, 9]


def test_priority_ratio_not_gain():
    # higher gain but lower gain/cost comes later
    offers = [Candidate(0, 100.0, 1000.0), Candidate(1, 1.0, 1.0)]
    assert [c.worker_id for c in priority_order(offers)] == [1, 0]


def test_sel_clients_takes_first_k():
    assert select(OFFERS, 1, 0) == [1]
    assert select(OFFERS, 2, 0) == [1, 4]
    assert select(OFFERS, 3, 0) == [1, 4, 0]
    assert select(OFFERS, 10, 0) == ORDER
    # sel_clients wins over a budget
    assert select(OFFERS, 2, 1.0) == [1, 4]


def test_budget_skips_dear_candidate_takes_later_cheaper():
    # budget 5: id1 (cost 1, left 4), id4 (2, left 2), id0 (4) does not fit,
    # id2 (1, left 1) fits, id3 (10) does not.
    assert select(OFFERS, 0, 5.0) == [1, 4, 2]
    # budget 8: 1 (7), 4 (5), 0 (1), 2 (0) -- exact fit allowed; 3 does not fit
    assert select(OFFERS, 0, 8.0) == [1, 4, 0, 2]
    # budget 18 = 1+2+4+1+10: all
    assert select(OFFERS, 0, 18.0) == ORDER
    # budget 17.99: all but 3
    assert select(OFFERS, 0, 17.99) == [1, 4, 0, 2]
    # budget 0.5: nothing fits
    assert select(OFFERS, 0, 0.5) == []


def test_no_limit_takes_all():
    assert select(OFFERS, 0, 0) == ORDER
    assert select([], 0, 0) == []
    assert select([], 3, 100.0) == []


N_MODEL = 467818


@pytest.mark.parametrize("bits,count", [(32, 1), (8, 4), (4, 9), (1, 20)])
def test_published_budget_counts(bits, count):
    # 17e6 / (b n): 32n = 14,970,176 -> 1; 8n = 3,742,544 -> 4 (4.54);
    # 4n = 1,871,272 -> 9 (9.08); 1n = 467,818 -> 36.3, capped by the 20 workers.
    cost = float(bits * N_MODEL)
    offers = [Candidate(m, float(1 + (m * 7) % 20), cost) for m in range(20)]
    chosen = select(offers, 0, 17e6)
    assert len(chosen) == count
    # the highest gains (equal cost) go first: gains 1 + 7m mod 20
    expected = [c.worker_id for c in sorted(offers, key=lambda c: (-c.gain, c.worker_id))][:count]
    assert chosen == expected
