"""Smooth random fields, rigid transforms and image geometry used by the phantom.

All fields are analytic functions of coordinates in mm (sums of random Fourier modes or Gaussian
bumps), so they can be evaluated at any set of points: the same subject is imaged in several
spaces (MRF, T2w, FLAIR, follow-up) by evaluating the same functions at different points.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def dot(p: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``p @ m`` for points (..., 3) and a small matrix (3, K) or vector (3,), without BLAS threads.

    BLAS matmul with an inner dimension of 3 is slow and oversubscribes cores; einsum is not.
    """
    if m.ndim == 1:
        return np.einsum("...k,k->...", p, m)
    return np.einsum("...k,kj->...j", p, m)


@dataclass(frozen=True)
class FourierField:
    """Scalar field sum_k a_k cos(2 pi w_k . p + phi_k) (p in mm), zero mean, rms ~ ``amplitude``."""

    wavevectors: np.ndarray  # (K, 3) cycles/mm
    amplitudes: np.ndarray  # (K,)
    phases: np.ndarray  # (K,)

    @classmethod
    def random(
        cls, rng: np.random.Generator, amplitude: float, wavelength_mm: tuple[float, float], modes: int
    ) -> FourierField:
        d = rng.normal(size=(modes, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        lam = np.exp(rng.uniform(np.log(wavelength_mm[0]), np.log(wavelength_mm[1]), size=modes))
        amps = rng.normal(size=modes)
        amps *= amplitude * np.sqrt(2.0 / max(float(np.sum(amps**2)), 1e-12))
        return cls(d / lam[:, None], amps, rng.uniform(0.0, 2 * np.pi, size=modes))

    def __call__(self, p: np.ndarray) -> np.ndarray:
        if self.amplitudes.size == 0:
            return np.zeros(p.shape[:-1])
        # float32 phases: |arg| < ~100 rad, so the error is < 1e-5 of the (small) amplitude
        arg = dot(p.astype(np.float32), (2 * np.pi * self.wavevectors.T).astype(np.float32))
        arg += self.phases.astype(np.float32)
        return dot(np.cos(arg), self.amplitudes.astype(np.float32)).astype(np.float64)


def gaussian_bump(p: np.ndarray, centre: np.ndarray, sigma: np.ndarray | float) -> np.ndarray:
    """exp(-sum((p - c)^2 / (2 sigma^2))) with per-axis sigma (mm)."""
    q = (p - np.asarray(centre, dtype=float)) / np.asarray(sigma, dtype=float)
    return np.exp(-0.5 * np.sum(q * q, axis=-1))


def rotation_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """Rotation R = Rz Ry Rx from angles (degrees) about x, y, z."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def rigid(
    rotation_deg: np.ndarray, translation_mm: np.ndarray, centre: np.ndarray | None = None
) -> np.ndarray:
    """4x4 rigid transform rotating about ``centre`` (default origin) then translating."""
    m = np.eye(4)
    r = rotation_matrix(rotation_deg)
    c = np.zeros(3) if centre is None else np.asarray(centre, dtype=float)
    m[:3, :3] = r
    m[:3, 3] = c - r @ c + np.asarray(translation_mm, dtype=float)
    return m


def random_rigid(rng: np.random.Generator, max_translation_mm: float, max_rotation_deg: float) -> np.ndarray:
    """Random rigid transform about the origin: translation of norm <= max, rotation angle <= max.

    Directions are uniform on the sphere, magnitudes uniform in [0, max].
    """

    def unit() -> np.ndarray:
        v = rng.normal(size=3)
        return v / np.linalg.norm(v)

    axis = unit()
    angle = np.deg2rad(rng.uniform(0.0, max_rotation_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    m = np.eye(4)
    m[:3, :3] = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)  # Rodrigues
    m[:3, 3] = unit() * rng.uniform(0.0, max_translation_mm)
    return m


def apply_affine(m: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Apply a 4x4 affine to points (..., 3)."""
    return dot(p, m[:3, :3].T) + m[:3, 3]


def grid_affine(shape: tuple[int, ...], voxel_mm: tuple[float, ...]) -> np.ndarray:
    """RAS voxel-to-world affine of an axis-aligned grid centred on the world origin."""
    a = np.diag([*voxel_mm, 1.0]).astype(float)
    a[:3, 3] = -0.5 * (np.asarray(shape[:3], dtype=float) - 1.0) * np.asarray(voxel_mm, dtype=float)
    return a


def subvoxel_offsets(supersample: tuple[int, int, int]) -> np.ndarray:
    """Offsets (voxel units) of the sub-voxel sample points, (S, 3)."""
    axes = [(np.arange(s) + 0.5) / s - 0.5 for s in supersample]
    g = np.meshgrid(*axes, indexing="ij")
    return np.stack([x.ravel() for x in g], axis=-1)


def undo_displacement(
    target: np.ndarray,
    displacement: np.ndarray,
    displacement_affine: np.ndarray,
    axis: int = 1,
    tol_mm: float = 1e-6,
    max_iter: int = 100,
) -> np.ndarray:
    """World points p with p + d(p) e_axis = ``target`` (..., 3), by fixed-point iteration: the points
    of a distorted image (``displacement``: a scalar field in mm on the grid of ``displacement_affine``,
    linearly interpolated) that land on ``target``. Converges for |dd/dy| < 1 (a smooth EPI field)."""
    from scipy import ndimage

    ainv = np.linalg.inv(displacement_affine)
    p = np.array(target, dtype=float, copy=True)
    for _ in range(int(max_iter)):
        vox = p @ ainv[:3, :3].T + ainv[:3, 3]
        new = np.array(target, dtype=float, copy=True)
        new[..., axis] -= ndimage.map_coordinates(displacement, np.moveaxis(vox, -1, 0), order=1, mode="nearest")
        done = np.abs(new - p).max() < tol_mm
        p = new
        if done:
            break
    return p
