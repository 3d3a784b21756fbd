"""Shared pieces of the multi-rank manager tests: one rank's rig over the parent's store
(``_rank_rig``), its training loop and epoch boundary (``Trainer``, whose results each rank saves
for the test to compare), the spec the parent hands the ranks and the loading and comparing of
what they saved, and the batch-norm kernel and host of the buffer scenarios.

The workers that patch ``wrap_ddp`` or ``DistributedKasmina`` for ``Trainer`` patch them here, in
the spawned process only."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn import functional as F

from kasmina.control.builders import make_seed_command
from kasmina.control.processes import spawn
from kasmina.kd.config import KDConfig
from kasmina.manager.ddp import DistributedKasmina, wrap_ddp
from kasmina.utils.keyring import Keyring, generate_key
from tests.manager.helpers import PUBLISHER, Host, Rig, make_config

FRESHNESS_S = 1.5  # the epoch with the long pause outlasts it
STEPS = 2  # per epoch


def _device(rank: int, spec: dict[str, Any]) -> str:
    return f"cuda:{rank}" if spec["backend"] == "nccl" else "cpu"


def _rank_rig(rank: int, spec: dict[str, Any]) -> Rig:
    keyring = Keyring({"ctl": bytes.fromhex(spec["key"])})
    device = _device(rank, spec)
    config = make_config(
        Path(spec["out"]) / f"rank{rank}",
        Path(spec["store"]),
        # The parent published the artifacts: trust its publisher, not this process's.
        urza_trusted_publishers={spec["publisher_id"]: spec["publisher_key"]},
        command_freshness_s=FRESHNESS_S,
        checkpoint_mode="memory",
        kd_enabled=True,
        kd=KDConfig(temperature=2.0, alpha=1.0),
        device=device,
    )
    return Rig(config, keyring, device=device, **spec.get("attach", {}))


def _signed(rig: Rig, op: str, seed_id: str, artifact: str = "", **params: float) -> bytes:
    # A generous timeout: a fresh rank's first fetch loads the exported kernel cold (2-3 s on a
    # loaded 2-core machine), so the default 5 s refused a GERMINATE on every rank now and then.
    return rig.signed(make_seed_command(op, seed_id, artifact, params, timeout_s=60.0))


class Trainer:
    """One rank's loop: DDP forward, the manager's KD backward and step, the epoch boundary."""

    def __init__(self, rank: int, world: int, spec: dict[str, Any], group: Any = None) -> None:
        torch.set_num_threads(1)
        self.rank, self.world = rank, world
        self.rig = _rank_rig(rank, spec)
        self.device = _device(rank, spec)
        self.manager = self.rig.manager
        self.net = wrap_ddp(self.rig.model)
        self.dk = DistributedKasmina(self.manager, group=group)
        self.gen = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
        self.teacher = torch.nn.Linear(6, 4)
        torch.nn.init.normal_(self.teacher.weight, generator=torch.Generator().manual_seed(9))
        self.teacher.to(self.device)
        self.results: list[Any] = []
        self.host_stepped: list[bool] = []
        self.host_optimizer: torch.optim.Optimizer | None = None  # the trainer's (host_lr=None)
        self.epoch = 0

    def train(self, steps: int = STEPS, drop_grad_of: str | None = None, clip: float = 0.0) -> None:
        """``drop_grad_of``: this rank loses that seed's first gradient each step (the others
        average it with a zero from here); ``clip``: ``step``'s ``grad_clip_norm``."""
        for _ in range(steps):
            x = torch.randn(8, 6, generator=self.gen).to(self.device)
            with torch.no_grad():
                teacher = self.teacher(x)
            y = teacher.argmax(-1)
            self.manager.set_teacher_logits(teacher)
            loss = F.cross_entropy(self.net(x), y)
            self.manager.backward(loss, kd_loss=self.manager.collect_kd_losses())
            if drop_grad_of is not None:
                self.manager.seed(drop_grad_of).seed_parameters()[0].grad = None
            self.host_stepped.append(self.manager.step(grad_clip_norm=clip)["host_stepped"])
            if self.host_optimizer is not None:  # after the manager's step, as §4 asks
                self.host_optimizer.step()
                self.host_optimizer.zero_grad()

    def boundary(self, inference: bool = False) -> Any:
        """``inference``: the boundary inside the user's ``torch.inference_mode()`` block."""
        with torch.inference_mode() if inference else contextlib.nullcontext():
            self.manager.end_epoch(self.epoch)
            result = self.dk.sync_epoch(self.epoch)
        self.results.append(result)
        self.epoch += 1
        return result

    def repair_and_save(
        self, out: str, name: str, steps_between: int, inference: bool = False
    ) -> None:
        """An epoch sync (the one that repairs; ``inference``: under inference mode, whose
        tensors the repaired rank could not train), ``steps_between`` steps, another sync
        (which must find nothing); save both verdicts with this rank's state, and close."""
        repaired = self.boundary(inference)
        self.train(steps_between)
        after = self.boundary()
        self.save(
            out,
            name,
            verdict=(repaired.divergent_ranks, repaired.source_rank, repaired.repaired_ranks),
            next_verdict=after.divergent_ranks,
        )
        self.manager.close()

    def epoch_with(self, commands: dict[int, list[bytes]], steps: int = STEPS) -> Any:
        """Train an epoch in which the ranks named in ``commands`` receive them (at its start:
        they were signed just now, and the window is short)."""
        for raw in commands.get(self.rank, []):
            assert self.manager.handle_adaptation_command(raw)  # verified here, relayed
        self.train(steps)
        return self.boundary()

    def seed_state(self) -> dict[str, torch.Tensor]:
        registry = self.manager.require_registry()
        state = {
            f"{r.seed_id}.{i}": p.detach().clone()
            for r in registry
            for i, p in enumerate(r.seed.seed_parameters())
        }
        state.update({f"host.{i}": p.detach().clone() for i, p in enumerate(registry.host_params)})
        state["table"] = registry.table.state_tensor.clone()
        # G2's evidence: the epochs each seed trained in ISOLATED_INIT, and this epoch's mark.
        trained = [(r.seed.trained_epochs, int(r.seed.trained_this_epoch)) for r in registry]
        state["trained"] = torch.tensor(trained)
        return state

    def save(self, out: str, name: str, **extra: Any) -> None:
        torch.save(
            {
                "results": [
                    (r.epoch, r.outcomes, r.divergent_ranks, r.source_rank, r.repaired_ranks)
                    for r in self.results
                ],
                "checksums": [r.checksums for r in self.results],
                "reasons": [[c.reason for c in r.commands] for r in self.results],
                "state": self.seed_state(),
                "stages": {k: int(v) for k, v in self.manager.stages().items()},
                "handler": dict(self.manager.handler.stats),
                "coordinator": dict(self.dk.coordinator.stats),
                "grads": dict(self.dk.seed_grads.stats),
                **extra,
            },
            Path(out, f"{name}{self.rank}.pt"),
        )


