"""The master's round phases against messages sent twice and against
updates whose aggregate would overflow (docs/algorithm.md, "One round")."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import small_config

from flq.algorithm import packing
from flq.algorithm.quantize import raw
from flq.master import Master, MasterError
from flq.messages import Offer
from flq.model import build_model, glorot_init
from flq.outcome import Diverged


def _master(**overrides):
    cfg = small_config(model="mlp", **overrides)
    model = build_model("mlp")
    return cfg, Master(cfg, tuple(p.numel() for p in model.parameters()), glorot_init(model, cfg.seed))


def _offer(master, m, k=0, gain=1.0, loss=0.5, candidate=True):
    return Offer(
        worker_id=m,
        round=k,
        candidate=candidate,
        gain=gain,
        cost=float(master.upload_cost),
        loss=loss,
        up_version=master.up_version[m],
        down_version=master.down_version[m],
    )


def test_twenty_uploads_of_9_9e17_stop_the_run_instead_of_freezing_the_model():
    """Each upload is under the per-upload limit of 1e18, but their aggregate
    (scale_by_selected: the sum, 1.98e19) squared overflows float32 in Adam's
    second moment. Before: v became inf and the model never moved again. Now
    the step is not taken, the round is recorded, and Diverged says why."""
    cfg, master = _master(total_workers=20, mode="fedavg", b_down=32, up_budget_bits=0)
    theta0, m0, v0 = master.theta.copy(), master.adam.m.copy(), master.adam.v.copy()
    master.begin_round()
    for m in range(20):
        master.downlink(m)
        master.add_offer(_offer(master, m))
    assert master.select() == list(range(20))
    huge = packing.encode(raw(np.full(master.n, 9.9e17, np.float32)))
    for m in range(20):
        master.receive_upload(m, huge)
    with pytest.raises(Diverged, match=r"round 1 diverged: the aggregate of workers \[0, 1, .*second moment"):
        master.end_round()
    assert np.array_equal(master.theta, theta0)  # no step taken, nothing non-finite kept
    assert np.array_equal(master.adam.m, m0) and np.array_equal(master.adam.v, v0) and master.adam.t == 0
    assert [r["iter"] for r in master.records] == [1] and master.records[0]["selcnt"] == 20


def test_a_worker_reporting_a_non_finite_loss_ends_the_run_after_its_round():
    cfg, master = _master(total_workers=2)
    master.begin_round()
    for m in range(2):
        master.downlink(m)
    master.add_offer(_offer(master, 0))
    with pytest.raises(MasterError, match="candidate with a non-finite loss"):
        master.add_offer(_offer(master, 1, loss=float("nan")))
    master.add_offer(_offer(master, 1, loss=float("nan"), gain=0.0, candidate=False))
    master.select()
    with pytest.raises(Diverged, match=r"round 1 diverged: worker\(s\) \[1\] report a diverged local model"):
        master.end_round()
    assert math.isnan(master.records[0]["loss"]) and master.round == 1


def test_downlink_offer_and_upload_sent_twice_are_counted_once():
    cfg, master = _master(total_workers=3)
    master.begin_round()
    first = master.downlink(0)
    bits, version, mirror = master.bits_down_cum, master.down_version[0], master.ref_down[0].copy()
    assert master.downlink(0) == first  # a retried download: the same bytes
    assert (master.bits_down_cum, master.down_version[0]) == (bits, version)
    assert np.array_equal(master.ref_down[0], mirror)
    master.forget_downlink(0)  # a restarted worker: a fresh downlink against the moved mirror
    assert master.downlink(0) != first and master.down_version[0] == version + 1
    master.downlink(1)
    master.downlink(2)
    o = _offer(master, 0)
    assert master.add_offer(o) is True and master.add_offer(o) is False  # the same offer: recorded once
    with pytest.raises(MasterError, match="different offer"):
        master.add_offer(_offer(master, 0, gain=2.0))
    master.add_offer(_offer(master, 1))
    assert master.select() == [0, 1]
    assert master.add_offer(o) is False  # a retry after the selection: still the same answer
    with pytest.raises(MasterError, match="selection is made") as late:
        master.add_offer(_offer(master, 2))
    assert late.value.status == 409 and late.value.code == "late"
    rng = np.random.default_rng(0)
    from flq.algorithm.quantize import quantize_relative

    qv, _ = quantize_relative(
        rng.standard_normal(master.n).astype(np.float32), master.ref_up[0], cfg.b_up, rng, master.segments
    )
    body = packing.encode(qv)
    assert master.receive_upload(0, body) is True
    wire, version = master.wire_up, master.up_version[0]
    assert master.receive_upload(0, body) is False  # the same upload again: counted once
    assert (master.wire_up, master.up_version[0]) == (wire, version)
    other = bytearray(body)
    other[-1] ^= 1
    with pytest.raises(MasterError, match="other bytes"):
        master.receive_upload(0, bytes(other))


def test_budget_smaller_than_one_upload_is_warned_at_start(caplog):
    with caplog.at_level("WARNING", logger="flq.master"):
        _master(up_budget_bits=1e5, entropy_coding="none")  # a coded upload may be smaller: no warning then
    (line,) = [r.getMessage() for r in caplog.records if "smaller than one upload" in r.getMessage()]
    assert "up_budget_bits 1e+05" in line and "203560 bits in mode bbit" in line  # 4 bits x n = 50,890
    caplog.clear()
    with caplog.at_level("WARNING", logger="flq.master"):
        _master(up_budget_bits=1e5, sel_clients=2)  # selection by count: the budget is not used
    assert not caplog.records


def test_a_coded_round_where_no_offer_fits_is_warned_once(caplog):
    """With entropy coding the costs are known only from the offers: the
    first round in which candidates offered but none fits the budget says so."""
    cfg, master = _master(up_budget_bits=100, entropy_coding="both", total_workers=2)
    with caplog.at_level("WARNING", logger="flq.master"):
        for k in range(2):
            master.begin_round()
            for m in range(2):
                master.downlink(m)
                master.add_offer(
                    Offer(
                        worker_id=m,
                        round=k,
                        candidate=True,
                        gain=1.0,
                        cost=8.0 * (200 + m),
                        loss=0.5,
                        down_version=k + 1,
                    )
                )
            assert master.select() == []
            master.end_round()
    (line,) = [r.getMessage() for r in caplog.records if "fits" in r.getMessage()]
    assert line == (
        "round 1: none of the 2 candidate uploads fits budget_selection.up_budget_bits 100 (the cheapest is "
        "1600 bits): nobody uploads and the model does not train; raise the budget"
    )


def test_a_snapshot_is_never_changed_by_a_later_round():
    """``snapshot()`` gives (rounds done, theta) together, and a round's
    close publishes a new array instead of stepping the old one in place: a
    model download serialized while the next round closes (another thread)
    reads one whole model, never half of each."""
    cfg, master = _master(total_workers=2, mode="fedavg", b_down=32, up_budget_bits=0)
    done, before, _ = master.snapshot()
    kept = before.copy()
    master.begin_round()
    for m in range(2):
        master.downlink(m)
        master.add_offer(_offer(master, m))
    master.select()
    for m in range(2):
        master.receive_upload(m, packing.encode(raw(np.full(master.n, 0.01 * (m + 1), np.float32))))
    master.end_round()
    after_done, after, _ = master.snapshot()
    assert (done, after_done) == (0, 1)
    assert np.array_equal(before, kept)  # the array handed out before the round was not touched
    assert not np.array_equal(after, kept) and after is master.theta  # the round published a new model


def test_each_round_keeps_its_selection_with_costs_for_the_dashboard():
    """``selection_history``: per round, the candidates counted and the
    workers selected (in selection order, best gain first) with their costs
    in bits; ``selected_history`` says whose upload arrived. Both survive a
    checkpoint, and a checkpoint from before the history loads with empty
    selections, one per round done."""
    cfg, master = _master(total_workers=4, mode="fedavg", b_down=32, up_budget_bits=0, sel_clients=2)
    master.begin_round()
    for m, gain in enumerate([1.0, 3.0, 2.0, 5.0]):
        master.downlink(m)
        master.add_offer(_offer(master, m, gain=gain, candidate=m != 3))  # worker 3 skips (lazy)
    assert master.select() == [1, 2]
    master.receive_upload(1, packing.encode(raw(np.full(master.n, 0.01, np.float32))))  # 2's never arrives
    master.end_round()
    cost = master.upload_cost
    assert master.selection_history == [{"candidates": 3, "selected": [[1, cost], [2, cost]]}]
    assert master.selected_history == [[1]]
    state = master.state_dict()
    again = _master(total_workers=4, mode="fedavg", b_down=32, up_budget_bits=0, sel_clients=2)[1]
    again.load_state_dict(state)
    assert again.selection_history == master.selection_history
    del state["selection_history"]
    again.load_state_dict(state)
    assert again.selection_history == [{"candidates": 0, "selected": []}]
