"""Registration tests on a synthetic MRF/T2w/FLAIR case built from nilearn's MNI152 tissue maps.

Truth: a T2w grid (2x2x3 mm, 96x112x20 slab); the MRF-space T1 map sees the anatomy through a known
rigid transform (about 1.5 mm, 1.5 deg) plus a smooth displacement along the phase-encode axis y
(up to ~3.5 mm). The T2w->MRF point mapping is therefore known exactly and the residual of the
estimated transforms can be measured in T2w voxels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "2"

import ants  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy import ndimage  # noqa: E402

from mrflesion import registration as reg  # noqa: E402

SHAPE = (96, 112, 20)
ZOOMS = (2.0, 2.0, 3.0)
CENTER = np.array([0.0, -18.0, 12.0])


def grid_affine(shape=SHAPE, zooms=ZOOMS, center=CENTER) -> np.ndarray:
    aff = np.diag(list(zooms) + [1.0])
    aff[:3, 3] = center - (np.array(shape) - 1) / 2 * np.array(zooms)
    return aff


def rot(ax: float, ay: float, az: float) -> np.ndarray:
    ax, ay, az = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def rigid(angles, trans) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rot(*angles)
    m[:3, 3] = trans
    return m


class Anatomy:
    """MNI152 GM/WM/CSF fractions (1 mm), sampled at arbitrary world points (linear)."""

    def __init__(self) -> None:
        from nilearn import datasets

        gm = datasets.load_mni152_gm_template(resolution=1)
        wm = datasets.load_mni152_wm_template(resolution=1).get_fdata()
        mask = datasets.load_mni152_brain_mask(resolution=1).get_fdata()
        g = gm.get_fdata()
        csf = np.clip(mask - g - wm, 0, 1)
        self.inv = np.linalg.inv(gm.affine)
        # mild smoothing ~ partial voluming of a 2 mm voxel
        self.maps = {k: ndimage.gaussian_filter(v.astype(np.float32), 0.8)
                     for k, v in (("GM", g), ("WM", wm), ("CSF", csf))}

    def sample(self, world: np.ndarray) -> dict[str, np.ndarray]:
        idx = world @ self.inv[:3, :3].T + self.inv[:3, 3]
        coords = np.moveaxis(idx, -1, 0)
        return {k: ndimage.map_coordinates(v, coords, order=1, mode="constant", cval=0.0)
                for k, v in self.maps.items()}


@pytest.fixture(scope="module")
def anatomy() -> Anatomy:
    return Anatomy()


def world_grid(affine: np.ndarray, shape=SHAPE) -> np.ndarray:
    ijk = np.stack(np.indices(shape, dtype=np.float64), axis=-1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def pe_displacement(p: np.ndarray) -> np.ndarray:
    """Smooth displacement (mm, along y) defined in MRF world space."""
    c = np.array([0.0, 40.0, -5.0])
    r2 = np.sum((p - c) ** 2, axis=-1)
    return 3.0 * np.exp(-r2 / (2 * 35.0**2)) + 0.8 * np.sin(p[..., 2] / 25.0) + 0.5


def true_t2w_to_mrf(q: np.ndarray, a_mat: np.ndarray) -> np.ndarray:
    """Solve p + d(p) e_y = A q for p (fixed-point iteration)."""
    aq = q @ a_mat[:3, :3].T + a_mat[:3, 3]
    p = aq.copy()
    for _ in range(30):
        p_new = aq.copy()
        p_new[..., 1] -= pe_displacement(p)
        if np.max(np.abs(p_new - p)) < 1e-6:
            break
        p = p_new
    return p_new


def t1_from_fractions(fr: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    r1 = fr["WM"] / 900.0 + fr["GM"] / 1500.0 + fr["CSF"] / 4000.0
    tot = fr["WM"] + fr["GM"] + fr["CSF"]
    t1 = np.where(tot > 0.3, tot / np.maximum(r1, 1e-9), 0.0)
    return np.where(t1 > 0, t1 * (1 + 0.02 * rng.standard_normal(t1.shape)), 0.0)


def make_case(anatomy: Anatomy, out) -> dict:
    rng = np.random.default_rng(7)
    aff = grid_affine()
    q = world_grid(aff)
    fr_t2w = anatomy.sample(q)
    t2w = 0.45 * fr_t2w["WM"] + 0.65 * fr_t2w["GM"] + 1.0 * fr_t2w["CSF"]
    t2w = t2w + 0.01 * rng.standard_normal(t2w.shape)
    brain = (fr_t2w["WM"] + fr_t2w["GM"] + fr_t2w["CSF"]) > 0.5
    a_mat = rigid((1.0, -0.8, 1.5), (1.5, -1.0, 1.2))  # T2w world -> MRF world (before distortion)
    # MRF image at MRF point p shows the anatomy at A^-1 (p + d(p) e_y)
    p = world_grid(aff)
    src = p.copy()
    src[..., 1] += pe_displacement(p)
    a_inv = np.linalg.inv(a_mat)
    src = src @ a_inv[:3, :3].T + a_inv[:3, 3]
    t1map = t1_from_fractions(anatomy.sample(src), rng)
    paths = {"t2w": out / "t2w.nii.gz", "t1": out / "t1map.nii.gz"}
    nib.save(nib.Nifti1Image(t2w.astype(np.float32), aff), paths["t2w"])
    nib.save(nib.Nifti1Image(t1map.astype(np.float32), aff), paths["t1"])
    truth = true_t2w_to_mrf(q, a_mat)
    return {"paths": paths, "truth": truth, "brain": brain, "out": out, "a_mat": a_mat, "aff": aff}


@pytest.fixture(scope="module")
def synthetic_case(anatomy, tmp_path_factory):
    return make_case(anatomy, tmp_path_factory.mktemp("reg"))


def test_nib_ants_roundtrip() -> None:
    aff = rigid((3.0, 0.0, -5.0), (10.0, -4.0, 2.0)) @ grid_affine()
    img = reg.nib_to_ants(np.zeros(SHAPE, np.float32), aff)
    np.testing.assert_allclose(reg.ants_to_affine(img), aff, atol=1e-5)


def test_t1_to_t2w_pe_stage(synthetic_case) -> None:
    c = synthetic_case
    res = reg.register_t1_to_t2w(c["paths"]["t1"], c["paths"]["t2w"], c["out"] / "sub-01",
                                 phase_encode_stage=True, threads=2)
    assert res.rigid.name == "sub-01_from-MRF_to-T2w_mode-image_desc-rigid_xfm.mat"
    assert res.warp is not None and res.warp.exists() and res.inverse_warp.exists()
    assert res.fwd_transforms == [str(res.warp), str(res.rigid)]
    # the PE warp has only its y component non-zero
    field = nib.load(res.warp).get_fdata().squeeze()
    assert field.shape[-1] == 3
    assert np.abs(field[..., 0]).max() < 1e-4 and np.abs(field[..., 2]).max() < 1e-4
    assert np.abs(field[..., 1]).max() > 0.5

    kw = dict(reference_t2w=c["paths"]["t2w"], moving_reference=c["paths"]["t1"], mask=c["brain"])
    r_rigid = reg.residual_displacement(c["truth"], res, rigid_only=True, **kw)
    r_pe = reg.residual_displacement(c["truth"], res, rigid_only=False, **kw)
    # no registration at all, for scale
    ident = world_grid(c["aff"])
    err0 = np.linalg.norm((c["truth"] - ident)[c["brain"]] / np.array(ZOOMS), axis=-1).mean()
    print(f"\nresidual (T2w voxels, brain): none {err0:.3f}, rigid {r_rigid['mean_vox']:.3f} "
          f"(y {r_rigid['mean_axis1_vox']:.3f}), rigid+PE {r_pe['mean_vox']:.3f} "
          f"(y {r_pe['mean_axis1_vox']:.3f}); timings {res.timings}")
    assert r_pe["mean_vox"] < 0.5
    assert r_pe["mean_vox"] < r_rigid["mean_vox"]

    # apply: 3D map (bSpline, non-negative) and a 4D series (rigid only)
    t1_t2w = reg.apply_to_t2w(c["paths"]["t1"], res, c["paths"]["t2w"], c["out"] / "t1_t2w.nii.gz")
    assert t1_t2w.shape == SHAPE and t1_t2w.min() >= 0
    series = np.stack([nib.load(c["paths"]["t1"]).get_fdata() * s for s in (1.0, 0.5, 0.25)], -1)
    p4 = c["out"] / "mrf.nii.gz"
    nib.save(nib.Nifti1Image(series.astype(np.float32), c["aff"]), p4)
    out4 = reg.apply_to_t2w(p4, res, c["paths"]["t2w"], c["out"] / "mrf_t2w.nii.gz", rigid_only=True)
    assert out4.shape == SHAPE + (3,)
    np.testing.assert_allclose(out4[..., 1], 0.5 * out4[..., 0], rtol=1e-3, atol=1e-2)
    written = nib.load(c["out"] / "mrf_t2w.nii.gz")
    np.testing.assert_allclose(written.affine, c["aff"], atol=1e-5)
    # the B-spline resampling (one sampling map, compiled) is ANTs' per-volume bSpline resampling
    fixed = reg.nib_to_ants(np.zeros(SHAPE, np.float32), c["aff"])
    for rigid_only, ours in ((True, out4), (False, None)):
        if ours is None:
            ours = reg.apply_to_t2w(p4, res, c["paths"]["t2w"], None, rigid_only=False, clip_negative=False,
                                    threads=2)
        for k in range(series.shape[-1]):
            ref = ants.apply_transforms(fixed=fixed, moving=reg.nib_to_ants(series[..., k], c["aff"]),
                                        transformlist=res.transforms(rigid_only=rigid_only),
                                        interpolator="bSpline", defaultvalue=0.0).numpy()
            if rigid_only:
                ref = np.clip(ref, 0.0, None)
            assert np.abs(ours[..., k] - ref).max() <= 2e-5 * np.abs(ref).max(), (rigid_only, k)
    # corrected T1 map agrees better with the truth-resampled T1 than the rigid-only one
    rigid_t1 = reg.apply_to_t2w(c["paths"]["t1"], res, c["paths"]["t2w"], None, rigid_only=True)
    t2w = nib.load(c["paths"]["t2w"]).get_fdata()
    b = c["brain"]
    assert np.corrcoef(t1_t2w[b], t2w[b])[0, 1] > np.corrcoef(rigid_t1[b], t2w[b])[0, 1]


@pytest.fixture(scope="module")
def flair_case(anatomy, synthetic_case) -> dict:
    """FLAIR in its own pose (T2w world -> FLAIR world), own grid (1.5 x 1.5 x 3 mm), with a lesion."""
    c = synthetic_case
    rng = np.random.default_rng(3)
    f_mat = rigid((2.0, 1.0, -3.0), (3.0, 2.0, -2.0))
    f_shape = (128, 150, 20)
    f_aff = grid_affine(f_shape, (1.5, 1.5, 3.0), CENTER + np.array([2.0, 1.0, 0.0]))
    pf = world_grid(f_aff, f_shape)
    f_inv = np.linalg.inv(f_mat)
    q_of_f = pf @ f_inv[:3, :3].T + f_inv[:3, 3]  # anatomy (T2w world) point of each FLAIR voxel
    fr = anatomy.sample(q_of_f)
    centre, radii = np.array([24.0, -20.0, 18.0]), np.array([9.0, 7.0, 7.5])
    lesion_f = np.sum(((q_of_f - centre) / radii) ** 2, axis=-1) <= 1.0
    flair = 0.6 * fr["WM"] + 0.8 * fr["GM"] + 0.05 * fr["CSF"] + 0.7 * lesion_f
    flair += 0.01 * rng.standard_normal(flair.shape)
    pflair, pmask = c["out"] / "flair.nii.gz", c["out"] / "lesion_flair.nii.gz"
    nib.save(nib.Nifti1Image(flair.astype(np.float32), f_aff), pflair)
    nib.save(nib.Nifti1Image(lesion_f.astype(np.uint8), f_aff), pmask)
    return {"flair": pflair, "mask": pmask, "f_mat": f_mat, "lesion": lesion_f, "centre": centre, "radii": radii}


def test_flair_mask_to_t2w(synthetic_case, flair_case) -> None:
    c, fc = synthetic_case, flair_case
    pflair, pmask, f_mat, lesion_f = fc["flair"], fc["mask"], fc["f_mat"], fc["lesion"]
    centre, radii = fc["centre"], fc["radii"]
    res = reg.register_flair_to_t2w(pflair, c["paths"]["t2w"], c["out"] / "sub-01")
    assert res.rigid.name == "sub-01_from-FLAIR_to-T2w_mode-image_desc-rigid_xfm.mat"
    m = reg.mask_to_t2w(pmask, res, c["paths"]["t2w"], c["out"] / "lesion_t2w.nii.gz")
    assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
    assert nib.load(c["out"] / "lesion_t2w.nii.gz").get_data_dtype() == np.uint8
    q = world_grid(c["aff"])
    lesion_t2w_true = np.sum(((q - centre) / radii) ** 2, axis=-1) <= 1.0
    vox_flair, vox_t2w = np.prod([1.5, 1.5, 3.0]), np.prod(ZOOMS)
    vol_flair = lesion_f.sum() * vox_flair / 1000
    vol_t2w = m.sum() * vox_t2w / 1000
    dice = 2 * np.sum(m.astype(bool) & lesion_t2w_true) / (m.sum() + lesion_t2w_true.sum())
    resid = reg.residual_displacement(q @ f_mat[:3, :3].T + f_mat[:3, 3], res, c["paths"]["t2w"], pflair,
                                      mask=c["brain"])
    print(f"\nlesion volume FLAIR {vol_flair:.3f} ml -> T2w {vol_t2w:.3f} ml "
          f"({100 * (vol_t2w / vol_flair - 1):+.1f} %), Dice vs truth {dice:.3f}, "
          f"FLAIR->T2w residual {resid['mean_vox']:.3f} vox")
    assert abs(vol_t2w / vol_flair - 1) < 0.05
    assert dice > 0.85
    assert resid["mean_vox"] < 0.3


_SIDE_BY_SIDE = """
import json, sys
from mrflesion.steps import registration as reg_steps
for args in json.loads(sys.argv[1]):
    info_mrf, info_flair = reg_steps.register_both(args["mrf"], args["flair"], parallel=args["parallel"])
    assert info_flair["lesion_voxels"] > 0 and info_mrf["mask_voxels"] > 0
