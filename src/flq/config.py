"""The run configuration: pydantic models of ``flq_config.json``, one per
section, and :class:`Config`, the flat, validated view every component reads
(``cfg.total_workers``, ``cfg.mode`` ...).

A file may be sectioned (``{"system": {"total_workers": 20}, ...}``, the
layout of the original README) or flat (``{"total_workers": 20}``, the layout
of its examples); the flat names are :class:`Config`'s attribute names, and
three keys are renamed there: ``dataset.name`` is ``dataset``, ``model.name``
is ``model`` and ``logging.level`` is ``log_level``. :data:`ALIASES` adds the
seed's other names (``iters``, ``workers``, ``b`` ...).

Each field's type, bounds, choices, default and help text are declared once,
here; the command-line flags (:func:`field_specs`), ``/config``, the worker's
register reply and ``flq simulate --help`` are generated from them. Every key
is checked: an unknown key or a bad value raises :class:`ConfigError`, one
line naming the key as it was written and what is allowed.

Why one module of this size: it is the single declaration of every key (type,
bounds, choices, default, help), which is the point of having one; the
reading functions below it are short.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Callable, Dict, List, Literal, Mapping, Optional, Tuple, Type

import annotated_types
import pydantic
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator
from pydantic.fields import FieldInfo

from .algorithm import compressors

#: The uplink schemes' names (``flq_algorithm.mode``), from the compressor table.
MODES = tuple(compressors.UPLINK)
#: The longest wait any timeout may be set to (seconds).
WEEK_S = 7 * 24 * 3600.0
#: The most PyTorch threads a process may be given (``threads``, ``--ray_threads``).
MAX_THREADS = 1024


class ConfigError(ValueError):
    """A configuration key is unknown or has a bad value (one-line message)."""


# ----- how values are read --------------------------------------------------
# JSON numbers, strings from the command line and environment, and the
# seed's "1"/"true" spellings all reach the same fields. These are stricter
# than pydantic's lax mode where it matters: 2.5 is not an integer, True is
# not a number, NaN and Infinity are not settings.
def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("not an integer")
    if isinstance(value, str):
        value = float(value) if any(c in value for c in ".eE") else int(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("not an integer")
        value = int(value)
    if not isinstance(value, int):
        raise ValueError("not an integer")
    return value


def _to_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError("not a number")
    v = float(value)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError("not a finite number")
    return v


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise ValueError("not true/false")


def _choice(normalize: Callable[[str], str]) -> Callable[[Any], Any]:
    def read(value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError("not a string")
        return normalize(value)

    return read


def _lower(v: str) -> str:
    v = v.lower().replace("-", "_")
    return {"fmnist": "fashion_mnist", "cifar_10": "cifar10"}.get(v, v)


def _kwargs(value: Any) -> Dict[str, Any]:
    """A JSON object of keyword arguments (a mapping, or its JSON text from a flag)."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON ({exc.msg})") from None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and k.isidentifier() for k in value):
        raise ValueError("not a JSON object of keyword arguments")
    return dict(value)


def _named(builtins: Tuple[str, ...]) -> Callable[[Any], str]:
    """A built-in name (case and ``-`` folded) or a ``package.module:callable`` import path (kept as written)."""

    def read(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError("not a string")
        if ":" in value:
            from .imports import is_import_path

            if not is_import_path(value.strip()):
                raise ValueError("not a package.module:callable import path")
            return value.strip()
        name = _lower(value)
        if name not in builtins:
            raise ValueError("unknown name")
        return name

    return read


def _field(default: Any, help: str, note: str = "", allowed: str = "", **bounds: Any) -> Any:
    """A field with its help text; ``note`` is added to the generated
    description of allowed values, ``allowed`` replaces it."""
    return Field(default, description=help, json_schema_extra={"note": note, "allowed": allowed}, **bounds)


def _seconds(default: float, help: str, **bounds: Any) -> Any:
    """A timeout field: seconds, at most a week (:data:`WEEK_S`)."""
    return _field(default, help, note="seconds", le=WEEK_S, **bounds)


Int = pydantic.BeforeValidator(_to_int)
Float = pydantic.BeforeValidator(_to_float)
Bool = pydantic.BeforeValidator(_to_bool)
Str = pydantic.BeforeValidator(_choice(lambda v: v))
Choice = pydantic.BeforeValidator(_choice(_lower))
Kwargs = pydantic.BeforeValidator(_kwargs)
#: The built-in datasets and models (the rest come by import path).
DATASET_NAMES = ("fashion_mnist", "mnist", "cifar10")
MODEL_NAMES = ("cnn", "mlp")


# ----- the sections of flq_config.json ---------------------------------------
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=False)


