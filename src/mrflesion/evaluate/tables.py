"""Group statistics of per-subject metrics (docs/evaluation.md: per-site tables and tests).

Input everywhere: a long DataFrame with columns ``subject, site, network, metric, value`` (one row
per subject × network × metric; extra columns are ignored).

- NaN (and ±inf) values are dropped before any statistic and counted in an ``n_nan`` column; ``n`` is
  the number of values used.
- ``site_summary``: per site × network × metric (plus pooled rows over all sites, ``site = "all"``,
  unless ``pooled=None``): n, mean, sd (ddof = 1), median, min, max and the formatted strings
  ``mean ± sd`` and ``median [min–max]``.
- ``site_tests``: Kruskal–Wallis across sites per network × metric (scipy.stats.kruskal); not run when
  no site has two or more values (one value per site is no comparison of distributions).
- ``network_tests``: two-sided Mann–Whitney U between every pair of networks per metric (pooled over
  sites, or per site with ``by_site=True``), Bonferroni-corrected within each metric (and site):
  p_bonferroni = min(1, p · m), m = number of pairs actually tested in that family.
- ``normality``: Shapiro–Wilk per site × network × metric group with n >= 3.

A test that cannot be run (fewer than two sites or networks with data, fewer than 3 values, all values
identical, ...) still gets a row, with NaN statistic / p and the reason in the ``reason`` column
(empty string when the test ran).

For the report, where such rows would fill screens with "n/a": ``site_tests_note`` /
``network_tests_note`` give one sentence when a family of tests cannot run on the cohort at all (fewer
than two sites, no site with two subjects; fewer than two networks or subjects), and ``ran_and_skipped``
splits a test table into the rows that ran and one sentence counting the others by reason.
``subject_overview`` is the group report's one-row-per-subject table.
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
        elif max(s.size for s in samples) < 2:
            row["reason"] = "no site with 2 or more values"
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


# --------------------------------------------------------------------------------------------------
# report helpers


def _subjects_per(data: pd.DataFrame, key: str) -> pd.Series:
    finite = data[np.isfinite(data["value"].to_numpy(dtype=np.float64))]
    return finite.groupby(key, sort=True)["subject"].nunique()


def _listing(counts: pd.Series) -> str:
    return ", ".join(f"{k} {int(v)}" for k, v in counts.items())


def site_tests_note(df: pd.DataFrame) -> str | None:
    """One sentence when Kruskal–Wallis across sites cannot run on this cohort (fewer than two sites
    with values, or no site with two or more subjects); None when it can."""
    per_site = _subjects_per(_check(df), "site")
    if len(per_site) < 2:
        where = f" ({_listing(per_site)} subjects)" if len(per_site) else ""
        return (
            f"Kruskal–Wallis across sites was not run: it needs two or more sites, and the cohort has "
            f"{len(per_site)}{where}."
        )
    if per_site.max() < 2:
        return (
            "Kruskal–Wallis across sites was not run: no site has two or more subjects "
            f"(subjects per site: {_listing(per_site)})."
        )
    return None


def network_tests_note(df: pd.DataFrame) -> str | None:
    """One sentence when Mann–Whitney between networks cannot run on this cohort (fewer than two
    networks with values, or fewer than two subjects); None when it can."""
    data = _check(df)
    per_net = _subjects_per(data, "network")
    if len(per_net) < 2:
        return f"Mann–Whitney between networks was not run: {len(per_net)} network(s) with values."
    n_subjects = int(data.loc[np.isfinite(data["value"].to_numpy(dtype=np.float64)), "subject"].nunique())
    if n_subjects < 2:
        return f"Mann–Whitney between networks was not run: {n_subjects} subject(s) with values."
    return None


def ran_and_skipped(table: pd.DataFrame, what: str, tsv: str | None = None) -> tuple[pd.DataFrame, str | None]:
    """The rows of a test table (``site_tests``, ``network_tests``, ``normality``) that ran (without the
    then empty ``reason`` column), and one sentence counting the rows that did not, by reason (None
    when every row ran). ``what`` names the rows ("network × metric pairs"), ``tsv`` the file that lists
    them all."""
    reason = table["reason"].fillna("").astype(str) if "reason" in table.columns else pd.Series("", table.index)
    ran = table[reason == ""].drop(columns=["reason"], errors="ignore").reset_index(drop=True)
    rest = reason[reason != ""]
    if rest.empty:
        return ran, None
    counts = rest.value_counts()
    parts = "; ".join(f"{r}: {int(n)}" for r, n in counts.items())
    where = f" (all rows are in {tsv})" if tsv else ""
    return ran, f"Not tested for {len(rest)} of {len(table)} {what}: {parts}{where}."


OVERVIEW_COLUMNS = (
    "subject", "site", "group", "split", "lesion_ml", "lesions", "detected", "missed", "false_positives", "flags",
)  # fmt: skip


def subject_overview(
    metrics: pd.DataFrame,
    lead: str | None,
    reference: str = "pipeline",
    *,
    suffix: str = "",
    baseline: str = "baseline",
    inputs: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per subject for the group report: site, group, split, lesion load (ml, of the
    reference), and the lead network's reference lesions, detected and missed lesions and
    false-positive components (rule A: ``lw_n_ref``, ``lw_sensitivity``, ``lw_fp``; with ``suffix``
    "_vt", ``lw_sensitivity_vt``, ``lw_fp_vt`` and ``lesion_dice_vt``: the network's validation-chosen
    threshold), then flags:

    - "no reference lesions" (the reference mask is empty),
    - "all lesions missed" / "half or more of the lesions missed" (by the lead),
    - "more false positives than lesions" (lead; "false positives" when there is no reference lesion),
    - "baseline Dice above <lead>" (lesion Dice of the baseline higher than the lead's),
    - "no <lead> metrics" (the lead has no row for the subject),
    - "skipped: <reason>" for the subjects of ``inputs`` (group/inputs.tsv: subject, site, group,
      status, reason, lesion_ml) whose status is not "ok" and that have no metrics.

    ``metrics``: long table subject, site, network, reference, metric, value (group and split
    optional). Missing values stay NaN / <NA>.
    """
    cols = list(OVERVIEW_COLUMNS)
    need = {"subject", "site", "network", "metric", "value"}
    rows = []
    if need <= set(metrics.columns) and not metrics.empty:
        data = metrics
        if "reference" in data.columns:
            data = data[data["reference"] == reference]
        data = data.assign(
            value=pd.to_numeric(data["value"], errors="coerce"),
            network=data["network"].astype(str),
            subject=data["subject"].astype(str),
        )
        wide = data.pivot_table(index=["subject", "network"], columns="metric", values="value", aggfunc="first")
        info = metrics.assign(subject=metrics["subject"].astype(str)).drop_duplicates("subject").set_index("subject")

        def get(subject: str, network: str | None, metric: str) -> float:
            if network is None or (subject, network) not in wide.index or metric not in wide.columns:
                return math.nan
            return float(wide.loc[(subject, network), metric])

        for subject in sorted(metrics["subject"].astype(str).unique()):
            meta = info.loc[subject]
            has_lead = lead is not None and (subject, lead) in wide.index
            n_ref = get(subject, lead, "lw_n_ref")  # the reference's lesions: the same at any threshold
            sens = get(subject, lead, "lw_sensitivity" + suffix)
            fp = get(subject, lead, "lw_fp" + suffix)
            load = get(subject, lead, "lesion_ref_ml")
            if not math.isfinite(load):  # the reference volume is the same for every network
                nets = [n for (s_, n) in wide.index if s_ == subject]
                load = next((v for v in (get(subject, n, "lesion_ref_ml") for n in nets) if math.isfinite(v)), load)
            if math.isfinite(n_ref):
                detected = round(sens * n_ref) if math.isfinite(sens) else (0 if n_ref == 0 else None)
            else:
                detected = None
            missed = int(n_ref) - detected if detected is not None else None
            flags = []
            if not has_lead and lead is not None:
                flags.append(f"no {lead} metrics")
            if n_ref == 0 or load == 0:
                flags.append("no reference lesions")
            elif detected is not None and n_ref > 0:
                if detected == 0:
                    flags.append("all lesions missed")
                elif missed is not None and missed >= n_ref / 2:
                    flags.append("half or more of the lesions missed")
            if math.isfinite(fp) and fp > 0 and math.isfinite(n_ref) and fp > n_ref:
                flags.append("more false positives than lesions" if n_ref else "false positives")
            d_lead, d_base = get(subject, lead, "lesion_dice" + suffix), get(subject, baseline, "lesion_dice")
            if lead != baseline and math.isfinite(d_lead) and math.isfinite(d_base) and d_base > d_lead:
                flags.append(f"baseline Dice above {lead}")
            rows.append(
                {
                    "subject": subject,
                    "site": meta.get("site"),
                    "group": meta.get("group", pd.NA),
                    "split": meta.get("split", pd.NA),
                    "lesion_ml": load,
                    "lesions": int(n_ref) if math.isfinite(n_ref) else None,
                    "detected": detected,
                    "missed": missed,
                    "false_positives": int(fp) if math.isfinite(fp) else None,
                    "flags": "; ".join(flags),
                }
            )
    seen = {r["subject"] for r in rows}
    if inputs is not None and {"subject", "status"} <= set(inputs.columns):
        for r in inputs.itertuples(index=False):
            d = r._asdict()
            if str(d["status"]) == "ok" or str(d["subject"]) in seen:
                continue
            rows.append(
                {
                    "subject": str(d["subject"]),
                    "site": d.get("site", pd.NA),
                    "group": d.get("group", pd.NA),
                    "split": pd.NA,
                    "lesion_ml": pd.to_numeric(d.get("lesion_ml"), errors="coerce"),
                    "flags": f"{d['status']}: {d.get('reason', '')}".rstrip(": "),
                }
            )
    out = pd.DataFrame(rows, columns=cols)
    for c in ("lesions", "detected", "missed", "false_positives"):
        out[c] = pd.array(out[c].tolist(), dtype="Int64") if len(out) else out[c].astype("Int64")
    out["lesion_ml"] = pd.to_numeric(out["lesion_ml"], errors="coerce").astype(np.float64)
    return out.sort_values(["site", "subject"], key=lambda v: v.astype(str), kind="stable").reset_index(drop=True)


