"""The real cluster: a master process and worker processes on loopback.

Same numbers as the simulation, monitoring and stop, bytes on the wire."""

from __future__ import annotations

import hashlib
import math
import time

import httpx
import numpy as np
import pytest
from cluster_util import CuttingProxy, start_cluster
from conftest import small_config
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from flq.algorithm.packing import header_size
from flq.model import CNN, flatten
from flq.results import read_results
from flq.simulate import simulate

pytestmark = pytest.mark.slow  # real master and worker processes (run_tests.sh --quick leaves them out)

N = 467_818
# Entropy coding on both links (the default) and adaptive width 2..4: each of the 4 workers
# sends the widest width whose coded size fits its share, 5e6 / 4 bits.
SETTINGS = {
    "rounds": 10,
    "mode": "bbit",
    "b_up": 4,
    "b_down": 8,
    "adaptive_width": "true",
    "entropy_coding": "both",
    "up_budget_bits": 5e6,
    "eval_every": 5,
    "eval_overlap": "true",  # the master evaluates rounds 5 and 10 beside the next round (and the end)
    "min_workers": 0,
    "seed": 3,
}


def _sha(theta: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(theta, np.float32).tobytes()).hexdigest()


def _model_file_theta(path) -> np.ndarray:
    model = CNN()
    model.load_state_dict(load_file(str(path)))
    return flatten(model)


def _finished(cluster):
    """Wait for ``cluster``'s run to complete (exit 0); (cluster, its spreadsheet)."""
    try:
        assert cluster.wait(timeout=600) == 0, cluster.output()
    finally:
        cluster.kill_all()
    (xlsx,) = cluster.results()
    return cluster, xlsx


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory, fmnist_available):
    return _finished(start_cluster(tmp_path_factory.mktemp("cluster"), 4, SETTINGS))


def test_distributed_equals_simulation(distributed_run):
    cluster, xlsx = distributed_run
    run = read_results(xlsx)
    cfg = small_config(
        total_workers=4,
        max_rounds=10,
        mode="bbit",
        b_up=4,
        b_down=8,
        adaptive_width=True,
        entropy_coding="both",
        up_budget_bits=5e6,
        eval_every=5,
        eval_overlap=False,  # evaluated in line: the same numbers
        seed=3,
    )
    sim = simulate(cfg, write=False, progress=False)
    assert len(run.curve) == 10 and list(run.curve["iter"]) == list(range(1, 11))
    for rec, (_, row) in zip(sim.records, run.curve.iterrows()):
        for key in ("loss", "acc", "entropy"):
            # the .xlsx keeps 16 significant digits (openpyxl), hence rel 1e-15, not ==
            a, b = rec[key], float(row[key])
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-15, abs=0), (rec["iter"], key)
        for key in ("selcnt", "bits_up_cum", "bits_down_cum", "cum_bits_total", "bits_up_nominal_cum"):
            assert rec[key] == int(row[key]), (rec["iter"], key)
        assert rec["b_up_mean"] == float(row["b_up_mean"])
    assert set(run.curve["selcnt"]) == {4}  # every worker's share fits: all heard
    assert 2 <= run.curve["b_up_mean"].min() and run.curve["b_up_mean"].max() <= 4
    # equal at the same thread count (README): the spreadsheet records it
    assert [run.config[f"runtime.worker_threads.{m}"] for m in range(4)] == [1, 1, 1, 1]
    assert run.config["runtime.threads"] == 1 and run.config["run.end"] == "completed"
    assert run.config["system.eval_overlap"] in (True, "True", "true")
    evaluated = run.curve.dropna(subset=["acc"])
    assert list(evaluated["iter"]) == [5, 10] and (evaluated["master_evaluate_wait_s"] >= 0).all()
    final = _model_file_theta(xlsx.with_suffix(".safetensors"))
    assert _sha(final) == _sha(sim.theta)


