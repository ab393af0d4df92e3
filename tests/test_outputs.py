"""Output files: unique names, atomic writes, temporaries of killed writers
removed, checkpoint locks, and one line when a disk is full."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from disk_util import tiny_disk

from flq.checkpoint import CheckpointError, find_resumable, lock_checkpoint
from flq.outputs import (
    FileLock,
    atomic_write,
    claim_unique,
    publish_unique,
    remove_stale_temporaries,
    save_run,
    temporary_for,
)


def test_claim_unique_gives_each_caller_its_own_file(tmp_path):
    target = tmp_path / "sub" / "run_20261130_120000.log"
    got = [claim_unique(target) for _ in range(3)]
    assert [p.name for p in got] == [
        "run_20261130_120000.log",
        "run_20261130_120000_2.log",
        "run_20261130_120000_3.log",
    ]
    assert all(p.is_file() and p.stat().st_size == 0 for p in got)


def test_claim_unique_across_processes_started_together(tmp_path):
    code = (
        "import sys; from pathlib import Path; from flq.outputs import claim_unique; "
        "print(claim_unique(Path(sys.argv[1])).name)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "r.xlsx")], stdout=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    names = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(names) == sorted(["r.xlsx"] + [f"r_{n}.xlsx" for n in range(2, 7)])


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"old")

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]  # no temporary left
    atomic_write(path, lambda tmp: tmp.write_bytes(b"new"))
    assert path.read_bytes() == b"new" and oct(path.stat().st_mode & 0o777) == "0o644"


def test_temporaries_of_a_killed_writer_are_removed_at_the_next_start(tmp_path):
    """A writer SIGKILLed in the middle of atomic_write leaves .NAME.<pid>.tmp;
    remove_stale_temporaries deletes it (and leaves a live writer's alone)."""
    code = (
        "import sys, time; from pathlib import Path; from flq.outputs import atomic_write\n"
        "def slow(tmp):\n    tmp.write_bytes(b'x' * 1000); print('writing', flush=True); time.sleep(60)\n"
        "atomic_write(Path(sys.argv[1]), slow)"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "ckpt.npz")], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    (left,) = [q for q in tmp_path.iterdir() if q.name.endswith(".tmp")]
    assert left.name == f".ckpt.npz.{p.pid}.tmp"
    mine = temporary_for(tmp_path / "other.npz")  # this process is alive: its temporary stays
    mine.write_bytes(b"y")
    assert remove_stale_temporaries(tmp_path) == [left]
    assert sorted(q.name for q in tmp_path.iterdir()) == [mine.name]


def test_publish_unique_never_shows_a_partial_or_empty_file(tmp_path):
    """A spreadsheet is published under its name complete or not at all: a
    writer SIGKILLed mid-write leaves only its temporary (removed at the next
    start), never an empty placeholder under the final name."""
    target = tmp_path / "flq_results_x.xlsx"
    first = publish_unique(target, lambda tmp: tmp.write_bytes(b"one"))
    second = publish_unique(target, lambda tmp: tmp.write_bytes(b"two"))
    assert (first.name, second.name) == ("flq_results_x.xlsx", "flq_results_x_2.xlsx")
    assert first.read_bytes() == b"one" and second.read_bytes() == b"two"
    code = (
        "import sys, time; from pathlib import Path; from flq.outputs import publish_unique\n"
        "def slow(tmp):\n    tmp.write_bytes(b'x'); print('writing', flush=True); time.sleep(60)\n"
        "publish_unique(Path(sys.argv[1]), slow)"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "other.xlsx")], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "other.xlsx").exists()
    remove_stale_temporaries(tmp_path)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["flq_results_x.xlsx", "flq_results_x_2.xlsx"]


