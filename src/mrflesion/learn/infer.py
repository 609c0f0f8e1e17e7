"""Inference of a trained network on one subject: whole slices, or sliding windows with overlap.

The U-net is fully convolutional, so the default feeds whole axial slices (padded to a multiple of
the network's downsampling factor, :func:`mrflesion.learn.networks.forward_padded`). ``mode:
sliding`` instead tiles each slice with ``window``-sized square windows at a stride of
``window * (1 - overlap)`` (the last window flush with the edge) and averages the overlapping
predictions with equal weights; this reproduces the training patch size exactly, at the cost of
``1 / (1 - overlap)^2`` times the compute. Outputs are decoded to physical units (T1/T2* in ms,
probabilities 0-1) by the checkpoint's :class:`~mrflesion.learn.data.Normalisation`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..device import autocast, resolve_device
from . import checkpoint as ckpt_io
from .data import Normalisation, SubjectData, SubjectPaths, load_subject
from .networks import UNet, forward_padded
from .spec import NetworkSpec

INFERENCE_MODES = ("whole", "sliding")

#: Units of every network output once decoded (the outputs' sidecars, the model cards).
OUTPUT_UNITS = {"T1": "ms", "T2star": "ms", "NAWM": "1 (probability)", "GM": "1 (probability)",
                "lesion": "1 (probability)"}


@torch.no_grad()
def predict_slices(
    model: UNet, inputs: np.ndarray, device: torch.device, batch_slices: int = 8, logits: bool = False
) -> np.ndarray:
    """Whole-slice prediction: (Z, H, W, C_in) normalised inputs -> (Z, H, W, C_out) network units
    (``logits``: before the output sigmoid)."""
    was_training = model.training
    model.eval()
    out = np.empty(inputs.shape[:3] + (model.out_channels,), dtype=np.float32)
    try:
        for z0 in range(0, inputs.shape[0], batch_slices):
            x = torch.from_numpy(np.ascontiguousarray(inputs[z0 : z0 + batch_slices])).to(device)
            x = x.permute(0, 3, 1, 2)
            x = x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x.contiguous()
            with autocast(device):
                y = forward_padded(model, x, logits=logits)
            out[z0 : z0 + batch_slices] = y.float().permute(0, 2, 3, 1).cpu().numpy()
    finally:
        model.train(was_training)
    return out


def load_model(
    model_ckpt: str | Path | Mapping[str, Any], device: str | torch.device = "cpu"
) -> tuple[UNet, NetworkSpec, Normalisation]:
    """Model, spec and normalisation from ``best.pt``/``last.pt`` (a path or a loaded dict)."""
    ck = ckpt_io.load(model_ckpt) if not isinstance(model_ckpt, Mapping) else model_ckpt
    spec = NetworkSpec.from_dict(ck["spec"])
    cfg = ck["model_config"]
    model = spec.build(
        int(cfg["in_channels"]), tuple(cfg["widths"]), int(cfg["bridge"]), float(cfg["dropout"]),
        norm=str(cfg.get("norm", "none")),
    )
    model.load_state_dict(ck["model"])
    dev = resolve_device(device)
    model.to(dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
    model.eval()
    return model, spec, Normalisation.from_dict(ck["normalisation"])



def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows covering ``[0, size)``; the last window ends at ``size``."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, max(1, stride)))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


@torch.no_grad()
def predict_sliding(
    model: UNet,
    inputs: np.ndarray,
    device: torch.device,
    window: int = 64,
    overlap: float = 0.5,
    batch: int = 32,
) -> np.ndarray:
    """(Z, H, W, C_in) normalised inputs -> (Z, H, W, C_out), mean over overlapping windows."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    z, h, w, _ = inputs.shape
    ph, pw = max(0, window - h), max(0, window - w)
    x_all = np.pad(inputs, ((0, 0), (0, ph), (0, pw), (0, 0))) if ph or pw else inputs
    hh, ww = x_all.shape[1:3]
    stride = max(1, int(round(window * (1.0 - overlap))))
    boxes = [(k, i, j) for k in range(z) for i in window_starts(hh, window, stride)
             for j in window_starts(ww, window, stride)]
    acc = np.zeros((z, hh, ww, model.out_channels), dtype=np.float32)
    cnt = np.zeros((z, hh, ww, 1), dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        for b0 in range(0, len(boxes), batch):
            chunk = boxes[b0:b0 + batch]
            x = np.stack([x_all[k, i:i + window, j:j + window] for k, i, j in chunk])
            xt = torch.from_numpy(np.ascontiguousarray(x)).to(device).permute(0, 3, 1, 2).contiguous()
            with autocast(device):
                y = forward_padded(model, xt)
            y_np = y.float().permute(0, 2, 3, 1).cpu().numpy()
            for (k, i, j), yk in zip(chunk, y_np, strict=True):
                acc[k, i:i + window, j:j + window] += yk
                cnt[k, i:i + window, j:j + window] += 1.0
    finally:
        model.train(was_training)
    return (acc / np.maximum(cnt, 1.0))[:, :h, :w]


def infer_subject(
    model_ckpt: str | Path | Mapping[str, Any],
    subject: SubjectPaths | Mapping[str, Any],
    mode: str = "whole",
    window: int = 64,
    overlap: float = 0.5,
    device: str | torch.device = "auto",
    threads: int | None = None,
    cache: dict[Any, Any] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Outputs ``{name: (X, Y, Z) float32}`` in physical units on the subject's grid (zero outside
    the brain mask), and a record: network, mode, device, seconds (model load, prediction).

    ``cache``: a dict shared by calls on the same subject, so that networks with the same inputs and
    normalisation load and normalise the images once."""
    if mode not in INFERENCE_MODES:
        raise ValueError(f"inference mode must be one of {INFERENCE_MODES}, got {mode!r}")
    if threads:
        torch.set_num_threads(int(threads))
    dev = resolve_device(device)
    t0 = time.perf_counter()
    model, spec, norm = load_model(model_ckpt, dev)
    key = (spec.input_images, tuple(sorted(norm.to_dict().items())))
    if cache is not None and key in cache:
        subj = cache[key]
    else:
        subj = load_subject(subject, spec, norm, with_targets=False)
        if cache is not None:
            cache[key] = subj
    t1 = time.perf_counter()
    if mode == "whole":
        pred = predict_slices(model, subj.inputs, dev)
    else:
        pred = predict_sliding(model, subj.inputs, dev, window=window, overlap=overlap)
    t2 = time.perf_counter()
    out = to_physical(pred, spec, norm, subj)
    record = {
        "network": spec.name,
        "outputs": list(spec.outputs),
        "mode": mode,
        "window": int(window) if mode == "sliding" else None,
        "overlap": float(overlap) if mode == "sliding" else None,
        "device": str(dev),
        "load_seconds": round(t1 - t0, 3),
        "predict_seconds": round(t2 - t1, 3),
        "affine": subj.affine,
    }
    return out, record


def to_physical(pred: np.ndarray, spec: NetworkSpec, norm: Normalisation, subj: SubjectData) -> dict[str, np.ndarray]:
    """Network-unit predictions (Z, H, W, C_out) -> ``{output: (X, Y, Z) float32}`` on the subject's grid:
    T1 and T2* in ms (T2* at most the normalisation's ``t2s_max_ms``), NAWM/GM/lesion probabilities in
    [0, 1]; zero outside the brain mask."""
    out = {}
    for c, name in enumerate(spec.outputs):
        vol = norm.decode(name, pred[..., c]) * subj.brain
        out[name] = subj.to_volume(vol).astype(np.float32, copy=False)
    return out


def predict_volume(
    model_ckpt: str | Path | Mapping[str, Any],
    subject: SubjectPaths | Mapping[str, Any],
    device: str | torch.device = "auto",
) -> dict[str, np.ndarray]:
    """Whole-slice inference on one subject: :func:`infer_subject`'s outputs without its record. The
    subject needs the inputs of the network (``mrf``, or ``T1``/``T2star``) and ``mask``."""
    return infer_subject(model_ckpt, subject, device=device)[0]
