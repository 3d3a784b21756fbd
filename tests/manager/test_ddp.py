"""The kernel manager under real data parallelism: gloo processes, DDP host, signed lifecycle.

Each test spawns 2 or 3 processes joined on loopback. Every rank runs a ``KasminaKernelManager``
over the small test host wrapped in ``DistributedDataParallel`` (``wrap_ddp``), with a
``DistributedKasmina`` on top, trains on its own data shard with KD, and takes a seed from
DORMANT to ACTIVE through signed commands received on different ranks. The ranks write what
they ended with to files the test compares: seed parameters bit for bit, the sync verdicts, the
command outcomes. The scenarios also cover an epoch longer than the freshness window, a command
delivered to two ranks, a forged command, a corrupted rank being repaired (with three ranks,
by the majority, from a rank other than 0, also after steps trained with mismatched seed
layouts), a kernel fetch on one rank slower than the sync's process-group timeout, a
batch-norm seed whose running statistics, different on each rank's shard, are averaged, and a
host frozen whole (the seeds alone train), which ``wrap_ddp`` leaves unwrapped, with rank 0's
parameters and buffers.

Every collective is bounded by the process group's timeout and the whole run by
``join_timeout_s``, so a hung rank fails the test instead of hanging the suite.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.nn import functional as F

from kasmina.control.auth import sign_command
from kasmina.control.builders import make_rollback_command, make_seed_command
from kasmina.control.processes import UnsupportedParallelismError, spawn
from kasmina.control.relay import EpochSyncResult
from kasmina.kd.config import KDConfig
from kasmina.leyline import AdaptationCommand
from kasmina.manager.coordination import ManagerApplier, ManagerReplica
from kasmina.manager.ddp import DistributedKasmina, kasmina_owned_names, wrap_ddp
from kasmina.manager.grad_sync import SeedGradientSync
from kasmina.stages import SeedStage
from kasmina.urza.publish import publish_artifact
from kasmina.utils.keyring import Keyring, generate_key
from tests.manager.helpers import PUBLISHER, SEED0, SEED1, Host, Rig, make_config

S = SeedStage
FRESHNESS_S = 1.5  # the epoch with the long pause outlasts it
STEPS = 2  # per epoch


def _backends(world: int) -> list[Any]:
    """gloo on the CPU always; NCCL on one GPU per rank where the machine has them (the GPU
    workflow), the same scenario bit for bit."""
    nccl = dist.is_nccl_available() and torch.cuda.device_count() >= world
    return [
        pytest.param("gloo", id="gloo"),
        pytest.param(
            "nccl",
            id="nccl",
            marks=pytest.mark.skipif(not nccl, reason=f"NCCL needs {world} CUDA devices"),
        ),
    ]


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


def _lifecycle(t: Trainer, spec: dict[str, Any]) -> dict[str, Any]:
    """DORMANT -> ACTIVE for SEED0 with commands received on different ranks; returns facts the
    test checks about the long epoch."""
    rig, mlp, last = t.rig, spec["mlp"], t.world - 1
    # Epoch 0, longer than the freshness window: the GERMINATE reaches the last rank halfway
    # through and rank 0 too (a controller retrying elsewhere); only one copy may run.
    t.train(1)
    shared = [_signed(rig, "germinate", SEED0, mlp) if t.rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)  # one signed command, delivered twice
    germinate = shared[0]
    if t.rank in (0, last):
        assert t.manager.handle_adaptation_command(germinate)
    time.sleep(FRESHNESS_S * 1.3)
    parsed = AdaptationCommand.FromString(germinate)
    stale_now = t.manager.verifier.verify(parsed, record_nonce=False)[1]
    t.train(1)
    first = t.boundary()
    assert t.manager.stages()[SEED0] == S.ISOLATED_INIT
    # Epoch 1: a forgery is refused on arrival; ADVANCE (G2) received on rank 1.
    forger = Keyring({"ctl": generate_key()})  # the right key id, the wrong key
    forged = sign_command(make_seed_command("cull", SEED1), forger, "ctl").SerializeToString()
    refused_forgery = not t.manager.handle_adaptation_command(forged)
    t.epoch_with({1: [_signed(rig, "advance", SEED0)]})
    assert t.manager.stages()[SEED0] == S.COMPATIBILITY_CHECK
    t.epoch_with({0: [_signed(rig, "advance", SEED0)]})  # G3 on the probes of epoch 1
    assert t.manager.stages()[SEED0] == S.GRAFTING
    t.epoch_with({last: [_signed(rig, "advance", SEED0)]}, steps=4)  # alpha reaches 1: G4
    assert t.manager.stages()[SEED0] == S.STABILIZATION
    # G5's evidence: measured by Kasmina on every rank on the same held-out batch (the weights
    # are identical across ranks, so are the measurements and the decision).
    with torch.no_grad():
        held_out = [(rig.x, t.teacher(rig.x).argmax(-1))]
    measured = t.manager.evaluate_seeds(held_out, loss_fn=F.cross_entropy)
    assert measured[SEED0].score >= 0.5, measured
    t.epoch_with({0: [_signed(rig, "advance", SEED0)]})
    assert t.manager.stages()[SEED0] == S.ACTIVE
    t.train(2)  # the host optimizer trains the fossilized seed; its grads still averaged
    return {
        "stale_now": stale_now,
        "first": [(c.origin, c.ok, c.reason) for c in first.commands],
        "refused_forgery": refused_forgery,
    }


def _worker_two(rank: int, world: int, spec: dict[str, Any]) -> None:
    t = Trainer(rank, world, spec)
    facts = _lifecycle(t, spec)
    t.save(spec["out"], "clean", **facts)
    # A corrupted rank: a seed weight and its optimizer moments changed on rank 1 only.
    if rank == 1:
        with torch.no_grad():
            t.manager.seed(SEED0).seed_parameters()[0].add_(1e-3)
            host_opt = t.manager.optimizers.optimizer("host")
            next(iter(host_opt.state.values()))["exp_avg"].mul_(2.0)
    t.repair_and_save(spec["out"], "repaired", steps_between=2, inference=True)


def _worker_three(rank: int, world: int, spec: dict[str, Any]) -> None:
    t = Trainer(rank, world, spec)
    rig, mlp = t.rig, spec["mlp"]
    t.epoch_with({2: [_signed(rig, "germinate", SEED0, mlp)]})
    t.epoch_with({1: [_signed(rig, "germinate", SEED1, mlp)]})
    t.train(2, drop_grad_of=SEED0 if rank == 2 else None)
    # Rank 0 diverges in layout: it culls a seed on its own (its kernel released), and a weight
    # of the other seed changes. Ranks 1 and 2 are the majority, so rank 0 is repaired from 1.
    if rank == 0:
        registry = t.manager.require_registry()
        assert t.manager.execution.execute(_local_cull(t, SEED1))  # past the relay: a bug
        assert registry[SEED1].kernel is None
        with torch.no_grad():
            t.manager.seed(SEED0).seed_parameters()[0].mul_(1.5)
    t.repair_and_save(spec["out"], "three", steps_between=2)


def _worker_three_steps(rank: int, world: int, spec: dict[str, Any]) -> None:
    """Rank 0 alone quarantines a seed and the ranks train on before the sync: while the seed
    layouts differ no rank steps its seeds on its own gradients, so ranks 1 and 2 stay equal and
    outvote rank 0, which they repair (before, they drifted apart and rank 0 won a 3-way tie)."""
    t = Trainer(rank, world, spec)
    rig, mlp = t.rig, spec["mlp"]
    t.epoch_with(
        {0: [_signed(rig, "germinate", SEED0, mlp), _signed(rig, "germinate", SEED1, mlp)]}
    )
    if rank == 0:
        t.manager.seed(SEED1).quarantine("a fault on rank 0 only")
    t.train(3)
    t.repair_and_save(spec["out"], "steps", steps_between=1)


def _worker_verdict(rank: int, world: int, spec: dict[str, Any]) -> None:
    """A GERMINATE whose execution fails on rank 0 alone: the ranks tie, rank 0 decides, and
    rank 1 is repaired back to DORMANT."""
    t = Trainer(rank, world, spec)
    if rank == 0:

        def fails_here(*_args: Any, **_kwargs: Any) -> None:
            raise RuntimeError("a failure on rank 0 only")

        t.manager.execution._dry_run = fails_here
    t.epoch_with({0: [_signed(t.rig, "germinate", SEED0, spec["mlp"])]})
    t.save(spec["out"], "verdict", last_logged=t.manager.command_log[-1])
    t.manager.close()


def _worker_overflow(rank: int, world: int, spec: dict[str, Any]) -> None:
    """Rank 0's seed output is not finite for one step: its kernel's backward meets 0 * inf."""
    t = Trainer(rank, world, spec)
    t.epoch_with({0: [_signed(t.rig, "germinate", SEED0, spec["mlp"])]})
    kernel = t.manager.seed(SEED0).kernel
    handle = None
    if rank == 0:
        handle = kernel.register_forward_hook(lambda _m, _a, out: out * float("inf"))
    t.train(1)
    if handle is not None:
        handle.remove()
    t.train(1)
    t.save(spec["out"], "overflow", faults=t.manager.seed(SEED0).faults)
    t.manager.close()


def _worker_bad_gradient(rank: int, world: int, spec: dict[str, Any]) -> None:
    """Rank 0's seed gradient is NaN at every step, its output finite, under clipping."""
    t = Trainer(rank, world, spec)
    t.epoch_with({0: [_signed(t.rig, "germinate", SEED0, spec["mlp"])]})
    before = t.manager.seed(SEED0).faults

    def poison(_module: Any, _args: Any, out: torch.Tensor) -> None:
        if out.requires_grad:
            out.register_hook(lambda grad: grad * float("nan"))

    if rank == 0:
        t.manager.seed(SEED0).kernel.register_forward_hook(poison)
    t.train(9, clip=1.0)
    t.save(
        spec["out"], "bad_gradient", faults=t.manager.seed(SEED0).faults - before,
        stepped=t.host_stepped[-9:],
    )  # fmt: skip
    t.manager.close()


def _worker_fp16_average(rank: int, world: int, out: str) -> None:
    """The seeds' gradient average of fp16 gradients whose sum overflows fp16."""
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    p.grad = torch.full((4,), 40000.0 + rank * 2048.0, dtype=torch.float16)  # exact in fp16
    sync = SeedGradientSync(registry=None)  # type: ignore[arg-type]
    sync.live_parameters = lambda: [("out[0]", p)]  # type: ignore[method-assign]
    assert sync(True, {}) == (True, True)
    torch.save(p.grad, Path(out, f"fp16{rank}.pt"))