def test_checkpoint_lock_keeps_resume_off_a_running_masters_file(tmp_path):
    a = tmp_path / "flq_master_fashion_mnist_bbit_20261130_120000.npz"
    b = tmp_path / "flq_master_fashion_mnist_bbit_20261130_120500.npz"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    os.utime(a, (time.time() - 100, time.time() - 100))
    assert find_resumable(str(tmp_path), "fashion_mnist", "bbit") == b  # the newest
    code = (
        "import sys, time; from flq.checkpoint import lock_checkpoint; lock_checkpoint(sys.argv[1]); "
        "print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(b)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert find_resumable(str(tmp_path), "fashion_mnist", "bbit") == a  # b is in use
        with pytest.raises(CheckpointError, match="in use by another running master"):
            lock_checkpoint(b)
        with pytest.raises(CheckpointError, match="in use"):
            find_resumable(str(tmp_path), "fashion_mnist", "bbit", explicit=str(b))
    finally:
        holder.kill()
        holder.wait()
    lock = lock_checkpoint(b)  # free again once its holder died
    assert FileLock.held(b.with_name(b.name + ".lock"))
    lock.release()
    assert not b.with_name(b.name + ".lock").exists()
    with pytest.raises(CheckpointError, match="no checkpoint of fashion_mnist/bin"):
        find_resumable(str(tmp_path), "fashion_mnist", "bin")


def test_save_run_on_a_full_disk_says_so_in_one_line_and_leaves_nothing_partial(tmp_path):
    records = [
        {
            "iter": 1,
            "loss": 1.0,
            "acc": 0.5,
            "entropy": 1.2,
            "selcnt": 1,
            "bits_up_cum": 8,
            "bits_down_cum": 8,
            "cum_bits_total": 16,
            "wire_bytes_up": 1,
            "wire_bytes_down": 1,
            "wire_bytes_up_cum": 1,
            "wire_bytes_down_cum": 1,
            "round_time_s": 0.1,
        }
    ]
    from flq.model import build_model, layout_of, state_dict_from_flat

    layout = layout_of(build_model("cnn"))
    state = state_dict_from_flat(layout, np.zeros(layout.n, np.float32))
    with tiny_disk(tmp_path / "disk", kib=64) as folder:  # the spreadsheet fits, the 1.9 MB model does not
        path, problem = save_run(folder / "flq_results_x.xlsx", "bbit", records, {"system": {}}, [[0]], 1, state, 1)
        assert path is not None and path.is_file()
        assert problem.startswith("final model not written beside flq_results_x.xlsx: ")
        assert "\n" not in problem and ("No space left" in problem or "too large" in problem)
        assert sorted(q.name for q in folder.iterdir()) == ["flq_results_x.xlsx"]
    with tiny_disk(tmp_path / "disk2", kib=4) as folder:  # not even the spreadsheet
        path, problem = save_run(folder / "r.xlsx", "bbit", records, {"system": {}}, [[0]], 1, state, 1)
        assert path is None and problem.startswith("results not written to ")
        assert list(folder.iterdir()) == []


def test_archive_round_trip_and_refusals(tmp_path):
    """write_archive/read_archive: the arrays and the JSON meta come back
    exactly; a plain .npy and a pickled archive are refused, never loaded."""

    from flq.outputs import read_archive, write_archive

    arrays = {"a": np.arange(5, dtype=np.float32), "b": np.array([3, -1], np.int64)}
    path = write_archive(tmp_path / "x.npz", arrays, {"format": 1, "n": 5})
    meta, back = read_archive(path)
    assert meta == {"format": 1, "n": 5} and back.keys() == arrays.keys()
    assert all(back[k].dtype == arrays[k].dtype and np.array_equal(back[k], arrays[k]) for k in arrays)
    with open(tmp_path / "plain.npz", "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(ValueError, match="not an .npz archive"):
        read_archive(tmp_path / "plain.npz")
    np.savez(tmp_path / "pickled.npz", meta=np.array([{"format": 1}], dtype=object))
    with pytest.raises(ValueError):
        read_archive(tmp_path / "pickled.npz")
