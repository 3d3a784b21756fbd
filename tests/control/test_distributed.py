"""Multi-process coordination: commands broadcast at epoch boundaries, divergence detected.

The two-rank tests spawn real gloo processes joined on loopback; each rank runs its own
``LeylineAdaptationHandler`` over its own state table and seed weights, trains on its own shard
with averaged gradients, and writes what it ended with to a file the test compares.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn

from kasmina.control.auth import CommandVerifier, sign_command
from kasmina.control.commands import KasminaCommand, make_seed_command
from kasmina.control.distributed import (
    DistributedCoordinator,
    EpochSyncResult,
    _minority_ranks,
    average_gradients,
    broadcast_tensors,
    spawn,
    state_checksum,
)
from kasmina.control.handler import LeylineAdaptationHandler
from kasmina.leyline import SeedOperation
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import NEXT_STAGE, TRAINING_STAGES, SeedStage
from kasmina.utils.keyring import Keyring

NUM_SEEDS = 3
GERMINATE = SeedOperation.SEED_OPERATION_GERMINATE
ADVANCE = SeedOperation.SEED_OPERATION_ADVANCE
CULL = SeedOperation.SEED_OPERATION_CULL


class TableExecutor:
    """Applies seed commands to a state table (the distributed layer is what is under test)."""

    def __init__(self, table: GPUStateTensor) -> None:
        self.table = table

    def execute(self, command: KasminaCommand) -> bool:
        action = command.seed
        if action is None:
            return False
        idx = int(action.seed_id.removeprefix("seed-"))
        stage = self.table.stage(idx)
        if action.operation == GERMINATE:
            target = SeedStage.ISOLATED_INIT
            self.table.set_blueprint(idx, action.artifact_id)
        elif action.operation == ADVANCE and stage in NEXT_STAGE:
            target = NEXT_STAGE[stage]
        elif action.operation == CULL:
            target = SeedStage.HARVESTING
        else:
            return False
        return self.table.batch_state_update([(idx, target)])[0] == 0


def _signed(keyring: Keyring, op: int, idx: int, artifact: str = "") -> bytes:
    cmd = make_seed_command(op, f"seed-{idx}", artifact)
    return sign_command(cmd, keyring, "k1").SerializeToString()


def _worker(rank: int, world: int, key_hex: str, out_dir: str) -> None:
    """One rank: 4 clean epochs with commands, then an injected divergence on rank 1."""
    keyring = Keyring({"k1": bytes.fromhex(key_hex)})
    forger = Keyring({"k1": bytes(32)})  # same key id, wrong key
    table = GPUStateTensor(NUM_SEEDS, "cpu")
    handler = LeylineAdaptationHandler(CommandVerifier(keyring), TableExecutor(table))
    torch.manual_seed(100 + rank)  # deliberately different inits: broadcast must fix them
    seeds = nn.ModuleList(nn.Linear(4, 4) for _ in range(NUM_SEEDS))
    broadcast_tensors(list(seeds.parameters()))
    init_weight = seeds[0].weight.detach().clone()
    opt = torch.optim.SGD(seeds.parameters(), lr=0.1)
    quarantined: list[int] = []

    def state() -> dict[str, torch.Tensor]:
        return {"table": table.state_tensor, **dict(seeds.state_dict())}

    def quarantine(result: EpochSyncResult) -> None:
        for i in range(NUM_SEEDS):
            if table.stage(i) in TRAINING_STAGES:
                table.update_seed_state(i, SeedStage.QUARANTINE)
                quarantined.append(i)

    coord = DistributedCoordinator(handler, state, on_divergence=quarantine)
    submit_error = ""
    if rank == 1:
        try:
            coord.submit(b"x")
        except RuntimeError as exc:
            submit_error = str(exc)

    plan = {
        0: [(GERMINATE, 0, "blueprint-a"), (GERMINATE, 1, "blueprint-b")],
        1: [(ADVANCE, 0, ""), (CULL, 1, "")],
        2: [(ADVANCE, 0, ""), (GERMINATE, 2, "blueprint-c")],
    }
    results = []
    gen = torch.Generator().manual_seed(7 + rank)  # each rank its own data shard
    for epoch in range(5):
        if rank == 0:
            for op, idx, artifact in plan.get(epoch, []):
                raw = _signed(keyring, op, idx, artifact)
                coord.submit(raw)
                if epoch == 1:
                    coord.submit(raw)  # a replay: refused on every rank
            if epoch == 2:
                forged = make_seed_command(CULL, "seed-0")
                coord.submit(sign_command(forged, forger, "k1").SerializeToString())
        if epoch == 4 and rank == 1:
            with torch.no_grad():
                seeds[0].weight[0, 0] += 1e-3  # silent divergence on one rank
        results.append(coord.sync_epoch(epoch))
        if epoch == 3:
            snapshot = {k: v.clone() for k, v in state().items()}
            snapshot["init.0.weight"] = init_weight
            torch.save(snapshot, Path(out_dir, f"clean{rank}.pt"))
        for _ in range(3):
            x = torch.randn(8, 4, generator=gen)
            active = [s for i, s in enumerate(seeds) if table.stage(i) in TRAINING_STAGES]
            opt.zero_grad(set_to_none=True)
            loss = sum((s(x) - x).pow(2).mean() for s in active) if active else None
            if loss is not None:
                loss.backward()
            average_gradients(list(seeds.parameters()))
            opt.step()
        table.tick()
    torch.save(
        {
            "results": [(r.epoch, r.outcomes, r.divergent_ranks, r.checksums) for r in results],
            "stats": dict(handler.stats),
            "quarantined": quarantined,
            "stages": [int(s) for s in table.stages()],
            "submit_error": submit_error,
        },
        Path(out_dir, f"run{rank}.pt"),
    )


def test_two_gloo_ranks_stay_identical_and_divergence_is_caught(tmp_path: Path) -> None:
    from kasmina.utils.keyring import generate_key

    start = time.monotonic()
    spawn(_worker, 2, args=(generate_key().hex(), str(tmp_path)), backend="gloo", timeout_s=60)
    assert time.monotonic() - start < 60

    clean = [torch.load(tmp_path / f"clean{r}.pt") for r in range(2)]
    assert clean[0].keys() == clean[1].keys()
    for name in clean[0]:
        assert torch.equal(clean[0][name], clean[1][name]), name
    table = clean[0]["table"]
    assert table[:, 0].tolist() == [SeedStage.GRAFTING, SeedStage.HARVESTING, 1]
    # Seed 0 trained on different shards per rank, yet moved identically from the shared init.
    assert not torch.equal(clean[0]["0.weight"], clean[0]["init.0.weight"])

    runs = [torch.load(tmp_path / f"run{r}.pt") for r in range(2)]
    assert runs[1]["submit_error"].startswith("commands are accepted on rank 0 only")
    for run in runs:
        outcomes = {epoch: out for epoch, out, _, _ in run["results"]}
        assert outcomes[0] == (True, True)
        assert outcomes[1] == (True, False, True, False)  # each replay refused
        assert outcomes[2] == (True, True, False)  # the forged cull refused
        assert run["stats"]["rejected:replay"] == 2
        assert run["stats"]["rejected:bad_signature"] == 1
        divergent = {epoch: d for epoch, _, d, _ in run["results"]}
        assert divergent == {0: (), 1: (), 2: (), 3: (), 4: (1,)}
    assert runs[0]["quarantined"] == []
    assert sorted(runs[1]["quarantined"]) == [0, 2]
    assert runs[1]["stages"][0] == SeedStage.QUARANTINE
    assert runs[0]["stages"][0] == SeedStage.GRAFTING


# ----------------------------------------------------------------- single process, no group


def _local(handler_stats: dict | None = None) -> tuple[DistributedCoordinator, GPUStateTensor]:
    keyring = Keyring({"k1": bytes(range(32))})
    table = GPUStateTensor(NUM_SEEDS, "cpu")
    handler = LeylineAdaptationHandler(CommandVerifier(keyring), TableExecutor(table))
    coord = DistributedCoordinator(handler, lambda: {"table": table.state_tensor})
    return coord, table


def test_single_process_applies_commands_only_at_the_boundary() -> None:
    coord, table = _local()
    keyring = Keyring({"k1": bytes(range(32))})
    assert coord.world_size == 1 and coord.rank == 0
    assert coord.submit(_signed(keyring, GERMINATE, 0, "bp"))
    assert table.stage(0) == SeedStage.DORMANT  # queued, not applied
    result = coord.sync_epoch(0)
    assert result.outcomes == (True,) and result.consistent
    assert table.stage(0) == SeedStage.ISOLATED_INIT
    assert coord.pending == 0
    assert coord.sync_epoch(1).outcomes == ()


def test_submit_bounds_and_types() -> None:
    coord, _ = _local()
    coord.max_command_bytes = 10
    assert not coord.submit(b"x" * 11)
    coord.max_pending = 1
    assert coord.submit(b"x")
    assert not coord.submit(b"y")
    assert coord.stats["dropped:too_large"] == 1 and coord.stats["dropped:queue_full"] == 1
    with pytest.raises(TypeError):
        coord.submit("not bytes")  # type: ignore[arg-type]
    assert coord.sync_epoch(0).outcomes == (False,)  # garbage bytes are refused by the handler


def test_checksum_is_bitwise_and_order_free() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "t": torch.zeros(2, 3, dtype=torch.int32)}
    b = {"t": a["t"].clone(), "w": a["w"].clone()}
    assert state_checksum(a) == state_checksum(b)
    b["w"][1] = torch.nextafter(b["w"][1], torch.tensor(3.0))  # one ulp
    assert state_checksum(a) != state_checksum(b)
    assert state_checksum({"x": torch.zeros(2)}) != state_checksum({"y": torch.zeros(2)})
    assert state_checksum({"x": torch.zeros(2)}) != state_checksum({"x": torch.zeros(1, 2)})
    assert state_checksum({"x": torch.ones(2, dtype=torch.bfloat16)}) != state_checksum(
        {"x": torch.ones(2)}
    )


def test_majority_and_tie_breaking() -> None:
    assert _minority_ranks([(1,), (1,), (2,)]) == (2,)
    assert _minority_ranks([(2,), (1,), (1,)]) == (0,)
    assert _minority_ranks([(1,), (2,)]) == (1,)  # a tie goes to rank 0
    assert _minority_ranks([(1,), (1,)]) == ()


def test_on_divergence_is_not_called_when_consistent() -> None:
    calls: list[EpochSyncResult] = []
    coord, _ = _local()
    coord.on_divergence = calls.append
    assert coord.sync_epoch(0).consistent
    assert calls == [] and coord.stats["divergences"] == 0


def test_helpers_are_no_ops_without_a_process_group() -> None:
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    average_gradients([p])
    broadcast_tensors([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0)) and torch.equal(p.data, torch.ones(3))
