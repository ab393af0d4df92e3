"""Per-worker credentials: the signing and checking (exact values), the
credential files, and the attacks an on-path or token-holding attacker would
try, against a real master process over a real socket. Each attack is refused
with its own code and leaves the master's state digest unchanged."""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from cluster_util import start_cluster
from conftest import PAPER_CONFIG

from flq.config import load_config
from flq.credentials import (
    REPLAY_WINDOW,
    AuthError,
    CredentialError,
    MasterSecret,
    ReplayWindow,
    Signer,
    Verifier,
    canonical,
    derive_key,
    load_master_secret,
    load_worker_credential,
    write_credentials,
)
from flq.model import CNN, FlatModel
from flq.protocol import Code
from flq.transport.client import Fatal, MasterClient
from flq.worker import Worker

SECRET = bytes(range(32))


# ----- the math: exact values --------------------------------------------------
def test_keys_are_hmac_of_the_master_secret_and_differ_per_worker():
    k3 = derive_key(SECRET, 3)
    assert k3 == hmac.new(SECRET, b"flq-worker-key/v1/3", hashlib.sha256).digest()
    assert k3.hex() == "628fe12022298fdae5f94e851d10f77109080c52beed915dbb93dcbd92381cf8"
    assert len({derive_key(SECRET, m) for m in range(100)}) == 100
    assert derive_key(SECRET, 3) != derive_key(bytes(32), 3)


def test_canonical_request_is_one_field_per_line():
    text = canonical("post", "/round/upload", "worker_id=3&round=7", 3, "abcd", 12, "ff" * 32)
    assert text == b"FLQ-HMAC-SHA256-1\nPOST\n/round/upload\nworker_id=3&round=7\n3\nabcd\n12\n" + b"ff" * 32


def test_replay_window_accepts_each_number_once_and_late_ones_within_the_window():
    w = ReplayWindow("s")
    assert [w.accept(n) for n in (1, 2, 5, 3, 3, 5, 4, 1)] == [True, True, True, True, False, False, True, False]
    assert w.accept(5 + REPLAY_WINDOW)  # far ahead: accepted
    assert not w.accept(5)  # now a whole window behind: refused
    assert w.accept(6) and not w.accept(6)  # just inside the window: once
    assert not w.accept(0) and not w.accept(-1)


def _verifier(sessions=None, clock=None):
    t = {"now": 0.0}
    v = Verifier(MasterSecret(SECRET, 5), 5, lambda m: (sessions or {}).get(m), clock=clock or (lambda: t["now"]))
    return v, t


def _signed(m, method, path, query, session, body, key=None, seq=None):
    signer = Signer(load_cred(m, key))
    if seq is not None:
        signer._seq = seq - 1
    h = signer.headers(method, path, query, session, body)
    h["X-FLQ-Session"] = session
    return {k.lower(): v for k, v in h.items()}


def load_cred(m, key=None):
    from flq.credentials import WorkerCredential

    return WorkerCredential(m, key or derive_key(SECRET, m))


def test_numbers_are_ascii_digits_and_challenges_are_kept_per_worker():
    from flq.credentials import MAX_CHALLENGES_PER_WORKER

    v, _ = _verifier(sessions={3: "s3"})
    h = _signed(3, "POST", "/round/upload", "", "s3", b"")
    for name, value in (
        ("x-flq-seq", "\u00b2"),
        ("x-flq-worker", "\u0663"),
        ("x-flq-seq", "-1"),
        ("x-flq-seq", "9" * 20),
    ):
        with pytest.raises(AuthError) as e:
            v.check("POST", "/round/upload", "", {**h, name: value}, b"", sequenced=True, registration=False)
        assert e.value.code == Code.BAD_SIGNATURE, (name, value)
    # asking (or a replayed ask) for many challenges evicts only that worker's own
    mine = v.issue_challenge(1)
    flood = [v.issue_challenge(2) for _ in range(100)]
    assert len(v.challenges[2]) == MAX_CHALLENGES_PER_WORKER and flood[-1] in v.challenges[2]
    reg = _signed(1, "POST", "/workers/register", "", mine, b"{}")
    assert v.check("POST", "/workers/register", "", reg, b"{}", sequenced=True, registration=True) == 1


