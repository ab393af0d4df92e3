"""The worker's HTTP client: carries :class:`~flq.worker.Worker` messages to
and from the master (:mod:`flq.transport.server`). No algorithm here.

Only network failures are retried (connection refused or reset, timeouts,
502/503/504), with backoff, for at most ``give_up_s`` seconds; then
:class:`Unreachable`. Everything else that can never succeed ends the worker
at once with :class:`Fatal`: a TLS certificate that does not verify, plain
HTTP against an HTTPS master (or the reverse), a client certificate the
master requires or refuses, a wrong token or signature (401), an id the
run does not have, a run that is already over, a newer process registered
with the same id, an error inside the master (500), a server that is not an
FLQ master (an error without an FLQ code, a redirect, an answer that is not
the API's: :func:`not_a_master` names what it answered). :class:`RunOver` is the
master saying the run ended (410), with its reason. Every call has a bounded
read time (20 s, or a long-poll's ``poll_s`` + 20 s): a frozen master is
detected, not waited for. What follows a refusal depends on its code alone
(:class:`flq.protocol.Code`), and rounds travel 1-based: the methods of
:class:`MasterClient` take and return the algorithm's 0-based ``k`` and
convert (:mod:`flq.protocol`). The worker's loop over these calls is
:mod:`flq.transport.worker_loop`.

Why one module of this size: one method per API call with its bounded
timeouts, retries and refusal handling, and the parsing of the master's
address; the loop is in :mod:`flq.transport.worker_loop`.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import random
import re
import socket
import ssl
import time
from typing import Any, Dict, Optional, Tuple
from urllib.parse import urlsplit

import httpx

from .. import outcome
from ..credentials import HEADER_SESSION, Signer, WorkerCredential
from ..messages import Offer, Progress
from ..protocol import Code, round_index, round_number

log = logging.getLogger(__name__)

DEFAULT_PORT = 5000
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
#: Status codes of proxies and gateways: the network, not the master, failed.
_RETRY_STATUS = (502, 503, 504)
#: OpenSSL's reasons (``ssl.SSLError.reason``) for a peer that answered a TLS
#: handshake with something else than TLS: the master speaks plain HTTP.
_NOT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG"})
#: OpenSSL's reasons for a master that wants a client certificate (mutual TLS)
#: and got none, or one its CA did not sign.
_CLIENT_CERT_REASONS = frozenset(
    {
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "TLSV1_ALERT_UNKNOWN_CA",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
    }
)


class _SignedAuth(httpx.Auth):
    """httpx's hook that signs each request as it is sent (each retry afresh)."""

    requires_request_body = True

    def __init__(self, signer: Signer) -> None:
        self.signer = signer

    def auth_flow(self, request: httpx.Request):
        session = request.headers.get(HEADER_SESSION, "")
        query = request.url.query.decode("ascii")  # the raw query string as sent
        request.headers.update(self.signer.headers(request.method, request.url.path, query, session, request.content))
        yield request


