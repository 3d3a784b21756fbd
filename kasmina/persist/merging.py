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
program module, not its Kasmina wrapper), generated from a graph of plain torch calls: no
Kasmina class, hook, state table or custom op is left, so the model runs and ``torch.export``s
without Kasmina. Ship the exported program (``torch.export.save``): the kernels' program
modules keep their generated input-guard submodule, which ``pickle`` cannot name, so a merged
model with ACTIVE seeds does not go through ``torch.save(model)``.
"""

from __future__ import annotations

import inspect
import logging
import operator
from typing import Any

import torch
from torch import fx, nn

from kasmina.seeds.layer import KasminaLayer
from kasmina.stages import SeedStage
from kasmina.urza.kernel import GPUKernel

logger = logging.getLogger(__name__)

__all__ = ["merge"]


def merge(model: nn.Module) -> nn.Module:
    """Replace every slot of ``model`` by its merged module (see the module docstring) and
    return ``model``. Every replacement is built before the model is touched, so a slot that
    cannot be merged (its host's forward takes ``*args``/``**kwargs``, or returns a container
    the merged graph cannot rebuild) raises ``ValueError`` and leaves the model as it was."""
    slots = [(name, m) for name, m in model.named_modules() if isinstance(m, KasminaLayer)]
    if any(name == "" for name, _ in slots):
        raise ValueError("the model itself is a KasminaLayer; merge the model around it")
    merged = [(name, merged_slot(slot)) for name, slot in slots]
    for name, module in merged:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, module)
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
    graph = fx.Graph()
    args, kwargs = _placeholders(graph, slot.host)
    out = graph.call_module("host", tuple(args), kwargs)
    kind = _output_kind(slot)
    index = int(vars(slot).get("output_index", 0))
    element = out if kind is torch.Tensor else graph.call_function(operator.getitem, (out, index))
    dim = int(vars(slot).get("chunk_dim", -1))
    chunks = graph.call_function(torch.split, (element, slot.chunk_size), {"dim": dim})
    pieces = []
    for k in range(slot.num_seeds):
        piece = graph.call_function(operator.getitem, (chunks, k))
        if k in active:
            piece = graph.call_module(f"seed_{k}", (piece,))
        pieces.append(piece)
    result = graph.call_function(torch.cat, (pieces,), {"dim": dim})
    if kind is not torch.Tensor:
        # out[:i] + (result,) + out[i+1:], as a list or tuple like the host's.
        head = graph.call_function(operator.getitem, (out, slice(None, index)))
        tail = graph.call_function(operator.getitem, (out, slice(index + 1, None)))
        middle = [result] if kind is list else (result,)
        joined = graph.call_function(operator.add, (head, middle))
        result = graph.call_function(operator.add, (joined, tail))
    graph.output(result)
    merged = fx.GraphModule(root, graph, class_name=f"Merged{type(slot.host).__name__}")
    merged.training = slot.training  # its own flag only: the submodules keep their modes
    return merged


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


def _output_kind(slot: KasminaLayer) -> type:
    """``torch.Tensor``, ``tuple`` or ``list``: what the host returns, from one probe on the
    input shape the slot recorded (a Tensor when it never ran: most slots wrap a layer)."""
    spec = vars(slot).get("input_spec")
    if spec is None:
        return torch.Tensor
    shape, dtype, device = spec
    generator = torch.Generator(device=device).manual_seed(0)
    sample = torch.randn(shape, generator=generator, device=device).to(dtype)
    # Eval mode for the probe, so it moves no batch-norm statistics; each module's own mode
    # is put back afterwards.
    modes = [(module, module.training) for module in slot.host.modules()]
    slot.host.eval()
    try:
        with torch.no_grad():
            out: Any = slot.host(sample)
    except Exception:  # a host that needs more than one input: assume a Tensor
        return torch.Tensor
    finally:
        for module, training in modes:
            module.training = training
    if isinstance(out, torch.Tensor):
        return torch.Tensor
    if isinstance(out, list):
        return list
    if type(out) is tuple:
        return tuple
    raise ValueError(
        f"cannot merge slot {slot.layer_id!r}: its host returns a {type(out).__name__}, and a "
        "merged module rebuilds only Tensor, tuple and list outputs"
    )
