"""Where every output lies: one BIDS-style path builder and the table of the pipeline's derivatives.

Every derivative's file name is written here once. Rules (``rules/*.smk``), the parse-time plan
(:mod:`mrflesion.plan`) and the rule bodies ask for it by stage and key;
``tests/test_layout.py`` fails when a derivative's name is spelled anywhere else.

A subject's (session's) derivatives lie beside its inputs' layout::

    <root>/sub-X[/ses-Y]/anat/sub-X[_ses-Y]_<entities>_<suffix><extension>

The workflow calls ``sub-X[/ses-Y]/anat/sub-X[_ses-Y]`` the *stem* (the rules' wildcard ``{stem}``,
:func:`mrflesion.plan.subjects.stem_of`); the tables below give what follows it. For example
``derivative("tissue", "NAWM", "out", "sub-01/anat/sub-01")`` is
``out/sub-01/anat/sub-01_space-T2w_label-NAWM_probseg.nii.gz``.

:func:`bids` builds one name from its entities, in BIDS order (:data:`ENTITIES`), in the manner of
snakebids' ``bids()``; :func:`sidecar_path` gives the JSON sidecar of any output. The files that are not
a subject's derivatives (cohort tables, trained networks, intermediate files under ``work_dir``) are in
:data:`COHORT`, :data:`GROUP_EVALUATION`, :data:`MODELS` and :data:`WORK` (:func:`file`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

#: The entities the pipeline's names use, in the order they appear in a name (BIDS entity order; the
#: transform entities ``from``/``to``/``mode`` of BIDS-derivatives ``xfm`` files before ``space``).
ENTITIES = ("sub", "ses", "acq", "from", "to", "mode", "space", "label", "desc")

#: An entity value: BIDS-safe (letters and digits), or a placeholder (``{label}``, a Snakemake wildcard).
_VALUE = re.compile(r"[A-Za-z0-9]+|\{[A-Za-z_][A-Za-z0-9_]*\}")


def bids(root: str | os.PathLike[str] | None = None, *, suffix: str, extension: str = "",
         subject: str | None = None, session: str | None = None, datatype: str | None = None,
         stem: str | None = None, **entities: str | None) -> str:
    """One BIDS name: ``[root/][folders/]<prefix>_<key-value>..._<suffix><extension>``.

    The prefix is either ``stem`` (a path prefix that already names subject and session, e.g. the
    workflow's ``{stem}``) or built from ``subject``/``session``/``datatype``
    (``sub-X[/ses-Y][/datatype]/sub-X[_ses-Y]``); with neither, the name starts at the first entity.
    ``entities``: ``acq``, ``from_`` (or ``**{"from": ...}``), ``to``, ``mode``, ``space``, ``label``,
    ``desc``; those that are None or empty are left out. Values are letters and digits or a
    ``{placeholder}``.
    """
    if "from_" in entities:
        entities["from"] = entities.pop("from_")
    unknown = sorted(set(entities) - set(ENTITIES[2:]))
    if unknown:
        raise ValueError(f"unknown BIDS entities {unknown} (known: {', '.join(ENTITIES[2:])})")
    if stem is not None and (subject or session or datatype):
        raise ValueError("give either stem or subject/session/datatype")
    values = {"sub": subject, "ses": session, **entities}
    parts = [f"{k}-{_check(k, values[k])}" for k in ENTITIES if values.get(k)]
    if stem is not None:
        parts.insert(0, stem)
    parts.append(suffix)
    name = "_".join(parts) + extension
    folders = [f"sub-{subject}"] if subject else []
    if subject and session:
        folders.append(f"ses-{session}")
    if datatype:
        folders.append(datatype)
    head = [os.fspath(root).rstrip("/")] if root not in (None, "") else []
    return "/".join([*head, *folders, name])


def _check(key: str, value: Any) -> str:
    value = str(value)
    if not _VALUE.fullmatch(value):
        raise ValueError(f"BIDS {key} label {value!r} must be letters and digits")
    return value


def stem(subject: str, session: str | None = None, datatype: str = "anat") -> str:
    """The stem of a subject's (session's) files: ``sub-X[/ses-Y]/<datatype>/sub-X[_ses-Y]``."""
    folder = f"sub-{subject}/ses-{session}" if session else f"sub-{subject}"
    key = f"sub-{subject}_ses-{session}" if session else f"sub-{subject}"
    return f"{folder}/{datatype}/{key}"


#: What the rules' wildcard ``{stem}`` matches (:func:`stem` of the ``anat`` datatype).
STEM_REGEX = r"sub-[A-Za-z0-9]+(/ses-[A-Za-z0-9]+)?/anat/sub-[A-Za-z0-9]+(_ses-[A-Za-z0-9]+)?"


def sidecar_path(path: str | os.PathLike[str]) -> str:
    """The JSON sidecar of an output (BIDS: the same name, extension ``.json``): the extension is
    everything from the first dot of the file name (``.nii.gz``, ``.nii``, ``.mat``, ``.tsv``, ...)."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    return os.path.join(folder, name.split(".", 1)[0] + ".json")


