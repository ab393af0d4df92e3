"""bf16 evaluation agrees with fp32 on the whole Fashion-MNIST test set for
the paper model after rounds 1, 50 and 200 (system.eval_precision).

The three models are the global models of one 200-round simulation of
configs/paper_fmnist.json (bbit 4/8, 20 workers, seed 42), written by
``python benchmarks/eval_precision.py`` and kept in tests/data/.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import small_config
from safetensors import safe_open
from safetensors.torch import load_file

from flq.model import FlatModel, build_model, flatten
from flq.runtime import Runtime

pytestmark = pytest.mark.slow  # the whole test set, 3 models, 2 precisions (run_tests.sh --quick leaves it out)

DATA = Path(__file__).resolve().parent / "data"
ROUNDS = (1, 50, 200)
#: |accuracy(bf16) - accuracy(fp32)| allowed: 20 of the 10,000 test images.
AGREEMENT = 0.002


@pytest.fixture(scope="module")
def test_set(fmnist_available):
    rt = Runtime(small_config(), evaluates=False)
    return rt.model.prepare_eval_set(rt.data.test_x, rt.data.test_y)


def test_bf16_agrees_with_fp32_on_the_whole_test_set_at_rounds_1_50_200(test_set):
    x, y = test_set
    assert x.shape[0] == 10_000
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # bf16 is emulated (slow) on CPUs without AVX512-BF16/AMX
    try:
        accuracy = {}
        for r in ROUNDS:
            path = DATA / f"paper_cnn_round{r}.safetensors"
            with safe_open(str(path), "pt") as f:
                assert f.metadata()["round"] == str(r) and f.metadata()["mode"] == "bbit"
            module = build_model("cnn")
            module.load_state_dict(load_file(str(path)))
            model = FlatModel(module)
            model.set_flat(flatten(module))
            fp32, _ = model.evaluate(x, y, 64, "fp32")
            bf16, _ = model.evaluate(x, y, 64, "bf16")
            accuracy[r] = fp32
            assert abs(bf16 - fp32) <= AGREEMENT, (r, fp32, bf16)
    finally:
        torch.set_num_threads(threads)
    assert accuracy[1] < accuracy[50] < accuracy[200] and accuracy[200] > 0.8, accuracy  # trained models
