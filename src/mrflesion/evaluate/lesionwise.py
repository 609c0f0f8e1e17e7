"""Lesion-wise evaluation (docs/evaluation.md): rule A (seed 002), the MSSEG detection rule, volume groups.

Rule A — ``lesionwise_metrics`` / ``lesion_table``
    Lesions are the 26-connected components of each binary map; both maps are first cleaned of
    components smaller than ``min_ml`` (0.01 ml; a component of exactly ``min_ml`` is kept). A
    reference lesion is a true positive (detected) when it overlaps (>= 1 voxel) a predicted
    component. Sensitivity = TP / number of reference lesions; a predicted component that overlaps no
    reference lesion is a false positive; FPR = FP / number of reference lesions. The lesion Dice is
    the Dice of the two maps restricted to overlapping lesions: the union of the detected reference
    lesions against the union of the predicted components that overlap some reference lesion (false
    positive components and missed lesions are left out; they are counted by FP and sensitivity).
    Empty cases: with no reference lesion, sensitivity and FPR are NaN (FP is still counted); with no
    overlapping lesion the lesion Dice is NaN.
    Lesion-wise F1 (detection; ``lesion_f1``): recall R = reference lesions overlapping a predicted
    component / reference lesions (= sensitivity), precision P = predicted components overlapping a
    reference lesion / predicted components, F1 = 2PR / (P + R) (computed from the counts as
    2·a·b / (a·n_pred + b·n_ref), a and b the two numerators). Empty cases as in the Shifts challenge:
    F1 = 1.0 when neither map has a lesion, 0.0 when exactly one has none, 0.0 when P = R = 0 (MSSEG-2
    instead leaves F1 out for subjects without lesions and counts their false positives; here those are
    ``fp``). The per-lesion table gives, for every reference
    lesion, its volume, whether it is detected and its Dice with the union of the predicted
    components overlapping it (0 when missed).

Rule B — ``msseg_detection`` (MSSEG 2016; Commowick et al., Sci Rep 8:13650, 2018, "detection")
    Our reading of the paper, checked against its reference implementation (Anima's
    ``animaSegPerfAnalyzer``, which the challenge used). Components are computed in both images and
    those of volume <= ``min_mm3`` (3 mm³) are dropped (a component is kept when its voxel count is at
    least floor(min_mm3 / voxel_mm3) + 1, Anima's formula). A reference lesion L is detected when

    1. (alpha) the predicted components together cover more than ``alpha`` of L's voxels, and
    2. (beta, gamma) taking the predicted components that overlap L in decreasing order of their
       overlap with L, until their overlaps add up to at least ``gamma`` of the total overlap with L
       (the components that "contribute the most to the detection"), none of them lies outside the
       reference by more than ``beta``: for each, (its voxels in the reference background) / (its
       voxels) <= beta. "Outside" means outside every reference lesion, as in Anima (voxels in a
       neighbouring reference lesion are not counted as outside).

    Sensitivity = detected reference lesions / reference lesions. The same test with the roles of the
    two images swapped decides whether a predicted component is a true positive (the reference
    covers > alpha of it, and the reference lesions contributing gamma of that overlap lie outside
    the prediction by <= beta); PPV = true-positive predicted components / predicted components, and
    F1 = 2 · sensitivity · PPV / (sensitivity + PPV). Differences from Anima, on purpose: ties in the
    overlap order are broken by label (Anima's sort is not stable), and the loop is not cut off after
    as many components as the other image has labels (an Anima loop-bound quirk). Connectivity: Anima
    labels with ITK's default face connectivity (6 in 3D), which is our default here; pass
    ``connectivity=26`` for the convention of rule A.
    Empty cases: sensitivity is NaN with no reference lesion, PPV NaN with no predicted component;
    F1 is 0 when either of them is 0 (even if the other is NaN), NaN otherwise when either is NaN.

Volume groups (seed 004): G1 < 0.2 ml, G2 0.2–0.7, G3 0.7–2, G4 2–5, G5 >= 5 ml (lower bounds
inclusive). ``group_detection`` gives per group the number of (cleaned, rule A) reference lesions and
their detection rate (NaN for a group without lesions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import sparse

from .metrics import DEFAULT_THRESHOLDS, best_pooled_threshold, binarise, label_components, pooled_counts

VOLUME_GROUP_EDGES_ML = (0.2, 0.7, 2.0, 5.0)
VOLUME_GROUPS = ("G1", "G2", "G3", "G4", "G5")

# Relative tolerance on size thresholds in ml (n_vox * voxel_ml is a float product).
_ML_RTOL = 1e-9


# --------------------------------------------------------------------------- helpers


def _relabel_kept(labels: np.ndarray, n: int, keep: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """Keep the components flagged in ``keep`` (index 0 = label 1), relabelled 1..k in order."""
    lut = np.zeros(n + 1, dtype=np.int64)
    kept = np.flatnonzero(keep) + 1
    lut[kept] = np.arange(1, kept.size + 1)
    return lut[labels], int(kept.size), kept


def clean_components(
    mask: np.ndarray, voxel_ml: float, min_ml: float = 0.01, connectivity: int = 26
) -> tuple[np.ndarray, int, np.ndarray]:
    """Connected components of ``mask`` with those smaller than ``min_ml`` removed.

    Returns (labels 1..n, n, sizes in voxels of labels 1..n). A component of exactly ``min_ml`` is
    kept (up to a relative rounding tolerance of 1e-9).
    """
    labels, n = label_components(mask, connectivity)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    keep = sizes * float(voxel_ml) >= float(min_ml) * (1.0 - _ML_RTOL)
    labels, n, _ = _relabel_kept(labels, n, keep)
    return labels, n, sizes[keep]


def _overlap_table(ref_labels: np.ndarray, n_ref: int, pred_labels: np.ndarray, n_pred: int) -> sparse.csr_matrix:
    """Sparse (n_ref + 1) x (n_pred + 1) voxel counts; row/column 0 is the background."""
    r = ref_labels.ravel()
    p = pred_labels.ravel()
    fg = (r > 0) | (p > 0)
    r = r[fg]
    p = p[fg]
    table = sparse.coo_matrix((np.ones(r.size, dtype=np.int64), (r, p)), shape=(n_ref + 1, n_pred + 1)).tocsr()
    table.sum_duplicates()
    return table


def volume_group(volume_ml: float | np.ndarray) -> str | np.ndarray:
    """Volume group label(s) G1–G5 of lesion volume(s) in ml."""
    idx = np.digitize(np.asarray(volume_ml, dtype=np.float64), VOLUME_GROUP_EDGES_ML, right=False)
    out = np.asarray(VOLUME_GROUPS, dtype=object)[idx]
    return str(out) if np.ndim(out) == 0 else out


def group_detection(volume_ml: np.ndarray, detected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lesion count and detection rate per volume group, in the order of ``VOLUME_GROUPS``.

    ``volume_ml`` and ``detected``: one entry per reference lesion (e.g. the ``volume_ml`` and
    ``detected`` columns of ``lesion_table``). Returns (n, rate): n the number of lesions per group
    (int64), rate the fraction detected (NaN for a group without lesions).
    """
    vol = np.asarray(volume_ml, dtype=np.float64).ravel()
    det = np.asarray(detected).astype(bool, copy=False).ravel()
    if vol.shape != det.shape:
        raise ValueError(f"shape mismatch: {vol.shape[0]} volumes vs {det.shape[0]} detection flags")
    idx = np.digitize(vol, VOLUME_GROUP_EDGES_ML, right=False)
    n = np.bincount(idx, minlength=len(VOLUME_GROUPS)).astype(np.int64)
    hit = np.bincount(idx[det], minlength=len(VOLUME_GROUPS)).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(n > 0, hit / np.maximum(n, 1), np.nan)
    return n, rate


