"""Training losses: MSE, MAE, log-cosh (LCL) and soft Dice.

Every loss is computed per output channel from additive *statistics* over the batch and the spatial
axes, so the same object gives the loss of a mini-batch and the exact loss over a whole validation set
(statistics summed over many slices):

* elementwise losses (mse, mae, lcl): stats = (sum of the elementwise loss, number of elements),
  value = sum / count;
* soft Dice: stats = (sum p*t, sum p, sum t), value = 1 - 2 sum(pt) / (sum(p) + sum(t) + eps).

Log-cosh uses the overflow-free form ``log cosh(e) = |e| + log1p(exp(-2|e|)) - log 2``: finite, with a
finite gradient (tanh-like, bounded by 1), for any finite error.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

LOG2 = math.log(2.0)


def log_cosh(e: torch.Tensor) -> torch.Tensor:
    """Elementwise log(cosh(e)), stable for large |e|."""
    a = e.abs()
    return a + torch.log1p(torch.exp(-2.0 * a)) - LOG2


_ELEMENTWISE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mse": lambda e: e * e,
    "mae": torch.abs,
    "lcl": log_cosh,
}


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [d for d in range(x.ndim) if d != 1]


class Loss:
    """A per-channel loss over (N, C, ...) tensors; calling it returns the mean over channels."""

    name: str

    def stats(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Additive statistics, shape (C, k)."""
        raise NotImplementedError

    def from_stats(self, stats: torch.Tensor) -> torch.Tensor:
        """Per-channel loss values, shape (C,)."""
        raise NotImplementedError

    def per_channel(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.from_stats(self.stats(pred, target))

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.per_channel(pred, target).mean()


class ElementwiseLoss(Loss):
    def __init__(self, name: str) -> None:
        self.name = name
        self._f = _ELEMENTWISE[name]

    def stats(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"shape mismatch {tuple(pred.shape)} vs {tuple(target.shape)}")
        dims = _reduce_dims(pred)
        s = self._f(pred - target).sum(dim=dims)
        n = torch.full_like(s, float(pred.numel() // pred.shape[1]))
        return torch.stack([s, n], dim=1)

    def from_stats(self, stats: torch.Tensor) -> torch.Tensor:
        return stats[:, 0] / stats[:, 1]


class SoftDiceLoss(Loss):
    """1 - 2 sum(pt) / (sum(p) + sum(t) + eps), over the batch and spatial axes, per channel.

    ``pred`` must already be in [0, 1] (the DICE network ends in a sigmoid).
    """

    name = "dice"

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps = float(eps)

    def stats(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"shape mismatch {tuple(pred.shape)} vs {tuple(target.shape)}")
        dims = _reduce_dims(pred)
        return torch.stack([(pred * target).sum(dim=dims), pred.sum(dim=dims), target.sum(dim=dims)], dim=1)

    def from_stats(self, stats: torch.Tensor) -> torch.Tensor:
        return 1.0 - 2.0 * stats[:, 0] / (stats[:, 1] + stats[:, 2] + self.eps)


def make_loss(name: str) -> Loss:
    """``mse``, ``mae``, ``lcl`` (log-cosh) or ``dice`` (soft Dice)."""
    key = name.lower()
    if key in _ELEMENTWISE:
        return ElementwiseLoss(key)
    if key == "dice":
        return SoftDiceLoss()
    raise ValueError(f"unknown loss {name!r}; one of mse, mae, lcl, dice")


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return make_loss("mse")(pred, target)


def mae(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return make_loss("mae")(pred, target)


def lcl(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return make_loss("lcl")(pred, target)


def soft_dice(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return SoftDiceLoss(eps)(pred, target)
