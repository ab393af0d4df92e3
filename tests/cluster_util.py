"""Start a real master and real worker processes on loopback for tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import httpx

from conftest import PAPER_CONFIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    root: Path
    port: int
    master: subprocess.Popen
    workers: Dict[int, subprocess.Popen] = field(default_factory=dict)
    env: Dict[str, str] = field(default_factory=dict)
    master_cmd: List[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status(self) -> dict:
        return httpx.get(f"{self.url}/status", timeout=10).json()

    def start_worker(self, m: int, *extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "flq", "worker", "--worker_id", str(m), "--master_ip", "127.0.0.1",
               "--master_port", str(self.port), "--threads", "1", "--log_dir", str(self.root / "logs"), *extra]
        out = open(self.root / f"worker{m}.out", "ab")
        p = subprocess.Popen(cmd, cwd=self.root, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        self.workers[m] = p
        return p

    def restart_master(self, *extra: str) -> subprocess.Popen:
        out = open(self.root / "master.out", "ab")
        self.master = subprocess.Popen([*self.master_cmd, *extra], cwd=self.root, stdout=out,
                                       stderr=subprocess.STDOUT, env=self.env)
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


def start_cluster(root: Path, workers: int, overrides: Dict[str, object], start_workers: bool = True,
                  env: Optional[Dict[str, str]] = None) -> Cluster:
    """A master (``flq master`` with the paper config and ``overrides``) and
    ``workers`` worker processes, one thread each; waits until /status answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "flq", "master", "--config", str(PAPER_CONFIG), "--host", "127.0.0.1",
           "--port", str(port), "--workers", str(workers), "--threads", "1",
           "--results_dir", str(root / "results"), "--log_dir", str(root / "logs")]
    for k, v in overrides.items():
        cmd += [f"--{k}", str(v)]
    full_env = dict(os.environ, **(env or {}))
    out = open(root / "master.out", "ab")
    master = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT, env=full_env)
    cluster = Cluster(root, port, master, env=full_env, master_cmd=cmd)
    deadline = time.monotonic() + 60
    while True:
        try:
            cluster.status()
            break
        except httpx.HTTPError:
            if master.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"master did not start:\n{cluster.output()}")
            time.sleep(0.2)
    if start_workers:
        for m in range(workers):
            cluster.start_worker(m)
    return cluster
