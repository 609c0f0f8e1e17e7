"""Inversion efficiency: a dictionary whose inversion model differs from the data's biases T1 with B1.

The authors' released dictionary code inverts Mz perfectly whatever B1 (an adiabatic pulse); a hard
180-degree pulse scaled by B1 leaves ``Mz cos(pi B1)``. On the phantom both sides share one model, so
the bias cannot show there; this test simulates data with one model and matches it with dictionaries
of both: the same model recovers T1, the other is off by several per cent at B1 0.7 and 1.3.
"""

from __future__ import annotations

import numpy as np
import pytest

from mrflesion.mrf.dictionary import DictionaryGrid, build_dictionary
from mrflesion.mrf.sequence import Protocol
from mrflesion.mrf.signal import simulate

N_SLICES = 20
SLICE = 10  # a slice in the middle of the slab (its own inversion timing)
# white matter to grey matter (T1 ms, T2* ms)
TISSUES = ((700.0, 45.0), (900.0, 50.0), (1100.0, 55.0), (1450.0, 62.0), (1800.0, 70.0))
GRID = DictionaryGrid(step=0.02, t2star_range_ms=(20.0, 200.0), b1_values=(0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3))


def _brute_force_t1(dictionary, signals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T1, B1) of the atom with the largest inner product with each (magnitude) signal."""
    atoms = dictionary.slice(SLICE).atoms.astype(np.float64)
    x = np.abs(signals) / np.linalg.norm(signals, axis=-1, keepdims=True)
    best = np.argmax(x @ atoms.T, axis=1)
    return dictionary.t1[best], dictionary.b1[best]


@pytest.fixture(scope="module")
def dictionaries() -> dict:
    return {m: build_dictionary(Protocol.default(N_SLICES, inversion_efficiency=m), GRID, slices=[SLICE],
                                n_clusters=8) for m in ("perfect", "b1")}


@pytest.mark.parametrize("data_model", ["perfect", "b1"])
def test_t1_bias_when_inversion_models_disagree(dictionaries: dict, data_model: str) -> None:
    other = "b1" if data_model == "perfect" else "perfect"
    protocol = Protocol.default(N_SLICES, inversion_efficiency=data_model)
    report = []
    for b1 in (0.7, 1.3):
        t1_true = np.array([v[0] for v in TISSUES])
        t2s_true = np.array([v[1] for v in TISSUES])
        signals = simulate(protocol, SLICE, t1_true, t2s_true, b1)
        t1_same, b1_same = _brute_force_t1(dictionaries[data_model], signals)
        t1_other, _ = _brute_force_t1(dictionaries[other], signals)
        err_same = np.abs(t1_same / t1_true - 1)
        err_other = np.abs(t1_other / t1_true - 1)
        bias = 100 * (t1_other / t1_true - 1)
        report.append(f"B1 {b1}: |T1 error| same model <= {100 * err_same.max():.1f} %, other model "
                      f"{' '.join(f'{x:+.1f}' for x in bias)} % (T1 {', '.join(f'{x:g}' for x in t1_true)} ms)")
        # the dictionary of the data's own model: T1 within the grid step, B1 exact
        assert err_same.max() <= 0.011 and np.allclose(b1_same, b1)
        # the other model: a T1 bias that depends on B1 and T1, above 5 % in part of the WM-GM range
        assert err_other.max() > 0.05, report[-1]
    print(f"data {data_model}, dictionary {other}: " + "; ".join(report))


def test_inversion_model_is_in_the_cache_key(tmp_path) -> None:
    from mrflesion.mrf.dictionary import dictionary_for_sidecar

    grid = DictionaryGrid(step=0.5, t2star_range_ms=(20.0, 200.0), b1_values=(1.0,))
    paths = {m: dictionary_for_sidecar(Protocol.default(2, inversion_efficiency=m).to_sidecar(), grid, tmp_path,
                                       n_clusters=4) for m in ("perfect", "b1")}
    assert paths["perfect"] != paths["b1"] and all(p.is_file() for p in paths.values())
