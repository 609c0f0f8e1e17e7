"""Per-lesion table (mrflesion.evaluate.lesion_quant), its cohort summary, the model card and apply
mode's refusal rules, and the phantom's lesion truth table: fast checks on synthetic arrays."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT
from scipy import ndimage

from mrflesion.cli import build_command
from mrflesion.config import load_config
from mrflesion.evaluate import lesion_quant as lq
from mrflesion.evaluate.tables import lesion_site_table
from mrflesion.model_card import (
    APPLY_SPLIT,
    ApplyPlan,
    ModelSet,
    ModelSetError,
    cohort_summary,
    make_card,
    schedule_problem,
)
from mrflesion.phantom.lesions import (
    TRUTH_TABLE_COLUMNS,
    lesion_id_map,
    lesion_index,
    lesion_truth_rows,
    make_lesion,
)

ZOOMS = (2.0, 2.0, 3.0)
VML = 0.012


def _rules() -> lq.LesionTableRules:
    return lq.LesionTableRules.from_config(load_config(ROOT / "config.yaml")["lesion_table"])


def _subject() -> dict[str, np.ndarray]:
    """A 60 x 60 x 10 brain: WM everywhere inside, a 'ventricle' (CSF) in the middle, a cortical GM rim,
    NAWM T1 800 ms / T2* 50 ms / B1 1.0, and three lesions with known values."""
    shape = (60, 60, 10)
    brain = np.zeros(shape, bool)
    brain[5:55, 5:55, :] = True
    csf = np.zeros(shape, np.float32)
    csf[26:34, 26:34, 3:7] = 1.0  # the ventricle, deep inside
    gm = np.zeros(shape, np.float32)
    gm[brain] = 0.0
    gm[5:8, 5:55, :] = 1.0  # cortex along one side
    nawm = (brain & (csf < 0.5) & (gm < 0.5)).astype(np.float32)
    t1 = np.where(brain, 800.0, 0.0).astype(np.float32)
    t2s = np.where(brain, 50.0, 0.0).astype(np.float32)
    b1 = np.where(brain, 1.0, 0.0).astype(np.float32)
    t1[csf > 0.5], t2s[csf > 0.5] = 4000.0, 1500.0
    t1[gm > 0.5] = 1300.0
    mask = np.zeros(shape, np.uint8)
    # lesion A: periventricular, 2 x 2 x 2 voxels touching the ventricle, plus one diagonal voxel (26-connected)
    mask[34:36, 28:30, 4:6] = 1
    mask[36, 30, 6] = 1
    # lesion B: deep white matter, far from ventricle and cortex
    mask[44:47, 44:47, 4:6] = 1
    # lesion C: juxtacortical, next to the GM rim (one voxel of WM between), away from the ventricle
    mask[9:11, 40:42, 2:4] = 1
    # one lesion voxel drawn into the ventricle: counted in the volume, not measured
    mask[33, 28, 4] = 1
    for sl, f1, f2 in (((slice(34, 37), slice(28, 31), slice(4, 7)), 1.5, 1.4),
                       ((slice(44, 47), slice(44, 47), slice(4, 6)), 2.0, 1.8),
                       ((slice(9, 11), slice(40, 42), slice(2, 4)), 1.25, 1.2)):
        sel = np.zeros(shape, bool)
        sel[sl] = True
        sel &= mask > 0
        t1[sel], t2s[sel] = 800.0 * f1, 50.0 * f2
    return {"brain": brain, "csf": csf, "gm": gm, "nawm": nawm, "mask": mask,
            "maps": {"T1": t1, "T2star": t2s, "B1": b1}}


def test_per_lesion_table_volumes_locations_and_ratios() -> None:
    s = _subject()
    table, ref = lq.quantify_lesions(s["mask"], s["maps"], s["nawm"], s["csf"], s["gm"], s["brain"], ZOOMS, _rules())
    assert ref == {"T1": 800.0, "T2star": 50.0, "B1": 1.0}
    assert len(table) == 3  # the diagonal voxel joins lesion A (26-connected)
    by_vox = table.set_index("voxels")
    a, b, c = by_vox.loc[10], by_vox.loc[18], by_vox.loc[8]  # A: 8 + 1 diagonal + 1 in the ventricle
    assert a["location"] == "periventricular" and a["measured_voxels"] == 9
    assert a["volume_ml"] == pytest.approx(10 * VML)
    assert a["T1_mean_ratio"] == pytest.approx(1.5) and a["T2star_mean_ratio"] == pytest.approx(1.4)
    assert b["location"] == "deep_white_matter" and b["T1_median"] == pytest.approx(1600.0)
    assert b["T1_mean_ratio"] == pytest.approx(2.0) and b["B1_mean_ratio"] == pytest.approx(1.0)
    assert c["location"] == "juxtacortical" and c["T2star_mean_ratio"] == pytest.approx(1.2)
    assert c["cortex_distance_mm"] == pytest.approx(4.0) and b["cortex_distance_mm"] > 5.0
    # a stricter periventricular distance and no ventricle found: the classes move
    strict = lq.LesionTableRules(**{**_rules().__dict__, "ventricle_min_ml": 100.0})
    t2, _ = lq.quantify_lesions(s["mask"], s["maps"], s["nawm"], s["csf"], s["gm"], s["brain"], ZOOMS, strict)
    assert "periventricular" not in set(t2["location"]) and t2["ventricle_distance_mm"].isna().all()
    # an infratentorial mask takes precedence
    infra = np.zeros_like(s["brain"])
    infra[44:47, 44:47, 4] = True
    t3, _ = lq.quantify_lesions(s["mask"], s["maps"], s["nawm"], s["csf"], s["gm"], s["brain"], ZOOMS, _rules(),
                                infratentorial=infra)
    assert t3.set_index("voxels").loc[18, "location"] == "infratentorial"
    # an empty mask: an empty table with the same columns
    t0, _ = lq.quantify_lesions(np.zeros_like(s["mask"]), s["maps"], s["nawm"], s["csf"], s["gm"], s["brain"], ZOOMS,
                                _rules())
    assert t0.empty and list(t0.columns) == list(table.columns)


def test_truth_matching_and_ratios() -> None:
    s = _subject()
    ids = np.zeros(s["mask"].shape, np.int16)
    ids[44:47, 44:47, 4:6] = 7  # the deep lesion is truth lesion 7
    ids[34:36, 28:30, 4:6] = 3
    table, _ = lq.quantify_lesions(s["mask"], s["maps"], s["nawm"], s["csf"], s["gm"], s["brain"], ZOOMS, _rules())
    truth_maps = {"T1": s["maps"]["T1"], "T2star": s["maps"]["T2star"]}
    out = lq.with_truth(table, s["mask"], ids, {3: "periventricular", 7: "deep_white_matter"}, truth_maps,
                        s["nawm"], ids > 0, s["csf"], _rules())
    by_vox = out.set_index("voxels")
    assert by_vox.loc[18, "truth_lesion"] == 7 and by_vox.loc[18, "truth_location"] == "deep_white_matter"
    assert by_vox.loc[10, "truth_lesion"] == 3 and by_vox.loc[8, "truth_lesion"] == 0
    assert by_vox.loc[8, "truth_location"] == "n/a"
    # the same measurement on the same maps gives the same ratios
    assert np.allclose(out["truth_T1_mean_ratio"], out["T1_mean_ratio"])


def test_lesion_site_table() -> None:
    rows = pd.DataFrame({
        "subject": ["sub-01", "sub-01", "sub-02", "sub-03"], "site": ["s1", "s1", "s1", "s2"],
        "source": ["manual"] * 4, "location": ["periventricular", "deep_white_matter", "periventricular",
                                                "periventricular"],
        "volume_ml": [0.2, 0.4, 0.6, 1.0], "T1_mean_ratio": [1.5, 1.7, 1.3, 1.4],
        "T2star_mean_ratio": [1.4, 1.6, 1.2, 1.3], "B1_mean_ratio": [1.0] * 4, "T1_mean": [1200.0] * 4,
        "T2star_mean": [70.0] * 4,
    })
    t = lesion_site_table(rows)
    one = t[(t.site == "s1") & (t.location == "periventricular") & (t.quantity == "T1_mean_ratio")].iloc[0]
    assert one["n_lesions"] == 2 and one["n_subjects"] == 2 and one["mean"] == pytest.approx(1.4)
    allc = t[(t.site == "s1") & (t.location == "all") & (t.quantity == "volume_ml")].iloc[0]
    assert allc["n_lesions"] == 3 and allc["median"] == pytest.approx(0.4)
    assert lesion_site_table(rows.iloc[:0]).empty


# ---------------------------------------------------------------------------------------- model card


def _card(tmp: Path, net: str = "N-1", fingerprint: str = "abc") -> dict:
    card = make_card(net, {"Network": {"name": net, "outputs": ["lesion"]}, "TrainSubjects": ["sub-01"],
                           "ValidationSubjects": ["sub-02"], "BestValidationMetrics": {"val_loss": 0.5},
                           "LesionThreshold": {"validation": 0.4, "min_lesion_ml": 0.05}},
                     {"spec": {"name": net, "outputs": ["lesion"], "inputs": "mrf"}, "normalisation": {"a": 1.0},
                      "model_config": {"widths": [8]}},
                     "f" * 64, {"Sites": cohort_summary([{"subject": "sub-01", "site": "s1", "group": "control"},
                                                         {"subject": "sub-02", "site": "s1", "group": "patient"},
                                                         {"subject": "sub-03", "site": "s2", "group": "patient"}],
                                                        {"sub-01": "train", "sub-02": "val", "sub-03": "test"})},
                     {fingerprint: {"FlipAngle": [1.0]}}, {"mrflesion": "0"}, "0123")
    (tmp / net).mkdir(parents=True, exist_ok=True)
    (tmp / net / "model_card.json").write_text(json.dumps(card))
    (tmp / net / "best.pt").write_bytes(b"weights")
    return card


def test_model_card_and_schedule_refusal(tmp_path: Path) -> None:
    card = _card(tmp_path)
    assert card["TrainingCohort"]["Sites"] == [{"site": "s1", "n": 2, "controls": 1, "patients": 1, "train": 1,
                                                "val": 1}]  # the test subject is not in the training cohort
    assert card["MRFSchedule"]["Fingerprints"] == ["abc"] and card["LesionThreshold"]["validation"] == 0.4
    assert card["Normalisation"] == {"a": 1.0} and card["Outputs"] == {"lesion": "1 (probability)"}
    assert card["ValidationMetrics"] == {"val_loss": 0.5} and card["ConfigSha256"] == "0123"
    assert schedule_problem(card, "abc") is None
    assert "MRF schedule xyz differs from the one network N-1 was trained on (abc)" == schedule_problem(card, "xyz")
    # a models directory without its record, or a network without its card: one line naming the file
    with pytest.raises(ModelSetError, match=r"no readable models.json .*models.json"):
        ModelSet(str(tmp_path))
    (tmp_path / "models.json").write_text(json.dumps({"Networks": {"N-1": {}, "N-2": {}}}))
    with pytest.raises(ModelSetError, match="network N-2 has no weights"):
        ModelSet(str(tmp_path))
    _card(tmp_path, "N-2")
    (tmp_path / "N-2" / "model_card.json").unlink()
    with pytest.raises(ModelSetError, match="network N-2 has no readable model card"):
        ModelSet(str(tmp_path))
    _card(tmp_path, "N-2")
    models = ModelSet(str(tmp_path))
    assert list(models.networks) == ["N-1", "N-2"]
    # apply plan: every subject new (split apply), the subject with another schedule refused
    subj = {st: SimpleNamespace(subject=st[4:6], key=st[:6], sidecar=f"/b/{st[:6]}_MRF.json")
            for st in ("sub-01/anat/sub-01", "sub-02/anat/sub-02")}
    plan = SimpleNamespace(subjects=subj, stems=lambda: sorted(subj),
                           schedule={"sub-01/anat/sub-01": "zzz", "sub-02/anat/sub-02": "abc"})
    ap = ApplyPlan(plan, {"models": str(tmp_path)}, "out")
    assert ap.split_of == {"sub-01": APPLY_SPLIT, "sub-02": APPLY_SPLIT} and ap.problem() is None
    assert list(ap.refused) == ["sub-01/anat/sub-01"]
    assert ap.refused["sub-01/anat/sub-01"].startswith("sub-01: MRF schedule zzz differs")
    assert ap.refused["sub-01/anat/sub-01"].endswith(": /b/sub-01_MRF.json")


def test_cli_models_option(tmp_path: Path) -> None:
    bids = tmp_path / "bids"
    bids.mkdir()
    with pytest.raises(SystemExit, match="--models: no models.json in"):
        build_command([str(bids), str(tmp_path / "o"), "participant", "--models", str(tmp_path / "none"),
                       "-w", str(tmp_path / "w")])
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "models.json").write_text("{}")
    cmd, work = build_command([str(bids), str(tmp_path / "o"), "participant", "--models", str(tmp_path / "m"),
                               "-w", str(tmp_path / "w")])
    overlay = yaml.safe_load((work / "mrflesion_cli_config.yaml").read_text())
    assert overlay["models"] == str((tmp_path / "m").resolve())


# ---------------------------------------------------------------------------------------- phantom truth


def test_phantom_lesion_identity_and_truth_rows() -> None:
    """The lesion identity map names the lesion at each voxel centre, fills partial-volume voxels from
    the nearest, and the truth rows carry the drawn class and ratios; no random draw is involved."""
    from mrflesion.phantom.anatomy import get_atlas
    from mrflesion.phantom.config import load_config

    cfg = load_config()
    rng = np.random.default_rng(5)
    atlas = get_atlas()
    lesions = [make_lesion(rng, atlas, i + 1, 0.3, (-10.0, 40.0), cfg["lesions"], cfg["lesion_tissue"])
               for i in range(2)]
    grid = np.stack(np.meshgrid(*[np.arange(-60.0, 61.0, 2.0)] * 2, np.arange(-20.0, 50.0, 3.0),
                                indexing="ij"), axis=-1)
    inside = lesion_index(grid.reshape(-1, 3), lesions).reshape(grid.shape[:3]) > 0
    assert inside.any()
    dominant = ndimage.binary_dilation(inside)  # partial-volume voxels whose centre lies in no lesion
    state = rng.bit_generator.state
    ids = lesion_id_map(grid, lesions, dominant)
    assert rng.bit_generator.state == state
    assert set(np.unique(ids)) <= {0, 1, 2} and (ids[dominant] > 0).all() and (ids[~dominant] == 0).all()
    centre = lesion_index(grid.reshape(-1, 3), lesions).reshape(grid.shape[:3])
    assert (ids[inside] == centre[inside]).all()  # lesion_id = 1 + list index here
    rows = lesion_truth_rows(lesions, ids)
    table = pd.DataFrame(rows, columns=TRUTH_TABLE_COLUMNS)
    assert list(table["index"]) == [1, 2]
    assert list(table["periventricular"]) == [les.periventricular for les in lesions]
    assert np.allclose(table["t1_ratio"], [1 + les.t1_increase for les in lesions], atol=1e-6)
    assert (table["voxels"] == [int((ids == i).sum()) for i in (1, 2)]).all()
