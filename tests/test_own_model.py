"""Your own model and data (README): a model by import path with BatchNorm
buffers and a float16 parameter, trained the same in the simulator and on a
loopback cluster; a worker whose model differs refused; datasets by import
path and CIFAR-10 from files in its own format."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from cluster_util import start_cluster
from conftest import REPO, small_config
from safetensors.torch import load as load_safetensors
from test_cifar10 import write_cifar

from flq.config import ConfigError
from flq.datasets import DatasetError
from flq.layout import LayoutError, ModelLayout, TensorSpec
from flq.model import build_model, initial_state, layout_of, state_dict_from_flat
from flq.outcome import exit_status
from flq.outputs import read_archive
from flq.simulate import simulate

BNNET = '''
import torch
import torch.nn.functional as F
from torch import nn


class BNNet(nn.Module):
    """conv (stride 2) -> BatchNorm -> relu -> x float16 gain -> avgpool -> linear."""

    def __init__(self, width=8, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.gain = nn.Parameter(torch.ones(width, dtype=torch.float16))
        self.fc = nn.Linear(width * 7 * 7, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x))) * self.gain.float().view(1, -1, 1, 1)
        x = F.avg_pool2d(x, 2)
        return self.fc(torch.flatten(x.contiguous(), 1))


def build(width=WIDTH):
    return BNNet(width)
'''

# width 8: conv 8x1x3x3 + 8, bn 8 + 8, gain 8 (float16), fc 10x392 + 10
N_PARAMS = 72 + 8 + 8 + 8 + 8 + 3920 + 10
BUFFER_BYTES = 4 * 8 + 4 * 8 + 8  # running_mean, running_var (float32), num_batches_tracked (int64)


@pytest.fixture(autouse=True)
def fresh_user_modules():
    """Each test writes its own bnnet.py / mydata.py: import them afresh."""
    import importlib

    yield
    for name in ("bnnet", "mydata"):
        sys.modules.pop(name, None)
    importlib.invalidate_caches()


def write_bnnet(folder: Path, width: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bnnet.py").write_text(BNNET.replace("WIDTH", str(width)))
    return folder


def state_sha(state) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, by name
    (a safetensors file keeps its own order)."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(
            t.contiguous().view(torch.uint8).numpy().tobytes()
            if t.dim()
            else t.reshape(1).view(torch.uint8).numpy().tobytes()
        )
    return h.hexdigest()


def kinds(state):
    return {k: (v.dtype, tuple(v.shape)) for k, v in state.items()}


SETTINGS = {
    "total_workers": 2,
    "max_rounds": 3,
    "model": "bnnet:build",
    "model_args": {"width": 8},
    "mode": "bbit",
    "b_up": 4,
    "b_down": 8,
    "checkpoint_every": 3,
}


@pytest.mark.slow
def test_bn_model_with_a_float16_parameter_is_the_same_in_the_simulator_and_on_the_cluster(
    tmp_path, monkeypatch, fmnist_available
):
    root = write_bnnet(tmp_path)
    monkeypatch.chdir(root)
    cfg = small_config(**SETTINGS)
    sim = simulate(cfg, write=False, progress=False)
    module = build_model("bnnet:build", {"width": 8})
    layout = layout_of(module)
    assert layout.n == N_PARAMS and layout.buffer_bytes == BUFFER_BYTES
    expected = sim.model_state(layout)
    assert kinds(expected) == kinds(module.state_dict())
    assert expected["gain"].dtype == torch.float16 and expected["bn.num_batches_tracked"].dtype == torch.int64
    # every worker took one step a round, so the averaged count is exactly 3; the statistics moved
    assert int(expected["bn.num_batches_tracked"]) == 3
    assert float(expected["bn.running_mean"].abs().sum()) > 0
    # bits: each upload is 4 bits a parameter plus its raw buffers; each model 8 bits a parameter plus the buffers
    rec = sim.records[0]
    assert rec["selcnt"] == 2
    assert rec["bits_up_cum"] == 2 * (4 * N_PARAMS + 8 * BUFFER_BYTES)
    assert rec["bits_down_cum"] == 2 * (8 * N_PARAMS + 8 * BUFFER_BYTES)

    overrides = {k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in SETTINGS.items()}
    overrides["checkpoint_dir"] = str(root / "ckpt")
    cluster = start_cluster(root, 2, overrides, master_args=["--linger_s", "60"])
    try:
        cluster.wait_status(lambda st: st["state"] == "finished", timeout=240, what="the run to finish")
        r = httpx.get(f"{cluster.url}/get_global_model", timeout=30)
        assert r.status_code == 200 and r.headers["X-FLQ-Round"] == "3"
        served = load_safetensors(r.content)
    finally:
        cluster.kill_all()
    assert set(served) == set(module.state_dict())
    assert kinds(served) == kinds(module.state_dict())
    assert state_sha(served) == state_sha(expected)
    (checkpoint,) = sorted((root / "ckpt").glob("flq_master_fashion_mnist_bbit_*.npz"))
    _, arrays = read_archive(checkpoint)
    saved = load_safetensors(arrays["model"].tobytes())
    assert kinds(saved) == kinds(module.state_dict())
    assert state_sha(saved) == state_sha(expected)
    assert arrays["buffer_2"].dtype == np.int64 and int(arrays["buffer_2"]) == 3
    (xlsx,) = cluster.results()
    assert state_sha(load_safetensors(xlsx.with_suffix(".safetensors").read_bytes())) == state_sha(expected)
    model = build_model("bnnet:build", {"width": 8})
    model.load_state_dict(served)  # loads back into the module as it is


def worker_from_elsewhere(root: Path, other: Path, overrides):
    """A master run from ``root`` and worker 0 run from ``other`` (its own
    modules); returns (the worker's process, its last stderr line, the
    master's status after), having checked that the worker exited as refused."""
    cluster = start_cluster(root, 1, overrides, start_workers=False)
    try:
        cmd = [sys.executable, "-m", "flq", "worker", "--worker_id", "0", "--master_ip", "127.0.0.1"]
        cmd += ["--master_port", str(cluster.port), "--threads", "1", "--log_dir", str(other / "logs")]
        p = subprocess.run(cmd, cwd=other, capture_output=True, text=True, timeout=120, env=cluster.env)
        st = cluster.status()
    finally:
        cluster.kill_all()
    assert p.returncode == exit_status("refused"), p.stderr
    return p, p.stderr.strip().splitlines()[-1], st


def test_a_worker_whose_model_differs_is_refused_naming_the_tensor_before_any_round(tmp_path, fmnist_available):
    root = write_bnnet(tmp_path / "master")
    other = write_bnnet(tmp_path / "worker", width=4)  # same import path, another module
    overrides = {k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in SETTINGS.items() if k != "model_args"}
    p, last, st = worker_from_elsewhere(root, other, overrides)
    assert last.startswith("flq worker 0: the master refused this worker (409, model_mismatch): "), p.stderr
    assert "tensor 'gain' is param float16 [4] at the worker but param float16 [8] at the master" in last
    assert st["round"] <= 1 and st["state"] == "waiting"  # no round started


def test_layout_mismatch_names_the_first_differing_tensor():
    a = ModelLayout((TensorSpec("w", (2, 3), "float32", True), TensorSpec("n", (), "int64", False)))
    assert a.mismatch(a.signature()) == ""
    assert a.mismatch([["w", "param", "float32", [3, 2]], ["n", "buffer", "int64", []]]) == (
        "tensor 'w' is param float32 [3, 2] at the worker but param float32 [2, 3] at the master"
    )
    assert a.mismatch([["w", "param", "float16", [2, 3]], ["n", "buffer", "int64", []]]) == (
        "tensor 'w' is param float16 [2, 3] at the worker but param float32 [2, 3] at the master"
    )
    assert a.mismatch([["w", "param", "float32", [2, 3]]]) == (
        "tensor 'n' (buffer int64 []) of the master's model is missing at the worker"
    )
    extra = [["w", "param", "float32", [2, 3]], ["n", "buffer", "int64", []], ["z", "buffer", "int64", []]]
    assert a.mismatch(extra) == "tensor 'z' of the worker's model is not in the master's"


def test_buffers_pack_round_trip_and_average_exactly():
    layout = ModelLayout(
        (
            TensorSpec("w", (3,), "float32", True),
            TensorSpec("mean", (2,), "float32", False),
            TensorSpec("count", (), "int64", False),
            TensorSpec("flag", (2,), "bool", False),
        )
    )
    assert layout.buffer_bytes == 8 + 8 + 2
    a = (np.array([1.0, 2.0], np.float32), np.array(7, np.int64), np.array([True, False]))
    b = (np.array([2.0, 5.0], np.float32), np.array(8, np.int64), np.array([True, True]))
    raw = layout.pack_buffers(a)
    assert len(raw) == 18 and raw[8:16] == (7).to_bytes(8, "little")
    back = layout.unpack_buffers(raw)
    assert all(np.array_equal(x, y) and x.dtype == y.dtype and x.shape == y.shape for x, y in zip(a, back))
    mean = layout.average_buffers([a, b])
    assert mean[0].tolist() == [1.5, 3.5] and mean[0].dtype == np.float32
    assert int(mean[1]) == 7 and mean[1].dtype == np.int64  # floor of 7.5
    assert mean[2].tolist() == [True, True]
    bad = layout.pack_buffers((np.array([np.nan, 0], np.float32), a[1], a[2]))
    with pytest.raises(LayoutError, match="buffer 'mean' holds NaN"):
        layout.unpack_buffers(bad)
    with pytest.raises(LayoutError, match="buffers take 18 bytes, got 17"):
        layout.unpack_buffers(raw[:-1])


def test_a_bfloat16_parameter_trains_in_float32_master_weights(tmp_path, monkeypatch, fmnist_available):
    """Adam's steps (about lr = 1e-3) are below half a bfloat16 spacing near 1
    (2^-8): rounding the global model after each step would never move it."""
    (tmp_path / "bf16net.py").write_text(BF16NET)
    monkeypatch.chdir(tmp_path)
    cfg = small_config(model="bf16net:build", total_workers=2, max_rounds=3, mode="fedavg", b_down=32)
    run = simulate(cfg, write=False, progress=False)
    layout = layout_of(build_model("bf16net:build"))
    assert layout.params[0].name == "gain" and layout.params[0].dtype == "bfloat16"
    gain = run.theta[:10]
    assert np.abs(gain - 1).max() > 1e-3  # moved in the float32 master weights
    state = run.model_state(layout)
    assert state["gain"].dtype == torch.bfloat16
    assert torch.equal(state["gain"], torch.from_numpy(gain.copy()).bfloat16())  # exported as PyTorch casts it
    sys.modules.pop("bf16net", None)


BF16NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(10, dtype=torch.bfloat16))
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)) * self.gain.float()


