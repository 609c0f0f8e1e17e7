"""Map accuracy per site with SMS in the phantom and the dictionary (issue 17).

Generates phantom subjects on the demo grid (120 x 120 x 20, 2 x 2 x 3 mm) at both sites (site2: SMS
factor 3, its own slice timing and shorter TR), then runs the chain of the ``qmri`` rule on each: the
timing resolved from the subject's sidecar (:func:`mrflesion.validate.resolve_timing`), one dictionary
per distinct timing (the config's grid; slices of one SMS slot share one), brain mask, MPPCA
denoising, dictionary matching. Prints, per subject, the median relative error of T1 and T2* against
the truth in MRF space over pure-tissue voxels (one tissue >= 90 %, as the evaluation's ``*_mrd_pure``),
per tissue and over all pure voxels.

    .venv/bin/python benchmarks/bench_sms.py --subjects 4 --work /tmp/bench_sms
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from mrflesion.config import load_config
from mrflesion.denoise import denoise_file
from mrflesion.masking import series_brain_mask
from mrflesion.mrf.dictionary import DictionaryGrid, build_dictionary
from mrflesion.mrf.matching import match_file
from mrflesion.phantom import generate
from mrflesion.validate import resolve_timing

ROOT = Path(__file__).resolve().parents[1]
PURE = 0.9


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--inversion", choices=["perfect", "b1"], default="perfect")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=None)
    ap.add_argument("--reuse", action="store_true", help="reuse the phantom in --work")
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_sms_"))
    cfg = load_config(ROOT / "config.yaml")
    stated = {**cfg["mrf_timing"], "InversionEfficiency": args.inversion}
    bids = work / "phantom"
    t0 = time.perf_counter()
    if not (args.reuse and (bids / "participants.tsv").exists()):
        generate(bids, n_subjects=args.subjects, n_sites=2, seed=args.seed, n_jobs=args.threads,
                 progress=False, inversion_efficiency=args.inversion)
    print(f"phantom: {args.subjects} subjects in {time.perf_counter() - t0:.0f} s")
    grid = DictionaryGrid.from_config(cfg["dictionary"]["grid"])
    dictionaries: dict[str, Path] = {}
    rows = []
    for sub_dir in sorted(bids.glob("sub-*")):
        sub = sub_dir.name
        anat = sub_dir / "anat"
        sidecar = anat / f"{sub}_acq-MRFEPI_MRF.json"
        timing = resolve_timing([str(sidecar)], stated)
        p = timing.protocol
        if timing.key not in dictionaries:
            t1 = time.perf_counter()
            d = build_dictionary(p, grid, rank_energy=float(cfg["dictionary"]["rank_energy"]),
                                 n_clusters=int(cfg["dictionary"]["n_clusters"]))
            dictionaries[timing.key] = d.save(work / f"mrfdict_{timing.key}.npz")
            distinct = len({p.timing_representative(k) for k in range(p.n_slices)})
            print(f"dictionary {timing.key}: {p.n_slices} slices, multiband {p.multiband}, {p.n_slots} slots, "
                  f"{distinct} distinct slice timings, {time.perf_counter() - t1:.0f} s")
        out = work / "out" / sub
        out.mkdir(parents=True, exist_ok=True)
        t1 = time.perf_counter()
        img = nib.load(str(anat / f"{sub}_acq-MRFEPI_MRF.nii.gz"))
        mask = series_brain_mask(np.asarray(img.dataobj, dtype=np.float32))
        nib.Nifti1Image(mask.astype(np.uint8), img.affine).to_filename(str(out / "mask.nii.gz"))
        denoise_file(img.get_filename(), out / "den.nii.gz", out / "sigma.nii.gz", mask_path=out / "mask.nii.gz",
                     patch_radius=int(cfg["denoise"]["patch_radius"]), device="cpu")
        resolved = out / "timing.json"
        resolved.write_text(json.dumps(timing.sidecar))
        maps = {k: out / f"{k}.nii.gz" for k in ("T1", "T2star")}
        match_file(out / "den.nii.gz", resolved, dictionaries[timing.key], maps, mask_path=out / "mask.nii.gz",
                   threads=args.threads)
        seconds = time.perf_counter() - t1
        truth = bids / "derivatives" / "truth" / sub / "anat"
        wm = _load(truth / f"{sub}_space-MRF_label-WM_probseg.nii.gz")
        gm = _load(truth / f"{sub}_space-MRF_label-GM_probseg.nii.gz")
        csf = _load(truth / f"{sub}_space-MRF_label-CSF_probseg.nii.gz")
        pure = {"WM": wm >= PURE, "GM": gm >= PURE, "CSF": csf >= PURE}
        site = "site2" if json.loads(sidecar.read_text()).get("MultibandAccelerationFactor", 1) > 1 else "site1"
        row = {"subject": sub, "site": site, "multiband": p.multiband, "seconds": round(seconds, 1)}
        for key, name in (("T1", "T1map"), ("T2star", "T2starmap")):
            est = _load(maps[key])
            tru = _load(truth / f"{sub}_space-MRF_{name}.nii.gz")
            ok = (tru > 0) & mask
            allpure = ok & (pure["WM"] | pure["GM"] | pure["CSF"])
            row[f"{key}_pure_median_err_%"] = round(100 * float(np.median(np.abs(est[allpure] / tru[allpure] - 1))), 2)
            for t, sel in pure.items():
                row[f"{key}_{t}_median_err_%"] = round(
                    100 * float(np.median(np.abs(est[ok & sel] / tru[ok & sel] - 1))), 2)
        row["pure_voxels"] = int((mask & (pure["WM"] | pure["GM"] | pure["CSF"])).sum())
        rows.append(row)
        print(json.dumps(row), flush=True)
    worst = {s: max(max(r["T1_pure_median_err_%"], r["T2star_pure_median_err_%"]) for r in rows if r["site"] == s)
             for s in sorted({r["site"] for r in rows})}
    print("worst pure-tissue median error per site (%):", json.dumps(worst))
    print(f"total {time.perf_counter() - t0:.0f} s; work folder {work} (load average {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
