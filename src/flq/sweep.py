"""``flq sweep SWEEP.json``: a grid of simulations, each its own process.

A sweep file names a base config, overrides for every run, and a grid::

    {
      "config": "../configs/paper_fmnist.json",
      "set": {"max_rounds": 30, "eval_every": 3},
      "grid": {
        "mode": ["laq8", "bbit", "bin", "fedavg"],
        "seed": [1, 2]
      },
      "out": "../results/sweep_modes"
    }

``config`` and ``out`` are relative to the sweep file (``out`` defaults to
``results/sweep_<file stem>`` under the working directory). Each grid axis
is a config key and its values; a value may also be an object of several
keys (an axis named freely, e.g. ``"variant": [{"name": "bbit", "mode":
"bbit", "b_up": 4}, ...]``, ``name`` naming it in the run's folder). The
runs are the product of the axes, in file order.

Every run's config is checked before the first starts (a bad key is one
line, nothing run). Each run is ``flq simulate`` in a process of its own,
in ``OUT/<run name>/`` with its config, console output, log, spreadsheet and
model; on Ray a task per run (``num_cpus`` = its threads; ``OUT`` must be on
a filesystem all nodes share), else a local pool of processes. A run that
fails (any non-zero exit, a killed process) is reported and the others go
on. A run is done when ``OUT/<name>/done.json`` names its spreadsheet and
the digest of the config it ran with; a second ``flq sweep`` skips it while
its config is the same (a changed one runs again). A stopped sweep (SIGINT,
SIGTERM) writes ``OUT/.stop``, which makes every run in progress, on any
node, get SIGTERM and write what it did. At the end:
``OUT/summary.csv`` and ``summary.xlsx`` (final accuracy, cross-entropy,
cumulative uplink and total bits, rounds, wall seconds, status per run) and
the comparison figures of :func:`flq.plots.plot_results` in ``OUT/plots``.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from .config import Config, ConfigError, load_config

log = logging.getLogger(__name__)

#: Keys of a sweep file.
SWEEP_KEYS = ("config", "set", "grid", "out", "_comment")
#: Names a run's folder may not have: the sweep's own files in OUT.
RESERVED = ("summary.csv", "summary.xlsx", "plots")
#: Run statuses in the summary.
DONE, SKIPPED, FAILED, NOT_RUN = "completed", "skipped (done before)", "failed", "not run"
#: How long a cancelled Ray task waits for its run to write what it did, after SIGTERM (seconds).
STOP_GRACE_S = 60.0


@dataclass
class Run:
    """One run of a sweep: its name, overrides and validated config."""

    name: str
    overrides: Dict[str, Any]
    cfg: Config
    folder: Path
    status: str = NOT_RUN
    detail: str = ""
    wall_s: float = float("nan")
    results: Optional[Path] = None
    summary: Dict[str, Any] = field(default_factory=dict)

    @property
    def done_file(self) -> Path:
        return self.folder / "done.json"


def _label(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        value = int(value)
    return str(value)


def _safe(text: str) -> str:
    """A folder name: letters, digits, ``. _ = , -``; the rest becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9._=,-]", "_", text)[:120] or "_"


