"""ASGI middleware of the master's HTTP server: the bearer token, the
per-worker signatures, and the request body's size and time limits. Each refusal is the protocol's JSON error
(:class:`flq.protocol.Code`), sent before the route runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import json
import logging
import time
from typing import Dict
from urllib.parse import unquote, urlsplit

from ..credentials import AuthError
from ..protocol import Code

log = logging.getLogger("flq.transport.server")

#: Where :class:`BodyLimit` leaves the request body it buffered (absent: a request without one).
SCOPE_BODY = "flq.body"
#: Seconds a client may take to send its whole request body.
BODY_TIMEOUT_S = 30.0


class RequestMetrics:
    """ASGI middleware, outermost: count every HTTP request by ``"METHOD
    /path"`` in ``counts`` (for ``/status`` and the master's last log line),
    and with a Prometheus ``registry`` observe each request's latency by
    endpoint (``flq_http_request_duration_seconds``), the HTTP body bytes
    each way (``flq_http_bytes_total{direction}``) and every refusal by its
    protocol code (``flq_refusals_total{code}``, read from the JSON error
    body). Paths outside ``paths`` count as ``"other"``, so every label set
    stays bounded."""

    def __init__(self, app, paths, counts: Dict[str, int], registry=None) -> None:
        self.app, self.paths, self.counts = app, paths, counts
        self.metrics = None
        if registry is not None:
            from prometheus_client import Counter, Histogram

            self.metrics = (
                Histogram(
                    "flq_http_request_duration_seconds",
                    "Time to answer an HTTP request (long polls included), seconds",
                    ["endpoint"],
                    buckets=LATENCY_BUCKETS,
                    registry=registry,
                ),
                Counter("flq_http_bytes", "HTTP body bytes", ["direction"], registry=registry),
                Counter("flq_refusals", "Requests refused, by protocol code", ["code"], registry=registry),
            )

    def _endpoint(self, scope) -> str:
        path = scope["path"]
        if scope["method"] not in HTTP_METHODS:  # a made-up method must not make a label of its own
            return "other"
        if path in self.paths:
            return f"{scope['method']} {path}"
        if path.startswith("/workers/") and path.endswith("/mirrors"):
            return f"{scope['method']} /workers/{{id}}/mirrors"
        return "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        key = self._endpoint(scope)
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.metrics is None:
            return await self.app(scope, receive, send)
        latency, body_bytes, refusals = self.metrics
        started, status, error = time.perf_counter(), [0], []
        up = down = 0

        async def counted_receive():
            nonlocal up
            message = await receive()
            up += len(message.get("body", b""))
            return message

        async def counted_send(message):
            nonlocal down
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                down += len(chunk)
                if status[0] >= 400 and sum(map(len, error)) < 4096:
                    error.append(chunk)
            await send(message)

        try:
            await self.app(scope, counted_receive, counted_send)
        finally:
            latency.labels(key).observe(time.perf_counter() - started)
            body_bytes.labels("up").inc(up)
            body_bytes.labels("down").inc(down)
            if status[0] >= 400:
                refusals.labels(_refusal_code(b"".join(error), status[0])).inc()


#: The methods a request is counted under; any other is ``"other"``.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
#: Buckets of the request-latency histogram, seconds (long polls wait up to 120 s).
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _refusal_code(body: bytes, status: int) -> str:
    """The protocol code of a refusal's JSON body (``http_<status>`` when it has none)."""
    try:
        code = json.loads(body).get("code")
    except (ValueError, AttributeError):
        code = None
    return code if isinstance(code, str) and code in _CODES else f"http_{status}"


_CODES = frozenset(str(c) for c in Code)


