"""attach/detach by module name, KasminaLayer with seeds in mixed stages, compile, persistence."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import itertools
import pickle
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import kasmina.ops.kd_loss
import kasmina.seeds.extra_state
import kasmina.seeds.forwarding
import kasmina.seeds.layer
from kasmina.kd.config import KDConfig
from kasmina.ops.alpha_blend import seed_blend
from kasmina.seeds.inject import attach, collect_kd_losses, detach, kasmina_layers
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.outputs import output_element
from kasmina.stages import SeedStage, StateColumn

S = SeedStage
PATH = [S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION, S.ACTIVE]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.encoder(x)))


def walk(seed, stage: SeedStage) -> None:
    for step in PATH[: PATH.index(stage) + 1]:
        seed.transition_to(step)


def kernel(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, width), nn.Tanh())


def test_attach_keeps_outputs_and_detach_restores_the_originals() -> None:
    model = MLP()
    x = torch.randn(3, 5)
    before = model(x)
    originals = (model.encoder[0], model.head)
    keys = set(model.state_dict())
    slots = attach(model, ["encoder.0", "head"], seeds_per_layer=2, chunk_size=4)
    assert [s.layer_id for s in slots] == ["encoder.0", "head"]
    assert model.encoder[0] is slots[0] and slots[0].host is originals[0]
    assert torch.equal(model(x), before)
    table = slots[0].state_table
    assert table is slots[1].state_table and table.num_seeds == 4
    assert [s.state_index for s in slots[1].seeds] == [2, 3]
    assert table.state_tensor[:, StateColumn.REGION_ID].tolist() == [0, 0, 1, 1]
    assert kasmina_layers(model) == slots
    assert detach(model) == slots
    assert model.encoder[0] is originals[0] and model.head is originals[1]
    assert set(model.state_dict()) == keys and torch.equal(model(x), before)


def test_package_exports_the_entry_points() -> None:
    import kasmina
    import kasmina.seeds.inject

    assert kasmina.attach is attach and kasmina.detach is detach  # not shadowed by a module
    assert kasmina.KasminaLayer is KasminaLayer
    assert {"GPUStateTensor", "GradientIsolatedSeed"} <= set(dir(kasmina))


def test_dormant_fast_path_returns_the_host_output_itself() -> None:
    host = nn.Linear(3, 4)
    out = torch.randn(2, 4)
    host.forward = lambda _x: out  # type: ignore[method-assign]
    layer = KasminaLayer(host, 2, 2)
    layer.seed(0).attach_kernel(nn.Linear(2, 2))  # a kernel alone does not run while DORMANT
    assert layer(torch.randn(2, 3)) is out


def test_targets_follow_peft_semantics_and_errors_leave_the_model_unchanged() -> None:
    model = MLP()
    # A string is a regex over full names (fullmatch): "encoder.[02]", not a suffix.
    assert [s.layer_id for s in attach(model, r"encoder\.[02]", 1, 8)] == ["encoder.0", "encoder.2"]
    detach(model)
    with pytest.raises(ValueError, match="matches no submodule"):
        attach(model, "2", 2, 4)  # a regex must match a whole name
    # A list entry is a full name or a dotted suffix.
    assert [s.layer_id for s in attach(model, ["2"], 2, 4)] == ["encoder.2"]
    with pytest.raises(ValueError, match="already attached"):
        attach(model, ["encoder.2"], 2, 4)
    with pytest.raises(ValueError, match="already attached"):
        attach(model, r"encoder\.2", 2, 4)
    detach(model)
    snapshot = dict(model.named_modules())
    for targets, spl, chunk, message in [
        ("missing", 2, 4, "'missing' matches no submodule"),
        (["head", "encodr.2"], 2, 4, r"'encodr.2'.*closest: \['encoder.2'"),  # a typo in a list
        (["encoder", "encoder.0"], 2, 4, "nested"),
        ("head", 3, 4, "12 != 8"),
        ([], 2, 4, "at least one"),
        ("(", 2, 4, "regular expression"),
        ("head", -2, -4, "seeds_per_layer must be an int >= 1, got -2"),
        ("head", True, 4, "seeds_per_layer must be an int >= 1, got True"),
        ("head", 2, 0, "chunk_size must be an int >= 1, got 0"),
        ("head", 2.0, 4, "seeds_per_layer must be an int >= 1, got 2.0"),
        ("head", torch.tensor(True), 4, "seeds_per_layer must be an int >= 1, got tensor"),
        ("head", torch.tensor(2.0), 4, "seeds_per_layer must be an int >= 1, got tensor"),
        ("head", np.bool_(True), 4, "seeds_per_layer must be an int >= 1, got "),
    ]:
        with pytest.raises(ValueError, match=message):
            attach(model, targets, spl, chunk)
        assert dict(model.named_modules()) == snapshot
    with pytest.raises(TypeError, match="targets must be a pattern .* got bytes"):
        attach(model, b"head", 2, 4)  # iterable: its bytes read as names 104, 101...
    assert dict(model.named_modules()) == snapshot
    assert attach(model, "head", torch.tensor(2), np.int64(4))[0].num_seeds == 2  # integers


def test_an_fx_trace_before_the_first_forward_records_nothing() -> None:
    """``torch.fx.symbolic_trace`` runs the forward on proxies: the slot records its contract
    at the first real forward, as if the trace had not happened."""
    model = MLP()
    (slot,) = attach(model, ["head"], 2, 4)
    torch.fx.symbolic_trace(model)
    assert slot.output_contract is None and slot.input_spec is None
    model(torch.randn(3, 5))
    assert slot.contract_problem() is None and slot.chunk_spec()[0] == (3, 4)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_jit_trace_before_the_first_forward_passes_its_check(mode: str) -> None:
    """``torch.jit.trace`` with its default check traces twice and compares: the slot recorded
    its contract in the first pass only, the graphs differed and the trace raised on a freshly
    attached model with every seed DORMANT. A trace records nothing (an eager forward does:
    the check's own, here), so the check passes and the traced model is the bare one's."""
    model, bare = MLP(), MLP()
    (slot,) = attach(model, ["head"], 2, 4)
    getattr(model, mode)(), getattr(bare, mode)()
    x = torch.randn(3, 5)
    with torch.no_grad() if mode == "eval" else contextlib.nullcontext():
        traced = torch.jit.trace(model, (x,))
    torch.testing.assert_close(traced(x), bare(x), rtol=0, atol=0)
    model(x)
    assert slot.contract_problem() is None and slot.chunk_spec()[0] == (3, 4)


@pytest.mark.parametrize("stage", [SeedStage.GRAFTING, SeedStage.STABILIZATION])
def test_jit_trace_of_a_blending_seed_matches_eager(stage: SeedStage) -> None:
    """``torch.jit.trace`` takes the per-op path (the one-node graft cannot be traced). Traced
    under ``no_grad`` (the usual way for inference), the blend recorded ``lerp(out=...)``,
    which the traced model then ran with grad and autograd refused."""
    model = MLP()
    (slot,) = attach(model, ["head"], 2, 4)
    x = torch.randn(3, 5)
    model(x)
    seed = slot.seeds[0]
    seed.attach_kernel(kernel(4, 1))
    walk(seed, stage)
    slot.update_alpha_blending(3, 10)
    with warnings.catch_warnings():  # the tracer's notes on Python values it bakes in
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, (x,), check_trace=False)
        with torch.no_grad():
            for_inference = torch.jit.trace(model, (x,), check_trace=False)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)
    out = for_inference(x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    out.sum().backward()


@pytest.mark.parametrize("stage", [SeedStage.ISOLATED_INIT, SeedStage.GRAFTING])
def test_a_copy_between_a_kd_forward_and_its_backward_leaves_the_step_to_the_original(
    stage: SeedStage,
) -> None:
    """``deepcopy`` (or pickle) while a seed's KD loss waits for the step's backward: the copy
    starts without it (it could not copy a graph), and the original still hands it over."""
    model = MLP()
    (slot,) = attach(model, ["head"], 2, 4, kd_config=KDConfig())
    x = torch.randn(3, 5)
    model(x)
    seed = slot.seeds[0]
    seed.attach_kernel(kernel(4, 1))
    walk(seed, stage)
    slot.set_teacher_logits(torch.randn(3, 8))
    model(x)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert collect_kd_losses(copied) is None
        torch.testing.assert_close(copied(x), model(x), rtol=0, atol=0)
    loss = collect_kd_losses(model)
    assert loss is not None and loss.requires_grad


def test_seed_counts_may_be_integers_of_another_library() -> None:
    np = pytest.importorskip("numpy")
    slots = attach(MLP(), ["head"], np.int64(2), np.int32(4))
    assert (slots[0].num_seeds, slots[0].chunk_size) == (2, 4)
    assert type(slots[0].num_seeds) is int


def test_slot_reads_through_to_the_wrapped_module() -> None:
    model = MLP()
    head = model.head
    slot = attach(model, ["head"], 2, 4)[0]
    assert model.head.weight is head.weight and model.head.out_features == 8
    assert slot.in_features == 8 and slot.bias is head.bias
    with pytest.raises(AttributeError):
        _ = slot.no_such_attribute
    assert "weight" not in dict(slot.named_parameters(recurse=False))  # not re-registered


def test_a_parametrized_weight_assigned_through_the_slot_is_set_on_the_host() -> None:
    """A parametrized ``weight`` is a property of the host's class, not an entry of its
    ``_parameters``: assigned through the slot it was stored on the slot, which then read it
    back while the host kept its old weight (and ``functional_call`` left such a copy)."""
    model = MLP()
    torch.nn.utils.parametrizations.weight_norm(model.head)
    bare = copy.deepcopy(model)
    attach(model, ["head"], 2, 4)
    new = torch.randn(8, 8)
    model.head.weight = new
    bare.head.weight = new  # the parametrization's right_inverse, on both
    assert "weight" not in model.head.__dict__
    assert torch.equal(model.head.weight, bare.head.weight)
    assert torch.equal(model.head.host.weight, bare.head.weight)
    x = torch.randn(3, 5)
    assert torch.equal(model(x), bare(x))
    other = torch.randn(8, 8)
    got = torch.func.functional_call(model, {"head.weight": other}, (x,))
    assert torch.equal(got, torch.func.functional_call(bare, {"head.weight": other}, (x,)))
    assert "weight" not in model.head.__dict__ and torch.equal(model(x), bare(x))


def test_a_slot_on_a_container_is_not_one_so_a_parent_cannot_skip_its_seeds() -> None:
    class Iterating(nn.Module):  # a parent that runs its stage's children itself
        def __init__(self) -> None:
            super().__init__()
            self.stage = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.stage:
                x = block(x)
            return x

    model = Iterating()
    last = model.stage[-1]
    attach(model, ["stage"], 2, 4)
    with pytest.raises(TypeError, match="not iterable"):  # not a silent run without the seeds
        model(torch.randn(2, 4))
    for reach in (lambda: model.stage[-1], lambda: list(model.stage)):
        with pytest.raises(TypeError):
            reach()
    assert model.stage.host[-1] is last  # the children, through the host
    assert len(model.stage) == 3  # which runs none of them


def test_pruning_aimed_at_a_slot_is_refused_before_it_changes_anything() -> None:
    """``prune`` on the slot read the host's weight through it, registered it on the slot as
    ``weight_orig``, then failed with a bare ``KeyError``: the slot was left holding a second
    copy of the host's weight, a ``state_dict`` key no fresh slot has (strict loads failed)."""
    from torch.nn.utils import prune

    model = MLP()
    attach(model, "head", 2, 4)
    keys = list(model.state_dict())
    for name in ("weight", "bias"):
        with pytest.raises(ValueError, match="apply it to slot.host"):
            prune.l1_unstructured(model.head, name, 0.5)
    assert list(model.state_dict()) == keys and not model.head._forward_pre_hooks
    prune.l1_unstructured(model.head.host, "weight", 0.5)  # as the message says
    assert "head.host.weight_mask" in model.state_dict()


REPARAMETRIZATIONS = {
    "weight_norm": lambda m: nn.utils.weight_norm(m),
    "spectral_norm": lambda m: nn.utils.spectral_norm(m),
    "parametrizations.weight_norm": lambda m: nn.utils.parametrizations.weight_norm(m),
    "orthogonal": lambda m: nn.utils.parametrizations.orthogonal(m),
}


@pytest.mark.parametrize("how", list(REPARAMETRIZATIONS))
def test_a_reparametrization_aimed_at_a_slot_is_refused_as_pruning_is(how: str) -> None:
    """torch's hook-based ``weight_norm`` and ``spectral_norm`` on the slot took the weight out
    of the slot's ``_parameters`` and failed with a bare ``KeyError: 'weight'``; a
    parametrization claimed the slot "does not have" the ``weight`` that ``slot.weight``
    reads. Each is now the refusal pruning gets, the model unchanged."""
    reparametrize = REPARAMETRIZATIONS[how]
    model = MLP()
    (slot,) = attach(model, "head", 2, 4)
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="apply it to slot.host"):
        reparametrize(slot)
    assert list(model.state_dict()) == keys and not slot._forward_pre_hooks
    assert slot.weight is slot.host.weight and type(slot) is KasminaLayer
    reparametrize(slot.host)  # as the message says
    assert list(model.state_dict()) != keys


