"""Bit packing and the binary wire format of a quantized vector.

A :class:`~flq.algorithm.quantize.QuantizedVector` of ``n`` elements at ``b``
bits becomes::

    header   16 bytes   magic b"FLQV", format version (u8), kind (u8),
                        bits (u8), reserved (u8), n (u32), segment count (u32)
    segments 4 * S      element count of each segment (u32)
    scales   4 * S      float32 scale per segment (absent for raw)
    data     ceil(b n / 8) bytes of codes, bit-packed little-endian
             (element i occupies bits [i b, (i + 1) b) of the stream;
             raw: n float32)

All integers little-endian. For the default model (12 tensors) the overhead
beyond ``ceil(b n / 8)`` is 16 + 8 * 12 = 112 bytes. :func:`decode` validates everything and
raises :class:`PayloadError` (a ``ValueError``) with a one-line reason.
"""

from __future__ import annotations

import struct
from typing import Optional, Sequence

import numpy as np

from .quantize import KIND_BIN, KIND_INT, KIND_RAW, MAX_BITS, QuantizedVector, levels

MAGIC = b"FLQV"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sBBBBII")
_KIND_CODES = {KIND_INT: 0, KIND_BIN: 1, KIND_RAW: 2}
_KIND_NAMES = {v: k for k, v in _KIND_CODES.items()}
#: Largest element count accepted by :func:`decode` (guards allocations).
MAX_ELEMENTS = 1 << 28


class PayloadError(ValueError):
    """A byte string that is not a valid encoded vector (one-line reason)."""


def packed_size(n: int, bits: int) -> int:
    """Bytes of bit-packed data for ``n`` elements at ``bits``: ``ceil(b n / 8)``."""
    return (bits * n + 7) // 8


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Pack unsigned integer codes (each < 2^bits) into ``ceil(bits n / 8)`` bytes.

    Little-endian bit order: element i's bit j is stream bit ``i*bits + j``,
    and stream bit t is bit ``t % 8`` of byte ``t // 8``.

    Raises:
        ValueError: bits not in 1..16, or a code does not fit in ``bits``.
    """
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    codes = np.asarray(codes)
    if codes.size and int(codes.max()) >= (1 << bits):
        raise ValueError(f"a code does not fit in {bits} bits")
    if bits == 8:
        return codes.astype(np.uint8).tobytes()
    if bits == 16:
        return codes.astype("<u2").tobytes()
    if bits == 1:
        return np.packbits(codes.astype(np.uint8), bitorder="little").tobytes()
    if bits == 4:
        c = codes.astype(np.uint8)
        if c.size % 2:
            c = np.append(c, np.uint8(0))
        return (c[0::2] | (c[1::2] << 4)).tobytes()
    if bits == 2:
        c = codes.astype(np.uint8)
        pad = (-c.size) % 4
        if pad:
            c = np.append(c, np.zeros(pad, np.uint8))
        c = c.reshape(-1, 4)
        return (c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)).tobytes()
    shifts = np.arange(bits, dtype=np.uint16)
    bitmat = ((codes.astype(np.uint16)[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bitmat.ravel(), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``n`` codes (uint8 for b <= 8, else uint16).

    Raises:
        PayloadError: ``data`` is not exactly ``ceil(bits n / 8)`` bytes.
    """
    if not 1 <= bits <= MAX_BITS:
        raise PayloadError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    need = packed_size(n, bits)
    if len(data) != need:
        raise PayloadError(f"packed data is {len(data)} bytes, expected {need} for {n} values at {bits} bits")
    buf = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return buf.copy()
    if bits == 16:
        return np.frombuffer(data, dtype="<u2").astype(np.uint16)
    if bits == 1:
        return np.unpackbits(buf, count=n, bitorder="little")
    if bits == 4:
        out = np.empty(2 * buf.size, np.uint8)
        out[0::2] = buf & 0x0F
        out[1::2] = buf >> 4
        return out[:n]
    if bits == 2:
        out = np.empty((buf.size, 4), np.uint8)
        for j in range(4):
            out[:, j] = (buf >> (2 * j)) & 3
        return out.ravel()[:n]
    bitmat = np.unpackbits(buf, count=n * bits, bitorder="little").reshape(n, bits)
    weights = (1 << np.arange(bits, dtype=np.uint32)).astype(np.uint32)
    codes = bitmat.astype(np.uint32) @ weights
    return codes.astype(np.uint8 if bits <= 8 else np.uint16)


