"""Rule bodies of the training stage: the split table, the training set record, one network per job
and the models record with the model cards.

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
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..io import write_json, write_text
from ..learn.spec import NETWORK_TRAINING_KEYS
from ..plan.training import TRAIN_KEYS, make_splits, read_splits, split_of, splits_hash, splits_text
from ..provenance import config_sha256, version_info
from . import StepError


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
    from ..learn import checkpoint

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
    from ..device import resolve_device
    from ..learn.train import ResumeMismatch, train

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


def splits(smk: Any) -> None:
    """``group/splits.tsv`` from the plan's subject table and ``training.split``."""
    table = make_splits(smk.params.rows, smk.params.cfg)
    text = splits_text(table)
    if smk.params.get("expected") and splits_hash(text) != smk.params.expected:
        raise StepError("splits differ from the ones the workflow was planned with (rerun snakemake)")
    Path(smk.output[0]).parent.mkdir(parents=True, exist_ok=True)
    write_text(smk.output[0], text)
    counts = table.groupby(["split", "site"]).size().to_dict()
    print("splits:", json.dumps({f"{k[0]}/{k[1]}": int(v) for k, v in counts.items()}))


def train_network(smk: Any) -> None:
    """One network of ``networks:`` on the training/validation subjects of ``group/splits.tsv``."""
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
    # the configuration's hash from snakemake.config, not a param: a param would rerun on any setting
    write_model_cards(smk.params.networks, smk.input.best, smk.input.sidecar, smk.output.cards,
                      {**smk.params.card, "config_sha256": config_sha256(smk.config)})


def write_model_cards(networks: Sequence[str], best: Sequence[str], sidecars: Sequence[str], cards: Sequence[str],
                      info: Mapping[str, Any]) -> None:
    """``models/<network>/model_card.json`` of every network (:func:`mrflesion.model_card.make_card`);
    ``info``: :meth:`TrainingPlan.card_info` and ``config_sha256``."""
    from ..learn import checkpoint
    from ..model_card import make_card

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

    from ..evaluate.lesionwise import choose_operating_point
    from ..evaluate.metrics import voxel_volume_ml

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
