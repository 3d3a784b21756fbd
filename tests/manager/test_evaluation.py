"""Kasmina measures a seed's worth itself: ``evaluate_seeds`` against a hand computation.

Each seed whose output reaches the host's is measured with and without its chunk on the same
validation batches, weighted by their sizes, and nothing it found is changed (weights, stages,
alphas, modes, the global RNG); a compiled forward is measured with the ablation it runs. What it
takes: inputs as tensors, tuples or mappings (passed as keyword arguments), a packed encoder
batch, an empty batch (which weighs nothing); a loss or metric that is a number (NumPy's too),
anything else refused by name; a metric NaN on one batch is recorded, and G5 refuses it.

G5 and G3 through the manager are in test_measured_gates.py, a seed that faults while measured
in test_evaluation_faults.py, what an evaluation puts back in test_evaluation_state.py, how it
reads a batch in test_evaluation_batches.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kasmina.manager.evaluation import evaluate_seeds
from kasmina.manager.slots import SlotRegistry
from kasmina.seeds.gates import gate_g5_performance
from kasmina.seeds.inject import attach
from kasmina.seeds.layer import KasminaLayer
from tests.manager.evaluation_helpers import Scale, _tiny
from tests.manager.helpers import S


def test_evaluate_seeds_matches_a_hand_computation_and_changes_nothing() -> None:
    model, slot, registry = _tiny()
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(n, 3, generator=gen), torch.randn(n, 6, generator=gen)) for n in (4, 2)]
    model.train()
    weights = {k: v.clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    stages, alphas = slot.stages(), [s.alpha_value for s in slot.seeds]
    forwards = []
    slot.host.register_forward_hook(lambda *_: forwards.append(1))
    rng = torch.get_rng_state()

    results = evaluate_seeds(
        registry, batches, F.mse_loss, metric_fn=lambda o, t: (o - t).abs().mean()
    )

    # 2 batches x (1 + 2 contributing seeds); seed 2 (ISOLATED_INIT) costs no forward.
    assert len(forwards) == 2 * 3
    assert torch.equal(torch.get_rng_state(), rng)  # no global random number drawn
    assert model.training and all(m.training for m in model.modules())
    assert slot.stages() == stages and [s.alpha_value for s in slot.seeds] == alphas
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert all(torch.equal(v, now[k]) for k, v in weights.items())  # gate scores aside

    def by_hand(chunks: tuple[bool, bool]) -> float:
        total = 0.0
        for x, t in batches:
            with torch.no_grad():
                h = slot.host(x)
            h0, h1, h2 = h.split(2, dim=-1)
            c0 = 2.0 * h0 if chunks[0] else h0
            c1 = 0.5 * (h1 + 1.0) + 0.5 * h1 if chunks[1] else h1
            total += len(x) * F.mse_loss(torch.cat([c0, c1, h2], -1), t).item()
        return total / 6

    with_all = by_hand((True, True))
    expected = {
        "fc[0]": (with_all, by_hand((False, True))),
        "fc[1]": (with_all, by_hand((True, False))),
        "fc[2]": (with_all, with_all),
    }
    assert set(results) == set(expected)
    for sid, (loss_with, loss_without) in expected.items():
        ev = results[sid]
        assert ev.loss_with == pytest.approx(loss_with, rel=1e-6)
        assert ev.loss_without == pytest.approx(loss_without, rel=1e-6)
        assert ev.benefit == pytest.approx(1 - loss_with / loss_without, rel=1e-5, abs=1e-9)
        assert ev.score == pytest.approx(0.5 + 0.5 * max(-1.0, min(1.0, ev.benefit)))
        assert ev.samples == 6 and not math.isnan(ev.metric_with)
        seed = slot.seeds[int(sid[3])]
        assert seed.evaluation is ev and seed.gate_score == ev.score
        row = registry.table.read_row(seed.state_index)
        assert row["GATE_SCORE"] == round(ev.score * 1000)
    assert results["fc[0]"].stage == S.STABILIZATION and results["fc[1]"].alpha == 0.5
    assert results["fc[2]"].benefit == 0.0


class KeywordInputs(nn.Module):
    """A model called as Hugging Face models are: ``model(**batch)``, ``batch`` a mapping."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, scale: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.inner(features) * scale


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_a_seed_in_an_encoder_layer_is_measured_on_a_packed_batch() -> None:
    """``nn.TransformerEncoder`` in inference packs a batch with a padding mask into a nested
    tensor (its default): the ablation put the host's chunk back with dense tensor ops and
    raised, so such a seed could never be measured. On the padded form, as the slot grafts,
    the packed encoder measures the real positions as the dense one does."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, 8, generator=gen)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:], pad[2, 2:] = True, True
    measured = []
    for packed in (False, True):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=packed)
        (slot,) = attach(model, ["layers.1"], 2, 4)
        registry = SlotRegistry(model, [slot])
        slot.seed(0).attach_kernel(Scale(2.0))
        for stage in (S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION):
            slot.seed(0).transition_to(stage)
        results = evaluate_seeds(
            registry, [((x, None, pad), None)], lambda out, _: out[~pad].pow(2).mean()
        )
        measured.append(results[slot.seed(0).seed_id])
    dense, packed_ = measured
    assert dense.faults == packed_.faults == 0
    assert packed_.loss_with != packed_.loss_without  # the seed's chunk was put back
    assert packed_.loss_with == pytest.approx(dense.loss_with, rel=1e-5)
    assert packed_.loss_without == pytest.approx(dense.loss_without, rel=1e-5)


def test_mapping_inputs_are_passed_as_keyword_arguments() -> None:
    model, _, registry = _tiny()
    gen = torch.Generator().manual_seed(5)
    x, t = torch.randn(4, 3, generator=gen), torch.randn(4, 6, generator=gen)
    want = evaluate_seeds(registry, [(x, t)], F.mse_loss)
    keyword = KeywordInputs(model)
    registry.model = keyword
    batch = {"scale": torch.ones(()), "features": x}  # a tokenizer's BatchEncoding is a Mapping
    got = evaluate_seeds(registry, [(batch, t)], F.mse_loss)
    assert set(got) == set(want)
    for sid, ev in want.items():
        assert got[sid].loss_with == ev.loss_with and got[sid].loss_without == ev.loss_without
        assert got[sid].samples == 4
    # Targets that show no batch size (a loss that reads labels from the batch itself): the
    # size is the first mapping value that has one, past the 0-d scale.
    sized = evaluate_seeds(registry, [(batch, None)], lambda out, _: F.mse_loss(out, t))
    assert all(ev.samples == 4 for ev in sized.values())


def test_an_empty_batch_weighs_nothing() -> None:
    """The last batch of a filtered loader can hold no sample. Its mean loss and metric are
    NaN (0/0), and ``0 * NaN`` made every measurement NaN, so G5 refused every seed."""
    model, _, registry = _tiny()
    gen = torch.Generator().manual_seed(7)
    x, t = torch.randn(4, 3, generator=gen), torch.randn(4, 6, generator=gen)

    def metric(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (o - t).abs().mean()

    want = evaluate_seeds(registry, [(x, t)], F.mse_loss, metric_fn=metric)
    got = evaluate_seeds(registry, [(x[:0], t[:0]), (x, t)], F.mse_loss, metric_fn=metric)
    assert set(got) == set(want)
    for sid, ev in want.items():
        assert math.isfinite(got[sid].loss_with) and math.isfinite(got[sid].metric_with)
        assert got[sid].loss_with == ev.loss_with and got[sid].loss_without == ev.loss_without
        assert got[sid].metric_with == ev.metric_with and got[sid].samples == 4
    with pytest.raises(ValueError, match=r"non-empty validation batch \(given 2, every one"):
        evaluate_seeds(registry, [(x[:0], t[:0])] * 2, F.mse_loss)


@pytest.mark.parametrize("which", ["loss_fn", "metric_fn"])
@pytest.mark.parametrize("result", ["1.0", None])
def test_a_loss_or_metric_that_is_no_number_is_refused(which: str, result: object) -> None:
    """A ``loss_fn`` returning the str ``"1.0"`` was read as 1.0 (``float()`` of it), a G5
    verdict on a value no one computed; ``None`` raised float()'s own TypeError. Each is a
    ``TypeError`` naming what the functions return, and no seed records an evaluation."""
    model, slot, registry = _tiny()
    x, t = torch.randn(4, 3), torch.randn(4, 6)
    fns = {"loss_fn": F.mse_loss, "metric_fn": F.mse_loss, which: lambda o, t: result}
    with pytest.raises(TypeError, match="must return a batch mean .* got"):
        evaluate_seeds(registry, [(x, t)], fns["loss_fn"], metric_fn=fns["metric_fn"])
    assert all(seed.evaluation is None for seed in slot.seeds)
    assert set(evaluate_seeds(registry, [(x, t)], F.mse_loss)) == {s.seed_id for s in slot.seeds}


@pytest.mark.parametrize("rows", [4, 0])
@pytest.mark.parametrize("which", ["loss_fn", "metric_fn"])
def test_a_per_sample_loss_or_metric_is_refused_naming_it(which: str, rows: int) -> None:
    """A ``loss_fn`` with ``reduction="none"`` raised ``item()``'s "a Tensor with 4 elements
    cannot be converted to Scalar", naming neither function nor what they must return; one
    selecting no row (an empty tensor) is no batch mean either."""
    model, slot, registry = _tiny()
    x, t = torch.randn(4, 3), torch.randn(4, 6)
    per_sample = lambda o, t: F.mse_loss(o, t, reduction="none").mean(dim=1)[:rows]  # noqa: E731
    fns = {"loss_fn": F.mse_loss, "metric_fn": F.mse_loss, which: per_sample}
    with pytest.raises(TypeError, match=rf"must return a batch mean .* shape \({rows},\)"):
        evaluate_seeds(registry, [(x, t)], fns["loss_fn"], metric_fn=fns["metric_fn"])
    assert all(seed.evaluation is None for seed in slot.seeds)


def test_a_loss_or_metric_of_numpy_is_a_number() -> None:
    """A NumPy scalar or 0-d array (a metric computed with NumPy or scikit-learn) is a number."""
    import numpy as np

    model, slot, registry = _tiny()
    x, t = torch.randn(4, 3), torch.randn(4, 6)
    for value in (np.float32(0.5), np.array(0.5), 0.5):
        got = evaluate_seeds(registry, [(x, t)], F.mse_loss, metric_fn=lambda o, t, v=value: v)
        assert all(ev.metric_with == 0.5 for ev in got.values())


def test_no_live_seed_means_no_forward() -> None:
    slot = KasminaLayer(nn.Linear(3, 4), 2, 2, layer_id="fc")
    registry = SlotRegistry(nn.Sequential(slot), [slot])
    calls = []
    slot.host.register_forward_hook(lambda *_: calls.append(1))
    assert evaluate_seeds(registry, [(torch.zeros(1, 3), torch.zeros(1, 4))], F.mse_loss) == {}
    assert calls == []


def test_a_metric_nan_on_one_batch_is_recorded_and_refused_by_g5(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One NaN batch makes the metric's averages NaN; the evaluation still says a metric was
    asked for, so G5 refuses the seed (fail closed) instead of passing it on the loss alone."""
    _, slot, registry = _tiny()
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(4, 3, generator=gen), torch.randn(4, 6, generator=gen)) for _ in "abcd"]
    undefined = batches[2][0]

    def metric(output: torch.Tensor, _targets: torch.Tensor) -> torch.Tensor:
        return torch.tensor(math.nan) if current[0] is undefined else output[:, 0].mean()

    current: list[torch.Tensor] = []

    def loader():
        for x, t in batches:
            current[:] = [x]
            yield x, t

    clean = evaluate_seeds(registry, batches, F.mse_loss, lambda o, _t: o[:, 0].mean())["fc[0]"]
    assert clean.metric_given and math.isfinite(clean.metric_with)
    with caplog.at_level("WARNING", logger="kasmina.manager.evaluation"):
        ev = evaluate_seeds(registry, loader(), F.mse_loss, metric)["fc[0]"]
    assert "not finite on 1 of 4 validation batches" in caplog.text
    assert ev.metric_given and ev.metric_measured and ev.samples == 16
    assert math.isnan(ev.metric_with) and math.isnan(ev.metric_without)
    assert ev.loss_with == pytest.approx(clean.loss_with) and slot.seeds[0].evaluation is ev
    result = gate_g5_performance(ev, 0.0, max_metric_drop=math.inf)  # only the metric refuses
    assert not result.passed and "not finite" in result.reason
    assert gate_g5_performance(clean, 0.0, max_metric_drop=math.inf).passed
    unasked = evaluate_seeds(registry, batches, F.mse_loss)["fc[0]"]
    assert not unasked.metric_given and not unasked.metric_measured