def test_verifier_checks_id_key_body_number_and_challenge():
    v, t = _verifier(sessions={3: "s3"})
    body = b"\x01\x02\x03"
    h = _signed(3, "POST", "/round/upload", "worker_id=3&round=1", "s3", body)
    assert v.check("POST", "/round/upload", "worker_id=3&round=1", h, body, sequenced=True, registration=False) == 3

    def refused(headers, *, query="worker_id=3&round=1", data=body, path="/round/upload", registration=False):
        with pytest.raises(AuthError) as e:
            v.check("POST", path, query, headers, data, sequenced=True, registration=registration)
        return e.value.code

    assert refused(h) == Code.REPLAYED  # the same request again
    h2 = _signed(3, "POST", "/round/upload", "worker_id=3&round=1", "s3", body)
    assert refused(h2, data=b"\x01\x02\x04") == Code.BAD_SIGNATURE  # one byte changed
    assert refused(h2, query="worker_id=3&round=2") == Code.BAD_SIGNATURE  # round edited
    assert refused({**h2, "x-flq-worker": "4"}) == Code.BAD_SIGNATURE  # 3's key claiming id 4
    assert refused({k: v for k, v in h2.items() if k != "x-flq-signature"}) == Code.BAD_SIGNATURE
    assert refused(
        _signed(4, "POST", "/round/upload", "worker_id=3&round=1", "s3", body, key=derive_key(SECRET, 3))
    ) == (Code.BAD_SIGNATURE)
    # an id beyond the run's: said as such, whoever signed it
    assert refused(_signed(9, "POST", "/round/upload", "worker_id=9&round=1", "s9", body)) == Code.UNKNOWN_WORKER
    # registration: a challenge of this worker, once, before it expires
    c = v.issue_challenge(3)
    reg = _signed(3, "POST", "/workers/register", "", c, b"{}")
    assert v.check("POST", "/workers/register", "", reg, b"{}", sequenced=True, registration=True) == 3
    assert refused(reg, query="", data=b"{}", path="/workers/register", registration=True) == Code.REPLAYED
    c4 = v.issue_challenge(4)
    reg = _signed(3, "POST", "/workers/register", "", c4, b"{}")  # 4's challenge used by 3
    assert refused(reg, query="", data=b"{}", path="/workers/register", registration=True) == Code.REPLAYED
    c = v.issue_challenge(3)
    t["now"] = 301.0
    reg = _signed(3, "POST", "/workers/register", "", c, b"{}")
    assert refused(reg, query="", data=b"{}", path="/workers/register", registration=True) == Code.REPLAYED


def test_credential_files_are_private_and_one_line_errors(tmp_path):
    written = write_credentials(tmp_path / "c", 3)
    assert [p.name for p in written] == ["master.secret", "worker_0.key", "worker_1.key", "worker_2.key"]
    for p in written:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "c").st_mode) == 0o700
    secret = load_master_secret(written[0])
    cred = load_worker_credential(written[2])
    assert cred.worker_id == 1 and cred.key == secret.key(1) and secret.workers == 3
    with pytest.raises(CredentialError, match="exists"):
        write_credentials(tmp_path / "c", 3)
    with pytest.raises(CredentialError, match="the master needs master.secret"):
        load_master_secret(written[1])
    with pytest.raises(CredentialError, match="expected a worker_<id>.key"):
        load_worker_credential(written[0])
    bad = tmp_path / "bad.key"
    bad.write_text("not json")
    with pytest.raises(CredentialError, match="not JSON"):
        load_worker_credential(bad)
    with pytest.raises(CredentialError, match="cannot read"):
        load_worker_credential(tmp_path / "missing.key")


