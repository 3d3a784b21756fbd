"""Device flags read back at a step boundary, in one transfer per device (docs/design.md §6a).

Kasmina keeps every per-step verdict on the device as a 0-d bool (a seed's outputs stayed
finite, a seed-only backward left the host's gradients untouched), so nothing inside a step
waits for the device. They are read at the step's boundary. On a GPU each read is a
synchronisation: the first waits for the stream to drain, and every further one still pays a
device-to-host copy and a wait for it, so reading N flags one by one costs N round trips where
one would do. ``read_flags`` stacks them (one small device op) and copies the lot at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["read_flags"]


def read_flags(flags: Sequence[torch.Tensor]) -> list[bool]:
    """The values of one-element bool tensors, in order: one transfer per device among them.

    ``ValueError`` for a tensor that is not a one-element bool (nothing is read then).
    """
    for i, flag in enumerate(flags):
        if not isinstance(flag, torch.Tensor) or flag.dtype != torch.bool or flag.numel() != 1:
            raise ValueError(f"flags[{i}] must be a one-element bool tensor, got {flag!r}")
    if not flags:
        return []
    first = flags[0].device
    if all(flag.device == first for flag in flags):
        return _read(flags)
    values = [False] * len(flags)
    for device in dict.fromkeys(flag.device for flag in flags):
        where = [i for i, flag in enumerate(flags) if flag.device == device]
        for i, value in zip(where, _read([flags[i] for i in where]), strict=True):
            values[i] = value
    return values


def _read(flags: Sequence[torch.Tensor]) -> list[bool]:
    # No grad-mode block: a bool tensor records no graph, and the block's Python ``__exit__``
    # (every step runs this) could take a Ctrl-C with grad mode off and leave it off.
    if len(flags) == 1:
        stacked = flags[0].reshape(1)
    else:
        stacked = torch.stack([flag.reshape(()) for flag in flags])
    return stacked.tolist()  # the one device-to-host copy
