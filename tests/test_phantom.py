"""Digital phantom (docs/phantom.md): layout, BIDS validity, determinism, truth consistency."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from phantomgrids import DEMO_SLAB, TINY
from scipy import ndimage

from mrflesion.mrf.sequence import Protocol
from mrflesion.mrf.signal import simulate
from mrflesion.phantom import GRIDS, cohort_table, generate, main
from mrflesion.phantom.cohort import _wm_reference
from mrflesion.phantom.config import load_config


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).get_fdata(dtype=np.float32))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """Three subjects on the demo voxel grid: site1 control + patient, site2 patient."""
    out = tmp_path_factory.mktemp("demo") / "bids"
    table = generate(out, n_subjects=3, n_sites=2, seed=7, n_jobs=2, progress=False, _grid_override=DEMO_SLAB)
    return out, table


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tiny")
    out = {}
    for name, seed, jobs in (("a", 3, 1), ("b", 3, 2), ("c", 4, 1)):
        out[name] = base / name
        generate(
            out[name], n_subjects=2, n_sites=2, seed=seed, n_jobs=jobs, progress=False, _grid_override=TINY
        )
    out["clean"] = base / "clean"
    generate(out["clean"], n_subjects=2, n_sites=2, seed=5, progress=False, _noise=False, _grid_override=TINY)
    out["long"] = base / "long"
    generate(
        out["long"], n_subjects=2, n_sites=2, seed=6, longitudinal=True, progress=False, _grid_override=TINY
    )
    return out


def _validate(root: Path) -> list[dict]:
    exe = Path(sys.executable).parent / "bids-validator-deno"
    if not exe.exists():
        pytest.skip("bids-validator-deno not installed next to the interpreter")
    res = subprocess.run(
        [str(exe), str(root), "--format", "json"], capture_output=True, text=True, timeout=300
    )
    report = json.loads(res.stdout)
    return [i for i in report["issues"]["issues"] if i.get("severity") == "error"]


# --------------------------------------------------------------------------------------- cohort table
def test_cohort_table_default_splits() -> None:
    t = cohort_table(12, 2, seed=1)
    assert list(t.columns[:4]) == ["participant_id", "site", "group", "sessions"]
    assert t["participant_id"].tolist() == [f"sub-{i:02d}" for i in range(1, 13)]
    counts = t.groupby(["site", "group"]).size().to_dict()
    assert counts == {("site1", "control"): 2, ("site1", "patient"): 4, ("site2", "patient"): 6}
    assert all(s == [] for s in t["sessions"])
    p = cohort_table(48, 2, seed=1)
    assert p.groupby(["site", "group"]).size().to_dict() == {
        ("site1", "control"): 6,
        ("site1", "patient"): 18,
        ("site2", "patient"): 24,
    }
    lt = cohort_table(4, 2, seed=1, longitudinal=True)
    assert all(s == ["ses-01", "ses-02"] for s in lt["sessions"])
    pd.testing.assert_frame_equal(cohort_table(12, 2, seed=1), t)


def test_grids() -> None:
    assert GRIDS["demo"]["shape"] == (120, 120, 20) and GRIDS["demo"]["voxel_mm"] == (2.0, 2.0, 3.0)
    assert GRIDS["paper"]["shape"] == (240, 240, 47) and GRIDS["paper"]["n_slices"] == 47
    tr = Protocol.default(GRIDS["paper"]["n_slices"]).repetition_time_ms
    assert 3500 < min(tr) < 3560 and 6340 < max(tr) < 6400


# --------------------------------------------------------------------------------------- layout / BIDS
def test_layout_and_cohort_match(demo: tuple[Path, pd.DataFrame]) -> None:
    root, table = demo
    parts = pd.read_csv(root / "participants.tsv", sep="\t")
    assert parts.columns.tolist() == ["participant_id", "site", "group", "age", "sex"]
    expected = cohort_table(3, 2, seed=7)
    assert (
        parts["participant_id"].tolist()
        == expected["participant_id"].tolist()
        == table["participant_id"].tolist()
    )
    assert parts["site"].tolist() == expected["site"].tolist()
    assert parts["group"].tolist() == expected["group"].tolist() == ["control", "patient", "patient"]
    assert (root / ".bidsignore").read_text().strip() == "*_MRF.*"
    desc = json.loads((root / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] == "1.10.0" and desc["DatasetType"] == "raw"
    assert desc["GeneratedBy"][0]["Name"] == "mrflesion-phantom"
    for d in ("truth", "manual"):
        assert (
            json.loads((root / "derivatives" / d / "dataset_description.json").read_text())["DatasetType"]
            == "derivative"
        )
    anat = root / "sub-02" / "anat"
    mrf = nib.load(anat / "sub-02_acq-MRFEPI_MRF.nii.gz")
    assert mrf.shape == (120, 120, 10, 35) and mrf.get_data_dtype() == np.float32
    t2w = nib.load(anat / "sub-02_T2w.nii.gz")
    assert t2w.shape == (120, 120, 10)
    np.testing.assert_allclose(mrf.affine, t2w.affine)
    assert int(t2w.header["qform_code"]) == 1 and int(t2w.header["sform_code"]) == 1
    side = json.loads((anat / "sub-02_acq-MRFEPI_MRF.json").read_text())
    assert side["PhaseEncodingDirection"] == "j" and side["MRFSeries"] is True
    assert side["ManufacturersModelName"] == "Skyra"
    Protocol.from_sidecar(side)  # round-trips
    side3 = json.loads((root / "sub-03" / "anat" / "sub-03_acq-MRFEPI_MRF.json").read_text())
    assert side3["ManufacturersModelName"] == "Prisma" and side3["MultibandAccelerationFactor"] == 3
    # SMS in the timing: 10 slices, factor 3 -> 4 slots (slices a slab-fraction apart share SliceTiming),
    # a shorter TR; both sites simulated with the default inversion model (perfect, as the dictionary)
    p1, p3 = Protocol.from_sidecar(side), Protocol.from_sidecar(side3)
    assert (p1.n_slots, p3.n_slots, p3.multiband) == (10, 4, 3)
    assert p3 == Protocol.default(10, multiband=3) and p1 == Protocol.default(10)
    assert side3["SliceTiming"][0] == side3["SliceTiming"][4] == side3["SliceTiming"][8]
    assert max(side3["RepetitionTime"]) < 0.5 * max(side["RepetitionTime"])
    assert side["InversionEfficiency"] == side3["InversionEfficiency"] == "perfect"
    fl = json.loads((anat / "sub-02_FLAIR.json").read_text())
    assert fl["InversionTime"] == 2.5 and fl["RepetitionTime"] == 9.0
    truth = root / "derivatives" / "truth" / "sub-02" / "anat"
    names = [
        "space-T2w_T1map",
        "space-T2w_T2starmap",
        "space-T2w_T2map",
        "space-T2w_TB1map",
        "space-T2w_M0map",
        "space-T2w_label-GM_probseg",
        "space-T2w_label-WM_probseg",
        "space-T2w_label-CSF_probseg",
        "space-T2w_label-lesion_mask",
        "space-MRF_T1map",
        "space-MRF_T2starmap",
        "space-MRF_TB1map",
        "space-MRF_M0map",
        "space-MRF_label-GM_probseg",
        "space-MRF_label-WM_probseg",
        "space-MRF_label-CSF_probseg",
        "space-MRF_label-lesion_mask",
        "space-MRF_noisesigma",
        "space-MRF_desc-pedisplacement_xfm",
        "space-FLAIR_label-lesion_mask",
    ]
    for n in names:
        assert (truth / f"sub-02_{n}.nii.gz").exists(), n
        assert "Units" in json.loads((truth / f"sub-02_{n}.json").read_text()), n
    xfm = json.loads((truth / "sub-02_from-MRF_to-T2w_mode-image_xfm.json").read_text())
    m = np.asarray(xfm["Matrix"])
    assert m.shape == (4, 4) and np.allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3))
    assert np.linalg.norm(m[:3, 3]) <= 1.5 + 1e-9  # small motion between MRF and T2w
    assert np.degrees(np.arccos((np.trace(m[:3, :3]) - 1) / 2)) <= 1.5 + 1e-6
    man = root / "derivatives" / "manual" / "sub-01" / "anat" / "sub-01_space-FLAIR_label-lesion_mask.nii.gz"
    assert nib.load(man).get_data_dtype() == np.uint8 and _load(man).sum() == 0  # control: present, empty


def test_bids_validator(demo: tuple[Path, pd.DataFrame], tiny: dict[str, Path]) -> None:
    for root in (demo[0], tiny["long"]):
        errors = _validate(root)
        assert errors == [], errors[:5]


# --------------------------------------------------------------------------------------- determinism
def test_same_seed_identical_bytes(tiny: dict[str, Path]) -> None:
    ha, hb = _hashes(tiny["a"]), _hashes(tiny["b"])  # n_jobs 1 vs 2
    assert len(ha) > 50 and ha == hb


def test_different_seed_differs(tiny: dict[str, Path]) -> None:
    rel = "derivatives/truth/sub-02/anat/sub-02_space-T2w_label-WM_probseg.nii.gz"
    wa, wc = _load(tiny["a"] / rel), _load(tiny["c"] / rel)
    assert np.abs(wa - wc).mean() > 0.01
    rel = "derivatives/truth/sub-02/anat/sub-02_space-T2w_label-lesion_mask.nii.gz"
    la, lc = _load(tiny["a"] / rel), _load(tiny["c"] / rel)
    assert la.sum() > 0 and lc.sum() > 0 and not np.array_equal(la, lc)


def test_refuses_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        generate(tmp_path / "x", n_subjects=1, n_sites=1, progress=False, _grid_override=TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


# --------------------------------------------------------------------------------------- truth properties
def _truth(root: Path, sub: str, name: str) -> np.ndarray:
    return _load(root / "derivatives" / "truth" / sub / "anat" / f"{sub}_{name}.nii.gz")


def test_sites_differ_in_snr_and_b1(demo: tuple[Path, pd.DataFrame]) -> None:
    root, _ = demo
    rel_noise, b1_lr = {}, {}
    for sub in ("sub-02", "sub-03"):  # site1 patient, site2 patient
        wm = _truth(root, sub, "space-MRF_label-WM_probseg") > 0.9
        sigma = _truth(root, sub, "space-MRF_noisesigma")
        m0 = _truth(root, sub, "space-MRF_M0map")
        # noise relative to the nominal WM signal of the site's own timing (the SMS site's shorter TR
        # gives less signal per unit M0, and its noise is set against that signal)
        side = json.loads((root / sub / "anat" / f"{sub}_acq-MRFEPI_MRF.json").read_text())
        nominal = _wm_reference(Protocol.from_sidecar(side), load_config())
        rel_noise[sub] = float(np.median(sigma[wm] / m0[wm])) / nominal
        b1 = _truth(root, sub, "space-T2w_TB1map")
        brain = _truth(root, sub, "space-T2w_desc-brain_mask") > 0
        assert 0.7 <= b1[brain].min() and b1[brain].max() <= 1.3
        x = np.arange(b1.shape[0])[:, None, None] * np.ones(b1.shape)
        b1_lr[sub] = float(b1[brain & (x >= 60)].mean() - b1[brain & (x < 60)].mean())
    assert rel_noise["sub-03"] > 1.3 * rel_noise["sub-02"]  # SMS site is noisier
    assert abs(b1_lr["sub-03"] - b1_lr["sub-02"]) > 0.03  # different B1 pattern
    g = _truth(root, "sub-03", "space-MRF_noisesigma")
    assert g.max() / g.min() > 1.3  # spatially varying (g-factor)
    g1 = _truth(root, "sub-02", "space-MRF_noisesigma")
    assert g1.max() / g1.min() < 1.01


def test_mrf_distorted_along_phase_encode(demo: tuple[Path, pd.DataFrame]) -> None:
    root, _ = demo
    sub = "sub-02"
    disp = _truth(root, sub, "space-MRF_desc-pedisplacement_xfm")
    brain = (
        _truth(root, sub, "space-MRF_label-WM_probseg") + _truth(root, sub, "space-MRF_label-GM_probseg")
        > 0.5
    )
    assert np.abs(disp[brain]).max() > 1.5 and np.abs(disp[brain]).mean() > 0.2
    # bring the T2w-space truth into the MRF scan with the truth rigid transform (no distortion) ...
    wm_t = _truth(root, sub, "space-T2w_label-WM_probseg")
    wm_m = _truth(root, sub, "space-MRF_label-WM_probseg")
    aff = nib.load(root / "derivatives" / "truth" / sub / "anat" / f"{sub}_space-MRF_T1map.nii.gz").affine
    m = np.asarray(
        json.loads(
            (
                root / "derivatives" / "truth" / sub / "anat" / f"{sub}_from-MRF_to-T2w_mode-image_xfm.json"
            ).read_text()
        )["Matrix"]
    )
    vox2vox = np.linalg.inv(aff) @ m @ aff
    rigid = ndimage.affine_transform(wm_t, vox2vox[:3, :3], vox2vox[:3, 3], order=1)
    # ... the residual is explained by the displacement along y (first order: d * dWM/dy), not along x
    resid = wm_m - rigid
    gy = np.gradient(rigid, 2.0, axis=1)
    gx = np.gradient(rigid, 2.0, axis=0)
    brain[:, :, :2] = brain[:, :, -2:] = False  # slab edges: motion moves tissue in and out of the slab
    sel = brain & (np.abs(disp) > 0.5)
    c_y = np.corrcoef(resid[sel], (disp * gy)[sel])[0, 1]
    c_x = np.corrcoef(resid[sel], (disp * gx)[sel])[0, 1]
    assert c_y > 0.3 and c_y > 3 * abs(c_x)
    # pulling the rigidly resampled map along +y by d (the documented convention) reduces the residual
    shifted = ndimage.map_coordinates(
        rigid,
        np.indices(rigid.shape) + np.stack([np.zeros_like(disp), disp / 2.0, np.zeros_like(disp)]),
        order=1,
    )
    sel = brain & (np.abs(disp) > 1.0)
    assert np.abs(wm_m - shifted)[sel].mean() < 0.95 * np.abs(resid)[sel].mean()


def test_t2w_and_flair_undistorted(demo: tuple[Path, pd.DataFrame]) -> None:
    root, _ = demo
    sub = "sub-02"
    csf = _truth(root, sub, "space-T2w_label-CSF_probseg")
    t2w = _load(root / sub / "anat" / f"{sub}_T2w.nii.gz")
    c0 = np.corrcoef(t2w.ravel(), csf.ravel())[0, 1]
    for axis in (0, 1):
        for s in (-1, 1):
            assert c0 > np.corrcoef(t2w.ravel(), np.roll(csf, s, axis=axis).ravel())[0, 1]
    flair = _load(root / sub / "anat" / f"{sub}_FLAIR.nii.gz")
    les = _truth(root, sub, "space-FLAIR_label-lesion_mask") > 0
    ring = ndimage.binary_dilation(les, iterations=2) & ~les
    assert les.sum() > 0 and np.median(flair[les]) > 1.2 * np.median(flair[ring])  # hyperintense lesions


def test_lesion_volumes_and_controls(demo: tuple[Path, pd.DataFrame]) -> None:
    root, table = demo
    vols = []
    for _, row in table.iterrows():
        sub = row["participant_id"]
        les = _truth(root, sub, "space-T2w_label-lesion_mask") > 0
        if row["group"] == "control":
            assert les.sum() == 0
            assert _truth(root, sub, "space-FLAIR_label-lesion_mask").sum() == 0
            continue
        lab, n = ndimage.label(les, structure=np.ones((3, 3, 3)))
        vols += list(np.bincount(lab.ravel())[1:] * 2 * 2 * 3 / 1000.0)  # ml
        manual = _load(
            root / "derivatives" / "manual" / sub / "anat" / f"{sub}_space-FLAIR_label-lesion_mask.nii.gz"
        )
        truth_f = _truth(root, sub, "space-FLAIR_label-lesion_mask")
        inter = (manual * truth_f).sum()
        dice = 2 * inter / (manual.sum() + truth_f.sum())
        assert 0.5 < dice < 0.99  # rater-like: close to, but not equal to, the truth
        wm = _truth(root, sub, "space-T2w_label-WM_probseg")
        assert np.median(wm[les]) > 0.6  # lesions sit in white matter
    assert min(vols) <= 0.03 and max(vols) >= 1.0, vols


def test_noise_free_mrf_matches_signal_model(tiny: dict[str, Path]) -> None:
    root = tiny["clean"]
    sub = "sub-02"
    mrf = _load(root / sub / "anat" / f"{sub}_acq-MRFEPI_MRF.nii.gz")
    prot = Protocol.from_sidecar(json.loads((root / sub / "anat" / f"{sub}_acq-MRFEPI_MRF.json").read_text()))
    wm = _truth(root, sub, "space-MRF_label-WM_probseg")
    les = _truth(root, sub, "space-MRF_label-lesion_probseg")
    t1, t2s = _truth(root, sub, "space-MRF_T1map"), _truth(root, sub, "space-MRF_T2starmap")
    b1, m0 = _truth(root, sub, "space-MRF_TB1map"), _truth(root, sub, "space-MRF_M0map")
    pure = (wm >= 0.999) & (les == 0)
    assert pure.sum() >= 20
    for k in range(mrf.shape[2]):
        sel = pure[:, :, k]
        if not sel.any():
            continue
        sim = simulate(prot, k, t1[:, :, k][sel], t2s[:, :, k][sel], b1[:, :, k][sel])
        pred = m0[:, :, k][sel, None] * np.abs(sim)
        np.testing.assert_allclose(mrf[:, :, k][sel], pred, rtol=3e-3, atol=2e-3 * float(m0[pure].mean()))
    # outside the head the noise-free series is exactly zero
    assert mrf[0, 0, 0].max() == 0.0


def test_longitudinal(tiny: dict[str, Path]) -> None:
    root = tiny["long"]
    for ses in ("ses-01", "ses-02"):
        assert (root / "sub-02" / ses / "anat" / f"sub-02_{ses}_acq-MRFEPI_MRF.nii.gz").exists()
        assert (
            root
            / "derivatives"
            / "manual"
            / "sub-02"
            / ses
            / "anat"
            / f"sub-02_{ses}_space-FLAIR_label-lesion_mask.nii.gz"
        ).exists()
    t = root / "derivatives" / "truth" / "sub-02"
    new = _load(t / "ses-02" / "anat" / "sub-02_ses-02_space-T2w_label-newenlarged_mask.nii.gz")
    les2 = _load(t / "ses-02" / "anat" / "sub-02_ses-02_space-T2w_label-lesion_mask.nii.gz")
    les1 = _load(t / "ses-01" / "anat" / "sub-02_ses-01_space-T2w_label-lesion_mask.nii.gz")
    assert new.sum() > 0 and np.all(les2[new > 0] > 0) and les2.sum() > les1.sum()
    assert not (t / "ses-01" / "anat" / "sub-02_ses-01_space-T2w_label-newenlarged_mask.nii.gz").exists()
    ctrl = _load(
        t.parent / "sub-01" / "ses-02" / "anat" / "sub-01_ses-02_space-T2w_label-newenlarged_mask.nii.gz"
    )
    assert ctrl.sum() == 0
    # repositioned between sessions: the same anatomy lands elsewhere on the grid
    w1 = _load(t / "ses-01" / "anat" / "sub-02_ses-01_space-T2w_label-WM_probseg.nii.gz")
    w2 = _load(t / "ses-02" / "anat" / "sub-02_ses-02_space-T2w_label-WM_probseg.nii.gz")
    assert np.abs(w1 - w2).mean() > 0.005


# --------------------------------------------------------------------------------------- longitudinal stage truth
@pytest.fixture(scope="module")
def demo_long(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """Longitudinal phantom on the demo voxel grid: site1 control + patient, site2 patient."""
    out = tmp_path_factory.mktemp("demo_long") / "bids"
    table = generate(out, n_subjects=3, n_sites=2, seed=22, longitudinal=True, n_jobs=2, progress=False,
                     _grid_override=DEMO_SLAB)
    return out, table


def _ses_file(root: Path, tree: str, sub: str, ses: str, name: str) -> Path:
    return root / "derivatives" / tree / sub / ses / "anat" / f"{sub}_{ses}_{name}"


def _in_fov(img: nib.Nifti1Image, other: nib.Nifti1Image, matrix: np.ndarray) -> np.ndarray:
    """Voxels of ``img`` whose centre, moved by the world transform ``matrix``, lies in ``other``'s grid."""
    ijk = np.indices(img.shape).reshape(3, -1)
    vox2vox = np.linalg.inv(other.affine) @ matrix @ img.affine
    q = vox2vox[:3, :3] @ ijk + vox2vox[:3, 3:4]
    return np.all((q > -0.5) & (q < np.array(other.shape)[:, None] - 0.5), axis=0).reshape(img.shape)


