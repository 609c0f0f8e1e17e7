"""A synthetic MRF series from the project's signal model, shared by the MPPCA tests and its benchmark.

Smooth random T1, T2* and M0 maps in an ellipsoidal 'brain', a smooth B1 map, the noise-free magnitude
series of :func:`mrflesion.mrf.signal.simulate` for :meth:`Protocol.default`, plus Gaussian (or Rician)
noise: low rank inside the brain, as MPPCA expects.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from mrflesion.mrf.sequence import Protocol
from mrflesion.mrf.signal import simulate


def synthetic_mrf(
    shape: tuple[int, int, int],
    sigma: float,
    seed: int = 0,
    rician: bool = False,
    *,
    smoothing: float = 2.5,
    m0_smoothing: float = 3.0,
    z_radius: float = 1.3,
    b1: tuple[float, float] = (0.85, 0.3),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(noisy, clean, brain mask) of a ``shape`` series with noise ``sigma`` (M0 ~ 1, signal ~0.1-0.5).

    ``smoothing``, ``m0_smoothing``: Gaussian widths (voxels) of the T1/T2* and M0 fields; ``z_radius``:
    the brain's half-axis along z in the [-1, 1] cube (0.85 and 0.9 in-plane); ``b1``: (offset,
    amplitude) of B1 = offset + amplitude (1 + x y) / 2.
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x, y, z = np.meshgrid(np.linspace(-1, 1, nx), np.linspace(-1, 1, ny), np.linspace(-1, 1, nz), indexing="ij")
    mask = (x / 0.85) ** 2 + (y / 0.9) ** 2 + (z / z_radius) ** 2 <= 1.0

    def smooth(lo: float, hi: float, s: float) -> np.ndarray:
        f = gaussian_filter(rng.standard_normal(shape), s, mode="reflect")
        f = (f - f.min()) / (np.ptp(f) + 1e-12)
        return lo + (hi - lo) * f

    t1 = smooth(700.0, 1900.0, smoothing)
    t2s = smooth(40.0, 90.0, smoothing)
    b1_map = b1[0] + b1[1] * (0.5 + 0.5 * x * y)
    m0 = np.where(mask, smooth(0.7, 1.0, m0_smoothing), 0.0)
    p = Protocol.default(nz)
    clean = np.stack([simulate(p, k, t1[:, :, k], t2s[:, :, k], b1_map[:, :, k]) for k in range(nz)], axis=2)
    clean = np.abs(clean) * m0[..., None]  # magnitude images: the model signal is signed
    if rician:
        noisy = np.hypot(clean + sigma * rng.standard_normal(clean.shape), sigma * rng.standard_normal(clean.shape))
    else:
        noisy = clean + sigma * rng.standard_normal(clean.shape)
    return noisy, clean, mask
