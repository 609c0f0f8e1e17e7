"""The lesion training recipe: lesion-aware sampling, augmentation, normalisation layers, the multi-task
loss and the validation-chosen threshold (small synthetic subjects from test_learn_train)."""

import numpy as np
import pytest
import torch
from test_learn_train import MSE5, TINY, subjects  # noqa: F401 - the fixture

from mrflesion.learn.checkpoint import load as load_ckpt
from mrflesion.learn.data import Augmentation, PatchSampler, SliceDataset, augment_batch, load_subject
from mrflesion.learn.infer import load_model, predict_volume
from mrflesion.learn.losses import MultiTaskLoss, make_loss
from mrflesion.learn.networks import NetworkSpec, UNet
from mrflesion.learn.train import choose_threshold, train

MTL5 = {"name": "MTL-5", "loss": "multitask", "inputs": "mrf", "outputs": ["T1", "T2star", "NAWM", "GM", "lesion"],
        "norm": "batch", "lesion_share": 0.5, "augment": True}


@pytest.fixture(scope="module")
def dataset(subjects):  # noqa: F811
    spec = NetworkSpec.from_dict(MSE5)
    return SliceDataset([load_subject(s, spec) for s in subjects[:3]], patch_size=16)


def test_lesion_share_per_batch(dataset) -> None:
    sampler = PatchSampler(dataset, batch_size=16, patches_per_slice=6, lesion_factor=1, seed=3, lesion_share=0.5)
    assert sampler.lesion_per_batch() == 8
    plan = sampler.plan(0)
    c = dataset.n_in + dataset.n_out - 1  # lesion target channel
    centred, other = [], []
    for b in range(sampler.n_batches()):
        rows = plan[b * 16:(b + 1) * 16]
        _, y = dataset.patches(rows)
        # the first 8 patches of every batch are centred (within a quarter patch) on a lesion voxel
        centre = dataset.stack[rows[:8, 0], rows[:8, 1] + 8, rows[:8, 2] + 8, c]
        near = [bool(dataset.stack[r, max(0, y0 + 4):y0 + 13, max(0, x0 + 4):x0 + 13, c].max() > 0.5)
                for r, y0, x0 in rows[:8]]
        assert all(near), (b, centre)
        centred.append(y[:8, -1].flatten())
        other.append(y[8:, -1].flatten())
    assert float(torch.cat(centred).mean()) > 2 * float(torch.cat(other).mean())
    # deterministic per (seed, epoch); lesion_share 0 leaves the paper's random plan untouched
    again = PatchSampler(dataset, 16, 6, 1, 3, 0.5)
    assert np.array_equal(again.plan(0), plan) and not np.array_equal(again.plan(1), plan)
    plain = PatchSampler(dataset, 16, 6, 1, 3, 0.0).plan(0)
    mixed_rows = np.concatenate([np.arange(s, min(s + 8, len(plan))) for s in range(0, len(plan), 16)])
    rest = np.setdiff1d(np.arange(len(plan)), mixed_rows)
    assert np.array_equal(plain[rest], plan[rest])
    with pytest.raises(ValueError, match="lesion_share"):
        PatchSampler(dataset, 16, 6, 1, 3, 1.5)


def test_lesions_drawn_equally_whatever_their_size(dataset) -> None:
    pts, w = dataset.lesion_points, dataset.lesion_weights
    assert len(pts) and np.isclose(w.sum(), 1.0)
    # every subject's lesion (one per synthetic subject) gets the same total weight
    subj = dataset.subject_index[pts[:, 0]]
    totals = np.bincount(subj, weights=w)
    assert np.allclose(totals[totals > 0], 1.0 / np.count_nonzero(totals))


