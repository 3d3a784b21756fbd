"""A slot under activation checkpointing called more than once before one backward, and a slot
deep inside a reentrant checkpoint (docs/design.md §6a, "Training features around the guard";
§KD, "Teacher logits set for a forward ..."): each recompute takes its own first run's path,
and a reentrant first run marks the graph that its backward will record."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.utils.checkpoint
from torch import nn
from torch.utils.checkpoint import checkpoint

from kasmina.kd import loss as kd_loss_module
from kasmina.kd.config import KDConfig
from kasmina.ops import kd_kl_loss
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.recompute import checkpoint_region, graph_to_come, reentrant_first_run
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.stages import SeedStage
from tests.seeds.helpers import walk

S = SeedStage
ISOLATED = [S.ISOLATED_INIT, S.GRAFTING, S.STABILIZATION]


def _square_layer(stage: SeedStage) -> KasminaLayer:
    """A distilling slot on a 4-to-4 Linear, so that it can be applied to its own output."""
    torch.manual_seed(8)
    layer = KasminaLayer(nn.Linear(4, 4), 2, 2, kd_config=KDConfig(), layer_id="fc")
    for seed in layer.seeds:
        seed.attach_kernel(nn.Linear(2, 2))
        walk(seed, stage)
    layer.update_alpha_blending(5, 10)
    return layer


def test_the_checkpoint_region_is_found_on_this_torch() -> None:
    """The region, its saves so far (``RegionRuns``) and the reentrant first run are read off
    torch's internals: a torch that changed them fails here, not silently in a user's
    backward."""
    seen: list[tuple[object, object]] = []
    reentrant: list[bool] = []
    coming: list[bool] = []

    def region(h: torch.Tensor) -> torch.Tensor:
        seen.append(checkpoint_region())
        reentrant.append(reentrant_first_run())
        coming.append(graph_to_come((h,), {}))
        return torch.tanh(h) * 2

    x = torch.randn(3, requires_grad=True)
    assert checkpoint_region() == (None, None) and not reentrant_first_run()
    checkpoint(region, x, use_reentrant=False).sum().backward()
    (frame, first), (again, rerun) = seen
    assert isinstance(frame, torch.utils.checkpoint._CheckpointFrame)
    assert isinstance(frame.weak_holders, list) and len(frame.weak_holders) == 1  # (tanh's)
    assert first is None and again is frame and rerun is not None
    assert reentrant == [False, False]
    seen.clear(), reentrant.clear(), coming.clear()
    checkpoint(region, x, use_reentrant=True).sum().backward()
    assert seen == [(None, None)] * 2 and reentrant == [True, False]  # first run, recompute
    assert coming == [True, True]  # the first run under no_grad: its input needs grad
    with torch.no_grad():  # a checkpoint that records no graph: none to come, at its entry too
        checkpoint(region, x, use_reentrant=True)
    assert reentrant[-1] is False and coming[-1] is False
    with torch.no_grad():  # outside a region, an input needing grad is no first run's
        assert not graph_to_come((x,), {}) and not graph_to_come((x.detach(),), {})


def _twice(style: str, layer: KasminaLayer, use_checkpoint: bool, x: torch.Tensor) -> torch.Tensor:
    def body(h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(layer(h))

    def run(h: torch.Tensor) -> torch.Tensor:
        return checkpoint(body, h, use_reentrant=False) if use_checkpoint else body(h)

    if style == "shared":  # one block applied twice, checkpointed at each call
        return run(run(x)).pow(2).sum()
    if style == "in-one-region":  # the slot called twice inside one checkpointed region
        both = lambda h: body(body(h))  # noqa: E731
        return (checkpoint(both, x, use_reentrant=False) if use_checkpoint else both(x)).sum()
    layer.set_teacher_logits(torch.randn(5, 4))  # "views": each forward its own teacher
    first = run(x).pow(2).sum()
    layer.set_teacher_logits(torch.randn(5, 4) * 3)
    return first + run(x.flip(0)).pow(2).sum()


@pytest.mark.parametrize("style", ["shared", "in-one-region", "views"])
@pytest.mark.parametrize("stage", ISOLATED, ids=lambda s: s.name)
def test_a_slot_called_twice_before_one_backward_recomputes_each_call_as_it_ran(
    stage: SeedStage, style: str
) -> None:
    """KD and non-reentrant checkpointing, the slot called twice before the backward: the first
    call took the teacher, the second found none and cleared the slot's one memory of it, so
    the first region's recompute took the no-KD path (the one-node graft in GRAFTING and
    STABILIZATION) and the backward raised ``CheckpointError`` (6 tensors saved vs 3); with a
    teacher per forward, the first region's recompute read the second's. Each region now
    replays its own first run's teachers: the gradients are the plain run's."""
    grads = []
    for use_checkpoint in (False, True):
        layer = _square_layer(stage)
        torch.manual_seed(0)
        x = torch.randn(5, 4, requires_grad=True)
        layer.set_teacher_logits(torch.randn(5, 4))
        loss = _twice(style, layer, use_checkpoint, x)
        kd = layer.get_and_clear_kd_losses()
        assert kd is not None and kd.requires_grad
        (loss + kd).backward()
        assert layer.get_and_clear_kd_losses() is None  # no recompute took a loss
        grads.append({"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}})
    assert grads[0].keys() == grads[1].keys()
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, rtol=0, atol=0, msg=name)


def test_a_retained_graph_recomputes_each_region_again_from_its_first_call() -> None:
    """A second backward through a retained graph recomputes every region once more: the
    replay starts again at the region's first call."""
    grads = []
    for use_checkpoint in (False, True):
        layer = _square_layer(S.GRAFTING)
        torch.manual_seed(0)
        x = torch.randn(5, 4, requires_grad=True)
        layer.set_teacher_logits(torch.randn(5, 4))
        loss = _twice("shared", layer, use_checkpoint, x)
        loss = loss + layer.get_and_clear_kd_losses()
        loss.backward(retain_graph=True)
        loss.backward()
        grads.append([p.grad.clone() for p in layer.parameters() if p.grad is not None])
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_slot_deep_inside_a_reentrant_checkpoint_marks_the_graph() -> None:
    """Inside a reentrant checkpoint's first run the slot's input is a host activation made
    under ``no_grad``: no input needed grad, so nothing marked the graph the backward records
    (a ROLLBACK or CULL applied before it mixed restored weights with that backward's
    gradients). The stack tells now; a validation forward under ``no_grad`` still marks none."""
    layer = _square_layer(S.GRAFTING)
    inp = nn.Linear(4, 4)

    def region(h: torch.Tensor) -> torch.Tensor:
        return layer(torch.relu(inp(h)))

    x = torch.randn(5, 4, requires_grad=True)
    with torch.no_grad():
        checkpoint(region, x, use_reentrant=True)
    assert not layer.graph_open
    out = checkpoint(region, x, use_reentrant=True)
    assert layer.graph_open
    layer.end_step()
    out.sum().backward()  # the recompute, with grad, marks it again
    assert layer.graph_open