def _worker_uneven_registries(rank: int, world: int, out: str) -> None:
    """Ranks whose registries hold 2 and 3 seeds (slots attached differently), a fallback on
    rank 0: the flags' all-reduce would take vectors of two lengths."""

    class Record:
        def __init__(self, seed_id: str) -> None:
            self.seed_id = seed_id

    class Registry:
        def __init__(self, n: int) -> None:
            self.records = {f"s{i}": Record(f"s{i}") for i in range(n)}

        def __iter__(self) -> Any:
            return iter(self.records.values())

    sync = SeedGradientSync(Registry(2 + rank))  # type: ignore[arg-type]
    sync.live_parameters = lambda: []  # type: ignore[method-assign]
    flags = {"s0": [rank != 0, rank == 0]}
    assert sync(True, flags) == (False, True)
    torch.save(flags, Path(out, f"uneven{rank}.pt"))


def _worker_cast_rank(rank: int, world: int, out: str) -> None:
    """Rank 1's host cast to bfloat16, its slot attached alike: gloo aborted the process in
    DDP's first broadcast (sizes that do not match). Both ranks get one clear refusal."""
    from kasmina.seeds.inject import attach
    from tests.manager.helpers import Host

    model = Host()
    attach(model, ["out"], 2, 2)
    if rank == 1:
        model.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"rank\(s\) \[1\] differ from rank 0") as refused:
        wrap_ddp(model)
    Path(out, f"refused{rank}.txt").write_text(str(refused.value))
    same = Host()
    attach(same, ["out"], 2, 2)
    assert wrap_ddp(same) is not same  # alike on both ranks: wrapped
    # Over a device mesh DDP's group is the mesh's: here each rank's alone, so the ranks' models
    # may differ (pipeline stages, say); the check was made over the whole world.
    from torch.distributed.device_mesh import init_device_mesh

    alone = init_device_mesh("cpu", (world, 1), mesh_dim_names=("pp", "dp"))["dp"]
    assert wrap_ddp(model, device_mesh=alone) is not model


def _worker_frozen_rank(rank: int, world: int, out: str) -> None:
    """Rank 0's host frozen whole, rank 1's trainable, alike otherwise: rank 0 returned it
    unwrapped while rank 1 waited in DDP's constructor until the group's timeout. Both get one
    clear refusal, at once."""
    from kasmina.seeds.inject import attach
    from tests.manager.helpers import Host

    model = Host()
    attach(model, ["out"], 2, 2)
    if rank == 0:
        ours = set(kasmina_owned_names(model))
        for name, p in model.named_parameters():
            if name not in ours:
                p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"rank\(s\) \[1\] differ from rank 0") as refused:
        wrap_ddp(model)
    Path(out, f"refused{rank}.txt").write_text(str(refused.value))


def _worker_leak(rank: int, world: int, spec: dict[str, Any]) -> None:
    """Rank 0's isolation check finds a leak in one step; rank 1's finds none."""
    t = Trainer(rank, world, spec)
    t.epoch_with({0: [_signed(t.rig, "germinate", SEED0, spec["mlp"])]})
    guard, check = t.manager.guard, t.manager.guard._check
    if rank == 0:
        guard._check = lambda registry, kd_leaked: check(registry, kd_leaked) and False
    t.train(1)
    guard._check = check
    t.train(1)
    t.save(spec["out"], "leak", stepped=t.host_stepped[-2:])
    t.manager.close()


class Normalised(torch.nn.Module):
    """A seed kernel with batch norm in training mode: each rank's forwards update its running
    statistics from that rank's own shard."""

    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(dim, dim)
        self.norm = torch.nn.BatchNorm1d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * self.norm(self.fc(x))


def _kernel_buffers(t: Trainer) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in t.manager.seed(SEED0).kernel.named_buffers()}


def _worker_batch_norm(rank: int, world: int, spec: dict[str, Any]) -> None:
    """A batch-norm seed trains an epoch on each rank's shard; the buffers before and after the
    sync that ends it."""
    t = Trainer(rank, world, spec)
    t.epoch_with({0: [_signed(t.rig, "germinate", SEED0, spec["normalised"])]})
    t.train()
    before = _kernel_buffers(t)
    t.boundary()
    after = _kernel_buffers(t)
    t.save(spec["out"], "bn", before=before, after=after, buffers=dict(t.dk.seed_buffers.stats))
    t.manager.close()


SHORT_GROUP_TIMEOUT_S = 3.0


def _worker_slow_fetch(rank: int, world: int, spec: dict[str, Any]) -> None:
    """Rank 1's kernel fetch stalls (a store that ignores its deadline) for longer than the
    timeout of the sync's process group, though not than the command's: rank 1 must answer
    that it could not prepare the command before rank 0's collective times out."""
    from datetime import timedelta

    group = dist.new_group(timeout=timedelta(seconds=SHORT_GROUP_TIMEOUT_S))
    t = Trainer(rank, world, spec, group=group)
    loader, mlp = t.manager.loader, spec["mlp"]
    release = threading.Event()
    if rank == 0:
        loader.original(mlp)  # cached here: rank 0 prepares at once
        germinate = make_seed_command("germinate", SEED0, mlp, timeout_s=30.0)
        assert t.manager.handle_adaptation_command(t.rig.signed(germinate))
    else:
        original = loader.original

        def stalled(artifact_id: str, *, deadline: float | None = None) -> Any:
            release.wait(20.0)
            return original(artifact_id, deadline=deadline)

        loader.original = stalled
    dist.barrier()  # the default group (a long timeout): the ranks start the sync together
    started = time.monotonic()
    t.boundary()
    elapsed = time.monotonic() - started
    release.set()  # the stalled fetch goes on, and fills the cache: wait for it
    deadline = time.monotonic() + 30.0
    while mlp not in loader.cache and time.monotonic() < deadline:
        time.sleep(0.05)
    t.save(
        spec["out"],
        "slow",
        elapsed=elapsed,
        prepare_timeout_s=t.dk.applier.prepare_timeout_s,
        cached=mlp in loader.cache,
    )
    t.manager.close()


def _local_cull(t: Trainer, seed_id: str) -> Any:
    """A verified command made in-process (what a bug or a stray call on one rank would do)."""
    from kasmina.control.commands import to_kasmina_command

    command = to_kasmina_command(make_seed_command("cull", seed_id))
    assert not isinstance(command, str)
    return command


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


@pytest.mark.slow  # spawns processes: most of the time is their imports
@pytest.mark.parametrize("backend", _backends(2))
def test_two_ranks_run_a_signed_lifecycle_in_lockstep_and_repair_a_corrupted_rank(
    tmp_path: Path, published, backend: str
) -> None:
    spec = _spec(tmp_path, published, backend)
    spawn(_worker_two, 2, args=(spec,), backend=backend, timeout_s=60, join_timeout_s=120)

    clean = _load(tmp_path, "clean", 2)
    _assert_equal_states(clean)  # seeds (ACTIVE, trained on different shards), host, table
    for run in clean:
        assert run["stages"][SEED0] == S.ACTIVE and run["stages"][SEED1] == S.DORMANT
        assert all(divergent == () for _, _, divergent, _, _ in run["results"])
        assert all(len(set(c)) == 1 for c in run["checksums"])
        # Epoch 0 outlasted the window (a check now says stale), yet the GERMINATE ran on both
        # ranks; its second copy (rank 1 received it too) ran nowhere.
        assert run["stale_now"] == "stale"
        assert run["first"][0] == (0, True, "")
        assert run["first"][1][:2] == (1, False) and "duplicates" in run["first"][1][2]
        assert run["refused_forgery"]
        assert run["handler"]["rejected:bad_signature"] == 1
        assert run["grads"]["steps"] > 0 and run["grads"].get("layout_mismatch", 0) == 0
        assert all(all(ok) for _, ok, _, _, _ in run["results"][1:])
    # Both ranks ran the G2 ADVANCE received on rank 1 (a rank other than 0).
    assert clean[0]["results"][1][1] == clean[1]["results"][1][1] == (True,)

    repaired = _load(tmp_path, "repaired", 2)
    for run in repaired:
        assert run["verdict"] == ((1,), 0, (1,))  # two ranks: rank 0 decides
        assert run["next_verdict"] == ()
    assert repaired[1]["coordinator"]["repairs"] == 1
    assert repaired[0]["coordinator"]["repairs_served"] == 1
    _assert_equal_states(repaired)


@pytest.mark.slow  # spawns processes: most of the time is their imports
@pytest.mark.parametrize("backend", _backends(3))
def test_three_ranks_repair_a_minority_rank_0_from_the_majority(
    tmp_path: Path, published, backend: str
) -> None:
    spec = _spec(tmp_path, published, backend)
    spawn(_worker_three, 3, args=(spec,), backend=backend, timeout_s=60, join_timeout_s=150)

    runs = _load(tmp_path, "three", 3)
    for run in runs:
        assert run["verdict"] == ((0,), 1, (0,))  # the majority decides, and rank 1 serves
        assert run["next_verdict"] == ()
        # The repair re-attached the kernel rank 0 had released.
        assert run["stages"][SEED0] == run["stages"][SEED1] == S.ISOLATED_INIT
    assert runs[0]["coordinator"]["repairs"] == 1
    assert runs[2]["grads"]["zero_filled"] == 2 and "zero_filled" not in runs[1]["grads"]
    _assert_equal_states(runs)


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_three_ranks_repair_rank_0_from_the_majority_after_steps_with_mismatched_layouts(
    tmp_path: Path, published
) -> None:
    spec = _spec(tmp_path, published, "gloo")
    spawn(_worker_three_steps, 3, args=(spec,), backend="gloo", timeout_s=60, join_timeout_s=150)

    runs = _load(tmp_path, "steps", 3)
    for run in runs:
        assert run["verdict"] == ((0,), 1, (0,))  # the healthy ranks agree: rank 0 is repaired
        assert run["next_verdict"] == ()
        assert run["stages"][SEED0] == run["stages"][SEED1] == S.ISOLATED_INIT
        assert run["grads"]["layout_mismatch"] == 3  # every rank saw each mismatched step
    assert runs[0]["coordinator"]["repairs"] == 1
    _assert_equal_states(runs)


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_a_fetch_slower_than_the_group_timeout_is_refused_on_every_rank_in_time(
    tmp_path: Path, published
) -> None:
    """The prepares of a sync get half the process group's timeout: a slow store on one rank
    refuses the command everywhere instead of failing every rank in a collective."""
    spec = _spec(tmp_path, published, "gloo")
    spawn(_worker_slow_fetch, 2, args=(spec,), backend="gloo", timeout_s=60, join_timeout_s=120)
    runs = _load(tmp_path, "slow", 2)
    for run in runs:
        assert run["prepare_timeout_s"] == SHORT_GROUP_TIMEOUT_S / 2
        assert run["results"][0][1] == (False,)
        assert run["reasons"][0] == ["not applied on any rank: rank(s) [1] could not prepare it"]
        assert run["stages"][SEED0] == S.DORMANT
        assert run["elapsed"] < SHORT_GROUP_TIMEOUT_S
        assert run["cached"]  # the fetch that outlasted the sync still filled the cache
    _assert_equal_states(runs)


