"""Self-contained HTML reports: one per subject and one for the cohort (docs/evaluation.md).

Every report is a single HTML file: the figures are PNGs rendered with matplotlib's Agg canvas
(``matplotlib.figure.Figure``, never pyplot, so no figure is left registered anywhere) and embedded as
``data:image/png;base64`` URIs, the CSS is inline, there is no script and no external URL. Files are
written atomically (a temporary file in the same folder, then ``os.replace``).

Conventions of the image mosaics:

- Volumes are 3D arrays (x, y, z) with z the axial slice index; a 4D input shows its first volume,
  a 2D input is one slice.
- An axial slice ``a[:, :, k]`` is displayed as ``np.rot90(a[:, :, k])``: the first array axis runs
  horizontally and the second one upwards (anterior up for RAS-like arrays).
- A mosaic is one row of up to ``N_SLICES`` slices, evenly spaced over the slices that hold data
  (non-zero voxels), edge slices excluded. Lesion overlays show slices with manual lesions (or, for a
  subject without lesions, slices with predicted lesions) when there are any.
- Grey-level and quantitative windows are robust: the 1st–99th percentiles of the finite non-zero
  voxels. Differences (network − reference) use a diverging colour map, symmetric around zero at the
  99th percentile of |difference| (in ms for T1/T2*; capped at 1 for probabilities).
- The lesion mask is ``probability >= threshold`` (the rule of :func:`mrflesion.evaluate.binarise`).
- Outlines: the manual (reference) mask in cyan, the binarised prediction in magenta.

The subject report opens with the lead network (the recommended one, the first of the config's
``networks``): its lesion probability over FLAIR (in T2w space) and over the mean MRF image with both
outlines, and its per-lesion detection table; then the input QC and every network in detail. The group
report opens with per-site plots of the lesion metrics (one point per subject) and a one-row-per-subject
overview; the long tables follow.

Tables are plain HTML tables with escaped text; NaN / None show as "n/a", booleans as yes / no and
floats with 4 significant digits.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
from PIL import Image

DPI = 80
N_SLICES = 6
WINDOW_PERCENTILES = (1.0, 99.0)
OUTPUT_ORDER = ("T1", "T2star", "NAWM", "GM", "lesion")
QUANTITATIVE = {"T1": "ms", "T2star": "ms"}
REFERENCE_KIND = {
    "T1": "dictionary matching",
    "T2star": "dictionary matching",
    "NAWM": "SPM-style segmentation",
    "GM": "SPM-style segmentation",
    "lesion": "manual mask",
}
QC_ORDER = ("MRF", "T2w", "FLAIR")
OVERLAY_MIN_PROB = 0.1  # probabilities below this are transparent in the overlay
MANUAL_COLOUR = "cyan"  # outline of the manual (reference) lesion mask
PRED_COLOUR = "#ff30e0"  # outline of the binarised prediction (magenta: apart from the red-yellow overlay)
BASELINE = "baseline"  # the classical (no deep learning) lesion method, shown beside the networks
#: Metrics of the group report's per-site plots: (metric, panel title, y range or None).
SITE_PLOT_METRICS = (
    ("lesion_dice", "lesion Dice", (0.0, 1.0)),
    ("lesion_ldr", "lesion detection rate (LDR)", (0.0, 1.0)),
    ("lw_f1", "lesion-wise F1", (0.0, 1.0)),
    ("T1_mrd", "map accuracy: T1 mean rel. deviation\n(lower is better)", None),
)
#: Column headers of the group report's subject overview.
OVERVIEW_HEADERS = {"lesion_ml": "lesion load (ml)", "false_positives": "false positives"}
REFERENCE_LABEL = {"truth": "the phantom's ground truth", "pipeline": "the pipeline's references (manual mask)"}

_CSS = """
body { font-family: "DejaVu Sans", Arial, sans-serif; margin: 1.5em auto; max-width: 1250px; color: #222;
       padding: 0 1em; }
