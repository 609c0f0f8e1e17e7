"""Packaging checks that need no build: the workflow list, the locator, the CLI's profiles, and the
container recipes (Dockerfile, Apptainer definition: they cannot be built here, so what can be checked).
tests/test_wheel_install.py builds and installs the wheel (slow)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from conftest import BUILD_FILES, ROOT, workflow_entries

from mrflesion.cli import build_command
from mrflesion.paths import workflow_root

DOCKERFILE = ROOT / "container" / "Dockerfile"
APPTAINER = ROOT / "container" / "mrflesion.def"


def _torch_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d.partition("==")[2] for d in deps if d.startswith("torch==")]
    return pin


def test_workflow_root_is_the_checkout_here() -> None:
    assert workflow_root() == ROOT


def test_workflow_list_holds_every_file_the_workflow_names() -> None:
    """Every include/script/conda/basedir path of the Snakefile and rules lies under an entry that ships."""
    entries = set(workflow_entries())
    assert all((ROOT / e).exists() for e in entries)
    named = 0
    for smk in [ROOT / "Snakefile", *sorted((ROOT / "rules").glob("*.smk"))]:
        for ref in re.findall(r"""["']((?:\.\./)?[\w./-]+\.(?:smk|py|yaml))["']""", smk.read_text()):
            # "../x" is relative to the rule file (script:, conda:), anything else to workflow.basedir
            path = (smk.parent / ref if ref.startswith("../") else ROOT / ref).resolve()
            assert path.is_file(), f"{smk.name}: {ref} does not exist"
            assert path.relative_to(ROOT).parts[0] in entries, f"{smk.name}: {ref} is not shipped in the wheel"
            named += 1
    assert named > 20


@pytest.mark.parametrize("value", ["slurm", "profiles/slurm", "--profile=slurm"])
def test_cli_profile_names_the_workflows_profiles(tmp_path: Path, value: str) -> None:
    (tmp_path / "bids").mkdir()
    args = [value] if value.startswith("--") else ["--profile", value]
    cmd, _ = build_command([str(tmp_path / "bids"), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
                            *args])
    shipped = str(ROOT / "profiles" / "slurm")
    assert shipped in cmd or f"--profile={shipped}" in cmd
    assert str(ROOT / "profiles" / "local") not in cmd


def _apptainer_sections(text: str) -> list[tuple[str, str]]:
    """(header, body) of each %section, e.g. ('%files from wheel', '    /wheels /wheels')."""
    parts = re.split(r"^(%\w+.*)$", text, flags=re.M)
    return [(parts[i].strip(), parts[i + 1]) for i in range(1, len(parts), 2)]


def _copied_from_repository() -> dict[Path, list[str]]:
    """The repository paths each recipe copies into its build stage."""
    docker = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY") and "--from" not in line:
            docker += line.split()[1:-1]
    apptainer = []
    for header, body in _apptainer_sections(APPTAINER.read_text()):
        if header == "%files":
            apptainer += [line.split()[0] for line in body.splitlines() if line.strip() and not line.startswith("#")]
    return {DOCKERFILE: docker, APPTAINER: apptainer}


def test_container_recipes_exist_and_copy_what_the_build_reads() -> None:
    for recipe, copied in _copied_from_repository().items():
        assert copied, recipe.name
        for path in copied:
            assert (ROOT / path).exists(), f"{recipe.name} copies {path}, which the repository does not have"
        missing = set(BUILD_FILES + workflow_entries()) - set(copied)
        assert not missing, f"{recipe.name} does not copy {sorted(missing)}"


@pytest.mark.parametrize("recipe", [DOCKERFILE, APPTAINER], ids=lambda p: p.name)
def test_container_recipe_installs_the_wheel_with_cpu_torch(recipe: Path) -> None:
    text = recipe.read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert re.search(r"pip wheel .*--no-deps .*--wheel-dir /wheels \.$", code, re.M), "builds no wheel"
    assert re.search(r"pip install .*/wheels/mrflesion-\*\.whl", code), "installs no mrflesion wheel"
    assert "pip install -e" not in code and "--editable" not in code
    assert re.findall(r"\btorch==([\w.+]+)", code) == [_torch_pin()], "torch pinned otherwise than pyproject.toml"
    assert "--index-url https://download.pytorch.org/whl/cpu torch==" in code, "torch is not the CPU build"
    assert "torchvision" not in code
    bases = re.findall(r"^(?:FROM|From:)\s+(\S+)", code, re.M)
    assert len(bases) == 2 and all(b.startswith("python:3.11-") for b in bases), bases


def test_container_entry_point_is_mrflesion() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["mrflesion"] == "mrflesion.cli:main"
    assert re.search(r'^ENTRYPOINT \["mrflesion"\]$', DOCKERFILE.read_text(), re.M)
    runscript = dict(_apptainer_sections(APPTAINER.read_text()))["%runscript"]
    assert [line.strip() for line in runscript.splitlines() if line.strip()] == ['exec mrflesion "$@"']
