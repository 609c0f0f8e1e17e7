"""SLURM tier: the pipeline end to end (a training job included) through sbatch with profiles/slurm.

A real one-node cluster on this machine (tests/slurm_cluster.py: slurm-wlm + munge, installed with
apt-get when missing; skipped only where that is impossible). A reduced phantom cohort (3 subjects,
2 sites) and one small network keep it to a few minutes. Everything runs in one test so that pytest-xdist
never starts a second cluster for the same module; a file lock serialises clusters across sessions.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT
from slurm_cluster import SlurmCluster, SlurmUnavailable

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TIMEOUT_S = 1200  # the whole run; it takes ~5-8 min on 2 cores
SUBJECTS = 3
NETWORK = "MSE-1"


def _overlay(tmp: Path) -> Path:
    overlay = tmp / "overlay.yaml"
    overlay.write_text(yaml.safe_dump({
        "output_dir": str(tmp / "out"),
        "work_dir": str(tmp / "work"),
        "phantom": {"dir": str(tmp / "phantom"), "subjects": SUBJECTS, "sites": 2, "seed": 1, "grid": "demo",
                    "longitudinal": False},
        # one small network, one epoch; the split leaves one validation patient per site, no test subjects
        "networks": [{"name": NETWORK, "loss": "mse", "inputs": "mrf", "outputs": ["lesion"]}],
        "training": {"epochs": 1, "split": {"n_test_per_site": [0], "n_val_per_site": [1],
                                            "reference_subjects": 0, "min_train_per_site": 0, "seed": 0}},
    }))
    return overlay


def _command(tmp: Path, overlay: Path, *extra: str, timeout: int = TIMEOUT_S,
             targets: tuple[str, ...] = ("all", "train")) -> list[str]:
    return [
        "timeout", "-k", "20", str(timeout),
        sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"),
        "--profile", str(ROOT / "profiles" / "slurm"),
        "--configfile", str(ROOT / "config.yaml"), str(overlay),
        # test-cluster settings on top of the profile: fast first status check (MinJobAge >= 3 x 5 s),
        # keep the SLURM logs of successful jobs (asserted below), group jobs at most 2 CPUs wide
        "--slurm-init-seconds-before-status-checks", "5", "--slurm-keep-successful-logs",
        "--cores", "2", "--latency-wait", "10",
        *extra, *targets,
    ]


def _snakemake(tmp: Path, overlay: Path, env: dict, *extra: str, timeout: int = TIMEOUT_S):
    return subprocess.run(_command(tmp, overlay, *extra, timeout=timeout), cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=timeout + 60)


def _jobs(cluster: SlurmCluster) -> pd.DataFrame:
    """Every job the controller knows (finished ones stay MinJobAge = 1 h): id, state, TRES, comment."""
    proc = subprocess.run(["scontrol", "-o", "show", "job"], env=cluster.env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    rows = []
    for line in proc.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if "JobId" in fields:
            rows.append({"id": fields["JobId"], "state": fields.get("JobState", ""),
                         "tres": f"{fields.get('TRES', '')} {fields.get('TresPerJob', '')}",
                         "comment": fields.get("Comment", "")})
    return pd.DataFrame(rows, columns=["id", "state", "tres", "comment"])


def test_pipeline_through_slurm(tmp_path: Path) -> None:
    t0 = time.monotonic()
    cluster = SlurmCluster(tmp_path / "cluster")
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        pytest.skip(f"no SLURM cluster possible here: {exc}")
    try:
        overlay = _overlay(tmp_path)
        proc = _snakemake(tmp_path, overlay, cluster.env)
        jobs = _jobs(cluster)
        context = f"{proc.stderr[-6000:]}\n{jobs.to_string()}\n{cluster.logs()}"
        assert proc.returncode == 0, context

        # --- the jobs went through SLURM
        submitted = re.findall(r"submitted with SLURM jobid (\d+)", proc.stderr)
        assert submitted, context
        assert set(submitted) == set(jobs["id"]), context
        assert (jobs["state"] == "COMPLETED").all(), context
        logdir = tmp_path / ".snakemake" / "slurm_logs"
        assert sorted(logdir.rglob("*.log")), context
        comments = list(jobs["comment"])
        # one job per subject for its chain of steps (group `subject` in the profile), not one per step
        subject_jobs = [c for c in comments if c.startswith("rule_subject")]
        assert len(subject_jobs) == SUBJECTS, context
        assert any(c.startswith("rule_phantom") for c in comments), context
        assert any(c.startswith("rule_dictionary") for c in comments), context
        # the training job asked for a GPU (the test node has a device-less one; training falls back to CPU)
        train = jobs[[c.startswith("rule_train_network") for c in comments]]
        assert len(train) == 1, context
        assert "gres:gpu:1" in train["tres"].iloc[0], context

        # --- the outputs exist
        out = tmp_path / "out"
        table = pd.read_csv(out / "group" / "inputs.tsv", sep="\t")
        assert len(table) == SUBJECTS and (table["status"] == "ok").all()
        for sub in table["subject"]:
            anat = out / sub / "anat"
            assert (anat / f"{sub}_acq-MRFEPI_T1map.nii.gz").exists()
            assert sorted(anat.glob(f"{sub}_*space-T2w*")), f"{sub}: nothing in T2w space"
            assert sorted(anat.glob(f"{sub}_*_probseg.nii.gz")), f"{sub}: no tissue probabilities"
        assert (out / "models" / NETWORK / "best.pt").exists()
        assert (out / "group" / "splits.tsv").exists()

        # --- nothing left to do (the dry run needs no cluster access)
        dry = _snakemake(tmp_path, overlay, cluster.env, "-n", timeout=300)
        assert dry.returncode == 0, dry.stderr[-3000:]
        assert "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:] + dry.stderr[-3000:]

        _preempted_training_resumes(tmp_path, overlay, cluster)
    finally:
        cluster.stop()
        print(f"SLURM tier: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    for pid_file in (cluster.ctld_pid, cluster.slurmd_pid):
        assert not pid_file.exists() or not _alive(pid_file), f"{pid_file.name}: daemon still running"


def _squeue(cluster: SlurmCluster) -> list[dict[str, str]]:
    proc = subprocess.run(["squeue", "-h", "-o", "%i|%T|%k"], env=cluster.env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    return [dict(zip(("id", "state", "comment"), line.split("|", 2), strict=True))
            for line in proc.stdout.splitlines() if line.count("|") >= 2]


def _history_rows(path: Path) -> int:
    try:
        return max(0, len(path.read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


def _preempted_training_resumes(tmp: Path, overlay: Path, cluster: SlurmCluster) -> None:
    """Preemption: the training job, continued to more epochs, is requeued by SLURM while it runs
    (`scontrol requeue`: SIGTERM, then the job goes back to the queue). The training saves its
    checkpoint and exits; the requeued job resumes from that checkpoint and Snakemake, still
    waiting on the same SLURM job, completes."""
    epochs = 40
    cfg = yaml.safe_load(overlay.read_text())
    cfg["training"]["epochs"] = epochs
    more = tmp / "overlay_more_epochs.yaml"
    more.write_text(yaml.safe_dump(cfg))
    state_history = tmp / "work" / "train" / NETWORK / "history.tsv"
    log = tmp / "snakemake_preempt.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(_command(tmp, more, targets=("train",)), cwd=tmp, env=cluster.env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        job, t0 = None, time.monotonic()
        while time.monotonic() - t0 < 600 and proc.poll() is None:
            running = [j for j in _squeue(cluster)
                       if j["comment"].startswith("rule_train_network") and j["state"] == "RUNNING"]
            # requeue once the resumed training has finished two more epochs (of the 1 done before)
            if running and _history_rows(state_history) >= 3:
                job = running[0]["id"]
                break
            time.sleep(0.5)
        assert job is not None, f"training job never ran past epoch 3\n{log.read_text()[-4000:]}"
        done_at_requeue = _history_rows(state_history)
        assert done_at_requeue < epochs, "training finished before it could be preempted"
        req = subprocess.run(["scontrol", "requeue", job], env=cluster.env, capture_output=True, text=True,
                             timeout=30)
        assert req.returncode == 0, req.stderr
        rc = proc.wait(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    context = f"{log.read_text()[-6000:]}\n{cluster.logs()}"
    assert rc == 0, context
    shown = subprocess.run(["scontrol", "-o", "show", "job", job], env=cluster.env, capture_output=True,
                           text=True, timeout=30).stdout
    restarts = int(re.search(r"Restarts=(\d+)", shown).group(1))
    assert restarts >= 1, shown
    # the requeued run resumed from the checkpoint saved on SIGTERM (its log replaces the first run's)
    train_log = (tmp / "work" / "logs" / "train" / f"{NETWORK}.log").read_text()
    resumed = [int(m) for m in re.findall(r"resumed from \S+: epoch (\d+)", train_log)]
    assert resumed and resumed[-1] >= done_at_requeue, train_log[-3000:]
    history = pd.read_csv(tmp / "out" / "models" / NETWORK / "history.tsv", sep="\t")
    assert list(history["epoch"]) == list(range(1, epochs + 1)), history["epoch"].tolist()
    print(f"preempted at epoch {done_at_requeue}, resumed at {resumed[-1]}, {restarts} restart(s)",
          file=sys.stderr)


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text().split()[0]), 0)
    except (OSError, ValueError, IndexError):
        return False
    return True