h1 { border-bottom: 2px solid #446; padding-bottom: .2em; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #99a; }
h3 { margin-top: 1.2em; color: #335; }
table { border-collapse: collapse; margin: .6em 0 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbc; padding: 2px 8px; text-align: left; vertical-align: top; }
th { background: #eef; }
tr:nth-child(even) td { background: #f8f8fb; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; height: auto; display: block; margin: .3em 0 .8em 0; }
.note { color: #666; font-style: italic; }
nav ul { columns: 3; font-size: .9em; }
footer { margin-top: 2em; color: #888; font-size: .8em; }
"""


@dataclass
class NetworkResult:
    """Outputs and evaluation of one network for one subject (arrays in T2w space, x, y, z)."""

    name: str
    outputs: dict[str, np.ndarray]
    references: dict[str, np.ndarray]
    curves: pd.DataFrame
    lesions: pd.DataFrame
    history: pd.DataFrame
    metrics: dict[str, float]
    threshold: float
    inference_s: float
    description: str = ""
    val_threshold: float | None = None  # lesion threshold chosen on the validation subjects, when known
    val_min_lesion_ml: float = 0.0  # with it: the minimum lesion size chosen on the validation subjects


@dataclass
class SubjectReport:
    """Everything shown in one subject's report."""

    subject: str
    session: str | None
    site: str
    group: str
    qc: dict[str, np.ndarray]
    underlay: np.ndarray
    manual: np.ndarray | None  # the manual lesion mask (T2w space); None: the subject has none (apply mode)
    networks: list[NetworkResult]
    timings: dict[str, float]
    provenance: dict[str, str]
    truth_metrics: pd.DataFrame | None = None
    title: str = "mrflesion subject report"
    #: the recommended network, shown first (None: the first network with a lesion output)
    lead: str | None = None
    #: FLAIR resampled into T2w space (None: the lead section shows the MRF underlay only, and says so)
    flair: np.ndarray | None = None
    #: voxel volume in ml (None: the lead's detection table is the network's own, at its 33 % threshold)
    voxel_ml: float | None = None
    #: per-lesion quantitative table (mrflesion.evaluate.lesion_quant; None: section left out) and its caption
    lesion_quant: pd.DataFrame | None = None
    lesion_quant_caption: str = ""
    #: model card of every applied network (network -> card; None: section left out)
    model_cards: Mapping[str, Mapping[str, Any]] | None = None


# --------------------------------------------------------------------------------------------------
# small helpers


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _anchor(text: str) -> str:
    return "s-" + (re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x")


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def _is_missing(value: object) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, float | np.floating):
        return not math.isfinite(float(value))
    return False


def format_value(value: object) -> str:
    """Text of a table cell: n/a for NaN/None/inf, yes/no for booleans, 4 significant digits for floats."""
    if _is_missing(value):
        return "n/a"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return f"{float(value):.4g}"
    return str(value)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)


def html_table(df: pd.DataFrame, caption: str | None = None) -> str:
    """A DataFrame as a plain HTML table (escaped text; a named index becomes columns, an unnamed
    one, e.g. the row numbers left by filtering, is dropped)."""
    if isinstance(df.index, pd.MultiIndex) or df.index.name is not None:
        df = df.reset_index()
    out = ["<table>"]
    if caption:
        out.append(f"<caption>{_esc(caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{_esc(c)}</th>" for c in df.columns) + "</tr></thead><tbody>")
    for row in df.itertuples(index=False, name=None):
        cells = []
        for v in row:
            cls = ' class="num"' if _is_number(v) else ""
            cells.append(f"<td{cls}>{_esc(format_value(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _kv_table(items: Iterable[tuple[object, object]], headers: tuple[str, str]) -> str:
    rows = list(items)
    if not rows:
        return _note("none recorded")
    return html_table(pd.DataFrame(rows, columns=list(headers)))


def _write_atomic(path: Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _page(title: str, body: Sequence[str]) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n<footer>Generated by mrflesion; self-contained (no external resources).</footer>\n</body>\n</html>\n"
    )


# --------------------------------------------------------------------------------------------------
# figures


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def _panels(n: int, title: str) -> tuple[Figure, list]:
    """A figure with n plot panels side by side (sizes in inches), each with room for a legend on its right."""
    ax_w, ax_h, left, legend_w, bottom, top = 3.4, 2.2, 0.7, 1.8, 0.5, 0.35
    panel_w = left + ax_w + legend_w
    width, height = n * panel_w, bottom + ax_h + top
    fig = _new_figure(width, height)
    axes = [
        fig.add_axes(((i * panel_w + left) / width, bottom / height, ax_w / width, ax_h / height)) for i in range(n)
    ]
    fig.text(0.5, 1 - 0.06 / height, title, ha="center", va="top", fontsize=9)
    return fig, axes


def _style(ax, xlabel: str, ylabel: str, log: bool = False) -> None:
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7 if len(ax.get_lines()) < 8 else 6, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)


def _encode(fig: Figure) -> str:
    """PNG data URI of a figure (drawn by Agg, then stored as a 256-colour palette PNG, about 4x smaller
    than matplotlib's RGBA output). The figure was made without pyplot, so nothing holds it once the
    caller drops it: there is no figure manager to close (and ``fig.clear()`` would only cost time)."""
    fig.canvas.draw()
    rgb = np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    img = Image.fromarray(rgb).quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    palette = np.asarray(img.getpalette() or [], dtype=np.int64)
    palette = palette[: palette.size - palette.size % 3].reshape(-1, 3)
    palette[(palette >= 248).all(axis=1)] = 255  # the octree turns pure white into (252, 252, 252)
    img.putpalette(palette.ravel().tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str, ident: str | None = None) -> str:
    attr = f' id="{_esc(ident)}"' if ident else ""
    return f'<img{attr} src="{uri}" alt="{_esc(alt)}">'


def _as3d(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.float32)
    if a.ndim == 2:
        a = a[:, :, None]
    while a.ndim > 3:
        a = a[..., 0]
    if a.ndim != 3:
        raise ValueError(f"expected a 2D-4D image, got shape {a.shape}")
    return a.astype(np.float64, copy=False)


def robust_window(*volumes: np.ndarray, percentiles: tuple[float, float] = WINDOW_PERCENTILES) -> tuple[float, float]:
    """(vmin, vmax) at the given percentiles of the finite non-zero voxels; (0, 1) when there are none."""
    vals = [v[np.isfinite(v) & (v != 0)] for v in (np.asarray(x, dtype=np.float64) for x in volumes)]
    data = np.concatenate(vals) if vals else np.empty(0)
    if data.size == 0:
        return 0.0, 1.0
    lo, hi = (float(x) for x in np.percentile(data, percentiles))
    if not hi > lo:
        hi = lo + (abs(lo) if lo != 0 else 1.0)
    return lo, hi


def _spread(candidates: np.ndarray, n: int) -> list[int]:
    """Up to n of the (sorted) candidate slices, evenly spaced, edges excluded when there are more."""
    candidates = np.asarray(candidates, dtype=int)
    if candidates.size <= n:
        return [int(z) for z in candidates]
    pos = np.linspace(0, candidates.size - 1, n + 2)[1:-1]
    return sorted({int(candidates[int(round(p))]) for p in pos})


def slice_indices(volume: np.ndarray, n: int = N_SLICES, prefer: np.ndarray | None = None) -> list[int]:
    """Axial slices to show: evenly spaced over the slices of ``prefer`` (a mask) that hold voxels,
    else over the range of slices of ``volume`` with non-zero data, else over all slices."""
    vol = _as3d(volume)
    if prefer is not None:
        p = _as3d(prefer)
        if p.shape[2] == vol.shape[2]:
            zs = np.flatnonzero((np.nan_to_num(p) != 0).any(axis=(0, 1)))
            if zs.size:
                return _spread(zs, n)
    data = np.isfinite(vol) & (vol != 0)
    zs = np.flatnonzero(data.any(axis=(0, 1)))
    lo, hi = (int(zs[0]), int(zs[-1])) if zs.size else (0, vol.shape[2] - 1)
    return _spread(np.arange(lo, hi + 1), n)


def mosaic(volume: np.ndarray, zs: Sequence[int], gap: int = 2) -> np.ndarray:
    """One row of display slices ``np.rot90(volume[:, :, z])`` separated by ``gap`` NaN columns."""
    vol = _as3d(volume)
    pieces: list[np.ndarray] = []
    for i, z in enumerate(zs):
        if i and gap:
            pieces.append(np.full((vol.shape[1], gap), np.nan))
        pieces.append(np.rot90(vol[:, :, z]))
    return np.concatenate(pieces, axis=1) if pieces else np.full((1, 1), np.nan)


@dataclass
class _Row:
    image: np.ndarray
    title: str
    cmap: str = "gray"
    vmin: float = 0.0
    vmax: float = 1.0
    cbar: str | None = None  # colour bar label (None: no colour bar)
    overlay: np.ndarray | None = None  # masked array drawn over the image
    overlay_cmap: object = "autumn"
    overlay_alpha: float = 0.65
    overlay_cbar: str | None = None
    contour: np.ndarray | None = None  # outline drawn in MANUAL_COLOUR
    contours: tuple[tuple[np.ndarray, str], ...] = ()  # further outlines (mask, colour)


def _grey_row(
    volume: np.ndarray,
    zs: Sequence[int],
    title: str,
    window: tuple[float, float] | None = None,
    **overlay: Any,
) -> _Row:
    """The mosaic row of ``volume`` at slices ``zs`` in grey, in ``window`` (default: its
    :func:`robust_window`); ``overlay``: further :class:`_Row` fields (overlay, outlines)."""
    lo, hi = robust_window(volume) if window is None else window
    return _Row(mosaic(volume, zs), title, vmin=lo, vmax=hi, **overlay)


def _mosaic_figure(
    rows: Sequence[_Row], legend: Sequence[tuple[str, str]] = (), max_w: float = 8.7, max_h: float = 2.6
) -> str:
    """PNG data URI of stacked mosaic rows (manual layout: faster and stabler than a layout engine).

    Each row is at most ``max_w`` inches wide and ``max_h`` high (aspect kept); the figure is as wide
    as its widest row plus room for the colour bars. ``legend``: (label, colour) of the outlines, one
    line under the rows.
    """
    title_h, cbar_w = 0.3, 1.1
    legend_h = 0.3 if legend else 0.0
    sizes = []
    for row in rows:
        nrow, ncol = row.image.shape
        aspect = max(ncol, 1) / max(nrow, 1)
        w = min(max_w, max_h * aspect)
        sizes.append((w, w / aspect))
    mosaic_w = max(w for w, _ in sizes)
    width = mosaic_w + cbar_w + 0.1
    total = sum(h for _, h in sizes) + title_h * len(rows) + 0.1 + legend_h
    fig = _new_figure(width, total)
    top = total - 0.05
    for row, (w, h) in zip(rows, sizes, strict=True):
        bottom = top - title_h - h
        ax = fig.add_axes((0.05 / width, bottom / total, w / width, h / total))
        ax.set_axis_off()
        # fig.text rather than ax.set_title: a title makes matplotlib lay out the (hidden) ticks.
        fig.text(0.05 / width, (bottom + h + 0.06) / total, row.title, fontsize=9, ha="left", va="bottom")
        im = ax.imshow(row.image, cmap=row.cmap, vmin=row.vmin, vmax=row.vmax, interpolation="nearest")
        mappable = im
        if row.overlay is not None:
            mappable = ax.imshow(
                row.overlay,
                cmap=row.overlay_cmap,
                vmin=0.0,
                vmax=1.0,
                alpha=row.overlay_alpha,
                interpolation="nearest",
            )
        # the manual outline is drawn wider and first, so that it shows around a coinciding prediction
        outlines = [(row.contour, MANUAL_COLOUR, 1.6)] if row.contour is not None else []
        outlines += [(mask, colour, 0.9) for mask, colour in row.contours]
        for mask, colour, lw in outlines:
            if np.any(np.nan_to_num(mask) > 0.5):
                ax.contour(np.nan_to_num(mask), levels=[0.5], colors=colour, linewidths=lw)
        label = row.overlay_cbar if row.overlay is not None else row.cbar
        if label is not None:
            cax = fig.add_axes(((0.05 + w + 0.12) / width, (bottom + 0.1 * h) / total, 0.12 / width, 0.8 * h / total))
            cb = fig.colorbar(mappable, cax=cax)
            cb.set_label(label, fontsize=7)
            cb.ax.tick_params(labelsize=7)
            cb.locator = MaxNLocator(5)
        top = bottom
    if legend:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=c, linewidth=2, label=label) for label, c in legend]
        fig.legend(
            handles=handles,
            loc="lower left",
            bbox_to_anchor=(0.05 / width, 0.0),
            ncol=len(handles),
            fontsize=8,
            frameon=False,
            handlelength=1.5,
        )
    return _encode(fig)


def _qc_rank(name: str) -> int:
    """Order of the QC rows: MRF, T2w, FLAIR (matched as name prefixes, e.g. "MRF (measurement 1)"), others."""
    for i, prefix in enumerate(QC_ORDER):
        if name.lower().startswith(prefix.lower()):
            return i
    return len(QC_ORDER)


def _qc_section(qc: Mapping[str, np.ndarray]) -> str:
    if not qc:
        return _note("no QC images")
    names = sorted(qc, key=_qc_rank)
    rows = []
    for name in names:
        vol = _as3d(qc[name])
        zs = slice_indices(vol)
        lo, hi = robust_window(vol)
        caption = f"{name}: slices {', '.join(map(str, zs))} (window {lo:.4g}–{hi:.4g})"
        rows.append(_grey_row(vol, zs, caption, (lo, hi)))
    return _img(_mosaic_figure(rows), "QC mosaics of the input images")


def _output_figure(name: str, out: np.ndarray, ref: np.ndarray | None) -> str:
    out = _as3d(out)
    ref = _as3d(ref) if ref is not None else None
    if ref is not None and ref.shape != out.shape:
        ref = None
    unit = QUANTITATIVE.get(name)
    both = out if ref is None else np.where(np.nan_to_num(out) != 0, out, ref)
    prefer = ref if name == "lesion" and ref is not None and np.any(np.nan_to_num(ref) > 0) else None
    zs = slice_indices(both, prefer=prefer)
    where = ", ".join(map(str, zs))
    if unit:
        lo, hi = robust_window(out, *(() if ref is None else (ref,)))
        cmap, cbar = "magma", f"{name} ({unit})"
    else:
        lo, hi, cmap, cbar = 0.0, 1.0, "viridis", "probability"
    rows = []
    if ref is not None:
        rows.append(
            _Row(
                mosaic(ref, zs),
                f"reference {name} ({REFERENCE_KIND.get(name, 'reference')}), slices {where}",
                cmap,
                lo,
                hi,
                cbar,
            )
        )
    rows.append(_Row(mosaic(out, zs), f"network {name}", cmap, lo, hi, cbar))
    if ref is not None:
        diff = np.nan_to_num(out) - np.nan_to_num(ref)
        support = (np.nan_to_num(out) != 0) | (np.nan_to_num(ref) != 0)
        d = np.abs(diff[support])
        m = float(np.percentile(d, 99)) if d.size else 0.0
        if unit is None:
            m = min(m, 1.0)
        m = m if m > 0 else 1.0
        label = f"Δ {unit}" if unit else "Δ probability"
        rows.append(_Row(mosaic(diff, zs), f"network − reference ({unit or 'probability'})", "RdBu_r", -m, m, label))
    return _img(_mosaic_figure(rows), f"{name}: reference, network output and difference")


def _overlay_figure(r: SubjectReport, prob: np.ndarray, threshold: float) -> str:
    prob = np.nan_to_num(_as3d(prob))
    under = _as3d(r.underlay)
    if prob.shape != under.shape:
        return _note(f"lesion overlay skipped: probability map {prob.shape} and underlay {under.shape} differ")
    manual = np.nan_to_num(_as3d(r.manual)) if r.manual is not None else np.zeros(prob.shape)
    if manual.shape != prob.shape:
        manual = np.zeros(prob.shape)
    pred = prob >= threshold
    prefer = manual if np.any(manual > 0) else pred.astype(np.float64)
    zs = slice_indices(under, prefer=prefer)
    lo, hi = robust_window(under)
    base = mosaic(under, zs)
    prob_m = mosaic(prob, zs)
    prob_m = np.ma.masked_where(~(prob_m >= OVERLAY_MIN_PROB), prob_m)
    pred_m = mosaic(pred.astype(np.float64), zs)
    pred_m = np.ma.masked_where(~(pred_m > 0.5), pred_m)
    man_m = mosaic(manual, zs)
    where = ", ".join(map(str, zs))
    outline = ("no manual mask" if r.manual is None
               else "cyan outline = manual mask" if np.any(manual > 0) else "manual mask empty")
    rows = [
        _Row(
            base,
            f"lesion probability on MRF, slices {where} ({outline})",
            vmin=lo,
            vmax=hi,
            overlay=prob_m,
            overlay_cmap="autumn",
            overlay_alpha=0.65,
            overlay_cbar="lesion probability",
            contour=man_m,
        ),
        _Row(
            base,
            f"binarised at {threshold:g} (red, {int(pred.sum())} voxels; {outline})",
            vmin=lo,
            vmax=hi,
            overlay=pred_m,
            overlay_cmap=ListedColormap(["red"]),
            overlay_alpha=0.6,
            contour=man_m,
        ),
    ]
    n_manual = int(np.count_nonzero(manual > 0))
    caption = (
        f"Axial slices {where}. Top: lesion probability (≥ {OVERLAY_MIN_PROB:g} shown); bottom: mask at "
        f"threshold {threshold:g} ({int(pred.sum())} voxels). "
        + ("No manual mask for this subject." if r.manual is None
           else f"Cyan outline: manual mask ({n_manual} voxels)." if n_manual else "The manual mask is empty.")
    )
    return _img(_mosaic_figure(rows), "lesion probability overlay and binarised mask") + f"<p>{_esc(caption)}</p>"


def _ldr_column(df: pd.DataFrame) -> str | None:
    for c in ("detection_rate", "ldr"):
        if c in df.columns:
            return c
    return None


def _curves_figure(curves: pd.DataFrame, threshold: float, name: str) -> str:
    if curves is None or curves.empty or "threshold" not in curves.columns:
        return _note("no threshold sweep")
    df = curves.sort_values("threshold")
    t = df["threshold"].to_numpy(dtype=np.float64)
    mark = threshold * 100.0 if np.nanmax(t) > 1.0 >= threshold else threshold
    fig, (ax,) = _panels(1, f"{name}: lesion Dice / detection rate vs threshold")
    if "dice" in df.columns:
        ax.plot(t, df["dice"].to_numpy(dtype=np.float64), label="Dice", color="tab:blue")
    col = _ldr_column(df)
    if col is not None and df[col].notna().any():
        ax.plot(t, df[col].to_numpy(dtype=np.float64), label="detection rate", color="tab:orange")
    ax.axvline(mark, color="k", linestyle="--", linewidth=1, label=f"threshold {mark:g}")
    ax.set_ylim(-0.02, 1.02)
    _style(ax, "threshold", "Dice / detection rate")
    return _img(_encode(fig), f"{name}: Dice and detection rate vs threshold")


_HISTORY_SKIP = {"epoch", "lr", "seconds", "time", "wall_s"}


def _numeric_columns(df: pd.DataFrame, cols: Iterable[str]) -> list[str]:
    out = []
    for c in cols:
        v = pd.to_numeric(df[c], errors="coerce")
        if v.notna().any():
            out.append(c)
    return out


def _history_figure(history: pd.DataFrame, name: str) -> str:
    if history is None or history.empty or "epoch" not in history.columns:
        return _note("no training history")
    df = history.sort_values("epoch")
    epoch = pd.to_numeric(df["epoch"], errors="coerce").to_numpy(dtype=np.float64)
    cols = _numeric_columns(df, [c for c in df.columns if str(c) not in _HISTORY_SKIP])
    losses = [c for c in cols if "loss" in str(c).lower()]
    others = [c for c in cols if c not in losses]
    panels = [p for p in ((losses, "loss"), (others, "metric")) if p[0]]
    if not panels:
        return _note("training history has no numeric loss or metric columns")
    fig, axes = _panels(len(panels), f"{name}: training history")
    for ax, (group, ylabel) in zip(axes, panels, strict=True):
        positive = ylabel == "loss"  # log scale for losses only, when they are all positive
        for c in group:
            v = pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=np.float64)
            ax.plot(epoch, v, marker="." if len(v) < 30 else None, label=str(c), linewidth=1)
            finite = v[np.isfinite(v)]
            positive &= bool(finite.size == 0 or (finite > 0).all())
        _style(ax, "epoch", ylabel + (" (log scale)" if positive else ""), log=positive)
    return _img(_encode(fig), f"{name}: training curves")


# --------------------------------------------------------------------------------------------------
# subject report


def lead_network(r: SubjectReport) -> tuple[NetworkResult | None, str]:
    """The network of the report's lead section and a note when it is not the recommended one.

    The recommended network is ``r.lead``; when that is unset, absent or has no lesion output, the
    first network with a lesion output stands in (and the note says so).
    """
    with_lesion = [n for n in r.networks if "lesion" in n.outputs]
    named = next((n for n in r.networks if n.name == r.lead), None) if r.lead is not None else None
    if named is not None and "lesion" in named.outputs:
        return named, ""
    if r.lead is None:
        why = ""
    elif named is None:
        why = f"the recommended network {r.lead} has no results for this subject"
    else:
        why = f"the recommended network {r.lead} has no lesion output"
    if not with_lesion:
        return None, (why + "; " if why else "") + "no network has a lesion output"
    return with_lesion[0], (f"{why}: showing {with_lesion[0].name} instead" if why else "")


def _lead_threshold(net: NetworkResult) -> tuple[float, str]:
    """The lead's threshold for its binarised prediction, and how it was chosen (for the captions)."""
    vt = net.val_threshold
    if vt is not None and not _is_missing(vt) and 0.0 < float(vt) <= 1.0:
        size = f", lesions of at least {net.val_min_lesion_ml:g} ml" if net.val_min_lesion_ml > 0 else ""
        return float(vt), f"its validation-chosen threshold {float(vt):.3g}{size}"
    return float(net.threshold), f"the default threshold {float(net.threshold):.3g} (no validation threshold known)"


def _lead_detection(
    r: SubjectReport, net: NetworkResult, manual: np.ndarray, pred: np.ndarray, threshold: float
) -> tuple[pd.DataFrame, float, str]:
    """(per reference lesion table, false-positive component count, caption) at ``threshold``.

    With the voxel volume known, the table is computed here at the lead's threshold (rule A:
    26-connected components of at least 0.01 ml, a lesion is detected when a predicted component
    overlaps it); otherwise the network's own table and ``lw_fp`` metric (at ``net.threshold``) are used.
    """
    cols = ["lesion", "volume (ml)", "detected", "Dice"]
    if r.voxel_ml is not None and not _is_missing(r.voxel_ml) and r.voxel_ml > 0:
        from .lesionwise import lesion_table, lesionwise_metrics

        table = lesion_table(pred, manual, float(r.voxel_ml))
        fp = float(lesionwise_metrics(pred, manual, float(r.voxel_ml))["fp"])
        df = pd.DataFrame(
            {
                "lesion": table["lesion_id"],
                "volume (ml)": table["volume_ml"],
                "size group": table["group"],
                "detected": table["detected"].astype(bool),
                "Dice": table["dice"],
            }
        )
        how = (
            f"at threshold {threshold:.3g} (rule A: 26-connected components of at least 0.01 ml; a reference "
            "lesion is detected when a predicted component overlaps it)"
        )
        return df, fp, how
    les = net.lesions if net.lesions is not None else pd.DataFrame()
    les = les.rename(columns={"lesion_id": "lesion", "volume_ml": "volume (ml)", "dice": "Dice"})
    df = les[[c for c in cols if c in les.columns]].reset_index(drop=True)
    fp = float(net.metrics.get("lw_fp", math.nan))
    how = f"as evaluated at the network's threshold {float(net.threshold):.3g} (voxel size unknown here)"
    return df, fp, how


#: Lesion metrics of the lead's summary line: (metric, label).
LEAD_METRICS = (
    ("lesion_dice", "lesion Dice"),
    ("lesion_ldr", "lesion detection rate"),
    ("lw_f1", "lesion-wise F1"),
    ("lw_fp", "false-positive components"),
    ("lesion_ref_ml", "manual lesion volume (ml)"),
    ("lesion_pred_ml", "predicted lesion volume (ml)"),
)


def _lead_metrics_table(net: NetworkResult) -> str:
    m = net.metrics
    vt = any(f"{k}_vt" in m for k, _ in LEAD_METRICS)
    rows = []
    for key, label in LEAD_METRICS:
        if key not in m and f"{key}_vt" not in m:
            continue
        row = [label, m.get(key, math.nan)]
        if vt:
            row.append(m.get(f"{key}_vt", math.nan))
        rows.append(row)
    if not rows:
        return ""
    cols = ["metric", f"at {float(net.threshold):.3g}"] + (["at the validation threshold"] if vt else [])
    return html_table(pd.DataFrame(rows, columns=cols), caption="against the manual mask")


def _lead_section(r: SubjectReport) -> str:
    """The report's first section: the lead network's lesion probability over FLAIR and MRF with the
    manual and predicted outlines, and its per-lesion detection table."""
    net, note = lead_network(r)
    parts = [f'<h2 id="lesions">Lesions ({_esc(net.name if net else "no lesion network")})</h2>']
    if note:
        parts.append(_note(note))
    if net is None:
        return "\n".join(parts)
    threshold, how = _lead_threshold(net)
    prob = np.nan_to_num(_as3d(net.outputs["lesion"]))
    under = _as3d(r.underlay)
    manual = np.nan_to_num(_as3d(r.manual)) if r.manual is not None else np.zeros(prob.shape)
    if manual.shape != prob.shape:
        manual = np.zeros(prob.shape)
    manual_bin = manual >= 0.5
    pred = prob >= threshold
    if threshold == net.val_threshold and net.val_min_lesion_ml > 0 and r.voxel_ml:
        from .lesionwise import lesion_mask

        pred = lesion_mask(prob, threshold, float(r.voxel_ml), net.val_min_lesion_ml)
    underlays: list[tuple[str, np.ndarray]] = []
    if r.flair is not None and _as3d(r.flair).shape == prob.shape:
        underlays.append(("FLAIR (T2w space)", _as3d(r.flair)))
    else:
        why = "not available" if r.flair is None else f"of shape {_as3d(r.flair).shape}, not {prob.shape}"
        parts.append(_note(f"FLAIR in T2w space {why}: the probability is shown over the mean MRF image only."))
    if under.shape == prob.shape:
        underlays.append(("mean MRF", under))
    if not underlays:
        parts.append(_note(f"no underlay of the probability map's shape {prob.shape}"))
    else:
        prefer = manual_bin if manual_bin.any() else pred
        zs = slice_indices(underlays[-1][1], prefer=prefer.astype(np.float64))
        where = ", ".join(map(str, zs))
        prob_m = mosaic(prob, zs)
        prob_m = np.ma.masked_where(~(prob_m >= OVERLAY_MIN_PROB), prob_m)
        man_m = mosaic(manual_bin.astype(np.float64), zs)
        pred_m = mosaic(pred.astype(np.float64), zs)
        rows = []
        for label, vol in underlays:
            rows.append(
                _grey_row(
                    vol,
                    zs,
                    f"{net.name}: lesion probability over {label}, slices {where}",
                    overlay=prob_m,
                    overlay_cmap="autumn",
                    overlay_alpha=0.55,
                    overlay_cbar="lesion probability",
                    contour=man_m,
                    contours=((pred_m, PRED_COLOUR),),
                )
            )
        legend = [
            ("no manual mask" if r.manual is None else "manual mask" if manual_bin.any() else "manual mask (empty)",
             MANUAL_COLOUR),
            (f"{net.name} at {threshold:.3g}", PRED_COLOUR),
        ]
        fig = _mosaic_figure(rows, legend, max_w=13.0, max_h=3.0)
        parts.append(_img(fig, f"{net.name}: lesion probability with outlines", ident="lead-lesions"))
        parts.append(
            f"<p>{_esc(net.name)} lesion probability (≥ {OVERLAY_MIN_PROB:g} shown, red to yellow) over "
            f"{_esc(' and '.join(label for label, _ in underlays))}, axial slices {_esc(where)}. Outlines: "
            + ("" if r.manual is None else f"manual mask (cyan, {int(manual_bin.sum())} voxels) and ")
            + f"the prediction binarised at {_esc(how)} (magenta, {int(pred.sum())} voxels).</p>"
        )
    parts.append("<h3>Lesion detection</h3>")
    if r.manual is None:
        from .metrics import label_components

        n_pred = int(label_components(pred)[1]) if pred.any() else 0
        parts.append(_note(
            f"No manual lesion mask for this subject (apply mode): detection and the lesion metrics are not "
            f"assessed. {net.name} finds {n_pred} lesion component{'s' if n_pred != 1 else ''} at {how}; each "
            "is listed with its volume, location and T1, T2*, B1 in the per-lesion table below."))
        return "\n".join(p for p in parts if p)
    table, fp, det_how = _lead_detection(r, net, manual_bin, pred, threshold)
    n = len(table)
    n_det = int(table["detected"].astype(bool).sum()) if "detected" in table.columns and n else 0
    fp_text = "an unknown number of" if _is_missing(fp) else str(int(fp))
    parts.append(
        f"<p>{n_det} of {n} reference lesion{'s' if n != 1 else ''} detected, {_esc(fp_text)} false-positive "
        f"component{'s' if fp != 1 else ''}, {_esc(det_how)}.</p>"
    )
    parts.append(html_table(table) if n else _note("no reference lesions (manual mask empty)"))
    parts.append(_lead_metrics_table(net))
    return "\n".join(p for p in parts if p)


def _ordered_outputs(outputs: Mapping[str, np.ndarray]) -> list[str]:
    return [n for n in OUTPUT_ORDER if n in outputs] + sorted(n for n in outputs if n not in OUTPUT_ORDER)


def _network_section(r: SubjectReport, net: NetworkResult) -> str:
    parts = [f'<h2 id="{_anchor("net-" + net.name)}">Network {_esc(net.name)}</h2>']
    if net.description:
        parts.append(f"<p>{_esc(net.description)}</p>")
    vt = "" if net.val_threshold is None else f" (validation-chosen: {format_value(net.val_threshold)})"
    parts.append(
        f"<p>Inference: {_esc(format_value(net.inference_s))} s; lesion threshold "
        f"{_esc(format_value(net.threshold))}{_esc(vt)}.</p>"
    )
    for name in _ordered_outputs(net.outputs):
        parts.append(f"<h3>{_esc(name)}</h3>")
        parts.append(_output_figure(name, net.outputs[name], net.references.get(name)))
    if "lesion" in net.outputs:
        parts.append("<h3>Lesion probability overlay</h3>")
        parts.append(_overlay_figure(r, net.outputs["lesion"], net.threshold))
        parts.append("<h3>Dice and detection rate vs threshold</h3>")
        parts.append(_curves_figure(net.curves, net.threshold, net.name))
        parts.append("<h3>Per-lesion table</h3>")
        if net.lesions is None or net.lesions.empty:
            parts.append(_note("no reference lesions"))
        else:
            parts.append(html_table(net.lesions))
    else:
        parts.append(_note("this network has no lesion output (no overlay, threshold curves or lesion table)"))
    parts.append("<h3>Training curves</h3>")
    if net.name == BASELINE and (net.history is None or net.history.empty):
        parts.append(_note("classical baseline: no training"))
    else:
        parts.append(_history_figure(net.history, net.name))
    parts.append("<h3>Metrics</h3>")
    parts.append(_kv_table(((k, v) for k, v in net.metrics.items()), ("metric", "value")))
    return "\n".join(parts)


_PREFIX_RE = re.compile(r"^\s*(conventional|inference)\s*[:/-]?\s*", re.IGNORECASE)


def timings_table(timings: Mapping[str, float], networks: Sequence[NetworkResult]) -> pd.DataFrame:
    """Rows (kind, step, seconds): the conventional chain steps and their total, then inference per network.

    A key that equals a network name or starts/ends with "inference" counts as inference, any other key
    as a conventional step; a "conventional:"/"inference:" prefix is dropped from the step name. A
    conventional step named "total" is taken as the total, otherwise the total is the sum of the steps.
    A network whose name appears in no inference key contributes its ``inference_s``.
    """
    names = {n.name for n in networks}
    conv: list[tuple[str, float]] = []
    inf: list[tuple[str, float]] = []
    total: float | None = None
    for key, value in timings.items():
        key = str(key)
        low = key.strip().lower()
        step = _PREFIX_RE.sub("", key).strip() or key
        if key in names or low.startswith("inference") or low.endswith("inference"):
            inf.append((step, float(value)))
        elif step.lower() == "total":
            total = float(value)
        else:
            conv.append((step, float(value)))
    rows = [("conventional", k, v) for k, v in conv]
    if conv or total is not None:
        rows.append(("conventional", "total", total if total is not None else float(np.nansum([v for _, v in conv]))))
    covered = {n for n in names for k, _ in inf if n in k}
    rows += [("inference", k, v) for k, v in inf]
    rows += [("inference", n.name, float(n.inference_s)) for n in networks if n.name not in covered]
    return pd.DataFrame(rows, columns=["kind", "step", "seconds"])


def render_subject_report(r: SubjectReport) -> str:
    """The subject's report as one self-contained HTML document."""
    who = f"{r.subject}" + (f" / {r.session}" if r.session else "")
    body = [f"<h1>{_esc(r.title)}: {_esc(who)}</h1>"]
    body.append(
        _kv_table(
            [
                ("subject", r.subject),
                ("session", r.session if r.session else "n/a"),
                ("site", r.site),
                ("group", r.group),
            ],
            ("field", "value"),
        )
    )
    lead, _ = lead_network(r)
    toc = [("lesions", f"Lesions ({lead.name if lead else 'no lesion network'})"), ("qc", "Input QC")]
    toc += [(_anchor("net-" + n.name), f"Network {n.name}") for n in r.networks]
    if r.lesion_quant is not None:
        toc.insert(1, ("lesion-quant", "Per-lesion T1, T2*, B1"))
    if r.truth_metrics is not None:
        toc.append(("truth", "Phantom ground truth"))
    if r.model_cards is not None:
        toc.append(("model-cards", "Model cards"))
    toc += [("timings", "Timings"), ("provenance", "Provenance")]
    body.append("<nav><ul>" + "".join(f'<li><a href="#{a}">{_esc(t)}</a></li>' for a, t in toc) + "</ul></nav>")
    body.append(_lead_section(r))
    if r.lesion_quant is not None:
        body.append('<h2 id="lesion-quant">Per-lesion T1, T2*, B1</h2>')
        body.append(html_table(r.lesion_quant, caption=r.lesion_quant_caption) if len(r.lesion_quant)
                    else _note("no lesions in the manual mask or in any binarised map"))
    body.append('<h2 id="qc">Input QC</h2>')
    body.append(_qc_section(r.qc))
    if not r.networks:
        body.append(_note("no network results"))
    for net in r.networks:
        body.append(_network_section(r, net))
    if r.truth_metrics is not None:
        body.append('<h2 id="truth">Metrics against the phantom ground truth</h2>')
        body.append(html_table(r.truth_metrics) if not r.truth_metrics.empty else _note("no ground-truth metrics"))
    if r.model_cards is not None:
        body.append('<h2 id="model-cards">Model cards</h2>')
        body.append(model_cards_section(r.model_cards))
    body.append('<h2 id="timings">Timings</h2>')
    tt = timings_table(r.timings, r.networks)
    body.append(html_table(tt) if not tt.empty else _note("no timings recorded"))
    body.append(_speed_summary(tt))
    body.append('<h2 id="provenance">Provenance</h2>')
    body.append(_kv_table(r.provenance.items(), ("item", "value")))
    return _page(f"{r.title}: {who}", body)


def _card_value(value: object) -> str:
    if isinstance(value, Mapping | list):
        return json.dumps(value, sort_keys=False, default=str)
    return format_value(value)


def model_cards_section(cards: Mapping[str, Mapping[str, Any]]) -> str:
    """One table per network's model card (``model_card.json``; mrflesion.model_card), its nested
    entries as compact JSON; the per-site training cohort as its own table."""
    if not cards:
        return _note("no model cards")
    parts = []
    for net, card in cards.items():
        parts.append(f'<h3 id="{_anchor("card-" + str(net))}">{_esc(net)}</h3>')
        tc = card.get("TrainingCohort")
        cohort = tc.get("Sites") if isinstance(tc, Mapping) else None
        items = [(k, _card_value(v)) for k, v in card.items() if k != "TrainingCohort"]
        parts.append(_kv_table(items, ("field", "value")))
        if cohort:
            parts.append(html_table(pd.DataFrame(cohort), caption="Training cohort per site (training and "
                                    "validation subjects)"))
    return "".join(parts)


def _speed_summary(tt: pd.DataFrame) -> str:
    total = tt[(tt["kind"] == "conventional") & (tt["step"] == "total")]["seconds"]
    inf = tt[tt["kind"] == "inference"]
    if total.empty or inf.empty:
        return ""
    conv = float(total.iloc[0])
    items = []
    for step, sec in zip(inf["step"], inf["seconds"], strict=True):
        ratio = conv / sec if sec and sec > 0 else float("nan")
        items.append(
            f"<li>{_esc(step)}: {_esc(format_value(sec))} s (conventional chain "
            f"{_esc(format_value(conv))} s, ×{_esc(format_value(ratio))})</li>"
        )
    return "<ul>" + "".join(items) + "</ul>"


def write_subject_report(r: SubjectReport, path: str | os.PathLike[str]) -> Path:
    """Render and write the subject report atomically; returns the path."""
    return _write_atomic(Path(path), render_subject_report(r))


# --------------------------------------------------------------------------------------------------
# group report

CURVE_COLUMNS = ("site", "network", "subject", "threshold", "dice")


def _cohort_figure(curves: pd.DataFrame, network: str) -> str:
    df = curves[curves["network"] == network]
    ldr = _ldr_column(df)
    metrics = [("dice", "Dice")] + ([(ldr, "detection rate")] if ldr and df[ldr].notna().any() else [])
    title = f"{network}: lesion {' / '.join(label for _, label in metrics)} vs threshold per site"
    fig, axes = _panels(len(metrics), title)
    for ax, (col, label) in zip(axes, metrics, strict=True):
        for site, sdf in sorted(df.groupby("site", sort=True), key=lambda kv: str(kv[0])):
            vals = pd.to_numeric(sdf[col], errors="coerce")
            g = vals.groupby(sdf["threshold"].astype(np.float64))
            mean, sd, n = g.mean(), g.std(ddof=1), g.count()
            t = mean.index.to_numpy(dtype=np.float64)
            n_subj = sdf.loc[vals.notna(), "subject"].nunique()
            line = ax.plot(t, mean.to_numpy(), linewidth=1.2, label=f"{site} (n={n_subj})")[0]
            band = (n > 1).to_numpy() & np.isfinite(sd.to_numpy())
            if band.any():
                m, s = mean.to_numpy(), sd.to_numpy()
                ax.fill_between(
                    t,
                    np.where(band, m - s, np.nan),
                    np.where(band, m + s, np.nan),
                    color=line.get_color(),
                    alpha=0.2,
                    linewidth=0,
                )
        ax.set_ylim(-0.02, 1.02)
        _style(ax, "threshold", f"mean {label} (± sd)")
    return _img(_encode(fig), f"{network}: cohort Dice vs threshold per site")


def network_order(present: Iterable[object], order: Sequence[str] = (), lead: str | None = None) -> list[str]:
    """The networks of ``present`` in display order: ``lead`` first, then those of ``order`` (the
    config's order), then the others as they come, the baseline last."""
    names = list(dict.fromkeys(str(n) for n in present))
    out = [n for n in order if n in names] + [n for n in names if n not in order]
    out = [n for n in out if n != BASELINE] + ([BASELINE] if BASELINE in names else [])
    if lead is not None and lead in out:
        out.remove(lead)
        out.insert(0, lead)
    return out


def plot_reference(metrics: pd.DataFrame) -> str:
    """The reference of the group plots: ``truth`` (phantom ground truth) when the table has finite
    values against it, else ``pipeline``."""
    if "reference" in metrics.columns:
        truth = metrics[metrics["reference"] == "truth"]
        if pd.to_numeric(truth["value"], errors="coerce").notna().any():
            return "truth"
    return "pipeline"


_SITE_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


def _site_figure(data: pd.DataFrame, networks: Sequence[str], lead: str | None) -> str:
    """Per-site strip plots: one panel per metric of SITE_PLOT_METRICS, x = network, one point per
    subject (colour and offset = site), a bar at each site's median. Sized to fit a 1400x900 screen."""
    sites = sorted(data["site"].astype(str).unique())
    colour = {s: _SITE_COLOURS[i % len(_SITE_COLOURS)] for i, s in enumerate(sites)}
    n_sub = data.dropna(subset=["value"]).groupby(data["site"].astype(str))["subject"].nunique()
    panel_w, left, gap = 3.75, 0.6, 0.15
    width = panel_w * len(SITE_PLOT_METRICS)
    legend_h, title_h, ax_h, bottom = 0.4, 0.5, 3.0, 1.0
    height = legend_h + title_h + ax_h + bottom
    fig = _new_figure(width, height)
    k = len(sites)
    dx = min(0.7 / max(k, 1), 0.22)
    xs = np.arange(len(networks), dtype=np.float64)
    for p, (metric, label, ylim) in enumerate(SITE_PLOT_METRICS):
        ax = fig.add_axes(
            ((p * panel_w + left) / width, bottom / height, (panel_w - left - gap) / width, ax_h / height)
        )
        ax.set_title(label, fontsize=11)
        md = data[data["metric"] == metric]
        md = md.assign(value=pd.to_numeric(md["value"], errors="coerce"))
        if not md["value"].notna().any():
            ax.text(
                0.5,
                0.5,
                f"{metric}: no values\nin the metrics table",
                ha="center",
                va="center",
                fontsize=10,
                color="#666",
                transform=ax.transAxes,
            )
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        if lead is not None and networks and networks[0] == lead:
            ax.axvspan(-0.5, 0.5, color="#fff1bf", zorder=0, linewidth=0)
        if len(networks) > 1 and networks[-1] == BASELINE:
            ax.axvline(len(networks) - 1.5, color="#999", linestyle=":", linewidth=0.8)
        for i, net in enumerate(networks):
            nd = md[(md["network"].astype(str) == net) & md["value"].notna()]
            if nd.empty:
                ax.text(
                    i,
                    0.03,
                    "n/a",
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    color="#888",
                    transform=ax.get_xaxis_transform(),
                )
                continue
            for j, site in enumerate(sites):
                v = np.sort(nd.loc[nd["site"].astype(str) == site, "value"].to_numpy(dtype=np.float64))
                if v.size == 0:
                    continue
                x0 = i + (j - (k - 1) / 2) * dx
                jitter = (np.arange(v.size) - (v.size - 1) / 2) * (0.5 * dx / max(v.size, 1))
                ax.scatter(x0 + jitter, v, s=24, color=colour[site], edgecolors="white", linewidths=0.4, zorder=3)
                if v.size > 1:  # a single point is its own median
                    ax.plot([x0 - 0.4 * dx, x0 + 0.4 * dx], [np.median(v)] * 2, color="#222", linewidth=1.2, zorder=4)
        ax.set_xlim(-0.5, len(networks) - 0.5)
        ax.set_xticks(xs)
        ax.set_xticklabels(networks, rotation=45, ha="right", rotation_mode="anchor", fontsize=9)
        for tick, net in zip(ax.get_xticklabels(), networks, strict=True):
            if net == lead:
                tick.set_fontweight("bold")
            elif net == BASELINE:
                tick.set_fontstyle("italic")
        if ylim is not None:
            ax.set_ylim(ylim[0] - 0.04, ylim[1] + 0.04)
        else:
            top = float(np.nanmax(md["value"].to_numpy(dtype=np.float64)))
            ax.set_ylim(0.0, top * 1.1 if top > 0 else 1.0)
        ax.tick_params(axis="y", labelsize=9)
        ax.grid(axis="y", alpha=0.3)
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], linestyle="", marker="o", markersize=7, color=colour[s], label=f"{s} (n={int(n_sub.get(s, 0))})")
        for s in sites
    ] + [Line2D([], [], color="#222", linewidth=1.2, label="site median")]
    fig.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=min(len(handles), 8),
        fontsize=10,
        frameon=False,
        handletextpad=0.3,
        columnspacing=1.2,
    )
    return _img(
        _encode(fig), "per-site lesion Dice, LDR, lesion-wise F1 and T1 deviation per network", ident="site-plots"
    )


