"""2D U-net of Hermann et al. (2021) and the Table 1 network variants.

Architecture (defaults from the authors' released code):

* encoder of depth 3 with 32/64/128 filters, each stage two 3x3 convolutions ("same" padding) + ReLU,
  followed by a 2x2 max-pool; no normalisation layer (``norm="none"``, the paper's network) or batch /
  instance normalisation after every convolution (``norm="batch"`` / ``"instance"``, the recommended
  network: it keeps the 35 MRF channels' very different scales from slowing the first epochs);
* bridge of 256 filters (two 3x3 convolutions + ReLU);
* dropout (p = 0.5) on the output of the last encoder stage (it feeds both the skip connection and the
  pool) and on the output of the bridge;
* decoder: 2x2 transposed convolution (stride 2) up, concatenation with the skip, two 3x3 convolutions +
  ReLU per stage;
* 1x1 convolution to the outputs; a sigmoid on the channels listed in ``sigmoid_channels`` (all of them
  for the DICE-1 variant, whose soft Dice needs outputs in [0, 1]; the probability outputs of the
  multi-task network; none for the regression variants, which output raw values, as in the method).
  ``forward(x, logits=True)`` skips the sigmoid, for losses computed from logits (BCE).

The net is fully convolutional: any H, W divisible by ``2 ** depth`` (8 for depth 3) works;
:func:`forward_padded` pads anything else and crops the result back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# the variants (torch-free, so that the workflow can be planned without importing torch)
from .spec import (  # noqa: F401
    LOSS_NAMES,
    MAP_INPUT_NAMES,
    OUTPUT_NAMES,
    PROBABILITY_OUTPUTS,
    NetworkSpec,
    default_networks,
    specs_from_config,
)

NORMS = ("none", "batch", "instance")


def _norm_layer(norm: str, channels: int) -> list[nn.Module]:
    if norm == "batch":
        return [nn.BatchNorm2d(channels)]
    if norm == "instance":
        return [nn.InstanceNorm2d(channels, affine=True)]
    return []


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by the normalisation layer (if any) and ReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "none") -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            *_norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            *_norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """2D U-net; see the module docstring."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        widths: Sequence[int] = (32, 64, 128),
        bridge: int = 256,
        dropout: float = 0.5,
        out_activation: str = "none",
        norm: str = "none",
        sigmoid_channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("widths must name at least one encoder stage")
        if out_activation not in ("none", "sigmoid"):
            raise ValueError(f"out_activation must be 'none' or 'sigmoid', not {out_activation!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, not {norm!r}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.widths = tuple(int(w) for w in widths)
        self.bridge_width = int(bridge)
        self.out_activation = out_activation
        self.norm = norm
        if out_activation == "sigmoid":
            sigmoid_channels = range(self.out_channels)
        self.sigmoid_channels = tuple(sorted({int(c) for c in (sigmoid_channels or ())}))
        if any(not 0 <= c < self.out_channels for c in self.sigmoid_channels):
            raise ValueError(f"sigmoid channels {self.sigmoid_channels} outside 0..{self.out_channels - 1}")
        self.encoders = nn.ModuleList()
        prev = self.in_channels
        for w in self.widths:
            self.encoders.append(DoubleConv(prev, w, norm))
            prev = w
        self.encoder_dropout = nn.Dropout(dropout)
        self.pool = nn.MaxPool2d(2)
        self.bridge = DoubleConv(prev, self.bridge_width, norm)
        self.bridge_dropout = nn.Dropout(dropout)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        prev = self.bridge_width
        for w in reversed(self.widths):
            self.ups.append(nn.ConvTranspose2d(prev, w, 2, stride=2))
            self.decoders.append(DoubleConv(2 * w, w, norm))
            prev = w
        self.head = nn.Conv2d(prev, self.out_channels, 1)

    @property
    def divisor(self) -> int:
        """H and W must be multiples of this."""
        return 2 ** len(self.widths)

    def activate(self, y: torch.Tensor) -> torch.Tensor:
        """Apply the output sigmoid to raw outputs (N, C, ...)."""
        if not self.sigmoid_channels:
            return y
        if len(self.sigmoid_channels) == self.out_channels:
            return torch.sigmoid(y)
        y = y.clone()
        idx = list(self.sigmoid_channels)
        y[:, idx] = torch.sigmoid(y[:, idx])
        return y

    def forward(self, x: torch.Tensor, logits: bool = False) -> torch.Tensor:
        skips = []
        last = len(self.encoders) - 1
        for i, enc in enumerate(self.encoders):
            x = enc(x)
            if i == last:
                x = self.encoder_dropout(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bridge_dropout(self.bridge(x))
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips), strict=True):
            x = dec(torch.cat([up(x), skip], dim=1))
        x = self.head(x)
        return x if logits else self.activate(x)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad the last two axes (at the end) to multiples of ``multiple``; returns the original H, W."""
    h, w = x.shape[-2:]
    ph = (-h) % multiple
    pw = (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    return x, (h, w)


def forward_padded(model: UNet, x: torch.Tensor, logits: bool = False) -> torch.Tensor:
    """Run ``model`` on slices of any size: pad to the net's divisor, crop the output back."""
    xp, (h, w) = pad_to_multiple(x, model.divisor)
    return model(xp, logits=logits)[..., :h, :w]
