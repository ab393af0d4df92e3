"""The model (docs/algorithm.md, "Model") and its flat-vector view.

The global model travels as ONE float32 vector of length n: the trainable
tensors flattened in model order (the order and layout of ``state_dict()``,
i.e. conv weights as OIHW). :class:`FlatModel` moves between that vector and
the PyTorch module, and computes the minibatch gradient (docs/algorithm.md, step 3)
and the test-set metrics (step 10).
"""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .algorithm.vector import squared_norm
from .layout import LayoutError, ModelLayout, TensorSpec
from .streams import init_generator

log = logging.getLogger(__name__)


class CNN(nn.Module):
    """conv3x3(32, same) relu, conv3x3(32) relu, maxpool2, conv3x3(64) relu,
    conv3x3(64) relu, maxpool2, flatten, dense(128) relu, dense(10) logits.

    Input float32 (B, 1, 28, 28) in [0, 1]; output logits (B, 10).
    467,818 parameters (all convolutions "same"-padded, as the count implies).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        x = F.max_pool2d(F.relu(self.conv4(x)), 2)
        # flatten in (C, H, W) order whatever the memory format
        x = torch.flatten(x.contiguous(), 1)
        return self.fc2(F.relu(self.fc1(x)))


class MLP(nn.Module):
    """A small test model: flatten, dense(64) relu, dense(10) logits;
    50,890 parameters. For load tests and quick experiments, not docs/algorithm.md's model."""

    def __init__(self, in_features: int = 28 * 28, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


MODELS = {"cnn": CNN, "mlp": MLP}


def build_model(name: str = "cnn", args: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """The model called ``name``: ``"cnn"`` (docs/algorithm.md, 467,818
    parameters), ``"mlp"`` (a 50,890-parameter test model), or
    ``"package.module:factory"``, a callable returning a ``torch.nn.Module``,
    called with the keyword arguments ``args`` (``model.model_args``).

    Raises:
        flq.config.ConfigError: unknown name, a factory that cannot be
            imported, fails, or returns no module; arguments a built-in
            model does not take; a module FLQ cannot train (a frozen
            parameter, a parameter that is not float32/float16/bfloat16, a
            bfloat16 or complex buffer, two names for one tensor).
    """
    from .config import ConfigError
    from .imports import is_import_path, load_callable

    args = dict(args or {})
    if name in MODELS:
        factory: Any = MODELS[name]
    elif is_import_path(name):
        factory = load_callable(name, "model.name")
    else:
        raise ConfigError(f"config key 'model.name': unknown model {name!r} (cnn, mlp, or package.module:factory)")
    try:
        module = factory(**args)
    except SystemExit as exc:
        raise ConfigError(f"config key 'model.name': {name}(**{args}) called sys.exit({exc.code!r})") from None
    except Exception as exc:  # noqa: BLE001 - the user's factory: any failure is theirs, in one line
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(f"config key 'model.name': {name}(**{args}) failed: {type(exc).__name__}: {first}") from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"config key 'model.name': {name} returned {type(module).__name__}, not a torch.nn.Module")
    try:
        layout_of(module)  # refuse what FLQ cannot train now, in one line
    except LayoutError as exc:
        raise ConfigError(f"config key 'model.name': {name}: {exc}") from None
    return module


def layout_of(module: nn.Module) -> ModelLayout:
    """The :class:`~flq.layout.ModelLayout` of ``module``: every entry of its
    ``state_dict()`` in order, parameters and buffers told apart.

    Raises:
        flq.layout.LayoutError: a parameter with ``requires_grad=False``
            (FLQ trains every parameter; register a constant as a buffer),
            or a tensor the layout refuses (see :class:`~flq.layout.ModelLayout`).
    """
    params = {id(p): name for name, p in module.named_parameters()}
    if not params:
        raise LayoutError("the model has no parameters: nothing to train")
    for name, p in module.named_parameters():
        if p.numel() == 0:
            raise LayoutError(f"parameter {name!r} has no elements (shape {list(p.shape)})")
        if not p.requires_grad:
            raise LayoutError(
                f"parameter {name!r} has requires_grad=False: FLQ trains every parameter; register a constant "
                f"as a buffer instead"
            )
    state = module.state_dict(keep_vars=True)
    param_names = set(params.values())
    for k, v in state.items():
        if isinstance(v, nn.Parameter) and k not in param_names:
            raise LayoutError(f"parameter {k!r} is the same tensor as another one (shared weights): not supported")
    if sum(1 for k in state if k in param_names) != len(param_names):
        raise LayoutError("the module's parameters do not all appear in its state_dict() (renamed tensors)")
    return ModelLayout(
        tuple(
            TensorSpec(k, tuple(int(d) for d in v.shape), str(v.dtype).replace("torch.", ""), k in param_names)
            for k, v in state.items()
        )
    )


def glorot_init(model: nn.Module, seed: int) -> np.ndarray:
    """Glorot-uniform weights, zero biases, from ``seed`` (the generator is
    :func:`flq.streams.init_generator`); returns the flat float32 vector (n,)
    of the initialized model (the round-0 global model of the built-in models)."""
    gen = init_generator(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p, generator=gen)
            else:
                p.zero_()
    return flatten(model)


def initial_state(name: str, args: Optional[Mapping[str, Any]], seed: int) -> Tuple[np.ndarray, Tuple[np.ndarray, ...]]:
    """The round-0 global model: ``(theta float32 (n,), buffers)``.

    Raises:
        flq.config.ConfigError: the model cannot be built, or its initial
            parameters are not finite.

    The built-in models start Glorot-uniform from ``seed`` (as the original);
    an imported model keeps its own initialization, made with PyTorch's CPU
    generator seeded with ``seed`` while the factory runs (the global
    generator's state is restored after), so every process builds the same
    one. Buffers start as the module made them.
    """
    if name in MODELS:
        module = build_model(name, args)
        theta = glorot_init(module, seed)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = build_model(name, args)
        theta = flatten(module)
    if not np.isfinite(theta).all():
        from .config import ConfigError

        raise ConfigError(f"config key 'model.name': {name}'s initial parameters hold NaN or infinity")
    return theta, buffers_of(module)


def buffers_of(module: nn.Module) -> Tuple[np.ndarray, ...]:
    """The module's buffers as NumPy arrays (copies, ``state_dict()`` order and dtypes)."""
    params = {name for name, _ in module.named_parameters()}
    return tuple(v.detach().cpu().numpy().copy() for k, v in module.state_dict().items() if k not in params)


def segments(model: nn.Module) -> Tuple[int, ...]:
    """Element count of each trainable tensor, in model order."""
    return tuple(p.numel() for p in model.parameters() if p.requires_grad)


def flatten(model: nn.Module) -> np.ndarray:
    """The parameters as one float32 NumPy vector (n,), in ``state_dict()`` order."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        return (
            torch.cat([params[t.name].detach().reshape(-1).cpu().float() for t in layout_of(model).params])
            .numpy()
            .astype(np.float32)
        )


def cuda_oom_error(exc: BaseException) -> RuntimeError:
    """A one-line error for running out of (capped) CUDA memory."""
    first = str(exc).splitlines()[0] if str(exc) else "out of memory"
    return RuntimeError(
        f"CUDA out of memory ({first}); lower dataset.batch_size or system.eval_batch_size, "
        f"or raise jetson_optimization.gpu_memory_limit_mb"
    )


def apply_memory_cap(device: torch.device, limit_mb: int) -> Optional[float]:
    """Cap this process's CUDA memory at ``limit_mb`` MiB (0 = no cap) as a
    fraction of the device's total; allocations beyond it raise
    ``torch.cuda.OutOfMemoryError`` instead of taking more. Returns the
    fraction set, or None (CPU or no cap)."""
    if device.type != "cuda" or limit_mb <= 0:
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, limit_mb * 1024 * 1024 / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without CUDA raises.

    Raises:
        RuntimeError: ``cuda`` asked for but not available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but PyTorch sees no CUDA device (use device auto or cpu)")
    return torch.device(name)


class FlatModel:
    """A model driven through flat float32 vectors.

    With ``channels_last`` (the built-in models) convolutions run
    channels-last, the fast layout for oneDNN on CPU; the flat vector stays
    in the standard OIHW model order. A user's model runs in the layout it
    was written for: PyTorch 2.13's CPU backward crashed (a segmentation
    fault) on a channels-last ResNet block with 4 channels.

    Mixed precision (CUDA only): forward and backward run under float16
    autocast with dynamic loss scaling (scale 2^16, halved and the step
    recomputed on overflow, doubled after 2000 clean steps); the gradient is
    unscaled into float32, so quantization, packing and the optimizer never
    see float16.

    Args:
        model: the module (moved to ``device``).
        device: where to compute.
        mixed_precision: float16 autocast + loss scaling; ignored on CPU.
        channels_last: run channels-last (default: for the built-in models only).
    """

    def __init__(
        self,
        model: nn.Module,
        device: Optional[torch.device] = None,
        mixed_precision: bool = False,
        channels_last: Optional[bool] = None,
    ) -> None:
        self.device: torch.device = device if device is not None else torch.device("cpu")
        self.mixed_precision = bool(mixed_precision) and self.device.type == "cuda"
        self.loss_scale = 2.0**16
        self._clean_steps = 0
        self.layout = layout_of(model)
        self.channels_last = isinstance(model, (CNN, MLP)) if channels_last is None else bool(channels_last)
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = model.to(device=self.device, memory_format=layout)  # type: ignore[call-overload]
        named = dict(self.model.named_parameters())
        self.params: List[nn.Parameter] = [named[t.name] for t in self.layout.params]
        state = self.model.state_dict(keep_vars=True)
        self.buffer_tensors: List[torch.Tensor] = [state[t.name] for t in self.layout.buffers]
        self.segments = self.layout.segments
        self.n = self.layout.n
        self._offsets = np.cumsum((0,) + self.segments)

    def set_flat(self, theta: np.ndarray) -> None:
        """Load the flat vector ``theta`` (float32, (n,)) into the module
        (each parameter cast to its own dtype)."""
        if theta.shape != (self.n,):
            raise ValueError(f"flat vector has shape {theta.shape}, model needs ({self.n},)")
        src = torch.from_numpy(np.ascontiguousarray(theta, dtype=np.float32))
        with torch.no_grad():
            for p, a, b in zip(self.params, self._offsets[:-1], self._offsets[1:]):
                p.copy_(src[a:b].view(p.shape))

    def set_buffers(self, buffers) -> None:
        """Load the buffers (NumPy arrays, ``state_dict()`` order and dtypes) into the module."""
        with torch.no_grad():
            for t, b in zip(self.buffer_tensors, buffers):
                t.copy_(torch.from_numpy(np.array(b, copy=True)).reshape(t.shape))

    def get_buffers(self) -> Tuple[np.ndarray, ...]:
        """The module's buffers now, as NumPy copies (``state_dict()`` order and dtypes)."""
        return tuple(t.detach().cpu().numpy().copy() for t in self.buffer_tensors)

    def _batch(self, x: np.ndarray) -> torch.Tensor:
        if not x.flags.writeable:  # the cached dataset is read-only; torch wants to own writable memory
            x = x.copy()
        t = torch.from_numpy(x).to(self.device, non_blocking=True)
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 and self.channels_last else t

    def gradient(self, x, y) -> Tuple[np.ndarray, float]:
        """Mean cross-entropy and its gradient at the loaded parameters.

        Args:
            x: float32 (B, 1, 28, 28) array or tensor; y: int64 (B,) array or tensor.

        Returns:
            (gradient as float32 (n,) in model order, loss as float).

        Raises:
            RuntimeError: out of CUDA memory (names the memory cap setting).
        """
        if isinstance(x, np.ndarray):
            x = self._batch(x)
        if isinstance(y, np.ndarray):
            y = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(self.device)
        self.model.train()
        try:
            if not self.mixed_precision:
                loss = F.cross_entropy(self.model(x), y)
                grads = _grads(loss, self.params)
            else:
                loss, grads = self._scaled_gradient(x, y)
        except torch.cuda.OutOfMemoryError as exc:
            raise cuda_oom_error(exc) from None
        flat = torch.cat([g.reshape(-1).float() for g in grads]).cpu().numpy()
        return flat, float(loss.item())

    def _scaled_gradient(self, x: torch.Tensor, y: torch.Tensor):
        for _ in range(40):
            with torch.autocast(device_type="cuda", dtype=torch.float16):
                loss = F.cross_entropy(self.model(x), y)
            scaled = _grads(loss.float() * self.loss_scale, self.params)
            grads = [g.float() / self.loss_scale for g in scaled]
            if all(bool(torch.isfinite(g).all()) for g in grads):
                self._clean_steps += 1
                if self._clean_steps >= 2000:
                    self.loss_scale, self._clean_steps = self.loss_scale * 2.0, 0
                return loss.float(), grads
            self.loss_scale, self._clean_steps = max(self.loss_scale / 2.0, 1.0), 0
        raise RuntimeError(
            "mixed precision: gradient not finite even at loss scale 1 (disable "
            "jetson_optimization.enable_mixed_precision)"
        )

    def evaluate(
        self, x: torch.Tensor, y: torch.Tensor, batch_size: int, precision: str = "fp32"
    ) -> Tuple[float, float]:
        """(accuracy in [0, 1], mean cross-entropy in nats) on (x, y).

        Args:
            x: float32 tensor (N, ...) on this device (4-D images channels-last for the built-in models).
            y: int64 tensor (N,).
            batch_size: images per forward pass.
            precision: ``fp32``, or the autocast dtype of the forward pass:
                ``bf16`` (CPU or CUDA) or ``fp16`` (CUDA). The logits are
                taken back to float32 before the softmax and the argmax.

        Raises:
            ValueError: ``fp16`` on a CPU, or an unknown ``precision``.
            RuntimeError: out of CUDA memory (names the memory cap setting).
        """
        self.model.eval()
        correct = 0
        ce = 0.0
        amp = autocast(self.device, precision)
        try:
            with torch.inference_mode(), amp:
                for i in range(0, x.shape[0], batch_size):
                    logits = self.model(x[i : i + batch_size]).float()
                    yb = y[i : i + batch_size]
                    ce += float(F.cross_entropy(logits, yb, reduction="sum"))
                    correct += int((logits.argmax(1) == yb).sum())
        except torch.cuda.OutOfMemoryError as exc:
            raise cuda_oom_error(exc) from None
        return correct / x.shape[0], ce / x.shape[0]

    def prepare_eval_set(self, x: np.ndarray, y: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        """Move a test set to the device once, in the layout :meth:`evaluate` wants."""
        return self._batch(x), torch.from_numpy(np.array(y, dtype=np.int64)).to(self.device)


def _grads(loss: torch.Tensor, params: List[nn.Parameter]) -> List[torch.Tensor]:
    """d loss / d params; a parameter the forward pass did not use gets zeros."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def check_outputs(model: FlatModel, x: np.ndarray, num_classes: int) -> None:
    """Run the module on two samples (eval mode, no gradient) and raise
    ConfigError unless it returns logits (2, C) with C >= ``num_classes``
    (the labels are 0..num_classes-1): a model that does not fit its data
    is stopped before any round, in one line."""
    from .config import ConfigError

    model.model.eval()
    try:
        with torch.no_grad():
            out = model.model(model._batch(np.array(x[:2])))
    except Exception as exc:  # noqa: BLE001 - any failure of the user's forward on the data, in one line
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ConfigError(
            f"config key 'model.name': the model fails on samples of shape {list(x.shape[1:])}: "
            f"{type(exc).__name__}: {first}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(x[:2]):
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"config key 'model.name': the model returns {shape} for 2 samples; expected logits [2, C]")
    if out.shape[1] < num_classes:
        raise ConfigError(
            f"config key 'model.name': the model has {out.shape[1]} outputs but the labels go up to {num_classes - 1}"
        )


#: ``eval_precision`` -> the autocast dtype (None: plain float32).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` (``fp32``: a disabled one) on ``device``.

    Raises:
        ValueError: ``fp16`` on a CPU (PyTorch's CPU float16 kernels are
            reference code), or an unknown ``precision``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown eval_precision {precision!r} (fp32, bf16, fp16)")
    dtype = PRECISIONS[precision]
    if dtype is torch.float16 and device.type != "cuda":
        raise ValueError("eval_precision fp16 needs a CUDA device (on a CPU use bf16 or fp32)")
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware: a CUDA device of
    compute capability 8.0 (Ampere) or later, or a CPU with AVX512-BF16 or
    AMX (without them PyTorch emulates bfloat16 convolutions on CPU, about
    10 times slower than float32: benchmarks/eval_precision.py)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def l2_loss_and_grad(theta: np.ndarray, grad: np.ndarray, l2: float) -> float:
    """Add the L2 term's gradient ``cl * theta`` to ``grad`` in place and
    return ``(cl / 2) * ||theta||^2`` (docs/algorithm.md, step 3)."""
    if l2 == 0:
        return 0.0
    grad += np.float32(l2) * theta
    return 0.5 * l2 * squared_norm(theta)


def state_dict_from_flat(layout: ModelLayout, theta: np.ndarray, buffers=()) -> dict[str, torch.Tensor]:
    """``{state_dict key: tensor}`` of the model holding the flat vector
    ``theta`` (float32 (n,)) and ``buffers`` (NumPy arrays in order), every
    tensor in its own dtype and shape, CPU and contiguous: what ``GET
    /get_global_model`` sends and the results' ``.safetensors`` hold, loadable
    with ``model.load_state_dict(safetensors.torch.load_file(path))``.

    Raises:
        ValueError: ``theta`` or ``buffers`` do not fit ``layout``.
    """
    if theta.shape != (layout.n,):
        raise ValueError(f"flat vector has {theta.size} values, the model needs {layout.n}")
    layout.check_buffers(buffers)
    src = torch.from_numpy(np.array(theta, dtype=np.float32, copy=True))
    out, off, values = {}, 0, iter(buffers)
    for t in layout.tensors:
        if t.param:
            dtype = getattr(torch, t.dtype)
            out[t.name] = src[off : off + t.numel].view(t.shape).to(dtype).clone()
            off += t.numel
        else:
            out[t.name] = torch.from_numpy(np.array(next(values), copy=True))
    return out


def state_dict_bytes(tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """``tensors`` as the bytes of a safetensors file (what ``GET /get_global_model`` answers)."""
    from safetensors.torch import save

    return save(dict(tensors), metadata=dict(metadata) if metadata else None)


def save_global_model(path, tensors: Mapping[str, torch.Tensor], round_index: int, mode: str = "") -> None:
    """Write ``tensors`` (a state dict, :func:`state_dict_from_flat`) as a
    safetensors file with ``round`` (rounds completed) and ``mode`` in its
    metadata, atomically.

    Raises:
        OSError: the file cannot be written (nothing partial is left).
    """
    import safetensors
    from safetensors.torch import save_file

    from .outputs import atomic_write

    def write(tmp: Path) -> None:
        try:
            save_file(dict(tensors), str(tmp), metadata={"round": str(int(round_index)), "mode": mode, "format": "pt"})
        except safetensors.SafetensorError as exc:  # how safetensors reports a failed write
            found = re.search(r"os error (\d+)", str(exc))
            code = int(found.group(1)) if found else errno.EIO
            raise OSError(code, os.strerror(code), str(path)) from None

    atomic_write(Path(path), write)
