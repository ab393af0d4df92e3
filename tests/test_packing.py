"""Tests for flq.algorithm.packing: bit packing and the wire format of a
quantized vector (header, segments, scales, packed codes) and every way
`decode` rejects a malformed body."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

import flq.model
from flq.algorithm.packing import (
    FORMAT_VERSION,
    MAGIC,
    PayloadError,
    decode,
    encode,
    encoded_size,
    pack_bits,
    packed_size,
    unpack_bits,
)
from flq.algorithm.quantize import (
    KIND_BIN,
    KIND_INT,
    KIND_RAW,
    QuantizedVector,
    binarize,
    levels,
    quantize_stochastic,
    raw,
)

HEADER = struct.Struct("<4sBBBBII")  # magic, version, kind, bits, reserved, n, nseg
KIND_CODE = {KIND_INT: 0, KIND_BIN: 1, KIND_RAW: 2}
MODEL_SEGMENTS = tuple(p.numel() for p in flq.model.CNN().parameters())


def _codes(n: int, bits: int, seed: int) -> np.ndarray:
    """Random codes in 0..2^b-1 that always include 0 and 2^b-1 (when n >= 2)."""
    rng = np.random.default_rng(seed)
    c = rng.integers(0, 1 << bits, size=n, dtype=np.int64)
    c[0] = (1 << bits) - 1
    if n >= 2:
        c[-1] = 0
    if n >= 3:
        c[n // 2] = (1 << bits) - 1
    return c.astype(np.uint8 if bits <= 8 else np.uint16)


def _body(
    kind_code=0, bits=4, n=3, segs=(3,), scales=(1.0,), data=None, magic=MAGIC, version=FORMAT_VERSION, nseg=None
) -> bytes:
    """Hand-build an encoded body (independent of encode())."""
    nseg = len(segs) if nseg is None else nseg
    head = HEADER.pack(magic, version, kind_code, bits, 0, n, nseg)
    out = head + struct.pack(f"<{len(segs)}I", *segs)
    out += struct.pack(f"<{len(scales)}f", *scales)
    if data is None:
        data = bytes(packed_size(n, bits)) if bits != 32 else bytes(4 * n)
    return out + data


def _assert_one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg, repr(msg)
    return msg


# --------------------------------------------------------------------------
# pack_bits / unpack_bits


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("n", [1, 3, 7, 13, 1001])
def test_pack_unpack_round_trip_every_width(bits, n):
    codes = _codes(n, bits, seed=bits * 1000 + n)
    packed = pack_bits(codes, bits)
    assert isinstance(packed, bytes)
    # exactly ceil(b n / 8) bytes
    assert len(packed) == math.ceil(bits * n / 8) == packed_size(n, bits)
    back = unpack_bits(packed, bits, n)
    assert back.dtype == (np.uint8 if bits <= 8 else np.uint16)
    assert back.shape == (n,)
    np.testing.assert_array_equal(back, codes)


@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_matches_reference_bit_stream(bits):
    # Independent reference: element i's bit j is stream bit i*b + j, stream
    # bit t is bit t % 8 of byte t // 8 -> the stream is the little-endian
    # integer sum(code_i << (i b)).
    n = 13
    codes = _codes(n, bits, seed=77 + bits)
    big = 0
    for i, c in enumerate(codes.tolist()):
        big |= int(c) << (i * bits)
    want = big.to_bytes(math.ceil(bits * n / 8), "little")
    assert pack_bits(codes, bits) == want


def test_pack_hand_examples():
    # b=3, [1,2,3,4,5]: 1 | 2<<3 | 3<<6 | 4<<9 | 5<<12 = 1+16+192+2048+20480
    # = 22737 = 0x58D1; 15 bits -> 2 bytes, little-endian: D1 58.
    assert pack_bits(np.array([1, 2, 3, 4, 5]), 3) == b"\xd1\x58"
    # b=4, [1,2,3]: low nibble first: 0x21, then 0x03 (12 bits -> 2 bytes).
    assert pack_bits(np.array([1, 2, 3]), 4) == b"\x21\x03"
    # b=1, [1,0,1,1,0,0,0,1, 1]: byte0 bits 0,2,3,7 -> 1+4+8+128 = 0x8D; byte1 = 0x01.
    assert pack_bits(np.array([1, 0, 1, 1, 0, 0, 0, 1, 1]), 1) == b"\x8d\x01"
    # b=12, [0xABC, 0x123]: 0xABC | 0x123 << 12 = 0x123ABC -> BC 3A 12.
    assert pack_bits(np.array([0xABC, 0x123]), 12) == b"\xbc\x3a\x12"
    # b=12, [0xABC]: 12 bits -> 2 bytes BC 0A.
    assert pack_bits(np.array([0xABC]), 12) == b"\xbc\x0a"
    # b=2, [3,0,1,2,1]: 3 | 0<<2 | 1<<4 | 2<<6 = 3+16+128 = 0x93; then 0x01.
    assert pack_bits(np.array([3, 0, 1, 2, 1]), 2) == b"\x93\x01"
    # b=16, [0x1234]: little-endian 34 12.
    assert pack_bits(np.array([0x1234]), 16) == b"\x34\x12"
    # b=8 identity.
    assert pack_bits(np.array([0, 255, 7]), 8) == b"\x00\xff\x07"


def test_unpack_hand_examples():
    np.testing.assert_array_equal(unpack_bits(b"\xd1\x58", 3, 5), [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(unpack_bits(b"\x21\x03", 4, 3), [1, 2, 3])
    np.testing.assert_array_equal(unpack_bits(b"\x8d\x01", 1, 9), [1, 0, 1, 1, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(unpack_bits(b"\xbc\x3a\x12", 12, 2), [0xABC, 0x123])


def test_pack_empty():
    assert pack_bits(np.array([], dtype=np.uint8), 5) == b""
    assert unpack_bits(b"", 5, 0).shape == (0,)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError):
        pack_bits(np.array([8]), 3)  # 8 needs 4 bits
    with pytest.raises(ValueError):
        pack_bits(np.array([1 << 16]), 16)
    with pytest.raises(ValueError):
        pack_bits(np.array([1]), 0)
    with pytest.raises(ValueError):
        pack_bits(np.array([1]), 17)


def test_unpack_rejects_wrong_length():
    with pytest.raises(PayloadError) as ei:
        unpack_bits(b"\x00\x00\x00", 3, 5)  # needs 2 bytes
    _assert_one_line(ei)
    with pytest.raises(PayloadError):
        unpack_bits(b"\x00", 3, 5)
    with pytest.raises(PayloadError):
        unpack_bits(b"\x00", 17, 1)


# --------------------------------------------------------------------------
# encode / decode


def _int_qv(bits, segs, seed=0):
    rng = np.random.default_rng(seed)
    n = sum(segs)
    x = rng.standard_normal(n).astype(np.float32)
    return quantize_stochastic(x, bits, rng, segs)


def _assert_qv_equal(a: QuantizedVector, b: QuantizedVector):
    assert a.kind == b.kind and a.bits == b.bits and a.segments == b.segments
    np.testing.assert_array_equal(
        a.scales.view(np.uint32) if a.scales.size else a.scales, b.scales.view(np.uint32) if b.scales.size else b.scales
    )
    np.testing.assert_array_equal(a.codes, b.codes)


@pytest.mark.parametrize("bits", range(2, 17))
def test_encode_decode_int(bits):
    segs = (5, 1, 7, 13)
    qv = _int_qv(bits, segs, seed=bits)
    # make sure both extreme codes are present
    assert qv.codes.min() == 0 or qv.codes.max() == 2 * levels(bits)
    body = encode(qv)
    assert len(body) == encoded_size(qv.n, bits, len(segs))
    # 16 header + 4*S segments + 4*S scales + ceil(b n / 8)
    assert len(body) == 16 + 8 * len(segs) + math.ceil(bits * 26 / 8)
    back = decode(body, expected_n=26, expected_segments=segs, expected_bits=bits)
    _assert_qv_equal(back, qv)
    assert back.codes.dtype == (np.uint8 if bits <= 8 else np.uint16)


def test_encode_layout_exact_bytes():
    # b=4, codes [1,2,3], one segment of 3, scale 0.5
    qv = QuantizedVector(KIND_INT, 4, (3,), np.array([0.5], np.float32), np.array([1, 2, 3], np.uint8))
    want = (
        b"FLQV"
        + bytes([1, 0, 4, 0])
        + struct.pack("<II", 3, 1)
        + struct.pack("<I", 3)
        + struct.pack("<f", 0.5)
        + b"\x21\x03"
    )
    assert encode(qv) == want
    assert len(want) == encoded_size(3, 4, 1) == 16 + 4 + 4 + 2


def test_encode_decode_bin():
    segs = (4, 9, 1)
    rng = np.random.default_rng(3)
    x = rng.standard_normal(14).astype(np.float32)
    x[2] = 0.0
    qv = binarize(x, rng, segs)
    body = encode(qv)
    assert len(body) == encoded_size(14, 1, 3) == 16 + 24 + 2
    back = decode(body, expected_n=14, expected_segments=segs, expected_bits=1)
    _assert_qv_equal(back, qv)


def test_encode_decode_raw_several_segments():
    segs = (2, 5, 3)
    x = np.array([1.5, -2, 0, 3.25, 1e-30, -1e30, 7, 8, 9, -0.0], np.float32)
    qv = QuantizedVector(KIND_RAW, 32, segs, np.empty(0, np.float32), x)
    body = encode(qv)
    # no scales for raw: 16 + 4*3 + 4*10
    assert len(body) == encoded_size(10, 32, 3) == 16 + 12 + 40
    back = decode(body, expected_n=10, expected_segments=segs, expected_bits=32)
    assert back.kind == KIND_RAW and back.segments == segs and back.scales.size == 0
    np.testing.assert_array_equal(back.codes.view(np.uint32), x.view(np.uint32))
    # the single-segment raw() helper round trips too
    back1 = decode(encode(raw(x)))
    np.testing.assert_array_equal(back1.codes, x)
    assert back1.segments == (10,)


@pytest.mark.parametrize("bits,nseg", [(1, 1), (2, 3), (5, 12), (8, 2), (13, 4), (16, 1), (32, 3)])
def test_encoded_size_matches_encode(bits, nseg):
    segs = tuple([7] * (nseg - 1) + [11])
    n = sum(segs)
    if bits == 32:
        qv = QuantizedVector(KIND_RAW, 32, segs, np.empty(0, np.float32), np.ones(n, np.float32))
    elif bits == 1:
        qv = binarize(np.linspace(-1, 1, n).astype(np.float32), np.random.default_rng(0), segs)
    else:
        qv = _int_qv(bits, segs)
    assert len(encode(qv)) == encoded_size(n, bits, nseg)


def test_model_header_overhead():
    assert MODEL_SEGMENTS == (288, 32, 9216, 32, 18432, 64, 36864, 64, 401408, 128, 1280, 10)
    n = sum(MODEL_SEGMENTS)
    assert n == 467818
    data = math.ceil(4 * n / 8)  # 233909
    size = encoded_size(n, 4, len(MODEL_SEGMENTS))
    # header 16 + 12 segment sizes + 12 scales
    assert size - data == 16 + 8 * 12 == 112
    assert size <= 1.01 * data
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n).astype(np.float32)
    qv = quantize_stochastic(x, 4, rng, MODEL_SEGMENTS)
    body = encode(qv)
    assert len(body) == size
    back = decode(body, expected_n=n, expected_segments=MODEL_SEGMENTS, expected_bits=4)
    np.testing.assert_array_equal(back.codes, qv.codes)


# --------------------------------------------------------------------------
# decode rejections: every one a PayloadError with a one-line message


def _good_int_body():
    return encode(
        QuantizedVector(KIND_INT, 4, (2, 3), np.array([0.5, 2.0], np.float32), np.array([0, 14, 7, 3, 1], np.uint8))
    )


def test_good_reference_body_decodes():
    qv = decode(_good_int_body(), expected_n=5, expected_segments=(2, 3), expected_bits=4)
    np.testing.assert_array_equal(qv.codes, [0, 14, 7, 3, 1])
    np.testing.assert_array_equal(qv.scales, [0.5, 2.0])


def _rejects(body, **kw):
    with pytest.raises(PayloadError) as ei:
        decode(body, **kw)
    return _assert_one_line(ei)


def test_decode_truncated_header():
    body = _good_int_body()
    for cut in (0, 1, 4, 15):
        _rejects(body[:cut])


def test_decode_truncated_data():
    body = _good_int_body()
    _rejects(body[:-1])
    _rejects(body[: 16 + 8])  # header + segments only


def test_decode_extra_bytes():
    _rejects(_good_int_body() + b"\x00")


def test_decode_bad_magic():
    body = _good_int_body()
    msg = _rejects(b"FLQX" + body[4:])
    assert "magic" in msg


def test_decode_bad_version():
    body = bytearray(_good_int_body())
    body[4] = 3  # neither 1 nor 2
    assert "version" in _rejects(bytes(body))


def test_decode_unknown_kind():
    body = bytearray(_good_int_body())
    body[5] = 3
    assert "kind" in _rejects(bytes(body))


@pytest.mark.parametrize("kind_code,bits", [(0, 1), (0, 17), (0, 32), (0, 0), (1, 2), (1, 0), (2, 16), (2, 1)])
def test_decode_bits_out_of_range_for_kind(kind_code, bits):
    n = 3
    if kind_code == 2:
        body = _body(kind_code, bits, n, segs=(3,), scales=(), data=bytes(4 * n))
    else:
        body = _body(kind_code, bits, n, segs=(3,), scales=(1.0,), data=bytes(max(packed_size(n, max(bits, 1)), 1)))
    assert "bits" in _rejects(body)


def test_decode_hand_built_bodies_are_accepted():
    # the hand builder produces valid bodies: otherwise the rejections
    # below would prove nothing
    qv = decode(_body(0, 4, 3, segs=(3,), scales=(1.0,), data=b"\x21\x03"))
    np.testing.assert_array_equal(qv.codes, [1, 2, 3])
    qv = decode(_body(2, 32, 2, segs=(1, 1), scales=(), data=struct.pack("<2f", 1.0, -2.0)))
    np.testing.assert_array_equal(qv.codes, [1.0, -2.0])
    qv = decode(_body(1, 1, 3, segs=(3,), scales=(0.25,), data=b"\x05"))
    np.testing.assert_array_equal(qv.codes, [1, 0, 1])


def test_decode_wrong_expected_values():
    body = _good_int_body()
    _rejects(body, expected_n=6)
    _rejects(body, expected_bits=3)
    _rejects(body, expected_bits=8)
    _rejects(body, expected_segments=(3, 2))
    _rejects(body, expected_segments=(5,))
    _rejects(body, expected_segments=[1, 1, 3])


def test_decode_segment_sums_wrong():
    # two segments of 2 + 2 = 4 but n = 5
    _rejects(_body(0, 4, 5, segs=(2, 2), scales=(1.0, 1.0)))
    # 3 + 3 = 6 > 5
    _rejects(_body(0, 4, 5, segs=(3, 3), scales=(1.0, 1.0)))
    # a zero-length segment: 0 + 5
    _rejects(_body(0, 4, 5, segs=(0, 5), scales=(1.0, 1.0)))
    # segment count 0
    _rejects(_body(0, 4, 5, segs=(), scales=()))
    # more segments than elements
    _rejects(_body(0, 4, 2, segs=(1, 1, 0), scales=(1.0, 1.0, 1.0)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), -1.0, -1e-30])
@pytest.mark.parametrize("kind_code,bits", [(0, 4), (1, 1)])
def test_decode_bad_scales(bad, kind_code, bits):
    body = _body(kind_code, bits, 3, segs=(1, 2), scales=(1.0, bad))
    assert "scale" in _rejects(body)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_decode_raw_nan(bad):
    body = _body(2, 32, 3, segs=(3,), scales=(), data=struct.pack("<3f", 1.0, bad, 2.0))
    _rejects(body)


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_decode_code_above_2L(bits):
    # largest code that fits in b bits is 2^b - 1 = 2L + 1: one above 2L
    n = 3
    codes = np.array([0, (1 << bits) - 1, 1])
    body = _body(0, bits, n, segs=(n,), scales=(1.0,), data=pack_bits(codes, bits))
    assert "2L" in _rejects(body)
    # while 2L itself is fine
    ok = _body(0, bits, n, segs=(n,), scales=(1.0,), data=pack_bits(np.array([0, 2 * levels(bits), 1]), bits))
    assert int(decode(ok).codes.max()) == 2 * levels(bits)


def test_decode_b4_code_15_hand_bytes():
    # b=4 codes [15, 0]: byte 0x0F; 15 > 2L = 14
    body = _body(0, 4, 2, segs=(2,), scales=(1.0,), data=b"\x0f")
    _rejects(body)
    # [14, 0] -> 0x0E is accepted
    np.testing.assert_array_equal(decode(_body(0, 4, 2, segs=(2,), scales=(1.0,), data=b"\x0e")).codes, [14, 0])


def test_decode_accepts_bytearray_and_memoryview():
    body = _good_int_body()
    a = decode(bytearray(body))
    b = decode(memoryview(body))
    np.testing.assert_array_equal(a.codes, b.codes)


def test_decode_huge_claimed_count_rejected_without_allocating():
    # a 24-byte body claiming 2^28 + 1 elements is refused up front
    body = HEADER.pack(MAGIC, FORMAT_VERSION, 0, 4, 0, (1 << 28) + 1, 1) + struct.pack("<If", 1, 1.0)
    _rejects(body)
    body = HEADER.pack(MAGIC, FORMAT_VERSION, 2, 32, 0, 0xFFFFFFFF, 1) + struct.pack("<I", 1)
    _rejects(body)
