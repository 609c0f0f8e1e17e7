"""Training of the siamese new-lesion network (:mod:`.network`), resumable and preemption-safe.

Inputs are in-memory arrays per pair in the pair's halfway space (:class:`PairArrays`): baseline and
follow-up FLAIR (float32, brain median ~1, 0 outside the brain), brain mask, target (the manual
new/enlarged mask) and voxel size. The recipe (nnU-Net style, as the seed):

* Patches of the fitted patch size (:func:`~.network.fit_patch`: ``spec.patch`` clipped to the
  volumes; zero-padded where a volume is smaller). ``foreground_fraction`` of them are centred, with a
  random offset of up to a quarter patch, on a random target voxel of a random pair with targets; the
  rest are centred on a random voxel of a random pair's brain bounding box. The plan of an epoch is a
  pure function of (seed, epoch) (:func:`plan_epoch`).
* Augmentation (training only; parameters from a generator seeded by (seed, epoch, batch)):
  left-right flip along axis 0 (both time points, brain and target alike), a smooth multiplicative bias
  field per time point (exp of a random quadratic polynomial), Gaussian noise per time point inside the
  brain, and a random shift of up to ``shift_mm`` of the BASELINE only (trilinear, ``grid_sample``; the
  target stays with the follow-up): the network must not call misregistration "new".
* Loss: cross-entropy of the 2-class logits (``"ce+dice"``: plus the soft Dice of the foreground
  probability over the batch); deep supervision: the auxiliary outputs against the target max-pooled
  to their size, weights 1, 1/2, 1/4 normalised to sum 1.
* Adam(lr), lr·(1 − e/epochs)^0.9 in epoch e (poly decay, set at the start of every epoch).
* Optional pre-training (``pretrain_epochs`` > 0, ``pretrain_volumes`` given): the shared encoder is
  first trained on single FLAIRs against all their lesions (:class:`~.network.SingleTimepointNet`, its
  own Adam and poly schedule); the main epochs follow. Pre-training epochs have phase "pretrain" in the
  history and are never validated.
* Model selection on validation pairs only: every ``validate_every`` epochs (and after the last one)
  sliding-window inference (:func:`.infer.predict_pair`) on each validation pair, lesion mask at
  ``spec.threshold`` / ``spec.min_lesion_ml`` and lesion-wise counts (rule A,
  :func:`mrflesion.evaluate.lesionwise.lesionwise_metrics`) pooled over pairs: ``best.pt`` is the
  epoch with the highest pooled lesion-wise F1, ties to the lower validation loss (the mean binary
  cross-entropy of the window-averaged probability over brain voxels, + soft Dice with ``ce+dice``).
  Caveat: rule A scores one oversized component covering every new lesion as F1 = 1 (an untrained
  net at threshold 0.4 often gives one); ``selection: msseg_f1`` selects on the pooled MSSEG (rule B)
  F1 instead, which does not (both are in the history). Without validation pairs ``best.pt`` is the
  last epoch.
* Resume / preemption: the contract of :mod:`mrflesion.learn.train`. ``out_dir/last.pt`` is written
  atomically after every epoch and on SIGTERM/SIGUSR1 (after the current batch), then
  :class:`~mrflesion.learn.train.Preempted` (exit code 75) is raised. It holds the weights, the
  optimisers, the epoch and the batch position, the partial epoch's loss sums, the RNG states, the
  history, the best score and the settings; a call with the same ``out_dir`` continues from it, and a
  call with other settings raises :class:`~mrflesion.learn.train.ResumeMismatch`. Every random choice
  is seeded by (seed, epoch[, batch]), so on the CPU a run cut anywhere and resumed ends bit-identical
  to a straight one (``until_epoch`` stops a call early without changing the schedule).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..device import autocast, resolve_device
from ..evaluate.lesionwise import lesion_f1, lesion_mask, lesionwise_metrics, msseg_detection
from ..evaluate.metrics import voxel_volume_ml
from ..learn import checkpoint as ckpt_io
from ..learn.progress import Progress
from ..learn.train import PREEMPTED_EXIT_CODE, Preempted, ResumeMismatch, _stop_signals, _torch_settings
from .infer import CHECKPOINT_FORMAT, predict_pair
from .network import LongitudinalSpec, SiameseUNet3D, SingleTimepointNet, count_parameters, fit_patch

__all__ = [
    "CHECKPOINT_FORMAT",
    "HISTORY_COLUMNS",
    "PREEMPTED_EXIT_CODE",
    "PairArrays",
    "Preempted",
    "ResumeMismatch",
    "as_pair",
    "augment_batch",
    "extract_patch",
    "plan_epoch",
    "poly_lr",
    "segmentation_loss",
    "train_longitudinal",
    "validate",
]

HISTORY_COLUMNS = (
    "phase", "epoch", "train_loss", "val_loss", "val_sensitivity", "val_fp_per_case", "val_f1", "val_msseg_f1", "lr",
    "seconds",
)
# streams of the seeded generators (seed, epoch, stream[, batch])
_PLAN, _AUG, _INIT = 1, 2, 3
_PHASE_KEY = {"pretrain": 1, "main": 0}


# ------------------------------------------------------------------------------------------ data


@dataclass
class PairArrays:
    """One baseline/follow-up pair in its halfway space (see the module docstring). ``target`` may be
    None for pairs only predicted on."""

    id: str
    baseline: np.ndarray
    followup: np.ndarray
    brain: np.ndarray
    target: np.ndarray | None
    voxel_mm: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.baseline.shape  # type: ignore[return-value]

    @property
    def voxel_ml(self) -> float:
        return voxel_volume_ml(self.voxel_mm)


def as_pair(obj: PairArrays | Mapping[str, Any]) -> PairArrays:
    """A :class:`PairArrays` from a mapping with keys id, baseline, followup, brain, target (optional),
    voxel_mm; dtypes made float32 / bool / uint8 and shapes checked. A pre-training volume (keys id,
    image, brain, target = all its lesions, voxel_mm) becomes a pair with the image as both time
    points."""
    if isinstance(obj, PairArrays):
        d: dict[str, Any] = dict(obj.__dict__)
    else:
        d = dict(obj)
        if "image" in d and "followup" not in d:
            d["baseline"] = d["followup"] = d.pop("image")
    base = np.ascontiguousarray(d["baseline"], dtype=np.float32)
    fol = np.ascontiguousarray(d["followup"], dtype=np.float32)
    brain = np.ascontiguousarray(d["brain"]).astype(bool, copy=False)
    tgt = d.get("target")
    tgt = None if tgt is None else np.ascontiguousarray(np.asarray(tgt) > 0, dtype=np.uint8)
    if base.ndim != 3 or fol.shape != base.shape or brain.shape != base.shape:
        raise ValueError(f"pair {d.get('id')}: baseline {base.shape}, followup {fol.shape}, brain {brain.shape}")
    if tgt is not None and tgt.shape != base.shape:
        raise ValueError(f"pair {d.get('id')}: target {tgt.shape} != {base.shape}")
    vox = tuple(float(v) for v in d["voxel_mm"])[:3]
    if len(vox) != 3:
        raise ValueError(f"pair {d.get('id')}: voxel_mm needs 3 values")
    return PairArrays(str(d["id"]), base, fol, brain, tgt, (vox[0], vox[1], vox[2]))


@dataclass
class _Index:
    """What the sampler needs of a pair: its shape, target voxel coordinates, brain bounding box."""

    shape: np.ndarray
    fg: np.ndarray  # (K, 3) int64
    lo: np.ndarray
    hi: np.ndarray  # exclusive


def _index(p: PairArrays) -> _Index:
    shape = np.asarray(p.shape, dtype=np.int64)
    fg = np.argwhere(p.target > 0) if p.target is not None else np.zeros((0, 3), dtype=np.int64)
    where = np.argwhere(p.brain)
    if where.size:
        lo, hi = where.min(axis=0), where.max(axis=0) + 1
    else:
        lo, hi = np.zeros(3, dtype=np.int64), shape.copy()
    return _Index(shape, fg.astype(np.int64), lo.astype(np.int64), hi.astype(np.int64))


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


def plan_epoch(
    index: Sequence[_Index], n_patches: int, patch: Sequence[int], foreground_fraction: float, seed: int, epoch: int,
    phase: int = 0,
) -> np.ndarray:
    """Patch plan of one epoch: (n_patches, 4) int64 rows (pair index, start x, y, z), a pure function
    of (seed, phase, epoch). Starts are clipped into the volume (0 where the volume is smaller than the
    patch); foreground patches contain their target voxel."""
    rng = _rng(seed, phase, epoch, _PLAN)
    p = np.asarray(patch, dtype=np.int64)
    with_fg = [k for k, ix in enumerate(index) if len(ix.fg)]
    out = np.zeros((n_patches, 4), dtype=np.int64)
    for i in range(n_patches):
        if with_fg and rng.random() < foreground_fraction:
            k = with_fg[int(rng.integers(len(with_fg)))]
            ix = index[k]
            centre = ix.fg[int(rng.integers(len(ix.fg)))] + rng.integers(-(p // 4), p // 4 + 1)
        else:
            k = int(rng.integers(len(index)))
            ix = index[k]
            centre = rng.integers(ix.lo, ix.hi)
        start = np.clip(centre - p // 2, 0, np.maximum(ix.shape - p, 0))
        out[i] = (k, *start)
    return out


def extract_patch(volume: np.ndarray, start: Sequence[int], patch: Sequence[int]) -> np.ndarray:
    """``volume[start : start + patch]``, zero-padded at the end where the volume is smaller."""
    sl = volume[tuple(slice(int(s), int(s) + int(n)) for s, n in zip(start, patch, strict=True))]
    if sl.shape == tuple(patch):
        return np.array(sl)
    out = np.zeros(tuple(int(n) for n in patch), dtype=volume.dtype)
    out[tuple(slice(0, n) for n in sl.shape)] = sl
    return out


def _batch_arrays(
    pairs: Sequence[PairArrays], rows: np.ndarray, patch: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """(baseline, followup, brain float, target long) tensors of one batch and the voxel sizes (N, 3)."""
    base, fol, brain, tgt, vox = [], [], [], [], []
    for k, *start in rows:
        p = pairs[int(k)]
        base.append(extract_patch(p.baseline, start, patch))
        fol.append(extract_patch(p.followup, start, patch))
        brain.append(extract_patch(p.brain, start, patch))
        tgt.append(extract_patch(p.target, start, patch))  # type: ignore[arg-type]
        vox.append(p.voxel_mm)

    def t(a: list[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.stack(a)).to(dtype).unsqueeze(1)

    return (t(base, torch.float32), t(fol, torch.float32), t(brain, torch.float32),
            t(tgt, torch.int64)[:, 0], np.asarray(vox, dtype=np.float64))


# ---------------------------------------------------------------------------------- augmentation


def _bias_field(
    shape: Sequence[int], coeffs: np.ndarray, amplitude: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """exp(amplitude · quadratic polynomial) over [-1, 1]^3 with the 9 coefficients ``coeffs`` of x, y,
    z, x², y², z², xy, xz, yz: a smooth multiplicative field (scanner receive-bias-like)."""
    axes = [torch.linspace(-1.0, 1.0, int(n), dtype=torch.float32, device=device) for n in shape]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
    poly = torch.zeros_like(x)
    for c, m in zip(coeffs, terms, strict=True):
        poly += float(c) * m
    return torch.exp(amplitude * poly)


def _shift(volume: torch.Tensor, shift_vox: np.ndarray) -> torch.Tensor:
    """Trilinear resampling of (N, 1, X, Y, Z) at ``x + shift`` (voxels, (N, 3)), border values outside."""
    n, _, sx, sy, sz = volume.shape
    theta = torch.zeros(n, 3, 4, dtype=torch.float32)
    theta[:, 0, 0] = theta[:, 1, 1] = theta[:, 2, 2] = 1.0
    # affine_grid's output coordinates are (W, H, D) = (z, y, x), normalised to [-1, 1] (align_corners)
    for j, (size, axis) in enumerate(((sz, 2), (sy, 1), (sx, 0))):
        if size > 1:
            theta[:, j, 3] = torch.from_numpy(2.0 * shift_vox[:, axis] / (size - 1)).to(torch.float32)
    theta = theta.to(volume.device)
    grid = F.affine_grid(theta, list(volume.shape), align_corners=True)
    return F.grid_sample(volume, grid, mode="bilinear", padding_mode="border", align_corners=True)


def augment_batch(
    baseline: torch.Tensor,
    followup: torch.Tensor,
    brain: torch.Tensor,
    target: torch.Tensor,
    voxel_mm: np.ndarray,
    spec: LongitudinalSpec,
    rng: np.random.Generator,
    shift: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Augmented (baseline, followup, target) of one batch (see the module docstring), computed on the
    tensors' device; every random number comes from ``rng`` (numpy) or a CPU torch generator seeded
    from it, so the augmentation does not depend on the device. Intensities stay 0 outside the
    (flipped) brain. ``shift`` False (pre-training) skips the baseline shift."""
    n = baseline.shape[0]
    base, fol, br, tgt = baseline.clone(), followup.clone(), brain.clone(), target.clone()
    if spec.flip:
        for i in np.flatnonzero(rng.random(n) < 0.5):
            base[i], fol[i], br[i] = base[i].flip(1), fol[i].flip(1), br[i].flip(1)
            tgt[i] = tgt[i].flip(0)
    if shift and spec.shift_mm > 0:
        direction = rng.normal(size=(n, 3))
        direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-12)
        mm = direction * rng.uniform(0.0, spec.shift_mm, size=(n, 1))
        base = _shift(base, mm / voxel_mm) * br
    shape = base.shape[2:]
    for vol in (base, fol):
        if spec.bias_field > 0:
            coeffs = rng.normal(size=(n, 9)) / 3.0
            for i in range(n):
                vol[i, 0] *= _bias_field(shape, coeffs[i], spec.bias_field, vol.device)
        if spec.noise_std > 0:
            sd = torch.from_numpy(rng.uniform(0.0, spec.noise_std, size=n).astype(np.float32)).to(vol.device)
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            noise = torch.randn(tuple(vol.shape), generator=gen, dtype=torch.float32).to(vol.device)
            vol += noise * sd.view(n, 1, 1, 1, 1) * br
    return base, fol, tgt


