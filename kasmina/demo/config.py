"""The demo's settings (``DemoConfig``) and its constants: the host's slots, the seed plan,
the key ids, the distillation settings and the output directory's marker file."""

from __future__ import annotations

import math
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
# The continual scenario's plan: the head's second chunk (the new classes' logits) first, then
# the hidden layers. No deliberately weak blueprint there: every seed is a real candidate.
CONTINUAL_PLAN = [
    ("head[1]", "residual-mlp"),
    ("fc2[0]", "residual-mlp"),
    ("fc1[0]", "residual-mlp"),
    ("fc2[1]", "residual-mlp"),
    ("fc1[1]", "residual-mlp"),
    ("head[0]", "residual-mlp"),
]
# The continual scenario's classes: the host first learns OLD_CLASSES, NEW_CLASSES arrive later.
OLD_CLASSES = (0, 1, 2, 3, 4)
NEW_CLASSES = (5, 6, 7, 8, 9)
SCENARIOS = ("standard", "continual")
COMMAND_KEY, PUBLISHER_KEY = "tamiyo", "urza-publisher"
KD = KDConfig(temperature=2.0, alpha=0.5)
MARKER = ".kasmina-demo"
# The largest --seed: every RNG seed the demo derives from it (seed * 100_003 + epoch, ...)
# stays far inside what torch.manual_seed takes.
MAX_SEED = 2**32 - 1


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
    repeats: int = 1  # runs with RNG seeds seed .. seed + repeats - 1, then mean ± sd
    scenario: str = "standard"  # or "continual" (old classes first, new classes later)
    phase1_epochs: int = 20  # continual: the host's epochs on the old classes alone
    replay: int = 0  # continual: old-class training digits per class kept for phase 2
    measure_targets: bool = True  # time the manager's performance targets at the end

    def seed_plan(self) -> list[tuple[str, str]]:
        """The (seed id, blueprint) pairs the controller may grow, in its order."""
        plan = SEED_PLAN if self.scenario == "standard" else CONTINUAL_PLAN
        return list(plan[: self.num_seeds])

    def validate(self) -> None:
        if not 1 <= self.num_seeds <= len(SEED_PLAN):
            raise ValueError(
                f"--seeds must be between 1 and {len(SEED_PLAN)}, got {self.num_seeds}"
            )
        # One flag per message: an error names only the setting at fault.
        for flag, value in (("--epochs", self.epochs), ("--nproc", self.nproc)):
            if value < 1:
                raise ValueError(f"{flag} must be positive, got {value}")
        if self.repeats < 1:
            raise ValueError(f"--repeats must be positive, got {self.repeats}")
        # Not flags: DemoConfig(...) only. A batch of 0 failed mid-run, a negative one or a
        # teacher of no epochs ran nothing (exit 0), a bad rate failed after the store was made.
        for name, count in (
            ("phase1_epochs", self.phase1_epochs),
            ("teacher_epochs", self.teacher_epochs),
            ("batch_size", self.batch_size),
        ):
            if count < 1:
                raise ValueError(f"{name} must be positive, got {count}")
        for name, rate in (("host_lr", self.host_lr), ("seed_lr", self.seed_lr)):
            if not (math.isfinite(rate) and rate > 0):
                raise ValueError(f"{name} must be finite and > 0, got {rate}")
        if self.replay < 0:
            raise ValueError(f"--replay must be 0 or more, got {self.replay}")
        if self.scenario not in SCENARIOS:
            raise ValueError(f"--scenario must be one of {', '.join(SCENARIOS)}")
        if self.replay and self.scenario != "continual":
            raise ValueError(
                f"--replay {self.replay} applies only to --scenario continual "
                f"(got --scenario {self.scenario})"
            )
        if self.nproc > 1 and (self.repeats > 1 or self.scenario != "standard"):
            raise ValueError("--repeats and --scenario continual run in one process: --nproc 1")
        if self.batch_size % self.nproc:
            fits = [n for n in range(1, self.batch_size + 1) if self.batch_size % n == 0]
            raise ValueError(
                f"--nproc {self.nproc}: the demo's batch of {self.batch_size} does not split "
                f"evenly over {self.nproc} ranks; use --nproc {', '.join(map(str, fits))}"
            )
        if not 0 <= self.seed <= MAX_SEED - (self.repeats - 1):
            raise ValueError(
                f"--seed {self.seed} with --repeats {self.repeats}: every run's seed must be "
                f"between 0 and {MAX_SEED}"
            )
        _check_device(self.device)


def _check_device(name: str) -> None:
    """The demo runs on the CPU or on a CUDA device this machine has; anything else (meta, mps,
    xpu, a missing GPU) is refused here, before anything is written."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}: use cpu or cuda") from None
    if device.type == "cpu":
        if device.index not in (None, 0):  # the kernels load on it, the model stays on cpu
            raise ValueError(f"--device {name!r}: the CPU is one device, cpu (or cpu:0)")
        return
    if device.type != "cuda":
        raise ValueError(f"--device {name!r} is not supported by the demo: use cpu or cuda")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} was requested but CUDA is not available")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {name!r}: this machine has {count} CUDA device(s)")
