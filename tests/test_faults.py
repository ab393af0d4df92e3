"""Faults with real processes on loopback: workers killed, stalled,
interrupted and restarted, a master killed and resumed, paused, signalled,
on a full disk; every wait ends within its bound, every end keeps its
results and exits with the status that says which."""

from __future__ import annotations

import math
import signal
import subprocess
import time

import httpx
import pytest
from cluster_util import port_is_free, start_cluster
from conftest import small_config
from disk_util import disk

from flq.results import read_results
from flq.simulate import simulate

pytestmark = pytest.mark.slow  # real master and worker processes (run_tests.sh --quick leaves them out)

MLP = {"model": "mlp", "eval_every": 0}


def test_worker_killed_then_rejoins(tmp_path, fmnist_available):
    # bin under 17e6 bits: every candidate uploads, so the bin_ sheet shows who took part
    cluster = start_cluster(
        tmp_path,
        4,
        {
            "rounds": 40,
            "mode": "bin",
            "b_down": 8,
            "round_timeout_s": 3,
            "min_workers": 3,
            "eval_every": 0,
            "worker_timeout_s": 5,
        },
    )
    try:
        cluster.wait_status(lambda s: s["rounds_done"] >= 3, what="round 3")
        cluster.workers[2].kill()
        cluster.workers[2].wait()
        st = cluster.wait_status(
            lambda s: s["rounds_done"] >= 6 and s["workers"][2]["state"] == "absent", what="worker 2 absent and round 6"
        )
        assert st["state"] == "training"
        assert [w["state"] == "absent" for w in st["workers"]] == [False, False, True, False]
        killed_at = st["rounds_done"]
        cluster.start_worker(2, "--no_state")  # afresh, so it resynchronizes (its saved state: test_worker_state)
        assert cluster.wait(timeout=600) == 0, cluster.output()
    finally:
        cluster.kill_all()
    (xlsx,) = cluster.results()
    run = read_results(xlsx)
    assert list(run.curve["iter"]) == list(range(1, 41))
    w2 = list(run.binary["w2"])
    assert w2[:3] == [1, 1, 1]
    assert w2[killed_at - 1] == 0  # absent after the kill
    assert w2[-1] == 1 and sum(w2[killed_at:]) >= 3  # selected again after rejoining
    # the others took part throughout (a round or two may be lost to a slow start: a straggler)
    assert all(run.binary[f"w{m}"].sum() >= 37 for m in (0, 1, 3))
    text = (tmp_path / "logs").glob("master_*.log")
    log = next(text).read_text()
    assert "worker 2 absent" in log and "worker 2 registered again" in log and "resynchronizes" in log


def test_master_killed_then_resumes_from_checkpoint(tmp_path, fmnist_available):
    settings = {
        "rounds": 12,
        "checkpoint_every": 2,
        "checkpoint_dir": str(tmp_path / "ckpt"),
        "eval_every": 1000,
        "round_timeout_s": 10,
        "seed": 5,
    }
    cluster = start_cluster(tmp_path, 3, settings)
    try:
        cluster.wait_status(lambda s: s["rounds_done"] >= 5, what="round 5")
        cluster.master.kill()
        cluster.master.wait()
        (ckpt,) = (tmp_path / "ckpt").glob("flq_master_fashion_mnist_bbit_*.npz")  # this run's own file
        cluster.restart_master("--resume")
        assert cluster.wait(timeout=600) == 0, cluster.output()
    finally:
        cluster.kill_all()
    (xlsx,) = cluster.results()  # only the resumed master wrote one
    run = read_results(xlsx)
    assert list(run.curve["iter"]) == list(range(1, 13))  # every round exactly once
    log = "".join(p.read_text() for p in (tmp_path / "logs").glob("master_*.log"))
    assert "resumed from" in log
    acc = float(run.curve["acc"].iloc[-1])
    ref = simulate(small_config(total_workers=3, max_rounds=12, seed=5, eval_every=1000), write=False, progress=False)
    ref = ref.records[-1]
    assert not math.isnan(acc) and abs(acc - ref["acc"]) < 0.1, (acc, ref["acc"])


