"""kasmina.merge on hosts whose output is not one Tensor, and what a merged model still holds
(docs/design.md §6a, "Keeping what you grew")."""

from __future__ import annotations

import copy
import dataclasses
import gc
import linecache
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kasmina
from kasmina.stages import SeedStage
from tests.persist.conftest import Grown

S = SeedStage
PATH = [S.ISOLATED_INIT, S.COMPATIBILITY_CHECK, S.GRAFTING, S.STABILIZATION, S.ACTIVE]


def walk_to_active(seed: Any, width: int, init: int) -> None:
    torch.manual_seed(init)
    seed.attach_kernel(nn.Sequential(nn.Linear(width, width), nn.Tanh()))
    for stage in PATH:
        seed.transition_to(stage)


class Attention(nn.Module):
    """A model whose slot is an attention module: three inputs, a ``(output, weights)`` tuple."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, weights = self.attn(x, x, x)
        return self.head(y), weights


class Pair(nn.Module):
    """A block returning ``(2 * h, h)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.lin(x)
        return h * 2, h


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blk = Pair()

    def forward(self, x: torch.Tensor) -> Any:
        return self.blk(x)


def _compare(merged: Any, grown: Any) -> None:
    assert type(merged) is type(grown)
    if isinstance(grown, torch.Tensor):
        assert torch.equal(merged, grown)
        return
    if dataclasses.is_dataclass(grown):
        merged, grown = merged.to_tuple(), grown.to_tuple()
    assert len(merged) == len(grown)
    for mine, theirs in zip(merged, grown, strict=True):
        assert (mine is None and theirs is None) or torch.equal(mine, theirs)


def test_merge_of_what_is_no_module_is_a_type_error() -> None:
    """``kasmina.merge(None)`` raised AttributeError 'named_modules'; now it names the type."""
    with pytest.raises(TypeError, match="merge takes the grown model .* got NoneType"):
        kasmina.merge(None)  # type: ignore[arg-type]


def test_merge_of_an_attention_slot_computes_what_the_grown_model_computed() -> None:
    model = Attention().eval()
    x = torch.randn(2, 5, 8)
    (slot,) = kasmina.attach(model, ["attn"], 2, 4)
    walk_to_active(slot.seed(0), 4, init=1)
    with torch.no_grad():
        grown = model(x)
        assert not torch.equal(grown[0], Attention().eval()(x)[0])  # the seed does contribute
    merged = kasmina.merge(model)
    with torch.no_grad():
        _compare(merged(x), grown)


class SharedActivation(nn.Module):
    """One activation module called on an 8-wide and on a 12-wide tensor."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.act = nn.Linear(6, 8), nn.Linear(6, 12), nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.a(x)).sum(-1) + self.act(self.b(x)).sum(-1)


def test_a_merged_slot_raises_on_a_call_of_another_width() -> None:
    """A slot over an activation shared by layers of two widths sits the wider call out (the
    host's output stands); the merged module split that call into ``chunk_size`` pieces, kept
    the seeds' first two and dropped the rest: a wrong answer, silently. It raises now."""
    model = SharedActivation().eval()
    (slot,) = kasmina.attach(model, ["act"], 2, 4)
    x = torch.randn(5, 6)
    with torch.no_grad():
        model(x)
    walk_to_active(slot.seed(1), 4, init=1)
    with torch.no_grad():
        assert model.act(torch.randn(5, 12)).shape == (5, 12)  # sat out by the grown slot
    merged = kasmina.merge(model)
    with torch.no_grad():
        assert merged.act(torch.randn(5, 8)).shape == (5, 8)
        with pytest.raises(RuntimeError, match="split"):
            merged(x)


class DefaultActivation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 8)

    def forward(self, x: torch.Tensor, act: Any = torch.nn.functional.gelu) -> torch.Tensor:
        return act(self.lin(x))


def test_a_host_forward_default_fx_cannot_write_is_refused_by_name() -> None:
    """A default such as a function was written into the merged module's generated code as
    its repr, and merge raised a bare ``SyntaxError`` from that code."""
    model = nn.Sequential(DefaultActivation(), nn.Linear(8, 3)).eval()
    (slot,) = kasmina.attach(model, ["0"], 2, 4)
    with torch.no_grad():
        model(torch.randn(3, 6))
    walk_to_active(slot.seed(0), 4, init=1)
    with pytest.raises(ValueError, match="forward default torch.fx cannot write as code .*act="):
        kasmina.merge(model)
    assert model[0] is slot  # unchanged


