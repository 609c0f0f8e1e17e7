"""Rule body of the registration stage: the MRF maps and series, the FLAIR image and the lesion mask
into T2w space.

Outputs (BIDS derivatives, ``<stem>`` = ``sub-X[/ses-Y]/anat/sub-X[_ses-Y]``):

* ``<stem>_from-MRF_to-T2w_mode-image_desc-rigid_xfm.mat`` (ANTs/ITK rigid),
  ``..._desc-pewarp_xfm.nii.gz`` and ``<stem>_from-T2w_to-MRF_mode-image_desc-pewarp_xfm.nii.gz``
  (phase-encode warp and its inverse, only with ``registration.phase_encode_stage``), and
  ``<stem>_from-MRF_to-T2w_mode-image_xfm.json`` listing the transform files actually used for the
  maps and for the MRF series;
* ``<stem>_acq-MRFEPI_space-T2w_{T1map,T2starmap,TB1map,M0map}.nii.gz`` (full transform, B-spline,
  clipped at 0), ``<stem>_acq-MRFEPI_space-T2w_MRF.nii.gz`` (raw MRF series, rigid only unless
  ``registration.mrf_full_transform``), ``<stem>_space-T2w_desc-brain_mask.nii.gz`` (the MRF brain
  mask, full transform);
* ``<stem>_from-FLAIR_to-T2w_mode-image_xfm.mat``, ``<stem>_space-T2w_label-lesion_mask.nii.gz`` and
  ``<stem>_space-T2w_FLAIR.nii.gz`` (the FLAIR image, B-spline: the reports' lesion underlay).

Every NIfTI gets a JSON sidecar with Description, Units, Sources and ``TimingsSeconds``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ..io import write_derivative, write_json
from ..layout import sidecar_path, stem_of_path
from . import reads, rounded_timings

MAP_KEYS = ("T1", "T2star", "B1", "M0")
MAP_UNITS = {"T1": "ms", "T2star": "ms", "B1": "1 (scale of the nominal flip angle)", "M0": "arbitrary"}


def register_mrf_to_t2w(
    maps: dict[str, str],
    mrf: str,
    mrf_mask: str,
    t2w: str,
    out: dict[str, str],
    phase_encode_stage: bool = True,
    mrf_full_transform: bool = False,
    threads: int = 2,
    resample_threads: int | None = None,
) -> dict[str, Any]:
    """T1 map (MRF space) -> T2w, then resample the maps, the MRF series and the brain mask.

    ``maps``: MRF-space maps by key (``T1``, ``T2star``, ``B1``, ``M0``); ``out``: output paths by
    key (``rigid``, ``xfm_json``, ``warp``/``inverse_warp`` with the PE stage, the map keys, ``MRF``,
    ``mask``). Transforms are written under the names :mod:`mrflesion.registration` uses, derived
    from ``out["rigid"]``. ANTs runs with ``threads``; the B-spline resampling of the series and maps
    (one sampling map for all of them: :func:`mrflesion.registration.resample_bspline`) with
    ``resample_threads`` (default ``threads``). Returns the per-step timings (seconds) and the result.
    """
    import tempfile

    import nibabel as nib
    import numpy as np

    from ..registration import apply_to_t2w, mask_to_t2w, register_t1_to_t2w, sampling_coordinates, uncompressed

    prefix = stem_of_path(out["rigid"], "register", "rigid")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    res = register_t1_to_t2w(maps["T1"], t2w, prefix, phase_encode_stage=phase_encode_stage,
                             threads=threads)
    timings.update({f"register_{k}": v for k, v in res.timings.items()})
    timings["register"] = time.perf_counter() - t0
    if phase_encode_stage:
        for key, path in (("warp", res.warp), ("inverse_warp", res.inverse_warp)):
            if key in out and Path(out[key]).resolve() != Path(path).resolve():  # type: ignore[arg-type]
                raise ValueError(f"{key} written to {path}, expected {out[key]}")
    n_threads = threads if resample_threads is None else int(resample_threads)
    with tempfile.TemporaryDirectory(prefix="mrflesion_apply_") as folder:
        app = uncompressed(res, folder)
        t0 = time.perf_counter()
        moving, ref = nib.load(maps["T1"]), nib.load(t2w)
        coords = sampling_coordinates(moving.shape, moving.affine, app.transforms(), ref.shape, ref.affine)
        timings["apply_coordinates"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        series = nib.load(mrf)
        same_grid = series.shape[:3] == moving.shape[:3] and np.allclose(series.affine, moving.affine)
        apply_to_t2w(series, app, t2w, out["MRF"], interpolation="bSpline", rigid_only=not mrf_full_transform,
                     clip_negative=True, threads=n_threads,
                     coords=coords if mrf_full_transform and same_grid else None)
        timings["apply_MRF"] = time.perf_counter() - t0
        for key in MAP_KEYS:
            t0 = time.perf_counter()
            apply_to_t2w(maps[key], app, t2w, out[key], interpolation="bSpline", rigid_only=False,
                         clip_negative=True, threads=n_threads, coords=coords)
            timings[f"apply_{key}"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        mask = mask_to_t2w(mrf_mask, app, t2w, None, threshold=0.5, threads=threads)
        write_derivative(out["mask"], mask, t2w, dtype="uint8")
        timings["apply_mask"] = time.perf_counter() - t0
    return {"result": res, "timings": timings, "mask_voxels": int(mask.sum())}


def register_both(mrf: dict[str, Any], flair: dict[str, Any], parallel: bool = True
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """:func:`register_mrf_to_t2w` (``**mrf``) and :func:`register_flair_lesion` (``**flair``), each with
    single-threaded ANTs (reproducible run to run); with ``parallel`` the FLAIR registration runs in a
    forked process beside the MRF one (two cores, the same results as one after the other), and the
    MRF resampling, which starts when the FLAIR side is done, uses both cores."""
    mrf, flair = {**mrf, "threads": 1}, {**flair, "threads": 1}
    if not parallel:
        return register_mrf_to_t2w(**mrf), register_flair_lesion(**flair)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        pending = pool.submit(register_flair_lesion, **flair)
        info_mrf = register_mrf_to_t2w(**mrf, resample_threads=2)
        return info_mrf, pending.result()


def register(smk: Any) -> None:
    """Rule ``register``: the MRF maps, series and brain mask (:func:`register_mrf`) and the FLAIR image
    and its transform (:func:`register_flair`) in T2w space; side by side with two threads
    (:func:`register_both`: single-threaded ANTs in each, the same results as one after the other)."""
    info_mrf, info_flair = register_both(_mrf_args(smk), _flair_args(smk), parallel=int(smk.threads) >= 2)
    register_mrf(smk, info_mrf)
    register_flair(smk, info_flair)


def _mrf_args(smk: Any) -> dict[str, Any]:
    cfg = smk.params.cfg
    f = reads(smk)
    return {"maps": {k: f[k] for k in MAP_KEYS}, "mrf": f["mrf"], "mrf_mask": f["mask"], "t2w": f["t2w"],
            "out": {k: smk.output[k] for k in smk.output.keys() if k not in ("flair_xfm", "lesion", "flair")},
            "phase_encode_stage": bool(cfg["phase_encode_stage"]),
            "mrf_full_transform": bool(cfg["mrf_full_transform"]), "threads": 1}


def _flair_args(smk: Any) -> dict[str, Any]:
    return {"flair": smk.input.flair, "lesion": None, "t2w": smk.input.t2w,
            "out_xfm": smk.output.flair_xfm, "out_lesion": None, "out_flair": smk.output.flair,
            "threads": 1}


def register_mrf(smk: Any, info: dict[str, Any] | None = None) -> None:
    """Transforms, maps, MRF series and brain mask in T2w space (part of rule ``register``); ``info``:
    the result of :func:`register_mrf_to_t2w` when already run (else it runs here)."""
    cfg = smk.params.cfg
    pe = bool(cfg["phase_encode_stage"])
    full = bool(cfg["mrf_full_transform"])
    f = reads(smk)
    if info is None:
        info = register_mrf_to_t2w(**_mrf_args(smk))
    res, timings = info["result"], rounded_timings(info["timings"])
    full_list = [os.fspath(p) for p in res.transforms(rigid_only=False)]
    mrf_list = [os.fspath(p) for p in res.transforms(rigid_only=not full)]
    write_json(smk.output.xfm_json, {
        "Description": "Registration of the MRF-EPI T1 map to the T2w image (ANTs, antspyx): rigid "
                       "(Mattes MI)" + (", then SyN restricted to the phase-encode axis" if pe else ""),
        "Sources": [f["T1"], f["t2w"]],
        "Convention": "ANTs transform lists (apply in the order given, warp first): map T2w points to "
                      "MRF points, i.e. ants.apply_transforms(fixed=T2w, moving=MRF-space image, "
                      "transformlist=...).",
        "PhaseEncodeStage": pe,
        "MapTransforms": full_list,
        "MRFSeriesTransforms": mrf_list,
        "InverseWarp": None if res.inverse_warp is None else os.fspath(res.inverse_warp),
        "Interpolation": "BSpline",
        "TimingsSeconds": timings,
    })
    xfm_common = {"Sources": [f["T1"], f["t2w"]], "TimingsSeconds": timings}
    write_json(sidecar_path(smk.output.rigid), {
        "Description": "Rigid MRF -> T2w transform (ITK/ANTs .mat; maps T2w points to MRF points)",
        "Units": "mm", **xfm_common})
    if pe:
        write_json(sidecar_path(smk.output.warp), {
            "Description": "Displacement field (phase-encode component only) on the T2w grid, applied "
                           "before the rigid transform (EPI distortion correction)",
            "Units": "mm", **xfm_common})
        write_json(sidecar_path(smk.output.inverse_warp), {
            "Description": "Inverse of the phase-encode warp (T2w -> MRF direction)", "Units": "mm",
            **xfm_common})
    for key in MAP_KEYS:
        write_json(sidecar_path(smk.output[key]), {
            "Description": f"MRF {key} map resampled into T2w space (full transform, B-spline, "
                           "clipped at 0)",
            "Units": MAP_UNITS[key], "Sources": [f[key], f["t2w"], *full_list],
            "Interpolation": "BSpline", "TimingsSeconds": timings})
    write_json(sidecar_path(smk.output.MRF), {
        "Description": "Raw MRF-EPI series resampled into T2w space ("
                       + ("full transform" if full else "rigid part only: the EPI distortion is kept")
                       + ", B-spline, clipped at 0); network input",
        "Units": "arbitrary", "Sources": [f["mrf"], f["t2w"], *mrf_list],
        "Interpolation": "BSpline", "TimingsSeconds": timings})
    write_json(sidecar_path(smk.output.mask), {
        "Type": "Brain", "Description": "MRF brain mask resampled into T2w space (full transform, "
                                        "linear, >= 0.5)",
        "Units": "1", "Sources": [f["mask"], f["t2w"], *full_list],
        "Voxels": info["mask_voxels"], "TimingsSeconds": timings})
    print(f"register_mrf: {timings}")


def register_flair_lesion(flair: str, lesion: str | None, t2w: str, out_xfm: str, out_lesion: str | None,
                          threads: int = 2, out_flair: str | None = None) -> dict[str, Any]:
    """FLAIR -> T2w rigid registration; with ``lesion``, the FLAIR-space lesion mask into T2w space
    (:func:`lesion_to_t2w`) and, with ``out_flair``, the FLAIR image itself (B-spline, clipped at 0: the
    underlay of the reports' lesion overlays). The rule ``register`` runs it without the mask, which
    rule ``register_lesion`` maps where there is one."""
    import numpy as np

    from ..registration import image_to_t2w, register_flair_to_t2w

    timings: dict[str, float] = {}
    out_xfm = os.fspath(out_xfm)
    t0 = time.perf_counter()
    res = register_flair_to_t2w(flair, t2w, stem_of_path(out_xfm, "register", "flair_xfm"), threads=threads)
    os.replace(res.rigid, out_xfm)
    res.rigid = Path(out_xfm)
    timings["register"] = time.perf_counter() - t0
    voxels = None
    if lesion is not None and out_lesion is not None:
        t0 = time.perf_counter()
        voxels = lesion_to_t2w(lesion, out_xfm, t2w, out_lesion, threads)
        timings["apply_lesion"] = time.perf_counter() - t0
    if out_flair is not None:
        t0 = time.perf_counter()
        img = np.clip(image_to_t2w(flair, res, t2w, "bSpline", threads), 0.0, None)
        write_derivative(out_flair, img, t2w, dtype="float32")
        timings["apply_flair"] = time.perf_counter() - t0
    return {"result": res, "timings": timings, "lesion_voxels": voxels}


def lesion_to_t2w(lesion: str, flair_xfm: str, t2w: str, out: str, threads: int = 1) -> int:
    """The manual lesion mask (FLAIR grid) into T2w space with the rigid FLAIR -> T2w transform ``flair_xfm``:
    linear interpolation of the 0/1 mask, then >= 0.5 (uint8), with its sidecar; returns the number of
    lesion voxels."""
    from ..registration import RegistrationResult, mask_to_t2w

    t0 = time.perf_counter()
    res = RegistrationResult(rigid=Path(flair_xfm), source="FLAIR")
    m = mask_to_t2w(lesion, res, t2w, None, threshold=0.5, threads=threads)
    write_derivative(out, m, t2w, dtype="uint8", sidecar={
        "Type": "Lesion", "Description": "Manual lesion mask (FLAIR space) resampled into T2w space "
                                         "(rigid, linear interpolation, >= 0.5)",
        "Units": "1", "Sources": [str(lesion), str(flair_xfm), str(t2w)], "Voxels": int(m.sum()),
        "TimingsSeconds": {"apply_lesion": round(time.perf_counter() - t0, 3)}})
    return int(m.sum())


def register_lesion(smk: Any) -> None:
    """Rule ``register_lesion``: the manual lesion mask in T2w space, for the subjects that have one (the
    training targets and the evaluation's reference; apply mode may lack it)."""
    voxels = lesion_to_t2w(smk.input.lesion, smk.input.flair_xfm, smk.input.t2w, smk.output[0], int(smk.threads))
    print(f"register_lesion: {voxels} voxels")


def register_flair(smk: Any, info: dict[str, Any] | None = None) -> None:
    """FLAIR transform and the FLAIR image in T2w space (part of rule ``register``); ``info``: the
    result of :func:`register_flair_lesion` when already run (else it runs here)."""
    if info is None:
        info = register_flair_lesion(**_flair_args(smk))
    timings = rounded_timings(info["timings"])
    write_json(sidecar_path(smk.output.flair_xfm), {
        "Description": "Rigid FLAIR -> T2w transform (ANTs Mattes MI; ITK .mat, maps T2w points to "
                       "FLAIR points)",
        "Units": "mm", "Sources": [smk.input.flair, smk.input.t2w], "TimingsSeconds": timings})
    write_json(sidecar_path(smk.output.flair), {
        "Description": "FLAIR image resampled into T2w space (rigid, B-spline, clipped at 0)",
        "Units": "arbitrary", "Sources": [smk.input.flair, smk.input.t2w, smk.output.flair_xfm],
        "TimingsSeconds": timings})
    print(f"register_flair: {timings}")