def test_augmentation_moves_inputs_and_targets_together() -> None:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((8, 3, 16, 16), dtype=np.float32))
    y = x[:, :1].clone()  # a target equal to the first input channel
    aug = Augmentation(enabled=True, scale=0.0, noise=0.0)
    xa, ya = augment_batch(x, y, aug, torch.Generator().manual_seed(5))
    assert torch.allclose(xa[:, :1], ya, atol=1e-6)  # same flips and rotation
    assert not torch.allclose(xa, x)
    xb, yb = augment_batch(x, y, aug, torch.Generator().manual_seed(5))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # intensity changes touch the inputs only, and not when disabled or for map inputs
    full = Augmentation(enabled=True, flip=False, rotate_deg=0.0, scale=0.1, noise=0.0)
    xs, ys = augment_batch(x, y, full, torch.Generator().manual_seed(1))
    assert torch.equal(ys, y) and not torch.equal(xs, x)
    ratio = xs / x
    assert torch.allclose(ratio, ratio[:, :1, :1, :1].expand_as(ratio), rtol=1e-5)
    assert float((ratio - 1).abs().max()) <= 0.1 + 1e-6
    xn, _ = augment_batch(x, y, full, torch.Generator().manual_seed(1), intensity=False)
    assert torch.equal(xn, x)
    assert augment_batch(x, y, Augmentation(enabled=False), torch.Generator())[0] is x
    assert Augmentation.from_config({"noise": 0.05}) == Augmentation(enabled=True, noise=0.05)


@pytest.mark.parametrize("norm", ["none", "batch", "instance"])
def test_norm_layers_and_sigmoid_channels(norm: str) -> None:
    net = UNet(5, 3, (4, 8), 8, 0.0, norm=norm, sigmoid_channels=[1, 2])
    x = torch.randn(2, 5, 16, 16)
    raw = net(x, logits=True)
    out = net(x)
    assert torch.equal(out[:, 0], raw[:, 0])
    assert torch.allclose(out[:, 1:], torch.sigmoid(raw[:, 1:]))
    kinds = {type(m).__name__ for m in net.modules()}
    assert ("BatchNorm2d" in kinds) == (norm == "batch") and ("InstanceNorm2d" in kinds) == (norm == "instance")
    with pytest.raises(ValueError, match="norm"):
        UNet(5, 3, norm="group")


def test_spec_options() -> None:
    spec = NetworkSpec.from_dict(MTL5)
    assert spec.sigmoid_channels == (2, 3, 4) and spec.extra["lesion_share"] == 0.5
    assert NetworkSpec.from_dict({**MSE5, "loss": "dice", "outputs": ["lesion"]}).sigmoid_channels == (0,)
    assert NetworkSpec.from_dict(MSE5).sigmoid_channels == ()
    with pytest.raises(ValueError, match="unknown network options"):
        NetworkSpec.from_dict({**MTL5, "lesion_shar": 0.5})


def test_multitask_loss_terms() -> None:
    loss = make_loss("multitask", ["T1", "lesion"])
    assert isinstance(loss, MultiTaskLoss) and loss.wants_logits
    logits = torch.tensor([[[[0.3, -2.0]], [[2.0, -1.0]]]])  # (1, 2, 1, 2): T1 values, lesion logits
    target = torch.tensor([[[[0.5, -1.0]], [[1.0, 0.0]]]])
    v = loss.per_channel(logits, target)
    e = logits[0, 0] - target[0, 0]
    assert float(v[0]) == pytest.approx(float(torch.log(torch.cosh(e)).mean()), rel=1e-6)
    p = torch.sigmoid(logits[0, 1])
    bce = -(torch.log(p[0, 0]) + torch.log(1 - p[0, 1])) / 2
    dice = 1 - (2 * p[0, 0] + 1) / (p.sum() + 1 + 1)  # smoothing 1
    assert float(v[1]) == pytest.approx(float(bce + dice), rel=1e-6)
    # additive statistics: two halves give the whole
    both = loss.stats(logits[..., :1], target[..., :1]) + loss.stats(logits[..., 1:], target[..., 1:])
    assert torch.allclose(loss.from_stats(both), v)
    with pytest.raises(ValueError, match="output names"):
        make_loss("multitask")


