"""Uplink bits to reach a test accuracy: bbit 4/8 as the original sends it,
with entropy coding, and with adaptive width plus entropy coding.

The original experiment's settings (configs/paper_fmnist.json: 20 workers,
non-IID Dirichlet 0.1 Fashion-MNIST, the 17e6-bit uplink budget), ``--rounds``
rounds each (default 400), the test set evaluated every ``--eval_every``
(default 10) rounds. Three runs:

* ``uncoded``  -- bbit, b_up 4, b_down 8, wire format 1 (``entropy_coding none``):
  every upload is charged ``4 n`` bits, as in the original;
* ``coded``    -- the same with entropy coding on both links: the budget
  charges each upload its real coded size;
* ``adaptive`` -- b_up 2..8 chosen per worker and round (``adaptive_width``)
  with entropy coding;
* ``coded_half`` (only with ``--runs``) -- ``coded`` with half the budget,
  8.5e6 bits: selection spends whatever budget it is given, so this shows
  what coding saves when the budget is cut to hear as many workers as the
  uncoded run does.

Prints, per run, the cumulative *real* uplink bits (``bits_up_cum``) at the
first evaluated round reaching each target accuracy, the mean uploads per
round over round ranges, and the round and uplink bits at which each coded run
first reaches the accuracy the uncoded run has at its last round. Writes the
spreadsheets under ``--out`` and draws them into one set of figures with
``flq plot --name bits_to_accuracy`` (``bits_to_accuracy_acc_vs_uplink_bits.png``:
accuracy against the cumulative uplink bits charged;
``bits_to_accuracy_acc_vs_bits.png``: against uplink + downlink bits).

    python benchmarks/bits_to_accuracy.py [--rounds 400] [--eval_every 10] [--jobs 3] [--threads 1]

``--jobs`` runs that many simulations at once (each with ``--threads``
PyTorch threads); on 2 cores ``--jobs 3 --threads 1`` takes about 45 minutes
for 400 rounds. ``--reuse`` takes a run's spreadsheet from ``--out`` when it
holds a completed run of ``--rounds`` rounds (to resume, or to re-print the
tables without running anything).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNS = {
    "uncoded": ["--b_up", "4", "--b_down", "8", "--entropy_coding", "none"],
    "coded": ["--b_up", "4", "--b_down", "8", "--entropy_coding", "both"],
    "adaptive": ["--b_up", "8", "--b_down", "8", "--entropy_coding", "both", "--adaptive_width", "true"],
    # not run by default: coded at half the budget, which hears about as many workers as uncoded does at 17e6
    "coded_half": ["--b_up", "4", "--b_down", "8", "--entropy_coding", "both", "--up_budget_bits", "8.5e6"],
}
DEFAULT_RUNS = ["uncoded", "coded", "adaptive"]
RANGES = ((1, 10), (11, 50), (51, 100), (101, 200), (201, 400))


def finished_run(out: Path, rounds: int):
    """The newest spreadsheet in ``out`` of a completed run of ``rounds`` rounds, or None."""
    from flq.results import read_results

    for xlsx in sorted(out.glob("*.xlsx"), key=lambda p: p.stat().st_mtime, reverse=True):
        res = read_results(xlsx)
        if len(res.curve) == rounds and res.config.get("run.end") == "completed":
            return xlsx
    return None


def run_one(name: str, args: argparse.Namespace) -> tuple:
    out = Path(args.out) / name
    if args.reuse:
        xlsx = finished_run(out, args.rounds)
        if xlsx is not None:
            print(f"{name}: reusing {xlsx}", flush=True)
            return name, xlsx, float("nan")
    cmd = [sys.executable, "-m", "flq", "simulate", "--config", str(ROOT / "configs" / "paper_fmnist.json")]
    cmd += ["--mode", "bbit", *RUNS[name], "--rounds", str(args.rounds), "--eval_every", str(args.eval_every)]
    cmd += ["--threads", str(args.threads), "--results_dir", str(out), "--log_dir", str(out / "logs"), "--no-progress"]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"{name}: flq simulate exited {p.returncode}: {p.stderr.strip().splitlines()[-1:]}")
    (xlsx,) = [line.split(": ", 1)[1] for line in p.stdout.splitlines() if line.startswith("results: ")]
    return name, Path(xlsx), time.time() - t0


def first_reaching(curve, target: float):
    """(round, real uplink bits, nominal uplink bits) at the first evaluated round with acc >= target."""
    hit = curve[curve["acc"] >= target]
    if hit.empty:
        return None
    row = hit.iloc[0]
    return int(row["iter"]), int(row["bits_up_cum"]), int(row["bits_up_nominal_cum"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--eval_every", type=int, default=10)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.75, 0.80, 0.85])
    ap.add_argument("--jobs", type=int, default=1, help="simulations at once")
    ap.add_argument("--threads", type=int, default=0, help="PyTorch threads per simulation (0 = all cores)")
    ap.add_argument("--out", default=str(ROOT / "results" / "bits_to_accuracy"))
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, choices=list(RUNS))
    ap.add_argument(
        "--reuse", action="store_true", help="take a run's completed spreadsheet of --rounds rounds from --out if any"
    )
    args = ap.parse_args()

    from flq.results import read_results

    with ThreadPoolExecutor(max(args.jobs, 1)) as pool:
        done = list(pool.map(lambda n: run_one(n, args), args.runs))
    runs = {name: (read_results(xlsx), xlsx, wall) for name, xlsx, wall in done}

    print(f"settings: configs/paper_fmnist.json, bbit, {args.rounds} rounds, test accuracy every {args.eval_every}")
    print("\nuplink bits (real) to reach a test accuracy; round in brackets; '-' = not reached")
    print(f"{'run':<11}" + "".join(f"{t:>24.2f}" for t in args.targets) + f"{'final acc':>12}{'wall s':>9}")
    for name, (res, _, wall) in runs.items():
        cells = []
        for t in args.targets:
            hit = first_reaching(res.curve, t)
            cells.append("-" if hit is None else f"{hit[1]:.4g} ({hit[0]})")
        final = res.curve["acc"].dropna().iloc[-1]
        print(f"{name:<11}" + "".join(f"{c:>24}" for c in cells) + f"{final:>12.4f}{wall:>9.0f}")

    print("\nuploads per round (mean selcnt; budget 17e6 bits, coded_half 8.5e6); mean width of uploads")
    header = "".join(f"{f'{a}-{b}':>12}" for a, b in RANGES if a <= args.rounds)
    print(f"{'run':<11}{header}{'width':>8}{'Mbit/round':>12}")
    for name, (res, _, _) in runs.items():
        c = res.curve
        cells = "".join(
            f"{c[(c['iter'] >= a) & (c['iter'] <= b)]['selcnt'].mean():>12.2f}" for a, b in RANGES if a <= args.rounds
        )
        per_round = c["bits_up_cum"].iloc[-1] / len(c) / 1e6
        print(f"{name:<11}{cells}{c['b_up_mean'].mean():>8.2f}{per_round:>12.2f}")

    if "uncoded" in runs:
        base = runs["uncoded"][0].curve
        goal_acc = float(base["acc"].dropna().iloc[-1])
        goal_bits = int(base["bits_up_cum"].iloc[-1])
        print(f"\nuncoded reaches {goal_acc:.4f} at round {len(base)} with {goal_bits:.4g} uplink bits")
        for name, (res, _, _) in runs.items():
            if name == "uncoded":
                continue
            hit = first_reaching(res.curve, goal_acc)
            if hit is None:
                print(f"  {name}: does not reach it in {len(res.curve)} rounds")
            else:
                ratio = hit[1] / goal_bits
                print(f"  {name}: round {hit[0]}, {hit[1]:.4g} bits = {ratio:.1%} of uncoded's (target: at most 50%)")

    plots = Path(args.out) / "plots"
    cmd = [sys.executable, "-m", "flq", "plot", *[str(x) for _, x, _ in runs.values()], "--out", str(plots)]
    cmd += ["--name", "bits_to_accuracy"]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    print(f"\nspreadsheets: {', '.join(str(x) for _, x, _ in runs.values())}")
    print(f"plots: {plots} (bits_to_accuracy_acc_vs_uplink_bits.png: accuracy against cumulative uplink bits)")
    if any(math.isnan(r.curve["acc"].dropna().iloc[-1]) for r, _, _ in runs.values()):
        raise SystemExit("a run has no evaluated accuracy")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
