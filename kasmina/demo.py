"""``kasmina demo``: a complete morphogenetic training run on the CPU in well under two minutes.

The story, on scikit-learn's bundled handwritten digits (no download):

1. fresh HMAC keys (one for commands, one for the artifact publisher) and seed blueprints
   exported with ``torch.export`` and published, signed, into a local Urza store;
2. a teacher MLP trains for a few epochs; the kernel manager then holds it frozen in bf16;
3. a deliberately narrow host MLP trains with DORMANT seed slots on all three of its layers,
   registered with a ``KasminaKernelManager``;
4. at each epoch boundary a controller (``demo_controller``) watches validation accuracy and
   sends signed ``AdaptationCommand`` bytes; an adversary sends forged, replayed, tampered and
   stale ones. All of them go through ``DistributedCoordinator`` (every rank applies them at
   the same boundary) into the manager's ``LeylineAdaptationHandler``;
5. germinated seeds load through Urza and the kernel cache, train in isolation (verified every
   step), distil from the teacher (the head's seeds), blend in, and are fossilized or culled on
   their measured help;
6. a table, ``report.txt``, ``result.json``, ``telemetry.jsonl`` and ``demo.png``.

Deterministic for a fixed ``--seed`` on the CPU (timings aside). The same host trained without
any seed is reported beside it, so the effect of growth is measured, not assumed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from kasmina.auth import generate_key
from kasmina.blueprints import get_blueprint
from kasmina.kd import KDConfig
from kasmina.layer import KasminaLayer
from kasmina.lifecycle import GPUStateTensor

logger = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- data and models


@dataclass
class Digits:
    x: torch.Tensor
    y: torch.Tensor
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


def load_digits_split(seed: int, device: torch.device) -> Digits:
    """The 1,797 8x8 digits scaled to [0, 1]; 2/3 train, 1/6 validation, 1/6 test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32, device=device) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64, device=device)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(device)
    n = len(x) // 6
    return Digits(x, y, perm[2 * n :], perm[:n], perm[n : 2 * n])


class HostMLP(nn.Module):
    """A deliberately narrow host: the capacity is what the seeds bring."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def teacher_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def graft_slots(model: HostMLP, telemetry: Any, embargo_epochs: int) -> list[KasminaLayer]:
    """Wrap fc1, fc2 and head in KasminaLayers over one shared state table (SLOTS)."""
    device = next(model.parameters()).device
    table = GPUStateTensor(
        sum(n for _, n, _, _ in SLOTS), device, embargo_epochs=embargo_epochs, telemetry=telemetry
    )
    slots, offset = [], 0
    for region, (name, n, width, distils) in enumerate(SLOTS):
        layer = KasminaLayer(
            getattr(model, name),
            n,
            width,
            kd_config=KD if distils else None,
            state=table,
            state_offset=offset,
            layer_id=name,
            region_id=region,
        )
        setattr(model, name, layer)
        slots.append(layer)
        offset += n
    return slots


def accuracy_and_loss(model: nn.Module, data: Digits, idx: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(data.x[idx])
        acc = (logits.argmax(-1) == data.y[idx]).float().mean().item()
        return acc, F.cross_entropy(logits, data.y[idx]).item()


def batches(
    data: Digits, epoch: int, cfg: DemoConfig, rank: int, world: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled full minibatches; every rank draws the same order and keeps its share of each."""
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = data.train[torch.randperm(len(data.train), generator=gen).to(data.train.device)]
    for start in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
        idx = order[start : start + cfg.batch_size][rank::world]
        yield data.x[idx], data.y[idx]


def train_plain(
    model: nn.Module, cfg: DemoConfig, data: Digits, epochs: int, lr: float, rank: int, world: int
) -> nn.Module:
    """Ordinary data-parallel training (the teacher, and the seedless baseline host)."""
    from kasmina.distributed import average_gradients

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        for xb, yb in batches(data, epoch, cfg, rank, world):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            average_gradients(list(model.parameters()))
            opt.step()
    return model


# ------------------------------------------------------------------------------ preparation


def prepare(cfg: DemoConfig) -> dict[str, Any]:
    """Keys and the Urza store, once, before any rank starts; returns what every rank needs."""
    from kasmina.auth import Keyring
    from kasmina.publish import publish_artifact

    out = _claim_output_dir(cfg.out_dir)
    keys = {COMMAND_KEY: generate_key(), PUBLISHER_KEY: generate_key()}
    key_file = out / "keys.json"
    key_file.touch(mode=0o600)
    key_file.chmod(0o600)
    key_file.write_text(json.dumps({k: v.hex() for k, v in keys.items()}, indent=2) + "\n")
    publisher = Keyring({PUBLISHER_KEY: keys[PUBLISHER_KEY]})
    store = str(out / "urza")
    wanted = list(SEED_PLAN[: cfg.num_seeds])
    if any(sid == REGROW[0] for sid, _ in wanted):
        wanted.append(REGROW)
    artifacts: dict[tuple[str, int], str] = {}
    plan = []
    for seed_id, name in wanted:
        key = (name, CHUNK[seed_id])
        if key not in artifacts:
            torch.manual_seed(cfg.seed * 31 + len(artifacts))
            module = get_blueprint(name).build(key[1]).eval()
            example = torch.randn(8, key[1], generator=torch.Generator().manual_seed(0))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.export internals
                manifest = publish_artifact(
                    module, [example], store, name, publisher, PUBLISHER_KEY
                )
            artifacts[key] = manifest.artifact_id
        plan.append((seed_id, artifacts[key]))
    return {"keys": {k: v.hex() for k, v in keys.items()}, "store": store, "plan": plan}


