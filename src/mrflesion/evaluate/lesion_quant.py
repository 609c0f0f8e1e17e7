"""Per-lesion quantitative measurements: what a lesion's T1, T2* and B1 are, where it lies.

Pure array functions (no file I/O). A lesion is a 26-connected component of a binary lesion mask
(the manual mask, or a network's map binarised at its operating point). For each lesion:

* ``volume_ml`` and ``voxels``;
* ``location``: the first class that applies, in this order:
  ``infratentorial`` (any voxel in the given infratentorial mask; only where such a mask is given,
  i.e. where the imaged slab covers the posterior fossa and it is known), ``periventricular`` (the
  lesion reaches within ``periventricular_mm`` of the lateral ventricles), ``juxtacortical`` (within
  ``juxtacortical_mm`` of grey matter, GM probability >= ``gm_threshold`` outside the lesion and
  the voxels next to it: lesion tissue's raised T1 makes the tissue model call it grey matter),
  else ``deep_white_matter``. Distances are in mm, Euclidean, from the nearest lesion voxel centre
  to the nearest voxel centre of the structure;
* per quantitative map (T1, T2*, B1): the mean and median over the lesion's measured voxels (those
  whose CSF probability is below ``measure_csf_below``: an outline drawn on FLAIR that reaches into a
  ventricle or sulcus is not lesion tissue, and one CSF voxel's T2* of a second would dominate the
  mean), and each divided by the subject's normal-appearing white matter (NAWM) reference, the
  median of the map over the voxels whose NAWM probability is at least ``nawm_threshold`` and that
  belong to no lesion (``*_mean_ratio``, ``*_median_ratio``; 1 = as NAWM). The mean ratio is the
  one to quote: the median of a small lesion's voxels, half of which are partial-volume edge, jumps
  between the lesion's and the surrounding white matter's values.

The lateral ventricles are found in the subject's CSF probability map (:func:`ventricle_mask`): CSF at
least ``csf_threshold`` deeper than ``margin_mm`` inside the brain mask (sulcal and extra-cerebral CSF
lie near the brain's surface), its largest 26-connected components (at most two) of at least
``min_ml``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage

#: Location classes, in the order they are tested.
LOCATIONS = ("infratentorial", "periventricular", "juxtacortical", "deep_white_matter")

#: The quantitative maps measured per lesion (names as in the pipeline's outputs) and their units.
QUANT_UNITS = {"T1": "ms", "T2star": "ms", "B1": "1 (transmit field scale)"}

_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class LesionTableRules:
    """Thresholds of the location classes and the NAWM reference (config ``lesion_table``)."""

    periventricular_mm: float
    juxtacortical_mm: float
    csf_threshold: float
    ventricle_margin_mm: float
    ventricle_min_ml: float
    gm_threshold: float
    nawm_threshold: float
    measure_csf_below: float

    @classmethod
    def from_config(cls, cfg: Mapping[str, float]) -> LesionTableRules:
        return cls(**{k: float(cfg[k]) for k in cls.__dataclass_fields__})


def label_lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of ``mask`` (> 0.5): (int32 labels 1..n, n)."""
    labels, n = ndimage.label(np.asarray(mask) > 0.5, structure=_STRUCTURE_26)
    return labels.astype(np.int32, copy=False), int(n)


def ventricle_mask(csf: np.ndarray, brain: np.ndarray, zooms: Sequence[float], rules: LesionTableRules) -> np.ndarray:
    """The lateral ventricles in a CSF probability map (see the module docstring); may be empty."""
    brain = np.asarray(brain) > 0.5
    depth = ndimage.distance_transform_edt(brain, sampling=tuple(float(z) for z in zooms[:3]))
    cand = (np.asarray(csf) >= rules.csf_threshold) & (depth > rules.ventricle_margin_mm)
    labels, n = ndimage.label(cand, structure=_STRUCTURE_26)
    if n == 0:
        return cand
    vml = float(np.prod(np.asarray(zooms[:3], dtype=np.float64))) / 1000.0
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:] * vml
    order = np.argsort(sizes)[::-1][:2]
    keep = [int(i) + 1 for i in order if sizes[i] >= rules.ventricle_min_ml]
    return np.isin(labels, keep)


def _distance_to(structure: np.ndarray, zooms: Sequence[float]) -> np.ndarray:
    """Distance (mm) of every voxel centre to the nearest voxel of ``structure`` (inf when empty)."""
    if not structure.any():
        return np.full(structure.shape, np.inf)
    return ndimage.distance_transform_edt(~structure, sampling=tuple(float(z) for z in zooms[:3]))


