"""Tissue parameters: per-subject means around 3T literature values plus smooth variation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .fields import FourierField, gaussian_bump

PARAMS = ("t1", "t2s", "t2", "pd")
BASE_TISSUES = ("GM", "WM", "CSF")


@dataclass(frozen=True)
class TissueModel:
    """Mean parameter per (tissue, param) and a smooth relative variation field for each."""

    means: dict[str, dict[str, float]]
    variation: dict[str, dict[str, FourierField]]
    deep_gm: dict[str, float]
    deep_gm_centres: np.ndarray
    deep_gm_sigma: float

    @classmethod
    def draw(cls, rng: np.random.Generator, cfg: dict[str, Any]) -> TissueModel:
        means: dict[str, dict[str, float]] = {}
        variation: dict[str, dict[str, FourierField]] = {}
        for t in BASE_TISSUES:
            means[t] = {p: float(rng.uniform(*cfg[t][p])) for p in PARAMS}
            variation[t] = {
                p: FourierField.random(
                    rng,
                    cfg["variation"] * (0.5 if p == "pd" else 1.0),
                    tuple(cfg["variation_wavelength_mm"]),
                    int(cfg["variation_modes"]),
                )
                for p in PARAMS
            }
        return cls(
            means=means,
            variation=variation,
            deep_gm={"t1": float(cfg["deep_gm_t1"]), "t2s": float(cfg["deep_gm_t2s"])},
            deep_gm_centres=np.asarray(cfg["deep_gm_centres_mni"], dtype=float),
            deep_gm_sigma=float(cfg["deep_gm_sigma_mm"]),
        )

    def values(self, tissue: str, a_mm: np.ndarray) -> dict[str, np.ndarray]:
        """Parameters of ``tissue`` at anatomical points (N, 3): t1, t2s, t2 (ms), pd."""
        out = {}
        deep = None
        if tissue == "GM":
            deep = np.zeros(a_mm.shape[0])
            for c in self.deep_gm_centres:
                deep = np.maximum(deep, gaussian_bump(a_mm, c, self.deep_gm_sigma))
        for p in PARAMS:
            rel = 1.0 + self.variation[tissue][p](a_mm)
            if deep is not None and p in self.deep_gm:
                rel = rel + self.deep_gm[p] * deep
            out[p] = self.means[tissue][p] * rel
        return out


def spin_echo(pd: np.ndarray, t1: np.ndarray, t2: np.ndarray, tr: float, te: float) -> np.ndarray:
    """Spin-echo magnitude PD (1 - exp(-TR/T1)) exp(-TE/T2) (TE << TR)."""
    return pd * (1.0 - np.exp(-tr / t1)) * np.exp(-te / t2)


def inversion_recovery(
    pd: np.ndarray, t1: np.ndarray, t2: np.ndarray, tr: float, ti: float, te: float
) -> np.ndarray:
    """Inversion-recovery spin-echo magnitude PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)."""
    return pd * np.abs(1.0 - 2.0 * np.exp(-ti / t1) + np.exp(-tr / t1)) * np.exp(-te / t2)
