"""Entropy-coded vectors (wire format 2), the real-size charge and adaptive
width: exact round trips, size bounds, refusals that change nothing."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard
from conftest import small_config

from flq.algorithm import packing
from flq.algorithm.packing import CODED_OVERHEAD, PayloadError, byte_layout, charged_bits, decode, encode, header_size
from flq.algorithm.quantize import KIND_BIN, KIND_INT, QuantizedVector, levels, quantize, raw
from flq.algorithm.width import budget_share, choose_width, width_score
from flq.master import Master, MasterError
from flq.messages import Offer
from flq.model import build_model, glorot_init

SEGS = (7, 1000, 3993)  # n = 5000, three tensors
N = sum(SEGS)


def _qv(bits: int, codes: np.ndarray, segs=SEGS) -> QuantizedVector:
    scales = np.linspace(0.5, 2.0, len(segs)).astype(np.float32)
    kind = KIND_BIN if bits == 1 else KIND_INT
    dtype = np.uint8 if bits <= 8 else np.uint16
    return QuantizedVector(kind, bits, tuple(segs), scales, codes.astype(dtype))


def _top(bits: int) -> int:
    """The largest code of a width: 1 for bin, 2L otherwise."""
    return 1 if bits == 1 else 2 * levels(bits)


def _histograms(bits: int):
    """Code vectors of every shape a coder meets: all equal, sparse, peaked
    (an innovation), uniform over the whole range (incompressible), and
    alternating extremes (adversarial for a run-length coder)."""
    rng = np.random.default_rng(bits)
    top = _top(bits)
    mid = top // 2
    sparse = np.full(N, mid)
    sparse[rng.choice(N, 50, replace=False)] = rng.integers(0, top + 1, 50)
    peaked = np.clip(np.rint(rng.laplace(mid, max(top / 16, 0.3), N)), 0, top)
    return {
        "all-equal": np.full(N, mid),
        "all-top": np.full(N, top),
        "sparse": sparse,
        "peaked": peaked,
        "uniform": rng.integers(0, top + 1, N),
        "alternating": np.where(np.arange(N) % 2 == 0, 0, top),
    }


@pytest.mark.parametrize("bits", range(1, 17))
def test_coded_round_trip_every_width_and_histogram(bits):
    for name, codes in _histograms(bits).items():
        qv = _qv(bits, codes)
        v1, v2 = encode(qv), encode(qv, coded=True)
        got = decode(v2, expected_n=N, expected_segments=SEGS, expected_bits=bits)
        assert np.array_equal(got.codes, qv.codes) and got.codes.dtype == qv.codes.dtype, (bits, name)
        assert np.array_equal(got.scales, qv.scales) and got.segments == SEGS and got.kind == qv.kind
        # never more than one byte over version 1; the body is the fixed header plus the charge in bytes
        assert len(v2) <= len(v1) + CODED_OVERHEAD, (bits, name)
        assert len(v2) == header_size(bits, 3) + charged_bits(v2) // 8 and charged_bits(v2) % 8 == 0
        assert charged_bits(v1) == bits * N
        assert v2[:4] == b"FLQV" and v2[4] == 2 and v1[4] == 1
    # what each histogram costs, exactly as measured by the coder: constant codes shrink to a few
    # dozen bytes; uniform codes at 8 bits cannot be compressed and are stored (method 0)
    assert charged_bits(encode(_qv(bits, _histograms(bits)["all-equal"]), coded=True)) <= 8 * 40
    if bits == 8:
        stored = encode(_qv(8, _histograms(8)["uniform"]), coded=True)
        assert stored[header_size(8, 3)] == packing.METHOD_STORED and charged_bits(stored) == 8 * (1 + N)


def test_raw_vectors_code_and_decode():
    x = np.random.default_rng(0).standard_normal(N).astype(np.float32)
    x[:2000] = 0.0  # compressible
    v2 = encode(raw(x), coded=True)
    assert len(v2) < len(encode(raw(x)))
    assert np.array_equal(decode(v2, expected_n=N, expected_bits=32).codes, x)


def test_byte_layout_hand_examples():
    # 3-bit codes go two to a byte (nibbles), low nibble first; 5-bit codes one per byte
    assert byte_layout(np.array([1, 2, 3, 4, 5], np.uint8), 3) == bytes([0x21, 0x43, 0x05])
    assert byte_layout(np.array([17, 30, 0], np.uint8), 5) == bytes([17, 30, 0])
    assert byte_layout(np.array([1, 0, 1, 1, 0, 0, 0, 0, 1], np.uint8), 1) == bytes([0b00001101, 0b1])
    assert byte_layout(np.array([3, 1, 2], np.uint8), 2) == bytes([0b00100111])
    assert byte_layout(np.array([0x1FF], np.uint16), 9) == bytes([0xFF, 0x01])


def test_encoding_is_deterministic_and_charged_exactly():
    codes = _histograms(4)["peaked"]
    a, b = encode(_qv(4, codes), coded=True), encode(_qv(4, codes), coded=True)
    assert a == b
    frame = a[header_size(4, 3) + 1 :]
    assert a[header_size(4, 3)] == packing.METHOD_ZSTD
    assert zstandard.ZstdDecompressor().decompress(frame) == byte_layout(_qv(4, codes).codes, 4)
    assert charged_bits(a) == 8 * (1 + len(frame))


# --------------------------------------------------------------------------- #
# refusals
# --------------------------------------------------------------------------- #
HEAD = header_size(4, 3)


def _good() -> bytes:
    return encode(_qv(4, _histograms(4)["peaked"]), coded=True)


def _frame(content: bytes, **kw) -> bytes:
    return zstandard.ZstdCompressor(level=1, **{"write_checksum": True, **kw}).compress(content)


def _with_data(data: bytes) -> bytes:
    return _good()[:HEAD] + data


LAYOUT = byte_layout(_qv(4, _histograms(4)["peaked"]).codes, 4)
BAD_CODED = {
    "header only (no method byte)": (lambda: _good()[:HEAD], "outside"),
    "cut in the frame": (lambda: _good()[:-3], ""),
    "one byte cut": (lambda: _good()[:-1], ""),
    "longer than version 1 plus one byte": (
        lambda: _with_data(bytes([0]) + b"\0" * (packing.packed_size(N, 4) + 1)),
        "outside",
    ),
    "unknown method": (lambda: _with_data(bytes([7]) + _good()[HEAD + 1 :]), "unknown coding method 7"),
    "stored data of the wrong length": (lambda: _with_data(bytes([0]) + b"\x77" * 100), "stored data is 100 bytes"),
    "not a zstd frame": (lambda: _with_data(bytes([1]) + b"garbage bytes"), "zstd"),
    "frame without its size": (
        lambda: _with_data(bytes([1]) + _frame(LAYOUT, write_content_size=False)),
        "declares -1 bytes",
    ),
    "frame declaring fewer codes": (lambda: _with_data(bytes([1]) + _frame(LAYOUT[:-10])), "declares"),
    "frame that would expand past n codes": (
        lambda: _with_data(bytes([1]) + _frame(b"\x77" * (len(LAYOUT) * 50))),
        f"expected {len(LAYOUT)}",
    ),
    "corrupt frame (checksum)": (
        lambda: _with_data(bytes([1]) + _flip(_frame(LAYOUT, write_checksum=True), -6)),
        "corrupt zstd frame",
    ),
    "bytes after the frame": (lambda: _good() + b"\0\0", "follow the zstd frame"),
    "two frames": (lambda: _good() + _frame(b"x"), "follow the zstd frame"),
    "reserved byte not 0": (lambda: _good()[:7] + b"\x01" + _good()[8:], "reserved header byte is 1"),
    "frame without a checksum": (
        lambda: _with_data(bytes([1]) + _frame(LAYOUT, write_checksum=False)),
        "carries no checksum",
    ),
    "code above 2L inside a valid frame": (
        lambda: _with_data(bytes([1]) + _frame(b"\xff" * len(LAYOUT))),
        "exceeds 2L",
    ),
}


def _flip(b: bytes, at: int) -> bytes:
    out = bytearray(b)
    out[at] ^= 0x5A
    return bytes(out)


@pytest.mark.parametrize("label", sorted(BAD_CODED))
def test_corrupt_coded_payloads_are_refused_with_one_line(label):
    make, fragment = BAD_CODED[label]
    with pytest.raises(PayloadError) as ei:
        decode(make(), expected_n=N, expected_segments=SEGS, expected_bits=4)
    msg = str(ei.value)
    assert fragment in msg and "\n" not in msg, msg


@pytest.mark.parametrize("coded", [False, True])
def test_padding_bits_must_be_zero(coded):
    """Five 4-bit codes fill 2.5 bytes: the last byte's high nibble is
    padding, written as zero and refused otherwise (one encoding per vector)."""
    qv = _qv(4, np.array([1, 2, 3, 4, 5]), segs=(5,))
    body = encode(qv, coded=coded)
    assert body[-1] == 0x05 and (not coded or body[-4] == packing.METHOD_STORED)
    assert np.array_equal(decode(body).codes, qv.codes)
    with pytest.raises(PayloadError, match="unused bits of the last packed byte are not zero"):
        decode(body[:-1] + b"\xf5")


def test_a_bomb_is_refused_before_it_is_decompressed(monkeypatch):
    """A frame declaring 64 MiB is refused from its header alone."""
    bomb = _with_data(bytes([1]) + zstandard.ZstdCompressor(level=1).compress(b"\0" * (1 << 26)))
    assert len(bomb) < 10_000
    monkeypatch.setattr(zstandard, "ZstdDecompressor", None)  # calling it would fail the test
    with pytest.raises(PayloadError, match="declares 67108864 bytes"):
        decode(bomb, expected_n=N, expected_bits=4)


# --------------------------------------------------------------------------- #
# the master: real costs, and refusals that change nothing
# --------------------------------------------------------------------------- #
def _coded_master(**overrides):
    cfg = small_config(model="mlp", total_workers=3, entropy_coding="both", **overrides)
    model = build_model("mlp")
    sizes = tuple(p.numel() for p in model.parameters())
    return cfg, Master(cfg, sizes, glorot_init(model, cfg.seed)), sizes


def test_master_charges_real_sizes_selects_by_them_and_refuses_mismatches():
    cfg, master, sizes = _coded_master(up_budget_bits=0, sel_clients=2, b_up=4)
    n = master.n
    master.begin_round()
    for m in range(3):
        master.downlink(m)
    rng = np.random.default_rng(5)
    bodies = {}
    for m, spread in enumerate((1.0, 0.01, 0.5)):
        # worker 1's update is nearly constant: it codes small and ranks first at equal gain
        qv = quantize((rng.standard_normal(n) * spread + 1).astype(np.float32), 4, rng, sizes)
        bodies[m] = encode(qv, coded=True)
        cost = float(charged_bits(bodies[m]))
        master.add_offer(Offer(worker_id=m, round=0, candidate=True, gain=1.0, cost=cost, loss=0.5, down_version=1))
    costs = {m: charged_bits(b) for m, b in bodies.items()}
    assert costs[1] < costs[2] < costs[0] < 4 * n
    assert master.select() == [1, 2]
    before = master.state_digest()
    for label, body, fragment in (
        ("another worker's body", bodies[2][: len(bodies[1])], ""),
        ("valid body of another size", bodies[2], f"charged {costs[2]} bits, its offer said {costs[1]}"),
        ("truncated", bodies[1][:-1], ""),
        ("trailing bytes", bodies[1] + b"\0", f"charged {costs[1] + 8} bits"),
    ):
        with pytest.raises(MasterError) as ei:
            master.receive_upload(1, body)
        assert ei.value.status == 400 and fragment in str(ei.value), label
        assert master.state_digest() == before, label
    assert master.receive_upload(1, bodies[1]) and master.receive_upload(2, bodies[2])
    rec = master.end_round()
    assert rec["bits_up_cum"] == costs[1] + costs[2]
    assert rec["bits_up_nominal_cum"] == 2 * 4 * n and rec["b_up_mean"] == 4.0
    down = master.downlinks
    assert rec["bits_down_cum"] == sum(charged_bits(down[m]) for m in range(3))
    assert rec["bits_down_nominal_cum"] == 3 * 8 * n


def test_an_upload_must_match_its_offer_and_its_link_before_anything_is_decoded(monkeypatch):
    """The charge is read from the header and length and compared with the
    offer before any decoding; a body in the other wire format than the
    link's (here: version 1 on a coded uplink, charged exactly as offered)
    is refused; neither changes the master's state."""
    _, master, sizes = _coded_master(up_budget_bits=0, b_up=4)
    n = master.n
    assert (4 * n) % 8 == 0
    master.begin_round()
    for m in range(2):
        master.downlink(m)
    qv = quantize(np.random.default_rng(0).standard_normal(n).astype(np.float32), 4, np.random.default_rng(1), sizes)
    v1, v2 = encode(qv), encode(qv, coded=True)
    master.add_offer(Offer(worker_id=0, round=0, candidate=True, gain=1.0, cost=4.0 * n, loss=0.5, down_version=1))
    master.add_offer(
        Offer(worker_id=1, round=0, candidate=True, gain=1.0, cost=float(charged_bits(v2)), loss=0.5, down_version=1)
    )
    assert sorted(master.select()) == [0, 1]
    before = master.state_digest()
    with pytest.raises(MasterError, match="format version 1, but this link sends version 2"):
        master.receive_upload(0, v1)
    real_decode = packing.decode
    monkeypatch.setattr(packing, "decode", lambda *a, **k: pytest.fail("decoded a body of the wrong size"))
    with pytest.raises(MasterError, match=f"charged {4 * n} bits, its offer said {charged_bits(v2)}"):
        master.receive_upload(1, v1)
    monkeypatch.setattr(packing, "decode", real_decode)
    assert master.state_digest() == before
    assert master.receive_upload(1, v2)


