"""README's reproduction of the published comparison is what its
spreadsheets say: the command README gives regenerates its table byte for
byte from docs/reproduction/*.xlsx, and the figures it shows exist."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def readme_command() -> list:
    """The report command README.md gives (one line in a code block)."""
    text = README.read_text()
    (line,) = re.findall(r"^\.venv/bin/python (benchmarks/reproduction_report\.py .*)$", text, re.M)
    return shlex.split(line)


def table_rows(text: str) -> list:
    rows, started = [], False
    for line in text.splitlines():
        if line.startswith("| mode |"):
            started = True
        if started:
            if not line.startswith("|"):
                break
            rows.append(line)
    return rows


def test_readme_table_is_regenerated_from_the_spreadsheets(tmp_path):
    args = readme_command()
    sheets = sorted((ROOT / "docs" / "reproduction").glob("flq_results_*.xlsx"))
    assert len(sheets) == 4, sheets
    cmd = [sys.executable, args[0], *[str(s) for s in sheets]]
    cmd += [a for a in args[1:] if not a.endswith(".xlsx")]  # the glob, expanded above
    cmd += ["--no-write", "--print"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    fresh = table_rows(done.stdout)
    section = README.read_text().split("### Reproduction of the published comparison", 1)[1]
    assert len(fresh) == 6  # header, rule, four modes
    assert table_rows(section) == fresh
    assert table_rows((ROOT / "docs" / "reproduction" / "results.md").read_text()) == fresh


def test_readme_shows_the_comparison_figures():
    section = README.read_text().split("### Reproduction of the published comparison", 1)[1].split("\n## ", 1)[0]
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", section)
    assert images
    for image in images:
        assert (ROOT / image).is_file(), image
