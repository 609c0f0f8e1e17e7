"""Evaluation times: the threshold sweep on the paper grid, lesion_metrics on a subject grid, a subject report.

Builds the inputs of the tests that check these functions' results (they assert no times) and prints the
best of ``--repeats`` wall times of each, after one warm-up call:

* ``mrflesion.evaluate.threshold_sweep`` of a random probability map against 30 box lesions on the paper grid
  (240 x 240 x 47), the 99 thresholds 0.01-0.99 (tests/test_evaluate_metrics.py);
* ``mrflesion.evaluate.subject.lesion_metrics`` (Dice, detection, lesion-wise F1, nDSC, AVD, HD95, the sweep)
  of a blurred reference as prediction on a subject grid (120 x 120 x 20, 1.5 x 1.5 x 5 mm), as the
  evaluation rule runs it per network and reference (tests/test_lesion_metrics.py);
* ``mrflesion.evaluate.report.render_subject_report`` of a subject on the demo grid (120 x 120 x 20) with a
  five-output network and a lesion-only one (tests/test_report.py), and the page's size.

    .venv/bin/python benchmarks/bench_evaluation.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from mrflesion.evaluate import lesion_table, threshold_sweep
from mrflesion.evaluate.report import NetworkResult, SubjectReport, render_subject_report
from mrflesion.evaluate.subject import lesion_metrics


def best_of(repeats: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """The shortest of ``repeats`` wall times of ``fn()`` after a warm-up call, and its last result."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def sweep_inputs() -> tuple[np.ndarray, np.ndarray]:
    """A random probability map and 30 box lesions (6 x 6 x 3 voxels) on the paper grid."""
    rng = np.random.default_rng(3)
    shape = (240, 240, 47)
    prob = rng.random(shape, dtype=np.float32)
    ref = np.zeros(shape, bool)
    for c in rng.integers((10, 10, 3), (230, 230, 44), size=(30, 3)):
        ref[c[0] - 3 : c[0] + 3, c[1] - 3 : c[1] + 3, c[2] - 1 : c[2] + 2] = True
    return prob, ref


def subject_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Blobby lesions (2 % of a box brain) and their blurred, noisy version as prediction, 1.5 x 1.5 x 5 mm."""
    rng = np.random.default_rng(7)
    shape = (120, 120, 20)
    brain = np.zeros(shape, bool)
    brain[10:110, 10:110, 2:18] = True
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    ref = ((field > np.quantile(field, 0.98)) & brain).astype(np.float32)
    prob = (np.clip(ndimage.gaussian_filter(ref + 0.3 * rng.random(shape), 1.0), 0, 1) * brain).astype(np.float32)
    return prob, ref, brain, (1.5, 1.5, 5.0)


def _network(name: str, outputs: tuple[str, ...], refs: dict[str, np.ndarray], rng: np.random.Generator,
             history: bool) -> NetworkResult:
    out = {}
    for key in outputs:
        scale = {"T1": 40.0, "T2star": 4.0}.get(key, 0.15)
        out[key] = np.where(refs[key] != 0, refs[key] + rng.normal(0, scale, refs[key].shape), 0.0)
        if key not in ("T1", "T2star"):
            out[key] = np.clip(out[key], 0, 1)
    manual = refs["lesion"] > 0
    out["lesion"] = np.clip(0.7 * manual + rng.uniform(0, 0.3, manual.shape) * (refs["T1"] > 0), 0, 1)
    hist = pd.DataFrame({"epoch": np.arange(1, 6), "train_loss": np.linspace(1, 0.2, 5),
                         "val_loss": np.linspace(1.2, 0.4, 5), "val_dice_lesion_33": np.linspace(0.1, 0.6, 5),
                         "lr": [1e-3] * 5}) if history else pd.DataFrame()
    return NetworkResult(
        name=name, outputs=out, references={k: refs[k] for k in outputs},
        curves=threshold_sweep(out["lesion"], manual, thresholds=np.arange(0.05, 1.0, 0.05)),
        lesions=lesion_table(out["lesion"] >= 0.33, manual, voxel_ml=0.001, min_ml=0.0), history=hist,
        metrics={"dice_lesion_33": 0.61, "ldr_33": 1.0}, threshold=0.33, inference_s=1.5,
    )


def subject_report(shape: tuple[int, int, int] = (120, 120, 20)) -> SubjectReport:
    """A patient with two small lesions in an ellipsoid brain: maps, QC images, a five-output network with
    its training history and a lesion-only network without."""
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    brain = (x**2 / 0.8 + y**2 / 0.9 + z**2 / 1.2) < 0.8
    manual = np.zeros(shape)
    cx, cy, cz = shape[0] // 2, shape[1] // 2, shape[2] // 2
    manual[cx - 3 : cx + 1, cy - 2 : cy + 2, cz - 1 : cz + 1] = 1.0
    manual[cx + 5 : cx + 7, cy + 4 : cy + 6, cz] = 1.0
    refs = {"T1": np.where(brain, 800 + 300 * rng.random(shape), 0.0),
            "T2star": np.where(brain, 40 + 20 * rng.random(shape), 0.0),
            "NAWM": np.where(brain, rng.random(shape), 0.0), "GM": np.where(brain, rng.random(shape), 0.0),
            "lesion": manual}
    mrf = np.where(brain, 100 + 50 * rng.random(shape), 0.0)
    nets = [_network("MSE-5", ("T1", "T2star", "NAWM", "GM", "lesion"), refs, rng, history=True),
            _network("DICE-1", ("lesion",), refs, rng, history=False)]
    return SubjectReport(
        subject="sub-p01", session="ses-01", site="siteA", group="patient", underlay=mrf, manual=manual,
        qc={"MRF": mrf, "T2w": np.where(brain, rng.random(shape), 0), "FLAIR": np.zeros(shape)}, networks=nets,
        timings={"denoise": 12.0, "match": 30.5, "register": 8.0, "tissue": 20.0, "inference MSE-5": 1.2},
        provenance={"mrflesion": "benchmark", "date": time.strftime("%Y-%m-%d")},
        truth_metrics=pd.DataFrame({"network": ["MSE-5"], "mrd_T1_truth": [0.05]}),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls of each function (the best is printed)")
    args = ap.parse_args()

    prob, ref = sweep_inputs()
    t, out = best_of(args.repeats, lambda: threshold_sweep(prob, ref))
    print(f"{f'threshold sweep, paper grid 240x240x47, {len(out)} thresholds':<56}{t:6.2f} s")

    prob, ref, brain, zooms = subject_inputs()
    t, (res, _, _) = best_of(args.repeats, lambda: lesion_metrics(prob, ref, brain, zooms, 0.33))
    n_lesions = int(res["lw_n_ref"])
    print(f"{f'lesion_metrics, subject grid 120x120x20, {n_lesions} lesions':<56}{t:6.2f} s")

    report = subject_report()
    t, page = best_of(args.repeats, lambda: render_subject_report(report))
    print(f"{'subject report, demo grid 120x120x20, 2 networks':<56}{t:6.2f} s ({len(page) / 1e6:.2f} MB page)")
    print(f"(best of {args.repeats} after a warm-up call)")


if __name__ == "__main__":
    main()
