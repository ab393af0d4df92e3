"""The worker's loop over the protocol: register, then per round fetch the
model, offer, upload or skip, with a heartbeat alongside, until the master
ends the run; and how that run ended for this worker (:class:`WorkerEnd`).

The heartbeat also carries the worker's progress (its round, phase and
local training steps done: :class:`~flq.worker.ProgressTracker`) to the
master, and writes it to the worker's log while a phase lasts, so that a
slow round can be told from a hung one at both ends.

The calls themselves, their retries and their refusals are
:class:`~flq.transport.client.MasterClient`'s; what a worker computes is its
:class:`~flq.worker.Worker`'s. This module decides only what to do next.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from .. import outcome
from ..protocol import Code
from .client import Fatal, MasterClient, Refused, RunOver, Unreachable

log = logging.getLogger("flq.transport.client")


#: At most this many seconds between two progress lines in the worker's log
#: while a phase (local training, an upload ...) lasts; less when the
#: heartbeat is more frequent (the log then follows each report).
PROGRESS_LOG_S = 15.0


class Heartbeat:
    """A daemon thread that sends :meth:`MasterClient.heartbeat` every
    ``client.heartbeat_s`` seconds while the worker computes or waits, with
    ``progress`` (a :class:`~flq.worker.ProgressTracker`, or None) in it.
    While the worker is in a phase other than ``waiting`` for longer than
    ``min(heartbeat_s, PROGRESS_LOG_S)``, it also logs the progress that
    often (``round 7: local training 120/469 batches, 23 s``): a hung
    worker's log shows the same count with a growing time."""

    def __init__(self, client: MasterClient, progress: Any = None) -> None:
        self.client = client
        self.progress = progress
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{client.worker_id}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        tick = max(0.5, min(self.client.heartbeat_s, PROGRESS_LOG_S))
        last_log = time.monotonic()
        next_beat = last_log + self.client.heartbeat_s
        while not self._stop.wait(max(0.0, min(tick, next_beat - time.monotonic()))):
            report = self.progress.report() if self.progress is not None else None
            now = time.monotonic()
            if report is not None and report.phase != "waiting" and report.seconds >= tick:
                if now - last_log >= 0.9 * tick:
                    log.info("worker %d: %s", self.client.worker_id, self.progress.line())
                    last_log = now
            if now < next_beat:
                continue
            next_beat = time.monotonic() + self.client.heartbeat_s
            try:
                if not self.client.heartbeat(report):
                    return
            except Exception:  # noqa: BLE001 - a heartbeat never ends the worker
                log.debug("heartbeat failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()


@dataclass
class WorkerEnd:
    """How a worker's run ended: ``reason`` (:mod:`flq.outcome`), a one-line
    ``detail``, and the rounds it offered in."""

    reason: str
    detail: str
    rounds: int

    @property
    def exit_status(self) -> int:
        return outcome.exit_status(self.reason)


def run_worker(
    client: MasterClient,
    make_worker: Callable[[Dict[str, Any]], Any],
    before_upload: Optional[Callable[[int], bool]] = None,
    on_round_end: Optional[Callable[[Any, int], Any]] = None,
) -> WorkerEnd:
    """The worker loop: register, then per round fetch -> offer -> upload or skip,
    with a heartbeat alongside, until the master ends the run.

    The worker is built (data loaded, partition made) from ``GET /config``
    before it registers, so the master never waits on a worker's start-up.
    A worker leaving for any other reason than the master's (a signal, an
    error) tells the master it leaves.

    Args:
        client: the HTTP client.
        make_worker: builds the :class:`~flq.worker.Worker` from the run's
            config sections.
        before_upload: test hook; returning False drops the upload after the
            worker committed it (a lost upload).
        on_round_end: called as ``on_round_end(worker, k)`` once the worker is
            done with round k (uploaded, skipped, refused; after a resync),
            before it waits for the next round (where ``flq worker`` saves
            its state).

    Returns:
        How it ended: the master's reason when it ended the run (the worker
        exits with the same status), ``refused`` / ``error`` /
        ``unreachable`` for the worker's own fatal conditions.

    A SIGINT/SIGTERM (:class:`flq.outcome.Interrupted`, under
    :func:`flq.outcome.signals_interrupt`) ends it with reason ``sigint`` /
    ``sigterm`` after telling the master it leaves.
    """
    offered, joined = 0, False
    heartbeat: Optional[Heartbeat] = None
    leave = True
    try:
        worker = make_worker(client.config()["config"])
        describe = worker.describe() if hasattr(worker, "describe") else {}
        _register(client, worker, describe)
        joined = True
        progress = getattr(worker, "progress", None)
        heartbeat = Heartbeat(client, progress).start()
        last_round, after, ended = None, -1, None
        while True:
            if ended is not None and on_round_end is not None:
                on_round_end(worker, ended)
            ended = None
            outcome.raise_if_interrupted()  # a signal whose exception a finalizer swallowed
            _enter(progress, "waiting")
            try:
                got = client.next_round(after)
            except Refused as exc:
                if exc.code == Code.NOT_REGISTERED:  # the master restarted (maybe from an older checkpoint)
                    _register(client, worker, describe)
                    after = -1  # whatever round it is at now
                    continue
                raise
            if got is None:
                continue
            k, me_k, payload = got
            if last_round is not None:
                for _ in range(max(0, k - last_round - 1)):  # rounds missed while absent (docs/algorithm.md step 8)
                    worker.skip(-1)
            last_round = after = k
            offer = worker.offer(k, me_k, payload)
            ended = k
            if progress is not None and offer.compute_s >= PROGRESS_LOG_S:  # a long one: its end too
                log.info(
                    "worker %d: round %d: local training done, %d batches in %.0f s",
                    client.worker_id,
                    k + 1,
                    progress.report().total,
                    offer.compute_s,
                )
            _enter(progress, "offering")
            try:
                selected = client.offer(offer)
            except Refused as exc:
                log.warning("worker %d: offer for round %d refused: %s", client.worker_id, k + 1, exc.detail)
                worker.skip(k)
                if exc.code == Code.MIRROR_MISMATCH:
                    _resync(client, worker)
                    after = k - 1  # fetch this round's model again, against the resynchronized mirror
                continue
            offered += 1
            if not selected:
                worker.skip(k)
                log.debug("worker %d: round %d not selected (candidate %s)", client.worker_id, k + 1, offer.candidate)
                continue
            body = worker.upload(k)
            if before_upload is not None and not before_upload(k):
                log.warning("worker %d: upload of round %d dropped (test hook)", client.worker_id, k + 1)
                continue
            _enter(progress, "uploading")
            try:
                client.upload(k, body, versions=(offer.up_version, offer.down_version))
            except Refused as exc:
                log.warning("worker %d: upload for round %d refused: %s", client.worker_id, k + 1, exc.detail)
            log.debug("worker %d: round %d uploaded %d bytes", client.worker_id, k + 1, len(body))
    except RunOver as exc:
        leave = False
        if not joined:
            return WorkerEnd(outcome.REFUSED, f"the run at {client.base_url} is already over ({exc.reason})", 0)
        if exc.reason in (outcome.SIGINT, outcome.SIGTERM):  # the operator stopped the master
            return WorkerEnd(outcome.STOPPED, f"the master was stopped ({exc.reason})", offered)
        return WorkerEnd(exc.reason, f"the master ended the run ({exc.reason})", offered)
    except Fatal as exc:
        leave = not exc.replaced
        return WorkerEnd(exc.reason, str(exc), offered)
    except Unreachable as exc:
        leave = False
        return WorkerEnd(outcome.UNREACHABLE, str(exc), offered)
    except Refused as exc:  # a refusal the loop does not expect: no retry can fix it
        return WorkerEnd(
            outcome.REFUSED, f"the master refused this worker ({exc.status}, {exc.code}): {exc.detail}", offered
        )
    except outcome.Interrupted as exc:
        return WorkerEnd(exc.reason, f"{exc.reason.upper()}: left the run", offered)
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        if leave and joined:
            client.leave()
        log.info(
            "worker %d: %d bytes sent and %d received in HTTP bodies",
            client.worker_id,
            client.bytes_sent,
            client.bytes_received,
        )


def _enter(progress: Any, phase: str) -> None:
    """Tell the worker's progress tracker (None: a worker without one) it is in ``phase`` now."""
    if progress is not None:
        progress.enter(phase)


def _register(client: MasterClient, worker, describe: Dict[str, Any]) -> None:
    info = client.register(worker.up_version, worker.down_version, **describe)
    if info["resync"]:
        _resync(client, worker)


def _resync(client: MasterClient, worker) -> None:
    ref_up, ref_down, up_v, down_v = client.mirrors()
    worker.resync(ref_up, ref_down, up_v, down_v)
    log.info("worker %d: mirrors resynchronized (up v%d, down v%d)", client.worker_id, up_v, down_v)
