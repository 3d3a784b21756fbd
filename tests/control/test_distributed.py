"""Multi-process coordination: verified on arrival, applied on every rank or none, repaired.

The two-rank test spawns real gloo processes joined on loopback; each rank runs its own
``LeylineAdaptationHandler`` over its own state table and seed weights (a stand-in executor: the
distributed layer is what is under test; ``tests/manager/test_ddp_*.py`` run the kernel manager),
trains on its own shard with averaged gradients, and writes what it ended with to a file the
test compares. The single-process tests drive the coordinator with an injected clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kasmina.control.auth import CommandVerifier, sign_command
from kasmina.control.builders import make_seed_command
from kasmina.control.commands import KasminaCommand
from kasmina.control.distributed import HISTORY_SIZE, DistributedCoordinator
from kasmina.control.handler import LeylineAdaptationHandler
from kasmina.control.processes import (
    average_gradients,
    broadcast_tensors,
    collective_timeout_s,
    spawn,
)
from kasmina.control.relay import EpochSyncResult, command_keys
from kasmina.control.replica import (
    BufferAverage,
    TensorReplica,
    minority_ranks,
    nested_checksum,
    nested_finite,
    state_checksum,
)
from kasmina.leyline import AdaptationCommand, SeedOperation
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import NEXT_STAGE, TRAINING_STAGES, SeedStage
from kasmina.utils.keyring import Keyring

NUM_SEEDS = 3
GERMINATE = SeedOperation.SEED_OPERATION_GERMINATE
ADVANCE = SeedOperation.SEED_OPERATION_ADVANCE
CULL = SeedOperation.SEED_OPERATION_CULL
KEY = bytes(range(32))


class TableExecutor:
    """Applies seed commands to a state table (the distributed layer is what is under test)."""

    def __init__(self, table: GPUStateTensor) -> None:
        self.table = table
        self.executed: list[str] = []

    def execute(self, command: KasminaCommand) -> bool:
        self.executed.append(command.command_id)
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


def _signed(keyring: Keyring, op: int, idx: int, artifact: str = "", **kw: float) -> bytes:
    cmd = make_seed_command(op, f"seed-{idx}", artifact)
    return sign_command(cmd, keyring, "k1", **kw).SerializeToString()


def _worker(rank: int, world: int, key_hex: str, out_dir: str) -> None:
    """One rank: commands received on both ranks, a divergence repaired, then one quarantined."""
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

    replica = TensorReplica(state, after_import=table.resync)
    coord = DistributedCoordinator(handler, replica, on_divergence=quarantine)
    # (epoch, receiving rank) -> commands; rank 1 receives some: any rank may.
    plan = {
        (0, 0): [(GERMINATE, 0, "blueprint-a")],
        (0, 1): [(GERMINATE, 1, "blueprint-b")],
        (1, 1): [(ADVANCE, 0, ""), (CULL, 1, "")],
        (2, 0): [(ADVANCE, 0, ""), (GERMINATE, 2, "blueprint-c")],
    }
    arrivals = []
    results = []
    gen = torch.Generator().manual_seed(7 + rank)  # each rank its own data shard
    for epoch in range(6):
        for op, idx, artifact in plan.get((epoch, rank), []):
            raw = _signed(keyring, op, idx, artifact)
            arrivals.append(coord.submit(raw))
            if epoch == 1:
                arrivals.append(coord.submit(raw))  # a replay: refused on arrival
        if epoch == 2 and rank == 1:
            forged = sign_command(make_seed_command(CULL, "seed-0"), forger, "k1")
            arrivals.append(coord.submit(forged.SerializeToString()))
        if epoch in (4, 5) and rank == 1:
            with torch.no_grad():
                seeds[0].weight[0, 0] += 1e-3  # silent divergence on one rank
        coord.repair = epoch != 5  # the last one only detected: quarantined
        results.append(coord.sync_epoch(epoch))
        if epoch == 3:
            snapshot = {k: v.clone() for k, v in state().items()}
            snapshot["init.0.weight"] = init_weight
            torch.save(snapshot, Path(out_dir, f"clean{rank}.pt"))
        if epoch == 4:
            torch.save({k: v.clone() for k, v in state().items()}, Path(out_dir, f"fix{rank}.pt"))
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
            "results": [
                (r.epoch, r.outcomes, r.divergent_ranks, r.source_rank, r.repaired_ranks)
                for r in results
            ],
            "origins": [[c.origin for c in r.commands] for r in results],
            "arrivals": arrivals,
            "stats": dict(handler.stats),
            "coordinator": dict(coord.stats),
            "quarantined": quarantined,
            "stages": [int(s) for s in table.stages()],
        },
        Path(out_dir, f"run{rank}.pt"),
    )


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_two_gloo_ranks_stay_identical_and_a_divergent_rank_is_repaired(tmp_path: Path) -> None:
    from kasmina.utils.keyring import generate_key

    key = generate_key().hex()
    spawn(_worker, 2, args=(key, str(tmp_path)), backend="gloo", timeout_s=60, join_timeout_s=120)

    clean = [torch.load(tmp_path / f"clean{r}.pt") for r in range(2)]
    assert clean[0].keys() == clean[1].keys()
    for name in clean[0]:
        assert torch.equal(clean[0][name], clean[1][name]), name
    table = clean[0]["table"]
    assert table[:, 0].tolist() == [SeedStage.GRAFTING, SeedStage.HARVESTING, 1]
    # Seed 0 trained on different shards per rank, yet moved identically from the shared init.
    assert not torch.equal(clean[0]["0.weight"], clean[0]["init.0.weight"])
    fixed = [torch.load(tmp_path / f"fix{r}.pt") for r in range(2)]
    for name in fixed[0]:
        assert torch.equal(fixed[0][name], fixed[1][name]), name

    runs = [torch.load(tmp_path / f"run{r}.pt") for r in range(2)]
    assert runs[0]["arrivals"] == [True, True, True]  # epochs 0 and 2
    assert runs[1]["arrivals"] == [True, True, False, True, False, False]  # replays, forgery
    for run in runs:
        outcomes = {epoch: out for epoch, out, *_ in run["results"]}
        assert outcomes[0] == (True, True) and outcomes[1] == (True, True)
        assert outcomes[2] == (True, True)
        assert run["origins"][:3] == [[0, 1], [1, 1], [0, 0]]
        assert run["stats"]["rejected"] == (3 if run is runs[1] else 0)  # only where received
        verdicts = {epoch: v for epoch, _, *v in run["results"]}
        assert verdicts[3] == [(), -1, ()]
        assert verdicts[4] == [(1,), 0, (1,)]  # repaired from rank 0
        assert verdicts[5] == [(1,), -1, ()]  # repair off: detected, quarantined
    assert runs[1]["coordinator"]["repairs"] == 1 and runs[0]["coordinator"]["repairs_served"] == 1
    assert runs[0]["quarantined"] == []
    assert sorted(runs[1]["quarantined"]) == [0, 2]
    assert runs[1]["stages"][0] == SeedStage.QUARANTINE
    assert runs[0]["stages"][0] == SeedStage.GRAFTING


def _wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _reencoded(raw: bytes) -> bytes:
    """Another encoding of the same signed message: its ``command_id`` field repeated (the last
    one wins when parsing), so the copy verifies as the original does."""
    command_id = AdaptationCommand.FromString(raw).command_id.encode()
    copy = raw + bytes([0x0A, len(command_id)]) + command_id
    assert copy != raw and AdaptationCommand.FromString(copy) == AdaptationCommand.FromString(raw)
    return copy


def _straddle_worker(
    rank: int, world: int, key_hex: str, out_dir: str, raw: bytes, late_raw: bytes
) -> None:
    """One command received by rank 0 (``raw``) before the sync and by rank 1 (``late_raw``:
    the same bytes, or another encoding of them) while it already waits in it."""
    keyring = Keyring({"k1": bytes.fromhex(key_hex)})
    table = GPUStateTensor(NUM_SEEDS, "cpu")
    executor = TableExecutor(table)
    handler = LeylineAdaptationHandler(CommandVerifier(keyring), executor)
    coord = DistributedCoordinator(handler, lambda: {"table": table.state_tensor})
    done = Path(out_dir, "late.done")
    arrivals: list[bool] = []
    late = None
    if rank == 0:
        arrivals.append(coord.submit(raw))
        assert _wait_for(done.exists)  # rank 1 is inside sync_epoch(0) and has its copy
    else:
        arrivals.append(coord.submit(_signed(keyring, GERMINATE, 1, "blueprint-b")))

        def arrive_during_the_sync() -> None:
            if _wait_for(lambda: coord.pending == 0):  # sync_epoch(0) took the queue
                arrivals.append(coord.submit(late_raw))
            done.touch()

        late = threading.Thread(target=arrive_during_the_sync, daemon=True)
        late.start()
    first = coord.sync_epoch(0)
    if late is not None:
        late.join(timeout=30)
    pending_after = coord.pending
    second = coord.sync_epoch(1)
    torch.save(
        {
            "arrivals": arrivals,
            "first": [(c.command_id, c.origin, c.ok, c.reason) for c in first.commands],
            "second": [(c.command_id, c.origin, c.ok, c.reason) for c in second.commands],
            "pending_after": pending_after,
            "executed": list(executor.executed),
            "stages": [int(s) for s in table.stages()],
            "stats": dict(handler.stats),
        },
        Path(out_dir, f"straddle{rank}.pt"),
    )


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize("encoding", ["same bytes", "re-encoded", "a retry"])
def test_a_copy_that_arrives_during_the_sync_is_the_duplicate_and_runs_once(
    tmp_path: Path, encoding: str
) -> None:
    """A retry (signed anew under the command's id) that reached rank 1 while it waited in the
    sync was matched by identity only: the relayed original was then a duplicate id there,
    refused on every rank, and the retry, relayed at the next sync, one on rank 0."""
    from kasmina.utils.keyring import generate_key

    key = generate_key().hex()
    keyring = Keyring({"k1": bytes.fromhex(key)})
    command = make_seed_command(GERMINATE, "seed-0", "blueprint-a")
    raw = sign_command(command, keyring, "k1").SerializeToString()
    straddler = command.command_id
    late = {
        "same bytes": raw,
        "re-encoded": _reencoded(raw),
        "a retry": sign_command(command, keyring, "k1").SerializeToString(),
    }[encoding]
    assert encoding != "a retry" or command_keys(late)[0] != command_keys(raw)[0]
    args = (key, str(tmp_path), raw, late)
    spawn(_straddle_worker, 2, args=args, backend="gloo", timeout_s=60, join_timeout_s=120)

    runs = [torch.load(tmp_path / f"straddle{r}.pt") for r in range(2)]
    assert runs[0]["arrivals"] == [True] and runs[1]["arrivals"] == [True, True]
    for run in runs:
        assert [(i, origin, ok) for i, origin, ok, _ in run["first"]][0] == (straddler, 0, True)
        assert [ok for *_, ok, _ in run["first"]] == [True, True]  # rank 1's own one too
        assert run["second"] == []  # rank 1's copy was taken off its queue, not relayed again
        assert run["pending_after"] == 0
        assert run["executed"].count(straddler) == 1  # applied exactly once on every rank
        assert run["stages"][:2] == [SeedStage.ISOLATED_INIT, SeedStage.ISOLATED_INIT]
        assert run["stats"]["failed"] == 0
    assert runs[0]["stats"]["executed"] == runs[1]["stats"]["executed"] == 2
    assert runs[1]["stats"]["accepted"] == 2  # its own copy, verified once on arrival


def _slow_arrival_worker(rank: int, world: int, key_hex: str, out_dir: str, raw: bytes) -> None:
    """Rank 0 received ``raw`` before the sync; rank 1 receives it on a controller thread as
    the sync starts, and that thread is descheduled between the check (its nonce used) and
    the queue (a 0.5 s pause stands for it)."""
    keyring = Keyring({"k1": bytes.fromhex(key_hex)})
    table = GPUStateTensor(NUM_SEEDS, "cpu")
    executor = TableExecutor(table)
    handler = LeylineAdaptationHandler(CommandVerifier(keyring), executor)
    coord = DistributedCoordinator(handler, lambda: {"table": table.state_tensor})
    arrivals: list[bool] = []
    thread = None
    if rank == 0:
        arrivals.append(coord.submit(raw))
        torch.distributed.barrier()
    else:
        accept = handler.accept

        def descheduled(message: bytes) -> KasminaCommand | None:
            command = accept(message)
            time.sleep(0.5)
            return command

        handler.accept = descheduled  # type: ignore[method-assign]
        thread = threading.Thread(target=lambda: arrivals.append(coord.submit(raw)))
        torch.distributed.barrier()
        thread.start()
        time.sleep(0.1)  # inside the check when the sync begins
    first = coord.sync_epoch(0)
    if thread is not None:
        thread.join(timeout=30)
    second = coord.sync_epoch(1)
    torch.save(
        {
            "arrivals": arrivals,
            "first": [(c.command_id, c.origin, c.ok, c.reason) for c in first.commands],
            "second": [(c.command_id, c.origin, c.ok, c.reason) for c in second.commands],
            "executed": list(executor.executed),
        },
        Path(out_dir, f"slow{rank}.pt"),
    )


@pytest.mark.slow  # spawns processes
def test_a_copy_still_in_its_check_when_the_sync_relays_the_command_is_waited_for(
    tmp_path: Path,
) -> None:
    """The sync looked for rank 1's own copy before that copy was queued: the relayed one was
    then a replay there, refused on every rank, and rank 1's copy, relayed at the next sync,
    a replay on rank 0: a command both ranks accepted ran nowhere."""
    from kasmina.utils.keyring import generate_key

    key = generate_key().hex()
    raw = _signed(Keyring({"k1": bytes.fromhex(key)}), GERMINATE, 0, "blueprint-a")
    command_id = AdaptationCommand.FromString(raw).command_id
    spawn(_slow_arrival_worker, 2, args=(key, str(tmp_path), raw), backend="gloo", timeout_s=60)
    for rank in range(2):
        run = torch.load(tmp_path / f"slow{rank}.pt")
        assert run["arrivals"] == [True]
        assert run["first"] == [(command_id, 0, True, "")] and run["second"] == []
        assert run["executed"] == [command_id]


def _interrupted_worker(rank: int, world: int, key_hex: str, out_dir: str, raw: bytes) -> None:
    """Rank 0 holds ``raw``; both ranks are interrupted in the sync after the exchange (rank 1
    has verified the relayed copy, its nonce used), as torchrun passes a Ctrl-C to every rank."""
    keyring = Keyring({"k1": bytes.fromhex(key_hex)})
    table = GPUStateTensor(NUM_SEEDS, "cpu")
    executor = TableExecutor(table)
    handler = LeylineAdaptationHandler(CommandVerifier(keyring), executor)
    coord = DistributedCoordinator(handler, lambda: {"table": table.state_tensor})
    if rank == 0:
        assert coord.submit(raw)
    gather = coord._gather_codes

    def ctrl_c(codes: list[int]) -> Any:
        raise KeyboardInterrupt

    coord._gather_codes = ctrl_c  # type: ignore[method-assign]
    interrupted = False
    try:
        coord.sync_epoch(0)
    except KeyboardInterrupt:
        interrupted = True
    coord._gather_codes = gather  # type: ignore[method-assign]
    after = coord.sync_epoch(1)
    torch.save(
        {
            "interrupted": interrupted,
            "pending": coord.pending,
            "after": [(c.command_id, c.ok) for c in after.commands],
            "stats": dict(handler.stats),
            "executed": list(executor.executed),
        },
        Path(out_dir, f"interrupted{rank}.pt"),
    )


@pytest.mark.slow  # spawns processes
def test_a_sync_interrupted_after_the_exchange_reports_its_commands_refused(
    tmp_path: Path,
) -> None:
    """Put back for the next sync, the command was relayed again to a rank that had used its
    nonce in the interrupted sync: a replay there, refused on every rank with a misleading
    reason. Once exchanged, an interrupted sync's commands are reported refused on every rank
    that verified them (accepted = failed), and nothing is relayed again."""
    from kasmina.utils.keyring import generate_key

    key = generate_key().hex()
    raw = _signed(Keyring({"k1": bytes.fromhex(key)}), GERMINATE, 0, "blueprint-a")
    spawn(_interrupted_worker, 2, args=(key, str(tmp_path), raw), backend="gloo", timeout_s=60)
    for rank in range(2):
        run = torch.load(tmp_path / f"interrupted{rank}.pt")
        assert run["interrupted"] and run["pending"] == 0 and run["after"] == []
        assert run["executed"] == [] and run["stats"].get("rejected:replay", 0) == 0
        assert run["stats"]["accepted"] == run["stats"]["failed"] == 1


def _two_encodings_worker(rank: int, world: int, key_hex: str, out_dir: str, raws: list) -> None:
    keyring = Keyring({"k1": bytes.fromhex(key_hex)})
    table = GPUStateTensor(NUM_SEEDS, "cpu")
    executor = TableExecutor(table)
    handler = LeylineAdaptationHandler(CommandVerifier(keyring), executor)
    coord = DistributedCoordinator(handler, lambda: {"table": table.state_tensor})
    arrived = coord.submit(raws[rank])
    result = coord.sync_epoch(0)
    torch.save(
        {
            "arrived": arrived,
            "results": [(c.command_id, c.origin, c.ok, c.reason) for c in result.commands],
            "executed": list(executor.executed),
            "stage": int(table.stage(0)),
        },
        Path(out_dir, f"encodings{rank}.pt"),
    )


@pytest.mark.slow  # spawns processes
def test_one_command_in_two_encodings_on_two_ranks_runs_once(tmp_path: Path) -> None:
    """The controller's bytes reach rank 0; another encoding of the same signed message (which
    verifies too) reaches rank 1 first. Keyed on the bytes, each rank's copy was the other's
    replay, and the command was refused on every rank: a re-encoded copy cancelled it."""
    from kasmina.utils.keyring import generate_key

    key = generate_key().hex()
    raw = _signed(Keyring({"k1": bytes.fromhex(key)}), GERMINATE, 0, "blueprint-a")
    command_id = AdaptationCommand.FromString(raw).command_id
    args = (key, str(tmp_path), [raw, _reencoded(raw)])
    spawn(_two_encodings_worker, 2, args=args, backend="gloo", timeout_s=60, join_timeout_s=120)
    for rank in range(2):
        run = torch.load(tmp_path / f"encodings{rank}.pt")
        assert run["arrived"] and run["executed"] == [command_id]
        assert run["stage"] == SeedStage.ISOLATED_INIT
        (first, second) = run["results"]  # rank 0's copy stands; rank 1's is its duplicate
        assert first == (command_id, 0, True, "")
        assert second[:3] == (command_id, 1, False) and "duplicate" in second[3]


@pytest.mark.slow  # spawns processes
def test_a_retry_received_by_another_rank_is_the_same_command_and_runs_once(tmp_path) -> None:
    """The controller's command reaches rank 0; its retry, signed anew under the same command
    id (the controller saw no outcome), reaches rank 1. Each rank refused the other's copy as a
    duplicate command id, and the command ran on no rank."""
    from kasmina.utils.keyring import generate_key

    key = generate_key().hex()
    keyring = Keyring({"k1": bytes.fromhex(key)})
    command = make_seed_command(GERMINATE, "seed-0", "blueprint-a")
    raw = sign_command(command, keyring, "k1").SerializeToString()
    retry = sign_command(command, keyring, "k1").SerializeToString()  # a new nonce, same id
    args = (key, str(tmp_path), [raw, retry])
    spawn(_two_encodings_worker, 2, args=args, backend="gloo", timeout_s=60, join_timeout_s=120)
    for rank in range(2):
        run = torch.load(tmp_path / f"encodings{rank}.pt")
        assert run["arrived"] and run["executed"] == [command.command_id]
        assert run["stage"] == SeedStage.ISOLATED_INIT
        (first, second) = run["results"]  # rank 0's copy stands; rank 1's is its duplicate
        assert first == (command.command_id, 0, True, "")
        assert second[:3] == (command.command_id, 1, False) and "duplicate" in second[3]


@pytest.mark.slow  # spawns processes
def test_two_commands_that_share_an_id_on_two_ranks_run_on_neither(tmp_path) -> None:
    """Not a retry: two different commands under one id (a controller's bug), one per rank.
    Taken as the same command, each rank ran its own, and the ranks diverged."""
    from kasmina.utils.keyring import generate_key

    key = generate_key().hex()
    keyring = Keyring({"k1": bytes.fromhex(key)})
    raws = [
        sign_command(
            make_seed_command(GERMINATE, f"seed-{k}", "a", command_id="cmd-7"), keyring, "k1"
        ).SerializeToString()
        for k in range(2)
    ]
    spawn(_two_encodings_worker, 2, args=(key, str(tmp_path), raws), backend="gloo", timeout_s=60)
    for rank in range(2):
        run = torch.load(tmp_path / f"encodings{rank}.pt")
        assert run["executed"] == [] and run["stage"] == SeedStage.DORMANT
        assert [ok for _, _, ok, _ in run["results"]] == [False, False]


class FailingOnRank(TableExecutor):
    """A ``TableExecutor`` whose GERMINATE of seed 0 raises on one rank only."""

    def __init__(self, table: GPUStateTensor, failing: bool) -> None:
        super().__init__(table)
        self.failing = failing

    def execute(self, command: KasminaCommand) -> bool:
        if self.failing and command.seed is not None and command.seed.seed_id == "seed-0":
            self.executed.append(command.command_id)
            raise RuntimeError("a device-specific failure")
        return super().execute(command)


def _verdict_worker(rank: int, world: int, key_hex: str, out_dir: str, failing: int) -> None:
    """Two commands from rank 0; the first fails on rank ``failing`` only, then the repair."""
    keyring = Keyring({"k1": bytes.fromhex(key_hex)})
    table = GPUStateTensor(NUM_SEEDS, "cpu")
    handler = LeylineAdaptationHandler(
        CommandVerifier(keyring), FailingOnRank(table, rank == failing)
    )
    replica = TensorReplica(lambda: {"table": table.state_tensor}, after_import=table.resync)
    coord = DistributedCoordinator(handler, replica)
    if rank == 0:
        assert coord.submit(_signed(keyring, GERMINATE, 0, "blueprint-a"))
        assert coord.submit(_signed(keyring, GERMINATE, 1, "blueprint-b"))
    result = coord.sync_epoch(0)
    torch.save(
        {
            "commands": [(c.command_id, c.origin, c.ok, c.reason) for c in result.commands],
            "verdict": (result.divergent_ranks, result.source_rank, result.repaired_ranks),
            "stages": [int(s) for s in table.stages()],
            "stats": dict(handler.stats),
            "coordinator": dict(coord.stats),
        },
        Path(out_dir, f"verdict{rank}.pt"),
    )


@pytest.mark.slow  # spawns processes
@pytest.mark.parametrize(
    ("world", "applied", "source"),
    [(2, False, 0), (3, True, 1)],  # 2 ranks: the tie goes to rank 0; 3: ranks 1 and 2 outvote it
    ids=["2-ranks-tie", "3-ranks-majority"],
)
def test_a_command_that_fails_on_one_rank_gets_one_verdict_matching_the_repaired_state(
    tmp_path: Path, world: int, applied: bool, source: int
) -> None:
    from kasmina.utils.keyring import generate_key

    args = (generate_key().hex(), str(tmp_path), 0)  # execution fails on rank 0 only
    spawn(_verdict_worker, world, args=args, backend="gloo", timeout_s=60, join_timeout_s=150)

    runs = [torch.load(tmp_path / f"verdict{r}.pt") for r in range(world)]
    ran = [r for r in range(world) if r != 0]  # the ranks where it ran
    for run in runs:
        assert run["commands"] == runs[0]["commands"]  # one verdict, reasons included
        assert [ok for *_, ok, _ in run["commands"]] == [applied, True]
        divergent = tuple(ran) if not applied else (0,)
        assert run["verdict"] == (divergent, source, divergent)  # every divergent rank repaired
        # The verdict is the state every rank ended in.
        assert run["stages"][0] == (SeedStage.ISOLATED_INIT if applied else SeedStage.DORMANT)
        assert run["stats"]["executed"] == (2 if applied else 1)  # counted as it ended
        assert run["stats"]["failed"] == (0 if applied else 1)
    if not applied:
        reason = runs[0]["commands"][0][3]
        assert reason == (
            "not applied: it failed on rank(s) [0]; rank(s) [1] that ran it were repaired "
            "from rank 0"
        )
    else:
        assert runs[0]["commands"][0][3] == ""
    revised = [r for r in range(world) if runs[r]["coordinator"].get("revised")]
    assert revised == ([0] if applied else ran)


def _sleep_forever(rank: int, world: int) -> None:
    time.sleep(600)


def test_spawn_kills_ranks_that_outlive_the_join_timeout() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        spawn(_sleep_forever, 2, backend="gloo", timeout_s=5, join_timeout_s=2)
    assert time.monotonic() - started < 30


# ----------------------------------------------------------------- single process, no group


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _local(
    clock: Clock | None = None, freshness_s: float = 60.0
) -> tuple[DistributedCoordinator, GPUStateTensor, Keyring, TableExecutor]:
    keyring = Keyring({"k1": KEY})
    table = GPUStateTensor(NUM_SEEDS, "cpu")
    verifier = CommandVerifier(keyring, freshness_s, clock=clock or time.time)
    executor = TableExecutor(table)
    handler = LeylineAdaptationHandler(verifier, executor)
    coord = DistributedCoordinator(handler, lambda: {"table": table.state_tensor})
    return coord, table, keyring, executor


def test_single_process_applies_commands_only_at_the_boundary() -> None:
    coord, table, keyring, _ = _local()
    assert coord.world_size == 1 and coord.rank == 0
    assert coord.submit(_signed(keyring, GERMINATE, 0, "bp"))
    assert table.stage(0) == SeedStage.DORMANT  # verified, held, not applied
    result = coord.sync_epoch(0)
    assert result.outcomes == (True,) and result.consistent
    assert result.commands[0].origin == 0 and result.commands[0].reason == ""
    assert table.stage(0) == SeedStage.ISOLATED_INIT
    assert coord.pending == 0
    assert coord.sync_epoch(1).outcomes == ()


def test_the_sync_history_is_bounded_and_the_syncs_counted() -> None:
    coord, _, _, _ = _local()
    for epoch in range(HISTORY_SIZE + 3):
        coord.sync_epoch(epoch)
    assert len(coord.history) == HISTORY_SIZE and coord.stats["syncs"] == HISTORY_SIZE + 3
    assert coord.history[-1].epoch == HISTORY_SIZE + 2 and coord.history[0].epoch == 3


def test_an_epoch_longer_than_the_freshness_window_still_applies_its_commands() -> None:
    clock = Clock()
    coord, table, keyring, _ = _local(clock, freshness_s=60.0)
    raw = _signed(keyring, GERMINATE, 0, "bp", timestamp=clock.now)
    assert coord.submit(raw)
    clock.now += 3600.0  # a long epoch: the command is an hour old at the boundary
    assert coord.handler.verifier.verify(AdaptationCommand.FromString(raw))[1] == "stale"
    assert coord.sync_epoch(0).outcomes == (True,)
    assert table.stage(0) == SeedStage.ISOLATED_INIT


def test_relayed_commands_are_judged_against_their_receive_time() -> None:
    clock = Clock()
    keyring = Keyring({"k1": KEY})
    verifier = CommandVerifier(keyring, 60.0, clock=clock)
    handler = LeylineAdaptationHandler(verifier, TableExecutor(GPUStateTensor(1, "cpu")))
    signed_at = clock.now
    raw = _signed(keyring, GERMINATE, 0, "bp", timestamp=signed_at)
    clock.now += 5000.0
    assert handler.accept(raw) is None  # stale on arrival now
    assert handler.accept_relayed(raw, received_at=clock.now) is None  # stale when received
    assert handler.accept_relayed(raw, received_at=clock.now + 120.0) is None  # future
    assert handler.stats["rejected:stale"] == 2 and handler.stats["rejected:future"] == 1
    command = handler.accept_relayed(raw, received_at=signed_at + 1.0)
    assert command is not None and command.seed is not None
    assert handler.accept_relayed(raw, received_at=signed_at + 1.0) is None  # nonce used up
    assert handler.stats["rejected:replay"] == 1
    forged = sign_command(make_seed_command(CULL, "seed-0"), Keyring({"k1": bytes(32)}), "k1")
    forged_raw = forged.SerializeToString()
    assert handler.accept_relayed(forged_raw, received_at=clock.now) is None
    assert handler.stats["rejected:bad_signature"] == 1
    assert handler.accept_relayed(b"\xff" * 7, received_at=clock.now) is None  # never raises
    assert handler.accept_relayed(raw, received_at=float("nan")) is None


def test_relayed_batches_do_not_age_out_their_own_later_commands() -> None:
    """Applying a batch late must not let one command's nonce expiry make an older one stale."""
    clock = Clock()
    verifier = CommandVerifier(Keyring({"k1": KEY}), 60.0, clock=clock)
    handler = LeylineAdaptationHandler(verifier, TableExecutor(GPUStateTensor(2, "cpu")))
    t0 = clock.now
    older = _signed(Keyring({"k1": KEY}), GERMINATE, 0, "a", timestamp=t0)
    newer = _signed(Keyring({"k1": KEY}), GERMINATE, 1, "b", timestamp=t0 + 30.0)
    clock.now += 7200.0
    assert handler.accept_relayed(newer, received_at=t0 + 31.0) is not None
    assert handler.accept_relayed(older, received_at=t0 + 1.0) is not None


class FailingPrepare:
    """An applier whose rank cannot ready artifact ``bad`` (its fetch failed)."""

    def __init__(self, handler: LeylineAdaptationHandler, executor: TableExecutor) -> None:
        self.handler, self.executor = handler, executor
        self.refused: list[tuple[str, str]] = []

    def prepare(self, command: KasminaCommand) -> str:
        assert command.seed is not None
        return "fetch failed" if command.seed.artifact_id == "bad" else ""

    def apply(self, commands: list[KasminaCommand]) -> list[tuple[bool, str]]:
        results = []
        for command in commands:
            ok = self.executor.execute(command)
            self.handler.complete(command, ok)
            results.append((ok, ""))
        return results

    def refuse(self, command: KasminaCommand, reason: str) -> None:
        self.refused.append((command.command_id, reason))
        self.handler.complete(command, False)


def test_a_command_some_rank_cannot_ready_is_applied_nowhere() -> None:
    keyring = Keyring({"k1": KEY})
    table = GPUStateTensor(NUM_SEEDS, "cpu")
    executor = TableExecutor(table)
    handler = LeylineAdaptationHandler(CommandVerifier(keyring), executor)
    applier = FailingPrepare(handler, executor)
    coord = DistributedCoordinator(handler, lambda: {"t": table.state_tensor}, applier=applier)
    assert coord.submit(_signed(keyring, GERMINATE, 0, "bad"))
    assert coord.submit(_signed(keyring, GERMINATE, 1, "good"))
    result = coord.sync_epoch(0)
    assert result.outcomes == (False, True)
    assert result.commands[0].reason == "not applied on any rank: rank(s) [0] could not prepare it"
    assert len(executor.executed) == 1 and table.stage(0) == SeedStage.DORMANT
    assert applier.refused == [(result.commands[0].command_id, result.commands[0].reason)]
    assert handler.stats["failed"] == 1 and handler.stats["executed"] == 1
    assert coord.stats["refused"] == 1 and coord.stats["applied"] == 1


def test_submit_verifies_on_arrival_bounds_the_queue_and_never_raises() -> None:
    coord, _, keyring, _ = _local()
    assert not coord.submit(b"x")  # malformed: refused by the handler, now
    assert not coord.submit("not bytes")  # type: ignore[arg-type]
    # What the single-process door refuses, refused here too: these raised (no len, unhashable)
    for junk in (None, 123, bytearray(b"\x00\x01garbage"), memoryview(b"\xff\xfe")):
        assert not coord.submit(junk)  # type: ignore[arg-type]
    assert coord.handler.stats["rejected:malformed"] == 6
    assert not coord.submit(bytearray(coord.handler.max_message_bytes + 1))
    assert coord.handler.stats["rejected:oversize"] == 1
    assert coord.stats["refused_on_arrival"] == 7
    assert coord.submit(bytearray(_signed(keyring, GERMINATE, 2, "bytearray")))
    assert coord.sync_epoch(0).outcomes == (True,)
    coord.max_pending = 1
    assert coord.submit(_signed(keyring, GERMINATE, 0, "a"))
    assert not coord.submit(_signed(keyring, GERMINATE, 1, "b"))
    assert coord.stats["dropped:queue_full"] == 1
    assert coord.handler.stats["failed"] == 1  # the dropped one is reported, not lost
    assert coord.sync_epoch(1).outcomes == (True,)
    with pytest.raises(TypeError, match="applier"):
        DistributedCoordinator(object(), lambda: {})  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 2.5, True, 0, "8"])