@pytest.fixture(scope="module")
def secured_run(tmp_path_factory, fmnist_available):
    """The first 5 rounds of ``distributed_run`` with per-worker credentials
    and mutual TLS (round 5 is evaluated in both)."""
    from flq.credentials import write_credentials, write_tls

    root = tmp_path_factory.mktemp("secured_cluster")
    c = root / "creds"
    write_credentials(c, 4)
    write_tls(c, 4, ["127.0.0.1"])
    cluster = start_cluster(
        root,
        4,
        {**SETTINGS, "rounds": 5, "credentials": c / "master.secret"},
        cafile=str(c / "ca.pem"),
        master_args=[
            "--certfile",
            str(c / "master.pem"),
            "--keyfile",
            str(c / "master-key.pem"),
            "--cafile",
            str(c / "ca.pem"),
        ],
        client_cert=(str(c / "operator.pem"), str(c / "operator-key.pem")),
        worker_args=lambda m: [
            "--credential",
            str(c / f"worker_{m}.key"),
            "--certfile",
            str(c / f"worker_{m}.pem"),
            "--keyfile",
            str(c / f"worker_{m}-key.pem"),
        ],
    )
    return _finished(cluster)


def test_credentials_and_mutual_tls_change_no_number(distributed_run, secured_run):
    """Per-worker credentials and mutual TLS on loopback: every per-round
    metric (the test loss and accuracy of round 5's model to the last digit),
    bit count and wire byte count equal the run without them."""
    plain, secured = read_results(distributed_run[1]).curve.iloc[:5], read_results(secured_run[1]).curve
    assert len(secured) == 5 and secured["acc"].iloc[-1] == secured["acc"].iloc[-1]  # round 5 evaluated
    for key in ("loss", "acc", "entropy", "selcnt", "bits_up_cum", "bits_down_cum", "wire_bytes_down"):
        a, b = plain[key].tolist(), secured[key].tolist()
        assert all((x != x and y != y) or x == y for x, y in zip(a, b)), key
    # the offers' JSON carries each worker's measured compute seconds: a few bytes may differ per offer
    assert (plain["wire_bytes_up"] - secured["wire_bytes_up"]).abs().max() <= 4 * 8
    log = next((secured_run[0].root / "logs").glob("master_*.log")).read_text()
    assert "signed with per-worker keys" in log and "client certificates of" in log
    p, q = plain["round_time_s"].mean(), secured["round_time_s"].mean()
    print(f"mean round seconds: plain {p:.2f}, credentials + mTLS {q:.2f}")


def test_wire_bytes_are_the_charged_bits_plus_fixed_headers(distributed_run):
    """Each round's measured uplink is its uploads' charged bits in bytes, a
    112-byte fixed header per upload, and the 4 JSON offers; the downlink the
    same for 4 coded 8-bit models plus the small JSON answers."""
    _, xlsx = distributed_run
    curve = read_results(xlsx).curve
    header = header_size(4, 12)  # 112 bytes
    up_bits = np.diff([0, *curve["bits_up_cum"]])
    down_bits = np.diff([0, *curve["bits_down_cum"]])
    for (_, row), ub, db in zip(curve.iterrows(), up_bits, down_bits):
        assert ub % 8 == 0 and db % 8 == 0
        payloads = ub // 8 + int(row["selcnt"]) * header
        assert payloads < int(row["wire_bytes_up"]) <= payloads + 4 * 400
        down = db // 8 + 4 * header
        assert down < int(row["wire_bytes_down"]) <= down + 4 * 200
        assert ub < int(row["selcnt"]) * 4 * N  # coded: below the nominal b n


def test_logs_and_results_written(distributed_run):
    cluster, xlsx = distributed_run
    logs = cluster.root / "logs"
    assert len(list(logs.glob("master_*.log"))) == 1
    assert sorted(p.name.split("_")[0] for p in logs.glob("worker*_*.log")) == [
        "worker0",
        "worker1",
        "worker2",
        "worker3",
    ]
    text = next(logs.glob("master_*.log")).read_text()
    assert "round 10:" in text and "results (completed, 10 rounds)" in text
    assert all(p.returncode == 0 for p in cluster.workers.values())