# ---------------------------------------------------------------------------------------- derivatives

_T2W = {"space": "T2w"}
_MRF = {"acq": "MRFEPI"}
_MRF_T2W = {**_MRF, **_T2W}
_MRF_TO_T2W = {"from": "MRF", "to": "T2w", "mode": "image"}

#: stage -> key -> the entities of the file after the stem (``suffix``, ``extension`` default ``.nii.gz``).
#: The keys are the rules' output names. ``{label}`` in ``network`` is the network's label
#: (:func:`mrflesion.plan.evaluation.net_label`). ``truth`` lies under the phantom's ``derivatives/truth``
#: (written by :mod:`mrflesion.phantom`), every other stage under ``output_dir``.
DERIVATIVES: dict[str, dict[str, dict[str, str]]] = {
    # rule qmri: brain mask, MPPCA denoising and dictionary matching of the MRF series (MRF grid)
    "qmri": {
        "mask": {**_MRF, "desc": "brain", "suffix": "mask"},
        "denoised": {**_MRF, "desc": "denoised", "suffix": "MRF"},
        "sigma": {**_MRF, "desc": "mppca", "suffix": "noisemap"},
        "T1": {**_MRF, "suffix": "T1map"},
        "T2star": {**_MRF, "suffix": "T2starmap"},
        "B1": {**_MRF, "suffix": "TB1map"},
        "M0": {**_MRF, "suffix": "M0map"},
        "quality": {**_MRF, "desc": "match", "suffix": "quality"},
    },
    # rule register: transforms, the maps, series and brain mask in T2w space, the FLAIR and the manual
    # lesion mask in T2w space (warp and inverse_warp only with registration.phase_encode_stage)
    "register": {
        "rigid": {**_MRF_TO_T2W, "desc": "rigid", "suffix": "xfm", "extension": ".mat"},
        "xfm_json": {**_MRF_TO_T2W, "suffix": "xfm", "extension": ".json"},
        "warp": {**_MRF_TO_T2W, "desc": "pewarp", "suffix": "xfm"},
        "inverse_warp": {"from": "T2w", "to": "MRF", "mode": "image", "desc": "pewarp", "suffix": "xfm"},
        "T1": {**_MRF_T2W, "suffix": "T1map"},
        "T2star": {**_MRF_T2W, "suffix": "T2starmap"},
        "B1": {**_MRF_T2W, "suffix": "TB1map"},
        "M0": {**_MRF_T2W, "suffix": "M0map"},
        "MRF": {**_MRF_T2W, "suffix": "MRF"},
        "mask": {**_T2W, "desc": "brain", "suffix": "mask"},
        "flair_xfm": {"from": "FLAIR", "to": "T2w", "mode": "image", "suffix": "xfm", "extension": ".mat"},
        "lesion": {**_T2W, "label": "lesion", "suffix": "mask"},
        "flair": {**_T2W, "suffix": "FLAIR"},
    },
    # rule tissue: SPM-style tissue probabilities and the classical lesion baseline (T2w space)
    "tissue": {
        "GM": {**_T2W, "label": "GM", "suffix": "probseg"},
        "WM": {**_T2W, "label": "WM", "suffix": "probseg"},
        "CSF": {**_T2W, "label": "CSF", "suffix": "probseg"},
        "NAWM": {**_T2W, "label": "NAWM", "suffix": "probseg"},
        # the MNI152 priors as warped to the subject (an input of networks with ``priors: true``)
        "GMprior": {**_T2W, "label": "GM", "desc": "prior", "suffix": "probseg"},
        "WMprior": {**_T2W, "label": "WM", "desc": "prior", "suffix": "probseg"},
        "CSFprior": {**_T2W, "label": "CSF", "desc": "prior", "suffix": "probseg"},
        "baseline": {**_T2W, "label": "lesion", "desc": "baseline", "suffix": "probseg"},
    },
    # rule evaluate_subject: a network's outputs (T2w space, physical units)
    "network": {
        "T1": {**_T2W, "desc": "{label}", "suffix": "T1map"},
        "T2star": {**_T2W, "desc": "{label}", "suffix": "T2starmap"},
        "NAWM": {**_T2W, "label": "NAWM", "desc": "{label}", "suffix": "probseg"},
        "GM": {**_T2W, "label": "GM", "desc": "{label}", "suffix": "probseg"},
        "lesion": {**_T2W, "label": "lesion", "desc": "{label}", "suffix": "probseg"},
    },
    # rule evaluate_subject: the subject's evaluation tables, per-lesion table and report
    "evaluation": {
        "metrics": {"desc": "evaluation", "suffix": "metrics", "extension": ".tsv"},
        "json": {"desc": "evaluation", "suffix": "metrics", "extension": ".json"},
        "curves": {"desc": "evaluation", "suffix": "curves", "extension": ".tsv"},
        "lesions": {"desc": "evaluation", "suffix": "lesions", "extension": ".tsv"},
        "quant": {**_T2W, "desc": "lesions", "suffix": "quant", "extension": ".tsv"},
        "report": {"suffix": "report", "extension": ".html"},
    },
    # the phantom's ground truth in T2w space that the evaluation reads (under derivatives/truth)
    "truth": {
        "T1": {**_T2W, "suffix": "T1map"},
        "T2star": {**_T2W, "suffix": "T2starmap"},
        "WM": {**_T2W, "label": "WM", "suffix": "probseg"},
        "GM": {**_T2W, "label": "GM", "suffix": "probseg"},
        "lesion": {**_T2W, "label": "lesion", "suffix": "mask"},
        "lesionid": {**_T2W, "desc": "lesionid", "suffix": "dseg"},
    },
    # rule longitudinal_prepare (one job per baseline/follow-up pair, on the follow-up's stem): both
    # FLAIRs in the pair's halfway space, normalised, its brain mask, the manual new/enlarged mask there
    # (training target), the transforms, and the baseline's manual lesion mask on the follow-up grid
    "longitudinal": {
        "baseline": {"space": "halfway", "desc": "baseline", "suffix": "FLAIR"},
        "followup": {"space": "halfway", "desc": "followup", "suffix": "FLAIR"},
        "brain": {"space": "halfway", "desc": "brain", "suffix": "mask"},
        "target": {"space": "halfway", "label": "newenlarged", "suffix": "mask"},
        "xfm": {"desc": "halfway", "suffix": "xfm", "extension": ".json"},
        "lesion_baseline": {"space": "FLAIR", "label": "lesion", "desc": "baseline", "suffix": "mask"},
    },
    # rule longitudinal_evaluate: each method's new/enlarged map on the follow-up's FLAIR grid
    # ({label}: the network's name or ``subtraction``), the pair's metrics and report
    "longitudinal_method": {
        "prob": {"space": "FLAIR", "label": "newenlarged", "desc": "{label}", "suffix": "probseg"},
        "mask": {"space": "FLAIR", "label": "newenlarged", "desc": "{label}", "suffix": "mask"},
    },
    "longitudinal_evaluation": {
        "metrics": {"desc": "longitudinal", "suffix": "metrics", "extension": ".tsv"},
        "lesions": {"desc": "longitudinal", "suffix": "lesions", "extension": ".tsv"},
        "report": {"desc": "longitudinal", "suffix": "report", "extension": ".html"},
    },
    # the phantom's true new/enlarged lesions on the follow-up's FLAIR grid (mask; dseg 1 new, 2 enlarged;
    # lesionid: the lesion each voxel's new tissue belongs to)
    "truth_longitudinal": {
        "mask": {"space": "FLAIR", "label": "newenlarged", "suffix": "mask"},
        "dseg": {"space": "FLAIR", "desc": "newenlarged", "suffix": "dseg"},
        "lesionid": {"space": "FLAIR", "desc": "newenlargedid", "suffix": "dseg"},
    },
    # the phantom's per-lesion truth (the BIDS dseg look-up table of truth ``lesionid``)
    "truth_table": {
        "lesionid": {**_T2W, "desc": "lesionid", "suffix": "dseg", "extension": ".tsv"},
    },
}