def test_choose_threshold_maximises_pooled_dice(subjects) -> None:  # noqa: F811
    """A 'network' whose lesion output is a known map: the chosen threshold is the one whose binarised
    map has the best pooled Dice over the subjects, computed here directly."""
    spec = NetworkSpec.from_dict({**MSE5, "loss": "dice", "outputs": ["lesion"]})
    data = [load_subject(s, spec) for s in subjects]

    class Known(torch.nn.Module):
        out_channels = 1

        def forward(self, x, logits=False):  # lesion probability = a smooth function of the first input
            return torch.clamp(x[:, :1] * 3.0, 0, 1)

    model = Known()
    model.divisor = 1
    got = choose_threshold(model, data, spec, torch.device("cpu"))
    best = (-1.0, None)
    for t in np.round(np.arange(1, 100) / 100, 2):
        tp = n = 0
        for s in data:
            p = np.clip(s.inputs[..., 0] * 3.0, 0, 1)[s.brain] >= t
            r = s.lesion[s.brain]
            tp += np.sum(p & r)
            n += p.sum() + r.sum()
        d = 2 * tp / n
        if d > best[0] + 1e-12:
            best = (d, t)
    assert got["dice"] == pytest.approx(best[0], abs=1e-12)
    assert abs(got["threshold"] - best[1]) < 1e-9 or got["dice"] == pytest.approx(best[0])
    assert choose_threshold(model, data, NetworkSpec.from_dict(MSE5 | {"outputs": ["T1"]}),
                            torch.device("cpu")) is None


