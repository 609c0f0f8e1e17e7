"""BIDS discovery: selection by config, sessions, include/exclude, and per-subject problems."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from bidsfixture import make_dataset

from mrflesion.bids import BIDSError, discover, expected_inputs, parse_name


def test_parse_name() -> None:
    assert parse_name("sub-01_ses-2_acq-MRFEPI_MRF.nii.gz") == (
        (("sub", "01"), ("ses", "2"), ("acq", "MRFEPI")), "MRF", ".nii.gz")
    assert parse_name("sub-01_bad_T2w.nii.gz") is None
    assert parse_name(".DS_Store") is None
    assert parse_name("README") is None


def test_discovers_every_input(tmp_path: Path, repo_config: dict) -> None:
    root = make_dataset(tmp_path / "bids", 4, empty=True)
    d = discover(repo_config, root)
    assert [s.key for s in d.subjects] == ["sub-01", "sub-02", "sub-03", "sub-04"]
    assert not d.problems
    s = d.subjects[1]
    assert s.site == "site2" and s.group == "patient"
    assert s.files["mrf"].endswith("sub-02/anat/sub-02_acq-MRFEPI_MRF.nii.gz")
    assert s.files["lesion"].endswith("derivatives/manual/sub-02/anat/sub-02_space-FLAIR_label-lesion_mask.nii.gz")
    assert s.sidecar.endswith("sub-02_acq-MRFEPI_MRF.json")
    # Phantom mode predicts exactly the discovered paths.
    assert expected_inputs(root, "02", None, repo_config) == dict(s.files)


def test_sessions_and_filters(tmp_path: Path, repo_config: dict) -> None:
    root = make_dataset(tmp_path / "bids", 3, sessions=["01", "02"], empty=True)
    d = discover(repo_config, root)
    assert [s.key for s in d.subjects][:2] == ["sub-01_ses-01", "sub-01_ses-02"] and len(d.subjects) == 6
    cfg = copy.deepcopy(repo_config) | {"sessions": ["02"], "participant_label": ["01", "03"]}
    assert [s.key for s in discover(cfg, root).subjects] == ["sub-01_ses-02", "sub-03_ses-02"]
    cfg = copy.deepcopy(repo_config) | {"exclude_participant_label": ["02"]}
    assert {s.subject for s in discover(cfg, root).subjects} == {"01", "03"}
    cfg = copy.deepcopy(repo_config) | {"participant_label": ["09"]}
    d = discover(cfg, root)
    assert not d.subjects and "requested participant not found" in str(d.problems[0])


def test_missing_and_ambiguous_inputs_are_per_subject(tmp_path: Path, repo_config: dict) -> None:
    root = make_dataset(tmp_path / "bids", 3, empty=True)
    (root / "sub-02/anat/sub-02_T2w.nii.gz").unlink()
    (root / "sub-03/anat/sub-03_run-2_FLAIR.nii.gz").touch()
    cfg = copy.deepcopy(repo_config)
    cfg["inputs"]["flair"]["entities"] = {}  # now both FLAIRs of sub-03 match
    d = discover(cfg, root)
    assert [s.key for s in d.subjects] == ["sub-01"]
    msgs = sorted(str(p) for p in d.problems)
    assert msgs[0].startswith("sub-02: missing t2w input: ") and msgs[0].endswith("sub-02/anat/sub-02_T2w.nii.gz")
    assert msgs[1].startswith("sub-03: several flair inputs match: ")


def test_participants_problems(tmp_path: Path, repo_config: dict) -> None:
    root = make_dataset(tmp_path / "bids", 3, empty=True)
    lines = (root / "participants.tsv").read_text().splitlines()
    lines[2] = "sub-02\tn/a\tpatient"  # site missing
    lines.append(lines[3])  # sub-03 twice
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    d = discover(repo_config, root)
    assert [s.key for s in d.subjects] == ["sub-01"]
    reasons = {p.key: p.reason for p in d.problems}
    assert reasons == {"sub-02": "no site in", "sub-03": "listed twice in"}


def test_dataset_level_errors(tmp_path: Path, repo_config: dict) -> None:
    with pytest.raises(BIDSError, match="not found"):
        discover(repo_config, tmp_path / "nope")
    root = make_dataset(tmp_path / "bids", 1, empty=True)
    (root / "participants.tsv").write_text("participant_id\tgroup\nsub-01\tpatient\n")
    with pytest.raises(BIDSError, match="no 'site' column"):
        discover(repo_config, root)


def test_manual_mask_optional_only_in_apply_mode(tmp_path: Path, repo_config: dict) -> None:
    """Training needs every subject's manual lesion mask (missing: one line); apply mode (``models``) takes
    a subject without one, which then gets maps and reports but no lesion metric (steps.evaluation)."""
    root = make_dataset(tmp_path / "bids", 3, empty=True)
    (root / "derivatives/manual/sub-02/anat/sub-02_space-FLAIR_label-lesion_mask.nii.gz").unlink()
    d = discover(repo_config, root)
    assert [s.key for s in d.subjects] == ["sub-01", "sub-03"]
    assert str(d.problems[0]).startswith("sub-02: missing lesion input: ")
    applied = discover(copy.deepcopy(repo_config) | {"models": str(tmp_path / "models")}, root)
    assert [s.key for s in applied.subjects] == ["sub-01", "sub-02", "sub-03"] and not applied.problems
    s2 = applied.subjects[1]
    assert not s2.annotated and "lesion" not in s2.files and applied.subjects[0].annotated
