"""The round protocol object (:class:`flq.cluster.ClusterMaster`) without
HTTP, sockets or real waiting: a fake monotonic clock drives every timeout,
the test moves it and wakes the waiters. Each test takes milliseconds."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
from conftest import small_config

from flq import outcome
from flq.algorithm import packing
from flq.algorithm.quantize import raw
from flq.cluster import ClusterMaster, RunFinished
from flq.master import Master, MasterError
from flq.messages import Offer
from flq.model import build_model, glorot_init
from flq.protocol import Code

#: Seconds (of the fake clock).
ROUND_S, WORKER_S, START_S, QUORUM_S = 10.0, 30.0, 60.0, 20.0
#: Real seconds any single step may take before the test fails (nothing here really waits).
GUARD_S = 5.0


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def make(total_workers=3, min_workers=0, max_rounds=3, pause_s=math.inf, **cfg):
    """A ClusterMaster on a fake clock: the mlp model, fedavg (uploads are raw
    float32, every candidate is selected), no evaluation."""
    config = small_config(
        model="mlp",
        mode="fedavg",
        b_down=32,
        up_budget_bits=0,
        total_workers=total_workers,
        min_workers=min_workers,
        max_rounds=max_rounds,
        round_timeout_s=ROUND_S,
        worker_timeout_s=WORKER_S,
        start_timeout_s=START_S,
        quorum_timeout_s=QUORUM_S,
        **cfg,
    )
    model = build_model("mlp")
    master = Master(config, tuple(p.numel() for p in model.parameters()), glorot_init(model, config.seed))
    clock = FakeClock()
    records = []
    cm = ClusterMaster(master, config, on_round=records.append, clock=clock, pause_s=pause_s)
    cm.test_records = records
    return cm, clock


async def settle() -> None:
    """Let every task that can run, run (the waiters a wake released)."""
    for _ in range(10):
        await asyncio.sleep(0)


async def tick(cm: ClusterMaster, clock: FakeClock, seconds: float) -> None:
    """Move the clock and wake the waiters to look at it."""
    clock.advance(seconds)
    await cm.wake()
    await settle()


async def register(cm: ClusterMaster, *ids: int) -> dict:
    return {m: (await cm.register(m, 0, 0))["session"] for m in ids}


def offer_of(cm: ClusterMaster, m: int, k: int) -> Offer:
    master = cm.master
    return Offer(
        worker_id=m,
        round=k,
        candidate=True,
        gain=1.0,
        cost=float(master.upload_cost),
        loss=0.5,
        up_version=master.up_version[m],
        down_version=master.down_version[m],
    )


def update(cm: ClusterMaster, m: int) -> bytes:
    return packing.encode(raw(np.full(cm.master.n, 0.01 * (m + 1), np.float32)))


async def fetch_and_offer(cm: ClusterMaster, sessions: dict, *ids: int) -> dict:
    """Workers fetch the open round's model; those in ``ids`` offer (their
    offers are recorded; the answer comes with the selection)."""
    k = None
    for m in sessions:
        view = await asyncio.wait_for(cm.fetch_round(m, 0.0, sessions[m]), GUARD_S)
        assert view is not None and view.round == cm.master.round
        k = view.round
    return {m: await cm.offer(offer_of(cm, m, k), sessions[m], wait_s=0.0) for m in ids}


async def both_selected(cm: ClusterMaster) -> dict:
    """Workers 0 and 1 register, round 1 opens, both offer, the offers close
    at once (every live worker offered) and both are selected. Returns the
    sessions."""
    sessions = await register(cm, 0, 1)
    assert await cm.wait_for_workers() is None
    await cm.open_round()
    await fetch_and_offer(cm, sessions, 0, 1)
    assert await asyncio.wait_for(cm.close_offers(), GUARD_S) is None
    assert await cm.select() == [0, 1]
    return sessions


def shown(cm: ClusterMaster) -> dict:
    return {w["worker_id"]: w["state"] for w in cm.status()["workers"]}


def test_a_round_closes_on_time_and_a_straggler_is_not_selected():
    """3 workers, 2 needed: 0 and 1 offer, 2 does not. The offers stay open
    until round_timeout_s by the clock, then close; 2 is late, not selected;
    the uploads of 0 and 1 are collected and the round is recorded."""

    async def scenario():
        cm, clock = make(min_workers=2)
        sessions = await register(cm, 0, 1, 2)
        assert await cm.wait_for_workers() is None and cm.state == "training"
        assert await cm.open_round() == 0
        assert (cm.status()["round"], cm.status()["phase"]) == (1, "offers")
        assert await fetch_and_offer(cm, sessions, 0, 1) == {0: None, 1: None}  # recorded, not yet decided
        closing = asyncio.ensure_future(cm.close_offers())
        await tick(cm, clock, ROUND_S - 0.1)
        assert not closing.done() and cm.waiting_for() == [2]  # worker 2 is live: the round waits for it
        await tick(cm, clock, 0.2)
        assert await asyncio.wait_for(closing, GUARD_S) is None  # closed at round_timeout_s
        assert shown(cm)[2] == "late"
        assert await cm.select() == [0, 1] and cm.status()["phase"] == "uploads"
        assert await cm.offer(offer_of(cm, 0, 0), sessions[0], wait_s=0.0) is True  # the same offer: its answer
        collecting = asyncio.ensure_future(cm.collect_uploads())
        await cm.upload(0, 0, update(cm, 0), sessions[0])
        await settle()
        assert not collecting.done() and cm.waiting_for() == [1]
        await cm.upload(1, 0, update(cm, 1), sessions[1])
        assert await asyncio.wait_for(collecting, GUARD_S) == []
        record = await cm.close_round()
        assert (record["iter"], record["offers"], record["selcnt"]) == (1, 2, 2)
        assert cm.master.selected_history == [[0, 1]] and cm.test_records == [record]
        st = cm.status()
        assert (st["round"], st["rounds_done"], st["phase"], st["last_metrics"]["iter"]) == (2, 1, "idle", 1)
        assert clock() - 1000.0 == pytest.approx(ROUND_S + 0.1)  # no real seconds were needed

    asyncio.run(scenario())


def test_an_upload_that_never_arrives_counts_as_not_selected():
    async def scenario():
        cm, clock = make(total_workers=2)
        sessions = await both_selected(cm)
        await cm.upload(0, 0, update(cm, 0), sessions[0])
        collecting = asyncio.ensure_future(cm.collect_uploads())
        await tick(cm, clock, ROUND_S / 2)
        assert not collecting.done()
        await tick(cm, clock, ROUND_S / 2)
        assert await asyncio.wait_for(collecting, GUARD_S) == [1]
        record = await cm.close_round()
        assert record["selcnt"] == 1 and cm.master.selected_history == [[0]]
        with pytest.raises(MasterError) as late:  # the upload arrives after its round closed
            await cm.upload(1, 0, update(cm, 1), sessions[1])
        assert late.value.code == Code.LATE

    asyncio.run(scenario())


def test_a_late_offer_gets_the_late_code():
    async def scenario():
        cm, clock = make(min_workers=2)
        sessions = await register(cm, 0, 1, 2)
        await cm.wait_for_workers()
        await cm.open_round()
        await fetch_and_offer(cm, sessions, 0, 1)
        closing = asyncio.ensure_future(cm.close_offers())
        await tick(cm, clock, ROUND_S)
        assert await asyncio.wait_for(closing, GUARD_S) is None
        await cm.select()
        with pytest.raises(MasterError) as late:  # worker 2 offers after the selection
            await cm.offer(offer_of(cm, 2, 0), sessions[2], wait_s=0.0)
        assert (late.value.code, late.value.status) == (Code.LATE, 409)
        with pytest.raises(MasterError) as ahead:  # an offer for a round the master has not opened
            await cm.offer(offer_of(cm, 2, 1), sessions[2], wait_s=0.0)
        assert (ahead.value.code, ahead.value.status) == (Code.NOT_OPEN, 409)
        assert cm.master.offers.keys() == {0, 1}

    asyncio.run(scenario())


def test_an_offer_before_the_first_round_opens_is_not_open():
    async def scenario():
        cm, _ = make(total_workers=2)
        sessions = await register(cm, 0, 1)
        assert await cm.wait_for_workers() is None  # round 1 is not open yet
        with pytest.raises(MasterError) as early:
            await cm.offer(offer_of(cm, 0, 0), sessions[0], wait_s=0.0)
        assert early.value.code == Code.NOT_OPEN and cm.master.offers == {}

    asyncio.run(scenario())


def test_a_selected_worker_that_registers_again_is_not_waited_for(caplog):
    """Worker 1 was selected, then its process restarted (a new registration):
    its pending update died with the old process, so the round stops waiting
    for its upload at once instead of after round_timeout_s."""

    async def scenario():
        cm, clock = make(total_workers=2)
        sessions = await both_selected(cm)
        await cm.upload(0, 0, update(cm, 0), sessions[0])
        collecting = asyncio.ensure_future(cm.collect_uploads())
        await settle()
        assert not collecting.done() and cm.waiting_for() == [1]
        await cm.register(1, 0, 0)  # the restarted process
        assert await asyncio.wait_for(collecting, GUARD_S) == [1]  # no clock time passed
        record = await cm.close_round()
        assert record["selcnt"] == 1 and cm.master.selected_history == [[0]]
        await cm.open_round()  # the next round waits for it again
        assert cm.lost_uploads == set()

    with caplog.at_level("INFO", logger="flq.cluster"):
        asyncio.run(scenario())
    assert any("its upload will not come" in r.getMessage() for r in caplog.records)


def test_a_worker_not_heard_from_for_worker_timeout_s_is_shown_absent(caplog):
    async def scenario():
        cm, clock = make(total_workers=2)
        sessions = await register(cm, 0, 1)
        clock.advance(WORKER_S - 1)
        cm.heartbeat(0, sessions[0])
        assert cm.check_liveness() == [] and cm.connected == [0, 1]
        clock.advance(2)  # worker 1: WORKER_S + 1 s without a word
        assert cm.check_liveness() == [1] and cm.connected == [0]
        assert shown(cm) == {0: "registered", 1: "absent"}
        assert cm.status()["live_workers"] == 1
        assert cm.status()["workers"][1]["seconds_since_seen"] == pytest.approx(WORKER_S + 1)
        cm.heartbeat(1, sessions[1])
        assert cm.check_liveness() == [] and shown(cm)[1] == "registered"
        await cm.leave(1, sessions[1])
        assert shown(cm)[1] == "left" and cm.check_liveness() == []

    with caplog.at_level("INFO", logger="flq.cluster"):
        asyncio.run(scenario())
    said = [r.getMessage() for r in caplog.records]
    assert "worker 1 absent: not heard from for 31 s (system.worker_timeout_s)" in said
    assert "worker 1 is back" in said


def test_too_few_workers_within_start_timeout_s_end_the_run():
    async def scenario():
        cm, clock = make(total_workers=2)
        await register(cm, 0)
        waiting = asyncio.ensure_future(cm.wait_for_workers())
        await settle()
        for _ in range(2):  # worker 0 stays live (its heartbeats), worker 1 never comes
            await tick(cm, clock, START_S / 3)
            cm.heartbeat(0)
        assert not waiting.done() and cm.waiting_for() == [1]
        await tick(cm, clock, START_S / 3)
        reason, detail = await asyncio.wait_for(waiting, GUARD_S)
        assert reason == outcome.QUORUM_LOST
        assert detail == "only 1 of the 2 workers needed were present within start_timeout_s (60 s); missing [1]"

    asyncio.run(scenario())


def test_a_round_short_of_its_quorum_ends_the_run_after_quorum_timeout_s(caplog):
    """Both workers needed, one never offers: past round_timeout_s the round
    keeps waiting and says whom for; past quorum_timeout_s more the run ends
    (quorum_lost), the results callback runs, the state is finished."""
    ended = []

    async def scenario():
        cm, clock = make(total_workers=2)
        cm.on_finish = ended.append
        sessions = await register(cm, 0, 1)
        running = asyncio.ensure_future(cm.run())
        for m in (0, 1):
            assert await asyncio.wait_for(cm.fetch_round(m, 60.0, sessions[m]), GUARD_S) is not None
        assert await cm.offer(offer_of(cm, 0, 0), sessions[0], wait_s=0.0) is None
        await tick(cm, clock, ROUND_S)
        assert not running.done() and cm.waiting_for() == [1]
        await tick(cm, clock, QUORUM_S)
        await asyncio.wait_for(running, GUARD_S)
        assert (cm.state, cm.finish_reason) == ("finished", outcome.QUORUM_LOST)
        assert cm.finish_detail.startswith(
            "round 1: 1 of the 2 offers needed (system.min_workers) after "
            "round_timeout_s + quorum_timeout_s (30 s); missing [1]"
        )
        assert cm.master.records == []

    with caplog.at_level("WARNING", logger="flq.cluster"):
        asyncio.run(scenario())
    assert ended == [outcome.QUORUM_LOST]
    (line,) = [r.getMessage() for r in caplog.records if "offers needed" in r.getMessage()]
    assert line.startswith(
        "round 1: 1 of the 2 offers needed (system.min_workers) after 10 s; waiting for "
        "worker(s) [1] (1: training, last seen 10 s ago); the run ends in 20 s"
    )


def test_a_pause_of_the_master_itself_extends_its_timeouts(caplog):
    """The clock jumps 100 s between two ticks of the round loop (the master
    was stopped): the round's and the workers' clocks are extended by as
    much, so nobody is late or absent for it, and no deadline fires early
    (before: a "waiting for" line at once, saying the run ends in -70 s)."""

    async def scenario():
        cm, clock = make(total_workers=2, min_workers=1, pause_s=3.0)
        sessions = await register(cm, 0, 1)
        assert await cm.wait_for_workers() is None
        await cm.open_round()
        await fetch_and_offer(cm, sessions, 0)
        closing = asyncio.ensure_future(cm.close_offers())
        await settle()
        await tick(cm, clock, 100.0)
        assert not closing.done() and cm.connected == [0, 1]
        assert cm.status()["round_open_s"] == pytest.approx(0.0)
        for _ in range(4):  # 10 s in steps shorter than pause_s: seen by the round
            await tick(cm, clock, ROUND_S / 4)
        assert await asyncio.wait_for(closing, GUARD_S) is None and shown(cm)[1] == "late"

    with caplog.at_level("WARNING", logger="flq.cluster"):
        asyncio.run(scenario())
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "the master did not run for 100 s (stopped, suspended or starved): its timeouts are extended by as much"
    ]


def test_the_whole_run_under_the_fake_clock():
    """run() drives its phases for workers that answer at once: every round
    closes as soon as both offered, without the clock moving."""

    async def worker(cm, m, session):
        after = -1
        while True:
            try:
                view = await cm.fetch_round(m, 60.0, session, after=after)
            except RunFinished:
                return
            selected = None
            while selected is None:
                selected = await cm.offer(offer_of(cm, m, view.round), session, wait_s=60.0)
            if selected:
                await cm.upload(m, view.round, update(cm, m), session)
            after = view.round

    async def scenario():
        cm, clock = make(total_workers=2, max_rounds=3)
        sessions = await register(cm, 0, 1)
        workers = [asyncio.ensure_future(worker(cm, m, sessions[m])) for m in (0, 1)]
        await asyncio.wait_for(cm.run(), GUARD_S)
        await asyncio.wait_for(asyncio.gather(*workers), GUARD_S)
        assert (cm.state, cm.finish_reason) == ("finished", outcome.COMPLETED)
        assert [r["iter"] for r in cm.test_records] == [1, 2, 3]
        assert cm.master.selected_history == [[0, 1]] * 3
        assert cm.status()["round"] == 3 and clock() == 1000.0

    asyncio.run(scenario())


def test_a_stop_closes_a_round_that_can_close_and_abandons_one_that_cannot():
    async def scenario():
        cm, clock = make(total_workers=2)
        sessions = await register(cm, 0, 1)
        assert await cm.wait_for_workers() is None
        await cm.open_round()
        await fetch_and_offer(cm, sessions, 0)
        closing = asyncio.ensure_future(cm.close_offers())
        cm.request_stop()
        await cm.wake()
        await settle()
        assert not closing.done()  # worker 1 is live and may still offer: the round can close
        await cm.offer(offer_of(cm, 1, 0), sessions[1], wait_s=0.0)
        assert await asyncio.wait_for(closing, GUARD_S) is None
        await cm.select()
        for m in (0, 1):
            await cm.upload(m, 0, update(cm, m), sessions[m])
        assert await cm.collect_uploads() == []
        await cm.close_round()

        await cm.open_round()  # a round opened before the loop saw the stop: worker 1 never offers
        await fetch_and_offer(cm, sessions, 0)
        closing = asyncio.ensure_future(cm.close_offers())
        await tick(cm, clock, ROUND_S)
        assert await asyncio.wait_for(closing, GUARD_S) == (
            outcome.STOPPED,
            "stopped after 1 rounds (round 2 abandoned)",
        )
        assert cm.phase == "idle"

    asyncio.run(scenario())


def test_the_readme_lists_every_refusal_code():
    """README.md's table of codes is flq.protocol.Code, row for row."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| `([a-z_]+)` \| (\d{3}) \| (.+) \|$", text, re.M)
    assert rows == [(c.value, str(c.status), c.meaning) for c in Code]
