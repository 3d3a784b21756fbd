"""How ``evaluate_seeds`` reads a validation batch: what it passes to the model and what a
batch weighs. Each batch's mean loss is weighted by its size, so the oracle here is each batch
measured alone (where its weight cannot matter) averaged with the weights the batch's form
implies."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence, pack_sequence

from kasmina.manager.batches import batch_size
from kasmina.manager.evaluation import evaluate_seeds
from kasmina.manager.slots import SlotRegistry
from kasmina.seeds.layer import KasminaLayer
from tests.manager.evaluation_helpers import _TO_STABILIZATION, Scale, _stabilizing, _tiny


def _weighted(registry: SlotRegistry, batches: list, weights: list[int], loss_fn) -> dict:
    """Per seed, (loss with, loss without) of ``batches`` each measured alone, averaged with
    ``weights``."""
    alone = [evaluate_seeds(registry, [batch], loss_fn) for batch in batches]
    total = sum(weights)
    return {
        sid: (
            sum(w * ev[sid].loss_with for w, ev in zip(weights, alone, strict=True)) / total,
            sum(w * ev[sid].loss_without for w, ev in zip(weights, alone, strict=True)) / total,
        )
        for sid in alone[0]
    }


def _assert_weighted(got: dict, want: dict, samples: int) -> None:
    for sid, (with_, without) in want.items():
        assert got[sid].samples == samples
        assert got[sid].loss_with == pytest.approx(with_, rel=1e-12)
        assert got[sid].loss_without == pytest.approx(without, rel=1e-12)


def _per_sample_loss(out: torch.Tensor, targets: list) -> torch.Tensor:
    """A detection-style loss: the mean over the samples that have target rows."""
    per = [
        F.mse_loss(out[i].expand_as(t["boxes"]), t["boxes"])
        for i, t in enumerate(targets)
        if len(t["boxes"])
    ]
    return torch.stack(per).mean()


def test_a_list_of_per_sample_targets_weighs_its_samples() -> None:
    """A detection batch's targets are a list of dicts, one per image, with as many rows as the
    image has objects. The batch was weighed by the first image's row count: a batch whose
    first image had no objects weighed 0 and was dropped, and G5 judged on the others."""
    _, _, registry = _tiny()
    gen = torch.Generator().manual_seed(3)
    xa, xb = torch.randn(4, 3, generator=gen), torch.randn(5, 3, generator=gen)
    ta = [{"boxes": torch.randn(2, 6, generator=gen)} for _ in range(4)]
    tb = [{"boxes": torch.randn(0 if i == 0 else 1, 6, generator=gen)} for i in range(5)]
    batches = [(xa, ta), (xb, tb)]
    want = _weighted(registry, batches, [4, 5], _per_sample_loss)
    got = evaluate_seeds(registry, batches, _per_sample_loss)
    _assert_weighted(got, want, samples=9)


def test_one_image_batches_weigh_one_image_each() -> None:
    """Per-image box tensors of equal row counts (one image a batch, the usual detection
    evaluation) were taken for batched targets side by side: a batch weighed its box count, and
    an image with no objects weighed 0 and was dropped."""
    _, _, registry = _tiny()
    gen = torch.Generator().manual_seed(4)
    batches = [
        (torch.randn(1, 3, generator=gen), [torch.randn(4, 6, generator=gen)]),
        (torch.randn(1, 3, generator=gen), [torch.zeros(0, 6)]),
    ]

    def loss_fn(out: torch.Tensor, targets: list) -> torch.Tensor:
        return out.square().mean() + len(targets[0])

    want = _weighted(registry, batches, [1, 1], loss_fn)
    got = evaluate_seeds(registry, batches, loss_fn)
    _assert_weighted(got, want, samples=2)


@pytest.mark.parametrize(
    ("inputs", "targets", "size"),
    [
        ([torch.zeros(3, 8, 8)], [torch.zeros(0, 4)], 1),  # torchvision: a list of images
        ([torch.zeros(3, 8, 8)] * 2, [torch.zeros(5, 4)] * 2, 2),
        (torch.zeros(2, 16), (torch.zeros(32), torch.ones(32)), 32),  # per-token, flat
        (torch.zeros(2, 16), [torch.zeros(32, 3)] * 3, 32),  # three side by side, not two
    ],
    ids=["list-one-empty", "list-equal-rows", "flat-per-token", "not-one-per-sample"],
)
def test_what_counts_as_one_target_per_sample(inputs: object, targets: object, size: int):
    """Per-sample targets are one 2-D or higher tensor per input sample, the samples being the
    inputs' batch or a list of images; flat targets side by side keep their rows (a batch of
    two sequences with per-token labels and weights weighed 2, not its 32 tokens)."""
    assert batch_size(inputs, targets) == size


@pytest.mark.parametrize(
    ("targets", "size"),
    [
        ((torch.zeros(4), torch.zeros(4, 2)), 4),  # batched targets side by side (collated)
        ([torch.zeros(3, 2), torch.zeros(1, 2), torch.zeros(2, 2), torch.zeros(0, 2)], 4),
        ([1, 0, 2, 2], 4),  # plain labels
        ([{"labels": torch.zeros(7)}], 1),  # one image
        ([None, torch.zeros(4, 6)], 4),
        ([torch.zeros(0, 2)] * 4, 4),  # four images, none with an object
        ([torch.zeros(3, 2)] * 4, 4),  # four images, three objects each
    ],
    ids=["collated", "ragged", "labels", "one-image", "none-beside", "empty", "equal-rows"],
)
def test_a_batch_weighs_what_its_targets_show(targets: object, size: int) -> None:
    _, _, registry = _tiny()
    x = torch.randn(4, 3)
    got = evaluate_seeds(registry, [(x, targets)], lambda out, _: out.square().mean())
    assert {ev.samples for ev in got.values()} == {size}


class _Packed(nn.Module):
    """An LSTM over packed sequences, its last hidden state through a slot."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4)
        self.slot = KasminaLayer(nn.Linear(4, 6), 3, 2, layer_id="fc")

    def forward(self, packed: PackedSequence) -> torch.Tensor:
        _, (h, _) = self.lstm(packed)
        return self.slot(h[-1])


