"""The worker's side of an FLQ round (docs/algorithm.md, "State" and "One round").

A :class:`Worker` keeps its halves of the mirrors (``ref_up``, ``ref_down``),
its error-feedback residual ``ef``, the last committed quantization error
``e_hat`` and the lazy clock. One round is three calls:

1. :meth:`Worker.offer` takes the round's downlink bytes (step 2), computes
   the local update (step 3), quantizes it and applies the lazy rule (step 4)
   and returns an :class:`~flq.messages.Offer` (step 5);
2. if the master selects it, :meth:`Worker.upload` returns the payload bytes
   and commits (step 7); otherwise :meth:`Worker.skip` (step 8).

No I/O here: the simulator calls these methods directly and the HTTP worker
client carries their inputs and outputs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .algorithm import compressors, packing
from .algorithm.aggregation import MAX_UPDATE_MAGNITUDE, usable_update
from .algorithm.lazy import is_candidate, next_clock
from .algorithm.vector import squared_norm
from .algorithm.width import budget_share, choose_width, width_score
from .config import Config
from .datasets import labels_digest
from .layout import LayoutError
from .loader import BatchLoader
from .messages import Offer, Progress
from .model import FlatModel, l2_loss_and_grad
from .partition import BatchStream
from .streams import STREAM_UPLINK, stream_rng
from .timing import NullStopwatch, Stopwatch

log = logging.getLogger(__name__)


class ProtocolError(ValueError):
    """A message that does not fit this worker's state (one-line reason)."""


