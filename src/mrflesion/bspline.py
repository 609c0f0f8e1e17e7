"""Cubic B-spline interpolation of many volumes at once at arbitrary voxel coordinates (pure arrays).

What ``ants.apply_transforms(..., interpolator="bSpline")`` computes per volume (ITK's
``BSplineInterpolateImageFunction``, spline order 3, mirror boundary), for a stack of volumes that share
one sampling map: the MRF series (35 volumes) goes into T2w space with one set of coordinates instead of
35 ITK resamplings. Two steps, both compiled (numba) and vectorised over the volumes (last axis):

* :func:`bspline_coefficients`: the interpolating cubic B-spline's coefficients, per axis a causal and an
  anti-causal recursive filter with pole ``sqrt(3) - 2`` and gain 6, initialised for mirror-symmetric
  extension (the sample sequence a b c d ... read as ... c b | a b c d ... | ... c b): the
  decomposition of Unser et al. (IEEE TSP 1993) that ITK's ``BSplineDecompositionImageFilter`` and
  ``scipy.ndimage.spline_filter(mode="mirror")`` implement;
* :func:`bspline_sample`: at each point, the 4 x 4 x 4 coefficients around it (indices mirrored at the
  edges as ITK does) weighted by the cubic B-spline, for every volume; 0 where a point lies outside the
  grid (ITK's buffer, continuous index in [-0.5, n - 0.5) per axis, ANTs' default value).

Float32 storage and float32 accumulation of the 64 terms (ITK accumulates in double): the results agree
with ITK's to ~1e-5 of the image's range (7e-6 on the paper-grid phantom; tests/test_registration.py asks
2e-5, tests/test_bspline.py compares with scipy).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

_POLE = math.sqrt(3.0) - 2.0
_FASTMATH = {"contract"}
_TOL = 1e-10  # causal initialisation: terms below this fraction of the first are dropped (as ITK)


@njit(nogil=True, cache=True)
def _filter_lines(x, z, tol):  # type: ignore[no-untyped-def]
    """In place: B-spline decomposition along the middle axis of ``x`` (lines, n, channels)."""
    n_lines, n, n_ch = x.shape
    if n == 1:
        return
    gain = (1.0 - z) * (1.0 - 1.0 / z)
    horizon = min(n, int(math.ceil(math.log(tol) / math.log(abs(z)))) + 1)
    acc = np.empty(n_ch, np.float64)
    for line in range(n_lines):
        v = x[line]
        for k in range(n):
            for c in range(n_ch):
                v[k, c] *= gain
        # causal initialisation, mirror extension: sum_k z^k v[k] over the decay horizon, or exactly
        # (v[0] + sum_{k=1}^{n-2} (z^k + z^(2n-2-k)) v[k] + z^(n-1) v[n-1]) / (1 - z^(2n-2)) for short lines
        if horizon < n:
            zk = 1.0
            acc[:] = 0.0
            for k in range(horizon):
                for c in range(n_ch):
                    acc[c] += zk * v[k, c]
                zk *= z
        else:
            zn = z ** (n - 1)
            iz = 1.0 / z
            z2n = zn * zn * iz
            for c in range(n_ch):
                acc[c] = v[0, c] + zn * v[n - 1, c]
            zk = z
            for k in range(1, n - 1):
                for c in range(n_ch):
                    acc[c] += (zk + z2n) * v[k, c]
                zk *= z
                z2n *= iz
            for c in range(n_ch):
                acc[c] /= 1.0 - zn * zn
        for c in range(n_ch):
            v[0, c] = acc[c]
        for k in range(1, n):
            for c in range(n_ch):
                v[k, c] += z * v[k - 1, c]
        # anti-causal initialisation and recursion
        for c in range(n_ch):
            v[n - 1, c] = (z / (z * z - 1.0)) * (z * v[n - 2, c] + v[n - 1, c])
        for k in range(n - 2, -1, -1):
            for c in range(n_ch):
                v[k, c] = z * (v[k + 1, c] - v[k, c])


def bspline_coefficients(volumes: np.ndarray, threads: int = 1) -> np.ndarray:
    """Cubic B-spline coefficients of ``volumes`` (X, Y, Z, C) along the three spatial axes, per volume:
    float32 (X, Y, Z, C) C-contiguous, computed in place in float32 with float64 initial sums (the
    recursions are stable, |pole| = 0.27: rounding stays at float32's ~1e-7 relative)."""
    if volumes.ndim != 4:
        raise ValueError(f"expected (X, Y, Z, C) volumes, got shape {volumes.shape}")
    coef = np.array(volumes, dtype=np.float32, order="C")  # the recursions run in place
    nx, ny, nz, nc = coef.shape
    # axis x: lines are (1, nx, ny*nz*nc) views; axis y: (nx, ny, nz*nc); axis z: (nx*ny, nz, nc)
    views = (coef.reshape(1, nx, ny * nz * nc), coef.reshape(nx, ny, nz * nc), coef.reshape(nx * ny, nz, nc))
    for view in views:
        _filter_view(view, threads)
    return coef


def _filter_view(view: np.ndarray, threads: int) -> None:
    """:func:`_filter_lines` on ``view`` (lines, n, channels), its lines (or, for one line, its channels)
    split over ``threads`` threads."""
    if threads > 1 and view.shape[0] >= threads:
        parts = np.array_split(np.arange(view.shape[0]), threads)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda p: _filter_lines(view[p[0] : p[-1] + 1], _POLE, _TOL), parts))
    elif threads > 1 and view.shape[2] >= threads:
        parts = np.array_split(np.arange(view.shape[2]), threads)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda p: _filter_channels(view, int(p[0]), int(p[-1]) + 1), parts))
    else:
        _filter_lines(view, _POLE, _TOL)