class _RaisesOnce(nn.Linear):
    """A seed's kernel that raises at its first call (a transient error), as a Linear after."""

    raised = False

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.raised:
            self.raised = True
            raise torch.OutOfMemoryError("out of memory (once)")
        return super().forward(h)


def _raising_once(real: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    calls = []

    def once(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("out of memory (once)")
        return real(*args, **kwargs)

    return once


class _Block(nn.Module):
    """up -> seeds (a slot of two, or a stand-alone seed) -> tanh -> down: its parameters not
    under ``seeds`` are the host's."""

    def __init__(self, owner: str, stage: SeedStage, kernel: type[nn.Linear]) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.up, self.down = nn.Linear(4, 4), nn.Linear(4, 4)
        kd = KDConfig()
        if owner == "slot":
            self.seeds = KasminaLayer(nn.Linear(4, 4), 2, 2, kd_config=kd, layer_id="fc")
            seeds = list(self.seeds.seeds)
        else:
            self.seeds = GradientIsolatedSeed(4, "s0", kd_config=kd)
            seeds = [self.seeds]
        for seed in seeds:
            seed.attach_kernel(kernel(seed.chunk_size, seed.chunk_size))
            walk(seed, stage)
            seed.update_alpha_blending(5, 10)
        self.all_seeds = seeds

    def forward(self, x: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        h = self.up(x)
        h = self.seeds(h, teacher_logits=teacher) if teacher is not None else self.seeds(h)
        return self.down(torch.tanh(h)).tanh()


def _host_step(
    owner: str, stage: SeedStage, failing: str, use_checkpoint: bool, monkeypatch
) -> tuple[dict[str, torch.Tensor], _Block]:
    """One training step through ``_Block`` (checkpointed, non-reentrant, or not) whose KD op
    (``failing="kd"``) or every seed's kernel (``"kernel"``) raises in the first forward only;
    the host's parameters after an SGD step, and every gradient."""
    block = _Block(owner, stage, _RaisesOnce if failing == "kernel" else nn.Linear)
    if failing == "kd":
        monkeypatch.setattr(kd_loss_module, "kd_kl_loss", _raising_once(kd_kl_loss))
    torch.manual_seed(0)
    x, teacher = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4)
    if owner == "slot":
        block.seeds.set_teacher_logits(teacher)
    seeds_teacher = teacher if owner == "seed" else None
    if use_checkpoint:
        out = checkpoint(block, x, seeds_teacher, use_reentrant=False)
    else:
        out = block(x, seeds_teacher)
    assert block.seeds.get_and_clear_kd_losses() is None  # the failed call's: none kept
    host = [p for n, p in block.named_parameters() if not n.startswith("seeds.")]
    before = block.down.weight.detach().clone()
    out.pow(2).sum().backward()  # the host's backward: a CheckpointError here before
    torch.optim.SGD(host, lr=0.1).step()
    assert not torch.equal(block.down.weight, before)  # the host stepped
    assert block.seeds.get_and_clear_kd_losses() is None  # none taken in the recompute
    for seed in block.all_seeds:  # charged once, in the first run, not again in the recompute
        assert seed.faults == 1
    grads = {f"{n}.grad": p.grad for n, p in block.named_parameters() if p.grad is not None}
    return {"x.grad": x.grad, **grads, **dict(block.named_parameters())}, block


@pytest.mark.parametrize("owner", ["slot", "seed"])
@pytest.mark.parametrize(
    ("failing", "stage"),
    [("kd", s) for s in ISOLATED] + [("kernel", s) for s in [*ISOLATED, S.ACTIVE]],
    ids=lambda v: getattr(v, "name", v),
)
def test_a_first_run_that_failed_once_is_the_path_its_recompute_takes(
    owner: str, failing: str, stage: SeedStage, monkeypatch
) -> None:
    """A seed's KD loss or kernel that raised in a checkpointed region's first forward (once:
    an allocation) was contained there, then ran in the recompute: the recompute saved other
    tensors than the first run, and the host's backward raised ``CheckpointError`` (or, where
    their shapes agreed, unpacked the wrong ones: other gradients). The recompute now takes the
    first run's path: the host steps, with the gradients of the same step run without the
    checkpoint."""
    runs = [_host_step(owner, stage, failing, ck, monkeypatch)[0] for ck in (False, True)]
    assert runs[0].keys() == runs[1].keys()
    for name, want in runs[0].items():
        torch.testing.assert_close(runs[1][name], want, rtol=0, atol=0, msg=name)


def test_a_kd_loss_saves_nothing_its_region_recomputes() -> None:
    """The KD loss's graph saved its tensors through the checkpoint's hooks: the seed-only KD
    backward, an engine call of its own, recomputed the whole region to unpack them (the
    host's forward ran three times a step, its side effects with it), and a stand-alone seed
    in the recompute kept a second KD loss, left to the next step's collect. The KD backward
    recomputes nothing now, and a recompute keeps no loss."""
    for owner in ("slot", "seed"):
        block = _Block(owner, S.GRAFTING, nn.Linear)
        calls: list[int] = []
        block.up.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        x, teacher = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4)
        if owner == "slot":
            block.seeds.set_teacher_logits(teacher)
        out = checkpoint(block, x, teacher if owner == "seed" else None, use_reentrant=False)
        kd = block.seeds.get_and_clear_kd_losses()
        assert kd is not None and len(calls) == 1
        kd.backward()
        assert len(calls) == 1  # no region recomputed for the KD backward
        assert all(p.grad is not None for s in block.all_seeds for p in s.kernel.parameters())
        out.sum().backward()
        assert len(calls) == 2 and block.seeds.get_and_clear_kd_losses() is None
