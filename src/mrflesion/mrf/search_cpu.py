"""The pruned dictionary search on the CPU: compiled kernels over candidate (voxel, cluster) pairs.

The pruning rule is the one of :mod:`mrflesion.mrf.matching` (medoid scores, cone angles, a lower bound
``L`` from the best medoid), with one more level: the clusters are grouped into ~sqrt(C) supers
(spherical k-means of the medoids), each with a medoid atom and a cone angle holding all its atoms, so
that a voxel computes the medoid scores of the ~8 of 32 supers that can hold its best atom instead of
all 1024 clusters. Per block of voxels, without Python-level steps per cluster:

1. :func:`_candidate_pairs` (compiled): per sub-block, super-medoid scores and live supers, the
   medoid scores of the live supers' clusters and ``L``, then the cluster test; the passing
   (voxel, cluster) pairs;
2. :func:`_scan_pairs` (compiled): the pairs of the block grouped by cluster (counting sort), each
   cluster's voxels gathered into one matrix and scored against the cluster's atoms in one BLAS product
   (atoms x voxels), the column maximum and its lowest global atom index taken in one pass the
   compiler vectorises; each voxel keeps its best over its clusters (exact ties: the lowest index).

A cluster's atoms are read once per block instead of once per voxel, so the search does
arithmetic rather than wait on memory or the interpreter; both kernels release the GIL, so the worker
threads of :func:`mrflesion.mrf.matching.match` run in parallel. The compiled code is cached on disk
(numba's cache, next to this file or in the user's cache directory when that is read-only): the first
call on a machine compiles for a few seconds.

The kernels use fused multiply-add only (no reassociation): each score is a float32 dot product as a
BLAS computes it, good to ~1e-6; agreement with brute force is limited by float32 near-ties, never a
worse match (the margin covers the rounding of the bound). The BLAS products run single-threaded
(:func:`single_threaded_blas`): parallelism comes from the voxel blocks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  (the BLAS numba's np.dot calls: loaded before any limit)
from numba import njit
from threadpoolctl import threadpool_limits

from .dictionary import _spherical_kmeans

_FASTMATH = {"contract"}  # fused multiply-add, nothing else: no reassociation of sums
MARGIN = 2e-5  # score margin of the pruning test: float32 inner products of unit vectors are good to ~1e-6


@njit(nogil=True, cache=True, fastmath=_FASTMATH, inline="always")
def _column_max(block, out):  # type: ignore[no-untyped-def]
    """``out[i] = max_j block[j, i]`` (the passes run along rows: vectorised)."""
    out[:] = block[0]
    for j in range(1, block.shape[0]):
        row = block[j]
        for i in range(out.size):
            v = row[i]
            out[i] = v if v > out[i] else out[i]


@njit(nogil=True, cache=True, inline="always")
def _gather(y, index, start, count, rows):  # type: ignore[no-untyped-def]
    """``rows[r] = y[index[start + r]]`` for ``r < count`` (the signals of a group of voxels)."""
    for r in range(count):
        src = y[index[start + r]]
        dst = rows[r]
        for k in range(src.size):
            dst[k] = src[k]


@njit(nogil=True, cache=True, fastmath=_FASTMATH, inline="always")
def _compress(hit, n_words, index, out, count):  # type: ignore[no-untyped-def]
    """Append ``index[i]`` to ``out`` for every set ``hit[i]`` (8 flags per test); return the new count."""
    words = hit.view(np.uint64)
    for q in range(n_words):
        if words[q] != 0:
            for t in range(8):
                if hit[q * 8 + t]:
                    out[count] = index[q * 8 + t]
                    count += 1
    return count


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _candidate_pairs(y, super_medoids, s_cos, s_sin, s_pi, s_off, medoids, cos_t, sin_t, pi_min, margin,  # type: ignore[no-untyped-def]  # noqa: E501
                     sub_block, fallback):
    """The (voxel, cluster) pairs of unit rows ``y`` (n, m) that pass the cluster test, per sub-block:

    1. the exact scores of the super medoids (supers x voxels, one BLAS product), their column maximum
       ``L0`` (a lower bound of the best atom score) and, per super, the voxels for which the super can
       hold an atom reaching ``L0`` (the cone test with the super's angle: ``s_cos``, ``s_sin``;
       ``s_pi`` = pi - the angle, beyond which the test cannot exclude);
    2. per live super, the exact scores of its clusters' medoids for its voxels (one product), and
       ``L`` = the best medoid score seen (>= ``L0``);
    3. per cluster of a live super, the test ``score >= L cos(theta) - sin(arccos L) sin(theta)`` less
       the margin, vectorised over the voxels.

    A voxel with ``arccos(L) >= pi_min`` (= pi - the largest cluster angle: the bound does not hold) gets
    no pairs and ``fallback[i] = True``. Returns (voxels, clusters) of the pairs, cluster-major per
    sub-block.
    """
    n, m = y.shape
    n_super = super_medoids.shape[0]
    n_cl = medoids.shape[0]
    mg = np.float32(margin)
    cap = max(n * 32, 1024)
    pv = np.empty(cap, np.int64)
    pc = np.empty(cap, np.int64)
    count = 0
    width = ((sub_block + 7) // 8) * 8
    lo0 = np.empty(width, np.float32)
    sin0 = np.empty(width, np.float32)
    phi0 = np.empty(width, np.float64)
    low = np.empty(width, np.float32)
    sin_low = np.empty(width, np.float32)
    hit = np.zeros(width, np.bool_)
    iota = np.arange(width)
    live_v = np.empty(n_super * width, np.int64)
    live_off = np.zeros(n_super + 1, np.int64)
    ms = np.empty(n_cl * width, np.float32)
    ms_off = np.zeros(n_super + 1, np.int64)
    rows = np.empty((width, m), np.float32)
    g_low = np.empty(width, np.float32)
    g_sin = np.empty(width, np.float32)
    g_top = np.empty(width, np.float32)
    for s0 in range(0, n, sub_block):
        nb = min(sub_block, n - s0)
        n_words = (nb + 7) // 8
        ys = y[s0 : s0 + nb]
        # 1. super-medoid scores, the first lower bound L0 and the live supers of each voxel
        ss = np.dot(super_medoids, ys.T)  # (supers, voxels)
        _column_max(ss, lo0[:nb])
        for i in range(nb):
            x = min(float(lo0[i]), 1.0)
            lo0[i] = np.float32(x)
            sin0[i] = np.float32(math.sqrt(max(1.0 - x * x, 0.0)))
            phi0[i] = math.acos(x)
            low[i] = lo0[i]
        hit[:] = False
        ptr = 0
        for g in range(n_super):
            row = ss[g]
            ct = s_cos[g]
            st = s_sin[g]
            for i in range(nb):
                hit[i] = row[i] >= lo0[i] * ct - sin0[i] * st - mg or phi0[i] >= s_pi[g]
            live_off[g] = ptr
            ptr = _compress(hit, n_words, iota, live_v, ptr)
        live_off[n_super] = ptr
        # 2. exact medoid scores of the live supers' clusters; L = the best medoid score
        mp = 0
        for g in range(n_super):
            v0 = live_off[g]
            ng = live_off[g + 1] - v0
            ms_off[g] = mp
            if ng == 0:
                continue
            _gather(ys, live_v, v0, ng, rows)
            c0 = s_off[g]
            c1 = s_off[g + 1]
            block = np.dot(medoids[c0:c1], rows[:ng].T)  # (clusters of g, live voxels)
            ms[mp : mp + (c1 - c0) * ng] = block.ravel()
            mp += (c1 - c0) * ng
            top = g_top[:ng]
            _column_max(block, top)
            for r in range(ng):
                i = live_v[v0 + r]
                low[i] = top[r] if top[r] > low[i] else low[i]
        ms_off[n_super] = mp
        for i in range(nb):
            x = min(float(low[i]), 1.0)
            low[i] = np.float32(x)
            sin_low[i] = np.float32(math.sqrt(max(1.0 - x * x, 0.0)))
            fallback[s0 + i] = math.acos(x) >= pi_min
            if fallback[s0 + i]:  # threshold +inf (sin(theta) > 0): no pairs
                low[i] = np.float32(0.0)
                sin_low[i] = -np.inf
        # 3. the cluster test on the live supers' clusters
        for g in range(n_super):
            v0 = live_off[g]
            ng = live_off[g + 1] - v0
            if ng == 0:
                continue
            gl = g_low[:ng]
            gs = g_sin[:ng]
            for r in range(ng):
                gl[r] = low[live_v[v0 + r]]
                gs[r] = sin_low[live_v[v0 + r]]
            c0 = s_off[g]
            c1 = s_off[g + 1]
            nw = (ng + 7) // 8
            hg = hit[: nw * 8]
            hg[:] = False
            base = ms_off[g]
            if count + (c1 - c0) * ng > pv.size:
                grown = max(2 * pv.size, count + (c1 - c0) * ng)
                pv2 = np.empty(grown, np.int64)
                pc2 = np.empty(grown, np.int64)
                pv2[:count] = pv[:count]
                pc2[:count] = pc[:count]
                pv = pv2
                pc = pc2
            lv = live_v[v0 : v0 + ng]
            for c in range(c0, c1):
                row = ms[base + (c - c0) * ng : base + (c - c0 + 1) * ng]
                ct = cos_t[c]
                st = sin_t[c]
                for r in range(ng):
                    hg[r] = row[r] >= gl[r] * ct - gs[r] * st - mg
                start = count
                count = _compress(hg, nw, lv, pv, count)
                for p in range(start, count):
                    pv[p] += s0
                    pc[p] = c
    return pv[:count], pc[:count]


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def _scan_pairs(y, pv, pc, offsets, atoms, rev_index, n_atoms, best, best_index):  # type: ignore[no-untyped-def]
    """Score every candidate pair exactly; update ``best`` / ``best_index`` per voxel; return atoms scored.

    ``atoms`` (n_atoms, m) sorted by cluster (cluster c: rows ``offsets[c]:offsets[c + 1]``),
    ``rev_index`` = n_atoms - global index of each sorted row (float32, exact below 2**24).
    """
    m = y.shape[1]
    n_cl = offsets.size - 1
    n_pairs = pv.size
    start = np.zeros(n_cl + 1, np.int64)
    for p in range(n_pairs):
        start[pc[p] + 1] += 1
    for c in range(n_cl):
        start[c + 1] += start[c]
    fill = start[:-1].copy()
    voxels = np.empty(n_pairs, np.int64)
    for p in range(n_pairs):
        c = pc[p]
        voxels[fill[c]] = pv[p]
        fill[c] += 1
    widest = 0
    for c in range(n_cl):
        widest = max(widest, start[c + 1] - start[c])
    rows = np.empty((widest, m), np.float32)
    top = np.empty(widest, np.float32)
    key = np.empty(widest, np.float32)
    scored = 0
    for c in range(n_cl):
        p0 = start[c]
        nc = start[c + 1] - p0
        if nc == 0:
            continue
        _gather(y, voxels, p0, nc, rows)
        a0 = offsets[c]
        a1 = offsets[c + 1]
        s = np.dot(atoms[a0:a1], rows[:nc].T)  # (atoms, voxels): the pass below runs along rows
        tops = top[:nc]
        keys = key[:nc]
        tops[:] = -np.inf
        keys[:] = 0.0
        for j in range(a1 - a0):  # maximum per voxel and the lowest global index reaching it
            row = s[j]
            rj = rev_index[a0 + j]
            for r in range(nc):
                v = row[r]
                t = tops[r]
                kk = keys[r]
                up = rj if rj > kk else kk
                keys[r] = rj if v > t else (up if v == t else kk)
                tops[r] = v if v > t else t
        for r in range(nc):
            v = voxels[p0 + r]
            g = n_atoms - np.int64(keys[r])
            if tops[r] > best[v] or (tops[r] == best[v] and g < best_index[v]):
                best[v] = tops[r]
                best_index[v] = g
        scored += nc * (a1 - a0)
    return scored


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """BLAS libraries limited to one thread (the kernels' products; parallelism is over voxel blocks)."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


class ClusterSearch:
    """The CPU search of one slice position's dictionary (see the module docstring).

    ``atoms`` (n_atoms, m) float32 unit rows; ``clusters``: :meth:`SliceDictionary.clusters`'s dict
    (``order``, ``offsets``, ``medoids``, ``theta``).
    """

    def __init__(self, atoms: np.ndarray, clusters: dict[str, np.ndarray], sub_block: int = 1024,
                 n_super: int | None = None) -> None:
        self.n_atoms = int(atoms.shape[0])
        if self.n_atoms >= 1 << 24:
            raise ValueError("more than 2**24 atoms: the float32 index keys would not be exact")
        offsets = np.asarray(clusters["offsets"], np.int64)
        order = np.asarray(clusters["order"], np.int64)
        medoids = np.asarray(clusters["medoids"], np.float32)
        theta = np.asarray(clusters["theta"], np.float64)
        n_cl = int(theta.size)
        self.n_clusters = n_cl
        self.sub_block = int(sub_block)
        # supers: spherical k-means of the medoids (~sqrt(C) groups); clusters renumbered super by super
        n_super = max(1, round(math.sqrt(n_cl))) if n_super is None else int(n_super)
        labels = _spherical_kmeans(medoids, n_super, None, 20) if n_super > 1 else np.zeros(n_cl, np.int32)
        n_super = int(labels.max()) + 1
        by_super = np.argsort(labels, kind="stable")
        members = [order[offsets[c] : offsets[c + 1]] for c in by_super]
        sizes = np.array([x.size for x in members], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        order = np.concatenate(members)
        self.sorted_atoms = np.ascontiguousarray(atoms[order], np.float32)
        self.rev_index = (self.n_atoms - order).astype(np.float32)
        self.medoids = np.ascontiguousarray(medoids[by_super])
        theta = theta[by_super]
        self.pi_min = float(np.pi - theta.max())
        self.cos_t = np.cos(theta).astype(np.float32)
        self.sin_t = np.sin(theta).astype(np.float32)
        self.super_offsets = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=n_super))]).astype(np.int64)
        # each super: the member medoid closest to the members' mean direction, and the cone angle
        # about it that holds every atom of the super (float32 products, padded for their rounding)
        super_medoids = np.empty((n_super, medoids.shape[1]), np.float32)
        big = np.empty(n_super)
        for g in range(n_super):
            c0, c1 = self.super_offsets[g], self.super_offsets[g + 1]
            j = c0 + int(np.argmax(self.medoids[c0:c1] @ self.medoids[c0:c1].sum(axis=0)))
            super_medoids[g] = self.medoids[j]
            # float32 cosines of unit vectors are good to ~2e-6: the smallest, lowered by 1e-5, bounds
            # the true one from below (the angle from above), plus the clusters' 1e-4 rad pad
            cos_a = float((self.sorted_atoms[self.offsets[c0] : self.offsets[c1]] @ self.medoids[j]).min())
            big[g] = math.acos(min(max(cos_a - 1e-5, -1.0), 1.0)) + 1e-4
        self.super_medoids = super_medoids
        self.s_cos = np.cos(big).astype(np.float32)
        self.s_sin = np.sin(big).astype(np.float32)
        self.s_pi = np.pi - big

    def __call__(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Best atom (global index) and its score per unit row of ``y`` (n, m) float32, the rows left to
        brute force (no valid bound: index ``n_atoms``, score -inf), and the number of atoms scored."""
        n = y.shape[0]
        fallback = np.zeros(n, np.bool_)
        best = np.full(n, -np.inf, np.float32)
        best_index = np.full(n, self.n_atoms, np.int64)
        if n == 0:
            return best_index, best, np.zeros(0, np.int64), 0
        pv, pc = _candidate_pairs(y, self.super_medoids, self.s_cos, self.s_sin, self.s_pi, self.super_offsets,
                                   self.medoids, self.cos_t, self.sin_t, self.pi_min, MARGIN, self.sub_block,
                                   fallback)
        scored = int(_scan_pairs(y, pv, pc, self.offsets, self.sorted_atoms, self.rev_index, self.n_atoms, best,
                                 best_index))
        return best_index, best, np.flatnonzero(fallback), scored
