"""The compute device of the torch stages (denoising, matching, training, inference), chosen one way."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when torch sees a GPU, else the CPU; anything else is passed to ``torch.device``.

    A CUDA device that torch cannot see is refused (one line) rather than failing later inside a kernel.
    """
    dev = (torch.device("cuda" if torch.cuda.is_available() else "cpu") if str(device) == "auto"
           else torch.device(device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} requested but torch.cuda.is_available() is False")
    return dev


def autocast(device: torch.device) -> AbstractContextManager:
    """Mixed precision where it pays: bfloat16 autocast on CUDA, nothing on the CPU (full float32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
