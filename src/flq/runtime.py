"""What a process needs before its first round: threads, device, data,
partitions, the model and the test set (shared by the simulator, the
master and the workers)."""

from __future__ import annotations

import ctypes
import logging
from functools import cached_property
from typing import List, Optional, Tuple

import numpy as np
import torch

from .config import Config, ConfigError, check_paths
from .datasets import Dataset
from .layout import ModelLayout
from .model import (
    FlatModel,
    apply_memory_cap,
    build_model,
    check_outputs,
    initial_state,
    native_bf16,
    resolve_device,
)
from .partition import partition

log = logging.getLogger(__name__)


#: glibc ``mallopt`` parameters and the values :func:`keep_freed_memory` sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's largest on 64-bit
TRIM_THRESHOLD_BYTES = 128 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse freed blocks instead of returning each one to
    the kernel. By default every block over 128 KiB is its own ``mmap``,
    unmapped when freed (the limit rises only after such a block is freed),
    so every convolution's activations were fresh pages the kernel had to
    zero: evaluating the 10,000 test images took 10-13 s instead of 7.2 s
    on one core here once the data came memory-mapped
    (benchmarks/eval_precision.py). Blocks up to 32 MiB now come from the
    heap, and up to 128 MiB of freed heap is kept. Returns whether glibc
    took the settings (False elsewhere: musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def set_threads(threads: int) -> None:
    """Pin PyTorch's intra-op threads (0 leaves the default: all cores)."""
    if threads > 0:
        torch.set_num_threads(threads)


def check_shares(cfg: Config, train_size: int) -> None:
    """Raise ConfigError when a worker's share of ``train_size`` samples cannot
    hold one batch: an ``iid`` share is ``train_size // total_workers``
    (``non_iid`` pads short shares up to ``batch_size``, so it only needs
    ``batch_size <= train_size``)."""
    share = train_size // cfg.total_workers if cfg.partition == "iid" else train_size
    if share < cfg.batch_size:
        what = (
            f"each worker's iid share ({train_size} / {cfg.total_workers} = {share} samples)"
            if cfg.partition == "iid"
            else f"the training set ({train_size} samples)"
        )
        raise ConfigError(
            f"config key 'dataset.batch_size': {cfg.batch_size} is larger than {what}; lower "
            f"batch_size or total_workers"
        )


def check_eval_precision(cfg: Config, device: torch.device) -> None:
    """Refuse ``eval_precision`` fp16 off CUDA (ConfigError); warn once when
    bf16 is asked for on a device that only emulates it."""
    if cfg.eval_precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"config key 'system.eval_precision': fp16 needs CUDA, this process runs on {device} (use bf16 or fp32)"
        )
    if cfg.eval_precision == "bf16" and not native_bf16(device):
        log.warning(
            "eval_precision bf16: %s has no native bfloat16 (AVX512-BF16/AMX, or CUDA 8.0+); PyTorch emulates it, "
            "about 10x slower than fp32 on such CPUs",
            device,
        )


class Runtime:
    """Data, partitions and model for ``cfg``, built once per process.

    Args:
        cfg: the configuration.
        evaluates: this process evaluates the global model (the simulator,
            the master; not a worker): ``eval_precision`` is checked.
        data, partitions: the dataset and the workers' shares when another
            process has loaded and checked them already (a Ray actor of
            :mod:`flq.ray_backend`); by default loaded on first use.

    Raises:
        flq.datasets.DatasetNotFoundError: the dataset is missing and cannot be fetched.
        RuntimeError: ``device: cuda`` without CUDA.
        ConfigError: ``eval_precision`` fp16 without CUDA (when ``evaluates``).
    """

    def __init__(
        self,
        cfg: Config,
        evaluates: bool = True,
        data: Optional[Dataset] = None,
        partitions: Optional[List[np.ndarray]] = None,
    ) -> None:
        self.cfg = cfg
        if data is not None:  # fills the cached properties below
            self.__dict__["data"] = data
        else:
            check_paths(cfg)
        if partitions is not None:
            self.__dict__["partitions"] = partitions
        keep_freed_memory()
        set_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        apply_memory_cap(self.device, cfg.gpu_memory_limit_mb)
        if cfg.enable_mixed_precision and self.device.type != "cuda":
            log.warning("enable_mixed_precision needs CUDA; running float32 on %s", self.device)
        self.model = FlatModel(
            build_model(cfg.model, cfg.model_args), self.device, mixed_precision=cfg.enable_mixed_precision
        )
        self.segments = self.model.segments
        self.layout: ModelLayout = self.model.layout
        if evaluates:
            check_eval_precision(cfg, self.device)

    @cached_property
    def data(self) -> Dataset:
        cfg = self.cfg
        from .sources import load

        ds = load(cfg.dataset, cfg.data_dir or None, cfg.dataset_args)
        log.info("dataset %s from %s: %d train, %d test", ds.name, ds.source, len(ds.train_y), len(ds.test_y))
        check_shares(cfg, len(ds.train_y))
        check_outputs(self.model, ds.train_x, ds.num_classes)
        return ds

    @cached_property
    def partitions(self) -> List[np.ndarray]:
        cfg = self.cfg
        return partition(self.data.train_y, cfg.total_workers, cfg.partition, cfg.dir_alpha, cfg.seed, cfg.batch_size)

    @cached_property
    def _eval_set(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.model.prepare_eval_set(self.data.test_x, self.data.test_y)

    @cached_property
    def eval_model(self) -> FlatModel:
        """The module evaluation runs on: a copy of its own, so that an
        evaluation in a background thread (``eval_overlap``) never shares
        weights with the training in the foreground."""
        return FlatModel(build_model(self.cfg.model, self.cfg.model_args), self.device)

    def initial_model(self) -> Tuple[np.ndarray, Tuple[np.ndarray, ...]]:
        """The round-0 global model ``(theta, buffers)``, made on a plain CPU
        module so it is the same on every device and memory layout
        (:func:`flq.model.initial_state`)."""
        return initial_state(self.cfg.model, self.cfg.model_args, self.cfg.seed)

    def evaluate(self, theta: np.ndarray, buffers: Tuple[np.ndarray, ...] = ()) -> Tuple[float, float]:
        """(accuracy, mean cross-entropy) of ``theta`` with ``buffers`` on the
        whole test set, in ``eval_precision``. Safe to call from one
        background thread while the foreground trains (its own module:
        :attr:`eval_model`)."""
        x, y = self._eval_set
        self.eval_model.set_flat(theta)
        self.eval_model.set_buffers(buffers)
        return self.eval_model.evaluate(x, y, self.cfg.eval_batch_size, self.cfg.eval_precision)
