"""Tests for ``flq doctor`` (flq.doctor): real checks on this machine, the real
dataset, real config files and real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from flq import datasets, doctor
from flq.config import Config

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "flq_config.json"


def run_doctor(capsys, *argv: str):
    """``run()`` through a parser built with ``add_arguments``; returns (exit status, stdout)."""
    p = argparse.ArgumentParser(prog="flq doctor")
    doctor.add_arguments(p)
    rc = doctor.run(p.parse_args(list(argv)))
    return rc, capsys.readouterr().out


def lines_of(out: str, name: str):
    """The line of check ``name`` and the line after it."""
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line[:7].strip() in ("[ok]", "[warn]", "[FAIL]") and line[7:23].strip() == name:
            return line, (lines[i + 1] if i + 1 < len(lines) else "")
    raise AssertionError(f"no {name!r} check in:\n{out}")


def write_json(path: Path, doc) -> Path:
    path.write_text(json.dumps(doc), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_proxy(monkeypatch):
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("FLQ_AUTH_TOKEN", raising=False)


@pytest.fixture
def status_server(no_proxy):
    """A tiny master stand-in: GET /status -> JSON; needs ``Bearer s3cret`` when ``server.token`` is set."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            token = self.server.token
            if token and self.headers.get("Authorization") != f"Bearer {token}":
                self._send(401, {"detail": "missing or wrong bearer token"})
            elif self.path == "/status":
                self._send(200, {"state": "training", "round": 3, "mode": "bbit"})
            else:
                self._send(404, {"detail": "not found"})

        def _send(self, code, doc):
            body = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.token = ""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_repo_config_all_ok(capsys, fmnist_available):
    rc, out = run_doctor(capsys, "--config", str(CONFIG))
    assert rc == 0, out
    assert "[FAIL]" not in out and "fix:" not in out
    assert torch.__version__ in out
    assert lines_of(out, "python")[0].startswith("[ok]")
    assert lines_of(out, "numpy")[0].startswith("[ok]")
    assert str(datasets.find_dataset_dir("fashion_mnist")) in lines_of(out, "dataset")[0]
    assert "flq_config.json: valid" in lines_of(out, "config")[0]
    device = lines_of(out, "device")[0]
    if torch.cuda.is_available():
        assert "cuda" in device
        assert lines_of(out, "gpu")[0].startswith("[ok]")
        assert "MiB" in lines_of(out, "gpu memory")[0]
    else:
        assert "cpu" in device
        assert "CPU build" in out or "CUDA" in lines_of(out, "torch")[0]
        assert f"{os.cpu_count()} cores" in lines_of(out, "cpu")[0]
        assert "n/a on CPU" in lines_of(out, "mixed precision")[0]


def test_cuda_requested(capsys, fmnist_available):
    rc, out = run_doctor(capsys, "--config", str(CONFIG), "--device", "cuda")
    line, after = lines_of(out, "device")
    if torch.cuda.is_available():
        assert rc == 0, out
        assert line.startswith("[ok]") and "cuda" in line
    else:
        assert rc == 1
        assert line.startswith("[FAIL]") and "cuda" in line
        assert after.startswith("  fix: ") and "set system.device to auto or cpu" in after


def test_bad_config_names_key_and_falls_back_to_defaults(capsys, tmp_path, fmnist_available):
    cfg = write_json(tmp_path / "bad.json", {"system": {"device": "gpu"}})
    rc, out = run_doctor(capsys, "--config", str(cfg), "--device", "cpu")
    assert rc == 1
    line, after = lines_of(out, "config")
    assert line.startswith("[FAIL]") and "system.device" in line and "'gpu'" in line
    assert after.startswith("  fix: ")
    # the remaining checks still ran, with the defaults
    assert lines_of(out, "device")[0].startswith("[ok]")
    assert lines_of(out, "dataset")[0].startswith("[ok]")


def test_mixed_precision_on_cpu_is_a_warning(capsys, tmp_path, fmnist_available):
    cfg = write_json(tmp_path / "mp.json", {"jetson_optimization": {"enable_mixed_precision": True}})
    rc, out = run_doctor(capsys, "--config", str(cfg), "--device", "cpu")
    assert rc == 0, out
    line = lines_of(out, "mixed precision")[0]
    assert line.startswith("[warn]") and "n/a on CPU (enable_mixed_precision needs CUDA)" in line


