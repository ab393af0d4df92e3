"""Prefetching loader and device handling on this CPU machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flq.loader import BatchLoader
from flq.model import CNN, FlatModel, apply_memory_cap, resolve_device
from flq.partition import BatchStream


def _data():
    rng = np.random.default_rng(1)
    return rng.random((300, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, 300)


@pytest.mark.parametrize("prefetch,workers", [(0, 0), (2, 2), (4, 1), (3, 0)])
def test_prefetch_gives_the_same_batches_in_the_same_order(prefetch, workers):
    x, y = _data()
    plain = BatchLoader(x, y, BatchStream(np.arange(300), 32, 7, 0), torch.device("cpu"), 0, 0)
    fetched = BatchLoader(x, y, BatchStream(np.arange(300), 32, 7, 0), torch.device("cpu"), prefetch, workers)
    for _ in range(25):  # more than one pass over the partition
        (xa, ya), (xb, yb) = plain.next(), fetched.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xb.shape == (32, 1, 28, 28) and xb.is_contiguous(memory_format=torch.channels_last)
    expected_threads = workers if prefetch > 0 and workers > 0 else 0
    assert fetched.workers == expected_threads
    assert (fetched._pool is not None) == (expected_threads > 0)
    assert len(fetched._queue) == (prefetch if expected_threads else 0)
    assert not fetched.pin_memory  # pinned memory only on CUDA
    fetched.close()


@pytest.mark.parametrize("used", [1, 9, 10, 11, 23])
def test_a_restored_stream_goes_on_with_the_first_batch_not_used_despite_prefetching(used):
    """9 batches a pass (300 // 32): restores inside a pass and across its end."""
    x, y = _data()
    ahead = BatchLoader(x, y, BatchStream(np.arange(300), 32, 7, 0), torch.device("cpu"), 3, 2)
    for _ in range(used):
        ahead.next()
    state = ahead.stream_state()
    expected = [ahead.next()[1] for _ in range(12)]
    stream = BatchStream(np.arange(300), 32, 7, 0)
    stream.load_state_dict(state)
    again = BatchLoader(x, y, stream, torch.device("cpu"), 2, 1)
    assert all(torch.equal(again.next()[1], yb) for yb in expected)
    ahead.close()
    again.close()


def test_device_auto_falls_back_to_cpu_and_cuda_is_refused_without_it():
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(RuntimeError, match="device 'cuda' requested"):
            resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_memory_cap_and_mixed_precision_are_no_ops_on_cpu():
    assert apply_memory_cap(torch.device("cpu"), 2048) is None
    fm = FlatModel(CNN(), torch.device("cpu"), mixed_precision=True)
    assert fm.mixed_precision is False
    x, y = _data()
    g, loss = fm.gradient(x[:16], y[:16])
    assert g.dtype == np.float32 and g.shape == (467_818,) and np.isfinite(loss)
