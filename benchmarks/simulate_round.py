"""Seconds per simulated round, split by phase, and start-up time.

The original experiment's settings (configs/paper_fmnist.json: 20 workers,
batch 64, non-IID Dirichlet 0.1, the 467,818-parameter CNN), float32, the
whole 10,000-image test set evaluated every round: the same work per round
as the original TensorFlow script (about 2.7 s per round and 34 s to the
first round on the 2-core development machine).

    python benchmarks/simulate_round.py [--rounds 10] [--mode bbit] [--b_up 4] [--b_down 8] [--threads 2]

Prints start-up (process start to the first round), then the mean seconds
per round of: local computation (forward/backward of every worker),
quantization and packing (downlink and uplink encode/decode), aggregation
(aggregate + Adam step), evaluation, and the whole round.
"""

from __future__ import annotations

import time

_T_SCRIPT = time.time()

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402


def process_start_time() -> float:
    """Wall-clock time this process started (Linux /proc), else this script's start."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _T_SCRIPT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "paper_fmnist.json"))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--mode", default="bbit")
    ap.add_argument("--b_up", type=int, default=4)
    ap.add_argument("--b_down", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--eval_batch_size", type=int, default=None)
    args = ap.parse_args()

    from flq.config import load_config
    from flq.simulate import simulate

    overrides = {
        "max_rounds": args.rounds,
        "mode": args.mode,
        "b_up": args.b_up,
        "b_down": args.b_down,
        "threads": args.threads,
        "eval_every": 1,
        "eval_batch_size": args.eval_batch_size,
    }
    cfg = load_config(args.config, overrides)
    first_round = {}

    def on_round(rec):
        first_round.setdefault("t", time.time() - rec["round_time_s"])

    res = simulate(cfg, write=False, progress=False, on_round=on_round)
    startup = first_round["t"] - process_start_time()
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
    total = mean("round_time_s")
    print(f"  {'round (total)':<30} {total:.3f} s/round  (original TF script: ~2.7 s/round -> {2.7 / total:.2f}x)")
    print(
        f"  rounds min/median/max: {min(r['round_time_s'] for r in recs):.3f} / "
        f"{statistics.median(r['round_time_s'] for r in recs):.3f} / {max(r['round_time_s'] for r in recs):.3f} s"
    )


if __name__ == "__main__":
    main()
