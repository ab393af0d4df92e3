"""The master's HTTP API (FastAPI on uvicorn).

Rounds are counted from 1 everywhere in this API, like the spreadsheet's
``iter`` column and the log lines (:mod:`flq.protocol`): in headers, query
parameters and JSON fields alike. The algorithm's 0-based index ``k`` stays
behind this module, which converts at its boundary.

Monitoring, as the original README calls it:

- ``GET /status``: JSON round (the one in progress, or the next; the last once
  the run is over), max rounds, mode, workers (state, last seen), last
  metrics, cumulative bits and wire bytes.
- ``GET /get_global_model``: the global model as a safetensors file (tensor
  names of the model's ``state_dict``), named
  ``flq_global_round<N>.safetensors``, where ``N`` (also in its metadata
  ``round`` and in the ``X-FLQ-Round`` header) is the last round whose update
  it holds: the ``iter`` of the spreadsheet row it matches; 0 for the
  initial model.
- ``POST /stop``: stop after the current round, write the results, tell the
  workers to exit.

The worker protocol (binary bodies for vectors, JSON for the rest):

- ``GET /config`` -> ``{config, state, round, run}``: the run's
  configuration, read before registering (so a worker loads its data first
  and the rounds need not wait for that), the round in progress, and the
  run's id (a worker's saved state is of one run).
- ``POST /workers/register`` ``{worker_id, up_version, down_version,
  threads, device}`` -> ``{resync, round, state, session, heartbeat_s,
  config}``.
- ``POST /workers/heartbeat`` ``{worker_id}``: a sign of life every
  ``heartbeat_s`` seconds (a worker not heard from for ``worker_timeout_s``
  is absent); ``POST /workers/leave`` ``{worker_id}``: the worker exits on
  purpose.
- ``GET /workers/{id}/mirrors`` -> safetensors with ``ref_up``, ``ref_down``
  (versions in the metadata): the master's halves, to resynchronize.
- ``GET /round/model?worker_id=&after=&wait=`` -> 200 with the encoded
  downlink of the open round if it is after round ``after`` (the last round
  the worker did; 0 for none), headers ``X-FLQ-Round`` (the round),
  ``X-FLQ-MeK``; 204 when none opened within ``wait`` seconds. Asked again
  for the same round: the same bytes.
- ``POST /round/offer?wait=`` ``{worker_id, round, candidate, gain, cost,
  loss, up_version, down_version}`` -> ``{decided, selected, round}``; when
  not decided within ``wait`` seconds the worker sends the same offer again
  (it is recorded once).
- ``POST /round/upload?worker_id=&round=`` with the encoded update (only
  the selected; the same bytes again are accepted and counted once).

Every worker call carries the ``X-FLQ-Session`` header its registration
returned. A refusal is an HTTP status with the JSON body ``{"detail",
"code"}`` (:class:`ErrorResponse`): ``detail`` is one line for a person,
``code`` one of :class:`flq.protocol.Code` for a program (each code has one
status; 410 ``run_over`` adds the run's ``reason``). Every route documents in
the OpenAPI document (``/openapi.json``) each status it can answer, with its
codes. This module knows nothing of quantization: vectors are opaque bytes
that :class:`~flq.cluster.ClusterMaster` hands to the algorithm.
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
from typing import Any, Callable, Dict, List, Literal, Optional

import numpy as np
from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import outcome
from ..cluster import FINISHED, ClusterMaster, RunFinished
from ..config import ConfigFile
from ..master import MasterError
from ..messages import Offer
from ..protocol import Code, codes_by_status, round_index, round_number

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
    """ASGI middleware: refuse request bodies over a per-path size (413
    ``too_large``) or that take longer than ``BODY_TIMEOUT_S`` seconds to
    arrive (408 ``timeout``), before any handler reads them; the body is
    buffered here and replayed to the app."""

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

        return await self.app(scope, replay, send)


class BearerAuth:
    """ASGI middleware: without ``Authorization: Bearer <token>`` a request is
    refused with 401 ``unauthorized`` before anything reads it (``token`` '' =
    no auth; ``open_paths`` need none). A plain ASGI class, so a client that
    hangs up mid-request cannot make it fail."""

    def __init__(self, app, token: str, open_paths) -> None:
        self.app, self.expected, self.open_paths = app, f"Bearer {token}".encode(), frozenset(open_paths)
        self.token = token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.token or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        return await _send_error(send, Code.UNAUTHORIZED, "missing or wrong bearer token")


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
class ErrorResponse(BaseModel):
    """Every refusal: an HTTP status with this body."""

    detail: str = Field(description="what went wrong, in one line, for a person")
    code: Code = Field(
        description="what went wrong, for a program to act on (flq.protocol.Code); each code has one status"
    )
    reason: Optional[str] = Field(None, description="410 run_over only: the run's end reason (flq.outcome)")


class RegisterRequest(BaseModel):
    worker_id: int = Field(ge=0, strict=True, description="the worker's id m")
    up_version: int = Field(0, ge=0, strict=True, description="version of the worker's ref_up mirror")
    down_version: int = Field(0, ge=0, strict=True, description="version of the worker's ref_down mirror")
    threads: int = Field(0, ge=0, le=4096, strict=True, description="PyTorch threads the worker computes with")
    device: str = Field("", max_length=64, description="the worker's compute device")


class RegisterResponse(BaseModel):
    resync: bool = Field(description="the worker's mirror versions differ from the master's: fetch its mirrors")
    round: int = Field(description="the round in progress, or the next to open (1-based)")
    state: str
    session: str = Field(description="send back as the X-FLQ-Session header on every later call")
    heartbeat_s: float = Field(description="send POST /workers/heartbeat this often (seconds)")
    config: ConfigFile


class WorkerRequest(BaseModel):
    worker_id: int = Field(ge=0, strict=True, description="the worker's id m")


class HeartbeatResponse(BaseModel):
    state: str = Field(description="the run's state: waiting, training, stopping or finished")
    round: int = Field(description="the round in progress, or the next to open (1-based)")
    phase: str = Field(description="the round's phase: idle, offers, uploads or closing")


class OkResponse(BaseModel):
    ok: bool


class OfferRequest(BaseModel):
    worker_id: int = Field(ge=0, strict=True)
    round: int = Field(ge=1, strict=True, description="the round offered in (1-based, as X-FLQ-Round said)")
    candidate: bool
    gain: float
    cost: float
    loss: Optional[float] = Field(
        description="the worker's training loss; null when it is not finite (the "
        "worker's model diverged; it is then not a candidate)"
    )
    up_version: int = Field(ge=0, strict=True)
    down_version: int = Field(ge=0, strict=True)
    compute_s: float = Field(0.0, ge=0, le=1e6, allow_inf_nan=False)


class OfferResponse(BaseModel):
    decided: bool = Field(description="false: no selection yet, send the same offer again")
    selected: bool
    round: int = Field(description="the round offered in (1-based)")


class StopResponse(BaseModel):
    stopping: bool
    round: int = Field(description="the round in progress, or the next (1-based); the last once the run is over")
    state: str


class ConfigResponse(BaseModel):
    config: ConfigFile = Field(description="the run's configuration by section (token masked)")
    state: Literal["waiting", "training", "stopping", "finished"]
    round: int = Field(description="the round in progress, or the next (1-based); the last once the run is over")
    run: str = Field(
        description="the run's id (the stamp of its log and checkpoint); a worker's saved state belongs to one run"
    )


class WorkerStatus(BaseModel):
    worker_id: int
    state: str = Field(
        description="registered, training, offered, uploading, idle, late; absent (not heard from "
        "for worker_timeout_s) or left"
    )
    last_seen: float = Field(description="when the master last heard from it (Unix time, seconds)")
    seconds_since_seen: float
    rounds_offered: int
    rounds_uploaded: int
    address: str
    threads: int
    device: str


class StatusTimeouts(BaseModel):
    """The run's bounds, seconds."""

    round: float
    worker: float
    start: float
    quorum: float
    heartbeat: float


