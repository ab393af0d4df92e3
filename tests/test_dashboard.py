"""The dashboard, /metrics and the TensorBoard scalars: in a real browser
(Debian's chromium driven by playwright; no browser download) on a loopback
cluster and on ``flq simulate --serve``, the Prometheus text parsed by the
official client's parser, the auth and the escaping of what workers send.

Screenshots and the page's download sizes go to ``$FLQ_TEST_ARTIFACTS``
(default ``test-artifacts/`` in the repository)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from cluster_util import InProcessMaster, free_port, start_cluster
from conftest import PAPER_CONFIG, REPO, small_config

from flq.transport.dashboard import STATIC

ARTIFACTS = Path(os.environ.get("FLQ_TEST_ARTIFACTS", REPO / "test-artifacts"))
TOKEN = "dashboard-test-token"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: A worker address as a proxy may report it (uvicorn takes X-Forwarded-For from loopback): must show as text.
HOSTILE = "<img src=x onerror=window.flqXss=1><script>window.flqXss=2</script>"


# ----- helpers ---------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "no chromium: apt-get install chromium (scripts/test_deps.sh installs it)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


class Watched:
    """A page in a fresh browser context, every request and page error it had recorded."""

    def __init__(self, browser) -> None:
        self.context = browser.new_context(viewport={"width": 1400, "height": 1700})
        self.page = self.context.new_page()
        self.requests: list = []
        self.errors: list = []
        self.dialogs: list = []
        self.page.on("request", lambda r: self.requests.append(r))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", self._dialog)

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.accept()  # "Stop the run ...?": confirm

    def hosts(self) -> set:
        return {urlsplit(r.url).hostname for r in self.requests}

    def downloaded(self) -> dict:
        """Bytes each distinct URL path of the first load took (body and headers)."""
        out = {}
        for r in self.requests:
            path = urlsplit(r.url).path
            if path not in out:
                s = r.sizes()
                out[path] = s["responseBodySize"] + s["responseHeadersSize"]
        return out

    def wait_for(self, js: str, timeout_s: float) -> None:
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        try:
            self.page.wait_for_function(js, timeout=timeout_s * 1000, polling=250)
        except PlaywrightTimeout:
            shown = self.page.evaluate(
                "() => ['state', 'banner', 'updated'].map(id => id + ': ' + document.getElementById(id).textContent)"
            )
            raise AssertionError(
                f"timed out after {timeout_s} s waiting for {js}; the page shows {shown}; page errors {self.errors}"
            ) from None

    def text(self, selector: str) -> str:
        return self.page.inner_text(selector)

    def close(self) -> None:
        self.context.close()


def metrics(url: str, **kw) -> dict:
    """``/metrics`` parsed by prometheus_client's own parser: {(name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(f"{url}/metrics", timeout=10, **kw)
    assert r.status_code == 200, r.text
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def counters_increase(scrapes: list) -> None:
    """Every ``*_total`` sample (and histogram count/sum) of each scrape is >= the one before."""
    for before, after in zip(scrapes, scrapes[1:]):
        for key, value in before.items():
            if key[0].endswith(("_total", "_count", "_sum", "_bucket")):
                assert after.get(key, value) >= value, (key, value, after.get(key))


def save_artifact(name: str, data) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


WORKERS_SHOWN = (
    "document.querySelectorAll('#workers tbody tr').length === 4 && "
    "[...document.querySelectorAll('#workers tbody tr td:nth-child(3)')].every(td => td.textContent.length > 1)"
)
THREE_POINTS = "Number(document.querySelector('#chart-acc-round').dataset.points) >= 3"