@pytest.mark.parametrize("how", ["parametrizations.weight_norm", "orthogonal"])
@pytest.mark.parametrize("held", ["bias", "weight"])
def test_a_parametrization_aimed_at_a_slot_is_refused_when_the_host_has_some_already(
    held: str, how: str
) -> None:
    """The refusal ran only while the host had no ``parametrizations``: with the host's bias
    parametrized, ``weight_norm(slot)`` got torch's "does not have a parameter, a buffer, or a
    parametrized element" for the ``weight`` that ``slot.weight`` reads, and with its weight
    parametrized the new parametrization was appended to the host's list through the slot. Each
    is refused as on a bare host, nothing changed; ordinary reads of ``slot.parametrizations``
    (``is_parametrized``, ``hasattr``) are the host's, as before."""
    from torch.nn.utils import parametrize

    reparametrize = REPARAMETRIZATIONS[how]
    model = MLP()
    (slot,) = attach(model, "head", 2, 4)
    assert not hasattr(slot, "parametrizations") and not parametrize.is_parametrized(slot)
    parametrize.register_parametrization(slot.host, held, nn.Identity())
    assert parametrize.is_parametrized(slot) and parametrize.is_parametrized(slot, held)
    assert slot.parametrizations is slot.host.parametrizations
    keys, lists = list(model.state_dict()), [len(p) for p in slot.host.parametrizations.values()]
    with pytest.raises(ValueError, match="apply it to slot.host"):
        reparametrize(slot)
    assert list(model.state_dict()) == keys and type(slot) is KasminaLayer
    assert [len(p) for p in slot.host.parametrizations.values()] == lists
    assert "parametrizations" not in slot._modules and not slot._forward_pre_hooks
    reparametrize(slot.host)  # as the message says
    assert parametrize.is_parametrized(slot.host, "weight")


def test_a_parametrization_not_recognised_on_the_slot_falls_to_torchs_own_refusal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The refusal knows torch's ``register_parametrization`` by its code: where it cannot
    (torch changed), nothing is refused by Kasmina, and torch's own error leaves the slot as
    it was."""
    monkeypatch.setattr(kasmina.seeds.forwarding, "_REGISTER_PARAMETRIZATION", None)
    model = MLP()
    (slot,) = attach(model, "head", 2, 4)
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match="does not have a parameter"):
        nn.utils.parametrizations.weight_norm(slot)
    assert list(model.state_dict()) == keys and type(slot) is KasminaLayer


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_conv_seeds_own_channel_chunks_and_chunk_dim_is_configurable() -> None:
    model = Conv()
    x = torch.randn(2, 3, 5, 7)
    with pytest.raises(ValueError, match="= 6 != 4 features of Conv2d along dim 1"):
        attach(model, "conv", 2, 3)
    # The channels written from the back (-3 of NCHW): the width was left to the first forward.
    with pytest.raises(ValueError, match="= 6 != 4 features of Conv2d along dim -3"):
        attach(model, "conv", 2, 3, chunk_dim=-3)
    for outside in (4, -5):  # past NCHW: refused at attach, as past a recorded output
        with pytest.raises(ValueError, match=f"chunk_dim {outside} is outside the 4-D output"):
            attach(model, "conv", 2, 2, chunk_dim=outside)
    slot = attach(model, "conv", 2, 2)[0]
    assert slot.chunk_dim == 1 and slot.seed(0).chunk_dim == 1
    host = model.conv.host(x)
    assert torch.equal(model(x), host)
    assert slot.output_contract == (host.shape, host.dtype, host.device)
    assert slot.chunk_spec()[0] == (2, 2, 5, 7)
    torch.manual_seed(3)
    slot.seed(1).attach_kernel(nn.Conv2d(2, 2, 1))
    walk(slot.seed(1), S.STABILIZATION)
    out = model(x)
    assert torch.equal(out[:, :2], host[:, :2])
    torch.testing.assert_close(out[:, 2:], slot.seed(1).kernel(host[:, 2:]))
    detach(model)
    width = attach(model, "conv", 7, 1, chunk_dim=-1)[0]  # the image width, when asked for
    model(x)
    assert width.contract_problem() is None and width.chunk_spec()[0] == (2, 4, 5, 1)
    detach(model)
    wrong = attach(model, "conv", 2, 3, chunk_dim=-1)[0]
    model(x)
    assert "7 features along dim -1" in wrong.contract_problem()


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.proj(x)
        return h, h.sum(-1)


def test_tuple_and_dataclass_outputs_graft_the_chosen_element_only() -> None:
    import dataclasses

    @dataclasses.dataclass
    class Out:
        hidden: torch.Tensor
        extra: torch.Tensor | None = None
        logits: torch.Tensor | None = None

    class DataOut(TupleOut):
        def forward(self, x: torch.Tensor) -> Out:  # type: ignore[override]
            h = self.proj(x)
            return Out(hidden=h, logits=h * 2)

    x = torch.randn(3, 4)
    for cls, index in [(TupleOut, 0), (DataOut, 1)]:
        model = nn.Sequential(cls())
        bare = model(x)
        slot = attach(model, ["0"], 2, 2, output_index=index)[0]
        assert slot.output_index == index
        model(x)
        assert slot.contract_problem() is None
        slot.seed(0).attach_kernel(kernel(2, 1))
        walk(slot.seed(0), S.STABILIZATION)
        out = model(x)
        if cls is TupleOut:
            assert isinstance(out, tuple) and torch.equal(out[1], bare[1])
            grafted, host = out[0], bare[0]
        else:
            assert (
                isinstance(out, Out) and out.extra is None and torch.equal(out.hidden, bare.hidden)
            )
            grafted, host = out.logits, bare.logits
        assert torch.equal(grafted[:, 2:], host[:, 2:])
        torch.testing.assert_close(grafted[:, :2], slot.seed(0).kernel(host[:, :2]))
    model = nn.Sequential(TupleOut())
    slot = attach(model, ["0"], 2, 2, output_index=5)[0]
    model(x)
    assert "element 5 of the host's tuple output" in slot.contract_problem()


def test_a_call_whose_output_has_no_element_at_output_index_gives_the_hosts_output() -> None:
    """A host whose output is shorter in some calls (attention weights only when asked for, a
    ``ModelOutput`` with its loss in training only) sits those calls out: the seeds' element is
    not there. The slot wrote its None back at ``output_index % len``, replacing the hidden
    state, and raised ``IndexError`` on a dataclass; the host's output is returned as it is."""

    @dataclasses.dataclass
    class Out:
        hidden: torch.Tensor
        weights: torch.Tensor | None = None

    class Block(nn.Module):
        def __init__(self, wrap: bool) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.proj, self.wrap = nn.Linear(4, 4), wrap

        def forward(self, x: torch.Tensor, weights: bool = True) -> tuple | Out:
            h = self.proj(x)
            parts = (h, h.softmax(-1)) if weights else (h,)
            return Out(*parts) if self.wrap else parts

    x = torch.randn(3, 4)
    for wrap in (False, True):
        model = Block(wrap)
        bare = model(x, weights=False)
        slot = KasminaLayer(model, 2, 2, output_index=1)
        slot(x)  # the contract, from a call with both
        slot.seed(0).attach_kernel(kernel(2, 1))
        walk(slot.seed(0), S.STABILIZATION)
        assert not torch.equal(output_element(slot(x), 1), output_element(model(x), 1))
        out = slot(x, weights=False)
        assert type(out) is type(bare) and torch.equal(output_element(out, 0), bare_hidden(bare))
        assert output_element(out, 1) is None


