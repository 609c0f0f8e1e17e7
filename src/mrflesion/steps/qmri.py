"""Rule bodies of the quantitative maps: the MRF dictionary (once per sequence timing) and, per
subject, the MRF brain mask, MPPCA denoising and dictionary matching (rule ``qmri``)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from ..io import write_derivative
from . import StepError, jsonable, write_sidecar


def mrf_mask(mrf: str, out_mask: str, record: dict[str, Any] | None = None) -> int:
    """Brain mask of an MRF series (Otsu on the mean image, largest component, holes filled) with its
    sidecar; returns the number of brain voxels."""
    import nibabel as nib
    import numpy as np

    from ..masking import series_brain_mask

    img = nib.load(mrf)
    mask = series_brain_mask(np.asarray(img.dataobj, dtype=np.float32))
    write_derivative(out_mask, mask, img, dtype=np.uint8, sidecar={
        "Type": "Brain", "Description": "Otsu threshold of the mean MRF image, largest component, holes filled",
        "Sources": [str(mrf)], "Voxels": int(mask.sum()), **(record or {}),
    })
    return int(mask.sum())


def qmri(smk: Any) -> None:
    """Rule ``qmri``: the MRF brain mask, MPPCA denoising inside it, then dictionary matching of the
    denoised series."""
    denoise(smk)
    match(smk)


def _timing_record(checked: str) -> dict[str, Any]:
    """How the subject's MRF series was interpreted (from its input check): the resolved timing, the
    inversion model, the sidecars read and every value taken from the config; for the outputs' sidecars."""

    with open(checked) as fh:
        info = json.load(fh)
    if "timing" not in info:  # a check summary of an older version: check again
        raise StepError(f"input check record without the MRF timing, rerun the input check: {checked}")
    return {"MRFTiming": info["timing"], "TimingKey": info["timing_key"],
            "InversionEfficiency": info["inversion_efficiency"], "MRFSidecars": info["sidecars"],
            "TimingFromConfig": info["timing_from_config"]}


def denoise(smk: Any) -> None:
    """The MRF brain mask, then MPPCA denoising inside it (series and noise map); part of ``qmri``."""
    from ..denoise import denoise_file

    cfg = smk.params.denoise  # what changes results; the device: snakemake.config (reruns nothing)
    t0 = time.perf_counter()
    voxels = mrf_mask(smk.input.mrf, smk.output.mask, _timing_record(smk.input.checked))
    print(f"brain mask: {voxels} voxels")
    stats = denoise_file(
        smk.input.mrf, smk.output.denoised, smk.output.sigma, mask_path=smk.output.mask,
        patch_radius=int(cfg["patch_radius"]), device=str(smk.config["denoise"]["device"]),
    )
    common = {"Sources": [str(smk.input.mrf), str(smk.output.mask)], "SoftwareStep": "MPPCA", **jsonable(stats),
              **_timing_record(smk.input.checked)}
    write_sidecar(smk.output.denoised, {"Description": "MPPCA-denoised MRF-EPI series", **common})
    write_sidecar(smk.output.sigma, {"Description": "MPPCA noise standard deviation", "Units": "arbitrary", **common})
    print(f"denoise: {time.perf_counter() - t0:.1f} s")


def dictionary(smk: Any) -> None:
    from ..mrf.dictionary import DictionaryGrid, build_dictionary
    from ..mrf.sequence import Protocol

    cfg = smk.params.cfg
    protocol = Protocol.from_sidecar(smk.params.sidecar)
    grid = DictionaryGrid.from_config(cfg["grid"])
    t0 = time.perf_counter()
    d = build_dictionary(protocol, grid, rank_energy=float(cfg["rank_energy"]),
                         n_clusters=int(cfg["n_clusters"]), progress=True)
    d.save(smk.output[0])
    print(f"dictionary {smk.output[0]}: {protocol.n_slices} slice positions in {time.perf_counter() - t0:.1f} s")


def match(smk: Any) -> None:
    """Dictionary matching of the denoised series inside the brain mask; part of ``qmri``."""
    import tempfile

    from ..mrf.matching import match_file

    cfg = smk.params.matching  # what changes results; device and block size: snakemake.config (rerun nothing)
    run = smk.config["matching"]
    t0 = time.perf_counter()
    record = _timing_record(smk.input.checked)
    f = {"mrf": smk.output.denoised, "mask": smk.output.mask, "sidecar": smk.input.sidecar,
         "dictionary": smk.input.dictionary}
    out = {"T1": smk.output.T1, "T2star": smk.output.T2star, "B1": smk.output.B1, "M0": smk.output.M0,
           "quality": smk.output.quality}
    # the series is matched with the timing its input check resolved (sidecar inheritance, values stated
    # in the config, inversion model), which is the timing the dictionary was built for
    with tempfile.TemporaryDirectory(prefix="mrflesion-timing-") as tmp:
        resolved = os.path.join(tmp, "timing.json")
        with open(resolved, "w") as fh:
            json.dump(record["MRFTiming"], fh)
        stats = match_file(
            f["mrf"], resolved, f["dictionary"], out, mask_path=f["mask"],
            mode=str(cfg["mode"]), device=str(run["device"]), block_voxels=int(run["block_voxels"]),
            threads=int(smk.threads), progress=True, refine=bool(cfg.get("refine", True)),
        )
    sources = [f["mrf"], *record["MRFSidecars"], f["mask"]]
    units = {"T1": "ms", "T2star": "ms", "B1": "1 (scale of the nominal flip angle)",
             "M0": "arbitrary", "quality": "1 (cosine of the matched atom and the signal)"}
    for key, path in out.items():
        write_sidecar(path, {
            "Description": f"MRF dictionary matching: {key}", "Units": units[key], "Sources": sources,
            "Dictionary": f["dictionary"], **jsonable(stats), **record,
        })
    print(f"match: {time.perf_counter() - t0:.1f} s")
