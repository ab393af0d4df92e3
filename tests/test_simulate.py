"""The simulator on real Fashion-MNIST: selection under the budget, the
spreadsheet, determinism, learning, and mirrors that never drift."""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from cluster_util import free_port
from conftest import REPO, small_config
from disk_util import disk
from openpyxl import load_workbook

from flq.algorithm.lazy import next_clock
from flq.master import Master
from flq.results import CURVE_COLUMNS, read_results
from flq.runtime import Runtime
from flq.simulate import simulate
from flq.worker import Worker


@pytest.fixture(scope="module")
def runtime20(fmnist_available):
    return Runtime(small_config(total_workers=20, max_rounds=1))


@pytest.mark.parametrize("mode,b_down,expected", [("fedavg", 32, 1), ("laq8", 32, 4), ("bbit", 8, 9), ("bin", 8, 20)])
def test_budget_selects_published_counts(runtime20, mode, b_down, expected):
    # docs/algorithm.md: under 17e6 bits, 20 workers -> 1 (32n), 4 (8n), 9 (4n), 20 (1n) uploads per round
    # when the budget charges b n bits per upload (no entropy coding, as in the original)
    cfg = small_config(total_workers=20, max_rounds=1, mode=mode, b_up=4, b_down=b_down, entropy_coding="none")
    res = simulate(cfg, write=False, progress=False, runtime=runtime20)
    (rec,) = res.records
    assert rec["selcnt"] == expected
    n = runtime20.model.n
    assert rec["bits_up_cum"] == expected * cfg.uplink_bits * n
    assert rec["bits_down_cum"] == 20 * (32 if b_down == 32 else b_down) * n
    assert rec["cum_bits_total"] == rec["bits_up_cum"] + rec["bits_down_cum"]


def test_coded_uploads_are_charged_their_real_size_and_more_are_heard(runtime20):
    """Round 1 of the paper configuration, bbit 4/8 with entropy coding: the
    17e6-bit budget charges each upload its coded size, so all 20 workers are
    heard (9 uncoded); the nominal 4 n per upload stays in its own column."""
    cfg = small_config(total_workers=20, max_rounds=1, b_up=4, b_down=8, entropy_coding="both")
    res = simulate(cfg, write=False, progress=False, runtime=runtime20)
    (rec,) = res.records
    n = runtime20.model.n
    assert rec["selcnt"] == 20
    assert rec["bits_up_nominal_cum"] == 20 * 4 * n and rec["bits_down_nominal_cum"] == 20 * 8 * n
    assert rec["bits_up_cum"] <= 17e6 and rec["bits_up_cum"] < rec["bits_up_nominal_cum"] / 2
    # each 8-bit downlink is charged its data bytes (at most n + 1: stored when zstd would not help)
    assert rec["bits_down_cum"] % 8 == 0 and rec["bits_down_cum"] <= 20 * 8 * (n + 1)
    print(f"round 1 coded: {rec['selcnt']} uploads, {rec['bits_up_cum'] / (rec['selcnt'] * n):.3f} bits per element")


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
    master = Master(cfg, rt.segments, rt.initial_model()[0])
    workers = [Worker(m, cfg, rt.model, rt.data.train_x, rt.data.train_y, rt.partitions[m]) for m in range(3)]
    for k in range(3):
        me_k = master.begin_round()
        clock_before = {w.worker_id: w.clock for w in workers}
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
            # step 7 resets the lazy clock of who uploaded, step 8 ticks the others'
            assert w.clock == (0 if m in chosen else next_clock(clock_before[m], False, cfg.C))
    assert any(w.clock > 0 for w in workers)  # 3 workers, 2 chosen: someone skipped the last round
    if mode in ("bbit", "bin"):
        assert any(np.any(w.ef != 0) for w in workers)  # error feedback is live


@pytest.mark.slow
def test_learns_above_chance_in_ten_rounds(fmnist_available):
    cfg = small_config(total_workers=20, max_rounds=10, mode="bbit", b_up=4, b_down=8, eval_every=1000)
    res = simulate(cfg, write=False, progress=False)
    last = res.records[-1]
    assert last["acc"] > 0.3, last  # chance is 0.1
    assert all(np.isnan(r["acc"]) for r in res.records[:-1])  # eval_every 1000: only the last round