def test_cli_refuses_wrong_credentials_before_any_work(tmp_path):
    write_credentials(tmp_path / "c", 2)

    def flq(*args):
        r = subprocess.run([sys.executable, "-m", "flq", *args], capture_output=True, text=True, timeout=60)
        return r.returncode, r.stderr.strip()

    rc, err = flq("worker", "--worker_id", "0", "--credential", str(tmp_path / "c" / "worker_1.key"))
    assert rc == 2 and "worker 1's, not worker 0's" in err and len(err.splitlines()) == 1, err
    rc, err = flq("master", "--workers", "3", "--credentials", str(tmp_path / "c" / "master.secret"))
    assert rc == 2 and "made for 2 workers, the run has 3" in err and len(err.splitlines()) == 1, err
    rc, err = flq("master", "--workers", "2", "--credentials", str(tmp_path / "c" / "worker_0.key"))
    assert rc == 2 and "the master needs master.secret" in err, err
    rc, err = flq("master", "--cafile", str(tmp_path / "c" / "master.secret"))
    assert rc == 2 and "--cafile (require client certificates) needs --certfile" in err, err


# ----- the attacks, against a real master process ---------------------------------
TOKEN = "shared-token"
SETTINGS = {
    "total_workers": 5,
    "min_workers": 2,
    "rounds": 50,
    "mode": "bbit",
    "b_up": 4,
    "up_budget_bits": 0,  # every candidate uploads
    "eval_every": 0,
    "worker_timeout_s": 600,
    "round_timeout_s": 120,
    "auth_token": TOKEN,
}


class Attacker:
    """Sends requests it captured, changed or not, with the shared token (and,
    the master requiring client certificates, the operator's certificate: the
    attacker is inside the TLS gate)."""

    def __init__(self, url: str, verify) -> None:
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30, verify=verify)

    def send(self, request: httpx.Request, params=None, drop=(), content=None, headers=None) -> httpx.Response:
        url = request.url.copy_with(params=params) if params is not None else request.url
        h = {k: v for k, v in request.headers.items() if k.lower() not in {d.lower() for d in drop}}
        h.update(headers or {})
        h.pop("content-length", None)
        return self.http.request(
            request.method, url, headers=h, content=request.content if content is None else content
        )


@pytest.fixture(scope="module")
def secured(tmp_path_factory, fmnist_available):
    from flq.credentials import write_tls

    root = tmp_path_factory.mktemp("secured")
    creds = root / "creds"
    write_credentials(creds, 5)
    write_tls(creds, 5, ["127.0.0.1"])
    c = {
        name: str(creds / name)
        for name in ("master.pem", "master-key.pem", "ca.pem", "operator.pem", "operator-key.pem")
    }
    cluster = start_cluster(
        root,
        5,
        {**SETTINGS, "credentials": creds / "master.secret"},
        start_workers=False,
        cafile=c["ca.pem"],
        client_cert=(c["operator.pem"], c["operator-key.pem"]),
        master_args=["--certfile", c["master.pem"], "--keyfile", c["master-key.pem"], "--cafile", c["ca.pem"]],
    )
    try:
        yield cluster, creds
    finally:
        cluster.kill_all()


def _operator_tls(cluster):
    import ssl

    context = ssl.create_default_context(cafile=cluster.cafile)
    context.load_cert_chain(*cluster.client_cert)
    return context


def _client(cluster, creds, m):
    c = MasterClient(
        cluster.url,
        m,
        credential=load_worker_credential(creds / f"worker_{m}.key"),
        give_up_s=30,
        verify=cluster.cafile,
        client_cert=(str(creds / f"worker_{m}.pem"), str(creds / f"worker_{m}-key.pem")),
    )
    captured = []
    c.http.event_hooks = {"request": [captured.append]}
    return c, captured


