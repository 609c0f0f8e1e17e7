"""Benchmark: the conventional chain of one phantom subject on the paper grid (240 x 240 x 47, 1 x 1 x 2 mm).

Generates a two-subject paper-grid phantom (site1: a control and a patient; the patient is timed), then
runs the package functions the workflow's rules call, in the rules' order, and prints each stage's wall
time and the accuracy it reaches against the phantom's truth:

* input check (``validate.check_subject``), brain mask (``masking.series_brain_mask``), MPPCA
  (``denoise.denoise_file``), dictionary (all slice positions, built once per sequence timing: reported
  apart, excluded from the chain's total), matching (``matching.match_file``, config defaults);
* registration (``steps.registration.register_mrf_to_t2w`` and ``register_flair_lesion``, as the
  ``register`` rule runs them: side by side in two processes with ``--threads 2``, one after the other
  with ``--threads 1``; ANTs single-threaded either way), tissue (``steps.tissue.tissue_maps`` and the
  classical baseline, as the ``tissue`` rule);
* accuracy: median relative T1 / T2* error of the registered maps in pure WM / GM (truth fraction
  > 0.95) in T2w space; residual displacement of the T2w -> MRF mapping (rigid + phase-encode warp)
  and of the T2w -> FLAIR mapping against the truth, mean in T2w voxels, in the truth brain; the
  manual lesion mask's Dice in T2w space with the true lesions; tissue Dice at 80 % (WM, GM, CSF).

    .venv/bin/python benchmarks/bench_papergrid.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from mrflesion import registration as reg
from mrflesion.denoise import denoise_file
from mrflesion.masking import series_brain_mask
from mrflesion.mrf.dictionary import DictionaryGrid, build_dictionary
from mrflesion.mrf.matching import match_file
from mrflesion.mrf.sequence import Protocol
from mrflesion.phantom import generate
from mrflesion.phantom.fields import undo_displacement
from mrflesion.steps import registration as reg_steps
from mrflesion.steps import tissue as tissue_steps
from mrflesion.validate import check_subject

SUB = "sub-02"  # the patient of a two-subject site1 cohort (sub-01 is the control)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (all threads)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def true_t2w_to_moving(truth: Path, t2w: nib.Nifti1Image, xfm: str, displacement: bool) -> np.ndarray:
    """Moving-space world point of every T2w voxel: the inverse rigid motion, then (MRF) the EPI
    displacement along y, solved as p + d(p) e_y = Inverse @ q by fixed-point iteration."""
    minv = np.asarray(json.loads((truth / f"{SUB}_{xfm}_mode-image_xfm.json").read_text())["Inverse"])
    ijk = np.stack(np.indices(t2w.shape[:3], dtype=float), -1)
    q = ijk @ t2w.affine[:3, :3].T + t2w.affine[:3, 3]
    target = q @ minv[:3, :3].T + minv[:3, 3]
    if not displacement:
        return target
    dimg = nib.load(truth / f"{SUB}_space-MRF_desc-pedisplacement_xfm.nii.gz")
    return undo_displacement(target, dimg.get_fdata(), dimg.affine)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.sum(a & b) / max(int(a.sum() + b.sum()), 1))


def accuracy(raw: Path, truth: Path, out: dict[str, str], res_mrf: reg.RegistrationResult,
             res_flair: reg.RegistrationResult) -> dict[str, float]:
    t2w = nib.load(raw / f"{SUB}_T2w.nii.gz")
    brain = nib.load(truth / f"{SUB}_space-T2w_desc-brain_mask.nii.gz").get_fdata() > 0
    acc: dict[str, float] = {}
    for key, true_name in (("T1", "T1map"), ("T2star", "T2starmap")):
        est = nib.load(out[key]).get_fdata()
        tru = nib.load(truth / f"{SUB}_space-T2w_{true_name}.nii.gz").get_fdata()
        for k in ("WM", "GM"):
            pure = (nib.load(truth / f"{SUB}_space-T2w_label-{k}_probseg.nii.gz").get_fdata() > 0.95) & (tru > 0)
            acc[f"{key}_{k}_median_rel_err_%"] = 100 * float(np.median(np.abs(est[pure] / tru[pure] - 1)))
    mrf_ref = raw / f"{SUB}_acq-MRFEPI_MRF.nii.gz"
    mrf3 = nib.Nifti1Image(np.zeros(nib.load(mrf_ref).shape[:3], np.float32), nib.load(mrf_ref).affine)
    true_mrf = true_t2w_to_moving(truth, t2w, "from-MRF_to-T2w", displacement=True)
    for name, rigid_only in (("rigid", True), ("rigid+PE", False)):
        r = reg.residual_displacement(true_mrf, res_mrf, t2w, mrf3, mask=brain, rigid_only=rigid_only)
        acc[f"MRF_residual_{name}_mean_vox"] = r["mean_vox"]
    true_flair = true_t2w_to_moving(truth, t2w, "from-FLAIR_to-T2w", displacement=False)
    acc["FLAIR_residual_mean_vox"] = reg.residual_displacement(
        true_flair, res_flair, t2w, raw / f"{SUB}_FLAIR.nii.gz", mask=brain)["mean_vox"]
    les = np.asarray(nib.load(out["lesion"]).dataobj) > 0
    acc["lesion_mask_dice"] = dice(les, nib.load(truth / f"{SUB}_space-T2w_label-lesion_mask.nii.gz").get_fdata() > 0)
    for k in ("WM", "GM", "CSF"):
        est = nib.load(out[f"prob_{k}"]).get_fdata()
        tru = nib.load(truth / f"{SUB}_space-T2w_label-{k}_probseg.nii.gz").get_fdata()
        acc[f"tissue_dice80_{k}"] = dice(est > 0.8, tru > 0.8)
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="cores of the chain (as the rules' threads)")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one, removed)")
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--reuse", action="store_true", help="reuse the phantom and dictionary in --work")
    ap.add_argument("--before", action="store_true",
                    help="the registration schedule before issue 21 (rigid 200x100x50 iterations on 30 %% of the "
                         "voxels, phase-encode SyN 40x20x10 at every resolution), for the accuracy and time it "
                         "replaced")
    args = ap.parse_args()
    if args.before:
        reg.RIGID_SCHEDULE.update(aff_iterations=(200, 100, 50), aff_random_sampling_rate=0.3)
        reg.SYN_LEVEL_ITERATIONS = ((3.0, 40), (1.5, 20), (0.0, 10))  # paper grid: 40, 20, 10
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_papergrid_"))
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}
    a = os.getloadavg()
    print(f"load average before: {a[0]:.2f} {a[1]:.2f} {a[2]:.2f} ({os.cpu_count()} CPUs); threads {args.threads}")
    bids = work / "bids"
    if not (args.reuse and (bids / SUB).exists()):
        t0, c0 = time.perf_counter(), cpu_seconds()
        generate(bids, n_subjects=2, n_sites=1, seed=args.seed, grid="paper", n_jobs=args.threads, progress=False)
        print(f"phantom (2 subjects, paper grid): {time.perf_counter() - t0:.1f} s (not part of the chain)")
    raw, truth = bids / SUB / "anat", bids / "derivatives" / "truth" / SUB / "anat"
    manual = bids / "derivatives" / "manual" / SUB / "anat"
    files = {"mrf": str(raw / f"{SUB}_acq-MRFEPI_MRF.nii.gz"), "t2w": str(raw / f"{SUB}_T2w.nii.gz"),
             "flair": str(raw / f"{SUB}_FLAIR.nii.gz"),
             "lesion": str(manual / f"{SUB}_space-FLAIR_label-lesion_mask.nii.gz")}
    sidecar = str(raw / f"{SUB}_acq-MRFEPI_MRF.json")
    out_dir = work / "out" / SUB / "anat"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    stem = str(out_dir / SUB)

    t0, c0 = time.perf_counter(), cpu_seconds()
    check_subject(SUB, files, sidecar)
    times["input check"] = time.perf_counter() - t0
    cpu["input check"] = cpu_seconds() - c0

    t0, c0 = time.perf_counter(), cpu_seconds()
    mimg = nib.load(files["mrf"])
    mask = series_brain_mask(np.asarray(mimg.dataobj, dtype=np.float32))
    mask_path = f"{stem}_acq-MRFEPI_desc-brain_mask.nii.gz"
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), mimg.affine), mask_path)
    times["mask"] = time.perf_counter() - t0
    cpu["mask"] = cpu_seconds() - c0

    t0, c0 = time.perf_counter(), cpu_seconds()
    den = f"{stem}_acq-MRFEPI_desc-denoised_MRF.nii.gz"
    denoise_file(files["mrf"], den, f"{stem}_acq-MRFEPI_desc-mppca_noisemap.nii.gz", mask_path=mask_path,
                 device="cpu")
    times["MPPCA"] = time.perf_counter() - t0
    cpu["MPPCA"] = cpu_seconds() - c0

    protocol = Protocol.from_sidecar(json.loads(Path(sidecar).read_text()))
    dict_path = work / f"mrfdict_{protocol.timing_key()}.npz"
    if not (args.reuse and dict_path.exists()):
        t0, c0 = time.perf_counter(), cpu_seconds()
        build_dictionary(protocol, DictionaryGrid()).save(dict_path)
        times["dictionary (once per timing)"] = time.perf_counter() - t0
        cpu["dictionary (once per timing)"] = cpu_seconds() - c0

    t0, c0 = time.perf_counter(), cpu_seconds()
    maps = {k: f"{stem}_acq-MRFEPI_{n}.nii.gz" for k, n in
            (("T1", "T1map"), ("T2star", "T2starmap"), ("B1", "TB1map"), ("M0", "M0map"))}
    stats = match_file(den, sidecar, dict_path, {**maps, "quality": f"{stem}_acq-MRFEPI_desc-match_quality.nii.gz"},
                       mask_path=mask_path, mode="svd", device="cpu", threads=args.threads)
    times["matching"] = time.perf_counter() - t0
    cpu["matching"] = cpu_seconds() - c0
    print(f"matching: {stats['voxels']} voxels, {stats['candidates_per_voxel']:.0f} atoms scored per voxel")

    t0, c0 = time.perf_counter(), cpu_seconds()
    xfm = f"{stem}_from-MRF_to-T2w_mode-image"
    o = {"rigid": f"{xfm}_desc-rigid_xfm.mat", "warp": f"{xfm}_desc-pewarp_xfm.nii.gz",
         "inverse_warp": f"{stem}_from-T2w_to-MRF_mode-image_desc-pewarp_xfm.nii.gz",
         **{k: f"{stem}_acq-MRFEPI_space-T2w_{n}.nii.gz" for k, n in
            (("T1", "T1map"), ("T2star", "T2starmap"), ("B1", "TB1map"), ("M0", "M0map"))},
         "MRF": f"{stem}_acq-MRFEPI_space-T2w_MRF.nii.gz", "mask": f"{stem}_space-T2w_desc-brain_mask.nii.gz"}
    flair_out = {"out_xfm": f"{stem}_from-FLAIR_to-T2w_mode-image_xfm.mat",
                 "out_lesion": f"{stem}_space-T2w_label-lesion_mask.nii.gz",
                 "out_flair": f"{stem}_space-T2w_FLAIR.nii.gz"}
    r_mrf, r_flair = reg_steps.register_both(
        {"maps": maps, "mrf": files["mrf"], "mrf_mask": mask_path, "t2w": files["t2w"], "out": o,
         "phase_encode_stage": True, "mrf_full_transform": True},
        {"flair": files["flair"], "lesion": files["lesion"], "t2w": files["t2w"], **flair_out},
        parallel=args.threads >= 2)
    times["registration"] = time.perf_counter() - t0
    cpu["registration"] = cpu_seconds() - c0
    print(f"registration steps (s): MRF {json.dumps({k: round(v, 1) for k, v in r_mrf['timings'].items()})}; "
          f"FLAIR {json.dumps({k: round(v, 1) for k, v in r_flair['timings'].items()})}")

    t0, c0 = time.perf_counter(), cpu_seconds()
    probs = {k: f"{stem}_space-T2w_label-{k}_probseg.nii.gz" for k in ("GM", "WM", "CSF", "NAWM")}
    tissue_steps.tissue_maps(o["T1"], o["mask"], flair_out["out_lesion"], probs, threads=1)
    tissue_steps.baseline_map(o["T1"], o["T2star"], {k: probs[k] for k in ("WM", "GM", "CSF")}, o["mask"],
                            f"{stem}_space-T2w_label-lesion_desc-baseline_probseg.nii.gz")
    times["tissue"] = time.perf_counter() - t0
    cpu["tissue"] = cpu_seconds() - c0

    chain = sum(v for k, v in times.items() if not k.startswith("dictionary"))
    chain_cpu = sum(v for k, v in cpu.items() if not k.startswith("dictionary"))
    print(f"{'stage':34s} {'wall':>8s} {'CPU':>8s}")
    for k, v in times.items():
        print(f"{k:34s} {v:7.1f}s {cpu[k]:7.1f}s")
    print(f"{'conventional chain (no dictionary)':34s} {chain:7.1f}s {chain_cpu:7.1f}s  = {chain / 60:.2f} min wall")
    acc = accuracy(raw, truth, {**o, "lesion": flair_out["out_lesion"], **{f"prob_{k}": v for k, v in probs.items()}},
                   r_mrf["result"], r_flair["result"])
    for k, v in acc.items():
        print(f"  {k:34s} {v:8.3f}")
    a = os.getloadavg()
    print(f"load average after: {a[0]:.2f} {a[1]:.2f} {a[2]:.2f}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
