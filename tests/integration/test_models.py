"""Seeds in models nobody here wrote: Llama, GPT-2, Gemma 2, ViT, Whisper, CLIP,
nn.TransformerEncoder, a ResNet-style net.

For every case (tests/integration/models.py), against the same model without Kasmina:

- all seeds DORMANT: output and host gradients bit for bit, in train and eval mode;
- a seed in ISOLATED_INIT: output and host gradients still bit for bit, and the seed learns;
- a seed through its lifecycle to ACTIVE, eager, then in eval mode;
- ``torch.compile(fullgraph=True)`` as the first forward after attach and after every
  transition (no graph break; at most one recompile per stage change); for some newer Hugging
  Face cases, whose recompiles are slow on a CPU, once with a seed ACTIVE, trained as eager.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from kasmina.persist.merging import merge
from kasmina.seeds.inject import attach
from kasmina.seeds.layer import KasminaLayer
from kasmina.stages import SeedStage
from tests.integration.models import CASES, Case

pytest.importorskip("transformers")

S = SeedStage
PATH = [S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION, S.ACTIVE]


def build(case: Case) -> tuple[nn.Module, nn.Module, list[KasminaLayer]]:
    """The bare model and an identical one with the case's slots attached."""
    bare, model = case.build(), case.build()
    slots = attach(
        model,
        case.targets,
        case.seeds_per_layer,
        case.chunk_size,
        chunk_dim=case.chunk_dim,
        output_index=case.output_index,
    )
    return bare, model, slots


def run(case: Case, model: nn.Module) -> torch.Tensor:
    """One forward and backward; the output tensor the loss was taken on."""
    out = model(**case.inputs())
    case.loss(out).backward()
    return case.logits(out).detach()


def host_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """The host's trainable parameters' gradients (not a frozen table: Whisper's positions)."""
    return {
        n.replace(".host.", "."): p.grad
        for n, p in model.named_parameters()
        if ".seeds." not in n and p.requires_grad
    }


def assert_same_grads(model: nn.Module, bare: nn.Module) -> None:
    got, want = host_grads(model), host_grads(bare)
    assert got.keys() == want.keys()
    for name, grad in want.items():
        assert grad is not None, name
        assert torch.equal(got[name], grad), name


