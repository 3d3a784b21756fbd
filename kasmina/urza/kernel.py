"""A seed's kernel: a verified ``torch.export`` program turned back into a trainable module.

``GPUKernel.from_binary`` is the only place a payload is deserialised, and it refuses to do so
unless the manifest came out of signature verification and the bytes match the manifest's size
and SHA-256, so it cannot be pointed at unverified bytes by mistake.

An exported program's graph fixes the behaviour of dropout and batch norm to the mode it was
exported in; ``train()``/``eval()`` on a kernel therefore only set its ``training`` flag and do
not reach into the graph (which would raise).

Three facts about the graph are read at load, for the seed's guards (docs/design.md §3):
``mutates_input`` (the program writes into its input in place: GERMINATE refuses it, since a
seed's input is the host's activation), ``writes_unsaved_buffer`` (it writes in place into a
non-persistent buffer, state that ``state_dict`` does not save, so neither ``kasmina.save`` nor
a rollback could restore it: refused as well) and ``draws_random`` (it has seeded random ops,
which draw from the global RNG: before ACTIVE the guard runs it on a forked RNG state). One is
read from its state before its move to the device (which copies each tensor on its own):
``shares_memory``, two of its tensors in one storage that a seed would hold apart or could not
copy (``urza.aliasing``; published before ``publish_artifact`` refused them), refused at
GERMINATE too. A copy holds them apart already: it has none (a seed restored).

What torch keeps of each load and copy for the life of the process (torch.fx's generated
sources, ``ShapeEnv``'s memos) is dropped again by ``urza.fx_sources``.
"""

from __future__ import annotations

import functools
import io
import logging
import operator
import os
import sys
from collections.abc import Iterator
from copy import deepcopy
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.export.passes import move_to_device_pass

from kasmina.errors import ArtifactIntegrityError
from kasmina.urza.aliasing import Overlap, copy_splits
from kasmina.urza.artifact import Manifest, verify_payload
from kasmina.urza.fx_sources import (
    BUILD_LOCK,
    forget_load_sources,
    forget_shape_env_memos,
    forget_source_with,
    next_source_id,
)
from kasmina.urza.refusals import refuse_through, weights_absent

logger = logging.getLogger(__name__)

__all__ = ["GPUKernel"]


def _forget_absent_load() -> None:
    """In a forked child: a load under way at the fork (its thread gone there) left
    torch.export's deserializer slot set, and every load of the child was refused."""
    serde = sys.modules.get("torch._export.serde.serialize")
    if getattr(serde, "_CURRENT_DESERIALIZER", None) is not None:
        serde._CURRENT_DESERIALIZER = None  # type: ignore[union-attr]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_absent_load)


def _deserialise(payload: bytes) -> torch.export.ExportedProgram:
    """The one deserialisation call (a ``.pt2`` may contain pickles: verify first)."""
    return torch.export.load(io.BytesIO(payload))


class _Facts(NamedTuple):
    """What ``_program_module`` reads from a program's graph (``GPUKernel``'s keywords)."""

    mutates_input: bool
    writes_unsaved_buffer: bool
    draws_random: bool
    shares_memory: Overlap | None


