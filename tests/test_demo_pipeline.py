"""The README's main job on the default phantom demo, end to end, checked against ground truth.

One run per test session (module fixture): the phantom rule first, then everything else, so that
the test can prove the pipeline never writes into its input BIDS tree.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT, tree_digest

from mrflesion.config import load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("demo")
    overlay = tmp / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({
        "output_dir": str(tmp / "out"), "work_dir": str(tmp / "work"), "phantom": {"dir": str(tmp / "phantom")},
    }))
    base = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--profile",
            str(ROOT / "profiles" / "local"), "--configfile", str(ROOT / "config.yaml"), str(overlay), "--quiet"]
    first = subprocess.run(base[:5] + ["phantom"] + base[5:], cwd=tmp, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    before = tree_digest(tmp / "phantom")
    proc = subprocess.run(base, cwd=tmp, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return {"tmp": tmp, "out": tmp / "out", "work": tmp / "work", "phantom": tmp / "phantom",
            "before": before, "log": proc.stderr}


def test_input_tree_untouched(demo: dict) -> None:
    assert tree_digest(demo["phantom"]) == demo["before"]


def test_derivatives_dataset(demo: dict) -> None:
    desc = json.loads((demo["out"] / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "mrflesion"


def test_group_table_lists_every_subject(demo: dict) -> None:
    table = pd.read_csv(demo["out"] / "group" / "inputs.tsv", sep="\t")
    truth = pd.read_csv(demo["phantom"] / "participants.tsv", sep="\t")
    assert list(table["subject"]) == list(truth["participant_id"])
    assert (table["status"] == "ok").all()
    assert list(table["site"]) == list(truth["site"])
    # Manual masks: controls empty, patients not.
    controls = table["group"] == "control"
    assert (table.loc[controls, "lesion_ml"] == 0).all() and (table.loc[~controls, "lesion_ml"] > 0).all()


def _load(path: Path):
    import nibabel as nib
    import numpy as np

    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)


def _subjects(demo: dict) -> list[str]:
    return list(pd.read_csv(demo["phantom"] / "participants.tsv", sep="\t")["participant_id"])


def test_mppca_sigma_matches_true_noise(demo: dict) -> None:
    """MPPCA's sigma vs the phantom's true Rician sigma, median ratio over the eroded brain mask."""
    import numpy as np
    from scipy import ndimage

    for sub in _subjects(demo):
        est = _load(demo["out"] / sub / "anat" / f"{sub}_acq-MRFEPI_desc-mppca_noisemap.nii.gz")
        true = _load(demo["phantom"] / "derivatives/truth" / sub / "anat" / f"{sub}_space-MRF_noisesigma.nii.gz")
        mask = _load(demo["out"] / sub / "anat" / f"{sub}_acq-MRFEPI_desc-brain_mask.nii.gz") > 0
        core = ndimage.binary_erosion(mask, iterations=4) & (est > 0)
        ratio = float(np.median(est[core] / true[core]))
        assert abs(ratio - 1) < 0.05, (sub, ratio)


def test_dictionary_maps_accuracy_in_pure_tissue(demo: dict) -> None:
    """After denoising, median |relative error| of T1 and T2* in pure WM and GM (fraction >= 0.95) < 5 %."""
    import numpy as np

    for sub in _subjects(demo):
        truth = demo["phantom"] / "derivatives/truth" / sub / "anat"
        lesion = _load(truth / f"{sub}_space-MRF_label-lesion_mask.nii.gz") > 0
        for tissue in ("WM", "GM"):
            pure = (_load(truth / f"{sub}_space-MRF_label-{tissue}_probseg.nii.gz") >= 0.95) & ~lesion
            assert pure.sum() > 100, (sub, tissue)
            for name in ("T1map", "T2starmap"):
                est = _load(demo["out"] / sub / "anat" / f"{sub}_acq-MRFEPI_{name}.nii.gz")
                ref = _load(truth / f"{sub}_space-MRF_{name}.nii.gz")
                err = float(np.median(np.abs(est[pure] - ref[pure]) / ref[pure]))
                assert err < 0.05, (sub, tissue, name, err)


def test_tissue_dice_on_the_full_chain(demo: dict) -> None:
    """GM/WM from the pipeline's own matched T1 maps vs the true fractions, binarised at 80 %, both sites."""
    from mrflesion.evaluate.metrics import tissue_dice

    table = pd.read_csv(demo["phantom"] / "participants.tsv", sep="\t")
    for sub in table["participant_id"]:
        truth = demo["phantom"] / "derivatives/truth" / sub / "anat"
        for tissue, floor in (("WM", 0.90), ("GM", 0.85)):
            est = _load(demo["out"] / sub / "anat" / f"{sub}_space-T2w_label-{tissue}_probseg.nii.gz")
            ref = _load(truth / f"{sub}_space-T2w_label-{tissue}_probseg.nii.gz")
            assert tissue_dice(est, ref, 0.8) >= floor, (sub, tissue)
    assert set(table["site"]) == {"site1", "site2"}


