"""What per-worker credentials cost per request: signing on the worker and
checking on the master, for a 4-bit upload of the default model (the CNN,
n = 467,818 parameters, one scale per tensor: the payload the paper's bbit
run sends), and for a small JSON offer.

    python benchmarks/auth_cost.py [--repeat 200]

Prints the payload size and the mean microseconds of: the worker's
signature (SHA-256 of the body + HMAC of the canonical request), the
master's check (the same two plus the replay window), and the SHA-256 of
the body alone, for comparison. Single thread; the machine's caveats apply.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args()

    import hashlib

    from flq.algorithm import compressors, packing
    from flq.credentials import MasterSecret, Signer, Verifier, WorkerCredential
    from flq.model import CNN

    sizes = [p.numel() for p in CNN().parameters()]
    n = sum(sizes)
    scheme = compressors.uplink("bbit")
    rng = np.random.default_rng(0)
    g = rng.standard_normal(n).astype(np.float32)
    qv, _ = scheme.encode_update(g, np.zeros(n, np.float32), 4, rng, sizes)
    upload = packing.encode(qv)
    offer = json.dumps(
        {
            "worker_id": 3,
            "round": 7,
            "candidate": True,
            "gain": 1.5,
            "cost": 1871272.0,
            "loss": 0.4,
            "up_version": 6,
            "down_version": 7,
            "compute_s": 0.8,
        }
    ).encode()
    secret = MasterSecret(os.urandom(32), 20)
    signer = Signer(WorkerCredential(3, secret.key(3)))
    verifier = Verifier(secret, 20, lambda m: "0123456789abcdef")

    def timed(fn) -> float:
        fn()
        t = time.perf_counter()
        for _ in range(args.repeat):
            fn()
        return (time.perf_counter() - t) / args.repeat * 1e6

    def measure(label: str, path: str, query: str, body: bytes) -> None:
        headers: dict = {}
        session = "0123456789abcdef"

        def sign() -> None:
            h = signer.headers("POST", path, query, session, body)
            headers.clear()
            headers.update({k.lower(): v for k, v in h.items()}, **{"x-flq-session": session})

        def check() -> None:
            sign()  # a fresh number each time: the check includes the replay window's acceptance
            verifier.check("POST", path, query, headers, body, sequenced=True, registration=False)

        t_sign = timed(sign)
        t_check = timed(check) - t_sign
        t_hash = timed(lambda: hashlib.sha256(body).digest())
        print(f"  {label}")
        print(f"    worker: sign                {t_sign:9.1f} us")
        print(f"    master: check               {t_check:9.1f} us")
        print(f"    SHA-256 of the body alone   {t_hash:9.1f} us")

    print(f"per-worker credentials: cost per request ({args.repeat} repeats, 1 thread, {os.cpu_count()} cores)")
    measure(f"4-bit upload of the CNN ({len(upload):,} bytes)", "/round/upload", "worker_id=3&round=7", upload)
    measure(f"JSON offer ({len(offer)} bytes)", "/round/offer", "wait=20.0", offer)


if __name__ == "__main__":
    main()
