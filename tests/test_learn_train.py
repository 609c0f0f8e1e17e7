"""Training core on a tiny synthetic set of "registered subjects" (32x32x4 voxels, 35 MRF measurements)."""

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
import torch
from scipy.ndimage import gaussian_filter

from mrflesion.learn.checkpoint import load as load_ckpt
from mrflesion.learn.data import Normalisation, PatchSampler, SliceDataset, load_subject
from mrflesion.learn.infer import predict_volume
from mrflesion.learn.networks import NetworkSpec
from mrflesion.learn.split import split_subjects
from mrflesion.learn.train import PREEMPTED_EXIT_CODE, Preempted, ResumeMismatch, train
from mrflesion.mrf.sequence import Protocol
from mrflesion.mrf.signal import simulate

SHAPE = (32, 32, 4)
MSE5 = {"name": "MSE-5", "loss": "mse", "inputs": "mrf", "outputs": ["T1", "T2star", "NAWM", "GM", "lesion"]}
TINY = {
    "epochs": 4,
    "batch_size": 16,
    "patch_size": 16,
    "patches_per_slice": 6,
    "widths": (4, 8, 16),
    "bridge": 16,
    "lr": 1e-3,
    "lr_halve_every": 2,
    "seed": 3,
    "device": "cpu",
    "num_threads": 1,
    "progress": False,
}


def _smooth(rng, sigma=3.0):
    return gaussian_filter(rng.standard_normal(SHAPE), sigma=(sigma, sigma, 1.0))


def _make_subject(root: Path, i: int, protocol: Protocol) -> dict[str, str]:
    rng = np.random.default_rng(100 + i)
    xx, yy = np.meshgrid(np.arange(32) - 15.5, np.arange(32) - 15.5, indexing="ij")
    brain2d = (xx / 13.5) ** 2 + (yy / 12.5) ** 2 <= 1
    brain = np.repeat(brain2d[..., None], SHAPE[2], axis=2)
    f = _smooth(rng)
    gm = np.clip(0.5 + 3.0 * f / (np.abs(f).max() + 1e-9), 0, 1) * brain
    lesion = np.zeros(SHAPE, dtype=bool)
    cx, cy = rng.integers(-6, 7, size=2)
    lesion[..., 1:3] = (((xx - cx) ** 2 + (yy - cy) ** 2) <= 9)[..., None]
    lesion &= brain
    gm = gm * ~lesion
    nawm = (1 - gm) * brain * ~lesion
    var = 1 + 0.05 * _smooth(rng) / (np.abs(_smooth(rng)).max() + 1e-9)
    t1 = np.where(brain, (900 * nawm + 1500 * gm + 1600 * lesion) * var, 1000.0)
    t2s = np.where(brain, (50 * nawm + 65 * gm + 95 * lesion) * var, 50.0)
    mrf = np.zeros(SHAPE + (protocol.n_measurements,), dtype=np.float32)
    for k in range(SHAPE[2]):
        mrf[:, :, k] = simulate(protocol, k, t1[:, :, k], t2s[:, :, k], 1.0)
    mrf = 500.0 * mrf * brain[..., None] + rng.normal(0, 2.0, mrf.shape)
    mrf = np.abs(mrf)
    aff = np.eye(4)
    paths = {}
    for key, arr in {
        "mrf": mrf,
        "T1": t1 * brain,
        "T2star": t2s * brain,
        "NAWM": nawm,
        "GM": gm,
        "lesion": lesion,
        "mask": brain,
    }.items():
        p = root / f"sub-{i:02d}_{key}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(arr, dtype=np.float32), aff), p)
        paths[key] = str(p)
    paths["subject"] = f"sub-{i:02d}"
    return paths


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    root = tmp_path_factory.mktemp("learn_subjects")
    protocol = Protocol.default(SHAPE[2])
    return [_make_subject(root, i, protocol) for i in range(4)]


@pytest.fixture(scope="module")
def straight(subjects, tmp_path_factory):
    """Reference: 4 epochs in one go."""
    out = tmp_path_factory.mktemp("straight")
    summary = train(MSE5, subjects[:3], subjects[3:], out, **TINY)
    return out, summary


def _assert_same_state(a: Path, b: Path) -> None:
    ca, cb = load_ckpt(a), load_ckpt(b)
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    for k in sa:
        for kk in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa[k][kk], sb[k][kk])
    assert ca["scheduler"] == cb["scheduler"]
    strip = [[{k: v for k, v in r.items() if k != "seconds"} for r in c["history"]] for c in (ca, cb)]
    assert strip[0] == strip[1]


