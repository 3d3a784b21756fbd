"""The device a launch runs on.

Triton launches a kernel on the *current* CUDA device and that device's current stream, not on
the device of the tensors it is given. A launcher handed tensors on ``cuda:1`` while ``cuda:0``
is current (a model split across GPUs, a Hugging Face ``device_map="auto"``) would run in the
wrong context: an illegal address without peer access, or a race with the ops that produced
its inputs on the other device's stream. Every launcher enters its tensors' device first.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

__all__ = ["on_device"]


def on_device(device: torch.device) -> AbstractContextManager[object]:
    """``torch.cuda.device(device)`` for a CUDA device (current stream included), else nothing."""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()
