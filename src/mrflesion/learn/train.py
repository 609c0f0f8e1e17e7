"""Training of one network variant, resumable and preemption-safe (inference: :mod:`mrflesion.learn.infer`).

* Adam (lr 1e-4), halved every 20 epochs (StepLR, stepped per epoch). Mini-batches of random patches
  (:class:`~mrflesion.learn.data.PatchSampler`).
* CUDA: bf16 autocast, channels-last, training data stored on the GPU in float16. CPU: float32, seeded
  and deterministic (``torch.use_deterministic_algorithms(True)``).
* ``out_dir/history.tsv``: one row per epoch (losses per output, validation metrics, lr, seconds).
  ``out_dir/best.pt``: the weights with the lowest validation loss (model selection uses validation
  data only) plus spec and normalisation, enough for :func:`mrflesion.learn.infer.infer_subject`.
* Validation operating point: when training ends, the lesion threshold that maximises the pooled
  lesion Dice of the validation subjects (against their lesion masks, thresholds 0.01-0.99), then the
  minimum lesion size that maximises their lesion-wise F1 (:func:`choose_threshold`), are stored in
  ``best.pt`` (``lesion_threshold``) beside the paper's 33 %. Test subjects never reach training, model
  selection or this choice.
* Resume: ``out_dir/last.pt`` is written atomically after every epoch and on preemption; it holds the
  weights, optimizer, scheduler, RNG states (python, numpy, torch), sampler state (seed, epoch, position
  in the epoch), the partial epoch's loss sums, the best metric and the history. Calling :func:`train`
  again with the same ``out_dir`` continues from it. Per-epoch randomness (patch plan, dropout) is
  seeded from ``(seed, epoch)``, so e.g. 2 epochs + resume to 4 is bit-identical to 4 straight (CPU).
* Preemption: on SIGTERM or SIGUSR1 (SLURM) the current batch is finished, ``last.pt`` is written and
  :class:`Preempted` is raised -- a ``SystemExit`` with code :data:`PREEMPTED_EXIT_CODE` = 75
  (``EX_TEMPFAIL``: "temporary failure, try again"). 75 differs from a plain SIGTERM death (143) and from
  SIGKILL (137), so a wrapper can tell "checkpoint saved, requeue me" from a crash.

Command line: ``python -m mrflesion.learn.train config.json`` with a JSON object holding the arguments
of :func:`train` (``spec`` as a dict, subjects as lists of path dicts).
"""

from __future__ import annotations

import csv
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..device import autocast, resolve_device
from . import checkpoint as ckpt_io
from .data import (
    Augmentation,
    Normalisation,
    PatchSampler,
    SliceDataset,
    SubjectData,
    SubjectPaths,
    as_subject_paths,
    augment_batch,
    derive_seed,
    load_subject,
)
from .infer import load_model, predict_slices
from .losses import Loss, make_loss
from .networks import NetworkSpec, UNet, count_parameters
from .progress import Progress

PREEMPTED_EXIT_CODE = 75
CHECKPOINT_FORMAT = "mrflesion-unet-1"
LESION_THRESHOLD = 0.33
TISSUE_THRESHOLD = 0.80
class Preempted(SystemExit):
    """Raised after the checkpoint is saved on SIGTERM/SIGUSR1; exits the process with code 75."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.signum = signum
        self.checkpoint = checkpoint


class ResumeMismatch(ValueError):
    """``last.pt`` was written with different settings than this call's."""


