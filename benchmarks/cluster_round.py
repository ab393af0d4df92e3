"""Per-round time of the real cluster, split into compute and protocol.

Starts a master and 4 worker processes on loopback (one PyTorch thread
each), the original experiment's model and data (configs/paper_fmnist.json,
4 workers, bbit 4/8 by default), runs N rounds and reads the master's
spreadsheet:

- compute: the slowest worker's time in the round (decode the downlink,
  local training, quantize the update; reported by the worker with its
  offer) plus the master's own work (downlink quantization, upload decoding,
  aggregation + Adam, evaluation when it happens);
- protocol: the rest of the round's wall time: serialization, HTTP, and
  waiting on the network and on each other.

    python benchmarks/cluster_round.py [--rounds 10] [--workers 4] [--eval_every 1000] [--mode bbit]
                                       [--credentials] [--mtls]

``--credentials``: every worker call signed with its worker's key
(``flq credentials``); ``--mtls``: HTTPS with client certificates as well.

The first round is left out (process warm-up). Caveat: on a 2-core machine
the 4 workers share 2 cores, so their compute overlaps and stretches.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--mode", default="bbit")
    ap.add_argument("--b_up", type=int, default=4)
    ap.add_argument("--b_down", type=int, default=8)
    ap.add_argument(
        "--eval_every",
        type=int,
        default=1,
        help="test-set evaluation every N rounds (default 1, "
        "as in the original; the figures are also given without it)",
    )
    ap.add_argument("--credentials", action="store_true", help="per-worker credentials (signed worker calls)")
    ap.add_argument("--mtls", action="store_true", help="HTTPS with client certificates (mutual TLS)")
    args = ap.parse_args()

    from flq.results import read_results

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = Path(tempfile.mkdtemp(prefix="flq_cluster_bench_"))
    py = sys.executable
    creds = work / "creds"
    master_extra: list = []
    verify, scheme = True, "http"
    if args.credentials or args.mtls:
        from flq.credentials import write_credentials, write_tls

        write_credentials(creds, args.workers)
    if args.credentials:
        master_extra += ["--credentials", str(creds / "master.secret")]
    if args.mtls:
        import ssl

        write_tls(creds, args.workers, ["127.0.0.1"])
        master_extra += ["--certfile", str(creds / "master.pem"), "--keyfile", str(creds / "master-key.pem")]
        master_extra += ["--cafile", str(creds / "ca.pem")]
        verify = ssl.create_default_context(cafile=str(creds / "ca.pem"))
        verify.load_cert_chain(str(creds / "operator.pem"), str(creds / "operator-key.pem"))
        scheme = "https"

    def worker_extra(m: int) -> list:
        extra = ["--credential", str(creds / f"worker_{m}.key")] if args.credentials else []
        if args.mtls:
            extra += ["--cafile", str(creds / "ca.pem"), "--certfile", str(creds / f"worker_{m}.pem")]
            extra += ["--keyfile", str(creds / f"worker_{m}-key.pem")]
        return extra

    master = subprocess.Popen(
        [
            py,
            "-m",
            "flq",
            "master",
            "--config",
            str(REPO / "configs" / "paper_fmnist.json"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(args.workers),
            "--rounds",
            str(args.rounds),
            "--mode",
            args.mode,
            "--b_up",
            str(args.b_up),
            "--b_down",
            str(args.b_down),
            "--threads",
            "1",
            "--eval_every",
            str(args.eval_every),
            "--results_dir",
            str(work / "results"),
            "--log_dir",
            str(work / "logs"),
            *master_extra,
        ],
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    for _ in range(300):
        try:
            httpx.get(f"{scheme}://127.0.0.1:{port}/status", timeout=2, verify=verify)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    workers = [
        subprocess.Popen(
            [
                py,
                "-m",
                "flq",
                "worker",
                "--worker_id",
                str(m),
                "--master_port",
                str(port),
                "--threads",
                "1",
                "--log_dir",
                str(work / "logs"),
                *worker_extra(m),
            ],
            cwd=work,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        for m in range(args.workers)
    ]
    master.wait(timeout=3600)
    for w in workers:
        w.wait(timeout=60)
    (xlsx,) = (work / "results").glob("*.xlsx")
    curve = read_results(xlsx).curve.iloc[1:]
    master_cols = [c for c in curve.columns if c.startswith("master_") and c.endswith("_s")]

    def val(r, c):
        return float(r[c]) if c in r and r[c] == r[c] else 0.0

    rows = []
    for _, r in curve.iterrows():
        evaluation = val(r, "master_evaluate_s")
        master = sum(val(r, c) for c in master_cols) - evaluation
        worker = val(r, "worker_compute_max_s")
        total = val(r, "round_time_s")
        rows.append(
            dict(
                total=total,
                worker=worker,
                master=master,
                evaluation=evaluation,
                protocol=total - worker - master - evaluation,
                up=int(r["wire_bytes_up"]),
                down=int(r["wire_bytes_down"]),
            )
        )

    def mean(key):
        return statistics.fmean(x[key] for x in rows)

    total, protocol = mean("total"), mean("protocol")
    print(
        f"cluster: master + {args.workers} workers on loopback, mode {args.mode} (b_up {args.b_up}, "
        f"b_down {args.b_down}), eval every {args.eval_every}, {len(rows)} timed rounds (first excluded), "
        f"1 thread per process, {os.cpu_count()} cores"
        + (", per-worker credentials" if args.credentials else "")
        + (", mutual TLS" if args.mtls else "")
    )
    print(f"  round (wall)                      {total:.3f} s/round")
    print(f"  compute: slowest worker           {mean('worker'):.3f} s  (decode, local training, quantize)")
    print(
        f"  compute: master                   {mean('master'):.3f} s  (downlink quantization, decode, aggregate+Adam)"
    )
    print(f"  compute: evaluation (10k images)  {mean('evaluation'):.3f} s")
    print(
        f"  protocol (serialize, HTTP, wait)  {protocol:.3f} s  = {100 * protocol / total:.1f}% of the round; "
        f"{100 * protocol / (total - mean('evaluation')):.1f}% of the round without evaluation"
    )
    print(f"  bytes per round: up {mean('up'):,.0f}, down {mean('down'):,.0f}")
    print(f"  spreadsheet: {xlsx}")


if __name__ == "__main__":
    main()
