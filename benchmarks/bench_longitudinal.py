"""New and enlarging lesions on a longitudinal phantom cohort of any size: the siamese network and the
subtraction comparator, trained and evaluated by the pipeline itself (``snakemake longitudinal``).

    .venv/bin/python benchmarks/bench_longitudinal.py --subjects 40 --test 4 --val 2 --out /tmp/bench_long

Runs the longitudinal demo configuration (config/longitudinal.yaml) on a phantom of ``--subjects``
subjects at two sites, split ``--test`` test and ``--val`` validation patients per site (the rest train;
``--set`` overrides network settings, e.g. ``--set '{"epochs": 40}'``), and prints, from
``group/longitudinal_metrics.tsv``, per site and pooled over the test pairs against the phantom's truth:
lesion-wise sensitivity, false positives per pair, F1 (counts summed over pairs), the component-wise
sensitivity (every piece of an enlarging rim a lesion), and the wall time of the whole run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mrflesion.longitudinal.evaluate import pooled_detection  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=40)
    ap.add_argument("--test", type=int, default=4, help="test patients per site")
    ap.add_argument("--val", type=int, default=2, help="validation patients per site")
    ap.add_argument("--seed", type=int, default=42, help="phantom seed")
    ap.add_argument("--set", default="{}", help="JSON: longitudinal.network settings to override")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_longitudinal"))
    ap.add_argument("--cores", type=int, default=2)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    overlay = a.out / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({
        "output_dir": str(a.out / "out"), "work_dir": str(a.out / "work"),
        "phantom": {"dir": str(a.out / "phantom"), "subjects": a.subjects, "seed": a.seed, "longitudinal": True},
        "training": {"split": {"n_test_per_site": [a.test], "n_val_per_site": [a.val], "reference_subjects": 0}},
        "longitudinal": {"network": json.loads(a.set)},
    }))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--profile",
           str(ROOT / "profiles" / "local"), "--cores", str(a.cores), "--configfile", str(ROOT / "config.yaml"),
           str(ROOT / "config" / "longitudinal.yaml"), str(overlay), "--", "longitudinal"]
    t0 = time.perf_counter()
    with open(a.out / "snakemake.log", "w") as log:
        rc = subprocess.run(cmd, cwd=a.out, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc:
        sys.exit(f"snakemake failed (rc {rc}): see {a.out / 'snakemake.log'}")
    m = pd.read_csv(a.out / "out" / "group" / "longitudinal_metrics.tsv", sep="\t", na_values=["n/a"])
    test = m[m["split"] == "test"]
    pooled = pooled_detection(test)
    comp = test.groupby("method")[["n_ref_components"]].sum()
    comp["sensitivity_components"] = (test["sensitivity_components"] * test["n_ref_components"]).groupby(
        test["method"]).sum() / comp["n_ref_components"]
    pd.set_option("display.width", 200)
    print(f"{a.subjects} subjects, {test['pair'].nunique()} test pairs; wall {wall / 60:.1f} min on {a.cores} cores")
    print(pooled[["site", "method", "pairs", "lesions", "detected", "false_positives", "sensitivity",
                  "fp_per_pair", "f1", "dice_detected_median"]].to_string(index=False, float_format="%.3f"))
    print(comp.to_string(float_format="%.3f"))


if __name__ == "__main__":
    main()