def test_merge_after_a_dtype_change_decides_nothing_from_the_stale_recorded_input() -> None:
    """``model.to(dtype)`` forgets the slot's output contract but not its recorded input: no
    probe with that float32 input may decide what a float64 host returns."""
    model = Blocks().eval()
    x = torch.randn(3, 6)
    (slot,) = kasmina.attach(model, ["blk"], 2, 4)
    with torch.no_grad():
        model(x)
    walk_to_active(slot.seed(1), 4, init=1)
    model.double()  # and no forward since: merged as it stands
    with torch.no_grad():
        grown = copy.deepcopy(model)(x.double())
    merged = kasmina.merge(model)
    with torch.no_grad():
        _compare(merged(x.double()), grown)


def test_merge_rebuilds_a_model_output() -> None:
    transformers = pytest.importorskip("transformers")

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(6, 8)

        def forward(self, x: torch.Tensor) -> Any:
            h = self.lin(x)
            return transformers.modeling_outputs.BaseModelOutput(
                last_hidden_state=h, hidden_states=(x,)
            )

    model = nn.Sequential(Block()).eval()
    x = torch.randn(3, 6)
    (slot,) = kasmina.attach(model, ["0"], 2, 4)
    walk_to_active(slot.seed(0), 4, init=1)
    with torch.no_grad():
        grown = model(x)
    merged = kasmina.merge(model)
    with torch.no_grad():
        out = merged(x)
    assert type(out) is type(grown) and out.hidden_states == grown.hidden_states
    assert torch.equal(out.last_hidden_state, grown.last_hidden_state)


def test_merge_with_a_negative_output_index_keeps_the_output_structure() -> None:
    model = Blocks().eval()
    x = torch.randn(3, 6)
    (slot,) = kasmina.attach(model, ["blk"], 2, 4, output_index=-1)  # the last element: h
    with torch.no_grad():
        model(x)
    walk_to_active(slot.seed(1), 4, init=1)
    with torch.no_grad():
        grown = model(x)
        plain = Pair()(x)
    assert torch.equal(grown[0], plain[0]) and not torch.equal(grown[1], plain[1])
    merged = kasmina.merge(model)
    with torch.no_grad():
        _compare(merged(x), grown)


def _encoder(target: str) -> tuple[nn.TransformerEncoder, Any]:
    """A two-layer ``nn.TransformerEncoder`` (torch's fused path and nested tensors on, as by
    default) with one ACTIVE seed in the slot at ``target``."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2)
    (slot,) = kasmina.attach(model, [target], 2, 4)
    with torch.no_grad():
        model(torch.randn(2, 5, 8))
    walk_to_active(slot.seed(0), 4, init=1)
    return model, slot


# What the layer or encoder around each target reads of it (torch's fused-path checks and
# call, the encoder's ``first_layer.self_attn.batch_first``).
ENCODER_READS = {
    "layers.1.linear2": ("in_features", "weight", "bias"),
    "layers.0.self_attn": ("batch_first", "_qkv_same_embed_dim", "in_proj_bias", "out_proj"),
    "layers.0.norm1": ("eps", "weight", "bias"),
}


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("target", list(ENCODER_READS))
def test_merge_inside_a_transformer_encoder_layer_reads_as_its_host(target: str) -> None:
    """The merged module reads as its host for the layer around it, and that layer no longer
    takes torch's fused path (which reads the weights and never calls the module): in train
    and in eval, where ``no_grad`` opens the fused path and a padding mask the nested one
    (whose padded positions are left out: that path zeroes them), it computes what the grown
    model computed."""
    model, slot = _encoder(target)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    host, keys = slot.host, [f"{target}.{k}" for k in slot.host.state_dict()]

    def outputs(m: nn.Module) -> list[torch.Tensor]:
        found = []
        for mode in (True, False):
            m.train(mode)
            with torch.no_grad():
                found += [m(x), m(x, src_key_padding_mask=pad)[~pad]]
        return found

    grown = outputs(model)
    for mine, theirs in zip(outputs(kasmina.merge(model)), grown, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)
    merged = model.get_submodule(target)
    for name in ENCODER_READS[target]:
        assert getattr(merged, name) is getattr(host, name), name
    # Reachable as the host's names, registered once, under ``host.``.
    assert [k for k in model.state_dict() if k.startswith(target + ".host.")] == [
        k.replace(target + ".", target + ".host.", 1) for k in keys
    ]
    assert not any(k in model.state_dict() for k in keys)
    assert all(n.startswith(("host.", "seed_0.")) for n, _ in merged.named_parameters())
    for copied in (copy.deepcopy(model).eval(), torch.export.export(model.eval(), (x,)).module()):
        with torch.no_grad():
            torch.testing.assert_close(copied(x), grown[2], rtol=1e-6, atol=1e-6)


def test_merge_of_a_t5_feed_forward_output_reads_its_weight_dtype() -> None:
    """T5's feed-forward reads ``self.wo.weight.dtype`` on every forward."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(
        d_model=16,
        d_ff=32,
        d_kv=4,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        vocab_size=32,
        decoder_start_token_id=0,
        pad_token_id=0,
        dropout_rate=0.0,
    )
    model = transformers.T5ForConditionalGeneration(config)
    ids = torch.randint(2, 32, (2, 5), generator=torch.Generator().manual_seed(1))
    slots = kasmina.attach(model, ["DenseReluDense.wo"], 2, 8)
    for k, slot in enumerate(slots):
        walk_to_active(slot.seed(0), 8, init=k + 1)
    grown = {}
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            grown[mode] = model(input_ids=ids, labels=ids).logits
    merged = kasmina.merge(model)
    for mode in (True, False):
        merged.train(mode)
        with torch.no_grad():
            assert torch.equal(merged(input_ids=ids, labels=ids).logits, grown[mode])


