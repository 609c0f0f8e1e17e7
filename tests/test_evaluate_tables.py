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