@pytest.mark.parametrize("how", ["compiled forward", "module.compile"])
def test_a_compiled_forward_is_measured_with_the_ablation_it_runs(how: str) -> None:
    """TorchDynamo does not guard on hooks added after it compiled a forward: the ablation's
    hooks must not meet a cached graph, or the seed is measured against itself (benefit 0)."""
    torch._dynamo.reset()
    model, slot, registry = _tiny()
    batches = [(torch.randn(4, 3), torch.randn(4, 6))]
    want = evaluate_seeds(registry, batches, F.mse_loss)
    if how == "module.compile":
        model.compile(backend="eager")
    else:
        model.forward = torch.compile(model.forward, backend="eager")
    model.eval()
    with torch.no_grad():
        model(batches[0][0])  # a graph cached before the evaluation
    got = evaluate_seeds(registry, batches, F.mse_loss)
    for sid in ("fc[0]", "fc[1]"):
        assert got[sid].loss_without == pytest.approx(want[sid].loss_without, rel=1e-6)
        assert got[sid].loss_without != got[sid].loss_with


@pytest.mark.parametrize("which", ["batches", "loss_fn", "metric_fn"])
def test_arguments_of_the_wrong_kind_are_refused_by_name(which: str) -> None:
    """``batches=None`` raised "'NoneType' object is not iterable" and ``loss_fn=None`` "is not
    callable", from inside the measurement (only with a live seed). Each is a TypeError naming
    the argument, before any forward, and no seed records an evaluation."""
    model, slot, registry = _tiny()
    x, t = torch.randn(4, 3), torch.randn(4, 6)
    args = {"batches": [(x, t)], "loss_fn": F.mse_loss, "metric_fn": None, which: None}
    if which == "metric_fn":
        args["metric_fn"] = "accuracy"
    with pytest.raises(TypeError, match=f"^{which} must"):
        evaluate_seeds(registry, args["batches"], args["loss_fn"], metric_fn=args["metric_fn"])
    assert all(seed.evaluation is None for seed in slot.seeds)


