"""Voxel-wise evaluation metrics (docs/evaluation.md).

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

Reviewer-grade measures (MSSEG-2016/2021, WMH 2017, Shifts; docs/evaluation.md):

- ``normalised_dice`` (nDSC; Raina et al. 2023, the Shifts 2022 MS-lesion metric): Dice with the false
  positives rescaled to a fixed reference lesion load ``r`` (0.001 as in Shifts):
  k = (1 − r)·|R| / (r·(N − |R|)), nDSC = 2TP / (2TP + FN + k·FP), with TP, FP, FN and N counted inside
  the evaluated region (the brain mask; the whole image by default). k = 1 when the reference has the
  load r, so nDSC = Dice there. Empty cases as in Shifts: 1.0 when prediction and reference are both
  empty in the region, 0.0 when exactly one is (TP = 0); NaN for an empty region.
- ``absolute_volume_difference`` (AVD, in %): |V_pred − V_ref| / V_ref · 100 (voxel counts over the
  whole image, so the voxel volume cancels); NaN when the reference is empty.
- ``hd95`` (mm), the MedPy convention (``medpy.metric.binary.hd95``): surfaces are the boundary voxels
  of each mask (voxels of the mask with a face neighbour, 6-connectivity, outside the mask or outside
  the image, i.e. ``mask & ~binary_erosion(mask)``); for every surface voxel of one mask the Euclidean
  distance (voxel spacing from the zooms) to the nearest surface voxel of the other; the two directed
  sets are pooled and HD95 is their 95th percentile (``numpy.percentile``, linear interpolation).
  Pooling differs from the max of the two directed 95th percentiles (as in some other toolkits); 0 for
  identical masks; NaN when either mask is empty.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

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


def _hit_rate(tp: int, misses: int, other: int) -> float:
    """TP / (TP + ``misses``) of one side (prediction or reference); when that side is empty, 1.0 if the
    ``other`` side's misses are 0 too (both masks empty), else 0.0."""
    den = tp + misses
    if den == 0:
        return 1.0 if other == 0 else 0.0
    return _ratio(tp, den)


def precision(pred: np.ndarray, ref: np.ndarray) -> float:
    """TP / (TP + FP); 1.0 if both are empty, 0.0 if the prediction is empty and the reference is not."""
    c = confusion(pred, ref)
    return _hit_rate(c["tp"], c["fp"], c["fn"])


def recall(pred: np.ndarray, ref: np.ndarray) -> float:
    """TP / (TP + FN) (sensitivity); 1.0 if both are empty, 0.0 if the reference is empty and the prediction is not."""
    c = confusion(pred, ref)
    return _hit_rate(c["tp"], c["fn"], c["fp"])


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


def pooled_counts(
    prob: np.ndarray, ref_bin: np.ndarray, thresholds: Sequence[float] | np.ndarray = DEFAULT_THRESHOLDS
) -> np.ndarray:
    """(T, 3) int64 counts per threshold t: |P(t)|, |P(t) ∩ R| and |R|, with P(t) = prob >= t; additive
    over subjects, so that a Dice pooled over several subjects is ``2 sum(TP) / (sum(P) + sum(R))``."""
    p = np.sort(np.asarray(prob, dtype=np.float64).ravel())
    r = np.sort(np.asarray(prob, dtype=np.float64)[np.asarray(ref_bin, dtype=bool)])
    thr = np.asarray(thresholds, dtype=np.float64).ravel()
    n_pred = p.size - np.searchsorted(p, thr, side="left")
    n_tp = r.size - np.searchsorted(r, thr, side="left")
    return np.stack([n_pred, n_tp, np.full(thr.size, r.size)], axis=1).astype(np.int64)


def best_pooled_threshold(
    counts: np.ndarray, thresholds: Sequence[float] | np.ndarray = DEFAULT_THRESHOLDS, tolerance: float = 0.0
) -> dict[str, float] | None:
    """The threshold maximising the pooled Dice of summed :func:`pooled_counts`; thresholds whose Dice is
    within ``tolerance`` (absolute) of the best count as ties, and ties go to the one nearest 0.5 (the
    decision point of a network trained with cross-entropy). ``{"threshold", "dice"}``, or None without
    reference voxels."""
    counts = np.asarray(counts, dtype=np.float64)
    thr = np.asarray(thresholds, dtype=np.float64).ravel()
    if counts[0, 2] == 0:
        return None
    dice_t = 2.0 * counts[:, 1] / (counts[:, 0] + counts[:, 2])
    best = np.flatnonzero(dice_t >= dice_t.max() - max(float(tolerance), 1e-12))
    i = int(best[np.argmin(np.abs(thr[best] - 0.5))])
    return {"threshold": round(float(thr[i]), 6), "dice": float(dice_t[i])}


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


def normalised_dice(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None, r: float = 0.001) -> float:
    """Normalised Dice nDSC (Raina et al. 2023; Shifts): Dice with FP rescaled to the lesion load ``r``.

    k = (1 − r)·|R| / (r·(N − |R|)) and nDSC = 2TP / (2TP + FN + k·FP), with TP, FP, FN, |R| and the
    region size N counted inside ``mask`` (the whole image by default). 1.0 when prediction and
    reference are both empty in the region, 0.0 when exactly one is; NaN for an empty region. When
    the reference fills the region (N = |R|) there can be no FP and nDSC = 2TP / (2TP + FN).
    """
    if not 0.0 < r < 1.0:
        raise ValueError(f"reference lesion load r must be in (0, 1), got {r}")
    c = confusion(pred, ref, mask)
    n = c["tp"] + c["fp"] + c["fn"] + c["tn"]
    if n == 0:
        return float("nan")
    n_ref = c["tp"] + c["fn"]
    if n_ref + c["fp"] == 0:
        return 1.0
    if c["tp"] == 0:
        return 0.0
    fp_term = 0.0
    if c["fp"]:  # then N > |R|
        k = (1.0 - r) * n_ref / (r * (n - n_ref))
        fp_term = k * c["fp"]
    return 2.0 * c["tp"] / (2.0 * c["tp"] + c["fn"] + fp_term)