class Normalised(torch.nn.Module):
    """A seed kernel with batch norm in training mode: each rank's forwards update its running
    statistics from that rank's own shard."""

    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(dim, dim)
        self.norm = torch.nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * self.norm(self.fc(x))


def _spec(tmp_path: Path, published, backend: str) -> dict[str, Any]:
    store, mlp, _ = published
    return {
        "backend": backend,
        "store": str(store),
        "mlp": mlp,
        "key": generate_key().hex(),
        "publisher_id": PUBLISHER.key_id,
        "publisher_key": PUBLISHER.public_key_text,
        "out": str(tmp_path),
    }


def _load(tmp_path: Path, name: str, world: int) -> list[dict[str, Any]]:
    return [torch.load(tmp_path / f"{name}{r}.pt", map_location="cpu") for r in range(world)]


def _assert_equal_states(runs: list[dict[str, Any]]) -> None:
    first = runs[0]["state"]
    for run in runs[1:]:
        assert run["state"].keys() == first.keys()
        for name, tensor in first.items():
            assert torch.equal(run["state"][name], tensor), name


def _two_gloo_ranks(
    worker: Callable[..., None], tmp_path: Path, published: Any, name: str
) -> list[dict[str, Any]]:
    """Run ``worker`` on two gloo ranks; what each saved under ``name``."""
    spec = _spec(tmp_path, published, "gloo")
    spawn(worker, 2, args=(spec,), backend="gloo", timeout_s=60, join_timeout_s=150)
    return _load(tmp_path, name, 2)


class NormedHost(Host):
    """The test host with a batch norm before the slot: in train mode its forwards update the
    running statistics from each rank's own shard."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.norm(self.inp(x))))


def _host_norm(t: Trainer) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in t.rig.model.norm.named_buffers()}


@contextlib.contextmanager
def one_rank_group(rendezvous: Path) -> Iterator[None]:
    """A one-rank gloo process group in this process, for the block (``rendezvous``: a file
    to be, in a folder that is)."""
    init = f"file://{rendezvous}"
    dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
