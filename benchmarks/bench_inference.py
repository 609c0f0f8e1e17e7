"""Inference time of the full-size U-net on one full-size (paper-grid) subject.

Builds the paper's network (widths 32/64/128, bridge 256, 35 MRF inputs, five outputs) with random
weights (the weights do not change the compute), and times whole-slice and sliding-window prediction
of a 240 x 240 x 47 subject as mrflesion.learn.infer runs them. Prints seconds per subject.

    .venv/bin/python benchmarks/bench_inference.py [--threads 2] [--device cpu] [--slices 47]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mrflesion.device import resolve_device
from mrflesion.learn.infer import predict_slices, predict_sliding
from mrflesion.learn.networks import NetworkSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--slices", type=int, default=47)
    ap.add_argument("--size", type=int, default=240)
    ap.add_argument("--overlap", type=float, default=0.5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    spec = NetworkSpec("MSE-5", "mse")
    model = spec.build(35, (32, 64, 128), 256, 0.5).to(dev).eval()
    x = np.random.default_rng(0).random((args.slices, args.size, args.size, 35), dtype=np.float32)
    predict_slices(model, x[:2], dev)  # warm-up
    t0 = time.perf_counter()
    predict_slices(model, x, dev)
    whole = time.perf_counter() - t0
    t0 = time.perf_counter()
    predict_sliding(model, x, dev, window=64, overlap=args.overlap)
    sliding = time.perf_counter() - t0
    print(f"device {dev}, {args.threads} threads, subject {args.size}x{args.size}x{args.slices}, 35 MRF images")
    print(f"whole slices:              {whole:7.2f} s per subject")
    print(f"sliding 64x64, overlap {args.overlap}: {sliding:7.2f} s per subject")


if __name__ == "__main__":
    main()
