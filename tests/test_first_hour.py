"""A new user's first hour: what is wrong is said in one line, at once, with
a non-zero status, instead of a traceback, an empty reason or minutes of
retries. Real processes: workers against a web server that is not an FLQ
master (``python -m http.server``, and small stdlib servers that answer
``GET /config`` like a master and the registration like something else),
``flq doctor`` against it, the entry scripts under Pythons that cannot run
FLQ-Fed (the system's python3 without the project's packages, a hidden
package, Python 3.8 / 3.6 / 2.7 where installed), and ``flq doctor`` on a
Jetson (a fake ``/etc/nv_tegra_release`` of JetPack 5 and of JetPack 6)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import tokenize
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cluster_util import free_port
from conftest import PAPER_CONFIG

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "flq_config.json"
#: "In seconds": a process start (PyTorch and the data loaded, for the
#: registration cases) on a loaded 2-core machine included; far below the
#: 300 s of retries of a network failure.
SECONDS = 90
R35 = "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Fri Jul 21 2023\n"
R36 = "# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64, DATE: Fri Jul 19 2024\n"


def _old_pythons():
    """Interpreters older than 3.9 on this machine (pyenv's, or the system's)."""
    found = []
    for version in ("3.8", "3.6", "2.7"):
        for python in [
            *sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python")),
            Path(f"/usr/bin/python{version}"),
        ]:
            if python.is_file() and os.access(python, os.X_OK):
                found.append(python)
                break
    return found


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(extra)
    return env


def _run(cmd, cwd, env=None, timeout=SECONDS):
    """Run ``cmd`` to its end: (status, stdout, stderr, seconds)."""
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr, time.monotonic() - t0


def _workers(tmp_path, *ports: int):
    """``flq worker --worker_id 0 --master_port PORT`` for each port, all at
    once, each with a --give_up_s no test waits for (a retried refusal would
    show as a timeout): [(status, stderr, the monotonic time it exited)]."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "flq", "worker", "--worker_id", "0", "--master_port", str(port)]
            + ["--threads", "1", "--log_dir", str(tmp_path / "logs"), "--no_state", "--give_up_s", "3600"],
            cwd=tmp_path,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for port in ports
    ]
    ended = {}
    deadline = time.monotonic() + 600
    while len(ended) < len(procs):
        assert time.monotonic() < deadline, "a worker is still running after 600 s"
        for i, p in enumerate(procs):
            if i not in ended and p.poll() is not None:
                ended[i] = time.monotonic()
        time.sleep(0.05)
    return [(p.returncode, p.stderr.read(), ended[i]) for i, p in enumerate(procs)]


def _one_line(stderr: str, prefix: str) -> str:
    """The process's last line starting with ``prefix``: no traceback, no retries."""
    assert "Traceback" not in stderr and "retrying" not in stderr, stderr
    lines = [x for x in stderr.strip().splitlines() if x.startswith(prefix)]
    assert lines, stderr
    return lines[-1]


class _Server:
    """A stdlib HTTP server on 127.0.0.1 in this process; ``Handler`` answers."""

    def __init__(self, handler) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _master_impostor(post: str):
    """A handler that answers ``GET /config`` as an FLQ master would (a run of
    one worker, the mlp), and a POST (the registration) as ``post`` says:
    ``501`` (no POST at all: http.server's own page) or ``html`` (200 with a
    web page: a site that answers every path). ``Handler.asked`` gets the
    monotonic time of each POST."""
    from flq.config import load_config

    sections = load_config(str(PAPER_CONFIG), {"model": "mlp", "total_workers": 1, "partition": "iid"})
    document = json.dumps(
        {"config": sections.public_sections(), "state": "waiting", "round": 1, "run": "impostor"}
    ).encode()

    class Handler(BaseHTTPRequestHandler):
        asked: list = []

        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path.startswith("/config"):
                self._send(200, "application/json", document)
            else:
                self.send_error(404)

        def _send(self, status, kind, body):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    def answer(self):
        Handler.asked.append(time.monotonic())
        if post == "html":
            self._send(200, "text/html; charset=utf-8", b"<html><head><title>Welcome</title></head><p>Hi</p></html>")
        else:
            BaseHTTPRequestHandler.send_error(self, 501, f"Unsupported method ({self.command!r})")

    Handler.do_POST = answer  # type: ignore[attr-defined]
    return Handler


