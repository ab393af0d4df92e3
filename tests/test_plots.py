"""Tests for flq.plots (figure names, run labels, integer ticks), the plot
parts of the ``flq`` command and benchmarks/reproduction_report.py.

Workbooks are written directly with :func:`flq.results.write_results` (no
training): a few rounds each."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flq.cli import main as flq_main
from flq.plots import plot_name, plot_results, run_labels
from flq.results import read_results, write_results

REPO = Path(__file__).resolve().parents[1]
REPORT_SCRIPT = REPO / "benchmarks" / "reproduction_report.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")

BITS = {"fedavg": (4, 32), "laq8": (4, 32), "bbit": (4, 8), "bin": (4, 8)}


def config(mode: str = "bbit", **changes):
    """A flat config like a simulate run's (nested as the config sheet wants)."""
    b_up, b_down = BITS.get(mode, (4, 8))
    cfg = {
        "system": {"total_workers": 4, "seed": 42, "max_rounds": 4},
        "dataset": {"name": "fashion_mnist", "dir_alpha": 0.1, "data_dir": ""},
        "model": {"name": "mlp", "lr": 0.001},
        "flq_algorithm": {"mode": mode, "b_up": b_up, "b_down": b_down, "entropy_coding": "none"},
        "logging": {"results_dir": "results"},
        "run": {"end": "completed", "detail": ""},
        "runtime": {"torch": "2.0", "threads": 1, "device": "cpu"},
    }
    for key, value in changes.items():
        section, name = key.split(".")
        cfg[section][name] = value
    return cfg


def records(n: int = 4, *, selcnt=(2, 2, 2, 2), up: int = 1000, acc0: float = 0.5):
    """``n`` rounds; round 2 not evaluated; per-round time 0.25 s."""
    out = []
    for k in range(n):
        evaluated = k != 1
        out.append(
            {
                "iter": k + 1,
                "loss": 2.0 - 0.1 * k,
                "acc": acc0 + 0.05 * k if evaluated else NAN,
                "entropy": 1.5 - 0.1 * k if evaluated else NAN,
                "selcnt": selcnt[k % len(selcnt)],
                "bits_up_cum": up * (k + 1),
                "bits_down_cum": 3 * up * (k + 1),
                "cum_bits_total": 4 * up * (k + 1),
                "wire_bytes_up": up // 8,
                "wire_bytes_down": 3 * up // 8,
                "wire_bytes_up_cum": up // 8 * (k + 1),
                "wire_bytes_down_cum": 3 * up // 8 * (k + 1),
                "round_time_s": 0.25,
            }
        )
    return out


def workbook(path: Path, mode: str = "bbit", cfg=None, **kwargs) -> Path:
    recs = records(**kwargs)
    extra = {}
    if mode == "bin":
        extra = {"selected": [list(range(r["selcnt"])) for r in recs], "num_workers": 4}
    return write_results(path, mode, recs, cfg if cfg is not None else config(mode), **extra)


def stem(mode: str, stamp: str) -> str:
    return f"flq_results_fashion_mnist_{mode}_{stamp}"


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 2000, (path, len(data))


# --------------------------------------------------------------------------- #
# file names
# --------------------------------------------------------------------------- #
def test_two_runs_plotted_one_after_the_other_keep_their_figures(tmp_path, capsys):
    a = workbook(tmp_path / f"{stem('bbit', '20261130_234411')}.xlsx")
    b = workbook(tmp_path / f"{stem('bbit', '20261130_235502')}.xlsx", cfg=config(**{"system.seed": 1}))
    out = tmp_path / "plots"
    assert flq_main(["plot", str(a), "--out", str(out)]) == 0
    first = {p: p.read_bytes() for p in out.iterdir()}
    assert flq_main(["plot", str(b), "--out", str(out)]) == 0
    assert "replaced" not in capsys.readouterr().err
    for path, data in first.items():  # nothing of the first run was replaced
        assert path.read_bytes() == data
    names = sorted(p.name for p in out.iterdir())
    assert f"{a.stem}_acc_vs_round.png" in names
    assert f"{b.stem}_acc_vs_round.png" in names
    assert len(names) == 2 * 6
    # several runs: compare_<modes>_<hash of the paths> (flq plot uses it: next test)
    multi = plot_name([a, b])
    assert re.fullmatch(r"compare_bbit_[0-9a-f]{8}", multi)
    c = workbook(tmp_path / "c.xlsx", "bin")
    assert plot_name([a, c]) == plot_name([read_results(a), read_results(c)])
    assert plot_name([read_results(a), read_results(c)]).startswith("compare_bbit-bin_")  # modes from the sheets
    assert plot_name([a, b]) == multi and plot_name([b, a]) != multi  # deterministic, order matters


