"""Phantom constants (``resources/phantom.yaml``) and the named grids."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from ..paths import workflow_root


@lru_cache(maxsize=4)
def _load(path: str) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


def load_config(path: str | Path | None = None) -> dict[str, Any]:
    """The phantom configuration (cached; treat it as read-only)."""
    return _load(str(Path(path or workflow_root() / "resources" / "phantom.yaml").resolve()))


def _grids() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, g in load_config()["grids"].items():
        out[name] = {
            "shape": tuple(int(x) for x in g["shape"]),
            "voxel_mm": tuple(float(x) for x in g["voxel_mm"]),
            "n_slices": int(g["shape"][2]),
            "flair_shape": tuple(int(x) for x in g["flair"]["shape"]),
            "flair_voxel_mm": tuple(float(x) for x in g["flair"]["voxel_mm"]),
        }
    return out


#: Named grids: shape (x, y, slices), voxel size (mm), number of slices, FLAIR grid.
GRIDS: dict[str, dict[str, Any]] = _grids()