@contextmanager
def _stop_signals(flag: list[int]):
    """Install SIGTERM/SIGUSR1 handlers that only record the signal (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [signal.SIGTERM] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])

    def handler(signum: int, _frame: Any) -> None:
        flag.append(signum)

    old = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def _torch_settings(device: torch.device, num_threads: int | None):
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_bench = torch.backends.cudnn.benchmark
    try:
        if num_threads:
            torch.set_num_threads(int(num_threads))
        if device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:
            torch.backends.cudnn.benchmark = True
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.backends.cudnn.benchmark = old_bench


def _weight_average(model: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """Exponential moving average of ``model``'s weights and buffers (batch-norm statistics), or None
    for ``decay`` 0."""
    if not decay:
        return None
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema decay must be in (0, 1), got {decay}")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _state_dict_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def evaluate(
    model: UNet,
    subjects: Sequence[SubjectData],
    spec: NetworkSpec,
    loss: Loss,
    norm: Normalisation,
    device: torch.device,
    batch_slices: int = 8,
) -> dict[str, float]:
    """Validation loss per output over all brain slices, and the method's metrics (mean over subjects)."""
    stats: torch.Tensor | None = None
    per: dict[str, list[float]] = {
        k: [] for k in ("dice_lesion", "mrd_T1", "mrd_T2star", "dice_NAWM", "dice_GM")
    }
    for s in subjects:
        if s.targets is None:
            raise ValueError(f"validation subject {s.subject} has no targets")
        keep = s.brain.reshape(s.n_slices, -1).any(axis=1)
        raw = torch.from_numpy(predict_slices(model, s.inputs[keep], device, batch_slices, logits=True))
        raw = raw.permute(0, 3, 1, 2)
        pred_t = model.activate(raw)
        pred = pred_t.permute(0, 2, 3, 1).numpy()
        tgt = s.targets[keep]
        brain = s.brain[keep]
        st = loss.stats(
            (raw if loss.wants_logits else pred_t).double(),
            torch.from_numpy(tgt).permute(0, 3, 1, 2).double(),
        )
        stats = st if stats is None else stats + st
        for c, name in enumerate(spec.outputs):
            p = norm.decode(name, pred[..., c])[brain]
            r = norm.decode(name, tgt[..., c])[brain]
            if name == "lesion":
                per["dice_lesion"].append(_dice(p >= LESION_THRESHOLD, r >= 0.5))
            elif name in ("NAWM", "GM"):
                per[f"dice_{name}"].append(_dice(p >= TISSUE_THRESHOLD, r >= TISSUE_THRESHOLD))
            else:
                ok = r > 0
                if ok.any():
                    per[f"mrd_{name}"].append(float(np.mean(np.abs(p[ok] - r[ok]) / r[ok])))
    assert stats is not None
    vals = loss.from_stats(stats).tolist()
    res: dict[str, float] = {f"val_loss_{n}": float(v) for n, v in zip(spec.outputs, vals, strict=True)}
    res["val_loss"] = float(np.mean(vals))
    res["val_dice_lesion_33"] = float(np.mean(per["dice_lesion"])) if per["dice_lesion"] else math.nan
    res["val_mrd_T1"] = float(np.mean(per["mrd_T1"])) if per["mrd_T1"] else math.nan
    res["val_mrd_T2star"] = float(np.mean(per["mrd_T2star"])) if per["mrd_T2star"] else math.nan
    res["val_dice_NAWM_80"] = float(np.mean(per["dice_NAWM"])) if per["dice_NAWM"] else math.nan
    res["val_dice_GM_80"] = float(np.mean(per["dice_GM"])) if per["dice_GM"] else math.nan
    return res


def choose_threshold(
    model: UNet, subjects: Sequence[SubjectData], spec: NetworkSpec, device: torch.device, batch_slices: int = 8
) -> dict[str, float] | None:
    """The lesion operating point on ``subjects`` (validation subjects: never test ones) against their
    lesion masks (:func:`mrflesion.evaluate.choose_operating_point`: the threshold 0.01-0.99 maximising
    the pooled Dice, then the minimum lesion size maximising the lesion-wise F1). Returns
    ``{"threshold", "dice", "min_lesion_ml", "f1"}``, or None when the network has no lesion output or
    the subjects no lesion."""
    from ..evaluate.lesionwise import choose_operating_point
    from ..evaluate.metrics import voxel_volume_ml

    if "lesion" not in spec.outputs:
        return None
    c = spec.outputs.index("lesion")
    cases = []
    for s in subjects:
        if s.lesion is None:
            continue
        prob = predict_slices(model, s.inputs, device, batch_slices)[..., c] * s.brain
        cases.append((prob, s.lesion, voxel_volume_ml(np.sqrt((s.affine[:3, :3] ** 2).sum(axis=0)))))
    return choose_operating_point(cases)


