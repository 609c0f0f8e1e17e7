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
import traceback
from typing import Any

from . import __version__
from .io import write_derivative, write_json, write_text
from .layout import sidecar_path
from .validate import InputError, check_subject
from .workflow import version_info


def _fail(message: str) -> None:
    raise StepError(message)


class StepError(RuntimeError):
    """A job-ending problem with a one-line explanation (bad input, typically)."""


def main(smk: Any, step: str, module: Any = None) -> None:
    """Run ``step`` with stdout/stderr going to the rule's log; a StepError also reaches the console.

    ``step`` is a function of this module, or of ``module`` when given (e.g. ``anat_steps``).
    """
    func = getattr(module, step) if module is not None else globals()[step]
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
        except Exception:
            traceback.print_exc()  # into the rule's log, which Snakemake shows for failed jobs
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
        inversion_efficiency=str(smk.params.get("inversion", "perfect")),
    )


def check_inputs(smk: Any) -> None:
    files = {k: smk.input[k] for k in ("mrf", "t2w", "flair", "lesion")}
    t0 = time.perf_counter()
    from .workflow import input_fingerprint

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
        _fail(str(exc))
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


# ----------------------------------------------------------------------------- quantitative maps
def reads(smk: Any) -> dict[str, str]:
    """The files a rule's job reads, by name: its named inputs and ``params.siblings``, the files
    written by the same upstream job as one of its inputs (``siblings`` in rules/common.smk)."""
    files = {k: os.fspath(v) for k, v in smk.input.items()}
    files.update(getattr(smk.params, "siblings", None) or {})
    return files


def _sidecar_for(path: str, fields: dict[str, Any]) -> None:
    """Write the JSON sidecar of an output (:func:`mrflesion.layout.sidecar_path`)."""
    write_json(sidecar_path(path), fields)


def mrf_mask(mrf: str, out_mask: str, record: dict[str, Any] | None = None) -> int:
    """Brain mask of an MRF series (Otsu on the mean image, largest component, holes filled) with its
    sidecar; returns the number of brain voxels."""
    import nibabel as nib
    import numpy as np

    from .masking import series_brain_mask

    img = nib.load(mrf)
    mask = series_brain_mask(np.asarray(img.dataobj, dtype=np.float32))
    write_derivative(out_mask, mask, img, dtype=np.uint8, sidecar={
        "Type": "Brain", "Description": "Otsu threshold of the mean MRF image, largest component, holes filled",
        "Sources": [str(mrf)], "Voxels": int(mask.sum()), **(record or {}),
    })
    return int(mask.sum())


def qmri(smk: Any) -> None:
    """Rule ``qmri``: the MRF brain mask, MPPCA denoising inside it, then dictionary matching of the
    denoised series."""
    denoise(smk)
    match(smk)


def _timing_record(checked: str) -> dict[str, Any]:
    """How the subject's MRF series was interpreted (from its input check): the resolved timing, the
    inversion model, the sidecars read and every value taken from the config; for the outputs' sidecars."""
    import json

    with open(checked) as fh:
        info = json.load(fh)
    if "timing" not in info:  # a check summary of an older version: check again
        raise StepError(f"input check record without the MRF timing, rerun the input check: {checked}")
    return {"MRFTiming": info["timing"], "TimingKey": info["timing_key"],
            "InversionEfficiency": info["inversion_efficiency"], "MRFSidecars": info["sidecars"],
            "TimingFromConfig": info["timing_from_config"]}


def denoise(smk: Any) -> None:
    """The MRF brain mask, then MPPCA denoising inside it (series and noise map); part of ``qmri``."""
    from .denoise import denoise_file

    cfg = smk.params.denoise  # what changes results; the device: snakemake.config (reruns nothing)
    t0 = time.perf_counter()
    voxels = mrf_mask(smk.input.mrf, smk.output.mask, _timing_record(smk.input.checked))
    print(f"brain mask: {voxels} voxels")
    stats = denoise_file(
        smk.input.mrf, smk.output.denoised, smk.output.sigma, mask_path=smk.output.mask,
        patch_radius=int(cfg["patch_radius"]), device=str(smk.config["denoise"]["device"]),
    )
    common = {"Sources": [str(smk.input.mrf), str(smk.output.mask)], "SoftwareStep": "MPPCA", **_jsonable(stats),
              **_timing_record(smk.input.checked)}
    _sidecar_for(smk.output.denoised, {"Description": "MPPCA-denoised MRF-EPI series", **common})
    _sidecar_for(smk.output.sigma, {"Description": "MPPCA noise standard deviation", "Units": "arbitrary", **common})
    print(f"denoise: {time.perf_counter() - t0:.1f} s")


def dictionary(smk: Any) -> None:
    from .mrf.dictionary import DictionaryGrid, build_dictionary
    from .mrf.sequence import Protocol

    cfg = smk.params.cfg
    protocol = Protocol.from_sidecar(smk.params.sidecar)
    grid = DictionaryGrid.from_config(cfg["grid"])
    t0 = time.perf_counter()
    d = build_dictionary(protocol, grid, rank_energy=float(cfg["rank_energy"]),
                         n_clusters=int(cfg["n_clusters"]), progress=True)
    d.save(smk.output[0])
    print(f"dictionary {smk.output[0]}: {protocol.n_slices} slice positions in {time.perf_counter() - t0:.1f} s")


def match(smk: Any) -> None:
    """Dictionary matching of the denoised series inside the brain mask; part of ``qmri``."""
    import json
    import tempfile

    from .mrf.matching import match_file

    cfg = smk.params.matching  # what changes results; device and block size: snakemake.config (rerun nothing)
    run = smk.config["matching"]
    t0 = time.perf_counter()
    record = _timing_record(smk.input.checked)
    f = {"mrf": smk.output.denoised, "mask": smk.output.mask, "sidecar": smk.input.sidecar,
         "dictionary": smk.input.dictionary}
    out = {"T1": smk.output.T1, "T2star": smk.output.T2star, "B1": smk.output.B1, "M0": smk.output.M0,
           "quality": smk.output.quality}
    # the series is matched with the timing its input check resolved (sidecar inheritance, values stated
    # in the config, inversion model), which is the timing the dictionary was built for
    with tempfile.TemporaryDirectory(prefix="mrflesion-timing-") as tmp:
        resolved = os.path.join(tmp, "timing.json")
        with open(resolved, "w") as fh:
            json.dump(record["MRFTiming"], fh)
        stats = match_file(
            f["mrf"], resolved, f["dictionary"], out, mask_path=f["mask"],
            mode=str(cfg["mode"]), device=str(run["device"]), block_voxels=int(run["block_voxels"]),
            threads=int(smk.threads), progress=True, refine=bool(cfg.get("refine", True)),
        )
    sources = [f["mrf"], *record["MRFSidecars"], f["mask"]]
    units = {"T1": "ms", "T2star": "ms", "B1": "1 (scale of the nominal flip angle)",
             "M0": "arbitrary", "quality": "1 (cosine of the matched atom and the signal)"}
    for key, path in out.items():
        _sidecar_for(path, {
            "Description": f"MRF dictionary matching: {key}", "Units": units[key], "Sources": sources,
            "Dictionary": f["dictionary"], **_jsonable(stats), **record,
        })
    print(f"match: {time.perf_counter() - t0:.1f} s")


def _jsonable(stats: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in stats.items():
        if hasattr(v, "tolist"):
            v = v.tolist()
        elif not isinstance(v, str | int | float | bool | list | dict | type(None)):
            v = str(v)
        out[k] = v
    return out
