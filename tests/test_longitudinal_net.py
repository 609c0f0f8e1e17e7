"""The siamese new-lesion network: geometry, shared encoder, losses, resume/preemption, inference and
one small learning test (mrflesion.longitudinal.network/train/infer). CPU only, a few seconds each."""

from __future__ import annotations

import csv
import math
import os
import signal

import numpy as np
import pytest
import torch
from scipy import ndimage

import mrflesion.longitudinal.train as train_mod
from mrflesion.evaluate.lesionwise import lesionwise_metrics
from mrflesion.learn import checkpoint as ckpt_io
from mrflesion.longitudinal.infer import load_model, new_lesion_map, predict_pair
from mrflesion.longitudinal.network import (
    LongitudinalSpec,
    SiameseUNet3D,
    SingleTimepointNet,
    count_parameters,
    divisor_of,
    fit_patch,
    level_strides,
)
from mrflesion.longitudinal.train import (
    HISTORY_COLUMNS,
    PREEMPTED_EXIT_CODE,
    Preempted,
    ResumeMismatch,
    augment_batch,
    extract_patch,
    plan_epoch,
    poly_lr,
    segmentation_loss,
    train_longitudinal,
)

VOXEL_MM = (2.0, 2.0, 3.0)
VOXEL_ML = 0.012