# ----------------------------------------------------------------------- one process, no group


def test_without_a_process_group_ddp_wrapping_is_the_identity(tmp_path, store, keyring) -> None:
    rig = Rig(make_config(tmp_path, store), keyring)
    assert wrap_ddp(rig.model) is rig.model
    # Options a grown model cannot keep are refused here too: a slot whose seeds are isolated
    # leaves the host layers before it unused, and DDP would never reduce their bucket.
    for options in ({"static_graph": True}, {"find_unused_parameters": False}):
        with pytest.raises(ValueError, match="ranks split"):
            wrap_ddp(rig.model, **options)
    names = kasmina_owned_names(rig.model)
    assert names and all(n.startswith("out.") and not n.startswith("out.host.") for n in names)
    dk = DistributedKasmina(rig.manager)
    assert rig.manager.command_relay is not None and dk.world_size == 1
    with pytest.raises(ValueError, match="already part of a distributed run"):
        DistributedKasmina(rig.manager)
    rig.train(1)  # the seed all-reduce is a no-op in one process
    dk.close()
    assert rig.manager.command_relay is None and rig.manager.grad_sync is None


@pytest.mark.parametrize("closing", ["manager", "coordinator"])
def test_a_command_accepted_as_the_coordinator_closes_is_reported_refused(
    tmp_path, store, keyring, closing: str
) -> None:
    """The coordinator verifies a command, then holds it for the next sync. A close (the
    manager's, or the coordinator's own) that took the held commands between the two left this
    one held for a sync that never came: counted accepted, never reported. It is refused."""
    rig = Rig(make_config(tmp_path, store), keyring)
    manager = rig.manager
    dk = DistributedKasmina(manager)
    closed: list[bool] = []

    class CloseOnAck:  # the close runs while the command is in its check
        def send(self, packet) -> None:
            if not closed and any(m.name == "command.ack" for m in packet.metrics):
                closed.append(True)
                (manager.close if closing == "manager" else dk.close)()

    manager.telemetry.add_sink(CloseOnAck())
    assert not manager.handle_adaptation_command(rig.signed(make_seed_command("cull", SEED0)))
    stats = manager.handler.stats
    assert closed and stats["accepted"] == stats["failed"] == 1 and dk.coordinator.pending == 0
    assert manager.command_log[-1][2:] == (
        False,
        "the multi-rank coordinator closed before its next sync",
    )
    manager.close()


def test_a_second_trainer_of_a_run_is_refused_when_it_joins(tmp_path, store, keyring) -> None:
    """Ranks given one run_id and their own nonce ledgers would write the same checkpoint
    files: the second is refused as its ``DistributedKasmina`` is built, before it trains, or
    as its manager is built once the run's checkpoint directory is there."""

    def rank_rig(name: str) -> Rig:
        ledger = str(tmp_path / f"nonces-{name}.log")
        return Rig(make_config(tmp_path, store, run_id="shared", nonce_ledger=ledger), keyring)

    first = rank_rig("rank0").manager  # held: a collected manager's lock goes with it
    second = rank_rig("rank1").manager  # built before any store of the run was opened
    joined = DistributedKasmina(first)
    with pytest.raises(RuntimeError, match="held by another live trainer.*its own run_id"):
        DistributedKasmina(second)
    assert second.command_relay is None and second.grad_sync is None
    assert joined.state is first.state and first.command_relay is not None
    with pytest.raises(RuntimeError, match="held by another live trainer.*its own run_id"):
        rank_rig("rank2")  # the run's checkpoints are there: refused as it starts


def test_a_command_waits_for_the_sync_and_then_applies(tmp_path, store, keyring, mlp) -> None:
    rig = Rig(make_config(tmp_path, store), keyring)
    dk = DistributedKasmina(rig.manager)
    raw = _signed(rig, "germinate", SEED0, mlp)
    assert rig.manager.handle_adaptation_command(raw)
    rig.train(2)  # the step's safe point does not apply it: it waits for every rank
    assert rig.stage(SEED0) == S.DORMANT and dk.coordinator.pending == 1
    rig.manager.end_epoch(0)
    result = dk.sync_epoch(0)
    assert result.outcomes == (True,) and rig.stage(SEED0) == S.ISOLATED_INIT
    assert not rig.manager.handle_adaptation_command(raw)  # a replay, refused on arrival
    assert rig.manager.command_log[-1][2] is True


def test_a_command_queued_before_the_manager_joins_a_multi_rank_run_is_refused(
    tmp_path, store, keyring, mlp
) -> None:
    """Queued by the manager's own door before ``DistributedKasmina`` took it over, a command
    was applied by this rank's next safe point alone: on one rank only, the others repaired
    to it with no command in any sync's result. It is refused when the manager joins."""
    rig = Rig(make_config(tmp_path, store), keyring)
    assert rig.manager.handle_adaptation_command(_signed(rig, "germinate", SEED0, mlp))
    dk = DistributedKasmina(rig.manager)
    log = rig.manager.command_log[-1]
    assert log[2] is False and "joined a multi-rank run" in log[3]
    rig.train(1)
    rig.manager.end_epoch(0)
    assert dk.sync_epoch(0).commands == () and rig.stage(SEED0) == S.DORMANT
    stats = rig.manager.handler.stats
    assert (stats["accepted"], stats["failed"]) == (1, 1)
    # One the manager's own door verified as it joined, queued after: refused the same way.
    assert not rig.manager.intake.arrive(_signed(rig, "germinate", SEED1, mlp))
    assert "joined a multi-rank run" in rig.manager.command_log[-1][3]
    dk.close()  # single-process again: its own queue takes commands
    assert rig.manager.handle_adaptation_command(_signed(rig, "germinate", SEED1, mlp))
    # Applied at a safe point once its kernel is fetched (on a worker: maybe not by the next).
    assert [o.ok for o in rig.manager.apply_pending(wait=True)] == [True]
    assert rig.stage(SEED1) == S.ISOLATED_INIT


def test_a_command_the_relay_refused_after_a_safe_point_polled_it_is_not_applied(
    tmp_path, store, keyring, mlp
) -> None:
    """A safe point polls the queue, then takes what was ready. The manager joining a
    multi-rank run between the two (on another thread) took those commands off and reported
    them refused; the safe point took and applied them all the same, on this rank alone, each
    reported twice. It takes only what is still queued."""
    rig = Rig(make_config(tmp_path, store), keyring)
    manager = rig.manager
    manager.loader.original(mlp)  # cached: ready at once
    assert manager.handle_adaptation_command(_signed(rig, "germinate", SEED0, mlp))
    queue = manager.intake.queue
    poll = queue.poll_ready
    joined: list[DistributedKasmina] = []

    def poll_then_join(**kwargs: Any) -> Any:
        ready = poll(**kwargs)
        if ready and not joined:
            joined.append(DistributedKasmina(manager))
        return ready

    queue.poll_ready = poll_then_join  # type: ignore[method-assign]
    assert manager.apply_pending() == []
    stats = manager.handler.stats
    assert (stats["accepted"], stats["executed"], stats["failed"]) == (1, 0, 1)
    assert rig.stage(SEED0) == S.DORMANT and "joined a multi-rank run" in manager.command_log[-1][3]
    joined[0].close()
    manager.close()


def test_a_command_carried_out_directly_on_one_rank_is_refused(tmp_path, store, keyring, mlp):
    """The handler's own door calls the manager's ``execute``, which carried the command out at
    once, on this rank alone: the ranks' layouts then differed, every seed gradient was dropped
    on every rank, and the sync repaired the rank back, undoing what its door reported done."""
    rig = Rig(make_config(tmp_path, store), keyring)
    dk = DistributedKasmina(rig.manager)
    assert not rig.manager.handler.handle_adaptation_command(_signed(rig, "germinate", SEED0, mlp))
    assert rig.stage(SEED0) == S.DORMANT and "every rank or none" in rig.manager.command_log[-1][3]
    stats = rig.manager.handler.stats
    assert (stats["accepted"], stats["executed"], stats["failed"]) == (1, 0, 1)
    dk.close()  # single-process again: carried out at once, as before
    assert rig.manager.handler.handle_adaptation_command(_signed(rig, "germinate", SEED0, mlp))
    assert rig.stage(SEED0) == S.ISOLATED_INIT


