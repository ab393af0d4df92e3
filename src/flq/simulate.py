"""A simulation: the FLQ round of docs/algorithm.md, step by step, with the
master in this process and the workers in a pool (:mod:`flq.pool`): in this
process too, or in Ray actors (:mod:`flq.ray_backend`).

The simulator drives the same :class:`~flq.master.Master` and
:class:`~flq.worker.Worker` objects as the real cluster, passing the actual
encoded bytes between them, so a run here gives the same numbers as the
distributed run with the same config and seed.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from . import outcome
from .config import Config
from .evaluation import EvaluationFailed
from .logs import FILE_ONLY
from .master import Master
from .model import state_dict_from_flat
from .monitor import LocalRun, RunMonitor, ScalarLog
from .outputs import one_line
from .pool import open_pool
from .runtime import Runtime
from .summary import describe_buffers, log_round, round_timings, save_results
from .timing import Stopwatch, process_age_s

log = logging.getLogger(__name__)


@dataclass
class SimulationResult:
    """What a simulation returns.

    Attributes:
        records: one dict per round done (the spreadsheet's curve rows).
        selected: per round, the worker ids whose upload was aggregated.
        theta: the global model's parameters after the last round done, float32 (n,).
        buffers: its buffers (arrays in ``state_dict()`` order and dtypes).
        threads: PyTorch threads each worker computed with (with Ray, the actors' count).
        results_path: the spreadsheet written, or None.
        timings: the records' timing columns (:mod:`flq.summary`) summed
            over rounds: "master_quantize_s", "master_aggregate_s",
            "master_evaluate_s", "workers_compute_s", "workers_quantize_s",
            and with ``eval_overlap`` "master_evaluate_wait_s".
        startup_s: seconds from the call to the first round's start.
        reason: how the run ended (:mod:`flq.outcome`): ``completed``,
            ``sigint``, ``sigterm``, ``diverged`` or ``error``.
        detail: one line on why, when it did not complete.
        not_saved: one line on why the results (or the model) could not be
            written; '' when they were, or when ``write`` was False.
    """

    records: List[Dict[str, Any]]
    selected: List[List[int]]
    theta: np.ndarray
    results_path: Optional[Path]
    timings: Dict[str, float] = field(default_factory=dict)
    startup_s: float = 0.0
    reason: str = outcome.COMPLETED
    detail: str = ""
    not_saved: str = ""
    buffers: Tuple[np.ndarray, ...] = ()
    threads: int = 0

    def model_state(self, layout: Any) -> Dict[str, Any]:
        """The final global model as a state dict of ``layout``
        (:func:`flq.model.state_dict_from_flat`): every tensor in its own dtype and shape."""
        from .model import state_dict_from_flat

        return state_dict_from_flat(layout, self.theta, self.buffers)

    @property
    def exit_status(self) -> int:
        """The process exit status this run deserves (:mod:`flq.outcome`)."""
        return outcome.run_status(self.reason, self.not_saved)


def simulate(
    cfg: Config,
    write: bool = True,
    progress: bool = True,
    on_round: Optional[Callable[[Dict[str, Any]], None]] = None,
    runtime: Optional[Runtime] = None,
    on_model: Optional[Callable[[int, np.ndarray, Tuple[np.ndarray, ...]], None]] = None,
    monitor: Optional[RunMonitor] = None,
    backend: str = "local",
    ray_options: Optional[Dict[str, Any]] = None,
) -> SimulationResult:
    """Run ``cfg.max_rounds`` rounds of FLQ, the master in this process, the workers in ``backend``.

    However the round loop ends (all rounds done, SIGINT, SIGTERM, a
    diverging model, an error), the rounds done so far are kept: returned,
    and with ``write`` stored in a spreadsheet of its own in
    ``cfg.results_dir`` with the final model beside it. In the main thread,
    SIGINT and SIGTERM stop the run at once (the round in progress is not
    recorded).

    Args:
        cfg: the configuration.
        write: write the spreadsheet and the model at the end.
        progress: show progress: a bar on a terminal, otherwise a line every
            ``max_rounds / 20`` rounds (so a log file gets no ``\\r`` updates).
        on_round: called with each round's record.
        runtime: a prepared :class:`Runtime` (data, model, partitions).
        on_model: called after each round as ``on_model(rounds done,
            theta, buffers)`` with the global model (float32 (n,) and its
            buffers; read-only to the callee), e.g. to keep snapshots.
        monitor: a :class:`~flq.monitor.RunMonitor` whose source is a
            :class:`~flq.monitor.LocalRun`, for a dashboard to watch
            (``flq simulate --serve``): the loop reports its phases and worker
            states to it, and stops after the round in progress when it asks
            (reason ``stopped``). With ``tensorboard_dir`` set, the scalars
            are written as the rounds go (:class:`~flq.monitor.ScalarLog`).
        backend: where the workers live (:mod:`flq.pool`): ``local`` (this
            process, one after the other) or ``ray`` (a pool of Ray actors,
            :mod:`flq.ray_backend`; bit-identical to ``local`` at the same
            thread count).
        ray_options: for ``ray``: ``address``, ``actors``, ``threads``, ``timeout_s``.

    Raises:
        flq.datasets.DatasetNotFoundError: the dataset cannot be found or fetched.
        flq.config.ConfigError: settings that do not fit the data.
        flq.outcome.Interrupted: SIGINT/SIGTERM before the first round.
        TimeoutError: (``ray``) the actors did not answer a phase in ``timeout_s``;
            like any error in the loop, it ends the run with the rounds done kept.
    """
    t0 = time.perf_counter()
    say = _say if progress else _quiet
    scalars = ScalarLog.open(cfg, "simulate")  # a missing tensorboard package stops here, before any work
    if monitor is None:
        monitor = RunMonitor(cfg, LocalRun(cfg), "simulation")
    run: LocalRun = monitor.source
    with outcome.signals_interrupt():
        rt = runtime or Runtime(cfg)  # the model: a factory that fails is one line, and nothing else printed
        say(f"loading {cfg.dataset} for {cfg.total_workers} workers, model {cfg.model}, {cfg.links} ...")
        if scalars is not None:
            say(f"TensorBoard scalars: {scalars.path}")
            log.info("TensorBoard scalars: %s", scalars.path)
        ds = rt.data
        say(
            f"{len(ds.train_y)} training and {len(ds.test_y)} test samples from {ds.source}; "
            f"splitting them among {cfg.total_workers} workers ({describe_partition(cfg)})"
        )
        shares = rt.partitions
        say(
            f"building {cfg.total_workers} workers (shares of {min(map(len, shares))} to {max(map(len, shares))} "
            f"samples) around a model of {rt.model.n:,} parameters"
        )
        master_sw = Stopwatch()
        theta0, buffers0 = rt.initial_model()
        master = Master(
            cfg,
            rt.layout,
            theta0,
            evaluate=rt.evaluate,
            stopwatch=master_sw,
            overlap=cfg.eval_overlap,
            buffers0=buffers0,
        )
        pool = open_pool(cfg, rt, buffers0, backend, ray_options)
        if pool.backend == "ray":
            say(f"the workers live in {pool.describe()}")
        run.attach(master)
        startup = time.perf_counter() - t0
        age = process_age_s()
        log.info(
            "start: %s, %d workers, n=%d%s, mode %s, %d rounds, %d threads; start-up %.2f s%s",
            cfg.dataset,
            cfg.total_workers,
            rt.model.n,
            describe_buffers(cfg, rt.layout),
            cfg.links,
            cfg.max_rounds,
            pool.threads(),
            startup,
            f" ({age:.2f} s since the process started)" if age is not None else "",
        )
        every = f"; the test set is scored every {cfg.eval_every} round(s)" if cfg.eval_every else ""
        since = f", {age:.0f} s after the command started" if age is not None else ""
        say(f"round 1 of {cfg.max_rounds} starts{since} ({pool.threads()} thread(s){every})")
        bar = Progress(cfg.max_rounds) if progress else None
        totals: Dict[str, float] = {}
        done, theta_done, buffers_done = 0, master.theta.copy(), master.buffers  # the last complete round's model
        reason, detail = outcome.COMPLETED, ""
        try:
            while not master.finished:
                outcome.raise_if_interrupted()  # a signal whose exception a finalizer swallowed
                if run.stop_requested:  # the dashboard's Stop, answered between rounds like POST /stop
                    reason, detail = outcome.STOPPED, f"stopped by POST /stop (the dashboard) after {done} rounds"
                    log.warning("%s", detail, extra=FILE_ONLY)
                    break
                k = master.round
                run.begin_round()
                me_k = master.begin_round()  # step 1
                for offer in pool.offers(k, me_k, master.downlink, run.set_worker):  # steps 2-5
                    master.add_offer(offer)
                chosen = master.select()  # step 6
                run.set_phase("uploads")
                for m, payload in pool.uploads(k, chosen, run.set_worker):  # steps 7-8
                    master.receive_upload(m, payload)
                run.set_phase("closing")
                with outcome.critical():  # a signal waits until the round is recorded
                    try:
                        record = master.end_round()  # steps 9-10
                    finally:
                        done, theta_done, buffers_done = len(master.records), master.theta.copy(), master.buffers
                split = round_timings(master_sw, pool.timings())
                record.update(split)
                for name, sec in split.items():
                    totals[name] = totals.get(name, 0.0) + sec
                log_round(record)
                if bar is not None:
                    bar.update(record, last_accuracy(master.records))
                if on_round is not None:
                    on_round(record)
                if on_model is not None:
                    on_model(done, theta_done, buffers_done)
                run.end_round()
                if scalars is not None:
                    scalars.update(monitor)
        except outcome.Interrupted as exc:
            reason = exc.reason
            detail = f"{reason.upper()} after {done} rounds"
            log.warning("%s: stopping; writing the %d rounds done", reason.upper(), done, extra=FILE_ONLY)
        except outcome.Diverged as exc:
            reason, detail = outcome.DIVERGED, str(exc)
            log.error("%s; the run stops", exc, extra=FILE_ONLY)
        except Exception as exc:  # noqa: BLE001 - any failure in the loop keeps the rounds done
            reason, detail = outcome.ERROR, f"{type(exc).__name__}: {one_line(exc)}"
            log.exception("round %d failed; writing the %d rounds done", master.round + 1, done, extra=FILE_ONLY)
        finally:
            if bar is not None:
                bar.close()
            pool.close()  # Ray: the actors go (and a local Ray cluster started for the run)
        with outcome.signals_deferred():  # the evaluations still running in the background (eval_overlap)
            try:
                master.finish_evaluations()
            except EvaluationFailed as exc:
                if reason == outcome.COMPLETED:
                    reason, detail = outcome.ERROR, str(exc)
                log.error("%s", exc, extra=FILE_ONLY)
        if master.background is not None:  # evaluated in the background: timed there, into each record
            totals["master_evaluate_s"] = sum(r.get("master_evaluate_s", 0.0) for r in master.records[:done])
        if scalars is not None:
            scalars.close(monitor)
    records, selected = master.records[:done], master.selected_history[:done]
    path, not_saved = None, ""
    if write and records:
        with outcome.signals_deferred():
            state = state_dict_from_flat(rt.layout, theta_done, buffers_done)
            extra = {"backend": pool.backend}
            if (
                pool.backend != "local"
            ):  # the workers' own thread count (the spreadsheet's runtime.threads is this process's)
                extra["worker_threads"] = pool.threads()
            path, not_saved = save_results(
                cfg, reason, detail, records, selected, state, done, device=str(rt.device), **extra
            )
    run.finish(reason, detail or not_saved, str(path) if path is not None else "")
    return SimulationResult(
        records,
        selected,
        theta_done,
        path,
        totals,
        startup,
        reason,
        detail,
        not_saved,
        buffers=buffers_done,
        threads=pool.threads(),
    )


def _say(message: str) -> None:
    """One line of start-up progress on stderr (``progress`` on)."""
    print(message, file=sys.stderr, flush=True)


def _quiet(message: str) -> None:
    """``progress`` off: start-up steps go to the log only (it has them)."""


def describe_partition(cfg: Config) -> str:
    """``"non-IID, Dirichlet alpha 0.1"`` or ``"IID"``: how the training set is split."""
    return f"non-IID, Dirichlet alpha {cfg.dir_alpha:g}" if cfg.partition == "non_iid" else "IID"


def last_accuracy(records: List[Dict[str, Any]]) -> float:
    """The test accuracy of the last round evaluated so far (NaN when none)."""
    return next((r["acc"] for r in reversed(records) if r["acc"] == r["acc"]), float("nan"))


class Progress:
    """Progress of a run: a tqdm bar with the live test accuracy on a
    terminal; without one (output to a file), one line on stderr every
    ``max(1, total // 20)`` rounds and at the last."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.every = max(1, total // 20)
        self.t0 = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="round", dynamic_ncols=True)

    def update(self, record: Dict[str, Any], acc: float = float("nan")) -> None:
        """Count ``record``'s round; ``acc``: the last test accuracy known
        (with ``eval_overlap`` the round's own arrives later)."""
        if self.bar is not None:
            self.bar.update(1)
            if not np.isnan(acc):
                self.bar.set_postfix(acc=f"{acc:.4f}", sel=record["selcnt"])
            return
        k = record["iter"]
        if k % self.every == 0 or k == self.total:
            spent = time.perf_counter() - self.t0
            acc_text = f" acc {acc:.4f}" if not np.isnan(acc) else ""
            print(
                f"round {k}/{self.total}{acc_text} loss {record['loss']:.4f} selected {record['selcnt']} "
                f"({spent:.0f} s, {spent / k:.2f} s/round)",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
