"""Where a simulation's workers live: in this process, or in Ray actors.

A pool hosts workers ``0..W-1`` of docs/algorithm.md and runs their side of
a round in two calls, the same phases as the real cluster's HTTP round:

- :meth:`offers`: steps 2-5 for every worker (decode the round's downlink,
  train, quantize, decide candidacy), returning the offers in worker order;
- :meth:`uploads`: steps 7-8, the chosen workers commit their pending update
  and hand over its encoded bytes; the others keep it in their error
  feedback.

The master never leaves the caller (:mod:`flq.simulate`); only encoded bytes
(downlinks and uploads) and :class:`~flq.messages.Offer` records cross the
pool's boundary, so a Ray pool gives bit for bit what the local pool gives
when each computes with the same number of PyTorch threads.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple

import numpy as np

from .config import Config
from .messages import Offer
from .runtime import Runtime
from .timing import Stopwatch
from .worker import Worker

#: ``on_state(worker_id, state)``: what a worker is doing now, for a dashboard
#: (``training``, ``offered``, ``uploading``, ``uploaded``, ``skipped``).
StateCallback = Callable[[int, str], None]


def _quiet(worker_id: int, state: str) -> None:
    pass


class WorkerPool(Protocol):
    """The workers of a simulation, whichever backend hosts them."""

    #: ``"local"`` or ``"ray"``.
    backend: str

    def offers(
        self, round_index: int, me_k: float, downlink: Callable[[int], bytes], on_state: StateCallback = _quiet
    ) -> List[Offer]:
        """Steps 2-5 of round ``round_index`` for every worker: ``downlink(m)``
        is worker m's encoded model; returns one offer per worker, in worker order."""
        ...

    def uploads(
        self, round_index: int, chosen: Iterable[int], on_state: StateCallback = _quiet
    ) -> List[Tuple[int, bytes]]:
        """Steps 7-8: ``[(m, upload bytes)]`` for each chosen m in increasing
        order; every other worker skips (its update goes to error feedback)."""
        ...

    def timings(self) -> Dict[str, float]:
        """Seconds the workers spent per section ("compute", "quantize") since
        the last call (summed over workers, so over actors too)."""
        ...

    def describe(self) -> str:
        """Where the workers are, in a few words."""
        ...

    def threads(self) -> int:
        """PyTorch threads each worker computes with (results equal only at the same count)."""
        ...

    def close(self) -> None:
        """Release the pool's resources (Ray actors); idempotent."""
        ...


class LocalPool:
    """Workers in this process, run one after the other (``--backend local``;
    each Ray actor of :mod:`flq.ray_backend` holds one for its slice).

    They share ``rt``'s one model and one copy of its training set (each
    keeps only its share's indices) and load their batches on demand (no
    prefetch threads or batches held per worker).

    Args:
        cfg, rt: the run's configuration and runtime (data, partitions, model).
        buffers0: the global model's initial buffers.
        worker_ids: the workers it holds (default: all of ``cfg.total_workers``).
    """

    backend = "local"

    def __init__(
        self,
        cfg: Config,
        rt: Runtime,
        buffers0: Optional[Sequence[np.ndarray]] = None,
        worker_ids: Optional[Sequence[int]] = None,
    ) -> None:
        self.stopwatch = Stopwatch()
        ids = range(cfg.total_workers) if worker_ids is None else worker_ids
        self.workers = [
            Worker(
                m,
                cfg,
                rt.model,
                rt.data.train_x,
                rt.data.train_y,
                rt.partitions[m],
                stopwatch=self.stopwatch,
                buffers0=buffers0,
                prefetch=False,
            )
            for m in ids
        ]

    def offers(
        self, round_index: int, me_k: float, downlink: Callable[[int], bytes], on_state: StateCallback = _quiet
    ) -> List[Offer]:
        out = []
        for w in self.workers:
            on_state(w.worker_id, "training")
            out.append(w.offer(round_index, me_k, downlink(w.worker_id)))
            on_state(w.worker_id, "offered")
        return out

    def uploads(
        self, round_index: int, chosen: Iterable[int], on_state: StateCallback = _quiet
    ) -> List[Tuple[int, bytes]]:
        picked, out = set(chosen), []
        for w in self.workers:
            if w.worker_id in picked:
                on_state(w.worker_id, "uploading")
                out.append((w.worker_id, w.upload(round_index)))
                on_state(w.worker_id, "uploaded")
            else:
                w.skip(round_index)
                on_state(w.worker_id, "skipped")
        return out

    def timings(self) -> Dict[str, float]:
        return self.stopwatch.take()

    def describe(self) -> str:
        return f"this process ({len(self.workers)} workers, one after the other)"

    def threads(self) -> int:
        import torch

        return torch.get_num_threads()

    def close(self) -> None:
        pass


def open_pool(
    cfg: Config,
    rt: Runtime,
    buffers0: Optional[Sequence[np.ndarray]] = None,
    backend: str = "local",
    ray_options: Optional[Dict[str, Any]] = None,
) -> WorkerPool:
    """The pool of ``backend`` (``local`` or ``ray``; :mod:`flq.ray_backend`
    takes ``ray_options``: ``address``, ``actors``, ``threads``).

    Raises:
        flq.config.ConfigError: an unknown backend, or ``ray`` without Ray installed.
    """
    if backend == "local":
        return LocalPool(cfg, rt, buffers0)
    if backend == "ray":
        from .ray_backend import RayPool

        return RayPool(cfg, rt, buffers0, **(ray_options or {}))
    from .config import ConfigError

    raise ConfigError(f"--backend {backend!r}: expected local or ray")
