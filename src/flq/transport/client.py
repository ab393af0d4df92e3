"""The worker's HTTP client: carries :class:`~flq.worker.Worker` messages to
and from the master (:mod:`flq.transport.server`), retrying with backoff
while the master is unreachable. No algorithm here."""
from __future__ import annotations

import logging
import random
import ssl
import time
from typing import Any, Callable, Dict, Optional

import httpx

from ..messages import Offer

log = logging.getLogger(__name__)


class MasterGone(Exception):
    """The run is over (410) or the master stayed unreachable too long."""


class Refused(Exception):
    """The master refused a call with a 4xx; ``status`` and ``detail`` say why."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class MasterClient:
    """HTTP calls of one worker.

    Args:
        base_url: ``http://IP:PORT`` (or https).
        worker_id: m.
        auth_token: bearer token ('' for none).
        verify: TLS verification (True, False or a CA file path).
        give_up_s: stop retrying after the master was unreachable this long.
        poll_s: long-poll duration asked of the master for the next round.
    """

    def __init__(self, base_url: str, worker_id: int, auth_token: str = "", verify: Any = True,
                 give_up_s: float = 300.0, poll_s: float = 20.0) -> None:
        headers = {"Authorization": f"Bearer {auth_token}"} if auth_token else {}
        if isinstance(verify, str):  # a CA file for the master's certificate
            verify = ssl.create_default_context(cafile=verify)
        self.http = httpx.Client(base_url=base_url, headers=headers, verify=verify,
                                 timeout=httpx.Timeout(connect=5.0, read=None, write=60.0, pool=5.0))
        self.worker_id = worker_id
        self.give_up_s = give_up_s
        self.poll_s = poll_s
        self.bytes_sent = 0
        self.bytes_received = 0
        self.session = ""

    def close(self) -> None:
        self.http.close()

    # ----- plumbing -------------------------------------------------------
    def _call(self, method: str, url: str, **kw) -> httpx.Response:
        """One request, retried with exponential backoff (0.5 s .. 10 s, jittered)
        on connection errors and 5xx until ``give_up_s``; 410 -> MasterGone;
        other 4xx -> Refused."""
        delay, first_failure = 0.5, None
        if self.session:
            kw["headers"] = {**kw.get("headers", {}), "X-FLQ-Session": self.session}
        while True:
            try:
                r = self.http.request(method, url, **kw)
            except httpx.TransportError as exc:
                r, err = None, exc
            else:
                err = None
                if r.status_code < 500:
                    break
            now = time.monotonic()
            first_failure = first_failure or now
            if now - first_failure > self.give_up_s:
                raise MasterGone(f"master unreachable for {self.give_up_s:.0f} s ({err or r.status_code})")
            log.warning("master call %s %s failed (%s); retrying in %.1f s", method, url,
                        err or f"HTTP {r.status_code}", delay)
            time.sleep(delay * (0.8 + 0.4 * random.random()))
            delay = min(delay * 2, 10.0)
        self.bytes_received += len(r.content)
        if r.status_code == 410:
            raise MasterGone("the master says the run is over")
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            if r.status_code == 409 and "session replaced" in str(detail):
                raise MasterGone(f"{detail} (this process stops; the newer one trains)")
            raise Refused(r.status_code, str(detail))
        return r

    # ----- protocol -------------------------------------------------------
    def config(self) -> Dict[str, Any]:
        """``GET /config`` -> ``{config, state, round}`` (retried until the master answers)."""
        return self._call("GET", "/config").json()

    def register(self, up_version: int, down_version: int) -> Dict[str, Any]:
        """``POST /workers/register`` -> ``{resync, round, state, config}``."""
        body = {"worker_id": self.worker_id, "up_version": up_version, "down_version": down_version}
        self.session = ""
        info = self._call("POST", "/workers/register", json=body).json()
        self.session = info.get("session", "")
        return info

    def mirrors(self):
        """``GET /workers/{m}/mirrors`` -> (ref_up, ref_down, up_version, down_version)."""
        from safetensors.numpy import load

        r = self._call("GET", f"/workers/{self.worker_id}/mirrors")
        tensors = load(r.content)
        meta = _safetensors_metadata(r.content)
        return tensors["ref_up"], tensors["ref_down"], int(meta["up_version"]), int(meta["down_version"])

    def next_round(self) -> Optional[tuple]:
        """Long-poll ``GET /round/model``: (k, me_k, downlink bytes) or None."""
        r = self._call("GET", "/round/model", params={"worker_id": self.worker_id, "wait": self.poll_s})
        if r.status_code == 204:
            return None
        return int(r.headers["X-FLQ-Round"]), float(r.headers["X-FLQ-MeK"]), r.content

    def offer(self, offer: Offer) -> bool:
        """``POST /round/offer``; blocks until the selection; True when selected."""
        r = self._call("POST", "/round/offer", json=offer.to_dict())
        self.bytes_sent += len(r.request.content)
        return bool(r.json()["selected"])

    def upload(self, round_index: int, payload: bytes) -> None:
        """``POST /round/upload`` with the encoded update."""
        self._call("POST", "/round/upload", params={"worker_id": self.worker_id, "round": round_index},
                   content=payload, headers={"Content-Type": "application/octet-stream"})
        self.bytes_sent += len(payload)


def _safetensors_metadata(blob: bytes) -> Dict[str, str]:
    import json
    import struct

    (n,) = struct.unpack_from("<Q", blob)
    return json.loads(blob[8:8 + n]).get("__metadata__", {})


def run_worker(client: MasterClient, make_worker: Callable[[Dict[str, Any]], Any],
               before_upload: Optional[Callable[[int], bool]] = None) -> int:
    """The worker loop: register, then per round fetch -> offer -> upload or skip.

    The worker is built (data loaded, partition made) from ``GET /config``
    before it registers, so the master never waits on a worker's start-up.

    Args:
        client: the HTTP client.
        make_worker: builds the :class:`~flq.worker.Worker` from the run's
            config sections.
        before_upload: test hook; returning False drops the upload after the
            worker committed it (a lost upload).

    Returns:
        Rounds in which this worker offered.
    """
    worker = make_worker(client.config()["config"])
    info = client.register(worker.up_version, worker.down_version)
    if info["resync"]:
        _resync(client, worker)
    offered, last_round = 0, None
    while True:
        try:
            got = client.next_round()
        except MasterGone as exc:
            log.info("worker %d: %s; exiting", client.worker_id, exc)
            return offered
        except Refused as exc:
            if exc.status == 404:  # the master restarted and forgot us: register again
                info = client.register(worker.up_version, worker.down_version)
                if info["resync"]:
                    _resync(client, worker)
                continue
            raise
        if got is None:
            continue
        k, me_k, payload = got
        if last_round is not None:
            for _ in range(max(0, k - last_round - 1)):  # rounds missed while absent (SPEC.md step 8)
                worker.skip(-1)
        last_round = k
        offer = worker.offer(k, me_k, payload)
        try:
            selected = client.offer(offer)
        except Refused as exc:
            log.warning("worker %d: offer for round %d refused: %s", client.worker_id, k, exc.detail)
            worker.skip(k)
            if "mirror versions" in exc.detail:
                _resync(client, worker)
            continue
        except MasterGone:
            return offered
        offered += 1
        if not selected:
            worker.skip(k)
            log.debug("worker %d: round %d not selected (candidate %s)", client.worker_id, k, offer.candidate)
            continue
        body = worker.upload(k)
        if before_upload is not None and not before_upload(k):
            log.warning("worker %d: upload of round %d dropped (test hook)", client.worker_id, k)
            continue
        try:
            client.upload(k, body)
        except Refused as exc:
            log.warning("worker %d: upload for round %d refused: %s", client.worker_id, k, exc.detail)
        except MasterGone:
            return offered
        log.debug("worker %d: round %d uploaded %d bytes", client.worker_id, k, len(body))


def _resync(client: MasterClient, worker) -> None:
    ref_up, ref_down, up_v, down_v = client.mirrors()
    worker.resync(ref_up, ref_down, up_v, down_v)
    log.info("worker %d: mirrors resynchronized (up v%d, down v%d)", client.worker_id, up_v, down_v)
