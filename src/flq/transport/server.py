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

- ``GET /config`` -> the run's configuration, read before registering (so a
  worker loads its data first and the rounds need not wait for that).
- ``POST /workers/register`` ``{worker_id, up_version, down_version}`` ->
  ``{resync, round, state, config}``.
- ``GET /workers/{id}/mirrors`` -> safetensors with ``ref_up``, ``ref_down``
  (versions in the metadata): the master's halves, to resynchronize.
- ``GET /round/model?worker_id=&wait=`` -> 200 with the encoded downlink
  (headers ``X-FLQ-Round``, ``X-FLQ-MeK``), 204 when no round opened within
  ``wait`` seconds, 410 when the run is over.
- ``POST /round/offer`` ``{worker_id, round, candidate, gain, cost, loss,
  up_version, down_version}`` -> ``{selected}`` once the round's selection is
  made.
- ``POST /round/upload?worker_id=&round=`` with the encoded update (only
  the selected).

Errors are an HTTP status with a JSON ``detail`` of one line: 400 malformed,
401 bad token, 404 unknown worker, 409 conflicts with the round (late,
duplicate, mirror versions differ), 410 run finished, 413 body too large.
This module knows nothing of quantization: vectors are opaque bytes that
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
            return await _send_error(send, 413, f"request body of {int(declared)} bytes exceeds the limit of {limit}")
        chunks, size, more = [], 0, True
        deadline = time.monotonic() + BODY_TIMEOUT_S
        while more:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return await _send_error(send, 408, f"request body not received within {BODY_TIMEOUT_S:.0f} s")
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await _send_error(send, 413, f"request body exceeds the limit of {limit} bytes")
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


async def _send_error(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    log.warning("request refused (%d): %s", status, detail)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class RegisterRequest(BaseModel):
    worker_id: int = Field(ge=0, strict=True, description="the worker's id m")
    up_version: int = Field(0, ge=0, strict=True, description="version of the worker's ref_up mirror")
    down_version: int = Field(0, ge=0, strict=True, description="version of the worker's ref_down mirror")


class RegisterResponse(BaseModel):
    resync: bool
    round: int
    state: str
    session: str = Field(description="send back as the X-FLQ-Session header on every later call")
    config: Dict[str, Dict[str, Any]]


class OfferRequest(BaseModel):
    worker_id: int = Field(ge=0, strict=True)
    round: int = Field(ge=0, strict=True)
    candidate: bool
    gain: float
    cost: float
    loss: float
    up_version: int = Field(ge=0, strict=True)
    down_version: int = Field(ge=0, strict=True)
    compute_s: float = Field(0.0, ge=0)


class OfferResponse(BaseModel):
    selected: bool
    round: int


class StopResponse(BaseModel):
    stopping: bool
    round: int
    state: str


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


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

    @app.exception_handler(MasterError)
    async def _master_error(request: Request, exc: MasterError):
        log.warning("%s %s refused (%d): %s", request.method, request.url.path, exc.status, exc)
        return _error(exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(x) for x in first.get("loc", ()))
        detail = f"{where}: {first.get('msg', 'invalid')}".replace("\n", " ")
        log.warning("%s %s refused (422): %s", request.method, request.url.path, detail)
        return _error(422, detail)

    @app.exception_handler(RunFinished)
    async def _finished(request: Request, exc: RunFinished):
        return _error(410, "run finished: exit")

    def _authorized(request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return not auth_token or hmac.compare_digest(given.encode(), f"Bearer {auth_token}".encode())

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        path = request.url.path
        open_paths = ("/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc")
        if auth_token and path not in open_paths and not (status_token_free and path == "/status"):
            if not _authorized(request):
                log.warning("%s %s refused (401): missing or wrong bearer token", request.method, path)
                return _error(401, "missing or wrong bearer token")
        return await call_next(request)

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
        cluster.request_stop()
        await cluster._notify()
        return StopResponse(stopping=True, round=cluster.master.round + 1, state=cluster.state)

    # ----- worker protocol ------------------------------------------------
    @app.get("/config", summary="The run's configuration (a worker reads it before it registers)")
    async def run_config() -> Dict[str, Any]:
        return {"config": cluster.cfg.public_sections(), "state": cluster.state, "round": cluster.master.round}

    @app.post("/workers/register", response_model=RegisterResponse)
    async def register(req: RegisterRequest, request: Request) -> RegisterResponse:
        host = request.client.host if request.client else ""
        out = await cluster.register(req.worker_id, req.up_version, req.down_version, address=host)
        return RegisterResponse(config=cluster.cfg.public_sections(), **out)

    @app.get("/workers/{worker_id}/mirrors", response_class=Response, responses={200: {"content": {OCTET: {}}}})
    async def mirrors(worker_id: int, session: Optional[str] = SESSION) -> Response:
        from safetensors.numpy import save

        cluster.master.check_worker(worker_id)
        ref_up, ref_down, up_v, down_v = cluster.mirrors(worker_id, session)
        body = save({"ref_up": np.ascontiguousarray(ref_up), "ref_down": np.ascontiguousarray(ref_down)},
                    metadata={"up_version": str(up_v), "down_version": str(down_v)})
        return Response(body, media_type=OCTET)

    @app.get("/round/model", response_class=Response, responses={200: {"content": {OCTET: {}}}, 204: {}})
    async def round_model(worker_id: int = Query(ge=0), wait: float = Query(20.0, ge=0, le=120),
                          session: Optional[str] = SESSION) -> Response:
        cluster.master.check_worker(worker_id)
        view = await cluster.fetch_round(worker_id, wait, session)
        if view is None:
            return Response(status_code=204)
        return Response(view.payload, media_type=OCTET,
                        headers={"X-FLQ-Round": str(view.round), "X-FLQ-MeK": repr(float(view.me_k)),
                                 "X-FLQ-Down-Version": str(view.down_version)})

    @app.post("/round/offer", response_model=OfferResponse)
    async def round_offer(req: OfferRequest, request: Request, session: Optional[str] = SESSION) -> Response:
        raw = await request.body()
        selected = await cluster.offer(Offer(**req.model_dump()), session)
        body = json.dumps({"selected": selected, "round": req.round}).encode()
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
        round, write the results, tell the workers to exit, then exit); a second
        one exits at once. Signals are not re-raised afterwards, so the master's
        own clean-up (the results spreadsheet) always runs."""

        stop_sent = False

        def handle_exit(self, sig, frame):
            if not self.stop_sent and cluster.state != FINISHED:
                self.stop_sent = True
                log.warning("signal %d: stopping after the current round (send it again to exit now)", sig)
                cluster.request_stop()
                return
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


async def serve(app: FastAPI, cluster: ClusterMaster, host: str, port: int, grace_s: float = 5.0,
                ssl_certfile: Optional[str] = None, ssl_keyfile: Optional[str] = None) -> None:
    """Run uvicorn (the app's lifespan runs the round loop); exit ``grace_s``
    after the run ends (so polling workers hear 410), or on SIGINT/SIGTERM."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, timeout_keep_alive=30,
                            timeout_graceful_shutdown=5)
    server = _server_class(cluster)(config)

    async def exit_when_finished() -> None:
        while cluster.state != FINISHED:
            await asyncio.sleep(0.1)
        await asyncio.sleep(grace_s)
        server.should_exit = True

    watcher = asyncio.create_task(exit_when_finished())
    try:
        await server.serve()
    finally:
        watcher.cancel()
