"""Aggregation of the selected updates and the master's Adam step
(docs/algorithm.md, "State" and "One round", step 9)."""

from __future__ import annotations

from typing import Any, Dict, Mapping

import numpy as np

from .vector import squared_norm

#: Largest |value| an update may hold: its square (1e36) stays far below
#: float32's 3.4e38 in Adam's second moment. A worker whose update exceeds it
#: has diverged; the master refuses an upload that does. The aggregate of
#: several such updates can still overflow: :meth:`Adam.step` guards that.
MAX_UPDATE_MAGNITUDE = 1e18


def usable_update(g: np.ndarray, loss: float) -> bool:
    """Whether a worker's local result can be sent: a finite loss and an
    update ``g`` (float32 (n,)) of finite values below
    :data:`MAX_UPDATE_MAGNITUDE` in magnitude."""
    if not np.isfinite(loss):
        return False
    with np.errstate(invalid="ignore"):
        peak = float(np.max(np.abs(g))) if g.size else 0.0
    return bool(np.isfinite(peak)) and peak < MAX_UPDATE_MAGNITUDE


def aggregate(
    updates: Mapping[int, np.ndarray], scale_by_selected: bool, sel_ref: float, clip_global: float
) -> np.ndarray:
    """``g_hat`` from the selected workers' reconstructed updates ``q``.

    ``g_hat = sum(q) / m_sel``; times ``m_sel / sel_ref`` if
    ``scale_by_selected``; rescaled to norm ``clip_global`` when that is > 0
    and exceeded. Summed in worker-id order in float32, so the result is the
    same whatever order the uploads arrived in.

    Args:
        updates: worker id -> float32 vector (n,); at least one.

    Raises:
        ValueError: no updates.
    """
    if not updates:
        raise ValueError("aggregate needs at least one selected update")
    ids = sorted(updates)
    total = np.array(updates[ids[0]], dtype=np.float32, copy=True)
    for m in ids[1:]:
        total += updates[m]
    m_sel = len(ids)
    factor = 1.0 / m_sel
    if scale_by_selected:
        factor *= m_sel / float(sel_ref)
    total *= np.float32(factor)
    if clip_global > 0:
        norm = squared_norm(total) ** 0.5
        if norm > clip_global:
            total *= np.float32(clip_global / norm)
    return total


class Adam:
    """Adam on a flat float32 parameter vector (Kingma and Ba, 2015).

    ``m = b1 m + (1-b1) g``; ``v = b2 v + (1-b2) g^2``;
    ``theta -= lr * m_hat / (sqrt(v_hat) + eps)`` with bias-corrected
    ``m_hat``, ``v_hat``. Defaults as docs/algorithm.md: beta1 0.9, beta2 0.999, eps 1e-7.
    """

    def __init__(self, n: int, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-7) -> None:
        self.lr, self.beta1, self.beta2, self.eps = float(lr), beta1, beta2, eps
        self.m = np.zeros(n, np.float32)
        self.v = np.zeros(n, np.float32)
        self.t = 0

    def step(self, theta: np.ndarray, grad: np.ndarray) -> None:
        """Update ``theta`` (float32, shape (n,)) in place with gradient ``grad``.

        The step is all or nothing: the new moments and model are computed
        first and kept only when every value is finite.

        Raises:
            FloatingPointError: the step would make the gradient's square, a
                moment or the model non-finite (float32 overflows past
                3.4e38, so an aggregate of magnitude 1.8e19 already does);
                ``theta`` and the optimizer state are then unchanged.
        """
        t = self.t + 1
        with np.errstate(over="ignore", invalid="ignore"):
            # 1 - beta computed in float64 then rounded: float32(1) - float32(0.999)
            # is 0.0009999871, a 1.3e-5 error that bias correction never cancels.
            m = self.m * np.float32(self.beta1)
            m += np.float32(1.0 - self.beta1) * grad
            v = self.v * np.float32(self.beta2)
            v += np.float32(1.0 - self.beta2) * (grad * grad)
            step = np.float32(self.lr / (1.0 - self.beta1**t))
            denom = np.sqrt(v / np.float32(1.0 - self.beta2**t))
            denom += np.float32(self.eps)
            new_theta = theta - step * m / denom
        bad = [
            name
            for name, a in (
                ("the gradient", grad),
                ("the first moment", m),
                ("the second moment", v),
                ("the model", new_theta),
            )
            if not np.isfinite(a).all()
        ]
        if bad:
            finite = grad[np.isfinite(grad)]
            peak = float(np.abs(finite).max()) if finite.size else float("nan")
            raise FloatingPointError(
                f"Adam step {t} not taken: it would make {', '.join(bad)} non-finite "
                f"(largest finite |gradient| {peak:.3g}; float32 squares overflow "
                f"above 1.8e19)"
            )
        self.m, self.v, self.t = m, v, t
        theta[...] = new_theta

    def state_dict(self) -> Dict[str, Any]:
        """Plain dict of the moments and step count (arrays are copies)."""
        return {"m": self.m.copy(), "v": self.v.copy(), "t": self.t, "lr": self.lr}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.m = np.array(state["m"], np.float32, copy=True)
        self.v = np.array(state["v"], np.float32, copy=True)
        self.t = int(state["t"])
        self.lr = float(state["lr"])
