r"""Bad input, one class at a time: each gives one line naming the subject and the file, or is accepted.

Every class below is built on the tiny BIDS fixture (``tests/bidsfixture.py``) by breaking one thing
of ``sub-02``. Three checks catch them, in this order: discovery when the DAG is built
(:func:`mrflesion.bids.discover`; printed as ``mrflesion: skipping <message>``), the MRF sidecar's
timing when the DAG is built (:func:`mrflesion.plan.subjects.make_plan`; same prefix), and the content
check of rule ``check_inputs`` (:func:`mrflesion.validate.check_subject`; printed as
``mrflesion error: <message>``: the job fails and ``--keep-going`` carries on with the other
subjects). A subject skipped at parse time gets no job at all.

Each message is one line, ``<subject>: <reason>: <file>``, the file as an absolute path. The table
gives the reason and the file for a break of ``sub-02`` (the exact lines are in ``CASES`` below).

| class | caught by | reason | file |
|---|---|---|---|
| missing T2w | discovery | `missing t2w input` | the expected T2w path |
| missing lesion mask | discovery | `missing lesion input` | the expected mask path |
| missing MRF sidecar | discovery | `missing MRF sidecar` | the expected sidecar |
| non-BIDS file name | discovery | `missing t2w input (ignored, not BIDS-named for this folder: <names>)` | T2w [2] |
| file named for another subject | discovery | as above (`sub-03_T2w.nii.gz` in `sub-02/anat`) | T2w [2] |
| two files match one input | discovery | `several t2w inputs match` | both paths |
| symbolic link pointing nowhere | discovery | `t2w input is a broken symbolic link` | T2w |
| directory where a file is expected | discovery | `t2w input is a directory, not a file` | T2w |
| MRF sidecar is a directory | discovery | `MRF sidecar is not a regular file` | sidecar |
| subject not in participants.tsv | discovery | `not listed in` | participants.tsv |
| duplicate participants.tsv row | discovery | `listed twice in` | participants.tsv |
| site missing (`n/a`) | discovery | `no site in` | participants.tsv |
| participant_id has `/` | discovery | `invalid participant_id 'sub-02/../03' (not sub-<letters and digits>) in` | [3] |
| subject folder label not alphanumeric | discovery | `folder label is not letters and digits` | `sub-02.bak` |
| subject folder with a backslash | discovery | as above | `sub-02\x` |
| session folder label not alphanumeric | discovery | `folder label is not letters and digits` | `sub-02/ses-1.5` |
| unreadable folder (chmod 000) [1] | discovery | `folder unreadable (permission denied)` | `sub-02/anat` |
| MRF sidecar not JSON | parse | `unusable MRF sidecar (Expecting value: line 1 column 1 (char 0))` | sidecar |
| MRF sidecar not a JSON object | parse | `unusable MRF sidecar (not a JSON object)` | sidecar |
| sidecar list wrong length | parse | `unusable MRF sidecar (... the same length (got 35, 35, 34))` | sidecar |
| sidecar list missing | parse | `unusable MRF sidecar (sidecar lacks FlipAngle)` | sidecar |
| truncated gzip | content | `MRF series file truncated or corrupt (EOFError)` | MRF |
| gzip cut inside the header | content | `MRF series file truncated or corrupt (EOFError)` | MRF |
| empty (0-byte) file | content | `T2w image file is empty (0 bytes)` | T2w |
| .nii.gz that is not gzip | content | `T2w image file is not gzip-compressed (a .nii.gz must be)` | T2w |
| not a NIfTI (gzip of other data) | content | `T2w image file is not a NIfTI image (no NIfTI-1/2 header)` | T2w |
| unreadable file (chmod 000) [1] | content | `T2w image file unreadable (permission denied)` | T2w |
| MRF with 34 volumes | content | `MRF series has 34 volumes, expected 35` | MRF |
| MRF 3D | content | `MRF series must be 4D, got 3D` | MRF |
| T2w 4D | content | `T2w image must be 3D, got 4D` | T2w |
| NaN voxels | content | `MRF series has 3 NaN/Inf voxels` | MRF |
| Inf voxels | content | `FLAIR image has 1 NaN/Inf voxels` | FLAIR |
| all-zero image | content | `T2w image is all zero` | T2w |
| one all-zero MRF volume | content | `MRF series volume 17 of 35 is all zero (1 such)` | MRF |
| MRF and T2w not overlapping | content | `MRF and T2w fields of view overlap by only 0%` | T2w |
| FLAIR and T2w not overlapping | content | `FLAIR and T2w fields of view overlap by only 0%` | FLAIR |
| sidecar slices differ from image | content | `MRF sidecar SliceOrder has 6 slices, image has 4` | sidecar |
| sidecar lists 34 measurements | content | `MRF sidecar lists 34 measurements, expected 35` | sidecar |
| lesion mask, other shape | content | `lesion mask is not on the FLAIR grid (shape 12x12x5 vs 12x12x4)` | mask |
| lesion mask, other affine | content | `lesion mask is not on the FLAIR grid (affines differ)` | mask |
| lesion mask with NaN | content | `lesion mask has 1 NaN/Inf voxels` | mask |
| lesion mask with negative values | content | `lesion mask values must lie in [0, 1] (found -1 to 1)` | mask |
| lesion mask 4D | content | `lesion mask must be 3D, got 4D` | mask |
| sidecar without InversionPulses | parse | `unusable MRF sidecar (sidecar lacks InversionPulses (...))` | sidecar |
| sidecar without DummyPasses | parse | `unusable MRF sidecar (sidecar lacks DummyPasses (...))` | sidecar |
| sidecar without slice order | parse | `... (sidecar lacks SliceOrder and SliceTiming (...))` | sidecar |
| EchoTime in ms | parse | `... (EchoTime values 16 to 76.5 look like milliseconds (...))` | sidecar |
| RepetitionTime in ms | parse | `... (RepetitionTime values ... look like milliseconds (...))` | sidecar |
| SMS factor contradicts SliceTiming | parse | `... (SliceTiming excites 1 slice(s) at once, ... says 2)` | sidecar |
| SMS without SliceTiming | parse | `... (MultibandAccelerationFactor 2 without SliceTiming: ...)` | sidecar |
| SliceOrder contradicts SliceTiming | parse | `... (SliceOrder disagrees with the order of SliceTiming)` | sidecar |
| sidecar contradicts mrf_timing | parse | `... (sidecar DummyPasses 3 disagrees with config ... 5)` | sidecar |
| inversion model contradicts config | parse | `... (sidecar InversionEfficiency "b1" disagrees ...)` | sidecar |
| two sidecars at one level | discovery | `several MRF sidecars apply at one folder level (BIDS inheritance)` | both |
| near miss (letter case) | discovery | `missing t2w input (found sub-02_T2w.NII.GZ; expected ...)` | T2w |
| group in neither label list | discovery | `group 'relapsing' is neither a control nor a patient ...` | [3] |
| MRF without orientation | content | `MRF series has no orientation (qform and sform codes 0)` | MRF |
| MRF identity affine | content | `MRF series affine is the identity (no scanner orientation and voxel size)` | MRF |
| MRF mis-scaled | content | `MRF field of view 12 x 12 mm disagrees with the T2w's 24 x 24 mm (...)` | MRF |
| T2w without orientation | content | `T2w image has no orientation (qform and sform codes 0)` | T2w |
| complex MRF | content | `MRF series is complex-valued (complex64); magnitude images expected` | MRF |
| phase-like MRF | content | `MRF series has negative values (min ...); magnitude images expected (...)` | MRF |

[1] skipped when the tests run as root, for whom file permissions do not apply.
[2] the path the input should have (``sub-02/anat/sub-02_T2w.nii.gz``).
[3] participants.tsv. Where a folder or a row is what is wrong, the subject in the message is its
label as written: ``sub-02/../03: ...``, ``sub-02.bak: ...``, ``sub-02_ses-1.5: ...``.

Valid handling (accepted, no message): an all-zero lesion mask (a control, or a patient without
visible lesions); a probabilistic lesion mask with values in [0, 1]; a participants.tsv with a UTF-8
byte-order mark, CRLF line ends or spaces around cells; MRF timing split over BIDS-inherited sidecars
(dataset, subject and series level); a timing key stated in the config's ``mrf_timing`` where the
sidecar lacks it (recorded); inputs that are symbolic links to
files (DataLad / git-annex datasets); unrelated or hidden files next to the inputs (README,
``.DS_Store``, other modalities); a participants.tsv row without imaging data (BIDS allows it); a T2w
on another grid than the MRF series, as long as the fields of view overlap (registration handles it).

The workflow-level test at the end breaks several subjects at once and checks that each gets its
line, the good subjects complete, a failed subject leaves no output, and the BIDS tree is untouched.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bidsfixture import make_dataset
from conftest import ROOT, tree_digest

from mrflesion.bids import discover
from mrflesion.mrf.sequence import Protocol
from mrflesion.plan.subjects import make_plan
from mrflesion.validate import InputError, check_subject, stated_timing

IS_ROOT = os.geteuid() == 0
N_MEASUREMENTS = 35


# ----------------------------------------------------------------------------- paths of sub-02
def anat(b: Path, sub: str = "02") -> Path:
    return b / f"sub-{sub}" / "anat"


def mrf(b: Path, sub: str = "02") -> Path:
    return anat(b, sub) / f"sub-{sub}_acq-MRFEPI_MRF.nii.gz"


def side(b: Path, sub: str = "02") -> Path:
    return anat(b, sub) / f"sub-{sub}_acq-MRFEPI_MRF.json"


def t2w(b: Path, sub: str = "02") -> Path:
    return anat(b, sub) / f"sub-{sub}_T2w.nii.gz"


def flair(b: Path, sub: str = "02") -> Path:
    return anat(b, sub) / f"sub-{sub}_FLAIR.nii.gz"


def lesion(b: Path, sub: str = "02") -> Path:
    return b / "derivatives/manual" / f"sub-{sub}/anat/sub-{sub}_space-FLAIR_label-lesion_mask.nii.gz"


def tsv(b: Path) -> Path:
    return b / "participants.tsv"


# ----------------------------------------------------------------------------- ways to break things
def _rewrite(path: Path, edit: Callable[[np.ndarray], np.ndarray] | None = None,
             affine: np.ndarray | None = None) -> None:
    """Replace a NIfTI by an edited copy (data and/or affine)."""
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj).copy()
    out = edit(data) if edit is not None else data
    new_affine = img.affine if affine is None else affine
    path.unlink()
    nib.Nifti1Image(out, new_affine).to_filename(str(path))


def _shifted(path: Path, mm: float = 1000.0) -> np.ndarray:
    aff = nib.load(str(path)).affine.copy()
    aff[:3, 3] += mm
    return aff


def _truncate(path: Path, n: int) -> None:
    path.write_bytes(path.read_bytes()[:n])


def _set(data: np.ndarray, index: tuple, value: float) -> np.ndarray:
    data = data.astype(np.float32)
    data[index] = value
    return data


def _edit_sidecar(b: Path, edit: Callable[[dict], object]) -> None:
    s = json.loads(side(b).read_text())
    side(b).write_text(json.dumps(edit(s)))


def _drop_last(s: dict, *keys: str) -> dict:
    return s | {k: s[k][:-1] for k in keys}


_TR_MS = [x * 1000.0 for x in Protocol.default(4).to_sidecar()["RepetitionTime"]]


def _drop_keys(b: Path, *keys: str) -> None:
    _edit_sidecar(b, lambda s: {k: v for k, v in s.items() if k not in keys})


def _scale_key(b: Path, key: str, factor: float) -> None:
    _edit_sidecar(b, lambda s: s | {key: [round(x * factor, 6) for x in s[key]]})


def _no_orientation(path: Path) -> None:
    """Rewrite a NIfTI with qform and sform codes 0 (no orientation: nibabel falls back to the zooms)."""
    img = nib.load(str(path))
    out = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine)
    out.set_qform(None, code=0)
    out.set_sform(None, code=0)
    path.unlink()
    out.to_filename(str(path))


def _min(path: Path) -> float:
    return float(np.asanyarray(nib.load(str(path)).dataobj).min())


def _tsv_lines(b: Path, edit: Callable[[list[str]], list[str]]) -> None:
    lines = tsv(b).read_text().splitlines()
    tsv(b).write_text("\n".join(edit(lines)) + "\n")


def _replace(path: Path, make: Callable[[Path], None]) -> None:
    path.unlink()
    make(path)


def _chmod000(path: Path) -> None:
    path.chmod(0)


def _restore_permissions(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                p.chmod(0o755 if p.is_dir() else 0o644)


def _non_bids_name(b: Path) -> None:
    t2w(b).rename(anat(b) / "sub02_T2w.nii.gz")
    (anat(b) / "notes.txt").write_text("x")  # unrelated: not listed in the message


def _mkdir_session(b: Path) -> None:
    (anat(b).parent / "ses-1.5" / "anat").mkdir(parents=True)


# ----------------------------------------------------------------------------- the classes
@dataclass(frozen=True)
class Case:
    name: str
    stage: str  # discovery | parse | content: the check that must catch it (documentation)
    breaks: Callable[[Path], object]
    message: Callable[[Path], str]  # the expected line, given the BIDS root
    needs_permissions: bool = False
    stops_sub02: bool = True  # False: the problem is an extra row or folder, sub-02 itself still runs
    config: dict | None = None  # config values of the case (merged over config.yaml)


CASES = [
    Case("missing-t2w", "discovery", lambda b: t2w(b).unlink(),
         lambda b: f"sub-02: missing t2w input: {t2w(b)}"),
    Case("missing-lesion-mask", "discovery", lambda b: lesion(b).unlink(),
         lambda b: f"sub-02: missing lesion input: {lesion(b)}"),
    Case("missing-mrf-sidecar", "discovery", lambda b: side(b).unlink(),
         lambda b: f"sub-02: missing MRF sidecar: {side(b)}"),
    Case("non-bids-name", "discovery", _non_bids_name,
         lambda b: f"sub-02: missing t2w input (ignored, not BIDS-named for this folder: sub02_T2w.nii.gz): {t2w(b)}"),
    Case("file-named-for-another-subject", "discovery", lambda b: t2w(b).rename(anat(b) / "sub-03_T2w.nii.gz"),
         lambda b: f"sub-02: missing t2w input (ignored, not BIDS-named for this folder: sub-03_T2w.nii.gz): "
                   f"{t2w(b)}"),
    Case("two-files-match-one-input", "discovery",
         lambda b: shutil.copy(t2w(b), anat(b) / "sub-02_run-2_T2w.nii.gz"),
         lambda b: f"sub-02: several t2w inputs match: {t2w(b)}, {anat(b) / 'sub-02_run-2_T2w.nii.gz'}"),
    Case("broken-symlink", "discovery", lambda b: _replace(t2w(b), lambda p: p.symlink_to("gone.nii.gz")),
         lambda b: f"sub-02: t2w input is a broken symbolic link: {t2w(b)}"),
    Case("directory-instead-of-file", "discovery", lambda b: _replace(t2w(b), lambda p: p.mkdir()),
         lambda b: f"sub-02: t2w input is a directory, not a file: {t2w(b)}"),
    Case("sidecar-is-a-directory", "discovery", lambda b: _replace(side(b), lambda p: p.mkdir()),
         lambda b: f"sub-02: MRF sidecar is not a regular file: {side(b)}"),
    Case("participant-not-listed", "discovery", lambda b: _tsv_lines(b, lambda ls: [ls[0], ls[1], *ls[3:]]),
         lambda b: f"sub-02: not listed in: {tsv(b)}"),
    Case("duplicate-participant-row", "discovery", lambda b: _tsv_lines(b, lambda ls: [*ls, ls[2]]),
         lambda b: f"sub-02: listed twice in: {tsv(b)}"),
    Case("site-missing", "discovery", lambda b: _tsv_lines(b, lambda ls: [ls[0], ls[1], "sub-02\tn/a\tpatient",
                                                                           *ls[3:]]),
         lambda b: f"sub-02: no site in: {tsv(b)}"),
    Case("participant-id-with-path-separator", "discovery",
         lambda b: _tsv_lines(b, lambda ls: [*ls, "sub-02/../03\tsite1\tpatient"]),
         lambda b: f"sub-02/../03: invalid participant_id 'sub-02/../03' (not sub-<letters and digits>) in: {tsv(b)}",
         stops_sub02=False),
    Case("subject-folder-label-not-alphanumeric", "discovery",
         lambda b: shutil.copytree(b / "sub-02", b / "sub-02.bak", symlinks=True),
         lambda b: f"sub-02.bak: folder label is not letters and digits: {b / 'sub-02.bak'}", stops_sub02=False),
    Case("subject-folder-with-backslash", "discovery", lambda b: (b / "sub-02\\x" / "anat").mkdir(parents=True),
         lambda b: f"sub-02\\x: folder label is not letters and digits: {b}/sub-02\\x", stops_sub02=False),
    Case("session-folder-label-not-alphanumeric", "discovery", _mkdir_session,
         lambda b: f"sub-02_ses-1.5: folder label is not letters and digits: {b / 'sub-02/ses-1.5'}",
         stops_sub02=False),
    Case("unreadable-folder", "discovery", lambda b: _chmod000(anat(b)),
         lambda b: f"sub-02: folder unreadable (permission denied): {anat(b)}", needs_permissions=True),
    Case("sidecar-not-json", "parse", lambda b: side(b).write_text("<xml/>\n"),
         lambda b: f"sub-02: unusable MRF sidecar (Expecting value: line 1 column 1 (char 0)): {side(b)}"),
    Case("sidecar-not-an-object", "parse", lambda b: side(b).write_text("[1, 2, 3]\n"),
         lambda b: f"sub-02: unusable MRF sidecar (not a JSON object): {side(b)}"),
    Case("sidecar-list-wrong-length", "parse", lambda b: _edit_sidecar(b, lambda s: _drop_last(s, "RepetitionTime")),
         lambda b: "sub-02: unusable MRF sidecar (FlipAngle, EchoTime and RepetitionTime must have the same length "
                   f"(got 35, 35, 34)): {side(b)}"),
    Case("sidecar-list-missing", "parse", lambda b: _edit_sidecar(b, lambda s: {k: v for k, v in s.items()
                                                                               if k != "FlipAngle"}),
         lambda b: f"sub-02: unusable MRF sidecar (sidecar lacks FlipAngle): {side(b)}"),
    Case("truncated-gzip", "content", lambda b: _truncate(mrf(b), 2000),
         lambda b: f"sub-02: MRF series file truncated or corrupt (EOFError): {mrf(b)}"),
    Case("gzip-cut-inside-header", "content", lambda b: _truncate(mrf(b), 60),
         lambda b: f"sub-02: MRF series file truncated or corrupt (EOFError): {mrf(b)}"),
    Case("empty-file", "content", lambda b: t2w(b).write_bytes(b""),
         lambda b: f"sub-02: T2w image file is empty (0 bytes): {t2w(b)}"),
    Case("nii-gz-not-gzip", "content", lambda b: t2w(b).write_text("not an image\n"),
         lambda b: f"sub-02: T2w image file is not gzip-compressed (a .nii.gz must be): {t2w(b)}"),
    Case("not-a-nifti", "content", lambda b: t2w(b).write_bytes(gzip.compress(b"P5 12 12 255\n" + bytes(2000))),
         lambda b: f"sub-02: T2w image file is not a NIfTI image (no NIfTI-1/2 header): {t2w(b)}"),
    Case("unreadable-file", "content", lambda b: _chmod000(t2w(b)),
         lambda b: f"sub-02: T2w image file unreadable (permission denied): {t2w(b)}", needs_permissions=True),
    Case("mrf-34-volumes", "content", lambda b: _rewrite(mrf(b), lambda d: d[..., :34]),
         lambda b: f"sub-02: MRF series has 34 volumes, expected 35: {mrf(b)}"),
    Case("mrf-3d", "content", lambda b: _rewrite(mrf(b), lambda d: d[..., 0]),
         lambda b: f"sub-02: MRF series must be 4D, got 3D: {mrf(b)}"),
    Case("t2w-4d", "content", lambda b: _rewrite(t2w(b), lambda d: np.stack([d, d], axis=-1)),
         lambda b: f"sub-02: T2w image must be 3D, got 4D: {t2w(b)}"),
    Case("nan-voxels", "content",
         lambda b: _rewrite(mrf(b), lambda d: _set(d, (slice(0, 3), 0, 0, 0), np.nan)),
         lambda b: f"sub-02: MRF series has 3 NaN/Inf voxels: {mrf(b)}"),
    Case("inf-voxels", "content", lambda b: _rewrite(flair(b), lambda d: _set(d, (1, 1, 1), np.inf)),
         lambda b: f"sub-02: FLAIR image has 1 NaN/Inf voxels: {flair(b)}"),
    Case("all-zero-image", "content", lambda b: _rewrite(t2w(b), np.zeros_like),
         lambda b: f"sub-02: T2w image is all zero: {t2w(b)}"),
    Case("mrf-volume-all-zero", "content", lambda b: _rewrite(mrf(b), lambda d: _set(d, (..., 16), 0.0)),
         lambda b: f"sub-02: MRF series volume 17 of 35 is all zero (1 such): {mrf(b)}"),
    Case("mrf-t2w-not-overlapping", "content", lambda b: _rewrite(t2w(b), affine=_shifted(t2w(b))),
         lambda b: f"sub-02: MRF and T2w fields of view overlap by only 0%: {t2w(b)}"),
    Case("flair-t2w-not-overlapping", "content", lambda b: _rewrite(flair(b), affine=_shifted(flair(b))),
         lambda b: f"sub-02: FLAIR and T2w fields of view overlap by only 0%: {flair(b)}"),
    Case("sidecar-slices-disagree-with-image", "content",
         lambda b: side(b).write_text(json.dumps(Protocol.default(6).to_sidecar())),
         lambda b: f"sub-02: MRF sidecar SliceOrder has 6 slices, image has 4: {side(b)}"),
    Case("sidecar-lists-34-measurements", "content",
         lambda b: _edit_sidecar(b, lambda s: _drop_last(s, "FlipAngle", "EchoTime", "RepetitionTime")),
         lambda b: f"sub-02: MRF sidecar lists 34 measurements, expected 35: {side(b)}"),
    Case("lesion-mask-other-shape", "content",
         lambda b: _rewrite(lesion(b), lambda d: np.concatenate([d, d[..., :1]], axis=2)),
         lambda b: f"sub-02: lesion mask is not on the FLAIR grid (shape 12x12x5 vs 12x12x4): {lesion(b)}"),
    Case("lesion-mask-other-affine", "content", lambda b: _rewrite(lesion(b), affine=np.eye(4)),
         lambda b: f"sub-02: lesion mask is not on the FLAIR grid (affines differ): {lesion(b)}"),
    Case("lesion-mask-nan", "content", lambda b: _rewrite(lesion(b), lambda d: _set(d, (0, 0, 0), np.nan)),
         lambda b: f"sub-02: lesion mask has 1 NaN/Inf voxels: {lesion(b)}"),
    Case("lesion-mask-negative", "content", lambda b: _rewrite(lesion(b), lambda d: _set(d, (0, 0, 0), -1.0)),
         lambda b: f"sub-02: lesion mask values must lie in [0, 1] (found -1 to 1): {lesion(b)}"),
    Case("lesion-mask-4d", "content", lambda b: _rewrite(lesion(b), lambda d: d[..., None]),
         lambda b: f"sub-02: lesion mask must be 3D, got 4D: {lesion(b)}"),
    # ---- issue 17: inputs the pipeline cannot interpret with certainty
    Case("sidecar-without-inversion-schedule", "parse", lambda b: _drop_keys(b, "InversionPulses"),
         lambda b: "sub-02: unusable MRF sidecar (sidecar lacks InversionPulses (the inversion schedule; [] if the "
                   f"sequence has none)): {side(b)}"),
    Case("sidecar-without-dummy-passes", "parse", lambda b: _drop_keys(b, "DummyPasses"),
         lambda b: f"sub-02: unusable MRF sidecar (sidecar lacks DummyPasses (passes before the first readout; 0 if "
                   f"none)): {side(b)}"),
    Case("sidecar-without-slice-order", "parse", lambda b: _drop_keys(b, "SliceOrder", "SliceTiming"),
         lambda b: "sub-02: unusable MRF sidecar (sidecar lacks SliceOrder and SliceTiming (the slice acquisition "
                   f"order)): {side(b)}"),
    Case("echo-time-in-ms", "parse", lambda b: _scale_key(b, "EchoTime", 1000.0),
         lambda b: "sub-02: unusable MRF sidecar (EchoTime values 16 to 76.5 look like milliseconds (BIDS sidecars "
                   f"give seconds)): {side(b)}"),
    Case("repetition-time-in-ms", "parse", lambda b: _scale_key(b, "RepetitionTime", 1000.0),
         lambda b: f"sub-02: unusable MRF sidecar (RepetitionTime values {min(_TR_MS):g} to {max(_TR_MS):g} look like "
                   f"milliseconds (BIDS sidecars give seconds)): {side(b)}"),
    Case("sms-factor-disagrees-with-slice-timing", "parse",
         lambda b: _edit_sidecar(b, lambda s: s | {"MultibandAccelerationFactor": 2}),
         lambda b: "sub-02: unusable MRF sidecar (SliceTiming excites 1 slice(s) at once, "
                   f"MultibandAccelerationFactor says 2): {side(b)}"),
    Case("sms-without-slice-timing", "parse",
         lambda b: _edit_sidecar(b, lambda s: {k: v for k, v in s.items() if k != "SliceTiming"}
                                 | {"MultibandAccelerationFactor": 2}),
         lambda b: "sub-02: unusable MRF sidecar (MultibandAccelerationFactor 2 without SliceTiming: which slices "
                   f"share a slot is not stated): {side(b)}"),
    Case("slice-order-disagrees-with-slice-timing", "parse",
         lambda b: _edit_sidecar(b, lambda s: s | {"SliceOrder": [0, 1, 2, 3]}),
         lambda b: f"sub-02: unusable MRF sidecar (SliceOrder disagrees with the order of SliceTiming): {side(b)}"),
    Case("sidecar-disagrees-with-stated-timing", "parse", lambda b: _edit_sidecar(b, lambda s: s | {"DummyPasses": 3}),
         lambda b: "sub-02: unusable MRF sidecar (sidecar DummyPasses 3 disagrees with config mrf_timing.DummyPasses "
                   f"5): {side(b)}", config={"mrf_timing": {"DummyPasses": 5}}),
    Case("inversion-model-disagrees-with-config", "parse",
         lambda b: _edit_sidecar(b, lambda s: s | {"InversionEfficiency": "b1"}),
         lambda b: "sub-02: unusable MRF sidecar (sidecar InversionEfficiency \"b1\" disagrees with config "
                   f"sequence_model.inversion_efficiency \"perfect\"): {side(b)}"),
    Case("two-sidecars-at-one-level", "discovery",
         lambda b: shutil.copy(side(b), anat(b) / "sub-02_MRF.json"),
         lambda b: "sub-02: several MRF sidecars apply at one folder level (BIDS inheritance): "
                   f"{anat(b) / 'sub-02_MRF.json'}, {side(b)}"),
    Case("near-miss-extension-case", "discovery", lambda b: t2w(b).rename(anat(b) / "sub-02_T2w.NII.GZ"),
         lambda b: f"sub-02: missing t2w input (found sub-02_T2w.NII.GZ; expected sub-02_T2w.nii.gz): {t2w(b)}"),
    Case("near-miss-suffix-case", "discovery", lambda b: t2w(b).rename(anat(b) / "sub-02_T2W.nii.gz"),
         lambda b: f"sub-02: missing t2w input (found sub-02_T2W.nii.gz; expected sub-02_T2w.nii.gz): {t2w(b)}"),
    Case("group-label-unknown", "discovery",
         lambda b: _tsv_lines(b, lambda ls: [ls[0], ls[1], "sub-02\tsite2\trelapsing", *ls[3:]]),
         lambda b: "sub-02: group 'relapsing' is neither a control nor a patient label (config control_labels, "
                   f"patient_labels) in: {tsv(b)}"),
    Case("mrf-without-orientation", "content", lambda b: _no_orientation(mrf(b)),
         lambda b: f"sub-02: MRF series has no orientation (qform and sform codes 0): {mrf(b)}"),
    Case("mrf-identity-affine", "content", lambda b: _rewrite(mrf(b), affine=np.eye(4)),
         lambda b: f"sub-02: MRF series affine is the identity (no scanner orientation and voxel size): {mrf(b)}"),
    Case("mrf-field-of-view-mis-scaled", "content", lambda b: _rewrite(mrf(b), affine=np.diag([1.0, 1.0, 1.5, 1.0])),
         lambda b: "sub-02: MRF field of view 12 x 12 mm disagrees with the T2w's 24 x 24 mm (voxel size or "
                   f"orientation wrong?): {mrf(b)}"),
    Case("t2w-without-orientation", "content", lambda b: _no_orientation(t2w(b)),
         lambda b: f"sub-02: T2w image has no orientation (qform and sform codes 0): {t2w(b)}"),
    Case("mrf-complex-valued", "content", lambda b: _rewrite(mrf(b), lambda d: d.astype(np.complex64) * (1 + 1j)),
         lambda b: f"sub-02: MRF series is complex-valued (complex64); magnitude images expected: {mrf(b)}"),
    Case("mrf-phase-like", "content", lambda b: _rewrite(mrf(b), lambda d: (d - 1.0) * np.float32(np.pi)),
         lambda b: f"sub-02: MRF series has negative values (min {_min(mrf(b)):g}); magnitude images expected "
                   f"(phase or real/imaginary data?): {mrf(b)}"),
]


def _errors(config: dict, b: Path) -> tuple[dict[str, list[str]], dict[str, dict]]:
    """Every message the pipeline would print for the dataset, by the check that gave it, and the
    summary of each accepted subject.

    The same three checks, in the same order, as a run: discovery and sidecar timing (make_plan,
    at parse time), then check_subject per subject (rule check_inputs).
    """
    cfg = copy.deepcopy(config) | {"bids_dir": str(b)}
    found = [str(p) for p in discover(cfg, b).problems]
    plan = make_plan(cfg)
    messages = {"discovery": found, "parse": [str(p) for p in plan.problems if str(p) not in found], "content": []}
    summaries = {}
    for s in plan.subjects.values():
        try:
            summaries[s.key] = check_subject(s.key, s.files, s.sidecar_layers, N_MEASUREMENTS,
                                             stated=stated_timing(cfg))
        except InputError as exc:
            messages["content"].append(str(exc))
    return messages, summaries


@pytest.fixture()
def bids(tmp_path: Path) -> Iterator[Path]:
    root = make_dataset(tmp_path / "bids", 3)
    yield root
    _restore_permissions(root)  # so that chmod-000 cases can be cleaned up


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_class_gives_one_line(case: Case, bids: Path, repo_config: dict) -> None:
    if case.needs_permissions and IS_ROOT:
        pytest.skip("running as root: file permissions do not apply")
    case.breaks(bids)
    expected = case.message(bids)
    messages, summaries = _errors(repo_config | (case.config or {}), bids)
    # Exactly one line in all, from the check the table names.
    assert messages == {stage: [expected] if stage == case.stage else [] for stage in ("discovery", "parse", "content")}
    line = expected
    # One line: ``<subject>: <reason>: <absolute path of the offending file>``.
    assert "\n" not in line and "\r" not in line
    subject, _, rest = line.partition(": ")
    assert subject.startswith("sub-02") and rest.rsplit(": ", 1)[1].startswith(f"{bids}/")
    # The other subjects are untouched by one subject's problem.
    assert sorted(summaries) == (["sub-01", "sub-03"] if case.stops_sub02 else ["sub-01", "sub-02", "sub-03"])


def test_check_subject_alone_names_a_missing_file(tmp_path: Path) -> None:
    """check_subject does not rely on discovery having checked the paths."""
    b = make_dataset(tmp_path / "bids", 1)
    files = {"mrf": str(mrf(b, "01")), "t2w": str(tmp_path / "nope.nii.gz"), "flair": str(flair(b, "01")),
             "lesion": str(lesion(b, "01"))}
    with pytest.raises(InputError) as err:
        check_subject("sub-01", files, str(side(b, "01")), N_MEASUREMENTS)
    assert str(err.value) == f"sub-01: T2w image file missing: {tmp_path / 'nope.nii.gz'}"


def test_library_messages_are_one_line() -> None:
    err = InputError("sub-01", "file is not a readable NIfTI image (Expected 256 bytes,\n - damaged?)", "/x.nii.gz")
    assert str(err) == "sub-01: file is not a readable NIfTI image (Expected 256 bytes, - damaged?): /x.nii.gz"


# ----------------------------------------------------------------------------- valid handling
def _probabilistic_lesion(b: Path) -> None:
    _rewrite(lesion(b), lambda d: d.astype(np.float32) * 0.75)


def _symlinked_inputs(b: Path) -> None:
    # DataLad / git-annex datasets: every input is a symbolic link into an object store.
    store = b / ".git/annex/objects"
    store.mkdir(parents=True)
    for path in (mrf(b), t2w(b), flair(b), lesion(b)):
        target = store / path.name
        path.rename(target)
        path.symlink_to(os.path.relpath(target, path.parent))


def _stray_files(b: Path) -> None:
    for name in ("README", ".DS_Store", "notes.txt", "sub-02_T1w.nii.gz", "sub-02_T2w.nii.gz.bak"):
        (anat(b) / name).write_text("x")
    (b / "README").write_text("fixture\n")


def _t2w_other_grid(b: Path) -> None:
    # 1 mm voxels over the MRF's field of view (2 x 2 x 3 mm, 12 x 12 x 4): another grid, the same place.
    t2w(b).unlink()
    nib.Nifti1Image(np.ones((24, 24, 12), np.float32), np.eye(4)).to_filename(str(t2w(b)))


def _tsv_bytes(b: Path, edit: Callable[[bytes], bytes]) -> None:
    tsv(b).write_bytes(edit(tsv(b).read_bytes()))


def _split_timing_over_levels(b: Path) -> None:
    # BIDS inheritance: the schedule at the dataset root (for everyone), the slice timing in sub-02/, the
    # rest beside the series; sub-01 and sub-03 keep their complete sidecars, which override the root's.
    full = json.loads(side(b).read_text())
    top = {k: full[k] for k in ("FlipAngle", "EchoTime", "RepetitionTime", "InversionPulses", "InversionDuration")}
    subject = {k: full[k] for k in ("SliceOrder", "SliceTiming", "MultibandAccelerationFactor")}
    (b / "acq-MRFEPI_MRF.json").write_text(json.dumps(top))
    (b / "sub-02" / "sub-02_acq-MRFEPI_MRF.json").write_text(json.dumps(subject))
    side(b).write_text(json.dumps({k: v for k, v in full.items() if k not in top and k not in subject}))


VALID = {
    # sub-01 of the fixture is a control whose lesion mask is all zero: that is data, not an error.
    "control-with-empty-lesion-mask": lambda b: None,
    # A lesion probability map (values in [0, 1]) instead of a binary mask: thresholded at 0.5.
    "probabilistic-lesion-mask": _probabilistic_lesion,
    # Inputs that are symbolic links to real files are read through the link.
    "symlinked-inputs": _symlinked_inputs,
    # Unrelated, hidden or backup files beside the inputs are ignored (only configured inputs are read).
    "stray-files-beside-inputs": _stray_files,
    # A participants.tsv row without imaging data: BIDS allows it, there is nothing to process.
    "participant-row-without-data": lambda b: _tsv_lines(b, lambda ls: [*ls, "sub-99\tsite1\tpatient"]),
    # The T2w may have its own grid: the MRF maps are registered to it.
    "t2w-on-another-grid": _t2w_other_grid,
    # participants.tsv as spreadsheets write it: a UTF-8 byte-order mark, CRLF line ends, padded cells.
    "participants-with-byte-order-mark": lambda b: _tsv_bytes(b, lambda t: b"\xef\xbb\xbf" + t),
    "participants-with-crlf-line-ends": lambda b: _tsv_bytes(b, lambda t: t.replace(b"\n", b"\r\n")),
    "participants-with-spaces": lambda b: _tsv_bytes(b, lambda t: t.replace(b"\t", b" \t ")),
    # MRF timing keys split between a dataset-level, a subject-level and the series' sidecar.
    "timing-split-over-inherited-sidecars": _split_timing_over_levels,
}


@pytest.mark.parametrize("name", list(VALID))
def test_valid_unusual_input_is_accepted(name: str, bids: Path, repo_config: dict) -> None:
    VALID[name](bids)
    messages, summaries = _errors(repo_config, bids)
    assert messages == {"discovery": [], "parse": [], "content": []}
    assert sorted(summaries) == ["sub-01", "sub-02", "sub-03"]
    assert summaries["sub-01"]["lesion_voxels"] == 0  # the control
    assert summaries["sub-02"]["lesion_voxels"] == 8


def test_apply_mode_checks_a_subject_without_manual_mask(bids: Path, repo_config: dict) -> None:
    """Apply mode (``models``): a subject without a manual lesion mask passes the input checks, its lesion
    volume unknown (None; ``n/a`` in group/inputs.tsv); training mode refuses it at discovery."""
    (bids / "derivatives/manual/sub-02/anat/sub-02_space-FLAIR_label-lesion_mask.nii.gz").unlink()
    messages, summaries = _errors(repo_config | {"models": str(bids / "models")}, bids)
    assert messages == {"discovery": [], "parse": [], "content": []}
    assert summaries["sub-02"]["lesion_voxels"] is None and summaries["sub-02"]["lesion_ml"] is None
    assert summaries["sub-01"]["lesion_voxels"] == 0
    messages, summaries = _errors(repo_config, bids)
    assert sorted(summaries) == ["sub-01", "sub-03"] and messages["discovery"][0].startswith(
        "sub-02: missing lesion input: ")


def test_inherited_sidecars_give_the_same_timing(bids: Path, repo_config: dict) -> None:
    """Timing keys spread over the BIDS inheritance levels are all read: sub-02 (split) has the timing
    key of sub-01 (complete sidecar), and the check records the three files it read, top level first."""
    _split_timing_over_levels(bids)
    messages, summaries = _errors(repo_config, bids)
    assert messages == {"discovery": [], "parse": [], "content": []}
    assert summaries["sub-02"]["timing_key"] == summaries["sub-01"]["timing_key"]
    assert summaries["sub-02"]["sidecars"] == [str(bids / "acq-MRFEPI_MRF.json"),
                                               str(bids / "sub-02" / "sub-02_acq-MRFEPI_MRF.json"), str(side(bids))]
    # the dataset-level file applies to sub-01 too, beneath its own complete sidecar
    assert summaries["sub-01"]["sidecars"] == [str(bids / "acq-MRFEPI_MRF.json"), str(side(bids, "01"))]
    # without the dataset-level file the schedule is missing: refused, naming the series' sidecar
    (bids / "acq-MRFEPI_MRF.json").unlink()
    messages, summaries = _errors(repo_config, bids)
    assert messages["parse"] == [f"sub-02: unusable MRF sidecar (sidecar lacks FlipAngle): {side(bids)}"]
    assert sorted(summaries) == ["sub-01", "sub-03"]


def test_timing_stated_in_config_is_used_and_recorded(bids: Path, repo_config: dict) -> None:
    """A sidecar without dummy passes and volume pause: refused, unless the config states them; then the
    values are used and recorded as coming from the config."""
    _drop_keys(bids, "DummyPasses", "VolumePause")
    messages, summaries = _errors(repo_config, bids)
    assert messages["parse"] == [
        "sub-02: unusable MRF sidecar (sidecar lacks DummyPasses (passes before the first readout; 0 if none)): "
        f"{side(bids)}"]
    assert sorted(summaries) == ["sub-01", "sub-03"]
    stated = repo_config | {"mrf_timing": {"DummyPasses": 5, "VolumePause": 0.02}}
    messages, summaries = _errors(stated, bids)
    assert messages == {"discovery": [], "parse": [], "content": []}
    assert summaries["sub-02"]["timing_from_config"] == {"DummyPasses": 5, "VolumePause": 0.02}
    assert summaries["sub-01"]["timing_from_config"] == {}
    assert summaries["sub-02"]["timing_key"] == summaries["sub-01"]["timing_key"]


def test_control_labels_are_configurable(bids: Path, repo_config: dict) -> None:
    """A control marked "HV" trains (it is a control label by default); a label the config does not list
    is refused with one line instead of being taken for a patient."""
    from mrflesion.plan.training import make_splits, subject_rows

    _tsv_lines(bids, lambda ls: [ls[0], "sub-01\tsite1\tHV", *ls[2:]])
    cfg = repo_config | {"bids_dir": str(bids)}
    plan = make_plan(cfg)
    assert plan.problems == [] and plan.subjects["sub-01/anat/sub-01"].group == "control"
    split = make_splits(subject_rows(plan.subjects.values()), {"n_test_per_site": 1, "n_val_per_site": 1,
                                                                "reference_subjects": 0})
    assert split.set_index("subject").loc["sub-01", "split"] == "train"
    plan = make_plan(cfg | {"control_labels": ["control"]})
    assert [str(p) for p in plan.problems] == [
        "sub-01: group 'HV' is neither a control nor a patient label (config control_labels, patient_labels) in: "
        f"{tsv(bids)}"]


def test_enough_classes() -> None:
    assert len(CASES) >= 15 and len({c.name for c in CASES}) == len(CASES)


# ----------------------------------------------------------------------------- the workflow
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile")]
# The fixture is 12x12x4: MPPCA needs patch_radius 1 (a 5-voxel patch does not fit 4 slices); the rest
# only makes the run quicker (coarse dictionary, rigid registration only).
FAST_CONFIG = """\
denoise: {patch_radius: 1}
dictionary:
  grid: {t1_ms: [300, 3500], t2star_ms: [10, 2500], step: 0.25, b1_range: [0.8, 1.2], b1_step: 0.2}
  n_clusters: 16
