"""Brain mask of an MRF series: Otsu + cleaning, edge slices kept."""

from __future__ import annotations

import numpy as np

from mrflesion.masking import otsu_threshold, series_brain_mask


def test_otsu_separates_two_modes() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(1, 0.2, 5000), rng.normal(10, 1, 5000)])
    assert 3 < otsu_threshold(values) < 8


def test_mask_keeps_edge_slices_and_fills_holes() -> None:
    rng = np.random.default_rng(1)
    shape = (40, 40, 6, 5)
    xx, yy = np.mgrid[:40, :40]
    disk = (xx - 20) ** 2 + (yy - 20) ** 2 < 15**2
    data = rng.rayleigh(0.1, shape)
    data[disk] += 5.0
    data[18:22, 18:22, :, :] = 0.05  # a dark hole (ventricle-like) inside the brain
    mask = series_brain_mask(data)
    for k in range(shape[2]):
        assert (mask[:, :, k] == disk).mean() > 0.99, k
    assert mask[20, 20, 3]
