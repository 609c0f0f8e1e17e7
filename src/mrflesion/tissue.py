"""Tissue probability maps (GM, WM, CSF) from a T1 map or a T1-weighted image, SPM-style.

Steps (each timed, seconds in the ``timings`` dict):

1. ``priors``: nilearn's MNI152 (2009) GM / WM maps and CSF = brain mask - GM - WM, resampled to
   ``prior_resolution_mm`` and blurred with a Gaussian of ``prior_fwhm_mm`` (SPM-like smooth priors;
   this also keeps a test on the MNI template itself from being circular), renormalised to sum to 1.
2. ``register``: the MNI152 T1w template is registered to the subject (affine, Mattes MI, then an
   optional short SyN). For a quantitative T1 map the fixed image is R1 = 1000 / T1 [1/s], whose
   contrast (WM > GM > CSF) matches the T1w template, so MI and SyN see compatible images.
3. ``warp_priors``: priors and brain mask resampled to the subject grid (linear).
4. ``mask``: brain mask = warped MNI brain mask > 0.5 within the finite, positive image voxels
   (or the given ``brain_mask``).
5. ``em``: prior-weighted Gaussian mixture with partial-volume (PV) classes and a polynomial bias
   field, fitted by EM (own implementation, default), or ANTs Atropos with the priors
   (``method="atropos"``, kept for comparison). The EM works on R1 for T1 maps (partial volume mixes
   approximately linearly in R1 under fast exchange) and on intensity for T1w images. Pure classes
   GM, WM, CSF; mixed classes GM/WM, GM/CSF, WM/CSF integrate a uniform mixing fraction
   (11-point quadrature). The bias field is a multiplicative exp(polynomial) of degree 2, fitted to
   posterior-weighted log residuals (SPM-style), with zero mean in the mask.

Outputs are partial-volume aware probabilities: the posterior expectation of each tissue fraction,
0-1 floats (written x1; the pipeline may scale to %), summing to 1 inside the brain mask and 0
outside.
"""

from __future__ import annotations

import os
import time
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from scipy import ndimage

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")

import ants  # noqa: E402

from mrflesion.registration import (  # noqa: E402
    ImageLike,
    _registration,
    load_image,
    nib_to_ants,
    set_threads,
)

TISSUES = ("GM", "WM", "CSF")
PAIRS = ((0, 1), (0, 2), (1, 2))  # GM/WM, GM/CSF, WM/CSF
_ALPHAS = np.linspace(0.05, 0.95, 11)  # quadrature of the mixing fraction of the first tissue
# interior of the fraction simplex (all three tissues >= 0.1, step 0.1): the three-tissue PV class
_TRIPLE = np.array([(a, b, 10 - a - b) for a in range(1, 9) for b in range(1, 10 - a)], dtype=float) / 10.0

ImageKind = Literal["T1map", "T1w"]


# --------------------------------------------------------------------------------------------------
# Priors
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _mni_arrays(resolution_mm: float) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """MNI152 T1 template, GM/WM/CSF maps and brain mask at ``resolution_mm`` (nilearn, no download)."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=1)
    gm = datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32)
    wm = datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32)
    mask = datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32)
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    maps = {"T1w": t1.get_fdata(dtype=np.float32), "GM": gm, "WM": wm, "CSF": csf, "mask": mask}
    affine = t1.affine.copy()
    if abs(resolution_mm - 1.0) > 1e-6:
        f = float(resolution_mm)
        shape = tuple(int(np.floor((s - 1) / f)) + 1 for s in t1.shape)
        # voxel-average (box) then sample: a proper anti-aliased downsampling
        out = {}
        for k, v in maps.items():
            sm = ndimage.uniform_filter(v, size=int(round(f))) if f >= 2 else v
            coords = np.indices(shape, dtype=np.float32) * f
            out[k] = ndimage.map_coordinates(sm, coords, order=1).astype(np.float32)
        maps = out
        affine = affine @ np.diag([f, f, f, 1.0])
    tissue = {k: maps[k] for k in TISSUES}
    return maps["T1w"], tissue, maps["mask"], affine


def mni_priors(prior_fwhm_mm: float = 6.0, resolution_mm: float = 2.0
               ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Smoothed MNI152 tissue priors.

    Returns ``(template_T1w, priors, brain_mask, affine)``: arrays on the MNI grid at
    ``resolution_mm``. Priors are blurred with a Gaussian of FWHM ``prior_fwhm_mm`` and renormalised to
    sum to 1 wherever any tissue is present (they are conditional on "brain").
    """
    template, tissue, mask, affine = _mni_arrays(float(resolution_mm))
    sigma_vox = prior_fwhm_mm / (2.0 * np.sqrt(2.0 * np.log(2.0))) / resolution_mm
    priors = {k: (ndimage.gaussian_filter(v, sigma_vox) if sigma_vox > 0 else v.copy())
              for k, v in tissue.items()}
    total = sum(priors.values())
    ok = total > 1e-3
    for k in priors:
        priors[k] = np.where(ok, priors[k] / np.maximum(total, 1e-3), 0.0).astype(np.float32)
    return template, priors, mask, affine


