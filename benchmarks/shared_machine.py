"""Seconds per round of the published configuration when a run has the
machine to itself and when ``--jobs`` runs share it, under each OpenMP wait
policy: why ``flq`` sets ``OMP_WAIT_POLICY=PASSIVE`` by default.

With OpenMP's default (``ACTIVE`` spinning), each PyTorch thread that
finishes a parallel region spins on its core waiting for the next one, so
two runs that each use every core burn most of their time spinning against
each other; ``PASSIVE`` threads sleep instead.

    python benchmarks/shared_machine.py [--rounds 4] [--jobs 2] [--threads 0]

Each run is ``flq simulate --config configs/paper_fmnist.json --mode bbit
--eval_every 0`` in its own process (``--threads 0``: every core). Prints,
per policy, the mean seconds per round alone and with ``--jobs`` runs at
once (each run's mean; the first round is left out as warm-up when there
are more than two rounds). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from flq.results import read_results

ROOT = Path(__file__).resolve().parent.parent


def start(policy: str, rounds: int, threads: int, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flq", "simulate", "--config", str(ROOT / "configs" / "paper_fmnist.json")]
    cmd += ["--mode", "bbit", "--rounds", str(rounds), "--eval_every", "0", "--threads", str(threads)]
    cmd += ["--results_dir", str(out), "--log_dir", str(out), "--no-progress"]
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def seconds_per_round(out: Path) -> float:
    (path,) = sorted(out.glob("flq_results_*.xlsx"))
    times = list(read_results(path).curve["round_time_s"])
    times = times[1:] if len(times) > 2 else times
    return sum(times) / len(times)


def batch(policy: str, jobs: int, rounds: int, threads: int, tmp: Path) -> list:
    outs = [tmp / f"{policy}_{jobs}_{i}" for i in range(jobs)]
    procs = [start(policy, rounds, threads, out) for out in outs]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a run failed (exit {p.returncode}): {err.strip().splitlines()[-1:]}")
    return [seconds_per_round(out) for out in outs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--jobs", type=int, default=2, help="runs sharing the machine (default 2)")
    p.add_argument("--threads", type=int, default=0, help="threads per run (default 0: every core)")
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{cores} cores; load average {os.getloadavg()[0]:.2f} at start; {args.rounds} rounds per run")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for policy in ("ACTIVE", "PASSIVE"):
            alone = batch(policy, 1, args.rounds, args.threads, tmp)[0]
            shared = batch(policy, args.jobs, args.rounds, args.threads, tmp)
            each = ", ".join(f"{s:.2f}" for s in shared)
            print(
                f"OMP_WAIT_POLICY={policy}: alone {alone:.2f} s/round; {args.jobs} at once {each} s/round "
                f"({max(shared) / alone:.1f}x slower)"
            )


if __name__ == "__main__":
    main()