def bare_hidden(out: tuple | object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.hidden  # type: ignore[attr-defined]


def test_a_structseq_output_keeps_its_type_once_a_seed_runs() -> None:
    """A module returning ``torch.sort``'s or ``max(dim)``'s result (a structseq, not a
    namedtuple) got a plain tuple back once a seed ran, and the caller's ``.values`` raised."""

    class Sorted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.proj = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.return_types.sort:
            return torch.sort(self.proj(x), dim=-1)

    model = nn.Sequential(Sorted())
    x = torch.randn(3, 4)
    bare = model(x)
    slot = attach(model, ["0"], 2, 2)[0]
    model(x)
    slot.seed(0).attach_kernel(kernel(2, 1))
    walk(slot.seed(0), S.STABILIZATION)
    out = model(x)
    assert type(out) is type(bare) and torch.equal(out.indices, bare.indices)
    assert torch.equal(out.values[:, 2:], bare.values[:, 2:])
    torch.testing.assert_close(out.values[:, :2], slot.seed(0).kernel(bare.values[:, :2]))


def test_an_output_index_the_host_class_cannot_have_is_refused_leaving_the_model() -> None:
    """A Linear, Conv or Embedding returns one tensor and a MultiheadAttention a pair: an
    ``output_index`` past them is refused by ``attach``, as ``kasmina.load`` refuses it (else
    the slot's first forward with a running seed would raise)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(4, 4, 1), nn.MultiheadAttention(4, 1))
    snapshot = dict(model.named_modules())
    for target, index, message in [
        ("0", 1, "'0': output_index 1, but a Linear returns one tensor"),
        ("0", -1, "'0': output_index -1, but a Linear returns one tensor"),
        ("1", 1, "'1': output_index 1, but a Conv1d returns one tensor"),
        ("2", 2, "'2': output_index 2, but a MultiheadAttention returns a pair"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            attach(model, [target], 2, 2, output_index=index)
        assert dict(model.named_modules()) == snapshot
    (slot,) = attach(model, ["2"], 2, 2, output_index=-2)
    assert slot.output_index == -2


def test_the_width_check_of_an_attention_module_follows_output_index() -> None:
    """A MultiheadAttention declares ``embed_dim`` for its output (element 0, or -2), not for
    its weights ``[B, L, S]`` (element 1, or -1): their width is the first forward's."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.mha(x, x, x)

    x = torch.randn(2, 6, 8)  # weights [2, 6, 6]: 2 seeds x 3 over the keys
    for index in (1, -1):
        model = Net()
        (slot,) = attach(model, ["mha"], 2, 3, output_index=index)
        model(x)
        assert slot.output_contract[0] == (2, 6, 6) and slot.contract_problem() is None
        model = Net()
        (slot,) = attach(model, ["mha"], 2, 4, output_index=index)  # not declared: recorded
        model(x)
        assert "has 6 features along dim -1" in slot.contract_problem()
    for index in (0, -2):
        with pytest.raises(ValueError, match=re.escape("2 seeds x chunk 3 = 6 != 8 features")):
            attach(Net(), ["mha"], 2, 3, output_index=index)
        assert attach(Net(), ["mha"], 2, 4, output_index=index)


def test_a_slot_deletes_the_hosts_attributes_where_it_writes_them() -> None:
    """A slot read and wrote its host's plain attributes but did not delete them: ``hasattr``
    said True and ``del slot.note`` raised AttributeError. A delete goes where a write goes."""
    model = MLP()
    model.head.note = "host's"
    (slot,) = attach(model, ["head"], 2, 4)
    assert slot.note == "host's"
    del slot.note
    assert not hasattr(slot, "note") and not hasattr(slot.host, "note")
    slot.mine = 1  # not the host's: the slot's own, written and deleted there
    assert "mine" in vars(slot) and not hasattr(slot.host, "mine")
    del slot.mine
    assert not hasattr(slot, "mine")
    with pytest.raises(AttributeError):
        del slot.note


def test_a_slot_registers_buffers_on_its_host_as_the_bare_module_does() -> None:
    """``register_buffer`` was the slot's own: a name the host holds raised KeyError (the read
    forwarding made it an existing attribute), and a new buffer was one the host's forward
    never saw and ``detach`` dropped."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    (slot,) = attach(model, ["1"], 2, 2)
    slot.register_buffer("running_mean", torch.full((4,), 7.0))
    slot.register_buffer("mask", torch.ones(4), persistent=False)
    assert torch.equal(slot.host.running_mean, torch.full((4,), 7.0))
    assert slot.mask is slot.host.mask and "mask" not in slot._buffers
    assert "1.host.running_mean" in model.state_dict() and "1.host.mask" not in model.state_dict()
    own = slot._finite_flags
    slot.register_buffer("_finite_flags", own.clone())  # the slot's own stays the slot's
    assert "_finite_flags" in slot._buffers and not hasattr(slot.host, "_finite_flags")
    detach(model)
    assert torch.equal(model[1].running_mean, torch.full((4,), 7.0)) and hasattr(model[1], "mask")


def test_a_slot_built_directly_checks_output_index_and_takes_its_hosts_mode() -> None:
    """The constructor owns both checks ``attach`` and ``kasmina.load`` rely on, so a slot a
    user builds around a host (as the tests and PEFT-style code do) behaves the same."""
    with pytest.raises(ValueError, match=re.escape("'fc': output_index 1, but a Linear")):
        KasminaLayer(nn.Linear(4, 4), 2, 2, output_index=1, layer_id="fc")
    block = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    block.eval()
    block[1].train()  # a host in mixed modes on purpose keeps them
    slot = KasminaLayer(block, 2, 2)
    assert not slot.training and not any(seed.training for seed in slot.seeds)
    assert (block.training, block[0].training, block[1].training) == (False, False, True)
    assert KasminaLayer(nn.Linear(4, 4), 2, 2).training  # a training host, a training slot


@pytest.mark.parametrize("embargo", [2**31, -1])
def test_attach_refuses_an_embargo_the_state_table_cannot_hold(embargo: int) -> None:
    model = MLP()
    with pytest.raises(ValueError, match="embargo_epochs .* is not an int in"):
        attach(model, ["head"], 2, 4, embargo_epochs=embargo)
    assert not kasmina_layers(model)


def test_attach_names_an_argument_of_the_wrong_type() -> None:
    """Each reached deep before: 'int' object is not iterable, 'dict' object has no attribute
    'enabled', 'Tensor' object has no attribute 'num_seeds', and for a model of None (as
    ``manager.attach`` passes it on) 'NoneType' object has no attribute 'named_modules'."""
    model = MLP()
    with pytest.raises(TypeError, match="attach wraps submodules of an nn.Module, got NoneType"):
        attach(None, ["head"], 2, 4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="targets must be a pattern .* got int"):
        attach(model, 0, 2, 4)  # type: ignore[arg-type]
    assert len(attach(copy.deepcopy(model), (n for n in ["head"]), 2, 4)) == 1  # any iterable
    with pytest.raises(TypeError, match=r"kd_config must be a KDConfig or None, got dict"):
        attach(model, ["head"], 2, 4, kd_config={"temperature": 2.0})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="state must be a GPUStateTensor or None, got Tensor"):
        attach(model, ["head"], 2, 4, state=torch.zeros(2, 10))  # type: ignore[arg-type]
    assert not kasmina_layers(model)


def test_a_second_attach_onto_a_shared_table_takes_the_rows_after_the_first() -> None:
    """Slots of two widths under one table (one manager): ``attach(..., state=table)`` twice.
    The second numbered its rows from 0 again, so its seeds shared rows with the first's: a
    GERMINATE of one moved the other, kernel-less, to ISOLATED_INIT. It now follows them, and
    a table too small for both says so."""
    from kasmina.seeds.table import GPUStateTensor

    model, table = MLP(), GPUStateTensor(6, torch.device("cpu"))
    first = attach(model, ["head"], 2, 4, state=table)
    second = attach(model, ["encoder.2"], 4, 2, state=table)
    rows = [s.state_index for layer in (*first, *second) for s in layer.seeds]
    assert rows == list(range(6))
    regions = table.state_tensor[:, StateColumn.REGION_ID].tolist()
    assert regions == [0, 0, 1, 1, 1, 1]
    second[0].seed(0).transition_to(SeedStage.ISOLATED_INIT)
    assert [s.stage for s in first[0].seeds] == [SeedStage.DORMANT] * 2
    with pytest.raises(ValueError, match="hold rows up to 6, and attach needs 2 more"):
        attach(model, ["encoder.0"], 2, 4, state=table)


def test_attach_on_a_shared_table_skips_the_rows_of_seeds_outside_the_model() -> None:
    """The rows of a shared table went by the model's slots alone, so ``attach(..., state=T)``
    after a ``detach`` (or onto another model) put its "DORMANT" seeds on rows still ACTIVE:
    an untrained kernel went live with no lifecycle, GERMINATE (-> ISOLATED_INIT) was illegal,
    and the detached seeds mirrored the new ones. A new seed now gets a row no seed follows
    and in DORMANT; a table with none left refuses, changing nothing."""
    from kasmina.seeds.table import GPUStateTensor

    model, table = MLP(), GPUStateTensor(6, torch.device("cpu"))
    (old,) = attach(model, ["head"], 2, 4, state=table)
    old.seed(0).attach_kernel(kernel(4, 1))
    walk(old.seed(0), S.ACTIVE)
    detach(model)
    (new,) = attach(model, ["head"], 2, 4, state=table)
    assert [s.state_index for s in new.seeds] == [2, 3]
    assert new.stages() == [S.DORMANT] * 2 and old.stages() == [S.ACTIVE, S.DORMANT]
    new.seed(0).attach_kernel(kernel(4, 2))
    new.seed(0).transition_to(S.ISOLATED_INIT)  # raised ACTIVE -> ISOLATED_INIT
    assert old.stages() == [S.ACTIVE, S.DORMANT]
    other = MLP()  # another model on the same table follows the first one's rows too
    (third,) = attach(other, ["encoder.2"], 2, 4, state=table)
    assert [s.state_index for s in third.seeds] == [4, 5] and third.stages() == [S.DORMANT] * 2
    assert table.state_tensor[:, StateColumn.REGION_ID].tolist() == [0, 0, 1, 1, 2, 2]
    before, modules = table.state_tensor.clone(), dict(model.named_modules())
    with pytest.raises(ValueError, match="hold rows up to 6, and attach needs 2 more"):
        attach(model, ["encoder.0"], 2, 4, state=table)
    assert torch.equal(table.state_tensor, before) and dict(model.named_modules()) == modules


def test_attach_on_a_shared_table_does_not_depend_on_when_cycles_are_collected() -> None:
    """A detached slot held only by a reference cycle (a closed manager's registry is one)
    kept following its DORMANT rows until the next collection: the same attach got other rows,
    or was refused for a full table, by the collector's timing. It collects first."""
    import gc

    from kasmina.seeds.table import GPUStateTensor

    model, table = MLP(), GPUStateTensor(2, torch.device("cpu"))
    attach(model, ["head"], 2, 4, state=table)
    old = detach(model)  # the slots it took out
    cycle: list = [old]
    cycle.append(cycle)
    del old, cycle
    gc.disable()  # no automatic pass between here and the scan
    try:
        (new,) = attach(model, ["head"], 2, 4, state=table)
    finally:
        gc.enable()
    assert [s.state_index for s in new.seeds] == [0, 1] and new.stages() == [S.DORMANT] * 2


def test_a_manager_refuses_two_seeds_on_one_state_row(tmp_path) -> None:
    """Slots built by hand onto one row range of a shared table: refused at registration."""
    from kasmina.manager.manager import KasminaKernelManager
    from kasmina.seeds.table import GPUStateTensor
    from kasmina.utils.keyring import Keyring, generate_key
    from tests.manager.helpers import make_config

    model, table = MLP(), GPUStateTensor(2, torch.device("cpu"))
    model.head = KasminaLayer(model.head, 2, 4, state=table, layer_id="head")
    model.encoder[2] = KasminaLayer(model.encoder[2], 2, 4, state=table, layer_id="encoder.2")
    manager = KasminaKernelManager(
        make_config(tmp_path, tmp_path / "urza"), keyring=Keyring({"ctl": generate_key()})
    )
    with pytest.raises(ValueError, match=r"or state row 0"):
        manager.register(model, host_lr=0.01)
    manager.close()


def test_out_proj_of_multihead_attention_is_refused_with_the_reason() -> None:
    model = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    with pytest.raises(ValueError, match="never calls out_proj"):
        attach(model, ["self_attn.out_proj"], 2, 4)


class _Stack(nn.Module):
    """A decoder's shape: ``layers`` iterated in ``forward``, ``heads`` indexed, ``scales`` read."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 8)})
        self.scales = nn.ParameterList([nn.Parameter(torch.ones(8))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.heads["a"](x) * self.scales[0]


def test_a_slot_on_a_sequential_takes_child_writes_len_and_in_as_its_host() -> None:
    """Python looks ``slot[i] = m``, ``del slot[i]``, ``len`` and ``in`` up on the type, never
    through ``__getattr__``: on a slot around an nn.Sequential each raised TypeError
    (torchvision's ``model.classifier[-1] = nn.Linear(...)``). They are the host's, its
    TypeError included, and a slot is as true as its host (reading or iterating the children
    still raises: the test above). A child replaced through the slot is recorded again at the
    next call: of another width, its seeds sit out, the contract check naming it, and the
    host's output stands whole."""
    model = MLP()
    slot, head = attach(model, ["encoder", "head"], 2, 4)
    host = slot.host
    assert len(slot) == 3 and host[1] in slot and model.head not in slot
    assert bool(slot) and bool(head)

    def assign(m: nn.Module) -> None:
        m[0] = nn.ReLU()

    def delete(m: nn.Module) -> None:
        del m[0]

    for op in (len, lambda m: 0 in m, assign, delete):
        with pytest.raises(TypeError) as bare:
            op(head.host)
        with pytest.raises(TypeError, match=re.escape(str(bare.value))):
            op(head)
    x = torch.randn(3, 5)
    model(x)
    slot.seed(0).attach_kernel(kernel(4, 1))
    walk(slot.seed(0), S.ACTIVE)
    assert not torch.equal(slot(x), host(x))
    slot[-1] = nn.Linear(8, 6)
    assert host[-1].out_features == 6
    assert torch.equal(slot(x), host(x)) and slot.sat_out["seeds"] == 1
    assert "6 features" in slot.contract_problem()
    slot[-1] = nn.Linear(8, 8)
    assert not torch.equal(slot(x), host(x)) and slot.contract_problem() is None
    del slot[1]  # the ReLU
    assert len(slot) == 2 and isinstance(host[1], nn.Linear)


@pytest.mark.parametrize("target", ["layers", "heads", "scales"])
def test_a_container_without_a_forward_is_refused_with_the_reason(target: str) -> None:
    """A ModuleList, ModuleDict or ParameterList matched as a target was wrapped, and the
    model's own forward then raised at its first call ("'KasminaLayer' object is not
    iterable"): its parent iterates or indexes it, and a seed there could never run."""
    model = _Stack()
    with pytest.raises(ValueError, match="has no forward") as refused:
        attach(model, [target], 2, 4)
    assert not isinstance(getattr(model, target), KasminaLayer)
    if target == "layers":
        assert r"layers\.\w+" in str(refused.value)
        assert len(attach(model, r"layers\.\w+", 2, 4)) == 2  # what the refusal suggests
    assert model(torch.randn(3, 8)).shape == (3, 8)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize(
    ("target", "name", "chunk"), [("linear1", "weight", 8), ("self_attn", "in_proj_weight", 4)]
)
def test_a_live_seed_in_an_encoder_layer_leaves_its_hosts_tensors_as_they_are(
    target: str, name: str, chunk: int
) -> None:
    """While a seed ran, a slot inside nn.TransformerEncoderLayer read its host's tensors as a
    marked non-leaf view (to keep torch's fused path from skipping it): code for the bare
    module got no ``.grad``, no Parameter (``SGD([w])`` raised), and ``w.data = t`` missed
    the host. The seeds' hook keeps the layer's fused path off; only nn.TransformerEncoder's
    packing test, which looks at no hook, is still shown the view: a padded batch packed past
    a first-layer seed that trains reached the next layer's attention as a nested tensor
    needing grad, which it refuses outside its fast path."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2)  # packs a padded batch in inference
    (slot,) = attach(model, [f"layers.0.{target}"], 2, chunk)
    slot.seed(1).attach_kernel(kernel(chunk, 2))
    walk(slot.seed(1), S.GRAFTING)
    slot.seed(1).update_alpha_blending(3, 10)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    model(x).sum().backward()
    tensor = getattr(getattr(model.layers[0], target), name)  # as code for the bare model reads it
    assert tensor is getattr(slot.host, name) and tensor.grad is not None
    torch.optim.SGD([tensor], lr=0.1)
    model.eval().requires_grad_(False)  # a frozen host, the seed training, a padded batch
    slot.seeds.requires_grad_(True)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    model(x, src_key_padding_mask=pad)[~pad].sum().backward()
    assert slot.seed(1).kernel[0].weight.grad is not None
    tensor.data = torch.zeros_like(tensor)
    assert not getattr(slot.host, name).any()


@pytest.mark.parametrize("target", ["linear2", "self_attn"])
def test_transformer_encoder_fused_path_never_skips_a_live_seed(target: str) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        bare = model(x)
    slot = attach(model, [f"layers.0.{target}"], 2, 4)[0]
    assert slot.guards_fused_path
    with torch.no_grad():
        assert torch.equal(model(x), bare)  # DORMANT: the fused path, bit for bit
        name = "weight" if target == "linear2" else "in_proj_weight"
        assert type(getattr(slot, name)) in (torch.Tensor, nn.Parameter)
    torch.manual_seed(4)
    slot.seed(1).attach_kernel(kernel(4, 2))
    walk(slot.seed(1), S.STABILIZATION)
    with torch.no_grad():
        out = model(x)
        model.train()
        reference = model(x)  # the regular path, which calls every module
        model.eval()
    assert getattr(slot, name) is getattr(slot.host, name)  # the hook alone keeps it off
    assert not torch.allclose(out, bare)
    torch.testing.assert_close(out, reference)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("target", ["dropout1", "activation"])
def test_a_live_seed_on_a_module_the_fused_path_never_calls_still_runs(
    target: str, packed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fused encoder-layer path neither calls a Dropout or activation module nor reads a
    tensor of one: while a seed of a slot there runs, the layer takes the regular path anyway
    (dense, or on the batch ``nn.TransformerEncoder`` packed); with no seed running, the fused
    path comes back."""
    fused: list[int] = []
    native = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(
        torch, "_transformer_encoder_layer_fwd", lambda *a: fused.append(1) or native(*a)
    )
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        8, 2, 16, dropout=0.0, activation=nn.ReLU(), batch_first=True
    )
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=packed).eval()
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[False] * 5, [False, False, False, True, True]])
    kwargs = {"src_key_padding_mask": mask} if packed else {}
    with torch.no_grad():
        bare = model(x, **kwargs)
    width = 16 if target == "activation" else 8
    (slot,) = attach(model, [f"layers.0.{target}"], 2, width // 2)
    fused.clear()
    with torch.no_grad():
        assert torch.equal(model(x, **kwargs), bare)  # DORMANT: the fused path, bit for bit
    assert len(fused) == 2
    slot.seed(0).attach_kernel(kernel(width // 2, 4))
    walk(slot.seed(0), S.STABILIZATION)
    fused.clear()
    with torch.no_grad():
        out = model(x, **kwargs)
        model.train()
        reference = model(x, **kwargs)  # the regular path, which calls every module
        model.eval()
    valid = ~mask
    assert not torch.allclose(out[valid], bare[valid])  # the seed ran
    torch.testing.assert_close(out[valid], reference[valid])
    assert len(fused) == 1  # layer 0 took the regular path, layer 1 the fused one
    assert torch.equal(out[mask] == 0, torch.full_like(out[mask], packed, dtype=torch.bool))
    slot.seed(0).transition_to(S.HARVESTING)  # no seed runs: the fused path is back
    fused.clear()
    with torch.no_grad():
        assert torch.equal(model(x, **kwargs), bare)
    assert len(fused) == 2
    assert not slot.seeds._forward_pre_hooks


def four_stage_layer(kd: KDConfig | None = None) -> tuple[KasminaLayer, torch.Tensor]:
    torch.manual_seed(5)
    layer = KasminaLayer(nn.Linear(6, 8), 4, 2, kd_config=kd)
    for k, stage in enumerate([S.ISOLATED_INIT, S.GRAFTING, S.STABILIZATION, S.ACTIVE]):
        layer.seed(k).attach_kernel(kernel(2, 10 + k))
        walk(layer.seed(k), stage)
    layer.update_alpha_blending(3, 10, 2.0)
    return layer, torch.randn(3, 6)


def test_four_seeds_in_four_stages_in_one_forward(monkeypatch) -> None:
    layer, x = four_stage_layer()
    calls = []

    def counting_blend(*args, **kwargs):
        calls.append(args[2])
        return seed_blend(*args, **kwargs)

    monkeypatch.setattr(kasmina.seeds.layer, "seed_blend", counting_blend)
    w = torch.randn(3, 8)
    out = layer(x)
    (out * w).sum().backward()
    assert len(calls) == 1 and calls[0].shape == (4,)  # one blend, per-chunk alpha

    weight = layer.host.weight.detach().clone().requires_grad_()
    bias = layer.host.bias.detach().clone().requires_grad_()
    h = nn.functional.linear(x, weight, bias)
    k = [layer.seed(i).kernel for i in range(4)]
    a = layer.seed(1).alpha_value
    hc = h.split(2, dim=-1)
    ref = torch.cat(
        [
            hc[0],
            a * k[1](hc[1].detach()) + (1 - a) * hc[1].detach(),
            k[2](hc[2].detach()),
            k[3](hc[3]),
        ],
        dim=-1,
    )
    torch.testing.assert_close(out, ref)
    assert torch.equal(out[:, :2], h[:, :2])  # ISOLATED_INIT: exactly the host value
    (ref * w).sum().backward()
    grad = layer.host.weight.grad
    assert torch.equal(grad[:2], weight.grad[:2])  # host gradient as without the seed
    assert not grad[2:6].any()  # GRAFTING and STABILIZATION: nothing reaches the host
    torch.testing.assert_close(grad[6:], weight.grad[6:])  # ACTIVE: end to end
    assert grad[6:].abs().sum() > 0
    for i in range(4):
        assert all(
            p.grad is not None and p.grad.abs().sum() > 0 for p in layer.seed(i).seed_parameters()
        )
    # the ISOLATED_INIT seed learns from the same downstream gradient the host gets
    k0 = copy.deepcopy(k[0])
    k0.zero_grad(set_to_none=True)
    (k0(h[:, :2].detach()) * w[:, :2]).sum().backward()
    for p, q in zip(layer.seed(0).seed_parameters(), k0.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_layer_kd_trains_only_the_isolated_seeds() -> None:
    layer, x = four_stage_layer(KDConfig(temperature=1.5))
    model = nn.Sequential(layer)
    teacher = torch.randn(3, 8)
    layer.set_teacher_logits(teacher)
    model(x)
    loss = collect_kd_losses(model)
    assert loss is not None and collect_kd_losses(model) is None
    loss.backward()
    assert layer.host.weight.grad is None and layer.host.bias.grad is None
    for i in range(3):
        assert all(p.grad.abs().sum() > 0 for p in layer.seed(i).seed_parameters())
    assert all(p.grad is None for p in layer.seed(3).seed_parameters())  # ACTIVE: no KD
    layer(x, teacher_logits=teacher)
    assert layer.get_and_clear_kd_losses() is not None


def test_a_module_shared_under_two_names_is_refused_naming_them() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = self.b = nn.Linear(4, 4)  # one module, two attributes

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    blocks = nn.Sequential(*[nn.Linear(4, 4)] * 3)  # ``[block] * 3``: "1" and "2" are "0"
    for model, target in ((Twice(), ["b"]), (Twice(), "a|b"), (blocks, ["2"])):
        before = [type(m) for _, m in model.named_modules(remove_duplicate=False)]
        with pytest.raises(ValueError, match="one module registered under several names"):
            attach(model, target, 2, 2)
        assert [type(m) for _, m in model.named_modules(remove_duplicate=False)] == before


def test_a_module_inside_a_shared_block_is_one_slot_on_every_path() -> None:
    block = _Block(4)
    model = nn.Sequential(block, block)  # the block's one ``fc`` attribute, called twice
    (slot,) = attach(model, ["1.fc"], 2, 2)
    assert slot.layer_id == "0.fc" and model[0].fc is slot and model[1].fc is slot
    with pytest.raises(ValueError, match="'1.fc' is already attached"):
        attach(model, ["1.fc"], 2, 2)


class _TwoCalls(Conv):
    """``Conv``'s conv called batched and then on one unbatched sample (channels: dim 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean() + self.conv(x[0]).mean()


@pytest.mark.parametrize("stage", [S.ISOLATED_INIT, S.GRAFTING, S.ACTIVE])
def test_a_call_whose_output_does_not_fit_is_sat_out_by_the_seeds(stage, caplog) -> None:
    model = _TwoCalls()
    (slot,) = attach(model, ["conv"], 2, 2)
    x = torch.randn(2, 3, 6, 6)
    model(x)
    for k in range(2):
        torch.manual_seed(k)
        slot.seed(k).attach_kernel(nn.Sequential(nn.Conv2d(2, 2, 1), nn.Tanh()))
        walk(slot.seed(k), stage)
    slot.update_alpha_blending(3, 10)
    with caplog.at_level("DEBUG", logger="kasmina"):
        for _ in range(3):
            model(x).backward()
    assert [seed.faults for seed in slot.seeds] == [0, 0] and slot.sat_out["seeds"] == 3
    assert all(p.grad is not None for p in slot.seed(0).seed_parameters())
    warned = [r for r in caplog.records if "sat out call" in r.getMessage()]
    assert [r.levelname for r in warned] == ["WARNING", "DEBUG", "DEBUG"]  # bounded
    with torch.no_grad():  # the unbatched call is the bare conv's
        assert torch.equal(slot(x[0]), slot.host(x[0]))


class Loop(nn.Module):
    """One cell per token ``[B, T, F]``, then on the pooled ``[B, F]``: a module called twice
    with two shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cell(self.cell(x).mean(1))


def test_a_teacher_that_does_not_fit_a_call_skips_its_kd_not_the_step(caplog) -> None:
    model = Loop()
    (slot,) = attach(model, ["cell"], 2, 2, kd_config=KDConfig(temperature=2.0))
    model(torch.randn(3, 5, 4))
    for k in range(2):
        slot.seed(k).attach_kernel(kernel(2, k))
        walk(slot.seed(k), S.GRAFTING)
    slot.set_teacher_logits(torch.randn(3, 4))  # the model's output's shape: the second call's
    model(torch.randn(3, 5, 4)).sum().backward()
    kd = collect_kd_losses(model)  # the first call sits out and leaves them to the second
    assert kd is not None and kd.requires_grad and slot.sat_out == {"kd": 1}
    assert [seed.faults for seed in slot.seeds] == [0, 0]
    assert "teacher logits (3, 4) do not fit (3, 5, 4)" in caplog.text
    # Refused here, not in a forward: integers, and the layouts a dtype check let through
    # (sparse logits failed in the KD op's reduction, inside the user's forward).
    dense = torch.randn(3, 5, 4)
    nested = torch.nested.nested_tensor([torch.randn(5, 4), torch.randn(2, 4)])
    refused = [torch.randint(0, 4, (3, 4)), dense.to_sparse(), dense[0].to_sparse_csr(), nested]
    refused.append(dense.to(torch.float8_e4m3fn))  # floating point, but no KD op reads it
    whys = ["int64", "sparse_coo", "sparse_csr", "nested", "float8_e4m3fn"]
    for bad, why in zip(refused, whys, strict=True):
        with pytest.raises(ValueError, match=f"dense floating-point tensor, got .*{why}"):
            slot.set_teacher_logits(bad)
    # Logits handed to the call itself were never checked: anything else sits out, counted.
    for bad in (dense.to_sparse(), dense.long(), [1.0]):
        model.cell(torch.randn(3, 5, 4), teacher_logits=bad).sum().backward()
    assert slot.sat_out == {"kd": 4}  # (only the first sit-out of a kind is logged)
    slot.set_teacher_logits(torch.randn(3, 5, 4, dtype=torch.float64))  # read in fp32
    model(torch.randn(3, 5, 4)).sum().backward()
    assert collect_kd_losses(model).dtype == torch.float32


def test_a_slot_split_along_its_last_dimension_runs_its_seeds_at_any_rank() -> None:
    """The last dimension is the last at every rank: a slot that first saw ``[B, F]`` (a
    warm-up) runs its seeds on ``[B, T, F]`` calls (only a dim counted from the front, a conv's
    channels, needs the recorded rank)."""
    model = nn.Sequential(nn.Linear(4, 4))
    (slot,) = attach(model, ["0"], 2, 2)
    model(torch.randn(3, 4))
    for k in range(2):
        slot.seed(k).attach_kernel(kernel(2, k))
        walk(slot.seed(k), S.GRAFTING)
    slot.update_alpha_blending(3, 10)
    model(torch.randn(3, 5, 4)).sum().backward()
    assert slot.sat_out == {} and [seed.faults for seed in slot.seeds] == [0, 0]
    assert all(p.grad is not None for seed in slot.seeds for p in seed.seed_parameters())


def test_only_the_seeds_whose_signed_kernel_cannot_take_a_call_sit_it_out() -> None:
    """A kernel's signed input shape (an exported one's manifest) fixes its rank and sizes: a
    call it cannot take sits out for that seed only, and a plain module that merely has an
    ``input_shape`` attribute of its own is no signed kernel (a list there raised from every
    table change, an int from every forward)."""
    model = nn.Sequential(nn.Linear(4, 4))
    (slot,) = attach(model, ["0"], 2, 2)
    model(torch.randn(5, 4))
    signed = [kernel(2, 0), kernel(2, 1)]
    signed[0].signed_input_shape = (None, 2)  # any batch
    signed[1].signed_input_shape = (16, 2)  # exported on a static batch of 16
    for k in range(2):
        slot.seed(k).attach_kernel(signed[k])
        walk(slot.seed(k), S.ISOLATED_INIT)
    ran: list[int] = []
    for k in range(2):
        signed[k].register_forward_hook(lambda *_, k=k: ran.append(k))
    model(torch.randn(5, 4)).sum().backward()
    assert ran == [0] and slot.sat_out == {"seeds": 1}
    assert [seed.faults for seed in slot.seeds] == [0, 0]
    for bad in ([8, 2], 3, (2,)):  # not a signed shape: the kernel is called as any module
        other = nn.Sequential(nn.Linear(4, 4))
        (plain_slot,) = attach(other, ["0"], 2, 2)
        other(torch.randn(5, 4))
        plain = kernel(2, 2)
        plain.input_shape = bad
        plain_slot.seed(1).attach_kernel(plain)
        walk(plain_slot.seed(1), S.GRAFTING)
        other(torch.randn(5, 4)).sum().backward()
        assert plain_slot.sat_out == {} and plain_slot.seed(1).faults == 0


def test_a_slot_pickled_before_the_kernel_shapes_runs_its_seeds() -> None:
    (slot,) = attach(nn.Sequential(nn.Linear(4, 4)), ["0"], 2, 2)
    slot(torch.randn(3, 4))
    slot.seed(0).attach_kernel(kernel(2, 0))
    walk(slot.seed(0), S.GRAFTING)
    state = slot.__getstate__()
    del state["_kernel_shapes"], state["_teacher_depth"]  # as earlier versions pickled it
    seed_state = slot.seed(0).__getstate__()
    del seed_state["_loaded_draws"]
    slot.seed(0).__dict__.clear()
    slot.seed(0).__setstate__(seed_state)
    old = KasminaLayer.__new__(KasminaLayer)
    old.__setstate__(state)
    old.set_teacher_logits(torch.randn(3, 4))
    old(torch.randn(3, 4)).sum().backward()
    assert old.sat_out == {} and old.seed(0).faults == 0


@pytest.mark.parametrize("stage", [S.ISOLATED_INIT, S.GRAFTING])
def test_an_lstm_slot_passes_a_packed_sequence_through_while_its_seeds_run(stage) -> None:
    """Recorded on padded ``[B, T, F]`` batches, called later on a ``PackedSequence`` (batches
    of varying lengths): once a seed ran, that call raised ``TypeError`` from the host's forward
    instead of sitting out like any call that does not fit the seeds' chunks."""
    from torch.nn.utils.rnn import pack_padded_sequence

    model = nn.Sequential(nn.LSTM(6, 4, batch_first=True))
    (slot,) = attach(model, ["0"], 2, 2)
    x = torch.randn(3, 5, 6)
    model(x)  # recorded: [3, 5, 4]
    slot.seed(0).attach_kernel(kernel(2, 0))
    walk(slot.seed(0), stage)
    lengths = torch.tensor([5, 2, 4])
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, (h, _) = model(packed)
    expected, _ = slot.host(packed)
    assert torch.equal(out.data, expected.data) and slot.sat_out == {"seeds": 1}
    h.sum().backward()  # and trains on
    assert slot.seed(0).faults == 0
    model(x)[0].sum().backward()  # a padded call still runs the seed
    assert all(p.grad is not None for p in slot.seed(0).seed_parameters())


def test_non_finite_seed_in_a_layer_falls_back_per_chunk() -> None:
    layer, x = four_stage_layer()
    with torch.no_grad():
        layer.seed(1).kernel[0].weight.fill_(float("nan"))
        expected_chunk = layer.host(x)[:, 2:4]
    for _ in range(layer.seed(1).fault_limit):
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        assert torch.equal(out[:, 2:4], expected_chunk) and torch.isfinite(out).all()
        out.sum().backward()
        assert not layer.host.weight.grad[2:4].any()
        assert layer.poll_nonfinite() == ["layer[1]"]
    assert layer.seed(1).faults == layer.seed(1).fault_limit
    assert layer.stages() == [S.ISOLATED_INIT, S.QUARANTINE, S.STABILIZATION, S.ACTIVE]
    assert layer.poll_nonfinite() == []


def test_attached_model_state_dict_deepcopy_and_pickle_round_trip() -> None:
    model = MLP()
    slots = attach(model, "head", 2, 4)
    for k, seed in enumerate(slots[0].seeds):
        seed.attach_kernel(kernel(4, k))
    walk(slots[0].seed(0), S.GRAFTING)
    slots[0].update_alpha_blending(4, 10)
    x = torch.randn(3, 5)
    expected = model(x)

    twin = MLP()
    twin_slots = attach(twin, "head", 2, 4)
    for k, seed in enumerate(twin_slots[0].seeds):
        seed.attach_kernel(kernel(4, 50 + k))
    twin.load_state_dict(model.state_dict())
    assert twin_slots[0].stages() == [S.GRAFTING, S.DORMANT]
    assert torch.equal(twin(x), expected)

    clone = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (clone, loaded):
        assert torch.equal(other(x), expected)
        seed = kasmina_layers(other)[0].seed(0)
        assert seed.state_table is not slots[0].state_table
        seed.transition_to(S.HARVESTING)  # its own table, and its own observer still fires
        assert seed.kernel is None and slots[0].seed(0).stage is S.GRAFTING


def test_a_pickled_slot_charges_a_non_finite_seed_output_as_the_original_does() -> None:
    """Each seed's flags are views of its slot's; a pickle keeps no storage shared, so after
    ``pickle.loads`` the guard wrote the slot's flags and ``poll_nonfinite`` read the seeds':
    a NaN output was never charged and its gradient kept. A pickle that builds the slot before
    its seeds (one that reaches a seed first) links them at the slot's next use of its flags."""
    model, slot = _grafting(kernel_seed=0, step=4)
    x = torch.randn(3, 5)
    # A seed or a seeds list alone: its slot, reached through the table, is built before it.
    assert copy.deepcopy(slot.seed(0)).stage == S.GRAFTING
    assert [s.stage for s in pickle.loads(pickle.dumps(slot.seeds))] == [S.GRAFTING, S.DORMANT]
    with_a_seed_first = pickle.loads(pickle.dumps([slot.seed(1), model]))[1]  # linked later
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), with_a_seed_first):
        copied = kasmina_layers(clone)[0]
        seed = copied.seed(0)
        with torch.no_grad():
            seed.kernel[0].weight.fill_(float("nan"))
        clone(x).sum().backward()
        assert copied.poll_nonfinite() == ["head[0]"]
        assert seed.faults == 1
        assert seed.fault_flag.data_ptr() == copied._fault_flags[0].data_ptr()
        assert copied.seed(1).fault_flag.data_ptr() == copied._fault_flags[1].data_ptr()


def test_an_ema_that_copies_every_non_float_entry_runs_beside_a_growing_model() -> None:
    """timm's ModelEmaV2/V3 loop (lerp the float entries of the EMA copy's ``state_dict``, copy
    the rest): a seed's extra state, JSON in a uint8 tensor, changed length as its alpha and
    steps changed, and the copy raised at the first update. It is padded to a fixed size now."""
    model = MLP()
    slot = attach(model, "head", 2, 4, fault_limit=100)[0]
    for k, seed in enumerate(slot.seeds):
        seed.attach_kernel(kernel(4, k))
    walk(slot.seed(0), S.GRAFTING)
    ema = copy.deepcopy(model)
    for step in range(1, 12):
        slot.update_alpha_blending(step, 10)
        slot.seed(0).draw_step = 10**step  # a number that grows in digits
        slot.seed(1).record_fault("test", f"fault {step}: " + "é" * 190)  # the log fills
        with torch.no_grad():
            pairs = zip(ema.state_dict().values(), model.state_dict().values(), strict=True)
            for ema_v, model_v in pairs:
                if ema_v.is_floating_point():
                    ema_v.lerp_(model_v, 0.1)
                else:
                    ema_v.copy_(model_v)
    decode = kasmina.seeds.extra_state.decode_extra_state
    state = slot.seed(0).get_extra_state()
    assert state.numel() == 2048 and decode(state)["draw_step"] == 10**11
    full = slot.seed(1).get_extra_state()
    assert full.numel() == 2048 and decode(full)["faults"] == 11
    assert decode(full)["fault_log"][-1].startswith("fault 11:")  # the newest are kept


def test_a_seeds_extra_state_keeps_one_size_as_its_numbers_grow_whatever_its_id() -> None:
    """A state past 2 KiB without its fault log (a seed id of a kilobyte or two) lost its
    whole log and flipped between 2 and 4 KiB as a number grew digits."""
    decode = kasmina.seeds.extra_state.decode_extra_state
    encode = kasmina.seeds.extra_state.encode_extra_state
    log = ["RuntimeError: a" * 10, "RuntimeError: b" * 10]
    for seed_id in ("layer[0]", "é" * 320):
        sizes = set()
        for gate in (0.0, 0.12345678901234567, 1e-300):
            state = encode({"seed_id": seed_id, "gate_score": gate, "fault_log": log})
            sizes.add(state.numel())
            assert decode(state)["fault_log"] == log
        assert len(sizes) == 1


def _grafting(kernel_seed: int, step: int) -> tuple[MLP, KasminaLayer]:
    """An ``MLP`` whose head's seed 0 is GRAFTING at ``step`` of 10 (seed 1 DORMANT)."""
    model = MLP()
    slot = attach(model, "head", 2, 4)[0]
    slot.seed(0).attach_kernel(kernel(4, kernel_seed))
    walk(slot.seed(0), S.GRAFTING)
    slot.update_alpha_blending(step, 10)
    return model, slot


def test_compiled_host_with_a_grafting_seed_runs_without_recompiling() -> None:
    torch._dynamo.reset()
    model, slot = _grafting(kernel_seed=1, step=2)
    x = torch.randn(4, 5)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, model(x))
    out.sum().backward()
    assert slot.seed(0).seed_parameters()[0].grad is not None
    compiled(x)  # the first call recorded the slot's output: this one recompiles, once
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    slot.update_alpha_blending(8, 10)  # alpha is a device buffer: no recompile
    torch.testing.assert_close(compiled(x), model(x))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames


def test_a_compiled_forward_whose_kd_sits_out_at_every_call_compiles_once() -> None:
    """Counting a sit-out in a compiled forward (``sat_out[what] += 1``) guarded the graph on
    the count's value: every step recompiled, and ``fullgraph=True`` raised at the limit. The
    count of a compiled call goes to a device tensor, ``sat_out_compiled``."""

    torch._dynamo.reset()
    model = Loop()
    (slot,) = attach(model, ["cell"], 2, 2, kd_config=KDConfig(temperature=2.0))
    x = torch.randn(3, 5, 4)
    model(x)
    for k in range(2):
        slot.seed(k).attach_kernel(kernel(2, k))
        walk(slot.seed(k), S.GRAFTING)
    compiled = torch.compile(model, fullgraph=True)

    def step() -> None:  # logits shaped like the model's output: the first call's KD sits out
        slot.set_teacher_logits(torch.randn(3, 4))
        compiled(x).sum().backward()
        assert collect_kd_losses(model) is not None  # the second call's, which they fit

    for _ in range(2):
        step()
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for _ in range(9):  # past the recompile limit (8)
        step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    assert slot.sat_out_compiled.tolist() == [0, 11] and slot.sat_out == {}


def test_teacher_logits_made_under_inference_mode_train_a_compiled_forward() -> None:
    """A teacher run under ``torch.inference_mode()`` hands over inference tensors, which
    autograd refuses to save: the eager op copies them, but the compiled forward (which cannot)
    raised from inside the user's model. The hand-over copies them out of inference mode, and
    the compiled KD loss equals the eager one."""
    torch._dynamo.reset()
    model = MLP()
    (slot,) = attach(model, ["head"], 1, 8, kd_config=KDConfig(temperature=2.0))
    x = torch.randn(3, 5)
    model(x)
    slot.seed(0).attach_kernel(kernel(8, 0))
    walk(slot.seed(0), S.GRAFTING)
    with torch.inference_mode():
        teacher = torch.randn(3, 8)
    losses = []
    for forward in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        slot.set_teacher_logits(teacher)
        out = forward(x)
        kd = collect_kd_losses(model)
        assert kd is not None
        (out.sum() + kd).backward()
        losses.append(kd.detach())
    torch.testing.assert_close(losses[1], losses[0])
    assert teacher.is_inference()  # the caller's tensor is left as it was


def _guards(model: nn.Module) -> str:
    """The guards of the newest compiled entry of ``model``'s forward."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    entries = _debug_get_cache_entry_list(type(model).forward.__code__)
    return str(entries[0].guard_manager)


def test_a_compiled_dormant_slot_is_guarded_on_slot_local_values_only() -> None:
    """Issue #13: the compiled forward reads neither the shared table nor the seeds, so no
    Python aliasing guard (one per path to the one table, ~2 us each per call) is installed."""
    x = torch.randn(4, 5)
    guards = {}
    for name in ("bare", "attached"):
        torch._dynamo.reset()
        model = MLP()
        if name == "attached":
            attach(model, ["encoder.0", "encoder.2", "head"], 2, 4)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        for _ in range(2):  # the second call drops the recording graph
            compiled(x).sum().backward()
        guards[name] = _guards(model)
    attached = guards["attached"]
    assert "state_table" not in attached and "_modules['seeds']" not in attached
    assert attached.count("LAMBDA_GUARD") == guards["bare"].count("LAMBDA_GUARD")


def test_a_compiled_slot_follows_every_kind_of_table_change() -> None:
    """The slot's plan is a snapshot the table refreshes on every change (transition, kernel
    attached, row restored, table loaded), so a compiled graph never runs a stale stage."""
    torch._dynamo.reset()
    model = MLP()
    slot = attach(model, "head", 2, 4)[0]
    x = torch.randn(4, 5)
    compiled = torch.compile(model, fullgraph=True, backend="eager")

    def check() -> None:
        torch.testing.assert_close(compiled(x), model(x))

    check()
    slot.seed(0).attach_kernel(kernel(4, 3))
    check()
    saved = slot.state_table.state_dict()  # all DORMANT
    walk(slot.seed(0), S.GRAFTING)
    slot.update_alpha_blending(5, 10)
    assert not torch.equal(compiled(x), slot.host(torch.relu(model.encoder(x))))
    check()
    row = slot.state_table.read_row(0)
    slot.state_table.load_state_dict(saved)  # back to DORMANT without a transition
    assert slot._runs_any is False
    check()
    slot.state_table.restore_row(0, list(row.values()))  # GRAFTING again
    assert slot._stage_codes == (int(S.GRAFTING), int(S.DORMANT))
    check()
    slot.seed(0).transition_to(S.HARVESTING)  # the kernel is released
    assert slot.seed(0).kernel is None and slot._runs_any is False
    check()


@pytest.mark.parametrize("breaking", [False, True], ids=["kd", "a-graph-break-in-kd"])
def test_a_dynamic_compile_with_kd_follows_a_stage_change(monkeypatch, breaking: bool) -> None:
    """Under ``dynamic=True`` a KD step's temperature is a SymFloat: its check must not break
    the graph, and wherever a graph break puts ``_graft`` in a frame of its own, that frame is
    guarded on the stages, so GRAFTING never runs ISOLATED_INIT's graph."""
    torch._dynamo.reset()
    if breaking:  # any graph break under the slot's method makes it a frame of its own
        check = kasmina.ops.kd_loss._check

        def breaking_check(*args, **kwargs) -> None:
            torch._dynamo.graph_break()
            check(*args, **kwargs)

        monkeypatch.setattr(kasmina.ops.kd_loss, "_check", breaking_check)

    def build() -> tuple[nn.Module, KasminaLayer]:
        model = MLP()
        (slot,) = attach(model, "head", 2, 4, kd_config=KDConfig(temperature=2.0))
        slot.seed(0).attach_kernel(kernel(4, 1))
        walk(slot.seed(0), S.ISOLATED_INIT)
        return model, slot

    x, teacher = torch.randn(6, 5), torch.randn(6, 8)
    runs = {}
    for mode in ("eager", "compiled"):
        model, slot = build()
        run = (
            torch.compile(model, dynamic=True, backend="aot_eager") if mode == "compiled" else model
        )
        grads = []
        for stage in (S.ISOLATED_INIT, S.GRAFTING):
            if stage is S.GRAFTING:
                for step in (S.COMPATIBILITY_CHECK, S.GRAFTING):
                    slot.seed(0).transition_to(step)
                slot.update_alpha_blending(3, 10)
            model.zero_grad(set_to_none=True)
            slot.set_teacher_logits(teacher)
            out = run(x)
            (out.square().mean() + collect_kd_losses(model)).backward()
            grads.append(
                [p.grad.clone() for p in (slot.host.bias, *slot.seed(0).seed_parameters())]
            )
        runs[mode] = grads
    for eager, compiled in zip(runs["eager"], runs["compiled"], strict=True):
        for a, b in zip(eager, compiled, strict=True):
            torch.testing.assert_close(b, a)


