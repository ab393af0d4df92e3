"""Master checkpoints: the whole :meth:`flq.master.Master.state_dict` (model,
Adam moments, history, per-worker mirrors and versions, round, generator
states, records) in one ``.npz`` file, written atomically.

Arrays go in as arrays (the mirrors as one (M, n) array each); everything
else as one JSON document in the entry ``meta``, with the run's config so a
resume can refuse a checkpoint of a different run.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

import numpy as np

ARRAYS = ("theta", "ref_up", "ref_down")
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or of another run (one line)."""


def checkpoint_path(checkpoint_dir: str, dataset: str, mode: str) -> Path:
    """``<checkpoint_dir>/flq_master_<dataset>_<mode>.npz``: the latest checkpoint."""
    return Path(checkpoint_dir) / f"flq_master_{dataset}_{mode}.npz"


def save_checkpoint(path: Path, state: Mapping[str, Any], config: Mapping[str, Any]) -> Path:
    """Write ``state`` (a Master state_dict) and ``config`` atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"theta": np.asarray(state["theta"], np.float32),
              "ref_up": np.stack(state["ref_up"]).astype(np.float32, copy=False),
              "ref_down": np.stack(state["ref_down"]).astype(np.float32, copy=False),
              "adam_m": np.asarray(state["adam"]["m"], np.float32),
              "adam_v": np.asarray(state["adam"]["v"], np.float32)}
    meta = {k: v for k, v in state.items() if k not in ARRAYS and k != "adam"}
    meta["adam"] = {"t": state["adam"]["t"], "lr": state["adam"]["lr"]}
    meta["format"] = FORMAT
    meta["config"] = dict(config)
    arrays["meta"] = np.frombuffer(json.dumps(meta, default=_json_default).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def load_checkpoint(path: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Read a checkpoint: ``(master state_dict, config it was written with)``.

    Raises:
        CheckpointError: missing or unreadable file, or an unknown format.
    """
    path = Path(path)
    if not path.is_file():
        others = sorted(p.name for p in path.parent.glob("flq_master_*.npz")) if path.parent.is_dir() else []
        hint = f"; there: {', '.join(others)} (another dataset or mode?)" if others else ""
        raise CheckpointError(f"no checkpoint at {path} (nothing to resume){hint}")
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path}: checkpoint format {meta.get('format')} is not {FORMAT}")
            state = dict(meta)
            config = state.pop("config")
            state["theta"] = z["theta"]
            state["ref_up"] = list(z["ref_up"])
            state["ref_down"] = list(z["ref_down"])
            state["adam"] = {"m": z["adam_m"], "v": z["adam_v"], "t": meta["adam"]["t"], "lr": meta["adam"]["lr"]}
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from None
    return state, config


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"cannot store {type(o).__name__} in a checkpoint")
