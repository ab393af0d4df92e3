"""The master's HTTP API (FastAPI on uvicorn).

Monitoring, as the original README calls it:

- ``GET /status``: JSON round, max rounds, mode, workers (state, last seen),
  last metrics, cumulative bits and wire bytes.
- ``GET /get_global_model``: the global model as a safetensors file (tensor
  names of the model's ``state_dict``), the round in its metadata and in the
  ``X-FLQ-Round`` header.
- ``POST /stop``: stop after the current round, write the results, tell the
  workers to exit.

The worker protocol (binary bodies for vectors, JSON for the rest):

- ``GET /config`` -> ``{config, state, round, run}``: the run's configuration,
  read before registering (so a worker loads its data first and the rounds
  need not wait for that), and the run's id (a worker's saved state is of
  one run).
- ``POST /workers/register`` ``{worker_id, up_version, down_version,
  threads, device}`` -> ``{resync, round, state, session, heartbeat_s,
  config}``.
- ``POST /workers/heartbeat`` ``{worker_id}``: a sign of life every
  ``heartbeat_s`` (a worker not heard from for ``worker_timeout_s`` is
  absent); ``POST /workers/leave`` ``{worker_id}``: the worker exits on
  purpose.
- ``GET /workers/{id}/mirrors`` -> safetensors with ``ref_up``, ``ref_down``
  (versions in the metadata): the master's halves, to resynchronize.
- ``GET /round/model?worker_id=&after=&wait=`` -> 200 with the encoded
  downlink of the open round if it is after round ``after`` (headers
  ``X-FLQ-Round``, ``X-FLQ-MeK``), 204 when none opened within ``wait``
  seconds. Asked again for the same round: the same bytes.
- ``POST /round/offer?wait=`` ``{worker_id, round, candidate, gain, cost,
  loss, up_version, down_version}`` -> ``{decided, selected, round}``; when
  not decided within ``wait`` seconds the worker sends the same offer again
  (it is recorded once).
- ``POST /round/upload?worker_id=&round=`` with the encoded update (only
  the selected; the same bytes again are accepted and counted once).

Every worker call carries the ``X-FLQ-Session`` header its registration
returned. Errors are an HTTP status with a JSON ``detail`` of one line and a
``code``: 400 malformed, 401 bad token (``unauthorized``), 404 unknown
worker (``unknown_worker``) or not registered (``not_registered``), 409
conflicts (``late``, ``mirror_mismatch``, ``session_replaced``,
``conflict``), 410 run over (``run_over``, with the run's ``reason``), 413
body too large, 422 invalid request. This module knows nothing of
quantization: vectors are opaque bytes that
:class:`~flq.cluster.ClusterMaster` hands to the algorithm.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import threading
import time
from typing import Any, Callable, Dict, Optional

import numpy as np
from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from .. import outcome
from ..cluster import FINISHED, ClusterMaster, RunFinished
from ..master import MasterError
from ..messages import Offer

log = logging.getLogger(__name__)

OCTET = "application/octet-stream"
#: The worker's registration session (optional for hand-made calls; workers always send it).
SESSION = Header(None, alias="X-FLQ-Session", max_length=64)
#: Largest JSON request body (register, offer): far above any real one.
MAX_JSON_BODY = 64 * 1024
#: Seconds a client may take to send its whole request body.
BODY_TIMEOUT_S = 30.0
#: Longest long-poll a worker may ask for (``wait``), seconds.
MAX_WAIT_S = 120.0


class BodyLimit:
    """ASGI middleware: refuse request bodies over a per-path size (413) or
    that take longer than ``BODY_TIMEOUT_S`` to arrive (408), before any
    handler reads them; the body is buffered here and replayed to the app."""

    def __init__(self, app, limits: Dict[str, int], default: int) -> None:
        self.app, self.limits, self.default = app, limits, default

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = self.limits.get(scope["path"], self.default)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _send_error(send, 413, f"request body of {int(declared)} bytes exceeds the limit of {limit}",
                                     "too_large")
        chunks, size, more = [], 0, True
        deadline = time.monotonic() + BODY_TIMEOUT_S
        while more:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return await _send_error(send, 408, f"request body not received within {BODY_TIMEOUT_S:.0f} s",
                                         "timeout")
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _send_error(send, 413, f"request body exceeds the limit of {limit} bytes", "too_large")
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class BearerAuth:
    """ASGI middleware: without ``Authorization: Bearer <token>`` a request is
    refused with 401 before anything reads it (``token`` '' = no auth;
    ``open_paths`` need none). A plain ASGI class, so a client that hangs up
    mid-request cannot make it fail."""

    def __init__(self, app, token: str, open_paths) -> None:
        self.app, self.expected, self.open_paths = app, f"Bearer {token}".encode(), frozenset(open_paths)
        self.token = token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.token or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        return await _send_error(send, 401, "missing or wrong bearer token", "unauthorized")


async def _send_error(send, status: int, detail: str, code: str) -> None:
    body = json.dumps({"detail": detail, "code": code}).encode()
    log.warning("request refused (%d): %s", status, detail)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class RegisterRequest(BaseModel):
    worker_id: int = Field(ge=0, strict=True, description="the worker's id m")
    up_version: int = Field(0, ge=0, strict=True, description="version of the worker's ref_up mirror")
    down_version: int = Field(0, ge=0, strict=True, description="version of the worker's ref_down mirror")
    threads: int = Field(0, ge=0, le=4096, strict=True, description="PyTorch threads the worker computes with")
    device: str = Field("", max_length=64, description="the worker's compute device")


class RegisterResponse(BaseModel):
    resync: bool
    round: int
    state: str
    session: str = Field(description="send back as the X-FLQ-Session header on every later call")
    heartbeat_s: float = Field(description="send POST /workers/heartbeat this often (seconds)")
    config: Dict[str, Dict[str, Any]]


class WorkerRequest(BaseModel):
    worker_id: int = Field(ge=0, strict=True, description="the worker's id m")


class OfferRequest(BaseModel):
    worker_id: int = Field(ge=0, strict=True)
    round: int = Field(ge=0, strict=True)
    candidate: bool
    gain: float
    cost: float
    loss: Optional[float] = Field(description="the worker's training loss; null when it is not finite (the "
                                  "worker's model diverged; it is then not a candidate)")
    up_version: int = Field(ge=0, strict=True)
    down_version: int = Field(ge=0, strict=True)
    compute_s: float = Field(0.0, ge=0, le=1e6, allow_inf_nan=False)


class OfferResponse(BaseModel):
    decided: bool = Field(description="false: no selection yet, send the same offer again")
    selected: bool
    round: int


class StopResponse(BaseModel):
    stopping: bool
    round: int
    state: str


def _error(status: int, detail: str, code: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, "code": code, **extra}, status_code=status)


def create_app(cluster: ClusterMaster, model_state: Any, max_body_bytes: int,
               status_token_free: bool = True, auth_token: str = "",
               on_shutdown: Optional[Callable[[], None]] = None) -> FastAPI:
    """The FastAPI application of one master.

    Args:
        cluster: the round protocol object.
        model_state: ``callable(theta) -> {name: torch.Tensor}`` for ``/get_global_model``.
        max_body_bytes: largest upload body accepted (413 beyond).
        status_token_free: ``GET /status`` needs no token.
        auth_token: bearer token required on worker calls and ``/stop`` ('' = none).
        on_shutdown: called when the server shuts down (SIGINT/SIGTERM included),
            before uvicorn re-raises the signal: where results get written.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.rounds = asyncio.create_task(cluster.run())  # the round loop lives with the server
        yield
        task = app.state.rounds
        if not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down anyway
                pass
        if on_shutdown is not None:
            await asyncio.to_thread(on_shutdown)

    app = FastAPI(title="FLQ-Fed master", version="1", lifespan=lifespan,
                  description="Federated learning with low-bit, lazy, budgeted uploads (FLQ).")
    app.state.cluster = cluster
    app.add_middleware(BodyLimit, limits={"/round/upload": max_body_bytes}, default=MAX_JSON_BODY)
    open_paths = {"/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"} | ({"/status"} if status_token_free
                                                                                  else set())
    app.add_middleware(BearerAuth, token=auth_token, open_paths=open_paths)  # outermost: runs first

    @app.exception_handler(MasterError)
    async def _master_error(request: Request, exc: MasterError):
        log.warning("%s %s refused (%d): %s", request.method, request.url.path, exc.status, exc)
        return _error(exc.status, str(exc), exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(x) for x in first.get("loc", ()))
        detail = f"{where}: {first.get('msg', 'invalid')}".replace("\n", " ")
        log.warning("%s %s refused (422): %s", request.method, request.url.path, detail)
        return _error(422, detail, "invalid")

    @app.exception_handler(RunFinished)
    async def _finished(request: Request, exc: RunFinished):
        return _error(410, f"the run is over ({exc.reason}): exit", "run_over", reason=exc.reason)

    def _account(up: int = 0, down: int = 0) -> None:
        cluster.master.add_wire_bytes(up=up, down=down)

    # ----- monitoring -----------------------------------------------------
    @app.get("/status", summary="Run state, workers, last metrics, cumulative bits")
    async def status() -> Dict[str, Any]:
        return cluster.status()

    @app.get("/get_global_model", summary="The global model as safetensors", response_class=Response,
             responses={200: {"content": {OCTET: {}}}})
    async def get_global_model() -> Response:
        from safetensors.torch import save

        theta = cluster.master.theta.copy()
        k = cluster.master.round
        tensors = model_state(theta)
        body = save(tensors, metadata={"round": str(k), "mode": cluster.cfg.mode, "format": "pt"})
        return Response(body, media_type=OCTET, headers={"X-FLQ-Round": str(k),
                                                         "Content-Disposition": f'attachment; filename="flq_global_round{k}.safetensors"'})

    @app.post("/stop", response_model=StopResponse, summary="Stop after the current round")
    async def stop() -> StopResponse:
        cluster.request_stop(outcome.STOPPED)
        await cluster._notify()
        return StopResponse(stopping=True, round=cluster.master.round + 1, state=cluster.state)

    # ----- worker protocol ------------------------------------------------
    @app.get("/config", summary="The run's configuration (a worker reads it before it registers)")
    async def run_config() -> Dict[str, Any]:
        return {"config": cluster.cfg.public_sections(), "state": cluster.state, "round": cluster.master.round,
                "run": cluster.run_id}

    @app.post("/workers/register", response_model=RegisterResponse)
    async def register(req: RegisterRequest, request: Request) -> RegisterResponse:
        host = request.client.host if request.client else ""
        out = await cluster.register(req.worker_id, req.up_version, req.down_version, address=host,
                                     threads=req.threads, device=req.device)
        return RegisterResponse(config=cluster.cfg.public_sections(), **out)

    @app.post("/workers/heartbeat", summary="A worker's sign of life (every heartbeat_s)")
    async def heartbeat(req: WorkerRequest, session: Optional[str] = SESSION) -> Dict[str, Any]:
        cluster.master.check_worker(req.worker_id)
        return cluster.heartbeat(req.worker_id, session)

    @app.post("/workers/leave", summary="The worker exits on purpose; no round waits for it")
    async def leave(req: WorkerRequest, session: Optional[str] = SESSION) -> Dict[str, Any]:
        cluster.master.check_worker(req.worker_id)
        await cluster.leave(req.worker_id, session)
        return {"ok": True}

    @app.get("/workers/{worker_id}/mirrors", response_class=Response, responses={200: {"content": {OCTET: {}}}})
    async def mirrors(worker_id: int, session: Optional[str] = SESSION) -> Response:
        from safetensors.numpy import save

        cluster.master.check_worker(worker_id)
        ref_up, ref_down, up_v, down_v = cluster.mirrors(worker_id, session)
        body = save({"ref_up": np.ascontiguousarray(ref_up), "ref_down": np.ascontiguousarray(ref_down)},
                    metadata={"up_version": str(up_v), "down_version": str(down_v)})
        return Response(body, media_type=OCTET)

    @app.get("/round/model", response_class=Response, responses={200: {"content": {OCTET: {}}}, 204: {}})
    async def round_model(worker_id: int = Query(ge=0), wait: float = Query(20.0, ge=0, le=MAX_WAIT_S),
                          after: int = Query(-1, ge=-1, description="the last round (0-based) the worker has done"),
                          session: Optional[str] = SESSION) -> Response:
        cluster.master.check_worker(worker_id)
        view = await cluster.fetch_round(worker_id, wait, session, after=after)
        if view is None:
            return Response(status_code=204)
        return Response(view.payload, media_type=OCTET,
                        headers={"X-FLQ-Round": str(view.round), "X-FLQ-MeK": repr(float(view.me_k)),
                                 "X-FLQ-Down-Version": str(view.down_version)})

    @app.post("/round/offer", response_model=OfferResponse)
    async def round_offer(req: OfferRequest, request: Request, wait: float = Query(20.0, ge=0, le=MAX_WAIT_S),
                          session: Optional[str] = SESSION) -> Response:
        raw = await request.body()
        fields = req.model_dump()
        fields["loss"] = float("nan") if fields["loss"] is None else fields["loss"]
        selected = await cluster.offer(Offer(**fields), session, wait_s=wait)
        body = json.dumps({"decided": selected is not None, "selected": bool(selected), "round": req.round}).encode()
        _account(up=len(raw), down=len(body))
        return Response(body, media_type="application/json")

    @app.post("/round/upload", openapi_extra={"requestBody": {"content": {OCTET: {"schema": {"type": "string", "format": "binary"}}}, "required": True}})
    async def round_upload(request: Request, worker_id: int = Query(ge=0), round: int = Query(ge=0),
                           session: Optional[str] = SESSION) -> Response:
        cluster.master.check_worker(worker_id)
        # BodyLimit has already refused bodies over max_body_bytes (413)
        await cluster.upload(worker_id, round, await request.body(), session)
        body = b'{"ok":true}'
        _account(down=len(body))
        return Response(body, media_type="application/json")

    return app