def test_outputs_history_and_best(straight):
    out, summary = straight
    assert summary["epochs_completed"] == 4 and summary["parameters"] > 0
    hist = pd.read_csv(out / "history.tsv", sep="\t")
    assert list(hist["epoch"]) == [1, 2, 3, 4]
    for col in ("train_loss_T1", "val_loss_lesion", "val_dice_lesion_33", "val_mrd_T1", "val_mrd_T2star",
                "val_dice_NAWM_80", "val_dice_GM_80", "lr", "seconds"):
        assert col in hist.columns and hist[col].notna().all(), col
    assert list(hist["lr"]) == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4])
    best = load_ckpt(out / "best.pt")
    assert best["epoch"] == int(hist["val_loss"].idxmin()) + 1
    assert best["normalisation"] == Normalisation().to_dict() and best["spec"] == MSE5


def test_resume_bit_identical(subjects, straight, tmp_path):
    ref, _ = straight
    out = tmp_path / "resumed"
    train(MSE5, subjects[:3], subjects[3:], out, **{**TINY, "epochs": 2})
    assert load_ckpt(out / "last.pt")["epochs_done"] == 2
    summary = train(MSE5, subjects[:3], subjects[3:], out, **TINY)
    assert summary["epochs_completed"] == 4
    _assert_same_state(ref / "last.pt", out / "last.pt")
    with pytest.raises(ResumeMismatch):
        train(MSE5, subjects[:3], subjects[3:], out, **{**TINY, "seed": 4, "epochs": 5})