def lesion_f1(n_ref: int, n_ref_detected: int, n_pred: int, n_pred_true: int) -> float:
    """Lesion-wise detection F1 = 2PR / (P + R) from lesion counts (see the module docstring).

    R = ``n_ref_detected / n_ref``, P = ``n_pred_true / n_pred``. 1.0 when ``n_ref == n_pred == 0``,
    0.0 when exactly one of them is 0 or when nothing is detected.
    """
    n_ref, a, n_pred, b = int(n_ref), int(n_ref_detected), int(n_pred), int(n_pred_true)
    if not (0 <= a <= n_ref and 0 <= b <= n_pred):
        raise ValueError(f"invalid lesion counts: {a}/{n_ref} reference, {b}/{n_pred} predicted")
    if n_ref == 0 and n_pred == 0:
        return 1.0
    if a == 0 or b == 0:  # includes exactly one map without lesions
        return 0.0
    return 2 * a * b / (a * n_pred + b * n_ref)


class _Matched(NamedTuple):
    """The kept components of a reference and a prediction (labels 1..n, n, sizes in voxels of labels
    1..n) and their :func:`_overlap_table`."""

    ref_labels: np.ndarray
    n_ref: int
    ref_sizes: np.ndarray
    pred_labels: np.ndarray
    n_pred: int
    pred_sizes: np.ndarray
    table: sparse.csr_matrix