class BodyLimit:
    """ASGI middleware: refuse request bodies over a per-path size (413
    ``too_large``) or that take longer than ``BODY_TIMEOUT_S`` seconds to
    arrive (408 ``timeout``), before any handler reads them; the body is
    buffered here, replayed to the app, and kept in the scope
    (:data:`SCOPE_BODY`) for :class:`WorkerAuth`."""

    def __init__(self, app, limits: Dict[str, int], default: int) -> None:
        self.app, self.limits, self.default = app, limits, default

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = self.limits.get(scope["path"], self.default)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_error(
                send, Code.TOO_LARGE, f"request body of {int(declared)} bytes exceeds the limit of {limit}"
            )
        chunks, size, more = [], 0, True
        deadline = time.monotonic() + BODY_TIMEOUT_S
        while more:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return await _send_error(send, Code.TIMEOUT, f"request body not received within {BODY_TIMEOUT_S:.0f} s")
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _send_error(send, Code.TOO_LARGE, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app({**scope, SCOPE_BODY: body}, replay, send)


class SameOrigin:
    """ASGI middleware: refuse a browser's POST (one with an ``Origin``
    header) sent by a page of another site than this server (403
    ``cross_origin``), so that no other site open in the operator's browser
    can stop the run through a form or a script, token or not. The page must
    also have been opened under an IP address, ``localhost`` or one of
    ``names`` (this machine's names), never under a name an attacker's DNS
    could point here (DNS rebinding). Programs (workers, curl) send no
    ``Origin`` and are not affected."""

    def __init__(self, app, names=()) -> None:
        self.app = app
        self.names = frozenset(n.lower() for n in (*names, *machine_names()) if n)

    def _known_host(self, host: str) -> bool:
        import ipaddress

        name = (urlsplit(f"//{host}").hostname or "").lower()
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return name == "localhost" or name in self.names

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        origin = headers.get(b"origin")
        if origin is None:
            return await self.app(scope, receive, send)
        host = headers.get(b"host", b"").decode("latin-1")
        shown = origin.decode("latin-1")[:100]
        if urlsplit(shown).netloc != host:
            return await _send_error(send, Code.CROSS_ORIGIN, f"a POST from a page of {shown!r} is refused")
        if not self._known_host(host):
            return await _send_error(
                send,
                Code.CROSS_ORIGIN,
                f"a POST from a page opened as {host[:100]!r} is refused: open the dashboard by IP address, "
                "localhost or this machine's name",
            )
        return await self.app(scope, receive, send)


def machine_names() -> tuple:
    """This machine's host names (short and fully qualified)."""
    import socket

    try:
        return (socket.gethostname(), socket.getfqdn())
    except OSError:
        return ()


def error_response(code: Code, detail: str, **extra):
    """A refusal as the routes answer it: the JSON body ``{"detail", "code", **extra}``, the code's status."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": detail, "code": code, **extra}, status_code=code.status)


def add_error_handlers(app) -> None:
    """Answer FastAPI's own refusals in the protocol's JSON error
    (``{"detail", "code"}``): a request that does not match the API (422
    ``invalid_request``), no such path (404 ``not_found``) or method (405
    ``method_not_allowed``), an error inside the server (500 ``internal``)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    error = error_response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(x) for x in first.get("loc", ()))
        detail = f"{where}: {first.get('msg', 'invalid')}".replace("\n", " ")
        log.warning("%s %s refused (422): %s", request.method, request.url.path, detail)
        return error(Code.INVALID_REQUEST, detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):  # no such path, or method
        code = {404: Code.NOT_FOUND, 405: Code.METHOD_NOT_ALLOWED}.get(exc.status_code, Code.INVALID_REQUEST)
        return error(code, f"{request.method} {request.url.path}: {exc.detail}".replace("\n", " "))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):  # logged by uvicorn with its traceback
        return error(
            Code.INTERNAL,
            f"{request.method} {request.url.path} failed inside the master: {type(exc).__name__}: {exc}".replace(
                "\n", " "
            )[:500],
        )


class BearerAuth:
    """ASGI middleware: without ``Authorization: Bearer <token>`` a request is
    refused with 401 ``unauthorized`` before anything reads it (``token`` '' =
    no auth; ``open_paths`` need none; with ``signed_workers`` the worker paths
    are left to :class:`WorkerAuth`; paths under ``open_prefixes``, the
    dashboard's static files, need none either). A plain ASGI class, so a client that
    hangs up mid-request cannot make it fail.

    A browser cannot send a bearer token, so the ``browser_paths`` (the
    dashboard, its state, ``/metrics``, ``/status``, ``/stop``) also accept
    the dashboard cookie: ``GET /?token=<token>`` answers 303 to ``/`` with
    an HttpOnly, SameSite=Strict cookie holding a value derived from the
    token (:func:`dashboard_cookie`; not the token itself, so it is no good
    on the worker paths). A POST with the cookie must also carry the header
    ``X-FLQ-Dashboard: 1``, which no cross-site form can send. Without
    either, ``GET /`` answers a 401 page saying how to open it."""

    def __init__(
        self, app, token: str, open_paths, signed_workers: bool = False, browser_paths=(), open_prefixes=()
    ) -> None:
        self.app, self.expected, self.open_paths = app, f"Bearer {token}".encode(), frozenset(open_paths)
        self.open_prefixes = tuple(open_prefixes)  # static files: no run data in them
        self.token, self.signed_workers = token, signed_workers
        self.browser_paths = frozenset(browser_paths)
        self.cookie = dashboard_cookie(token).encode() if token else b""

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.token or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path.startswith(self.open_prefixes):
            return await self.app(scope, receive, send)
        if self.signed_workers and is_worker_path(path):  # WorkerAuth checks these
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        scheme, _, given_token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given_token, self.token.encode()):
            return await self.app(scope, receive, send)
        if path in self.browser_paths:
            if path == "/" and scope["method"] == "GET":
                given = _query_value(scope.get("query_string", b""), "token")
                if given is not None:
                    if hmac.compare_digest(given.encode(), self.token.encode()):
                        return await _send_login(send, self.cookie, secure=scope.get("scheme") == "https")
                    return await _send_page(send, 401, "wrong token: open /?token=<the run's auth_token>")
            cookie = _cookie(headers.get(b"cookie", b""), COOKIE_NAME)
            if cookie and hmac.compare_digest(cookie, self.cookie):
                if scope["method"] == "GET" or headers.get(b"x-flq-dashboard") == b"1":
                    return await self.app(scope, receive, send)
                return await _send_error(
                    send, Code.UNAUTHORIZED, "a POST with the dashboard cookie needs the header X-FLQ-Dashboard: 1"
                )
            if path == "/":
                return await _send_page(
                    send, 401, "this run needs its token: open /?token=<the run's auth_token> once in this browser"
                )
        return await _send_error(send, Code.UNAUTHORIZED, "missing or wrong bearer token")


