"""Content-level checks of one subject's inputs, before any processing.

Every failure raises :class:`InputError` whose message is one line naming the subject, what is
wrong and the file, e.g. ``sub-07: MRF series has 34 volumes, expected 35: /data/sub-07/anat/...``.
Valid-but-unusual inputs are handled, not rejected: an empty lesion mask (a control) is fine.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .mrf.sequence import Protocol, ProtocolError


class InputError(ValueError):
    def __init__(self, key: str, reason: str, path: str | Path) -> None:
        self.key, self.reason, self.path = key, reason, str(path)
        super().__init__(f"{key}: {reason}: {path}")


def load_image(key: str, path: str | Path, what: str) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Load a NIfTI fully (so truncation is caught here), with a one-line error on failure."""
    path = Path(path)
    if not path.exists():
        raise InputError(key, f"{what} file missing", path)
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except PermissionError:
        raise InputError(key, f"{what} file unreadable (permission denied)", path) from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(key, f"{what} file truncated or corrupt ({type(exc).__name__})", path) from None
    except Exception as exc:  # nibabel raises several types for non-NIfTI content
        raise InputError(key, f"{what} file is not a readable NIfTI image ({exc})", path) from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(key, f"{what} file is not a NIfTI image", path)
    return img, data


def _check_values(key: str, data: np.ndarray, path: str | Path, what: str) -> None:
    if not np.isfinite(data).all():
        n = int((~np.isfinite(data)).sum())
        raise InputError(key, f"{what} has {n} NaN/Inf voxels", path)
    if not np.any(data):
        raise InputError(key, f"{what} is all zero", path)


def _bbox(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    shape = np.asarray(img.shape[:3])
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    world = nib.affines.apply_affine(img.affine, corners)
    return world.min(axis=0), world.max(axis=0)


def overlap_fraction(a: nib.Nifti1Image, b: nib.Nifti1Image) -> float:
    """Volume of the intersection of the two fields of view over the smaller one."""
    (alo, ahi), (blo, bhi) = _bbox(a), _bbox(b)
    inter = np.clip(np.minimum(ahi, bhi) - np.maximum(alo, blo), 0, None).prod()
    smaller = min(np.prod(ahi - alo), np.prod(bhi - blo))
    return float(inter / smaller) if smaller > 0 else 0.0


def read_sidecar(key: str, path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise InputError(key, "MRF sidecar missing", path)
    try:
        side = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(key, f"MRF sidecar is not valid JSON ({exc})", path) from None
    if not isinstance(side, dict):
        raise InputError(key, "MRF sidecar is not a JSON object", path)
    return side


def check_subject(
    key: str, files: Mapping[str, str], sidecar: str, n_measurements: int = 35
) -> dict[str, Any]:
    """Check MRF (+ sidecar), T2w, FLAIR and lesion mask; return a summary for the record."""
    mrf_img, mrf = load_image(key, files["mrf"], "MRF series")
    if mrf.ndim != 4:
        raise InputError(key, f"MRF series must be 4D, got {mrf.ndim}D", files["mrf"])
    if mrf.shape[3] != n_measurements:
        raise InputError(key, f"MRF series has {mrf.shape[3]} volumes, expected {n_measurements}", files["mrf"])
    _check_values(key, mrf, files["mrf"], "MRF series")
    side = read_sidecar(key, sidecar)
    try:
        protocol = Protocol.from_sidecar(side)
    except ProtocolError as exc:
        raise InputError(key, f"MRF sidecar timing: {exc}", sidecar) from None
    if protocol.n_measurements != n_measurements:
        raise InputError(
            key, f"MRF sidecar lists {protocol.n_measurements} measurements, expected {n_measurements}", sidecar
        )
    if protocol.n_slices != mrf.shape[2]:
        raise InputError(
            key, f"MRF sidecar SliceOrder has {protocol.n_slices} slices, image has {mrf.shape[2]}", sidecar
        )

    t2w_img, t2w = load_image(key, files["t2w"], "T2w image")
    if t2w.ndim != 3:
        raise InputError(key, f"T2w image must be 3D, got {t2w.ndim}D", files["t2w"])
    _check_values(key, t2w, files["t2w"], "T2w image")
    frac = overlap_fraction(mrf_img, t2w_img)
    if frac < 0.5:
        raise InputError(key, f"MRF and T2w fields of view overlap by only {frac:.0%}", files["t2w"])

    flair_img, flair = load_image(key, files["flair"], "FLAIR image")
    if flair.ndim != 3:
        raise InputError(key, f"FLAIR image must be 3D, got {flair.ndim}D", files["flair"])
    _check_values(key, flair, files["flair"], "FLAIR image")

    mask_img, mask = load_image(key, files["lesion"], "lesion mask")
    if mask.ndim != 3:
        raise InputError(key, f"lesion mask must be 3D, got {mask.ndim}D", files["lesion"])
    if mask.shape != flair.shape or not np.allclose(mask_img.affine, flair_img.affine, atol=1e-3):
        raise InputError(key, "lesion mask is not on the FLAIR grid (shape or affine differ)", files["lesion"])
    if not np.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise InputError(key, "lesion mask values must lie in [0, 1]", files["lesion"])
    lesion_voxels = int((mask >= 0.5).sum())
    return {
        "subject": key,
        "mrf_shape": list(mrf.shape),
        "mrf_voxel_mm": [float(x) for x in mrf_img.header.get_zooms()[:3]],
        "t2w_shape": list(t2w.shape),
        "flair_shape": list(flair.shape),
        "mrf_t2w_overlap": round(frac, 4),
        "lesion_voxels": lesion_voxels,
        "lesion_ml": round(lesion_voxels * float(np.prod(mask_img.header.get_zooms()[:3])) / 1000.0, 4),
        "timing_key": protocol.timing_key(),
        "n_slices": protocol.n_slices,
    }