def test_restart_mid_round_with_all_workers_required(tmp_path, fmnist_available):
    """min_workers = all: a worker killed after it got a round's model and
    restarted must be able to fetch that round again, or the round would
    wait for it forever."""
    cluster = start_cluster(tmp_path, 2, {**MLP, "rounds": 40, "round_timeout_s": 2, "min_workers": 0})
    try:
        cluster.wait_status(lambda s: s["rounds_done"] >= 3, what="round 3")
        cluster.workers[0].kill()
        cluster.workers[0].wait()
        cluster.start_worker(0)
        assert cluster.wait(timeout=600) == 0, cluster.output()
    finally:
        cluster.kill_all()
    (xlsx,) = cluster.results()
    assert list(read_results(xlsx).curve["iter"]) == list(range(1, 41))


def test_stop_and_sigterm_end_a_round_that_cannot_close(tmp_path, fmnist_available):
    """Both workers required, one dies: the open round cannot close. POST /stop
    abandons it; the results of the finished rounds are written; the other
    worker exits. Then the same with SIGTERM instead of /stop."""
    for how in ("stop", "sigterm"):
        root = tmp_path / how
        root.mkdir()
        cluster = start_cluster(root, 2, {**MLP, "rounds": 5000, "round_timeout_s": 2, "min_workers": 0})
        try:
            cluster.wait_status(lambda s: s["rounds_done"] >= 2, what="round 2")
            cluster.workers[1].kill()
            cluster.workers[1].wait()
            time.sleep(3)
            if how == "stop":
                assert httpx.post(f"{cluster.url}/stop", timeout=10).status_code == 200
            else:
                cluster.master.send_signal(signal.SIGTERM)
            rc = cluster.master.wait(timeout=60)
            assert rc == {"stop": 4, "sigterm": 143}[how], cluster.output()  # says how the run ended
            assert cluster.workers[0].wait(timeout=120) == 4  # the worker: stopped by the operator
        finally:
            cluster.kill_all()
        (xlsx,) = cluster.results()
        done = len(read_results(xlsx).curve)
        assert 2 <= done < 5000


def test_straggler_never_blocks_a_round_and_joins_again(tmp_path, fmnist_available):
    """A worker frozen (SIGSTOP) for longer than round_timeout_s: the rounds go
    on without it (late offer or upload refused), and after SIGCONT it takes
    part again."""
    cluster = start_cluster(
        tmp_path, 3, {**MLP, "rounds": 60, "mode": "bin", "b_down": 8, "round_timeout_s": 2, "min_workers": 2}
    )
    try:
        cluster.wait_status(lambda s: s["rounds_done"] >= 3, what="round 3")
        cluster.workers[1].send_signal(signal.SIGSTOP)
        frozen_at = cluster.status()["rounds_done"]
        cluster.wait_status(lambda s: s["rounds_done"] >= frozen_at + 3, what="3 rounds without worker 1")
        cluster.workers[1].send_signal(signal.SIGCONT)
        assert cluster.wait(timeout=600) == 0, cluster.output()
        assert all(p.returncode == 0 for p in cluster.workers.values())
    finally:
        for p in cluster.workers.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
        cluster.kill_all()
    (xlsx,) = cluster.results()
    run = read_results(xlsx)
    assert list(run.curve["iter"]) == list(range(1, 61))
    w1 = list(run.binary["w1"])
    assert 0 in w1[frozen_at : frozen_at + 4]  # rounds closed without the frozen worker
    assert w1[-1] == 1  # ... and it uploads again at the end


# ---------------------------------------------------------------------------
# every wait has a bound and a documented outcome (README, "Faults")


def _master_log(root) -> str:
    return "".join(p.read_text() for p in (root / "logs").glob("master_*.log"))


