"""kasmina.save / load / merge, and deepcopy and pickling of a managed model
(docs/design.md §6a, "Keeping what you grew")."""

from __future__ import annotations

import copy
import io
import json
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

import kasmina
from kasmina.errors import ArtifactIntegrityError
from kasmina.persist.format import SavedModelError, read_saved, write_saved
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.stages import SeedStage
from kasmina.urza.keys import PublisherKey
from tests.manager.helpers import PUBLISHER, SEED0, SEED1, Host
from tests.persist.conftest import Grown

S = SeedStage


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    no_slots = not any(isinstance(m, KasminaLayer) for m in model.modules())
    same = after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    return no_slots and same


def _seeds(model: nn.Module) -> list[GradientIsolatedSeed]:
    return [m for m in model.modules() if isinstance(m, GradientIsolatedSeed)]


def test_a_compiled_model_saves_and_loads_by_its_own_names(grown: Grown, tmp_path: Path) -> None:
    """``torch.compile`` wraps the model in a module that names everything under
    ``_orig_mod.``: a file saved from it had slots a plain model does not have, and loaded
    only into another compiled model. Saved and loaded through the module it compiled, the
    file moves between compiled and plain models either way."""
    path = kasmina.save(torch.compile(grown.model), tmp_path / "compiled.kasmina")
    publishers = PUBLISHER.trusted_publishers()
    for target, tol in ((Host(), 0.0), (torch.compile(Host()), 1e-5)):  # Inductor's rounding
        slots = kasmina.load(path, target, publishers=publishers)
        assert [s.layer_id for s in slots] == ["out"]
        target.eval()
        with torch.no_grad():
            torch.testing.assert_close(target(grown.x), grown.model(grown.x), rtol=tol, atol=tol)


def test_a_data_parallel_model_saves_by_its_modules_names(grown: Grown, tmp_path: Path) -> None:
    """``DistributedDataParallel`` names everything under ``module.``: a file saved from the
    wrapper (``wrap_ddp``'s result, what a data-parallel loop holds) named slots a plain model
    does not have, and loaded into none. Saved through the module it wraps, as a compiled
    model is. (The wrapper is built without a process group: only its naming matters here.)"""
    wrapper = torch.nn.parallel.DistributedDataParallel.__new__(
        torch.nn.parallel.DistributedDataParallel
    )
    torch.nn.Module.__init__(wrapper)
    wrapper.module = grown.model
    path = kasmina.save(torch.compile(wrapper), tmp_path / "ddp.kasmina")
    with pytest.raises(SavedModelError, match="before wrapping it"):  # its lists predate slots
        kasmina.load(path, torch.compile(wrapper), publishers=PUBLISHER.trusted_publishers())
    target = Host()
    slots = kasmina.load(path, target, publishers=PUBLISHER.trusted_publishers())
    assert [s.layer_id for s in slots] == ["out"]
    target.eval()
    with torch.no_grad():
        torch.testing.assert_close(target(grown.x), grown.model(grown.x), rtol=0, atol=0)


def test_a_file_an_older_kasmina_saved_from_a_compiled_model_still_loads(
    grown: Grown, saved: Path, tmp_path: Path
) -> None:
    """Before saves went through the compiled module, a compiled model's file named every
    slot, seed slot and weight under ``_orig_mod.`` (same format version). Such a file loads
    as the newer file does, into a plain model and a compiled one."""
    body = dict(read_saved(saved))
    body["slots"] = [{**s, "name": "_orig_mod." + s["name"]} for s in body["slots"]]
    body["seeds"] = [{**s, "slot": "_orig_mod." + s["slot"]} for s in body["seeds"]]
    body["weights"] = {"_orig_mod." + k: v for k, v in body["weights"].items()}
    older = write_saved(tmp_path / "older.kasmina", body)
    publishers = PUBLISHER.trusted_publishers()
    reference = Host()
    kasmina.load(saved, reference, publishers=publishers)
    expected = reference.state_dict()
    for compiled in (False, True):
        plain = Host()
        target = torch.compile(plain) if compiled else plain
        slots = kasmina.load(older, target, publishers=publishers)
        assert [s.layer_id for s in slots] == ["out"]
        assert [s.stage for s in _seeds(plain)] == [S.ACTIVE, S.GRAFTING]
        loaded = plain.state_dict()
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    body["weights"] = {k.removeprefix("_orig_mod."): v for k, v in body["weights"].items()}
    mixed = write_saved(tmp_path / "mixed.kasmina", body)  # some names prefixed: no guessing
    fresh = Host()
    before = _snapshot(fresh)
    with pytest.raises(SavedModelError, match="has no module '_orig_mod.out'"):
        kasmina.load(mixed, fresh, publishers=publishers)
    assert _unchanged(fresh, before)


