"""The run configuration: one flat, validated dataclass read from the
sectioned ``flq_config.json`` of the original README (SYSTEM.md,
"Configuration"), or from the flat keys its examples use.

Every key is checked: an unknown key or a bad value raises
:class:`ConfigError` whose message is one line naming the key and what is
allowed. Command-line flags override the file (:func:`apply_overrides`).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

MODES = ("fedavg", "laq8", "bbit", "bin")
#: The longest wait any timeout may be set to (seconds).
WEEK_S = 7 * 24 * 3600.0
SECTIONS = ("system", "dataset", "model", "flq_algorithm", "lazy_selection",
            "budget_selection", "jetson_optimization", "logging")


class ConfigError(ValueError):
    """A configuration key is unknown or has a bad value (one-line message)."""


def _f(section: str, key: str, default: Any, kind: str, allowed: str,
       check: Optional[Callable[[Any], bool]] = None, choices: Tuple[str, ...] = (), help: str = ""):
    return field(default=default, metadata=dict(section=section, key=key, kind=kind, allowed=allowed,
                                                check=check, choices=choices, help=help))


def _ge(lo):
    return lambda v: v >= lo


@dataclass
class Config:
    """All knobs of a run. Attribute names are the flat keys; each belongs to
    one section of ``flq_config.json``. Defaults are the original
    experiments' (SPEC.md, "Defaults of the original experiments")."""

    # system
    total_workers: int = _f("system", "total_workers", 20, "int", "an integer 1..1000", lambda v: 1 <= v <= 1000,
                            help="number of workers M")
    min_workers: int = _f("system", "min_workers", 0, "int", "an integer 0..total_workers (0 = all)", _ge(0),
                          help="workers needed to start a round (0 = all)")
    max_rounds: int = _f("system", "max_rounds", 800, "int", "an integer >= 1", _ge(1), help="rounds to train")
    seed: int = _f("system", "seed", 42, "int", "an integer 0..4294967295", lambda v: 0 <= v < 2**32,
                   help="seed of partition, init and all draws")
    device: str = _f("system", "device", "auto", "str", "one of auto, cpu, cuda", choices=("auto", "cpu", "cuda"),
                     help="compute device")
    threads: int = _f("system", "threads", 0, "int", "an integer 0..1024 (0 = all cores)", lambda v: 0 <= v <= 1024,
                      help="intra-op threads for PyTorch")
    eval_every: int = _f("system", "eval_every", 1, "int", "an integer >= 1", _ge(1),
                         help="evaluate the global model every N rounds (and the last)")
    eval_batch_size: int = _f("system", "eval_batch_size", 64, "int", "an integer >= 1", _ge(1),
                              help="batch size of test-set evaluation")
    master_host: str = _f("system", "master_host", "0.0.0.0", "str", "a host name or address",
                          lambda v: bool(v.strip()),
                          help="address the master listens on")
    master_port: int = _f("system", "master_port", 5000, "int", "a port 1..65535", lambda v: 1 <= v <= 65535,
                          help="master HTTP port")
    round_timeout_s: float = _f("system", "round_timeout_s", 60.0, "float", "seconds, > 0 and at most a week",
                                lambda v: 0 < v <= WEEK_S, help="a round closes this long after it opened once "
                                "min_workers have offered; stragglers count as not selected")
    worker_timeout_s: float = _f("system", "worker_timeout_s", 30.0, "float", "seconds, >= 3 and at most a week",
                                 lambda v: 3 <= v <= WEEK_S, help="a worker not heard from this long (it sends a heartbeat "
                                 "every third of it) is shown absent and no longer waited for")
    start_timeout_s: float = _f("system", "start_timeout_s", 600.0, "float", "seconds, > 0 and at most a week",
                                lambda v: 0 < v <= WEEK_S, help="how long the master waits for min_workers to join before "
                                "round 1, then ends the run (exit 5)")
    quorum_timeout_s: float = _f("system", "quorum_timeout_s", 300.0, "float", "seconds, > 0 and at most a week",
                                 lambda v: 0 < v <= WEEK_S, help="how long a round short of min_workers offers waits past "
                                 "round_timeout_s, then the run ends (exit 5)")
    checkpoint_every: int = _f("system", "checkpoint_every", 10, "int", "an integer >= 0 (0 = never)", _ge(0),
                               help="master checkpoint every N rounds")
    checkpoint_dir: str = _f("system", "checkpoint_dir", "checkpoints", "str", "a folder path",
                             help="where master checkpoints go")
    auth_token: str = _f("system", "auth_token", "", "str", "a string ('' = no auth; env FLQ_AUTH_TOKEN)",
                         help="bearer token for worker calls and /stop")
    status_requires_token: bool = _f("system", "status_requires_token", False, "bool", "true/false or 1/0",
                                     help="GET /status needs the token too")
    # dataset
    dataset: str = _f("dataset", "name", "fashion_mnist", "str", "one of fashion_mnist, mnist",
                      choices=("fashion_mnist", "mnist"), help="dataset")
    data_dir: str = _f("dataset", "data_dir", "", "str", "a folder path ('' = search the defaults)",
                       help="folder with the IDX files")
    partition: str = _f("dataset", "partition", "non_iid", "str", "one of iid, non_iid",
                        choices=("iid", "non_iid"), help="how to split the training set")
    dir_alpha: float = _f("dataset", "dir_alpha", 0.1, "float", "a number > 0", lambda v: v > 0,
                          help="Dirichlet concentration of non_iid")
    batch_size: int = _f("dataset", "batch_size", 64, "int", "an integer >= 1", _ge(1), help="minibatch size")
    # model
    model: str = _f("model", "name", "cnn", "str", "one of cnn, mlp (a small test model)", choices=("cnn", "mlp"),
                    help="model")
    lr: float = _f("model", "lr", 1e-3, "float", "a number > 0", lambda v: v > 0, help="master Adam step size")
    l2: float = _f("model", "l2", 5e-4, "float", "a number >= 0", _ge(0), help="L2 coefficient cl")
    local_steps: int = _f("model", "local_steps", 0, "int", "an integer >= 0 (0 = one gradient)", _ge(0),
                          help="local SGD steps per round (SPEC.md, Local training)")
    local_epochs: int = _f("model", "local_epochs", 0, "int", "an integer >= 0", _ge(0),
                           help="local epochs per round (sets local_steps)")
    local_lr: float = _f("model", "local_lr", 0.0, "float", "a number >= 0 (0 = lr)", _ge(0),
                         help="local SGD step size")
    # flq_algorithm
    mode: str = _f("flq_algorithm", "mode", "bbit", "str", "one of " + ", ".join(MODES), choices=MODES,
                   help="uplink scheme")
    b_up: int = _f("flq_algorithm", "b_up", 4, "int", "an integer 1..16", lambda v: 1 <= v <= 16,
                   help="uplink bits (bbit)")
    b_down: int = _f("flq_algorithm", "b_down", 8, "int", "0, 32 (exact) or 1..16", lambda v: v in (0, 32) or 1 <= v <= 16,
                     help="downlink bits")
    scale_by_selected: bool = _f("flq_algorithm", "scale_by_selected", True, "bool", "true/false or 1/0",
                                 help="scale the aggregate by m_sel / sel_ref")
    sel_ref: float = _f("flq_algorithm", "sel_ref", 1.0, "float", "a number >= 1", _ge(1),
                        help="reference count of scale_by_selected")
    clip_global: float = _f("flq_algorithm", "clip_global", 0.0, "float", "a number >= 0 (0 = off)", _ge(0),
                            help="clip the aggregate's norm")
    # lazy_selection
    D: int = _f("lazy_selection", "D", 10, "int", "an integer >= 0", _ge(0), help="history depth")
    ck: float = _f("lazy_selection", "ck", 0.8, "float", "a number >= 0", _ge(0), help="history energy weight")
    C: float = _f("lazy_selection", "C", 1e9, "float", "a number >= 0", _ge(0), help="max lazy clock")
    warmup: int = _f("lazy_selection", "warmup", 0, "int", "an integer >= 0", _ge(0), help="rounds that always upload")
    thr_scale: float = _f("lazy_selection", "thr_scale", 0.0, "float", "a number >= 0", _ge(0),
                          help="lazy threshold scale (0 = never skip)")
    # budget_selection
    sel_clients: int = _f("budget_selection", "sel_clients", 0, "int", "an integer >= 0 (0 = by budget)", _ge(0),
                          help="fixed number of uploads per round")
    up_budget_bits: float = _f("budget_selection", "up_budget_bits", 17e6, "float", "a number >= 0 (0 = no budget)",
                               _ge(0), help="uplink bits per round")
    # jetson_optimization
    gpu_memory_limit_mb: int = _f("jetson_optimization", "gpu_memory_limit_mb", 0, "int", "an integer >= 0 (0 = no cap)",
                                  _ge(0), help="cap on CUDA memory")
    enable_mixed_precision: bool = _f("jetson_optimization", "enable_mixed_precision", False, "bool",
                                      "true/false or 1/0", help="float16 autocast on CUDA")
    prefetch_size: int = _f("jetson_optimization", "prefetch_size", 2, "int", "an integer >= 0", _ge(0),
                            help="batches prefetched by the loader")
    num_parallel_calls: int = _f("jetson_optimization", "num_parallel_calls", 2, "int", "an integer >= 0", _ge(0),
                                 help="data loader workers")
    # logging
    log_level: str = _f("logging", "level", "INFO", "str", "one of DEBUG, INFO, WARNING, ERROR",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="log level")
    log_dir: str = _f("logging", "log_dir", "logs", "str", "a folder path", help="where logs go")
    results_dir: str = _f("logging", "results_dir", "results", "str", "a folder path", help="where spreadsheets go")

    # ----- derived values -------------------------------------------------
    @property
    def uplink_bits(self) -> int:
        """Bits per element of an upload: 32 fedavg, 8 laq8, b_up bbit, 1 bin."""
        return {"fedavg": 32, "laq8": 8, "bbit": self.b_up, "bin": 1}[self.mode]

    @property
    def downlink_bits(self) -> int:
        """Bits per element the workers receive (32 when b_down is 0 or 32)."""
        return 32 if self.b_down in (0, 32) else self.b_down

    @property
    def needed_workers(self) -> int:
        """``min_workers``, with 0 meaning all ``total_workers``."""
        return self.min_workers or self.total_workers

    def steps_per_round(self, partition_size: int) -> int:
        """Local steps ``s`` (SPEC.md, Local training); 1 = one gradient."""
        if self.local_epochs > 0:
            return self.local_epochs * -(-partition_size // self.batch_size)
        return max(self.local_steps, 1)

    def to_sections(self) -> Dict[str, Dict[str, Any]]:
        """The config in the sectioned layout of ``flq_config.json``."""
        out: Dict[str, Dict[str, Any]] = {s: {} for s in SECTIONS}
        for f in dataclasses.fields(self):
            out[f.metadata["section"]][f.metadata["key"]] = getattr(self, f.name)
        return out

    def public_sections(self) -> Dict[str, Dict[str, Any]]:
        """:meth:`to_sections` with secrets (``auth_token``) masked: what goes into
        spreadsheets, checkpoints and answers to workers."""
        out = self.to_sections()
        if out["system"]["auth_token"]:
            out["system"]["auth_token"] = "<set>"
        return out

    def to_flat(self) -> Dict[str, Any]:
        """``{flat key: value}`` of every field."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_BY_SECTION = {(f.metadata["section"], f.metadata["key"]): f.name for f in dataclasses.fields(Config)}
#: Flat aliases: the original README's and SPEC.md's other names.
ALIASES = {"iters": "max_rounds", "rounds": "max_rounds", "workers": "total_workers", "M": "total_workers",
           "cl": "l2", "b": "b_up"}


def coerce(name: str, value: Any, where: str = "") -> Any:
    """Convert and validate one value for field ``name``.

    Raises:
        ConfigError: naming ``where`` (the key as written) and what is allowed.
    """
    f = _FIELDS[name]
    md = f.metadata
    label = where or f"{md['section']}.{md['key']}"
    kind = md["kind"]
    bad = ConfigError(f"config key '{label}': got {value!r}, expected {md['allowed']}")
    try:
        if kind == "bool":
            if isinstance(value, bool):
                v = value
            elif isinstance(value, (int, float)) and value in (0, 1):
                v = bool(value)
            elif isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                v = value.lower() in ("true", "1", "yes")
            else:
                raise bad
        elif kind == "int":
            if isinstance(value, bool):
                raise bad
            if isinstance(value, str):
                value = float(value) if any(c in value for c in ".eE") else int(value)
            if isinstance(value, float):
                if not value.is_integer():
                    raise bad
                value = int(value)
            if not isinstance(value, int):
                raise bad
            v = value
        elif kind == "float":
            if isinstance(value, bool):
                raise bad
            v = float(value)
            if v != v or v in (float("inf"), float("-inf")):
                raise bad
        else:
            if not isinstance(value, str):
                raise bad
            v = value
            if md["choices"]:
                norm = v.upper() if name == "log_level" else v.lower().replace("-", "_")
                if name == "dataset" and norm == "fmnist":
                    norm = "fashion_mnist"
                if norm not in md["choices"]:
                    raise bad
                v = norm
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise bad from None
    check = md["check"]
    if check is not None and not check(v):
        raise bad
    return v


def _resolve_flat(key: str) -> Optional[str]:
    key = ALIASES.get(key, key)
    return key if key in _FIELDS else None


def parse_mapping(data: Mapping[str, Any], source: str = "config") -> Dict[str, Any]:
    """Flatten a sectioned or flat mapping to ``{field: value}``, validating keys.

    Raises:
        ConfigError: unknown section or key, non-object section, bad value,
            or the same setting given twice.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a JSON object")
    values: Dict[str, Any] = {}
    where: Dict[str, str] = {}

    def put(name: str, value: Any, label: str) -> None:
        if name in values:
            raise ConfigError(f"{source}: '{label}' sets {name} again (already set by '{where[name]}')")
        values[name] = coerce(name, value, label)
        where[name] = label

    for key, value in data.items():
        if key.startswith("_"):  # "_comment" style keys are documentation
            continue
        if key in SECTIONS and (isinstance(value, Mapping) or _resolve_flat(key) is None):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: section '{key}' must be a JSON object")
            for sub, v in value.items():
                if sub.startswith("_"):
                    continue
                name = _BY_SECTION.get((key, sub))
                if name is None:
                    allowed = ", ".join(k for (s, k) in _BY_SECTION if s == key)
                    raise ConfigError(f"{source}: unknown key {key + '.' + sub!r} (allowed in '{key}': {allowed})")
                put(name, v, f"{key}.{sub}")
            continue
        name = _resolve_flat(key)
        if name is None:
            raise ConfigError(f"{source}: unknown key {key!r} (sections: {', '.join(SECTIONS)}; "
                              f"or a flat key such as total_workers, batch_size, mode)")
        put(name, value, key)
    return values


def build(values: Mapping[str, Any], base: Optional[Config] = None) -> Config:
    """A :class:`Config` from validated values, with cross-field checks.

    Raises:
        ConfigError: inconsistent settings (min_workers > total_workers,
            both local_steps and local_epochs, bbit with 1 bit). Mode bin
            forces b_up to 1 (SPEC.md: "b forced to 1"), whatever was given.
    """
    cfg = dataclasses.replace(base or Config(), **dict(values))
    if cfg.min_workers > cfg.total_workers:
        raise ConfigError(f"config key 'system.min_workers': {cfg.min_workers} exceeds total_workers "
                          f"{cfg.total_workers}")
    if cfg.local_steps > 0 and cfg.local_epochs > 0:
        raise ConfigError("config keys 'model.local_steps' and 'model.local_epochs': set one, not both")
    if cfg.mode == "bbit" and cfg.b_up < 2:
        raise ConfigError("config key 'flq_algorithm.b_up': bbit needs 2..16 bits (use mode bin for 1 bit)")
    if cfg.mode == "bin" and cfg.b_up != 1:
        cfg = dataclasses.replace(cfg, b_up=1)  # SPEC.md: b forced to 1 in bin mode
    return cfg


def load_config(path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None) -> Config:
    """Read ``path`` (JSON; sectioned or flat), apply ``overrides`` (flat keys),
    validate, and return the :class:`Config`.

    Raises:
        ConfigError: missing or unreadable file, invalid JSON, unknown key,
            bad value (one line naming the key).
    """
    values: Dict[str, Any] = {}
    if path:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
        except RecursionError:
            raise ConfigError(f"{p}: JSON nested too deeply") from None
        values = parse_mapping(data, str(p))
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        name = _resolve_flat(key)
        if name is None:
            raise ConfigError(f"unknown setting '{key}'")
        values[name] = coerce(name, value, f"--{key}")
    return build(values)


def field_specs() -> List[Tuple[str, Any, str, str]]:
    """``(flat key, default, kind, help)`` of every field, for the CLI."""
    return [(f.name, f.default, f.metadata["kind"], f"{f.metadata['help']} [{f.metadata['section']}."
             f"{f.metadata['key']}; {f.metadata['allowed']}]") for f in dataclasses.fields(Config)]
