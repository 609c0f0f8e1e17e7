"""The shared MRF-EPI signal model against closed forms."""

from __future__ import annotations

import numpy as np
import pytest

from mrflesion.mrf.sequence import Protocol, ProtocolError, interleaved_order
from mrflesion.mrf.signal import simulate


def _protocol(n_meas: int, fa: float, te: float, tr: float, n_slices: int = 1, **kw) -> Protocol:
    return Protocol(
        flip_angle_deg=(fa,) * n_meas,
        echo_time_ms=(te,) * n_meas,
        repetition_time_ms=(tr,) * n_meas,
        slice_order=interleaved_order(n_slices),
        inversions=kw.pop("inversions", ()),
        dummy_passes=kw.pop("dummy_passes", 0),
        **kw,
    )


@pytest.mark.parametrize("b1", [0.6, 1.0, 1.3])
def test_single_pulse(b1: float) -> None:
    p = _protocol(1, fa=50.0, te=20.0, tr=200.0)
    s = simulate(p, 0, 1000.0, 40.0, b1)
    expected = np.sin(np.deg2rad(50.0) * b1) * np.exp(-20.0 / 40.0)
    assert s.shape == (1,)
    assert s[0] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("t1,fa,tr", [(900.0, 30.0, 300.0), (1500.0, 60.0, 1000.0), (4000.0, 86.0, 3500.0)])
def test_steady_state_constant_tr_fa(t1: float, fa: float, tr: float) -> None:
    p = _protocol(300, fa=fa, te=10.0, tr=tr)
    s = simulate(p, 0, t1, 60.0, 1.0)
    e1 = np.exp(-tr / t1)
    a = np.deg2rad(fa)
    mss = (1 - e1) / (1 - np.cos(a) * e1)
    assert s[-1] == pytest.approx(mss * np.sin(a) * np.exp(-10.0 / 60.0), rel=1e-9)


@pytest.mark.parametrize("ti_slot", [1, 3])
def test_inversion_recovery(ti_slot: int) -> None:
    # 4 slices, slot 12.5 ms (TR 70 ms, pause 20 ms); inversion before slot 0 of measurement 1.
    # The slice in slot `ti_slot` is excited TI = inversion_duration + ti_slot * slot after the pulse,
    # from full equilibrium, so Mz = 1 - 2 exp(-TI / T1).
    p = _protocol(1, fa=90.0, te=0.0, tr=70.0 + 15.0, n_slices=4, inversions=((0, 0),))
    slot = p.slot_duration_ms(0)
    assert slot == pytest.approx(12.5)
    slice_index = p.slice_order[ti_slot]
    t1 = 800.0
    ti = 15.0 + ti_slot * slot
    s = simulate(p, slice_index, t1, 1e6, 1.0)
    assert s[0] == pytest.approx(1 - 2 * np.exp(-ti / t1), rel=1e-12)


def test_inversion_scaled_by_b1() -> None:
    p = _protocol(1, fa=90.0, te=0.0, tr=85.0, n_slices=4, inversions=((0, 0),), inversion_efficiency="b1")
    s = simulate(p, 0, 1e9, 1e9, 0.5)  # T1 -> infinity: no recovery, cos(pi/2) = 0 leaves Mz = 0
    assert abs(s[0]) < 1e-7  # only the 1e-8 recovery over ~30 ms at T1 = 1e9 ms remains


@pytest.mark.parametrize("b1", [0.5, 0.7, 1.0, 1.3])
def test_perfect_inversion_ignores_b1(b1: float) -> None:
    # The default (the authors' released code, an adiabatic pulse): Mz -> -Mz whatever B1; the
    # excitation is still B1-scaled: signal = -sin(B1 * 90 deg).
    p = _protocol(1, fa=90.0, te=0.0, tr=85.0, n_slices=4, inversions=((0, 0),))
    assert p.inversion_efficiency == "perfect"
    s = simulate(p, 0, 1e9, 1e9, b1)
    assert s[0] == pytest.approx(-np.sin(np.deg2rad(90.0) * b1), abs=1e-7)


def test_inversion_models_differ_away_from_b1_one() -> None:
    # Normalised fingerprints of the two models agree at B1 = 1 and differ by up to ~0.25 at 0.6 / 1.4.
    out = {}
    for model in ("perfect", "b1"):
        p = Protocol.default(20, inversion_efficiency=model)
        s = np.abs(simulate(p, 10, [900.0] * 3, [50.0] * 3, [0.6, 1.0, 1.4]))
        out[model] = s / np.linalg.norm(s, axis=-1, keepdims=True)
    d = np.abs(out["perfect"] - out["b1"]).max(axis=-1)
    assert d[1] < 1e-12
    assert d[0] > 0.1 and d[2] > 0.1
    assert Protocol.default(20).timing_key() != Protocol.default(20, inversion_efficiency="b1").timing_key()