def build():
    return Net()
"""


def test_a_master_update_keeps_a_float16_parameter_in_float16(tmp_path, monkeypatch):
    monkeypatch.chdir(write_bnnet(tmp_path))
    theta, buffers = initial_state("bnnet:build", {"width": 8}, seed=3)
    module = build_model("bnnet:build", {"width": 8})
    layout = layout_of(module)
    state = state_dict_from_flat(layout, theta, buffers)
    assert kinds(state) == kinds(module.state_dict())
    again, _ = initial_state("bnnet:build", {"width": 8}, seed=3)
    assert np.array_equal(theta, again)  # the factory's own init, seeded: the same in every process
    other, _ = initial_state("bnnet:build", {"width": 8}, seed=4)
    assert not np.array_equal(theta, other)


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("nosuchmodule:build", {}, "config key 'model.name': cannot import 'nosuchmodule'"),
        ("bnnet:nothing", {}, "config key 'model.name': module 'bnnet' has no attribute 'nothing'"),
        ("bnnet:build", {"depth": 3}, "config key 'model.name': bnnet:build(**{'depth': 3}) failed: TypeError"),
        ("bnnet:torch", {}, "config key 'model.name': 'bnnet:torch' is not callable"),
        ("bnnet:frozen", {}, "parameter 'weight' has requires_grad=False"),
        ("bnnet:not_a_module", {}, "config key 'model.name': bnnet:not_a_module returned int, not a torch.nn.Module"),
    ],
)
def test_bad_model_factories_are_one_line(tmp_path, monkeypatch, name, args, message):
    root = write_bnnet(tmp_path)
    with open(root / "bnnet.py", "a") as f:
        f.write(
            "\ndef frozen():\n    m = nn.Linear(2, 2)\n    m.weight.requires_grad_(False)\n    return m\n"
            "\ndef not_a_module():\n    return 3\n"
        )
    monkeypatch.chdir(root)
    with pytest.raises((ConfigError, LayoutError)) as exc:
        build_model(name, args)
    assert str(exc.value).startswith(message) or message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_config_reads_import_paths_and_keyword_arguments():
    cfg = small_config(model="pkg.mod:build", model_args='{"width": 4}', dataset="my.data:load")
    assert (cfg.model, cfg.model_args, cfg.dataset, cfg.dataset_tag) == (
        "pkg.mod:build",
        {"width": 4},
        "my.data:load",
        "my_data_load",
    )
    assert small_config(dataset="CIFAR-10").dataset == "cifar10"
    with pytest.raises(ConfigError, match=r"config key '--model': got 'resnet', expected cnn, mlp, or package"):
        small_config(model="resnet")
    with pytest.raises(ConfigError, match=r"config key '--model_args': got '\[1\]'"):
        small_config(model_args="[1]")
    with pytest.raises(ConfigError, match=r"config key '--dataset': got 'pkg-mod:load'"):
        small_config(dataset="pkg-mod:load")


DATA_MODULE = """
import numpy as np
import torch


