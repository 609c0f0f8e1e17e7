"""Lesion mapping on a larger phantom cohort: the recommended network (the first of ``networks:``) and the
classical baseline, trained and evaluated by the pipeline itself.

    .venv/bin/python benchmarks/bench_lesion.py --subjects 24 --out /tmp/bench_lesion [--networks all]

Generates a demo-grid phantom of ``--subjects`` subjects (two sites), runs the whole workflow with the
demo configuration (``--networks first``: only the recommended network is trained, beside the
baseline; ``all``: every network of config.yaml), split 2 test / 2 validation patients per site, and
prints, from ``group/metrics.tsv``, per site and pooled over the test subjects against the phantom's
true lesions: lesion Dice (pooled over subjects: 2 sum TP / sum (P + R)) at 33 % and at the network's
validation threshold, lesion detection rate (LDR), lesion-wise F1, nDSC, false-positive lesions per
subject, for the network and the baseline; and the wall time of the whole run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mrflesion.config import load_config  # noqa: E402


def pooled_dice(t: pd.DataFrame, suffix: str) -> float:
    """2 sum TP / sum (P + R) from per-subject Dice and volumes (TP = Dice (P + R) / 2)."""
    p, r = t[f"lesion_pred_ml{suffix}"], t["lesion_ref_ml"]
    den = float((p + r).sum())
    return float((t[f"lesion_dice{suffix}"].fillna(0) * (p + r)).sum() / den) if den > 0 else float("nan")


def summarise(metrics: pd.DataFrame, networks: list[str]) -> pd.DataFrame:
    test = metrics[(metrics.split == "test") & (metrics.reference == "truth")]
    wide = test.pivot_table(index=["network", "site", "subject"], columns="metric", values="value")
    rows = []
    for net in networks:
        if net not in wide.index.get_level_values(0):
            continue
        v = wide.loc[net]
        for site, t in [*v.groupby(level="site"), ("all", v)]:
            rows.append({
                "network": net, "site": site, "n": len(t),
                "dice@33": pooled_dice(t, ""), "dice@val": pooled_dice(t, "_vt"),
                "threshold": t["lesion_threshold_vt"].mean(),
                "LDR": t["lesion_ldr_vt"].mean(), "F1": t["lw_f1_vt"].mean(),
                "nDSC": t["lesion_ndsc_vt"].mean(), "FP/subject": t["lw_fp_vt"].mean(),
            })
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=24)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_lesion"))
    ap.add_argument("--networks", choices=("first", "all"), default="first")
    ap.add_argument("--cores", type=int, default=2)
    args = ap.parse_args()
    cfg = load_config(ROOT / "config.yaml")
    nets = cfg["networks"] if args.networks == "all" else cfg["networks"][:1]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    overlay = out / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({
        "output_dir": str(out / "mrflesion"), "work_dir": str(out / "work"),
        "phantom": {"dir": str(out / "phantom"), "subjects": args.subjects},
        "networks": nets,
        "training": {"split": {"n_test_per_site": [2, 2], "n_val_per_site": [2, 2], "reference_subjects": 0}},
    }))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--profile",
           str(ROOT / "profiles" / "local"), "--cores", str(args.cores), "--configfile", str(ROOT / "config.yaml"),
           str(overlay), "--quiet"]
    print(f"{args.subjects} subjects, networks {[n['name'] for n in nets]} + baseline; {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=out)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"the workflow failed (exit {proc.returncode}); see {out}/work/logs")
    metrics = pd.read_csv(out / "mrflesion" / "group" / "metrics.tsv", sep="\t", na_values=["n/a"])
    table = summarise(metrics, [n["name"] for n in nets] + ["baseline"])
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"wall time {wall / 60:.1f} min on {args.cores} cores ({args.subjects} subjects)")


if __name__ == "__main__":
    main()
