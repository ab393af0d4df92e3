"""Tests for flq.algorithm.compressors: the table of uplink and downlink
schemes, with exact expected facts per entry, bit-exact agreement between
what the sender keeps and what the receiver decodes through the wire format,
and that the configuration, the Master and the Worker take their modes from
the table."""

from __future__ import annotations

import numpy as np
import pytest

from flq.algorithm import compressors, packing
from flq.algorithm.quantize import KIND_BIN, KIND_INT, KIND_RAW
from flq.config import MODES, ConfigError, load_config

SIZES = (7, 5, 12)  # three "tensors"
N = sum(SIZES)


def test_table_facts():
    # name: (bits at b_up 4, per tensor, relative, error feedback, lazy)
    want = {
        "fedavg": (32, False, False, False, False),
        "laq8": (8, False, False, False, False),
        "bbit": (4, True, True, True, True),
        "bin": (1, True, True, True, True),
    }
    got = {s.name: (s.bits(4), s.per_tensor, s.relative, s.error_feedback, s.lazy) for s in compressors.UPLINK.values()}
    assert got == want
    assert MODES == ("fedavg", "laq8", "bbit", "bin")
    assert compressors.DEFAULT_MODE in compressors.UPLINK


@pytest.mark.parametrize(
    "b_down,scheme,bits",
    [(0, "exact", 32), (32, "exact", 32), (8, "quantized", 8), (1, "quantized", 1), (16, "quantized", 16)],
)
def test_downlink_schemes(b_down, scheme, bits):
    assert compressors.downlink(b_down).name == scheme
    assert compressors.downlink_bits(b_down) == bits


def test_segments_per_tensor_or_whole_vector():
    assert compressors.uplink("bbit").segments(SIZES) == SIZES
    assert compressors.uplink("laq8").segments(SIZES) == (N,)
    assert compressors.uplink("fedavg").segments(SIZES) == (N,)


@pytest.mark.parametrize("mode,kind", [("fedavg", KIND_RAW), ("laq8", KIND_INT), ("bbit", KIND_INT), ("bin", KIND_BIN)])
def test_receiver_decodes_what_sender_keeps(mode, kind):
    """The value the sender keeps (``q``) equals, bit for bit, what the
    receiver reconstructs from the encoded bytes against its own mirror."""
    scheme = compressors.uplink(mode)
    gen = np.random.default_rng(3)
    x = gen.standard_normal(N).astype(np.float32)
    ref = gen.standard_normal(N).astype(np.float32) if scheme.relative else np.zeros(N, np.float32)
    bits = scheme.bits(4)
    qv, q = scheme.encode_update(x, ref, bits, np.random.default_rng(7), SIZES)
    assert qv.kind == kind and qv.bits == bits and qv.segments == scheme.segments(SIZES)
    wire = packing.encode(qv)
    assert len(wire) == packing.encoded_size(N, bits, len(scheme.segments(SIZES)))
    back = packing.decode(wire, expected_n=N, expected_bits=bits, expected_segments=scheme.segments(SIZES))
    got = scheme.decode_update(back, ref.copy())
    assert got.dtype == np.float32 and got.tobytes() == q.tobytes()
    if mode == "fedavg":
        assert q.tobytes() == x.tobytes()  # exact


def test_relative_scheme_sends_the_innovation():
    """bbit quantizes ``x - ref``: an ``x`` equal to the mirror is sent as all-middle codes."""
    scheme = compressors.uplink("bbit")
    ref = np.linspace(-1, 1, N, dtype=np.float32)
    qv, q = scheme.encode_update(ref.copy(), ref, 4, np.random.default_rng(0), SIZES)
    assert (qv.codes == 7).all()  # z + L with z = 0, L = 7 at 4 bits
    assert q.tobytes() == ref.tobytes()


@pytest.mark.parametrize(
    "mode,b_up,problem",
    [("bbit", 1, "mode bbit needs 2..16 bits"), ("bbit", 2, None), ("bin", 8, None), ("laq8", 16, None)],
)
def test_check_bits(mode, b_up, problem):
    assert compressors.uplink(mode).check_bits(b_up) == problem


def test_config_takes_modes_and_widths_from_the_table():
    for mode, scheme in compressors.UPLINK.items():
        cfg = load_config(None, {"mode": mode, "b_up": 4})
        assert cfg.uplink_bits == scheme.bits(4)
        assert cfg.b_up == (scheme.fixed_bits if scheme.sets_b_up else 4)
    with pytest.raises(ConfigError) as ei:
        load_config(None, {"mode": "qsgd"})
    assert "one of fedavg, laq8, bbit, bin" in str(ei.value)


def test_master_and_worker_use_the_table(monkeypatch):
    """A Master and a Worker built for a mode hold that mode's entry: no
    other place decides how a mode encodes."""
    from flq.master import Master

    cfg = load_config(None, {"mode": "laq8", "total_workers": 2, "b_down": 0})
    master = Master(cfg, SIZES, np.zeros(N, np.float32))
    assert master.up_scheme is compressors.UPLINK["laq8"]
    assert master.down_scheme is compressors.DOWNLINK_EXACT
    assert master.max_upload_bytes == packing.encoded_size(N, 8, 1, coded=True)
    assert master.upload_cost == 8 * N
