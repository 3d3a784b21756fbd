"""The seed guard under the features real training loops use (docs/design.md §6a): activation
checkpointing, autocast, double backward, and one bad batch. Each runs a layer of seeds in
every running stage beside the same computation without the feature (or without the guard)."""

from __future__ import annotations

import copy
import gc
import pickle

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kasmina.kd.config import KDConfig
from kasmina.kd.loss import seed_kd_loss
from kasmina.seeds.layer import KasminaLayer
from kasmina.stages import SeedStage
from tests.seeds.fault_helpers import RUNNING, Raises
from tests.seeds.helpers import walk

S = SeedStage
ISOLATED = [S.ISOLATED_INIT, S.GRAFTING, S.STABILIZATION]


class Block(nn.Module):
    """A residual block whose inner projection is the slot: ``x + down(relu(up(x)))``."""

    def __init__(self, kernels: dict[int, nn.Module], stages: list[SeedStage]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(8, 16)
        self.down = KasminaLayer(nn.Linear(16, 8), len(stages), 8 // len(stages))
        for k, stage in enumerate(stages):
            seed = self.down.seed(k)
            torch.manual_seed(10 + k)
            seed.attach_kernel(kernels.get(k) or nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
            walk(seed, stage)
        self.down.update_alpha_blending(3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("stage", RUNNING, ids=lambda s: s.name)
def test_activation_checkpointing_is_not_a_fault(stage: SeedStage, reentrant: bool) -> None:
    """Non-reentrant checkpointing stops its recompute by raising from inside the forward,
    maybe inside a seed's kernel: that is torch's control flow, not the kernel's failure. The
    recompute repeats the forward's path exactly, and every gradient is the plain run's."""
    plain = Block({}, [stage, stage])
    checkpointed = copy.deepcopy(plain)
    finished: list[int] = []  # the slot's forwards that ran to the end
    checkpointed.down.register_forward_hook(lambda *_: finished.append(1))
    x = torch.randn(5, 8, requires_grad=True)
    for _ in range(3):
        plain(x).pow(2).sum().backward()
        y = checkpoint(checkpointed, x, use_reentrant=reentrant)
        y.pow(2).sum().backward()
    assert [s.faults for s in checkpointed.down.seeds] == [0, 0]
    # The non-reentrant recompute stops inside the slot (its last saved tensor is there): the
    # guard let the stop through instead of finishing the slot on a fallback.
    assert len(finished) == (6 if reentrant else 3)
    assert [s.stage for s in checkpointed.down.seeds] == [stage, stage]
    want, got = _grads(plain), _grads(checkpointed)
    assert want.keys() == got.keys() and any(n.startswith("down.seeds") for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("fault", ["raises", "wrong width"])
@pytest.mark.parametrize("stage", RUNNING, ids=lambda s: s.name)
def test_a_fault_under_checkpointing_counts_once_per_step(
    stage: SeedStage, fault: str, reentrant: bool
) -> None:
    """The recompute meets the faulty kernel again (it raises, or answers the wrong shape): it
    falls back again (the same path), but the fault was recorded when the region first ran:
    one per step."""
    block = Block({1: Raises(4) if fault == "raises" else WrongWidth(4)}, [stage, stage])
    block.down.seed(1).fault_limit = 10
    x = torch.randn(5, 8, requires_grad=True)
    for step in range(3):
        checkpoint(block, x, use_reentrant=reentrant).pow(2).sum().backward()
        assert [s.faults for s in block.down.seeds] == [0, step + 1]
    assert x.grad is not None and torch.isfinite(x.grad).all()


class Residual(nn.Module):
    """``x + linear(x)``: under autocast the linear runs in bfloat16, the sum stays float32."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x)


@pytest.mark.parametrize("stage", RUNNING, ids=lambda s: s.name)
def test_autocast_kernels_stand_in_in_the_hosts_dtype(stage: SeedStage) -> None:
    """Under ``torch.autocast`` a kernel's Linear answers in bfloat16 where the host's output
    (a residual stream) is float32: the seed's output is cast to the host's dtype, no fault;
    outside autocast a wrong dtype is still a fault."""
    torch.manual_seed(2)
    layer = KasminaLayer(Residual(), 2, 4)
    for seed in layer.seeds:
        seed.attach_kernel(nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
        walk(seed, stage)
    layer.update_alpha_blending(3, 10)
    x = torch.randn(5, 8)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
        assert out.dtype == torch.float32
        out.pow(2).sum().backward()
        assert layer.poll_nonfinite() == []
    assert [s.faults for s in layer.seeds] == [0, 0]
    assert all(
        p.grad is not None and p.grad.dtype == torch.float32
        for s in layer.seeds
        for p in s.seed_parameters()
    )
    layer.seed(0).kernel.to(torch.bfloat16)  # no autocast: the kernel's own dtype is a fault
    layer(x)
    assert layer.seed(0).faults == 1 and "dtype" not in layer.seed(1).fault_log


@pytest.mark.parametrize("first", ["autocast", "plain"])
def test_the_recorded_dtype_is_the_hosts_own_under_autocast_too(first: str) -> None:
    """An fp32 host trained under bf16 autocast: whichever forward comes first, the slot
    records float32 (its parameters' dtype), so GERMINATE asks for the kernel that runs both
    under autocast and in an fp32 evaluation, not the autocast output's bfloat16."""
    torch.manual_seed(3)
    layer = KasminaLayer(nn.Linear(8, 8), 2, 4)
    x = torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=first == "autocast"):
        out = layer(x)
    assert out.dtype == (torch.bfloat16 if first == "autocast" else torch.float32)
    assert layer.chunk_spec() == (torch.Size([5, 4]), torch.float32, torch.device("cpu"))
    assert layer.contract_problem() is None
    half = KasminaLayer(nn.Linear(8, 8).to(torch.bfloat16), 2, 4)  # a bf16 host stays bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half(x.to(torch.bfloat16))
    assert half.chunk_spec()[1] == torch.bfloat16
    # A host without parameters has only autocast's dtype to show: the record waits for a
    # forward outside autocast.
    act = KasminaLayer(nn.GELU(), 2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        act(x.to(torch.bfloat16))
    assert act.output_contract is None
    act(x)
    assert act.chunk_spec() == (torch.Size([5, 4]), torch.float32, torch.device("cpu"))


def test_a_seed_kd_loss_over_no_classes_is_a_value_error() -> None:
    config = KDConfig()
    with pytest.raises(ValueError, match="non-empty last dim"):
        seed_kd_loss(config, torch.zeros(3, 0), torch.zeros(3, 0))


@pytest.mark.parametrize("stage", ISOLATED, ids=lambda s: s.name)
def test_double_backward_through_the_backward_guard(stage: SeedStage) -> None:
    """``create_graph=True`` (a gradient penalty) reaches the kernels through the guard: their
    gradients are differentiable, as without the guard, and the penalty's gradient is the
    same up to rounding (the one-node path's double backward orders its ops otherwise)."""
    results = []
    for guard in (True, False):
        torch.manual_seed(4)
        layer = KasminaLayer(nn.Linear(6, 8), 2, 4)
        for seed in layer.seeds:
            seed.attach_kernel(nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
            walk(seed, stage)
            seed.guard_backward = guard
        layer.update_alpha_blending(3, 10)
        params = [p for s in layer.seeds for p in s.seed_parameters()]
        x = torch.randn(5, 6)
        grads = torch.autograd.grad(layer(x).pow(2).sum(), params, create_graph=True)
        assert all(g.requires_grad for g in grads)
        sum(g.pow(2).sum() for g in grads).backward()
        results.append([p.grad.clone() for p in params])
    for guarded, plain in zip(*results, strict=True):
        torch.testing.assert_close(guarded, plain)


class Exp(nn.Module):
    """``exp(linear(x))``: finite for ordinary inputs, overflows on an outlier."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.linear(x))


@pytest.mark.parametrize("stage", RUNNING, ids=lambda s: s.name)
def test_one_bad_batch_does_not_poison_the_seed(stage: SeedStage) -> None:
    """An outlier row makes the kernel's output overflow: the host's chunk stands in, and
    the kernel's backward, run on the zero gradient of the output set aside, has NaN inside
    (``0 * inf``). Polled before the optimizer step, the seed's gradient is dropped, so its
    weights stay finite and it trains on from the next batch."""
    torch.manual_seed(0)
    layer = KasminaLayer(nn.Linear(4, 8), 2, 4)
    kernel = Exp(4)
    layer.seed(0).attach_kernel(kernel)
    walk(layer.seed(0), stage)
    layer.update_alpha_blending(3, 10)
    optimizer = torch.optim.SGD(kernel.parameters(), lr=1e-3)
    for step in range(3):
        torch.manual_seed(100 + step)
        x = torch.randn(16, 4)
        if step == 1:
            x[0] = 1e4
        optimizer.zero_grad()
        layer(x).pow(2).mean().backward()
        if step == 1:
            assert not torch.isfinite(kernel.linear.weight.grad).all()  # what it would step on
        assert layer.poll_nonfinite() == (["layer[0]"] if step == 1 else [])
        if step == 1:
            assert all(p.grad is None for p in kernel.parameters())
        else:
            assert all(p.grad is not None for p in kernel.parameters())
        optimizer.step()
        assert all(torch.isfinite(p).all() for p in kernel.parameters())
    assert layer.seed(0).faults == 1 and layer.seed(0).stage == stage


def _guarded_and_plain(stage: SeedStage) -> tuple[KasminaLayer, KasminaLayer]:
    """A two-seed layer in ``stage`` whose backward is guarded, and its copy unguarded."""
    torch.manual_seed(6)
    layer = KasminaLayer(nn.Linear(6, 8), 2, 4)
    for seed in layer.seeds:
        seed.attach_kernel(nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
        walk(seed, stage)
    layer.update_alpha_blending(3, 10)
    plain = copy.deepcopy(layer)
    for seed in plain.seeds:
        seed.guard_backward = False
    return layer, plain


@pytest.mark.parametrize("stage", ISOLATED, ids=lambda s: s.name)
def test_the_guarded_gradients_obey_the_outer_call(stage: SeedStage) -> None:
    """The backward guard hands the kernels' gradients to the host's autograd, so the outer
    call decides what happens to them: ``autograd.grad`` returns them and writes no ``.grad``;
    ``backward(inputs=...)`` without the seeds leaves them alone; post-accumulate hooks run
    once."""
    layer, plain = _guarded_and_plain(stage)
    params = [p for s in layer.seeds for p in s.seed_parameters()]
    x = torch.randn(5, 6)
    got = torch.autograd.grad(layer(x).pow(2).sum(), params)
    want = torch.autograd.grad(
        plain(x).pow(2).sum(), [p for s in plain.seeds for p in s.seed_parameters()]
    )
    assert all(p.grad is None for p in params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    layer(x).pow(2).sum().backward(inputs=list(layer.host.parameters()))
    assert all(p.grad is None for p in params)
    accumulated: list[int] = []
    params[0].register_post_accumulate_grad_hook(lambda _: accumulated.append(1))
    layer(x).pow(2).sum().backward()
    assert accumulated == [1] and all(p.grad is not None for p in params)


@pytest.mark.parametrize("stage", ISOLATED, ids=lambda s: s.name)
def test_a_tensor_hook_on_a_kernel_parameter_runs_once_under_the_guard(stage: SeedStage) -> None:
    """The guard captured the kernels' gradients with their tensor hooks, and the host's
    autograd ran them again as it delivered them: a hook that scales (clips, noises) the
    gradient gave the seed ``hook(hook(g))``. It runs once, as on the unguarded kernel, in a
    ``backward()`` and an ``autograd.grad`` alike, and stays registered."""
    layer, plain = _guarded_and_plain(stage)
    calls = {"guarded": 0, "plain": 0}

    def halve(which: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            calls[which] += 1
            return grad * 0.5

        return hook

    for module, which in ((layer, "guarded"), (plain, "plain")):
        for seed in module.seeds:
            for p in seed.seed_parameters():
                p.register_hook(halve(which))
    x = torch.randn(5, 6)
    layer(x).pow(2).sum().backward()
    plain(x).pow(2).sum().backward()
    assert calls["guarded"] == calls["plain"] == 4
    for a, b in zip(layer.seeds, plain.seeds, strict=True):
        for p, q in zip(a.seed_parameters(), b.seed_parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    params = [p for s in layer.seeds for p in s.seed_parameters()]
    got = torch.autograd.grad(layer(x).pow(2).sum(), params)
    assert calls["guarded"] == 8
    for g, p in zip(got, params, strict=True):
        torch.testing.assert_close(g, p.grad, rtol=0, atol=0)


def _distilling_layer(stage: SeedStage, kernels: dict[int, nn.Module] | None = None):
    torch.manual_seed(8)
    layer = KasminaLayer(nn.Linear(3, 4), 2, 2, kd_config=KDConfig(), layer_id="fc")
    for k, seed in enumerate(layer.seeds):
        seed.attach_kernel((kernels or {}).get(k) or nn.Linear(2, 2))
        walk(seed, stage)
    layer.update_alpha_blending(5, 10)
    return layer


@pytest.mark.parametrize("stage", ISOLATED, ids=lambda s: s.name)
def test_kd_under_activation_checkpointing(stage: SeedStage) -> None:
    """The recompute of a distilling slot takes the KD path again (the teacher logits set for
    the forward are kept for it), so the KD loss trains the seeds as without checkpointing."""
    grads = []
    for use_checkpoint in (False, True):
        layer = _distilling_layer(stage)
        inp = nn.Linear(3, 3)
        torch.manual_seed(9)
        x, teacher = torch.randn(5, 3, requires_grad=True), torch.randn(5, 4)
        layer.set_teacher_logits(teacher.clone())  # nothing else keeps this tensor alive
        if use_checkpoint:
            out = checkpoint(nn.Sequential(inp, layer), x, use_reentrant=False)
        else:
            out = layer(inp(x))
        kd = layer.get_and_clear_kd_losses()
        assert kd is not None and kd.requires_grad
        (out.sum() + kd).backward()
        assert layer.get_and_clear_kd_losses() is None  # the recompute took no second loss
        grads.append([p.grad.clone() for s in layer.seeds for p in s.seed_parameters()])
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("stage", ISOLATED, ids=lambda s: s.name)
def test_a_forward_without_a_graph_leaves_the_teacher_logits_to_the_training_forward(
    stage: SeedStage,
) -> None:
    """A forward under ``no_grad``/``inference_mode`` (an eval, or a server's request on
    another thread) took the pending teacher logits and stored a KD loss without a graph:
    the training forward then had no teacher, and ``backward`` of the collected loss raised."""
    layer = _distilling_layer(stage)
    x, teacher = torch.randn(5, 3), torch.randn(5, 4)
    layer.set_teacher_logits(teacher)
    with torch.no_grad():
        layer(x)
    with torch.inference_mode():
        layer(x, teacher_logits=teacher)  # given explicitly: still nothing to train
    assert layer.get_and_clear_kd_losses() is None
    layer(x)  # the training forward
    kd = layer.get_and_clear_kd_losses()
    assert kd is not None and kd.requires_grad
    kd.backward()
    assert all(p.grad is not None for s in layer.seeds for p in s.seed_parameters())
    layer(x)  # consumed: the next forward has no teacher
    assert layer.get_and_clear_kd_losses() is None


@pytest.mark.parametrize("stage", ISOLATED, ids=lambda s: s.name)
def test_a_non_finite_seed_does_not_poison_its_siblings_kd(stage: SeedStage) -> None:
    """The slot's KD student puts the host's chunk in place of a non-finite one, as its
    output does: the healthy seed's KD gradient is the one it gets beside a seed that passed
    the host through."""
    teacher = torch.randn(5, 4, generator=torch.Generator().manual_seed(10))
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(11))
    nan_layer = _distilling_layer(stage, {0: NaNKernel()})
    plain = _distilling_layer(stage, {0: NaNKernel()})
    plain.seed(0).detach_kernel()  # passes the host through: the reference
    results = []
    for layer in (nan_layer, plain):
        layer.set_teacher_logits(teacher)
        layer(x)
        kd = layer.get_and_clear_kd_losses()
        assert kd is not None and torch.isfinite(kd)
        kd.backward()
        results.append([p.grad for p in layer.seed(1).seed_parameters()])
    for got, want in zip(*results, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert nan_layer.poll_nonfinite() == ["fc[0]"]


class NaNKernel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * float("nan")


def _seed_kd(teacher: torch.Tensor, x: torch.Tensor, backward: bool = False) -> torch.Tensor:
    """The KD loss of fresh distilling seeds (ISOLATED_INIT) on ``x`` against ``teacher``;
    with ``backward``, after checking that every seed's gradient is finite."""
    layer = _distilling_layer(S.ISOLATED_INIT)
    layer.set_teacher_logits(teacher)
    layer(x)
    kd = layer.get_and_clear_kd_losses()
    assert kd is not None and torch.isfinite(kd)
    if backward:
        kd.backward()
        grads = [p.grad for s in layer.seeds for p in s.seed_parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    return kd.detach()


def test_a_non_finite_teacher_row_teaches_nothing() -> None:
    """A teacher row holding inf (an fp16 teacher's overflow) is masked: the loss is the one
    over the other rows, and every seed's gradient stays finite."""
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(12))
    teacher = torch.randn(5, 4, generator=torch.Generator().manual_seed(13))
    bad = teacher.clone()
    bad[0, 1] = float("inf")
    kd = _seed_kd(bad, x, backward=True)
    torch.testing.assert_close(kd, _seed_kd(teacher[1:], x[1:]))  # the other rows alone


def test_a_teacher_row_that_rules_classes_out_still_teaches() -> None:
    """A ``-inf`` teacher logit among finite ones is a class with probability 0 (a vocabulary
    mask): the row is kept, and the loss is the one the seeds' own KD op gives it. A row of
    only ``-inf`` has no distribution and is masked like a NaN row."""
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(14))
    teacher = torch.randn(5, 4, generator=torch.Generator().manual_seed(15))
    teacher[0, 1] = teacher[2, 0] = float("-inf")
    teacher[4] = float("-inf")
    kd = _seed_kd(teacher, x, backward=True)
    torch.testing.assert_close(kd, _seed_kd(teacher[:4], x[:4]))  # their -inf logits included
    other = _seed_kd(teacher[[1, 3]], x[[1, 3]])  # the ruled-out rows dropped: another loss
    assert not torch.allclose(kd, other)


# ------------------------------------------------- activation checkpointing, seeds in the region


class WrongWidth(nn.Module):
    """Saves a tensor for its backward, then answers in the wrong shape: a fault."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


@pytest.mark.parametrize("kernel", [Raises, WrongWidth])
@pytest.mark.parametrize("stage", ISOLATED, ids=lambda s: s.name)
def test_a_seed_quarantined_mid_step_under_checkpointing_leaves_the_backward_whole(
    stage: SeedStage, kernel: type[nn.Module]
) -> None:
    """The fault that reaches the limit quarantines the seed during the region's first run, so
    the recompute no longer calls it. What its kernel saved before it failed is not the
    checkpoint's to count: the backward ran (``CheckpointError``: one tensor short, before)."""
    block = Block({1: kernel(4)}, [stage, stage])
    x = torch.randn(5, 8, requires_grad=True)
    for _ in range(4):  # the third step's fault quarantines; the fourth passes the host through
        checkpoint(block, x, use_reentrant=False).pow(2).sum().backward()
    assert [s.stage for s in block.down.seeds] == [stage, S.QUARANTINE]
    assert block.down.seed(1).faults == 3
    assert x.grad is not None and torch.isfinite(x.grad).all()


class CountedRegion(nn.Module):
    """``slots`` slots behind a host BatchNorm, counting how often the region runs."""

    def __init__(self, slots: int, stage: SeedStage) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.BatchNorm1d(8)
        self.slots = nn.ModuleList(KasminaLayer(nn.Linear(8, 8), 2, 4) for _ in range(slots))
        for slot in self.slots:
            for seed in slot.seeds:
                seed.attach_kernel(nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
                if stage != S.DORMANT:
                    walk(seed, stage)
            slot.update_alpha_blending(3, 10)
        self.runs = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.runs += 1
        h = self.norm(x)
        for slot in self.slots:
            h = torch.relu(slot(h))
        return h


@pytest.mark.parametrize("stage", [S.DORMANT, *ISOLATED], ids=lambda s: s.name)
def test_a_checkpointed_region_runs_twice_per_step_whatever_its_seeds(stage: SeedStage) -> None:
    """Each isolated seed's island is backpropagated in an engine call of its own; had it saved
    its tensors through the checkpoint, each slot's island would re-run the whole region in the
    backward (1 + 1 + slots runs), and the host's BatchNorm would count the extra batches.
    (A recompute updates its running statistics once, with or without seeds: checkpointing's.)"""
    region = CountedRegion(3, stage)
    x = torch.randn(6, 8, requires_grad=True)
    for _ in range(2):
        checkpoint(region, x, use_reentrant=False).sum().backward()
    assert region.runs == 4  # each step: the forward, then one recompute
    assert int(region.norm.num_batches_tracked) == 4  # as checkpointing does without seeds
    dormant = CountedRegion(3, S.DORMANT)
    for _ in range(2):
        checkpoint(dormant, x, use_reentrant=False).sum().backward()
    torch.testing.assert_close(region.norm.running_mean, dormant.norm.running_mean)


@pytest.mark.parametrize("stage", ISOLATED, ids=lambda s: s.name)
def test_a_later_forward_without_a_teacher_recomputes_without_one(stage: SeedStage) -> None:
    """Gradient accumulation: teacher logits for the first micro-batch only. The second's
    recompute took the first's teacher (kept for a recompute until "the next forward that is
    not one"), so it took a KD path its forward had not: wrong gradients, or a
    ``CheckpointError``. Each micro-batch's gradients now equal the plain run's."""
    grads = []
    for use_checkpoint in (False, True):
        layer = _distilling_layer(stage)
        inp = nn.Linear(3, 3)
        model = nn.Sequential(inp, layer, nn.Tanh())
        torch.manual_seed(9)
        xs, teacher = torch.randn(2, 5, 3), torch.randn(5, 4)
        for i, x in enumerate(xs):
            if i == 0:
                layer.set_teacher_logits(teacher.clone())
            out = checkpoint(model, x, use_reentrant=False) if use_checkpoint else model(x)
            kd = layer.get_and_clear_kd_losses()
            assert (kd is not None) == (i == 0)
            (out.pow(2).sum() + (kd if kd is not None else 0)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, rtol=0, atol=0, msg=name)


def test_a_call_sat_out_under_checkpointing_counts_once() -> None:
    """Teacher logits that do not fit the call: the KD sits out once per call, not once more
    for each recompute."""
    layer = _distilling_layer(S.ISOLATED_INIT)
    model = nn.Sequential(nn.Linear(3, 3), layer, nn.Tanh())
    x = torch.randn(5, 3, requires_grad=True)
    for _ in range(3):
        layer.set_teacher_logits(torch.randn(7, 4))  # seven rows for a batch of five
        checkpoint(model, x, use_reentrant=False).sum().backward()
    assert layer.sat_out == {"kd": 3}


@pytest.mark.parametrize("stage", ISOLATED, ids=lambda s: s.name)
def test_a_checkpointed_kernel_that_saves_its_output_frees_it(stage: SeedStage) -> None:
    """The island keeps its saved tensors past the checkpoint's hooks; kept with its own
    ``grad_fn``, a Tanh's saved output was a reference cycle nothing freed: memory grew every
    step, backward or not."""
    block = Block({}, [stage, stage])  # Linear + Tanh kernels: Tanh saves its output
    x = torch.randn(5, 8, requires_grad=True)

    def live() -> int:
        gc.collect()
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    checkpoint(block, x, use_reentrant=False).pow(2).sum().backward()
    before = live()
    for _ in range(3):
        checkpoint(block, x, use_reentrant=False).pow(2).sum().backward()
        with torch.no_grad():
            checkpoint(block, x, use_reentrant=False)
    assert live() <= before


def test_a_reentrant_checkpoint_leaves_no_teacher_pending() -> None:
    """Its first run records no graph, so no forward takes the teacher logits; its recompute
    drops them, or the next forward outside a checkpoint would distil against them. The drop
    is counted as a KD sit-out and logged (it was silent: KD did nothing, step after step)."""
    layer = _distilling_layer(S.ISOLATED_INIT)
    model = nn.Sequential(nn.Linear(3, 3), layer)
    x = torch.randn(5, 3, requires_grad=True)
    layer.set_teacher_logits(torch.randn(5, 4))
    checkpoint(model, x, use_reentrant=True).sum().backward()
    assert layer._teacher_logits is None and layer.get_and_clear_kd_losses() is None
    assert layer.sat_out["kd"] == 1
    model(x)  # a later forward distils against nothing stale
    assert layer.get_and_clear_kd_losses() is None


def test_a_recompute_leaves_the_next_micro_batchs_teacher_alone() -> None:
    """A non-reentrant checkpoint whose forward ran without a teacher, and logits set for the
    next micro-batch before its backward: the recompute dropped them (and, once counted, called
    it a reentrant checkpoint's drop), so the next micro-batch distilled nothing. Only a
    reentrant checkpoint's recompute drops what its no-grad first run left; an ACTIVE slot,
    which does not distil, counts nothing when one does."""
    layer = _distilling_layer(S.GRAFTING)
    model = nn.Sequential(nn.Linear(3, 3), layer)
    x = torch.randn(5, 3, requires_grad=True)
    first = checkpoint(model, x, use_reentrant=False)  # micro-batch 1: no teacher
    layer.set_teacher_logits(torch.randn(5, 4))  # micro-batch 2's, before 1's backward
    first.sum().backward()
    assert layer.sat_out["kd"] == 0 and layer._teacher_logits is not None
    model(x)
    assert layer.get_and_clear_kd_losses() is not None  # micro-batch 2 distils
    active = _distilling_layer(S.ACTIVE)
    active.set_teacher_logits(torch.randn(5, 4))
    checkpoint(nn.Sequential(nn.Linear(3, 3), active), x, use_reentrant=True).sum().backward()
    assert active.sat_out["kd"] == 0 and active._teacher_logits is None


@pytest.mark.parametrize("stage", RUNNING, ids=lambda s: s.name)
def test_torch_func_grad_over_a_grown_model_gives_the_eager_gradients(stage: SeedStage) -> None:
    """``torch.func.grad`` of a ``functional_call`` (per-sample gradients, meta-learning) over
    a block whose seeds run: the guard takes the per-op path under the transform (its guard
    nodes are ``ctx``-form Functions, which torch.func refuses) and reads no sum on the host,
    and the gradients are autograd's on the same block."""
    block = Block({}, [stage, stage])
    x = torch.randn(5, 8)
    block(x).pow(2).sum().backward()
    want = _grads(block)
    params = {n: p.detach() for n, p in block.named_parameters()}

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(block, p, (x,)).pow(2).sum()

    got = torch.func.grad(loss)(params)
    assert any(n.startswith("down.seeds") for n in want)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-6, atol=1e-6)
    assert [s.faults for s in block.down.seeds] == [0, 0]


def test_a_first_forward_under_torch_func_leaves_the_model_copyable() -> None:
    """The mask of the seeds that did not run is cached per pattern; made first under
    ``torch.func.grad`` it was a functorch wrapper, kept after the transform: every later
    ``deepcopy``, ``AveragedModel`` or pickle of the model raised ("Cannot access storage of
    TensorWrapper"). Under a transform it is made fresh and never cached."""
    layer = KasminaLayer(nn.Linear(16, 8), 2, 4)  # seed 1 stays DORMANT: passed through
    layer.seed(0).attach_kernel(nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
    walk(layer.seed(0), S.ISOLATED_INIT)
    block = nn.Sequential(nn.Linear(8, 16), layer)
    x = torch.randn(5, 8)
    params = {n: p.detach() for n, p in block.named_parameters()}
    torch.func.grad(lambda p: torch.func.functional_call(block, p, (x,)).pow(2).sum())(params)
    assert not layer._masks
    copy.deepcopy(block)
    pickle.loads(pickle.dumps(block))
    torch.optim.swa_utils.AveragedModel(block)


class _Times(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_a_non_finite_seed_under_torch_func_falls_back_and_is_charged(transform: str) -> None:
    """The seeds' device flags live outside a ``torch.func`` transform: a forward under one
    updates them with the plain values (over a ``vmap``'s batch: any sample's fallback), and
    the poll charges the fault."""
    block = Block({1: nn.Sequential(nn.Linear(4, 4), _Times(float("nan")))}, [S.ACTIVE] * 2)
    plain = Block({1: nn.Identity()}, [S.ACTIVE] * 2)  # seed 1 gives the host's chunk
    x = torch.randn(5, 8)
    if transform == "grad":
        got = torch.func.grad(lambda v: block(v).pow(2).sum())(x)
        want = torch.func.grad(lambda v: plain(v).pow(2).sum())(x)
    else:
        got, want = (torch.func.vmap(m)(x) for m in (block, plain))
    # seed 1 fell back to the host's chunk
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert block.down._fault_flags.tolist() == [False, True]
    block.down.poll_nonfinite()
    assert [s.faults for s in block.down.seeds] == [0, 1]


@pytest.mark.parametrize("stage", ISOLATED, ids=lambda s: s.name)
def test_a_backward_through_a_stale_graph_is_no_fault_and_completes(
    stage: SeedStage,
) -> None:
    """``backward(retain_graph=True)``, an optimizer step, then a second backward through the
    same graph: autograd refuses the kernels' weights changed in place. That is the caller's
    doing, not the kernels': no fault is counted (three would quarantine healthy seeds), the
    host's backward completes, and the seeds' gradient from the stale graph is dropped."""
    kernels = {k: nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)) for k in (0, 1)}
    block = Block(kernels, [stage, stage])  # the second Linear saves its weight
    optimizer = torch.optim.SGD(block.down.seeds.parameters(), lr=0.1)
    loss = block(torch.randn(5, 8)).pow(2).sum()
    loss.backward(retain_graph=True)
    optimizer.step()
    grads = [p.grad.clone() for p in block.down.seeds.parameters()]
    loss.backward()
    assert [s.faults for s in block.down.seeds] == [0, 0]
    got = [p.grad for p in block.down.seeds.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(got, grads, strict=True))
    assert [s.stage for s in block.down.seeds] == [stage, stage]


class ClampsItself(nn.Module):
    """Clips its own weight in place at each forward (WGAN-style), then uses the weight in a
    way whose backward needs it as it was: a second forward makes the first graph stale."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.lin.weight.clamp_(-1.0, 1.0)
        return self.lin(x) * self.lin.weight.pow(2).mean()


@pytest.mark.parametrize("stage", ISOLATED, ids=lambda s: s.name)
@pytest.mark.parametrize("between", ["a second forward", "a forward without grad"])
def test_a_kernel_that_changes_its_own_weights_in_its_forward_is_contained(
    stage: SeedStage, between: str
) -> None:
    """The kernel's forward changed the weights an earlier graph saved (a second call before
    one backward, a validation forward between forward and backward): the host's backward
    completes, and the first graph's seed gradient is dropped."""
    block = Block({k: ClampsItself(4) for k in (0, 1)}, [stage, stage])
    x1, x2 = torch.randn(5, 8), torch.randn(5, 8)
    loss = block(x1).pow(2).sum()
    if between == "a second forward":
        loss = loss + block(x2).pow(2).sum()
    else:
        with torch.no_grad():
            block(x2)
    loss.backward()  # completes
    assert all(s.stage == stage for s in block.down.seeds)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("kernel", [Raises, WrongWidth], ids=["raises", "wrong width"])
def test_a_probe_fault_under_checkpointing_counts_once_per_step(
    kernel: type[torch.nn.Module], reentrant: bool
) -> None:
    """A COMPATIBILITY_CHECK seed's probe meets its faulty kernel (it raises, or answers the
    wrong shape) when the region first runs and again when a reentrant checkpoint recomputes
    it: one fault per step, the seed stays in COMPATIBILITY_CHECK below its fault limit, and
    the host's backward completes with finite gradients."""
    block = Block({1: kernel(4)}, [S.COMPATIBILITY_CHECK, S.COMPATIBILITY_CHECK])
    faulty = block.down.seed(1)
    faulty.fault_limit = 10
    x = torch.randn(5, 8, requires_grad=True)
    for step in range(3):
        checkpoint(block, x, use_reentrant=reentrant).pow(2).sum().backward()
        assert [s.faults for s in block.down.seeds] == [0, step + 1]
        assert len(faulty.fault_log) == step + 1
    assert [s.stage for s in block.down.seeds] == [S.COMPATIBILITY_CHECK] * 2
    assert block.down.seed(0).probe_result is not None  # the healthy seed was probed
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("stage", [S.ISOLATED_INIT, S.STABILIZATION], ids=lambda s: s.name)
def test_a_vmapped_forward_leaves_the_teacher_logits_to_the_training_forward(
    stage: SeedStage,
) -> None:
    """``kd_kl_loss`` refuses ``vmap``: a forward under one took the pending teacher and the
    seed KD raised from the host's forward. The teacher now stays for the training forward,
    and one given to the vmapped call sits out (counted)."""
    layer = _distilling_layer(stage)
    x, teacher = torch.randn(5, 3), torch.randn(5, 4)
    layer.set_teacher_logits(teacher)
    torch.func.vmap(layer)(x.unsqueeze(1))
    assert layer.get_and_clear_kd_losses() is None
    layer(x)  # the training forward distils
    kd = layer.get_and_clear_kd_losses()
    assert kd is not None and kd.requires_grad
    before = layer.sat_out["kd"]
    torch.func.vmap(lambda v: layer(v, teacher_logits=teacher[:1]))(x.unsqueeze(1))
    assert layer.sat_out["kd"] == before + 1


@pytest.mark.parametrize("probe", ["grad", "jvp"])
def test_a_probe_under_torch_func_leaves_the_pending_teacher_to_the_training_forward(
    probe: str,
) -> None:
    """Teacher logits set for the training step, then a functional probe (a ``grad`` whose
    loss leaves KD out, a ``jvp``) runs first: the probe's forward took them (its KD loss
    escaped without a graph, or raised under ``jvp``), and the training step distilled
    nothing. Only a forward as deep in the transforms as the call that set them takes them."""
    layer = _distilling_layer(S.ISOLATED_INIT)
    x, teacher = torch.randn(5, 3), torch.randn(5, 4)
    layer(x)
    params = {n: p.detach() for n, p in layer.named_parameters()}
    layer.set_teacher_logits(teacher)
    if probe == "grad":
        torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).sum())(params)
    else:
        torch.func.jvp(layer, (x,), (torch.ones_like(x),))
    assert layer.get_and_clear_kd_losses() is None
    layer(x)  # the training forward distils
    kd = layer.get_and_clear_kd_losses()
    assert kd is not None and kd.requires_grad


@pytest.mark.parametrize("stage", ISOLATED, ids=lambda s: s.name)
def test_seed_kd_inside_torch_func_grad_gives_the_eager_gradients(stage: SeedStage) -> None:
    """Functional training (``grad`` of a loss that collects the seeds' KD inside the
    transformed function) distils as eager training does: ``kd_kl_loss`` takes ``grad``."""
    layer = _distilling_layer(stage)
    x, teacher = torch.randn(5, 3), torch.randn(5, 4)
    layer.set_teacher_logits(teacher)
    out = layer(x)
    (out.sum() + layer.get_and_clear_kd_losses()).backward()
    want = {n: p.grad for n, p in layer.named_parameters() if n.startswith("seeds")}
    params = {n: p.detach() for n, p in layer.named_parameters()}

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        layer.set_teacher_logits(teacher)
        y = torch.func.functional_call(layer, p, (x,))
        return y.sum() + layer.get_and_clear_kd_losses()

    got = torch.func.grad(loss)(params)
    assert want and all(g is not None for g in want.values())
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("per_sample", [False, True], ids=["ensemble", "ensemble-x-sample"])
@pytest.mark.parametrize(
    "stage", [S.ISOLATED_INIT, S.STABILIZATION, S.ACTIVE], ids=lambda s: s.name
)
def test_an_ensemble_of_grown_models_vmaps_over_their_stacked_buffers(
    stage: SeedStage, per_sample: bool
) -> None:
    """PyTorch's model-ensembling recipe (``stack_module_state``, then ``vmap`` over a
    ``functional_call`` with the stacked parameters *and buffers*): the slot's fault flags
    are then the transform's own, and the fallback wrote the plain values over them outside
    the transform, which raised from the host's forward. Each member's test goes to its own
    flags now; a member whose seed is non-finite falls back alone."""
    members = [Block({}, [stage, stage]) for _ in range(3)]
    for k, member in enumerate(members):
        torch.manual_seed(20 + k)
        for p in member.parameters():
            p.data.normal_()
    members[2].down.seed(1).kernel[0].weight.data.fill_(float("nan"))  # its seed 1 falls back
    x = torch.randn(5, 8)
    want = torch.stack([m(x) for m in members])
    for m in members:
        m.down._finite_flags.fill_(True)
        m.down._fault_flags.fill_(False)
    params, buffers = torch.func.stack_module_state(members)

    def member(p, b):
        if per_sample:  # a vmap over the samples inside the ensemble's: its test per member
            call = torch.func.functional_call
            return torch.func.vmap(lambda xi: call(members[0], (p, b), (xi,)))(x)
        return torch.func.functional_call(members[0], (p, b), (x,))

    got = torch.func.vmap(member)(params, buffers)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert buffers["down._fault_flags"].tolist() == [[False, False], [False, False], [False, True]]
    assert members[0].down._fault_flags.tolist() == [False, False]  # the model's own untouched


@pytest.mark.parametrize(
    "stage", [S.ISOLATED_INIT, S.STABILIZATION, S.ACTIVE], ids=lambda s: s.name
)
def test_per_sample_gradients_of_an_ensemble_of_grown_models(stage: SeedStage) -> None:
    """``vmap(grad(...))`` per sample inside the ensemble's ``vmap``: ``grad`` wraps the
    stacked buffers too, and the fallback's flags, taken at that wrapper's level, kept the
    per-sample batch, which the in-place update refused from the host's forward. The gradients
    are each member's on each sample, and the member whose seed is non-finite falls back."""
    members = [Block({}, [stage, stage]) for _ in range(3)]
    for k, member in enumerate(members):
        torch.manual_seed(30 + k)
        for p in member.parameters():
            p.data.normal_()
    members[2].down.seed(1).kernel[0].weight.data.fill_(float("nan"))
    x = torch.randn(4, 8)
    call = torch.func.functional_call

    def loss(model: nn.Module, p, b, xi: torch.Tensor) -> torch.Tensor:
        return call(model, (p, b), (xi.unsqueeze(0),)).square().sum()

    want = []
    for m in members:
        p = {n: t.detach() for n, t in m.named_parameters()}
        b = {n: t.clone() for n, t in m.named_buffers()}
        want.append([torch.func.grad(loss, argnums=1)(m, p, b, xi) for xi in x])
    params, buffers = torch.func.stack_module_state(members)
    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=1), in_dims=(None, None, None, 0))
    got = torch.func.vmap(lambda p, b: per_sample(members[0], p, b, x))(params, buffers)
    for name, grads in got.items():
        expected = torch.stack([torch.stack([g[name] for g in w]) for w in want])
        torch.testing.assert_close(grads, expected, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert buffers["down._fault_flags"].tolist() == [[False, False], [False, False], [False, True]]
    assert members[0].down._fault_flags.tolist() == [False, False]


def test_the_slots_alpha_stays_float32_whatever_the_default_dtype() -> None:
    """A model built in float32 and attached while torch's default dtype was float64: the
    alpha of a chunk that does not blend was made in the default dtype, so a GRAFTING seed
    beside an isolated or ACTIVE one stacked a float64 alpha that the blend refused, from the
    host's forward. A ``double()`` or ``half()`` cast keeps it float32 too, as the seeds'."""
    torch.manual_seed(0)
    host = nn.Linear(8, 8)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        layer = KasminaLayer(host, 2, 4)
    finally:
        torch.set_default_dtype(previous)
    for k, stage in enumerate([S.GRAFTING, S.ISOLATED_INIT]):
        layer.seed(k).attach_kernel(nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
        walk(layer.seed(k), stage)
    layer.update_alpha_blending(3, 10)
    x = torch.randn(5, 8)
    layer(x).sum().backward()
    assert layer._one.dtype == torch.float32
    layer.double()
    assert layer._one.dtype == torch.float32
    layer(x.double()).sum().backward()
    assert [s.faults for s in layer.seeds] == [0, 0]


def test_a_compiled_ensemble_leaves_teacher_logits_set_outside_it() -> None:
    """Teacher logits set for the next training forward, then a compiled ``vmap`` ensemble of
    the model (``stack_module_state``, ``functional_call``): compiled, the transform's depth
    read 0, so the ensemble's forward took the logits and left a batched KD loss behind,
    which failed the next training step's collect (an internal assert of PyTorch's). The
    logits stay for the training forward, which distils as without the ensemble."""
    layer = _distilling_layer(SeedStage.ISOLATED_INIT)
    model = nn.Sequential(nn.Linear(3, 3), layer)
    x, teacher = torch.randn(5, 3), torch.randn(5, 4)
    members = [copy.deepcopy(model) for _ in range(2)]
    params, buffers = torch.func.stack_module_state(members)
    ensemble = torch.compile(
        torch.func.vmap(lambda p, b: torch.func.functional_call(model, (p, b), (x,))),
        backend="eager",
    )
    layer.set_teacher_logits(teacher)
    want = torch.stack([m(x) for m in members])
    torch.testing.assert_close(ensemble(params, buffers), want)
    assert layer._teacher_logits is teacher and layer.get_and_clear_kd_losses() is None
    model(x)
    kd = layer.get_and_clear_kd_losses()
    assert kd is not None and kd.requires_grad and not torch._C._functorch.is_batchedtensor(kd)


def test_a_float64_copy_with_a_kd_head_sits_kd_out() -> None:
    """A slot given a KD head in fp32, then converted with ``double()`` (a gradient check of a
    grown model): the fused head takes fp32 and 16-bit students only, and every forward with
    teacher logits raised from the slot. The KD sits out (counted); the forward runs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 11))
    layer = KasminaLayer(model[0], 2, 4, kd_config=KDConfig(temperature=2.0))
    model[0] = layer
    for seed in layer.seeds:
        seed.attach_kernel(nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
        seed.transition_to(SeedStage.ISOLATED_INIT)
    layer.set_kd_head(model[1].weight, model[1].bias)
    x, teacher = torch.randn(5, 4), torch.randn(5, 11)
    layer.set_teacher_logits(teacher)
    model(x)
    assert layer.get_and_clear_kd_losses() is not None
    model.double()
    layer.set_teacher_logits(teacher.double())
    out = model(x.double())
    assert out.dtype == torch.float64 and layer.get_and_clear_kd_losses() is None
    assert layer.sat_out["kd"] == 1
