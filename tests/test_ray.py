"""``flq simulate --backend ray`` and ``flq sweep`` on Ray: real Ray clusters
on this machine (a local one started for the run; a two-node one made with
``ray start``), real ``flq`` processes, real Fashion-MNIST.

Every test of this file runs in one pytest process (``--dist loadfile``), so
the clusters never overlap; each is torn down before its test ends.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from flq.results import read_results

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "configs" / "paper_fmnist.json"
TIMING = ("round_time_s", "compute_s", "_s")  # record columns that measure time, not the algorithm


def flq(*args: str, cwd: Path, timeout: float = 300, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flq", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def small_run(tmp: Path, *extra: str) -> list:
    return [
        "simulate",
        "--config",
        str(PAPER),
        "--model",
        "mlp",
        "--workers",
        "6",
        "--rounds",
        "4",
        "--eval_every",
        "1",
        "--threads",
        "1",
        "--results_dir",
        str(tmp),
        "--log_dir",
        str(tmp / "logs"),
        "--no-progress",
        *extra,
    ]


def model_sha256(xlsx: Path) -> str:
    """SHA-256 of the final model's tensors (names, dtypes, shapes, bytes) in the .safetensors beside ``xlsx``."""
    from safetensors.numpy import load_file

    tensors = load_file(str(xlsx.with_suffix(".safetensors")))
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{t.shape}".encode())
        h.update(t.tobytes())
    return h.hexdigest()


def algorithm_columns(curve):
    return curve[[c for c in curve.columns if not c.endswith(TIMING)]]


@pytest.mark.slow
def test_ray_backend_equals_local_bit_for_bit(tmp_path, fmnist_available):
    """Same config and seed: every per-round metric and the final model's
    SHA-256 are the same with the workers in 3 Ray actors as in one process."""
    local = flq(*small_run(tmp_path / "local"), cwd=tmp_path)
    assert local.returncode == 0, local.stderr[-3000:]
    on_ray = flq(*small_run(tmp_path / "ray", "--backend", "ray", "--ray_actors", "3"), cwd=tmp_path)
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    (log,) = (tmp_path / "ray" / "logs").glob("*.log")
    assert "ray: 3 Ray actor(s) x 1 thread(s) on 1 node(s), 2-2 workers each" in log.read_text()
    (a,) = (tmp_path / "local").glob("flq_results_*.xlsx")
    (b,) = (tmp_path / "ray").glob("flq_results_*.xlsx")
    ca, cb = read_results(a).curve, read_results(b).curve
    assert len(ca) == 4 and ca["acc"].notna().all()
    assert algorithm_columns(ca).equals(algorithm_columns(cb)), (algorithm_columns(ca), algorithm_columns(cb))
    assert model_sha256(a) == model_sha256(b)
    # the workers' own seconds still reach the spreadsheet from the actors
    assert (cb["workers_compute_s"] > 0).all()


def test_missing_ray_is_one_line(tmp_path):
    """Without Ray the flag says how to install it, in one line, before any work."""
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "__init__.py").write_text("raise ImportError('no ray here')\n")
    done = flq(*small_run(tmp_path / "out", "--backend", "ray"), cwd=tmp_path, env=env, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "flq: config error: --backend ray needs Ray, which is not installed here: pip install 'flq-fed[ray]'"
    ]
    assert not (tmp_path / "out").exists()


