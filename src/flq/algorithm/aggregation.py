"""Aggregation of the selected updates and the master's Adam step
(SPEC.md, "State" and "One round", step 9)."""
from __future__ import annotations

from typing import Dict, Mapping

import numpy as np

from .vector import squared_norm


def aggregate(updates: Mapping[int, np.ndarray], scale_by_selected: bool, sel_ref: float,
              clip_global: float) -> np.ndarray:
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
    ``m_hat``, ``v_hat``. Defaults as SPEC.md: beta1 0.9, beta2 0.999, eps 1e-7.
    """

    def __init__(self, n: int, lr: float, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-7) -> None:
        self.lr, self.beta1, self.beta2, self.eps = float(lr), beta1, beta2, eps
        self.m = np.zeros(n, np.float32)
        self.v = np.zeros(n, np.float32)
        self.t = 0

    def step(self, theta: np.ndarray, grad: np.ndarray) -> None:
        """Update ``theta`` (float32, shape (n,)) in place with gradient ``grad``."""
        self.t += 1
        # 1 - beta computed in float64 then rounded: float32(1) - float32(0.999)
        # is 0.0009999871, a 1.3e-5 error that bias correction never cancels.
        self.m *= np.float32(self.beta1)
        self.m += np.float32(1.0 - self.beta1) * grad
        self.v *= np.float32(self.beta2)
        self.v += np.float32(1.0 - self.beta2) * (grad * grad)
        step = np.float32(self.lr / (1.0 - self.beta1 ** self.t))
        denom = np.sqrt(self.v / np.float32(1.0 - self.beta2 ** self.t))
        denom += np.float32(self.eps)
        theta -= step * self.m / denom

    def state_dict(self) -> Dict[str, object]:
        """Plain dict of the moments and step count (arrays are copies)."""
        return {"m": self.m.copy(), "v": self.v.copy(), "t": self.t, "lr": self.lr}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        self.m = np.array(state["m"], np.float32, copy=True)
        self.v = np.array(state["v"], np.float32, copy=True)
        self.t = int(state["t"])
        self.lr = float(state["lr"])