def watch_stop_and_finish(w: Watched, url: str, name: str) -> list:
    """The shared part of the browser tests: wait for 3 accuracy points and
    4 workers, scrape /metrics, screenshot, click Stop, confirm, wait for the
    final state with its results line. Returns the scrapes."""
    w.page.goto(f"{url}/")
    w.wait_for(f"() => ({THREE_POINTS}) && ({WORKERS_SHOWN})", 300)
    scrapes = [metrics(url)]
    states = [td.inner_text() for td in w.page.query_selector_all("#workers tbody tr td:nth-child(3)")]
    assert len(states) == 4 and all(states), states
    save_artifact(f"dashboard_{name}_view.png", w.page.screenshot())  # what the window shows (README's)
    w.page.click("#config-section summary")  # the configuration, folded by default
    assert "system.total_workers" in w.text("#config")
    save_artifact(f"dashboard_{name}.png", w.page.screenshot(full_page=True))
    sizes = w.downloaded()
    save_artifact(
        f"dashboard_{name}_download.json", json.dumps({"total_bytes": sum(sizes.values()), **sizes}, indent=1)
    )
    scrapes.append(metrics(url))
    w.page.click("#stop")
    w.wait_for("() => document.querySelector('#state').textContent.startsWith('finished (stopped)')", 120)
    w.wait_for("() => !document.querySelector('#results').hidden", 60)
    assert w.dialogs and "Stop the run" in w.dialogs[0]
    return scrapes


def check_against_results(scrape: dict, xlsx: Path) -> None:
    """The bits counters of the last scrape equal the spreadsheet's totals."""
    from flq.results import read_results

    curve = read_results(xlsx).curve
    last = curve.iloc[-1]
    assert scrape[("flq_rounds_total", ())] == len(curve)
    assert scrape[("flq_round", ())] == len(curve)  # once over: the last round done, stopped or not
    assert scrape[("flq_uplink_bits_total", ())] == last["bits_up_cum"]
    assert scrape[("flq_downlink_bits_total", ())] == last["bits_down_cum"]
    assert scrape[("flq_wire_bytes_total", (("direction", "up"),))] == last["wire_bytes_up_cum"]
    assert scrape[("flq_wire_bytes_total", (("direction", "down"),))] == last["wire_bytes_down_cum"]
    assert scrape[("flq_selected_workers_total", ())] == curve["selcnt"].sum()


# ----- the browser on a real cluster and on a simulation -------------------------
@pytest.mark.slow
def test_dashboard_in_a_browser_on_a_loopback_cluster(tmp_path, fmnist_available, browser):
    cluster = start_cluster(
        tmp_path,
        4,
        # the small model: rounds of a fraction of a second, so that the page has much to follow
        {"eval_every": 1, "max_rounds": 600, "model": "mlp", "tensorboard_dir": str(tmp_path / "tb")},
        master_args=["--linger_s", "10"],
    )
    w = Watched(browser)
    try:
        scrapes = watch_stop_and_finish(w, cluster.url, "cluster")
        scrapes.append(metrics(cluster.url))  # the master lingers: its final counters
        assert cluster.wait(timeout=60) == 4  # stopped
        (xlsx,) = cluster.results()
        check_against_results(scrapes[-1], xlsx)
        counters_increase(scrapes)
        assert "results: " in w.text("#results") and xlsx.name in w.text("#results")
        assert w.hosts() == {"127.0.0.1"}, w.hosts()  # nothing left the machine: no CDN, no font
        assert not w.errors, w.errors
        check_tensorboard(tmp_path / "tb", xlsx)
    finally:
        w.close()
        cluster.kill_all()