def test_stalled_worker_with_all_required_ends_the_run_after_the_quorum_wait(tmp_path, fmnist_available):
    """min_workers 0 (all), one of 3 workers SIGSTOPped: it shows absent
    within worker_timeout_s; the round, short of the quorum past
    round_timeout_s, says every 15 s whom it waits for, and after
    quorum_timeout_s more the run ends with its results and exit 5 (before:
    the round stayed open for as long as the worker was stopped)."""
    timeouts = {"round_timeout_s": 4, "worker_timeout_s": 6, "quorum_timeout_s": 12}
    cluster = start_cluster(tmp_path, 3, {**MLP, "rounds": 100000, "min_workers": 0, **timeouts})
    try:
        cluster.wait_status(lambda s: s["rounds_done"] >= 2, what="round 2")
        cluster.workers[1].send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        st = cluster.wait_status(lambda s: s["workers"][1]["state"] == "absent", timeout=60, what="worker 1 absent")
        absent_after = time.monotonic() - t0
        assert absent_after < 6 + 20, absent_after  # worker_timeout_s, plus a status poll on a loaded machine
        assert st["waiting_for"] == [1] and st["phase"] == "offers" and st["live_workers"] == 2
        rc = cluster.master.wait(timeout=120)
        ended_after = time.monotonic() - t0
        assert rc == 5, cluster.output()
        assert ended_after < 4 + 12 + 30, ended_after  # round_timeout_s + quorum_timeout_s, plus the round open
        assert all(cluster.workers[m].wait(timeout=60) == 5 for m in (0, 2))  # told why, same status
    finally:
        cluster.workers[1].send_signal(signal.SIGCONT)
        cluster.kill_all()
    log = _master_log(tmp_path)
    assert "waiting for worker(s) [1] (1: " in log  # at round_timeout_s, whom it waits for
    assert "worker 1 absent: not heard from for " in log  # at worker_timeout_s
    assert "run ended (quorum_lost)" in log
    assert "flq master: run ended (quorum_lost): round" in cluster.output()
    (xlsx,) = cluster.results()
    run = read_results(xlsx)
    assert len(run.curve) >= 2 and run.config["run.end"] == "quorum_lost"
    from flq.checkpoint import find_resumable, load_checkpoint

    state, _ = load_checkpoint(find_resumable(str(tmp_path / "checkpoints"), "fashion_mnist", "bbit"))
    assert state["round"] == len(run.curve)  # a last checkpoint: --resume continues from this very round
    print(
        f"\n| stalled worker, all required | absent after {absent_after:.1f} s | exit 5 after "
        f"{ended_after:.1f} s | results kept: {len(run.curve)} rounds |"
    )


def test_workers_that_die_mid_round_show_absent_and_the_port_is_released(tmp_path, fmnist_available):
    """2 workers, both required: both killed inside a round. Before: shown
    uploading/offered for minutes, the port held until POST /stop."""
    timeouts = {"round_timeout_s": 5, "worker_timeout_s": 6, "quorum_timeout_s": 10}
    cluster = start_cluster(tmp_path, 2, {**MLP, "rounds": 100000, "min_workers": 2, **timeouts})
    try:
        cluster.wait_status(lambda s: s["rounds_done"] >= 2, what="round 2")
        for p in cluster.workers.values():
            p.kill()
        t0 = time.monotonic()
        cluster.wait_status(
            lambda s: [w["state"] for w in s["workers"]] == ["absent", "absent"], timeout=60, what="both absent"
        )
        absent_after = time.monotonic() - t0
        assert absent_after < 6 + 20
        assert cluster.master.wait(timeout=120) == 5, cluster.output()
        ended_after = time.monotonic() - t0
        assert ended_after < 5 + 10 + 30
        assert port_is_free(cluster.port)
    finally:
        cluster.kill_all()
    run = read_results(cluster.results()[0])
    assert len(run.curve) >= 2 and run.config["run.end"] == "quorum_lost"
    print(
        f"\n| both workers killed | absent after {absent_after:.1f} s | exit 5 after {ended_after:.1f} s, "
        f"port free | results kept: {len(run.curve)} rounds |"
    )