class SystemSection(_Section):
    """``system``: the cluster, its timeouts, threads, checkpoints and auth."""

    total_workers: Annotated[int, Int] = _field(20, "number of workers M", ge=1, le=1000)
    min_workers: Annotated[int, Int] = _field(
        0, "workers needed to start a round (0 = all)", note="0 = all; at most total_workers", ge=0
    )
    max_rounds: Annotated[int, Int] = _field(800, "rounds to train", ge=1)
    seed: Annotated[int, Int] = _field(42, "seed of partition, init and all draws", ge=0, le=2**32 - 1)
    device: Annotated[Literal["auto", "cpu", "cuda"], Choice] = _field("auto", "compute device")
    threads: Annotated[int, Int] = _field(0, "intra-op threads for PyTorch", note="0 = all cores", ge=0, le=MAX_THREADS)
    eval_every: Annotated[int, Int] = _field(
        1,
        "evaluate the global model every N rounds (and the last)",
        note="0 = never (acc and entropy stay empty; for throughput runs)",
        ge=0,
    )
    eval_batch_size: Annotated[int, Int] = _field(64, "batch size of test-set evaluation", ge=1)
    eval_precision: Annotated[Literal["fp32", "bf16", "fp16"], Choice] = _field(
        "fp32",
        "arithmetic of test-set evaluation: bf16 autocast (fast only on CPUs with native bf16: AVX512-BF16 or "
        "AMX; on CUDA from Ampere), fp16 autocast (CUDA only)",
    )
    eval_overlap: Annotated[bool, Bool] = _field(
        True,
        "evaluate round k's model in a background thread while round k+1 trains (same numbers; the record's "
        "accuracy is filled in when the evaluation ends)",
    )
    master_host: Annotated[str, Str] = _field(
        "0.0.0.0", "address the master listens on", allowed="a host name or address", min_length=1, pattern=r"\S"
    )
    master_port: Annotated[int, Int] = _field(5000, "master HTTP port", ge=1, le=65535)
    round_timeout_s: Annotated[float, Float] = _seconds(
        60.0,
        "a round closes this long after it opened once min_workers have offered; stragglers count as not selected",
        gt=0,
    )
    worker_timeout_s: Annotated[float, Float] = _seconds(
        30.0,
        "a worker not heard from this long (it sends a heartbeat every third of it) is shown absent and no "
        "longer waited for",
        ge=3,
    )
    start_timeout_s: Annotated[float, Float] = _seconds(
        600.0,
        "how long the master waits for min_workers to join before round 1, then ends the run (exit 5)",
        gt=0,
    )
    quorum_timeout_s: Annotated[float, Float] = _seconds(
        300.0,
        "how long a round short of min_workers offers waits past round_timeout_s, then the run ends (exit 5)",
        gt=0,
    )
    checkpoint_every: Annotated[int, Int] = _field(10, "master checkpoint every N rounds", note="0 = never", ge=0)
    checkpoint_dir: Annotated[str, Str] = _field("checkpoints", "where master checkpoints go", allowed="a folder path")
    auth_token: Annotated[str, Str] = _field(
        "", "bearer token for worker calls and /stop", allowed="a string ('' = no auth; env FLQ_AUTH_TOKEN)"
    )
    status_requires_token: Annotated[bool, Bool] = _field(False, "GET /status needs the token too")
    credentials: Annotated[str, Str] = _field(
        "",
        "the master's secret made by flq credentials (master.secret): every worker call must then be signed "
        "with its worker's own key",
        allowed="a file path ('' = workers need only the token)",
    )

    @model_validator(mode="after")
    def _min_workers_fit(self) -> SystemSection:
        if self.min_workers > self.total_workers:
            raise ValueError(
                f"config key 'system.min_workers': {self.min_workers} exceeds total_workers {self.total_workers}"
            )
        return self


