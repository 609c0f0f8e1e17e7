"""MPPCA denoising: agreement with dipy (exact and fast modes), noise level, denoising gain, file round-trip."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from numerics import U64, VARIANTS, MPDecisions, check_sigma, mp_decisions, mppca_centres, variant_result
from scipy.ndimage import binary_erosion, gaussian_filter
from synthmrf import synthetic_mrf

from mrflesion.denoise import _coverage, _mp_variance, _select_centres, denoise_file, mppca

SHAPE = (20, 20, 10)
SIGMA = 0.01  # signal amplitude ~0.1-0.5 for M0 ~ 1


def _synthetic(
    shape: tuple[int, int, int] = SHAPE, sigma: float = SIGMA, seed: int = 0, rician: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Low-rank MRF series from the project's signal model: (noisy, clean, brain mask)."""
    return synthetic_mrf(shape, sigma, seed, rician)


@pytest.fixture(scope="module")
def gaussian_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _synthetic()


@pytest.fixture(scope="module")
def dipy_masked(gaussian_data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    noisy, _, brain = gaussian_data
    return _dipy(noisy, brain)


def _dipy(data: np.ndarray, mask: np.ndarray | None, patch_radius: int = 2) -> tuple[np.ndarray, np.ndarray]:
    from dipy.denoise.localpca import mppca as dipy_mppca

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # dipy's 0/0 in uncovered voxels
        return dipy_mppca(data, mask=mask, patch_radius=patch_radius, return_sigma=True)


def _rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


def test_mp_variance_matches_dipy_classifier() -> None:
    from dipy.denoise.localpca import _pca_classifier

    rng = np.random.default_rng(3)
    import torch

    for n, m in ((125, 35), (27, 35), (125, 10)):
        for _ in range(20):
            k = int(rng.integers(0, 6))
            X = rng.standard_normal((n, m)) + (rng.standard_normal((n, k)) * 5) @ rng.standard_normal((k, m))
            X -= X.mean(0)
            d = np.linalg.eigvalsh(X.T @ X / n)
            ref, _ = _pca_classifier(d, n)
            ours = _mp_variance(torch.from_numpy(d[None]), n)[0].item()
            assert ours == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("use_mask", [True, False])
@pytest.mark.parametrize("exact", [True, False])
def test_agrees_with_dipy(
    gaussian_data: tuple[np.ndarray, np.ndarray, np.ndarray],
    dipy_masked: tuple[np.ndarray, np.ndarray],
    use_mask: bool,
    exact: bool,
) -> None:
    noisy, _, brain = gaussian_data
    if not use_mask:  # a crop (brain, edge and background) keeps dipy's whole-volume run short
        noisy, brain = noisy[2:18, 2:18, 1:9], brain[2:18, 2:18, 1:9]
    mask = brain if use_mask else None
    ref, ref_sigma = dipy_masked if use_mask else _dipy(noisy, None)
    den, sigma = mppca(noisy, mask=mask, device="cpu", exact=exact)
    assert den.shape == noisy.shape and sigma.shape == noisy.shape[:3]
    inside = brain if use_mask else np.ones(noisy.shape[:3], bool)
    inside = inside & np.isfinite(ref_sigma)  # dipy leaves NaN where no patch covers a mask voxel
    assert _rel_rms(den[inside], ref[inside]) <= 1e-2
    assert _rel_rms(sigma[inside], ref_sigma[inside]) <= 1e-2
    if exact:  # float32 batched vs float64 per-patch: in practice far tighter than the 1e-2 requirement
        assert _rel_rms(den[inside], ref[inside]) <= 1e-4
    assert np.all(sigma[inside] > 0)  # the strided lattice + fill-ins cover every voxel that dipy covers
    if use_mask:
        assert np.all(den[~brain] == 0) and np.all(sigma[~brain] == 0)
    assert np.all(den >= 0) and np.all(np.isfinite(den)) and np.all(np.isfinite(sigma))


def test_fast_mode_rician_agrees_with_dipy() -> None:
    noisy, _, brain = _synthetic(sigma=0.01, seed=2, rician=True)
    ref, ref_sigma = _dipy(noisy, brain)
    inside = brain & np.isfinite(ref_sigma)
    den, sigma = mppca(noisy, mask=brain, device="cpu")
    assert _rel_rms(den[inside], ref[inside]) <= 1e-2  # measured 5.4e-3
    # the sigma map varies steeply at the mask edge (Rayleigh background in the edge patches), where fewer
    # patches average it: measured 1.4e-2; the typical level agrees closely
    assert _rel_rms(sigma[inside], ref_sigma[inside]) <= 3e-2
    assert np.median(sigma[inside]) == pytest.approx(np.median(ref_sigma[inside]), rel=0.01)


def test_fast_mode_eigensolver_and_blocks() -> None:
    # subspace iteration vs full eigh, and the block partition (warm start of the subspace iteration):
    # differences far below the stride's own difference to dipy (approximation tolerances of the subspace
    # iteration: measured 4.7e-4 and 1.8e-4, the same with MKL_CBWR=COMPATIBLE or AVX2, ATEN_CPU_CAPABILITY=default)
    noisy, _, brain = _synthetic(seed=4)
    den_eigh, sig_eigh = mppca(noisy, mask=brain, device="cpu", subspace_iters=0)
    den, sig = mppca(noisy, mask=brain, device="cpu")
    assert _rel_rms(den[brain], den_eigh[brain]) <= 2e-3
    den2, sig2 = mppca(noisy, mask=brain, device="cpu", block_size=100, n_threads=1)
    assert _rel_rms(den2[brain], den[brain]) <= 2e-3
    # sigma does not depend on the eigenvectors: eigh's or eigvalsh's eigenvalues and any block partition give
    # the same sigma map up to float32 rounding of the eigenvalues and the MP decisions that rounding can flip
    # (borderline patches): every voxel lies in the range that allows (tests/numerics.py)
    corners, psize = mppca_centres(noisy.shape[:3], brain, 2)
    dec = mp_decisions(noisy.astype(np.float32), corners, psize)
    print(check_sigma(dec, sig, sig_eigh, sig2, where=brain))
    a = mppca(noisy, mask=brain, device="cpu", n_threads=2, block_size=100)
    b = mppca(noisy, mask=brain, device="cpu", n_threads=2, block_size=100)
    # reproducible: same blocks, same threads, same machine (static round-robin of the blocks)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.fixture(scope="module")
def partly_zero() -> tuple[np.ndarray, np.ndarray, np.ndarray, MPDecisions]:
    """Noisy series with an exactly zero slab (x < 8), its exact-mode result and its patches' MP decisions."""
    noisy, _, _ = _synthetic(seed=4)
    noisy = noisy.copy()
    noisy[:8] = 0.0
    ref, ref_sigma = mppca(noisy, device="cpu", exact=True)
    corners, psize = mppca_centres(noisy.shape[:3], None, 2, exact=True)
    return noisy, ref, ref_sigma, mp_decisions(noisy.astype(np.float32), corners, psize)


def check_partly_zero(dec: MPDecisions, den: np.ndarray, sig: np.ndarray, ref: np.ndarray, ref_sigma: np.ndarray
                      ) -> dict[str, float]:
    """Fast mode (stride 1) vs exact mode on :func:`partly_zero` data: what holds on any arithmetic path."""
    # sigma: patches that are partly exactly zero have exactly zero eigenvalues, so c* and k (and with k the
    # weight 1 / (1 + k)) there are decided by rounding (float32 eigvalsh vs eigh: 1.7e-3 relative RMS apart
    # on one machine, 5.9e-4 on another path). Each map must lie in the range float32 rounding allows: per
    # voxel the 1 / (1 + k)-weighted mean of the var error bound delta ~ (n + m) u trace(C) where no covering
    # patch is borderline, the extreme weighted means of the possible var and k where one is.
    info = check_sigma(dec, sig, ref_sigma)
    # the denoised series: the subspace iteration's approximation (measured 2.7e-4); the rounding-decided k of
    # the partly-zero patches moves it much less (1.7e-4 between the exact mode's arithmetic paths)
    info["den_rel_rms"] = _rel_rms(den, ref)
    assert info["den_rel_rms"] <= 2e-3
    # voxels whose patches all lie in the zero slab: exactly 0 in any precision (Xc = 0 and mean 0)
    assert np.all(den[:4] == 0) and np.all(ref[:4] == 0)
    return info


@pytest.mark.parametrize(("block_size", "n_threads"), [(None, None), (100, 1), (700, 2)])
def test_fast_mode_partly_zero_data(
    partly_zero: tuple[np.ndarray, np.ndarray, np.ndarray, MPDecisions], block_size: int | None, n_threads: int | None
) -> None:
    # noiseless zero background (all components 'kept' there, as in dipy): those patches take the eigh path
    noisy, ref, ref_sigma, dec = partly_zero
    den, sig = mppca(noisy, device="cpu", stride=1, block_size=block_size, n_threads=n_threads)
    print(check_partly_zero(dec, den, sig, ref, ref_sigma))


@pytest.mark.parametrize("stride", [(2, 2, 2), (3, 3, 2), (2, 3, 4)])
def test_strided_centres_cover_the_mask(stride: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(7)
    shape, psize = (17, 14, 9), (5, 5, 5)
    # an irregular mask that touches the volume border (where only border patches reach)
    mask = gaussian_filter(rng.standard_normal(shape), 1.5) > 0
    mask[0, :, :] |= rng.random(shape[1:]) > 0.5
    mask_c = mask[2:-2, 2:-2, 2:-2]
    chosen = _select_centres(mask_c, mask, psize, stride)
    assert np.all(mask_c[chosen])  # only centres in the mask
    lattice = np.zeros_like(chosen)
    lattice[:: stride[0], :: stride[1], :: stride[2]] = mask_c[:: stride[0], :: stride[1], :: stride[2]]
    assert np.all(chosen[lattice])
    dipy_covered = mask & (_coverage(mask_c, psize, shape) > 0)
    assert np.all(_coverage(chosen, psize, shape)[dipy_covered] > 0)
    assert chosen.sum() < 0.6 * mask_c.sum()
    # and the denoiser gives every such voxel a value and a sigma
    data = 1.0 + 0.1 * rng.standard_normal((*shape, 12))
    _, sigma = mppca(data, mask=mask, device="cpu", stride=stride)
    assert np.all(sigma[dipy_covered] > 0)


def test_float64_blocks_and_threads_agree(
    gaussian_data: tuple[np.ndarray, np.ndarray, np.ndarray], dipy_masked: tuple[np.ndarray, np.ndarray]
) -> None:
    noisy, _, brain = gaussian_data
    ref, ref_sigma = dipy_masked
    inside = brain & np.isfinite(ref_sigma)
    kw = {"mask": brain, "device": "cpu", "dtype": np.float64, "exact": True}
    den, sigma = mppca(noisy, block_size=37, n_threads=2, **kw)
    assert den.dtype == np.float64
    den1, sigma1 = mppca(noisy, block_size=5000, n_threads=1, **kw)
    # in float64 no MP decision of this series is borderline (delta = (n + m) 2^-53 trace(C)): ours and dipy's
    # decisions agree on any arithmetic path, and the sigma maps lie within ~1e-10 relative of each other
    corners, psize = mppca_centres(noisy.shape[:3], brain, 2, exact=True)
    dec = mp_decisions(noisy, corners, psize, u=U64)
    assert not dec.borderline.any()
    print(check_sigma(dec, sigma, sigma1, np.where(inside, ref_sigma, 0.0), where=inside))
    # the reconstructions: the same kept subspaces, eigenvectors to float64 rounding
    assert _rel_rms(den[inside], ref[inside]) <= 1e-8
    np.testing.assert_allclose(den1, den, rtol=1e-10, atol=1e-12)


def test_patch_radius_and_flat_axis() -> None:
    noisy, _, _ = _synthetic(shape=(14, 14, 1), seed=5)
    ref, ref_sigma = _dipy(noisy, None, patch_radius=3)  # 7x7x1 patches: 49 samples > 35 measurements
    den, sigma = mppca(noisy, patch_radius=3, device="cpu", exact=True)
    assert _rel_rms(den, ref) <= 1e-4
    den_fast, sigma_fast = mppca(noisy, patch_radius=3, device="cpu")  # flat patches: default stride 1
    assert _rel_rms(den_fast, ref) <= 1e-3
    # sigma (it does not depend on the eigenvectors): float32 (ours, rounded input) and float64 (dipy) runs
    # lie in the range float32 rounding of the eigenvalues allows (no decision here is borderline: ~0.2 %)
    corners, psize = mppca_centres(noisy.shape[:3], None, 3, exact=True)
    print(check_sigma(mp_decisions(noisy, corners, psize, input_rounding=True), sigma, sigma_fast, ref_sigma))
    den, sigma = mppca(noisy, patch_radius=3, device="cpu", stride=2)  # stride 2 in-plane, 1 on the flat axis
    assert _rel_rms(den, ref) <= 3e-2  # measured 2.0e-2: each voxel is in ~12 patches instead of 49


def test_sigma_matches_true_noise(gaussian_data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    noisy, _, brain = gaussian_data
    _, sigma = mppca(noisy, mask=brain, device="cpu")  # default (fast) mode
    assert np.median(sigma[brain]) == pytest.approx(SIGMA, rel=0.05)
    core = binary_erosion(brain, iterations=4)  # 2 x patch radius
    assert np.median(sigma[core]) == pytest.approx(SIGMA, rel=0.05)


def test_sigma_rician_high_snr() -> None:
    # Rician magnitude noise at high SNR. Patches that reach into the background see Rayleigh noise (variance
    # 0.43 sigma^2), which pulls sigma down near the mask edge (median over the whole mask of this small
    # volume: 0.92x); away from the edge (mask eroded by 2 * patch radius) it is as for Gaussian noise.
    noisy, _, brain = _synthetic(sigma=0.004, seed=1, rician=True)
    _, sigma = mppca(noisy, mask=brain, device="cpu")
    core = binary_erosion(brain, iterations=4)
    assert core.sum() > 50
    assert np.median(sigma[core]) == pytest.approx(0.004, rel=0.05)
    assert np.median(sigma[brain]) > 0.85 * 0.004


def test_denoising_reduces_error(gaussian_data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    noisy, clean, brain = gaussian_data
    den, _ = mppca(noisy, mask=brain, device="cpu")
    den_exact, _ = mppca(noisy, mask=brain, device="cpu", exact=True)
    err_noisy = np.sqrt(np.mean((noisy[brain] - clean[brain]) ** 2))
    err_den = np.sqrt(np.mean((den[brain] - clean[brain]) ** 2))
    err_exact = np.sqrt(np.mean((den_exact[brain] - clean[brain]) ** 2))
    assert err_den < 0.6 * err_noisy
    assert err_exact < 0.6 * err_noisy
    assert err_den < 1.1 * err_exact  # the stride costs little denoising gain


def test_progress_and_input_checks(gaussian_data: tuple[np.ndarray, np.ndarray, np.ndarray], capsys) -> None:
    noisy, _, brain = gaussian_data
    mppca(noisy[:12, :12, :6], mask=brain[:12, :12, :6], device="cpu", block_size=16, progress=True)
    err = capsys.readouterr().err
    assert "mppca:" in err and "100 %" in err
    with pytest.raises(ValueError, match="4D"):
        mppca(noisy[..., 0])
    with pytest.raises(ValueError, match="mask shape"):
        mppca(noisy, mask=brain[:-1])
    with pytest.raises(ValueError, match="smaller than the patch"):
        mppca(noisy[:4])
    with pytest.raises(ValueError, match="stride must be 1"):
        mppca(noisy, exact=True, stride=2)
    with pytest.raises(ValueError, match="stride must be"):
        mppca(noisy, stride=0)


def test_denoise_file_roundtrip(tmp_path: Path, gaussian_data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    noisy, _, brain = gaussian_data
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    affine[:3, 3] = (-12.0, 5.0, 3.0)
    src = tmp_path / "in" / "sub-01_acq-MRFEPI_MRF.nii.gz"
    src.parent.mkdir()
    nib.save(nib.Nifti1Image(noisy.astype(np.float32), affine), src)
    mpath = tmp_path / "in" / "mask.nii.gz"
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), mpath)
    out_dir = tmp_path / "out"
    out = out_dir / "sub-01_desc-mppca_MRF.nii.gz"
    sig = out_dir / "sub-01_desc-mppca_noisesigma.nii.gz"
    stats = denoise_file(src, out, sig, mask_path=mpath, device="cpu")

    den_img, sig_img = nib.load(out), nib.load(sig)
    assert den_img.shape == noisy.shape and sig_img.shape == noisy.shape[:3]
    np.testing.assert_allclose(den_img.affine, affine)
    np.testing.assert_allclose(sig_img.affine, affine)
    assert den_img.get_data_dtype() == np.float32
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([out.name, sig.name])  # no temp files left
    den_direct, sigma_direct = mppca(noisy.astype(np.float32), mask=brain, device="cpu")
    np.testing.assert_allclose(den_img.get_fdata(), den_direct, rtol=1e-6, atol=1e-7)
    assert stats["device"] == "cpu" and stats["runtime_s"] > 0
    assert stats["mode"] == "fast" and stats["stride"] == [2, 2, 2]
    assert stats["sigma_median"] == pytest.approx(float(np.median(sigma_direct[brain & (sigma_direct > 0)])))

    bad = tmp_path / "in" / "three_d.nii.gz"
    nib.save(nib.Nifti1Image(noisy[..., 0].astype(np.float32), affine), bad)
    with pytest.raises(ValueError, match="three_d.nii.gz"):
        denoise_file(bad, tmp_path / "x.nii.gz", tmp_path / "s.nii.gz")
    assert not (tmp_path / "x.nii.gz").exists()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_other_arithmetic_paths(
    variant: str, partly_zero: tuple[np.ndarray, np.ndarray, np.ndarray, MPDecisions]
) -> None:
    """test_fast_mode_partly_zero_data's guarantees under other kernels of this CPU (subprocesses: MKL's
    compatible / AVX2 branches for the batched matmuls and eigensolvers, torch's scalar / AVX2 kernels)."""
    res = variant_result(variant)
    noisy, _, _, dec = partly_zero
    if not np.array_equal(res.noisy.astype(np.float32), noisy.astype(np.float32)):
        corners, psize = mppca_centres(res.noisy.shape[:3], None, 2, exact=True)
        dec = mp_decisions(res.noisy.astype(np.float32), corners, psize)
    info = check_partly_zero(dec, res.den, res.sig, res.ref, res.ref_sigma)
    print(f"{variant} {res.env}: arithmetic changed in {res.changed}; {info}")
