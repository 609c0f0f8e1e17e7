"""Training stage of the workflow: subject splits, learning on a small phantom, one job per network.

(a) splits: test subjects are patients only, sites represented, no overlap, deterministic; the
    ``splits`` rule writes exactly the planned table.
(b) learning, through mrflesion.steps.training.run_training (what the train_network rule runs) on a
    small phantom: validation loss at the end <= half the first epoch's, T1 mean relative deviation
    on the validation subject < 15 %, model files and sidecar published; a finished state is reused.
(c) ``snakemake -n train`` lists one train_network job per configured network with mem_mb/runtime,
    and the slurm profile's set-resources give it a GPU.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT
from phantomgrids import TINY

from mrflesion.config import load_config
from mrflesion.learn.infer import predict_volume
from mrflesion.learn.networks import default_networks
from mrflesion.phantom import cohort_table, generate
from mrflesion.plan import training as plan_training
from mrflesion.steps import training as train_steps

SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]


def _config() -> dict:
    return load_config(ROOT / "config.yaml")


def _rows(n: int, sites: int = 2, seed: int = 42) -> list[dict]:
    t = cohort_table(n, sites, seed).rename(columns={"participant_id": "subject"})
    return t[["subject", "site", "group"]].to_dict("records")


# ---------------------------------------------------------------------------------------- (a) splits


def test_config_lists_the_eight_networks_of_table1() -> None:
    """The recommended network first, then rows of Table 1 (the demo: those that fit its budget; the
    paper overlay and the schema default: all eight), each named from the catalogue; the paper overlay
    resolves to the paper's training settings."""
    table1 = default_networks()
    names = [n["name"] for n in table1]
    assert names == ["MSE-5", "MAE-5", "LCL-5", "MSE-1", "MAE-1", "LCL-1", "DICE-1", "MSE-2-1"]
    cfg = _config()
    assert cfg["networks"][0]["name"] == "MTL-5" and cfg["networks"][0]["loss"] == "multitask"
    assert all(n in table1 for n in cfg["networks"][1:]) and len(cfg["networks"]) > 1
    schema = yaml.safe_load((ROOT / "config.schema.yaml").read_text())["properties"]
    assert schema["networks"]["default"] == ["MTL-5", *names]
    paper = load_config(ROOT / "config.yaml", ROOT / "config" / "paper.yaml")
    assert paper["networks"][0]["name"] == "MTL-5" and paper["networks"][1:] == table1
    assert not {"epochs", "lr", "widths", "bridge"} & set(paper["networks"][0])  # paper-sized training
    t = paper["training"]
    assert (t["widths"], t["bridge"], t["patch_size"], t["patches_per_slice"]) == ([32, 64, 128], 256, 64, 64)
    assert (t["epochs"], t["batch_size"], t["lr"], t["lr_halve_every"]) == (100, 64, 1e-4, 20)


def test_splits_demo_cohort() -> None:
    cfg = _config()["training"]["split"]
    rows = _rows(_config()["phantom"]["subjects"])
    table = plan_training.make_splits(rows, cfg)
    assert list(table.columns) == ["subject", "site", "group", "split"]
    assert sorted(table["subject"]) == sorted(r["subject"] for r in rows)  # every subject once
    test, val = table[table.split == "test"], table[table.split == "val"]
    assert (test.group == "patient").all() and (val.group == "patient").all()
    assert set(test.site) == {"site1", "site2"} and set(val.site) == {"site1", "site2"}
    # scaled down from 2 + 3 for 48 subjects: one test and one validation patient per site
    assert len(test) == 2 and len(val) == 2
    assert (table[table.group == "control"].split == "train").all()
    for site in ("site1", "site2"):
        assert ((table.site == site) & (table.split == "train") & (table.group == "patient")).any()
    assert plan_training.splits_text(plan_training.make_splits(rows, cfg)) == plan_training.splits_text(table)
    other = plan_training.make_splits(rows, {**cfg, "seed": cfg["seed"] + 1})
    assert set(other.split) == {"train", "val", "test"}


def test_splits_paper_cohort_and_tiny_cohorts() -> None:
    cfg = load_config(ROOT / "config.yaml", ROOT / "config" / "paper.yaml")["training"]["split"]
    table = plan_training.make_splits(_rows(48), cfg)
    counts = table.groupby(["split", "site"]).size().to_dict()
    assert counts[("test", "site1")] == 2 and counts[("test", "site2")] == 3
    assert counts[("val", "site1")] == 2 and counts[("val", "site2")] == 3
    assert counts[("train", "site1")] == 20 and counts[("train", "site2")] == 18
    # 6 subjects: site1 = 1 control + 2 patients, site2 = 3 patients; a patient per site stays in training
    small = plan_training.make_splits(_rows(6, seed=1), cfg)
    assert (small.split == "test").sum() == 2 and (small.split == "val").sum() == 1
    for site in ("site1", "site2"):
        assert ((small.site == site) & (small.split == "train") & (small.group == "patient")).any()
    assert plan_training.scaled_counts([2, 3], 12, 48) == [1, 1]
    assert plan_training.scaled_counts([2, 3], 24, 48) == [1, 2]
    assert plan_training.scaled_counts([2, 3], 12, 0) == [2, 3]


