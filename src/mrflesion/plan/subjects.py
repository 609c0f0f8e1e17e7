"""What the Snakefile needs at parse time: the subject list, their input paths and file stems.

Kept out of the Snakefile so that it is unit tested and the rules stay thin. In phantom mode
(``bids_dir: null``) the cohort is known from the phantom's parameters without generating
anything, so the whole DAG (phantom generation included) is built in one pass.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import layout
from ..bids import Discovery, InputProblem, SubjectInputs, discover, expected_inputs


@dataclass
class Plan:
    bids_dir: str
    phantom: bool
    subjects: dict[str, SubjectInputs]  # stem -> inputs
    problems: list[InputProblem]
    timing: dict[str, str] = field(default_factory=dict)  # stem -> dictionary key
    protocols: dict[str, dict[str, Any]] = field(default_factory=dict)  # dictionary key -> sidecar timing
    #: stem -> fingerprint of its MRF schedule (Protocol.timing_key; what a model card lists)
    schedule: dict[str, str] = field(default_factory=dict)
    #: fingerprint -> the schedule's timing (sidecar form)
    schedules: dict[str, dict[str, Any]] = field(default_factory=dict)

    def stems(self) -> list[str]:
        return sorted(self.subjects)

    def dictionary_key(self, stem: str) -> str:
        return self.timing[stem]


def stem_of(s: SubjectInputs) -> str:
    """``sub-X/anat/sub-X`` or ``sub-X/ses-Y/anat/sub-X_ses-Y``: output paths are ``<stem>_<suffix>``
    (mrflesion.layout)."""
    return layout.stem(s.subject, s.session)


def phantom_discovery(config: Mapping[str, Any]) -> Discovery:
    """The phantom cohort's subjects with the paths the generator will write (nothing is read)."""
    from ..phantom import cohort_table

    pc = config["phantom"]
    table = cohort_table(
        n_subjects=int(pc["subjects"]),
        n_sites=int(pc["sites"]),
        seed=int(pc["seed"]),
        longitudinal=bool(pc.get("longitudinal", False)),
    )
    include = set(config.get("participant_label") or [])
    exclude = set(config.get("exclude_participant_label") or [])
    sessions_wanted = set(config.get("sessions") or [])
    out = Discovery()
    for row in table.itertuples(index=False):
        label = str(row.participant_id)[4:]
        if (include and label not in include) or label in exclude:
            continue
        sessions = [s[4:] for s in (row.sessions or [])] or [None]
        for ses in sessions:
            if sessions_wanted and ses not in sessions_wanted:
                continue
            files = expected_inputs(pc["dir"], label, ses, config)
            out.subjects.append(SubjectInputs(label, ses, str(row.site), str(row.group), files))
    return out


def make_plan(config: Mapping[str, Any]) -> Plan:
    """Discover the inputs (or the phantom's) and report problems, one line each, on stderr."""
    if config.get("bids_dir"):
        bids_dir = os.fspath(config["bids_dir"])
        disc = discover(config, bids_dir)
        phantom = False
    else:
        bids_dir = os.fspath(config["phantom"]["dir"])
        disc = phantom_discovery(config)
        phantom = True
    plan = Plan(bids_dir, phantom, {}, list(disc.problems))
    grid_key = _grid_key(config)
    for s in disc.subjects:
        try:
            protocol = _protocol_of(s, config) if not phantom else _phantom_protocol(config, s.site)
        except (OSError, ValueError) as exc:
            where = getattr(exc, "path", s.sidecar)  # the sidecar layer at fault (BIDS inheritance)
            plan.problems.append(InputProblem(s.subject, s.session, where, f"unusable MRF sidecar ({exc})"))
            continue
        fingerprint = protocol.timing_key()
        key = f"{fingerprint}_{grid_key}"
        stem = stem_of(s)
        plan.subjects[stem] = s
        plan.timing[stem] = key
        plan.protocols.setdefault(key, protocol.to_sidecar())
        plan.schedule[stem] = fingerprint
        if fingerprint not in plan.schedules:
            plan.schedules[fingerprint] = protocol.to_sidecar()
    _skip_failed_checks(plan, os.fspath(config.get("work_dir", "results/work")))
    for p in plan.problems:
        print(f"mrflesion: skipping {p}", file=sys.stderr)
    return plan


# ---------------------------------------------------------------------------------------- failed checks


def failure_record_path(work_dir: str, stem: str) -> str:
    """Where a failed input check of ``stem`` leaves its record (next to the rule's log)."""
    return layout.file(layout.WORK, "failed_check", work_dir.rstrip("/"), stem=stem)


def input_fingerprint(files: Mapping[str, str]) -> dict[str, list[int]]:
    """Size and modification time of each input file (missing: [-1, -1])."""
    out = {}
    for k, f in sorted(files.items()):
        try:
            st = os.stat(f)
            out[k] = [int(st.st_size), int(st.st_mtime_ns)]
        except OSError:
            out[k] = [-1, -1]
    return out


def _skip_failed_checks(plan: Plan, work_dir: str) -> None:
    """Subjects whose input check failed in an earlier run, on inputs that have not changed since,
    become problems (skipped, listed in the group tables with the reason); a changed input is
    checked again."""
    for stem in list(plan.subjects):
        path = failure_record_path(work_dir, stem)
        if not os.path.exists(path):
            continue
        s = plan.subjects[stem]
        try:
            with open(path) as fh:
                rec = json.load(fh)
        except (OSError, ValueError):
            continue
        if rec.get("fingerprint") != input_fingerprint({**s.files, "sidecar": s.sidecar}):
            continue
        plan.problems.append(InputProblem(s.subject, s.session, rec["file"],
                                          f"{rec['reason']} (input check of an earlier run)"))
        del plan.subjects[stem]
        plan.timing.pop(stem, None)
        plan.schedule.pop(stem, None)


def _grid_key(config: Mapping[str, Any]) -> str:
    from ..mrf.dictionary import FORMAT_VERSION, DictionaryGrid

    d = config.get("dictionary", {})
    opts = {"grid": DictionaryGrid.from_config(d.get("grid")).key(), "rank": d.get("rank_energy"),
            "clusters": d.get("n_clusters"), "format": FORMAT_VERSION}
    import hashlib

    return hashlib.sha256(json.dumps(opts, sort_keys=True).encode()).hexdigest()[:12]


def _protocol_of(s: SubjectInputs, config: Mapping[str, Any]) -> Any:
    """The subject's MRF timing: its sidecars (BIDS inheritance) with the config's stated values."""
    from ..validate import resolve_timing, stated_timing

    return resolve_timing(s.sidecar_layers, stated_timing(config))


class _KeyedProtocol:
    """A protocol with its timing key and sidecar computed once."""

    def __init__(self, protocol: Any) -> None:
        self._key = protocol.timing_key()
        self._sidecar = protocol.to_sidecar()

    def timing_key(self) -> str:
        return self._key

    def to_sidecar(self) -> dict[str, Any]:
        return self._sidecar


def _phantom_protocol(config: Mapping[str, Any], site: str) -> Any:
    """The timing the phantom writes for a site (SMS at an SMS site), with the configured inversion model."""
    from ..phantom import GRIDS
    from ..validate import stated_timing

    inversion = stated_timing(config)["InversionEfficiency"]
    return _phantom_timing(int(GRIDS[config["phantom"]["grid"]]["n_slices"]), site, inversion)


@functools.lru_cache(maxsize=64)
def _phantom_timing(n_slices: int, site: str, inversion: str) -> Any:
    from ..phantom import site_protocol

    return _KeyedProtocol(site_protocol(n_slices, site, inversion))