def test_a_file_an_older_kasmina_saved_from_a_data_parallel_model_still_loads(
    grown: Grown, saved: Path, tmp_path: Path
) -> None:
    """Before saves went through the module ``DistributedDataParallel`` wraps, a file saved
    from ``wrap_ddp``'s result named every slot, seed slot and weight under ``module.`` (under
    ``_orig_mod.module.`` from a compiled one), and a load now refuses a DDP wrapper: such a
    file loaded into no model. It loads as the newer file does, the prefixes dropped; a model
    that has a ``module`` of its own is looked up as it is."""
    body = dict(read_saved(saved))
    publishers = PUBLISHER.trusted_publishers()
    reference = Host()
    kasmina.load(saved, reference, publishers=publishers)
    expected = reference.state_dict()
    for prefix in ("module.", "_orig_mod.module."):
        older = dict(body)
        older["slots"] = [{**s, "name": prefix + s["name"]} for s in body["slots"]]
        older["seeds"] = [{**s, "slot": prefix + s["slot"]} for s in body["seeds"]]
        older["weights"] = {prefix + k: v for k, v in body["weights"].items()}
        path = write_saved(tmp_path / "older.kasmina", older)
        plain = Host()
        slots = kasmina.load(path, torch.compile(plain), publishers=publishers)
        assert [s.layer_id for s in slots] == ["out"]
        assert [s.stage for s in _seeds(plain)] == [S.ACTIVE, S.GRAFTING]
        loaded = plain.state_dict()
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    outer = nn.Module()
    outer.module = Host()  # its own "module": the file's names are its names
    slots = kasmina.load(path, outer, publishers=publishers)
    assert [s.layer_id for s in slots] == ["module.out"]


def test_load_restores_a_grown_model_bitwise(grown: Grown, saved: Path) -> None:
    fresh = Host()
    slots = kasmina.load(saved, fresh, publishers=PUBLISHER.trusted_publishers())
    fresh.eval()
    assert [s.layer_id for s in slots] == ["out"]
    assert [s.stage for s in _seeds(fresh)] == [S.ACTIVE, S.GRAFTING]
    for mine, theirs in zip(_seeds(fresh), _seeds(grown.model), strict=True):
        assert mine.alpha_value == theirs.alpha_value and mine.seed_id == theirs.seed_id
    table, original = slots[0].state_table, grown.rig.slot.state_table
    assert torch.equal(table.state_tensor, original.state_tensor)
    with torch.no_grad():
        assert torch.equal(fresh(grown.x), grown.model(grown.x))
        assert not torch.equal(fresh(grown.x), Host()(grown.x))  # the seeds do contribute


def test_a_load_under_inference_mode_gives_a_model_that_trains(grown: Grown, saved: Path) -> None:
    """Loaded inside ``torch.inference_mode()`` (a serving block), the slots, kernel copies and
    state table it built were inference tensors: the host trained on, but the first step that
    updated a seed's kernel in place raised, as did every tick of its table."""
    fresh = Host()
    with torch.inference_mode():
        slots = kasmina.load(saved, fresh, publishers=PUBLISHER.trusted_publishers())
    tensors = [*fresh.parameters(), *fresh.buffers(), slots[0].state_table.state_tensor]
    assert not any(t.is_inference() for t in tensors)
    kernel = _seeds(fresh)[0].kernel
    before = [p.detach().clone() for p in kernel.parameters()]
    optimizer = torch.optim.SGD(fresh.parameters(), lr=0.1)
    fresh.train()
    fresh(grown.x).square().mean().backward()
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, kernel.parameters(), strict=True))
    slots[0].state_table.tick()
    fresh.eval()
    with torch.inference_mode():  # and it still serves there
        assert fresh(grown.x).isfinite().all()


