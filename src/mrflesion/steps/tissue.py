"""Rule body of the tissue stage (rule ``tissue``): SPM-style GM / WM / CSF / NAWM probabilities of the
T2w-space T1 map (``<stem>_space-T2w_label-{GM,WM,CSF,NAWM}_probseg.nii.gz``, 0-1), then the classical
lesion baseline (``<stem>_space-T2w_label-lesion_desc-baseline_probseg.nii.gz``) from them and the
T1/T2* maps."""

from __future__ import annotations

import time
from typing import Any

from ..io import write_derivative
from ..learn.spec import PRIOR_NAMES
from . import reads, rounded_timings


def tissue_maps(t1map: str, brain_mask: str | None, lesion: str | None, out: dict[str, str],
                method: str = "em", prior_fwhm_mm: float = 6.0, threads: int = 2) -> dict[str, Any]:
    """GM / WM / CSF / NAWM probabilities (0-1) of a T2w-space T1 map (:func:`mrflesion.tissue.segment`,
    NAWM: :func:`mrflesion.tissue.nawm` outside ``lesion``); writes ``out[GM|WM|CSF|NAWM]`` (float32, the
    T1 map's grid), the registered priors ``out[GMprior|WMprior|CSFprior]`` where ``out`` names them, and
    their sidecars. Returns the timings (seconds), the fit and the brain-mask size."""
    import nibabel as nib
    import numpy as np

    from ..tissue import TISSUES, nawm, segment

    timings: dict[str, float] = {}
    info: dict[str, Any] = {}
    bm = None if brain_mask is None else np.asarray(nib.load(brain_mask).dataobj) > 0
    probs = segment(t1map, brain_mask=bm, image_kind="T1map", threads=threads, method=method,  # type: ignore[arg-type]
                    prior_fwhm_mm=float(prior_fwhm_mm), timings=timings, info=info)
    t0 = time.perf_counter()
    les = None if lesion is None else np.asarray(nib.load(lesion).dataobj) > 0
    maps = {k: probs[k] for k in TISSUES}
    maps["NAWM"] = nawm(probs["WM"], les)
    maps.update({f"{k}prior": probs[f"{k}prior"] for k in TISSUES if f"{k}prior" in out})
    mask_voxels = int(probs["mask"].sum())
    fit = {k: v for k, v in info.items() if isinstance(v, str | int | float | list | dict)}
    sources = [t1map, *([] if brain_mask is None else [brain_mask]), "nilearn:MNI152 2009 GM/WM/brain mask (priors)"]
    for k in maps:
        desc = (f"{k} probability (posterior expected tissue fraction) from the T2w-space T1 map: "
                f"MNI152 priors (FWHM {prior_fwhm_mm} mm) + {method} mixture with "
                "partial-volume classes and bias field")
        src = sources
        if k.endswith("prior"):
            desc = (f"MNI152 2009 {k.removesuffix('prior')} prior (smoothed, FWHM {prior_fwhm_mm} mm) registered "
                    "to the T2w-space T1 map (affine + SyN): the prior of the tissue segmentation, an input "
                    "of the networks that read priors")
            src = sources[:1] + sources[-1:]
        elif k == "NAWM":
            desc = ("Normal-appearing WM: WM probability, 0 inside the T2w-space lesion mask" if lesion is not None
                    else "WM probability: no manual lesion mask, lesions not excluded")
            src = [*sources, *([] if lesion is None else [lesion])]
        write_derivative(out[k], maps[k], t1map, dtype="float32", sidecar={
            "Description": desc, "Units": "1 (fraction, 0-1)", "Sources": src, "Method": str(method), "Fit": fit,
            "MaskVoxels": mask_voxels, "TimingsSeconds": rounded_timings(timings)})
    timings["write"] = time.perf_counter() - t0
    return {"timings": timings, "info": info, "mask_voxels": mask_voxels}


def tissue(smk: Any) -> None:
    """Rule ``tissue``: SPM-style tissue probabilities in T2w space, then the classical lesion baseline."""
    cfg = smk.params.cfg
    f = reads(smk)
    out = {k: smk.output[k] for k in ("GM", "WM", "CSF", "NAWM", *PRIOR_NAMES)}
    res = tissue_maps(f["T1"], f["mask"], f.get("lesion"), out, method=str(cfg["method"]),
                      prior_fwhm_mm=cfg["prior_fwhm_mm"], threads=int(smk.threads))
    print(f"tissue: {rounded_timings(res['timings'])}")
    baseline_map(f["T1"], f["T2star"], {k: out[k] for k in ("WM", "GM", "CSF")}, f["mask"], smk.output.baseline)


def baseline_map(t1: str, t2star: str, tissue: dict[str, str], mask: str, out: str) -> dict[str, Any]:
    """The classical lesion baseline (:func:`mrflesion.baseline.lesion_probability`) of one subject in
    T2w space, with its sidecar."""
    import nibabel as nib
    import numpy as np

    from ..baseline import lesion_probability

    t0 = time.perf_counter()
    img = nib.load(t1)
    arr = {k: np.asarray(nib.load(v).dataobj, dtype=np.float32) for k, v in tissue.items()}
    prob = lesion_probability(np.asarray(img.dataobj, dtype=np.float32),
                              np.asarray(nib.load(t2star).dataobj, dtype=np.float32),
                              arr["WM"], arr["GM"], arr["CSF"], np.asarray(nib.load(mask).dataobj) > 0,
                              img.header.get_zooms()[:3])
    seconds = round(time.perf_counter() - t0, 3)
    write_derivative(out, prob, img, dtype="float32", sidecar={
        "Description": "Classical lesion baseline (no deep learning): outliers of log T1 and log T2* against "
                       "the subject's confident white matter, inside the white-matter territory "
                       "(mrflesion.baseline); never reads the manual mask",
        "Units": "1 (probability)", "Sources": [t1, t2star, *tissue.values(), mask],
        "TimingsSeconds": {"baseline": seconds}})
    print(f"baseline: {seconds} s, {int((prob >= 0.33).sum())} voxels >= 0.33")
    return {"seconds": seconds}
