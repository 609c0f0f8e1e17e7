"""Training data from registered subjects: loading, normalisation, patch sampling, subject splits.

A subject is a set of images on one grid (T2w space): the MRF series (4D, one volume per measurement),
T1 and T2* maps (ms), NAWM and GM probabilities (0-1), the lesion mask (0/1) and the brain mask.

Normalisation (:class:`Normalisation`, stored in every checkpoint and inverted on output):

* **MRF input**: divided by a per-subject robust scale, the 99th percentile over brain voxels of the
  mean over measurements. Raw magnitudes are in arbitrary scanner units that differ between sites,
  coils and subjects; the percentile ignores a few hot voxels, and after the division brain tissue
  lies in about [0, 1] whatever the receive gain. The scale comes from the subject's own data, so
  inference needs no stored constant beyond the percentile. With ``mrf_scaling: measurement``, each
  measurement is instead divided by its own median over the brain (normal-appearing tissue, mostly
  white matter, then lies near 1 in every measurement): a site whose sequence timing differs (e.g. an
  SMS site, whose shorter TR and slot timing change every measurement's level) then shows a lesion as
  the same kind of departure from its surroundings as the other sites (docs/lesion-training.md).
* **T1**: seconds (ms / 1000). Tissue 0.8-1.8, lesions up to ~2.5, CSF ~4 (dictionary maximum 3.5 s):
  the same order as the probabilities, so no channel dominates the joint 5-output loss.
* **T2***: ms / 100, clipped at **300 ms** (target at most 3). WM/GM/lesions lie at 40-150 ms (0.4-1.5)
  while CSF reaches 1000-2500 ms. Unclipped, CSF voxels (targets 10-25) would dominate any MSE/MAE by
  two orders of magnitude and the network would spend its capacity on them. Their reference values are
  also unreliable: with echo times of 16-76.5 ms a T2* of 1000 ms changes the signal by only ~6 %
  across the schedule, so the dictionary match of CSF T2* is close to noise. 300 ms is twice the
  highest lesion value, so no tissue is affected. Outputs are therefore at most 300 ms; read a
  predicted 300 ms as "300 ms or more (CSF-like)". Training-time T2* deviations are computed against
  the clipped reference.
* **NAWM, GM, lesion**: probabilities in [0, 1] (NaN -> 0, clipped).
* **Tissue priors** (networks with ``priors: true``): the MNI152 GM, WM and CSF priors as the tissue
  stage warps them to the subject, three more input channels after the MRF series (or the maps), as
  they are (0-1). They tell the network where white matter is expected: on the phantom a lesion's T1
  and T2* lie in grey matter's range, and without them large lesions were taken for grey matter
  (docs/lesion-training.md).
* T1 and T2* targets are set to 0 outside the brain mask (background is a learnable constant instead
  of registration leftovers). The MSE-2-1 variant reads the T1 and T2* maps with the same scaling.

Slices are 2D axial: the axis of the voxel grid closest to superior-inferior (from the affine).
The patch sampler draws, per epoch, ``patches_per_slice`` random square patches from every slice that
contains brain, and ``lesion_factor`` (5) times as many from slices that contain lesion (the paper's
"lesion slices x5"); everything is derived from ``(seed, epoch)`` so an epoch's patches do not depend
on the history of the process.

**Lesion-aware sampling** (foreground oversampling, as nnU-Net does for a third of its patches):
with ``lesion_share`` > 0, that share of every mini-batch (rounded, the same count in each batch) is
centred on a lesion voxel, with a uniform jitter of up to a quarter of the patch size in each in-plane
direction; the rest are the random patches above. The lesion voxel is drawn with weight
1 / (voxels of its 3D lesion), so every lesion is drawn equally often whatever its size (small lesions
are the hard ones). On the demo, lesion voxels are well under 1 % of a random patch: without this the
lesion channel sees too few positives to learn (docs/lesion-training.md).

**Augmentation** (:func:`augment_batch`, training only, seeded by (seed, epoch, batch)): per patch a
random flip of each in-plane axis, a rotation by up to ``rotate_deg`` (bilinear, zero outside),
for MRF inputs an intensity scale in [1 - scale, 1 + scale] (raw magnitudes have no absolute scale) and
additive Gaussian noise of sd ``noise`` (inputs are ~[0, 1] after normalisation); the targets get
the same flips and rotation, never the intensity changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from .spec import MAP_INPUT_NAMES, OUTPUT_NAMES, PRIOR_NAMES, NetworkSpec
from .split import CONTROL_VALUES, split_subjects  # noqa: F401

# ---------------------------------------------------------------------------------------- normalisation

#: How the MRF input is scaled (:attr:`Normalisation.mrf_scaling`).
MRF_SCALINGS = ("subject", "measurement")


@dataclass(frozen=True)
class Normalisation:
    """Scaling of inputs and targets (see the module docstring)."""

    mrf_percentile: float = 99.0
    t1_scale_ms: float = 1000.0
    t2s_scale_ms: float = 100.0
    t2s_max_ms: float = 300.0
    mrf_scaling: str = "subject"

    def __post_init__(self) -> None:
        if self.mrf_scaling not in MRF_SCALINGS:
            raise ValueError(f"mrf_scaling must be one of {MRF_SCALINGS}, got {self.mrf_scaling!r}")

    def mrf_scale(self, mrf: np.ndarray, brain: np.ndarray | None) -> float:
        """Robust per-subject scale of an MRF series (spatial..., measurements)."""
        mean = np.nan_to_num(np.asarray(mrf, dtype=np.float64)).mean(axis=-1)
        vals = mean[brain] if brain is not None and brain.any() else mean[mean > 0]
        if vals.size == 0:
            return 1.0
        s = float(np.percentile(vals, self.mrf_percentile))
        return s if s > 0 and np.isfinite(s) else 1.0

    def mrf_divisor(self, mrf: np.ndarray, brain: np.ndarray | None) -> np.ndarray:
        """What the MRF series is divided by, broadcast over its last (measurement) axis.

        ``subject``: the scalar :meth:`mrf_scale`. ``measurement``: each measurement's median over the
        brain (a measurement whose median is not positive falls back to the subject scale).
        """
        scale = self.mrf_scale(mrf, brain)
        if self.mrf_scaling == "subject":
            return np.full(np.shape(mrf)[-1], scale, dtype=np.float32)
        a = np.nan_to_num(np.asarray(mrf, dtype=np.float32))
        vals = a[brain] if brain is not None and brain.any() else a.reshape(-1, a.shape[-1])
        med = np.median(vals, axis=0).astype(np.float64)
        ok = np.isfinite(med) & (med > 0)
        return np.where(ok, med, scale).astype(np.float32)

    def encode(self, name: str, phys: np.ndarray) -> np.ndarray:
        """Physical units (ms, probability) -> network units."""
        a = np.nan_to_num(np.asarray(phys, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        if name == "T1":
            return np.clip(a, 0.0, None) / np.float32(self.t1_scale_ms)
        if name == "T2star":
            return np.clip(a, 0.0, self.t2s_max_ms) / np.float32(self.t2s_scale_ms)
        if name in ("NAWM", "GM", "lesion"):
            return np.clip(a, 0.0, 1.0)
        raise KeyError(name)

    def decode(self, name: str, net: np.ndarray) -> np.ndarray:
        """Network units -> physical units (T1/T2* in ms, probabilities clipped to [0, 1])."""
        a = np.asarray(net, dtype=np.float32)
        if name == "T1":
            return np.clip(a, 0.0, None) * np.float32(self.t1_scale_ms)
        if name == "T2star":
            return np.clip(a * np.float32(self.t2s_scale_ms), 0.0, self.t2s_max_ms)
        if name in ("NAWM", "GM", "lesion"):
            return np.clip(a, 0.0, 1.0)
        raise KeyError(name)

    def to_dict(self) -> dict[str, float | str]:
        return {k: v if isinstance(v, str) else float(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Normalisation:
        return cls(**{k: str(v) if k == "mrf_scaling" else float(v) for k, v in (d or {}).items()})


# ---------------------------------------------------------------------------------------- subjects

_PATH_KEYS = {
    "mrf": "mrf",
    "t1": "T1",
    "t2star": "T2star",
    "nawm": "NAWM",
    "gm": "GM",
    "lesion": "lesion",
    "mask": "mask",
    "brain_mask": "mask",
    "brain": "mask",
    "t2s": "T2star",
    **{k.lower(): k for k in PRIOR_NAMES},
}


@dataclass(frozen=True)
class SubjectPaths:
    """Image paths of one registered subject; keys of ``images``: mrf, T1, T2star, NAWM, GM, lesion, mask,
    GMprior, WMprior, CSFprior."""

    subject: str
    images: Mapping[str, str | Path] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], subject: str | None = None) -> SubjectPaths:
        """Keys in any case (``T2star``/``t2s``, ``mask``/``brain_mask``); ``subject``/``id`` names it."""
        images: dict[str, str | Path] = {}
        sid = subject
        for k, v in d.items():
            lk = str(k).lower()
            if lk in ("subject", "id", "participant_id"):
                sid = sid or str(v)
            elif lk in _PATH_KEYS:
                if v is not None:
                    images[_PATH_KEYS[lk]] = v
            elif lk not in ("site", "group", "session"):
                raise KeyError(f"unknown subject image key {k!r}")
        if sid is None:
            sid = Path(str(images.get("mrf", images.get("T1", "subject")))).name.split("_")[0]
        return cls(subject=str(sid), images=images)

    def __getitem__(self, key: str) -> Path:
        if key not in self.images:
            raise KeyError(f"subject {self.subject}: no {key!r} image given")
        return Path(self.images[key])

    def to_dict(self) -> dict[str, str]:
        return {"subject": self.subject, **{k: str(v) for k, v in self.images.items()}}


def as_subject_paths(s: SubjectPaths | Mapping[str, Any]) -> SubjectPaths:
    return s if isinstance(s, SubjectPaths) else SubjectPaths.from_dict(s)


def axial_axis(affine: np.ndarray) -> int:
    """Voxel axis closest to superior-inferior (2 for the usual RAS/LPS-like storage)."""
    codes = nib.aff2axcodes(affine)
    for i, c in enumerate(codes[:3]):
        if c in ("S", "I"):
            return i
    return 2


@dataclass
class SubjectData:
    """One subject in slice-major layout: arrays are (Z, H, W[, C]) with Z the axial axis."""

    subject: str
    inputs: np.ndarray  # (Z, H, W, C_in) float32, normalised
    targets: np.ndarray | None  # (Z, H, W, C_out) float32, normalised
    brain: np.ndarray  # (Z, H, W) bool
    lesion: np.ndarray | None  # (Z, H, W) bool, for lesion-slice weighting
    axis: int
    affine: np.ndarray
    mrf_scale: float

    @property
    def n_slices(self) -> int:
        return int(self.inputs.shape[0])

    def to_volume(self, slices: np.ndarray) -> np.ndarray:
        """(Z, H, W[, C]) -> the subject's voxel grid (X, Y, Z[, C])."""
        return np.moveaxis(slices, 0, self.axis)


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


