"""Watching a run: the dashboard's document, the Prometheus metrics and the
TensorBoard scalars, all read from one place.

A run is watched through its *source*: the networked run's
:class:`~flq.cluster.ClusterMaster`, or a simulation's :class:`LocalRun`.
Both have ``master`` (the :class:`~flq.master.Master`, None while starting)
and ``status()`` (the ``GET /status`` document: state, phase, round,
workers). :class:`RunMonitor` adds what the master's records hold (curves,
per-worker tallies, the budget use of recent rounds) and keeps them
incrementally, so each read costs what changed since the last one, not the
run's length. Nothing here runs on the round's path: everything is pulled
when a dashboard, a Prometheus scrape or the TensorBoard writer asks.

The HTTP layer (:mod:`flq.transport.dashboard`) serves these documents
without knowing what they mean.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from .config import Config

#: Most rounds (and evaluations) one answer carries: a long run's history comes in a few answers, each
#: of bounded cost (the page asks again at once while it is short of ``rounds_total``).
MAX_ROWS = 500
#: Rounds shown in the dashboard's budget table.
BUDGET_ROUNDS = 12
#: Buckets of the round-duration histogram, seconds.
ROUND_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: Worker states counted by ``flq_workers`` (each present, 0 when none): the cluster's and the simulator's.
WORKER_STATES = (
    "registered",
    "training",
    "offered",
    "uploading",
    "uploaded",
    "skipped",
    "idle",
    "late",
    "absent",
    "left",
)


def _finite(x: Any) -> Optional[float]:
    """JSON has no NaN: None for a value not (yet) known."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


class LocalRun:
    """A simulation's run as the dashboard sees it: the same ``status()``
    keys as :meth:`flq.cluster.ClusterMaster.status` (state, phase, round,
    workers ...), set by :func:`flq.simulate.simulate` as its round loop goes.

    Workers are in this process (address ``in-process``) and their states
    are ``training`` (computing its offer), ``offered``, ``uploading``,
    ``uploaded``, ``skipped`` (not selected) and ``idle``. ``request_stop`` (the
    dashboard's Stop) ends the run after the round in progress, like
    ``POST /stop`` on a master (reason ``stopped``)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.master: Any = None
        self.state = "starting"
        self.phase = "idle"
        self.round_opened_at = 0.0
        self.stop_requested = False
        self.finish_reason = ""
        self.finish_detail = ""
        self.results = ""
        self.worker_state: List[str] = ["starting"] * cfg.total_workers

    def attach(self, master: Any) -> None:
        """The run's master is built: rounds start."""
        self.master = master
        self.state = "training"
        self.worker_state = ["idle"] * self.cfg.total_workers

    def begin_round(self) -> None:
        self.phase, self.round_opened_at = "offers", time.monotonic()

    def set_phase(self, phase: str) -> None:
        self.phase = phase

    def set_worker(self, worker_id: int, state: str) -> None:
        self.worker_state[worker_id] = state

    def end_round(self) -> None:
        self.phase = "idle"
        self.worker_state = ["idle"] * self.cfg.total_workers

    def request_stop(self, reason: str = "stopped") -> None:
        self.stop_requested = True

    def finish(self, reason: str, detail: str = "", results: str = "") -> None:
        self.state, self.phase = "finished", "idle"
        self.finish_reason, self.finish_detail, self.results = reason, detail, results
        self.worker_state = ["idle"] * self.cfg.total_workers

    def status(self) -> Dict[str, Any]:
        """The simulation's ``GET /status``: the keys of the cluster's that apply."""
        m, cfg = self.master, self.cfg
        records = m.records if m is not None else []
        done = len(records)
        in_round = self.phase != "idle"
        return {
            "state": self.state,
            "phase": self.phase,
            "round": min(done + (1 if self.state != "finished" else 0), cfg.max_rounds) or 1,
            "rounds_done": done,
            "round_open_s": round(time.monotonic() - self.round_opened_at, 3) if in_round else None,
            "live_workers": cfg.total_workers if m is not None and self.state != "finished" else 0,
            "max_rounds": cfg.max_rounds,
            "mode": cfg.mode,
            "total_workers": cfg.total_workers,
            "workers": [
                {
                    "worker_id": w,
                    "state": state,
                    "seconds_since_seen": None,  # in this process: never unheard
                    "rounds_offered": done + (state in ("offered", "uploading", "uploaded", "skipped")),
                    "address": "in-process",
                    "progress": None,
                }
                for w, state in enumerate(self.worker_state)
            ],
            "bits": {
                "up_cum": m.bits_up_cum if m is not None else 0,
                "down_cum": m.bits_down_cum if m is not None else 0,
            },
            "stop_requested": self.stop_requested,
            "finish_reason": self.finish_reason,
            "finish_detail": self.finish_detail,
        }