def test_dataset_missing(capsys, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.delenv("FLQ_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "SYSTEM_DIRS", ())
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rc, out = run_doctor(capsys, "--config", str(CONFIG), "--device", "cpu", "--data_dir", str(empty))
    assert rc == 1
    line, after = lines_of(out, "dataset")
    assert line.startswith("[FAIL]") and "Fashion-MNIST not found" in line and str(empty) in line
    assert after.startswith("  fix: ")
    assert "apt-get install dataset-fashion-mnist" in after and "FLQ_DATA_DIR" in after
    assert "allow the download" in after


def test_default_config_is_found_in_the_working_folder(capsys, tmp_path, monkeypatch, fmnist_available):
    monkeypatch.chdir(REPO)
    rc, out = run_doctor(capsys, "--device", "cpu")
    assert rc == 0, out
    assert "flq_config.json: valid" in lines_of(out, "config")[0]
    monkeypatch.chdir(tmp_path)
    rc, out = run_doctor(capsys, "--device", "cpu")
    assert rc == 0, out
    assert "defaults" in lines_of(out, "config")[0]


def test_master_not_reachable(capsys, no_proxy, fmnist_available):
    port = free_port()
    rc, out = run_doctor(
        capsys, "--config", str(CONFIG), "--device", "cpu", "--master_ip", "127.0.0.1", "--master_port", str(port)
    )
    assert rc == 1
    line, after = lines_of(out, "master")
    assert line.startswith("[FAIL]") and f"master at 127.0.0.1:{port} not reachable: " in line
    assert after == "  fix: start it with ./start_master.sh, check the IP/port and the firewall"


def test_master_status_ok(capsys, status_server, fmnist_available):
    port = status_server.server_address[1]
    rc, out = run_doctor(
        capsys, "--config", str(CONFIG), "--device", "cpu", "--master_ip", "127.0.0.1", "--master_port", str(port)
    )
    assert rc == 0, out
    line = lines_of(out, "master")[0]
    assert line.startswith("[ok]")
    assert "state training" in line and "round 3" in line and "mode bbit" in line


def test_master_needing_a_token(capsys, status_server, monkeypatch, fmnist_available):
    status_server.token = "s3cret"
    port = str(status_server.server_address[1])
    argv = ("--config", str(CONFIG), "--device", "cpu", "--master_ip", "127.0.0.1", "--master_port", port)
    rc, out = run_doctor(capsys, *argv)
    assert rc == 1
    line, after = lines_of(out, "master")
    assert line.startswith("[FAIL]") and "401" in line and "FLQ_AUTH_TOKEN" in after
    monkeypatch.setenv("FLQ_AUTH_TOKEN", "s3cret")
    rc, out = run_doctor(capsys, *argv)
    assert rc == 0, out
    assert "round 3" in lines_of(out, "master")[0]


def test_json_output(capsys, fmnist_available):
    rc, out = run_doctor(capsys, "--config", str(CONFIG), "--device", "cuda", "--json")
    checks = json.loads(out)
    assert isinstance(checks, list) and checks
    for c in checks:
        assert set(c) == {"check", "status", "detail", "fix"}
        assert c["status"] in ("ok", "warn", "fail")
        if c["status"] == "fail":
            assert c["fix"]
    by_name = {c["check"]: c for c in checks}
    assert torch.__version__ in by_name["torch"]["detail"]
    assert by_name["dataset"]["status"] == "ok"
    if torch.cuda.is_available():
        assert rc == 0 and by_name["device"]["status"] == "ok"
    else:
        assert rc == 1 and by_name["device"]["status"] == "fail"
        assert by_name["device"]["fix"].startswith("set system.device to auto or cpu")


def test_module_entry_point(tmp_path, fmnist_available):
    env = dict(os.environ, FLQ_NO_DOWNLOAD="1")
    proc = subprocess.run(
        [sys.executable, "-m", "flq.doctor", "--config", str(CONFIG), "--json"],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = json.loads(proc.stdout)
    assert [c["check"] for c in checks][:5] == ["python", "torch", "numpy", "config", "zstandard"]
    assert all(c["status"] != "fail" for c in checks)
    assert doctor.main(["--config", str(CONFIG), "--device", "cpu"]) == 0


class _FakeCuda:
    """Stands in for ``torch.cuda`` (no GPU here): one 4 GiB device."""

    def current_device(self):
        return 0

    def device_count(self):
        return 1

    def get_device_properties(self, index):
        return SimpleNamespace(name="Fake GPU", major=8, minor=7, total_memory=4096 * 1024 * 1024)

    def synchronize(self, device=None):
        pass


def test_cuda_reporting_logic(monkeypatch):
    """The CUDA branch's memory and mixed-precision verdicts. Only the device
    query is faked; the autocast matmul runs for real, so on a machine without
    CUDA it fails (warn when mixed precision is off, FAIL when on)."""
    fake = SimpleNamespace(
        cuda=_FakeCuda(),
        device=torch.device,
        full=torch.full,
        autocast=torch.autocast,
        float16=torch.float16,
        version=torch.version,
    )
    dev = torch.device("cuda")
    checks = doctor._check_cuda(fake, Config(gpu_memory_limit_mb=8192), dev, "auto")
    by_name = {c.check: c for c in checks}
    assert by_name["device"].status == "ok" and "cuda:0" in by_name["device"].detail
    assert by_name["gpu"].detail.startswith("Fake GPU") and "4096 MiB" in by_name["gpu"].detail
    assert by_name["gpu memory"].status == "warn" and "8192" in by_name["gpu memory"].detail
    checks = doctor._check_cuda(fake, Config(gpu_memory_limit_mb=2048), dev, "cuda")
    assert {c.check: c for c in checks}["gpu memory"].status == "ok"
    if not torch.cuda.is_available():
        off = doctor._check_autocast(fake, Config(enable_mixed_precision=False), 0)
        on = doctor._check_autocast(fake, Config(enable_mixed_precision=True), 0)
        assert off.status == "warn" and on.status == "fail" and on.fix
