"""The shell scripts a user runs, as real processes: quick_test.sh stopped
with Ctrl-C, the ``--flag=value`` form of start_worker.sh, start_master.sh
and deploy_jetson.sh, which PyTorch build scripts/bootstrap.sh installs, what
scripts/test_deps.sh says is missing and run_tests.sh --quick.

Where a script would install something or start a long run, its interpreter
is a stand-in (FLQ_PYTHON, a small shell script that records the arguments
it was given): the script under test is always the real one."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import httpx
import pytest
from cluster_util import free_port

from flq.results import read_results

REPO = Path(__file__).resolve().parents[1]
BASH = shutil.which("bash") or "/bin/bash"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def project_copy(dst: Path, *files: str) -> Path:
    """The named top-level scripts and scripts/ in dst: each script cds to
    its own folder and writes logs, results and state there."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO / "scripts", dst / "scripts")
    for f in files:
        shutil.copy2(REPO / f, dst / f)
    return dst


def stand_in_python(folder: Path, record: Path, import_torch: int = 0, reachable: int = 1) -> Path:
    """An interpreter for FLQ_PYTHON that records each ``-m`` call (one
    argument a line, calls separated by a ``--`` line) and answers the
    scripts' ``-c`` checks: ``import torch`` exits ``import_torch``, the
    index probe (urlopen) ``reachable`` ? 0 : 1, everything else 0."""
    folder.mkdir(parents=True, exist_ok=True)
    py = folder / "python"
    py.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = -c ]; then\n'
        "  case $2 in\n"
        f"    'import torch') exit {import_torch} ;;\n"
        f"    *urlopen*) exit {0 if reachable else 1} ;;\n"
        "  esac\n"
        "  exit 0\n"
        "fi\n"
        f'{{ printf "%s\\n" "$@"; echo --; }} >> "{record}"\n'
        "exit 0\n"
    )
    py.chmod(0o755)
    return py


def recorded(record: Path) -> List[List[str]]:
    if not record.exists():
        return []
    calls, cur = [], []
    for line in record.read_text().splitlines():
        if line == "--":
            calls.append(cur)
            cur = []
        else:
            cur.append(line)
    return calls


def tool_dir(folder: Path, tools: List[str]) -> Path:
    """A folder of links to the named tools only: a PATH without the rest."""
    folder.mkdir(parents=True, exist_ok=True)
    for t in tools:
        found = shutil.which(t)
        assert found, f"{t} not found"
        (folder / t).symlink_to(found)
    return folder