def test_max_pending_must_be_an_int_of_at_least_one(bad: object) -> None:
    # NaN or infinity compared False against every length: the queue took every command.
    coord, _, _, _ = _local()
    with pytest.raises(ValueError, match="max_pending must be an int >= 1"):
        coord.max_pending = bad  # type: ignore[assignment]
    assert coord.max_pending == 1024
    with pytest.raises(ValueError, match="max_pending"):
        DistributedCoordinator(coord.handler, lambda: {}, max_pending=bad)  # type: ignore[arg-type]


def test_a_held_copy_is_taken_for_its_identity_or_a_retry_that_says_the_same() -> None:
    from kasmina.control.relay import HeldCommands, Received

    keyring = Keyring({"k1": KEY})
    command = make_seed_command(GERMINATE, "seed-0", "a")
    other = make_seed_command(GERMINATE, "seed-1", "a", command_id=command.command_id)
    raws = [sign_command(c, keyring, "k1").SerializeToString() for c in (command, command, other)]
    held = HeldCommands(4)
    for raw in raws[1:]:  # the retry, and another command under the id
        assert held.add(Received(raw, 0.0, command, *command_keys(raw)))
    assert held.take(*command_keys(raws[0]), wait_s=0.0).raw == raws[1]  # the retry
    assert held.take(*command_keys(raws[0]), wait_s=0.0) is None  # says something else
    assert held.take(*command_keys(raws[2]), wait_s=0.0).raw == raws[2]  # its own identity
    assert len(held) == 0