def lesion_locations(labels: np.ndarray, n: int, zooms: Sequence[float], ventricles: np.ndarray,
                     gm: np.ndarray, rules: LesionTableRules,
                     infratentorial: np.ndarray | None = None) -> pd.DataFrame:
    """Per lesion 1..n: ``location`` and the distances (mm) ``ventricle_distance_mm`` and
    ``cortex_distance_mm`` of its nearest voxel (NaN when the structure is not found)."""
    idx = np.arange(1, n + 1)
    if n == 0:
        return pd.DataFrame(columns=["lesion", "location", "ventricle_distance_mm", "cortex_distance_mm"])
    d_vent = _distance_to(np.asarray(ventricles, dtype=bool), zooms)
    near_lesion = ndimage.binary_dilation(labels > 0, structure=_STRUCTURE_26)
    d_ctx = _distance_to((np.asarray(gm) >= rules.gm_threshold) & ~near_lesion, zooms)
    vent = np.asarray(ndimage.minimum(d_vent, labels, idx), dtype=np.float64).reshape(-1)
    ctx = np.asarray(ndimage.minimum(d_ctx, labels, idx), dtype=np.float64).reshape(-1)
    infra = (np.asarray(ndimage.maximum(np.asarray(infratentorial) > 0.5, labels, idx), dtype=bool).reshape(-1)
             if infratentorial is not None else np.zeros(n, dtype=bool))
    loc = np.where(infra, "infratentorial",
                   np.where(vent <= rules.periventricular_mm, "periventricular",
                            np.where(ctx <= rules.juxtacortical_mm, "juxtacortical", "deep_white_matter")))
    return pd.DataFrame({"lesion": idx, "location": loc,
                         "ventricle_distance_mm": np.where(np.isfinite(vent), vent, np.nan),
                         "cortex_distance_mm": np.where(np.isfinite(ctx), ctx, np.nan)})


def nawm_reference(maps: Mapping[str, np.ndarray], nawm: np.ndarray, lesions: np.ndarray,
                   threshold: float) -> dict[str, float]:
    """Median of each map over NAWM (probability >= ``threshold``, outside ``lesions``; finite,
    positive values); NaN for a map without such voxels."""
    sel = (np.asarray(nawm) >= threshold) & ~(np.asarray(lesions) > 0)
    out = {}
    for name, arr in maps.items():
        v = np.asarray(arr)[sel]
        v = v[np.isfinite(v) & (v > 0)]
        out[name] = float(np.median(v)) if v.size else float("nan")
    return out


