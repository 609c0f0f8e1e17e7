"""Content-level checks of one subject's inputs, before any processing.

Every failure raises :class:`InputError` whose message is one line naming the subject, what is
wrong and the file, e.g. ``sub-07: MRF series has 34 volumes, expected 35: /data/sub-07/anat/...``.
Valid-but-unusual inputs are handled, not rejected: an empty lesion mask (a control) is fine.

What cannot be interpreted with certainty is refused: an MRF sidecar (after BIDS inheritance, with the
values the config states in ``mrf_timing``) without a timing key, with times in milliseconds or an
order that disagrees with itself (:func:`resolve_timing`); images without a usable orientation, whose
physical extent disagrees with the T2w's, or MRF data that are not magnitude (complex, negative).
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .mrf.sequence import Protocol, ProtocolError, resolve_sidecar

#: Largest ratio between the MRF's and the T2w's in-plane field of view (mm) accepted as the same anatomy.
FOV_RATIO_TOLERANCE = 1.5


class InputError(ValueError):
    def __init__(self, key: str, reason: str, path: str | Path) -> None:
        self.key, self.reason, self.path = key, _one_line(reason), str(path)
        super().__init__(f"{key}: {self.reason}: {path}")


def _one_line(text: str) -> str:
    """Collapse whitespace (library messages sometimes span lines) so every error is one line."""
    return " ".join(str(text).split())


_NIFTI1_MAGIC = (b"n+1\0", b"ni1\0")  # at byte 344 of a NIfTI-1 header
_NIFTI2_MAGIC = (b"n+2\0", b"ni2\0")  # at byte 4 of a NIfTI-2 header
_GZIP_MAGIC = b"\x1f\x8b"


def _check_file(key: str, path: Path, what: str) -> None:
    """File-system level problems, each with its own reason (checked before reading)."""
    if not os.path.lexists(path):
        raise InputError(key, f"{what} file missing", path)
    if path.is_symlink() and not path.exists():
        raise InputError(key, f"{what} file is a broken symbolic link", path)
    if path.is_dir():
        raise InputError(key, f"{what} path is a directory, not a file", path)
    if not path.is_file():
        raise InputError(key, f"{what} path is not a regular file", path)
    if not os.access(path, os.R_OK):
        raise InputError(key, f"{what} file unreadable (permission denied)", path)
    if path.stat().st_size == 0:
        raise InputError(key, f"{what} file is empty (0 bytes)", path)


def _diagnose(path: Path) -> str | None:
    """Why nibabel could not read ``path``: a cut-off compressed stream, or no NIfTI header at all."""
    try:
        if path.name.endswith(".gz"):
            with path.open("rb") as fh:
                if fh.read(2) != _GZIP_MAGIC:
                    return "file is not gzip-compressed (a .nii.gz must be)"
            with gzip.open(path, "rb") as gz:
                head = gz.read(348)
                while gz.read(1 << 22):
                    pass
        else:
            with path.open("rb") as fh:
                head = fh.read(348)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        return f"file truncated or corrupt ({type(exc).__name__})"
    except OSError:
        return None
    if head[344:348] in _NIFTI1_MAGIC or head[4:8] in _NIFTI2_MAGIC:
        return "file truncated or corrupt (shorter than its header says)"
    if len(head) < 348:
        return "file is not a NIfTI image (shorter than a NIfTI header)"
    return "file is not a NIfTI image (no NIfTI-1/2 header)"


def load_image(key: str, path: str | Path, what: str) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Load a NIfTI fully (so truncation is caught here), with a one-line error on failure."""
    path = Path(path)
    _check_file(key, path, what)
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except PermissionError:
        raise InputError(key, f"{what} file unreadable (permission denied)", path) from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InputError(key, f"{what} file truncated or corrupt ({type(exc).__name__})", path) from None
    except Exception as exc:  # nibabel raises several types (ImageFileError, OSError...) for bad content
        reason = _diagnose(path) or f"file is not a readable NIfTI image ({type(exc).__name__}: {exc})"
        raise InputError(key, f"{what} {reason}", path) from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(key, f"{what} file is not a NIfTI image ({type(img).__name__})", path)
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