def history_columns(spec: NetworkSpec) -> list[str]:
    return (
        ["epoch", "train_loss"]
        + [f"train_loss_{o}" for o in spec.outputs]
        + ["val_loss"]
        + [f"val_loss_{o}" for o in spec.outputs]
        + [
            "val_dice_lesion_33",
            "val_mrd_T1",
            "val_mrd_T2star",
            "val_dice_NAWM_80",
            "val_dice_GM_80",
            "lr",
            "seconds",
        ]
    )


def _write_history(path: Path, spec: NetworkSpec, history: list[dict[str, float]]) -> None:
    cols = history_columns(spec)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh, delimiter="\t", lineterminator="\n")
        w.writerow(cols)
        for row in history:
            w.writerow([int(row[c]) if c == "epoch" else f"{row[c]:.8g}" for c in cols])
    tmp.replace(path)


# ---------------------------------------------------------------------------------------- training


def train(
    spec: NetworkSpec | Mapping[str, Any],
    train_subjects: Sequence[SubjectPaths | Mapping[str, Any]],
    val_subjects: Sequence[SubjectPaths | Mapping[str, Any]],
    out_dir: str | Path,
    epochs: int,
    batch_size: int = 64,
    lr: float = 1e-4,
    lr_halve_every: int = 20,
    patches_per_slice: int = 64,
    patch_size: int = 64,
    seed: int = 0,
    device: str | torch.device = "auto",
    widths: Sequence[int] = (32, 64, 128),
    bridge: int = 256,
    dropout: float = 0.5,
    lesion_factor: int = 5,
    normalisation: Normalisation | Mapping[str, float] | None = None,
    num_threads: int | None = None,
    progress: bool = True,
    val_batch_slices: int = 8,
    lesion_share: float = 0.0,
    augment: bool | Mapping[str, Any] = False,
    norm: str = "none",
    ema: float = 0.0,
    mrf_scaling: str = "subject",
) -> dict[str, Any]:
    """Train ``spec`` for ``epochs`` epochs in total (resuming from ``out_dir/last.pt`` if present).

    ``lesion_share``: share of every batch centred on lesion voxels; ``augment``: see
    :class:`~mrflesion.learn.data.Augmentation`; ``norm``: the U-net's normalisation layers; ``ema``:
    decay of an exponential moving average of the weights (and normalisation statistics) updated after
    every batch; when > 0 the average is what is validated, selected and saved (0 = the raw weights);
    ``mrf_scaling``: :attr:`~mrflesion.learn.data.Normalisation.mrf_scaling` (ignored when
    ``normalisation`` is given).
    Returns a summary: ``epochs_completed``, ``best_epoch``, ``best_val_loss``, ``history`` (list of
    rows), ``parameters``, ``lesion_threshold`` (validation-chosen, or None), paths of
    ``best.pt``/``last.pt``/``history.tsv``. Raises :class:`Preempted`
    (exit code 75) after saving ``last.pt`` on SIGTERM/SIGUSR1.
    """
    spec = spec if isinstance(spec, NetworkSpec) else NetworkSpec.from_dict(spec)
    norm_layers = str(norm)  # ``norm`` names the Normalisation below
    if normalisation is None:
        norm = Normalisation(mrf_scaling=str(mrf_scaling))
    elif isinstance(normalisation, Normalisation):
        norm = normalisation
    else:
        norm = Normalisation.from_dict(normalisation)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last_path, best_path, hist_path = out / "last.pt", out / "best.pt", out / "history.tsv"
    dev = resolve_device(device)
    tr_paths = [as_subject_paths(s) for s in train_subjects]
    va_paths = [as_subject_paths(s) for s in val_subjects]
    if not tr_paths or not va_paths:
        raise ValueError("training and validation subjects are both required")
    overlap = {p.subject for p in tr_paths} & {p.subject for p in va_paths}
    if overlap:
        raise ValueError(f"subjects in both training and validation: {sorted(overlap)}")
    config: dict[str, Any] = {
        "spec": spec.to_dict(),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "patches_per_slice": int(patches_per_slice),
        "patch_size": int(patch_size),
        "widths": [int(w) for w in widths],
        "bridge": int(bridge),
        "dropout": float(dropout),
        "lesion_factor": int(lesion_factor),
        "lesion_share": float(lesion_share),
        "augment": Augmentation.from_config(augment).to_dict(),
        "norm": norm_layers,
        "ema": float(ema),
        "lr": float(lr),
        "lr_halve_every": int(lr_halve_every),
        "normalisation": norm.to_dict(),
        "train_subjects": [p.subject for p in tr_paths],
        "val_subjects": [p.subject for p in va_paths],
    }
    report = Progress(progress)
    stop: list[int] = []
    with _torch_settings(dev, num_threads), _stop_signals(stop):
        train_data = [load_subject(p, spec, norm) for p in tr_paths]
        val_data = [load_subject(p, spec, norm) for p in va_paths]
        storage = torch.float16 if dev.type == "cuda" else torch.float32
        dataset = SliceDataset(train_data, patch_size, dev, storage)
        del train_data
        sampler = PatchSampler(dataset, batch_size, patches_per_slice, lesion_factor, seed, lesion_share)
        loss_fn = make_loss(spec.loss, spec.outputs)
        aug = Augmentation.from_config(augment)

        torch.manual_seed(derive_seed(seed, 0, 2))
        model = spec.build(dataset.n_in, widths, bridge, dropout, norm=norm_layers).to(dev)
        if dev.type == "cuda":
            model.to(memory_format=torch.channels_last)
        n_params = count_parameters(model)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        averaged = _weight_average(model, float(ema))
        kept = averaged.module if averaged is not None else model  # the weights validated and saved
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, int(lr_halve_every)), gamma=0.5)
        model_config = {
            "in_channels": dataset.n_in,
            "widths": list(config["widths"]),
            "bridge": int(bridge),
            "dropout": float(dropout),
            "norm": norm_layers,
        }

        history: list[dict[str, float]] = []
        best = {"val_loss": math.inf, "epoch": 0}
        epochs_done = 0
        acc = torch.zeros(len(spec.outputs), dtype=torch.float64, device=dev)
        n_acc = 0
        if last_path.exists():
            ck = ckpt_io.load(last_path)
            bad = [k for k in config if ck["config"].get(k) != config[k]]  # all but epochs and device
            if bad:
                raise ResumeMismatch(f"{last_path} was written with different settings: {bad}")
            model.load_state_dict(ck["model"])
            if averaged is not None:
                averaged.load_state_dict(ck["ema"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            sampler.load_state_dict(ck["sampler"])
            ckpt_io.restore_rng(ck["rng"])
            history = list(ck["history"])
            best = dict(ck["best"])
            epochs_done = int(ck["epochs_done"])
            acc = ck["train_acc"].to(dev)
            n_acc = int(ck["train_acc_n"])
            report.line(
                f"[{spec.name}] resumed from {last_path}: epoch {epochs_done} batch {sampler.position}"
            )
        else:
            sampler.set_epoch(0, 0)

        def save_last() -> None:
            ckpt_io.atomic_save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "config": config,
                    "spec": spec.to_dict(),
                    "model_config": model_config,
                    "normalisation": norm.to_dict(),
                    "model": _state_dict_cpu(model),
                    **({"ema": averaged.state_dict()} if averaged is not None else {}),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "sampler": sampler.state_dict(),
                    "rng": ckpt_io.capture_rng(),
                    "epochs_done": epochs_done,
                    "train_acc": acc.detach().cpu(),
                    "train_acc_n": n_acc,
                    "best": best,
                    "history": history,
                },
                last_path,
            )

        def preempt() -> None:
            save_last()
            report.line(
                f"[{spec.name}] signal {stop[0]}: checkpoint saved to {last_path}; exit {PREEMPTED_EXIT_CODE}"
            )
            raise Preempted(stop[0], last_path)

        report.line(
            f"[{spec.name}] {len(dataset)} training slices, {sampler.n_patches()} patches/epoch, "
            f"{n_params} parameters, device {dev}"
            + (f", {sampler.lesion_per_batch()} of {batch_size} patches per batch on lesions"
               if sampler.lesion_per_batch() else "")
            + (", augmented" if aug.enabled else "")
        )
        for epoch in range(epochs_done, int(epochs)):
            t0 = time.monotonic()
            if sampler.position == 0:
                sampler.set_epoch(epoch, 0)
                torch.manual_seed(derive_seed(seed, epoch, 3))
                acc = torch.zeros(len(spec.outputs), dtype=torch.float64, device=dev)
                n_acc = 0
            elif sampler.epoch != epoch:  # pragma: no cover - checkpoint invariant
                raise RuntimeError("sampler epoch does not match the checkpoint")
            model.train()
            report.start(f"epoch {epoch + 1}/{epochs}", sampler.n_batches())
            for b, x, y in sampler.batches():
                if stop:
                    preempt()
                if aug.enabled:
                    gen = torch.Generator().manual_seed(derive_seed(seed, epoch, 4, b))
                    x, y = augment_batch(x, y, aug, gen, intensity=spec.uses_mrf)
                if dev.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(dev):
                    pred = model(x, logits=loss_fn.wants_logits)
                per = loss_fn.per_channel(pred.float(), y)
                total = per.mean()
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                if averaged is not None:
                    averaged.update_parameters(model)
                acc += per.detach().double()
                n_acc += 1
                sampler.advance()
                if report.wants_update():
                    report.update(b + 1, float(total))
            if stop:
                preempt()
            lr_now = float(opt.param_groups[0]["lr"])
            train_losses = (acc / max(1, n_acc)).tolist()
            sched.step()
            val = evaluate(kept, val_data, spec, loss_fn, norm, dev, val_batch_slices)
            row: dict[str, float] = {"epoch": epoch + 1, "train_loss": float(np.mean(train_losses))}
            row.update({f"train_loss_{o}": float(v) for o, v in zip(spec.outputs, train_losses, strict=True)})
            row.update(val)
            row["lr"] = lr_now
            row["seconds"] = time.monotonic() - t0
            history.append(row)
            epochs_done = epoch + 1
            sampler.set_epoch(epochs_done, 0)
            if val["val_loss"] < best["val_loss"]:
                best = {"val_loss": float(val["val_loss"]), "epoch": epochs_done}
                ckpt_io.atomic_save(
                    {
                        "format": CHECKPOINT_FORMAT,
                        "spec": spec.to_dict(),
                        "model_config": model_config,
                        "normalisation": norm.to_dict(),
                        "model": _state_dict_cpu(kept),
                        "epoch": epochs_done,
                        "val_loss": float(val["val_loss"]),
                        "train_subjects": config["train_subjects"],
                        "val_subjects": config["val_subjects"],
                    },
                    best_path,
                )
            save_last()
            _write_history(hist_path, spec, history)
            report.line(
                f"[{spec.name}] epoch {epochs_done}/{epochs} train {row['train_loss']:.5g}"
                f" val {row['val_loss']:.5g}"
                f" dice33 {row['val_dice_lesion_33']:.3f} lr {lr_now:.3g} {row['seconds']:.1f}s"
                + (" *" if best["epoch"] == epochs_done else "")
            )
            if stop:
                preempt()
        chosen = _store_threshold(best_path, val_data, spec, dev, val_batch_slices)
    return {
        "name": spec.name,
        "epochs_completed": epochs_done,
        "best_epoch": int(best["epoch"]),
        "best_val_loss": float(best["val_loss"]),
        "history": history,
        "parameters": n_params,
        "lesion_threshold": chosen,
        "best_path": str(best_path),
        "last_path": str(last_path),
        "history_path": str(hist_path),
    }


def _store_threshold(
    best_path: Path, val_data: Sequence[SubjectData], spec: NetworkSpec, dev: torch.device, batch_slices: int
) -> dict[str, float] | None:
    """Choose the validation threshold with the best weights and record it in ``best.pt``."""
    if not best_path.exists():  # no epoch had a finite validation loss
        return None
    ck = ckpt_io.load(best_path)
    model, _, _ = load_model(ck, dev)
    chosen = choose_threshold(model, val_data, spec, dev, batch_slices)
    if ck.get("lesion_threshold") != chosen:
        ck["lesion_threshold"] = chosen
        ckpt_io.atomic_save(ck, best_path)
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mrflesion.learn.train config.json``; exit 0 when done, 75 when preempted."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m mrflesion.learn.train CONFIG.json", file=sys.stderr)
        return 2
    cfg = json.loads(Path(args[0]).read_text())
    if "widths" in cfg:
        cfg["widths"] = tuple(cfg["widths"])
    summary = train(**cfg)
    summary.pop("history", None)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
