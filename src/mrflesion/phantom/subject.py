"""One phantom subject: random draws (anatomy, pose, tissues, lesions, fields) and rendering.

Coordinates: *world* = scanner mm (RAS) of an image grid; *head* = ``pose @ world`` (MNI-like mm,
the subject's rigid head position); *anatomical* ``a = head + u(head)`` with a smooth random
deformation ``u``: the MNI maps and the lesions are evaluated at ``a``. Head-fixed fields (tissue
variation, B1, B0) are functions of ``a``; coil-fixed fields (receive bias, g-factor) of world mm.

Every image space renders the same subject by evaluating these functions at its own sample points,
so the truth is consistent between spaces by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mrflesion.mrf.sequence import Protocol
from mrflesion.mrf.signal import simulate

from .anatomy import Atlas
from .fields import (
    FourierField,
    apply_affine,
    dot,
    gaussian_bump,
    grid_affine,
    random_rigid,
    subvoxel_offsets,
)
from .lesions import Lesion, draw_lesions, followup_lesions, lesion_index
from .tissue import BASE_TISSUES, TissueModel, inversion_recovery, spin_echo

# RNG stream codes (one independent stream per component, so changing one does not shift others)
_S_ANAT, _S_TISSUE, _S_LESION, _S_FIELDS, _S_SESSION = 1, 2, 3, 4, 5
_S_NOISE_MRF, _S_NOISE_T2W, _S_NOISE_FLAIR, _S_MANUAL = 10, 11, 12, 13
_S_MANUAL_NEW = 14  # the rater's new/enlarged mask at a follow-up
COMPONENTS = ("lesion", "WM", "GM", "CSF")  # order of the dominant-tissue rule (ties -> earlier)


def rng_for(seed: int, index: int, *stream: int) -> np.random.Generator:
    """Independent generator for (seed, subject index, stream...): job-count independent."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(index), *stream)))


@dataclass(frozen=True)
class Space:
    name: str
    shape: tuple[int, int, int]
    voxel_mm: tuple[float, float, float]
    supersample: tuple[int, int, int]
    pose: np.ndarray  # world -> head, 4x4

    @property
    def affine(self) -> np.ndarray:
        return grid_affine(self.shape, self.voxel_mm)

    def world_centres(self) -> np.ndarray:
        ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in self.shape], indexing="ij"), axis=-1)
        return apply_affine(self.affine, ijk)


@dataclass
class SessionModel:
    label: str | None  # "ses-01" or None
    pose_t2w: np.ndarray
    mrf_motion: np.ndarray  # MRF world -> T2w world
    flair_motion: np.ndarray  # FLAIR world -> T2w world
    lesions: list[Lesion]
    previous_lesions: list[Lesion] | None
    gain_factor: float
    receive: dict[str, FourierField]
    stream: int
    #: lesion_id of the baseline lesions that are enlarged in this (follow-up) session; the lesions of
    #: ``lesions`` whose id is not in ``previous_lesions`` are new
    enlarged_ids: tuple[int, ...] = ()