def _template(spec: Mapping[str, str]) -> str:
    spec = dict(spec)
    suffix = spec.pop("suffix")
    extension = spec.pop("extension", ".nii.gz")
    return bids(stem="{stem}", suffix=suffix, extension=extension, **spec)


#: stage -> key -> name template with ``{stem}`` (and ``{label}``), relative to the stage's root.
TEMPLATES: dict[str, dict[str, str]] = {
    stage: {key: _template(spec) for key, spec in table.items()} for stage, table in DERIVATIVES.items()
}


def derivative(stage: str, key: str, root: str | None = None, stem: str = "{stem}", **fill: str) -> str:
    """The path of one derivative: ``<root>/<stem>_...`` (``stem`` default: the rules' wildcard
    ``{stem}``; ``fill``: the other placeholders, e.g. ``label``)."""
    name = TEMPLATES[stage][key].format(stem=stem, **fill)
    return name if root is None else f"{root}/{name}"


def derivatives(stage: str, root: str | None = None, stem: str = "{stem}", keys: Iterable[str] | None = None,
                omit: Iterable[str] = (), **fill: str) -> dict[str, str]:
    """The paths of a stage's derivatives (``keys``: those only, in that order; ``omit``: all but these),
    key -> path, in the table's order."""
    omit = set(omit)
    chosen = list(TEMPLATES[stage]) if keys is None else list(keys)
    return {k: derivative(stage, k, root, stem, **fill) for k in chosen if k not in omit}


