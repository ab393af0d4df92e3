"""What the simulator and the cluster master both report of a run: each
round's timing columns and log line, and at the end the results on disk.

One implementation for both, so a simulated and a distributed run give
spreadsheets with the same columns and logs with the same lines.

Per-round timing columns (seconds), besides ``round_time_s`` and
``worker_compute_max_s`` that :meth:`flq.master.Master.end_round` records:

* ``master_<section>_s``: the master's own work in the round, by
  :class:`~flq.timing.Stopwatch` section: ``master_quantize_s`` (downlink
  quantization, upload decoding), ``master_aggregate_s`` (aggregation and the
  Adam step), ``master_evaluate_s`` (the test set; only in rounds evaluated;
  with ``eval_overlap`` it ran in the background, beside the next round,
  and ``master_evaluate_wait_s`` is what the round waited for a free slot
  in the evaluation queue: the part on the critical path).
* ``workers_<section>_s``: in the simulator only, where every worker runs in
  the same process, the workers' work summed over them: ``workers_compute_s``
  (local training) and ``workers_quantize_s`` (downlink decoding, update
  quantization and encoding). On the cluster each worker reports its round
  as one figure (``worker_compute_max_s``: the slowest worker's).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from .logs import FILE_ONLY
from .timing import Stopwatch

log = logging.getLogger(__name__)


def round_timings(master: Stopwatch, workers: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
    """The round's timing columns: the seconds ``master`` measured since the
    last call, per section, as ``master_<section>_s`` (the stopwatch starts
    again from zero), and with ``workers`` (seconds per section the workers
    spent, e.g. :meth:`flq.pool.WorkerPool.timings`) ``workers_<section>_s``."""
    out = {f"master_{name}_s": sec for name, sec in master.take().items()}
    if workers is not None:
        out.update({f"workers_{name}_s": sec for name, sec in workers.items()})
    return out


def log_round(record: Mapping[str, Any]) -> None:
    """Log a round's one-line summary (INFO) from its record."""
    log.info(
        "round %d: loss %.4f acc %.4f entropy %.4f selected %d/%d bits %d wire up %d down %d B (%.2f s)",
        record["iter"],
        record["loss"],
        record["acc"],
        record["entropy"],
        record["selcnt"],
        record["offers"],
        record["cum_bits_total"],
        record["wire_bytes_up"],
        record["wire_bytes_down"],
        record["round_time_s"],
    )


def describe_buffers(cfg: Any, layout: Any) -> str:
    """For start-up lines: ``" + 2760 bytes of buffers (average: sent raw)"``, or '' for a model without buffers."""
    if not layout.buffers:
        return ""
    how = "sent raw, averaged" if cfg.buffers == "average" else "kept by each worker"
    return f" + {layout.buffer_bytes} bytes of buffers in {len(layout.buffers)} tensors ({cfg.buffers}: {how})"


def save_results(
    cfg: Any,
    reason: str,
    detail: str,
    records: Sequence[Mapping[str, Any]],
    selected: Sequence[Sequence[int]],
    model_state: Mapping[str, Any],
    rounds: int,
    **runtime: Any,
) -> Tuple[Optional[Path], str]:
    """Write a run's results: its spreadsheet, at a new
    ``flq_results_<dataset>_<mode>_<timestamp>.xlsx`` in ``cfg.results_dir``
    (:func:`flq.outputs.save_run`), with the config sheet of
    :func:`flq.outputs.results_config` (``reason``, ``detail`` and
    ``runtime``, e.g. ``device``), and the final model (``model_state``, a
    state dict: :func:`flq.model.state_dict_from_flat`) after ``rounds``
    rounds beside it. Logs where they went, or why they could not
    be written (to the log file only: the command line prints that itself).

    Returns:
        ``(spreadsheet path or None, '' or the one-line reason they could
        not be written)``.
    """
    from .outputs import results_config, save_run
    from .results import default_results_path

    path, problem = save_run(
        default_results_path(cfg.results_dir, cfg.dataset_tag, cfg.mode),
        cfg.mode,
        list(records),
        results_config(cfg, reason, detail, **runtime),
        list(selected),
        cfg.total_workers,
        model_state,
        rounds,
    )
    if problem:
        log.error("%s", problem, extra=FILE_ONLY)
    else:
        log.info(
            "results (%s, %d rounds) written to %s (final model beside it, .safetensors)", reason, len(records), path
        )
    return path, problem or ""
