"""The dashboard page and the Prometheus metrics over HTTP, for the master
and for ``flq simulate --serve``.

- ``GET /``: the dashboard page (HTML); its script and styles are under
  ``/dashboard/static/`` (served from this package: no CDN, no build step;
  the charting library is vendored, see ``static/vendor/VENDOR.json``).
- ``GET /dashboard/state?rounds_since=&evals_since=&config=``: the page's
  data (:meth:`flq.monitor.RunMonitor.document`), only the rounds and
  evaluations the page does not have yet (the configuration only when
  asked); polls with the same counts within ``STATE_TTL_S`` get the same
  answer, so ten pages cost the master about what one does.
- ``GET /metrics``: Prometheus text format (the official client).

The page polls ``/dashboard/state`` once a second (every 5 s while its tab
is hidden), rather than holding a server-sent event stream open: a poll is
one short request that costs the master what changed since the last one, it
needs no connection kept per viewer (nothing holds the server's shutdown
open when the run ends), and the page keeps the last state it got when the
server is gone. With ``auth_token`` set the page, its state and ``/metrics``
need the token: ``Authorization: Bearer`` (Prometheus' ``authorization``
setting) or the cookie that ``GET /?token=<token>`` sets
(:class:`~flq.transport.middleware.BearerAuth`).

This module knows nothing of quantization: it serves the documents the
monitor makes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from fastapi import FastAPI, Query
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

log = logging.getLogger("flq.transport.server")

STATIC = Path(__file__).with_name("static")
#: Where the page's script, styles and vendored library are served.
STATIC_PREFIX = "/dashboard/static"
#: Paths a browser may reach with the dashboard cookie instead of a bearer token.
BROWSER_PATHS = ("/", "/dashboard/state", "/metrics", "/status", "/stop", "/get_global_model")
#: Seconds a state document answers the polls with the same counts (pages poll once a second).
STATE_TTL_S = 0.5
#: The page may load and call nothing but this server: no inline script, no other origin.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


def add_dashboard(app: FastAPI, monitor: Any, registry: Any) -> None:
    """Add ``GET /``, ``/dashboard/static/*``, ``GET /dashboard/state`` and
    ``GET /metrics`` to ``app``; ``monitor`` (:class:`flq.monitor.RunMonitor`)
    is registered as a collector of the Prometheus ``registry``."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    registry.register(monitor)
    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC), name="dashboard-static")
    page = (STATIC / "index.html").read_bytes()
    headers = {"Content-Security-Policy": CSP, "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}

    @app.get("/", response_class=HTMLResponse, summary="The dashboard page", tags=["dashboard"])
    async def dashboard_page() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=headers)

    answers: Dict[Tuple[int, int, bool], Tuple[float, bytes]] = {}

    @app.get("/dashboard/state", summary="The dashboard's data since what the page has", tags=["dashboard"])
    async def dashboard_state(
        rounds_since: int = Query(0, ge=0, description="rounds the page already has"),
        evals_since: int = Query(0, ge=0, description="evaluations the page already has"),
        config: bool = Query(False, description="add the run's configuration (the page asks once)"),
    ) -> Response:
        # many pages poll with the same counts: one document per STATE_TTL_S serves them all
        key, now = (rounds_since, evals_since, config), time.monotonic()
        hit = answers.get(key)
        if hit is None or now - hit[0] > STATE_TTL_S:
            body = json.dumps(monitor.document(rounds_since, evals_since, config), separators=(",", ":")).encode()
            if len(answers) > 64:
                answers.clear()
            answers[key] = hit = (now, body)
        return Response(hit[1], media_type="application/json", headers={"Cache-Control": "no-store"})

    @app.get("/metrics", summary="Prometheus metrics (text format)", tags=["dashboard"], response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def simulation_app(monitor: Any, run: Any, auth_token: str = "") -> FastAPI:
    """The dashboard of a simulation (``flq simulate --serve``): the page,
    its state, ``/metrics``, ``GET /status`` and ``POST /stop`` (stop after
    the round in progress, reason ``stopped``); nothing else, since the
    workers are in the process.

    Args:
        monitor: the run's :class:`flq.monitor.RunMonitor`.
        run: its :class:`flq.monitor.LocalRun`.
        auth_token: the token the page and ``/metrics`` need ('' = none).
    """
    from prometheus_client import CollectorRegistry

    from .middleware import BearerAuth, RequestMetrics, SameOrigin, add_error_handlers

    app = FastAPI(title="FLQ-Fed simulation", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)  # refusals as the master's: {detail, code}
    registry = CollectorRegistry()
    add_dashboard(app, monitor, registry)

    @app.get("/status", summary="Run state, workers, bits")
    async def status() -> JSONResponse:
        return JSONResponse(run.status())

    @app.post("/stop", summary="Stop after the round in progress")
    async def stop() -> JSONResponse:
        over = run.state == "finished"
        if not over:
            run.request_stop()
        st = run.status()
        return JSONResponse({"stopping": not over, "round": st["round"], "state": st["state"]})

    app.state.requests = {}
    routes = {r.path for r in app.routes if "{" not in getattr(r, "path", "{")}
    app.add_middleware(
        BearerAuth, token=auth_token, open_paths=(), browser_paths=BROWSER_PATHS, open_prefixes=(STATIC_PREFIX + "/",)
    )
    app.add_middleware(SameOrigin)
    app.add_middleware(RequestMetrics, paths=routes, counts=app.state.requests, registry=registry)
    return app


class BackgroundServer:
    """uvicorn serving ``app`` on an already listening socket, in a daemon
    thread (the simulation's round loop keeps the main thread and its
    signals).

    Args:
        app: the ASGI application.
        sock: a listening socket (:func:`flq.nodes.listen_on`).
    """

    def __init__(self, app: Any, sock: Any) -> None:
        import uvicorn

        self.sock = sock
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, timeout_keep_alive=5, timeout_graceful_shutdown=1
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="flq-dashboard", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self.sock]))
        except Exception:  # noqa: BLE001 - the dashboard must never end the run
            log.exception("the dashboard server failed; the run goes on without it")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the server to exit and wait at most ``timeout_s`` seconds for it."""
        self.server.should_exit = True
        self.thread.join(timeout_s)
        self.sock.close()


def page_url(scheme: str, host: str, port: int, sock: Optional[Any] = None) -> str:
    """The dashboard's address to print: a wildcard host shown as loopback."""
    if sock is not None:
        port = sock.getsockname()[1]
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in shown:
        shown = f"[{shown}]"
    return f"{scheme}://{shown}:{port}/"