class StatusBits(BaseModel):
    up_cum: int
    down_cum: int
    total_cum: int


class StatusWireBytes(BaseModel):
    up_cum: int
    down_cum: int


class StatusResponse(BaseModel):
    state: Literal["waiting", "training", "stopping", "finished"]
    phase: Literal["idle", "offers", "uploads", "closing"]
    round: int = Field(
        description="1-based like the spreadsheet's iter: the round in progress, or the next; the "
        "last once the run is over"
    )
    rounds_done: int
    round_open_s: Optional[float] = Field(description="seconds since the open round opened; null between rounds")
    waiting_for: List[int] = Field(description="the workers the current phase waits for")
    live_workers: int
    max_rounds: int
    mode: str
    b_up: int
    b_down: int
    total_workers: int
    min_workers: int
    timeouts_s: StatusTimeouts
    workers: List[WorkerStatus]
    last_metrics: Optional[Dict[str, Any]] = Field(
        description="the last round's record (a spreadsheet row; non-finite numbers as null)"
    )
    last_evaluation: Optional[Dict[str, Any]] = Field(description="the last record with a test accuracy")
    bits: StatusBits
    wire_bytes: StatusWireBytes
    stop_requested: bool
    finish_reason: str
    finish_detail: str
    checkpoint_error: str


