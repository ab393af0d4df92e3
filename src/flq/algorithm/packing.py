"""Bit packing, entropy coding and the binary wire format of a quantized vector.

A :class:`~flq.algorithm.quantize.QuantizedVector` of ``n`` elements at ``b``
bits becomes::

    header   16 bytes   magic b"FLQV", format version (u8), kind (u8),
                        bits (u8), reserved (u8), n (u32), segment count (u32)
    segments 4 * S      element count of each segment (u32)
    scales   4 * S      float32 scale per segment (absent for raw)
    data     version 1: ceil(b n / 8) bytes of codes, bit-packed
             little-endian (element i occupies bits [i b, (i + 1) b) of the
             stream; raw: n float32)
             version 2 (entropy-coded): one method byte, then
               method 0 (stored): the version-1 data, unchanged;
               method 1 (zstd):  one Zstandard frame (RFC 8878) with its
               content size and checksum, whose content is the codes laid out
               on byte boundaries (:func:`byte_layout`).

All integers little-endian. The header, segments and scales are the *fixed
header* (:func:`header_size`); for the default model (12 tensors) it is
16 + 8 * 12 = 112 bytes. What an upload is charged (:func:`charged_bits`) is
the data: ``b n`` bits in version 1, ``8 * len(data)`` in version 2, so a
body is always ``header_size + ceil(charged / 8)`` bytes. :func:`encode` with
``coded=True`` stores instead of compressing whenever the frame would not be
smaller, so a version-2 body is never more than :data:`CODED_OVERHEAD` (1)
byte longer than version 1.

:func:`decode` reads both versions, validates everything before allocating
more than the body's size (declared sizes must equal what the header implies)
and raises :class:`PayloadError` (a ``ValueError``) with a one-line reason.
Why Zstandard, level 1: measured on FLQ's uploads it lands within 6 % of the
codes' order-0 entropy at 4-8 bits (below it where runs repeat), codes a
467,818-element 4-bit vector in about 2 ms and decodes it in 1, is a standard format
with a long-kept library and wheels for every platform FLQ runs on (Jetson's
aarch64 included); docs/algorithm.md, "Wire format", gives the figures.
"""

from __future__ import annotations

import struct
from typing import Collection, Optional, Sequence, Tuple, Union

import numpy as np
import zstandard

from .quantize import KIND_BIN, KIND_INT, KIND_RAW, MAX_BITS, QuantizedVector, levels

MAGIC = b"FLQV"
FORMAT_VERSION = 1
#: Version of entropy-coded bodies (method byte, then stored or zstd data).
FORMAT_CODED = 2
METHOD_STORED = 0
METHOD_ZSTD = 1
#: Most bytes a version-2 body has beyond the version-1 body of the same vector.
CODED_OVERHEAD = 1
ZSTD_LEVEL = 1
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
    used = (bits * n) % 8
    if used and data[-1] >> used:
        raise PayloadError("unused bits of the last packed byte are not zero")
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


def byte_layout(codes: np.ndarray, bits: int) -> bytes:
    """The codes on byte boundaries, the content of a zstd frame.

    1 bit: 8 codes per byte; 2 bits: 4 per byte; 3-4 bits: 2 per byte
    (nibbles); 5-8 bits: one byte each; 9-16 bits: two bytes each
    (little-endian); raw (32): the float32 values. Packing is that of
    :func:`pack_bits` at the container width, so whole codes never straddle
    a byte, which is what lets a byte-oriented coder see their statistics.
    """
    if bits == 32:
        return np.ascontiguousarray(codes, dtype="<f4").tobytes()
    return pack_bits(codes, _container(bits))


def _container(bits: int) -> int:
    """The width a code occupies in :func:`byte_layout` (raw: 32)."""
    for width in (1, 2, 4, 8, 16):
        if bits <= width:
            return width
    return 32


def _data_v1(qv: QuantizedVector) -> bytes:
    if qv.kind == KIND_RAW:
        return np.asarray(qv.codes, dtype="<f4").tobytes()
    return pack_bits(qv.codes, qv.bits)


