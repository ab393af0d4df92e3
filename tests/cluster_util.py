"""Start a real master and real worker processes on loopback for tests."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import httpx
from conftest import PAPER_CONFIG


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class Cluster:
    root: Path
    port: int
    master: subprocess.Popen
    workers: Dict[int, subprocess.Popen] = field(default_factory=dict)
    env: Dict[str, str] = field(default_factory=dict)
    master_cmd: List[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    cafile: Optional[str] = None  # the master serves HTTPS with this certificate
    client_cert: Optional[Tuple[str, str]] = None  # (cert, key) when the master requires client certificates

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.cafile else 'http'}://{host}:{self.port}"

    def status(self) -> dict:
        verify = ssl.create_default_context(cafile=self.cafile) if self.cafile else True
        if self.client_cert:
            verify.load_cert_chain(*self.client_cert)
        return httpx.get(f"{self.url}/status", timeout=10, verify=verify).json()

    def start_worker(
        self, m: int, *extra: str, address: Optional[Sequence[str]] = None, out_name: str = ""
    ) -> subprocess.Popen:
        """Worker m (``--master_ip 127.0.0.1 --master_port PORT`` unless
        ``address`` gives other address flags); its output in ``worker<m>.out``."""
        where = list(address) if address is not None else ["--master_ip", self.host, "--master_port", str(self.port)]
        if self.cafile and address is None:
            where += ["--cafile", self.cafile]
        cmd = [
            sys.executable,
            "-m",
            "flq",
            "worker",
            "--worker_id",
            str(m),
            *where,
            "--threads",
            "1",
            "--log_dir",
            str(self.root / "logs"),
            *extra,
        ]
        out = open(self.root / (out_name or f"worker{m}.out"), "ab")
        p = subprocess.Popen(cmd, cwd=self.root, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        self.workers[m] = p
        return p

    def restart_master(self, *extra: str) -> subprocess.Popen:
        out = open(self.root / "master.out", "ab")
        self.master = subprocess.Popen(
            [*self.master_cmd, *extra], cwd=self.root, stdout=out, stderr=subprocess.STDOUT, env=self.env
        )
        return self.master

    def wait_status(self, predicate, timeout: float = 180.0, what: str = "") -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                st = self.status()
                if predicate(st):
                    return st
            except httpx.HTTPError:
                st = None
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: last status {st}")
            time.sleep(0.2)

    def wait(self, timeout: float) -> int:
        rc = self.master.wait(timeout=timeout)
        for p in self.workers.values():
            p.wait(timeout=30)
        return rc

    def kill_all(self) -> None:
        for p in [*self.workers.values(), self.master]:
            if p.poll() is None:
                p.kill()
                p.wait()

    def results(self) -> List[Path]:
        return sorted((self.root / "results").glob("flq_results_*.xlsx"))

    def output(self, name: str = "master") -> str:
        return (self.root / f"{name}.out").read_text(errors="replace")


class InProcessMaster:
    """A master's app on a loopback socket in this process, its round loop
    waiting for workers (no data loaded): the HTTP API under test.
    ``ssl``: (certfile, keyfile) to serve HTTPS; ``dashboard``: with the
    dashboard and ``/metrics`` (a :class:`flq.monitor.RunMonitor`)."""

    def __init__(self, cfg, ssl: Optional[Tuple[str, str]] = None, dashboard: bool = False) -> None:
        import uvicorn

        from flq.cluster import ClusterMaster
        from flq.master import Master
        from flq.model import build_model, glorot_init, layout_of, state_dict_from_flat
        from flq.monitor import RunMonitor
        from flq.transport.server import create_app

        model = build_model(cfg.model)
        self.master = Master(cfg, tuple(p.numel() for p in model.parameters()), glorot_init(model, cfg.seed))
        self.cluster = ClusterMaster(self.master, cfg)
        app = create_app(
            self.cluster,
            lambda t, b: state_dict_from_flat(layout_of(model), t, b),
            self.master.max_upload_bytes,
            auth_token=cfg.auth_token,
            monitor=RunMonitor(cfg, self.cluster, "cluster") if dashboard else None,
        )
        self.openapi = app.openapi()
        self.port = free_port()
        kw = dict(ssl_certfile=ssl[0], ssl_keyfile=ssl[1]) if ssl else {}
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", **kw))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        self.url = f"{'https' if ssl else 'http'}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_cluster(
    root: Path,
    workers: int,
    overrides: Dict[str, object],
    start_workers: bool = True,
    env: Optional[Dict[str, str]] = None,
    config: Optional[Path] = None,
    host: str = "127.0.0.1",
    cafile: Optional[str] = None,
    preexec: Optional[Callable[[], None]] = None,
    master_args: Sequence[str] = (),
    client_cert: Optional[Tuple[str, str]] = None,
    worker_args: Callable[[int], Sequence[str]] = lambda m: (),
) -> Cluster:
    """A master (``flq master`` with the paper config, or ``config``, and
    ``overrides``) and ``workers`` worker processes, one thread each; waits
    until /status answers. ``cafile``: the master serves HTTPS (pass its
    ``--certfile``/``--keyfile`` in ``master_args``); ``client_cert``: the
    certificate the tests' own calls present (mutual TLS); ``worker_args(m)``:
    worker m's extra flags. Without ``eval_every`` in ``overrides`` the
    master never evaluates (``eval_every`` 0): the protocol is under test."""
    port = free_port(host)
    overrides = {"eval_every": 0, **overrides}
    if "--linger_s" not in master_args:  # on loopback the workers hear the end at once; 5 s would only add up
        master_args = [*master_args, "--linger_s", "1"]
    cmd = [
        sys.executable,
        "-m",
        "flq",
        "master",
        "--config",
        str(config or PAPER_CONFIG),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--threads",
        "1",
        "--results_dir",
        str(root / "results"),
        "--log_dir",
        str(root / "logs"),
        *master_args,
    ]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    full_env = dict(os.environ, **(env or {}))
    out = open(root / "master.out", "ab")
    master = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT, env=full_env, preexec_fn=preexec)
    cluster = Cluster(
        root, port, master, env=full_env, master_cmd=cmd, host=host, cafile=cafile, client_cert=client_cert
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            cluster.status()
            break
        except httpx.HTTPError:
            if master.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"master did not start:\n{cluster.output()}") from None
            time.sleep(0.2)
    if start_workers:
        for m in range(workers):
            cluster.start_worker(m, *worker_args(m))
    return cluster


def self_signed(folder: Path, name: str = "master") -> Tuple[str, str]:
    """A self-signed certificate for 127.0.0.1: (cert.pem, key.pem)."""
    key, cert = folder / f"{name}-key.pem", folder / f"{name}-cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


class CuttingProxy:
    """A TCP proxy on loopback in front of the master that breaks one exchange
    per rule: when a request starting with ``prefix`` passes for the first
    time, the connection is closed after ``after_bytes`` bytes of its response
    (0: the master got the request, the client gets no answer)."""

    def __init__(self, target_port: int, rules: Sequence[Tuple[bytes, int]]) -> None:
        self.target_port = target_port
        self.rules = list(rules)
        self.fired: List[bytes] = []
        self.cut: List[bytes] = []  # the exchanges really cut
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            client.close()
            return
        cut = {"at": None, "prefix": None}  # bytes of the marked response still allowed through

        def close_both() -> None:
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

        def c2s() -> None:
            try:
                while True:
                    data = client.recv(65536)
                    if not data:
                        break
                    with self.lock:
                        new_request = data.split(b" ", 1)[0] in (b"GET", b"POST")
                        if cut["prefix"] is not None and new_request:  # the marked response ended before its
                            self.fired.remove(cut["prefix"])  # cut point: re-arm the rule
                            cut["at"] = cut["prefix"] = None
                        for prefix, after in self.rules:
                            if data.startswith(prefix) and prefix not in self.fired:
                                self.fired.append(prefix)
                                cut["at"], cut["prefix"] = after, prefix
                    upstream.sendall(data)
            except OSError:
                pass

        def s2c() -> None:
            try:
                while True:
                    data = upstream.recv(65536)
                    if not data:
                        break
                    if cut["at"] is not None:
                        room = cut["at"]
                        client.sendall(data[:room])
                        if len(data) >= room:
                            with self.lock:
                                self.cut.append(cut["prefix"])
                            close_both()
                            return
                        cut["at"] = room - len(data)
                        continue
                    client.sendall(data)
            except OSError:
                pass
            close_both()

        threading.Thread(target=c2s, daemon=True).start()
        s2c()

    def close(self) -> None:
        self.listener.close()
