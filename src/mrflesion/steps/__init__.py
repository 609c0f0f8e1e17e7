"""Rule bodies: one module per stage, each function taking the ``snakemake`` object of a ``script:``.

============================  =====================================================================
module                        rules (rules/*.smk) and what their bodies do
============================  =====================================================================
``steps.inputs``              phantom, check_inputs, dataset_description, group_inputs
``steps.qmri``                dictionary, qmri (MRF brain mask, MPPCA, dictionary matching)
``steps.registration``        register (MRF maps and series, FLAIR and lesion mask into T2w space)
``steps.tissue``              tissue (GM/WM/CSF/NAWM probabilities, the classical lesion baseline)
``steps.training``            splits, training_set, train, model_record (model cards)
``steps.evaluation``          evaluate (inference of every network, metrics, per-lesion table, report)
``steps.group``               group_evaluation (per-site tables and the group report)
============================  =====================================================================

A body reads ``snakemake.input/output/params`` and calls the package's array functions; it writes
every image through :func:`mrflesion.io.write_derivative` (atomic, with its sidecar). What a rule's
files are called is decided at parse time by :mod:`mrflesion.plan` and :mod:`mrflesion.layout`,
never here. scripts/ holds one-line wrappers: ``main(snakemake, <module>.<function>)``, which sends
stdout/stderr to the rule's log. A bad input ends the job with one line on stderr naming subject and
file, and exit status 1, so that ``--keep-going`` carries on with the other subjects.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from ..io import write_json
from ..layout import sidecar_path


class StepError(RuntimeError):
    """A job-ending problem with a one-line explanation (bad input, typically)."""


def fail(message: str) -> None:
    """End the job with ``message`` (one line: subject, problem, file)."""
    raise StepError(message)


def main(smk: Any, body: Callable[[Any], None]) -> None:
    """Run the rule body ``body(smk)`` with stdout/stderr going to the rule's log; a StepError also
    reaches the console."""
    console = sys.stderr
    log_path = smk.log[0] if len(smk.log) else None
    with contextlib.ExitStack() as stack:
        if log_path:
            os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
            fh = stack.enter_context(open(log_path, "w"))
            stack.enter_context(contextlib.redirect_stdout(fh))
            stack.enter_context(contextlib.redirect_stderr(fh))
        try:
            body(smk)
        except StepError as exc:
            line = f"mrflesion error: {exc}"
            print(line, file=sys.stderr)
            if log_path:
                print(line, file=console)
            raise SystemExit(1) from None
        except Exception:
            traceback.print_exc()  # into the rule's log, which Snakemake shows for failed jobs
            raise SystemExit(1) from None


def reads(smk: Any) -> dict[str, str]:
    """The files a rule's job reads, by name: its named inputs and ``params.siblings``, the files
    written by the same upstream job as one of its inputs (``siblings`` in rules/common.smk)."""
    files = {k: os.fspath(v) for k, v in smk.input.items()}
    files.update(getattr(smk.params, "siblings", None) or {})
    return files


def write_sidecar(path: str, fields: dict[str, Any]) -> None:
    """Write the JSON sidecar of an output that is not an image (:func:`mrflesion.layout.sidecar_path`)."""
    write_json(sidecar_path(path), fields)


def jsonable(stats: dict[str, Any]) -> dict[str, Any]:
    """``stats`` with arrays as lists and other objects as strings (for a JSON sidecar)."""
    out = {}
    for k, v in stats.items():
        if hasattr(v, "tolist"):
            v = v.tolist()
        elif not isinstance(v, str | int | float | bool | list | dict | type(None)):
            v = str(v)
        out[k] = v
    return out


def rounded_timings(timings: dict[str, float]) -> dict[str, float]:
    """Seconds rounded to milliseconds (the sidecars' ``TimingsSeconds``)."""
    return {k: round(float(v), 3) for k, v in timings.items()}
