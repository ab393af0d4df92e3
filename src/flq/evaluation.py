"""Test-set evaluation off the round's critical path (``system.eval_overlap``).

The master's cores idle while the workers train, and evaluating the 10,000
test images takes longer than a round of local training. So
:meth:`flq.master.Master.end_round` can hand the round's global model to a
:class:`BackgroundEvaluator`, which evaluates it in one thread while the
next round trains and then completes the round's record (``acc``,
``entropy``, ``master_evaluate_s``). The numbers are those of an evaluation
in line: the same model, the same evaluator; only when they arrive changes.

The queue is bounded: at most ``depth`` models (:data:`DEPTH`, one) are
waiting or being evaluated. A round that would add one more first waits for
a slot, so in a steady run a round costs max(training, evaluation) instead
of their sum, and memory stays at ``depth`` copies of the model. Every wait
is bounded by ``depth`` evaluations; :meth:`BackgroundEvaluator.drain`
(before a checkpoint, before the results are written, at every way a run
ends) returns once the pending ones are done.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable, Deque, Dict, Optional, Tuple

import numpy as np

log = logging.getLogger(__name__)

#: ``evaluate(theta, buffers) -> (accuracy, mean cross-entropy)`` on the test
#: set: theta float32 (n,), buffers the model's buffers (a tuple of arrays).
Evaluator = Callable[[np.ndarray, Tuple[np.ndarray, ...]], Tuple[float, float]]

#: Models in the queue at most: the one being evaluated. A deeper queue only
#: postpones the wait while evaluation is slower than training, and leaves
#: more unevaluated rounds when a run ends.
DEPTH = 1


class EvaluationFailed(RuntimeError):
    """An evaluation in the background raised; the run should end (the
    round's record keeps NaN accuracy)."""


class BackgroundEvaluator:
    """Evaluate global models in one background thread, at most ``depth`` pending.

    Args:
        evaluate: the evaluator (called only from the background thread,
            one model at a time; it must not share a module with training).
        depth: models waiting or being evaluated at most (>= 1).
    """

    def __init__(self, evaluate: Evaluator, depth: int = DEPTH) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self._evaluate = evaluate
        self.depth = depth
        self._cond = threading.Condition()
        self._queue: Deque[Tuple[Dict[str, Any], np.ndarray]] = collections.deque()
        self._pending = 0  # queued or being evaluated
        self._error: Optional[str] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def pending(self) -> int:
        """Models queued or being evaluated now."""
        with self._cond:
            return self._pending

    def submit(self, record: Dict[str, Any], theta: np.ndarray, buffers: Tuple[np.ndarray, ...] = ()) -> float:
        """Queue ``theta`` (float32 (n,)) and ``buffers`` (not copied: they
        must not change afterwards) for evaluation; its ``record`` gets ``acc``,
        ``entropy`` and ``master_evaluate_s`` (seconds) when it is done.

        Returns:
            Seconds this call waited for a free slot (0 when there was one).

        Raises:
            EvaluationFailed: an earlier evaluation failed.
        """
        t0 = time.perf_counter()
        with self._cond:
            self._cond.wait_for(lambda: self._pending < self.depth or self._error is not None)
            self._raise()
            self._queue.append((record, theta, buffers))
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="flq-evaluate", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return time.perf_counter() - t0

    def drain(self, raise_error: bool = True) -> float:
        """Wait until every queued evaluation is done (at most ``depth``
        evaluations' time); return the seconds waited.

        Raises:
            EvaluationFailed: an evaluation failed (unless ``raise_error`` is False).
        """
        t0 = time.perf_counter()
        with self._cond:
            self._cond.wait_for(lambda: self._pending == 0)
            if raise_error:
                self._raise()
        return time.perf_counter() - t0

    def _raise(self) -> None:
        if self._error is not None:
            raise EvaluationFailed(self._error)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue))
                record, theta, buffers = self._queue[0]
            t0 = time.perf_counter()
            try:
                if self._error is None:
                    acc, ent = self._evaluate(theta, buffers)
                    record.update(acc=acc, entropy=ent, master_evaluate_s=time.perf_counter() - t0)
                    log.info("round %d: test accuracy %.4f entropy %.4f", record["iter"], acc, ent)
            except Exception as exc:  # noqa: BLE001 - reported to the round loop, which ends the run
                log.exception("evaluation of round %d failed", record["iter"])
                with self._cond:
                    self._error = f"evaluation of round {record['iter']} failed: {type(exc).__name__}: {exc}"
            with self._cond:
                self._queue.popleft()
                self._pending -= 1
                self._cond.notify_all()
