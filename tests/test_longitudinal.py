"""The longitudinal stage's array functions: pairing, halfway space, comparator, lesion-wise scoring."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from mrflesion.bids import SubjectInputs
from mrflesion.longitudinal.comparator import detect, fit_thresholds
from mrflesion.longitudinal.evaluate import ENLARGED, NEW, component_kinds, pair_metrics, pooled_detection
from mrflesion.longitudinal.pairs import make_pairs
from mrflesion.longitudinal.preprocess import (
    ants_rigid_to_ras,
    grid_coordinates,
    halfway_sampling,
    halfway_to_followup,
    normalise,
    resample_cubic,
    rigid_square_root,
)

REF_SPEC = {"derivatives": "derivatives/manual", "datatype": "anat", "suffix": "mask", "extension": ".nii.gz",
            "entities": {"space": "FLAIR", "label": "newenlarged"}}


def _rigid(angles_deg, shift_mm) -> np.ndarray:
    t = np.eye(4)
    t[:3, :3] = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()
    t[:3, 3] = shift_mm
    return t


def _subject(label: str, session: str | None, site: str = "1") -> SubjectInputs:
    ses = f"ses-{session}/" if session else ""
    return SubjectInputs(label, session, site, "patient",
                         {"flair": f"/bids/sub-{label}/{ses}anat/flair.nii.gz",
                          "lesion": f"/bids/derivatives/manual/sub-{label}/{ses}anat/lesion.nii.gz"})


# ------------------------------------------------------------------------------------------- pairs


def test_pairs_baseline_and_consecutive_with_reasons_for_the_unpaired() -> None:
    subjects = [_subject("01", "01"), _subject("01", "02"), _subject("01", "03"), _subject("02", "01"),
                _subject("03", None), _subject("04", "02"), _subject("04", "05")]
    cfg = {"baseline": None, "pairing": "baseline", "reference": REF_SPEC}
    pairs, unpaired = make_pairs(subjects, cfg, "/bids", phantom=True)
    assert [(p.subject, p.baseline, p.followup) for p in pairs] == [
        ("01", "01", "02"), ("01", "01", "03"), ("04", "02", "05")]
    assert pairs[0].stem == "sub-01/ses-02/anat/sub-01_ses-02"
    assert pairs[0].reference == ("/bids/derivatives/manual/sub-01/ses-02/anat/"
                                  "sub-01_ses-02_space-FLAIR_label-newenlarged_mask.nii.gz")
    assert pairs[0].lesion_baseline.endswith("sub-01/ses-01/anat/lesion.nii.gz")
    assert dict(unpaired) == {"sub-02": "one session only (ses-01)", "sub-03": "no session labels (one time point)"}
    cons, _ = make_pairs(subjects, {**cfg, "pairing": "consecutive"}, "/bids", phantom=True)
    assert [(p.baseline, p.followup) for p in cons if p.subject == "01"] == [("01", "02"), ("02", "03")]
    fixed, unp = make_pairs([*subjects, _subject("05", "01"), _subject("05", "03")], {**cfg, "baseline": "02"},
                            "/bids", phantom=True)
    assert [(p.subject, p.baseline, p.followup) for p in fixed] == [("01", "02", "03"), ("04", "02", "05")]
    assert dict(unp)["sub-05"] == "baseline session ses-02 not among ses-01, ses-03"


def test_pairs_without_a_manual_mask_on_disk_are_unannotated(tmp_path) -> None:
    subjects = [_subject("01", "01"), _subject("01", "02")]
    cfg = {"baseline": None, "pairing": "baseline", "reference": REF_SPEC}
    pairs, _ = make_pairs(subjects, cfg, str(tmp_path), phantom=False)
    assert pairs[0].reference is None
    ref = tmp_path / "derivatives/manual/sub-01/ses-02/anat/sub-01_ses-02_space-FLAIR_label-newenlarged_mask.nii.gz"
    ref.parent.mkdir(parents=True)
    ref.write_bytes(b"")
    pairs, _ = make_pairs(subjects, cfg, str(tmp_path), phantom=False)
    assert pairs[0].reference == str(ref)


# ------------------------------------------------------------------------------------------- halfway


def test_rigid_square_root_halves_the_motion() -> None:
    t = _rigid([3.0, -4.0, 5.0], [4.0, -2.0, 1.0])
    s = rigid_square_root(t)
    np.testing.assert_allclose(s @ s, t, atol=1e-10)
    angle = np.degrees(np.arccos((np.trace(t[:3, :3]) - 1) / 2))
    half = np.degrees(np.arccos((np.trace(s[:3, :3]) - 1) / 2))
    assert half == pytest.approx(angle / 2, rel=1e-9)
    with pytest.raises(ValueError, match="not a rigid"):
        rigid_square_root(np.diag([2.0, 1.0, 1.0, 1.0]))


def test_ants_lps_parameters_become_the_ras_matrix() -> None:
    # x -> M (x - c) + c + t in LPS; a pure translation (1, 2, 3) LPS is (-1, -2, 3) RAS
    t = ants_rigid_to_ras(np.eye(3).ravel(), [1.0, 2.0, 3.0], [5.0, 6.0, 7.0])
    np.testing.assert_allclose(t[:3, 3], [-1.0, -2.0, 3.0])
    m = Rotation.from_euler("z", 10, degrees=True).as_matrix()
    c = np.array([10.0, -20.0, 5.0])
    t = ants_rigid_to_ras(m.ravel(), [0.0, 0.0, 0.0], c)
    ras_c = c * [-1, -1, 1]
    np.testing.assert_allclose(t[:3, :3] @ ras_c + t[:3, 3], ras_c, atol=1e-9)  # the centre is fixed


def _head(shape=(48, 48, 20), zooms=(2.0, 2.0, 3.0), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth 'brain': an ellipsoid with texture, on a grid centred on the origin."""
    rng = np.random.default_rng(seed)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    c = (np.array(shape) - 1) / 2
    r = ((idx - c) * zooms / (np.array(shape) * zooms * 0.4)) ** 2
    inside = r.sum(-1) < 1
    tex = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
    vol = np.where(inside, 500.0 + 400.0 * tex / tex.std(), 0.0).astype(np.float32)
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = -c * zooms
    return ndimage.gaussian_filter(vol, 0.7), affine


