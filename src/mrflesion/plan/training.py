"""The training stage's plan: the subject split per site and every training job's inputs.

Splits (docs/method.md): by participant, per site. The paper's counts (test = 2 site-1 + 3 site-2
patients, validation the same) are for 48 subjects; for a smaller cohort each count is scaled by
``n_participants / reference_subjects`` and rounded, keeping at least one test and one validation
patient per site where the site has patients to spare (:func:`scaled_counts`,
(:func:`mrflesion.learn.split.split_subjects`)). Controls always train. The split is computed when the
workflow is parsed (so a training job depends on its training and validation subjects only: test
subjects never reach training, model selection or any threshold chosen on validation data) and
written to ``group/splits.tsv`` by the ``splits`` rule.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from ..layout import TEMPLATES, WORK, file
from ..learn.spec import TRAINING_KEYS

#: Paper cohort size the default split counts refer to (docs/method.md).
PAPER_SUBJECTS = 48


#: Training images of one subject (T2w space): image kind -> (stage, output) of :data:`mrflesion.layout.DERIVATIVES`.
TRAIN_SOURCES = {
    "mrf": ("register", "MRF"),
    "T1": ("register", "T1"),
    "T2star": ("register", "T2star"),
    "NAWM": ("tissue", "NAWM"),
    "GM": ("tissue", "GM"),
    "lesion": ("register", "lesion"),
    "mask": ("register", "mask"),
    "GMprior": ("tissue", "GMprior"),
    "WMprior": ("tissue", "WMprior"),
    "CSFprior": ("tissue", "CSFprior"),
}


#: The training images' names relative to ``output_dir``; ``{stem}`` as in the workflow.
TRAIN_IMAGES = {kind: TEMPLATES[stage][key] for kind, (stage, key) in TRAIN_SOURCES.items()}


#: The classical lesion baseline of one subject (written by the ``tissue`` job, see mrflesion.baseline).
BASELINE_IMAGE = TEMPLATES["tissue"]["baseline"]


#: The image that stands for a subject's finished conventional chain in the declared inputs of the
#: jobs that read the T2w-space images (training, inference, evaluation). Its job (``tissue``) reads the
#: registered T1 map, brain mask and lesion mask (rule ``register``, whose outputs are also the other
#: maps and the MRF series) and writes GM next to it, so every image of :data:`TRAIN_IMAGES` exists and
#: is older than it; a rerun of any step before it makes it newer, which reruns its consumers. One
#: declared file per subject instead of seven keeps the plan of a large cohort fast
#: (tests/test_train_workflow.py checks that it covers the others).
READY_IMAGE = "NAWM"


def ready_file(out_dir: str, stem: str) -> str:
    """The :data:`READY_IMAGE` of one subject (session)."""
    return f"{out_dir}/" + TRAIN_IMAGES[READY_IMAGE].format(stem=stem)


#: Keys of the ``training`` config passed on to :func:`mrflesion.learn.train`.
TRAIN_KEYS = TRAINING_KEYS


SPLIT_COLUMNS = ["subject", "site", "group", "split"]


def scaled_counts(counts: int | Sequence[int], n_subjects: int, reference: int) -> list[int] | int:
    """Per-site split counts scaled to a cohort of ``n_subjects`` (no scaling when ``reference`` <= 0
    or the cohort is at least as large); a non-zero count stays at least 1."""

    def one(c: int) -> int:
        c = int(c)
        if c <= 0 or reference <= 0 or n_subjects >= reference:
            return c
        return max(1, int(math.floor(c * n_subjects / reference + 0.5)))

    if isinstance(counts, int):
        return one(counts)
    return [one(c) for c in counts]


def subject_rows(subjects: Iterable[Any]) -> list[dict[str, str]]:
    """One row per participant (sessions merged) from the workflow plan's ``SubjectInputs``."""
    rows: dict[str, dict[str, str]] = {}
    for s in subjects:
        pid = f"sub-{s.subject}"
        if pid not in rows:
            group = s.group if s.group not in (None, "") else "n/a"
            rows[pid] = {"subject": pid, "site": str(s.site), "group": str(group)}
    return [rows[k] for k in sorted(rows)]


def make_splits(rows: Sequence[Mapping[str, Any]], split_cfg: Mapping[str, Any]) -> pd.DataFrame:
    """Subject table (subject, site, group) -> the same with a ``split`` column (train/val/test)."""
    from ..learn.split import split_subjects

    table = pd.DataFrame(list(rows), columns=["subject", "site", "group"])
    if table.empty:
        return pd.DataFrame(columns=SPLIT_COLUMNS)
    n = len(table)
    ref = int(split_cfg.get("reference_subjects", PAPER_SUBJECTS))
    parts = split_subjects(
        table,
        n_test_per_site=scaled_counts(split_cfg.get("n_test_per_site", [2, 3]), n, ref),
        n_val_per_site=scaled_counts(split_cfg.get("n_val_per_site", [2, 3]), n, ref),
        seed=int(split_cfg.get("seed", 0)),
        id_col="subject",
        site_col="site",
        group_col="group",
        min_train_per_site=int(split_cfg.get("min_train_per_site", 1)),
    )
    which = {sid: name for name, ids in parts.items() for sid in ids}
    out = table.assign(split=[which[str(s)] for s in table["subject"]])
    return out.sort_values("subject", kind="stable").reset_index(drop=True)[SPLIT_COLUMNS]