def test_batches_iterated_through_getitem_are_measured_and_a_loader_is_not_started_early() -> None:
    """The wrong-kind check took ``isinstance(batches, Iterable)``: a map-style ``Dataset`` of
    batches (``__getitem__`` and ``__len__``, which a for loop iterates) was refused as not
    yielding pairs. What ``iter()`` takes is measured as a list of the same batches is; a str,
    an ``__iter__ = None`` opt-out and a number are still refused. The check calls no
    ``__iter__`` (a shuffled loader's draws a seed from the global generator, outside the
    measurement's forked one, and starts its workers with no seed to measure)."""
    x, t = torch.randn(4, 3), torch.randn(4, 6)

    class Batches(torch.utils.data.Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return 1

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            if i >= 1:
                raise IndexError(i)
            return x, t

    _, _, registry = _tiny()
    expected = evaluate_seeds(registry, [(x, t)], F.mse_loss)
    _, _, registry = _tiny()
    got = evaluate_seeds(registry, Batches(), F.mse_loss)
    assert got.keys() == expected.keys() and all(v.samples == 4 for v in got.values())
    assert all(got[k].loss_with == expected[k].loss_with for k in got)
    loader = torch.utils.data.DataLoader([(x[i], t[i]) for i in range(4)], 2, shuffle=True)
    _, _, registry = _tiny()
    rng = torch.get_rng_state()
    assert evaluate_seeds(registry, loader, F.mse_loss)["fc[0]"].samples == 4
    assert torch.equal(torch.get_rng_state(), rng)

    class OptedOut(Batches):
        __iter__ = None  # type: ignore[assignment]

    for wrong in ("ab", OptedOut(), 3):
        with pytest.raises(TypeError, match="^batches must yield"):
            evaluate_seeds(registry, wrong, F.mse_loss)  # type: ignore[arg-type]
