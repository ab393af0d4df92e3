"""Seconds per round: Flower's deployment runtime against FLQ-Fed's real cluster, same work.

    python benchmarks/compare_flower.py [--rounds 5] [--workers 4] [--timeout_s S]

Needs Flower (``pip install -e '.[flower]'``, or a separate venv holding flwr
and flq-fed: run this script with that venv's python; Flower's commands are
taken from beside that python, else from PATH). Runs, back to back, on
loopback, each round the same work:

- the FLQ CNN (467,818 parameters) on Fashion-MNIST, ``--workers`` workers
  (nodes), each holding the share FLQ gives it (``flq.partition.partition``,
  non-IID Dirichlet 0.1, seed 42: configs/paper_fmnist.json) and taking the
  same minibatch of 64 each round (``flq.partition.BatchStream``);
- ONE local gradient step per round, float32 parameters both ways;
- FedAvg-style aggregation on the server;
- central evaluation of the global model on the whole 10,000-image test set
  every round;
- one PyTorch thread per process.

FLQ-Fed: ``flq master`` + ``--workers`` ``flq worker`` processes
(benchmarks/cluster_round.py's ``measure_cluster``), ``--mode fedavg
--b_down 32`` (exact float32 down, raw float32 gradients up),
``--up_budget_bits 0`` (the paper's 17e6-bit budget admits one float32
upload per round; here every worker's arrives, as in Flower),
``--eval_every 1``, run twice: with the evaluation in line (``--eval_overlap
false``: like Flower's ``evaluate_fn``, it blocks the round) and beside the
next round (``--eval_overlap true``, the default), no checkpoints. The
master's gradient sum and Adam step stand for FedAvg's weighted mean.
Seconds per round: the spreadsheet's ``round_time_s``.

Flower: ``flower-superlink`` + ``--workers`` ``flower-supernode`` processes
(insecure, subprocess isolation: each starts a SuperExec that starts a new
ClientApp process per message; the SuperLink's starts the ServerApp),
``flwr run`` of benchmarks/flower_app (strategy ``FedAvg``, no federated
evaluation, ``evaluate_fn`` on the test set, one SGD step on the same batch
with the same model code). Seconds per round: from the ServerApp's wall
clock, between the ends of consecutive ``evaluate_fn`` calls.

Both sides leave the first round out (process warm-up) and report the mean
of the rest; the ratio is Flower's s/round over FLQ's. Everything runs in a
fresh temporary folder (Flower's home included, so ~/.flwr is not touched),
on free ports; every process started is ended when the script ends (also on
an error or Ctrl-C), each side within ``--timeout_s``.

Caveat: on a 2-core machine all the processes (4 workers or 4 SuperNodes with
their SuperExecs and ClientApps, the server) share 2 cores, so compute
overlaps and stretches, and much of Flower's round is its fixed polling
(SuperNodes and the ServerApp poll the SuperLink every 3 s, SuperExecs every
1 s) and the start-up of a new ClientApp process per node and round; the
ratio on real devices, where each node has cores of its own, will differ.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from importlib.metadata import version
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
APP = Path(__file__).resolve().parent / "flower_app"
FLOWER_COMMANDS = (
    "flower-superlink",
    "flower-supernode",
    "flower-superexec",
    "flwr",
    "flwr-serverapp",
    "flwr-clientapp",
)
TAG_VAR = "FLQ_COMPARE_FLOWER_TAG"
HOW_TO_GET_FLOWER = (
    "Flower is not installed here: pip install -e '.[flower]' (Python 3.11+), or make a separate venv with "
    "flwr>=1.42,<2 and this project (pip install -e .) and run this script with its python"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_commands() -> Optional[Dict[str, str]]:
    """Flower's commands, from beside this python (its venv), else PATH; None if flwr or one is missing."""
    if importlib.util.find_spec("flwr") is None:
        return None
    here = Path(sys.executable).parent
    found = {}
    for name in FLOWER_COMMANDS:
        path = here / name if (here / name).is_file() else shutil.which(name)
        if path is None:
            return None
        found[name] = str(path)
    return found