def test_a_sync_waits_for_the_checks_under_way_not_for_forgeries_that_begin_later() -> None:
    """A sync waits for a copy of a relayed command still in its check here (its nonce is used),
    but anyone can send bytes under a command's id: a flood of forgeries from a few threads
    kept one in its check at every moment, and each sync waited ``wait_s`` (10 s) for every
    relayed command. A check that begins after the sync looked is not waited for."""
    from kasmina.control.relay import HeldCommands, Received

    keyring = Keyring({"k1": KEY})
    command = make_seed_command(GERMINATE, "seed-0", "a")
    raw = sign_command(command, keyring, "k1").SerializeToString()
    forged = AdaptationCommand.FromString(raw)
    forged.metadata.signature = bytes(32)  # the id, without the key
    identity, command_id, content = command_keys(raw)
    held = HeldCommands(4)
    waiting = threading.Event()

    class Watched(threading.Condition):
        def wait_for(self, predicate, timeout=None):  # type: ignore[no-untyped-def]
            waiting.set()  # under the lock: an arrival after this begins after the sync looked
            return super().wait_for(predicate, timeout)

    held._arrived = Watched(held._lock)
    copy = held.arriving(identity, command_id)  # the genuine copy, in its check
    copy.__enter__()
    found: list[Received | None] = []
    sync = threading.Thread(
        target=lambda: found.append(held.take(identity, command_id, content, 60))
    )
    sync.start()
    assert waiting.wait(10)
    flood = held.arriving(command_keys(forged.SerializeToString())[0], command_id)
    flood.__enter__()  # a forgery under the id, in its check after the sync looked
    assert held.add(Received(raw, 0.0, command, identity, command_id, content))
    copy.__exit__(None, None, None)
    sync.join(10)
    stalled = sync.is_alive()
    flood.__exit__(None, None, None)
    sync.join()
    assert not stalled, "the sync waited for a check that began after it looked"
    assert found and found[0] is not None and found[0].raw == raw  # the copy it waited for