@pytest.mark.usefixtures("sigint_raises")
def test_a_ctrl_c_in_a_sync_before_it_applies_keeps_every_command_for_the_next(
    tmp_path, store, keyring, mlp, monkeypatch
) -> None:
    """A Ctrl-C while the sync prepared (a kernel fetch) lost every command it had taken:
    accepted, nonces used, never applied, refused or reported, and the next sync had none."""
    rig = Rig(make_config(tmp_path, store), keyring)
    dk = DistributedKasmina(rig.manager)
    original, calls = rig.manager.loader.original, []

    def fetch_then_ctrl_c(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(rig.manager.loader, "original", fetch_then_ctrl_c)
    assert dk.submit(_signed(rig, "germinate", SEED0, mlp))
    assert dk.submit(_signed(rig, "germinate", SEED1, mlp))
    with pytest.raises(KeyboardInterrupt):
        dk.sync_epoch(0)
    assert dk.coordinator.pending == 2 and rig.manager.handler.stats["executed"] == 0
    assert dk.sync_epoch(0).outcomes == (True, True)
    assert rig.stage(SEED0) == rig.stage(SEED1) == S.ISOLATED_INIT


def test_close_refuses_the_commands_held_for_the_next_sync(tmp_path, store, keyring, mlp) -> None:
    """``manager.close()`` refused its own queue only: commands the coordinator held were
    never reported; ``DistributedKasmina.close()`` (single-process again) refuses them too."""
    for closing in ("manager", "coordinator"):
        rig = Rig(make_config(tmp_path / closing, store), keyring)
        dk = DistributedKasmina(rig.manager)
        assert rig.manager.handle_adaptation_command(_signed(rig, "germinate", SEED0, mlp))
        assert dk.coordinator.pending == 1
        (rig.manager if closing == "manager" else dk).close()
        stats = rig.manager.handler.stats
        assert dk.coordinator.pending == 0 and (stats["accepted"], stats["failed"]) == (1, 1)
        assert rig.manager.command_log[-1][2] is False
        assert len(rig.sink.events("command.complete")) == 1
        rig.manager.close()


@pytest.mark.parametrize("rolled_back", ["source", "repaired"])
def test_a_repaired_rank_takes_the_sources_timeline_of_checkpoints(
    tmp_path, store, keyring, rolled_back: str
) -> None:
    """A ROLLBACK that applied on one rank and failed on the other: the repair restored the
    state, but the repaired rank's checkpoint store kept its own timeline (a restore from a
    store holding only the source's snapshot), so its next ``end_epoch`` was refused there
    (or deleted checkpoints the other rank kept) and the ranks' stores split."""
    names = ("source", "repaired")
    rigs = {name: Rig(make_config(tmp_path / name, store), keyring) for name in names}
    for rig in rigs.values():
        for epoch in range(4):
            rig.train(1)
            rig.manager.end_epoch(epoch)
    rolled = rigs[rolled_back]
    assert _rollback(rolled, 1)
    source, repaired = rigs["source"].manager, rigs["repaired"].manager
    replica = ManagerReplica(repaired.state, repaired.guard, lock=repaired.intake.lock)
    sent = ManagerReplica(source.state, source.guard, lock=source.intake.lock).export_state()
    replica.import_state(sent)
    assert repaired.checkpoints.abandoned_after == source.checkpoints.abandoned_after
    assert repaired.epoch == source.epoch
    next_epoch = source.epoch + 1
    for rig in rigs.values():
        rig.train(1)
        rig.manager.end_epoch(next_epoch)  # allowed on both, as on the source
    assert repaired.checkpoints.epochs() == source.checkpoints.epochs()


def _weights(rig: Rig, epoch: int) -> dict[str, torch.Tensor]:
    return rig.manager.checkpoints.load(epoch)["modules"]["model"]


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_a_repaired_rank_takes_the_sources_checkpoints_where_its_own_may_differ(
    tmp_path, store, keyring, mode: str
) -> None:
    """A rank repaired at the sync of epoch 3 had written its checkpoint 3 from its own state
    before the sync found it apart, and kept those of epochs the source's rollback abandoned
    (2), and those it wrote while apart and not repaired (a failed repair): a later ROLLBACK to
    one of them restored there a state no other rank had (with two ranks the tie went to rank
    0, whichever rank held the right one). It now holds the source's checkpoint 3, and none of
    the others."""
    names = ("source", "repaired")
    config = {name: make_config(tmp_path / name, store, checkpoint_mode=mode) for name in names}
    rigs = {name: Rig(config[name], keyring) for name in names}
    for rig in rigs.values():
        for epoch in range(3):
            rig.train(1)
            rig.manager.end_epoch(epoch)
    assert _rollback(rigs["source"], 1)  # applied on the source alone
    repaired = rigs["repaired"]
    with torch.no_grad():
        repaired.model.inp.weight.add_(1.0)  # and apart in its own way
    for rig in rigs.values():
        rig.train(1)
        rig.manager.end_epoch(3)
    source_store = rigs["source"].manager.checkpoints
    assert source_store.epochs() == [0, 1, 3] and 2 in repaired.manager.checkpoints.epochs()
    m = repaired.manager
    replica = ManagerReplica(m.state, m.guard, lock=m.intake.lock)
    source = rigs["source"].manager
    sent = ManagerReplica(source.state, source.guard, lock=source.intake.lock).export_state()
    replica.import_state(sent)
    assert m.checkpoints.epochs() == source_store.epochs()
    mine, theirs = _weights(repaired, 3), _weights(rigs["source"], 3)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)

    # Apart at the sync of epoch 4 and not repaired there: its checkpoint 4 is its own, and
    # the repair at epoch 5 takes the source's 5 and drops its 4 (the source has one).
    with torch.no_grad():
        repaired.model.inp.weight.add_(1.0)
    for rig in rigs.values():
        rig.train(1)
        rig.manager.end_epoch(4)
    replica.note_sync(EpochSyncResult(4, 1, 2, (), (1, 2), (1,)))  # apart, not repaired
    for rig in rigs.values():
        rig.train(1)
        rig.manager.end_epoch(5)
    sent = ManagerReplica(source.state, source.guard, lock=source.intake.lock).export_state()
    replica.import_state(sent)
    assert 4 in source_store.epochs() and 4 not in m.checkpoints.epochs()
    assert 5 in m.checkpoints.epochs()
    mine, theirs = _weights(repaired, 5), _weights(rigs["source"], 5)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    replica.note_sync(EpochSyncResult(5, 1, 2, (), (1, 1), (1,), 0, (1,)))  # repaired
    assert replica.diverged_since is None


def test_a_repair_leaves_the_ranks_unfrozen_layers_as_the_loop_set_them(
    monkeypatch, tmp_path, store, keyring
) -> None:
    """Every rank's loop unfroze a layer and has not given it a group yet when the sync
    repairs one of them: the restore's commit froze it again on that rank alone (no group of
    the source's holds it), and the ranks trained apart from then on."""
    import tests.manager.helpers as helpers
    from tests.manager.test_host_param_groups import FrozenOut

    monkeypatch.setattr(helpers, "Host", FrozenOut)
    names = ("source", "repaired")
    rigs = {name: Rig(make_config(tmp_path / name, store), keyring) for name in names}
    for rig in rigs.values():
        rig.train(1)
        rig.manager.end_epoch(0)
        rig.model.out.host.weight.requires_grad_(True)
    source, m = rigs["source"].manager, rigs["repaired"].manager
    sent = ManagerReplica(source.state, source.guard, lock=source.intake.lock).export_state()
    ManagerReplica(m.state, m.guard, lock=m.intake.lock).import_state(sent)
    assert rigs["repaired"].model.out.host.weight.requires_grad


def test_a_source_that_cannot_read_its_checkpoint_still_repairs(tmp_path, store, keyring) -> None:
    """The source's checkpoint of the sync's epoch does not verify: it ships the snapshot
    without it (before, the export raised and no rank was repaired), and the repaired rank,
    whose own may differ, drops its own."""
    names = ("source", "repaired")
    config = {name: make_config(tmp_path / name, store) for name in names}
    rigs = {name: Rig(config[name], keyring) for name in names}
    for rig in rigs.values():
        for epoch in range(2):
            rig.train(1)
            rig.manager.end_epoch(epoch)
    source, m = rigs["source"].manager, rigs["repaired"].manager
    path = source.checkpoints.path_for(1)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    sent = ManagerReplica(source.state, source.guard, lock=source.intake.lock).export_state()
    ManagerReplica(m.state, m.guard, lock=m.intake.lock).import_state(sent)
    assert m.checkpoints.epochs() == [0]


def test_a_rank_apart_from_epoch_0_on_remembers_epoch_0() -> None:
    replica = ManagerReplica.__new__(ManagerReplica)
    replica.diverged_since = None
    for epoch in (0, 1):
        replica.note_sync(EpochSyncResult(epoch, 1, 2, (), (1, 2), (1,)))
    assert replica.diverged_since == 0


def test_the_replica_checksum_covers_an_unfrozen_layer(
    monkeypatch, tmp_path, store, keyring
) -> None:
    """A layer frozen at attach, unfrozen and given a group: its weights are the host's too,
    and a rank whose copy of them drifted is found apart."""
    import tests.manager.helpers as helpers
    from tests.manager.test_host_param_groups import FrozenOut

    monkeypatch.setattr(helpers, "Host", FrozenOut)
    rig = Rig(make_config(tmp_path, store), keyring)
    m, weight = rig.manager, rig.model.out.host.weight
    weight.requires_grad_(True)
    m.optimizers.optimizer("host").add_param_group({"params": [weight]})
    rig.train(1)
    replica = ManagerReplica(m.state, m.guard, lock=m.intake.lock)
    before = replica.checksum()
    with torch.no_grad():
        weight.add_(1.0)
    assert replica.checksum() != before


def _rollback(rig: Rig, epoch: int) -> bool:
    raw = rig.signed(make_rollback_command(epoch))
    assert rig.manager.handle_adaptation_command(raw)
    return all(o.ok for o in rig.manager.apply_pending(wait=True))


def test_a_kernel_that_cannot_be_fetched_is_refused_before_anything_changes(
    tmp_path, store, keyring
) -> None:
    rig = Rig(make_config(tmp_path, store), keyring)
    dk = DistributedKasmina(rig.manager)
    raw = _signed(rig, "germinate", SEED0, "mlp-0000000000000000")
    assert dk.submit(raw)
    result = dk.sync_epoch(0)
    assert result.outcomes == (False,)
    assert "could not prepare it" in result.commands[0].reason
    assert rig.stage(SEED0) == S.DORMANT
    assert rig.manager.handler.stats["failed"] == 1


def test_a_kernel_fetched_by_the_prepare_counts_one_miss_and_no_hit(
    tmp_path, store, keyring, mlp
) -> None:
    """The prepare fetched the kernel (a miss); the agreed GERMINATE then looked it up in the
    cache again and counted a hit too: the demo's report gave 5 hits for 2."""
    rig = Rig(make_config(tmp_path, store), keyring)
    dk = DistributedKasmina(rig.manager)
    cache = rig.manager.kernel_cache
    assert dk.submit(_signed(rig, "germinate", SEED0, mlp))
    assert dk.sync_epoch(0).outcomes == (True,)
    assert (cache.stats()["hits"], cache.stats()["misses"]) == (0, 1)
    assert dk.submit(_signed(rig, "germinate", SEED1, mlp))  # cached now: one hit
    assert dk.sync_epoch(1).outcomes == (True,)
    assert (cache.stats()["hits"], cache.stats()["misses"]) == (1, 1)
    dk.close()
    rig.manager.close()


