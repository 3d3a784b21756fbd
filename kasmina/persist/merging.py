"""``kasmina.merge``: bake a grown model's ACTIVE seeds into plain modules (docs/design.md §6a).

PEFT's ``merge_and_unload`` for Kasmina. Each slot is replaced, in its parent, by a module that
computes what the slot computes for the seeds that are part of the host:

- **ACTIVE** seeds are fossilized (alpha is 1): their chunk of the host output is replaced by
  the kernel's output on that chunk, exactly as the slot does, without the fault guard (a
  merged model has no fallback: a non-finite output stays non-finite);
- every other stage is dropped: DORMANT, COOLDOWN, RECYCLING, QUARANTINE, HARVESTING and
  TERMINATED pass the host through anyway; ISOLATED_INIT and COMPATIBILITY_CHECK never change
  the output; GRAFTING and STABILIZATION seeds are still on probation, so the merged model is
  the host without them (its output differs from the grown one in their chunks).

A slot without an ACTIVE seed becomes its host module again. A slot with one becomes a
``torch.fx.GraphModule`` holding ``host`` and ``seed_<k>`` submodules (the kernel's exported
program module, not its Kasmina wrapper), generated from a graph of plain torch and standard
library calls: no Kasmina class, hook, state table or custom op is left (``merge`` also removes
the load check ``kasmina.attach`` put on the model), so the model runs and ``torch.export``s
without Kasmina. Ship the exported program (``torch.export.save``): the kernels' program
modules keep their generated input-guard submodule, which ``pickle`` cannot name, so a merged
model with ACTIVE seeds does not go through ``torch.save(model)``.

The merged module reads like its host, as the slot did: the code around it reads
``self.wo.weight.dtype`` (T5), ``self_attn.batch_first``, ``norm1.eps``. Its class (its own,
made at merge) has a read-only property for each of the host's parameters, buffers,
submodules, class attributes and tensor attributes (a pruned host's ``weight``, recomputed at
every call), returning ``host.<name>`` (compiled from source, as fx compiles the forward: no
Kasmina code), and a copy of each other attribute, so the
``state_dict`` and ``named_parameters`` are unchanged. A deep copy keeps the class; a pickle
does not (``GraphModule`` rebuilds a plain one from its code): the copies survive it, and the
host's plain tensor attributes as they are when pickled (but one a forward pre-hook of the host
recomputes), the properties do not. In an ``nn.TransformerEncoderLayer``, torch's fused path
would run the layer from those weights and never call the merged module: ``merge`` sets that layer's
``activation_relu_or_gelu`` (which torch reads only to choose that path) to 0, and the
``use_nested_tensor`` of an ``nn.TransformerEncoder`` around it to False (that path checks the
first layer alone and hands every layer nested tensors, which a merged module cannot split;
the padded positions then hold what the regular path computes there, not zeros).

The host's output is taken apart at run time, as the slot does it (``kasmina.seeds.outputs``):
one level of ``torch.utils._pytree`` flattening gives a Tensor as itself and a tuple, list,
namedtuple or Hugging Face ``ModelOutput`` as its elements; the one at the slot's
``output_index`` (negative counts from the end) is chunked, and the output is rebuilt with the
same type. Nothing is guessed at merge time: the slot records no input a probe could replay
(an attention module takes three, a ``model.to(dtype)`` leaves the recorded dtype stale). A
container pytree does not know (a plain dataclass) is one leaf, so such a merged module fails
at its first forward where its slot would have chunked an element. Nor is there a sit-out: a
call the slot passes through because it does not fit the seeds (a conv slot's unbatched image,
a chunk of a rank an exported kernel's signed input does not take) reaches the kernels here,
whose input guards raise, and one of another width raises at the split. (Unpickling a
``GraphModule`` re-traces its code, and that trace flattens the output as a Tensor: one more
reason to ship the exported program.)
"""

from __future__ import annotations