def _slice_major(vol: np.ndarray, axis: int) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(vol, axis, 0))


def load_subject(
    paths: SubjectPaths | Mapping[str, Any],
    spec: NetworkSpec,
    norm: Normalisation | None = None,
    with_targets: bool = True,
) -> SubjectData:
    """Load and normalise one subject for ``spec`` (targets only when ``with_targets``)."""
    p = as_subject_paths(paths)
    norm = norm or Normalisation()
    brain_raw, affine = _load(p["mask"])
    brain_vol = np.nan_to_num(brain_raw) > 0.5
    axis = axial_axis(affine)
    cache: dict[str, np.ndarray] = {}

    def phys(name: str) -> np.ndarray:
        if name not in cache:
            a, _ = _load(p[name])
            if a.shape[:3] != brain_vol.shape:
                raise ValueError(
                    f"{p.subject}: {name} grid {a.shape[:3]} differs from the mask {brain_vol.shape}"
                )
            cache[name] = a
        return cache[name]

    scale = 1.0
    if spec.uses_mrf:
        mrf = phys("mrf")
        if mrf.ndim != 4:
            raise ValueError(f"{p.subject}: MRF series must be 4D, got shape {mrf.shape}")
        divisor = norm.mrf_divisor(mrf, brain_vol)
        scale = float(np.mean(divisor))
        x = np.nan_to_num(mrf) / divisor
    else:
        x = np.stack([norm.encode(n, phys(n)) for n in spec.inputs], axis=-1)  # type: ignore[union-attr]
    if spec.priors:  # probabilities, as they are (0-1)
        pri = [np.clip(np.nan_to_num(phys(k)), 0.0, 1.0) for k in PRIOR_NAMES]
        x = np.concatenate([x, np.stack(pri, axis=-1)], axis=-1)
    inputs = _slice_major(x.astype(np.float32, copy=False), axis)

    targets = None
    if with_targets:
        ys = []
        for name in spec.outputs:
            t = norm.encode(name, phys(name))
            if name in MAP_INPUT_NAMES:
                t = t * brain_vol
            ys.append(t)
        targets = _slice_major(np.stack(ys, axis=-1).astype(np.float32, copy=False), axis)
    lesion = None
    if "lesion" in p.images:
        lesion = _slice_major(np.nan_to_num(phys("lesion")) > 0.5, axis)
    return SubjectData(
        subject=p.subject,
        inputs=inputs,
        targets=targets,
        brain=_slice_major(brain_vol, axis),
        lesion=lesion,
        axis=axis,
        affine=affine,
        mrf_scale=float(scale),
    )