def encode(qv: QuantizedVector, coded: bool = False) -> bytes:
    """Serialize a quantized vector: version 1, or version 2 when ``coded``.

    Deterministic: the same vector gives the same bytes (zstd at a fixed
    level, one thread), so the simulator and the cluster charge the same.
    """
    nseg = len(qv.segments)
    head = _HEADER.pack(MAGIC, FORMAT_CODED if coded else FORMAT_VERSION, _KIND_CODES[qv.kind], qv.bits, 0, qv.n, nseg)
    segs = np.asarray(qv.segments, dtype="<u4").tobytes()
    scales = b"" if qv.kind == KIND_RAW else np.asarray(qv.scales, dtype="<f4").tobytes()
    if not coded:
        return b"".join((head, segs, scales, _data_v1(qv)))
    frame = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, write_content_size=True).compress(
        byte_layout(qv.codes, qv.bits)
    )
    if len(frame) < packed_size(qv.n, qv.bits):
        return b"".join((head, segs, scales, bytes([METHOD_ZSTD]), frame))
    return b"".join((head, segs, scales, bytes([METHOD_STORED]), _data_v1(qv)))


def header_size(bits: int, n_segments: int) -> int:
    """Bytes of the fixed header (magic ... scales) of a ``bits``-bit vector of
    ``n_segments`` segments: ``16 + 4 S`` for raw, ``16 + 8 S`` otherwise."""
    return _HEADER.size + 4 * n_segments + (0 if bits == 32 else 4 * n_segments)


def encoded_size(n: int, bits: int, n_segments: int, coded: bool = False) -> int:
    """Exact length in bytes of :func:`encode`'s version-1 output; with
    ``coded``, the most a version-2 body can be (stored: one byte more)."""
    return header_size(bits, n_segments) + packed_size(n, bits) + (CODED_OVERHEAD if coded else 0)


def charged_bits(payload: bytes) -> int:
    """Uplink/downlink bits an encoded vector is charged: its data after the
    fixed header, ``b n`` for version 1 and ``8 * bytes`` for version 2.
    Reads only the header and the length, so a receiver can compare the
    charge with what was offered before decoding anything; :func:`decode`
    validates the rest.

    Raises:
        PayloadError: shorter than the 16-byte header.
    """
    if len(payload) < _HEADER.size:
        raise PayloadError(f"body is {len(payload)} bytes, shorter than the {_HEADER.size}-byte header")
    _, version, _, bits, _, n, nseg = _HEADER.unpack_from(payload)
    if version == FORMAT_VERSION:
        return bits * n
    return 8 * (len(payload) - header_size(bits, nseg))


