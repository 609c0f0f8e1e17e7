"""envs/*.yaml pin the same versions as pyproject.toml, and every rule's env exists."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from conftest import ROOT


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject_pins() -> dict[str, str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = list(data["project"]["dependencies"])
    for extra in data["project"]["optional-dependencies"].values():
        deps += extra
    pins = {}
    for dep in deps:
        name, _, version = dep.partition("==")
        assert version, f"pyproject dependency not pinned exactly: {dep}"
        pins[_norm(name)] = version
    return pins


def _env_pins(path: Path) -> dict[str, str]:
    env = yaml.safe_load(path.read_text())
    pins = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for pip_dep in dep.get("pip", []):
                name, _, version = pip_dep.partition("==")
                pins[_norm(name)] = version
            continue
        name, _, version = dep.partition("=")
        if name in ("python", "pip"):
            continue
        pins[_norm(name)] = version
    return pins


def test_env_pins_match_pyproject() -> None:
    pins = _pyproject_pins()
    envs = sorted((ROOT / "envs").glob("*.yaml"))
    assert envs
    for path in envs:
        for name, version in _env_pins(path).items():
            assert name in pins, f"{path.name}: {name} is not a pyproject dependency"
            assert version == pins[name], f"{path.name}: {name}={version}, pyproject has {pins[name]}"


def test_python_version_and_torch_pin() -> None:
    assert _pyproject_pins()["torch"] == "2.13.0"
    for path in (ROOT / "envs").glob("*.yaml"):
        assert "python=3.11" in yaml.safe_load(path.read_text())["dependencies"], path.name


def test_every_rule_env_exists() -> None:
    for smk in (ROOT / "rules").glob("*.smk"):
        for ref in re.findall(r'conda:\s*\n\s*"([^"]+)"', smk.read_text()):
            assert (smk.parent / ref).resolve().is_file(), f"{smk.name}: missing env {ref}"
