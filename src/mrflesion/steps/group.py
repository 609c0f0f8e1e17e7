"""Rule body of the group stage (rule ``group_evaluation``): per-site tables (TSV) over the subjects
of ``evaluation.summary_splits``, the statistical tests across sites and between networks, the cohort's
per-lesion tables and the group report (HTML)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..io import write_text
from ..provenance import provenance


def group_tables(metrics: pd.DataFrame, splits: Sequence[str]) -> dict[str, pd.DataFrame]:
    """Per-site summary, Kruskal-Wallis across sites and Mann-Whitney between networks over the
    subjects of ``splits``; ``metric`` is prefixed with the reference (``pipeline:``/``truth:``)."""
    from ..evaluate.tables import network_tests, site_summary, site_tests

    sel = metrics[metrics["split"].isin(list(splits))].copy()
    sel["metric"] = sel["reference"] + ":" + sel["metric"]
    return {
        "summary": site_summary(sel),
        "site_tests": site_tests(sel),
        "network_tests": network_tests(sel),
    }


def group_evaluation(smk: Any) -> None:
    """The group TSVs and report. The report opens with per-site plots of the lesion metrics (every
    network and the baseline, the recommended network, first in ``networks:``, first; against the
    phantom's truth when present, else the pipeline's references) and a one-row-per-subject overview;
    a family of tests that cannot run on the cohort is said in one sentence."""
    from ..evaluate.report import plot_reference, write_group_report
    from ..evaluate.tables import (
        lesion_site_table,
        network_tests_note,
        ran_and_skipped,
        site_tests_note,
        subject_overview,
    )

    p = smk.params
    metrics = pd.concat([pd.read_csv(f, sep="\t", na_values=["n/a"], keep_default_na=True)
                         for f in p.metrics], ignore_index=True)
    curves = pd.concat([pd.read_csv(f, sep="\t", na_values=["n/a"]) for f in p.curves], ignore_index=True)
    tables = group_tables(metrics, p.splits)
    inputs = pd.read_csv(smk.input.inputs, sep="\t", dtype=str, keep_default_na=False)
    failed = inputs[inputs["status"] != "ok"][["subject", "status", "reason"]].reset_index(drop=True)
    refused = list(getattr(p, "refused", None) or [])
    if refused:  # apply mode: subjects whose inference was refused (MRF schedule)
        failed = pd.concat([failed, pd.DataFrame(refused, columns=["subject", "status", "reason"])], ignore_index=True)
    quant = [pd.read_csv(f, sep="\t", na_values=["n/a"], keep_default_na=True) for f in p.quant]
    lesions_all = pd.concat(quant, ignore_index=True) if quant else pd.DataFrame()
    times = []
    for f in smk.input.json:
        d = json.loads(Path(f).read_text())
        conv = float(np.nansum([v for v in d["conventional_seconds"].values() if v is not None]))
        for net, s in d["inference_seconds"].items():
            times.append({"subject": d["subject"], "site": d["site"], "network": net,
                          "conventional_s": round(conv, 2), "inference_s": round(float(s), 3),
                          "speedup": round(conv / float(s), 1) if float(s) > 0 else math.nan})
    times_df = pd.DataFrame(times, columns=["subject", "site", "network", "conventional_s", "inference_s",
                                            "speedup"])
    out = smk.output
    write_text(out.metrics, metrics.to_csv(sep="\t", index=False, na_rep="n/a"))
    write_text(out.summary, tables["summary"].to_csv(sep="\t", index=False, na_rep="n/a"))
    write_text(out.site_tests, tables["site_tests"].to_csv(sep="\t", index=False, na_rep="n/a"))
    write_text(out.network_tests, tables["network_tests"].to_csv(sep="\t", index=False, na_rep="n/a"))
    write_text(out.failed, failed.to_csv(sep="\t", index=False))
    write_text(out.times, times_df.to_csv(sep="\t", index=False, na_rep="n/a"))
    write_text(out.lesions, lesions_all.to_csv(sep="\t", index=False, na_rep="n/a", float_format="%.6g"))
    lesion_sites = lesion_site_table(lesions_all[lesions_all["split"].isin(list(p.splits))]
                                     if len(lesions_all) else lesions_all)
    write_text(out.lesion_sites, lesion_sites.to_csv(sep="\t", index=False, na_rep="n/a"))
    main_metrics = {f"{ref}:{m}" for ref in ("pipeline", "truth") for m in ("lesion_dice", "lesion_ldr", "lw_f1")}
    main_metrics |= {"pipeline:T1_mrd", "pipeline:T2star_mrd", "pipeline:NAWM_dice", "pipeline:GM_dice",
                     "truth:T1_mrd", "truth:T1_mrd_pure"}
    summary = tables["summary"]
    main = summary[summary.metric.isin(main_metrics)]
    if len(main):
        short = main.pivot_table(index=["site", "network"], columns="metric", values="mean_sd", aggfunc="first")
        n = main.groupby(["site", "network"])["n"].max().rename("n")
        short = pd.concat([n, short], axis=1).reset_index()
    else:
        short = pd.DataFrame({"note": [f"no {'/'.join(p.splits)} subjects with metrics"]})
    cur = curves[(curves["reference"] == "pipeline") & curves["split"].isin(list(p.splits))]
    cohort = cur[["site", "network", "subject", "threshold", "dice"]].reset_index(drop=True)

    # ----- what the report leads with
    sel = metrics[metrics["split"].isin(list(p.splits))].reset_index(drop=True)
    network_names = list(p.networks)  # the applied networks, the recommended (lead) one first
    lead = network_names[0] if network_names else None
    ref = plot_reference(sel)
    t = getattr(p, "threshold", None)
    threshold = float(t) if t is not None else None
    lead_metrics = set(sel.loc[(sel["network"] == lead) & (sel["reference"] == ref), "metric"])
    suffix = "_vt" if "lw_sensitivity_vt" in lead_metrics else ""
    overview = subject_overview(sel, lead, ref, suffix=suffix, inputs=inputs)
    at = "its validation-chosen threshold" if suffix else (
        f"threshold {threshold:g}" if threshold is not None else "the default threshold")
    overview_caption = (
        f"Lesions of the reference ({ref}), and those {lead} detects or misses at {at} with its false-positive "
        "components (rule A: 26-connected components of at least 0.01 ml; a lesion is detected when a predicted "
        "component overlaps it). Flags: no reference lesions; all / half or more of the lesions missed; more "
        "false positives than lesions"
        + (f"; the baseline's lesion Dice above {lead}'s" if (sel["network"] == "baseline").any() else "")
        + ("; skipped subjects (failed input checks)." if len(failed) else ".")
    )
    prefixed = sel.assign(metric=sel["reference"] + ":" + sel["metric"])
    sections: dict[str, Any] = {}
    for title, note, table, what, tsv in (
        ("Kruskal–Wallis across sites", site_tests_note(prefixed), tables["site_tests"],
         "network × metric rows", "tests_sites.tsv"),
        ("Mann–Whitney between networks (Bonferroni)", network_tests_note(prefixed), tables["network_tests"],
         "network pairs × metric rows", "tests_networks.tsv"),
    ):
        if note is not None:
            sections[title] = note
        else:
            ran, skipped = ran_and_skipped(table, what, tsv)
            sections[title] = [x for x in (skipped, ran if len(ran) else None) if x is not None] or ran
    n_subj = sel["subject"].nunique()
    n_sites = sel["site"].nunique()
    notes = [f"{n_subj} {'/'.join(p.splits)} subject{'s' if n_subj != 1 else ''} at {n_sites} "
             f"site{'s' if n_sites != 1 else ''}" + (f"; recommended network: {lead}." if lead else ".")]
    write_group_report(
        {
            f"Per-site summary, mean ± sd ({', '.join(p.splits)} subjects; every metric with median [range] "
            "in summary_sites.tsv)": short,
            **sections,
            "Failed or skipped subjects": failed,
            f"Per-lesion T1, T2*, B1 per site and location class ({', '.join(p.splits)} subjects; mean ± sd; "
            "ratios to each subject's NAWM; lesions.tsv and lesions_sites.tsv)": lesion_sites[
                lesion_sites["quantity"].isin(["volume_ml", "T1_mean_ratio", "T2star_mean_ratio"])
            ].pivot_table(index=["site", "source", "location", "n_subjects", "n_lesions"], columns="quantity",
                          values="mean_sd", aggfunc="first").reset_index() if len(lesion_sites) else lesion_sites,
            "Conventional chain vs network inference (seconds per subject)": times_df,
        },
        cohort, provenance(smk.config), out.report, notes=notes, metrics=sel, overview=overview, lead=lead,
        networks=network_names, reference=ref, threshold=threshold,
        overview_caption=overview_caption,
    )
