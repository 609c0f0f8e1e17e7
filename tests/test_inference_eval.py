"""Inference (whole slices / sliding windows) and the per-subject metric tables of the evaluation step."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mrflesion.evaluate import subject as ev_subject
from mrflesion.learn.infer import predict_slices, predict_sliding, window_starts
from mrflesion.learn.networks import NetworkSpec
from mrflesion.plan import evaluation as ev_plan
from mrflesion.steps import group as ev_group


@pytest.mark.parametrize("size,window,stride", [(120, 64, 32), (64, 64, 32), (50, 64, 32), (100, 32, 7)])
def test_window_starts_cover_the_axis(size: int, window: int, stride: int) -> None:
    starts = window_starts(size, window, stride)
    covered = np.zeros(max(size, window), bool)
    for s in starts:
        covered[s:s + window] = True
    assert covered[:size].all()
    assert starts[0] == 0 and starts[-1] == max(0, size - window)
    assert all(b - a <= stride for a, b in zip(starts, starts[1:], strict=False))


def _model(in_ch: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    spec = NetworkSpec("t", "mse", "mrf", ("T1", "lesion"))
    return spec.build(in_ch, (4, 8, 16), 16, 0.0).eval()


def test_sliding_window_equals_whole_slice_when_one_window_covers_it() -> None:
    model = _model()
    x = np.random.default_rng(0).random((3, 48, 48, 3), dtype=np.float32)
    whole = predict_slices(model, x, torch.device("cpu"))
    one = predict_sliding(model, x, torch.device("cpu"), window=48, overlap=0.5)
    np.testing.assert_allclose(one, whole, atol=1e-5)


def test_sliding_window_averages_overlaps_and_crops_padding() -> None:
    model = _model()
    x = np.random.default_rng(1).random((2, 40, 56, 3), dtype=np.float32)
    out = predict_sliding(model, x, torch.device("cpu"), window=32, overlap=0.5)
    assert out.shape == (2, 40, 56, 2) and np.isfinite(out).all()
    # windows start at rows 0, 8 and columns 0, 16, 24: where only the top-left window reaches
    # (rows < 8, columns < 16) the result is that window's prediction; elsewhere an average
    first = predict_slices(model, np.ascontiguousarray(x[:, :32, :32]), torch.device("cpu"))
    np.testing.assert_allclose(out[:, :8, :16], first[:, :8, :16], atol=1e-5)
    assert np.abs(out[:, 8:32, 16:32] - first[:, 8:32, 16:32]).max() > 1e-4
    # a smaller input than the window is padded and cropped back
    small = predict_sliding(model, x[:, :20, :20], torch.device("cpu"), window=32, overlap=0.25)
    assert small.shape == (2, 20, 20, 2)
    with pytest.raises(ValueError):
        predict_sliding(model, x, torch.device("cpu"), window=32, overlap=1.0)


def test_net_labels_are_bids_safe_and_unique() -> None:
    assert ev_plan.net_label("MSE-2-1") == "MSE21" and ev_plan.net_label("DICE-1") == "DICE1"
    files = ev_plan.output_files("/o", "sub-01/anat/sub-01", "MSE-5", ["T1", "lesion"])
    assert files["lesion"] == "/o/sub-01/anat/sub-01_space-T2w_label-lesion_desc-MSE5_probseg.nii.gz"
    with pytest.raises(ValueError, match="same file label"):
        ev_plan.check_labels(["MSE-1", "MSE1"])


def _sphere(shape, centre, r):
    g = np.indices(shape).astype(float)
    return ((g[0] - centre[0]) ** 2 + (g[1] - centre[1]) ** 2 + (g[2] - centre[2]) ** 2) <= r * r


def test_subject_metrics_perfect_and_degraded_predictions() -> None:
    shape = (30, 30, 12)
    brain = np.zeros(shape, bool)
    brain[3:27, 3:27, 1:11] = True
    les = (_sphere(shape, (10, 10, 5), 3) | _sphere(shape, (20, 20, 6), 2)).astype(np.float32)
    t1 = np.where(brain, 900.0, 0.0).astype(np.float32)
    t1[les > 0] = 1500.0
    t2s = np.where(brain, 50.0, 0.0).astype(np.float32)
    t2s[10:20, 10:20, 3:8] = 1200.0  # CSF-like: the reference is clipped at 300 ms
    gm = np.zeros(shape, np.float32)
    gm[3:10] = 0.9
    nawm = np.where(brain & (gm < 0.5) & (les < 0.5), 0.95, 0.0).astype(np.float32)
    ref = {"T1": t1, "T2star": t2s, "NAWM": nawm, "GM": gm, "lesion": les}
    perfect = {"T1": t1, "T2star": np.minimum(t2s, 300.0), "NAWM": nawm, "GM": gm, "lesion": les * 0.9}
    worse_lesion = les.copy()
    worse_lesion[_sphere(shape, (20, 20, 6), 2)] = 0.0  # the second lesion missed
    worse = {"T1": t1 * 1.1, "lesion": worse_lesion * 0.5}
    m, curves, lesions = ev_subject.subject_metrics({"A": perfect, "B": worse}, {"pipeline": ref}, brain, (1, 1, 1),
                                                    0.33)
    v = {(r.network, r.metric): r.value for r in m.itertuples()}
    assert v[("A", "lesion_dice")] == 1.0 and v[("A", "lesion_ldr")] == 1.0
    assert v[("A", "T1_mrd")] == 0.0 and v[("A", "T2star_mrd")] == 0.0
    assert v[("A", "NAWM_dice")] == 1.0 and v[("A", "GM_dice")] == 1.0
    assert v[("B", "T1_mrd")] == pytest.approx(0.1, rel=1e-5)
    assert v[("B", "lesion_ldr")] == 0.5 and v[("B", "lw_sensitivity")] == 0.5
    n1, n2 = _sphere(shape, (10, 10, 5), 3).sum(), _sphere(shape, (20, 20, 6), 2).sum()
    assert v[("B", "lesion_dice")] == pytest.approx(2 * n1 / (2 * n1 + n2))
    assert ("B", "NAWM_dice") not in v  # B has no NAWM output
    # curves: the 0.5-probability prediction drops out above threshold 0.5
    cb = curves[curves.network == "B"].set_index("threshold")
    assert cb.loc[0.5, "ldr"] == 0.5 and cb.loc[0.51, "dice"] == 0.0
    assert sorted(lesions[lesions.network == "B"]["detected"]) == [False, True]


def test_group_tables_use_the_summary_splits_only() -> None:
    rows = []
    for i, (site, split) in enumerate([("s1", "test"), ("s1", "test"), ("s2", "test"), ("s2", "test"),
                                       ("s2", "train")]):
        for net, off in (("A", 0.0), ("B", 0.2)):
            rows.append({"subject": f"sub-{i}", "site": site, "group": "patient", "split": split, "network": net,
                         "reference": "pipeline", "metric": "lesion_dice", "value": 0.5 + off + 0.01 * i})
    t = ev_group.group_tables(pd.DataFrame(rows), ["test"])
    s = t["summary"]
    row = s[(s.site == "all") & (s.network == "A")].iloc[0]
    assert row["metric"] == "pipeline:lesion_dice" and row["n"] == 4
    assert math.isclose(row["mean"], 0.5 + 0.015)
    assert set(t["site_tests"]["network"]) == {"A", "B"}
    assert len(t["network_tests"]) == 1


def _write_subject(d, sub: str, site: str, split: str, dice: float) -> dict:
    import json

    rows = pd.DataFrame({"subject": sub, "site": site, "group": "patient", "split": split, "network": ["A", "B"],
                         "reference": "pipeline", "metric": "lesion_dice", "value": [dice, dice / 2]})
    curves = pd.DataFrame({"subject": sub, "site": site, "group": "patient", "split": split, "threshold": [0.1, 0.5],
                           "dice": [dice, dice / 3], "ldr": [1.0, 0.5], "network": "A", "reference": "pipeline"})
    f = {"metrics": d / f"{sub}_m.tsv", "curves": d / f"{sub}_c.tsv", "json": d / f"{sub}.json"}
    rows.to_csv(f["metrics"], sep="\t", index=False)
    curves.to_csv(f["curves"], sep="\t", index=False)
    f["json"].write_text(json.dumps({"subject": sub, "site": site, "inference_seconds": {"A": 0.5, "B": 0.25},
                                     "conventional_seconds": {"match": 10.0, "tissue": None}}))
    return f


@pytest.mark.parametrize("splits", [["test"], ["val"]])
def test_group_evaluation_writes_every_table(tmp_path, splits) -> None:
    from types import SimpleNamespace

    files = [_write_subject(tmp_path, f"sub-0{i}", f"site{1 + i % 2}", "test", 0.2 * i) for i in range(1, 5)]
    (tmp_path / "inputs.tsv").write_text("subject\tsite\tgroup\tstatus\treason\nsub-01\tsite1\tpatient\tok\tn/a\n"
                                         "sub-09\tn/a\tn/a\tskipped\tmissing t2w input: /x/sub-09_T2w.nii.gz\n")
    names = ["metrics", "summary", "site_tests", "network_tests", "failed", "times", "lesions", "lesion_sites",
             "report"]
    out = {k: str(tmp_path / "group" / f"{k}.{'html' if k == 'report' else 'tsv'}") for k in names}
    (tmp_path / "group").mkdir()
    smk = SimpleNamespace(
        input=SimpleNamespace(inputs=str(tmp_path / "inputs.tsv"), json=[str(f["json"]) for f in files]),
        output=SimpleNamespace(**out),
        params=SimpleNamespace(metrics=[str(f["metrics"]) for f in files], curves=[str(f["curves"]) for f in files],
                               quant=[], networks=["A", "B"], splits=splits, threshold=0.33),
        config={"a": 1})
    ev_group.group_evaluation(smk)
    failed = pd.read_csv(out["failed"], sep="\t")
    assert list(failed.subject) == ["sub-09"] and "missing t2w" in failed.reason[0]
    times = pd.read_csv(out["times"], sep="\t")
    assert len(times) == 8 and (times.conventional_s == 10.0).all() and set(times.speedup) == {20.0, 40.0}
    summary = pd.read_csv(out["summary"], sep="\t")
    html = Path(out["report"]).read_text()
    if splits == ["test"]:
        row = summary[(summary.site == "all") & (summary.network == "A")].iloc[0]
        assert row["n"] == 4 and row["mean"] == pytest.approx(0.5)
        assert "Kruskal" in html and "sub-09" in html
    else:  # no validation subjects: empty tables, still a report
        assert len(summary) == 0 and "no val subjects" in html


def test_infer_subject_cache_gives_the_same_outputs(tmp_path) -> None:
    import nibabel as nib

    from mrflesion.learn import checkpoint
    from mrflesion.learn.data import Normalisation
    from mrflesion.learn.infer import infer_subject

    rng = np.random.default_rng(0)
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    nib.Nifti1Image(rng.random((16, 16, 3, 3), dtype=np.float32), aff).to_filename(tmp_path / "mrf.nii.gz")
    mask = np.zeros((16, 16, 3), np.float32)
    mask[2:14, 2:14] = 1
    nib.Nifti1Image(mask, aff).to_filename(tmp_path / "mask.nii.gz")
    spec = NetworkSpec("t", "mse", "mrf", ("T1", "lesion"))
    model = spec.build(3, (4, 8), 8, 0.0)
    ck = {"spec": spec.to_dict(), "model": model.state_dict(), "normalisation": Normalisation().to_dict(),
          "model_config": {"in_channels": 3, "widths": [4, 8], "bridge": 8, "dropout": 0.0}}
    checkpoint.atomic_save(ck, tmp_path / "best.pt")
    subject = {"subject": "sub-01", "mrf": str(tmp_path / "mrf.nii.gz"), "mask": str(tmp_path / "mask.nii.gz")}
    cache: dict = {}
    a, rec = infer_subject(tmp_path / "best.pt", subject, device="cpu", cache=cache)
    b, _ = infer_subject(tmp_path / "best.pt", subject, device="cpu", cache=cache)
    c, _ = infer_subject(tmp_path / "best.pt", subject, mode="sliding", window=8, overlap=0.5, device="cpu")
    assert len(cache) == 1 and rec["mode"] == "whole"
    for k in ("T1", "lesion"):
        assert a[k].shape == (16, 16, 3) and np.array_equal(a[k], b[k]) and c[k].shape == a[k].shape
        assert (a[k][mask == 0] == 0).all() and (a[k] >= 0).all()
    assert a["lesion"].max() <= 1


def test_map_accuracy_over_pure_tissue() -> None:
    """``*_mrd_pure``: the deviation over voxels where one tissue holds >= 90 %; a partial-volume voxel
    (no single true T1) counts in ``T1_mrd`` only."""
    shape = (6, 6, 2)
    brain = np.ones(shape, bool)
    wm = np.zeros(shape, np.float32)
    gm = np.zeros(shape, np.float32)
    wm[:3] = 1.0
    gm[3:] = 0.95
    wm[0, 0, 0], gm[0, 0, 0] = 0.5, 0.5  # one mixed voxel
    pure = ev_subject.pure_tissue_mask(wm, gm, brain)
    assert pure.sum() == brain.sum() - 1 and not pure[0, 0, 0]
    assert ev_subject.pure_tissue_mask(np.zeros(shape), np.zeros(shape), brain).all()  # CSF: the remainder
    ref = np.full(shape, 1000.0, np.float32)
    pred = ref.copy()
    pred[0, 0, 0] = 2000.0  # wrong only where the truth is undefined
    m = ev_subject.map_metrics("T1", pred, ref, brain, pure=pure)
    assert m["T1_mrd_pure"] == 0.0 and m["T1_mrd"] == pytest.approx(1.0 / brain.sum())
    assert "T1_mrd_pure" not in ev_subject.map_metrics("T1", pred, ref, brain)
