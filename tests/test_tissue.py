"""Tissue segmentation tests against nilearn's MNI152 maps (2 mm, downsampled from 1 mm for speed).

Non-circularity: the priors are the MNI maps blurred with a Gaussian of 6 mm FWHM (SPM-like smooth
priors), and each test image is additionally warped by a random smooth deformation (up to 4 mm), so
the template-to-subject registration and the intensity model both have to do work. The reference is
the equally deformed shipped map.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "2"

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy import ndimage  # noqa: E402

from mrflesion import layout, tissue  # noqa: E402
from mrflesion.steps import tissue as tissue_steps  # noqa: E402


def deform(arrays: list[np.ndarray], seed: int, amp_vox: float = 2.0, sigma_vox: float = 6.0
           ) -> list[np.ndarray]:
    """Apply one random smooth displacement (max ``amp_vox`` per component) to all arrays."""
    rng = np.random.default_rng(seed)
    shape = arrays[0].shape
    disp = []
    for _ in range(3):
        d = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_vox)
        disp.append(d / np.abs(d).max() * amp_vox)
    coords = np.indices(shape, dtype=np.float64) + np.stack(disp)
    return [ndimage.map_coordinates(a, coords, order=1).astype(np.float32) for a in arrays]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.sum(a & b) / max(a.sum() + b.sum(), 1))


@pytest.fixture(scope="module")
def mni2mm():
    return tissue._mni_arrays(2.0)


def test_priors_smooth_and_normalised() -> None:
    _, pri, mask, _ = tissue.mni_priors(prior_fwhm_mm=6.0, resolution_mm=2.0)
    tot = pri["GM"] + pri["WM"] + pri["CSF"]
    assert np.allclose(tot[mask > 0.5], 1.0, atol=1e-4)
    _, raw, _, _ = tissue._mni_arrays(2.0)
    # blurred: less extreme than the shipped maps
    assert (pri["WM"] > 0.95).sum() < (raw["WM"] > 0.95).sum()


def test_nawm() -> None:
    wm = np.full((4, 4, 4), 0.9, np.float32)
    les = np.zeros((4, 4, 4), np.uint8)
    les[1:3, 1:3, 1:3] = 1
    out = tissue.nawm(wm, les)
    assert out[les > 0].max() == 0 and np.allclose(out[les == 0], 0.9)


def test_mni_template_t1w(mni2mm) -> None:
    tpl, tis, mask, aff = mni2mm
    img, gm, wm = deform([tpl, tis["GM"], tis["WM"]], seed=1)
    timings: dict[str, float] = {}
    p = tissue.segment(img, affine=aff, image_kind="T1w", timings=timings)
    tot = p["GM"] + p["WM"] + p["CSF"]
    assert tot.max() <= 1.0 + 1e-5 and tot.min() >= 0
    d_gm, d_wm = dice(p["GM"] > 0.5, gm > 0.5), dice(p["WM"] > 0.5, wm > 0.5)
    print(f"\nMNI152 T1w template (2 mm, deformed): Dice@50% GM {d_gm:.3f} WM {d_wm:.3f}; "
          f"timings {{{', '.join(f'{k}: {v:.1f}' for k, v in timings.items())}}}")
    assert d_gm >= 0.85 and d_wm >= 0.85
    # the priors as registered to the image (a network input): smooth, 0-1, where the deformed WM is
    pri = {k: p[f"{k}prior"] for k in tissue.TISSUES}
    assert all(v.shape == img.shape and v.min() >= 0 and v.max() <= 1 for v in pri.values())
    d_prior = dice(pri["WM"] > 0.5, wm > 0.5)
    print(f"registered WM prior vs the deformed WM: Dice@50% {d_prior:.3f}")
    assert d_prior >= 0.7


def crisp_pv_fractions() -> dict[str, np.ndarray]:
    """Subject-like partial-volume fractions at 2 mm: argmax labels of the 1 mm MNI maps, box-averaged.

    (The shipped MNI maps are population probabilities: many voxels are GM+WM+CSF mixtures whose R1
    equals that of pure GM, which no single-contrast method can separate; see the module report.)
    """
    _, tis1, mask1, _ = tissue._mni_arrays(1.0)
    shape2 = tissue._mni_arrays(2.0)[0].shape
    lab = np.argmax(np.stack([tis1[k] for k in tissue.TISSUES]), 0)
    coords = np.indices(shape2, dtype=np.float32) * 2
    out = {}
    for i, k in enumerate(tissue.TISSUES):
        c = ((lab == i) & (mask1 > 0.5)).astype(np.float32)
        out[k] = ndimage.map_coordinates(ndimage.uniform_filter(c, 2), coords, order=1)
    return out


def test_synthetic_t1map(mni2mm, tmp_path) -> None:
    """T1 map from deformed PV fractions: R1 mixing (1/T1 = sum f_k / T1_k), 3 % Gaussian noise on T1."""
    aff = mni2mm[3]
    fr = crisp_pv_fractions()
    gm, wm, csf = deform([fr["GM"], fr["WM"], fr["CSF"]], seed=2)
    tot = gm + wm + csf
    rng = np.random.default_rng(5)
    t1 = np.where(tot > 0.3, tot / np.maximum(wm / 900 + gm / 1500 + csf / 4000, 1e-9), 0.0)
    t1 = np.where(t1 > 0, t1 * (1 + 0.03 * rng.standard_normal(t1.shape)), 0.0).astype(np.float32)
    path = tmp_path / "sub-01_T1map.nii.gz"
    nib.save(nib.Nifti1Image(t1, aff), path)
    lesion = np.zeros(t1.shape, np.uint8)
    lesion[55:60, 60:65, 45:50] = 1
    nib.save(nib.Nifti1Image(lesion, aff), tmp_path / "lesion.nii.gz")
    out = layout.derivatives("tissue", str(tmp_path / "out"), stem="sub-01", keys=("GM", "WM", "CSF", "NAWM"))
    res = tissue_steps.tissue_maps(str(path), None, str(tmp_path / "lesion.nii.gz"), out)  # the rule's body
    p = {k: nib.load(out[k]).get_fdata() for k in ("GM", "WM", "CSF", "NAWM")}
    side = json.loads(Path(layout.sidecar_path(out["NAWM"])).read_text())
    assert side["Sources"] == [str(path), "nilearn:MNI152 2009 GM/WM/brain mask (priors)",
                               str(tmp_path / "lesion.nii.gz")]
    assert side["MaskVoxels"] == res["mask_voxels"] > 0 and "register" in side["TimingsSeconds"]
    assert "write" in res["timings"]  # after the sidecars, which are written with their images
    hdr = nib.load(out["GM"]).header
    assert hdr.get_data_dtype() == np.float32 and np.allclose(hdr.get_best_affine(), aff)
    assert p["NAWM"][lesion > 0].max() == 0
    d = {k: dice(p[k] > 0.8, t > 0.8) for k, t in (("GM", gm), ("WM", wm), ("CSF", csf))}
    d50 = {k: dice(p[k] > 0.5, t > 0.5) for k, t in (("GM", gm), ("WM", wm))}
    timings = res["timings"]
    print(f"\nsynthetic T1 map (2 mm, deformed, 3 % noise): Dice@80% GM {d['GM']:.3f} WM {d['WM']:.3f} "
          f"CSF {d['CSF']:.3f}; Dice@50% GM {d50['GM']:.3f} WM {d50['WM']:.3f}; "
          f"timings {{{', '.join(f'{k}: {v:.1f}' for k, v in timings.items())}}}")
    assert d["GM"] >= 0.85 and d["WM"] >= 0.90