MARKER = ".kasmina-demo"
_OWNED = ("urza", "checkpoints", "emergency")


def _claim_output_dir(out: Path) -> Path:
    """Create ``out``, or reuse one an earlier demo made (its store and checkpoints are cleared:
    each run has fresh keys, so an old store would not verify). Any other non-empty directory
    is refused rather than written into."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ValueError(f"--out {out} is a non-empty directory the demo did not create")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    for name in _OWNED:
        shutil.rmtree(out / name, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------ entry points


def run_demo(cfg: DemoConfig, prepared: dict[str, Any], rank: int = 0, world: int = 1):
    """One rank's run (the whole run when ``world == 1``); returns its ``DemoResult``."""
    from kasmina.demo_loop import DemoLoop

    device = torch.device(cfg.device)
    data = load_digits_split(cfg.seed, device)
    torch.manual_seed(cfg.seed + 1)
    teacher = train_plain(
        teacher_mlp().to(device), cfg, data, cfg.teacher_epochs, 3e-3, rank, world
    )
    teacher_acc, _ = accuracy_and_loss(teacher, data, data.test)
    torch.manual_seed(cfg.seed + 2)
    baseline = train_plain(HostMLP().to(device), cfg, data, cfg.epochs, cfg.host_lr, rank, world)
    baseline_acc, _ = accuracy_and_loss(baseline, data, data.test)
    torch.manual_seed(cfg.seed + 2)  # the grown host starts from the baseline's initial weights
    model = HostMLP().to(device)
    loop = DemoLoop(cfg, prepared, model, teacher, data, rank, world)
    return loop.run(teacher_acc, baseline_acc)


def _rank_main(rank: int, world: int, cfg: DemoConfig, prepared: dict[str, Any]) -> None:
    _quiet_logging()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # ranks share the cores
    result = run_demo(replace(cfg, progress=cfg.progress and rank == 0), prepared, rank, world)
    if rank == 0:
        (cfg.out_dir / "result.json").write_text(json.dumps(result.to_json(), indent=1))


def _quiet_logging() -> None:
    """The demo prints its own report; library warnings (refused gates, rejected commands are
    part of the show) go to the telemetry file, not the terminal."""
    logging.basicConfig(level=logging.CRITICAL, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)


def _under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def _run_torchrun(cfg: DemoConfig) -> Any:
    """This process is one rank of a ``torchrun`` launch: rank 0 prepares, every rank trains.
    Returns rank 0's result (None on the other ranks)."""
    import torch.distributed as dist

    from kasmina.distributed import init_from_env

    backend = "nccl" if torch.device(cfg.device).type == "cuda" else "gloo"
    rank, world = init_from_env(backend, timeout_s=300)
    try:
        replace(cfg, nproc=world).validate()
        shared = [prepare(cfg) if rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)  # keys and store location, within the job
        ranked = replace(cfg, nproc=world, progress=cfg.progress and rank == 0)
        result = run_demo(ranked, shared[0], rank, world)
    finally:
        dist.destroy_process_group()
    return result if rank == 0 else None


def run_demo_cli(cfg: DemoConfig) -> int:
    """``kasmina demo``: prepare, run (in ``cfg.nproc`` processes, or as one rank of a
    ``torchrun`` launch), then print and save the report (rank 0)."""
    from kasmina.demo_report import DemoResult, format_report, plot

    cfg.validate()
    _quiet_logging()
    start = time.perf_counter()
    if _under_torchrun():
        result = _run_torchrun(cfg)
        if result is None:
            return 0
    elif cfg.nproc == 1:
        result = run_demo(cfg, prepare(cfg))
    else:
        from kasmina.distributed import spawn

        prepared = prepare(cfg)
        backend = "nccl" if torch.device(cfg.device).type == "cuda" else "gloo"
        spawn(_rank_main, cfg.nproc, args=(cfg, prepared), backend=backend, timeout_s=300)
        result = DemoResult.from_json(json.loads((cfg.out_dir / "result.json").read_text()))
    result.wall_s = time.perf_counter() - start
    (cfg.out_dir / "result.json").write_text(json.dumps(result.to_json(), indent=1))
    report = format_report(result)
    (cfg.out_dir / "report.txt").write_text(report + "\n")
    png = plot(result, cfg.out_dir / "demo.png")
    print(report)
    print(f"\nwrote {cfg.out_dir / 'report.txt'}, {png}, {cfg.out_dir / 'telemetry.jsonl'}")
    sys.stdout.flush()
    return 0