def read_sweep(path: Path, out: Optional[Path] = None, threads: int = 1) -> Tuple[Path, List[Run]]:
    """``(OUT folder, runs)`` of sweep file ``path``; every run's config validated.

    Args:
        path: the sweep file (JSON).
        out: overrides the file's ``out``.
        threads: each run's PyTorch threads unless the sweep sets ``threads``.

    Raises:
        flq.config.ConfigError: unreadable file, unknown sweep key, an empty
            grid axis, two runs with the same name, or a run's bad config (one line).
    """
    try:
        spec = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise ConfigError(f"cannot read sweep file {path}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a JSON sweep file ({str(exc).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected a JSON object with config, set, grid, out")
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key {unknown[0]!r} (expected {', '.join(SWEEP_KEYS[:4])})")
    base = spec.get("config")
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"{path}: 'config' must be a file name")
    base_path = str((path.parent / base).resolve()) if base else None
    common = spec.get("set", {})
    grid = spec.get("grid", {})
    if not isinstance(common, dict) or not isinstance(grid, dict):
        raise ConfigError(f"{path}: 'set' and 'grid' must be JSON objects")
    axes: List[List[Tuple[str, Dict[str, Any]]]] = []
    for axis, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid axis {axis!r} must be a non-empty list")
        choices = []
        for v in values:
            if v is None or isinstance(v, list) or (isinstance(v, dict) and not v):
                raise ConfigError(f"{path}: grid axis {axis!r}: {json.dumps(v)} is not a value or an object of keys")
            if isinstance(v, dict):
                v = dict(v)
                label = str(v.pop("name", "")) or ",".join(f"{k}={_label(x)}" for k, x in v.items())
                choices.append((label, v))
            else:
                choices.append((f"{axis}={_label(v)}", {axis: v}))
        axes.append(choices)
    if spec.get("out") is not None and not isinstance(spec["out"], str):
        raise ConfigError(f"{path}: 'out' must be a folder name")
    if out is None:
        out = (path.parent / spec["out"]).resolve() if spec.get("out") else Path("results") / f"sweep_{path.stem}"
    out = Path(out).resolve()  # the runs (and Ray's workers) may start elsewhere
    runs: List[Run] = []
    for combo in itertools.product(*axes) if axes else [()]:
        overrides: Dict[str, Any] = {"threads": threads}
        overrides.update(common)
        for _, o in combo:
            overrides.update(o)
        name = _safe("__".join(label for label, _ in combo) or "run")
        if name.startswith(".") or name in RESERVED:
            raise ConfigError(f"{path}: a run may not be named {name!r} (reserved or hidden); give it another 'name'")
        if any(r.name == name for r in runs):
            raise ConfigError(f"{path}: two runs are named {name!r}; give the grid's objects distinct 'name's")
        folder = out / name
        try:
            cfg = load_config(base_path, overrides)
        except ConfigError as exc:
            raise ConfigError(f"{path}: run {name}: {exc}") from None
        cfg = cfg.replace(results_dir=str(folder), log_dir=str(folder), checkpoint_dir=str(folder / "checkpoints"))
        runs.append(Run(name, overrides, cfg, folder))
    return out, runs


def config_digest(cfg: Config) -> str:
    """SHA-256 of a run's whole config: a run is done only for the config it ran with."""
    import hashlib

    return hashlib.sha256(json.dumps(cfg.to_sections(), sort_keys=True, default=str).encode()).hexdigest()


def _finished(run: Run) -> bool:
    """Whether ``run`` completed before with the same config (its done.json
    names a spreadsheet that exists and the config's digest)."""
    try:
        done = json.loads(run.done_file.read_text())
        sheet = Path(done["results"])
        same = done["config_sha256"] == config_digest(run.cfg)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not sheet.is_file() or not same:
        return False
    try:
        run.wall_s = float(done.get("wall_s", float("nan")))
    except (TypeError, ValueError):
        run.wall_s = float("nan")
    run.results = sheet
    return True


def command(run: Run) -> List[str]:
    """The ``flq simulate`` command line of ``run`` (its config file written
    first). Its output is a file, so it reports progress as a line a round
    (every ``max_rounds / 20``), not a bar."""
    return [
        sys.executable,
        "-m",
        "flq",
        "simulate",
        "--config",
        str((run.folder / "config.json").resolve()),
    ]


