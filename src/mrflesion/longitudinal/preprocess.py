"""The two FLAIRs of a pair in one halfway space (neither session favoured), brain mask, normalisation.

Why a halfway space: a detector that compares an interpolated image with a native one sees the
interpolation's smoothing (lower noise, softer edges) as a difference between the sessions. Moving each
session by half of the rigid transform between them interpolates both alike (Reuter et al. 2012 make
the same argument for FreeSurfer's longitudinal stream). The halfway grid is the follow-up FLAIR's
grid (shape and voxel size), since the follow-up is where new lesions are drawn and reported.

Conventions: world coordinates are RAS millimetres (nibabel). ANTs' rigid registration of the
follow-up (moving) to the baseline (fixed) gives ``T``, mapping a baseline point to the same anatomy in
the follow-up, ``p_fu = T(p_bl)`` (ANTs works in LPS: ``T_ras = F T_lps F``, ``F = diag(-1, -1, 1, 1)``).
With ``S = T^(1/2)`` (``S @ S = T``), the halfway image at a point ``q`` takes the baseline at
``S^-1 q`` and the follow-up at ``S q``: an anatomical point at ``p_bl`` appears at ``S p_bl`` in both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import linalg, ndimage

from ..masking import series_brain_mask

#: diag(-1, -1, 1, 1): LPS <-> RAS
FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def ants_rigid_to_ras(matrix: np.ndarray, translation: np.ndarray, center: np.ndarray) -> np.ndarray:
    """The 4x4 RAS matrix of an ITK/ANTs rigid (or affine) transform given in LPS by its matrix,
    translation and fixed centre: ``x -> M (x - c) + c + t``."""
    m = np.asarray(matrix, float).reshape(3, 3)
    c = np.asarray(center, float)
    lps = np.eye(4)
    lps[:3, :3] = m
    lps[:3, 3] = c + np.asarray(translation, float) - m @ c
    return FLIP @ lps @ FLIP


def rigid_square_root(t: np.ndarray) -> np.ndarray:
    """The 4x4 ``S`` with ``S @ S = t`` for a rigid ``t`` (principal square root: half the rotation
    angle about the same axis, and the matching translation). Raises ValueError when ``t`` is not
    (close to) rigid or turns by 180 degrees or more, where the half transform is not unique."""
    t = np.asarray(t, float)
    r = t[:3, :3]
    if not np.allclose(r @ r.T, np.eye(3), atol=1e-4) or np.linalg.det(r) <= 0:
        raise ValueError("not a rigid transform (rotation part is not orthonormal with det +1)")
    if np.trace(r) <= -1.0 + 1e-6:
        raise ValueError("rotation of 180 degrees: the halfway transform is not unique")
    s = np.real(linalg.sqrtm(t))
    s[3] = (0.0, 0.0, 0.0, 1.0)
    if not np.allclose(s @ s, t, atol=1e-6):
        raise ValueError("the square root of the transform did not converge")
    return s


def halfway_sampling(t_ras: np.ndarray, shape: Sequence[int], affine_followup: np.ndarray,
                     affine_baseline: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the halfway grid (``shape`` on ``affine_followup``): the 4x4 voxel-to-voxel maps into the
    baseline and the follow-up images, and ``S`` (see the module docstring)."""
    s = rigid_square_root(t_ras)
    s_inv = np.linalg.inv(s)
    a_fu = np.asarray(affine_followup, float)
    to_bl = np.linalg.inv(affine_baseline) @ s_inv @ a_fu
    to_fu = np.linalg.inv(a_fu) @ s @ a_fu
    return to_bl, to_fu, s


def grid_coordinates(vox_to_vox: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Voxel coordinates (X, Y, Z, 3) in a source image of every voxel of a grid of ``shape``."""
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    return idx @ vox_to_vox[:3, :3].T + vox_to_vox[:3, 3]


def resample_cubic(volume: np.ndarray, coords: np.ndarray, threads: int = 1) -> np.ndarray:
    """Cubic B-spline interpolation of a 3D ``volume`` at voxel coordinates (..., 3); 0 outside."""
    from ..bspline import bspline_coefficients, bspline_sample  # numba: the registration environment only

    coef = bspline_coefficients(np.asarray(volume, np.float32)[..., None], threads)
    return bspline_sample(coef, coords, threads)[..., 0]


def resample_linear(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of a 3D ``volume`` at voxel coordinates (..., 3); 0 outside."""
    c = np.moveaxis(coords, -1, 0)
    return ndimage.map_coordinates(np.asarray(volume, np.float32), c, order=1, mode="constant", cval=0.0)


def pair_brain_mask(baseline: np.ndarray, followup: np.ndarray) -> np.ndarray:
    """Brain mask of the two co-registered FLAIRs: Otsu on their mean, largest component, holes
    filled (:func:`mrflesion.masking.series_brain_mask`), then the voxels both images cover."""
    both = np.stack([baseline, followup], axis=-1)
    mask = series_brain_mask(both)
    return mask & (baseline > 0) & (followup > 0)


def normalise(volume: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """``volume`` divided by its median inside ``brain`` (global intensity changes between sessions,
    e.g. another receive gain, cancel), 0 outside the brain; float32."""
    inside = volume[brain]
    if inside.size == 0:
        raise ValueError("empty brain mask")
    med = float(np.median(inside))
    if not med > 0:
        raise ValueError(f"median FLAIR intensity in the brain is {med}: cannot normalise")
    return np.where(brain, volume / med, 0.0).astype(np.float32)


def to_halfway_mask(mask: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """A binary mask moved to the halfway grid: linear interpolation of its 0/1 values, >= 0.5."""
    return (resample_linear(mask.astype(np.float32), coords) >= 0.5).astype(np.uint8)


def followup_coordinates(s: np.ndarray, affine_followup: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Where each voxel of the follow-up's native grid lies in the halfway grid (voxel coordinates,
    (X, Y, Z, 3)): the follow-up point ``p`` is at ``S^-1 p`` in halfway space."""
    a = np.asarray(affine_followup, float)
    return grid_coordinates(np.linalg.inv(a) @ np.linalg.inv(s) @ a, shape)


def halfway_to_followup(volume: np.ndarray, s: np.ndarray, affine_followup: np.ndarray) -> np.ndarray:
    """A map of the halfway grid back on the follow-up's native grid (:func:`followup_coordinates`).
    Trilinear; float32. For several maps, compute the coordinates once and use :func:`resample_linear`."""
    return resample_linear(volume, followup_coordinates(s, affine_followup, volume.shape))


def baseline_to_followup(volume: np.ndarray, t_ras: np.ndarray, shape: Sequence[int],
                         affine_followup: np.ndarray, affine_baseline: np.ndarray) -> np.ndarray:
    """A baseline-space map on the follow-up's native grid (the follow-up point ``p`` lies at
    ``T^-1 p`` in the baseline). Trilinear; float32."""
    vox = np.linalg.inv(affine_baseline) @ np.linalg.inv(t_ras) @ np.asarray(affine_followup, float)
    return resample_linear(volume, grid_coordinates(vox, shape))
