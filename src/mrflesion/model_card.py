"""Model cards and apply mode: trained networks applied to new subjects without retraining.

Model card (``models/<network>/model_card.json``, written with ``models/models.json`` by the
``model_record`` rule): what a network is and what it may be applied to: its specification and
input/output normalisation, the training cohort per site (training and validation subjects; n,
controls, patients), the fingerprint of every MRF schedule it was trained on
(:meth:`mrflesion.mrf.sequence.Protocol.timing_key`: flip angles, echo and repetition times, slice
order, inversions), the software versions and the configuration's hash, its validation metrics and
its lesion operating point, and the sha256 of its weights.

Apply mode (config ``models: DIR``; ``mrflesion BIDS OUT participant --models DIR``):
:class:`ApplyPlan` stands in for the training plan. The networks are those of ``DIR/models.json``
in its order (the first leads the reports); a subject whose MRF schedule is not one the networks
were trained on is refused with one line (subject, problem, sidecar) and gets no inference; its
conventional chain still runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .layout import MODELS, file

#: The record of a models directory (file names: mrflesion.layout.MODELS).
RECORD_NAME = MODELS["record"]

#: The split name of subjects in apply mode (never seen by the networks' training or selection).
APPLY_SPLIT = "apply"


class ModelSetError(ValueError):
    """A models directory that cannot be used (one line)."""


def cohort_summary(rows: Sequence[Mapping[str, str]], split_of: Mapping[str, str]) -> list[dict[str, Any]]:
    """Per site: training and validation subjects (n, controls, patients) of a split table's rows
    (subject, site, group)."""
    sites: dict[str, dict[str, Any]] = {}
    for r in rows:
        split = split_of.get(str(r["subject"]))
        if split not in ("train", "val"):
            continue
        s = sites.setdefault(str(r["site"]), {"site": str(r["site"]), "n": 0, "controls": 0, "patients": 0,
                                               "train": 0, "val": 0})
        s["n"] += 1
        s[split] += 1
        group = str(r.get("group", ""))
        if group == "control":
            s["controls"] += 1
        elif group == "patient":
            s["patients"] += 1
    return [sites[k] for k in sorted(sites)]


def make_card(network: str, sidecar: Mapping[str, Any], checkpoint: Mapping[str, Any], weights_sha256: str,
              cohort: Mapping[str, Any], schedules: Mapping[str, Mapping[str, Any]],
              software: Mapping[str, str], config_hash: str) -> dict[str, Any]:
    """The model card of one trained network. ``sidecar``: its ``best.json``; ``checkpoint``: its
    ``best.pt`` (spec, model config, normalisation, operating point); ``cohort``: ``{"Sites": ...,
    "SplitsSha256": ...}``; ``schedules``: fingerprint -> the schedule's timing (sidecar form)."""
    from .learn.infer import OUTPUT_UNITS as UNITS
    from .learn.spec import NetworkSpec

    spec = dict(checkpoint.get("spec") or sidecar.get("Network") or {})
    return {
        "Name": network,
        "Description": sidecar.get("Description", f"U-net {network}"),
        "Network": spec,
        # the images it reads, in channel order (mrf: every measurement; *prior: the tissue stage's MNI152 priors)
        "Inputs": list(NetworkSpec.from_dict(spec).input_images) if spec.get("loss") else [],
        "ModelConfig": dict(checkpoint.get("model_config") or {}),
        "Normalisation": dict(checkpoint.get("normalisation") or {}),
        "Outputs": {o: UNITS.get(o, "n/a") for o in spec.get("outputs", [])},
        "Space": "T2w (inputs and outputs on the subject's T2w grid)",
        "TrainingCohort": {**dict(cohort), "TrainSubjects": list(sidecar.get("TrainSubjects") or []),
                           "ValidationSubjects": list(sidecar.get("ValidationSubjects") or [])},
        "MRFSchedule": {"Fingerprints": sorted(schedules),
                        "Timing": {k: dict(v) for k, v in sorted(schedules.items())},
                        "Rule": "inference refuses a subject whose schedule fingerprint is not listed"},
        "Training": dict(sidecar.get("Training") or {}),
        "EpochsCompleted": sidecar.get("EpochsCompleted"),
        "BestEpoch": sidecar.get("BestEpoch"),
        "ValidationMetrics": dict(sidecar.get("BestValidationMetrics") or {}),
        "LesionThreshold": sidecar.get("LesionThreshold"),
        "Software": dict(software),
        "ConfigSha256": config_hash,
        "Weights": {"File": Path(file(MODELS, "best", None, network="")).name, "Sha256": weights_sha256},
    }


