"""deploy_jetson.sh against a real sshd on 127.0.0.1 (started here, as the current user).

The deploy runs with --no-install and stand-in start commands (a tiny HTTP
server answering /status for the master, a marker-writing sleeper for the
workers), so it copies, starts, waits and stops for real without training.
Needs openssh-server, openssh-client, rsync and curl; without them the tests
skip, or fail when $CI is set.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy_jetson.sh"
SSHD = "/usr/sbin/sshd"
USER = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()


def unavailable(why: str):
    """Skip here, fail in CI: CI installs openssh-server, openssh-client, rsync and curl."""
    msg = f"{why} (apt-get install openssh-server openssh-client rsync curl)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (nobody may reap it in a container)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def run_deploy(*args, env=None, timeout=120):
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO
    )


# ---------------------------------------------------------------------------
# a real sshd on loopback


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    for tool in ("ssh", "ssh-keygen", "rsync", "curl"):
        if shutil.which(tool) is None:
            unavailable(f"{tool} not found")
    if not os.access(SSHD, os.X_OK):
        unavailable(f"{SSHD} not found")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "id_client"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "flq-test", "-f", str(d / name)],
            check=True,
            capture_output=True,
        )
    shutil.copy(d / "id_client.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "StrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\n"
        "PermitUserEnvironment no\nMaxStartups 50\nMaxSessions 50\n"
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    log = open(d / "sshd.log", "w")
    proc = subprocess.Popen(
        [SSHD, "-D", "-f", str(d / "sshd_config"), "-e"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 15
    while True:
        if proc.poll() is not None:
            log.close()
            unavailable(f"sshd exited ({proc.returncode}): {(d / 'sshd.log').read_text()[-500:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                unavailable("sshd did not start listening")
            time.sleep(0.1)
    env = dict(os.environ)
    env.pop("FLQ_PYTHON", None)
    env.update(
        SSH_OPTS=f"-F none -o UserKnownHostsFile={d / 'known_hosts'} -o IdentitiesOnly=yes",
        SSH_KEY=str(d / "id_client"),
        SSH_PORT=str(port),
        SSH_USER=USER,
    )
    # The client side works (key, known_hosts, BatchMode) before the script uses it.
    probe = subprocess.run(
        [
            "ssh",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=accept-new",
            "-p",
            str(port),
            "-i",
            env["SSH_KEY"],
            *env["SSH_OPTS"].split(),
            f"{USER}@127.0.0.1",
            "echo ok",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.stdout.strip() != "ok":
        proc.kill()
        unavailable(
            f"cannot log in to the test sshd: {probe.stderr.strip()[-300:]} {(d / 'sshd.log').read_text()[-300:]}"
        )
    yield {"port": port, "env": env, "dir": d}
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def stand_ins(env: dict, d: Path, master_port: int) -> dict:
    """Start commands that stand in for start_master.sh / start_worker.sh."""
    www = d / "www"
    www.mkdir()
    (www / "status").write_text('{"state": "waiting"}')
    marks = d / "marks"
    marks.mkdir()
    py = shlex.quote(sys.executable)
    env = dict(env)
    env["FLQ_DEPLOY_START_CMD_MASTER"] = (
        f'printf "%s\\n" "$*" > {marks}/master_args; '
        f'cd {www} && exec {py} -m http.server "$FLQ_MASTER_PORT" --bind 127.0.0.1'
    )
    env["FLQ_DEPLOY_START_CMD_WORKER"] = (
        f'printf "%s\\n" "$FLQ_WORKER_ID $FLQ_MASTER_IP" "$*" "$PWD" > {marks}/worker$FLQ_WORKER_ID; exec sleep 600'
    )
    return env


def wait_for(path: Path, timeout: float = 10) -> str:
    """The text of a file a just-started process writes (it may not be there yet)."""
    deadline = time.monotonic() + timeout
    while not (path.is_file() and path.read_text().endswith("\n")):
        assert time.monotonic() < deadline, f"{path} was never written"
        time.sleep(0.05)
    return path.read_text()


def kill_leftovers(remote: Path):
    for f in (remote / "logs").glob("*.pid"):
        try:
            os.kill(int(f.read_text().strip()), 9)
        except (ValueError, OSError):
            pass


# ---------------------------------------------------------------------------
# (a) dry run: every command printed, none run


@pytest.fixture()
def shim_path(tmp_path):
    """A PATH whose ssh, rsync, scp and curl only log that they were called."""
    b = tmp_path / "shim"
    b.mkdir()
    for tool in ("ssh", "rsync", "scp", "curl"):
        p = b / tool
        p.write_text(f'#!/bin/sh\necho "{tool} $*" >> {tmp_path}/called\nexit 255\n')
        p.chmod(0o755)
    return f"{b}:{os.environ['PATH']}", tmp_path / "called"


def test_help():
    r = run_deploy("--help")
    assert r.returncode == 0
    for flag in (
        "--master-ip",
        "--worker-ips",
        "--user",
        "--ssh-port",
        "--ssh-key",
        "--remote-dir",
        "--config",
        "--master-port",
        "--dry-run",
        "--stop",
        "--no-install",
    ):
        assert flag in r.stdout


def test_dry_run_prints_commands_and_runs_none(shim_path):
    path, called = shim_path
    env = {**os.environ, "PATH": path, "SSH_OPTS": ""}
    for k in (
        "MASTER_IP",
        "WORKER_IPS",
        "SSH_KEY",
        "SSH_PORT",
        "REMOTE_DIR",
        "FLQ_PYTHON",
        "FLQ_DEPLOY_START_CMD_MASTER",
        "FLQ_DEPLOY_START_CMD_WORKER",
    ):
        env.pop(k, None)
    r = run_deploy("--dry-run", "--user", "nvidia", env=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert not called.exists(), called.read_text()
    master, workers = "192.168.1.100", ["192.168.1.101", "192.168.1.102", "192.168.1.103", "192.168.1.104"]
    for ip in [master, *workers]:
        rsync = [ln for ln in out.splitlines() if ln.startswith("+ rsync ") and f"nvidia@{ip}:~/flq-fed/" in ln]
        assert len(rsync) == 1, out
        for ex in (".git", ".venv", "/results", "/logs", "__pycache__", "/flq_config.json"):
            assert f"--exclude={ex}" in rsync[0]
        assert "-o BatchMode=yes -o StrictHostKeyChecking=accept-new" in rsync[0]
        assert "+ ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new" in out
        assert f'nvidia@{ip} \'cd "$HOME"/flq-fed && PY=$(bash scripts/bootstrap.sh)' in out
    assert "nohup ./start_master.sh --config flq_config.json --port 5000 > logs/deploy_master.out 2>&1" in out
    assert "echo $! > logs/master.pid" in out
    assert "curl -fsS --max-time 3 -o /dev/null http://192.168.1.100:5000/status" in out
    for i, ip in enumerate(workers):
        line = next(ln for ln in out.splitlines() if f"--worker_id {i} " in ln)
        assert f"nvidia@{ip} " in line
        assert (
            f"nohup ./start_worker.sh --worker_id {i} --master_ip 192.168.1.100 --master_port 5000"
            f" > logs/deploy_worker{i}.out 2>&1"
        ) in line
        assert f"echo $! > logs/worker{i}.pid" in line
    # the master starts before any worker, after the wait for /status
    assert out.index("start_master.sh") < out.index("/status") < out.index("start_worker.sh")


def test_dry_run_env_and_flag_overrides(shim_path, tmp_path):
    path, called = shim_path
    key = tmp_path / "key"
    key.write_text("not a real key")
    env = {
        **os.environ,
        "PATH": path,
        "MASTER_IP": "10.0.0.1",
        "WORKER_IPS": "10.0.0.2 10.0.0.2 10.0.0.1",
        "SSH_OPTS": "",
        "FLQ_PYTHON": "/opt/conda/envs/fed/bin/python",
    }
    r = run_deploy(
        "--dry-run",
        "--user",
        "pi",
        "--ssh-port",
        "2222",
        "--ssh-key",
        str(key),
        "--master-port",
        "6000",
        "--remote-dir",
        "/opt/flq",
        "--no-rsync",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert not called.exists()
    # one copy per distinct host; tar over ssh as asked
    assert out.count("+ tar -C ") == 2 and "+ rsync" not in out
    assert f"-p 2222 -i {key}" in out
    assert "FLQ_PYTHON=/opt/conda/envs/fed/bin/python bash scripts/bootstrap.sh" in out
    assert "http://10.0.0.1:6000/status" in out
    for i, ip in enumerate(["10.0.0.2", "10.0.0.2", "10.0.0.1"]):
        line = next(ln for ln in out.splitlines() if f"--worker_id {i} " in ln)
        assert f"pi@{ip} 'cd /opt/flq && " in line
        assert f"--master_ip 10.0.0.1 --master_port 6000 > logs/deploy_worker{i}.out" in line
    # flags win over the environment
    r = run_deploy("--dry-run", "--master-ip", "10.9.9.9", "--worker-ips", "10.9.9.8", "--no-install", env=env)
    assert r.returncode == 0, r.stderr
    assert "10.0.0." not in r.stdout and "bootstrap.sh" not in r.stdout
    assert "--worker_id 0 --master_ip 10.9.9.9" in r.stdout and "--worker_id 1 " not in r.stdout
    assert not called.exists()
    # flq_config.json's run needs its 4 workers: one host is too few, and it says so before deploying
    assert (
        "warning: the run needs 4 workers (system.min_workers; 0 = total_workers) but WORKER_IPS has 1"
        in r.stdout + r.stderr
    )


# ---------------------------------------------------------------------------
# (d) clear one-line errors


def test_bad_config_is_a_one_line_error(shim_path):
    path, called = shim_path
    env = {**os.environ, "PATH": path}
    r = run_deploy(
        "--master-ip", "127.0.0.1", "--worker-ips", "127.0.0.1", "--config", "/nonexistent/cfg.json", env=env
    )
    assert r.returncode != 0
    assert r.stderr.strip() == "deploy_jetson.sh: error: config file not found: /nonexistent/cfg.json"
    assert not called.exists()


def test_invalid_json_config(tmp_path, shim_path):
    path, called = shim_path
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = run_deploy("--dry-run", "--config", str(bad), env={**os.environ, "PATH": path})
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "not valid JSON" in r.stderr
    assert not called.exists()


def test_unreachable_host_is_a_one_line_error(sshd):
    port = free_port()  # nothing listens there
    env = {**sshd["env"], "SSH_PORT": str(port)}
    r = run_deploy("--master-ip", "127.0.0.1", "--worker-ips", "127.0.0.1", "--no-install", env=env, timeout=60)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"deploy_jetson.sh: error: cannot reach {USER}@127.0.0.1 over ssh (port {port})")


# ---------------------------------------------------------------------------
# (b) a real deploy over loopback, (c) --stop


@pytest.fixture(scope="module")
def deployed(sshd, tmp_path_factory):
    d = tmp_path_factory.mktemp("deploy")
    remote = d / "remote"
    mport = free_port()
    env = stand_ins(sshd["env"], d, mport)
    env["REMOTE_DIR"] = str(remote)
    args = [
        "--master-ip",
        "127.0.0.1",
        "--worker-ips",
        "127.0.0.1 127.0.0.1",
        "--master-port",
        str(mport),
        "--no-install",
        "--timeout",
        "30",
    ]
    r = run_deploy(*args, env=env)
    yield {"r": r, "remote": remote, "marks": d / "marks", "port": mport, "env": env, "args": args}
    kill_leftovers(remote)


def test_deploy_copies_starts_master_then_workers(deployed):
    r, remote, marks, mport = deployed["r"], deployed["remote"], deployed["marks"], deployed["port"]
    assert r.returncode == 0, r.stdout + r.stderr
    assert "(rsync)" in r.stdout
    # the project arrived, without .git, .venv, __pycache__, results, local logs
    assert (remote / "src" / "flq" / "__init__.py").is_file()
    assert (remote / "tests" / "test_deploy.py").is_file()
    assert os.access(remote / "start_master.sh", os.X_OK) and os.access(remote / "deploy_jetson.sh", os.X_OK)
    assert (remote / "flq_config.json").read_bytes() == (REPO / "flq_config.json").read_bytes()
    for gone in (".git", ".venv", "results"):
        assert not (remote / gone).exists(), gone
    assert not list(remote.rglob("__pycache__"))
    assert sorted(p.name for p in (remote / "logs").iterdir()) == [
        "deploy_master.out",
        "deploy_worker0.out",
        "deploy_worker1.out",
        "master.pid",
        "worker0.pid",
        "worker1.pid",
    ]
    # the master got the standard arguments and answers /status
    assert wait_for(marks / "master_args").strip() == f"--config flq_config.json --port {mport}"
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/status", timeout=5) as resp:
        assert json.loads(resp.read()) == {"state": "waiting"}
    # each worker got its id (its position in WORKER_IPS), the master's address, and runs in REMOTE_DIR
    for i in (0, 1):
        lines = wait_for(marks / f"worker{i}").splitlines()
        assert lines == [f"{i} 127.0.0.1", f"--worker_id {i} --master_ip 127.0.0.1 --master_port {mport}", str(remote)]
    for name in ("master", "worker0", "worker1"):
        pid = int((remote / "logs" / f"{name}.pid").read_text())
        assert alive(pid), name
    assert f"http://127.0.0.1:{mport}/status" in r.stdout
    assert f"{remote}/logs/deploy_master.out" in r.stdout
    # a second deploy refuses while these run
    r2 = run_deploy(*deployed["args"], env=deployed["env"])
    assert r2.returncode != 0 and "already running" in r2.stderr and "--stop" in r2.stderr
    assert len(r2.stderr.strip().splitlines()) == 1


def test_stop_kills_master_and_workers(deployed):
    remote = deployed["remote"]
    assert deployed["r"].returncode == 0, deployed["r"].stderr
    pids = {n: int((remote / "logs" / f"{n}.pid").read_text()) for n in ("master", "worker0", "worker1")}
    assert all(alive(p) for p in pids.values())
    env = {**deployed["env"], "STOP_GRACE": "1"}
    r = run_deploy("--stop", *deployed["args"], env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [n for n, p in pids.items() if alive(p)]
    assert not list((remote / "logs").glob("*.pid"))
    # stopping again finds nothing and still succeeds
    r = run_deploy("--stop", *deployed["args"], env=env)
    assert r.returncode == 0 and "nothing running" in r.stdout


def test_deploy_with_tar_and_a_config_outside_the_project(sshd, tmp_path):
    remote = tmp_path / "remote dir"  # a space in the path, too
    cfg = tmp_path / "cluster.json"
    cfg.write_text(json.dumps({"total_workers": 1, "min_workers": 1, "max_rounds": 2}))
    mport = free_port()
    env = stand_ins(sshd["env"], tmp_path, mport)
    env["REMOTE_DIR"] = str(remote)
    args = [
        "--master-ip",
        "127.0.0.1",
        "--worker-ips",
        "127.0.0.1",
        "--master-port",
        str(mport),
        "--config",
        str(cfg),
        "--no-install",
        "--no-rsync",
        "--timeout",
        "30",
    ]
    try:
        r = run_deploy(*args, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "(tar over ssh)" in r.stdout
        assert (remote / "src" / "flq" / "__init__.py").is_file()
        assert not (remote / ".git").exists() and not (remote / ".venv").exists()
        assert (remote / "cluster.json").read_text() == cfg.read_text()
        assert wait_for(tmp_path / "marks" / "master_args").strip() == f"--config cluster.json --port {mport}"
        assert wait_for(tmp_path / "marks" / "worker0").splitlines()[0] == "0 127.0.0.1"
        pids = [int(p.read_text()) for p in (remote / "logs").glob("*.pid")]
        assert len(pids) == 2
        r = run_deploy("--stop", *args, env={**env, "STOP_GRACE": "0"})
        assert r.returncode == 0, r.stdout + r.stderr
        time.sleep(0.3)
        assert not [p for p in pids if alive(p)]
    finally:
        kill_leftovers(remote)


FAKE_PYTHON = """#!{real}
# Stands in for the hosts' python (FLQ_PYTHON): logs each call; as `-m flq master`
# it serves /status on --port, as `-m flq worker` it sleeps; anything else succeeds.
import os, sys
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(" ".join(args) + "\\n")
if args[:3] == ["-m", "flq", "master"]:
    port = args[args.index("--port") + 1]
    os.chdir({www!r})
    os.execv({real!r}, [{real!r}, "-m", "http.server", port, "--bind", "127.0.0.1"])
