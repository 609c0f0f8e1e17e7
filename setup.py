"""Build hooks (all metadata is in pyproject.toml): the wheel ships the workflow inside the package.

The files listed in pyproject.toml's ``[tool.mrflesion] workflow`` (Snakefile, configs, rules, scripts,
envs, resources, profiles) stay at the repository's top level; ``build_py`` copies them into the
wheel as ``mrflesion/_workflow/`` (package data, found by ``mrflesion.paths.workflow_root``), and
``sdist`` adds them to the source archive so that a wheel built from it has them too.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
PACKAGED = Path("mrflesion", "_workflow")


def workflow_files() -> list[str]:
    """Every file of the workflow, relative to the repository root (compiled Python left out)."""
    entries = tomllib.loads((HERE / "pyproject.toml").read_text())["tool"]["mrflesion"]["workflow"]
    out: list[str] = []
    for entry in entries:
        path = HERE / entry
        if not path.exists():
            raise FileNotFoundError(f"pyproject.toml [tool.mrflesion] workflow: {entry} does not exist")
        found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        out += [p.relative_to(HERE).as_posix() for p in found
                if "__pycache__" not in p.parts and p.suffix != ".pyc"]
    return out


class BuildPyWithWorkflow(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install runs the checkout's own files
            return
        dest = Path(self.build_lib) / PACKAGED
        shutil.rmtree(dest, ignore_errors=True)
        for rel in workflow_files():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(HERE / rel, dest / rel)


class SdistWithWorkflow(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, sorted(set(files) | set(workflow_files())))


setup(cmdclass={"build_py": BuildPyWithWorkflow, "sdist": SdistWithWorkflow})
