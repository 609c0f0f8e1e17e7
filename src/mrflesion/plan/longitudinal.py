"""Parse-time view of the longitudinal stage for rules/longitudinal.smk: pairs, their split, job inputs.

The split is the cohort's subject-level split (:func:`mrflesion.plan.training.make_splits` with the
config's ``training.split``: the same table the MRF networks use), so a test subject is a test subject
for every method. The network trains on the training pairs that have a manual new/enlarged mask,
selects its epoch on the validation pairs; the comparator's thresholds are chosen on both; test pairs
reach neither.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from .. import layout
from ..longitudinal.pairs import Pair, make_pairs
from .training import make_splits, split_of, subject_rows

COMPARATOR = "subtraction"


class LongitudinalPlan:
    def __init__(self, plan: Any, config: Mapping[str, Any], out_dir: str, work_dir: str,
                 apply_mode: bool = False) -> None:
        self.cfg = config["longitudinal"]
        self.out = out_dir
        self.work = work_dir
        self.phantom = bool(plan.phantom)
        self.truth_root = f"{plan.bids_dir}/derivatives/truth"
        self.pairs: dict[str, Pair] = {}
        self.sessions: dict[tuple[str, str | None], Any] = {}
        self.unpaired: list[tuple[str, str]] = []
        self.network = str(self.cfg["network"].get("name", "Siamese3D"))
        self.problem: str | None = None
        if not self.cfg.get("enabled", True):
            self.problem = "longitudinal.enabled is false"
            return
        self.sessions = {(s.subject, s.session): s for s in plan.subjects.values()}
        pairs, self.unpaired = make_pairs(plan.subjects.values(), self.cfg, plan.bids_dir, self.phantom)
        self.pairs = {p.stem: p for p in pairs}
        splits = make_splits(subject_rows(plan.subjects.values()), config["training"]["split"])
        self.split_of = split_of(splits)
        if not self.pairs:
            self.problem = "no subject has two sessions"
        elif apply_mode:
            self.problem = "apply mode (models:) does not train or apply the longitudinal network yet"
        elif not self.stems("train", annotated=True):
            self.problem = "no training pair has a manual new/enlarged mask"
        if self.problem and self.pairs:
            print(f"mrflesion: no longitudinal stage: {self.problem}", file=sys.stderr)

    @property
    def enabled(self) -> bool:
        return self.problem is None

    def split(self, stem: str) -> str:
        return self.split_of.get(f"sub-{self.pairs[stem].subject}", "train")

    def stems(self, split: str | None = None, annotated: bool = False) -> list[str]:
        return [s for s in sorted(self.pairs)
                if (split is None or self.split(s) == split) and (not annotated or self.pairs[s].reference)]

    def pair_id(self, stem: str) -> str:
        return self.pairs[stem].key

    # ------------------------------------------------------------------ files
    def prepared(self, stem: str, keys: tuple[str, ...] = ("baseline", "followup", "brain", "xfm")) -> dict[str, str]:
        return layout.derivatives("longitudinal", self.out, stem=stem, keys=keys)

    def training_files(self, stem: str) -> dict[str, str]:
        return self.prepared(stem, ("baseline", "followup", "brain", "target"))

    def pretrain_sessions(self) -> list[dict[str, str]]:
        """The single time points the encoder is pre-trained on (``network.pretrain_epochs`` > 0): both
        sessions of every training pair, each FLAIR with its manual lesion mask (key, flair, lesion)."""
        if not int(self.cfg["network"].get("pretrain_epochs", 0)):
            return []
        out = []
        for stem in self.stems("train", annotated=True):
            p = self.pairs[stem]
            for ses in (p.baseline, p.followup):
                s = self.sessions[(p.subject, ses)]
                if "lesion" in s.files:
                    out.append({"key": f"sub-{p.subject}_ses-{ses}", "flair": s.files["flair"],
                                "lesion": s.files["lesion"]})
        return sorted({d["key"]: d for d in out}.values(), key=lambda d: d["key"])

    def model_files(self) -> dict[str, str]:
        return {k: layout.file(layout.LONGITUDINAL, k, self.out, network=self.network) for k in ("best", "history")}

    def methods(self) -> list[str]:
        return [self.network, COMPARATOR]

    def method_outputs(self, stem: str) -> dict[str, str]:
        out = {}
        for m in self.methods():
            for k in ("prob", "mask"):
                out[f"{k}_{m}"] = layout.derivative("longitudinal_method", k, self.out, stem=stem, label=m)
        return out

    def evaluation_outputs(self, stem: str) -> dict[str, str]:
        return layout.derivatives("longitudinal_evaluation", self.out, stem=stem)

    def reference(self, stem: str) -> dict[str, str]:
        """The pair's reference: the phantom's truth (mask and dseg) or the manual mask, where any."""
        p = self.pairs[stem]
        if self.phantom:
            return {key: layout.derivative("truth_longitudinal", k, self.truth_root, stem=stem)
                    for key, k in (("reference", "mask"), ("reference_dseg", "dseg"), ("reference_ids", "lesionid"))}
        return {"reference": p.reference} if p.reference else {}

    def evaluate_inputs(self, stem: str) -> dict[str, str]:
        p = self.pairs[stem]
        files = {**self.prepared(stem), "flair_followup": p.flair_followup, **self.reference(stem),
                 "model": self.model_files()["best"],
                 "comparator": layout.file(layout.LONGITUDINAL, "comparator", self.out)}
        if p.lesion_baseline:
            files["lesion_baseline"] = layout.derivative("longitudinal", "lesion_baseline", self.out, stem=stem)
        return files

    def phantom_files(self) -> list[str]:
        """What the phantom writes for the pairs: the truth and the manual new/enlarged masks."""
        if not self.phantom:
            return []
        out = []
        for stem, p in sorted(self.pairs.items()):
            out += list(self.reference(stem).values())
            if p.reference:
                out.append(p.reference)
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One row per pair (the pairs table)."""
        return [{"pair": self.pair_id(s), **self.pairs[s].to_dict(), "split": self.split(s),
                 "annotated": bool(self.pairs[s].reference)} for s in sorted(self.pairs)]

    def targets(self) -> list[str]:
        """Everything ``snakemake longitudinal`` builds."""
        if not self.enabled:
            return []
        out = [layout.file(layout.LONGITUDINAL, k, self.out)
               for k in ("pairs", "metrics", "summary", "tests", "report")]
        for s in sorted(self.pairs):
            out.append(self.evaluation_outputs(s)["report"])
        return out
