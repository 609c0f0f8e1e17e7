"""Benchmark: mrflesion.denoise.mppca against dipy.denoise.localpca.mppca on a synthetic MRF series.

    .venv/bin/python benchmarks/bench_mppca.py                    # 96x96x30x35, as in the brief
    .venv/bin/python benchmarks/bench_mppca.py --size 48 48 16    # quick run
    .venv/bin/python benchmarks/bench_mppca.py --input sub-01_acq-MRFEPI_MRF.nii.gz [--mask mask.nii.gz]

Prints dipy time, our time (default fast mode, or ``--exact``), the ratio, the relative RMS difference of
the denoised series and of the sigma maps to dipy's (inside the mask), and the sigma error against the true
noise level (synthetic data; median over the mask eroded by 2 x patch radius). One run each, same mask and
patch radius. The timing is wall-clock on whatever else runs on the machine: the load average is printed
alongside, and, since dipy is single-threaded, also the ratio of dipy's CPU time to our wall time (what
the ratio would be if dipy's process had had a core to itself).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from synthmrf import synthetic_mrf  # noqa: E402


def bench_series(
    shape: tuple[int, int, int], sigma: float = 0.02, seed: int = 0, rician: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The benchmark's synthetic series (smoother fields than the tests') -> (noisy, clean, mask); M0 ~ 1."""
    return synthetic_mrf(shape, sigma, seed, rician, smoothing=3.0, m0_smoothing=4.0, z_radius=1.2, b1=(0.8, 0.4))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, nargs=3, default=(96, 96, 30), metavar=("X", "Y", "Z"))
    ap.add_argument("--sigma", type=float, default=0.02, help="Gaussian noise sigma (signal max ~0.5)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rician", action="store_true")
    ap.add_argument("--input", help="4D NIfTI instead of the synthetic series")
    ap.add_argument("--mask", help="3D NIfTI mask (with --input)")
    ap.add_argument("--no-mask", action="store_true", help="denoise the whole volume (synthetic data)")
    ap.add_argument("--patch-radius", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--exact", action="store_true", help="our exact (dipy-equivalent) mode")
    ap.add_argument("--stride", type=int, nargs="+", default=None, help="patch-centre stride (1 or 3 ints)")
    ap.add_argument("--skip-dipy", action="store_true")
    args = ap.parse_args(argv)

    from mrflesion.denoise import DEFAULT_STRIDE, mppca

    if args.input:
        import nibabel as nib

        data = np.asanyarray(nib.load(args.input).dataobj).astype(np.float64)
        mask = np.asanyarray(nib.load(args.mask).dataobj) > 0 if args.mask else None
        true_sigma = None
    else:
        data, _, mask = bench_series(tuple(args.size), args.sigma, args.seed, args.rician)
        true_sigma = args.sigma
        if args.no_mask:
            mask = None
    print(
        f"data {data.shape}, mask voxels {'all' if mask is None else int(mask.sum())}, "
        f"patch radius {args.patch_radius}, cpus {len(os.sched_getaffinity(0))}"
    )
    print(f"load average before: {os.getloadavg()}")

    stride = None if args.stride is None else (args.stride[0] if len(args.stride) == 1 else tuple(args.stride))
    mode = "exact" if args.exact else f"fast, stride {stride or DEFAULT_STRIDE}"
    t, c = time.perf_counter(), time.process_time()
    ours, sig = mppca(
        data,
        mask=mask,
        patch_radius=args.patch_radius,
        device=args.device,
        dtype=args.dtype,
        block_size=args.block_size,
        exact=args.exact,
        stride=stride,
    )
    t_ours, c_ours = time.perf_counter() - t, time.process_time() - c
    print(
        f"ours ({mode}, {args.dtype}, device {args.device}): {t_ours:.2f} s wall, {c_ours:.2f} s CPU   "
        f"load {os.getloadavg()}"
    )
    inside = np.ones(data.shape[:3], bool) if mask is None else mask
    if true_sigma is not None:
        from scipy.ndimage import binary_erosion

        core = binary_erosion(inside, iterations=2 * args.patch_radius) if mask is not None else inside
        med = float(np.median(sig[core]))
        print(
            f"sigma vs truth (median over the eroded mask): {med:.5f} vs {true_sigma:.5f}, "
            f"error {100 * (med / true_sigma - 1):+.2f} %"
        )
    if args.skip_dipy:
        return
    from dipy.denoise.localpca import mppca as dipy_mppca

    t, c = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # dipy's 0/0 in mask voxels that no patch covers
        ref, ref_sig = dipy_mppca(data, mask=mask, patch_radius=args.patch_radius, return_sigma=True)
    t_dipy, c_dipy = time.perf_counter() - t, time.process_time() - c
    print(f"dipy: {t_dipy:.2f} s wall, {c_dipy:.2f} s CPU   load {os.getloadavg()}")
    inside = inside & np.isfinite(ref_sig) & np.all(np.isfinite(ref), axis=-1)
    rel_rms = np.sqrt(np.mean((ours[inside] - ref[inside]) ** 2) / np.mean(ref[inside] ** 2))
    sig_rel = np.sqrt(np.mean((sig[inside] - ref_sig[inside]) ** 2) / np.mean(ref_sig[inside] ** 2))
    print(
        f"speed-up dipy/ours: {t_dipy / t_ours:.1f}x wall/wall, {c_dipy / t_ours:.1f}x dipy CPU/our wall, "
        f"{c_dipy / c_ours:.1f}x CPU/CPU"
    )
    print(f"relative RMS difference (denoised, in mask): {rel_rms:.2e}")
    print(
        f"relative RMS difference (sigma, in mask): {sig_rel:.2e}; "
        f"median sigma ours {np.median(sig[inside]):.5f} dipy {np.median(ref_sig[inside]):.5f}"
    )


if __name__ == "__main__":
    main()