def test_tensor_replicas_round_trip_without_pickle_and_refuse_other_layouts() -> None:
    a = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "t": torch.zeros(2, 10).int()}
    b = {"w": torch.zeros(2, 3), "t": torch.ones(2, 10).int()}
    resynced: list[bool] = []
    source, target = (
        TensorReplica(lambda: a),
        TensorReplica(lambda: b, after_import=lambda: resynced.append(True)),
    )
    payload = source.export_state()
    assert not payload.startswith(b"\x80")  # length-prefixed JSON and bytes, not a pickle
    target.import_state(payload)
    assert target.checksum() == source.checksum() and resynced == [True]
    assert torch.equal(b["w"], a["w"])
    with pytest.raises(ValueError):
        TensorReplica(lambda: {"w": torch.zeros(3, 2), "t": b["t"]}).import_state(payload)
    with pytest.raises(ValueError):
        TensorReplica(lambda: {"w": b["w"]}).import_state(payload)
    with pytest.raises(ValueError):
        target.import_state(payload[:-3])


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
    nest = {"opt": {"state": {0: {"step": torch.tensor(3.0)}}, "lr": 0.1}, "ids": ["a", "b"]}
    assert nested_checksum(nest) == nested_checksum({"ids": ["a", "b"], "opt": dict(nest["opt"])})
    assert nested_checksum(nest) != nested_checksum({**nest, "ids": ["b", "a"]})


