"""Rule bodies of inference, per-subject evaluation and the group tables (docs/evaluation.md).

* ``evaluate_subject``, one job per subject: first every trained network applied to the subject
  (:func:`apply_networks`; outputs in T2w space, physical units, with sidecars; :func:`output_files`
  names them ``desc-<network label>``, the network name without non-alphanumerics, e.g. ``MSE-2-1``
  -> ``MSE21``), then every network's outputs evaluated against (a) the pipeline's references as in the
  method (dictionary T1/T2* in T2w space, SPM-style NAWM/GM, the registered manual mask) and (b) the
  phantom's ground truth when the input is the phantom. Writes a long metrics TSV (network,
  reference, metric, value), the same as JSON, the threshold curves and per-lesion tables, and the
  self-contained HTML report.
* ``group_evaluation``: per-site tables (TSV + HTML) over the subjects of ``evaluation.summary_splits``.

Metric conventions: lesion maps are binarised with ``prob >= threshold`` (33 %), tissue maps at 80 %;
T1/T2* mean relative deviation |pred - ref| / ref over the T2w-space brain mask, where the T2* reference
is clipped at the network's ceiling (300 ms, see :class:`mrflesion.learn.data.Normalisation`: CSF T2*
beyond it is not a trained quantity).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from .io import write_derivative, write_json, write_text
from .layout import COHORT, MODELS, TEMPLATES, WORK, derivative, derivatives, file, sidecar_path
from .learn_steps import TRAIN_IMAGES, needed_images, ready_file

#: Name of the classical lesion baseline in the tables and reports (beside the networks).
BASELINE = "baseline"

#: Network outputs in T2w space, relative to output_dir (``{stem}``, ``{label}`` filled in; mrflesion.layout).
OUTPUT_FILES = TEMPLATES["network"]
UNITS = {"T1": "ms", "T2star": "ms", "NAWM": "1 (probability)", "GM": "1 (probability)",
         "lesion": "1 (probability)"}

#: The pipeline's references in T2w space (method), relative to output_dir: the training images.
REFERENCE_FILES = TRAIN_IMAGES

#: Phantom ground truth in T2w space, relative to the phantom's derivatives/truth.
TRUTH_FILES = TEMPLATES["truth"]

#: The phantom's per-lesion truth (BIDS dseg look-up table of ``lesionid``: location class, drawn ratios).
TRUTH_LESION_TABLE = TEMPLATES["truth_table"]["lesionid"]

#: Quantitative maps of the per-lesion table (dictionary maps in T2w space), relative to output_dir.
QUANT_FILES = {k: TEMPLATES["register"][k] for k in ("T1", "T2star", "B1")}

#: Conventional-chain rules whose Snakemake benchmark files give the per-subject timings.
CHAIN_STEPS = ("check_inputs", "qmri", "register", "tissue")


def net_label(name: str) -> str:
    """BIDS-safe ``desc`` label of a network name (alphanumerics only)."""
    label = re.sub(r"[^A-Za-z0-9]", "", name)
    if not label:
        raise ValueError(f"network name {name!r} has no letters or digits")
    return label


def output_files(out_dir: str, stem: str, network: str, outputs: Sequence[str]) -> dict[str, str]:
    return derivatives("network", out_dir, stem, keys=outputs, label=net_label(network))


def check_labels(networks: Sequence[str]) -> None:
    labels = [net_label(n) for n in networks]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"mrflesion: network names map to the same file label(s) {dup}; rename them")


# ---------------------------------------------------------------------------------------- inference


def apply_networks(key: str, images: Mapping[str, str], models: Mapping[str, Mapping[str, Any]],
                   outputs: Mapping[str, Mapping[str, str]], cfg: Mapping[str, Any], threads: int) -> dict[str, Any]:
    """One subject through every trained network (``outputs``: network -> output name -> path); a NIfTI
    and a JSON sidecar per output, on the T2w grid of ``images["mask"]``. ``models`` is the
    ``Networks`` table of ``models/models.json``. Returns, per network, its model, training history,
    output paths and timings."""
    import nibabel as nib

    from .learn import checkpoint
    from .learn.infer import infer_subject

    ref = nib.load(images["mask"])
    cache: dict[Any, Any] = {}  # images loaded once for the networks that share them
    record: dict[str, Any] = {}
    for net, paths in outputs.items():
        model = models[net]["Weights"]
        subject = {"subject": key, "mask": images["mask"]}
        ck = checkpoint.load(model)
        for k in needed_images(ck["spec"]):
            if k in ("mrf", "T1", "T2star"):
                subject[k] = images[k]
        outs, rec = infer_subject(ck, subject, mode=str(cfg["mode"]), window=int(cfg["window"]),
                                  overlap=float(cfg["overlap"]), device=str(cfg["device"]),
                                  threads=threads, cache=cache)
        for name, vol in outs.items():
            write_derivative(paths[name], vol, ref, dtype=np.float32, sidecar={
                "Description": f"U-net {rec['network']}: {name}",
                "Units": UNITS[name],
                "Space": "T2w",
                "Sources": [str(model)] + [str(v) for k, v in subject.items() if k != "subject"],
                "Inference": {k: v for k, v in rec.items() if k != "affine"},
            })
        chosen = ck.get("lesion_threshold") or None
        record[net] = {
            "model": model, "history": models[net]["History"], "val_threshold": chosen,
            "outputs": {name: str(paths[name]) for name in outs},
            **{k: rec[k] for k in ("device", "mode", "load_seconds", "predict_seconds")},
        }
        print(f"{key} {rec['network']}: {rec['predict_seconds']:.2f} s prediction ({rec['device']}, "
              f"{rec['mode']}), {rec['load_seconds']:.2f} s loading")
    return record


# ---------------------------------------------------------------------------------------- metrics


def _load(path: str | Path) -> tuple[np.ndarray, Any]:
    import nibabel as nib

    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=np.float32), img


def lesion_metrics(prob: np.ndarray, ref: np.ndarray, brain: np.ndarray, zooms: Sequence[float],
                   threshold: float, min_lesion_ml: float = 0.0,
                   sweep: bool = True) -> tuple[dict[str, float], pd.DataFrame, pd.DataFrame | None]:
    """Every lesion metric of docs/evaluation.md for one probability map: metrics, the threshold
    sweep (threshold, dice, ldr) and the per-lesion table (rule A). The binary mask is
    ``prob >= threshold`` without its components smaller than ``min_lesion_ml``
    (:func:`mrflesion.evaluate.lesion_mask`). ``sweep=False`` skips the threshold sweep (it does not
    depend on the threshold; None is returned in its place).

    Reviewer-grade keys (conventions in ``evaluate.metrics`` / ``evaluate.lesionwise``): lw_f1 and
    lw_precision (rule A lesion detection), lesion_ndsc (nDSC, r = 0.001, region = ``brain``),
    lesion_avd (%), lesion_hd95 (mm, spacing = ``zooms``), lw_n_G1..G5 and lw_det_G1..G5 (rule A
    reference lesions and their detection rate per volume group)."""
    from .evaluate import (
        VOLUME_GROUPS,
        absolute_volume_difference,
        detection_rate,
        dice,
        group_detection,
        hd95,
        lesion_mask,
        lesion_table,
        lesionwise_metrics,
        msseg_detection,
        normalised_dice,
        overlap_metrics,
        threshold_sweep,
        voxel_volume_ml,
    )

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
    from .evaluate import mean_relative_deviation, tissue_dice

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


def _benchmark_seconds(path: str | Path) -> float:
    try:
        return float(pd.read_csv(path, sep="\t")["s"].iloc[0])
    except (OSError, KeyError, IndexError, ValueError, pd.errors.EmptyDataError):
        return math.nan


def provenance(config: Mapping[str, Any]) -> dict[str, str]:
    from .model_card import config_sha256
    from .paths import workflow_root
    from .workflow import version_info

    info = {f"version {k}": v for k, v in version_info().items()}
    info["config sha256"] = config_sha256(config)
    root = workflow_root()
    commit = ""
    if (root / ".git").exists():  # a checkout; an installed copy must not report an enclosing repository's commit
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                    capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
    info["commit"] = commit or "unknown (not a git checkout)"
    info["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return info


def evaluate_subject(smk: Any) -> None:
    """Every trained network applied to one subject (:func:`apply_networks`), then its metrics,
    curves, lesion tables and HTML report."""
    from .evaluate.report import NetworkResult, SubjectReport, write_subject_report
    from .model_card import schedule_problem

    # params.info: the subject's details (EvaluationPlan.evaluate_params); cfg: the evaluation config;
    # config: the run's configuration (provenance), from snakemake.config: not a param, it reruns nothing
    from .steps import StepError

    p = SimpleNamespace(**smk.params.info, cfg=smk.params.cfg, config=smk.config)
    record = json.loads(Path(smk.input.models).read_text())
    models = {}
    cards: dict[str, Any] = {}
    for net in p.networks:
        problem = check_weights(net, p.weights[net], record["Networks"].get(net))
        card = json.loads(Path(p.cards[net]).read_text()) if Path(p.cards[net]).is_file() else None
        if card is not None:
            cards[net] = card
            problem = problem or schedule_problem(card, p.schedule)
        if problem:
            raise StepError(f"{p.key}: {problem}: {p.sidecar if 'schedule' in problem else p.weights[net]}")
        models[net] = {"Weights": p.weights[net], "History": p.histories[net]}
    inferred = apply_networks(
        p.key, p.images, models,
        {net: {o: smk.output[f"{net_label(net)}_{o}"] for o in outs} for net, outs in p.networks.items()},
        {**smk.params.inference, "device": smk.config["inference"]["device"]}, int(smk.threads))
    threshold = float(p.cfg["threshold"])
    tissue_threshold = float(p.cfg["tissue_threshold"])
    f = p.files  # under the declared input `ready` (see EvaluationPlan)
    brain_f, brain_img = _load(f["mask"])
    brain = brain_f > 0.5
    zooms = brain_img.header.get_zooms()[:3]
    refs: dict[str, dict[str, np.ndarray]] = {"pipeline": {k: _load(f[f"ref_{k}"])[0]
                                                           for k in ("T1", "T2star", "NAWM", "GM", "lesion")}}
    if p.truth:
        t = {k: _load(v)[0] for k, v in p.truth.items() if k != "lesionid"}
        refs["truth"] = {"T1": t["T1"], "T2star": t["T2star"], "GM": t["GM"], "lesion": t["lesion"],
                         "NAWM": t["WM"] * (t["lesion"] < 0.5)}
    outputs: dict[str, dict[str, np.ndarray]] = {}
    infer_s: dict[str, float] = {}
    for net in p.networks:
        outputs[net] = {o: _load(path)[0] for o, path in inferred[net]["outputs"].items()}
        infer_s[net] = float(inferred[net]["predict_seconds"]) + float(inferred[net]["load_seconds"])
    outputs[BASELINE] = {"lesion": _load(f["baseline"])[0]}
    val_thresholds = {net: inferred[net]["val_threshold"] for net in p.networks}
    base = (record.get("Baseline") or {}).get("LesionThreshold")
    val_thresholds[BASELINE] = base and {"threshold": base["validation"], "min_lesion_ml": base["min_lesion_ml"]}
    pure = {"truth": pure_tissue_mask(t["WM"], t["GM"], brain)} if p.truth else None
    metrics, curves, lesions = subject_metrics(outputs, refs, brain, zooms, threshold, tissue_threshold,
                                               val_thresholds, pure)
    chain = {s: _benchmark_seconds(b) for s, b in p.benchmarks.items()}
    meta = {"subject": p.key, "site": p.site, "group": p.group, "split": p.split}
    for df in (metrics, curves, lesions):
        for i, (name, value) in enumerate(meta.items()):
            df.insert(i, name, value)
    write_text(smk.output.metrics, metrics.to_csv(sep="\t", index=False, na_rep="n/a"))
    write_json(smk.output.json, {
        **meta, "threshold": threshold, "tissue_threshold": tissue_threshold,
        "metrics": {net: {ref: {r.metric: (None if not math.isfinite(r.value) else r.value)
                                for r in g2.itertuples()} for ref, g2 in g.groupby("reference")}
                    for net, g in metrics.groupby("network")},
        "inference_seconds": infer_s,
        "conventional_seconds": chain,
    })
    write_text(smk.output.curves, curves.to_csv(sep="\t", index=False, na_rep="n/a"))
    write_text(smk.output.lesions, lesions.to_csv(sep="\t", index=False, na_rep="n/a"))
    quant, quant_side = subject_lesion_quant(
        p, refs["pipeline"]["lesion"], outputs, val_thresholds, threshold, brain, zooms, smk.params.lesion_table)
    for i, (name, value) in enumerate(meta.items()):
        quant.insert(i, name, value)
    write_text(smk.output.quant, quant.to_csv(sep="\t", index=False, na_rep="n/a", float_format="%.6g"))
    write_json(sidecar_path(smk.output.quant), quant_side)

    # ----- report
    timings = {f"conventional: {k}": v for k, v in chain.items()}
    timings["conventional: total"] = float(np.nansum(list(chain.values())))
    timings.update({f"inference: {k}": v for k, v in infer_s.items()})
    qc = {}
    mrf_raw, _ = _load(f["raw_mrf"])
    qc["MRF (measurement 1)"] = mrf_raw[..., 0]
    qc["T2w"] = _load(f["raw_t2w"])[0]
    qc["FLAIR"] = _load(f["raw_flair"])[0]
    underlay = _load(f["mrf_t2w"])[0].mean(axis=-1)
    # FLAIR in T2w space for the lead section (without it the report shows the MRF underlay and says so)
    flair_t2w = f.get("flair_t2w")
    flair = _load(flair_t2w)[0] if flair_t2w and Path(flair_t2w).is_file() else None
    results = []
    for net, maps in outputs.items():
        m = metrics[(metrics.network == net) & (metrics.reference == "pipeline")]
        c = curves[(curves.network == net) & (curves.reference == "pipeline")] if len(curves) else curves
        les = lesions[(lesions.network == net) & (lesions.reference == "pipeline")] if len(lesions) else lesions
        rec = inferred.get(net, {})  # the baseline has no inference record (no model, no history)
        hist = pd.read_csv(rec["history"], sep="\t") if rec.get("history") else pd.DataFrame()
        mdict = dict(zip(m.metric, m.value, strict=True))
        vt = mdict.get("lesion_threshold_vt")
        results.append(NetworkResult(
            name=net, outputs=maps, references={k: refs["pipeline"][k] for k in maps if k in refs["pipeline"]},
            curves=c.rename(columns={"ldr": "detection_rate"})[["threshold", "dice", "detection_rate"]]
            if len(c) else pd.DataFrame(columns=["threshold", "dice", "detection_rate"]),
            lesions=_lesion_rows(les), history=hist, metrics=mdict, threshold=threshold,
            inference_s=infer_s.get(net, math.nan),
            val_threshold=None if vt is None or not math.isfinite(float(vt)) else float(vt),
            val_min_lesion_ml=float(mdict.get("lesion_min_ml_vt", 0.0)),
        ))
    truth = None
    if "truth" in refs:
        tm = metrics[metrics.reference == "truth"]
        truth = tm.pivot_table(index="metric", columns="network", values="value", aggfunc="first").reset_index()
    report = SubjectReport(
        subject=p.key, session=p.session, site=p.site, group=f"{p.group} ({p.split} subject)", qc=qc,
        underlay=underlay, manual=refs["pipeline"]["lesion"], networks=results, timings=timings,
        provenance=provenance(p.config), truth_metrics=truth,
        lead=p.lead, flair=flair,
        voxel_ml=float(np.prod(np.asarray(zooms, dtype=np.float64))) / 1000.0,
        lesion_quant=quant_report_table(quant, p.lead), lesion_quant_caption=quant_caption(quant_side, p.lead),
        model_cards=cards,
    )
    write_subject_report(report, smk.output.report)


def check_weights(network: str, weights: str, entry: Mapping[str, Any] | None) -> str | None:
    """Why the weights of ``network`` may not be used: not in the models record, or not the file the
    record's sha256 names (None: fine)."""
    if entry is None:
        return f"network {network} is not in the models record"
    expected = entry.get("WeightsSha256")
    if expected and hashlib.sha256(Path(weights).read_bytes()).hexdigest() != expected:
        return f"weights of network {network} differ from the models record's sha256"
    return None