import functools
import inspect
import logging
import operator
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from kasmina.seeds import hf
from kasmina.seeds.inject import remove_load_checks
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.side_effects import forget_buffers
from kasmina.stages import SeedStage
from kasmina.urza.fx_sources import built_with_bounded_sources
from kasmina.urza.kernel import GPUKernel
from kasmina.urza.refusals import without_refusals

logger = logging.getLogger(__name__)

__all__ = ["merge"]


def merge(model: nn.Module) -> nn.Module:
    """Replace every slot of ``model`` by its merged module (see the module docstring) and
    return ``model``, without the load check ``kasmina.attach`` registered on it and with
    torch's fused encoder paths off where they would skip a merged module. Every
    replacement is built before the model is touched, so a slot that cannot be merged (its
    host's forward takes ``*args``/``**kwargs``) raises ``ValueError`` and leaves the model as
    it was; a ``model`` that is no ``nn.Module`` is a ``TypeError``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"merge takes the grown model (an nn.Module), got {type(model).__name__}")
    slots = [(name, m) for name, m in model.named_modules() if isinstance(m, KasminaLayer)]
    if any(name == "" for name, _ in slots):
        raise ValueError("the model itself is a KasminaLayer; merge the model around it")
    merged = [(name, slot, merged_slot(slot)) for name, slot in slots]
    for name, slot, module in merged:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, module)
        hf.unslot(slot, module)  # a Hugging Face model's recording hooks follow
        if module is not slot.host and isinstance(parent, nn.TransformerEncoderLayer):
            parent.activation_relu_or_gelu = 0  # torch reads it only to take its fused path
    _no_nested_tensors(model, [module for _, slot, module in merged if module is not slot.host])
    remove_load_checks(model)
    without_refusals(model)  # the kernels' input checks raise what torch raises: no sit-out
    forget_buffers(model)  # the kernels' buffers the guard found
    logger.info("merged %d slot(s)", len(merged))
    return model


def merged_slot(slot: KasminaLayer) -> nn.Module:
    """The plain module that computes ``slot``'s host plus its ACTIVE seeds."""
    active = {
        k: _plain(seed.kernel)
        for k, seed in enumerate(slot.seeds)
        if seed.stage == SeedStage.ACTIVE and seed.kernel is not None
    }
    if not active:
        return slot.host
    root = nn.Module()
    root.host = slot.host
    for k, kernel in active.items():
        root.add_module(f"seed_{k}", kernel)
    # ``is_not`` stays on the module: fx renders no function as a call's argument.
    root.is_not = operator.is_not
    graph = fx.Graph()
    args, kwargs = _placeholders(graph, slot.host)
    out = graph.call_module("host", tuple(args), kwargs)
    # One level of flattening (every node below the output is a leaf): [out] for a Tensor, the
    # elements of a tuple, list, namedtuple or ModelOutput, with the spec that rebuilds it.
    below = graph.call_function(functools.partial, (graph.get_attr("is_not"), out))
    flat = graph.call_function(pytree.tree_flatten, (out,), {"is_leaf": below})
    items = graph.call_function(operator.getitem, (flat, 0))
    spec = graph.call_function(operator.getitem, (flat, 1))
    index = int(vars(slot).get("output_index", 0))
    element = graph.call_function(operator.getitem, (items, index))
    dim = int(vars(slot).get("chunk_dim", -1))
    # Exact sizes: a call of another width (one the slot sat out, an activation shared by
    # layers of two widths) raises here rather than losing the chunks past the seeds'.
    sizes = [slot.chunk_size] * slot.num_seeds
    chunks = graph.call_function(torch.split, (element, sizes), {"dim": dim})
    pieces = []
    for k in range(slot.num_seeds):
        piece = graph.call_function(operator.getitem, (chunks, k))
        if k in active:  # in the host chunk's dtype, as the slot casts it under autocast
            dtype = graph.call_function(getattr, (piece, "dtype"))  # (``autocast_to_host``)
            piece = graph.call_method("to", (graph.call_module(f"seed_{k}", (piece,)), dtype))
        pieces.append(piece)
    result = graph.call_function(torch.cat, (pieces,), {"dim": dim})
    contract = slot.output_contract
    if isinstance(contract, tuple) and len(contract[0]) in (4, 5):  # the channels-last ranks
        # The host's memory format, as the slot's output keeps it: a cat of size-1 channel
        # chunks, or of a kernel's contiguous output, is contiguous (torch ops only: the merged
        # module pickles without Kasmina, and unpickling traces it again).
        like = graph.call_function(torch.empty_like, (element,))
        result = graph.call_method("copy_", (like, result))
    # items[:i] + [result] + items[i + 1:], with i = index % len(items) (index may be negative).
    i = graph.call_function(operator.mod, (index, graph.call_function(len, (items,))))
    head = graph.call_function(operator.getitem, (items, slice(None, i)))
    after = graph.call_function(operator.add, (i, 1))
    tail = graph.call_function(operator.getitem, (items, slice(after, None)))
    joined = graph.call_function(operator.add, (head, [result]))
    rebuilt = graph.call_function(operator.add, (joined, tail))
    result = graph.call_function(pytree.tree_unflatten, (rebuilt, spec))
    graph.output(result)
    name = f"Merged{type(slot.host).__name__}"
    # Its own class, for the host's attributes (``GraphModule`` gives each instance, and each
    # deep copy, a subclass of it); ``GraphModule``'s ``__module__``, as for that subclass: no
    # pickle names either (a ``GraphModule`` pickles its code, never its class).
    cls = type(name, (fx.GraphModule,), {"__module__": fx.GraphModule.__module__})
    # A one-off merge compiles the graph and the kernels' program modules again: their old
    # sources go, and the new ones with the modules (a merge every epoch grew without bound).
    try:
        merged = built_with_bounded_sources(lambda: cls(root, graph, class_name=name), [root])
    except (SyntaxError, NameError) as exc:  # a default fx writes as its repr: not code
        defaults = inspect.signature(slot.host.forward).parameters.values()
        written = ", ".join(f"{p.name}={p.default!r}" for p in defaults if p.default is not p.empty)
        raise ValueError(
            f"cannot merge a slot whose host ({type(slot.host).__name__}) has a forward default "
            f"torch.fx cannot write as code ({written}); a default such as None can be"
        ) from exc
    merged.training = slot.training  # its own flag only: the submodules keep their modes
    _expose_host(merged, cls, slot.host)
    return merged


