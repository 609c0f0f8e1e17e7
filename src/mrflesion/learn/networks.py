"""2D U-net of Hermann et al. (2021) and the Table 1 network variants.

Architecture (defaults from the authors' released code):

* encoder of depth 3 with 32/64/128 filters, each stage two 3x3 convolutions ("same" padding) + ReLU,
  followed by a 2x2 max-pool; no batch normalisation;
* bridge of 256 filters (two 3x3 convolutions + ReLU);
* dropout (p = 0.5) on the output of the last encoder stage (it feeds both the skip connection and the
  pool) and on the output of the bridge;
* decoder: 2x2 transposed convolution (stride 2) up, concatenation with the skip, two 3x3 convolutions +
  ReLU per stage;
* 1x1 convolution to the outputs, optionally followed by a sigmoid (used for the DICE-1 variant, whose
  soft Dice needs outputs in [0, 1]; the regression variants output raw values, as in the method).

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


class DoubleConv(nn.Sequential):
    """Two 3x3 convolutions, each followed by ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
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
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("widths must name at least one encoder stage")
        if out_activation not in ("none", "sigmoid"):
            raise ValueError(f"out_activation must be 'none' or 'sigmoid', not {out_activation!r}")
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.widths = tuple(int(w) for w in widths)
        self.bridge_width = int(bridge)
        self.out_activation = out_activation
        self.encoders = nn.ModuleList()
        prev = self.in_channels
        for w in self.widths:
            self.encoders.append(DoubleConv(prev, w))
            prev = w
        self.encoder_dropout = nn.Dropout(dropout)
        self.pool = nn.MaxPool2d(2)
        self.bridge = DoubleConv(prev, self.bridge_width)
        self.bridge_dropout = nn.Dropout(dropout)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        prev = self.bridge_width
        for w in reversed(self.widths):
            self.ups.append(nn.ConvTranspose2d(prev, w, 2, stride=2))
            self.decoders.append(DoubleConv(2 * w, w))
            prev = w
        self.head = nn.Conv2d(prev, self.out_channels, 1)

    @property
    def divisor(self) -> int:
        """H and W must be multiples of this."""
        return 2 ** len(self.widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
        if self.out_activation == "sigmoid":
            x = torch.sigmoid(x)
        return x


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


def forward_padded(model: UNet, x: torch.Tensor) -> torch.Tensor:
    """Run ``model`` on slices of any size: pad to the net's divisor, crop the output back."""
    xp, (h, w) = pad_to_multiple(x, model.divisor)
    return model(xp)[..., :h, :w]