def test_bad_ray_options_stop_before_work(tmp_path):
    done = flq(*small_run(tmp_path / "out", "--backend", "ray", "--ray_actors", "-1"), cwd=tmp_path, timeout=60)
    assert done.returncode == 2
    assert "--ray_actors -1" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = flq(*small_run(tmp_path / "out", "--ray_address", "127.0.0.1:1"), cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and "--ray_address needs --backend ray" in done.stderr
    # nothing listening there: one line in seconds (Ray itself would retry for minutes, deaf to Ctrl-C)
    port = _free_port()
    done = flq(*small_run(tmp_path / "out", "--backend", "ray", "--ray_address", f"127.0.0.1:{port}"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"flq: error: no Ray cluster answers at 127.0.0.1:{port} within 5 s (Connection refused); start one with "
        "`ray start --head --port PORT`, or leave out --ray_address for a local one"
    ]
    assert not (tmp_path / "out").exists()


#: The nodes of the cluster and the node of each WorkerHost actor (alive or, after the run, dead), as JSON.
STATE_QUERY = """
import json, sys
from ray.util.state import list_actors, list_nodes
address = sys.argv[1]
nodes = [n.node_id for n in list_nodes(address=address)]
actors = [a.node_id for a in list_actors(address=address, filters=[("class_name", "=", "WorkerHost")], detail=True)]
print(json.dumps({"nodes": nodes, "actors": actors}))
"""


@pytest.mark.slow
def test_sigterm_to_a_ray_run_keeps_its_rounds_and_exits_143(tmp_path, fmnist_available):
    """Ray installs its own SIGTERM handler (exit at once); flq's stays: the
    rounds done are written and the status says SIGTERM."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flq", *small_run(tmp_path / "out", "--backend", "ray", "--rounds", "100000")],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        logs = tmp_path / "out" / "logs"
        while not any("round 3:" in p.read_text(errors="replace") for p in logs.glob("*.log")):
            assert time.monotonic() < deadline and proc.poll() is None, "no rounds"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr[-2000:]
    assert "SIGTERM after" in stderr
    (xlsx,) = (tmp_path / "out").glob("flq_results_*.xlsx")
    assert read_results(xlsx).curve["iter"].iloc[-1] >= 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


@pytest.mark.slow
def test_two_node_ray_cluster_on_loopback(tmp_path, fmnist_available):
    """`ray start --head` and a second `ray start --address`: two raylets on
    this machine, one CPU each; the simulation's actors land on both nodes
    (asserted from Ray's state API) and the run finishes."""
    port, dash = _free_port(), _free_port()
    # Ray's token authentication, with a token of this test's own for every process of the cluster
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    head = [
        _ray_cli(), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
        "--num-cpus", "1", "--resources", '{"node_a": 1}', "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dash), "--disable-usage-stats",
    ]  # fmt: skip
    second = [
        _ray_cli(), "start", "--address", f"127.0.0.1:{port}", "--node-ip-address", "127.0.0.1",
        "--num-cpus", "1", "--resources", '{"node_b": 1}', "--disable-usage-stats",
    ]  # fmt: skip
    try:
        for cmd in (head, second):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        run = flq(
            *small_run(tmp_path / "out", "--backend", "ray", "--ray_address", f"127.0.0.1:{port}"),
            cwd=tmp_path,
            timeout=300,
            env=env,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        (log,) = (tmp_path / "out" / "logs").glob("*.log")
        assert "ray: 2 Ray actor(s) x 1 thread(s) on 2 node(s), 3-3 workers each" in log.read_text()
        (xlsx,) = (tmp_path / "out").glob("flq_results_*.xlsx")
        assert read_results(xlsx).curve["iter"].iloc[-1] == 4
        state = subprocess.run(  # Ray's state API, asked from a process that has the cluster's token
            [sys.executable, "-c", STATE_QUERY, f"http://127.0.0.1:{dash}"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert state.returncode == 0, state.stderr[-3000:]
        found = json.loads(state.stdout.strip().splitlines()[-1])
        assert len(found["nodes"]) == 2
        assert len(found["actors"]) == 2 and set(found["actors"]) == set(found["nodes"])
    finally:
        subprocess.run([_ray_cli(), "stop", "--force"], capture_output=True, timeout=120, env=env)


@pytest.mark.slow
def test_sweep_on_ray_tasks(tmp_path, fmnist_available):
    """`flq sweep` with Ray: each run a task; the spreadsheets, the summary
    and the figure; a second sweep skips the runs done."""
    sweep = tmp_path / "sweep.json"
    sweep.write_text(
        json.dumps(
            {
                "config": str(PAPER),
                "set": {"model": "mlp", "total_workers": 4, "max_rounds": 3, "eval_every": 1},
                "grid": {"mode": ["bbit", "laq8"]},
                "out": "out",
            }
        )
    )
    done = flq("sweep", str(sweep), "--backend", "ray", cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Ray tasks" in done.stdout
    for name in ("mode=bbit", "mode=laq8"):
        assert len(list((tmp_path / "out" / name).glob("flq_results_*.xlsx"))) == 1
    assert (tmp_path / "out" / "summary.xlsx").is_file()
    assert list((tmp_path / "out" / "plots").glob("sweep_acc_vs_round.png"))
    again = flq("sweep", str(sweep), "--backend", "ray", cwd=tmp_path, timeout=300)
    assert again.returncode == 0 and "(2 done before)" in again.stdout
    assert "Ray tasks" in again.stdout and not list((tmp_path / "out").glob("*/pid"))
    # a run that needs more CPUs than any node has: one line, nothing run (Ray would queue it for ever)
    big = flq("sweep", str(sweep), "--backend", "ray", "--threads", "64", "--out", "big", cwd=tmp_path, timeout=300)
    assert big.returncode == 2, big.stdout[-2000:] + big.stderr[-2000:]
    assert "needs 64 CPUs (its threads) and the Ray cluster's largest node has" in big.stderr
    assert not list((tmp_path / "big").glob("*/output.txt"))


@pytest.mark.slow
def test_a_stopped_ray_sweep_stops_its_runs_and_keeps_what_they_did(tmp_path, fmnist_available):
    """SIGINT to `flq sweep` on Ray: every run in progress gets SIGTERM (through
    OUT/.stop), writes its rounds and exits 143; the sweep writes its summary
    (runs failed, 'exit 143', their spreadsheets named) and exits 130."""
    sweep = tmp_path / "sweep.json"
    sweep.write_text(
        json.dumps(
            {
                "config": str(PAPER),
                "set": {"model": "mlp", "total_workers": 4, "max_rounds": 100000, "eval_every": 0},
                "grid": {"seed": [1, 2]},
                "out": "out",
            }
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "flq", "sweep", str(sweep), "--backend", "ray"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        outputs = [tmp_path / "out" / f"seed={k}" / "output.txt" for k in (1, 2)]
        while not all(p.exists() and "round 1 of 100000 starts" in p.read_text(errors="replace") for p in outputs):
            assert time.monotonic() < deadline, "the runs never started"
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        time.sleep(2)  # some rounds done
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stdout
    assert took < 60, took
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert list(summary["status"]) == ["failed", "failed"] and list(summary["detail"]) == ["exit 143", "exit 143"]
    for sheet, rounds in zip(summary["results"], summary["rounds"]):
        assert rounds >= 1 and read_results(sheet).curve["iter"].iloc[-1] == rounds
    assert not (tmp_path / "out" / ".stop").exists()
