"""MS lesions: irregular ellipsoidal blobs in white matter, drawn per patient in MNI space.

A lesion is the union of one or more blobs (large, confluent lesions have several parts). A blob
is an ellipsoid (centre, rotation, semi-axes) whose surface radius is modulated by a few random
angular modes, giving irregular shapes. Lesions live in the subject's anatomical (MNI-like)
coordinates, so they deform and move with the anatomy in every image space.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .anatomy import Atlas
from .fields import dot, rotation_matrix


@dataclass(frozen=True)
class Blob:
    centre: np.ndarray  # (3,) mm
    rotation: np.ndarray  # (3, 3) columns = principal axes
    axes: np.ndarray  # (3,) semi-axes, mm
    mod_dirs: np.ndarray  # (K, 3) unit vectors
    mod_freq: np.ndarray  # (K,)
    mod_phase: np.ndarray  # (K,)
    irregularity: float

    @property
    def reach(self) -> float:
        return float(self.axes.max() * (1.0 + self.irregularity))

    def inside(self, p: np.ndarray) -> np.ndarray:
        q = dot(p - self.centre, self.rotation) / self.axes
        r = np.sqrt(np.sum(q * q, axis=-1))
        u = q / np.maximum(r, 1e-9)[:, None]
        mod = np.cos(np.pi * self.mod_freq * dot(u, self.mod_dirs.T) + self.mod_phase).mean(axis=-1)
        return r < 1.0 + self.irregularity * mod

    def scaled(self, factor: float) -> Blob:
        """Same blob, linear size times ``factor`` (volume times factor^3)."""
        return replace(self, axes=self.axes * factor)


@dataclass(frozen=True)
class Lesion:
    """One lesion: its blobs and tissue ratios over NAWM (t1, t2s, t2) plus its proton density."""

    lesion_id: int
    blobs: tuple[Blob, ...]
    t1_increase: float
    t2s_increase: float
    t2_increase: float
    pd: float
    volume_ml: float  # nominal (drawn) volume
    periventricular: bool

    def scaled(self, volume_factor: float, new_id: int | None = None) -> Lesion:
        """Enlarged copy: every blob grows about the lesion's first centre."""
        f = volume_factor ** (1.0 / 3.0)
        c0 = self.blobs[0].centre
        blobs = tuple(replace(b.scaled(f), centre=c0 + f * (b.centre - c0)) for b in self.blobs)
        return replace(
            self,
            blobs=blobs,
            volume_ml=self.volume_ml * volume_factor,
            lesion_id=self.lesion_id if new_id is None else new_id,
        )