def test_seed_flags_are_views_of_the_layer_flags_through_copies_and_moves() -> None:
    model = MLP()
    slot = attach(model, "head", 2, 4)[0]
    for other in (slot, copy.deepcopy(slot), slot.to(torch.float64)):
        flags = other._finite_flags
        for k, seed in enumerate(other.seeds):
            assert seed.finite_flag.data_ptr() == flags[k].data_ptr()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = kasmina_layers(torch.load(buffer, weights_only=False))[0]
    loaded._finite_flags[1] = False
    assert [bool(s.finite_flag) for s in loaded.seeds] == [True, False]


def test_a_slot_takes_its_hosts_mode_and_leaves_the_hosts_own_modes_alone() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 8))
    model.eval()
    slot = attach(model, "2", 2, 4)[0]
    assert [n for n, m in model.named_modules() if m.training] == []  # the slot is eval too
    # A block in mixed modes on purpose (a frozen batch norm inside a training block): the
    # slot follows the block's own flag, and nothing inside the block is flipped.
    for training in (True, False):
        block = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8))
        block.train(training)
        block[1].train(not training)
        model = nn.Sequential(nn.Linear(4, 8), block)
        slot = attach(model, "1", 2, 4)[0]
        assert slot.training is training and slot.seeds.training is training
        assert all(seed.training is training for seed in slot.seeds)
        assert (block.training, block[0].training, block[1].training) == (
            training,
            training,
            not training,
        )