#: The dashboard cookie's name (:class:`BearerAuth`).
COOKIE_NAME = "flq_dashboard"


def dashboard_cookie(token: str) -> str:
    """The dashboard cookie's value for ``token``: HMAC-SHA-256 of a fixed
    label under the token, hex (the cookie never holds the token itself)."""
    return hmac.new(token.encode(), b"flq-dashboard-cookie-v1", hashlib.sha256).hexdigest()


def _query_value(query: bytes, name: str):
    """The last value of ``name`` in a query string, percent-decoded but with
    ``+`` kept (a pasted token often holds one); None when absent."""
    found = None
    for part in query.decode("latin-1").split("&"):
        key, eq, value = part.partition("=")
        if eq and unquote(key) == name:
            found = unquote(value)
    return found


def _cookie(header: bytes, name: str) -> bytes:
    """The value of cookie ``name`` in a ``Cookie`` header (b'' when absent)."""
    for part in header.split(b";"):
        key, _, value = part.strip().partition(b"=")
        if key == name.encode():
            return value
    return b""


async def _send_login(send, cookie: bytes, secure: bool) -> None:
    """303 to ``/`` setting the dashboard cookie (the token leaves the address bar)."""
    flags = b"; Path=/; HttpOnly; SameSite=Strict" + (b"; Secure" if secure else b"")
    await send(
        {
            "type": "http.response.start",
            "status": 303,
            "headers": [
                (b"location", b"/"),
                (b"set-cookie", COOKIE_NAME.encode() + b"=" + cookie + flags),
                (b"cache-control", b"no-store"),
                (b"content-length", b"0"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b""})


async def _send_page(send, status: int, text: str) -> None:
    """A short HTML page (the dashboard's refusals: a browser shows it)."""
    body = (f"<!doctype html><meta charset=utf-8><title>FLQ-Fed dashboard</title><p>{html.escape(text)}</p>").encode()
    log.warning("dashboard refused (%d): %s", status, text)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/html; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


#: The worker protocol's paths (and ``/workers/{id}/mirrors``): with per-worker
#: credentials each must be signed; the bearer token is not asked for there.
WORKER_PATHS = frozenset(
    {
        "/config",
        "/workers/challenge",
        "/workers/register",
        "/workers/heartbeat",
        "/workers/leave",
        "/round/model",
        "/round/offer",
        "/round/upload",
    }
)
#: Worker paths that only read what the worker may always read: signed, but
#: not numbered (asking twice is harmless).
UNNUMBERED = frozenset({"/config", "/workers/challenge"})
#: Where the worker id a request proved is kept in the ASGI scope.
SCOPE_WORKER = "flq.worker"


def is_worker_path(path: str) -> bool:
    return path in WORKER_PATHS or (path.startswith("/workers/") and path.endswith("/mirrors"))


class WorkerAuth:
    """ASGI middleware: per-worker credentials (:mod:`flq.credentials`).
    Every worker call must carry a valid signature of the worker id it claims;
    a refusal (401 ``bad_signature``, 409 ``replayed``) is sent before the
    route runs, so the master's state is untouched. The proved id goes into
    the scope (``flq.worker``) for the route to compare with the id the call
    acts for (403 ``wrong_worker``). Sits inside :class:`BodyLimit`, whose
    buffered body (complete, within its limit) it reads from the scope."""

    def __init__(self, app, verifier) -> None:
        self.app, self.verifier = app, verifier

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not is_worker_path(scope["path"]):
            return await self.app(scope, receive, send)
        body = scope.get(SCOPE_BODY, b"")
        headers: Dict[str, str] = {}
        for k, v in scope["headers"]:
            name = k.decode("latin-1").lower()
            if name in headers and name.startswith("x-flq-"):  # the check and the route must read the same value
                return await _send_error(send, Code.BAD_SIGNATURE, f"the header {name} is repeated")
            headers[name] = v.decode("latin-1")
        path = scope["path"]
        try:
            m = self.verifier.check(
                scope["method"],
                path,
                scope.get("query_string", b"").decode("latin-1"),
                headers,
                body,
                sequenced=path not in UNNUMBERED,
                registration=path == "/workers/register",
            )
        except AuthError as exc:
            return await _send_error(send, exc.code, str(exc))
        return await self.app({**scope, SCOPE_WORKER: m}, receive, send)


async def _send_error(send, code: Code, detail: str) -> None:
    """Answer a refusal from ASGI middleware (the connection is then closed)."""
    body = json.dumps({"detail": detail, "code": code}).encode()
    log.warning("request refused (%d %s): %s", code.status, code, detail)
    await send(
        {
            "type": "http.response.start",
            "status": code.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# ----- documents -------------------------------------------------------------