@pytest.mark.parametrize(
    "cost,fragment",
    [(12.5, "whole number of bytes"), (7.0, "whole number of bytes"), (8.0 * 10**9, "whole number of bytes")],
)
def test_impossible_coded_costs_are_refused(cost, fragment):
    _, master, _ = _coded_master()
    master.begin_round()
    master.downlink(0)
    before = master.state_digest()
    with pytest.raises(MasterError, match=fragment):
        master.add_offer(Offer(worker_id=0, round=0, candidate=True, gain=1.0, cost=cost, loss=0.5, down_version=1))
    assert master.state_digest() == before


# --------------------------------------------------------------------------- #
# adaptive width
# --------------------------------------------------------------------------- #
def _fake_encoder(scores):
    """encode_at scoring width b as ``scores[b]``; it draws 10 uniforms."""
    seen = []

    def encode_at(bits, rng):
        seen.append(bits)
        u = rng.random(10)
        qv = QuantizedVector(KIND_INT, bits, (1,), np.ones(1, np.float32), np.zeros(1, np.uint8))
        return qv, u, b"", scores[bits]

    return encode_at, seen


@pytest.mark.parametrize(
    "scores,chosen,tried",
    [
        ({2: 3.0, 3: 1.0, 4: 0.5, 5: 0.7, 6: 0.1}, 4, [2, 3, 4, 5]),  # stops at the first rise (6 is not tried)
        ({2: 3.0, 3: 2.0, 4: 1.0, 5: 0.5, 6: 0.4}, 6, [2, 3, 4, 5, 6]),  # always falling: the widest
        ({2: 1.0, 3: 1.5, 4: 0.1, 5: 0.1, 6: 0.1}, 2, [2, 3]),  # rises at once: the narrowest
        ({2: 1.0, 3: 0.5, 4: 0.5, 5: 0.1, 6: 0.1}, 3, [2, 3, 4]),  # a tie is not an improvement
    ],
)
def test_choose_width_stops_where_the_score_stops_falling(scores, chosen, tried):
    encode_at, seen = _fake_encoder(scores)
    rng = np.random.default_rng(9)
    qv, u, _ = choose_width(encode_at, [6, 5, 4, 3, 2], rng)
    assert qv.bits == chosen and seen == tried
    ref = np.random.default_rng(9)
    assert np.array_equal(u, ref.random(10))  # every try drew the same uniforms
    assert rng.random() == ref.random()  # and the stream is where one quantization leaves it


