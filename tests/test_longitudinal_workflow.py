"""The longitudinal stage through Snakemake on a tiny two-session cohort (a BIDS dataset on disk, so the
discovery of sessions and of the manual new/enlarged masks is the real one): pairing, halfway-space
registration, a short training that is preempted (SIGTERM to the training job: checkpoint, exit 75) and
resumed by the next run, inference, the lesion-wise evaluation, per-site tables and reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT
from phantomgrids import DEMO_SLAB

from mrflesion.phantom import generate

pytestmark = pytest.mark.slow

NETWORK = "Siamese3D"
EPOCHS = 4


def _overlay(tmp: Path, bids: Path) -> Path:
    overlay = tmp / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({
        "bids_dir": str(bids),
        "output_dir": str(tmp / "out"),
        "work_dir": str(tmp / "work"),
        "networks": [],
        "training": {"split": {"n_test_per_site": [1], "n_val_per_site": [1], "reference_subjects": 0,
                               "min_train_per_site": 1, "seed": 0}},
        "longitudinal": {
            "network": {"name": NETWORK, "widths": [4, 8, 16], "patch": [32, 32, 8], "epochs": EPOCHS,
                        "batch_size": 2, "patches_per_epoch": 24, "lr": 0.002, "validate_every": 2},
            "threads": 1, "device": "cpu", "mem_mb": 2000, "runtime_min": 10},
    }))
    return overlay


def _command(overlay: Path, *targets: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--cores", "2",
            "--configfile", str(ROOT / "config.yaml"), str(overlay), "--", *targets]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    kids = [int(x) for x in out.split()]
    return kids + [g for k in kids for g in _children(k)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("longitudinal")
    bids = tmp / "bids"
    # 6 subjects over 2 sites, two sessions each: per site one test and one validation patient, the rest
    # (one control at site 1) for training
    generate(bids, n_subjects=6, n_sites=2, seed=3, longitudinal=True, progress=False, _grid_override=DEMO_SLAB)
    overlay = _overlay(tmp, bids)
    state = tmp / "work" / "train" / "longitudinal" / NETWORK
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # first run: stopped by SIGTERM to the training job once it has saved an epoch
    first = subprocess.Popen(_command(overlay, "longitudinal"), cwd=tmp, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    preempted = False
    while time.monotonic() < deadline and first.poll() is None:
        if (state / "last.pt").exists():
            for pid in _children(first.pid):
                if "longitudinal_train" in _cmdline(pid):
                    os.kill(pid, signal.SIGTERM)
                    preempted = True
            if preempted:
                break
        time.sleep(0.2)
    out1, _ = first.communicate(timeout=600)
    hist1 = pd.read_csv(state / "history.tsv", sep="\t") if (state / "history.tsv").exists() else None
    second = subprocess.run(_command(overlay, "longitudinal"), cwd=tmp, env=env, capture_output=True, text=True,
                            timeout=900)
    return {"tmp": tmp, "bids": bids, "out": tmp / "out", "work": tmp / "work", "state": state,
            "preempted": preempted, "first": first.returncode, "out1": out1, "hist1": hist1,
            "second": second}


def test_preempted_training_resumes(run: dict) -> None:
    assert run["preempted"], run["out1"][-3000:]
    assert run["first"] != 0  # the job ended with exit 75, so Snakemake reports it failed
    log = (run["work"] / "logs" / "longitudinal" / f"train_{NETWORK}.log").read_text()
    assert run["second"].returncode == 0, run["second"].stderr[-4000:]
    assert "resumed from" in log  # the second run's training job continued from last.pt
    hist = pd.read_csv(run["out"] / "models" / "longitudinal" / NETWORK / "history.tsv", sep="\t")
    main = hist[hist["phase"] == "main"]
    assert main["epoch"].tolist() == list(range(1, EPOCHS + 1))  # every epoch once
    assert run["hist1"] is None or len(run["hist1"]) < len(hist)


def test_pairs_maps_tables_and_reports(run: dict) -> None:
    out = run["out"]
    pairs = pd.read_csv(out / "group" / "longitudinal_pairs.tsv", sep="\t")
    assert len(pairs) == 6 and set(pairs["baseline"]) == {"ses-01"} and set(pairs["followup"]) == {"ses-02"}
    assert (pairs["annotated"]).all() and set(pairs["split"]) == {"train", "val", "test"}
    metrics = pd.read_csv(out / "group" / "longitudinal_metrics.tsv", sep="\t", na_values=["n/a"])
    assert set(metrics["method"]) == {NETWORK, "subtraction"} and len(metrics) == 12
    assert (metrics["reference"] == "manual mask").all()
    for col in ("sensitivity", "fp", "f1", "n_new", "n_enlarged", "volume_new_ml"):
        assert col in metrics.columns
    summary = pd.read_csv(out / "group" / "longitudinal_summary_sites.tsv", sep="\t")
    assert {"site1", "site2", "all"} <= set(summary["site"])
    comp = json.loads((out / "models" / "longitudinal" / "subtraction.json").read_text())
    assert set(comp["fit_pairs"]) == set(pairs.loc[pairs["split"] != "test", "pair"])  # never a test pair
    for _, p in pairs.iterrows():
        sub, ses = p["subject"], p["followup"]
        anat = out / sub / ses / "anat"
        fu = nib.load(run["bids"] / sub / ses / "anat" / f"{sub}_{ses}_FLAIR.nii.gz")
        for m in (NETWORK, "subtraction"):
            img = nib.load(anat / f"{sub}_{ses}_space-FLAIR_label-newenlarged_desc-{m}_probseg.nii.gz")
            assert img.shape == fu.shape and np.allclose(img.affine, fu.affine)
            side = json.loads((anat / f"{sub}_{ses}_space-FLAIR_label-newenlarged_desc-{m}_probseg.json").read_text())
            assert side["Sources"] and "OperatingPoint" in side
        assert (anat / f"{sub}_{ses}_desc-longitudinal_report.html").stat().st_size > 10_000
        xfm = json.loads((anat / f"{sub}_{ses}_desc-halfway_xfm.json").read_text())
        assert 0 < xfm["RotationDegrees"] < 10  # the phantom repositions the head by a few degrees
    html = (out / "group" / "longitudinal_report.html").read_text()
    assert "Pooled detection" in html and NETWORK in html
    # the input dataset is not written to
    assert not list(run["bids"].rglob("*halfway*"))


def test_target_mask_follows_the_anatomy(run: dict) -> None:
    """The manual new/enlarged mask moved to the halfway space lies on bright follow-up voxels."""
    out = run["out"]
    pairs = pd.read_csv(out / "group" / "longitudinal_pairs.tsv", sep="\t")
    ratios = []
    for _, p in pairs[pairs["split"] != "test"].iterrows():  # test pairs get no training target
        stem = out / p["subject"] / p["followup"] / "anat" / f"{p['subject']}_{p['followup']}"
        tgt = nib.load(f"{stem}_space-halfway_label-newenlarged_mask.nii.gz").get_fdata() > 0
        fu = nib.load(f"{stem}_space-halfway_desc-followup_FLAIR.nii.gz").get_fdata()
        bl = nib.load(f"{stem}_space-halfway_desc-baseline_FLAIR.nii.gz").get_fdata()
        if tgt.sum() >= 5:
            ratios.append(float(np.mean(fu[tgt] - bl[tgt])))
    assert ratios and np.median(ratios) > 0.1  # new lesion tissue: brighter at follow-up than at baseline
    test = pairs.loc[pairs["split"] == "test"].iloc[0]
    assert not (out / test["subject"] / test["followup"] / "anat"
                / f"{test['subject']}_{test['followup']}_space-halfway_label-newenlarged_mask.nii.gz").exists()
