"""The algorithm's data side: who trains on which samples, in which order
(docs/algorithm.md, Data).

* :func:`partition` splits the training set's indices over the workers
  (``iid`` or Dirichlet ``non_iid``), deterministically from its arguments
  (the generator is :func:`flq.streams.partition_rng`).
* :class:`BatchStream` yields one worker's minibatch indices, pass after
  pass (stream :data:`flq.streams.STREAM_BATCHES`), and can be checkpointed
  and resumed exactly.

Reading the data itself is :mod:`flq.datasets`. Bad arguments raise
``ValueError`` with a one-line message naming the argument.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from .streams import STREAM_BATCHES, partition_rng, restored_rng, stream_rng

__all__ = ["PARTITION_SCHEMES", "partition", "BatchStream"]


# ---------------------------------------------------------------------------
# Partitioning
# ---------------------------------------------------------------------------

PARTITION_SCHEMES: Tuple[str, ...] = ("iid", "non_iid")
_DIRICHLET_TRIES = 100


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _dirichlet_try(
    rng: np.random.Generator,
    labels: np.ndarray,
    classes: np.ndarray,
    num_workers: int,
    alpha: float,
) -> List[np.ndarray]:
    """One Dirichlet draw: per class split, then shuffle each worker's share."""
    parts: List[List[np.ndarray]] = [[] for _ in range(num_workers)]
    for c in classes:
        idx_c = rng.permutation(np.flatnonzero(labels == c))
        n_c = idx_c.shape[0]
        p = rng.dirichlet(alpha * np.ones(num_workers))
        exact = p * n_c
        counts = np.floor(exact).astype(np.int64)
        frac = exact - counts
        remainder = int(n_c - counts.sum())
        order = np.argsort(-frac, kind="stable")
        counts[order[:remainder]] += 1
        bounds = np.cumsum(counts)[:-1]
        for w, chunk in enumerate(np.split(idx_c, bounds)):
            parts[w].append(chunk)
    return [rng.permutation(np.concatenate(p).astype(np.int64, copy=False)) for p in parts]


