"""Per-worker credentials: each worker proves its id on every call.

The operator makes them once (``flq credentials --workers M --out DIR``):

- ``DIR/master.secret``: 32 random bytes, for the master only;
- ``DIR/worker_<m>.key``: worker m's key, ``HMAC-SHA256(master secret,
  "flq-worker-key/v1/<m>")``, for worker m's host only.

Keys are derived, so the master holds one secret and computes any worker's key
when it checks a request; a worker's key reveals neither the master secret nor
another worker's key (HMAC is a pseudo-random function).

Every worker call carries four headers, and the master recomputes the
signature over the request itself (:func:`canonical`):

==================  ==========================================================
``X-FLQ-Worker``    the worker id the request acts as
``X-FLQ-Session``   the session its registration returned (for the
                    registration itself: a challenge from
                    ``GET /workers/challenge``, used once)
``X-FLQ-Seq``       the request's number in this process, increasing; each
                    (session, number) is accepted once (:class:`ReplayWindow`)
``X-FLQ-Signature`` ``HMAC-SHA256(key of the worker, canonical request)``, hex
==================  ==========================================================

The canonical request binds method, path, query (``worker_id``, ``round``,
``after``), the worker id, the session, the number and the SHA-256 of the body
(the offer's round, gain, cost and mirror versions; the upload's bytes). So a
request edited in any byte, sent under another id, or sent again (into the
same round, a later one, or after its round closed) does not pass.

Why an HMAC and not only mutual TLS: it is checked per request, whatever
carries it (plain HTTP in a lab, a TLS-terminating proxy), with no state per
connection; it is the one place that ties a request to a worker id, and its
cost is a SHA-256 of the body (see ``benchmarks/auth_cost.py``). Mutual TLS
(``flq master --cafile``) is the second, optional layer: only devices with a
certificate from the run's CA can open a connection at all.

This module knows nothing of HTTP: it checks what the transport hands it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from .protocol import Code

#: The version tag of the key derivation and of the canonical request.
SCHEME = "FLQ-HMAC-SHA256-1"
MASTER_FILE = "master.secret"
HEADER_WORKER = "X-FLQ-Worker"
HEADER_SESSION = "X-FLQ-Session"
HEADER_SEQ = "X-FLQ-Seq"
HEADER_SIGNATURE = "X-FLQ-Signature"
#: Seconds a registration challenge stays valid.
CHALLENGE_TTL_S = 300.0
#: Challenges kept at once for one worker; beyond it its oldest is dropped
#: (so asking for many, or replaying a captured ask, evicts only that worker's own).
MAX_CHALLENGES_PER_WORKER = 4
#: How far back (in request numbers) a late request of the current session is still accepted once.
REPLAY_WINDOW = 1024


_NUMBER = re.compile(r"[0-9]{1,19}")


class CredentialError(ValueError):
    """A credential file is missing, unreadable, or not what it should be (one line)."""


class AuthError(Exception):
    """A worker request refused by the checks of this module; ``code`` says which."""

    def __init__(self, code: Code, detail: str) -> None:
        super().__init__(detail)
        self.code = code


def worker_file(m: int) -> str:
    """The file name of worker m's key."""
    return f"worker_{m}.key"


def derive_key(master_secret: bytes, worker_id: int) -> bytes:
    """Worker ``worker_id``'s 32-byte key: ``HMAC-SHA256(master_secret, "flq-worker-key/v1/<id>")``."""
    return hmac.new(master_secret, f"flq-worker-key/v1/{int(worker_id)}".encode(), hashlib.sha256).digest()


@dataclass(frozen=True)
class MasterSecret:
    """The master's secret and how many worker ids it was made for."""

    secret: bytes = field(repr=False)
    workers: int

    def key(self, worker_id: int) -> bytes:
        return derive_key(self.secret, worker_id)


@dataclass(frozen=True)
class WorkerCredential:
    """One worker's id and key."""

    worker_id: int
    key: bytes = field(repr=False)


