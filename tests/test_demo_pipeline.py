"""The README's main job on the default phantom demo, end to end, checked against ground truth.

One run per test session (module fixture): the phantom rule first, then everything else, so that
the test can prove the pipeline never writes into its input BIDS tree.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT, tree_digest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("demo")
    overlay = tmp / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({
        "output_dir": str(tmp / "out"), "work_dir": str(tmp / "work"), "phantom": {"dir": str(tmp / "phantom")},
    }))
    base = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--profile",
            str(ROOT / "profiles" / "local"), "--configfile", str(ROOT / "config.yaml"), str(overlay), "--quiet"]
    first = subprocess.run(base[:5] + ["phantom"] + base[5:], cwd=tmp, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    before = tree_digest(tmp / "phantom")
    proc = subprocess.run(base, cwd=tmp, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return {"tmp": tmp, "out": tmp / "out", "work": tmp / "work", "phantom": tmp / "phantom",
            "before": before, "log": proc.stderr}


def test_input_tree_untouched(demo: dict) -> None:
    assert tree_digest(demo["phantom"]) == demo["before"]


def test_derivatives_dataset(demo: dict) -> None:
    desc = json.loads((demo["out"] / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "mrflesion"


def test_group_table_lists_every_subject(demo: dict) -> None:
    table = pd.read_csv(demo["out"] / "group" / "inputs.tsv", sep="\t")
    truth = pd.read_csv(demo["phantom"] / "participants.tsv", sep="\t")
    assert list(table["subject"]) == list(truth["participant_id"])
    assert (table["status"] == "ok").all()
    assert list(table["site"]) == list(truth["site"])
    # Manual masks: controls empty, patients not.
    controls = table["group"] == "control"
    assert (table.loc[controls, "lesion_ml"] == 0).all() and (table.loc[~controls, "lesion_ml"] > 0).all()