def _workers():
    cfg = load_config(str(PAPER_CONFIG), {k: v for k, v in SETTINGS.items() if k != "rounds"} | {"threads": 1})
    rng = np.random.default_rng(0)
    x = rng.random((256, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, 256)
    return [Worker(m, cfg, FlatModel(CNN()), x, y, np.arange(m * 128, (m + 1) * 128)) for m in range(2)]


@pytest.mark.slow
def test_attacks_on_a_master_with_per_worker_credentials(secured):
    cluster, creds = secured
    attacker = Attacker(cluster.url, _operator_tls(cluster))
    table = []

    def digest() -> str:
        st = attacker.http.get("/status", params={"digest": "true"}).json()
        return st["state_digest"]

    # mutual TLS: a device without a certificate of the run's CA cannot even connect
    outsider = MasterClient(
        cluster.url, 0, credential=load_worker_credential(creds / "worker_0.key"), verify=cluster.cafile
    )
    with pytest.raises(Fatal, match="requires a client certificate"):
        outsider.config()
    # flq doctor on a worker's host: its key, its certificate, and whether the master accepts its signature
    import argparse

    from flq import doctor

    def doctor_says(m, key_of):
        args = argparse.Namespace(
            master_ip=cluster.url,
            cafile=cluster.cafile,
            certfile=str(creds / f"worker_{m}.pem"),
            keyfile=str(creds / f"worker_{m}-key.pem"),
            credential=str(creds / f"worker_{key_of}.key"),
            worker_id=m,
            config=str(PAPER_CONFIG),
        )
        return {
            c.check: c.status for c in doctor.run_checks(args) if c.check in ("credential", "master", "signed call")
        }

    assert doctor_says(2, 2) == {"credential": "ok", "master": "ok", "signed call": "ok"}
    assert doctor_says(2, 3) == {"credential": "fail", "master": "ok"}  # the key is worker 3's

    def refused(label, code, response):
        assert response.status_code == code.status and response.json()["code"] == code, (label, response.text)
        detail = response.json()["detail"]
        assert detail and "\n" not in detail
        table.append((label, response.status_code, code.value))

    def attack(label, code, send):
        before = digest()
        refused(label, code, send())
        assert digest() == before, f"{label}: the master's state changed"

    (c0, cap0), (c1, _) = _client(cluster, creds, 0), _client(cluster, creds, 1)
    w0, w1 = _workers()
    # the shared token alone no longer makes a worker
    attack(
        "register as worker 1 with the shared token only",
        Code.BAD_SIGNATURE,
        lambda: attacker.http.post("/workers/register", json={"worker_id": 1}),
    )
    for c, w in ((c0, w0), (c1, w1)):
        c.config()
        c.register(w.up_version, w.down_version)
    register0 = next(r for r in cap0 if r.url.path == "/workers/register")

    def one_round(upload0=True):
        got = [c.next_round(-1) for c in (c0, c1)]
        offers = [w.offer(*g) for w, g in zip((w0, w1), got)]
        with ThreadPoolExecutor(2) as pool:
            chosen = list(pool.map(lambda co: co[0].offer(co[1]), zip((c0, c1), offers)))
        assert chosen == [True, True]
        k = got[0][0]
        bodies = [w.upload(k) for w in (w0, w1)]
        if upload0:
            c0.upload(k, bodies[0], versions=(offers[0].up_version, offers[0].down_version))
        return k, offers, bodies

    # ---- round 1: worker 0 uploads; its upload is captured ---------------------
    k, offers, bodies = one_round()
    up0 = [r for r in cap0 if r.url.path == "/round/upload"][-1]
    attack(
        "worker 0's upload as worker 1, no session header",
        Code.BAD_SIGNATURE,
        lambda: attacker.send(up0, params={**dict(up0.url.params), "worker_id": "1"}, drop=["X-FLQ-Session"]),
    )
    attack(
        "worker 0's upload with its round edited to 2",
        Code.BAD_SIGNATURE,
        lambda: attacker.send(up0, params={**dict(up0.url.params), "round": "2"}),
    )
    changed = bytearray(up0.content)
    changed[len(changed) // 2] ^= 0x01
    attack(
        "valid signature, body changed by one byte",
        Code.BAD_SIGNATURE,
        lambda: attacker.send(up0, content=bytes(changed)),
    )
    attack("worker 0's upload sent again in its round", Code.REPLAYED, lambda: attacker.send(up0))
    # the real worker 1 is not refused as late
    c1.upload(k, bodies[1], versions=(offers[1].up_version, offers[1].down_version))
    cluster.wait_status(lambda st: st["rounds_done"] >= 1, 120, "round 1 to close")

    # ---- round 2: replays after the round closed, and of an offer after selection
    k2, offers2, bodies2 = one_round(upload0=False)
    offer0 = [r for r in cap0 if r.url.path == "/round/offer"][-1]
    attack("worker 0's offer sent again after the selection", Code.REPLAYED, lambda: attacker.send(offer0))
    attack("worker 0's round-1 upload after round 1 closed", Code.REPLAYED, lambda: attacker.send(up0))
    attack(
        "worker 0's round-1 upload as its round-2 upload",
        Code.BAD_SIGNATURE,
        lambda: attacker.send(up0, params={**dict(up0.url.params), "round": str(k2 + 1)}),
    )
    # worker 0's genuine upload is not refused as a duplicate
    c0.upload(k2, bodies2[0], versions=(offers2[0].up_version, offers2[0].down_version))
    c1.upload(k2, bodies2[1], versions=(offers2[1].up_version, offers2[1].down_version))
    cluster.wait_status(lambda st: st["rounds_done"] >= 2, 120, "round 2 to close")

    # ---- identities: worker 3's key cannot act as worker 4 -----------------------
    c3, cap3 = _client(cluster, creds, 3)
    challenge = c3._call("GET", "/workers/challenge", params={"worker_id": 3}, session=False).json()["challenge"]
    attack(
        "registration of id 4 signed with id 3's key",
        Code.WRONG_WORKER,
        lambda: c3.http.post("/workers/register", json={"worker_id": 4}, headers={"X-FLQ-Session": challenge}),
    )
    attack(
        "a request signed by worker 3's key claiming id 4",
        Code.BAD_SIGNATURE,
        lambda: attacker.send(cap3[-1], headers={"X-FLQ-Worker": "4"}),
    )
    c3.register(0, 0)  # worker 3 itself may register
    attack(
        "worker 3 asking for worker 4's model",
        Code.WRONG_WORKER,
        lambda: c3.http.get("/round/model", params={"worker_id": 4, "wait": 0}, headers={"X-FLQ-Session": c3.session}),
    )
    attack("worker 0's registration sent again", Code.REPLAYED, lambda: attacker.send(register0))
    attack(
        "a worker call without its session",
        Code.NO_SESSION,
        lambda: c0.http.post("/workers/heartbeat", json={"worker_id": 0}, headers={"X-FLQ-Session": ""}),
    )
    # ---- a restarted worker with its own credential still replaces the old process
    beat = c0.http.post("/workers/heartbeat", json={"worker_id": 0}, headers={"X-FLQ-Session": c0.session})
    assert beat.status_code == 200
    old = beat.request
    c0b, _ = _client(cluster, creds, 0)
    c0b.register(w0.up_version, w0.down_version)
    with pytest.raises(Fatal, match="session replaced"):
        c0.mirrors()
    c0b.mirrors()
    # ... and the old process's calls, captured, cannot be slipped into the new session
    attack("the old process's heartbeat sent again", Code.SESSION_REPLACED, lambda: attacker.send(old))
    attack(
        "the old heartbeat with the current session header added",
        Code.BAD_SIGNATURE,
        lambda: attacker.http.request(
            "POST",
            old.url,
            content=old.content,
            headers=[("X-FLQ-Session", c0b.session)]
            + [(k, v) for k, v in old.headers.items() if k != "content-length"],
        ),
    )
    print("\n".join(f"{label}: {status} {code}" for label, status, code in table))
    assert len(table) == 15
    assert attacker.http.post("/stop").status_code == 200  # monitoring keeps the shared token