def _write_private(path: Path, text: str, force: bool) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise CredentialError(f"{path} exists: keep it, or pass --force to replace every credential") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def write_credentials(out: Path, workers: int, force: bool = False) -> List[Path]:
    """Make a new master secret and the keys of workers ``0 .. workers-1`` in ``out``.

    Returns:
        the files written: ``master.secret``, then ``worker_<m>.key`` in id order.

    Raises:
        CredentialError: ``workers`` out of 1..1000, or a file exists and not ``force``.
        OSError: the folder cannot be written.
    """
    if not 1 <= workers <= 1000:
        raise CredentialError(f"--workers {workers}: expected 1..1000")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = MasterSecret(secrets.token_bytes(32), workers)
    written = [out / MASTER_FILE]
    _write_private(
        written[0],
        json.dumps({"format": "flq-master-secret", "scheme": SCHEME, "workers": workers, "secret": secret.secret.hex()})
        + "\n",
        force,
    )
    for m in range(workers):
        path = out / worker_file(m)
        body = {"format": "flq-worker-credential", "scheme": SCHEME, "worker_id": m, "key": secret.key(m).hex()}
        _write_private(path, json.dumps(body) + "\n", force)
        written.append(path)
    return written


def _read(path: Path, kind: str, fmt: str, instead: str) -> Dict:
    """The JSON document of a credential file of format ``fmt``; ``kind``
    names it in errors, ``instead`` says what the user should give."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise CredentialError(f"{kind} {path}: cannot read it ({exc.strerror or exc})") from None
    except ValueError:
        raise CredentialError(f"{kind} {path}: not a credential file made by flq credentials (not JSON)") from None
    if not isinstance(doc, dict) or doc.get("scheme") != SCHEME:
        raise CredentialError(f"{kind} {path}: not a credential file of scheme {SCHEME}")
    if doc.get("format") != fmt:
        raise CredentialError(f"{kind} {path}: this is {doc.get('format', 'something else')!r}, {instead}")
    return doc


def _field(doc: Dict, name: str, parse: Callable[[object], object], what: str, path: Path, kind: str) -> Any:
    """``parse(doc[name])``, or CredentialError saying it is not ``what``."""
    try:
        return parse(doc[name])
    except (KeyError, TypeError, ValueError):
        raise CredentialError(f"{kind} {path}: its {name!r} is not {what}") from None


def _key(value: object) -> bytes:
    """32 bytes from 64 hex digits (ValueError otherwise)."""
    key = bytes.fromhex(str(value))
    if len(key) != 32:
        raise ValueError(value)
    return key


def _int_in(lo: int, hi: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise ValueError(value)
        return value

    return parse


def too_open(path: Path) -> bool:
    """The file can be read by others than its owner."""
    return bool(os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO))


def load_master_secret(path: Path) -> MasterSecret:
    """Read ``master.secret``.

    Raises:
        CredentialError: missing, unreadable, a worker's key instead, or malformed.
    """
    kind = "credentials"
    doc = _read(
        path, kind, "flq-master-secret", f"the master needs {MASTER_FILE} (a worker's key stays on its own host)"
    )
    workers = _field(doc, "workers", _int_in(1, 1000), "1..1000", path, kind)
    return MasterSecret(_field(doc, "secret", _key, "64 hex digits", path, kind), workers)


def load_worker_credential(path: Path) -> WorkerCredential:
    """Read ``worker_<m>.key``.

    Raises:
        CredentialError: missing, unreadable, the master's secret instead, or malformed.
    """
    kind = "--credential"
    doc = _read(path, kind, "flq-worker-credential", "expected a worker_<id>.key")
    m = _field(doc, "worker_id", _int_in(0, 10**6), "an id", path, kind)
    return WorkerCredential(m, _field(doc, "key", _key, "64 hex digits", path, kind))


# ----- signing ---------------------------------------------------------------
def body_digest(body: bytes) -> str:
    """SHA-256 of a request body, hex."""
    return hashlib.sha256(body).hexdigest()


def canonical(method: str, path: str, query: str, worker_id: int, session: str, seq: int, digest: str) -> bytes:
    """The bytes a worker signs and the master re-signs: one field per line,
    prefixed by :data:`SCHEME`. ``query`` is the raw query string as sent
    (``worker_id=3&round=7``), ``digest`` the body's :func:`body_digest`."""
    return "\n".join(
        (SCHEME, method.upper(), path, query, str(int(worker_id)), session, str(int(seq)), digest)
    ).encode()


