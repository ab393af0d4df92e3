"""Seconds per simulated round, split by phase, and start-up time; and the
original TensorFlow script's seconds per round on the same work, when
TensorFlow is installed.

The original experiment's settings (configs/paper_fmnist.json: 20 workers,
batch 64, non-IID Dirichlet 0.1, the 467,818-parameter CNN, bbit 4/8), the
whole 10,000-image test set evaluated every round: the same work per round
as the original's ``flq_fed_v3.py``.

    python benchmarks/simulate_round.py [--rounds 10] [--mode bbit] [--b_up 4] [--b_down 8] [--threads 2]
                                        [--eval_overlap true|false]
                                        [--original path/to/flq_fed_v3.py] [--original_python python]

Prints start-up (process start to the first round), then the mean seconds
per round of: local computation (forward/backward of every worker),
quantization and packing (downlink and uplink encode/decode), aggregation
(aggregate + Adam step), evaluation (with ``eval_overlap`` in a background
thread beside the next round: then what the round waited for it), and the
whole round. With ``--original`` (the original project's script) and an
interpreter that has TensorFlow, that script runs the same settings for the
same rounds and its seconds per round (from the time its per-round lines
appear, first round excluded) are printed beside ours; its Fashion-MNIST
comes from ``~/.keras/datasets/fashion-mnist`` (the same four IDX files: copy
them there to run it offline).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional


def original_round_s(args, cfg) -> Optional[float]:
    """Run the original's script on ``cfg``'s settings for ``args.rounds``
    rounds and return its mean seconds per round (first round excluded), or
    print in one line why it was not measured and return None."""
    if not args.original:
        print(
            "  original (TensorFlow): not measured; give --original path/to/flq_fed_v3.py (the original "
            "project's script) and an interpreter with TensorFlow (pip install tensorflow-cpu)"
        )
        return None
    probe = subprocess.run([args.original_python, "-c", "import tensorflow"], capture_output=True, text=True)
    if probe.returncode != 0:
        why = f"{args.original_python} has no TensorFlow (pip install tensorflow-cpu)"
        print(f"  original (TensorFlow): not measured; {why}")
        return None
    cmd = [
        args.original_python, "-u", os.path.abspath(args.original), "--dataset", "fmnist", "--mode", cfg.mode,
        "--iters", str(args.rounds), "--M", str(cfg.total_workers), "--batch", str(cfg.batch_size),
        "--partition", cfg.partition, "--dir_alpha", str(cfg.dir_alpha), "--b", str(cfg.b_up),
        "--b_down", str(cfg.b_down), "--lr", str(cfg.lr), "--cl", str(cfg.l2), "--seed", str(cfg.seed),
        "--sel_clients", str(cfg.sel_clients), "--up_budget_bits", str(cfg.up_budget_bits),
        "--D", str(cfg.D), "--ck", str(cfg.ck), "--C", str(int(cfg.C)), "--warmup", str(cfg.warmup),
        "--thr_scale", str(cfg.thr_scale),
    ]  # fmt: skip
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS=str(args.threads), TF_NUM_INTEROP_THREADS="1")
    arrivals = []
    with tempfile.TemporaryDirectory(prefix="flq_original_") as work:
        proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            if re.match(r"\[\d+/\d+\] acc=", line):
                arrivals.append(time.perf_counter())
        if proc.wait(timeout=3600) != 0 or len(arrivals) < 2:
            print(f"  original (TensorFlow): failed (exit {proc.returncode}, {len(arrivals)} rounds printed)")
            return None
    return statistics.fmean(b - a for a, b in zip(arrivals, arrivals[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "paper_fmnist.json"))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--mode", default="bbit")
    ap.add_argument("--b_up", type=int, default=4)
    ap.add_argument("--b_down", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--eval_batch_size", type=int, default=None)
    ap.add_argument("--eval_overlap", default=None, help="true/false (default: the config's, true)")
    ap.add_argument("--original", default="", help="the original's flq_fed_v3.py, run for comparison")
    ap.add_argument("--original_python", default=sys.executable, help="an interpreter with TensorFlow")
    args = ap.parse_args()

    from flq.config import load_config
    from flq.simulate import simulate
    from flq.timing import process_age_s

    overrides = {
        "max_rounds": args.rounds,
        "mode": args.mode,
        "b_up": args.b_up,
        "b_down": args.b_down,
        "threads": args.threads,
        "eval_every": 1,
        "eval_batch_size": args.eval_batch_size,
        "eval_overlap": args.eval_overlap,
    }
    cfg = load_config(args.config, overrides)
    first_round = {}

    def on_round(rec):
        first_round.setdefault("t", process_age_s() - rec["round_time_s"])  # process start -> round 1 began

    res = simulate(cfg, write=False, progress=False, on_round=on_round)
    startup = first_round["t"]
    recs = res.records[1:] if len(res.records) > 1 else res.records  # round 1 warms up oneDNN

    def mean(*keys):
        return statistics.fmean(sum(r.get(key, 0.0) for key in keys) for r in recs)

    print(
        f"settings: {cfg.dataset}, {cfg.total_workers} workers, batch {cfg.batch_size}, mode {cfg.mode} "
        f"(b_up {cfg.uplink_bits}, b_down {cfg.downlink_bits}), threads {cfg.threads}, "
        f"eval batch {cfg.eval_batch_size}, {len(recs)} timed rounds (first round excluded)"
    )
    print(f"start-up (process start -> first round): {startup:.2f} s")
    for label, keys in (
        ("local computation", ("workers_compute_s",)),
        ("quantization + packing", ("workers_quantize_s", "master_quantize_s")),
        ("aggregation + Adam", ("master_aggregate_s",)),
        ("evaluation (10k test images)", ("master_evaluate_s",)),
    ):
        print(f"  {label:<30} {mean(*keys):.3f} s/round")
    if cfg.eval_overlap:
        print(f"  {'  (in the background; waited)':<30} {mean('master_evaluate_wait_s'):.3f} s/round")
    total = mean("round_time_s")
    print(f"  {'round (total)':<30} {total:.3f} s/round")
    original = original_round_s(args, cfg)
    if original is not None:
        print(f"  {'original (TensorFlow) round':<30} {original:.3f} s/round -> {original / total:.2f}x")
    print(
        f"  rounds min/median/max: {min(r['round_time_s'] for r in recs):.3f} / "
        f"{statistics.median(r['round_time_s'] for r in recs):.3f} / {max(r['round_time_s'] for r in recs):.3f} s"
    )


if __name__ == "__main__":
    main()