class ProgressTracker:
    """What a worker is doing now (:class:`~flq.messages.Progress`): its
    round, phase, and the local training steps done of the round's total.

    The worker's round updates it (one attribute per batch: nothing that
    costs); another thread reads it (:meth:`report`, :meth:`line`), e.g. to
    tell the master with its heartbeat and to log it. Monitoring only:
    nothing the worker computes depends on it. ``clock``: monotonic seconds.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._round, self._phase, self._total = -1, "waiting", 0
        self._since = clock()
        self.done = 0  #: steps done this round (written by the training loop alone)

    def enter(self, phase: str, round_index: Optional[int] = None, total: Optional[int] = None) -> None:
        """Start ``phase`` (of round ``round_index``, with ``total`` local steps, when given)."""
        with self._lock:
            if round_index is not None and round_index != self._round:
                self._round, self.done = round_index, 0
            if total is not None:
                self._total, self.done = total, 0
            self._phase, self._since = phase, self.clock()

    def report(self) -> Progress:
        with self._lock:
            done = min(self.done, self._total)
            return Progress(self._round, self._phase, done, self._total, max(0.0, self.clock() - self._since))

    def line(self) -> str:
        """One log line: ``round 7: local training 120/469 batches, 23 s``."""
        p = self.report()
        if p.phase == "training":
            what = f"local training {p.done}/{p.total} batches"
        else:
            what = {"quantizing": "quantizing the update", "offering": "offered, waiting for the selection"}.get(
                p.phase, p.phase
            )
        return f"round {p.round + 1}: {what}, {p.seconds:.0f} s"


class Worker:
    """Worker ``m`` of docs/algorithm.md.

    Args:
        worker_id: m, 0-based.
        cfg: the run configuration.
        model: a :class:`FlatModel` (may be shared by simulated workers).
        train_x: float32 training samples (N, ...), e.g. images (N, 1, 28, 28); train_y: int64 (N,).
        indices: this worker's partition (indices into the training set).
        stopwatch: where to account seconds ("compute", "quantize").
        buffers0: the model's initial buffers (``state_dict()`` order and
            dtypes; default: the module's own now). With ``buffers local``
            they are this worker's own from then on; with ``average`` every
            downlink brings the global ones.
        prefetch: prepare batches ahead on loader threads as the config says
            (``prefetch_size``, ``num_parallel_calls``); False loads them on
            demand, for the many workers of a simulation that share a process
            and run one after the other (ahead-loaded batches would wait a
            whole round, up to ``prefetch_size + 1`` batches a worker). The
            batches are the same either way.
    """

    def __init__(
        self,
        worker_id: int,
        cfg: Config,
        model: FlatModel,
        train_x: np.ndarray,
        train_y: np.ndarray,
        indices: np.ndarray,
        stopwatch: Optional[Stopwatch] = None,
        buffers0: Optional[Sequence[np.ndarray]] = None,
        prefetch: bool = True,
    ) -> None:
        self.worker_id = worker_id
        self.stopwatch = stopwatch or NullStopwatch()
        self.cfg = cfg
        self.model = model
        self.batches = BatchStream(indices, cfg.batch_size, cfg.seed, worker_id)
        self.loader = BatchLoader(
            train_x,
            train_y,
            self.batches,
            model.device,
            cfg.prefetch_size if prefetch else 0,
            cfg.num_parallel_calls if prefetch else 0,
            channels_last=model.channels_last,
        )
        self.steps = cfg.steps_per_round(len(indices))
        self.local_lr = cfg.local_lr or cfg.lr
        self.rng = stream_rng(cfg.seed, worker_id, STREAM_UPLINK)
        self.up_scheme = compressors.uplink(cfg.mode)
        self.down_scheme = compressors.downlink(cfg.b_down)
        self.layout = model.layout
        self.sends_buffers = cfg.buffers == "average" and self.layout.buffer_bytes > 0
        self.buffer_bits = 8 * self.layout.buffer_bytes if self.sends_buffers else 0
        init = model.get_buffers() if buffers0 is None else buffers0
        self.layout.check_buffers(init)
        #: the buffers the next local update starts from (and, after it, the ones it made)
        self.buffers: Tuple[np.ndarray, ...] = tuple(np.array(b, copy=True) for b in init)
        n = model.n
        self.ref_up = np.zeros(n, np.float32)
        self.ref_down = np.zeros(n, np.float32)
        self.ef = np.zeros(n, np.float32)
        self.e_hat = 0.0
        self.clock = 0
        self.up_version = 0
        self.down_version = 0
        self._pending: Optional[Dict[str, Any]] = None
        #: what it is doing now (monitoring: the HTTP worker reports it to its log and to the master)
        self.progress = ProgressTracker()

    def describe(self) -> Dict[str, Any]:
        """What this worker computes with: ``{"threads": PyTorch intra-op
        threads, "device": "cpu" | "cuda:0" ..., "model": every tensor of its
        model as [name, "param" | "buffer", dtype, shape], "data": its
        training set's :func:`~flq.datasets.labels_digest`}`` (results equal
        the simulator's only at the same thread count; the master refuses a
        model or data that differ from its own)."""
        import torch

        return {
            "threads": torch.get_num_threads(),
            "device": str(self.model.device),
            "model": self.layout.signature(),
            "data": labels_digest(self.loader.y),
        }

    # ----- step 2 -----------------------------------------------------
    def apply_downlink(self, payload: bytes) -> np.ndarray:
        """Decode the round's model: exact theta (raw) or ``ref_down + Q(theta - ref_down)``,
        and with ``buffers average`` the global buffers before it (raw).

        Raises:
            flq.algorithm.packing.PayloadError: malformed bytes.
        """
        scheme = self.down_scheme
        try:
            raw, payload = self.layout.split(payload, self.sends_buffers)
            if raw is not None:
                self.buffers = self.layout.unpack_buffers(raw)
        except LayoutError as exc:
            raise packing.PayloadError(f"model from the master: {exc}") from None
        qv = packing.decode(
            payload,
            expected_n=self.model.n,
            expected_bits=self.cfg.downlink_bits,
            expected_version=packing.FORMAT_CODED if self.cfg.coding_down else packing.FORMAT_VERSION,
            expected_segments=scheme.segments(self.model.segments),
        )
        w = scheme.decode_update(qv, self.ref_down)
        if not scheme.relative:
            return w
        self.ref_down = w
        self.down_version += 1
        return self.ref_down.copy()

    # ----- step 3 -----------------------------------------------------
    def local_update(self, w: np.ndarray) -> tuple:
        """The update g at ``w`` and the loss (docs/algorithm.md step 3 and "Local training").

        One step: the minibatch gradient of mean CE + (cl/2)||w||^2.
        ``s > 1`` steps: plain SGD with ``local_lr``, ``g = (w - w_s) / (local_lr s)``.
        """
        if self.layout.buffers:
            self.model.set_buffers(self.buffers)  # a simulated worker shares its module with the others
        try:
            return self._steps(w)
        finally:
            if self.layout.buffers:
                self.buffers = self.model.get_buffers()  # what training made of them (BatchNorm statistics)

    def _steps(self, w: np.ndarray) -> tuple:
        cur = w
        losses: List[float] = []
        progress = self.progress
        for step in range(self.steps):
            xb, yb = self.loader.next()
            self.model.set_flat(cur)
            g, loss = self.model.gradient(xb, yb)
            loss += l2_loss_and_grad(cur, g, self.cfg.l2)
            losses.append(loss)
            progress.done = step + 1
            if self.steps == 1:
                return g, loss
            cur = cur - np.float32(self.local_lr) * g
        g = (w - cur) / np.float32(self.local_lr * self.steps)
        return g.astype(np.float32), float(np.mean(losses))

    # ----- steps 2-5 --------------------------------------------------
    def offer(self, round_index: int, me_k: float, downlink: bytes) -> Offer:
        """Run steps 2-5 of round ``k`` and return the offer.

        Args:
            round_index: k.
            me_k: the master's history energy of this round.
            downlink: the encoded model for this worker.
        """
        sw, t0 = self.stopwatch, time.perf_counter()
        self.progress.enter("training", round_index, self.steps)
        with sw.section("quantize"):
            w = self.apply_downlink(downlink)
        with sw.section("compute"):
            g, loss = self.local_update(w)
        self.progress.enter("quantizing")
        with sw.section("quantize"):
            offer = self._quantize_and_offer(round_index, me_k, g, loss)
        return dataclasses.replace(offer, compute_s=time.perf_counter() - t0)

    def _quantize_and_offer(self, round_index: int, me_k: float, g: np.ndarray, loss: float) -> Offer:
        cfg, n = self.cfg, self.model.n
        if not usable_update(g, loss):
            # the local model diverged: offer nothing (ef and mirrors stay as
            # they are) and report the loss as NaN, so the master stops the run
            log.info(
                "worker %d: non-finite loss or an update beyond %g in round %d",
                self.worker_id,
                MAX_UPDATE_MAGNITUDE,
                round_index + 1,
            )
            self._pending = None
            return Offer(
                worker_id=self.worker_id,
                round=round_index,
                candidate=False,
                gain=0.0,
                cost=float(cfg.uplink_widths[0] * n + self.buffer_bits),
                loss=float("nan"),
                up_version=self.up_version,
                down_version=self.down_version,
            )
        scheme = self.up_scheme
        g_eff = g + self.ef if scheme.error_feedback else g
        qv, q, payload = self._encode(g_eff)
        e = squared_norm(q - g_eff) if scheme.error_feedback else 0.0
        candidate = True
        if scheme.lazy:
            candidate = is_candidate(
                squared_norm(q - self.ref_up),
                me_k,
                cfg.lr,
                cfg.total_workers,
                e,
                self.e_hat,
                cfg.thr_scale,
                round_index,
                cfg.warmup,
                self.clock,
                cfg.C,
            )
        if self.sends_buffers:  # the buffers training made, raw, before the update
            payload = self.layout.pack_buffers(self.buffers) + payload
        self._pending = dict(round=round_index, payload=payload, q=q, g_eff=g_eff, e=e)
        return Offer(
            worker_id=self.worker_id,
            round=round_index,
            candidate=candidate,
            gain=squared_norm(q),
            cost=float(self.charged_bits(payload)),
            loss=float(loss),
            up_version=self.up_version,
            down_version=self.down_version,
        )

    def charged_bits(self, payload: bytes) -> int:
        """Bits an upload body is charged: its encoded update
        (:func:`~flq.algorithm.packing.charged_bits`) plus its raw buffers."""
        return packing.charged_bits(payload[self.buffer_bits // 8 :]) + self.buffer_bits

    def _encode(self, g_eff: np.ndarray) -> tuple:
        """Quantize and encode the update: ``(wire form, q, payload bytes)``.

        The payload is made now, before the offer, so the offer's cost is
        its real size (:func:`~flq.algorithm.packing.charged_bits`); with
        ``adaptive_width`` the width is chosen by
        :func:`~flq.algorithm.width.choose_width`.
        """
        cfg, scheme, segments = self.cfg, self.up_scheme, self.model.segments
        widths = cfg.uplink_widths
        share = budget_share(cfg.up_budget_bits, cfg.sel_clients, cfg.total_workers)
        if len(widths) == 1 or math.isinf(share):  # no budget to weigh bits against: the widest
            qv, q = scheme.encode_update(g_eff, self.ref_up, max(widths), self.rng, segments)
            return qv, q, packing.encode(qv, coded=cfg.coding_up)
        innovation_sq = squared_norm(g_eff - self.ref_up)

        def encode_at(bits: int, rng: np.random.Generator) -> tuple:
            qv, q = scheme.encode_update(g_eff, self.ref_up, bits, rng, segments)
            payload = packing.encode(qv, coded=cfg.coding_up)
            error = squared_norm(q - g_eff)
            return (
                qv,
                q,
                payload,
                width_score(error, innovation_sq, packing.charged_bits(payload), share, cfg.width_error_weight),
            )

        return choose_width(encode_at, widths, self.rng)

    # ----- step 7 -----------------------------------------------------
    def upload(self, round_index: int) -> bytes:
        """Selected: commit the pending update (step 7) and return its bytes.

        Raises:
            ProtocolError: no pending offer for ``round_index``.
        """
        p = self._take(round_index)
        if self.up_scheme.relative:
            self.ref_up = p["q"]
            self.up_version += 1
        if self.up_scheme.error_feedback:
            self.ef = p["g_eff"] - p["q"]
            self.e_hat = p["e"]
        self.clock = 0
        return p["payload"]

    # ----- step 8 -----------------------------------------------------
    def skip(self, round_index: int) -> None:
        """Not selected (or too late): keep the update in ``ef`` and tick the clock (step 8)."""
        p = self._pending if self._pending and self._pending["round"] == round_index else None
        self._pending = None
        if p is not None and self.up_scheme.error_feedback:
            self.ef = p["g_eff"]
        self.clock = next_clock(self.clock, False, self.cfg.C)

    def _take(self, round_index: int) -> Dict[str, Any]:
        p = self._pending
        if p is None or p["round"] != round_index:
            raise ProtocolError(f"worker {self.worker_id} has no pending update for round {round_index}")
        self._pending = None
        return p

    # ----- checkpointing and resynchronization ---------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Mirrors, residual, clock, versions and generator states (copies).
        The batch order's state is at the first batch not yet used: a batch
        prefetched but not used is drawn again by a restored worker."""
        return {
            "ref_up": self.ref_up.copy(),
            "ref_down": self.ref_down.copy(),
            "ef": self.ef.copy(),
            "e_hat": self.e_hat,
            "clock": self.clock,
            "up_version": self.up_version,
            "down_version": self.down_version,
            "rng": self.rng.bit_generator.state,
            "batches": self.loader.stream_state(),
            "buffers": [b.copy() for b in self.buffers],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.ref_up = np.array(state["ref_up"], np.float32, copy=True)
        self.ref_down = np.array(state["ref_down"], np.float32, copy=True)
        self.ef = np.array(state["ef"], np.float32, copy=True)
        self.e_hat = float(state["e_hat"])
        self.clock = int(state["clock"])
        self.up_version = int(state["up_version"])
        self.down_version = int(state["down_version"])
        self.rng.bit_generator.state = state["rng"]
        self.batches.load_state_dict(state["batches"])
        if self.layout.buffers and state.get("buffers"):
            buffers = tuple(np.array(b, copy=True) for b in state["buffers"])
            self.layout.check_buffers(buffers)
            self.buffers = buffers
        self.loader.reset()
        self._pending = None

    def resync(self, ref_up: np.ndarray, ref_down: np.ndarray, up_version: int, down_version: int) -> None:
        """Adopt the master's copies of both mirrors (after a version mismatch)."""
        self.ref_up = np.array(ref_up, np.float32, copy=True)
        self.ref_down = np.array(ref_down, np.float32, copy=True)
        self.up_version, self.down_version = int(up_version), int(down_version)
        self._pending = None
