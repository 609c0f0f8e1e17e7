"""Rule bodies of the training stage: subject splits and one network per job.

Each ``smk`` function reads ``snakemake.input/output/params`` and calls a plain function of this
module (usable without Snakemake); scripts/splits.py and scripts/train.py run them through
``mrflesion.steps.main(snakemake, "<name>", learn_steps)`` for logging and error handling.

Splits (docs/method.md): by participant, per site. The paper's counts (test = 2 site-1 + 3 site-2
patients, validation the same) are for 48 subjects; for a smaller cohort each count is scaled by
``n_participants / reference_subjects`` and rounded, keeping at least one test and one validation
patient per site where the site has patients to spare (:func:`scaled_counts`,
:func:`mrflesion.learn.split_subjects`). Controls always train. The split is computed when the
workflow is parsed (so a training job depends on its training and validation subjects only: test
subjects never reach training, model selection or any threshold chosen on validation data) and
written to ``group/splits.tsv`` by the ``splits`` rule.

Training (one job per entry of ``networks:``): the registered subjects in T2w space (raw MRF series,
T1/T2* maps, NAWM/GM probabilities, lesion and brain masks) feed :func:`mrflesion.learn.train`.
The resumable state (``last.pt``, its own ``best.pt`` and ``history.tsv``) lives in
``work_dir/train/<network>/``; a job that is preempted (SIGTERM/SIGUSR1: exit code 75) or fails
continues from there when Snakemake runs it again (the state is not a declared output, so Snakemake
does not delete it). Only at the end are ``best.pt``, ``history.tsv`` and the sidecar ``best.json``
copied to ``output_dir/models/<network>/``. A state written with other settings (architecture,
patches, subjects, ...) is discarded and training starts afresh; raising ``epochs`` continues it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from .io import write_json, write_text
from .layout import TEMPLATES, WORK, file
from .learn.spec import NETWORK_TRAINING_KEYS, TRAINING_KEYS

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


# ---------------------------------------------------------------------------------------- splits


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
    from .learn.split import split_subjects

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


# ---------------------------------------------------------------------------------------- training


def needed_images(spec: Mapping[str, Any]) -> list[str]:
    """Image kinds a network's training needs: its inputs and targets, the brain and lesion masks."""
    from .learn.spec import NetworkSpec

    s = NetworkSpec.from_dict(spec)
    kinds = ["mrf"] if s.uses_mrf else list(s.inputs)
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
        from .learn.spec import specs_from_config

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
        from .model_card import cohort_summary

        stems = self.stems("train") + self.stems("val")
        fingerprints = sorted({self.plan.schedule[st] for st in stems})
        return {"cohort": {"Sites": cohort_summary(self.rows, self.split_of), "SplitsSha256": splits_hash(self.splits)},
                "schedules": {fp: self.plan.schedules[fp] for fp in fingerprints}}

    def training_set_record(self, work_dir: str) -> str:
        """The record of the subjects a training job reads (rule ``training_set``): what the eight
        training jobs depend on, instead of each listing every subject (planning a large cohort)."""
        return file(WORK, "training_set", work_dir)


