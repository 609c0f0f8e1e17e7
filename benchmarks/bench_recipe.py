"""Variants of the recommended network's recipe, trained on a finished demo run's subjects.

    .venv/bin/python benchmarks/bench_recipe.py --run results --name measurement \\
        --set '{"mrf_scaling": "measurement"}' --seeds 0 1

Reads a finished run (``--run``: the folder holding ``mrflesion/`` and ``phantom/``, the main
command's ``results``): its split (``group/splits.tsv``) and the registered images of every subject.
For each seed, trains the first network of ``config.yaml`` (MTL-5) with the config's training settings,
the network entry's own options and ``--set`` on top, on the run's training subjects with its
validation subjects (``--threads``, default one, so that two runs can share a 2-core machine;
the pipeline's training jobs use ``training.threads``), then
applies it to the test subjects and prints, against the phantom's true lesions: per subject lesion
Dice, LDR, lesion-wise F1 and false-positive lesions, and the pooled Dice (2 sum TP / sum (P + R)),
at 33 % and at the operating point chosen on the validation subjects (threshold and minimum lesion
size). The training wall time is printed too. docs/lesion-training.md gives the figures it produced.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from mrflesion.config import load_config
from mrflesion.evaluate import lesion_mask, voxel_volume_ml
from mrflesion.evaluate.subject import lesion_metrics
from mrflesion.layout import derivative, stem
from mrflesion.learn.infer import predict_volume
from mrflesion.learn.spec import specs_from_config
from mrflesion.learn.train import train
from mrflesion.plan.training import TRAIN_IMAGES, read_splits, subject_images
from mrflesion.steps.training import train_arguments

ROOT = Path(__file__).resolve().parents[1]


def evaluate(best: Path, subjects: dict[str, dict[str, str]], truth_root: Path, threshold: float,
             min_ml: float) -> tuple[float, list[dict[str, float | str]]]:
    """Pooled Dice and per-subject metrics of one network at one operating point, against the truth."""
    tp = pred_ml = ref_ml = 0.0
    rows = []
    for sub, paths in subjects.items():
        prob = predict_volume(best, paths, device="cpu")["lesion"]
        img = nib.load(paths["mask"])
        brain = np.asarray(img.dataobj) > 0.5
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        truth = derivative("truth", "lesion", truth_root, stem(sub.removeprefix("sub-")))
        ref = np.asarray(nib.load(truth).dataobj) > 0.5
        m, _, _ = lesion_metrics(prob * brain, ref, brain, zooms, threshold, min_ml, sweep=False)
        pred = lesion_mask(prob * brain, threshold, voxel_volume_ml(zooms), min_ml)
        tp += float((pred & ref).sum())
        pred_ml += float(pred.sum())
        ref_ml += float(ref.sum())
        rows.append({"subject": sub, "dice": m["lesion_dice"], "ldr": m["lesion_ldr"], "f1": m["lw_f1"],
                     "fp": m["lw_fp"]})
    return 2 * tp / (pred_ml + ref_ml) if pred_ml + ref_ml else float("nan"), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "results", help="folder with mrflesion/ and phantom/")
    ap.add_argument("--name", default="variant", help="label of the variant (folder under --work)")
    ap.add_argument("--set", default="{}", help="JSON object of training options on top of the entry's")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_recipe"))
    ap.add_argument("--threads", type=int, default=1, help="CPU threads of training (results depend on it)")
    args = ap.parse_args()

    cfg = load_config(ROOT / "config.yaml")
    spec = specs_from_config(cfg["networks"])[0].to_dict()
    out = args.run / "mrflesion"
    splits = read_splits(out / "group" / "splits.tsv")
    kinds = list(TRAIN_IMAGES)
    by_split = {s: {sub: subject_images(str(out), stem(sub.removeprefix("sub-")), sub, kinds)
                    for sub in splits.loc[splits.split == s, "subject"]} for s in ("train", "val", "test")}
    truth_root = args.run / "phantom" / "derivatives" / "truth"
    print(f"{spec['name']} variant {args.name} {args.set}: train {list(by_split['train'])}, "
          f"validation {list(by_split['val'])}, test {list(by_split['test'])}", flush=True)
    for seed in args.seeds:
        kw = {**train_arguments(cfg["training"], spec), **json.loads(args.set), "seed": seed, "device": "cpu"}
        folder = args.work / f"{args.name}-seed{seed}"
        t0 = time.perf_counter()
        res = train(spec, list(by_split["train"].values()), list(by_split["val"].values()), folder,
                    num_threads=args.threads, progress=False, **kw)
        op = res.get("lesion_threshold") or {}
        print(f"seed {seed}: trained in {time.perf_counter() - t0:.0f} s (best epoch {res['best_epoch']}); "
              f"validation operating point {op}", flush=True)
        points = (("33 %", 0.33, 0.0), ("validation", float(op.get("threshold", 0.5)),
                                         float(op.get("min_lesion_ml", 0.0))))
        for label, thr, min_ml in points:
            pooled, rows = evaluate(Path(res["best_path"]), by_split["test"], truth_root, thr, min_ml)
            table = pd.DataFrame(rows).round(3).to_string(index=False)
            print(f"seed {seed} at {label} (threshold {thr:.2f}, min {min_ml} ml): pooled Dice {pooled:.3f}\n"
                  f"{table}", flush=True)


if __name__ == "__main__":
    main()
