"""Dictionary matching: per voxel, the atom of maximum normalised inner product.

For every voxel of slice position ``k`` (index along the 3rd image axis) the signal ``s`` (35
magnitudes) is compared with every atom ``a`` (unit norm) of that slice position's dictionary:
``score = <s, a> / |s|`` (the cosine, 0-1 for magnitude data). The best atom gives T1, T2* and B1;
``M0 = <s, a> / norm(atom)`` (least squares for a unit-PD atom of norm ``norm``); the cosine is
written as the match-quality map.

Modes (both exact in the sense that they return the maximum over the whole dictionary):

``exact``
    Brute force: a float32 matmul against all atoms, blocked over voxels, argmax.
``svd`` (alias ``fast``)
    Pruned search with a certificate. The atoms of a slice position are grouped by spherical k-means
    in the rank-r SVD space (built with the dictionary, 1024 clusters of ~44 atoms), each cluster
    summarised by a medoid atom and its cone angle ``theta`` (largest angle between the medoid and
    an atom of the cluster). For a unit signal ``y`` with medoid score ``m_c = cos(phi_c)`` every atom
    of cluster ``c`` scores at most ``cos(max(phi_c - theta_c, 0))``, and the best medoid score ``L``
    is a lower bound of the best atom score (a medoid is an atom). So only clusters with
    ``m_c >= cos(arccos(L) + theta_c)`` can hold the best atom; exactly those are scanned with exact
    float32 inner products (~1-2.5 % of the atoms per voxel), and the best of them is the global
    argmax (lowest atom index among exact ties, as argmax over a full scan). Agreement with brute
    force is limited only by float32 rounding of near-ties (flat long-T2* region), never a worse
    match: the bound carries a safety margin.

    Why not the full rank-r compressed scan + top-K re-check: on CPU even a rank-7 scan writes and
    reduces ``voxels x atoms`` scores and measured slower than numpy's brute force (the cost is
    memory traffic, not flops); pruning scales with the number of plausible atoms instead.
    Cost per voxel: ~1024 medoid scores + ~1000 atom scores instead of 44,883.

    On CPU (:meth:`_SliceSearch.pruned_cpu`) the same test runs in compiled kernels
    (:mod:`mrflesion.mrf.search_cpu`, numba): exact medoid scores by one BLAS product per sub-block of
    voxels, the candidate (voxel, cluster) pairs grouped by cluster, each cluster one BLAS product
    (atoms x its voxels) with a vectorised column maximum. Measured on the 47-slice protocol, SNR 30,
    85 % tissue-like voxels: ~550 atoms scored per voxel, ~2.7 us/voxel on one core
    (benchmarks/bench_matching.py gives the ratio to numpy's brute force on the machine at hand).
    On CUDA (:meth:`_SliceSearch.pruned`) the pairs come from torch ops and each cluster is one
    product, a Python loop over clusters (the GPU's launches are asynchronous).

Sub-grid refinement (``refine=True``, default): the B1 grid (step 0.1) is coarse and T1 absorbs the
B1 quantisation (median T1 error ~6 % for continuous B1); after the search, two Gauss-Newton steps
on the signal model from the matched atom give continuous T1, T2*, B1 and a consistent M0 (see
:class:`_Refiner`). The argmax atom is the same with or without it.

On CPU the voxel blocks run in ``threads`` worker threads, each with one torch and one BLAS thread (the
kernels release the GIL); on CUDA (``device="auto"`` picks it when present) the blocks run in turn.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..device import resolve_device
from ..io import write_derivative
from .dictionary import DictionaryError, MRFDictionary
from .search_cpu import MARGIN as _MARGIN
from .search_cpu import ClusterSearch, single_threaded_blas
from .sequence import Protocol
from .signal import simulate

MAP_KEYS = ("T1", "T2star", "B1", "M0", "quality")
MODES = ("svd", "fast", "exact")
_EXACT_BLOCK_ELEMENTS = 1 << 24  # scores held at once in exact mode (64 MB float32)
_THETA_BINS = 8  # bins of clusters sharing a pruning threshold (svd mode)
_REFINE_ITER = 2  # Gauss-Newton steps of the sub-grid refinement
_REFINE_REUSE_JACOBIAN = True  # later steps reuse the first Jacobian (chord method)
# refined (T1, T2*, B1) stay within this many grid steps of the matched atom: a B1 error of up to
# half a B1 step is absorbed by T1 on the grid (~12 %, 2-3 T1 steps)
_REFINE_MAX_STEPS = (8.0, 5.0, 1.0)


class _Progress:
    def __init__(self, total: int, enabled: bool, label: str = "matching") -> None:
        self.total, self.enabled, self.label = max(total, 1), enabled, label
        self.done, self.next_decile, self.t0 = 0, 1, time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        while self.next_decile <= 10 and self.done * 10 >= self.next_decile * self.total:
            print(
                f"{self.label}: {self.next_decile * 10:3d} % ({self.done}/{self.total} voxels, "
                f"{time.perf_counter() - self.t0:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
            self.next_decile += 1


def _nonzero2d(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of a 2D boolean tensor, row-major (numpy's is faster on CPU)."""
    if mask.device.type != "cpu":
        r, c = torch.nonzero(mask, as_tuple=True)
        return r, c
    flat = torch.from_numpy(np.flatnonzero(mask.numpy()))
    n_cols = mask.shape[1]
    return flat // n_cols, flat % n_cols


