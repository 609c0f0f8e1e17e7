"""The bodies of the workflow's rule scripts: read ``snakemake.input/output/params``, call the package.

Every function takes the ``snakemake`` object that Snakemake hands to a ``script:``; scripts/
holds one-line wrappers. A bad input ends the job with one line on stderr naming subject and
file, and exit status 1, so that ``--keep-going`` carries on with the other subjects.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import sys
import time
from typing import Any

from . import __version__
from .io import write_json, write_text
from .validate import InputError, check_subject
from .workflow import version_info


def _fail(message: str) -> None:
    raise StepError(message)


class StepError(RuntimeError):
    """A job-ending problem with a one-line explanation (bad input, typically)."""


def main(smk: Any, step: str) -> None:
    """Run ``step`` with stdout/stderr going to the rule's log; a StepError also reaches the console."""
    func = globals()[step]
    console = sys.stderr
    log_path = smk.log[0] if len(smk.log) else None
    with contextlib.ExitStack() as stack:
        if log_path:
            os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
            fh = stack.enter_context(open(log_path, "w"))
            stack.enter_context(contextlib.redirect_stdout(fh))
            stack.enter_context(contextlib.redirect_stderr(fh))
        try:
            func(smk)
        except StepError as exc:
            line = f"mrflesion error: {exc}"
            print(line, file=sys.stderr)
            if log_path:
                print(line, file=console)
            raise SystemExit(1) from None


def phantom(smk: Any) -> None:
    from .phantom import generate

    cfg = smk.params.cfg
    generate(
        smk.params.out,
        n_subjects=int(cfg["subjects"]),
        n_sites=int(cfg["sites"]),
        seed=int(cfg["seed"]),
        grid=str(cfg["grid"]),
        longitudinal=bool(cfg.get("longitudinal", False)),
        n_jobs=int(smk.threads),
    )


def check_inputs(smk: Any) -> None:
    files = {k: smk.input[k] for k in ("mrf", "t2w", "flair", "lesion")}
    t0 = time.perf_counter()
    try:
        summary = check_subject(smk.params.key, files, smk.input.sidecar, int(smk.params.n_measurements))
    except InputError as exc:
        _fail(str(exc))
    summary["inputs"] = {k: str(v) for k, v in files.items()}
    summary["check_seconds"] = round(time.perf_counter() - t0, 3)
    write_json(smk.output[0], summary)


def dataset_description(smk: Any) -> None:
    write_json(
        smk.output[0],
        {
            "Name": "mrflesion derivatives",
            "BIDSVersion": "1.10.0",
            "DatasetType": "derivative",
            "GeneratedBy": [
                {
                    "Name": "mrflesion",
                    "Version": __version__,
                    "Description": "MS lesion probability mapping from MR fingerprinting",
                }
            ],
            "SourceDatasets": [{"URL": f"file://{smk.params.bids_dir}"}],
            "Environment": version_info(),
        },
    )


def group_inputs(smk: Any) -> None:
    """One row per subject: site, group and status (ok, or the reason it was skipped)."""
    import json

    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(["subject", "site", "group", "status", "reason", "lesion_ml", "mrf_shape"])
    for subj, path in zip(smk.params.subjects, smk.input.checks, strict=True):
        info = json.loads(open(path).read())
        shape = "x".join(str(x) for x in info["mrf_shape"])
        w.writerow([subj.key, subj.site, subj.group or "n/a", "ok", "n/a", info["lesion_ml"], shape])
    for p in smk.params.problems:
        w.writerow([p.key, "n/a", "n/a", "skipped", f"{p.reason}: {p.file}", "n/a", "n/a"])
    write_text(smk.output[0], buf.getvalue())
