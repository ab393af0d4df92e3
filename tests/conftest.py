"""Shared fixtures: real Fashion-MNIST (Debian's dataset-fashion-mnist), small configs."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import signal
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIG = REPO / "configs" / "paper_fmnist.json"

# A suite started with SIGINT ignored (`cmd &` in a script, nohup) would pass
# that on to every process it starts, and flq keeps ignoring Ctrl-C then, as
# POSIX programs do (flq.outcome): the tests that send SIGINT need it heard.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The same arithmetic in every test process (and in the worker processes tests start).
torch.set_num_threads(1)
os.environ.setdefault("FLQ_NO_DOWNLOAD", "1")
# The user cache (decoded datasets, downloads) of this test session only: nothing left in $HOME.
_CACHE = tempfile.mkdtemp(prefix="flq-test-cache-")
os.environ["XDG_CACHE_HOME"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def fmnist_available() -> bool:
    from flq.datasets import find_dataset_dir

    found = find_dataset_dir("fashion_mnist") is not None
    if not found:
        pytest.fail("Fashion-MNIST not found: apt-get install dataset-fashion-mnist (CI installs it)")
    return found


def small_config(**overrides):
    """The paper's settings, shrunk for fast tests (overrides are flat keys):
    4 workers, 3 rounds, one thread, no test-set evaluation (``eval_every``
    0; a test that reads the accuracy sets it)."""
    from flq.config import load_config

    base = {"total_workers": 4, "max_rounds": 3, "threads": 1, "eval_every": 0}
    base.update(overrides)
    return load_config(str(PAPER_CONFIG), base)


def isolate_data_env(tmp_path, monkeypatch) -> None:
    """Keep a dataset test away from the real cache, environment, system
    folders and proxies."""
    from flq import datasets

    for var in ("FLQ_DATA_DIR", "FLQ_NO_DOWNLOAD", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    for var in ("all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(datasets, "SYSTEM_DIRS", ())


@pytest.fixture
def http_server(tmp_path):
    """A static HTTP server on 127.0.0.1 serving tmp_path/www; logs the paths asked."""
    root = tmp_path / "www"
    root.mkdir()
    requested = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/", requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say at the end why tests were left out: skips (each reason is in the
    short summary above, -ra) and the slow tests a quick run deselects."""
    skipped = len(terminalreporter.stats.get("skipped", []))
    deselected = len(terminalreporter.stats.get("deselected", []))
    if skipped:
        terminalreporter.write_line(
            f"{skipped} test(s) skipped, each with its reason in the summary above; "
            "scripts/test_deps.sh installs what most of them need",
            yellow=True,
        )
    expr = config.getoption("markexpr", "") or ""
    if deselected and expr:
        terminalreporter.write_line(f"{deselected} test(s) deselected by -m '{expr}'")


@pytest.fixture
def saved_figures(monkeypatch):
    """Every matplotlib figure saved during the test, by file name, as it was
    when saved (to check axes, labels and ticks)."""
    from matplotlib.figure import Figure

    captured = {}
    real_savefig = Figure.savefig

    def spy(self, fname, *args, **kwargs):
        captured[Path(fname).name] = self
        return real_savefig(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return captured
