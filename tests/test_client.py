"""The worker's client: which addresses it accepts, and which conditions end
it at once (one line, a non-zero status) instead of being retried; real
worker processes against real masters on loopback."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from cluster_util import free_port, self_signed, start_cluster

from flq.transport.client import master_url

MLP = {"model": "mlp", "eval_every": 0}
#: "Within seconds": a process start (importing PyTorch) on a loaded 2-core
#: machine included; far below the 300 s of retries these cases used to take.
SECONDS = 60


@pytest.mark.parametrize(
    "address,port,tls,url",
    [
        ("127.0.0.1", None, False, "http://127.0.0.1:5000"),
        ("127.0.0.1", "5001", False, "http://127.0.0.1:5001"),
        ("127.0.0.1:5002", None, False, "http://127.0.0.1:5002"),
        ("127.0.0.1:5002", "5002", False, "http://127.0.0.1:5002"),
        ("master.local", "6000", True, "https://master.local:6000"),
        ("jetson-01", None, False, "http://jetson-01:5000"),
        ("::1", None, False, "http://[::1]:5000"),
        ("::1", "5003", False, "http://[::1]:5003"),
        ("[::1]", None, False, "http://[::1]:5000"),
        ("[::1]:5004", None, False, "http://[::1]:5004"),
        ("fe80:0:0:0:0:0:0:1", None, False, "http://[fe80::1]:5000"),
        ("http://127.0.0.1", None, False, "http://127.0.0.1:5000"),
        ("http://127.0.0.1", "5005", False, "http://127.0.0.1:5005"),
        ("http://127.0.0.1:5006/", None, False, "http://127.0.0.1:5006"),
        ("https://10.0.0.2:7000", None, False, "https://10.0.0.2:7000"),
        ("HTTPS://[::1]:7001", None, True, "https://[::1]:7001"),
        ("  192.168.1.100 ", None, False, "http://192.168.1.100:5000"),
    ],
)
def test_master_address_forms_accepted(address, port, tls, url):
    assert master_url(address, port, tls) == url


@pytest.mark.parametrize(
    "address,port,tls,says",
    [
        ("127.0.0.1/", None, False, "expected a host name"),
        ("", None, False, "expected a host name"),
        ("127.0.0.1:abc", None, False, "port 'abc' is not a number"),
        ("127.0.0.1:5000", "5001", False, "port 5000 in the address but --master_port 5001"),
        ("127.0.0.1:70000", None, False, "port 70000: expected 1..65535"),
        ("ftp://127.0.0.1", None, False, "scheme 'ftp' is not http or https"),
        ("http://127.0.0.1/api", None, False, "no path"),
        ("http://user@127.0.0.1", None, False, "no path, query or user"),
        ("http://127.0.0.1", None, True, "an http:// URL with --tls/--cafile"),
        ("999.1.1.1", None, False, "expected a host name"),
        ("[::1", None, False, "expected a host name"),
        ("::zz", None, False, "expected a host name"),
        ("host name", None, False, "expected a host name"),
    ],
)
def test_master_address_refused_in_one_line(address, port, tls, says):
    with pytest.raises(ValueError) as err:
        master_url(address, port, tls)
    assert says in str(err.value) and "\n" not in str(err.value)


def _workers(tmp_path, *arg_lists, timeout=60):
    """Run ``flq worker ARGS`` for each list of arguments, all at once, to
    their ends: [(status, stderr, seconds)]."""
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "flq", "worker", "--threads", "1", "--log_dir", str(tmp_path / "logs"), *args],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in arg_lists
    ]
    out = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        out.append((p.returncode, err, time.monotonic() - t0))
    return out


def _worker(tmp_path, *args, timeout=60):
    """Run ``flq worker ARGS`` to its end: (status, stderr, seconds)."""
    return _workers(tmp_path, list(args), timeout=timeout)[0]


def _last_line(stderr: str) -> str:
    lines = [x for x in stderr.strip().splitlines() if x.startswith("flq")]
    assert lines, stderr
    assert "Traceback" not in stderr, stderr
    return lines[-1]


def test_bad_worker_arguments_are_one_line_and_exit_2(tmp_path):
    """Before: -1 gave a traceback, a 300-digit id 'File name too long', bare
    IPv6 a traceback, '127.0.0.1/' five minutes of retries."""
    cases = (
        (["--worker_id", "-1"], "--worker_id -1: expected an integer 0..999"),
        (["--worker_id", "9" * 300], "expected an integer 0..999"),
        (["--worker_id", "0", "--master_ip", "127.0.0.1/"], "--master_ip '127.0.0.1/': expected"),
        (["--worker_id", "0", "--master_ip", "127.0.0.1:1", "--master_port", "2"], "port 1 in the"),
        (["--worker_id", "0", "--cafile", str(tmp_path / "none.pem")], "--cafile: no such file"),
        (["--worker_id", "0", "--give_up_s", "nan"], "--give_up_s nan: expected seconds > 0"),
    )
    for (args, says), (status, err, took) in zip(cases, _workers(tmp_path, *(c[0] for c in cases))):
        assert status == 2, (args, err)
        assert _last_line(err).startswith("flq: config error: ") and says in _last_line(err), err
        assert took < SECONDS
        print(f"\n| bad worker arguments | exit 2 after {took:.1f} s |")


def test_no_master_is_retried_then_exit_7_not_0(tmp_path):
    """Only network failures are retried, for --give_up_s; then a non-zero
    status (before: 'done after 0 rounds', exit 0)."""
    port = free_port()
    status, err, took = _worker(tmp_path, "--worker_id", "0", "--master_port", str(port), "--give_up_s", "3")
    assert status == 7, err
    assert f"the master at http://127.0.0.1:{port} did not answer for 3 s" in _last_line(err)
    assert 3 <= took < 3 + SECONDS
    print(f"\n| no master, --give_up_s 3 | exit {status} after {took:.1f} s |")


@pytest.mark.slow
def test_tls_mismatches_end_the_worker_in_seconds(tmp_path, fmnist_available):
    """Plain HTTP against an HTTPS master, a CA file that did not sign its
    certificate, HTTPS against a plain master: each is fatal at once (before:
    300 s of retries)."""
    cert, key = self_signed(tmp_path)
    other, _ = self_signed(tmp_path, "stranger")
    tls = start_cluster(
        tmp_path,
        1,
        {**MLP, "rounds": 2},
        start_workers=False,
        cafile=cert,
        master_args=["--certfile", cert, "--keyfile", key],
    )
    plain_root = tmp_path / "plain"
    plain_root.mkdir()
    plain = start_cluster(plain_root, 1, {**MLP, "rounds": 2}, start_workers=False)
    try:
        cases = (
            (["--master_port", str(tls.port)], "speaks HTTPS: add --cafile CERT"),
            (["--master_ip", f"http://127.0.0.1:{tls.port}"], "speaks HTTPS"),
            (["--master_port", str(tls.port), "--cafile", other], "does not verify against --cafile"),
            (["--master_port", str(tls.port), "--tls"], "does not verify against the system's CA certificates"),
            (["--master_port", str(plain.port), "--cafile", cert], "does not speak HTTPS"),
            (["--master_ip", f"https://127.0.0.1:{plain.port}"], "does not speak HTTPS"),
        )
        ends = _workers(tmp_path, *(["--worker_id", "0", *args] for args, _ in cases))
        for (args, says), (status, err, took) in zip(cases, ends):
            assert status == 8, (args, err)
            assert says in _last_line(err), (args, err)
            assert took < SECONDS, (args, took)
            print(f"\n| worker {' '.join(args)} | exit {status} after {took:.1f} s |")
        # and the right way in works: the run completes
        status, err, _ = _worker(
            tmp_path, "--worker_id", "0", "--master_port", str(tls.port), "--cafile", cert, timeout=300
        )
        assert status == 0, err
        assert tls.master.wait(timeout=60) == 0
    finally:
        tls.kill_all()
        plain.kill_all()


@pytest.mark.slow
def test_worker_after_the_run_is_over_exits_8_at_once(tmp_path, fmnist_available):
    """Before: 300 s of retries, then exit 0 'done after 1 rounds'."""
    cluster = start_cluster(tmp_path, 1, {**MLP, "rounds": 2}, master_args=["--linger_s", "30"])
    try:
        cluster.wait_status(lambda s: s["state"] == "finished", what="the run to finish")
        status, err, took = _worker(tmp_path, "--worker_id", "0", "--master_port", str(cluster.port))
        assert status == 8, err
        assert "is already over: nothing to join" in _last_line(err)
        assert took < SECONDS
        print(f"\n| wrong token / id not in run / not a master | exit 8 after {took:.1f} s |")
        assert cluster.workers[0].wait(timeout=60) == 0  # the worker that took part: completed
    finally:
        cluster.kill_all()


@pytest.mark.slow
def test_a_wrong_token_an_id_not_in_the_run_or_not_a_master_is_fatal(tmp_path, fmnist_available):
    cluster = start_cluster(tmp_path, 1, {**MLP, "rounds": 2, "auth_token": "right"}, start_workers=False)
    web = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port := free_port()), "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1)  # the web server is up
        (status, err, took), (status5, err5, _), (status_web, err_web, _) = _workers(
            tmp_path,
            ["--worker_id", "0", "--master_port", str(cluster.port), "--auth_token", "wrong"],
            ["--worker_id", "5", "--master_port", str(cluster.port), "--auth_token", "right"],
            ["--worker_id", "0", "--master_port", str(port)],
        )
        assert status == 8 and "refused the bearer token (401)" in _last_line(err)
        assert took < SECONDS
        print(f"\n| worker after the run ended | exit {status} after {took:.1f} s |")
        assert status5 == 8 and "worker_id 5 is not in this run: it has 1 workers (0..0)" in _last_line(err5)
        assert status_web == 8, err_web  # before: a traceback and an HTML page
        assert "is not an FLQ master (GET /config answered 404 text/html: " in _last_line(err_web)
        assert len(_last_line(err_web)) < 300
    finally:
        web.kill()
        cluster.kill_all()


@pytest.mark.slow
def test_frozen_master_is_given_up_within_the_bound(tmp_path, fmnist_available):
    """SIGSTOP on the master: the worker's first call gets no answer; after
    its read time (20 s) and --give_up_s, counted from that call's start, the
    worker exits 7 (before: it could wait for ever, or long past --give_up_s)."""
    cluster = start_cluster(tmp_path, 1, {**MLP, "rounds": 2}, start_workers=False)
    cluster.master.send_signal(signal.SIGSTOP)
    try:
        status, err, took = _worker(
            tmp_path, "--worker_id", "0", "--master_port", str(cluster.port), "--give_up_s", "5", timeout=120
        )
        assert status == 7, err
        assert "did not answer for 2" in _last_line(err) and "(--give_up_s 5;" in _last_line(err)
        assert took < 20 + SECONDS, took  # the read time, then at once
        print(f"\n| master frozen (SIGSTOP), --give_up_s 5 | worker exit {status} after {took:.1f} s |")
    finally:
        cluster.master.send_signal(signal.SIGCONT)
        cluster.kill_all()


@pytest.mark.slow
def test_address_forms_reach_the_master_ipv4_and_ipv6(tmp_path, fmnist_available):
    """``http://IP`` with --master_port, ``IP:PORT``, a host name; bare ``::1``
    and ``[::1]:PORT`` (before: bare IPv6 crashed)."""
    cluster = start_cluster(tmp_path, 3, {**MLP, "rounds": 3}, start_workers=False)
    v6_root = tmp_path / "v6"
    v6_root.mkdir()
    v6 = start_cluster(v6_root, 2, {**MLP, "rounds": 3}, start_workers=False, host="::1")
    try:
        p = cluster.port
        cluster.start_worker(0, address=["--master_ip", "http://127.0.0.1", "--master_port", str(p)])
        cluster.start_worker(1, address=["--master_ip", f"127.0.0.1:{p}"])
        cluster.start_worker(2, address=["--master_ip", "localhost", "--master_port", str(p)])
        v6.start_worker(0, address=["--master_ip", "::1", "--master_port", str(v6.port)])
        v6.start_worker(1, address=["--master_ip", f"[::1]:{v6.port}"])
        assert cluster.wait(timeout=300) == 0, cluster.output()
        assert v6.wait(timeout=300) == 0, v6.output()
        assert all(w.returncode == 0 for w in [*cluster.workers.values(), *v6.workers.values()])
    finally:
        cluster.kill_all()
        v6.kill_all()


@pytest.mark.slow
def test_second_process_with_the_same_id_replaces_the_first(tmp_path, fmnist_available):
    """The newer process trains; the older one exits 8 within seconds saying
    so (before: exit 0 'done after 0 rounds'), and each has its own log."""
    cluster = start_cluster(tmp_path, 1, {**MLP, "rounds": 100000, "worker_timeout_s": 6})
    try:
        cluster.wait_status(lambda s: s["rounds_done"] >= 2, what="round 2")
        old = cluster.workers[0]
        t0 = time.monotonic()
        new = cluster.start_worker(0, out_name="worker0-new.out")
        assert old.wait(timeout=60) == 8
        took = time.monotonic() - t0
        assert took < SECONDS  # start-up of the new process (data loading) included
        print(f"\n| same id started twice | older process exit 8 after {took:.1f} s (new one's start-up included) |")
        text = cluster.output("worker0")
        assert "session replaced: another process registered with this id" in text
        assert "this process stops, the newer one trains" in text
        done = cluster.status()["rounds_done"]
        cluster.wait_status(lambda s: s["rounds_done"] >= done + 3, what="rounds with the new process")
        assert new.poll() is None
        logs = sorted((tmp_path / "logs").glob("worker0_*.log"))
        assert len(logs) == 2  # not the same file (before: both wrote one log)
    finally:
        cluster.kill_all()


def test_https_against_a_plain_server_is_fatal_by_its_tls_reason():
    """In-process: the client tells a peer that does not speak TLS by
    ``ssl.SSLError.reason`` (WRONG_VERSION_NUMBER, RECORD_LAYER_FAILURE ...),
    not by the error's text, and ends at once instead of retrying."""
    import http.server
    import socketserver
    import threading

    from flq.transport.client import Fatal, MasterClient

    class Plain(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = socketserver.TCPServer(("127.0.0.1", 0), Plain)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = MasterClient(f"https://127.0.0.1:{server.server_address[1]}", 0, give_up_s=5)
    t0 = time.monotonic()
    try:
        with pytest.raises(Fatal, match=r"does not speak HTTPS \([A-Z_]+\); drop --tls/--cafile"):
            client.config()
    finally:
        client.close()
        server.shutdown()
        server.server_close()
    assert time.monotonic() - t0 < 5