def test_status_model_and_stop(tmp_path, fmnist_available):
    cluster = start_cluster(tmp_path, 2, {"rounds": 200, "eval_every": 0, "min_workers": 0})
    try:
        deadline = time.monotonic() + 180
        while True:
            st = cluster.status()
            if st["rounds_done"] >= 2:
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.3)
        assert st["state"] == "training" and st["max_rounds"] == 200 and st["mode"] == "bbit"
        assert [w["worker_id"] for w in st["workers"]] == [0, 1]
        assert all(w["seconds_since_seen"] < 60 for w in st["workers"])
        assert st["last_metrics"]["iter"] >= 2 and st["bits"]["total_cum"] > 0

        r = httpx.get(f"{cluster.url}/get_global_model", timeout=30)
        assert r.status_code == 200
        tensors = load_safetensors(r.content)
        model = CNN()
        model.load_state_dict(tensors)  # strict: every key and shape matches
        assert int(r.headers["X-FLQ-Round"]) >= 2
        assert sum(t.numel() for t in tensors.values()) == N

        r = httpx.post(f"{cluster.url}/stop", timeout=30)
        assert r.status_code == 200 and r.json()["stopping"] is True
        assert cluster.wait(timeout=120) == 4  # exit status 4: stopped
        assert all(p.returncode == 4 for p in cluster.workers.values())
    finally:
        cluster.kill_all()
    (xlsx,) = cluster.results()
    curve = read_results(xlsx).curve
    assert 2 <= len(curve) < 200
    assert list(curve["iter"]) == list(range(1, len(curve) + 1))
    assert "results (stopped" in next((tmp_path / "logs").glob("master_*.log")).read_text()


# ---------------------------------------------------------------------------
# retries that succeed, and succeed once: the cut exchange is retried and the
# run still equals the simulation bit for bit

RETRY_SETTINGS = {
    "rounds": 4,
    "model": "mlp",
    "mode": "bbit",
    "b_up": 4,
    "b_down": 8,
    "eval_every": 0,
    "min_workers": 0,
    "seed": 11,
    "round_timeout_s": 60,
}


def _through_proxy(tmp_path, rules):
    cluster = start_cluster(tmp_path, 2, RETRY_SETTINGS, start_workers=False)
    proxy = CuttingProxy(cluster.port, rules)
    try:
        for m in range(2):
            cluster.start_worker(m, address=["--master_ip", "127.0.0.1", "--master_port", str(proxy.port)])
        assert cluster.wait(timeout=300) == 0, cluster.output()
        assert all(p.returncode == 0 for p in cluster.workers.values())
    finally:
        proxy.close()
        cluster.kill_all()
    sim = simulate(
        small_config(total_workers=2, max_rounds=4, model="mlp", mode="bbit", b_up=4, b_down=8, seed=11),
        write=False,
        progress=False,
    )
    (xlsx,) = cluster.results()
    model = xlsx.with_suffix(".safetensors")
    from flq.model import build_model

    net = build_model("mlp")
    net.load_state_dict(load_file(str(model)))
    return proxy, cluster, read_results(xlsx), sim, _sha(flatten(net))


def test_cut_model_download_is_retried_and_served_again(tmp_path, fmnist_available):
    """The first round model a worker fetches is cut after 1,000 bytes. Before:
    the master counted it delivered and never served it again; with all
    workers required the run hung. Now the retry gets the same bytes."""
    proxy, cluster, run, sim, sha = _through_proxy(tmp_path, [(b"GET /round/model", 1000)])
    assert proxy.cut == [b"GET /round/model"]
    assert sha == _sha(sim.theta)  # the same run as the simulation, bit for bit
    assert list(run.curve["bits_down_cum"]) == [r["bits_down_cum"] for r in sim.records]  # counted once
    logs = "".join(p.read_text() for p in (cluster.root / "logs").glob("*.log"))
    assert "failed (RemoteProtocolError" in logs and "fetched round 1's model again (a retry)" in logs


def test_lost_offer_answer_is_retried_and_counted_once(tmp_path, fmnist_available):
    """The master records an offer and selects the worker, but the answer is
    lost. Before: the retried offer was refused as late and the update lost.
    Now the same offer gets the same answer and the worker uploads."""
    proxy, cluster, run, sim, sha = _through_proxy(tmp_path, [(b"POST /round/offer", 0)])
    assert proxy.cut == [b"POST /round/offer"]
    assert sha == _sha(sim.theta)
    assert list(run.curve["selcnt"]) == [r["selcnt"] for r in sim.records] == [2, 2, 2, 2]
    logs = "".join(p.read_text() for p in (cluster.root / "logs").glob("worker*.log"))
    assert "POST /round/offer failed (RemoteProtocolError" in logs
    assert "refused" not in logs
