"""Load: one master process and many workers on loopback.

    python benchmarks/load_workers.py [--workers 50] [--rounds 20] [--model mlp]

The master is a real ``flq master`` process; the workers are real HTTP
clients (one connection each, the same loop as ``flq worker``) run as threads
of this one process so that 50 of them share one copy of the dataset in
memory (50 separate processes would need ~20 GiB here). Small test model
``mlp`` (50,890 parameters), IID partition, bbit 4/8, evaluation only at the
end. Prints rounds completed, offers per round, errors (worker exceptions and
master log lines at WARNING or above), seconds per round, and the master's
peak resident memory (VmHWM).
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def run(workers: int = 50, rounds: int = 20, model: str = "mlp", mode: str = "bbit") -> dict:
    import torch

    from flq.nodes import worker_config
    from flq.results import read_results
    from flq.runtime import Runtime
    from flq.transport.client import MasterClient
    from flq.transport.worker_loop import run_worker
    from flq.worker import Worker

    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work = Path(tempfile.mkdtemp(prefix="flq_load_"))
    master = subprocess.Popen(
        [
            sys.executable,
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
            "--model",
            model,
            "--mode",
            mode,
            "--partition",
            "iid",
            "--eval_every",
            "1000",
            "--threads",
            "1",
            "--round_timeout_s",
            "120",
            "--checkpoint_every",
            "0",
            "--results_dir",
            str(work / "results"),
            "--log_dir",
            str(work / "logs"),
        ],
        cwd=work,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            sections = httpx.get(f"{url}/config", timeout=2).json()["config"]
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    cfg = worker_config(sections, {"threads": 1})
    rt = Runtime(cfg)
    errors, offered, lock = [], [], threading.Lock()

    def one(m: int) -> None:
        from flq.model import FlatModel, build_model

        client = MasterClient(url, m, give_up_s=60)
        try:

            def make(_sections):
                return Worker(
                    m, cfg, FlatModel(build_model(cfg.model)), rt.data.train_x, rt.data.train_y, rt.partitions[m]
                )

            end = run_worker(client, make)
            with lock:
                offered.append(end.rounds)
                if end.reason != "completed":
                    errors.append(f"worker {m}: {end.reason}: {end.detail}")
        except Exception as exc:  # noqa: BLE001 - counted and reported
            with lock:
                errors.append(f"worker {m}: {type(exc).__name__}: {exc}")
        finally:
            client.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(m,), daemon=True) for m in range(workers)]
    for t in threads:
        t.start()
    peak_kb = 0
    while master.poll() is None:  # sample the master's peak RSS while it lives
        try:
            status = Path(f"/proc/{master.pid}/status").read_text()
            peak_kb = max(peak_kb, int(re.search(r"VmHWM:\s+(\d+)", status).group(1)))
        except (OSError, AttributeError):
            pass
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    for t in threads:
        t.join(timeout=60)
    log_text = "".join(p.read_text() for p in (work / "logs").glob("master_*.log"))
    bad_lines = [ln for ln in log_text.splitlines() if " WARNING " in ln or " ERROR " in ln]
    xlsx = next((work / "results").glob("*.xlsx"))
    curve = read_results(xlsx).curve
    return {
        "workers": workers,
        "rounds_done": len(curve),
        "rounds": rounds,
        "offers_per_round": sorted(set(int(v) for v in curve["offers"])),
        "selected_per_round": sorted(set(int(v) for v in curve["selcnt"])),
        "worker_errors": errors,
        "master_warnings": bad_lines,
        "master_exit": master.returncode,
        "round_s_median": statistics.median([float(v) for v in curve["round_time_s"]][1:] or [float("nan")]),
        "wall_s": wall,
        "master_peak_rss_mib": peak_kb / 1024,
        "workers_finished": len(offered),
        "results": str(xlsx),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--mode", default="bbit")
    args = ap.parse_args()
    r = run(args.workers, args.rounds, args.model, args.mode)
    print(
        f"{r['workers']} workers, model {args.model}, mode {args.mode}: {r['rounds_done']}/{r['rounds']} rounds, "
        f"offers per round {r['offers_per_round']}, uploads per round {r['selected_per_round']}"
    )
    print(
        f"  errors: {len(r['worker_errors'])} worker exceptions, {len(r['master_warnings'])} master warnings; "
        f"master exit code {r['master_exit']}; {r['workers_finished']} workers exited cleanly"
    )
    print(f"  round median {r['round_s_median']:.3f} s, wall {r['wall_s']:.1f} s")
    print(f"  master peak resident memory (VmHWM): {r['master_peak_rss_mib']:.0f} MiB")
    for line in (r["worker_errors"] + r["master_warnings"])[:10]:
        print("   ", line)


if __name__ == "__main__":
    main()