class DatasetSection(_Section):
    """``dataset``: which data, where it is, how it is split among workers."""

    dataset: Annotated[str, pydantic.BeforeValidator(_named(DATASET_NAMES))] = _field(
        "fashion_mnist",
        "dataset: a built-in one, or package.module:load returning (train, test) (README, Your own model and data)",
        alias="name",
        allowed="fashion_mnist, mnist, cifar10, or package.module:callable",
    )
    dataset_args: Annotated[Dict[str, Any], Kwargs] = _field(
        {}, "keyword arguments of an imported dataset loader", allowed="a JSON object ({} = none)"
    )
    data_dir: Annotated[str, Str] = _field(
        "", "folder with the dataset's files", allowed="a folder path ('' = search the defaults)"
    )
    partition: Annotated[Literal["iid", "non_iid"], Choice] = _field("non_iid", "how to split the training set")
    dir_alpha: Annotated[float, Float] = _field(0.1, "Dirichlet concentration of non_iid", gt=0)
    batch_size: Annotated[int, Int] = _field(64, "minibatch size", ge=1)

    @model_validator(mode="after")
    def _args_need_a_loader(self) -> DatasetSection:
        if self.dataset_args and ":" not in self.dataset:
            raise ValueError(
                f"config key 'dataset.dataset_args': the built-in dataset {self.dataset} takes no arguments "
                f"(they are for a loader given as package.module:load)"
            )
        return self


class ModelSection(_Section):
    """``model``: the network, the master's step size, and local training."""

    model: Annotated[str, pydantic.BeforeValidator(_named(MODEL_NAMES))] = _field(
        "cnn",
        "model: cnn, mlp (a small test model), or package.module:factory returning a torch.nn.Module",
        alias="name",
        allowed="cnn, mlp, or package.module:callable",
    )
    model_args: Annotated[Dict[str, Any], Kwargs] = _field(
        {}, "keyword arguments of an imported model factory", allowed="a JSON object ({} = none)"
    )
    buffers: Annotated[Literal["average", "local"], Choice] = _field(
        "average",
        "the model's buffers (BatchNorm statistics): average (sent raw with every model and upload, averaged "
        "over the uploads like FedAvg) or local (each worker keeps its own, FedBN; the master evaluates with "
        "the initial ones)",
    )
    lr: Annotated[float, Float] = _field(1e-3, "master Adam step size", gt=0)
    l2: Annotated[float, Float] = _field(5e-4, "L2 coefficient cl", ge=0)
    local_steps: Annotated[int, Int] = _field(
        0, "local SGD steps per round (docs/algorithm.md, Local training)", note="0 = one gradient", ge=0
    )
    local_epochs: Annotated[int, Int] = _field(0, "local epochs per round (sets local_steps)", ge=0)
    local_lr: Annotated[float, Float] = _field(0.0, "local SGD step size", note="0 = lr", ge=0)

    @model_validator(mode="after")
    def _one_local_length(self) -> ModelSection:
        if self.local_steps > 0 and self.local_epochs > 0:
            raise ValueError("config keys 'model.local_steps' and 'model.local_epochs': set one, not both")
        return self