def partition(
    labels: Any,
    num_workers: int,
    scheme: str,
    alpha: Optional[float],
    seed: int,
    batch_size: int,
) -> List[np.ndarray]:
    """Split the training set's indices over the workers (docs/algorithm.md, Data).

    ``labels`` is a 1-D array of non-negative integer class labels (length N).
    Returns ``num_workers`` ``np.int64`` index arrays into ``labels``. The
    result depends only on the arguments; ``rng = np.random.default_rng(seed)``:

    * ``"iid"``: ``perm = rng.permutation(N)`` cut into ``num_workers`` equal
      contiguous shares of ``N // num_workers`` (the remainder is dropped).
      ``alpha`` is ignored.
    * ``"non_iid"`` (Dirichlet with concentration ``alpha``): up to 100 tries;
      per class ``c`` (present in ``labels``, ascending):
      ``idx_c = rng.permutation(flatnonzero(labels == c))``,
      ``p = rng.dirichlet(alpha * ones(num_workers))``,
      ``counts = floor(p * n_c)``, the remainder given one each to the workers
      with the largest fractional parts (stable argsort of the negated
      fractions, so ties go to the lower worker id), and ``idx_c`` split
      contiguously in worker order. Then each worker's indices are shuffled
      with ``rng.permutation``. The first try in which every worker has at
      least ``batch_size`` samples is returned; after 100 failed tries each
      short worker of the last try gets
      ``rng.choice(N, batch_size - len, replace=False)`` appended.

    Raises ``ValueError`` (one line naming the argument) for
    ``num_workers < 1``, more workers than samples, an unknown ``scheme``,
    ``alpha <= 0`` (or missing) for ``non_iid``, ``batch_size < 1``,
    ``batch_size > N`` for ``non_iid``, a ``seed`` that is not an integer
    >= 0, or labels that are not a 1-D array of non-negative integers.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {list(y.shape)}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if y.size and int(y.min()) < 0:
        raise ValueError(f"labels must be non-negative, found {int(y.min())}")
    n = int(y.shape[0])
    num_workers = _check_int(num_workers, "num_workers", 1)
    if num_workers > n:
        raise ValueError(f"num_workers ({num_workers}) exceeds the number of samples ({n})")
    batch_size = _check_int(batch_size, "batch_size", 1)
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(PARTITION_SCHEMES)}, got {scheme!r}")

    seed = _check_int(seed, "seed", 0)
    rng = partition_rng(seed)

    if scheme == "iid":
        perm = rng.permutation(n).astype(np.int64, copy=False)
        share = n // num_workers
        return [perm[w * share : (w + 1) * share].copy() for w in range(num_workers)]

    if alpha is None or not (float(alpha) > 0) or not math.isfinite(float(alpha)):
        raise ValueError(f"alpha must be a finite number > 0 for non_iid, got {alpha!r}")
    alpha = float(alpha)
    if batch_size > n:
        raise ValueError(f"batch_size ({batch_size}) exceeds the number of samples ({n})")

    classes = np.unique(y)
    shares: List[np.ndarray] = []
    for _ in range(_DIRICHLET_TRIES):
        shares = _dirichlet_try(rng, y, classes, num_workers, alpha)
        if min(s.shape[0] for s in shares) >= batch_size:
            return shares
    padded = []
    for s in shares:
        short = batch_size - s.shape[0]
        if short > 0:
            extra = rng.choice(n, short, replace=False).astype(np.int64, copy=False)
            s = np.concatenate([s, extra])
        padded.append(s)
    return padded


# ---------------------------------------------------------------------------
# Minibatch order
# ---------------------------------------------------------------------------


class BatchStream:
    """One worker's endless sequence of minibatches (docs/algorithm.md, Data).

    ``indices``: the worker's global sample indices (1-D integers, e.g. one
    array from :func:`partition`). The stream owns the generator
    ``Generator(PCG64(SeedSequence([seed, worker_id, 1])))`` (stream
    :data:`~flq.streams.STREAM_BATCHES`); each pass is
    ``rng.permutation(indices)`` cut into ``len(indices) // batch_size``
    consecutive full batches (the remainder of the pass is dropped), and
    passes repeat forever. :meth:`next_indices` returns the next batch as an
    ``np.int64`` array of shape ``[batch_size]``.

    :meth:`state_dict` / :meth:`load_state_dict` save and restore the
    generator state, the position in the current pass and the current
    permutation, so a resumed worker continues with exactly the same batches.

    Raises ``ValueError`` for ``batch_size < 1`` or larger than
    ``len(indices)``, negative ``seed``/``worker_id``, or indices that are not
    a 1-D integer array.
    """

    def __init__(self, indices: Any, batch_size: int, seed: int, worker_id: int) -> None:
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise ValueError(f"indices must be a 1-D integer array, got {idx.dtype} {list(idx.shape)}")
        self.batch_size = _check_int(batch_size, "batch_size", 1)
        if self.batch_size > idx.shape[0]:
            raise ValueError(f"batch_size ({self.batch_size}) exceeds the worker's {idx.shape[0]} samples")
        self.seed = _check_int(seed, "seed", 0)
        self.worker_id = _check_int(worker_id, "worker_id", 0)
        self._indices = idx.astype(np.int64, copy=True)
        self._indices.flags.writeable = False
        self._rng = stream_rng(self.seed, self.worker_id, STREAM_BATCHES)
        self._perm: Optional[np.ndarray] = None
        self._pos = 0

    @property
    def indices(self) -> np.ndarray:
        """The worker's indices (read-only ``np.int64`` array)."""
        return self._indices

    @property
    def batches_per_pass(self) -> int:
        """Full batches in one pass: ``len(indices) // batch_size``."""
        return self._indices.shape[0] // self.batch_size

    def next_indices(self) -> np.ndarray:
        """Return the next batch's global indices (``np.int64``, ``[batch_size]``)."""
        if self._perm is None or self._pos + self.batch_size > self._perm.shape[0]:
            self._perm = self._rng.permutation(self._indices)
            self._pos = 0
        batch = self._perm[self._pos : self._pos + self.batch_size].copy()
        self._pos += self.batch_size
        return batch

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        return self.next_indices()

    def snapshot(self) -> Tuple[Dict[str, Any], Optional[np.ndarray], int]:
        """A cheap copy of where the stream is (generator state, the current
        permutation, which is never changed in place, and the position), for
        :meth:`state_dict` to describe later: how a prefetching loader
        remembers the state before the batches it drew ahead."""
        return self._rng.bit_generator.state, self._perm, self._pos

    def state_dict(self, at: Optional[Tuple[Dict[str, Any], Optional[np.ndarray], int]] = None) -> Dict[str, Any]:
        """Return the stream's state (or the state ``at``, a
        :meth:`snapshot`) as plain Python objects.

        Keys: ``bit_generator`` (``rng.bit_generator.state``), ``position``
        (int, offset in the current pass), ``permutation`` (list of int, or
        ``None`` before the first batch), plus ``batch_size``, ``seed``,
        ``worker_id`` and ``num_indices`` for checking. Only dicts, lists,
        ints and strings: it survives JSON and ``torch.save``/``torch.load``
        with ``weights_only=True``.
        """
        state, perm, pos = at if at is not None else self.snapshot()
        return {
            "bit_generator": {k: (dict(v) if isinstance(v, dict) else v) for k, v in state.items()},
            "position": int(pos),
            "permutation": None if perm is None else [int(i) for i in perm],
            "batch_size": self.batch_size,
            "seed": self.seed,
            "worker_id": self.worker_id,
            "num_indices": int(self._indices.shape[0]),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`.

        Raises ``ValueError`` (one line) when the state belongs to a stream
        with another batch size or number of indices, or its permutation is
        not a permutation of this stream's indices.
        """
        for key in ("batch_size", "num_indices"):
            mine = self.batch_size if key == "batch_size" else int(self._indices.shape[0])
            if key in state and int(state[key]) != mine:
                raise ValueError(f"state {key} {state[key]} does not match this stream's {mine}")
        perm_in = state["permutation"]
        pos = int(state["position"])
        perm: Optional[np.ndarray] = None
        if perm_in is not None:
            perm = np.asarray(perm_in, dtype=np.int64)
            if perm.shape != self._indices.shape or not np.array_equal(np.sort(perm), np.sort(self._indices)):
                raise ValueError("state permutation is not a permutation of this stream's indices")
            if not 0 <= pos <= perm.shape[0]:
                raise ValueError(f"state position {pos} outside 0..{perm.shape[0]}")
        elif pos != 0:
            raise ValueError(f"state position {pos} without a permutation")
        self._rng = restored_rng(state["bit_generator"])
        self._perm = perm
        self._pos = pos
