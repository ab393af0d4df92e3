"""What a model is made of, as the round sees it (docs/algorithm.md, "Model
tensors and buffers"): its trainable parameters, which travel as one float32
vector and are quantized per tensor, and its buffers (BatchNorm running
statistics, ``num_batches_tracked``, any registered buffer), which travel raw.

A :class:`ModelLayout` lists every tensor of the module's ``state_dict()``
with its name, shape and dtype. It has no PyTorch in it (the master's round
logic, the wire and the checks use it); :func:`flq.model.layout_of` makes
one from a module.

* Parameters: float32, float16 or bfloat16. Their values live in the flat
  float32 vector ``theta`` (model order), which the master steps in float32
  ("master weights", as in mixed-precision training); the module, and every
  export of the model, hold them cast to the parameter's dtype (PyTorch's
  round to nearest, ties to even), so steps smaller than a float16 or
  bfloat16 spacing still add up.
* Buffers: any fixed-size NumPy dtype (float16/32/64, int8..int64, uint8,
  bool). With ``buffers average`` (the default) the master sends the global
  buffers raw with every downlink and each selected worker sends its buffers
  after local training raw with its upload; the master averages them
  (:meth:`ModelLayout.average_buffers`). With ``buffers local`` (FedBN) they
  never leave the worker. Raw means the little-endian bytes of each buffer in
  ``state_dict()`` order: :attr:`ModelLayout.buffer_bytes` bytes, 8 bits each
  counted in the round's bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

#: Parameter dtypes the flat float32 vector can hold exactly.
PARAM_DTYPES = ("float32", "float16", "bfloat16")
#: Largest magnitude a float buffer may arrive with (as an update's values:
#: beyond it a worker has diverged, or lies).
MAX_FLOAT_BUFFER = 1e18
#: Largest magnitude of an integer buffer: the sum of 1000 workers' stays
#: inside int64 when the master averages them.
MAX_INT_BUFFER = 2**53


class LayoutError(ValueError):
    """A model FLQ cannot train, or two layouts that differ (one line naming the tensor)."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of ``state_dict()``: its key, shape, dtype name (PyTorch's,
    without ``torch.``: ``float32``, ``int64`` ...) and whether it is a
    trainable parameter (else a buffer)."""

    name: str
    shape: Tuple[int, ...]
    dtype: str
    param: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * np.dtype(self.dtype).itemsize if not self.param else 4 * self.numel

    def describe(self) -> List[Any]:
        """``[name, "param" | "buffer", dtype, [shape...]]``: the JSON form a worker registers with."""
        return [self.name, "param" if self.param else "buffer", self.dtype, list(self.shape)]


@dataclass(frozen=True)
class ModelLayout:
    """The tensors of a model in ``state_dict()`` order (see the module docstring).

    Raises (constructor):
        LayoutError: a parameter of a dtype other than :data:`PARAM_DTYPES`,
            or a buffer NumPy cannot hold (bfloat16, complex ...).
    """

    tensors: Tuple[TensorSpec, ...]
    #: False for :meth:`flat`: the names are made up, only the sizes are known
    named: bool = True

    def __post_init__(self) -> None:
        for t in self.tensors:
            if t.param and t.dtype not in PARAM_DTYPES:
                raise LayoutError(
                    f"parameter {t.name!r} is {t.dtype}: FLQ trains float32, float16 or bfloat16 parameters"
                )
            if not t.param:
                try:
                    kind = np.dtype(t.dtype).kind
                except TypeError:
                    kind = "?"
                if kind not in "fiub":
                    raise LayoutError(f"buffer {t.name!r} is {t.dtype}: buffers must be float, integer or bool tensors")

    @classmethod
    def flat(cls, segments: Sequence[int]) -> ModelLayout:
        """A layout of float32 vectors only (no buffers), for callers that
        know just the tensor sizes."""
        return cls(tuple(TensorSpec(f"t{i}", (int(s),), "float32", True) for i, s in enumerate(segments)), named=False)

    @property
    def params(self) -> Tuple[TensorSpec, ...]:
        return tuple(t for t in self.tensors if t.param)

    @property
    def buffers(self) -> Tuple[TensorSpec, ...]:
        return tuple(t for t in self.tensors if not t.param)

    @property
    def segments(self) -> Tuple[int, ...]:
        """Element count of each parameter, model order (the quantizers' tensors)."""
        return tuple(t.numel for t in self.params)

    @property
    def n(self) -> int:
        """Number of parameter values (the length of ``theta``)."""
        return sum(self.segments)

    @property
    def buffer_bytes(self) -> int:
        """Bytes of all buffers, raw."""
        return sum(t.nbytes for t in self.buffers)

    def signature(self) -> List[List[Any]]:
        """Every tensor as :meth:`TensorSpec.describe`, in order."""
        return [t.describe() for t in self.tensors]

    def mismatch(self, other: Sequence[Sequence[Any]], here: str = "master", there: str = "worker") -> str:
        """'' when ``other`` (a :meth:`signature`) is this layout, else one
        line naming the first tensor that differs."""
        mine = {t.name: t.describe() for t in self.tensors}
        theirs: Dict[str, List[Any]] = {}
        for entry in other:
            if not (isinstance(entry, (list, tuple)) and len(entry) == 4 and isinstance(entry[0], str)):
                return f"the {there}'s model description is malformed ({str(entry)[:60]})"
            theirs[entry[0]] = [entry[0], entry[1], entry[2], [int(s) for s in entry[3]]]
        return _cut(self._mismatch(mine, theirs, other, here, there))

    def _mismatch(
        self,
        mine: Dict[str, List[Any]],
        theirs: Dict[str, List[Any]],
        other: Sequence[Sequence[Any]],
        here: str,
        there: str,
    ) -> str:
        if not self.named:  # only the parameters' sizes are known here
            sizes = [math.prod(e[3]) for e in theirs.values() if e[1] == "param"]
            if sizes != list(self.segments):
                return f"the {there}'s parameter sizes {sizes[:8]} differ from the {here}'s {list(self.segments)[:8]}"
            return ""
        for name, spec in mine.items():
            got = theirs.get(name)
            if got is None:
                return (
                    f"tensor {name!r} ({spec[1]} {spec[2]} {spec[3]}) of the {here}'s model is missing at the {there}"
                )
            if got != spec:
                return (
                    f"tensor {name!r} is {got[1]} {got[2]} {got[3]} at the {there} but "
                    f"{spec[1]} {spec[2]} {spec[3]} at the {here}"
                )
        extra = [name for name in theirs if name not in mine]
        if extra:
            return f"tensor {extra[0]!r} of the {there}'s model is not in the {here}'s"
        if [e[0] for e in other] != list(mine):
            return f"the {there}'s model lists the same tensors as the {here}'s in another order"
        return ""

    # ----- buffers -------------------------------------------------------
    def pack_buffers(self, buffers: Sequence[np.ndarray]) -> bytes:
        """The buffers' raw little-endian bytes, in order (:attr:`buffer_bytes` long)."""
        specs = self.buffers
        if len(buffers) != len(specs):
            raise LayoutError(f"{len(buffers)} buffers given, the model has {len(specs)}")
        return b"".join(
            np.ascontiguousarray(b, dtype=np.dtype(t.dtype).newbyteorder("<")).tobytes() for t, b in zip(specs, buffers)
        )

    def unpack_buffers(self, data: bytes) -> Tuple[np.ndarray, ...]:
        """Buffers from :meth:`pack_buffers`'s bytes (new, native-order arrays).

        Raises:
            LayoutError: wrong length, or a float buffer with NaN or infinity.
        """
        if len(data) != self.buffer_bytes:
            raise LayoutError(f"buffers take {self.buffer_bytes} bytes, got {len(data)}")
        out, off = [], 0
        for t in self.buffers:
            dt = np.dtype(t.dtype)
            a = np.frombuffer(data, dtype=dt.newbyteorder("<"), count=t.numel, offset=off).astype(dt).reshape(t.shape)
            off += t.nbytes
            if dt.kind == "f" and not np.isfinite(a).all():
                raise LayoutError(f"buffer {t.name!r} holds NaN or infinity")
            if a.size and dt.kind == "f" and float(np.abs(a).max()) >= MAX_FLOAT_BUFFER:
                raise LayoutError(f"buffer {t.name!r} holds values of magnitude >= {MAX_FLOAT_BUFFER:g}")
            if a.size and dt.kind in "iu" and (int(a.max()) > MAX_INT_BUFFER or int(a.min()) < -MAX_INT_BUFFER):
                raise LayoutError(f"buffer {t.name!r} holds integers beyond +-2^53")
            out.append(a)
        return tuple(out)

    def average_buffers(self, sets: Sequence[Sequence[np.ndarray]]) -> Tuple[np.ndarray, ...]:
        """The element-wise mean of several workers' buffers (in the order
        given: callers pass them in worker-id order). Float buffers: the mean
        in float64, rounded to the buffer's dtype; integer buffers: the floor
        of the mean (``num_batches_tracked`` is the same on every worker of a
        round, so it stays exact); bool: true where at least half are."""
        if not sets:
            raise LayoutError("no buffers to average")
        out = []
        for i, t in enumerate(self.buffers):
            dt = np.dtype(t.dtype)
            stack = [np.asarray(s[i]) for s in sets]
            if dt.kind == "f":
                total = np.zeros(t.shape, np.float64)
                for a in stack:
                    total += a
                out.append((total / len(stack)).astype(dt))
            elif dt.kind == "b":
                count = sum(a.astype(np.int64) for a in stack)
                out.append(np.asarray(2 * count >= len(stack)).reshape(t.shape))
            else:
                total_i = sum((a.astype(np.int64) for a in stack), np.zeros(t.shape, np.int64))
                out.append((total_i // len(stack)).astype(dt))
        return tuple(out)

    def check_buffers(self, buffers: Sequence[np.ndarray]) -> None:
        """Raise LayoutError unless ``buffers`` match the layout's shapes and dtypes."""
        specs = self.buffers
        if len(buffers) != len(specs):
            raise LayoutError(f"{len(buffers)} buffers given, the model has {len(specs)}")
        for t, b in zip(specs, buffers):
            if tuple(b.shape) != t.shape or b.dtype != np.dtype(t.dtype):
                raise LayoutError(
                    f"buffer {t.name!r}: {b.dtype} {list(b.shape)} given, expected {t.dtype} {list(t.shape)}"
                )

    def split(self, body: bytes, sent: bool) -> Tuple[Optional[bytes], bytes]:
        """``(buffer bytes or None, the rest)`` of a message that starts
        with the raw buffers when ``sent`` (and the model has any)."""
        size = self.buffer_bytes if sent else 0
        if not size:
            return None, body
        if len(body) < size:
            raise LayoutError(f"message of {len(body)} bytes is shorter than the model's buffers ({size} bytes)")
        return body[:size], body[size:]


def _cut(text: str, most: int = 300) -> str:
    """``text`` cut to ``most`` characters (a worker's description may be huge)."""
    return text if len(text) <= most else text[: most - 3] + "..."
