"""``flq doctor``: check that this machine can run FLQ-Fed.

The counterpart, for this PyTorch stack, of the original README's TensorFlow
GPU check. One line per check, ``[ok]``, ``[warn]`` or ``[FAIL]``, its name
and what was found; every FAIL is followed by a ``  fix: ...`` line.
Checks: Python, PyTorch (version, CUDA or CPU build), NumPy, on a Jetson its
JetPack (from ``/etc/nv_tegra_release``, or ``$FLQ_NV_TEGRA_RELEASE``) and
whether this Python's PyTorch can use its GPU, the config file
(validated with :func:`flq.config.load_config`), the compute device that a
run would use (:func:`flq.model.resolve_device`), on CUDA the GPU, its memory
against ``gpu_memory_limit_mb`` and whether float16 autocast works, on CPU
the cores and PyTorch threads, the dataset (:func:`flq.datasets.find_dataset_dir`)
and, with ``--master_ip``, whether the master answers ``GET /status``
(over HTTPS with ``--cafile``, and ``--certfile``/``--keyfile`` for a master
that requires client certificates). With ``--credential`` (and
``--worker_id``) the worker's key file is checked, and with ``--master_ip``
whether the master accepts a call signed with it.

Exit status 0 when nothing FAILed, 1 otherwise. ``--json`` prints a JSON list
of ``{"check", "status", "detail", "fix"}`` instead (``status`` is ``ok``,
``warn`` or ``fail``; ``fix`` is ``null`` when there is none).

Run it as ``flq doctor`` or ``python -m flq.doctor``.

Why one module of this size: one short function per check (Python, PyTorch,
CUDA, data, config, ports, the master), each independent; splitting them up
would only add imports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from .config import Config, ConfigError, coerce, load_config

#: The config file used when ``--config`` is not given and it exists.
DEFAULT_CONFIG = "flq_config.json"
#: Seconds ``GET /status`` may take before the master counts as unreachable.
MASTER_TIMEOUT_S = 3.0
#: Lowest supported versions (pyproject.toml).
MIN_PYTHON = (3, 9)
MIN_TORCH = (2, 0)
MIN_NUMPY = (1, 24)

#: Where a Jetson's JetPack names its L4T release (``# R35 (release), REVISION: 4.1, ...``);
#: the environment variable :data:`ENV_TEGRA_RELEASE` names another file (tests).
TEGRA_RELEASE = "/etc/nv_tegra_release"
ENV_TEGRA_RELEASE = "FLQ_NV_TEGRA_RELEASE"
#: L4T major release -> (JetPack, the Python of NVIDIA's PyTorch wheels for it).
JETPACKS = {32: ("JetPack 4", "3.6"), 34: ("JetPack 5", "3.8"), 35: ("JetPack 5", "3.8"), 36: ("JetPack 6", "3.10")}

OK, WARN, FAIL = "ok", "warn", "fail"
_TAGS = {OK: "[ok]", WARN: "[warn]", FAIL: "[FAIL]"}


@dataclass
class Check:
    """The result of one check.

    Attributes:
        check: short name (``python``, ``torch``, ``device``, ``dataset`` ...).
        status: ``ok``, ``warn`` or ``fail``.
        detail: what was found, one line.
        fix: how to repair it, one line (always given for ``fail``), or ``None``.
    """

    check: str
    status: str
    detail: str
    fix: Optional[str] = None

    def lines(self) -> List[str]:
        """The human-readable lines of this check (the fix line only when there is a fix)."""
        out = [f"{_TAGS[self.status]:<7}{self.check:<16} {self.detail}"]
        if self.fix:
            out.append(f"  fix: {self.fix}")
        return out


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _version_tuple(text: str) -> Tuple[int, ...]:
    """``'2.13.0+cpu'`` -> ``(2, 13, 0)``; leading numeric parts only."""
    parts: List[int] = []
    for piece in str(text).split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the doctor's flags to ``p`` (the ``flq doctor`` sub-parser or a parser of its own)."""
    p.add_argument("--config", default=None, help=f"JSON config file (default: ./{DEFAULT_CONFIG} when it exists)")
    p.add_argument("--master_ip", default=None, help="also check that the master at this address answers GET /status")
    p.add_argument("--master_port", default=None, help="master port (default: the config's system.master_port, 5000)")
    p.add_argument(
        "--data_dir", default=None, help="folder with the dataset's IDX files (overrides the config's dataset.data_dir)"
    )
    p.add_argument(
        "--device",
        default=None,
        choices=("auto", "cpu", "cuda"),
        help="device to check (overrides the config's system.device)",
    )
    p.add_argument("--cafile", default=None, help="CA bundle of the master's HTTPS certificate")
    p.add_argument("--certfile", default=None, help="client certificate, for a master that requires one")
    p.add_argument("--keyfile", default=None, help="the client certificate's key")
    p.add_argument(
        "--credential", default=None, help="a worker's key (worker_<id>.key): check it, and the master's answer"
    )
    p.add_argument("--worker_id", type=int, default=None, help="the worker id the --credential should be for")
    p.add_argument("--json", action="store_true", help="print a JSON list of the checks instead of text")


