"""The uplink and downlink schemes of FLQ, one entry each (docs/algorithm.md, "Modes").

Every fact about a scheme lives in its :class:`Scheme` entry: its name, the
bits per element it sends, whether it scales per tensor or over the whole
vector, whether it is quantized relative to a mirror, and whether error
feedback and the lazy rule apply. :class:`~flq.master.Master`,
:class:`~flq.worker.Worker`, the configuration's validation, the spreadsheets
and the plots ask this table; none of them names a mode.

Adding an uplink scheme means adding one entry to :data:`UPLINK` (and its
tests): its ``quantize`` may be any function of the signature of
:func:`~flq.algorithm.quantize.quantize` whose output
:func:`~flq.algorithm.quantize.dequantize` understands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .quantize import (
    KIND_RAW,
    MAX_BITS,
    QuantizedVector,
    Quantizer,
    dequantize,
    quantize,
    quantize_relative,
    reconstruct,
)


@dataclass(frozen=True)
class Scheme:
    """One way of sending a float32 vector over a link.

    Attributes:
        name: the mode's name in ``flq_config.json`` (``flq_algorithm.mode``).
        summary: one line for ``--help``, docs and plot legends.
        fixed_bits: bits per element whatever ``b_up`` says, or None when the
            width is ``b_up`` (then ``min_bits..MAX_BITS`` are allowed).
        min_bits: the least ``b_up`` a scheme with ``fixed_bits`` None accepts.
        sets_b_up: the run records ``b_up = fixed_bits`` (the seed's "b forced
            to 1" of the binary mode), so its spreadsheet says what was sent.
        per_tensor: one scale per model tensor (True) or one for the whole
            vector (False).
        relative: the vector sent is ``Q(x - ref)`` against a mirror ``ref``
            kept equal at both ends, which then becomes ``ref + Q(x - ref)``.
        error_feedback: the worker adds what quantization or skipping left
            out (its residual) to its next update.
        lazy: the lazy rule may keep the worker from being a candidate.
        quantize: the quantizer (draws from the worker's uplink stream).
        upload_sheet: the run's spreadsheet has a ``bin_<mode>`` sheet, the
            seed's 0/1 series of who uploaded in each round (the seed writes
            it for its binary mode only).
    """

    name: str
    summary: str
    fixed_bits: Optional[int]
    per_tensor: bool
    relative: bool
    error_feedback: bool
    lazy: bool
    quantize: Quantizer = quantize
    min_bits: int = 1
    sets_b_up: bool = False
    upload_sheet: bool = False

    def bits(self, b_up: int) -> int:
        """Bits per element of one upload given the configured ``b_up``."""
        return self.fixed_bits if self.fixed_bits is not None else int(b_up)

    def check_bits(self, b_up: int) -> Optional[str]:
        """Why ``b_up`` does not suit this scheme (one line), or None."""
        if self.fixed_bits is None and not self.min_bits <= b_up <= MAX_BITS:
            return f"mode {self.name} needs {self.min_bits}..{MAX_BITS} bits"
        return None

    def segments(self, tensor_sizes: Sequence[int]) -> Tuple[int, ...]:
        """The scaled blocks of a vector made of tensors of ``tensor_sizes``."""
        sizes = tuple(int(s) for s in tensor_sizes)
        return sizes if self.per_tensor else (sum(sizes),)

    def encode_update(
        self, x: np.ndarray, ref: np.ndarray, bits: int, rng: np.random.Generator, tensor_sizes: Sequence[int]
    ) -> Tuple[QuantizedVector, np.ndarray]:
        """Quantize ``x`` (float32, shape (n,)) for sending.

        Returns:
            The wire form and ``q`` (float32, (n,)), the value the receiver
            will reconstruct: ``ref + Q(x - ref)`` for a relative scheme,
            ``Q(x)`` otherwise.
        """
        segs = self.segments(tensor_sizes)
        if self.relative:
            return quantize_relative(x, ref, bits, rng, segs, self.quantize)
        qv = self.quantize(np.asarray(x, np.float32), bits, rng, segs)
        return qv, _value(qv)

    def decode_update(self, qv: QuantizedVector, ref: np.ndarray) -> np.ndarray:
        """The receiver's value of a decoded vector (float32, (n,)): the inverse
        of :meth:`encode_update`'s wire form, bit for bit."""
        return reconstruct(ref, qv) if self.relative else _value(qv)


def _value(qv: QuantizedVector) -> np.ndarray:
    """The value of a vector sent as is: raw float32 values are their own
    value (no copy: neither end changes them), others are dequantized."""
    return qv.codes if qv.kind == KIND_RAW else dequantize(qv)


#: The uplink schemes (``flq_algorithm.mode``), in the order ``--help`` lists them.
UPLINK: Dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme(
            "fedavg",
            "FedAvg: exact float32 updates, every worker every round",
            fixed_bits=32,
            per_tensor=False,
            relative=False,
            error_feedback=False,
            lazy=False,
        ),
        Scheme(
            "laq8",
            "8-bit stochastic rounding, one scale for the whole vector, no error feedback",
            fixed_bits=8,
            per_tensor=False,
            relative=False,
            error_feedback=False,
            lazy=False,
        ),
        Scheme(
            "bbit",
            "b_up-bit stochastic rounding of the innovation, per tensor, error feedback, lazy rule",
            fixed_bits=None,
            min_bits=2,
            per_tensor=True,
            relative=True,
            error_feedback=True,
            lazy=True,
        ),
        Scheme(
            "bin",
            "1-bit sign of the innovation, per tensor, error feedback, lazy rule",
            fixed_bits=1,
            sets_b_up=True,
            upload_sheet=True,
            per_tensor=True,
            relative=True,
            error_feedback=True,
            lazy=True,
        ),
    )
}

#: The default uplink scheme.
DEFAULT_MODE = "bbit"

#: The downlink: exact float32 (``b_down`` 0 or 32), or ``b_down``-bit
#: quantization of ``theta - ref_down[m]`` per tensor against the worker's mirror.
DOWNLINK_EXACT = Scheme(
    "exact", "exact float32 model", fixed_bits=32, per_tensor=False, relative=False, error_feedback=False, lazy=False
)
DOWNLINK_QUANTIZED = Scheme(
    "quantized",
    "b_down-bit quantization of the model's change, per tensor",
    fixed_bits=None,
    per_tensor=True,
    relative=True,
    error_feedback=False,
    lazy=False,
)


def uplink(mode: str) -> Scheme:
    """The uplink scheme named ``mode``.

    Raises:
        KeyError: no such scheme (the configuration refuses it earlier).
    """
    return UPLINK[mode]


def downlink(b_down: int) -> Scheme:
    """The downlink scheme of ``b_down`` (0 or 32: exact)."""
    return DOWNLINK_EXACT if b_down in (0, 32) else DOWNLINK_QUANTIZED


def downlink_bits(b_down: int) -> int:
    """Bits per element the workers receive: 32 when ``b_down`` is 0 or 32."""
    return downlink(b_down).bits(b_down)
