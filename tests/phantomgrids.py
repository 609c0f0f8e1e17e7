"""Small phantom grids (``generate(..., _grid_override=...)``) shared by the tests that generate a phantom."""

from __future__ import annotations

from typing import Any

# A coarse grid (FOV 240 mm) for the cheap fixtures; the demo grid is used where voxel size matters.
TINY: dict[str, Any] = {
    "shape": [80, 80, 8],
    "voxel_mm": [3.0, 3.0, 4.0],
    "supersample": [2, 2, 1],
    "flair": {"shape": [80, 80, 10], "voxel_mm": [3.0, 3.0, 4.0], "supersample": [2, 2, 1]},
    "slab_center_mni": [0.0, -17.0, 14.0],
    "lesion_count": [3, 6],
}
# The demo grid's voxels (2 x 2 x 3 mm, FOV 240 mm) on a thinner slab: lesion volumes are realistic.
DEMO_SLAB: dict[str, Any] = {
    "shape": [120, 120, 10],
    "voxel_mm": [2.0, 2.0, 3.0],
    "supersample": [2, 2, 2],
    "flair": {"shape": [120, 120, 12], "voxel_mm": [2.0, 2.0, 3.0], "supersample": [2, 2, 2]},
    "slab_center_mni": [0.0, -17.0, 10.0],
    "lesion_count": [4, 10],
}
