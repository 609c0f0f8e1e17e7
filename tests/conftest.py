from __future__ import annotations

import hashlib
import os
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: what building the wheel reads besides the workflow (setup.py, pyproject.toml)
BUILD_FILES = ["pyproject.toml", "setup.py", "README.md", "src"]


def workflow_entries() -> list[str]:
    """The workflow's top-level files and directories that the wheel ships (pyproject.toml [tool.mrflesion])."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mrflesion"]["workflow"]


@pytest.fixture(scope="session")
def repo_config() -> dict:
    """The demo configuration as a run gets it (schema defaults filled, networks expanded)."""
    from mrflesion.config import load_config

    return load_config(ROOT / "config.yaml")


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root (to prove an input tree was not written to)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