class RunOver(Exception):
    """The master says the run is over (410); ``reason`` is its end reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or f"the run is over ({reason})")
        self.reason = reason


class Fatal(Exception):
    """A condition no retry can fix (one line); ``reason`` is ``refused``
    (token, TLS, scheme, id, replaced, run over) or ``error`` (the master failed)."""

    def __init__(self, message: str, reason: str = outcome.REFUSED, replaced: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.replaced = replaced  # a newer process has this worker's id: it must not "leave" for it


class Unreachable(Exception):
    """The master did not answer for ``give_up_s`` seconds."""


class Refused(Exception):
    """The master refused one message with a 4xx the worker can act on
    (``code``, compared with :class:`flq.protocol.Code`: ``late``,
    ``mirror_mismatch``, ``not_registered`` ...; a code this version does not
    know stays a plain string)."""

    def __init__(self, status: int, detail: str, code: str = "") -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.code = code


def master_url(address: str, port: Optional[str] = None, tls: bool = False, default_port: int = DEFAULT_PORT) -> str:
    """The master's base URL from ``--master_ip`` (and ``--master_port``).

    Accepted: a host name, an IPv4 address, an IPv6 address with or without
    brackets, ``HOST:PORT`` (``[V6]:PORT``), or an ``http://`` / ``https://``
    URL (``https`` turns TLS on). The port is ``port``, else the one in the
    address, else ``default_port``; both given and different is an error.

    Raises:
        ValueError: anything else, in one line naming what was wrong.
    """
    text = (address or "").strip()
    usage = (
        f"--master_ip {address!r}: expected a host name, an IPv4 or IPv6 address (brackets optional), "
        f"HOST:PORT or an http(s):// URL"
    )
    scheme = "https" if tls else "http"
    given_port: Optional[str] = None
    if "://" in text:
        try:
            u = urlsplit(text)
            url_port = u.port
        except ValueError as exc:
            raise ValueError(f"{usage} ({exc})") from None
        if u.scheme.lower() not in ("http", "https"):
            raise ValueError(f"{usage}: scheme {u.scheme!r} is not http or https")
        if u.path not in ("", "/") or u.query or u.fragment or u.username or u.password:
            raise ValueError(f"{usage}: only scheme, host and port, no path, query or user")
        if u.scheme.lower() == "http" and tls:
            raise ValueError(f"{usage}: an http:// URL with --tls/--cafile; use https://")
        scheme = u.scheme.lower()
        host = u.hostname or ""
        given_port = str(url_port) if url_port is not None else None
    elif text.startswith("["):
        m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", text)
        if not m:
            raise ValueError(usage)
        host, given_port = m.group(1), m.group(2)
    elif text.count(":") >= 2:
        host = text  # a bare IPv6 address
    elif text.count(":") == 1:
        host, given_port = text.split(":")
        if not given_port.isdigit():
            raise ValueError(f"{usage}: port {given_port!r} is not a number")
    else:
        host = text
    host = _check_host(host, usage)
    if port is not None and given_port is not None and int(port) != int(given_port):
        raise ValueError(f"{usage}: port {given_port} in the address but --master_port {port}")
    chosen = port if port is not None else given_port
    try:
        p = int(chosen) if chosen is not None else int(default_port)
    except ValueError:
        raise ValueError(f"--master_port {chosen!r}: expected a port 1..65535") from None
    if not 1 <= p <= 65535:
        raise ValueError(f"port {p}: expected 1..65535")
    return f"{scheme}://{host}:{p}"


def _check_host(host: str, usage: str) -> str:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if re.fullmatch(r"[0-9.]+", host) or ":" in host or not _HOSTNAME.match(host):
            raise ValueError(usage) from None
        return host
    return f"[{ip.compressed}]" if ip.version == 6 else str(ip)


def _causes(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _probe_context() -> ssl.SSLContext:
    """A TLS context that checks nothing: the probes below only ask what the server does."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def speaks_tls(host: str, port: int, timeout: float = 5.0) -> bool:
    """Whether ``host:port`` completes a TLS handshake (certificate not checked)."""
    ctx = _probe_context()
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=None):
                return True
    except (OSError, ssl.SSLError):
        return False