def tagged_pids(tag: str) -> List[int]:
    """Processes whose environment holds ``TAG_VAR=tag``: the ones this script
    started and all of theirs, even those Flower detaches (Linux /proc; none
    without it: then only the direct children are ended)."""
    needle = f"{TAG_VAR}={tag}".encode()
    pids: List[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return pids
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def end_tagged(tag: str, procs: List[subprocess.Popen], grace_s: float = 10.0) -> None:
    """End every process carrying ``tag`` (SIGTERM, SIGKILL after ``grace_s``)
    and reap this script's own children ``procs``. A second Ctrl-C or SIGTERM
    does not cut this short (it takes at most ``grace_s`` + 5 s)."""
    shielded = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        _end_tagged(tag, procs, grace_s)
    finally:
        for s, handler in shielded.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _end_tagged(tag: str, procs: List[subprocess.Popen], grace_s: float) -> None:
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        pids = tagged_pids(tag)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            for p in procs:
                p.poll()  # reap: a zombie child still shows in /proc
            if not tagged_pids(tag):
                break
            time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def wait_for_port(port: int, proc: subprocess.Popen, what: str, log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} (log: {log})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout_s:.0f} s (log: {log})")


def paper_settings() -> Dict[str, Any]:
    """The run settings both sides use, from configs/paper_fmnist.json."""
    cfg = json.loads((REPO / "configs" / "paper_fmnist.json").read_text())
    return dict(
        dataset=cfg["dataset"]["name"],
        partition=cfg["dataset"]["partition"],
        dir_alpha=cfg["dataset"]["dir_alpha"],
        batch_size=cfg["dataset"]["batch_size"],
        seed=cfg["system"]["seed"],
        eval_batch_size=cfg["system"]["eval_batch_size"],
        model=cfg["model"]["name"],
        lr=cfg["model"]["lr"],
        l2=cfg["model"]["l2"],
    )