def _server_class(cluster: ClusterMaster):
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server with the master's signal handling: the first
        SIGINT/SIGTERM acts as ``POST /stop`` (finish or abandon the current
        round, write the results, tell the workers to exit, then exit with
        130/143); a second one exits at once (the results are still written).
        Signals are not re-raised afterwards, so the master's own clean-up
        always runs."""

        stop_sent = False

        def handle_exit(self, sig, frame):
            reason = outcome.signal_reason(sig)
            if self.should_exit:
                log.warning("%s: already exiting (writing the results)", reason.upper())
                return
            if not self.stop_sent and cluster.state != FINISHED:
                self.stop_sent = True
                log.warning("%s: stopping after the current round (send it again to exit now)", reason.upper())
                cluster.request_stop(reason)
                return
            log.warning("%s again: exiting now", reason.upper())
            if cluster.state != FINISHED:
                cluster.abort(reason)
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in outcome.stop_signals()}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


async def serve(app: FastAPI, cluster: ClusterMaster, host: str, port: int, linger_s: float = 5.0,
                ssl_certfile: Optional[str] = None, ssl_keyfile: Optional[str] = None, sock: Any = None) -> None:
    """Run uvicorn (the app's lifespan runs the round loop) until the run
    ends, then ``linger_s`` seconds more, answering 410 to the workers that
    still call (so they learn the run is over), or until SIGINT/SIGTERM.
    ``sock``: an already listening socket to serve on (else ``host:port``)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, timeout_keep_alive=30,
                            timeout_graceful_shutdown=5)
    server = _server_class(cluster)(config)

    async def exit_when_finished() -> None:
        while True:
            rounds = getattr(app.state, "rounds", None)
            if cluster.state == FINISHED or (rounds is not None and rounds.done()):
                break
            await asyncio.sleep(0.1)
        if cluster.state == FINISHED:
            await asyncio.sleep(linger_s)
        server.should_exit = True

    watcher = asyncio.create_task(exit_when_finished())
    try:
        await server.serve(sockets=[sock] if sock is not None else None)
    finally:
        watcher.cancel()