def splits_text(table: pd.DataFrame) -> str:
    buf = io.StringIO()
    table[SPLIT_COLUMNS].to_csv(buf, sep="\t", index=False, lineterminator="\n")
    return buf.getvalue()


def splits_hash(table_or_text: pd.DataFrame | str) -> str:
    """sha256 of the splits table's TSV text (recorded with every model)."""
    text = table_or_text if isinstance(table_or_text, str) else splits_text(table_or_text)
    return hashlib.sha256(text.encode()).hexdigest()


def read_splits(path: str | os.PathLike[str]) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def split_of(table: pd.DataFrame) -> dict[str, str]:
    return dict(zip(table["subject"].astype(str), table["split"].astype(str), strict=True))


def needed_images(spec: Mapping[str, Any]) -> list[str]:
    """Image kinds a network's training needs: its inputs and targets, the brain and lesion masks."""
    from ..learn.spec import NetworkSpec

    s = NetworkSpec.from_dict(spec)
    kinds = list(s.input_images)
    kinds += [o for o in s.outputs if o not in kinds]
    kinds += [k for k in ("lesion", "mask") if k not in kinds]
    return [k for k in TRAIN_IMAGES if k in kinds]


def subject_images(out_dir: str, stem: str, key: str, kinds: Sequence[str]) -> dict[str, str]:
    """``SubjectPaths`` dict of one subject/session (``key`` names it, e.g. ``sub-01_ses-01``)."""
    d = {"subject": key}
    for k in kinds:
        d[k] = f"{out_dir}/" + TRAIN_IMAGES[k].format(stem=stem)
    return d


class TrainingPlan:
    """Parse-time view of the training stage for rules/train.smk: networks, split, job inputs."""

    def __init__(self, plan: Any, config: Mapping[str, Any], out_dir: str) -> None:
        from ..learn.spec import specs_from_config

        self.plan = plan
        self.out = out_dir
        self.networks = {s.name: s.to_dict() for s in specs_from_config(config["networks"])}
        self.cfg = config["training"]
        self.rows = subject_rows(plan.subjects.values())
        self.splits = make_splits(self.rows, self.cfg["split"])
        self.split_of = split_of(self.splits)
        self.train_cfg = {k: v for k, v in self.cfg.items() if k in TRAIN_KEYS}

    def stems(self, split: str) -> list[str]:
        return [st for st in self.plan.stems()
                if self.split_of.get(f"sub-{self.plan.subjects[st].subject}") == split]

    def subjects(self, network: str, split: str) -> list[dict[str, str]]:
        kinds = needed_images(self.networks[network])
        return [subject_images(self.out, st, self.plan.subjects[st].key, kinds) for st in self.stems(split)]

    def subjects_all(self, split: str) -> list[dict[str, str]]:
        """Every T2w-space image of the split's subjects (what any network may read)."""
        return [subject_images(self.out, st, self.plan.subjects[st].key, list(TRAIN_IMAGES))
                for st in self.stems(split)]

    def problem(self) -> str | None:
        """Why no network can be trained on this cohort (None when training is possible)."""
        if not self.networks:
            return "no networks configured"
        n_train, n_val = len(self.stems("train")), len(self.stems("val"))
        if not n_train or not n_val:
            return (f"the split has {n_train} training and {n_val} validation subjects "
                    "(see training.split in the config)")
        return None

    def ready_files(self) -> list[str]:
        """One file per training and validation subject standing for its finished chain
        (:data:`READY_IMAGE`); test subjects are never inputs of training."""
        return [ready_file(self.out, st) for st in self.stems("train") + self.stems("val")]

    def baseline_validation(self) -> list[dict[str, str]]:
        """The validation subjects' baseline maps with their lesion and brain masks (the baseline's
        threshold is chosen on them, as the networks' are)."""
        return [{"baseline": f"{self.out}/" + BASELINE_IMAGE.format(stem=st),
                 "lesion": f"{self.out}/" + TRAIN_IMAGES["lesion"].format(stem=st),
                 "mask": f"{self.out}/" + TRAIN_IMAGES["mask"].format(stem=st)} for st in self.stems("val")]

    def card_info(self) -> dict[str, Any]:
        """What the model cards take from the plan (rule ``model_record``): the training cohort per
        site, the MRF schedules of the training and validation subjects."""
        from ..model_card import cohort_summary

        stems = self.stems("train") + self.stems("val")
        fingerprints = sorted({self.plan.schedule[st] for st in stems})
        return {"cohort": {"Sites": cohort_summary(self.rows, self.split_of), "SplitsSha256": splits_hash(self.splits)},
                "schedules": {fp: self.plan.schedules[fp] for fp in fingerprints}}

    def training_set_record(self, work_dir: str) -> str:
        """The record of the subjects a training job reads (rule ``training_set``): what the eight
        training jobs depend on, instead of each listing every subject (planning a large cohort)."""
        return file(WORK, "training_set", work_dir)