# ---------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------


def _check_python() -> Check:
    v = sys.version_info
    text = f"{v.major}.{v.minor}.{v.micro} ({platform.python_implementation()}, {sys.executable})"
    if (v.major, v.minor) < MIN_PYTHON:
        return Check(
            "python",
            FAIL,
            f"{text}: FLQ-Fed needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer",
            f"use Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer",
        )
    return Check("python", OK, text)


def _check_torch() -> Tuple[Check, Any]:
    try:
        import torch
    except Exception as exc:  # ImportError, or a broken install raising something else
        return Check(
            "torch",
            FAIL,
            f"PyTorch cannot be imported: {_one_line(exc)}",
            "pip install 'torch>=2.0,<3' (on Jetson: NVIDIA's PyTorch wheel for your JetPack)",
        ), None
    if torch.version.cuda:
        build = f"CUDA {torch.version.cuda}"
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        if cudnn:
            build += f", cuDNN {cudnn}"
    elif getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip}"
    else:
        build = "CPU build"
    text = f"{torch.__version__} ({build})"
    if _version_tuple(torch.__version__)[:2] < MIN_TORCH:
        return Check(
            "torch",
            FAIL,
            f"{text}: FLQ-Fed needs PyTorch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}",
            "pip install 'torch>=2.0,<3'",
        ), torch
    return Check("torch", OK, text), torch