@pytest.mark.parametrize("stage", [S.ISOLATED_INIT, S.GRAFTING, S.ACTIVE])
def test_an_unbatched_call_whose_height_is_the_channel_count_is_sat_out(stage) -> None:
    """The unbatched call's output ``[C, H, W]`` has H == C here: its dim 1 (the conv slot's
    chunk dim) is as wide as the seeds cover, and only its rank tells it from the batched
    ``[B, C, H, W]`` the slot recorded. Its seeds were handed slices of the height: a fault
    each call, then QUARANTINE for two healthy seeds."""
    model = _TwoCalls()
    model.conv = nn.Conv2d(3, 4, 3)  # no padding: a [3, 6, 6] sample gives [4, 4, 4]
    (slot,) = attach(model, ["conv"], 2, 2)
    x = torch.randn(2, 3, 6, 6)
    model(x)
    assert slot.host(x[0]).shape == (4, 4, 4)
    for k in range(2):
        torch.manual_seed(k)
        slot.seed(k).attach_kernel(nn.Sequential(nn.Conv2d(2, 2, 1), nn.Tanh()))
        walk(slot.seed(k), stage)
    slot.update_alpha_blending(3, 10)
    for _ in range(4):
        model(x).backward()
    assert [seed.faults for seed in slot.seeds] == [0, 0] and slot.sat_out["seeds"] == 4
    assert [seed.stage for seed in slot.seeds] == [stage, stage]
    with torch.no_grad():
        assert torch.equal(slot(x[0]), slot.host(x[0]))