def test_a_merged_pruned_host_reads_the_weight_its_forward_computes() -> None:
    """A pruned host's ``weight`` is a plain attribute its forward pre-hook recomputes at
    every call (``weight_orig * weight_mask``). ``merge`` copied it: ``merged.weight`` was the
    last forward's tensor (and its graph), no longer the layer's after a training step."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8))
    prune.l1_unstructured(model[2], "weight", 0.5)
    (slot,) = kasmina.attach(model, ["2"], 2, 4)
    walk_to_active(slot.seed(0), 4, init=1)
    x = torch.randn(3, 5)
    model(x).sum().backward()
    merged = kasmina.merge(model)[2]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    with torch.no_grad():
        model(x)
    assert merged.weight is merged.host.weight
    assert torch.equal(merged.weight, merged.host.weight_orig * merged.host.weight_mask)
    assert "weight" not in vars(merged)  # nor a copy holding a graph
    twin = copy.deepcopy(model)[2]
    assert twin.weight is twin.host.weight


class _Scaled(nn.Linear):
    """A host with a plain tensor attribute (neither a parameter nor a buffer)."""

    def __init__(self) -> None:
        super().__init__(8, 8)
        self.scale = torch.tensor(2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


def test_a_merged_hosts_plain_tensor_attribute_survives_pickle_and_deepcopy_as_the_hosts() -> None:
    """Read through to the host by a property of the merged module's own class, a host's plain
    tensor attribute (``self.scale = torch.tensor(2.)``) was lost by a pickle, which rebuilds a
    plain ``GraphModule``: ``merged.scale`` raised AttributeError after ``torch.load``, where it
    had been copied before. The pickle carries the host's value as it is then; a pruned host's
    recomputed ``weight`` is still not carried (it would go stale at the first forward)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), _Scaled())
    (slot,) = kasmina.attach(model, ["2"], 2, 4)
    walk_to_active(slot.seed(0), 4, init=1)
    model(torch.randn(3, 5))
    merged = kasmina.merge(model)[2]
    merged.host.scale = torch.tensor(3.0)  # after the merge: the pickle takes this one
    assert merged.scale is merged.host.scale and "scale" not in vars(merged)
    data = pickle.dumps(merged)
    assert b"kasmina" not in data
    loaded = pickle.loads(data)
    assert type(loaded) is not type(merged) and isinstance(loaded, torch.fx.GraphModule)
    assert loaded.scale is loaded.host.scale and loaded.scale.item() == 3.0
    twin = copy.deepcopy(merged)
    assert twin.scale is twin.host.scale and twin.scale.item() == 3.0
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), merged(x))

    from torch.nn.utils import prune

    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8))
    prune.l1_unstructured(model[2], "weight", 0.5)
    (slot,) = kasmina.attach(model, ["2"], 2, 4)
    walk_to_active(slot.seed(0), 4, init=1)
    loaded = pickle.loads(pickle.dumps(kasmina.merge(model)[2]))
    assert "weight" not in vars(loaded) and not hasattr(loaded, "weight")
    assert torch.equal(loaded.host.weight, loaded.host.weight_orig * loaded.host.weight_mask)


def _origins(obj: Any) -> list[str]:
    """The modules that define ``obj`` (a hook, a wrapped hook, a partial, a bound method)."""
    found = [type(obj).__module__]
    for inner in (getattr(obj, "hook", None), getattr(obj, "func", None)):
        if inner is not None and inner is not obj:
            found += _origins(inner)
    function = getattr(obj, "__func__", obj)
    found.append(getattr(function, "__module__", None) or "")
    found += _origins(getattr(obj, "__self__", None)) if hasattr(obj, "__self__") else []
    return found


