"""Shared fixtures: real Fashion-MNIST (Debian's dataset-fashion-mnist), small configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIG = REPO / "configs" / "paper_fmnist.json"

# The same arithmetic in every test process (and in the worker processes tests start).
torch.set_num_threads(1)
os.environ.setdefault("FLQ_NO_DOWNLOAD", "1")


@pytest.fixture(scope="session")
def fmnist_available() -> bool:
    from flq.datasets import find_dataset_dir

    found = find_dataset_dir("fashion_mnist") is not None
    if not found:
        pytest.fail("Fashion-MNIST not found: apt-get install dataset-fashion-mnist (CI installs it)")
    return found


def small_config(**overrides):
    """The paper's settings, shrunk for fast tests (overrides are flat keys)."""
    from flq.config import load_config

    base = {"total_workers": 4, "max_rounds": 3, "threads": 1, "eval_every": 1000}
    base.update(overrides)
    return load_config(str(PAPER_CONFIG), base)