def test_majority_and_tie_breaking() -> None:
    assert minority_ranks([(1,), (1,), (2,)]) == (2,)
    assert minority_ranks([(2,), (1,), (1,)]) == (0,)
    assert minority_ranks([(1,), (2,)]) == (1,)  # a tie goes to rank 0
    assert minority_ranks([(1,), (2,), (3,)]) == (1, 2)
    assert minority_ranks([(1,), (1,)]) == ()
    # A rank whose replica is not finite is never the majority, in a tie or outnumbering.
    assert minority_ranks([(1,), (2,)], [False, True]) == (0,)
    assert minority_ranks([(1,), (1,), (2,)], [False, False, True]) == (0, 1)
    assert minority_ranks([(1,), (2,), (3,)], [True, False, True]) == (1, 2)
    assert minority_ranks([(1,), (2,)], [False, False]) == (1,)  # none finite: as before


def test_nested_finite_reads_every_floating_tensor_of_a_nest() -> None:
    ok = {"a": torch.ones(2), "b": [torch.zeros(1), (torch.tensor(3), "x")], "c": 1.5}
    assert nested_finite(ok) and nested_finite({}) and nested_finite([torch.tensor([1, 2])])
    for bad in (float("nan"), float("inf")):
        assert not nested_finite({"a": torch.ones(2), "b": [(torch.tensor([0.0, bad]),)]})