def _kasmina_left(model: nn.Module) -> list[str]:
    """Every hook, class or function of Kasmina reachable from the modules of ``model``, their
    hook tables, parameters and buffers."""
    left = []
    for name, module in model.named_modules():
        for cls in type(module).__mro__:
            if cls.__module__.startswith("kasmina"):
                left.append(f"{name}: class {cls.__qualname__}")
        for attr, value in vars(module).items():
            if "hook" in attr and isinstance(value, dict):
                for hook in value.values():
                    hook = hook[0] if isinstance(hook, tuple) else hook
                    if any(o.startswith("kasmina") for o in _origins(hook)):
                        left.append(f"{name}.{attr}: {hook!r}")
            elif callable(value) and any(o.startswith("kasmina") for o in _origins(value)):
                left.append(f"{name}.{attr}: {value!r}")
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for tensor_name, tensor in tensors:
            for attr in ("_backward_hooks", "_post_accumulate_grad_hooks"):
                for hook in (getattr(tensor, attr, None) or {}).values():
                    if any(o.startswith("kasmina") for o in _origins(hook)):
                        left.append(f"{name}.{tensor_name}.{attr}: {hook!r}")
    return left


def test_a_merged_grown_model_holds_no_kasmina_hook_class_or_function(grown: Grown) -> None:
    assert _kasmina_left(grown.model)  # the walk does find what attach put there
    merged = kasmina.merge(copy.deepcopy(grown.model))
    assert _kasmina_left(merged) == []


def test_a_merged_model_pickles_and_loads_without_kasmina(tmp_path: Path) -> None:
    torch.manual_seed(0)
    models = {}
    for name, active in (("host", False), ("graph", True)):
        model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8)).eval()
        (slot,) = kasmina.attach(model, ["2"], 2, 4)
        if active:
            walk_to_active(slot.seed(0), 4, init=1)
        model(torch.randn(2, 5))
        models[name] = kasmina.merge(model)
        assert _kasmina_left(models[name]) == []
        assert b"kasmina" not in pickle.dumps(models[name])
    x = torch.randn(2, 5)
    for name, model in models.items():
        torch.save(model, tmp_path / f"{name}.pt")
        torch.save(x, tmp_path / "x.pt")
        with torch.no_grad():
            torch.save(model(x), tmp_path / f"{name}.want.pt")
    # A serving process that has no Kasmina at all.
    code = "\n".join(
        [
            "import sys; sys.modules['kasmina'] = None",
            "import torch",
            f"root = {str(tmp_path)!r}",
            "x = torch.load(root + '/x.pt')",
            "for name in ('host', 'graph'):",
            "    model = torch.load(f'{root}/{name}.pt', weights_only=False)",
            "    with torch.no_grad():",
            "        assert torch.equal(model(x), torch.load(f'{root}/{name}.want.pt')), name",
            "    assert model[2].in_features == 8, name  # the host's attributes come along",
            "print('ok')",
        ]
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_merges_leave_no_generated_source_behind(grown: Grown) -> None:
    """torch.fx keeps the source it generates for every graph module it compiles: a merge
    compiles the merged module and compiles each ACTIVE kernel's program module again, and
    three sources (about 2.5 KB) stayed per merge for the life of the process. A merged model
    keeps its own sources while it lives (tracebacks); dropped, it leaves none."""
    loader = torch.fx.graph_module._loader
    x = grown.x

    def merged_output() -> torch.Tensor:
        with torch.no_grad():
            return kasmina.merge(copy.deepcopy(grown.model))(x)

    merged_output()
    gc.collect()
    before = len(loader.eval_cache)
    for _ in range(4):
        merged_output()
    gc.collect()
    assert len(loader.eval_cache) <= before
    kept = kasmina.merge(copy.deepcopy(grown.model))
    key = type(kept.out).forward.__code__.co_filename
    assert key in loader.eval_cache and key in linecache.cache


def test_a_merged_slot_casts_its_kernels_output_as_the_grown_slot_does_under_autocast() -> None:
    """Under ``torch.autocast`` a kernel's matmuls answer in the autocast dtype where a norm
    host stays float32, and the slot casts the seed's output to the host chunk's dtype. The
    merged graph concatenated the pieces as they came: a bf16 output where the grown model's
    was float32."""
    model = nn.Sequential(nn.LayerNorm(8))
    x = torch.randn(3, 8)
    (slot,) = kasmina.attach(model, ["0"], 2, 4)
    with torch.no_grad():
        model(x)
    for k in range(2):
        walk_to_active(slot.seed(k), 4, k)
    merged = kasmina.merge(copy.deepcopy(model))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        grown, out = model(x), merged(x)
    assert grown.dtype == out.dtype == torch.float32 and torch.equal(out, grown)
