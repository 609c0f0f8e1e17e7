"""Floating-point bounds for the numerical tests: what the algorithms guarantee on any CPU.

Float32 results of different arithmetic paths (BLAS/LAPACK kernels chosen per CPU, block sizes,
thread counts, summation orders) differ by rounding. An assertion that a result is "identical" on a
tuned share of voxels, or agrees to a tolerance measured on one machine, fails elsewhere where a
near-tie or a borderline decision falls the other way. The helpers here classify such cases by their
definition, from float64 recomputations and standard rounding-error bounds (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., sections 2.2 and 3.1): ``u`` is the unit roundoff and
``gamma(k) = k u / (1 - k u)`` bounds the relative error of ``k`` successive roundings, e.g. of a dot
product of length ``k`` in any summation order, with or without FMA.

Matching (:mod:`mrflesion.mrf.matching`): a voxel where the pruned and the exact searches choose
different atoms is a *tie* when the two atoms' float64 scores differ by no more than
:func:`match_tie_bound`. MPPCA (:mod:`mrflesion.denoise`): a patch's Marchenko-Pastur decision is
*borderline* when float32 rounding of its covariance eigenvalues can change it
(:func:`mp_decisions`); every sigma map must lie in the per-voxel range rounding allows
(:meth:`MPDecisions.sigma_sq_interval`, :func:`check_sigma`): the weighted eigenvalue error bound where
no covering patch is borderline, the extreme weighted means of the possible decisions where one is.

Other arithmetic paths on one machine: :data:`VARIANTS` (environment variables that select other MKL,
torch and OpenBLAS kernels) and :func:`variant_results`, which reruns a small matching and MPPCA case
in subprocesses so that the tests can assert the same properties for each.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mrflesion.denoise import _mode, _mp_variance, _patch_radius, _select_centres

U32 = 2.0**-24  # float32 unit roundoff
U64 = 2.0**-53


def gamma(k: int, u: float = U32) -> float:
    """Relative error bound of ``k`` successive roundings with unit roundoff ``u``."""
    return k * u / (1.0 - k * u)


# ------------------------------------------------------------------------------------------ matching


def match_score_error(m: int) -> float:
    """Bound on ``|score32 (1 + eta) - score64|`` for one float32 evaluation of one atom's score.

    The searches score ``y . a`` with ``y = fl(s / fl(|s|))`` (float32 signal ``s``, ``m`` entries) and
    the stored float32 unit atom ``a``. Writing ``fl(|s|) = |s| (1 + eta)``, ``y_i = ybar_i (1 + d_i) /
    (1 + eta)`` with ``ybar = s / |s|`` exact and ``|d_i| <= u`` (one division). A float32 dot product
    of length m in any order has ``|fl(x . a) - x . a| <= gamma(m) sum |x_i a_i|``; with the division
    that is ``gamma(m + 1) sum |ybar_i a_i| <= gamma(m + 1) |a| <= gamma(m + 1) (1 + u)`` (Cauchy-Schwarz,
    ``|ybar| = 1``; the stored atom's norm is 1 to within u). The factor ``1 / (1 + eta)`` is the same
    for every atom of the voxel, so it never changes which atom scores higher and is left out.
    """
    return gamma(m + 1) * (1.0 + U32)


def match_tie_bound(m: int) -> float:
    """Largest float64 score difference that float32 matching may order either way (a tie).

    The exact search takes the argmax of one float32 evaluation per atom: it can prefer atom b over a
    only if ``score64(a) - score64(b) <= 2 e`` (``e`` = :func:`match_score_error`). The pruned search's
    choice goes through two separate float32 evaluations (the best score per candidate cluster in an
    (atoms x voxels) product, then the argmax inside the winning cluster in a (voxels x atoms)
    product, whose summation orders may differ): it trails the best atom by at most ``4 e``. Its
    pruning test (medoid bound minus ``_MARGIN`` = 2e-5, cone angles padded by 1e-4 rad) leaves a
    margin far above these rounding errors, so no cluster holding a better atom is skipped. Hence two
    choices differ in float64 score by at most ``4 e``. ``+ 2 u``: the same holds for the unrounded
    (float64) atoms, each score moving by at most ``u |ybar| |a|`` when the atom is rounded to float32
    for storage. For m = 35: 8.7e-6 (``4 e`` = 8.6e-6), far below the pruning margin and far above the
    typical (random-walk) rounding, ~1e-7.
    """
    return 4.0 * match_score_error(m) + 2.0 * U32


def quality_error(m: int) -> float:
    """Bound on ``|quality - score64(chosen atom)|`` for the reported (unrefined) match quality.

    ``quality = clamp(fl(sum y_i a_i), 0, 1)``: the score error of :func:`match_score_error` plus the
    common factor ``1 / (1 + eta)`` of the float32 norm (sum of m squares: ``gamma(m)``, square root:
    half of it plus u, so ``|eta| <= gamma(m)`` and ``|eta / (1 + eta)| <= gamma(m) / (1 - gamma(m))``)
    and u for the clamp of a float64 score up to ``1 + u``. For m = 35: 4.3e-6.
    """
    e = match_score_error(m)
    return e + gamma(m) / (1.0 - gamma(m)) * (1.0 + e) + U32


def refined_quality_tolerance(m: int) -> float:
    """How far the refined quality may lie below the unrefined one (the refinement never fits worse).

    The refined quality is the float64 cosine of the signal with the model at the refined parameters,
    kept only where it is at least the float64 cosine ``cos0`` of the matched atom's re-simulated model
    (else ``cos0`` itself), stored as float32 (u). The unrefined quality is the matched atom's float32
    score: within :func:`quality_error` of its float64 score with the stored float32 atom, which is
    within u of ``cos0`` (the atom's rounding for storage). For m = 35: 4.4e-6.
    """
    return quality_error(m) + 2.0 * U32


def atom_index_of_maps(maps: dict[str, np.ndarray], dictionary, where: tuple[np.ndarray, ...]) -> np.ndarray:
    """Dictionary atom index of unrefined maps at ``where`` (their float32 T1, T2*, B1 identify it)."""
    key_dtype = np.dtype((np.void, 12))

    def keys(t1: np.ndarray, t2: np.ndarray, b1: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.stack([t1, t2, b1], axis=1).astype(np.float32)).view(key_dtype)[:, 0]

    grid_keys = keys(dictionary.t1, dictionary.t2star, dictionary.b1)
    order = np.argsort(grid_keys)
    k = keys(maps["T1"][where], maps["T2star"][where], maps["B1"][where])
    pos = np.minimum(np.searchsorted(grid_keys[order], k), order.size - 1)
    idx = order[pos]
    assert np.all(grid_keys[idx] == k), "maps hold parameters that are not a dictionary atom"
    return idx


def unit_signals64(signals: np.ndarray) -> np.ndarray:
    """Rows of (float32) signals normalised in float64 (``ybar`` of :func:`match_score_error`)."""
    s = np.asarray(signals, dtype=np.float64)
    return s / np.linalg.norm(s, axis=1, keepdims=True)


def best_scores64(y: np.ndarray, atoms: np.ndarray, rows: int = 512) -> np.ndarray:
    """Float64 brute-force maximum over all (float32-stored) atoms of ``y . a``, in voxel blocks."""
    a = np.asarray(atoms, dtype=np.float64).T.copy()
    out = np.empty(y.shape[0])
    for s in range(0, y.shape[0], rows):
        out[s : s + rows] = (y[s : s + rows] @ a).max(axis=1)
    return out


def _slice_voxels(mask: np.ndarray) -> dict[int, tuple[np.ndarray, ...]]:
    """Per slice position z with voxels in ``mask``: their (x, y, z) indices."""
    out = {}
    for z in sorted(set(np.nonzero(mask)[2].tolist())):
        where = np.nonzero(mask[:, :, z])
        out[z] = (*where, np.full(where[0].size, z))
    return out


def float64_best(series: np.ndarray, dictionary, mask: np.ndarray) -> dict[int, np.ndarray]:
    """Per slice position, the float64 brute-force best score of each mask voxel (in
    :func:`compare_matchings`' order)."""
    return {z: best_scores64(unit_signals64(series[w]), dictionary.slice(z).atoms)
            for z, w in _slice_voxels(mask).items()}


@dataclass
class MatchComparison:
    """Float64 scores of two matchings' choices: ``n_ties`` voxels with different atoms."""

    voxels: int
    n_ties: int
    max_tie_gap: float  # largest |score64(a) - score64(b)| over the differing voxels
    max_gap_a: float  # largest best64 - score64(a's choice)
    max_gap_b: float
    max_quality_error: float  # largest |quality_a - score64(a's choice)|


def compare_matchings(series: np.ndarray, dictionary, mask: np.ndarray, a: dict, b: dict,
                      best64: dict[int, np.ndarray] | None = None) -> MatchComparison:
    """Assert the tie-aware guarantees of two unrefined matchings ``a`` (pruned) and ``b`` of ``series``.

    Every voxel has the same atom in both or a tie (:func:`match_tie_bound`); each choice scores within
    that bound of the float64 brute-force best (``best64`` from :func:`float64_best`, computed if not
    given); ``a``'s quality is its atom's float64 score to within :func:`quality_error`. Mask voxels
    must have a non-zero signal (a matched atom).
    """
    m = series.shape[-1]
    tie = match_tie_bound(m)
    n_vox = n_ties = 0
    tie_gap = gap_a = gap_b = q_err = 0.0
    if best64 is None:
        best64 = float64_best(series, dictionary, mask)
    for z, where3 in _slice_voxels(mask).items():
        ia = atom_index_of_maps(a, dictionary, where3)
        ib = atom_index_of_maps(b, dictionary, where3)
        atoms = dictionary.slice(z).atoms
        y = unit_signals64(series[where3])
        sa = np.einsum("ij,ij->i", y, atoms[ia].astype(np.float64))
        sb = np.einsum("ij,ij->i", y, atoms[ib].astype(np.float64))
        best = best64[z]
        differ = ia != ib
        d = np.abs(sa - sb)[differ]
        n_vox += ia.size
        n_ties += int(differ.sum())
        tie_gap = max(tie_gap, float(d.max()) if d.size else 0.0)
        gap_a = max(gap_a, float(np.max(best - sa)))
        gap_b = max(gap_b, float(np.max(best - sb)))
        q_err = max(q_err, float(np.max(np.abs(a["quality"][where3].astype(np.float64) - sa))))
        assert np.all(d <= tie), f"slice {z}: different atoms {np.sum(d > tie)} times beyond the tie bound {tie:.2e}"
        assert np.all(sa >= best - tie), f"slice {z}: pruned choice below the float64 best by {np.max(best - sa):.2e}"
        assert np.all(sb >= best - tie), f"slice {z}: exact choice below the float64 best by {np.max(best - sb):.2e}"
    assert q_err <= quality_error(m), f"quality differs from the chosen atom's float64 score by {q_err:.2e}"
    return MatchComparison(n_vox, n_ties, tie_gap, gap_a, gap_b, q_err)


# --------------------------------------------------------------------------------------------- MPPCA


def mppca_centres(shape3: tuple[int, ...], mask: np.ndarray | None, patch_radius: int | tuple[int, int, int] = 2,
                  exact: bool = False, stride: int | tuple[int, int, int] | None = None
                  ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Patch corners ``(P, 3)`` that :func:`mrflesion.denoise.mppca` uses with these arguments, and the
    patch size (from the module's own geometry helpers)."""
    shape = (int(shape3[0]), int(shape3[1]), int(shape3[2]))
    mask_np = np.ones(shape, bool) if mask is None else np.asarray(mask, bool)
    pr = _patch_radius(shape, patch_radius)
    psize = (int(2 * pr[0] + 1), int(2 * pr[1] + 1), int(2 * pr[2] + 1))
    st, _ = _mode(shape, pr, exact, stride, None)
    grid = tuple(s - p + 1 for s, p in zip(shape, psize, strict=True))
    mask_c = mask_np[pr[0] : pr[0] + grid[0], pr[1] : pr[1] + grid[1], pr[2] : pr[2] + grid[2]]
    centres = mask_c if st == (1, 1, 1) else _select_centres(mask_c, mask_np, psize, st)
    return np.argwhere(centres), psize


def _extreme_weighted_mean(x: np.ndarray, a: np.ndarray, b: np.ndarray, lowest: bool) -> np.ndarray:
    """Per row, the min (or max) of ``sum w x / sum w`` over weights ``a <= w <= b`` (0 where a = b = 0).

    The extremum puts the largest weights on the smallest (largest) values: with the values sorted, the
    first j get ``b`` and the rest ``a``, for the best j.
    """
    o = np.argsort(x if lowest else -x, axis=1)
    x, a, b = (np.take_along_axis(t, o, axis=1) for t in (x, a, b))
    zero = np.zeros((x.shape[0], 1))
    head = np.concatenate([zero, np.cumsum(b * x, axis=1)], axis=1)
    head_w = np.concatenate([zero, np.cumsum(b, axis=1)], axis=1)
    tail = np.concatenate([np.cumsum((a * x)[:, ::-1], axis=1)[:, ::-1], zero], axis=1)
    tail_w = np.concatenate([np.cumsum(a[:, ::-1], axis=1)[:, ::-1], zero], axis=1)
    den = head_w + tail_w
    with np.errstate(invalid="ignore", divide="ignore"):
        val = np.where(den > 0, (head + tail) / np.where(den > 0, den, 1.0), np.inf if lowest else -np.inf)
    out = val.min(axis=1) if lowest else val.max(axis=1)
    return np.where(np.isfinite(out), out, 0.0)


@dataclass
class MPDecisions:
    """Float64 Marchenko-Pastur decisions of a set of patches and what float32 rounding can make of them.

    Per patch: the float64 ``var`` and ``k``; ``var_lo``..``var_hi`` and ``k_min``..``k_max``: the values
    a computation whose eigenvalues are within ``delta`` of the float64 ones can produce (see
    :func:`mp_decisions`); ``borderline``: those ranges hold more than one decision.
    """

    shape3: tuple[int, int, int]
    corners: np.ndarray  # (P, 3)
    psize: tuple[int, int, int]
    var: np.ndarray
    k: np.ndarray
    delta: np.ndarray
    var_lo: np.ndarray
    var_hi: np.ndarray
    k_min: np.ndarray
    k_max: np.ndarray
    borderline: np.ndarray  # c* or k may differ from the float64 decision
    zero: np.ndarray  # all-zero patches (exact in any precision)
    u: float
    _cover: np.ndarray | None = None

    def cover_ids(self) -> np.ndarray:
        """(V, n) ids of the patches covering each voxel (flat, C order), -1 for none."""
        if self._cover is None:
            shape = self.shape3
            pid = -np.ones(shape, np.int64)
            pid[tuple(self.corners.T)] = np.arange(len(self.corners))
            offs = np.stack(np.meshgrid(*[np.arange(p) for p in self.psize], indexing="ij"), -1).reshape(-1, 3)
            vox = np.argwhere(np.ones(shape, bool))
            ids = -np.ones((vox.shape[0], offs.shape[0]), np.int64)
            for j, o in enumerate(offs):
                c = vox - o
                ok = np.all((c >= 0) & (c < np.array(shape)), axis=1)
                ids[ok, j] = pid[c[ok, 0], c[ok, 1], c[ok, 2]]
            self._cover = ids
        return self._cover

    def gather(self, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """(V, n): ``values`` of the patches covering each voxel (``fill`` where none)."""
        ids = self.cover_ids()
        return np.where(ids >= 0, np.asarray(values, float)[np.maximum(ids, 0)], fill)

    def covered(self, which: np.ndarray | None = None) -> np.ndarray:
        """Voxels covered by at least one of the patches selected by ``which`` (default: any)."""
        sel = np.ones(len(self.corners), bool) if which is None else np.asarray(which, bool)
        return self.gather(sel.astype(float)).max(axis=1).reshape(self.shape3) > 0

    def sigma_sq_interval(self) -> tuple[np.ndarray, np.ndarray]:
        """Per voxel, the range of the sigma map squared that a float32 run can produce.

        sigma^2 is the ``w = 1 / (1 + k)``-weighted mean of the covering patches' var (clamped at 0). With
        each patch's var in ``[var_lo, var_hi]`` and w in ``[1 / (1 + k_max), 1 / (1 + k_min)]``, the mean lies
        between the extreme weighted means (:func:`_extreme_weighted_mean`). Widened for the float32
        accumulation: the sums of ``w var`` and ``w`` over N patches (``gamma(N)`` each, relative to the sums
        of absolute values), the float32 weights (u), the division, square root and rounding of the result
        (4 u): ``(2 gamma(N) + 6 u) max|var|``. Where no patch is borderline, the width is twice the
        weighted mean of the var error plus that rounding: the tolerance of two runs' difference there.
        """
        w_lo = self.gather(1.0 / (1.0 + self.k_max))
        w_hi = self.gather(1.0 / (1.0 + self.k_min))
        lo = _extreme_weighted_mean(self.gather(self.var_lo), w_lo, w_hi, lowest=True)
        hi = _extreme_weighted_mean(self.gather(self.var_hi), w_lo, w_hi, lowest=False)
        n_cov = (self.cover_ids() >= 0).sum(axis=1)
        big = np.maximum(np.abs(self.gather(self.var_lo)), np.abs(self.gather(self.var_hi))).max(axis=1)
        pad = (2.0 * np.array([gamma(int(c), self.u) for c in n_cov]) + 6.0 * self.u) * big
        lo, hi = np.maximum(lo - pad, 0.0), np.maximum(hi + pad, 0.0)
        return lo.reshape(self.shape3), hi.reshape(self.shape3)

    def sigma_sq_float64(self) -> np.ndarray:
        """The sigma map squared of the float64 decisions (exact arithmetic on the float64 eigenvalues)."""
        w = self.gather(1.0 / (1.0 + self.k))
        num = (w * self.gather(self.var)).sum(axis=1)
        den = w.sum(axis=1)
        return np.maximum(np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0), 0.0).reshape(self.shape3)


def mp_decisions(data: np.ndarray, corners: np.ndarray, psize: tuple[int, int, int], u: float = U32,
                 input_rounding: bool = False) -> MPDecisions:
    """The MP decision of each patch in float64, and what a float32 computation can make of it.

    Independent of the module's float32 code: the covariance ``C = Xc^T Xc / n`` of each patch of
    ``data`` (as float64) and its eigenvalues ``L`` (ascending; the last n - 1 if m > n - 1). A float32
    computation (unit roundoff ``u``) of them is within

        delta = (gamma(n + 2) + gamma(m)) trace(C) + gamma(n)^2 sum_j mean|X_j|^2  ~=  (n + m) u trace(C)

    of each float64 eigenvalue. The float32 covariance differs from C by at most ``gamma(n + 2) |Xc|^T
    |Xc| / n`` entrywise (n-term dot products, the rounding of the subtraction of the mean), plus
    ``d d^T`` for the rounding d of the mean itself (``|d_j| <= gamma(n) mean|X_j|``; its first-order
    terms vanish since the columns of Xc sum to 0); the 2-norm of the first part is at most ``gamma(n + 2)
    trace(C)`` (``|| |Xc|^T |Xc| ||_2 <= ||Xc||_F^2 = n trace(C)``). A backward-stable symmetric eigensolver
    (eigh, eigvalsh, any LAPACK path) adds a backward error of ``p(m) u ||C||``, ``p(m) ~ m``, ``||C|| <=
    trace(C)``. By Weyl's inequality no eigenvalue moves by more than the 2-norm of the perturbation.
    ``input_rounding``: the float32 run rounded ``data`` (float64) to float32 (``|dX| <= u |X|``) while the
    other (e.g. dipy) used it as is; this adds ``2 u sqrt(trace(C) (trace(C) + |mean|^2)) + u^2 (trace(C) +
    |mean|^2)`` (``C(X + dX) - C(X) = (Xc^T dXc + dXc^T Xc + dXc^T dXc) / n``, ``||dXc||_F <= ||dX||_F``).

    The decision (module docstring): c* = the largest c with ``not f(c) > 0``, ``f(c) = L[c] - L[0] -
    4 sqrt((c + 1) / n) mean(L[:c + 1])`` (c = 0 if none), ``var = mean(L[:c* + 1])``, ``k`` = #{L >= tau},
    ``tau = (1 + sqrt(m / n))^2 var``. A float32 ``f(c)`` is within ``(2 + 4 sqrt((c + 1) / n)) delta``
    (through the eigenvalues) ``+ gamma(m + 4) (|L[c]| + |L[0]| + 4 sqrt((c + 1) / n) mean|L[:c + 1]|)``
    (its own evaluation: cumulative sum, division, square root, products, differences) of ``f(c)``.
    So the float32 c* is at least the largest c with ``f(c)`` below minus its bound (a certain stop) and
    at most the largest c with ``f(c)`` within its bound (a possible stop); c* can only change if some f(c)
    with c >= c* lies within its bound. Each ``mean(L[:c + 1])`` moves by at most ``delta + gamma(m + 1)
    mean|L[:c + 1]|``, which gives ``[var_lo, var_hi]`` over the possible c*; tau moves with it (times
    ``(1 + sqrt(m / n))^2``, plus ``2 u tau`` for its own rounding), so k lies between #{L - delta >= tau_hi}
    and #{L + delta >= tau_lo}: more than one value only if an eigenvalue lies within ``delta`` plus the
    tau error of tau. A patch is borderline if c* or k can differ from the float64 decision. All-zero
    patches (trace 0) are exact in any precision (C = 0, all L and f(c) are 0, c* = ell - 1, var = 0, all
    components kept): never borderline.
    """
    x = np.asarray(data, dtype=np.float64)
    shape3 = (int(x.shape[0]), int(x.shape[1]), int(x.shape[2]))
    m = int(x.shape[3])
    n = int(np.prod(psize))
    corners = np.asarray(corners, np.int64).reshape(-1, 3)
    offs = np.stack(np.meshgrid(*[np.arange(p) for p in psize], indexing="ij"), -1).reshape(-1, 3)
    tau_f2 = (1.0 + math.sqrt(m / n)) ** 2
    keys = ("var", "k", "delta", "var_lo", "var_hi", "k_min", "k_max", "borderline", "zero")
    parts: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    for s in range(0, len(corners), 1024):
        cb = corners[s : s + 1024]
        vox = cb[:, None, :] + offs[None, :, :]
        X = x[vox[..., 0], vox[..., 1], vox[..., 2]]  # (B, n, m)
        mean = X.mean(axis=1, keepdims=True)
        Xc = X - mean
        C = np.einsum("bij,bik->bjk", Xc, Xc) / n
        tr = np.einsum("bii->b", C)
        d = (gamma(n + 2, u) + gamma(m, u)) * tr + gamma(n, u) ** 2 * (np.abs(X).mean(axis=1) ** 2).sum(axis=1)
        if input_rounding:
            big = tr + np.einsum("bij,bij->b", mean, mean)
            d = d + 2.0 * u * np.sqrt(tr * big) + u * u * big
        L_all = np.linalg.eigvalsh(C)
        L = L_all[:, -(n - 1) :] if m > n - 1 else L_all
        idx = np.arange(L.shape[1])
        cnt = idx + 1.0
        sq = 4.0 * np.sqrt(cnt / n)
        cummean = np.cumsum(L, axis=1) / cnt
        absmean = np.cumsum(np.abs(L), axis=1) / cnt
        f = L - L[:, :1] - sq * cummean
        f_err = (2.0 + sq) * d[:, None] + gamma(m + 4, u) * (np.abs(L) + np.abs(L[:, :1]) + sq * absmean)
        cstar = np.where(~(f > 0), idx, 0).max(axis=1)
        c_lo = np.where(f < -f_err, idx, 0).max(axis=1)  # certain stops
        c_hi = np.where(f <= f_err, idx, 0).max(axis=1)  # possible stops
        var = cummean[np.arange(len(cb)), cstar]
        # the same decision as the module's vectorised classifier (float64 in, float64 out)
        assert np.allclose(var, _mp_variance(torch.from_numpy(L_all), n).numpy(), rtol=1e-9, atol=1e-30)
        possible = (idx[None, :] >= c_lo[:, None]) & (idx[None, :] <= c_hi[:, None])
        mean_err = d[:, None] + gamma(m + 1, u) * absmean
        var_lo = np.where(possible, cummean - mean_err, np.inf).min(axis=1)
        var_hi = np.where(possible, cummean + mean_err, -np.inf).max(axis=1)
        tau_lo = tau_f2 * var_lo - 2.0 * u * np.abs(tau_f2 * var_lo)
        tau_hi = tau_f2 * var_hi + 2.0 * u * np.abs(tau_f2 * var_hi)
        k = (L_all >= tau_f2 * var[:, None]).sum(axis=1)
        k_min = (L_all - d[:, None] >= tau_hi[:, None]).sum(axis=1)
        k_max = (L_all + d[:, None] >= tau_lo[:, None]).sum(axis=1)
        zero = tr == 0
        var_lo[zero] = var_hi[zero] = 0.0
        k_min[zero] = k_max[zero] = m
        borderline = ((c_lo != c_hi) | (k_min != k_max)) & ~zero
        for key, val in zip(keys, (var, k, d, var_lo, var_hi, k_min, k_max, borderline, zero), strict=True):
            parts[key].append(val)
    cat = {key: np.concatenate(v) for key, v in parts.items()}
    return MPDecisions(shape3, corners, psize, cat["var"], cat["k"], cat["delta"], cat["var_lo"], cat["var_hi"],
                       cat["k_min"], cat["k_max"], cat["borderline"].astype(bool), cat["zero"].astype(bool), u)


def check_sigma(dec: MPDecisions, *sigmas: np.ndarray, where: np.ndarray | None = None) -> dict[str, float]:
    """Assert that every sigma map lies, voxel by voxel, in the range float32 rounding allows
    (:meth:`MPDecisions.sigma_sq_interval`); returns the counts and widths for a printout."""
    lo, hi = dec.sigma_sq_interval()
    sel = np.ones(dec.shape3, bool) if where is None else np.asarray(where, bool)
    for i, s in enumerate(sigmas):
        s2 = np.asarray(s, np.float64) ** 2
        out = sel & ((s2 < lo) | (s2 > hi))
        assert not out.any(), (
            f"sigma map {i}: {int(out.sum())} voxels outside the float32 range, e.g. {np.argwhere(out)[:3].tolist()}: "
            f"{s2[out][:3]} not in [{lo[out][:3]}, {hi[out][:3]}]"
        )
    border = dec.covered(dec.borderline) & sel
    s64 = dec.sigma_sq_float64()
    firm = sel & ~border & (s64 > 0)
    return {
        "patches": float(len(dec.corners)),
        "borderline_patches": float(dec.borderline.sum()),
        "zero_patches": float(dec.zero.sum()),
        "voxels": float(sel.sum()),
        "borderline_voxels": float(border.sum()),
        "max_rel_width_firm": float(np.max((hi - lo)[firm] / s64[firm])) if firm.any() else 0.0,
        "median_rel_width_borderline": float(np.median((hi - lo)[border & (s64 > 0)] / s64[border & (s64 > 0)]))
        if (border & (s64 > 0)).any() else 0.0,
    }


# -------------------------------------------------------------------------------- other arithmetic paths

# Environment variants that select other kernels on the same machine, and the CPU flags each needs:
# MKL_CBWR=COMPATIBLE: MKL's SSE2-compatible branch for torch's matmuls (bmm, mm) and LAPACK (eigh, eigvalsh);
# MKL_CBWR=AVX2 (+ torch's AVX2 kernels, OpenBLAS' Haswell kernels in numpy): an AVX2 machine such as the one
# the issue came from; ATEN_CPU_CAPABILITY=default + OPENBLAS_CORETYPE=Prescott: torch's scalar kernels and
# numpy's SSE3 BLAS (which builds the dictionary's clusters). MKL_ENABLE_INSTRUCTIONS changed nothing on the
# AMD EPYC (Zen 4) these were tried on, MKL_CBWR did.
VARIANTS: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "mkl-compatible": ({"MKL_CBWR": "COMPATIBLE"}, ()),
    "avx2": ({"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "OPENBLAS_CORETYPE": "Haswell"}, ("avx2", "fma")),
    "generic": ({"ATEN_CPU_CAPABILITY": "default", "OPENBLAS_CORETYPE": "Prescott"}, ("pni",)),
}
_VARIANT_VOXELS = 800  # matching case: slice position 0 of the 4-slice protocol, SNR 50
_VARIANT_TIMEOUT_S = 300


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (Linux), None where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def unsupported_reason(variant: str) -> str | None:
    """Why ``variant`` cannot run on this machine (None if it can)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "x86-64 kernels only"
    flags = cpu_flags()
    need = VARIANTS[variant][1]
    if need and (flags is None or not set(need) <= flags):
        return f"CPU lacks {sorted(set(need) - (flags or set()))}"
    return None


def arithmetic_probe() -> dict[str, str]:
    """Hashes of a few float32 results (matmul, batched covariance, eigvalsh, eigh, reductions), the
    torch CPU capability and numpy's BLAS kernel: tells whether a variant changed the arithmetic."""
    import hashlib

    def h(a: np.ndarray) -> str:
        return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()[:10]

    rng = np.random.default_rng(0)
    a = rng.random((300, 35), dtype=np.float32)
    b = rng.random((35, 999), dtype=np.float32)
    x = torch.from_numpy(rng.standard_normal((64, 125, 35), dtype=np.float32))
    cov = torch.bmm(x.transpose(1, 2), x) / 125
    out = {
        "torch_mm": h((torch.from_numpy(a) @ torch.from_numpy(b)).numpy()),
        "torch_bmm": h(cov.numpy()),
        "torch_eigvalsh": h(torch.linalg.eigvalsh(cov).numpy()),
        "torch_eigh": h(torch.linalg.eigh(cov)[1].abs().numpy()),
        "torch_sum": h(torch.from_numpy(b).sum(dim=1).numpy()),
        "numpy_sgemm": h(a @ b),
        "torch_capability": str(torch.backends.cpu.get_cpu_capability()),
    }
    try:
        import threadpoolctl

        out["numpy_blas"] = ",".join(
            str(i.get("architecture")) for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"
        )
    except ImportError:  # pragma: no cover
        pass
    return out


@dataclass
class VariantResult:
    env: dict[str, str]
    probe: dict[str, str]
    changed: list[str]  # probe entries that differ from this process's
    dictionary: Any  # MRFDictionary built in the variant (its clusters come from its BLAS)
    series: np.ndarray
    mask: np.ndarray
    svd: dict[str, np.ndarray]
    exact: dict[str, np.ndarray]
    noisy: np.ndarray  # partly-zero MPPCA input (float64)
    den: np.ndarray  # fast mode, stride 1
    sig: np.ndarray
    ref: np.ndarray  # exact mode
    ref_sigma: np.ndarray


def _run_variant_case(out_dir: Path) -> None:
    """In a subprocess: a small matching and MPPCA case under this process's environment."""
    from test_denoise import _synthetic
    from test_matching import make_series

    from mrflesion.denoise import mppca
    from mrflesion.mrf.dictionary import DictionaryGrid, build_dictionary
    from mrflesion.mrf.matching import match
    from mrflesion.mrf.sequence import Protocol

    protocol = Protocol.default(4)
    dictionary = build_dictionary(protocol, DictionaryGrid(), slices=(0,))
    dictionary.save(out_dir / "dict.npz", include_atoms=True)
    series, _, mask = make_series(protocol, _VARIANT_VOXELS, seed=11, b1_grid=False, snr=50.0)
    mask[:, :, 1:] = False
    kw = {"mask": mask, "device": "cpu", "threads": 1, "refine": False}
    svd = match(series, dictionary, mode="svd", **kw)
    exact = match(series, dictionary, mode="exact", **kw)
    noisy, _, _ = _synthetic(seed=4)
    noisy[:8] = 0.0
    ref, ref_sigma = mppca(noisy, device="cpu", exact=True, n_threads=1)
    den, sig = mppca(noisy, device="cpu", stride=1, n_threads=1)
    arrays = {f"svd_{k}": v for k, v in svd.items()} | {f"exact_{k}": v for k, v in exact.items()}
    np.savez(out_dir / "out.npz", series=series, mask=mask, noisy=noisy, den=den, sig=sig, ref=ref,
             ref_sigma=ref_sigma, probe=np.array(json.dumps(arithmetic_probe())), **arrays)


@functools.cache
def variant_results() -> dict[str, VariantResult | str]:
    """Run the small case once per supported variant (concurrently, one thread each); per variant its
    result, or why it was skipped or failed."""
    from mrflesion.mrf.dictionary import MRFDictionary

    here = arithmetic_probe()
    results: dict[str, VariantResult | str] = {}
    with tempfile.TemporaryDirectory(prefix="numeric-variants-") as tmp:
        procs = {}
        for name, (env, _) in VARIANTS.items():
            reason = unsupported_reason(name)
            if reason:
                results[name] = f"skipped: {reason}"
                continue
            d = Path(tmp) / name
            d.mkdir()
            full_env = {**os.environ, **env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                        "OPENBLAS_NUM_THREADS": "1"}
            procs[name] = (d, subprocess.Popen([sys.executable, __file__, str(d)], env=full_env,
                                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        for name, (d, proc) in procs.items():
            try:
                log, _ = proc.communicate(timeout=_VARIANT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                log, _ = proc.communicate()
            if proc.returncode != 0:
                results[name] = f"failed (exit {proc.returncode}):\n{log[-3000:]}"
                continue
            with np.load(d / "out.npz") as z:
                r = {k: z[k] for k in z.files}
            probe = json.loads(str(r["probe"]))
            results[name] = VariantResult(
                env=VARIANTS[name][0],
                probe=probe,
                changed=sorted(k for k in probe if probe[k] != here.get(k)),
                dictionary=MRFDictionary.load(d / "dict.npz"),
                series=r["series"],
                mask=r["mask"],
                svd={k[4:]: v for k, v in r.items() if k.startswith("svd_")},
                exact={k[6:]: v for k, v in r.items() if k.startswith("exact_")},
                noisy=r["noisy"],
                den=r["den"],
                sig=r["sig"],
                ref=r["ref"],
                ref_sigma=r["ref_sigma"],
            )
    return results


def variant_result(name: str) -> VariantResult:
    """The result of one variant; skips the calling test where the variant cannot run here."""
    import pytest

    res = variant_results()[name]
    if isinstance(res, str):
        if res.startswith("skipped"):
            pytest.skip(res)
        pytest.fail(f"variant {name}: {res}")
    return res


if __name__ == "__main__":
    _run_variant_case(Path(sys.argv[1]))