def test_a_loaded_seed_inside_a_transformer_encoder_layer_is_never_skipped(
    tmp_path: Path,
) -> None:
    """``kasmina.load`` installs slots as ``attach`` does: inside a ``TransformerEncoderLayer``
    a loaded seed that runs makes the layer take its regular path in inference, so the output
    is the saved model's, not the bare host's (the fused path would skip the seed)."""
    from kasmina.urza.blueprints import ResidualMLP
    from kasmina.urza.client import UrzaLibraryClient
    from kasmina.urza.kernel import GPUKernel
    from kasmina.urza.publish import publish_artifact

    def build() -> nn.Module:
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()

    torch.manual_seed(1)
    manifest = publish_artifact(
        ResidualMLP(4, 8, init_scale=1.0).eval(),
        (torch.randn(2, 5, 4),),
        str(tmp_path / "urza"),
        "mlp",
        PUBLISHER,
    )
    client = UrzaLibraryClient(str(tmp_path / "urza"), PUBLISHER.trusted_publishers())
    payload, verified = client.fetch(manifest.artifact_id)
    model = build()
    (slot,) = kasmina.attach(model, ["layers.0.linear2"], 2, 4)
    kernel = GPUKernel.from_binary(payload, verified, "cpu")
    slot.seed(0).attach_kernel(kernel, manifest.artifact_id)
    for stage in [S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION, S.ACTIVE]:
        slot.seed(0).transition_to(stage)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        grown = model(x)
        assert not torch.allclose(grown, build()(x))  # the seed contributes
    fresh = build()
    (loaded,) = kasmina.load(
        kasmina.save(model, tmp_path / "encoder.kasmina"),
        fresh,
        publishers=PUBLISHER.trusted_publishers(),
    )
    with torch.no_grad():
        assert torch.equal(fresh(x), grown)
    assert loaded.guards_fused_path and loaded.seed(0).stage == S.ACTIVE


def test_a_model_moved_to_bf16_after_growing_loads_bitwise_into_a_bf16_host(
    grown: Grown, tmp_path: Path
) -> None:
    model = copy.deepcopy(grown.model).to(torch.bfloat16)
    path = kasmina.save(model, tmp_path / "bf16.kasmina")
    fresh = Host().to(torch.bfloat16)
    kasmina.load(path, fresh, publishers=PUBLISHER.trusted_publishers())
    fresh.eval()
    kernels = [seed.kernel for seed in _seeds(fresh)]
    assert all(p.dtype == torch.bfloat16 for k in kernels for p in k.parameters())
    x = grown.x.to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    assert [seed.faults for seed in _seeds(fresh)] == [0, 0]


def test_a_host_with_a_quantized_layer_loads(tmp_path: Path) -> None:
    """The saved weights lost the modules' format versions (``_metadata``): an int8 dynamic
    ``Linear`` then read its state as the oldest format and raised KeyError mid-load, after
    the layers before it had been written."""
    from torch.ao.quantization import quantize_dynamic

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        return quantize_dynamic(mlp, {"2"}, dtype=torch.qint8)

    model = build(0).eval()
    kasmina.attach(model, ["4"], seeds_per_layer=2, chunk_size=2)
    x = torch.randn(3, 6)
    path = kasmina.save(model, tmp_path / "q.kasmina")
    fresh = build(1).eval()
    kasmina.load(path, fresh, publishers=PUBLISHER.trusted_publishers())
    assert torch.equal(fresh(x), model(x))


def test_a_fresh_qat_host_loads_the_per_channel_observers_it_was_saved_with(
    tmp_path: Path,
) -> None:
    """A QAT host's fake-quant scales hold one element until the first forward and one per
    channel after; their loader resizes them, so ``load_state_dict`` takes a trained state into a
    fresh host. kasmina.load refused it as an architecture mismatch (its shape check was
    stricter than the modules' own loaders)."""
    from torch.ao.quantization import disable_observer, get_default_qat_qconfig, prepare_qat

    def build() -> nn.Module:
        torch.manual_seed(0)
        mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).train()
        mlp.qconfig = get_default_qat_qconfig("x86")
        return prepare_qat(mlp)

    model = build()
    model(torch.randn(16, 6))  # the observers take their per-channel sizes
    kasmina.attach(model, ["2"], seeds_per_layer=2, chunk_size=2)
    model.eval().apply(disable_observer)
    path = kasmina.save(model, tmp_path / "qat.kasmina")
    fresh = build()
    kasmina.load(path, fresh, publishers=PUBLISHER.trusted_publishers())
    fresh.eval().apply(disable_observer)
    x = torch.randn(5, 6)
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
def test_a_loaded_model_refuses_a_seed_state_before_any_module_loads(saved: Path, strict) -> None:
    """As after ``kasmina.attach``: every seed of a model ``kasmina.load`` built checks its
    incoming state before the first module (``inp``, ahead of the slot) loads anything."""
    fresh = Host()
    kasmina.load(saved, fresh, publishers=PUBLISHER.trusted_publishers())
    bare = Host()
    kasmina.attach(bare, "out", 2, 2)  # its seeds DORMANT, without kernels
    stale = _snapshot(bare)
    stale["inp.weight"] = torch.full_like(stale["inp.weight"], 7.0)
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match="saved in DORMANT without a kernel"):
        fresh.load_state_dict(stale, strict=strict)
    after = fresh.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_tampered_file_is_refused_and_the_model_untouched(grown: Grown, saved: Path) -> None:
    publishers = PUBLISHER.trusted_publishers()
    fresh = Host()
    before = _snapshot(fresh)
    damaged = bytearray(saved.read_bytes())
    damaged[-100] ^= 0xFF
    saved.with_suffix(".damaged").write_bytes(bytes(damaged))
    with pytest.raises(ArtifactIntegrityError, match="SHA-256"):
        kasmina.load(saved.with_suffix(".damaged"), fresh, publishers=publishers)
    # A forger who also rewrites the digest: the kernel program no longer matches its manifest.
    body = read_saved(saved)
    (entry,) = body["artifacts"].values()
    entry["payload"] = entry["payload"][:-1] + bytes([entry["payload"][-1] ^ 1])
    write_saved(saved, body)
    with pytest.raises(ArtifactIntegrityError, match="SHA-256 does not match its manifest"):
        kasmina.load(saved, fresh, publishers=publishers)
    body = read_saved(saved)
    (entry,) = body["artifacts"].values()
    entry["manifest"] = entry["manifest"].replace(b'"mlp"', b'"evil"')
    write_saved(saved, body)
    with pytest.raises(ArtifactIntegrityError, match="signature does not verify"):
        kasmina.load(saved, fresh, publishers=publishers)
    assert _unchanged(fresh, before)