#: Per-lesion quantities summarised per site in the cohort's lesion table.
LESION_SITE_METRICS = ("volume_ml", "T1_mean_ratio", "T2star_mean_ratio", "B1_mean_ratio", "T1_mean", "T2star_mean")


def lesion_site_table(lesions: pd.DataFrame, digits: int = 2) -> pd.DataFrame:
    """The cohort's per-lesion tables (one row per lesion: site, subject, source, location and the
    quantities of :data:`LESION_SITE_METRICS`) summarised per site × source × location class (and
    over all classes, ``all``): n subjects, n lesions, then n, mean ± sd and median [range] of each
    quantity."""
    columns = ["site", "source", "location", "n_subjects", "n_lesions", "quantity", *SUMMARY_COLUMNS]
    if lesions.empty:
        return pd.DataFrame(columns=columns)
    data = pd.concat([lesions, lesions.assign(location="all")], ignore_index=True)
    rows = []
    for (site, source, location), g in data.groupby(["site", "source", "location"], sort=True):
        for q in LESION_SITE_METRICS:
            if q not in g.columns:
                continue
            rows.append({"site": site, "source": source, "location": location,
                         "n_subjects": int(g["subject"].nunique()), "n_lesions": len(g), "quantity": q,
                         **_describe(pd.to_numeric(g[q], errors="coerce"), digits)})
    return pd.DataFrame(rows, columns=columns)