# ---------------------------------------------------------------------------------------- patches


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (e.g. seed, epoch, stream), independent of process history."""
    st = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return int((int(st[0]) << 31) ^ int(st[1])) & ((1 << 63) - 1)


class SliceDataset:
    """Every brain-containing axial slice of a set of subjects, stacked as (N, H, W, C_in + C_out).

    Slices are zero-padded at the bottom/right to the largest H, W of the set and at least to
    ``patch_size``; patches are drawn only from each slice's own (padded) extent.
    """

    def __init__(
        self,
        subjects: Sequence[SubjectData],
        patch_size: int = 64,
        device: torch.device | str = "cpu",
        storage_dtype: torch.dtype = torch.float32,
    ) -> None:
        if not subjects:
            raise ValueError("no subjects")
        if any(s.targets is None for s in subjects):
            raise ValueError("training subjects need targets")
        self.patch_size = int(patch_size)
        self.n_in = int(subjects[0].inputs.shape[-1])
        self.n_out = int(subjects[0].targets.shape[-1])  # type: ignore[union-attr]
        meta = []
        for si, s in enumerate(subjects):
            if s.inputs.shape[-1] != self.n_in:
                raise ValueError(f"{s.subject}: {s.inputs.shape[-1]} input channels, expected {self.n_in}")
            for z in range(s.n_slices):
                if s.brain[z].any():
                    has_lesion = bool(s.lesion[z].any()) if s.lesion is not None else False
                    meta.append((si, z, has_lesion, s.inputs.shape[1], s.inputs.shape[2]))
        if not meta:
            raise ValueError("no slice contains brain")
        hmax = max(self.patch_size, max(m[3] for m in meta))
        wmax = max(self.patch_size, max(m[4] for m in meta))
        stack = np.zeros((len(meta), hmax, wmax, self.n_in + self.n_out), dtype=np.float32)
        for i, (si, z, _, h, w) in enumerate(meta):
            s = subjects[si]
            stack[i, :h, :w, : self.n_in] = s.inputs[z]
            stack[i, :h, :w, self.n_in :] = s.targets[z]  # type: ignore[index]
        self.lesion_points, self.lesion_weights = _lesion_points(subjects, meta)
        self.subject_index = np.array([m[0] for m in meta], dtype=np.int64)
        self.z = np.array([m[1] for m in meta], dtype=np.int64)
        self.has_lesion = np.array([m[2] for m in meta], dtype=bool)
        self.extent = np.array([[max(m[3], self.patch_size), max(m[4], self.patch_size)] for m in meta])
        self.device = torch.device(device)
        self.stack = torch.from_numpy(stack).to(self.device, storage_dtype)
        self._arange = torch.arange(self.patch_size, device=self.device)

    def __len__(self) -> int:
        return int(self.stack.shape[0])

    def patches(self, plan: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather patches for rows (slice, y0, x0) of ``plan``: (B, C_in, P, P), (B, C_out, P, P) float32."""
        idx = torch.as_tensor(plan, device=self.device)
        rows = idx[:, 1:2] + self._arange[None, :]
        cols = idx[:, 2:3] + self._arange[None, :]
        p = self.stack[idx[:, 0, None, None], rows[:, :, None], cols[:, None, :]]  # (B, P, P, C)
        p = p.permute(0, 3, 1, 2).float()
        if self.device.type == "cpu":
            p = p.contiguous()
        return p[:, : self.n_in], p[:, self.n_in :]


