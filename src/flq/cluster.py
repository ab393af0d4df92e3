"""The round protocol of the real cluster, without HTTP (SYSTEM.md, "Master
HTTP API").

:class:`ClusterMaster` wraps a :class:`~flq.master.Master` with what a
network adds: registration, rounds that open when ``min_workers`` have
registered, offers that close when every connected worker has offered or
``round_timeout_s`` after the round opened once ``min_workers`` have, uploads
only from the selected, late or absent workers counted as not selected,
mirror versions checked on every offer, and a stop that takes effect after
the current round. Its coroutines wait on asyncio conditions; the HTTP layer
(:mod:`flq.transport.server`) only maps requests onto them.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from .config import Config
from .master import Master, MasterError
from .messages import Offer

log = logging.getLogger(__name__)

WAITING, TRAINING, STOPPING, FINISHED = "waiting", "training", "stopping", "finished"
PHASE_IDLE, PHASE_OFFERS, PHASE_UPLOADS, PHASE_CLOSING = "idle", "offers", "uploads", "closing"


class RunFinished(Exception):
    """The run is over: the worker should exit."""


@dataclass
class WorkerInfo:
    """What the master knows of one worker's connection."""

    worker_id: int
    registered_at: float
    last_seen: float
    state: str = "registered"  # registered | training | offered | uploading | idle | absent
    rounds_offered: int = 0
    rounds_uploaded: int = 0
    address: str = ""
    session: str = ""


@dataclass
class RoundView:
    """The open round as a worker sees it."""

    round: int
    me_k: float
    payload: bytes
    down_version: int


