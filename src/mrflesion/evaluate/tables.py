"""Group statistics of per-subject metrics (DESIGN §5: per-site tables and tests).

Input everywhere: a long DataFrame with columns ``subject, site, network, metric, value`` (one row
per subject × network × metric; extra columns are ignored).

- NaN (and ±inf) values are dropped before any statistic and counted in an ``n_nan`` column; ``n`` is
  the number of values used.
- ``site_summary``: per site × network × metric (plus pooled rows over all sites, ``site = "all"``,
  unless ``pooled=None``): n, mean, sd (ddof = 1), median, min, max and the formatted strings
  ``mean ± sd`` and ``median [min–max]``.
- ``site_tests``: Kruskal–Wallis across sites per network × metric (scipy.stats.kruskal).
- ``network_tests``: two-sided Mann–Whitney U between every pair of networks per metric (pooled over
  sites, or per site with ``by_site=True``), Bonferroni-corrected within each metric (and site):
  p_bonferroni = min(1, p · m), m = number of pairs actually tested in that family.
- ``normality``: Shapiro–Wilk per site × network × metric group with n >= 3.

A test that cannot be run (fewer than two sites or networks with data, fewer than 3 values, all values
identical, ...) still gets a row, with NaN statistic / p and the reason in the ``reason`` column
(empty string when the test ran).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
from scipy import stats

REQUIRED_COLUMNS = ("subject", "site", "network", "metric", "value")
SUMMARY_COLUMNS = ("n", "n_nan", "mean", "sd", "median", "min", "max", "mean_sd", "median_range")


def _check(df: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"metrics table lacks columns: {missing}")
    out = df.loc[:, list(REQUIRED_COLUMNS)].copy()
    out["value"] = pd.to_numeric(out["value"], errors="coerce").astype(np.float64)
    return out


def _split(values: pd.Series) -> tuple[np.ndarray, int]:
    """Finite values and the count of dropped (NaN / inf) ones."""
    v = values.to_numpy(dtype=np.float64)
    ok = np.isfinite(v)
    return v[ok], int((~ok).sum())


def _fmt(x: float, digits: int) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _describe(values: pd.Series, digits: int) -> dict:
    v, n_nan = _split(values)
    n = v.size
    mean = float(v.mean()) if n else math.nan
    sd = float(v.std(ddof=1)) if n > 1 else math.nan
    med = float(np.median(v)) if n else math.nan
    lo = float(v.min()) if n else math.nan
    hi = float(v.max()) if n else math.nan
    return {
        "n": n,
        "n_nan": n_nan,
        "mean": mean,
        "sd": sd,
        "median": med,
        "min": lo,
        "max": hi,
        "mean_sd": f"{_fmt(mean, digits)} ± {_fmt(sd, digits)}",
        "median_range": f"{_fmt(med, digits)} [{_fmt(lo, digits)}–{_fmt(hi, digits)}]",
    }


def site_summary(df: pd.DataFrame, pooled: str | None = "all", digits: int = 2) -> pd.DataFrame:
    """n, mean ± sd, median [min–max] per site × network × metric (and pooled over sites)."""
    data = _check(df)
    rows = []
    for (site, network, metric), g in data.groupby(["site", "network", "metric"], sort=True):
        rows.append({"site": site, "network": network, "metric": metric, **_describe(g["value"], digits)})
    if pooled is not None:
        for (network, metric), g in data.groupby(["network", "metric"], sort=True):
            rows.append({"site": pooled, "network": network, "metric": metric, **_describe(g["value"], digits)})
    columns = ["site", "network", "metric", *SUMMARY_COLUMNS]
    return pd.DataFrame(rows, columns=columns)


def site_tests(df: pd.DataFrame) -> pd.DataFrame:
    """Kruskal–Wallis test across sites, per network × metric."""
    data = _check(df)
    rows = []
    for (network, metric), g in data.groupby(["network", "metric"], sort=True):
        samples, n_nan = [], 0
        for _, gs in g.groupby("site", sort=True):
            v, k = _split(gs["value"])
            n_nan += k
            if v.size:
                samples.append(v)
        row = {
            "network": network,
            "metric": metric,
            "test": "kruskal",
            "n_sites": len(samples),
            "n": int(sum(s.size for s in samples)),
            "n_nan": n_nan,
            "statistic": math.nan,
            "p": math.nan,
            "reason": "",
        }
        if len(samples) < 2:
            row["reason"] = "fewer than 2 sites with data"
        elif np.ptp(np.concatenate(samples)) == 0:
            row["reason"] = "all values identical"
        else:
            res = stats.kruskal(*samples)
            row["statistic"] = float(res.statistic)
            row["p"] = float(res.pvalue)
        rows.append(row)
    columns = ["network", "metric", "test", "n_sites", "n", "n_nan", "statistic", "p", "reason"]
    return pd.DataFrame(rows, columns=columns)


def network_tests(df: pd.DataFrame, by_site: bool = False, pooled: str = "all") -> pd.DataFrame:
    """Two-sided Mann–Whitney U between all pairs of networks per metric, Bonferroni-corrected.

    The family for the correction is one metric (one metric × site with ``by_site=True``); its size
    ``n_comparisons`` counts the pairs actually tested. ``site`` is ``pooled`` unless ``by_site``.
    """
    data = _check(df)
    keys = ["site", "metric"] if by_site else ["metric"]
    columns = [
        "site", "metric", "network_a", "network_b", "n_a", "n_b", "n_nan_a", "n_nan_b",
        "statistic", "p", "n_comparisons", "p_bonferroni", "reason",
    ]  # fmt: skip
    rows = []
    for key, g in data.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        site, metric = (key[0], key[1]) if by_site else (pooled, key[0])
        samples = {net: _split(gn["value"]) for net, gn in g.groupby("network", sort=True)}
        family = []
        if len(samples) < 2:
            only = next(iter(samples), None)
            family.append(
                {
                    "network_a": only,
                    "network_b": None,
                    "n_a": samples[only][0].size if only is not None else 0,
                    "n_b": 0,
                    "n_nan_a": samples[only][1] if only is not None else 0,
                    "n_nan_b": 0,
                    "statistic": math.nan,
                    "p": math.nan,
                    "reason": "fewer than 2 networks",
                }
            )
        for a, b in itertools.combinations(sorted(samples), 2):
            (va, ka), (vb, kb) = samples[a], samples[b]
            row = {
                "network_a": a, "network_b": b, "n_a": va.size, "n_b": vb.size, "n_nan_a": ka, "n_nan_b": kb,
                "statistic": math.nan, "p": math.nan, "reason": "",
            }  # fmt: skip
            if va.size == 0 or vb.size == 0:
                row["reason"] = "no values in one network"
            else:
                res = stats.mannwhitneyu(va, vb, alternative="two-sided")
                row["statistic"] = float(res.statistic)
                row["p"] = float(res.pvalue)
            family.append(row)
        m = sum(1 for r in family if not r["reason"])
        for r in family:
            r["n_comparisons"] = m
            r["p_bonferroni"] = min(1.0, r["p"] * m) if not r["reason"] else math.nan
            rows.append({"site": site, "metric": metric, **r})
    return pd.DataFrame(rows, columns=columns)


def normality(df: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Shapiro–Wilk test per site × network × metric group (groups with n >= 3 values).

    ``normal`` is True when p > alpha (normality not rejected), None when the test was not run.
    """
    data = _check(df)
    rows = []
    for (site, network, metric), g in data.groupby(["site", "network", "metric"], sort=True):
        v, n_nan = _split(g["value"])
        row = {
            "site": site, "network": network, "metric": metric, "n": v.size, "n_nan": n_nan,
            "statistic": math.nan, "p": math.nan, "normal": None, "reason": "",
        }  # fmt: skip
        if v.size < 3:
            row["reason"] = "fewer than 3 values"
        elif np.ptp(v) == 0:
            row["reason"] = "all values identical"
        else:
            res = stats.shapiro(v)
            row["statistic"] = float(res.statistic)
            row["p"] = float(res.pvalue)
            row["normal"] = bool(res.pvalue > alpha)
        rows.append(row)
    columns = ["site", "network", "metric", "n", "n_nan", "statistic", "p", "normal", "reason"]
    return pd.DataFrame(rows, columns=columns)