class FlqAlgorithmSection(_Section):
    """``flq_algorithm``: the uplink scheme, bit widths and the aggregate's scaling."""

    mode: Annotated[Literal[MODES], Choice] = _field(  # type: ignore[valid-type]
        compressors.DEFAULT_MODE,
        "uplink scheme: " + "; ".join(f"{s.name}: {s.summary}" for s in compressors.UPLINK.values()),
    )
    b_up: Annotated[int, Int] = _field(4, "uplink bits of the modes whose width is b_up", ge=1, le=compressors.MAX_BITS)
    b_down: Annotated[int, Int] = _field(8, "downlink bits", allowed="0, 32 (exact) or 1..16", ge=0, le=32)
    scale_by_selected: Annotated[bool, Bool] = _field(True, "scale the aggregate by m_sel / sel_ref")
    sel_ref: Annotated[float, Float] = _field(1.0, "reference count of scale_by_selected", ge=1)
    clip_global: Annotated[float, Float] = _field(0.0, "clip the aggregate's norm", note="0 = off", ge=0)
    entropy_coding: Annotated[Literal["both", "up", "down", "none"], Choice] = _field(
        "both",
        "which links send entropy-coded vectors (wire format 2, zstd); the uplink budget charges their real size",
    )
    adaptive_width: Annotated[bool, Bool] = _field(
        False,
        "mode bbit, b_up >= 3: each worker picks its uplink width in 2..b_up per round, weighing the error "
        "each width adds against the bits it costs under up_budget_bits (docs/algorithm.md, Adaptive width)",
    )

    width_error_weight: Annotated[float, Float] = _field(
        4.0,
        "adaptive width: how much a width's quantization error weighs against its bits "
        "(docs/algorithm.md, Adaptive width)",
        gt=0,
    )

    @model_validator(mode="after")
    def _bits_fit_mode(self) -> FlqAlgorithmSection:
        if not (self.b_down in (0, 32) or 1 <= self.b_down <= compressors.MAX_BITS):
            raise ValueError(
                f"config key 'flq_algorithm.b_down': got {self.b_down}, expected 0, 32 (exact) "
                f"or 1..{compressors.MAX_BITS}"
            )
        scheme = compressors.uplink(self.mode)
        problem = scheme.check_bits(self.b_up)
        if problem:
            raise ValueError(f"config key 'flq_algorithm.b_up': {problem}, got {self.b_up}")
        if self.adaptive_width and scheme.fixed_bits is not None:
            raise ValueError(
                f"config key 'flq_algorithm.adaptive_width': mode {self.mode} always sends {scheme.fixed_bits} "
                f"bits; adaptive width needs a mode whose width is b_up (bbit) and b_up >= {scheme.min_bits + 1}"
            )
        if self.adaptive_width and self.b_up <= scheme.min_bits:
            raise ValueError(
                f"config key 'flq_algorithm.adaptive_width': b_up {self.b_up} leaves one width to choose "
                f"({scheme.min_bits}..{self.b_up}); set b_up >= {scheme.min_bits + 1}"
            )
        if scheme.sets_b_up:
            # the seed's "b forced to 1" of the binary mode (the model may be frozen: Config is)
            object.__setattr__(self, "b_up", scheme.bits(self.b_up))
        return self


class LazySelectionSection(_Section):
    """``lazy_selection``: the lazy rule (docs/algorithm.md, "One round", step 4)."""

    D: Annotated[int, Int] = _field(10, "history depth", ge=0)
    ck: Annotated[float, Float] = _field(0.8, "history energy weight", ge=0)
    C: Annotated[float, Float] = _field(1e9, "max lazy clock", ge=0)
    warmup: Annotated[int, Int] = _field(0, "rounds that always upload", ge=0)
    thr_scale: Annotated[float, Float] = _field(0.0, "lazy threshold scale", note="0 = never skip", ge=0)


class BudgetSelectionSection(_Section):
    """``budget_selection``: how many uploads a round takes (step 6)."""

    sel_clients: Annotated[int, Int] = _field(0, "fixed number of uploads per round", note="0 = by budget", ge=0)
    up_budget_bits: Annotated[float, Float] = _field(17e6, "uplink bits per round", note="0 = no budget", ge=0)


class JetsonOptimizationSection(_Section):
    """``jetson_optimization``: the device's memory cap, precision and data loader."""

    gpu_memory_limit_mb: Annotated[int, Int] = _field(0, "cap on CUDA memory", note="0 = no cap", ge=0)
    enable_mixed_precision: Annotated[bool, Bool] = _field(False, "float16 autocast on CUDA")
    prefetch_size: Annotated[int, Int] = _field(2, "batches prefetched by the loader", ge=0)
    num_parallel_calls: Annotated[int, Int] = _field(2, "data loader workers", ge=0)


