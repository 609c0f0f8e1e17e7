"""Brain masks from the images themselves (no template needed)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1D sample (maximises the between-class variance)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    hist, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = (w0 * w1 * (m0 - m1) ** 2)[:-1]
    # Between two well-separated modes the score is flat over the empty gap: take its middle.
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))
    return float(0.5 * (centres[best[0]] + centres[best[-1]]))


def series_brain_mask(series: np.ndarray, closing_iterations: int = 2) -> np.ndarray:
    """Brain (foreground) mask of a 4D magnitude series: Otsu on the mean image, cleaned.

    Largest 3D connected component, holes filled slice by slice and in 3D, a small closing.
    """
    if series.ndim != 4:
        raise ValueError(f"expected a 4D series, got shape {series.shape}")
    mean = np.asarray(series, dtype=np.float32).mean(axis=3)
    positive = mean[mean > 0]
    if positive.size == 0:
        return np.zeros(mean.shape, bool)
    mask = mean > otsu_threshold(positive)
    if closing_iterations:
        # Pad by edge replication so that the closing does not erode the first and last slices.
        pad = closing_iterations
        padded = np.pad(mask, pad, mode="edge")
        padded = ndimage.binary_closing(padded, iterations=closing_iterations)
        mask = padded[pad:-pad, pad:-pad, pad:-pad]
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        mask = labels == (1 + int(np.argmax(sizes)))
    for k in range(mask.shape[2]):
        mask[:, :, k] = ndimage.binary_fill_holes(mask[:, :, k])
    return ndimage.binary_fill_holes(mask)