# ----------------------------------------------------------------------------------------- loss


def poly_lr(lr: float, epoch: int, epochs: int, power: float = 0.9) -> float:
    """Learning rate of (0-based) ``epoch``: lr · (1 − epoch/epochs)^power (nnU-Net's poly decay)."""
    return float(lr) * (1.0 - int(epoch) / max(1, int(epochs))) ** float(power)


def _soft_dice(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 − soft Dice of the foreground probability over the whole batch."""
    p = torch.softmax(logits, dim=1)[:, 1]
    t = target.to(p.dtype)
    return 1.0 - (2.0 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)


def segmentation_loss(outputs: Mapping[str, Any], target: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """Deep-supervised loss: CE (+ soft Dice for ``"ce+dice"``) of the full-resolution logits and of each
    auxiliary output against the target max-pooled to its size; weights 1, 1/2, 1/4, ... normalised to
    sum 1. ``target``: (N, X, Y, Z) int64 0/1."""
    outs = [outputs["logits"], *outputs.get("aux", [])]
    weights = np.array([0.5**i for i in range(len(outs))])
    weights /= weights.sum()
    total = torch.zeros((), dtype=torch.float32, device=target.device)
    for w, out in zip(weights, outs, strict=True):
        out = out.float()
        t = target
        if out.shape[2:] != target.shape[1:]:
            k = tuple(int(a // b) for a, b in zip(target.shape[1:], out.shape[2:], strict=True))
            t = F.max_pool3d(target[:, None].float(), kernel_size=k, stride=k)[:, 0].long()
        term = F.cross_entropy(out, t)
        if kind == "ce+dice":
            term = term + _soft_dice(out, t)
        total = total + float(w) * term
    return total


# ------------------------------------------------------------------------------------ validation


def _pooled_msseg_f1(n_ref: int, tp_ref: int, n_pred: int, tp_pred: int) -> float:
    """F1 of the pooled MSSEG sensitivity and PPV, with lesion_f1's empty cases (1 when neither map
    has a lesion, 0 when one has none or nothing is detected)."""
    if n_ref == 0 and n_pred == 0:
        return 1.0
    if n_ref == 0 or n_pred == 0 or tp_ref == 0 or tp_pred == 0:
        return 0.0
    sens, ppv = tp_ref / n_ref, tp_pred / n_pred
    return 2.0 * sens * ppv / (sens + ppv)


def validate(
    model: SiameseUNet3D, pairs: Sequence[PairArrays], spec: LongitudinalSpec, patch: Sequence[int],
    device: torch.device, batch: int = 2,
) -> dict[str, float]:
    """Validation loss and pooled lesion-wise figures (module docstring) of ``model`` on ``pairs``:
    val_loss, val_sensitivity (pooled TP / reference lesions; NaN without any), val_fp_per_case,
    val_f1 (:func:`~mrflesion.evaluate.lesionwise.lesion_f1` of the pooled rule-A counts), val_msseg_f1
    (pooled :func:`~mrflesion.evaluate.lesionwise.msseg_detection` counts)."""
    losses, n_ref, tp, n_pred, pred_true, fp = [], 0, 0, 0, 0, 0
    ms = np.zeros(4, dtype=np.int64)  # n_ref, tp_ref, n_pred, tp_pred (rule B)
    for p in pairs:
        if p.target is None:
            raise ValueError(f"validation pair {p.id} has no target")
        prob = predict_pair(model, p.baseline, p.followup, p.brain, patch, spec.overlap, device, batch)
        ref = p.target > 0
        pb, rb = prob[p.brain].astype(np.float64), ref[p.brain]
        pc = np.clip(pb, 1e-7, 1 - 1e-7)
        loss = float(-np.mean(np.where(rb, np.log(pc), np.log1p(-pc)))) if pb.size else 0.0
        if spec.loss == "ce+dice":
            loss += 1.0 - (2.0 * float((pb * rb).sum()) + 1.0) / (float(pb.sum()) + float(rb.sum()) + 1.0)
        losses.append(loss)
        pred = lesion_mask(prob, spec.threshold, p.voxel_ml, spec.min_lesion_ml)
        m = lesionwise_metrics(pred, ref, p.voxel_ml, spec.min_lesion_ml)
        n_ref += int(m["n_ref"])
        tp += int(m["tp"])
        n_pred += int(m["n_pred"])
        fp += int(m["fp"])
        pred_true += int(m["n_pred"]) - int(m["fp"])
        b = msseg_detection(pred, ref, p.voxel_ml * 1000.0)
        ms += np.array([b["n_ref"], b["tp_ref"], b["n_pred"], b["tp_pred"]], dtype=np.int64)
    return {
        "val_loss": float(np.mean(losses)) if losses else math.nan,
        "val_sensitivity": tp / n_ref if n_ref else math.nan,
        "val_fp_per_case": fp / len(pairs) if pairs else math.nan,
        "val_f1": lesion_f1(n_ref, tp, n_pred, pred_true) if pairs else math.nan,
        "val_msseg_f1": _pooled_msseg_f1(*(int(v) for v in ms)) if pairs else math.nan,
    }


def _write_history(path: Path, history: Sequence[Mapping[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(HISTORY_COLUMNS)
        for row in history:
            w.writerow([row[c] if c in ("phase", "epoch") else f"{float(row[c]):.8g}" for c in HISTORY_COLUMNS])
    tmp.replace(path)


def _state_dict_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _better(val: Mapping[str, float], best: Mapping[str, Any], key: str = "val_f1") -> bool:
    """Higher pooled F1 (``key``), ties to the lower validation loss (NaN never wins over a number)."""
    f1, bf1 = float(val[key]), float(best.get(key, math.nan))
    if math.isnan(f1):
        return False
    if math.isnan(bf1) or f1 > bf1:
        return True
    return f1 == bf1 and float(val["val_loss"]) < float(best.get("val_loss", math.inf))


# ------------------------------------------------------------------------------------- training


def train_longitudinal(
    train_pairs: Sequence[PairArrays | Mapping[str, Any]],
    val_pairs: Sequence[PairArrays | Mapping[str, Any]],
    spec: LongitudinalSpec | Mapping[str, Any],
    out_dir: str | Path,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    progress: bool | Progress | None = None,
    pretrain_volumes: Sequence[Mapping[str, Any]] | None = None,
    *,
    until_epoch: int | None = None,
) -> dict[str, Any]:
    """Train (or continue training) the siamese network of ``spec`` on ``train_pairs``, select it on
    ``val_pairs`` (module docstring); write ``out_dir/{last.pt, best.pt, history.tsv}``.

    ``progress``: None or True: one line per epoch on stderr (and a bar on a terminal); False: silent;
    or a :class:`~mrflesion.learn.progress.Progress`. ``pretrain_volumes``: single FLAIRs with all their
    lesions (mappings id, image, brain, target, voxel_mm) for ``spec.pretrain_epochs``. ``until_epoch``:
    stop after this many main epochs (total, not added) in this call; the schedule still runs to
    ``spec.epochs``, so a training cut in several calls equals a straight one.

    Returns: epochs_completed (main), pretrain_epochs_completed, best_epoch, best (its validation
    figures), history, parameters, patch (fitted), paths of best.pt/last.pt/history.tsv. Raises
    :class:`~mrflesion.learn.train.Preempted` (exit code 75) after saving ``last.pt`` on SIGTERM/SIGUSR1.
    """
    spec = spec if isinstance(spec, LongitudinalSpec) else LongitudinalSpec.from_config(spec)
    tr = [as_pair(p) for p in train_pairs]
    va = [as_pair(p) for p in val_pairs]
    pre = [as_pair(v) for v in (pretrain_volumes or [])]
    if not tr:
        raise ValueError("no training pairs")
    if any(p.target is None for p in tr + va + pre):
        raise ValueError("training, validation and pre-training data all need targets")
    both = {p.id for p in tr} & {p.id for p in va}
    if both:
        raise ValueError(f"pairs in both training and validation: {sorted(both)}")
    n_pre = int(spec.pretrain_epochs) if pre else 0
    if spec.pretrain_epochs and not pre:
        raise ValueError("pretrain_epochs > 0 needs pretrain_volumes")
    n_levels = len(spec.widths)
    max_shape = np.max([p.shape for p in tr + pre], axis=0)
    patch = fit_patch(spec.patch, tuple(int(s) for s in max_shape), n_levels)
    stop_at = int(spec.epochs) if until_epoch is None else min(int(until_epoch), int(spec.epochs))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last_path, best_path, hist_path = out / "last.pt", out / "best.pt", out / "history.tsv"
    dev = resolve_device(device)
    config: dict[str, Any] = {
        "spec": spec.to_dict(),
        "patch": list(patch),
        "train": [[p.id, list(p.shape)] for p in tr],
        "val": [[p.id, list(p.shape)] for p in va],
        "pretrain": [[p.id, list(p.shape)] for p in pre],
    }
    fingerprint = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    report = progress if isinstance(progress, Progress) else Progress(progress is not False)
    stop: list[int] = []
    n_batches = -(-int(spec.patches_per_epoch) // int(spec.batch_size))
    tag = "[longitudinal]"

    with _torch_settings(dev, threads), _stop_signals(stop):
        torch.manual_seed(int(_rng(spec.seed, 0, _INIT).integers(2**62)))
        model = SiameseUNet3D.from_spec(spec, patch).to(dev)
        single = SingleTimepointNet(model).to(dev) if n_pre else None
        n_params = count_parameters(model)
        opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
        opt_pre = torch.optim.Adam(single.parameters(), lr=spec.lr) if single is not None else None
        index = [_index(p) for p in tr]
        index_pre = [_index(p) for p in pre]
        model_config = model.config()

        history: list[dict[str, Any]] = []
        best: dict[str, Any] = {"epoch": 0, "val_loss": math.inf}
        done = 0  # epochs completed, pre-training first (global count)
        position = 0  # batches done of the current epoch
        acc, n_acc = 0.0, 0
        if last_path.exists():
            ck = ckpt_io.load(last_path)
            if ck.get("format") != CHECKPOINT_FORMAT:
                raise ResumeMismatch(f"{last_path} is not a {CHECKPOINT_FORMAT} checkpoint")
            was = ck["config"]
            bad = [f"spec.{k}" for k in config["spec"] if was["spec"].get(k) != config["spec"][k]]
            bad += [k for k in config if k != "spec" and was.get(k) != config[k]]
            if bad:
                raise ResumeMismatch(
                    f"{last_path} was written with different settings ({', '.join(bad)}); "
                    "use another out_dir or remove last.pt"
                )
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            if single is not None and opt_pre is not None:
                single.decoder.load_state_dict(ck["pretrain_decoder"])
                opt_pre.load_state_dict(ck["pretrain_optimizer"])
            ckpt_io.restore_rng(ck["rng"])
            history = list(ck["history"])
            best = dict(ck["best"])
            done, position = int(ck["epochs_done"]), int(ck["position"])
            acc, n_acc = float(ck["train_acc"]), int(ck["train_acc_n"])
            report.line(f"{tag} resumed from {last_path}: epoch {done} batch {position}")

        def save_last() -> None:
            ckpt_io.atomic_save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "config": config,
                    "fingerprint": fingerprint,
                    "spec": spec.to_dict(),
                    "model_config": model_config,
                    "patch": list(patch),
                    "model": _state_dict_cpu(model),
                    "optimizer": opt.state_dict(),
                    **({"pretrain_decoder": _state_dict_cpu(single.decoder), "pretrain_optimizer": opt_pre.state_dict()}
                       if single is not None and opt_pre is not None else {}),
                    "rng": ckpt_io.capture_rng(),
                    "epochs_done": done,
                    "position": position,
                    "train_acc": acc,
                    "train_acc_n": n_acc,
                    "best": best,
                    "history": history,
                },
                last_path,
            )

        def save_best(epoch: int, val: Mapping[str, float]) -> None:
            ckpt_io.atomic_save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "spec": spec.to_dict(),
                    "model_config": model_config,
                    "patch": list(patch),
                    "model": _state_dict_cpu(model),
                    "epoch": epoch,
                    "validation": {k: float(v) for k, v in val.items()},
                    "fingerprint": fingerprint,
                    "train_ids": [p.id for p in tr],
                    "val_ids": [p.id for p in va],
                },
                best_path,
            )

        def preempt() -> None:
            save_last()
            report.line(f"{tag} signal {stop[0]}: checkpoint saved to {last_path}; exit {PREEMPTED_EXIT_CODE}")
            raise Preempted(stop[0], last_path)

        report.line(
            f"{tag} {len(tr)} training / {len(va)} validation pairs, patch {patch}, strides "
            f"{list(model.strides)}, {n_batches} batches of {spec.batch_size}/epoch, {n_params} parameters, "
            f"device {dev}" + (f", {n_pre} pre-training epochs on {len(pre)} volumes" if n_pre else "")
        )
        while done < n_pre + stop_at:
            t0 = time.monotonic()
            pretraining = done < n_pre
            phase = "pretrain" if pretraining else "main"
            epoch = done if pretraining else done - n_pre  # 0-based within the phase
            n_phase = n_pre if pretraining else int(spec.epochs)
            net: torch.nn.Module = single if pretraining else model  # type: ignore[assignment]
            optim = opt_pre if pretraining else opt
            data, idx = (pre, index_pre) if pretraining else (tr, index)
            assert net is not None and optim is not None
            lr_now = poly_lr(spec.lr, epoch, n_phase, spec.lr_power)
            for g in optim.param_groups:
                g["lr"] = lr_now
            if position == 0:
                acc, n_acc = 0.0, 0
            plan = plan_epoch(idx, n_batches * spec.batch_size, patch, spec.foreground_fraction, spec.seed, epoch,
                              _PHASE_KEY[phase])
            net.train()
            report.start(f"{phase} epoch {epoch + 1}/{n_phase}", n_batches)
            for b in range(position, n_batches):
                if stop:
                    preempt()
                rows = plan[b * spec.batch_size:(b + 1) * spec.batch_size]
                base, fol, brain, tgt, vox = _batch_arrays(data, rows, patch)
                base, fol, brain, tgt = base.to(dev), fol.to(dev), brain.to(dev), tgt.to(dev)
                if spec.augment:
                    rng = _rng(spec.seed, _PHASE_KEY[phase], epoch, _AUG, b)
                    base, fol, tgt = augment_batch(base, fol, brain, tgt, vox, spec, rng, shift=not pretraining)
                with autocast(dev):
                    outputs = net(fol) if pretraining else net(base, fol)
                loss = segmentation_loss(outputs, tgt, spec.loss)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                acc += float(loss.detach())
                n_acc += 1
                position = b + 1
                if report.wants_update():
                    report.update(position, acc / n_acc)
            if stop:
                preempt()
            row: dict[str, Any] = {"phase": phase, "epoch": epoch + 1, "train_loss": acc / max(1, n_acc)}
            nan_val = {c: math.nan for c in HISTORY_COLUMNS if c.startswith("val_")}
            last_main = not pretraining and epoch + 1 == int(spec.epochs)
            if not pretraining and va and ((epoch + 1) % spec.validate_every == 0 or last_main):
                val = validate(model, va, spec, patch, dev)
            else:
                val = nan_val
            row.update(val)
            row["lr"] = lr_now
            row["seconds"] = time.monotonic() - t0
            history.append(row)
            done, position, acc, n_acc = done + 1, 0, 0.0, 0
            improved = False
            if not pretraining and ((va and _better(val, best, f"val_{spec.selection}")) or not va):
                best = {"epoch": epoch + 1, **{k: float(v) for k, v in val.items()}}
                save_best(epoch + 1, val)
                improved = True
            save_last()
            _write_history(hist_path, history)
            shown = "" if math.isnan(val["val_loss"]) else (
                f" val {val['val_loss']:.4g} sens {val['val_sensitivity']:.3f} fp/case {val['val_fp_per_case']:.2f}"
                f" F1 {val['val_f1']:.3f} MSSEG-F1 {val['val_msseg_f1']:.3f}"
            )
            report.line(
                f"{tag} {phase} epoch {epoch + 1}/{n_phase} train {row['train_loss']:.4g}{shown}"
                f" lr {lr_now:.3g} {row['seconds']:.1f}s" + (" *" if improved else "")
            )
            if stop:
                preempt()
    return {
        "epochs_completed": max(0, done - n_pre),
        "pretrain_epochs_completed": min(done, n_pre),
        "best_epoch": int(best["epoch"]),
        "best": best,
        "history": history,
        "parameters": n_params,
        "patch": list(patch),
        "best_path": str(best_path),
        "last_path": str(last_path),
        "history_path": str(hist_path),
    }