def _components(mask: np.ndarray, voxel_ml: float, min_ml: float = 0.01) -> int:
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    return int((np.bincount(lab.ravel())[1:] * voxel_ml >= min_ml - 1e-9).sum())


def test_longitudinal_flair_newenlarged_truth(demo_long: tuple[Path, pd.DataFrame]) -> None:
    root, table = demo_long
    vol_flair = vol_t2w = 0.0
    for _, row in table.iterrows():
        sub = row["participant_id"]
        mask_p = _ses_file(root, "truth", sub, "ses-02", "space-FLAIR_label-newenlarged_mask.nii.gz")
        dseg_p = _ses_file(root, "truth", sub, "ses-02", "space-FLAIR_desc-newenlarged_dseg.nii.gz")
        for p in (mask_p, dseg_p):
            assert nib.load(p).get_data_dtype() == np.uint8
            assert "Units" in json.loads(p.with_name(p.name.replace(".nii.gz", ".json")).read_text())
            assert not Path(str(p).replace("ses-02", "ses-01")).exists()  # follow-up sessions only
        lut = dseg_p.with_name(dseg_p.name.replace(".nii.gz", ".tsv")).read_text()
        assert lut == "index\tname\n1\tnew\n2\tenlarged\n"
        mask, dseg = _load(mask_p).astype(int), _load(dseg_p).astype(int)
        flair = nib.load(root / sub / "ses-02" / "anat" / f"{sub}_ses-02_FLAIR.nii.gz")
        assert mask.shape == flair.shape and np.allclose(nib.load(mask_p).affine, flair.affine)
        if row["group"] == "control":
            assert mask.sum() == 0 and dseg.sum() == 0
            continue
        # the kinds cover exactly the mask, which lies in the follow-up lesion mask
        assert set(np.unique(dseg)) <= {0, 1, 2} and np.array_equal(dseg > 0, mask > 0)
        lesion = _load(_ses_file(root, "truth", sub, "ses-02", "space-FLAIR_label-lesion_mask.nii.gz"))
        assert np.all(lesion[mask > 0] > 0)
        # the generator's lesions: 1-4 new, 1-3 enlarged by a volume factor 1.6-3.0, the rest unchanged
        tabs = [pd.read_csv(_ses_file(root, "truth", sub, s, "space-T2w_desc-lesionid_dseg.tsv"), sep="\t")
                .set_index("index") for s in ("ses-01", "ses-02")]
        new_ids = sorted(set(tabs[1].index) - set(tabs[0].index))
        factor = (tabs[1]["nominal_volume_ml"] / tabs[0]["nominal_volume_ml"]).dropna()
        enlarged = factor[factor > 1.0 + 1e-6]
        assert 1 <= len(new_ids) <= 4 and min(new_ids) > max(tabs[0].index)
        assert 1 <= len(enlarged) <= 3 and enlarged.between(1.6 - 1e-4, 3.0 + 1e-4).all()
        assert np.allclose(factor.drop(enlarged.index), 1.0)
        # 26-connected components (>= 0.01 ml): one per new lesion (new lesions are >= 4 mm from any other
        # lesion and >= 0.05 ml), and none mixes new and enlarged tissue; an enlarging lesion adds its grown
        # rim, which may fall apart into several components, so only "at least one" holds for them
        vox_ml = float(np.prod(flair.header.get_zooms()[:3])) / 1000.0
        n_new, n_enl = _components(dseg == 1, vox_ml), _components(dseg == 2, vox_ml)
        assert n_new == len(new_ids)
        assert n_enl >= 1
        assert _components(mask > 0, vox_ml) == n_new + n_enl
        # the same lesions on the T2w grid: compare the volumes where the two fields of view overlap
        t2w_p = _ses_file(root, "truth", sub, "ses-02", "space-T2w_label-newenlarged_mask.nii.gz")
        t2w = nib.load(t2w_p)
        m = np.asarray(json.loads(_ses_file(root, "truth", sub, "ses-02",
                                            "from-FLAIR_to-T2w_mode-image_xfm.json").read_text())["Matrix"])
        img_f = nib.load(mask_p)
        v_f = float(mask[_in_fov(img_f, t2w, m)].sum()) * vox_ml
        v_t = float(_load(t2w_p)[_in_fov(t2w, img_f, np.linalg.inv(m))].sum()) * float(
            np.prod(t2w.header.get_zooms()[:3])) / 1000.0
        if v_t >= 0.5:  # small totals are mostly one-voxel rims: their volume is at the mercy of the grid
            assert abs(v_f - v_t) <= 0.25 * v_t, (sub, v_f, v_t)
        vol_flair, vol_t2w = vol_flair + v_f, vol_t2w + v_t
    assert vol_t2w > 1.0 and abs(vol_flair - vol_t2w) <= 0.25 * vol_t2w, (vol_flair, vol_t2w)