def _lesion_points(subjects: Sequence[SubjectData], meta: Sequence[tuple]) -> tuple[np.ndarray, np.ndarray]:
    """(K, 3) int64 rows (dataset slice, y, x) of every lesion voxel on a dataset slice, and sampling
    weights 1 / (voxels of the voxel's 3D lesion, 26-connected), normalised to sum 1."""
    from scipy import ndimage

    row_of = [np.full(s.n_slices, -1, dtype=np.int64) for s in subjects]  # subject slice -> dataset row
    for i, m in enumerate(meta):
        row_of[m[0]][m[1]] = i
    points, weights = [], []
    for si, s in enumerate(subjects):
        if s.lesion is None or not s.lesion.any():
            continue
        labels, n = ndimage.label(s.lesion, structure=np.ones((3, 3, 3), bool))
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        z, y, x = np.nonzero(labels)
        rows = row_of[si][z]
        keep = rows >= 0
        points.append(np.stack([rows[keep], y[keep], x[keep]], axis=1))
        weights.append(1.0 / sizes[labels[z[keep], y[keep], x[keep]]])
    if not points:
        return np.zeros((0, 3), np.int64), np.zeros(0)
    w = np.concatenate(weights)
    return np.concatenate(points).astype(np.int64), w / w.sum()