def test_an_unknown_publisher_is_refused(saved: Path) -> None:
    fresh = Host()
    before = _snapshot(fresh)
    stranger = PublisherKey.generate("other").trusted_publishers()
    with pytest.raises(ArtifactIntegrityError, match="unknown publisher"):
        kasmina.load(saved, fresh, publishers=stranger)
    assert _unchanged(fresh, before)


class Wider(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 10)
        self.out = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.inp(x))


class Elsewhere(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.head = nn.Linear(8, 4)


def test_a_wrong_architecture_is_refused(saved: Path) -> None:
    publishers = PUBLISHER.trusted_publishers()
    cases = (
        (Wider(), "inp.weight is"),
        (Elsewhere(), "has no module 'out'"),
        # The kernels keep the saved dtype: a bf16 host would run none of the grown seeds.
        (Host().to(torch.bfloat16), "dtype mismatch: inp.weight is torch.bfloat16 here"),
    )
    for model, match in cases:
        before = _snapshot(model)
        with pytest.raises(SavedModelError, match=match):
            kasmina.load(saved, model, publishers=publishers)
        assert _unchanged(model, before)
    attached = Host()
    kasmina.attach(attached, "out", 2, 2)
    with pytest.raises(SavedModelError, match="already has Kasmina slots"):
        kasmina.load(saved, attached, publishers=publishers)


def test_an_incompatible_version_is_refused(saved: Path) -> None:
    raw = saved.read_bytes().replace(b'"format_version":1', b'"format_version":9', 1)
    saved.write_bytes(raw)
    with pytest.raises(SavedModelError, match="format version 9"):
        kasmina.load(saved, Host(), publishers=PUBLISHER.trusted_publishers())


def test_state_dict_into_kernel_less_slots_raises_naming_kasmina_load(grown: Grown) -> None:
    state = grown.model.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # extra state included
    for strict in (True, False):
        fresh = Host()
        kasmina.attach(fresh, "out", 2, 2)
        before = _snapshot(fresh)
        with pytest.raises(ValueError, match=r"kasmina\.load"):
            fresh.load_state_dict(state, strict=strict)
        assert [s.stage for s in _seeds(fresh)][0] is S.DORMANT  # the ACTIVE seed came first
        # Every seed was asked before any module loaded: the hosts' weights too are as before.
        after = fresh.state_dict()
        assert all(torch.equal(after[k], before[k]) for k in before)
    # Into slots whose seeds hold kernels (a rollback, a copy), the state restores fully.
    twin = copy.deepcopy(grown.model)
    for seed in _seeds(twin):
        nn.init.zeros_(next(seed.kernel.parameters()))
    twin.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(twin(grown.x), grown.model(grown.x))


def test_a_state_for_another_seed_layout_is_refused_before_anything_loads(grown: Grown) -> None:
    """The same host attached with another chunk size: the saved seeds are other seeds. The
    error says so, and nothing of the model changes (nor of a bare KasminaLayer's host)."""
    state = grown.model.state_dict()
    fresh = Host()
    kasmina.attach(fresh, "out", 1, 4)
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match="chunk size 2, this one has 4"):
        fresh.load_state_dict(state, strict=False)
    after = fresh.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    layer = fresh.out
    inner = {k.removeprefix("out."): v for k, v in state.items() if k.startswith("out.")}
    host = {k: v.clone() for k, v in layer.host.state_dict().items()}
    with pytest.raises(ValueError, match="chunk size"):
        layer.load_state_dict(inner, strict=False)
    assert all(torch.equal(layer.host.state_dict()[k], v) for k, v in host.items())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: [1, 2], "JSON object, got list"),
        (lambda d: {k: v for k, v in d.items() if k != "alpha"}, "has no 'alpha'"),
        (lambda d: {**d, "row": ["a"] * len(d["row"])}, "saved 'row'"),
        (lambda d: {**d, "gate_score": None}, "saved 'gate_score'"),
        (lambda d: {**d, "graft_step": -1}, "saved 'graft_step'"),
        (lambda d: {**d, "graft_step": 10**400}, "saved 'graft_step'"),
        (lambda d: {**d, "trained_epochs": -1}, "saved 'trained_epochs'"),
        (lambda d: {**d, "trained_this_epoch": 1}, "saved 'trained_this_epoch'"),
    ],
    ids=[
        "list",
        "missing",
        "row",
        "gate_score",
        "graft_step",
        "huge_graft_step",
        "trained_epochs",
        "trained_this_epoch",
    ],
)
def test_a_malformed_extra_state_is_a_value_error_naming_it(change, message) -> None:
    seed = GradientIsolatedSeed(2, "s")
    saved = json.loads(bytes(seed.get_extra_state().tolist()).decode())
    bad = encode_json(change(saved))
    row = seed.state_table.state_tensor.clone()
    with pytest.raises(ValueError, match=message):
        seed.set_extra_state(bad)
    assert torch.equal(seed.state_table.state_tensor, row)


