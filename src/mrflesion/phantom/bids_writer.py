"""Deterministic writing of NIfTI/JSON/TSV files and BIDS names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mrflesion import io
from mrflesion.io import write_derivative


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
    """Write a .nii.gz with qform = sform = ``affine`` (scanner), units mm / s, a 4D series' time step
    ``zooms4`` (:func:`mrflesion.io.write_derivative`: atomic, gzip level ``level`` without a time
    stamp, so the files are byte-identical across runs).
    """
    write_derivative(path, data, affine, time_step=zooms4, level=level)


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
    io.write_json(path, _jsonable(data))


def write_tsv(path: Path, columns: list[str], rows: list[list[Any]]) -> None:
    lines = ["\t".join(columns)] + ["\t".join("n/a" if v is None else str(v) for v in r) for r in rows]
    io.write_text(path, "\n".join(lines) + "\n")
