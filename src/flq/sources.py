"""Where a run's data comes from (``dataset.name``): a built-in dataset
(Fashion-MNIST, MNIST: :mod:`flq.datasets`; CIFAR-10: :mod:`flq.cifar10`)
or a user's loader named by import path (README, "Your own model and data").

A loader ``package.module:load`` is called with ``dataset.dataset_args`` as
keyword arguments and returns ``(train, test)``; each of the two is either a
pair ``(x, y)`` of arrays or tensors (x: N samples of any fixed shape, y: N
integer labels 0..C-1), or a ``torch.utils.data.Dataset`` whose items are
``(x, y)`` pairs, which is read into memory once. Partitions (IID,
Dirichlet) are made from the training labels; evaluation uses ``test``.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Tuple

import numpy as np

from .config import ConfigError
from .datasets import Dataset, DatasetError, load_dataset

log = logging.getLogger(__name__)

#: The datasets of :mod:`flq.datasets` (IDX files).
IDX_DATASETS = ("fashion_mnist", "mnist")


def load(name: str, data_dir: Optional[str] = None, args: Optional[Mapping[str, Any]] = None) -> Dataset:
    """The dataset ``name`` (``dataset.name``) as a :class:`~flq.datasets.Dataset`.

    Raises:
        flq.datasets.DatasetNotFoundError: a built-in dataset is nowhere and cannot be downloaded.
        flq.datasets.DatasetError: its files are damaged, or a loader returned
            something that is not ``(train, test)`` as described above (one
            line saying what).
        flq.config.ConfigError: the loader cannot be imported or fails.
    """
    if name in IDX_DATASETS:
        return load_dataset(name, data_dir)
    if name == "cifar10":
        from .cifar10 import load_cifar10

        return load_cifar10(data_dir)
    from .imports import load_callable

    loader = load_callable(name, "dataset.name")
    try:
        result = loader(**dict(args or {}))
    except (DatasetError, ConfigError):
        raise
    except SystemExit as exc:
        raise ConfigError(f"config key 'dataset.name': {name} called sys.exit({exc.code!r})") from None
    except Exception as exc:  # noqa: BLE001 - the user's loader: any failure is theirs, in one line
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(
            f"config key 'dataset.name': {name}(**{dict(args or {})}) failed: {type(exc).__name__}: {first}"
        ) from None
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
        raise DatasetError(f"{name} returned {type(result).__name__}; expected (train, test)")
    train_x, train_y = _arrays(result[0], f"{name}: train")
    test_x, test_y = _arrays(result[1], f"{name}: test")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DatasetError(
            f"{name}: train samples have shape {list(train_x.shape[1:])}, test samples {list(test_x.shape[1:])}"
        )
    try:
        source = Path(inspect.getsourcefile(loader) or name)
    except TypeError:
        source = Path(name)
    return Dataset(name, train_x, train_y, test_x, test_y, source)


def _arrays(split: Any, what: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(x float32 (N, ...), y int64 (N,))``, read-only, from a pair or a Dataset."""
    if isinstance(split, (tuple, list)) and len(split) == 2:
        x, y = split
    elif isinstance(split, np.ndarray) or hasattr(split, "detach"):
        raise DatasetError(f"{what} is one array; expected a pair (x, y) or a torch.utils.data.Dataset")
    elif hasattr(split, "__getitem__") and hasattr(split, "__len__"):
        try:
            items = [split[i] for i in range(len(split))]
        except Exception as exc:  # noqa: BLE001 - the user's Dataset: any failure is theirs, in one line
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise DatasetError(f"{what}: reading its items failed: {type(exc).__name__}: {first}") from None
        if not items:
            raise DatasetError(f"{what} is empty")
        if not all(isinstance(it, (tuple, list)) and len(it) >= 2 for it in items):
            raise DatasetError(f"{what}: the dataset's items must be (x, y) pairs")
        try:
            x = np.stack([_numpy(it[0]) for it in items])
        except ValueError:
            shapes = sorted({tuple(_numpy(it[0]).shape) for it in items})
            raise DatasetError(f"{what}: samples of different shapes ({shapes[0]}, {shapes[-1]} ...)") from None
        labels = [_numpy(it[1]) for it in items]
        if any(lab.ndim != 0 for lab in labels):
            shape = next(list(lab.shape) for lab in labels if lab.ndim != 0)
            raise DatasetError(f"{what}: each item's label must be one integer, got shape {shape}")
        y = np.array(labels)
    else:
        raise DatasetError(f"{what} is {type(split).__name__}; expected (x, y) or a torch.utils.data.Dataset")
    try:
        x, y = _numpy(x), _numpy(y)
    except (ValueError, TypeError) as exc:
        raise DatasetError(f"{what}: samples or labels are not arrays of one shape ({_line(exc)})") from None
    if x.ndim < 1 or len(x) == 0:
        raise DatasetError(f"{what} is empty")
    if y.shape != (len(x),):
        raise DatasetError(f"{what}: {len(x)} samples but labels of shape {list(y.shape)}")
    integral = np.issubdtype(y.dtype, np.integer) or (
        np.issubdtype(y.dtype, np.floating) and bool(np.isfinite(y).all()) and bool((y == np.round(y)).all())
    )
    if not integral:
        raise DatasetError(f"{what}: labels must be integers, got {y.dtype}")
    if y.size and y.min() < 0:
        raise DatasetError(f"{what}: label {int(y.min())} is negative; labels are 0..C-1")
    if y.size and y.max() >= 2**31:
        raise DatasetError(f"{what}: label {y.max()} is too large; labels are 0..C-1")
    if np.iscomplexobj(x):
        raise DatasetError(f"{what}: samples are complex numbers")
    try:
        x = np.ascontiguousarray(x, dtype=np.float32)
    except (ValueError, TypeError) as exc:
        raise DatasetError(f"{what}: samples are not arrays of numbers of one shape ({_line(exc)})") from None
    if not np.isfinite(x).all():
        raise DatasetError(f"{what}: samples hold NaN or infinity")
    y = np.ascontiguousarray(y, dtype=np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def _numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu().numpy()
    return np.asarray(v)
