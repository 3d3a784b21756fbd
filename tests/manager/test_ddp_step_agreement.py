"""The kernel manager's step under real data parallelism: what one rank finds in a step (a seed
output or gradient that is not finite, a kernel that raises on its data, a compiled cut, an
isolation leak) is charged or acted on alike on every rank, the seeds' gradient average (fp16
without overflow, registries of other sizes), and ranks whose hosts differ (dtype, what is
frozen) refused on every rank. Each test spawns two gloo processes
(``tests/manager/ddp_helpers.py``'s ``Trainer``) whose saved states the test compares, bit for
bit."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch

from kasmina.control.processes import spawn
from kasmina.manager.ddp import kasmina_owned_names, wrap_ddp
from kasmina.manager.grad_sync import SeedGradientSync
from tests.manager.ddp_helpers import (
    Trainer,
    _assert_equal_states,
    _load,
    _signed,
    _spec,
    _two_gloo_ranks,
)
from tests.manager.helpers import SEED0, SEED1, S


def _worker_overflow(rank: int, world: int, spec: dict[str, Any]) -> None:
    """Rank 0's seed output is not finite for one step: its kernel's backward meets 0 * inf."""
    t = Trainer(rank, world, spec)
    t.epoch_with({0: [_signed(t.rig, "germinate", SEED0, spec["mlp"])]})
    kernel = t.manager.seed(SEED0).kernel
    handle = None
    if rank == 0:
        handle = kernel.register_forward_hook(lambda _m, _a, out: out * float("inf"))
    before = [p.detach().clone() for p in t.manager.seed(SEED0).seed_parameters()]
    t.train(1)
    after = t.manager.seed(SEED0).seed_parameters()
    moved = not all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    if handle is not None:
        handle.remove()
    t.train(1)
    t.save(spec["out"], "overflow", faults=t.manager.seed(SEED0).faults, moved=moved)
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


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_a_seed_that_falls_back_on_one_rank_steps_alike_on_every_rank(
    tmp_path: Path, published
) -> None:
    """The averaged seed gradients take one rank's NaN (its fallen-back seed's 0 * inf) as 0,
    and every rank steps on that same finite average (kept, where one process drops a seed's
    gradient at a fallback): the replicas stay equal and finite. The fault is charged on every
    rank alike (the step agrees the seeds' flags): charged on the one rank only, it made that
    rank diverge, and the epoch sync repaired the fault away."""
    spec = _spec(tmp_path, published, "gloo")
    spawn(_worker_overflow, 2, args=(spec,), backend="gloo", timeout_s=60, join_timeout_s=120)
    runs = _load(tmp_path, "overflow", 2)
    _assert_equal_states(runs)
    assert all(torch.isfinite(t).all() for t in runs[0]["state"].values())
    assert [run["faults"] for run in runs] == [1, 1]
    assert [run["moved"] for run in runs] == [True, True]  # stepped on the average, kept


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
    spawn(_worker_cast_rank, 2, args=(str(tmp_path),), backend="gloo", timeout_s=60)
    refusals = [Path(tmp_path, f"refused{rank}.txt").read_text() for rank in (0, 1)]
    assert "torch.float32" in refusals[0] and "torch.bfloat16" in refusals[1]


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_ranks_whose_hosts_differ_in_what_is_frozen_are_refused_on_every_rank(
    tmp_path: Path,
) -> None:
    """A host frozen whole on one rank only: that rank returned it unwrapped, the other entered
    DDP's constructor, and both hung in their next collectives until the group's timeout (30
    minutes by default). ``requires_grad`` is part of the layout the ranks compare first: each
    rank's refusal names it (a collective timing out would have raised something else)."""
    spawn(_worker_frozen_rank, 2, args=(str(tmp_path),), backend="gloo", timeout_s=30,
          join_timeout_s=90)  # fmt: skip
    refusals = [Path(tmp_path, f"refused{rank}.txt").read_text() for rank in (0, 1)]
    assert "0 requiring a gradient" in refusals[0] and "4 requiring a gradient" in refusals[1]


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_ranks_with_registries_of_other_sizes_do_not_agree_flags(tmp_path: Path) -> None:
    """The flags' agreement runs only between registries of as many seeds (in the header):
    vectors of two lengths in one all-reduce fail or hang the collective. Each rank keeps its
    own flags; the layout differs too, and the epoch sync repairs."""
    spawn(_worker_uneven_registries, 2, args=(str(tmp_path),), backend="gloo", timeout_s=60)
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


def _to_active(t: Trainer) -> None:
    """SEED0, GERMINATEd, ADVANCEd through G2..G5 (each command received on rank 0), an epoch
    of training before each gate, as ``test_ddp_lifecycle`` walks it."""
    for steps, stage in ((2, S.COMPATIBILITY_CHECK), (2, S.GRAFTING), (4, S.STABILIZATION)):
        t.epoch_with({0: [_signed(t.rig, "advance", SEED0)]}, steps=steps)
        assert t.manager.stages()[SEED0] == stage
    with torch.no_grad():  # G5's evidence, measured alike on every rank
        held_out = [(t.rig.x, t.teacher(t.rig.x).argmax(-1))]
    measured = t.manager.evaluate_seeds(held_out, loss_fn=torch.nn.functional.cross_entropy)
    assert measured[SEED0].score >= 0.5, measured
    t.epoch_with({0: [_signed(t.rig, "advance", SEED0)]})
    assert t.manager.stages()[SEED0] == S.ACTIVE


def _worker_cut(rank: int, world: int, spec: dict[str, Any]) -> None:
    """Rank 0's ACTIVE seed's cut flag set in one step's backward (as a compiled ACTIVE kernel's
    cut of its own non-finite input gradient sets it: ``compiled_cut``; an isolated seed's flag
    is a lost step), rank 1's clean; clipped."""
    t = Trainer(rank, world, spec)
    t.epoch_with({0: [_signed(t.rig, "germinate", SEED0, spec["mlp"])]})
    _to_active(t)
    seed = t.manager.seed(SEED0)

    def cut(_grad: torch.Tensor) -> None:  # written in the backward, read at the step
        seed.cut_flag.fill_(True)

    handle = seed.seed_parameters()[0].register_hook(cut) if rank == 0 else None
    t.train(1, clip=1.0)
    if handle is not None:
        handle.remove()
    kept = bool(seed.cut_flag)
    t.train(1, clip=1.0)
    t.save(spec["out"], "cut", faults=seed.faults, log=list(seed.fault_log), cut=kept)
    t.manager.close()


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_a_compiled_cut_on_one_rank_is_charged_on_every_rank(tmp_path: Path, published) -> None:
    """A seed's cut flag set on rank 0 only (its compiled cut zeroed a non-finite input gradient
    of its kernel's own on rank 0's data) is agreed in the step's collective with the seed's
    other flags: every rank charges the fault once, at the same step, and clears the flag, so
    the replicas (fault counts and logs included) stay alike. Charged on rank 0 alone, rank 0's
    seed would reach its fault limit first and quarantine there alone."""
    from kasmina.seeds.compiled_cut import CUT_REASON

    runs = _two_gloo_ranks(_worker_cut, tmp_path, published, "cut")
    assert [run["faults"] for run in runs] == [1, 1]
    assert [run["log"] for run in runs] == [[CUT_REASON]] * 2
    assert [run["cut"] for run in runs] == [False, False]  # settled at the step
    assert [run["grads"]["flags_agreed"] for run in runs] == [1, 1]
    _assert_equal_states(runs)


def _worker_from_above(rank: int, world: int, spec: dict[str, Any]) -> None:
    """Rank 0's isolated seed met a non-finite gradient from above in one step's backward (a NaN
    target in rank 0's shard): its weights' gradient is NaN and, compiled, its cut flag is set
    (``compiled_cut.from_above_tested``); rank 1's clean; unclipped."""
    t = Trainer(rank, world, spec)
    t.epoch_with({0: [_signed(t.rig, "germinate", SEED0, spec["mlp"])]})
    seed = t.manager.seed(SEED0)
    before = [p.detach().clone() for p in seed.seed_parameters()]

    def from_above(grad: torch.Tensor) -> torch.Tensor:  # written in the backward
        seed.cut_flag.fill_(True)
        return grad * float("nan")

    handle = seed.seed_parameters()[0].register_hook(from_above) if rank == 0 else None
    t.train(1)
    if handle is not None:
        handle.remove()
    after = seed.seed_parameters()
    t.save(
        spec["out"],
        "from_above",
        faults=seed.faults,
        events=seed.nonfinite_events,
        cut=bool(seed.cut_flag),
        finite=all(bool(p.isfinite().all()) for p in after),
        moved=all(not torch.equal(p, q) for p, q in zip(after, before, strict=True)),
    )
    t.manager.close()


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_a_compiled_loss_from_above_on_one_rank_loses_that_ranks_gradient_on_every_rank(
    tmp_path: Path, published
) -> None:
    """An isolated seed's compiled flag for a non-finite gradient from above on rank 0 only is a
    lost step there, settled before the agreement as eager's is: rank 0 sends none of the seed's
    gradient, every rank steps it on the same finite average and charges nothing. Settled after
    it, rank 0's NaN went into the average, every rank's seed stepped to NaN, and each charged
    a cut fault."""
    runs = _two_gloo_ranks(_worker_from_above, tmp_path, published, "from_above")
    assert [run["faults"] for run in runs] == [0, 0]
    assert [run["events"] for run in runs] == [1, 1]  # agreed: settled alike
    assert [run["cut"] for run in runs] == [False, False]  # settled at the step
    assert all(run["finite"] and run["moved"] for run in runs)
    assert [run["grads"]["flags_agreed"] for run in runs] == [1, 1]
    _assert_equal_states(runs)


ACCUMULATED = 3  # micro-batches a step


def _accumulated_window(t: Trainer, nan_on: int | None = None) -> dict[str, Any]:
    """One step over ``ACCUMULATED`` micro-batches of this rank's own data, DDP's reduction held
    (``no_sync``) to the last; ``nan_on``: the rank whose second micro-batch makes seed 0's
    output NaN."""
    manager = t.manager
    for j in range(ACCUMULATED):
        x = torch.randn(8, 6, generator=t.gen)
        with torch.no_grad():
            teacher = t.teacher(x)
        manager.set_teacher_logits(teacher)
        kernel, handle = manager.seed(SEED0).kernel, None
        if nan_on == t.rank and j == 1:
            handle = kernel.register_forward_hook(lambda _m, _a, out: out * float("nan"))
        with t.net.no_sync() if j < ACCUMULATED - 1 else contextlib.nullcontext():
            loss = torch.nn.functional.cross_entropy(t.net(x), teacher.argmax(-1))
            kd = manager.collect_kd_losses()
            manager.backward(loss / ACCUMULATED, kd_loss=None if kd is None else kd / ACCUMULATED)
        if handle is not None:
            handle.remove()
    return manager.step(grad_clip_norm=1.0)


def _worker_accumulated(rank: int, world: int, spec: dict[str, Any]) -> None:
    """Seed 0 in ISOLATED_INIT, seed 1 GRAFTING; rank 1's data faults seed 0 once."""
    t = Trainer(rank, world, spec)
    germinate = [_signed(t.rig, "germinate", s, spec["mlp"]) for s in (SEED0, SEED1)]
    t.epoch_with({0: germinate})
    for advance_on in (0, 1):  # to COMPATIBILITY_CHECK, then GRAFTING, each sent to one rank
        if rank == advance_on:
            assert t.manager.handle_adaptation_command(_signed(t.rig, "advance", SEED1))
        _accumulated_window(t)
        t.boundary()
    before = t.dk.seed_grads.stats["steps"]
    reports, alphas = [], []
    for i in range(3):
        reports.append(_accumulated_window(t, nan_on=1 if i == 1 else None))
        alphas.append(t.manager.seed(SEED1).alpha_value)
    t.save(
        spec["out"],
        "accumulated",
        syncs=t.dk.seed_grads.stats["steps"] - before,
        faults=[t.manager.seed(s).faults for s in (SEED0, SEED1)],
        alphas=alphas,
        reports=[(r["host_stepped"], sorted(r["seeds_stepped"]), r["nonfinite"]) for r in reports],
    )
    t.manager.close()


@pytest.mark.slow  # spawns processes: most of the time is their imports
def test_accumulated_steps_on_different_shards_stay_alike_on_every_rank(
    tmp_path: Path, published
) -> None:
    """``no_sync`` gradient accumulation over each rank's own micro-batches: the seeds'
    gradients are averaged once a step (not once a micro-batch), a kernel fault in one rank's
    micro-batch is charged on every rank at that step, a GRAFTING alpha advances alike, a
    command received by either rank applies on both at the epoch sync, and the replicas stay
    bit-equal."""
    runs = _two_gloo_ranks(_worker_accumulated, tmp_path, published, "accumulated")
    _assert_equal_states(runs)
    assert runs[0]["stages"] == runs[1]["stages"] == {SEED0: S.ISOLATED_INIT, SEED1: S.GRAFTING}
    for run in runs:
        assert run["syncs"] == 3 and run["faults"] == [1, 0]
        assert [nonfinite for *_, nonfinite in run["reports"]] == [[], [SEED0], []]
        assert all(host for host, *_ in run["reports"])
    assert runs[0]["alphas"] == runs[1]["alphas"]
    assert runs[0]["alphas"] == sorted(set(runs[0]["alphas"]))  # it advanced at each step