def test_sigterm_saves_and_resumes_bit_identical(subjects, straight, tmp_path):
    ref, _ = straight
    out = tmp_path / "preempted"
    cfg = {**TINY, "spec": MSE5, "train_subjects": subjects[:3], "val_subjects": subjects[3:]}
    cfg["out_dir"] = str(out)
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mrflesion.learn.train", str(cfg_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    t0 = time.monotonic()
    while not (out / "last.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < 60
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err.decode()
    ck = load_ckpt(out / "last.pt")
    assert 1 <= ck["epochs_done"] < 4
    # restart (in-process) continues to the same weights as the uninterrupted run
    train(MSE5, subjects[:3], subjects[3:], out, **TINY)
    _assert_same_state(ref / "last.pt", out / "last.pt")


def test_preempted_in_process_mid_epoch(subjects, straight, tmp_path):
    """SIGUSR1 during the first epoch: checkpoint inside the epoch, resume gives the same weights."""
    ref, _ = straight
    out = tmp_path / "usr1"
    import mrflesion.learn.data as data_mod

    orig = data_mod.SliceDataset.patches
    calls = {"n": 0}

    def patched(self, plan):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return orig(self, plan)

    data_mod.SliceDataset.patches = patched
    try:
        with pytest.raises(Preempted) as exc:
            train(MSE5, subjects[:3], subjects[3:], out, **TINY)
    finally:
        data_mod.SliceDataset.patches = orig
    assert exc.value.code == PREEMPTED_EXIT_CODE
    ck = load_ckpt(out / "last.pt")
    # the signal came while batch 2 was being gathered: that batch is abandoned, batches 0-1 are in
    assert ck["epochs_done"] == 0 and ck["sampler"]["position"] == 2
    train(MSE5, subjects[:3], subjects[3:], out, **TINY)
    _assert_same_state(ref / "last.pt", out / "last.pt")


def test_learning_reduces_validation_loss(subjects, tmp_path):
    cfg = {**TINY, "epochs": 5, "widths": (8, 16, 32), "bridge": 32, "lr_halve_every": 20}
    cfg["patches_per_slice"] = 16
    s = train(MSE5, subjects[:3], subjects[3:], tmp_path / "learn", **cfg)
    v = [r["val_loss"] for r in s["history"]]
    assert min(v[1:]) <= 0.5 * v[0], v


def test_predict_volume_units_and_variants(subjects, straight, tmp_path):
    out, _ = straight
    pred = predict_volume(out / "best.pt", subjects[3], device="cpu")
    assert set(pred) == {"T1", "T2star", "NAWM", "GM", "lesion"}
    brain = nib.load(subjects[3]["mask"]).get_fdata() > 0.5
    for v in pred.values():
        assert v.shape == SHAPE and v.dtype == np.float32 and np.all(v[~brain] == 0)
    assert pred["T1"][brain].mean() > 100  # ms, not s
    assert pred["T2star"].max() <= 300 and pred["lesion"].min() >= 0 and pred["lesion"].max() <= 1
    # the other kinds of variants train and predict (1 epoch)
    for spec in (
        {"name": "DICE-1", "loss": "dice", "inputs": "mrf", "outputs": ["lesion"]},
        {"name": "MSE-2-1", "loss": "mse", "inputs": ["T1", "T2star"], "outputs": ["lesion"]},
    ):
        d = tmp_path / spec["name"]
        s = train(spec, subjects[:3], subjects[3:], d, **{**TINY, "epochs": 1})
        assert np.isfinite(s["best_val_loss"])
        p = predict_volume(d / "best.pt", subjects[3], device="cpu")
        assert set(p) == {"lesion"} and p["lesion"].shape == SHAPE


def test_sampler_deterministic_and_lesion_weighting(subjects):
    spec = NetworkSpec.from_dict(MSE5)
    data = [load_subject(s, spec) for s in subjects[:2]]
    assert data[0].inputs.shape == (4, 32, 32, 35) and data[0].targets.shape == (4, 32, 32, 5)
    brain = data[0].brain
    assert 0.9 < np.percentile(data[0].inputs.mean(-1)[brain], 99) < 1.1  # robust MRF scale
    ds = SliceDataset(data, patch_size=40)  # larger than the slices: padded
    assert ds.stack.shape[1:3] == (40, 40)
    s1 = PatchSampler(ds, batch_size=8, patches_per_slice=4, seed=1)
    s2 = PatchSampler(ds, batch_size=8, patches_per_slice=4, seed=1)
    assert np.array_equal(s1.plan(3), s2.plan(3)) and not np.array_equal(s1.plan(3), s1.plan(4))
    counts = np.bincount(s1.plan(0)[:, 0], minlength=len(ds))
    assert list(counts) == [4 * (5 if les else 1) for les in ds.has_lesion]
    assert ds.has_lesion.sum() == 4  # slices 1-2 of each subject
    _, x, y = next(iter(s1.batches()))
    assert x.shape == (8, 35, 40, 40) and y.shape == (8, 5, 40, 40)


def test_split_subjects():
    rows = [{"participant_id": f"s1p{i}", "site": "1", "group": "patient"} for i in range(18)]
    rows += [{"participant_id": f"s1c{i}", "site": "1", "group": "control"} for i in range(6)]
    rows += [{"participant_id": f"s2p{i}", "site": "2", "group": "patient"} for i in range(24)]
    table = pd.DataFrame(rows)
    a = split_subjects(table, seed=5)
    assert a == split_subjects(table, seed=5)
    assert a != split_subjects(table, seed=6)
    sets = [set(a[k]) for k in ("train", "val", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(table["participant_id"])
    assert all("p" in s for s in a["test"] + a["val"])  # only patients
    assert sum(s.startswith("s1") for s in a["test"]) == 2 and sum(s.startswith("s2") for s in a["test"]) == 3
    assert sum(s.startswith("s1") for s in a["val"]) == 2 and sum(s.startswith("s2") for s in a["val"]) == 3
    # small cohort: one test, one val per site, at least one patient left for training
    small = pd.DataFrame(
        [{"participant_id": f"{s}-p{i}", "site": s, "group": "patient"} for s in "AB" for i in range(3)]
        + [{"participant_id": "A-hc", "site": "A", "group": "control"}]
    )
    b = split_subjects(small, seed=0)
    assert len(b["test"]) == 2 and len(b["val"]) == 2 and len(b["train"]) == 3 and "A-hc" in b["train"]


def test_weight_average_saved_and_resumed(subjects, tmp_path):
    """``ema``: the moving average (not the raw weights) is validated and saved in best.pt; it is in
    last.pt, so 2 epochs + resume to 3 equals 3 straight."""
    kw = {**TINY, "epochs": 3, "ema": 0.9, "norm": "batch"}
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    train(MSE5, subjects[:3], subjects[3:], straight_dir, **kw)
    last = load_ckpt(straight_dir / "last.pt")
    avg = {k[len("module."):]: v for k, v in last["ema"].items() if k.startswith("module.")}
    assert avg.keys() == last["model"].keys()
    differs = [k for k in avg if avg[k].is_floating_point() and not torch.equal(avg[k], last["model"][k])]
    assert differs  # the average is not the raw weights
    best = load_ckpt(straight_dir / "best.pt")
    if best["epoch"] == 3:
        for k in best["model"]:
            assert torch.equal(best["model"][k], avg[k]), k
    train(MSE5, subjects[:3], subjects[3:], resumed_dir, **{**kw, "epochs": 2})
    train(MSE5, subjects[:3], subjects[3:], resumed_dir, **kw)
    _assert_same_state(straight_dir / "last.pt", resumed_dir / "last.pt")
    again = load_ckpt(resumed_dir / "last.pt")["ema"]
    for k in last["ema"]:
        assert torch.equal(last["ema"][k], again[k]), k
    with pytest.raises(ResumeMismatch):
        train(MSE5, subjects[:3], subjects[3:], resumed_dir, **{**kw, "ema": 0.5, "epochs": 4})