def test_width_score_and_budget_share():
    assert width_score(1.0, 4.0, 850, 1700.0, error_weight=1.0) == 0.75
    assert width_score(1.0, 4.0, 850, 1700.0) == 1.5  # the default weight, 4
    assert width_score(0.0, 0.0, 850, 1700.0) == 0.5  # no innovation: only the bits count
    assert width_score(2.0, 4.0, 10**6, float("inf"), error_weight=2.0) == 1.0  # no budget: only the error
    assert budget_share(17e6, 0, 20) == 850_000.0
    assert budget_share(17e6, 3, 20) == float("inf")
    assert budget_share(0, 0, 20) == float("inf")


def test_adaptive_width_needs_a_width_to_choose():
    from flq.config import ConfigError, load_config

    for overrides in ({"mode": "bin"}, {"mode": "laq8"}, {"mode": "bbit", "b_up": 2}):
        with pytest.raises(ConfigError, match="adaptive_width"):
            load_config(None, {**overrides, "adaptive_width": True})
    assert load_config(None, {"b_up": 6, "adaptive_width": True}).uplink_widths == (2, 3, 4, 5, 6)


def test_adaptive_worker_chooses_by_the_score_from_one_set_of_draws():
    """A worker's choice recomputed by hand: every width of 2..8 quantized
    from the same generator state, scored ``e / ||x||^2 + R / share``; the
    worker sends the width where the ascending scan stops, and its stream is
    left where one quantization leaves it."""
    from flq.algorithm.quantize import quantize_relative
    from flq.model import FlatModel
    from flq.worker import Worker

    cfg = small_config(model="mlp", total_workers=20, b_up=8, adaptive_width=True, entropy_coding="both")
    model = FlatModel(build_model("mlp"))
    x = np.zeros((64, 1, 28, 28), np.float32)
    w = Worker(3, cfg, model, x, np.zeros(64, np.int64), np.arange(64))
    rng = np.random.default_rng(1)
    n, segs = model.n, model.segments
    chosen_by_spread = set()
    for spread in (0.02, 1.0, 5.0):  # innovations from nearly Gaussian to heavy-tailed
        w.ref_up = rng.standard_normal(n).astype(np.float32)
        g_eff = w.ref_up + (rng.standard_t(1 + 1 / spread, n) * 1e-3).astype(np.float32)
        start = w.rng.bit_generator.state
        qv, q, payload = w._encode(g_eff)
        share = cfg.up_budget_bits / 20
        x2 = float(np.square(g_eff - w.ref_up, dtype=np.float64).sum())
        scores, states = {}, {}
        for b in range(2, 9):
            g = np.random.default_rng()
            g.bit_generator.state = start
            qb, vb = quantize_relative(g_eff, w.ref_up, b, g, segs)
            e = float(np.square(vb - g_eff, dtype=np.float64).sum())
            scores[b] = 4.0 * e / x2 + charged_bits(encode(qb, coded=True)) / share
            states[b] = g.bit_generator.state
        expected = 2
        while expected < 8 and scores[expected + 1] < scores[expected]:
            expected += 1
        assert qv.bits == expected, (spread, scores)
        assert payload == encode(qv, coded=True) and w.rng.bit_generator.state == states[expected]
        chosen_by_spread.add(expected)
    print(f"widths chosen: {sorted(chosen_by_spread)}")
    assert len(chosen_by_spread) > 1  # the width adapts to the innovation


