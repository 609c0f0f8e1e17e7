"""Classical lesion baseline (mrflesion.baseline, issue 15): synthetic cases with a known answer, and
one small phantom subject against its truth.

The synthetic subject (2 x 2 x 3 mm voxels) is a WM block (T1 900 ms, T2* 50 ms, 3 % noise) inside a
GM ribbon (1500 / 62 ms) inside CSF (4000 / 1300 ms), outside of which is no brain. Inside the WM sit
a lesion (both maps x 1.5, labelled GM as the tissue EM does), a deep-grey-matter-like island
(T1 x 1.55, T2* x 1.15, also labelled GM) and a small ventricle (CSF) with WM around it.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from mrflesion.baseline import lesion_probability, white_matter_territory
from mrflesion.evaluate import detection_rate, dice

ZOOMS = (2.0, 2.0, 3.0)
SHAPE = (48, 48, 12)


def _ball(shape: tuple[int, ...], centre: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    idx = np.indices(shape, dtype=float)
    d2 = sum(((idx[i] - centre[i]) * ZOOMS[i]) ** 2 for i in range(3))
    return d2 <= radius_mm**2


def synthetic(seed: int = 0) -> dict[str, np.ndarray]:
    """The synthetic subject of the module docstring; returns maps, tissue probabilities and truths."""
    rng = np.random.default_rng(seed)
    ii, jj, _ = np.indices(SHAPE)
    r = np.maximum(np.abs(ii - 23.5), np.abs(jj - 23.5))  # square "rings" in-plane, all slices
    brain = r < 22
    csf_out = brain & (r >= 19)
    gm_ribbon = brain & (r >= 16) & (r < 19)
    lesion = _ball(SHAPE, (18, 18, 6), 6.0)
    island = _ball(SHAPE, (30, 16, 6), 6.0)
    ventricle = _ball(SHAPE, (24, 31, 6), 5.0)
    wm_block = brain & (r < 16) & ~lesion & ~island & ~ventricle

    t1 = np.zeros(SHAPE)
    t2s = np.zeros(SHAPE)
    t1[wm_block], t2s[wm_block] = 900.0, 50.0
    t1[gm_ribbon], t2s[gm_ribbon] = 1500.0, 62.0
    t1[csf_out | ventricle], t2s[csf_out | ventricle] = 4000.0, 1300.0
    t1[lesion], t2s[lesion] = 1350.0, 75.0
    t1[island], t2s[island] = 1395.0, 57.5
    t1 *= 1 + 0.03 * rng.standard_normal(SHAPE)
    t2s *= 1 + 0.03 * rng.standard_normal(SHAPE)

    wm = wm_block.astype(float)
    gm = (gm_ribbon | lesion | island).astype(float)
    csf = (csf_out | ventricle).astype(float)
    return {
        "t1": t1, "t2s": t2s, "wm": wm, "gm": gm, "csf": csf, "brain": brain,
        "lesion": lesion, "island": island, "ventricle": ventricle, "wm_block": wm_block,
        "gm_ribbon": gm_ribbon, "csf_out": csf_out,
    }  # fmt: skip


def run(s: dict[str, np.ndarray], **kw: object) -> np.ndarray:
    return lesion_probability(s["t1"], s["t2s"], s["wm"], s["gm"], s["csf"], s["brain"], ZOOMS, **kw)


@pytest.fixture(scope="module")
def subj() -> dict[str, np.ndarray]:
    return synthetic()


def test_output_type_and_range(subj: dict[str, np.ndarray]) -> None:
    p = run(subj)
    assert p.shape == SHAPE and p.dtype == np.float32
    assert np.all(np.isfinite(p)) and p.min() >= 0.0 and p.max() <= 1.0


def test_synthetic_lesion_found_and_nothing_else(subj: dict[str, np.ndarray]) -> None:
    p = run(subj)
    assert np.mean(p[subj["lesion"]]) > 0.8  # equal rises: the shape gate alone gives expit(2.4) = 0.92
    assert dice(p >= 0.33, subj["lesion"]) > 0.9
    # normal WM: noise only (3 % per map; the z centre is 4 robust sd)
    assert np.percentile(p[subj["wm_block"]], 99.9) < 0.05
    # exactly zero outside the brain, in the cortex-like ribbon and in CSF (not WM territory / CSF gate)
    assert np.all(p[~subj["brain"]] == 0)
    assert np.all(p[subj["gm_ribbon"]] == 0)
    assert np.all(p[subj["csf_out"] | subj["ventricle"]] == 0)


def test_grey_matter_island_rejected_by_shape_gate(subj: dict[str, np.ndarray]) -> None:
    """Enclosed by WM like a lesion, but T1 rises much more than T2* (deep GM): low probability."""
    p = run(subj)
    assert white_matter_territory(subj["wm"], subj["brain"])[subj["island"]].all()
    assert np.mean(p[subj["island"]]) < 0.1
    assert not np.any(p[subj["island"]] >= 0.33)


def test_ventricle_rim_margin(subj: dict[str, np.ndarray]) -> None:
    """WM voxels raised like a lesion next to a ventricle: zero within csf_margin_mm of the CSF core."""
    s = dict(subj)
    rim = _ball(SHAPE, (24, 31, 6), 9.0) & s["wm_block"]
    s["t1"] = np.where(rim, s["t1"] * 1.5, s["t1"])
    s["t2s"] = np.where(rim, s["t2s"] * 1.5, s["t2s"])
    s["wm"] = np.where(rim, 0.0, s["wm"])
    s["gm"] = np.where(rim, 1.0, s["gm"])
    p = run(s)
    near = rim & (ndimage.distance_transform_edt(~s["ventricle"], sampling=ZOOMS) <= 3.0)
    assert near.any() and np.all(p[near] == 0)
    assert np.mean(p[rim & ~near] > 0.5) > 0.5  # beyond the margin: found
    assert np.mean(run(s, csf_margin_mm=0.0)[near] > 0.5) > 0.5  # without the margin the rim counts


def test_invariant_to_global_scaling(subj: dict[str, np.ndarray]) -> None:
    """Relative to the subject's own WM: scaling T1 and T2* by constants changes nothing."""
    s = dict(subj, t1=subj["t1"] * 1.7, t2s=subj["t2s"] * 0.6)
    np.testing.assert_allclose(run(s), run(subj), atol=1e-5)


