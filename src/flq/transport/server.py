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
- ``GET /``: the dashboard page; ``GET /dashboard/state``: its data;
  ``GET /metrics``: Prometheus metrics (:mod:`flq.transport.dashboard`).

The worker protocol (binary bodies for vectors, JSON for the rest):

- ``GET /config`` -> ``{config, state, round, run}``: the run's
  configuration, read before registering (so a worker loads its data first
  and the rounds need not wait for that), the round in progress, and the
  run's id (a worker's saved state is of one run).
- ``POST /workers/register`` ``{worker_id, up_version, down_version,
  threads, device}`` -> ``{resync, round, state, session, heartbeat_s,
  config}``.
- ``POST /workers/heartbeat`` ``{worker_id, progress}``: a sign of life
  every ``heartbeat_s`` seconds (a worker not heard from for
  ``worker_timeout_s`` is absent), with the worker's progress, optional:
  ``{round, phase, done, total, seconds}`` (shown in ``/status``; a report
  that cannot be true is refused, 422 or 400, and changes nothing);
  ``POST /workers/leave`` ``{worker_id}``: the worker exits on purpose.
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
- ``POST /round/upload?worker_id=&round=&up_version=&down_version=`` with
  the encoded update (only the selected; the same bytes again are accepted
  and counted once; the versions are those of the worker's offer).

- ``GET /workers/challenge?worker_id=`` -> ``{challenge, expires_s,
  required}``: with per-worker credentials, the one-time value a
  registration sends as its ``X-FLQ-Session``.

Every worker call after registration carries the ``X-FLQ-Session`` header its
registration returned (401 ``no_session`` without it). With per-worker
credentials (:mod:`flq.credentials`) every worker call is also signed
(``X-FLQ-Worker``, ``X-FLQ-Seq``, ``X-FLQ-Signature``), checked by
:class:`~flq.transport.middleware.WorkerAuth` before the route runs, and each
route checks that the call acts for the worker that signed it.

A refusal is an HTTP status with the JSON body ``{"detail", "code"}``
(:class:`ErrorResponse`): ``detail`` is one line for a person, ``code`` one of
:class:`flq.protocol.Code` for a program (each code has one status; 410
``run_over`` adds the run's ``reason``). Every route documents in the OpenAPI
document (``/openapi.json``) each status it can answer, with its codes. This
module knows nothing of quantization: vectors are opaque bytes that
:class:`~flq.cluster.ClusterMaster` hands to the algorithm.

Why one module of this size: it is the routes, one per API call, each with its
OpenAPI ``responses``; the request and response models are in
:mod:`flq.transport.schemas` and the middleware in
:mod:`flq.transport.middleware`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
from typing import Any, Callable, Dict, Optional

import numpy as np
from fastapi import FastAPI, Header, Query, Request
from fastapi.responses import Response

from .. import outcome
from ..cluster import FINISHED, ClusterMaster, RunFinished
from ..credentials import CHALLENGE_TTL_S, Verifier
from ..master import MasterError
from ..messages import Offer, Progress
from ..protocol import Code, round_index, round_number
from .dashboard import BROWSER_PATHS, STATIC_PREFIX, add_dashboard
from .middleware import (
    SCOPE_WORKER,
    BearerAuth,
    BodyLimit,
    RequestMetrics,
    SameOrigin,
    WorkerAuth,
    add_error_handlers,
    error_response,
)
from .schemas import (
    ANY_ROUTE,
    BODY,
    SIGNED,
    WORKER_CALL,
    ChallengeResponse,
    ConfigResponse,
    HeartbeatRequest,
    HeartbeatResponse,
    OfferRequest,
    OfferResponse,
    OkResponse,
    RegisterRequest,
    RegisterResponse,
    StatusResponse,
    StopResponse,
    WorkerRequest,
    refusals,
)

log = logging.getLogger(__name__)

OCTET = "application/octet-stream"

#: The worker's registration session: mandatory on every worker call after registration (checked by ``in_session``).
SESSION = Header(None, alias="X-FLQ-Session", max_length=64)
#: Largest JSON request body (register, offer): far above any real one (a
#: registration lists every tensor of the model, ~70 bytes each).
MAX_JSON_BODY = 1024 * 1024
#: Longest long-poll a worker may ask for (``wait``), seconds.
MAX_WAIT_S = 120.0


def create_app(
    cluster: ClusterMaster,
    model_state: Any,
    max_body_bytes: int,
    status_token_free: bool = True,
    auth_token: str = "",
    on_shutdown: Optional[Callable[[], None]] = None,
    verifier: Optional[Verifier] = None,
    monitor: Any = None,
) -> FastAPI:
    """The FastAPI application of one master.

    Args:
        cluster: the round protocol object.
        model_state: ``callable(theta, buffers) -> {name: torch.Tensor}`` for ``/get_global_model``.
        max_body_bytes: largest upload body accepted (413 beyond).
        status_token_free: ``GET /status`` needs no token.
        auth_token: bearer token required on worker calls and ``/stop`` ('' = none).
        on_shutdown: called when the server shuts down (SIGINT/SIGTERM included),
            before uvicorn re-raises the signal: where results get written.
        verifier: per-worker credentials (:class:`flq.credentials.Verifier`):
            every worker call must be signed by the worker it acts for, and
            needs no bearer token; None: the bearer token alone.
        monitor: the run's :class:`flq.monitor.RunMonitor`: adds the
            dashboard (``GET /``) and ``GET /metrics``
            (:mod:`flq.transport.dashboard`); None: neither.
    """
    from prometheus_client import CollectorRegistry

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
    if verifier is not None:
        app.add_middleware(WorkerAuth, verifier=verifier)  # innermost: sees the whole body, within its limit
    app.add_middleware(BodyLimit, limits={"/round/upload": max_body_bytes}, default=MAX_JSON_BODY)
    open_paths = {"/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"} | (
        {"/status"} if status_token_free else set()
    )
    app.add_middleware(
        BearerAuth,
        token=auth_token,
        open_paths=open_paths,
        signed_workers=verifier is not None,
        browser_paths=BROWSER_PATHS,
        open_prefixes=(STATIC_PREFIX + "/",),
    )
    # before the token: another site's page is refused whatever it holds
    app.add_middleware(SameOrigin, names=(cluster.cfg.master_host,))
    app.state.requests, routes = {}, set()  # routes: filled below, once they are declared
    app.state.registry = registry = CollectorRegistry()  # this app's own: several masters can share a process
    # outermost: refused requests count too
    app.add_middleware(RequestMetrics, paths=routes, counts=app.state.requests, registry=registry)
    if monitor is not None:
        add_dashboard(app, monitor, registry)

    def acting_as(request: Request, worker_id: int) -> None:
        """Check the id a worker call acts for: one of the run's, and (with
        credentials) the one that signed it.

        Raises:
            MasterError: 404 ``unknown_worker``; 403 ``wrong_worker``.
        """
        cluster.master.check_worker(worker_id)
        proved = request.scope.get(SCOPE_WORKER)
        if proved is not None and proved != worker_id:
            raise MasterError(
                f"the call is signed by worker {proved} but acts for worker {worker_id}", Code.WRONG_WORKER
            )

    def in_session(request: Request, worker_id: int, session: Optional[str]) -> str:
        """:func:`acting_as`, then the session every call after registration carries.

        Raises:
            MasterError: as :func:`acting_as`; 401 ``no_session``.
        """
        acting_as(request, worker_id)
        if not session:
            raise MasterError(
                "a worker call without the X-FLQ-Session header: register, then send the session it returned",
                Code.NO_SESSION,
            )
        return session

    @app.exception_handler(MasterError)
    async def _master_error(request: Request, exc: MasterError):
        log.warning("%s %s refused (%d %s): %s", request.method, request.url.path, exc.status, exc.code, exc)
        return error_response(exc.code, str(exc))

    @app.exception_handler(RunFinished)
    async def _finished(request: Request, exc: RunFinished):
        return error_response(Code.RUN_OVER, f"the run is over ({exc.reason}): exit", reason=exc.reason)

    add_error_handlers(app)

    def _account(up: int = 0, down: int = 0) -> None:
        cluster.master.add_wire_bytes(up=up, down=down)

    # ----- monitoring -----------------------------------------------------
    @app.get(
        "/status",
        response_model=StatusResponse,
        responses=refusals(*ANY_ROUTE, Code.INVALID_REQUEST),
        summary="Run state, workers, last metrics, cumulative bits",
    )
    async def status(
        digest: bool = Query(
            False,
            description="add state_digest: SHA-256 over the master's whole state (model, optimizer, mirrors, "
            "random streams, the round's offers and uploads); equal digests mean nothing changed (costs ~0.1 s)",
        ),
    ) -> Dict[str, Any]:
        out = cluster.status()
        out["requests"] = dict(app.state.requests)
        if digest:
            out["state_digest"] = cluster.master.state_digest()
        return out

    @app.get(
        "/get_global_model",
        summary="The global model as safetensors",
        response_class=Response,
        responses={
            200: {
                "content": {OCTET: {}},
                "description": "the model after the last round done (X-FLQ-Round; 0: the initial model)",
            },
            **refusals(*ANY_ROUTE),
        },
    )
    async def get_global_model() -> Response:
        from safetensors.torch import save

        # rounds done (the 1-based number of the last round theta holds) and theta, read together: a download
        # during a round's close gets the model before or after it, never a mix
        done, theta, buffers = cluster.master.snapshot()
        tensors = model_state(theta, buffers)
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
        responses=refusals(*ANY_ROUTE, Code.TIMEOUT, Code.TOO_LARGE, Code.CROSS_ORIGIN),
        summary="Stop after the current round",
    )
    async def stop() -> StopResponse:
        over = cluster.state == FINISHED
        if not over:
            cluster.request_stop(outcome.STOPPED)
            await cluster.wake()
        return StopResponse(stopping=not over, round=cluster.round_number, state=cluster.state)

    # ----- worker protocol ------------------------------------------------
    @app.get(
        "/config",
        response_model=ConfigResponse,
        responses=refusals(*ANY_ROUTE, Code.BAD_SIGNATURE, Code.UNKNOWN_WORKER),
        summary="The run's configuration (a worker reads it before it registers)",
    )
    async def run_config() -> ConfigResponse:
        return ConfigResponse(
            config=cluster.cfg.public_sections(), state=cluster.state, round=cluster.round_number, run=cluster.run_id
        )

    @app.get(
        "/workers/challenge",
        response_model=ChallengeResponse,
        responses=refusals(
            *ANY_ROUTE, Code.BAD_SIGNATURE, Code.WRONG_WORKER, Code.UNKNOWN_WORKER, Code.INVALID_REQUEST
        ),
        summary="A one-time challenge for the next registration (per-worker credentials)",
    )
    async def challenge(request: Request, worker_id: int = Query(ge=0)) -> ChallengeResponse:
        acting_as(request, worker_id)
        if verifier is None:
            return ChallengeResponse(challenge="", expires_s=0.0, required=False)
        return ChallengeResponse(
            challenge=verifier.issue_challenge(worker_id), expires_s=CHALLENGE_TTL_S, required=True
        )

    @app.post(
        "/workers/register",
        response_model=RegisterResponse,
        responses=refusals(
            *ANY_ROUTE, *BODY, *SIGNED, Code.UNKNOWN_WORKER, Code.RUN_OVER, Code.MODEL_MISMATCH, Code.DATA_MISMATCH
        ),
    )
    async def register(req: RegisterRequest, request: Request) -> RegisterResponse:
        acting_as(request, req.worker_id)
        host = request.client.host if request.client else ""
        out = await cluster.register(
            req.worker_id,
            req.up_version,
            req.down_version,
            address=host,
            threads=req.threads,
            device=req.device,
            model=req.model,
            data=req.data,
        )
        return RegisterResponse(config=cluster.cfg.public_sections(), **out)

    @app.post(
        "/workers/heartbeat",
        response_model=HeartbeatResponse,
        responses=refusals(*ANY_ROUTE, *BODY, *WORKER_CALL, Code.MALFORMED, Code.RUN_OVER),
        summary="A worker's sign of life (every heartbeat_s), with its progress",
    )
    async def heartbeat(req: HeartbeatRequest, request: Request, session: Optional[str] = SESSION) -> Dict[str, Any]:
        session = in_session(request, req.worker_id, session)
        progress = None
        if req.progress is not None:
            p = req.progress
            progress = Progress(round_index(p.round), p.phase, p.done, p.total, p.seconds)
        return cluster.heartbeat(req.worker_id, session, progress=progress)

    @app.post(
        "/workers/leave",
        response_model=OkResponse,
        responses=refusals(*ANY_ROUTE, *BODY, *WORKER_CALL),
        summary="The worker exits on purpose; no round waits for it",
    )
    async def leave(req: WorkerRequest, request: Request, session: Optional[str] = SESSION) -> Dict[str, Any]:
        session = in_session(request, req.worker_id, session)
        await cluster.leave(req.worker_id, session)
        return {"ok": True}

    @app.get(
        "/workers/{worker_id}/mirrors",
        response_class=Response,
        responses={200: {"content": {OCTET: {}}}, **refusals(*ANY_ROUTE, *WORKER_CALL)},
    )
    async def mirrors(worker_id: int, request: Request, session: Optional[str] = SESSION) -> Response:
        from safetensors.numpy import save

        session = in_session(request, worker_id, session)
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
            **refusals(*ANY_ROUTE, *WORKER_CALL, Code.RUN_OVER),
        },
    )
    async def round_model(
        request: Request,
        worker_id: int = Query(ge=0),
        wait: float = Query(20.0, ge=0, le=MAX_WAIT_S),
        after: int = Query(0, ge=0, description="the last round (1-based) the worker has done; 0 for none"),
        session: Optional[str] = SESSION,
    ) -> Response:
        session = in_session(request, worker_id, session)
        view = await cluster.fetch_round(worker_id, wait, session, after=round_index(after))
        if view is None:
            return Response(status_code=204)
        return Response(
            view.payload,
            media_type=OCTET,
            headers={
                "X-FLQ-Round": str(round_number(view.round)),
                "X-FLQ-MeK": repr(float(view.me_k)),
            },
        )

    @app.post(
        "/round/offer",
        response_model=OfferResponse,
        responses=refusals(
            *ANY_ROUTE,
            *BODY,
            *WORKER_CALL,
            Code.MALFORMED,
            Code.LATE,
            Code.NOT_OPEN,
            Code.MIRROR_MISMATCH,
            Code.CONFLICT,
            Code.RUN_OVER,
        ),
    )
    async def round_offer(
        req: OfferRequest,
        request: Request,
        wait: float = Query(20.0, ge=0, le=MAX_WAIT_S),
        session: Optional[str] = SESSION,
    ) -> Response:
        session = in_session(request, req.worker_id, session)
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
        responses=refusals(
            *ANY_ROUTE, *BODY, *WORKER_CALL, Code.MALFORMED, Code.LATE, Code.NOT_OPEN, Code.CONFLICT, Code.RUN_OVER
        ),
        openapi_extra={
            "requestBody": {"content": {OCTET: {"schema": {"type": "string", "format": "binary"}}}, "required": True}
        },
    )
    async def round_upload(
        request: Request,
        worker_id: int = Query(ge=0),
        round: int = Query(ge=1, description="the round uploaded for (1-based)"),
        up_version: Optional[int] = Query(None, ge=0, description="the worker's ref_up version (as in its offer)"),
        down_version: Optional[int] = Query(None, ge=0, description="the worker's ref_down version"),
        session: Optional[str] = SESSION,
    ) -> Response:
        session = in_session(request, worker_id, session)
        # BodyLimit has already refused bodies over max_body_bytes (413)
        versions = None if up_version is None or down_version is None else (up_version, down_version)
        body = b'{"ok":true}'  # counted with the payload, before the round can close on it
        await cluster.upload(
            worker_id, round_index(round), await request.body(), session, versions=versions, answer_bytes=len(body)
        )
        return Response(body, media_type="application/json")

    routes.update(r.path for r in app.routes if "{" not in getattr(r, "path", "{"))
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
    ssl_cafile: Optional[str] = None,
) -> None:
    """Run uvicorn (the app's lifespan runs the round loop) until the run
    ends, then ``linger_s`` seconds more, answering 410 to the workers that
    still call (so they learn the run is over), or until SIGINT/SIGTERM.
    ``sock``: an already listening socket to serve on (else ``host:port``).
    ``ssl_cafile``: require a client certificate signed by this CA (mutual TLS)."""
    import ssl

    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        ssl_ca_certs=ssl_cafile,
        ssl_cert_reqs=ssl.CERT_REQUIRED if ssl_cafile else ssl.CERT_NONE,
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
        served = getattr(app.state, "requests", {})
        log.info("HTTP requests served: %s", ", ".join(f"{k} {v}" for k, v in sorted(served.items())) or "none")
