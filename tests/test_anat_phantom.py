"""Registration and tissue stages on the digital phantom, against its truth (issue acceptance).

Three phantom subjects on the demo voxel grid (2 x 2 x 3 mm, thin 10-slice slab): site1 control +
patient, site2 patient (SMS site). Per subject, through the package functions the rules call
(``mrflesion.steps.registration``, ``mrflesion.steps.tissue``):

* registration of the MRF-space T1 map to the T2w image; the residual of the T2w -> MRF point
  mapping against the truth (rigid motion ``from-MRF_to-T2w`` + EPI displacement along y) in the
  truth brain, in T2w voxels, for the rigid stage alone and rigid + phase-encode stage;
* tissue probabilities of the registered T1 map, Dice at 80 % against the true fractions.

The MRF-space T1 map is a stand-in for the matching output, built from the phantom's MRF-space truth:
partial-volume voxels mix in R1 (1/T1 = sum_k f_k / T1_k; the dominant component keeps its true,
spatially varying T1, the others take their subject median), plus 3 % Gaussian noise. It carries
the true EPI distortion and motion. Using it keeps this test independent of the (separately tested)
matching stage and fast; the brain mask is the pipeline's own (``series_brain_mask`` of the raw MRF
series, moved with the registration), the lesion mask is the simulated manual one from FLAIR.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "2"

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from phantomgrids import DEMO_SLAB  # noqa: E402

from mrflesion import registration as reg  # noqa: E402
from mrflesion.masking import series_brain_mask  # noqa: E402
from mrflesion.phantom import generate  # noqa: E402
from mrflesion.phantom.fields import undo_displacement  # noqa: E402
from mrflesion.steps import registration as reg_steps  # noqa: E402
from mrflesion.steps import tissue as tissue_steps  # noqa: E402

pytestmark = pytest.mark.slow

def surrogate_t1(truth_dir: Path, sub: str, rng: np.random.Generator, noise: float = 0.03) -> nib.Nifti1Image:
    """Matching-like T1 map in MRF space from the truth (see the module docstring)."""
    def load(s: str) -> np.ndarray:
        return nib.load(truth_dir / f"{sub}_space-MRF_{s}.nii.gz").get_fdata()

    t1_true = load("T1map")
    fr = {k: load(f"label-{k}_probseg") for k in ("GM", "WM", "CSF", "lesion")}
    fr["WM"] = np.clip(fr["WM"] - fr["lesion"], 0.0, None)  # the WM fraction includes lesion tissue
    comps = ("lesion", "WM", "GM", "CSF")
    stack = np.stack([fr[c] for c in comps])
    dom, tot = np.argmax(stack, 0), stack.sum(0)
    r1 = np.zeros(t1_true.shape)
    wm_median = np.median(t1_true[(dom == 1) & (fr["WM"] > 0.9) & (t1_true > 0)])
    for i, c in enumerate(comps):
        pure = (dom == i) & (fr[c] > 0.9) & (t1_true > 0)
        med = np.median(t1_true[pure]) if pure.sum() > 10 else 1.5 * wm_median
        r1 += fr[c] / np.where((dom == i) & (t1_true > 0), t1_true, med)
    t1 = np.where(tot > 0.3, tot / np.maximum(r1, 1e-12), 0.0)
    t1 = np.where(t1 > 0, t1 * (1 + noise * rng.standard_normal(t1.shape)), 0.0)
    img = nib.load(truth_dir / f"{sub}_space-MRF_T1map.nii.gz")
    return nib.Nifti1Image(t1.astype(np.float32), img.affine)


def true_t2w_to_mrf(truth_dir: Path, sub: str, t2w: nib.Nifti1Image) -> np.ndarray:
    """MRF world point of every T2w voxel: solve p + d(p) e_y = Inverse @ q (fixed point)."""
    minv = np.asarray(json.loads((truth_dir / f"{sub}_from-MRF_to-T2w_mode-image_xfm.json").read_text())["Inverse"])
    dimg = nib.load(truth_dir / f"{sub}_space-MRF_desc-pedisplacement_xfm.nii.gz")
    ijk = np.stack(np.indices(t2w.shape[:3], dtype=float), -1)
    q = ijk @ t2w.affine[:3, :3].T + t2w.affine[:3, 3]
    return undo_displacement(q @ minv[:3, :3].T + minv[:3, 3], dimg.get_fdata(), dimg.affine)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.sum(a & b) / max(a.sum() + b.sum(), 1))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("anat")
    table = generate(base / "bids", n_subjects=3, n_sites=2, seed=11, n_jobs=2, progress=False,
                     _grid_override=DEMO_SLAB)
    results = {}
    for row in table.itertuples():
        sub = row.participant_id
        raw, truth = base / "bids" / sub / "anat", base / "bids" / "derivatives" / "truth" / sub / "anat"
        manual = base / "bids" / "derivatives" / "manual" / sub / "anat"
        out = base / "out" / sub / "anat"
        out.mkdir(parents=True)
        mrf = raw / f"{sub}_acq-MRFEPI_MRF.nii.gz"
        mimg = nib.load(mrf)
        t1_path = out / f"{sub}_acq-MRFEPI_T1map.nii.gz"
        nib.save(surrogate_t1(truth, sub, np.random.default_rng(row.Index)), t1_path)
        mask_path = out / f"{sub}_acq-MRFEPI_desc-brain_mask.nii.gz"
        nib.save(nib.Nifti1Image(series_brain_mask(np.asarray(mimg.dataobj, np.float32)).astype(np.uint8),
                                 mimg.affine), mask_path)
        maps = {"T1": str(t1_path), "T2star": str(truth / f"{sub}_space-MRF_T2starmap.nii.gz"),
                "B1": str(truth / f"{sub}_space-MRF_TB1map.nii.gz"), "M0": str(truth / f"{sub}_space-MRF_M0map.nii.gz")}
        stem = str(out / sub)
        o = {"rigid": f"{stem}_from-MRF_to-T2w_mode-image_desc-rigid_xfm.mat",
             "warp": f"{stem}_from-MRF_to-T2w_mode-image_desc-pewarp_xfm.nii.gz",
             "inverse_warp": f"{stem}_from-T2w_to-MRF_mode-image_desc-pewarp_xfm.nii.gz",
             "T1": f"{stem}_acq-MRFEPI_space-T2w_T1map.nii.gz",
             "T2star": f"{stem}_acq-MRFEPI_space-T2w_T2starmap.nii.gz",
             "B1": f"{stem}_acq-MRFEPI_space-T2w_TB1map.nii.gz",
             "M0": f"{stem}_acq-MRFEPI_space-T2w_M0map.nii.gz",
             "MRF": f"{stem}_acq-MRFEPI_space-T2w_MRF.nii.gz", "mask": f"{stem}_space-T2w_desc-brain_mask.nii.gz"}
        t2w = str(raw / f"{sub}_T2w.nii.gz")
        t0 = time.perf_counter()
        r = reg_steps.register_mrf_to_t2w(maps, str(mrf), str(mask_path), t2w, o, phase_encode_stage=True,
                                           threads=1)  # as in the rule: reproducible
        t_reg = time.perf_counter() - t0
        t0 = time.perf_counter()
        fl = reg_steps.register_flair_lesion(str(raw / f"{sub}_FLAIR.nii.gz"),
                                              str(manual / f"{sub}_space-FLAIR_label-lesion_mask.nii.gz"), t2w,
                                              f"{stem}_from-FLAIR_to-T2w_mode-image_xfm.mat",
                                              f"{stem}_space-T2w_label-lesion_mask.nii.gz", threads=1)
        t_flair = time.perf_counter() - t0
        t0 = time.perf_counter()
        probs = {k: f"{stem}_space-T2w_label-{k}_probseg.nii.gz" for k in ("GM", "WM", "CSF", "NAWM")}
        tis = tissue_steps.tissue_maps(o["T1"], o["mask"], f"{stem}_space-T2w_label-lesion_mask.nii.gz", probs,
                                     threads=1)
        t_tis = time.perf_counter() - t0
        results[sub] = {"site": row.site, "group": row.group, "raw": raw, "truth": truth, "out": o,
                        "t1_mrf": t1_path, "reg": r["result"], "flair": fl, "probs": probs, "tissue": tis,
                        "seconds": {"register_mrf": t_reg, "register_flair": t_flair, "tissue": t_tis}}
    return results


def test_registration_residual(cohort: dict) -> None:
    lines = []
    for sub, c in cohort.items():
        t2w = nib.load(c["raw"] / f"{sub}_T2w.nii.gz")
        truth = true_t2w_to_mrf(c["truth"], sub, t2w)
        brain = nib.load(c["truth"] / f"{sub}_space-T2w_desc-brain_mask.nii.gz").get_fdata() > 0
        kw = dict(reference_t2w=t2w, moving_reference=c["t1_mrf"], mask=brain)
        rigid = reg.residual_displacement(truth, c["reg"], rigid_only=True, **kw)
        pe = reg.residual_displacement(truth, c["reg"], rigid_only=False, **kw)
        ijk = np.stack(np.indices(t2w.shape, dtype=float), -1)
        q = ijk @ t2w.affine[:3, :3].T + t2w.affine[:3, 3]
        none = np.linalg.norm(((truth - q) / np.asarray(t2w.header.get_zooms()[:3]))[brain], axis=-1).mean()
        lines.append(f"{sub} ({c['site']}, {c['group']}): residual [T2w voxels] none {none:.3f}, "
                     f"rigid {rigid['mean_vox']:.3f} (PE axis {rigid['mean_axis1_vox']:.3f}), rigid+PE "
                     f"{pe['mean_vox']:.3f} (PE axis {pe['mean_axis1_vox']:.3f}); "
                     f"seconds {', '.join(f'{k} {v:.1f}' for k, v in c['seconds'].items())}")
        assert pe["mean_vox"] < 0.5, lines[-1]
        assert pe["mean_vox"] < rigid["mean_vox"], lines[-1]
        # the phase-encode stage moves along y only
        field = nib.load(c["out"]["warp"]).get_fdata().squeeze()
        assert np.abs(field[..., 0]).max() < 1e-4 and np.abs(field[..., 2]).max() < 1e-4
    print("\n" + "\n".join(lines))


def test_outputs_in_t2w_space(cohort: dict) -> None:
    for sub, c in cohort.items():
        ref = nib.load(c["raw"] / f"{sub}_T2w.nii.gz")
        for key in ("T1", "T2star", "B1", "M0", "MRF", "mask"):
            img = nib.load(c["out"][key])
            assert img.shape[:3] == ref.shape and np.allclose(img.affine, ref.affine, atol=1e-4), key
            if key != "mask":
                assert float(np.asarray(img.dataobj).min()) >= 0.0, key
        assert nib.load(c["out"]["MRF"]).shape[3] == 35
        # registered T1 map vs the true T2w-space T1 in pure WM / GM (median relative deviation)
        t1 = nib.load(c["out"]["T1"]).get_fdata()
        t1_true = nib.load(c["truth"] / f"{sub}_space-T2w_T1map.nii.gz").get_fdata()
        for k in ("WM", "GM"):
            pure = nib.load(c["truth"] / f"{sub}_space-T2w_label-{k}_probseg.nii.gz").get_fdata() > 0.95
            assert abs(np.median(t1[pure] / t1_true[pure]) - 1) < 0.05, (sub, k)
        # manual lesion mask (FLAIR) -> T2w: overlaps the true lesions in patients, empty in controls
        les = np.asarray(nib.load(str(c["out"]["mask"]).replace("desc-brain_mask", "label-lesion_mask")).dataobj) > 0
        true_les = nib.load(c["truth"] / f"{sub}_space-T2w_label-lesion_mask.nii.gz").get_fdata() > 0
        if c["group"] == "control":
            assert les.sum() == 0
        else:
            assert dice(les, true_les) > 0.5, (sub, dice(les, true_les))
            nawm = nib.load(c["probs"]["NAWM"]).get_fdata()
            assert nawm[les].max() == 0


def test_tissue_dice_both_sites(cohort: dict) -> None:
    lines, failures = [], []
    for sub, c in cohort.items():
        d = {}
        for k in ("GM", "WM", "CSF"):
            est = nib.load(c["probs"][k]).get_fdata()
            tru = nib.load(c["truth"] / f"{sub}_space-T2w_label-{k}_probseg.nii.gz").get_fdata()
            d[k] = dice(est > 0.8, tru > 0.8)
        lines.append(f"{sub} ({c['site']}, {c['group']}): Dice@80% WM {d['WM']:.3f} GM {d['GM']:.3f} "
                     f"CSF {d['CSF']:.3f}")
        if d["WM"] < 0.90 or d["GM"] < 0.85:
            failures.append(lines[-1])
    print("\n" + "\n".join(lines))
    assert {c["site"] for c in cohort.values()} == {"site1", "site2"}
    assert not failures, failures