def test_on_divergence_is_not_called_when_consistent() -> None:
    calls: list[EpochSyncResult] = []
    coord, _, _, _ = _local()
    coord.on_divergence = calls.append
    assert coord.sync_epoch(0).consistent
    assert calls == [] and coord.stats["divergences"] == 0


def test_helpers_are_no_ops_without_a_process_group() -> None:
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    average_gradients([p])
    broadcast_tensors([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0)) and torch.equal(p.data, torch.ones(3))
    # No group's timeout to read: torch's default collective timeout (a group's own is read in
    # tests/manager/test_ddp_lifecycle.py, under a real one).
    default = torch.distributed.distributed_c10d.default_pg_timeout.total_seconds()
    assert collective_timeout_s() == default


def _buffer_worker(rank: int, world: int, out_dir: str) -> None:
    average = BufferAverage()
    mean = torch.tensor([1.0, 2.0]) + rank  # statistics of each rank's own shard
    var = torch.tensor([1.0, float("nan") if rank == 1 else 1.0])  # drift on rank 1
    count = torch.tensor(5)
    # fp16 statistics whose mean fp16 holds, though their sum does not (65504 at most).
    half = torch.tensor([40000.0, 40000.0], dtype=torch.float16) + 2048 * rank
    averaged = average([("s.mean", mean), ("s.var", var), ("s.count", count), ("s.half", half)])
    p = nn.Parameter(torch.zeros(2, dtype=torch.float16))
    p.grad = half.clone()
    # A sparse embedding gradient (rows 0 and 2 on rank 0, 2 and 3 on rank 1), and one that
    # only rank 0 has (zero-filled on rank 1): reshaping a sparse gradient raised.
    emb = nn.Embedding(5, 2, sparse=True)
    emb(torch.tensor([0, 2] if rank == 0 else [2, 3])).sum().backward()
    lone = nn.Embedding(3, 2, sparse=True)
    if rank == 0:
        lone(torch.tensor([1])).sum().backward()
    average_gradients([p, emb.weight, lone.weight])
    torch.save(
        {"n": averaged, "mean": mean, "var": var, "stats": dict(average.stats), "half": half,
         "grad": p.grad, "emb": emb.weight.grad, "lone": lone.weight.grad},
        Path(out_dir) / f"rank{rank}.pt",
    )  # fmt: skip


