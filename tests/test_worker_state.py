"""A worker's state survives a worker restart (:mod:`flq.worker_state`):
saved after every round, loaded at start when it is of the same run and
worker, refused in one log line otherwise; and with real processes, a worker
SIGKILLed and restarted goes on with its residual and mirrors, no resync."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time

import numpy as np
import pytest
from cluster_util import start_cluster
from conftest import small_config

from flq import worker_state
from flq.model import MLP, FlatModel
from flq.protocol import round_index
from flq.worker import Worker
from flq.worker_state import WorkerStateStore, ef_digest, identity, mismatch, read_state, state_path


def _worker(m: int = 0, **overrides) -> Worker:
    cfg = small_config(model="mlp", total_workers=2, mode="bbit", **overrides)
    rng = np.random.default_rng(0)
    x = rng.random((256, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 256)
    return Worker(m, cfg, FlatModel(MLP()), x, y, np.arange(m * 128, (m + 1) * 128))


def _busy(w: Worker) -> Worker:
    """A worker whose state is all non-trivial: mirrors, residual, clock,
    versions, a generator and a batch order that have moved."""
    r = np.random.default_rng(7)
    n = w.model.n
    w.ref_up, w.ref_down = r.standard_normal(n).astype(np.float32), r.standard_normal(n).astype(np.float32)
    w.ef = (r.standard_normal(n) * 1e-3).astype(np.float32)
    w.e_hat, w.clock, w.up_version, w.down_version = 0.123456789, 3, 5, 7
    w.rng.random(11)
    for _ in range(5):
        w.batches.next_indices()
    return w


def _records(caplog):
    return [r for r in caplog.records if r.name == "flq.worker_state"]


def test_save_then_load_restores_the_worker_exactly(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="flq")
    a = _busy(_worker())
    ident = identity("run-1", 0, a.cfg, a.model.n)
    store = WorkerStateStore(str(tmp_path), 0)
    assert not store.restore(_worker(), ident, master_round=9)  # no file yet: one line, nothing loaded
    assert len(_records(caplog)) == 1 and "no saved state" in caplog.records[-1].getMessage()
    assert store.save(a, 8)
    path = state_path(str(tmp_path), 0)
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == ["batch_permutation", "ef", "meta", "ref_down", "ref_up"]
        assert z["ef"].dtype == np.float32 and z["ef"].shape == (a.model.n,)
        meta = json.loads(bytes(z["meta"]).decode())
    assert {k: meta[k] for k in worker_state.IDENTITY} == ident and meta["round"] == 8

    caplog.clear()
    b = _worker()
    assert WorkerStateStore(str(tmp_path), 0).restore(b, ident, master_round=8)
    for k in ("ref_up", "ref_down", "ef"):
        got, want = getattr(b, k), getattr(a, k)
        assert got.dtype == np.float32 and got.tobytes() == want.tobytes(), k
    assert (b.e_hat, b.clock, b.up_version, b.down_version) == (a.e_hat, a.clock, a.up_version, a.down_version)
    assert b.rng.bit_generator.state == a.rng.bit_generator.state
    assert b.batches.state_dict() == a.batches.state_dict()
    assert b.rng.random(5).tolist() == a.rng.random(5).tolist()  # the streams go on identically
    for _ in range(4):
        assert b.batches.next_indices().tolist() == a.batches.next_indices().tolist()
    (line,) = _records(caplog)
    assert f"ef sha256 {ef_digest(a.ef)}" in line.getMessage() and "round 9" in line.getMessage()


def test_a_state_saved_in_the_background_is_the_state_when_save_later_was_called(tmp_path, monkeypatch):
    a = _busy(_worker())
    ident = identity("run-1", 0, a.cfg, a.model.n)
    store = WorkerStateStore(str(tmp_path), 0)
    store.restore(_worker(), ident)
    started, release = threading.Event(), threading.Event()
    write = worker_state.save_state

    def slow_save(*args):
        started.set()
        assert release.wait(10)
        return write(*args)

    monkeypatch.setattr(worker_state, "save_state", slow_save)
    store.save_later(a, 3)
    assert started.wait(10)
    saved_ef = a.ef.copy()
    a.ef += 1.0  # the worker goes on while the file is written: the file holds the copy taken at the call
    a.clock = 9
    assert not state_path(str(tmp_path), 0).exists()
    release.set()
    store.flush()
    b = _worker()
    assert WorkerStateStore(str(tmp_path), 0).restore(b, ident, master_round=3)
    assert b.ef.tobytes() == saved_ef.tobytes() and b.clock == 3
    store.save_later(a, 4)  # and the next one replaces it, once flushed
    store.flush()
    c = _worker()
    assert WorkerStateStore(str(tmp_path), 0).restore(c, ident, master_round=4)
    assert c.ef.tobytes() == a.ef.tobytes() and c.clock == 9


@pytest.mark.parametrize(
    "change, why",
    [
        ({"run": "run-2"}, "run 'run-1'"),
        ({"worker_id": 1}, "worker_id 0"),
        ({"n": 10}, "n "),
        ({"mode": "bin"}, "mode 'bbit'"),
        ({"b_up": 2}, "b_up 4"),
        ({"b_down": 32}, "b_down 8"),
        ({"seed": 1}, "seed 42"),
    ],
)
def test_a_state_of_another_run_or_worker_is_not_loaded(tmp_path, caplog, change, why):
    caplog.set_level(logging.INFO, logger="flq")
    a = _busy(_worker())
    ident = identity("run-1", 0, a.cfg, a.model.n)
    store = WorkerStateStore(str(tmp_path), 0)
    store.ident = dict(ident)
    assert store.save(a, 2)
    caplog.clear()
    fresh = _worker()
    before = fresh.state_dict()
    assert not WorkerStateStore(str(tmp_path), 0).restore(fresh, {**ident, **change}, master_round=4)
    (line,) = _records(caplog)  # one line saying why
    assert why in line.getMessage() and "resynchronizing from the master" in line.getMessage()
    assert "\n" not in line.getMessage() and line.levelno == logging.WARNING
    assert fresh.ef.tobytes() == before["ef"].tobytes() and fresh.up_version == 0  # untouched


def test_without_a_run_id_the_state_is_neither_loaded_nor_kept(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="flq")
    a = _busy(_worker())
    ident = identity("run-1", 0, a.cfg, a.model.n)
    store = WorkerStateStore(str(tmp_path), 0)
    store.ident = dict(ident)
    assert store.save(a, 2)
    before = state_path(str(tmp_path), 0).read_bytes()
    caplog.clear()
    other = WorkerStateStore(str(tmp_path), 0)
    fresh = _worker()
    assert not other.restore(fresh, {**ident, "run": ""}, master_round=4)  # a master that gives no run id
    (line,) = _records(caplog)
    assert "the master gives no run id" in line.getMessage() and fresh.up_version == 0
    assert not other.save(fresh, 3) and state_path(str(tmp_path), 0).read_bytes() == before


def test_a_state_from_after_the_masters_round_is_not_loaded(tmp_path, caplog):
    """The master went back to an older checkpoint: its mirrors may have moved another way since."""
    caplog.set_level(logging.INFO, logger="flq")
    a = _busy(_worker())
    ident = identity("run-1", 0, a.cfg, a.model.n)
    store = WorkerStateStore(str(tmp_path), 0)
    store.ident = dict(ident)
    store.save(a, 6)
    assert WorkerStateStore(str(tmp_path), 0).restore(_worker(), ident, master_round=6)  # round 7 still open
    caplog.clear()
    assert not WorkerStateStore(str(tmp_path), 0).restore(_worker(), ident, master_round=5)
    (line,) = _records(caplog)
    assert "after the master's round 6" in line.getMessage()
    # the master's /config says round 6 (1-based); the worker compares with its index 5
    # /config says round 6 (1-based, the one in progress): a state of index 6 (round 7) is after it
    assert "after the master's round 6" in mismatch({"run": "r", "round": 6}, {"run": "r"}, round_index(6))
    assert mismatch({"run": "r", "round": 5}, {"run": "r"}, round_index(6)) == ""


def _corrupt_middle(p):
    blob = bytearray(p.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    p.write_bytes(bytes(blob))


def _pickled(p):
    np.savez(p, meta=np.array([{"format": 1}], dtype=object), ef=np.zeros(3, np.float32))


def _plain_npy(p):
    with open(p, "wb") as f:
        np.save(f, np.zeros(3))


def _with_meta(**changes):
    """Rewrite the state's metadata with ``changes`` (a valid archive with bad values)."""

    def spoil(p):
        with np.load(p, allow_pickle=False) as z:
            entries = {k: z[k] for k in z.files}
        meta = json.loads(bytes(entries["meta"]).decode())
        meta.update(changes)
        entries["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        with open(p, "wb") as f:
            np.savez(f, **entries)

    return spoil


@pytest.mark.parametrize(
    "spoil",
    [
        _corrupt_middle,
        lambda p: p.write_bytes(p.read_bytes()[:1000]),  # truncated
        lambda p: p.write_bytes(b"not a state file"),
        lambda p: p.write_bytes(b""),
        _pickled,  # never unpickled
        _plain_npy,  # an .npy, not an .npz archive
        _with_meta(round="x"),
        _with_meta(round=None),
        _with_meta(round=1e400),
        _with_meta(clock=1e300),
        _with_meta(up_version=-1),
        _with_meta(e_hat=float("nan")),
    ],
    ids=[
        "flipped-byte",
        "truncated",
        "garbage",
        "empty",
        "pickled",
        "plain-npy",
        "round-text",
        "round-null",
        "round-inf",
        "clock-huge",
        "version-negative",
        "e_hat-nan",
    ],
)
def test_an_unreadable_state_is_not_loaded(tmp_path, caplog, spoil):
    caplog.set_level(logging.INFO, logger="flq")
    a = _busy(_worker())
    ident = identity("run-1", 0, a.cfg, a.model.n)
    store = WorkerStateStore(str(tmp_path), 0)
    store.ident = dict(ident)
    store.save(a, 2)
    path = state_path(str(tmp_path), 0)
    spoil(path)
    with pytest.raises(worker_state.StateError):
        read_state(path)
    caplog.clear()
    fresh = _worker()
    assert not WorkerStateStore(str(tmp_path), 0).restore(fresh, ident, master_round=4)
    (line,) = _records(caplog)
    assert "not used" in line.getMessage() and "\n" not in line.getMessage()
    assert fresh.up_version == 0 and not fresh.ef.any()


def test_a_failed_save_keeps_the_previous_state_and_says_so_once(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="flq")
    a = _busy(_worker())
    store = WorkerStateStore(str(tmp_path), 0)
    store.ident = identity("run-1", 0, a.cfg, a.model.n)
    assert store.save(a, 1)
    path = state_path(str(tmp_path), 0)
    before = path.read_bytes()

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(worker_state.np, "savez", full)
    a.ef[:] = 1.0
    assert not store.save(a, 2) and not store.save(a, 3)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]
    errors = [r for r in _records(caplog) if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "No space left on device" in errors[0].getMessage()


def test_a_resumed_master_keeps_the_run_id_of_its_checkpoint(tmp_path):
    from flq.checkpoint import checkpoint_path, run_of

    ckpt = checkpoint_path(str(tmp_path), "fashion_mnist", "bbit", "20250101_120000_2")
    assert run_of(ckpt, "fashion_mnist", "bbit") == "20250101_120000_2"
    assert run_of(tmp_path / "renamed.npz", "fashion_mnist", "bbit") == "renamed"  # --resume FILE of another name


def test_worker_flags_keep_the_state_by_default_and_turn_it_off():
    from flq.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["worker", "--worker_id", "0"]).state_dir == "worker_state"
    assert parser.parse_args(["worker", "--worker_id", "0", "--state_dir", ""]).state_dir == ""
    assert parser.parse_args(["worker", "--worker_id", "0", "--no_state"]).no_state
    worker_help = next(
        a for a in parser._subparsers._group_actions[0].choices["worker"]._actions if a.dest == "state_dir"
    ).help
    assert "flq_worker_<id>.npz" in worker_help and "'' = do not keep it" in worker_help