matching: {refine: false}
registration: {phase_encode_stage: false}
"""


def test_workflow_bad_subjects_fail_alone(tmp_path: Path) -> None:
    b = make_dataset(tmp_path / "bids", 10)
    shutil.copytree(b / "sub-04", b / "sub-04.bak", symlinks=True)  # a backup copy: not a valid label
    _tsv_lines(b, lambda ls: [*ls, "sub-01/../02\tsite1\tpatient"])  # a path in participant_id
    _truncate(mrf(b, "02"), 2000)
    _rewrite(t2w(b, "03"), lambda d: _set(d, (0, 0, 0), np.nan))
    _rewrite(mrf(b, "05"), lambda d: d[..., :34])
    _rewrite(lesion(b, "06"), lambda d: np.concatenate([d, d[..., :1]], axis=2))
    s08 = json.loads(side(b, "08").read_text())
    side(b, "08").write_text(json.dumps(_drop_last(s08, "RepetitionTime")))
    _rewrite(mrf(b, "09"), lambda d: d.astype(np.complex64))  # complex-valued MRF data (issue 17)
    s10 = json.loads(side(b, "10").read_text())
    side(b, "10").write_text(json.dumps({k: v for k, v in s10.items() if k != "InversionPulses"}))
    if IS_ROOT:  # permissions do not apply to root: a non-BIDS name instead
        t2w(b, "07").rename(anat(b, "07") / "sub07_T2w.nii.gz")
    before = tree_digest(b)
    if not IS_ROOT:
        _chmod000(t2w(b, "07"))
    expected = {
        "sub-02": f"mrflesion error: sub-02: MRF series file truncated or corrupt (EOFError): {mrf(b, '02')}",
        "sub-03": f"mrflesion error: sub-03: T2w image has 1 NaN/Inf voxels: {t2w(b, '03')}",
        "sub-05": f"mrflesion error: sub-05: MRF series has 34 volumes, expected 35: {mrf(b, '05')}",
        "sub-06": "mrflesion error: sub-06: lesion mask is not on the FLAIR grid (shape 12x12x5 vs 12x12x4): "
                  f"{lesion(b, '06')}",
        "sub-07": (f"mrflesion error: sub-07: T2w image file unreadable (permission denied): {t2w(b, '07')}"
                   if not IS_ROOT else
                   "mrflesion: skipping sub-07: missing t2w input (ignored, not BIDS-named for this folder: "
                   f"sub07_T2w.nii.gz): {t2w(b, '07')}"),
        "sub-08": "mrflesion: skipping sub-08: unusable MRF sidecar (FlipAngle, EchoTime and RepetitionTime must "
                  f"have the same length (got 35, 35, 34)): {side(b, '08')}",
        "sub-09": f"mrflesion error: sub-09: MRF series is complex-valued (complex64); magnitude images expected: "
                  f"{mrf(b, '09')}",
        "sub-10": "mrflesion: skipping sub-10: unusable MRF sidecar (sidecar lacks InversionPulses (the inversion "
                  f"schedule; [] if the sequence has none)): {side(b, '10')}",
        "sub-04.bak": f"mrflesion: skipping sub-04.bak: folder label is not letters and digits: {b / 'sub-04.bak'}",
        "sub-01/../02": "mrflesion: skipping sub-01/../02: invalid participant_id 'sub-01/../02' (not sub-<letters "
                        f"and digits>) in: {tsv(b)}",
    }
    (tmp_path / "fast.yaml").write_text(FAST_CONFIG)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            SNAKEMAKE + ["--cores", "2", "--keep-going", "--configfile", str(tmp_path / "fast.yaml"), "--config",
                         f"bids_dir={b}", f"output_dir={tmp_path}/out", f"work_dir={tmp_path}/work", "--",
                         "participant"],
            cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )
    finally:
        if not IS_ROOT:
            t2w(b, "07").chmod(0o644)
    elapsed = time.perf_counter() - t0
    print(f"workflow run: {elapsed:.1f} s")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]  # the bad subjects' jobs failed
    # Each job writes its line in one write(); Snakemake's own multi-kilobyte error blocks may be split
    # around it by the pipe, so a message is looked for in the output, not as a whole line (CI saw this).
    for key, message in expected.items():
        near = "\n".join(line for line in out.splitlines() if f"{key}:" in line)
        assert message in out, f"{key}: {message!r} not in output; lines naming it:\n{near}\n{out[-3000:]}"
        assert out.count(f"mrflesion error: {key}: ") + out.count(f"mrflesion: skipping {key}: ") == 1, near
    # The good subjects (sub-01 is a control with an empty lesion mask) get their outputs.
    for ok in ("sub-01", "sub-04"):
        assert (tmp_path / f"work/inputs/{ok}/anat/{ok}_inputs.json").is_file(), out[-5000:]
        for suffix in ("acq-MRFEPI_T1map.nii.gz", "acq-MRFEPI_desc-denoised_MRF.nii.gz",
                       "acq-MRFEPI_space-T2w_MRF.nii.gz", "space-T2w_label-lesion_mask.nii.gz"):
            assert (tmp_path / f"out/{ok}/anat/{ok}_{suffix}").is_file(), (suffix, out[-5000:])
        # how the series was interpreted is recorded with the maps: inversion model, sidecars, config values
        t1_side = json.loads((tmp_path / f"out/{ok}/anat/{ok}_acq-MRFEPI_T1map.json").read_text())
        assert t1_side["InversionEfficiency"] == "perfect" and t1_side["TimingFromConfig"] == {}
        assert t1_side["MRFSidecars"] == [str(side(b, ok[4:]))]
    # No output of a failed or skipped subject (logs excepted: they explain the failure).
    leftovers = []
    for area in ("out", "work"):
        for p in (tmp_path / area).rglob("*"):
            rel = p.relative_to(tmp_path).as_posix()
            if p.is_file() and not rel.startswith("work/logs/") and any(f"{k}/" in rel or f"{k}_" in rel
                                                                          for k in expected):
                leftovers.append(rel)
            if ".tmp" in p.name:
                leftovers.append(rel)
    assert leftovers == []
    assert tree_digest(b) == before
