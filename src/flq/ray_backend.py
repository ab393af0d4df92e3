"""A simulation's workers in a pool of Ray actors (``flq simulate --backend ray``).

The master stays in the driver (:mod:`flq.simulate`); the workers are split
into contiguous slices, one per actor. An actor is created once per run and
holds its slice for every round: the :class:`~flq.worker.Worker` objects
with their mirrors, error feedback and generator states, one model module,
and one copy of the training set shared by all of them (put into Ray's
object store once by the driver: actors on one node map the same memory).

Per round the driver makes two calls on every actor, concurrently: the
round's encoded downlinks in, the offers out (steps 2-5); then the selected
ids in, the encoded uploads out (steps 7-8). The bytes are those the HTTP
cluster sends, and each actor computes with ``threads`` PyTorch threads, so
the run equals ``--backend local --threads <threads>`` bit for bit.

Ray is optional: ``pip install 'flq-fed[ray]'``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .config import Config, ConfigError
from .messages import Offer
from .pool import LocalPool, StateCallback, _quiet
from .runtime import Runtime, set_threads
from .timing import Stopwatch

log = logging.getLogger(__name__)

#: One line for a missing Ray.
INSTALL_HINT = "--backend ray needs Ray, which is not installed here: pip install 'flq-fed[ray]'"
#: How long one phase of a round waits for the actors by default (seconds).
DEFAULT_TIMEOUT_S = 600.0


def require_ray() -> Any:
    """The ``ray`` module.

    Raises:
        flq.config.ConfigError: Ray is not installed (one line: how to install it).
    """
    try:
        import ray
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return ray


class WorkerHost:
    """The body of one Ray actor: workers ``worker_ids`` of the run.

    Args:
        cfg: the run's configuration.
        shared: ``(dataset, partitions)`` from the object store (zero-copy
            on the node: read-only arrays, never written).
        worker_ids: the slice of workers this actor hosts.
        buffers0: the global model's initial buffers.
        threads: PyTorch intra-op threads of this actor.
    """

    def __init__(
        self,
        cfg: Config,
        shared: Tuple[Any, List[np.ndarray]],
        worker_ids: Sequence[int],
        buffers0: Sequence[np.ndarray],
        threads: int,
    ) -> None:
        dataset, partitions = shared
        rt = Runtime(cfg, evaluates=False, data=dataset, partitions=partitions)
        set_threads(threads)
        self.pool = LocalPool(cfg, rt, buffers0, worker_ids)

    def node_id(self) -> str:
        """The Ray node this actor runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def offers(self, round_index: int, me_k: float, downlinks: List[bytes]) -> Tuple[List[Offer], Dict[str, float]]:
        """Steps 2-5 for this slice (``downlinks`` in the slice's order), and the seconds they took."""
        by_id = {w.worker_id: d for w, d in zip(self.pool.workers, downlinks)}
        return self.pool.offers(round_index, me_k, by_id.__getitem__), self.pool.timings()

    def uploads(self, round_index: int, chosen: List[int]) -> Tuple[List[Tuple[int, bytes]], Dict[str, float]]:
        """Steps 7-8 for this slice: the chosen upload, the others skip; and the seconds they took."""
        return self.pool.uploads(round_index, chosen), self.pool.timings()


def init_ray(ray: Any, address: Optional[str]) -> bool:
    """Connect to the cluster at ``address``, or start a local one for this
    process when it is None or '' (``address="local"``: never a cluster that
    ``RAY_ADDRESS`` or an earlier ``ray start`` names). Ray's own SIGINT and
    SIGTERM handlers (which exit at once) are replaced by the ones this
    process had, so a signal still ends a run with its rounds written.
    Returns whether a local cluster was started (to shut down after).

    Raises:
        flq.config.ConfigError, ConnectionError: see :func:`check_address`.
    """
    import signal
    import threading

    check_address(address)
    main = threading.current_thread() is threading.main_thread()
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        ray.init(address=address or "local", logging_level=logging.WARNING, configure_logging=True)
    finally:
        for s, handler in before.items():
            if handler is not None:
                signal.signal(s, handler)
    return not address


