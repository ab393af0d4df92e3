"""How far two simulations of one config drift apart when they compute with
different thread counts (PyTorch's sums are ordered by thread), and that
they do not drift at all at the same count: why the simulator equals the
cluster bit for bit only at the same ``threads``.

    python benchmarks/thread_count.py [--rounds 6] [--workers 4] [--threads 1 2]

Prints, after each run pair, the largest difference in the global model's
weights and in the recorded losses, and whether the models are identical.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from flq.config import load_config
from flq.simulate import simulate

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "paper_fmnist.json"


def run(threads: int, rounds: int, workers: int):
    torch.set_num_threads(threads)
    cfg = load_config(
        str(CONFIG), {"total_workers": workers, "max_rounds": rounds, "threads": threads, "eval_every": 1000}
    )
    return simulate(cfg, write=False, progress=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--threads", type=int, nargs=2, default=[1, 2])
    args = p.parse_args()
    a, b, a2 = (run(t, args.rounds, args.workers) for t in (*args.threads, args.threads[0]))
    for label, x, y in (
        (f"threads {args.threads[0]} vs {args.threads[1]}", a, b),
        (f"threads {args.threads[0]} vs {args.threads[0]}", a, a2),
    ):
        loss = max(abs(r["loss"] - s["loss"]) for r, s in zip(x.records, y.records))
        print(
            f"{label}: {args.rounds} rounds, {args.workers} workers: max |weight difference| "
            f"{float(np.abs(x.theta - y.theta).max()):.3g}, max |loss difference| {loss:.3g}, "
            f"identical: {np.array_equal(x.theta, y.theta)}"
        )


if __name__ == "__main__":
    main()
