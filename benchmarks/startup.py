"""Start-up: seconds from process start to round 1 of ``flq simulate``, idle
and with another job on the machine, and the time of ``flq --help``.

    python benchmarks/startup.py [--repeat 3] [--config configs/paper_fmnist.json]

Each figure is the median of ``--repeat`` runs of ``flq simulate --rounds 1
--eval_every 0`` (the paper configuration, its default threads), read from
the log line the simulator writes when round 1 begins ("N s since the process
started": the interpreter, the imports, the config, the data, the
partitions and the model). Three settings:

- cold: a fresh user cache (``XDG_CACHE_HOME``), so the IDX files are decoded;
- warm: the decoded arrays memory-mapped from the cache (every later run);
- loaded: warm, while another ``flq simulate`` trains on all cores.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def simulate_cmd(config: str, work: Path, *extra: str) -> list:
    return [
        sys.executable,
        "-m",
        "flq",
        "simulate",
        "--config",
        config,
        "--eval_every",
        "0",
        "--no-progress",
        "--results_dir",
        str(work / "results"),
        "--log_dir",
        str(work / "logs"),
        *extra,
    ]


def startup_s(config: str, env: dict) -> float:
    """Process start -> round 1 of one ``flq simulate --rounds 1``, from its log."""
    with tempfile.TemporaryDirectory(prefix="flq_startup_") as tmp:
        work = Path(tmp)
        subprocess.run(simulate_cmd(config, work, "--rounds", "1"), check=True, capture_output=True, env=env, cwd=work)
        (log,) = (work / "logs").glob("simulate_*.log")
        found = re.search(r"\(([0-9.]+) s since the process started\)", log.read_text())
        if not found:
            raise SystemExit(f"no start-up line in {log}")
        return float(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--config", default=str(REPO / "configs" / "paper_fmnist.json"))
    args = ap.parse_args()
    env = dict(os.environ)

    helps = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "flq", "--help"], check=True, capture_output=True)
        helps.append(time.perf_counter() - t0)

    with tempfile.TemporaryDirectory(prefix="flq_cache_") as cache:
        cold = []
        for i in range(args.repeat):
            cold.append(startup_s(args.config, dict(env, XDG_CACHE_HOME=os.path.join(cache, str(i)))))
        warm_env = dict(env, XDG_CACHE_HOME=os.path.join(cache, "0"))  # decoded by the first cold run
        warm = [startup_s(args.config, warm_env) for _ in range(args.repeat)]
        with tempfile.TemporaryDirectory(prefix="flq_load_") as tmp:
            work = Path(tmp)
            other = subprocess.Popen(
                simulate_cmd(args.config, work, "--rounds", "100000"),
                env=warm_env,
                cwd=work,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                deadline = time.monotonic() + 300
                while not any("round 2:" in p.read_text() for p in (work / "logs").glob("simulate_*.log")):
                    if other.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("the background simulation did not start")
                    time.sleep(0.5)
                loaded = [startup_s(args.config, warm_env) for _ in range(args.repeat)]
            finally:
                other.terminate()
                other.wait(timeout=60)

    print(f"{os.cpu_count()} cores; medians of {args.repeat} runs; flq simulate --rounds 1 on {args.config}")
    print(f"  flq --help                               {statistics.median(helps):.2f} s")
    print(f"  start-up, cold (IDX files decoded)       {statistics.median(cold):.2f} s")
    print(f"  start-up, warm (decoded arrays cached)   {statistics.median(warm):.2f} s")
    print(f"  start-up, warm, another flq simulate on all cores  {statistics.median(loaded):.2f} s")


if __name__ == "__main__":
    main()
