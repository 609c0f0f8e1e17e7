"""A setting that does not change results reruns nothing; one that does reruns exactly the jobs it affects.

A four-subject, one-site phantom is run to completion once (the fast conventional-chain settings of
tests/test_bad_inputs.py, one tiny network, its evaluation and the group tables). Then each setting is
changed in a dry run with Snakemake's default rerun triggers (a job reruns when its inputs are newer or
changed, or its params, code or software environment changed):

* where and how fast a job runs (``*.device``, ``inference.threads``, ``matching.block_voxels``,
  ``training.mem_mb``, ``training.runtime_min``) plans no job: rule params carry only what changes
  results, and rule bodies read the rest from ``snakemake.config``, ``threads`` and ``resources``;
* a setting that changes results plans exactly the jobs that read it and the jobs downstream of them.

``training.threads`` changes results: CPU training is deterministic for a given thread count but not across
thread counts (torch splits its reductions by thread; 8 epochs of the tiny network of
tests/test_learn_train.py on 1 and on 2 threads end with weights up to 2e-3 apart), so it is a param of
``train_network`` (rules/train.smk).
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT
from test_bad_inputs import FAST_CONFIG
from test_resume import PHANTOM, _job_events, _overlay, _run

N_SUBJECTS = 4  # one site, seed 3: a control and three patients: 2 training, 1 validation, 1 test subject

#: the run's settings besides config.yaml: fast conventional chain, one tiny network trained for one epoch
BASE: dict[str, Any] = {
    **yaml.safe_load(FAST_CONFIG),
    "networks": [{"name": "MSE-2-1", "loss": "mse", "inputs": ["T1", "T2star"], "outputs": ["lesion"]}],
    "training": {"epochs": 1, "batch_size": 8, "patch_size": 16, "patches_per_slice": 1, "lesion_factor": 1,
                 "widths": [4, 8], "bridge": 8, "dropout": 0.0, "threads": 2, "device": "auto"},
}

#: settings that do not change results, each with a value other than the run's
NOT_RESULTS: dict[str, Any] = {
    "denoise.device": "cpu",
    "matching.device": "cpu",
    "matching.block_voxels": 4096,
    "inference.device": "cpu",
    "inference.threads": 2,
    "training.device": "cpu",
    "training.mem_mb": 5000,
    "training.runtime_min": 90,
    # the longitudinal stage's: the device is read by its rule bodies from snakemake.config, memory and
    # runtime are resources (rules/longitudinal.smk; its thread count is a param of the training job).
    # This cohort has no pairs, so here they show only that the cross-sectional jobs ignore them
    "longitudinal.device": "cpu",
    "longitudinal.mem_mb": 5000,
    "longitudinal.runtime_min": 90,
}

#: schema keys of the kinds above that do change results (see the module docstring)
RESULT_RELEVANT = {"training.threads", "longitudinal.threads"}

#: settings that change results: the new value and the jobs a dry run then plans (rule -> jobs)
N = N_SUBJECTS
AFTER_EVALUATION = {"group_evaluation": 1, "all": 1}
AFTER_TRAINING = {"train_network": 1, "model_record": 1, "evaluate_subject": N, **AFTER_EVALUATION}
RESULTS: dict[str, tuple[Any, dict[str, int]]] = {
    # every subject's chain from the denoising on, the training on the new maps, every evaluation
    "denoise.patch_radius": (2, {"qmri": N, "register": N, "register_lesion": N, "tissue": N, "training_set": 1,
                                 **AFTER_TRAINING}),
    "training.threads": (1, AFTER_TRAINING),
    "evaluation.threshold": (0.5, {"evaluate_subject": N, **AFTER_EVALUATION}),
    # which subjects the group tables summarise: the group step only
    "evaluation.summary_splits": (["test", "val"], AFTER_EVALUATION),
}


def _changed(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    cfg = copy.deepcopy(base)
    for dotted, value in changes.items():
        *path, key = dotted.split(".")
        node = cfg
        for p in path:
            node = node.setdefault(p, {})
        node[key] = value
    return cfg


def _planned(proc: Any) -> Counter:
    """Jobs per rule of a dry run, from its job-stats table; an empty Counter only when Snakemake says there
    is nothing to be done. The table must agree with the jobs the log lists (tests/test_resume.py)."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    if "Nothing to be done" in out:
        assert "Job stats:" not in out, out[-3000:]
        return Counter()
    m = re.search(r"^Job stats:\n\S+\s+\S+\n[- ]+\n((?:\S+\s+\d+\n)+)", out, re.M)
    assert m, f"neither 'Nothing to be done' nor a job-stats table in:\n{out[-3000:]}"
    counts = Counter({rule: int(n) for rule, n in re.findall(r"^(\S+)\s+(\d+)$", m.group(1), re.M)})
    assert counts.pop("total") == sum(counts.values()) == len(_job_events(out)), out[-3000:]
    return counts