class _Redirect(BaseHTTPRequestHandler):
    """Every GET moved to HTTPS, as a web server in front of another site does."""

    def do_GET(self):  # noqa: N802
        self.send_response(301)
        self.send_header("Location", f"https://example.test{self.path}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


# ----- 2. a server that is not an FLQ master ---------------------------------------------


@pytest.mark.slow
def test_a_web_server_on_the_masters_port_is_named_in_one_line_at_once(tmp_path, fmnist_available):
    """The worker's first call (GET /config) and its registration (POST
    /workers/register, after it loaded its data) against servers that are not
    an FLQ master: exit 8 within seconds, one line naming the call, the
    status, the content type and the start of the answer (before: 'the master
    refused worker 0: ' with an empty reason, or a traceback)."""
    web_port = free_port()
    web = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(web_port), "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    impostors = [_master_impostor(kind) for kind in ("501", "html")]
    servers = [_Server(handler) for handler in impostors] + [_Server(_Redirect)]
    try:
        deadline = time.monotonic() + 30
        while not _listening(web_port):
            assert time.monotonic() < deadline and web.poll() is None, "python -m http.server did not start"
            time.sleep(0.1)
        t0 = time.monotonic()
        results = _workers(tmp_path, web_port, *(s.port for s in servers))
        says = [  # what the line says: the call, the answer's status and type, and its text
            (web_port, "GET /config answered 404 text/html: ", "Error code: 404 Message: File not found."),
            (servers[0].port, "POST /workers/register answered 501 text/html: ", "Unsupported method ("),
            (servers[1].port, "POST /workers/register answered 200 text/html: ", "'Welcome Hi'"),
            (servers[2].port, "GET /config answered 301 a redirect to https://example.test/config)", ""),
        ]
        for i, ((status, err, ended), (port, what, text)) in enumerate(zip(results, says)):
            line = _one_line(err, "flq worker 0: ")
            assert status == 8, err
            assert f"http://127.0.0.1:{port} is not an FLQ master ({what}" in line and text in line, line
            assert line.endswith("check --master_ip and --master_port (exit 8)"), line
            assert len(line) < 300, line
            # at once after the answer: the registration's time from its POST; the first call's from the start
            asked = impostors[i - 1].asked if i in (1, 2) else []
            took = ended - (asked[0] if asked else t0)
            assert took < (SECONDS / 3 if asked else SECONDS * 2), (line, took)
            print(f"\n| not an FLQ master: {what.split(':')[0]} | exit {status} after {took:.1f} s |")

        # flq doctor's look at the master says the same
        status, out, err, _ = _run(
            [sys.executable, "-m", "flq", "doctor", "--device", "cpu", "--master_ip", f"127.0.0.1:{web_port}"],
            cwd=tmp_path,
        )
        line = next(x for x in out.splitlines() if x.startswith("[FAIL] master"))
        assert status == 1 and "Traceback" not in err, out + err
        assert f"http://127.0.0.1:{web_port} is not an FLQ master (GET /status answered 404 text/html: " in line
    finally:
        web.kill()
        web.wait()
        for s in servers:
            s.close()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# ----- 3. the entry scripts under a Python that cannot run them --------------------------


def _fstring_free(path: Path) -> bool:
    """No f-string in ``path``: Pythons before 3.6 (and 2.7) can read it."""
    tokens = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
    prefixes = [t.string.split("'")[0].split('"')[0].lower() for t in tokens if t.type == tokenize.STRING]
    return not any("f" in p for p in prefixes) and not any(
        t.type == getattr(tokenize, "FSTRING_START", None) for t in tokens
    )


@pytest.mark.parametrize("script,start", [("flq_worker.py", "start_worker.sh"), ("flq_master.py", "start_master.sh")])
def test_entry_scripts_say_in_one_line_which_python_lacks_what(tmp_path, script, start):
    assert _fstring_free(REPO / script) and _fstring_free(REPO / "flq_entry.py")
    # the project's environment: they work as before
    status, out, err, _ = _run([sys.executable, str(REPO / script), "--help"], cwd=REPO)
    assert status == 0 and "usage: flq " in out, out + err

    # the system's python3 without the project's packages (before: ModuleNotFoundError and a traceback)
    system = Path("/usr/bin/python3")
    if system.exists() and _run([str(system), "-c", "import torch"], cwd=tmp_path)[0] != 0:
        status, out, err, took = _run([str(system), script, "--help"], cwd=REPO)
        line = _one_line(err, f"{script}: ")
        assert status == 2 and out == "" and err.count("\n") == 1, err
        assert line.startswith(f"{script}: the flq package is not importable by {system} (No module named 'torch')")
        assert f"run ./{start}, or " in line and "install with scripts/bootstrap.sh" in line, line

    # a copy without the package beside it, and an flq on the path that is not the package
    alone = tmp_path / "alone"
    (alone / "fake" / "flq").mkdir(parents=True)
    (alone / "fake" / "flq" / "__init__.py").write_text("")
    shutil.copy(REPO / script, alone / script)
    shutil.copy(REPO / "flq_entry.py", alone / "flq_entry.py")
    status, out, err, _ = _run([sys.executable, script, "--help"], cwd=alone, env=_env(PYTHONPATH=str(alone / "fake")))
    line = _one_line(err, f"{script}: ")
    assert status == 2 and err.count("\n") == 1, err
    assert f"the flq package is not importable by {sys.executable} (No module named 'flq.cli')" in line, line


@pytest.mark.parametrize("script", ["flq_worker.py", "flq_master.py"])
def test_entry_scripts_refuse_an_old_python_in_one_line(tmp_path, script):
    """Python < 3.9 (JetPack 5's 3.8, JetPack 4's 3.6, a 2.7): one line, exit
    2, not a SyntaxError; on a JetPack 5 board it says why that Python is
    there. The real old Pythons where installed; everywhere, the check itself
    under a Python that reports 3.8."""
    release = tmp_path / "nv_tegra_release"
    release.write_text(R35)
    ran = 0
    for python in _old_pythons():
        status, out, err, _ = _run([str(python), script, "--worker_id", "0"], cwd=REPO)
        line = _one_line(err, f"{script}: ")
        assert status == 2 and err.count("\n") == 1, err
        assert f"{python} is Python " in line and "FLQ-Fed needs Python >= 3.9; run it with a newer one: " in line
        if "python3.8" in str(python) or "/3.8." in str(python):
            status, _, err, _ = _run([str(python), script], cwd=REPO, env=_env(FLQ_NV_TEGRA_RELEASE=str(release)))
            assert status == 2 and "(JetPack 5: NVIDIA's torch wheels for it are Python 3.8 only" in err, err
        ran += 1
    code = (
        "import runpy, sys; sys.version_info = (3, 8, 10, 'final', 0); sys.argv = [sys.argv[1]]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    status, _, err, _ = _run(
        [sys.executable, "-c", code, script], cwd=REPO, env=_env(FLQ_NV_TEGRA_RELEASE=str(release))
    )
    line = _one_line(err, f"{script}: ")
    assert status == 2 and err.count("\n") == 1, err
    assert "is Python 3.8.10 and FLQ-Fed needs Python >= 3.9 (JetPack 5: " in line, line
    print(f"\n| {script} under old Pythons | {ran} real, 1 reported as 3.8 |")


# ----- 4. flq doctor on a Jetson -----------------------------------------------------------


@pytest.mark.slow
def test_doctor_on_jetpack_5_and_6_says_in_one_line_what_this_python_and_torch_can_do(tmp_path, fmnist_available):
    import torch

    files = {}
    for name, text in (("r35", R35), ("r36", R36), ("garbled", "not a release\n")):
        files[name] = tmp_path / name
        files[name].write_text(text)
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "flq", "doctor", "--config", str(CONFIG), "--device", "cpu", "--json"],
            cwd=tmp_path,
            env=_env(FLQ_NV_TEGRA_RELEASE=str(path), FLQ_NO_DOWNLOAD="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, path in files.items()
    }
    jetson = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=SECONDS + 60)
        assert p.returncode == 0 and "Traceback" not in err, out + err  # a warning: training on CPU works
        checks = json.loads(out)
        (jetson[name],) = [c for c in checks if c["check"] == "jetson"]
        assert [c["check"] for c in checks][:6] == ["python", "torch", "numpy", "config", "zstandard", "jetson"]
    cuda = torch.cuda.is_available()
    r35, r36 = jetson["r35"], jetson["r36"]
    for c in (r35, r36):
        assert "\n" not in c["detail"] and (c["fix"] is None or "\n" not in c["fix"])
    assert r35["detail"].startswith(
        "JetPack 5 (L4T R35.4.1): NVIDIA's torch wheels for it are Python 3.8 only and FLQ-Fed needs Python >= 3.9"
    ), r35
    assert r36["detail"].startswith("JetPack 6 (L4T R36.3.0): torch "), r36
    if cuda:
        assert r35["status"] == "ok" and r36["status"] == "ok" and "uses its GPU" in r36["detail"]
    else:
        assert r35["status"] == "warn" and "here has no CUDA -> this worker trains on CPU" in r35["detail"], r35
        assert r35["detail"].endswith("For the GPU use JetPack 6 (Orin boards; Python 3.10), see README 'Jetson'")
        assert r36["status"] == "warn" and "here has no CUDA -> this worker trains on CPU" in r36["detail"], r36
        assert "NVIDIA's torch wheel for JetPack 6 (Python 3.10)" in r36["fix"], r36
    assert jetson["garbled"]["status"] == "warn" and "does not name an L4T release" in jetson["garbled"]["detail"]

    # the text form: one line for the board (and its fix)
    status, out, err, _ = _run(
        [sys.executable, "-m", "flq", "doctor", "--config", str(CONFIG), "--device", "cpu"],
        cwd=tmp_path,
        env=_env(FLQ_NV_TEGRA_RELEASE=str(files["r35"]), FLQ_NO_DOWNLOAD="1"),
    )
    lines = out.splitlines()
    (i,) = [n for n, x in enumerate(lines) if x[7:].startswith("jetson")]
    assert lines[i].startswith("[ok]" if cuda else "[warn]") and "JetPack 5 (L4T R35.4.1)" in lines[i], out
    print(f"\n| doctor on a Jetson | R35: {r35['status']}, R36: {r36['status']} |")
