"""Kernels users write and publish themselves, through GERMINATE and G3: what the published
module says (frozen parameters, tied weights, its input dtype, its control flow) holds in the
seed, or the kernel is refused with the reason."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import kasmina
from kasmina.control.auth import sign_command
from kasmina.control.builders import make_seed_command
from kasmina.manager.manager import KasminaKernelManager
from kasmina.seeds.gates import GateResult
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.stages import SeedStage
from kasmina.urza.publish import export_module, publish_artifact, publish_payload
from kasmina.utils.keyring import Keyring, generate_key
from tests.manager.helpers import PUBLISHER, SEED0, Host, make_config, run_command

S = SeedStage


class Grown:
    """A manager over ``Host`` in ``dtype`` whose seed ``out[0]`` may germinate ``module``."""

    def __init__(self, tmp_path: Path, module: nn.Module, dtype: torch.dtype) -> None:
        store = tmp_path / "urza"
        example = [torch.randn(4, 2, dtype=dtype)]
        self.artifact = publish_artifact(module, example, str(store), "bp", PUBLISHER).artifact_id
        self.keyring = Keyring({"ctl": generate_key()})
        config = make_config(tmp_path, store, performance_gate=0, latency_budget_ms=1e9)
        self.manager = KasminaKernelManager(config, keyring=self.keyring)
        self.model = Host().to(dtype)
        self.manager.attach(self.model, "out", 2, 2, host_lr=0.05, seed_lr=0.05, eps=1e-4)
        self.x = torch.randn(16, 6).to(dtype)
        self.y = torch.randint(0, 4, (16,))
        with torch.no_grad():
            self.model(self.x)

    def send(self, op: str) -> bool:
        command = make_seed_command(op, SEED0, self.artifact if op == "germinate" else "")
        return run_command(
            self.manager, sign_command(command, self.keyring, "ctl").SerializeToString()
        )

    def train(self, steps: int) -> None:
        for _ in range(steps):
            self.manager.backward(F.cross_entropy(self.model(self.x).float(), self.y))
            self.manager.step()

    def to_compatibility_check(self) -> GradientIsolatedSeed:
        """``out[0]`` germinated, trained through G2 and advanced to COMPATIBILITY_CHECK."""
        assert self.send("germinate")
        self.train(2)
        self.manager.end_epoch(0)
        assert self.send("advance")
        return self.manager.seed(SEED0)

    def g3(self) -> GateResult:
        self.to_compatibility_check()
        self.train(1)  # the probe G3 reads
        record = self.manager.require_registry()[SEED0]
        return self.manager.execution.evaluate_gate(record, S.GRAFTING)


class Wide(nn.Module):
    """About 50x the host layer's FLOPs per output element (G3's budget is 16x)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(2, 200), nn.Linear(200, 2)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.01 * self.fc2(torch.relu(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x)


class WideInFloat32(Wide):
    """``Wide`` on a bf16 input, computed in float32 with float32 parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch(x.float()).to(x.dtype)


class WideUnderCond(Wide):
    """``Wide`` behind ``torch.cond``, which the FLOP counter cannot count."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > -1e30, self.branch, self.branch, (x,))


def test_g3_counts_a_kernel_whose_parameters_are_not_in_its_input_dtype(tmp_path: Path) -> None:
    """The probe's input was cast to the kernel's parameter dtype before counting: a kernel
    signed for bf16 input with float32 parameters refused it, and G3 let a kernel 50x the
    host's cost through, "cost unchecked". It is counted on the dtype its signature takes."""
    result = Grown(tmp_path, WideInFloat32(), torch.bfloat16).g3()
    assert not result.passed and "> budget 16x" in result.reason


def test_g3_refuses_a_kernel_whose_cost_cannot_be_counted(tmp_path: Path) -> None:
    """``torch.cond`` made the FLOP counter raise, and G3 passed the kernel with its cost
    unchecked (logged only). A cost G3 cannot count cannot be held to the budget: refused."""
    result = Grown(tmp_path, WideUnderCond(), torch.float32).g3()
    assert not result.passed
    assert "could not be counted" in result.reason or "> budget 16x" in result.reason


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * self.b(torch.tanh(self.a(x)))


def test_publishing_refuses_tied_parameters() -> None:
    """A seed trains a copy of the loaded program, which holds tied weights (or a submodule
    used twice) as separate tensors: the seed trained a different model than the one published."""
    with pytest.raises(ValueError, match="'a.weight' and 'b.weight' are one tensor"):
        export_module(Tied(), [torch.randn(4, 2)])
    shared = nn.Sequential()
    layer = nn.Linear(2, 2)
    shared.add_module("first", layer)
    shared.add_module("again", layer)
    with pytest.raises(ValueError, match="'first.weight' and 'again.weight' are one tensor"):
        export_module(shared, [torch.randn(4, 2)])


class SharedMemory(nn.Module):
    """``b.weight`` tied to ``a.weight`` by ``.data`` (two Parameters over one storage), or a
    buffer ``ref`` over ``a.weight``'s memory."""

    def __init__(self, buffer: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)
        self.with_buffer = buffer
        if buffer:
            self.register_buffer("ref", self.a.weight.detach())
        else:
            self.b.weight.data = self.a.weight.data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x + 0.5 * self.b(torch.tanh(self.a(x)))
        return out + 0.1 * x @ self.ref if self.with_buffer else out


@pytest.mark.parametrize(
    ("buffer", "names"), [(False, "'a.weight' and 'b.weight'"), (True, "'a.weight' and 'ref'")]
)
def test_germinate_refuses_a_kernel_published_with_shared_memory(
    tmp_path: Path, buffer: bool, names: str
) -> None:
    """An artifact an older Kasmina published (its check saw one tensor under two names only)
    holds two of its tensors in one storage: GERMINATE copied it, and the seed trained tied
    weights apart, or the copy raised and the command failed as an "internal error: Runtime
    Error: Only Tensors created explicitly by the user...". Refused now with the reason."""
    grown = Grown(tmp_path, Wide(), torch.float32)
    saved = io.BytesIO()
    program = torch.export.export(SharedMemory(buffer), (torch.randn(4, 2),))
    torch.export.save(program, saved)
    store = str(tmp_path / "urza")
    grown.artifact = publish_payload(saved.getvalue(), store, "old", PUBLISHER).artifact_id
    assert not grown.send("germinate")
    reason = grown.manager.command_log[-1][-1]
    assert "internal error" not in reason
    assert f"artifact holds {names} in shared memory" in reason
    assert grown.manager.seed(SEED0).stage == S.DORMANT
    grown.manager.close()


class Scaled(nn.Module):
    """A trained linear residual times a fixed scale (published frozen)."""

    def __init__(self, train_linear: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.fc.requires_grad_(train_linear)
        self.scale = nn.Parameter(torch.full((2,), 0.5), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x) * self.scale


def test_a_parameter_published_frozen_stays_frozen(tmp_path: Path) -> None:
    """Every float parameter of a loaded kernel was set to require a gradient: a fixed scale
    or mask the user published frozen was trained. The published flag holds; a kernel with
    nothing to train is refused at GERMINATE."""
    grown = Grown(tmp_path / "a", Scaled(), torch.float32)
    assert grown.send("germinate")
    kernel = grown.manager.seed(SEED0).kernel
    params = dict(kernel.named_parameters())
    frozen = [name for name, p in params.items() if not p.requires_grad]
    assert len(frozen) == 1 and params[frozen[0]].shape == (2,)
    before = {name: p.detach().clone() for name, p in params.items()}
    grown.train(3)
    assert torch.equal(params[frozen[0]], before[frozen[0]])
    assert any(not torch.equal(p, before[n]) for n, p in params.items() if p.requires_grad)
    grown.manager.close()
    nothing = Grown(tmp_path / "b", Scaled(train_linear=False), torch.float32)
    assert not nothing.send("germinate")
    reason = nothing.manager.command_log[-1][-1]
    assert "has parameters, none that requires a gradient" in reason
    assert nothing.manager.seed(SEED0).stage == S.DORMANT
    nothing.manager.close()


class Masked(nn.Module):
    """A linear residual under a fixed mask published frozen, in a dtype that carries no
    gradient (a bool mask, an int64 one)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.mask = nn.Parameter(torch.tensor([1, 0]).to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * self.fc(x) * self.mask


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64])
def test_a_frozen_mask_of_a_non_float_dtype_germinates_and_stays_as_published(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    """The seed optimizer's registration refused every parameter not in fp32, fp16 or bf16, the
    frozen ones too: GERMINATE was refused ("parameters of seed 'out[0]' must be float32, ...")
    although a frozen mask is never stepped nor clipped. It is registered (claimed) and never
    touched: the seed trains under clipping to ACTIVE, and the mask survives save, load and
    merge as published."""
    grown = Grown(tmp_path, Masked(dtype), torch.float32)
    assert grown.send("germinate"), grown.manager.command_log[-1]
    seed = grown.manager.seed(SEED0)
    params = dict(seed.kernel.named_parameters())
    (mask,) = [p for p in params.values() if p.dtype == dtype]
    trained = {name: p.detach().clone() for name, p in params.items() if p.requires_grad}
    assert grown.manager.optimizers.owner_of(mask) == SEED0

    def train(steps: int) -> None:
        for _ in range(steps):
            loss = F.cross_entropy(grown.model(grown.x).float(), grown.y)
            grown.manager.backward(loss)
            grown.manager.step(grad_clip_norm=1.0)

    train(2)
    grown.manager.end_epoch(0)
    for steps in (1, 5, 1):  # G2, G3 (then grafting), G4
        assert grown.send("advance"), grown.manager.command_log[-1]
        train(steps)
    grown.manager.evaluate_seeds([(grown.x, grown.y)], loss_fn=F.cross_entropy)
    assert grown.send("advance") and seed.stage == S.ACTIVE, grown.manager.command_log[-1]
    train(2)
    assert seed.faults == 0 and mask.dtype == dtype and not mask.requires_grad
    assert torch.equal(mask, torch.tensor([1, 0]).to(dtype))
    assert all(not torch.equal(params[name], before) for name, before in trained.items())
    grown.model.eval()
    expected = grown.model(grown.x)
    path = kasmina.save(grown.model, tmp_path / "grown.kasmina")
    fresh = Host().eval()
    kasmina.load(path, fresh, publishers=PUBLISHER.trusted_publishers())
    assert torch.equal(fresh(grown.x), expected)
    merged = kasmina.merge(fresh)
    assert torch.allclose(merged(grown.x), expected)
    (merged_mask,) = [p for p in merged.parameters() if p.dtype == dtype]
    assert torch.equal(merged_mask, torch.tensor([1, 0]).to(dtype))
    grown.manager.close()


class LearnedConstant(nn.Module):
    """An output that is a view of a parameter (expanded over the batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(x.shape[0], 2)


def test_a_kernel_whose_output_views_a_parameter_germinates(tmp_path: Path) -> None:
    """The dry run's second probe asks for no backward, yet a view of a parameter requires a
    gradient even without grad mode: it called ``autograd.grad`` with no inputs and refused
    the kernel "in its backward"."""
    grown = Grown(tmp_path, LearnedConstant(), torch.float32)
    assert grown.send("germinate")
    grown.train(2)
    assert grown.manager.seed(SEED0).stage == S.ISOLATED_INIT
    grown.manager.close()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_g3_counts_a_kernel_after_the_model_changed_dtype(tmp_path: Path, dtype) -> None:
    """A model converted mid-run trains on; its kernels' parameters follow the conversion, not
    their signed input dtype, and G3 counts them on the dtype they now run in (counted on the
    signed dtype only, every seed grown before the conversion was refused as uncountable)."""
    from kasmina.urza.blueprints import ResidualMLP

    grown = Grown(tmp_path, ResidualMLP(2, 4), torch.float32)
    assert grown.send("germinate")
    grown.train(2)
    grown.manager.end_epoch(0)
    assert grown.send("advance")
    grown.model.to(dtype)
    grown.x = grown.x.to(dtype)
    grown.train(1)
    record = grown.manager.require_registry()[SEED0]
    result = grown.manager.execution.evaluate_gate(record, S.GRAFTING)
    assert result.passed and "cost 1x" in result.reason
    grown.manager.close()


class Bucketed(nn.Module):
    """A per-row lookup indexed by how many features exceed 4: fine on typical activations,
    an index out of range on an outlier batch."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table[(x > 4.0).long().sum(-1)]


def test_g3_refuses_a_kernel_whose_last_probe_raised(tmp_path: Path) -> None:
    """A probe that raised left no probe behind, and the manager's G3 read "no forward since"
    and probed random activations instead, which passed: a kernel that fails on the host's
    own activations went on to GRAFTING. The fault is the last probe now, until a clean one."""
    grown = Grown(tmp_path, Bucketed(), torch.float32)
    seed = grown.to_compatibility_check()
    with torch.no_grad():
        grown.model(grown.x)  # a clean probe
        grown.model(grown.x * 1e3)  # an outlier batch: the probe raises, a fault
    assert seed.faults == 1
    assert not grown.send("advance") and seed.stage == S.COMPATIBILITY_CHECK
    assert (
        "G3 refused: compatibility probe faulted: raised IndexError"
        in (grown.manager.command_log[-1][3])
    )
    with torch.no_grad():
        grown.model(grown.x)  # clean again: G3 reads this probe
    assert grown.send("advance") and seed.stage == S.GRAFTING
    grown.manager.close()


@pytest.mark.parametrize("failure", ["raises", "nan"])
def test_g3s_own_probe_in_a_refused_advance_charges_the_seed_nothing(
    tmp_path: Path, failure: str
) -> None:
    """With no forward since COMPATIBILITY_CHECK began, ADVANCE probes random activations in
    the command. That probe charged what it found as a training forward's fault: a count (at
    the limit, the refused command quarantined the seed) or the non-finite flag, which the
    next clean step then charged. It is G3's reason now, and the refusal changes no seed."""
    grown = Grown(tmp_path, Bucketed(), torch.float32)
    seed = grown.to_compatibility_check()
    seed.faults = seed.fault_limit - 1  # one more would quarantine it
    assert seed.kernel is not None

    def fail(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if failure == "raises":
            raise RuntimeError("the kernel fails")
        return out * float("nan")

    handle = seed.kernel.register_forward_hook(fail)
    before = seed.get_extra_state()
    assert not grown.send("advance")
    assert "G3 refused" in grown.manager.command_log[-1][3]
    assert seed.stage == S.COMPATIBILITY_CHECK and torch.equal(seed.get_extra_state(), before)
    assert seed.probe_result is None  # kept, the next ADVANCE was refused on it, unprobed
    handle.remove()
    assert grown.send("advance") and seed.stage == S.GRAFTING  # the kernel healthy again
    grown.train(1)  # a clean step: nothing left over to charge
    assert seed.faults == seed.fault_limit - 1 and seed.stage == S.GRAFTING
    grown.manager.close()