@pytest.mark.slow
def test_cli_simulate_writes_spreadsheet_and_log(fmnist_available, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "flq",
        "simulate",
        "--config",
        str(REPO / "configs" / "paper_fmnist.json"),
        "--mode",
        "bin",
        "--b_down",
        "8",
        "--rounds",
        "2",
        "--eval_every",
        "2",
        "--workers",
        "4",
        "--threads",
        "1",
        "--results_dir",
        str(tmp_path / "results"),
        "--log_dir",
        str(tmp_path / "logs"),
        "--no-progress",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (xlsx,) = (tmp_path / "results").glob("flq_results_fashion_mnist_bin_*.xlsx")
    (log,) = (tmp_path / "logs").glob("simulate_bin_*.log")
    assert "round 2:" in log.read_text()
    wb = load_workbook(xlsx, read_only=True)
    assert wb.sheetnames == ["curve_bin", "bin_bin", "config"]
    header = [c.value for c in next(wb["curve_bin"].iter_rows(max_row=1))]
    assert header[: len(CURVE_COLUMNS)] == CURVE_COLUMNS
    rows = list(wb["curve_bin"].iter_rows(min_row=2, values_only=True))
    assert [r[0] for r in rows] == [1, 2]
    binary = list(wb["bin_bin"].iter_rows(values_only=True))
    assert binary[0] == ("iter", "w0", "w1", "w2", "w3")
    assert binary[1] == (1, 1, 1, 1, 1)  # bin under 17e6 bits: everybody uploads
    config = {r[0]: r[1] for r in wb["config"].iter_rows(min_row=2, values_only=True)}
    assert config["flq_algorithm.mode"] == "bin" and config["flq_algorithm.b_up"] == 1
    assert config["system.max_rounds"] == 2
    # how it ended, and the thread count the numbers depend on
    assert config["run.end"] == "completed" and config["runtime.threads"] == 1
    assert config["runtime.device"] == "cpu" and config["runtime.torch"]


# ---------------------------------------------------------------------------
# every way a run ends keeps the rounds done, and says which way in its status


def _simulate_cmd(root, *extra):
    return [
        sys.executable,
        "-m",
        "flq",
        "simulate",
        "--config",
        str(REPO / "configs" / "paper_fmnist.json"),
        "--model",
        "mlp",
        "--workers",
        "4",
        "--threads",
        "1",
        "--eval_every",
        "1000",
        "--results_dir",
        str(root / "results"),
        "--log_dir",
        str(root / "logs"),
        *extra,
    ]


def _start(root, *extra, **kw):
    root.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        _simulate_cmd(root, *extra), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def _wait_for_round(root, k, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = list((root / "logs").glob("simulate_*.log"))
        if logs and f"round {k}:" in logs[0].read_text():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError(f"round {k} not reached")


def _config(xlsx):
    return read_results(xlsx).config


@pytest.mark.parametrize("sig,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_keeps_the_rounds_done_and_exits_with_its_status(fmnist_available, tmp_path, sig, status):
    """Before: SIGTERM exited 143 with nothing saved; Ctrl-C saved but exited 0."""
    p = _start(tmp_path, "--rounds", "100000", "--no-progress")
    _wait_for_round(tmp_path, 3, p)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == status, err
    name = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}[sig]
    assert f"flq simulate: {name} after" in err and "Traceback" not in err
    (xlsx,) = (tmp_path / "results").glob("*.xlsx")
    run = read_results(xlsx)
    done = len(run.curve)
    assert done >= 3 and list(run.curve["iter"]) == list(range(1, done + 1))
    assert run.config["run.end"] == name.lower()
    from safetensors import safe_open

    with safe_open(str(xlsx.with_suffix(".safetensors")), "pt") as f:
        assert f.metadata()["round"] == str(done)  # the model of the last round recorded, not a later one


def test_signal_during_start_up_exits_143_in_one_line(fmnist_available, tmp_path):
    p = _start(tmp_path, "--rounds", "100000", "--no-progress")
    deadline = time.monotonic() + 60
    while not list((tmp_path / "logs").glob("simulate_*.log")):  # the command has started; data still loading
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    try:
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:  # never leave a run training behind this test
            p.kill()
    assert p.returncode == 143, err
    assert "Traceback" not in err
    if not list((tmp_path / "results").glob("*.xlsx")):
        lines = err.strip().splitlines()
        # during start-up, or (on a loaded machine the signal can land there) in round 1, before it finished
        assert lines[-1] == "flq simulate: SIGTERM during start-up, before any round: nothing to write" or lines[
            -2:
        ] == [
            "flq simulate: SIGTERM after 0 rounds (exit 143)",
            "flq simulate: no round finished, so no results were written",
        ], err


def test_diverging_run_stops_with_a_clear_message_and_its_results(fmnist_available, tmp_path):
    """Before: --lr 1e16 crashed in round 2 with a traceback, exit 1, no spreadsheet."""
    p = _start(tmp_path, "--rounds", "50", "--lr", "1e16", "--no-progress")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 3, err
    assert "Traceback" not in err
    line = next(x for x in err.splitlines() if x.startswith("flq simulate:"))
    assert "round 2 diverged: worker(s) [0, 1, 2, 3] report a diverged local model" in line
    assert "lr 1e+16 too large" in line and "(exit 3)" in line
    (xlsx,) = (tmp_path / "results").glob("*.xlsx")
    run = read_results(xlsx)
    assert list(run.curve["iter"]) == [1, 2] and np.isnan(run.curve["loss"].iloc[1])
    assert run.config["run.end"] == "diverged"
    assert xlsx.with_suffix(".safetensors").is_file()


def test_full_results_disk_is_one_line_and_a_distinct_status(fmnist_available, tmp_path):
    """Before: a 17-line traceback and a spreadsheet without its model."""
    for kib, expected in ((64, "final model not written"), (4, "results not written")):
        with disk(tmp_path / f"disk{kib}", kib) as d:
            root = tmp_path / f"run{kib}"
            root.mkdir()
            cmd = _simulate_cmd(root, "--rounds", "2", "--no-progress", "--results_dir", str(d.path))
            out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300, preexec_fn=d.preexec)
            assert out.returncode == 6, out.stderr
            assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr
            (line,) = [x for x in out.stderr.splitlines() if expected in x]
            assert line.startswith("flq simulate: ")
            left = sorted(q.name for q in d.path.iterdir())
            assert left == ([] if kib == 4 else [left[0]]) and not any(n.endswith(".tmp") for n in left)


def test_results_that_cannot_be_written_for_any_reason_are_one_line_and_exit_6(fmnist_available, tmp_path):
    """Not only a full disk: a folder name the spreadsheet cannot carry (a
    control character breaks openpyxl, not the file system). Before: a
    traceback, an empty .xlsx left behind."""
    root = tmp_path / "run"
    root.mkdir()
    bad = tmp_path / "res\x01ults"
    out = subprocess.run(
        _simulate_cmd(root, "--rounds", "2", "--no-progress", "--results_dir", str(bad)),
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 6, out.stderr
    assert "Traceback" not in out.stderr
    (line,) = [x for x in out.stderr.splitlines() if "not written" in x]
    assert line.startswith("flq simulate: results not written to ") and "IllegalCharacterError" in line
    assert not bad.exists() or not [p for p in bad.iterdir() if p.suffix == ".xlsx"]


def test_two_runs_started_in_the_same_second_keep_their_own_files(fmnist_available, tmp_path):
    procs = [_start(tmp_path, "--rounds", "2", "--no-progress") for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    xlsx = sorted((tmp_path / "results").glob("*.xlsx"))
    logs = sorted((tmp_path / "logs").glob("simulate_bbit_*.log"))
    assert len(xlsx) == 2 and len(logs) == 2
    assert len({p.name for p in xlsx}) == 2 and all(p.with_suffix(".safetensors").is_file() for p in xlsx)
    assert all("round 2:" in p.read_text() for p in logs)


def test_progress_to_a_file_is_a_line_every_few_rounds(fmnist_available, tmp_path):
    """Before: tqdm's \\r updates, ~135 KB for 800 rounds in a nohup log."""
    log_file = tmp_path / "run.log"
    with open(log_file, "w") as f:
        proc = subprocess.run(
            _simulate_cmd(tmp_path, "--rounds", "40"), cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT, timeout=300
        )
    assert proc.returncode == 0
    text = log_file.read_text()
    assert "\r" not in text
    lines = [x for x in text.splitlines() if re.match(r"round \d+/40 ", x)]
    assert [x.split()[1] for x in lines] == [f"{k}/40" for k in range(2, 41, 2)]  # every 40 // 20 rounds
    # before round 1, what it is doing (before: nothing until round 2's line)
    first = text.index("round 2/40")
    for step in ("loading fashion_mnist", "splitting them among", "building ", "round 1 of 40 starts"):
        assert -1 < text.find(step) < first, step
    assert re.search(r"^time: 40 rounds in \d+ s", text, re.M)


def test_settings_that_cannot_train_are_refused_or_warned_at_start(fmnist_available, tmp_path):
    """An iid share smaller than a batch: before, a traceback; now one line
    and exit 2. A budget smaller than one upload: a warning at start."""
    p = _start(tmp_path / "a", "--rounds", "2", "--workers", "20", "--partition", "iid", "--batch_size", "5000")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "flq: config error: config key 'dataset.batch_size': 5000 is larger than each worker's iid share "
        "(60000 / 20 = 3000 samples); lower batch_size or total_workers"
    )
    p = _start(tmp_path / "b", "--rounds", "1", "--up_budget_bits", "1e5", "--entropy_coding", "none", "--no-progress")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0
    assert "up_budget_bits 1e+05 is smaller than one upload (203560 bits in mode bbit)" in err


def test_an_error_inside_the_round_loop_keeps_the_rounds_done(fmnist_available, tmp_path):
    """Before: any exception in the loop lost every round. Now the rounds
    recorded are returned and written, and the reason is 'error'."""
    cfg = small_config(model="mlp", max_rounds=10, results_dir=str(tmp_path / "results"))

    def failing(record):
        if record["iter"] == 3:
            raise RuntimeError("disk controller on fire")

    res = simulate(cfg, write=True, progress=False, on_round=failing)
    assert res.reason == "error" and res.exit_status == 1
    assert res.detail == "RuntimeError: disk controller on fire"
    assert [r["iter"] for r in res.records] == [1, 2, 3]
    run = read_results(res.results_path)
    assert list(run.curve["iter"]) == [1, 2, 3] and run.config["run.end"] == "error"


def test_master_refuses_settings_that_cannot_train_before_serving(fmnist_available, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "flq",
        "master",
        "--config",
        str(REPO / "configs" / "paper_fmnist.json"),
        "--workers",
        "20",
        "--partition",
        "iid",
        "--batch_size",
        "5000",
        "--port",
        str(free_port()),
        "--log_dir",
        str(tmp_path / "logs"),
    ]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith("flq: config error: config key 'dataset.batch_size': 5000 is larger than each worker's iid share")
    )


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_signal_whose_exception_a_finalizer_swallowed_still_stops_the_run(fmnist_available):
    """The handler runs between any two Python operations, also inside a
    ``__del__``, where Python prints and drops its exception; later signals
    are ignored once one fired. Before: such a SIGTERM was lost and the run
    went on (a CI run trained for 15 minutes)."""
    import gc
    import os

    from flq import outcome

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)  # delivered here: the Interrupted is raised inside __del__
            time.sleep(0.05)

    cfg = small_config(total_workers=2, max_rounds=50, model="mlp")
    rounds = []

    def on_round(record):
        rounds.append(record["iter"])
        if record["iter"] == 2:
            Finalized()  # dropped at once: its __del__ swallows the Interrupted
            gc.collect()

    with outcome.signals_interrupt():
        run = simulate(cfg, write=False, progress=False, on_round=on_round)
    assert run.reason == "sigterm" and rounds == [1, 2] and len(run.records) == 2
