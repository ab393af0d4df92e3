"""The round protocol of the real cluster, without HTTP (SYSTEM.md, "Master
HTTP API").

:class:`ClusterMaster` wraps a :class:`~flq.master.Master` with what a
network adds: registration, heartbeats and leaving, rounds that open when
``min_workers`` are present, offers that close when every live worker has
offered or ``round_timeout_s`` after the round opened, uploads only from the
selected, late or absent workers counted as not selected, mirror versions
checked on every offer, and a stop that takes effect after the current round.
Its coroutines wait on one asyncio condition; the HTTP layer
(:mod:`flq.transport.server`) only maps requests onto them. All round timing
(deadlines, last seen, timeouts, absence) reads one injected monotonic clock,
so the round loop runs under a fake clock in tests (``tests/test_protocol.py``),
without sockets or real waiting; :meth:`ClusterMaster.run` is its phases in
order (:meth:`~ClusterMaster.wait_for_workers`, :meth:`~ClusterMaster.open_round`,
:meth:`~ClusterMaster.close_offers`, :meth:`~ClusterMaster.select`,
:meth:`~ClusterMaster.collect_uploads`, :meth:`~ClusterMaster.close_round`).

Rounds: the documents it returns (:meth:`~ClusterMaster.status`,
:meth:`~ClusterMaster.register`, :meth:`~ClusterMaster.heartbeat`) count them
from 1 like every user-facing number (:mod:`flq.protocol`); the arguments and
results that carry the algorithm's messages (``Offer.round``, ``after``,
``round_index``, :attr:`RoundView.round`) are the algorithm's 0-based ``k``.

Every wait has a bound (all in seconds, from the config's ``system``
section):

- A worker is *live* while it was heard from (any call, or the heartbeat it
  sends every ``worker_timeout_s / 3``) within ``worker_timeout_s``, and has
  not left. Others are shown ``absent`` (or ``left``) in ``/status`` and no
  round waits for them.
- Before round 1 the master waits for ``min_workers`` live workers (0 = all)
  for at most ``start_timeout_s``, then ends the run (``quorum_lost``).
- A round's offers close as soon as every live worker has offered, or
  ``round_timeout_s`` after the round opened; either way only once at least
  ``min_workers`` have offered. A round still short of them keeps waiting,
  saying every 15 s whom it waits for, up to ``quorum_timeout_s`` more; then
  the run ends (``quorum_lost``). Live workers that did not offer in time are
  ``late``: not selected this round.
- The selected workers' uploads are awaited ``round_timeout_s`` at most;
  missing ones count as not selected.
- Every call a worker makes is answered within its own bound: the round's
  model and the selection are long-polls of at most ``wait`` seconds.

The same message sent twice (a retry after a lost answer) gets the same
answer and is counted once: the round's model (same bytes), an offer (same
selection) and an upload (accepted again, counted once).

Why one module of this size: :class:`ClusterMaster` is one object because
the worker calls and the round loop share one state (the open round's phase,
offers, deadlines, the workers' sessions and liveness) under one
``asyncio.Condition``; split across modules, every piece would reach into the
others' state. The request models, middleware and routes are in
:mod:`flq.transport`; the math in :class:`~flq.master.Master`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from . import outcome
from .config import Config
from .master import Master, MasterError, payload_digest
from .messages import Offer, Progress
from .outputs import one_line
from .protocol import Code, round_number
from .summary import log_round, round_timings

log = logging.getLogger(__name__)

WAITING, TRAINING, STOPPING, FINISHED = "waiting", "training", "stopping", "finished"
PHASE_IDLE, PHASE_OFFERS, PHASE_UPLOADS, PHASE_CLOSING = "idle", "offers", "uploads", "closing"
#: Seconds between two "still waiting" log lines.
LOG_EVERY_S = 15.0
#: A gap this long between two ticks of the event loop (normally 0.2 s apart)
#: means the master itself was not running (SIGSTOP, a suspended VM, a
#: starved machine): every running timeout is extended by the gap.
PAUSE_S = 3.0
#: Seconds between two checks of the round loop's conditions when nothing
#: notifies it (a worker going absent changes them without a message).
POLL_S = 0.2

#: How a run ends: ``(reason, detail)``, ``reason`` from :mod:`flq.outcome`.
Ending = Tuple[str, str]


class RunFinished(Exception):
    """The run is over: the worker should exit. ``reason`` says why (:mod:`flq.outcome`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"run over ({reason})")
        self.reason = reason


@dataclass
class WorkerInfo:
    """What the master knows of one worker's connection."""

    worker_id: int
    last_seen: float
    state: str = "registered"  # registered | training | offered | uploading | idle | late
    rounds_offered: int = 0
    rounds_uploaded: int = 0
    address: str = ""
    session: str = ""
    left: bool = False
    threads: int = 0
    device: str = ""
    progress: Optional[Progress] = None  # its last progress report, and when it came (by the clock)
    progress_at: float = 0.0


@dataclass
class RoundView:
    """The open round as a worker sees it."""

    round: int
    me_k: float
    payload: bytes