def test_plot_name_option_and_replaced_figures_said(tmp_path, monkeypatch, capsys):
    import flq.plots

    calls = []

    def fake_plot_results(paths, out_dir, name=None):  # the figures themselves are tested above
        calls.append(name)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        target = Path(out_dir) / f"{name}_acc_vs_round.png"
        target.write_bytes(b"png")
        return [target]

    monkeypatch.setattr(flq.plots, "plot_results", fake_plot_results)
    a = workbook(tmp_path / "a.xlsx")
    out = tmp_path / "plots"
    assert flq_main(["plot", str(a), "--out", str(out), "--name", "mine"]) == 0
    assert capsys.readouterr().err == ""
    assert flq_main(["plot", str(a), "--out", str(out), "--name", "mine"]) == 0
    assert "replaced 1 earlier figure(s) named mine_*" in capsys.readouterr().err
    assert flq_main(["plot", str(a), "--out", str(out)]) == 0
    b = workbook(tmp_path / "b.xlsx")
    assert flq_main(["plot", str(a), str(b), "--out", str(out)]) == 0
    assert calls == ["mine", "mine", "a", plot_name([a, b])]
    assert flq_main(["plot", str(a), "--out", str(out), "--name", " "]) == 2


def test_plot_results_name_prefixes_every_figure(tmp_path, saved_figures):
    import matplotlib

    matplotlib.use("Agg")
    captured = saved_figures
    path = workbook(tmp_path / "run.xlsx", "bin", selcnt=(3,))
    written = plot_results([path], tmp_path / "p", name="run")
    assert [p.name for p in written] == [
        "run_entropy_vs_round.png",
        "run_acc_vs_round.png",
        "run_entropy_vs_bits.png",
        "run_acc_vs_bits.png",
        "run_acc_vs_uplink_bits.png",
        "run_selected_per_round.png",
        "run_binary_uploads_bin_b_up_1_b_down_8.png",
    ]
    for p in written:
        _assert_png(p)
    # workers selected always 3: integer ticks only, around 3
    ax = captured["run_selected_per_round.png"].axes[0]
    ax.figure.canvas.draw()
    _assert_integer_ticks(ax.yaxis, ax.get_ylim(), contains=3)
    assert ax.get_ylim() == (2.0, 4.0)


def test_help_says_how_figures_are_named(capsys):
    for command in ("plot", "simulate"):
        with pytest.raises(SystemExit):
            flq_main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "stem" in text, command
        if command == "plot":
            assert "--name" in text and "compare_<modes>" in text


# --------------------------------------------------------------------------- #
# labels
# --------------------------------------------------------------------------- #
def test_labels_of_runs_differing_in_seed_show_the_seed(tmp_path):
    runs = [
        read_results(workbook(tmp_path / f"{i}.xlsx", cfg=config(**{"system.seed": seed})))
        for i, seed in enumerate((1, 2, 3))
    ]
    assert run_labels(runs) == [
        "bbit (b_up 4, b_down 8), seed 1",
        "bbit (b_up 4, b_down 8), seed 2",
        "bbit (b_up 4, b_down 8), seed 3",
    ]


def test_labels_show_every_differing_key_but_not_paths(tmp_path):
    cfgs = [
        config(**{"dataset.dir_alpha": 0.5, "logging.results_dir": "a", "dataset.data_dir": "/x"}),
        config(**{"model.lr": 0.01, "logging.results_dir": "b"}),
        config("bin"),
    ]
    runs = [read_results(workbook(tmp_path / f"{i}.xlsx", c["flq_algorithm"]["mode"], c)) for i, c in enumerate(cfgs)]
    labels = run_labels(runs)
    assert labels == [
        "bbit (b_up 4, b_down 8), dir_alpha 0.5, lr 0.001",
        "bbit (b_up 4, b_down 8), dir_alpha 0.1, lr 0.01",
        "bin (b_up 1, b_down 8), dir_alpha 0.1, lr 0.001",
    ]