if args[:3] == ["-m", "flq", "worker"]:
    os.execv("/bin/sleep", ["sleep", "600"])
"""


def test_default_start_commands_and_install_with_flq_python(sshd, tmp_path):
    """The real start_master.sh / start_worker.sh and the install step, with FLQ_PYTHON passed on
    to the host; the interpreter is a stand-in, so nothing is installed or trained."""
    remote = tmp_path / "remote"
    www = tmp_path / "www"
    www.mkdir()
    (www / "status").write_text("{}")
    log = tmp_path / "python_calls"
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON.format(real=sys.executable, log=str(log), www=str(www)))
    fake.chmod(0o755)
    mport = free_port()
    env = {**sshd["env"], "REMOTE_DIR": str(remote), "FLQ_PYTHON": str(fake)}
    args = ["--master-ip", "127.0.0.1", "--worker-ips", "127.0.0.1", "--master-port", str(mport), "--timeout", "30"]
    try:
        r = run_deploy(*args, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "(rsync)" in r.stdout
        deadline = time.monotonic() + 10
        while "-m flq worker" not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        calls = log.read_text().splitlines()
        # the install step ran bootstrap.sh with FLQ_PYTHON: it checked that interpreter's packages and,
        # as they import, installed nothing (no reinstall on every start)
        assert any(c.startswith("-c import flq, fastapi") for c in calls)
        assert not any("pip install" in c for c in calls)
        assert f"-m flq master --config flq_config.json --port {mport}" in calls
        assert f"-m flq worker --worker_id 0 --master_ip 127.0.0.1 --master_port {mport}" in calls
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/status", timeout=5) as resp:
            assert resp.status == 200
        pids = [int((remote / "logs" / f"{n}.pid").read_text()) for n in ("master", "worker0")]
        assert all(alive(p) for p in pids)
        r = run_deploy("--stop", *args, env={**env, "STOP_GRACE": "0"})
        assert r.returncode == 0, r.stdout + r.stderr
        time.sleep(0.3)
        assert not [p for p in pids if alive(p)]
    finally:
        kill_leftovers(remote)


def test_master_that_never_answers_times_out(sshd, tmp_path):
    remote = tmp_path / "remote"
    env = {
        **sshd["env"],
        "REMOTE_DIR": str(remote),
        "FLQ_DEPLOY_START_CMD_MASTER": "exec sleep 600",
        "FLQ_DEPLOY_START_CMD_WORKER": "exec sleep 600",
    }
    try:
        r = run_deploy(
            "--master-ip",
            "127.0.0.1",
            "--worker-ips",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            "--no-install",
            "--timeout",
            "2",
            env=env,
        )
        assert r.returncode != 0
        assert r.stderr.strip().splitlines()[-1].startswith("deploy_jetson.sh: error: the master did not answer")
        assert not (remote / "logs" / "worker0.pid").exists()  # no worker started
    finally:
        kill_leftovers(remote)


def test_master_that_dies_is_reported(sshd, tmp_path):
    remote = tmp_path / "remote"
    env = {
        **sshd["env"],
        "REMOTE_DIR": str(remote),
        "FLQ_DEPLOY_START_CMD_MASTER": "echo 'boom: no dataset'; exit 3",
        "FLQ_DEPLOY_START_CMD_WORKER": "exec sleep 600",
    }
    try:
        r = run_deploy(
            "--master-ip",
            "127.0.0.1",
            "--worker-ips",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            "--no-install",
            "--timeout",
            "20",
            env=env,
        )
        assert r.returncode != 0
        assert "boom: no dataset" in r.stderr
        assert "exited before answering" in r.stderr.strip().splitlines()[-1]
    finally:
        kill_leftovers(remote)


# ---------------------------------------------------------------------------
# environment.yml matches pyproject.toml


def test_environment_yml_matches_pyproject():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    lines = [ln.split("#")[0].strip() for ln in (REPO / "environment.yml").read_text().splitlines()]
    assert "name: fed" in lines
    specs = [ln[2:].strip() for ln in lines if ln.startswith("- ")]
    assert "python>=3.9" in specs and "-e .[test]" in specs
    for dep in wanted:
        assert dep.replace(" ", "") in specs, dep


def test_dry_run_hands_each_host_only_its_own_credentials(shim_path, tmp_path):
    """--credentials DIR (flq credentials --tls): the master's host gets
    master.secret and the server and operator certificates, each worker's
    host only its own key and certificate; ca-key.pem goes nowhere; the
    project copy leaves the folder out; master and workers start with them."""
    path, called = shim_path
    creds = tmp_path / "creds"
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "flq",
            "credentials",
            "--workers",
            "4",
            "--out",
            str(creds),
            "--tls",
            "--master-host",
            "10.0.0.1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    env = {**os.environ, "PATH": path, "SSH_OPTS": ""}
    r = run_deploy(
        "--dry-run",
        "--master-ip",
        "10.0.0.1",
        "--worker-ips",
        "10.0.0.2 10.0.0.3 10.0.0.4",
        "--credentials",
        str(creds),
        "--no-install",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert not called.exists()
    copied = {}  # host -> credential files sent to it
    for line in r.stdout.splitlines():
        if "/credentials/" in line and f"< {creds}/" in line:
            host = line.split("@", 1)[1].split()[0]
            copied.setdefault(host, []).append(line.rsplit("/", 1)[1])
    assert copied == {
        "10.0.0.1": ["master.secret", "ca.pem", "master.pem", "master-key.pem", "operator.pem", "operator-key.pem"],
        **{
            f"10.0.0.{i + 2}": [f"worker_{i}.key", "ca.pem", f"worker_{i}.pem", f"worker_{i}-key.pem"] for i in range(3)
        },
    }, r.stdout
    assert "ca-key.pem" not in r.stdout
    assert all("--exclude=/credentials" in ln for ln in r.stdout.splitlines() if ln.startswith("+ rsync "))
    assert "--credentials credentials/master.secret --certfile credentials/master.pem" in r.stdout
    assert "--cafile credentials/ca.pem" in r.stdout and "https://10.0.0.1:5000/status" in r.stdout
    for i in range(3):
        line = next(ln for ln in r.stdout.splitlines() if f"--worker_id {i} " in ln)
        assert f"--credential credentials/worker_{i}.key --cafile credentials/ca.pem" in line
        assert f"--certfile credentials/worker_{i}.pem --keyfile credentials/worker_{i}-key.pem" in line
    # a master certificate for another address is refused before anything runs
    r = run_deploy(
        "--dry-run", "--master-ip", "10.0.0.9", "--worker-ips", "10.0.0.2", "--credentials", str(creds), env=env
    )
    assert r.returncode == 1 and "master.pem is not valid for 10.0.0.9" in r.stderr, r.stderr
    # and so is a folder without a key for every worker host, or for every worker id of the run (flq_config.json: 4)
    r = run_deploy(
        "--dry-run", "--master-ip", "10.0.0.1", "--worker-ips", "a b c d e", "--credentials", str(creds), env=env
    )
    assert r.returncode == 1 and "no worker_4.key for worker 4" in r.stderr, r.stderr
    few = tmp_path / "few"
    made = subprocess.run(
        [sys.executable, "-m", "flq", "credentials", "--workers", "3", "--out", str(few)], capture_output=True
    )
    assert made.returncode == 0
    r = run_deploy("--dry-run", "--master-ip", "10.0.0.1", "--worker-ips", "a b c", "--credentials", str(few), env=env)
    assert r.returncode == 1 and "made for 3 workers but the config's total_workers is 4" in r.stderr, r.stderr
