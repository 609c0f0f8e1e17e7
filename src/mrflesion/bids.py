"""BIDS input discovery: a fast indexer plus config-driven selection of each subject's inputs.

pybids builds a database of every file and is far too slow for cohort-sized datasets (minutes for
10,000 subjects); this module walks only ``sub-*/[ses-*/]<datatype>/`` with ``os.scandir`` and
parses BIDS entities from file names, which indexes 10,000 subjects in a few seconds
(``benchmarks/bench_discovery.py``).

A subject whose inputs are missing, ambiguous or not plain files (a broken symbolic link, a
directory), a ``sub-*``/``ses-*`` folder whose label is not letters and digits or cannot be read, and
a participants.tsv row that is missing, duplicated, without a site or with an invalid
``participant_id`` are not fatal: :func:`discover` returns each as an :class:`InputProblem` with one
line naming the subject and the file, and the other subjects run.

The MRF sidecar follows BIDS inheritance: every JSON with the MRF series' suffix whose entities are a
subset of the series' (``acq-MRFEPI_MRF.json`` at the dataset root, ``sub-01_acq-MRFEPI_MRF.json`` in
``sub-01/``, the one beside the series) applies, top level first, lower levels overriding; two
applicable files at one level are refused (:attr:`SubjectInputs.sidecars`). The group column is read
with the configured control and patient labels (``control_labels``, ``patient_labels``): a value in
neither is refused, so that no control is taken for a patient.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INPUT_KINDS = ("mrf", "t2w", "flair", "lesion")
#: Inputs a subject may lack in apply mode (config ``models``): without a manual lesion mask the
#: networks' maps, the per-lesion table and the report are written, and no lesion metric.
OPTIONAL_IN_APPLY_MODE = ("lesion",)
_LABEL = re.compile(r"^[A-Za-z0-9]+$")
_ENTITY = re.compile(r"^([a-z]+)-([A-Za-z0-9]+)$")


class BIDSError(ValueError):
    """The dataset as a whole cannot be used (missing root, broken participants.tsv...)."""


@dataclass(frozen=True)
class BIDSFile:
    path: str
    subject: str
    session: str | None
    datatype: str
    entities: tuple[tuple[str, str], ...]
    suffix: str
    extension: str

    def entity(self, key: str) -> str | None:
        for k, v in self.entities:
            if k == key:
                return v
        return None


@dataclass(frozen=True)
class InputProblem:
    subject: str
    session: str | None
    file: str
    reason: str

    @property
    def key(self) -> str:
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")

    def __str__(self) -> str:
        return f"{self.key}: {self.reason}: {self.file}"


@dataclass(frozen=True)
class SubjectInputs:
    subject: str
    session: str | None
    site: str
    group: str | None  # "control" or "patient" (from the configured labels), None where unknown (phantom)
    files: Mapping[str, str]  # kind -> path
    #: the MRF sidecars that apply (BIDS inheritance), top level first; empty: the one beside the series
    sidecars: tuple[str, ...] = ()

    @property
    def annotated(self) -> bool:
        """Whether the subject has a manual lesion mask (the evaluation's reference; apply mode may lack it)."""
        return "lesion" in self.files

    @property
    def key(self) -> str:
        """``sub-X`` or ``sub-X_ses-Y``: the prefix of every output file name."""
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")

    @property
    def folder(self) -> str:
        """``sub-X`` or ``sub-X/ses-Y``."""
        return f"sub-{self.subject}" + (f"/ses-{self.session}" if self.session else "")

    @property
    def sidecar(self) -> str:
        """The most specific MRF sidecar (the one beside the series, where there is one)."""
        return self.sidecars[-1] if self.sidecars else _sidecar_path(self.files["mrf"])

    @property
    def sidecar_layers(self) -> tuple[str, ...]:
        """Every MRF sidecar that applies, top level first (BIDS inheritance: later ones override)."""
        return self.sidecars or (self.sidecar,)


@dataclass
class IndexNotes:
    """What :func:`index_dataset` passed over, so that :func:`discover` can say why an input is missing."""

    bad_folders: list[InputProblem] = field(default_factory=list)  # invalid label or unreadable
    ignored: dict[tuple[str, str | None], list[str]] = field(default_factory=dict)  # non-BIDS names per unit
    not_files: dict[str, str] = field(default_factory=dict)  # path -> what it is instead of a file
    level_json: dict[str, list[str]] = field(default_factory=dict)  # sub-/ses- folder -> its .json names


@dataclass
class Discovery:
    subjects: list[SubjectInputs] = field(default_factory=list)
    problems: list[InputProblem] = field(default_factory=list)

    def by_key(self) -> dict[str, SubjectInputs]:
        return {s.key: s for s in self.subjects}


def _sidecar_path(path: str) -> str:
    from .layout import sidecar_path

    return sidecar_path(path)


def parse_name(name: str) -> tuple[tuple[tuple[str, str], ...], str, str] | None:
    """Split a BIDS file name into (entities, suffix, extension); None if it is not BIDS-like."""
    if name.startswith("."):
        return None
    stem, dot, ext = name.partition(".")
    if not dot:
        return None
    parts = stem.split("_")
    suffix = parts[-1]
    if not _LABEL.match(suffix):
        return None
    entities = []
    for part in parts[:-1]:
        m = _ENTITY.match(part)
        if m is None:
            return None
        entities.append((m.group(1), m.group(2)))
    return tuple(entities), suffix, "." + ext


_UNREADABLE = "folder unreadable (permission denied)"


def _scandir_dirs(path: str, prefix: str, json_names: list[str] | None = None) -> list[str]:
    """Sub-folders of ``path`` starting with ``prefix`` (and, into ``json_names``, its JSON files);
    PermissionError propagates."""
    try:
        with os.scandir(path) as it:
            out = []
            for e in it:
                if e.name.startswith(prefix) and e.is_dir():
                    out.append(e.name)
                elif json_names is not None and e.name.endswith(".json") and not e.name.startswith("."):
                    json_names.append(e.name)
            return out
    except (FileNotFoundError, NotADirectoryError):
        return []


def _not_file(entry: os.DirEntry[str]) -> str | None:
    """None for a regular file (or a link to one), else what the entry is. No stat for plain files."""
    if entry.is_file():
        return None
    if entry.is_symlink():
        return "a broken symbolic link" if not os.path.exists(entry.path) else "a link to a non-file"
    return "a directory, not a file" if entry.is_dir() else "not a regular file"


def index_dataset(
    root: str | os.PathLike[str], datatypes: Iterable[str] = ("anat",), notes: IndexNotes | None = None
) -> list[BIDSFile]:
    """Every BIDS-named file under ``root/sub-*/[ses-*/]<datatype>/``.

    ``notes``, when given, collects what was passed over: ``sub-``/``ses-`` folders with an invalid
    label or that cannot be read, names that are not BIDS (or name another subject/session), and
    BIDS-named entries that are not regular files.
    """
    root = os.fspath(root)
    wanted = set(datatypes)
    notes = notes if notes is not None else IndexNotes()
    out: list[BIDSFile] = []
    for sub_dir in sorted(_scandir_dirs(root, "sub-")):
        subject = sub_dir[4:]
        sub_path = os.path.join(root, sub_dir)
        if not _LABEL.match(subject):
            notes.bad_folders.append(InputProblem(
                subject, None, sub_path, "folder label is not letters and digits"
            ))
            continue
        sessions: list[tuple[str | None, str]] = [(None, sub_path)]
        try:
            ses_dirs = sorted(_scandir_dirs(sub_path, "ses-", notes.level_json.setdefault(sub_path, [])))
        except PermissionError:
            notes.bad_folders.append(InputProblem(subject, None, sub_path, _UNREADABLE))
            continue
        for ses_dir in ses_dirs:
            if _LABEL.match(ses_dir[4:]):
                ses_path = os.path.join(sub_path, ses_dir)
                sessions.append((ses_dir[4:], ses_path))
                with contextlib.suppress(PermissionError):
                    _scandir_dirs(ses_path, "\0", notes.level_json.setdefault(ses_path, []))
            else:
                notes.bad_folders.append(InputProblem(
                    subject, ses_dir[4:], os.path.join(sub_path, ses_dir),
                    "folder label is not letters and digits",
                ))
        for session, ses_path in sessions:
            for datatype in wanted:
                dt_path = os.path.join(ses_path, datatype)
                try:
                    it = os.scandir(dt_path)
                except (FileNotFoundError, NotADirectoryError):
                    continue
                except PermissionError:
                    notes.bad_folders.append(InputProblem(subject, session, dt_path, _UNREADABLE))
                    continue
                with it:
                    for entry in it:
                        parsed = parse_name(entry.name)
                        ent = dict(parsed[0]) if parsed is not None else {}
                        if parsed is None or ent.get("sub") != subject or ent.get("ses") != session:
                            # not BIDS, or the name disagrees with its folder: not a valid BIDS file
                            if not entry.name.startswith("."):
                                notes.ignored.setdefault((subject, session), []).append(entry.name)
                            continue
                        entities, suffix, ext = parsed
                        what = _not_file(entry)
                        if what is not None:
                            notes.not_files[entry.path] = what
                        out.append(BIDSFile(entry.path, subject, session, datatype, entities, suffix, ext))
    return out


def read_participants(root: str | os.PathLike[str], site_column: str) -> dict[str, dict[str, str]]:
    """participants.tsv as {label: row}; raises BIDSError naming the problem.

    A label seen twice gets ``"__duplicate__"`` in its row; one that is not letters and digits
    (``sub-01/x``) is kept as it is, for :func:`discover` to report.
    """
    path = Path(root) / "participants.tsv"
    if not path.is_file():
        raise BIDSError(f"participants.tsv not found: {path}")
    # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the first column's name;
    # newline="": CRLF line ends are read as line ends; names and values are stripped of spaces
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        if reader.fieldnames is not None:
            reader.fieldnames = [name.strip() for name in reader.fieldnames]
        if reader.fieldnames is None or "participant_id" not in reader.fieldnames:
            raise BIDSError(f"participants.tsv has no participant_id column: {path}")
        if site_column not in reader.fieldnames:
            raise BIDSError(f"participants.tsv has no '{site_column}' column (config site_column): {path}")
        rows: dict[str, dict[str, str]] = {}
        duplicates: set[str] = set()
        for raw in reader:
            row = {k: v.strip() if isinstance(v, str) else v for k, v in raw.items()}
            pid = (row.get("participant_id") or "").strip()
            label = pid[4:] if pid.startswith("sub-") else pid
            if label in rows:
                duplicates.add(label)
            rows[label] = row
    for label in duplicates:
        rows[label] = {**rows[label], "__duplicate__": "1"}
    return rows


def _matches(f: BIDSFile, spec: Mapping[str, Any]) -> bool:
    if f.datatype != spec["datatype"] or f.suffix != spec["suffix"] or f.extension != spec["extension"]:
        return False
    for key, value in (spec.get("entities") or {}).items():
        if f.entity(key) != value:
            return False
    return True


def discover(config: Mapping[str, Any], bids_dir: str | os.PathLike[str] | None = None) -> Discovery:
    """Select each subject's (and session's) inputs as the config describes.

    Returns the usable subjects, sorted, and one :class:`InputProblem` per unusable one.
    """
    root = os.fspath(bids_dir if bids_dir is not None else config["bids_dir"])
    if not os.path.isdir(root):
        raise BIDSError(f"BIDS directory not found: {root}")
    if not os.path.isfile(os.path.join(root, "dataset_description.json")):
        raise BIDSError(f"not a BIDS dataset (no dataset_description.json): {root}")
    site_column = config.get("site_column", "site")
    #: inputs a subject may lack: the manual lesion mask in apply mode (``models``), where it is only
    #: the reference of the evaluation (the networks do not read it)
    optional = set(OPTIONAL_IN_APPLY_MODE) if config.get("models") else set()
    participants = read_participants(root, site_column)
    group_column = config.get("group_column", "group")
    groups = _group_labels(config)
    if participants and group_column not in next(iter(participants.values())):
        raise BIDSError(
            f"participants.tsv has no '{group_column}' column (config group_column): "
            f"{os.path.join(root, 'participants.tsv')}"
        )
    specs = config["inputs"]
    datatypes = {specs[k]["datatype"] for k in INPUT_KINDS}

    notes = IndexNotes()
    raw_files = index_dataset(root, datatypes, notes)
    deriv_files: dict[str, list[BIDSFile]] = {}
    for kind in INPUT_KINDS:
        deriv = specs[kind].get("derivatives")
        if deriv and deriv not in deriv_files:
            deriv_notes = IndexNotes()  # its bad folders are not units: only the raw dataset's count
            deriv_files[deriv] = index_dataset(os.path.join(root, deriv), datatypes, deriv_notes)
            notes.not_files.update(deriv_notes.not_files)
            for unit, names in deriv_notes.ignored.items():
                notes.ignored.setdefault(unit, []).extend(names)

    include = set(config.get("participant_label") or [])
    exclude = set(config.get("exclude_participant_label") or [])
    sessions_wanted = set(config.get("sessions") or [])

    def wanted(subject: str, session: str | None) -> bool:
        if include and subject not in include:
            return False
        if subject in exclude:
            return False
        return not (sessions_wanted and session not in sessions_wanted)

    # Group candidate files by (subject, session) and kind; near misses (another case, .nii for
    # .nii.gz, other entities) are kept for the message of a missing input.
    found: dict[tuple[str, str | None], dict[str, list[str]]] = {}
    near: dict[tuple[str, str | None, str], list[str]] = {}
    for kind in INPUT_KINDS:
        spec = specs[kind]
        pool = deriv_files[spec["derivatives"]] if spec.get("derivatives") else raw_files
        for f in pool:
            if _matches(f, spec):
                found.setdefault((f.subject, f.session), {}).setdefault(kind, []).append(f.path)
            elif _near_miss(f, spec):
                near.setdefault((f.subject, f.session, kind), []).append(os.path.basename(f.path))
    sidecar_dirs: dict[str, list[BIDSFile]] = {}
    for f in raw_files:
        if f.extension == ".json":
            sidecar_dirs.setdefault(os.path.dirname(f.path), []).append(f)
    root_json: list[str] = []
    _scandir_dirs(root, "\0", root_json)
    notes.level_json[root] = root_json
    # Units: every (subject, session) that has at least one raw file in the datatypes of interest.
    units = {(f.subject, f.session) for f in raw_files}
    # A subject with sessions uses only its session folders.
    with_sessions = {s for s, ses in units if ses is not None}
    units = {(s, ses) for s, ses in units if ses is not None or s not in with_sessions}

    result = Discovery()
    tsv = os.path.join(root, "participants.tsv")
    if not include:
        for label in participants:
            if not _LABEL.match(label):
                pid = participants[label].get("participant_id", "")
                reason = f"invalid participant_id {pid!r} (not sub-<letters and digits>) in"
                result.problems.append(InputProblem(label, None, tsv, reason))
    result.problems += [p for p in notes.bad_folders if wanted(p.subject, p.session)]
    for subject, session in sorted(units, key=lambda u: (u[0], u[1] or "")):
        if not wanted(subject, session):
            continue
        row = participants.get(subject)
        if row is None:
            result.problems.append(
                InputProblem(subject, session, os.path.join(root, "participants.tsv"), "not listed in")
            )
            continue
        if row.get("__duplicate__"):
            result.problems.append(
                InputProblem(subject, session, os.path.join(root, "participants.tsv"), "listed twice in")
            )
            continue
        site = (row.get(site_column) or "").strip()
        if not site or site == "n/a":
            result.problems.append(
                InputProblem(subject, session, os.path.join(root, "participants.tsv"), f"no {site_column} in")
            )
            continue
        group_value = (row.get(group_column) or "").strip()
        group = groups.get(group_value.lower())
        if group is None:
            what = f"no {group_column}" if group_value in ("", "n/a") else (
                f"{group_column} {group_value!r} is neither a control nor a patient label "
                "(config control_labels, patient_labels)")
            result.problems.append(InputProblem(subject, session, tsv, f"{what} in"))
            continue
        kinds = found.get((subject, session), {})
        files: dict[str, str] = {}
        problem = None
        for kind in INPUT_KINDS:
            paths = kinds.get(kind, [])
            if len(paths) == 1:
                files[kind] = paths[0]
                continue
            if not paths and kind in optional:  # apply mode: a subject without a manual mask
                continue
            spec = specs[kind]
            where = os.path.join(root, spec["derivatives"]) if spec.get("derivatives") else root
            if not paths:
                expected = os.path.join(
                    where, f"sub-{subject}", *([f"ses-{session}"] if session else []), spec["datatype"],
                    _expected_name(subject, session, spec),
                )
                # names that look like this input but were passed over (sub02_T2w.nii.gz, sub-03_T2w.nii.gz)
                ignored = [n for n in notes.ignored.get((subject, session), []) if spec["suffix"].lower() in n.lower()]
                hint = f" (ignored, not BIDS-named for this folder: {_first(ignored)})" if ignored else ""
                close = near.get((subject, session, kind))
                if close and not hint:
                    hint = f" (found {_first(close)}; expected {os.path.basename(expected)})"
                problem = InputProblem(subject, session, expected, f"missing {kind} input{hint}")
            else:
                problem = InputProblem(subject, session, ", ".join(sorted(paths)), f"several {kind} inputs match")
            break
        if problem is None:
            for kind, path in files.items():
                what = notes.not_files.get(path)
                if what is not None:
                    problem = InputProblem(subject, session, path, f"{kind} input is {what}")
                    break
        layers: tuple[str, ...] = ()
        if problem is None:
            side = _sidecar_path(files["mrf"])
            if os.path.lexists(side) and not os.path.isfile(side):
                problem = InputProblem(subject, session, side, "MRF sidecar is not a regular file")
            else:
                layers, problem = _sidecar_layers(root, files["mrf"], sidecar_dirs, notes.level_json)
                if problem is None and not layers:
                    problem = InputProblem(subject, session, side, "missing MRF sidecar")
        if problem is not None:
            result.problems.append(problem)
            continue
        result.subjects.append(SubjectInputs(subject, session, site, group, files, layers))
    for label in sorted(include - {s for s, _ in units}):
        result.problems.append(
            InputProblem(label, None, os.path.join(root, f"sub-{label}"), "requested participant not found")
        )
    return result


def _group_labels(config: Mapping[str, Any]) -> dict[str, str]:
    """Lower-cased group value -> ``control`` or ``patient``, from ``control_labels`` / ``patient_labels``."""
    controls = config.get("control_labels") or ["control", "healthy", "HC", "HV", "volunteer"]
    patients = config.get("patient_labels") or ["patient", "MS", "RRMS", "SPMS", "PPMS", "CIS"]
    out = {str(v).strip().lower(): "patient" for v in patients}
    both = [v for v in controls if str(v).strip().lower() in out]
    if both:
        raise BIDSError(f"group label(s) {both} are both control_labels and patient_labels (config)")
    out.update({str(v).strip().lower(): "control" for v in controls})
    return out


def _near_miss(f: BIDSFile, spec: Mapping[str, Any]) -> bool:
    """A file that is probably meant as this input: same suffix and datatype up to letter case, an image
    extension up to case or compression, but another case, extension or entity than configured."""
    ext = spec["extension"].lower()
    image_ext = {ext, ".nii", ".nii.gz"} if ext in (".nii", ".nii.gz") else {ext}
    return (
        f.datatype == spec["datatype"]
        and f.suffix.lower() == spec["suffix"].lower()
        and f.extension.lower() in image_ext
    )


def _applies(candidate: str, data: BIDSFile) -> bool:
    """BIDS inheritance: a JSON applies to ``data`` if it has its suffix and a subset of its entities."""
    parsed = parse_name(candidate)
    if parsed is None or parsed[2] != ".json" or parsed[1] != data.suffix:
        return False
    mine = dict(data.entities)
    return all(mine.get(k) == v for k, v in parsed[0])


def _sidecar_layers(
    root: str, mrf: str, sidecar_dirs: Mapping[str, list[BIDSFile]], level_json: Mapping[str, list[str]]
) -> tuple[tuple[str, ...], InputProblem | None]:
    """The MRF sidecars that apply to ``mrf`` (top level first) or the problem that stops it."""
    parsed = parse_name(os.path.basename(mrf))
    assert parsed is not None
    entities, suffix, ext = parsed
    ent = dict(entities)
    data = BIDSFile(mrf, ent["sub"], ent.get("ses"), "", entities, suffix, ext)
    sub_dir = os.path.join(root, f"sub-{data.subject}")
    levels = [root, sub_dir] + ([os.path.join(sub_dir, f"ses-{data.session}")] if data.session else [])
    found: list[str] = []
    for level in levels:
        names = sorted(n for n in level_json.get(level, []) if _applies(n, data))
        if len(names) > 1:
            paths = ", ".join(os.path.join(level, n) for n in names)
            return (), InputProblem(data.subject, data.session, paths,
                                    "several MRF sidecars apply at one folder level (BIDS inheritance)")
        found += [os.path.join(level, n) for n in names if os.path.isfile(os.path.join(level, n))]
    here = sorted(f.path for f in sidecar_dirs.get(os.path.dirname(mrf), [])
                  if _applies(os.path.basename(f.path), data))
    if len(here) > 1:
        return (), InputProblem(data.subject, data.session, ", ".join(here),
                                "several MRF sidecars apply at one folder level (BIDS inheritance)")
    found += [p for p in here if os.path.isfile(p)]
    return tuple(found), None


def _first(names: list[str], n: int = 3) -> str:
    shown = ", ".join(sorted(names)[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _expected_name(subject: str, session: str | None, spec: Mapping[str, Any]) -> str:
    ents = [f"sub-{subject}"] + ([f"ses-{session}"] if session else [])
    ents += [f"{k}-{v}" for k, v in (spec.get("entities") or {}).items() if v is not None]
    return "_".join(ents + [spec["suffix"]]) + spec["extension"]


def expected_inputs(
    root: str | os.PathLike[str], subject: str, session: str | None, config: Mapping[str, Any]
) -> dict[str, str]:
    """The input paths a subject has when it follows the config's naming exactly (phantom mode)."""
    root = os.fspath(root)
    out = {}
    for kind in INPUT_KINDS:
        spec = config["inputs"][kind]
        where = os.path.join(root, spec["derivatives"]) if spec.get("derivatives") else root
        out[kind] = os.path.join(
            where, f"sub-{subject}", *([f"ses-{session}"] if session else []), spec["datatype"],
            _expected_name(subject, session, spec),
        )
    return out