class _SliceSearch:
    """Device tensors of one slice position's dictionary, and the two search modes."""

    def __init__(
        self, dictionary: MRFDictionary, slice_index: int, device: torch.device, mode: str, torch_search: bool = False
    ) -> None:
        """``torch_search``: on the CPU too, prepare :meth:`pruned` (the GPU's search; for tests)."""
        sd = dictionary.slice(slice_index)
        self.device = device
        self.atoms = torch.from_numpy(sd.atoms).to(device)
        self.norms = torch.from_numpy(sd.norms.astype(np.float32)).to(device)
        self.norms_np = sd.norms.astype(np.float32)
        self.n_atoms = sd.n_atoms
        self.mode = mode
        if mode == "exact":
            return
        cl = sd.clusters()
        if device.type == "cpu" and not torch_search:
            if "cpu" not in sd.searches:  # kept with the slice dictionary: built once per dictionary
                sd.searches["cpu"] = ClusterSearch(sd.atoms, cl)
            self.cpu = sd.searches["cpu"]
            return
        theta = cl["theta"]
        # clusters renumbered by increasing cone angle, so that contiguous bins of clusters share
        # a tight largest angle (the per-bin pruning threshold)
        by_theta = np.argsort(theta, kind="stable")
        offs = cl["offsets"]
        order = np.concatenate([cl["order"][offs[c] : offs[c + 1]] for c in by_theta])
        sizes = np.diff(offs)[by_theta]
        self.offsets = [0, *np.cumsum(sizes).tolist()]
        theta = theta[by_theta]
        self.n_clusters = theta.size
        self.sorted_atoms = torch.from_numpy(np.ascontiguousarray(sd.atoms[order])).to(device)
        self.medoids = torch.from_numpy(np.ascontiguousarray(cl["medoids"][by_theta])).to(device)
        edges = np.linspace(0, self.n_clusters, _THETA_BINS + 1).round().astype(int)
        self.bins = [
            (int(r0), int(r1), float(np.cos(theta[r1 - 1])), float(np.sin(theta[r1 - 1])))
            for r0, r1 in zip(edges[:-1], edges[1:], strict=True)
            if r1 > r0
        ]
        # n_atoms - global atom index, float (exact below 2**24), for lowest-index tie-breaking
        self.rev_index = torch.from_numpy((self.n_atoms - order).astype(np.float32)).to(device)
        self.cos_t = torch.from_numpy(np.cos(theta).astype(np.float32)).to(device)
        self.sin_t = torch.from_numpy(np.sin(theta).astype(np.float32)).to(device)
        self.cos_t_np = np.cos(theta).astype(np.float32)
        self.sin_t_np = np.sin(theta).astype(np.float32)
        self.sorted_to_global = order.astype(np.int64)
        # below this medoid score arccos(L) + theta may exceed pi: brute force for such voxels
        self.min_bound = float(np.cos(np.pi - theta.max()))

    def exact(self, y: torch.Tensor) -> torch.Tensor:
        rows = max(1, _EXACT_BLOCK_ELEMENTS // self.n_atoms)
        out = torch.empty(y.shape[0], dtype=torch.int64, device=self.device)
        at = self.atoms.T
        for s in range(0, y.shape[0], rows):
            out[s : s + rows] = torch.argmax(y[s : s + rows] @ at, dim=1)
        return out

    def _scan(
        self, y: torch.Tensor, c: torch.Tensor, v: torch.Tensor, with_index: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Best exact score of cluster ``c[i]`` for voxel ``v[i]`` (its atom index, atoms scored).

        ``c`` must be sorted; one dense matmul per cluster over the voxels that need it. The
        index is the lowest global atom index among exact ties (as argmax over the full scan).
        """
        counts = torch.bincount(c, minlength=self.n_clusters).tolist()
        vals: list[torch.Tensor] = []
        args: list[torch.Tensor] = []
        start = 0
        scored = 0
        for cluster, n in enumerate(counts):
            if n == 0:
                continue
            a0, a1 = self.offsets[cluster], self.offsets[cluster + 1]
            rows = torch.index_select(y, 0, v[start : start + n])
            # (atoms, voxels) layout: the max runs across rows, vectorised over voxels
            sc = self.sorted_atoms[a0:a1] @ rows.T
            val = sc.amax(dim=0)
            vals.append(val)
            if with_index:  # torch's CPU max-with-indices is ~10x slower than amax
                key = torch.where(sc == val[None, :], self.rev_index[a0:a1, None], 0.0).amax(dim=0)
                args.append(self.n_atoms - key.long())
            scored += n * (a1 - a0)
            start += n
        if not vals:
            empty = torch.empty(0, dtype=torch.int64, device=y.device)
            return empty.to(y.dtype), empty, 0
        return torch.cat(vals), (torch.cat(args) if with_index else None), scored

    def pruned(self, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        b = y.shape[0]
        m = self.medoids @ y.T  # (C, B) exact medoid scores, cluster-major so pairs come out sorted
        low = m.amax(dim=0).clamp(max=1.0)  # a medoid is an atom: lower bound of the best score
        bad = low < self.min_bound
        fallback = torch.nonzero(bad).flatten() if bool(bad.any()) else None
        if fallback is not None:
            low = torch.where(bad, torch.ones_like(low), low)  # no pairs; brute force below
        sin_low = torch.sqrt((1.0 - low * low).clamp(min=0.0))
        # cluster c can hold an atom scoring >= low only if its medoid score
        # m_c >= cos(arccos(low) + theta_c) = low cos(theta_c) - sqrt(1 - low^2) sin(theta_c).
        # A first test per bin of clusters (sorted by angle) with the bin's largest angle, then
        # the exact per-cluster test on the survivors.
        cl_parts: list[torch.Tensor] = []
        vx_parts: list[torch.Tensor] = []
        for r0, r1, cos_b, sin_b in self.bins:
            thr = low * cos_b - sin_low * sin_b - _MARGIN
            c, v = _nonzero2d(m[r0:r1] >= thr[None, :])
            cl_parts.append(c + r0)
            vx_parts.append(v)
        c = torch.cat(cl_parts)
        v = torch.cat(vx_parts)
        mv = m.view(-1).index_select(0, c * b + v)
        del m
        lv = torch.index_select(low, 0, v)
        thr_cv = lv * torch.index_select(self.cos_t, 0, c) - torch.index_select(sin_low, 0, v) * (
            torch.index_select(self.sin_t, 0, c)
        )
        keep = mv >= thr_cv - _MARGIN
        cc, vv = c[keep], v[keep]
        val, _, scored = self._scan(y, cc, vv)
        # winners: every (voxel, cluster) pair reaching the voxel's best score (ties: several)
        best = torch.full((b,), -math.inf, dtype=y.dtype, device=self.device)
        best.scatter_reduce_(0, vv, val, reduce="amax")
        win = val >= torch.index_select(best, 0, vv)
        cw, order = torch.sort(cc[win], stable=True)
        vw = vv[win][order]
        _, idx, scored_w = self._scan(y, cw, vw, with_index=True)
        assert idx is not None
        out = torch.full((b,), self.n_atoms, dtype=torch.int64, device=self.device)
        out.scatter_reduce_(0, vw, idx, reduce="amin")
        if fallback is not None:
            out[fallback] = self.exact(y[fallback])
            scored += int(fallback.numel()) * self.n_atoms
        return out, scored + scored_w

    def search(self, y: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Best atom (global index) per unit signal row, and the number of atoms scored."""
        if y.shape[0] == 0:
            return torch.zeros(0, dtype=torch.int64, device=self.device), 0
        if self.mode == "exact":
            return self.exact(y), y.shape[0] * self.n_atoms
        if hasattr(self, "cpu"):
            idx, _, scored = self.pruned_cpu(y.numpy())
            return torch.from_numpy(idx), scored
        return self.pruned(y)

    def pruned_cpu(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """Best atom and its score per unit row of ``y`` (numpy, float32), and the atoms scored: the
        compiled kernels of :mod:`mrflesion.mrf.search_cpu`, brute force where their bound fails."""
        idx, score, fallback, scored = self.cpu(y)
        if fallback.size:
            rows = y[fallback]
            idx[fallback] = self.exact(torch.from_numpy(rows)).numpy()
            score[fallback] = np.einsum("ij,ij->i", rows, self.atoms.numpy()[idx[fallback]])
            scored += int(fallback.size) * self.n_atoms
        return idx, score, scored


class _Refiner:
    """Sub-grid refinement: continuous (T1, T2*, B1) and M0 around the matched atom.

    The dictionary's B1 step (0.1) is coarse next to its 5 % T1/T2* steps, and T1 trades off against
    B1 (flip angles and inversion efficiency), so the grid argmax alone leaves a ~6 % median T1 error
    for continuous B1. Starting from the argmax atom, ``_REFINE_ITER`` Gauss-Newton step(s) on the
    signal model ``M0 |simulate(T1, T2*, B1)|`` in (log T1, log T2*, B1), M0 jointly (4 parameters,
    forward-difference Jacobian: 3 extra vectorised simulations per voxel), the result clamped to
    ``_REFINE_MAX_STEPS`` grid steps of the matched atom, to the grid's range and to T2* <= T1.
    The refined parameters are kept only where the model there fits at least as well (cosine) as
    the grid atom; elsewhere (and for non-finite steps) the voxel keeps the grid values. M0 and the
    quality (cosine) are those of the re-simulated model at the reported parameters.

    Measured (tests/test_matching.py: 4-slice protocol, noiseless, T1 600-3000, T2* 20-300, B1 0.7-1.3):
    median T1 / T2* error 6.2 / 1.7 % on the grid, 0.09 / 0.01 % refined (2 steps, the second reusing
    the first Jacobian; 0.3 / 0.04 % with one). ~2 % of the voxels (long T1) keep a T1 error
    > 5 %: their optimum lies beyond ``_REFINE_MAX_STEPS``. Cost: 6 simulations per voxel (~2 us each for
    47 slices). A quadratic fit of the inner-product
    surface on the 3x3x3 neighbourhood was worse than no refinement on the grid (the surface is a
    narrow curved T1-B1 ridge, far from quadratic over one B1 step; ~75 % of offsets hit the clamp).
    """

    def __init__(self, dictionary: MRFDictionary) -> None:
        grid = dictionary.grid
        self.protocol = dictionary.protocol
        lt1 = np.log(grid.t1_values())
        lt2 = np.log(grid.t2star_values())
        b1 = np.asarray(grid.b1_values, float)
        self.lo = np.array([lt1[0], lt2[0], b1[0]])
        self.hi = np.array([lt1[-1], lt2[-1], b1[-1]])
        self.step = np.array([_max_step(lt1), _max_step(lt2), _max_step(b1)])
        self.max_offset = self.step * np.asarray(_REFINE_MAX_STEPS)
        self.free = self.step > 0  # axes with a single grid value are not refined
        self.h = np.array([1e-4, 1e-4, 1e-4])  # finite-difference steps

    def model(self, z: int, th: np.ndarray) -> np.ndarray:
        return np.abs(simulate(self.protocol, z, np.exp(th[:, 0]), np.exp(th[:, 1]), th[:, 2]))

    def __call__(
        self, z: int, sig: np.ndarray, t1: np.ndarray, t2: np.ndarray, b1: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Refined (T1, T2*, B1, M0, cosine) for raw signals ``sig`` (n, m) and grid parameters."""
        sig = sig.astype(np.float64)
        th0 = np.stack([np.log(t1), np.log(t2), b1], axis=1).astype(np.float64)
        s0 = self.model(z, th0)
        sig_norm = np.linalg.norm(sig, axis=1)
        cos0 = _cosine(sig, s0, sig_norm)
        th = th0.copy()
        s = s0
        eye = np.eye(3)
        with np.errstate(all="ignore"):
            for it in range(_REFINE_ITER):
                if it > 0:
                    s = self.model(z, th)
                if it == 0 or not _REFINE_REUSE_JACOBIAN:
                    jac = np.zeros(s.shape + (3,))
                    for j in np.flatnonzero(self.free):
                        jac[:, :, j] = (self.model(z, th + self.h[j] * eye[j]) - s) / self.h[j]
                ss = np.einsum("nm,nm->n", s, s)
                m0 = np.einsum("nm,nm->n", sig, s) / ss
                jf = np.concatenate([s[:, :, None], m0[:, None, None] * jac], axis=2)
                r = sig - m0[:, None] * s
                jtj = np.einsum("nmi,nmj->nij", jf, jf)
                jtr = np.einsum("nmi,nm->ni", jf, r)
                # tiny Levenberg damping: keeps the solve defined where an axis has no effect
                diag = np.einsum("nii->ni", jtj)
                jtj[:, np.arange(4), np.arange(4)] += 1e-9 * diag + 1e-300
                step = np.linalg.solve(jtj, jtr[:, :, None])[:, 1:, 0]
                step = np.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0)
                th = np.clip(th + step * self.free, th0 - self.max_offset, th0 + self.max_offset)
                th = np.clip(th, self.lo, self.hi)
                th[:, 1] = np.minimum(th[:, 1], th[:, 0])  # T2* <= T1, as in the dictionary
            s = self.model(z, th)
            cos = _cosine(sig, s, sig_norm)
            ok = np.isfinite(cos) & (cos >= cos0) & np.all(np.isfinite(th), axis=1)
            th = np.where(ok[:, None], th, th0)
            s = np.where(ok[:, None], s, s0)
            cos = np.where(ok, cos, cos0)
            m0 = np.einsum("nm,nm->n", sig, s) / np.einsum("nm,nm->n", s, s)
        return np.exp(th[:, 0]), np.exp(th[:, 1]), th[:, 2], m0, cos


def _max_step(values: np.ndarray) -> float:
    return float(np.max(np.diff(values))) if values.size > 1 else 0.0


def _cosine(sig: np.ndarray, s: np.ndarray, sig_norm: np.ndarray) -> np.ndarray:
    return np.einsum("nm,nm->n", sig, s) / (sig_norm * np.linalg.norm(s, axis=1))


def search_torch(searcher: _SliceSearch, signals: np.ndarray) -> tuple[np.ndarray, ...]:
    """One block's search with torch (CUDA, or exact mode): atom index, M0 and quality of the voxels with
    a non-zero signal, that selection (boolean over ``signals``' rows) and the atoms scored."""
    with torch.inference_mode():
        sig = torch.from_numpy(np.ascontiguousarray(signals, dtype=np.float32))
        okn = np.linalg.norm(sig.numpy(), axis=1) > 0  # zero signal: maps stay 0
        sig = sig[torch.from_numpy(okn)].to(searcher.device)
        norm = torch.linalg.vector_norm(sig, dim=1)
        y = sig / norm[:, None]
        idx, scored = searcher.search(y)
        score = (y * searcher.atoms[idx]).sum(dim=1)
        m0 = norm * score / searcher.norms[idx]
        return idx.cpu().numpy(), m0.cpu().numpy(), score.clamp(0.0, 1.0).cpu().numpy(), okn, scored


def match(
    series: np.ndarray,
    dictionary: MRFDictionary,
    mask: np.ndarray | None = None,
    mode: str = "svd",
    device: str | torch.device = "auto",
    block_voxels: int = 16384,
    progress: bool = False,
    threads: int | None = None,
    timing_key: str | None = None,
    stats: dict[str, Any] | None = None,
    refine: bool = True,
) -> dict[str, np.ndarray]:
    """Match an MRF series ``(X, Y, Z, n_measurements)`` with its per-slice-position dictionary.

    ``mask``: voxels to match (default: every voxel with a non-zero signal); outside it the maps
    are 0. ``timing_key``: the series' timing key, checked against the dictionary when given.
    ``block_voxels`` bounds memory (voxels matched at once). ``threads``: CPU worker threads over the voxel
    blocks (each with one torch and one BLAS thread; default: torch's thread count).
    ``stats``: if a dict is given it receives ``voxels``, ``device``, ``mode`` and ``candidates``
    (atoms scored exactly per voxel, svd mode). ``refine``: sub-grid refinement of T1, T2*, B1 and
    M0 around the matched atom (see :class:`_Refiner`; the atom itself is the same either way).
    Returns float32 maps ``T1`` (ms), ``T2star`` (ms),
    ``B1``, ``M0`` and ``quality`` (cosine of the match, 0-1), each of shape ``(X, Y, Z)``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if block_voxels < 1:
        raise ValueError("block_voxels must be >= 1")
    if timing_key is not None:
        dictionary.check_timing(timing_key, "the series")
    series = np.asarray(series)
    if series.ndim != 4:
        raise ValueError(f"series must be 4D (X, Y, Z, measurements), got shape {series.shape}")
    n_meas = dictionary.protocol.n_measurements
    if series.shape[3] != n_meas:
        raise DictionaryError(f"series has {series.shape[3]} measurements, the dictionary {n_meas}")
    if series.shape[2] != dictionary.protocol.n_slices:
        raise DictionaryError(
            f"series has {series.shape[2]} slices, the dictionary's protocol {dictionary.protocol.n_slices}"
        )
    shape3 = series.shape[:3]
    if mask is None:
        mask = np.any(series != 0, axis=3)
    else:
        mask = np.asarray(mask).astype(bool)
        if mask.shape != shape3:
            raise ValueError(f"mask shape {mask.shape} does not match the series {shape3}")
    dev = resolve_device(device)
    workers = 1
    if dev.type == "cpu":
        # Parallel over voxel blocks, one torch thread each: the search is many small ops, for
        # which intra-op threading mostly waits on barriers (badly so on a loaded machine).
        workers = max(1, int(threads) if threads is not None else torch.get_num_threads())
    maps = {k: np.zeros(shape3, np.float32) for k in MAP_KEYS}
    t1 = dictionary.t1.astype(np.float32)
    t2 = dictionary.t2star.astype(np.float32)
    b1 = dictionary.b1.astype(np.float32)
    total = int(mask.sum())
    prog = _Progress(total, progress)
    jobs: list[tuple[int, np.ndarray, np.ndarray]] = []
    remaining: dict[int, int] = {}
    for z in range(shape3[2]):
        ix, iy = np.nonzero(mask[:, :, z])
        if ix.size == 0:
            continue
        # equal-sized blocks of at most block_voxels (balanced over the worker threads)
        n_blocks = -(-ix.size // block_voxels)
        bounds = np.linspace(0, ix.size, n_blocks + 1).round().astype(int)
        for s, e in zip(bounds[:-1], bounds[1:], strict=True):
            jobs.append((z, ix[s:e], iy[s:e]))
            remaining[z] = remaining.get(z, 0) + 1
    for z in remaining:  # fail early on a slice position the dictionary lacks
        dictionary.require_slice(z)
    lock = threading.Lock()
    refiner = _Refiner(dictionary) if refine else None
    searchers: dict[int, _SliceSearch] = {}
    scored_total = [0]

    def run(job: tuple[int, np.ndarray, np.ndarray]) -> None:
        z, bx, by = job
        with lock:
            if z not in searchers:
                searchers[z] = _SliceSearch(dictionary, z, dev, mode)
            searcher = searchers[z]
        if hasattr(searcher, "cpu"):  # the compiled search: numpy throughout, its scores reused
            sig_np = np.ascontiguousarray(series[bx, by, z, :], dtype=np.float32)
            norm_np = np.sqrt(np.einsum("ij,ij->i", sig_np, sig_np))
            okn = norm_np > 0  # zero signal: maps stay 0
            if not okn.all():
                sig_np, norm_np = sig_np[okn], norm_np[okn]
            idx_np, score_np, scored = searcher.pruned_cpu(sig_np / norm_np[:, None])
            m0_np = norm_np * score_np / searcher.norms_np[idx_np]
            q_np = np.clip(score_np, 0.0, 1.0)
        else:
            idx_np, m0_np, q_np, okn, scored = search_torch(searcher, series[bx, by, z, :])
        n_block = int(bx.size)
        bx, by = bx[okn], by[okn]
        if refiner is not None and idx_np.size:
            r1, r2, rb, m0_np, q = refiner(
                z, series[bx, by, z, :], dictionary.t1[idx_np], dictionary.t2star[idx_np], dictionary.b1[idx_np]
            )
            maps["T1"][bx, by, z] = r1
            maps["T2star"][bx, by, z] = r2
            maps["B1"][bx, by, z] = rb
            q_np = np.clip(q, 0.0, 1.0)
        else:
            maps["T1"][bx, by, z] = t1[idx_np]
            maps["T2star"][bx, by, z] = t2[idx_np]
            maps["B1"][bx, by, z] = b1[idx_np]
        maps["M0"][bx, by, z] = m0_np
        maps["quality"][bx, by, z] = q_np
        with lock:
            scored_total[0] += scored
            prog.update(n_block)
            remaining[z] -= 1
            if remaining[z] == 0:
                del searchers[z]

    if workers > 1 and len(jobs) > 1:
        prev_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with single_threaded_blas(), ThreadPoolExecutor(max_workers=workers) as pool:
                for _ in pool.map(run, jobs):
                    pass
        finally:
            torch.set_num_threads(prev_threads)
    else:
        prev_threads = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(int(threads))
        try:
            with single_threaded_blas():
                for job in jobs:
                    run(job)
        finally:
            torch.set_num_threads(prev_threads)
    if stats is not None:
        stats.update(
            {
                "voxels": total,
                "device": str(dev),
                "mode": mode,
                "workers": workers,
                "candidates_per_voxel": scored_total[0] / total if total else 0.0,
                "atoms_per_slice": dictionary.n_atoms,
                "refine": bool(refine),
            }
        )
    return maps


def match_file(
    mrf_path: str | os.PathLike[str],
    sidecar_path: str | os.PathLike[str],
    dictionary_path: str | os.PathLike[str],
    out_paths: dict[str, str | os.PathLike[str]],
    mask_path: str | os.PathLike[str] | None = None,
    mode: str = "svd",
    device: str = "auto",
    block_voxels: int = 16384,
    threads: int | None = None,
    progress: bool = False,
    refine: bool = True,
) -> dict[str, Any]:
    """Match an MRF NIfTI with its dictionary and write the maps (float32, the MRF affine).

    ``out_paths`` maps any of ``T1``, ``T2star``, ``B1``, ``M0``, ``quality`` to an output path.
    The sidecar's timing key must equal the dictionary's. Returns statistics: ``runtime_s``,
    ``voxels``, ``device``, ``mode``, ``timing_key``, ``candidates_per_voxel``.
    """
    import nibabel as nib

    unknown = set(out_paths) - set(MAP_KEYS)
    if unknown:
        raise ValueError(f"unknown output maps {sorted(unknown)}; expected keys from {MAP_KEYS}")
    t0 = time.perf_counter()
    sidecar = json.loads(Path(sidecar_path).read_text())
    protocol = Protocol.from_sidecar(sidecar)
    dictionary = MRFDictionary.load(dictionary_path)
    dictionary.check_timing(protocol, f"sidecar {sidecar_path}")
    img = nib.load(str(mrf_path))
    series = np.asarray(img.dataobj, dtype=np.float32)
    mask = None
    if mask_path is not None:
        mimg = nib.load(str(mask_path))
        mask = np.asarray(mimg.dataobj) > 0
    stats: dict[str, Any] = {}
    maps = match(
        series,
        dictionary,
        mask=mask,
        mode=mode,
        device=device,
        block_voxels=block_voxels,
        progress=progress,
        threads=threads,
        stats=stats,
        refine=refine,
    )
    for key, p in out_paths.items():
        write_derivative(p, maps[key], img, dtype=np.float32)  # on the MRF grid
    stats.update({"runtime_s": time.perf_counter() - t0, "timing_key": dictionary.timing_key})
    return stats