def synth_pair(
    seed: int, shape=(40, 40, 12), n_new: int = 4, n_old: int = 4, contrast: float = 0.6, noise: float = 0.03
) -> dict:
    """A synthetic halfway-space pair: ellipsoid brain, smooth background (median ~1), ``n_old`` bright
    3x3x2 blobs in both time points and ``n_new`` only in the follow-up (the target); independent noise
    per time point. ``old`` marks the blobs present in both."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    c = [(n - 1) / 2 for n in shape]
    r = [0.45 * n for n in shape]
    brain = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1.0
    bg = 1.0 + 3.0 * ndimage.gaussian_filter(rng.normal(size=shape), 4.0)
    cand = np.argwhere(ndimage.binary_erosion(brain, iterations=2))
    centres: list[np.ndarray] = []
    for _ in range(10_000):
        if len(centres) == n_new + n_old:
            break
        p = cand[rng.integers(len(cand))]
        if all(np.abs(p - q)[:2].max() >= 6 or abs(p[2] - q[2]) >= 4 for q in centres):
            centres.append(p)
    else:
        raise ValueError(f"cannot place {n_new + n_old} blobs in {shape}")
    base, fol = bg.copy(), bg.copy()
    target = np.zeros(shape, np.uint8)
    old = np.zeros(shape, np.uint8)
    for i, (a, b, k) in enumerate(centres):
        sl = (slice(a - 1, a + 2), slice(b - 1, b + 2), slice(k, k + 2))
        fol[sl] += contrast
        if i < n_new:
            target[sl] = 1
        else:
            base[sl] += contrast
            old[sl] = 1
    base = (base + noise * rng.normal(size=shape)) * brain
    fol = (fol + noise * rng.normal(size=shape)) * brain
    return {"id": f"p{seed}", "baseline": base.astype(np.float32), "followup": fol.astype(np.float32),
            "brain": brain, "target": target, "voxel_mm": VOXEL_MM, "old": old}


# --------------------------------------------------------------------------------- spec, geometry


def test_spec_defaults_roundtrip_and_refusals():
    s = LongitudinalSpec()
    assert s.widths == (16, 32, 64, 128, 256) and s.patch == (128, 128, 128) and s.deep_supervision
    assert (s.lr, s.lr_power, s.loss, s.threshold, s.min_lesion_ml, s.pretrain_epochs, s.shift_mm) == (
        1e-4, 0.9, "ce", 0.4, 0.01, 0, 2.0)
    t = LongitudinalSpec.from_config({"widths": [4, 8], "patch": [16, 16, 8], "loss": "ce+dice", "epochs": "3"})
    assert t.widths == (4, 8) and t.patch == (16, 16, 8) and t.epochs == 3
    assert LongitudinalSpec.from_config(t.to_dict()) == t and t.selection == "f1"
    with pytest.raises(ValueError, match="unknown"):
        LongitudinalSpec.from_config({"widht": [4, 8]})
    with pytest.raises(ValueError, match="loss"):
        LongitudinalSpec.from_config({"loss": "dice"})


def test_strides_demo_and_paper_patch():
    # demo: 48x48x16 at 2x2x3 mm -> z stops halving at 4 slices
    demo = level_strides((48, 48, 16), 5)
    assert demo == ((2, 2, 2), (2, 2, 2), (2, 2, 1), (1, 1, 1))
    assert divisor_of(demo) == (8, 8, 4)
    # paper: 128^3 -> four isotropic halvings to 8^3
    assert level_strides((128, 128, 128), 5) == ((2, 2, 2),) * 4
    # the default patch clipped to a demo volume keeps the depth the axes allow
    assert fit_patch((128, 128, 128), (120, 120, 24), 5) == (128, 128, 24)
    assert level_strides((128, 128, 24), 5) == ((2, 2, 2), (2, 2, 2), (2, 2, 1), (2, 2, 1))
    assert fit_patch((48, 48, 16), (120, 120, 24), 5) == (48, 48, 16)
    assert fit_patch((45, 48, 16), None, 5) == (48, 48, 16)  # rounded up to keep its halvings
    m = SiameseUNet3D((4, 8, 16, 32, 64), demo)
    with torch.no_grad():
        out = m(torch.zeros(1, 1, 48, 48, 16), torch.zeros(1, 1, 48, 48, 16))
    assert out["logits"].shape == (1, 2, 48, 48, 16)
    assert [tuple(a.shape) for a in out["aux"]] == [(1, 2, 24, 24, 8), (1, 2, 12, 12, 4)]
    assert m.output_scales() == [(1, 1, 1), (2, 2, 2), (4, 4, 4)]
    # paper-size network: default widths built (no forward), a tiny-width forward at 128^3
    big = SiameseUNet3D.from_spec(LongitudinalSpec())
    assert big.divisor == (16, 16, 16) and 5e6 < count_parameters(big) < 5e7
    tiny = SiameseUNet3D((2, 2, 2, 2, 2), level_strides((128, 128, 128), 5), aux_levels=2)
    with torch.no_grad():
        out = tiny(torch.zeros(1, 1, 128, 128, 128), torch.zeros(1, 1, 128, 128, 128))
    assert out["logits"].shape == (1, 2, 128, 128, 128)
    assert [tuple(a.shape[2:]) for a in out["aux"]] == [(64, 64, 64), (32, 32, 32)]


def test_encoder_weights_are_shared():
    torch.manual_seed(0)
    m = SiameseUNet3D((4, 8, 16), level_strides((16, 16, 8), 3)).eval()
    # one parameter set: encoder + decoder, nothing per time point
    n_enc = count_parameters(m.encoder)
    assert count_parameters(m) == n_enc + count_parameters(m.decoder)
    assert m.encoder.levels[0][0].conv1.in_channels == 1
    # the decoder's first skip holds both time points: 2C channels
    assert m.decoder.blocks[0][0].conv1.in_channels == 4 + 2 * 4
    calls: list[torch.Tensor] = []
    h = m.encoder.register_forward_hook(lambda mod, i, o: calls.append([f.detach() for f in o]))
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 1, 16, 16, 8, generator=g)
    b = torch.rand(2, 1, 16, 16, 8, generator=g)
    with torch.no_grad():
        same = m(a, a)
        ab = m(a, b)["logits"]
        ba = m(b, a)["logits"]
    h.remove()
    # the encoder runs once per forward on both time points (batch 2N) ...
    assert len(calls) == 3 and calls[0][0].shape[0] == 4
    # ... and gives the same features to the same image in either branch
    for f in calls[0]:
        assert torch.equal(f[:2], f[2:])
    with torch.no_grad():
        for f, g_ in zip(calls[1], m.encode(b), strict=True):  # follow-up branch == encode(b)
            assert torch.allclose(f[2:], g_, atol=1e-5)
    assert same["logits"].shape == (2, 2, 16, 16, 8)
    assert not torch.allclose(ab, ba, atol=1e-4)  # order matters: baseline vs follow-up
    # pre-training net: the same encoder modules
    single = SingleTimepointNet(m)
    assert single.encoder is m.encoder
    assert single(a)["logits"].shape == (2, 2, 16, 16, 8)


def test_deep_supervision_loss_weights_and_target_pooling():
    torch.manual_seed(0)
    strides = level_strides((16, 16, 8), 4)  # (2,2,2), (2,2,1), (1,1,1)
    m = SiameseUNet3D((2, 4, 8, 8), strides, aux_levels=2)
    assert [tuple(s) for s in m.output_scales()] == [(1, 1, 1), (2, 2, 2), (4, 4, 2)]
    assert len(SiameseUNet3D((2, 4, 8, 8), strides, deep_supervision=False).decoder.aux_heads) == 0
    x = torch.rand(2, 1, 16, 16, 8)
    out = m(x, x)
    assert [tuple(a.shape[2:]) for a in out["aux"]] == [(8, 8, 4), (4, 4, 4)]
    tgt = torch.zeros(2, 16, 16, 8, dtype=torch.int64)
    tgt[0, 5, 6, 3] = 1
    t1 = torch.zeros(2, 8, 8, 4, dtype=torch.int64)
    t1[0, 2, 3, 1] = 1
    t2 = torch.zeros(2, 4, 4, 4, dtype=torch.int64)
    t2[0, 1, 1, 1] = 1
    F = torch.nn.functional
    expect = (F.cross_entropy(out["logits"], tgt) + 0.5 * F.cross_entropy(out["aux"][0], t1)
              + 0.25 * F.cross_entropy(out["aux"][1], t2)) / 1.75
    assert torch.allclose(segmentation_loss(out, tgt, "ce"), expect, rtol=1e-6)
    assert segmentation_loss(out, tgt, "ce+dice") > segmentation_loss(out, tgt, "ce")
    assert torch.allclose(segmentation_loss({"logits": out["logits"]}, tgt), F.cross_entropy(out["logits"], tgt))


def test_poly_learning_rate():
    assert poly_lr(1e-4, 0, 10) == 1e-4
    assert math.isclose(poly_lr(1e-4, 5, 10), 1e-4 * 0.5**0.9)
    assert math.isclose(poly_lr(1e-4, 9, 10, 0.9), 1e-4 * 0.1**0.9)
    assert poly_lr(1e-4, 3, 10) > poly_lr(1e-4, 4, 10) > 0


def test_patch_plan_and_augmentation():
    p = train_mod.as_pair(synth_pair(3, shape=(24, 24, 8), n_new=2, n_old=1))
    idx = [train_mod._index(p)]
    patch = (16, 16, 8)
    a = plan_epoch(idx, 40, patch, 0.5, seed=1, epoch=2)
    assert np.array_equal(a, plan_epoch(idx, 40, patch, 0.5, seed=1, epoch=2))  # pure in (seed, epoch)
    assert not np.array_equal(a, plan_epoch(idx, 40, patch, 0.5, seed=1, epoch=3))
    fg = [extract_patch(p.target, r[1:], patch).any() for r in plan_epoch(idx, 200, patch, 1.0, 1, 0)]
    assert all(fg)  # foreground patches contain their target voxel
    assert np.all(a[:, 1:] + np.array(patch) <= np.array(p.shape))
    small = extract_patch(np.ones((4, 5, 6), np.float32), (0, 0, 0), (8, 8, 8))
    assert small.shape == (8, 8, 8) and small.sum() == 4 * 5 * 6
    # the shift moves the baseline only; flips move everything alike; seeded
    base, fol, brain, tgt, vox = train_mod._batch_arrays([p], a[:4], patch)
    only_shift = LongitudinalSpec(flip=False, noise_std=0.0, bias_field=0.0, shift_mm=2.0)
    b2, f2, t2 = augment_batch(base, fol, brain, tgt, vox, only_shift, np.random.default_rng(0))
    assert torch.equal(f2, fol) and torch.equal(t2, tgt) and not torch.equal(b2, base)
    assert float((b2 - base).abs().max()) < 3.0
    only_flip = LongitudinalSpec(flip=True, noise_std=0.0, bias_field=0.0, shift_mm=0.0)
    b3, f3, t3 = augment_batch(base, fol, brain, tgt, vox, only_flip, np.random.default_rng(5))
    flipped = [i for i in range(4) if not torch.equal(f3[i], fol[i])]
    assert flipped and all(torch.equal(f3[i], fol[i].flip(1)) and torch.equal(b3[i], base[i].flip(1))
                           and torch.equal(t3[i], tgt[i].flip(0)) for i in flipped)
    full = LongitudinalSpec()
    r1 = augment_batch(base, fol, brain, tgt, vox, full, np.random.default_rng(7))
    r2 = augment_batch(base, fol, brain, tgt, vox, full, np.random.default_rng(7))
    assert all(torch.equal(u, v) for u, v in zip(r1, r2, strict=True))
    no_flip = LongitudinalSpec(flip=False)
    b4, f4, _ = augment_batch(base, fol, brain, tgt, vox, no_flip, np.random.default_rng(7))
    outside = brain == 0
    assert torch.all(b4[outside] == 0) and torch.all(f4[outside] == 0)  # still 0 outside the brain
    assert not torch.equal(f4, fol) and float((f4 - fol)[~outside].abs().mean()) < 0.2  # bias + noise


# ------------------------------------------------------------------------------ resume, preemption

TINY = {
    "widths": [4, 8], "blocks": 1, "patch": [16, 16, 8], "epochs": 3, "batch_size": 2, "patches_per_epoch": 6,
    "lr": 1e-3, "seed": 3, "aux_levels": 1,
}


@pytest.fixture(scope="module")
def tiny_data():
    return [synth_pair(s, shape=(20, 20, 8), n_new=1, n_old=1) for s in (31, 32, 33)]


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    summary = train_longitudinal(tiny_data[:2], tiny_data[2:], TINY, out, threads=2, progress=False)
    return out, summary


def _assert_same_state(a, b):
    ca, cb = ckpt_io.load(a), ckpt_io.load(b)
    assert ca["epochs_done"] == cb["epochs_done"] and ca["position"] == cb["position"] == 0
    for k in ca["model"]:
        assert torch.equal(ca["model"][k], cb["model"][k]), k
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) and torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"])
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in ca["history"]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in cb["history"]]
    assert ca["best"] == cb["best"]


def test_straight_run_outputs(straight):
    out, s = straight
    assert s["epochs_completed"] == 3 and (out / "best.pt").exists() and (out / "last.pt").exists()
    with open(out / "history.tsv") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert tuple(rows[0]) == HISTORY_COLUMNS and len(rows) == 3
    assert [float(r["lr"]) for r in rows] == pytest.approx([poly_lr(1e-3, e, 3) for e in range(3)])
    assert all(np.isfinite(float(r["val_loss"])) for r in rows)
    best = ckpt_io.load(out / "best.pt")
    f1 = [float(r["val_f1"]) for r in rows]
    assert best["epoch"] == s["best_epoch"] and f1[best["epoch"] - 1] == max(f1)
    model, spec, meta = load_model(out / "best.pt")
    assert spec == LongitudinalSpec.from_config(TINY) and meta["patch"] == (16, 16, 8)
    assert meta["epoch"] == best["epoch"] and "val_f1" in meta["validation"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, best["model"][k])


def test_resume_is_bit_identical(straight, tiny_data, tmp_path):
    ref, _ = straight
    out = tmp_path / "split"
    s = train_longitudinal(tiny_data[:2], tiny_data[2:], TINY, out, threads=2, progress=False, until_epoch=2)
    assert s["epochs_completed"] == 2
    s = train_longitudinal(tiny_data[:2], tiny_data[2:], TINY, out, threads=2, progress=False)
    assert s["epochs_completed"] == 3
    _assert_same_state(ref / "last.pt", out / "last.pt")
    # other settings on the same folder are refused
    with pytest.raises(ResumeMismatch, match="spec.lr"):
        train_longitudinal(tiny_data[:2], tiny_data[2:], {**TINY, "lr": 2e-3}, out, threads=2, progress=False)


def test_preemption_saves_and_resumes(straight, tiny_data, tmp_path, monkeypatch):
    ref, _ = straight
    out = tmp_path / "preempted"
    orig = train_mod._batch_arrays
    calls = {"n": 0}

    def patched(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # SIGTERM while batch 1 of epoch 1 is being built: it is finished first
            os.kill(os.getpid(), signal.SIGTERM)
        return orig(*a, **k)

    monkeypatch.setattr(train_mod, "_batch_arrays", patched)
    with pytest.raises(Preempted) as exc:
        train_longitudinal(tiny_data[:2], tiny_data[2:], TINY, out, threads=2, progress=False)
    assert exc.value.code == PREEMPTED_EXIT_CODE == 75
    ck = ckpt_io.load(out / "last.pt")
    assert ck["epochs_done"] == 0 and ck["position"] == 2
    monkeypatch.setattr(train_mod, "_batch_arrays", orig)
    train_longitudinal(tiny_data[:2], tiny_data[2:], TINY, out, threads=2, progress=False)
    _assert_same_state(ref / "last.pt", out / "last.pt")


def test_pretraining_trains_the_shared_encoder(tiny_data, tmp_path):
    cfg = {**TINY, "epochs": 1, "pretrain_epochs": 1}
    vols = [{"id": f"v{i}", "image": p["followup"], "brain": p["brain"], "target": p["target"] | p["old"],
             "voxel_mm": VOXEL_MM} for i, p in enumerate(tiny_data)]
    with pytest.raises(ValueError, match="pretrain_volumes"):
        train_longitudinal(tiny_data[:2], [], cfg, tmp_path / "x", progress=False)
    a = train_longitudinal(tiny_data[:2], [], cfg, tmp_path / "pre", threads=2, progress=False,
                           pretrain_volumes=vols)
    b = train_longitudinal(tiny_data[:2], [], {**cfg, "pretrain_epochs": 0}, tmp_path / "nopre", threads=2,
                           progress=False)
    assert [r["phase"] for r in a["history"]] == ["pretrain", "main"] and a["pretrain_epochs_completed"] == 1
    ma, mb = ckpt_io.load(a["best_path"])["model"], ckpt_io.load(b["best_path"])["model"]
    assert not torch.equal(ma["encoder.levels.0.0.conv1.weight"], mb["encoder.levels.0.0.conv1.weight"])
    assert a["best_epoch"] == 1 == b["best_epoch"]  # no validation pairs: the last epoch


# ---------------------------------------------------------------------------------------- inference


class _Pointwise(torch.nn.Module):
    """Stand-in network whose foreground logit is a voxel-wise function, scale · (follow-up − baseline)
    + offset, so any correct window tiling must reproduce it exactly."""

    divisor = (4, 4, 2)

    def __init__(self, scale: float = 8.0, offset: float = -1.0) -> None:
        super().__init__()
        self.scale, self.offset = scale, offset

    def forward(self, b: torch.Tensor, f: torch.Tensor) -> dict:
        return {"logits": torch.cat([torch.zeros_like(f), self.scale * (f - b) + self.offset], dim=1)}


def test_sliding_window_tiling_and_range():
    p = synth_pair(5, shape=(30, 26, 10), n_new=2, n_old=2)
    expect = (1.0 / (1.0 + np.exp(-(8.0 * (p["followup"] - p["baseline"]) - 1.0)))) * p["brain"]
    for weighting in ("gaussian", "uniform"):
        for patch, overlap in (((16, 12, 4), 0.5), ((8, 8, 4), 0.25), ((64, 64, 64), 0.5)):
            prob = predict_pair(_Pointwise(), p["baseline"], p["followup"], p["brain"], patch, overlap,
                                weighting=weighting)
            assert prob.shape == p["brain"].shape and prob.dtype == np.float32
            np.testing.assert_allclose(prob, expect, atol=2e-6)


def test_single_window_equals_one_pass_and_is_masked():
    torch.manual_seed(0)
    m = SiameseUNet3D((4, 8, 16), level_strides((16, 16, 8), 3)).eval()  # divisor (4, 4, 4)
    p = synth_pair(6, shape=(18, 14, 7), n_new=1, n_old=1)
    prob = predict_pair(m, p["baseline"], p["followup"], p["brain"], (32, 32, 32), 0.5)
    pad = [(0, 20 - 18), (0, 16 - 14), (0, 8 - 7)]

    def t(a):
        return torch.from_numpy(np.pad(a, pad))[None, None]

    with torch.no_grad():
        one = torch.softmax(m(t(p["baseline"]), t(p["followup"]))["logits"], 1)[0, 1, :18, :14, :7].numpy()
    np.testing.assert_allclose(prob, one * p["brain"], atol=1e-6)
    assert prob.min() >= 0 and prob.max() <= 1 and np.all(prob[~p["brain"]] == 0)
    # sliding windows (smaller patch) on a real network: still a probability, zero outside the brain
    slid = predict_pair(m, p["baseline"], p["followup"], p["brain"], (8, 8, 4), 0.5)
    assert slid.min() >= 0 and slid.max() <= 1 and np.all(slid[~p["brain"]] == 0) and slid[p["brain"]].max() > 0


def test_validation_scores_and_the_oversized_component():
    pairs = [train_mod.as_pair(synth_pair(s)) for s in (40, 41)]
    spec = LongitudinalSpec()
    # a clean subtraction detector: every new blob, no old one, nothing else
    v = train_mod.validate(_Pointwise(40.0, -10.0), pairs, spec, (24, 24, 8), torch.device("cpu"))
    assert (v["val_sensitivity"], v["val_fp_per_case"], v["val_f1"], v["val_msseg_f1"]) == (1.0, 0.0, 1.0, 1.0)
    assert v["val_loss"] < 0.05
    # "everything is new": one brain-sized component -> rule A F1 = 1 (the reason for selection:
    # msseg_f1), rule B F1 = 0, and a high validation loss
    everything = train_mod.validate(_Pointwise(0.0, 5.0), pairs, spec, (24, 24, 8), torch.device("cpu"))
    assert everything["val_f1"] == 1.0 and everything["val_msseg_f1"] == 0.0
    assert everything["val_loss"] > 10 * v["val_loss"]
    nothing = train_mod.validate(_Pointwise(0.0, -5.0), pairs, spec, (24, 24, 8), torch.device("cpu"))
    assert nothing["val_f1"] == 0.0 == nothing["val_sensitivity"] and nothing["val_fp_per_case"] == 0


def test_new_lesion_map_operating_point():
    prob = np.zeros((12, 12, 6), np.float32)
    prob[2:5, 2:5, 1:3] = 0.9  # 18 voxels = 0.216 ml
    prob[9, 9, 4] = 0.95  # one voxel = 0.012 ml
    prob[7, 2, 2] = 0.3  # below the threshold
    m = new_lesion_map(prob, VOXEL_MM, 0.4, 0.02)
    assert m.dtype == np.uint8 and m.sum() == 18 and m[9, 9, 4] == 0
    assert new_lesion_map(prob, VOXEL_MM, 0.4, 0.01).sum() == 19
    assert new_lesion_map(prob, VOXEL_MM, 0.25, 0.0).sum() == 20


# ------------------------------------------------------------------------------------------ learning


def _detects(model, spec, patch, pairs) -> dict:
    """Pooled detection on test pairs: new blobs found, false-positive components, old blobs hit, Dice."""
    n_ref = tp = fp = old_hit = n_old = inter = total = 0
    for q in pairs:
        prob = predict_pair(model, q["baseline"], q["followup"], q["brain"], patch)
        b = new_lesion_map(prob, VOXEL_MM, spec.threshold, spec.min_lesion_ml)
        m = lesionwise_metrics(b, q["target"], VOXEL_ML, spec.min_lesion_ml)
        n_ref, tp, fp = n_ref + m["n_ref"], tp + m["tp"], fp + m["fp"]
        o = lesionwise_metrics(b, q["old"], VOXEL_ML, spec.min_lesion_ml)
        old_hit, n_old = old_hit + o["tp"], n_old + o["n_ref"]
        inter += int((b & q["target"]).sum())
        total += int(b.sum() + q["target"].sum())
    return {"sensitivity": tp / n_ref, "fp": fp, "n_new": n_ref, "old_hit": old_hit, "n_old": n_old,
            "dice": 2 * inter / max(total, 1)}


def _passes(r: dict) -> bool:
    # most new blobs found, fewer false components than new blobs, old blobs (in both time points)
    # mostly left alone, and not by marking everything (voxel Dice)
    return r["sensitivity"] >= 0.75 and r["fp"] < r["n_new"] / 2 and r["old_hit"] <= r["n_old"] / 4 \
        and r["dice"] >= 0.5


def test_learns_new_blobs_not_old_ones(tmp_path):
    # 20 epochs of 8 batches (~10 s on 2 idle cores); measured: 8 of 8 seeds pass with sensitivity 1, no
    # false positive, no old blob hit and Dice >= 0.99; 12 epochs failed 1 seed of 6, untrained 0 of 8
    cfg = {"widths": [4, 8, 16], "patch": [24, 24, 8], "epochs": 20, "batch_size": 4, "patches_per_epoch": 32,
           "lr": 1e-2, "loss": "ce+dice", "foreground_fraction": 0.8, "seed": 0, "validate_every": 5}
    tr = [synth_pair(s) for s in range(1, 5)]
    test = [synth_pair(s) for s in (20, 21)]
    spec = LongitudinalSpec.from_config(cfg)
    torch.manual_seed(0)
    untrained = SiameseUNet3D.from_spec(spec).eval()
    r0 = _detects(untrained, spec, spec.patch, test)
    assert not _passes(r0), r0  # the criterion can fail
    s = train_longitudinal(tr, [synth_pair(10)], cfg, tmp_path / "learn", threads=2, progress=False)
    model, spec, meta = load_model(s["best_path"])
    r = _detects(model, spec, meta["patch"], test)
    assert _passes(r), (r, s["history"])
