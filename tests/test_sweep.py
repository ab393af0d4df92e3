"""``flq sweep`` on a local pool of processes: the grid, the runs' folders,
the summary and figure, a killed run, a second sweep that skips what is
done, and bad sweep files (real ``flq simulate`` processes on real
Fashion-MNIST)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from flq.config import ConfigError
from flq.results import read_results
from flq.sweep import _finished, config_digest, read_sweep

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "configs" / "paper_fmnist.json"
MODES = ["fedavg", "laq8", "bbit", "bin"]


def write_sweep(tmp: Path, **spec) -> Path:
    path = tmp / "sweep.json"
    path.write_text(json.dumps(spec))
    return path


def test_grid_product_names_and_overrides(tmp_path):
    path = write_sweep(
        tmp_path,
        config=str(PAPER),
        set={"max_rounds": 7},
        grid={
            "variant": [{"name": "bbit4", "mode": "bbit", "b_up": 4}, {"mode": "bin", "b_down": 8}],
            "seed": [1, 2],
        },
        out="o",
    )
    out, runs = read_sweep(path)
    assert out == (tmp_path / "o").resolve()
    assert [r.name for r in runs] == [
        "bbit4__seed=1",
        "bbit4__seed=2",
        "mode=bin,b_down=8__seed=1",
        "mode=bin,b_down=8__seed=2",
    ]
    r = runs[2]
    assert (r.cfg.mode, r.cfg.b_down, r.cfg.seed, r.cfg.max_rounds, r.cfg.threads) == ("bin", 8, 1, 7, 1)
    assert Path(r.cfg.results_dir) == out / r.name and Path(r.cfg.log_dir) == out / r.name
    assert runs[0].cfg.b_up == 4


def test_a_run_is_done_only_for_the_config_it_ran_with(tmp_path):
    """done.json names the spreadsheet and the config's digest: a sweep whose
    settings changed runs again; a missing spreadsheet or a corrupt done.json too."""
    spec = dict(config=str(PAPER), set={"max_rounds": 5}, grid={"mode": ["bbit"]}, out="o")
    (run,) = read_sweep(write_sweep(tmp_path, **spec))[1]
    run.folder.mkdir(parents=True)
    sheet = run.folder / "flq_results_x.xlsx"
    sheet.write_bytes(b"x")
    run.done_file.write_text(
        json.dumps({"results": str(sheet), "wall_s": 3.0, "config_sha256": config_digest(run.cfg)})
    )
    assert _finished(run) and run.results == sheet and run.wall_s == 3.0
    spec["set"] = {"max_rounds": 6}
    (changed,) = read_sweep(write_sweep(tmp_path, **spec))[1]
    assert changed.folder == run.folder and not _finished(changed)
    run.done_file.write_text("{not json")
    assert not _finished(run)
    run.done_file.write_text(json.dumps({"results": str(sheet)}))  # no digest: an older or hand-made file
    assert not _finished(run)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"grid": {"mode": []}}, "grid axis 'mode' must be a non-empty list"),
        ({"grid": {"mode": ["nope"]}}, "run mode=nope:"),
        ({"grid": {"b_up": [4]}, "sett": {}}, "unknown sweep key 'sett'"),
        ({"grid": {"v": [{"mode": "bbit"}, {"name": "mode=bbit", "mode": "bin"}]}}, "two runs are named"),
        ({"set": {"no_such_key": 1}}, "unknown setting 'no_such_key'"),
        ({"grid": {"v": [{"name": "..", "mode": "bbit"}]}}, r"may not be named '\.\.'"),
        ({"grid": {"v": [{"name": "summary.csv", "mode": "bbit"}]}}, "may not be named 'summary.csv'"),
        ({"grid": {"mode": [None]}}, "null is not a value"),
        ({"grid": {"mode": ["bbit"]}, "out": 5}, "'out' must be a folder name"),
    ],
)
def test_bad_sweep_files_are_one_line(tmp_path, spec, message):
    spec.setdefault("config", str(PAPER))
    with pytest.raises(ConfigError, match=message) as err:
        read_sweep(write_sweep(tmp_path, **spec))
    assert "\n" not in str(err.value)


def test_bad_sweep_file_runs_nothing(tmp_path):
    path = write_sweep(tmp_path, config=str(PAPER), grid={"mode": ["bbit", "nope"]}, out="o")
    done = subprocess.run(
        [sys.executable, "-m", "flq", "sweep", str(path), "--backend", "local"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"flq: config error: {path}: run mode=nope: ") and "'nope'" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_sweep_of_four_modes_two_seeds_survives_a_killed_run(tmp_path, fmnist_available):
    """4 modes x 2 seeds x 30 rounds on a local pool; one run's process is
    killed mid-way: the other 7 complete, the summary marks it failed, exit
    1; the second sweep runs only that one and ends with 8 spreadsheets."""
    path = write_sweep(
        tmp_path,
        config=str(PAPER),
        set={"model": "mlp", "total_workers": 4, "max_rounds": 30, "eval_every": 5},
        grid={"mode": MODES, "seed": [1, 2]},
        out="sweep",
    )
    out = tmp_path / "sweep"
    victim = out / "mode=laq8__seed=1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "flq", "sweep", str(path), "--backend", "local", "--parallel", "2"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # kill it once it has done some rounds, not all
            text = (victim / "output.txt").read_text(errors="replace") if (victim / "output.txt").exists() else ""
            if "round 5/30" in text or "round 6/30" in text:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.05)
        else:
            pytest.fail("the run to kill never reached round 5")
        assert "round 30/30" not in text
        os.kill(int((victim / "pid").read_text()), signal.SIGKILL)
        stdout, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stdout
    assert "mode=laq8__seed=1: failed (killed by SIGKILL)" in stdout
    summary = pd.read_excel(out / "summary.xlsx")
    assert len(summary) == 8
    failed = summary[summary["status"] == "failed"]
    assert list(failed["run"]) == ["mode=laq8__seed=1"]
    ok = summary[summary["status"] == "completed"]
    assert len(ok) == 7 and (ok["rounds"] == 30).all()
    assert ok["final_accuracy"].between(0.05, 1).all() and (ok["bits_up_cum"] > 0).all()
    assert (ok["wall_s"] > 0).all()
    # each completed run: its own spreadsheet (read back), log and model
    for name in ok["run"]:
        (xlsx,) = (out / name).glob("flq_results_*.xlsx")
        run = read_results(xlsx)
        assert run.curve["iter"].iloc[-1] == 30
        assert run.config["flq_algorithm.mode"] == name.split("__")[0].split("=")[1]
        assert xlsx.with_suffix(".safetensors").is_file() and list((out / name).glob("*.log"))
    assert not list(victim.glob("flq_results_*.xlsx"))  # SIGKILL: nothing written
    assert (out / "plots" / "sweep_acc_vs_round.png").is_file()
    # again: the 7 done are skipped, the failed one runs
    again = subprocess.run(
        [sys.executable, "-m", "flq", "sweep", str(path), "--backend", "local", "--parallel", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "8 runs (7 done before)" in again.stdout
    summary = pd.read_excel(out / "summary.xlsx")
    assert (summary["status"] != "failed").all()
    assert sum(len(list((out / n).glob("flq_results_*.xlsx"))) for n in summary["run"]) == 8
