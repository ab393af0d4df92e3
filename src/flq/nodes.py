"""The master and worker processes: build the objects, wire them to the
transport, write logs and results (``flq master`` / ``flq worker``)."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from . import outcome
from .config import Config, ConfigError, build, coerce, parse_mapping
from .protocol import round_index

log = logging.getLogger(__name__)


#: Settings a resumed run must share with its checkpoint (the rest, such as
#: threads, ports, timeouts or max_rounds, may change across a restart).
RESUME_MUST_MATCH = ("dataset", "model", "flq_algorithm", "lazy_selection", "budget_selection")


def check_resumable(saved: Dict[str, Any], cfg: Config) -> None:
    """Raise CheckpointError naming the first setting that differs."""
    from .checkpoint import CheckpointError

    now = cfg.to_sections()
    keys = [(sec, k) for sec in RESUME_MUST_MATCH for k in now[sec]] + [("system", "total_workers"), ("system", "seed")]
    for sec, k in keys:
        if saved.get(sec, {}).get(k) != now[sec][k]:
            raise CheckpointError(
                f"checkpoint was written with {sec}.{k} = {saved.get(sec, {}).get(k)!r}, "
                f"this run has {now[sec][k]!r}: not the same run"
            )


def listen_on(
    host: str, port: int, flag: str = "--port", who: str = "master", host_flag: str = "config key 'system.master_host'"
):
    """A socket bound to ``host:port`` and listening, for the master to serve
    on later: taken before the data loads, so a second master on the same
    port is refused at once, not after its start-up.

    ``host_flag``, ``flag`` and ``who`` name the options that chose the
    address and the port, and what else may hold it, for the error's one line.

    Raises:
        ConfigError: the address cannot be resolved or listened on (in use ...).
    """
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"{host_flag}: cannot resolve {host!r} ({exc})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); another {who} running? choose another {flag}"
        ) from None
    return sock


def load_resume_state(cfg: Config, explicit: Optional[str] = None) -> Tuple[Path, Dict[str, Any]]:
    """The checkpoint a resumed run continues from and its master state,
    read once and checked (:func:`flq.checkpoint.find_resumable`).

    Raises:
        flq.checkpoint.CheckpointError: no usable checkpoint, one of another
            run, one in use by a running master, or one already at
            ``max_rounds``.
    """
    from .checkpoint import CheckpointError, find_resumable, load_checkpoint

    ckpt = find_resumable(cfg.checkpoint_dir, cfg.dataset_tag, cfg.mode, explicit)
    state, saved_cfg = load_checkpoint(ckpt)
    check_resumable(saved_cfg, cfg)
    if int(state["round"]) >= cfg.max_rounds:
        raise CheckpointError(
            f"{ckpt} is already at round {state['round']} of max_rounds {cfg.max_rounds}: "
            f"raise --rounds to train further"
        )
    return ckpt, state


@dataclass
class MasterEnd:
    """How a master's run ended (:mod:`flq.outcome`): its reason, a one-line
    detail, the spreadsheet written (None when no round finished or it could
    not be written) and, when the results could not be written, why."""

    reason: str
    detail: str
    results_path: Optional[Path]
    not_saved: str = ""

    @property
    def exit_status(self) -> int:
        return outcome.run_status(self.reason, self.not_saved)


def run_master(
    cfg: Config,
    run_id: str,
    certfile: Optional[str] = None,
    keyfile: Optional[str] = None,
    linger_s: float = 5.0,
    resume: Optional[Tuple[Path, Dict[str, Any]]] = None,
    sock: Any = None,
    cafile: Optional[str] = None,
) -> MasterEnd:
    """Serve one run on ``cfg.master_host:cfg.master_port`` until it ends
    (all rounds, ``POST /stop``, SIGINT/SIGTERM, a lost quorum, divergence,
    an error); the results of the rounds done are written in every case.
    Every ``checkpoint_every`` rounds the master's state goes to its own
    checkpoint, ``flq_master_<dataset>_<mode>_<run_id>.npz`` (locked while
    this runs); a checkpoint that cannot be written (a full disk) is logged
    and the run goes on. ``resume`` (from :func:`load_resume_state`)
    continues a run and its checkpoint file (and its run id, which ``GET
    /config`` tells workers for their saved states). After the run, the master
    answers 410 for ``linger_s`` seconds so polling workers learn it ended.
    ``sock``: the listening socket from :func:`listen_on` (else one is
    opened on ``master_host:master_port`` when serving starts). With
    ``cfg.credentials`` every worker call must be signed by its worker's key
    (:mod:`flq.credentials`); with ``cafile`` (and ``certfile``) every client
    must present a certificate that CA signed (mutual TLS).
    """
    from .checkpoint import checkpoint_path, lock_checkpoint, run_of, save_checkpoint
    from .cluster import ClusterMaster
    from .datasets import labels_digest
    from .master import Master
    from .model import state_dict_bytes, state_dict_from_flat
    from .monitor import RunMonitor, ScalarLog
    from .outputs import one_line, remove_stale_temporaries
    from .runtime import Runtime
    from .summary import describe_buffers, save_results
    from .timing import Stopwatch
    from .transport.dashboard import page_url
    from .transport.server import create_app, serve

    scalars = ScalarLog.open(cfg, "master")  # a missing tensorboard package stops the run before any work
    rt = Runtime(cfg)
    _ = rt.data  # load (or fail on) the dataset before serving anybody
    theta0, buffers0 = rt.initial_model()
    master = Master(
        cfg,
        rt.layout,
        theta0,
        evaluate=rt.evaluate,
        stopwatch=Stopwatch(),
        overlap=cfg.eval_overlap,
        buffers0=buffers0,
    )
    for folder in (cfg.checkpoint_dir, cfg.results_dir):
        remove_stale_temporaries(Path(folder))
    if resume is not None:
        ckpt, state = resume
        master.load_state_dict(state)
        log.info("resumed from %s at round %d", ckpt, master.round)
    else:
        ckpt = checkpoint_path(cfg.checkpoint_dir, cfg.dataset_tag, cfg.mode, run_id)
    ckpt_lock = lock_checkpoint(ckpt) if cfg.checkpoint_every or resume is not None else None
    written: Dict[str, Any] = {}
    lock = threading.Lock()
    cluster: Any = None

    def after_round(record: Dict[str, Any]) -> None:
        checkpoint(record)
        if scalars is not None:
            scalars.update(monitor)

    def checkpoint(record: Optional[Dict[str, Any]] = None) -> None:
        """Every checkpoint_every rounds, and (record None) once more at the end of the run."""
        if not cfg.checkpoint_every or not master.records:
            return
        due = master.round % cfg.checkpoint_every == 0 if record is not None else written.get("ckpt") != master.round
        if not due:
            return
        try:
            state = master.state_dict()
            model = state_dict_bytes(state_dict_from_flat(rt.layout, state["theta"], state["buffers"]))
            save_checkpoint(ckpt, state, cfg.public_sections(), model=model)
        except OSError as exc:
            cluster.checkpoint_error = f"round {master.round}: {one_line(exc)}"
            log.error(
                "checkpoint at round %d not written: %s; the previous one is kept%s",
                master.round,
                one_line(exc),
                " and training goes on" if record is not None else "",
            )
            return
        cluster.checkpoint_error, written["ckpt"] = "", master.round
        log.info("checkpoint at round %d: %s", master.round, ckpt)

    def write(reason: str) -> None:
        with lock:
            if "reason" in written:
                return
            written["reason"] = reason
            master.finish_evaluations(raise_error=False)  # every record with its accuracy (eval_overlap)
            if scalars is not None:
                scalars.close(monitor)
            checkpoint()  # the state at the end, so that --resume continues exactly here
            if not master.records:
                log.warning("run ended (%s) before any round finished: no results to write", reason)
                return
            threads = {w.worker_id: w.threads for w in list(cluster.workers.values())}
            path, problem = save_results(
                cfg,
                reason,
                cluster.finish_detail,
                master.records,
                master.selected_history,
                state_dict_from_flat(rt.layout, master.theta, master.buffers),
                master.round,
                device=str(rt.device),
                worker_threads=threads,
            )
            written["path"], written["problem"] = path, problem
            monitor.results = str(path) if path is not None else ""
            if path is not None:
                print(f"results: {path}", flush=True)

    def end_reason() -> str:
        return cluster.finish_reason or cluster.stop_reason or outcome.ERROR

    # a resumed run keeps its id (that of its checkpoint): its workers' saved states stay of this run
    cluster = ClusterMaster(
        master,
        cfg,
        on_round=after_round,
        on_finish=write,
        run_id=run_of(ckpt, cfg.dataset_tag, cfg.mode) if resume is not None else run_id,
        data_digest=labels_digest(rt.data.train_y),
    )
    verifier = None
    if cfg.credentials:
        from .credentials import Verifier, load_master_secret

        def current_session(m: int) -> Optional[str]:
            info = cluster.workers.get(m)
            return None if info is None or info.left else info.session

        verifier = Verifier(load_master_secret(Path(cfg.credentials)), cfg.total_workers, current_session)
    monitor = RunMonitor(cfg, cluster, "cluster")
    app = create_app(
        cluster,
        model_state=lambda theta, buffers: state_dict_from_flat(rt.layout, theta, buffers),
        max_body_bytes=master.max_upload_bytes,
        on_shutdown=lambda: write(end_reason()),
        auth_token=cfg.auth_token,
        status_token_free=not cfg.status_requires_token,
        verifier=verifier,
        monitor=monitor,
    )
    log.info(
        "master listening on %s://%s:%d (%s, %d workers, %d rounds, mode %s, n=%d%s)",
        "https" if certfile else "http",
        cfg.master_host,
        cfg.master_port,
        cfg.dataset,
        cfg.total_workers,
        cfg.max_rounds,
        cfg.links,
        rt.layout.n,
        describe_buffers(cfg, rt.layout),
    )
    scheme = "https" if certfile else "http"
    log.info(
        "dashboard: %s%s (Prometheus metrics at /metrics%s)",
        page_url(scheme, cfg.master_host, cfg.master_port, sock),
        "?token=<auth_token>" if cfg.auth_token else "",
        ", with the bearer token" if cfg.auth_token else "",
    )
    if scalars is not None:
        log.info("TensorBoard scalars: %s", scalars.path)
    try:
        outcome.raise_if_interrupted()  # a signal during start-up whose exception a finalizer swallowed
        asyncio.run(
            serve(
                app,
                cluster,
                cfg.master_host,
                cfg.master_port,
                linger_s=linger_s,
                ssl_certfile=certfile,
                ssl_keyfile=keyfile,
                ssl_cafile=cafile,
                sock=sock,
            )
        )
    finally:
        write(end_reason())
        if ckpt_lock is not None:
            ckpt_lock.release()
    return MasterEnd(end_reason(), cluster.finish_detail, written.get("path"), written.get("problem", ""))


def worker_config(sections: Dict[str, Any], local: Dict[str, Any]) -> Config:
    """The run's config as the master sent it, with this device's own settings
    (``device``, ``threads``, ``data_dir``, log folders ...) from ``local``."""
    sections = {sec: dict(v) for sec, v in sections.items()}
    sections.get("system", {}).pop("auth_token", None)  # masked by the master; the worker has its own
    values = parse_mapping(sections, "master config")
    for key, value in local.items():
        if value is not None:
            values[key] = coerce(key, value, f"--{key}")
    return build(values)


def run_worker(
    worker_id: int,
    master_url: str,
    local: Dict[str, Any],
    auth_token: str = "",
    verify: Any = True,
    give_up_s: float = 300.0,
    state_dir: str = "",
    credential: Any = None,
    client_cert: Optional[Tuple[str, str]] = None,
):
    """Join the master at ``master_url`` as worker ``worker_id`` and train
    until the run ends. SIGINT/SIGTERM make the worker tell the master it
    leaves, then return.

    With a ``state_dir`` ('' = none) the worker's state (mirrors, residual,
    clock, random streams: :mod:`flq.worker_state`) is written to
    ``<state_dir>/flq_worker_<worker_id>.npz`` after every round it
    finished (in a background thread, while it waits for the next round),
    and at start it is loaded when it is of this run and worker,
    so a restarted worker goes on where it was (else it resynchronizes its
    mirrors from the master, as without a state folder). ``credential``
    (:class:`flq.credentials.WorkerCredential`) signs every call;
    ``client_cert`` is ``(certfile, keyfile)`` for a master that requires
    client certificates.

    Returns:
        A :class:`flq.transport.worker_loop.WorkerEnd` (reason, detail, rounds).

    Raises:
        ConfigError: the run's config does not fit this worker's own settings or data.
    """
    from .transport.client import Fatal, MasterClient
    from .transport.worker_loop import run_worker as loop

    client = MasterClient(
        master_url,
        worker_id,
        auth_token=auth_token,
        verify=verify,
        give_up_s=give_up_s,
        credential=credential,
        client_cert=client_cert,
    )
    store = None
    if state_dir:
        from .worker_state import WorkerStateStore

        store = WorkerStateStore(state_dir, worker_id)

    def make_worker(sections: Dict[str, Any]):
        cfg = worker_config(sections, local)
        if worker_id >= cfg.total_workers:
            raise Fatal(
                f"worker_id {worker_id} is not in this run: it has {cfg.total_workers} workers "
                f"(0..{cfg.total_workers - 1})"
            )
        from .runtime import Runtime  # PyTorch is imported only now: a master that refuses us is known sooner
        from .worker import Worker

        rt = Runtime(cfg, evaluates=False)
        log.info(
            "worker %d: %s partition of %d samples, mode %s, device %s",
            worker_id,
            cfg.partition,
            len(rt.partitions[worker_id]),
            cfg.mode,
            rt.device,
        )
        buffers0 = rt.initial_model()[1] if rt.layout.buffers else None
        worker = Worker(
            worker_id, cfg, rt.model, rt.data.train_x, rt.data.train_y, rt.partitions[worker_id], buffers0=buffers0
        )
        if store is not None:
            from .worker_state import identity

            run = client.run_info.get("run", "")
            shown = client.run_info.get("round")  # 1-based, as everything on the wire
            store.restore(worker, identity(run, worker_id, cfg, rt.model.n), round_index(shown) if shown else None)
        return worker

    try:
        with outcome.signals_interrupt():
            return loop(client, make_worker, on_round_end=store.save_later if store is not None else None)
    finally:
        if store is not None:
            store.flush()  # the last round's state is on disk before the process exits
        client.close()