@pytest.mark.slow  # spawns processes
def test_seed_buffers_are_averaged_and_a_non_finite_one_left_to_the_repair(
    tmp_path: Path,
) -> None:
    spawn(_buffer_worker, 2, args=(str(tmp_path),), backend="gloo", timeout_s=60)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank, out in enumerate(ranks):
        assert out["n"] == 2 and out["stats"]["nonfinite"] == 1
        assert out["mean"].tolist() == [1.5, 2.5]  # averaged, the same bits on both ranks
        # Divided before the sum: summed first, both were inf on every rank.
        assert out["half"].tolist() == out["grad"].tolist() == [41024.0, 41024.0]
        # Averaged, rank 1's NaN would have reached rank 0 and no repair would have found it.
        assert out["var"][1].isnan().item() == (rank == 1)
        # The sparse gradient averaged and still sparse (what SparseAdam takes), over the rows
        # either rank touched; the lone one averaged with rank 1's zeros, sparse on both (a
        # dense zero-fill left rank 1's dense, which SparseAdam refuses).
        assert out["emb"].is_sparse
        assert out["emb"].to_dense()[:, 1].tolist() == [0.5, 0.0, 1.0, 0.5, 0.0]
        assert out["lone"].is_sparse
        assert out["lone"].to_dense().tolist() == [[0.0] * 2, [0.5] * 2, [0.0] * 2]