def l4t_release(path: Optional[str] = None) -> Optional[Tuple[int, str]]:
    """The L4T release of this Jetson, ``(35, "R35.4.1")``, from its
    ``/etc/nv_tegra_release`` (or ``path``, or ``$FLQ_NV_TEGRA_RELEASE``);
    None on another machine.

    Raises:
        ValueError: the file exists but does not name a release (its first line).
    """
    where = Path(path or os.environ.get(ENV_TEGRA_RELEASE) or TEGRA_RELEASE)
    try:
        first = where.read_text(encoding="utf-8", errors="replace").splitlines()[:1]
    except OSError:
        return None
    line = first[0].strip() if first else ""
    m = re.match(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", line)
    if not m:
        raise ValueError(f"{where} does not name an L4T release: {line[:80]!r}")
    return int(m.group(1)), f"R{m.group(1)}.{m.group(2)}"


def _check_jetson(torch: Any) -> Optional[Check]:
    """On a Jetson: its JetPack, and whether this Python and PyTorch can use
    its GPU (None elsewhere). NVIDIA's PyTorch wheels for JetPack 5 are
    Python 3.8 only, which FLQ-Fed does not support: there it trains on CPU."""
    try:
        found = l4t_release()
    except ValueError as exc:
        return Check("jetson", WARN, _one_line(exc), f"check {TEGRA_RELEASE} (JetPack's release file)")
    if found is None:
        return None
    major, release = found
    jetpack, wheel_python = JETPACKS.get(major, (f"L4T R{major}", ""))
    board = f"{jetpack} (L4T {release})"
    v = sys.version_info
    python_ok = (v.major, v.minor) >= MIN_PYTHON
    need = f"FLQ-Fed needs Python >= {MIN_PYTHON[0]}.{MIN_PYTHON[1]}"
    if torch is None:
        cuda, torch_text = False, "PyTorch is not importable"
    elif torch.cuda.is_available():
        cuda, torch_text = True, f"torch {torch.__version__} uses its GPU (CUDA {torch.version.cuda})"
    elif torch.version.cuda:
        cuda, torch_text = (
            False,
            f"torch {torch.__version__} is a CUDA build but sees no GPU -> this worker trains on CPU",
        )
    else:
        cuda, torch_text = False, f"torch {torch.__version__} here has no CUDA -> this worker trains on CPU"
    gpu_hint = "For the GPU use JetPack 6 (Orin boards; Python 3.10), see README 'Jetson'"
    if major in JETPACKS and major < 36:  # JetPack 4 and 5
        wheels = f"NVIDIA's torch wheels for it are Python {wheel_python} only and {need}"
        if not python_ok:
            return Check(
                "jetson",
                FAIL,
                f"{board}: {wheels}; this is Python {v.major}.{v.minor}",
                "install Python 3.9+ (e.g. Miniforge) with pip's torch (CPU: it trains, slower), or flash "
                "JetPack 6 (Orin) for the GPU; see README 'Jetson'",
            )
        if cuda:
            return Check("jetson", OK, f"{board}: {torch_text}")
        return Check(
            "jetson",
            WARN,
            f"{board}: {wheels}; {torch_text}. {gpu_hint}",
            "training on CPU works (slower); for the GPU flash JetPack 6 (Orin) and install NVIDIA's torch wheel "
            "for it, or build PyTorch with CUDA for this Python",
        )
    if cuda:
        return Check("jetson", OK, f"{board}: {torch_text}")
    if wheel_python and f"{v.major}.{v.minor}" != wheel_python:
        torch_text += f" (NVIDIA's torch wheels for it are Python {wheel_python}, this is {v.major}.{v.minor})"
    return Check(
        "jetson",
        WARN,
        f"{board}: {torch_text}",
        f"install NVIDIA's torch wheel for {jetpack} (Python {wheel_python or '3.10'}) into this Python "
        f"(FLQ_PYTHON for the scripts), see README 'Jetson'",
    )


def _check_numpy() -> Check:
    try:
        import numpy
    except Exception as exc:
        return Check("numpy", FAIL, f"NumPy cannot be imported: {_one_line(exc)}", "pip install 'numpy>=1.24,<3'")
    if _version_tuple(numpy.__version__)[:2] < MIN_NUMPY:
        return Check("numpy", FAIL, f"{numpy.__version__}: FLQ-Fed needs NumPy >= 1.24", "pip install 'numpy>=1.24,<3'")
    return Check("numpy", OK, numpy.__version__)


def _check_zstandard() -> Check:
    """The entropy coder of wire format 2 (needed whenever entropy_coding is on, the default)."""
    try:
        import zstandard
    except Exception as exc:
        return Check(
            "zstandard",
            FAIL,
            f"zstandard (the entropy coder of wire format 2) cannot be imported: {_one_line(exc)}",
            "pip install 'zstandard>=0.22,<1'",
        )
    return Check(
        "zstandard", OK, f"{zstandard.__version__} (libzstd {zstandard.ZSTD_VERSION[0]}.{zstandard.ZSTD_VERSION[1]})"
    )


def _load(args: argparse.Namespace) -> Tuple[Check, Config]:
    path = getattr(args, "config", None)
    if path is None:
        if not Path(DEFAULT_CONFIG).is_file():
            return Check("config", OK, f"no config file (./{DEFAULT_CONFIG} not found): the defaults"), Config()
        path = DEFAULT_CONFIG
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        return (
            Check(
                "config",
                FAIL,
                _one_line(exc),
                f"correct {path} (each key's allowed values: flq simulate --help); the checks below use the defaults",
            ),
            Config(),
        )
    return (
        Check(
            "config",
            OK,
            f"{path}: valid (mode {cfg.mode}, {cfg.total_workers} workers, dataset {cfg.dataset}, device {cfg.device})",
        ),
        cfg,
    )


def _check_device(torch: Any, cfg: Config, requested: str) -> List[Check]:
    from .model import resolve_device

    try:
        dev = resolve_device(requested)
    except RuntimeError as exc:
        fix = "set system.device to auto or cpu"
        if not torch.version.cuda:
            fix += " (this PyTorch is a CPU build; a GPU needs a CUDA build of PyTorch)"
        return [Check("device", FAIL, _one_line(exc), fix)]
    if dev.type == "cuda":
        return _check_cuda(torch, cfg, dev, requested)
    why = ""
    if requested == "auto":
        why = "; CUDA not available" if not torch.version.cuda else "; PyTorch sees no CUDA device"
    checks = [Check("device", OK, f"{dev.type} (requested {requested}{why})")]
    threads = f"system.threads {cfg.threads}" + (" = all cores" if cfg.threads == 0 else "")
    checks.append(Check("cpu", OK, f"{os.cpu_count()} cores, PyTorch threads {torch.get_num_threads()} ({threads})"))
    if cfg.enable_mixed_precision:
        checks.append(
            Check(
                "mixed precision",
                WARN,
                "n/a on CPU (enable_mixed_precision needs CUDA)",
                "set jetson_optimization.enable_mixed_precision to false, or run on a CUDA device",
            )
        )
    else:
        checks.append(Check("mixed precision", OK, "n/a on CPU (enable_mixed_precision is off)"))
    return checks


def _check_cuda(torch: Any, cfg: Config, dev: Any, requested: str) -> List[Check]:
    try:
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
    except Exception as exc:
        return [
            Check(
                "device",
                FAIL,
                f"cuda: cannot query the GPU: {_one_line(exc)}",
                "check the NVIDIA driver (nvidia-smi), or set system.device to cpu",
            )
        ]
    checks = [Check("device", OK, f"cuda:{index} (requested {requested}; {torch.cuda.device_count()} CUDA device(s))")]
    total_mib = int(props.total_memory) // (1024 * 1024)
    checks.append(Check("gpu", OK, f"{props.name}, compute capability {props.major}.{props.minor}, {total_mib} MiB"))
    limit = cfg.gpu_memory_limit_mb
    if limit == 0:
        checks.append(Check("gpu memory", OK, f"{total_mib} MiB total; gpu_memory_limit_mb 0 (no cap)"))
    elif limit > total_mib:
        checks.append(
            Check(
                "gpu memory",
                WARN,
                f"gpu_memory_limit_mb {limit} exceeds the GPU's {total_mib} MiB (the cap has no effect)",
                f"set jetson_optimization.gpu_memory_limit_mb to at most {total_mib} (0 = no cap)",
            )
        )
    else:
        checks.append(Check("gpu memory", OK, f"gpu_memory_limit_mb {limit} of {total_mib} MiB total"))
    checks.append(_check_autocast(torch, cfg, index))
    return checks


def _check_autocast(torch: Any, cfg: Config, index: int) -> Check:
    state = "on" if cfg.enable_mixed_precision else "off"
    try:
        device = torch.device("cuda", index)
        a = torch.full((16, 16), 0.5, device=device)
        with torch.autocast(device_type="cuda", dtype=torch.float16):
            out = a @ a
        torch.cuda.synchronize(device)
        value = float(out[0, 0].item())
        if out.dtype != torch.float16:
            raise RuntimeError(f"autocast matmul gave {out.dtype}, not float16")
        if value != 4.0:
            raise RuntimeError(f"autocast matmul gave {value}, expected 4.0")
    except Exception as exc:
        status = FAIL if cfg.enable_mixed_precision else WARN
        return Check(
            "mixed precision",
            status,
            f"float16 autocast does not work on cuda:{index}: {_one_line(exc)} (enable_mixed_precision is {state})",
            "set jetson_optimization.enable_mixed_precision to false",
        )
    return Check("mixed precision", OK, f"float16 autocast works on cuda:{index} (enable_mixed_precision is {state})")


def _dataset_fix(info: Any) -> str:
    from .datasets import ENV_DATA_DIR, ENV_NO_DOWNLOAD, _download_disabled

    ways = []
    if info.debian_package:
        ways.append(f"apt-get install {info.debian_package}")
    ways.append(f"set {ENV_DATA_DIR}" + ("" if info.debian_package else " to a folder holding the four IDX .gz files"))
    download = "or allow the download"
    if _download_disabled():
        download += f" (unset {ENV_NO_DOWNLOAD})"
    return ", ".join(ways) + ", " + download


def _check_model(cfg: Config) -> Check:
    """The model builds here (an imported factory imports, runs and gives a module FLQ can train)."""
    from .config import ConfigError
    from .model import build_model, layout_of

    try:
        layout = layout_of(build_model(cfg.model, cfg.model_args))
    except ConfigError as exc:
        return Check("model", FAIL, str(exc), "fix model.name / model.model_args (README, Your own model and data)")
    extra = f", {len(layout.buffers)} buffers ({layout.buffer_bytes} bytes)" if layout.buffers else ""
    return Check("model", OK, f"{cfg.model}: {layout.n} parameters in {len(layout.params)} tensors{extra}")


def _check_dataset(cfg: Config, data_dir: Optional[str]) -> Check:
    if cfg.dataset == "cifar10":
        from .cifar10 import BATCHES_DIR, find_cifar10_dir
        from .cifar10 import search_dirs as cifar_dirs

        found_cifar = find_cifar10_dir(data_dir)
        if found_cifar is not None:
            return Check("dataset", OK, f"CIFAR-10 at {found_cifar}")
        where = ", ".join(str(d) for d in cifar_dirs(data_dir))
        return Check(
            "dataset",
            WARN,
            f"CIFAR-10 not found in {where}",
            f"put {BATCHES_DIR} in one of them, or allow the download",
        )
    if ":" in cfg.dataset:  # by import path: importable here? (its arrays are checked when the run loads them)
        from .config import ConfigError
        from .imports import load_callable

        try:
            load_callable(cfg.dataset, "dataset.name")
        except ConfigError as exc:
            return Check("dataset", FAIL, str(exc), "run from the folder that holds the module, or install it")
        return Check("dataset", OK, f"loader {cfg.dataset} imports (called when the run starts)")
    try:
        from .datasets import DATASETS, DatasetError, canonical_name, find_dataset_dir, search_dirs
    except Exception as exc:
        return Check(
            "dataset",
            FAIL,
            f"flq.datasets cannot be imported: {_one_line(exc)}",
            "pip install -e . (with its dependencies)",
        )
    try:
        info = DATASETS[canonical_name(cfg.dataset)]
        found = find_dataset_dir(info.name, data_dir)
        if found is not None:
            return Check("dataset", OK, f"{info.title} at {found}")
        where = ", ".join(str(d) for d in search_dirs(info.name, data_dir))
    except (DatasetError, OSError) as exc:
        return Check("dataset", FAIL, _one_line(exc), "set dataset.name to fashion_mnist or mnist")
    return Check("dataset", FAIL, f"{info.title} not found in {where}", _dataset_fix(info))


def _check_credential(path: str, worker_id: Optional[int]) -> Tuple[Check, Any]:
    """The worker's key file: (check, the credential or None)."""
    from .credentials import CredentialError, load_worker_credential, too_open

    try:
        cred = load_worker_credential(Path(path))
    except CredentialError as exc:
        return Check("credential", FAIL, _one_line(exc), "give the worker_<id>.key flq credentials made"), None
    if worker_id is not None and cred.worker_id != worker_id:
        return (
            Check(
                "credential",
                FAIL,
                f"{path} is worker {cred.worker_id}'s key, not worker {worker_id}'s",
                f"use worker_{worker_id}.key",
            ),
            None,
        )
    if too_open(Path(path)):
        return Check(
            "credential", WARN, f"{path}: worker {cred.worker_id}'s key, readable by others", f"chmod 600 {path}"
        ), cred
    return Check("credential", OK, f"{path}: worker {cred.worker_id}'s key"), cred


def _check_signed(base: str, cred: Any, verify: Any, cert: Any) -> Check:
    """Whether the master accepts a call signed with ``cred`` (``GET /config``)."""
    from .transport.client import Fatal, MasterClient, Unreachable

    client = MasterClient(
        base, cred.worker_id, credential=cred, verify=verify, client_cert=cert, give_up_s=MASTER_TIMEOUT_S
    )
    try:
        required = (
            client._call("GET", "/workers/challenge", params={"worker_id": cred.worker_id}, session=False)
            .json()
            .get("required")
        )
    except (Fatal, Unreachable) as exc:
        return Check("signed call", FAIL, _one_line(exc), "give the key made with the master's master.secret")
    except Exception as exc:  # noqa: BLE001 - a refusal of another kind
        return Check("signed call", FAIL, _one_line(exc) or type(exc).__name__, "see the master's log")
    finally:
        client.close()
    if not required:
        return Check(
            "signed call", WARN, "the master does not check per-worker credentials", "start it with --credentials"
        )
    return Check("signed call", OK, f"the master accepts worker {cred.worker_id}'s signature")


def _check_master(ip: str, port_arg: Any, cfg: Config, verify: Any = True, cert: Any = None) -> Check:
    fix = "start it with ./start_master.sh, check the IP/port and the firewall"
    try:
        port = coerce("master_port", port_arg if port_arg is not None else cfg.master_port, "--master_port")
    except ConfigError as exc:
        return Check("master", FAIL, _one_line(exc), "give --master_port a port 1..65535")
    try:
        import httpx
    except Exception as exc:
        return Check("master", FAIL, f"httpx cannot be imported: {_one_line(exc)}", "pip install 'httpx>=0.27,<1'")
    from .transport.client import master_url

    try:
        base = master_url(ip, port_arg, default_port=port, tls=verify is not True)
    except ValueError as exc:
        return Check("master", FAIL, _one_line(exc), "give --master_ip as HOST, HOST:PORT or http(s)://HOST:PORT")
    where = base.split("://", 1)[1]
    url = f"{base}/status"
    token = os.environ.get("FLQ_AUTH_TOKEN", "")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.get(url, timeout=MASTER_TIMEOUT_S, headers=headers, verify=verify)
    except httpx.HTTPError as exc:
        reason = _one_line(exc) or type(exc).__name__
        if base.startswith("https:") and isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
            from urllib.parse import urlsplit

            from .transport.client import client_certificate_refused

            u = urlsplit(base)
            refused = client_certificate_refused(u.hostname or "", u.port or port, cert)
            if refused:
                return Check(
                    "master",
                    FAIL,
                    f"master at {where} refused this host's TLS client certificate ({refused})",
                    "give --certfile/--keyfile a certificate of the master's CA (flq credentials --tls)",
                )
        return Check("master", FAIL, f"master at {where} not reachable: {reason}", fix)
    except Exception as exc:  # a malformed address
        return Check("master", FAIL, f"master at {where} not reachable: {_one_line(exc) or type(exc).__name__}", fix)
    if r.status_code in (401, 403):
        return Check(
            "master",
            FAIL,
            f"master at {where} refused GET /status (HTTP {r.status_code})",
            "set FLQ_AUTH_TOKEN to the master's token",
        )
    from .transport.client import not_a_master

    try:
        doc = r.json()
    except ValueError:
        doc = None
    if r.status_code != 200 and isinstance(doc, dict) and doc.get("code"):  # an FLQ master's refusal
        return Check(
            "master",
            FAIL,
            f"master at {where} refused GET /status ({r.status_code} {doc['code']}): {_one_line(doc.get('detail'))}",
            "see the master's log",
        )
    if r.status_code != 200 or not isinstance(doc, dict) or "state" not in doc:
        return Check(
            "master",
            FAIL,
            not_a_master(base, "GET", "/status", r),
            f"give the FLQ master's address and port ({fix})",
        )
    detail = (
        f"master at {where}: state {doc.get('state', '?')}, round {doc.get('round', '?')}, mode {doc.get('mode', '?')}"
    )
    if isinstance(doc.get("workers"), list):
        need = doc.get("min_workers", doc.get("total_workers", "?"))
        detail += f", {len(doc['workers'])} workers known (needs {need})"
    return Check("master", OK, detail)


def run_checks(args: argparse.Namespace) -> List[Check]:
    """Run every check for the parsed flags ``args`` (see :func:`add_arguments`) and return the results.

    Missing attributes of ``args`` count as not given.
    """
    checks = [_check_python()]
    torch_check, torch = _check_torch()
    checks.append(torch_check)
    checks.append(_check_numpy())
    config_check, cfg = _load(args)
    checks.append(config_check)
    checks.append(_check_zstandard())
    jetson = _check_jetson(torch)
    if jetson is not None:
        checks.append(jetson)
    requested = getattr(args, "device", None) or cfg.device
    if torch is not None:
        checks.extend(_check_device(torch, cfg, requested))
    else:
        checks.append(Check("device", FAIL, "not checked: PyTorch is missing", "install PyTorch (see above)"))
    data_dir = getattr(args, "data_dir", None)
    if data_dir is None:
        data_dir = cfg.data_dir or None
    checks.append(_check_dataset(cfg, data_dir))
    if torch is not None:
        checks.append(_check_model(cfg))
    cred = None
    if getattr(args, "credential", None):
        check, cred = _check_credential(args.credential, getattr(args, "worker_id", None))
        checks.append(check)
    ip = getattr(args, "master_ip", None)
    if ip:
        verify, cert, tls_check = _tls(args)
        if tls_check is not None:
            checks.append(tls_check)
            return checks
        master = _check_master(ip, getattr(args, "master_port", None), cfg, verify, cert)
        checks.append(master)
        if cred is not None and master.status == OK:
            from .transport.client import master_url

            base = master_url(
                ip, getattr(args, "master_port", None), default_port=cfg.master_port, tls=verify is not True
            )
            checks.append(_check_signed(base, cred, getattr(args, "cafile", None) or True, cert))
    return checks


def _tls(args: argparse.Namespace) -> Tuple[Any, Any, Optional[Check]]:
    """``(httpx verify, (certfile, keyfile) or None, a FAIL check or None)`` from the TLS flags."""
    import ssl

    cafile, certfile, keyfile = (getattr(args, k, None) for k in ("cafile", "certfile", "keyfile"))
    if not (cafile or certfile):
        return True, None, None
    fix = "give --cafile the master's CA, --certfile/--keyfile this host's certificate and key"
    try:
        context = ssl.create_default_context(cafile=cafile)
        if certfile or keyfile:
            if not (certfile and keyfile):
                return True, None, Check("tls", FAIL, "--certfile and --keyfile go together", fix)
            context.load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as exc:
        return True, None, Check("tls", FAIL, f"cannot load the TLS files: {_one_line(exc)}", fix)
    return context, (certfile, keyfile) if certfile else None, None


def run(args: argparse.Namespace) -> int:
    """``flq doctor``: run the checks, print them (text, or JSON with ``--json``).

    Returns:
        0 when no check FAILed, 1 otherwise.
    """
    checks = run_checks(args)
    if getattr(args, "json", False):
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        for c in checks:
            for line in c.lines():
                print(line)
        fails = sum(c.status == FAIL for c in checks)
        warns = sum(c.status == WARN for c in checks)
        print(f"{fails} failed, {warns} warning(s), {len(checks) - fails - warns} ok")
    sys.stdout.flush()
    return 1 if any(c.status == FAIL for c in checks) else 0


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser with the doctor's flags (for ``python -m flq.doctor``)."""
    p = argparse.ArgumentParser(
        prog="flq doctor",
        description="Check that this machine can run FLQ-Fed: Python, PyTorch, "
        "device, GPU, dataset, config and (optionally) the master.",
    )
    add_arguments(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and :func:`run` the checks; returns the exit status."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
