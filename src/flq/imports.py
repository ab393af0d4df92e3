"""Objects named by import path, ``"package.module:attribute"``: a user's model
factory (``model.name``) or dataset loader (``dataset.name``).

The current folder is searched first (as ``python -m`` and uvicorn do), so a
module beside the config file's working folder is found without installing
it. Every failure is a :class:`~flq.config.ConfigError` of one line naming
the config key.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any, Callable

from .config import ConfigError

#: ``package.module:attribute`` (the attribute may be dotted: ``module:Class.factory``).
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_import_path(name: str) -> bool:
    """Whether ``name`` has the form ``package.module:attribute``."""
    return bool(IMPORT_PATH.match(name))


def load_callable(path: str, key: str) -> Callable[..., Any]:
    """The callable at ``path`` (``package.module:attribute``).

    Args:
        path: the import path.
        key: the config key it came from, for the error (``model.name``).

    Raises:
        ConfigError: not an import path, the module cannot be imported (or
            fails while importing), no such attribute, or not callable.
    """
    if not is_import_path(path):
        raise ConfigError(f"config key '{key}': {path!r} is not of the form package.module:callable")
    module_name, attr = path.split(":", 1)
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and not module_name.startswith(exc.name):  # found, but something it imports is not
            raise ConfigError(
                f"config key '{key}': importing {module_name!r} failed: it needs {exc.name!r}, which is not installed"
            ) from None
        raise ConfigError(
            f"config key '{key}': cannot import {module_name!r} ({exc}); run from the folder that holds it, "
            f"or install it, or add its folder to PYTHONPATH"
        ) from None
    except SystemExit as exc:
        raise ConfigError(f"config key '{key}': importing {module_name!r} called sys.exit({exc.code!r})") from None
    except Exception as exc:  # noqa: BLE001 - any error while importing the user's module
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(
            f"config key '{key}': importing {module_name!r} failed: {type(exc).__name__}: {first}"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"config key '{key}': module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"config key '{key}': {path!r} is not callable")
    return obj
