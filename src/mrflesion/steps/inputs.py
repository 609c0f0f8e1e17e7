"""Rule bodies of the input stage: the phantom, the per-subject input check, the derivatives'
dataset_description.json and the cohort's input table (``group/inputs.tsv``)."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from typing import Any

from .. import __version__
from ..io import write_json, write_text
from ..provenance import version_info
from ..validate import InputError, check_subject
from . import fail


def phantom(smk: Any) -> None:
    from ..phantom import generate

    cfg = smk.params.cfg
    generate(
        smk.params.out,
        n_subjects=int(cfg["subjects"]),
        n_sites=int(cfg["sites"]),
        seed=int(cfg["seed"]),
        grid=str(cfg["grid"]),
        longitudinal=bool(cfg.get("longitudinal", False)),
        n_jobs=int(smk.threads),
        inversion_efficiency=str(smk.params.get("inversion", "perfect")),
    )


def check_inputs(smk: Any) -> None:
    files = {k: smk.input[k] for k in ("mrf", "t2w", "flair", "lesion") if k in smk.input.keys()}
    t0 = time.perf_counter()
    from ..plan.subjects import input_fingerprint

    record = smk.params.record
    layers = list(smk.input.get("sidecars", [smk.input.sidecar]))
    try:
        summary = check_subject(smk.params.key, files, layers, int(smk.params.n_measurements),
                                stated=smk.params.get("stated"))
    except InputError as exc:
        # read when the workflow is planned again: an unchanged bad input is skipped with its reason
        os.makedirs(os.path.dirname(record), exist_ok=True)
        write_json(record, {"subject": smk.params.key, "reason": exc.reason, "file": exc.path,
                            "fingerprint": input_fingerprint({**files, "sidecar": smk.input.sidecar})})
        fail(str(exc))
    if os.path.exists(record):
        os.remove(record)
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

    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t", lineterminator="\n")
    w.writerow(["subject", "site", "group", "status", "reason", "lesion_ml", "mrf_shape"])
    for subj, path in zip(smk.params.subjects, smk.input.checks, strict=True):
        info = json.loads(open(path).read())
        shape = "x".join(str(x) for x in info["mrf_shape"])
        lesion_ml = "n/a" if info["lesion_ml"] is None else info["lesion_ml"]  # n/a: no manual mask (apply mode)
        w.writerow([subj.key, subj.site, subj.group or "n/a", "ok", "n/a", lesion_ml, shape])
    for p in smk.params.problems:
        w.writerow([p.key, "n/a", "n/a", "skipped", f"{p.reason}: {p.file}", "n/a", "n/a"])
    write_text(smk.output[0], buf.getvalue())