def _program_module(
    payload: bytes, manifest: Manifest, device: torch.device
) -> tuple[nn.Module, _Facts]:
    """The trainable module of a payload already checked against ``manifest``, with the facts
    its guards need (see the module doc)."""
    with BUILD_LOCK:  # one load at a time: torch.export's deserializer slot, and its sources
        first, module = next_source_id(), None
        try:
            program = _deserialise(payload)
            shared = copy_splits([*program.state_dict.items(), *program.constants.items()])
            program = move_to_device_pass(program, device)
            module = program.module()
            _share_guard_patch(module)
            refuse_through(module)  # a call its input checks refuse: KernelInputRefused
            facts = _Facts(
                _mutates_input(program),
                _writes_unsaved_buffer(program),
                _draws_random(program.graph_module),
                shared,
            )
        except Exception as exc:
            raise RuntimeError(
                f"artifact {manifest.artifact_id!r} verified but could not be loaded by this "
                f"torch {torch.__version__} (published with {manifest.torch_version}): {exc}"
            ) from exc
        finally:
            forget_load_sources(first, module)
            forget_shape_env_memos()
    module.to(device)
    # ``ExportedProgram.module()`` sets train()/eval() on the instance to functions that raise
    # (a merged model's ``eval()`` too) and cannot be pickled; the graph's mode is fixed anyway.
    for name in ("train", "eval"):
        vars(module).pop(name, None)
    # ``requires_grad`` is the published module's: a parameter frozen there (a fixed scale, a
    # mask) stays frozen in the seed; GERMINATE refuses a kernel with nothing to train.
    return module, facts


def _graphs(root: torch.fx.GraphModule) -> Iterator[torch.fx.Graph]:
    """The graph of ``root`` and of every graph module below it (higher-order ops' bodies)."""
    for module in root.modules():
        if isinstance(module, torch.fx.GraphModule):
            yield module.graph


def _draws_random(root: torch.fx.GraphModule) -> bool:
    """Whether any op of the program is a seeded random op (dropout in train mode, rand*)."""
    seeded = torch.Tag.nondeterministic_seeded
    return any(
        seeded in getattr(node.target, "tags", ())
        for graph in _graphs(root)
        for node in graph.nodes
        if node.op == "call_function"
    )


def _mutates_input(program: torch.export.ExportedProgram) -> bool:
    """Whether the program writes into its user input in place (``x.add_``, ``relu_``, a
    write into a view of it). A functional program declares it in its signature; a training
    IR one (what ``torch.export.export`` gives) keeps the in-place ops, found here from the
    ops' schemas: a written argument that aliases the input, following views. A higher-order
    op given the input counts as a write if its body writes into any of its own inputs."""
    signature = program.graph_signature
    if signature.user_inputs_to_mutate:
        return True
    names = set(signature.user_inputs)
    graph = program.graph_module.graph
    roots = {n for n in graph.nodes if n.op == "placeholder" and n.name in names}
    return _writes_into(graph, roots, program.graph_module)


def _writes_unsaved_buffer(program: torch.export.ExportedProgram) -> bool:
    """Whether the program writes into a non-persistent buffer (a step counter registered with
    ``persistent=False``): declared in a functional program's signature, found from the ops'
    schemas in a training IR one (an in-place op, or the ``copy_`` an assignment becomes), as
    for the input. Reading such a buffer (a rotary cache) and writing a persistent one (batch
    norm's statistics, which ``state_dict`` saves) are fine."""
    signature = program.graph_signature
    unsaved = set(signature.non_persistent_buffers)
    if unsaved & set(signature.buffers_to_mutate.values()):
        return True
    graph = program.graph_module.graph
    buffer = signature.inputs_to_buffers.get
    roots = {n for n in graph.nodes if n.op == "placeholder" and buffer(n.name) in unsaved}
    return bool(roots) and _writes_into(graph, roots, program.graph_module)


def _writes_into(graph: torch.fx.Graph, roots: set[Any], owner: torch.fx.GraphModule) -> bool:
    aliases = set(roots)
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            schema = target._schema
            given = [a for a in _flat(node.args, node.kwargs) if a in aliases]
            if not given:
                continue
            for i, arg in enumerate(schema.arguments):
                value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
                written = arg.alias_info is not None and arg.alias_info.is_write
                if written and any(a in aliases for a in _flat((value,), {})):
                    return True
            if any(r.alias_info is not None for r in schema.returns):
                aliases.add(node)  # a view (or the written tensor) of the input
        elif target is operator.getitem:
            if node.args[0] in aliases:
                aliases.add(node)
        elif any(a in aliases for a in _flat(node.args, node.kwargs)):
            bodies = [
                getattr(owner, a.target)
                for a in _flat(node.args, node.kwargs)
                if a.op == "get_attr" and isinstance(getattr(owner, a.target, None), nn.Module)
            ]
            for body in bodies:
                if not isinstance(body, torch.fx.GraphModule):
                    return True  # cannot look inside: counted as a write
                inputs = {n for n in body.graph.nodes if n.op == "placeholder"}
                if _writes_into(body.graph, inputs, body):
                    return True
            aliases.add(node)  # its outputs may alias the input
    return False