def _donor_state() -> dict[str, torch.Tensor]:
    donor = Host()
    kasmina.attach(donor, "out", 2, 2)
    with torch.no_grad():
        for p in donor.parameters():
            p.add_(1.0)
    return donor.state_dict()


@pytest.mark.parametrize("bad", [-1, 2**40, "x", None, 1.5, True])
def test_a_bad_state_row_refuses_the_whole_load(bad) -> None:
    """A row that ``restore_row`` refuses (a negative epoch count, past int32, not an integer)
    passed the pre-load check, which read only its length and stage: the load raised from the
    seed's ``set_extra_state`` after the modules before it had loaded, half a model, and a
    string or None raised an error that named no field. The pre-load check is the restore's."""
    state = _donor_state()
    saved = json.loads(bytes(state["out.seeds.1._extra_state"].tolist()).decode())
    saved["row"][2] = bad
    state["out.seeds.1._extra_state"] = encode_json(saved)
    model = Host()
    kasmina.attach(model, "out", 2, 2)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="seed .*saved 'row'"):
        model.load_state_dict(state)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("alpha", [float("nan"), 1.7014118346046923e38, -0.5, float("inf")])
def test_a_seed_alpha_out_of_range_refuses_the_whole_load(alpha: float) -> None:
    """A seed's ``alpha`` buffer (what the GRAFTING blend reads) was loaded unchecked: one
    flipped exponent bit in a safetensors snapshot (0.5 -> 1.7e38) or a NaN made the host's
    output, and after its step its weights, non-finite, with no fault recorded. A value
    outside [0, 1] refuses the load before anything changes; one inside loads, as the alpha
    the seed's extra state holds (the blend follows the lifecycle's alpha)."""
    state = _donor_state()
    model = Host()
    kasmina.attach(model, "out", 2, 2)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"out\.seeds\.1\.alpha: .*\[0, 1\]"):
        model.load_state_dict({**state, "out.seeds.1.alpha": torch.tensor(alpha)})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="one-element float tensor"):
        model.load_state_dict({**state, "out.seeds.1.alpha": torch.tensor(1)})
    model.load_state_dict({**state, "out.seeds.1.alpha": torch.tensor(0.25)})
    assert float(model.out.seeds[1].alpha) == float(state["out.seeds.1.alpha"])


