"""Tests for flq.algorithm.aggregation: the aggregate g_hat and the master's
Adam (docs/algorithm.md, "State" and "One round", step 9)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flq.algorithm.aggregation import Adam, aggregate
from flq.algorithm.vector import squared_norm


def f32(*v):
    return np.array(v, np.float32)


# --------------------------------------------------------------------------
# aggregate


def test_mean_without_scaling():
    # ([1,2,3] + [3,4,5]) / 2 = [2,3,4]
    out = aggregate({0: f32(1, 2, 3), 1: f32(3, 4, 5)}, False, 1.0, 0.0)
    assert out.dtype == np.float32
    assert out.tolist() == [2.0, 3.0, 4.0]
    # three workers: ([1,1] + [2,4] + [6,1]) / 3 = [3, 2]
    assert aggregate({5: f32(1, 1), 2: f32(2, 4), 9: f32(6, 1)}, False, 1.0, 0.0).tolist() == [3.0, 2.0]


def test_scale_by_selected():
    ups = {0: f32(1, 2, 3), 1: f32(3, 4, 5)}
    # m_sel = 2, sel_ref = 1: mean * 2/1 = sum = [4,6,8]
    assert aggregate(ups, True, 1.0, 0.0).tolist() == [4.0, 6.0, 8.0]
    # sel_ref = 4: mean * 2/4 = [1, 1.5, 2]
    assert aggregate(ups, True, 4.0, 0.0).tolist() == [1.0, 1.5, 2.0]
    # sel_ref = 2 = m_sel: the plain mean
    assert aggregate(ups, True, 2.0, 0.0).tolist() == [2.0, 3.0, 4.0]
    # one worker, sel_ref 1: the update itself
    assert aggregate({3: f32(0.5, -7)}, True, 1.0, 0.0).tolist() == [0.5, -7.0]
    # 3 workers, sel_ref 1: sum [9, 6]
    assert aggregate({5: f32(1, 1), 2: f32(2, 4), 9: f32(6, 1)}, True, 1.0, 0.0).tolist() == [9.0, 6.0]


def test_clip_global():
    # [3, 4] has norm 5
    out = aggregate({0: f32(3, 4)}, False, 1.0, 1.0)
    np.testing.assert_allclose(out, [0.6, 0.8], rtol=2e-7)
    assert math.sqrt(squared_norm(out)) == pytest.approx(1.0, rel=1e-6)
    out = aggregate({0: f32(3, 4)}, False, 1.0, 2.5)
    np.testing.assert_allclose(out, [1.5, 2.0], rtol=2e-7)
    # shorter (or equal) vectors untouched, bit for bit
    assert aggregate({0: f32(3, 4)}, False, 1.0, 10.0).tolist() == [3.0, 4.0]
    assert aggregate({0: f32(3, 4)}, False, 1.0, 5.0).tolist() == [3.0, 4.0]
    # clip applies after scaling: sum [6, 8] (norm 10) with sel_ref 1 -> clipped to 5 -> [3, 4]
    out = aggregate({0: f32(3, 4), 1: f32(3, 4)}, True, 1.0, 5.0)
    np.testing.assert_allclose(out, [3.0, 4.0], rtol=2e-7)
    # clip 0 = off
    assert aggregate({0: f32(300, 400)}, False, 1.0, 0.0).tolist() == [300.0, 400.0]


def test_clip_global_large_vector():
    rng = np.random.default_rng(0)
    ups = {m: rng.standard_normal(10000).astype(np.float32) for m in range(4)}
    out = aggregate(ups, True, 1.0, 3.0)
    assert math.sqrt(squared_norm(out)) == pytest.approx(3.0, rel=1e-6)
    unclipped = aggregate(ups, True, 1.0, 0.0)
    # same direction
    cos = float(np.dot(out.astype(np.float64), unclipped)) / math.sqrt(squared_norm(out) * squared_norm(unclipped))
    assert cos == pytest.approx(1.0, abs=1e-9)


def test_independent_of_insertion_order():
    rng = np.random.default_rng(1)
    vecs = {m: (rng.standard_normal(5000) * 10 ** rng.uniform(-3, 3)).astype(np.float32) for m in (7, 0, 3, 12, 5)}
    a = aggregate(dict(sorted(vecs.items())), True, 1.0, 0.0)
    b = aggregate(dict(sorted(vecs.items(), reverse=True)), True, 1.0, 0.0)
    c = aggregate({k: vecs[k] for k in (3, 12, 0, 5, 7)}, True, 1.0, 0.0)
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
    np.testing.assert_array_equal(a.view(np.uint32), c.view(np.uint32))
    # and equal to the float32 sum in worker-id order
    ref = vecs[0].copy()
    for m in (3, 5, 7, 12):
        ref += vecs[m]
    ref *= np.float32(1.0)
    np.testing.assert_array_equal(a, ref)


def test_inputs_not_modified():
    a, b = f32(1, 2), f32(3, 4)
    out = aggregate({0: a, 1: b}, True, 1.0, 1.0)
    assert a.tolist() == [1.0, 2.0] and b.tolist() == [3.0, 4.0]
    single = f32(5, 6)
    out = aggregate({0: single}, False, 1.0, 0.0)
    out[0] = 0
    assert single.tolist() == [5.0, 6.0]


def test_empty_raises():
    with pytest.raises(ValueError):
        aggregate({}, True, 1.0, 0.0)


# --------------------------------------------------------------------------
# Adam


def _adam_reference(theta0, grads, lr, b1=0.9, b2=0.999, eps=1e-7):
    """Independent float64 Adam (Kingma and Ba 2015)."""
    theta = np.array(theta0, np.float64)
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mh = m / (1 - b1**t)
        vh = v / (1 - b2**t)
        theta = theta - lr * mh / (np.sqrt(vh) + eps)
    return theta


def test_adam_two_steps_hand():
    # theta starts at 0 so that theta IS the accumulated update and a 1e-6
    # relative tolerance applies to the Adam step itself (float32 theta ~ 1
    # would hide an error of 1e-5 in a step of 1e-1 below its own rounding).
    lr = 0.1
    theta = f32(0.0, 0.0, 0.0)
    g1 = f32(0.5, -1.0, 0.0)
    g2 = f32(0.1, 0.2, -0.3)
    opt = Adam(3, lr)
    assert (opt.beta1, opt.beta2, opt.eps) == (0.9, 0.999, 1e-7)
    opt.step(theta, g1)
    # step 1: m_hat = g, v_hat = g^2 -> theta -= lr g / (|g| + eps):
    # [-0.1 * 0.5/(0.5 + 1e-7), +0.1 * 1/(1 + 1e-7), 0] = [-0.09999998, 0.09999999, 0]
    want1 = [-0.1 * 0.5 / (0.5 + 1e-7), 0.1 / (1 + 1e-7), 0.0]
    assert theta[2] == 0.0  # zero gradient, zero moment: no move
    np.testing.assert_allclose(theta, want1, rtol=1e-6)
    np.testing.assert_allclose(theta, _adam_reference([0, 0, 0], [g1], lr), rtol=1e-6)
    opt.step(theta, g2)
    # step 2, element 0: m = 0.9*0.05 + 0.1*0.1 = 0.055, m_hat = 0.055/0.19 = 0.289474;
    # v = 0.999*0.00025 + 0.001*0.01 = 0.00025975, v_hat = 0.00025975/0.001999 = 0.129940;
    # step = 0.1 * 0.289474 / (0.360472 + 1e-7) = 0.0803041 -> theta0 = -0.0999999800 - 0.0803041
    m0 = 0.9 * 0.05 + 0.1 * 0.1
    v0 = 0.999 * 0.00025 + 0.001 * 0.01
    step0 = lr * (m0 / 0.19) / (math.sqrt(v0 / (1 - 0.999**2)) + 1e-7)
    assert step0 == pytest.approx(0.08030408, rel=1e-6)
    assert theta[0] == pytest.approx(want1[0] - step0, rel=1e-6)
    np.testing.assert_allclose(theta, _adam_reference([0, 0, 0], [g1, g2], lr), rtol=1e-6)
    assert opt.t == 2


def test_adam_one_step_is_lr_times_sign():
    # first step with |g| >> eps: theta moves by lr * g/(|g| + eps), i.e. lr
    # to within 1e-7/|g| relative (bias correction makes m_hat = g, v_hat = g^2)
    theta = np.zeros(4, np.float32)
    g = f32(1.0, -2.0, 4.0, -0.25)
    Adam(4, 1e-3).step(theta, g)
    want = [-1e-3 * x / (abs(x) + 1e-7) for x in (1.0, -2.0, 4.0, -0.25)]
    np.testing.assert_allclose(theta, want, rtol=1e-6)


@pytest.mark.parametrize("theta_start", ["zero", "random"])
def test_adam_matches_torch(theta_start):
    rng = np.random.default_rng(3)
    n = 50
    theta0 = (np.zeros(n) if theta_start == "zero" else rng.standard_normal(n)).astype(np.float32)
    grads = [(rng.standard_normal(n) * 10 ** rng.uniform(-4, 1)).astype(np.float32) for _ in range(20)]
    grads[3][:5] = 0
    theta = theta0.copy()
    opt = Adam(n, 1e-3)
    p = torch.nn.Parameter(torch.from_numpy(theta0.copy()))
    topt = torch.optim.Adam([p], lr=1e-3, betas=(0.9, 0.999), eps=1e-7)
    for g in grads:
        opt.step(theta, g)
        p.grad = torch.from_numpy(g.copy())
        topt.step()
        # from 0, theta is the sum of the steps: 1e-6 relative, or 1e-6 of
        # one step (lr) where steps of both signs cancelled
        np.testing.assert_allclose(theta, p.detach().numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(theta, _adam_reference(theta0, grads, 1e-3), rtol=1e-6, atol=1e-9)


def test_adam_state_dict_round_trip():
    rng = np.random.default_rng(4)
    n = 20
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(6)]
    theta = rng.standard_normal(n).astype(np.float32)
    opt = Adam(n, 0.01)
    for g in grads[:3]:
        opt.step(theta, g)
    state = opt.state_dict()
    assert state["t"] == 3 and state["lr"] == 0.01
    theta_saved = theta.copy()
    # the state holds copies: more steps do not change it
    m_saved = np.array(state["m"], copy=True)
    other = Adam(n, 0.5)
    other.load_state_dict(state)
    theta2 = theta_saved.copy()
    for g in grads[3:]:
        opt.step(theta, g)
        other.step(theta2, g)
    np.testing.assert_array_equal(state["m"], m_saved)
    np.testing.assert_array_equal(theta.view(np.uint32), theta2.view(np.uint32))
    assert other.t == opt.t == 6 and other.lr == 0.01
    np.testing.assert_array_equal(other.m, opt.m)
    np.testing.assert_array_equal(other.v, opt.v)
    # loading copies too: changing the dict afterwards does not reach the optimizer
    state2 = opt.state_dict()
    fresh = Adam(n, 0.01)
    fresh.load_state_dict(state2)
    state2["m"][:] = 123
    assert not np.any(fresh.m == 123)


def test_adam_state_dict_survives_plain_types():
    # a checkpoint may store lists; loading them gives float32 arrays
    opt = Adam(2, 0.1)
    opt.load_state_dict({"m": [0.5, -0.5], "v": [0.25, 0.25], "t": 1, "lr": 0.1})
    assert opt.m.dtype == np.float32 and opt.v.dtype == np.float32 and opt.t == 1
    theta = f32(0, 0)
    opt.step(theta, f32(0.5, -0.5))
    # t=2: m = 0.9*0.5 + 0.1*0.5 = 0.5, v = 0.999*0.25 + 0.001*0.25 = 0.25
    # m_hat = 0.5/0.19, v_hat = 0.25/0.001999 -> step = 0.1 * m_hat / (sqrt(v_hat) + 1e-7)
    step = 0.1 * (0.5 / 0.19) / (math.sqrt(0.25 / (1 - 0.999**2)) + 1e-7)
    np.testing.assert_allclose(theta, [-step, step], rtol=1e-6)


def test_adam_step_that_would_overflow_is_not_taken():
    """g = 2e19: g^2 = 4e38 overflows float32 (max 3.4e38) in the second
    moment, which would freeze the model forever (denominator inf). The step
    raises and leaves theta, m, v and t exactly as they were."""
    adam = Adam(3, 1e-3)
    theta = f32(0.5, -0.5, 1.0)
    adam.step(theta, f32(1.0, 2.0, 3.0))
    before = (theta.copy(), adam.m.copy(), adam.v.copy(), adam.t)
    with pytest.raises(FloatingPointError, match="second moment"):
        adam.step(theta, f32(2e19, 0.0, 0.0))
    with pytest.raises(FloatingPointError, match="gradient"):
        adam.step(theta, f32(float("nan"), 0.0, 0.0))
    assert np.array_equal(theta, before[0]) and np.array_equal(adam.m, before[1])
    assert np.array_equal(adam.v, before[2]) and adam.t == before[3] == 1
    adam.step(theta, f32(1e18, 0.0, 0.0))  # 1e36 still fits: the step is taken, everything finite
    assert adam.t == 2 and np.isfinite(adam.v).all() and np.isfinite(theta).all()


def test_usable_update_bounds():
    from flq.algorithm.aggregation import MAX_UPDATE_MAGNITUDE, usable_update

    assert usable_update(f32(1.0, -2.0), 0.5)
    assert not usable_update(f32(1.0, float("inf")), 0.5)
    assert not usable_update(f32(1.0, float("nan")), 0.5)
    assert not usable_update(f32(1.0, 2.0), float("nan"))
    assert not usable_update(f32(2 * MAX_UPDATE_MAGNITUDE, 0.0), 0.5)
    assert usable_update(f32(9.9e17), 0.5)