def _reasons(proc: Any) -> str:
    """The planned rules and why, leaving out the jobs planned because an upstream job is."""
    lines = {line.strip()[:300] for line in (proc.stdout + proc.stderr).splitlines()}
    return "\n".join(sorted(line for line in lines if line.startswith(("rule ", "localrule ", "reason:"))
                            and not line.startswith("reason: Input files updated by another job")))


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The finished run (its directory and its overlay's settings)."""
    run = tmp_path_factory.mktemp("rerun") / "run"
    base = {**BASE, "phantom": {**PHANTOM, "subjects": N_SUBJECTS, "dir": str(run / "phantom")}}
    proc = _run(run, _overlay(run, **base), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert not _planned(_run(run, _overlay(run, **base), "-n", timeout=300)), "the finished run plans jobs"
    return run, base


def _dry_run(finished: tuple[Path, dict[str, Any]], changes: dict[str, Any]) -> Any:
    run, base = finished
    return _run(run, _overlay(run, **_changed(base, changes)), "-n", timeout=300)


def _schema_keys(props: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for name, spec in props.items():
        keys.append(prefix + name)
        if isinstance(spec, dict) and isinstance(spec.get("properties"), dict):
            keys += _schema_keys(spec["properties"], f"{prefix}{name}.")
    return keys


def test_every_setting_of_where_and_how_fast_is_classified() -> None:
    """Every schema key naming a device, a thread count, a block size, memory or runtime is listed above, so
    that a new one is tested (or argued to be result-relevant)."""
    schema = yaml.safe_load((ROOT / "config.schema.yaml").read_text())
    kinds = re.compile(r"(^|_)(device|threads|block_voxels|mem_mb|runtime\w*)$")
    found = {k for k in _schema_keys(schema["properties"]) if kinds.search(k.rsplit(".", 1)[-1])}
    assert found == set(NOT_RESULTS) | RESULT_RELEVANT
    assert not set(NOT_RESULTS) & set(RESULTS)


@pytest.mark.slow
def test_settings_that_do_not_change_results_plan_no_job(finished: tuple[Path, dict[str, Any]]) -> None:
    if not _planned(_dry_run(finished, NOT_RESULTS)):
        return
    planned = {}  # which setting plans which jobs (one dry run each, only to say so)
    for key, value in NOT_RESULTS.items():
        proc = _dry_run(finished, {key: value})
        jobs = _planned(proc)
        if jobs:
            planned[key] = f"{dict(jobs)}\n{_reasons(proc)}"
    assert not planned, "\n".join(f"{k}: {v}" for k, v in planned.items())


@pytest.mark.slow
@pytest.mark.parametrize("key", list(RESULTS))
def test_a_setting_that_changes_results_reruns_exactly_its_jobs(
    finished: tuple[Path, dict[str, Any]], key: str
) -> None:
    value, expected = RESULTS[key]
    proc = _dry_run(finished, {key: value})
    assert _planned(proc) == Counter(expected), _reasons(proc)
