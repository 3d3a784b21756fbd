"""An attached model's persistence: state_dict, deepcopy, torch.save and pickle round trips (also
a copy taken between a KD forward and its backward, and pickles of older versions), the seeds'
flags as views of their slot's through copies and moves, a seed's extra state of one size (an
EMA copying it), and a grown model copied under inference mode."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import kasmina.seeds.extra_state
from kasmina.kd.config import KDConfig
from kasmina.seeds.compiled_cut import CUT_REASON
from kasmina.seeds.inject import attach, collect_kd_losses, kasmina_layers
from kasmina.seeds.layer import KasminaLayer
from kasmina.stages import SeedStage
from tests.seeds.helpers import MLP, S, _grafting, kernel, walk


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


def test_a_model_pickled_before_the_cut_flags_loads_moves_and_polls() -> None:
    """A model ``torch.save``-d by a version without the compiled cut's flags (the slot's
    ``_cut_flags``, each seed's ``cut_flag``) raised a ``KeyError`` as it was unpickled; a seed
    pickled alone could not be moved. Both come back with the flags clean, and unsaved."""
    model = MLP()
    (slot,) = attach(model, ["head"], 2, 4)
    del slot._buffers["_cut_flags"]
    slot._non_persistent_buffers_set.discard("_cut_flags")
    for seed in slot.seeds:
        del seed._buffers["cut_flag"]
        seed._non_persistent_buffers_set.discard("cut_flag")
    buffer = io.BytesIO()
    torch.save((model, slot.seed(0)), buffer)
    buffer.seek(0)
    loaded, alone = torch.load(buffer, weights_only=False)
    loaded.to(torch.float64)
    slot = kasmina_layers(loaded)[0]
    assert not slot._cut_flags.any() and not any(bool(s.cut_flag) for s in slot.seeds)
    assert slot.poll_nonfinite() == [] and loaded(torch.randn(3, 5, dtype=torch.float64)).shape
    alone.to(torch.float64)
    assert alone.poll_nonfinite() is False and not bool(alone.cut_flag)
    assert not any("cut_flag" in key for key in loaded.state_dict())


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


def test_a_pickled_model_keeps_a_cut_flag_not_yet_polled() -> None:
    """The flags a current model is pickled with are its own: a compiled cut's flag set in a
    backward and not yet polled comes back set, in the slot and in the seed (one saved alone
    too), and the poll charges it; only a flag the pickle lacks is made clean."""
    model = MLP()
    (slot,) = attach(model, ["head"], 2, 4)
    slot.seed(1).cut_flag.fill_(True)  # as the compiled cut leaves it (test_compiled_faults)
    buffer = io.BytesIO()
    torch.save((model, slot.seed(1)), buffer)
    buffer.seek(0)
    loaded, alone = torch.load(buffer, weights_only=False)
    slot = kasmina_layers(loaded)[0]
    assert slot._cut_flags.tolist() == [False, True] and bool(slot.seed(1).cut_flag)
    assert bool(alone.cut_flag)
    assert alone.poll_nonfinite() is False and list(alone.fault_log) == [CUT_REASON]
    assert slot.poll_nonfinite() == [] and slot.seed(1).faults == 1