def client_certificate_refused(
    host: str, port: int, cert: Optional[Tuple[str, str]] = None, timeout: float = 5.0
) -> Optional[str]:
    """OpenSSL's reason when the TLS server at ``host:port`` refuses this
    client's certificate ``cert`` (``(certfile, keyfile)``; None: no
    certificate), else None. With TLS 1.3 the server checks the client's
    certificate after the client finished its handshake, so the refusal
    arrives only at the first read: this makes one. A server that closes the
    connection there without a word (uvicorn sends no TLS alert) counts as
    refusing: a TLS server that accepts the client answers an HTTP request."""
    ctx = _probe_context()
    try:
        if cert:
            ctx.load_cert_chain(*cert)
        with socket.create_connection((host.strip("[]"), port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=None) as s:
                s.sendall(b"GET /status HTTP/1.0\r\n\r\n")
                if not s.recv(1):
                    return "closed the connection without answering"
    except ssl.SSLError as exc:
        return exc.reason if exc.reason in _CLIENT_CERT_REASONS else None
    except OSError:
        return None
    return None


class MasterClient:
    """HTTP calls of one worker.

    Args:
        base_url: ``http(s)://HOST:PORT`` (see :func:`master_url`).
        worker_id: m.
        auth_token: bearer token ('' for none).
        verify: TLS verification (True, False or a CA file path).
        credential: this worker's key (:mod:`flq.credentials`): every call is signed.
        client_cert: ``(certfile, keyfile)`` (PEM) for a master that requires
            client certificates (mutual TLS).
        give_up_s: stop retrying after the master was unreachable this long (seconds).
        poll_s: long-poll duration asked of the master (seconds).

    Attributes:
        bytes_sent: bytes of the offer and upload bodies this worker sent.
        bytes_received: bytes of the answer bodies it received (models,
            mirrors, JSON); both are logged when the worker's loop ends.
    """

    def __init__(
        self,
        base_url: str,
        worker_id: int,
        auth_token: str = "",
        verify: Any = True,
        give_up_s: float = 300.0,
        poll_s: float = 20.0,
        credential: Optional[WorkerCredential] = None,
        client_cert: Optional[Tuple[str, str]] = None,
    ) -> None:
        self.base_url = base_url
        self.headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else {}
        self.cafile = verify if isinstance(verify, str) else None
        if isinstance(verify, str) or client_cert:  # a CA file for the master's certificate; our own certificate
            context = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
            if verify is False:
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            if client_cert:
                context.load_cert_chain(*client_cert)
            verify = context
        self.verify = verify
        self.client_cert = client_cert
        self.auth = _SignedAuth(Signer(credential)) if credential is not None else None
        # a quick call's answer within 20 s; a long-poll's within its wait + 20 s; else it counts as failed
        self.timeout = httpx.Timeout(connect=10.0, read=20.0, write=60.0, pool=10.0)
        self.poll_timeout = httpx.Timeout(connect=10.0, read=poll_s + 20.0, write=60.0, pool=10.0)
        self.http = httpx.Client(
            base_url=base_url, headers=self.headers, verify=verify, timeout=self.timeout, auth=self.auth
        )
        self.worker_id = worker_id
        self.give_up_s = give_up_s
        self.poll_s = poll_s
        self.bytes_sent = 0
        self.bytes_received = 0
        self.session = ""
        self.heartbeat_s = 10.0
        self.answered = False  # has the master ever answered this client?
        self.run_info: Dict[str, Any] = {}  # the last GET /config answer: its run id and round

    def close(self) -> None:
        self.http.close()

    # ----- plumbing -------------------------------------------------------
    def _certificate_refused(self, where: str, reason: str) -> str:
        """The one line for a master that refused this worker's client certificate, or wanted one."""
        if self.client_cert:
            return (
                f"TLS: the master at {where} refused this worker's certificate --certfile "
                f"{self.client_cert[0]} ({reason}): is it signed by the master's --cafile?"
            )
        return (
            f"TLS: the master at {where} requires a client certificate ({reason}): give --certfile "
            f"and --keyfile (flq credentials --tls makes them)"
        )

    def _fatal_transport(self, exc: httpx.TransportError) -> Optional[str]:
        """The one-line reason when a transport error can never be retried away."""
        u = urlsplit(self.base_url)
        for e in _causes(exc):
            if isinstance(e, ssl.SSLCertVerificationError):
                what = f"--cafile {self.cafile}" if self.cafile else "the system's CA certificates"
                hint = ""
                if "mismatch" in str(e.verify_message or ""):
                    hint = (
                        f": the certificate is for another address; make one for this one (flq credentials "
                        f"--tls --master-host {u.hostname}) or use the address it names"
                    )
                return (
                    f"TLS: the master's certificate at {u.netloc} does not verify against {what} "
                    f"({e.verify_message or e.reason}){hint}"
                )
            if isinstance(e, ssl.SSLError) and e.reason in _CLIENT_CERT_REASONS:
                return self._certificate_refused(u.netloc, e.reason)
            if isinstance(e, ssl.SSLError) and e.reason in _NOT_TLS_REASONS:
                return (
                    f"TLS: {u.netloc} does not speak HTTPS ({e.reason or e}); drop --tls/--cafile or use an "
                    f"http:// address"
                )
        if (
            u.scheme == "https"
            and not self.answered
            and isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError))
        ):
            reason = client_certificate_refused(u.hostname or "", u.port or DEFAULT_PORT, self.client_cert)
            if reason:
                return self._certificate_refused(u.netloc, reason)
        if (
            u.scheme == "http"
            and not self.answered
            and isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError))
            and speaks_tls(u.hostname or "", u.port or DEFAULT_PORT)
        ):
            return (
                f"the master at {u.netloc} speaks HTTPS: add --cafile CERT (or --tls for a certificate the "
                f"system trusts), or give an https:// address"
            )
        return None

    def _call(self, method: str, url: str, **kw) -> httpx.Response:
        """One request; network failures retried with exponential backoff
        (0.5 s .. 10 s, jittered) for ``give_up_s`` seconds counted from the
        start of the first failed attempt (once failures began, each attempt's
        own time limits shrink to what is left).

        Raises:
            Unreachable, RunOver (410), Fatal (see the module docstring),
            Refused (other 4xx).
        """
        delay, first_failure = 0.5, None
        limits = kw.pop("timeout", self.timeout)
        if kw.pop("session", True) and self.session:
            kw["headers"] = {**kw.get("headers", {}), HEADER_SESSION: self.session}
        while True:
            started = time.monotonic()
            kw["timeout"] = limits
            if first_failure is not None:
                left = max(1.0, first_failure + self.give_up_s - started)
                kw["timeout"] = httpx.Timeout(
                    connect=min(10.0, left), read=min(limits.read, left), write=min(60.0, left), pool=min(10.0, left)
                )
            try:
                r = self.http.request(method, url, **kw)
            except httpx.TransportError as exc:
                fatal = self._fatal_transport(exc)
                if fatal:
                    raise Fatal(fatal) from None
                err = f"{type(exc).__name__}: {exc}".splitlines()[0]
            else:
                if r.status_code not in _RETRY_STATUS:
                    break
                err = f"HTTP {r.status_code}"
            now = time.monotonic()
            first_failure = first_failure or started
            if now - first_failure >= self.give_up_s:
                raise Unreachable(
                    f"the master at {self.base_url} did not answer for {now - first_failure:.0f} s "
                    f"(--give_up_s {self.give_up_s:g}; last: {err})"
                )
            log.warning("master call %s %s failed (%s); retrying in %.1f s", method, url, err, delay)
            time.sleep(min(delay * (0.8 + 0.4 * random.random()), max(0.0, first_failure + self.give_up_s - now)))
            delay = min(delay * 2, 10.0)
        self.bytes_received += len(r.content)
        if 300 <= r.status_code < 400:  # an FLQ master never redirects: a web server, or http:// to https://
            raise Fatal(not_a_master(self.base_url, method, url, r))
        if r.status_code < 400:
            self.answered = True
            return r
        body, detail, code_text = _refusal(r)
        if not code_text:  # every refusal of an FLQ master carries a code
            raise Fatal(not_a_master(self.base_url, method, url, r))
        self.answered = True
        code = Code.parse(code_text)
        if code is Code.RUN_OVER:
            raise RunOver(str(body.get("reason", outcome.COMPLETED)), detail)
        if code is Code.UNAUTHORIZED:
            raise Fatal(
                "the master refused the bearer token (401): set --auth_token or $FLQ_AUTH_TOKEN to the "
                "master's system.auth_token"
            )
        if code is Code.BAD_SIGNATURE:
            raise Fatal(
                f"the master refused this worker's signature (401 bad_signature: {detail}); give --credential the "
                f"worker_{self.worker_id}.key made with the master's secret by flq credentials"
            )
        if code is Code.WRONG_WORKER:
            raise Fatal(f"{detail}: --worker_id and --credential name different workers")
        if code is Code.INTERNAL or (code is None and r.status_code >= 500):  # None: a code of a newer master
            raise Fatal(f"the master failed on {method} {url} ({r.status_code}): {detail}", outcome.ERROR)
        if code is Code.SESSION_REPLACED:
            raise Fatal(f"{detail}: this process stops, the newer one trains", replaced=True)
        if code is Code.UNKNOWN_WORKER:
            raise Fatal(detail)
        raise Refused(r.status_code, detail, code_text)

    # ----- protocol -------------------------------------------------------
    def config(self) -> Dict[str, Any]:
        """``GET /config`` -> ``{config, state, round, run}`` (also kept in ``run_info``).

        Raises:
            Fatal: the run is already over (nothing to join).
        """
        r = self._call("GET", "/config")
        info = self._json(r, "GET", "/config", "config", "state")
        if not isinstance(info["config"], dict) or not isinstance(info["config"].get("system"), dict):
            raise Fatal(not_a_master(self.base_url, "GET", "/config", r))
        if info.get("state") == "finished":
            raise Fatal(f"the run at {self.base_url} is already over: nothing to join")
        self.run_info = info
        return info

    def register(self, up_version: int, down_version: int, **describe: Any) -> Dict[str, Any]:
        """``POST /workers/register`` -> ``{resync, round, state, session, heartbeat_s, config}``;
        ``describe`` adds ``threads`` and ``device``."""
        body = {"worker_id": self.worker_id, "up_version": up_version, "down_version": down_version, **describe}
        tries = 3
        while True:
            headers = {}
            if self.auth is not None:  # a one-time challenge: a captured registration cannot be sent again
                r = self._call("GET", "/workers/challenge", params={"worker_id": self.worker_id}, session=False)
                challenge = self._json(r, "GET", "/workers/challenge", "required")
                if not challenge.get("required"):
                    log.warning(
                        "worker %d: the master does not check per-worker credentials: --credential is not used",
                        self.worker_id,
                    )
                headers = {HEADER_SESSION: challenge.get("challenge", "")}
            try:
                r = self._call("POST", "/workers/register", json=body, headers=headers, session=False)
                info = self._json(r, "POST", "/workers/register", "session", "resync")
                break
            except Refused as exc:  # the challenge was used up by a lost attempt, or expired: ask again
                tries -= 1
                if exc.code != Code.REPLAYED or tries == 0:
                    raise
        self.session = info.get("session", "")
        self.heartbeat_s = float(info.get("heartbeat_s", self.heartbeat_s))
        return info

    def mirrors(self):
        """``GET /workers/{m}/mirrors`` -> (ref_up, ref_down, up_version, down_version)."""
        from safetensors.numpy import load

        r = self._call("GET", f"/workers/{self.worker_id}/mirrors")
        tensors = load(r.content)
        meta = _safetensors_metadata(r.content)
        return tensors["ref_up"], tensors["ref_down"], int(meta["up_version"]), int(meta["down_version"])

    def next_round(self, after: int = -1) -> Optional[Tuple[int, float, bytes]]:
        """Long-poll ``GET /round/model`` for a round after round ``after`` (k,
        0-based; -1 for any): (k, me_k, downlink bytes) or None. The wire
        counts rounds from 1 (``after``, ``X-FLQ-Round``)."""
        r = self._call(
            "GET",
            "/round/model",
            params={"worker_id": self.worker_id, "wait": self.poll_s, "after": round_number(after)},
            timeout=self.poll_timeout,
        )
        if r.status_code == 204:
            return None
        try:
            return round_index(int(r.headers["X-FLQ-Round"])), float(r.headers["X-FLQ-MeK"]), r.content
        except (KeyError, ValueError):
            raise Fatal(not_a_master(self.base_url, "GET", "/round/model", r, "no X-FLQ-Round header")) from None

    def offer(self, offer: Offer) -> bool:
        """``POST /round/offer`` until the selection is made (the same offer
        each time; the master records it once); True when selected. A
        non-finite loss (a diverged worker) travels as ``null``: JSON has no NaN.
        The round travels 1-based."""
        body = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in offer.to_dict().items()}
        body["round"] = round_number(offer.round)
        while True:
            r = self._call("POST", "/round/offer", params={"wait": self.poll_s}, json=body, timeout=self.poll_timeout)
            self.bytes_sent += len(r.request.content)
            answer = self._json(r, "POST", "/round/offer", "selected")
            if answer.get("decided", True):
                return bool(answer["selected"])

    def upload(self, round_index: int, payload: bytes, versions: Optional[Tuple[int, int]] = None) -> None:
        """``POST /round/upload`` with the encoded update for round ``round_index``
        (k, 0-based; 1-based on the wire; a retry is counted once);
        ``versions``: the ``(up_version, down_version)`` of its offer."""
        params = {"worker_id": self.worker_id, "round": round_number(round_index)}
        if versions is not None:
            params.update(up_version=versions[0], down_version=versions[1])
        self._call(
            "POST",
            "/round/upload",
            params=params,
            content=payload,
            headers={"Content-Type": "application/octet-stream"},
        )
        self.bytes_sent += len(payload)

    def _once(self, path: str, timeout: float = 5.0, **fields: Any) -> httpx.Response:
        """One POST of ``{worker_id, **fields}`` on a fresh connection, not retried (heartbeat, leave)."""
        with httpx.Client(
            base_url=self.base_url, headers=self.headers, verify=self.verify, timeout=timeout, auth=self.auth
        ) as c:
            return c.post(path, json={"worker_id": self.worker_id, **fields}, headers={HEADER_SESSION: self.session})

    def heartbeat(self, progress: Optional[Progress] = None) -> bool:
        """One heartbeat, with the worker's ``progress`` when given (its round
        1-based on the wire; 0 before the first); False once the master says
        the run is over (410). Anything else (a network error, a refusal
        while this worker re-registers) is only logged: the main loop's own
        calls decide what it means, and the next beat tries again."""
        fields: Dict[str, Any] = {}
        if progress is not None:
            fields["progress"] = {
                "round": round_number(progress.round),
                "phase": progress.phase,
                "done": progress.done,
                "total": progress.total,
                "seconds": round(progress.seconds, 1),
            }
        try:
            r = self._once("/workers/heartbeat", **fields)
        except httpx.HTTPError as exc:
            log.debug("heartbeat failed: %s", exc)
            return True
        if r.status_code < 400:
            return True
        log.debug("heartbeat refused (%d): %s", r.status_code, r.text[:200])
        return _refusal(r)[2] != Code.RUN_OVER

    def _json(self, r: httpx.Response, method: str, path: str, *keys: str) -> Dict[str, Any]:
        """The JSON object of an answer of the master, which has ``keys``.

        Raises:
            Fatal: anything else: the server is not an FLQ master.
        """
        try:
            doc = r.json()
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or any(k not in doc for k in keys):
            raise Fatal(not_a_master(self.base_url, method, path, r))
        return doc

    def leave(self) -> None:
        """Tell the master this worker exits on purpose (best effort, 5 s; a
        second Ctrl-C meanwhile does not cut it short)."""
        if not self.session:
            return
        try:
            with outcome.signals_deferred():
                r = self._once("/workers/leave")
            log.info("worker %d: told the master it leaves (%d)", self.worker_id, r.status_code)
        except httpx.HTTPError as exc:
            log.warning("worker %d: could not tell the master it leaves (%s)", self.worker_id, exc)


