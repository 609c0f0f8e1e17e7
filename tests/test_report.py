"""Self-contained HTML reports (mrflesion.evaluate.report) and their check in headless Chromium."""

from __future__ import annotations

import base64
import gc
import io
import math
import re
import sys
import time
import weakref
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from browser import BrowserUnavailable, check_page
from matplotlib.figure import Figure

from mrflesion.evaluate import lesion_table, threshold_sweep
from mrflesion.evaluate.report import (
    NetworkResult,
    SubjectReport,
    format_value,
    mosaic,
    render_group_report,
    render_subject_report,
    slice_indices,
    timings_table,
    write_group_report,
    write_subject_report,
)

SHAPE = (40, 44, 8)
IMG_RE = re.compile(r"<img\b[^>]*>", re.IGNORECASE)
SRC_RE = re.compile(r'\bsrc="([^"]*)"', re.IGNORECASE)


def _brain(shape: tuple[int, int, int]) -> np.ndarray:
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    return (x**2 / 0.8 + y**2 / 0.9 + z**2 / 1.2) < 0.8


def _lesions(shape: tuple[int, int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    cx, cy = shape[0] // 2, shape[1] // 2
    mask[cx - 3 : cx + 1, cy - 2 : cy + 2, shape[2] // 2 - 1 : shape[2] // 2 + 1] = True
    mask[cx + 5 : cx + 7, cy + 4 : cy + 6, shape[2] // 2] = True
    return mask


def _network(
    name: str,
    outputs: tuple[str, ...],
    refs: dict[str, np.ndarray],
    rng: np.random.Generator,
    history: bool = True,
    ldr_column: str = "ldr",
) -> NetworkResult:
    out = {}
    for key in outputs:
        ref = refs[key]
        scale = {"T1": 40.0, "T2star": 4.0}.get(key, 0.15)
        out[key] = np.where(ref != 0, ref + rng.normal(0, scale, ref.shape), 0.0)
        if key not in ("T1", "T2star"):
            out[key] = np.clip(out[key], 0, 1)
    if "lesion" in out:
        manual = refs["lesion"] > 0
        out["lesion"] = np.clip(0.7 * manual + rng.uniform(0, 0.3, manual.shape) * (refs["T1"] > 0), 0, 1)
        curves = threshold_sweep(out["lesion"], manual, thresholds=np.arange(0.05, 1.0, 0.05))
        curves = curves.rename(columns={"ldr": ldr_column})
        lesions = lesion_table(out["lesion"] >= 0.33, manual, voxel_ml=0.001, min_ml=0.0)
    else:
        curves = pd.DataFrame(columns=["threshold", "dice", "detection_rate"])
        lesions = pd.DataFrame(columns=["lesion", "volume_ml", "detected", "dice"])
    hist = (
        pd.DataFrame(
            {
                "epoch": np.arange(1, 6),
                "train_loss": np.linspace(1, 0.2, 5),
                "val_loss": np.linspace(1.2, 0.4, 5),
                "val_dice_lesion_33": np.linspace(0.1, 0.6, 5),
                "val_mrd_T1": [np.nan] * 5,
                "lr": [1e-3] * 5,
            }
        )
        if history
        else pd.DataFrame()
    )
    metrics = {"dice_lesion_33": 0.61, "ldr_33": 1.0, "mrd_T1": float("nan"), "dice_<GM>_80": 0.7}
    return NetworkResult(
        name=name,
        outputs=out,
        references={k: refs[k] for k in outputs},
        curves=curves,
        lesions=lesions,
        history=hist,
        metrics=metrics,
        threshold=0.33,
        inference_s=1.5,
    )


def make_subject(shape: tuple[int, int, int] = SHAPE, control: bool = False, seed: int = 0) -> SubjectReport:
    rng = np.random.default_rng(seed)
    brain = _brain(shape)
    manual = np.zeros(shape) if control else _lesions(shape).astype(np.float64)
    t1 = np.where(brain, 800 + 300 * rng.random(shape), 0.0)
    refs = {
        "T1": t1,
        "T2star": np.where(brain, 40 + 20 * rng.random(shape), 0.0),
        "NAWM": np.where(brain, rng.random(shape), 0.0),
        "GM": np.where(brain, rng.random(shape), 0.0),
        "lesion": manual,
    }
    mrf = np.where(brain, 100 + 50 * rng.random(shape), 0.0)
    mrf[:, :, 0] = 0.0  # an all-zero slice
    qc = {"MRF": mrf, "T2w": np.where(brain, rng.random(shape), 0), "FLAIR": np.zeros(shape)}
    nets = [
        _network("MSE-5", ("T1", "T2star", "NAWM", "GM", "lesion"), refs, rng),
        _network("lesion <only> & co", ("lesion",), refs, rng, history=False, ldr_column="detection_rate"),
    ]
    return SubjectReport(
        subject="sub-c01" if control else "sub-p01",
        session="ses-01" if not control else None,
        site="siteA",
        group="control" if control else "patient",
        qc=qc,
        underlay=mrf,
        manual=manual,
        networks=nets,
        timings={"denoise": 12.0, "match": 30.5, "register": 8.0, "tissue": 20.0, "inference MSE-5": 1.2},
        provenance={"mrflesion": "0.1.0", "config_hash": "abc123", "commit": "<none>", "date": "2025-01-01"},
        truth_metrics=pd.DataFrame({"network": ["MSE-5"], "mrd_T1_truth": [0.05]}),
    )


def make_group() -> tuple[dict[str, pd.DataFrame], pd.DataFrame, dict[str, str]]:
    rows = []
    rng = np.random.default_rng(1)
    for site, n in (("siteA", 3), ("siteB", 1)):
        for s in range(n):
            for net in ("MSE-5", "MSE-1"):
                for t in np.arange(0.05, 1.0, 0.05):
                    rows.append(
                        {
                            "site": site,
                            "network": net,
                            "subject": f"sub-{site}{s}",
                            "threshold": t,
                            "dice": float(np.clip(0.8 - abs(t - 0.4) + rng.normal(0, 0.05), 0, 1)),
                        }
                    )
    tables = {
        "Per-site summary": pd.DataFrame({"site": ["siteA", "siteB"], "n": [3, 1], "mean_sd": ["0.6 ± 0.1", "0.5"]}),
        "Kruskal–Wallis": pd.DataFrame({"metric": ["dice"], "p": [float("nan")], "reason": ["<2 sites>"]}),
        "Failed subjects": pd.DataFrame(columns=["subject", "reason"]),
    }
    return tables, pd.DataFrame(rows), {"mrflesion": "0.1.0"}


def _imgs(page: str) -> list[str]:
    return IMG_RE.findall(page)


def _assert_self_contained(page: str) -> None:
    low = page.lower()
    assert "http://" not in low and "https://" not in low
    assert 'src="file:' not in low
    assert "<script" not in low
    for tag in _imgs(page):
        src = SRC_RE.search(tag)
        assert src, tag[:100]
        uri = src.group(1)
        assert uri.startswith("data:image/png;base64,"), uri[:60]
        data = base64.b64decode(uri.split(",", 1)[1], validate=True)
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        img = mpimg.imread(io.BytesIO(data), format="png")
        assert img.ndim == 3 and img.shape[0] > 10 and img.shape[1] > 10
    # no other reference to anything outside the page (only in-page anchors)
    for ref in re.findall(r'\b(?:src|href)="([^"]*)"', page):
        assert ref.startswith(("data:", "#")), ref[:60]


def test_render_subject_report_self_contained(tmp_path: Path) -> None:
    out = tmp_path / "reports" / "sub-p01.html"
    assert write_subject_report(make_subject(), out) == out
    assert sorted(p.name for p in out.parent.iterdir()) == ["sub-p01.html"]  # no temp file left
    page = out.read_text(encoding="utf-8")
    _assert_self_contained(page)
    # QC (1) + MSE-5: 5 outputs + overlay + curves + history (8) + lesion-only: 1 + overlay + curves (3)
    assert len(_imgs(page)) == 12
    for metric in ("dice_lesion_33", "ldr_33", "mrd_T1"):
        assert f"<td>{metric}</td>" in page
    assert "dice_&lt;GM&gt;_80" in page and "<GM>" not in page  # escaped text
    assert "lesion &lt;only&gt; &amp; co" in page
    assert '<td>mrd_T1</td><td class="num">n/a</td>' in page  # NaN metric
    assert "no training history" in page
    for step in ("denoise", "match", "register", "tissue", "MSE-5", "lesion &lt;only&gt; &amp; co"):
        assert f"<td>{step}</td>" in page, step
    assert "config_hash" in page and "&lt;none&gt;" in page
    assert "mrd_T1_truth" in page


def test_render_control_and_edge_cases() -> None:
    r = make_subject(control=True)
    r.networks[0].outputs["NAWM"] = np.zeros(SHAPE)  # all-zero output
    r.networks[1].lesions = r.networks[1].lesions.iloc[0:0]
    r.networks[1].curves = r.networks[1].curves.iloc[0:0]
    r.networks[0].history = pd.DataFrame({"epoch": [1, 2], "val_loss": [-0.5, 0.1]})  # not log-able
    r.timings = {}
    r.truth_metrics = None
    r.provenance = {}
    page = render_subject_report(r)
    _assert_self_contained(page)
    assert "no reference lesions" in page
    assert "no threshold sweep" in page
    assert "The manual mask is empty." in page
    assert "<td>session</td><td>n/a</td>" in page


def test_timings_table() -> None:
    r = make_subject()
    tt = timings_table(r.timings, r.networks)
    conv = tt[tt["kind"] == "conventional"]
    assert list(conv["step"]) == ["denoise", "match", "register", "tissue", "total"]
    assert conv["seconds"].iloc[-1] == pytest.approx(70.5)
    inf = tt[tt["kind"] == "inference"]
    assert dict(zip(inf["step"], inf["seconds"], strict=True)) == {"MSE-5": 1.2, "lesion <only> & co": 1.5}

    # keys as written by evaluate_steps: prefixed, with their own total
    timings = {
        "conventional: denoise": 2.0,
        "conventional: match": 3.0,
        "conventional: total": 5.5,
        "inference: MSE-5": 0.5,
    }
    tt = timings_table(timings, r.networks)
    assert list(zip(tt["kind"], tt["step"], tt["seconds"], strict=True)) == [
        ("conventional", "denoise", 2.0),
        ("conventional", "match", 3.0),
        ("conventional", "total", 5.5),
        ("inference", "MSE-5", 0.5),
        ("inference", "lesion <only> & co", 1.5),
    ]


def test_mosaic_orientation_and_slices() -> None:
    vol = np.zeros((5, 3, 10))
    vol[4, 0, :] = 1.0  # x max, y min -> right, bottom
    vol[:, :, 0] = 0.0
    zs = slice_indices(vol, n=4)
    assert len(zs) == 4 and min(zs) > 1 and max(zs) < 9
    m = mosaic(vol, [3, 5], gap=2)
    assert m.shape == (3, 12)
    assert m[2, 4] == 1.0 and np.isnan(m[:, 5:7]).all() and m[2, 11] == 1.0
    assert np.nansum(m) == 2.0
    prefer = np.zeros_like(vol)
    prefer[..., 7] = 1
    assert slice_indices(vol, prefer=prefer) == [7]
    assert slice_indices(np.zeros((4, 4, 3))) == [0, 1, 2]
    assert format_value(math.nan) == "n/a" and format_value(np.True_) == "yes" and format_value(0.123456) == "0.1235"


def test_group_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tables, curves, prov = make_group()
    page = render_group_report(tables, curves, prov)
    _assert_self_contained(page)
    assert len(_imgs(page)) == 2  # one plot per network
    assert "Kruskal–Wallis" in page and "&lt;2 sites&gt;" in page
    assert "siteB (n=1)" not in page  # legends live in the PNGs, not in the text
    out = write_group_report(tables, curves, prov, tmp_path / "group.html")
    assert out.read_text(encoding="utf-8") == page
    assert [p.name for p in tmp_path.iterdir()] == ["group.html"]
    # a failed write leaves the previous report and no temporary file
    import mrflesion.evaluate.report as report

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_group_report({}, None, None, out)
    monkeypatch.undo()
    assert out.read_text(encoding="utf-8") == page
    assert [p.name for p in tmp_path.iterdir()] == ["group.html"]
    with pytest.raises(ValueError, match="lack columns"):
        render_group_report({}, pd.DataFrame({"site": ["a"]}))


def test_figures_are_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    import mrflesion.evaluate.report as report

    made: list[weakref.ref] = []
    original = report._new_figure

    def tracked(width: float, height: float) -> Figure:
        fig = original(width, height)
        made.append(weakref.ref(fig))
        return fig

    monkeypatch.setattr(report, "_new_figure", tracked)
    r = make_subject()
    r.networks = r.networks[1:]
    render_subject_report(r)
    gc.collect()
    assert made and all(ref() is None for ref in made)
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_render_speed_and_size() -> None:
    r = make_subject(shape=(120, 120, 20))
    t0 = time.perf_counter()
    page = render_subject_report(r)
    elapsed = time.perf_counter() - t0
    assert elapsed < 20, elapsed  # ~1-2 s on an idle core; generous for shared CI machines
    assert len(page) < 3_000_000


# --------------------------------------------------------------------------------------------------
# headless Chromium


def _check(html: Path, shot: Path) -> list[str]:
    try:
        return check_page(html, shot)
    except BrowserUnavailable as exc:
        pytest.skip(f"chromium unavailable: {exc}")


@pytest.mark.browser
def test_reports_in_chromium(tmp_path: Path) -> None:
    subject = write_subject_report(make_subject(), tmp_path / "sub-p01.html")
    group = write_group_report(*make_group(), tmp_path / "group.html")
    for page in (subject, group):
        shot = tmp_path / f"{page.stem}.png"
        assert _check(page, shot) == [], page.name
        assert shot.is_file() and shot.stat().st_size > 1000


@pytest.mark.browser
@pytest.mark.parametrize("body,expected", [
    ('<img src="data:image/png;base64,AAAA" alt="bad">', "broken <img>"),
    ('<script>console.error("boom")</script>', "boom"),
])
def test_browser_check_can_fail(tmp_path: Path, body: str, expected: str) -> None:
    page = tmp_path / "bad.html"
    page.write_text(f"<!DOCTYPE html><html><head><title>x</title></head><body><h1>bad</h1>{body}</body></html>")
    problems = _check(page, tmp_path / "bad.png")
    assert any(expected in p for p in problems), problems
