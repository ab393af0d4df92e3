"""The master's HTTP API on a real loopback socket (uvicorn in a thread):
bad input is refused with a one-line 4xx and leaves the master's state
bit-identical; bearer-token access control; TLS."""

from __future__ import annotations

import json
import re
import ssl
import struct
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from cluster_util import InProcessMaster as Server
from cluster_util import self_signed
from conftest import PAPER_CONFIG

from flq.algorithm import packing
from flq.cluster import ClusterMaster
from flq.config import load_config
from flq.master import Master
from flq.model import CNN, FlatModel, build_model
from flq.protocol import Code
from flq.worker import Worker

TOKEN = "s3cret-token"
N = 467_818


def state_hash(master: Master, wire: bool = True) -> str:
    return master.state_digest(wire)


@pytest.fixture()
def server():
    cfg = load_config(
        str(PAPER_CONFIG),
        {
            "total_workers": 2,
            "max_rounds": 50,
            "threads": 1,
            "auth_token": TOKEN,
            "round_timeout_s": 60,
            "entropy_coding": "none",  # wire format 1 here; test_coding.py covers version 2
        },
    )
    s = Server(cfg)
    yield s
    s.stop()


def make_workers(cfg):
    rng = np.random.default_rng(0)
    x = rng.random((256, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 256)
    return [Worker(m, cfg, FlatModel(CNN()), x, y, np.arange(m * 128, (m + 1) * 128)) for m in range(2)]


def worker_client(url: str, **kw) -> httpx.Client:
    """A client that talks for several workers the way each would: it keeps
    the session each registration returns and sends it on that worker's later
    calls (unless the call sets ``X-FLQ-Session`` itself)."""
    sessions: dict = {}

    def worker_of(request: httpx.Request):
        m = re.fullmatch(r"/workers/(\d+)/mirrors", request.url.path)
        if m:
            return int(m.group(1))
        if "worker_id" in request.url.params:
            return int(request.url.params["worker_id"])
        try:
            return json.loads(request.content).get("worker_id")
        except (ValueError, AttributeError):
            return None

    def add_session(request: httpx.Request) -> None:
        m = worker_of(request)
        if "X-FLQ-Session" not in request.headers and m in sessions and request.url.path != "/workers/register":
            request.headers["X-FLQ-Session"] = sessions[m]

    def keep_session(response: httpx.Response) -> None:
        if response.request.url.path == "/workers/register" and response.status_code == 200:
            response.read()
            sessions[worker_of(response.request)] = response.json()["session"]

    return httpx.Client(base_url=url, event_hooks={"request": [add_session], "response": [keep_session]}, **kw)


def one_line(r: httpx.Response) -> str:
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and detail
    return detail


def refusal_code(r: httpx.Response, openapi=None) -> Code:
    """The refusal's code: one of flq.protocol.Code, whose status is the
    answer's; and, given the app's OpenAPI document, the status and code are
    documented on the route (what schemathesis checks)."""
    code = Code(r.json()["code"])
    assert code.status == r.status_code, (code, r.status_code)
    if openapi is not None:
        path = r.request.url.path
        (route,) = [
            ops
            for template, ops in openapi["paths"].items()
            if re.fullmatch(re.sub(r"\{[^/]+\}", "[^/]+", template), path)
        ]
        documented = route[r.request.method.lower()]["responses"]
        assert str(r.status_code) in documented, (r.request.method, path, r.status_code)
        assert f"`{code}`" in documented[str(r.status_code)]["description"], (path, code)
    return code


def wire(offer) -> dict:
    """An offer as it travels: its round 1-based."""
    return {**offer.to_dict(), "round": offer.round + 1}


def test_bad_input_is_refused_and_state_untouched(server):
    H = {"Authorization": f"Bearer {TOKEN}"}
    c = worker_client(server.url, headers=H, timeout=60)
    cfg = server.cluster.cfg
    workers = make_workers(cfg)
    for w in workers:
        assert c.post("/workers/register", json={"worker_id": w.worker_id}).status_code == 200
    table = []

    def refused(label, expected, method, url, **kw):
        before = state_hash(server.master)
        r = c.request(method, url, **kw)
        assert r.status_code == expected, (label, r.status_code, r.text)
        detail = one_line(r)
        refusal_code(r, server.openapi)
        assert state_hash(server.master) == before, label
        table.append((label, r.status_code, detail))

    # ---- round 1, offers phase ------------------------------------------
    got = {}
    for w in workers:
        r = c.get("/round/model", params={"worker_id": w.worker_id, "wait": 30})
        assert r.status_code == 200 and r.headers["X-FLQ-Round"] == "1"
        got[w.worker_id] = (0, float(r.headers["X-FLQ-MeK"]), r.content)  # the worker's k is 0-based
    offers = {w.worker_id: workers[w.worker_id].offer(*got[w.worker_id]) for w in workers}
    o0 = wire(offers[0])
    # a second fetch of the same round (a retry): the same bytes; the mirror moved once, the bits counted once
    again = c.get("/round/model", params={"worker_id": 0, "wait": 0})
    assert again.status_code == 200 and again.content == got[0][2]
    assert server.master.bits_down_cum == 2 * 8 * N and server.master.down_version[0] == 1
    assert c.get("/round/model", params={"worker_id": 0, "wait": 0, "after": 1}).status_code == 204  # nothing newer
    refused("model fetch with wait over 120 s", 422, "GET", "/round/model", params={"worker_id": 0, "wait": 1e6})
    refused("model fetch by unknown worker", 404, "GET", "/round/model", params={"worker_id": 50, "wait": 0})
    refused("register unknown worker id", 404, "POST", "/workers/register", json={"worker_id": 99})
    refused("register negative id", 422, "POST", "/workers/register", json={"worker_id": -1})
    refused("offer from unknown worker", 404, "POST", "/round/offer", json={**o0, "worker_id": 7})
    refused("offer for wrong round", 409, "POST", "/round/offer", json={**o0, "round": 5})
    refused(
        "offer with NaN gain",
        400,
        "POST",
        "/round/offer",
        content=json.dumps({**o0, "gain": float("nan")}),
        headers={"Content-Type": "application/json"},
    )
    refused(
        "offer with Inf loss",
        400,
        "POST",
        "/round/offer",
        content=json.dumps({**o0, "loss": float("inf")}),
        headers={"Content-Type": "application/json"},
    )
    refused("offer with wrong cost", 400, "POST", "/round/offer", json={**o0, "cost": 123.0})
    refused("offer with stale mirror version", 409, "POST", "/round/offer", json={**o0, "up_version": 3})
    refused(
        "offer, malformed JSON",
        422,
        "POST",
        "/round/offer",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    refused("offer missing a field", 422, "POST", "/round/offer", json={k: v for k, v in o0.items() if k != "gain"})
    refused(
        "upload before selection", 409, "POST", "/round/upload", params={"worker_id": 0, "round": 1}, content=b"x" * 100
    )

    with ThreadPoolExecutor(3) as pool:  # the offers wait for the selection
        first = pool.submit(c.post, "/round/offer", json=o0)
        time.sleep(0.5)
        refused("a different second offer", 409, "POST", "/round/offer", json={**o0, "gain": o0["gain"] + 1})
        undecided = c.post("/round/offer", params={"wait": 0}, json=o0)  # the same offer again: recorded once
        assert undecided.status_code == 200 and undecided.json()["decided"] is False
        assert list(server.master.offers) == [0] and server.cluster.workers[0].rounds_offered == 1
        repeat = pool.submit(c.post, "/round/offer", json=o0)
        second = pool.submit(c.post, "/round/offer", json=wire(offers[1]))
        answers = [f.result().json() for f in (first, repeat, second)]
        assert all(a["decided"] and a["selected"] for a in answers), answers
    refused("offer after the selection", 409, "POST", "/round/offer", json={**o0, "gain": 1.0})

    # ---- round 1, uploads phase -----------------------------------------
    good = workers[0].upload(0)
    assert len(good) <= 1.01 * packing.packed_size(N, 4)
    up = {"worker_id": 0, "round": 1}
    refused("truncated body (header only)", 400, "POST", "/round/upload", params=up, content=good[:16])
    refused("truncated body (data cut)", 400, "POST", "/round/upload", params=up, content=good[:-1])
    refused("empty body", 400, "POST", "/round/upload", params=up, content=b"")
    refused("body over the size limit", 413, "POST", "/round/upload", params=up, content=good + b"\0" * 10_000)
    refused("bad magic", 400, "POST", "/round/upload", params=up, content=b"XXXX" + good[4:])
    wrong_n = bytearray(good)
    struct.pack_into("<I", wrong_n, 8, N - 1)
    refused("wrong element count", 400, "POST", "/round/upload", params=up, content=bytes(wrong_n))
    for bits in (0, 17, 8):
        b = bytearray(good)
        b[6] = bits
        refused(f"bit width {bits} (link uses 4)", 400, "POST", "/round/upload", params=up, content=bytes(b))
    scales_at = 16 + 4 * 12
    for label, val in (("NaN scale", float("nan")), ("Inf scale", float("inf")), ("negative scale", -1.0)):
        b = bytearray(good)
        struct.pack_into("<f", b, scales_at, val)
        refused(label, 400, "POST", "/round/upload", params=up, content=bytes(b))
    b = bytearray(good)
    b[-1] = 0xFF  # codes 15 > 2L = 14 at 4 bits
    refused("code out of range", 400, "POST", "/round/upload", params=up, content=bytes(b))
    refused("upload for wrong round", 409, "POST", "/round/upload", params={"worker_id": 0, "round": 2}, content=good)
    refused(
        "upload for round 0 (rounds count from 1)",
        422,
        "POST",
        "/round/upload",
        params={"worker_id": 0, "round": 0},
        content=good,
    )
    refused(
        "upload from unknown worker id", 404, "POST", "/round/upload", params={"worker_id": 9, "round": 1}, content=good
    )
    refused("upload with negative id", 422, "POST", "/round/upload", params={"worker_id": -2, "round": 1}, content=good)
    r = c.post("/round/upload", params=up, content=good)
    assert r.status_code == 200
    before = state_hash(server.master, wire=False)  # the same upload again (its answer was lost): counted once
    assert c.post("/round/upload", params=up, content=good).status_code == 200
    assert state_hash(server.master, wire=False) == before
    other = bytearray(good)
    other[-1] ^= 0x01
    refused("second upload with other bytes", 409, "POST", "/round/upload", params=up, content=bytes(other))
    assert c.post("/round/upload", params={"worker_id": 1, "round": 1}, content=workers[1].upload(0)).status_code == 200

    deadline = time.monotonic() + 30
    while server.master.round < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert len(server.master.records) == 1 and server.master.records[0]["selcnt"] == 2
    assert np.array_equal(server.master.ref_up[0], workers[0].ref_up)
    before = state_hash(server.master, wire=False)  # the counted upload repeated after its round closed: OK
    assert c.post("/round/upload", params=up, content=good).status_code == 200
    assert state_hash(server.master, wire=False) == before
    refused("late upload for a closed round", 409, "POST", "/round/upload", params=up, content=bytes(other))
    print("\n| bad input | status | reason | state unchanged |\n|---|---|---|---|")
    for label, status, detail in table:
        print(f"| {label} | {status} | {detail} | yes |")
    assert len(table) >= 30


def test_token_required_except_status(server):
    no = httpx.Client(base_url=server.url, timeout=10)
    wrong = httpx.Client(base_url=server.url, headers={"Authorization": "Bearer nope"}, timeout=10)
    before = state_hash(server.master)
    for client in (no, wrong):
        for method, url, kw in (
            ("POST", "/workers/register", {"json": {"worker_id": 0}}),
            ("GET", "/round/model", {"params": {"worker_id": 0, "wait": 0}}),
            ("POST", "/round/offer", {"json": {}}),
            ("POST", "/round/upload", {"params": {"worker_id": 0, "round": 1}, "content": b"x"}),
            ("GET", "/workers/0/mirrors", {}),
            ("GET", "/get_global_model", {}),
            ("POST", "/stop", {}),
        ):
            r = client.request(method, url, **kw)
            assert r.status_code == 401, (method, url, r.status_code)
            one_line(r)
            assert refusal_code(r, server.openapi) == Code.UNAUTHORIZED
    assert no.get("/status").status_code == 200
    assert state_hash(server.master) == before and not server.cluster.stop_requested
    ok = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert ok.post("/workers/register", json={"worker_id": 0}).status_code == 200


def test_tls_with_ca_file(tmp_path):
    cert, key = self_signed(tmp_path)
    cfg = load_config(str(PAPER_CONFIG), {"total_workers": 2, "threads": 1})
    s = Server(cfg, ssl=(str(cert), str(key)))
    try:
        r = httpx.get(f"{s.url}/status", verify=ssl.create_default_context(cafile=str(cert)), timeout=10)
        assert r.status_code == 200 and r.json()["state"] == "waiting"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{s.url}/status", timeout=10)  # system CAs do not know this certificate
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{s.port}/status", timeout=10)  # plain HTTP to a TLS port
    finally:
        s.stop()


def test_json_bodies_are_size_limited(server):
    c = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    before = state_hash(server.master)
    big = b'{"worker_id": 0, "pad": "' + b"x" * 1_100_000 + b'"}'
    r = c.post("/workers/register", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "exceeds the limit" in one_line(r)
    assert refusal_code(r, server.openapi) == Code.TOO_LARGE

    def chunks():  # no Content-Length: the limit applies while streaming
        for _ in range(140):
            yield b" " * 8192

    r = c.post("/round/offer", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and refusal_code(r, server.openapi) == Code.TOO_LARGE
    assert state_hash(server.master) == before
    assert not server.cluster.workers


def test_newest_registration_of_an_id_wins(server):
    c = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    old = c.post("/workers/register", json={"worker_id": 0}).json()["session"]
    new = c.post("/workers/register", json={"worker_id": 0}).json()["session"]
    assert old != new
    r = c.get("/round/model", params={"worker_id": 0, "wait": 0}, headers={"X-FLQ-Session": old})
    assert r.status_code == 409 and "session replaced" in one_line(r)
    assert refusal_code(r, server.openapi) == Code.SESSION_REPLACED
    r = c.get("/round/model", params={"worker_id": 0, "wait": 0}, headers={"X-FLQ-Session": new})
    assert r.status_code in (200, 204)
    r = c.post("/workers/register", json={"worker_id": True})  # a bool is not an id
    assert r.status_code == 422 and refusal_code(r, server.openapi) == Code.INVALID_REQUEST


def test_lost_upload_is_detected_and_mirrors_resync(tmp_path):
    """Worker 0 commits its round-1 upload but it never reaches the master: its
    next offer carries a newer ref_up version, is refused (409), the worker
    resynchronizes and offers again in the same round; the aggregate never
    decodes against the wrong mirror and the run finishes."""
    from flq.transport.client import MasterClient
    from flq.transport.worker_loop import run_worker

    cfg = load_config(str(PAPER_CONFIG), {"total_workers": 2, "max_rounds": 4, "threads": 1, "round_timeout_s": 20})
    s = Server(cfg)
    workers = make_workers(cfg)
    dropped = []

    def hook_for(m):
        def keep(k):
            if m == 0 and k == 1:
                dropped.append(k)
                return False
            return True

        return keep

    def run(m):
        client = MasterClient(s.url, m, give_up_s=30, poll_s=5)
        try:
            return run_worker(client, lambda _cfg: workers[m], before_upload=hook_for(m))
        finally:
            client.close()

    try:
        pool = ThreadPoolExecutor(2)
        done = [pool.submit(run, m) for m in range(2)]
        ends = [f.result(timeout=300) for f in done]
        pool.shutdown()
    finally:
        s.stop()
    master = s.master
    assert dropped == [1], (ends, master.records, master.selected_history)
    assert [r["iter"] for r in master.records] == [1, 2, 3, 4]
    assert master.selected_history[1] == [1]  # round 2: worker 0's upload never arrived
    assert master.records[1]["selcnt"] == 1
    assert [(e.reason, e.rounds) for e in ends] == [("completed", 4), ("completed", 4)]  # worker 0 took part
    # in every round after the resync
    for w in workers:  # after the resync the two ends agree again, bit for bit
        assert np.array_equal(master.ref_up[w.worker_id], w.ref_up)
        assert np.array_equal(master.ref_down[w.worker_id], w.ref_down)
        assert master.up_version[w.worker_id] == w.up_version


@pytest.mark.slow
def test_token_order_is_flag_then_environment_then_file(tmp_path, fmnist_available):
    """Before: with auth_token in the config file, $FLQ_AUTH_TOKEN was ignored."""
    import json as _json

    from cluster_util import start_cluster

    config = _json.loads(PAPER_CONFIG.read_text())
    config["system"]["auth_token"] = "from-file"
    path = tmp_path / "cfg.json"
    path.write_text(_json.dumps(config))
    cases = (
        ({}, {}, "from-file", "from the config file (system.auth_token)"),
        ({"FLQ_AUTH_TOKEN": "from-env"}, {}, "from-env", "from $FLQ_AUTH_TOKEN"),
        ({"FLQ_AUTH_TOKEN": "from-env"}, {"auth_token": "from-flag"}, "from-flag", "from --auth_token"),
    )
    for i, (env, flags, wins, source) in enumerate(cases):
        root = tmp_path / str(i)
        root.mkdir()
        cluster = start_cluster(root, 1, {"model": "mlp", **flags}, start_workers=False, env=env, config=path)
        try:
            for token in ("from-file", "from-env", "from-flag"):
                r = httpx.post(
                    f"{cluster.url}/workers/register",
                    json={"worker_id": 0},
                    timeout=10,
                    headers={"Authorization": f"Bearer {token}"},
                )
                assert r.status_code == (200 if token == wins else 401), (i, token, r.status_code)
            log = next((root / "logs").glob("master_*.log")).read_text()
            assert f"auth token: {source}" in log
        finally:
            cluster.kill_all()


def test_a_request_cut_mid_body_leaves_no_error_and_no_trace(server, caplog):
    """A client that declares 100 bytes, sends 14 and hangs up (a worker killed
    mid-request): nothing reaches the handlers, nothing is logged as an
    error, the master answers the next request (before: an ASGI traceback per
    request on the master's console)."""
    import socket

    before = state_hash(server.master)
    with caplog.at_level("ERROR"):
        for path in ("/workers/heartbeat", "/round/upload?worker_id=0&round=1"):
            with socket.create_connection(("127.0.0.1", server.port)) as s:
                s.sendall(
                    f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                    f'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"worker_id": 0'.encode()
                )
        time.sleep(1.0)
        assert httpx.get(f"{server.url}/status", timeout=10).status_code == 200
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
    assert state_hash(server.master) == before


def test_every_refusal_carries_a_documented_code(server, monkeypatch):
    """Each status a route can answer is in the OpenAPI document with the
    ErrorResponse body and its codes (schemathesis: no undocumented status);
    the master's own refusals outside the routes (no such path or method, an
    error inside it) carry a code too, and a worker hearing an internal error
    ends with reason ``error`` (before: 'no FLQ error code: is it the FLQ
    master?')."""
    from flq.transport.client import Fatal, MasterClient

    doc = server.openapi
    assert set(doc["components"]["schemas"]["Code"]["enum"]) == {c.value for c in Code}
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for status, answer in op["responses"].items():
                if int(status) >= 400:
                    assert answer["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorResponse"
                    }, (method, path, status)
                    assert all(
                        f"`{c}`" in answer["description"]
                        for c in Code
                        if c.status == int(status) and c in _ROUTE_CODES.get((method, path), ())
                    ), (method, path, status)
            assert {"401", "500"} <= set(op["responses"]), (method, path)
    c = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert refusal_code(c.get("/no/such/path")) == Code.NOT_FOUND
    assert refusal_code(c.delete("/status")) == Code.METHOD_NOT_ALLOWED
    with monkeypatch.context() as patch:  # an error inside the master
        patch.setattr(ClusterMaster, "round_number", property(lambda self: 1 / 0))
        r = c.get("/config")
        assert refusal_code(r, doc) == Code.INTERNAL and "ZeroDivisionError" in one_line(r)
        client = MasterClient(server.url, 0, auth_token=TOKEN, give_up_s=5)
        with pytest.raises(Fatal) as fatal:
            client.config()
        client.close()
    assert fatal.value.reason == "error" and "the master failed on GET /config (500)" in str(fatal.value)


#: Codes that only some routes answer, per (method, path) (the rest answer 401 and 500 everywhere).
_ROUTE_CODES = {
    ("post", "/round/offer"): (
        Code.MALFORMED,
        Code.LATE,
        Code.MIRROR_MISMATCH,
        Code.CONFLICT,
        Code.RUN_OVER,
        Code.UNKNOWN_WORKER,
        Code.NOT_REGISTERED,
        Code.SESSION_REPLACED,
        Code.TOO_LARGE,
        Code.TIMEOUT,
        Code.INVALID_REQUEST,
    ),
    ("post", "/round/upload"): (
        Code.MALFORMED,
        Code.LATE,
        Code.CONFLICT,
        Code.UNKNOWN_WORKER,
        Code.NOT_REGISTERED,
        Code.SESSION_REPLACED,
        Code.TOO_LARGE,
        Code.TIMEOUT,
        Code.INVALID_REQUEST,
    ),
    ("get", "/round/model"): (
        Code.RUN_OVER,
        Code.UNKNOWN_WORKER,
        Code.NOT_REGISTERED,
        Code.SESSION_REPLACED,
        Code.INVALID_REQUEST,
    ),
    ("post", "/workers/register"): (
        Code.RUN_OVER,
        Code.UNKNOWN_WORKER,
        Code.TOO_LARGE,
        Code.TIMEOUT,
        Code.INVALID_REQUEST,
    ),
}


def test_rounds_count_from_1_on_the_wire():
    """One convention (flq.protocol): every round number a user or a worker
    sees counts from 1 like the spreadsheet's iter and the log lines; the
    worker's and the master's algorithm keep their 0-based k. Before: 0-based
    in the headers, parameters, registration and offers, 1-based in /status."""
    from flq.transport.client import MasterClient

    cfg = load_config(
        str(PAPER_CONFIG),
        {"total_workers": 1, "max_rounds": 2, "threads": 1, "model": "mlp", "eval_every": 0, "round_timeout_s": 60},
    )
    s = Server(cfg)
    exchanges = []  # (request, response) of the worker's calls
    try:
        c = httpx.Client(base_url=s.url, timeout=30)

        def global_model():  # its round: header, safetensors metadata, file name
            r = c.get("/get_global_model")
            (n,) = struct.unpack_from("<Q", r.content)
            meta = json.loads(r.content[8 : 8 + n])["__metadata__"]["round"]
            return r.headers["X-FLQ-Round"], meta, r.headers["Content-Disposition"]

        assert c.get("/config").json()["round"] == 1
        assert c.get("/status").json()["round"] == 1
        assert global_model() == ("0", "0", 'attachment; filename="flq_global_round0.safetensors"')  # initial
        client = MasterClient(s.url, 0, give_up_s=30, poll_s=5)
        client.http.event_hooks["response"].append(lambda r: exchanges.append((r.request, r)))
        rng = np.random.default_rng(0)
        worker = Worker(
            0,
            cfg,
            FlatModel(build_model("mlp")),
            rng.random((64, 1, 28, 28), dtype=np.float32),
            rng.integers(0, 10, 64),
            np.arange(64),
        )
        assert client.register(worker.up_version, worker.down_version)["round"] == 1
        after = -1
        for number in (1, 2):
            k, me_k, payload = client.next_round(after)
            request, response = exchanges[-1]
            assert k == number - 1 and response.headers["X-FLQ-Round"] == str(number)  # the first download: 1
            assert request.url.params["after"] == str(number - 1)
            st = c.get("/status").json()
            assert (st["round"], st["rounds_done"], st["phase"]) == (number, number - 1, "offers")
            offer = worker.offer(k, me_k, payload)
            assert offer.round == k
            assert client.offer(offer) is True
            request, response = exchanges[-1]
            assert json.loads(request.content)["round"] == number and response.json()["round"] == number
            client.upload(k, worker.upload(k))
            assert exchanges[-1][0].url.params["round"] == str(number)
            deadline = time.monotonic() + 30
            while len(s.master.records) < number:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert s.master.records[-1]["iter"] == number
            assert global_model() == (
                str(number),
                str(number),
                f'attachment; filename="flq_global_round{number}.safetensors"',
            )
            after = k
        deadline = time.monotonic() + 30
        while (st := c.get("/status").json())["state"] != "finished":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert (st["round"], st["rounds_done"], st["last_metrics"]["iter"]) == (2, 2, 2)
        assert c.post("/stop").json()["round"] == 2
        client.close()
    finally:
        s.stop()


def test_the_session_header_is_mandatory(server):
    """With the shared token only: a captured upload sent as another worker
    without the session header is refused (401 no_session); so is any worker
    call without it."""
    c = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert c.post("/workers/register", json={"worker_id": 0}).status_code == 200
    before = state_hash(server.master)
    r = c.post("/round/upload", params={"worker_id": 1, "round": 1}, content=b"\0" * 64)
    assert refusal_code(r, server.openapi) == Code.NO_SESSION and r.status_code == 401
    for method, path, kw in (
        ("GET", "/round/model", {"params": {"worker_id": 0, "wait": 0}}),
        ("POST", "/workers/heartbeat", {"json": {"worker_id": 0}}),
        ("GET", "/workers/0/mirrors", {}),
        (
            "POST",
            "/round/offer",
            {
                "json": {
                    "worker_id": 0,
                    "round": 1,
                    "candidate": True,
                    "gain": 1.0,
                    "cost": 1.0,
                    "loss": 1.0,
                    "up_version": 0,
                    "down_version": 0,
                }
            },
        ),
    ):
        assert refusal_code(c.request(method, path, **kw), server.openapi) == Code.NO_SESSION, path
    assert state_hash(server.master) == before


def test_coded_upload_body_is_its_cost_in_bytes_plus_the_fixed_header():
    """Entropy coding on: the uplink HTTP body measured as it
    leaves the client and as the master counts it is exactly the offer's
    cost in bytes plus the 112-byte fixed header; corrupt coded bodies are
    refused with a one-line 400 and change nothing."""
    cfg = load_config(
        str(PAPER_CONFIG),
        {
            "total_workers": 2,
            "max_rounds": 5,
            "threads": 1,
            "auth_token": TOKEN,
            "round_timeout_s": 60,
            "entropy_coding": "both",
        },
    )
    assert cfg.coding_up and cfg.coding_down
    s = Server(cfg)
    sent: list = []

    def measure(request: httpx.Request) -> None:
        if request.url.path == "/round/upload":
            sent.append(int(request.headers["Content-Length"]))

    try:
        c = worker_client(s.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
        c.event_hooks["request"].append(measure)
        workers = make_workers(cfg)
        for w in workers:
            assert c.post("/workers/register", json={"worker_id": w.worker_id}).status_code == 200
        got = {}
        for w in workers:
            r = c.get("/round/model", params={"worker_id": w.worker_id, "wait": 30})
            assert r.status_code == 200 and r.content[4] == packing.FORMAT_CODED
            got[w.worker_id] = (0, float(r.headers["X-FLQ-MeK"]), r.content)
        offers = {m: workers[m].offer(*got[m]) for m in got}
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda m: c.post("/round/offer", json=wire(offers[m])).json(), (0, 1)))
        assert all(a["selected"] for a in answers), answers
        body = workers[0].upload(0)
        up = {"worker_id": 0, "round": 1}
        header = packing.header_size(4, 12)
        assert header == 112 and len(body) == header + int(offers[0].cost) // 8
        assert offers[0].cost < 4 * N / 2  # coded: less than half the nominal 4 n bits
        for label, bad in (
            ("coded body cut", body[:-5]),
            ("coded body with trailing bytes", body + b"\0\0"),
            ("coded frame corrupted", body[:-10] + bytes(b ^ 0x5A for b in body[-10:])),
            ("unknown coding method", body[:header] + b"\x09" + body[header + 1 :]),
        ):
            before = state_hash(s.master)
            r = c.post("/round/upload", params=up, content=bad)
            assert r.status_code == 400 and refusal_code(r) is Code.MALFORMED, (label, r.text)
            one_line(r)
            assert state_hash(s.master) == before, label
        sent.clear()
        wire_before = s.master.wire_up
        assert c.post("/round/upload", params=up, content=body).status_code == 200
        assert sent == [header + int(offers[0].cost) // 8]
        assert s.master.wire_up - wire_before == sent[0]
    finally:
        s.stop()
