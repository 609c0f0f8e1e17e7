"""The app installed from a wheel (no -e) into a fresh venv runs from outside the repository.

Builds the wheel offline (``pip wheel --no-build-isolation``: the venv's setuptools, no download) from a
copy of the sources (an in-tree build would write build/ into the checkout), installs it with
``--no-deps --no-index`` into a venv that sees this venv's dependencies through a .pth file, then, from a
directory outside the repository: ``mrflesion phantom`` (one subject, demo grid), a dry run of
``mrflesion BIDS OUT participant -n``, and two of the cheap jobs for real (the packaged rule scripts).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import BUILD_FILES, ROOT, workflow_entries

pytestmark = pytest.mark.slow

SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc


def test_wheel_installs_and_runs_outside_the_repository(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}

    # 1. the wheel, built from a copy of what the build reads
    source = tmp_path / "source"
    for name in BUILD_FILES + workflow_entries():
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=SKIP)
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(path, source / name)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(wheels), str(source)], tmp_path, env)
    (wheel,) = wheels.glob("mrflesion-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert "mrflesion/paths.py" in names and "mrflesion/py.typed" in names
    assert not [n for n in names if not n.startswith(("mrflesion/", "mrflesion-"))], "files outside the package"

    # 2. a fresh venv: the wheel without its dependencies, then this venv's site-packages through a .pth
    # (written after the install, so that pip does not see this venv's editable mrflesion)
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)],
         tmp_path, env)
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     tmp_path, env).stdout.strip())
    deps = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site / "_mrflesion_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    packaged = site / "mrflesion" / "_workflow"
    expected: set[str] = set()
    for entry in workflow_entries():
        expected |= {entry} if (ROOT / entry).is_file() else {f"{entry}/{f}" for f in _files(ROOT / entry)}
    assert _files(packaged) == expected, "the wheel's mrflesion/_workflow differs from the repository's workflow"

    # 3. from outside the repository, through the entry point
    outside = tmp_path / "outside"
    outside.mkdir()
    assert ROOT not in outside.resolve().parents
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    where = _run([str(py), "-c", "import mrflesion, mrflesion.paths as p; print(mrflesion.__file__); "
                  "print(p.workflow_root())"], outside, env).stdout.split()
    assert Path(where[0]).resolve().is_relative_to(venv.resolve()), f"mrflesion imported from {where[0]}"
    assert Path(where[1]) == packaged.resolve()

    app = str(venv / "bin" / "mrflesion")
    _run([app, "phantom", "bids", "--subjects", "1", "--sites", "1", "--seed", "3", "--grid", "demo", "--quiet"],
         outside, env)
    assert (outside / "bids" / "dataset_description.json").is_file()

    dry = _run([app, "bids", "out", "participant", "-n"], outside, env)
    log = dry.stdout + dry.stderr
    assert f"--snakefile {packaged.resolve() / 'Snakefile'}" in log
    total = re.search(r"^total\s+(\d+)$", log, re.M)
    assert total and int(total.group(1)) >= 5, log[-3000:]
    for rule in ("check_inputs", "qmri", "register", "tissue", "participant"):
        assert re.search(rf"^{rule}\s+1$", log, re.M), f"dry run plans no {rule} job:\n{log[-3000:]}"
    assert not (outside / "out").exists()

    # two cheap jobs for real: the rule scripts run from the installed package
    _run([app, "bids", "out", "participant", "--cores", "1", "--until", "check_inputs", "dataset_description"],
         outside, env)
    assert (outside / "out" / "dataset_description.json").is_file()
    assert (outside / "mrflesion_work" / "inputs" / "sub-01" / "anat" / "sub-01_inputs.json").is_file()
    assert _files(packaged) == expected, "the run wrote into the installed package"