def _flat(args: Any, kwargs: dict[str, Any]) -> list[torch.fx.Node]:
    """The fx nodes among ``args`` and ``kwargs`` (nested lists and tuples flattened)."""
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((args, kwargs), found.append)
    return found


def _rebuild(
    manifest: Manifest, payload: bytes, state: dict[str, torch.Tensor], device: str, training: bool
) -> GPUKernel:
    """Unpickle a kernel (see ``GPUKernel.__reduce_ex__``)."""
    verify_payload(payload, manifest)
    module, facts = _program_module(payload, manifest, torch.device(device))
    kernel = GPUKernel(module, manifest, payload, **facts._asdict())
    kernel.load_state_dict(_without_constants(kernel, state))
    kernel.training = training
    return kernel


def _without_constants(kernel: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``state`` less the program's tensor constants: a deep copy of a program module (what a
    seed holds) registers them as buffers, so the copy's state holds them, and a module rebuilt
    from the payload, where they are constants of the same values, has no such key (a strict
    load refused a pickled seed's kernel). Saved files and checkpoints keep them as they were."""
    own = kernel.state_dict().keys()

    def constant(key: str) -> bool:
        owner, _, name = key.rpartition(".")
        try:
            module = kernel.get_submodule(owner)
        except AttributeError:
            return False
        return isinstance(getattr(module, name, None), torch.Tensor)

    return {key: value for key, value in state.items() if key in own or not constant(key)}


@functools.cache
def _guard_patch() -> Any:
    """torch's "trace into this" config patch, made once (its only caller, a load, holds
    ``BUILD_LOCK``, so no two threads make it) and shared by every loaded program."""
    return torch._dynamo.dont_skip_tracing()


def _share_guard_patch(module: nn.Module) -> None:
    """Have the program module's guards function (the export's shape guards: sizes, ranges,
    divisibility) run under one config patch shared by every loaded program. torch wraps each
    in a patch of its own, whose ContextVar the first call sets in the calling thread's context
    for good: one more per load, however many kernels are evicted. The function is taken from
    the wrapper's closure; a torch whose wrapper differs keeps its own (and that entry)."""
    guards = module._modules.get("_guards_fn")
    forward = getattr(guards, "forward", None)
    code, closure = getattr(forward, "__code__", None), getattr(forward, "__closure__", None)
    if guards is None or code is None or not closure:
        return
    cells = dict(zip(code.co_freevars, closure, strict=True))
    func = cells["func"].cell_contents if "func" in cells else None
    if not callable(func):
        return
    guards.forward = _guard_patch()(func)


class GPUKernel(nn.Module):
    """A loaded artifact: callable, with trainable parameters, on one device."""

    def __init__(
        self,
        module: nn.Module,
        manifest: Manifest,
        payload: bytes | None = None,
        *,
        mutates_input: bool = False,
        draws_random: bool = False,
        writes_unsaved_buffer: bool = False,
        shares_memory: Overlap | None = None,
    ) -> None:
        super().__init__()
        self.inner: nn.Module | None = module
        self.manifest = manifest
        # The verified bytes the program came from, kept so that a grown model can be saved
        # with its kernels as verifiable artifacts (``kasmina.save``). Copies share the one
        # immutable ``bytes`` object (``copy.deepcopy`` does not copy bytes).
        self.payload = payload
        self._released = False
        self.trainable_copy = False  # set by ``KernelLoader.copy``: a seed's, never an original
        # Read from the program at load (``_program_module``): see the module doc.
        self.mutates_input = mutates_input
        self.draws_random = draws_random
        self.writes_unsaved_buffer = writes_unsaved_buffer
        self.shares_memory = shares_memory

    @classmethod
    def from_binary(
        cls, payload: bytes, manifest: Manifest, device: torch.device | str = "cpu"
    ) -> GPUKernel:
        """Deserialise a verified payload onto ``device``.

        Raises ``ArtifactIntegrityError`` (having deserialised nothing) if the manifest was not
        produced by ``verify_manifest`` or the payload does not match it.
        """
        if not isinstance(manifest, Manifest) or not manifest.verified:
            raise ArtifactIntegrityError(
                "refusing to load a payload whose manifest was not signature-verified "
                "(fetch it with UrzaLibraryClient)"
            )
        verify_payload(payload, manifest)
        device = torch.device(device)
        module, facts = _program_module(payload, manifest, device)
        logger.debug("loaded kernel %s onto %s", manifest.artifact_id, device)
        return cls(module, manifest, bytes(payload), **facts._asdict())

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickle as the artifact plus the trained weights (``torch.save(model)``).

        The exported program's module holds a generated guard function that pickle cannot
        name, so a live kernel is rebuilt from the payload it was verified with. Unpickling is
        trusted by definition (a pickle can run any code), so no signature is re-checked; the
        payload is still checked against its manifest. Hooks on the kernel are not kept.
        """
        if self.payload is None or self.inner is None:
            return super().__reduce_ex__(protocol)
        state = {k: v.detach() for k, v in self.state_dict().items()}
        return (_rebuild, (self.manifest, self.payload, state, str(self.device), self.training))

    def __deepcopy__(self, memo: dict[int, Any]) -> GPUKernel:
        # What deepcopy does without __reduce_ex__ above: copy the attributes (fast, no reload).
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(deepcopy(self.__dict__, memo))
        clone.shares_memory = None  # the copy's parameters are its own: it holds them apart
        # A program module's deep copy registers its non-persistent buffers and tensor
        # constants as persistent ones; the copy must save what the original saves, or a copy
        # pickled (``_rebuild``'s strict load) would not load back.
        copies = dict(clone.named_modules())
        for name, module in self.named_modules():
            twin = copies.get(name)
            if twin is not None and twin is not module:
                twin._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
                if isinstance(twin, torch.fx.GraphModule):
                    forget_source_with(twin)
        return clone

    @property
    def artifact_id(self) -> str:
        return self.manifest.artifact_id

    @property
    def blueprint(self) -> str:
        return self.manifest.blueprint

    @property
    def signed_input_shape(self) -> tuple[int | None, ...] | None:
        """The signed shape of the program's one input (None for a dynamic dimension): the
        exported graph takes that rank and those fixed sizes only. None for several inputs."""
        specs = self.manifest.input_spec
        return tuple(specs[0].shape) if len(specs) == 1 else None

    @property
    def signed_input_dtype(self) -> torch.dtype | None:
        """The signed dtype of the program's one input; None for several inputs."""
        specs = self.manifest.input_spec
        return getattr(torch, specs[0].dtype, None) if len(specs) == 1 else None

    @property
    def seed_hazard(self) -> str | None:
        """Why a seed must not run this kernel, from the facts read at load; None if none."""
        if shared := self.shares_memory:
            return (
                f"holds {shared.first!r} and {shared.second!r} in shared memory (tied weights, "
                "or a buffer that is a view of a parameter), which a seed cannot keep shared: "
                "publish the module again with each its own tensor"
            )
        if self.mutates_input:
            return "mutates its input in place; a seed's input is the host's activation"
        if self.writes_unsaved_buffer:
            return (
                "writes in place into a non-persistent buffer, which state_dict does not save: "
                "kasmina.save and rollback could not restore it"
            )
        return None

    @property
    def released(self) -> bool:
        return self._released

    def differs_from_artifact(self) -> str | None:
        """Why this kernel is not its artifact's verified original (None: it is): a seed's
        trainable copy, or weights or buffers other than its verified payload's (rebuilt from
        it and compared tensor by tensor)."""
        if self.trainable_copy:
            return "it is a trainable copy (load_kernel's), whose weights a seed may train"
        if self.payload is None or self.inner is None or self._released:
            return "it holds no verified payload to compare with (released, or built by hand)"
        mine = self.state_dict()
        theirs = GPUKernel.from_binary(self.payload, self.manifest, self.device).state_dict()
        changed = [k for k in theirs if k not in mine or not torch.equal(mine[k], theirs[k])]
        if changed or mine.keys() != theirs.keys():
            return f"its tensors differ from its artifact's ({', '.join(changed[:3]) or 'names'})"
        return None

    @property
    def device(self) -> torch.device:
        for tensor in self._tensors():
            return tensor.device
        return torch.device("cpu")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.inner is None:
            raise RuntimeError(
                f"kernel {self.artifact_id!r} was released (evicted from the cache); "
                "load it again before calling it"
            )
        try:
            return self.inner(*args, **kwargs)
        except Exception as exc:
            absent = weights_absent(self.inner)  # offloaded: a call it sits out, not a fault
            if absent is None:
                raise
            raise absent from exc

    def train(self, mode: bool = True) -> GPUKernel:
        """Set the flag only: the exported graph's dropout/batch-norm mode is fixed."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.training = mode
        return self

    def example_inputs(self, dynamic_size: int = 2) -> tuple[torch.Tensor, ...]:
        """Zero tensors matching the manifest's input spec (dynamic dims = ``dynamic_size``)."""
        device = self.device
        return tuple(
            torch.zeros(
                [dynamic_size if d is None else d for d in spec.shape],
                dtype=getattr(torch, spec.dtype),
                device=device,
            )
            for spec in self.manifest.input_spec
        )

    def _tensors(self) -> Iterator[torch.Tensor]:
        """Parameters, buffers and tensor constants of the module, each once."""
        if self.inner is None:
            return
        seen: set[int] = set()
        for module in self.inner.modules():
            candidates = [*module._parameters.values(), *module._buffers.values()]
            candidates += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
            for tensor in candidates:
                if tensor is not None and id(tensor) not in seen:
                    seen.add(id(tensor))
                    yield tensor

    def get_memory_size(self) -> int:
        """Bytes of device memory held by parameters, buffers and constants (shared storage
        counted once); 0 once released."""
        storages: dict[tuple[str, int], int] = {}
        for tensor in self._tensors():
            storage = tensor.untyped_storage()
            storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
        return sum(storages.values())

    def release_gpu_memory(self) -> None:
        """Free the kernel's tensors (even ones an optimizer still references). The kernel is
        unusable afterwards: calling it raises. Idempotent."""
        if self.inner is None:
            return
        # Marked before the tensors are emptied, so a copy that overlaps the release sees the
        # flag when it checks afterwards (KernelLoader.copy does).
        self._released = True
        for module in self.inner.modules():
            for param in module._parameters.values():
                if param is not None:
                    param.grad = None
                    param.data = torch.empty(0, dtype=param.dtype, device=param.device)
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    module._buffers[name] = torch.empty(0, dtype=buffer.dtype, device=buffer.device)
            for name, value in list(vars(module).items()):
                if isinstance(value, torch.Tensor):
                    setattr(module, name, torch.empty(0, dtype=value.dtype, device=value.device))
        self.inner = None
        logger.debug("released kernel %s", self.artifact_id)

    def extra_repr(self) -> str:
        return f"artifact_id={self.artifact_id!r}, blueprint={self.blueprint!r}" + (
            ", released" if self._released else ""
        )
