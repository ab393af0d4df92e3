"""Tests for flq.results (xlsx round trip, config flattening, errors) and flq.plots."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

import numpy as np
import openpyxl
import pandas as pd
import pytest

from flq.plots import plot_results, run_label
from flq.results import (
    CURVE_COLUMNS,
    RunResults,
    default_results_path,
    read_results,
    write_results,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAN = float("nan")


def make_records(n: int = 3, *, up_per_round: int = 100, down_per_round: int = 200):
    """Small deterministic run; round 2 is not evaluated (acc/entropy NaN)."""
    records = []
    for k in range(n):
        evaluated = k != 1
        records.append(
            {
                "iter": k + 1,
                "loss": 2.5 - 0.5 * k,
                "acc": 0.25 + 0.25 * k if evaluated else NAN,
                "entropy": 2.0 - 0.5 * k if evaluated else NAN,
                "selcnt": [1, 2, 0][k % 3],
                "bits_up_cum": up_per_round * (k + 1),
                "bits_down_cum": down_per_round * (k + 1),
                "cum_bits_total": (up_per_round + down_per_round) * (k + 1),
                "wire_bytes_up": 13 + k,
                "wire_bytes_down": 26 + k,
                "wire_bytes_up_cum": sum(13 + j for j in range(k + 1)),
                "wire_bytes_down_cum": sum(26 + j for j in range(k + 1)),
                "round_time_s": 0.125 * (k + 1),
            }
        )
    return records


SELECTED = [[0], [1, 3], []]
NUM_WORKERS = 4

CONFIG = {
    "dataset": "mnist",
    "mode": "bin",
    "seed": 7,
    "quant": {"b_up": 4, "b_down": 8, "inner": {"clip": 2.5}},
    "lazy": {"enabled": True, "thresholds": [0.1, 0.2]},
    "rounds": 3,
    "note": None,
    "empty": "",
    "looks_like_json": "[1, 2]",
}


def cell_rows(path: Path, sheet: str):
    wb = openpyxl.load_workbook(path)
    try:
        return [list(r) for r in wb[sheet].iter_rows(values_only=True)]
    finally:
        wb.close()


def sheet_names(path: Path):
    wb = openpyxl.load_workbook(path)
    try:
        return list(wb.sheetnames)
    finally:
        wb.close()


# --------------------------------------------------------------------------- #
# CURVE_COLUMNS / default path
# --------------------------------------------------------------------------- #
def test_curve_columns_exact_order():
    assert CURVE_COLUMNS == [
        "iter",
        "loss",
        "acc",
        "entropy",
        "selcnt",
        "bits_up_cum",
        "bits_down_cum",
        "cum_bits_total",
        "wire_bytes_up",
        "wire_bytes_down",
        "wire_bytes_up_cum",
        "wire_bytes_down_cum",
        "round_time_s",
    ]


def test_default_results_path_with_datetime(tmp_path):
    p = default_results_path(tmp_path / "results", "mnist", "bbit", timestamp=datetime(2024, 3, 5, 7, 8, 9))
    assert p == tmp_path / "results" / "flq_results_mnist_bbit_20240305_070809.xlsx"
    assert not p.parent.exists()  # nothing created


def test_default_results_path_string_and_now():
    assert default_results_path("results", "cifar10", "bin", "20200101_000000") == Path(
        "results/flq_results_cifar10_bin_20200101_000000.xlsx"
    )
    p = default_results_path("results", "mnist", "bin")
    assert p.parent == Path("results")
    stamp = p.name[len("flq_results_mnist_bin_") : -len(".xlsx")]
    datetime.strptime(stamp, "%Y%m%d_%H%M%S")  # raises if malformed


# --------------------------------------------------------------------------- #
# write -> read round trip
# --------------------------------------------------------------------------- #
def test_bin_run_sheets_columns_and_cells(tmp_path):
    path = tmp_path / "nested" / "dir" / "run_bin.xlsx"
    out = write_results(path, "bin", make_records(), CONFIG, selected=SELECTED, num_workers=NUM_WORKERS)
    assert out == path and path.is_file()
    assert sheet_names(path) == ["curve_bin", "bin_bin", "config"]

    rows = cell_rows(path, "curve_bin")
    assert rows[0] == CURVE_COLUMNS
    assert len(rows) == 4
    # NaN (not evaluated) -> empty cell
    assert rows[1] == [1, 2.5, 0.25, 2.0, 1, 100, 200, 300, 13, 26, 13, 26, 0.125]
    assert rows[2] == [2, 2.0, None, None, 2, 200, 400, 600, 14, 27, 27, 53, 0.25]
    assert rows[3] == [3, 1.5, 0.75, 1.0, 0, 300, 600, 900, 15, 28, 42, 81, 0.375]

    assert cell_rows(path, "bin_bin") == [
        ["iter", "w0", "w1", "w2", "w3"],
        [1, 1, 0, 0, 0],
        [2, 0, 1, 0, 1],
        [3, 0, 0, 0, 0],
    ]


def test_non_bin_run_has_no_binary_sheet(tmp_path):
    for mode in ("bbit", "laq", "full"):
        path = tmp_path / f"run_{mode}.xlsx"
        # `selected` is ignored for non-bin modes
        write_results(path, mode, make_records(), {"b_up": 2}, selected=SELECTED, num_workers=NUM_WORKERS)
        names = sheet_names(path)
        assert names == [f"curve_{mode}", "config"]
        assert not any(n.startswith("bin_") for n in names)
        run = read_results(path)
        assert run.mode == mode and run.binary is None


def test_read_results_round_trip(tmp_path):
    path = tmp_path / "run.xlsx"
    records = make_records()
    write_results(path, "bin", records, CONFIG, selected=SELECTED, num_workers=NUM_WORKERS)
    run = read_results(str(path))
    assert isinstance(run, RunResults)
    assert run.path == path
    assert run.mode == "bin"

    curve = run.curve
    assert list(curve.columns) == CURVE_COLUMNS
    assert curve.shape == (3, len(CURVE_COLUMNS))
    for col in ("loss", "acc", "entropy", "round_time_s"):
        assert curve[col].dtype == np.float64, col
    for col in ("iter", "selcnt", "bits_up_cum", "cum_bits_total", "wire_bytes_down_cum"):
        assert pd.api.types.is_integer_dtype(curve[col]), col
    assert curve["iter"].tolist() == [1, 2, 3]
    assert curve["loss"].tolist() == [2.5, 2.0, 1.5]
    assert curve["acc"].iloc[0] == 0.25 and curve["acc"].iloc[2] == 0.75
    assert math.isnan(curve["acc"].iloc[1]) and math.isnan(curve["entropy"].iloc[1])
    assert curve["entropy"].iloc[[0, 2]].tolist() == [2.0, 1.0]
    assert curve["selcnt"].tolist() == [1, 2, 0]
    assert curve["bits_up_cum"].tolist() == [100, 200, 300]
    assert curve["bits_down_cum"].tolist() == [200, 400, 600]
    assert curve["cum_bits_total"].tolist() == [300, 600, 900]
    assert curve["wire_bytes_up"].tolist() == [13, 14, 15]
    assert curve["wire_bytes_down"].tolist() == [26, 27, 28]
    assert curve["wire_bytes_up_cum"].tolist() == [13, 27, 42]
    assert curve["wire_bytes_down_cum"].tolist() == [26, 53, 81]
    assert curve["round_time_s"].tolist() == [0.125, 0.25, 0.375]

    binary = run.binary
    assert list(binary.columns) == ["iter", "w0", "w1", "w2", "w3"]
    assert binary.to_numpy().tolist() == [[1, 1, 0, 0, 0], [2, 0, 1, 0, 1], [3, 0, 0, 0, 0]]


def test_extra_record_keys_follow_curve_columns(tmp_path):
    records = make_records()
    for k, rec in enumerate(records):
        rec["zeta"] = 10 * k
        rec["alpha"] = f"r{k}"
    records[2]["late"] = 1.5  # appears only in the last record
    # a record with keys in scrambled order must still be written in CURVE_COLUMNS order
    records[0] = dict(reversed(list(records[0].items())))
    path = tmp_path / "extra.xlsx"
    write_results(path, "bbit", records, {})
    rows = cell_rows(path, "curve_bbit")
    assert rows[0] == CURVE_COLUMNS + ["alpha", "zeta", "late"]
    assert rows[1][-3:] == ["r0", 0, None]
    assert rows[3][-3:] == ["r2", 20, 1.5]
    assert rows[1][: len(CURVE_COLUMNS)] == [1, 2.5, 0.25, 2.0, 1, 100, 200, 300, 13, 26, 13, 26, 0.125]


def test_numpy_scalars_in_records(tmp_path):
    records = make_records()
    records[0]["loss"] = np.float32(0.5)
    records[0]["bits_up_cum"] = np.int64(100)
    records[0]["acc"] = np.float64(np.nan)
    path = tmp_path / "np.xlsx"
    write_results(path, "bbit", records, {"lr": np.float64(0.25), "m": np.int32(4)})
    rows = cell_rows(path, "curve_bbit")
    assert rows[1][1] == 0.5 and rows[1][5] == 100 and rows[1][2] is None
    assert read_results(path).config == {"lr": 0.25, "m": 4}


# --------------------------------------------------------------------------- #
# config sheet
# --------------------------------------------------------------------------- #
def test_config_sheet_flattening_cells(tmp_path):
    path = tmp_path / "cfg.xlsx"
    write_results(path, "bin", make_records(), CONFIG, selected=SELECTED, num_workers=NUM_WORKERS)
    assert cell_rows(path, "config") == [
        ["key", "value"],
        ["dataset", "mnist"],
        ["mode", "bin"],
        ["seed", 7],
        ["quant.b_up", 4],
        ["quant.b_down", 8],
        ["quant.inner.clip", 2.5],
        ["lazy.enabled", True],
        ["lazy.thresholds", "[0.1, 0.2]"],
        ["rounds", 3],
        ["note", "null"],
        ["empty", '""'],
        ["looks_like_json", '"[1, 2]"'],
    ]


def test_config_read_back_parsed(tmp_path):
    path = tmp_path / "cfg.xlsx"
    config = dict(CONFIG, extra={"tuple": (1, 2), "empty_dict": {}, "inf": float("inf"), "words": "plain text"})
    write_results(path, "bin", make_records(), config, selected=SELECTED, num_workers=NUM_WORKERS)
    cfg = read_results(path).config
    assert cfg == {
        "dataset": "mnist",
        "mode": "bin",
        "seed": 7,
        "quant.b_up": 4,
        "quant.b_down": 8,
        "quant.inner.clip": 2.5,
        "lazy.enabled": True,
        "lazy.thresholds": [0.1, 0.2],
        "rounds": 3,
        "note": None,
        "empty": "",
        "looks_like_json": "[1, 2]",
        "extra.tuple": [1, 2],
        "extra.empty_dict": {},
        "extra.inf": float("inf"),
        "extra.words": "plain text",
    }
    assert cfg["lazy.enabled"] is True


def test_config_none_gives_empty_sheet(tmp_path):
    path = tmp_path / "nocfg.xlsx"
    write_results(path, "bbit", make_records(), None)
    assert cell_rows(path, "config") == [["key", "value"]]
    assert read_results(path).config == {}


# --------------------------------------------------------------------------- #
# errors
# --------------------------------------------------------------------------- #
def test_missing_required_column_raises_one_line(tmp_path):
    records = make_records()
    del records[1]["wire_bytes_up"]
    del records[1]["round_time_s"]
    path = tmp_path / "bad.xlsx"
    with pytest.raises(ValueError) as exc:
        write_results(path, "bbit", records, {})
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg == "record 1 (iter=2) misses required column(s): wire_bytes_up, round_time_s"
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp file


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({}, "needs both `selected` and `num_workers`"),
        ({"selected": SELECTED}, "needs both"),
        ({"selected": [[0], [1]], "num_workers": 4}, "`selected` has 2 rounds but there are 3"),
        ({"selected": [[0], [4], []], "num_workers": 4}, "worker id 4 in round 2 is outside 0..3"),
        ({"selected": [[0], [-1], []], "num_workers": 4}, "worker id -1"),
        ({"selected": SELECTED, "num_workers": 0}, "num_workers must be >= 1"),
    ],
)
def test_bin_mode_selected_validation(tmp_path, kwargs, fragment):
    with pytest.raises(ValueError) as exc:
        write_results(tmp_path / "b.xlsx", "bin", make_records(), {}, **kwargs)
    assert fragment in str(exc.value)
    assert "\n" not in str(exc.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["", "a/b", "x" * 30, "x[1]"])
def test_bad_mode_raises(tmp_path, mode):
    with pytest.raises(ValueError):
        write_results(tmp_path / "m.xlsx", mode, make_records(), {})


def test_read_results_without_curve_sheet(tmp_path):
    path = tmp_path / "nocurve.xlsx"
    with pd.ExcelWriter(path, engine="openpyxl") as writer:
        pd.DataFrame({"key": ["a"], "value": [1]}).to_excel(writer, sheet_name="config", index=False)
        pd.DataFrame({"x": [1]}).to_excel(writer, sheet_name="other", index=False)
    with pytest.raises(ValueError) as exc:
        read_results(path)
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(path) in msg
    assert "curve_" in msg


def test_read_results_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_results(tmp_path / "nope.xlsx")


# --------------------------------------------------------------------------- #
# atomic write
# --------------------------------------------------------------------------- #
def test_atomic_write_leaves_no_temp_file(tmp_path):
    path = tmp_path / "out" / "run.xlsx"
    write_results(path, "bbit", make_records(), {"a": 1})
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.xlsx"]
    # overwrite in place
    write_results(path, "bin", make_records(), {"a": 2}, selected=SELECTED, num_workers=NUM_WORKERS)
    assert sorted(p.name for p in path.parent.iterdir()) == ["run.xlsx"]
    run = read_results(path)
    assert run.mode == "bin" and run.config == {"a": 2}


def test_failed_write_keeps_old_file_and_cleans_temp(tmp_path, monkeypatch):
    path = tmp_path / "run.xlsx"
    write_results(path, "bbit", make_records(), {"a": 1})
    before = path.read_bytes()
    seen = []

    real_write = Path.write_bytes

    def boom(target, data):  # the disk fills up half way through the file
        seen.append(Path(target))
        real_write(target, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", boom)
    with pytest.raises(OSError, match="No space left"):
        write_results(path, "bbit", make_records(), {"a": 2})
    assert len(seen) == 1
    tmp = seen[0]
    assert tmp.parent == tmp_path and tmp != path  # temp file was in the same folder
    assert not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.xlsx"]
    assert path.read_bytes() == before


# --------------------------------------------------------------------------- #
# plots
# --------------------------------------------------------------------------- #
def _assert_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 2000, (path, len(data))


def test_run_label():
    curve = pd.DataFrame(columns=CURVE_COLUMNS)
    assert (
        run_label(RunResults(Path("x"), "bbit", curve, None, {"quant.b_up": 4, "quant.b_down": 8}))
        == "bbit (b_up 4, b_down 8)"
    )
    assert run_label(RunResults(Path("x"), "bin", curve, None, {"b_up": 2})) == "bin (b_up 1)"  # bin always sends 1 bit
    assert run_label(RunResults(Path("x"), "full", curve, None, {})) == "full"
    coded = {"flq_algorithm.b_up": 8, "flq_algorithm.b_down": 8, "flq_algorithm.entropy_coding": "both"}
    assert run_label(RunResults(Path("x"), "bbit", curve, None, coded)) == "bbit (b_up 8, b_down 8, coded up+down)"
    adaptive = {**coded, "flq_algorithm.adaptive_width": True, "flq_algorithm.entropy_coding": "up"}
    assert run_label(RunResults(Path("x"), "bbit", curve, None, adaptive)) == "bbit (b_up 2..8, b_down 8, coded up)"
    assert "coded" not in run_label(RunResults(Path("x"), "bbit", curve, None, {**coded, "entropy_coding": "none"}))


def test_plot_results_two_runs(tmp_path):
    bin_path = tmp_path / "bin.xlsx"
    bbit_path = tmp_path / "bbit.xlsx"
    write_results(
        bin_path, "bin", make_records(), {"quant": {"b_up": 4, "b_down": 8}}, selected=SELECTED, num_workers=NUM_WORKERS
    )
    write_results(bbit_path, "bbit", make_records(up_per_round=50, down_per_round=60), {"b_up": 2, "b_down": 8})
    out_dir = tmp_path / "plots" / "sub"
    written = plot_results([bin_path, str(bbit_path)], out_dir)

    expected = [
        "entropy_vs_round.png",
        "acc_vs_round.png",
        "entropy_vs_bits.png",
        "acc_vs_bits.png",
        "acc_vs_uplink_bits.png",
        "selected_per_round.png",
        "binary_uploads_bin_b_up_1_b_down_8.png",
    ]
    assert [p.name for p in written] == expected
    assert all(p.parent == out_dir for p in written)
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(expected)
    for p in written:
        _assert_png(p)


def test_plot_results_accepts_loaded_runs_and_dedups_labels(tmp_path):
    p1, p2 = tmp_path / "a.xlsx", tmp_path / "b.xlsx"
    for p in (p1, p2):
        write_results(p, "bin", make_records(), {}, selected=SELECTED, num_workers=NUM_WORKERS)
    runs = [read_results(p1), read_results(p2)]
    written = plot_results(runs, tmp_path / "plots")
    names = [p.name for p in written]
    assert names[-2:] == ["binary_uploads_bin.png", "binary_uploads_bin_2.png"]
    for p in written:
        _assert_png(p)


def test_plot_results_axis_labels(tmp_path, saved_figures):
    """Check labels/scales by capturing the figures before they are saved."""
    captured = saved_figures
    path = tmp_path / "bin.xlsx"
    write_results(path, "bin", make_records(), {"b_up": 4}, selected=SELECTED, num_workers=NUM_WORKERS)
    plot_results([path], tmp_path / "plots")

    def ax(name):
        return captured[name].axes[0]

    assert ax("acc_vs_bits.png").get_xlabel() == "cumulative uplink+downlink bits"
    assert ax("acc_vs_bits.png").get_xscale() == "log"
    assert ax("acc_vs_uplink_bits.png").get_xlabel() == "cumulative uplink bits (charged)"
    assert ax("entropy_vs_bits.png").get_xscale() == "log"
    assert ax("entropy_vs_round.png").get_xscale() == "linear"
    assert ax("entropy_vs_bits.png").get_ylabel().startswith("test cross-entropy")
    assert ax("acc_vs_round.png").get_ylabel().startswith("test accuracy")
    assert ax("acc_vs_round.png").get_xlabel() == "round"
    assert ax("selected_per_round.png").get_xlabel() == "round"
    # NaN rounds dropped: acc line has rounds 1 and 3 only
    line = ax("acc_vs_round.png").get_lines()[0]
    assert list(line.get_xdata()) == [1.0, 3.0]
    assert list(line.get_ydata()) == [0.25, 0.75]
    assert line.get_label() == "bin (b_up 1)"
    sel = ax("selected_per_round.png").get_lines()[0]
    assert list(sel.get_ydata()) == [1.0, 2.0, 0.0]
    # raster: workers on y (4 rows), rounds on x (3 columns)
    image = ax("binary_uploads_bin_b_up_1.png").get_images()[0]
    assert np.asarray(image.get_array()).tolist() == [
        [1, 0, 0],
        [0, 1, 0],
        [0, 0, 0],
        [0, 1, 0],
    ]
    assert ax("binary_uploads_bin_b_up_1.png").get_ylabel().startswith("worker")


def test_plot_results_empty_raises(tmp_path):
    with pytest.raises(ValueError):
        plot_results([], tmp_path)
