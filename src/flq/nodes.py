"""The master and worker processes: build the objects, wire them to the
transport, write logs and results (``flq master`` / ``flq worker``)."""
from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any, Dict, Optional

from .config import Config, ConfigError, build, coerce, parse_mapping

log = logging.getLogger(__name__)


#: Settings a resumed run must share with its checkpoint (the rest, such as
#: threads, ports, timeouts or max_rounds, may change across a restart).
RESUME_MUST_MATCH = ("dataset", "model", "flq_algorithm", "lazy_selection", "budget_selection")


def check_resumable(saved: Dict[str, Any], cfg: Config) -> None:
    """Raise CheckpointError naming the first setting that differs."""
    from .checkpoint import CheckpointError

    now = cfg.to_sections()
    keys = [(sec, k) for sec in RESUME_MUST_MATCH for k in now[sec]] + [("system", "total_workers"),
                                                                         ("system", "seed")]
    for sec, k in keys:
        if saved.get(sec, {}).get(k) != now[sec][k]:
            raise CheckpointError(f"checkpoint was written with {sec}.{k} = {saved.get(sec, {}).get(k)!r}, "
                                  f"this run has {now[sec][k]!r}: not the same run")


def check_port_free(host: str, port: int) -> None:
    """Raise ConfigError when ``host:port`` cannot be listened on (in use, bad address)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"config key 'system.master_host': cannot resolve {host!r} ({exc})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); another master running? "
                              f"choose another --port") from None


def load_resume_state(cfg: Config) -> Dict[str, Any]:
    """The master state a resumed run continues from, read once and checked.

    Raises:
        flq.checkpoint.CheckpointError: no usable checkpoint, one of another
            run, or one already at ``max_rounds``.
    """
    from .checkpoint import CheckpointError, checkpoint_path, load_checkpoint

    ckpt = checkpoint_path(cfg.checkpoint_dir, cfg.dataset, cfg.mode)
    state, saved_cfg = load_checkpoint(ckpt)
    check_resumable(saved_cfg, cfg)
    if int(state["round"]) >= cfg.max_rounds:
        raise CheckpointError(f"{ckpt} is already at round {state['round']} of max_rounds {cfg.max_rounds}: "
                              f"raise --rounds to train further")
    return state


def run_master(cfg: Config, certfile: Optional[str] = None, keyfile: Optional[str] = None,
               grace_s: float = 5.0, resume_state: Optional[Dict[str, Any]] = None) -> Optional[Path]:
    """Serve one run on ``cfg.master_host:cfg.master_port`` until it completes,
    is stopped (``POST /stop``) or the process gets SIGINT/SIGTERM; the
    results spreadsheet is written in every case. Every
    ``checkpoint_every`` rounds the master's state is checkpointed;
    ``resume_state`` (from :func:`load_resume_state`) continues a run.
    The caller checks the port first (:func:`check_port_free`).

    Returns:
        The spreadsheet's path (None if no round finished).
    """
    from .checkpoint import checkpoint_path, save_checkpoint
    from .cluster import ClusterMaster
    from .master import Master
    from .model import save_global_model, state_dict_from_flat
    from .results import default_results_path, write_results
    from .runtime import Runtime
    from .timing import Stopwatch
    from .transport.server import create_app, serve

    rt = Runtime(cfg)
    rt.data  # load (or fail on) the dataset before serving anybody
    master = Master(cfg, rt.segments, rt.initial_model(), evaluate=rt.evaluate, stopwatch=Stopwatch())
    ckpt = checkpoint_path(cfg.checkpoint_dir, cfg.dataset, cfg.mode)
    if resume_state is not None:
        master.load_state_dict(resume_state)
        log.info("resumed from %s at round %d", ckpt, master.round)
    written: Dict[str, Any] = {}
    lock = threading.Lock()

    def checkpoint(record: Dict[str, Any]) -> None:
        if cfg.checkpoint_every and master.round % cfg.checkpoint_every == 0:
            save_checkpoint(ckpt, master.state_dict(), cfg.public_sections())
            log.info("checkpoint at round %d: %s", master.round, ckpt)

    def write(reason: str) -> None:
        with lock:
            if "path" in written or not master.records:
                return
            path = write_results(default_results_path(cfg.results_dir, cfg.dataset, cfg.mode), cfg.mode,
                                 master.records, cfg.public_sections(), selected=master.selected_history,
                                 num_workers=cfg.total_workers)
            written["path"] = path
            save_global_model(path.with_suffix(".safetensors"), master.theta, cfg.model, master.round, cfg.mode)
            log.info("results (%s, %d rounds) written to %s", reason, len(master.records), path)
            print(f"results: {path}", flush=True)

    cluster = ClusterMaster(master, cfg, on_round=checkpoint, on_finish=write)
    app = create_app(cluster, model_state=lambda theta: state_dict_from_flat(cfg.model, theta),
                     max_body_bytes=master.max_upload_bytes, on_shutdown=lambda: write("shutdown"),
                     auth_token=cfg.auth_token, status_token_free=not cfg.status_requires_token)
    log.info("master listening on %s:%d (%s, %d workers, %d rounds, mode %s)", cfg.master_host, cfg.master_port,
             cfg.dataset, cfg.total_workers, cfg.max_rounds, cfg.mode)
    try:
        asyncio.run(serve(app, cluster, cfg.master_host, cfg.master_port, grace_s=grace_s,
                          ssl_certfile=certfile, ssl_keyfile=keyfile))
    finally:
        write("exit")
    return written.get("path")


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


def run_worker(worker_id: int, master_url: str, local: Dict[str, Any], auth_token: str = "",
               verify: Any = True, give_up_s: float = 300.0) -> int:
    """Join the master at ``master_url`` as worker ``worker_id`` and train
    until the master ends the run.

    Returns:
        Number of rounds this worker offered in.
    """
    from .runtime import Runtime
    from .transport.client import MasterClient, run_worker as loop
    from .worker import Worker

    client = MasterClient(master_url, worker_id, auth_token=auth_token, verify=verify, give_up_s=give_up_s)

    def make_worker(sections: Dict[str, Any]) -> Worker:
        cfg = worker_config(sections, local)
        if worker_id >= cfg.total_workers:
            raise ConfigError(f"worker_id {worker_id} out of range: the run has {cfg.total_workers} workers")
        rt = Runtime(cfg)
        log.info("worker %d: %s partition of %d samples, mode %s, device %s", worker_id, cfg.partition,
                 len(rt.partitions[worker_id]), cfg.mode, rt.device)
        return Worker(worker_id, cfg, rt.model, rt.data.train_x, rt.data.train_y, rt.partitions[worker_id])

    try:
        return loop(client, make_worker)
    finally:
        client.close()