def not_a_master(base_url: str, method: str, path: str, r: httpx.Response, why: str = "") -> str:
    """The one line for an answer no FLQ master gives: ``http://H:P is not an
    FLQ master (GET /config answered 404 text/html: <the first 80
    characters>)``; ``why`` adds what was missing."""
    kind = r.headers.get("content-type", "").split(";")[0].strip() or "no content type"
    text = r.content[:4000].decode("utf-8", "replace")
    if kind == "text/html":  # the page's text says more than its markup
        text = re.sub(r"<!--.*?-->|<(script|style)\b.*?</\1\s*>|<[^>]*>", " ", text, flags=re.S | re.I)
    text = " ".join(text.split())
    shown = repr(text[:80] + ("..." if len(text) > 80 else "")) if text else "an empty body"
    where = path.split("?")[0]
    extra = f"; {why}" if why else ""
    if 300 <= r.status_code < 400:  # a redirect: where to says more than its body
        shown = f"a redirect to {r.headers.get('location', '?')}"
    else:
        shown = f"{kind}: {shown}"
    return (
        f"{base_url} is not an FLQ master ({method} {where} answered {r.status_code} {shown}{extra}); "
        f"check --master_ip and --master_port"
    )


def _refusal(r: httpx.Response) -> Tuple[Dict[str, Any], str, str]:
    """A refusal's JSON body, ``detail`` and ``code`` ('' when absent: not an FLQ master's refusal)."""
    try:
        body = r.json()
        return body, str(body.get("detail", "")), str(body.get("code", ""))
    except (ValueError, AttributeError):
        return {}, "", ""


def _safetensors_metadata(blob: bytes) -> Dict[str, str]:
    import json
    import struct

    (n,) = struct.unpack_from("<Q", blob)
    return json.loads(blob[8 : 8 + n]).get("__metadata__", {})