def give_kernels(case: Case, slots: list[KasminaLayer], stage: SeedStage, k: int = 0) -> None:
    """Seed ``k`` of every slot gets a kernel and walks the main path up to ``stage``."""
    for i, slot in enumerate(slots):
        seed = slot.seed(k)
        seed.attach_kernel(case.kernel(10 + i))
        for step in PATH[: PATH.index(stage) + 1]:
            seed.transition_to(step)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_dormant_output_and_host_gradients_are_the_bare_models(case: Case, mode: str) -> None:
    bare, model, slots = build(case)
    assert slots, case.targets
    bare.train(mode == "train")
    model.train(mode == "train")
    assert torch.equal(run(case, model), run(case, bare))
    assert_same_grads(model, bare)
    for slot in slots:
        assert slot.output_contract is not None and slot.contract_problem() is None
        assert slot.chunk_spec() is not None


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_isolated_init_host_gradients_are_a_seedless_runs(case: Case) -> None:
    bare, model, slots = build(case)
    give_kernels(case, slots, S.ISOLATED_INIT)
    assert torch.equal(run(case, model), run(case, bare))
    assert_same_grads(model, bare)
    for slot in slots:
        grads = [p.grad for p in slot.seed(0).seed_parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
        assert all(p.grad is None for p in slot.seed(1).seed_parameters())  # no kernel


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_seed_goes_through_its_lifecycle_to_active_then_serves_in_eval(case: Case) -> None:
    bare, model, slots = build(case)
    reference = run(case, bare)
    for i, slot in enumerate(slots):
        slot.seed(0).attach_kernel(case.kernel(10 + i))
    for stage in PATH:
        for slot in slots:
            slot.seed(0).transition_to(stage)
            slot.update_alpha_blending(3, 4, 0.5)
        model.zero_grad(set_to_none=True)
        out = run(case, model)
        assert torch.isfinite(out).all(), stage
        changes = not torch.equal(out, reference)
        assert changes == (stage not in (S.ISOLATED_INIT, S.COMPATIBILITY_CHECK)), stage
        assert all(slot.seed(0).faults == 0 for slot in slots), stage
    # ACTIVE: the host is trained through the seed, end to end.
    assert all(g is not None for g in host_grads(model).values())
    model.eval()
    bare.eval()
    with torch.no_grad():
        served = case.logits(model(**case.inputs()))
        assert not torch.equal(served, case.logits(bare(**case.inputs())))
        if case.build.__name__ == "encoder":  # no dropout or batch norm: eval is train's math
            model.train()
            torch.testing.assert_close(
                served, case.logits(model(**case.inputs()))
            )  # the fused path never skips a seed


EVERY_STAGE = [c for c in CASES if c.compiled == "every stage"]
ONCE = [c for c in CASES if c.compiled == "active"]


@pytest.mark.parametrize("case", EVERY_STAGE, ids=[c.name for c in EVERY_STAGE])
def test_compile_fullgraph_first_then_after_every_transition(case: Case) -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    bare, model, slots = build(case)
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    out = compiled(**case.inputs())
    case.loss(out).backward()
    assert torch.equal(case.logits(out), run(case, bare))
    assert all(slot.output_contract is not None for slot in slots)  # recorded while compiled
    assert counter.frame_count == 1
    for i, slot in enumerate(slots):
        slot.seed(0).attach_kernel(case.kernel(10 + i))
    for stage in PATH:
        for slot in slots:
            slot.seed(0).transition_to(stage)
        eager = model(**case.inputs())
        out = compiled(**case.inputs())
        case.loss(out).backward()
        torch.testing.assert_close(case.logits(out), case.logits(eager))
    # One recompile once the first call has recorded the slots, then one per stage change.
    assert counter.frame_count <= 2 + len(PATH)
    assert not torch._dynamo.utils.counters["graph_break"]


@pytest.mark.parametrize("case", ONCE, ids=[c.name for c in ONCE])
def test_compile_fullgraph_with_a_seed_active_trains_as_eager(case: Case) -> None:
    """Compiled with every slot's seed ACTIVE: the output and every gradient are eager's (a
    CLIP's compiled projection was dropped: the model writes it into its tower's output
    object, and the ACTIVE seed's gradient hook made TorchDynamo lose that write)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    _, model, slots = build(case)
    give_kernels(case, slots, S.ACTIVE)
    model.train()
    want = run(case, model)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert any(".seeds." in n for n in grads)
    model.zero_grad(set_to_none=True)
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(**case.inputs())
    case.loss(out).backward()
    torch.testing.assert_close(case.logits(out), want)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, msg=name)
    assert not torch._dynamo.utils.counters["graph_break"]


HF_CASES = [c for c in CASES if c.name.startswith(("llama", "gpt2"))]


@pytest.mark.parametrize("case", HF_CASES, ids=[c.name for c in HF_CASES])
@pytest.mark.parametrize("stage", [S.ISOLATED_INIT, S.GRAFTING, S.ACTIVE], ids=lambda s: s.name)
def test_hugging_face_gradient_checkpointing_keeps_seeds_healthy(
    case: Case, stage: SeedStage
) -> None:
    """Activation checkpointing (``gradient_checkpointing_enable()``) recomputes each decoder
    layer in the backward (and stops the recompute early by raising inside it): healthy seeds
    record no fault and every gradient is the one without checkpointing."""
    _, plain, plain_slots = build(case)
    _, checkpointed, slots = build(case)
    give_kernels(case, plain_slots, stage)
    give_kernels(case, slots, stage)
    enable = getattr(checkpointed, "activation_checkpointing_enable", None)  # the newer name
    (enable or checkpointed.gradient_checkpointing_enable)()
    plain.train()
    checkpointed.train()
    for _ in range(2):
        assert torch.equal(run(case, checkpointed), run(case, plain))
    assert [s.faults for slot in slots for s in slot.seeds] == [0] * sum(
        len(x.seeds) for x in slots
    )
    want = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in checkpointed.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and any(".seeds." in n for n in got)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=0, atol=0, msg=name)


def test_a_slot_on_a_tied_head_keeps_hugging_face_tying() -> None:
    """A slot behaves like the module it wraps for writes too: ``tie_weights`` and
    ``resize_token_embeddings`` assign the head's ``weight`` through the slot (to its host),
    and the head stays tied to the embedding."""
    from tests.integration.models import tiny_gpt2

    model = tiny_gpt2()
    (slot,) = attach(model, ["lm_head"], 2, 64)
    model.tie_weights()
    assert slot.host.weight is model.transformer.wte.weight
    model.resize_token_embeddings(130)
    assert slot.host.weight is model.transformer.wte.weight
    assert slot.host.weight.shape == (130, 32)
    ids = torch.randint(0, 130, (2, 6), generator=torch.Generator().manual_seed(1))
    assert model(input_ids=ids).logits.shape == (2, 6, 130)
    plain = nn.Sequential(nn.Linear(4, 4))
    attach(plain, ["0"], 2, 2)
    weight = nn.Parameter(torch.zeros(4, 4))
    plain[0].weight = weight
    assert plain[0].host.weight is weight and "weight" not in plain[0]._parameters


def _grown_over_hooks(hook: Any) -> tuple[nn.Sequential, Any, torch.Tensor, torch.Tensor]:
    """An MLP whose first layer ``hook(model)`` may hook before it is slotted, its seed grown to
    ACTIVE; with one batch and the grown output on it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    hook(model)
    (slot,) = attach(model, ["0"], 2, 4)
    torch.manual_seed(1)
    slot.seed(0).attach_kernel(nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
    for stage in PATH:
        slot.seed(0).transition_to(stage)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    return model, slot, x, model(x)


def test_accelerate_hooks_put_on_before_attach_come_off_the_host() -> None:
    """``remove_hook_from_module(model, recurse=True)`` reads a host's ``_hf_hook`` through its
    slot and deletes it there: that delete raised half-way through the walk. The host's own
    ``forward`` it puts back through the slot goes to the host (on the slot, it skipped the
    slot and its seeds at every call)."""
    hooks = pytest.importorskip("accelerate.hooks")
    model, slot, x, grown = _grown_over_hooks(
        lambda model: [
            hooks.add_hook_to_module(module, hooks.AlignDevicesHook(execution_device="cpu"))
            for module in (model[0], model[2])
        ]
    )
    hooks.remove_hook_from_module(model, recurse=True)
    assert not [name for name, m in model.named_modules() if "_hf_hook" in vars(m)]
    assert "forward" not in vars(slot) and "_old_forward" not in vars(slot.host)
    assert torch.equal(model(x), grown)  # the slot still runs its seed


@pytest.mark.parametrize("host_hooked", [True, False])
def test_accelerate_hooks_a_slot_over_a_host_hooked_before_attach(host_hooked: bool) -> None:
    """``add_hook_to_module`` on a slot (a second ``dispatch_model``) read a hooked host's
    ``_hf_hook`` and ``_old_forward`` through the slot as the slot's own, so the slot's new
    forward called the host's bare forward: the slot, its seeds and the host's hook were
    skipped at every call, silently. The slot's hook now wraps the slot's forward."""
    hooks = pytest.importorskip("accelerate.hooks")

    class Counting(hooks.ModelHook):
        def __init__(self) -> None:
            self.calls = 0

        def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return args, kwargs

    on_host, on_slot = Counting(), Counting()
    model, slot, x, grown = _grown_over_hooks(
        lambda model: hooks.add_hook_to_module(model[0], on_host) if host_hooked else None
    )
    hooks.add_hook_to_module(slot, on_slot)
    assert torch.equal(model(x), grown)  # the slot runs its seed
    assert on_slot.calls == 1 and on_host.calls == (2 if host_hooked else 0)
    assert vars(slot)["_hf_hook"] is on_slot
    assert (vars(slot.host).get("_hf_hook") is on_host) == host_hooked
    hooks.remove_hook_from_module(model, recurse=True)
    assert not [name for name, m in model.named_modules() if "_hf_hook" in vars(m)]
    assert torch.equal(model(x), grown) and on_slot.calls == 1


def test_a_resize_through_a_slot_reaches_the_hosts_plain_attributes() -> None:
    """``resize_token_embeddings`` also sets the head's ``out_features``: written through the
    slot, it stayed on the slot, hiding the host's stale 96 from then on; detached, the head
    said 96 with a 100-row weight, and a new attach was refused for 96 features."""
    from kasmina.seeds.inject import detach
    from tests.integration.models import tiny_gpt2

    model = tiny_gpt2()
    (slot,) = attach(model, ["lm_head"], 2, 64)
    model.resize_token_embeddings(130)
    assert slot.host.out_features == 130 and "out_features" not in vars(slot)
    detach(model)
    assert model.lm_head.out_features == 130 == model.lm_head.weight.shape[0]
    (slot,) = attach(model, ["lm_head"], 2, 65)
    assert slot.width == 130
    slot.layer_id = "head"  # the slot's own attributes stay the slot's
    assert slot.layer_id == "head" and not hasattr(slot.host, "layer_id")


def test_the_first_forward_records_a_mixture_of_experts_router_through_its_slot() -> None:
    """transformers installs its recording hooks on the first forward that asks for any output
    its class records; for ``output_router_logits`` (not hidden states or attentions) they were
    moved to the slot only after that forward, so it recorded the host's router logits (its
    ``aux_loss`` differed from the same forward's next time)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
        num_experts_per_tok=2, output_router_logits=True,
    )  # fmt: skip
    model = transformers.MixtralForCausalLM(config).eval()
    (slot,) = attach(model, ["model.layers.0.mlp.gate"], 2, 2)
    seed = slot.seed(0)
    seed.attach_kernel(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))
    for stage in PATH:
        seed.transition_to(stage)
    seen: list[torch.Tensor] = []
    slot.register_forward_hook(lambda module, args, out: seen.append(out[0]))
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(2):
        seen.clear()
        with torch.no_grad():
            out = model(ids)
        assert torch.equal(out.router_logits[0], seen[0])
        losses.append(out.aux_loss)
    assert torch.equal(losses[0], losses[1])


@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_save_pretrained_with_a_slot_on_a_tied_head(which: str, tmp_path: Path) -> None:
    """The tied-weight names follow the head into its slot (``lm_head.host.weight``), so
    ``save_pretrained`` writes the shared tensor once, as for the bare model; the same model
    built again, with the same slots, loads it back bit for bit; detach restores the names."""
    from safetensors.torch import load_file

    from kasmina.seeds.inject import detach
    from tests.integration.models import tiny_gpt2, tiny_llama

    build = tiny_gpt2 if which == "gpt2" else lambda: tiny_llama(tie_word_embeddings=True)
    model = build()
    attach(model, ["lm_head"], 2, 64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.save_pretrained(tmp_path)
    saved = load_file(f"{tmp_path}/model.safetensors")
    again = build()
    (slot,) = attach(again, ["lm_head"], 2, 64)
    result = again.load_state_dict(saved, strict=False)
    assert result.missing_keys == ["lm_head.host.weight"] and not result.unexpected_keys
    want, got = model.state_dict(), again.state_dict()
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    assert slot.host.weight is again.get_input_embeddings().weight
    before = dict(type(model)._tied_weights_keys)
    assert again.all_tied_weights_keys == {
        k.replace("lm_head.", "lm_head.host."): v for k, v in before.items()
    }
    detach(again)
    assert again.all_tied_weights_keys == before and again._tied_weights_keys == before
    again.save_pretrained(tmp_path / "detached")


@pytest.mark.parametrize("hooked_before_attach", [False, True], ids=["late", "early"])
@pytest.mark.parametrize("which", ["gpt2", "llama"])
def test_output_hidden_states_of_a_slotted_block_include_its_seeds(
    which: str, hooked_before_attach: bool
) -> None:
    """transformers records ``output_hidden_states`` with forward hooks on the decoder blocks;
    on a slotted block they record the slot's output (what the next block receives), seeds
    included, whether transformers hooked the model before ``attach`` or after. DORMANT, and
    once detached, the hidden states are the bare model's bit for bit."""
    from kasmina.seeds.inject import detach
    from tests.integration.models import tiny_gpt2, tiny_llama

    build = tiny_gpt2 if which == "gpt2" else tiny_llama
    blocks, target = ("transformer.h", r"transformer\.h\.0")
    if which == "llama":
        blocks, target = ("model.layers", r"model\.layers\.0")
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    bare, model = build().eval(), build().eval()
    with torch.no_grad():
        want = bare(ids, output_hidden_states=True, output_attentions=True)
        if hooked_before_attach:
            model(ids, output_hidden_states=True)
        (slot,) = attach(model, target, 2, 16)
        if not hooked_before_attach:  # nothing installed yet: it pickles, as the bare model
            torch.save(model, io.BytesIO())
        got = model(ids, output_hidden_states=True, output_attentions=True)
    assert len(got.hidden_states) == len(want.hidden_states) == 3
    for a, b in zip(
        got.hidden_states + got.attentions, want.hidden_states + want.attentions, strict=True
    ):
        assert torch.equal(a, b)
    twin = merge(copy.deepcopy(model))  # a copy's slot gives its recording hooks to the host
    with torch.no_grad():
        merged = twin(ids, output_hidden_states=True).hidden_states
    assert len(merged) == 3
    assert all(torch.equal(a, b) for a, b in zip(merged, want.hidden_states, strict=True))
    seen: list[torch.Tensor] = []
    model.get_submodule(f"{blocks}.1").register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append((args or (kwargs["hidden_states"],))[0]),
        with_kwargs=True,
    )
    seed = slot.seed(0)
    seed.attach_kernel(nn.Sequential(nn.Linear(16, 16), nn.Tanh()))
    for stage in PATH:
        seed.transition_to(stage)
        if stage in (S.GRAFTING, S.ACTIVE):
            slot.update_alpha_blending(2, 4, 0.5)
            seen.clear()
            with torch.no_grad():
                got = model(ids, output_hidden_states=True)
            assert len(got.hidden_states) == 3
            assert torch.equal(got.hidden_states[1], seen[0])
            assert not torch.equal(got.hidden_states[1], want.hidden_states[1])
    detach(model)
    with torch.no_grad():
        got = model(ids, output_hidden_states=True)
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("stage", [SeedStage.GRAFTING, SeedStage.ACTIVE], ids=lambda s: s.name)
def test_a_running_seed_past_the_first_encoder_layer_takes_the_packed_batch(
    stage: SeedStage,
) -> None:
    """``nn.TransformerEncoder`` packs a padded batch into a nested tensor in inference when its
    first layer can take the fused path, and a later layer whose slot runs seeds then calls the
    slot with it. The seeds see it zero-padded and their output is packed back: the valid
    positions are those of the same model unpacked."""
    from tests.integration.models import CASES

    case = next(c for c in CASES if c.build.__name__ == "encoder")
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    packed = nn.TransformerEncoder(layer, 2)  # enable_nested_tensor: the default
    (slot,) = attach(packed, ["layers.1.linear2"], 2, 8)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[False] * 5, [False, False, False, True, True]])
    packed.eval()
    with torch.no_grad():
        before = packed(x, src_key_padding_mask=mask)
        give_kernels(case, [slot], stage)
        slot.seed(0).update_alpha_blending(3, 10)  # alpha strictly between 0 and 1 in GRAFTING
        got = packed(x, src_key_padding_mask=mask)
        unpacked = copy.deepcopy(packed)  # the same weights, seeds and stages, never packing
        unpacked.use_nested_tensor = unpacked.enable_nested_tensor = False
        want = unpacked(x, src_key_padding_mask=mask)
    valid = ~mask
    assert got.shape == want.shape == x.shape
    assert not torch.allclose(got[valid], before[valid])  # the seed ran
    torch.testing.assert_close(got[valid], want[valid])
    assert torch.equal(got[mask], torch.zeros_like(got[mask]))  # packed: padding comes back 0
    assert not torch.equal(want[mask], torch.zeros_like(want[mask]))  # unpacked: it does not