@dataclass
class SubjectModel:
    index: int
    participant_id: str
    site: str
    group: str
    seed: int
    grid: dict[str, Any]
    deformation: tuple[FourierField, FourierField, FourierField]
    tissue: TissueModel
    b1: dict[str, Any]
    b0: dict[str, Any]
    gfactor: dict[str, Any]
    mrf_gain: float
    sessions: list[SessionModel] = field(default_factory=list)

    # -------------------------------------------------------------- construction
    @classmethod
    def draw(
        cls,
        cfg: dict[str, Any],
        grid: dict[str, Any],
        atlas: Atlas,
        seed: int,
        index: int,
        participant_id: str,
        site: str,
        group: str,
        sessions: list[str],
    ) -> SubjectModel:
        site_cfg = cfg["sites"][site] if site in cfg["sites"] else cfg["sites"][sorted(cfg["sites"])[-1]]
        anat = cfg["anatomy"]
        r_anat = rng_for(seed, index, _S_ANAT)
        dcfg = anat["deformation"]
        deformation = tuple(
            FourierField.random(
                r_anat, float(dcfg["amplitude_mm"]), tuple(dcfg["wavelength_mm"]), int(dcfg["modes"])
            )
            for _ in range(3)
        )
        tissue = TissueModel.draw(rng_for(seed, index, _S_TISSUE), cfg["tissues"])

        r_f = rng_for(seed, index, _S_FIELDS)
        b = site_cfg["b1"]
        j = b["jitter"]
        b1 = {
            "base": b["base"] + r_f.uniform(-1, 1) * j["base"],
            "bump": b["bump"] + r_f.uniform(-1, 1) * j["bump"],
            "sigma": float(b["bump_sigma_mm"]),
            "centre": np.asarray(grid["slab_center_mni"], dtype=float) + r_f.normal(scale=5.0, size=3),
            "gradient": np.asarray(b["gradient_per_100mm"], dtype=float)
            + r_f.uniform(-1, 1, 3) * j["gradient"],
            "modes": FourierField.random(r_f, float(b["modes_amplitude"]), (80.0, 200.0), 4),
            "clip": tuple(cfg["b1_clip"]),
        }
        bc = cfg["b0"]
        b0 = {
            "frontal": (
                np.asarray(bc["frontal"]["centre_mni"], float),
                np.asarray(bc["frontal"]["sigma_mm"], float),
                float(r_f.uniform(*bc["frontal"]["amplitude_mm"])),
            ),
            "temporal": [
                (
                    np.asarray(c, float),
                    np.asarray(bc["temporal"]["sigma_mm"], float),
                    float(r_f.uniform(*bc["temporal"]["amplitude_mm"])),
                )
                for c in bc["temporal"]["centres_mni"]
            ],
            "linear": r_f.uniform(-1, 1, 3) * float(bc["linear_mm_per_100mm"]) / 100.0,
            "modes": FourierField.random(r_f, float(bc["modes_amplitude_mm"]), (60.0, 150.0), 4),
            "max_jac": float(bc["max_jacobian_deviation"]),
        }
        gfactor = {
            "amplitude": float(site_cfg["gfactor"]["amplitude"]),
            "sigma": float(site_cfg["gfactor"]["sigma_mm"]),
            "multiband": site_cfg.get("multiband"),
        }
        mrf_gain = float(site_cfg["mrf_gain"]) * float(r_f.uniform(0.9, 1.1))

        subj = cls(
            index, participant_id, site, group, seed, grid, deformation, tissue, b1, b0, gfactor, mrf_gain
        )

        # lesions (patients only), within the slab's z range in MNI coordinates
        half = 0.5 * grid["shape"][2] * grid["voxel_mm"][2]
        zc = float(grid["slab_center_mni"][2])
        z_range = (zc - half + 3.0, zc + half - 3.0)
        r_les = rng_for(seed, index, _S_LESION)
        base_lesions: list[Lesion] = []
        if group == "patient":
            base_lesions = draw_lesions(
                r_les, atlas, tuple(grid["lesion_count"]), z_range, cfg["lesions"], cfg["lesion_tissue"]
            )
        labels: list[str | None] = list(sessions) if sessions else [None]
        r_ses = rng_for(seed, index, _S_SESSION)
        pose0 = np.eye(4)
        pose0[:3, 3] = np.asarray(grid["slab_center_mni"], dtype=float)
        pose0 = pose0 @ random_rigid(r_ses, anat["pose"]["translation_mm"], anat["pose"]["rotation_deg"])
        prev: list[Lesion] | None = None
        lesions = base_lesions
        enlarged: tuple[int, ...] = ()
        lcfg = cfg["longitudinal"]
        for s_i, lab in enumerate(labels):
            pose = pose0
            gain_factor = 1.0
            if s_i > 0:
                fm = anat["followup_motion"]
                pose = pose0 @ random_rigid(r_ses, fm["translation_mm"], fm["rotation_deg"])
                gain_factor = float(r_ses.uniform(*lcfg["intensity_change"]))
                prev = lesions
                lesions = followup_lesions(
                    r_les, atlas, lesions, z_range, cfg["lesions"], cfg["lesion_tissue"]
                )
                # followup_lesions keeps the baseline order and replaces an enlarged lesion by a copy
                enlarged = tuple(b.lesion_id for b, f in zip(prev, lesions, strict=False) if f is not b)
            mm = anat["mrf_motion"]
            fm = anat["flair_motion"]
            rc = cfg["receive_bias"]
            subj.sessions.append(
                SessionModel(
                    label=lab,
                    pose_t2w=pose,
                    mrf_motion=random_rigid(r_ses, mm["translation_mm"], mm["rotation_deg"]),
                    flair_motion=random_rigid(r_ses, fm["translation_mm"], fm["rotation_deg"]),
                    lesions=list(lesions),
                    previous_lesions=None if prev is None else list(prev),
                    gain_factor=gain_factor,
                    receive={
                        k: FourierField.random(
                            r_ses, float(rc["amplitude"]), tuple(rc["wavelength_mm"]), int(rc["modes"])
                        )
                        for k in ("MRF", "T2w", "FLAIR")
                    },
                    stream=100 + s_i,
                    enlarged_ids=enlarged,
                )
            )
        return subj

    # -------------------------------------------------------------- fields
    def anatomical(self, head: np.ndarray) -> np.ndarray:
        u = np.stack([f(head) for f in self.deformation], axis=-1)
        return head + u

    def b1_at(self, a: np.ndarray) -> np.ndarray:
        b = self.b1
        v = (
            b["base"]
            + b["bump"] * gaussian_bump(a, b["centre"], b["sigma"])
            + dot(a - b["centre"], b["gradient"]) / 100.0
            + b["modes"](a)
        )
        return np.clip(v, *b["clip"])

    def b0_displacement_at(self, a: np.ndarray) -> np.ndarray:
        """Pull displacement along +y (mm) of the MRF image at anatomical points."""
        c, s, amp = self.b0["frontal"]
        d = amp * gaussian_bump(a, c, s)
        for c, s, amp in self.b0["temporal"]:
            d = d + amp * gaussian_bump(a, c, s)
        return (
            d
            + dot(a - np.asarray(self.grid["slab_center_mni"], float), self.b0["linear"])
            + self.b0["modes"](a)
        )

    def gfactor_at(self, world: np.ndarray, slab_mm: float) -> np.ndarray:
        g = self.gfactor
        if g["amplitude"] <= 0:
            return np.ones(world.shape[:-1])
        inplane = gaussian_bump(world[..., :2], np.zeros(2), g["sigma"])
        mb = float(g["multiband"] or 1)
        period = slab_mm / mb
        slice_mod = 0.7 + 0.3 * np.cos(2 * np.pi * world[..., 2] / period)
        return 1.0 + g["amplitude"] * inplane * slice_mod

    # -------------------------------------------------------------- spaces
    def spaces(self, session: SessionModel) -> dict[str, Space]:
        g = self.grid
        t2w = Space("T2w", tuple(g["shape"]), tuple(g["voxel_mm"]), tuple(g["supersample"]), session.pose_t2w)
        mrf = Space("MRF", t2w.shape, t2w.voxel_mm, t2w.supersample, session.pose_t2w @ session.mrf_motion)
        fl = g["flair"]
        flair = Space(
            "FLAIR",
            tuple(fl["shape"]),
            tuple(fl["voxel_mm"]),
            tuple(fl["supersample"]),
            session.pose_t2w @ session.flair_motion,
        )
        return {"T2w": t2w, "MRF": mrf, "FLAIR": flair}