def test_network_inputs_on_t2w_grid(demo: dict) -> None:
    import nibabel as nib

    for sub in _subjects(demo):
        anat = demo["out"] / sub / "anat"
        t2w = nib.load(str(demo["phantom"] / sub / "anat" / f"{sub}_T2w.nii.gz"))
        mrf = nib.load(str(anat / f"{sub}_acq-MRFEPI_space-T2w_MRF.nii.gz"))
        assert mrf.shape == t2w.shape + (35,)
        assert abs(mrf.affine - t2w.affine).max() < 1e-4


def _splits(demo: dict) -> pd.DataFrame:
    return pd.read_csv(demo["out"] / "group" / "splits.tsv", sep="\t")


def test_every_network_trained_and_applied(demo: dict) -> None:
    """Each configured network: a model, and outputs in T2w space in physical units for every subject."""
    import nibabel as nib
    import numpy as np

    from mrflesion.plan.evaluation import output_files

    cfg = load_config(ROOT / "config.yaml")
    for net in cfg["networks"]:
        assert (demo["out"] / "models" / net["name"] / "best.pt").is_file()
        for sub in _subjects(demo):
            files = output_files(str(demo["out"]), f"{sub}/anat/{sub}", net["name"], net["outputs"])
            t2w = nib.load(str(demo["phantom"] / sub / "anat" / f"{sub}_T2w.nii.gz"))
            for name, path in files.items():
                img = nib.load(path)
                assert img.shape == t2w.shape and abs(img.affine - t2w.affine).max() < 1e-4
                a = np.asarray(img.dataobj)
                side = json.loads(Path(path.replace(".nii.gz", ".json")).read_text())
                assert side["Inference"]["network"] == net["name"] and side["Inference"]["predict_seconds"] > 0
                if name == "T1":  # brain tissue 700-4000 ms
                    assert side["Units"] == "ms" and 300 < np.median(a[a > 0]) < 3000, (sub, name)
                elif name == "T2star":  # 10-300 ms (the output ceiling)
                    assert side["Units"] == "ms" and 10 < np.median(a[a > 0]) <= 300 and a.max() <= 300, (sub, name)
                else:
                    assert a.min() >= 0 and a.max() <= 1, (sub, name)


def test_network_accuracy_on_test_subjects(demo: dict) -> None:
    """The trained 5-output network against the pipeline's references on held-out (test) subjects:
    T1 within 15 % (the issue's learning bar, demo-sized training) and NAWM Dice >= 0.7."""
    metrics = pd.read_csv(demo["out"] / "group" / "metrics.tsv", sep="\t", na_values=["n/a"])
    test = metrics[(metrics.split == "test") & (metrics.reference == "pipeline") & (metrics.network == "MSE-5")]
    assert set(test.subject) == set(_splits(demo).query("split == 'test'").subject)
    v = test.groupby("metric")["value"].mean()
    assert v["T1_mrd"] < 0.15, v.to_dict()
    assert v["NAWM_dice"] >= 0.7, v.to_dict()


#: Lesion floors of the recommended network on the test subjects against the truth (the product). An
#: empty map scores Dice 0 and LDR 0, an all-brain map Dice about 0.003. Training on the CPU is
#: deterministic on one machine but not across CPUs (kernels accumulate in another order). Since MTL-5
#: reads the tissue priors, its pooled Dice was 0.72-0.77 and its LDR 1.0 in five trainings on the demo
#: subjects (two seeds, one and two threads; docs/lesion-training.md), where without them it scattered
#: over 0.14-0.47: the floors sit well below that spread, so that they fail on a broken lesion output,
#: not on a CPU. It must also beat the classical baseline (0.15-0.25 on the same subjects).
LESION_DICE_FLOOR = 0.5
LESION_LDR_FLOOR = 0.6