@pytest.mark.parametrize("side", [6, 4], ids=["height_not_channels", "height_is_channels"])
@pytest.mark.parametrize("when", ["first_call", "after_a_move"])
def test_an_unbatched_first_call_does_not_switch_a_conv_slots_seeds_off(side, when) -> None:
    """A single image served first (after ``kasmina.load``, whose slots have recorded nothing,
    or after ``model.to`` / ``.cpu()``, which has the slot record again) had the slot record a
    rank-3 contract; every batched call after it failed the contract, and the ACTIVE seeds sat
    out from then on, silently: the served model was the bare host. The unbatched call sits
    out, and the record keeps (or waits for) the batched shape."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)  # a [3, side, side] sample gives [4, side, side]
    model = nn.Sequential(conv)
    (slot,) = attach(model, ["0"], 2, 2)
    x = torch.randn(2, 3, side, side)
    if when == "after_a_move":
        model(x)  # recorded batched
    for k in range(2):
        slot.seed(k).attach_kernel(nn.Sequential(nn.Conv2d(2, 2, 1), nn.Tanh()))
        walk(slot.seed(k), S.ACTIVE)
    if when == "after_a_move":
        model.cpu()  # a no-op move: the slot records dtype and device again
    contract_before = slot.output_contract
    with torch.no_grad():
        single = model(x[0])
        assert torch.equal(single, conv(x[0]))  # the unbatched call sits out
        assert slot.output_contract == contract_before  # and records nothing
        batched = model(x)
    assert slot.output_contract[0] == (2, 4, side, side)
    assert not torch.equal(batched, conv(x))  # the seeds run on every batched call
    assert slot.sat_out["seeds"] == 1 and [s.faults for s in slot.seeds] == [0, 0]


def test_a_move_keeps_the_recorded_shapes_and_takes_the_new_dtype() -> None:
    """A slot on a block that declares no batched rank (here a ``Sequential`` around a conv,
    chunked along dim 1): after ``model.double()`` the slot records dtype and device from the
    next call but keeps the shapes it recorded batched, so an unbatched first call sits out
    and does not switch the seeds off for the batched calls after it."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv1d(3, 4, 1))
    model = nn.Sequential()
    model.add_module("block", block)
    (slot,) = attach(model, ["block"], 2, 2, chunk_dim=1)
    x = torch.randn(2, 3, 5)
    model(x)
    for k in range(2):
        slot.seed(k).attach_kernel(nn.Sequential(nn.Conv1d(2, 2, 1), nn.Tanh()))
        walk(slot.seed(k), S.ACTIVE)
    model.double()
    x = x.double()
    with torch.no_grad():
        assert torch.equal(model(x[0]), block(x[0]))  # [4, 5]: dim 1 is not the channels
        batched = model(x)
    assert slot.output_contract == ((2, 4, 5), torch.float64, x.device)
    assert slot.input_spec == ((2, 3, 5), torch.float64, x.device)
    assert not torch.equal(batched, block(x))


