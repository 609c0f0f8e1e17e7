"""Classical lesion baseline without deep learning (issue 15): a per-subject outlier model.

``lesion_probability`` turns the quantitative maps (T1, T2* in ms) and the tissue probabilities of one
subject, all on one 3D grid (the T2w space), into a lesion probability map in [0, 1]. It never looks
at the manual lesion mask or the NAWM map (NAWM is derived from the manual mask). It is the floor
every network must beat and a no-GPU option for users; it runs in well under a second on the demo
grid (120 x 120 x 20) and is deterministic.

Why this model
--------------
MS lesions have T1 and T2* raised by 30-80 % over the normal-appearing white matter (docs/phantom.md),
so, relative to the subject's own white matter, a lesion is a one-sided outlier in both
log T1 and log T2*. Three things make "outlier in WM" harder than it sounds, and each has a term:

* Lesion T1/T2* overlap grey matter's, and the tissue EM labels lesion voxels GM (on the demo the
  median WM probability inside true lesions is 0.05-0.18). Requiring ``wm > 0.5`` at the voxel would
  remove the lesions; a smoothed WM probability also fails (large lesions lower it, and every
  WM/GM partial-volume voxel at the cortex passes it). Instead the *white-matter territory* is the
  set of holes of the WM mask: per slice (the axis with the largest voxel size, where the in-plane
  resolution is), ``fill_holes(wm > wm_threshold)`` minus the WM mask itself, dilated by
  ``territory_dilation`` voxels (6-connected) so that the lesion rim (partial volume with WM, so
  ``wm > 0.5`` there) is included. A lesion enclosed by WM is a hole; the cortex is not enclosed.
  Juxtacortical lesions (touching cortex) are not holes: they are missed by design.
* The lateral ventricles and the deep grey nuclei are also enclosed by WM. Ventricles and their
  partial-volume rim (raised T1 and T2*, little CSF probability after registration blur) are removed
  by a CSF gate: ``csf < csf_max`` at the voxel and a distance of more than ``csf_margin_mm`` from
  the CSF core (``csf > 0.5``). Periventricular lesions keep their part beyond the margin.
  Deep grey matter and cortex raise T1 much more than T2* (on the phantom: GM ~ +50 % T1 but
  ~ +25 % T2*); lesions raise both alike. A *shape gate* keeps voxels whose log T2* rise is at least
  ``t2s_t1_ratio`` times their log T1 rise, and a *cap* removes rises above ``max_log_rise`` (CSF
  partial volume: T2* of CSF is ~25x WM's; lesions stay below +80 %, log 0.59).
* Reference statistics must not be pulled by the lesions: median and MAD (x 1.4826) of log T1 and
  log T2* over confident WM (``wm > reference_wm``, eroded by one voxel in 3D), which excludes the
  lesions because the EM labels them GM, and would be robust to a few that slip in. The maps are
  used in log units, so the model is relative to the subject's own WM: multiplying T1 or T2* by a
  constant (a global calibration or field-strength change) leaves the output unchanged.

The probability, per voxel with finite positive T1 and T2* inside ``brain``::

    a, b   = log T1 - median_ref(log T1),  log T2* - median_ref(log T2*)      (log rises)
    z      = min(a / sd_T1, b / sd_T2*)          sd = max(1.4826 MAD_ref, min_log_sd)
    p      = expit((z - z_centre) / z_slope)                 one-sided, both maps must be raised
           * expit((b - t2s_t1_ratio * a) / gate_width)      lesion shape, not GM
           * expit((max_log_rise - max(a, b)) / gate_width)  not CSF partial volume
           * [csf < csf_max] * [distance to csf > 0.5 > csf_margin_mm] * [in WM territory]

and 0 elsewhere. With the defaults, the 33 % threshold of docs/evaluation.md means "both z >= 3.3
and the gates open", i.e. the probability is the logistic of a z distance with a documented centre
and slope, so thresholds are comparable with the networks' outputs.

Parameters (defaults chosen on the demo phantom's tuning subjects sub-01,02,03,05,07,08; the test
subjects sub-04 and sub-06 were not used to choose them):

=====================  ==========  =================================================================
``reference_wm``       0.9         WM probability of the reference (NAWM-like) voxels, then eroded
``z_centre``           4.0         z distance (robust sd units) at which p = 0.5
``z_slope``            1.0         logistic slope in z units (p = 0.27 at z = 3, 0.73 at z = 5)
``min_log_sd``         0.01        floor of the robust sd of log T1 / log T2* (noise-free inputs)
``t2s_t1_ratio``       0.7         shape gate: log T2* rise >= 0.7 x log T1 rise
``max_log_rise``       0.7         cap gate: rises above log 2 (x 2.0) are CSF partial volume
``gate_width``         0.05        logistic width of both gates, in log units
``wm_threshold``       0.5         WM mask whose holes are the territory
``territory_dilation`` 1           dilation of the holes, in voxels (6-connected, 3D)
``csf_max``            0.1         voxels with more CSF probability are not lesion
``csf_margin_mm``      3.0         voxels within this distance of the CSF core (csf > 0.5) are not
``slice_axis``         None        axis of the 2D hole filling; None: the axis with the largest voxel
=====================  ==========  =================================================================

No small-component removal is applied: the map stays a probability (the threshold sweep of docs/evaluation.md
section 5 sees it unaltered), and the lesion-wise evaluation already drops components < 0.01 ml.

Known limits (on the demo phantom): juxtacortical lesions are missed (not enclosed by WM); deep grey
nuclei and the septum between the ventricles give false positives (they are enclosed by WM and their
T1/T2* rise overlaps a lesion's); the first ~3 mm of a periventricular lesion next to the ventricle is
removed by the CSF margin. Lesion Dice at 33 % was ~0.23 on the tuning patients and ~0.18 on the two
test patients, far below the networks' 0.55-0.65: it is a floor, not a competitor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.special import expit

__all__ = ["lesion_probability", "reference_statistics", "white_matter_territory"]

_MAD_TO_SD = 1.4826
_MIN_REFERENCE_VOXELS = 50


def _check_grid(arrays: dict[str, np.ndarray]) -> tuple[int, ...]:
    shapes = {name: np.shape(a) for name, a in arrays.items()}
    ref = shapes["t1_ms"]
    if len(ref) != 3:
        raise ValueError(f"expected 3D arrays, got t1_ms of shape {ref}")
    bad = {n: s for n, s in shapes.items() if s != ref}
    if bad:
        raise ValueError(f"all arrays must share the grid {ref}; different: {bad}")
    return tuple(ref)


def reference_statistics(
    log_t1: np.ndarray, log_t2s: np.ndarray, reference: np.ndarray, min_log_sd: float = 0.01
) -> tuple[float, float, float, float]:
    """Median and robust sd (1.4826 MAD, floored at ``min_log_sd``) of log T1 and log T2* in ``reference``.

    Returns (median log T1, sd log T1, median log T2*, sd log T2*).
    """
    out: list[float] = []
    for x in (log_t1[reference], log_t2s[reference]):
        med = float(np.median(x))
        sd = _MAD_TO_SD * float(np.median(np.abs(x - med)))
        out += [med, max(sd, float(min_log_sd))]
    return out[0], out[1], out[2], out[3]


def white_matter_territory(
    wm: np.ndarray, valid: np.ndarray, wm_threshold: float = 0.5, dilation: int = 1, slice_axis: int = 2
) -> np.ndarray:
    """Holes of the WM mask, slice by slice along ``slice_axis``, dilated by ``dilation`` voxels, in ``valid``."""
    w = np.moveaxis(np.asarray(wm) > wm_threshold, slice_axis, -1)
    holes = np.zeros_like(w)
    for k in range(w.shape[-1]):
        holes[..., k] = ndimage.binary_fill_holes(w[..., k]) & ~w[..., k]
    holes = np.moveaxis(holes, -1, slice_axis)
    if dilation > 0 and holes.any():
        holes = ndimage.binary_dilation(holes, ndimage.generate_binary_structure(3, 1), iterations=int(dilation))
    return holes & valid


def lesion_probability(
    t1_ms: np.ndarray,
    t2star_ms: np.ndarray,
    wm: np.ndarray,
    gm: np.ndarray,
    csf: np.ndarray,
    brain: np.ndarray,
    zooms_mm: Sequence[float],
    *,
    reference_wm: float = 0.9,
    z_centre: float = 4.0,
    z_slope: float = 1.0,
    min_log_sd: float = 0.01,
    t2s_t1_ratio: float = 0.7,
    max_log_rise: float = 0.7,
    gate_width: float = 0.05,
    wm_threshold: float = 0.5,
    territory_dilation: int = 1,
    csf_max: float = 0.1,
    csf_margin_mm: float = 3.0,
    slice_axis: int | None = None,
) -> np.ndarray:
    """Lesion probability (float32, [0, 1]) of one subject from T1/T2* and tissue probabilities.

    All arrays share one 3D grid; ``zooms_mm`` are its voxel sizes. ``gm`` is accepted so that the
    call matches the tissue outputs, but the model does not use it (the EM labels lesions GM, so the
    GM probability carries no lesion evidence; see the module docstring for the model and every
    parameter). Zero outside ``brain`` and wherever T1 or T2* is not finite and positive.

    Raises ValueError when the grids differ, a parameter is out of range, or fewer than 50 voxels
    qualify as reference white matter.
    """
    arrays = {"t1_ms": t1_ms, "t2star_ms": t2star_ms, "wm": wm, "gm": gm, "csf": csf, "brain": brain}
    shape = _check_grid(arrays)
    zooms = np.asarray(zooms_mm, dtype=np.float64)[:3]
    if zooms.size != 3 or not np.all(zooms > 0):
        raise ValueError(f"zooms_mm must hold three positive voxel sizes, got {zooms_mm!r}")
    if z_slope <= 0 or gate_width <= 0:
        raise ValueError("z_slope and gate_width must be positive")
    if slice_axis is None:
        slice_axis = int(np.flatnonzero(zooms == zooms.max())[-1])
    if slice_axis not in (0, 1, 2, -1, -2, -3):
        raise ValueError(f"slice_axis must be one of 0, 1, 2, got {slice_axis}")

    t1 = np.asarray(t1_ms, dtype=np.float64)
    t2s = np.asarray(t2star_ms, dtype=np.float64)
    wm = np.asarray(wm, dtype=np.float64)
    csf = np.asarray(csf, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        valid = np.asarray(brain).astype(bool) & np.isfinite(t1) & np.isfinite(t2s) & (t1 > 0) & (t2s > 0)
    valid &= np.isfinite(wm) & np.isfinite(csf)

    reference = ndimage.binary_erosion(valid & (wm > reference_wm))
    if np.count_nonzero(reference) < _MIN_REFERENCE_VOXELS:
        raise ValueError(
            f"only {np.count_nonzero(reference)} reference WM voxels (wm > {reference_wm}, eroded); "
            f"need {_MIN_REFERENCE_VOXELS}: check the tissue probabilities and brain mask"
        )
    log_t1 = np.log(np.where(valid, t1, 1.0))
    log_t2s = np.log(np.where(valid, t2s, 1.0))
    m1, s1, m2, s2 = reference_statistics(log_t1, log_t2s, reference, min_log_sd)
    a = log_t1 - m1
    b = log_t2s - m2

    z = np.minimum(a / s1, b / s2)
    prob = expit((z - z_centre) / z_slope)
    prob *= expit((b - t2s_t1_ratio * a) / gate_width)
    prob *= expit((max_log_rise - np.maximum(a, b)) / gate_width)

    csf_core = csf > 0.5
    if csf_core.any():
        far_from_csf = ndimage.distance_transform_edt(~csf_core, sampling=zooms) > csf_margin_mm
    else:
        far_from_csf = np.ones(shape, dtype=bool)
    territory = white_matter_territory(wm, valid, wm_threshold, territory_dilation, slice_axis)
    keep = valid & territory & far_from_csf & (csf < csf_max)
    return np.where(keep, prob, 0.0).astype(np.float32)
