"""Classical new/enlarging-lesion detector: subtraction of the co-registered, normalised FLAIRs.

The non-deep-learning comparator every table shows beside the network, in the spirit of the
longitudinal LST pipeline and of subtraction reading: a voxel is a candidate where the follow-up is
brighter than the baseline by more than ``difference`` (in units of the brain's median FLAIR signal) AND
the follow-up itself is hyperintense (above ``hyperintensity``: a lesion, not a shifted edge or a CSF
change), both after a light Gaussian smoothing (``sigma_mm``) that trades a little sensitivity to the
smallest lesions for far fewer noise components; then 26-connected components smaller than
``min_lesion_ml`` are dropped. The two thresholds are chosen on the training and validation pairs by
lesion-wise F1 (:func:`fit_thresholds`), never on test pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from ..evaluate.lesionwise import lesion_mask, lesionwise_metrics
from ..evaluate.metrics import voxel_volume_ml

#: the grid the thresholds are chosen on (normalised FLAIR units)
DIFFERENCE_GRID = (0.10, 0.15, 0.20, 0.25, 0.30, 0.40, 0.50)
HYPERINTENSITY_GRID = (1.0, 1.1, 1.2, 1.3, 1.4)


@dataclass(frozen=True)
class SubtractionParams:
    difference: float = 0.2
    hyperintensity: float = 1.2
    sigma_mm: float = 1.0
    min_lesion_ml: float = 0.01

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, float]) -> SubtractionParams:
        return cls(**{k: float(d[k]) for k in ("difference", "hyperintensity", "sigma_mm", "min_lesion_ml")})


def _smooth(volume: np.ndarray, voxel_mm: Sequence[float], sigma_mm: float) -> np.ndarray:
    if sigma_mm <= 0:
        return np.asarray(volume, np.float32)
    sig = [sigma_mm / float(v) for v in voxel_mm]
    return ndimage.gaussian_filter(np.asarray(volume, np.float32), sig, mode="nearest")


def subtraction_score(baseline: np.ndarray, followup: np.ndarray, brain: np.ndarray,
                      voxel_mm: Sequence[float], sigma_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """The smoothed difference (follow-up - baseline) and the smoothed follow-up, both 0 outside
    ``brain`` (normalised FLAIRs in one space)."""
    d = _smooth(followup - baseline, voxel_mm, sigma_mm)
    f = _smooth(followup, voxel_mm, sigma_mm)
    return np.where(brain, d, 0.0).astype(np.float32), np.where(brain, f, 0.0).astype(np.float32)


def detect(baseline: np.ndarray, followup: np.ndarray, brain: np.ndarray, voxel_mm: Sequence[float],
           params: SubtractionParams) -> tuple[np.ndarray, np.ndarray]:
    """(score, binary map): ``score`` the smoothed difference where the follow-up is hyperintense (0
    elsewhere), the map ``score >= difference`` cleaned of components < ``min_lesion_ml``."""
    d, f = subtraction_score(baseline, followup, brain, voxel_mm, params.sigma_mm)
    score = np.where(f >= params.hyperintensity, np.maximum(d, 0.0), 0.0).astype(np.float32)
    return score, lesion_mask(score, params.difference, voxel_volume_ml(voxel_mm), params.min_lesion_ml)


def fit_thresholds(cases: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, Sequence[float]]],
                   sigma_mm: float = 1.0, min_lesion_ml: float = 0.01,
                   differences: Sequence[float] = DIFFERENCE_GRID,
                   hyperintensities: Sequence[float] = HYPERINTENSITY_GRID) -> tuple[SubtractionParams, float]:
    """The thresholds with the best pooled lesion-wise F1 over ``cases`` = (baseline, follow-up,
    brain, reference new/enlarged mask, voxel mm) in one space. Pooled: the counts of every case
    summed before F1 (pairs without new lesions count through their false positives). Ties go to the
    stricter setting (larger thresholds). Returns the parameters and their F1."""
    scores = [subtraction_score(b, f, m, v, sigma_mm) + (r, v) for b, f, m, r, v in cases]
    best: tuple[float, SubtractionParams] | None = None
    for h in sorted(hyperintensities, reverse=True):
        for t in sorted(differences, reverse=True):
            n_ref = tp = n_pred = pred_true = 0
            for d, fu, ref, vox in scores:
                s = np.where(fu >= h, np.maximum(d, 0.0), 0.0)
                m = lesionwise_metrics(lesion_mask(s, t, voxel_volume_ml(vox), min_lesion_ml), ref,
                                       voxel_volume_ml(vox), min_lesion_ml)
                n_ref += m["n_ref"]
                tp += m["tp"]
                n_pred += m["n_pred"]
                pred_true += m["n_pred"] - m["fp"]
            f1 = 2.0 * tp * pred_true / (tp * n_pred + pred_true * n_ref) if tp and pred_true else 0.0
            if best is None or f1 > best[0] + 1e-12:
                best = (f1, SubtractionParams(t, h, sigma_mm, min_lesion_ml))
    assert best is not None
    return best[1], best[0]