def test_a_packed_sequence_is_passed_whole_and_weighs_its_sequences() -> None:
    """A ``PackedSequence`` is a tuple: it was unpacked into four arguments (TypeError)."""
    torch.manual_seed(0)
    model = _Packed()
    registry = SlotRegistry(model, [model.slot])
    seed = model.slot.seeds[0]
    seed.attach_kernel(Scale(2.0))
    for stage in _TO_STABILIZATION:
        seed.transition_to(stage)
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 3, 2]
    packed = pack_sequence([torch.randn(n, 3, generator=gen) for n in lengths])
    target = torch.randn(3, 6, generator=gen)
    (ev,) = evaluate_seeds(registry, [(packed, None)], lambda o, _: F.mse_loss(o, target)).values()
    with torch.no_grad():
        model.eval()
        want = F.mse_loss(model(packed), target).item()
    assert ev.samples == 3 and ev.loss_with == pytest.approx(want, rel=1e-6)


def test_a_namedtuple_of_inputs_is_unpacked_field_by_field() -> None:
    """Moved to the device, a namedtuple was rebuilt from one generator (TypeError)."""
    model, _, registry = _tiny()
    x, t = torch.randn(4, 3), torch.randn(4, 6)
    want = evaluate_seeds(registry, [((x,), t)], F.mse_loss)
    Inputs = collections.namedtuple("Inputs", "features")
    got = evaluate_seeds(registry, [(Inputs(x), t)], F.mse_loss)
    assert {k: v.loss_with for k, v in got.items()} == {k: v.loss_with for k, v in want.items()}


def test_a_batch_that_is_no_inputs_targets_pair_is_refused_naming_it() -> None:
    """Each batch was unpacked as ``for inputs, targets in batches``: a batch of inputs alone
    raised "too many values to unpack" from inside the measurement, and a batch of two rows (a
    tensor, a mapping of two keys) was taken apart, its first row measured against its second
    (or the model called with a key). Each is a ``TypeError`` naming the batch, before its
    forward, and no seed records an evaluation."""
    _, slot, registry = _tiny()
    x, t = torch.randn(4, 3), torch.randn(4, 6)
    norm = lambda out, _: out.pow(2).mean()  # noqa: E731 (reads no targets)
    wrong = {
        "a Tensor as batch 1": [torch.randn(2, 3)],
        "a tuple of 1 as batch 2": [(x, t), (x,)],
        "a list of 3 as batch 1": [[x, t, t]],
        "a dict as batch 1": [{"x": x, "t": t}],
    }
    for said, batches in wrong.items():
        with pytest.raises(
            TypeError, match=rf"^batches must yield \(inputs, targets\) pairs, got {said}"
        ):
            evaluate_seeds(registry, batches, norm)
        assert all(seed.evaluation is None for seed in slot.seeds)
    assert evaluate_seeds(registry, [[x, t]], norm)["fc[0]"].samples == 4  # a list pair: taken