def test_longitudinal_manual_newenlarged(demo_long: tuple[Path, pd.DataFrame]) -> None:
    root, table = demo_long
    inter = total = 0.0
    for _, row in table.iterrows():
        sub = row["participant_id"]
        man_p = _ses_file(root, "manual", sub, "ses-02", "space-FLAIR_label-newenlarged_mask.nii.gz")
        assert nib.load(man_p).get_data_dtype() == np.uint8
        side = json.loads(man_p.with_name(man_p.name.replace(".nii.gz", ".json")).read_text())
        assert side["Type"] == "Lesion" and "new/enlarged" in side["Description"]
        assert side["Sources"] == [f"bids:raw:{sub}/ses-02/anat/{sub}_ses-02_FLAIR.nii.gz",
                                   f"bids:raw:{sub}/ses-01/anat/{sub}_ses-01_FLAIR.nii.gz"]
        assert not Path(str(man_p).replace("ses-02", "ses-01")).exists()
        man = _load(man_p) > 0
        truth = _load(_ses_file(root, "truth", sub, "ses-02", "space-FLAIR_label-newenlarged_mask.nii.gz")) > 0
        if row["group"] == "control":
            assert man.sum() == 0
            continue
        assert man.sum() > 0 and not np.array_equal(man, truth)  # rater-like, not the truth
        inter += float((man & truth).sum())
        total += float(man.sum() + truth.sum())
        # the gain of the follow-up differs from the baseline's by the global intensity change
        gains = [json.loads(_ses_file(root, "truth", sub, s, "space-T2w_M0map.json").read_text())["Gain"]
                 for s in ("ses-01", "ses-02")]
        assert 0.85 <= gains[1] / gains[0] <= 1.15 and gains[1] != gains[0]
    dice = 2 * inter / total
    assert 0.5 < dice < 0.95, dice  # measured 0.70 (per patient 0.81, 0.49)


