"""MRF dictionary: simulated, L2-normalised atoms on a (T1, T2*, B1) grid, one set per slice position.

Grid (docs/sequence-model.md): T1 300-3500 ms and T2* 10-2500 ms in geometric steps of at most 5 %
(both endpoints included: ``n = ceil(log(hi/lo) / log(1 + step))`` intervals of equal ratio, i.e.
4.93 % for T1 and 4.92 % for T2*), B1 0.6-1.4 in steps of 0.1, atoms with T2* > T1 dropped:
52 x 115 x 9 candidates, 44,883 atoms.

Because of the staggered inversions every slice position has its own timing, so a dictionary holds
one :class:`SliceDictionary` per distinct slice timing: per slice position without SMS; with SMS
the slices excited together share a slot, hence a timing, and one set of atoms (the slice positions
of a slot map to the same :class:`SliceDictionary`). The inversion model
(``Protocol.inversion_efficiency``) is part of the protocol and of its timing key. Each stores:

* the atoms (magnitude ``|simulate(...)|``, unit L2 norm, float32) and each atom's norm before normalisation, so that
  ``M0 = <signal, atom> / norm`` (least-squares proton density of a unit-PD atom);
* the SVD of the atoms: basis, singular values and the rank ``r`` that keeps ``rank_energy`` of the
  energy (r = 6-8 for 99.9 % with the default 47-slice protocol, 8 with 4 slices);
* a spherical k-means clustering of the atoms (computed in the rank-r SVD space). Matching uses it
  to prune the search (see :mod:`mrflesion.mrf.matching`): each cluster has a medoid atom and a cone
  angle ``theta`` (largest angle between the medoid and any atom of the cluster).

Storage: atoms are cheap to re-simulate (~0.1 s per slice position), so by default
:meth:`MRFDictionary.save` writes only the protocol (as sidecar fields), the grid, the per-slice SVD
and cluster labels, and a few check atoms. Atoms are re-simulated lazily per slice position on first
use and compared with the check atoms, so a change of the signal model is caught instead of silently
matching with another dictionary. ``save(path, include_atoms=True)`` writes the atoms as well.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .sequence import Protocol
from .signal import simulate

FORMAT_VERSION = 3  # 3: SMS slots share atoms, inversion model in the protocol (2: magnitude atoms)
N_CHECK_ATOMS = 16


class DictionaryError(ValueError):
    """A dictionary file is invalid, or does not fit the data it is asked to match."""


def geometric_values(lo: float, hi: float, step: float) -> np.ndarray:
    """Values from ``lo`` to ``hi`` (both included) with a constant ratio of at most ``1 + step``."""
    if not (0 < lo <= hi) or step <= 0:
        raise ValueError(f"invalid geometric range {lo}..{hi} step {step}")
    if hi == lo:
        return np.array([float(lo)])
    n = int(np.ceil(np.log(hi / lo) / np.log1p(step) - 1e-9))
    values = lo * (hi / lo) ** (np.arange(n + 1) / n)
    values[0], values[-1] = lo, hi
    return values


@dataclass(frozen=True)
class DictionaryGrid:
    """Parameter grid of the dictionary (ms for times, B1 as a scale factor)."""

    t1_range_ms: tuple[float, float] = (300.0, 3500.0)
    t2star_range_ms: tuple[float, float] = (10.0, 2500.0)
    step: float = 0.05
    b1_values: tuple[float, ...] = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4)
    drop_t2star_above_t1: bool = True

    @classmethod
    def from_config(cls, cfg: dict[str, Any] | None) -> DictionaryGrid:
        """From a config mapping. Keys (all optional): ``t1_ms: [lo, hi]``, ``t2star_ms: [lo, hi]``,
        ``step`` (relative, 0.05 = 5 %), and either ``b1_values: [...]`` or ``b1_range: [lo, hi]``
        with ``b1_step``; ``drop_t2star_above_t1`` (default true)."""
        cfg = dict(cfg or {})
        known = {"t1_ms", "t2star_ms", "step", "b1_values", "b1_range", "b1_step", "drop_t2star_above_t1"}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"unknown dictionary grid keys: {sorted(unknown)}")
        d = cls()
        t1 = tuple(float(x) for x in cfg.get("t1_ms", d.t1_range_ms))
        t2 = tuple(float(x) for x in cfg.get("t2star_ms", d.t2star_range_ms))
        if len(t1) != 2 or len(t2) != 2:
            raise ValueError("t1_ms and t2star_ms must be [lo, hi]")
        if "b1_values" in cfg:
            b1 = tuple(float(x) for x in cfg["b1_values"])
        elif "b1_range" in cfg:
            lo, hi = (float(x) for x in cfg["b1_range"])
            bstep = float(cfg.get("b1_step", 0.1))
            n = int(round((hi - lo) / bstep))
            b1 = tuple(round(lo + i * bstep, 10) for i in range(n + 1))
        else:
            b1 = d.b1_values
        if not b1 or any(b <= 0 for b in b1):
            raise ValueError("B1 values must be positive")
        return cls(
            t1_range_ms=(t1[0], t1[1]),
            t2star_range_ms=(t2[0], t2[1]),
            step=float(cfg.get("step", d.step)),
            b1_values=tuple(sorted(b1)),
            drop_t2star_above_t1=bool(cfg.get("drop_t2star_above_t1", True)),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def key(self) -> str:
        """Stable hash of the grid."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def t1_values(self) -> np.ndarray:
        return geometric_values(*self.t1_range_ms, self.step)

    def t2star_values(self) -> np.ndarray:
        return geometric_values(*self.t2star_range_ms, self.step)

    def parameters(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(T1, T2*, B1) of every atom, float64, T1-major then T2* then B1."""
        t1, t2, b1 = np.meshgrid(
            self.t1_values(), self.t2star_values(), np.asarray(self.b1_values, float), indexing="ij"
        )
        keep = np.ones(t1.shape, bool)
        if self.drop_t2star_above_t1:
            keep = t2 <= t1 * (1 + 1e-12)
        return t1[keep], t2[keep], b1[keep]


@dataclass
class SliceDictionary:
    """Atoms of one slice position plus what matching needs (SVD, clusters)."""

    atoms: np.ndarray  # (n_atoms, n_meas) float32, unit L2 norm
    norms: np.ndarray  # (n_atoms,) float64, norm of the unit-PD signal
    basis: np.ndarray  # (n_meas, n_meas) float64, right singular vectors as columns
    singular_values: np.ndarray  # (n_meas,)
    rank: int  # rank keeping rank_energy of the energy
    labels: np.ndarray  # (n_atoms,) int32 cluster of each atom
    _clusters: dict[str, np.ndarray] | None = field(default=None, repr=False)
    #: search structures derived from the atoms, built by :mod:`mrflesion.mrf.matching` on first use
    searches: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def n_atoms(self) -> int:
        return int(self.atoms.shape[0])

    def energy_fraction(self, rank: int | None = None) -> float:
        r = self.rank if rank is None else rank
        e = self.singular_values.astype(np.float64) ** 2
        return float(e[:r].sum() / e.sum())

    def clusters(self) -> dict[str, np.ndarray]:
        """Cluster structure for pruned matching (computed once, float64 geometry).

        ``order``: atom indices sorted by cluster; ``offsets``: cluster c holds
        ``order[offsets[c]:offsets[c + 1]]``; ``medoids`` (C, n_meas) float32 unit atoms;
        ``medoid_index``; ``theta``: cone half-angle about the medoid (rad), padded for rounding.
        """
        if self._clusters is None:
            self._clusters = _cluster_geometry(self.atoms, self.labels)
        return self._clusters


def _group_sum(x: np.ndarray, labels: np.ndarray, n_groups: int) -> np.ndarray:
    """Row sums of ``x`` per label (fast replacement for ``np.add.at``)."""
    return np.stack(
        [np.bincount(labels, weights=x[:, j], minlength=n_groups) for j in range(x.shape[1])], axis=1
    )


def _cluster_geometry(atoms: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    n_clusters = int(labels.max()) + 1
    a64 = atoms.astype(np.float64)
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=n_clusters)
    if np.any(counts == 0):
        raise DictionaryError("dictionary has an empty cluster")
    offsets = np.concatenate([[0], np.cumsum(counts)])
    centroids = _group_sum(a64, labels, n_clusters)
    # medoid: the atom of each cluster closest to the cluster mean
    closeness = np.einsum("ij,ij->i", a64, centroids[labels])
    by_closeness = np.lexsort((closeness, labels))  # grouped by label, ascending closeness
    medoid_index = by_closeness[offsets[1:] - 1]
    medoids = a64[medoid_index]
    angle = np.arccos(np.clip(np.einsum("ij,ij->i", a64, medoids[labels]), -1.0, 1.0))
    theta = np.maximum.reduceat(angle[order], offsets[:-1])
    return {
        "order": order,
        "offsets": offsets,
        "medoids": medoids.astype(np.float32),
        "medoid_index": medoid_index,
        "theta": theta + 1e-4,  # float32 rounding of unit vectors: angles are good to ~1e-6 rad
    }


def _spherical_kmeans(
    x: np.ndarray, n_clusters: int, labels: np.ndarray | None, n_iter: int, seed: int = 0
) -> np.ndarray:
    """Labels of a spherical k-means of the rows of ``x`` (deterministic)."""
    n = x.shape[0]
    n_clusters = min(n_clusters, n)
    rng = np.random.default_rng(seed)
    if labels is None:
        centroids = x[np.sort(rng.choice(n, n_clusters, replace=False))].copy()
    else:
        centroids = None
    for it in range(n_iter + 1):
        if centroids is None or it > 0:
            assert labels is not None
            centroids = _group_sum(x, labels, n_clusters).astype(x.dtype)
            counts = np.bincount(labels, minlength=n_clusters)
            empty = np.flatnonzero(counts == 0)
            if empty.size:  # reseed empty clusters with the worst-fitting points
                fit = np.einsum("ij,ij->i", x, centroids[labels] / np.maximum(counts[labels], 1)[:, None])
                centroids[empty] = x[np.argsort(fit)[: empty.size]]
            centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
        labels_new = np.empty(n, np.int64)
        for s in range(0, n, 8192):
            labels_new[s : s + 8192] = np.argmax(x[s : s + 8192] @ centroids.T, axis=1)
        if labels is not None and it > 0 and np.array_equal(labels, labels_new):
            break
        labels = labels_new
    assert labels is not None
    # final: make labels contiguous 0..C-1 (no empty cluster)
    _, labels = np.unique(labels, return_inverse=True)
    return labels.astype(np.int32)


def _simulate_atoms(
    protocol: Protocol, slice_index: int, params: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    # magnitude atoms (the data are magnitude images; Mz < 0 after an inversion gives a negative
    # signed signal)
    raw = np.abs(simulate(protocol, slice_index, *params))
    norms = np.linalg.norm(raw, axis=1)
    if np.any(norms <= 0):
        raise DictionaryError("dictionary contains an atom with zero signal")
    return (raw / norms[:, None]).astype(np.float32), norms


def _check_indices(n_atoms: int) -> np.ndarray:
    return np.unique(np.linspace(0, n_atoms - 1, N_CHECK_ATOMS).round().astype(np.int64))


class MRFDictionary:
    """Per-slice-position dictionaries for one protocol timing and one grid.

    Atoms are materialised per slice position on demand (kept in a small LRU cache of
    ``max_cached`` slice positions); everything else is held for all slice positions.
    """

    def __init__(
        self,
        protocol: Protocol,
        grid: DictionaryGrid,
        slices: dict[int, dict[str, np.ndarray]],
        rank_energy: float,
        n_clusters: int,
        max_cached: int = 4,
    ) -> None:
        self.protocol = protocol
        self.grid = grid
        self.timing_key = protocol.timing_key()
        self.rank_energy = float(rank_energy)
        self.n_clusters = int(n_clusters)
        self.t1, self.t2star, self.b1 = grid.parameters()
        self._meta = slices  # per slice: basis, singular_values, rank, labels, check, [atoms, norms]
        # slice positions with identical timing (one SMS slot) share one meta and one set of atoms
        first: dict[int, int] = {}
        for k in sorted(slices):
            first.setdefault(id(slices[k]), k)
        self._share = {k: first[id(slices[k])] for k in slices}
        self._cache: OrderedDict[int, SliceDictionary] = OrderedDict()
        self.max_cached = max_cached

    # ----------------------------------------------------------------- access
    @property
    def n_atoms(self) -> int:
        return int(self.t1.size)

    @property
    def slice_indices(self) -> tuple[int, ...]:
        return tuple(sorted(self._meta))

    def rank(self, slice_index: int) -> int:
        return int(self._meta[self.require_slice(slice_index)]["rank"])

    def require_slice(self, slice_index: int) -> int:
        """The slice position as int; :class:`DictionaryError` if the dictionary lacks it."""
        k = int(slice_index)
        if k not in self._meta:
            raise DictionaryError(
                f"dictionary has no slice position {k} (built for {list(self.slice_indices)})"
            )
        return k

    def slice(self, slice_index: int) -> SliceDictionary:
        """The dictionary of one slice position (re-simulated if it was stored without atoms)."""
        k = self._share[self.require_slice(slice_index)]
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        meta = self._meta[k]
        if "atoms" in meta:
            atoms, norms = meta["atoms"], meta["norms"]
        else:
            atoms, norms = _simulate_atoms(self.protocol, k, (self.t1, self.t2star, self.b1))
            idx = _check_indices(self.n_atoms)
            resim = atoms[idx].astype(np.float64) * norms[idx, None]
            if not np.allclose(resim, meta["check"], rtol=1e-6, atol=1e-9):
                raise DictionaryError(
                    "re-simulated atoms differ from those the dictionary was built with "
                    "(the signal model changed): rebuild the dictionary"
                )
        sd = SliceDictionary(
            atoms=atoms,
            norms=norms,
            basis=meta["basis"],
            singular_values=meta["singular_values"],
            rank=int(meta["rank"]),
            labels=meta["labels"],
        )
        self._cache[k] = sd
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return sd

    def check_timing(self, protocol_or_key: Protocol | str, what: str = "data") -> None:
        """Raise :class:`DictionaryError` unless the timing key equals the dictionary's."""
        key = protocol_or_key if isinstance(protocol_or_key, str) else protocol_or_key.timing_key()
        if key != self.timing_key:
            raise DictionaryError(
                f"timing key mismatch: {what} has timing key {key}, the dictionary was built for "
                f"{self.timing_key}; build a dictionary from this series' sidecar"
            )

    # ----------------------------------------------------------------- IO
    def save(self, path: str | os.PathLike[str], include_atoms: bool = False) -> Path:
        """Write one ``.npz`` atomically (temporary file in the same folder, then ``os.replace``)."""
        path = Path(path)
        meta = {
            "format_version": FORMAT_VERSION,
            "timing_key": self.timing_key,
            "protocol": self.protocol.to_sidecar(),
            "grid": self.grid.to_dict(),
            "rank_energy": self.rank_energy,
            "n_clusters": self.n_clusters,
            "slices": list(self.slice_indices),
            "shared": {str(k): r for k, r in self._share.items() if r != k},
            "include_atoms": bool(include_atoms),
        }
        arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta))}
        for k in self.slice_indices:
            if self._share[k] != k:
                continue
            m = self._meta[k]
            arrays[f"s{k}_basis"] = m["basis"]
            arrays[f"s{k}_singular_values"] = m["singular_values"]
            arrays[f"s{k}_rank"] = np.array(m["rank"])
            arrays[f"s{k}_labels"] = m["labels"].astype(np.int16 if self.n_clusters < 32768 else np.int32)
            arrays[f"s{k}_check"] = m["check"]
            if include_atoms:
                sd = self.slice(k)
                arrays[f"s{k}_atoms"] = sd.atoms
                arrays[f"s{k}_norms"] = sd.norms
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MRFDictionary:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError) as exc:
            raise DictionaryError(f"cannot read dictionary {path}: {exc}") from exc
        if "meta" not in data:
            raise DictionaryError(f"{path} is not an MRF dictionary (no metadata)")
        meta = json.loads(str(data["meta"]))
        if meta.get("format_version") != FORMAT_VERSION:
            raise DictionaryError(f"{path}: unsupported dictionary format {meta.get('format_version')}")
        protocol = Protocol.from_sidecar(meta["protocol"])
        if protocol.timing_key() != meta["timing_key"]:
            raise DictionaryError(f"{path}: stored protocol does not reproduce its timing key")
        grid = DictionaryGrid.from_config(
            {
                "t1_ms": meta["grid"]["t1_range_ms"],
                "t2star_ms": meta["grid"]["t2star_range_ms"],
                "step": meta["grid"]["step"],
                "b1_values": meta["grid"]["b1_values"],
                "drop_t2star_above_t1": meta["grid"]["drop_t2star_above_t1"],
            }
        )
        slices: dict[int, dict[str, np.ndarray]] = {}
        shared = {int(k): int(r) for k, r in meta.get("shared", {}).items()}
        for k in meta["slices"]:
            if int(k) in shared:
                continue
            s = {
                "basis": data[f"s{k}_basis"],
                "singular_values": data[f"s{k}_singular_values"],
                "rank": data[f"s{k}_rank"],
                "labels": data[f"s{k}_labels"].astype(np.int32),
                "check": data[f"s{k}_check"],
            }
            if f"s{k}_atoms" in data:
                s["atoms"] = data[f"s{k}_atoms"]
                s["norms"] = data[f"s{k}_norms"]
            slices[int(k)] = s
        for k, r in shared.items():
            slices[k] = slices[r]
        out = cls(protocol, grid, slices, meta["rank_energy"], meta["n_clusters"])
        if out.n_atoms != slices[next(iter(slices))]["labels"].size:
            raise DictionaryError(f"{path}: grid and stored atoms disagree")
        return out