def execute(
    cmd: Sequence[str], folder: str, stop_file: str = "", on_start: Any = None
) -> Tuple[Optional[int], float, str]:
    """Run ``cmd`` with its output in ``folder/output.txt`` and its pid in
    ``folder/pid`` while it runs; ``(exit status, wall seconds, results path
    or '')``. A process killed by signal N has status -N; the status is None
    when the sweep was stopped before the run began (it never started). When ``stop_file``
    appears (the sweep was stopped; a shared filesystem carries it to every
    node) the run gets SIGTERM, writes what it did and exits; SIGKILL after
    :data:`STOP_GRACE_S`."""
    t0 = time.perf_counter()
    out, pid = Path(folder) / "output.txt", Path(folder) / "pid"
    if stop_file and os.path.exists(stop_file):  # stopped before this run began: it never starts
        return None, float("nan"), ""
    with open(out, "wb") as f:
        proc = subprocess.Popen(list(cmd), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        pid.write_text(f"{proc.pid}\n")
        if on_start is not None:
            on_start(proc)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    if stop_file and os.path.exists(stop_file):
                        proc.terminate()
                        try:
                            rc = proc.wait(STOP_GRACE_S)
                        except subprocess.TimeoutExpired:
                            proc.kill()
                            rc = proc.wait()
                        break
        finally:
            if proc.poll() is None:  # this call itself was interrupted
                proc.kill()
                proc.wait()
            pid.unlink(missing_ok=True)
    return rc, time.perf_counter() - t0, results_of(folder)


def results_of(folder: str) -> str:
    """The spreadsheet a run's output names (its ``results:`` line), or ''."""
    results = ""
    try:
        for line in (Path(folder) / "output.txt").read_text(errors="replace").splitlines():
            if line.startswith("results: "):
                results = line[len("results: ") :].strip()
    except OSError:
        pass
    return results


def _from_files(run: Run, note: str) -> Tuple[Optional[int], float, str, str]:
    """What a run left on disk when its task can no longer answer (Ray went
    away): its spreadsheet, if it wrote one, and its exit line."""
    if not (run.folder / "output.txt").exists():
        return None, float("nan"), "", ""
    text = (run.folder / "output.txt").read_text(errors="replace")
    found = re.findall(r"^flq simulate: .*\(exit (\d+)\)$", text, re.M)
    return int(found[-1]) if found else 1, float("nan"), results_of(str(run.folder)), note


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit {rc}"


class _Local:
    """Runs in a local pool of ``parallel`` processes."""

    def __init__(self, parallel: int, stop_file: str) -> None:
        self.stop_file = stop_file
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=parallel)
        self.procs: Dict[int, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.stopping = False

    def _started(self, proc: subprocess.Popen) -> None:
        with self.lock:
            self.procs[proc.pid] = proc
            if self.stopping:
                proc.terminate()

    def submit(self, run: Run) -> Any:
        def go() -> Tuple[Optional[int], float, str]:
            if self.stopping:
                return None, float("nan"), ""
            return execute(command(run), str(run.folder), self.stop_file, self._started)

        return self.pool.submit(go)

    def result(self, run: Run, handle: Any) -> Tuple[Optional[int], float, str, str]:
        """``(exit status or None when never started, wall s, results path, note)``."""
        return (*handle.result(), "")

    def stop(self) -> None:
        """First call: SIGTERM to the runs in progress (they write what they
        did), none started after; a second: SIGKILL."""
        with self.lock:
            again, self.stopping = self.stopping, True
            for p in self.procs.values():
                if p.poll() is None:
                    p.kill() if again else p.terminate()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Ray:
    """Runs as Ray tasks (one CPU per thread of the run; no retries: a failed run is reported).

    Raises:
        flq.config.ConfigError: a run needs more CPUs than any node of the cluster has.
    """

    def __init__(self, address: Optional[str], stop_file: str, runs: Sequence[Run]) -> None:
        from .ray_backend import init_ray, require_ray

        self.ray = require_ray()
        self.stop_file = stop_file
        self.started = False
        self.stopping = False
        self.cancelled = False
        if not self.ray.is_initialized():
            self.started = init_ray(self.ray, address)
        largest = max((n["Resources"].get("CPU", 0) for n in self.ray.nodes() if n.get("Alive")), default=0)
        need = max(max(1, r.cfg.threads) for r in runs)
        if need > largest:
            self.close()
            raise ConfigError(
                f"a run of this sweep needs {need} CPUs (its threads) and the Ray cluster's largest node has "
                f"{largest:g}: fewer --threads, or a bigger node"
            )
        self.task = self.ray.remote(max_retries=0)(execute)
        self.submitted: List[Tuple[Run, Any]] = []

    def submit(self, run: Run) -> Any:
        cpus = max(1, run.cfg.threads)
        ref = self.task.options(num_cpus=cpus).remote(command(run), str(run.folder), self.stop_file)
        self.submitted.append((run, ref))
        return ref

    def _cancel_queued(self) -> None:
        """Stopped: the runs not yet started never start (those running stop through the stop file)."""
        self.cancelled = True
        for run, ref in self.submitted:
            if not (run.folder / "output.txt").exists():
                try:
                    self.ray.cancel(ref)
                except Exception:  # noqa: BLE001 - finished, or Ray is gone
                    pass

    def result(self, run: Run, handle: Any) -> Tuple[Optional[int], float, str, str]:
        """As :meth:`_Local.result`; after a stop, waits at most
        :data:`STOP_GRACE_S` more, then reads what the run left on disk
        (Ray itself may be gone: a SIGTERM to the process group ends its daemons)."""
        since: Optional[float] = None
        while True:
            if self.stopping:
                if not self.cancelled:
                    self._cancel_queued()
                since = since if since is not None else time.monotonic()
                if time.monotonic() - since > STOP_GRACE_S + 5:
                    return _from_files(run, "stopped; Ray did not answer")
            try:
                ready, _ = self.ray.wait([handle], timeout=1.0)
                if ready:
                    return (*self.ray.get(handle), "")
            except Exception as exc:  # noqa: BLE001 - cancelled, the task's process died, or Ray is gone
                return _from_files(run, f"task failed: {type(exc).__name__}")

    def stop(self) -> None:
        self.stopping = True  # the stop file reaches the running tasks; result() cancels the queued ones

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            try:
                self.ray.shutdown()
            except Exception:  # noqa: BLE001 - its daemons already gone
                pass


def choose_backend(backend: str) -> str:
    """``auto``: ``ray`` when Ray is installed, else ``local``.

    Raises:
        flq.config.ConfigError: ``ray`` without Ray, or an unknown name.
    """
    if backend == "auto":
        try:
            import ray  # noqa: F401
        except ImportError:
            return "local"
        return "ray"
    if backend == "ray":
        from .ray_backend import require_ray

        require_ray()
        return backend
    if backend == "local":
        return backend
    raise ConfigError(f"--backend {backend!r}: expected auto, local or ray")


def summarize(run: Run) -> Dict[str, Any]:
    """The summary row of ``run``: its last evaluated accuracy and
    cross-entropy, cumulative bits of the last round, rounds, wall seconds."""
    row: Dict[str, Any] = {"run": run.name, "status": run.status, "detail": run.detail}
    row.update({k: v for k, v in run.overrides.items() if k != "threads"})
    row.update(final_accuracy=math.nan, final_cross_entropy=math.nan, bits_up_cum=math.nan, cum_bits_total=math.nan)
    row.update(rounds=0, wall_s=run.wall_s, results=str(run.results or ""))
    if run.results is not None and run.results.is_file():
        from .results import read_results

        try:
            curve = read_results(run.results).curve
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: the row says so, the summary goes on
            row["detail"] = (row["detail"] + "; " if row["detail"] else "") + f"unreadable spreadsheet: {exc}"
            return row
        scored = curve[curve["acc"].notna()]
        if len(scored):
            row["final_accuracy"] = float(scored["acc"].iloc[-1])
            row["final_cross_entropy"] = float(scored["entropy"].iloc[-1])
        if len(curve):
            row["rounds"] = int(curve["iter"].iloc[-1])
            row["cum_bits_total"] = float(curve["cum_bits_total"].iloc[-1])
            if "bits_up_cum" in curve:
                row["bits_up_cum"] = float(curve["bits_up_cum"].iloc[-1])
    return row


def run_sweep(
    path: Path,
    out: Optional[Path] = None,
    backend: str = "auto",
    parallel: int = 0,
    threads: int = 1,
    ray_address: Optional[str] = None,
    say: Any = print,
) -> Tuple[Path, List[Run], int]:
    """Run the sweep of ``path``: ``(OUT, runs, exit status)``.

    Exit status: 0 when every run completed (now or before), 1 when any
    failed, 130/143 when the sweep itself was stopped by SIGINT/SIGTERM (the
    runs in progress are sent SIGTERM and write what they did; the summary is
    written either way).

    Raises:
        flq.config.ConfigError: a bad sweep file or run config (nothing run).
    """
    from . import outcome

    out_dir, runs = read_sweep(path, out, threads)
    kind = choose_backend(backend)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = []
    for run in runs:
        if _finished(run):
            run.status = SKIPPED
            continue
        run.folder.mkdir(parents=True, exist_ok=True)
        (run.folder / "config.json").write_text(json.dumps(run.cfg.to_sections(), indent=2) + "\n")
        todo.append(run)
    if parallel <= 0:
        parallel = max(1, (os.cpu_count() or 1) // threads) if threads > 0 else 1
    where = "Ray tasks" if kind == "ray" else f"at most {parallel} at a time in local processes"
    runs_word = "run" if len(runs) == 1 else "runs"
    say(f"sweep: {len(runs)} {runs_word} ({len(runs) - len(todo)} done before), {where}, into {out_dir}")
    stop_file = out_dir / ".stop"
    stop_file.unlink(missing_ok=True)
    engine: Any = None
    if todo:
        engine = _Ray(ray_address, str(stop_file), todo) if kind == "ray" else _Local(parallel, str(stop_file))
    stopped: List[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        if not stopped:
            say(f"sweep: {signal.Signals(signum).name}: stopping the runs in progress (they write what they did)")
        stopped.append(signum)
        stop_file.write_text(f"{signal.Signals(signum).name}\n")
        if engine is not None:
            engine.stop()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, on_signal) for s in outcome.stop_signals()}
    try:
        handles = [(run, engine.submit(run)) for run in todo]
        for run, handle in handles:
            rc, wall, results, note = engine.result(run, handle)
            run.wall_s = wall
            if rc is None:
                run.status, run.detail = NOT_RUN, "the sweep was stopped before it started"
            elif note:  # the Ray task failed or could not answer: what the run left
                run.status, run.detail = FAILED, note
                run.results = Path(results) if results else None
            elif rc == 0 and results:
                run.status, run.results = DONE, Path(results)
                done = {"results": results, "wall_s": wall, "config_sha256": config_digest(run.cfg)}
                run.done_file.write_text(json.dumps(done) + "\n")
            else:
                run.status, run.detail = FAILED, _describe_exit(rc)
                run.results = Path(results) if results else None  # what a stopped run kept
            say(f"sweep: {run.name}: {run.status}{' (' + run.detail + ')' if run.detail else ''}, {wall:.0f} s")
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if engine is not None:
            engine.close()
        stop_file.unlink(missing_ok=True)
    rows = [summarize(r) for r in runs]
    write_summary(out_dir, rows)
    say(format_summary(rows))
    say(f"summary: {out_dir / 'summary.csv'} and {out_dir / 'summary.xlsx'}")
    sheets = [r.results for r in runs if r.status in (DONE, SKIPPED) and r.results is not None]
    if sheets:
        from .plots import plot_results

        try:
            for p in plot_results(sheets, out_dir / "plots", name="sweep"):
                say(f"plot: {p}")
        except (ValueError, KeyError, OSError) as exc:
            say(f"sweep: the comparison figures could not be drawn: {exc}")
    if stopped:
        return out_dir, runs, outcome.exit_status(outcome.signal_reason(stopped[0]))
    return out_dir, runs, 0 if all(r.status in (DONE, SKIPPED) for r in runs) else 1


def write_summary(out_dir: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """``summary.csv`` and ``summary.xlsx`` in ``out_dir`` (one row per run)."""
    import pandas as pd

    frame = pd.DataFrame(list(rows))
    frame.to_csv(out_dir / "summary.csv", index=False)
    frame.to_excel(out_dir / "summary.xlsx", index=False, sheet_name="summary")


def format_summary(rows: Sequence[Mapping[str, Any]]) -> str:
    """The summary as an aligned text table."""
    head = ("run", "status", "accuracy", "cross-entropy", "uplink bits", "rounds", "wall s")
    lines = [head]
    for r in rows:
        lines.append(
            (
                str(r["run"]),
                str(r["status"]) + (f" ({r['detail']})" if r["detail"] else ""),
                f"{r['final_accuracy']:.4f}",
                f"{r['final_cross_entropy']:.4f}",
                f"{r['bits_up_cum']:.4g}",
                str(r["rounds"]),
                f"{r['wall_s']:.0f}",
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)
