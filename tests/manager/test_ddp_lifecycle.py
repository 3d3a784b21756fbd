"""The kernel manager under real data parallelism: gloo processes, DDP host, signed lifecycle.

Each test spawns 2 or 3 processes joined on loopback. Every rank runs a ``KasminaKernelManager``
over the small test host wrapped in ``DistributedDataParallel`` (``wrap_ddp``), with a
``DistributedKasmina`` on top, trains on its own data shard with KD, and takes a seed from
DORMANT to ACTIVE through signed commands received on different ranks. The ranks write what
they ended with to files the test compares: seed parameters bit for bit, the sync verdicts, the
command outcomes. The scenarios also cover an epoch longer than the freshness window, a command
delivered to two ranks, a forged command, a corrupted rank being repaired (with three ranks,
by the majority, from a rank other than 0, also after steps trained with mismatched seed
layouts), a command whose outcome the repair overturned, detection without repair, a kernel
fetch on one rank slower than the sync's process-group timeout, a batch-norm seed whose running
statistics, different on each rank's shard, are averaged, a layer unfrozen after the wrap, and a
host frozen whole (the seeds alone train), which ``wrap_ddp`` leaves unwrapped, with rank 0's
parameters and buffers. ``test_ddp_step_agreement`` has the ranks' agreement within a step.

Every collective is bounded by the process group's timeout and the whole run by
``join_timeout_s``, so a hung rank fails the test instead of hanging the suite.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.nn import functional as F

from kasmina.control.auth import sign_command
from kasmina.control.builders import make_seed_command
from kasmina.control.processes import spawn
from kasmina.leyline import AdaptationCommand
from kasmina.manager.ddp import DistributedKasmina, kasmina_owned_names
from kasmina.urza.publish import publish_artifact
from kasmina.utils.keyring import Keyring, generate_key
from tests.manager.ddp_helpers import (
    FRESHNESS_S,
    STEPS,
    Normalised,
    NormedHost,
    Trainer,
    _assert_equal_states,
    _host_norm,
    _load,
    _signed,
    _spec,
    _two_gloo_ranks,
)
from tests.manager.helpers import PUBLISHER, SEED0, SEED1, S


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


def _worker_unfrozen(rank: int, world: int, spec: dict[str, Any]) -> None:
    """Every rank unfreezes the slot's layer after ``wrap_ddp``: frozen at attach (so at the
    wrap too; then given a group), or trainable at attach and frozen only for the wrap."""
    import tests.manager.ddp_helpers as this
    import tests.manager.helpers as helpers
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
    import tests.manager.ddp_helpers as this
    import tests.manager.helpers as helpers

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

    import tests.manager.ddp_helpers as this

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