def decode(
    data: bytes,
    expected_n: Optional[int] = None,
    expected_segments: Optional[Sequence[int]] = None,
    expected_bits: Union[None, int, Collection[int]] = None,
    expected_version: Optional[int] = None,
) -> QuantizedVector:
    """Parse and validate an encoded vector of either version.

    Args:
        data: bytes produced by :func:`encode`.
        expected_n / expected_segments: when given, the payload must match them.
        expected_bits: the width, or the widths allowed (adaptive width).
        expected_version: the format the link sends (1, or 2 with entropy
            coding), when given.

    Raises:
        PayloadError: truncated or oversized body, bad magic or version,
            not the link's version, a reserved byte other than 0, unknown
            kind, bits out of range, element count or segments not as
            expected, NaN/Inf scales or values, codes out of range, unused
            bits of the last packed byte not zero; for version 2 an unknown
            method, a zstd frame that does not declare exactly the size of
            its codes or carries no checksum, is corrupt (checksum), is cut
            short or is followed by other bytes.
    """
    data = bytes(data) if not isinstance(data, bytes) else data
    if len(data) < _HEADER.size:
        raise PayloadError(f"body is {len(data)} bytes, shorter than the {_HEADER.size}-byte header")
    magic, version, kind_code, bits, reserved, n, nseg = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise PayloadError("bad magic: not an FLQ encoded vector")
    if version not in (FORMAT_VERSION, FORMAT_CODED):
        raise PayloadError(f"unsupported format version {version} (this build reads 1 and 2)")
    if expected_version is not None and version != expected_version:
        raise PayloadError(
            f"format version {version}, but this link sends version {expected_version} "
            f"(entropy coding {'on' if expected_version == FORMAT_CODED else 'off'})"
        )
    if reserved != 0:
        raise PayloadError(f"reserved header byte is {reserved}, must be 0")
    kind = _KIND_NAMES.get(kind_code)
    if kind is None:
        raise PayloadError(f"unknown vector kind code {kind_code}")
    allowed = {KIND_INT: range(2, MAX_BITS + 1), KIND_BIN: (1,), KIND_RAW: (32,)}[kind]
    if bits not in allowed:
        raise PayloadError(f"bits {bits} not allowed for kind {kind!r}")
    if isinstance(expected_bits, int) and bits != expected_bits:
        raise PayloadError(f"bits {bits} but this link uses {expected_bits}")
    if expected_bits is not None and not isinstance(expected_bits, int) and bits not in expected_bits:
        raise PayloadError(f"bits {bits} but this link uses one of {sorted(expected_bits)}")
    if n > MAX_ELEMENTS or nseg > n or nseg < 1:
        raise PayloadError(f"element count {n} / segment count {nseg} out of range")
    if expected_n is not None and n != expected_n:
        raise PayloadError(f"element count {n}, expected {expected_n}")
    head = header_size(bits, nseg)
    if version == FORMAT_VERSION:
        want = encoded_size(n, bits, nseg)
        if len(data) != want:
            raise PayloadError(f"body is {len(data)} bytes, expected {want} for {n} values at {bits} bits")
    elif not head < len(data) <= encoded_size(n, bits, nseg, coded=True):
        raise PayloadError(
            f"coded body is {len(data)} bytes, outside {head + 1}..{encoded_size(n, bits, nseg, True)} "
            f"for {n} values at {bits} bits"
        )
    off = _HEADER.size
    segs = tuple(int(s) for s in np.frombuffer(data, dtype="<u4", count=nseg, offset=off))
    off += 4 * nseg
    if sum(segs) != n or min(segs) == 0:
        raise PayloadError(f"segment sizes do not add up to {n}")
    if expected_segments is not None and segs != tuple(expected_segments):
        raise PayloadError("segment sizes do not match the model's tensors")
    scales = np.empty(0, np.float32)
    if kind != KIND_RAW:
        scales = np.frombuffer(data, dtype="<f4", count=nseg, offset=off).astype(np.float32)
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise PayloadError("scales contain NaN, Inf or negative values")
    body, width = data[head:], bits
    if version == FORMAT_CODED:
        body, width = _uncode(body, n, bits)
    if kind == KIND_RAW:
        values = np.frombuffer(body, dtype="<f4", count=n).astype(np.float32)
        if not np.isfinite(values).all():
            raise PayloadError("values contain NaN or Inf")
        return QuantizedVector(kind, bits, segs, scales, values)
    codes = unpack_bits(body, width, n)
    if kind == KIND_INT and codes.size and int(codes.max()) > 2 * levels(bits):
        raise PayloadError(f"a code exceeds 2L = {2 * levels(bits)} for {bits} bits")
    return QuantizedVector(kind, bits, segs, scales, codes)


def _uncode(body: bytes, n: int, bits: int) -> Tuple[bytes, int]:
    """A version-2 data section (method byte first) -> (codes, packed at the
    width returned: ``bits`` when stored, the layout's container when zstd)."""
    method, rest = body[0], body[1:]
    if method == METHOD_STORED:
        if len(rest) != packed_size(n, bits):
            raise PayloadError(f"stored data is {len(rest)} bytes, expected {packed_size(n, bits)}")
        return rest, bits
    if method != METHOD_ZSTD:
        raise PayloadError(f"unknown coding method {method} (0 stored, 1 zstd)")
    size = packed_size(n, _container(bits))
    try:
        declared = zstandard.frame_content_size(rest)
    except zstandard.ZstdError:
        raise PayloadError("coded data is not a zstd frame") from None
    if declared != size:
        raise PayloadError(
            f"zstd frame declares {declared} bytes of codes, expected {size} for {n} values at {bits} bits"
        )
    if not zstandard.get_frame_parameters(rest).has_checksum:
        raise PayloadError("zstd frame carries no checksum")
    dobj = zstandard.ZstdDecompressor().decompressobj()
    try:
        layout = dobj.decompress(rest)
    except zstandard.ZstdError as exc:
        raise PayloadError(f"corrupt zstd frame: {exc}") from None
    if not dobj.eof or len(layout) != size:
        raise PayloadError("zstd frame is cut short")
    if dobj.unused_data:
        raise PayloadError(f"{len(dobj.unused_data)} bytes follow the zstd frame")
    return layout, _container(bits)
