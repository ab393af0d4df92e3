"""The test accuracy ``./quickstart.sh`` should end with: its configuration
(``configs/quickstart.json``) run with several seeds, and the range that
``quickstart.sh`` prints as expected.

The seed draws the Dirichlet partition, the initial model and every
stochastic rounding, so the spread over seeds is wider than what a different
CPU or thread count does to seed 42 (the same sums in another order). The
printed range is the seeds' minimum and maximum widened by ``--margin`` on
each side.

    python benchmarks/quickstart_range.py [--seeds 42 1 2 3 4 5] [--jobs 2] [--margin 0.03]

Each run is ``flq simulate --config configs/quickstart.json --seed S
--threads 1`` in its own process, ``--jobs`` at a time. Prints each seed's
final round, test accuracy, cross-entropy and seconds of training, then the
range to put in ``quickstart.sh`` (``EXPECTED_ACC``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flq.results import read_results

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "quickstart.json"


def run(seed: int, tmp: Path) -> tuple:
    out = tmp / f"seed{seed}"
    cmd = [sys.executable, "-m", "flq", "simulate", "--config", str(CONFIG), "--seed", str(seed), "--threads", "1"]
    cmd += ["--results_dir", str(out), "--log_dir", str(out), "--no-progress"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"seed {seed}: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    (path,) = sorted(out.glob("flq_results_*.xlsx"))
    curve = read_results(path).curve
    last = curve.dropna(subset=["acc"]).iloc[-1]
    return seed, int(last["iter"]), float(last["acc"]), float(last["entropy"]), float(curve["round_time_s"].sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3, 4, 5])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--margin", type=float, default=0.03, help="widen the seeds' range by this on each side")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d, ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda s: run(s, Path(d)), args.seeds))
    for seed, k, acc, ce, secs in rows:
        print(f"seed {seed}: round {k} test accuracy {acc:.4f} cross-entropy {ce:.4f}, training {secs:.0f} s")
    accs = [r[2] for r in rows]
    lo, hi = max(0.0, min(accs) - args.margin), min(1.0, max(accs) + args.margin)
    print(f'seeds\' accuracy {min(accs):.4f} .. {max(accs):.4f}; EXPECTED_ACC="{lo:.2f} {hi:.2f}"')


if __name__ == "__main__":
    main()