def stem_of_path(path: str | os.PathLike[str], stage: str, key: str) -> str:
    """The stem (path prefix) of a derivative's path: the inverse of :func:`derivative` for entities
    without placeholders. Raises ValueError when ``path`` is not that derivative."""
    path = os.fspath(path)
    tail = TEMPLATES[stage][key].removeprefix("{stem}")
    if not path.endswith(tail) or len(path) == len(tail):
        raise ValueError(f"not a {stage} {key} output (must end with {tail}): {path}")
    return path[: -len(tail)]


# ---------------------------------------------------------------------------------------- other files

#: The cohort's files under ``output_dir`` (rules dataset_description, group_inputs, splits).
COHORT = {
    "description": "dataset_description.json",
    "inputs": "group/inputs.tsv",
    "splits": "group/splits.tsv",
    "models": "models",  # the trained networks (:data:`MODELS`)
}

#: The group evaluation's tables and report under ``output_dir`` (rule group_evaluation; its output keys).
GROUP_EVALUATION = {
    "metrics": "group/metrics.tsv",
    "summary": "group/summary_sites.tsv",
    "site_tests": "group/tests_sites.tsv",
    "network_tests": "group/tests_networks.tsv",
    "failed": "group/failed.tsv",
    "times": "group/times.tsv",
    "lesions": "group/lesions.tsv",
    "lesion_sites": "group/lesions_sites.tsv",
    "report": "group/report.html",
}

#: The longitudinal stage's cohort files under ``output_dir`` (rules longitudinal_*): the pairs and their
#: split, the trained network and the comparator's thresholds, the per-pair metrics, per-site tables and
#: the report.
LONGITUDINAL = {
    "pairs": "group/longitudinal_pairs.tsv",
    "best": "models/longitudinal/{network}/best.pt",
    "history": "models/longitudinal/{network}/history.tsv",
    "comparator": "models/longitudinal/subtraction.json",
    "metrics": "group/longitudinal_metrics.tsv",
    "summary": "group/longitudinal_summary_sites.tsv",
    "tests": "group/longitudinal_tests.tsv",
    "report": "group/longitudinal_report.html",
}

#: The trained networks, relative to the models directory (``output_dir/models``; in apply mode the
#: config's ``models``): the record of every network, and per network its weights, training history,
#: training sidecar and model card.
MODELS = {
    "record": "models.json",
    "best": "{network}/best.pt",
    "history": "{network}/history.tsv",
    "sidecar": "{network}/best.json",
    "card": "{network}/model_card.json",
}

#: Intermediate files under ``work_dir``: a subject's input check, the dictionary of a sequence timing,
#: a rule's benchmark of a subject, the training set record, a network's resumable training state and
#: the record of a failed input check.
WORK = {
    "inputs": "inputs/{stem}_inputs.json",
    "dictionary": "dictionaries/mrfdict_{timing}.npz",
    "benchmark": "benchmarks/{step}/{stem}.tsv",
    "training_set": "train/training_set.json",
    "train_state": "train/{network}",
    "longitudinal_state": "train/longitudinal/{network}",
    "failed_check": "logs/check_inputs/{stem}.failed.json",  # beside the check's log (mrflesion.plan.subjects)
}


class _Keep(dict):
    """format_map mapping that leaves placeholders it is not given (Snakemake wildcards) as they are."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def file(table: Mapping[str, str], key: str, root: str | None, **fill: str) -> str:
    """``<root>/<table[key]>`` with the given placeholders filled in, the others kept (e.g. ``{stem}``)."""
    name = table[key].format_map(_Keep(fill)) if fill or "{" in table[key] else table[key]
    return name if root is None else f"{root}/{name}"


def files(table: Mapping[str, str], root: str | None, **fill: str) -> dict[str, str]:
    """Every file of ``table`` (:func:`file`), key -> path."""
    return {k: file(table, k, root, **fill) for k in table}