def test_attach_under_a_meta_default_device_builds_real_seeds() -> None:
    """``torch.set_default_device("meta")`` (a user building the next model lazily) made the
    seeds' buffers data-less, and attach raised "Cannot copy out of meta tensor"."""
    model = MLP()
    with torch.device("meta"):
        (slot,) = attach(model, ["head"], 2, 4)
    assert all(b.device.type == "cpu" for b in slot.buffers())
    x = torch.ones(3, 5)
    assert torch.equal(model(x), slot.host(torch.relu(model.encoder(x))))


@pytest.mark.parametrize("stage", [SeedStage.GRAFTING, SeedStage.STABILIZATION])
def test_forward_mode_ad_through_a_blending_seed_gives_the_jacobian(stage: SeedStage) -> None:
    """Forward mode through a blending seed raised ``NotImplementedError`` (the guard node's
    and the blend op's deliberate refusal). Now ``forward_ad`` (the eager guard node),
    ``torch.func.jvp`` and ``jacfwd`` (the per-op path) give the Jacobian autograd gives."""
    import torch.autograd.forward_ad as fwAD

    model = MLP()
    (slot,) = attach(model, ["head"], 2, 4)
    model(torch.randn(3, 5))
    slot.seed(0).attach_kernel(kernel(4, 0))
    walk(slot.seed(0), stage)
    slot.update_alpha_blending(3, 10)
    x, v = torch.randn(3, 5), torch.randn(3, 5)
    jac = torch.autograd.functional.jacobian(model, x)  # [3, 8, 3, 5]
    want = torch.einsum("ijkl,kl->ij", jac, v)
    with fwAD.dual_level():
        dual = fwAD.unpack_dual(model(fwAD.make_dual(x, v)))
    torch.testing.assert_close(dual.tangent, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.func.jvp(model, (x,), (v,))[1], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.func.jacfwd(model)(x), jac, rtol=1e-5, atol=1e-6)


