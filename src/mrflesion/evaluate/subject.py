"""One subject's metrics tables: every lesion metric of docs/evaluation.md for each lesion map, the
T1/T2* deviations and tissue Dice for each map, against each reference (array functions; the rule
body that reads and writes the files is :mod:`mrflesion.steps.evaluation`).

Conventions: lesion maps are binarised with ``prob >= threshold`` (33 %), tissue maps at 80 %; T1/T2*
mean relative deviation |pred - ref| / ref over the T2w-space brain mask, where the T2* reference is
clipped at the network's ceiling (300 ms, see :class:`mrflesion.learn.data.Normalisation`: CSF T2*
beyond it is not a trained quantity).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .lesionwise import (
    VOLUME_GROUPS,
    group_detection,
    lesion_mask,
    lesion_table,
    lesionwise_metrics,
    msseg_detection,
)
from .metrics import (
    absolute_volume_difference,
    detection_rate,
    dice,
    hd95,
    mean_relative_deviation,
    normalised_dice,
    overlap_metrics,
    threshold_sweep,
    tissue_dice,
    voxel_volume_ml,
)


def lesion_metrics(prob: np.ndarray, ref: np.ndarray, brain: np.ndarray, zooms: Sequence[float],
                   threshold: float, min_lesion_ml: float = 0.0,
                   sweep: bool = True) -> tuple[dict[str, float], pd.DataFrame, pd.DataFrame | None]:
    """Every lesion metric of docs/evaluation.md for one probability map: metrics, the threshold
    sweep (threshold, dice, ldr) and the per-lesion table (rule A). The binary mask is
    ``prob >= threshold`` without its components smaller than ``min_lesion_ml``
    (:func:`mrflesion.evaluate.lesionwise.lesion_mask`). ``sweep=False`` skips the threshold sweep (it does not
    depend on the threshold; None is returned in its place).

    Reviewer-grade keys (conventions in ``evaluate.metrics`` / ``evaluate.lesionwise``): lw_f1 and
    lw_precision (rule A lesion detection), lesion_ndsc (nDSC, r = 0.001, region = ``brain``),
    lesion_avd (%), lesion_hd95 (mm, spacing = ``zooms``), lw_n_G1..G5 and lw_det_G1..G5 (rule A
    reference lesions and their detection rate per volume group)."""
    ref_bin = ref >= 0.5
    vml = voxel_volume_ml(zooms)
    pred_bin = lesion_mask(prob, threshold, vml, min_lesion_ml)
    m: dict[str, float] = {
        "lesion_dice": dice(pred_bin, ref_bin) if ref_bin.any() else math.nan,
        "lesion_ldr": detection_rate(pred_bin, ref_bin),
        "lesion_ref_ml": float(ref_bin.sum() * vml),
        "lesion_pred_ml": float(pred_bin.sum() * vml),
    }
    ov = overlap_metrics(pred_bin, ref_bin, mask=brain)
    for k in ("iou", "precision", "recall", "accuracy"):
        m[f"lesion_{k}"] = float(ov[k])
    lw = lesionwise_metrics(pred_bin, ref_bin, vml)
    for k in ("sensitivity", "fp", "fpr", "dice", "n_ref", "n_pred"):
        m[f"lw_{k}"] = float(lw[k])
    m["lw_f1"] = float(lw["f1"])
    m["lw_precision"] = float(lw["lesion_precision"])
    m["lesion_ndsc"] = normalised_dice(pred_bin, ref_bin, mask=brain)
    m["lesion_avd"] = absolute_volume_difference(pred_bin, ref_bin)
    m["lesion_hd95"] = hd95(pred_bin, ref_bin, spacing=zooms)
    ms = msseg_detection(pred_bin, ref_bin, vml * 1000.0)
    for k in ("sensitivity", "ppv", "f1", "fp"):
        m[f"msseg_{k}"] = float(ms[k])
    curves = threshold_sweep(prob, ref_bin) if sweep else None
    lesions = lesion_table(pred_bin, ref_bin, vml)
    n_group, det_group = group_detection(lesions["volume_ml"].to_numpy(), lesions["detected"].to_numpy())
    for g, n, det in zip(VOLUME_GROUPS, n_group, det_group, strict=True):
        m[f"lw_n_{g}"] = float(n)
        m[f"lw_det_{g}"] = float(det)
    return m, curves, lesions


#: Lesion metrics that depend on the reference alone (not repeated at the validation threshold).
REFERENCE_ONLY_METRICS = frozenset({"lesion_ref_ml", "lw_n_ref"} | {f"lw_n_G{i}" for i in range(1, 6)})


#: A voxel is pure tissue when one tissue class (WM incl. lesion, GM, the rest) holds at least this
#: fraction of it: a partial-volume voxel has no single true T1/T2* (docs/phantom.md), so accuracy
#: against the phantom's truth maps is also given over pure voxels (``*_mrd_pure``).
PURE_TISSUE_FRACTION = 0.9


def pure_tissue_mask(wm: np.ndarray, gm: np.ndarray, brain: np.ndarray,
                     fraction: float = PURE_TISSUE_FRACTION) -> np.ndarray:
    """Brain voxels where WM (lesions included), GM or the remainder (CSF) holds ``fraction`` or more."""
    rest = 1.0 - wm - gm
    return brain & ((wm >= fraction) | (gm >= fraction) | (rest >= fraction))


def map_metrics(name: str, pred: np.ndarray, ref: np.ndarray, brain: np.ndarray,
                t2s_max_ms: float = 300.0, tissue_threshold: float = 0.8,
                pure: np.ndarray | None = None) -> dict[str, float]:
    """T1/T2* mean relative deviation inside ``brain`` (and inside ``pure`` as ``*_mrd_pure`` when
    given), or a tissue map's Dice at ``tissue_threshold``."""
    if name in ("T1", "T2star"):
        r = ref if name == "T1" else np.minimum(ref, t2s_max_ms)
        out = {f"{name}_mrd": mean_relative_deviation(pred, r, brain)}
        if pure is not None:
            out[f"{name}_mrd_pure"] = mean_relative_deviation(pred, r, brain & pure)
        return out
    return {f"{name}_dice": tissue_dice(pred * brain, ref * brain, tissue_threshold)}