class PatchSampler:
    """Deterministic per-epoch patch plan, and the position within the current epoch.

    The plan of epoch ``e`` comes from ``numpy.random.default_rng(SeedSequence([seed, e, 1]))`` alone, so
    the only state to checkpoint is (seed, epoch, position) -- see :meth:`state_dict`. With
    ``lesion_share`` > 0, ``round(lesion_share * batch_size)`` patches of every batch are centred on
    lesion voxels (see the module docstring).
    """

    def __init__(
        self,
        dataset: SliceDataset,
        batch_size: int = 64,
        patches_per_slice: int = 64,
        lesion_factor: int = 5,
        seed: int = 0,
        lesion_share: float = 0.0,
    ) -> None:
        if not 0.0 <= float(lesion_share) <= 1.0:
            raise ValueError(f"lesion_share must be in [0, 1], got {lesion_share}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.patches_per_slice = int(patches_per_slice)
        self.lesion_factor = int(lesion_factor)
        self.seed = int(seed)
        self.lesion_share = float(lesion_share)
        self.epoch = 0
        self.position = 0
        self._plan: tuple[int, np.ndarray] | None = None

    def weights(self) -> np.ndarray:
        return np.where(self.dataset.has_lesion, self.lesion_factor, 1).astype(np.int64)

    def plan(self, epoch: int) -> np.ndarray:
        """(N, 3) int64 rows (slice, y0, x0) in the order they are used in ``epoch``."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, int(epoch), 1]))
        counts = self.weights() * self.patches_per_slice
        sl = np.repeat(np.arange(len(self.dataset), dtype=np.int64), counts)
        ext = self.dataset.extent[sl] - self.dataset.patch_size + 1
        y0 = np.floor(rng.random(sl.size) * ext[:, 0]).astype(np.int64)
        x0 = np.floor(rng.random(sl.size) * ext[:, 1]).astype(np.int64)
        order = rng.permutation(sl.size)
        plan = np.stack([sl, y0, x0], axis=1)[order]
        per_batch = self.lesion_per_batch()
        if per_batch:
            plan = self._mix_lesion_patches(plan, per_batch, rng)
        self._plan = (int(epoch), plan)
        return plan

    def lesion_per_batch(self) -> int:
        """Lesion-centred patches in every batch (0 without lesion voxels in the training set)."""
        if not len(self.dataset.lesion_points):
            return 0
        return int(round(self.lesion_share * self.batch_size))

    def _mix_lesion_patches(self, plan: np.ndarray, per_batch: int, rng: np.random.Generator) -> np.ndarray:
        """Replace the first ``per_batch`` rows of every batch by lesion-centred patches."""
        ds = self.dataset
        p = ds.patch_size
        starts = np.arange(0, plan.shape[0], self.batch_size)
        pos = (starts[:, None] + np.arange(per_batch)[None, :]).ravel()
        pos = pos[pos < plan.shape[0]]
        pick = rng.choice(len(ds.lesion_points), size=pos.size, p=ds.lesion_weights)
        centre = ds.lesion_points[pick]
        jitter = rng.integers(-(p // 4), p // 4 + 1, size=(pos.size, 2))
        ext = ds.extent[centre[:, 0]] - p
        y0 = np.clip(centre[:, 1] - p // 2 + jitter[:, 0], 0, ext[:, 0])
        x0 = np.clip(centre[:, 2] - p // 2 + jitter[:, 1], 0, ext[:, 1])
        plan = plan.copy()
        plan[pos] = np.stack([centre[:, 0], y0, x0], axis=1)
        return plan

    def n_patches(self, epoch: int | None = None) -> int:
        return int((self.weights() * self.patches_per_slice).sum())

    def n_batches(self) -> int:
        return -(-self.n_patches() // self.batch_size)

    def set_epoch(self, epoch: int, position: int = 0) -> None:
        self.epoch = int(epoch)
        self.position = int(position)

    def batches(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield (batch index, x, y) from the current position; advance ``position`` with :meth:`advance`."""
        plan = self.plan(self.epoch)
        for b in range(self.position, self.n_batches()):
            x, y = self.dataset.patches(plan[b * self.batch_size : (b + 1) * self.batch_size])
            yield b, x, y

    def advance(self) -> None:
        self.position += 1

    def state_dict(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "batch_size": self.batch_size,
            "patches_per_slice": self.patches_per_slice,
            "lesion_factor": self.lesion_factor,
            "lesion_share": self.lesion_share,
            "patch_size": self.dataset.patch_size,
            "n_slices": len(self.dataset),
        }

    def load_state_dict(self, d: Mapping[str, int]) -> None:
        mine = self.state_dict()
        for k in ("seed", "batch_size", "patches_per_slice", "lesion_factor", "lesion_share", "patch_size",
                  "n_slices"):
            if k in d and float(d[k]) != float(mine[k]):
                raise ValueError(f"sampler state mismatch for {k}: checkpoint {d[k]}, now {mine[k]}")
        self.set_epoch(int(d["epoch"]), int(d["position"]))


# ---------------------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class Augmentation:
    """Augmentation of training patches (see the module docstring); ``enabled=False`` is the paper's
    training (none)."""

    enabled: bool = False
    flip: bool = True
    rotate_deg: float = 10.0
    scale: float = 0.1
    noise: float = 0.02

    @classmethod
    def from_config(cls, value: bool | Mapping[str, Any] | None) -> Augmentation:
        """``true``/``false`` or a mapping of the fields (``enabled`` defaults to true then)."""
        if isinstance(value, Mapping):
            return cls(**{"enabled": True, **dict(value)})
        return cls(enabled=bool(value))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def augment_batch(
    x: torch.Tensor, y: torch.Tensor, aug: Augmentation, generator: torch.Generator, intensity: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented copies of a batch ``x`` (B, C_in, P, P) and ``y`` (B, C_out, P, P); ``intensity``:
    apply the intensity scale (MRF inputs only). Deterministic for the generator's state."""
    if not aug.enabled:
        return x, y
    b = x.shape[0]
    dev = x.device
    u = torch.rand(b, 5, generator=generator).to(dev)
    n_in = x.shape[1]
    xy = torch.cat([x, y], dim=1)
    if aug.flip:
        fy, fx = u[:, 0] < 0.5, u[:, 1] < 0.5
        xy = torch.where(fy[:, None, None, None], xy.flip(2), xy)
        xy = torch.where(fx[:, None, None, None], xy.flip(3), xy)
    if aug.rotate_deg > 0:
        ang = (2.0 * u[:, 2] - 1.0) * math.radians(aug.rotate_deg)
        c, s = torch.cos(ang), torch.sin(ang)
        zero = torch.zeros_like(c)
        theta = torch.stack([torch.stack([c, -s, zero], 1), torch.stack([s, c, zero], 1)], 1)
        grid = F.affine_grid(theta.to(xy.dtype), list(xy.shape), align_corners=False)
        xy = F.grid_sample(xy, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x, y = xy[:, :n_in], xy[:, n_in:]
    if intensity and aug.scale > 0:
        x = x * (1.0 + aug.scale * (2.0 * u[:, 3] - 1.0))[:, None, None, None]
    if aug.noise > 0:
        x = x + aug.noise * torch.randn(x.shape, generator=generator).to(dev)
    return x.contiguous(), y.contiguous()


# ---------------------------------------------------------------------------------------- splits

__all__ = [
    "OUTPUT_NAMES",
    "Augmentation",
    "augment_batch",
    "Normalisation",
    "PatchSampler",
    "SliceDataset",
    "SubjectData",
    "SubjectPaths",
    "as_subject_paths",
    "axial_axis",
    "derive_seed",
    "load_subject",
    "split_subjects",
]
