"""Anatomy from nilearn's MNI152 2009 maps: tissue priors, lesion candidate sites, sampling.

The atlas is loaded once per process (nilearn ships the 1 mm maps; nothing is downloaded).
Tissue fractions are the MNI priors sharpened per voxel (``p^g / sum p^g``: the priors are
population averages, blurrier than any individual), with CSF = brain mask - GM - WM.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage

from .config import load_config
from .fields import dot

TISSUES = ("GM", "WM", "CSF")


@dataclass(frozen=True)
class Atlas:
    """Sharpened tissue fractions on the MNI 1 mm grid plus lesion candidate centres (MNI mm)."""

    fractions: tuple[np.ndarray, np.ndarray, np.ndarray]  # GM, WM, CSF (float32, MNI grid)
    affine: np.ndarray  # MNI voxel -> mm
    inv_affine: np.ndarray
    periventricular: np.ndarray  # (N, 3) candidate lesion centres near the ventricles
    deep: np.ndarray  # (M, 3) other WM candidate centres
    ventricle_centre: np.ndarray  # (3,) centroid of the lateral ventricles
    near: np.ndarray  # bool MNI grid: brain mask dilated by ``near_margin_mm`` (where sampling is needed)

    def near_brain(self, a_mm: np.ndarray) -> np.ndarray:
        """Nearest-neighbour test: is each MNI point (N, 3) within the dilated brain mask?"""
        idx = np.rint(dot(a_mm, self.inv_affine[:3, :3].T) + self.inv_affine[:3, 3]).astype(np.int64)
        ok = np.all((idx >= 0) & (idx < np.asarray(self.near.shape)), axis=1)
        out = np.zeros(a_mm.shape[0], dtype=bool)
        out[ok] = self.near[idx[ok, 0], idx[ok, 1], idx[ok, 2]]
        return out

    def sample(self, a_mm: np.ndarray) -> np.ndarray:
        """Trilinear tissue fractions at MNI points (N, 3) -> (3, N) float32 (GM, WM, CSF); 0 outside."""
        coords = (dot(a_mm, self.inv_affine[:3, :3].T) + self.inv_affine[:3, 3]).T
        return np.stack(
            [
                ndimage.map_coordinates(f, coords, order=1, mode="constant", cval=0.0, prefilter=False)
                for f in self.fractions
            ]
        )


def _sharpen(
    gm: np.ndarray, wm: np.ndarray, csf: np.ndarray, mask: np.ndarray, gamma: float
) -> list[np.ndarray]:
    p = np.stack([gm, wm, csf]).astype(np.float64) ** gamma
    tot = p.sum(axis=0)
    out = np.where(tot > 0, p / np.where(tot > 0, tot, 1.0), 0.0)
    # voxels inside the mask with no tissue prior at all: call them CSF
    empty = (tot <= 0) & (mask > 0)
    out[2][empty] = 1.0
    out *= mask[None]
    return [np.ascontiguousarray(x, dtype=np.float32) for x in out]


@lru_cache(maxsize=1)
def get_atlas() -> Atlas:
    """Load and prepare the MNI152 2009 maps (cached per process)."""
    from nilearn import datasets

    cfg: dict[str, Any] = load_config()["anatomy"]
    t1 = datasets.load_mni152_template(resolution=1)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata(), dtype=np.float64)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), dtype=np.float64)
    mask = (np.asarray(datasets.load_mni152_brain_mask(resolution=1).get_fdata()) > 0.5).astype(np.float64)
    gm *= mask
    wm *= mask
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    affine = np.asarray(t1.affine, dtype=np.float64)
    inv = np.linalg.inv(affine)
    fractions = _sharpen(gm, wm, csf, mask, float(cfg["sharpen_gamma"]))

    # lateral ventricles: CSF inside a box around the midline
    box = np.asarray(cfg["ventricles_box_mni"], dtype=float)
    lo = np.floor(inv[:3, :3] @ box[:, 0] + inv[:3, 3]).astype(int)
    hi = np.ceil(inv[:3, :3] @ box[:, 1] + inv[:3, 3]).astype(int)
    vent = np.zeros(mask.shape, dtype=bool)
    sl = tuple(slice(max(a, 0), b + 1) for a, b in zip(lo, hi, strict=True))
    vent[sl] = csf[sl] >= float(cfg["ventricle_csf_threshold"])
    lab, n = ndimage.label(vent)
    if n > 1:  # keep the largest components (the two lateral ventricles)
        sizes = ndimage.sum(vent, lab, index=np.arange(1, n + 1))
        keep = np.argsort(sizes)[::-1][:2] + 1
        vent = np.isin(lab, keep)
    dist = ndimage.distance_transform_edt(~vent)
    vidx = np.argwhere(vent)
    ventricle_centre = affine[:3, :3] @ vidx.mean(axis=0) + affine[:3, 3]

    cand = (wm >= float(cfg["lesion_wm_threshold"])) & (mask > 0)
    cand[::2] = False  # thin the candidate list (1 in 8 voxels is plenty)
    cand[:, ::2] = False
    cand[:, :, ::2] = False
    ijk = np.argwhere(cand)
    mm = ijk @ affine[:3, :3].T + affine[:3, 3]
    near = dist[tuple(ijk.T)] <= float(cfg["periventricular_mm"])
    return Atlas(
        fractions=(fractions[0], fractions[1], fractions[2]),
        affine=affine,
        inv_affine=inv,
        periventricular=mm[near],
        deep=mm[~near],
        ventricle_centre=ventricle_centre,
        near=ndimage.binary_dilation(mask > 0, iterations=8),
    )
