"""A worker's progress during a long local training: in its own log, in the
master's ``GET /status`` and in the master's "still waiting" lines, so that a
slow round can be told from a hung one. A real master and a real worker
process on loopback; the local training is made slow by the model itself (a
model of the user's, by import path, that sleeps in each training forward).
Malformed progress reports from a registered worker are refused with a 4xx
and change nothing."""

from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import pytest
from cluster_util import start_cluster

from flq.messages import Progress

STEPS = 300  # local steps of the round: 300 x 50 ms of sleep, at least 15 s of training
SLOW_MODEL = """
import time

import torch


class Slow(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(784, 10)

    def forward(self, x):
        if torch.is_grad_enabled():  # a training step, not an evaluation
            time.sleep(0.05)
        return self.fc(x.flatten(1))


def make():
    return Slow()
"""


def _log(root, name: str) -> str:
    return "".join(p.read_text(errors="replace") for p in (root / "logs").glob(f"{name}_*.log"))


def _wait_for(what, predicate, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_progress_of_a_long_local_training_reaches_the_worker_log_status_and_waiting_lines(tmp_path, fmnist_available):
    (tmp_path / "slowmodel.py").write_text(SLOW_MODEL)
    cluster = start_cluster(
        tmp_path,
        2,
        {
            "model": "slowmodel:make",
            "local_steps": STEPS,
            "rounds": 1,
            "partition": "iid",
            "min_workers": 1,
            "round_timeout_s": 5,  # the first "still waiting" line comes 5 s into the training
            "quorum_timeout_s": 600,
            "worker_timeout_s": 4.5,  # heartbeat (and progress report) every 1.5 s
            "checkpoint_every": 0,
        },
        start_workers=False,
    )
    try:
        t0 = time.monotonic()
        worker = cluster.start_worker(0)

        def training(st):
            w = {x["worker_id"]: x for x in st["workers"]}.get(0)
            p = w and w["progress"]
            return p and p["phase"] == "training" and 0 < p["batches_done"] < p["batches_total"]

        st = cluster.wait_status(training, timeout=180, what="worker 0's progress in training")
        (w0,) = st["workers"]
        p = w0["progress"]
        assert p["round"] == 1 and p["batches_total"] == STEPS, p
        assert 0 <= p["seconds_since_report"] < 10 and p["seconds_in_phase"] >= 0, p
        later = cluster.wait_status(
            lambda s: s["workers"][0]["progress"]["batches_done"] > p["batches_done"], timeout=60, what="more batches"
        )
        assert later["workers"][0]["progress"]["phase"] in ("training", "quantizing", "offering", "uploading")

        # a second worker, registered by hand: its malformed reports are refused and change nothing
        url = cluster.url
        session = httpx.post(f"{url}/workers/register", json={"worker_id": 1}, timeout=20).json()["session"]
        headers = {"X-FLQ-Session": session}

        def beat(progress):
            body = json.dumps({"worker_id": 1, "progress": progress})  # Infinity as Python writes it
            return httpx.post(
                f"{url}/workers/heartbeat",
                content=body,
                headers={**headers, "Content-Type": "application/json"},
                timeout=20,
            )

        good = {"round": 1, "phase": "waiting", "done": 0, "total": STEPS, "seconds": 1.5}
        seen_before = {w["worker_id"]: w for w in cluster.status()["workers"]}[1]["last_seen"]
        time.sleep(0.5)
        bad = [
            {**good, "done": STEPS + 1},  # more batches than the round has
            {**good, "done": -1},
            {**good, "phase": "sleeping"},
            {**good, "round": "1"},  # a string where the API has an integer
            {**good, "seconds": -3.0},
            {**good, "seconds": math.inf},
            {**good, "extra": 1},
            {k: v for k, v in good.items() if k != "phase"},
            [1, "training", 3, 4, 5.0],
        ]
        for progress in bad:
            r = beat(progress)
            assert r.status_code == 422 and r.json()["code"] == "invalid_request", (progress, r.text)
            assert "\n" not in r.json()["detail"]
        w1 = {w["worker_id"]: w for w in cluster.status()["workers"]}[1]
        assert w1["progress"] is None and w1["last_seen"] == pytest.approx(seen_before, abs=0.2), w1
        assert beat(good).status_code == 200
        w1 = {w["worker_id"]: w for w in cluster.status()["workers"]}[1]
        assert w1["progress"]["phase"] == "waiting" and w1["progress"]["batches_total"] == STEPS, w1

        # the master's "still waiting" line names what the worker is doing: its batches
        line = _wait_for(
            "a 'still waiting' line with worker 0's batches",
            lambda: next((x for x in _log(tmp_path, "master").splitlines() if "training (batches " in x), None),
        )
        assert "offers needed (system.min_workers) after " in line and f"/{STEPS} batches in " in line, line
        assert "1 training (batches " in line and "more at this pace" in line, line

        assert worker.wait(timeout=180) == 0, cluster.output("worker0")
        assert cluster.master.wait(timeout=60) == 0, cluster.output()
        took = time.monotonic() - t0
        # the worker's own log: a line every heartbeat (1.5 s) of its training, batches counted up
        worker_log = _log(tmp_path, "worker0")
        lines = [x for x in worker_log.splitlines() if "round 1: local training " in x and " done, " not in x]
        # and, the training being longer than 15 s, its end
        assert f"worker 0: round 1: local training done, {STEPS} batches in " in worker_log, worker_log
        assert len(lines) >= 3, worker_log
        assert lines[0].split("worker 0: round 1: local training ")[1].endswith(" s")
        counts = [int(x.split("local training ")[1].split("/")[0]) for x in lines]
        assert counts == sorted(counts) and counts[-1] > counts[0], lines
        assert all(f"/{STEPS} batches, " in x for x in lines), lines
        # no request of its own: the reports ride on the heartbeats, one per heartbeat_s at most
        counted = [x for x in _log(tmp_path, "master").splitlines() if "HTTP requests served:" in x]
        beats = int(counted[-1].split("POST /workers/heartbeat ")[1].split(",")[0])
        assert beats <= took / 1.5 + 2 + 1 + len(bad), (beats, took)
        print(f"\n| progress: {len(lines)} worker log lines, {beats} heartbeats in {took:.0f} s |")
    finally:
        cluster.kill_all()


def test_the_waiting_line_tells_slow_from_silent_and_bad_reports_change_nothing(caplog):
    """The round protocol object on a fake clock (no HTTP): four workers, all
    needed; at round_timeout_s the "still waiting" line says that two train
    (their batches, how long the slowest still needs, a hint when that is
    beyond the time left), one waits for the model, one is silent. A report
    that cannot be true is refused (400 malformed) and changes nothing."""
    from test_protocol import GUARD_S, ROUND_S, make, register, settle, tick

    from flq.master import MasterError

    async def scenario():
        cm, clock = make(total_workers=4)  # worker_timeout_s 30, heartbeat_s 10: silent after 20 s
        sessions = await register(cm, 0, 1, 2, 3)
        running = asyncio.ensure_future(cm.run())
        await settle()
        for m in (0, 1, 2, 3):
            assert await asyncio.wait_for(cm.fetch_round(m, 0.0, sessions[m]), GUARD_S) is not None

        def workers():  # without last_seen: Unix time, read from the real clock
            return [{k: v for k, v in w.items() if k != "last_seen"} for w in cm.status()["workers"]]

        before = workers()
        for bad in (
            Progress(0, "training", 5, 4, 1.0),
            Progress(0, "napping", 0, 4, 1.0),
            Progress(-2, "waiting", 0, 0, 1.0),
            Progress(0, "training", 1, 4, math.nan),
        ):
            assert bad.problem()
            with pytest.raises(MasterError) as err:
                cm.heartbeat(0, sessions[0], progress=bad)
            assert err.value.code == "malformed" and err.value.status == 400
        assert workers() == before  # nothing changed: no progress, last seen as it was
        clock.advance(ROUND_S - 1)
        cm.heartbeat(0, sessions[0], progress=Progress(0, "training", 100, 400, 9.0))  # 27 s more at this pace
        cm.heartbeat(1, sessions[1], progress=Progress(0, "training", 300, 400, 9.0))
        cm.heartbeat(2, sessions[2], progress=Progress(-1, "waiting", 0, 0, 9.0))
        await tick(cm, clock, 1.0)  # worker 3 was last heard from 10 s ago: not silent yet
        status = {w["worker_id"]: w for w in cm.status()["workers"]}
        assert status[0]["progress"] == {
            "round": 1,
            "phase": "training",
            "batches_done": 100,
            "batches_total": 400,
            "seconds_in_phase": 9.0,
            "seconds_since_report": 1.0,
        }
        assert status[2]["progress"]["round"] == 0 and status[3]["progress"] is None
        for _ in range(2):  # 15 s later the next line: worker 3 is silent for 25 s
            await tick(cm, clock, 7.5)
            for m in (0, 1, 2):
                cm.heartbeat(m, sessions[m])
        await tick(cm, clock, 0.5)
        running.cancel()

    with caplog.at_level("WARNING", logger="flq.cluster"):
        asyncio.run(scenario())
    first, second = [r.getMessage() for r in caplog.records if "offers needed" in r.getMessage()]
    assert first == (
        "round 1: 0 of the 4 offers needed (system.min_workers) after 10 s; waiting for worker(s) [0, 1, 2, 3] "
        "(0: training 100/400 batches in 9 s, last seen 1 s ago, 1: training 300/400 batches in 9 s, last seen "
        "1 s ago, 2: waiting for the model for 9 s, last seen 1 s ago, 3: training, last seen 10 s ago); "
        "2 training (batches 100/400, 300/400; ~26 s more at this pace), 1 waiting for the model; the run ends "
        "in 20 s unless they offer (system.quorum_timeout_s); at this pace local training needs ~26 s more: "
        "raise system.round_timeout_s or system.quorum_timeout_s (or train less per round)"
    )
    assert "1 silent for 25 s" in second, second