def _blob(
    rng: np.random.Generator,
    centre: np.ndarray,
    volume_mm3: float,
    cfg: dict[str, Any],
    main_axis: np.ndarray | None,
) -> Blob:
    aspect = np.sort(rng.uniform(*cfg["aspect"], size=2))[::-1]
    rel = np.array([1.0, aspect[0], aspect[1]])
    scale = (3.0 * volume_mm3 / (4.0 * np.pi * np.prod(rel))) ** (1.0 / 3.0)
    rot = rotation_matrix(rng.uniform(-180, 180, size=3))
    if main_axis is not None:  # align the long axis (Dawson's fingers: radial to the ventricles)
        e0 = main_axis / np.linalg.norm(main_axis)
        tmp = rot[:, 1] - (rot[:, 1] @ e0) * e0
        e1 = tmp / np.linalg.norm(tmp)
        rot = np.stack([e0, e1, np.cross(e0, e1)], axis=1)
    k = 3
    d = rng.normal(size=(k, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return Blob(
        centre=np.asarray(centre, dtype=float),
        rotation=rot,
        axes=scale * rel,
        mod_dirs=d,
        mod_freq=rng.uniform(1.5, 3.5, size=k),
        mod_phase=rng.uniform(0, 2 * np.pi, size=k),
        irregularity=float(rng.uniform(*cfg["irregularity"])),
    )


def _pick_centre(
    rng: np.random.Generator, atlas: Atlas, z_range: tuple[float, float], peri: bool
) -> np.ndarray:
    pool = atlas.periventricular if peri else atlas.deep
    ok = (pool[:, 2] >= z_range[0]) & (pool[:, 2] <= z_range[1])
    if not np.any(ok):
        pool = np.concatenate([atlas.periventricular, atlas.deep])
        ok = (pool[:, 2] >= z_range[0]) & (pool[:, 2] <= z_range[1])
    cand = pool[ok] if np.any(ok) else pool
    return cand[rng.integers(len(cand))] + rng.uniform(-0.5, 0.5, size=3)


def make_lesion(
    rng: np.random.Generator,
    atlas: Atlas,
    lesion_id: int,
    volume_ml: float,
    z_range: tuple[float, float],
    cfg: dict[str, Any],
    tissue_cfg: dict[str, Any],
    n_parts: int = 1,
) -> Lesion:
    """One lesion of nominal ``volume_ml`` (periventricular with the configured probability)."""
    peri = bool(rng.uniform() < cfg["periventricular_probability"]) or n_parts > 1
    centre = _pick_centre(rng, atlas, z_range, peri)
    radial = centre - atlas.ventricle_centre
    radial[2] *= 0.3  # fingers run mostly in-plane-ish, outward from the ventricles
    blobs = []
    part_vol = volume_ml * 1000.0 / n_parts * 1.3  # parts overlap
    for j in range(n_parts):
        c = centre if j == 0 else centre + rng.normal(scale=0.6 * (part_vol ** (1 / 3)), size=3)
        blobs.append(_blob(rng, c, part_vol, cfg, radial if peri else None))
    return Lesion(
        lesion_id=lesion_id,
        blobs=tuple(blobs),
        t1_increase=float(rng.uniform(*tissue_cfg["t1_increase"])),
        t2s_increase=float(rng.uniform(*tissue_cfg["t2s_increase"])),
        t2_increase=float(rng.uniform(*tissue_cfg["t2_increase"])),
        pd=float(rng.uniform(*tissue_cfg["pd"])),
        volume_ml=float(volume_ml),
        periventricular=peri,
    )


def draw_lesions(
    rng: np.random.Generator,
    atlas: Atlas,
    count_range: tuple[int, int],
    z_range: tuple[float, float],
    cfg: dict[str, Any],
    tissue_cfg: dict[str, Any],
) -> list[Lesion]:
    """The lesions of one patient: a log-uniform count, log-normal volumes, maybe one large lesion."""
    lo, hi = count_range
    n = int(np.clip(np.round(np.exp(rng.uniform(np.log(lo), np.log(hi + 0.999)) - 0.5)), lo, hi))
    lesions: list[Lesion] = []
    vmin, vmax = cfg["volume_ml"]
    start = 0
    if rng.uniform() < cfg["large_probability"]:
        lv = float(np.exp(rng.uniform(*np.log(cfg["large_volume_ml"]))))
        parts = int(rng.integers(cfg["large_parts"][0], cfg["large_parts"][1] + 1))
        lesions.append(make_lesion(rng, atlas, 1, lv, z_range, cfg, tissue_cfg, n_parts=parts))
        start = 1
    for i in range(start, n):
        v = float(np.clip(10 ** rng.normal(cfg["volume_log10_mean"], cfg["volume_log10_sd"]), vmin, vmax))
        lesions.append(make_lesion(rng, atlas, i + 1, v, z_range, cfg, tissue_cfg))
    return lesions


def followup_lesions(
    rng: np.random.Generator,
    atlas: Atlas,
    baseline: list[Lesion],
    z_range: tuple[float, float],
    cfg: dict[str, Any],
    tissue_cfg: dict[str, Any],
) -> list[Lesion]:
    """Follow-up lesion set: the baseline lesions, some enlarged, plus new lesions.

    A new lesion is drawn again (up to ``followup.placement_tries`` times) while it lies closer than
    ``followup.min_gap_mm`` to a lesion of the follow-up set (baseline, enlarged or new), so that it is
    new tissue and a lesion of its own; if no draw is clear, the clearest one is kept. The first draw
    that is clear is the draw of the generator without this rule (same random stream).
    """
    fu = cfg["followup"]
    out = list(baseline)
    if not baseline:
        return out
    n_enl = min(len(baseline), int(rng.integers(fu["enlarge"][0], fu["enlarge"][1] + 1)))
    for i in rng.choice(len(baseline), size=n_enl, replace=False):
        out[i] = baseline[i].scaled(float(rng.uniform(*fu["enlarge_factor"])))
    n_new = int(rng.integers(fu["new"][0], fu["new"][1] + 1))
    next_id = max(les.lesion_id for les in baseline) + 1
    gap = float(fu.get("min_gap_mm", 0.0))
    for j in range(n_new):
        best, best_gap = None, -1.0
        for _ in range(max(1, int(fu.get("placement_tries", 1)))):
            v = float(np.exp(rng.uniform(*np.log(fu["new_volume_ml"]))))
            cand = make_lesion(rng, atlas, next_id + j, v, z_range, cfg, tissue_cfg)
            g = clearance_mm(cand, out, gap) if gap > 0 else gap
            if g > best_gap:
                best, best_gap = cand, g
            if g >= gap:
                break
        assert best is not None
        out.append(best)
    return out


def clearance_mm(lesion: Lesion, others: list[Lesion], limit: float, step: float = 0.5) -> float:
    """Distance (mm, anatomical) between ``lesion`` and the nearest of ``others``, capped at ``limit``:
    0 where they overlap. Sampled on a ``step`` mm grid around ``lesion`` (exact to about a step)."""
    def close(o: Lesion) -> bool:  # bounding spheres of some pair of blobs within ``limit``
        return any(np.linalg.norm(a.centre - b.centre) < a.reach + b.reach + limit
                   for a in lesion.blobs for b in o.blobs)

    near = [o for o in others if close(o)]
    if not near:
        return float(limit)
    centres = np.stack([b.centre for b in lesion.blobs])
    reach = max(b.reach for b in lesion.blobs) + limit + step
    lo, hi = centres.min(axis=0) - reach, centres.max(axis=0) + reach
    axes = [np.arange(lo[k], hi[k] + step, step) for k in range(3)]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    shape = pts.shape[:3]
    pts = pts.reshape(-1, 3)
    inside = (lesion_index(pts, [lesion]) > 0).reshape(shape)
    other = (lesion_index(pts, near) > 0).reshape(shape)
    if not other.any():
        return float(limit)
    if not inside.any():  # thinner than the sampling step: measure from its centres
        d = np.min(np.linalg.norm(pts[other.ravel()][:, None, :] - centres[None], axis=-1))
        return float(min(limit, d))
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(~inside, sampling=step)
    return float(min(limit, dist[other].min()))


def lesion_index(
    points: np.ndarray, lesions: list[Lesion], centres: np.ndarray | None = None, margin: float = 0.0
) -> np.ndarray:
    """Per point: 0 outside every lesion, else 1 + index (in ``lesions``) of the first lesion hit.

    ``points`` is (N, 3), or (V, S, 3) sub-voxel samples grouped by voxel with the voxel
    ``centres`` (V, 3) and ``margin`` (mm, max sample distance from its centre) used to skip voxels
    far from every blob cheaply. Returns an int32 array of ``points.shape[:-1]``.
    """
    grouped = points.ndim == 3
    pts = points if grouped else points[:, None, :]
    cen = centres if (grouped and centres is not None) else pts.reshape(-1, 3)
    if not grouped or centres is None:
        pts = pts.reshape(-1, 1, 3)
        margin = 0.0
    out = np.zeros(pts.shape[:2], dtype=np.int32)
    if lesions and pts.shape[0]:
        lo = cen.min(axis=0) - margin
        hi = cen.max(axis=0) + margin
        for li, les in enumerate(lesions):
            for b in les.blobs:
                r = b.reach + margin
                if np.any(b.centre + r < lo) or np.any(b.centre - r > hi):
                    continue
                d = np.abs(cen - b.centre)
                vox = np.flatnonzero((d[:, 0] <= r) & (d[:, 1] <= r) & (d[:, 2] <= r))
                if vox.size == 0:
                    continue
                sub = pts[vox].reshape(-1, 3)
                hit = b.inside(sub).reshape(vox.size, -1) & (out[vox] == 0)
                out[vox] = np.where(hit, li + 1, out[vox])
    return out.reshape(points.shape[:-1])


#: Columns of the lesion table (BIDS ``dseg.tsv``: ``index``, ``name`` and the lesion's drawn truth).
TRUTH_TABLE_COLUMNS = ["index", "name", "location", "periventricular", "nominal_volume_ml", "voxels",
                       "t1_ratio", "t2s_ratio", "t2_ratio", "pd"]


def lesion_id_map(anatomical: np.ndarray, lesions: list[Lesion], dominant: np.ndarray) -> np.ndarray:
    """Lesion identity of every voxel of a lesion mask: the ``lesion_id`` of the lesion containing the
    voxel centre (``anatomical``: (X, Y, Z, 3) voxel centres in anatomical mm), 0 outside ``dominant``
    (the mask). A mask voxel whose centre lies in no lesion (partial volume) takes the identity of the
    nearest voxel that has one. Deterministic: no random draw."""
    from scipy import ndimage

    mask = np.asarray(dominant) > 0
    out = np.zeros(mask.shape, dtype=np.int16)
    if not lesions or not mask.any():
        return out
    idx = lesion_index(anatomical[mask], lesions)
    ids = np.array([0] + [les.lesion_id for les in lesions], dtype=np.int16)
    out[mask] = ids[idx]
    missing = mask & (out == 0)
    if missing.any() and (out > 0).any():
        nearest = ndimage.distance_transform_edt(out == 0, return_distances=False, return_indices=True)
        out[missing] = out[tuple(ix[missing] for ix in nearest)]
    return out


def lesion_truth_rows(lesions: list[Lesion], id_map: np.ndarray) -> list[list[Any]]:
    """One row per lesion (:data:`TRUTH_TABLE_COLUMNS`): the location class the generator drew
    (periventricular: centre within ``anatomy.periventricular_mm`` of the lateral ventricles, or a
    multi-part confluent lesion; else deep white matter), its nominal volume, its voxels in ``id_map``
    and its tissue values relative to the local normal-appearing white matter."""
    counts = np.bincount(np.asarray(id_map, dtype=np.int64).ravel(),
                         minlength=max([les.lesion_id for les in lesions], default=0) + 1)
    return [[les.lesion_id, f"lesion-{les.lesion_id}",
             "periventricular" if les.periventricular else "deep_white_matter", bool(les.periventricular),
             round(les.volume_ml, 6), int(counts[les.lesion_id]), round(1.0 + les.t1_increase, 6),
             round(1.0 + les.t2s_increase, 6), round(1.0 + les.t2_increase, 6), round(les.pd, 6)]
            for les in lesions]
