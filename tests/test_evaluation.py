"""Evaluation off the critical path (flq.evaluation, system.eval_overlap) and
in lower precision (system.eval_precision)."""

from __future__ import annotations

import platform
import sys
import threading
import time

import numpy as np
import pytest
import torch
from conftest import small_config

from flq.evaluation import BackgroundEvaluator, EvaluationFailed
from flq.model import FlatModel, autocast, build_model
from flq.simulate import simulate


class GatedEvaluator:
    """An evaluator that returns (sum of theta, round) once its gate opens."""

    def __init__(self) -> None:
        self.gate = threading.Semaphore(0)
        self.started = threading.Semaphore(0)
        self.calls = []

    def __call__(self, theta, buffers=()):
        self.started.release()
        assert self.gate.acquire(timeout=10)
        self.calls.append(float(theta[0]))
        if theta[0] < 0:
            raise RuntimeError("boom")
        return float(theta[0]), 2.0 * float(theta[0])


def test_background_evaluations_fill_their_records_in_order_and_the_queue_is_bounded():
    ev = GatedEvaluator()
    bg = BackgroundEvaluator(ev, depth=2)
    records = [{"iter": k + 1, "acc": float("nan"), "entropy": float("nan")} for k in range(3)]
    assert bg.submit(records[0], np.array([0.5], np.float32)) < 1.0
    assert ev.started.acquire(timeout=10)  # round 1's evaluation is running
    bg.submit(records[1], np.array([0.25], np.float32))  # waits in the queue: 2 pending, the bound
    assert bg.pending == 2
    third = threading.Thread(target=bg.submit, args=(records[2], np.array([0.125], np.float32)))
    third.start()
    third.join(0.3)
    assert third.is_alive(), "a third model must wait for a free slot"
    ev.gate.release()  # round 1 done: the third gets its slot
    third.join(10)
    assert not third.is_alive()
    assert records[0]["acc"] == 0.5 and records[0]["entropy"] == 1.0 and records[0]["master_evaluate_s"] >= 0
    ev.gate.release()
    ev.gate.release()
    bg.drain()
    assert bg.pending == 0
    assert [r["acc"] for r in records] == [0.5, 0.25, 0.125] and ev.calls == [0.5, 0.25, 0.125]


def test_a_failed_background_evaluation_ends_the_run_at_the_next_submit_or_drain():
    ev = GatedEvaluator()
    bg = BackgroundEvaluator(ev, depth=1)
    record = {"iter": 7, "acc": float("nan"), "entropy": float("nan")}
    bg.submit(record, np.array([-1.0], np.float32))
    ev.gate.release()
    with pytest.raises(EvaluationFailed, match="evaluation of round 7 failed: RuntimeError: boom"):
        bg.submit({"iter": 8, "acc": float("nan")}, np.array([1.0], np.float32))
    assert record["acc"] != record["acc"]  # stays NaN
    with pytest.raises(EvaluationFailed):
        bg.drain()
    assert bg.drain(raise_error=False) >= 0.0
    with pytest.raises(ValueError, match="depth"):
        BackgroundEvaluator(ev, depth=0)


def test_overlap_gives_the_same_records_and_finishes_before_the_results(tmp_path, fmnist_available):
    runs = {}
    for overlap in (False, True):
        cfg = small_config(
            model="mlp", max_rounds=4, eval_every=2, eval_overlap=overlap, results_dir=str(tmp_path / str(overlap))
        )
        res = simulate(cfg, write=True, progress=False)
        runs[overlap] = res
        assert res.results_path is not None
    plain, overlapped = runs[False], runs[True]
    assert np.array_equal(plain.theta, overlapped.theta)
    for a, b in zip(plain.records, overlapped.records):
        assert (a["acc"], a["entropy"]) == (b["acc"], b["entropy"]) or (a["acc"] != a["acc"] and b["acc"] != b["acc"])
    assert [r["iter"] for r in overlapped.records if r["acc"] == r["acc"]] == [2, 4]
    assert all(r["master_evaluate_s"] > 0 for r in overlapped.records if r["acc"] == r["acc"])
    from flq.results import read_results

    curve = read_results(overlapped.results_path).curve
    assert list(curve["acc"].round(6).dropna()) == [round(r["acc"], 6) for r in plain.records if r["acc"] == r["acc"]]


def test_eval_precision_choices_and_refusals():
    model = FlatModel(build_model("mlp"))
    torch.manual_seed(0)
    x = torch.rand(50, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.arange(50) % 10
    acc32, ce32 = model.evaluate(x, y, 16, "fp32")
    acc16, ce16 = model.evaluate(x, y, 16, "bf16")
    assert abs(ce16 - ce32) < 0.02 and abs(acc16 - acc32) <= 0.04
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        autocast(torch.device("cpu"), "fp16")
    with pytest.raises(ValueError, match="unknown eval_precision"):
        autocast(torch.device("cpu"), "int8")


def test_fp16_evaluation_without_cuda_is_a_config_error_before_any_work(tmp_path):
    from flq.config import ConfigError
    from flq.runtime import Runtime

    with pytest.raises(ConfigError, match="system.eval_precision': fp16 needs CUDA"):
        Runtime(small_config(eval_precision="fp16", device="cpu"))
    Runtime(small_config(eval_precision="fp16", device="cpu"), evaluates=False)  # a worker does not evaluate
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="eval_precision"):
        small_config(eval_precision="fp8")
    assert time.perf_counter() - t0 < 5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_kept_for_the_next_batch_on_glibc():
    """Without it, every activation over 128 KiB was a fresh mmap the kernel
    zeroed: evaluation 10-13 s instead of 7.2 s (benchmarks/eval_precision.py)."""
    from flq.runtime import keep_freed_memory

    assert keep_freed_memory() is (platform.libc_ver()[0] == "glibc")