def arrays(n_train=96, n_test=40, classes=3):
    rng = np.random.default_rng(0)
    x = rng.random((n_train + n_test, 1, 28, 28), dtype=np.float32)
    y = rng.integers(0, classes, n_train + n_test)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


class Pairs(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def datasets(n_train=96, n_test=40):
    (a, b), (c, d) = arrays(n_train, n_test)
    return Pairs(a, b), Pairs(c, d)


def wrong():
    return [1, 2, 3]


def mismatched():
    (a, b), (c, d) = arrays()
    return (a, b[:-1]), (c, d)
"""


def test_datasets_by_import_path_train_and_partition_by_their_labels(tmp_path, monkeypatch):
    from flq.partition import partition
    from flq.sources import load

    (tmp_path / "mydata.py").write_text(DATA_MODULE)
    monkeypatch.chdir(tmp_path)
    a = load("mydata:arrays", None, {"n_train": 96})
    b = load("mydata:datasets", None, {"n_train": 96})
    for ds in (a, b):
        assert ds.train_x.shape == (96, 1, 28, 28) and ds.train_x.dtype == np.float32
        assert ds.train_y.dtype == np.int64 and ds.test_x.shape == (40, 1, 28, 28)
        assert ds.num_classes == 3 and not ds.train_x.flags.writeable
    assert np.array_equal(a.train_x, b.train_x) and np.array_equal(a.test_y, b.test_y)
    parts = partition(a.train_y, 4, "non_iid", 0.1, 42, 8)
    assert set(np.concatenate(parts).tolist()) == set(range(96)) and min(len(p) for p in parts) >= 8
    with pytest.raises(DatasetError, match=r"^mydata:wrong returned list; expected \(train, test\)$"):
        load("mydata:wrong", None, {})
    with pytest.raises(DatasetError, match=r"^mydata:mismatched: train: 96 samples but labels of shape \[95\]$"):
        load("mydata:mismatched", None, {})
    cfg = small_config(
        dataset="mydata:datasets", model="mlp", total_workers=3, max_rounds=2, batch_size=8, eval_every=1
    )
    run = simulate(cfg, write=False, progress=False)
    assert [r["iter"] for r in run.records] == [1, 2] and 0 <= run.records[-1]["acc"] <= 1


def test_cifar10_from_its_own_files_dirichlet_over_10_workers_trains_2_rounds_of_bbit(tmp_path, monkeypatch):
    from flq.runtime import Runtime

    write_cifar(tmp_path / "data" / "cifar-10-batches-py")
    monkeypatch.chdir(REPO)  # examples.cifar10_resnet imports from here
    cfg = small_config(
        dataset="cifar10",
        data_dir=str(tmp_path / "data"),
        model="examples.cifar10_resnet:build",
        model_args={"width": 4},
        total_workers=10,
        partition="non_iid",
        dir_alpha=0.1,
        batch_size=8,
        mode="bbit",
        max_rounds=2,
        eval_every=1,
        up_budget_bits=0,
    )
    rt = Runtime(cfg)
    assert rt.data.train_x.shape == (200, 3, 32, 32) and rt.data.test_x.shape == (30, 3, 32, 32)
    labels_per_worker = [len(set(rt.data.train_y[p].tolist())) for p in rt.partitions]
    assert len(rt.partitions) == 10 and min(labels_per_worker) < 10  # Dirichlet 0.1: skewed shares
    run = simulate(cfg, write=False, progress=False, runtime=rt)
    assert [r["iter"] for r in run.records] == [1, 2]
    assert all(r["selcnt"] == 10 for r in run.records)  # no budget: every worker heard
    assert all(0 <= r["acc"] <= 1 for r in run.records)
    state = run.model_state(rt.layout)
    assert int(state["bn.num_batches_tracked"]) == 2


def test_the_example_says_in_one_line_where_to_put_cifar10_when_it_is_missing(tmp_path):
    env = {"FLQ_NO_DOWNLOAD": "1", "XDG_CACHE_HOME": str(tmp_path / "cache"), "FLQ_DATA_DIR": str(tmp_path / "none")}
    cmd = [sys.executable, "-m", "flq", "simulate", "--config", "examples/cifar10_resnet.json", "--rounds", "1"]
    cmd += ["--results_dir", str(tmp_path / "results"), "--log_dir", str(tmp_path / "logs")]
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env={**_env(), **env})
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and time.monotonic() - t0 < 60
    # the error is one line, after the start-up steps the progress shows (no traceback)
    assert "CIFAR-10 not found in" in lines[-1] and "cifar-10-batches-py" in lines[-1], p.stderr
    assert [line.split()[0] for line in lines[:-1]] == ["loading"], p.stderr


def test_the_example_runs_from_the_readme_command_when_the_files_are_there(tmp_path):
    write_cifar(tmp_path / "data" / "cifar-10-batches-py")
    env = {"FLQ_NO_DOWNLOAD": "1", "FLQ_DATA_DIR": str(tmp_path / "data")}
    cmd = [sys.executable, "-m", "flq", "simulate", "--config", "examples/cifar10_resnet.json"]
    cmd += ["--rounds", "2", "--batch_size", "8", "--model_args", '{"width": 4}', "--threads", "1"]
    cmd += ["--results_dir", str(tmp_path / "results"), "--log_dir", str(tmp_path / "logs")]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**_env(), **env})
    assert p.returncode == 0, p.stderr
    (xlsx,) = sorted((tmp_path / "results").glob("flq_results_cifar10_bbit_*.xlsx"))
    state = load_safetensors(xlsx.with_suffix(".safetensors").read_bytes())
    module = build_model_from_repo({"width": 4})
    assert kinds(state) == kinds(module.state_dict())


def build_model_from_repo(args):
    sys.path.insert(0, str(REPO))
    try:
        from examples.cifar10_resnet import build

        return build(**args)
    finally:
        sys.path.remove(str(REPO))


def _env():
    import os

    return dict(os.environ)


def test_buffers_local_stay_with_each_worker_and_cost_no_bits(tmp_path, monkeypatch, fmnist_available):
    from flq.master import Master
    from flq.runtime import Runtime
    from flq.worker import Worker

    monkeypatch.chdir(write_bnnet(tmp_path))
    cfg = small_config(**{**SETTINGS, "buffers": "local", "checkpoint_every": 0})
    rt = Runtime(cfg)
    theta0, buffers0 = rt.initial_model()
    master = Master(cfg, rt.layout, theta0, buffers0=buffers0)
    workers = [
        Worker(m, cfg, rt.model, rt.data.train_x, rt.data.train_y, rt.partitions[m], buffers0=buffers0)
        for m in range(2)
    ]
    for k in range(2):
        me = master.begin_round()
        for w in workers:
            master.add_offer(w.offer(k, me, master.downlink(w.worker_id)))
        for m in master.select():
            master.receive_upload(m, workers[m].upload(k))
        record = master.end_round()
    assert record["bits_up_cum"] == 2 * 2 * 4 * N_PARAMS  # no buffer bits: they never travel
    assert all(np.array_equal(a, b) for a, b in zip(master.buffers, buffers0))  # the master's stay the initial ones
    w0, w1 = (w.buffers for w in workers)
    assert int(w0[2]) == int(w1[2]) == 2 and not np.array_equal(w0[0], w1[0])  # each its own statistics


def test_a_malformed_buffer_prefix_is_refused_and_changes_nothing(tmp_path, monkeypatch, fmnist_available):
    from flq.master import Master, MasterError
    from flq.runtime import Runtime
    from flq.worker import Worker

    monkeypatch.chdir(write_bnnet(tmp_path))
    cfg = small_config(**{**SETTINGS, "checkpoint_every": 0})
    rt = Runtime(cfg)
    theta0, buffers0 = rt.initial_model()
    master = Master(cfg, rt.layout, theta0, buffers0=buffers0)
    w = Worker(0, cfg, rt.model, rt.data.train_x, rt.data.train_y, rt.partitions[0], buffers0=buffers0)
    other = Worker(1, cfg, rt.model, rt.data.train_x, rt.data.train_y, rt.partitions[1], buffers0=buffers0)
    me = master.begin_round()
    master.add_offer(w.offer(0, me, master.downlink(0)))
    master.add_offer(other.offer(0, me, master.downlink(1)))
    assert master.offers[0].cost == 4 * N_PARAMS + 8 * BUFFER_BYTES
    master.select()
    body = w.upload(0)
    before = master.state_digest()
    nan = bytearray(body)
    nan[0:4] = np.float32("nan").tobytes()
    for bad, why in ((bytes(nan), "buffer 'bn.running_mean' holds NaN or infinity"), (body[:50], "shorter")):
        with pytest.raises(MasterError, match=why) as exc:
            master.receive_upload(0, bad)
        assert exc.value.status == 400 and master.state_digest() == before
    assert master.receive_upload(0, body) is True
    assert all(np.array_equal(a, b) for a, b in zip(master.received_buffers[0], w.buffers))


def test_worker_and_master_state_keep_the_buffers_exactly(tmp_path, monkeypatch, fmnist_available):
    from flq.checkpoint import load_checkpoint, save_checkpoint
    from flq.master import Master
    from flq.runtime import Runtime
    from flq.worker import Worker
    from flq.worker_state import read_state, save_state

    monkeypatch.chdir(write_bnnet(tmp_path))
    cfg = small_config(**{**SETTINGS, "buffers": "local", "checkpoint_every": 0})
    rt = Runtime(cfg)
    theta0, buffers0 = rt.initial_model()
    w = Worker(0, cfg, rt.model, rt.data.train_x, rt.data.train_y, rt.partitions[0], buffers0=buffers0)
    w.local_update(theta0)
    path = save_state(tmp_path / "w.npz", w.state_dict(), {"run": "r", "n": N_PARAMS}, 0)
    state, _ = read_state(path)
    fresh = Worker(0, cfg, rt.model, rt.data.train_x, rt.data.train_y, rt.partitions[0], buffers0=buffers0)
    fresh.load_state_dict(state)
    assert [b.dtype for b in fresh.buffers] == [np.float32, np.float32, np.int64]
    assert all(np.array_equal(a, b) for a, b in zip(fresh.buffers, w.buffers)) and int(fresh.buffers[2]) == 1
    master = Master(cfg, rt.layout, theta0, buffers0=w.buffers)
    ckpt = save_checkpoint(tmp_path / "m.npz", master.state_dict(), cfg.public_sections())
    resumed = Master(cfg, rt.layout, theta0, buffers0=buffers0)
    resumed.load_state_dict(load_checkpoint(ckpt)[0])
    assert resumed.state_digest() == master.state_digest()


BAD_DATA = """
import numpy as np
import torch


class Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _x(n, side=28):
    return np.zeros((n, 1, side, side), np.float32)


def fractional():
    return Items([(_x(1)[0], 0.5), (_x(1)[0], 1.0)]), (_x(2), np.array([0, 1]))


def one_hot():
    return Items([(_x(1)[0], np.eye(3)[0]), (_x(1)[0], np.eye(3)[1])]), (_x(2), np.array([0, 1]))


def ragged():
    return Items([(_x(1)[0], 0), (_x(1, 20)[0], 1)]), (_x(2), np.array([0, 1]))


def only_train():
    return _x(4), (_x(2), np.array([0, 1]))


def many_classes():
    return (_x(64), np.arange(64) % 20), (_x(8), np.arange(8))
"""

UNUSED = """
from torch import nn


class WithHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(784, 10)
        self.aux = nn.Linear(10, 2)  # not used in forward

    def forward(self, x):
        return self.body(x.flatten(1))


def build():
    return WithHead()
"""


@pytest.mark.parametrize(
    "loader, message",
    [
        ("fractional", "baddata:fractional: train: labels must be integers, got float64"),
        ("one_hot", "baddata:one_hot: train: each item's label must be one integer, got shape [3]"),
        ("ragged", "baddata:ragged: train: samples of different shapes ((1, 20, 20), (1, 28, 28) ...)"),
        ("only_train", "baddata:only_train: train is one array; expected a pair (x, y) or a torch.utils.data.Dataset"),
    ],
)
def test_loaders_returning_the_wrong_thing_are_one_line(tmp_path, monkeypatch, loader, message):
    from flq.sources import load

    (tmp_path / "baddata.py").write_text(BAD_DATA)
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("baddata", None)
    with pytest.raises(DatasetError) as exc:
        load(f"baddata:{loader}", None, {})
    assert str(exc.value) == message


def test_a_model_too_small_for_the_labels_is_refused_before_any_round(tmp_path, monkeypatch):
    from flq.runtime import Runtime

    (tmp_path / "baddata.py").write_text(BAD_DATA)
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("baddata", None)
    cfg = small_config(dataset="baddata:many_classes", model="mlp", total_workers=2, batch_size=8)
    with pytest.raises(
        ConfigError, match=r"^config key 'model.name': the model has 10 outputs but the labels go up to 19$"
    ):
        _ = Runtime(cfg).data


def test_a_parameter_the_forward_pass_does_not_use_gets_a_zero_gradient(tmp_path, monkeypatch, fmnist_available):
    (tmp_path / "unused.py").write_text(UNUSED)
    monkeypatch.chdir(tmp_path)
    cfg = small_config(model="unused:build", total_workers=2, max_rounds=2, mode="fedavg", b_down=32)
    run = simulate(cfg, write=False, progress=False)
    state = run.model_state(layout_of(build_model("unused:build")))
    assert float(state["aux.weight"].abs().max()) > 0  # trained only by the L2 term's shrinking, never NaN
    assert bool(torch.isfinite(state["aux.weight"]).all()) and len(run.records) == 2
    sys.modules.pop("unused", None)


def test_a_model_cli_refuses_in_one_line_with_exit_2(tmp_path):
    write_bnnet(tmp_path)
    with open(tmp_path / "bnnet.py", "a") as f:
        f.write(
            "\ndef tied():\n    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))\n"
            "    m[1].weight = m[0].weight\n    return m\n"
        )
    cmd = [sys.executable, "-m", "flq", "simulate", "--model", "bnnet:tied", "--rounds", "1", "--log_dir", "logs"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=_env())
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "'1.weight' is the same tensor as another one (shared weights)" in lines[0]


def test_a_missing_dependency_of_a_found_module_is_named(tmp_path, monkeypatch):
    (tmp_path / "needsdep.py").write_text("import not_installed_anywhere\n\ndef build():\n    pass\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ConfigError, match="importing 'needsdep' failed: it needs 'not_installed_anywhere', which is not installed"
    ):
        build_model("needsdep:build")
    with pytest.raises(
        ConfigError, match="'dataset.dataset_args': the built-in dataset fashion_mnist takes no arguments"
    ):
        small_config(dataset_args={"n": 3})


def test_a_worker_with_another_training_set_is_refused(tmp_path, fmnist_available):
    root, other = tmp_path / "master", tmp_path / "worker"
    for folder, n in ((root, 300), (other, 200)):
        folder.mkdir()
        (folder / "mydata.py").write_text(DATA_MODULE.replace("n_train=96", f"n_train={n}"))
    overrides = {"dataset": "mydata:arrays", "model": "mlp", "total_workers": 1, "batch_size": 8, "max_rounds": 2}
    p, last, st = worker_from_elsewhere(root, other, overrides)
    assert "(409, data_mismatch): worker 0's training set (200:" in last and "is not the master's (300:" in last
    assert st["state"] == "waiting"


def test_user_code_calling_sys_exit_is_a_config_error_not_an_exit(tmp_path, monkeypatch):
    from flq.sources import load

    (tmp_path / "quits.py").write_text(
        "import sys\n\ndef build():\n    sys.exit(0)\n\ndef load():\n    raise SystemExit(3)\n"
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^config key 'model.name': quits:build\(\*\*\{\}\) called sys.exit\(0\)$"):
        build_model("quits:build")
    with pytest.raises(ConfigError, match=r"^config key 'dataset.name': quits:load called sys.exit\(3\)$"):
        load("quits:load", None, {})
    sys.modules.pop("quits", None)


def test_buffers_beyond_their_bounds_and_huge_descriptions_are_refused_in_short_lines():
    layout = ModelLayout(
        (
            TensorSpec("w", (3,), "float32", True),
            TensorSpec("var", (2,), "float32", False),
            TensorSpec("count", (), "int64", False),
        )
    )
    ok = (np.ones(2, np.float32), np.array(5, np.int64))
    big = layout.pack_buffers((np.array([1.0, -1e30], np.float32), ok[1]))
    with pytest.raises(LayoutError, match=r"^buffer 'var' holds values of magnitude >= 1e\+18$"):
        layout.unpack_buffers(big)
    huge = layout.pack_buffers((ok[0], np.array(2**62, np.int64)))
    with pytest.raises(LayoutError, match=r"^buffer 'count' holds integers beyond \+-2\^53$"):
        layout.unpack_buffers(huge)
    described = [
        ["w", "param", "float32", [1] * 100_000],
        ["var", "buffer", "float32", [2]],
        ["count", "buffer", "int64", []],
    ]
    message = layout.mismatch(described)
    assert (
        message.startswith("tensor 'w' is param float32 [1, 1, 1") and len(message) == 300 and message.endswith("...")
    )


def test_a_model_without_parameters_or_with_an_empty_one_is_refused(tmp_path, monkeypatch):
    (tmp_path / "empty.py").write_text(
        "import torch\nfrom torch import nn\n\ndef nothing():\n    return nn.ReLU()\n\n"
        "def hollow():\n    m = nn.Linear(4, 2)\n    m.extra = nn.Parameter(torch.zeros(0))\n    return m\n"
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="empty:nothing: the model has no parameters: nothing to train"):
        build_model("empty:nothing")
    with pytest.raises(ConfigError, match=r"empty:hollow: parameter 'extra' has no elements \(shape \[0\]\)"):
        build_model("empty:hollow")
    sys.modules.pop("empty", None)
