"""Voxel-wise evaluation metrics (DESIGN §5).

Conventions (shared by every overlap measure here):

- Masks are compared as booleans (any non-zero value is foreground).
- ``binarise(prob, t)`` is ``prob >= t`` (NaN is background), so a threshold of 0.33 keeps a voxel
  whose probability is exactly 0.33; ``threshold_sweep`` uses the same rule.
- Empty cases: Dice, IoU, precision and recall are **1.0 when prediction and reference are both
  empty** (perfect agreement on "no lesion") and **0.0 when exactly one of them is empty** (this also
  fixes the 0/0 cases: precision with an empty prediction, recall with an empty reference).
  Independent implementations differ here: nipype's ``Overlap`` returns 0 when both are empty (and
  takes its labels from ``volume1`` only), scikit-learn returns 0.0 for 0/0 with a warning
  (``zero_division="warn"``) and its ``jaccard_score`` likewise; the tests pin these differences.
- ``accuracy`` is (TP + TN) / N over the voxels of an optional mask (the whole image by default); it
  is always defined unless the mask is empty (then NaN).
- ``detection_rate`` is NaN when the reference has no lesion (a rate over zero lesions is undefined;
  such cases are dropped, and counted, by the group tables).
- Connectivity is given as the number of neighbours: 6 / 18 / 26 in 3D (4 / 8 in 2D).
- Volumes: functions that need millilitres take ``voxel_ml`` (see ``voxel_volume_ml``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage

DEFAULT_THRESHOLDS = np.arange(0.01, 1.0, 0.01)

_CONNECTIVITY_RANK = {
    2: {4: 1, 8: 2},
    3: {6: 1, 18: 2, 26: 3},
}


def voxel_volume_ml(zooms: Sequence[float]) -> float:
    """Volume of one voxel in ml from the voxel sizes in mm (the first three are used)."""
    return float(np.prod(np.asarray(zooms, dtype=np.float64)[:3])) / 1000.0


def structure(ndim: int, connectivity: int) -> np.ndarray:
    """Structuring element for ``scipy.ndimage.label`` from a neighbour count (6/18/26, or 4/8 in 2D)."""
    try:
        rank = _CONNECTIVITY_RANK[ndim][connectivity]
    except KeyError:
        raise ValueError(f"connectivity {connectivity} not supported for {ndim}D images") from None
    return ndimage.generate_binary_structure(ndim, rank)


def label_components(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Connected components of a boolean mask: (labels, count), labels 1..count, background 0."""
    mask = np.asarray(mask, dtype=bool)
    labels, n = ndimage.label(mask, structure=structure(mask.ndim, connectivity))
    return labels, int(n)


