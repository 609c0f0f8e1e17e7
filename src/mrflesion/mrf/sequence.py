"""MRF-EPI acquisition protocol: schedule, slice timing (incl. SMS), inversions and dummy passes.

A :class:`Protocol` holds everything the signal model needs, in the units of the resources file
(ms, degrees). It round-trips through the MRF sidecar (:meth:`Protocol.to_sidecar` /
:meth:`Protocol.from_sidecar`), so the dictionary is always built from the timing that was
actually written next to the data, and :meth:`Protocol.timing_key` identifies a timing (and the
inversion model) for caching.

Timing model (constants in ``resources/mrfepi.yaml``): measurement ``i`` is one pass over all
slots; a slot excites one slice, or with simultaneous multi-slice (SMS, ``multiband`` > 1) a group
of slices at once, so a pass has ``n_slots = ceil(n_slices / multiband)`` slots. Slot ``k`` of the
pass starts ``k * slot_i`` after the pass starts (``slot_i = (TR_i - pause - inversion) / n_slots``),
shifted by the inversion duration when an inversion pulse precedes slot ``k``. Every slice therefore
sees one excitation per measurement, and slices of one SMS group share their timing.

Inversion efficiency (``inversion_efficiency``): ``perfect`` (default) inverts Mz whatever B1, as
an adiabatic pulse does and as the authors' released dictionary code models it (only excitations
are B1-scaled); ``b1`` models a hard 180 degree pulse scaled by B1 (``Mz <- Mz cos(pi B1)``).

Nothing is guessed from a sidecar: :meth:`Protocol.from_sidecar` needs every timing key (or the
value stated in the config, merged by :func:`resolve_sidecar`) and checks units and ranges.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..paths import workflow_root

# Event kinds in an event table.
READOUT = 0  # excitation followed by a readout at TE
DUMMY = 1  # excitation without readout (dummy pass)
INVERSION = 2  # non-selective 180 degree pulse

#: Inversion models: ``perfect`` (B1-independent, adiabatic; the authors' code) or ``b1`` (hard pulse).
INVERSION_MODELS = ("perfect", "b1")

# Keys of the MRF sidecar that carry the timing (BIDS-style: seconds for times, degrees for angles).
SIDECAR_KEYS = (
    "FlipAngle",
    "EchoTime",
    "RepetitionTime",
    "SliceOrder",
    "SliceTiming",
    "MultibandAccelerationFactor",
    "InversionPulses",
    "InversionDuration",
    "VolumePause",
    "DummyPasses",
    "InversionEfficiency",
)
#: Keys a sidecar (or the config) must state: nothing of the timing is assumed.
REQUIRED_KEYS = ("FlipAngle", "EchoTime", "RepetitionTime", "InversionPulses", "DummyPasses", "VolumePause",
                 "InversionEfficiency")
#: Slices whose SliceTiming differs by less than this (s) share a slot (SMS).
SLICE_TIMING_TOLERANCE_S = 5e-4


class ProtocolError(ValueError):
    """A sidecar or resources file does not describe a valid MRF-EPI protocol."""


def _ms(seconds: Any) -> float:
    """Seconds (sidecar) to milliseconds, rounded to 1 ns so that sidecars round-trip exactly."""
    return round(float(seconds) * 1000.0, 6)


def interleaved_order(n_slices: int) -> tuple[int, ...]:
    """Even slice indices first, then odd: the acquisition order of the slots."""
    return tuple(range(0, n_slices, 2)) + tuple(range(1, n_slices, 2))


def sms_groups(n_slices: int, multiband: int) -> list[tuple[int, ...]]:
    """Slot groups of an SMS acquisition, in acquisition order.

    ``n_slots = ceil(n_slices / multiband)``; band position ``j`` excites slices ``j, j + n_slots, ...``
    together (slices a slab-fraction apart, as SMS does), band positions interleaved even-first.
    ``multiband`` 1 gives one slice per slot in :func:`interleaved_order`.
    """
    if multiband < 1:
        raise ProtocolError("MultibandAccelerationFactor must be >= 1")
    n_slots = math.ceil(n_slices / multiband)
    return [tuple(j + m * n_slots for m in range(multiband) if j + m * n_slots < n_slices)
            for j in interleaved_order(n_slots)]


@dataclass(frozen=True)
class Protocol:
    """One MRF-EPI acquisition: per-measurement schedule plus slice and inversion timing."""

    flip_angle_deg: tuple[float, ...]
    echo_time_ms: tuple[float, ...]
    repetition_time_ms: tuple[float, ...]  # volume TR of each measurement
    slice_order: tuple[int, ...]  # slices in excitation order (a permutation of 0..n_slices-1)
    inversions: tuple[tuple[int, int], ...]  # (0-based measurement, slot the pulse precedes)
    inversion_duration_ms: float = 15.0
    volume_pause_ms: float = 20.0
    dummy_passes: int = 5
    #: slot of each entry of ``slice_order`` (non-decreasing from 0 in steps of 0 or 1; entries sharing a
    #: slot are excited simultaneously, SMS); empty = one slice per slot
    slice_slots: tuple[int, ...] = ()
    inversion_efficiency: str = "perfect"  # "perfect" (B1-independent) or "b1" (hard pulse, B1-scaled)

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
        slots = tuple(int(x) for x in self.slice_slots) or tuple(range(len(self.slice_order)))
        if len(slots) != len(self.slice_order) or slots[0] != 0 or any(
            b - a not in (0, 1) for a, b in zip(slots, slots[1:], strict=False)
        ):
            raise ProtocolError("slice slots must number the slots of SliceOrder from 0 in acquisition order")
        object.__setattr__(self, "slice_slots", slots)
        object.__setattr__(self, "_slot_of", {s: k for s, k in zip(self.slice_order, slots, strict=True)})
        if self.inversion_efficiency not in INVERSION_MODELS:
            raise ProtocolError(
                f"InversionEfficiency must be one of {', '.join(INVERSION_MODELS)}, got {self.inversion_efficiency!r}"
            )
        seen = set()
        for m, slot in self.inversions:
            if not (0 <= m < n) or not (0 <= slot < self.n_slots) or m in seen:
                raise ProtocolError(f"invalid inversion pulse (measurement {m + 1}, slot {slot})")
            seen.add(m)
        if self.dummy_passes < 0:
            raise ProtocolError("DummyPasses must be >= 0")
        if self.volume_pause_ms < 0 or self.inversion_duration_ms < 0:
            raise ProtocolError("VolumePause and InversionDuration must be >= 0")
        for i in range(n):
            if self.slot_duration_ms(i) <= self.echo_time_ms[i]:
                raise ProtocolError(
                    f"measurement {i + 1}: RepetitionTime too short for {self.n_slots} slots "
                    f"at TE {self.echo_time_ms[i]} ms"
                )

    # ------------------------------------------------------------------ derived quantities
    @property
    def n_measurements(self) -> int:
        return len(self.flip_angle_deg)

    @property
    def n_slices(self) -> int:
        return len(self.slice_order)

    @property
    def n_slots(self) -> int:
        """Excitation slots per pass: ``n_slices`` without SMS, ``ceil(n_slices / multiband)`` with."""
        return self.slice_slots[-1] + 1

    @property
    def multiband(self) -> int:
        """Slices excited together (the largest slot group): the SMS factor."""
        return max(np.bincount(np.asarray(self.slice_slots)).tolist())

    def slot_of(self, slice_index: int) -> int:
        """The slot (time position in every pass) of a slice."""
        return self._slot_of[int(slice_index)]  # type: ignore[attr-defined]

    def slot_groups(self) -> list[tuple[int, ...]]:
        """Slices of each slot, in acquisition order (one slice each without SMS)."""
        groups: list[list[int]] = [[] for _ in range(self.n_slots)]
        for s, k in zip(self.slice_order, self.slice_slots, strict=True):
            groups[k].append(s)
        return [tuple(g) for g in groups]

    def timing_representative(self, slice_index: int) -> int:
        """The lowest slice of the slice's slot: slices with the same representative have identical
        timing, hence identical fingerprints (one dictionary per distinct slice timing)."""
        return min(self.slot_groups()[self.slot_of(slice_index)])

    def inversion_slot(self, measurement: int) -> int | None:
        for m, slot in self.inversions:
            if m == measurement:
                return slot
        return None

    def slot_duration_ms(self, measurement: int) -> float:
        """Duration of one slot in ``measurement`` (volume TR minus pause and inversion, over the slots)."""
        inv = self.inversion_duration_ms if self.inversion_slot(measurement) is not None else 0.0
        return (self.repetition_time_ms[measurement] - self.volume_pause_ms - inv) / self.n_slots

    def slice_timing_s(self, measurement: int = 0) -> list[float]:
        """BIDS ``SliceTiming`` of one measurement: excitation time of each slice (s) after the pass starts."""
        slot = self.slot_duration_ms(measurement)
        inv = self.inversion_slot(measurement)
        out = []
        for s in range(self.n_slices):
            k = self.slot_of(s)
            shift = self.inversion_duration_ms if inv is not None and k >= inv else 0.0
            out.append(round((k * slot + shift) / 1000.0, 9))
        return out

    def events(self, slice_index: int) -> dict[str, np.ndarray]:
        """Time-ordered events seen by one slice: kind, time (ms), flip (deg), TE (ms), measurement.

        ``measurement`` is -1 for dummy and inversion events. The slice's magnetisation is driven
        by every inversion (non-selective) and by its own excitations only.
        """
        if not 0 <= slice_index < self.n_slices:
            raise IndexError(f"slice {slice_index} outside 0..{self.n_slices - 1}")
        k = self.slot_of(slice_index)
        kinds: list[int] = []
        times: list[float] = []
        flips: list[float] = []
        tes: list[float] = []
        meas: list[int] = []
        t0 = 0.0
        dummy_slot = self.slot_duration_ms(0)
        dummy_tr = self.n_slots * dummy_slot + self.volume_pause_ms
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
    def default(
        cls,
        n_slices: int,
        sequence_file: Path | str | None = None,
        multiband: int = 1,
        inversion_efficiency: str = "perfect",
    ) -> Protocol:
        """The published schedule with the timing model of ``resources/mrfepi.yaml``.

        ``multiband`` > 1: SMS groups of :func:`sms_groups`; the volume TR shrinks with the slot count.
        """
        cfg = yaml.safe_load(Path(sequence_file or workflow_root() / "resources" / "mrfepi.yaml").read_text())
        fa = [float(x) for x in cfg["flip_angle_deg"]]
        te = [float(cfg["echo_time_base_ms"]) + float(x) for x in cfg["echo_time_offset_ms"]]
        if cfg.get("slice_order", "interleaved-even-first") != "interleaved-even-first":
            raise ProtocolError(f"unknown slice_order {cfg['slice_order']!r}")
        groups = sms_groups(n_slices, int(multiband))
        n_slots = len(groups)
        inv_meas = [int(m) - 1 for m in cfg["inversion_measurements"]]
        n_inv = len(inv_meas)
        inversions = tuple((m, (q * n_slots) // n_inv) for q, m in enumerate(inv_meas))
        inv_set = {m for m, _ in inversions}
        tr = [
            round(
                n_slots * (te[i] + float(cfg["slice_overhead_ms"]))
                + float(cfg["volume_pause_ms"])
                + (float(cfg["inversion_duration_ms"]) if i in inv_set else 0.0),
                6,
            )
            for i in range(len(fa))
        ]
        return cls(
            flip_angle_deg=tuple(fa),
            echo_time_ms=tuple(te),
            repetition_time_ms=tuple(tr),
            slice_order=tuple(s for g in groups for s in g),
            inversions=inversions,
            inversion_duration_ms=float(cfg["inversion_duration_ms"]),
            volume_pause_ms=float(cfg["volume_pause_ms"]),
            dummy_passes=int(cfg["dummy_passes"]),
            slice_slots=tuple(k for k, g in enumerate(groups) for _ in g),
            inversion_efficiency=inversion_efficiency,
        )

    def to_sidecar(self) -> dict[str, Any]:
        """BIDS-style sidecar fields (seconds for times, degrees for angles)."""
        return {
            "FlipAngle": [round(x, 6) for x in self.flip_angle_deg],
            "EchoTime": [round(x / 1000.0, 9) for x in self.echo_time_ms],
            "RepetitionTime": [round(x / 1000.0, 9) for x in self.repetition_time_ms],
            "SliceOrder": list(self.slice_order),
            "SliceTiming": self.slice_timing_s(0),
            "MultibandAccelerationFactor": self.multiband,
            "InversionPulses": [{"Measurement": m + 1, "BeforeSlot": s} for m, s in self.inversions],
            "InversionDuration": self.inversion_duration_ms / 1000.0,
            "VolumePause": self.volume_pause_ms / 1000.0,
            "DummyPasses": self.dummy_passes,
            "InversionEfficiency": self.inversion_efficiency,
        }

    @classmethod
    def from_sidecar(cls, sidecar: Mapping[str, Any]) -> Protocol:
        """Inverse of :meth:`to_sidecar`; raises :class:`ProtocolError` naming the bad field.

        Every key of :data:`REQUIRED_KEYS` must be present (``InversionPulses: []`` for a sequence
        without inversions), plus ``SliceOrder`` or ``SliceTiming`` and, with inversions,
        ``InversionDuration``. Values are checked for their unit (seconds, degrees) and range.
        """
        for key in ("FlipAngle", "EchoTime", "RepetitionTime"):
            if key not in sidecar:
                raise ProtocolError(f"sidecar lacks {key}")
            if not isinstance(sidecar[key], list):
                raise ProtocolError(f"sidecar {key} must be a list (one value per measurement)")
        if "SliceOrder" not in sidecar and "SliceTiming" not in sidecar:
            raise ProtocolError("sidecar lacks SliceOrder and SliceTiming (the slice acquisition order)")
        for key in REQUIRED_KEYS:
            if key not in sidecar:
                raise ProtocolError(f"sidecar lacks {key}{_HINTS.get(key, '')}")
        try:
            fa = [float(x) for x in sidecar["FlipAngle"]]
            te = [float(x) for x in sidecar["EchoTime"]]
            tr = [float(x) for x in sidecar["RepetitionTime"]]
            pulses = sidecar["InversionPulses"]
            if not isinstance(pulses, list):
                raise ProtocolError("sidecar InversionPulses must be a list ([] for none)")
            inversions = tuple((int(p["Measurement"]) - 1, int(p["BeforeSlot"])) for p in pulses)
            if inversions and "InversionDuration" not in sidecar:
                raise ProtocolError("sidecar lacks InversionDuration (the inversion pulses' duration)")
            inv_dur = float(sidecar.get("InversionDuration", 0.0))
            pause = float(sidecar["VolumePause"])
            dummies = sidecar["DummyPasses"]
            if isinstance(dummies, bool) or not isinstance(dummies, int | float) or dummies != int(dummies):
                raise ProtocolError(f"sidecar DummyPasses must be a whole number, got {dummies!r}")
            _check_units(fa, te, tr, inv_dur, pause)
            order, slots = _slice_layout(sidecar, tr)
            return cls(
                flip_angle_deg=tuple(fa),
                echo_time_ms=tuple(_ms(x) for x in te),
                repetition_time_ms=tuple(_ms(x) for x in tr),
                slice_order=order,
                inversions=inversions,
                inversion_duration_ms=_ms(inv_dur),
                volume_pause_ms=_ms(pause),
                dummy_passes=int(dummies),
                slice_slots=slots,
                inversion_efficiency=str(sidecar["InversionEfficiency"]),
            )
        except (TypeError, KeyError) as exc:
            raise ProtocolError(f"malformed sidecar timing field: {exc}") from exc

    def timing_key(self) -> str:
        """Stable hash of the timing and the inversion model: equal keys give identical dictionaries."""
        blob = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_HINTS = {
    "InversionPulses": " (the inversion schedule; [] if the sequence has none)",
    "DummyPasses": " (passes before the first readout; 0 if none)",
    "VolumePause": " (pause after each pass, s)",
    "InversionEfficiency": " (perfect or b1: config sequence_model.inversion_efficiency)",
}


def _span(values: Sequence[float]) -> str:
    return f"{min(values):g} to {max(values):g}"


def _check_units(fa: list[float], te: list[float], tr: list[float], inv_dur: float, pause: float) -> None:
    """Unit and range plausibility of the timing lists (BIDS: seconds; flip angles in degrees)."""
    if min(te) <= 0 or min(tr) <= 0:
        raise ProtocolError("EchoTime and RepetitionTime must be positive")
    if max(te) > 1.0:
        raise ProtocolError(f"EchoTime values {_span(te)} look like milliseconds (BIDS sidecars give seconds)")
    if max(tr) > 60.0:
        raise ProtocolError(
            f"RepetitionTime values {_span(tr)} look like milliseconds (BIDS sidecars give seconds)"
        )
    if min(tr) < 0.005:
        raise ProtocolError(f"RepetitionTime values {_span(tr)} s are implausibly short")
    if min(fa) <= 0 or max(fa) > 180:
        raise ProtocolError(f"FlipAngle values {_span(fa)} outside (0, 180] degrees")
    if max(fa) <= math.pi:
        raise ProtocolError(f"FlipAngle values {_span(fa)} look like radians (BIDS sidecars give degrees)")
    if inv_dur > 0.2:
        raise ProtocolError(f"InversionDuration {inv_dur:g} s is implausibly long (milliseconds?)")
    if pause >= min(tr):
        raise ProtocolError(
            f"VolumePause {pause:g} s is not shorter than the shortest RepetitionTime {min(tr):g} s (milliseconds?)"
        )


def _slice_layout(sidecar: Mapping[str, Any], tr_s: list[float]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(slice order, slot of each entry) from ``SliceTiming`` and / or ``SliceOrder`` and
    ``MultibandAccelerationFactor``; where two are given they must agree."""
    mb_raw = sidecar.get("MultibandAccelerationFactor")
    mb: int | None = None
    if mb_raw is not None:
        if isinstance(mb_raw, bool) or not isinstance(mb_raw, int | float) or mb_raw < 1 or mb_raw != int(mb_raw):
            raise ProtocolError(f"MultibandAccelerationFactor must be a whole number >= 1, got {mb_raw!r}")
        mb = int(mb_raw)
    order_given = sidecar.get("SliceOrder")
    if order_given is not None:
        if not isinstance(order_given, list):
            raise ProtocolError("sidecar SliceOrder must be a list of slice indices")
        order_given = [int(x) for x in order_given]
    if "SliceTiming" in sidecar:
        st = sidecar["SliceTiming"]
        if not isinstance(st, list) or not st:
            raise ProtocolError("sidecar SliceTiming must be a list (one time per slice)")
        times = [float(x) for x in st]
        if min(times) < 0 or max(times) >= tr_s[0]:
            raise ProtocolError(
                f"SliceTiming values {_span(times)} lie outside [0, RepetitionTime {tr_s[0]:g} s) (milliseconds?)"
            )
        ranked = sorted(range(len(times)), key=lambda s: (times[s], s))
        slots: list[int] = []
        for j, s in enumerate(ranked):
            new = j > 0 and times[s] - times[ranked[j - 1]] > SLICE_TIMING_TOLERANCE_S
            slots.append(0 if j == 0 else slots[-1] + int(new))
        sizes = np.bincount(slots).tolist()
        derived = max(sizes)
        if mb is not None and derived != mb:
            raise ProtocolError(
                f"SliceTiming excites {derived} slice(s) at once, MultibandAccelerationFactor says {mb}"
            )
        if order_given is not None and order_given != ranked:
            raise ProtocolError("SliceOrder disagrees with the order of SliceTiming")
        return tuple(ranked), tuple(slots)
    assert order_given is not None
    if mb is not None and mb > 1:
        raise ProtocolError(
            f"MultibandAccelerationFactor {mb} without SliceTiming: which slices share a slot is not stated"
        )
    return tuple(order_given), tuple(range(len(order_given)))


def resolve_sidecar(
    layers: Sequence[Mapping[str, Any]], stated: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Merge sidecar layers (BIDS inheritance: first = top level, later ones override) with the timing
    values the user states in the config (``stated``: sidecar keys in sidecar units).

    A stated key fills a key that no sidecar has; where a sidecar has it too, the two must agree,
    otherwise :class:`ProtocolError`. Returns the merged sidecar and the keys taken from the config.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    from_config: list[str] = []
    for key, value in (stated or {}).items():
        if value is None:
            continue
        if key in merged:
            if not _same(merged[key], value):
                where = ("sequence_model.inversion_efficiency" if key == "InversionEfficiency"
                         else f"mrf_timing.{key}")
                raise ProtocolError(f"sidecar {key} {_short(merged[key])} disagrees with config {where} "
                                    f"{_short(value)}")
            continue
        merged[key] = value
        from_config.append(key)
    return merged, sorted(from_config)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