#: Columns of the per-lesion table shown in the subject report (the TSV has them all).
QUANT_REPORT_COLUMNS = ["source", "lesion", "volume_ml", "location", "T1_mean", "T1_mean_ratio", "T2star_mean",
                        "T2star_mean_ratio", "B1_mean"]


def subject_lesion_quant(p: Any, manual: np.ndarray, outputs: Mapping[str, Mapping[str, np.ndarray]],
                         val_thresholds: Mapping[str, Mapping[str, float] | None], threshold: float,
                         brain: np.ndarray, zooms: Sequence[float],
                         cfg: Mapping[str, float]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The per-lesion table of one subject (mrflesion.evaluate.lesion_quant): the manual mask's lesions
    (``source`` = manual), then each network's and the baseline's, binarised at its validation
    operating point (threshold and minimum lesion size; else at ``threshold``); with the phantom's
    truth where present. Returns the table and its JSON sidecar (column units, sources, NAWM
    references, masks)."""
    from .evaluate import lesion_mask, voxel_volume_ml
    from .evaluate.lesion_quant import QUANT_UNITS, LesionTableRules, quantify_lesions, with_truth

    rules = LesionTableRules.from_config(cfg)
    f = p.files
    maps = {k: _load(f[f"quant_{k}"])[0] for k in QUANT_UNITS}
    csf = _load(f["csf"])[0]
    nawm = _load(f["ref_NAWM"])[0]
    gm = _load(f["ref_GM"])[0]
    manual_bin = manual >= 0.5
    masks: dict[str, tuple[np.ndarray, dict[str, Any]]] = {"manual": (manual_bin, {"mask": f["ref_lesion"]})}
    vml = voxel_volume_ml(zooms)
    for net, out in outputs.items():
        if "lesion" not in out:
            continue
        vt = val_thresholds.get(net)
        thr = float(vt["threshold"]) if vt else threshold
        min_ml = float(vt.get("min_lesion_ml", 0.0)) if vt else 0.0
        masks[net] = (lesion_mask(out["lesion"] * brain, thr, vml, min_ml),
                      {"threshold": thr, "min_lesion_ml": min_ml,
                       "operating_point": "validation" if vt else "evaluation.threshold"})
    truth = None
    if p.truth:
        t = {k: _load(p.truth[k])[0] for k in ("T1", "T2star", "WM", "lesion", "lesionid")}
        table = pd.read_csv(p.truth_table, sep="\t")
        truth = {"truth_ids": t["lesionid"].astype(np.int64),
                 "truth_locations": dict(zip(table["index"].astype(int), table["location"].astype(str), strict=True)),
                 "truth_maps": {"T1": t["T1"], "T2star": t["T2star"]},
                 "truth_nawm": t["WM"] * (t["lesion"] < 0.5), "truth_lesion": t["lesion"]}
    frames, refs = [], {}
    for source, (mask, how) in masks.items():
        tab, ref = quantify_lesions(mask, maps, nawm, csf, gm, brain, zooms, rules, exclude=manual_bin)
        if truth is not None:
            tab = with_truth(tab, mask, csf=csf, rules=rules, **truth)
        refs[source] = {"nawm_reference": ref, **how}
        frames.append(tab.assign(source=source))
    quant = pd.concat(frames, ignore_index=True)
    quant = quant[["source"] + [c for c in quant.columns if c != "source"]]
    units = {"volume_ml": "ml", "ventricle_distance_mm": "mm", "cortex_distance_mm": "mm",
             "centroid_ijk": "voxel indices (T2w grid)", "voxels": "1", "measured_voxels": "1"}
    for name, unit in QUANT_UNITS.items():
        units.update({f"{name}_mean": unit, f"{name}_median": unit, f"{name}_mean_ratio": "1 (to NAWM)",
                      f"{name}_median_ratio": "1 (to NAWM)"})
    sidecar = {
        "Description": "Per-lesion table: every 26-connected lesion of the manual mask (source manual) and of "
                       "each network's and the baseline's binarised lesion map; volume, location class and the "
                       "dictionary maps' mean / median over the lesion's measured voxels, also relative to the "
                       "subject's NAWM (mrflesion.evaluate.lesion_quant).",
        "Units": units,
        "LocationClasses": "infratentorial (not assessed: no infratentorial mask in T2w space), periventricular, "
                           "juxtacortical, deep_white_matter",
        "Settings": dict(cfg),
        "Sources": [f[f"quant_{k}"] for k in QUANT_UNITS] + [f["csf"], f["ref_NAWM"], f["ref_GM"], f["ref_lesion"]]
                   + [str(v) for v in p.truth.values()],
        "Masks": refs,
    }
    if truth is not None:
        sidecar["Truth"] = ("truth_lesion: phantom lesion overlapped most (0 none); truth_location: its class as "
                            "the generator drew it; truth_<map>_mean_ratio: the same measurement (same voxels) on "
                            "the phantom's true maps and true NAWM")
    return quant, sidecar


def quant_report_table(quant: pd.DataFrame, lead: str | None) -> pd.DataFrame:
    """The report's per-lesion table: the manual mask's lesions and the lead network's (the TSV has every
    network's and the baseline's; the baseline's specks would bury the lesions a reader looks for)."""
    cols = [c for c in QUANT_REPORT_COLUMNS if c in quant.columns]
    cols += [c for c in ("truth_location", "truth_T1_mean_ratio", "truth_T2star_mean_ratio") if c in quant.columns]
    keep = quant["source"].isin(["manual", lead]) if "source" in quant.columns else slice(None)
    return quant.loc[keep, cols].reset_index(drop=True)


def quant_caption(side: Mapping[str, Any], lead: str | None) -> str:
    parts = []
    for source, how in side["Masks"].items():
        if source not in ("manual", lead):
            continue
        ref = how["nawm_reference"]
        where = (f"at threshold {how['threshold']:g}, lesions >= {how['min_lesion_ml']:g} ml ({how['operating_point']})"
                 if "threshold" in how else "manual mask")
        parts.append(f"{source}: {where}; NAWM T1 {ref['T1']:.0f} ms, T2* {ref['T2star']:.1f} ms, B1 {ref['B1']:.2f}")
    return ("Every lesion (26-connected) with the dictionary maps' mean over its voxels (CSF excluded) and the "
            "ratio to the subject's NAWM median. " + "; ".join(parts) + ". The other networks' and the "
            "baseline's lesions, and the medians, are in sub-X" + TEMPLATES["evaluation"]["quant"].split("}")[-1] + ".")


def _lesion_rows(les: pd.DataFrame) -> pd.DataFrame:
    cols = ["lesion", "volume_ml", "detected", "dice"]
    if not len(les) or "lesion_id" not in les.columns:
        return pd.DataFrame(columns=cols)
    return les.rename(columns={"lesion_id": "lesion"})[cols].reset_index(drop=True)


# ---------------------------------------------------------------------------------------- group


def group_tables(metrics: pd.DataFrame, splits: Sequence[str]) -> dict[str, pd.DataFrame]:
    """Per-site summary, Kruskal-Wallis across sites and Mann-Whitney between networks over the
    subjects of ``splits``; ``metric`` is prefixed with the reference (``pipeline:``/``truth:``)."""
    from .evaluate import network_tests, site_summary, site_tests

    sel = metrics[metrics["split"].isin(list(splits))].copy()
    sel["metric"] = sel["reference"] + ":" + sel["metric"]
    return {
        "summary": site_summary(sel),
        "site_tests": site_tests(sel),
        "network_tests": network_tests(sel),
    }


def group_evaluation(smk: Any) -> None:
    """The group TSVs and report. The report opens with per-site plots of the lesion metrics (every
    network and the baseline, the recommended network, first in ``networks:``, first; against the
    phantom's truth when present, else the pipeline's references) and a one-row-per-subject overview;
    a family of tests that cannot run on the cohort is said in one sentence."""
    from .evaluate.report import plot_reference, write_group_report
    from .evaluate.tables import (
        lesion_site_table,
        network_tests_note,
        ran_and_skipped,
        site_tests_note,
        subject_overview,
    )

    p = smk.params
    metrics = pd.concat([pd.read_csv(f, sep="\t", na_values=["n/a"], keep_default_na=True)
                         for f in p.metrics], ignore_index=True)
    curves = pd.concat([pd.read_csv(f, sep="\t", na_values=["n/a"]) for f in p.curves], ignore_index=True)
    tables = group_tables(metrics, p.splits)
    inputs = pd.read_csv(smk.input.inputs, sep="\t", dtype=str, keep_default_na=False)
    failed = inputs[inputs["status"] != "ok"][["subject", "status", "reason"]].reset_index(drop=True)
    refused = list(getattr(p, "refused", None) or [])
    if refused:  # apply mode: subjects whose inference was refused (MRF schedule)
        failed = pd.concat([failed, pd.DataFrame(refused, columns=["subject", "status", "reason"])], ignore_index=True)
    quant = [pd.read_csv(f, sep="\t", na_values=["n/a"], keep_default_na=True) for f in p.quant]
    lesions_all = pd.concat(quant, ignore_index=True) if quant else pd.DataFrame()
    times = []
    for f in smk.input.json:
        d = json.loads(Path(f).read_text())
        conv = float(np.nansum([v for v in d["conventional_seconds"].values() if v is not None]))
        for net, s in d["inference_seconds"].items():
            times.append({"subject": d["subject"], "site": d["site"], "network": net,
                          "conventional_s": round(conv, 2), "inference_s": round(float(s), 3),
                          "speedup": round(conv / float(s), 1) if float(s) > 0 else math.nan})
    times_df = pd.DataFrame(times, columns=["subject", "site", "network", "conventional_s", "inference_s",
                                            "speedup"])
    out = smk.output
    write_text(out.metrics, metrics.to_csv(sep="\t", index=False, na_rep="n/a"))
    write_text(out.summary, tables["summary"].to_csv(sep="\t", index=False, na_rep="n/a"))
    write_text(out.site_tests, tables["site_tests"].to_csv(sep="\t", index=False, na_rep="n/a"))
    write_text(out.network_tests, tables["network_tests"].to_csv(sep="\t", index=False, na_rep="n/a"))
    write_text(out.failed, failed.to_csv(sep="\t", index=False))
    write_text(out.times, times_df.to_csv(sep="\t", index=False, na_rep="n/a"))
    write_text(out.lesions, lesions_all.to_csv(sep="\t", index=False, na_rep="n/a", float_format="%.6g"))
    lesion_sites = lesion_site_table(lesions_all[lesions_all["split"].isin(list(p.splits))]
                                     if len(lesions_all) else lesions_all)
    write_text(out.lesion_sites, lesion_sites.to_csv(sep="\t", index=False, na_rep="n/a"))
    main_metrics = {f"{ref}:{m}" for ref in ("pipeline", "truth") for m in ("lesion_dice", "lesion_ldr", "lw_f1")}
    main_metrics |= {"pipeline:T1_mrd", "pipeline:T2star_mrd", "pipeline:NAWM_dice", "pipeline:GM_dice",
                     "truth:T1_mrd", "truth:T1_mrd_pure"}
    summary = tables["summary"]
    main = summary[summary.metric.isin(main_metrics)]
    if len(main):
        short = main.pivot_table(index=["site", "network"], columns="metric", values="mean_sd", aggfunc="first")
        n = main.groupby(["site", "network"])["n"].max().rename("n")
        short = pd.concat([n, short], axis=1).reset_index()
    else:
        short = pd.DataFrame({"note": [f"no {'/'.join(p.splits)} subjects with metrics"]})
    cur = curves[(curves["reference"] == "pipeline") & curves["split"].isin(list(p.splits))]
    cohort = cur[["site", "network", "subject", "threshold", "dice"]].reset_index(drop=True)

    # ----- what the report leads with
    sel = metrics[metrics["split"].isin(list(p.splits))].reset_index(drop=True)
    network_names = list(p.networks)  # the applied networks, the recommended (lead) one first
    lead = network_names[0] if network_names else None
    ref = plot_reference(sel)
    t = getattr(p, "threshold", None)
    threshold = float(t) if t is not None else None
    lead_metrics = set(sel.loc[(sel["network"] == lead) & (sel["reference"] == ref), "metric"])
    suffix = "_vt" if "lw_sensitivity_vt" in lead_metrics else ""
    overview = subject_overview(sel, lead, ref, suffix=suffix, inputs=inputs)
    at = "its validation-chosen threshold" if suffix else (
        f"threshold {threshold:g}" if threshold is not None else "the default threshold")
    overview_caption = (
        f"Lesions of the reference ({ref}), and those {lead} detects or misses at {at} with its false-positive "
        "components (rule A: 26-connected components of at least 0.01 ml; a lesion is detected when a predicted "
        "component overlaps it). Flags: no reference lesions; all / half or more of the lesions missed; more "
        "false positives than lesions"
        + (f"; the baseline's lesion Dice above {lead}'s" if (sel["network"] == "baseline").any() else "")
        + ("; skipped subjects (failed input checks)." if len(failed) else ".")
    )
    prefixed = sel.assign(metric=sel["reference"] + ":" + sel["metric"])
    sections: dict[str, Any] = {}
    for title, note, table, what, tsv in (
        ("Kruskal–Wallis across sites", site_tests_note(prefixed), tables["site_tests"],
         "network × metric rows", "tests_sites.tsv"),
        ("Mann–Whitney between networks (Bonferroni)", network_tests_note(prefixed), tables["network_tests"],
         "network pairs × metric rows", "tests_networks.tsv"),
    ):
        if note is not None:
            sections[title] = note
        else:
            ran, skipped = ran_and_skipped(table, what, tsv)
            sections[title] = [x for x in (skipped, ran if len(ran) else None) if x is not None] or ran
    n_subj = sel["subject"].nunique()
    n_sites = sel["site"].nunique()
    notes = [f"{n_subj} {'/'.join(p.splits)} subject{'s' if n_subj != 1 else ''} at {n_sites} "
             f"site{'s' if n_sites != 1 else ''}" + (f"; recommended network: {lead}." if lead else ".")]
    write_group_report(
        {
            f"Per-site summary, mean ± sd ({', '.join(p.splits)} subjects; every metric with median [range] "
            "in summary_sites.tsv)": short,
            **sections,
            "Failed or skipped subjects": failed,
            f"Per-lesion T1, T2*, B1 per site and location class ({', '.join(p.splits)} subjects; mean ± sd; "
            "ratios to each subject's NAWM; lesions.tsv and lesions_sites.tsv)": lesion_sites[
                lesion_sites["quantity"].isin(["volume_ml", "T1_mean_ratio", "T2star_mean_ratio"])
            ].pivot_table(index=["site", "source", "location", "n_subjects", "n_lesions"], columns="quantity",
                          values="mean_sd", aggfunc="first").reset_index() if len(lesion_sites) else lesion_sites,
            "Conventional chain vs network inference (seconds per subject)": times_df,
        },
        cohort, provenance(smk.config), out.report, notes=notes, metrics=sel, overview=overview, lead=lead,
        networks=network_names, reference=ref, threshold=threshold,
        overview_caption=overview_caption,
    )


# ---------------------------------------------------------------------------------------- parse time


class EvaluationPlan:
    """Parse-time view of inference and evaluation for rules/evaluate.smk."""

    def __init__(self, plan: Any, training: Any, config: Mapping[str, Any], out_dir: str, work_dir: str) -> None:
        self.plan = plan
        self.training = training
        self.out = out_dir
        self.work = work_dir
        self.cfg = config["evaluation"]
        self.networks: dict[str, list[str]] = {n: list(s["outputs"]) for n, s in training.networks.items()}
        check_labels(list(self.networks))
        #: apply mode: the models directory's networks (mrflesion.model_card.ApplyPlan); else None
        self.models = getattr(training, "models", None)
        self.models_dir = self.models.dir if self.models is not None else file(COHORT, "models", out_dir)
        self.refused: dict[str, str] = dict(getattr(training, "refused", {}))
        #: the subjects that get inference and evaluation (apply mode: not those refused)
        self.stems = [st for st in plan.stems() if st not in self.refused]
        needed = {k for n in self.networks for k in needed_images(training.networks[n])} | {"mask"}
        self.image_kinds = [k for k in ("mrf", "T1", "T2star", "mask") if k in needed]
        self.truth_dir = f"{plan.bids_dir}/derivatives/truth" if plan.phantom else None

    def truth_files(self, stem: str) -> dict[str, str]:
        if not self.truth_dir:
            return {}
        return derivatives("truth", self.truth_dir, stem)

    def truth_table(self, stem: str) -> str | None:
        return derivative("truth_table", "lesionid", self.truth_dir, stem) if self.truth_dir else None

    def all_truth_files(self) -> list[str]:
        return [f for st in self.plan.stems() for f in [*self.truth_files(st).values(), self.truth_table(st)] if f]

    def summary_splits(self) -> list[str]:
        """The splits the group tables summarise (apply mode: every subject, split ``apply``)."""
        from .model_card import APPLY_SPLIT

        return [APPLY_SPLIT] if self.models is not None else list(self.cfg["summary_splits"])

    def refused_rows(self) -> list[dict[str, str]]:
        """Subjects whose inference is refused (apply mode), as rows of ``group/failed.tsv``."""
        return [{"subject": self.plan.subjects[st].key, "status": "refused", "reason": line}
                for st, line in self.refused.items()]

    def ready(self, stem: str) -> str:
        """The file that stands for a subject's finished conventional chain (see
        :data:`mrflesion.learn_steps.READY_IMAGE`)."""
        return ready_file(self.out, stem)

    def models_record(self) -> str:
        return file(MODELS, "record", self.models_dir)

    def network_outputs(self, stem: str) -> dict[str, str]:
        """Every network's output files of one subject, named ``<label>_<output>``."""
        return {f"{net_label(n)}_{o}": f for n in self.networks for o, f in self.outputs(n, stem).items()}

    def outputs(self, network: str, stem: str) -> dict[str, str]:
        return output_files(self.out, stem, network, self.networks[network])

    def benchmark(self, step: str, stem: str) -> str:
        return file(WORK, "benchmark", self.work, step=step, stem=stem)

    def evaluate_inputs(self, stem: str) -> dict[str, str]:
        """Declared inputs of a subject's evaluation: ``models`` (the record ``models/models.json`` of
        every trained network, written after the weights; depending on it rather than on the training
        jobs' outputs keeps planning linear in the cohort size), ``ready`` (the finished chain: the
        images the networks read, the references and the registered MRF series) and the phantom
        truth; the paths it reads are in :meth:`evaluate_params`. Few declared inputs per subject keep
        planning a large cohort fast."""
        d = {"models": self.models_record(), "ready": self.ready(stem)}
        for k, f in self.truth_files(stem).items():
            d[f"truth_{k}"] = f
        return d

    def evaluate_files(self, stem: str) -> dict[str, str]:
        """The images an evaluation reads, named ``ref_<map>``, ``mask``, ``mrf_t2w``, ``flair_t2w``,
        ``raw_<kind>``."""
        s = self.plan.subjects[stem]
        d = {f"ref_{k}": f"{self.out}/" + v.format(stem=stem) for k, v in REFERENCE_FILES.items()
             if k not in ("mask", "mrf")}
        d["mask"] = f"{self.out}/" + REFERENCE_FILES["mask"].format(stem=stem)
        d["mrf_t2w"] = f"{self.out}/" + REFERENCE_FILES["mrf"].format(stem=stem)
        d["flair_t2w"] = derivative("register", "flair", self.out, stem)
        d["baseline"] = derivative("tissue", "baseline", self.out, stem)
        d.update({f"quant_{k}": derivative("register", k, self.out, stem) for k in QUANT_FILES})
        d["csf"] = derivative("tissue", "CSF", self.out, stem)
        d.update(raw_mrf=s.files["mrf"], raw_t2w=s.files["t2w"], raw_flair=s.files["flair"])
        return d

    def network_images(self, stem: str) -> dict[str, str]:
        """The T2w-space images (``mrf``, ``T1``, ``T2star``, ``mask``) the networks read."""
        return {k: f"{self.out}/" + TRAIN_IMAGES[k].format(stem=stem) for k in self.image_kinds}

    def evaluate_params(self, stem: str) -> dict[str, Any]:
        """Everything the evaluation of one subject needs besides its files (one params callable)."""
        s = self.plan.subjects[stem]
        return {
            "images": self.network_images(stem),
            "key": s.key, "session": s.session, "site": s.site, "group": s.group or "n/a",
            "split": self.training.split_of.get(f"sub-{s.subject}", "n/a"),
            "networks": self.networks, "truth": self.truth_files(stem), "files": self.evaluate_files(stem),
            "truth_table": self.truth_table(stem),
            "benchmarks": {step: self.benchmark(step, stem) for step in CHAIN_STEPS},
            "lead": next(iter(self.networks), None),
            "weights": {n: file(MODELS, "best", self.models_dir, network=n) for n in self.networks},
            "histories": {n: file(MODELS, "history", self.models_dir, network=n) for n in self.networks},
            "cards": {n: file(MODELS, "card", self.models_dir, network=n) for n in self.networks},
            "schedule": self.plan.schedule[stem], "sidecar": s.sidecar,
        }

    def subject_outputs(self, stem: str) -> dict[str, str]:
        return derivatives("evaluation", self.out, stem)