def test_identical_configs_get_distinct_labels(tmp_path):
    paths = [
        workbook(tmp_path / f"{stem('bbit', '20261130_234411')}.xlsx"),
        workbook(tmp_path / f"{stem('bbit', '20261201_010203')}.xlsx"),
        workbook(tmp_path / "other.xlsx"),
    ]
    labels = run_labels([read_results(p) for p in paths])
    assert labels == [
        "bbit (b_up 4, b_down 8), run 20261130_234411",
        "bbit (b_up 4, b_down 8), run 20261201_010203",
        "bbit (b_up 4, b_down 8), other",
    ]
    # the same file twice still gets two labels
    twice = run_labels([read_results(paths[0]), read_results(paths[0])])
    assert len(set(twice)) == 2
    # a single run: no extras
    assert run_labels([read_results(paths[0])]) == ["bbit (b_up 4, b_down 8)"]


# --------------------------------------------------------------------------- #
# integer ticks
# --------------------------------------------------------------------------- #
def _visible_ticks(axis, lim):
    lo, hi = sorted(lim)
    return [t for t in axis.get_majorticklocs() if lo - 1e-9 <= t <= hi + 1e-9]


def _drawn(runs, xcol, ycol):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from flq.plots import draw_curves

    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    draw_curves(ax, runs, [str(i) for i in range(len(runs))], xcol, ycol, "x", "y")
    fig.canvas.draw()
    return ax


def _assert_integer_ticks(axis, lim, contains=None):
    ticks = _visible_ticks(axis, lim)
    assert len(ticks) >= 2, ticks
    assert all(float(t).is_integer() for t in ticks), ticks
    if contains is not None:
        assert contains in ticks
    labels = [t.get_text() for t in axis.get_ticklabels() if t.get_text()]
    assert labels and not any("." in s for s in labels), labels


@pytest.mark.parametrize("value", [9, 0])
def test_constant_selected_count_gets_integer_ticks(tmp_path, value):
    ax = _drawn([read_results(workbook(tmp_path / "run.xlsx", selcnt=(value,), n=6))], "iter", "selcnt")
    _assert_integer_ticks(ax.yaxis, ax.get_ylim(), contains=value)
    _assert_integer_ticks(ax.xaxis, ax.get_xlim())


def test_one_round_gets_integer_round_ticks(tmp_path):
    ax = _drawn([read_results(workbook(tmp_path / "one.xlsx", n=1))], "iter", "acc")
    _assert_integer_ticks(ax.xaxis, ax.get_xlim(), contains=1)


