"""The real cluster's round time with no dashboard open and with N open.

Runs benchmarks/cluster_round.py's loopback cluster (master + 4 worker
processes, configs/paper_fmnist.json, one thread each) twice per pass: once
alone, once with ``--pages`` simulated dashboards, each doing what the page
does (GET / and its four static files once, then ``GET /dashboard/state``
with what it already has every second) and one Prometheus scrape of
``/metrics`` every 5 s. Passes alternate (alone, watched, alone, watched ...)
so that a drifting machine load falls on both. Prints the mean round time of
each, the poll's latency and bytes, and the page's download size.

    python benchmarks/dashboard_load.py [--rounds 12] [--pages 10] [--passes 2]

Caveat: the pages here are HTTP clients, not browsers: they cost the master
what real pages cost it, but not the browsers' own drawing (which runs on the
viewer's machine, not the master's). On a 2-core machine the 4 workers share
the cores, so round times stretch and vary between runs by a few percent.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster_round import measure_cluster  # noqa: E402

STATIC = [
    "/dashboard/static/dashboard.css",
    "/dashboard/static/dashboard.js",
    "/dashboard/static/vendor/uPlot.min.css",
    "/dashboard/static/vendor/uPlot.iife.min.js",
]


class Page(threading.Thread):
    """One dashboard: the page and its files once, then a state poll a second."""

    def __init__(self, url: str, stop: threading.Event, scrape_every_s: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.url, self.stop, self.scrape_every_s = url, stop, scrape_every_s
        self.latencies: list = []
        self.poll_bytes: list = []
        self.page_bytes = 0

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as c:
            while not self.stop.is_set():  # until the master answers
                try:
                    self.page_bytes = len(c.get("/").content) + sum(len(c.get(p).content) for p in STATIC)
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
            rounds = evals = 0
            next_scrape = time.monotonic()
            while not self.stop.is_set():
                t = time.perf_counter()
                try:
                    if self.scrape_every_s and time.monotonic() >= next_scrape:
                        c.get("/metrics")
                        next_scrape += self.scrape_every_s
                    r = c.get("/dashboard/state", params={"rounds_since": rounds, "evals_since": evals})
                    doc = r.json()
                except (httpx.HTTPError, ValueError):
                    break  # the run is over
                self.latencies.append(time.perf_counter() - t)
                self.poll_bytes.append(len(r.content))
                rounds, evals = doc["rounds_total"], doc["evaluations_total"]
                self.stop.wait(1.0)


def one_run(rounds: int, pages: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    stop = threading.Event()
    watchers = [Page(f"http://127.0.0.1:{port}", stop, 5.0 if i == 0 else 0.0) for i in range(pages)]
    for w in watchers:
        w.start()
    try:
        res = measure_cluster(rounds, 4, port=port)
    finally:
        stop.set()
        for w in watchers:
            w.join(15)
    lat = [x for w in watchers for x in w.latencies]
    size = [x for w in watchers for x in w.poll_bytes]
    return {
        "round_s": res["means"]["total"],
        "polls": len(lat),
        "poll_ms": 1e3 * statistics.median(lat) if lat else 0.0,
        "poll_ms_p95": 1e3 * sorted(lat)[int(0.95 * (len(lat) - 1))] if lat else 0.0,
        "poll_bytes": statistics.median(size) if size else 0,
        "page_bytes": max((w.page_bytes for w in watchers), default=0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12, help="rounds per run, the first not timed (default 12)")
    ap.add_argument("--pages", type=int, default=10, help="dashboards open in the watched runs (default 10)")
    ap.add_argument("--passes", type=int, default=2, help="pairs of runs, alone then watched (default 2)")
    args = ap.parse_args()
    alone, watched = [], []
    for i in range(args.passes):
        alone.append(one_run(args.rounds, 0))
        watched.append(one_run(args.rounds, args.pages))
        print(
            f"pass {i + 1}: alone {alone[-1]['round_s']:.3f} s/round, with {args.pages} pages "
            f"{watched[-1]['round_s']:.3f} s/round",
            flush=True,
        )
    a = statistics.fmean(r["round_s"] for r in alone)
    b = statistics.fmean(r["round_s"] for r in watched)
    w = watched[-1]
    print(
        f"cluster: master + 4 workers on loopback, paper CNN, bbit 4/8, eval every round, {args.rounds} rounds "
        f"(first excluded), {args.passes} passes, {os.cpu_count()} cores"
    )
    print(f"  round time, no dashboard open    {a:.3f} s/round")
    print(f"  round time, {args.pages} dashboards open    {b:.3f} s/round ({100 * (b - a) / a:+.1f}%)")
    print(
        f"  a state poll: median {w['poll_ms']:.1f} ms, p95 {w['poll_ms_p95']:.1f} ms, "
        f"{w['poll_bytes']:.0f} bytes ({sum(r['polls'] for r in watched)} polls)"
    )
    print(f"  the page's files: {w['page_bytes']:,} bytes (the page, its script and styles, uPlot)")


if __name__ == "__main__":
    main()