def schedule_problem(card: Mapping[str, Any], fingerprint: str) -> str | None:
    """Why a subject with MRF schedule ``fingerprint`` may not be given to the card's network."""
    allowed = list((card.get("MRFSchedule") or {}).get("Fingerprints") or [])
    if fingerprint in allowed:
        return None
    return (f"MRF schedule {fingerprint} differs from the one network {card.get('Name')} was trained on "
            f"({', '.join(allowed) or 'none recorded'})")


class ModelSet:
    """The trained networks of a models directory: ``models.json`` and each network's card."""

    def __init__(self, models_dir: str) -> None:
        self.dir = str(models_dir).rstrip("/")
        record_path = Path(self.dir) / RECORD_NAME
        try:
            self.record = json.loads(record_path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelSetError(f"models directory {self.dir}: no readable {RECORD_NAME} "
                                f"({type(exc).__name__}): {record_path}") from None
        networks = self.record.get("Networks")
        if not isinstance(networks, dict) or not networks:
            raise ModelSetError(f"models directory {self.dir}: {RECORD_NAME} lists no networks: {record_path}")
        self.cards: dict[str, dict[str, Any]] = {}
        for net in networks:
            card_path = Path(self.card_path(net))
            weights = Path(self.weights(net))
            if not weights.is_file():
                raise ModelSetError(f"models directory {self.dir}: network {net} has no weights: {weights}")
            try:
                self.cards[net] = json.loads(card_path.read_text())
            except (OSError, ValueError) as exc:
                raise ModelSetError(f"models directory {self.dir}: network {net} has no readable model card "
                                    f"({type(exc).__name__}): {card_path}") from None
            if not self.cards[net].get("Network", {}).get("outputs"):
                raise ModelSetError(f"models directory {self.dir}: model card of {net} names no outputs: {card_path}")

    def weights(self, network: str) -> str:
        return file(MODELS, "best", self.dir, network=network)

    def history(self, network: str) -> str:
        return file(MODELS, "history", self.dir, network=network)

    def card_path(self, network: str) -> str:
        return file(MODELS, "card", self.dir, network=network)

    @property
    def networks(self) -> dict[str, dict[str, Any]]:
        """name -> network specification (as the training plan's ``networks``), in the record's order."""
        return {n: dict(c["Network"]) for n, c in self.cards.items()}

    def schedule_problem(self, fingerprint: str) -> str | None:
        for card in self.cards.values():
            problem = schedule_problem(card, fingerprint)
            if problem:
                return problem
        return None


class ApplyPlan:
    """Parse-time stand-in for :class:`mrflesion.plan.training.TrainingPlan` in apply mode: the networks
    of a models directory, every subject in the split :data:`APPLY_SPLIT`, no training."""

    def __init__(self, plan: Any, config: Mapping[str, Any], out_dir: str) -> None:
        self.plan = plan
        self.out = out_dir
        self.models = ModelSet(str(config["models"]))
        self.networks = self.models.networks
        self.split_of = {f"sub-{s.subject}": APPLY_SPLIT for s in plan.subjects.values()}
        #: stem -> why inference refuses the subject (MRF schedule), printed once at parse time
        self.refused: dict[str, str] = {}
        for stem in plan.stems():
            problem = self.models.schedule_problem(plan.schedule[stem])
            if problem:
                s = plan.subjects[stem]
                self.refused[stem] = f"{s.key}: {problem}: {s.sidecar}"

    def problem(self) -> str | None:
        return None
