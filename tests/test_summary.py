"""Tests for flq.summary: the per-round timing columns and log line, and the
results written at the end, which the simulator and the cluster master share."""

from __future__ import annotations

import logging
import math

from conftest import small_config

from flq.results import CURVE_COLUMNS, read_results
from flq.simulate import simulate
from flq.summary import log_round, round_timings
from flq.timing import Stopwatch

#: The timing columns the cluster master records each round (besides round_time_s, worker_compute_max_s).
MASTER_COLUMNS = {"master_quantize_s", "master_aggregate_s", "master_evaluate_s"}


def test_round_timings_names_and_restarts_the_stopwatch():
    master = Stopwatch()
    master.totals.update(quantize=0.5, aggregate=0.25)
    assert round_timings(master, {"compute": 2.0}) == {
        "master_quantize_s": 0.5,
        "master_aggregate_s": 0.25,
        "workers_compute_s": 2.0,
    }
    assert master.totals == {}
    master.totals["evaluate"] = 1.0
    assert round_timings(master) == {"master_evaluate_s": 1.0}


def _capture(caplog, monkeypatch):
    """Let caplog see the flq loggers even after a test set up log files (which stops propagation)."""
    monkeypatch.setattr(logging.getLogger("flq"), "propagate", True)
    return caplog.at_level(logging.INFO, logger="flq")


def test_log_round_is_one_line(caplog, monkeypatch):
    record = {
        "iter": 3,
        "loss": 0.5,
        "acc": float("nan"),
        "entropy": float("nan"),
        "selcnt": 2,
        "offers": 4,
        "cum_bits_total": 1000,
        "wire_bytes_up": 10,
        "wire_bytes_down": 20,
        "round_time_s": 1.25,
    }
    with _capture(caplog, monkeypatch):
        log_round(record)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == ("round 3: loss 0.5000 acc nan entropy nan selected 2/4 bits 1000 wire up 10 down 20 B (1.25 s)")


def test_simulator_records_the_cluster_timing_columns(fmnist_available, tmp_path, caplog, monkeypatch):
    cfg = small_config(model="mlp", max_rounds=2, eval_every=1, results_dir=str(tmp_path))
    with _capture(caplog, monkeypatch):
        res = simulate(cfg, write=True, progress=False)
    for rec in res.records:
        assert MASTER_COLUMNS | {"workers_compute_s", "workers_quantize_s", "worker_compute_max_s"} <= set(rec)
        assert not {"compute_s", "quantize_s", "aggregate_s", "evaluate_s"} & set(rec)
    # evaluated in the background (eval_overlap, the default): what the round waited for it is its own column
    assert set(res.timings) == MASTER_COLUMNS | {"master_evaluate_wait_s", "workers_compute_s", "workers_quantize_s"}
    assert math.isclose(res.timings["master_aggregate_s"], sum(r["master_aggregate_s"] for r in res.records))
    curve = read_results(res.results_path).curve
    assert list(curve.columns[: len(CURVE_COLUMNS)]) == CURVE_COLUMNS and MASTER_COLUMNS <= set(curve.columns)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("round 2: ") and "/4 bits " in m and " wire up " in m for m in messages)
    assert any(m.startswith("results (completed, 2 rounds) written to ") for m in messages)
