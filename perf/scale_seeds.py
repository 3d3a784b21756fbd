"""How Kasmina's own costs grow with the number of slots and seeds (CPU, one thread).

A deep model with a slot on every block (48 layers x 2 slots x 8 seeds is 768 seeds) pays
Kasmina's per-step and per-restore work for every seed, dormant ones included. This script
builds a stack of ``x + Linear(d, d)(x)`` blocks with one slot per block, tensors so small that
Kasmina's own work dominates, and times for each size:

- ``manager.step()`` with every seed DORMANT (no gradients, no host optimizer): what a step
  costs the training thread before any seed grows;
- ``model.load_state_dict(model.state_dict())`` of the grown-model state: what a ROLLBACK or a
  ``kasmina.load`` pays to restore every seed (each restore checks and re-plans).

Both should grow linearly in the number of seeds. Medians of ``--repeats`` calls, reported, never
asserted; a shared machine moves them by tens of percent, so compare rows of one run.

Usage: ``python perf/scale_seeds.py [--sizes 8x4,64x4,256x4,64x16] [--repeats 20]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from arguments import positive_int  # perf/ is sys.path[0] when run as a script
from torch import nn

from kasmina.manager.config import KasminaConfig
from kasmina.manager.manager import KasminaKernelManager
from kasmina.utils.keyring import Keyring, generate_key

CHUNK = 2


class Blocks(nn.Module):
    def __init__(self, layers: int, width: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(layers: int, seeds: int, repeats: int, root: Path) -> tuple[float, float]:
    """``(step_us, restore_ms)`` for ``layers`` slots of ``seeds`` seeds each."""
    config = KasminaConfig(
        device="cpu", urza_url=str(root / "urza"), runs_root=str(root / "runs"),
        checkpoint_mode="off",
    )  # fmt: skip
    with KasminaKernelManager(config, keyring=Keyring({"ctl": generate_key()})) as manager:
        width = CHUNK * seeds
        model = Blocks(layers, width)
        names = [f"blocks.{i}" for i in range(layers)]
        manager.attach(model, names, seeds, CHUNK, host_lr=None)
        with torch.no_grad():
            model(torch.randn(4, width))
        step_s = _median_s(manager.step, repeats)
    state = model.state_dict()
    restore_s = _median_s(lambda: model.load_state_dict(state), max(3, repeats // 5))
    return step_s * 1e6, restore_s * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="8x4,64x4,256x4,64x16")
    parser.add_argument("--repeats", type=positive_int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        sizes = [(positive_int(a), positive_int(b)) for a, _, b in
                 (size.partition("x") for size in args.sizes.split(","))]  # fmt: skip
    except argparse.ArgumentTypeError as exc:
        parser.error(f"--sizes takes SLOTSxSEEDS[,...] with both >= 1: {exc}")
    print(f"torch {torch.__version__}, one thread; medians of {args.repeats} steps")
    print(f"{'slots':>6} {'seeds/slot':>10} {'seeds':>6} | {'step, all DORMANT':>18} | "
          f"{'restore (load_state_dict)':>26}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for layers, seeds in sizes:
            step_us, restore_ms = measure(layers, seeds, args.repeats, Path(tmp))
            n = layers * seeds
            print(
                f"{layers:>6} {seeds:>10} {n:>6} | {step_us:>10.0f} us {step_us / n:>4.2f}/seed"
                f" | {restore_ms:>12.1f} ms {restore_ms * 1e3 / n:>6.0f} us/seed"
            )


if __name__ == "__main__":
    main()