def binarise(prob: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask ``prob >= threshold`` (NaN counts as background)."""
    prob = np.asarray(prob)
    with np.errstate(invalid="ignore"):
        return prob >= threshold


def _as_bool_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred).astype(bool, copy=False)
    ref = np.asarray(ref).astype(bool, copy=False)
    if pred.shape != ref.shape:
        raise ValueError(f"shape mismatch: prediction {pred.shape} vs reference {ref.shape}")
    return pred, ref


def confusion(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> dict[str, int]:
    """Voxel counts TP, FP, FN, TN (within ``mask`` if given)."""
    pred, ref = _as_bool_pair(pred, ref)
    if mask is not None:
        mask = np.asarray(mask).astype(bool, copy=False)
        if mask.shape != pred.shape:
            raise ValueError(f"shape mismatch: mask {mask.shape} vs images {pred.shape}")
        pred = pred[mask]
        ref = ref[mask]
    tp = int(np.count_nonzero(pred & ref))
    n_pred = int(np.count_nonzero(pred))
    n_ref = int(np.count_nonzero(ref))
    fp = n_pred - tp
    fn = n_ref - tp
    tn = int(pred.size) - tp - fp - fn
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _ratio(num: int, den: int) -> float:
    """num / den, with the module's empty-case convention: 0/0 handled by the caller."""
    return float(num) / float(den)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice = 2|P∩R| / (|P| + |R|); 1.0 if both are empty, 0.0 if exactly one is."""
    c = confusion(pred, ref)
    den = 2 * c["tp"] + c["fp"] + c["fn"]
    return 1.0 if den == 0 else _ratio(2 * c["tp"], den)


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """Intersection over union (Jaccard); 1.0 if both are empty, 0.0 if exactly one is."""
    c = confusion(pred, ref)
    den = c["tp"] + c["fp"] + c["fn"]
    return 1.0 if den == 0 else _ratio(c["tp"], den)


def precision(pred: np.ndarray, ref: np.ndarray) -> float:
    """TP / (TP + FP); 1.0 if both are empty, 0.0 if the prediction is empty and the reference is not."""
    c = confusion(pred, ref)
    den = c["tp"] + c["fp"]
    if den == 0:
        return 1.0 if c["fn"] == 0 else 0.0
    return _ratio(c["tp"], den)


def recall(pred: np.ndarray, ref: np.ndarray) -> float:
    """TP / (TP + FN) (sensitivity); 1.0 if both are empty, 0.0 if the reference is empty and the prediction is not."""
    c = confusion(pred, ref)
    den = c["tp"] + c["fn"]
    if den == 0:
        return 1.0 if c["fp"] == 0 else 0.0
    return _ratio(c["tp"], den)


def accuracy(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    """(TP + TN) / N over the voxels of ``mask`` (whole image by default); NaN for an empty mask."""
    c = confusion(pred, ref, mask)
    n = c["tp"] + c["fp"] + c["fn"] + c["tn"]
    return float("nan") if n == 0 else _ratio(c["tp"] + c["tn"], n)


def overlap_metrics(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """Per-image Dice, IoU, precision, recall and accuracy (seed 003) in one dict."""
    return {
        "dice": dice(pred, ref),
        "iou": iou(pred, ref),
        "precision": precision(pred, ref),
        "recall": recall(pred, ref),
        "accuracy": accuracy(pred, ref, mask),
    }


def detection_rate(pred_bin: np.ndarray, ref_bin: np.ndarray, connectivity: int = 26) -> float:
    """Lesion detection rate: fraction of reference lesions hit by the prediction.

    Reference lesions are the connected components of ``ref_bin`` (``connectivity`` neighbours); a
    lesion is hit when at least one of its voxels is predicted. NaN when the reference has no lesion.
    """
    pred, ref = _as_bool_pair(pred_bin, ref_bin)
    labels, n = label_components(ref, connectivity)
    if n == 0:
        return float("nan")
    hit = np.unique(labels[pred & ref])
    return float(hit.size) / n


def threshold_sweep(
    prob: np.ndarray,
    ref_bin: np.ndarray,
    thresholds: Sequence[float] | np.ndarray = DEFAULT_THRESHOLDS,
    connectivity: int = 26,
) -> pd.DataFrame:
    """Dice and lesion detection rate of ``binarise(prob, t)`` for every threshold t.

    Equivalent to looping ``dice(binarise(prob, t), ref)`` and ``detection_rate(...)`` over the
    thresholds, but in one pass: the probabilities (all voxels, and reference voxels) are sorted once
    so that |P(t)| and |P(t) ∩ R| are binary searches, and a lesion is hit at t exactly when its
    maximum probability is >= t. Columns: threshold, dice, ldr (NaN when there is no lesion).
    """
    prob = np.asarray(prob, dtype=np.float64)
    ref = np.asarray(ref_bin).astype(bool, copy=False)
    if prob.shape != ref.shape:
        raise ValueError(f"shape mismatch: probabilities {prob.shape} vs reference {ref.shape}")
    thr = np.asarray(thresholds, dtype=np.float64).ravel()
    p = np.where(np.isnan(prob), -np.inf, prob)

    all_sorted = np.sort(p, axis=None)
    ref_vals = p[ref]
    ref_sorted = np.sort(ref_vals)
    n_pred = all_sorted.size - np.searchsorted(all_sorted, thr, side="left")
    n_tp = ref_sorted.size - np.searchsorted(ref_sorted, thr, side="left")
    den = n_pred + ref_sorted.size
    with np.errstate(invalid="ignore", divide="ignore"):
        dice_t = np.where(den == 0, 1.0, 2.0 * n_tp / np.maximum(den, 1))

    labels, n = label_components(ref, connectivity)
    if n == 0:
        ldr = np.full(thr.shape, np.nan)
    else:
        lesion_max = ndimage.maximum(p, labels=labels, index=np.arange(1, n + 1))
        lesion_max = np.sort(np.asarray(lesion_max, dtype=np.float64))
        ldr = (n - np.searchsorted(lesion_max, thr, side="left")) / n
    return pd.DataFrame({"threshold": thr, "dice": dice_t, "ldr": ldr})


def mean_relative_deviation(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean of |pred − ref| / ref over the voxels of ``mask`` where ref > 0 (and both are finite).

    Returned as a fraction (0.052 = 5.2 %); NaN when no voxel qualifies.
    """
    pred = np.asarray(pred, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if pred.shape != ref.shape:
        raise ValueError(f"shape mismatch: prediction {pred.shape} vs reference {ref.shape}")
    sel = np.isfinite(pred) & np.isfinite(ref) & (ref > 0)
    if mask is not None:
        mask = np.asarray(mask).astype(bool, copy=False)
        if mask.shape != ref.shape:
            raise ValueError(f"shape mismatch: mask {mask.shape} vs images {ref.shape}")
        sel &= mask
    if not sel.any():
        return float("nan")
    return float(np.mean(np.abs(pred[sel] - ref[sel]) / ref[sel]))


def tissue_dice(pred_prob: np.ndarray, ref_prob: np.ndarray, threshold: float = 0.8) -> float:
    """Dice of two tissue probability maps (0–1 fractions) after binarising both at ``threshold``."""
    return dice(binarise(pred_prob, threshold), binarise(ref_prob, threshold))


def volume_ml(mask: np.ndarray, voxel_ml: float) -> float:
    """Volume of a boolean mask in ml."""
    return float(np.count_nonzero(mask)) * float(voxel_ml)