def _overlay(tmp_path: Path) -> list[str]:
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "work_dir": str(tmp_path / "work"),
                                       "phantom": {"dir": str(tmp_path / "phantom")}}))
    return ["--configfile", str(ROOT / "config.yaml"), str(overlay)]


def test_splits_rule_writes_the_planned_table(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        SNAKEMAKE + ["--cores", "1", "--quiet", *_overlay(tmp_path), "--", "splits"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = (out / "group" / "splits.tsv").read_text()
    cfg = _config()
    planned = plan_training.make_splits(_rows(cfg["phantom"]["subjects"]), cfg["training"]["split"])
    assert written == plan_training.splits_text(planned)


# ---------------------------------------------------------------------------------------- (b) learning

# A coarse slab of the phantom (3 x 3 x 4 mm, 8 slices) with more lesions: generation and training take seconds.
SLAB = {**TINY, "lesion_count": [6, 10]}
LEARN = {
    "epochs": 8,
    "batch_size": 16,
    "lr": 0.003,
    "lr_halve_every": 4,
    "patch_size": 32,
    "patches_per_slice": 16,
    "lesion_factor": 5,
    "widths": [8, 16, 32],
    "bridge": 64,
    "dropout": 0.0,
    "seed": 0,
    "device": "cpu",
}


def _phantom_subjects(root: Path) -> tuple[list[dict], pd.DataFrame]:
    """The phantom's raw MRF series with its own-space truth maps (aligned by construction)."""
    table = generate(root, n_subjects=5, n_sites=2, seed=3, n_jobs=2, progress=False, _grid_override=SLAB)
    subjects = []
    for sub in table["participant_id"]:
        truth = root / "derivatives" / "truth" / sub / "anat"

        def t(name: str, sub: str = sub, truth: Path = truth) -> Path:
            return truth / f"{sub}_space-MRF_{name}.nii.gz"

        ref = nib.load(t("label-WM_probseg"))
        wm, gm, csf = (np.asarray(nib.load(t(f"label-{k}_probseg")).dataobj) for k in ("WM", "GM", "CSF"))
        lesion = np.asarray(nib.load(t("label-lesion_mask")).dataobj) > 0.5
        brain = (wm + gm + csf) > 0.5
        extra = {}
        for name, arr in (("NAWM", np.clip(wm - lesion, 0, 1)), ("mask", brain)):
            extra[name] = root / f"{sub}_{name}.nii.gz"
            nib.save(nib.Nifti1Image(arr.astype(np.float32), ref.affine), extra[name])
        subjects.append({
            "subject": sub,
            "mrf": str(root / sub / "anat" / f"{sub}_acq-MRFEPI_MRF.nii.gz"),
            "T1": str(t("T1map")), "T2star": str(t("T2starmap")), "NAWM": str(extra["NAWM"]),
            "GM": str(t("label-GM_probseg")), "lesion": str(t("label-lesion_mask")), "mask": str(extra["mask"]),
        })
    return subjects, table


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("train_phantom")
    subjects, table = _phantom_subjects(root / "bids")
    rows = table.rename(columns={"participant_id": "subject"})[["subject", "site", "group"]].to_dict("records")
    split = plan_training.split_of(plan_training.make_splits(rows, {"n_test_per_site": [0], "n_val_per_site": [0, 1]}))
    train = [s for s in subjects if split[s["subject"]] == "train"]
    val = [s for s in subjects if split[s["subject"]] == "val"]
    assert len(val) == 1 and len(train) == 4
    spec = default_networks()[0]  # MSE-5: all five outputs
    sidecar = train_steps.run_training(spec, train, val, LEARN, root / "state", root / "model", threads=2,
                                       splits_sha256="x" * 64, progress=False)
    return {"root": root, "sidecar": sidecar, "val": val, "train": train, "spec": spec}


def test_network_learns(learned: dict) -> None:
    hist = pd.read_csv(learned["root"] / "model" / "history.tsv", sep="\t")
    assert list(hist.epoch) == list(range(1, LEARN["epochs"] + 1))
    assert hist.val_loss.iloc[-1] <= 0.5 * hist.val_loss.iloc[0], list(hist.val_loss)
    assert hist.val_mrd_T1.iloc[-1] < 0.15, list(hist.val_mrd_T1)
    # the published model reproduces that on the validation subject
    val = learned["val"][0]
    pred = predict_volume(learned["root"] / "model" / "best.pt", val, device="cpu")
    ref = np.asarray(nib.load(val["T1"]).dataobj)
    brain = np.asarray(nib.load(val["mask"]).dataobj) > 0.5
    ok = brain & (ref > 0)
    assert np.mean(np.abs(pred["T1"][ok] - ref[ok]) / ref[ok]) < 0.15


def test_model_files_and_sidecar(learned: dict) -> None:
    model = learned["root"] / "model"
    side = json.loads((model / "best.json").read_text())
    assert side == json.loads(json.dumps(learned["sidecar"]))
    assert side["Network"]["name"] == "MSE-5" and side["SplitsSha256"] == "x" * 64
    assert side["EpochsCompleted"] == LEARN["epochs"] and 1 <= side["BestEpoch"] <= LEARN["epochs"]
    assert side["ValidationSubjects"] == [learned["val"][0]["subject"]]
    assert len(side["TimingsSeconds"]["per_epoch"]) == LEARN["epochs"] and side["Device"] == "cpu"
    assert (learned["root"] / "state" / "last.pt").is_file()  # resumable state kept in the work dir
    # a finished state is reused: no further epoch runs, the outputs are published again
    (model / "best.pt").unlink()
    again = train_steps.run_training(learned["spec"], learned["train"], learned["val"], LEARN,
                                     learned["root"] / "state", model, threads=2, progress=False)
    assert (model / "best.pt").is_file() and again["EpochsCompleted"] == side["EpochsCompleted"]
    assert again["TimingsSeconds"]["per_epoch"] == side["TimingsSeconds"]["per_epoch"]


# ---------------------------------------------------------------------------------------- (c) jobs


def _dry_run(tmp_path: Path, extra: list[str]) -> str:
    proc = subprocess.run(
        SNAKEMAKE + ["-n", "--cores", "2", *_overlay(tmp_path), *extra, "--", "train"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _train_jobs(log: str) -> dict[str, str]:
    """network -> the resources line of its train_network job in a dry run's listing."""
    jobs = {}
    for m in re.finditer(r"rule train_network:\n(.*?)(?=\n\S|\Z)", log, re.S):
        net = re.search(r"wildcards: network=(\S+)", m.group(1)).group(1)
        jobs[net] = re.search(r"resources: (.*)", m.group(1)).group(1)
    return jobs


def test_dry_run_one_job_per_network(tmp_path: Path) -> None:
    log = _dry_run(tmp_path, [])
    names = [n["name"] for n in _config()["networks"]]
    jobs = _train_jobs(log)
    assert sorted(jobs) == sorted(names)
    assert re.search(rf"train_network\s+{len(names)}\b", log)
    for res in jobs.values():
        assert "mem_mb=4000" in res and "runtime=60" in res and "gpu" not in res
    # test subjects are no input of any training job
    split = plan_training.make_splits(_rows(_config()["phantom"]["subjects"]), _config()["training"]["split"])
    for sub in split.subject[split.split == "test"]:
        assert f"{sub}_acq-MRFEPI_space-T2w_MRF" not in log


def test_slurm_profile_gives_training_a_gpu(tmp_path: Path) -> None:
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    res = profile["set-resources"]["train_network"]
    assert res["gpu"] == 1 and "cpus_per_gpu" in res
    assert "cpus_per_task" not in profile.get("default-resources", {}) or res.get("cpus_per_task") == 0
    # the same resources through Snakemake's --set-resources (the slurm executor may not be installed)
    log = _dry_run(tmp_path, ["--set-resources"] + [f"train_network:{k}={v}" for k, v in res.items()])
    jobs = _train_jobs(log)
    threads = _config()["training"]["threads"]
    cpus = threads if res["cpus_per_gpu"] == "threads" else int(res["cpus_per_gpu"])
    assert len(jobs) == len(_config()["networks"])
    for r in jobs.values():
        assert "gpu=1" in r and f"cpus_per_gpu={cpus}" in r and "mem_mb=4000" in r


def test_ready_image_stands_for_every_training_image(tmp_path: Path) -> None:
    """Training, inference and evaluation declare one file per subject (mrflesion.plan.training.READY_IMAGE); the
    plan that makes it must make every T2w-space image they read, so these exist and are older."""
    stem = "sub-01/anat/sub-01"
    ready = tmp_path / "out" / plan_training.TRAIN_IMAGES[plan_training.READY_IMAGE].format(stem=stem)
    proc = subprocess.run(
        SNAKEMAKE + ["--summary", "--cores", "1", *_overlay(tmp_path), "--", str(ready)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    planned = {line.split("\t")[0] for line in proc.stdout.splitlines()[1:]}
    for kind, name in plan_training.TRAIN_IMAGES.items():
        assert str(tmp_path / "out" / name.format(stem=stem)) in planned, kind
    # and the chain's last step is what makes it (nothing of the subject is planned after it)
    assert not any("_desc-evaluation" in f or "_report" in f for f in planned)