def flq_processes(port: int) -> Dict[int, str]:
    """The live flq processes (master or worker) of the run on ``port``."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            args = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in args if a]
        if "flq" in words and any(
            w in ("--port", "--master_port") and nxt == str(port) for w, nxt in zip(words, words[1:])
        ):
            found[int(d.name)] = " ".join(words)
    return found


# ---------------------------------------------------------------------------
# quick_test.sh and Ctrl-C


def small_cluster_config(path: Path) -> Path:
    """flq_config.json shrunk: 2 workers, the MLP, no evaluation, no checkpoints."""
    cfg = json.loads((REPO / "flq_config.json").read_text())
    cfg["system"].update(total_workers=2, min_workers=0, eval_every=0, checkpoint_every=0)
    cfg["model"]["name"] = "mlp"
    path.write_text(json.dumps(cfg))
    return path


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as a terminal starts a command


@pytest.mark.slow
@pytest.mark.parametrize("target", ["group", "script", "start-up"])
def test_ctrl_c_stops_quick_test_and_it_names_the_results(tmp_path, fmnist_available, target):
    """Ctrl-C as a terminal sends it (SIGINT to the script's whole process
    group), or SIGINT to the script alone, after round 1, or while the master
    is still starting: the script stops master and workers, waits for them,
    says how the run ended and where its results are, and exits 130."""
    root = project_copy(tmp_path / "proj", "quick_test.sh")
    port = free_port()
    env = dict(
        os.environ,
        FLQ_PYTHON=sys.executable,
        CONFIG=str(small_cluster_config(tmp_path / "small.json")),
        PORT=str(port),
        ROUNDS="100000",
        THREADS="1",
        WORKERS="2",
    )
    results, logs = tmp_path / "results", tmp_path / "logs"
    cmd = [BASH, str(root / "quick_test.sh"), "--results_dir", str(results), "--log_dir", str(logs), "--linger_s", "1"]
    out_path = tmp_path / "script.out"
    with open(out_path, "wb") as out:
        p = subprocess.Popen(
            cmd, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True, preexec_fn=_default_sigint,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        done = 0
        while True:
            assert p.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, f"no round done: {out_path.read_text()}"
            if target == "start-up":  # the master runs (its log is open), its dataset not yet loaded
                master_out = root / "logs" / "quick_test_master.out"
                if master_out.exists() and "log file" in master_out.read_text():
                    break
                time.sleep(0.05)
                continue
            try:
                done = httpx.get(f"http://127.0.0.1:{port}/status", timeout=5).json()["rounds_done"]
            except httpx.HTTPError:
                done = 0
            if done >= 1:
                break
            time.sleep(0.2)
        if target == "script":
            os.kill(p.pid, signal.SIGINT)
        else:
            os.killpg(p.pid, signal.SIGINT)
        rc = p.wait(timeout=300)
        text = out_path.read_text()
        left = flq_processes(port)  # the script is gone: every process of its run must be too
        assert not left, (left, text)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for pid in flq_processes(port):
            os.kill(pid, signal.SIGKILL)
    master_out = (root / "logs" / "quick_test_master.out").read_text()
    assert rc == 130, text  # README "How a run ends": SIGINT
    assert "no results written (master exit 130)" not in text
    assert "master exit status 130" in text
    if target == "start-up":
        assert re.search(r"SIGINT during start-up|run ended \(sigint\)", master_out), master_out
        assert "stopped by Ctrl-C before any round finished: no results written" in text, text
        assert not list(results.glob("*.xlsx"))
        return
    assert "run ended (sigint)" in master_out, master_out
    m = re.search(r"^stopped by Ctrl-C after round (\d+); results: (\S+\.xlsx)$", text, re.M)
    assert m, text
    rounds, xlsx = int(m.group(1)), Path(m.group(2))
    assert xlsx.is_file() and xlsx.parent == results, text
    assert [xlsx] == list(results.glob("*.xlsx"))  # the one the master wrote, named
    assert rounds >= done >= 1
    run = read_results(xlsx)
    assert run.config["run.end"] == "sigint"
    assert list(run.curve["iter"]) == list(range(1, rounds + 1))
    for i in range(2):  # each worker was told by its master and left on its own
        assert "the master was stopped (sigint) (exit 4)" in (root / "logs" / f"quick_test_worker{i}.out").read_text()


# ---------------------------------------------------------------------------
# --flag value and --flag=value


@pytest.mark.slow
def test_start_worker_takes_flag_equals_value(tmp_path):
    """The real worker behind start_worker.sh: every flag in the = form
    reaches it (it gives up on a port where no master listens, exit 7)."""
    root = project_copy(tmp_path / "proj", "start_worker.sh")
    port = free_port()
    r = subprocess.run(
        [BASH, str(root / "start_worker.sh"), "--worker_id=0", "--master_ip=127.0.0.1", f"--master_port={port}",
         "--give_up_s=1", "--no_state", f"--log_dir={tmp_path / 'logs'}"],
        capture_output=True, text=True, env=dict(os.environ, FLQ_PYTHON=sys.executable), timeout=180,
    )  # fmt: skip
    text = r.stdout + r.stderr
    assert "usage" not in text
    assert r.returncode == 7, text
    assert f"http://127.0.0.1:{port} did not answer for 1 s" in text, text


@pytest.mark.parametrize(
    "script, args, expected",
    [
        ("start_worker.sh", ["--worker_id=3", "--master_ip=h"], ["worker", "--worker_id=3", "--master_ip=h"]),
        ("start_worker.sh", ["--worker_id", "3"], ["worker", "--worker_id", "3"]),
        ("start_master.sh", ["--config=my.json", "--port=5001"], ["master", "--config=my.json", "--port=5001"]),
        ("start_master.sh", ["--port", "1", "--config", "c.json"], ["master", "--port", "1", "--config", "c.json"]),
        ("start_master.sh", ["--port=5001"], ["master", "--config", "flq_config.json", "--port=5001"]),
    ],
)  # fmt: skip
def test_start_scripts_pass_both_flag_forms_once(tmp_path, script, args, expected):
    """What the script runs: the flags as given, a default --config only
    when none was given in either form."""
    root = project_copy(tmp_path / "proj", script)
    record = tmp_path / "calls"
    py = stand_in_python(tmp_path / "bin", record)
    r = subprocess.run(
        [BASH, str(root / script), *args], capture_output=True, text=True,
        env=dict(os.environ, FLQ_PYTHON=str(py)), timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert recorded(record) == [["-m", "flq", *expected]]


def test_start_worker_without_an_id_prints_usage(tmp_path):
    root = project_copy(tmp_path / "proj", "start_worker.sh")
    record = tmp_path / "calls"
    py = stand_in_python(tmp_path / "bin", record)
    for args in (["--master_ip=10.0.0.1"], ["--worker_id="], []):
        r = subprocess.run(
            [BASH, str(root / "start_worker.sh"), *args], capture_output=True, text=True,
            env=dict(os.environ, FLQ_PYTHON=str(py)), timeout=60,
        )  # fmt: skip
        assert r.returncode == 2 and r.stderr.startswith("usage: "), (args, r.stderr)
    assert recorded(record) == []


def test_deploy_takes_flag_equals_value(tmp_path):
    r = subprocess.run(
        [BASH, str(REPO / "deploy_jetson.sh"), "--dry-run", "--no-install", "--master-ip=10.1.2.3",
         "--worker-ips=10.1.2.4,10.1.2.5", "--user=alice", "--ssh-port=2222", "--master-port=5123",
         "--remote-dir=/srv/flq"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    for host in ("10.1.2.3", "10.1.2.4", "10.1.2.5"):
        assert f"-p 2222 alice@{host} " in r.stdout, r.stdout
    assert "--worker_id 1 --master_ip 10.1.2.3 --master_port 5123" in r.stdout
    assert "/srv/flq" in r.stdout
    bad = subprocess.run(
        [BASH, str(REPO / "deploy_jetson.sh"), "--dry-run=yes"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 1 and "--dry-run takes no value" in bad.stderr
    empty = subprocess.run(
        [BASH, str(REPO / "deploy_jetson.sh"), "--dry-run", "--user="], capture_output=True, text=True, timeout=60
    )
    assert empty.returncode == 1 and "--user needs a value" in empty.stderr


# ---------------------------------------------------------------------------
# scripts/bootstrap.sh: which PyTorch build


def bootstrap_dry_run(tmp_path: Path, nvidia_smi: str, **env: str) -> str:
    """scripts/bootstrap.sh with FLQ_BOOTSTRAP_DRY_RUN=1 in a project without
    a .venv, on a PATH with only bash, dirname, uname, timeout and, unless
    ``nvidia_smi`` is "absent", an nvidia-smi that works ("ok") or fails
    ("broken", as without a driver)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the CPU index is chosen on Linux only")
    root = project_copy(tmp_path / "proj")
    bin_dir = tool_dir(tmp_path / "bin", ["bash", "dirname", "uname", "timeout"])
    if nvidia_smi != "absent":
        smi = bin_dir / "nvidia-smi"
        smi.write_text(
            "#!/bin/sh\necho 'GPU 0: Stand-in (UUID: GPU-0)'\n" if nvidia_smi == "ok" else "#!/bin/sh\nexit 9\n"
        )
        smi.chmod(0o755)
    full = {"PATH": str(bin_dir), "HOME": str(tmp_path), "FLQ_BOOTSTRAP_DRY_RUN": "1", **env}
    r = subprocess.run(
        [BASH, str(root / "scripts" / "bootstrap.sh")], capture_output=True, text=True, env=full, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert not (root / ".venv").exists()  # a dry run makes nothing
    return r.stdout


def test_bootstrap_installs_the_cpu_build_without_a_working_nvidia_smi(tmp_path):
    for smi in ("absent", "broken"):
        out = bootstrap_dry_run(tmp_path / smi, smi)
        first = out.splitlines()[1]
        assert first.endswith(f"-m pip install -q --index-url {CPU_INDEX} torch==2.13.0"), out
        assert "CPU build" in out
        assert f"if {CPU_INDEX} cannot be reached:" in out  # then pip's own index
        assert out.splitlines()[-2].endswith("-m pip install -q torch==2.13.0"), out


def test_bootstrap_installs_the_default_build_with_a_gpu(tmp_path):
    out = bootstrap_dry_run(tmp_path, "ok")
    assert "--index-url" not in out and "download.pytorch.org" not in out, out
    assert out.splitlines()[1].endswith("-m pip install -q torch==2.13.0"), out


def test_bootstrap_index_and_version_overrides(tmp_path):
    mirror = "https://mirror.example/whl/cu121"
    out = bootstrap_dry_run(tmp_path / "a", "absent", FLQ_TORCH_INDEX_URL=mirror)
    assert f"--index-url {mirror} torch==2.13.0" in out and CPU_INDEX not in out, out
    assert "cannot be reached" not in out  # the user's index: no fall-back
    out = bootstrap_dry_run(tmp_path / "b", "absent", FLQ_TORCH_INDEX_URL="")
    assert "--index-url" not in out, out
    out = bootstrap_dry_run(tmp_path / "c", "ok", FLQ_TORCH="torch==2.12.1")
    calls = [ln for ln in out.splitlines() if ln.startswith("would run: ")]
    assert len(calls) == 1 and calls[0].endswith("-m pip install -q torch==2.12.1"), out


@pytest.mark.parametrize("reachable", [True, False])
def test_bootstrap_falls_back_to_pips_index_when_the_cpu_index_is_unreachable(tmp_path, reachable):
    """The real install path, with a stand-in python whose torch is missing
    and whose pip records what it was asked to install."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the CPU index is chosen on Linux only")
    root = project_copy(tmp_path / "proj")
    record = tmp_path / "calls"
    py = stand_in_python(tmp_path / "py", record, import_torch=1, reachable=int(reachable))
    bin_dir = tool_dir(tmp_path / "bin", ["bash", "dirname", "uname", "timeout"])
    r = subprocess.run(
        [BASH, str(root / "scripts" / "bootstrap.sh")], capture_output=True, text=True, timeout=60,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path), "FLQ_PYTHON": str(py)},
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == str(py), r.stderr
    calls = recorded(record)
    if reachable:
        assert calls == [["-m", "pip", "install", "-q", "--index-url", CPU_INDEX, "torch==2.13.0"]]
        assert "cannot be reached" not in r.stderr
    else:
        assert calls == [["-m", "pip", "install", "-q", "torch==2.13.0"]]
        assert f"{CPU_INDEX} cannot be reached: installing PyTorch from pip's own index" in r.stderr


# ---------------------------------------------------------------------------
# what the tests need from the system; run_tests.sh --quick


def test_test_deps_names_what_is_missing_and_the_tests_it_affects(tmp_path):
    bin_dir = tool_dir(tmp_path / "bin", ["bash", "cut", "sort", "tr", "paste", "sed", "basename", "id"])
    r = subprocess.run(
        [BASH, str(REPO / "scripts" / "test_deps.sh"), sys.executable], capture_output=True, text=True, timeout=120,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path), "FLQ_TEST_DEPS_INSTALL": "0"},
    )  # fmt: skip
    assert r.returncode == 0
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    line = lines[0]
    for tool in ("rsync", "curl", "ssh", "openssl", "chromium"):
        assert tool in line.split("; affected:")[0], line
    assert "tests/test_deploy.py (ssh deployments skip)" in line
    assert "the browser tests in tests/test_dashboard.py (fail)" in line
    assert "apt-get install chromium curl openssh-client openssl rsync" in line
    assert "Fashion-MNIST" not in line  # flq finds it (the tests need it)


@pytest.mark.parametrize("quick", [True, False])
def test_run_tests_quick_leaves_out_the_slow_tests(tmp_path, quick):
    root = project_copy(tmp_path / "proj", "run_tests.sh")
    record = tmp_path / "calls"
    py = stand_in_python(tmp_path / "bin", record)
    args = ["--quick", "-k", "cluster"] if quick else ["-k", "cluster"]
    r = subprocess.run(
        [BASH, str(root / "run_tests.sh"), *args], capture_output=True, text=True, timeout=120,
        env=dict(os.environ, FLQ_PYTHON=str(py), FLQ_TEST_DEPS_INSTALL="0"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    calls = recorded(record)
    assert [c[:3] for c in calls] == [
        ["-m", "ruff", "check"],
        ["-m", "ruff", "format"],
        ["-m", "mypy"],
        ["-m", "pytest", "-q"],
    ]
    marks = ["-m", "not slow"] if quick else []
    assert calls[-1] == ["-m", "pytest", "-q", "-n", "2", "--dist", "loadfile", *marks, "-k", "cluster"]