def _site_plots_section(
    metrics: pd.DataFrame, networks: Sequence[str], lead: str | None, reference: str | None, threshold: float | None
) -> list[str]:
    out = ['<h2 id="site-plots-title">Lesion metrics per site</h2>']
    need = {"subject", "site", "network", "metric", "value"}
    if metrics.empty or not need <= set(metrics.columns):
        out.append(_note("no per-subject metrics" if metrics.empty else f"metrics table lacks {sorted(need)}"))
        return out
    ref = reference or plot_reference(metrics)
    data = metrics[metrics["reference"] == ref] if "reference" in metrics.columns else metrics
    order = network_order(data["network"], networks, lead)
    out.append(_site_figure(data, order, lead))
    missing = [m for m, _, _ in SITE_PLOT_METRICS if m not in set(data["metric"])]
    lead_text = (
        f"{lead} (bold, shaded) is the recommended network (first in the configuration). " if lead in order else ""
    )
    base_text = (
        "baseline (italic, last) is the classical lesion method without deep learning (lesion output only). "
        if BASELINE in order
        else ""
    )
    out.append(
        f"<p>One point per subject (colour = site), against {_esc(REFERENCE_LABEL.get(ref, ref))} "
        f"(reference <code>{_esc(ref)}</code>), lesion maps binarised at "
        + (f"{threshold:.3g}" if threshold is not None else "the default threshold")
        + "; black bars: "
        f"site medians (of two or more subjects). {_esc(lead_text)}{_esc(base_text)}"
        + (f"Not in the metrics table: {_esc(', '.join(missing))}." if missing else "")
        + "</p>"
    )
    return out