def test_sms_slots_share_timing_and_shorten_tr() -> None:
    p1, p3 = Protocol.default(21), Protocol.default(21, multiband=3)
    assert (p1.n_slots, p1.multiband) == (21, 1) and (p3.n_slots, p3.multiband) == (7, 3)
    assert p3.slot_groups()[0] == (0, 7, 14)
    # a pass has a third of the slots: TR = n_slots * (TE + overhead) + pause (+ inversion)
    assert p3.repetition_time_ms[1] == pytest.approx(7 * (p3.echo_time_ms[1] + 58.5) + 20.0)
    assert p3.repetition_time_ms[1] < p1.repetition_time_ms[1] / 2.5
    # slices excited together share their fingerprint; other slots differ
    s = np.stack([simulate(p3, k, 1000.0, 50.0, 1.0) for k in range(21)])
    np.testing.assert_array_equal(s[0], s[7])
    np.testing.assert_array_equal(s[0], s[14])
    assert np.abs(s[0] - s[1]).max() > 1e-4
    assert {p3.timing_representative(k) for k in range(21)} == {g[0] for g in p3.slot_groups()}
    # a slab that the factor does not divide: 20 slices, 7 slots, one slot of two slices
    p20 = Protocol.default(20, multiband=3)
    assert p20.n_slots == 7 and sorted(len(g) for g in p20.slot_groups()) == [2, 3, 3, 3, 3, 3, 3]


@pytest.mark.parametrize("mb", [1, 3])
def test_slice_timing_is_read(mb: int) -> None:
    p = Protocol.default(12, multiband=mb)
    side = p.to_sidecar()
    assert side["MultibandAccelerationFactor"] == mb and len(side["SliceTiming"]) == 12
    only_timing = {k: v for k, v in side.items() if k != "SliceOrder"}
    assert Protocol.from_sidecar(only_timing) == p
    if mb == 1:
        only_order = {k: v for k, v in side.items() if k not in ("SliceTiming", "MultibandAccelerationFactor")}
        assert Protocol.from_sidecar(only_order) == p


def test_slice_timing_contradictions() -> None:
    side = Protocol.default(12, multiband=3).to_sidecar()
    with pytest.raises(ProtocolError, match="MultibandAccelerationFactor says 2"):
        Protocol.from_sidecar(side | {"MultibandAccelerationFactor": 2})
    with pytest.raises(ProtocolError, match="SliceOrder disagrees"):
        Protocol.from_sidecar(side | {"SliceOrder": list(range(12))})
    with pytest.raises(ProtocolError, match="without SliceTiming"):
        Protocol.from_sidecar({k: v for k, v in side.items() if k != "SliceTiming"})


@pytest.mark.parametrize("key,scale,match", [
    ("EchoTime", 1000.0, "EchoTime values 16 to 76.5 look like milliseconds"),
    ("RepetitionTime", 1000.0, "RepetitionTime values .* look like milliseconds"),
    ("FlipAngle", np.pi / 180.0, "look like radians"),
])
def test_units_are_checked(key: str, scale: float, match: str) -> None:
    side = Protocol.default(4).to_sidecar()
    side[key] = [x * scale for x in side[key]]
    with pytest.raises(ProtocolError, match=match):
        Protocol.from_sidecar(side)


@pytest.mark.parametrize("key", ["InversionPulses", "DummyPasses", "VolumePause", "InversionEfficiency"])
def test_no_timing_key_is_assumed(key: str) -> None:
    side = Protocol.default(4).to_sidecar()
    del side[key]
    with pytest.raises(ProtocolError, match=f"sidecar lacks {key}"):
        Protocol.from_sidecar(side)


def test_vectorised_matches_scalar_and_slices_differ() -> None:
    p = Protocol.default(6)
    t1 = np.array([[800.0, 1500.0], [3000.0, 400.0]])
    t2s = np.array([[50.0, 70.0], [1200.0, 20.0]])
    b1 = np.array([[1.0, 0.8], [1.2, 0.9]])
    s = simulate(p, 2, t1, t2s, b1)
    assert s.shape == (2, 2, 35)
    for i in range(2):
        for j in range(2):
            np.testing.assert_allclose(s[i, j], simulate(p, 2, t1[i, j], t2s[i, j], b1[i, j]), rtol=1e-14)
    # Staggered inversions: every slice position has its own fingerprint.
    fps = np.stack([simulate(p, k, 1000.0, 50.0, 1.0) for k in range(6)])
    d = np.abs(fps[:, None] - fps[None]).max(axis=-1)
    assert (d[~np.eye(6, dtype=bool)] > 1e-4).all()


def test_default_protocol_matches_published_tr_range() -> None:
    p = Protocol.default(47)
    assert p.n_measurements == 35
    assert min(p.repetition_time_ms) == pytest.approx(3530, abs=10)
    assert max(p.repetition_time_ms) == pytest.approx(6370, abs=10)
    assert min(p.echo_time_ms) == 16.0 and max(p.echo_time_ms) == pytest.approx(76.5)
    assert len(p.inversions) == 15 and len({s for _, s in p.inversions}) == 15
    assert p.slice_order[:3] == (0, 2, 4)


@pytest.mark.parametrize("n", [1, 5, 24, 47])
def test_sidecar_round_trip(n: int) -> None:
    p = Protocol.default(n)
    q = Protocol.from_sidecar(p.to_sidecar())
    assert q == p and q.timing_key() == p.timing_key()
    assert Protocol.default(n + 1).timing_key() != p.timing_key()


def test_bad_sidecar_names_field() -> None:
    side = Protocol.default(4).to_sidecar()
    side["EchoTime"] = side["EchoTime"][:-1]
    with pytest.raises(ProtocolError, match="same length"):
        Protocol.from_sidecar(side)
    del side["FlipAngle"]
    with pytest.raises(ProtocolError, match="FlipAngle"):
        Protocol.from_sidecar(side)
