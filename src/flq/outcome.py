"""How a run ends: its reason, the exit status that says which, and the
exceptions and signal handling that carry a reason out of a round loop.

Every process of FLQ-Fed (``flq simulate``, ``flq master``, ``flq worker``)
ends with one of the reasons below and exits with its status; 0 only for a
run that finished all its rounds. The results of the rounds done are written
in every case; when they cannot be (a full disk), the status is
:data:`EXIT_NOT_SAVED` whatever the reason, because that is what the operator
must know first.

=============  ======  ====================================================
reason         status  meaning
=============  ======  ====================================================
completed      0       all ``max_rounds`` rounds done
error          1       an unexpected error ended the run (traceback in the log)
(config)       2       bad configuration or arguments, refused before any work
diverged       3       the global model or the workers' loss became non-finite
stopped        4       ``POST /stop`` (the master and its workers)
quorum_lost    5       fewer than ``min_workers`` for ``quorum_timeout_s``
(not saved)    6       the results could not be written (disk full, permissions)
unreachable    7       worker: the master did not answer for ``--give_up_s``
refused        8       worker: a fatal refusal (token, TLS, scheme, unknown
                       id, run already over, replaced by a newer process)
sigint         130     SIGINT (Ctrl-C), as a shell reports it (128 + 2)
sigterm        143     SIGTERM (a batch scheduler, ``timeout``, ``kill``)
=============  ======  ====================================================
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Dict, Iterator

COMPLETED, ERROR, DIVERGED, STOPPED, QUORUM_LOST = "completed", "error", "diverged", "stopped", "quorum_lost"
UNREACHABLE, REFUSED, SIGINT, SIGTERM = "unreachable", "refused", "sigint", "sigterm"

EXIT_CONFIG = 2
EXIT_NOT_SAVED = 6

#: Exit status of each reason (see the module docstring).
EXIT_STATUS: Dict[str, int] = {
    COMPLETED: 0,
    ERROR: 1,
    DIVERGED: 3,
    STOPPED: 4,
    QUORUM_LOST: 5,
    UNREACHABLE: 7,
    REFUSED: 8,
    SIGINT: 130,
    SIGTERM: 143,
}

_SIGNAL_REASON: Dict[int, str] = {int(signal.SIGINT): SIGINT, int(signal.SIGTERM): SIGTERM}
#: A process started with SIGINT ignored (``cmd &`` in a script, ``nohup``)
#: keeps ignoring Ctrl-C, as POSIX programs do: the script that started it
#: decides how to stop it.
_SIGINT_IGNORED = signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def stop_signals() -> tuple:
    """The signals that stop a run: SIGTERM, and SIGINT unless this process
    was started with SIGINT ignored."""
    return (signal.SIGTERM,) if _SIGINT_IGNORED else (signal.SIGINT, signal.SIGTERM)


def exit_status(reason: str) -> int:
    """The exit status of ``reason`` (1 for a reason this table does not know)."""
    return EXIT_STATUS.get(reason, 1)


def run_status(reason: str, not_saved: str = "") -> int:
    """A run's exit status: :data:`EXIT_NOT_SAVED` when its results could not
    be written (``not_saved`` says why), else the status of ``reason``."""
    return EXIT_NOT_SAVED if not_saved else exit_status(reason)


def signal_reason(signum: int) -> str:
    """``"sigint"`` or ``"sigterm"`` for those signals (``"error"`` otherwise)."""
    return _SIGNAL_REASON.get(int(signum), ERROR)


class Diverged(ArithmeticError):
    """The global model, the optimizer state or the workers' training loss
    became non-finite: the run cannot go on (one-line reason)."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; ``reason`` is ``"sigint"`` or ``"sigterm"``.

    A BaseException like KeyboardInterrupt, so ``except Exception`` in library
    code does not swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum
        self.reason = signal_reason(signum)


_critical = {"depth": 0, "pending": 0, "fired": 0, "nest": 0}


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """While inside, the first SIGINT or SIGTERM raises :class:`Interrupted`
    in the main thread (between two Python operations, so a running PyTorch
    kernel finishes first), or at the end of the enclosing :func:`critical`
    section; later ones are ignored, so the clean-up that follows (results,
    telling the master) is not cut short. Outside the main thread this does
    nothing. The previous handlers are restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    if _critical["nest"] == 0:  # a new run in this process (a nested one keeps what already fired)
        _critical["fired"] = 0
    _critical["nest"] += 1

    def handler(signum, frame):
        if _critical["fired"]:  # the run is already ending: a second signal must not cut its clean-up short
            return
        if _critical["depth"] > 0:
            _critical["pending"] = _critical["pending"] or signum
            return
        _critical["fired"] = signum
        raise Interrupted(signum)

    previous: Dict[int, Any] = {}
    try:
        for sig in stop_signals():
            previous[sig] = signal.signal(sig, handler)
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _critical["nest"] -= 1


def raise_if_interrupted() -> None:
    """Raise :class:`Interrupted` again when a signal already fired but its
    exception was swallowed: the handler runs between any two Python
    operations, also inside a finalizer (``__del__``, a weakref callback),
    whose exceptions Python prints and drops; later signals are ignored
    once one fired, so without this the run went on (a simulation with a
    SIGTERM lost this way trained for 15 minutes). The round loops call it
    at every round. Only in the main thread inside :func:`signals_interrupt`
    (a loop run in another thread, as tests do, is not the one signalled)."""
    if not (_critical["nest"] > 0 and threading.current_thread() is threading.main_thread()):
        return
    if _critical["fired"] and _critical["depth"] == 0:
        raise Interrupted(_critical["fired"])


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """A section a signal must not cut in half (a round's aggregation and its
    record): under :func:`signals_interrupt`, a signal that arrives inside
    raises :class:`Interrupted` when the section ends, unless the section
    itself raised."""
    _critical["depth"] += 1
    try:
        yield
    except BaseException:
        _critical["depth"] -= 1
        raise
    _critical["depth"] -= 1
    if _critical["depth"] == 0 and _critical["pending"] and not _critical["fired"]:
        signum, _critical["pending"] = _critical["pending"], 0
        _critical["fired"] = signum
        raise Interrupted(signum)


@contextlib.contextmanager
def signals_deferred() -> Iterator[Dict[str, int]]:
    """While inside (writing results), SIGINT and SIGTERM are remembered, not
    acted on, so a second Ctrl-C cannot leave half a file; the dict yielded
    holds ``{"signum": n}`` of the first one that arrived."""
    got: Dict[str, int] = {}
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def handler(signum, frame):
        got.setdefault("signum", signum)

    previous = {sig: signal.signal(sig, handler) for sig in stop_signals()}
    try:
        yield got
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