# ---------------------------------------------------------------------------
# real processes


def _out(cluster, name: str) -> str:
    return (cluster.root / f"{name}.out").read_text(errors="replace")


def _before(text: str, marker: str) -> str:
    """``text`` up to the first line that holds ``marker`` (all of it when none does)."""
    at = text.find(marker)
    return text if at < 0 else text[:at]


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.slow
def test_a_killed_worker_restarts_with_its_saved_state_and_no_resync(tmp_path, fmnist_available):
    """bbit with 2-bit uploads (a large residual), exact downlinks (the
    mirror of the downlink never moves, so the master's versions of worker 1
    move only with its uploads), both workers required. Worker 0 is frozen
    so that the round cannot close while worker 1 waits for its selection:
    worker 1's state file is then final and the master's versions are those
    in it. Worker 1 is SIGKILLed there and restarted: it loads that very
    residual (the SHA-256 it logs), registers with the saved versions, and
    neither it nor the master resynchronizes; the run completes."""
    rounds = 10
    cluster = start_cluster(
        tmp_path,
        2,
        {
            "model": "mlp",
            "eval_every": 0,
            "rounds": rounds,
            "mode": "bbit",
            "b_up": 2,
            "b_down": 32,
            "min_workers": 0,
            "round_timeout_s": 4,
        },
        start_workers=False,
    )
    path = tmp_path / "worker_state" / "flq_worker_1.npz"  # the default --state_dir, under the worker's folder
    try:
        cluster.start_worker(0, "--no_state")
        cluster.start_worker(1)
        cluster.wait_status(lambda s: s["rounds_done"] >= 2, timeout=120, what="round 2")
        cluster.workers[0].send_signal(signal.SIGSTOP)
        st = cluster.wait_status(
            lambda s: s["phase"] == "offers" and s["waiting_for"] == [0] and s["workers"][1]["state"] == "offered",
            timeout=60,
            what="worker 1 waiting for a selection that waits for worker 0",
        )
        state, meta = read_state(path)
        assert meta["round"] == st["round"] - 2  # the round before the open one (status counts from 1)
        assert meta["up_version"] >= 1 and meta["down_version"] == 0  # it uploaded: versions a fresh worker lacks
        assert np.abs(state["ef"]).sum() > 0  # a residual a fresh worker does not have
        digest = ef_digest(state["ef"])
        cluster.workers[1].kill()
        cluster.workers[1].wait()
        assert read_state(path)[1] == meta  # what the restarted worker finds
        cluster.start_worker(1, out_name="worker1-again.out")
        _wait_for(lambda: "ef sha256" in _out(cluster, "worker1-again"), 60, "the restarted worker's state line")
        loaded = _out(cluster, "worker1-again")
        assert (
            f"state of round {meta['round'] + 1} loaded from worker_state/flq_worker_1.npz "
            f"(up v{meta['up_version']}, down v0, clock {meta['clock']}, ef sha256 {digest})" in loaded
        ), loaded
        cluster.workers[0].send_signal(signal.SIGCONT)
        assert cluster.wait(timeout=120) == 0, cluster.output()
        assert [p.returncode for p in cluster.workers.values()] == [0, 0]
    finally:
        for p in cluster.workers.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
        cluster.kill_all()
    assert "no saved state" in _out(cluster, "worker1")  # the first process started afresh
    # no resync at registration: none before a refused offer (an upload later than round_timeout_s on a
    # starved machine would make one, rightly, and has nothing to do with the restart)
    again = _out(cluster, "worker1-again")
    assert "resynchronized" not in _before(again, "refused"), again
    master_log = "".join(p.read_text() for p in (tmp_path / "logs").glob("master_*.log"))
    after_restart = master_log[master_log.index("worker 1 registered again") :]
    assert "worker 1 resynchronizes" not in _before(after_restart, "worker 1 mirror versions"), master_log
    assert [p.name for p in (tmp_path / "worker_state").iterdir()] == [path.name]  # none of --no_state's worker 0
    final = read_state(path)[1]  # the restarted worker went on saving, from the restored versions
    assert final["round"] == rounds - 1 and final["up_version"] >= meta["up_version"]
    (master_file,) = (tmp_path / "logs").glob("master_*.log")
    assert final["run"] == meta["run"] == master_file.stem[len("master_") :]  # the run id GET /config gives
