"""The master's side of an FLQ round (docs/algorithm.md, "State" and "One round").

:class:`Master` holds the global model ``theta``, its Adam optimizer, the
history of model changes, and per worker the mirrors ``ref_up[m]`` and
``ref_down[m]`` with their versions. A round is a sequence of phases, one
method each, which the simulator calls directly and the HTTP master calls
from its request handlers:

1. :meth:`Master.begin_round` -> ``me_k`` (step 1);
2. :meth:`Master.downlink` -> bytes for worker m (step 2);
3. :meth:`Master.select` with the offers -> the ids that upload (step 6);
4. :meth:`Master.receive_upload` for each selected worker (step 7);
5. :meth:`Master.end_round` -> the round's record (steps 8-10).

Every phase is idempotent for a message sent twice (a network retry): the
same worker asking for the round's model again gets the same bytes, the same
offer or upload again is accepted once and counted once. Nothing here knows
about HTTP. Bad input raises :class:`MasterError` before any state changes;
a round whose step would make the model or Adam's state non-finite, or whose
workers report a non-finite loss, is recorded and then raises
:class:`~flq.outcome.Diverged`.

Why one module of this size: one method per phase of the round and their
checkpoint state, each with the refusals it documents; about half of it is
docstrings.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .algorithm import compressors, packing
from .algorithm.aggregation import MAX_UPDATE_MAGNITUDE, Adam, aggregate
from .algorithm.lazy import history_energy
from .algorithm.selection import Candidate, select
from .algorithm.vector import squared_norm
from .config import Config
from .evaluation import BackgroundEvaluator, Evaluator
from .layout import LayoutError, ModelLayout
from .messages import Offer
from .outcome import Diverged
from .protocol import Code
from .streams import STREAM_DOWNLINK, stream_rng
from .timing import NullStopwatch, Stopwatch

log = logging.getLogger(__name__)


class MasterError(ValueError):
    """A message the master refuses (one-line reason); its state is unchanged.

    Attributes:
        code: what went wrong, for a program to act on: a
            :class:`~flq.protocol.Code` (``malformed``, ``unknown_worker``,
            ``late``, ``mirror_mismatch``, ``conflict`` ...).
        status: the code's status (400 malformed, 404 unknown worker, 409
            conflict with the round), which the transport answers with.
    """

    def __init__(self, message: str, code: Code) -> None:
        super().__init__(message)
        self.code = code

    @property
    def status(self) -> int:
        return self.code.status


class Master:
    """The FLQ master.

    Args:
        cfg: run configuration.
        segments: the model's :class:`~flq.layout.ModelLayout`, or just the
            element count of each parameter tensor (model order; no buffers).
        theta0: the initial global model's parameters, float32 (n,).
        buffers0: its buffers (arrays in ``state_dict()`` order and dtypes).
        evaluate: test-set evaluator, or None to record NaN.
        stopwatch: where to account seconds ("quantize", "aggregate",
            "evaluate"; "evaluate_wait" with ``overlap``: a round waiting
            for a free slot in the evaluation queue).
        overlap: evaluate in a background thread while the next round
            trains (:class:`~flq.evaluation.BackgroundEvaluator`); each
            record's ``acc``, ``entropy`` and ``master_evaluate_s`` are
            filled in when its evaluation ends. :meth:`finish_evaluations`
            waits for them; :meth:`state_dict` does so itself.
    """

    def __init__(
        self,
        cfg: Config,
        segments: Union[Sequence[int], ModelLayout],
        theta0: np.ndarray,
        evaluate: Optional[Evaluator] = None,
        stopwatch: Optional[Stopwatch] = None,
        overlap: bool = False,
        buffers0: Sequence[np.ndarray] = (),
    ) -> None:
        self.cfg = cfg
        self.stopwatch = stopwatch or NullStopwatch()
        self.layout = segments if isinstance(segments, ModelLayout) else ModelLayout.flat(segments)
        self.segments = self.layout.segments
        self.n = self.layout.n
        if theta0.shape != (self.n,):
            raise ValueError(f"theta0 has shape {theta0.shape}, expected ({self.n},)")
        self.theta = np.array(theta0, np.float32, copy=True)
        self.layout.check_buffers(buffers0)
        #: the global model's buffers (never changed in place: each round publishes new ones)
        self.buffers: Tuple[np.ndarray, ...] = tuple(np.array(b, copy=True) for b in buffers0)
        #: buffers travel raw with every model and upload (``buffers average``)
        self.sends_buffers = cfg.buffers == "average" and self.layout.buffer_bytes > 0
        self.buffer_bits = 8 * self.layout.buffer_bytes if self.sends_buffers else 0
        #: held while ``theta`` and ``round`` change together (see :meth:`snapshot`)
        self._published = threading.Lock()
        self.adam = Adam(self.n, cfg.lr)
        self.evaluate = evaluate
        self.background = BackgroundEvaluator(evaluate) if overlap and evaluate is not None else None
        M = cfg.total_workers
        self.history: collections.deque = collections.deque(maxlen=max(cfg.D, 1))
        self.ref_up = [np.zeros(self.n, np.float32) for _ in range(M)]
        self.ref_down = [np.zeros(self.n, np.float32) for _ in range(M)]
        self.up_version = [0] * M
        self.down_version = [0] * M
        self.up_scheme = compressors.uplink(cfg.mode)
        self.down_scheme = compressors.downlink(cfg.b_down)
        self.down_rng = [stream_rng(cfg.seed, m, STREAM_DOWNLINK) for m in range(M)]
        self.round = 0  # k of the round in progress (or next to start)
        self.bits_up_cum = 0  # real: what the uploads were charged (packing.charged_bits)
        self.bits_down_cum = 0
        self.bits_up_nominal_cum = 0  # b n per upload, the original's count
        self.bits_down_nominal_cum = 0
        self.wire_up_cum = 0
        self.wire_down_cum = 0
        self.records: List[Dict[str, Any]] = []
        self.selected_history: List[List[int]] = []
        #: per round done: ``{"candidates": int, "selected": [[worker, cost in bits], ...]}``, the budget
        #: selection of step 6 (selection order) with each offer's cost; ``selected_history`` says whose
        #: upload then arrived (a selected worker's cost is what its upload was charged)
        self.selection_history: List[Dict[str, Any]] = []
        self._warned_nothing_fits = False
        self._reset_round()
        if cfg.adaptive_width and cfg.sel_clients + (cfg.up_budget_bits == 0) > 0:
            log.warning(
                "flq_algorithm.adaptive_width has no budget to weigh bits against (sel_clients set or "
                "up_budget_bits 0): every upload is sent at b_up = %d bits",
                cfg.b_up,
            )
        if cfg.sel_clients == 0 and not cfg.coding_up and 0 < cfg.up_budget_bits < self.upload_cost:
            log.warning(
                "budget_selection.up_budget_bits %.4g is smaller than one upload (%d bits in mode %s): no "
                "worker can ever be selected and the model will not train; raise it, or set 0 (no budget) "
                "or sel_clients",
                cfg.up_budget_bits,
                self.upload_cost,
                cfg.mode,
            )

    def _reset_round(self) -> None:
        self.me_k = 0.0
        self.downlinks: Dict[int, bytes] = {}
        self.offers: Dict[int, Offer] = {}
        self.selected: List[int] = []
        self.selection_made = False
        self.received: Dict[int, np.ndarray] = {}
        self.received_digest: Dict[int, str] = {}
        self.received_bits: Dict[int, Tuple[int, int, int]] = {}  # m -> (charged, nominal b n + buffers, b)
        self.received_buffers: Dict[int, Tuple[np.ndarray, ...]] = {}
        self.wire_up = 0
        self.wire_down = 0
        self.round_started = time.perf_counter()

    # ----- step 1 -------------------------------------------------------
    def begin_round(self) -> float:
        """Start round ``self.round``; return ``me_k`` (step 1)."""
        self._reset_round()
        D = self.cfg.D
        recent = list(self.history)[: min(self.round, D)] if D > 0 else []
        self.me_k = history_energy(recent, self.cfg.ck)
        return self.me_k

    # ----- step 2 -------------------------------------------------------
    @property
    def downlinked(self) -> set:
        """Workers that have been given this round's model."""
        return set(self.downlinks)

    def downlink(self, worker_id: int) -> bytes:
        """The encoded model for worker m this round; updates ``ref_down[m]``.

        Exact float32 ``theta`` when ``b_down`` is 0 or 32, else
        ``Q_{b_down}(theta - ref_down[m])`` (both ends then set
        ``ref_down[m] = ref_down[m] + Q(...)``); with ``buffers average``
        preceded by the global buffers, raw (:mod:`flq.layout`). Asked again in the same round
        (a retried download), it returns the same bytes: the mirror moves and
        the bits are counted once.

        Raises:
            MasterError: unknown worker.
        """
        self.check_worker(worker_id)
        if worker_id in self.downlinks:
            return self.downlinks[worker_id]
        bits = self.cfg.downlink_bits
        scheme = self.down_scheme
        with self.stopwatch.section("quantize"):
            qv, w = scheme.encode_update(
                self.theta, self.ref_down[worker_id], bits, self.down_rng[worker_id], self.segments
            )
            packed = packing.encode(qv, coded=self.cfg.coding_down)
            if scheme.relative:
                self.ref_down[worker_id] = w
                self.down_version[worker_id] += 1
        payload = self.layout.pack_buffers(self.buffers) + packed if self.sends_buffers else packed
        self.downlinks[worker_id] = payload
        self.bits_down_cum += packing.charged_bits(packed) + self.buffer_bits
        self.bits_down_nominal_cum += bits * self.n + self.buffer_bits
        self.wire_down += len(payload)
        return payload

    def forget_downlink(self, worker_id: int) -> None:
        """Worker m lost this round's model before offering (it restarted or
        resynchronized its mirrors): its next downlink is computed afresh
        against ``ref_down[m]`` as it is now."""
        if worker_id not in self.offers:
            self.downlinks.pop(worker_id, None)

    # ----- step 6 -------------------------------------------------------
    def add_offer(self, offer: Offer) -> bool:
        """Record worker m's offer for this round (steps 4-5).

        A non-finite ``loss`` is accepted from a worker that is not a
        candidate: its model diverged, which :meth:`end_round` reports.

        Returns:
            True when recorded, False when this very offer was already
            recorded (a retry; nothing changes).

        Raises:
            MasterError: unknown worker, wrong round, no downlink received,
                a different second offer, a non-finite gain or cost, a
                candidate with a non-finite loss, or a mirror version that
                disagrees with the master's (the worker must resync).
        """
        m = offer.worker_id
        self.check_worker(m)
        if offer.round != self.round:
            raise MasterError(
                f"offer for round {offer.round + 1}, but round {self.round + 1} is open",
                Code.LATE if offer.round < self.round else Code.NOT_OPEN,
            )
        if m not in self.downlinks:
            raise MasterError(f"worker {m} offered without receiving round {self.round + 1}'s model", Code.CONFLICT)
        if m in self.offers:
            if _same(self.offers[m], offer):
                return False
            raise MasterError(f"worker {m} already made a different offer in round {self.round + 1}", Code.CONFLICT)
        if self.selection_made:
            raise MasterError(f"offer for round {self.round + 1} is late: the selection is made", Code.LATE)
        if not (math.isfinite(offer.gain) and math.isfinite(offer.cost)) or offer.cost <= 0:
            raise MasterError("offer has a non-finite gain or cost, or a cost <= 0", Code.MALFORMED)
        if offer.candidate and not math.isfinite(offer.loss):
            raise MasterError("offer is a candidate with a non-finite loss", Code.MALFORMED)
        problem = self._cost_problem(offer.cost) if offer.candidate else ""  # a non-candidate is never charged
        if problem:
            raise MasterError(f"offer cost {offer.cost:g} bits: {problem}", Code.MALFORMED)
        if (offer.up_version, offer.down_version) != (self.up_version[m], self.down_version[m]):
            raise MasterError(
                f"worker {m} mirror versions (up {offer.up_version}, down {offer.down_version}) "
                f"differ from the master's (up {self.up_version[m]}, down {self.down_version[m]})",
                Code.MIRROR_MISMATCH,
            )
        self.offers[m] = offer
        return True

    def _cost_problem(self, cost: float) -> str:
        """Why ``cost`` cannot be what an upload of this run is charged ('' if it can)."""
        cfg = self.cfg
        if not cfg.coding_up:
            nominal = [b * self.n + self.buffer_bits for b in cfg.uplink_widths]
            return "" if cost in nominal else f"expected one of {nominal} for mode {cfg.mode}"
        most = 8 * (self.max_upload_bytes - packing.header_size(max(cfg.uplink_widths), len(self._up_segments)))
        least = 8 + self.buffer_bits
        if cost != int(cost) or int(cost) % 8 or not least <= cost <= most:
            return f"a coded upload is charged a whole number of bytes, {least}..{most} bits"
        return ""

    @property
    def _up_segments(self) -> Tuple[int, ...]:
        return self.up_scheme.segments(self.segments)

    def select(self) -> List[int]:
        """Budget selection among this round's candidate offers (step 6)."""
        cands = [Candidate(o.worker_id, o.gain, o.cost) for o in self.offers.values() if o.candidate]
        self.selected = select(cands, self.cfg.sel_clients, self.cfg.up_budget_bits)
        self.selection_made = True
        if cands and not self.selected and not self._warned_nothing_fits:
            self._warned_nothing_fits = True  # once a run: a coded run's costs are only known now
            log.warning(
                "round %d: none of the %d candidate uploads fits budget_selection.up_budget_bits %.4g (the "
                "cheapest is %d bits): nobody uploads and the model does not train; raise the budget",
                self.round + 1,
                len(cands),
                self.cfg.up_budget_bits,
                min(c.cost for c in cands),
            )
        return list(self.selected)

    # ----- step 7 -------------------------------------------------------
    def receive_upload(self, worker_id: int, payload: bytes) -> bool:
        """Decode a selected worker's upload and update ``ref_up[m]`` (step 7).

        The same bytes again (a retried upload) are accepted and change nothing.

        Returns:
            True when counted now, False for a repeat of the counted upload.

        Raises:
            MasterError: the worker was not selected, already uploaded other
                bytes, or the payload is malformed (wrong length, bits,
                element count, NaN/Inf); the master's state is then unchanged.
        """
        self.check_worker(worker_id)
        if worker_id not in self.selected:
            raise MasterError(f"worker {worker_id} was not selected in round {self.round + 1}", Code.CONFLICT)
        digest = payload_digest(payload)
        if worker_id in self.received:
            if self.received_digest[worker_id] == digest:
                return False
            raise MasterError(
                f"worker {worker_id} already uploaded other bytes in round {self.round + 1}", Code.CONFLICT
            )
        scheme, widths = self.up_scheme, self.cfg.uplink_widths
        with self.stopwatch.section("quantize"):
            try:
                raw, packed = self.layout.split(payload, self.sends_buffers)
                buffers = self.layout.unpack_buffers(raw) if raw is not None else ()
            except LayoutError as exc:
                raise MasterError(f"upload from worker {worker_id}: {exc}", Code.MALFORMED) from None
            try:
                # from the header and length: checked before decoding
                charged = packing.charged_bits(packed) + self.buffer_bits
                if charged != self.offers[worker_id].cost:
                    raise packing.PayloadError(
                        f"charged {charged} bits, its offer said {self.offers[worker_id].cost:.0f}"
                    )
                qv = packing.decode(
                    packed,
                    expected_n=self.n,
                    expected_bits=widths[0] if len(widths) == 1 else widths,
                    expected_segments=self._up_segments,
                    expected_version=packing.FORMAT_CODED if self.cfg.coding_up else packing.FORMAT_VERSION,
                )
            except packing.PayloadError as exc:
                raise MasterError(f"upload from worker {worker_id}: {exc}", Code.MALFORMED) from None
            with np.errstate(over="ignore", invalid="ignore"):  # huge scales: refused just below, no warning
                q = scheme.decode_update(qv, self.ref_up[worker_id])
            if not np.isfinite(q).all():
                raise MasterError(f"upload from worker {worker_id} decodes to non-finite values", Code.MALFORMED)
            if q.size and float(np.abs(q).max()) >= MAX_UPDATE_MAGNITUDE:
                raise MasterError(
                    f"upload from worker {worker_id} has values of magnitude >= "
                    f"{MAX_UPDATE_MAGNITUDE:g}: their squares would overflow float32 in Adam",
                    Code.MALFORMED,
                )
        if scheme.relative:
            self.ref_up[worker_id] = q
            self.up_version[worker_id] += 1
        self.received[worker_id] = q
        self.received_digest[worker_id] = digest
        self.received_bits[worker_id] = (charged, qv.bits * self.n + self.buffer_bits, qv.bits)
        self.received_buffers[worker_id] = buffers
        self.wire_up += len(payload)
        return True

    def add_wire_bytes(self, up: int = 0, down: int = 0) -> None:
        """Count transport bytes beyond the payloads (offers, headers) in this round."""
        self.wire_up += int(up)
        self.wire_down += int(down)

    # ----- steps 8-10 ---------------------------------------------------
    def end_round(self, extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """Aggregate what was received, take the Adam step, record the round.

        Selected workers whose upload never arrived count as not selected
        (their payload is simply absent from the aggregate).

        Returns:
            The round's record (docs/algorithm.md step 10 plus measured wire bytes and
            the round's wall time in seconds).

        Raises:
            Diverged: after the round is recorded, when the Adam step would
                have made the model or its moments non-finite (the step is
                then not taken) or a worker reported a non-finite loss.
        """
        cfg = self.cfg
        k = self.round
        uploaded = sorted(self.received)
        theta = self.theta.copy()  # stepped here, then published whole: self.theta is never changed in place
        problem = ""
        with self.stopwatch.section("aggregate"):
            if uploaded:
                g_hat = aggregate(self.received, cfg.scale_by_selected, cfg.sel_ref, cfg.clip_global)
                try:
                    self.adam.step(theta, g_hat)
                except FloatingPointError as exc:
                    problem = f"the aggregate of workers {uploaded}: {exc}"
            self.history.appendleft(squared_norm(theta - self.theta))
            buffers = self.buffers
            if self.sends_buffers and uploaded:
                buffers = self.layout.average_buffers([self.received_buffers[m] for m in uploaded])
        self.bits_up_cum += sum(self.received_bits[m][0] for m in uploaded)
        self.bits_up_nominal_cum += sum(self.received_bits[m][1] for m in uploaded)
        self.wire_up_cum += self.wire_up
        self.wire_down_cum += self.wire_down
        last = k + 1 == cfg.max_rounds
        acc = ent = float("nan")
        due = self.evaluate is not None and cfg.eval_every > 0 and ((k + 1) % cfg.eval_every == 0 or last)
        if due and self.background is None:
            with self.stopwatch.section("evaluate"):
                acc, ent = self.evaluate(theta, buffers)  # type: ignore[misc]
        losses = [self.offers[m].loss for m in sorted(self.offers)]  # id order: same sum whatever arrived first
        computes = [o.compute_s for o in self.offers.values()]
        record = {
            "iter": k + 1,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "acc": acc,
            "entropy": ent,
            "selcnt": len(uploaded),
            "bits_up_cum": self.bits_up_cum,
            "bits_down_cum": self.bits_down_cum,
            "cum_bits_total": self.bits_up_cum + self.bits_down_cum,
            "bits_up_nominal_cum": self.bits_up_nominal_cum,
            "bits_down_nominal_cum": self.bits_down_nominal_cum,
            "b_up_mean": (sum(self.received_bits[m][2] for m in uploaded) / len(uploaded))
            if uploaded
            else float("nan"),
            "wire_bytes_up": self.wire_up,
            "wire_bytes_down": self.wire_down,
            "wire_bytes_up_cum": self.wire_up_cum,
            "wire_bytes_down_cum": self.wire_down_cum,
            "round_time_s": time.perf_counter() - self.round_started,
            "offers": len(self.offers),
            "worker_compute_max_s": max(computes) if computes else 0.0,
        }
        if extra:
            record.update(extra)
        if due and self.background is not None:
            with self.stopwatch.section("evaluate_wait"):
                self.background.submit(record, theta, buffers)  # never changed in place: no copy
            record["round_time_s"] = time.perf_counter() - self.round_started
        self.records.append(record)
        self.selection_history.append(
            {
                "candidates": sum(1 for o in self.offers.values() if o.candidate),
                "selected": [[m, int(self.offers[m].cost)] for m in self.selected],
            }
        )
        self.selected_history.append(uploaded)
        with self._published:
            self.theta, self.buffers, self.round = theta, buffers, self.round + 1
        diverging = [m for m in sorted(self.offers) if not math.isfinite(self.offers[m].loss)]
        if diverging and not problem:
            problem = (
                f"worker(s) {diverging} report a diverged local model (non-finite loss, or an update "
                f"beyond {MAX_UPDATE_MAGNITUDE:g}; is lr {cfg.lr:g} too large?)"
            )
        if problem:
            raise Diverged(f"round {k + 1} diverged: {problem}")
        return record

    @property
    def upload_cost(self) -> int:
        """Bits one uncoded upload at ``b_up`` is charged (docs/algorithm.md,
        "Modes"), its raw buffers included."""
        return int(self.cfg.uplink_bits * self.n) + self.buffer_bits

    @property
    def max_upload_bytes(self) -> int:
        """Most bytes a valid upload body has in this run's mode (the widest width)."""
        widest = max(self.cfg.uplink_widths)
        packed = packing.encoded_size(self.n, widest, len(self._up_segments), coded=self.cfg.coding_up)
        return packed + self.buffer_bits // 8

    def snapshot(self) -> Tuple[int, np.ndarray, Tuple[np.ndarray, ...]]:
        """``(rounds done, theta, buffers)`` read together, safe from another
        thread while :meth:`end_round` runs: theta is float32 (n,), the model
        after that many rounds. They are never changed in place (each round
        publishes new arrays), so the caller may read them at leisure but
        must not modify them."""
        with self._published:
            return self.round, self.theta, self.buffers

    @property
    def finished(self) -> bool:
        """Whether ``max_rounds`` rounds are done."""
        return self.round >= self.cfg.max_rounds

    def check_model(self, worker_id: int, signature: Sequence[Sequence[Any]]) -> None:
        """Raise MasterError (409 ``model_mismatch``) unless worker m's model
        (its :meth:`~flq.layout.ModelLayout.signature`) is the master's,
        naming the first tensor that differs."""
        problem = self.layout.mismatch(signature)
        if problem:
            raise MasterError(f"worker {worker_id}'s model differs from the master's: {problem}", Code.MODEL_MISMATCH)

    def check_worker(self, worker_id: int) -> None:
        """Raise MasterError (404) unless ``worker_id`` is one of this run's ids."""
        if not isinstance(worker_id, int) or not 0 <= worker_id < self.cfg.total_workers:
            raise MasterError(f"unknown worker id {worker_id!r} (0..{self.cfg.total_workers - 1})", Code.UNKNOWN_WORKER)

    def state_digest(self, wire: bool = True) -> str:
        """SHA-256 (hex) over everything the master acts on: model, Adam
        moments and step, mirrors and their versions, downlink random
        streams, the round's offers, selection, uploads and downlinks, the
        records and bit counters (the wire-byte counters only with ``wire``).
        Two equal digests mean a request changed nothing. Costs a pass over
        ``(3 + 2 M) n`` floats (about 0.1 s for the default model and M = 20)."""
        h = hashlib.sha256()
        for a in (self.theta, *self.buffers, self.adam.m, self.adam.v, *self.ref_up, *self.ref_down):
            h.update(np.ascontiguousarray(a).tobytes())
        facts = {
            "t": self.adam.t,
            "round": self.round,
            "up": self.up_version,
            "down": self.down_version,
            "rng": [g.bit_generator.state for g in self.down_rng],
            "records": len(self.records),
            "offers": {m: o.to_dict() for m, o in sorted(self.offers.items())},
            "received": sorted(self.received_digest.items()),
            "selected": self.selected,
            "selection_made": self.selection_made,
            "downlinked": sorted(self.downlinked),
            "bits": [self.bits_up_cum, self.bits_down_cum, self.bits_up_nominal_cum, self.bits_down_nominal_cum],
            "wire": [self.wire_up, self.wire_down, self.wire_up_cum, self.wire_down_cum] if wire else None,
        }
        h.update(json.dumps(facts, sort_keys=True, default=str).encode())
        return h.hexdigest()

    def finish_evaluations(self, raise_error: bool = True) -> float:
        """Wait for the evaluations still running in the background (with
        ``overlap``; at most one evaluation's time), so that every record
        has its accuracy; return the seconds waited.

        Raises:
            flq.evaluation.EvaluationFailed: one of them failed (unless ``raise_error`` is False).
        """
        return self.background.drain(raise_error) if self.background is not None else 0.0

    # ----- checkpointing ------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume between rounds (arrays are copies),
        the pending evaluations finished first."""
        self.finish_evaluations(raise_error=False)
        return {
            "round": self.round,
            "theta": self.theta.copy(),
            "buffers": [b.copy() for b in self.buffers],
            "adam": self.adam.state_dict(),
            "history": list(self.history),
            "ref_up": [r.copy() for r in self.ref_up],
            "ref_down": [r.copy() for r in self.ref_down],
            "up_version": list(self.up_version),
            "down_version": list(self.down_version),
            "down_rng": [g.bit_generator.state for g in self.down_rng],
            "bits_up_cum": self.bits_up_cum,
            "bits_down_cum": self.bits_down_cum,
            "bits_up_nominal_cum": self.bits_up_nominal_cum,
            "bits_down_nominal_cum": self.bits_down_nominal_cum,
            "wire_up_cum": self.wire_up_cum,
            "wire_down_cum": self.wire_down_cum,
            "records": [dict(r) for r in self.records],
            "selected_history": [list(s) for s in self.selected_history],
            "selection_history": [dict(s) for s in self.selection_history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.round = int(state["round"])
        self.theta = np.array(state["theta"], np.float32, copy=True)
        if self.layout.buffers:
            buffers = tuple(np.array(b, copy=True) for b in state["buffers"])
            self.layout.check_buffers(buffers)
            self.buffers = buffers
        self.adam.load_state_dict(state["adam"])
        self.history.clear()
        self.history.extend(state["history"])
        self.ref_up = [np.array(r, np.float32, copy=True) for r in state["ref_up"]]
        self.ref_down = [np.array(r, np.float32, copy=True) for r in state["ref_down"]]
        self.up_version = [int(v) for v in state["up_version"]]
        self.down_version = [int(v) for v in state["down_version"]]
        for g, s in zip(self.down_rng, state["down_rng"]):
            g.bit_generator.state = s
        self.bits_up_cum, self.bits_down_cum = int(state["bits_up_cum"]), int(state["bits_down_cum"])
        # a checkpoint from before the nominal counts: its runs were uncoded, nominal = charged
        self.bits_up_nominal_cum = int(state.get("bits_up_nominal_cum", self.bits_up_cum))
        self.bits_down_nominal_cum = int(state.get("bits_down_nominal_cum", self.bits_down_cum))
        self.wire_up_cum, self.wire_down_cum = int(state["wire_up_cum"]), int(state["wire_down_cum"])
        self.records = [dict(r) for r in state["records"]]
        self.selected_history = [list(s) for s in state["selected_history"]]
        # a checkpoint from before the selection history: its rounds show no selection
        empty = [{"candidates": 0, "selected": []}] * len(self.selected_history)
        self.selection_history = [dict(s) for s in state.get("selection_history", empty)]
        self._reset_round()


def payload_digest(payload: bytes) -> str:
    """SHA-256 of an encoded vector: how a repeated upload is recognised."""
    return hashlib.sha256(payload).hexdigest()


def _same(a: Offer, b: Offer) -> bool:
    """Whether two offers are the same message (NaN losses compare equal)."""
    return json.dumps(a.to_dict(), sort_keys=True) == json.dumps(b.to_dict(), sort_keys=True)
