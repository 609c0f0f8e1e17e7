"""Training throughput of the full-size U-net (patches per second).

Measures a fixed number of optimizer steps after warm-up, with the training loop's settings: Adam, MSE
on 5 outputs from 35 MRF channels, 64x64 patches, batch 64; bf16 autocast and channels-last on CUDA,
float32 on CPU. Patches are gathered by the real sampler from a synthetic in-memory slice stack, and the
gather alone is timed too.

    .venv/bin/python benchmarks/train_throughput.py [--steps 5 --warmup 2 --device auto --threads N]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mrflesion.learn.data import PatchSampler, SliceDataset, SubjectData
from mrflesion.learn.losses import make_loss
from mrflesion.learn.networks import UNet, count_parameters
from mrflesion.learn.train import _autocast, resolve_device


def _synthetic_dataset(n_slices: int, size: int, n_in: int, n_out: int, patch: int, dev: torch.device) -> SliceDataset:
    rng = np.random.default_rng(0)
    subj = SubjectData(
        subject="bench",
        inputs=rng.random((n_slices, size, size, n_in), dtype=np.float32),
        targets=rng.random((n_slices, size, size, n_out), dtype=np.float32),
        brain=np.ones((n_slices, size, size), dtype=bool),
        lesion=None,
        axis=2,
        affine=np.eye(4),
        mrf_scale=1.0,
    )
    storage = torch.float16 if dev.type == "cuda" else torch.float32
    return SliceDataset([subj], patch, dev, storage)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--slices", type=int, default=16, help="synthetic slices (240x240) for the sampler")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    torch.manual_seed(0)
    model = UNet(35, 5).to(dev)
    if dev.type == "cuda":
        model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = make_loss("mse")
    ds = _synthetic_dataset(args.slices, 240, 35, 5, args.patch, dev)
    sampler = PatchSampler(ds, batch_size=args.batch, patches_per_slice=64, seed=0)
    plan = sampler.plan(0)
    n_batches = len(plan) // args.batch

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = i % n_batches
        return ds.patches(plan[j * args.batch : (j + 1) * args.batch])

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step(i: int) -> None:
        x, y = batch(i)
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(dev):
            pred = model(x)
        loss = loss_fn(pred.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    for i in range(args.warmup):
        step(i)
    sync()
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    sync()
    dt = time.perf_counter() - t0
    t1 = time.perf_counter()
    n_gather = max(args.steps, 20)
    for i in range(n_gather):
        batch(i)
    sync()
    dg = time.perf_counter() - t1
    print(f"device: {dev} ({torch.get_num_threads()} threads)" if dev.type == "cpu" else f"device: {dev}")
    print(f"network: UNet(35 -> 5, widths 32/64/128, bridge 256), {count_parameters(model)} parameters")
    print(f"batch {args.batch} x {args.patch}x{args.patch}, {args.steps} steps after {args.warmup} warm-up")
    print(f"train step: {dt / args.steps * 1000:.1f} ms/step, {args.steps * args.batch / dt:.1f} patches/s")
    print(f"patch gather alone: {n_gather * args.batch / dg:.0f} patches/s")


if __name__ == "__main__":
    main()