def test_a_closed_manager_raises_at_the_sync_before_any_collective(
    tmp_path, store, keyring, mlp
) -> None:
    """It took part, refused every command the ranks received as one it "could not verify",
    and reported the ranks consistent; its next step() raised."""
    rig = Rig(make_config(tmp_path, store), keyring)
    dk = DistributedKasmina(rig.manager)
    assert dk.submit(_signed(rig, "germinate", SEED0, mlp))
    rig.manager.close()
    with pytest.raises(RuntimeError, match="this manager is closed"):
        dk.sync_epoch(0)
    assert dk.coordinator.stats["syncs"] == 0 and not dk.coordinator.history
    dk.close()


def test_a_sync_fetches_no_kernel_for_a_seed_the_model_does_not_have(
    tmp_path, store, keyring, mlp
) -> None:
    rig = Rig(make_config(tmp_path, store), keyring)
    dk = DistributedKasmina(rig.manager)
    assert dk.submit(_signed(rig, "germinate", "nowhere[0]", mlp))
    result = dk.sync_epoch(0)
    assert result.outcomes == (False,) and "unknown seed" in result.commands[0].reason
    assert len(rig.manager.kernel_cache) == 0 and rig.manager.loader.counters["loads"] == 0
    dk.close()
    rig.manager.close()
    # Ahead of a seed's GERMINATE of the same artifact it took that one's fetch, which then
    # loaded its kernel again (uncached in a cache with no room for it): one load now.
    config = make_config(tmp_path / "small", store, cache_size_mb=1 / 2**20)
    rig = Rig(config, keyring)
    dk = DistributedKasmina(rig.manager)
    assert dk.submit(_signed(rig, "germinate", "nowhere[0]", mlp))
    assert dk.submit(_signed(rig, "germinate", SEED0, mlp))
    assert dk.sync_epoch(0).outcomes == (False, True)
    assert rig.manager.loader.counters["loads"] == 1 and rig.stage(SEED0) == S.ISOLATED_INIT
    dk.close()
    rig.manager.close()


def test_a_fetch_of_a_sync_that_never_applied_is_no_later_commands(
    tmp_path, store, keyring, mlp
) -> None:
    """A prepare's fetch is handed to the GERMINATE of its own sync only: one that raised
    between its prepares and ``apply`` left it for a later sync's command, which then took a
    kernel it never fetched as its own miss."""
    from kasmina.control.commands import to_kasmina_command

    rig = Rig(make_config(tmp_path, store), keyring)
    applier = ManagerApplier(rig.manager.intake, rig.manager.report)
    cache = rig.manager.kernel_cache
    first = to_kasmina_command(make_seed_command("germinate", SEED0, mlp, timeout_s=60.0))
    assert applier.prepare(first) == ""  # fetched: one miss
    applier.begin_sync()  # that sync raised before apply; the next begins
    later = to_kasmina_command(make_seed_command("germinate", SEED1, mlp, timeout_s=60.0))
    assert applier.apply([later]) == [(True, "")]
    assert (cache.stats()["hits"], cache.stats()["misses"]) == (1, 1)  # cached by then: a hit
    rig.manager.close()


def test_a_kernel_a_prepare_found_cached_stays_cached_until_the_sync_applies(
    tmp_path, store, keyring, published
) -> None:
    """A GERMINATE whose kernel was cached passed its prepare unpinned; a later prepare of the
    same sync fetched another kernel, the cache evicted the first to make room, and the first
    GERMINATE fetched it from the store again at apply, bounded by its own timeout only (a
    slow store there held every other rank in the collective until the group timed out). A
    prepare pins what it found or fetched until the sync has applied."""
    from kasmina.control.commands import to_kasmina_command

    _, mlp, aff = published
    rig = Rig(make_config(tmp_path, store, cache_size_mb=100 / 2**20), keyring)
    loader = rig.manager.loader
    loader.original(mlp)  # cached and unpinned, as after a GERMINATE another rank refused
    sizes = {a: loader.cached(a).get_memory_size() for a in (mlp,)}
    fetched: list[str] = []
    fetch = loader._fetch

    def counted(artifact_id: str, *args: Any) -> Any:
        fetched.append(artifact_id)
        return fetch(artifact_id, *args)

    loader._fetch = counted
    commands = [
        to_kasmina_command(make_seed_command("germinate", seed, art, timeout_s=60.0))
        for seed, art in ((SEED0, mlp), (SEED1, aff))
    ]
    applier = ManagerApplier(rig.manager.intake, rig.manager.report, prepare_timeout_s=5.0)
    assert [applier.prepare(command) for command in commands] == ["", ""]
    assert fetched == [aff] and mlp in loader.cache
    assert applier.apply(commands) == [(True, ""), (True, "")]
    assert fetched == [aff]  # nothing fetched again at apply
    assert rig.stage(SEED0) == rig.stage(SEED1) == S.ISOLATED_INIT
    assert rig.manager.kernel_cache.stats()["pinned"] == 1  # SEED0's own: the sync's are gone
    both = sizes[mlp] + rig.manager.seed(SEED1).kernel.get_memory_size()
    assert sizes[mlp] <= 100 < both  # the cache holds one of them, not both
    rig.manager.close()


def test_the_prepares_of_one_sync_share_one_time_bound(tmp_path, store, keyring, mlp) -> None:
    """A fetch that outlasts the bound (its store ignores the deadline) is answered with a
    refusal at the bound; later prepares of the same sync get what is left of it (nothing),
    the next sync a whole one; the fetch itself goes on and fills the cache."""
    from kasmina.control.commands import to_kasmina_command

    rig = Rig(make_config(tmp_path, store), keyring)
    loader, release = rig.manager.loader, threading.Event()
    original = loader.original

    def stalled(artifact_id: str, *, deadline: float | None = None) -> Any:
        release.wait(20.0)
        return original(artifact_id, deadline=deadline)

    loader.original = stalled
    germinate = to_kasmina_command(make_seed_command("germinate", SEED0, mlp, timeout_s=30.0))
    applier = ManagerApplier(rig.manager.intake, rig.manager.report, prepare_timeout_s=0.3)

    def timed(command: Any) -> tuple[str, float]:
        started = time.monotonic()
        problem = applier.prepare(command)
        return problem, time.monotonic() - started

    try:
        first, first_s = timed(germinate)
        second, second_s = timed(germinate)
        applier.apply([])  # the sync is over: the next one gets its own bound
        third, third_s = timed(germinate)
        quick = to_kasmina_command(make_seed_command("germinate", SEED0, mlp, timeout_s=0.2))
        # No process group: the command's own timeout.
        unbounded = ManagerApplier(rig.manager.intake, rig.manager.report)
        by_command = unbounded.prepare(quick)
    finally:
        release.set()
    assert "prepare time was spent (0.3 s" in first and "process group" in first
    assert re.search(r"waited 0\.(2[5-9]|[3-9]\d) s", first)  # the time it waited, stated
    assert 0.25 <= first_s < 5.0 and second_s < 0.2 and 0.25 <= third_s < 5.0
    assert "waited 0.00 s" in second and "prepare time was spent" in second
    assert third.split("waited")[0] == first.split("waited")[0]
    assert by_command.startswith(f"fetching {mlp} did not finish within the command's 0.2 s")
    deadline = time.monotonic() + 30.0
    while mlp not in loader.cache and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mlp in loader.cache
    assert applier.prepare(germinate) == ""  # cached now
    with pytest.raises(ValueError, match="prepare_timeout_s must be > 0"):
        ManagerApplier(rig.manager.intake, rig.manager.report, prepare_timeout_s=0.0)


@pytest.mark.parametrize("path", ["rollback", "repair"])
def test_a_kernel_a_rollback_or_repair_fetches_in_a_sync_is_bounded_like_a_prepare(
    tmp_path, store, keyring, mlp, path: str
) -> None:
    """A ROLLBACK that puts a culled seed's kernel back (or a repair that does) fetched it with
    no deadline in the middle of the sync: one rank's slow store held every other rank in the
    outcome all-gather past the process group's timeout, and every rank raised. The fetch is
    bounded as a prepare is: on a store that keeps it, the rollback is refused on this rank,
    nothing changed, and the repair (and so ``on_divergence``) answers it."""
    from kasmina.control.commands import to_kasmina_command
    from kasmina.errors import UrzaUnavailableError

    rig = Rig(make_config(tmp_path, store), keyring)
    manager = rig.manager
    assert rig.send("germinate", SEED0, mlp)
    rig.train(1)
    manager.end_epoch(0)
    payload = ManagerReplica(manager.state, manager.guard, lock=manager.intake.lock).export_state()
    assert rig.send("cull", SEED0)
    rig.train(1)
    manager.end_epoch(1)
    manager.evict_kernel(mlp)
    loader, deadlines = manager.loader, []

    def slow_store(artifact_id: str, *, deadline: float | None = None) -> Any:
        deadlines.append(deadline)  # a store that keeps the deadline, and is slower than it
        time.sleep(min(20.0, max(0.0, deadline - time.monotonic())) if deadline else 20.0)
        raise UrzaUnavailableError(f"{artifact_id}: the store did not answer in time")

    loader.original = slow_store
    stage, started = rig.stage(SEED0), time.monotonic()
    if path == "rollback":
        applier = ManagerApplier(manager.intake, manager.report, prepare_timeout_s=0.3)
        command = to_kasmina_command(make_rollback_command(0))
        ((ok, reason),) = applier.apply([command])
        assert not ok and "did not answer in time" in reason
    else:
        lock = manager.intake.lock
        replica = ManagerReplica(manager.state, manager.guard, lock=lock, fetch_timeout_s=0.3)
        with pytest.raises(UrzaUnavailableError):
            replica.import_state(payload)
    assert time.monotonic() - started < 10.0 and deadlines and deadlines[0] is not None
    assert rig.stage(SEED0) == stage  # nothing changed
    rig.train(1)


def _stalled_loader(rig: Rig) -> tuple[threading.Event, list[str]]:
    """The manager's store made to stall every fetch until the event is set; the list records
    every fetch begun."""
    loader, release, calls = rig.manager.loader, threading.Event(), []
    original = loader.original

    def stalled(artifact_id: str, *, deadline: float | None = None) -> Any:
        calls.append(artifact_id)
        release.wait(20.0)
        return original(artifact_id, deadline=deadline)

    loader.original = stalled
    return release, calls


