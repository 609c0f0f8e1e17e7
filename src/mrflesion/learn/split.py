"""Subject-level train/validation/test split per site (torch-free: used when the workflow is planned)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

#: Group values taken for healthy controls when no list is given. The workflow does not rely on it:
#: discovery maps each participant's group through the config's ``control_labels`` / ``patient_labels``
#: to ``control`` or ``patient`` (and refuses any other value), so the split sees those two words.
CONTROL_VALUES = ("control", "controls", "hc", "hv", "healthy", "volunteer")


def _counts_for(n: int | Sequence[int] | Mapping[str, int], sites: list[str]) -> dict[str, int]:
    if isinstance(n, Mapping):
        return {s: int(n.get(s, 0)) for s in sites}
    if isinstance(n, int):
        return dict.fromkeys(sites, int(n))
    seq = list(n)
    return {s: int(seq[min(i, len(seq) - 1)]) if seq else 0 for i, s in enumerate(sites)}


def split_subjects(
    table: pd.DataFrame | Sequence[Mapping[str, Any]],
    n_test_per_site: int | Sequence[int] | Mapping[str, int] = (2, 3),
    n_val_per_site: int | Sequence[int] | Mapping[str, int] = (2, 3),
    seed: int = 0,
    id_col: str = "participant_id",
    site_col: str = "site",
    group_col: str = "group",
    control_values: Sequence[str] = CONTROL_VALUES,
    min_train_per_site: int = 1,
) -> dict[str, list[str]]:
    """Subject-level train/val/test split (docs/method.md).

    Per site, the patients are shuffled (``seed``) and the first ``n_test`` go to test, the next ``n_val``
    to validation, the rest to training; controls (``group`` in ``control_values``, case-insensitive)
    always go to training. Counts may be an int (every site), a sequence (sites in sorted order, the
    last value repeating; default ``(2, 3)``: the paper's 2 site-1 and 3 site-2 patients) or a mapping.

    Small cohorts: at least ``min_train_per_site`` patients per site stay in training; the requested
    test/val counts are then reduced, test and validation alternately, so that a site with at least
    ``min_train_per_site + 2`` patients still gives one test and one validation patient.
    """
    df = pd.DataFrame(list(table)) if not isinstance(table, pd.DataFrame) else table
    for c in (id_col, site_col):
        if c not in df.columns:
            raise KeyError(f"subject table has no {c!r} column")
    ids = df[id_col].astype(str).tolist()
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate subject ids in the table")
    sites_col = df[site_col].astype(str).tolist()
    controls = {c.lower() for c in control_values}
    if group_col in df.columns:
        is_control = [str(g).strip().lower() in controls for g in df[group_col].tolist()]
    else:
        is_control = [False] * len(ids)
    sites = sorted(set(sites_col))
    n_test = _counts_for(n_test_per_site, sites)
    n_val = _counts_for(n_val_per_site, sites)
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for k, site in enumerate(sites):
        patients = sorted(
            i for i, s, c in zip(ids, sites_col, is_control, strict=True) if s == site and not c
        )
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), k, 7]))
        patients = [patients[j] for j in rng.permutation(len(patients))]
        budget = max(0, len(patients) - int(min_train_per_site))
        t = v = 0
        while budget > 0 and (t < n_test[site] or v < n_val[site]):
            if t < n_test[site] and (t <= v or v >= n_val[site]):
                t += 1
            else:
                v += 1
            budget -= 1
        out["test"] += patients[:t]
        out["val"] += patients[t : t + v]
        out["train"] += patients[t + v :]
        out["train"] += sorted(
            i for i, s, c in zip(ids, sites_col, is_control, strict=True) if s == site and c
        )
    return {k: sorted(v) for k, v in out.items()}