def _filter_channels(view: np.ndarray, c0: int, c1: int) -> None:
    part = np.ascontiguousarray(view[:, :, c0:c1])
    _filter_lines(part, _POLE, _TOL)
    view[:, :, c0:c1] = part


@njit(nogil=True, cache=True)
def _mirror(i, n):  # type: ignore[no-untyped-def]
    if n == 1:
        return 0
    period = 2 * n - 2
    i = abs(i) % period
    return i if i < n else period - i


@njit(nogil=True, cache=True)
def _weights(x, n, w, idx):  # type: ignore[no-untyped-def]
    f = math.floor(x)
    t = x - f
    t2 = t * t
    t3 = t2 * t
    w[0] = (1.0 - t) * (1.0 - t) * (1.0 - t) / 6.0
    w[1] = (3.0 * t3 - 6.0 * t2 + 4.0) / 6.0
    w[2] = (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) / 6.0
    w[3] = t3 / 6.0
    for k in range(4):
        idx[k] = _mirror(int(f) - 1 + k, n)


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _sample(coef, coords, out):  # type: ignore[no-untyped-def]
    nx, ny, nz, nc = coef.shape
    wx = np.empty(4, np.float64)
    wy = np.empty(4, np.float64)
    wz = np.empty(4, np.float64)
    ix = np.empty(4, np.int64)
    iy = np.empty(4, np.int64)
    iz = np.empty(4, np.int64)
    acc = np.empty(nc, np.float32)
    for p in range(coords.shape[0]):
        x = coords[p, 0]
        y = coords[p, 1]
        z = coords[p, 2]
        if not (-0.5 <= x < nx - 0.5 and -0.5 <= y < ny - 0.5 and -0.5 <= z < nz - 0.5):
            out[p, :] = 0.0
            continue
        _weights(x, nx, wx, ix)
        _weights(y, ny, wy, iy)
        _weights(z, nz, wz, iz)
        acc[:] = 0.0
        for a in range(4):
            for b in range(4):
                wab = wx[a] * wy[b]
                for d in range(4):
                    wt = np.float32(wab * wz[d])
                    v = coef[ix[a], iy[b], iz[d]]
                    for c in range(nc):
                        acc[c] += wt * v[c]
        out[p, :] = acc


def bspline_sample(coef: np.ndarray, coords: np.ndarray, threads: int = 1) -> np.ndarray:
    """The cubic B-spline with coefficients ``coef`` (X, Y, Z, C) at the voxel coordinates ``coords``
    (..., 3), float32 (..., C); 0 outside the grid (continuous index outside [-0.5, n - 0.5))."""
    flat = np.ascontiguousarray(coords.reshape(-1, 3), dtype=np.float64)
    coef = np.ascontiguousarray(coef, dtype=np.float32)
    out = np.empty((flat.shape[0], coef.shape[3]), np.float32)
    if threads > 1 and flat.shape[0] >= 2 * threads:
        bounds = np.linspace(0, flat.shape[0], threads + 1).astype(int)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda i: _sample(coef, flat[bounds[i] : bounds[i + 1]], out[bounds[i] : bounds[i + 1]]),
                          range(threads)))
    else:
        _sample(coef, flat, out)
    return out.reshape(coords.shape[:-1] + (coef.shape[3],))
