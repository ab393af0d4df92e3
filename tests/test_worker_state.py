"""A worker's state survives a worker restart (:mod:`flq.worker_state`):
saved after every round, loaded at start when it is of the same run and
worker, refused in one log line otherwise."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from flq import worker_state
from flq.model import MLP, FlatModel
from flq.worker import Worker
from flq.worker_state import WorkerStateStore, ef_digest, identity, read_state, state_path

from conftest import small_config


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


@pytest.mark.parametrize("change, why", [
    ({"run": "run-2"}, "run 'run-1'"),
    ({"worker_id": 1}, "worker_id 0"),
    ({"n": 10}, "n "),
    ({"mode": "bin"}, "mode 'bbit'"),
    ({"b_up": 2}, "b_up 4"),
    ({"b_down": 32}, "b_down 8"),
    ({"seed": 1}, "seed 42"),
])
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


def _corrupt_middle(p):
    blob = bytearray(p.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    p.write_bytes(bytes(blob))


def _pickled(p):
    np.savez(p, meta=np.array([{"format": 1}], dtype=object), ef=np.zeros(3, np.float32))


@pytest.mark.parametrize("spoil", [
    _corrupt_middle,
    lambda p: p.write_bytes(p.read_bytes()[:1000]),  # truncated
    lambda p: p.write_bytes(b"not a state file"),
    lambda p: p.write_bytes(b""),
    _pickled,  # never unpickled
], ids=["flipped-byte", "truncated", "garbage", "empty", "pickled"])
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
