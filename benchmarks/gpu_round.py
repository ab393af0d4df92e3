"""CUDA: seconds per simulated round and peak CUDA memory, float32 vs mixed
precision vs a memory cap (the device check of the "Edge devices" work).

    python benchmarks/gpu_round.py [--rounds 20] [--cap_mb 1024]

Runs three simulations of the original settings (configs/paper_fmnist.json:
20 workers, bbit 4/8, full test set every round) on CUDA:
  1. float32;
  2. enable_mixed_precision (float16 autocast + loss scaling);
  3. float32 with gpu_memory_limit_mb = --cap_mb,
then a deliberately tiny cap (8 MiB) that must fail with a clear error, not
hang. Prints s/round (first round excluded), peak CUDA memory
(torch.cuda.max_memory_allocated) and the final test accuracy of each.
Exits 2 on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def one(args, label: str, overrides: dict) -> None:
    import torch

    from flq.config import load_config
    from flq.simulate import simulate

    cfg = load_config(
        os.path.join(HERE, "..", "configs", "paper_fmnist.json"),
        dict(max_rounds=args.rounds, device="cuda", eval_every=1, **overrides),
    )
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = simulate(cfg, write=False, progress=False)
    wall = time.perf_counter() - t0
    per_round = statistics.fmean(r["round_time_s"] for r in res.records[1:])
    peak = torch.cuda.max_memory_allocated() / 2**20
    print(
        f"{label:<34} {per_round:7.3f} s/round  peak CUDA memory {peak:8.1f} MiB  "
        f"final acc {res.records[-1]['acc']:.4f}  (wall {wall:.1f} s, start-up {res.startup_s:.1f} s)",
        flush=True,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--cap_mb", type=int, default=1024)
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (run this on a GPU machine)", file=sys.stderr)
        return 2
    if args.only == "fp32":
        one(args, "float32", {})
        return 0
    if args.only == "amp":
        one(args, "mixed precision (fp16 autocast)", {"enable_mixed_precision": True})
        return 0
    if args.only == "cap":
        one(args, f"float32, cap {args.cap_mb} MiB", {"gpu_memory_limit_mb": args.cap_mb})
        return 0
    if args.only == "tiny":
        one(args, "float32, cap 8 MiB", {"gpu_memory_limit_mb": 8})
        return 0
    props = torch.cuda.get_device_properties(0)
    print(
        f"device: {props.name}, {props.total_memory / 2**30:.1f} GiB, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}; {args.rounds} rounds each"
    )
    base = [sys.executable, os.path.abspath(__file__), "--rounds", str(args.rounds), "--cap_mb", str(args.cap_mb)]
    for what in ("fp32", "amp", "cap"):  # a fresh process each, so caps and peaks do not mix
        subprocess.run([*base, "--only", what], check=False)
    t0 = time.perf_counter()
    r = subprocess.run([*base, "--rounds", "2", "--only", "tiny"], capture_output=True, text=True, timeout=300)
    last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
    print(f"cap 8 MiB: exit {r.returncode} after {time.perf_counter() - t0:.1f} s: {last}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