def test_both_sessions_meet_in_the_halfway_space_and_map_back() -> None:
    bl, a = _head()
    t = _rigid([2.0, -3.0, 4.0], [3.0, -2.0, 1.5])  # a baseline point p appears at t p in the follow-up
    fu = resample_cubic(bl, grid_coordinates(np.linalg.inv(a) @ np.linalg.inv(t) @ a, bl.shape))
    to_bl, to_fu, s = halfway_sampling(t, bl.shape, a, a)
    blh = resample_cubic(bl, grid_coordinates(to_bl, bl.shape))
    fuh = resample_cubic(fu, grid_coordinates(to_fu, bl.shape))
    inner = ndimage.binary_erosion(bl > 300, iterations=4) & ndimage.binary_erosion(blh > 300, iterations=4)
    err_half = np.abs(blh - fuh)[inner].mean()
    err_native = np.abs(bl - fu)[inner].mean()
    assert err_half < 0.1 * err_native  # aligned (the residual is interpolation, twice)
    # a halfway map brought back to the follow-up grid lies on the follow-up anatomy
    back = halfway_to_followup(fuh, s, a)
    core = ndimage.binary_erosion(fu > 300, iterations=5)
    assert np.abs(back - fu)[core].mean() < 0.1 * np.abs(bl - fu)[core].mean()


def test_normalise_divides_by_the_brain_median() -> None:
    v = np.array([[[0.0, 2.0, 4.0, 6.0]]], np.float32)
    brain = v > 0
    np.testing.assert_allclose(normalise(v, brain), [[[0.0, 0.5, 1.0, 1.5]]])
    with pytest.raises(ValueError, match="empty brain"):
        normalise(v, np.zeros_like(brain))


