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

``measure_cluster()`` is the measurement as a function (returns the rows
and their means; benchmarks/compare_flower.py uses it).

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
from typing import Any, Dict, Sequence

import httpx

REPO = Path(__file__).resolve().parents[1]


def _stop(procs: list, grace_s: float = 10.0) -> None:
    """End those of ``procs`` (Popen objects this module started) still running:
    SIGTERM, then SIGKILL after ``grace_s``."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        p.terminate()
    deadline = time.monotonic() + grace_s
    for p in running:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def measure_cluster(
    rounds: int = 10,
    workers: int = 4,
    extra_master_args: Sequence[str] = (),
    *,
    mode: str = "bbit",
    b_up: int = 4,
    b_down: int = 8,
    eval_every: int = 1,
    credentials: bool = False,
    mtls: bool = False,
    timeout_s: float = 3600.0,
    port: int = 0,
) -> Dict[str, Any]:
    """Run a master and ``workers`` worker processes on loopback for ``rounds``
    rounds (configs/paper_fmnist.json, one PyTorch thread each) and read the
    master's spreadsheet.

    ``extra_master_args`` go to ``flq master`` after the others (so they win).
    The run must end within ``timeout_s``; every process started here is
    ended however this returns (an error, Ctrl-C). ``port``: the master's
    (0 = a free one), for a caller that watches the run while it goes.

    Returns a dict: ``rows`` (one dict per timed round, the first round left
    out: ``total`` = the spreadsheet's ``round_time_s``, ``worker``,
    ``master``, ``evaluation``, ``protocol`` in seconds, ``up``/``down`` wire
    bytes), ``means`` (the mean of each of those keys), ``timed_rounds``,
    ``xlsx`` (the spreadsheet) and ``work`` (the run's folder).

    Raises:
        RuntimeError: the master did not start, or the run left no spreadsheet.
        subprocess.TimeoutExpired: the run took longer than ``timeout_s``.
    """
    from flq.results import read_results

    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    work = Path(tempfile.mkdtemp(prefix="flq_cluster_bench_"))
    py = sys.executable
    creds = work / "creds"
    master_extra: list = []
    verify: Any = True
    scheme = "http"
    if credentials or mtls:
        from flq.credentials import write_credentials, write_tls

        write_credentials(creds, workers)
    if credentials:
        master_extra += ["--credentials", str(creds / "master.secret")]
    if mtls:
        import ssl

        write_tls(creds, workers, ["127.0.0.1"])
        master_extra += ["--certfile", str(creds / "master.pem"), "--keyfile", str(creds / "master-key.pem")]
        master_extra += ["--cafile", str(creds / "ca.pem")]
        verify = ssl.create_default_context(cafile=str(creds / "ca.pem"))
        verify.load_cert_chain(str(creds / "operator.pem"), str(creds / "operator-key.pem"))
        scheme = "https"

    def worker_extra(m: int) -> list:
        extra = ["--credential", str(creds / f"worker_{m}.key")] if credentials else []
        if mtls:
            extra += ["--cafile", str(creds / "ca.pem"), "--certfile", str(creds / f"worker_{m}.pem")]
            extra += ["--keyfile", str(creds / f"worker_{m}-key.pem")]
        return extra

    procs: list = []
    try:
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
                str(workers),
                "--rounds",
                str(rounds),
                "--mode",
                mode,
                "--b_up",
                str(b_up),
                "--b_down",
                str(b_down),
                "--threads",
                "1",
                "--eval_every",
                str(eval_every),
                "--results_dir",
                str(work / "results"),
                "--log_dir",
                str(work / "logs"),
                *master_extra,
                *extra_master_args,
            ],
            cwd=work,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        procs.append(master)
        for _ in range(300):
            if master.poll() is not None:
                raise RuntimeError(f"flq master exited with status {master.returncode} (log in {work / 'logs'})")
            try:
                httpx.get(f"{scheme}://127.0.0.1:{port}/status", timeout=2, verify=verify)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"flq master did not answer on port {port} within 60 s (log in {work / 'logs'})")
        for m in range(workers):
            procs.append(
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
            )
        master.wait(timeout=timeout_s)
        for w in procs[1:]:
            w.wait(timeout=60)
    finally:
        _stop(procs)
    found = list((work / "results").glob("*.xlsx"))
    if len(found) != 1:
        raise RuntimeError(f"expected one spreadsheet in {work / 'results'}, found {len(found)} (master log in {work})")
    xlsx = found[0]
    curve = read_results(xlsx).curve.iloc[1:]
    master_cols = [c for c in curve.columns if c.startswith("master_") and c.endswith("_s")]

    def val(r, c):
        return float(r[c]) if c in r and r[c] == r[c] else 0.0

    rows = []
    for _, r in curve.iterrows():
        evaluated = val(r, "master_evaluate_s")
        overlapped = "master_evaluate_wait_s" in r and r["master_evaluate_wait_s"] == r["master_evaluate_wait_s"]
        # in line, the evaluation is in the round; in the background (eval_overlap) only the wait for it is
        evaluation = val(r, "master_evaluate_wait_s") if overlapped else evaluated
        master_s = sum(val(r, c) for c in master_cols) - evaluated - val(r, "master_evaluate_wait_s")
        worker = val(r, "worker_compute_max_s")
        total = val(r, "round_time_s")
        rows.append(
            dict(
                total=total,
                worker=worker,
                master=master_s,
                evaluation=evaluation,
                background=evaluated if overlapped else 0.0,
                protocol=total - worker - master_s - evaluation,
                up=int(r["wire_bytes_up"]),
                down=int(r["wire_bytes_down"]),
            )
        )
    if not rows:
        raise RuntimeError(f"{xlsx}: no timed round (the first is left out: run at least 2)")
    means = {key: statistics.fmean(x[key] for x in rows) for key in rows[0]}
    requests = served_requests(work)
    worker_calls = sum(v for k, v in requests.items() if k.split(" ")[-1].startswith(("/round/", "/workers/")))
    return dict(
        rows=rows,
        means=means,
        timed_rounds=len(rows),
        xlsx=xlsx,
        work=work,
        requests=requests,
        requests_per_round=worker_calls / (workers * (len(rows) + 1)),
    )


def served_requests(work: Path) -> dict:
    """The master's last log line of HTTP requests served: ``{"METHOD /path": n}``
    (registration, heartbeats and leaving included)."""
    for log in (work / "logs").glob("master_*.log"):
        for line in log.read_text().splitlines():
            if "HTTP requests served: " in line:
                pairs = line.split("HTTP requests served: ", 1)[1].split(", ")
                return {p.rsplit(" ", 1)[0]: int(p.rsplit(" ", 1)[1]) for p in pairs if " " in p}
    return {}


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
    ap.add_argument(
        "--eval_overlap", default="true", help="true: evaluation beside the next round (the default); false: in line"
    )
    ap.add_argument("--credentials", action="store_true", help="per-worker credentials (signed worker calls)")
    ap.add_argument("--mtls", action="store_true", help="HTTPS with client certificates (mutual TLS)")
    args = ap.parse_args()

    res = measure_cluster(
        args.rounds,
        args.workers,
        ["--eval_overlap", args.eval_overlap],
        mode=args.mode,
        b_up=args.b_up,
        b_down=args.b_down,
        eval_every=args.eval_every,
        credentials=args.credentials,
        mtls=args.mtls,
    )
    means, xlsx = res["means"], res["xlsx"]

    def mean(key):
        return means[key]

    total, protocol = mean("total"), mean("protocol")
    print(
        f"cluster: master + {args.workers} workers on loopback, mode {args.mode} (b_up {args.b_up}, "
        f"b_down {args.b_down}), eval every {args.eval_every}, {res['timed_rounds']} timed rounds (first excluded), "
        f"1 thread per process, {os.cpu_count()} cores"
        + (", per-worker credentials" if args.credentials else "")
        + (", mutual TLS" if args.mtls else "")
    )
    print(f"  round (wall)                      {total:.3f} s/round")
    print(f"  compute: slowest worker           {mean('worker'):.3f} s  (decode, local training, quantize)")
    print(
        f"  compute: master                   {mean('master'):.3f} s  (downlink quantization, decode, aggregate+Adam)"
    )
    if mean("background"):
        print(
            f"  compute: evaluation (10k images)  {mean('background'):.3f} s beside the next round; "
            f"the round waited {mean('evaluation'):.3f} s for it"
        )
    else:
        print(f"  compute: evaluation (10k images)  {mean('evaluation'):.3f} s")
    print(
        f"  protocol (serialize, HTTP, wait)  {protocol:.3f} s  = {100 * protocol / total:.1f}% of the round; "
        f"{100 * protocol / (total - mean('evaluation')):.1f}% of the round without evaluation"
    )
    print(f"  HTTP requests per worker per round: {res['requests_per_round']:.2f} ({res['requests']})")
    print(f"  bytes per round: up {mean('up'):,.0f}, down {mean('down'):,.0f}")
    print(f"  spreadsheet: {xlsx}")


if __name__ == "__main__":
    main()