def test_recommended_network_finds_the_lesions(demo: dict) -> None:
    """Empty (or all-brain) lesion maps fail CI: the first network of the config (MTL-5), pooled over the
    test subjects at its validation threshold, against the phantom's true lesions."""
    cfg = load_config(ROOT / "config.yaml")
    lead = cfg["networks"][0]["name"]
    metrics = pd.read_csv(demo["out"] / "group" / "metrics.tsv", sep="\t", na_values=["n/a"])
    test = metrics[(metrics.split == "test") & (metrics.reference == "truth")]
    v = test.pivot_table(index=["network", "subject"], columns="metric", values="value")
    ours, base = v.loc[lead], v.loc["baseline"]
    assert ours["lesion_threshold_vt"].between(0.01, 0.99).all()
    # pooled Dice from the per-subject volumes: 2 TP / (P + R), TP = Dice (P + R) / 2
    def pooled(t: pd.DataFrame, suffix: str) -> float:
        p, r = t[f"lesion_pred_ml{suffix}"], t["lesion_ref_ml"]
        return float((t[f"lesion_dice{suffix}"] * (p + r)).sum() / (p + r).sum())

    dice, ldr = pooled(ours, "_vt"), float(ours["lesion_ldr_vt"].mean())
    print(f"{lead} on the test subjects vs truth: pooled Dice {dice:.3f} (33 %: {pooled(ours, ''):.3f}), "
          f"LDR {ldr:.2f}, FP/subject {ours['lw_fp_vt'].mean():.1f}; baseline pooled Dice "
          f"{pooled(base, '_vt'):.3f}")
    assert dice >= LESION_DICE_FLOOR and ldr >= LESION_LDR_FLOOR
    assert dice > pooled(base, "_vt")


def test_group_tables(demo: dict) -> None:
    out = demo["out"] / "group"
    summary = pd.read_csv(out / "summary_sites.tsv", sep="\t", na_values=["n/a"])
    cfg = load_config(ROOT / "config.yaml")
    names = {n["name"] for n in cfg["networks"]}
    assert set(summary.network) == names | {"baseline"} and {"site1", "site2", "all"} <= set(summary.site)
    n_test = _splits(demo).query("split == 'test'").groupby("site").size().to_dict()
    dice = summary[summary.metric == "pipeline:lesion_dice"].set_index(["site", "network"])["n"]
    for site, n in n_test.items():
        assert (dice.loc[site] == n).all()
    for name in ("tests_sites.tsv", "tests_networks.tsv", "failed.tsv", "times.tsv", "metrics.tsv"):
        assert (out / name).is_file(), name
    for metric in ("truth:lw_f1", "truth:lesion_ndsc", "truth:lesion_hd95", "truth:lesion_dice_vt"):
        assert metric in set(summary.metric), metric
    times = pd.read_csv(out / "times.tsv", sep="\t")
    assert len(times) == len(_subjects(demo)) * len(names)
    assert (times.conventional_s > times.inference_s).all()


def test_reports_open_in_chromium(demo: dict, tmp_path: Path) -> None:
    """Every per-subject report and the group report in headless Chromium: no console error, no
    broken image, a screenshot that is not blank."""
    from browser import BrowserUnavailable, check_page

    reports = [demo["out"] / sub / "anat" / f"{sub}_report.html" for sub in _subjects(demo)]
    reports.append(demo["out"] / "group" / "report.html")
    for page in reports:
        assert page.is_file(), page
        try:
            problems = check_page(page, tmp_path / f"{page.stem}.png")
        except BrowserUnavailable as exc:
            pytest.skip(f"no chromium: {exc}")
        assert problems == [], (page, problems)


# ---------------------------------------------------------------------------------------- per-lesion table


