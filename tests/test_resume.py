"""Nothing lost: a workflow killed with SIGKILL completes on rerun with the outputs of a clean run, and
a failed subject is listed with its reason in the group table on the next run, and after its input is
fixed the rerun runs only that subject's jobs and the group steps.

A two-subject phantom and the conventional chain (``networks: []``) keep this to a few minutes; the
training job's own preemption (SIGTERM/SIGUSR1 -> checkpoint, exit 75, resume bit-identical) is
tested in tests/test_learn_train.py and through SLURM in tests/test_slurm.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from conftest import ROOT, tree_digest

pytestmark = pytest.mark.slow

PHANTOM = {"subjects": 2, "sites": 1, "seed": 3, "grid": "demo", "longitudinal": False}
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--profile",
             str(ROOT / "profiles" / "local")]


def _overlay(run: Path, **extra) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    cfg = {"output_dir": str(run / "out"), "work_dir": str(run / "work"), "networks": [], **extra}
    path = run / "overlay.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cmd(overlay: Path, *extra: str) -> list[str]:
    return SNAKEMAKE + ["--configfile", str(ROOT / "config.yaml"), str(overlay), *extra]


def _run(run: Path, overlay: Path, *extra: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(overlay, *extra), cwd=run, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-subject phantom (BIDS + truth), generated once through the pipeline's own rule."""
    tmp = tmp_path_factory.mktemp("resume")
    bids = tmp / "phantom"
    overlay = _overlay(tmp / "gen", phantom={**PHANTOM, "dir": str(bids)})
    proc = _run(tmp / "gen", overlay, "--", "phantom")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return bids


def _job_events(log: str) -> list[tuple[str, str]]:
    """(rule, stem or '') of every job a Snakemake log says it started."""
    jobs, rule = [], None
    for line in log.splitlines():
        m = re.match(r"(?:local)?rule (\w+):", line)
        if m:
            rule = m.group(1)
            jobs.append((rule, ""))
            continue
        m = re.match(r"\s+wildcards: stem=(\S+?)(,|$)", line)
        if m and jobs and jobs[-1][1] == "":
            jobs[-1] = (jobs[-1][0], m.group(1).split("/")[0])
    return jobs


def _outputs(out: Path) -> dict[str, Path]:
    return {str(p.relative_to(out)): p for p in sorted(out.rglob("*")) if p.is_file()}


def _same_outputs(a: Path, b: Path) -> None:
    """Same files; NIfTI data equal (registration and matching are seeded), tables equal; sidecars
    have the same keys (they hold paths and timings)."""
    fa, fb = _outputs(a), _outputs(b)
    assert sorted(fa) == sorted(fb)
    for rel, pa in fa.items():
        pb = fb[rel]
        if rel.endswith(".nii.gz"):
            da, db = np.asanyarray(nib.load(pa).dataobj), np.asanyarray(nib.load(pb).dataobj)
            assert da.shape == db.shape, rel
            np.testing.assert_allclose(da, db, rtol=1e-5, atol=1e-5, err_msg=rel)
        elif rel.endswith(".json"):
            import json

            assert json.loads(pa.read_text()).keys() == json.loads(pb.read_text()).keys(), rel
        elif rel.endswith(".tsv"):
            assert pa.read_text() == pb.read_text(), rel


# the kill points: after the n-th job of an invocation has started (mid-job) or finished
KILL_POINTS = [("start", 1), ("finish", 2), ("start", 3), ("finish", 1), ("start", 2), ("finish", 3)]


def _run_and_kill(run: Path, overlay: Path, event: str, n: int, timeout: float = 600) -> bool:
    """Start the workflow, SIGKILL its whole process group at the point; True when it was killed
    (False: it finished first)."""
    log = run / "killed.log"
    pattern = re.compile(r"^(?:local)?rule \w+:" if event == "start" else r"^Finished jobid: \d+", re.M)
    with open(log, "w") as fh:
        proc = subprocess.Popen(_cmd(overlay), cwd=run, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.monotonic()
    try:
        while proc.poll() is None:
            if len(pattern.findall(log.read_text())) >= n:
                if event == "start":
                    time.sleep(1.0)  # inside the job
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                return True
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(log.read_text()[-3000:])
            time.sleep(0.2)
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)


def test_sigkill_at_any_point_then_rerun_equals_clean_run(phantom: Path, tmp_path: Path) -> None:
    before = tree_digest(phantom)
    clean = tmp_path / "clean"
    proc = _run(clean, _overlay(clean, phantom={**PHANTOM, "dir": str(phantom)}))
    assert proc.returncode == 0, proc.stderr[-3000:]

    killed = tmp_path / "killed"
    overlay = _overlay(killed, phantom={**PHANTOM, "dir": str(phantom)})
    kills = 0
    for event, n in KILL_POINTS:
        if _run_and_kill(killed, overlay, event, n):
            kills += 1
            # the documented recovery: unlock the working directory (the lock of the killed run stays)
            unlock = _run(killed, overlay, "--unlock", timeout=300)
            assert unlock.returncode == 0, unlock.stderr[-2000:]
    assert kills >= 5, f"only {kills} kills happened before the workflow finished"
    final = _run(killed, overlay)
    assert final.returncode == 0, final.stderr[-3000:]
    _same_outputs(clean / "out", killed / "out")
    leftovers = [p for p in (killed / "out").rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers
    again = _run(killed, overlay, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
    assert tree_digest(phantom) == before


def test_failed_subject_rerun_runs_only_its_jobs(phantom: Path, tmp_path: Path) -> None:
    bids = tmp_path / "bids"
    shutil.copytree(phantom, bids, symlinks=True)
    run = tmp_path / "run"
    overlay = _overlay(run, bids_dir=str(bids))
    mrf = bids / "sub-02" / "anat" / "sub-02_acq-MRFEPI_MRF.nii.gz"
    good = mrf.read_bytes()
    mrf.write_bytes(good[: len(good) // 3])  # truncated gzip
    first = _run(run, overlay)
    assert first.returncode != 0
    assert f"mrflesion error: sub-02: MRF series file truncated or corrupt (EOFError): {mrf}" in first.stderr
    assert (run / "out" / "sub-01" / "anat" / "sub-01_space-T2w_label-NAWM_probseg.nii.gz").is_file()
    assert not (run / "out" / "sub-02").exists()  # nothing partial of the failed subject

    # the same command again, input not fixed yet: the subject is skipped with its reason (no new
    # attempt on an unchanged file) and the group steps run, listing it
    again = _run(run, overlay)
    assert again.returncode == 0, again.stderr[-3000:]
    reason = "MRF series file truncated or corrupt (EOFError) (input check of an earlier run)"
    assert f"mrflesion: skipping sub-02: {reason}: {mrf}" in again.stderr
    table = (run / "out" / "group" / "inputs.tsv").read_text()
    assert f"sub-02\tn/a\tn/a\tskipped\t{reason}: {mrf}" in table, table

    mrf.write_bytes(good)  # the fix
    before = tree_digest(bids)
    second = _run(run, overlay)  # the same command again
    assert second.returncode == 0, second.stderr[-3000:]
    jobs = _job_events(second.stderr)
    subjects = {stem for _, stem in jobs if stem}
    assert subjects == {"sub-02"}, jobs
    assert {r for r, s in jobs if not s} <= {"group_inputs", "group", "participant", "all"}, jobs
    assert {r for r, s in jobs if s} == {"check_inputs", "qmri", "register", "register_lesion", "tissue"}
    assert tree_digest(bids) == before