def _expose_host(merged: fx.GraphModule, cls: type, host: nn.Module) -> None:
    """Make ``merged`` read like ``host`` for the code around it (``self.wo.weight.dtype``,
    ``self_attn.batch_first``, ``norm1.eps``), as the slot did through its ``__getattr__``:
    the host's parameters, buffers, submodules and class attributes (methods, properties)
    become read-only properties of ``cls`` returning ``merged.host.<name>`` (so a parameter is
    still registered once, as ``host.<name>``: ``state_dict`` and ``named_parameters`` do not
    change), and so do its plain tensor attributes: a pruned (or hook-based ``weight_norm``,
    ``spectral_norm``) host's ``weight`` is one its forward pre-hook recomputes at every call,
    and a copy was the last forward's tensor (and its graph), not what the layer computes
    with. Its other attributes are copied onto ``cls`` (a deep copy keeps them) and the
    instance (a pickle keeps them). A pickle rebuilds a plain ``GraphModule`` (no properties):
    ``cls.__reduce__`` (``_host_reduce``) writes the host's plain tensor attributes as they
    are then into the pickled instance, except one a forward pre-hook of the host recomputes
    (it would go stale at the first forward; read it from ``host``, as a parameter). A name
    ``merged`` has already (``forward``, ``training``, ``host``, ``nn.Module``'s and
    ``GraphModule``'s own) stays ``merged``'s."""
    values = {k: v for k, v in vars(host).items() if not isinstance(v, (nn.Module, torch.Tensor))}
    tensors = [k for k, v in vars(host).items() if isinstance(v, torch.Tensor)]
    linked = [*host._parameters, *host._buffers, *host._modules, *tensors]
    linked += [k for k in dir(type(host)) if not k.startswith("__")]
    exposed = [k for k in dict.fromkeys([*values, *linked]) if not hasattr(merged, k)]
    recomputed = {  # torch's pruning (``_tensor_name``), weight_norm and spectral_norm hooks
        getattr(hook, attr, None)
        for hook in host._forward_pre_hooks.values()
        for attr in ("_tensor_name", "name")
    }
    pickled = [k for k in exposed if k in tensors and k not in recomputed]
    for key in exposed:
        if key in values:
            setattr(cls, key, values[key])
            vars(merged)[key] = values[key]
        else:
            setattr(cls, key, _host_property(key))
    if pickled:
        cls.__reduce__ = _host_reduce(pickled)  # type: ignore[method-assign]