def _error(code: Code, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, "code": code, **extra}, status_code=code.status)


def _errors(*codes: Code) -> Dict[int, Dict[str, Any]]:
    """OpenAPI ``responses`` for the refusals a route can answer: per status,
    :class:`ErrorResponse` and the codes it may carry."""
    return {
        status: {"model": ErrorResponse, "description": "Refused: " + "; ".join(f"`{c}`: {c.meaning}" for c in group)}
        for status, group in codes_by_status(codes).items()
    }


#: The refusals of every route (the token; an error inside the master), of
#: every POST (its body), and of every call that names a registered worker.
_ANY = (Code.UNAUTHORIZED, Code.INTERNAL)
_BODY = (Code.TIMEOUT, Code.TOO_LARGE, Code.INVALID_REQUEST)
_WORKER = (Code.UNKNOWN_WORKER, Code.NOT_REGISTERED, Code.SESSION_REPLACED, Code.INVALID_REQUEST)


def create_app(
    cluster: ClusterMaster,
    model_state: Any,
    max_body_bytes: int,
    status_token_free: bool = True,
    auth_token: str = "",
    on_shutdown: Optional[Callable[[], None]] = None,
) -> FastAPI:
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

    app = FastAPI(
        title="FLQ-Fed master",
        version="1",
        lifespan=lifespan,
        description="Federated learning with low-bit, lazy, budgeted uploads (FLQ). Rounds are counted "
        "from 1. A refusal is `{detail, code}`: " + "; ".join(f"{c.status} `{c}` ({c.meaning})" for c in Code) + ".",
    )
    app.state.cluster = cluster
    app.add_middleware(BodyLimit, limits={"/round/upload": max_body_bytes}, default=MAX_JSON_BODY)
    open_paths = {"/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"} | (
        {"/status"} if status_token_free else set()
    )
    app.add_middleware(BearerAuth, token=auth_token, open_paths=open_paths)  # outermost: runs first

    @app.exception_handler(MasterError)
    async def _master_error(request: Request, exc: MasterError):
        log.warning("%s %s refused (%d %s): %s", request.method, request.url.path, exc.status, exc.code, exc)
        return _error(exc.code, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(x) for x in first.get("loc", ()))
        detail = f"{where}: {first.get('msg', 'invalid')}".replace("\n", " ")
        log.warning("%s %s refused (422): %s", request.method, request.url.path, detail)
        return _error(Code.INVALID_REQUEST, detail)

    @app.exception_handler(RunFinished)
    async def _finished(request: Request, exc: RunFinished):
        return _error(Code.RUN_OVER, f"the run is over ({exc.reason}): exit", reason=exc.reason)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):  # no such path, or method
        code = {404: Code.NOT_FOUND, 405: Code.METHOD_NOT_ALLOWED}.get(exc.status_code, Code.INVALID_REQUEST)
        return _error(code, f"{request.method} {request.url.path}: {exc.detail}".replace("\n", " "))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # logged by uvicorn with its traceback
        return _error(
            Code.INTERNAL,
            f"{request.method} {request.url.path} failed inside the master: {type(exc).__name__}: {exc}".replace(
                "\n", " "
            )[:500],
        )

    def _account(up: int = 0, down: int = 0) -> None:
        cluster.master.add_wire_bytes(up=up, down=down)

    # ----- monitoring -----------------------------------------------------
    @app.get(
        "/status",
        response_model=StatusResponse,
        responses=_errors(*_ANY),
        summary="Run state, workers, last metrics, cumulative bits",
    )
    async def status() -> Dict[str, Any]:
        return cluster.status()

    @app.get(
        "/get_global_model",
        summary="The global model as safetensors",
        response_class=Response,
        responses={
            200: {
                "content": {OCTET: {}},
                "description": "the model after the last round done (X-FLQ-Round; 0: the initial model)",
            },
            **_errors(*_ANY),
        },
    )
    async def get_global_model() -> Response:
        from safetensors.torch import save

        theta = cluster.master.theta.copy()
        done = cluster.master.round  # rounds done: the 1-based number of the last round whose update theta holds
        tensors = model_state(theta)
        body = save(tensors, metadata={"round": str(done), "mode": cluster.cfg.mode, "format": "pt"})
        name = f"flq_global_round{done}.safetensors"
        return Response(
            body,
            media_type=OCTET,
            headers={"X-FLQ-Round": str(done), "Content-Disposition": f'attachment; filename="{name}"'},
        )

    @app.post(
        "/stop",
        response_model=StopResponse,
        responses=_errors(*_ANY, Code.TIMEOUT, Code.TOO_LARGE),
        summary="Stop after the current round",
    )
    async def stop() -> StopResponse:
        cluster.request_stop(outcome.STOPPED)
        await cluster.wake()
        return StopResponse(stopping=True, round=cluster.round_number, state=cluster.state)

    # ----- worker protocol ------------------------------------------------
    @app.get(
        "/config",
        response_model=ConfigResponse,
        responses=_errors(*_ANY),
        summary="The run's configuration (a worker reads it before it registers)",
    )
    async def run_config() -> ConfigResponse:
        return ConfigResponse(
            config=cluster.cfg.public_sections(), state=cluster.state, round=cluster.round_number, run=cluster.run_id
        )

    @app.post(
        "/workers/register",
        response_model=RegisterResponse,
        responses=_errors(*_ANY, *_BODY, Code.UNKNOWN_WORKER, Code.RUN_OVER),
    )
    async def register(req: RegisterRequest, request: Request) -> RegisterResponse:
        host = request.client.host if request.client else ""
        out = await cluster.register(
            req.worker_id, req.up_version, req.down_version, address=host, threads=req.threads, device=req.device
        )
        return RegisterResponse(config=cluster.cfg.public_sections(), **out)

    @app.post(
        "/workers/heartbeat",
        response_model=HeartbeatResponse,
        responses=_errors(*_ANY, *_BODY, *_WORKER, Code.RUN_OVER),
        summary="A worker's sign of life (every heartbeat_s)",
    )
    async def heartbeat(req: WorkerRequest, session: Optional[str] = SESSION) -> Dict[str, Any]:
        cluster.master.check_worker(req.worker_id)
        return cluster.heartbeat(req.worker_id, session)

    @app.post(
        "/workers/leave",
        response_model=OkResponse,
        responses=_errors(*_ANY, *_BODY, *_WORKER),
        summary="The worker exits on purpose; no round waits for it",
    )
    async def leave(req: WorkerRequest, session: Optional[str] = SESSION) -> Dict[str, Any]:
        cluster.master.check_worker(req.worker_id)
        await cluster.leave(req.worker_id, session)
        return {"ok": True}

    @app.get(
        "/workers/{worker_id}/mirrors",
        response_class=Response,
        responses={200: {"content": {OCTET: {}}}, **_errors(*_ANY, *_WORKER)},
    )
    async def mirrors(worker_id: int, session: Optional[str] = SESSION) -> Response:
        from safetensors.numpy import save

        cluster.master.check_worker(worker_id)
        ref_up, ref_down, up_v, down_v = cluster.mirrors(worker_id, session)
        body = save(
            {"ref_up": np.ascontiguousarray(ref_up), "ref_down": np.ascontiguousarray(ref_down)},
            metadata={"up_version": str(up_v), "down_version": str(down_v)},
        )
        return Response(body, media_type=OCTET)

    @app.get(
        "/round/model",
        response_class=Response,
        responses={
            200: {"content": {OCTET: {}}, "description": "the round's downlink; X-FLQ-Round: the round (1-based)"},
            204: {"description": "no round opened within wait seconds"},
            **_errors(*_ANY, *_WORKER, Code.RUN_OVER),
        },
    )
    async def round_model(
        worker_id: int = Query(ge=0),
        wait: float = Query(20.0, ge=0, le=MAX_WAIT_S),
        after: int = Query(0, ge=0, description="the last round (1-based) the worker has done; 0 for none"),
        session: Optional[str] = SESSION,
    ) -> Response:
        cluster.master.check_worker(worker_id)
        view = await cluster.fetch_round(worker_id, wait, session, after=round_index(after))
        if view is None:
            return Response(status_code=204)
        return Response(
            view.payload,
            media_type=OCTET,
            headers={
                "X-FLQ-Round": str(round_number(view.round)),
                "X-FLQ-MeK": repr(float(view.me_k)),
                "X-FLQ-Down-Version": str(view.down_version),
            },
        )

    @app.post(
        "/round/offer",
        response_model=OfferResponse,
        responses=_errors(
            *_ANY, *_BODY, *_WORKER, Code.MALFORMED, Code.LATE, Code.MIRROR_MISMATCH, Code.CONFLICT, Code.RUN_OVER
        ),
    )
    async def round_offer(
        req: OfferRequest,
        request: Request,
        wait: float = Query(20.0, ge=0, le=MAX_WAIT_S),
        session: Optional[str] = SESSION,
    ) -> Response:
        raw = await request.body()
        fields = req.model_dump()
        fields["loss"] = float("nan") if fields["loss"] is None else fields["loss"]
        fields["round"] = round_index(req.round)
        selected = await cluster.offer(Offer(**fields), session, wait_s=wait)
        body = json.dumps({"decided": selected is not None, "selected": bool(selected), "round": req.round}).encode()
        _account(up=len(raw), down=len(body))
        return Response(body, media_type="application/json")

    @app.post(
        "/round/upload",
        response_model=OkResponse,
        responses=_errors(*_ANY, *_BODY, *_WORKER, Code.MALFORMED, Code.LATE, Code.CONFLICT),
        openapi_extra={
            "requestBody": {"content": {OCTET: {"schema": {"type": "string", "format": "binary"}}}, "required": True}
        },
    )
    async def round_upload(
        request: Request,
        worker_id: int = Query(ge=0),
        round: int = Query(ge=1, description="the round uploaded for (1-based)"),
        session: Optional[str] = SESSION,
    ) -> Response:
        cluster.master.check_worker(worker_id)
        # BodyLimit has already refused bodies over max_body_bytes (413)
        await cluster.upload(worker_id, round_index(round), await request.body(), session)
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


async def serve(
    app: FastAPI,
    cluster: ClusterMaster,
    host: str,
    port: int,
    linger_s: float = 5.0,
    ssl_certfile: Optional[str] = None,
    ssl_keyfile: Optional[str] = None,
    sock: Any = None,
) -> None:
    """Run uvicorn (the app's lifespan runs the round loop) until the run
    ends, then ``linger_s`` seconds more, answering 410 to the workers that
    still call (so they learn the run is over), or until SIGINT/SIGTERM.
    ``sock``: an already listening socket to serve on (else ``host:port``)."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=5,
    )
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
