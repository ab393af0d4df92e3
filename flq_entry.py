"""What the original entry points (``flq_worker.py``, ``flq_master.py``)
share: before importing anything of FLQ-Fed, check that this Python can run
it, and say in one line what is missing when it cannot.

Started with a Python that cannot run FLQ-Fed (older than 3.9, or without the
package and its dependencies: the system's python3 instead of the project's
environment), they say so in one line and exit 2. This file keeps to the
syntax of old Pythons (no f-strings, no annotations), so that they read it.
"""

import os
import sys

#: Per entry point: what it starts (``flq <command>``), the script that starts it for the user, and
#: the modules it imports (of pyproject.toml's dependencies), checked before anything is imported.
ENTRIES = {
    "flq_worker.py": ("worker", "start_worker.sh", ("torch", "numpy", "pydantic", "httpx", "safetensors", "zstandard")),
    "flq_master.py": (
        "master",
        "start_master.sh",
        ("torch", "numpy", "pydantic", "fastapi", "uvicorn", "safetensors", "zstandard", "pandas", "openpyxl"),
    ),
}
HERE = os.path.dirname(os.path.abspath(__file__))
#: Where JetPack names its L4T release (the environment variable points elsewhere, for tests).
TEGRA_RELEASE = os.environ.get("FLQ_NV_TEGRA_RELEASE") or "/etc/nv_tegra_release"


def _here(name, run=True):
    """``name`` (a path in this folder) as the user would type it from the working folder (``run``: as a command)."""
    path = os.path.join(HERE, name)
    rel = os.path.relpath(path)
    if rel.startswith(".."):
        return path
    return os.path.join(".", rel) if run and os.sep not in rel else rel


def _refuse(name, template, *values):
    sys.stderr.write(name + ": " + (template % values) + "\n")
    sys.exit(2)


def _check_python(name, start):
    if sys.version_info >= (3, 9):  # noqa: UP036 - this file is read by old Pythons too
        return
    jetson = ""
    try:
        with open(TEGRA_RELEASE) as f:
            first = f.readline()
        if first.startswith(("# R34", "# R35")):
            jetson = " (JetPack 5: NVIDIA's torch wheels for it are Python 3.8 only, see README 'Jetson')"
        elif first.startswith("# R32"):
            jetson = " (JetPack 4: NVIDIA's torch wheels for it are Python 3.6 only, see README 'Jetson')"
    except (IOError, OSError):  # noqa: UP024 - Python 2's open raises IOError
        pass
    _refuse(
        name,
        "%s is Python %s and FLQ-Fed needs Python >= 3.9%s; run it with a newer one: "
        "FLQ_PYTHON=/path/to/python3.9+ %s, or /path/to/python3.9+ %s",
        sys.executable,
        ".".join(str(part) for part in sys.version_info[:3]),
        jetson,
        _here(start),
        _here(name, run=False),
    )


def run(name):
    """Run ``flq <command> ARGS`` for entry point ``name`` (``"flq_worker.py"``
    or ``"flq_master.py"``), or refuse in one line (exit 2) when this Python
    cannot: older than 3.9, or without the package or its dependencies."""
    command, start, needs = ENTRIES[name]
    _check_python(name, start)
    sys.path.insert(0, os.path.join(HERE, "src"))
    import importlib.util

    why = None
    for module in needs:
        if importlib.util.find_spec(module) is None:
            why = "No module named '" + module + "'"
            break
    if why is None:
        try:
            from flq.cli import main
        except ImportError as exc:
            why = str(exc) or type(exc).__name__
    if why is not None:
        venv = os.path.join(".venv", "bin", "python")
        with_venv = (
            _here(venv) + " " + _here(name, run=False) + ", or " if os.path.exists(os.path.join(HERE, venv)) else ""
        )
        _refuse(
            name,
            "the flq package is not importable by %s (%s); run %s, or %sinstall with %s",
            sys.executable,
            why,
            _here(start),
            with_venv,
            _here(os.path.join("scripts", "bootstrap.sh")),
        )
    return main([command] + sys.argv[1:])
