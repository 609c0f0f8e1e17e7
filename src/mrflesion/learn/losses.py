"""Training losses: MSE, MAE, log-cosh (LCL), soft Dice and the multi-task loss.

Every loss is computed per output channel from additive *statistics* over the batch and the spatial
axes, so the same object gives the loss of a mini-batch and the exact loss over a whole validation set
(statistics summed over many slices):

* elementwise losses (mse, mae, lcl): stats = (sum of the elementwise loss, number of elements),
  value = sum / count;
* soft Dice: stats = (sum p*t, sum p, sum t), value = 1 - (2 sum(pt) + s) / (sum(p) + sum(t) + s) with
  smoothing s = 1 (as in the Keras implementations of the method's time). The smoothing is what keeps
  the DICE-1 network from collapsing to "lesion everywhere": without it a batch without lesion voxels
  has the constant loss 1 and no gradient at all, so nothing ever pushes the background down, while
  the rare batches with lesion push every output up (through the shared bias) until the sigmoid
  saturates at 1, where the background gradient 2 sum(pt) / (sum(p) + sum(t))^2 is negligible. With
  s = 1 an empty batch has the loss sum(p) / (sum(p) + 1), minimised by predicting no lesion; with
  lesion voxels in the batch s changes the value by less than 1 / sum(t).

* multi-task (the recommended network): per output channel, log-cosh for the quantitative maps (T1,
  T2*) and binary cross-entropy from logits **plus** batch soft Dice for the probabilities (NAWM, GM,
  lesion); stats = (sum of the elementwise loss, count, sum p*t, sum p, sum t), with p = sigmoid(logit).
  Every channel has weight 1: in network units (T1 in s, T2* in 100 ms, probabilities) the log-cosh
  of a converged map is ~1e-3, the BCE of a tissue map ~0.1 and of the lesion channel ~0.01, while
  each Dice term lies in [0, 1]; the Dice term is what keeps the sparse lesion channel from settling
  on "no lesion anywhere" (the BCE alone is dominated by the ~99 % background voxels), the BCE term
  gives well-behaved gradients where the batch has no lesion at all (Dice alone is then flat).

Log-cosh uses the overflow-free form ``log cosh(e) = |e| + log1p(exp(-2|e|)) - log 2``: finite, with a
finite gradient (tanh-like, bounded by 1), for any finite error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

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
    """A per-channel loss over (N, C, ...) tensors; calling it returns the mean over channels.

    ``wants_logits``: the loss takes the network's raw outputs (``model(x, logits=True)``), not the
    outputs after the sigmoid."""

    name: str
    wants_logits: bool = False

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
    """1 - (2 sum(pt) + s) / (sum(p) + sum(t) + s), over the batch and spatial axes, per channel.

    ``pred`` must already be in [0, 1] (the DICE network ends in a sigmoid); ``smooth`` s (see the module
    docstring).
    """

    name = "dice"

    def __init__(self, smooth: float = 1.0) -> None:
        self.smooth = float(smooth)

    def stats(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"shape mismatch {tuple(pred.shape)} vs {tuple(target.shape)}")
        dims = _reduce_dims(pred)
        return torch.stack([(pred * target).sum(dim=dims), pred.sum(dim=dims), target.sum(dim=dims)], dim=1)

    def from_stats(self, stats: torch.Tensor) -> torch.Tensor:
        return 1.0 - (2.0 * stats[:, 0] + self.smooth) / (stats[:, 1] + stats[:, 2] + self.smooth)


class MultiTaskLoss(Loss):
    """Log-cosh on the regression channels, BCE (from logits) + soft Dice on the probability channels.

    ``probability``: one flag per output channel. ``pred`` are logits for the probability channels
    (the network's raw outputs), ``target`` in [0, 1] there.
    """

    name = "multitask"
    wants_logits = True

    def __init__(self, probability: Sequence[bool], smooth: float = 1.0) -> None:
        self.probability = tuple(bool(p) for p in probability)
        self.smooth = float(smooth)

    def stats(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"shape mismatch {tuple(pred.shape)} vs {tuple(target.shape)}")
        if pred.shape[1] != len(self.probability):
            raise ValueError(f"{pred.shape[1]} channels, loss set up for {len(self.probability)}")
        dims = _reduce_dims(pred)
        prob = torch.tensor(self.probability, device=pred.device).view(1, -1, *([1] * (pred.ndim - 2)))
        bce = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
        elem = torch.where(prob, bce, log_cosh(pred - target))
        p = torch.where(prob, torch.sigmoid(pred), torch.zeros_like(pred))
        t = torch.where(prob, target, torch.zeros_like(target))
        s = elem.sum(dim=dims)
        n = torch.full_like(s, float(pred.numel() // pred.shape[1]))
        return torch.stack([s, n, (p * t).sum(dim=dims), p.sum(dim=dims), t.sum(dim=dims)], dim=1)

    def from_stats(self, stats: torch.Tensor) -> torch.Tensor:
        value = stats[:, 0] / stats[:, 1]
        dice = 1.0 - (2.0 * stats[:, 2] + self.smooth) / (stats[:, 3] + stats[:, 4] + self.smooth)
        prob = torch.tensor(self.probability, device=stats.device)
        return torch.where(prob, value + dice, value)


def make_loss(name: str, outputs: Sequence[str] | None = None) -> Loss:
    """``mse``, ``mae``, ``lcl`` (log-cosh), ``dice`` (soft Dice) or ``multitask`` (needs ``outputs``:
    the probability outputs NAWM, GM, lesion get BCE + soft Dice, the others log-cosh)."""
    key = name.lower()
    if key in _ELEMENTWISE:
        return ElementwiseLoss(key)
    if key == "dice":
        return SoftDiceLoss()
    if key == "multitask":
        if outputs is None:
            raise ValueError("the multitask loss needs the output names")
        from .spec import PROBABILITY_OUTPUTS

        return MultiTaskLoss([o in PROBABILITY_OUTPUTS for o in outputs])
    raise ValueError(f"unknown loss {name!r}; one of mse, mae, lcl, dice, multitask")


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return make_loss("mse")(pred, target)


def mae(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return make_loss("mae")(pred, target)


def lcl(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return make_loss("lcl")(pred, target)


def soft_dice(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    return SoftDiceLoss(smooth)(pred, target)
