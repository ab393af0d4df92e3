"""Size and speed of entropy coding (wire format 2) on real FLQ uploads.

Runs the paper configuration (configs/paper_fmnist.json: 20 workers, non-IID
Fashion-MNIST, bbit 4/8) with entropy coding on for ``--rounds`` rounds, keeps
worker 0's innovation ``g_eff - ref_up`` of the first and the last round (the
vector its upload quantizes), then quantizes each at 2..8 bits and prints
per width: the order-0 entropy of the codes (bits per element, per tensor),
the bits per element charged in wire format 1 (``b``) and 2, and the
milliseconds to encode and to decode one 467,818-element vector (median of
``--repeat``).

    python benchmarks/coding_cost.py [--rounds 20] [--repeat 20] [--threads 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def entropy_bits(codes: np.ndarray, segments) -> float:
    """Order-0 entropy of the codes, each tensor with its own histogram (bits per element)."""
    total, start = 0.0, 0
    for size in segments:
        counts = np.bincount(codes[start : start + size].astype(np.int64))
        p = counts[counts > 0] / size
        total += float(-(p * np.log2(p)).sum()) * size
        start += size
    return total / len(codes)


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "paper_fmnist.json"))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    from flq import worker as worker_module
    from flq.algorithm import packing
    from flq.algorithm.quantize import quantize_stochastic
    from flq.config import load_config
    from flq.simulate import simulate

    kept = {}
    encode = worker_module.Worker._encode

    def keeping(self, g_eff):  # instrumentation: remember worker 0's innovation, change nothing
        if self.worker_id == 0:
            kept[len(kept) + 1] = (np.subtract(g_eff, self.ref_up, dtype=np.float32), self.model.segments)
        return encode(self, g_eff)

    worker_module.Worker._encode = keeping
    cfg = load_config(
        args.config,
        {
            "max_rounds": args.rounds,
            "eval_every": args.rounds,
            "threads": args.threads,
            "b_up": 4,
            "entropy_coding": "both",
        },
    )
    simulate(cfg, write=False, progress=False)
    worker_module.Worker._encode = encode

    print(f"worker 0's innovation, paper configuration (coded 4/8 run), n = {len(kept[1][0]):,}")
    print("bits per element, and ms to encode / decode (median); entropy: order-0, per tensor")
    head = f"{'round':>5} {'bits':>4} {'entropy':>8} {'fmt 1':>6} {'fmt 2':>6} {'fmt2/H':>7}"
    print(head + f" {'enc 1':>7} {'dec 1':>7} {'enc 2':>7} {'dec 2':>7}")
    rng = np.random.default_rng(0)
    for k in (1, len(kept)):
        x, segs = kept[k]
        for bits in range(2, 9):
            qv = quantize_stochastic(x, bits, rng, segs)
            ms = []
            for coded in (False, True):
                body = packing.encode(qv, coded=coded)
                ms.append(timed(lambda qv=qv, c=coded: packing.encode(qv, coded=c), args.repeat))
                ms.append(timed(lambda b=body, n=qv.n: packing.decode(b, expected_n=n), args.repeat))
            per = packing.charged_bits(body) / qv.n
            h = entropy_bits(qv.codes, segs)
            row = f"{k:>5} {bits:>4} {h:>8.3f} {bits:>6.3f} {per:>6.3f} {per / h:>7.3f}"
            print(row + "".join(f" {t:>7.2f}" for t in ms))


if __name__ == "__main__":
    main()
