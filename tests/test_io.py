"""The one NIfTI derivative writer (mrflesion.io.write_derivative): grid from the reference, atomic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mrflesion import io, layout

AFFINE = np.array([[-2.0, 0, 0, 90], [0, 2, 0, -100], [0, 0, 3, -40], [0, 0, 0, 1]])


def _reference(tmp_path: Path) -> Path:
    """A 4D series with sform 'aligned', qform 'scanner', mm / ms and a 12.5 ms time step, and header
    fields a derivative must not inherit (description, intent, display range)."""
    img = nib.Nifti1Image(np.ones((4, 5, 6, 3), np.int16), AFFINE)
    img.header.set_qform(AFFINE, code=1)
    img.header.set_sform(AFFINE, code=2)
    img.header.set_xyzt_units("mm", "msec")
    img.header.set_zooms((2.0, 2.0, 3.0, 12.5))
    img.header["descrip"] = b"scanner series"
    img.header["cal_max"] = 99.0
    img.header.set_intent("estimate")
    path = tmp_path / "ref.nii.gz"
    nib.save(img, path)
    return path


def _tree(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_header_from_the_reference(tmp_path: Path) -> None:
    ref = _reference(tmp_path)
    out = tmp_path / "deriv" / "sub-01_space-T2w_label-WM_probseg.nii.gz"
    data = np.random.default_rng(0).random((4, 5, 6))
    assert io.write_derivative(out, data, ref, {"Units": "1", "Sources": [str(ref)]}, dtype=np.float32) == out
    img = nib.load(out)
    hdr = img.header
    assert hdr.get_data_dtype() == np.float32
    assert np.array_equal(np.asarray(img.dataobj), data.astype(np.float32))
    assert np.allclose(img.affine, AFFINE)
    assert int(hdr["qform_code"]) == 1 and int(hdr["sform_code"]) == 2
    assert np.allclose(hdr.get_qform(), AFFINE) and np.allclose(hdr.get_sform(), AFFINE)
    assert hdr.get_zooms() == (2.0, 2.0, 3.0)
    assert hdr.get_xyzt_units() == ("mm", "msec")
    assert hdr["descrip"].item() == b"" and float(hdr["cal_max"]) == 0 and hdr.get_intent()[0] == "none"
    side = Path(layout.sidecar_path(out))
    assert json.loads(side.read_text()) == {"Units": "1", "Sources": [str(ref)]}
    assert _tree(out.parent) == sorted([out.name, side.name])  # no temporary file left
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~io._UMASK  # not mkstemp's 0600


def test_4d_time_step_and_affine_reference(tmp_path: Path) -> None:
    ref = _reference(tmp_path)
    series = np.zeros((4, 5, 6, 2), np.float64)
    out = io.write_derivative(tmp_path / "a.nii.gz", series, ref, dtype="float32")
    assert nib.load(out).header.get_zooms() == (2.0, 2.0, 3.0, 12.5)  # the reference's time step
    out = io.write_derivative(tmp_path / "b.nii", series, ref, time_step=1.0)
    assert nib.load(out).header.get_zooms()[3] == 1.0 and nib.load(out).get_data_dtype() == np.float64
    assert not Path(layout.sidecar_path(out)).exists()  # no sidecar asked for
    mask = np.zeros((4, 5, 6), bool)
    mask[1, 2, 3] = True
    out = io.write_derivative(tmp_path / "c.nii.gz", mask, AFFINE, dtype=np.uint8)  # a bare affine
    hdr = nib.load(out).header
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (1, 1)
    assert hdr.get_xyzt_units() == ("mm", "sec") and hdr.get_data_dtype() == np.uint8
    assert np.asarray(nib.load(out).dataobj).sum() == 1
    with pytest.raises(ValueError, match="4x4 affine"):
        io.write_derivative(tmp_path / "d.nii.gz", mask, np.eye(3))


def test_same_bytes_every_time(tmp_path: Path) -> None:
    """No time stamp and no (temporary) file name in the gzip header."""
    data = np.arange(120, dtype=np.float32).reshape(4, 5, 6)
    a = io.write_derivative(tmp_path / "x" / "m.nii.gz", data, AFFINE)
    b = io.write_derivative(tmp_path / "y" / "m.nii.gz", data, AFFINE)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes()[3] == 0 and a.read_bytes()[4:8] == b"\0\0\0\0"  # gzip FLG (no FNAME), MTIME 0


@pytest.mark.parametrize("existing", [False, True])
def test_atomic_when_the_write_fails_midway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            existing: bool) -> None:
    out = tmp_path / "sub-01_space-T2w_desc-brain_mask.nii.gz"
    side = Path(layout.sidecar_path(out))
    if existing:
        io.write_derivative(out, np.ones((4, 5, 6)), AFFINE, {"Run": 1}, dtype=np.uint8)
    before = {p: p.read_bytes() for p in (out, side) if p.exists()}

    def broken(self: nib.Nifti1Image, fileobj: object) -> None:
        fileobj.write(b"half a header")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(nib.Nifti1Image, "to_stream", broken)
    with pytest.raises(OSError, match="disk full"):
        io.write_derivative(out, np.zeros((4, 5, 6)), AFFINE, {"Run": 2}, dtype=np.uint8)
    assert {p: p.read_bytes() for p in (out, side) if p.exists()} == before  # old files intact, or none
    assert _tree(tmp_path) == sorted(p.name for p in before)  # no temporary file left
