"""Deterministic writing of NIfTI/JSON/TSV files and BIDS names."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np


def bids_name(sub: str, ses: str | None, suffix: str, ext: str = ".nii.gz", **entities: str | None) -> str:
    """``sub-X[_ses-Y][_acq-][_space-][_label-][_desc-]...[_from-][_to-][_mode-]_suffix.ext``."""
    parts = [sub]
    if ses:
        parts.append(ses)
    for key in ("acq", "space", "label", "desc", "from", "to", "mode"):
        v = entities.pop(key, None)
        if v:
            parts.append(f"{key}-{v}")
    if entities:
        raise ValueError(f"unknown entities {sorted(entities)}")
    return "_".join(parts) + f"_{suffix}{ext}"


def write_nifti(
    path: Path, data: np.ndarray, affine: np.ndarray, level: int = 1, zooms4: float | None = None
) -> None:
    """Write a .nii.gz with qform = sform = ``affine`` (scanner) and a gzip stream without mtime.

    nibabel's gzip writer stores the current time in the header; compressing the in-memory
    ``to_bytes()`` ourselves with ``mtime=0`` makes the files byte-identical across runs.
    """
    img = nib.Nifti1Image(data, affine)
    hdr = img.header
    hdr.set_qform(affine, code=1)
    hdr.set_sform(affine, code=1)
    hdr.set_xyzt_units("mm", "sec")
    if data.ndim == 4 and zooms4 is not None:
        hdr.set_zooms(hdr.get_zooms()[:3] + (float(zooms4),))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=level, mtime=0))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(data), indent=2) + "\n")


def write_tsv(path: Path, columns: list[str], rows: list[list[Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(columns)] + ["\t".join("n/a" if v is None else str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