def sign(key: bytes, message: bytes) -> str:
    """``HMAC-SHA256(key, message)``, hex (64 digits)."""
    return hmac.new(key, message, hashlib.sha256).hexdigest()


class Signer:
    """A worker's side: the four headers of each request (thread-safe: the
    heartbeat thread signs too). Every request gets the next number, so a
    retry after a network failure is a new request, never a replay."""

    def __init__(self, credential: WorkerCredential) -> None:
        self.credential = credential
        self._seq = 0
        self._lock = threading.Lock()

    def headers(self, method: str, path: str, query: str, session: str, body: bytes) -> Dict[str, str]:
        with self._lock:
            self._seq += 1
            seq = self._seq
        m = self.credential.worker_id
        signature = sign(self.credential.key, canonical(method, path, query, m, session, seq, body_digest(body)))
        return {HEADER_WORKER: str(m), HEADER_SEQ: str(seq), HEADER_SIGNATURE: signature}


class ReplayWindow:
    """Which request numbers of one session were accepted: a number above
    every one seen is accepted; one up to :data:`REPLAY_WINDOW` below the
    highest is accepted if not seen (the heartbeat thread's and the main
    loop's requests may arrive out of order); anything else is a replay."""

    def __init__(self, session: str) -> None:
        self.session = session
        self.top = 0
        self.seen = 0  # bit i: number top - i was accepted

    def accept(self, seq: int) -> bool:
        if seq > self.top:
            shift = seq - self.top
            self.seen = ((self.seen << shift) | 1) & ((1 << REPLAY_WINDOW) - 1) if shift < REPLAY_WINDOW else 1
            self.top = seq
            return True
        back = self.top - seq
        if seq <= 0 or back >= REPLAY_WINDOW or (self.seen >> back) & 1:
            return False
        self.seen |= 1 << back
        return True