def test_prepares_of_a_stalled_artifact_share_one_fetch_on_a_bounded_pool(
    tmp_path, store, keyring, mlp
) -> None:
    """Many prepares of one artifact whose fetch stalls start one fetch, not a thread each:
    later ones wait on the same fetch, and the pool never holds more than ``fetch_workers``."""
    from kasmina.control.commands import to_kasmina_command

    rig = Rig(make_config(tmp_path, store), keyring)
    release, calls = _stalled_loader(rig)
    germinate = to_kasmina_command(make_seed_command("germinate", SEED0, mlp, timeout_s=30.0))
    applier = ManagerApplier(rig.manager.intake, rig.manager.report, prepare_timeout_s=0.2)
    before = threading.active_count()
    try:
        problems = [applier.prepare(germinate) for _ in range(50)]
        extra = threading.active_count() - before
    finally:
        release.set()
    assert 0 < extra <= rig.manager.config.fetch_workers
    assert calls == [mlp]  # one fetch for all 50
    assert all("did not finish" in p for p in problems)
    deadline = time.monotonic() + 30.0
    while applier._fetches and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not applier._fetches and mlp in rig.manager.loader.cache  # dropped once done


def test_no_fetch_starts_once_the_sync_prepare_time_is_spent(tmp_path, store, keyring, mlp) -> None:
    """After the sync's budget is spent, a GERMINATE of another uncached artifact is refused
    at once, without a fetch (no thread started for it)."""
    from kasmina.control.commands import to_kasmina_command

    rig = Rig(make_config(tmp_path, store), keyring)
    release, calls = _stalled_loader(rig)
    applier = ManagerApplier(rig.manager.intake, rig.manager.report, prepare_timeout_s=0.2)

    def germinate(artifact_id: str) -> Any:
        return to_kasmina_command(
            make_seed_command("germinate", SEED0, artifact_id, timeout_s=30.0)
        )

    try:
        first = applier.prepare(germinate(mlp))
        started = time.monotonic()
        other = applier.prepare(germinate("mlp-" + "1" * 64))
        other_s = time.monotonic() - started
    finally:
        release.set()
    assert "did not finish" in first
    assert calls == [mlp] and other_s < 0.1
    assert other.startswith("not fetching mlp-1") and "prepare time was spent (0.2" in other


def test_a_sync_after_one_that_raised_before_apply_gets_its_own_prepare_time(
    tmp_path, store, keyring, mlp, monkeypatch
) -> None:
    """A sync that raises between its prepares and ``apply`` (a collective timing out) must not
    leave its spent budget to the next sync: the coordinator begins every sync afresh."""
    rig = Rig(make_config(tmp_path, store), keyring)
    dk = DistributedKasmina(rig.manager)
    dk.applier.prepare_timeout_s = 1.0  # as a process group would set it
    release, calls = _stalled_loader(rig)
    gather = dk.coordinator._gather_codes

    def collective_times_out(codes: list[int]) -> Any:
        raise RuntimeError("collective timed out")

    monkeypatch.setattr(dk.coordinator, "_gather_codes", collective_times_out)
    try:
        assert dk.submit(_signed(rig, "germinate", SEED0, mlp))
        with pytest.raises(RuntimeError, match="collective timed out"):
            dk.sync_epoch(0)
        time.sleep(1.05)  # the aborted sync's budget is long spent
        monkeypatch.setattr(dk.coordinator, "_gather_codes", gather)
        assert dk.coordinator.pending == 1  # taken by the sync that raised, back for the next
        seen: list[list[str]] = []

        def answer() -> None:  # the store answers within the new budget
            seen.append(list(calls))
            release.set()

        threading.Timer(0.1, answer).start()  # well within the budget, even on a busy machine
        result = dk.sync_epoch(1)
    finally:
        release.set()
    assert result.outcomes == (True,), result.commands
    assert seen == [[mlp]]  # the aborted sync's fetch, still running, served this one
    assert rig.stage(SEED0) == S.ISOLATED_INIT
    dk.close()


def test_a_replica_snapshot_repairs_a_manager_in_one_process(tmp_path, store, keyring, mlp) -> None:
    """export -> corrupt -> import puts the seed, its optimizer and the table back."""
    rig = Rig(make_config(tmp_path, store), keyring)
    dk = DistributedKasmina(rig.manager)
    assert dk.submit(_signed(rig, "germinate", SEED0, mlp))
    dk.sync_epoch(0)
    rig.train(2)
    good, payload = dk.replica.checksum(), dk.replica.export_state()
    weight = rig.manager.seed(SEED0).seed_parameters()[0]
    with torch.no_grad():
        weight.add_(1.0)
    rig.manager.seed(SEED0).quarantine("test")
    assert dk.replica.checksum() != good
    dk.replica.import_state(payload)
    assert dk.replica.checksum() == good and rig.stage(SEED0) == S.ISOLATED_INIT
    rig.train(1)  # and it trains on


def test_a_repair_runs_under_the_managers_lock_and_never_on_a_closed_manager(
    tmp_path, store, keyring, mlp, monkeypatch
) -> None:
    """A repair restored weights, kernels and optimizers outside the manager's lock, so a
    ``close()`` (or a command) on another thread ran in the middle of it, and a repair after
    a ``close()`` restored into the closed manager."""
    import kasmina.manager.coordination as coordination

    rig = Rig(make_config(tmp_path, store), keyring)
    dk = DistributedKasmina(rig.manager)
    assert dk.submit(_signed(rig, "germinate", SEED0, mlp))
    dk.sync_epoch(0)
    rig.train(1)
    payload, restore, held = dk.replica.export_state(), coordination.restore_epoch, []

    def other_thread_can_take_the_lock() -> bool:
        took: list[bool] = []

        def attempt() -> None:
            took.append(rig.manager.intake.lock.acquire(blocking=False))
            if took[0]:
                rig.manager.intake.lock.release()

        thread = threading.Thread(target=attempt)
        thread.start()
        thread.join()
        return took[0]

    def watched(*args: Any, **kwargs: Any) -> Any:
        held.append(not other_thread_can_take_the_lock())
        return restore(*args, **kwargs)

    monkeypatch.setattr(coordination, "restore_epoch", watched)
    dk.replica.import_state(payload)
    assert held == [True]
    rig.train(1)
    before = dk.replica.checksum()
    rig.manager.close()
    with pytest.raises(RuntimeError, match="closed"):
        dk.replica.import_state(payload)
    assert held == [True]  # nothing restored
    assert dk.replica.checksum() == before


@pytest.mark.parametrize("where", ["seed weight", "host weight", "optimizer state"])
def test_a_replica_with_a_non_finite_tensor_is_not_healthy(
    tmp_path, store, keyring, mlp, where: str
) -> None:
    """What the checksum covers is what the health check reads: a rank holding a NaN there is
    never the one a sync repairs the others from (``minority_ranks``)."""
    rig = Rig(make_config(tmp_path, store), keyring)
    dk = DistributedKasmina(rig.manager)
    assert dk.submit(_signed(rig, "germinate", SEED0, mlp))
    dk.sync_epoch(0)
    rig.train(2)
    assert dk.replica.healthy()
    if where == "seed weight":
        tensor = rig.manager.seed(SEED0).seed_parameters()[0]
    elif where == "host weight":
        tensor = rig.manager.require_registry().host_params[0]
    else:
        tensor = next(iter(rig.manager.optimizers.optimizer(SEED0).state.values()))["exp_avg"]
    with torch.no_grad():
        tensor.view(-1)[0] = float("nan")
    assert not dk.replica.healthy()


def test_fsdp_sharded_hosts_are_refused(tmp_path, store, keyring) -> None:
    from torch.distributed.fsdp import FSDPModule

    rig = Rig(make_config(tmp_path, store), keyring)

    class Sharded(type(rig.model), FSDPModule):  # what fully_shard makes of a module's class
        pass

    rig.model.__class__ = Sharded
    with pytest.raises(UnsupportedParallelismError, match="FSDP"):
        wrap_ddp(rig.model)
    with pytest.raises(UnsupportedParallelismError, match="FSDP"):
        DistributedKasmina(rig.manager)
    with pytest.raises(UnsupportedParallelismError, match="DataParallel"):
        wrap_ddp(torch.nn.DataParallel(torch.nn.Linear(2, 2)))


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_a_command_overturned_by_the_repair_is_logged_as_it_ended(
    tmp_path: Path, published
) -> None:
    """Every rank reports one verdict for a command that failed on one rank only, and the
    rank whose outcome the repair overturned logs and counts it as it ended there."""
    spec = _spec(tmp_path, published, "gloo")
    spawn(_worker_verdict, 2, args=(spec,), backend="gloo", timeout_s=60, join_timeout_s=120)
    runs = _load(tmp_path, "verdict", 2)
    for run in runs:
        assert run["results"][0][1] == (False,)  # the same verdict on both ranks
        assert run["stages"][SEED0] == S.DORMANT
        assert run["last_logged"][2] is False
        assert run["handler"]["executed"] == 0 and run["handler"]["failed"] == 1
    assert runs[1]["coordinator"]["revised"] == 1


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_a_seed_that_falls_back_on_one_rank_steps_alike_on_every_rank(
    tmp_path: Path, published
) -> None:
    """The averaged seed gradients take one rank's NaN (its fallen-back seed's 0 * inf) as 0,
    and every rank steps on that same finite average: the replicas stay equal and finite. The
    fault is charged on every rank alike (the step agrees the seeds' flags): charged on the
    one rank only, it made that rank diverge, and the epoch sync repaired the fault away."""
    spec = _spec(tmp_path, published, "gloo")
    spawn(_worker_overflow, 2, args=(spec,), backend="gloo", timeout_s=60, join_timeout_s=120)
    runs = _load(tmp_path, "overflow", 2)
    _assert_equal_states(runs)
    assert all(torch.isfinite(t).all() for t in runs[0]["state"].values())
    assert [run["faults"] for run in runs] == [1, 1]