def _match_components(
    pred_bin: np.ndarray, ref_bin: np.ndarray, components: Callable[[np.ndarray], tuple[np.ndarray, int, np.ndarray]]
) -> _Matched:
    """Binarise two masks of the same shape, find the ``components`` of each (reference first), and
    tabulate their overlap."""
    pred = np.asarray(pred_bin).astype(bool, copy=False)
    ref = np.asarray(ref_bin).astype(bool, copy=False)
    if pred.shape != ref.shape:
        raise ValueError(f"shape mismatch: prediction {pred.shape} vs reference {ref.shape}")
    ref_labels, n_ref, ref_sizes = components(ref)
    pred_labels, n_pred, pred_sizes = components(pred)
    table = _overlap_table(ref_labels, n_ref, pred_labels, n_pred)
    return _Matched(ref_labels, n_ref, ref_sizes, pred_labels, n_pred, pred_sizes, table)


# --------------------------------------------------------------------------- rule A


def lesions_by_id(ref_bin: np.ndarray, ids: np.ndarray, voxel_ml: float,
                  min_ml: float = 0.01) -> tuple[np.ndarray, int, np.ndarray]:
    """Reference lesions given by an id per voxel instead of by connectivity (labels 1..n, n, sizes in
    voxels): one lesion per id among the voxels of ``ref_bin``, whatever pieces it forms; lesions
    smaller than ``min_ml`` in total are dropped (as :func:`clean_components`)."""
    ids = np.where(np.asarray(ref_bin).astype(bool), np.asarray(ids, dtype=np.int64), 0)
    uniq, inv = np.unique(ids, return_inverse=True)
    labels = inv.reshape(ids.shape)
    if uniq[0] != 0:  # no background voxel at all
        labels = labels + 1
        uniq = np.concatenate([[0], uniq])
    sizes = np.bincount(labels.ravel(), minlength=uniq.size)[1:]
    keep = sizes * float(voxel_ml) >= float(min_ml) * (1.0 - _ML_RTOL)
    labels, n, _ = _relabel_kept(labels, uniq.size - 1, keep)
    return labels, n, sizes[keep]


def match_lesions(pred_bin: np.ndarray, ref_bin: np.ndarray, voxel_ml: float, min_ml: float = 0.01,
                  connectivity: int = 26, ref_ids: np.ndarray | None = None) -> _Matched:
    """Rule A's cleaned, labelled lesions of both maps and their overlap table (what
    :func:`lesionwise_metrics` scores); ``ref_ids``: reference lesions by id (:func:`lesions_by_id`)."""
    if ref_ids is None:
        return _match_components(pred_bin, ref_bin, lambda m: clean_components(m, voxel_ml, min_ml, connectivity))
    pred = np.asarray(pred_bin).astype(bool, copy=False)
    if pred.shape != np.shape(ref_bin):
        raise ValueError(f"shape mismatch: prediction {pred.shape} vs reference {np.shape(ref_bin)}")
    ref_labels, n_ref, ref_sizes = lesions_by_id(ref_bin, ref_ids, voxel_ml, min_ml)
    pred_labels, n_pred, pred_sizes = clean_components(pred, voxel_ml, min_ml, connectivity)
    table = _overlap_table(ref_labels, n_ref, pred_labels, n_pred)
    return _Matched(ref_labels, n_ref, ref_sizes, pred_labels, n_pred, pred_sizes, table)