def test_worker_interrupted_tells_the_master_it_leaves(tmp_path, fmnist_available):
    """Ctrl-C on a worker: it tells the master it leaves and exits 130; the
    rounds go on at once without it (round_timeout_s is 60 s here), and it
    may come back (before: the master waited for it)."""
    cluster = start_cluster(tmp_path, 2, {**MLP, "rounds": 100000, "min_workers": 1, "round_timeout_s": 60})
    try:
        cluster.wait_status(
            # 3 offers seen by the master: the worker has had the answers of at least 2 (its third may be in flight)
            lambda s: len(s["workers"]) == 2 and all(w["rounds_offered"] >= 3 for w in s["workers"]),
            what="both workers in the rounds",
        )
        cluster.workers[1].send_signal(signal.SIGINT)
        time.sleep(0.01)
        cluster.workers[1].send_signal(signal.SIGINT)  # an impatient second Ctrl-C: still tells the master
        t0 = time.monotonic()
        assert cluster.workers[1].wait(timeout=30) == 130
        st = cluster.wait_status(lambda s: s["workers"][1]["state"] == "left", timeout=10, what="worker 1 left")
        left_after = time.monotonic() - t0
        done = st["rounds_done"]
        cluster.wait_status(lambda s: s["rounds_done"] >= done + 5, timeout=30, what="5 rounds without it")
        assert time.monotonic() - t0 < 45  # less than one round_timeout_s of 60 s
        cluster.start_worker(1, out_name="worker1-again.out")  # it may come back
        cluster.wait_status(
            lambda s: s["workers"][1]["state"] != "left" and s["workers"][1]["rounds_offered"] > 0, what="worker 1 back"
        )
        assert httpx.post(f"{cluster.url}/stop", timeout=10).status_code == 200
        assert cluster.master.wait(timeout=120) == 4
    finally:
        cluster.kill_all()
    assert "worker 1 left (its process is exiting)" in _master_log(tmp_path)
    assert "told the master it leaves" in cluster.output("worker1")
    done_line = next(x for x in cluster.output("worker1").splitlines() if "worker 1 done after" in x)
    assert int(done_line.split("done after ")[1].split()[0]) >= 2  # the rounds it took part in
    print(f"\n| worker Ctrl-C | shown left after {left_after:.1f} s | exit 130 | rounds go on |")


def test_full_checkpoint_disk_is_logged_and_training_goes_on(tmp_path, fmnist_available):
    """checkpoint_dir on a disk too small for one checkpoint, checkpoint_every
    1. Before: the round loop died silently, /status said "training" forever
    and neither /stop nor SIGTERM ended it."""
    with disk(tmp_path / "ckpt", kib=256) as d:  # an mlp checkpoint of 2 workers is ~1.4 MB
        cluster = start_cluster(
            tmp_path, 2, {**MLP, "rounds": 6, "checkpoint_every": 1, "checkpoint_dir": str(d.path)}, preexec=d.preexec
        )
        try:
            st = cluster.wait_status(lambda s: s["checkpoint_error"] != "", what="a checkpoint error")
            assert st["state"] == "training"
            assert cluster.wait(timeout=300) == 0, cluster.output()
        finally:
            cluster.kill_all()
        assert not [p for p in d.path.iterdir() if p.name.endswith(".tmp")]
    log = _master_log(tmp_path)
    assert "checkpoint at round 1 not written: " in log and "training goes on" in log
    assert "Traceback" not in log and "Traceback" not in cluster.output()
    assert list(read_results(cluster.results()[0]).curve["iter"]) == list(range(1, 7))


def test_full_results_disk_is_one_line_and_exit_6(tmp_path, fmnist_available):
    with disk(tmp_path / "res", kib=64) as d:  # the spreadsheet fits, the mlp model (~200 KB) does not
        cluster = start_cluster(
            tmp_path, 1, {**MLP, "rounds": 2, "checkpoint_every": 0, "results_dir": str(d.path)}, preexec=d.preexec
        )
        try:
            assert cluster.master.wait(timeout=300) == 6, cluster.output()
        finally:
            cluster.kill_all()
        names = sorted(p.name for p in d.path.iterdir())
        assert len(names) == 1 and names[0].endswith(".xlsx")
    out = cluster.output()
    assert "Traceback" not in out
    (line,) = [x for x in out.splitlines() if x.startswith("flq master: final model not written")]
    assert "(the spreadsheet was)" in line


def test_two_masters_sharing_a_checkpoint_dir_keep_their_own_checkpoints(tmp_path, fmnist_available):
    shared = tmp_path / "ckpt"
    clusters = []
    try:
        for name in ("a", "b"):
            root = tmp_path / name
            root.mkdir()
            clusters.append(
                start_cluster(root, 1, {**MLP, "rounds": 3, "checkpoint_every": 1, "checkpoint_dir": str(shared)})
            )
        assert [c.wait(timeout=300) for c in clusters] == [0, 0]
    finally:
        for c in clusters:
            c.kill_all()
    files = sorted(p.name for p in shared.glob("flq_master_fashion_mnist_bbit_*.npz"))
    assert len(files) == 2, files  # before: one shared file
    assert not list(shared.glob("*.lock")) and not list(shared.glob("*.tmp"))