def _nan_repair_worker(rank: int, world: int, out_dir: str) -> None:
    """Rank 0's replica holds a NaN (a seed's BatchNorm statistics after a batch of inf), rank
    1's is finite: two ranks tie, and the tie went to rank 0, so the repair copied its NaN to
    the healthy rank, where nothing flagged it again (the checksums then agreed)."""
    stats = torch.tensor([0.5, float("nan") if rank == 0 else 0.25])
    table = GPUStateTensor(NUM_SEEDS, "cpu")
    handler = LeylineAdaptationHandler(CommandVerifier(Keyring({"k1": KEY})), TableExecutor(table))
    replica = TensorReplica(lambda: {"stats": stats, "table": table.state_tensor})
    result = DistributedCoordinator(handler, replica).sync_epoch(0)
    torch.save(
        {"stats": stats, "divergent": result.divergent_ranks, "source": result.source_rank},
        Path(out_dir) / f"rank{rank}.pt",
    )


@pytest.mark.slow  # spawns processes
def test_a_non_finite_rank_is_repaired_from_a_finite_one(tmp_path: Path) -> None:
    spawn(_nan_repair_worker, 2, args=(str(tmp_path),), backend="gloo", timeout_s=60)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["divergent"] == (0,) and out["source"] == 1
        assert out["stats"].tolist() == [0.5, 0.25]


def test_a_copy_whose_check_begins_while_the_sync_waits_is_taken() -> None:
    """A sync that found a forgery under the relayed command's id in its check waited only for
    that one: the genuine copy, its check begun a moment later, was missed, and lost the race
    for its nonce to the relayed bytes (refused on every rank at the next sync). A check of the
    command's own bytes that begins during the wait is waited for."""
    from kasmina.control.relay import HeldCommands, Received

    keyring = Keyring({"k1": KEY})
    command = make_seed_command(GERMINATE, "seed-0", "a")
    raw = sign_command(command, keyring, "k1").SerializeToString()
    forged = AdaptationCommand.FromString(raw)
    forged.metadata.signature = bytes(32)
    identity, command_id, content = command_keys(raw)
    held = HeldCommands(4)
    waiting = threading.Event()

    looks: list[bool] = []  # each time the sync's wait tests whether it may stop

    class Watched(threading.Condition):
        def wait_for(self, predicate, timeout=None):  # type: ignore[no-untyped-def]
            waiting.set()
            return super().wait_for(lambda: looks.append(predicate()) or looks[-1], timeout)

    held._arrived = Watched(held._lock)
    flood = held.arriving(command_keys(forged.SerializeToString())[0], command_id)
    flood.__enter__()  # a forgery under the id, in its check when the sync looks
    found: list[Received | None] = []
    sync = threading.Thread(
        target=lambda: found.append(held.take(identity, command_id, content, 60))
    )
    sync.start()
    assert waiting.wait(10)
    copy = held.arriving(identity, command_id)  # the genuine copy's check begins
    copy.__enter__()
    seen = len(looks)
    flood.__exit__(None, None, None)  # the sync looks again (under the lock) before the add
    deadline = time.monotonic() + 10
    while len(looks) == seen and time.monotonic() < deadline:
        time.sleep(0.001)
    assert held.add(Received(raw, 0.0, command, identity, command_id, content))
    copy.__exit__(None, None, None)
    sync.join(10)
    assert not sync.is_alive()
    assert found and found[0] is not None and found[0].raw == raw