def test_deterministic_and_axis_equivariant(subj: dict[str, np.ndarray]) -> None:
    """Same input, same output; permuting the axes (and the zooms) permutes the output."""
    p = run(subj)
    np.testing.assert_array_equal(run(subj), p)
    perm = (2, 0, 1)
    s = {k: np.transpose(v, perm) for k, v in subj.items()}
    q = lesion_probability(s["t1"], s["t2s"], s["wm"], s["gm"], s["csf"], s["brain"], [ZOOMS[i] for i in perm])
    np.testing.assert_allclose(q, np.transpose(p, perm), atol=1e-6)


def test_invalid_voxels_and_bad_inputs(subj: dict[str, np.ndarray]) -> None:
    s = dict(subj)
    bad = np.zeros(SHAPE, dtype=bool)
    bad[18, 18, 6] = bad[18, 19, 6] = True  # inside the lesion
    s["t1"] = np.where(bad, np.nan, s["t1"])
    s["t2s"] = s["t2s"].copy()
    s["t2s"][19, 18, 6] = 0.0
    p = run(s)
    assert np.all(p[bad] == 0) and p[19, 18, 6] == 0 and np.all(np.isfinite(p))
    with pytest.raises(ValueError, match="grid"):
        lesion_probability(s["t1"], s["t2s"], s["wm"][:-1], s["gm"], s["csf"], s["brain"], ZOOMS)
    with pytest.raises(ValueError, match="reference WM"):
        run(dict(subj, wm=subj["wm"] * 0.5))
    with pytest.raises(ValueError, match="zooms"):
        lesion_probability(s["t1"], s["t2s"], s["wm"], s["gm"], s["csf"], s["brain"], (2.0, 0.0, 3.0))


# ------------------------------------------------------------------------------ phantom subject

# The demo voxels (2 x 2 x 3 mm) on a thin 8-slice slab, no supersampling, tiny FLAIR: ~3 s per
# subject once the atlas is loaded.
SLAB = {
    "shape": [120, 120, 8],
    "voxel_mm": [2.0, 2.0, 3.0],
    "supersample": [1, 1, 1],
    "flair": {"shape": [40, 40, 4], "voxel_mm": [6.0, 6.0, 6.0], "supersample": [1, 1, 1]},
    "slab_center_mni": [0.0, -17.0, 14.0],
    "lesion_count": [6, 10],
}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mrflesion.phantom import generate

    out = tmp_path_factory.mktemp("baseline") / "bids"
    generate(out, n_subjects=2, n_sites=1, seed=7, progress=False, _grid_override=SLAB)  # control + patient
    return out / "derivatives" / "truth"


def _phantom_inputs(truth: Path, sub: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Truth T1/T2* with 3 % noise, and tissue maps as the EM gives them (lesion tissue labelled GM)."""

    def load(s: str) -> np.ndarray:
        return np.asarray(nib.load(truth / sub / "anat" / f"{sub}_space-T2w_{s}.nii.gz").get_fdata(dtype=np.float32))

    rng = np.random.default_rng(0)
    les = load("label-lesion_probseg")
    wm = np.clip(load("label-WM_probseg") - les, 0.0, None)  # the truth WM fraction includes lesion tissue
    gm = load("label-GM_probseg") + les
    t1 = load("T1map") * (1 + 0.03 * rng.standard_normal(wm.shape))
    t2s = load("T2starmap") * (1 + 0.03 * rng.standard_normal(wm.shape))
    return [t1, t2s, wm, gm, load("label-CSF_probseg"), load("desc-brain_mask") > 0.5], load("label-lesion_mask") > 0.5


def test_phantom_patient_and_control(phantom: Path) -> None:
    """Regression floor on one fixed phantom case (seed 7): Dice 0.69, LDR 1.0, control empty when written.

    Not a performance claim: the inputs are truth maps (no partial volume in T1/T2*, no registration
    blur), so this case is easier than the pipeline's; on the demo chain's outputs the baseline reaches
    Dice ~0.2. Other seeds of the same generator range 0.12-0.70 (deep grey nuclei enclosed by WM
    are the false positives, a documented limit), so the floor is set at about half the observed
    value: it catches a broken model (Dice ~0), not small changes.
    """
    args, truth = _phantom_inputs(phantom, "sub-02")
    p = lesion_probability(*args, SLAB["voxel_mm"])
    b = p >= 0.33
    assert truth.any()
    assert dice(b, truth) > 0.4
    assert detection_rate(b, truth) >= 0.5
    args, truth = _phantom_inputs(phantom, "sub-01")
    assert not truth.any()
    p = lesion_probability(*args, SLAB["voxel_mm"])
    assert np.count_nonzero(p >= 0.33) * np.prod(SLAB["voxel_mm"]) / 1000.0 < 0.5  # ml of false positive
