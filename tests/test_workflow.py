"""The walking pipeline end to end on a tiny BIDS fixture: CLI, bad config, bad inputs, lint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from bidsfixture import make_dataset
from conftest import ROOT, tree_digest

from mrflesion.cli import build_command

SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(SNAKEMAKE + args, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture()
def bids(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "bids", 4)


def test_bad_inputs_fail_alone_and_input_is_untouched(bids: Path, tmp_path: Path) -> None:
    # sub-02: truncated gzip; sub-03: T2w missing (found at parse time).
    mrf = bids / "sub-02/anat/sub-02_acq-MRFEPI_MRF.nii.gz"
    mrf.write_bytes(mrf.read_bytes()[:2000])
    (bids / "sub-03/anat/sub-03_T2w.nii.gz").unlink()
    before = tree_digest(bids)
    proc = _run(
        ["--cores", "2", "--keep-going", "--config", f"bids_dir={bids}", f"output_dir={tmp_path}/out",
         f"work_dir={tmp_path}/work", "--", "participant"],
        tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0  # sub-02 failed
    assert f"mrflesion: skipping sub-03: missing t2w input: {bids}/sub-03/anat/sub-03_T2w.nii.gz" in out
    assert f"mrflesion error: sub-02: MRF series file truncated or corrupt (EOFError): {mrf}" in out
    for ok in ("sub-01", "sub-04"):
        assert (tmp_path / f"work/inputs/{ok}/anat/{ok}_inputs.json").is_file()
    assert not (tmp_path / "work/inputs/sub-02/anat/sub-02_inputs.json").exists()
    assert (tmp_path / "out/dataset_description.json").is_file()
    assert tree_digest(bids) == before


def test_cli_participant_and_group(bids: Path, tmp_path: Path) -> None:
    before = tree_digest(bids)
    cmd, work = build_command([str(bids), str(tmp_path / "deriv"), "group", "--participant-label", "sub-01", "02",
                               "-w", str(tmp_path / "w"), "--cores", "2", "--quiet"])
    assert "--profile" in cmd and "group" in cmd and "--cores" in cmd
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "deriv/group/inputs.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in table[1:]] == ["sub-01", "sub-02"]
    import json

    desc = json.loads((tmp_path / "deriv/dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "mrflesion"
    assert desc["GeneratedBy"][0]["Version"]
    assert tree_digest(bids) == before


def test_cli_rejects_bad_label(bids: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="invalid participant label"):
        build_command([str(bids), str(tmp_path / "o"), "participant", "--participant-label", "../etc"])


@pytest.mark.parametrize(
    "override,expected",
    [
        ("phantom={subjects: 0, sites: 2, seed: 1, grid: demo, dir: x}", "invalid config value at phantom.subjects"),
        ("site_column=", "invalid config value at site_column"),
        ("participant_label=[a/b]", "invalid config value at participant_label.0"),
    ],
)
def test_bad_config_value_one_line(tmp_path: Path, bids: Path, override: str, expected: str) -> None:
    proc = _run(["-n", "--config", f"bids_dir={bids}", override], tmp_path)
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if expected in line]
    assert len(lines) == 1, proc.stderr


def test_snakemake_lint_clean(tmp_path: Path, bids: Path) -> None:
    proc = _run(["--lint", "--config", f"bids_dir={bids}", f"work_dir={tmp_path}/w"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Lints for" not in proc.stdout + proc.stderr


def test_missing_input_file_one_line(bids: Path, tmp_path: Path) -> None:
    mask = bids / "derivatives/manual/sub-04/anat/sub-04_space-FLAIR_label-lesion_mask.nii.gz"
    mask.unlink()
    proc = _run(["-n", "--config", f"bids_dir={bids}", f"work_dir={tmp_path}/w"], tmp_path)
    assert proc.returncode == 0
    lines = [line for line in proc.stderr.splitlines() if "sub-04" in line]
    assert lines == [f"mrflesion: skipping sub-04: missing lesion input: {mask}"]


def test_siblings_are_written_with_a_declared_input(tmp_path: Path) -> None:
    """A rule's `params.siblings` (rules/common.smk) must be outputs of the job that writes one of its
    declared inputs: Snakemake reruns that job when any of its outputs is missing or out of date, so
    the siblings exist and are up to date whenever the declared input is."""
    from types import SimpleNamespace

    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    stem = "sub-01/ses-a/anat/sub-01_ses-a"
    config = {"output_dir": str(tmp_path / "out"), "work_dir": str(tmp_path / "work")}
    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        workflow = api.workflow(resource_settings=ResourceSettings(), config_settings=ConfigSettings(config=config),
                                snakefile=ROOT / "Snakefile", workdir=tmp_path)._workflow
        rules = list(workflow.rules)

        def files(declared) -> set[str]:  # a rule's paths of `stem` (not its input functions)
            return {str(f.apply_wildcards({"stem": stem})) for f in declared
                    if not f.is_callable() and set(f.get_wildcard_names()) <= {"stem"}}

        checked = set()
        for rule in rules:
            params = dict(rule.params.items())
            if "siblings" not in params:
                continue
            inputs = files(rule.input)
            # the outputs of each rule that writes a declared input
            producers = [files(p.output) for p in rules if files(p.output) & inputs]
            siblings = params["siblings"](SimpleNamespace(stem=stem))
            assert siblings, rule.name
            for name, path in siblings.items():
                assert any(path in outs for outs in producers), f"{rule.name}: sibling {name} ({path})"
                assert path not in inputs, f"{rule.name}: {name} is declared too"
            checked.add(rule.name)
    assert checked == {"register", "tissue"}