class ClusterMaster:
    """Drives a :class:`Master` through rounds for workers on the network.

    Args:
        master: the algorithm's master object.
        cfg: configuration (``min_workers``, ``round_timeout_s``,
            ``worker_timeout_s``, ``start_timeout_s``, ``quorum_timeout_s``,
            ``max_rounds``).
        on_round: called (in a thread) after each round with its record.
        on_finish: called (in a thread) once when the run ends, with the reason.
        clock: monotonic time in seconds for all round timing: deadlines, last
            seen, timeouts, absence (tests pass a fake one). A wait with a
            deadline waits at most the clock's seconds left, and re-checks the
            clock whenever it is woken (:meth:`wake`).
        pause_s: a gap this long (clock seconds) between two ticks of the
            round loop is a pause of the master itself; its timeouts are
            extended by it (``math.inf``: never).
        poll_s: real seconds between two checks of the round loop's
            conditions when nothing wakes it.
        run_id: the run's id (the stamp of its checkpoint), told to workers
            by ``GET /config`` so that they can tell their saved state's run.
        data_digest: the training labels' :func:`flq.datasets.labels_digest`;
            a worker registering with another is refused (409
            ``data_mismatch``): its share would not be the one the run's
            partition gives it ('' = not checked).
    """

    def __init__(
        self,
        master: Master,
        cfg: Config,
        on_round: Optional[Callable[[Dict[str, Any]], None]] = None,
        on_finish: Optional[Callable[[str], None]] = None,
        clock: Callable[[], float] = time.monotonic,
        pause_s: float = PAUSE_S,
        poll_s: float = POLL_S,
        run_id: str = "",
        data_digest: str = "",
    ) -> None:
        self.master = master
        self.cfg = cfg
        self.run_id = run_id
        self.data_digest = data_digest
        self.on_round = on_round
        self.on_finish = on_finish
        self.clock = clock
        self.pause_s = pause_s
        self.poll_s = poll_s
        self.workers: Dict[int, WorkerInfo] = {}
        self.state = WAITING
        self.phase = PHASE_IDLE
        self.stop_requested = False
        self.stop_reason = ""
        self.finish_reason = ""
        self.finish_detail = ""
        self.checkpoint_error = ""
        self.round_opened_at = 0.0
        self.selected: List[int] = []
        self.decided: Dict[int, bool] = {}
        #: selected workers of the open round whose process registered again: their upload cannot come
        self.lost_uploads: Set[int] = set()
        #: worker -> (round, digest) of its last counted upload: a retry after the round closed is answered OK
        self.counted_uploads: Dict[int, Tuple[int, str]] = {}
        self.heartbeat_s = max(1.0, cfg.worker_timeout_s / 3)
        self.waiting_since = self.uploads_opened_at = self._last_tick = clock()
        self._absent: set = set()  # workers whose absence was logged
        self._cond: Optional[asyncio.Condition] = None

    # ----- helpers --------------------------------------------------------
    @property
    def cond(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def _notify(self) -> None:
        async with self.cond:
            self.cond.notify_all()

    async def wake(self) -> None:
        """Wake every waiter to re-check its condition and the clock (after a
        stop request, or after a test moved its fake clock)."""
        await self._notify()

    @property
    def round_number(self) -> int:
        """The round shown to users and workers (1-based): the one in
        progress, or the next to open; the last one done once the run is
        over (all rounds done, or stopped after some)."""
        m = self.master
        over = m.finished or (self.state == FINISHED and m.round > 0)
        return m.round if over else round_number(m.round)

    async def _notified_before(self, deadline: float) -> bool:
        """Inside ``async with self.cond``: wait for a notification until the
        clock's ``deadline``; False when the deadline passed first."""
        left = deadline - self.clock()
        if left <= 0:
            return False
        try:
            await asyncio.wait_for(self.cond.wait(), timeout=left)
        except asyncio.TimeoutError:
            return False
        return True

    def _check_session(self, info: WorkerInfo, session: Optional[str]) -> None:
        if info.left:
            raise MasterError(f"worker {info.worker_id} has left: register again", Code.NOT_REGISTERED)
        if session is not None and session != info.session:
            raise MasterError(
                f"worker {info.worker_id} session replaced: another process registered with this id"
                f" from {info.address or '?'}",
                Code.SESSION_REPLACED,
            )

    def _seen(self, worker_id: int, state: Optional[str] = None, session: Optional[str] = None) -> WorkerInfo:
        info = self.workers.get(worker_id)
        if info is None:
            raise MasterError(f"worker {worker_id} is not registered", Code.NOT_REGISTERED)
        self._check_session(info, session)
        info.last_seen = self.clock()
        if state:
            info.state = state
        return info

    def _tick(self) -> None:
        """Notice a pause of the master itself and extend every running
        timeout by it: workers cannot have been heard while it did not run,
        and the round's clocks stop with it (see :data:`PAUSE_S`)."""
        now = self.clock()
        gap, self._last_tick = now - self._last_tick, now
        if gap < self.pause_s:
            return
        self.round_opened_at += gap
        self.uploads_opened_at += gap
        self.waiting_since += gap
        for w in self.workers.values():
            w.last_seen += gap
            w.progress_at += gap
        log.warning(
            "the master did not run for %.0f s (stopped, suspended or starved): its timeouts are extended by as much",
            gap,
        )

    def is_live(self, info: WorkerInfo) -> bool:
        """Heard from within ``worker_timeout_s`` and not left."""
        return not info.left and self.clock() - info.last_seen <= self.cfg.worker_timeout_s

    def shown_state(self, info: WorkerInfo) -> str:
        """The state ``/status`` shows: ``left``, ``absent`` (not heard from
        within ``worker_timeout_s``) or the protocol state."""
        if info.left:
            return "left"
        return info.state if self.is_live(info) else "absent"

    @property
    def connected(self) -> List[int]:
        """The live workers (see :meth:`is_live`)."""
        return sorted(m for m, w in self.workers.items() if self.is_live(w))

    def _finished(self) -> None:
        if self.state == FINISHED:
            raise RunFinished(self.finish_reason)

    # ----- worker calls ---------------------------------------------------
    async def register(
        self,
        worker_id: int,
        up_version: int,
        down_version: int,
        address: str = "",
        threads: int = 0,
        device: str = "",
        model: Optional[List[Any]] = None,
        data: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Register (or re-register) worker m.

        The newest registration of an id wins: calls that carry an older
        session are refused (409 ``session_replaced``; calls of the old
        process waiting in a long-poll are woken to hear it), so two
        processes with one id never both train. A worker that re-registers
        fetches the open round's model afresh.

        Returns:
            ``{"resync", "round", "state", "session", "heartbeat_s"}``;
            resync is True when the worker's mirror versions differ from the
            master's; round is :attr:`round_number` (1-based); heartbeat_s
            in seconds.

        Raises:
            MasterError: unknown id (404 ``unknown_worker``); a ``model``
                (the worker's :meth:`~flq.layout.ModelLayout.signature`)
                that differs from the master's (409 ``model_mismatch``, the
                first differing tensor named); ``data`` (the worker's
                training labels' digest) other than ``data_digest`` (409
                ``data_mismatch``).
            RunFinished: the run is over.
        """
        self.master.check_worker(worker_id)
        if model is not None:
            self.master.check_model(worker_id, model)
        if data is not None and self.data_digest and data != self.data_digest:
            raise MasterError(
                f"worker {worker_id}'s training set ({data}) is not the master's ({self.data_digest}): "
                f"every process must load the same data (its share is cut from it by worker id)",
                Code.DATA_MISMATCH,
            )
        self._finished()
        now = self.clock()
        info = self.workers.get(worker_id)
        if info is None:
            info = self.workers[worker_id] = WorkerInfo(worker_id, now, address=address)
            log.info(
                "worker %d registered from %s (%d/%d)",
                worker_id,
                address or "?",
                len(self.workers),
                self.cfg.total_workers,
            )
        else:
            log.info(
                "worker %d registered again from %s%s",
                worker_id,
                address or "?",
                " (the older process with this id is told it was replaced)" if self.is_live(info) else "",
            )
            info.last_seen, info.state, info.left = now, "registered", False
            info.address = address or info.address
            if self.phase == PHASE_OFFERS:
                self.master.forget_downlink(worker_id)
            elif self.phase == PHASE_UPLOADS and worker_id in self.selected and worker_id not in self.master.received:
                # the process that was selected is gone with its pending update: no upload can come
                self.lost_uploads.add(worker_id)
                log.info(
                    "worker %d registered again after it was selected in round %d: its upload will not come; "
                    "counted as not selected",
                    worker_id,
                    self.round_number,
                )
        info.threads, info.device = int(threads), str(device)[:64]
        info.session = secrets.token_hex(8)
        info.progress = None  # a new process: nothing reported yet
        resync = (up_version, down_version) != (self.master.up_version[worker_id], self.master.down_version[worker_id])
        await self._notify()
        return {
            "resync": resync,
            "round": self.round_number,
            "state": self.state,
            "session": info.session,
            "heartbeat_s": self.heartbeat_s,
        }

    def heartbeat(
        self, worker_id: int, session: Optional[str] = None, progress: Optional[Progress] = None
    ) -> Dict[str, Any]:
        """A live worker's periodic sign of life (every ``heartbeat_s``), with
        its ``progress`` when it reports one (kept, the last one only, for
        ``/status`` and the "still waiting" lines: monitoring only). The
        heartbeat is its only carrier, so reports come at most as often as
        heartbeats.

        Returns:
            ``{"state", "round", "phase"}``, round 1-based (:attr:`round_number`).

        Raises:
            MasterError: a report that cannot be true (400 ``malformed``),
                not registered (404 ``not_registered``), replaced (409
                ``session_replaced``); nothing changed.
            RunFinished: the run is over.
        """
        if progress is not None and progress.problem():
            raise MasterError(f"worker {worker_id}: {progress.problem()}", Code.MALFORMED)
        self._finished()
        info = self._seen(worker_id, session=session)
        if progress is not None:
            info.progress, info.progress_at = progress, info.last_seen
        return {"state": self.state, "round": self.round_number, "phase": self.phase}

    async def leave(self, worker_id: int, session: Optional[str] = None) -> None:
        """Worker m exits on purpose (Ctrl-C, SIGTERM): no round waits for it
        any more; it may register again later.

        Raises:
            MasterError: not registered (404 ``not_registered``), replaced (409 ``session_replaced``).
        """
        info = self._seen(worker_id, session=session)
        info.left, info.session = True, ""
        if self.phase == PHASE_OFFERS:
            self.master.forget_downlink(worker_id)
        log.warning("worker %d left (its process is exiting)", worker_id)
        await self._notify()

    def mirrors(self, worker_id: int, session: Optional[str] = None) -> Tuple[Any, Any, int, int]:
        """The master's ``ref_up[m]``, ``ref_down[m]`` and their versions (for a
        resync); the worker then fetches the open round's model afresh.

        Raises:
            MasterError: not registered (404 ``not_registered``), replaced (409 ``session_replaced``).
        """
        self._seen(worker_id, session=session)
        m = self.master
        if self.phase == PHASE_OFFERS:
            m.forget_downlink(worker_id)
        log.info(
            "worker %d resynchronizes its mirrors (up v%d, down v%d)",
            worker_id,
            m.up_version[worker_id],
            m.down_version[worker_id],
        )
        return m.ref_up[worker_id], m.ref_down[worker_id], m.up_version[worker_id], m.down_version[worker_id]

    async def fetch_round(
        self, worker_id: int, wait_s: float, session: Optional[str] = None, after: int = -1
    ) -> Optional[RoundView]:
        """Wait up to ``wait_s`` seconds for a round after round ``after`` (the
        algorithm's 0-based k; -1 for any) that is open to offers and that this worker has not offered
        in, and return this worker's downlink for it. Asked again for the
        same round (a download cut short and retried), it returns the same
        bytes: the mirror moves once and the bits are counted once (the
        bytes sent again count as wire bytes).

        Returns:
            The round, or None when none opened in time.

        Raises:
            RunFinished: the run is over.
            MasterError: not registered (404 ``not_registered``), replaced (409 ``session_replaced``).
        """
        info = self._seen(worker_id, session=session)
        deadline = self.clock() + max(wait_s, 0.0)
        m = self.master
        async with self.cond:
            while True:
                self._finished()
                self._check_session(info, session)
                if self.phase == PHASE_OFFERS and m.round > after and worker_id not in m.offers:
                    break
                if not await self._notified_before(deadline):
                    return None
            info = self._seen(worker_id, "training", session=session)
            again = worker_id in m.downlinks
            payload = m.downlink(worker_id)
            log.debug("round %d: model for worker %d ready at +%.1f ms", m.round + 1, worker_id, self._open_ms())
            if again:
                m.add_wire_bytes(down=len(payload))
                log.info(
                    "worker %d fetched round %d's model again (a retry): the same %d bytes",
                    worker_id,
                    m.round + 1,
                    len(payload),
                )
            return RoundView(m.round, m.me_k, payload)

    async def offer(self, offer: Offer, session: Optional[str] = None, wait_s: float = 20.0) -> Optional[bool]:
        """Record an offer (its round is the algorithm's 0-based k) and wait up
        to ``wait_s`` seconds for the selection.

        The same offer sent again (its answer was lost, or the selection took
        longer than ``wait_s``) is not recorded twice: it waits for, or
        returns, the same decision.

        Returns:
            True (selected: upload now), False (not selected), or None (no
            decision yet: send the same offer again).

        Raises:
            MasterError: late (409 ``late``: the round's offers closed or the
                round is over), mirror mismatch (409 ``mirror_mismatch``),
                a different second offer or none of the round's model (409
                ``conflict``), malformed (400 ``malformed``), not registered
                (404), replaced (409 ``session_replaced``).
            RunFinished: the run is over.
        """
        m = offer.worker_id
        info = self._seen(m, session=session)
        self._finished()
        if self.phase not in (PHASE_OFFERS, PHASE_UPLOADS) or offer.round != self.master.round:
            raise self._out_of_round("offer", offer.round)
        if self.master.add_offer(offer):
            info.state, info.rounds_offered = "offered", info.rounds_offered + 1
            log.debug(
                "round %d: offer of worker %d at +%.1f ms (computed in %.1f ms)",
                offer.round + 1,
                m,
                self._open_ms(),
                1e3 * offer.compute_s,
            )
            await self._notify()
        deadline = self.clock() + max(wait_s, 0.0)
        async with self.cond:
            while offer.round == self.master.round and m not in self.decided and self.state != FINISHED:
                self._check_session(info, session)
                if not await self._notified_before(deadline):
                    return None
        self._finished()
        if offer.round != self.master.round:
            raise MasterError(
                f"round {offer.round + 1} closed before its selection reached worker {m}: not selected", Code.LATE
            )
        selected = self.decided[m]
        info.state = "uploading" if selected else "idle"
        return selected

    async def upload(
        self,
        worker_id: int,
        round_index: int,
        payload: bytes,
        session: Optional[str] = None,
        versions: Optional[Tuple[int, int]] = None,
        answer_bytes: int = 0,
    ) -> None:
        """Accept a selected worker's payload for round ``round_index`` (the
        algorithm's 0-based k; the same bytes again are accepted and counted
        once, also after the round closed). ``versions``: the worker's
        ``(up_version, down_version)`` of its offer, before this upload
        (None: not checked). ``answer_bytes``: the size of the answer the
        transport will send, counted in the round's downlink bytes together
        with the payload (before the round can close on it).

        Raises:
            MasterError: wrong round or phase (409 ``late``), not selected or
                other bytes than the counted upload (409 ``conflict``),
                mirror versions other than the master's (409
                ``mirror_mismatch``), malformed payload (400 ``malformed``),
                not registered (404), replaced (409 ``session_replaced``);
                state unchanged.
        """
        info = self._seen(worker_id, session=session)
        if self.phase == PHASE_UPLOADS and round_index == self.master.round:
            have = (self.master.up_version[worker_id], self.master.down_version[worker_id])
            if versions is not None and worker_id not in self.master.received and tuple(versions) != have:
                raise MasterError(
                    f"upload of worker {worker_id} with mirror versions {tuple(versions)}, the master's are {have}",
                    Code.MIRROR_MISMATCH,
                )
            accepted = self.master.receive_upload(worker_id, payload)
            self.master.add_wire_bytes(down=answer_bytes)
            log.debug("round %d: upload of worker %d at +%.1f ms", round_index + 1, worker_id, self._open_ms())
            if accepted:
                info.state, info.rounds_uploaded = "idle", info.rounds_uploaded + 1
                self.counted_uploads[worker_id] = (round_index, payload_digest(payload))
                await self._notify()
            return
        if self.counted_uploads.get(worker_id) == (round_index, payload_digest(payload)):
            self.master.add_wire_bytes(down=answer_bytes)
            return  # a retry of an upload counted before its round closed
        raise self._out_of_round("upload", round_index)

    def _out_of_round(self, what: str, k: int) -> MasterError:
        """The refusal of an offer or upload for round index ``k`` that is not
        the one taking them: ``late`` when that round is over, ``not_open``
        when the master has not opened it yet."""
        m = self.master
        ahead = k > m.round or (k == m.round and self.phase in (PHASE_IDLE,) and self.state != FINISHED)
        if ahead:
            return MasterError(
                f"{what} for round {k + 1}: the master has not opened it (round {m.round + 1}, phase {self.phase})",
                Code.NOT_OPEN,
            )
        return MasterError(f"{what} for round {k + 1} is late (round {m.round + 1}, phase {self.phase})", Code.LATE)

    def abort(self, reason: str) -> None:
        """Exit now (a second signal): from here on every call is answered
        410 with the run's end reason, so the workers leave at once."""
        self.stop_reason = self.stop_reason or reason
        self.finish_reason = self.finish_reason or self.stop_reason
        self.finish_detail = self.finish_detail or (
            f"{reason} again: exited at once after {len(self.master.records)} rounds"
        )
        self.state = FINISHED
        try:
            asyncio.get_running_loop().create_task(self._notify())
        except RuntimeError:  # no event loop running: nobody is waiting
            pass

    def request_stop(self, reason: str = outcome.STOPPED) -> None:
        """Stop after the current round (SYSTEM.md, ``POST /stop``); ``reason``
        (``stopped``, ``sigint``, ``sigterm``) becomes the run's end reason."""
        if self.state != FINISHED:
            self.stop_requested = True
            self.stop_reason = self.stop_reason or reason
            if self.state == WAITING:
                self.state = STOPPING
            log.info("stop requested (%s) at round %d", reason, self.master.round + 1)

    # ----- the round loop -------------------------------------------------
    async def _wait_until(self, predicate: Callable[[], bool], deadline: Optional[Callable[[], float]] = None) -> bool:
        """Wait until predicate() (re-checked on every notification and at
        least every ``poll_s`` real seconds) or the clock reaches
        ``deadline()`` (asked afresh each time: a pause of the master moves
        it, see :meth:`_tick`); return whether the predicate holds."""
        async with self.cond:
            while True:
                self._tick()
                if predicate():
                    break
                now = self.clock()
                until = deadline() if deadline is not None else None
                if until is not None and now >= until:
                    return False
                timeout = self.poll_s if until is None else max(0.0, min(self.poll_s, until - now))
                try:
                    await asyncio.wait_for(self.cond.wait(), timeout=timeout)
                except asyncio.TimeoutError:
                    pass
        return True

    async def run(self) -> None:
        """Rounds until ``max_rounds``, a stop, a lost quorum, divergence or an
        error; then the finish callback (which writes the results), then
        state ``finished``. Never raises but for cancellation."""
        watcher = asyncio.ensure_future(self._watch_liveness())
        try:
            reason, detail = await self._train()
        except outcome.Diverged as exc:
            reason, detail = outcome.DIVERGED, str(exc)
            log.error("%s; the run stops", exc)
        except Exception as exc:  # noqa: BLE001 - the run ends, its results are kept
            reason, detail = outcome.ERROR, f"{type(exc).__name__}: {one_line(exc)}"
            log.exception("the round loop failed in round %d; the run stops", self.master.round + 1)
        finally:
            watcher.cancel()
        await self.end_run(reason, detail)

    async def end_run(self, reason: str, detail: str = "") -> None:
        """End the run: the finish callback (which writes the results), then
        state ``finished``, every waiter woken (their calls answer 410)."""
        self.finish_reason, self.finish_detail = reason, detail
        self.phase = PHASE_IDLE
        if self.on_finish is not None:
            try:
                await asyncio.to_thread(self.on_finish, reason)
            except Exception:  # noqa: BLE001 - reported by the callback's owner
                log.exception("writing the results failed")
        async with self.cond:
            self.state = FINISHED
            self.cond.notify_all()
        log.info("run ended (%s) after %d rounds%s", reason, len(self.master.records), f": {detail}" if detail else "")

    async def _watch_liveness(self) -> None:
        """Every second: :meth:`check_liveness`."""
        while True:
            await asyncio.sleep(1.0)
            self._tick()
            self.check_liveness()

    def check_liveness(self) -> List[int]:
        """Log each worker going absent (not heard from for ``worker_timeout_s``
        by the clock) and coming back; return the workers absent now."""
        for w in list(self.workers.values()):
            gone = not w.left and not self.is_live(w)
            if gone and w.worker_id not in self._absent:
                self._absent.add(w.worker_id)
                log.warning(
                    "worker %d absent: not heard from for %.0f s (system.worker_timeout_s)",
                    w.worker_id,
                    self.clock() - w.last_seen,
                )
            elif not gone and w.worker_id in self._absent:
                self._absent.discard(w.worker_id)
                if not w.left:
                    log.info("worker %d is back", w.worker_id)
        return sorted(self._absent)

    def _missing(self, have) -> List[int]:
        return [m for m in range(self.cfg.total_workers) if m not in have]

    async def _train(self) -> Ending:
        """The rounds, phase by phase, until the run ends; how it ended.

        Raises:
            Diverged: a round diverged (it is recorded first).
        """
        m = self.master
        ended = await self.wait_for_workers()
        if ended is not None:
            return ended
        while not m.finished:
            if self.stop_requested:
                return self.stop_reason, f"{self.stop_reason} after {len(m.records)} rounds"
            await self.open_round()
            ended = await self.close_offers()
            if ended is not None:
                return ended
            await self.select()
            await self.collect_uploads()
            await self.close_round()
        await asyncio.to_thread(m.finish_evaluations)  # EvaluationFailed: the run ends with an error
        return outcome.COMPLETED, ""

    async def wait_for_workers(self) -> Optional[Ending]:
        """Before round 1: wait for ``min_workers`` live workers, at most
        ``start_timeout_s`` seconds (by the clock), saying every
        :data:`LOG_EVERY_S` seconds whom it still waits for.

        Returns:
            None when they are present (the state becomes ``training``);
            else how the run ends: ``quorum_lost`` after ``start_timeout_s``,
            or the stop's reason when a stop was requested meanwhile.
        """
        cfg = self.cfg
        need = cfg.needed_workers
        log.info(
            "waiting for %d of %d workers (system.min_workers), at most %.0f s (system.start_timeout_s)",
            need,
            cfg.total_workers,
            cfg.start_timeout_s,
        )
        self.waiting_since = self._last_tick = self.clock()
        log_at = LOG_EVERY_S  # seconds after waiting_since: the next "still waiting" line
        while not await self._wait_until(
            lambda: len(self.connected) >= need or self.stop_requested,
            lambda: self.waiting_since + min(log_at, cfg.start_timeout_s),  # noqa: B023 (read only while waiting)
        ):
            missing = self._missing(self.connected)
            waited = self.clock() - self.waiting_since
            if waited >= cfg.start_timeout_s:
                return outcome.QUORUM_LOST, (
                    f"only {len(self.connected)} of the {need} workers needed were present "
                    f"within start_timeout_s ({cfg.start_timeout_s:.0f} s); missing "
                    f"{missing}"
                )
            log.info(
                "still waiting: %d of the %d workers needed are present; missing %s (start them or lower "
                "system.min_workers); the run ends in %.0f s",
                len(self.connected),
                need,
                missing,
                cfg.start_timeout_s - waited,
            )
            log_at = waited + LOG_EVERY_S
        if self.stop_requested:
            return self.stop_reason, "stopped before round 1"
        self.state = TRAINING
        return None

    async def open_round(self) -> int:
        """Step 1, and open the round to offers (phase ``offers``): the
        waiting model fetches get its downlink. Returns its k (0-based)."""
        m = self.master
        async with self.cond:
            m.begin_round()
            self.decided, self.selected = {}, []
            self.lost_uploads = set()
            self.phase = PHASE_OFFERS
            self.round_opened_at = self.clock()
            self.cond.notify_all()
        log.debug("round %d open (me_k %.6g)", m.round + 1, m.me_k)
        return m.round

    async def close_offers(self) -> Optional[Ending]:
        """Wait until the open round's offers close: every live worker has
        offered, or ``round_timeout_s`` seconds (by the clock) passed since
        the round opened; either way once at least ``min_workers`` offered.
        Short of them, it keeps waiting ``quorum_timeout_s`` more, saying
        every :data:`LOG_EVERY_S` seconds whom it waits for. After a stop
        request the round still closes if its live workers can complete it
        within ``round_timeout_s``. Live workers without an offer are then
        ``late``: not selected this round.

        Returns:
            None when the offers closed; else how the run ends: ``quorum_lost``
            (the quorum never came), or the stop's reason (the round was
            abandoned: it could not close).
        """
        cfg, m = self.cfg, self.master
        k, need = m.round, cfg.needed_workers
        give_up = cfg.round_timeout_s + cfg.quorum_timeout_s  # seconds after the round opened
        log_at = cfg.round_timeout_s  # the next "waiting for" line, seconds after the round opened
        while True:
            if await self._wait_until(
                lambda: self._offers_closed(need) or self._stop_now(need),
                lambda: self.round_opened_at + min(log_at, give_up),  # noqa: B023 (read only while waiting)
            ):
                break
            open_s = self.clock() - self.round_opened_at
            if open_s >= give_up:
                self.phase = PHASE_IDLE
                return outcome.QUORUM_LOST, (
                    f"round {k + 1}: {len(m.offers)} of the {need} offers needed "
                    f"(system.min_workers) after round_timeout_s + quorum_timeout_s "
                    f"({cfg.round_timeout_s + cfg.quorum_timeout_s:.0f} s); missing "
                    f"{self._missing(m.offers)}"
                )
            waiting = self.waiting_for()
            summary, more_s = self.progress_summary(waiting)
            hint = ""
            if more_s > give_up - open_s:  # slow, not hung: it will not make it in time
                hint = (
                    f"; at this pace local training needs ~{more_s:.0f} s more: raise system.round_timeout_s "
                    f"or system.quorum_timeout_s (or train less per round)"
                )
            log.warning(
                "round %d: %d of the %d offers needed (system.min_workers) after %.0f s; waiting for "
                "worker(s) %s (%s)%s; the run ends in %.0f s unless they offer (system.quorum_timeout_s)%s",
                k + 1,
                len(m.offers),
                need,
                open_s,
                waiting,
                ", ".join(f"{w}: {self._describe(w)}" for w in waiting),
                f"; {summary}" if summary else "",
                give_up - open_s,
                hint,
            )
            log_at = open_s + LOG_EVERY_S
        if not self._offers_closed(need):
            self.phase = PHASE_IDLE
            log.warning("round %d abandoned by the stop request before it could close", k + 1)
            return self.stop_reason, f"{self.stop_reason} after {len(m.records)} rounds (round {k + 1} abandoned)"
        for w in self._missing(m.offers):
            info = self.workers.get(w)
            if info is not None and self.is_live(info):
                info.state = "late"
                log.info("worker %d late in round %d: no offer within round_timeout_s; not selected", w, k + 1)
            elif info is not None:  # going absent was logged once, when it happened
                log.debug("worker %d absent in round %d", w, k + 1)
        return None

    async def select(self) -> List[int]:
        """Step 6 among the round's offers, and open the uploads (phase
        ``uploads``): the offers waiting for the selection get their answer.
        Returns the selected workers."""
        async with self.cond:
            self.selected = self.master.select()
            self.decided = {w: (w in self.selected) for w in self.master.offers}
            self.phase = PHASE_UPLOADS
            self.uploads_opened_at = self.clock()
            self.cond.notify_all()
        log.debug("round %d: selected %s at +%.1f ms", self.master.round + 1, self.selected, self._open_ms())
        return list(self.selected)

    async def collect_uploads(self) -> List[int]:
        """Wait for the selected live workers' uploads, at most
        ``round_timeout_s`` seconds (by the clock) after the selection.

        Returns:
            The selected workers whose upload never arrived (absent ones
            included): they count as not selected.
        """
        cfg, m = self.cfg, self.master
        await self._wait_until(
            lambda: not self._uploads_awaited() or self.clock() - self.uploads_opened_at >= cfg.round_timeout_s
        )
        missing = [w for w in self.selected if w not in m.received]
        if missing:
            log.warning("round %d: uploads from %s never arrived; counted as not selected", m.round + 1, missing)
        return missing

    async def close_round(self) -> Dict[str, Any]:
        """Steps 8-10 (in a thread: aggregation and evaluation take time),
        then the ``on_round`` callback (in a thread); phase ``idle`` again.

        Returns:
            The round's record.

        Raises:
            Diverged: the round diverged; it is recorded first.
        """
        m = self.master
        self.phase = PHASE_CLOSING
        log.debug("round %d: closing at +%.1f ms", m.round + 1, self._open_ms())
        record = await asyncio.to_thread(m.end_round)  # Diverged: recorded, then the run stops
        record.update(round_timings(m.stopwatch))
        self.phase = PHASE_IDLE
        log_round(record)
        if self.on_round is not None:
            await asyncio.to_thread(self.on_round, record)
        return record

    def _open_ms(self) -> float:
        """Milliseconds since the open round opened (by the clock), for the debug log."""
        return 1e3 * (self.clock() - self.round_opened_at)

    def _round_late(self) -> bool:
        """round_timeout_s has passed (by the clock) since the open round opened."""
        return self.clock() - self.round_opened_at >= self.cfg.round_timeout_s

    def _offers_closed(self, need: int) -> bool:
        offered = set(self.master.offers)
        if len(offered) < need:
            return False
        return self._round_late() or set(self.connected) <= offered

    def _uploads_awaited(self) -> List[int]:
        live = set(self.connected)
        return [w for w in self.selected if w not in self.master.received and w in live and w not in self.lost_uploads]

    def _stop_now(self, need: int) -> bool:
        """A stop was requested and the open round cannot close: its live
        workers have all offered and are too few, or round_timeout_s passed."""
        if not self.stop_requested:
            return False
        offered = set(self.master.offers)
        pending = [w for w in self.connected if w not in offered]
        return self._round_late() or len(offered) + len(pending) < need or not pending

    def _describe(self, worker_id: int) -> str:
        """One worker as a "still waiting" line shows it: its state, what it
        last reported doing (a training's batches) and when it was last heard from."""
        info = self.workers.get(worker_id)
        if info is None:
            return "never registered"
        now = self.clock()
        seen = f"last seen {now - info.last_seen:.0f} s ago"
        p = info.progress
        if p is None or not self.is_live(info):
            return f"{self.shown_state(info)}, {seen}"
        of_round = "" if p.round == self.master.round else f" of round {p.round + 1}"
        if p.phase == "waiting":
            doing = f"waiting for the model for {p.seconds:.0f} s"
        elif p.phase == "training":
            doing = f"training{of_round} {p.done}/{p.total} batches in {p.seconds:.0f} s"
        else:
            doing = f"{p.phase}{of_round} for {p.seconds:.0f} s"
        return f"{doing}, {seen}"

    def _silent(self, info: WorkerInfo) -> bool:
        """Live, but not heard from for two heartbeats: it may be hung (or its network)."""
        return self.is_live(info) and self.clock() - info.last_seen > 2 * self.heartbeat_s

    def progress_summary(self, workers: List[int]) -> Tuple[str, float]:
        """What ``workers`` are doing, by their progress reports, in a few
        words (``3 training (batches 120/469, 98/469, 130/469; ~310 s more at
        this pace), 1 silent for 40 s``; '' when none reported any), and the
        seconds the slowest training among them still needs at its pace so
        far (0 when unknown)."""
        now, k = self.clock(), self.master.round
        training: List[str] = []
        other: Dict[str, int] = {}
        silent: List[float] = []
        more_s, reported = 0.0, False
        for w in workers:
            info = self.workers.get(w)
            if info is None or not self.is_live(info):
                continue
            if self._silent(info):
                silent.append(now - info.last_seen)
                continue
            p = info.progress
            if p is None:
                continue
            reported = True
            if p.phase == "training" and p.round == k:
                training.append(f"{p.done}/{p.total}")
                if p.done:
                    more_s = max(more_s, p.seconds * (p.total - p.done) / p.done - (now - info.progress_at))
            else:
                if p.phase == "waiting":
                    label = "waiting for the model"
                else:
                    label = p.phase if p.round == k else f"still in round {p.round + 1}"
                other[label] = other.get(label, 0) + 1
        if not reported and not silent:
            return "", 0.0
        parts = []
        if training:
            pace = f"; ~{more_s:.0f} s more at this pace" if more_s > 0 else ""
            parts.append(f"{len(training)} training (batches {', '.join(training)}{pace})")
        parts += [f"{n} {label}" for label, n in other.items()]
        if silent:
            parts.append(f"{len(silent)} silent for {max(silent):.0f} s")
        return ", ".join(parts), max(more_s, 0.0)

    def waiting_for(self) -> List[int]:
        """The workers the run is waiting for now: before round 1 those not
        present; in the offers phase the live ones that have not offered (and
        all that have not, while the round is short of ``min_workers``); in
        the uploads phase the selected ones whose upload has not arrived."""
        if self.state in (WAITING, STOPPING) and self.phase == PHASE_IDLE:
            return self._missing(self.connected) if self.state == WAITING else []
        if self.phase == PHASE_OFFERS:
            offered = set(self.master.offers)
            if len(offered) < self.cfg.needed_workers:
                return self._missing(offered)
            return [w for w in self.connected if w not in offered]
        if self.phase == PHASE_UPLOADS:
            return [w for w in self.selected if w not in self.master.received]
        return []

    # ----- monitoring -----------------------------------------------------
    @staticmethod
    def _progress_status(info: WorkerInfo, now: float) -> Optional[Dict[str, Any]]:
        p = info.progress
        if p is None:
            return None
        return {
            "round": round_number(p.round),
            "phase": p.phase,
            "batches_done": p.done,
            "batches_total": p.total,
            "seconds_in_phase": round(p.seconds, 1),
            "seconds_since_report": round(now - info.progress_at, 3),
        }

    def status(self) -> Dict[str, Any]:
        """The ``GET /status`` document (JSON-able; rounds 1-based, times in
        seconds, ``last_seen`` as Unix time for people to read)."""
        now, unix_now = self.clock(), time.time()  # the wall clock only to display last_seen
        m = self.master
        last = m.records[-1] if m.records else None
        last_eval = next((r for r in reversed(m.records) if r["acc"] == r["acc"]), None)
        return {
            "state": self.state,
            "phase": self.phase,
            "round": self.round_number,  # 1-based like iter: in progress (or next, or last)
            "rounds_done": len(m.records),
            "round_open_s": (
                round(now - self.round_opened_at, 3) if self.phase in (PHASE_OFFERS, PHASE_UPLOADS) else None
            ),
            "waiting_for": self.waiting_for() if self.state != FINISHED else [],
            "live_workers": len(self.connected),
            "max_rounds": self.cfg.max_rounds,
            "mode": self.cfg.mode,
            "b_up": self.cfg.uplink_bits,
            "adaptive_width": self.cfg.adaptive_width,
            "b_down": self.cfg.downlink_bits,
            "entropy_coding": self.cfg.entropy_coding,
            "total_workers": self.cfg.total_workers,
            "min_workers": self.cfg.needed_workers,
            "timeouts_s": {
                "round": self.cfg.round_timeout_s,
                "worker": self.cfg.worker_timeout_s,
                "start": self.cfg.start_timeout_s,
                "quorum": self.cfg.quorum_timeout_s,
                "heartbeat": self.heartbeat_s,
            },
            "workers": [
                {
                    "worker_id": w.worker_id,
                    "state": self.shown_state(w),
                    "last_seen": unix_now - (now - w.last_seen),
                    "seconds_since_seen": round(now - w.last_seen, 3),
                    "rounds_offered": w.rounds_offered,
                    "rounds_uploaded": w.rounds_uploaded,
                    "address": w.address,
                    "threads": w.threads,
                    "device": w.device,
                    "progress": self._progress_status(w, now),
                }
                for w in sorted(self.workers.values(), key=lambda w: w.worker_id)
            ],
            "last_metrics": _jsonable(last),
            "last_evaluation": _jsonable(last_eval),
            "bits": {
                "up_cum": m.bits_up_cum,
                "down_cum": m.bits_down_cum,
                "total_cum": m.bits_up_cum + m.bits_down_cum,
            },
            "wire_bytes": {"up_cum": m.wire_up_cum, "down_cum": m.wire_down_cum},
            "stop_requested": self.stop_requested,
            "finish_reason": self.finish_reason,
            "finish_detail": self.finish_detail,
            "checkpoint_error": self.checkpoint_error,
        }


def _jsonable(record: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    if record is None:
        return None
    out = {}
    for k, v in record.items():
        if isinstance(v, float) and not math.isfinite(v):  # JSON has no NaN or Inf (a diverged round's loss)
            v = None
        out[k] = v
    return out