def lesion_hits(matched: _Matched) -> tuple[np.ndarray, np.ndarray]:
    """Which reference lesions (n_ref,) and which predicted components (n_pred,) overlap the other map."""
    core = matched.table[1:, 1:] > 0
    return np.asarray(core.sum(axis=1)).ravel() > 0, np.asarray(core.sum(axis=0)).ravel() > 0


def lesionwise_metrics(
    pred_bin: np.ndarray,
    ref_bin: np.ndarray,
    voxel_ml: float,
    min_ml: float = 0.01,
    connectivity: int = 26,
    ref_ids: np.ndarray | None = None,
) -> dict[str, float]:
    """Rule A lesion-wise metrics (see the module docstring).

    Keys: n_ref, n_pred, tp, fn, fp, sensitivity, fpr, lesion_precision (predicted components that
    overlap a reference lesion / predicted components; NaN with none), f1 (``lesion_f1``), dice (over
    overlapping lesions only), ref_volume_ml, pred_volume_ml (after cleaning). ``ref_ids``: the reference
    lesions are given by an id per voxel (:func:`lesions_by_id`) rather than by connectivity.
    """
    return metrics_of(match_lesions(pred_bin, ref_bin, voxel_ml, min_ml, connectivity, ref_ids), voxel_ml)


def metrics_of(matched: _Matched, voxel_ml: float) -> dict[str, float]:
    """:func:`lesionwise_metrics` of matched lesions (:func:`match_lesions`)."""
    _, n_ref, ref_sizes, _, n_pred, pred_sizes, table = matched
    core = table[1:, 1:]
    ref_hit, pred_hit = lesion_hits(matched)
    tp = int(ref_hit.sum())
    fp = int(n_pred - pred_hit.sum())
    nan = float("nan")
    if tp:
        inter = float(core[ref_hit][:, pred_hit].sum())
        den = float(ref_sizes[ref_hit].sum() + pred_sizes[pred_hit].sum())
        lesion_dice = 2.0 * inter / den
    else:
        lesion_dice = nan
    return {
        "n_ref": n_ref,
        "n_pred": n_pred,
        "tp": tp,
        "fn": n_ref - tp,
        "fp": fp,
        "sensitivity": tp / n_ref if n_ref else nan,
        "fpr": fp / n_ref if n_ref else nan,
        "lesion_precision": float(pred_hit.sum()) / n_pred if n_pred else nan,
        "f1": lesion_f1(n_ref, tp, n_pred, int(pred_hit.sum())),
        "dice": lesion_dice,
        "ref_volume_ml": float(ref_sizes.sum()) * float(voxel_ml),
        "pred_volume_ml": float(pred_sizes.sum()) * float(voxel_ml),
    }


def lesion_table(
    pred_bin: np.ndarray,
    ref_bin: np.ndarray,
    voxel_ml: float,
    min_ml: float = 0.01,
    connectivity: int = 26,
) -> pd.DataFrame:
    """Per reference lesion (rule A): lesion_id, n_voxels, volume_ml, detected, dice, group.

    ``dice`` is the Dice of the lesion with the union of the predicted components overlapping it
    (0 when the lesion is missed). Lesion ids are the labels 1..n of the cleaned reference map
    (scipy.ndimage.label order).
    """
    ref_labels, n_ref, ref_sizes, pred_labels, n_pred, pred_sizes, table = match_lesions(
        pred_bin, ref_bin, voxel_ml, min_ml, connectivity
    )
    core = table[1:, 1:].tocsr()
    inter = np.asarray(core.sum(axis=1)).ravel().astype(np.float64)
    # Size of the union of the predicted components overlapping each lesion.
    touching = (core > 0).astype(np.int64)
    union_sizes = np.asarray(touching @ pred_sizes.astype(np.int64)).ravel().astype(np.float64)
    detected = inter > 0
    den = ref_sizes.astype(np.float64) + union_sizes
    lesion_dice = np.where(detected, 2.0 * inter / np.maximum(den, 1.0), 0.0)
    volume = ref_sizes.astype(np.float64) * float(voxel_ml)
    return pd.DataFrame(
        {
            "lesion_id": np.arange(1, n_ref + 1, dtype=np.int64),
            "n_voxels": ref_sizes.astype(np.int64),
            "volume_ml": volume,
            "detected": detected,
            "dice": lesion_dice,
            "group": pd.Series(volume_group(volume) if n_ref else np.array([], dtype=object), dtype=object),
        }
    )


