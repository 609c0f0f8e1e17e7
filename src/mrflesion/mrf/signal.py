"""The one MRF-EPI signal model, shared by the phantom and the dictionary.

Perfect spoiling, hard excitation pulses scaled by B1, exponential relaxation between events:

* relaxation over ``dt``:   Mz <- 1 + (Mz - 1) * exp(-dt / T1)      (equilibrium magnetisation 1)
* excitation with angle a:  signal = Mz * sin(B1 * a) * exp(-TE / T2*),  Mz <- Mz * cos(B1 * a)
* inversion (180 deg):      Mz <- -Mz                 (``protocol.inversion_efficiency == "perfect"``:
                                                       adiabatic, B1-independent; the default and the
                                                       authors' released dictionary code)
                            Mz <- Mz * cos(B1 * pi)   (``"b1"``: a hard pulse scaled by B1)

The recursion runs over the slice's events (dummy passes, inversions, readouts) and is vectorised
over any broadcastable array of (T1, T2*, B1), so one call simulates a whole dictionary or a whole
phantom slice. The returned signal is for unit proton density; scale by M0 outside.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from .sequence import DUMMY, INVERSION, READOUT, Protocol


def simulate(
    protocol: Protocol,
    slice_index: int,
    t1_ms: ArrayLike,
    t2s_ms: ArrayLike,
    b1: ArrayLike = 1.0,
    dtype: np.dtype | type = np.float64,
) -> np.ndarray:
    """Magnitude signal of every measurement for one slice position.

    Returns an array of shape ``broadcast(t1, t2s, b1).shape + (n_measurements,)``.
    """
    t1, t2s, b1v = np.broadcast_arrays(
        np.asarray(t1_ms, dtype=np.float64), np.asarray(t2s_ms, dtype=np.float64), np.asarray(b1, dtype=np.float64)
    )
    if np.any(t1 <= 0) or np.any(t2s <= 0):
        raise ValueError("T1 and T2* must be positive")
    ev = protocol.events(slice_index)
    shape = t1.shape
    r1 = 1.0 / t1.ravel()
    r2s = 1.0 / t2s.ravel()
    b1f = b1v.ravel()
    mz = np.ones_like(r1)
    out = np.empty((protocol.n_measurements, r1.size), dtype=np.float64)
    t_prev = 0.0
    cos_inv = np.cos(np.pi * b1f) if protocol.inversion_efficiency == "b1" else np.full_like(b1f, -1.0)
    for kind, t, flip, te, m in zip(
        ev["kind"], ev["time_ms"], ev["flip_deg"], ev["te_ms"], ev["measurement"], strict=True
    ):
        dt = t - t_prev
        if dt > 0:
            e1 = np.exp(-dt * r1)
            mz = 1.0 + (mz - 1.0) * e1
        t_prev = t
        if kind == INVERSION:
            mz = mz * cos_inv
            continue
        a = np.deg2rad(flip) * b1f
        if kind == READOUT:
            out[m] = mz * np.sin(a) * np.exp(-te * r2s)
        elif kind != DUMMY:  # pragma: no cover - event kinds are fixed
            raise ValueError(f"unknown event kind {kind}")
        mz = mz * np.cos(a)
    return np.ascontiguousarray(out.T.reshape(shape + (protocol.n_measurements,))).astype(dtype, copy=False)