def test_followup_lesion_draws() -> None:
    """The follow-up's lesions as drawn: 1-4 new ones clear of every other lesion, 1-3 enlarged ones."""
    from mrflesion.phantom.anatomy import get_atlas
    from mrflesion.phantom.lesions import clearance_mm
    from mrflesion.phantom.subject import SubjectModel

    cfg, atlas = load_config(), get_atlas()
    fu = cfg["lesions"]["followup"]
    for index in range(1, 9):
        group = "control" if index == 1 else "patient"
        subj = SubjectModel.draw(cfg, cfg["grids"]["demo"], atlas, 5, index, "sub-x", "site1", group,
                                 ["ses-01", "ses-02"])
        base, follow = subj.sessions
        assert base.previous_lesions is None and base.enlarged_ids == ()
        assert follow.previous_lesions is not None and len(follow.previous_lesions) == len(base.lesions)
        assert all(a is b for a, b in zip(follow.previous_lesions, base.lesions, strict=True))
        if group == "control":
            assert follow.lesions == [] and follow.enlarged_ids == ()
            continue
        old = {le.lesion_id: le for le in base.lesions}
        new = [le for le in follow.lesions if le.lesion_id not in old]
        assert 1 <= len(new) <= 4 and 1 <= len(follow.enlarged_ids) <= 3
        for le in follow.lesions:
            if le.lesion_id in follow.enlarged_ids:
                assert 1.6 - 1e-9 <= le.volume_ml / old[le.lesion_id].volume_ml <= 3.0 + 1e-9
            elif le.lesion_id in old:
                assert le is old[le.lesion_id]
        for le in new:
            others = [o for o in follow.lesions if o is not le]
            assert clearance_mm(le, others, fu["min_gap_mm"], step=0.25) >= fu["min_gap_mm"] - 0.5
        assert 0.85 <= follow.gain_factor <= 1.15 and not np.allclose(follow.pose_t2w, base.pose_t2w)


def test_longitudinal_deterministic(tiny: dict[str, Path], tmp_path: Path) -> None:
    again = tmp_path / "long"
    generate(again, n_subjects=2, n_sites=2, seed=6, longitudinal=True, n_jobs=2, progress=False,
             _grid_override=TINY)
    h0, h1 = _hashes(tiny["long"]), _hashes(again)
    assert h0 == h1
    for tree, name in (("truth", "space-FLAIR_label-newenlarged_mask"), ("truth", "space-FLAIR_desc-newenlarged_dseg"),
                       ("manual", "space-FLAIR_label-newenlarged_mask")):
        for sub in ("sub-01", "sub-02"):
            assert f"derivatives/{tree}/{sub}/ses-02/anat/{sub}_ses-02_{name}.nii.gz" in h0


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from mrflesion.phantom.config import load_config

    monkeypatch.setitem(load_config()["grids"], "demo", TINY)  # keep the test cheap
    rc = main([str(tmp_path / "ds"), "--subjects", "1", "--sites", "1", "--seed", "2", "--grid", "demo"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "1/1 sub-01" in err
    assert (tmp_path / "ds" / "sub-01" / "anat" / "sub-01_T2w.nii.gz").exists()
