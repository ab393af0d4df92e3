"""The simulator on real Fashion-MNIST: selection under the budget, the
spreadsheet, determinism, learning, and mirrors that never drift."""
from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
from openpyxl import load_workbook

from flq.master import Master
from flq.results import CURVE_COLUMNS
from flq.runtime import Runtime
from flq.simulate import simulate
from flq.worker import Worker

from conftest import REPO, small_config


@pytest.fixture(scope="module")
def runtime20(fmnist_available):
    return Runtime(small_config(total_workers=20, max_rounds=1))


@pytest.mark.parametrize("mode,b_down,expected", [("fedavg", 32, 1), ("laq8", 32, 4), ("bbit", 8, 9), ("bin", 8, 20)])
def test_budget_selects_published_counts(runtime20, mode, b_down, expected):
    # SPEC.md: under 17e6 bits, 20 workers -> 1 (32n), 4 (8n), 9 (4n), 20 (1n) uploads per round
    cfg = small_config(total_workers=20, max_rounds=1, mode=mode, b_up=4, b_down=b_down)
    res = simulate(cfg, write=False, progress=False, runtime=runtime20)
    (rec,) = res.records
    assert rec["selcnt"] == expected
    n = runtime20.model.n
    assert rec["bits_up_cum"] == expected * cfg.uplink_bits * n
    assert rec["bits_down_cum"] == 20 * (32 if b_down == 32 else b_down) * n
    assert rec["cum_bits_total"] == rec["bits_up_cum"] + rec["bits_down_cum"]


def test_same_seed_same_run_and_different_seed_differs(fmnist_available):
    cfg = small_config(max_rounds=2)
    a = simulate(cfg, write=False, progress=False)
    b = simulate(cfg, write=False, progress=False)
    assert hashlib.sha256(a.theta.tobytes()).hexdigest() == hashlib.sha256(b.theta.tobytes()).hexdigest()
    assert [r["loss"] for r in a.records] == [r["loss"] for r in b.records]
    c = simulate(small_config(max_rounds=2, seed=7), write=False, progress=False)
    assert not np.array_equal(a.theta, c.theta)


@pytest.mark.parametrize("mode", ["bbit", "bin", "laq8", "fedavg"])
def test_mirrors_stay_bit_identical(fmnist_available, mode):
    cfg = small_config(total_workers=3, mode=mode, b_down=8, sel_clients=2)
    rt = Runtime(cfg)
    master = Master(cfg, rt.segments, rt.initial_model())
    workers = [Worker(m, cfg, rt.model, rt.data.train_x, rt.data.train_y, rt.partitions[m]) for m in range(3)]
    for k in range(3):
        me_k = master.begin_round()
        for w in workers:
            master.add_offer(w.offer(k, me_k, master.downlink(w.worker_id)))
        chosen = master.select()
        assert len(chosen) == 2
        for w in workers:
            if w.worker_id in chosen:
                master.receive_upload(w.worker_id, w.upload(k))
            else:
                w.skip(k)
        master.end_round()
        for w in workers:
            m = w.worker_id
            assert np.array_equal(master.ref_down[m], w.ref_down)
            assert np.array_equal(master.ref_up[m], w.ref_up)
            assert (master.up_version[m], master.down_version[m]) == (w.up_version, w.down_version)
            if mode in ("bbit", "bin"):
                assert w.clock == (0 if m in chosen else w.clock)
    if mode in ("bbit", "bin"):
        assert any(np.any(w.ef != 0) for w in workers)  # error feedback is live


def test_learns_above_chance_in_ten_rounds(fmnist_available):
    cfg = small_config(total_workers=20, max_rounds=10, mode="bbit", b_up=4, b_down=8, threads=2)
    res = simulate(cfg, write=False, progress=False)
    last = res.records[-1]
    assert last["acc"] > 0.3, last  # chance is 0.1
    assert all(np.isnan(r["acc"]) for r in res.records[:-1])  # eval_every 1000: only the last round


def test_cli_simulate_writes_spreadsheet_and_log(fmnist_available, tmp_path):
    cmd = [sys.executable, "-m", "flq", "simulate", "--config", str(REPO / "configs" / "paper_fmnist.json"),
           "--mode", "bin", "--b_down", "8", "--rounds", "2", "--workers", "4", "--threads", "1",
           "--results_dir", str(tmp_path / "results"), "--log_dir", str(tmp_path / "logs"), "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (xlsx,) = (tmp_path / "results").glob("flq_results_fashion_mnist_bin_*.xlsx")
    (log,) = (tmp_path / "logs").glob("simulate_bin_*.log")
    assert "round 2:" in log.read_text()
    wb = load_workbook(xlsx, read_only=True)
    assert wb.sheetnames == ["curve_bin", "bin_bin", "config"]
    header = [c.value for c in next(wb["curve_bin"].iter_rows(max_row=1))]
    assert header[:len(CURVE_COLUMNS)] == CURVE_COLUMNS
    rows = list(wb["curve_bin"].iter_rows(min_row=2, values_only=True))
    assert [r[0] for r in rows] == [1, 2]
    binary = list(wb["bin_bin"].iter_rows(values_only=True))
    assert binary[0] == ("iter", "w0", "w1", "w2", "w3")
    assert binary[1] == (1, 1, 1, 1, 1)  # bin under 17e6 bits: everybody uploads
    config = {r[0]: r[1] for r in wb["config"].iter_rows(min_row=2, values_only=True)}
    assert config["flq_algorithm.mode"] == "bin" and config["flq_algorithm.b_up"] == 1
    assert config["system.max_rounds"] == 2