def render(
    subject: SubjectModel,
    space: Space,
    atlas: Atlas,
    lesions: list[Lesion],
    displacement: np.ndarray | None = None,
    extra_lesions: list[Lesion] | None = None,
    chunk_points: int = 600_000,
) -> dict[str, np.ndarray]:
    """Partial-volume fractions and lesion parameters of every voxel of ``space``.

    ``displacement`` (mm along +y, voxel grid): each voxel shows the anatomy at its centre + d ey
    (pull convention). Returns fractions GM, WM (incl. lesion), CSF, lesion; lesion ratio fields;
    anatomical voxel centres ``a``; and, with ``extra_lesions`` (the baseline's lesions at a follow-up),
    their lesion fraction ``extra`` and ``new_owner``: per voxel, 1 + the index in ``lesions`` of the
    lesion holding most of the voxel's new lesion tissue (white-matter-weighted sub-voxel samples in a
    lesion of ``lesions`` and in none of ``extra_lesions``), 0 where there is none (int32).
    """
    shape = space.shape
    world = space.world_centres()
    if displacement is not None:
        world = world.copy()
        world[..., 1] += displacement
    a = subject.anatomical(apply_affine(space.pose, world))
    # local Jacobian of voxel index -> anatomical mm, for the sub-voxel samples
    jac = [g.reshape(-1, 3) for g in np.gradient(a, axis=(0, 1, 2))]
    flat_a = a.reshape(-1, 3)
    offs = subvoxel_offsets(space.supersample)  # (S, 3)
    n_s = offs.shape[0]
    n_vox = flat_a.shape[0]
    keys = ("GM", "WM", "CSF", "lesion", "t1_inc", "t2s_inc", "t2_inc", "pd_les", "extra")
    flat = {k: np.zeros(n_vox, dtype=np.float32) for k in keys}
    owner = np.zeros(n_vox, dtype=np.int32)
    les_par = np.array(
        [[0.0, 0.0, 0.0, 0.0]] + [[le.t1_increase, le.t2s_increase, le.t2_increase, le.pd] for le in lesions]
    )
    todo = np.flatnonzero(atlas.near_brain(flat_a))  # voxels far from the brain stay empty
    per_chunk = max(1, chunk_points // n_s)
    for c0 in range(0, todo.size, per_chunk):
        vox = todo[c0 : c0 + per_chunk]
        ac = flat_a[vox]
        pts = ac[:, None, :] + sum(offs[None, :, ax, None] * jac[ax][vox][:, None, :] for ax in range(3))
        margin = float(np.abs(pts - ac[:, None, :]).max()) * np.sqrt(3.0)
        frac = atlas.sample(pts.reshape(-1, 3)).reshape(3, -1, n_s)  # (3, Nvox, S)
        for t_i, t in enumerate(BASE_TISSUES):
            flat[t][vox] = frac[t_i].mean(axis=1)
        wm = frac[1]
        if lesions:
            li = lesion_index(pts, lesions, ac, margin)
            lw = (li > 0) * wm
            tot = lw.sum(axis=1)
            flat["lesion"][vox] = tot / n_s
            safe = np.where(tot > 0, tot, 1.0)
            for k_i, k in enumerate(("t1_inc", "t2s_inc", "t2_inc", "pd_les")):
                flat[k][vox] = (lw * les_par[li, k_i]).sum(axis=1) / safe
        if extra_lesions:
            le = lesion_index(pts, extra_lesions, ac, margin)
            flat["extra"][vox] = ((le > 0) * wm).mean(axis=1)
        if extra_lesions is not None and lesions:
            new_w = np.where(le == 0, lw, 0.0) if extra_lesions else lw  # new lesion samples x WM
            rows = np.flatnonzero(new_w.sum(axis=1) > 0)
            if rows.size:
                votes = np.zeros((rows.size, len(lesions) + 1))
                np.add.at(votes, (np.repeat(np.arange(rows.size), n_s), li[rows].ravel()), new_w[rows].ravel())
                owner[vox[rows]] = np.argmax(votes[:, 1:], axis=1) + 1
    out: dict[str, np.ndarray] = {k: v.reshape(shape) for k, v in flat.items()}
    out["a"] = a
    if extra_lesions is not None:
        out["new_owner"] = owner.reshape(shape)
    return out


@dataclass
class Rendered:
    """Per-voxel tissue composition and parameters of one space."""

    fractions: dict[str, np.ndarray]  # lesion, WM (normal-appearing part), GM, CSF; sum = brain fraction
    params: dict[str, dict[str, np.ndarray]]  # component -> t1, t2s, t2, pd
    b1: np.ndarray
    a: np.ndarray
    extra: np.ndarray
    wm_total: np.ndarray

    @property
    def brain(self) -> np.ndarray:
        return sum(self.fractions.values())

    def dominant(self) -> tuple[np.ndarray, np.ndarray]:
        """(component index into COMPONENTS, inside-brain mask: brain fraction >= 0.5)."""
        stack = np.stack([self.fractions[c] for c in COMPONENTS])
        return np.argmax(stack, axis=0), self.brain >= 0.5

    def truth(self, param: str) -> np.ndarray:
        dom, inside = self.dominant()
        stack = np.stack([self.params[c][param] for c in COMPONENTS])
        v = np.take_along_axis(stack, dom[None], axis=0)[0]
        return np.where(inside, v, 0.0).astype(np.float32)

    def label(self, component: str) -> np.ndarray:
        dom, inside = self.dominant()
        return ((dom == COMPONENTS.index(component)) & inside).astype(np.uint8)


def compose(subject: SubjectModel, raw: dict[str, np.ndarray]) -> Rendered:
    """Tissue parameters per voxel from the rendered composition."""
    a = raw["a"]
    shape = a.shape[:3]
    params: dict[str, dict[str, np.ndarray]] = {}
    for t in BASE_TISSUES:
        sel = raw[t] > 1e-6  # WM includes the lesion tissue, whose values derive from NAWM
        vals = subject.tissue.values(t, a[sel])
        params[t] = {}
        for p, v in vals.items():
            full = np.zeros(shape)
            full[sel] = v
            params[t][p] = full
    wm = params["WM"]
    params["lesion"] = {
        "t1": wm["t1"] * (1.0 + raw["t1_inc"]),
        "t2s": wm["t2s"] * (1.0 + raw["t2s_inc"]),
        "t2": wm["t2"] * (1.0 + raw["t2_inc"]),
        "pd": raw["pd_les"].astype(np.float64),
    }
    les = raw["lesion"].astype(np.float64)
    fractions = {
        "lesion": les,
        "WM": np.clip(raw["WM"] - les, 0.0, None),
        "GM": raw["GM"].astype(np.float64),
        "CSF": raw["CSF"].astype(np.float64),
    }
    b1 = np.ones(shape)
    b1[...] = subject.b1_at(a.reshape(-1, 3)).reshape(shape)
    return Rendered(fractions, params, b1, a, raw["extra"].astype(np.float64), raw["WM"].astype(np.float64))


def mrf_signal(protocol: Protocol, r: Rendered, scale: np.ndarray) -> np.ndarray:
    """Noise-free MRF magnitude series (X, Y, Z, n) = scale * |sum_t f_t PD_t simulate(T1_t, T2*_t, B1)|.

    The tissue signals of a partial-volume voxel add coherently (signed, same phase) before the
    magnitude is taken. Rician noise is added to the signed sum (same magnitude statistics).
    """
    shape = r.b1.shape
    n = protocol.n_measurements
    out = np.zeros(shape + (n,), dtype=np.float32)
    for k in range(shape[2]):
        acc = np.zeros(shape[:2] + (n,))
        for c in COMPONENTS:
            f = r.fractions[c][:, :, k]
            sel = f > 1e-5
            if not np.any(sel):
                continue
            p = r.params[c]
            s = simulate(protocol, k, p["t1"][:, :, k][sel], p["t2s"][:, :, k][sel], r.b1[:, :, k][sel])
            acc[sel] += (f[sel] * p["pd"][:, :, k][sel])[:, None] * s
        out[:, :, k] = np.abs(acc) * scale[:, :, k, None]
    return out


def closed_form(r: Rendered, kind: str, cfg: dict[str, Any]) -> np.ndarray:
    """Noise-free T2w (spin echo) or FLAIR (inversion recovery) image for unit gain."""
    out = np.zeros(r.b1.shape)
    for c in COMPONENTS:
        f = r.fractions[c]
        sel = f > 1e-5
        p = {k: v[sel] for k, v in r.params[c].items()}
        if kind == "T2w":
            s = spin_echo(p["pd"], p["t1"], p["t2"], cfg["tr_ms"], cfg["te_ms"])
        else:
            s = inversion_recovery(p["pd"], p["t1"], p["t2"], cfg["tr_ms"], cfg["ti_ms"], cfg["te_ms"])
        out[sel] += f[sel] * s
    return out


def rician(rng: np.random.Generator, signal: np.ndarray, sigma: np.ndarray | float) -> np.ndarray:
    """Magnitude of signal + complex Gaussian noise of standard deviation ``sigma`` per channel.

    Works slice by slice (axis 2) to bound memory; ``sigma`` broadcasts against ``signal``.
    """
    sig = np.broadcast_to(np.asarray(sigma, dtype=np.float32), signal.shape)
    out = np.empty(signal.shape, dtype=np.float32)
    for k in range(signal.shape[2]):
        shape = signal[:, :, k].shape
        re = signal[:, :, k].astype(np.float32) + sig[:, :, k] * rng.standard_normal(shape, dtype=np.float32)
        im = sig[:, :, k] * rng.standard_normal(shape, dtype=np.float32)
        out[:, :, k] = np.sqrt(re * re + im * im)
    return out