class Verifier:
    """The master's side: checks a worker request's signature, its session's
    request number, and the registration challenges.

    Args:
        secret: the master's secret.
        total_workers: ids ``0 .. total_workers-1`` exist.
        current_session: ``m -> session`` of registered worker m, or None.
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self,
        secret: MasterSecret,
        total_workers: int,
        current_session: Callable[[int], Optional[str]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total_workers, self.current_session, self.clock = total_workers, current_session, clock
        self.keys = {m: secret.key(m) for m in range(total_workers)}
        self.windows: Dict[int, ReplayWindow] = {}
        self.challenges: Dict[int, OrderedDict[str, float]] = {}

    def issue_challenge(self, worker_id: int) -> str:
        """A fresh challenge for worker ``worker_id``'s next registration
        (valid :data:`CHALLENGE_TTL_S` seconds, once; at most
        :data:`MAX_CHALLENGES_PER_WORKER` of one worker are kept)."""
        now = self.clock()
        mine = self.challenges.setdefault(worker_id, OrderedDict())
        while mine and (len(mine) >= MAX_CHALLENGES_PER_WORKER or next(iter(mine.values())) < now):
            mine.popitem(last=False)
        challenge = secrets.token_hex(16)
        mine[challenge] = now + CHALLENGE_TTL_S
        return challenge

    def check(
        self,
        method: str,
        path: str,
        query: str,
        headers: Dict[str, str],
        body: bytes,
        sequenced: bool,
        registration: bool,
    ) -> int:
        """Check one worker request; return the worker id it proved.

        Args:
            headers: the request's headers, names lower-case.
            sequenced: the call changes or reads round state: its number must be new.
            registration: the session header is a challenge, used up here.

        Raises:
            AuthError: 401 ``bad_signature`` (missing headers, a signature
                that does not verify), 404 ``unknown_worker`` (an id beyond
                the run's), 404 ``not_registered`` and 409
                ``session_replaced`` (a numbered call of a session that is not
                the worker's current one), 401 ``no_session`` (of none), 409
                ``replayed`` (a number or
                a challenge already used, or an expired challenge).
        """
        worker, seq, signature = (headers.get(h.lower(), "") for h in (HEADER_WORKER, HEADER_SEQ, HEADER_SIGNATURE))
        session = headers.get(HEADER_SESSION.lower(), "")
        if not (worker and seq and signature):
            raise AuthError(
                Code.BAD_SIGNATURE,
                "a worker call without its signature: this master requires per-worker credentials "
                "(flq worker --credential worker_<id>.key)",
            )
        if not (_NUMBER.fullmatch(worker) and _NUMBER.fullmatch(seq) and len(worker) <= 4):
            raise AuthError(Code.BAD_SIGNATURE, f"{HEADER_WORKER} or {HEADER_SEQ} is not a number")
        m = int(worker)
        if m >= self.total_workers:
            raise AuthError(
                Code.UNKNOWN_WORKER, f"worker_id {m} is not in this run: it has {self.total_workers} workers"
            )
        key = self.keys.get(m)
        expected = sign(key, canonical(method, path, query, m, session, int(seq), body_digest(body))) if key else ""
        if not key or not hmac.compare_digest(expected, signature.lower()):
            raise AuthError(
                Code.BAD_SIGNATURE,
                f"the signature does not verify for worker {m}: not signed with worker {m}'s key, "
                f"or the request was changed",
            )
        if registration:
            expires = self.challenges.get(m, {}).pop(session, None)
            if expires is None or expires < self.clock():
                raise AuthError(
                    Code.REPLAYED, f"worker {m}'s registration challenge is unknown, used or expired: ask a new one"
                )
        elif sequenced:
            if not session:
                raise AuthError(
                    Code.NO_SESSION,
                    "a worker call without the X-FLQ-Session header: register, then send the session it returned",
                )
            current = self.current_session(m)
            if not current:
                raise AuthError(Code.NOT_REGISTERED, f"worker {m} is not registered (or has left): register again")
            if session != current:  # a request of an older process, or of this one before it registered again
                raise AuthError(
                    Code.SESSION_REPLACED,
                    f"worker {m} session replaced: another process registered with this id (an older session)",
                )
            window = self.windows.get(m)
            if window is None or window.session != current:
                window = self.windows[m] = ReplayWindow(current)
            if not window.accept(int(seq)):
                raise AuthError(Code.REPLAYED, f"worker {m}'s request {seq} of this session was already received")
        return m


# ----- mutual TLS ------------------------------------------------------------
def write_tls(out: Path, workers: int, names: Sequence[str], days: int = 365, force: bool = False) -> List[Path]:
    """A certificate authority for one run and the certificates it signs, all
    ECDSA P-256 (PEM): ``ca.pem`` (every host), ``ca-key.pem`` (stays with the
    operator), ``master.pem``/``master-key.pem`` (server, for the host names
    or addresses ``names``), ``operator.pem``/``operator-key.pem`` (client:
    curl, monitoring) and ``worker_<m>.pem``/``worker_<m>-key.pem`` (client).

    Returns:
        the files written.

    Raises:
        CredentialError: no ``names``, or a file exists and not ``force``.
        ImportError: the ``cryptography`` package is missing.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not names:
        raise CredentialError("--tls needs at least one --master-host (the master's name or address)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.timezone.utc)
    written: List[Path] = []

    def save(name: str, key, cert) -> None:
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        _write_private(out / f"{name}-key.pem", key_pem, force)
        _write_private(out / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM).decode(), force)
        os.chmod(out / f"{name}.pem", 0o644)
        written.extend([out / f"{name}.pem", out / f"{name}-key.pem"])

    def issue(common_name: str, issuer_key, issuer_name, key, ca: bool, usage=None, sans=()):
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name or subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def san(name: str):
        try:
            return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
        except ValueError:
            return x509.DNSName(name)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = issue("FLQ-Fed run CA", ca_key, None, ca_key, ca=True)
    save("ca", ca_key, ca_cert)
    server_key = ec.generate_private_key(ec.SECP256R1())
    sans = [san(n) for n in dict.fromkeys(names)]
    save(
        "master",
        server_key,
        issue(names[0], ca_key, ca_cert.subject, server_key, False, ExtendedKeyUsageOID.SERVER_AUTH, sans),
    )
    clients = [("operator", "flq-operator")] + [(f"worker_{m}", f"flq-worker-{m}") for m in range(workers)]
    for name, common_name in clients:
        key = ec.generate_private_key(ec.SECP256R1())
        save(name, key, issue(common_name, ca_key, ca_cert.subject, key, False, ExtendedKeyUsageOID.CLIENT_AUTH))
    return written