def lesion_quantities(labels: np.ndarray, n: int, maps: Mapping[str, np.ndarray],
                      reference: Mapping[str, float], voxel_ml: float,
                      measure: np.ndarray | None = None) -> pd.DataFrame:
    """Per lesion 1..n: ``voxels``, ``volume_ml``, ``centroid_ijk``, ``measured_voxels`` and per map
    ``<map>_mean``, ``<map>_median``, ``<map>_mean_ratio``, ``<map>_median_ratio`` (to
    ``reference[map]``) over the lesion's voxels within ``measure`` (all when None; NaN for a lesion
    without such voxels)."""
    idx = np.arange(1, n + 1)
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:] if n else np.zeros(0, dtype=np.int64)
    df = pd.DataFrame({"lesion": idx, "voxels": counts.astype(np.int64), "volume_ml": counts * float(voxel_ml)})
    measured = labels if measure is None else np.where(np.asarray(measure, dtype=bool), labels, 0)
    df["measured_voxels"] = (np.bincount(measured.ravel(), minlength=n + 1)[1:] if n else counts).astype(np.int64)
    if n:
        cen = np.asarray(ndimage.center_of_mass(np.ones(labels.shape), labels, idx), dtype=np.float64).reshape(n, 3)
        df["centroid_ijk"] = [",".join(f"{c:.1f}" for c in row) for row in cen]
    else:
        df["centroid_ijk"] = pd.Series(dtype=str)
    for name, arr in maps.items():
        arr = np.asarray(arr, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.asarray(ndimage.mean(arr, measured, idx), dtype=np.float64).reshape(-1) if n else np.zeros(0)
            median = (np.asarray(ndimage.median(arr, measured, idx), dtype=np.float64).reshape(-1)
                      if n else np.zeros(0))
        empty = df["measured_voxels"].to_numpy() == 0
        mean[empty] = np.nan
        median[empty] = np.nan
        ref = float(reference.get(name, float("nan")))
        df[f"{name}_mean"] = mean
        df[f"{name}_median"] = median
        df[f"{name}_mean_ratio"] = mean / ref if ref > 0 else np.nan
        df[f"{name}_median_ratio"] = median / ref if ref > 0 else np.nan
    return df


def quantify_lesions(mask: np.ndarray, maps: Mapping[str, np.ndarray], nawm: np.ndarray, csf: np.ndarray,
                 gm: np.ndarray, brain: np.ndarray, zooms: Sequence[float], rules: LesionTableRules,
                 infratentorial: np.ndarray | None = None,
                 exclude: np.ndarray | None = None) -> tuple[pd.DataFrame, dict[str, float]]:
    """The per-lesion table of one binary lesion mask (columns of :func:`lesion_quantities` and
    :func:`lesion_locations`), and the NAWM reference it used. ``exclude``: voxels kept out of the
    NAWM reference besides the mask's own lesions (e.g. the manual mask)."""
    labels, n = label_lesions(mask)
    lesion_any = labels > 0
    if exclude is not None:
        lesion_any = lesion_any | (np.asarray(exclude) > 0.5)
    ref = nawm_reference(maps, nawm, lesion_any, rules.nawm_threshold)
    voxel_ml = float(np.prod(np.asarray(zooms[:3], dtype=np.float64))) / 1000.0
    quant = lesion_quantities(labels, n, maps, ref, voxel_ml, np.asarray(csf) < rules.measure_csf_below)
    loc = lesion_locations(labels, n, zooms, ventricle_mask(csf, brain, zooms, rules), gm, rules, infratentorial)
    table = quant.merge(loc, on="lesion", how="left") if n else pd.concat([quant, loc.drop(columns="lesion")], axis=1)
    first = ["lesion", "voxels", "volume_ml", "location", "ventricle_distance_mm", "cortex_distance_mm",
             "centroid_ijk", "measured_voxels"]
    return table[first + [c for c in table.columns if c not in first]], ref


def match_truth(labels: np.ndarray, n: int, truth_ids: np.ndarray) -> np.ndarray:
    """Per lesion 1..n: the truth lesion identity (``truth_ids``, 0 = none) it overlaps most, 0 when it
    overlaps none."""
    out = np.zeros(n, dtype=np.int64)
    tid = np.asarray(truth_ids).astype(np.int64)
    sel = (labels > 0) & (tid > 0)
    if not sel.any():
        return out
    pairs = pd.DataFrame({"lesion": labels[sel], "truth": tid[sel]}).value_counts().reset_index(name="k")
    best = pairs.sort_values(["lesion", "k", "truth"], ascending=[True, False, True]).drop_duplicates("lesion")
    out[best["lesion"].to_numpy() - 1] = best["truth"].to_numpy()
    return out


def truth_ratios(labels: np.ndarray, n: int, truth_maps: Mapping[str, np.ndarray], truth_nawm: np.ndarray,
                 truth_lesion: np.ndarray, measure: np.ndarray, threshold: float) -> pd.DataFrame:
    """The same measurement on the ground truth: per lesion 1..n of ``labels``, the mean of each true
    map over the same measured voxels divided by the median of the true map over the true NAWM
    (probability >= ``threshold``, outside the true lesions and ``labels``): ``<map>_mean_ratio``.
    What the measured ratios are compared with (the quantification, not the segmentation)."""
    ref = nawm_reference(truth_maps, truth_nawm, (labels > 0) | (np.asarray(truth_lesion) > 0.5), threshold)
    q = lesion_quantities(labels, n, truth_maps, ref, 1.0, measure)
    return q[["lesion"] + [f"{m}_mean_ratio" for m in truth_maps]]


def with_truth(table: pd.DataFrame, mask: np.ndarray, truth_ids: np.ndarray, truth_locations: Mapping[int, str],
               truth_maps: Mapping[str, np.ndarray], truth_nawm: np.ndarray, truth_lesion: np.ndarray,
               csf: np.ndarray, rules: LesionTableRules) -> pd.DataFrame:
    """``table`` (of :func:`quantify_lesions` on ``mask``) with the phantom's truth: ``truth_lesion``
    (identity overlapped most, 0 none), ``truth_location`` (the generator's class of that lesion, n/a
    without one) and ``truth_<map>_mean_ratio`` (:func:`truth_ratios`, same voxels)."""
    labels, n = label_lesions(mask)
    out = table.copy()
    ids = match_truth(labels, n, truth_ids)
    out["truth_lesion"] = ids
    out["truth_location"] = [truth_locations.get(int(i), "n/a") if i else "n/a" for i in ids]
    tr = truth_ratios(labels, n, truth_maps, truth_nawm, truth_lesion, np.asarray(csf) < rules.measure_csf_below,
                      rules.nawm_threshold)
    for m in truth_maps:
        out[f"truth_{m}_mean_ratio"] = tr[f"{m}_mean_ratio"].to_numpy()
    return out
