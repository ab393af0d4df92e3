"""Faults with real processes on loopback: a worker killed and restarted, a
master killed and resumed from its checkpoint."""
from __future__ import annotations

import math
import signal
import time

import httpx

from flq.results import read_results
from flq.simulate import simulate

from cluster_util import start_cluster
from conftest import small_config


def test_worker_killed_then_rejoins(tmp_path, fmnist_available):
    # bin under 17e6 bits: every candidate uploads, so the bin_ sheet shows who took part
    cluster = start_cluster(tmp_path, 4, {"rounds": 80, "mode": "bin", "b_down": 8, "round_timeout_s": 3,
                                          "min_workers": 3, "eval_every": 1000})
    try:
        cluster.wait_status(lambda s: s["rounds_done"] >= 3, what="round 3")
        cluster.workers[2].kill()
        cluster.workers[2].wait()
        st = cluster.wait_status(lambda s: s["rounds_done"] >= 6 and s["workers"][2]["state"] == "absent",
                                 what="worker 2 absent and round 6")
        assert st["state"] == "training"
        assert [w["state"] == "absent" for w in st["workers"]] == [False, False, True, False]
        killed_at = st["rounds_done"]
        cluster.start_worker(2)
        assert cluster.wait(timeout=600) == 0, cluster.output()
    finally:
        cluster.kill_all()
    (xlsx,) = cluster.results()
    run = read_results(xlsx)
    assert list(run.curve["iter"]) == list(range(1, 81))
    w2 = list(run.binary["w2"])
    assert w2[:3] == [1, 1, 1]
    assert w2[killed_at - 1] == 0  # absent after the kill
    assert w2[-1] == 1 and sum(w2[killed_at:]) >= 3  # selected again after rejoining
    # the others took part throughout (a round or two may be lost to a slow start: a straggler)
    assert all(run.binary[f"w{m}"].sum() >= 77 for m in (0, 1, 3))
    text = (tmp_path / "logs").glob("master_*.log")
    log = next(text).read_text()
    assert "worker 2 absent" in log and "worker 2 registered again" in log and "resynchronizes" in log


def test_master_killed_then_resumes_from_checkpoint(tmp_path, fmnist_available):
    settings = {"rounds": 12, "checkpoint_every": 2, "checkpoint_dir": str(tmp_path / "ckpt"),
                "eval_every": 1000, "round_timeout_s": 10, "seed": 5}
    cluster = start_cluster(tmp_path, 3, settings)
    try:
        cluster.wait_status(lambda s: s["rounds_done"] >= 5, what="round 5")
        cluster.master.kill()
        cluster.master.wait()
        assert (tmp_path / "ckpt" / "flq_master_fashion_mnist_bbit.npz").is_file()
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
    ref = simulate(small_config(total_workers=3, max_rounds=12, seed=5), write=False, progress=False).records[-1]
    assert not math.isnan(acc) and abs(acc - ref["acc"]) < 0.1, (acc, ref["acc"])


def test_restart_mid_round_with_all_workers_required(tmp_path, fmnist_available):
    """min_workers = all: a worker killed after it got a round's model and
    restarted must be able to fetch that round again, or the round would
    wait for it forever."""
    cluster = start_cluster(tmp_path, 2, {"rounds": 40, "round_timeout_s": 2, "min_workers": 0,
                                          "eval_every": 1000})
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
        cluster = start_cluster(root, 2, {"rounds": 500, "round_timeout_s": 2, "min_workers": 0,
                                          "eval_every": 1000})
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
            assert rc == 0, cluster.output()
            assert cluster.workers[0].wait(timeout=120) == 0
        finally:
            cluster.kill_all()
        (xlsx,) = cluster.results()
        done = len(read_results(xlsx).curve)
        assert 2 <= done < 500


def test_straggler_never_blocks_a_round_and_joins_again(tmp_path, fmnist_available):
    """A worker frozen (SIGSTOP) for longer than round_timeout_s: the rounds go
    on without it (late offer or upload refused), and after SIGCONT it takes
    part again."""
    cluster = start_cluster(tmp_path, 3, {"rounds": 60, "mode": "bin", "b_down": 8, "round_timeout_s": 2,
                                          "min_workers": 2, "eval_every": 1000})
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
    assert 0 in w1[frozen_at:frozen_at + 4]  # rounds closed without the frozen worker
    assert w1[-1] == 1  # ... and it uploads again at the end
