"""ASGI middleware of the master's HTTP server: the bearer token, the
per-worker signatures, and the request body's size and time limits. Each refusal is the protocol's JSON error
(:class:`flq.protocol.Code`), sent before the route runs.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Dict

from ..credentials import AuthError
from ..protocol import Code

log = logging.getLogger("flq.transport.server")

#: Where :class:`BodyLimit` leaves the request body it buffered (absent: a request without one).
SCOPE_BODY = "flq.body"
#: Seconds a client may take to send its whole request body.
BODY_TIMEOUT_S = 30.0


class RequestCount:
    """ASGI middleware: count the HTTP requests by ``"METHOD /path"`` (paths
    outside ``paths`` count as ``"other"``, so the table stays bounded)
    in ``counts``, for ``/status`` and the master's last log line."""

    def __init__(self, app, paths, counts: Dict[str, int]) -> None:
        self.app, self.paths, self.counts = app, paths, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope["path"]
            key = f"{scope['method']} {path}" if path in self.paths else "other"
            self.counts[key] = self.counts.get(key, 0) + 1
        return await self.app(scope, receive, send)


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


class BearerAuth:
    """ASGI middleware: without ``Authorization: Bearer <token>`` a request is
    refused with 401 ``unauthorized`` before anything reads it (``token`` '' =
    no auth; ``open_paths`` need none; with ``signed_workers`` the worker paths
    are left to :class:`WorkerAuth`). A plain ASGI class, so a client that
    hangs up mid-request cannot make it fail."""

    def __init__(self, app, token: str, open_paths, signed_workers: bool = False) -> None:
        self.app, self.expected, self.open_paths = app, f"Bearer {token}".encode(), frozenset(open_paths)
        self.token, self.signed_workers = token, signed_workers

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.token or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        if self.signed_workers and is_worker_path(scope["path"]):  # WorkerAuth checks these
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        return await _send_error(send, Code.UNAUTHORIZED, "missing or wrong bearer token")


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