class _ScalesItsInputInPlace(nn.Module):
    """A model whose forward preprocesses its batch in place, before a slot."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = KasminaLayer(nn.Linear(3, 4), 2, 2, layer_id="fc")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)
        return self.fc(x)


def test_a_model_that_changes_its_inputs_in_place_measures_each_forward_on_the_batch_given():
    """Every forward of a batch was given the same tensors: a model that scales its input in
    place ran the ablation on the input scaled twice, and a seed that changes nothing (a
    kernel of x * 1) was measured as a 60% benefit, which G5 would fossilize."""
    torch.manual_seed(0)
    model = _ScalesItsInputInPlace()
    registry = SlotRegistry(model, [model.fc])
    seed = model.fc.seeds[0]
    seed.attach_kernel(Scale(1.0))
    for stage in _TO_STABILIZATION:
        seed.transition_to(stage)
    x, y = torch.randn(8, 3), torch.randn(8, 4)
    result = evaluate_seeds(registry, [(x.clone(), y)], F.mse_loss)["fc[0]"]
    assert result.loss_without == result.loss_with
    with torch.no_grad():  # the loss of the model as it is, on the batch scaled once
        assert result.loss_with == pytest.approx(F.mse_loss(model(x), y).item(), rel=1e-6)


def test_a_loss_that_changes_its_targets_in_place_scores_each_forward_on_the_batch_given():
    """The loss of every forward of a batch was given the same targets: a loss that scales
    them in place (harmless in training, where each batch is scored once) scored the ablation
    against targets scaled twice, and a seed that changes nothing was measured as a change."""
    slot, registry = _stabilizing(Scale(1.0))
    x, y = torch.randn(8, 3), torch.randn(8, 6)

    def loss_fn(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, targets.mul_(2.0))

    results = evaluate_seeds(registry, [(x, y.clone())], loss_fn)  # 3 forwards, 3 losses
    with torch.no_grad():
        want = F.mse_loss(registry.model(x), 2.0 * y).item()
    assert results["fc[0]"].loss_with == pytest.approx(want, rel=1e-6)
    assert results["fc[0]"].loss_without == pytest.approx(want, rel=1e-6)


Features = collections.namedtuple("Features", "features")


class _ScalesItsInputsInPlace(nn.Module):
    """A model that writes its batch in place before a slot, in one of the forms a batch's
    inputs take: a mapping's value, a namedtuple's field, a ``PackedSequence``'s data."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.lstm = nn.LSTM(3, 3)
        self.fc = KasminaLayer(nn.Linear(3, 4), 2, 2, layer_id="fc")

    def forward(self, batch: object = None, x: torch.Tensor | None = None) -> torch.Tensor:
        if self.form == "mapping":
            return self.fc(x.mul_(2.0))
        if self.form == "namedtuple":
            return self.fc(batch.features.mul_(2.0))  # read by name: rebuilt as itself
        batch.data.mul_(2.0)
        _, (h, _) = self.lstm(batch)
        return self.fc(h[-1])


@pytest.mark.parametrize("form", ["mapping", "namedtuple", "packed"])
def test_inputs_in_any_form_a_model_changes_in_place_are_each_forwards_own(form: str) -> None:
    """Each forward of a batch gets its own copy of the inputs through a mapping, a namedtuple
    (rebuilt as that namedtuple) and a ``PackedSequence``, as of a bare tensor: a seed that
    changes nothing measures no change, on the batch as given."""
    torch.manual_seed(0)
    model = _ScalesItsInputsInPlace(form)
    registry = SlotRegistry(model, [model.fc])
    seed = model.fc.seeds[0]
    seed.attach_kernel(Scale(1.0))
    for stage in _TO_STABILIZATION:
        seed.transition_to(stage)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, generator=gen)
    if form == "mapping":
        inputs, fresh = {"x": x}, lambda: {"x": x.clone()}
    elif form == "namedtuple":
        inputs, fresh = (Features(x),), lambda: (Features(x.clone()),)
    else:
        packed = pack_sequence([x[:3], x[3:]])
        inputs, fresh = packed, lambda: packed._replace(data=packed.data.clone())
    y = torch.randn(4 if form != "packed" else 2, 4, generator=gen)
    given = fresh()
    result = evaluate_seeds(registry, [(inputs, y)], F.mse_loss)["fc[0]"]
    assert result.loss_without == result.loss_with
    with torch.no_grad():
        args = given if form == "namedtuple" else (given,)
        out = model(**given) if form == "mapping" else model(*args)
    assert result.loss_with == pytest.approx(F.mse_loss(out, y).item(), rel=1e-6)