"""


def test_register_both_side_by_side_identical(synthetic_case, flair_case, tmp_path) -> None:
    """The MRF and FLAIR registrations run side by side (FLAIR in a forked process that then shares the
    MRF series' resampling, each single-threaded ANTs) write exactly what they write one after the other.
    In a fresh interpreter: ITK fixes its thread count at first use (this module's other tests use 2)."""
    c, fc = synthetic_case, flair_case
    t1 = str(c["paths"]["t1"])
    series = np.stack([nib.load(t1).get_fdata() * s for s in (1.0, 0.5, 0.25, 0.125)], -1).astype(np.float32)
    nib.save(nib.Nifti1Image(series, c["aff"]), tmp_path / "mrf.nii.gz")
    nib.save(nib.Nifti1Image(c["brain"].astype(np.uint8), c["aff"]), tmp_path / "mask.nii.gz")
    runs, written = [], {}
    for mode in ("parallel", "sequential"):
        d = tmp_path / mode
        d.mkdir()
        stem = str(d / "sub-01")
        xfm = f"{stem}_from-MRF_to-T2w_mode-image"
        out = {"rigid": f"{xfm}_desc-rigid_xfm.mat", "warp": f"{xfm}_desc-pewarp_xfm.nii.gz",
               "inverse_warp": f"{stem}_from-T2w_to-MRF_mode-image_desc-pewarp_xfm.nii.gz",
               **{k: f"{stem}_{k}.nii.gz" for k in ("T1", "T2star", "B1", "M0", "MRF", "mask")}}
        flair = {"flair": str(fc["flair"]), "lesion": str(fc["mask"]), "t2w": str(c["paths"]["t2w"]),
                 "out_xfm": f"{stem}_from-FLAIR_to-T2w_mode-image_xfm.mat",
                 "out_lesion": f"{stem}_lesion.nii.gz", "out_flair": f"{stem}_flair.nii.gz"}
        mrf = {"maps": dict.fromkeys(("T1", "T2star", "B1", "M0"), t1), "mrf": str(tmp_path / "mrf.nii.gz"),
               "mrf_mask": str(tmp_path / "mask.nii.gz"), "t2w": str(c["paths"]["t2w"]), "out": out,
               "phase_encode_stage": True, "mrf_full_transform": True}
        runs.append({"mrf": mrf, "flair": flair, "parallel": mode == "parallel"})
        written[mode] = {Path(p).name.split("sub-01")[1]: Path(p) for p in
                         [*out.values(), flair["out_xfm"], flair["out_lesion"], flair["out_flair"]]}
    env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"}
    subprocess.run([sys.executable, "-c", _SIDE_BY_SIDE, json.dumps(runs)], check=True, env=env)
    for name, p in written["parallel"].items():
        q = written["sequential"][name]
        if name.endswith(".mat"):
            assert p.read_bytes() == q.read_bytes(), name
        else:
            assert np.array_equal(np.asarray(nib.load(p).dataobj), np.asarray(nib.load(q).dataobj)), name
    assert nib.load(written["parallel"]["_MRF.nii.gz"]).shape == SHAPE + (4,)