# ------------------------------------------------------------------------------------------- comparator


def _pair_with_new_lesions(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple]:
    rng = np.random.default_rng(seed)
    bl, _ = _head(seed=seed)
    bl = bl / np.median(bl[bl > 0])
    brain = bl > 0.2
    fu = bl.copy()
    ref = np.zeros(bl.shape, np.uint8)
    centres = [(14, 20, 8), (30, 30, 12), (22, 34, 6)]
    for c in centres:
        sl = tuple(slice(x - 1, x + 2) for x in c)
        fu[sl] += 0.8
        ref[sl] = 1
    old = (34, 14, 10)  # a lesion present at both sessions is not new
    sl = tuple(slice(x - 1, x + 2) for x in old)
    bl[sl] += 0.8
    fu[sl] += 0.8
    noise = 0.03
    return (bl + rng.normal(0, noise, bl.shape) * brain, fu + rng.normal(0, noise, bl.shape) * brain,
            brain, ref, (2.0, 2.0, 3.0))


def test_subtraction_finds_new_lesions_and_not_old_ones() -> None:
    cases = [_pair_with_new_lesions(s) for s in range(3)]
    params, f1 = fit_thresholds(cases[:2])
    assert f1 > 0.9
    bl, fu, brain, ref, vox = cases[2]
    _, mask = detect(bl, fu, brain, vox, params)
    m = pair_metrics(mask, ref, 0.012)
    assert m["sensitivity"] == 1.0 and m["fp"] == 0
    # the same images with the sessions swapped: nothing new
    _, mask = detect(fu, bl, brain, vox, params)
    assert pair_metrics(mask, ref, 0.012)["tp"] == 0


# ------------------------------------------------------------------------------------------- scoring


def test_new_and_enlarged_components() -> None:
    shape = (20, 20, 10)
    pred = np.zeros(shape, np.uint8)
    pred[2:5, 2:5, 2:4] = 1  # touches the baseline lesion: enlarged
    pred[12:15, 12:15, 5:7] = 1  # new
    base = np.zeros(shape, np.uint8)
    base[5:7, 2:5, 2:4] = 1
    ref = pred.copy()
    ref[16:18, 2:4, 8:9] = 1  # a missed new lesion (4 voxels)
    labels, n = ndimage.label(pred, np.ones((3, 3, 3)))
    kinds = component_kinds(labels, n, base)
    assert sorted(kinds[1:].tolist()) == [NEW, ENLARGED]
    dseg = np.where(ref > 0, NEW, 0)
    assert component_kinds(labels, n, base, dseg)[1:].tolist() == [NEW, NEW]  # the dseg wins
    m = pair_metrics(pred, ref, 0.003, 0.01, base)
    assert (m["n_ref"], m["tp"], m["fp"], m["n_new"], m["n_enlarged"]) == (3, 2, 0, 1, 1)
    assert m["ref_n_new"] == 2 and m["sensitivity_new"] == 0.5 and m["sensitivity_enlarged"] == 1.0
    assert m["volume_new_ml"] == pytest.approx(18 * 0.003)


