"""Seeds in more models nobody here wrote, used as their users use them: T5 and BART (relative
attention bias, tuple outputs, ``generate`` with a KV cache), Mamba, LSTM/GRU hosts (tuple
outputs, packed sequences), depthwise convolutions and ConvNeXt in ``channels_last``; and a
Llama under ``torch.autocast``, ``torch.func.functional_call``, ``model.to(torch.bfloat16)``
and both kinds of activation checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from kasmina.seeds.inject import attach
from kasmina.seeds.layer import KasminaLayer
from kasmina.stages import SeedStage

transformers = pytest.importorskip("transformers")

S = SeedStage
PATH = [S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION, S.ACTIVE]


def grow(slots: list[KasminaLayer], width: int, stage: SeedStage, conv: bool = False) -> None:
    """Seed 0 of every slot gets a kernel for its ``width``-wide chunk and walks to ``stage``."""
    for i, slot in enumerate(slots):
        torch.manual_seed(10 + i)
        layer = nn.Conv2d(width, width, 1) if conv else nn.Linear(width, width)
        seed = slot.seed(0)
        seed.attach_kernel(nn.Sequential(layer, nn.Tanh()))
        for step in PATH[: PATH.index(stage) + 1]:
            seed.transition_to(step)
        slot.update_alpha_blending(3, 4, 0.5)  # alpha strictly between 0 and 1 in GRAFTING


def faults(slots: list[KasminaLayer]) -> list[int]:
    return [seed.faults for slot in slots for seed in slot.seeds]


def host_grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        n.replace(".host.", "."): p.grad
        for n, p in model.named_parameters()
        if ".seeds." not in n and p.requires_grad
    }


def tiny_t5() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
        num_heads=2, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


def tiny_bart() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BartConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=32, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        forced_eos_token_id=None,
    )  # fmt: skip
    return transformers.BartForConditionalGeneration(config)


def tiny_mamba() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.MambaConfig(
        vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=2, expand=2,
        conv_kernel=4, time_step_rank=4, use_cache=False, pad_token_id=0, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.MambaForCausalLM(config)


def _ids(high: int = 64, shape: tuple[int, int] = (2, 6), seed: int = 1) -> torch.Tensor:
    return torch.randint(3, high, shape, generator=torch.Generator().manual_seed(seed))


def _seq2seq(model: nn.Module) -> Any:
    return model(input_ids=_ids(), decoder_input_ids=_ids(shape=(2, 4), seed=2))


# (name, build, targets, chunk size, forward): T5's attention returns (output, position_bias),
# the bias computed by the first layer and handed on to the next.
GENERATIVE = [
    ("t5-SelfAttention", tiny_t5, ["SelfAttention"], 8, _seq2seq),
    ("t5-decoder-block", tiny_t5, ["decoder.block.0"], 8, _seq2seq),
    ("bart-self_attn", tiny_bart, ["self_attn"], 8, _seq2seq),
    ("bart-fc2", tiny_bart, ["fc2"], 8, _seq2seq),
    ("mamba-out_proj", tiny_mamba, ["mixer.out_proj"], 8, lambda m: m(_ids())),
    ("mamba-block", tiny_mamba, ["backbone.layers.0"], 8, lambda m: m(_ids())),
]


@pytest.mark.parametrize(("name", "build", "targets", "width", "call"), GENERATIVE,
                         ids=[c[0] for c in GENERATIVE])  # fmt: skip
def test_generative_models_dormant_bare_then_grown_generate_with_the_kv_cache(
    name: str, build: Callable[[], nn.Module], targets: list[str], width: int, call: Any
) -> None:
    """DORMANT: output and host gradients bit for bit the bare model's, in train and eval.
    Grown to GRAFTING and trained a step: the seeds change the output without a fault, and
    greedy ``generate`` with the KV cache (the decoder called a token at a time) gives the
    tokens it gives without the cache (the whole prefix each time)."""
    bare, model = build(), build()
    slots = attach(model, targets, 2, width)
    assert slots
    for mode in (True, False):
        bare.train(mode)
        model.train(mode)
        bare.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        want, got = call(bare).logits, call(model).logits
        want.pow(2).mean().backward()
        got.pow(2).mean().backward()
        assert torch.equal(got, want)
        grads, bare_grads = host_grads(model), host_grads(bare)
        assert grads.keys() == bare_grads.keys()
        assert all(torch.equal(grads[n], g) for n, g in bare_grads.items() if g is not None)
    grow(slots, width, S.GRAFTING)
    model.train()
    model.zero_grad(set_to_none=True)
    out = call(model).logits
    out.pow(2).mean().backward()
    assert not torch.equal(out, call(bare).logits)
    assert all(p.grad is not None for s in slots for p in s.seed(0).seed_parameters())
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    model.eval()
    prompt = _ids()
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert faults(slots) == [0] * len(faults(slots))


def test_a_module_its_parent_never_calls_records_nothing_and_germinate_would_refuse() -> None:
    """Mamba passes ``conv1d``'s weight to its causal-convolution function and never calls the
    module: the slot there records no output, so GERMINATE's check has no chunk to check a
    kernel against (``chunk_spec`` None: the refusal that says the model never calls it)."""
    model = tiny_mamba()
    slots = attach(model, ["mixer.conv1d"], 2, 16)
    model(_ids())
    assert all(slot.output_contract is None and slot.chunk_spec() is None for slot in slots)


class Recurrent(nn.Module):
    """A recurrent tagger: an LSTM or a GRU over ``[B, T, 8]``, optionally over a packed batch,
    then a linear head on every step's output."""

    def __init__(self, cell: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        kind = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = kind(8, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is None:
            return self.head(self.rnn(x)[0])
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        return self.head(pad_packed_sequence(out, batch_first=True)[0])


X = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
LENGTHS = torch.tensor([5, 3, 2])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_recurrent_host_seeds_its_output_and_sits_a_packed_batch_out(
    cell: str, mode: str
) -> None:
    """A slot on the RNN (output ``(out, h)``, seeds on ``out``): ISOLATED_INIT keeps output and
    host gradients bit for bit; GRAFTING changes the output. A packed batch puts a
    PackedSequence where the tensor was: the seeds sit it out (the host's output, no fault),
    and the next padded call runs them again."""
    bare, model = Recurrent(cell), Recurrent(cell)
    (slot,) = attach(model, ["rnn"], 2, 8)
    bare.train(mode == "train")
    model.train(mode == "train")
    grow([slot], 8, S.ISOLATED_INIT)
    got, want = model(X), bare(X)
    got.pow(2).mean().backward()
    want.pow(2).mean().backward()
    assert torch.equal(got, want)
    grads = host_grads(model)
    assert all(torch.equal(grads[n], g) for n, g in host_grads(bare).items())
    assert all(p.grad is not None for p in slot.seed(0).seed_parameters())
    for stage in PATH[1:3]:
        slot.seed(0).transition_to(stage)
    slot.update_alpha_blending(3, 4, 0.5)
    assert not torch.equal(model(X), want)
    with torch.no_grad():
        assert torch.equal(model(X, LENGTHS), bare(X, LENGTHS))
        assert not torch.equal(model(X), bare(X))
    assert slot.seed(0).faults == 0


def test_a_recurrent_hosts_state_tuple_is_no_seed_target() -> None:
    model = Recurrent("lstm")
    (slot,) = attach(model, ["rnn"], 2, 8, output_index=1)
    model(X)
    assert "tuple, not a Tensor" in str(slot.contract_problem())
    assert slot.chunk_spec() is None


class Depthwise(nn.Module):
    """A MobileNet-style block: a stem, a depthwise 3x3 convolution, batch norm, pointwise."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.dw(torch.relu(self.stem(x))))
        return self.fc(self.pw(x).mean((2, 3)))


def tiny_convnext() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(
        num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=2,
        image_size=16, num_labels=5, drop_path_rate=0.0,
    )  # fmt: skip
    return transformers.ConvNextForImageClassification(config)


CONVS = [
    ("depthwise", Depthwise, ["dw"], None),
    ("convnext-dwconv", tiny_convnext, r".*stages\.0\.layers\.0\.dwconv", None),
    ("convnext-block", tiny_convnext, ["convnext.encoder.stages.0.layers.0"], 1),
]


@pytest.mark.parametrize(("name", "build", "targets", "chunk_dim"), CONVS,
                         ids=[c[0] for c in CONVS])  # fmt: skip
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_channels_last_convolutions_keep_bit_for_bit_host_and_their_layout(
    name: str, build: Callable[[], nn.Module], targets: Any, chunk_dim: int | None, mode: str
) -> None:
    """A ``channels_last`` model and input, seeds over a depthwise convolution's channels (or a
    ConvNeXt block's): ISOLATED_INIT keeps output and host gradients bit for bit; GRAFTING
    changes the output, and the slot's output keeps the host's memory format."""
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    x = x.to(memory_format=torch.channels_last)
    bare = build().to(memory_format=torch.channels_last)
    model = build().to(memory_format=torch.channels_last)
    (slot,) = attach(model, targets, 2, 4, chunk_dim=chunk_dim)
    bare.train(mode == "train")
    model.train(mode == "train")
    model(x)  # record
    grow([slot], 4, S.ISOLATED_INIT, conv=True)

    def logits(out: Any) -> torch.Tensor:
        return getattr(out, "logits", out)

    bare.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    got, want = logits(model(x)), logits(bare(x))
    got.pow(2).mean().backward()
    want.pow(2).mean().backward()
    assert torch.equal(got, want)
    grads = host_grads(model)
    assert all(torch.equal(grads[n], g) for n, g in host_grads(bare).items())
    for stage in PATH[1:3]:
        slot.seed(0).transition_to(stage)
    slot.update_alpha_blending(3, 4, 0.5)
    seen: list[torch.Tensor] = []
    slot.register_forward_hook(lambda _m, _a, out: seen.append(out))
    assert not torch.equal(logits(model(x)), want)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    assert slot.output_layout == "channels_last" and slot.seed(0).faults == 0


def _llama(stage: SeedStage) -> tuple[nn.Module, list[KasminaLayer]]:
    from tests.integration.models import tiny_llama

    model = tiny_llama()
    slots = attach(model, ["mlp.down_proj"], 2, 16)
    grow(slots, 16, stage)
    return model, slots


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("stage", [S.ISOLATED_INIT, S.GRAFTING], ids=lambda s: s.name)
def test_checkpointing_either_kind_gives_the_gradients_of_none(
    reentrant: bool, stage: SeedStage
) -> None:
    ids = _ids(128)
    plain, plain_slots = _llama(stage)
    model, slots = _llama(stage)
    kwargs = {"use_reentrant": reentrant}
    enable = getattr(model, "activation_checkpointing_enable", None)  # the newer name
    if enable is not None:
        enable(kwargs)
    else:
        model.gradient_checkpointing_enable(kwargs)
    for m in (plain, model):
        m.train()
        m(ids).logits.pow(2).mean().backward()
    want = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and any(".seeds." in n for n in got)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=0, atol=0, msg=name)
    assert faults(slots) == [0] * len(faults(slots))


@pytest.mark.parametrize("stage", [S.ISOLATED_INIT, S.GRAFTING], ids=lambda s: s.name)
def test_autocast_bfloat16_around_the_forward(stage: SeedStage) -> None:
    """Seeds run under ``torch.autocast("cpu", bfloat16)``: no fault, their kernels learn, and
    in ISOLATED_INIT the output is that of the bare model under the same autocast."""
    from tests.integration.models import tiny_llama

    ids = _ids(128)
    model, slots = _llama(stage)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids).logits
        want = tiny_llama()(ids).logits
    out.float().pow(2).mean().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert torch.equal(out, want) == (stage == S.ISOLATED_INIT)
    assert all(p.grad is not None for s in slots for p in s.seed(0).seed_parameters())
    assert faults(slots) == [0] * len(faults(slots))


def test_functional_call_over_a_model_with_slots() -> None:
    """``torch.func.functional_call`` with the model's own tensors (seeds' included, by their
    ``named_parameters`` names) computes the model's output; gradients reach the tensors given,
    and other tensors give another output."""
    from torch.func import functional_call

    ids = _ids(128)
    model, _ = _llama(S.GRAFTING)
    given = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    out = functional_call(model, given, (ids,)).logits
    assert torch.equal(out, model(ids).logits)
    out.pow(2).mean().backward()
    assert all(g.grad is not None for n, g in given.items() if ".seeds.0." in n)
    assert all(p.grad is None for p in model.parameters())
    halved = {n: p.detach() * 0.5 for n, p in model.named_parameters()}
    got = functional_call(model, halved, (ids,)).logits
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    assert torch.equal(got, model(ids).logits)


@pytest.mark.parametrize("stage", [S.ISOLATED_INIT, S.ACTIVE], ids=lambda s: s.name)
def test_model_to_bfloat16_after_attach_casts_the_seeds_too(stage: SeedStage) -> None:
    ids = _ids(128)
    model, slots = _llama(stage)
    model.to(torch.bfloat16)
    out = model(ids).logits
    out.float().pow(2).mean().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert all(p.dtype == torch.bfloat16 for s in slots for p in s.seed(0).seed_parameters())
    assert all(s.output_contract[1] == torch.bfloat16 for s in slots)
    assert faults(slots) == [0] * len(faults(slots))


@pytest.mark.parametrize("layer", [nn.Dropout, nn.AlphaDropout, nn.RReLU], ids=lambda m: m.__name__)
def test_a_plain_kernel_that_draws_leaves_the_hosts_dropout_as_a_dormant_seeds(
    layer: type[nn.Module],
) -> None:
    """A GPT-2 training with dropout, a seed's plain ``nn.Module`` kernel holding a random layer:
    before ACTIVE the kernel draws on a forked stream of its own, so the host's dropout masks,
    output and gradients are the bare model's bit for bit (the kernel's draws shifted the
    global stream and with it every later host mask)."""
    _assert_host_as_bare(lambda: nn.Sequential(nn.Linear(16, 16), layer()))


def _assert_host_as_bare(make_kernel: Callable[[], nn.Module], raise_p: bool = False) -> None:
    """A tiny GPT-2 training with dropout 0.1, each slot's seed 0 in ISOLATED_INIT on a kernel
    of ``make_kernel`` (its dropout layers' ``p`` raised to 0.5 after attach if ``raise_p``):
    output and host gradients are the bare model's bit for bit, the seeds got gradients and
    nothing faulted."""
    from tests.integration.models import tiny_gpt2

    def build() -> nn.Module:
        model = tiny_gpt2()
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.1
        return model.train()

    bare, model = build(), build()
    slots = attach(model, ["mlp.c_proj"], 2, 16)
    for slot in slots:
        slot.seed(0).attach_kernel(make_kernel())
        slot.seed(0).transition_to(S.ISOLATED_INIT)
        for module in slot.seed(0).kernel.modules() if raise_p else ():
            if hasattr(module, "p") and not isinstance(module, torch.jit.ScriptModule):
                module.p = 0.5  # the schedule's raise, after attach
    ids = _ids(128)
    torch.manual_seed(5)
    want = bare(ids).logits
    want.pow(2).mean().backward()
    torch.manual_seed(5)
    got = model(ids).logits
    got.pow(2).mean().backward()
    assert torch.equal(got, want)
    grads = host_grads(model)
    assert all(torch.equal(grads[n], g) for n, g in host_grads(bare).items())
    assert all(p.grad is not None for s in slots for p in s.seed(0).seed_parameters())
    assert faults(slots) == [0] * len(faults(slots))


def _drawing(kind: str) -> Callable[[], nn.Module]:
    """A kernel that draws, in the forms ``marked_random`` missed: compiled, scripted, or with
    a dropout (or RReLU) layer at ``p=0`` on attach, whose ``p`` a schedule raises later."""
    if kind == "compiled":
        return lambda: torch.compile(
            nn.Sequential(nn.Linear(16, 16), nn.Dropout()), backend="eager"
        )
    if kind == "scripted":
        return lambda: torch.jit.script(nn.Sequential(nn.Linear(16, 16), nn.Dropout()))
    layer = {"dropout_p0": nn.Dropout, "feature_alpha_p0": nn.FeatureAlphaDropout}[kind]
    return lambda: nn.Sequential(nn.Linear(16, 16), layer(p=0.0))


@pytest.mark.parametrize("kind", ["compiled", "scripted", "dropout_p0", "feature_alpha_p0"])
def test_a_compiled_scripted_or_p0_kernel_that_draws_leaves_the_hosts_dropout_as_bare(
    kind: str,
) -> None:
    """As above, for a kernel compiled (the flag landed on the module it wraps, where the guard
    never read it), scripted (its layers are script modules) or holding a dropout layer at
    ``p=0`` when attached and raised after (never marked): the host's output and gradients
    are the bare model's bit for bit."""
    _assert_host_as_bare(_drawing(kind), raise_p=True)


class _ScriptedDraw(nn.Module):
    """Draws in its own forward, in a branch: only a TorchScript graph shows it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            x = nn.functional.dropout(x, 0.1, True)
        return x


@pytest.mark.parametrize(
    ("make", "draws"),
    [
        (lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout1d(0.0)), True),
        (lambda: nn.Sequential(nn.Dropout2d(0.0)), True),
        (lambda: nn.Sequential(nn.Dropout3d(0.0)), True),
        (lambda: nn.Sequential(nn.AlphaDropout(0.0)), True),
        (lambda: nn.Sequential(nn.RReLU(0.1, 0.1)), True),
        (lambda: nn.Sequential(nn.MultiheadAttention(4, 1, dropout=0.5)), True),
        (lambda: torch.jit.script(_ScriptedDraw()), True),
        (lambda: torch.jit.script(nn.Sequential(nn.Linear(4, 4), nn.Tanh())), False),
        (lambda: torch.compile(nn.Sequential(nn.Linear(4, 4), nn.Tanh())), False),
    ],
    ids=[
        "dropout1d",
        "dropout2d",
        "dropout3d",
        "alpha",
        "rrelu",
        "mha",
        "script_f",
        "script",
        "compiled",
    ],
)
def test_attach_kernel_marks_every_drawing_kernel_and_no_other(
    make: Callable[[], nn.Module], draws: bool
) -> None:
    """Any dropout-family layer is marked at any ``p``, a scripted forward by its graph's seeded
    ops (a branch's included); a kernel that draws nothing is not (it would fork for nothing)."""
    slot = attach(nn.Sequential(nn.Linear(4, 4)), ["0"], 2, 2)[0]
    slot.seed(0).attach_kernel(make())
    assert bool(vars(slot.seed(0).kernel).get("draws_random")) is draws
