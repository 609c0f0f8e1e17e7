"""Cohort table and dataset generation (BIDS raw + derivatives/manual + derivatives/truth)."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from mrflesion import __version__
from mrflesion.layout import sidecar_path
from mrflesion.mrf.sequence import Protocol
from mrflesion.mrf.signal import simulate

from .anatomy import get_atlas
from .bids_writer import bids_name, write_json, write_nifti, write_tsv
from .config import load_config
from .fields import FourierField, apply_affine
from .lesions import TRUTH_TABLE_COLUMNS, lesion_id_map, lesion_truth_rows
from .subject import (
    _S_MANUAL,
    _S_MANUAL_NEW,
    _S_NOISE_FLAIR,
    _S_NOISE_MRF,
    _S_NOISE_T2W,
    Rendered,
    SessionModel,
    SubjectModel,
    closed_form,
    compose,
    mrf_signal,
    render,
    rician,
    rng_for,
)

GENERATOR = "mrflesion-phantom"


# ---------------------------------------------------------------------------------- cohort table
def cohort_table(n_subjects: int, n_sites: int, seed: int, longitudinal: bool = False) -> pd.DataFrame:
    """Participants without images: participant_id, site, group, sessions (+ age, sex). Deterministic.

    Subjects are split over sites as evenly as possible (earlier sites take the remainder); sites
    listed under ``cohort.control_fraction`` get ceil(fraction * n) controls, numbered first.
    """
    if n_subjects < 1 or n_sites < 1:
        raise ValueError("n_subjects and n_sites must be >= 1")
    cfg = load_config()["cohort"]
    width = max(2, len(str(n_subjects)))
    base, rem = divmod(n_subjects, n_sites)
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(0, 999)))
    rows = []
    idx = 0
    for s in range(n_sites):
        site = f"site{s + 1}"
        n_here = base + (1 if s < rem else 0)
        n_ctrl = min(n_here, math.ceil(float(cfg["control_fraction"].get(site, 0.0)) * n_here))
        for j in range(n_here):
            idx += 1
            rows.append(
                {
                    "participant_id": f"sub-{idx:0{width}d}",
                    "site": site,
                    "group": "control" if j < n_ctrl else "patient",
                    "sessions": ["ses-01", "ses-02"] if longitudinal else [],
                    "age": int(rng.integers(cfg["age_range"][0], cfg["age_range"][1] + 1)),
                    "sex": "F" if rng.uniform() < cfg["female_fraction"] else "M",
                }
            )
    return pd.DataFrame(rows, columns=["participant_id", "site", "group", "sessions", "age", "sex"])


# ---------------------------------------------------------------------------------- one subject
def _site_info(cfg: dict[str, Any], site: str) -> dict[str, Any]:
    return cfg["sites"][site] if site in cfg["sites"] else cfg["sites"][sorted(cfg["sites"])[-1]]


def site_protocol(n_slices: int, site: str, inversion_efficiency: str = "perfect") -> Protocol:
    """The MRF protocol of a phantom site: the published schedule on ``n_slices`` slices, SMS with the
    site's ``multiband`` factor (``resources/phantom.yaml``), the given inversion model. The workflow
    plans the dictionaries of the phantom with this very function."""
    mb = _site_info(load_config(), site).get("multiband") or 1
    return Protocol.default(int(n_slices), multiband=int(mb), inversion_efficiency=inversion_efficiency)


def _wm_reference(protocol: Protocol, cfg: dict[str, Any]) -> float:
    """Mean MRF signal of nominal WM (centre of the configured ranges, B1 = 1), unit gain."""
    wm = cfg["tissues"]["WM"]
    t1, t2s, pd_ = (float(np.mean(wm[k])) for k in ("t1", "t2s", "pd"))
    return float(pd_ * np.mean(simulate(protocol, protocol.n_slices // 2, t1, t2s, 1.0)))


def _sidecar_common(site_cfg: dict[str, Any]) -> dict[str, Any]:
    d = {
        "MagneticFieldStrength": 3,
        "Manufacturer": site_cfg["manufacturer"],
        "ManufacturersModelName": site_cfg["model"],
    }
    if site_cfg.get("multiband"):
        d["MultibandAccelerationFactor"] = int(site_cfg["multiband"])
    return d


def _manual_mask(
    rng: np.random.Generator, les_frac: np.ndarray, world: np.ndarray, voxel_mm: tuple, mcfg: dict[str, Any]
) -> np.ndarray:
    """Rater-like mask: smoothly varying threshold, some generous outlines, missed small lesions."""
    lo, hi = mcfg["threshold_range"]
    jitter = FourierField.random(rng, 1.0, (8.0, 30.0), 6)
    thr = 0.5 * (lo + hi) + 0.5 * (hi - lo) * np.tanh(jitter(world.reshape(-1, 3)).reshape(les_frac.shape))
    mask = (les_frac >= thr) & (les_frac > 0)
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    out = np.zeros_like(mask)
    vox_ml = float(np.prod(voxel_mm)) / 1000.0
    inplane = np.zeros((3, 3, 3), dtype=bool)
    inplane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    for i in range(1, n + 1):
        comp = lab == i
        vol = comp.sum() * vox_ml
        u_miss, u_dil = rng.uniform(), rng.uniform()
        if vol < mcfg["miss_volume_ml"] and u_miss < mcfg["miss_probability"]:
            continue
        if u_dil < mcfg["dilate_probability"]:
            comp = ndimage.binary_dilation(comp, structure=inplane) & (les_frac + 1e-9 > 0) | comp
            comp &= ndimage.binary_dilation(les_frac > 0, iterations=2)
        out |= comp
    return out.astype(np.uint8)


def _truth_sidecar(units: str, description: str, sources: list[str] | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"Units": units, "Description": description}
    if sources:
        d["Sources"] = sources
    return d


_DOMINANT = (
    "Truth for partial-volume voxels: the value of the dominant component (largest fraction "
    "among lesion, normal-appearing WM, GM, CSF; ties go to that order); 0 where the brain fraction "
    "is below 0.5. Evaluate parameter accuracy in pure-tissue voxels."
)


def _write_session(
    root: Path, cfg: dict[str, Any], subject: SubjectModel, ses: SessionModel, protocol: Protocol, noise: bool
) -> dict[str, Any]:
    atlas = get_atlas()
    sub, lab = subject.participant_id, ses.label
    site_cfg = _site_info(cfg, subject.site)
    level = int(cfg["gzip_level"])
    rel = Path(sub) / lab / "anat" if lab else Path(sub) / "anat"
    raw_dir = root / rel
    truth_dir = root / "derivatives" / "truth" / rel
    man_dir = root / "derivatives" / "manual" / rel
    spaces = subject.spaces(ses)
    stats: dict[str, Any] = {}

    def nm(suffix: str, ext: str = ".nii.gz", **ent: str | None) -> str:
        return bids_name(sub, lab, suffix, ext, **ent)

    def truth(name: str, data: np.ndarray, affine: np.ndarray, side: dict[str, Any]) -> None:
        write_nifti(truth_dir / name, data, affine, level)
        write_json(Path(sidecar_path(truth_dir / name)), side)

    def truths(affine: np.ndarray, maps: Iterable[tuple[str, np.ndarray, str, str]]) -> None:
        """Write truth maps (name, data, units, description) on the grid of ``affine``."""
        for name, data, units, description in maps:
            truth(name, data, affine, _truth_sidecar(units, description))

    def weighted(
        kind: str,
        r: Rendered,
        world: np.ndarray,
        seq: dict[str, Any],
        reference: float,
        noise_stream: int,
        scanning: str | list[str],
        pulse: str,
    ) -> None:
        """Write the raw ``kind`` image (T2w or FLAIR) and its sidecar: the closed-form signal of ``r``
        under ``seq`` times the session's gain and receive field (at the voxel centres ``world``), with
        Rician noise of sd gain x ``reference`` / SNR; ``scanning``, ``pulse``: the sidecar's
        ScanningSequence and PulseSequenceType."""
        sp = spaces[kind]
        gain = float(seq["gain"]) * ses.gain_factor
        recv = 1.0 + ses.receive[kind](world.reshape(-1, 3)).reshape(sp.shape)
        img = gain * recv * closed_form(r, kind, seq)
        if noise:
            rng = rng_for(subject.seed, subject.index, noise_stream, ses.stream)
            img = rician(rng, img, gain * reference / float(seq["snr"]))
        write_nifti(raw_dir / nm(kind), img.astype(np.float32), sp.affine, level)
        times = {"EchoTime": seq["te_ms"] / 1000.0, "RepetitionTime": seq["tr_ms"] / 1000.0}
        if "ti_ms" in seq:
            times["InversionTime"] = seq["ti_ms"] / 1000.0
        acquisition = {
            "ScanningSequence": scanning,
            "SequenceVariant": "NONE",
            "MRAcquisitionType": "2D",
            "PulseSequenceType": pulse,
        }
        write_json(raw_dir / nm(kind, ".json"), {**_sidecar_common(site_cfg), **times, **acquisition})

    # ------------------------------------------------------------ T2w (reference space)
    sp = spaces["T2w"]
    aff = sp.affine
    world_t = sp.world_centres()
    r_t = compose(subject, render(subject, sp, atlas, ses.lesions, extra_lesions=ses.previous_lesions))
    t2c = cfg["t2w"]
    wm = cfg["tissues"]["WM"]
    nominal = {k: float(np.mean(wm[k])) for k in ("t1", "t2", "pd")}
    from .tissue import inversion_recovery, spin_echo

    ref_t2w = float(spin_echo(nominal["pd"], nominal["t1"], nominal["t2"], t2c["tr_ms"], t2c["te_ms"]))
    weighted("T2w", r_t, world_t, t2c, ref_t2w, _S_NOISE_T2W, "SE", "Spin Echo (simulated)")
    m0_t = r_t.truth("pd") * subject.mrf_gain * ses.gain_factor
    truth(
        nm("M0map", space="T2w"),
        m0_t.astype(np.float32),
        aff,
        {
            **_truth_sidecar(
                "arbitrary",
                "Proton density of the dominant component times the MRF gain "
                "(no receive bias, no EPI Jacobian): PD = M0map / Gain. " + _DOMINANT,
            ),
            "Gain": subject.mrf_gain * ses.gain_factor,
        },
    )
    les_t = r_t.label("lesion")
    fractions_t = {t: r_t.wm_total if t == "WM" else r_t.fractions[t] for t in ("GM", "WM", "CSF")}
    wm_note = " (including lesion tissue; NAWM = WM - lesion)"
    truths(aff, [
        (nm("T1map", space="T2w"), r_t.truth("t1"), "ms", "True T1. " + _DOMINANT),
        (nm("T2starmap", space="T2w"), r_t.truth("t2s"), "ms", "True T2*. " + _DOMINANT),
        (nm("T2map", space="T2w"), r_t.truth("t2"), "ms", "True T2. " + _DOMINANT),
        (nm("TB1map", space="T2w"), r_t.b1.astype(np.float32), "1",
         "Transmit B1 scale (1 = nominal flip angle) experienced during the MRF scan, "
         "defined everywhere in the field of view."),
        *((nm("probseg", space="T2w", label=t), frac.astype(np.float32), "1",
           "Volume fraction of " + t + (wm_note if t == "WM" else "")) for t, frac in fractions_t.items()),
        (nm("probseg", space="T2w", label="lesion"), r_t.fractions["lesion"].astype(np.float32), "1",
         "Volume fraction of lesion tissue."),
        (nm("mask", space="T2w", label="lesion"), les_t, "1",
         "True lesions: voxels where lesion tissue is the dominant component."),
        (nm("mask", space="T2w", desc="brain"), (r_t.brain >= 0.5).astype(np.uint8), "1",
         "Brain mask: brain (GM+WM+CSF) fraction >= 0.5."),
    ])
    if ses.previous_lesions is not None:
        newm = (les_t > 0) & (r_t.extra < 0.5 * r_t.fractions["lesion"])
        truth(
            nm("mask", space="T2w", label="newenlarged"),
            newm.astype(np.uint8),
            aff,
            _truth_sidecar(
                "1",
                "New or enlarging lesions at follow-up: voxels of the follow-up lesion mask "
                "in which more than half of the lesion tissue was absent at baseline.",
            ),
        )
        stats["newenlarged_voxels"] = int(newm.sum())
    stats["lesion_voxels_T2w"] = int(les_t.sum())
    # lesion identities and the generator's per-lesion truth (deterministic: no random draw)
    ids_t = lesion_id_map(r_t.a, ses.lesions, les_t)
    truth(nm("dseg", space="T2w", desc="lesionid"), ids_t, aff,
          _truth_sidecar("1", "Lesion identity of every true-lesion voxel (0 elsewhere); the lesions and "
                         "their drawn truth are in the .tsv of the same name."))
    write_tsv(truth_dir / nm("dseg", ".tsv", space="T2w", desc="lesionid"), TRUTH_TABLE_COLUMNS,
              lesion_truth_rows(ses.lesions, ids_t))

    # ------------------------------------------------------------ MRF (distorted)
    sp = spaces["MRF"]
    world_m = sp.world_centres()
    a0 = subject.anatomical(apply_affine(sp.pose, world_m))
    disp = subject.b0_displacement_at(a0.reshape(-1, 3)).reshape(sp.shape)
    dy = np.gradient(disp, sp.voxel_mm[1], axis=1)
    mx = float(np.abs(dy).max())
    if mx > subject.b0["max_jac"]:
        disp *= subject.b0["max_jac"] / mx
        dy *= subject.b0["max_jac"] / mx
    jac = 1.0 + dy
    r_m = compose(subject, render(subject, sp, atlas, ses.lesions, displacement=disp))
    gain_m = subject.mrf_gain * ses.gain_factor
    recv_m = 1.0 + ses.receive["MRF"](world_m.reshape(-1, 3)).reshape(sp.shape)
    scale = gain_m * recv_m * jac
    clean = mrf_signal(protocol, r_m, scale)
    slab = sp.shape[2] * sp.voxel_mm[2]
    sigma = (
        gain_m * _wm_reference(protocol, cfg) / float(site_cfg["snr"]) * subject.gfactor_at(world_m, slab)
    ).astype(np.float32)
    mrf = (
        rician(rng_for(subject.seed, subject.index, _S_NOISE_MRF, ses.stream), clean, sigma[..., None])
        if noise
        else clean.astype(np.float32)
    )
    write_nifti(
        raw_dir / nm("MRF", acq="MRFEPI"),
        mrf.astype(np.float32),
        sp.affine,
        int(cfg["gzip_level_mrf"]),
        zooms4=float(np.mean(protocol.repetition_time_ms)) / 1000.0,
    )
    write_json(
        raw_dir / nm("MRF", ".json", acq="MRFEPI"),
        {
            **_sidecar_common(site_cfg),
            **protocol.to_sidecar(),
            "PhaseEncodingDirection": "j",
            "MRFSeries": True,
            "PulseSequenceType": "MRF-EPI (simulated)",
            "MRAcquisitionType": "2D",
        },
    )
    aff = sp.affine
    m0_m = (r_m.truth("pd") * scale).astype(np.float32)
    fractions_m = {t: r_m.wm_total if t == "WM" else r_m.fractions[t] for t in ("GM", "WM", "CSF")}
    truths(aff, [
        (nm("T1map", space="MRF"), r_m.truth("t1"), "ms", "True T1 in MRF space. " + _DOMINANT),
        (nm("T2starmap", space="MRF"), r_m.truth("t2s"), "ms", "True T2* in MRF space. " + _DOMINANT),
        (nm("TB1map", space="MRF"), r_m.b1.astype(np.float32), "1",
         "Transmit B1 scale used to simulate each MRF voxel."),
        (nm("M0map", space="MRF"), m0_m, "arbitrary",
         "M0 that pattern matching should return: proton density of the dominant component x MRF "
         "gain x receive bias x EPI Jacobian (1 + d(displacement)/dy). For a pure voxel the noise-free "
         "MRF series equals M0 * simulate(T1, T2*, B1). " + _DOMINANT),
        *((nm("probseg", space="MRF", label=t), frac.astype(np.float32), "1",
           f"Volume fraction of {t} seen by each (distorted) MRF voxel.") for t, frac in fractions_m.items()),
        (nm("probseg", space="MRF", label="lesion"), r_m.fractions["lesion"].astype(np.float32), "1",
         "Volume fraction of lesion tissue seen by each MRF voxel."),
        (nm("mask", space="MRF", label="lesion"), r_m.label("lesion"), "1",
         "True lesions in MRF space (dominant component)."),
        (nm("noisesigma", space="MRF"), sigma, "arbitrary",
         "Standard deviation of the Gaussian noise in each of the real and imaginary channels "
         "before the magnitude (Rician noise), same units as the MRF images."),
        (nm("xfm", space="MRF", desc="pedisplacement"), disp.astype(np.float32), "mm",
         "EPI displacement along the phase-encode axis (j = +y, voxel axis 1) in MRF space, pull "
         "convention: MRF voxel at world y shows the (undistorted) anatomy at y + d. Intensities are "
         "multiplied by the Jacobian 1 + dd/dy."),
    ])
    write_json(
        truth_dir / nm("xfm", ".json", **{"from": "MRF", "to": "T2w", "mode": "image"}),
        {
            "Matrix": ses.mrf_motion,
            "Inverse": np.linalg.inv(ses.mrf_motion),
            "Units": "mm",
            "Description": "Rigid transform in world (scanner RAS mm) coordinates: a point p "
            "(homogeneous, column) of the subject's anatomy at MRF-scan world position p_MRF lies at "
            "p_T2w = Matrix @ p_MRF in the T2w scan. Resampling an MRF-space image into T2w space "
            "samples it at Inverse @ p_T2w. "
            "The EPI distortion is not included (see desc-pedisplacement).",
        },
    )
    stats["b1_mean_brain"] = float(r_m.b1[r_m.brain >= 0.5].mean())

    # ------------------------------------------------------------ FLAIR (own pose and grid)
    sp = spaces["FLAIR"]
    aff = sp.affine
    world_f = sp.world_centres()
    # at a follow-up also the baseline's lesion fraction and the owner of the new lesion tissue
    raw_f = render(subject, sp, atlas, ses.lesions, extra_lesions=ses.previous_lesions)
    r_f: Rendered = compose(subject, raw_f)
    fc = cfg["flair"]
    ref_f = float(
        inversion_recovery(nominal["pd"], nominal["t1"], nominal["t2"], fc["tr_ms"], fc["ti_ms"], fc["te_ms"])
    )
    weighted("FLAIR", r_f, world_f, fc, ref_f, _S_NOISE_FLAIR, ["SE", "IR"], "FLAIR (simulated)")
    les_f = r_f.label("lesion")
    truth(
        nm("mask", space="FLAIR", label="lesion"),
        les_f,
        aff,
        _truth_sidecar("1", "True lesions in FLAIR space (dominant component)."),
    )
    write_json(
        truth_dir / nm("xfm", ".json", **{"from": "FLAIR", "to": "T2w", "mode": "image"}),
        {
            "Matrix": ses.flair_motion,
            "Inverse": np.linalg.inv(ses.flair_motion),
            "Units": "mm",
            "Description": "Rigid transform in world (scanner RAS mm) coordinates: p_T2w = Matrix @ p_FLAIR.",
        },
    )
    manual = _manual_mask(
        rng_for(subject.seed, subject.index, _S_MANUAL, ses.stream),
        r_f.fractions["lesion"],
        world_f,
        sp.voxel_mm,
        cfg["manual"],
    )
    mname = nm("mask", space="FLAIR", label="lesion")
    write_nifti(man_dir / mname, manual, aff, level)
    write_json(
        Path(sidecar_path(man_dir / mname)),
        {
            "Type": "Lesion",
            "Description": "Simulated manual WM lesion segmentation on FLAIR (rater-like: boundary "
            "jitter, occasional generous outlines, some small lesions missed).",
            "Sources": [f"bids:raw:{rel.as_posix()}/{nm('FLAIR')}"],
        },
    )
    if ses.previous_lesions is not None:
        # the new/enlarged lesions on the follow-up's FLAIR grid: the true mask (the rule of the T2w
        # one), their kind, and the simulated rater's mask (the rater model of the manual lesion mask on
        # the fraction of new lesion tissue, own random stream)
        frac_f = r_f.fractions["lesion"]
        newm_f = (les_f > 0) & (r_f.extra < 0.5 * frac_f)
        truth(
            nm("mask", space="FLAIR", label="newenlarged"),
            newm_f.astype(np.uint8),
            aff,
            _truth_sidecar(
                "1",
                "New or enlarging lesions at follow-up in FLAIR space: voxels of the follow-up lesion "
                "mask (dominant component) in which more than half of the lesion tissue was absent at "
                "baseline.",
            ),
        )
        # the lesion holding most of a voxel's new tissue: new (id absent at baseline) or enlarged
        owner = np.array([0] + [le.lesion_id for le in ses.lesions], dtype=np.int64)[raw_f["new_owner"]]
        is_new = (owner > 0) & ~np.isin(owner, [le.lesion_id for le in ses.previous_lesions])
        kind = np.where(is_new, 1, np.where(np.isin(owner, list(ses.enlarged_ids)), 2, 0))
        dseg = nm("dseg", space="FLAIR", desc="newenlarged")
        truth(
            dseg,
            (kind * newm_f).astype(np.uint8),
            aff,
            _truth_sidecar(
                "1",
                "New/enlarged lesions at follow-up in FLAIR space by kind: 1 new lesion (absent at "
                "baseline), 2 enlarging lesion (a baseline lesion that grew), 0 elsewhere; nonzero exactly "
                "on label-newenlarged_mask. A voxel takes the kind of the lesion holding most of its new "
                "lesion tissue. The levels are in the .tsv of the same name.",
            ),
        )
        write_tsv(truth_dir / nm("dseg", ".tsv", space="FLAIR", desc="newenlarged"), ["index", "name"],
                  [[1, "new"], [2, "enlarged"]])
        truth(
            nm("dseg", space="FLAIR", desc="newenlargedid"),
            (owner * newm_f).astype(np.int16),
            aff,
            _truth_sidecar(
                "1",
                "New/enlarged lesions at follow-up in FLAIR space by lesion: the phantom's lesion id (the "
                "lesion holding most of the voxel's new tissue; ids as in the follow-up's desc-lesionid "
                "table) on label-newenlarged_mask, 0 elsewhere. An enlarging lesion's new rim may break "
                "into several 26-connected pieces on the voxel grid; it is still one lesion.",
            ),
        )
        manual_new = _manual_mask(
            rng_for(subject.seed, subject.index, _S_MANUAL_NEW, ses.stream),
            np.clip(frac_f - r_f.extra, 0.0, None),
            world_f,
            sp.voxel_mm,
            cfg["manual"],
        )
        mname = nm("mask", space="FLAIR", label="newenlarged")
        write_nifti(man_dir / mname, manual_new, aff, level)
        prev = next(p for p, s in zip(subject.sessions, subject.sessions[1:], strict=False) if s is ses)
        prev_flair = Path(sub) / str(prev.label) / "anat" / bids_name(sub, prev.label, "FLAIR")
        write_json(
            Path(sidecar_path(man_dir / mname)),
            {
                "Type": "Lesion",
                "Description": "Simulated rater's new/enlarged lesion mask on the follow-up FLAIR: new "
                "lesions and the grown parts of enlarging lesions since the previous session (rater-like: "
                "boundary jitter, occasional generous outlines, some small ones missed).",
                "Sources": [f"bids:raw:{rel.as_posix()}/{nm('FLAIR')}", f"bids:raw:{prev_flair.as_posix()}"],
            },
        )
        stats["newenlarged_voxels_FLAIR"] = int(newm_f.sum())
    stats["lesions"] = len(ses.lesions)
    return stats


def _generate_subject(job: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    cfg = load_config()
    atlas = get_atlas()
    subj = SubjectModel.draw(
        cfg,
        job["grid"],
        atlas,
        job["seed"],
        job["index"],
        job["participant_id"],
        job["site"],
        job["group"],
        job["sessions"],
    )
    protocol = site_protocol(int(job["grid"]["shape"][2]), job["site"], job["inversion_efficiency"])
    root = Path(job["root"])
    stats = [_write_session(root, cfg, subj, ses, protocol, job["noise"]) for ses in subj.sessions]
    return {"participant_id": subj.participant_id, "seconds": time.perf_counter() - t0, "sessions": stats}


# ---------------------------------------------------------------------------------- dataset files
def _dataset_files(
    root: Path, table: pd.DataFrame, seed: int, grid_name: str, grid: dict[str, Any], longitudinal: bool,
    inversion_efficiency: str = "perfect",
) -> None:
    gen = {
        "Name": GENERATOR,
        "Version": __version__,
        "Description": f"seed={seed}, grid={grid_name}, subjects={len(table)}, "
        f"sites={table['site'].nunique()}, longitudinal={longitudinal}",
    }
    config = {
        "seed": seed,
        "grid": grid_name,
        "grid_spec": grid,
        "longitudinal": longitudinal,
        "inversion_efficiency": inversion_efficiency,
        "config": "resources/phantom.yaml",
    }
    write_json(
        root / "dataset_description.json",
        {
            "Name": "mrflesion digital phantom (simulated MRF-EPI MS cohort)",
            "BIDSVersion": "1.10.0",
            "DatasetType": "raw",
            "License": "CC0",
            "Authors": ["mrflesion phantom generator"],
            "GeneratedBy": [{**gen, "PhantomConfig": config}],
        },
    )
    (root / "README").write_text(
        "mrflesion digital phantom\n=========================\n\n"
        "Simulated multi-site MS cohort: MRF-EPI series (35 magnitude measurements, EPI-distorted along the\n"
        "phase-encode axis, Rician noise), spin-echo T2w and inversion-recovery FLAIR images generated from\n"
        "the MNI152 2009 tissue maps with per-subject deformation, pose, tissue values, lesions and fields.\n"
        "The MRF series (acq-MRFEPI_MRF) is not part of BIDS and is listed in .bidsignore.\n"
        "derivatives/truth holds the ground truth, derivatives/manual simulated rater lesion masks.\n"
        f"Generated with seed {seed} on the '{grid_name}' grid.\n"
    )
    (root / ".bidsignore").write_text("*_MRF.*\n")
    cols = ["participant_id", "site", "group", "age", "sex"]
    write_tsv(root / "participants.tsv", cols, table[cols].values.tolist())
    write_json(
        root / "participants.json",
        {
            "site": {
                "Description": "Acquisition site (scanner).",
                "Levels": {
                    s: f"{_site_info(load_config(), s)['manufacturer']} "
                    f"{_site_info(load_config(), s)['model']}"
                    for s in sorted(table["site"].unique())
                },
            },
            "group": {
                "Description": "Clinical group.",
                "Levels": {"control": "healthy control", "patient": "multiple sclerosis patient"},
            },
            "age": {"Description": "Age at first scan (simulated).", "Units": "year"},
            "sex": {"Description": "Sex (simulated).", "Levels": {"F": "female", "M": "male"}},
        },
    )
    if longitudinal:
        for _, row in table.iterrows():
            write_tsv(
                root / row["participant_id"] / f"{row['participant_id']}_sessions.tsv",
                ["session_id"],
                [[s] for s in row["sessions"]],
            )
    for name, desc in (
        ("truth", "Ground truth of the mrflesion digital phantom."),
        ("manual", "Simulated manual lesion masks (rater-like) of the mrflesion digital phantom."),
    ):
        write_json(
            root / "derivatives" / name / "dataset_description.json",
            {
                "Name": f"mrflesion phantom {name}",
                "BIDSVersion": "1.10.0",
                "DatasetType": "derivative",
                "Description": desc,
                "GeneratedBy": [gen],
                "SourceDatasets": [{"URL": "bids::"}],
            },
        )


def _resolve_grid(grid: str, override: dict[str, Any] | None) -> dict[str, Any]:
    if override is not None:
        return override
    grids = load_config()["grids"]
    if grid not in grids:
        raise ValueError(f"unknown grid {grid!r}; choose one of {sorted(grids)}")
    return grids[grid]


def _is_phantom_dir(path: Path) -> bool:
    if not path.exists():
        return False
    if path.is_dir() and not any(p.is_file() or p.is_symlink() for p in path.rglob("*")):
        return True  # empty, or only the empty folders Snakemake creates for declared outputs
    try:
        desc = json.loads((path / "dataset_description.json").read_text())
        return any(g.get("Name") == GENERATOR for g in desc.get("GeneratedBy", []))
    except (OSError, ValueError, AttributeError):
        return False


def generate(
    out_dir: str | Path,
    n_subjects: int = 12,
    n_sites: int = 2,
    seed: int = 42,
    grid: str = "demo",
    longitudinal: bool = False,
    n_jobs: int = 1,
    progress: bool = True,
    inversion_efficiency: str = "perfect",
    *,
    _noise: bool = True,
    _grid_override: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Write the phantom dataset to ``out_dir`` (atomically) and return the cohort table.

    ``out_dir`` may not exist, be empty, or hold an earlier phantom (it is replaced); anything else
    raises :class:`FileExistsError`. ``inversion_efficiency``: the inversion model the MRF series are
    simulated with (``perfect`` or ``b1``, see :mod:`mrflesion.mrf.signal`; the workflow passes its
    ``sequence_model.inversion_efficiency``, so that phantom and dictionary agree). ``_noise`` /
    ``_grid_override`` are private test switches.
    """
    from mrflesion.mrf.sequence import INVERSION_MODELS

    if inversion_efficiency not in INVERSION_MODELS:
        raise ValueError(f"inversion_efficiency must be one of {INVERSION_MODELS}, got {inversion_efficiency!r}")
    out = Path(out_dir).resolve()
    if out.exists() and not _is_phantom_dir(out):
        raise FileExistsError(f"{out} exists and is not a phantom dataset; refusing to replace it")
    g = _resolve_grid(grid, _grid_override)
    table = cohort_table(n_subjects, n_sites, seed, longitudinal)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        get_atlas()  # load once in the parent: forked workers inherit it
        _dataset_files(tmp, table, seed, grid if _grid_override is None else "custom", g, longitudinal,
                       inversion_efficiency)
        jobs = [
            {
                "grid": g,
                "seed": int(seed),
                "index": i + 1,
                "participant_id": r["participant_id"],
                "site": r["site"],
                "group": r["group"],
                "sessions": list(r["sessions"]),
                "root": str(tmp),
                "noise": _noise,
                "inversion_efficiency": inversion_efficiency,
            }
            for i, r in table.iterrows()
        ]
        t0 = time.perf_counter()
        n = len(jobs)

        def report(k: int, res: dict[str, Any]) -> None:
            if progress:
                print(
                    f"[phantom] {k}/{n} {res['participant_id']} done ({res['seconds']:.1f} s, "
                    f"{time.perf_counter() - t0:.1f} s elapsed)",
                    file=sys.stderr,
                    flush=True,
                )

        if n_jobs <= 1 or n == 1:
            for k, job in enumerate(jobs, 1):
                report(k, _generate_subject(job))
        else:
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
            with ProcessPoolExecutor(max_workers=min(n_jobs, n), mp_context=ctx) as ex:
                for k, res in enumerate(ex.map(_generate_subject, jobs), 1):
                    report(k, res)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return table
