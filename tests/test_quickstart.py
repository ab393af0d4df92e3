"""./quickstart.sh as a new user runs it: real Fashion-MNIST, its 30 rounds,
what it prints before round 1 and at the end, and the expected accuracy
range it states (which README.md repeats)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from flq.results import read_results

ROOT = Path(__file__).resolve().parent.parent


def expected_range() -> tuple:
    text = (ROOT / "quickstart.sh").read_text()
    lo, hi = re.search(r'^EXPECTED_ACC="([0-9.]+) ([0-9.]+)"', text, re.M).groups()
    return float(lo), float(hi)


def test_readme_states_the_range_quickstart_checks():
    lo, hi = expected_range()
    readme = (ROOT / "README.md").read_text()
    assert f"{lo:.2f} to {hi:.2f}" in readme


@pytest.mark.slow
def test_quickstart_ends_inside_its_expected_range(tmp_path, fmnist_available):
    """The whole quick start (bootstrap finds the existing environment): it
    says what it does before round 1, ends with the time it took, the
    results, the figures, and the accuracy inside the range it states."""
    done = subprocess.run(
        ["bash", str(ROOT / "quickstart.sh"), "--results_dir", str(tmp_path / "results")]
        + ["--log_dir", str(tmp_path / "logs")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    out, err = done.stdout, done.stderr
    assert done.returncode == 0, err[-2000:] + out[-2000:]
    # before round 1: what it is loading and building
    for line in ("loading fashion_mnist", "splitting them among 20 workers", "building 20 workers", "round 1 of 30"):
        assert line in err, err[:2000]
    assert err.index("building 20 workers") < err.index("round 1/30")
    lo, hi = expected_range()
    m = re.search(r"^final: round 30 test accuracy ([0-9.]+)", out, re.M)
    assert m, out
    acc = float(m.group(1))
    assert lo <= acc <= hi
    assert f"test accuracy {m.group(1)} at round 30 is inside the expected {lo:.2f} to {hi:.2f}" in out
    assert re.search(r"^time: 30 rounds in \d+ s \([0-9.]+ s/round, \d+ thread\(s\)\)", out, re.M), out
    (xlsx,) = (tmp_path / "results").glob("flq_results_*.xlsx")
    run = read_results(xlsx)
    assert run.curve["iter"].iloc[-1] == 30
    assert run.curve["acc"].notna().sum() == 10  # every 3 rounds
    assert abs(run.curve["acc"].iloc[-1] - acc) < 5e-5
    pngs = list((tmp_path / "results" / "plots").glob("*.png"))
    assert pngs, "no figures"


@pytest.mark.slow
def test_flags_that_change_the_run_say_the_range_does_not_apply(tmp_path, fmnist_available):
    done = subprocess.run(
        ["bash", str(ROOT / "quickstart.sh"), "--rounds", "1", "--workers", "2", "--eval_every", "1"]
        + ["--model", "mlp", "--results_dir", str(tmp_path / "r"), "--log_dir", str(tmp_path / "l"), "--no-progress"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "holds for ./quickstart.sh without flags that change the run" in done.stdout
