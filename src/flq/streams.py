"""Every random stream of an FLQ run, by name, in one place.

All of a run's randomness derives from ``system.seed`` (``seed`` below); nothing
draws from a global or time-seeded generator. So the same config gives the
same numbers in the simulator and on the cluster, whatever the process layout
or the order in which workers arrive, and a checkpoint restores every
generator exactly. The streams, what each draws, and its generator:

* partition: the split of the training set over the workers
  (:func:`flq.partition.partition`); ``default_rng(seed)``
  (:func:`partition_rng`).
* model init: the round-0 global model (:func:`flq.model.glorot_init`);
  ``torch.Generator().manual_seed(seed)`` (:func:`init_generator`).
* :data:`STREAM_BATCHES` (1): worker m's minibatch order
  (:class:`flq.partition.BatchStream`); ``SeedSequence([seed, m, 1])``.
* :data:`STREAM_DOWNLINK` (2): the master's stochastic rounding of the model
  it sends worker m (``Master.down_rng[m]``); ``SeedSequence([seed, m, 2])``.
* :data:`STREAM_UPLINK` (3): worker m's stochastic rounding of its update
  (``Worker.rng``); ``SeedSequence([seed, m, 3])``.

The per-worker streams are PCG64 generators (:func:`stream_rng`); one per
(worker, purpose) pair, so no worker's draws depend on another's.

These numbers are part of the results: changing a stream number or how a
seed is used changes every run (the tests pin exact values and SHA-256
digests that depend on them). Not a stream: the HTTP client's retry jitter
(``random.random`` in :mod:`flq.transport.client`), which only spaces retries
in time and never reaches the numbers.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

#: Worker m's minibatch order: one permutation of its partition per pass
#: (:class:`flq.partition.BatchStream`).
STREAM_BATCHES = 1
#: The master's stochastic rounding of the model difference it sends worker m
#: (the downlink quantization of docs/algorithm.md step 2; ``Master.down_rng[m]``).
STREAM_DOWNLINK = 2
#: Worker m's stochastic rounding of its update (the uplink quantization of
#: docs/algorithm.md step 4, ``laq8`` included; ``Worker.rng``).
STREAM_UPLINK = 3


def stream_rng(seed: int, worker_id: int, stream: int) -> np.random.Generator:
    """The generator of one (worker, purpose) pair: ``PCG64(SeedSequence([seed,
    worker_id, stream]))``; independent of process and order."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, worker_id, stream])))


def restored_rng(state: Mapping[str, Any]) -> np.random.Generator:
    """A per-worker stream's generator continuing from a saved
    ``bit_generator.state`` (a checkpoint)."""
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = dict(state)
    return rng


def partition_rng(seed: int) -> np.random.Generator:
    """The generator that splits the training set over the workers:
    ``numpy.random.default_rng(seed)`` (docs/algorithm.md, Data)."""
    return np.random.default_rng(seed)


def init_generator(seed: int) -> Any:
    """The ``torch.Generator`` the round-0 global model is drawn from:
    ``torch.Generator().manual_seed(seed)`` on the CPU (PyTorch is imported
    here, not with this module)."""
    import torch

    return torch.Generator().manual_seed(int(seed))
