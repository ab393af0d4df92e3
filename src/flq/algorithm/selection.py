"""Budget selection of uploads (docs/algorithm.md, "One round", steps 5-6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List


@dataclass(frozen=True)
class Candidate:
    """One worker's offer to upload.

    Attributes:
        worker_id: the worker's index m.
        gain: ``||q||^2`` of the update it would send.
        cost: uplink bits the upload is charged (``b n``; docs/algorithm.md, Modes).
    """

    worker_id: int
    gain: float
    cost: float


def priority_order(candidates: Iterable[Candidate]) -> List[Candidate]:
    """Candidates by ``gain / cost`` descending; ties: lower worker id first."""
    return sorted(candidates, key=lambda c: (-(c.gain / c.cost), c.worker_id))


def select(candidates: Iterable[Candidate], sel_clients: int, up_budget_bits: float) -> List[int]:
    """The worker ids that upload this round, in priority order (step 6).

    If ``sel_clients > 0`` the first ``sel_clients`` in priority order;
    else if ``up_budget_bits > 0`` walk the order and take each candidate
    whose cost still fits the remaining budget (a later, cheaper one may
    still fit after a dearer one did not); else all candidates.
    """
    order = priority_order(candidates)
    if sel_clients > 0:
        return [c.worker_id for c in order[:sel_clients]]
    if up_budget_bits > 0:
        chosen, left = [], float(up_budget_bits)
        for c in order:
            if c.cost <= left:
                chosen.append(c.worker_id)
                left -= c.cost
        return chosen
    return [c.worker_id for c in order]