# --------------------------------------------------------------------------- #
# benchmarks/reproduction_report.py
# --------------------------------------------------------------------------- #
def _report_module():
    spec = importlib.util.spec_from_file_location("reproduction_report", REPORT_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def four_runs(tmp_path):
    folder = tmp_path / "runs"
    paths = {}
    for i, mode in enumerate(("bin", "bbit", "laq8", "fedavg")):  # not in table order
        paths[mode] = workbook(
            folder / f"{stem(mode, f'20261130_00000{i}')}.xlsx",
            mode,
            n=5,
            selcnt=(i + 1, i + 2),
            up=1000 * (i + 1),
            acc0=0.5 + 0.01 * i,
        )
    return paths


def test_reproduction_report_writes_figures_and_table(tmp_path, four_runs):
    walls = tmp_path / "walls.txt"
    walls.write_text("fedavg rc=0 wall=4123\nlaq8 rc=1 wall=99\nbbit rc=0 wall=12\nbbit rc=0 wall=4000\n")
    out = tmp_path / "docs"
    args = [*map(str, four_runs.values()), "--out", str(out), "--walls", str(walls), "--machine", "2 cores | 8 GB"]
    proc = subprocess.run(
        [sys.executable, str(REPORT_SCRIPT), *args, "--print"], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            "comparison.png",
            "acc_vs_round.png",
            "entropy_vs_round.png",
            "acc_vs_uplink_bits.png",
            "entropy_vs_uplink_bits.png",
            "results.md",
        ]
    )
    for name in names:
        if name.endswith(".png"):
            _assert_png(out / name)
    report = (out / "results.md").read_text()
    table = proc.stdout
    assert table in report  # the printed table is the one in results.md
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows] == ["mode", "fedavg", "laq8", "bbit", "bin"]
    split = [[c.strip() for c in re.split(r"(?<!\\)\|", r)[1:-1]] for r in rows[1:]]
    cells = {r[0]: r[1:] for r in split}
    # expected numbers, read back from the workbooks
    for mode, path in four_runs.items():
        run = read_results(path)
        acc = run.curve["acc"].dropna().iloc[-1]
        entropy = run.curve["entropy"].dropna().iloc[-1]
        bits, rounds, final_acc, final_entropy, up, mean_sel, wall, machine = cells[mode]
        assert bits == {"fedavg": "32/32", "laq8": "8/32", "bbit": "4/8", "bin": "1/8"}[mode]
        assert rounds == "5"
        assert final_acc == f"{acc:.4f}" and final_entropy == f"{entropy:.4f}"
        assert up == f"{int(run.curve['bits_up_cum'].iloc[-1]):,}"
        assert mean_sel == f"{run.curve['selcnt'].mean():.2f}"
        assert machine == "2 cores \\| 8 GB (cpu, 1 thread, torch 2.0)"
    assert cells["fedavg"][6] == "4123"
    assert cells["laq8"][6] == "99 (rc=1)"
    assert cells["bbit"][6] == "4000"  # the last line of a mode counts
    assert cells["bin"][6] == "~1 (sum of rounds)"  # 5 rounds of 0.25 s, no --walls line
    assert cells["fedavg"][4] == "20,000" and cells["fedavg"][5] == "4.40"  # 4000 bits x 5 rounds; 4,5,4,5,4
    assert "(comparison.png)" in report


def test_reproduction_report_table_is_deterministic(tmp_path, four_runs, monkeypatch):
    report = _report_module()
    runs = report.load_runs(list(four_runs.values()))
    first = report.results_table(runs)
    again = report.results_table(report.load_runs(list(reversed(list(four_runs.values())))))
    assert first == again
    monkeypatch.setattr(report, "write_figures", lambda runs, out: [out / "comparison.png"])  # tested above
    out = tmp_path / "out"
    out.mkdir()
    assert report.main([*map(str, four_runs.values()), "--out", str(out)]) == 0
    md = (out / "results.md").read_bytes()
    assert report.main([*map(str, four_runs.values()), "--out", str(out)]) == 0
    assert (out / "results.md").read_bytes() == md
    assert first.encode() in md
    assert str(tmp_path) not in md.decode()  # no folders: the same bytes wherever the spreadsheets are


def test_reproduction_report_errors(tmp_path, four_runs, capsys):
    report = _report_module()
    twice = [str(four_runs["bbit"]), str(four_runs["bbit"])]
    assert report.main([*twice, "--no-write"]) == 2
    assert "two spreadsheets of mode bbit" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing.xlsx"), "--no-write"]) == 2
    assert report.main([str(four_runs["bin"]), "--walls", str(tmp_path / "nope"), "--no-write"]) == 2
    assert report.main([str(four_runs["bin"]), "--print", "--no-write", "--out", str(tmp_path / "none")]) == 0
    assert capsys.readouterr().out.startswith("| mode |")
    assert not (tmp_path / "none").exists()


def test_draw_curves_log_x_and_integer_round_axis(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from flq.plots import draw_curves

    runs = [read_results(workbook(tmp_path / "a.xlsx"))]
    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    assert draw_curves(ax, runs, ["a"], "bits_up_cum", "acc", "x", "y", logx=True)
    assert ax.get_xscale() == "log"
    line = ax.get_lines()[0]
    assert list(line.get_xdata()) == [1000.0, 3000.0, 4000.0]  # round 2 not evaluated
    assert np.allclose(line.get_ydata(), [0.5, 0.6, 0.65])
