"""Voxel-wise and lesion-wise evaluation metrics against independent implementations and hand-built cases."""

from __future__ import annotations

import math
import warnings

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from scipy.spatial import distance
from sklearn import metrics as skm

from mrflesion.evaluate import lesionwise as lw
from mrflesion.evaluate import metrics as m

# ----------------------------------------------------------------------------- helpers


def random_mask(rng, shape=(24, 20, 8), p=0.3, sigma=1.0):
    """Blobby random mask (smoothed noise thresholded at its (1 - p) quantile)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > np.quantile(field, 1 - p)


def nipype_overlap(tmp_path, monkeypatch, vol1, vol2):
    """(dice, jaccard) from nipype.algorithms.metrics.Overlap; volume1 = reference, volume2 = prediction."""
    from nipype.algorithms.metrics import Overlap

    monkeypatch.chdir(tmp_path)
    paths = []
    for k, vol in enumerate((vol1, vol2)):
        p = tmp_path / f"v{k}.nii.gz"
        nib.save(nib.Nifti1Image(vol.astype(np.uint8), np.eye(4)), p)
        paths.append(str(p))
    res = Overlap(volume1=paths[0], volume2=paths[1]).run()
    return float(res.outputs.dice), float(res.outputs.jaccard)


def sk(fn, ref, pred, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(ref.ravel(), pred.ravel(), **kw))


def box(shape, *slices):
    out = np.zeros(shape, bool)
    out[slices] = True
    return out


# ----------------------------------------------------------------------------- voxel-wise vs independent code


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_overlap_metrics_match_nipype_sklearn_scipy(tmp_path, monkeypatch, seed):
    rng = np.random.default_rng(seed)
    ref = random_mask(rng, p=0.2)
    pred = random_mask(rng, p=0.3) | (ref & (rng.random(ref.shape) < 0.5))
    nd, nj = nipype_overlap(tmp_path, monkeypatch, ref, pred)
    # nipype rounds its Dice / Jaccard to 5 decimals.
    assert m.dice(pred, ref) == pytest.approx(nd, abs=1e-5)
    assert m.iou(pred, ref) == pytest.approx(nj, abs=1e-5)
    assert m.dice(pred, ref) == pytest.approx(1 - distance.dice(pred.ravel(), ref.ravel()), rel=1e-12)
    assert m.iou(pred, ref) == pytest.approx(sk(skm.jaccard_score, ref, pred), rel=1e-12)
    assert m.precision(pred, ref) == pytest.approx(sk(skm.precision_score, ref, pred), rel=1e-12)
    assert m.recall(pred, ref) == pytest.approx(sk(skm.recall_score, ref, pred), rel=1e-12)
    assert m.accuracy(pred, ref) == pytest.approx(sk(skm.accuracy_score, ref, pred), rel=1e-12)
    # Dice = F1 on voxels.
    assert m.dice(pred, ref) == pytest.approx(sk(skm.f1_score, ref, pred), rel=1e-12)
    mask = random_mask(rng, p=0.6)
    assert m.accuracy(pred, ref, mask) == pytest.approx(sk(skm.accuracy_score, ref[mask], pred[mask]), rel=1e-12)
    assert m.overlap_metrics(pred, ref)["iou"] == m.iou(pred, ref)


def test_tissue_dice_matches_nipype_fuzzy_overlap_on_binarised_maps(tmp_path, monkeypatch):
    from nipype.algorithms.metrics import FuzzyOverlap

    rng = np.random.default_rng(5)
    ref = np.clip(ndimage.gaussian_filter(rng.random((20, 20, 6)), 1.5) * 3 - 1.0, 0, 1)
    pred = np.clip(ref + 0.1 * rng.standard_normal(ref.shape), 0, 1)
    monkeypatch.chdir(tmp_path)
    paths = []
    for k, vol in enumerate((ref, pred)):
        p = tmp_path / f"t{k}.nii.gz"
        nib.save(nib.Nifti1Image((vol >= 0.8).astype(np.float32), np.eye(4)), p)
        paths.append(str(p))
    res = FuzzyOverlap(in_ref=[paths[0]], in_tst=[paths[1]]).run()
    assert m.tissue_dice(pred, ref) == pytest.approx(res.outputs.dice, rel=1e-6)
    assert 0 < m.tissue_dice(pred, ref) < 1
    assert m.tissue_dice(pred, ref, threshold=0.5) == m.dice(pred >= 0.5, ref >= 0.5)


def test_empty_cases_our_convention_and_the_others(tmp_path, monkeypatch):
    shape = (6, 6, 4)
    empty = np.zeros(shape, bool)
    some = box(shape, slice(1, 3), slice(1, 3), slice(1, 2))
    # Ours: 1.0 when both are empty, 0.0 when exactly one is.
    for f in (m.dice, m.iou, m.precision, m.recall):
        assert f(empty, empty) == 1.0
        assert f(some, empty) == 0.0
        assert f(empty, some) == 0.0
    assert m.accuracy(empty, empty) == 1.0
    assert m.accuracy(some, some, mask=empty) != m.accuracy(some, some, mask=empty)  # NaN
    # nipype Overlap (volume1 = reference): 0 when both are empty, 0 when either is empty.
    assert nipype_overlap(tmp_path, monkeypatch, empty, empty) == (0.0, 0.0)
    assert nipype_overlap(tmp_path, monkeypatch, some, empty) == (0.0, 0.0)
    assert nipype_overlap(tmp_path, monkeypatch, empty, some) == (0.0, 0.0)
    # scikit-learn: 0/0 -> zero_division (default "warn" -> 0.0); with zero_division=1 it agrees with
    # us when both are empty, and differs where we return 0 (precision of an empty prediction).
    assert sk(skm.precision_score, empty, empty) == 0.0
    assert sk(skm.jaccard_score, empty, empty) == 0.0
    assert sk(skm.precision_score, empty, empty, zero_division=1.0) == m.precision(empty, empty) == 1.0
    assert sk(skm.recall_score, empty, empty, zero_division=1.0) == m.recall(empty, empty) == 1.0
    assert sk(skm.precision_score, some, empty, zero_division=1.0) == 1.0  # ref = some, pred = empty
    assert m.precision(empty, some) == 0.0
    # scipy's Dice dissimilarity on two empty vectors: 0/0 -> nan (with a warning).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert math.isnan(distance.dice(empty.ravel(), empty.ravel()))


def test_binarise_is_inclusive_and_nan_is_background():
    p = np.array([0.2, 0.33, 0.34, np.nan])
    assert m.binarise(p, 0.33).tolist() == [False, True, True, False]


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError):
        m.dice(np.zeros((3, 3)), np.zeros((3, 4)))


def test_voxel_volume():
    assert m.voxel_volume_ml((1.0, 1.0, 2.0, 3.5)) == pytest.approx(0.002)
    assert m.volume_ml(np.ones((5, 2), bool), 0.002) == pytest.approx(0.02)


# ----------------------------------------------------------------------------- detection rate


def test_detection_rate_two_lesions_one_hit():
    shape = (20, 20, 6)
    ref = box(shape, slice(2, 6), slice(2, 6), slice(1, 3)) | box(shape, slice(12, 16), slice(12, 16), slice(1, 3))
    pred = box(shape, slice(5, 9), slice(5, 9), slice(2, 4))  # one voxel column inside lesion 1
    assert m.detection_rate(pred, ref) == 0.5
    assert m.detection_rate(pred | ref, ref) == 1.0
    assert m.detection_rate(np.zeros(shape, bool), ref) == 0.0
    assert math.isnan(m.detection_rate(pred, np.zeros(shape, bool)))


def test_detection_rate_connectivity():
    shape = (6, 6, 6)
    ref = np.zeros(shape, bool)
    ref[1, 1, 1] = ref[2, 2, 2] = True  # corner neighbours: one lesion at 26, two at 6/18
    pred = np.zeros(shape, bool)
    pred[1, 1, 1] = True
    assert m.detection_rate(pred, ref, connectivity=26) == 1.0
    assert m.detection_rate(pred, ref, connectivity=18) == 0.5
    assert m.detection_rate(pred, ref, connectivity=6) == 0.5
    with pytest.raises(ValueError):
        m.detection_rate(pred, ref, connectivity=8)


# ----------------------------------------------------------------------------- threshold sweep


def naive_sweep(prob, ref, thresholds):
    rows = []
    for t in thresholds:
        b = m.binarise(prob, t)
        rows.append({"threshold": t, "dice": m.dice(b, ref), "ldr": m.detection_rate(b, ref)})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("quantised", [False, True])
def test_threshold_sweep_equals_naive_loop(quantised):
    rng = np.random.default_rng(11)
    shape = (40, 36, 10)
    prob = ndimage.gaussian_filter(rng.random(shape), 1.2)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    if quantised:  # probabilities sitting exactly on the thresholds (as with 0-255 scaled maps)
        prob = np.round(prob * 100) / 100
    prob[0, 0, 0] = np.nan
    ref = random_mask(rng, shape, p=0.08, sigma=1.5)
    thresholds = np.arange(0.01, 1.0, 0.01)
    fast = m.threshold_sweep(prob, ref, thresholds)
    slow = naive_sweep(prob, ref, thresholds)
    assert list(fast.columns) == ["threshold", "dice", "ldr"]
    assert len(fast) == 99
    np.testing.assert_array_equal(fast["threshold"].to_numpy(), thresholds)
    np.testing.assert_allclose(fast["dice"].to_numpy(), slow["dice"].to_numpy(), rtol=1e-12, atol=0)
    np.testing.assert_allclose(fast["ldr"].to_numpy(), slow["ldr"].to_numpy(), rtol=1e-12, atol=0)
    assert fast["ldr"].iloc[0] == 1.0 and fast["ldr"].is_monotonic_decreasing


def test_threshold_sweep_empty_reference():
    prob = np.linspace(0, 1, 60).reshape(5, 4, 3)
    out = m.threshold_sweep(prob, np.zeros(prob.shape, bool), [0.5, 2.0])
    assert out["ldr"].isna().all()
    assert out["dice"].tolist() == [0.0, 1.0]  # prediction non-empty at 0.5, empty at 2.0


def test_threshold_sweep_on_paper_grid_has_99_thresholds():
    # its time: benchmarks/bench_evaluation.py
    rng = np.random.default_rng(3)
    shape = (240, 240, 47)
    prob = rng.random(shape, dtype=np.float32)
    ref = np.zeros(shape, bool)
    centres = rng.integers((10, 10, 3), (230, 230, 44), size=(30, 3))
    for c in centres:
        ref[c[0] - 3 : c[0] + 3, c[1] - 3 : c[1] + 3, c[2] - 1 : c[2] + 2] = True
    out = m.threshold_sweep(prob, ref)
    assert len(out) == 99


# ----------------------------------------------------------------------------- relative deviation


def test_mean_relative_deviation():
    ref = np.array([[1000.0, 2000.0], [0.0, 500.0]])
    pred = np.array([[1100.0, 1800.0], [50.0, np.nan]])
    mask = np.array([[True, True], [True, True]])
    # ref = 0 and non-finite voxels are excluded: (0.1 + 0.1) / 2
    assert m.mean_relative_deviation(pred, ref, mask) == pytest.approx(0.1)
    assert m.mean_relative_deviation(pred, ref, np.array([[True, False], [False, False]])) == pytest.approx(0.1)
    assert math.isnan(m.mean_relative_deviation(pred, ref, np.zeros((2, 2), bool)))
    assert m.mean_relative_deviation(pred, ref, None) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- rule A


VOX_ML = 0.002  # 1 x 1 x 2 mm voxels: 0.01 ml = 5 voxels


def rule_a_case():
    shape = (30, 30, 10)
    ref = np.zeros(shape, bool)
    ref[2:6, 2:6, 1:3] = True  # lesion 1: 32 voxels = 0.064 ml, hit
    ref[15:19, 15:19, 1:3] = True  # lesion 2: 32 voxels, missed
    ref[25, 25, 5:9] = True  # 4 voxels = 0.008 ml < 0.01: removed
    pred = np.zeros(shape, bool)
    pred[4:8, 2:6, 1:3] = True  # overlaps lesion 1 by 16 voxels, size 32
    pred[10:12, 25:28, 4:6] = True  # 12 voxels, overlaps nothing: FP
    pred[25, 25, 6:8] = True  # 2 voxels on the removed reference blob: removed too
    pred[0, 28, 0:4] = True  # 4 voxels, < 0.01 ml: removed (not a FP)
    return pred, ref


def test_rule_a_lesionwise_metrics():
    pred, ref = rule_a_case()
    out = lw.lesionwise_metrics(pred, ref, VOX_ML)
    assert out["n_ref"] == 2 and out["n_pred"] == 2
    assert out["tp"] == 1 and out["fn"] == 1 and out["fp"] == 1
    assert out["sensitivity"] == 0.5
    assert out["fpr"] == 0.5
    assert out["lesion_precision"] == 0.5
    # Dice over overlapping lesions only: lesion 1 (32) vs predicted component (32), 16 shared.
    assert out["dice"] == pytest.approx(2 * 16 / 64)
    assert out["ref_volume_ml"] == pytest.approx(64 * VOX_ML)
    assert out["pred_volume_ml"] == pytest.approx(44 * VOX_ML)
    # With no size cleaning the small blobs count: the 4-voxel reference blob is hit by the 2-voxel one.
    raw = lw.lesionwise_metrics(pred, ref, VOX_ML, min_ml=0.0)
    assert raw["n_ref"] == 3 and raw["tp"] == 2 and raw["fp"] == 2


def test_rule_a_boundary_size_kept_and_empty_cases():
    shape = (10, 10, 4)
    ref = np.zeros(shape, bool)
    ref[1, 1:6, 1] = True  # exactly 5 voxels = 0.01 ml: kept
    out = lw.lesionwise_metrics(np.zeros(shape, bool), ref, VOX_ML)
    assert out["n_ref"] == 1 and out["tp"] == 0 and out["sensitivity"] == 0.0
    assert math.isnan(out["dice"]) and math.isnan(out["lesion_precision"])
    fp_only = lw.lesionwise_metrics(ref, np.zeros(shape, bool), VOX_ML)
    assert fp_only["fp"] == 1 and math.isnan(fp_only["sensitivity"]) and math.isnan(fp_only["fpr"])


def test_rule_a_lesion_table_and_groups():
    pred, ref = rule_a_case()
    tab = lw.lesion_table(pred, ref, VOX_ML)
    assert list(tab.columns) == ["lesion_id", "n_voxels", "volume_ml", "detected", "dice", "group"]
    assert tab["lesion_id"].tolist() == [1, 2]
    assert tab["detected"].tolist() == [True, False]
    assert tab["dice"].tolist() == pytest.approx([0.5, 0.0])
    assert tab["group"].tolist() == ["G1", "G1"]
    # A lesion hit by two predicted components: Dice with their union.
    shape = (20, 20, 4)
    ref = np.zeros(shape, bool)
    ref[2:12, 2:4, 1] = True  # 20 voxels
    pred = np.zeros(shape, bool)
    pred[0:4, 2:4, 1] = True  # 8 voxels, 4 inside
    pred[10:14, 2:4, 1] = True  # 8 voxels, 4 inside
    tab = lw.lesion_table(pred, ref, 0.001, min_ml=0.0)
    assert tab["dice"].iloc[0] == pytest.approx(2 * 8 / (20 + 16))
    assert lw.lesion_table(pred, np.zeros(shape, bool), 0.001).empty


def test_volume_groups_and_summary():
    vols = np.array([0.0, 0.19, 0.2, 0.69, 0.7, 1.99, 2.0, 4.99, 5.0, 40.0])
    assert list(lw.volume_group(vols)) == ["G1", "G1", "G2", "G2", "G3", "G3", "G4", "G4", "G5", "G5"]
    assert lw.volume_group(0.3) == "G2"
    tab = pd.DataFrame(
        {
            "volume_ml": [0.1, 0.15, 0.12, 3.0],
            "detected": [True, False, True, True],
            "dice": [0.5, 0.0, 0.7, 0.8],
        }
    )
    tab["group"] = lw.volume_group(tab["volume_ml"].to_numpy())
    s = lw.volume_group_summary(tab).set_index("group")
    assert list(s.index) == ["G1", "G2", "G3", "G4", "G5"]
    assert s.loc["G1", "n"] == 3 and s.loc["G1", "median_volume_ml"] == pytest.approx(0.12)
    assert s.loc["G1", "detection_rate"] == pytest.approx(2 / 3)
    assert s.loc["G1", "median_dice"] == pytest.approx(0.5)
    assert s.loc["G1", "median_dice_detected"] == pytest.approx(0.6)
    assert s.loc["G2", "n"] == 0 and math.isnan(s.loc["G2", "median_volume_ml"])
    assert s.loc["G4", "median_dice"] == pytest.approx(0.8)


# ----------------------------------------------------------------------------- rule B (MSSEG)


def msseg(pred, ref, **kw):
    return lw.msseg_detection(pred, ref, voxel_mm3=1.0, **kw)


SHAPE = (40, 40, 3)


def lesion_100():
    return box(SHAPE, slice(0, 10), slice(0, 10), slice(1, 2))  # 100 voxels


@pytest.mark.parametrize(("covered", "detected"), [(10, False), (11, True)])
def test_msseg_alpha_strict_coverage(covered, detected):
    ref = lesion_100()
    pred = np.zeros(SHAPE, bool)
    pred[0:10, 0:10, 1].flat[:covered] = True  # raster-order cells inside the lesion (one component)
    assert np.count_nonzero(pred) == np.count_nonzero(pred & ref) == covered
    out = msseg(pred, ref)
    assert out["tp_ref"] == int(detected)
    assert out["n_pred"] == 1
    # Seen from the prediction: fully covered by the reference, but the lesion lies outside the
    # prediction for 89-90 % > beta, so the predicted component is not a true positive.
    assert out["tp_pred"] == 0 and out["ppv"] == 0.0
    # With a larger beta the lesion's outside part is tolerated.
    assert msseg(pred, ref, beta=0.95)["tp_pred"] == 1


@pytest.mark.parametrize(("outside", "detected"), [(70, True), (71, False)])
def test_msseg_beta_outside_fraction(outside, detected):
    ref = lesion_100()
    pred = np.zeros(SHAPE, bool)
    inside = 100 - outside  # component of 100 voxels: `inside` in the lesion, `outside` beyond it
    # Raster order over a 10-wide band: the first 100 cells are the lesion. Take the last `inside`
    # lesion cells and the `outside` cells after them (one 6-connected component).
    idx = [(r, c) for r in range(40) for c in range(10)]
    cells = idx[100 - inside : 200 - inside]
    for r, c in cells:
        pred[r, c, 1] = True
    assert np.count_nonzero(pred & ref) == inside and np.count_nonzero(pred & ~ref) == outside
    out = msseg(pred, ref)
    assert out["n_pred"] == 1
    assert out["tp_ref"] == int(detected)


def gamma_case(big_inside):
    """Lesion of 100 voxels overlapped by component A (`big_inside` voxels, all inside the lesion) and
    component B (10 voxels inside, 30 outside: outside fraction 0.75 > beta)."""
    ref = lesion_100()
    pred = np.zeros(SHAPE, bool)
    pred[0:10, 0 : big_inside // 10, 1] = True  # A: columns from the left, entirely in the lesion
    # B: the last lesion column (10 voxels) plus 30 voxels beyond the lesion -> outside 30/40 > 0.7
    pred[0:10, 9, 1] = True
    pred[0:10, 10:13, 1] = True
    return pred, ref


def test_msseg_gamma_contributors():
    # A = 70 voxels (70/80 = 87.5 % of the overlap >= gamma): B is never examined -> detected.
    pred, ref = gamma_case(70)
    labels, n = ndimage.label(pred, ndimage.generate_binary_structure(3, 1))
    assert n == 2
    assert msseg(pred, ref)["tp_ref"] == 1
    # A = 20 voxels (20/30 = 66.7 % >= 0.65) -> detected; with gamma = 0.7 B is needed and fails beta.
    pred, ref = gamma_case(20)
    assert msseg(pred, ref)["tp_ref"] == 1
    assert msseg(pred, ref, gamma=0.7)["tp_ref"] == 0
    # A = 10 voxels (10/20 = 50 %; tie in overlap size -> label order, A first) -> B needed -> missed.
    pred, ref = gamma_case(10)
    assert msseg(pred, ref)["tp_ref"] == 0


def test_msseg_outside_means_outside_every_reference_lesion():
    ref = np.zeros(SHAPE, bool)
    ref[0:10, 0:5, 1] = True  # lesion 1: 50 voxels
    ref[0:10, 6:11, 1] = True  # lesion 2: 50 voxels (column 5 separates them)
    pred = np.zeros(SHAPE, bool)
    pred[0:10, 2:9, 1] = True  # one component: 30 in lesion 1, 10 in the gap, 30 in lesion 2
    out = msseg(pred, ref)
    # For lesion 1 the component lies 40/70 outside lesion 1 but only 10/70 outside the reference.
    assert out["n_ref"] == 2 and out["tp_ref"] == 2 and out["tp_pred"] == 1
    assert out["sensitivity"] == 1.0 and out["ppv"] == 1.0 and out["f1"] == 1.0


def test_msseg_min_size_and_connectivity():
    ref = lesion_100()
    pred = ref.copy()
    pred[30, 30:33, 1] = True  # 3 voxels = 3 mm^3: dropped (not a FP)
    out = msseg(pred, ref)
    assert (out["n_pred"], out["fp"], out["ppv"]) == (1, 0, 1.0)
    pred[30, 33, 1] = True  # 4 voxels > 3 mm^3: kept, a FP
    out = msseg(pred, ref)
    assert (out["n_pred"], out["fp"], out["ppv"]) == (2, 1, 0.5)
    assert out["f1"] == pytest.approx(2 * 0.5 / 1.5)
    # Anisotropic voxels: 2 mm^3 each -> floor(3 / 2) + 1 = 2 voxels minimum.
    assert lw.msseg_detection(pred, ref, voxel_mm3=2.0, min_mm3=3.0)["n_pred"] == 2
    # Diagonal neighbours are separate components with the default 6-connectivity.
    ref2 = np.zeros((12, 12, 12), bool)
    ref2[0:4, 0:4, 0:4] = True
    ref2[4:8, 4:8, 4:8] = True
    assert msseg(ref2, ref2)["n_ref"] == 2
    assert msseg(ref2, ref2, connectivity=26)["n_ref"] == 1


def test_msseg_empty_cases():
    empty = np.zeros(SHAPE, bool)
    ref = lesion_100()
    out = msseg(empty, ref)
    assert out["sensitivity"] == 0.0 and math.isnan(out["ppv"]) and out["f1"] == 0.0
    out = msseg(ref, empty)
    assert math.isnan(out["sensitivity"]) and out["ppv"] == 0.0 and out["f1"] == 0.0
    out = msseg(empty, empty)
    assert math.isnan(out["sensitivity"]) and math.isnan(out["ppv"]) and math.isnan(out["f1"])
    out = msseg(ref, ref)
    assert out["sensitivity"] == out["ppv"] == out["f1"] == 1.0


# ----------------------------------------------------------------------------- random masks vs naive loops


def naive_components(mask, connectivity, keep):
    labels, n = ndimage.label(mask, m.structure(mask.ndim, connectivity))
    return [labels == k for k in range(1, n + 1) if keep(np.count_nonzero(labels == k))]


def naive_rule_a(pred, ref, voxel_ml, min_ml):
    keep = lambda n: n * voxel_ml >= min_ml * (1 - 1e-9)  # noqa: E731
    refs = naive_components(ref, 26, keep)
    preds = naive_components(pred, 26, keep)
    hit = [any((r & p).any() for p in preds) for r in refs]
    fp = sum(not any((r & p).any() for r in refs) for p in preds)
    dices = []
    for r in refs:
        union = np.zeros(ref.shape, bool)
        for p in preds:
            if (r & p).any():
                union |= p
        dices.append(2 * np.count_nonzero(r & union) / (r.sum() + union.sum()) if union.any() else 0.0)
    return hit, fp, dices


def naive_msseg_detected(objs, others, alpha, beta, gamma):
    """Direct transcription of the rule for each object of `objs` against the components `others`."""
    other_fg = np.zeros(objs[0].shape, bool) if objs else None
    for o in objs:
        other_fg |= o  # the objects' own image foreground: "outside" for `others` means outside it
    result = []
    for obj in objs:
        overlaps = [(np.count_nonzero(obj & c), k) for k, c in enumerate(others)]
        overlaps = [(v, k) for v, k in overlaps if v > 0]
        total = sum(v for v, _ in overlaps)
        if total / obj.sum() <= alpha:
            result.append(False)
            continue
        ok, cum = True, 0.0
        for v, k in sorted(overlaps, key=lambda t: (-t[0], t[1])):
            c = others[k]
            if np.count_nonzero(c & ~other_fg) / c.sum() > beta:
                ok = False
                break
            cum += v / total
            if cum >= gamma:
                break
        result.append(ok)
    return result


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_lesionwise_rules_match_naive_loops_on_random_masks(seed):
    rng = np.random.default_rng(100 + seed)
    shape = (30, 30, 10)
    ref = random_mask(rng, shape, p=0.06, sigma=1.3)
    pred = random_mask(rng, shape, p=0.04, sigma=1.0) | (ref & (rng.random(shape) < 0.6))
    hit, fp, dices = naive_rule_a(pred, ref, VOX_ML, 0.01)
    out = lw.lesionwise_metrics(pred, ref, VOX_ML)
    tab = lw.lesion_table(pred, ref, VOX_ML)
    assert out["n_ref"] == len(hit) > 3
    assert out["tp"] == sum(hit) and out["fp"] == fp
    assert tab["detected"].tolist() == hit
    np.testing.assert_allclose(tab["dice"].to_numpy(), dices, rtol=1e-12)

    keep = lambda n: n * 1.0 > 3.0  # noqa: E731
    refs = naive_components(ref, 6, keep)
    preds = naive_components(pred, 6, keep)
    for a, b, g in [(0.1, 0.7, 0.65), (0.3, 0.3, 0.5), (0.05, 0.5, 0.9)]:
        out = lw.msseg_detection(pred, ref, voxel_mm3=1.0, alpha=a, beta=b, gamma=g)
        assert out["n_ref"] == len(refs) and out["n_pred"] == len(preds)
        assert out["tp_ref"] == sum(naive_msseg_detected(refs, preds, a, b, g))
        assert out["tp_pred"] == sum(naive_msseg_detected(preds, refs, a, b, g))