def _worker_unfrozen(rank: int, world: int, spec: dict[str, Any]) -> None:
    """Every rank unfreezes the slot's layer after ``wrap_ddp``: frozen at attach (so at the
    wrap too; then given a group), or trainable at attach and frozen only for the wrap."""
    import tests.manager.helpers as helpers
    import tests.manager.test_ddp as this
    from tests.manager.test_host_param_groups import FrozenOut

    if spec["frozen_at"] == "attach":
        helpers.Host = FrozenOut
    else:
        wrap = this.wrap_ddp

        def frozen_for_the_wrap(model: torch.nn.Module, **options: Any) -> torch.nn.Module:
            model.out.host.weight.requires_grad_(False)
            return wrap(model, **options)

        this.wrap_ddp = frozen_for_the_wrap
    t = Trainer(rank, world, spec)
    weight = t.rig.model.out.host.weight
    weight.requires_grad_(True)
    if spec["frozen_at"] == "attach":  # else the host's optimizer holds it since attach
        t.manager.optimizers.optimizer("host").add_param_group({"params": [weight]})
    before = weight.detach().clone()
    t.train(2)
    result = t.boundary()
    moved = not torch.equal(before, weight)
    t.save(spec["out"], "unfrozen", verdict=result.divergent_ranks, weight=weight, moved=moved)
    t.manager.close()


@pytest.mark.slow  # spawns processes: most of the time is their imports
@pytest.mark.parametrize("frozen_at", ["attach", "wrap"])
def test_a_layer_unfrozen_after_the_wrap_is_averaged_across_ranks(
    tmp_path: Path, published, frozen_at: str
):
    """DDP averages the parameters that required a gradient when it wrapped the model: a layer
    unfrozen after it was stepped by each rank on its own shard's gradient, and every epoch's
    sync found the ranks apart and overwrote one. The seeds' average takes it in, also one
    trainable at attach and frozen only when ``wrap_ddp`` wrapped the model (it took only
    those frozen at attach)."""
    spec = {**_spec(tmp_path, published, "gloo"), "frozen_at": frozen_at}
    spawn(_worker_unfrozen, 2, args=(spec,), backend="gloo", timeout_s=60, join_timeout_s=120)
    runs = _load(tmp_path, "unfrozen", 2)
    assert [run["moved"] for run in runs] == [True, True]
    assert torch.equal(runs[0]["weight"], runs[1]["weight"])
    assert [run["verdict"] for run in runs] == [(), ()]


def _worker_minority_faults(rank: int, world: int, spec: dict[str, Any]) -> None:
    """Rank 1's data makes the seed's output non-finite once an epoch, rank 0's never."""
    t = Trainer(rank, world, spec)
    t.epoch_with({0: [_signed(t.rig, "germinate", SEED0, spec["mlp"])]})
    for _ in range(3):
        kernel = t.manager.seed(SEED0).kernel
        handle = None
        if rank == 1 and kernel is not None:
            handle = kernel.register_forward_hook(lambda _m, _a, out: out * float("inf"))
        t.train(1, clip=1.0)
        if handle is not None:
            handle.remove()
        t.train(1, clip=1.0)
        t.boundary()
    seed = t.manager.seed(SEED0)
    t.save(spec["out"], "minority", faults=seed.faults, stage=int(seed.stage))
    t.manager.close()


def _two_gloo_ranks(
    worker: Callable[..., None], tmp_path: Path, published: Any, name: str
) -> list[dict[str, Any]]:
    """Run ``worker`` on two gloo ranks; what each saved under ``name``."""
    spec = _spec(tmp_path, published, "gloo")
    spawn(worker, 2, args=(spec,), backend="gloo", timeout_s=60, join_timeout_s=150)
    return _load(tmp_path, name, 2)


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_a_seed_that_faults_on_one_ranks_data_is_charged_and_quarantined_on_every_rank(
    tmp_path: Path, published
) -> None:
    """A seed whose output is non-finite on rank 1's data only, once an epoch: charged on
    rank 1 alone, the fault made rank 1 diverge, and each epoch sync repaired it away from
    rank 0, so the seed never reached its fault limit. Every rank charges it alike now, and
    the third fault quarantines it on both, with no divergence to repair."""
    runs = _two_gloo_ranks(_worker_minority_faults, tmp_path, published, "minority")
    assert [run["faults"] for run in runs] == [3, 3]
    assert [run["stage"] for run in runs] == [int(S.QUARANTINE)] * 2
    assert [run["coordinator"].get("divergences", 0) for run in runs] == [0, 0]
    _assert_equal_states(runs)


def _refuse(_module: Any, _args: Any) -> None:
    raise RuntimeError("input out of range")  # a kernel that raises on some data only


def _worker_minority_raises(rank: int, world: int, spec: dict[str, Any]) -> None:
    """The seed's kernel raises on rank 1's data only: in a training step, in a validation
    forward without grad at the epoch's end (outside any step), and in the next step."""
    t = Trainer(rank, world, spec)
    t.epoch_with({0: [_signed(t.rig, "germinate", SEED0, spec["mlp"])]})
    seed = t.manager.seed(SEED0)
    seen = []  # (faults, stage) after each part
    handle = seed.kernel.register_forward_pre_hook(_refuse) if rank == 1 else None
    t.train(1)
    seen.append((seed.faults, int(seed.stage)))
    with torch.no_grad():
        t.rig.model(torch.randn(8, 6, generator=t.gen))
    seen.append((seed.faults, int(seed.stage)))  # held for the next collective
    t.boundary()  # charged there, on every rank, before the checksum
    seen.append((seed.faults, int(seed.stage)))
    t.train(1)
    seen.append((seed.faults, int(seed.stage)))
    if handle is not None:
        handle.remove()
    t.train(1)
    t.boundary()
    t.save(spec["out"], "raises", seen=seen, log=list(seed.fault_log))
    t.manager.close()


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_a_kernel_that_raises_on_one_ranks_data_is_charged_and_quarantined_on_every_rank(
    tmp_path: Path, published
) -> None:
    """A fault found on the host (a kernel that raised) on rank 1's data only: charged there
    alone, it made rank 1 diverge, and the epoch sync repaired it away from rank 0 (or rank 1
    alone quarantined the seed, and the layouts differed). Every rank charges it at the step,
    or one found outside a step (a validation forward) at the epoch sync: the third fault
    quarantines the seed on both ranks at the same step, and no rank diverges."""
    runs = _two_gloo_ranks(_worker_minority_raises, tmp_path, published, "raises")
    isolated, quarantined = int(S.ISOLATED_INIT), int(S.QUARANTINE)
    seen = [(1, isolated), (1, isolated), (2, isolated), (3, quarantined)]
    assert [run["seen"] for run in runs] == [seen, seen]
    reason = "rank 1: raised RuntimeError: input out of range"
    assert [run["log"] for run in runs] == [[reason] * 3] * 2
    assert [run["coordinator"].get("divergences", 0) for run in runs] == [0, 0]
    _assert_equal_states(runs)


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_a_seed_gradient_not_finite_on_one_rank_is_charged_on_every_rank(
    tmp_path: Path, published
) -> None:
    """A seed whose gradient alone is NaN on rank 0 (its output finite): the average carries
    the NaN to every rank, so every rank's clipping skips the seed alike and, from the 8th
    such step, charges it a fault alike (the NaN was averaged as 0: the seed stepped on half
    a gradient and was never charged, while a GradScaler halved its scale each step). The
    host steps every time, and the replicas stay equal and finite."""
    spec = _spec(tmp_path, published, "gloo")
    spawn(_worker_bad_gradient, 2, args=(spec,), backend="gloo", timeout_s=60, join_timeout_s=120)
    runs = _load(tmp_path, "bad_gradient", 2)
    assert [run["faults"] for run in runs] == [2, 2]
    assert [run["stepped"] for run in runs] == [[True] * 9] * 2
    _assert_equal_states(runs)
    assert all(torch.isfinite(t).all() for t in runs[0]["state"].values())


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_fp16_seed_gradients_are_averaged_without_overflowing(tmp_path: Path) -> None:
    """Finite fp16 gradients of 40,000 and 42,048: their average is 41,024, but their sum
    overflows fp16, and summing before dividing gave inf on every rank (which then skipped
    and charged the seed). Divided first, as DDP does."""
    spawn(_worker_fp16_average, 2, args=(str(tmp_path),), backend="gloo", timeout_s=60)
    grads = [torch.load(tmp_path / f"fp16{rank}.pt") for rank in range(2)]
    assert torch.equal(grads[0], grads[1])
    assert grads[0].tolist() == [41024.0] * 4


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_a_rank_whose_host_has_another_dtype_is_refused_on_every_rank(tmp_path: Path) -> None:
    spawn(_worker_cast_rank, 2, args=(str(tmp_path),), backend="gloo", timeout_s=20)
    refusals = [Path(tmp_path, f"refused{rank}.txt").read_text() for rank in (0, 1)]
    assert "torch.float32" in refusals[0] and "torch.bfloat16" in refusals[1]


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_ranks_whose_hosts_differ_in_what_is_frozen_are_refused_on_every_rank(
    tmp_path: Path,
) -> None:
    """A host frozen whole on one rank only: that rank returned it unwrapped, the other entered
    DDP's constructor, and both hung in their next collectives until the group's timeout (30
    minutes by default). ``requires_grad`` is part of the layout the ranks compare first."""
    start = time.monotonic()
    spawn(_worker_frozen_rank, 2, args=(str(tmp_path),), backend="gloo", timeout_s=10,
          join_timeout_s=60)  # fmt: skip
    refusals = [Path(tmp_path, f"refused{rank}.txt").read_text() for rank in (0, 1)]
    assert "0 requiring a gradient" in refusals[0] and "4 requiring a gradient" in refusals[1]
    assert time.monotonic() - start < 50  # the imports; no collective timed out


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_ranks_with_registries_of_other_sizes_do_not_agree_flags(tmp_path: Path) -> None:
    """The flags' agreement runs only between registries of as many seeds (in the header):
    vectors of two lengths in one all-reduce fail or hang the collective. Each rank keeps its
    own flags; the layout differs too, and the epoch sync repairs."""
    spawn(_worker_uneven_registries, 2, args=(str(tmp_path),), backend="gloo", timeout_s=20)
    flags = [torch.load(tmp_path / f"uneven{rank}.pt") for rank in range(2)]
    assert flags == [{"s0": [False, True]}, {"s0": [True, False]}]


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_a_leak_found_on_one_rank_skips_the_host_step_on_every_rank(
    tmp_path: Path, published
) -> None:
    """DDP averaged the host's gradients in the backward, so a leak one rank's check found is
    in every rank's: that rank alone skipped the host's step, and the hosts split until the
    next sync. The verdict is agreed in the step's collective; every rank skips."""
    spec = _spec(tmp_path, published, "gloo")
    spawn(_worker_leak, 2, args=(spec,), backend="gloo", timeout_s=60, join_timeout_s=120)
    runs = _load(tmp_path, "leak", 2)
    assert [run["stepped"] for run in runs] == [[False, True], [False, True]]
    _assert_equal_states(runs)  # host weights included
    assert [run["grads"].get("peer_leaks", 0) for run in runs] == [0, 1]


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_a_batch_norm_seed_has_its_statistics_averaged_not_repaired(
    tmp_path: Path, published, store: Path
) -> None:
    """Running statistics differ across healthy ranks by design (each saw its own shard): the
    sync averages them before the checksum, so no rank is reported divergent or repaired."""
    spec = _spec(tmp_path, published, "gloo")
    torch.manual_seed(3)
    example = [torch.randn(3, 2)]
    spec["store"] = str(store)  # this test's copy of the store, with the kernel published into it
    spec["normalised"] = publish_artifact(
        Normalised(), example, str(store), "normalised", PUBLISHER
    ).artifact_id
    spawn(_worker_batch_norm, 2, args=(spec,), backend="gloo", timeout_s=60, join_timeout_s=120)

    runs = _load(tmp_path, "bn", 2)
    for run in runs:
        assert all(divergent == () for _, _, divergent, _, _ in run["results"])
        assert all(len(set(c)) == 1 for c in run["checksums"])
        assert not {"divergences", "repairs", "repairs_served"} & run["coordinator"].keys()
        assert run["buffers"] == {"averaged": 1, "buffers": 2}  # running mean and variance
    (before0, after0), (before1, after1) = ((r["before"], r["after"]) for r in runs)
    assert before0.keys() == after0.keys() == before1.keys() and len(before0) == 3
    for name, mine in before0.items():
        theirs = before1[name]
        if mine.is_floating_point():
            assert not torch.equal(mine, theirs), name  # each rank's own statistics
            expected = (mine + theirs) / 2
        else:  # num_batches_tracked: every rank ran as many forwards
            assert torch.equal(mine, theirs) and mine.item() == STEPS, name
            expected = mine
        assert torch.equal(after0[name], expected) and torch.equal(after1[name], expected), name
    _assert_equal_states(runs)  # seed and host parameters, the table: bit for bit


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