class RunMonitor:
    """The dashboard's document and the metrics of one run, read from its
    ``source`` (a :class:`~flq.cluster.ClusterMaster` or a :class:`LocalRun`).

    Args:
        cfg: the run's configuration.
        source: has ``master`` and ``status()``.
        kind: ``"cluster"`` or ``"simulation"`` (shown on the page).

    Thread-safe: the HTTP server, a Prometheus scrape and the TensorBoard
    writer may read at once while the round loop runs.
    """

    def __init__(self, cfg: Config, source: Any, kind: str) -> None:
        self.cfg, self.source, self.kind = cfg, source, kind
        self.results = ""  # the spreadsheet, once written
        self._lock = threading.Lock()
        M = cfg.total_workers
        self._tallied = 0  # rounds counted into the per-worker tallies
        self.selected = [0] * M
        self.uploaded = [0] * M
        self.bits_up = [0] * M  # uplink bits each worker's aggregated uploads were charged
        self._scanned = 0  # records whose evaluation is settled (done, not due, or never coming)
        #: ``{iter, acc, entropy, bits_up_cum, cum_bits_total}`` of every round evaluated, in round order
        self.evaluations: List[Dict[str, Any]] = []
        self._durations = 0  # records counted into the round-duration histogram
        self._buckets = [0] * (len(ROUND_BUCKETS) + 1)
        self._duration_sum = 0.0
        self.started = time.time()

    # ----- incremental bookkeeping ------------------------------------------
    def _due(self, it: int) -> bool:
        every = self.cfg.eval_every
        return every > 0 and (it % every == 0 or it == self.cfg.max_rounds)

    def refresh(self) -> None:
        """Fold the rounds recorded since the last call into the tallies,
        the evaluations list and the duration histogram."""
        m = self.source.master
        if m is None:
            return
        with self._lock:
            done = min(len(m.selected_history), len(m.selection_history), len(m.records))
            while self._tallied < done:
                k = self._tallied
                costs = {w: c for w, c in m.selection_history[k]["selected"]}
                for w in costs:
                    self.selected[w] += 1
                for w in m.selected_history[k]:
                    self.uploaded[w] += 1
                    self.bits_up[w] += costs.get(w, 0)
                self._tallied += 1
            records = m.records
            # a due round without its accuracy is settled only once no evaluation can fill it in
            settled = getattr(self.source, "state", "") == "finished" and (
                m.background is None or m.background.pending == 0
            )
            while self._scanned < len(records):
                r = records[self._scanned]
                acc = r["acc"]
                if acc == acc:  # evaluated (NaN != NaN)
                    self.evaluations.append(
                        {
                            "iter": r["iter"],
                            "acc": _finite(acc),
                            "entropy": _finite(r["entropy"]),
                            "bits_up_cum": r["bits_up_cum"],
                            "cum_bits_total": r["cum_bits_total"],
                        }
                    )
                elif self._due(r["iter"]) and not settled:
                    break  # its evaluation is still running (eval_overlap): the next read sees it
                self._scanned += 1
            while self._durations < len(records):
                t = float(records[self._durations].get("round_time_s", 0.0))
                i = next((j for j, b in enumerate(ROUND_BUCKETS) if t <= b), len(ROUND_BUCKETS))
                self._buckets[i] += 1
                self._duration_sum += t
                self._durations += 1

    # ----- the dashboard ----------------------------------------------------
    def document(self, rounds_since: int = 0, evals_since: int = 0, config: bool = True) -> Dict[str, Any]:
        """The dashboard's state: ``GET /dashboard/state``.

        Args:
            rounds_since: rounds the page already has (their rows are left
                out; at most :data:`MAX_ROWS` follow).
            evals_since: evaluations the page already has (likewise).
            config: include the run's configuration (a page asks once).

        Returns:
            A JSON-able dict: ``run`` (what runs), ``status`` (the source's
            ``status()``: state, phase, round ...), ``workers`` (one row per
            worker with its tallies and mirror versions), ``rounds`` (per
            round after ``rounds_since``: iter, loss, selcnt, cumulative bits,
            round_time_s), ``rounds_total``, ``evaluations`` (after
            ``evals_since``) and ``evaluations_total``, ``budget`` (the last
            rounds' selection: candidates, who was selected at what cost in
            bits, what was spent), ``config`` (secrets masked; None unless
            asked), ``results`` (the spreadsheet, once written).
        """
        self.refresh()
        status = self.source.status()
        m = self.source.master
        records = list(m.records) if m is not None else []
        rounds_since = max(0, min(rounds_since, len(records)))
        with self._lock:
            evals = self.evaluations[max(0, evals_since) : max(0, evals_since) + MAX_ROWS]
            evals_total = len(self.evaluations)
            workers = []
            for w in status.get("workers", []):
                i = w["worker_id"]
                row = {
                    "worker_id": i,
                    "address": w.get("address", ""),
                    "state": w.get("state", ""),
                    "seconds_since_seen": w.get("seconds_since_seen"),
                    "rounds_offered": w.get("rounds_offered", 0),
                    "rounds_selected": self.selected[i],
                    "rounds_uploaded": self.uploaded[i],
                    "bits_up": self.bits_up[i],
                    "up_version": int(m.up_version[i]) if m is not None else 0,
                    "down_version": int(m.down_version[i]) if m is not None else 0,
                    "device": w.get("device", ""),
                    "progress": w.get("progress"),
                }
                workers.append(row)
        budget = []
        if m is not None:
            done = min(len(m.selection_history), len(m.selected_history), len(records))
            for k in range(max(0, done - BUDGET_ROUNDS), done):
                chosen = m.selection_history[k]["selected"]
                arrived = set(m.selected_history[k])
                budget.append(
                    {
                        "iter": k + 1,
                        "offers": records[k].get("offers", 0),
                        "candidates": m.selection_history[k]["candidates"],
                        "selected": [{"worker": w, "bits": c, "uploaded": w in arrived} for w, c in chosen],
                        "spent_bits": sum(c for w, c in chosen if w in arrived),
                    }
                )
            budget.reverse()  # newest first
        cfg = self.cfg
        return {
            "run": {
                "kind": self.kind,
                "dataset": cfg.dataset,
                "model": cfg.model,
                "mode": cfg.mode,
                "links": cfg.links,
                "total_workers": cfg.total_workers,
                "max_rounds": cfg.max_rounds,
                "up_budget_bits": cfg.up_budget_bits,
                "sel_clients": cfg.sel_clients,
                "eval_every": cfg.eval_every,
                "started": self.started,
            },
            "status": _clean(status),
            "workers": workers,
            "rounds": [_round_row(r) for r in records[rounds_since : rounds_since + MAX_ROWS]],
            "rounds_total": len(records),
            "evaluations": evals,
            "evaluations_total": evals_total,
            "budget": budget,
            "config": cfg.public_sections() if config else None,
            "results": self.results or getattr(self.source, "results", "") or "",
        }

    # ----- Prometheus -------------------------------------------------------
    def collect(self) -> Iterator[Any]:
        """The run's metrics for the Prometheus client (a custom collector:
        read at scrape time, so the rounds pay nothing). Counters are the
        master's cumulative counts, equal to the spreadsheet's columns."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        self.refresh()
        m = self.source.master
        status = self.source.status()
        records = m.records if m is not None else []
        last = records[-1] if records else None

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield counter("flq_rounds", "Rounds done (the spreadsheet's rows)", len(records))
        yield counter(
            "flq_uplink_bits",
            "Uplink bits charged to aggregated uploads (spreadsheet bits_up_cum)",
            m.bits_up_cum if m else 0,
        )
        yield counter(
            "flq_downlink_bits",
            "Downlink bits of the models sent (spreadsheet bits_down_cum)",
            m.bits_down_cum if m else 0,
        )
        wire = CounterMetricFamily(
            "flq_wire_bytes", "Round-protocol bytes on the wire (spreadsheet wire_bytes_*_cum)", labels=["direction"]
        )
        wire.add_metric(["up"], m.wire_up_cum if m else 0)
        wire.add_metric(["down"], m.wire_down_cum if m else 0)
        yield wire
        yield counter(
            "flq_selected_workers",
            "Uploads aggregated, summed over rounds (spreadsheet selcnt)",
            sum(r["selcnt"] for r in records),
        )
        with self._lock:
            buckets, total = list(self._buckets), self._duration_sum
            evals = self.evaluations[-1] if self.evaluations else None
        cum, rows = 0, []
        for bound, n in zip([*map(str, ROUND_BUCKETS), "+Inf"], buckets):
            cum += n
            rows.append((bound, cum))
        yield HistogramMetricFamily(
            "flq_round_duration_seconds", "Wall time of each round, seconds", buckets=rows, sum_value=total
        )

        def gauge(name: str, doc: str, value: Optional[float]) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=float("nan") if value is None else value)

        yield gauge("flq_round", "The round in progress (1-based; the last once the run is over)", status["round"])
        yield gauge("flq_max_rounds", "Rounds the run trains", self.cfg.max_rounds)
        yield gauge("flq_round_selected_workers", "Uploads aggregated in the last round", last["selcnt"] if last else 0)
        yield gauge("flq_test_accuracy", "Test accuracy of the last evaluation", evals["acc"] if evals else None)
        yield gauge(
            "flq_test_cross_entropy", "Test cross-entropy of the last evaluation", evals["entropy"] if evals else None
        )
        yield gauge(
            "flq_train_loss", "Mean training loss of the workers' last offers", _finite(last["loss"]) if last else None
        )
        states = GaugeMetricFamily("flq_workers", "Workers by state", labels=["state"])
        counts = {s: 0 for s in WORKER_STATES}
        for w in status.get("workers", []):
            counts[w["state"]] = counts.get(w["state"], 0) + 1
        for s, n in counts.items():
            states.add_metric([s], n)
        yield states
        finished = GaugeMetricFamily(
            "flq_run_finished", "1 once the run is over", value=float(status["state"] == "finished")
        )
        yield finished


def _round_row(r: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "iter": r["iter"],
        "loss": _finite(r["loss"]),
        "selcnt": r["selcnt"],
        "bits_up_cum": r["bits_up_cum"],
        "bits_down_cum": r["bits_down_cum"],
        "round_time_s": _finite(r.get("round_time_s")),
    }


def _clean(doc: Any) -> Any:
    """NaN and infinities as None, all the way down (JSON has neither)."""
    if isinstance(doc, dict):
        return {k: _clean(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [_clean(v) for v in doc]
    if isinstance(doc, float) and not math.isfinite(doc):
        return None
    return doc


class ScalarLog:
    """TensorBoard scalars of a run (``tensorboard_dir``), written with
    PyTorch's :class:`torch.utils.tensorboard.SummaryWriter` into a folder of
    the run's own, ``<tensorboard_dir>/<role>_<dataset>_<mode>_<YYYYmmdd_HHMMSS>``:
    per round ``train/loss``, ``uplink/selected`` (uploads aggregated),
    ``bits/uplink_cum`` and ``bits/downlink_cum`` (bits); per evaluation
    ``test/accuracy`` and ``test/cross_entropy`` against rounds, and
    ``test/accuracy_by_uplink_bits`` whose step is the cumulative uplink bits
    (the paper's bits-per-accuracy view).
    """

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = folder
        self.writer = SummaryWriter(log_dir=str(folder))
        self.failed = ""  # why writing stopped ('' = it did not)
        self._rounds = 0
        self._evals = 0

    @classmethod
    def open(cls, cfg: Config, role: str) -> Optional[ScalarLog]:
        """The run's scalar log, or None when ``tensorboard_dir`` is ''.
        Called before the run does any work, so a missing package stops it at once.

        Raises:
            flq.config.ConfigError: the ``tensorboard`` package is not installed,
                or the folder cannot be made.
        """
        from .config import ConfigError

        if not cfg.tensorboard_dir:
            return None
        try:
            import tensorboard  # noqa: F401 - torch's writer needs it
        except ImportError:
            raise ConfigError(
                "config key 'logging.tensorboard_dir' is set but the tensorboard package is not installed: "
                "pip install 'flq-fed[tensorboard]'"
            ) from None
        stamp = time.strftime("%Y%m%d_%H%M%S")
        base = Path(cfg.tensorboard_dir) / f"{role}_{cfg.dataset_tag}_{cfg.mode}_{stamp}"
        folder, n = base, 1
        while True:
            try:
                folder.mkdir(parents=True)
                break
            except FileExistsError:
                n += 1
                folder = base.with_name(f"{base.name}_{n}")
            except OSError as exc:
                raise ConfigError(f"config key 'logging.tensorboard_dir': cannot make {folder} ({exc})") from None
        return cls(folder)

    def update(self, monitor: RunMonitor) -> None:
        """Write what the run recorded since the last call. A failure to
        write (a full disk, the folder removed) is logged once and the
        scalars stop there: they never cost the run its rounds."""
        if self.failed:
            return
        try:
            self._write(monitor)
        except Exception as exc:  # noqa: BLE001 - the run goes on without its scalars
            self.failed = f"{type(exc).__name__}: {exc}"
            logging.getLogger(__name__).error(
                "TensorBoard scalars in %s stop after %d rounds (%s); the run goes on",
                self.path,
                self._rounds,
                self.failed,
            )

    def _write(self, monitor: RunMonitor) -> None:
        monitor.refresh()
        m = monitor.source.master
        if m is None:
            return
        records = m.records
        w = self.writer
        while self._rounds < len(records):
            r = records[self._rounds]
            step = r["iter"]
            if r["loss"] == r["loss"]:
                w.add_scalar("train/loss", r["loss"], step)
            w.add_scalar("uplink/selected", r["selcnt"], step)
            w.add_scalar("bits/uplink_cum", r["bits_up_cum"], step)
            w.add_scalar("bits/downlink_cum", r["bits_down_cum"], step)
            self._rounds += 1
        evals = monitor.evaluations
        while self._evals < len(evals):
            e = evals[self._evals]
            if e["acc"] is not None:
                w.add_scalar("test/accuracy", e["acc"], e["iter"])
                w.add_scalar("test/accuracy_by_uplink_bits", e["acc"], int(e["bits_up_cum"]))
            if e["entropy"] is not None:
                w.add_scalar("test/cross_entropy", e["entropy"], e["iter"])
            self._evals += 1
        w.flush()

    def close(self, monitor: RunMonitor) -> None:
        """Write the rest and close the event file (errors are logged: the
        scalars never cost the run its results)."""
        self.update(monitor)
        try:
            self.writer.close()
        except Exception as exc:  # noqa: BLE001
            logging.getLogger(__name__).error("TensorBoard scalars in %s not all written: %s", self.path, exc)
