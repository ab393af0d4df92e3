"""Minibatch loading with prefetching (``jetson_optimization.prefetch_size``
and ``num_parallel_calls``).

The training set lives in memory; a batch is a gather of rows plus, on CUDA,
a copy to the device from pinned memory. :class:`BatchLoader` keeps up to
``prefetch`` batches in flight on ``workers`` threads so the copy overlaps
the previous step. The batch order is drawn in the caller's thread from the
worker's :class:`~flq.partition.BatchStream`, so prefetching never changes which
samples a round uses.
"""

from __future__ import annotations

import collections
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Deque, Dict, Optional, Tuple

import numpy as np
import torch

from .partition import BatchStream


class BatchLoader:
    """Batches ``(x, y)`` of one worker as tensors on ``device``.

    Args:
        x: float32 samples (N, ...), e.g. images (N, 1, 28, 28); y: int64 labels (N,).
        stream: the worker's batch order.
        device: where the batches go.
        prefetch: batches prepared ahead (0 = load on demand, no threads).
        workers: loader threads (0 = load on demand).
        channels_last: image batches (4-D) in channels-last layout (the built-in models).

    Attributes:
        pin_memory: True on CUDA, where host batches are pinned for async copies.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        stream: BatchStream,
        device: torch.device,
        prefetch: int = 2,
        workers: int = 2,
        channels_last: bool = True,
    ) -> None:
        self.x, self.y, self.stream, self.device = x, y, stream, device
        self.channels_last = channels_last
        self.prefetch = prefetch if workers > 0 else 0
        self.workers = workers if prefetch > 0 else 0
        self.pin_memory = device.type == "cuda"
        self._pool: Optional[ThreadPoolExecutor] = None
        self._queue: Deque[Tuple[Future, Any]] = collections.deque()  # (batch, the stream before it)

    def _load(self, idx: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        xb = torch.from_numpy(self.x[idx])  # fancy indexing copies: the tensor owns writable memory
        yb = torch.from_numpy(np.asarray(self.y[idx], dtype=np.int64))
        if self.pin_memory:
            xb, yb = xb.pin_memory(), yb.pin_memory()
        xb = xb.to(self.device, non_blocking=True)
        if self.channels_last and xb.dim() == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb, yb.to(self.device, non_blocking=True)

    def next(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The next batch: samples (B, ...) (4-D images channels-last with ``channels_last``), labels (B,)."""
        if self.prefetch == 0:
            return self._load(self.stream.next_indices())
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="flq-loader")
        while len(self._queue) < self.prefetch + 1:
            before = self.stream.snapshot()
            self._queue.append((self._pool.submit(self._load, self.stream.next_indices()), before))
        return self._queue.popleft()[0].result()

    def stream_state(self) -> Dict[str, Any]:
        """The batch order's state at the first batch not yet handed out
        (batches drawn ahead by prefetching are drawn again after a restore),
        so prefetching never changes the order, even across a restart."""
        if self._queue:
            return self.stream.state_dict(self._queue[0][1])
        return self.stream.state_dict()

    def reset(self) -> None:
        """Drop the batches in flight (after the stream's state was replaced)."""
        for f, _ in self._queue:
            f.cancel()
        self._queue.clear()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