def volume_group_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Medians per lesion-volume group (seed 004) from one or more concatenated ``lesion_table``\\ s.

    One row per group G1–G5 (empty groups included, with NaN medians): group, lower_ml, upper_ml,
    n, median_volume_ml, n_detected, detection_rate, median_dice (over all lesions of the group,
    missed ones counting 0), median_dice_detected (over detected lesions only).
    """
    bounds = (0.0, *VOLUME_GROUP_EDGES_ML, math.inf)
    rows = []
    for k, g in enumerate(VOLUME_GROUPS):
        sub = table[table["group"] == g]
        det = sub[sub["detected"].astype(bool)]
        n = len(sub)
        rows.append(
            {
                "group": g,
                "lower_ml": bounds[k],
                "upper_ml": bounds[k + 1],
                "n": n,
                "median_volume_ml": float(sub["volume_ml"].median()) if n else math.nan,
                "n_detected": len(det),
                "detection_rate": len(det) / n if n else math.nan,
                "median_dice": float(sub["dice"].median()) if n else math.nan,
                "median_dice_detected": float(det["dice"].median()) if len(det) else math.nan,
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- rule B (MSSEG)


def _min_voxels(min_mm3: float, voxel_mm3: float) -> int:
    """Anima's minimum component size: floor(min / voxel volume) + 1 voxels (strictly larger)."""
    return int(math.floor(float(min_mm3) / float(voxel_mm3))) + 1


def _detected_rows(table: sparse.csr_matrix, alpha: float, beta: float, gamma: float) -> np.ndarray:
    """MSSEG test of every row object (label >= 1) against the column objects.

    ``table[i, j]``: voxels shared by row object i and column object j; row/column 0 = background of
    the other / own image. Returns a boolean array over rows 1..n.
    """
    n_rows = table.shape[0] - 1
    col_size = np.asarray(table.sum(axis=0)).ravel()  # voxels of each column object (incl. row 0)
    col_outside = np.asarray(table[0, :].todense()).ravel()  # column voxels in the row image background
    with np.errstate(invalid="ignore", divide="ignore"):
        outside_ratio = np.where(col_size > 0, col_outside / np.maximum(col_size, 1), 0.0)
    row_size = np.asarray(table.sum(axis=1)).ravel()
    out = np.zeros(n_rows, dtype=bool)
    for i in range(1, n_rows + 1):
        start, stop = table.indptr[i], table.indptr[i + 1]
        cols = table.indices[start:stop]
        vals = table.data[start:stop]
        fg = (cols > 0) & (vals > 0)
        cols = cols[fg]
        vals = vals[fg]
        size = int(row_size[i])
        tp = int(vals.sum())
        if size == 0 or tp / size <= alpha:
            continue
        order = np.lexsort((cols, -vals))  # decreasing overlap, ties by label
        cum = 0.0
        ok = True
        for j, v in zip(cols[order], vals[order], strict=True):
            if outside_ratio[j] > beta:
                ok = False
                break
            cum += v / tp
            if cum >= gamma:
                break
        out[i - 1] = ok
    return out


