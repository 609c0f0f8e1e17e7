"""Rule bodies of the longitudinal stage (rules/longitudinal.smk): new and enlarging lesions between a
baseline and a follow-up FLAIR. The algorithms are in :mod:`mrflesion.longitudinal`; here files are read
and written.

* ``prepare``: rigid registration of the follow-up FLAIR to the baseline (ANTs, Mattes MI), both moved
  by half of it into the halfway space (cubic B-spline), brain mask, normalisation by the brain median;
  the manual new/enlarged mask (follow-up FLAIR grid) moved to the halfway space as the training target;
  the baseline's manual lesion mask on the follow-up grid (to tell new from enlarging lesions).
* ``fit_comparator``: the subtraction detector's thresholds on the training and validation pairs.
* ``train``: the siamese 3D network on the training pairs, model selection on the validation pairs.
* ``evaluate``: both methods' maps on the follow-up's native FLAIR grid, the lesion-wise metrics against
  the reference (the phantom's truth, else the manual mask), counts and volumes of new and enlarged
  lesions, and the pair's report.
* ``group``: the per-pair metrics of every pair, per-site tables, network-vs-comparator tests, report.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..io import write_derivative, write_json
from . import fail, rounded_timings, write_sidecar

#: the comparator's label in file names and tables
COMPARATOR = "subtraction"


def _load(path: str) -> tuple[np.ndarray, Any]:
    import nibabel as nib

    img = nib.load(path)
    return np.asarray(img.dataobj, dtype=np.float32), img


def _zooms(img: Any) -> tuple[float, float, float]:
    return tuple(float(z) for z in img.header.get_zooms()[:3])  # type: ignore[return-value]


def rigid_followup_to_baseline(baseline: str, followup: str, threads: int = 1) -> np.ndarray:
    """ANTs rigid registration (Mattes MI; the pipeline's FLAIR schedule) of the follow-up FLAIR
    (moving) to the baseline FLAIR (fixed): the 4x4 RAS map of a baseline point to the follow-up."""
    import ants

    from ..longitudinal.preprocess import ants_rigid_to_ras
    from ..registration import _positive_normalised, _rigid, _to_ants, set_threads

    set_threads(threads)
    fixed = _positive_normalised(_to_ants(baseline))
    moving = _positive_normalised(_to_ants(followup))
    with tempfile.TemporaryDirectory(prefix="mrflesion_long_") as tmp:
        tx = ants.read_transform(_rigid(fixed, moving, tmp))
        params = np.asarray(tx.parameters, float)
        center = np.asarray(tx.fixed_parameters, float)
    return ants_rigid_to_ras(params[:9], params[9:12], center)


def prepare(flair_baseline: str, flair_followup: str, out: Mapping[str, str], pair: str,
            threads: int = 1) -> dict[str, Any]:
    """Rule ``longitudinal_prepare`` for one pair: registration, both FLAIRs in the halfway space,
    normalised, the brain mask and the transforms (``out``: the layout's ``longitudinal`` keys
    baseline, followup, brain, xfm). Returns the timings, the brain size and the rotation."""
    from ..longitudinal.preprocess import grid_coordinates, halfway_sampling, normalise, pair_brain_mask, resample_cubic

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    bl, bl_img = _load(flair_baseline)
    fu, fu_img = _load(flair_followup)
    for name, arr, path in (("baseline", bl, flair_baseline), ("follow-up", fu, flair_followup)):
        if arr.ndim != 3:
            fail(f"{pair}: {name} FLAIR is not a 3D image (shape {arr.shape}): {path}")
        if not np.isfinite(arr).all() or not (arr > 0).any():
            fail(f"{pair}: {name} FLAIR has non-finite values or no signal: {path}")
    t_ras = rigid_followup_to_baseline(flair_baseline, flair_followup, threads)
    timings["register"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    shape = fu.shape
    to_bl, to_fu, s = halfway_sampling(t_ras, shape, fu_img.affine, bl_img.affine)
    bl_h = np.maximum(resample_cubic(bl, grid_coordinates(to_bl, shape), threads), 0.0)
    fu_h = np.maximum(resample_cubic(fu, grid_coordinates(to_fu, shape), threads), 0.0)
    brain = pair_brain_mask(bl_h, fu_h)
    if brain.sum() < 100:
        fail(f"{pair}: the brain mask of the two FLAIRs has {int(brain.sum())} voxels: {flair_followup}")
    bl_n, fu_n = normalise(bl_h, brain), normalise(fu_h, brain)
    timings["resample"] = time.perf_counter() - t0
    sources = [flair_baseline, flair_followup]
    half = "halfway space of the pair (the follow-up FLAIR grid, each session moved by half the rigid transform)"
    for key, what in (("baseline", "Baseline"), ("followup", "Follow-up")):
        write_derivative(out[key], bl_n if key == "baseline" else fu_n, fu_img, dtype="float32", sidecar={
            "Description": f"{what} FLAIR in the {half}, divided by its brain median",
            "Units": "1 (brain median = 1)", "Sources": sources, "Interpolation": "cubic B-spline"})
    write_derivative(out["brain"], brain.astype(np.uint8), fu_img, dtype="uint8", sidecar={
        "Description": f"Brain mask of the pair in the {half}: Otsu on the mean of both FLAIRs, largest "
                       "component, holes filled", "Sources": sources})
    angle = float(np.degrees(np.arccos(np.clip((np.trace(t_ras[:3, :3]) - 1) / 2, -1, 1))))
    write_json(out["xfm"], {
        "Description": "Rigid transforms of the pair (RAS mm, 4x4): FollowupFromBaseline maps a baseline "
                       "point to the same anatomy in the follow-up (ANTs, Mattes MI); HalfwayToFollowup is "
                       "its square root S: the halfway image at q samples the follow-up at S q and the "
                       "baseline at inverse(S) q",
        "FollowupFromBaseline": t_ras.tolist(), "HalfwayToFollowup": s.tolist(),
        "RotationDegrees": round(angle, 4), "TranslationMm": round(float(np.linalg.norm(t_ras[:3, 3])), 4),
        "Sources": sources, "TimingsSeconds": rounded_timings(timings)})
    return {"timings": timings, "brain_voxels": int(brain.sum()), "rotation_deg": angle}


def _transforms(xfm: str) -> tuple[np.ndarray, np.ndarray]:
    with open(xfm) as fh:
        d = json.load(fh)
    return np.asarray(d["FollowupFromBaseline"], float), np.asarray(d["HalfwayToFollowup"], float)


def _on_grid(path: str, grid_path: str, what: str, pair: str) -> np.ndarray:
    data, img = _load(path)
    _, ref = _load(grid_path)
    if data.shape != ref.shape or not np.allclose(img.affine, ref.affine, atol=1e-3):
        fail(f"{pair}: {what} is not on the grid of {grid_path}: {path}")
    return data


def target(reference: str, xfm: str, flair_followup: str, out: str, pair: str) -> int:
    """Rule ``longitudinal_target``: the manual new/enlarged mask (follow-up FLAIR grid) moved to the
    halfway space (linear interpolation of 0/1, >= 0.5), the network's training target. Returns its size."""
    from ..longitudinal.preprocess import grid_coordinates, to_halfway_mask

    ref = _on_grid(reference, flair_followup, "the new/enlarged mask", pair)
    _, fu_img = _load(flair_followup)
    _, s = _transforms(xfm)
    a = np.asarray(fu_img.affine, float)
    coords = grid_coordinates(np.linalg.inv(a) @ s @ a, ref.shape)
    tgt = to_halfway_mask(ref > 0.5, coords)
    write_derivative(out, tgt, fu_img, dtype="uint8", sidecar={
        "Description": "Manual new/enlarged lesion mask moved to the halfway space of the pair (linear, >= 0.5)",
        "Sources": [reference, xfm]})
    return int(tgt.sum())


def baseline_lesions(lesion: str, xfm: str, flair_baseline: str, flair_followup: str, out: str, pair: str) -> int:
    """Rule ``longitudinal_baseline_lesions``: the baseline's manual lesion mask (baseline FLAIR grid) on
    the follow-up FLAIR grid (rigid, linear, >= 0.5): a component touching it is an enlarging lesion."""
    from ..longitudinal.preprocess import baseline_to_followup

    les = _on_grid(lesion, flair_baseline, "the baseline lesion mask", pair)
    _, bl_img = _load(flair_baseline)
    fu, fu_img = _load(flair_followup)
    t_ras, _ = _transforms(xfm)
    moved = (baseline_to_followup((les > 0.5).astype(np.float32), t_ras, fu.shape, fu_img.affine,
                                  bl_img.affine) >= 0.5).astype(np.uint8)
    write_derivative(out, moved, fu_img, dtype="uint8", sidecar={
        "Description": "The baseline session's manual lesion mask on the follow-up FLAIR grid (rigid, linear, "
                       ">= 0.5): a new/enlarged component touching it is an enlarging lesion",
        "Sources": [lesion, xfm]})
    return int(moved.sum())


def pair_arrays(files: Mapping[str, str], pair_id: str, with_target: bool) -> dict[str, Any]:
    """A prepared pair's halfway-space arrays (baseline, followup, brain, [target], voxel_mm, id)."""
    bl, img = _load(files["baseline"])
    fu, _ = _load(files["followup"])
    brain, _ = _load(files["brain"])
    d: dict[str, Any] = {"id": pair_id, "baseline": bl, "followup": fu, "brain": brain > 0,
                         "voxel_mm": _zooms(img)}
    if with_target:
        tgt, _ = _load(files["target"])
        d["target"] = (tgt > 0).astype(np.uint8)
    return d


def fit_comparator(pairs: Sequence[Mapping[str, str]], ids: Sequence[str], cfg: Mapping[str, Any],
                   out: str) -> dict[str, Any]:
    """Rule ``longitudinal_comparator``: the subtraction thresholds with the best pooled lesion-wise F1
    over the training and validation pairs (halfway space, against their targets)."""
    from ..longitudinal.comparator import fit_thresholds

    t0 = time.perf_counter()
    cases = []
    for files, pid in zip(pairs, ids, strict=True):
        a = pair_arrays(files, pid, True)
        cases.append((a["baseline"], a["followup"], a["brain"], a["target"], a["voxel_mm"]))
    params, f1 = fit_thresholds(cases, sigma_mm=float(cfg["sigma_mm"]), min_lesion_ml=float(cfg["min_lesion_ml"]))
    rec = {"method": COMPARATOR, "params": params.to_dict(), "fit_f1": f1, "fit_pairs": list(ids),
           "seconds": round(time.perf_counter() - t0, 3),
           "Description": "Subtraction detector (mrflesion.longitudinal.comparator): thresholds chosen by "
                          "pooled lesion-wise F1 on the training and validation pairs"}
    write_json(out, rec)
    print(f"comparator: {params.to_dict()} pooled F1 {f1:.3f} on {len(ids)} pairs")
    return rec


def single_timepoints(sessions: Sequence[Mapping[str, str]]) -> list[dict[str, Any]]:
    """The pre-training volumes of the encoder: each session's FLAIR (native grid, divided by its brain
    median) with its manual lesion mask (all lesions), from (key, flair, lesion) mappings."""
    from ..longitudinal.preprocess import normalise
    from ..masking import series_brain_mask

    out = []
    for s in sessions:
        flair, img = _load(s["flair"])
        les = _on_grid(s["lesion"], s["flair"], "the manual lesion mask", s["key"])
        brain = series_brain_mask(flair[..., None]) & (flair > 0)
        out.append({"id": s["key"], "image": normalise(flair, brain), "brain": brain,
                    "target": (les > 0.5).astype(np.uint8), "voxel_mm": _zooms(img)})
    return out


def train(train_files: Sequence[Mapping[str, str]], train_ids: Sequence[str],
          val_files: Sequence[Mapping[str, str]], val_ids: Sequence[str], spec: Mapping[str, Any],
          state_dir: str, out: Mapping[str, str], device: str, threads: int,
          pretrain: Sequence[Mapping[str, str]] = ()) -> None:
    """Rule ``longitudinal_train``: the siamese 3D network (:func:`mrflesion.longitudinal.train.
    train_longitudinal`), resumable in ``state_dir``, its encoder first pre-trained on the training
    subjects' single time points (``pretrain``: key, flair, lesion) when ``pretrain_epochs`` > 0; its
    best.pt and history.tsv copied to ``out``."""
    import shutil

    from ..device import resolve_device
    from ..learn.progress import Progress
    from ..longitudinal.network import LongitudinalSpec
    from ..longitudinal.train import train_longitudinal

    tr = [pair_arrays(f, i, True) for f, i in zip(train_files, train_ids, strict=True)]
    va = [pair_arrays(f, i, True) for f, i in zip(val_files, val_ids, strict=True)]
    if not tr:
        fail("longitudinal: no training pair with a manual new/enlarged mask")
    dev = resolve_device(device)
    net_spec = LongitudinalSpec.from_config({k: v for k, v in spec.items() if k != "name"})
    pre = single_timepoints(pretrain) if net_spec.pretrain_epochs else None
    res = train_longitudinal(tr, va, net_spec, state_dir, device=dev, threads=threads, progress=Progress(),
                             pretrain_volumes=pre)
    os.makedirs(os.path.dirname(out["best"]), exist_ok=True)
    for key in ("best", "history"):
        src = os.path.join(state_dir, os.path.basename(out[key]))
        tmp = out[key] + ".tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, out[key])
    print(f"longitudinal training done: {res['epochs_completed']} epochs, best epoch {res['best_epoch']} "
          f"({json.dumps(res['best'], default=str)}), {res['parameters']} parameters, patch {res['patch']}")


def evaluate(files: Mapping[str, str], out: Mapping[str, str], pair: Mapping[str, Any], network: str,
             device: str = "cpu", threads: int = 1) -> list[dict[str, Any]]:
    """Rule ``longitudinal_evaluate`` for one pair: the network's and the comparator's new/enlarged maps
    on the follow-up's native FLAIR grid (``out``: ``prob_<method>``, ``mask_<method>``, ``metrics``,
    ``lesions``, ``report``), scored against the reference where there is one. Returns the metric rows."""
    import pandas as pd
    import torch

    from ..evaluate.lesionwise import lesion_mask
    from ..evaluate.metrics import label_components, voxel_volume_ml
    from ..longitudinal.comparator import SubtractionParams, detect
    from ..longitudinal.evaluate import METRICS, component_kinds, pair_metrics, pair_report
    from ..longitudinal.infer import load_model, predict_pair
    from ..longitudinal.preprocess import followup_coordinates, resample_linear

    t0 = time.perf_counter()
    torch.set_num_threads(max(1, int(threads)))
    a = pair_arrays(files, pair["pair"], False)
    _, s = _transforms(files["xfm"])
    fu_native, fu_img = _load(files["flair_followup"])
    zooms = _zooms(fu_img)
    vml = voxel_volume_ml(zooms)
    affine = np.asarray(fu_img.affine, float)
    back = followup_coordinates(s, affine, fu_native.shape)  # halfway -> follow-up grid, for every map

    def to_followup(volume: np.ndarray) -> np.ndarray:
        return resample_linear(volume, back)

    brain_fu = to_followup(a["brain"].astype(np.float32)) >= 0.5
    model, spec, meta = load_model(files["model"], device)
    prob_h = predict_pair(model, a["baseline"], a["followup"], a["brain"], meta["patch"], overlap=spec.overlap,
                          device=device)
    prob = np.where(brain_fu, np.clip(to_followup(prob_h), 0.0, 1.0), 0.0).astype(np.float32)
    with open(files["comparator"]) as fh:
        comp = SubtractionParams.from_dict(json.load(fh)["params"])
    score_h, _ = detect(a["baseline"], a["followup"], a["brain"], a["voxel_mm"], comp)
    score = np.where(brain_fu, to_followup(score_h), 0.0).astype(np.float32)
    maps = {
        network: (prob, lesion_mask(prob, spec.threshold, vml, spec.min_lesion_ml)),
        COMPARATOR: (score, lesion_mask(score, comp.difference, vml, comp.min_lesion_ml)),
    }
    timings = {"predict": time.perf_counter() - t0}
    sources = [files["baseline"], files["followup"], files["xfm"]]
    for m, (p, b) in maps.items():
        if m == network:
            desc = (f"Probability of a new or enlarging lesion ({network}: siamese 3D network, "
                    f"{meta.get('epoch', '?')} epochs selected on validation pairs), on the follow-up FLAIR grid")
            op = {"Threshold": spec.threshold, "MinLesionMl": spec.min_lesion_ml}
            units = "1 (probability)"
        else:
            desc = ("Subtraction score (follow-up - baseline, normalised FLAIR, smoothed) where the follow-up is "
                    "hyperintense, on the follow-up FLAIR grid")
            op = {"Threshold": comp.difference, "MinLesionMl": comp.min_lesion_ml, **comp.to_dict()}
            units = "1 (brain median FLAIR units)"
        write_derivative(out[f"prob_{m}"], p, fu_img, dtype="float32", sidecar={
            "Description": desc, "Units": units,
            "Sources": [*sources, files["model" if m == network else "comparator"]],
            "OperatingPoint": op})
        write_derivative(out[f"mask_{m}"], b.astype(np.uint8), fu_img, dtype="uint8", sidecar={
            "Description": f"New or enlarging lesions ({m}) at its operating point, components >= "
                           f"{op['MinLesionMl']} ml", "Sources": [out[f"prob_{m}"]], "OperatingPoint": op})
    ref = dseg = les_bl = None
    if "reference" in files:
        ref = _on_grid(files["reference"], files["flair_followup"], "the reference new/enlarged mask",
                       pair["pair"]) > 0.5
    if "reference_dseg" in files:
        dseg = _on_grid(files["reference_dseg"], files["flair_followup"], "the reference dseg", pair["pair"])
    ids = None
    if "reference_ids" in files:
        ids = _on_grid(files["reference_ids"], files["flair_followup"], "the reference lesion ids", pair["pair"])
    if "lesion_baseline" in files:
        les_bl = _load(files["lesion_baseline"])[0] > 0.5
    rows = []
    lesion_rows = []
    for m, (_, b) in maps.items():
        base = {"pair": pair["pair"], "subject": pair["subject"], "site": pair["site"], "split": pair["split"],
                "method": m, "reference": pair["reference_name"] if ref is not None else "none"}
        met = (pair_metrics(b, ref, vml, 0.01, les_bl, dseg, ids) if ref is not None
               else dict.fromkeys(METRICS, np.nan))
        if ref is None:  # counts of the prediction are still meaningful
            met.update({k: v for k, v in pair_metrics(b, np.zeros_like(b), vml, 0.01, les_bl).items()
                        if k in ("n_pred", "n_new", "n_enlarged", "volume_new_ml", "volume_enlarged_ml")})
        rows.append({**base, **met})
        labels, n = label_components(b > 0)
        kinds = component_kinds(labels, n, les_bl)
        for i in range(1, n + 1):
            comp_i = labels == i
            lesion_rows.append({"pair": pair["pair"], "method": m, "component": i,
                                "kind": "enlarged" if kinds[i] == 2 else "new",
                                "volume_ml": round(float(comp_i.sum()) * vml, 4),
                                "overlaps_reference": bool((comp_i & ref).any()) if ref is not None else "n/a"})
    table = pd.DataFrame(rows)
    table.to_csv(out["metrics"], sep="\t", index=False, na_rep="n/a", float_format="%.4g")
    pd.DataFrame(lesion_rows, columns=["pair", "method", "component", "kind", "volume_ml", "overlaps_reference"]
                 ).to_csv(out["lesions"], sep="\t", index=False)
    shown = table.set_index("method")[["sensitivity", "fp", "f1", "dice", "n_ref", "n_ref_components", "n_pred",
                                       "n_new", "n_enlarged", "volume_new_ml", "volume_enlarged_ml", "ref_n_new",
                                       "ref_n_enlarged"]].T.reset_index(names="metric")
    bl_native = to_followup(a["baseline"])
    fu_norm = to_followup(a["followup"])
    with open(files["xfm"]) as fh:
        x = json.load(fh)
    info = {"baseline": pair["baseline"], "follow-up": pair["followup"],
            "repositioning": f"{x['RotationDegrees']:.2f}° rotation, {x['TranslationMm']:.2f} mm translation",
            f"{network} operating point": f"threshold {spec.threshold:g}, lesions ≥ {spec.min_lesion_ml:g} ml",
            "subtraction operating point": (f"difference ≥ {comp.difference:g}, follow-up ≥ "
                                            f"{comp.hyperintensity:g} × brain median, σ {comp.sigma_mm:g} mm, "
                                            f"lesions ≥ {comp.min_lesion_ml:g} ml")}
    pair_report(out["report"], pair["pair"], pair["site"], pair["split"], bl_native, fu_norm, brain_fu, maps,
                ref, pair["reference_name"], shown, info)
    timings["all"] = time.perf_counter() - t0
    print(f"{pair['pair']}: {rounded_timings(timings)}")
    return rows


def group(metrics: Sequence[str], pairs: Sequence[Mapping[str, Any]], unpaired: Sequence[tuple[str, str]],
          out: Mapping[str, str], split: str = "test") -> None:
    """Rule ``longitudinal_group``: every pair's metrics in one table, per-site summary, the network vs the
    comparator per metric (Mann-Whitney U, Bonferroni) over the ``split`` pairs, the pairs table and the
    group report."""
    import pandas as pd

    from ..evaluate.tables import network_tests, site_summary
    from ..longitudinal.evaluate import group_report, long_table, pooled_detection

    table = pd.concat([pd.read_csv(p, sep="\t", na_values=["n/a"]) for p in metrics], ignore_index=True)
    table.to_csv(out["metrics"], sep="\t", index=False, na_rep="n/a", float_format="%.4g")
    sel = table[table["split"] == split] if split != "all" else table
    scored = sel[sel["reference"] != "none"]
    long = long_table(scored.to_dict("records"))
    summary = site_summary(long)
    summary.to_csv(out["summary"], sep="\t", index=False, na_rep="n/a", float_format="%.4g")
    tests = network_tests(long, by_site=False)
    tests.to_csv(out["tests"], sep="\t", index=False, na_rep="n/a", float_format="%.4g")
    ptable = pd.DataFrame(list(pairs))
    ptable.to_csv(out["pairs"], sep="\t", index=False)
    pooled = pooled_detection(scored) if len(scored) else pd.DataFrame()
    group_report(out["report"], pooled, summary, tests, table, ptable, unpaired, split)
    write_sidecar(out["metrics"], {"Description": "Lesion-wise metrics of new/enlarging-lesion maps per pair and "
                                                  "method (docs/evaluation.md, rule A)", "Split": split})
    for _, r in pooled.iterrows():
        print(f"{r['site']:>6} {r['method']:>12}: sensitivity {r['sensitivity']:.3f}, FP/pair "
              f"{r['fp_per_pair']:.2f}, F1 {r['f1']:.3f} ({r['pairs']} pairs, {r['lesions']} lesions)")


# ------------------------------------------------------------------------------------ rule bodies


def prepare_rule(smk: Any) -> None:
    res = prepare(smk.input.baseline, smk.input.followup, dict(smk.output.items()), smk.params.pair,
                  threads=int(smk.threads))
    print(f"{smk.params.pair}: {rounded_timings(res['timings'])}, brain {res['brain_voxels']} voxels, "
          f"rotation {res['rotation_deg']:.2f} deg")


def target_rule(smk: Any) -> None:
    n = target(smk.input.reference, smk.input.xfm, smk.input.flair_followup, smk.output[0], smk.params.pair)
    print(f"{smk.params.pair}: target {n} voxels")


def baseline_lesions_rule(smk: Any) -> None:
    n = baseline_lesions(smk.input.lesion, smk.input.xfm, smk.input.flair_baseline, smk.input.flair_followup,
                         smk.output[0], smk.params.pair)
    print(f"{smk.params.pair}: baseline lesions {n} voxels on the follow-up grid")


def comparator_rule(smk: Any) -> None:
    fit_comparator(smk.params.pairs, smk.params.ids, smk.params.cfg, smk.output[0])


def train_rule(smk: Any) -> None:
    train(smk.params.train_files, smk.params.train_ids, smk.params.val_files, smk.params.val_ids,
          smk.params.spec, smk.params.state_dir, dict(smk.output.items()),
          device=str(smk.config["longitudinal"]["device"]), threads=int(smk.threads),
          pretrain=smk.params.pretrain)


def evaluate_rule(smk: Any) -> None:
    evaluate({k: str(v) for k, v in smk.input.items()}, dict(smk.output.items()), smk.params.pair,
             smk.params.network, device=str(smk.config["longitudinal"]["device"]), threads=int(smk.threads))


def group_rule(smk: Any) -> None:
    group(list(smk.input.metrics), smk.params.pairs, smk.params.unpaired, dict(smk.output.items()),
          split=str(smk.params.split))
