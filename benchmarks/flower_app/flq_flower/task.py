"""What the ServerApp and the ClientApp share: FLQ-Fed's model, data and
partition, and the model as a flat float32 vector (FLQ's layout) or as one
array per tensor (what travels in a Flower ``ArrayRecord``)."""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch

from flq.model import build_model
from flq.runtime import keep_freed_memory

# one PyTorch thread per process, as `flq master/worker --threads 1`, and
# glibc's malloc tuned as in every flq process (without it the evaluation of
# the test set alone is 10-13 s instead of 7.2 s on one core)
torch.set_num_threads(1)
keep_freed_memory()


def tensor_shapes(model_name: str) -> List[Tuple[int, ...]]:
    """Shapes of the model's trainable tensors, in model order."""
    return [tuple(p.shape) for p in build_model(model_name).parameters() if p.requires_grad]


def to_flat(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """One float32 vector (n,) of the tensors, in order."""
    return np.concatenate([np.asarray(a, dtype=np.float32).reshape(-1) for a in arrays])


def from_flat(theta: np.ndarray, shapes: Sequence[Tuple[int, ...]]) -> List[np.ndarray]:
    """The tensors of ``theta`` (float32 (n,)), one array each, in order."""
    out, off = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(np.ascontiguousarray(theta[off : off + size]).reshape(shape))
        off += size
    return out
