"""Tests for flq.config: reading the sectioned and flat config files,
validation with one-line errors naming the key, overrides, cross-field
rules and derived values; and that the CLI stops on a bad config before it
does any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flq.config import Config, ConfigError, build, coerce, load_config, parse_mapping

ROOT = Path(__file__).resolve().parents[1]
REPO_CONFIG = ROOT / "flq_config.json"
PAPER_CONFIG = ROOT / "configs" / "paper_fmnist.json"


def _write(tmp_path, data, name="cfg.json") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return p


def _error(tmp_path, data, overrides=None) -> str:
    path = _write(tmp_path, data) if data is not None else None
    with pytest.raises(ConfigError) as ei:
        load_config(str(path) if path else None, overrides)
    msg = str(ei.value)
    assert msg and "\n" not in msg, repr(msg)
    return msg


# --------------------------------------------------------------------------
# the shipped files


def test_paper_config_exact_values():
    cfg = load_config(str(PAPER_CONFIG))
    assert cfg.total_workers == 20
    assert cfg.needed_workers == 20  # min_workers 0 (= all) or 20
    assert cfg.max_rounds == 800
    assert cfg.batch_size == 64
    assert cfg.partition == "non_iid"
    assert cfg.dir_alpha == 0.1
    assert cfg.lr == 1e-3
    assert cfg.l2 == 5e-4
    assert cfg.seed == 42
    assert cfg.clip_global == 0.0
    assert cfg.sel_clients == 0
    assert cfg.up_budget_bits == 17e6
    assert cfg.D == 10
    assert cfg.ck == 0.8
    assert cfg.C == 1e9
    assert cfg.warmup == 0
    assert cfg.thr_scale == 0.0
    assert cfg.scale_by_selected is True
    assert cfg.sel_ref == 1.0
    assert cfg.mode == "bbit" and cfg.b_up == 4 and cfg.b_down == 8
    assert cfg.dataset == "fashion_mnist" and cfg.model == "cnn"
    assert cfg.local_steps == 0 and cfg.local_epochs == 0
    assert cfg.steps_per_round(3000) == 1  # the original algorithm: one gradient
    # types as declared
    assert type(cfg.total_workers) is int and type(cfg.max_rounds) is int and type(cfg.D) is int
    assert type(cfg.lr) is float and type(cfg.up_budget_bits) is float and type(cfg.C) is float


def test_repo_config_exact_values():
    cfg = load_config(str(REPO_CONFIG))
    assert cfg.total_workers == 4 and cfg.min_workers == 0 and cfg.needed_workers == 4 and cfg.max_rounds == 100
    assert cfg.seed == 42 and cfg.batch_size == 64 and cfg.partition == "non_iid"
    assert cfg.mode == "bbit" and cfg.b_up == 4 and cfg.b_down == 8
    assert cfg.up_budget_bits == 17e6 and cfg.C == 1e9 and cfg.thr_scale == 0.0
    assert cfg.master_port == 5000 and cfg.round_timeout_s == 60.0
    assert cfg.gpu_memory_limit_mb == 2048 and cfg.enable_mixed_precision is False
    assert cfg.log_level == "INFO" and cfg.log_dir == "logs" and cfg.results_dir == "results"


def test_no_file_gives_defaults():
    cfg = load_config(None)
    assert cfg == Config()
    assert (cfg.total_workers, cfg.max_rounds, cfg.lr, cfg.up_budget_bits) == (20, 800, 1e-3, 17e6)


def test_to_sections_round_trip():
    cfg = load_config(str(PAPER_CONFIG), {"mode": "laq8", "local_steps": 3})
    again = build(parse_mapping(json.loads(json.dumps(cfg.to_sections()))))
    assert again == cfg


def test_flat_keys_named_like_sections(tmp_path):
    # Config's attribute names are its flat keys (module and class docstrings),
    # and two of them, 'dataset' and 'model', are also section names. A flat
    # file may set them with a string like any other flat key, and to_flat()
    # output (a flat mapping) must parse back.
    cfg = load_config(str(_write(tmp_path, {"total_workers": 2, "dataset": "mnist", "model": "cnn"})))
    assert cfg.dataset == "mnist" and cfg.model == "cnn" and cfg.total_workers == 2
    orig = load_config(str(PAPER_CONFIG), {"mode": "laq8", "dataset": "mnist"})
    assert build(parse_mapping(orig.to_flat())) == orig


# --------------------------------------------------------------------------
# flat layout


def test_flat_file_of_the_original_readme(tmp_path):
    path = _write(
        tmp_path, {"total_workers": 2, "min_workers": 2, "max_rounds": 100, "batch_size": 16, "local_epochs": 1}
    )
    cfg = load_config(str(path))
    assert (cfg.total_workers, cfg.min_workers, cfg.max_rounds, cfg.batch_size, cfg.local_epochs) == (2, 2, 100, 16, 1)
    # everything else at its default
    assert cfg.lr == 1e-3 and cfg.mode == "bbit" and cfg.local_steps == 0
    # local_epochs 1, partition 100, batch 16 -> ceil(100/16) = 7 steps
    assert cfg.steps_per_round(100) == 7


def test_flat_aliases(tmp_path):
    cfg = load_config(str(_write(tmp_path, {"iters": 5, "workers": 3, "cl": 0.01, "b": 2})))
    assert (cfg.max_rounds, cfg.total_workers, cfg.l2, cfg.b_up) == (5, 3, 0.01, 2)


def test_comment_keys_ignored(tmp_path):
    cfg = load_config(str(_write(tmp_path, {"_comment": "x", "system": {"_note": 1, "seed": 7}})))
    assert cfg.seed == 7


# --------------------------------------------------------------------------
# errors: one line, naming the key


def test_unknown_section_key(tmp_path):
    msg = _error(tmp_path, {"system": {"total_workerz": 3}})
    assert "system.total_workerz" in msg


def test_unknown_flat_key(tmp_path):
    msg = _error(tmp_path, {"total_workers": 2, "bogus_knob": 1})
    assert "bogus_knob" in msg


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("system", "total_workers", "many"),
        ("system", "total_workers", 2.5),
        ("system", "total_workers", True),
        ("system", "total_workers", [2]),
        ("system", "max_rounds", None),
        ("model", "lr", "fast"),
        ("model", "lr", None),
        ("model", "lr", [0.1]),
        ("model", "lr", True),
        ("flq_algorithm", "mode", 3),
        ("flq_algorithm", "mode", "qsgd"),
        ("flq_algorithm", "scale_by_selected", 2),
        ("flq_algorithm", "scale_by_selected", "maybe"),
        ("dataset", "name", "cifar100"),
        ("dataset", "name", "my-data:load"),
        ("model", "name", "resnet"),
        ("model", "model_args", "[1, 2]"),
        ("system", "device", "tpu"),
    ],
)
def test_wrong_type_or_choice(tmp_path, section, key, value):
    msg = _error(tmp_path, {section: {key: value}})
    assert f"{section}.{key}" in msg


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("system", "total_workers", 0),
        ("system", "max_rounds", -1),
        ("system", "master_port", 70000),
        ("system", "round_timeout_s", 0),
        ("system", "worker_timeout_s", 1e12),
        ("system", "worker_timeout_s", 2),
        ("system", "quorum_timeout_s", 0),
        ("system", "start_timeout_s", -1),
        ("dataset", "batch_size", 0),
        ("dataset", "dir_alpha", 0.0),
        ("model", "lr", 0),
        ("model", "lr", -1e-3),
        ("model", "l2", -1),
        ("flq_algorithm", "b_up", 17),
        ("flq_algorithm", "b_up", 0),
        ("flq_algorithm", "b_down", 20),
        ("flq_algorithm", "sel_ref", 0.5),
        ("lazy_selection", "ck", -0.1),
        ("budget_selection", "up_budget_bits", -1),
        ("budget_selection", "sel_clients", -2),
    ],
)
def test_out_of_range(tmp_path, section, key, value):
    msg = _error(tmp_path, {section: {key: value}})
    assert f"{section}.{key}" in msg


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_float(tmp_path, text):
    msg = _error(tmp_path, f'{{"model": {{"lr": {text}}}}}')
    assert "model.lr" in msg


def test_flat_key_bad_value_names_flat_key(tmp_path):
    msg = _error(tmp_path, {"batch_size": -4})
    assert "batch_size" in msg


def test_section_not_an_object(tmp_path):
    msg = _error(tmp_path, {"system": [1, 2]})
    assert "system" in msg


def test_top_level_not_an_object(tmp_path):
    _error(tmp_path, "[1, 2, 3]")


def test_invalid_json(tmp_path):
    msg = _error(tmp_path, '{\n  "system": {"seed": 1,}\n}')
    assert "cfg.json" in msg and "line 2" in msg


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError) as ei:
        load_config(str(missing))
    msg = str(ei.value)
    assert "\n" not in msg and "nope.json" in msg


def test_unknown_override():
    with pytest.raises(ConfigError) as ei:
        load_config(None, {"no_such_flag": 1})
    assert "no_such_flag" in str(ei.value) and "\n" not in str(ei.value)


def test_bad_override_value_names_flag():
    with pytest.raises(ConfigError) as ei:
        load_config(None, {"b_up": "40"})
    assert "--b_up" in str(ei.value) and "\n" not in str(ei.value)


# --------------------------------------------------------------------------
# overrides and cross-field rules


def test_overrides_win_over_file():
    cfg = load_config(
        str(PAPER_CONFIG),
        {"b_up": 2, "max_rounds": "5", "mode": "laq8", "lr": "0.01", "scale_by_selected": "false", "seed": None},
    )
    assert (cfg.b_up, cfg.max_rounds, cfg.mode, cfg.lr, cfg.scale_by_selected) == (2, 5, "laq8", 0.01, False)
    assert cfg.seed == 42  # None = not given
    assert cfg.total_workers == 20  # untouched keys from the file
    # aliases as overrides
    cfg = load_config(str(PAPER_CONFIG), {"rounds": 3, "workers": 4, "min_workers": 2})
    assert (cfg.max_rounds, cfg.total_workers, cfg.min_workers) == (3, 4, 2)


def test_override_checked_against_file(tmp_path):
    # the file says min_workers 20; lowering total_workers alone is inconsistent
    path = _write(tmp_path, {"system": {"total_workers": 20, "min_workers": 20}})
    with pytest.raises(ConfigError) as ei:
        load_config(str(path), {"total_workers": 4})
    assert "min_workers" in str(ei.value) and "\n" not in str(ei.value)
    assert load_config(str(path), {"total_workers": 4, "min_workers": 4}).total_workers == 4


def test_mode_bin_forces_b_up_1(tmp_path):
    cfg = load_config(str(PAPER_CONFIG), {"mode": "bin"})
    assert cfg.b_up == 1 and cfg.uplink_bits == 1
    cfg = load_config(str(_write(tmp_path, {"flq_algorithm": {"mode": "bin", "b_up": 8}})))
    assert cfg.b_up == 1


def test_bbit_needs_two_bits():
    with pytest.raises(ConfigError) as ei:
        load_config(None, {"mode": "bbit", "b_up": 1})
    assert "b_up" in str(ei.value)


def test_local_steps_and_epochs_conflict(tmp_path):
    msg = _error(tmp_path, {"model": {"local_steps": 2, "local_epochs": 1}})
    assert "local_steps" in msg and "local_epochs" in msg


def test_min_workers_above_total(tmp_path):
    msg = _error(tmp_path, {"system": {"total_workers": 3, "min_workers": 4}})
    assert "min_workers" in msg
    # equal is fine, 0 means all
    assert load_config(str(_write(tmp_path, {"total_workers": 3, "min_workers": 3}))).needed_workers == 3
    assert load_config(str(_write(tmp_path, {"total_workers": 3, "min_workers": 0}))).needed_workers == 3


@pytest.mark.parametrize(
    "value,want",
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        ("true", True),
        ("false", False),
        ("1", True),
        ("0", False),
        ("True", True),
        ("FALSE", False),
    ],
)
def test_bool_values(tmp_path, value, want):
    cfg = load_config(str(_write(tmp_path, {"flq_algorithm": {"scale_by_selected": value}})))
    assert cfg.scale_by_selected is want
    assert coerce("enable_mixed_precision", value) is want


def test_same_setting_twice(tmp_path):
    msg = _error(tmp_path, {"total_workers": 3, "system": {"total_workers": 4}})
    assert "total_workers" in msg
    msg = _error(tmp_path, {"system": {"max_rounds": 4}, "iters": 5})
    assert "iters" in msg and "max_rounds" in msg
    msg = _error(tmp_path, {"rounds": 4, "iters": 5})
    assert "max_rounds" in msg


def test_int_accepts_integral_numbers(tmp_path):
    cfg = load_config(
        str(_write(tmp_path, {"system": {"max_rounds": 100.0, "seed": "7"}, "dataset": {"batch_size": 32}}))
    )
    assert cfg.max_rounds == 100 and type(cfg.max_rounds) is int and cfg.seed == 7


def test_string_choices_normalized(tmp_path):
    cfg = load_config(
        str(_write(tmp_path, {"dataset": {"name": "fmnist", "partition": "non-iid"}, "logging": {"level": "debug"}}))
    )
    assert cfg.dataset == "fashion_mnist" and cfg.partition == "non_iid" and cfg.log_level == "DEBUG"


# --------------------------------------------------------------------------
# derived values


@pytest.mark.parametrize(
    "mode,b_up,want",
    [("fedavg", 4, 32), ("laq8", 4, 8), ("bbit", 4, 4), ("bbit", 2, 2), ("bbit", 16, 16), ("bin", 1, 1)],
)
def test_uplink_bits(mode, b_up, want):
    assert load_config(None, {"mode": mode, "b_up": b_up}).uplink_bits == want


@pytest.mark.parametrize("b_down,want", [(0, 32), (32, 32), (8, 8), (1, 1), (16, 16)])
def test_downlink_bits(b_down, want):
    assert load_config(None, {"b_down": b_down}).downlink_bits == want


def test_steps_per_round():
    assert Config().steps_per_round(1000) == 1
    assert Config().replace(local_steps=5).steps_per_round(1000) == 5
    assert Config().replace(local_steps=1).steps_per_round(1000) == 1
    # E * ceil(partition / batch): 2 * ceil(100/16) = 2 * 7 = 14
    assert Config().replace(local_epochs=2, batch_size=16).steps_per_round(100) == 14
    # exact multiple: 1 * ceil(128/64) = 2; smaller than a batch: ceil(10/64) = 1
    assert Config().replace(local_epochs=1, batch_size=64).steps_per_round(128) == 2
    assert Config().replace(local_epochs=3, batch_size=64).steps_per_round(10) == 3


# --------------------------------------------------------------------------
# the real CLI stops on a bad config before doing work


@pytest.mark.parametrize(
    "data,extra,key",
    [
        (
            {"system": {"total_workers": 2}, "budget_selection": {"up_budget_bitz": 1}},
            [],
            "budget_selection.up_budget_bitz",
        ),
        ({"total_workers": 2, "batch_size": "sixteen"}, [], "batch_size"),
        ({"total_workers": 2}, ["--b_up", "99"], "--b_up"),
    ],
)
def test_cli_bad_config_exits_2_before_work(tmp_path, data, extra, key):
    bad = _write(tmp_path, data, "bad.json")
    proc = subprocess.run(
        [sys.executable, "-m", "flq", "simulate", "--config", str(bad), "--no-progress"] + extra,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert key in lines[0]
    assert proc.stdout == ""
    assert not (tmp_path / "results").exists()
    assert not (tmp_path / "logs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


def test_a_key_given_twice_in_one_object_is_refused(tmp_path):
    msg = _error(tmp_path, '{"system": {"total_workers": 2}, "system": {"seed": 1}}')
    assert "'system' appears twice" in msg
    msg = _error(tmp_path, '{"seed": 1, "seed": 2}')
    assert "'seed' appears twice" in msg
    msg = _error(tmp_path, '{"model": {"lr": 0.1, "lr": 0.2}}')
    assert "'lr' appears twice" in msg


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["simulate", "--help"],
        ["simulate", "--mode", "bbbit"],
        ["master", "--eval_precision", "fp8"],
        ["simulate", "--data_dir", "/nonexistent/folder"],
    ],
)
def test_help_and_config_errors_do_not_import_pytorch(tmp_path, args):
    """Start-up: what refuses the run or only prints does so before PyTorch loads."""
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "flq", *args], capture_output=True, text=True, cwd=tmp_path
    )
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "flq.config" in imported and "torch" not in imported, sorted(m for m in imported if "torch" in m)
    assert r.returncode == (0 if "--help" in args else 2), r.stderr[-500:]
    if r.returncode:
        errors = [line for line in r.stderr.splitlines() if not line.startswith("import time:")]
        assert len(errors) == 1 and "config key" in errors[0], errors
