"""All workers in one process: the FLQ round of SPEC.md, step by step.

The simulator drives the same :class:`~flq.master.Master` and
:class:`~flq.worker.Worker` objects as the real cluster, passing the actual
encoded bytes between them, so a run here gives the same numbers as the
distributed run with the same config and seed.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from .config import Config
from .runtime import Runtime
from .master import Master
from .model import save_global_model
from .results import default_results_path, write_results
from .timing import Stopwatch
from .worker import Worker

log = logging.getLogger(__name__)


@dataclass
class SimulationResult:
    """What a simulation returns.

    Attributes:
        records: one dict per round (the spreadsheet's curve rows).
        selected: per round, the worker ids whose upload was aggregated.
        theta: the final global model, float32 (n,).
        results_path: the spreadsheet written, or None.
        timings: seconds per section summed over rounds
            ("compute", "quantize", "aggregate", "evaluate").
        startup_s: seconds from the call to the first round's start.
    """

    records: List[Dict[str, Any]]
    selected: List[List[int]]
    theta: np.ndarray
    results_path: Optional[Path]
    timings: Dict[str, float] = field(default_factory=dict)
    startup_s: float = 0.0


def simulate(cfg: Config, write: bool = True, progress: bool = True,
             on_round: Optional[Callable[[Dict[str, Any]], None]] = None,
             runtime: Optional[Runtime] = None) -> SimulationResult:
    """Run ``cfg.max_rounds`` rounds of FLQ with all workers in this process.

    Args:
        cfg: the configuration.
        write: write the spreadsheet to ``cfg.results_dir`` at the end (also
            after Ctrl-C, with the rounds done so far).
        progress: show a progress bar with the live test accuracy.
        on_round: called with each round's record.
        runtime: a prepared :class:`Runtime` (data, model, partitions).

    Raises:
        flq.data.DatasetNotFoundError: the dataset cannot be found or fetched.
    """
    t0 = time.perf_counter()
    rt = runtime or Runtime(cfg)
    sw = Stopwatch()
    master = Master(cfg, rt.segments, rt.initial_model(), evaluate=rt.evaluate, stopwatch=sw)
    workers = [Worker(m, cfg, rt.model, rt.data.train_x, rt.data.train_y, rt.partitions[m], stopwatch=sw)
               for m in range(cfg.total_workers)]
    startup = time.perf_counter() - t0
    log.info("start: %s, %d workers, n=%d, mode %s (b_up %d, b_down %d), %d rounds; start-up %.2f s",
             cfg.dataset, cfg.total_workers, rt.model.n, cfg.mode, cfg.uplink_bits, cfg.downlink_bits,
             cfg.max_rounds, startup)
    bar = _progress(cfg.max_rounds, progress)
    totals: Dict[str, float] = {}
    try:
        while not master.finished:
            k = master.round
            me_k = master.begin_round()                                   # step 1
            for w in workers:                                             # steps 2-5
                master.add_offer(w.offer(k, me_k, master.downlink(w.worker_id)))
            chosen = set(master.select())                                 # step 6
            for w in workers:                                             # steps 7-8
                if w.worker_id in chosen:
                    master.receive_upload(w.worker_id, w.upload(k))
                else:
                    w.skip(k)
            record = master.end_round()                                   # steps 9-10
            split = sw.take()
            record.update({f"{name}_s": sec for name, sec in split.items()})
            for name, sec in split.items():
                totals[name] = totals.get(name, 0.0) + sec
            log.info("round %d: loss %.4f acc %.4f entropy %.4f selected %d bits %d (%.2f s)", record["iter"],
                     record["loss"], record["acc"], record["entropy"], record["selcnt"], record["cum_bits_total"],
                     record["round_time_s"])
            if bar is not None:
                bar.update(1)
                if not np.isnan(record["acc"]):
                    bar.set_postfix(acc=f"{record['acc']:.4f}", sel=record["selcnt"])
            if on_round is not None:
                on_round(record)
    except KeyboardInterrupt:
        log.warning("interrupted after %d rounds; writing what was done", master.round)
    finally:
        if bar is not None:
            bar.close()
    path = None
    if write and master.records:
        path = write_results(default_results_path(cfg.results_dir, cfg.dataset, cfg.mode), cfg.mode,
                             master.records, cfg.public_sections(), selected=master.selected_history,
                             num_workers=cfg.total_workers)
        save_global_model(path.with_suffix(".safetensors"), master.theta, cfg.model, master.round, cfg.mode)
        log.info("results written to %s (final model beside it, .safetensors)", path)
    return SimulationResult(master.records, master.selected_history, master.theta.copy(), path, totals, startup)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="round", dynamic_ncols=True)