def msseg_detection(
    pred_bin: np.ndarray,
    ref_bin: np.ndarray,
    voxel_mm3: float,
    alpha: float = 0.10,
    beta: float = 0.70,
    gamma: float = 0.65,
    min_mm3: float = 3.0,
    connectivity: int = 6,
) -> dict[str, float]:
    """MSSEG-style lesion detection (rule B; see the module docstring for the exact reading).

    Keys: n_ref, n_pred, tp_ref (detected reference lesions), fn, tp_pred (true-positive predicted
    components), fp, sensitivity, ppv, precision (= ppv), f1.
    """
    min_vox = _min_voxels(min_mm3, voxel_mm3)

    def components(mask: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
        labels, n = label_components(mask, connectivity)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        keep = sizes >= min_vox
        labels, n, _ = _relabel_kept(labels, n, keep)
        return labels, n, sizes[keep]

    _, n_ref, _, _, n_pred, _, table = _match_components(pred_bin, ref_bin, components)
    tp_ref = int(_detected_rows(table, alpha, beta, gamma).sum()) if n_ref and n_pred else 0
    tp_pred = int(_detected_rows(table.T.tocsr(), alpha, beta, gamma).sum()) if n_ref and n_pred else 0
    nan = math.nan
    sens = tp_ref / n_ref if n_ref else nan
    ppv = tp_pred / n_pred if n_pred else nan
    if sens == 0 or ppv == 0:
        f1 = 0.0
    elif math.isnan(sens) or math.isnan(ppv):
        f1 = nan
    else:
        f1 = 2.0 * sens * ppv / (sens + ppv)
    return {
        "n_ref": n_ref,
        "n_pred": n_pred,
        "tp_ref": tp_ref,
        "fn": n_ref - tp_ref,
        "tp_pred": tp_pred,
        "fp": n_pred - tp_pred,
        "sensitivity": sens,
        "ppv": ppv,
        "precision": ppv,
        "f1": f1,
    }


# ---------------------------------------------------------------------------------------- operating point

#: Minimum lesion sizes (ml) tried for a lesion mask's operating point (0: keep every component).
MIN_LESION_ML = (0.0, 0.025, 0.05, 0.075, 0.1)
#: Pooled validation Dice values this close to the best are ties when choosing the threshold (one
#: boundary voxel per lesion of two validation subjects moves the Dice by about this much).
THRESHOLD_DICE_TOLERANCE = 0.01


def lesion_mask(prob: np.ndarray, threshold: float, voxel_ml: float, min_lesion_ml: float = 0.0) -> np.ndarray:
    """The binary lesion mask of a probability map at an operating point: ``prob >= threshold``, then
    26-connected components smaller than ``min_lesion_ml`` removed."""
    b = binarise(prob, threshold)
    if min_lesion_ml > 0:
        labels, _, _ = clean_components(b, voxel_ml, min_lesion_ml)
        b = labels > 0
    return b


def choose_operating_point(
    cases: Sequence[tuple[np.ndarray, np.ndarray, float]],
    thresholds: Sequence[float] | np.ndarray = DEFAULT_THRESHOLDS,
    min_sizes_ml: Sequence[float] = MIN_LESION_ML,
    dice_tolerance: float = THRESHOLD_DICE_TOLERANCE,
) -> dict[str, float] | None:
    """A lesion map's operating point chosen on validation subjects ``cases`` = (probability map,
    reference mask, voxel ml) each (3D, zero outside the brain): the threshold maximising the pooled
    Dice (:func:`best_pooled_threshold`; the Dice does not see small false-positive components; Dice
    values within ``dice_tolerance`` of the best count as ties, resolved towards 0.5, because the
    Dice-threshold curve of a few validation subjects is flat and its exact maximum is noise), then,
    at that threshold, the minimum lesion size of ``min_sizes_ml`` maximising the mean lesion-wise F1
    (which does; ties go to the smaller size). Returns ``{"threshold", "dice", "min_lesion_ml", "f1"}``
    (``dice``: pooled, at the threshold with every component kept), or None without reference voxels."""
    if not cases:
        return None
    counts = sum(pooled_counts(p, r, thresholds) for p, r, _ in cases)
    best = best_pooled_threshold(counts, thresholds, dice_tolerance)
    if best is None:
        return None
    t = best["threshold"]
    scores = []
    for m in min_sizes_ml:
        f1 = [lesionwise_metrics(lesion_mask(p, t, v, m), r, v)["f1"] for p, r, v in cases]
        scores.append(float(np.nanmean(f1)) if np.isfinite(f1).any() else float("nan"))
    i = int(np.nanargmax(scores)) if np.isfinite(scores).any() else 0
    return {**best, "min_lesion_ml": float(min_sizes_ml[i]), "f1": scores[i]}
