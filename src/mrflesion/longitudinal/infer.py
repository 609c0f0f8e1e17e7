"""Inference of the siamese new-lesion network on one pair: sliding windows, probability, lesion map.

* :func:`load_model` rebuilds the network from ``best.pt`` (or ``last.pt``) of
  :func:`~mrflesion.longitudinal.train.train_longitudinal`.
* :func:`predict_pair`: windows of the training patch (per axis: the whole axis where the volume is
  no larger, zero-padded up to the network's divisor) at a stride of ``window · (1 − overlap)``, the
  last window flush with the edge; the softmax foreground probabilities of overlapping windows are
  averaged with Gaussian weights (sd = window / 8 per axis, as nnU-Net: a window's border voxels see
  less context than its centre, so they count less); ``weighting="uniform"`` gives a plain mean.
  Windows are cut from the zero-padded pair, so a volume covered by one window gets one pass. Output:
  float32 in [0, 1], 0 outside the brain.
* :func:`new_lesion_map`: the binary new/enlarged-lesion map at an operating point
  (:func:`mrflesion.evaluate.lesionwise.lesion_mask`: threshold, then components smaller than
  ``min_lesion_ml`` removed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..device import autocast, resolve_device
from ..evaluate.lesionwise import lesion_mask
from ..evaluate.metrics import voxel_volume_ml
from ..learn import checkpoint as ckpt_io
from ..learn.infer import window_starts
from .network import LongitudinalSpec, SiameseUNet3D

#: Format tag of the checkpoints written by :func:`~mrflesion.longitudinal.train.train_longitudinal`.
CHECKPOINT_FORMAT = "mrflesion-longitudinal-siamese-1"
WEIGHTINGS = ("gaussian", "uniform")


def load_model(
    path: str | Path | Mapping[str, Any], device: str | torch.device = "cpu"
) -> tuple[SiameseUNet3D, LongitudinalSpec, dict[str, Any]]:
    """(model in eval mode on ``device``, spec, meta) from a checkpoint path or loaded dict. ``meta``:
    patch (the fitted training patch: use it as :func:`predict_pair`'s window), epoch, validation
    figures (``best.pt``), fingerprint, train/val ids when present."""
    ck = ckpt_io.load(path) if not isinstance(path, Mapping) else path
    if ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"not a {CHECKPOINT_FORMAT} checkpoint: format {ck.get('format')!r}")
    spec = LongitudinalSpec.from_config(ck["spec"])
    model = SiameseUNet3D(**ck["model_config"])
    model.load_state_dict(ck["model"])
    dev = resolve_device(device)
    model.to(dev).eval()
    meta = {k: ck[k] for k in ("epoch", "validation", "fingerprint", "train_ids", "val_ids") if k in ck}
    meta["patch"] = tuple(int(p) for p in ck["patch"])
    if "epoch" not in meta and "epochs_done" in ck:
        meta["epoch"] = int(ck["epochs_done"])
    return model, spec, meta


def _weights(window: Sequence[int], weighting: str) -> np.ndarray:
    """Per-window voxel weights: separable Gaussian (sd window/8, max 1, floored at 1e-3) or ones."""
    if weighting == "uniform":
        return np.ones(tuple(window), dtype=np.float32)
    w = np.ones((), dtype=np.float64)
    for n in window:
        c = (np.arange(n) - (n - 1) / 2.0) / max(n / 8.0, 1e-6)
        w = np.multiply.outer(w, np.exp(-0.5 * c * c))
    return np.maximum(w / w.max(), 1e-3).astype(np.float32)


@torch.no_grad()
def predict_pair(
    model: torch.nn.Module,
    baseline: np.ndarray,
    followup: np.ndarray,
    brain: np.ndarray,
    patch: Sequence[int],
    overlap: float = 0.5,
    device: str | torch.device = "cpu",
    batch: int = 2,
    weighting: str = "gaussian",
) -> np.ndarray:
    """Probability of new/enlarged lesion (float32, [0, 1], 0 outside ``brain``) of a pair in its
    halfway space, by sliding windows of ``patch`` (module docstring). ``model``: called as
    ``model(baseline, followup)`` on (N, 1, X, Y, Z) tensors, returning ``{"logits": (N, 2, ...)}``;
    its ``divisor`` (default 1) is the multiple window sizes are rounded up to."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    base = np.asarray(baseline, dtype=np.float32)
    fol = np.asarray(followup, dtype=np.float32)
    mask = np.asarray(brain).astype(bool, copy=False)
    if base.ndim != 3 or fol.shape != base.shape or mask.shape != base.shape:
        raise ValueError(f"shapes differ: baseline {base.shape}, followup {fol.shape}, brain {mask.shape}")
    dev = resolve_device(device)
    div = tuple(int(d) for d in getattr(model, "divisor", (1, 1, 1)))
    shape = base.shape
    # window per axis: the patch (rounded up to the divisor), or the whole (padded) axis if smaller
    window = []
    for a in range(3):
        w = min(int(patch[a]), shape[a])
        window.append(-(-w // div[a]) * div[a])
    padded = tuple(max(s, w) for s, w in zip(shape, window, strict=True))
    pad = [(0, p - s) for p, s in zip(padded, shape, strict=True)]
    base_p, fol_p = np.pad(base, pad), np.pad(fol, pad)
    starts = [
        window_starts(padded[a], window[a], max(1, int(round(window[a] * (1.0 - overlap))))) for a in range(3)
    ]
    boxes = [(i, j, k) for i in starts[0] for j in starts[1] for k in starts[2]]
    wmap = _weights(window, weighting)
    acc = np.zeros(padded, dtype=np.float32)
    wsum = np.zeros(padded, dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        for b0 in range(0, len(boxes), max(1, int(batch))):
            chunk = boxes[b0:b0 + max(1, int(batch))]
            sl = [tuple(slice(o, o + w) for o, w in zip(box, window, strict=True)) for box in chunk]
            xb = torch.from_numpy(np.stack([base_p[s] for s in sl])[:, None]).to(dev)
            xf = torch.from_numpy(np.stack([fol_p[s] for s in sl])[:, None]).to(dev)
            with autocast(dev):
                logits = model(xb, xf)["logits"]
            prob = torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy()
            for s, p in zip(sl, prob, strict=True):
                acc[s] += p * wmap
                wsum[s] += wmap
    finally:
        model.train(was_training)
    out = acc / np.maximum(wsum, 1e-12)
    out = out[: shape[0], : shape[1], : shape[2]]
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False) * mask


def new_lesion_map(
    prob: np.ndarray, voxel_mm: Sequence[float], threshold: float = 0.4, min_lesion_ml: float = 0.01
) -> np.ndarray:
    """Binary (uint8 0/1) map of new/enlarged lesions: ``prob >= threshold``, then 26-connected
    components smaller than ``min_lesion_ml`` removed (the spec's operating point by default)."""
    return lesion_mask(prob, threshold, voxel_volume_ml(voxel_mm), min_lesion_ml).astype(np.uint8)