def test_pooled_detection_sums_counts_before_ratios() -> None:
    import pandas as pd

    rows = pd.DataFrame([
        {"site": "1", "method": "a", "n_ref": 4, "tp": 3, "fp": 1, "n_pred": 4, "dice": 0.7},
        {"site": "2", "method": "a", "n_ref": 0, "tp": 0, "fp": 1, "n_pred": 1, "dice": np.nan},
    ])
    p = pooled_detection(rows).set_index(["site", "method"])
    assert p.loc[("all", "a"), "sensitivity"] == 0.75
    assert p.loc[("all", "a"), "fp_per_pair"] == 1.0
    assert p.loc[("all", "a"), "f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)


def test_prepare_writes_a_halfway_pair(tmp_path) -> None:
    """The rule body end to end on two synthetic sessions: registration, halfway images, transforms."""
    from mrflesion.steps.longitudinal import prepare

    bl, a = _head(shape=(64, 64, 24))
    t = _rigid([1.5, -2.0, 3.0], [2.0, -1.0, 1.0])
    fu = 1.1 * resample_cubic(bl, grid_coordinates(np.linalg.inv(a) @ np.linalg.inv(t) @ a, bl.shape))
    nib.save(nib.Nifti1Image(bl, a), tmp_path / "bl.nii.gz")
    nib.save(nib.Nifti1Image(fu.astype(np.float32), a), tmp_path / "fu.nii.gz")
    out = {k: str(tmp_path / f"{k}.nii.gz") for k in ("baseline", "followup", "brain")}
    out["xfm"] = str(tmp_path / "xfm.json")
    res = prepare(str(tmp_path / "bl.nii.gz"), str(tmp_path / "fu.nii.gz"), out, "sub-x_ses-2")
    assert res["rotation_deg"] == pytest.approx(np.degrees(np.arccos((np.trace(t[:3, :3]) - 1) / 2)), abs=0.3)
    b = nib.load(out["baseline"]).get_fdata()
    f = nib.load(out["followup"]).get_fdata()
    brain = nib.load(out["brain"]).get_fdata() > 0
    core = ndimage.binary_erosion(brain, iterations=3)
    assert np.median(b[brain]) == pytest.approx(1.0, abs=1e-3)
    assert np.median(f[brain]) == pytest.approx(1.0, abs=1e-3)  # the 10 % gain change is gone
    assert np.abs(b - f)[core].mean() < 0.02


def test_a_lesion_in_pieces_counts_once_with_lesion_ids() -> None:
    """An enlarging lesion's rim in two pieces (the phantom's ids say one lesion): one reference lesion,
    detected when either piece is hit; without ids, two components, one missed."""
    shape = (20, 20, 10)
    ref = np.zeros(shape, np.uint8)
    ids = np.zeros(shape, np.int16)
    ref[2:4, 2:4, 2:4] = 1
    ids[2:4, 2:4, 2:4] = 7
    ref[8:10, 2:4, 2:4] = 1  # not touching the first piece
    ids[8:10, 2:4, 2:4] = 7
    ref[14:17, 14:17, 5:7] = 1  # another lesion, missed
    ids[14:17, 14:17, 5:7] = 9
    pred = np.zeros(shape, np.uint8)
    pred[2:4, 2:4, 2:4] = 1
    grouped = pair_metrics(pred, ref, 0.003, 0.01, ref_ids=ids)
    plain = pair_metrics(pred, ref, 0.003, 0.01)
    assert (grouped["n_ref"], grouped["tp"], grouped["sensitivity"]) == (2, 1, 0.5)
    assert (grouped["n_ref_components"], grouped["sensitivity_components"]) == (3, pytest.approx(1 / 3))
    assert (plain["n_ref"], plain["tp"]) == (3, 1)
    # the Dice over detected lesions takes the whole detected lesion (both pieces)
    assert grouped["dice"] == pytest.approx(2 * 8 / (16 + 8))
    assert plain["dice"] == pytest.approx(1.0)


def test_training_job_gets_a_gpu_on_slurm_and_the_demo_plan() -> None:
    """The SLURM profile gives the longitudinal training job a GPU, and the documented longitudinal
    command plans one job per pair and stage, one training job and the group tables."""
    import subprocess
    import sys

    import yaml
    from conftest import ROOT

    prof = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    assert prof["set-resources"]["longitudinal_train"]["gpu"] == 1
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "-n", "--quiet", "rules",
         "--configfile", str(ROOT / "config.yaml"), str(ROOT / "config" / "longitudinal.yaml"),
         "--config", "output_dir=/nonexistent/out", "work_dir=/nonexistent/work", "--", "longitudinal"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    counts = {}
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    assert counts["longitudinal_prepare"] == counts["longitudinal_evaluate"] == 20  # one pair per subject
    assert counts["longitudinal_train"] == counts["longitudinal_comparator"] == counts["longitudinal_group"] == 1
    # training targets only for the training and validation pairs: 2 test patients per site never reach training
    assert counts["longitudinal_target"] == 16
