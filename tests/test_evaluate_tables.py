"""Group statistics tables: summaries against pandas, tests against scipy, degenerate cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mrflesion.evaluate import tables as T


def synthetic(networks=("MSE-5", "DICE-1"), sites=("site1", "site2"), n_per_site=(7, 6), seed=0, n_nan=3):
    rng = np.random.default_rng(seed)
    rows = []
    for s, site in enumerate(sites):
        for i in range(n_per_site[s]):
            subject = f"{site}-{i:02d}"
            for k, net in enumerate(networks):
                rows.append((subject, site, net, "dice", 0.6 + 0.05 * k + 0.03 * s + 0.08 * rng.standard_normal()))
                rows.append((subject, site, net, "ldr", float(rng.uniform(0.4, 1.0))))
    df = pd.DataFrame(rows, columns=["subject", "site", "network", "metric", "value"])
    nan_rows = rng.choice(len(df), size=n_nan, replace=False)
    df.loc[nan_rows, "value"] = np.nan
    return df


def test_site_summary_equals_pandas_groupby():
    df = synthetic()
    assert df["value"].isna().sum() == 3
    out = T.site_summary(df)
    per_site = out[out["site"] != "all"].set_index(["site", "network", "metric"]).sort_index()
    g = df.groupby(["site", "network", "metric"])["value"]
    expected = g.agg(["count", "mean", "std", "median", "min", "max"]).sort_index()
    assert len(per_site) == 2 * 2 * 2
    np.testing.assert_array_equal(per_site["n"].to_numpy(), expected["count"].to_numpy())
    for ours, theirs in [("mean", "mean"), ("sd", "std"), ("median", "median"), ("min", "min"), ("max", "max")]:
        np.testing.assert_allclose(per_site[ours].to_numpy(), expected[theirs].to_numpy(), rtol=1e-12)
    nan_counts = g.apply(lambda v: int(v.isna().sum())).sort_index()
    np.testing.assert_array_equal(per_site["n_nan"].to_numpy(), nan_counts.to_numpy())
    assert per_site["n_nan"].sum() == 3
    # Pooled rows.
    pooled = out[out["site"] == "all"].set_index(["network", "metric"]).sort_index()
    gp = df.groupby(["network", "metric"])["value"].agg(["count", "mean", "std", "median"]).sort_index()
    np.testing.assert_array_equal(pooled["n"].to_numpy(), gp["count"].to_numpy())
    np.testing.assert_allclose(pooled["mean"].to_numpy(), gp["mean"].to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(pooled["sd"].to_numpy(), gp["std"].to_numpy(), rtol=1e-12)
    assert len(T.site_summary(df, pooled=None)) == 8
    # Formatted strings.
    r = per_site.iloc[0]
    assert r["mean_sd"] == f"{r['mean']:.2f} ± {r['sd']:.2f}"
    assert r["median_range"] == f"{r['median']:.2f} [{r['min']:.2f}–{r['max']:.2f}]"
    assert T.site_summary(df, digits=3).iloc[0]["mean_sd"].count(".") == 2


def test_site_summary_degenerate_groups():
    df = pd.DataFrame(
        {
            "subject": ["a", "b", "c"],
            "site": ["s1", "s1", "s2"],
            "network": ["N", "N", "N"],
            "metric": ["dice", "dice", "dice"],
            "value": [np.nan, np.nan, 0.5],
        }
    )
    out = T.site_summary(df, pooled=None).set_index("site")
    assert out.loc["s1", "n"] == 0 and out.loc["s1", "n_nan"] == 2
    assert out.loc["s1", "mean_sd"] == "n/a ± n/a"
    assert out.loc["s2", "n"] == 1 and math.isnan(out.loc["s2", "sd"])
    assert out.loc["s2", "mean_sd"] == "0.50 ± n/a"
    with pytest.raises(ValueError):
        T.site_summary(df.drop(columns="site"))


def test_site_tests_kruskal():
    df = synthetic()
    out = T.site_tests(df)
    assert len(out) == 4  # 2 networks x 2 metrics
    assert (out["reason"] == "").all()
    assert out["p"].between(0, 1).all()
    assert (out["n_sites"] == 2).all()
    for _, r in out.iterrows():
        sub = df[(df["network"] == r["network"]) & (df["metric"] == r["metric"])].dropna(subset=["value"])
        samples = [g["value"].to_numpy() for _, g in sub.groupby("site")]
        res = stats.kruskal(*samples)
        assert r["statistic"] == pytest.approx(res.statistic, rel=1e-12)
        assert r["p"] == pytest.approx(res.pvalue, rel=1e-12)
        assert r["n"] == len(sub)
    assert out["n_nan"].sum() == 3


def test_network_tests_mann_whitney_and_bonferroni():
    df = synthetic()
    out = T.network_tests(df)
    assert len(out) == 2  # one pair per metric
    assert (out["n_comparisons"] == 1).all()
    np.testing.assert_allclose(out["p_bonferroni"], out["p"])
    # Three networks: three pairs per metric, factor 3.
    df3 = synthetic(networks=("MSE-5", "MAE-5", "DICE-1"), seed=1)
    out3 = T.network_tests(df3)
    assert len(out3) == 6 and (out3["n_comparisons"] == 3).all()
    np.testing.assert_allclose(out3["p_bonferroni"], np.minimum(1.0, 3 * out3["p"]))
    assert out3["p"].between(0, 1).all() and out3["p_bonferroni"].between(0, 1).all()
    for _, r in out3.iterrows():
        sub = df3[df3["metric"] == r["metric"]].dropna(subset=["value"])
        a = sub[sub["network"] == r["network_a"]]["value"].to_numpy()
        b = sub[sub["network"] == r["network_b"]]["value"].to_numpy()
        res = stats.mannwhitneyu(a, b, alternative="two-sided")
        assert r["p"] == pytest.approx(res.pvalue, rel=1e-12)
        assert (r["n_a"], r["n_b"]) == (a.size, b.size)
    pairs = set(zip(out3["network_a"], out3["network_b"], strict=True))
    assert pairs == set(itertools.combinations(sorted(["MSE-5", "MAE-5", "DICE-1"]), 2))
    # Per site: one family per site x metric.
    by_site = T.network_tests(df3, by_site=True)
    assert len(by_site) == 12 and set(by_site["site"]) == {"site1", "site2"}
    assert (by_site["n_comparisons"] == 3).all()


def test_normality():
    df = synthetic(n_per_site=(7, 2))
    out = T.normality(df)
    assert len(out) == 8
    ran = out[out["reason"] == ""]
    assert (ran["site"] == "site1").all() and len(ran) == 4
    assert ran["statistic"].between(0, 1).all() and ran["p"].between(0, 1).all()
    for _, r in ran.iterrows():
        v = df[(df["site"] == r["site"]) & (df["network"] == r["network"]) & (df["metric"] == r["metric"])]
        v = v["value"].dropna().to_numpy()
        assert r["n"] == v.size >= 3
        assert r["p"] == pytest.approx(stats.shapiro(v).pvalue, rel=1e-12)
        assert r["normal"] == (r["p"] > 0.05)
    skipped = out[out["reason"] != ""]
    assert (skipped["n"] < 3).all() and skipped["p"].isna().all() and skipped["normal"].isna().all()


def test_single_site_and_single_network():
    df = synthetic(networks=("MSE-5",), sites=("site1",), n_per_site=(6,), n_nan=0)
    st = T.site_tests(df)
    assert len(st) == 2 and (st["reason"] == "fewer than 2 sites with data").all() and st["p"].isna().all()
    nt = T.network_tests(df)
    assert len(nt) == 2 and (nt["reason"] == "fewer than 2 networks").all()
    assert nt["p_bonferroni"].isna().all() and (nt["n_comparisons"] == 0).all()
    assert (nt["network_a"] == "MSE-5").all()
    # A site whose values are all NaN does not count as a site with data.
    df2 = synthetic(n_nan=0)
    df2.loc[(df2["site"] == "site2") & (df2["metric"] == "ldr"), "value"] = np.nan
    st2 = T.site_tests(df2).set_index(["network", "metric"])
    assert (st2.xs("ldr", level="metric")["reason"] == "fewer than 2 sites with data").all()
    assert (st2.xs("dice", level="metric")["reason"] == "").all()
    # Identical values: Kruskal is undefined.
    df3 = synthetic(n_nan=0)
    df3["value"] = 0.5
    assert (T.site_tests(df3)["reason"] == "all values identical").all()
    assert (T.normality(df3)["reason"] == "all values identical").all()


def test_site_tests_need_a_site_with_two_values():
    df = synthetic(n_per_site=(1, 1), n_nan=0)
    out = T.site_tests(df)
    assert (out["reason"] == "no site with 2 or more values").all() and out["p"].isna().all()
    assert list(out.columns) == ["network", "metric", "test", "n_sites", "n", "n_nan", "statistic", "p", "reason"]
    # one site with two values is enough (Kruskal-Wallis with samples of 2 and 1)
    out = T.site_tests(synthetic(n_per_site=(2, 1), n_nan=0))
    assert (out["reason"] == "").all() and out["p"].between(0, 1).all()


def test_cohort_notes_say_once_why_a_family_cannot_run():
    assert T.site_tests_note(synthetic()) is None
    assert T.site_tests_note(synthetic(n_per_site=(2, 1))) is None
    one_each = T.site_tests_note(synthetic(n_per_site=(1, 1), n_nan=0))
    assert one_each == (
        "Kruskal–Wallis across sites was not run: no site has two or more subjects "
        "(subjects per site: site1 1, site2 1)."
    )
    single = T.site_tests_note(synthetic(sites=("site1",), n_per_site=(4,)))
    assert single == (
        "Kruskal–Wallis across sites was not run: it needs two or more sites, and the cohort has 1 (site1 4 subjects)."
    )
    # a site whose values are all NaN has no subject with data
    df = synthetic(n_per_site=(3, 2), n_nan=0)
    df.loc[df["site"] == "site2", "value"] = np.nan
    assert "the cohort has 1 (site1 3 subjects)" in T.site_tests_note(df)
    assert T.network_tests_note(synthetic()) is None
    assert T.network_tests_note(synthetic(networks=("MSE-5",))) == (
        "Mann–Whitney between networks was not run: 1 network(s) with values."
    )
    assert T.network_tests_note(synthetic(sites=("site1",), n_per_site=(1,), n_nan=0)) == (
        "Mann–Whitney between networks was not run: 1 subject(s) with values."
    )


def test_ran_and_skipped_counts_the_rows_that_did_not_run():
    df = synthetic(n_nan=0)
    df.loc[df["metric"] == "ldr", "value"] = 0.5
    table = T.site_tests(df)
    ran, note = T.ran_and_skipped(table, "network × metric rows", "tests_sites.tsv")
    assert len(ran) == 2 and (ran["metric"] == "dice").all() and list(ran.index) == [0, 1]
    assert "reason" not in ran.columns and list(ran.columns) == list(table.columns)[:-1]
    assert (
        note
        == "Not tested for 2 of 4 network × metric rows: all values identical: 2 (all rows are in tests_sites.tsv)."
    )
    ran, note = T.ran_and_skipped(T.site_tests(synthetic()), "rows")
    assert len(ran) == 4 and note is None


def _overview_metrics() -> pd.DataFrame:
    rows = []

    def add(subject, site, network, **metrics):
        for k, v in metrics.items():
            rows.append((subject, site, "test", network, "pipeline", k, v))

    add("sub-02", "b", "LEAD", lw_n_ref=4, lw_sensitivity=0.25, lw_fp=6, lesion_ref_ml=2.5, lesion_dice=0.3,
        lw_sensitivity_vt=0.75, lw_fp_vt=1, lesion_dice_vt=0.6)  # fmt: skip
    add("sub-02", "b", "baseline", lw_n_ref=4, lesion_dice=0.4, lesion_ref_ml=2.5)
    add("sub-01", "a", "LEAD", lw_n_ref=0, lw_sensitivity=np.nan, lw_fp=2, lesion_ref_ml=0.0, lesion_dice=np.nan)
    add("sub-03", "a", "LEAD", lw_n_ref=3, lw_sensitivity=0.0, lw_fp=0, lesion_ref_ml=1.0, lesion_dice=0.0)
    add("sub-04", "a", "OTHER", lw_n_ref=2, lesion_ref_ml=0.7)  # no metrics of the lead
    return pd.DataFrame(rows, columns=["subject", "site", "split", "network", "reference", "metric", "value"])


def test_subject_overview():
    m = _overview_metrics()
    inputs = pd.DataFrame(
        {"subject": ["sub-01", "sub-09"], "site": ["a", "n/a"], "group": ["patient", "n/a"],
         "status": ["ok", "skipped"], "reason": ["n/a", "missing t2w input"], "lesion_ml": ["0", "n/a"]}
    )  # fmt: skip
    ov = T.subject_overview(m, "LEAD", inputs=inputs)
    assert list(ov.columns) == list(T.OVERVIEW_COLUMNS)
    assert list(ov["subject"]) == ["sub-01", "sub-03", "sub-04", "sub-02", "sub-09"]  # by site, then subject
    r = ov.set_index("subject")
    assert (r.loc["sub-02", "lesions"], r.loc["sub-02", "detected"], r.loc["sub-02", "missed"]) == (4, 1, 3)
    assert r.loc["sub-02", "false_positives"] == 6 and r.loc["sub-02", "lesion_ml"] == 2.5
    assert r.loc["sub-02", "flags"] == (
        "half or more of the lesions missed; more false positives than lesions; baseline Dice above LEAD"
    )
    assert r.loc["sub-01", "flags"] == "no reference lesions; false positives"
    assert (r.loc["sub-01", "detected"], r.loc["sub-01", "missed"]) == (0, 0)
    assert r.loc["sub-03", "flags"] == "all lesions missed"
    assert r.loc["sub-04", "flags"] == "no LEAD metrics" and r.loc["sub-04", "lesion_ml"] == 0.7
    assert pd.isna(r.loc["sub-04", "detected"]) and r.loc["sub-04", "lesions"] is pd.NA
    assert r.loc["sub-09", "flags"] == "skipped: missing t2w input" and np.isnan(r.loc["sub-09", "lesion_ml"])
    assert r.loc["sub-02", "split"] == "test" and pd.isna(r.loc["sub-02", "group"])
    # at the validation-chosen threshold
    vt = T.subject_overview(m, "LEAD", suffix="_vt").set_index("subject")
    assert (vt.loc["sub-02", "detected"], vt.loc["sub-02", "missed"], vt.loc["sub-02", "false_positives"]) == (3, 1, 1)
    assert vt.loc["sub-02", "flags"] == ""  # the lead's Dice at its threshold (0.6) beats the baseline's (0.4)
    # another reference, none, empty
    assert T.subject_overview(m, "LEAD", reference="truth")["lesions"].isna().all()
    assert T.subject_overview(m.iloc[0:0], "LEAD").empty
    none = T.subject_overview(m, None).set_index("subject")  # no lead: the reference's load only
    assert (
        none["detected"].isna().all() and none.loc["sub-02", "flags"] == "" and none.loc["sub-02", "lesion_ml"] == 2.5
    )
    assert none.loc["sub-01", "flags"] == "no reference lesions"
