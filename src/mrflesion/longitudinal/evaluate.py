"""Lesion-wise evaluation of new/enlarging-lesion maps, the pair report and the group tables.

Scoring (docs/evaluation.md, rule A of :mod:`mrflesion.evaluate.lesionwise`): 26-connected components
of the predicted and the reference new/enlarged masks, both cleaned of components < 0.01 ml; a reference
lesion is detected when a predicted component overlaps it; sensitivity, false positives per pair,
FPR = FP / reference lesions, lesion-wise F1 and the Dice over detected lesions.

A reference lesion is a 26-connected component of the reference mask, except where the reference says
which lesion each voxel belongs to (the phantom's truth, ``desc-newenlargedid``): then a lesion is one id,
because an enlarging lesion's new rim often breaks into several pieces on the voxel grid and counting each
piece as a lesion would make the sensitivity a measure of rim fragmentation (the plain component figures
are kept beside it as ``n_ref_components``, ``sensitivity_components``).

New or enlarging: a component (predicted or reference) that touches the baseline's lesion mask (after a
one-voxel dilation, 26-neighbourhood) is an enlarging lesion, any other a new one. The phantom's truth
says which directly (its dseg: 1 new, 2 enlarged; majority vote within the component).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from ..evaluate.lesionwise import lesion_hits, lesionwise_metrics, match_lesions, metrics_of
from ..evaluate.metrics import structure

#: metrics of a pair per method, in table order (what the group tables summarise)
METRICS = ("sensitivity", "fp", "fpr", "f1", "dice", "lesion_precision", "n_ref", "n_pred", "tp",
           "n_ref_components", "sensitivity_components",
           "sensitivity_new", "sensitivity_enlarged", "n_new", "n_enlarged", "volume_new_ml",
           "volume_enlarged_ml", "ref_n_new", "ref_n_enlarged", "ref_volume_new_ml", "ref_volume_enlarged_ml")
NEW, ENLARGED = 1, 2
KIND_NAMES = {NEW: "new", ENLARGED: "enlarged"}


def component_kinds(labels: np.ndarray, n: int, lesion_baseline: np.ndarray | None = None,
                    dseg: np.ndarray | None = None) -> np.ndarray:
    """Per component 1..n of ``labels``: NEW or ENLARGED (index 0 unused). From ``dseg`` (1 new, 2
    enlarged; the majority within the component, ties to enlarged) when given, else from the baseline
    lesion mask (touching it after a one-voxel dilation = enlarged), else every component NEW."""
    kinds = np.full(n + 1, NEW, dtype=np.int8)
    if n == 0:
        return kinds
    idx = np.arange(1, n + 1)
    if dseg is not None:
        d = np.asarray(dseg)
        n_new = ndimage.sum_labels(d == NEW, labels, idx)
        n_enl = ndimage.sum_labels(d == ENLARGED, labels, idx)
        kinds[1:] = np.where(n_enl >= n_new, ENLARGED, NEW)
        kinds[1:][(n_new + n_enl) == 0] = NEW
    elif lesion_baseline is not None:
        near = ndimage.binary_dilation(np.asarray(lesion_baseline) > 0, structure(3, 26))
        touch = ndimage.maximum(near, labels, idx)
        kinds[1:] = np.where(np.asarray(touch) > 0, ENLARGED, NEW)
    return kinds


def pair_metrics(pred: np.ndarray, ref: np.ndarray, voxel_ml: float, min_ml: float = 0.01,
                 lesion_baseline: np.ndarray | None = None, ref_dseg: np.ndarray | None = None,
                 ref_ids: np.ndarray | None = None) -> dict[str, float]:
    """Lesion-wise metrics of a predicted new/enlarged mask against the reference (see the module
    docstring), plus the count and volume of new and enlarging lesions in each and the sensitivity per
    kind of reference lesion (NaN where the reference has none of that kind). ``ref_ids``: a lesion id
    per reference voxel (the phantom's truth): each lesion counts once however many pieces its new
    tissue forms (``n_ref_components``, ``sensitivity_components``: the plain rule A figures)."""
    matched = match_lesions(pred, ref, voxel_ml, min_ml, ref_ids=ref_ids)
    m = metrics_of(matched, voxel_ml)
    out: dict[str, float] = {k: float(m[k]) for k in ("sensitivity", "fp", "fpr", "f1", "dice",
                                                       "lesion_precision", "n_ref", "n_pred", "tp")}
    plain = m if ref_ids is None else lesionwise_metrics(pred, ref, voxel_ml, min_ml)
    out["n_ref_components"] = float(plain["n_ref"])
    out["sensitivity_components"] = float(plain["sensitivity"])
    hit = np.concatenate([[False], lesion_hits(matched)[0]])
    p_kind = component_kinds(matched.pred_labels, matched.n_pred, lesion_baseline, None)
    r_kind = component_kinds(matched.ref_labels, matched.n_ref, lesion_baseline, ref_dseg)
    p_vol = np.asarray(matched.pred_sizes, np.float64) * voxel_ml
    r_vol = np.asarray(matched.ref_sizes, np.float64) * voxel_ml
    for kind, name in KIND_NAMES.items():
        pk = p_kind[1:] == kind
        rk = r_kind[1:] == kind
        out[f"n_{name}"] = float(pk.sum())
        out[f"volume_{name}_ml"] = float(p_vol[pk].sum())
        out[f"ref_n_{name}"] = float(rk.sum())
        out[f"ref_volume_{name}_ml"] = float(r_vol[rk].sum())
        out[f"sensitivity_{name}"] = float(hit[1:][rk].mean()) if rk.any() else float("nan")
    return out


def long_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Per-pair metric rows (pair, subject, site, split, method, metric...) -> the long table of
    :mod:`mrflesion.evaluate.tables` (subject = the pair, network = the method)."""
    recs = []
    for r in rows:
        for k in METRICS:
            recs.append({"subject": r["pair"], "site": r["site"], "split": r["split"], "network": r["method"],
                         "metric": k, "value": r.get(k, float("nan"))})
    return pd.DataFrame(recs, columns=["subject", "site", "split", "network", "metric", "value"])


def pooled_detection(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per site (and ``all``) and method: pairs, reference lesions, detected, false positives, the
    pooled sensitivity, FP per pair and lesion-wise F1 (counts summed over pairs before the ratios)."""
    rows = []
    for site_key, g0 in [*metrics.groupby("site", sort=True), ("all", metrics)]:
        for method, g in g0.groupby("method", sort=False):
            n_ref, tp, fp, n_pred = (float(g[k].sum()) for k in ("n_ref", "tp", "fp", "n_pred"))
            pred_true = n_pred - fp
            f1 = (2 * tp * pred_true / (tp * n_pred + pred_true * n_ref)) if tp and pred_true else (
                1.0 if n_ref == 0 and n_pred == 0 else 0.0)
            rows.append({"site": site_key, "method": method, "pairs": len(g), "lesions": int(n_ref),
                         "detected": int(tp), "false_positives": int(fp),
                         "sensitivity": tp / n_ref if n_ref else float("nan"),
                         "fp_per_pair": fp / len(g) if len(g) else float("nan"), "f1": f1,
                         "dice_detected_median": float(np.nanmedian(g["dice"])) if g["dice"].notna().any()
                         else float("nan")})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------- report


def pair_report(path: str | Path, pair: str, site: str, split: str, baseline: np.ndarray, followup: np.ndarray,
                brain: np.ndarray, maps: Mapping[str, tuple[np.ndarray, np.ndarray]], reference: np.ndarray | None,
                reference_name: str, metrics: pd.DataFrame, info: Mapping[str, Any]) -> Path:
    """The pair's HTML report: baseline, follow-up and their difference (the follow-up's FLAIR grid),
    each method's new/enlarged map outlined against the reference, and the metrics table.
    ``maps``: method -> (probability or score, binary mask)."""
    from ..evaluate.report import (
        _esc,
        _grey_row,
        _img,
        _mosaic_figure,
        _page,
        _Row,
        _write_atomic,
        html_table,
        mosaic,
        robust_window,
        slice_indices,
    )

    if brain.any():  # crop to the brain (and a margin): the lesions are a few voxels wide
        idx = np.argwhere(brain)
        lo = np.maximum(idx.min(0) - 3, 0)
        hi = np.minimum(idx.max(0) + 4, brain.shape)
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(None))
        baseline, followup, brain = baseline[box], followup[box], brain[box]
        reference = None if reference is None else reference[box]
        maps = {k: (p[box], m[box]) for k, (p, m) in maps.items()}
    ref = np.zeros(followup.shape) if reference is None else (reference > 0).astype(float)
    union = ref.copy()
    for _, m in maps.values():
        union = np.maximum(union, (m > 0).astype(float))
    zs = slice_indices(followup, n=5, prefer=union if union.any() else None)
    window = robust_window(baseline[brain], followup[brain]) if brain.any() else None
    diff = np.where(brain, followup - baseline, np.nan)
    colours = ("red", "yellow", "magenta", "orange")
    rows = [
        _grey_row(baseline, zs, "baseline FLAIR (normalised, on the follow-up grid)", window),
        _grey_row(followup, zs, "follow-up FLAIR", window,
                  contour=mosaic(ref, zs) if reference is not None else None),
        _Row(mosaic(diff, zs), "difference follow-up − baseline (brain median units)", cmap="RdBu_r",
             vmin=-0.6, vmax=0.6, cbar="difference"),
    ]
    for (name, (_, m)), c in zip(maps.items(), colours, strict=False):
        rows.append(_grey_row(followup, zs, f"{name}: {int((m > 0).sum())} voxels ({c}); reference outline cyan",
                              window, contour=mosaic(ref, zs) if reference is not None else None,
                              contours=((mosaic((m > 0).astype(float), zs), c),)))
    legend = [(f"reference ({reference_name})", "cyan")] + [
        (name, c) for name, c in zip(maps, colours, strict=False)]
    fig = _img(_mosaic_figure(rows, legend=legend, max_w=12.0, max_h=3.2),
               "baseline, follow-up, difference and new/enlarged maps")
    facts = "".join(f"<li>{_esc(k)}: {_esc(v)}</li>" for k, v in info.items())
    body = [
        f"<h1>New and enlarging lesions: {_esc(pair)}</h1>",
        f"<p>Site {_esc(site)}; split {_esc(split)}; reference: {_esc(reference_name)}. Axial slices "
        f"{', '.join(map(str, zs))} of the follow-up FLAIR grid.</p>",
        fig,
        "<h2>Lesion-wise metrics</h2>",
        html_table(metrics, caption="Rule A (docs/evaluation.md, docs/longitudinal.md): predicted lesions are "
                                    "components ≥ 0.01 ml (26-connected); a reference lesion (n_ref; its "
                                    "pieces: n_ref_components) is detected when a predicted component overlaps "
                                    "it. New vs enlarging: touching the baseline lesion mask."),
        f"<h2>Pair</h2><ul>{facts}</ul>",
    ]
    return _write_atomic(Path(path), _page(f"mrflesion longitudinal {pair}", body))


def group_report(path: str | Path, pooled: pd.DataFrame, summary: pd.DataFrame, tests: pd.DataFrame,
                 metrics: pd.DataFrame, pairs: pd.DataFrame, unpaired: Sequence[tuple[str, str]],
                 split: str) -> Path:
    """The longitudinal group report: pooled detection per site and method, the per-pair table, the
    per-site summary and the network-vs-comparator tests."""
    from ..evaluate.report import _esc, _page, _write_atomic, html_table

    cols = ["pair", "site", "method", "sensitivity", "fp", "f1", "dice", "n_ref", "n_pred", "n_new", "n_enlarged",
            "volume_new_ml", "volume_enlarged_ml"]
    show = metrics[metrics["split"] == split] if split != "all" else metrics
    un = "".join(f"<li>{_esc(s)}: {_esc(r)}</li>" for s, r in unpaired) or "<li>none</li>"
    body = [
        "<h1>New and enlarging lesions (longitudinal FLAIR)</h1>",
        f"<p>{len(pairs)} pairs; the tables below are over the <b>{_esc(split)}</b> pairs. Goal from the "
        "literature (Krüger et al. 2020): lesion-wise sensitivity ≥ 0.6 with ≤ 0.5 false positives per "
        "case (their CNN 0.60 / 0.48, inter-rater 0.62 / 0.41).</p>",
        html_table(pooled, caption="Pooled detection per site and method (counts summed over pairs)"),
        html_table(show[[c for c in cols if c in show.columns]], caption="Per pair"),
        html_table(summary[summary["metric"].isin(["sensitivity", "fp", "f1", "dice"])]
                   [["site", "network", "metric", "n", "mean_sd", "median_range"]],
                   caption="Per site: mean ± sd, median [range] over pairs"),
        html_table(tests, caption="Network vs comparator per metric (two-sided Mann–Whitney U, Bonferroni)"),
        html_table(pairs, caption="Pairs and their split"),
        f"<h2>Subjects without a pair</h2><ul>{un}</ul>",
    ]
    return _write_atomic(Path(path), _page("mrflesion longitudinal group report", body))
