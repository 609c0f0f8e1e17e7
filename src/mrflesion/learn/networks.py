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

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: Names of the maps a network may read or predict. ``mrf`` stands for the whole MRF series.
OUTPUT_NAMES = ("T1", "T2star", "NAWM", "GM", "lesion")
MAP_INPUT_NAMES = ("T1", "T2star")
PROBABILITY_OUTPUTS = ("NAWM", "GM", "lesion")
LOSS_NAMES = ("mse", "mae", "lcl", "dice")


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


# ---------------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class NetworkSpec:
    """One network variant (a row of Table 1).

    ``inputs`` is ``"mrf"`` (the raw MRF series, all measurements) or a tuple of map names from
    :data:`MAP_INPUT_NAMES`; ``outputs`` a tuple from :data:`OUTPUT_NAMES`.
    """

    name: str
    loss: str
    inputs: str | tuple[str, ...] = "mrf"
    outputs: tuple[str, ...] = OUTPUT_NAMES
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        loss = str(self.loss).lower()
        object.__setattr__(self, "loss", loss)
        if loss not in LOSS_NAMES:
            raise ValueError(f"{self.name}: unknown loss {self.loss!r} (one of {LOSS_NAMES})")
        inputs = self.inputs
        if isinstance(inputs, str):
            if inputs.lower() != "mrf":
                inputs = (inputs,)
            else:
                inputs = "mrf"
        if not isinstance(inputs, str):
            inputs = tuple(str(i) for i in inputs)
            bad = [i for i in inputs if i not in MAP_INPUT_NAMES]
            if bad or not inputs:
                raise ValueError(
                    f"{self.name}: inputs must be 'mrf' or maps from {MAP_INPUT_NAMES}, got {bad}"
                )
        object.__setattr__(self, "inputs", inputs)
        outputs = (self.outputs,) if isinstance(self.outputs, str) else tuple(str(o) for o in self.outputs)
        bad = [o for o in outputs if o not in OUTPUT_NAMES]
        if bad or not outputs or len(set(outputs)) != len(outputs):
            raise ValueError(
                f"{self.name}: outputs must be distinct names from {OUTPUT_NAMES}, got {outputs}"
            )
        if loss == "dice":
            nonprob = [o for o in outputs if o not in PROBABILITY_OUTPUTS]
            if nonprob:
                raise ValueError(f"{self.name}: the Dice loss needs probability outputs, not {nonprob}")
        object.__setattr__(self, "outputs", outputs)
        object.__setattr__(self, "extra", dict(self.extra))

    @property
    def uses_mrf(self) -> bool:
        return self.inputs == "mrf"

    @property
    def out_activation(self) -> str:
        """Sigmoid on the outputs for the Dice loss, raw outputs otherwise."""
        return "sigmoid" if self.loss == "dice" else "none"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NetworkSpec:
        known = {"name", "loss", "inputs", "outputs"}
        return cls(
            name=str(d["name"]),
            loss=str(d["loss"]),
            inputs=d.get("inputs", "mrf"),
            outputs=d.get("outputs", OUTPUT_NAMES),
            extra={k: v for k, v in d.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "loss": self.loss,
            "inputs": self.inputs if isinstance(self.inputs, str) else list(self.inputs),
            "outputs": list(self.outputs),
        }
        d.update(self.extra)
        return d

    def build(
        self, in_channels: int, widths: Sequence[int] = (32, 64, 128), bridge: int = 256, dropout: float = 0.5
    ) -> UNet:
        """The U-net for this variant (``in_channels``: number of MRF measurements for ``inputs: mrf``)."""
        if not self.uses_mrf and in_channels != len(self.inputs):
            raise ValueError(
                f"{self.name}: expects {len(self.inputs)} input maps, got {in_channels} channels"
            )
        return UNet(in_channels, len(self.outputs), widths, bridge, dropout, self.out_activation)


def default_networks() -> list[dict[str, Any]]:
    """The eight networks of Table 1 as config entries."""
    five = list(OUTPUT_NAMES)
    nets: list[dict[str, Any]] = [
        {"name": f"{loss.upper()}-5", "loss": loss, "inputs": "mrf", "outputs": five}
        for loss in ("mse", "mae", "lcl")
    ]
    nets += [
        {"name": f"{loss.upper()}-1", "loss": loss, "inputs": "mrf", "outputs": ["lesion"]}
        for loss in ("mse", "mae", "lcl", "dice")
    ]
    nets.append({"name": "MSE-2-1", "loss": "mse", "inputs": ["T1", "T2star"], "outputs": ["lesion"]})
    return nets


def specs_from_config(entries: Iterable[Mapping[str, Any]]) -> list[NetworkSpec]:
    """Parse config entries; names must be unique."""
    specs = [NetworkSpec.from_dict(e) for e in entries]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate network names in {names}")
    return specs