def subject_metrics(
    outputs: Mapping[str, Mapping[str, np.ndarray]],
    references: Mapping[str, Mapping[str, np.ndarray]],
    brain: np.ndarray,
    zooms: Sequence[float],
    threshold: float,
    tissue_threshold: float = 0.8,
    val_thresholds: Mapping[str, Mapping[str, float] | None] | None = None,
    pure: Mapping[str, np.ndarray] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Long tables for one subject: metrics (network, reference, metric, value), curves (network,
    reference, threshold, dice, ldr) and lesions (network, reference, lesion table columns).

    ``val_thresholds``: per network, its operating point chosen on the validation subjects
    (``{"threshold", "min_lesion_ml"}``); the lesion metrics are then also given there, named with the
    suffix ``_vt`` (the point itself as ``lesion_threshold_vt`` and ``lesion_min_ml_vt``); the curves
    and lesion tables are those at ``threshold``. ``pure``: per reference, a pure-tissue mask over
    which the T1/T2* deviations are given too (:func:`pure_tissue_mask`; the phantom's truth)."""
    rows, curves, lesions = [], [], []
    for net, maps in outputs.items():
        vt = (val_thresholds or {}).get(net)
        for refname, refmaps in references.items():
            for name, pred in maps.items():
                if name not in refmaps:
                    continue
                if name == "lesion":
                    m, c, les = lesion_metrics(pred, refmaps[name], brain, zooms, threshold)
                    curves.append(c.assign(network=net, reference=refname))
                    les = les.rename(columns={"group": "volume_group"})
                    lesions.append(les.assign(network=net, reference=refname))
                    if vt:
                        mv = lesion_metrics(pred, refmaps[name], brain, zooms, float(vt["threshold"]),
                                            float(vt.get("min_lesion_ml", 0.0)), sweep=False)[0]
                        m.update({f"{k}_vt": v for k, v in mv.items() if k not in REFERENCE_ONLY_METRICS})
                        m["lesion_threshold_vt"] = float(vt["threshold"])
                        m["lesion_min_ml_vt"] = float(vt.get("min_lesion_ml", 0.0))
                else:
                    m = map_metrics(name, pred, refmaps[name], brain, tissue_threshold=tissue_threshold,
                                    pure=(pure or {}).get(refname))
                rows += [{"network": net, "reference": refname, "metric": k, "value": float(v)} for k, v in m.items()]
    metrics = pd.DataFrame(rows, columns=["network", "reference", "metric", "value"])
    cur = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(
        columns=["threshold", "dice", "ldr", "network", "reference"])
    les = pd.concat(lesions, ignore_index=True) if lesions else pd.DataFrame(columns=["network", "reference"])
    return metrics, cur, les
