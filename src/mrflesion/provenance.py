"""What produced an output: package versions, the configuration's hash, the commit of a checkout.

Recorded in dataset_description.json, the model cards and the reports' provenance sections.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Mapping
from typing import Any


def version_info() -> dict[str, str]:
    """Package versions recorded in dataset_description.json and reports."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("mrflesion", "snakemake", "numpy", "scipy", "nibabel", "dipy", "antspyx", "torch", "nilearn"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def config_sha256(config: Mapping[str, Any]) -> str:
    """sha256 (16 hex digits) of the configuration, as the reports' provenance gives it."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def provenance(config: Mapping[str, Any]) -> dict[str, str]:
    from .paths import workflow_root

    info = {f"version {k}": v for k, v in version_info().items()}
    info["config sha256"] = config_sha256(config)
    root = workflow_root()
    commit = ""
    if (root / ".git").exists():  # a checkout; an installed copy must not report an enclosing repository's commit
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                    capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
    info["commit"] = commit or "unknown (not a git checkout)"
    info["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return info