def test_a_refused_load_of_a_module_holding_a_slot_changes_none_of_its_modules() -> None:
    """Only the model and the slot carried the check that runs before anything loads: a load
    of a block between them (``model.block.load_state_dict``) reached the slot's own check
    after the block's first modules were written, so a refused seed state left the block half
    loaded. Each module between gets it; a detach takes it off those above no slot."""
    model = nn.Sequential(
        nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)),
        nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4))),
    )
    first, second = kasmina.attach(model, ["0.2", "1.1.0"], 2, 2)
    for block in (model[0], model[1], model[1][1], model):
        incoming = {k: torch.full_like(v, 0.5) for k, v in block.state_dict().items()}
        incoming.update({k: v for k, v in block.state_dict().items() if "seeds" in k})
        bad = [k for k in incoming if k.endswith("seeds.1.alpha")][-1]
        before = _snapshot(model)
        with pytest.raises(ValueError, match=r"seeds\.1\.alpha: .*\[0, 1\]"):
            block.load_state_dict({**incoming, bad: torch.tensor(2.0)})
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        block.load_state_dict(incoming)  # a good one loads
        assert all(torch.equal(v, incoming[k]) for k, v in block.state_dict().items())

    def hooked() -> list[nn.Module]:  # a seed's own hooks are its own
        seeds = [m for m in model.modules() if isinstance(m, GradientIsolatedSeed)]
        return [m for m in model.modules() if m._load_state_dict_pre_hooks and m not in seeds]

    # (a slot's ``seeds`` list checks a load into it alone)
    assert hooked() == [
        model,
        model[0],
        first,
        first.seeds,
        model[1],
        model[1][1],
        second,
        second.seeds,
    ]
    kasmina.detach(model, only=[second])
    assert hooked() == [model, model[0], first, first.seeds]
    kasmina.detach(model)
    assert hooked() == []


def test_an_oversized_extra_state_is_refused_before_it_is_decoded() -> None:
    """A seed's state is 2 KiB; a crafted one of 100 MB (valid JSON padded with spaces) was
    decoded whole, at nine times its size, three times over (check, set). Above 1 MiB it is
    refused before any byte is read; one at the limit still decodes."""
    seed = GradientIsolatedSeed(2, "s")
    text = bytes(seed.get_extra_state().tolist()).rstrip()
    row = seed.state_table.state_tensor.clone()
    for size, fits in ((1 << 20, True), ((1 << 20) + 1, False)):
        padded = torch.frombuffer(bytearray(text + b" " * (size - len(text))), dtype=torch.uint8)
        if fits:
            seed.set_extra_state(padded)
        else:
            with pytest.raises(ValueError, match="above 1048576"):
                seed.set_extra_state(padded)
    assert torch.equal(seed.state_table.state_tensor, row)


def test_an_extra_state_saved_before_the_graft_step_was_recorded_still_loads() -> None:
    """States saved before the schedule's step was recorded load, leaving the seed's own."""
    source = GradientIsolatedSeed(2, "s")
    source.graft_step = 5
    saved = json.loads(bytes(source.get_extra_state().tolist()).decode())
    assert saved["graft_step"] == 5
    target = GradientIsolatedSeed(2, "s")
    target.graft_step = 3
    target.set_extra_state(encode_json({k: v for k, v in saved.items() if k != "graft_step"}))
    assert target.graft_step == 3
    target.set_extra_state(encode_json(saved))
    assert target.graft_step == 5


def _decoded(seed: GradientIsolatedSeed) -> dict:
    return json.loads(bytes(seed.get_extra_state().tolist()).decode())


def test_an_extra_state_saved_before_g2_counted_training_counts_its_isolated_epochs() -> None:
    """The upgrade of a state saved before G2 counted the epochs a seed trained: its epochs in
    ISOLATED_INIT count as trained (what G2 assumed then), the epoch under way too (a
    checkpoint taken before its boundary's tick is resumed to the verdict it had), and a seed
    in any other stage counts none (G2 counts afresh on entering ISOLATED_INIT)."""
    source = GradientIsolatedSeed(2, "s")
    source.attach_kernel(nn.Linear(2, 2))
    assert source.advance().passed and source.stage is S.ISOLATED_INIT  # G1
    source.state_table.tick()
    source.state_table.tick()
    saved = _decoded(source)
    assert (saved["trained_epochs"], saved["trained_this_epoch"]) == (0, False)
    new = {"trained_epochs", "trained_this_epoch"}
    old = {k: v for k, v in saved.items() if k not in new}
    target = GradientIsolatedSeed(2, "s")
    target.attach_kernel(nn.Linear(2, 2))
    target.set_extra_state(encode_json(old))
    assert target.stage is S.ISOLATED_INIT and target.epochs_in_stage == 2
    assert (target.trained_epochs, target.trained_this_epoch) == (2, True)
    dormant = GradientIsolatedSeed(2, "s")
    dormant.state_table.tick()
    target = GradientIsolatedSeed(2, "s")
    target.trained_epochs = 5
    target.set_extra_state(
        encode_json({k: v for k, v in _decoded(dormant).items() if k not in new})
    )
    assert target.epochs_in_stage == 1
    assert (target.trained_epochs, target.trained_this_epoch) == (0, False)