def measure_flower(rounds: int, workers: int, settings: Dict[str, Any], timeout_s: float) -> Dict[str, Any]:
    """Run the Flower App in benchmarks/flower_app on a SuperLink and
    ``workers`` SuperNodes; return ``rows`` (per timed round: ``total``,
    ``evaluation`` in seconds), ``means``, ``timed_rounds``, ``acc`` (the last
    round's test accuracy) and ``work`` (the folder with every log)."""
    cmd = flower_commands()
    assert cmd is not None
    work = Path(tempfile.mkdtemp(prefix="flq_flower_bench_"))
    home, app = work / "flwr_home", work / "app"
    home.mkdir()
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    timing = work / "timing.json"
    tag = uuid.uuid4().hex
    env = dict(
        os.environ,
        PATH=os.pathsep.join([str(Path(cmd["flwr"]).parent), os.environ.get("PATH", "")]),
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
        **{TAG_VAR: tag},
    )
    link_port = free_port()
    # `flwr run APP bench` finds the SuperLink by this connection name in $FLWR_HOME/config.toml
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    run_config = {
        "num-server-rounds": rounds,
        "num-nodes": workers,
        "dataset": settings["dataset"],
        "model": settings["model"],
        "partition": settings["partition"],
        "dir-alpha": float(settings["dir_alpha"]),
        "seed": settings["seed"],
        "batch-size": settings["batch_size"],
        "lr": float(settings["lr"]),
        "l2": float(settings["l2"]),
        "eval-batch-size": settings["eval_batch_size"],
        "round-timeout-s": float(timeout_s),
        "timing-file": str(timing),
    }
    run_config_arg = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())

    procs: List[subprocess.Popen] = []

    def start(name: str, args: List[str]) -> subprocess.Popen:
        log = open(work / f"{name}.log", "wb")
        try:
            p = subprocess.Popen(args, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        procs.append(p)
        return p

    deadline = time.monotonic() + timeout_s
    try:
        superlink = start(
            "superlink",
            [
                cmd["flower-superlink"],
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(link_port),
                "--disable-runtime-dependency-installation",
            ],
        )
        wait_for_port(link_port, superlink, "flower-superlink", work / "superlink.log")
        nodes = [
            start(
                f"supernode_{m}",
                [
                    cmd["flower-supernode"],
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    f"partition-id={m} num-partitions={workers}",
                ],
            )
            for m in range(workers)
        ]
        runner = start("flwr_run", [cmd["flwr"], "run", str(app), "bench", "--run-config", run_config_arg, "--stream"])
        runner_done: Optional[float] = None
        while not timing.exists():
            for p, what in [(superlink, "superlink"), *((n, f"supernode_{m}") for m, n in enumerate(nodes))]:
                if p.poll() is not None:
                    raise RuntimeError(f"flower {what} exited with status {p.returncode} (log: {work / what}.log)")
            if runner.poll() is not None:
                runner_done = runner_done or time.monotonic()
                if runner.returncode != 0 or time.monotonic() - runner_done > 10:
                    raise RuntimeError(
                        f"`flwr run` ended (status {runner.returncode}) without the ServerApp's timings "
                        f"(logs: {work}/flwr_run.log, superlink.log)"
                    )
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Flower run did not finish within {timeout_s:.0f} s (logs in {work})")
            time.sleep(0.5)
    finally:
        end_tagged(tag, procs)

    stamps = sorted(json.loads(timing.read_text())["rounds"], key=lambda s: s["round"])
    if [s["round"] for s in stamps] != list(range(rounds + 1)):
        raise RuntimeError(f"{timing}: expected evaluations of rounds 0..{rounds}, got {[s['round'] for s in stamps]}")
    rows = [
        dict(total=cur["end"] - prev["end"], evaluation=cur["end"] - cur["start"])
        for prev, cur in zip(stamps[1:], stamps[2:])  # round 1 (after stamps[1]) left out
    ]
    means = {key: statistics.fmean(r[key] for r in rows) for key in rows[0]}
    return dict(rows=rows, means=means, timed_rounds=len(rows), acc=stamps[-1]["acc"], work=work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds per side, the first excluded (default 5)")
    ap.add_argument("--workers", type=int, default=4, help="FLQ workers = Flower SuperNodes (default 4)")
    ap.add_argument(
        "--timeout_s", type=float, default=None, help="time allowed to each side (default 300 + 60 s per round)"
    )
    args = ap.parse_args()
    if args.rounds < 2:
        ap.error("--rounds must be at least 2 (the first round is left out)")
    if flower_commands() is None:
        print(HOW_TO_GET_FLOWER, file=sys.stderr)
        sys.exit(2)
    timeout_s = args.timeout_s if args.timeout_s is not None else 300.0 + 60.0 * args.rounds
    # a SIGTERM (`timeout`, a batch scheduler) ends the script through the same clean-up as Ctrl-C
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cluster_round import measure_cluster

    settings = paper_settings()
    try:
        flq = {
            overlap: measure_cluster(
                args.rounds,
                args.workers,
                ["--up_budget_bits", "0", "--checkpoint_every", "0", "--eval_overlap", overlap],
                mode="fedavg",
                b_down=32,
                eval_every=1,
                timeout_s=timeout_s,
            )
            for overlap in ("false", "true")
        }
        fl = measure_flower(args.rounds, args.workers, settings, timeout_s)
    except KeyboardInterrupt:
        print("compare_flower: interrupted; the processes it started are ended", file=sys.stderr)
        sys.exit(130)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"compare_flower: {exc}", file=sys.stderr)
        sys.exit(1)

    from flq.model import build_model

    n = sum(p.numel() for p in build_model(settings["model"]).parameters())
    fl_s = fl["means"]["total"]
    print(
        f"settings: {settings['model']} ({n:,} parameters) on {settings['dataset']}, {args.workers} workers/nodes, "
        f"{settings['partition']} (Dirichlet {settings['dir_alpha']}, seed {settings['seed']}), 1 gradient step on "
        f"{settings['batch_size']} samples per round, float32 both ways, FedAvg, whole test set evaluated every "
        f"round, 1 thread per process, {args.rounds} rounds ({args.rounds - 1} timed, first excluded), "
        f"loopback, {os.cpu_count()} cores"
    )
    for overlap, label in (("false", "evaluation in line"), ("true", "evaluation beside the next round")):
        run = flq[overlap]
        print(
            f"  FLQ-Fed (flq master + {args.workers} flq worker, mode fedavg, b_down 32, {label}): "
            f"{run['means']['total']:.3f} s/round (evaluation {run['means']['evaluation']:.3f} s in the round"
            + (f", {run['means']['background']:.3f} s beside it" if run["means"]["background"] else "")
            + "); per round: "
            + ", ".join(f"{r['total']:.2f}" for r in run["rows"])
        )
    print(
        f"  Flower {version('flwr')} (superlink + {args.workers} supernodes, flwr run): {fl_s:.3f} s/round "
        f"(evaluation {fl['means']['evaluation']:.3f} s); per round: "
        + ", ".join(f"{r['total']:.2f}" for r in fl["rows"])
    )
    for overlap, label in (("false", "in line"), ("true", "overlapped")):
        print(f"  ratio Flower / FLQ-Fed ({label}): {fl_s / flq[overlap]['means']['total']:.2f}x")
    print(f"  FLQ spreadsheets: {flq['false']['xlsx']}, {flq['true']['xlsx']}; Flower logs: {fl['work']}")


if __name__ == "__main__":
    main()