class ClusterMaster:
    """Drives a :class:`Master` through rounds for workers on the network.

    Args:
        master: the algorithm's master object.
        cfg: configuration (``min_workers``, ``round_timeout_s``, ``max_rounds``).
        on_round: called (in a thread) after each round with its record.
        on_finish: called (in a thread) once when the run ends, with the reason.
        clock: time source in seconds (tests may replace it).
    """

    def __init__(self, master: Master, cfg: Config, on_round: Optional[Callable[[Dict[str, Any]], None]] = None,
                 on_finish: Optional[Callable[[str], None]] = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.master = master
        self.cfg = cfg
        self.on_round = on_round
        self.on_finish = on_finish
        self.clock = clock
        self.workers: Dict[int, WorkerInfo] = {}
        self.state = WAITING
        self.phase = PHASE_IDLE
        self.stop_requested = False
        self.finish_reason = ""
        self.round_opened_at = 0.0
        self.selected: List[int] = []
        self.decided: Dict[int, bool] = {}
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

    def _seen(self, worker_id: int, state: Optional[str] = None, session: Optional[str] = None) -> WorkerInfo:
        info = self.workers.get(worker_id)
        if info is None:
            raise MasterError(f"worker {worker_id} is not registered", 404)
        if session is not None and session != info.session:
            raise MasterError(f"worker {worker_id} session replaced: another process registered with this id", 409)
        info.last_seen = self.clock()
        if state:
            info.state = state
        return info

    @property
    def connected(self) -> List[int]:
        """Registered workers not marked absent."""
        return sorted(m for m, w in self.workers.items() if w.state != "absent")

    # ----- worker calls ---------------------------------------------------
    async def register(self, worker_id: int, up_version: int, down_version: int, address: str = "") -> Dict[str, Any]:
        """Register (or re-register) worker m.

        The newest registration of an id wins: calls that carry an older
        session are refused (409 "session replaced"), so two processes with
        one id never both train. A worker that re-registers may fetch the open
        round's model again.

        Returns:
            ``{"resync": bool, "round": k, "state": ..., "session": ...}``;
            resync is True when the worker's mirror versions differ from the
            master's.

        Raises:
            MasterError: unknown id (404); RunFinished when the run is over.
        """
        self.master.check_worker(worker_id)
        if self.state == FINISHED:
            raise RunFinished()
        now = self.clock()
        info = self.workers.get(worker_id)
        if info is None:
            info = self.workers[worker_id] = WorkerInfo(worker_id, now, now, address=address)
            log.info("worker %d registered from %s (%d/%d)", worker_id, address or "?", len(self.workers),
                     self.cfg.total_workers)
        else:
            info.last_seen, info.state, info.address = now, "registered", address or info.address
            log.info("worker %d registered again from %s", worker_id, address or "?")
            if self.phase == PHASE_OFFERS:
                self.master.forget_downlink(worker_id)
        info.session = secrets.token_hex(8)
        resync = (up_version, down_version) != (self.master.up_version[worker_id],
                                                 self.master.down_version[worker_id])
        await self._notify()
        return {"resync": resync, "round": self.master.round, "state": self.state, "session": info.session}

    def mirrors(self, worker_id: int, session: Optional[str] = None) -> Tuple[Any, Any, int, int]:
        """The master's ``ref_up[m]``, ``ref_down[m]`` and their versions (for a
        resync); the worker may then fetch the open round's model again."""
        self._seen(worker_id, session=session)
        m = self.master
        if self.phase == PHASE_OFFERS:
            m.forget_downlink(worker_id)
        log.info("worker %d resynchronizes its mirrors (up v%d, down v%d)", worker_id, m.up_version[worker_id],
                 m.down_version[worker_id])
        return m.ref_up[worker_id], m.ref_down[worker_id], m.up_version[worker_id], m.down_version[worker_id]

    async def fetch_round(self, worker_id: int, wait_s: float, session: Optional[str] = None) -> Optional[RoundView]:
        """Wait up to ``wait_s`` for a round open to offers and return this
        worker's downlink for it (computed now; the mirror moves with it).

        Returns:
            The round, or None when none opened in time.

        Raises:
            RunFinished: the run is over.
            MasterError: unknown worker (404).
        """
        self._seen(worker_id, session=session)
        deadline = time.monotonic() + max(wait_s, 0.0)
        async with self.cond:
            while True:
                if self.state == FINISHED:
                    raise RunFinished()
                if (self.phase == PHASE_OFFERS and worker_id not in self.master.downlinked):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                try:
                    await asyncio.wait_for(self.cond.wait(), timeout=left)
                except asyncio.TimeoutError:
                    return None
            info = self._seen(worker_id, "training", session=session)
            payload = self.master.downlink(worker_id)
            info.state = "training"
            return RoundView(self.master.round, self.master.me_k, payload, self.master.down_version[worker_id])

    async def offer(self, offer: Offer, session: Optional[str] = None) -> bool:
        """Record an offer and wait for the selection; True when selected.

        Raises:
            MasterError: late (409), mirror mismatch (409), malformed (400).
            RunFinished: the run is over.
        """
        m = offer.worker_id
        info = self._seen(m, session=session)
        if self.state == FINISHED:
            raise RunFinished()
        if self.phase != PHASE_OFFERS or offer.round != self.master.round:
            raise MasterError(f"offer for round {offer.round} is late (round {self.master.round}, phase "
                              f"{self.phase})", 409)
        self.master.add_offer(offer)
        info.state, info.rounds_offered = "offered", info.rounds_offered + 1
        await self._notify()
        async with self.cond:
            while offer.round == self.master.round and m not in self.decided and self.state != FINISHED:
                await self.cond.wait()
        selected = self.decided.get(m, False) if offer.round == self.master.round else False
        info.state = "uploading" if selected else "idle"
        return selected

    async def upload(self, worker_id: int, round_index: int, payload: bytes, session: Optional[str] = None) -> None:
        """Accept a selected worker's payload for round k.

        Raises:
            MasterError: wrong round or phase (409), not selected (409),
                duplicate (409), malformed payload (400); state unchanged.
        """
        info = self._seen(worker_id, session=session)
        if self.phase != PHASE_UPLOADS or round_index != self.master.round:
            raise MasterError(f"upload for round {round_index} is late (round {self.master.round}, phase "
                              f"{self.phase})", 409)
        self.master.receive_upload(worker_id, payload)
        info.state, info.rounds_uploaded = "idle", info.rounds_uploaded + 1
        await self._notify()

    def request_stop(self) -> None:
        """Stop after the current round (SYSTEM.md, ``POST /stop``)."""
        if self.state not in (FINISHED,):
            self.stop_requested = True
            if self.state == WAITING:
                self.state = STOPPING
            log.info("stop requested at round %d", self.master.round)

    # ----- the round loop -------------------------------------------------
    async def _wait_until(self, predicate: Callable[[], bool], deadline: Optional[float] = None) -> bool:
        """Wait until predicate() (re-checked every notify and at least every 0.2 s)."""
        async with self.cond:
            while not predicate():
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                timeout = 0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic()))
                try:
                    await asyncio.wait_for(self.cond.wait(), timeout=timeout)
                except asyncio.TimeoutError:
                    pass
        return True

    async def run(self) -> None:
        """Rounds until ``max_rounds`` or a stop; then the finish callback."""
        cfg = self.cfg
        need = cfg.needed_workers
        log.info("waiting for %d of %d workers (system.min_workers)", need, cfg.total_workers)
        while not await self._wait_until(lambda: len(self.connected) >= need or self.stop_requested,
                                         time.monotonic() + 15):
            log.info("still waiting: %d of the %d workers needed have registered (%s); start the others or "
                     "lower system.min_workers", len(self.connected), need, self.connected or "none")
        if not self.stop_requested:
            self.state = TRAINING
        timeout = cfg.round_timeout_s
        while not self.master.finished and not self.stop_requested:
            # step 1 and open the round to offers
            async with self.cond:
                self.master.begin_round()
                self.decided = {}
                self.selected = []
                self.phase = PHASE_OFFERS
                self.round_opened_at = time.monotonic()
                self.cond.notify_all()
            k = self.master.round
            log.debug("round %d open (me_k %.6g)", k + 1, self.master.me_k)

            def offers_closed() -> bool:
                offered = set(self.master.offers)
                if offered and offered >= set(self.connected):
                    return True
                late = time.monotonic() - self.round_opened_at >= timeout
                return late and len(offered) >= need

            while not await self._wait_until(lambda: offers_closed() or self.stop_requested,
                                             time.monotonic() + timeout + 15):
                log.warning("round %d: %d offer(s) after %.0f s, %d needed (system.min_workers); still waiting "
                            "(POST /stop ends the run)", k + 1, len(self.master.offers),
                            time.monotonic() - self.round_opened_at, need)
            if not offers_closed():  # stopped while the round could not close: abandon it
                log.warning("round %d abandoned by the stop request before it closed", k + 1)
                break
            # absent: connected workers that did not offer in time
            for m in self.connected:
                if m not in self.master.offers:
                    self.workers[m].state = "absent"
                    log.warning("worker %d absent in round %d", m, k + 1)
            async with self.cond:
                self.selected = self.master.select()
                self.decided = {m: (m in self.selected) for m in self.master.offers}
                self.phase = PHASE_UPLOADS
                self.cond.notify_all()
            upload_deadline = time.monotonic() + timeout
            done = await self._wait_until(lambda: set(self.master.received) >= set(self.selected), upload_deadline)
            if not done:
                missing = sorted(set(self.selected) - set(self.master.received))
                log.warning("round %d: uploads from %s never arrived; counted as not selected", k + 1, missing)
            self.phase = PHASE_CLOSING
            record = await asyncio.to_thread(self.master.end_round)
            record.update({f"master_{name}_s": sec for name, sec in self.master.stopwatch.take().items()})
            self.phase = PHASE_IDLE
            log.info("round %d: loss %.4f acc %.4f entropy %.4f selected %d/%d bits %d wire up %d down %d B "
                     "(%.2f s)", record["iter"], record["loss"], record["acc"], record["entropy"], record["selcnt"],
                     record["offers"], record["cum_bits_total"], record["wire_bytes_up"],
                     record["wire_bytes_down"], record["round_time_s"])
            if self.on_round is not None:
                await asyncio.to_thread(self.on_round, record)
        reason = "stopped" if self.stop_requested and not self.master.finished else "completed"
        self.finish_reason = reason
        if self.on_finish is not None:
            await asyncio.to_thread(self.on_finish, reason)
        async with self.cond:
            self.state = FINISHED
            self.phase = PHASE_IDLE
            self.cond.notify_all()
        log.info("run %s after %d rounds", reason, self.master.round)

    # ----- monitoring -----------------------------------------------------
    def status(self) -> Dict[str, Any]:
        """The ``GET /status`` document (JSON-able)."""
        now = self.clock()
        m = self.master
        last = m.records[-1] if m.records else None
        last_eval = next((r for r in reversed(m.records) if r["acc"] == r["acc"]), None)
        return {
            "state": self.state,
            "phase": self.phase,
            "round": m.round + 1,  # 1-based, like iter: the round in progress (or next)
            "rounds_done": len(m.records),
            "waiting_for": (max(0, self.cfg.needed_workers - len(self.connected)) if self.state == WAITING else 0),
            "max_rounds": self.cfg.max_rounds,
            "mode": self.cfg.mode,
            "b_up": self.cfg.uplink_bits,
            "b_down": self.cfg.downlink_bits,
            "total_workers": self.cfg.total_workers,
            "min_workers": self.cfg.needed_workers,
            "workers": [
                {"worker_id": w.worker_id, "state": w.state, "last_seen": w.last_seen,
                 "seconds_since_seen": round(now - w.last_seen, 3), "rounds_offered": w.rounds_offered,
                 "rounds_uploaded": w.rounds_uploaded, "address": w.address}
                for w in sorted(self.workers.values(), key=lambda w: w.worker_id)
            ],
            "last_metrics": _jsonable(last),
            "last_evaluation": _jsonable(last_eval),
            "bits": {"up_cum": m.bits_up_cum, "down_cum": m.bits_down_cum,
                     "total_cum": m.bits_up_cum + m.bits_down_cum},
            "wire_bytes": {"up_cum": m.wire_up_cum, "down_cum": m.wire_down_cum},
            "stop_requested": self.stop_requested,
            "finish_reason": self.finish_reason,
        }


def _jsonable(record: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    if record is None:
        return None
    out = {}
    for k, v in record.items():
        if isinstance(v, float) and v != v:
            v = None
        out[k] = v
    return out