def test_recipe_trains_resumes_and_records_threshold(subjects, tmp_path) -> None:  # noqa: F811
    kw = {**TINY, "epochs": 3}
    summary = train(MTL5, subjects[:3], subjects[3:], tmp_path / "a", **kw, lesion_share=0.5, augment=True,
                    norm="batch")
    best = load_ckpt(tmp_path / "a" / "best.pt")
    assert best["model_config"]["norm"] == "batch"
    assert summary["lesion_threshold"] == best["lesion_threshold"]
    assert 0.0 < best["lesion_threshold"]["threshold"] < 1.0
    model, spec, _ = load_model(best)
    assert model.sigmoid_channels == (2, 3, 4) and spec.loss == "multitask"
    out = predict_volume(tmp_path / "a" / "best.pt", subjects[3], device="cpu")
    for k in ("NAWM", "GM", "lesion"):
        assert out[k].min() >= 0 and out[k].max() <= 1
    # interrupted after 2 epochs and resumed: the same weights as 3 straight (augmentation and
    # lesion patches are seeded by (seed, epoch, batch))
    train(MTL5, subjects[:3], subjects[3:], tmp_path / "b", **{**kw, "epochs": 2}, lesion_share=0.5,
          augment=True, norm="batch")
    train(MTL5, subjects[:3], subjects[3:], tmp_path / "b", **kw, lesion_share=0.5, augment=True, norm="batch")
    a, b = load_ckpt(tmp_path / "a" / "last.pt"), load_ckpt(tmp_path / "b" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_operating_point_drops_small_false_positives() -> None:
    """Validation subjects with true lesions found and small spurious components: the pooled-Dice
    threshold, then the minimum lesion size that removes the spurious components (better lesion-wise
    F1), never one that removes true lesions."""
    from mrflesion.evaluate import choose_operating_point, lesionwise_metrics

    cases = []
    rng = np.random.default_rng(0)
    for _ in range(2):
        prob = np.zeros((30, 30, 10), np.float32)
        ref = np.zeros(prob.shape, bool)
        ref[5:10, 5:10, 2:5] = True  # 75 voxels
        prob[ref] = 0.9
        for _ in range(4):  # single-voxel false positives
            x, y, z = rng.integers(15, 29, 3) % np.array([30, 30, 10])
            prob[x, y, z] = 0.95  # above the lesions: no threshold keeps the lesions without them
        cases.append((prob, ref, 0.012))
    got = choose_operating_point(cases)
    assert got["threshold"] <= 0.9 and got["dice"] == pytest.approx(2 * 150 / (2 * 150 + 8))
    assert got["min_lesion_ml"] == 0.025  # the smallest size that removes one-voxel (0.012 ml) components
    p, r, v = cases[0]
    from mrflesion.evaluate import lesion_mask

    assert lesionwise_metrics(lesion_mask(p, got["threshold"], v, got["min_lesion_ml"]), r, v)["fp"] == 0
    assert got["f1"] == 1.0
    assert choose_operating_point([(np.zeros((4, 4, 4)), np.zeros((4, 4, 4), bool), 0.01)]) is None


def test_threshold_near_ties_go_to_one_half() -> None:
    """A pooled validation Dice that beats the one at 0.5 by less than the tolerance is noise: the
    threshold stays at 0.5; a clearly better one is taken."""
    from mrflesion.evaluate import best_pooled_threshold

    thr = np.array([0.3, 0.5, 0.9])
    ref = 100
    # |P|, |TP|, |R| per threshold; Dice 0.80, 0.80, 0.805 -> near tie; then 0.80, 0.80, 0.90
    near = np.array([[100, 80, ref], [100, 80, ref], [100, 80.5, ref]])
    assert best_pooled_threshold(near, thr)["threshold"] == 0.9  # exact maximum without tolerance
    assert best_pooled_threshold(near, thr, tolerance=0.01)["threshold"] == 0.5
    clear = np.array([[100, 80, ref], [100, 80, ref], [100, 90, ref]])
    got = best_pooled_threshold(clear, thr, tolerance=0.01)
    assert got["threshold"] == 0.9 and got["dice"] == pytest.approx(0.9)


def test_measurement_scaling_removes_per_measurement_gains() -> None:
    """``mrf_scaling: measurement`` divides each measurement by its brain median: a series whose
    measurements carry different gains (another site's timing changes every measurement's level)
    becomes the same network input; the subject scaling keeps the gains."""
    from mrflesion.learn.data import Normalisation

    rng = np.random.default_rng(0)
    shape, n = (12, 10, 4), 35
    brain = np.zeros(shape, bool)
    brain[2:10, 2:8, :] = True
    mrf = (rng.uniform(0.5, 1.5, shape + (n,)) * brain[..., None]).astype(np.float32)
    gains = rng.uniform(0.3, 3.0, n).astype(np.float32)
    per_meas, subject = Normalisation(mrf_scaling="measurement"), Normalisation()
    a = mrf / per_meas.mrf_divisor(mrf, brain)
    b = (mrf * gains) / per_meas.mrf_divisor(mrf * gains, brain)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.median(a[brain], axis=0), 1.0, rtol=1e-6)
    c = (mrf * gains) / subject.mrf_divisor(mrf * gains, brain)
    assert not np.allclose(a / a[brain].mean(), c / c[brain].mean(), rtol=1e-2)
    assert Normalisation.from_dict(per_meas.to_dict()) == per_meas
    with pytest.raises(ValueError, match="mrf_scaling"):
        Normalisation(mrf_scaling="site")


def test_measurement_scaling_is_recorded_in_the_checkpoint(subjects, tmp_path) -> None:  # noqa: F811
    res = train(MTL5, subjects[:2], subjects[2:3], tmp_path, **{**TINY, "epochs": 1}, mrf_scaling="measurement")
    ck = load_ckpt(res["best_path"])
    assert ck["normalisation"]["mrf_scaling"] == "measurement"
    _, _, norm = load_model(ck)
    assert norm.mrf_scaling == "measurement"