@pytest.mark.parametrize("bits", [1, 3, 4, 8, 12])
def test_mutated_coded_bodies_decode_or_are_refused_never_crash(bits):
    """Fuzzing the decoder: 300 random mutations (byte flips, cuts, inserted
    and appended bytes, method and version changes) of valid coded bodies
    either decode to codes in range or raise PayloadError, nothing else."""
    rng = np.random.default_rng(100 + bits)
    bodies = [encode(_qv(bits, codes), coded=True) for codes in _histograms(bits).values()]
    outcomes = {"decoded": 0, "refused": 0}
    for i in range(300):
        b = bytearray(bodies[i % len(bodies)])
        op = i % 5
        at = int(rng.integers(0, len(b)))
        if op == 0:
            for j in rng.integers(0, len(b), 1 + i % 4):
                b[j] ^= int(rng.integers(1, 256))
        elif op == 1:
            del b[at:]
        elif op == 2:
            b[at:at] = rng.integers(0, 256, 1 + i % 7, dtype=np.uint8).tobytes()
        elif op == 3:
            b[header_size(bits, 3)] = int(rng.integers(0, 4))
        else:
            b[4] = int(rng.integers(0, 4))
        try:
            qv = decode(bytes(b), expected_n=N, expected_segments=SEGS, expected_bits=bits)
        except PayloadError as exc:
            assert "\n" not in str(exc)
            outcomes["refused"] += 1
        else:
            assert qv.n == N and int(qv.codes.max()) <= _top(bits)
            outcomes["decoded"] += 1
    assert outcomes["refused"] >= 200, outcomes
