"""Network variants (the rows of Table 1): names, losses, inputs and outputs.

Torch-free, so that the workflow (rules/train.smk, rules/evaluate.smk) can be planned without importing
torch; :meth:`NetworkSpec.build` imports the U-net when a network is built.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .networks import UNet

#: Names of the maps a network may read or predict. ``mrf`` stands for the whole MRF series.
OUTPUT_NAMES = ("T1", "T2star", "NAWM", "GM", "lesion")
MAP_INPUT_NAMES = ("T1", "T2star")
#: The tissue priors a network may read beside its inputs (``priors: true``): the MNI152 GM, WM and CSF
#: priors as the tissue stage warps them to the subject (T2w space, 0-1), in this channel order.
PRIOR_NAMES = ("GMprior", "WMprior", "CSFprior")
PROBABILITY_OUTPUTS = ("NAWM", "GM", "lesion")
LOSS_NAMES = ("mse", "mae", "lcl", "dice", "multitask")
#: Training options a network entry may set for itself (else the ``training:`` section's value).
NETWORK_TRAINING_KEYS = (
    "epochs", "lr", "lr_halve_every", "patches_per_slice", "lesion_factor", "lesion_share", "augment",
    "norm", "ema", "mrf_scaling", "widths", "bridge", "dropout",
)
#: Keys of the ``training`` config that reach :func:`mrflesion.learn.train`: the per-network options plus
#: those shared by every network of a run.
TRAINING_KEYS = (*NETWORK_TRAINING_KEYS, "batch_size", "patch_size", "seed", "device")


@dataclass(frozen=True)
class NetworkSpec:
    """One network variant (a row of Table 1).

    ``inputs`` is ``"mrf"`` (the raw MRF series, all measurements) or a tuple of map names from
    :data:`MAP_INPUT_NAMES`; ``outputs`` a tuple from :data:`OUTPUT_NAMES`. ``priors``: the three
    tissue priors (:data:`PRIOR_NAMES`) are further input channels, after ``inputs``.
    """

    name: str
    loss: str
    inputs: str | tuple[str, ...] = "mrf"
    outputs: tuple[str, ...] = OUTPUT_NAMES
    extra: Mapping[str, Any] = field(default_factory=dict)
    priors: bool = False

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
        unknown = sorted(set(self.extra) - set(NETWORK_TRAINING_KEYS))
        if unknown:
            raise ValueError(f"{self.name}: unknown network options {unknown} (known: {NETWORK_TRAINING_KEYS})")
        if not isinstance(self.priors, bool):
            raise ValueError(f"{self.name}: priors must be true or false, got {self.priors!r}")
        object.__setattr__(self, "outputs", outputs)
        object.__setattr__(self, "extra", dict(self.extra))

    @property
    def uses_mrf(self) -> bool:
        return self.inputs == "mrf"

    @property
    def input_images(self) -> tuple[str, ...]:
        """The image kinds read as input channels, in order (``mrf``: every measurement of the series)."""
        base = ("mrf",) if self.uses_mrf else tuple(self.inputs)
        return base + (PRIOR_NAMES if self.priors else ())

    @property
    def out_activation(self) -> str:
        """Sigmoid on the outputs for the Dice loss, raw outputs otherwise."""
        return "sigmoid" if self.loss == "dice" else "none"

    @property
    def sigmoid_channels(self) -> tuple[int, ...]:
        """Output channels that end in a sigmoid: all for the Dice loss, the probabilities (NAWM, GM,
        lesion) for the multi-task loss (trained from their logits with BCE + soft Dice), none for
        the regression losses (the paper's raw outputs)."""
        if self.loss == "dice":
            return tuple(range(len(self.outputs)))
        if self.loss == "multitask":
            return tuple(i for i, o in enumerate(self.outputs) if o in PROBABILITY_OUTPUTS)
        return ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NetworkSpec:
        known = {"name", "loss", "inputs", "outputs", "priors"}
        return cls(
            name=str(d["name"]),
            loss=str(d["loss"]),
            inputs=d.get("inputs", "mrf"),
            outputs=d.get("outputs", OUTPUT_NAMES),
            extra={k: v for k, v in d.items() if k not in known},
            priors=d.get("priors", False),
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "loss": self.loss,
            "inputs": self.inputs if isinstance(self.inputs, str) else list(self.inputs),
            "outputs": list(self.outputs),
        }
        if self.priors:  # absent when false: the networks without priors keep their entries (and models)
            d["priors"] = True
        d.update(self.extra)
        return d

    def build(
        self, in_channels: int, widths: Sequence[int] = (32, 64, 128), bridge: int = 256, dropout: float = 0.5,
        norm: str = "none",
    ) -> UNet:
        """The U-net for this variant (``in_channels``: the number of input channels, MRF measurements
        and priors included)."""
        from .networks import UNet

        n_fixed = (0 if self.uses_mrf else len(self.inputs)) + (len(PRIOR_NAMES) if self.priors else 0)
        wrong = in_channels <= n_fixed if self.uses_mrf else in_channels != n_fixed
        if wrong:
            raise ValueError(
                f"{self.name}: expects {n_fixed} input channels{' plus the MRF series' if self.uses_mrf else ''}, "
                f"got {in_channels}"
            )
        return UNet(in_channels, len(self.outputs), widths, bridge, dropout, norm=norm,
                    sigmoid_channels=self.sigmoid_channels)


#: The named networks (the catalogue): a ``networks:`` entry of the config may be one of these names, or a
#: mapping with one of these names and the fields it changes (``{name: MTL-5, epochs: 50}``). The first is the
#: recommended network, MTL-5: the MRF series and the subject's tissue priors in, T1, T2*, NAWM, GM and
#: lesion out, trained with the lesion recipe at the paper's size (docs/lesion-training.md); the others are
#: the eight rows of Table 1 (Hermann et al. 2021), each with its paper loss. Defined here only; the
#: schema's default names them.
_FIVE = ["T1", "T2star", "NAWM", "GM", "lesion"]
NETWORK_CATALOGUE: dict[str, dict[str, Any]] = {
    "MTL-5": {"name": "MTL-5", "loss": "multitask", "inputs": "mrf", "outputs": _FIVE, "priors": True,
              "lesion_share": 0.25, "augment": True, "norm": "batch", "ema": 0.999, "mrf_scaling": "measurement",
              "dropout": 0.0},
    "MSE-5": {"name": "MSE-5", "loss": "mse", "inputs": "mrf", "outputs": _FIVE},
    "MAE-5": {"name": "MAE-5", "loss": "mae", "inputs": "mrf", "outputs": _FIVE},
    "LCL-5": {"name": "LCL-5", "loss": "lcl", "inputs": "mrf", "outputs": _FIVE},
    "MSE-1": {"name": "MSE-1", "loss": "mse", "inputs": "mrf", "outputs": ["lesion"]},
    "MAE-1": {"name": "MAE-1", "loss": "mae", "inputs": "mrf", "outputs": ["lesion"]},
    "LCL-1": {"name": "LCL-1", "loss": "lcl", "inputs": "mrf", "outputs": ["lesion"]},
    "DICE-1": {"name": "DICE-1", "loss": "dice", "inputs": "mrf", "outputs": ["lesion"]},
    "MSE-2-1": {"name": "MSE-2-1", "loss": "mse", "inputs": ["T1", "T2star"], "outputs": ["lesion"]},
}
#: The recommended network (the reports lead with it) and the rows of Table 1.
RECOMMENDED_NETWORK = "MTL-5"
TABLE1_NETWORKS = ("MSE-5", "MAE-5", "LCL-5", "MSE-1", "MAE-1", "LCL-1", "DICE-1", "MSE-2-1")


def catalogue_entry(name: str) -> dict[str, Any]:
    """A copy of the catalogue's full entry for ``name`` (KeyError if it is not a catalogue name)."""
    return copy.deepcopy(NETWORK_CATALOGUE[name])


def _same(a: Any, b: Any) -> bool:
    """Equal config values, a boolean never equal to a number (``False == 0.0`` in Python)."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def default_networks() -> list[dict[str, Any]]:
    """The eight networks of Table 1 as full config entries (from the catalogue)."""
    return [catalogue_entry(n) for n in TABLE1_NETWORKS]


def resolve_networks(
    entries: Iterable[str | Mapping[str, Any]], training: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Full network entries from the config's ``networks:`` list.

    An entry is a catalogue name (``"MSE-5"``), a mapping with a catalogue ``name`` and the fields it
    changes (``{"name": "MTL-5", "epochs": 50}``: the catalogue's fields, then these), or a full entry of a
    network of its own (a new name with ``loss``, ``inputs`` and ``outputs``, taken as it is).

    ``training``: the run's ``training`` section (defaults filled). A training option that an entry takes
    from the catalogue and that equals the training section's value is left out: the network follows the
    training section with the same result, and its entry (which the training job's parameters hold) names
    only what the network sets differently. Options the config entry states itself are always kept.

    Raises ValueError with one line starting ``networks[i]:`` for an entry that is none of these.
    """
    out: list[dict[str, Any]] = []
    for i, entry in enumerate(entries):
        where = f"networks[{i}]"
        if isinstance(entry, str):
            name, overrides = entry, {}
        elif isinstance(entry, Mapping):
            name, overrides = entry.get("name"), {k: v for k, v in entry.items() if k != "name"}
        else:
            raise ValueError(f"{where}: a network is a catalogue name or a mapping, not {entry!r}")
        if name in NETWORK_CATALOGUE:
            full = catalogue_entry(str(name))
            if training is not None:
                for k in NETWORK_TRAINING_KEYS:
                    if k in full and k not in overrides and k in training and _same(training[k], full[k]):
                        del full[k]
            full.update(copy.deepcopy(overrides))
        elif isinstance(entry, str):
            raise ValueError(
                f"{where}: {entry!r} is not a catalogue network (one of {', '.join(NETWORK_CATALOGUE)})"
            )
        else:
            missing = [k for k in ("loss", "inputs", "outputs") if k not in entry]
            if missing or not isinstance(name, str):
                raise ValueError(
                    f"{where}: {name!r} is not a catalogue network (one of {', '.join(NETWORK_CATALOGUE)}); a network "
                    f"of its own needs name, loss, inputs and outputs (missing: {', '.join(missing) or 'name'})"
                )
            full = copy.deepcopy(dict(entry))
        out.append(full)
    return out


def specs_from_config(entries: Iterable[str | Mapping[str, Any]]) -> list[NetworkSpec]:
    """Parse config entries (catalogue names, or mappings: :func:`resolve_networks`); names must be unique."""
    specs = [NetworkSpec.from_dict(e) for e in resolve_networks(entries)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate network names in {names}")
    return specs