def encode(qv: QuantizedVector) -> bytes:
    """Serialize a quantized vector to the wire format of this module."""
    nseg = len(qv.segments)
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, _KIND_CODES[qv.kind], qv.bits, 0, qv.n, nseg)
    segs = np.asarray(qv.segments, dtype="<u4").tobytes()
    if qv.kind == KIND_RAW:
        return b"".join((head, segs, np.asarray(qv.codes, dtype="<f4").tobytes()))
    scales = np.asarray(qv.scales, dtype="<f4").tobytes()
    return b"".join((head, segs, scales, pack_bits(qv.codes, qv.bits)))


def encoded_size(n: int, bits: int, n_segments: int) -> int:
    """Exact length in bytes of :func:`encode`'s output."""
    scales = 0 if bits == 32 else 4 * n_segments
    data = 4 * n if bits == 32 else packed_size(n, bits)
    return _HEADER.size + 4 * n_segments + scales + data


def decode(
    data: bytes,
    expected_n: Optional[int] = None,
    expected_segments: Optional[Sequence[int]] = None,
    expected_bits: Optional[int] = None,
) -> QuantizedVector:
    """Parse and validate an encoded vector.

    Args:
        data: bytes produced by :func:`encode`.
        expected_n / expected_segments / expected_bits: when given, the
            payload must match them.

    Raises:
        PayloadError: truncated or oversized body, bad magic or version,
            unknown kind, bits out of range, element count or segments not
            as expected, NaN/Inf scales or values, codes out of range.
    """
    data = bytes(data) if not isinstance(data, bytes) else data
    if len(data) < _HEADER.size:
        raise PayloadError(f"body is {len(data)} bytes, shorter than the {_HEADER.size}-byte header")
    magic, version, kind_code, bits, _, n, nseg = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise PayloadError("bad magic: not an FLQ encoded vector")
    if version != FORMAT_VERSION:
        raise PayloadError(f"unsupported format version {version} (this build reads {FORMAT_VERSION})")
    kind = _KIND_NAMES.get(kind_code)
    if kind is None:
        raise PayloadError(f"unknown vector kind code {kind_code}")
    allowed = {KIND_INT: range(2, MAX_BITS + 1), KIND_BIN: (1,), KIND_RAW: (32,)}[kind]
    if bits not in allowed:
        raise PayloadError(f"bits {bits} not allowed for kind {kind!r}")
    if expected_bits is not None and bits != expected_bits:
        raise PayloadError(f"bits {bits} but this link uses {expected_bits}")
    if n > MAX_ELEMENTS or nseg > n or nseg < 1:
        raise PayloadError(f"element count {n} / segment count {nseg} out of range")
    if expected_n is not None and n != expected_n:
        raise PayloadError(f"element count {n}, expected {expected_n}")
    want = encoded_size(n, bits, nseg)
    if len(data) != want:
        raise PayloadError(f"body is {len(data)} bytes, expected {want} for {n} values at {bits} bits")
    off = _HEADER.size
    segs = tuple(int(s) for s in np.frombuffer(data, dtype="<u4", count=nseg, offset=off))
    off += 4 * nseg
    if sum(segs) != n or min(segs) == 0:
        raise PayloadError(f"segment sizes do not add up to {n}")
    if expected_segments is not None and segs != tuple(expected_segments):
        raise PayloadError("segment sizes do not match the model's tensors")
    if kind == KIND_RAW:
        values = np.frombuffer(data, dtype="<f4", count=n, offset=off).astype(np.float32)
        if not np.isfinite(values).all():
            raise PayloadError("values contain NaN or Inf")
        return QuantizedVector(kind, bits, segs, np.empty(0, np.float32), values)
    scales = np.frombuffer(data, dtype="<f4", count=nseg, offset=off).astype(np.float32)
    off += 4 * nseg
    if not np.isfinite(scales).all() or (scales < 0).any():
        raise PayloadError("scales contain NaN, Inf or negative values")
    codes = unpack_bits(data[off:], bits, n)
    if kind == KIND_INT and codes.size and int(codes.max()) > 2 * levels(bits):
        raise PayloadError(f"a code exceeds 2L = {2 * levels(bits)} for {bits} bits")
    return QuantizedVector(kind, bits, segs, scales, codes)
