"""MRF-EPI acquisition protocol: schedule, slice timing, inversions and dummy passes.

A :class:`Protocol` holds everything the signal model needs, in the units of the resources file
(ms, degrees). It round-trips through the MRF sidecar (:meth:`Protocol.to_sidecar` /
:meth:`Protocol.from_sidecar`), so the dictionary is always built from the timing that was
actually written next to the data, and :meth:`Protocol.timing_key` identifies a timing for caching.

Timing model (constants in ``resources/mrfepi.yaml``): measurement ``i`` is one pass over all
slices in ``slice_order``; slot ``k`` of that pass starts ``k * slot_i`` after the pass starts,
shifted by the inversion duration when an inversion pulse precedes slot ``k``. The slice excited
in slot ``k`` therefore sees one excitation per measurement, and the time between its excitations
is the volume TR (up to the inversion shift), as in the interleaved MRF-EPI sequence.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

RESOURCES = Path(__file__).resolve().parents[3] / "resources"
DEFAULT_SEQUENCE_FILE = RESOURCES / "mrfepi.yaml"

# Event kinds in an event table.
READOUT = 0  # excitation followed by a readout at TE
DUMMY = 1  # excitation without readout (dummy pass)
INVERSION = 2  # non-selective 180 degree pulse

# Keys of the MRF sidecar that carry the timing (BIDS-style: seconds for times, degrees for angles).
SIDECAR_KEYS = (
    "FlipAngle",
    "EchoTime",
    "RepetitionTime",
    "SliceOrder",
    "InversionPulses",
    "InversionDuration",
    "VolumePause",
    "DummyPasses",
)


class ProtocolError(ValueError):
    """A sidecar or resources file does not describe a valid MRF-EPI protocol."""


def _ms(seconds: Any) -> float:
    """Seconds (sidecar) to milliseconds, rounded to 1 ns so that sidecars round-trip exactly."""
    return round(float(seconds) * 1000.0, 6)


def interleaved_order(n_slices: int) -> tuple[int, ...]:
    """Even slice indices first, then odd: the acquisition order of the slots."""
    return tuple(range(0, n_slices, 2)) + tuple(range(1, n_slices, 2))


@dataclass(frozen=True)
class Protocol:
    """One MRF-EPI acquisition: per-measurement schedule plus slice and inversion timing."""

    flip_angle_deg: tuple[float, ...]
    echo_time_ms: tuple[float, ...]
    repetition_time_ms: tuple[float, ...]  # volume TR of each measurement
    slice_order: tuple[int, ...]  # slot k of every pass excites slice slice_order[k]
    inversions: tuple[tuple[int, int], ...]  # (0-based measurement, slot the pulse precedes)
    inversion_duration_ms: float = 15.0
    volume_pause_ms: float = 20.0
    dummy_passes: int = 5

    def __post_init__(self) -> None:
        n = len(self.flip_angle_deg)
        if n == 0:
            raise ProtocolError("protocol has no measurements")
        if len(self.echo_time_ms) != n or len(self.repetition_time_ms) != n:
            raise ProtocolError(
                f"FlipAngle, EchoTime and RepetitionTime must have the same length "
                f"(got {n}, {len(self.echo_time_ms)}, {len(self.repetition_time_ms)})"
            )
        if sorted(self.slice_order) != list(range(len(self.slice_order))):
            raise ProtocolError("SliceOrder must be a permutation of 0..n_slices-1")
        seen = set()
        for m, slot in self.inversions:
            if not (0 <= m < n) or not (0 <= slot < self.n_slices) or m in seen:
                raise ProtocolError(f"invalid inversion pulse (measurement {m}, slot {slot})")
            seen.add(m)
        for i in range(n):
            if self.slot_duration_ms(i) <= self.echo_time_ms[i]:
                raise ProtocolError(
                    f"measurement {i + 1}: RepetitionTime too short for {self.n_slices} slices "
                    f"at TE {self.echo_time_ms[i]} ms"
                )
        if self.dummy_passes < 0:
            raise ProtocolError("DummyPasses must be >= 0")

    # ------------------------------------------------------------------ derived quantities
    @property
    def n_measurements(self) -> int:
        return len(self.flip_angle_deg)

    @property
    def n_slices(self) -> int:
        return len(self.slice_order)

    def inversion_slot(self, measurement: int) -> int | None:
        for m, slot in self.inversions:
            if m == measurement:
                return slot
        return None

    def slot_duration_ms(self, measurement: int) -> float:
        """Duration of one slice slot in ``measurement`` (volume TR minus pause and inversion)."""
        inv = self.inversion_duration_ms if self.inversion_slot(measurement) is not None else 0.0
        return (self.repetition_time_ms[measurement] - self.volume_pause_ms - inv) / self.n_slices

    def events(self, slice_index: int) -> dict[str, np.ndarray]:
        """Time-ordered events seen by one slice: kind, time (ms), flip (deg), TE (ms), measurement.

        ``measurement`` is -1 for dummy and inversion events. The slice's magnetisation is driven
        by every inversion (non-selective) and by its own excitations only.
        """
        if not 0 <= slice_index < self.n_slices:
            raise IndexError(f"slice {slice_index} outside 0..{self.n_slices - 1}")
        k = self.slice_order.index(slice_index)
        kinds: list[int] = []
        times: list[float] = []
        flips: list[float] = []
        tes: list[float] = []
        meas: list[int] = []
        t0 = 0.0
        dummy_slot = self.slot_duration_ms(0)
        dummy_tr = self.n_slices * dummy_slot + self.volume_pause_ms
        for _ in range(self.dummy_passes):
            kinds.append(DUMMY)
            times.append(t0 + k * dummy_slot)
            flips.append(self.flip_angle_deg[0])
            tes.append(0.0)
            meas.append(-1)
            t0 += dummy_tr
        for i in range(self.n_measurements):
            slot = self.slot_duration_ms(i)
            inv_slot = self.inversion_slot(i)
            shift = 0.0
            if inv_slot is not None:
                kinds.append(INVERSION)
                times.append(t0 + inv_slot * slot)
                flips.append(180.0)
                tes.append(0.0)
                meas.append(-1)
                if k >= inv_slot:
                    shift = self.inversion_duration_ms
            kinds.append(READOUT)
            times.append(t0 + k * slot + shift)
            flips.append(self.flip_angle_deg[i])
            tes.append(self.echo_time_ms[i])
            meas.append(i)
            t0 += self.repetition_time_ms[i]
        order = np.argsort(np.asarray(times), kind="stable")
        return {
            "kind": np.asarray(kinds, dtype=np.int8)[order],
            "time_ms": np.asarray(times)[order],
            "flip_deg": np.asarray(flips)[order],
            "te_ms": np.asarray(tes)[order],
            "measurement": np.asarray(meas)[order],
        }

    # ------------------------------------------------------------------ construction / IO
    @classmethod
    def default(cls, n_slices: int, sequence_file: Path | str | None = None) -> Protocol:
        """The published schedule with the timing model of ``resources/mrfepi.yaml``."""
        cfg = yaml.safe_load(Path(sequence_file or DEFAULT_SEQUENCE_FILE).read_text())
        fa = [float(x) for x in cfg["flip_angle_deg"]]
        te = [float(cfg["echo_time_base_ms"]) + float(x) for x in cfg["echo_time_offset_ms"]]
        inv_meas = [int(m) - 1 for m in cfg["inversion_measurements"]]
        n_inv = len(inv_meas)
        inversions = tuple((m, (q * n_slices) // n_inv) for q, m in enumerate(inv_meas))
        inv_set = {m for m, _ in inversions}
        tr = [
            round(
                n_slices * (te[i] + float(cfg["slice_overhead_ms"]))
            + float(cfg["volume_pause_ms"])
                + (float(cfg["inversion_duration_ms"]) if i in inv_set else 0.0),
                6,
            )
            for i in range(len(fa))
        ]
        if cfg.get("slice_order", "interleaved-even-first") != "interleaved-even-first":
            raise ProtocolError(f"unknown slice_order {cfg['slice_order']!r}")
        return cls(
            flip_angle_deg=tuple(fa),
            echo_time_ms=tuple(te),
            repetition_time_ms=tuple(tr),
            slice_order=interleaved_order(n_slices),
            inversions=inversions,
            inversion_duration_ms=float(cfg["inversion_duration_ms"]),
            volume_pause_ms=float(cfg["volume_pause_ms"]),
            dummy_passes=int(cfg["dummy_passes"]),
        )

    def to_sidecar(self) -> dict[str, Any]:
        """BIDS-style sidecar fields (seconds for times, degrees for angles)."""
        return {
            "FlipAngle": [round(x, 6) for x in self.flip_angle_deg],
            "EchoTime": [round(x / 1000.0, 9) for x in self.echo_time_ms],
            "RepetitionTime": [round(x / 1000.0, 9) for x in self.repetition_time_ms],
            "SliceOrder": list(self.slice_order),
            "InversionPulses": [{"Measurement": m + 1, "BeforeSlot": s} for m, s in self.inversions],
            "InversionDuration": self.inversion_duration_ms / 1000.0,
            "VolumePause": self.volume_pause_ms / 1000.0,
            "DummyPasses": self.dummy_passes,
        }

    @classmethod
    def from_sidecar(cls, sidecar: dict[str, Any]) -> Protocol:
        """Inverse of :meth:`to_sidecar`; raises :class:`ProtocolError` naming the bad field."""
        for key in ("FlipAngle", "EchoTime", "RepetitionTime", "SliceOrder"):
            if key not in sidecar:
                raise ProtocolError(f"sidecar lacks {key}")
            if not isinstance(sidecar[key], list):
                raise ProtocolError(f"sidecar {key} must be a list (one value per measurement)")
        try:
            inversions = tuple(
                (int(p["Measurement"]) - 1, int(p["BeforeSlot"])) for p in sidecar.get("InversionPulses", [])
            )
            return cls(
                flip_angle_deg=tuple(float(x) for x in sidecar["FlipAngle"]),
                echo_time_ms=tuple(_ms(x) for x in sidecar["EchoTime"]),
                repetition_time_ms=tuple(_ms(x) for x in sidecar["RepetitionTime"]),
                slice_order=tuple(int(x) for x in sidecar["SliceOrder"]),
                inversions=inversions,
                inversion_duration_ms=_ms(sidecar.get("InversionDuration", 0.015)),
                volume_pause_ms=_ms(sidecar.get("VolumePause", 0.020)),
                dummy_passes=int(sidecar.get("DummyPasses", 0)),
            )
        except (TypeError, KeyError) as exc:
            raise ProtocolError(f"malformed sidecar timing field: {exc}") from exc

    def timing_key(self) -> str:
        """Stable hash of the timing: equal keys give identical dictionaries."""
        blob = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