def _shape(data: np.ndarray) -> str:
    return "x".join(str(n) for n in data.shape)


def overlap_fraction(a: nib.Nifti1Image, b: nib.Nifti1Image) -> float:
    """Volume of the intersection of the two fields of view over the smaller one."""
    (alo, ahi), (blo, bhi) = _bbox(a), _bbox(b)
    inter = np.clip(np.minimum(ahi, bhi) - np.maximum(alo, blo), 0, None).prod()
    smaller = min(np.prod(ahi - alo), np.prod(bhi - blo))
    return float(inter / smaller) if smaller > 0 else 0.0


def read_sidecar(key: str, path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not os.path.lexists(path):
        raise InputError(key, "MRF sidecar missing", path)
    if not path.is_file():
        raise InputError(key, "MRF sidecar is not a regular file (broken link or directory)", path)
    try:
        side = json.loads(path.read_text())
    except PermissionError:
        raise InputError(key, "MRF sidecar unreadable (permission denied)", path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(key, f"MRF sidecar is not valid JSON ({exc})", path) from None
    if not isinstance(side, dict):
        raise InputError(key, "MRF sidecar is not a JSON object", path)
    return side


class SidecarError(ProtocolError):
    """An MRF sidecar layer that cannot be read; ``path`` names it."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        super().__init__(reason)


def stated_timing(config: Mapping[str, Any]) -> dict[str, Any]:
    """The timing values the user states in the config: ``mrf_timing`` (sidecar keys and units) and the
    inversion model of ``sequence_model.inversion_efficiency`` (default ``perfect``)."""
    out = dict(config.get("mrf_timing") or {})
    out["InversionEfficiency"] = str((config.get("sequence_model") or {}).get("inversion_efficiency", "perfect"))
    return out


@dataclass(frozen=True)
class ResolvedTiming:
    """The MRF timing of a subject: the protocol, its sidecar form and what came from the config."""

    protocol: Protocol
    from_config: tuple[str, ...]
    key: str
    sidecar: dict[str, Any]

    def timing_key(self) -> str:
        return self.key

    def to_sidecar(self) -> dict[str, Any]:
        return self.sidecar

    def record(self) -> dict[str, Any]:
        """What every output sidecar of the maps records about the interpretation of the series."""
        return {"MRFTiming": self.sidecar, "TimingKey": self.key,
                "InversionEfficiency": self.protocol.inversion_efficiency,
                "TimingFromConfig": {k: self.sidecar.get(k) for k in self.from_config}}


@functools.lru_cache(maxsize=4096)
def _resolve_texts(texts: tuple[tuple[str, str], ...], stated_json: str) -> ResolvedTiming:
    layers = []
    for path, text in texts:
        try:
            side = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SidecarError(path, str(exc)) from None
        if not isinstance(side, dict):
            raise SidecarError(path, "not a JSON object")
        layers.append(side)
    merged, from_config = resolve_sidecar(layers, json.loads(stated_json))
    protocol = Protocol.from_sidecar(merged)
    return ResolvedTiming(protocol, tuple(from_config), protocol.timing_key(), protocol.to_sidecar())


def resolve_timing(layers: str | Sequence[str], stated: Mapping[str, Any] | None = None) -> ResolvedTiming:
    """The MRF timing from the sidecar layers (BIDS inheritance, top level first) and the stated values.

    Raises :class:`SidecarError` (a layer is unreadable or not a JSON object; ``path`` names it) or
    :class:`ProtocolError` (a timing key missing, implausible or contradicting another).
    """
    paths = [layers] if isinstance(layers, str | Path) else list(layers)
    texts = []
    for path in paths:
        try:
            texts.append((str(path), Path(path).read_text()))
        except (OSError, UnicodeDecodeError) as exc:
            raise SidecarError(path, f"cannot read: {exc}") from None
    return _resolve_texts(tuple(texts), json.dumps(dict(stated or {}), sort_keys=True))


def _check_orientation(key: str, img: nib.Nifti1Image, path: str | Path, what: str, identity: bool) -> None:
    """A scanner orientation is present (qform or sform code set) and, for ``identity``, not the identity."""
    hdr = img.header
    if int(hdr["qform_code"]) == 0 and int(hdr["sform_code"]) == 0:
        raise InputError(key, f"{what} has no orientation (qform and sform codes 0)", path)
    if identity and np.allclose(img.affine, np.eye(4)):
        raise InputError(key, f"{what} affine is the identity (no scanner orientation and voxel size)", path)


def _load_anatomical(key: str, path: str | Path, what: str) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Load a 3D anatomical image (T2w, FLAIR) with finite, not all-zero values and a scanner orientation."""
    img, data = load_image(key, path, what)
    if data.ndim != 3:
        raise InputError(key, f"{what} must be 3D, got {data.ndim}D", path)
    _check_values(key, data, path, what)
    _check_orientation(key, img, path, what, identity=False)
    return img, data


def _check_overlap(key: str, img: nib.Nifti1Image, t2w_img: nib.Nifti1Image, what: str, path: str | Path) -> float:
    """The :func:`overlap_fraction` of ``img`` (``what``: MRF, FLAIR) and the T2w image; at least one half."""
    frac = overlap_fraction(img, t2w_img)
    if frac < 0.5:
        raise InputError(key, f"{what} and T2w fields of view overlap by only {frac:.0%}", path)
    return frac


def inplane_fov_mm(img: nib.Nifti1Image) -> np.ndarray:
    """The two largest physical extents (mm) of an image's field of view along the world axes."""
    ext = np.abs(np.asarray(img.affine)[:3, :3]) @ np.asarray(img.shape[:3], float)
    return np.sort(ext)[::-1][:2]


def check_subject(
    key: str,
    files: Mapping[str, str],
    sidecar: str | Sequence[str],
    n_measurements: int = 35,
    stated: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Check MRF (+ sidecar), T2w, FLAIR and lesion mask; return a summary for the record.

    ``sidecar``: the MRF sidecar, or every sidecar that applies (BIDS inheritance, top level first);
    ``stated``: the timing values stated in the config (:func:`stated_timing`).
    """
    layers = [sidecar] if isinstance(sidecar, str | Path) else list(sidecar)
    main_sidecar = str(layers[-1])
    mrf_img, mrf = load_image(key, files["mrf"], "MRF series")
    if mrf.ndim != 4:
        raise InputError(key, f"MRF series must be 4D, got {mrf.ndim}D", files["mrf"])
    if mrf.shape[3] != n_measurements:
        raise InputError(key, f"MRF series has {mrf.shape[3]} volumes, expected {n_measurements}", files["mrf"])
    if np.iscomplexobj(mrf):
        raise InputError(key, f"MRF series is complex-valued ({mrf.dtype}); magnitude images expected", files["mrf"])
    _check_values(key, mrf, files["mrf"], "MRF series")
    if mrf.min() < 0:
        raise InputError(
            key, f"MRF series has negative values (min {float(mrf.min()):g}); magnitude images expected "
            "(phase or real/imaginary data?)", files["mrf"]
        )
    empty = [i + 1 for i in range(mrf.shape[3]) if not np.any(mrf[..., i])]
    if empty:
        raise InputError(
            key, f"MRF series volume {empty[0]} of {mrf.shape[3]} is all zero ({len(empty)} such)", files["mrf"]
        )
    _check_orientation(key, mrf_img, files["mrf"], "MRF series", identity=True)
    for layer in layers:
        read_sidecar(key, layer)
    try:
        timing = resolve_timing(layers, stated)
    except SidecarError as exc:
        raise InputError(key, f"MRF sidecar is not valid JSON ({exc})", exc.path) from None
    except (ProtocolError, ValueError) as exc:  # float("abc") in a timing list is a plain ValueError
        raise InputError(key, f"MRF sidecar timing: {exc}", main_sidecar) from None
    protocol = timing.protocol
    if protocol.n_measurements != n_measurements:
        raise InputError(
            key, f"MRF sidecar lists {protocol.n_measurements} measurements, expected {n_measurements}",
            main_sidecar,
        )
    if protocol.n_slices != mrf.shape[2]:
        raise InputError(
            key, f"MRF sidecar SliceOrder has {protocol.n_slices} slices, image has {mrf.shape[2]}", main_sidecar
        )

    t2w_img, t2w = _load_anatomical(key, files["t2w"], "T2w image")
    frac = _check_overlap(key, mrf_img, t2w_img, "MRF", files["t2w"])
    fov_mrf, fov_t2w = inplane_fov_mm(mrf_img), inplane_fov_mm(t2w_img)
    ratio = fov_mrf / fov_t2w
    if np.any(ratio > FOV_RATIO_TOLERANCE) or np.any(ratio < 1 / FOV_RATIO_TOLERANCE):
        raise InputError(
            key, f"MRF field of view {fov_mrf[0]:.0f} x {fov_mrf[1]:.0f} mm disagrees with the T2w's "
            f"{fov_t2w[0]:.0f} x {fov_t2w[1]:.0f} mm (voxel size or orientation wrong?)", files["mrf"]
        )

    flair_img, flair = _load_anatomical(key, files["flair"], "FLAIR image")
    _check_overlap(key, flair_img, t2w_img, "FLAIR", files["flair"])

    lesion = _check_lesion_mask(key, files["lesion"], flair_img, flair) if "lesion" in files else None
    return {
        "subject": key,
        "mrf_shape": list(mrf.shape),
        "mrf_voxel_mm": [float(x) for x in mrf_img.header.get_zooms()[:3]],
        "t2w_shape": list(t2w.shape),
        "flair_shape": list(flair.shape),
        "mrf_t2w_overlap": round(frac, 4),
        # no manual mask (apply mode): None, "n/a" in group/inputs.tsv
        "lesion_voxels": None if lesion is None else lesion[0],
        "lesion_ml": None if lesion is None else lesion[1],
        "timing_key": protocol.timing_key(),
        "n_slices": protocol.n_slices,
        "n_slots": protocol.n_slots,
        "multiband": protocol.multiband,
        "inversion_efficiency": protocol.inversion_efficiency,
        "sidecars": [str(x) for x in layers],
        "timing_from_config": {k: timing.sidecar.get(k) for k in timing.from_config},
        "timing": timing.sidecar,
    }


def _check_lesion_mask(key: str, path: str, flair_img: Any, flair: np.ndarray) -> tuple[int, float]:
    """The manual lesion mask on the FLAIR grid, values 0-1; returns its voxels and volume (ml) at >= 0.5."""
    mask_img, mask = load_image(key, path, "lesion mask")
    if mask.ndim != 3:
        raise InputError(key, f"lesion mask must be 3D, got {mask.ndim}D", path)
    if mask.shape != flair.shape:
        raise InputError(
            key, f"lesion mask is not on the FLAIR grid (shape {_shape(mask)} vs {_shape(flair)})", path
        )
    if not np.allclose(mask_img.affine, flair_img.affine, atol=1e-3):
        raise InputError(key, "lesion mask is not on the FLAIR grid (affines differ)", path)
    if not np.isfinite(mask).all():
        n = int((~np.isfinite(mask)).sum())
        raise InputError(key, f"lesion mask has {n} NaN/Inf voxels", path)
    if mask.min() < 0 or mask.max() > 1:
        raise InputError(
            key, f"lesion mask values must lie in [0, 1] (found {mask.min():g} to {mask.max():g})", path
        )
    # An all-zero mask is valid: a control, or a patient without visible lesions.
    lesion_voxels = int((mask >= 0.5).sum())
    return lesion_voxels, round(lesion_voxels * float(np.prod(mask_img.header.get_zooms()[:3])) / 1000.0, 4)