def test_per_lesion_ratios_and_locations_against_truth(demo: dict) -> None:
    """The manual mask's lesions of at least 0.1 ml, every subject: T1 and T2* mean ratios to NAWM
    within 10 % of the same measurement on the phantom's true maps, and the periventricular class as
    the phantom drew it for at least 90 % of them (issue 18)."""
    les = pd.read_csv(demo["out"] / "group" / "lesions.tsv", sep="\t", na_values=["n/a"])
    sub = les[(les.source == "manual") & (les.volume_ml >= 0.1) & (les.truth_lesion > 0)]
    assert len(sub) >= 8, les[les.source == "manual"].to_string()
    for q in ("T1", "T2star"):
        err = (sub[f"{q}_mean_ratio"] / sub[f"truth_{q}_mean_ratio"] - 1).abs()
        assert (err <= 0.10).all(), sub[["subject", "lesion", "volume_ml", f"{q}_mean_ratio",
                                         f"truth_{q}_mean_ratio"]].to_string()
    agree = (sub.location == "periventricular") == (sub.truth_location == "periventricular")
    assert agree.mean() >= 0.9, sub[["subject", "lesion", "location", "truth_location"]].to_string()
    # every subject's table in the derivatives, with its sidecar; the per-site table; the report section
    cfg = load_config(ROOT / "config.yaml")
    for s in _subjects(demo):
        tsv = demo["out"] / s / "anat" / f"{s}_space-T2w_desc-lesions_quant.tsv"
        side = json.loads(tsv.with_suffix(".json").read_text())
        assert side["Units"]["T1_mean"] == "ms" and side["Units"]["volume_ml"] == "ml" and side["Sources"]
        t = pd.read_csv(tsv, sep="\t")
        assert set(t.source) <= {"manual", "baseline", *(n["name"] for n in cfg["networks"])}
        assert "Per-lesion T1, T2*, B1" in (demo["out"] / s / "anat" / f"{s}_report.html").read_text()
    sites = pd.read_csv(demo["out"] / "group" / "lesions_sites.tsv", sep="\t")
    assert {"site", "source", "location", "n_lesions", "quantity", "mean_sd"} <= set(sites.columns)
    # the model card of every trained network
    for net in cfg["networks"]:
        card = json.loads((demo["out"] / "models" / net["name"] / "model_card.json").read_text())
        assert card["Name"] == net["name"] and card["MRFSchedule"]["Fingerprints"]
        assert {s["site"] for s in card["TrainingCohort"]["Sites"]} == {"site1", "site2"}


# ---------------------------------------------------------------------------------------- apply mode

APPLY_PHANTOM = {"subjects": 2, "sites": 2, "seed": 7, "grid": "demo", "longitudinal": False}


#: The new subject of apply mode without a manual lesion mask (its file removed from the new cohort; the
#: cohort's control, so that the patient keeps the manual lesions the per-site tables are checked for).
UNANNOTATED = "sub-01"
ANNOTATED = "sub-02"


