"""The master and worker processes: build the objects, wire them to the
transport, write logs and results (``flq master`` / ``flq worker``)."""
from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any, Dict, Optional

from .config import Config, build, coerce, parse_mapping

log = logging.getLogger(__name__)


def run_master(cfg: Config, certfile: Optional[str] = None, keyfile: Optional[str] = None,
               grace_s: float = 5.0) -> Optional[Path]:
    """Serve one run on ``cfg.master_host:cfg.master_port`` until it completes,
    is stopped (``POST /stop``) or the process gets SIGINT/SIGTERM; the
    results spreadsheet is written in every case.

    Returns:
        The spreadsheet's path (None if no round finished).
    """
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
    written: Dict[str, Any] = {}
    lock = threading.Lock()

    def write(reason: str) -> None:
        with lock:
            if "path" in written or not master.records:
                return
            path = write_results(default_results_path(cfg.results_dir, cfg.dataset, cfg.mode), cfg.mode,
                                 master.records, cfg.to_sections(), selected=master.selected_history,
                                 num_workers=cfg.total_workers)
            written["path"] = path
            save_global_model(path.with_suffix(".safetensors"), master.theta, cfg.model, master.round, cfg.mode)
            log.info("results (%s, %d rounds) written to %s", reason, len(master.records), path)
            print(f"results: {path}", flush=True)

    cluster = ClusterMaster(master, cfg, on_finish=write)
    app = create_app(cluster, model_state=lambda theta: state_dict_from_flat(cfg.model, theta),
                     max_body_bytes=master.max_upload_bytes, on_shutdown=lambda: write("shutdown"))
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

    def make_worker(info: Dict[str, Any]) -> Worker:
        cfg = worker_config(info["config"], local)
        if worker_id >= cfg.total_workers:
            raise ValueError(f"worker_id {worker_id} out of range: the run has {cfg.total_workers} workers")
        rt = Runtime(cfg)
        log.info("worker %d: %s partition of %d samples, mode %s, device %s", worker_id, cfg.partition,
                 len(rt.partitions[worker_id]), cfg.mode, rt.device)
        return Worker(worker_id, cfg, rt.model, rt.data.train_x, rt.data.train_y, rt.partitions[worker_id])

    try:
        return loop(client, make_worker)
    finally:
        client.close()