def absolute_volume_difference(pred: np.ndarray, ref: np.ndarray) -> float:
    """Absolute volume difference AVD = |V_pred − V_ref| / V_ref · 100 (in %); NaN for an empty reference."""
    pred, ref = _as_bool_pair(pred, ref)
    n_ref = int(np.count_nonzero(ref))
    if n_ref == 0:
        return float("nan")
    return abs(int(np.count_nonzero(pred)) - n_ref) / n_ref * 100.0


def surface(mask: np.ndarray, connectivity: int = 6) -> np.ndarray:
    """Boundary voxels of a mask: voxels of the mask with a neighbour (``connectivity``) outside it.

    Voxels on the image border count as boundary (the outside of the image is background), i.e.
    ``mask & ~binary_erosion(mask, structure)``.
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    return mask & ~ndimage.binary_erosion(mask, structure=structure(mask.ndim, connectivity), border_value=0)


# Nearest-surface distances by k-d tree when the two surfaces together have fewer voxels than this
# fraction of the box they span, by Euclidean distance transform otherwise (both exact; the tree is
# faster for sparse lesion surfaces, the transform's cost is bounded by the box size).
_KDTREE_MAX_FRACTION = 0.25
_SURFACE_METHODS = ("auto", "edt", "kdtree")


def _bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """Slices of the smallest box holding every True voxel of a non-empty mask, grown by ``margin``
    voxels on each side (clipped to the image)."""
    out = []
    for ax in range(mask.ndim):
        idx = np.flatnonzero(np.any(mask, axis=tuple(i for i in range(mask.ndim) if i != ax)))
        out.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[ax])))
    return tuple(out)


def _sampling(spacing: Sequence[float] | None, ndim: int) -> np.ndarray:
    if spacing is None:
        return np.ones(ndim, dtype=np.float64)
    out = np.asarray(spacing, dtype=np.float64).ravel()[:ndim]
    if out.size != ndim:
        raise ValueError(f"spacing needs {ndim} values, got {out.size}")
    return out


def _nearest_surface(
    sa: np.ndarray, sb: np.ndarray, sampling: np.ndarray, method: str
) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each voxel of surface ``sa`` to the nearest of ``sb`` and back (C order)."""
    box = _bounding_box(sa | sb)
    sa, sb = sa[box], sb[box]
    if method == "auto":
        n_points = int(np.count_nonzero(sa)) + int(np.count_nonzero(sb))
        method = "kdtree" if n_points < _KDTREE_MAX_FRACTION * sa.size else "edt"
    if method == "edt":
        d_ab = ndimage.distance_transform_edt(~sb, sampling=sampling)[sa]
        d_ba = ndimage.distance_transform_edt(~sa, sampling=sampling)[sb]
    else:
        pa = np.argwhere(sa) * sampling
        pb = np.argwhere(sb) * sampling
        d_ab = cKDTree(pb).query(pa)[0]
        d_ba = cKDTree(pa).query(pb)[0]
    return np.asarray(d_ab, dtype=np.float64), np.asarray(d_ba, dtype=np.float64)


def surface_distances(
    a: np.ndarray,
    b: np.ndarray,
    spacing: Sequence[float] | None = None,
    connectivity: int = 6,
    method: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances between two masks, both ways.

    Returns (d_ab, d_ba): for each boundary voxel of ``a`` (C order) the Euclidean distance to the
    nearest boundary voxel of ``b``, and the same from ``b`` to ``a``, in the units of ``spacing``
    (the voxel sizes; voxel units by default). Boundary voxels as in ``surface``. ``method``: "edt"
    (``scipy.ndimage.distance_transform_edt``), "kdtree" (``scipy.spatial.cKDTree``) or "auto" (the
    cheaper for the case); all exact. Raises ``ValueError`` when either mask is empty.
    """
    a, b = _as_bool_pair(a, b)
    if method not in _SURFACE_METHODS:
        raise ValueError(f"method must be one of {_SURFACE_METHODS}, got {method!r}")
    if not a.any() or not b.any():
        raise ValueError("surface distances need two non-empty masks")
    sampling = _sampling(spacing, a.ndim)
    # Surfaces on the bounding box of both masks plus a one-voxel margin (clipped to the image): the
    # erosion sees the same neighbourhood there, so they equal the full-image surfaces; the nearest
    # surface voxel of the other mask lies in the box of the two surfaces.
    box = _bounding_box(a | b, margin=1)
    return _nearest_surface(surface(a[box], connectivity), surface(b[box], connectivity), sampling, method)


def hd95(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float] | None = None,
    percentile: float = 95.0,
    connectivity: int = 6,
    method: str = "auto",
) -> float:
    """95th percentile Hausdorff distance (MedPy convention, see the module docstring).

    The surface distances from prediction to reference and from reference to prediction
    (``surface_distances``) are pooled and their ``percentile`` taken (``numpy.percentile``, linear
    interpolation). Units of ``spacing`` (mm from the zooms; voxels by default). NaN when either
    mask is empty.
    """
    pred, ref = _as_bool_pair(pred, ref)
    if not pred.any() or not ref.any():
        return float("nan")
    d_pr, d_rp = surface_distances(pred, ref, spacing, connectivity, method)
    return float(np.percentile(np.concatenate([d_pr, d_rp]), percentile))