def train_arguments(cfg: Mapping[str, Any], spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The keyword arguments of :func:`mrflesion.learn.train` from the ``training`` config, with the
    options a network entry sets for itself (``spec``; :data:`mrflesion.learn.spec.NETWORK_TRAINING_KEYS`)
    taking precedence."""
    kw = {k: cfg[k] for k in TRAIN_KEYS if k in cfg}
    kw.update({k: v for k, v in (spec or {}).items() if k in NETWORK_TRAINING_KEYS})
    if "widths" in kw:
        kw["widths"] = tuple(int(w) for w in kw["widths"])
    return kw


def _fresh_state_needed(state_dir: Path, epochs: int) -> str | None:
    """Reason to discard ``state_dir`` before training, or None to resume from it."""
    last = state_dir / "last.pt"
    if not last.exists():
        return None
    from .learn import checkpoint

    try:
        done = int(checkpoint.load(last)["epochs_done"])
    except Exception as exc:  # unreadable: a crash while writing is excluded by atomic saves
        return f"unreadable checkpoint ({type(exc).__name__})"
    if done > epochs:
        return f"checkpoint has {done} epochs, more than the {epochs} asked for"
    return None


def run_training(
    spec: Mapping[str, Any],
    train_subjects: Sequence[Mapping[str, Any]],
    val_subjects: Sequence[Mapping[str, Any]],
    cfg: Mapping[str, Any],
    state_dir: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    threads: int = 1,
    splits_sha256: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one network (resuming from ``state_dir``) and publish ``best.pt``, ``history.tsv`` and
    ``best.json`` in ``model_dir``. Returns the sidecar's content."""
    from .device import resolve_device
    from .learn.train import ResumeMismatch, train

    state = Path(state_dir)
    model = Path(model_dir)
    kw = train_arguments(cfg, spec)
    epochs = int(kw.pop("epochs"))
    reason = _fresh_state_needed(state, epochs)
    if reason:
        print(f"[{spec['name']}] starting afresh: {reason}")
        shutil.rmtree(state)
    t0 = time.time()
    try:
        summary = train(spec, train_subjects, val_subjects, state, epochs, num_threads=threads,
                        progress=progress, **kw)
    except ResumeMismatch as exc:
        print(f"[{spec['name']}] starting afresh: {exc}")
        shutil.rmtree(state)
        summary = train(spec, train_subjects, val_subjects, state, epochs, num_threads=threads,
                        progress=progress, **kw)
    wall = time.time() - t0
    history = summary.pop("history")
    model.mkdir(parents=True, exist_ok=True)
    for name in ("best.pt", "history.tsv"):
        tmp = model / f".{name}.tmp"
        shutil.copyfile(state / name, tmp)
        os.replace(tmp, model / name)
    device = resolve_device(kw.get("device", "auto"))
    best_row = next((r for r in history if int(r["epoch"]) == summary["best_epoch"]), {})
    chosen = summary.get("lesion_threshold")
    sidecar = {
        "Description": f"U-net {spec['name']} ({spec['loss']} loss): weights with the lowest validation loss",
        "Network": dict(spec),
        "Training": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()},
                     "epochs": epochs},
        "Normalisation": "see mrflesion.learn.data.Normalisation (stored in best.pt)",
        "TrainSubjects": [s["subject"] for s in train_subjects],
        "ValidationSubjects": [s["subject"] for s in val_subjects],
        "SplitsSha256": splits_sha256,
        "EpochsCompleted": summary["epochs_completed"],
        "BestEpoch": summary["best_epoch"],
        "BestValidationLoss": summary["best_val_loss"],
        "BestValidationMetrics": {
            k: (float(v) if math.isfinite(float(v)) else None) for k, v in best_row.items() if k.startswith("val_")
        },
        "LesionThreshold": operating_point_record(chosen),
        "Parameters": summary["parameters"],
        "Device": str(device),
        "Threads": int(threads),
        "Host": platform.node(),
        "TimingsSeconds": {
            "job": round(wall, 2),
            "epochs_total": round(sum(float(r["seconds"]) for r in history), 2),
            "per_epoch": [round(float(r["seconds"]), 2) for r in history],
        },
    }
    write_json(model / "best.json", sidecar)
    return sidecar


# ---------------------------------------------------------------------------------------- rule bodies


def splits(smk: Any) -> None:
    """``group/splits.tsv`` from the plan's subject table and ``training.split``."""
    table = make_splits(smk.params.rows, smk.params.cfg)
    text = splits_text(table)
    if smk.params.get("expected") and splits_hash(text) != smk.params.expected:
        from .steps import StepError

        raise StepError("splits differ from the ones the workflow was planned with (rerun snakemake)")
    Path(smk.output[0]).parent.mkdir(parents=True, exist_ok=True)
    write_text(smk.output[0], text)
    counts = table.groupby(["split", "site"]).size().to_dict()
    print("splits:", json.dumps({f"{k[0]}/{k[1]}": int(v) for k, v in counts.items()}))


def train_network(smk: Any) -> None:
    """One network of ``networks:`` on the training/validation subjects of ``group/splits.tsv``."""
    from .steps import StepError

    table = read_splits(smk.input.splits)
    which = split_of(table)
    train_subjects = list(smk.params.train_subjects)
    val_subjects = list(smk.params.val_subjects)
    for name, subjects in (("train", train_subjects), ("val", val_subjects)):
        for s in subjects:
            pid = str(s["subject"]).split("_")[0]
            if which.get(pid) != name:
                raise StepError(f"{pid} is planned for {name} but {smk.input.splits} says "
                                f"{which.get(pid, 'nothing')}")
    if not train_subjects or not val_subjects:
        raise StepError("training needs at least one training and one validation subject")
    out = Path(smk.output.best).parent
    run_training(
        smk.params.spec,
        train_subjects,
        val_subjects,
        {**smk.params.cfg, "device": smk.config["training"]["device"]},  # the device: not a param (reruns nothing)
        smk.params.state_dir,
        out,
        threads=int(smk.threads),
        splits_sha256=splits_hash(Path(smk.input.splits).read_text()),
        progress=True,
    )


