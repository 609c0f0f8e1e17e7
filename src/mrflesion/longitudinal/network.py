"""Siamese 3D U-net for new and enlarging MS lesions between two FLAIRs (Krüger et al. 2020).

Architecture (training: :mod:`mrflesion.longitudinal.train`, inference: :mod:`.infer`):

* ONE encoder, its weights shared by the two time points: the baseline and the follow-up FLAIR (one
  channel each, in the pair's halfway space) go through the same modules, as a batch of 2N, so the
  two branches cannot drift apart and the network compares like with like.
* Encoder levels of ``widths`` features (default 16 -> 256 over four reductions), each made of
  ``blocks`` residual blocks (3x3x3 conv - instance norm (affine) - leaky ReLU (0.01), twice, with an
  identity or 1x1x1 conv skip). The first block of every level below the top downsamples with a
  strided convolution; the strides per level come from the patch size (:func:`level_strides`), so an
  axis that would drop below 4 voxels, or stop being divisible, is no longer halved (the anisotropic
  demo voxels: a 16-slice patch is pooled (2,2,2), (2,2,2), then (2,2,1)).
* At every level the features of both time points are concatenated (2C channels) and are the skip
  connection of that level; the bottleneck's concatenation starts the decoder.
* Decoder: nearest-neighbour upsampling by the same factors (``F.interpolate(mode="nearest")``), a
  3x3x3 conv (+ norm, activation) to C features, concatenation with the 2C skip, ``decoder_blocks``
  residual blocks back to C.
* Outputs: 2-class logits (background / new-or-enlarged) at full resolution and, with deep supervision,
  auxiliary 2-class logits at the next ``aux_levels`` (1 or 2) coarser decoder levels.

Optional pre-training (the seed's recipe): :class:`SingleTimepointNet` puts a small decoder (no
siamese concatenation) on the SAME encoder modules and segments all lesions of one FLAIR; the encoder
weights it learns are then those of the siamese network.

:class:`LongitudinalSpec` holds the architecture and the training settings (one config mapping).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("ce", "ce+dice")
#: Model-selection scores: pooled rule-A lesion-wise F1, or the MSSEG (rule B) detection F1.
SELECTIONS = ("f1", "msseg_f1")
#: An axis is not halved any more once it would drop below this many voxels.
MIN_LEVEL_SIZE = 4
#: Slope of the leaky ReLU (nnU-Net's).
NEG_SLOPE = 0.01

Strides = tuple[tuple[int, int, int], ...]


# ------------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class LongitudinalSpec:
    """Architecture and training settings of the longitudinal network (``from_config``/``to_dict``).

    Architecture: ``widths`` (features per level; len - 1 reductions), ``blocks`` (residual blocks per
    encoder level), ``decoder_blocks``, ``patch`` (training patch, voxels; clipped to the volumes and
    rounded up to the network's divisor by :func:`fit_patch`), ``deep_supervision``, ``aux_levels``
    (coarser decoder levels with an auxiliary output, 1 or 2). No dropout.

    Training: ``epochs``, ``batch_size``, ``patches_per_epoch`` (rounded up to whole batches), ``lr``
    (Adam) decayed per epoch as lr·(1 − e/epochs)^``lr_power``, ``foreground_fraction`` (share of the
    patches centred near a target voxel), augmentation (``augment`` master switch, ``flip`` left-right
    along axis 0, ``noise_std`` (max Gaussian noise sd, 0 = off), ``bias_field`` (amplitude of the
    log multiplicative bias field, 0 = off), ``shift_mm`` (max shift of the baseline, 0 = off)),
    ``loss`` ("ce" or "ce+dice"), ``seed``, ``pretrain_epochs`` (single-time-point pre-training of the
    encoder, 0 = off), ``validate_every`` (epochs), ``overlap`` (sliding-window overlap of validation),
    ``selection`` (the validation score that picks ``best.pt``: ``"f1"``, the pooled rule-A lesion-wise
    F1, or ``"msseg_f1"``, the pooled MSSEG detection F1; rule A counts one oversized component that
    covers every new lesion as a perfect detection, rule B does not).

    Operating point: ``threshold`` on the new-lesion probability, ``min_lesion_ml`` (smaller
    components are removed).
    """

    widths: tuple[int, ...] = (16, 32, 64, 128, 256)
    blocks: int = 1
    decoder_blocks: int = 1
    patch: tuple[int, int, int] = (128, 128, 128)
    deep_supervision: bool = True
    aux_levels: int = 2
    epochs: int = 100
    batch_size: int = 2
    patches_per_epoch: int = 250
    lr: float = 1e-4
    lr_power: float = 0.9
    foreground_fraction: float = 0.5
    augment: bool = True
    flip: bool = True
    noise_std: float = 0.05
    bias_field: float = 0.1
    shift_mm: float = 2.0
    loss: str = "ce"
    seed: int = 0
    threshold: float = 0.4
    min_lesion_ml: float = 0.01
    pretrain_epochs: int = 0
    validate_every: int = 1
    overlap: float = 0.5
    selection: str = "f1"

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "patch", tuple(int(p) for p in self.patch))
        if len(self.widths) < 2 or any(w < 1 for w in self.widths):
            raise ValueError(f"widths needs at least two positive entries, got {self.widths}")
        if len(self.patch) != 3 or any(p < 1 for p in self.patch):
            raise ValueError(f"patch needs three positive sizes, got {self.patch}")
        if self.blocks < 1 or self.decoder_blocks < 1:
            raise ValueError("blocks and decoder_blocks must be >= 1")
        if self.aux_levels not in (0, 1, 2):
            raise ValueError(f"aux_levels must be 0, 1 or 2, got {self.aux_levels}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {self.foreground_fraction}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.epochs < 1 or self.batch_size < 1 or self.patches_per_epoch < 1 or self.validate_every < 1:
            raise ValueError("epochs, batch_size, patches_per_epoch and validate_every must be >= 1")
        if self.pretrain_epochs < 0 or self.lr <= 0 or self.shift_mm < 0 or self.noise_std < 0 or self.bias_field < 0:
            raise ValueError("pretrain_epochs, lr, shift_mm, noise_std and bias_field must not be negative")

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None = None) -> LongitudinalSpec:
        """The spec from a config mapping (missing keys take the defaults; unknown keys are refused so
        that a typo cannot silently train the default)."""
        config = dict(config or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(f"unknown longitudinal network settings: {unknown}")
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in config:
                continue
            v = config[f.name]
            if f.name in ("widths", "patch"):
                v = tuple(int(x) for x in v)
            elif isinstance(f.default, bool):
                v = bool(v)
            elif isinstance(f.default, int):
                v = int(v)
            elif isinstance(f.default, float):
                v = float(v)
            else:
                v = str(v)
            kw[f.name] = v
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/checkpoint-safe dict (tuples as lists) that :meth:`from_config` reads back."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


# ------------------------------------------------------------------------------------ geometry


def _halvings(size: int, n_reductions: int, min_size: int = MIN_LEVEL_SIZE) -> int:
    """How many times an axis of ``size`` voxels can be halved (ceil) staying >= ``min_size``."""
    h = 0
    while h < n_reductions and math.ceil(size / 2 ** (h + 1)) >= min_size:
        h += 1
    return h


def level_strides(patch: Sequence[int], n_levels: int, min_size: int = MIN_LEVEL_SIZE) -> Strides:
    """Downsampling factor per reduction (``n_levels - 1`` of them) and axis for a ``patch``.

    An axis is halved while it is even and its half is at least ``min_size``; once it stops it stays at
    1 (anisotropic voxels: thin patches stop pooling z early). E.g. (48, 48, 16), 4 reductions ->
    (2,2,2), (2,2,2), (2,2,1), (1,1,1)."""
    cur = [int(p) for p in patch]
    active = [True, True, True]
    out = []
    for _ in range(n_levels - 1):
        s = []
        for a in range(3):
            ok = active[a] and cur[a] % 2 == 0 and cur[a] // 2 >= min_size
            active[a] = ok
            s.append(2 if ok else 1)
            cur[a] //= s[-1]
        out.append((s[0], s[1], s[2]))
    return tuple(out)


def divisor_of(strides: Strides) -> tuple[int, int, int]:
    """Product of the strides per axis: input sizes must be multiples of it."""
    d = [1, 1, 1]
    for s in strides:
        for a in range(3):
            d[a] *= s[a]
    return (d[0], d[1], d[2])


def fit_patch(
    patch: Sequence[int], shape: Sequence[int] | None, n_levels: int, min_size: int = MIN_LEVEL_SIZE
) -> tuple[int, int, int]:
    """The patch actually used: ``patch`` clipped to ``shape`` (the largest volume) per axis, then
    rounded up to a multiple of 2^h, h the number of halvings the clipped size allows (so the U-net
    keeps its depth; the volume is zero-padded to it). E.g. (128,)*3 on a 120x120x24 volume with 5
    levels -> (128, 128, 24)."""
    out = []
    for a in range(3):
        p = int(patch[a]) if shape is None else min(int(patch[a]), int(shape[a]))
        m = 2 ** _halvings(p, n_levels - 1, min_size)
        out.append(-(-p // m) * m)
    return (out[0], out[1], out[2])


# ------------------------------------------------------------------------------------- modules


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm3d(channels, affine=True)


class ConvNormAct(nn.Sequential):
    """3x3x3 convolution (no bias: the norm's affine has one), instance norm, leaky ReLU."""

    def __init__(self, cin: int, cout: int, stride: Sequence[int] = (1, 1, 1)) -> None:
        super().__init__(
            nn.Conv3d(cin, cout, 3, stride=tuple(stride), padding=1, bias=False),
            _norm(cout),
            nn.LeakyReLU(NEG_SLOPE, inplace=True),
        )


class ResidualBlock(nn.Module):
    """conv-norm-act, conv-norm, plus the input (identity, or 1x1x1 conv + norm when the channels or the
    stride change), then the activation."""

    def __init__(self, cin: int, cout: int, stride: Sequence[int] = (1, 1, 1)) -> None:
        super().__init__()
        stride = tuple(int(s) for s in stride)
        self.conv1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = _norm(cout)
        self.act = nn.LeakyReLU(NEG_SLOPE, inplace=True)
        if cin == cout and stride == (1, 1, 1):
            self.skip: nn.Module = nn.Identity()
        else:
            self.skip = nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False), _norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + self.skip(x))