def check_address(address: Optional[str], timeout_s: float = 5.0) -> None:
    """Fail fast on a Ray cluster that cannot be reached: ``host:port`` (or
    ``ray://host:port``) must accept a TCP connection within ``timeout_s``
    (Ray's own connection retries last minutes and ignore Ctrl-C). ``auto``
    and '' are left to Ray.

    Raises:
        flq.config.ConfigError: a malformed address (one line).
        ConnectionError: nothing answers there (one line).
    """
    import socket

    if not address or address == "auto":
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(
            f"--ray_address {address!r}: expected host:port (of `ray start --head`), ray://host:port or auto"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(
            f"no Ray cluster answers at {address} within {timeout_s:g} s ({exc.strerror or exc}); "
            "start one with `ray start --head --port PORT`, or leave out --ray_address for a local one"
        ) from None


def check_options(actors: int = 0, threads: int = 0, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Raise :class:`~flq.config.ConfigError` (one line) for an actor count
    below 0, a thread count outside 0.. :data:`~flq.config.MAX_THREADS` (as
    ``threads``), or a timeout outside (0, a week] seconds."""
    from .config import MAX_THREADS, WEEK_S

    if actors < 0 or not 0 <= threads <= MAX_THREADS or not 0 < timeout_s <= WEEK_S:  # NaN too
        raise ConfigError(
            f"--ray_actors {actors} --ray_threads {threads} --ray_timeout {timeout_s:g}: expected actors >= 0 "
            f"and threads 0..{MAX_THREADS} (0 = automatic), seconds > 0 and at most a week ({WEEK_S:g})"
        )


def plan_actors(total_workers: int, cpus: float, threads: int, actors: int = 0) -> Tuple[int, int]:
    """``(actors, threads per actor)``: by default one actor per ``threads``
    CPUs of the cluster (``threads`` 0 means 1), never more actors than
    workers, at least one."""
    threads = threads or 1
    if actors == 0:
        actors = int(cpus // threads)
    return max(1, min(actors, total_workers)), threads


def reservation(actors: int, threads: int, cpus: float) -> float:
    """CPUs each actor reserves: its ``threads``, or, when ``actors x threads``
    is more than the cluster's ``cpus`` (an explicit ``--ray_actors``), an
    equal share of them (with a warning: the actors then share cores, and
    Ray would otherwise wait for ever to place the ones that do not fit)."""
    if actors * threads <= cpus:
        return float(threads)
    share = cpus / actors
    share = share if share <= 1 else float(int(share))  # Ray: fractions only below one CPU
    log.warning(
        "%d Ray actors x %d thread(s) is more than the cluster's %g CPUs: each reserves %.3g CPU and they share cores",
        actors,
        threads,
        cpus,
        share,
    )
    return share


class RayPool:
    """The workers in Ray actors (see the module's docstring).

    Args:
        cfg, rt, buffers0: as :class:`~flq.pool.LocalPool` (``rt`` holds the
            data and partitions the driver loaded).
        address: an existing Ray cluster (``ray://`` or ``host:port`` or
            ``auto``); None or '' starts a local one for the run.
        actors: how many actors (0: one per ``threads`` CPUs of the cluster).
        threads: PyTorch threads per actor (0: ``cfg.threads`` when set, else 1).
        timeout_s: the longest one phase of a round waits for the actors.

    Raises:
        flq.config.ConfigError: Ray is missing, or a bad count.
        TimeoutError: (from :meth:`offers` / :meth:`uploads`) the actors did not answer in ``timeout_s``.
    """

    backend = "ray"

    def __init__(
        self,
        cfg: Config,
        rt: Runtime,
        buffers0: Optional[Sequence[np.ndarray]] = None,
        address: Optional[str] = None,
        actors: int = 0,
        threads: int = 0,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        ray = require_ray()
        self.ray = ray
        check_options(actors, threads, timeout_s)
        self.timeout_s = timeout_s
        self.started = False
        self.actors: List[Any] = []
        self.stopwatch = Stopwatch()  # the actors' seconds, summed
        if not ray.is_initialized():
            self.started = init_ray(ray, address)
        try:
            cpus = ray.cluster_resources().get("CPU", 1.0)
            n_actors, self.actor_threads = plan_actors(cfg.total_workers, cpus, threads or cfg.threads, actors)
            slices = [s.tolist() for s in np.array_split(np.arange(cfg.total_workers), n_actors)]
            self.slices = [s for s in slices if s]
            shared = ray.put((rt.data, rt.partitions))
            init = buffers0 if buffers0 is not None else rt.model.get_buffers()
            reserve = reservation(n_actors, self.actor_threads, cpus)
            host = ray.remote(WorkerHost).options(num_cpus=reserve, scheduling_strategy="SPREAD", max_restarts=0)
            self.actors = [host.remote(cfg, shared, ids, init, self.actor_threads) for ids in self.slices]
            self.nodes = self._get([a.node_id.remote() for a in self.actors], "start")
        except BaseException:
            self.close()
            raise
        log.info("ray: %s", self.describe())

    def describe(self) -> str:
        """``"4 Ray actors x 1 thread(s) on 2 node(s), 5-5 workers each"``."""
        nodes = len(set(self.nodes))
        sizes = sorted(map(len, self.slices))
        return (
            f"{len(self.actors)} Ray actor(s) x {self.actor_threads} thread(s) on {nodes} node(s), "
            f"{sizes[0]}-{sizes[-1]} workers each"
        )

    def threads(self) -> int:
        return self.actor_threads

    def _get(self, refs: List[Any], phase: str) -> List[Any]:
        ready, pending = self.ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        if pending:
            raise TimeoutError(
                f"{len(pending)} of {len(refs)} Ray actors did not answer ({phase}) within {self.timeout_s:g} s "
                "(--ray_timeout)"
            )
        return self.ray.get(refs)

    def offers(
        self, round_index: int, me_k: float, downlink: Callable[[int], bytes], on_state: StateCallback = _quiet
    ) -> List[Offer]:
        calls = []
        for actor, ids in zip(self.actors, self.slices):
            payloads = [downlink(m) for m in ids]  # in worker order, as the local pool asks
            for m in ids:
                on_state(m, "training")
            calls.append(actor.offers.remote(round_index, me_k, payloads))
        out: List[Offer] = []
        for offers, secs in self._get(calls, f"offers of round {round_index + 1}"):
            out.extend(offers)
            self.stopwatch.add(secs)
        for o in out:
            on_state(o.worker_id, "offered")
        return out

    def uploads(
        self, round_index: int, chosen: Iterable[int], on_state: StateCallback = _quiet
    ) -> List[Tuple[int, bytes]]:
        picked = set(chosen)
        calls = [
            actor.uploads.remote(round_index, [m for m in ids if m in picked])
            for actor, ids in zip(self.actors, self.slices)
        ]
        out: List[Tuple[int, bytes]] = []
        for ups, secs in self._get(calls, f"uploads of round {round_index + 1}"):
            out.extend(ups)
            self.stopwatch.add(secs)
        for ids in self.slices:
            for m in ids:
                on_state(m, "uploaded" if m in picked else "skipped")
        return sorted(out)

    def timings(self) -> Dict[str, float]:
        return self.stopwatch.take()

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001 - an actor already gone
                pass
        self.actors = []
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
            self.started = False
