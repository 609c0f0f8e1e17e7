"""MRF dictionary: grid, atoms, SVD rank, clusters, save/load, timing-key checks, caching."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from mrflesion.mrf.dictionary import (
    DictionaryError,
    DictionaryGrid,
    MRFDictionary,
    build_dictionary,
    dictionary_for_sidecar,
    geometric_values,
)
from mrflesion.mrf.sequence import Protocol
from mrflesion.mrf.signal import simulate

SMALL_GRID = {"t1_ms": [300, 3500], "t2star_ms": [10, 2500], "step": 0.25, "b1_values": [0.8, 1.0, 1.2]}


@pytest.fixture(scope="module")
def protocol() -> Protocol:
    return Protocol.default(4)


@pytest.fixture(scope="module")
def dictionary(protocol: Protocol) -> MRFDictionary:
    return build_dictionary(protocol, DictionaryGrid(), slices=[1, 2])


def test_geometric_values_endpoints_and_step() -> None:
    v = geometric_values(300, 3500, 0.05)
    assert v[0] == 300 and v[-1] == 3500
    ratio = v[1:] / v[:-1]
    assert np.all(ratio <= 1.05 + 1e-12) and np.allclose(ratio, ratio[0])
    assert ratio[0] > 1.045  # not needlessly fine
    assert geometric_values(5, 5, 0.05).tolist() == [5.0]


def test_paper_grid_size_and_ranges() -> None:
    grid = DictionaryGrid()
    t1, t2, b1 = grid.parameters()
    assert grid.t1_values().size == 52 and grid.t2star_values().size == 115
    assert 43_000 <= t1.size <= 46_000  # "about 44k atoms": 44,883
    assert t1.min() == 300 and t1.max() == 3500
    assert t2.min() == 10 and t2.max() == 2500
    assert np.allclose(np.unique(b1), np.round(np.arange(0.6, 1.41, 0.1), 10))
    assert not np.any(t2 > t1)


def test_grid_from_config() -> None:
    g = DictionaryGrid.from_config({"t1_ms": [400, 3000], "b1_range": [0.7, 1.3], "b1_step": 0.2})
    assert g.t1_range_ms == (400.0, 3000.0)
    assert g.b1_values == pytest.approx((0.7, 0.9, 1.1, 1.3))
    assert DictionaryGrid.from_config(None) == DictionaryGrid()
    assert g.key() != DictionaryGrid().key()
    with pytest.raises(ValueError, match="unknown"):
        DictionaryGrid.from_config({"t1": [1, 2]})


def test_atoms_unit_norm_and_match_signal_model(dictionary: MRFDictionary, protocol: Protocol) -> None:
    sd = dictionary.slice(2)
    assert sd.atoms.dtype == np.float32 and sd.atoms.shape == (dictionary.n_atoms, 35)
    assert np.allclose(np.linalg.norm(sd.atoms, axis=1), 1.0, atol=1e-5)
    i = np.array([0, 1234, dictionary.n_atoms - 1])
    ref = np.abs(simulate(protocol, 2, dictionary.t1[i], dictionary.t2star[i], dictionary.b1[i]))
    assert np.allclose(sd.atoms[i] * sd.norms[i, None], ref, rtol=1e-5, atol=1e-7)
    # magnitude atoms: the signed signal goes negative after inversions
    signed = simulate(protocol, 2, dictionary.t1, dictionary.t2star, dictionary.b1)
    assert np.any(signed < 0) and np.all(sd.atoms >= 0)
    # slice positions differ (staggered inversions)
    assert not np.allclose(dictionary.slice(1).atoms, sd.atoms)


def test_svd_rank_small(dictionary: MRFDictionary) -> None:
    for k in dictionary.slice_indices:
        sd = dictionary.slice(k)
        r = dictionary.rank(k)
        print(f"slice position {k}: rank {r} keeps {sd.energy_fraction():.5f} of the energy")
        assert 3 <= r <= 12
        assert sd.energy_fraction() >= 0.999
        assert sd.energy_fraction(r - 1) < 0.999


def test_clusters_cover_all_atoms(dictionary: MRFDictionary) -> None:
    sd = dictionary.slice(1)
    cl = sd.clusters()
    assert np.array_equal(np.sort(cl["order"]), np.arange(sd.n_atoms))
    assert cl["offsets"][-1] == sd.n_atoms and np.all(np.diff(cl["offsets"]) > 0)
    # cone angle bounds every atom of its cluster
    lab = sd.labels
    cos = np.einsum("ij,ij->i", sd.atoms.astype(np.float64), cl["medoids"][lab].astype(np.float64))
    assert np.all(np.arccos(np.clip(cos, -1, 1)) <= cl["theta"][lab])


def test_save_load_round_trip(dictionary: MRFDictionary, tmp_path) -> None:
    compact = dictionary.save(tmp_path / "d.npz")
    full = dictionary.save(tmp_path / "full.npz", include_atoms=True)
    assert compact.stat().st_size < 2_000_000 < full.stat().st_size
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left
    for p in (compact, full):
        d2 = MRFDictionary.load(p)
        assert d2.timing_key == dictionary.timing_key
        assert d2.grid == dictionary.grid
        assert d2.slice_indices == (1, 2)
        for k in (1, 2):
            a, b = d2.slice(k), dictionary.slice(k)
            assert np.array_equal(a.atoms, b.atoms)
            assert np.allclose(a.norms, b.norms)
            assert a.rank == b.rank and np.array_equal(a.labels, b.labels)
    with pytest.raises(DictionaryError, match="no slice position 0"):
        MRFDictionary.load(compact).slice(0)


def test_load_detects_signal_model_change(dictionary: MRFDictionary, tmp_path) -> None:
    p = dictionary.save(tmp_path / "d.npz")
    with np.load(p) as z:
        data = {k: z[k] for k in z.files}
    data["s1_check"] = data["s1_check"] * 1.01
    bad = tmp_path / "bad.npz"
    np.savez(bad, **data)
    with pytest.raises(DictionaryError, match="signal model changed"):
        MRFDictionary.load(bad).slice(1)
    (tmp_path / "junk.npz").write_bytes(b"not a dictionary")
    with pytest.raises(DictionaryError):
        MRFDictionary.load(tmp_path / "junk.npz")


def test_timing_key_mismatch(dictionary: MRFDictionary, protocol: Protocol) -> None:
    dictionary.check_timing(protocol)
    sidecar = protocol.to_sidecar()
    sidecar["DummyPasses"] = 3
    other = Protocol.from_sidecar(sidecar)
    with pytest.raises(DictionaryError, match="timing key mismatch"):
        dictionary.check_timing(other, "sub-01 MRF")


def test_dictionary_for_sidecar_caches_and_races(protocol: Protocol, tmp_path) -> None:
    grid = DictionaryGrid.from_config(SMALL_GRID)
    sidecar = protocol.to_sidecar()
    paths: list = []
    errors: list = []

    def work() -> None:
        try:
            paths.append(dictionary_for_sidecar(sidecar, grid, tmp_path, n_clusters=32))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1
    path = paths[0]
    assert protocol.timing_key() in path.name
    mtime = path.stat().st_mtime_ns
    assert dictionary_for_sidecar(sidecar, grid, tmp_path, n_clusters=32) == path
    assert path.stat().st_mtime_ns == mtime  # cached, not rebuilt
    d = MRFDictionary.load(path)
    assert d.slice_indices == (0, 1, 2, 3) and d.grid == grid
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    # another grid, another file
    other = dictionary_for_sidecar(sidecar, DictionaryGrid.from_config({**SMALL_GRID, "step": 0.3}), tmp_path,
                                   n_clusters=32)
    assert other != path


def test_sms_slots_share_one_dictionary(tmp_path) -> None:
    """SMS: the slice positions of one slot have one timing, so one set of atoms (one dictionary per
    distinct slice timing); saved once, loaded shared, matched slice by slice as before."""
    p = Protocol.default(9, multiband=3)  # 3 slots: (0, 3, 6), (2, 5, 8), (1, 4, 7)
    d = build_dictionary(p, DictionaryGrid.from_config(SMALL_GRID), n_clusters=8)
    assert d.slice_indices == tuple(range(9))
    assert d.slice(3) is d.slice(0) and d.slice(8) is d.slice(2)
    assert not np.array_equal(d.slice(0).atoms, d.slice(1).atoms)
    path = d.save(tmp_path / "sms.npz")
    with np.load(path) as z:
        assert sorted(k for k in z.files if k.endswith("_basis")) == ["s0_basis", "s1_basis", "s2_basis"]
    d2 = MRFDictionary.load(path)
    assert d2.timing_key == d.timing_key and d2.slice_indices == d.slice_indices
    for k in range(9):
        np.testing.assert_array_equal(d2.slice(k).atoms, d.slice(k).atoms)
        assert d2.rank(k) == d.rank(k)
    # the SMS timing is not the single-slice one: another key, another cache file
    assert Protocol.default(9).timing_key() != p.timing_key()
