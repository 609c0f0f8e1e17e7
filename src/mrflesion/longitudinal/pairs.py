"""Baseline/follow-up pairs from the discovered sessions (parse time, torch-free).

A subject with two or more sessions gives pairs: each later session against the baseline (``pairing:
baseline``; the baseline is the configured session label, or the first session in sorted order), or each
session against the one before it (``pairing: consecutive``). Subjects without a pair are listed with
the reason (one session only, no session labels, the configured baseline session missing); they are
not errors. A pair's manual new/enlarged mask (the follow-up's, in its FLAIR space) is optional: a pair
without it is processed and mapped, but neither trains the network nor is scored against it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .. import layout
from ..bids import SubjectInputs


@dataclass(frozen=True)
class Pair:
    subject: str
    site: str
    group: str | None
    baseline: str  # session labels, without "ses-"
    followup: str
    flair_baseline: str
    flair_followup: str
    #: the baseline's manual lesion mask (its FLAIR space): tells new from enlarging lesions
    lesion_baseline: str | None
    #: the follow-up's manual new/enlarged mask (its FLAIR space), where there is one
    reference: str | None

    @property
    def stem(self) -> str:
        """The follow-up session's stem: every output of the pair lives beside its follow-up."""
        return layout.stem(self.subject, self.followup)

    @property
    def key(self) -> str:
        return f"sub-{self.subject}_ses-{self.followup}"

    def to_dict(self) -> dict[str, Any]:
        return {"subject": f"sub-{self.subject}", "site": self.site, "group": self.group or "n/a",
                "baseline": f"ses-{self.baseline}", "followup": f"ses-{self.followup}",
                "flair_baseline": self.flair_baseline, "flair_followup": self.flair_followup,
                "lesion_baseline": self.lesion_baseline or "", "reference": self.reference or ""}


def reference_path(root: str, subject: str, session: str, spec: Mapping[str, Any]) -> str:
    """Where the follow-up's manual new/enlarged mask is, following ``spec`` (an input spec: datatype,
    suffix, extension, entities, derivatives)."""
    where = os.path.join(root, spec["derivatives"]) if spec.get("derivatives") else root
    ents = [f"sub-{subject}", f"ses-{session}"]
    ents += [f"{k}-{v}" for k, v in (spec.get("entities") or {}).items() if v is not None]
    name = "_".join(ents + [spec["suffix"]]) + spec["extension"]
    return os.path.join(where, f"sub-{subject}", f"ses-{session}", spec["datatype"], name)


def make_pairs(subjects: Iterable[SubjectInputs], cfg: Mapping[str, Any], root: str,
               phantom: bool) -> tuple[list[Pair], list[tuple[str, str]]]:
    """(pairs, unpaired): the pairs of ``subjects`` (the plan's sessions) under the config's
    ``longitudinal`` section, and (subject, reason) for each subject without one. ``root``: the BIDS
    directory; ``phantom``: the reference masks are the generator's (not looked for on disk)."""
    by_subject: dict[str, list[SubjectInputs]] = {}
    for s in subjects:
        by_subject.setdefault(s.subject, []).append(s)
    baseline_label = cfg.get("baseline")
    pairing = cfg.get("pairing", "baseline")
    spec = cfg["reference"]
    pairs: list[Pair] = []
    unpaired: list[tuple[str, str]] = []
    for subject in sorted(by_subject):
        sessions = {s.session: s for s in by_subject[subject]}
        if None in sessions:
            unpaired.append((f"sub-{subject}", "no session labels (one time point)"))
            continue
        labels = sorted(sessions)  # type: ignore[arg-type]
        if len(labels) < 2:
            unpaired.append((f"sub-{subject}", f"one session only (ses-{labels[0]})"))
            continue
        if baseline_label is not None and baseline_label not in sessions:
            unpaired.append((f"sub-{subject}", f"baseline session ses-{baseline_label} not among "
                                               + ", ".join(f"ses-{x}" for x in labels)))
            continue
        base = baseline_label if baseline_label is not None else labels[0]
        later = [x for x in labels if x > base]
        if not later:
            unpaired.append((f"sub-{subject}", f"no session after the baseline ses-{base}"))
            continue
        previous = base
        for fu in later:
            bl = base if pairing == "baseline" else previous
            previous = fu
            ref = reference_path(root, subject, fu, spec)
            if not phantom and not os.path.exists(ref):
                ref = None
            s_bl, s_fu = sessions[bl], sessions[fu]
            pairs.append(Pair(subject, s_fu.site, s_fu.group, bl, fu, s_bl.files["flair"], s_fu.files["flair"],
                              s_bl.files.get("lesion"), ref))
    return pairs, unpaired
