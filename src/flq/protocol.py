"""The conventions of the master's protocol that both ends share: refusal
codes and how rounds are numbered. No HTTP machinery and no algorithm here.

Refusals
--------
Every refusal the master sends is an HTTP status with the JSON body
``{"detail": str, "code": str}`` (410 adds ``reason``, the run's end reason).
``detail`` is one line for a person; ``code`` is one of :class:`Code`, for a
program to act on. Each code has exactly one status (:attr:`Code.status`), so
a client branches on the code alone.

Rounds
------
Everything a user or a worker sees counts rounds from 1, like the
spreadsheet's ``iter`` column and the log lines: rounds are ``1 ..
max_rounds``. That covers HTTP headers (``X-FLQ-Round``), query parameters
(``after``, ``round``), JSON fields (``round`` in the registration, offer,
stop, heartbeat, ``/config`` and ``/status`` documents) and the global
model's metadata and file name. The algorithm (``Master.round``,
``Offer.round``, the ``round_index`` of :class:`~flq.worker.Worker`) keeps its
0-based index ``k``; the transport converts at its boundary with
:func:`round_number` and :func:`round_index`, and nowhere else.
"""

from __future__ import annotations

from enum import Enum
from typing import Dict, List, Optional


class Code(str, Enum):
    """A refusal code: its value (what travels), HTTP :attr:`status` and a one-line :attr:`meaning`.

    A ``Code`` is a ``str``: it compares equal to, and serializes as, its
    value (``str()`` too, on every Python this package supports).
    """

    status: int
    meaning: str

    def __new__(cls, value: str, status: int, meaning: str) -> Code:
        obj = str.__new__(cls, value)
        obj._value_ = value
        obj.status = status
        obj.meaning = meaning
        return obj

    MALFORMED = (
        "malformed",
        400,
        "the message is well-formed but its content is refused: a non-finite gain or "
        "cost, a wrong cost, an upload that does not decode",
    )
    UNAUTHORIZED = ("unauthorized", 401, "missing or wrong bearer token")
    BAD_SIGNATURE = (
        "bad_signature",
        401,
        "the worker call's signature is missing or does not verify: not signed with the key of the worker id "
        "it claims, or changed on the way (per-worker credentials)",
    )
    NO_SESSION = ("no_session", 401, "a worker call without the X-FLQ-Session header its registration returned")
    WRONG_WORKER = ("wrong_worker", 403, "the call acts for a worker id other than the one that signed it")
    CROSS_ORIGIN = (
        "cross_origin",
        403,
        "a browser's POST sent by a page of another site (its Origin header is not this server): refused, so "
        "no other site can stop the run",
    )
    UNKNOWN_WORKER = ("unknown_worker", 404, "the worker id is not one of this run's ids")
    NOT_REGISTERED = ("not_registered", 404, "the worker is not registered (or has left): register again")
    NOT_FOUND = ("not_found", 404, "no such path")
    METHOD_NOT_ALLOWED = ("method_not_allowed", 405, "the path does not take this method")
    TIMEOUT = ("timeout", 408, "the request body did not arrive in time")
    SESSION_REPLACED = ("session_replaced", 409, "a newer process registered with this worker id: this one stops")
    LATE = ("late", 409, "the offer or upload is for a round, or a phase, that is over: not selected")
    NOT_OPEN = ("not_open", 409, "the offer or upload is for a round the master has not opened yet")
    REPLAYED = (
        "replayed",
        409,
        "a signed request received before (its session's request number, or its registration challenge, "
        "was used already; or the challenge expired)",
    )
    MIRROR_MISMATCH = ("mirror_mismatch", 409, "the worker's mirror versions differ from the master's: resync")
    DATA_MISMATCH = (
        "data_mismatch",
        409,
        "the worker's training set (its size and labels' digest) is not the master's: its share of the "
        "partition would differ; the worker cannot join",
    )
    MODEL_MISMATCH = (
        "model_mismatch",
        409,
        "the worker's model has other tensors (names, shapes or dtypes) than the master's: the detail names "
        "the first one; the worker cannot join",
    )
    CONFLICT = (
        "conflict",
        409,
        "the message contradicts one already accepted (a different second offer, "
        "other upload bytes, an upload from a worker not selected, an offer before the round's model)",
    )
    RUN_OVER = ("run_over", 410, "the run is over (the body's reason says why): exit")
    TOO_LARGE = ("too_large", 413, "the request body exceeds its size limit")
    INVALID_REQUEST = (
        "invalid_request",
        422,
        "the request does not match the API: a missing, mistyped or "
        "out-of-range field or parameter, or a body that is not JSON",
    )
    INTERNAL = ("internal", 500, "an error inside the master")

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def parse(cls, text: str) -> Optional[Code]:
        """The code ``text`` names, or None for one this version does not know."""
        return next((code for code in cls if code.value == text), None)


def codes_by_status(codes) -> Dict[int, List[Code]]:
    """``codes`` grouped by their HTTP status, in the order given (each once)."""
    out: Dict[int, List[Code]] = {}
    for code in dict.fromkeys(codes):
        out.setdefault(code.status, []).append(code)
    return out


def round_number(k: int) -> int:
    """The round number a user or a worker sees (1-based) for the algorithm's index ``k`` (0-based)."""
    return int(k) + 1


def round_index(number: int) -> int:
    """The algorithm's index ``k`` (0-based) of the round numbered ``number`` (1-based)."""
    return int(number) - 1