def _with_priors(subject: dict[str, str], root) -> dict[str, str]:
    """The subject with GM/WM/CSF priors: smooth versions of its GM and NAWM maps (one value above 1 and
    one NaN, which the loader clips and zeroes)."""
    import nibabel as nib
    from scipy import ndimage

    gm_img = nib.load(subject["GM"])
    gm = ndimage.gaussian_filter(np.asarray(gm_img.dataobj, np.float32), 1.5)
    wm = ndimage.gaussian_filter(np.asarray(nib.load(subject["NAWM"]).dataobj, np.float32), 1.5)
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    gm[0, 0, 0], wm[0, 0, 1] = 1.7, np.nan
    out = dict(subject)
    for k, arr in {"GMprior": gm, "WMprior": wm, "CSFprior": csf}.items():
        p = root / f"{subject['subject']}_{k}.nii.gz"
        nib.save(nib.Nifti1Image(arr, gm_img.affine), p)
        out[k] = str(p)
    return out


def test_tissue_priors_are_input_channels(subjects, tmp_path) -> None:  # noqa: F811
    """``priors: true`` adds the GM, WM and CSF priors after the MRF series (as they are, 0-1), through
    loading, training, the checkpoint and inference; a network without them is unchanged."""
    from mrflesion.learn.spec import PRIOR_NAMES
    from mrflesion.plan.training import needed_images

    subs = [_with_priors(s, tmp_path) for s in subjects]
    spec = NetworkSpec.from_dict({**MTL5, "priors": True})
    plain = NetworkSpec.from_dict(MTL5)
    assert spec.input_images == ("mrf", *PRIOR_NAMES) and plain.input_images == ("mrf",)
    assert "priors" not in plain.to_dict() and NetworkSpec.from_dict(spec.to_dict()) == spec
    assert set(PRIOR_NAMES) <= set(needed_images(spec.to_dict()))
    assert not set(PRIOR_NAMES) & set(needed_images(plain.to_dict()))
    with_p, without = load_subject(subs[0], spec), load_subject(subs[0], plain)
    n = without.inputs.shape[-1]
    assert with_p.inputs.shape[-1] == n + 3
    assert np.array_equal(with_p.inputs[..., :n], without.inputs)
    pri = with_p.inputs[..., n:]
    assert pri.min() >= 0.0 and pri.max() <= 1.0 and np.isfinite(pri).all()
    assert pri[0, 0, 0, 0] == 1.0 and pri[1, 0, 0, 1] == 0.0  # clipped, NaN -> 0 (slice-major: z first)
    with pytest.raises(KeyError, match="GMprior"):
        load_subject({k: v for k, v in subs[0].items() if k != "GMprior"}, spec)
    # the channel count is checked when a network is built
    spec.build(n + 3, widths=(4,), bridge=4)
    with pytest.raises(ValueError, match="3 input channels plus the MRF series"):
        spec.build(3, widths=(4,), bridge=4)
    maps = NetworkSpec.from_dict({"name": "M", "loss": "mse", "inputs": ["T1", "T2star"], "outputs": ["lesion"],
                                  "priors": True})
    maps.build(5, widths=(4,), bridge=4)
    with pytest.raises(ValueError, match="expects 5 input channels"):
        maps.build(2, widths=(4,), bridge=4)
    with pytest.raises(ValueError, match="priors must be true or false"):
        NetworkSpec.from_dict({**MTL5, "priors": "yes"})
    # trained and applied with the priors
    train({**MTL5, "priors": True}, subs[:3], subs[3:], tmp_path / "p", **{**TINY, "epochs": 1}, norm="batch")
    assert load_ckpt(tmp_path / "p" / "best.pt")["model_config"]["in_channels"] == n + 3
    out = predict_volume(tmp_path / "p" / "best.pt", subs[3], device="cpu")
    assert out["lesion"].shape == tuple(with_p.to_volume(with_p.brain).shape)
    with pytest.raises(KeyError, match="WMprior"):
        predict_volume(tmp_path / "p" / "best.pt", {k: v for k, v in subs[3].items() if k != "WMprior"},
                       device="cpu")