@pytest.fixture(scope="module")
def applied(demo: dict) -> dict:
    """The demo's trained networks applied to a new phantom cohort (another seed) as a BIDS dataset,
    config `models`; one subject's manual lesion mask removed, as for a new patient."""
    import shutil

    tmp = demo["tmp"] / "apply"
    (tmp / "work").mkdir(parents=True)
    # the dictionary of the same MRF schedule, built by the demo run (a cache, keyed by the timing)
    shutil.copytree(demo["work"] / "dictionaries", tmp / "work" / "dictionaries")
    base = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--profile",
            str(ROOT / "profiles" / "local"), "--configfile", str(ROOT / "config.yaml")]
    gen = tmp / "phantom.yaml"
    gen.write_text(yaml.safe_dump({"output_dir": str(tmp / "gen"), "work_dir": str(tmp / "gen_work"),
                                   "phantom": {**APPLY_PHANTOM, "dir": str(tmp / "phantom")}}))
    made = subprocess.run(base[:5] + ["phantom"] + base[5:] + [str(gen), "--quiet"], cwd=tmp, capture_output=True,
                          text=True, timeout=600)
    assert made.returncode == 0, made.stderr[-3000:]
    manual = tmp / "phantom" / "derivatives" / "manual" / UNANNOTATED / "anat"
    for f in manual.glob(f"{UNANNOTATED}_space-FLAIR_label-lesion_mask.*"):
        f.unlink()
    overlay = tmp / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({
        "bids_dir": str(tmp / "phantom"), "output_dir": str(tmp / "out"), "work_dir": str(tmp / "work"),
        "models": str(demo["out"] / "models"),
    }))
    base.append(str(overlay))
    plan = subprocess.run(base + ["-n"], cwd=tmp, capture_output=True, text=True, timeout=600)
    assert plan.returncode == 0, plan.stderr[-3000:]
    proc = subprocess.run(base + ["--quiet"], cwd=tmp, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return {"tmp": tmp, "out": tmp / "out", "phantom": tmp / "phantom", "plan": plan.stdout + plan.stderr}


def test_apply_mode_plans_no_training_and_writes_maps_reports_tables(demo: dict, applied: dict) -> None:
    for rule in ("train_network", "training_set", "model_record", "splits"):
        assert f"rule {rule}:" not in applied["plan"] and f"\n{rule} " not in applied["plan"], rule
    assert "evaluate_subject" in applied["plan"]
    out = applied["out"]
    cfg = load_config(ROOT / "config.yaml")
    names = [n["name"] for n in cfg["networks"]]
    assert not (out / "models").exists()
    for i in (1, 2):
        s = f"sub-0{i}"
        anat = out / s / "anat"
        assert (anat / f"{s}_space-T2w_label-lesion_desc-MTL5_probseg.nii.gz").is_file()
        report = (anat / f"{s}_report.html").read_text()
        assert "Model cards" in report and "Per-lesion T1, T2*, B1" in report and "apply subject" in report
        t = pd.read_csv(anat / f"{s}_space-T2w_desc-lesions_quant.tsv", sep="\t")
        assert (t.split == "apply").all()
    group = out / "group"
    metrics = pd.read_csv(group / "metrics.tsv", sep="\t")
    assert set(metrics.split) == {"apply"} and set(names) <= set(metrics.network)
    sites = pd.read_csv(group / "lesions_sites.tsv", sep="\t")
    assert len(sites) and "manual" in set(sites.source)
    assert (group / "report.html").is_file() and (group / "lesions.tsv").is_file()


def test_apply_mode_subject_without_manual_mask(applied: dict) -> None:
    """A new subject without a manual lesion mask: the networks' maps, the per-lesion table (the networks'
    lesions, none from a manual mask) and the report are written; no lesion metric against a reference
    it does not have, the map metrics against the pipeline's references as for the others."""
    out, s = applied["out"], UNANNOTATED
    anat = out / s / "anat"
    assert (anat / f"{s}_space-T2w_label-lesion_desc-MTL5_probseg.nii.gz").is_file()
    assert not (anat / f"{s}_space-T2w_label-lesion_mask.nii.gz").exists()
    assert (out / ANNOTATED / "anat" / f"{ANNOTATED}_space-T2w_label-lesion_mask.nii.gz").is_file()
    assert "rule register_lesion:" in applied["plan"] and f"stem={s}/anat/{s}" not in "".join(
        block.split("\n\n")[0] for block in applied["plan"].split("rule register_lesion:")[1:])
    inputs = pd.read_csv(out / "group" / "inputs.tsv", sep="\t", dtype=str, keep_default_na=False).set_index("subject")
    assert inputs.loc[s, "status"] == "ok" and inputs.loc[s, "lesion_ml"] == "n/a"
    m = pd.read_csv(out / "group" / "metrics.tsv", sep="\t")
    mine = m[(m.subject == s) & (m.reference == "pipeline")]
    assert "T1_mrd" in set(mine.metric) and not {"lesion_dice", "lesion_ldr", "lw_f1"} & set(mine.metric)
    other = m[(m.subject == ANNOTATED) & (m.reference == "pipeline")]
    assert "lesion_dice" in set(other.metric)
    t = pd.read_csv(anat / f"{s}_space-T2w_desc-lesions_quant.tsv", sep="\t")
    assert "manual" not in set(t.source)
    report = (anat / f"{s}_report.html").read_text()
    assert "No manual lesion mask for this subject" in report and "Per-lesion T1, T2*, B1" in report
    assert "no validation threshold known" not in report  # the networks' operating points apply as elsewhere


def test_apply_mode_refuses_another_mrf_schedule(demo: dict, applied: dict, tmp_path: Path) -> None:
    """A subject whose MRF schedule (here: the flip angles) is not the networks' gets one line and no
    inference; the others are planned as usual (the BIDS-app CLI with --models)."""
    import shutil

    bids = tmp_path / "bids"
    shutil.copytree(applied["phantom"], bids, ignore=shutil.ignore_patterns("truth"))
    sidecar = bids / "sub-01" / "anat" / "sub-01_acq-MRFEPI_MRF.json"
    side = json.loads(sidecar.read_text())
    side["FlipAngle"] = [a + 5.0 for a in side["FlipAngle"]]
    sidecar.write_text(json.dumps(side))
    proc = subprocess.run([sys.executable, "-m", "mrflesion.cli", str(bids), str(tmp_path / "out"), "participant",
                           "--models", str(demo["out"] / "models"), "-w", str(tmp_path / "work"), "-n"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("mrflesion: no inference for sub-01: MRF schedule")]
    assert len(lines) == 1 and lines[0].endswith(str(sidecar)) and "differs from the one network" in lines[0]
    log = proc.stdout + proc.stderr
    assert "wildcards: stem=sub-02/anat/sub-02" in log
    evaluations = log.split("rule evaluate_subject:")[1:]
    assert len(evaluations) == 1 and "stem=sub-02/anat/sub-02" in evaluations[0].split("\n\n")[0]
    assert "train_network" not in log