def build_dictionary(
    protocol: Protocol,
    grid: DictionaryGrid | None = None,
    slices: list[int] | tuple[int, ...] | range | None = None,
    rank_energy: float = 0.999,
    progress: bool = False,
    n_clusters: int = 1024,
    kmeans_iter: int = 12,
) -> MRFDictionary:
    """Simulate, normalise, SVD-compress and cluster the atoms of every requested slice position.

    ``slices``: slice positions (indices along the image's 3rd axis); default all. Slice positions of
    one SMS slot share their timing and are simulated once.
    ``rank_energy``: energy fraction that fixes the SVD rank per slice position.
    ``n_clusters``: clusters for pruned matching (k-means in the rank-r space; the first slice
    position starts from a seeded random pick, later ones from the previous labels).
    """
    grid = grid or DictionaryGrid()
    if not 0 < rank_energy <= 1:
        raise ValueError("rank_energy must be in (0, 1]")
    idx = list(range(protocol.n_slices)) if slices is None else [int(k) for k in slices]
    for k in idx:
        if not 0 <= k < protocol.n_slices:
            raise ValueError(f"slice {k} outside 0..{protocol.n_slices - 1}")
    params = grid.parameters()
    check_idx = _check_indices(params[0].size)
    metas: dict[int, dict[str, np.ndarray]] = {}
    prev_labels: np.ndarray | None = None
    t_start = time.perf_counter()
    done: dict[int, int] = {}  # timing representative -> first slice position built with it
    for j, k in enumerate(idx):
        rep = protocol.timing_representative(k)
        if rep in done:
            metas[k] = metas[done[rep]]
            continue
        done[rep] = k
        atoms, norms = _simulate_atoms(protocol, k, params)
        _, sv, vt = np.linalg.svd(atoms.astype(np.float64), full_matrices=False)
        energy = np.cumsum(sv**2) / np.sum(sv**2)
        rank = int(min(np.searchsorted(energy, rank_energy - 1e-12) + 1, sv.size))
        r_cluster = max(rank, 4)
        x = (atoms @ vt[:r_cluster].T.astype(np.float32)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        n_it = kmeans_iter if prev_labels is None else max(kmeans_iter // 3, 2)
        labels = _spherical_kmeans(x, n_clusters, prev_labels, n_it)
        prev_labels = labels
        metas[k] = {
            "basis": vt.T.copy(),
            "singular_values": sv,
            "rank": np.array(rank),
            "labels": labels,
            "check": atoms[check_idx].astype(np.float64) * norms[check_idx, None],
        }
        if progress:
            print(
                f"dictionary: slice position {k} ({j + 1}/{len(idx)}): {atoms.shape[0]} atoms, "
                f"rank {rank}, {int(labels.max()) + 1} clusters, {time.perf_counter() - t_start:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    n_cl = int(max(int(m["labels"].max()) + 1 for m in metas.values())) if metas else n_clusters
    return MRFDictionary(protocol, grid, metas, rank_energy, n_cl)


def dictionary_for_sidecar(
    sidecar: dict[str, Any],
    grid: DictionaryGrid | None,
    cache_dir: str | os.PathLike[str],
    rank_energy: float = 0.999,
    n_clusters: int = 1024,
    progress: bool = False,
) -> Path:
    """Path of the cached dictionary for this sidecar's timing, building it if missing.

    The file name carries the timing key and a hash of the grid and build options. Two processes
    racing on the same key both build, each writes a temporary file and ``os.replace`` makes one of
    the identical results win, so readers never see a partial file.
    """
    grid = grid or DictionaryGrid()
    protocol = Protocol.from_sidecar(sidecar)
    opts = json.dumps(
        {"grid": grid.key(), "rank_energy": rank_energy, "n_clusters": n_clusters, "v": FORMAT_VERSION},
        sort_keys=True,
    )
    build_key = hashlib.sha256(opts.encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"mrfdict_{protocol.timing_key()}_{build_key}.npz"
    if path.exists():
        return path
    d = build_dictionary(protocol, grid, rank_energy=rank_energy, n_clusters=n_clusters, progress=progress)
    d.save(path)
    return path
