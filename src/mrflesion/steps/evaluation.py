"""Rule body of the per-subject evaluation (rule ``evaluate``, one job per subject; docs/evaluation.md).

First every trained network is applied to the subject (:func:`apply_networks`: outputs in T2w space,
physical units, with sidecars, named by :mod:`mrflesion.plan.evaluation`), then every network's
outputs and the classical baseline's lesion map are evaluated against (a) the pipeline's references as
in the method (dictionary T1/T2* in T2w space, SPM-style NAWM/GM, the registered manual mask) and
(b) the phantom's ground truth when the input is the phantom (:func:`mrflesion.evaluate.subject.subject_metrics`).
Writes a long metrics TSV (network, reference, metric, value), the same as JSON, the threshold curves,
the lesion-wise tables, the per-lesion quantitative table and the self-contained HTML report.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

from ..evaluate.report import BASELINE
from ..evaluate.subject import pure_tissue_mask, subject_metrics
from ..io import write_derivative, write_json, write_text
from ..layout import TEMPLATES, sidecar_path
from ..plan.evaluation import net_label
from ..provenance import provenance
from . import StepError


def _load(path: str | Path) -> tuple[np.ndarray, Any]:
    import nibabel as nib

    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=np.float32), img


def apply_networks(key: str, images: Mapping[str, str], models: Mapping[str, Mapping[str, Any]],
                   outputs: Mapping[str, Mapping[str, str]], cfg: Mapping[str, Any], threads: int) -> dict[str, Any]:
    """One subject through every trained network (``outputs``: network -> output name -> path); a NIfTI
    and a JSON sidecar per output, on the T2w grid of ``images["mask"]``. ``models`` is the
    ``Networks`` table of ``models/models.json``. Returns, per network, its model, training history,
    output paths and timings."""
    import nibabel as nib

    from ..learn import checkpoint
    from ..learn.infer import OUTPUT_UNITS, infer_subject
    from ..learn.spec import NetworkSpec

    ref = nib.load(images["mask"])
    cache: dict[Any, Any] = {}  # images loaded once for the networks that share them
    record: dict[str, Any] = {}
    for net, paths in outputs.items():
        model = models[net]["Weights"]
        subject = {"subject": key, "mask": images["mask"]}
        ck = checkpoint.load(model)
        for k in NetworkSpec.from_dict(ck["spec"]).input_images:
            subject[k] = images[k]
        outs, rec = infer_subject(ck, subject, mode=str(cfg["mode"]), window=int(cfg["window"]),
                                  overlap=float(cfg["overlap"]), device=str(cfg["device"]),
                                  threads=threads, cache=cache)
        for name, vol in outs.items():
            write_derivative(paths[name], vol, ref, dtype=np.float32, sidecar={
                "Description": f"U-net {rec['network']}: {name}",
                "Units": OUTPUT_UNITS[name],
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


def _benchmark_seconds(path: str | Path) -> float:
    try:
        return float(pd.read_csv(path, sep="\t")["s"].iloc[0])
    except (OSError, KeyError, IndexError, ValueError, pd.errors.EmptyDataError):
        return math.nan


def evaluate_subject(smk: Any) -> None:
    """Every trained network applied to one subject (:func:`apply_networks`), then its metrics,
    curves, lesion tables and HTML report."""
    from ..evaluate.report import NetworkResult, SubjectReport, write_subject_report
    from ..model_card import schedule_problem

    # params.info: the subject's details (EvaluationPlan.evaluate_params); cfg: the evaluation config;
    # config: the run's configuration (provenance), from snakemake.config: not a param, it reruns nothing

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
    # the pipeline's references; the lesion mask only where the subject has a manual one (apply mode may
    # not: then no lesion metric against it, and its maps, per-lesion table and report all the same)
    refs: dict[str, dict[str, np.ndarray]] = {"pipeline": {k: _load(f[f"ref_{k}"])[0]
                                                           for k in ("T1", "T2star", "NAWM", "GM", "lesion")
                                                           if f"ref_{k}" in f}}
    manual = refs["pipeline"].get("lesion")
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
        p, manual, outputs, val_thresholds, threshold, brain, zooms, smk.params.lesion_table)
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
        # the operating point chosen on the validation subjects (also without a manual mask, where no
        # metric records it)
        vt = (val_thresholds.get(net) or {}).get("threshold")
        results.append(NetworkResult(
            name=net, outputs=maps, references={k: refs["pipeline"][k] for k in maps if k in refs["pipeline"]},
            curves=c.rename(columns={"ldr": "detection_rate"})[["threshold", "dice", "detection_rate"]]
            if len(c) else pd.DataFrame(columns=["threshold", "dice", "detection_rate"]),
            lesions=_lesion_rows(les), history=hist, metrics=mdict, threshold=threshold,
            inference_s=infer_s.get(net, math.nan),
            val_threshold=None if vt is None or not math.isfinite(float(vt)) else float(vt),
            val_min_lesion_ml=float((val_thresholds.get(net) or {}).get("min_lesion_ml", 0.0)),
        ))
    truth = None
    if "truth" in refs:
        tm = metrics[metrics.reference == "truth"]
        truth = tm.pivot_table(index="metric", columns="network", values="value", aggfunc="first").reset_index()
    report = SubjectReport(
        subject=p.key, session=p.session, site=p.site, group=f"{p.group} ({p.split} subject)", qc=qc,
        underlay=underlay, manual=manual, networks=results, timings=timings,
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


def subject_lesion_quant(p: Any, manual: np.ndarray | None, outputs: Mapping[str, Mapping[str, np.ndarray]],
                         val_thresholds: Mapping[str, Mapping[str, float] | None], threshold: float,
                         brain: np.ndarray, zooms: Sequence[float],
                         cfg: Mapping[str, float]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The per-lesion table of one subject (mrflesion.evaluate.lesion_quant): the manual mask's lesions
    (``source`` = manual; none without a manual mask), then each network's and the baseline's, binarised
    at its validation operating point (threshold and minimum lesion size; else at ``threshold``); with the phantom's
    truth where present. Returns the table and its JSON sidecar (column units, sources, NAWM
    references, masks)."""
    from ..evaluate.lesion_quant import QUANT_UNITS, LesionTableRules, quantify_lesions, with_truth
    from ..evaluate.lesionwise import lesion_mask
    from ..evaluate.metrics import voxel_volume_ml

    rules = LesionTableRules.from_config(cfg)
    f = p.files
    maps = {k: _load(f[f"quant_{k}"])[0] for k in QUANT_UNITS}
    csf = _load(f["csf"])[0]
    nawm = _load(f["ref_NAWM"])[0]
    gm = _load(f["ref_GM"])[0]
    masks: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
    if manual is not None:
        masks["manual"] = (manual >= 0.5, {"mask": f["ref_lesion"]})
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
    # NAWM reference: outside every lesion of the manual mask, or, without one, of the source's own map
    frames, refs = [], {}
    for source, (mask, how) in masks.items():
        exclude = masks["manual"][0] if "manual" in masks else mask
        tab, ref = quantify_lesions(mask, maps, nawm, csf, gm, brain, zooms, rules, exclude=exclude)
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
        "Sources": [f[f"quant_{k}"] for k in QUANT_UNITS] + [f["csf"], f["ref_NAWM"], f["ref_GM"]]
                   + [f[k] for k in ("ref_lesion",) if k in f]
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