@pytest.mark.slow
def test_dashboard_in_a_browser_on_simulate_serve(tmp_path, fmnist_available, browser):
    port = free_port()
    cmd = [sys.executable, "-m", "flq", "simulate", "--config", str(PAPER_CONFIG), "--total_workers", "4"]
    cmd += ["--max_rounds", "600", "--model", "mlp", "--eval_every", "1", "--threads", "1", "--no-progress"]
    cmd += ["--serve", str(port)]
    cmd += ["--serve_linger", "8", "--results_dir", str(tmp_path / "results"), "--log_dir", str(tmp_path / "logs")]
    out = open(tmp_path / "simulate.out", "wb")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    w = Watched(browser)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/status", timeout=2)
                break
            except httpx.HTTPError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "simulate.out").read_text()
                time.sleep(0.2)
        scrapes = watch_stop_and_finish(w, url, "simulate")
        scrapes.append(metrics(url))  # lingering: the final counters
        assert proc.wait(timeout=60) == 4, (tmp_path / "simulate.out").read_text()
        (xlsx,) = sorted((tmp_path / "results").glob("flq_results_*.xlsx"))
        check_against_results(scrapes[-1], xlsx)
        counters_increase(scrapes)
        assert w.text("#run").startswith("simulation")
        assert "in-process" in w.text("#workers")
        assert w.hosts() == {"127.0.0.1"}, w.hosts()
        assert not w.errors, w.errors
    finally:
        w.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _serve(tmp_path: Path, rounds: int, linger_s: int) -> subprocess.Popen:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "flq", "simulate", "--config", str(PAPER_CONFIG), "--total_workers", "4"]
    cmd += ["--max_rounds", str(rounds), "--model", "mlp", "--eval_every", "0", "--threads", "1"]
    cmd += ["--serve", "0", "--serve_linger", str(linger_s), "--results_dir", str(tmp_path / "results")]
    cmd += ["--log_dir", str(tmp_path / "logs")]
    return subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _read_until(proc: subprocess.Popen, text: str, timeout_s: float = 120) -> str:
    """The process's output up to the line with ``text`` (killed if that takes over ``timeout_s``)."""
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if text in line:
                break
    finally:
        timer.cancel()
    assert text in "".join(seen), "".join(seen)
    return "".join(seen)


@pytest.mark.slow
def test_a_signal_ends_the_dashboards_linger_at_once_and_a_signalled_run_does_not_linger(tmp_path):
    import signal

    done = _serve(tmp_path / "done", 3, 600)  # all rounds done: the page's final state stays up ...
    try:
        _read_until(done, "showing the final state for 600 s more")
        started = time.monotonic()
        done.send_signal(signal.SIGTERM)  # ... until a signal: the wait ends, the status stays the run's
        assert done.wait(timeout=20) == 0 and time.monotonic() - started < 15
    finally:
        done.kill()
        done.wait()
    cut = _serve(tmp_path / "cut", 5000, 600)
    try:
        _read_until(cut, "round 1 of 5000 starts")
        time.sleep(1)
        started = time.monotonic()
        cut.send_signal(signal.SIGINT)
        out, _ = cut.communicate(timeout=30)
        assert cut.returncode == 130 and time.monotonic() - started < 20, out
        assert "showing the final state" not in out and "results: " in out
    finally:
        cut.kill()
        cut.wait()


