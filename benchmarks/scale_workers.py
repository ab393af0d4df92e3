"""Rounds per second and peak memory of a simulation as the federation grows,
with the workers in this process (``--backend local``) or in Ray actors.

    .venv/bin/python benchmarks/scale_workers.py                  # the full table (about 10 minutes on 2 cores)
    .venv/bin/python benchmarks/scale_workers.py --cases mlp:20 mlp:1000 --backends local

Each case is one ``flq simulate`` process on real Fashion-MNIST (the paper's
settings: non-IID Dirichlet 0.1, bbit 4/8, 17e6-bit budget; no test-set
evaluation): the small ``mlp`` model with 20, 100 and 1,000 workers, the
paper's CNN with 20 and 200. Local runs use every core (``--threads 0``);
Ray runs start a local cluster and use its defaults (one actor of one thread
per CPU). Printed per case: the median round time and rounds per second
(from the spreadsheet's ``round_time_s``, start-up excluded), the start-up,
and the peak memory, sampled every 0.25 s as the proportional set size (PSS:
shared pages split between the processes sharing them, so the object store
is counted once) of the flq process with its children plus Ray's
``WorkerHost`` actors; Ray's own daemons (GCS, raylet, dashboard) are listed
apart. The memory per worker is the slope between the two largest ``mlp``
cases of a backend.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
CASES = ["mlp:20", "mlp:100", "mlp:1000", "cnn:20", "cnn:200"]
ROUNDS = {"mlp": 6, "cnn": 4}


def _pss(p: psutil.Process) -> int:
    try:
        return p.memory_full_info().pss
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0


def _ray_processes():
    actors, daemons = [], []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        first = cmd[0] if cmd else ""
        if first.startswith("ray::WorkerHost"):
            actors.append(p)
        elif first.startswith("ray::") or any(
            s in " ".join(cmd[:3]) for s in ("gcs_server", "raylet", "dashboard", "ray/_private", "log_monitor")
        ):
            daemons.append(p)
    return actors, daemons


class Sampler(threading.Thread):
    """Peak PSS of ``pid`` + its children + Ray's WorkerHost actors (and, apart, Ray's daemons)."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak = self.peak_daemons = 0
        self.done = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            actors, daemons = _ray_processes()
            ray_own = {p.pid for p in daemons}
            work = {p.pid: p for p in [*tree, *actors] if p.pid not in ray_own}
            self.peak = max(self.peak, sum(_pss(p) for p in work.values()))
            self.peak_daemons = max(self.peak_daemons, sum(_pss(p) for p in daemons))
            self.done.wait(self.every)


def run_case(model: str, workers: int, backend: str, rounds: int, out: Path) -> dict:
    from flq.results import read_results

    folder = out / f"{backend}_{model}_{workers}"
    cmd = [
        sys.executable, "-m", "flq", "simulate", "--config", str(ROOT / "configs" / "paper_fmnist.json"),
        "--model", model, "--workers", str(workers), "--rounds", str(rounds), "--eval_every", "0",
        "--results_dir", str(folder), "--log_dir", str(folder / "logs"), "--no-progress", "--backend", backend,
    ]  # fmt: skip
    if backend == "local":
        cmd += ["--threads", "0"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate(timeout=3600)
    sampler.done.set()
    sampler.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{backend} {model} x{workers} failed (exit {proc.returncode}): {stderr.strip()[-600:]}")
    (xlsx,) = folder.glob("flq_results_*.xlsx")
    times = list(read_results(xlsx).curve["round_time_s"])
    steady = times[1:] if len(times) > 2 else times  # the first round warms caches and Ray's workers
    med = statistics.median(steady)
    return {
        "backend": backend,
        "model": model,
        "workers": workers,
        "rounds": rounds,
        "round_s": med,
        "rounds_per_s": 1 / med,
        "startup_s": wall - sum(times),
        "peak_mib": sampler.peak / 2**20,
        "ray_daemons_mib": sampler.peak_daemons / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=CASES, help="model:workers (default: %(default)s)")
    ap.add_argument("--backends", nargs="+", default=["local", "ray"], choices=["local", "ray"])
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="flq-scale-") as tmp:
        for case in args.cases:
            model, workers = case.split(":")
            for backend in args.backends:
                row = run_case(model, int(workers), backend, ROUNDS[model], Path(tmp))
                rows.append(row)
                print(
                    f"{backend:5s} {model:3s} {row['workers']:5d} workers: {row['round_s']:7.3f} s/round "
                    f"({row['rounds_per_s']:.3f} rounds/s), start-up {row['startup_s']:5.1f} s, peak "
                    f"{row['peak_mib']:7.0f} MiB"
                    + (f" (+{row['ray_daemons_mib']:.0f} MiB Ray daemons)" if backend == "ray" else ""),
                    flush=True,
                )
    for backend in args.backends:
        mlp = sorted((r for r in rows if r["backend"] == backend and r["model"] == "mlp"), key=lambda r: r["workers"])
        if len(mlp) >= 2:
            a, b = mlp[-2], mlp[-1]
            per = (b["peak_mib"] - a["peak_mib"]) / (b["workers"] - a["workers"])
            print(f"{backend}: memory per mlp worker {per * 1024:.0f} KiB ({a['workers']} -> {b['workers']} workers)")
    cpu = f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    print(f"machine: {cpu}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