def training_set(smk: Any) -> None:
    """``train/training_set.json``: the training and validation subjects with the size and mtime of
    their images, once all of them exist (what the training jobs depend on)."""
    record: dict[str, Any] = {}
    for split in ("train", "val"):
        rows = []
        for s in smk.params.subjects[split]:
            images = {}
            for k, v in s.items():
                if k == "subject":
                    continue
                try:
                    st = os.stat(v)
                except FileNotFoundError:
                    raise FileNotFoundError(f"{s['subject']}: {v} is missing (rerun its chain)") from None
                images[k] = {"path": v, "bytes": st.st_size, "mtime": st.st_mtime}
            rows.append({"subject": s["subject"], "images": images})
        record[split] = rows
    write_json(smk.output[0], record)
    print(f"training set: {len(record['train'])} training and {len(record['val'])} validation subjects")


def model_record(smk: Any) -> None:
    """``models/models.json``: what inference and evaluation depend on, one entry per network (the
    weights' path and sha256, the training history, the training sidecar's summary). One small
    file instead of every network's outputs keeps each of the thousands of inference jobs' input
    lists short when a large cohort is planned."""
    record = {}
    inputs = zip(smk.params.networks, smk.input.best, smk.input.history, smk.input.sidecar, strict=True)
    for net, best, history, sidecar in inputs:
        side = json.loads(Path(sidecar).read_text())
        record[net] = {
            "Weights": str(best), "WeightsSha256": hashlib.sha256(Path(best).read_bytes()).hexdigest(),
            "History": str(history), "EpochsCompleted": side.get("EpochsCompleted"),
            "BestEpoch": side.get("BestEpoch"), "BestValidationMetrics": side.get("BestValidationMetrics"),
            "LesionThreshold": side.get("LesionThreshold"),
        }
    write_json(smk.output.record, {"Networks": record, "Baseline": baseline_threshold(smk.params.baseline)})
    from .model_card import config_sha256

    # the configuration's hash from snakemake.config, not a param: a param would rerun on any setting
    write_model_cards(smk.params.networks, smk.input.best, smk.input.sidecar, smk.output.cards,
                      {**smk.params.card, "config_sha256": config_sha256(smk.config)})


def write_model_cards(networks: Sequence[str], best: Sequence[str], sidecars: Sequence[str], cards: Sequence[str],
                      info: Mapping[str, Any]) -> None:
    """``models/<network>/model_card.json`` of every network (:func:`mrflesion.model_card.make_card`);
    ``info``: :meth:`TrainingPlan.card_info` and ``config_sha256``."""
    from .learn import checkpoint
    from .model_card import make_card
    from .workflow import version_info

    software = version_info()
    for net, weights, sidecar, card in zip(networks, best, sidecars, cards, strict=True):
        ck = checkpoint.load(weights)
        side = json.loads(Path(sidecar).read_text())
        write_json(card, make_card(net, side, ck, hashlib.sha256(Path(weights).read_bytes()).hexdigest(),
                                   info["cohort"], info["schedules"], software, info["config_sha256"]))


def baseline_threshold(subjects: Sequence[Mapping[str, str]]) -> dict[str, Any]:
    """The classical baseline's operating point chosen like the networks' on the validation subjects
    (:func:`mrflesion.evaluate.choose_operating_point`)."""
    import nibabel as nib
    import numpy as np

    from .evaluate.lesionwise import choose_operating_point
    from .evaluate.metrics import voxel_volume_ml

    cases = []
    for s in subjects:
        img = nib.load(s["baseline"])
        brain = np.asarray(nib.load(s["mask"]).dataobj) > 0.5
        prob = np.asarray(img.dataobj, dtype=np.float32) * brain
        cases.append((prob, np.asarray(nib.load(s["lesion"]).dataobj) > 0.5,
                      voxel_volume_ml(img.header.get_zooms()[:3])))
    return {"LesionThreshold": operating_point_record(choose_operating_point(cases)),
            "ValidationSubjects": [s["baseline"] for s in subjects]}


def operating_point_record(chosen: Mapping[str, float] | None) -> dict[str, Any] | None:
    """The ``LesionThreshold`` entry of a model's sidecar and of ``models.json``."""
    if chosen is None:
        return None
    return {"validation": chosen["threshold"], "validation_dice": chosen["dice"],
            "min_lesion_ml": chosen["min_lesion_ml"], "validation_lesionwise_f1": chosen["f1"],
            "rule": "threshold 0.01-0.99 maximising the pooled lesion Dice of the validation subjects, then the "
                    "minimum lesion size maximising their mean lesion-wise F1"}