def check_tensorboard(folder: Path, xlsx: Path) -> None:
    """The run's scalars, read back by TensorBoard's own reader, equal the spreadsheet's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flq.results import read_results

    (run,) = [p for p in folder.iterdir() if p.is_dir()]
    acc = EventAccumulator(str(run))
    acc.Reload()
    curve = read_results(xlsx).curve
    evaluated = curve[curve["acc"].notna()]
    got = {e.step: e.value for e in acc.Scalars("test/accuracy")}
    assert sorted(got) == list(evaluated["iter"])
    for it, a in zip(evaluated["iter"], evaluated["acc"]):
        assert got[it] == pytest.approx(a, abs=1e-6)
    ce = {e.step: e.value for e in acc.Scalars("test/cross_entropy")}
    assert ce[int(evaluated["iter"].iloc[-1])] == pytest.approx(evaluated["entropy"].iloc[-1], abs=1e-6)
    bits = {e.step: e.value for e in acc.Scalars("bits/uplink_cum")}
    assert bits[len(curve)] == pytest.approx(curve["bits_up_cum"].iloc[-1], rel=1e-7)
    assert [e.step for e in acc.Scalars("uplink/selected")] == list(range(1, len(curve) + 1))
    by_bits = [e.step for e in acc.Scalars("test/accuracy_by_uplink_bits")]
    assert by_bits == list(evaluated["bits_up_cum"])


# ----- auth and escaping --------------------------------------------------------
@pytest.fixture
def guarded():
    cfg = small_config(total_workers=4, max_rounds=5, auth_token=TOKEN, model="mlp", start_timeout_s=600)
    s = InProcessMaster(cfg, dashboard=True)
    yield s
    s.stop()


def test_dashboard_and_metrics_need_the_token(guarded):
    url, bearer = guarded.url, {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/", "/dashboard/state", "/metrics"):
        assert httpx.get(url + path).status_code == 401, path
        assert httpx.get(url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
        assert httpx.get(url + path, headers=bearer).status_code == 200, path
        assert httpx.get(url + path, headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200  # any case
    assert "?token=" in httpx.get(url + "/").text  # the 401 page says how to open it
    assert httpx.get(url + "/?token=wrong").status_code == 401
    assert httpx.get(url + "/dashboard/static/dashboard.js").status_code == 200  # no run data: open
    login = httpx.get(url + f"/?token={TOKEN}")
    assert login.status_code == 303 and login.headers["location"] == "/"
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    jar = {"flq_dashboard": login.cookies["flq_dashboard"]}
    with httpx.Client(base_url=url, cookies=jar) as c:
        assert c.get("/").status_code == 200
        assert c.get("/dashboard/state").json()["run"]["kind"] == "cluster"
        assert c.get("/metrics").status_code == 200
        # the cookie is the browser's only: a worker call with it is refused, so is a POST without the header
        assert c.post("/workers/register", json={"worker_id": 0}).status_code == 401
        assert c.post("/stop").status_code == 401
        assert not guarded.cluster.stop_requested
        # another site's page cannot stop the run, whatever it holds (a form post carries its Origin)
        evil = c.post("/stop", headers={"X-FLQ-Dashboard": "1", "Origin": "http://evil.example", **bearer})
        assert evil.status_code == 403 and evil.json()["code"] == "cross_origin"
        # nor a page served under a name an attacker's DNS points here (DNS rebinding): same origin, strange host
        rebound = f"evil.example:{guarded.port}"
        evil = c.post("/stop", headers={"X-FLQ-Dashboard": "1", "Origin": f"http://{rebound}", "Host": rebound})
        assert evil.status_code == 403 and evil.json()["code"] == "cross_origin"
        assert not guarded.cluster.stop_requested
        assert c.post("/stop", headers={"X-FLQ-Dashboard": "1", "Origin": url}).status_code == 200
    assert guarded.cluster.stop_requested
    for _ in range(20):  # made-up methods: counted, but under one label, so /metrics cannot be made to grow
        httpx.request("XABC", f"{url}/status")
    refused = metrics(url, headers=bearer)
    assert not [k for k in refused if "XABC" in str(k)]
    assert refused[("flq_http_request_duration_seconds_count", (("endpoint", "other"),))] >= 20
    assert refused[("flq_refusals_total", (("code", "method_not_allowed"),))] == 20
    assert refused[("flq_refusals_total", (("code", "unauthorized"),))] == 6  # the JSON refusals above
    assert refused[("flq_refusals_total", (("code", "http_401"),))] == 4  # the page's: HTML


def test_what_a_worker_sends_is_shown_as_text(guarded, browser):
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.post(
        guarded.url + "/workers/register",
        json={"worker_id": 0, "device": "<b>cuda</b>"},
        headers={**bearer, "X-Forwarded-For": HOSTILE},
    )
    assert r.status_code == 200, r.text
    assert guarded.cluster.workers[0].address == HOSTILE  # what a proxy in front of the master would report
    w = Watched(browser)
    try:
        assert w.page.goto(guarded.url + "/").status == 401  # no token, no page
        w.page.goto(guarded.url + f"/?token={TOKEN}")  # sets the cookie, then the page
        assert urlsplit(w.page.url).query == ""  # the token left the address bar
        w.wait_for("() => document.querySelectorAll('#workers tbody tr').length >= 1", 30)
        row = w.page.query_selector("#workers tbody tr")
        cells = [td.inner_text() for td in row.query_selector_all("td")]
        assert cells[1] == HOSTILE and cells[9] == "<b>cuda</b>", cells
        assert w.page.evaluate("() => window.flqXss") is None  # no markup ran
        assert row.query_selector("img, script, b") is None
        w.page.click("#stop")
        # no round is open: the run ends at once
        w.wait_for("() => document.querySelector('#state').textContent === 'finished (stopped)'", 30)
        assert guarded.cluster.stop_requested
        assert not w.errors, w.errors
        save_artifact("dashboard_escaped.png", w.page.screenshot(full_page=True))
    finally:
        w.close()


# ----- metrics and scalars of a simulation, in-process ----------------------------------
def test_metrics_follow_a_simulation_and_equal_its_spreadsheet(tmp_path, fmnist_available):
    from flq.monitor import LocalRun, RunMonitor
    from flq.nodes import listen_on
    from flq.simulate import simulate
    from flq.transport.dashboard import BackgroundServer, simulation_app

    cfg = small_config(
        model="mlp",
        max_rounds=5,
        eval_every=2,
        results_dir=str(tmp_path / "results"),
        tensorboard_dir=str(tmp_path / "tb"),
        up_budget_bits=2e6,  # not everybody fits: the selection differs between workers
    )
    monitor = RunMonitor(cfg, LocalRun(cfg), "simulation")
    sock = listen_on("127.0.0.1", 0)
    server = BackgroundServer(simulation_app(monitor, monitor.source), sock)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    scrapes, docs = [], []
    try:

        def scrape(record) -> None:  # after each round, as a page would: only what it does not have
            scrapes.append(metrics(url))
            had = sum(len(d["rounds"]) for d in docs)
            docs.append(httpx.get(f"{url}/dashboard/state", params={"rounds_since": had}, timeout=10).json())

        result = simulate(cfg, progress=False, on_round=scrape, monitor=monitor)
        scrapes.append(metrics(url))
        final = httpx.get(f"{url}/dashboard/state", params={"rounds_since": 5}, timeout=10).json()
        # refusals as the master's, counted by code
        lost = httpx.get(f"{url}/no/such/page", timeout=10)
        assert lost.status_code == 404 and lost.json()["code"] == "not_found"
        bad = httpx.get(f"{url}/dashboard/state", params={"rounds_since": -1}, timeout=10)
        assert bad.status_code == 422 and bad.json()["code"] == "invalid_request"
        assert httpx.post(f"{url}/stop", headers={"Origin": "http://evil.example"}).json()["code"] == "cross_origin"
        refused = metrics(url)
        for code in ("not_found", "invalid_request", "cross_origin"):
            assert refused[("flq_refusals_total", (("code", code),))] == 1, code
    finally:
        server.stop()
    assert len(scrapes) == 6
    counters_increase(scrapes)
    check_against_results(scrapes[-1], result.results_path)
    assert scrapes[-1][("flq_run_finished", ())] == 1
    # the page's document: per-worker tallies equal the master's selection, the curves the spreadsheet
    assert final["status"]["state"] == "finished" and final["results"] == str(result.results_path)
    uploads = [m for sel in result.selected for m in sel]
    assert [w["rounds_uploaded"] for w in final["workers"]] == [uploads.count(m) for m in range(4)]
    assert sum(w["bits_up"] for w in final["workers"]) == result.records[-1]["bits_up_cum"]
    assert [e["iter"] for e in final["evaluations"]] == [2, 4, 5]
    assert [e["acc"] for e in final["evaluations"]] == [result.records[k - 1]["acc"] for k in (2, 4, 5)]
    assert [b["iter"] for b in final["budget"]] == [5, 4, 3, 2, 1]
    for b in final["budget"]:
        assert b["spent_bits"] <= cfg.up_budget_bits
        assert sorted(s["worker"] for s in b["selected"]) == result.selected[b["iter"] - 1]
    # incremental: a page that has every round gets none again
    assert [[r["iter"] for r in d["rounds"]] for d in docs] == [[k + 1] for k in range(5)]
    assert all(d["config"] is None for d in docs) and final["config"] is None  # asked for once, by config=true
    assert monitor.document(config=True)["config"]["system"]["total_workers"] == 4
    assert monitor.document(rounds_since=5, evals_since=3)["rounds"] == []
    assert monitor.document(rounds_since=3)["rounds"][0]["iter"] == 4
    check_tensorboard(tmp_path / "tb", result.results_path)


def test_the_sample_grafana_dashboard_asks_for_metrics_that_exist(guarded):
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(guarded.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    board = (REPO / "docs" / "grafana_dashboard.json").read_text()
    asked = set(re.findall(r"\bflq_[a-z_]+", board))
    assert len(asked) >= 10 and asked <= names, asked - names


def test_a_scalar_log_that_cannot_write_stops_alone_and_the_run_goes_on(tmp_path, caplog, monkeypatch):
    from flq.monitor import LocalRun, RunMonitor, ScalarLog
    from flq.simulate import simulate

    cfg = small_config(model="mlp", max_rounds=4, eval_every=1, tensorboard_dir=str(tmp_path / "tb"))
    monitor = RunMonitor(cfg, LocalRun(cfg), "simulation")
    opened = ScalarLog.open

    def failing(cfg, role):  # a full disk, or the folder removed, from round 2 on
        log = opened(cfg, role)
        add = log.writer.add_scalar

        def add_scalar(tag, value, step):
            if step >= 2:
                raise OSError(28, "No space left on device")
            add(tag, value, step)

        log.writer.add_scalar = add_scalar
        return log

    monkeypatch.setattr(ScalarLog, "open", staticmethod(failing))
    result = simulate(cfg, write=False, progress=False, monitor=monitor)
    assert result.reason == "completed" and len(result.records) == 4
    assert "stop after 1 rounds (OSError: [Errno 28] No space left on device); the run goes on" in caplog.text


def test_a_long_history_comes_in_bounded_answers(monkeypatch):
    from flq import monitor as monitor_module
    from flq.monitor import LocalRun, RunMonitor
    from flq.simulate import simulate

    monkeypatch.setattr(monitor_module, "MAX_ROWS", 2)
    cfg = small_config(model="mlp", max_rounds=5, eval_every=1)
    mon = RunMonitor(cfg, LocalRun(cfg), "simulation")
    simulate(cfg, write=False, progress=False, monitor=mon)
    parts, have = [], 0
    while have < 5:
        doc = mon.document(rounds_since=have, evals_since=have)
        assert len(doc["rounds"]) <= 2 and len(doc["evaluations"]) <= 2 and doc["rounds_total"] == 5
        parts.append([r["iter"] for r in doc["rounds"]])
        have += len(doc["rounds"])
    assert parts == [[1, 2], [3, 4], [5]]


def test_a_token_with_plus_and_slash_opens_the_page():
    from flq.transport.middleware import _query_value

    assert _query_value(b"token=ab+cd/ef==", "token") == "ab+cd/ef=="  # pasted as it is
    assert _query_value(b"x=1&token=ab%2Bcd%2Fef%3D%3D", "token") == "ab+cd/ef=="  # or encoded
    assert _query_value(b"tokens=1", "token") is None


def test_a_missing_tensorboard_is_one_line_before_any_work(tmp_path, monkeypatch):
    from flq.config import ConfigError
    from flq.monitor import ScalarLog

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    cfg = small_config(tensorboard_dir=str(tmp_path / "tb"))
    with pytest.raises(ConfigError, match=r"pip install 'flq-fed\[tensorboard\]'"):
        ScalarLog.open(cfg, "simulate")
    assert not (tmp_path / "tb").exists()
    assert ScalarLog.open(small_config(), "simulate") is None  # '' = none


# ----- the page's files ---------------------------------------------------------------
def test_the_page_is_served_from_the_package_with_its_vendored_library():
    vendor = json.loads((STATIC / "vendor" / "VENDOR.json").read_text())
    assert vendor["name"] == "uplot" and (STATIC / "vendor" / vendor["license_file"]).is_file()
    for name, digest in vendor["files"].items():
        data = (STATIC / "vendor" / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, name
    assert f"(v{vendor['version']})" in (STATIC / "vendor" / "uPlot.iife.min.js").read_text()[:200]
    page = (STATIC / "index.html").read_text()
    for ref in ("dashboard/static/dashboard.js", "dashboard/static/vendor/uPlot.iife.min.js"):
        assert f'src="{ref}"' in page
    assert "http:" not in page and "https:" not in page and "<script>" not in page  # nothing remote, nothing inline
    script = (STATIC / "dashboard.js").read_text()
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script  # data reaches the page as text