def test_diverging_cluster_run_ends_diverged_everywhere(tmp_path, fmnist_available):
    """--lr 1e16 on the cluster: the workers report their non-finite loss (as
    JSON null), the master records round 2 and ends the run diverged, and
    the workers exit with its status (before the workers crashed on NaN in
    JSON and the master waited for a quorum that never came)."""
    cluster = start_cluster(tmp_path, 2, {**MLP, "rounds": 1000, "lr": 1e16})
    try:
        assert cluster.master.wait(timeout=180) == 3, cluster.output()
        assert [p.wait(timeout=60) for p in cluster.workers.values()] == [3, 3]
    finally:
        cluster.kill_all()
    assert "Traceback" not in cluster.output("worker0") + cluster.output()
    assert "run ended (diverged): round 2 diverged: worker(s) [0, 1] report a diverged local model" in cluster.output()
    run = read_results(cluster.results()[0])
    assert list(run.curve["iter"]) == [1, 2] and run.config["run.end"] == "diverged"


def test_a_paused_master_extends_its_timeouts_instead_of_losing_the_quorum(tmp_path, fmnist_available):
    """SIGSTOP on the master for longer than round_timeout_s + quorum_timeout_s:
    its workers were alive all along, so after SIGCONT training goes on
    (before: quorum_lost within a second of SIGCONT)."""
    cluster = start_cluster(
        tmp_path, 2, {**MLP, "rounds": 100000, "round_timeout_s": 2, "worker_timeout_s": 3, "quorum_timeout_s": 5}
    )
    try:
        cluster.wait_status(lambda s: s["rounds_done"] >= 3, what="round 3")
        cluster.master.send_signal(signal.SIGSTOP)
        time.sleep(9)  # > round_timeout_s + quorum_timeout_s
        cluster.master.send_signal(signal.SIGCONT)
        done = cluster.wait_status(lambda s: True, what="status")["rounds_done"]
        cluster.wait_status(lambda s: s["rounds_done"] >= done + 5, timeout=60, what="5 more rounds")
        assert cluster.master.poll() is None
        assert httpx.post(f"{cluster.url}/stop", timeout=10).status_code == 200
        assert cluster.master.wait(timeout=60) == 4
    finally:
        cluster.master.send_signal(signal.SIGCONT)
        cluster.kill_all()
    assert "the master did not run for " in _master_log(tmp_path)  # ~9 s, noticed and made up for


def test_repeated_signals_to_the_master_exit_cleanly(tmp_path, fmnist_available):
    """SIGINT three times in a row: the first stops, the second exits at once,
    the third is ignored; results written, no traceback, the workers told
    (before: uvicorn's forced exit, tracebacks, workers exiting 1 on a 500)."""
    cluster = start_cluster(tmp_path, 2, {**MLP, "rounds": 100000})
    try:
        cluster.wait_status(lambda s: s["rounds_done"] >= 3, what="round 3")
        for pause in (0.3, 0.1, 0.0):
            cluster.master.send_signal(signal.SIGINT)
            time.sleep(pause)
        assert cluster.master.wait(timeout=60) == 130
        assert [p.wait(timeout=60) for p in cluster.workers.values()] == [4, 4]
    finally:
        cluster.kill_all()
    out = cluster.output()
    assert "Traceback" not in out and "SIGINT again: exiting now" in out
    assert "Traceback" not in cluster.output("worker0") + cluster.output("worker1")
    run = read_results(cluster.results()[0])
    assert len(run.curve) >= 3 and run.config["run.end"] == "sigint"


def test_second_master_on_a_taken_port_is_refused_at_once(tmp_path, fmnist_available):
    cluster = start_cluster(tmp_path, 1, {**MLP, "rounds": 2}, start_workers=False)
    try:
        t0 = time.monotonic()
        out = subprocess.run(cluster.master_cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr  # before: exit 3 ("diverged") after its start-up
        assert (
            out.stderr.strip()
            .splitlines()[-1]
            .startswith(f"flq: config error: cannot listen on 127.0.0.1:{cluster.port}")
        )
        assert time.monotonic() - t0 < 60
    finally:
        cluster.kill_all()
