"""Cubic B-spline resampling (mrflesion.bspline) against scipy's independent implementation."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from mrflesion.bspline import bspline_coefficients, bspline_sample


def _volumes(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(1.5, 1.5, 1.0, 0))
    return (smooth * 100 + rng.normal(size=shape)).astype(np.float32)


def test_coefficients_match_scipy_mirror_filter() -> None:
    """Per volume, the coefficients are scipy's ``spline_filter(order=3, mode="mirror")`` to float32
    rounding, for long lines (truncated causal sum) and short ones (exact mirror sum); the threaded
    computation gives the same bytes."""
    for shape in ((40, 9, 23, 3), (3, 2, 30, 2)):
        vol = _volumes(shape)
        coef = bspline_coefficients(vol)
        for k in range(shape[3]):
            ref = ndimage.spline_filter(vol[..., k].astype(np.float64), order=3, mode="mirror")
            assert np.abs(coef[..., k] - ref).max() <= 1e-5 * np.abs(ref).max()
        assert np.array_equal(coef, bspline_coefficients(vol, threads=2))


def test_sample_matches_scipy_and_interpolates() -> None:
    """At random points inside the grid the B-spline is scipy's ``map_coordinates(order=3, mode="mirror")``;
    at the voxel centres it returns the data (interpolating spline); beyond [-0.5, n - 0.5) it is 0."""
    vol = _volumes((20, 16, 11, 4), seed=1)
    coef = bspline_coefficients(vol)
    rng = np.random.default_rng(2)
    hi = np.array(vol.shape[:3]) - 0.51
    pts = -0.49 + rng.random((500, 3)) * (hi + 0.49)
    ours = bspline_sample(coef, pts, threads=2)
    for k in range(vol.shape[3]):
        ref = ndimage.map_coordinates(vol[..., k].astype(np.float64), pts.T, order=3, mode="mirror")
        assert np.abs(ours[:, k] - ref).max() <= 1e-5 * np.abs(vol).max()
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape[:3]], indexing="ij"), -1).astype(float)
    np.testing.assert_allclose(bspline_sample(coef, grid), vol, atol=1e-4 * np.abs(vol).max())
    outside = np.array([[-0.51, 3, 3], [3, 16 - 0.5, 3], [3, 3, 11.2], [1e6, 0, 0]])
    assert np.all(bspline_sample(coef, outside) == 0)
    assert np.array_equal(ours, bspline_sample(coef, pts, threads=1))
