"""Stochastic quantizers of FLQ (docs/algorithm.md, "Quantizers").

All functions work on one float32 NumPy vector ``x`` of length ``n`` that is
the concatenation of the model's tensors; ``segments`` gives those tensors'
element counts (they sum to ``n``). Quantizers compute one scale per
segment: per tensor, or one segment for the whole vector (``Q8v`` of mode
``laq8``); :mod:`flq.algorithm.compressors` says which mode uses which.

A quantized vector is a :class:`QuantizedVector`: integer codes (what goes on
the wire, bit-packed by :mod:`flq.algorithm.packing`) plus float32 scales.
Its value is :func:`dequantize`. Both ends of a link reconstruct values with
the same function, so the mirrors they keep stay bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

#: Kinds of encoded vectors.
KIND_INT = "int"  #: b-bit stochastic rounding, codes z + L in 0..2L (b >= 2)
KIND_BIN = "bin"  #: 1-bit sign, scale mean|x| (the binary quantizer B)
KIND_RAW = "raw"  #: plain float32 values, 32 bits per element

MAX_BITS = 16
_EPS = np.float32(1e-12)


@dataclass(frozen=True)
class QuantizedVector:
    """A quantized (or raw) vector as it travels on a link.

    Attributes:
        kind: ``"int"`` (b-bit codes), ``"bin"`` (1-bit signs) or ``"raw"``.
        bits: bits per element: 2..16 for ``int``, 1 for ``bin``, 32 for ``raw``.
        segments: element count of each scaled block (tensor), summing to n.
        scales: float32, one per segment (``s`` for int, ``a`` for bin);
            empty for raw.
        codes: for ``int`` uint16/uint8 codes in ``0..2L``; for ``bin`` uint8
            0 (negative) / 1 (positive); for ``raw`` the float32 values.
    """

    kind: str
    bits: int
    segments: Tuple[int, ...]
    scales: np.ndarray
    codes: np.ndarray

    @property
    def n(self) -> int:
        """Number of elements."""
        return int(self.codes.shape[0])


#: ``quantize(x, bits, rng, segments) -> QuantizedVector``: the signature every quantizer has.
Quantizer = Callable[[np.ndarray, int, np.random.Generator, Sequence[int]], "QuantizedVector"]


def levels(bits: int) -> int:
    """``L = 2^(b-1) - 1``: the largest code magnitude of ``Q_b`` (b >= 2)."""
    return (1 << (bits - 1)) - 1


def _check_segments(n: int, segments: Sequence[int]) -> Tuple[int, ...]:
    segs = tuple(int(s) for s in segments)
    if sum(segs) != n or any(s <= 0 for s in segs):
        raise ValueError(f"segments {segs} do not partition a vector of length {n}")
    return segs


def _code_dtype(bits: int):
    return np.uint8 if bits <= 8 else np.uint16


def quantize_stochastic(x: np.ndarray, bits: int, rng: np.random.Generator, segments: Sequence[int]) -> QuantizedVector:
    """``Q_b(x)`` per segment, by unbiased stochastic rounding (b >= 2).

    ``L = 2^(b-1)-1``, ``s = (max|x| + 1e-12) / L``, ``y = x / s``,
    ``z = floor(y) + Bernoulli(y - floor(y))`` clipped to ``[-L, L]``; the
    code on the wire is ``z + L``. ``E[z * s] = x`` element-wise.

    Args:
        x: float32 vector, shape (n,).
        bits: 2..16.
        rng: the generator that draws the Bernoulli variables (n float32
            uniforms are drawn, in element order).
        segments: tensor sizes summing to n.

    Returns:
        A ``QuantizedVector`` of kind ``int``.

    Raises:
        ValueError: bits out of range or segments not matching n.
    """
    if not 2 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 2..{MAX_BITS}, got {bits}")
    x = np.asarray(x, dtype=np.float32)
    segs = _check_segments(x.shape[0], segments)
    L = levels(bits)
    u = rng.random((x.shape[0],), dtype=np.float32)
    codes = np.empty(x.shape[0], dtype=_code_dtype(bits))
    scales = np.empty(len(segs), dtype=np.float32)
    start = 0
    for i, size in enumerate(segs):
        xs = x[start : start + size]
        s = (np.abs(xs).max() + _EPS) / np.float32(L)
        y: np.ndarray = xs / s
        fl = np.floor(y)
        z = fl + (u[start : start + size] < (y - fl))
        np.clip(z, -L, L, out=z)
        z += np.float32(L)
        codes[start : start + size] = z
        scales[i] = s
        start += size
    return QuantizedVector(KIND_INT, bits, segs, scales, codes)


def binarize(x: np.ndarray, rng: np.random.Generator, segments: Sequence[int]) -> QuantizedVector:
    """The binary quantizer ``B(x)`` per segment (docs/algorithm.md; biased).

    ``sign(x)`` with exact zeros broken to +1 or -1 with probability 1/2, scale
    ``a = mean|x|`` per segment; value ``a * sign``. Draws n float32 uniforms
    from ``rng`` (used only where ``x == 0``) so the stream advances the same
    whatever the data.

    Returns:
        A ``QuantizedVector`` of kind ``bin`` with codes 1 (+) / 0 (-).
    """
    x = np.asarray(x, dtype=np.float32)
    segs = _check_segments(x.shape[0], segments)
    u = rng.random(x.shape[0], dtype=np.float32)
    codes = np.where(x > 0, 1, np.where(x < 0, 0, (u < 0.5))).astype(np.uint8)
    scales = np.empty(len(segs), dtype=np.float32)
    start = 0
    for i, size in enumerate(segs):
        scales[i] = np.abs(x[start : start + size]).mean(dtype=np.float64)
        start += size
    return QuantizedVector(KIND_BIN, 1, segs, scales, codes)


def raw(x: np.ndarray) -> QuantizedVector:
    """Wrap a float32 vector as an unquantized ``raw`` (32-bit) vector."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return QuantizedVector(KIND_RAW, 32, (x.shape[0],), np.empty(0, np.float32), x)