# --------------------------------------------------------------------------------------------------
# EM with priors, partial-volume classes and bias
# --------------------------------------------------------------------------------------------------


def _bias_basis(coords: np.ndarray, degree: int) -> np.ndarray:
    """Polynomial basis (without the constant) in coordinates normalised to [-1, 1]."""
    c = coords.astype(np.float64)
    lo, hi = c.min(axis=0), c.max(axis=0)
    c = 2 * (c - lo) / np.maximum(hi - lo, 1e-9) - 1
    cols = []
    for i in range(degree + 1):
        for j in range(degree + 1 - i):
            for k in range(degree + 1 - i - j):
                if i + j + k == 0:
                    continue
                cols.append(c[:, 0] ** i * c[:, 1] ** j * c[:, 2] ** k)
    return np.stack(cols, axis=1) if cols else np.zeros((len(c), 0))


def _gauss(y: np.ndarray, mu: np.ndarray | float, var: np.ndarray | float) -> np.ndarray:
    return np.exp(-0.5 * (y - mu) ** 2 / var) / np.sqrt(2 * np.pi * var)


def _mix_means(mu: np.ndarray, a: int, b: int, log_domain: bool) -> np.ndarray:
    """Feature value of a voxel with fraction alpha of tissue a and 1 - alpha of b (linear mixing)."""
    if log_domain:
        return np.log(_ALPHAS * np.exp(mu[a]) + (1 - _ALPHAS) * np.exp(mu[b]))
    return _ALPHAS * mu[a] + (1 - _ALPHAS) * mu[b]


