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