def _host_property(name: str) -> property:
    """A read-only property returning ``self.host.<name>``. Its getter is compiled from source,
    as ``torch.fx`` compiles a ``GraphModule``'s forward: a function of nothing but the
    builtins (no Kasmina code), which ``torch.compile`` traces (an ``operator.attrgetter``
    it cannot)."""
    namespace: dict[str, Any] = {}
    exec(f"def host_attribute(self):\n    return getattr(self.host, {name!r})\n", namespace)
    return property(namespace["host_attribute"], doc=f"The host's {name!r} (read-only).")


def _host_reduce(names: list[str]) -> Any:
    """``GraphModule.__reduce__`` with the host's ``names`` (its plain tensor attributes), as
    the host holds them when pickled, added to the instance's attributes the pickle carries
    (``torch.fx`` sets each on the plain ``GraphModule`` it rebuilds). Compiled from source
    over ``GraphModule`` alone, as ``_host_property``: the pickle names only torch."""
    namespace: dict[str, Any] = {"GraphModule": fx.GraphModule}
    exec(
        "def __reduce__(self):\n"
        "    rebuild, (body, imports) = GraphModule.__reduce__(self)\n"
        "    held = vars(self.host)\n"
        f"    body.update((k, held[k]) for k in {tuple(names)!r} if k in held)\n"
        "    return rebuild, (body, imports)\n",
        namespace,
    )
    return namespace["__reduce__"]


def _no_nested_tensors(model: nn.Module, merged: list[nn.Module]) -> None:
    """Turn off the nested-tensor path of every ``nn.TransformerEncoder`` of ``model`` whose
    layers hold a merged module: that path checks the first layer only and would hand the
    merged modules nested tensors, which they cannot split."""
    for encoder in model.modules():
        if isinstance(encoder, nn.TransformerEncoder):
            inside = {id(m) for m in encoder.layers.modules()}
            if any(id(m) in inside for m in merged):
                encoder.use_nested_tensor = False


def _plain(kernel: nn.Module) -> nn.Module:
    """The module a seed's kernel runs: the exported program's module for a ``GPUKernel``."""
    module = kernel.inner if isinstance(kernel, GPUKernel) else kernel
    if module is None:
        raise ValueError("an ACTIVE seed's kernel was released; nothing to merge")
    for name in ("train", "eval"):  # ExportedProgram.module()'s raising overrides
        vars(module).pop(name, None)
    return module


def _placeholders(graph: fx.Graph, host: nn.Module) -> tuple[list[fx.Node], dict[str, fx.Node]]:
    """Placeholders mirroring ``host.forward``'s named parameters (defaults kept)."""
    args: list[fx.Node] = []
    kwargs: dict[str, fx.Node] = {}
    for param in inspect.signature(host.forward).parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ValueError(
                f"cannot merge a slot whose host ({type(host).__name__}) takes "
                f"{'*' if param.kind == param.VAR_POSITIONAL else '**'}{param.name}"
            )
        default = inspect.Signature.empty if param.default is param.empty else param.default
        node = graph.placeholder(param.name, default_value=default)
        if param.kind == param.KEYWORD_ONLY:
            kwargs[param.name] = node
        else:
            args.append(node)
    return args, kwargs
