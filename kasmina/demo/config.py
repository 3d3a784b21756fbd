"""The demo's settings (``DemoConfig``) and its constants: the host's slots, the seed plan,
the key ids, the distillation settings and the output directory's marker file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kasmina.kd.config import KDConfig

# The host's slots: (module, seeds, chunk width, distils). Seed k of a slot owns chunk k of the
# module's output; only the head's seeds see the teacher's logits (they are as wide), so only
# they distil. All slots share one lifecycle state table.
SLOTS = [("fc1", 2, 4, False), ("fc2", 2, 4, False), ("head", 2, 5, True)]
CHUNK = {f"{name}[{k}]": width for name, n, width, _ in SLOTS for k in range(n)}
# (seed id, blueprint), in the order the controller grows them. fc2[1]'s affine shift adds no
# capacity: the controller should measure that and cull it; the slot is then recycled and
# regrown from the residual blueprint. A seed grown from an artifact already loaded is a
# kernel-cache hit.
SEED_PLAN = [
    ("fc2[0]", "residual-mlp"),
    ("fc2[1]", "affine-shift"),
    ("head[0]", "residual-mlp"),
    ("fc1[0]", "residual-mlp"),
    ("head[1]", "residual-mlp"),
    ("fc1[1]", "residual-mlp-narrow"),
]
REGROW = ("fc2[1]", "residual-mlp")
COMMAND_KEY, PUBLISHER_KEY = "tamiyo", "urza-publisher"
KD = KDConfig(temperature=2.0, alpha=0.5)
MARKER = ".kasmina-demo"


@dataclass(frozen=True)
class DemoConfig:
    epochs: int = 40
    num_seeds: int = 4
    device: str = "cpu"
    out_dir: Path = Path("kasmina-demo")
    seed: int = 0
    nproc: int = 1
    progress: bool = True
    teacher_epochs: int = 10
    batch_size: int = 64
    host_lr: float = 1e-2
    seed_lr: float = 1e-2

    def validate(self) -> None:
        if not 1 <= self.num_seeds <= len(SEED_PLAN):
            raise ValueError(
                f"--seeds must be between 1 and {len(SEED_PLAN)}, got {self.num_seeds}"
            )
        if self.epochs < 1 or self.nproc < 1:
            raise ValueError("--epochs and --nproc must be positive")
        if self.batch_size % self.nproc:
            raise ValueError(f"batch size {self.batch_size} does not split over {self.nproc} ranks")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"unknown device {self.device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but CUDA is not available")