def _e_step(z: np.ndarray, mu: np.ndarray, var: np.ndarray, all_pri: np.ndarray, gamma: np.ndarray,
            partial_volume: bool, log_domain: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Responsibilities (n, n_cls), PV fraction estimates (n, pairs), expected means (n,), log-lik."""
    n = len(z)
    lik = np.empty((n, all_pri.shape[1]))
    for k in range(3):
        lik[:, k] = _gauss(z, mu[k], var[k])
    alpha_hat = np.zeros((n, len(PAIRS)))
    mix_mean = np.zeros((n, len(PAIRS)))
    if partial_volume:
        for p, (a, b) in enumerate(PAIRS):
            m_al = _mix_means(mu, a, b, log_domain)
            v_al = _ALPHAS * var[a] + (1 - _ALPHAS) * var[b]
            g = _gauss(z[:, None], m_al[None, :], v_al[None, :])  # (n, n_alpha)
            gs = g.sum(axis=1) + 1e-300
            lik[:, 3 + p] = gs / len(_ALPHAS)
            alpha_hat[:, p] = (g @ _ALPHAS) / gs
            mix_mean[:, p] = (g @ m_al) / gs
        if all_pri.shape[1] > 6:  # three-tissue mixtures
            base = np.exp(mu) if log_domain else mu
            m3 = _TRIPLE @ base
            if log_domain:
                m3 = np.log(m3)
            v3 = _TRIPLE @ var
            g = _gauss(z[:, None], m3[None, :], v3[None, :])
            gs = g.sum(axis=1) + 1e-300
            lik[:, 6] = gs / len(_TRIPLE)
            alpha_hat = np.concatenate([alpha_hat, (g @ _TRIPLE) / gs[:, None]], axis=1)
            mix_mean = np.concatenate([mix_mean, ((g @ m3) / gs)[:, None]], axis=1)
    joint = lik * all_pri * gamma[None, :]
    tot = joint.sum(axis=1) + 1e-300
    resp = joint / tot[:, None]
    exp_mean = resp[:, :3] @ mu
    if partial_volume:
        exp_mean = exp_mean + np.sum(resp[:, 3:] * mix_mean, axis=1)
    return resp, alpha_hat, exp_mean, float(np.sum(np.log(tot)))


def _fractions(resp: np.ndarray, alpha_hat: np.ndarray, partial_volume: bool) -> np.ndarray:
    frac = resp[:, :3].copy()
    if partial_volume:
        for p, (a, b) in enumerate(PAIRS):
            frac[:, a] += resp[:, 3 + p] * alpha_hat[:, p]
            frac[:, b] += resp[:, 3 + p] * (1 - alpha_hat[:, p])
        if resp.shape[1] > 6:
            frac += resp[:, 6:7] * alpha_hat[:, 3:6]
    return frac


def em_segment(
    y: np.ndarray,
    priors: np.ndarray,
    coords: np.ndarray | None = None,
    prior_weight: float = 2.0,
    partial_volume: bool = True,
    log_domain: bool = True,
    tie_variance: bool = True,
    bias_degree: int = 2,
    bias_reg: float = 1e-2,
    pure_sd: float | None = None,
    three_tissue_pv: bool = False,
    n_iter: int = 50,
    tol: float = 1e-6,
    max_fit_voxels: int = 60000,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, object]]:
    """Prior-weighted Gaussian mixture with partial-volume classes and a bias field, fitted by EM.

    ``y``: (n,) positive feature values (mixing linearly between tissues, e.g. R1 or T1w intensity);
    ``priors``: (n, 3) GM/WM/CSF priors, raised to ``prior_weight``; ``coords``: (n, 3) voxel
    coordinates (mm) for the bias field (``None`` or ``bias_degree=0`` disables it).
    ``log_domain``: classes are Gaussian in log(y) (multiplicative noise, e.g. quantitative maps) while
    PV mixing stays linear in y; otherwise Gaussian in y. ``tie_variance``: one variance for the three
    pure classes (noise + small within-tissue variation); PV classes take the intermediate values.
    The bias is multiplicative, exp(polynomial of ``bias_degree``), ridge ``bias_reg``, zero mean.
    Parameters are fitted on a random subset of at most ``max_fit_voxels`` voxels (deterministic for
    ``seed``); the final E-step covers all voxels.
    Returns ``(fractions (n, 3), info)``: posterior expected tissue fractions and the fit.
    """
    y = np.maximum(np.asarray(y, dtype=np.float64), 1e-9)
    n = len(y)
    pri = np.clip(np.asarray(priors, dtype=np.float64), 1e-4, None)
    pri /= pri.sum(axis=1, keepdims=True)
    pri = pri**prior_weight
    if partial_volume:
        pair_pri = np.stack([np.sqrt(pri[:, a] * pri[:, b]) for a, b in PAIRS], axis=1)
        all_pri = np.concatenate([pri, pair_pri], axis=1)
        if three_tissue_pv:
            all_pri = np.concatenate([all_pri, np.cbrt(pri.prod(axis=1))[:, None]], axis=1)
    else:
        all_pri = pri
    n_cls = all_pri.shape[1]
    basis = None
    if coords is not None and bias_degree > 0:
        basis = _bias_basis(np.asarray(coords), bias_degree)
        basis = basis - basis.mean(axis=0)

    sub = np.arange(n)
    if n > max_fit_voxels:
        sub = np.sort(np.random.default_rng(seed).choice(n, max_fit_voxels, replace=False))
    ls = np.log(y[sub])  # bias is additive in log(y)
    ps, bs = all_pri[sub], (None if basis is None else basis[sub])

    def feat(logy: np.ndarray) -> np.ndarray:
        return logy if log_domain else np.exp(logy)

    zs = feat(ls)
    mu = np.empty(3)
    var = np.empty(3)
    for k in range(3):  # initial parameters from confident prior voxels
        w = ps[:, k] ** 4
        mu[k] = np.sum(w * zs) / w.sum()
        var[k] = np.sum(w * (zs - mu[k]) ** 2) / w.sum()
    var = np.maximum(var, 1e-8)
    gamma = np.full(n_cls, 1.0 / n_cls)
    coef = np.zeros(0 if bs is None else bs.shape[1])
    bias_s = np.zeros(len(zs))
    ll_old = -np.inf
    it = 0
    for it in range(n_iter):  # noqa: B007
        zc = feat(ls - bias_s)
        resp, _, exp_mean, ll = _e_step(zc, mu, var, ps, gamma, partial_volume, log_domain)
        rs = resp[:, :3]
        mu = (rs * zc[:, None]).sum(axis=0) / (rs.sum(axis=0) + 1e-12)
        dev2 = rs * (zc[:, None] - mu[None, :]) ** 2
        if pure_sd is not None:
            var = np.full(3, float(pure_sd) ** 2)
        elif tie_variance:
            var = np.full(3, max(dev2.sum() / rs.sum(), 1e-8))
        else:
            var = np.maximum(dev2.sum(axis=0) / (rs.sum(axis=0) + 1e-12), 1e-8)
        # mixing proportions (SPM-style update with spatial priors)
        denom = np.sum(ps / (ps @ gamma)[:, None], axis=0)
        gamma = resp.sum(axis=0) / np.maximum(denom, 1e-12)
        gamma /= gamma.sum()
        if bs is not None and it >= 2:
            # weighted LS of log residuals against the expected (PV-aware) mean
            em_log = exp_mean if log_domain else np.log(np.maximum(exp_mean, 1e-12))
            target = ls - em_log
            w = np.full(len(ls), 1.0 / var[0]) if log_domain else np.maximum(exp_mean, 1e-12) ** 2 / var[0]
            wb = bs * w[:, None]
            lhs = wb.T @ bs + bias_reg * w.sum() * np.eye(bs.shape[1])
            coef = np.linalg.solve(lhs, wb.T @ target)
            bias_s = bs @ coef
        if abs(ll - ll_old) < tol * abs(ll) and it > 5:
            break
        ll_old = ll

    bias = np.zeros(n) if basis is None else basis @ coef
    resp, alpha_hat, _, _ = _e_step(feat(np.log(y) - bias), mu, var, all_pri, gamma, partial_volume,
                                    log_domain)
    frac = _fractions(resp, alpha_hat, partial_volume)
    means = np.exp(mu) if log_domain else mu
    info = {"class_means": dict(zip(TISSUES, means.tolist(), strict=True)), "sd": np.sqrt(var).tolist(),
            "gamma": gamma.tolist(), "iterations": it + 1,
            "bias_range": [float(bias.min()), float(bias.max())] if n else [0.0, 0.0]}
    return np.clip(frac, 0.0, 1.0), info


# --------------------------------------------------------------------------------------------------
# Segmentation driver
# --------------------------------------------------------------------------------------------------


#: T1 values (ms) below this are not tissue: the dictionary starts at 300 ms, and lower values in a
#: resampled map come from interpolating towards the zero background at the brain edge. Such voxels
#: would be R1 outliers (1000 / T1 -> large) that capture a mixture class; they are left out.
T1_MIN_MS = 200.0


def _feature(data: np.ndarray, image_kind: str, t1_min_ms: float = T1_MIN_MS) -> np.ndarray:
    """R1 = 1000/T1 [1/s] for T1 maps (0 where T1 < ``t1_min_ms``), the intensity for T1w images."""
    data = np.nan_to_num(np.asarray(data, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if image_kind == "T1map":
        return np.where(data >= t1_min_ms, 1000.0 / np.maximum(data, t1_min_ms), 0.0).astype(np.float32)
    if image_kind == "T1w":
        return np.clip(data, 0.0, None)
    raise ValueError(f"image_kind must be 'T1map' or 'T1w', got {image_kind!r}")


def _normalise(img: ants.ANTsImage) -> ants.ANTsImage:
    arr = img.numpy()
    pos = arr[arr > 0]
    hi = np.percentile(pos, 99.5) if pos.size else 1.0
    return img.new_image_like(np.clip(arr, 0, hi) / max(hi, 1e-12))


def segment(
    image: ImageLike | np.ndarray,
    brain_mask: np.ndarray | None = None,
    image_kind: ImageKind = "T1map",
    threads: int = 2,
    affine: np.ndarray | None = None,
    method: Literal["em", "atropos"] = "em",
    register: bool = True,
    syn: bool = True,
    prior_fwhm_mm: float = 6.0,
    prior_resolution_mm: float = 2.0,
    prior_weight: float = 2.0,
    partial_volume: bool = True,
    log_domain: bool | None = None,
    tie_variance: bool = True,
    bias_degree: int = 2,
    bias_reg: float = 1e-2,
    pure_sd: float | None = None,
    three_tissue_pv: bool = False,
    reg_resolution_mm: float = 4.0,
    timings: dict[str, float] | None = None,
    info: dict[str, object] | None = None,
) -> dict[str, np.ndarray]:
    """GM / WM / CSF probability maps (0-1, posterior expected fractions) of a T1 map or T1w image.

    ``image``: NIfTI path, nibabel image, or a 3D array (then ``affine`` is required).
    ``brain_mask``: optional boolean array on the image grid (else derived from the registered MNI mask).
    ``register=False`` assumes the image is already in MNI152 space on the prior grid's world frame
    (priors are only resampled). ``timings`` (if given) receives seconds per step; ``info`` receives
    the fitted class parameters. Returns ``{"GM", "WM", "CSF", "mask"}``; the three tissues sum to
    1 inside the mask and are 0 outside; and ``{"GMprior", "WMprior", "CSFprior"}``, the smoothed MNI152
    priors on the image grid (0-1, as registered; not masked).
    """
    set_threads(threads)
    tm: dict[str, float] = {} if timings is None else timings
    t0 = time.perf_counter()
    if isinstance(image, np.ndarray):
        if affine is None:
            raise ValueError("affine is required when image is an array")
        data, aff = np.asarray(image, dtype=np.float32), np.asarray(affine, dtype=float)
    else:
        nimg = load_image(image)
        data, aff = np.asarray(nimg.dataobj, dtype=np.float32), nimg.affine
    data = np.squeeze(data)
    feat = _feature(data, image_kind)
    fixed = nib_to_ants(feat, aff)
    tm["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    template, priors, mni_mask, mni_aff = mni_priors(prior_fwhm_mm, prior_resolution_mm)
    tm["priors"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    transforms: list[str] = []
    tmpfiles: list[str] = []
    if register:
        # the priors are smooth: register at a coarse resolution (physical transforms apply anywhere)
        rtpl, _, _, raff = _mni_arrays(float(reg_resolution_mm))
        moving = _normalise(nib_to_ants(rtpl, raff))
        fixed_n = _normalise(fixed)
        if min(fixed.spacing) < reg_resolution_mm:
            fixed_n = ants.resample_image(ants.smooth_image(fixed_n, reg_resolution_mm / 2.355,
                                                            sigma_in_physical_coordinates=True),
                                          (reg_resolution_mm,) * 3, use_voxels=False, interp_type=0)
        import tempfile

        tmp = tempfile.mkdtemp(prefix="mrflesion_tissue_")
        aff_reg = _registration(
            fixed=fixed_n, moving=moving, type_of_transform="Affine", aff_metric="mattes",
            aff_sampling=32, aff_random_sampling_rate=0.5, aff_iterations=(200, 100, 50),
            aff_shrink_factors=(4, 2, 1), aff_smoothing_sigmas=(2, 1, 0),
            outprefix=os.path.join(tmp, "aff_"),
        )
        transforms = [t for t in aff_reg["fwdtransforms"] if t.endswith(".mat")]
        if syn:
            syn_reg = _registration(
                fixed=fixed_n, moving=moving, type_of_transform="SyNOnly", initial_transform=transforms,
                syn_metric="mattes", syn_sampling=32, reg_iterations=(40, 20), flow_sigma=3.0,
                total_sigma=0.5, outprefix=os.path.join(tmp, "syn_"),
            )
            transforms = [t for t in syn_reg["fwdtransforms"] if t.endswith("Warp.nii.gz")] + transforms
        tmpfiles = [os.path.join(tmp, f) for f in os.listdir(tmp)]
    tm["register"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    warped = {}
    for k, arr in list(priors.items()) + [("mask", mni_mask)]:
        mov = nib_to_ants(arr, mni_aff)
        if transforms:
            out = ants.apply_transforms(fixed=fixed, moving=mov, transformlist=transforms,
                                        interpolator="linear")
        else:
            out = ants.resample_image_to_target(mov, fixed, interp_type="linear")
        warped[k] = np.clip(out.numpy(), 0.0, 1.0)
    for f in tmpfiles:
        Path(f).unlink(missing_ok=True)
    if tmpfiles:
        Path(tmpfiles[0]).parent.rmdir()
    tm["warp_priors"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    valid = np.isfinite(data) & (feat > 0)
    if brain_mask is None:
        mask = (warped["mask"] > 0.5) & valid
        mask = ndimage.binary_fill_holes(mask) & valid
    else:
        mask = np.asarray(brain_mask, dtype=bool) & valid
    tm["mask"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pri = np.stack([warped[k][mask] for k in TISSUES], axis=1)
    out = {k: np.zeros(data.shape, dtype=np.float32) for k in TISSUES}
    if method == "em":
        coords = np.argwhere(mask) * np.linalg.norm(aff[:3, :3], axis=0)
        frac, fit = em_segment(feat[mask], pri, coords=coords, prior_weight=prior_weight,
                               partial_volume=partial_volume, bias_degree=bias_degree, bias_reg=bias_reg,
                               tie_variance=tie_variance, pure_sd=pure_sd,
                               three_tissue_pv=three_tissue_pv,
                               log_domain=(image_kind == "T1map") if log_domain is None else log_domain)
        for i, k in enumerate(TISSUES):
            out[k][mask] = frac[:, i]
    elif method == "atropos":
        mask_img = fixed.new_image_like(mask.astype(np.float32))
        prior_imgs = []
        for k in TISSUES:
            arr = np.zeros(data.shape, dtype=np.float32)
            arr[mask] = np.clip(pri[:, TISSUES.index(k)], 1e-4, None)
            prior_imgs.append(fixed.new_image_like(arr))
        seg_in = fixed
        if bias_degree > 0:
            seg_in = ants.n4_bias_field_correction(fixed, mask=mask_img)
        res = ants.atropos(a=seg_in, x=mask_img, i=prior_imgs, m="[0.1,1x1x1]", c="[5,0]",
                           priorweight=0.25 * prior_weight)
        for i, k in enumerate(TISSUES):
            out[k] = np.where(mask, res["probabilityimages"][i].numpy(), 0.0).astype(np.float32)
        fit = {"method": "atropos"}
    else:
        raise ValueError(f"unknown method {method!r}")
    total = out["GM"] + out["WM"] + out["CSF"]
    over = total > 1.0
    for k in TISSUES:
        out[k] = np.where(over, out[k] / np.maximum(total, 1e-12), out[k]).astype(np.float32)
    tm["segment"] = time.perf_counter() - t0
    if info is not None:
        info.update(fit)
    out["mask"] = mask
    for k in TISSUES:  # the priors as warped to the image (0-1; a network may read them: learn.spec.PRIOR_NAMES)
        out[f"{k}prior"] = warped[k].astype(np.float32)
    return out


def nawm(wm_prob: np.ndarray, lesion_mask: np.ndarray | None) -> np.ndarray:
    """Normal-appearing WM probability: WM probability outside lesions (0 inside the lesion mask)."""
    wm = np.asarray(wm_prob, dtype=np.float32)
    if lesion_mask is None:
        return wm.copy()
    return np.where(np.asarray(lesion_mask) > 0, 0.0, wm).astype(np.float32)
