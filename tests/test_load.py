"""Load: 50 workers (HTTP clients on loopback) and a real master process,
small test model, 20 rounds: no errors (benchmarks/load_workers.py)."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

from load_workers import run  # noqa: E402


@pytest.mark.slow
def test_fifty_workers_twenty_rounds_no_errors(fmnist_available):
    r = run(workers=50, rounds=20, model="mlp")
    assert r["rounds_done"] == 20 and r["master_exit"] == 0
    assert r["offers_per_round"] == [50]  # every worker offered in every round
    assert r["worker_errors"] == [] and r["master_warnings"] == []
    assert r["workers_finished"] == 50
    assert 0 < r["master_peak_rss_mib"] < 4096