def test_load_restores_the_epochs_each_seed_trained_for_g2(grown: Grown, tmp_path: Path) -> None:
    model = copy.deepcopy(grown.model)
    assert [s.trained_epochs for s in _seeds(model)] == [1, 1]  # counted in ISOLATED_INIT
    _seeds(model)[1].trained_epochs, _seeds(model)[1].trained_this_epoch = 4, True
    path = kasmina.save(model, tmp_path / "g2.kasmina")
    fresh = Host()
    kasmina.load(path, fresh, publishers=PUBLISHER.trusted_publishers())
    trained = [(s.trained_epochs, s.trained_this_epoch) for s in _seeds(fresh)]
    assert trained == [(1, False), (4, True)]


def encode_json(value: object) -> torch.Tensor:
    return torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8)


def test_merge_bakes_active_seeds_into_plain_modules(grown: Grown) -> None:
    merged = kasmina.merge(copy.deepcopy(grown.model))
    assert not [m for m in merged.modules() if type(m).__module__.startswith("kasmina")]
    assert merged.out.seed_0 is not None and not hasattr(merged.out, "seed_1")  # GRAFTING dropped
    # The reference: the grown model with its non-ACTIVE seed standing aside.
    reference = copy.deepcopy(grown.model)
    reference.out.seed(1).detach_kernel()
    with torch.no_grad():
        expected = reference(grown.x)
        torch.testing.assert_close(merged(grown.x), expected, rtol=1e-6, atol=1e-6)
    merged.train()
    merged.eval()  # plain modules: no raising train()/eval() overrides left
    program = torch.export.export(merged, (grown.x,))
    torch.testing.assert_close(program.module()(grown.x), expected, rtol=1e-6, atol=1e-6)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)  # what ships: the exported program, no Kasmina inside
    buffer.seek(0)
    assert torch.equal(torch.export.load(buffer).module()(grown.x), program.module()(grown.x))


def test_merge_of_a_slot_without_active_seeds_gives_back_the_host() -> None:
    model = Host()
    host = model.out
    kasmina.attach(model, "out", 2, 2)
    assert kasmina.merge(model).out is host


def test_deepcopy_and_whole_model_pickle_with_a_manager_attached(grown: Grown) -> None:
    timeline = list(grown.rig.manager.require_registry()[SEED0].timeline)
    twin = copy.deepcopy(grown.model)
    buffer = io.BytesIO()
    torch.save(grown.model, buffer)
    buffer.seek(0)
    revived = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        want = grown.model(grown.x)
        assert torch.equal(twin(grown.x), want) and torch.equal(revived(grown.x), want)
    for other in (twin, revived):
        slot = other.out
        assert slot.state_table is not grown.rig.slot.state_table
        assert slot.state_table.telemetry is None  # the manager's reporter stayed behind
        assert [s.stage for s in slot.seeds] == [S.ACTIVE, S.GRAFTING]
        # The copy's seeds still follow their own transitions; the manager hears nothing.
        slot.seed(1).transition_to(S.HARVESTING)
        assert slot.seed(1).kernel is None and grown.rig.slot.seed(1).kernel is not None
    assert list(grown.rig.manager.require_registry()[SEED0].timeline) == timeline
    assert grown.rig.stage(SEED1) == S.GRAFTING


def test_save_refuses_a_model_without_verified_kernels() -> None:
    with pytest.raises(SavedModelError, match="no Kasmina slots"):
        kasmina.save(Host(), "unused")
    model = Host()
    kasmina.attach(model, "out", 2, 2)
    model.out.seed(0).attach_kernel(nn.Linear(2, 2))
    with pytest.raises(SavedModelError, match="not a verified Urza artifact"):
        kasmina.save(model, "unused")


