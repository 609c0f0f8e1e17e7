"""Registration of MRF-space images to the T2-weighted image (and FLAIR to T2w) with ANTs (antspyx).

Method (Hermann et al. 2021, with an optional distortion-correcting extension):

1. Rigid registration of the (EPI-distorted) T1 map to the undistorted T2w image. The two images have
   different contrast, so the metric is Mattes mutual information.
2. Optional deformable stage restricted to the phase-encode (PE) axis: SyN whose displacement field
   has only its PE component non-zero (``restrict_deformation`` "0x1x0"). It corrects the
   EPI distortion of the maps. The MRF series itself normally receives the rigid part only
   (``rigid_only=True``) so that the network learns the distortion correction, as in the method.

Conventions
-----------
* All transforms map *fixed* (T2w) points to *moving* (MRF / FLAIR) points, i.e. they are the
  transforms ``ants.apply_transforms(fixed=T2w, moving=..., transformlist=...)`` needs to bring a
  moving-space image into T2w space. ``RegistrationResult.fwd_transforms`` lists them in ANTs order
  (warp first, rigid last).
* World coordinates in this module's public functions are NIfTI/nibabel RAS+ millimetres (the
  ANTs LPS convention is handled internally).
* File names follow BIDS-derivatives ``xfm`` naming: ``<out_prefix>_from-MRF_to-T2w_mode-image_desc-rigid_xfm.mat``
  (ANTs/ITK affine), ``..._desc-pewarp_xfm.nii.gz`` (displacement field on the T2w grid) and
  ``<out_prefix>_from-T2w_to-MRF_mode-image_desc-pewarp_xfm.nii.gz`` (its inverse).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")

import ants  # noqa: E402

from .io import SERIES_GZIP_LEVEL, write_derivative, write_text  # noqa: E402

PathLike = str | os.PathLike[str]
ImageLike = PathLike | nib.spatialimages.SpatialImage

_RAS2LPS = np.diag([-1.0, -1.0, 1.0])

# Interpolator names accepted by ants.apply_transforms.
_INTERPOLATORS = {
    "bspline": "bSpline",
    "linear": "linear",
    "nearest": "nearestNeighbor",
    "nearestneighbor": "nearestNeighbor",
    "genericlabel": "genericLabel",
    "lanczos": "lanczosWindowedSinc",
    "lanczoswindowedsinc": "lanczosWindowedSinc",
}


def set_threads(threads: int) -> None:
    """Set the ITK/ANTs thread count (environment variable read by ITK's global default)."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(int(threads))


# --------------------------------------------------------------------------------------------------
# nibabel <-> ANTs conversion (no temporary files, works per volume for 4D series)
# --------------------------------------------------------------------------------------------------


def load_image(img: ImageLike) -> nib.spatialimages.SpatialImage:
    """Load a NIfTI path or pass a nibabel image through."""
    if isinstance(img, nib.spatialimages.SpatialImage):
        return img
    return nib.load(os.fspath(img))


def nib_to_ants(data: np.ndarray, affine: np.ndarray) -> ants.ANTsImage:
    """3D array + RAS affine -> ANTsImage (float32) with LPS origin/direction."""
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {data.shape}")
    lin = np.asarray(affine, dtype=float)[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    direction = _RAS2LPS @ (lin / spacing)
    origin = _RAS2LPS @ np.asarray(affine, dtype=float)[:3, 3]
    return ants.from_numpy(
        np.ascontiguousarray(data),
        origin=tuple(float(v) for v in origin),
        spacing=tuple(float(v) for v in spacing),
        direction=direction,
    )


def ants_to_affine(img: ants.ANTsImage) -> np.ndarray:
    """RAS affine of an ANTsImage (inverse of :func:`nib_to_ants`)."""
    direction = np.asarray(img.direction, dtype=float)
    spacing = np.asarray(img.spacing, dtype=float)
    aff = np.eye(4)
    aff[:3, :3] = _RAS2LPS @ direction * spacing
    aff[:3, 3] = _RAS2LPS @ np.asarray(img.origin, dtype=float)
    return aff


def _to_ants(img: ImageLike | ants.ANTsImage) -> ants.ANTsImage:
    if isinstance(img, ants.ANTsImage):
        return img.clone("float")
    nimg = load_image(img)
    data = np.asarray(nimg.dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    return nib_to_ants(data, nimg.affine)


# --------------------------------------------------------------------------------------------------
# Result container
# --------------------------------------------------------------------------------------------------


@dataclass
class RegistrationResult:
    """Transforms from a registration to the T2w image (fixed = T2w).

    ``fwd_transforms`` is the ANTs transform list that maps T2w points to moving-space points,
    i.e. what ``ants.apply_transforms(fixed=T2w, moving=<moving-space image>)`` needs.
    """

    rigid: Path
    warp: Path | None = None
    inverse_warp: Path | None = None
    source: str = "MRF"
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def fwd_transforms(self) -> list[str]:
        """Composite list for forward application (moving -> T2w): warp first, rigid last."""
        return self.transforms(rigid_only=False)

    def transforms(self, rigid_only: bool = False) -> list[str]:
        """Transform list for ``ants.apply_transforms``; ``rigid_only`` drops the PE warp."""
        if rigid_only or self.warp is None:
            return [os.fspath(self.rigid)]
        return [os.fspath(self.warp), os.fspath(self.rigid)]

    @property
    def inv_transforms(self) -> list[str]:
        """T2w -> moving space image transform list (use with ``inv_whichtoinvert``)."""
        out = [os.fspath(self.rigid)]
        if self.inverse_warp is not None:
            out.append(os.fspath(self.inverse_warp))
        return out

    @property
    def inv_whichtoinvert(self) -> list[bool]:
        return [True] + ([False] if self.inverse_warp is not None else [])

    def to_json(self, path: PathLike) -> Path:
        """Write a small JSON description (paths, order, timings)."""
        out = Path(path)
        write_text(out, json.dumps({
            "Source": self.source,
            "Target": "T2w",
            "Rigid": os.fspath(self.rigid),
            "Warp": None if self.warp is None else os.fspath(self.warp),
            "InverseWarp": None if self.inverse_warp is None else os.fspath(self.inverse_warp),
            "ForwardTransforms": self.fwd_transforms,
            "Convention": "ANTs order; maps T2w points to source-space points (resamples source into T2w)",
            "TimingsSeconds": self.timings,
        }, indent=2))
        return out


def _xfm_name(out_prefix: PathLike, src: str, dst: str, desc: str, ext: str) -> Path:
    from .layout import bids

    return Path(bids(stem=os.fspath(out_prefix), from_=src, to=dst, mode="image", desc=desc, suffix="xfm",
                     extension=ext))


def _restrict_vector(fixed: ants.ANTsImage, pe_axis: int) -> tuple[float, ...]:
    """Per-physical-component weights so only the PE axis of the image grid may deform."""
    direction = np.asarray(fixed.direction, dtype=float)
    col = np.abs(direction[:, pe_axis])
    vec = np.where(col >= col.max() - 1e-6, 1.0, 0.0)  # axis-aligned grids: one-hot
    if np.count_nonzero(vec) != 1 or col.max() < 0.99:
        # oblique grid: weight components by the direction cosines (approximate restriction)
        vec = col / col.max()
    return tuple(float(v) for v in vec)


# --------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------


RANDOM_SEED = 20210107  # fixed ANTs sampling seed -> reproducible registrations


def _registration(**kwargs: object) -> dict:
    """ants.registration with a fixed random seed (antspyx passes ``--random-seed`` from its config)."""
    import ants.config as ants_config

    old = ants_config._random_seed
    ants_config._random_seed = RANDOM_SEED
    try:
        return ants.registration(**kwargs)
    finally:
        ants_config._random_seed = old


# Rigid stage: Mattes MI on 15 % of the voxels (regular grid with jitter), three levels. The metric's cost
# grows with the sampled voxels; the full-resolution level refines little after the half-resolution one.
# Paper-grid phantom (benchmarks/bench_papergrid.py, one thread): FLAIR -> T2w 15.0 s, residual 0.076 voxels,
# MRF T1 -> T2w 10.4 s, rigid residual 0.376 (EPI distortion left: the PE stage follows); at 30 % of the
# voxels 19.6 s / 0.082 and 26.1 s / 0.369; at 10 %, 0.091 and 0.392; without the full-resolution level
# (15 %) 9.1 s / 0.087 and 5.7 s / 0.377.
RIGID_SCHEDULE: dict[str, object] = {
    "aff_random_sampling_rate": 0.15,
    "aff_iterations": (200, 100, 10),
    "aff_shrink_factors": (4, 2, 1),
    "aff_smoothing_sigmas": (2, 1, 0),
}
# Phase-encode SyN: three levels (shrink 4, 2, 1), their iterations set by the level's in-plane voxel size:
# SYN_LEVEL_ITERATIONS gives (smallest voxel in mm, iterations) from coarse to fine; a level finer than the
# last entry does not iterate. On the 2 mm demo grid the levels (8, 4, 2 mm) run 40, 20, 10 iterations;
# on the 1 mm paper grid (4, 2, 1 mm) 20, 10 and none. A 1 mm iteration costs ~6 s there and adds little
# (the smooth field, flow sigma 4 voxels, is then the upsampled 2 mm one); paper-grid phantom
# (bench_papergrid.py, one thread): 20, 10, 0 iterations 21 s, mean residual 0.333 T2w voxels;
# 40, 20, 0 31 s, 0.325; 40, 20, 10 (every level) ~3x the time, 0.27; rigid alone 0.376.
SYN_LEVEL_ITERATIONS = ((6.0, 40), (3.0, 20), (1.5, 10))
SYN_LEVELS = 3


def syn_schedule(spacing: Sequence[float], level_iterations: Sequence[tuple[float, int]] | None = None
                 ) -> tuple[int, ...]:
    """SyN iterations per level (shrink factors 2^(n-1) ... 1, as antspyx sets them) for a fixed image of
    voxel ``spacing`` (mm): each level runs the iterations of the first entry of ``level_iterations``
    (default :data:`SYN_LEVEL_ITERATIONS`) whose voxel size its in-plane voxel reaches, none if it is finer
    than all of them."""
    table = SYN_LEVEL_ITERATIONS if level_iterations is None else level_iterations
    fine = min(float(spacing[0]), float(spacing[1]))
    out = []
    for i in range(SYN_LEVELS):
        size = fine * 2 ** (SYN_LEVELS - 1 - i)
        out.append(next((int(it) for mm, it in table if size >= mm - 1e-6), 0))
    return tuple(out)


def _rigid(fixed: ants.ANTsImage, moving: ants.ANTsImage, tmp: str,
           fixed_mask: ants.ANTsImage | None = None) -> str:
    reg = _registration(
        fixed=fixed, moving=moving, type_of_transform="Rigid",
        aff_metric="mattes", aff_sampling=32, mask=fixed_mask,
        outprefix=os.path.join(tmp, "rigid_"), **RIGID_SCHEDULE,
    )
    return [t for t in reg["fwdtransforms"] if t.endswith(".mat")][0]


def _positive_normalised(img: ants.ANTsImage) -> ants.ANTsImage:
    arr = img.numpy()
    arr = np.where(np.isfinite(arr), arr, 0.0)
    hi = np.percentile(arr[arr > 0], 99.5) if np.any(arr > 0) else 1.0
    return img.new_image_like(np.clip(arr, 0, hi) / max(hi, 1e-12))


def register_t1_to_t2w(
    t1map_path: ImageLike,
    t2w_path: ImageLike,
    out_prefix: PathLike,
    phase_encode_stage: bool = True,
    pe_axis: int = 1,
    threads: int = 2,
    syn_iterations: Sequence[int] | None = None,
    syn_metric: str = "mattes",
    flow_sigma: float = 4.0,
    total_sigma: float = 1.0,
    grad_step: float = 0.2,
) -> RegistrationResult:
    """Register the (EPI-distorted) T1 map to the T2w image.

    Rigid (Mattes MI), then optionally SyN restricted to the phase-encode axis ``pe_axis`` of the
    T2w grid (restrict-deformation vector one-hot on that axis); ``syn_iterations`` per level, default
    :func:`syn_schedule` of the T2w voxel size. Writes
    ``<out_prefix>_from-MRF_to-T2w_mode-image_desc-rigid_xfm.mat`` and, with the PE stage,
    ``..._desc-pewarp_xfm.nii.gz`` plus ``<out_prefix>_from-T2w_to-MRF_mode-image_desc-pewarp_xfm.nii.gz``.
    """
    set_threads(threads)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    fixed = _positive_normalised(_to_ants(t2w_path))
    moving = _positive_normalised(_to_ants(t1map_path))
    timings["load"] = time.perf_counter() - t0

    out_rigid = _xfm_name(out_prefix, "MRF", "T2w", "rigid", ".mat")
    out_rigid.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mrflesion_reg_") as tmp:
        t0 = time.perf_counter()
        rigid_tmp = _rigid(fixed, moving, tmp)
        shutil.copyfile(rigid_tmp, out_rigid)
        timings["rigid"] = time.perf_counter() - t0
        warp = inv_warp = None
        if phase_encode_stage:
            t0 = time.perf_counter()
            reg = _registration(
                fixed=fixed, moving=moving, type_of_transform="SyNOnly",
                initial_transform=[os.fspath(out_rigid)],
                syn_metric=syn_metric, syn_sampling=32,
                reg_iterations=syn_schedule(fixed.spacing) if syn_iterations is None else tuple(syn_iterations),
                grad_step=grad_step,
                flow_sigma=flow_sigma, total_sigma=total_sigma,
                restrict_transformation=_restrict_vector(fixed, pe_axis),
                outprefix=os.path.join(tmp, "pe_"),
            )
            fwd = [t for t in reg["fwdtransforms"] if t.endswith("Warp.nii.gz")]
            inv = [t for t in reg["invtransforms"] if t.endswith("InverseWarp.nii.gz")]
            warp = _xfm_name(out_prefix, "MRF", "T2w", "pewarp", ".nii.gz")
            inv_warp = _xfm_name(out_prefix, "T2w", "MRF", "pewarp", ".nii.gz")
            shutil.copyfile(fwd[0], warp)
            shutil.copyfile(inv[0], inv_warp)
            timings["pe_syn"] = time.perf_counter() - t0
    return RegistrationResult(rigid=out_rigid, warp=warp, inverse_warp=inv_warp, source="MRF",
                              timings=timings)


def register_flair_to_t2w(
    flair_path: ImageLike,
    t2w_path: ImageLike,
    out_prefix: PathLike,
    threads: int = 2,
) -> RegistrationResult:
    """Rigid (Mattes MI) registration of the FLAIR image to the T2w image.

    Writes ``<out_prefix>_from-FLAIR_to-T2w_mode-image_desc-rigid_xfm.mat``.
    """
    set_threads(threads)
    t0 = time.perf_counter()
    fixed = _positive_normalised(_to_ants(t2w_path))
    moving = _positive_normalised(_to_ants(flair_path))
    out_rigid = _xfm_name(out_prefix, "FLAIR", "T2w", "rigid", ".mat")
    out_rigid.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mrflesion_reg_") as tmp:
        shutil.copyfile(_rigid(fixed, moving, tmp), out_rigid)
    return RegistrationResult(rigid=out_rigid, source="FLAIR",
                              timings={"rigid": time.perf_counter() - t0})


def uncompressed(result: RegistrationResult, folder: PathLike) -> RegistrationResult:
    """A copy of ``result`` whose warp fields are uncompressed NIfTI files in ``folder``: the same
    transforms (identical resampled images) without decompressing a field for every image resampled."""
    out = RegistrationResult(rigid=result.rigid, source=result.source, timings=dict(result.timings))
    for name in ("warp", "inverse_warp"):
        src = getattr(result, name)
        if src is not None:
            dst = Path(folder) / (Path(src).name.removesuffix(".gz"))
            nib.save(nib.load(os.fspath(src)), os.fspath(dst))
            setattr(out, name, dst)
    return out


# --------------------------------------------------------------------------------------------------
# Application
# --------------------------------------------------------------------------------------------------


def _apply_volume(fixed: ants.ANTsImage, vol: np.ndarray, affine: np.ndarray, transforms: list[str],
                  interpolator: str) -> np.ndarray:
    moving = nib_to_ants(vol, affine)
    out = ants.apply_transforms(fixed=fixed, moving=moving, transformlist=transforms,
                                interpolator=interpolator, defaultvalue=0.0)
    return out.numpy()


_RAMP_PAD = 2  # voxels of ramp beyond each edge: linear interpolation of the ramp is exact up to the edge
_RAMP_OFFSET = 10.0  # ramp values >= 8 inside the padded grid; ANTs' default 0 marks points beyond it


def sampling_coordinates(moving_shape: tuple[int, ...], moving_affine: np.ndarray, transforms: list[str],
                         ref_shape: tuple[int, ...], ref_affine: np.ndarray) -> np.ndarray:
    """Voxel coordinates in the moving grid of every reference (T2w) voxel under an ANTs transform list,
    (X, Y, Z, 3) float64: where ``ants.apply_transforms`` samples the moving image.

    Obtained from ANTs itself: per axis, a ramp image (the voxel index, on the moving grid padded by
    :data:`_RAMP_PAD` voxels) resampled with linear interpolation, which reproduces a linear function
    exactly; points beyond the padded grid get -1e6 (outside)."""
    fixed = nib_to_ants(np.zeros(ref_shape[:3], dtype=np.float32), ref_affine)
    shape = tuple(int(n) + 2 * _RAMP_PAD for n in moving_shape[:3])
    shift = np.eye(4)
    shift[:3, 3] = -_RAMP_PAD
    padded_affine = np.asarray(moving_affine, dtype=float) @ shift
    coords = np.empty(tuple(ref_shape[:3]) + (3,), np.float64)
    for axis in range(3):
        ramp = np.arange(shape[axis], dtype=np.float32) - _RAMP_PAD + _RAMP_OFFSET
        ramp = np.broadcast_to(ramp.reshape([-1 if i == axis else 1 for i in range(3)]), shape)
        out = _apply_volume(fixed, np.ascontiguousarray(ramp), padded_affine, transforms, "linear")
        coords[..., axis] = np.where(out > 0, out.astype(np.float64) - _RAMP_OFFSET, -1e6)
    return coords


def resample_bspline(data: np.ndarray, affine: np.ndarray, transforms: list[str], ref_shape: tuple[int, ...],
                     ref_affine: np.ndarray, threads: int = 1, coords: np.ndarray | None = None) -> np.ndarray:
    """A 3D volume or a 4D stack resampled onto the reference grid with cubic B-splines, as
    ``ants.apply_transforms(interpolator="bSpline")`` per volume, but with one sampling map for all volumes
    (:func:`sampling_coordinates`, or ``coords`` when given) and the compiled interpolation of
    :mod:`mrflesion.bspline` (float32; 0 outside the moving grid)."""
    from .bspline import bspline_coefficients, bspline_sample

    if coords is None:
        coords = sampling_coordinates(data.shape, affine, transforms, ref_shape, ref_affine)
    stack = data[..., None] if data.ndim == 3 else data
    out = bspline_sample(bspline_coefficients(stack, threads), coords, threads)
    return out[..., 0] if data.ndim == 3 else out


def apply_to_t2w(
    moving_path: ImageLike,
    result: RegistrationResult,
    reference_t2w: ImageLike,
    out_path: PathLike | None,
    interpolation: str = "bSpline",
    rigid_only: bool = False,
    clip_negative: bool | None = None,
    threads: int = 2,
    coords: np.ndarray | None = None,
) -> np.ndarray:
    """Resample a moving-space 3D map or 4D series (per volume) onto the T2w grid.

    ``interpolation``: "bSpline" (continuous maps, default: :func:`resample_bspline`, every volume of a
    series with one sampling map; ``coords``: that map when the caller has it), "linear", "nearest",
    "genericLabel", "lanczos" (ANTs, per volume). ``rigid_only`` applies the rigid part only.
    ``clip_negative`` (default: on when the input is non-negative) removes B-spline overshoot below 0
    (T1, T2*, M0, B1 are all >= 0). Returns the resampled array and writes it to ``out_path`` (float32, on
    the T2w grid: :func:`mrflesion.io.write_derivative`) when given.
    """
    set_threads(threads)
    interp = _INTERPOLATORS.get(interpolation.lower().replace("_", ""), interpolation)
    mimg = load_image(moving_path)
    ref = load_image(reference_t2w)
    data = np.asarray(mimg.dataobj, dtype=np.float32)
    if data.ndim not in (3, 4):
        raise ValueError(f"expected a 3D or 4D image, got shape {data.shape}")
    transforms = result.transforms(rigid_only=rigid_only)
    if np.isnan(data).any():  # (a copy only then: a series is large)
        data = np.nan_to_num(data)
    if clip_negative is None:
        clip_negative = bool(data.min() >= 0)
    if interp == "bSpline":
        out = resample_bspline(data, mimg.affine, transforms, ref.shape, ref.affine, threads, coords)
    else:
        fixed = nib_to_ants(np.zeros(ref.shape[:3], dtype=np.float32), ref.affine)
        vols = [data] if data.ndim == 3 else [data[..., i] for i in range(data.shape[3])]
        out = np.stack([_apply_volume(fixed, v, mimg.affine, transforms, interp) for v in vols], axis=-1)
        out = out[..., 0] if data.ndim == 3 else out
    if clip_negative:
        np.clip(out, 0.0, None, out=out)
    if out_path is not None:
        write_derivative(out_path, out, ref, dtype=np.float32, time_step=1.0 if out.ndim == 4 else None,
                         level=SERIES_GZIP_LEVEL if out.ndim == 4 else 1)
    return out


def image_to_t2w(
    image_path: ImageLike,
    result: RegistrationResult,
    reference_t2w: ImageLike,
    interpolation: str = "bSpline",
    threads: int = 2,
    binary: bool = False,
) -> np.ndarray:
    """A 3D image (e.g. the FLAIR) resampled onto the T2w grid with ``result``'s transforms
    (``binary``: the image is read as a 0/1 mask first); float32."""
    set_threads(threads)
    img = load_image(image_path)
    ref = load_image(reference_t2w)
    fixed = nib_to_ants(np.zeros(ref.shape[:3], dtype=np.float32), ref.affine)
    data = np.asarray(img.dataobj)
    data = (data > 0).astype(np.float32) if binary else data.astype(np.float32)
    if data.ndim == 4:
        data = data[..., 0]
    return _apply_volume(fixed, data, img.affine, result.transforms(), interpolation).astype(np.float32)


def mask_to_t2w(
    mask_path: ImageLike,
    result: RegistrationResult,
    reference_t2w: ImageLike,
    out_path: PathLike | None = None,
    threshold: float = 0.5,
    threads: int = 2,
) -> np.ndarray:
    """Bring a binary mask (e.g. the manual lesion mask on the FLAIR grid) into T2w space.

    Linear interpolation of the 0/1 mask, then threshold at ``threshold`` (>=); output uint8.
    """
    prob = image_to_t2w(mask_path, result, reference_t2w, "linear", threads, binary=True)
    out = (prob >= threshold).astype(np.uint8)
    if out_path is not None:
        write_derivative(out_path, out, load_image(reference_t2w), dtype=np.uint8)
    return out


# --------------------------------------------------------------------------------------------------
# Accuracy against a known truth
# --------------------------------------------------------------------------------------------------


def estimated_mapping(
    result: RegistrationResult,
    reference_t2w: ImageLike,
    moving_reference: ImageLike,
    rigid_only: bool = False,
) -> np.ndarray:
    """World (RAS mm) coordinates of the moving-space point each T2w voxel maps to.

    Computed by resampling coordinate images of the moving grid with linear interpolation (exact for
    a linear function inside the grid). Returns an array ``ref.shape[:3] + (3,)``.
    """
    ref = load_image(reference_t2w)
    mov = load_image(moving_reference)
    fixed = nib_to_ants(np.zeros(ref.shape[:3], dtype=np.float32), ref.affine)
    ijk = np.indices(mov.shape[:3], dtype=np.float64)
    world = np.tensordot(mov.affine[:3, :3], ijk, axes=1) + mov.affine[:3, 3][:, None, None, None]
    transforms = result.transforms(rigid_only=rigid_only)
    out = []
    for c in range(3):
        # offset by a constant so that the default value 0 outside the grid is recognisable
        mapped = _apply_volume(fixed, world[c].astype(np.float64) + 10000.0, mov.affine,
                               transforms, "linear")
        mapped = np.where(mapped > 5000.0, mapped - 10000.0, np.nan)
        out.append(mapped)
    return np.stack(out, axis=-1)


def residual_displacement(
    true_points: np.ndarray,
    result: RegistrationResult,
    reference_t2w: ImageLike,
    moving_reference: ImageLike,
    mask: np.ndarray | None = None,
    rigid_only: bool = False,
) -> dict[str, float]:
    """Residual |true - estimated| T2w->moving mapping error, in voxels of the T2w grid.

    ``true_points``: array ``T2w shape + (3,)`` of the true moving-space world (RAS mm) point of
    every T2w voxel (e.g. rigid transform + displacement along the PE axis). ``mask``: voxels to
    average over (brain). Errors are converted to T2w voxel units per grid axis before taking the
    Euclidean norm. Returns mean/median/p95 in voxels, mean in mm, and the mean absolute error along
    each grid axis in voxels (``mean_axis{0,1,2}_vox``).
    """
    ref = load_image(reference_t2w)
    est = estimated_mapping(result, ref, moving_reference, rigid_only=rigid_only)
    err_mm = est - np.asarray(true_points, dtype=np.float64)
    lin_inv = np.linalg.inv(ref.affine[:3, :3])
    err_vox = err_mm @ lin_inv.T
    sel = np.all(np.isfinite(err_mm), axis=-1)
    if mask is not None:
        sel &= np.asarray(mask, dtype=bool)
    if not np.any(sel):
        raise ValueError("no valid voxels to evaluate")
    norm_vox = np.linalg.norm(err_vox[sel], axis=-1)
    norm_mm = np.linalg.norm(err_mm[sel], axis=-1)
    out = {
        "mean_vox": float(norm_vox.mean()),
        "median_vox": float(np.median(norm_vox)),
        "p95_vox": float(np.percentile(norm_vox, 95)),
        "mean_mm": float(norm_mm.mean()),
        "n_voxels": int(sel.sum()),
    }
    for a in range(3):
        out[f"mean_axis{a}_vox"] = float(np.abs(err_vox[sel][:, a]).mean())
    return out


def residual_displacement_mm(*args: object, **kwargs: object) -> dict[str, float]:
    """Alias of :func:`residual_displacement` (returns both voxel and mm figures)."""
    return residual_displacement(*args, **kwargs)  # type: ignore[arg-type]
