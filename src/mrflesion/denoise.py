"""MPPCA denoising of a 4D MRF series (Marchenko-Pastur PCA over local 3D patches, Veraart et al. 2016).

The algorithm is exactly the one of ``dipy.denoise.localpca.mppca`` (``pca_method='eig'``), re-implemented
with batched linear algebra:

* a patch is the ``(2r+1)^3`` box around a centre voxel; centres are the voxels whose whole patch lies
  inside the volume (axes of length 1 get radius 0) and whose mask value is true;
* per patch, the ``n x m`` matrix X (n patch voxels, m measurements) is mean-centred over the voxels, the
  covariance ``C = Xc^T Xc / n`` is diagonalised, and the Marchenko-Pastur rule gives the noise variance:
  with eigenvalues L ascending (only the last n-1 if m > n-1), the largest c with
  ``L[c] - L[0] - 4 sqrt((c+1)/n) mean(L[:c+1]) <= 0`` gives ``var = mean(L[:c+1])``;
* components with eigenvalue ``>= tau = (1 + sqrt(m/n))^2 var`` are kept (dipy re-counts the discarded
  components with this threshold rather than using the classifier's count), the patch is reconstructed
  as ``Xc W_k W_k^T + mean``;
* overlapping reconstructions are averaged with weight ``1 / (1 + k)`` per patch (k kept components), and
  the noise sigma map is the same weighted average of ``var``, square-rooted;
* the output is clipped at 0 and set to 0 outside the mask.

Differences from dipy: dipy leaves NaN (0/0) in mask voxels that no patch covers (possible only with a
mask, near the volume border); here such voxels keep their input value and get sigma 0. dipy computes in
float32 unless the input is float64; here the precision is the ``dtype`` argument.

Speed: patches are processed in blocks of centres (a box of the centre grid at a time, so memory is
bounded by ``block_size``): gather by a strided view, covariance by batched matmul, ``torch.linalg.eigh``
on the batch, vectorised MP classification, projection by batched matmul, and scatter-add of the weighted
reconstructions by one strided slice-add per patch offset. On CPU the blocks are spread over a pool of
threads (torch releases the GIL), each with its own accumulators; on CUDA one stream does it all.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["mppca", "denoise_file", "resolve_device"]

# Default number of patch centres per block. Memory per block ~ block_size * m * n * (itemsize) * ~4
# (patch matrix, centred copy, reconstruction, permuted copy): 2048 * 35 * 125 * 4 B * 4 ~ 140 MB in float32.
DEFAULT_BLOCK_CPU = 2048
DEFAULT_BLOCK_CUDA = 32768


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> cuda if available else cpu; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    return dev


def _patch_radius(shape3: tuple[int, int, int], patch_radius: int | tuple[int, int, int]) -> np.ndarray:
    pr = np.full(3, patch_radius, dtype=int) if np.isscalar(patch_radius) else np.asarray(patch_radius, int)
    if pr.shape != (3,) or np.any(pr < 0):
        raise ValueError(f"patch_radius must be a non-negative int or 3 ints, got {patch_radius!r}")
    pr = pr.copy()
    pr[np.asarray(shape3) == 1] = 0  # as dipy: an axis of length 1 is not patched
    return pr


def _blocks(grid: tuple[int, int, int], block_size: int) -> list[tuple[slice, slice, slice]]:
    """Split the centre grid into boxes of at most ``block_size`` centres (x kept whole when possible)."""
    gx, gy, gz = grid
    if gx * gy <= block_size:
        bx, by, bz = gx, gy, max(1, block_size // (gx * gy))
    elif gx <= block_size:
        bx, by, bz = gx, max(1, block_size // gx), 1
    else:
        bx, by, bz = block_size, 1, 1
    out = []
    for z0 in range(0, gz, bz):
        for y0 in range(0, gy, by):
            for x0 in range(0, gx, bx):
                out.append((slice(x0, min(x0 + bx, gx)), slice(y0, min(y0 + by, gy)), slice(z0, min(z0 + bz, gz))))
    return out


def _mp_variance(d: torch.Tensor, n: int) -> torch.Tensor:
    """Vectorised Marchenko-Pastur noise variance, identical to dipy's ``_pca_classifier`` loop.

    ``d``: (B, m) eigenvalues ascending. The loop walks c down from the top while
    ``r(c) = L[c] - L[0] - 4 sqrt((c+1)/n) mean(L[:c+1]) > 0``; it stops at the largest c with
    ``not r(c) > 0``, and returns ``mean(L[:c+1])``.
    """
    L = d[:, -(n - 1) :] if d.shape[1] > n - 1 else d
    ell = L.shape[1]
    cnt = torch.arange(1, ell + 1, device=L.device, dtype=L.dtype)
    cummean = torch.cumsum(L, dim=1) / cnt
    r = L - L[:, :1] - 4.0 * torch.sqrt(cnt / n) * cummean
    stop = ~(r > 0)  # NaN counts as a stop, as in dipy's `while r > 0`
    # index of the last True (largest c); rows with no stop fall back to c = 0
    idx = torch.arange(ell, device=L.device)
    cstar = torch.where(stop, idx, torch.zeros_like(idx)).amax(dim=1)
    return cummean.gather(1, cstar[:, None])[:, 0]


class _Accumulator:
    def __init__(self, shape4: tuple[int, ...], dev: torch.device, dtype: torch.dtype) -> None:
        self.thetax = torch.zeros(shape4, device=dev, dtype=dtype)
        self.theta = torch.zeros(shape4[:3], device=dev, dtype=dtype)
        self.var = torch.zeros(shape4[:3], device=dev, dtype=dtype)


def _process_block(
    windows: torch.Tensor,
    mask_c: torch.Tensor,
    blk: tuple[slice, slice, slice],
    psize: tuple[int, int, int],
    tau_factor: float,
    acc: _Accumulator,
) -> None:
    """Denoise the patches centred in one box of the centre grid and add them into ``acc``."""
    px, py, pz = psize
    n = px * py * pz
    sub = mask_c[blk]  # (Gx, Gy, Gz) bool: centres to process
    gx, gy, gz = sub.shape
    x0, y0, z0 = blk[0].start, blk[1].start, blk[2].start
    full = bool(sub.all())
    if full:
        # every centre of the box: one copy of the strided window view into (B, n, m)
        X = windows[blk].reshape(gx * gy * gz, n, windows.shape[-1])
    else:
        nz = torch.nonzero(sub, as_tuple=True)
        if nz[0].numel() == 0:
            return
        X = windows[nz[0] + x0, nz[1] + y0, nz[2] + z0].reshape(nz[0].numel(), n, windows.shape[-1])
    B, m = X.shape[0], X.shape[2]
    M = X.mean(dim=1, keepdim=True)  # (B, 1, m)
    Xc = X - M
    del X
    C = torch.bmm(Xc.transpose(1, 2), Xc) / n  # (B, m, m), as dipy: Xc^T Xc / n
    d, W = torch.linalg.eigh(C)
    del C
    var = _mp_variance(d, n)
    keep = d >= ((tau_factor**2) * var)[:, None]  # (B, m): kept components
    w = 1.0 / (1.0 + keep.sum(dim=1).to(Xc.dtype))  # dipy: 1 / (1 + m - ncomps), ncomps = m - k
    # weighted projector onto the kept components: w * W_k W_k^T
    P = torch.bmm(W * (keep.to(W.dtype) * w[:, None])[:, None, :], W.transpose(1, 2))
    Y = torch.baddbmm(M * w[:, None, None], Xc, P)  # (B, n, m) = w * (Xc W_k W_k^T + M)
    del Xc, P, W
    if full:
        Yg = Y.view(gx, gy, gz, px, py, pz, m)
        wgrid = w.view(gx, gy, gz)
        vgrid = (w * var).view(gx, gy, gz)
    else:
        Yg = torch.zeros((gx, gy, gz, px, py, pz, m), device=Y.device, dtype=Y.dtype)
        Yg[nz] = Y.view(B, px, py, pz, m)
        wgrid = torch.zeros((gx, gy, gz), device=w.device, dtype=w.dtype)
        wgrid[nz] = w
        vgrid = torch.zeros_like(wgrid)
        vgrid[nz] = w * var
    del Y
    for a in range(px):
        for b in range(py):
            for c in range(pz):
                sl = (slice(x0 + a, x0 + a + gx), slice(y0 + b, y0 + b + gy), slice(z0 + c, z0 + c + gz))
                acc.thetax[sl] += Yg[:, :, :, a, b, c]
                acc.theta[sl] += wgrid
                acc.var[sl] += vgrid


def mppca(
    data: np.ndarray,
    mask: np.ndarray | None = None,
    patch_radius: int | tuple[int, int, int] = 2,
    device: str = "auto",
    dtype: np.dtype | type | str | None = None,
    block_size: int | None = None,
    progress: bool = False,
    n_threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """MPPCA-denoise a 4D series; returns ``(denoised, sigma)``.

    ``denoised.shape == data.shape``, ``sigma.shape == data.shape[:3]``; same algorithm as
    ``dipy.denoise.localpca.mppca(data, mask=mask, patch_radius=patch_radius, return_sigma=True)``.

    Parameters
    ----------
    data : 4D array (X, Y, Z, N); each spatial axis must be >= 2*patch_radius+1 or equal to 1.
    mask : 3D bool array; patches are centred only in the mask, output is 0 outside it.
    patch_radius : int or 3 ints; 2 gives 5x5x5 patches.
    device : "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    dtype : computation precision, float32 (default) or float64. The outputs are float64 if the input is
        float64, float32 otherwise.
    block_size : patch centres per block (bounds memory); default 2048 on CPU, 32768 on CUDA.
    progress : print a line to stderr every 10 % of blocks.
    n_threads : CPU worker threads (default: the CPUs available to this process).
    """
    arr = np.asarray(data)
    if arr.ndim != 4:
        raise ValueError(f"MPPCA needs a 4D array (X, Y, Z, N), got shape {arr.shape}")
    shape3 = tuple(int(s) for s in arr.shape[:3])
    m = int(arr.shape[3])
    if mask is None:
        mask_np = np.ones(shape3, dtype=bool)
    else:
        mask_np = np.asarray(mask).astype(bool)
        if mask_np.shape != shape3:
            raise ValueError(f"mask shape {mask_np.shape} does not match data shape {shape3}")
    pr = _patch_radius(shape3, patch_radius)
    psize = tuple(int(v) for v in 2 * pr + 1)
    if any(s != 1 and s < p for s, p in zip(shape3, psize, strict=True)):
        raise ValueError(f"data spatial shape {shape3} is smaller than the patch size {psize}")
    n = int(np.prod(psize))
    if n == 1:
        raise ValueError("patches of a single voxel: increase patch_radius")
    tau_factor = 1.0 + math.sqrt(m / n)

    dev = resolve_device(device)
    np_dtype = np.dtype(np.float32 if dtype is None else dtype)
    if np_dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {np_dtype}")
    tdtype = torch.float64 if np_dtype == np.float64 else torch.float32
    out_dtype = np.float64 if arr.dtype == np.float64 else np.float32
    if block_size is None:
        block_size = DEFAULT_BLOCK_CUDA if dev.type == "cuda" else DEFAULT_BLOCK_CPU
    block_size = max(1, int(block_size))

    vol = torch.from_numpy(np.ascontiguousarray(arr, dtype=np_dtype)).to(dev)
    # (Gx, Gy, Gz, px, py, pz, m) strided view, no copy: windows[i, j, k] is the patch with corner (i, j, k)
    windows = vol.unfold(0, psize[0], 1).unfold(1, psize[1], 1).unfold(2, psize[2], 1).permute(0, 1, 2, 4, 5, 6, 3)
    grid = tuple(int(s) for s in windows.shape[:3])
    # mask at the patch centres, indexed by the patch corner
    mask_c = torch.from_numpy(
        np.ascontiguousarray(mask_np[pr[0] : pr[0] + grid[0], pr[1] : pr[1] + grid[1], pr[2] : pr[2] + grid[2]])
    ).to(dev)
    if dev.type == "cuda":
        n_workers = 1
    else:
        if n_threads is None:
            n_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        n_workers = max(1, int(n_threads or 1))
        # small volumes: at least ~4 blocks per worker for load balance (never above block_size)
        n_centres = int(mask_c.sum())
        block_size = min(block_size, max(256, math.ceil(n_centres / (4 * n_workers))))
    blocks = [b for b in _blocks(grid, block_size) if bool(mask_c[b].any())]
    n_workers = max(1, min(n_workers, len(blocks)))
    accs = [_Accumulator((*shape3, m), dev, tdtype) for _ in range(n_workers)]

    lock = threading.Lock()
    done = [0]
    t0 = time.perf_counter()
    step = max(1, math.ceil(len(blocks) / 10))

    def report() -> None:
        with lock:
            done[0] += 1
            if progress and (done[0] % step == 0 or done[0] == len(blocks)):
                el = time.perf_counter() - t0
                print(
                    f"mppca: {done[0]}/{len(blocks)} blocks ({100 * done[0] / len(blocks):.0f} %), {el:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )

    def work(wi: int) -> None:
        with torch.inference_mode():
            for bi in range(wi, len(blocks), n_workers):
                _process_block(windows, mask_c, blocks[bi], psize, tau_factor, accs[wi])
                report()

    if dev.type == "cuda":
        work(0)
    else:
        # one intra-op thread per worker: LAPACK eigh is serial per matrix anyway, and OpenMP spinning on
        # an oversubscribed machine is very slow. The pool gives the parallelism (torch releases the GIL).
        prev_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if n_workers == 1:
                work(0)
            else:
                with ThreadPoolExecutor(n_workers) as pool:
                    for f in [pool.submit(work, wi) for wi in range(n_workers)]:
                        f.result()
        finally:
            torch.set_num_threads(prev_threads)

    acc = accs[0]
    for other in accs[1:]:
        acc.thetax += other.thetax
        acc.theta += other.theta
        acc.var += other.var
    theta = acc.theta.cpu().numpy()
    covered = theta > 0
    denoised = np.array(arr, dtype=out_dtype, copy=True)  # uncovered voxels keep their input value
    thetax = acc.thetax.cpu().numpy()
    denoised[covered] = thetax[covered] / theta[covered][:, None]
    np.clip(denoised, 0, None, out=denoised)
    denoised[~mask_np] = 0
    sigma = np.zeros(shape3, dtype=out_dtype)
    var = acc.var.cpu().numpy()
    sigma[covered] = np.sqrt(np.maximum(var[covered] / theta[covered], 0))
    sigma[~mask_np] = 0
    return denoised, sigma


def _atomic_save(img: Any, path: Path) -> None:
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def denoise_file(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    sigma_path: str | os.PathLike[str],
    mask_path: str | os.PathLike[str] | None = None,
    patch_radius: int = 2,
    device: str = "auto",
) -> dict[str, Any]:
    """MPPCA-denoise a 4D NIfTI; write the denoised series (float32) and the sigma map atomically.

    Returns stats for the JSON sidecar: runtime_s, sigma_median (over the mask / nonzero sigma), device,
    patch_radius, shape, n_sigma_zero (mask voxels with sigma 0, e.g. not covered by any patch).
    """
    import nibabel as nib

    in_path = Path(in_path)
    img = nib.load(str(in_path))
    if len(img.shape) != 4:
        raise ValueError(f"{in_path}: MPPCA needs a 4D series, got shape {img.shape}")
    data = np.asanyarray(img.dataobj).astype(np.float32)
    mask = None
    if mask_path is not None:
        mimg = nib.load(str(mask_path))
        mask = np.asanyarray(mimg.dataobj) > 0
        if mask.shape != data.shape[:3]:
            raise ValueError(f"{mask_path}: mask shape {mask.shape} does not match {in_path} {data.shape[:3]}")
    dev = resolve_device(device)
    t0 = time.perf_counter()
    den, sigma = mppca(data, mask=mask, patch_radius=patch_radius, device=str(dev))
    runtime = time.perf_counter() - t0

    hdr = img.header.copy()
    hdr.set_data_dtype(np.float32)
    hdr["scl_slope"], hdr["scl_inter"] = 1.0, 0.0
    _atomic_save(nib.Nifti1Image(den.astype(np.float32), img.affine, hdr), Path(out_path))
    shdr = img.header.copy()
    shdr.set_data_shape(sigma.shape)
    shdr.set_data_dtype(np.float32)
    shdr["scl_slope"], shdr["scl_inter"] = 1.0, 0.0
    if "pixdim" in shdr:
        pix = shdr["pixdim"].copy()
        pix[4:] = 1.0
        shdr["pixdim"] = pix
    _atomic_save(nib.Nifti1Image(sigma.astype(np.float32), img.affine, shdr), Path(sigma_path))

    inside = mask if mask is not None else np.ones(sigma.shape, dtype=bool)
    vals = sigma[inside & (sigma > 0)]
    return {
        "runtime_s": round(runtime, 3),
        "sigma_median": float(np.median(vals)) if vals.size else 0.0,
        "device": str(dev),
        "patch_radius": int(patch_radius),
        "shape": [int(s) for s in data.shape],
        "n_sigma_zero": int(np.sum(inside & (sigma == 0))),
    }