def quantize(x: np.ndarray, bits: int, rng: np.random.Generator, segments: Sequence[int]) -> QuantizedVector:
    """``Q_b`` as docs/algorithm.md uses it: ``B`` for b = 1, ``raw`` for b = 32 (or 0),
    stochastic rounding per segment otherwise."""
    if bits == 1:
        return binarize(x, rng, segments)
    if bits in (0, 32):
        return raw(x)
    return quantize_stochastic(x, bits, rng, segments)


def dequantize(qv: QuantizedVector) -> np.ndarray:
    """The float32 value of a quantized vector, shape (n,).

    ``int``: ``(code - L) * s``; ``bin``: ``a * (2 code - 1)``; ``raw``: the
    values themselves (a copy).
    """
    if qv.kind == KIND_RAW:
        return np.array(qv.codes, dtype=np.float32, copy=True)
    out = qv.codes.astype(np.float32)
    if qv.kind == KIND_INT:
        out -= np.float32(levels(qv.bits))
    elif qv.kind == KIND_BIN:
        out *= np.float32(2)
        out -= np.float32(1)
    else:
        raise ValueError(f"unknown quantized vector kind {qv.kind!r}")
    start = 0
    for s, size in zip(qv.scales, qv.segments):
        out[start : start + size] *= s
        start += size
    return out


def quantize_relative(
    x: np.ndarray,
    ref: np.ndarray,
    bits: int,
    rng: np.random.Generator,
    segments: Sequence[int],
    quantizer: Optional[Quantizer] = None,
) -> Tuple[QuantizedVector, np.ndarray]:
    """Relative quantization ``q = ref + Q_b(x - ref)`` (docs/algorithm.md, Quantizers).

    Args:
        quantizer: ``Q_b``; :func:`quantize` when None.

    Returns the wire form of ``Q_b(x - ref)`` and ``q`` (float32, shape (n,)),
    computed exactly as :func:`reconstruct` computes it on the other end.
    """
    qv = (quantizer or quantize)(np.subtract(x, ref, dtype=np.float32), bits, rng, segments)
    return qv, reconstruct(ref, qv)


def reconstruct(ref: np.ndarray, qv: QuantizedVector) -> np.ndarray:
    """``ref + dequantize(qv)`` in float32 (the receiving end of a relative link)."""
    out = dequantize(qv)
    out += ref
    return out
