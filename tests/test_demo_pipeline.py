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

    from mrflesion.evaluate_steps import output_files

    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
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


#: Lesion floors of the recommended network on the test subjects against the truth (the product): far
#: below what it reaches on the demo (see README) so that CPU-dependent training noise cannot fail them,
#: far above what an empty map or an all-brain map scores (0).
LESION_DICE_FLOOR = 0.35
LESION_LDR_FLOOR = 0.4


def test_recommended_network_finds_the_lesions(demo: dict) -> None:
    """Empty lesion maps fail CI: the first network of the config (MTL-5), pooled over the test subjects
    at its validation threshold, against the phantom's true lesions; it beats the classical baseline."""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
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
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
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
