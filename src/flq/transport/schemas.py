"""The documents of the master's HTTP API: request and response models, and
the refusals each route documents in the OpenAPI document.

The routes themselves are in :mod:`flq.transport.server`; the codes and round
numbering both ends share are in :mod:`flq.protocol`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import ConfigFile
from ..protocol import Code, codes_by_status

#: The largest round or step count a progress report may carry.
MAX_COUNT = 10**9


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
    data: Optional[str] = Field(
        None,
        max_length=100,
        description="the worker's training set as '<samples>:<labels digest>'; the master refuses another "
        "(409 data_mismatch)",
    )
    model: Optional[List[Tuple[str, str, str, List[int]]]] = Field(
        None,
        max_length=10_000,
        description="every tensor of the worker's model, in state_dict() order: [name, 'param' or 'buffer', "
        "dtype, shape]; the master refuses one that differs from its own (409 model_mismatch)",
    )


class RegisterResponse(BaseModel):
    resync: bool = Field(description="the worker's mirror versions differ from the master's: fetch its mirrors")
    round: int = Field(description="the round in progress, or the next to open (1-based)")
    state: str
    session: str = Field(description="send back as the X-FLQ-Session header on every later call")
    heartbeat_s: float = Field(description="send POST /workers/heartbeat this often (seconds)")
    config: ConfigFile


class WorkerRequest(BaseModel):
    worker_id: int = Field(ge=0, strict=True, description="the worker's id m")


class ProgressReport(BaseModel):
    """What a worker is doing (monitoring only; shown in ``GET /status``)."""

    model_config = ConfigDict(extra="forbid")

    round: int = Field(
        ge=0, le=MAX_COUNT, strict=True, description="the round it is in, or did last while waiting (1-based; 0: none)"
    )
    phase: Literal["waiting", "training", "quantizing", "offering", "uploading"] = Field(  # PROGRESS_PHASES
        description="waiting (for the round's model), training, quantizing, offering (waiting for the selection), "
        "uploading"
    )
    done: int = Field(ge=0, le=MAX_COUNT, strict=True, description="local training steps (batches) done this round")
    total: int = Field(ge=0, le=MAX_COUNT, strict=True, description="local training steps of a round")
    seconds: float = Field(ge=0, le=1e9, allow_inf_nan=False, description="seconds in this phase so far")

    @model_validator(mode="after")
    def _done_of_total(self) -> ProgressReport:
        if self.done > self.total:
            raise ValueError(f"done {self.done} exceeds total {self.total}")
        return self


class HeartbeatRequest(WorkerRequest):
    progress: Optional[ProgressReport] = Field(
        None, description="the worker's progress (sent with every heartbeat by workers that report it)"
    )


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
    stopping: bool = Field(description="true: the run stops after the current round; false: it is already over")
    round: int = Field(description="the round in progress, or the next (1-based); the last once the run is over")
    state: str


class ConfigResponse(BaseModel):
    config: ConfigFile = Field(description="the run's configuration by section (token masked)")
    state: Literal["waiting", "training", "stopping", "finished"]
    round: int = Field(description="the round in progress, or the next (1-based); the last once the run is over")
    run: str = Field(
        description="the run's id (the stamp of its log and checkpoint); a worker's saved state belongs to one run"
    )


class ChallengeResponse(BaseModel):
    challenge: str = Field(
        description="send as the X-FLQ-Session header of the next POST /workers/register (once, within expires_s)"
    )
    expires_s: float = Field(description="seconds the challenge stays valid")
    required: bool = Field(description="the master checks per-worker credentials")


class WorkerProgress(BaseModel):
    """A worker's last progress report, as ``GET /status`` shows it."""

    round: int = Field(description="the round it was in (1-based), or did last while waiting; 0: none yet")
    phase: str = Field(description="waiting, training, quantizing, offering or uploading")
    batches_done: int = Field(description="local training steps (batches) done in that round")
    batches_total: int = Field(description="local training steps of a round")
    seconds_in_phase: float = Field(description="seconds it had been in the phase when it reported")
    seconds_since_report: float = Field(description="seconds since the master received the report")


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
    progress: Optional[WorkerProgress] = Field(
        None, description="the worker's last progress report (null: none; workers before this version send none)"
    )


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
    b_up: int = Field(description="uplink bits; with adaptive_width the widest of the widths 2..b_up")
    adaptive_width: bool
    b_down: int
    entropy_coding: Literal["both", "up", "down", "none"] = Field(description="the links sending wire format 2")
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
    requests: Dict[str, int] = Field(
        default_factory=dict,
        description='HTTP requests served so far, by "METHOD /path" ("other": paths with parameters, unknown paths)',
    )
    state_digest: Optional[str] = Field(None, description="with ?digest=true: SHA-256 over the master's whole state")


def refusals(*codes: Code) -> Dict[int, Dict[str, Any]]:
    """OpenAPI ``responses`` for the refusals a route can answer: per status,
    :class:`ErrorResponse` and the codes it may carry."""
    return {
        status: {"model": ErrorResponse, "description": "Refused: " + "; ".join(f"`{c}`: {c.meaning}" for c in group)}
        for status, group in codes_by_status(codes).items()
    }


#: The refusals of every route (the token; an error inside the master), of
#: every POST (its body), and of every call that names a registered worker.
ANY_ROUTE = (Code.UNAUTHORIZED, Code.INTERNAL)
BODY = (Code.TIMEOUT, Code.TOO_LARGE, Code.INVALID_REQUEST)
#: With per-worker credentials, every worker call can also meet these.
SIGNED = (Code.BAD_SIGNATURE, Code.WRONG_WORKER, Code.REPLAYED)
WORKER_CALL = (
    Code.UNKNOWN_WORKER,
    Code.NOT_REGISTERED,
    Code.SESSION_REPLACED,
    Code.INVALID_REQUEST,
    Code.NO_SESSION,
    *SIGNED,
)
