"""Atomic file writing: nothing half-written is ever left under an output name.

:func:`write_derivative` is the one NIfTI derivative writer of the pipeline: an array on the grid of a
reference image (affine, qform/sform codes, voxel sizes, units; :func:`derivative_image`), written
atomically (:func:`save_nifti`: a temporary file in the same folder, then ``os.replace``; ``.nii.gz``
compressed deterministically, without a name or a time stamp) with its JSON sidecar
(:func:`mrflesion.layout.sidecar_path`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the same folder; on success it is renamed onto ``path`` (with the
    permissions a plain ``open`` would give it, not ``mkstemp``'s owner-only ones)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


#: gzip level of 4D float series (the MRF series, 35 volumes): noisy float32 data shrink only to ~0.89 at
#: level 1, which runs at ~36 MB/s against ~520 MB/s stored (paper grid: 14.6 s for one 380 MB series);
#: so they are stored uncompressed inside the .nii.gz (still gzip, readable everywhere).
SERIES_GZIP_LEVEL = 0


def save_nifti(img: Any, path: str | os.PathLike[str], level: int = 1) -> Path:
    """Save a nibabel image atomically (temporary file in the same folder, then rename).

    ``.nii.gz``: gzip level ``level`` without file name or time stamp (the same bytes on every run, and
    nibabel's own ``.nii.gz`` bytes at level 1)."""
    import gzip

    import nibabel as nib

    path = Path(path)
    with atomic_path(path) as tmp:
        if path.name.endswith(".gz"):
            with open(tmp, "wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh,
                                                      compresslevel=level, mtime=0) as gz:
                img.to_stream(gz)
        else:
            nib.save(img, os.fspath(tmp))
    return path


#: What a derivative's grid can come from: a NIfTI path, a nibabel image, or a 4x4 affine.
Reference = Any


def derivative_image(array: Any, reference: Reference, dtype: Any = None,
                     time_step: float | None = None) -> Any:
    """``array`` as a NIfTI-1 image on the grid of ``reference``, with a fresh header.

    The header takes from the reference only what describes the grid: the affine (as qform and sform,
    with the reference's codes, "scanner" (1) where it has none), the voxel sizes that follow from it,
    and the units (``mm``/``sec`` where the reference has none, e.g. an affine). A 4D array's fourth
    voxel size is ``time_step``, else the reference's when it is 4D, else 1. The data type is ``dtype``
    (the array's when None), stored unscaled.
    """
    import nibabel as nib
    import numpy as np

    if isinstance(reference, str | os.PathLike):
        reference = nib.load(os.fspath(reference))
    ref_hdr = getattr(reference, "header", None)
    affine = np.asarray(reference.affine if ref_hdr is not None else reference, dtype=float)
    if affine.shape != (4, 4):
        raise ValueError(f"reference: expected a NIfTI image, its path or a 4x4 affine, got {affine.shape}")
    data = np.asarray(array)
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    img = nib.Nifti1Image(data, affine)
    hdr = img.header
    hdr.set_data_dtype(data.dtype)
    qcode = scode = 1
    units = ("mm", "sec")
    if ref_hdr is not None and "qform_code" in ref_hdr and "sform_code" in ref_hdr:
        qcode = int(ref_hdr["qform_code"]) or 1
        scode = int(ref_hdr["sform_code"]) or 1
    if ref_hdr is not None and hasattr(ref_hdr, "get_xyzt_units"):
        xyz, t = ref_hdr.get_xyzt_units()
        units = (xyz if xyz != "unknown" else "mm", t if t != "unknown" else "sec")
    hdr.set_qform(affine, code=qcode)
    hdr.set_sform(affine, code=scode)
    hdr.set_xyzt_units(*units)
    if data.ndim == 4:
        if time_step is None:
            ref_zooms = ref_hdr.get_zooms() if ref_hdr is not None else ()
            time_step = float(ref_zooms[3]) if len(ref_zooms) > 3 else 1.0
        hdr.set_zooms(tuple(hdr.get_zooms()[:3]) + (float(time_step),))
    return img


def write_derivative(
    path: str | os.PathLike[str],
    array: Any,
    reference: Reference,
    sidecar: Mapping[str, Any] | None = None,
    dtype: Any = None,
    *,
    time_step: float | None = None,
    level: int = 1,
) -> Path:
    """Write a NIfTI derivative: ``array`` on the grid of ``reference`` (:func:`derivative_image`: a
    NIfTI path, a nibabel image or a 4x4 affine), cast to ``dtype``, saved atomically
    (:func:`save_nifti`), and, when given, its JSON ``sidecar`` at
    :func:`mrflesion.layout.sidecar_path` (also atomic, written after the image). Returns ``path``."""
    from .layout import sidecar_path

    path = Path(path)
    save_nifti(derivative_image(array, reference, dtype=dtype, time_step=time_step), path, level=level)
    if sidecar is not None:
        write_json(sidecar_path(path), dict(sidecar))
    return path