class LoggingSection(_Section):
    """``logging``: log level and where logs, spreadsheets and TensorBoard scalars go."""

    log_level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], pydantic.BeforeValidator(_choice(str.upper))] = (
        _field("INFO", "log level", alias="level")
    )
    log_dir: Annotated[str, Str] = _field("logs", "where logs go", allowed="a folder path")
    results_dir: Annotated[str, Str] = _field("results", "where spreadsheets go", allowed="a folder path")
    tensorboard_dir: Annotated[str, Str] = _field(
        "",
        "write TensorBoard scalars (accuracy, cross-entropy, loss, selected, bits) of each run into a folder of "
        "its own here (needs pip install 'flq-fed[tensorboard]')",
        allowed="a folder path ('' = none)",
    )


#: The sections of ``flq_config.json``, in file order.
SECTIONS: Dict[str, Type[_Section]] = {
    "system": SystemSection,
    "dataset": DatasetSection,
    "model": ModelSection,
    "flq_algorithm": FlqAlgorithmSection,
    "lazy_selection": LazySelectionSection,
    "budget_selection": BudgetSelectionSection,
    "jetson_optimization": JetsonOptimizationSection,
    "logging": LoggingSection,
}


class ConfigFile(_Section):
    """``flq_config.json`` in its sectioned layout (what ``/config`` and the
    register reply carry, secrets masked)."""

    system: SystemSection = SystemSection()
    dataset: DatasetSection = DatasetSection()
    model: ModelSection = ModelSection()
    flq_algorithm: FlqAlgorithmSection = FlqAlgorithmSection()
    lazy_selection: LazySelectionSection = LazySelectionSection()
    budget_selection: BudgetSelectionSection = BudgetSelectionSection()
    jetson_optimization: JetsonOptimizationSection = JetsonOptimizationSection()
    logging: LoggingSection = LoggingSection()