def test_a_slot_pickled_by_an_older_version_counts_its_kd_losses() -> None:
    """An older pickle holds the slot's pending KD losses as a plain list; the slot takes the
    list that counts uncollected losses once, or every teacher logits call raised. Its mask
    cache was a dict, on which a forward with a seed beside a passed-through chunk raised."""
    model = MLP()
    (slot,) = attach(model, ["head"], 2, 4, kd_config=KDConfig())
    state = {**slot.__getstate__(), "_kd_losses": [], "_masks": {}}  # its mask cache: a dict
    state.pop("_graph")
    old = KasminaLayer.__new__(KasminaLayer)
    old.__setstate__(state)
    assert old.set_teacher_logits(torch.randn(3, 8)) == 0
    assert type(old._kd_losses).__name__ == "PendingKDLosses"
    seed = old.seed(0)  # a seed beside one that passes the host through takes the masks
    seed.attach_kernel(nn.Linear(4, 4))
    for stage in (SeedStage.ISOLATED_INIT, SeedStage.COMPATIBILITY_CHECK, SeedStage.GRAFTING):
        seed.transition_to(stage)
    old._refresh_plan()  # (the table notifies the live slot this state was copied from)
    for _ in range(2):  # the first records the slot's activations
        assert old(torch.randn(3, 8)).requires_grad


def test_detach_only_takes_slots_and_refuses_names() -> None:
    """``only`` is matched against the slots themselves: a name (what ``attach`` takes), or
    anything else, matched nothing, and the slot stayed with no word. It is refused now; one
    slot given alone is taken as one. A slot that is not in the model (a deep copy's originals,
    one detached already) is refused too, before any is detached."""
    model = MLP()
    encoder, head = attach(model, ["encoder.0", "head"], 2, 4)
    for only in (["head"], "head", [None], [model.head.host]):
        with pytest.raises(TypeError, match="only must hold the model's slots"):
            detach(model, only=only)  # type: ignore[arg-type]
        assert kasmina_layers(model) == [encoder, head]
    twin = copy.deepcopy(model)  # the slots attach returned are the original's, not the copy's
    with pytest.raises(ValueError, match=r"not in the model: \['head'\].*nothing was detached"):
        detach(twin, only=[twin.encoder[0], head])
    assert len(kasmina_layers(twin)) == 2
    assert detach(model, only=head) == [head] and kasmina_layers(model) == [encoder]
    with pytest.raises(ValueError, match="not in the model"):  # detached already
        detach(model, only=[head])
    assert detach(model, only=(s for s in [encoder])) == [encoder] and not kasmina_layers(model)
    model = MLP()
    slots = attach(model, ["encoder.0", "head"], 2, 4)
    assert detach(model, only=nn.ModuleList(slots)) == slots  # a module holding slots too


def test_a_move_keeps_a_provisional_record_open_to_its_batched_form() -> None:
    """A sanity call on one sample, then ``model.to(device)`` (any move or cast, a no-op one
    too): the first batched call recorded the unbatched shape kept over the move, and a
    GERMINATE applied at that step was refused on the rank. The move keeps the record open."""
    moves = (lambda m: m.to("cpu"), lambda m: m.double())
    for move, again in itertools.product(moves, (False, True)):
        model = MLP()
        slot = attach(model, "head", 2, 4)[0]
        with torch.no_grad():
            model(torch.randn(5))
        move(model)
        dtype = next(model.parameters()).dtype
        if again:  # one more unbatched call: the record stays open, in the new dtype
            with torch.no_grad():
                model(torch.randn(5, dtype=dtype))
            assert slot.output_contract[0] == (8,) and slot.output_contract[1] == dtype
        model(torch.randn(3, 5, dtype=dtype))
        assert slot.output_contract[0] == (3, 8) and slot.output_contract[1] == dtype


class _Breaking(nn.Module):
    """A kernel TorchDynamo cannot trace whole (a print, an ``.item()``): a graph break."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()
        return torch.tanh(self.lin(x))


def test_a_compiled_slot_whose_kernel_breaks_the_graph_follows_every_stage_change() -> None:
    """A graph break in a kernel, inside the slot's loop over its seeds, made TorchDynamo skip
    the slot's graft and compile each function it calls as a frame of its own, on guards that
    missed a stage change: with seed 0 ACTIVE, seed 1 kept its ISOLATED_INIT graph in GRAFTING
    (never blended in, and the host's gradient through it). Such a call runs eager now."""
    torch._dynamo.reset()
    model = MLP()
    slot = attach(model, "head", 2, 4)[0]
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    model(x)
    for k in range(2):
        slot.seed(k).attach_kernel(_Breaking(k))
    walk(slot.seed(0), SeedStage.ACTIVE)
    compiled = torch.compile(model, backend="aot_eager")
    for stage in PATH:
        slot.seed(1).transition_to(stage)
        slot.update_alpha_blending(5, 10)
        results = []
        for run in (model, compiled):
            model.zero_grad(set_to_none=True)
            out = run(x)
            out.square().sum().backward()
            results.append((out.detach(), [p.grad for p in model.parameters()]))
        (eager, grads), (got, got_grads) = results
        torch.testing.assert_close(got, eager, msg=stage.name)
        for grad, got_grad in zip(grads, got_grads, strict=True):
            assert (grad is None) == (got_grad is None), stage.name
            if grad is not None:
                torch.testing.assert_close(got_grad, grad, msg=stage.name)


class _Block(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class _Refusing(_Block):
    """A parent whose ``__setattr__`` refuses a slot (as a scripted module's does)."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, KasminaLayer):
            raise RuntimeError("this parent takes no other module")
        super().__setattr__(name, value)


def test_a_failed_install_leaves_the_model_as_it_was() -> None:
    """Slots were put in place one by one: a target inside a scripted module (whose compiled
    forward cannot call a slot, and whose ``__setattr__`` refuses one) raised torch's
    ``RuntimeError`` after the targets before it were replaced, with no load checks on the
    model. A scripted parent is refused up front now, and any other parent that refuses a slot
    takes the slots put in place before it out again."""
    for block, error, match in (
        (torch.jit.script(_Block()), ValueError, "inside a scripted module .'sub'"),
        (_Refusing(), RuntimeError, "takes no other module"),
    ):
        model = MLP()
        model.sub = block
        before = [(name, type(m)) for name, m in model.named_modules()]
        keys = list(model.state_dict())
        with pytest.raises(error, match=match):
            attach(model, ["head", "sub.fc"], 2, 4)
        assert [(name, type(m)) for name, m in model.named_modules()] == before
        assert list(model.state_dict()) == keys and not model._load_state_dict_pre_hooks


def test_a_layout_the_host_declares_is_checked_before_the_table_is_allocated(
    monkeypatch,
) -> None:
    """``seeds_per_layer=2**25`` on an 8-wide Linear allocated a table of 2**25 rows (1.8 GiB)
    before the width check refused it, and 2**62 escaped as torch's own RuntimeError."""
    import kasmina.seeds.inject as inject

    def no_table(*args, **kwargs):
        raise AssertionError("a state table was allocated for a layout the host refuses")

    monkeypatch.setattr(inject, "GPUStateTensor", no_table)
    model = MLP()
    for seeds in (2**25, 2**62):
        with pytest.raises(ValueError, match="seeds x chunk 1 .* != 8 features of Linear"):
            attach(model, ["head"], seeds, 1)
    assert not kasmina_layers(model)


def test_a_table_past_int32_rows_is_a_value_error_on_a_host_declaring_no_width() -> None:
    """A block declares no width, so no layout check refuses 2**62 seeds before the table:
    its allocation escaped as torch's RuntimeError. The table refuses past int32 rows."""
    model = MLP()
    with pytest.raises(ValueError, match="num_seeds must be a positive int32"):
        attach(model, ["encoder"], 2**62, 1)
    assert not kasmina_layers(model)


def test_a_first_call_with_no_tensor_at_the_index_gives_way_to_a_later_calls_record() -> None:
    """The slot's first call had no tensor at ``output_index`` (an LSTM fed a PackedSequence,
    attention asked for no weights): its reason was the record, no later call replaced it, and
    GERMINATE refused every kernel for good, naming the call of another kind. A later call
    with the tensor records it."""
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(0)
    rnn, attn = nn.LSTM(3, 4, batch_first=True), nn.MultiheadAttention(4, 2, batch_first=True)
    model = nn.ModuleDict({"rnn": rnn, "attn": attn})
    rnn_slot, attn_slot = (
        attach(model, ["rnn"], 2, 2)[0],
        attach(model, ["attn"], 2, 2, output_index=1)[0],
    )
    x = torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(1))
    q = torch.randn(6, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model["rnn"](pack_padded_sequence(x, torch.tensor([5, 5, 4, 3, 3, 2]), batch_first=True))
        model["attn"](q, q, q, need_weights=False)
    assert (
        isinstance(rnn_slot.output_contract, str) and "PackedSequence" in rnn_slot.output_contract
    )
    assert isinstance(attn_slot.output_contract, str)
    model["rnn"](x)
    model["attn"](q, q, q)
    assert rnn_slot.output_contract[0] == (6, 5, 4) and rnn_slot.contract_problem() is None
    assert attn_slot.output_contract[0] == (6, 4, 4) and attn_slot.contract_problem() is None


def test_a_grown_model_copied_under_inference_mode_runs() -> None:
    """A deep copy (or a ``kasmina.load``) made under ``torch.inference_mode`` holds inference
    tensors, which keep no version counter: the seed's random-stream position summed its
    kernel's ``_version``s, and every forward of the copy raised, inside inference mode too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    (slot,) = attach(model, ["0"], 2, 2)
    for seed in slot.seeds:
        seed.attach_kernel(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))
        walk(seed, S.GRAFTING)
        seed.draw_step = 3  # a managed seed's stream position: a copy goes on from it
    slot.update_alpha_blending(5, 10)
    x = torch.randn(3, 4)
    with torch.inference_mode():
        served = copy.deepcopy(model)
        assert next(served.parameters()).is_inference()
        inside = served(x)
    with torch.no_grad():
        outside = served(x)
    assert inside.shape == outside.shape == (3, 4)
    assert torch.isfinite(inside).all() and torch.isfinite(outside).all()