def _section_items(value: object) -> list[str]:
    """HTML of one group-report section: a table, a sentence, or a list of them (an empty table says
    "empty")."""
    items = list(value) if isinstance(value, list | tuple) else [value]
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(f"<p>{_esc(item)}</p>")
        elif item is None or item.empty:
            out.append(_note("empty"))
        else:
            out.append(html_table(item))
    return out


GroupSection = pd.DataFrame | str | Sequence[pd.DataFrame | str]


def render_group_report(
    tables: Mapping[str, GroupSection],
    curves: pd.DataFrame | None = None,
    provenance: Mapping[str, str] | None = None,
    *,
    title: str = "mrflesion group report",
    notes: Sequence[str] = (),
    metrics: pd.DataFrame | None = None,
    overview: pd.DataFrame | None = None,
    lead: str | None = None,
    networks: Sequence[str] = (),
    reference: str | None = None,
    threshold: float | None = None,
    overview_caption: str = "",
) -> str:
    """The cohort report as one self-contained HTML document.

    Order: title and ``notes``; the per-site plots of ``metrics`` (long table subject, site, network,
    reference, metric, value; one panel per metric of :data:`SITE_PLOT_METRICS`, against ``reference``,
    by default ``truth`` when present else ``pipeline``; networks in :func:`network_order` of
    ``networks`` with ``lead`` first and the baseline last; ``threshold``, the lesion threshold of
    these metrics, for the caption); the one-row-per-subject ``overview`` (see
    :func:`mrflesion.evaluate.tables.subject_overview`) with ``overview_caption`` under it;
    then ``tables`` (section title -> a table, a sentence, or a list of both; an empty table says
    "empty"), the cohort threshold curves and the provenance. ``curves``: long table with columns
    site, network, subject, threshold, dice (optionally detection_rate or ldr); one plot per network
    shows the mean per site with a ±sd band where more than one subject has a value.
    """
    body = [f"<h1>{_esc(title)}</h1>"]
    body += [f"<p>{_esc(n)}</p>" for n in notes]
    if metrics is not None:
        body += _site_plots_section(metrics, networks, lead, reference, threshold)
    toc = ([("overview", "Subjects")] if overview is not None else []) + [(_anchor("t-" + t), t) for t in tables]
    toc += [("curves", "Cohort threshold curves"), ("provenance", "Provenance")]
    body.append("<nav><ul>" + "".join(f'<li><a href="#{a}">{_esc(t)}</a></li>' for a, t in toc) + "</ul></nav>")
    if overview is not None:
        body.append('<h2 id="overview">Subjects</h2>')
        shown = overview.rename(columns=OVERVIEW_HEADERS)
        body.append(html_table(shown) if not overview.empty else _note("no subjects"))
        if overview_caption:
            body.append(f"<p>{_esc(overview_caption)}</p>")
    for name, value in tables.items():
        body.append(f'<h2 id="{_anchor("t-" + name)}">{_esc(name)}</h2>')
        body += _section_items(value)
    body.append('<h2 id="curves">Cohort threshold curves</h2>')
    if curves is None or curves.empty:
        body.append(_note("no threshold curves"))
    else:
        missing = [c for c in CURVE_COLUMNS if c not in curves.columns]
        if missing:
            raise ValueError(f"cohort curves lack columns: {missing}")
        curves = curves.assign(network=curves["network"].astype(str))
        for network in network_order(sorted(curves["network"].unique()), networks, lead):
            body.append(f"<h3>{_esc(network)}</h3>")
            body.append(_cohort_figure(curves, network))
    body.append('<h2 id="provenance">Provenance</h2>')
    body.append(_kv_table((provenance or {}).items(), ("item", "value")))
    return _page(title, body)


def write_group_report(
    tables: Mapping[str, GroupSection],
    curves: pd.DataFrame | None,
    provenance: Mapping[str, str] | None,
    path: str | os.PathLike[str],
    **options: Any,
) -> Path:
    """Render (:func:`render_group_report`, whose keyword ``options`` it takes) and write the group report
    atomically; returns the path."""
    return _write_atomic(Path(path), render_group_report(tables, curves, provenance, **options))
