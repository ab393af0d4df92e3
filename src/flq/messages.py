"""The messages of one FLQ round, as plain data (docs/algorithm.md, "One round").

The simulator hands them from :class:`flq.master.Master` to
:class:`flq.worker.Worker` objects directly; the HTTP transport carries the
same messages between processes. Vectors travel as the bytes of
:mod:`flq.algorithm.packing`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict


@dataclass(frozen=True)
class Offer:
    """A worker's reply to the round's downlink (steps 3-5).

    Attributes:
        worker_id: m.
        round: k (0-based) the offer belongs to.
        candidate: whether the lazy rule lets it upload.
        gain: ``||q||^2``.
        cost: uplink bits the upload would be charged.
        loss: the worker's training loss this round.
        up_version: how many uploads this worker has committed (the version
            of its ``ref_up`` mirror); the master checks it against its own.
        down_version: how many downlinks it has applied (version of ``ref_down``).
        compute_s: seconds the worker spent on this round (decode, local
            training, quantization); for monitoring only.
    """

    worker_id: int
    round: int
    candidate: bool
    gain: float
    cost: float
    loss: float
    up_version: int = 0
    down_version: int = 0
    compute_s: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


#: What a worker is doing, as its progress reports name it: waiting for the
#: round's model, training (decoding the model and the local steps),
#: quantizing its update, offering (waiting for the selection), uploading.
PROGRESS_PHASES = ("waiting", "training", "quantizing", "offering", "uploading")


@dataclass(frozen=True)
class Progress:
    """A worker's progress report (monitoring only: nothing of the round depends on it).

    Attributes:
        round: k (0-based) of the round the worker is in, or did last while
            ``waiting``; -1 before its first.
        phase: one of :data:`PROGRESS_PHASES`.
        done: local training steps (batches) done in this round.
        total: local training steps of a round (0 before the first).
        seconds: seconds spent in ``phase`` so far.
    """

    round: int
    phase: str
    done: int
    total: int
    seconds: float

    def problem(self) -> str:
        """Why this report cannot be true, in one line ('' when it can)."""
        if self.phase not in PROGRESS_PHASES:
            return f"progress phase {self.phase!r} is not one of {', '.join(PROGRESS_PHASES)}"
        if not 0 <= self.done <= self.total:
            return f"progress of {self.done} of {self.total} batches"
        if self.round < -1:
            return f"progress for round index {self.round}"
        if not 0.0 <= self.seconds < float("inf"):
            return f"progress after {self.seconds} s"
        return ""