class Config(
    LoggingSection,
    JetsonOptimizationSection,
    BudgetSelectionSection,
    LazySelectionSection,
    FlqAlgorithmSection,
    ModelSection,
    DatasetSection,
    SystemSection,
):
    """All knobs of a run, flat: every section's fields (and cross-field
    checks) in one frozen object. Defaults are the original experiments'
    (docs/algorithm.md, "Defaults of the original experiments")."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    # ----- derived values -------------------------------------------------
    @property
    def uplink_bits(self) -> int:
        """Bits per element of an upload in this run's mode (compressor table)."""
        return compressors.uplink(self.mode).bits(self.b_up)

    @property
    def downlink_bits(self) -> int:
        """Bits per element the workers receive (32 when b_down is 0 or 32)."""
        return compressors.downlink_bits(self.b_down)

    @property
    def uplink_widths(self) -> Tuple[int, ...]:
        """The widths an upload may have: ``min_bits..b_up`` with
        ``adaptive_width``, else ``(uplink_bits,)``."""
        if self.adaptive_width:
            return tuple(range(compressors.uplink(self.mode).min_bits, self.b_up + 1))
        return (self.uplink_bits,)

    @property
    def links(self) -> str:
        """The mode and its links in words, for start-up lines:
        ``"bbit (b_up 2..8 adaptive, b_down 8, entropy coding both)"``."""
        b_up = f"{self.uplink_widths[0]}..{self.b_up} adaptive" if self.adaptive_width else str(self.uplink_bits)
        return f"{self.mode} (b_up {b_up}, b_down {self.downlink_bits}, entropy coding {self.entropy_coding})"

    @property
    def dataset_tag(self) -> str:
        """The dataset's name as it goes into file names: a built-in name, or
        an import path with every character but letters, digits and ``_``
        made ``_`` (``mydata.cifar:load`` -> ``mydata_cifar_load``)."""
        return re.sub(r"[^A-Za-z0-9_]", "_", self.dataset)

    @property
    def coding_up(self) -> bool:
        """Whether uploads are entropy-coded (wire format 2)."""
        return self.entropy_coding in ("both", "up")

    @property
    def coding_down(self) -> bool:
        """Whether downlinks are entropy-coded (wire format 2)."""
        return self.entropy_coding in ("both", "down")

    @property
    def needed_workers(self) -> int:
        """``min_workers``, with 0 meaning all ``total_workers``."""
        return self.min_workers or self.total_workers

    def steps_per_round(self, partition_size: int) -> int:
        """Local steps ``s`` (docs/algorithm.md, Local training); 1 = one gradient."""
        if self.local_epochs > 0:
            return self.local_epochs * -(-partition_size // self.batch_size)
        return max(self.local_steps, 1)

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` (flat names), validated like a file.

        Raises:
            ConfigError: a bad value or an inconsistent result.
        """
        return build({name: coerce(name, value) for name, value in changes.items()}, base=self)

    def to_sections(self) -> Dict[str, Dict[str, Any]]:
        """The config in the sectioned layout of ``flq_config.json``."""
        return {sec: {key: getattr(self, name) for key, name in _KEYS[sec].items()} for sec in SECTIONS}

    def public_sections(self) -> Dict[str, Dict[str, Any]]:
        """:meth:`to_sections` with secrets (``auth_token``) masked: what goes into
        spreadsheets, checkpoints and answers to workers."""
        out = self.to_sections()
        if out["system"]["auth_token"]:
            out["system"]["auth_token"] = "<set>"
        return out

    def to_flat(self) -> Dict[str, Any]:
        """``{flat key: value}`` of every field, in file order."""
        return {name: getattr(self, name) for sec in SECTIONS for name in _KEYS[sec].values()}


#: ``{section: {key in the file: flat name}}``.
_KEYS: Dict[str, Dict[str, str]] = {
    sec: {(f.alias or name): name for name, f in model.model_fields.items()} for sec, model in SECTIONS.items()
}
_FIELDS: Dict[str, Tuple[str, str, FieldInfo]] = {
    name: (sec, key, SECTIONS[sec].model_fields[name]) for sec, keys in _KEYS.items() for key, name in keys.items()
}
_ADAPTERS: Dict[str, TypeAdapter] = {}
#: Flat aliases: the original README's and the paper's other names.
ALIASES = {
    "iters": "max_rounds",
    "rounds": "max_rounds",
    "workers": "total_workers",
    "M": "total_workers",
    "cl": "l2",
    "b": "b_up",
}


_KIND_WORDS: Dict[Any, str] = {int: "an integer", float: "a number", bool: "true/false, 1/0 or yes/no"}
_METAVARS: Dict[Any, str] = {int: "INT", float: "FLOAT", bool: "BOOL", Dict[str, Any]: "JSON"}


def allowed(name: str) -> str:
    """What field ``name`` accepts, in words, from its declared type and bounds."""
    sec, key, f = _FIELDS[name]
    extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
    if extra.get("allowed"):
        return str(extra["allowed"])
    ann = f.annotation
    choices = getattr(ann, "__args__", None) if getattr(ann, "__origin__", None) is Literal else None
    if choices:
        text = "one of " + ", ".join(choices)
    else:
        lo = hi = None
        for m in f.metadata:
            if isinstance(m, annotated_types.Ge):
                lo = _num(m.ge)
            elif isinstance(m, annotated_types.Gt):
                lo = f"> {_num(m.gt)}"
            elif isinstance(m, annotated_types.Le):
                hi = "a week" if m.le == WEEK_S else _num(m.le)
        kind = _KIND_WORDS.get(ann, "a string")
        if ann is float and extra.get("note") == "seconds":
            kind = "seconds"
        if lo is not None and hi is not None and not lo.startswith(">") and ann is int:
            text = f"{kind} {lo}..{hi}"
        else:
            parts = [
                p
                for p in (
                    (f"> {lo[2:]}" if lo and lo.startswith(">") else f">= {lo}") if lo else "",
                    f"at most {hi}" if hi else "",
                )
                if p
            ]
            text = f"{kind}, {' and '.join(parts)}" if parts else kind
    note = extra.get("note")
    return f"{text} ({note})" if note and note != "seconds" else text


def _num(v: Any) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def coerce(name: str, value: Any, where: str = "") -> Any:
    """Convert and validate one value for field ``name`` (a flat name).

    Raises:
        ConfigError: naming ``where`` (the key as written; default
            ``section.key``) and what is allowed.
    """
    sec, key, f = _FIELDS[name]
    adapter = _ADAPTERS.get(name)
    if adapter is None:
        adapter = _ADAPTERS[name] = TypeAdapter(Annotated[(f.annotation, *f.metadata)])
    try:
        return adapter.validate_python(value)
    except pydantic.ValidationError:
        raise ConfigError(f"config key '{where or f'{sec}.{key}'}': got {value!r}, expected {allowed(name)}") from None


def _resolve_flat(key: str) -> Optional[str]:
    key = ALIASES.get(key, key)
    return key if key in _FIELDS else None


def parse_mapping(data: Mapping[str, Any], source: str = "config") -> Dict[str, Any]:
    """Flatten a sectioned or flat mapping to ``{flat name: value}``, validating keys.

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
                name = _KEYS[key].get(sub)
                if name is None:
                    raise ConfigError(
                        f"{source}: unknown key {key + '.' + sub!r} (allowed in '{key}': {', '.join(_KEYS[key])})"
                    )
                put(name, v, f"{key}.{sub}")
            continue
        name = _resolve_flat(key)
        if name is None:
            raise ConfigError(
                f"{source}: unknown key {key!r} (sections: {', '.join(SECTIONS)}; "
                f"or a flat key such as total_workers, batch_size, mode)"
            )
        put(name, value, key)
    return values


def build(values: Mapping[str, Any], base: Optional[Config] = None) -> Config:
    """A :class:`Config` from validated values (flat names) over ``base``,
    with the sections' cross-field checks.

    Raises:
        ConfigError: inconsistent settings (min_workers > total_workers,
            both local_steps and local_epochs, a b_up the mode cannot send).
            A mode with a fixed width records it as ``b_up`` (bin: 1).
    """
    merged = (base or Config()).to_flat()
    merged.update(values)
    try:
        return Config.model_validate(merged)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        msg = str(err.get("ctx", {}).get("error", "") or err["msg"])
        if err["loc"]:
            sec, key, _ = _FIELDS[str(err["loc"][0])]
            msg = f"config key '{sec}.{key}': got {err.get('input')!r}, expected {allowed(str(err['loc'][0]))}"
        raise ConfigError(msg.splitlines()[0]) from None


class _RepeatedKey(ValueError):
    pass


def _no_repeated_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    """``json.loads`` hook: a key given twice in one object is a mistake (the
    second would silently win), not a setting."""
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _RepeatedKey(key)
        out[key] = value
    return out


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
            data = json.loads(text, object_pairs_hook=_no_repeated_keys)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
        except RecursionError:
            raise ConfigError(f"{p}: JSON nested too deeply") from None
        except _RepeatedKey as exc:
            raise ConfigError(f"{p}: key {exc.args[0]!r} appears twice in the same object; keep one") from None
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
    """``(flat name, default, metavar, help)`` of every field in file order,
    for the command-line flags and ``--help`` (metavar: ``INT``, ``FLOAT``,
    ``BOOL``, ``STR`` or the choices as ``{a,b}``)."""
    out = []
    for sec, keys in _KEYS.items():
        for key, name in keys.items():
            f = _FIELDS[name][2]
            choices = (
                getattr(f.annotation, "__args__", ()) if getattr(f.annotation, "__origin__", None) is Literal else ()
            )
            kind = "{" + ",".join(choices) + "}" if choices else _METAVARS.get(f.annotation, "STR")
            out.append((name, f.default, kind, f"{f.description} [{sec}.{key}; {allowed(name)}]"))
    return out


def check_paths(cfg: Config) -> None:
    """Raise ConfigError for a ``data_dir`` that does not exist (checked where
    the data is read, so a worker can use its own)."""
    if cfg.data_dir and not Path(cfg.data_dir).is_dir():
        raise ConfigError(f"config key 'dataset.data_dir': no such folder {cfg.data_dir!r}")
