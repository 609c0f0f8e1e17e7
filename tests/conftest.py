from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def repo_config() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root (to prove an input tree was not written to)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