def test_save_pretrained_with_slots_attached(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=16, vocab_size=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    kasmina.attach(model, "transformer.h.0.mlp.c_proj", 2, 4)
    model.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_a_kernel_comes_back_whole_in_its_saved_dtype(tmp_path: Path) -> None:
    """A non-persistent buffer (or a tensor constant) is not in the saved state: a kernel
    rebuilt in the artifact's float32 and loaded from a bf16 state must not keep it float32."""
    from kasmina.urza.client import UrzaLibraryClient
    from kasmina.urza.kernel import GPUKernel
    from kasmina.urza.publish import publish_artifact
    from kasmina.utils.state_io import in_saved_dtypes
    from tests.urza.test_kernel import Blueprint  # a non-persistent ``offset`` buffer

    torch.manual_seed(0)
    manifest = publish_artifact(
        Blueprint().eval(), (torch.randn(4, 8),), str(tmp_path), "bp", PUBLISHER
    )
    payload, verified = UrzaLibraryClient(str(tmp_path), PUBLISHER.trusted_publishers()).fetch(
        manifest.artifact_id
    )
    kernel = GPUKernel.from_binary(payload, verified, "cpu").eval()
    saved = copy.deepcopy(kernel).to(torch.bfloat16)  # the model moved to bf16 after growing
    fresh = copy.deepcopy(kernel)
    in_saved_dtypes(fresh, saved.state_dict())
    fresh.load_state_dict(saved.state_dict(), strict=True)
    assert {n: b.dtype for n, b in fresh.named_buffers()} == {
        n: b.dtype for n, b in saved.named_buffers()
    }
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(fresh(x), saved(x))


@pytest.mark.usefixtures("sigint_raises")
def test_a_ctrl_c_during_the_load_commit_waits_until_the_model_is_loaded(
    grown: Grown, saved: Path
) -> None:
    """A SIGINT that lands while the host's weights are being written (here, from a hook on
    the host's first layer) is delivered once the load is complete, not half-way through."""
    fresh = Host()
    fired = []

    def ctrl_c(*_args: object) -> None:
        if not fired:
            fired.append(True)
            signal.raise_signal(signal.SIGINT)

    fresh.inp.register_load_state_dict_pre_hook(ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        kasmina.load(saved, fresh, publishers=PUBLISHER.trusted_publishers())
    assert fired
    fresh.eval()
    assert [s.stage for s in _seeds(fresh)] == [S.ACTIVE, S.GRAFTING]
    with torch.no_grad():
        assert torch.equal(fresh(grown.x), grown.model(grown.x))


def test_a_save_removes_the_temp_files_of_killed_saves_once_stale(grown: Grown, tmp_path) -> None:
    """A save killed before its rename leaves ``.<name>.<random>.tmp`` (its cleanup is a
    ``finally`` a SIGKILL skips), a whole model's size each; nothing ever removed them."""
    import os
    import time

    from kasmina.utils.atomic import STALE_TEMPORARY_S

    path = tmp_path / "grown.kasmina"
    killed = tmp_path / ".grown.kasmina.abcd1234.tmp"
    live = tmp_path / ".grown.kasmina.live5678.tmp"  # perhaps another process's save, now
    other = tmp_path / ".other.kasmina.abcd1234.tmp"
    for leftover in (killed, live, other):
        leftover.write_bytes(b"half a model")
    stale = time.time() - 2 * STALE_TEMPORARY_S
    os.utime(killed, (stale, stale))
    os.utime(other, (stale, stale))
    kasmina.save(grown.model, path)
    assert sorted(tmp_path.iterdir()) == sorted([path, live, other])


def test_a_lifecycle_change_while_saving_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    """A save on another thread met a CULL the training thread applied: the file held the
    seed's kernel from before and its state (COOLDOWN, no kernel) from after, and
    ``kasmina.load`` refused it. The save now sees the change and writes nothing."""
    from kasmina.persist import saving
    from kasmina.urza.blueprints import ResidualMLP
    from kasmina.urza.publish import publish_artifact
    from kasmina.utils.keyring import Keyring, generate_key
    from tests.manager.helpers import Rig, make_config

    torch.manual_seed(1)
    store = tmp_path / "urza"
    artifact = publish_artifact(
        ResidualMLP(2, 4), [torch.randn(3, 2)], str(store), "mlp", PUBLISHER
    )
    rig = Rig(make_config(tmp_path, store), Keyring({"pub": generate_key(), "ctl": generate_key()}))
    assert rig.send("germinate", SEED0, artifact.artifact_id)
    rig.train(1)
    read = saving._artifact_of

    def culled_meanwhile(*args, **kwargs):
        monkeypatch.setattr(saving, "_artifact_of", read)  # once
        result = read(*args, **kwargs)
        assert rig.send("cull", SEED0)  # what the training thread's safe point applied
        return result

    monkeypatch.setattr(saving, "_artifact_of", culled_meanwhile)
    path = tmp_path / "grown.kasmina"
    with pytest.raises(SavedModelError, match="changed while the model was read"):
        kasmina.save(rig.model, path)
    assert not path.exists()
    kasmina.save(rig.model, path)  # between steps: whole
    assert kasmina.load(path, Host(), publishers=PUBLISHER.trusted_publishers())
