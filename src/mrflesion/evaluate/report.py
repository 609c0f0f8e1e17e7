"""Self-contained HTML reports: one per subject and one for the cohort (DESIGN §5).

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

Tables are plain HTML tables with escaped text; NaN / None show as "n/a", booleans as yes / no and
floats with 4 significant digits.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

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


@dataclass
class SubjectReport:
    """Everything shown in one subject's report."""

    subject: str
    session: str | None
    site: str
    group: str
    qc: dict[str, np.ndarray]
    underlay: np.ndarray
    manual: np.ndarray
    networks: list[NetworkResult]
    timings: dict[str, float]
    provenance: dict[str, str]
    truth_metrics: pd.DataFrame | None = None
    title: str = "mrflesion subject report"


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


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{_esc(alt)}">'


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
    contour: np.ndarray | None = None


def _mosaic_figure(rows: Sequence[_Row]) -> str:
    """PNG data URI of stacked mosaic rows (manual layout: faster and stabler than a layout engine).

    Each row is at most ``max_w`` inches wide and ``max_h`` high (aspect kept); the figure is as wide
    as its widest row plus room for the colour bars.
    """
    max_w, max_h, title_h, cbar_w = 8.7, 2.6, 0.3, 1.1
    sizes = []
    for row in rows:
        nrow, ncol = row.image.shape
        aspect = max(ncol, 1) / max(nrow, 1)
        w = min(max_w, max_h * aspect)
        sizes.append((w, w / aspect))
    mosaic_w = max(w for w, _ in sizes)
    width = mosaic_w + cbar_w + 0.1
    total = sum(h for _, h in sizes) + title_h * len(rows) + 0.1
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
        if row.contour is not None and np.any(row.contour > 0.5):
            ax.contour(np.nan_to_num(row.contour), levels=[0.5], colors="cyan", linewidths=0.9)
        label = row.overlay_cbar if row.overlay is not None else row.cbar
        if label is not None:
            cax = fig.add_axes(((0.05 + w + 0.12) / width, (bottom + 0.1 * h) / total, 0.12 / width, 0.8 * h / total))
            cb = fig.colorbar(mappable, cax=cax)
            cb.set_label(label, fontsize=7)
            cb.ax.tick_params(labelsize=7)
            cb.locator = MaxNLocator(5)
        top = bottom
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
        rows.append(
            _Row(
                mosaic(vol, zs),
                f"{name}: slices {', '.join(map(str, zs))} (window {lo:.4g}–{hi:.4g})",
                vmin=lo,
                vmax=hi,
            )
        )
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
    outline = "cyan outline = manual mask" if np.any(manual > 0) else "manual mask empty"
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
        + (f"Cyan outline: manual mask ({n_manual} voxels)." if n_manual else "The manual mask is empty.")
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


def _ordered_outputs(outputs: Mapping[str, np.ndarray]) -> list[str]:
    return [n for n in OUTPUT_ORDER if n in outputs] + sorted(n for n in outputs if n not in OUTPUT_ORDER)


def _network_section(r: SubjectReport, net: NetworkResult) -> str:
    parts = [f'<h2 id="{_anchor("net-" + net.name)}">Network {_esc(net.name)}</h2>']
    if net.description:
        parts.append(f"<p>{_esc(net.description)}</p>")
    parts.append(
        f"<p>Inference: {_esc(format_value(net.inference_s))} s; lesion threshold "
        f"{_esc(format_value(net.threshold))}.</p>"
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
    toc = [("qc", "Input QC")] + [(_anchor("net-" + n.name), f"Network {n.name}") for n in r.networks]
    if r.truth_metrics is not None:
        toc.append(("truth", "Phantom ground truth"))
    toc += [("timings", "Timings"), ("provenance", "Provenance")]
    body.append("<nav><ul>" + "".join(f'<li><a href="#{a}">{_esc(t)}</a></li>' for a, t in toc) + "</ul></nav>")
    body.append('<h2 id="qc">Input QC</h2>')
    body.append(_qc_section(r.qc))
    if not r.networks:
        body.append(_note("no network results"))
    for net in r.networks:
        body.append(_network_section(r, net))
    if r.truth_metrics is not None:
        body.append('<h2 id="truth">Metrics against the phantom ground truth</h2>')
        body.append(html_table(r.truth_metrics) if not r.truth_metrics.empty else _note("no ground-truth metrics"))
    body.append('<h2 id="timings">Timings</h2>')
    tt = timings_table(r.timings, r.networks)
    body.append(html_table(tt) if not tt.empty else _note("no timings recorded"))
    body.append(_speed_summary(tt))
    body.append('<h2 id="provenance">Provenance</h2>')
    body.append(_kv_table(r.provenance.items(), ("item", "value")))
    return _page(f"{r.title}: {who}", body)


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


def render_group_report(
    tables: Mapping[str, pd.DataFrame],
    curves: pd.DataFrame | None = None,
    provenance: Mapping[str, str] | None = None,
    *,
    title: str = "mrflesion group report",
    notes: Sequence[str] = (),
) -> str:
    """The cohort report as one self-contained HTML document.

    ``tables``: section title -> table, shown in order (an empty table says "empty"). ``curves``: long
    table with columns site, network, subject, threshold, dice (optionally detection_rate or ldr); one
    plot per network shows the mean per site with a ±sd band where more than one subject has a value.
    """
    body = [f"<h1>{_esc(title)}</h1>"]
    body += [f"<p>{_esc(n)}</p>" for n in notes]
    toc = [(_anchor("t-" + t), t) for t in tables] + [
        ("curves", "Cohort threshold curves"),
        ("provenance", "Provenance"),
    ]
    body.append("<nav><ul>" + "".join(f'<li><a href="#{a}">{_esc(t)}</a></li>' for a, t in toc) + "</ul></nav>")
    for name, df in tables.items():
        body.append(f'<h2 id="{_anchor("t-" + name)}">{_esc(name)}</h2>')
        body.append(html_table(df) if df is not None and not df.empty else _note("empty"))
    body.append('<h2 id="curves">Cohort threshold curves</h2>')
    if curves is None or curves.empty:
        body.append(_note("no threshold curves"))
    else:
        missing = [c for c in CURVE_COLUMNS if c not in curves.columns]
        if missing:
            raise ValueError(f"cohort curves lack columns: {missing}")
        curves = curves.assign(network=curves["network"].astype(str))
        for network in sorted(curves["network"].unique()):
            body.append(f"<h3>{_esc(network)}</h3>")
            body.append(_cohort_figure(curves, network))
    body.append('<h2 id="provenance">Provenance</h2>')
    body.append(_kv_table((provenance or {}).items(), ("item", "value")))
    return _page(title, body)


def write_group_report(
    tables: Mapping[str, pd.DataFrame],
    curves: pd.DataFrame | None,
    provenance: Mapping[str, str] | None,
    path: str | os.PathLike[str],
    *,
    title: str = "mrflesion group report",
    notes: Sequence[str] = (),
) -> Path:
    """Render and write the group report atomically; returns the path."""
    return _write_atomic(Path(path), render_group_report(tables, curves, provenance, title=title, notes=notes))
