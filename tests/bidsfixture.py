"""A tiny, fast BIDS dataset with the layout the pipeline reads (used where the phantom is overkill)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from mrflesion.mrf.sequence import Protocol

SHAPE = (12, 12, 4)
_SIDECAR = json.dumps(Protocol.default(SHAPE[2]).to_sidecar())


def _img(data: np.ndarray, path: Path, affine: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    aff = np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine
    nib.Nifti1Image(data, aff).to_filename(path)


def make_subject(root: Path, label: str, session: str | None = None, seed: int = 0, lesion: bool = True) -> None:
    rng = np.random.default_rng(seed)
    key = f"sub-{label}" + (f"_ses-{session}" if session else "")
    folder = Path(f"sub-{label}") / (f"ses-{session}" if session else "") / "anat"
    anat = root / folder
    mrf = (rng.random(SHAPE + (35,)) + 0.5).astype(np.float32)
    _img(mrf, anat / f"{key}_acq-MRFEPI_MRF.nii.gz")
    side = Protocol.default(SHAPE[2]).to_sidecar() | {"PhaseEncodingDirection": "j"}
    (anat / f"{key}_acq-MRFEPI_MRF.json").write_text(json.dumps(side))
    _img((rng.random(SHAPE) + 0.5).astype(np.float32), anat / f"{key}_T2w.nii.gz")
    (anat / f"{key}_T2w.json").write_text(json.dumps({"EchoTime": 0.1, "RepetitionTime": 5.0}))
    _img((rng.random(SHAPE) + 0.5).astype(np.float32), anat / f"{key}_FLAIR.nii.gz")
    (anat / f"{key}_FLAIR.json").write_text(json.dumps({"EchoTime": 0.09, "RepetitionTime": 9.0}))
    mask = np.zeros(SHAPE, np.uint8)
    if lesion:
        mask[5:7, 5:7, 1:3] = 1
    manual = root / "derivatives" / "manual" / folder
    _img(mask, manual / f"{key}_space-FLAIR_label-lesion_mask.nii.gz")


def make_dataset(
    root: Path, n_subjects: int = 4, sessions: list[str] | None = None, sites: int = 2, empty: bool = False
) -> Path:
    """Write ``n_subjects`` (optionally with sessions). ``empty=True`` writes zero-byte files (benchmarks)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "fixture", "BIDSVersion": "1.10.0", "DatasetType": "raw"})
    )
    (root / ".bidsignore").write_text("*_MRF.*\n")
    manual = root / "derivatives" / "manual"
    manual.mkdir(parents=True, exist_ok=True)
    (manual / "dataset_description.json").write_text(
        json.dumps({"Name": "manual", "BIDSVersion": "1.10.0", "DatasetType": "derivative"})
    )
    width = max(2, len(str(n_subjects)))
    rows = ["participant_id\tsite\tgroup"]
    for i in range(n_subjects):
        label = f"{i + 1:0{width}d}"
        rows.append(f"sub-{label}\tsite{i % sites + 1}\t{'control' if i % 4 == 0 else 'patient'}")
        for ses in sessions or [None]:
            if empty:
                _touch_subject(root, label, ses)
            else:
                make_subject(root, label, ses, seed=i, lesion=i % 4 != 0)
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return root


def _touch_subject(root: Path, label: str, session: str | None) -> None:
    key = f"sub-{label}" + (f"_ses-{session}" if session else "")
    folder = Path(f"sub-{label}") / (f"ses-{session}" if session else "") / "anat"
    anat = root / folder
    anat.mkdir(parents=True, exist_ok=True)
    for name in ("acq-MRFEPI_MRF.nii.gz", "T2w.nii.gz", "T2w.json", "FLAIR.nii.gz"):
        (anat / f"{key}_{name}").touch()
    # The MRF sidecar is read at parse time (its timing keys the dictionary), so it has content.
    (anat / f"{key}_acq-MRFEPI_MRF.json").write_text(_SIDECAR)
    manual = root / "derivatives" / "manual" / folder
    manual.mkdir(parents=True, exist_ok=True)
    (manual / f"{key}_space-FLAIR_label-lesion_mask.nii.gz").touch()