def _host_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The host's own parameters and buffers (none of Kasmina's)."""
    ours = set(kasmina_owned_names(model))
    named = (*model.named_parameters(), *model.named_buffers())
    return {n: t.detach().clone() for n, t in named if n not in ours}


def _worker_frozen_host(rank: int, world: int, spec: dict[str, Any]) -> None:
    """Seeds alone train (``host_lr=None``) on a host frozen whole before the wrap, as the
    demo's continual scenario freezes it, and initialised differently on each rank; its first
    layer is unfrozen later, the trainer's own optimizer stepping it. Rank 1's host batch norm
    holds a NaN at the second sync."""
    import tests.manager.helpers as helpers
    import tests.manager.test_ddp as this

    helpers.Host = NormedHost
    wrap = this.wrap_ddp
    wrapped: dict[str, dict[str, torch.Tensor]] = {}

    def frozen_for_the_wrap(model: torch.nn.Module, **options: Any) -> torch.nn.Module:
        for module in (model.inp, model.norm, model.out.host):
            module.requires_grad_(False)
        with torch.no_grad():  # each rank's own initialisation, which DDP would have replaced
            for tensor in (model.inp.weight, model.out.host.bias, model.norm.running_mean):
                tensor.add_(rank)
        wrapped["before"] = _host_state(model)
        net = wrap(model, **options)
        wrapped["after"] = _host_state(model)
        return net

    this.wrap_ddp = frozen_for_the_wrap
    t = Trainer(rank, world, {**spec, "attach": {"host_lr": None}})
    unwrapped = t.net is t.rig.model
    t.epoch_with({0: [_signed(t.rig, "germinate", SEED0, spec["mlp"])]})
    seed = [p.detach().clone() for p in t.manager.seed(SEED0).seed_parameters()]
    t.train()
    if rank == 1:  # left to a repair that no host buffer has, it stayed for the rest of the run
        with torch.no_grad():
            t.rig.model.norm.running_var[0] = float("nan")
    norm_before = _host_norm(t)
    t.boundary()
    norm_after = _host_norm(t)
    now = t.manager.seed(SEED0).seed_parameters()
    trained = [not torch.equal(a, p) for a, p in zip(seed, now, strict=True)]
    weight = t.rig.model.inp.weight
    t.rig.model.inp.requires_grad_(True)
    t.host_optimizer = torch.optim.SGD(t.rig.model.inp.parameters(), lr=0.5)
    before = weight.detach().clone()
    t.train()
    t.boundary()
    t.save(
        spec["out"],
        "frozen",
        unwrapped=unwrapped,
        wrapped=wrapped,
        trained=trained,
        norm_before=norm_before,
        norm_after=norm_after,
        weight=weight.detach().clone(),
        moved=not torch.equal(before, weight),
    )
    t.manager.close()


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_a_host_frozen_whole_is_left_unwrapped_with_rank_0s_parameters_and_batch_norm(
    tmp_path: Path, published
) -> None:
    """Seeds training on a frozen host (``attach(host_lr=None)``, a host layer frozen): DDP had
    no parameter to average, and its constructor raised ("DistributedDataParallel is not
    needed ...") on every rank. ``wrap_ddp`` returns the model, with rank 0's parameters and
    buffers on every rank, as DDP's constructor would have broadcast them (skipped, hosts
    initialised differently stayed apart); the seeds train alike on both ranks; the host's
    batch norm, which DDP would have broadcast from rank 0 at each forward, takes rank 0's
    values at the sync (averaged, a NaN on rank 1 was left to a repair no host buffer has, and
    stayed); a host layer unfrozen later is averaged with the seeds' gradients."""
    runs = _two_gloo_ranks(_worker_frozen_host, tmp_path, published, "frozen")
    assert [run["unwrapped"] for run in runs] == [True, True]
    (before0, after0), (before1, after1) = (
        (r["wrapped"]["before"], r["wrapped"]["after"]) for r in runs
    )
    assert before0.keys() == after0.keys() == after1.keys()
    assert {n for n in before0 if not torch.equal(before0[n], before1[n])} == {
        "inp.weight",
        "out.host.bias",
        "norm.running_mean",
    }  # each rank's own initialisation
    for name, mine in before0.items():
        assert torch.equal(after0[name], mine) and torch.equal(after1[name], mine), name
    assert all(any(run["trained"]) for run in runs)
    for run in runs:
        assert all(divergent == () for _, _, divergent, _, _ in run["results"])
    (before0, after0), (before1, after1) = ((r["norm_before"], r["norm_after"]) for r in runs)
    assert torch.isnan(before1["running_var"][0])
    for name, mine in before0.items():
        if name != "num_batches_tracked":
            assert not torch.equal(mine, before1[name]), name  # each rank's own shard
        assert torch.equal(after0[name], mine) and torch.equal(after1[name], mine), name
    assert [run["moved"] for run in runs] == [True, True]
    assert torch.equal(runs[0]["weight"], runs[1]["weight"])
    _assert_equal_states(runs)  # the seeds' and the host's parameters, the table


def _worker_detect_only(rank: int, world: int, spec: dict[str, Any]) -> None:
    """``repair=False``: rank 1's seed drifts once (a weight nudged), then both train on."""
    import functools

    import tests.manager.test_ddp as this

    this.DistributedKasmina = functools.partial(DistributedKasmina, repair=False)
    t = Trainer(rank, world, spec)
    t.epoch_with({0: [_signed(t.rig, "germinate", SEED0, spec["mlp"])]})
    if rank == 1:
        with torch.no_grad():
            t.manager.seed(SEED0).seed_parameters()[0].add_(1e-3)
    t.boundary()
    t.train(3)
    t.boundary()
    t.save(spec["out"], "detect")
    t.manager.close()


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_detect_only_quarantines_on_every_rank_so_the_ranks_keep_one_layout(
    tmp_path: Path, published
) -> None:
    """The default ``on_divergence`` quarantined the growing seeds of the diverged rank alone:
    with the repair off nothing realigned the ranks, every later step's seed layouts differed,
    and every seed gradient was dropped on every rank for the rest of the run."""
    spec = _spec(tmp_path, published, "gloo")
    spawn(_worker_detect_only, 2, args=(spec,), backend="gloo", timeout_s=60, join_timeout_s=120)
    runs = _load(tmp_path, "detect", 2)
    for run in runs:
        assert [r[2] for r in run["results"]] == [(), (1,), (1,)]  # detected, never repaired
        assert run["stages"][SEED0] == int(S.QUARANTINE)
        assert run["grads"].get("layout_mismatch", 0) == 0


def test_a_sync_that_fails_after_the_coordinator_closed_reports_its_commands(
    tmp_path, store, keyring
) -> None:
    """A sync that stops before its exchange puts its commands back for the next sync; closed
    meanwhile (a watchdog), the coordinator held them for a sync that never came, accepted
    and never reported. They are refused."""
    rig = Rig(make_config(tmp_path, store), keyring)
    manager = rig.manager
    dk = DistributedKasmina(manager)
    assert manager.handle_adaptation_command(_signed(rig, "cull", SEED0))

    def closed_then_failed(epoch: int, local: Any) -> Any:
        dk.close()
        raise RuntimeError("the collective failed")

    dk.coordinator._exchange = closed_then_failed  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="collective failed"):
        dk.coordinator.sync_epoch(0)
    assert dk.coordinator.pending == 0
    assert manager.command_log[-1][2:] == (False, "the multi-rank coordinator closed")
    manager.close()


def test_a_host_sharded_after_register_is_named_as_such_at_the_step(
    tmp_path, store, keyring
) -> None:
    """``fully_shard`` applied after ``attach`` (no ``wrap_ddp``, no ``DistributedKasmina``):
    the step refused, blaming a reparametrization (``weight_norm``) and never naming FSDP."""
    from torch.distributed.fsdp import fully_shard

    rig = Rig(make_config(tmp_path, store), keyring)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        fully_shard(rig.model.inp)
        rig.model(rig.x).sum().backward()
        with pytest.raises(UnsupportedParallelismError, match="inp is FSDP-sharded"):
            rig.manager.step()
    finally:
        dist.destroy_process_group()