class Encoder(nn.Module):
    """Residual encoder: level 0 at full resolution, level l > 0 entered by a strided block."""

    def __init__(self, in_channels: int, widths: Sequence[int], strides: Strides, blocks: int = 1) -> None:
        super().__init__()
        if len(strides) != len(widths) - 1:
            raise ValueError(f"{len(widths)} levels need {len(widths) - 1} strides, got {len(strides)}")
        self.levels = nn.ModuleList()
        cin = in_channels
        for lvl, w in enumerate(widths):
            stride = (1, 1, 1) if lvl == 0 else strides[lvl - 1]
            mods = [ResidualBlock(cin, w, stride)] + [ResidualBlock(w, w) for _ in range(blocks - 1)]
            self.levels.append(nn.Sequential(*mods))
            cin = w

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for level in self.levels:
            x = level(x)
            feats.append(x)
        return feats


class Decoder(nn.Module):
    """U-net decoder over skips of ``skip_mult * widths[l]`` channels (2 for the siamese net); returns
    the full-resolution logits and the auxiliary logits of decoder levels 1..``aux_levels``."""

    def __init__(
        self,
        widths: Sequence[int],
        strides: Strides,
        skip_mult: int,
        blocks: int = 1,
        n_classes: int = 2,
        aux_levels: int = 0,
    ) -> None:
        super().__init__()
        n = len(widths)
        self.strides = tuple(tuple(int(v) for v in s) for s in strides)
        self.up = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for lvl in range(n - 1):
            cin = skip_mult * widths[-1] if lvl == n - 2 else widths[lvl + 1]
            self.up.append(ConvNormAct(cin, widths[lvl]))
            mods = [ResidualBlock(widths[lvl] + skip_mult * widths[lvl], widths[lvl])]
            mods += [ResidualBlock(widths[lvl], widths[lvl]) for _ in range(blocks - 1)]
            self.blocks.append(nn.Sequential(*mods))
        self.head = nn.Conv3d(widths[0], n_classes, 1)
        #: decoder levels with an auxiliary output (level n - 1 is the bottleneck: no decoder output)
        self.aux_at = [lvl for lvl in range(1, aux_levels + 1) if lvl <= n - 2]
        self.aux_heads = nn.ModuleList([nn.Conv3d(widths[lvl], n_classes, 1) for lvl in self.aux_at])

    def forward(self, skips: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = skips[-1]
        aux: dict[int, torch.Tensor] = {}
        for lvl in range(len(skips) - 2, -1, -1):
            x = F.interpolate(x, scale_factor=tuple(float(s) for s in self.strides[lvl]), mode="nearest")
            if x.shape[2:] != skips[lvl].shape[2:]:  # pragma: no cover - guarded by the divisor
                raise ValueError(f"decoder size {tuple(x.shape[2:])} != skip {tuple(skips[lvl].shape[2:])}")
            x = self.blocks[lvl](torch.cat([self.up[lvl](x), skips[lvl]], dim=1))
            if lvl in self.aux_at:
                aux[lvl] = self.aux_heads[self.aux_at.index(lvl)](x)
        return self.head(x), [aux[lvl] for lvl in self.aux_at]


class SiameseUNet3D(nn.Module):
    """Siamese residual 3D U-net (module docstring). ``forward(baseline, followup)`` on (N, 1, X, Y, Z)
    tensors whose sizes are multiples of :attr:`divisor` -> ``{"logits": (N, 2, X, Y, Z), "aux": [(N,
    2, X/f1, Y/f1, Z/f1), ...]}`` (aux: coarser decoder levels, finest first; empty without deep
    supervision)."""

    def __init__(
        self,
        widths: Sequence[int] = (16, 32, 64, 128, 256),
        strides: Sequence[Sequence[int]] | None = None,
        blocks: int = 1,
        decoder_blocks: int = 1,
        deep_supervision: bool = True,
        aux_levels: int = 2,
        n_classes: int = 2,
    ) -> None:
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        if strides is None:
            strides = ((2, 2, 2),) * (len(self.widths) - 1)
        self.strides: Strides = tuple((int(s[0]), int(s[1]), int(s[2])) for s in strides)
        self.blocks = int(blocks)
        self.decoder_blocks = int(decoder_blocks)
        self.deep_supervision = bool(deep_supervision)
        self.aux_levels = int(aux_levels) if deep_supervision else 0
        self.n_classes = int(n_classes)
        self.encoder = Encoder(1, self.widths, self.strides, self.blocks)
        self.decoder = Decoder(self.widths, self.strides, 2, self.decoder_blocks, self.n_classes, self.aux_levels)

    @classmethod
    def from_spec(cls, spec: LongitudinalSpec, patch: Sequence[int] | None = None) -> SiameseUNet3D:
        """The network of ``spec`` with the strides of ``patch`` (default ``spec.patch``)."""
        strides = level_strides(spec.patch if patch is None else patch, len(spec.widths))
        return cls(spec.widths, strides, spec.blocks, spec.decoder_blocks, spec.deep_supervision, spec.aux_levels)

    def config(self) -> dict[str, Any]:
        """Constructor arguments (checkpoint-safe), enough to rebuild the module."""
        return {
            "widths": list(self.widths),
            "strides": [list(s) for s in self.strides],
            "blocks": self.blocks,
            "decoder_blocks": self.decoder_blocks,
            "deep_supervision": self.deep_supervision,
            "aux_levels": self.aux_levels,
            "n_classes": self.n_classes,
        }

    @property
    def divisor(self) -> tuple[int, int, int]:
        return divisor_of(self.strides)

    def output_scales(self) -> list[tuple[int, int, int]]:
        """Downsampling factor of each output relative to the input: (1,1,1) then the aux levels'."""
        return [divisor_of(self.strides[:lvl]) for lvl in [0, *self.decoder.aux_at]]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features of one time point per level (the shared encoder)."""
        return self.encoder(x)

    def forward(self, baseline: torch.Tensor, followup: torch.Tensor) -> dict[str, Any]:
        if baseline.shape != followup.shape:
            raise ValueError(f"baseline {tuple(baseline.shape)} and follow-up {tuple(followup.shape)} differ")
        n = baseline.shape[0]
        feats = self.encoder(torch.cat([baseline, followup], dim=0))  # one pass, shared weights
        skips = [torch.cat([f[:n], f[n:]], dim=1) for f in feats]
        logits, aux = self.decoder(skips)
        return {"logits": logits, "aux": aux}


class SingleTimepointNet(nn.Module):
    """Pre-training network: the siamese net's encoder (the same modules, so the weights it learns are
    the siamese encoder's) plus its own decoder on one FLAIR, 2-class logits of "any lesion". Same
    output dict as :class:`SiameseUNet3D` (with ``aux`` at the same levels)."""

    def __init__(self, siamese: SiameseUNet3D) -> None:
        super().__init__()
        self.encoder = siamese.encoder
        self.strides = siamese.strides
        self.decoder = Decoder(
            siamese.widths, siamese.strides, 1, siamese.decoder_blocks, siamese.n_classes, siamese.aux_levels
        )

    @property
    def divisor(self) -> tuple[int, int, int]:
        return divisor_of(self.strides)

    def forward(self, image: torch.Tensor) -> dict[str, Any]:
        logits, aux = self.decoder(self.encoder(image))
        return {"logits": logits, "aux": aux}


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (shared ones counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
