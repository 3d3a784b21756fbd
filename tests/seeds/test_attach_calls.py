"""What a slot makes of its host's calls: outputs of every form (conv channels and chunk_dim,
tuples, dataclasses, structseqs, attention weights, an LSTM's PackedSequence) and the
output_index checks; calls that do not fit the seeds (another shape, an unbatched sample, a
kernel's signed input shape) sat out while the host's output stands; the recorded shapes across
moves; slots inside nn.TransformerEncoder, whose fused path never skips a live seed."""

from __future__ import annotations

import dataclasses
import itertools
import re

import pytest
import torch
from torch import nn

from kasmina.seeds.inject import attach, detach
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.outputs import output_element
from tests.seeds.helpers import MLP, S, kernel, walk


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

    class ListOut(TupleOut):
        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
            h = self.proj(x)
            return [h.sum(-1), h]

    x = torch.randn(3, 4)
    for cls, index in [(TupleOut, 0), (DataOut, 1), (ListOut, -1)]:
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
        elif cls is ListOut:  # a list stays a list, its other items as they were
            assert isinstance(out, list) and len(out) == 2 and torch.equal(out[0], bare[0])
            grafted, host = out[1], bare[1]
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


@pytest.mark.parametrize("index", [1, -1])
def test_a_dict_output_is_indexed_by_its_values(index: int) -> None:
    """A host returning a plain dict: the seeds apply to its value at ``output_index`` (all its
    values in order, None included) and the dict, its other values and its key order stand. A
    dict was no container: every call sat out ("holds a dict")."""

    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.proj = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"scores": x.sum(-1), "hidden": self.proj(x)}

    model = nn.Sequential(Heads())
    x = torch.randn(3, 4)
    bare = model(x)
    slot = attach(model, ["0"], 2, 2, output_index=index)[0]
    model(x)
    slot.seed(0).attach_kernel(kernel(2, 1))
    walk(slot.seed(0), S.STABILIZATION)
    out = model(x)
    assert type(out) is dict and list(out) == ["scores", "hidden"]
    assert torch.equal(out["scores"], bare["scores"])
    assert torch.equal(out["hidden"][:, 2:], bare["hidden"][:, 2:])
    torch.testing.assert_close(out["hidden"][:, :2], slot.seed(0).kernel(bare["hidden"][:, :2]))
    assert output_element(out, index) is out["hidden"] and output_element(out, 2) is None


def test_a_dict_value_that_is_none_in_eval_alone_leaves_the_index_on_its_key() -> None:
    """A dict's None values count (a ``ModelOutput`` skips its None fields): an auxiliary head
    returned in training only must not move ``output_index`` onto another key in eval, where
    the seeds would chunk another tensor of the same shape (or sit out) unseen."""

    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.proj = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
            aux = x * 2 if self.training else None
            return {"aux": aux, "hidden": self.proj(x), "other": x + 1}

    model = nn.Sequential(Heads())
    x = torch.randn(3, 4)
    slot = attach(model, ["0"], 2, 2, output_index=1)[0]
    model(x)
    slot.seed(0).attach_kernel(kernel(2, 1))
    walk(slot.seed(0), S.STABILIZATION)
    for train in (True, False):
        model.train(train)
        out = model(x)
        bare = model[0].host(x)
        torch.testing.assert_close(out["hidden"][:, :2], slot.seed(0).kernel(bare["hidden"][:, :2]))
        assert torch.equal(out["other"], bare["other"])


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
