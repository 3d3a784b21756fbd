"""``kasmina.load``: restore a grown model into a freshly built host (docs/design.md §6a).

All or nothing, in this order, so that a refusal leaves the model exactly as it was:

1. the file: magic, format version, size and SHA-256 (``read_saved``), then ``torch.load``
   with ``weights_only=True``;
2. the architecture: every saved slot names a module of ``model`` that is not already a slot,
   its layout is one ``attach`` could have made there (the header is unsigned: a forged layout
   must not load into a model that differs from the saved one), and the host's parameters and
   buffers have the saved keys and shapes;
3. the kernels: each artifact's manifest is verified against the caller's
   ``TrustedPublishers`` and its payload against the manifest before it is deserialised (the
   Urza rule, docs/design.md §6), each seed's kernel must take its slot's chunks (the check
   GERMINATE made), then each seed's copy gets its trained weights;
4. the slots are built aside on a new state table, and the seeds' weights, extra state and
   the table are restored into them;
5. only then are the host weights written and the slots put into the model, with the
   model-level load check ``kasmina.attach`` puts on a model (``add_load_checks``), so that
   a later ``load_state_dict`` the seeds refuse changes no module of it.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kasmina.errors import ArtifactIntegrityError
from kasmina.ops.lifecycle import INT32_MAX
from kasmina.persist.format import SavedModelError, read_saved
from kasmina.persist.saving import KERNEL_PREFIX, uncompiled
from kasmina.seeds.inject import add_load_checks, install, uncallable_slot_problem
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.outputs import declared_width, forward_owner
from kasmina.seeds.table import GPUStateTensor
from kasmina.stages import NUM_STATE_COLUMNS, SeedStage, StateColumn, check_saved_stages
from kasmina.urza.artifact import verify_manifest
from kasmina.urza.kernel import GPUKernel
from kasmina.urza.keys import TrustedPublishers
from kasmina.utils.grad_modes import training_tensors
from kasmina.utils.interrupts import interrupts_deferred
from kasmina.utils.state_io import in_saved_dtypes, load_mismatch, with_metadata_of

logger = logging.getLogger(__name__)

__all__ = ["load"]


def load(
    path: str | os.PathLike[str], model: nn.Module, *, publishers: TrustedPublishers
) -> list[KasminaLayer]:
    """Attach the slots saved in ``path`` to ``model`` and restore everything; returns them.

    ``model`` is a freshly built host of the saved architecture (no slots). ``publishers``
    are the public keys whose artifacts this process trusts; a kernel signed by any other key
    is refused. In eval mode the restored model's outputs are bitwise those of the saved one
    (a kernel drawing random numbers in eval mode draws from the saved position:
    ``extra_state.stream_position``).

    Raises ``SavedModelError`` (an incompatible version, a malformed file, a host that does not
    match) or ``ArtifactIntegrityError`` (a damaged or tampered file, an unknown publisher,
    a payload that does not match its manifest); running out of memory on the way (the file
    sound) raises as itself (``torch.OutOfMemoryError``, ``MemoryError``). ``model`` is
    unchanged when it raises: every check runs before the first write. The writes (the host's
    weights, the slots put in place) hold a Ctrl-C until they are done; an exception from the
    user's own load hooks on ``model`` during them is the one thing that can leave it partly
    loaded. Called inside ``torch.inference_mode()``, it builds and writes outside it, so the
    model trains later.
    """
    if not isinstance(publishers, TrustedPublishers):
        raise TypeError(
            "kasmina.load verifies kernels with TrustedPublishers (publisher public keys), "
            f"not {type(publishers).__name__}"
        )
    body = read_saved(path)
    model = uncompiled(model, data_parallel=False)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise SavedModelError(  # slots made behind DDP's back: its buffer lists would be stale
            "load into the model before wrapping it (kasmina.load, then wrap_ddp)"
        )
    if any(isinstance(m, KasminaLayer) for m in model.modules()):
        raise SavedModelError("model already has Kasmina slots; load into a freshly built host")
    tensors = (*model.parameters(), *model.buffers())
    if any(isinstance(t, torch.nn.parameter.UninitializedTensorMixin) for t in tensors):
        raise SavedModelError(  # their shapes come from a forward; the checks need them
            "model has uninitialised lazy modules (LazyLinear, LazyConv2d, ...); run one "
            "forward through it, then load"
        )
    if any(t.is_meta for t in tensors):  # copies are no-ops
        raise SavedModelError(
            "model has tensors on the meta device, which a load cannot fill; build it on a "
            "real device (or to_empty(device=...) first), then load"
        )
    try:  # outside inference mode: what it builds there no training step could update
        with training_tensors():
            layers, host_state, kernels = _prepare(body, model, publishers)
    except (SavedModelError, ArtifactIntegrityError):
        raise
    except (torch.OutOfMemoryError, MemoryError):  # the device's or host's memory, not the file
        raise
    except Exception as exc:  # whatever else a malformed body provokes; nothing was changed
        raise SavedModelError(
            f"saved model {os.fspath(path)!r} is malformed ({type(exc).__name__}: {exc})"
        ) from exc

    # Commit: everything that can be refused has been checked. A Ctrl-C waits until it is done.
    with interrupts_deferred(), training_tensors():
        model.load_state_dict(host_state, strict=True)
        install(model, layers)  # as attach does, with the fused-path guard
        add_load_checks(model)  # as attach does: a refused load_state_dict changes no module
    logger.info("loaded %d slot(s) and %d kernel(s) from %s", len(layers), kernels, path)
    return list(layers.values())


def _prepare(
    body: Mapping[str, Any], model: nn.Module, publishers: TrustedPublishers
) -> tuple[dict[str, KasminaLayer], dict[str, torch.Tensor], int]:
    """Steps 2 to 4, touching nothing of ``model``: the slots built aside, the host weights to
    write and the number of kernels. Every value of the body is checked before it sizes an
    allocation (the file is unsigned: its state table's shape must be the slots')."""
    body = _as_saved_through_the_module(body, model)
    layouts = _layouts(_list(body, "slots"))
    seeds_saved = _list(body, "seeds")
    weights = _mapping(body, "weights")
    artifacts = _mapping(body, "artifacts")
    state_tensor, embargo_epochs = _table(_mapping(body, "table"), layouts)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    hosts = {layout["name"]: _host(model, layout) for layout in layouts}
    host_state = _check_architecture(model, hosts, weights)
    originals = {
        artifact_id: _verified_kernel(artifact_id, entry, publishers, device)
        for artifact_id, entry in artifacts.items()
    }

    table = GPUStateTensor(state_tensor.shape[0], device, embargo_epochs=embargo_epochs)
    layers = {
        layout["name"]: _build_slot(layout, hosts[layout["name"]], table) for layout in layouts
    }
    by_slot: dict[str, dict[str, Any]] = {name: {} for name in layers}
    layouts_by_name = {layout["name"]: layout for layout in layouts}
    seen: set[tuple[str, int]] = set()
    own: dict[str, tuple[int, SeedStage]] = {}  # seed_id -> (its row, its saved state's stage)
    for entry in seeds_saved:
        if not isinstance(entry, Mapping):
            raise SavedModelError(f"saved seed entry is malformed ({type(entry).__name__})")
        name, k = entry.get("slot"), entry.get("index")
        if (
            not isinstance(name, str)
            or name not in layers
            or isinstance(k, bool)
            or not isinstance(k, int)
            or not 0 <= k < layers[name].num_seeds
        ):
            raise SavedModelError(f"saved seed {entry.get('seed_id')!r} has no slot")
        if (name, k) in seen:  # which entry a seed takes would be the file's order's choice
            raise SavedModelError(f"seed {k} of slot {name!r} is saved twice")
        seen.add((name, k))
        artifact_id = entry.get("artifact_id")
        if artifact_id is None:
            continue
        if not isinstance(artifact_id, str) or artifact_id not in originals:
            raise SavedModelError(f"seed {entry.get('seed_id')!r}: artifact {artifact_id!r} absent")
        kernel_state = _mapping(entry, "kernel_state")
        problem = _kernel_problem(layouts_by_name[name], hosts[name], originals[artifact_id])
        if problem is not None:
            raise SavedModelError(f"seed {entry.get('seed_id')!r}: {problem}")
        kernel = copy.deepcopy(originals[artifact_id])
        try:
            in_saved_dtypes(kernel, kernel_state)
            kernel.load_state_dict(kernel_state, strict=True)
        except (RuntimeError, TypeError, ValueError, KeyError) as exc:
            raise SavedModelError(f"seed {entry.get('seed_id')!r}: kernel weights: {exc}") from exc
        layers[name].seed(k).attach_kernel(kernel, artifact_id)
        prefix = f"seeds.{k}.{KERNEL_PREFIX}"
        by_slot[name].update({prefix + key: v for key, v in kernel_state.items()})
    for name, layer in layers.items():
        seeds_state = {
            key[len(name) + len(".seeds.") :]: value
            for key, value in weights.items()
            if key.startswith(f"{name}.seeds.")
        }
        kernels = {key[len("seeds.") :]: v for key, v in by_slot[name].items()}
        if twice := sorted(set(seeds_state) & set(kernels)):  # save writes each in one place
            raise SavedModelError(f"slot {name!r}: {twice[0]} is saved twice (weights, seeds)")
        seeds_state.update(kernels)
        try:
            layer.seeds.load_state_dict(seeds_state, strict=True)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise SavedModelError(f"slot {name!r}: seed state does not load: {exc}") from exc
        for k, seed in enumerate(layer.seeds):  # each seed's stage, as its own state holds it
            if f"{k}._extra_state" in seeds_state:  # (torch's key for get_extra_state)
                own[seed.seed_id] = (seed.state_index, seed.stage)
    try:
        table.load_state_dict({"state_tensor": state_tensor, "embargo_epochs": embargo_epochs})
    except (ValueError, KeyError, IndexError) as exc:
        raise SavedModelError(f"saved state table does not load: {exc}") from exc
    try:  # written over the rows the seeds' states restored (the header is unsigned)
        check_saved_stages(table.stages(), own)
    except ValueError as exc:
        raise SavedModelError(f"saved {exc}") from None
    return layers, host_state, len(originals)


# The slot layout fields, all ints (``saving.slot_layout``); ``host_class`` is only reported.
_LAYOUT_INTS = (
    "num_seeds",
    "chunk_size",
    "chunk_dim",
    "output_index",
    "state_offset",
    "region_id",
    "fault_limit",
)


def _layouts(slots_saved: list[Any]) -> list[dict[str, Any]]:
    """The saved slot layouts, each checked field by field: names unique and not nested,
    every layout field an int, ``fault_limit`` >= 1 (what a seed's ``fault_limit`` takes: a
    Python int, never written to the int32 table, so a huge one is a valid "never quarantine"),
    and the slots' rows tiling the state table from row 0. ``region_id`` is checked against the
    table (``_table``), ``output_index`` against the host by the slot's constructor (as for
    ``attach``) and ``chunk_dim`` against the seeds' kernels (``_kernel_problem``)."""
    layouts: list[dict[str, Any]] = []
    for raw in slots_saved:
        if not isinstance(raw, Mapping):
            raise SavedModelError(f"saved slot layout is malformed ({type(raw).__name__})")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise SavedModelError(f"saved slot name {name!r} is malformed")
        layout: dict[str, Any] = {"name": name, "host_class": str(raw.get("host_class", "?"))}
        for key in _LAYOUT_INTS:
            value = raw.get(key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SavedModelError(f"saved slot {name!r}: {key} is {value!r}, not an int")
            layout[key] = value
        if layout["num_seeds"] < 1 or layout["chunk_size"] < 1:
            raise SavedModelError(f"saved slot {name!r}: num_seeds and chunk_size must be >= 1")
        if layout["fault_limit"] < 1:
            raise SavedModelError(
                f"saved slot {name!r}: fault_limit {layout['fault_limit']} is not >= 1"
            )
        layouts.append(layout)
    names = [layout["name"] for layout in layouts]
    if len(set(names)) != len(names):
        raise SavedModelError(f"a saved slot is repeated: {sorted(names)}")
    for name in names:
        outer = [other for other in names if name.startswith(other + ".")]
        if outer:
            raise SavedModelError(f"saved slot {name!r} is nested in {outer[0]!r}")
    row = 0
    for layout in sorted(layouts, key=lambda item: item["state_offset"]):
        if layout["state_offset"] != row:
            raise SavedModelError(
                f"saved slot {layout['name']!r}: state rows from {layout['state_offset']}, "
                f"expected {row} (the slots' rows must tile the state table)"
            )
        row += layout["num_seeds"]
    return layouts


def _table(
    table_saved: Mapping[str, Any], layouts: list[dict[str, Any]]
) -> tuple[torch.Tensor, int]:
    """The saved state table and embargo, checked before anything is allocated for them: an
    int32, contiguous (so every row is in the file) ``(slots' seeds, NUM_STATE_COLUMNS)``;
    each slot's ``region_id`` is its first row's REGION_ID (where ``save`` read it), and the
    embargo is one ``GPUStateTensor`` takes: it fits the int32 EMBARGO_COUNTER it is written to
    when a seed enters COOLDOWN."""
    state_tensor = table_saved.get("state_tensor")
    rows = sum(layout["num_seeds"] for layout in layouts)
    expected = (rows, NUM_STATE_COLUMNS)
    if (
        not isinstance(state_tensor, torch.Tensor)
        or state_tensor.dtype != torch.int32
        or tuple(state_tensor.shape) != expected
        or not state_tensor.is_contiguous()
    ):
        got = (
            f"{state_tensor.dtype} {tuple(state_tensor.shape)}"
            if isinstance(state_tensor, torch.Tensor)
            else type(state_tensor).__name__
        )
        raise SavedModelError(
            f"saved state table is malformed: {got}, expected a contiguous int32 {expected}"
        )
    for layout in layouts:
        region = int(state_tensor[layout["state_offset"], StateColumn.REGION_ID])
        if layout["region_id"] != region:
            raise SavedModelError(
                f"saved slot {layout['name']!r}: region_id {layout['region_id']} is not its "
                f"state rows' {region}"
            )
    embargo = table_saved.get("embargo_epochs")
    if isinstance(embargo, bool) or not isinstance(embargo, int) or not 0 <= embargo <= INT32_MAX:
        raise SavedModelError(f"saved embargo_epochs {embargo!r} is not an int in [0, {INT32_MAX}]")
    return state_tensor, embargo


# The names a wrapper gives the module it wraps: ``torch.compile``'s, ``DistributedDataParallel``'s.
_WRAPPERS = ("_orig_mod", "module")


def _as_saved_through_the_module(body: Mapping[str, Any], model: nn.Module) -> Mapping[str, Any]:
    """``body`` with the names an older Kasmina gave a wrapped model's file made the module's.

    Saved from a ``torch.compile`` or ``DistributedDataParallel`` wrapper (``wrap_ddp``'s
    result), such a file named every slot, seed slot and weight under ``_orig_mod.`` or
    ``module.`` (``_orig_mod.module.`` for a compiled DDP); files are now saved through the
    module itself (``uncompiled``), and ``load`` looks names up in it. While every name carries
    one such prefix and the model has no module of that name, the prefix is dropped, so the
    file loads as a newer one would (into a plain or a compiled model). Anything else is
    returned as it is, for the checks to judge."""
    slots, seeds, weights = body.get("slots"), body.get("seeds"), body.get("weights")
    if (
        not isinstance(slots, list)
        or not isinstance(seeds, list)
        or not isinstance(weights, Mapping)
        or not all(isinstance(s, Mapping) for s in slots + seeds)
    ):
        return body
    names = [s.get("name") for s in slots] + [s.get("slot") for s in seeds] + list(weights)
    if not slots or not all(isinstance(n, str) for n in names):
        return body
    cut = 0
    while True:
        wrapper = next(
            (w for w in _WRAPPERS if all(n.startswith(w + ".", cut) for n in names)), None
        )
        if wrapper is None or wrapper in model._modules:
            break
        cut += len(wrapper) + 1
    if not cut:
        return body
    return {
        **body,
        "slots": [{**s, "name": s["name"][cut:]} for s in slots],
        "seeds": [{**s, "slot": s["slot"][cut:]} for s in seeds],
        "weights": {key[cut:]: value for key, value in weights.items()},
    }


def _list(body: Mapping[str, Any], key: str) -> list[Any]:
    value = body.get(key)
    if not isinstance(value, list):
        raise SavedModelError(f"saved model: {key!r} is missing or malformed")
    return value


def _mapping(body: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = body.get(key)
    if not isinstance(value, Mapping):
        raise SavedModelError(f"saved model: {key!r} is missing or malformed")
    return value


def _host(model: nn.Module, layout: Mapping[str, Any]) -> nn.Module:
    """The host module a layout (checked by ``_layouts``) names."""
    name = layout["name"]
    try:
        host = model.get_submodule(name)
    except AttributeError as exc:
        raise SavedModelError(
            f"architecture mismatch: {type(model).__name__} has no module {name!r} (the saved "
            f"slot wraps a {layout['host_class']})"
        ) from exc
    problem = uncallable_slot_problem(model, name)
    if problem is not None:
        raise SavedModelError(problem)
    return host


def _check_architecture(
    model: nn.Module, hosts: Mapping[str, nn.Module], weights: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """The saved host weights under the bare model's keys, after checking keys and shapes.

    A host inside a block the model uses at two paths (``nn.Sequential(b, b, head)``) has its
    weights under both in ``state_dict()``, so every path of it is a slot's in the file."""
    ids = {id(host) for host in hosts.values()}
    paths = [n for n, m in model.named_modules(remove_duplicate=False) if id(m) in ids and n]

    def attached(key: str) -> str:
        for name in paths:
            if key.startswith(name + "."):
                return f"{name}.host.{key[len(name) + 1 :]}"
        return key

    live = model.state_dict()
    wanted = {attached(key): key for key in live}
    saved_host = {key for key in weights if not any(key.startswith(f"{n}.seeds.") for n in paths)}
    missing, unexpected = sorted(set(wanted) - saved_host), sorted(saved_host - set(wanted))
    if missing or unexpected:
        raise SavedModelError(
            f"architecture mismatch with {type(model).__name__}: saved weights lack "
            f"{missing[:5]}, have extra {unexpected[:5]}"
        )
    # Under the bare model's keys, with its modules' format versions (the file carries none, and
    # ``load_state_dict`` would read a state without them as the oldest format).
    state = with_metadata_of(live, {bare: weights[key] for key, bare in wanted.items()})
    for bare in state:
        target = live[bare]
        problem = load_mismatch(model, bare, target, state)
        if problem is not None and problem[0] == "shape":
            raise SavedModelError(
                f"architecture mismatch: {bare} is {tuple(target.shape)} here, saved {problem[1]}"
            )
        if problem is not None:
            # The seeds' kernels come back in their saved dtype, which is the saved host's, and
            # nothing casts them (as at GERMINATE): a host of another dtype would run none.
            raise SavedModelError(
                f"dtype mismatch: {bare} is {target.dtype} here, saved {problem[1]}; build "
                f"the host in the saved dtype (e.g. model.to({problem[1]})) before loading"
            )
    return state


def _verified_kernel(
    artifact_id: str, entry: Any, publishers: TrustedPublishers, device: torch.device
) -> GPUKernel:
    """Verify the manifest, then the payload, then deserialise (``GPUKernel.from_binary``)."""
    if not isinstance(entry, Mapping):
        raise SavedModelError(f"artifact {artifact_id!r} is malformed")
    raw, payload = entry.get("manifest"), entry.get("payload")
    if not isinstance(raw, bytes) or not isinstance(payload, bytes):
        raise SavedModelError(f"artifact {artifact_id!r}: manifest or payload missing")
    manifest = verify_manifest(raw, publishers, expected_id=artifact_id)
    return GPUKernel.from_binary(payload, manifest, device)


def _build_slot(layout: Mapping[str, Any], host: nn.Module, table: GPUStateTensor) -> KasminaLayer:
    """A slot like the saved one (a layout checked by ``_layouts``) around ``host`` (not yet in
    the model)."""
    options: dict[str, Any] = {
        "state": table,
        "state_offset": layout["state_offset"],
        "layer_id": layout["name"],
        "region_id": layout["region_id"],
        "fault_limit": layout["fault_limit"],
        "chunk_dim": layout["chunk_dim"],
        "output_index": layout["output_index"],
    }
    try:
        layer = KasminaLayer(host, layout["num_seeds"], layout["chunk_size"], **options)
    except (ValueError, KeyError, IndexError) as exc:
        raise SavedModelError(f"architecture mismatch at slot {layout['name']!r}: {exc}") from exc
    return layer


# Hosts (by the class whose forward they run, ``forward_owner``) that put their declared width
# last, in every call whatever the input's rank.
_WIDTH_LAST = (nn.Linear, nn.Embedding)


def _kernel_problem(layout: Mapping[str, Any], host: nn.Module, kernel: GPUKernel) -> str | None:
    """Why ``kernel`` cannot run on the chunks the slot ``layout`` cuts, or None: GERMINATE's
    check against the recorded output (``CommandExecutor``), made here from the manifest's one
    input, whose rank is the chunk's and so the host output's: ``chunk_dim`` must index it and
    the kernel take ``chunk_size`` features there; a Linear or Embedding host chunked along
    another dim leaves its whole width last. This is what fixes ``chunk_dim`` before a forward:
    a seed that holds no kernel passes the host through whatever it is, and its slot's first
    forward checks it (``contract_problem``, which GERMINATE also refuses on)."""
    specs = kernel.manifest.input_spec
    if len(specs) != 1:
        return f"its kernel takes {len(specs)} inputs; a seed gives it one chunk"
    shape = specs[0].shape
    dim, rank, chunk = layout["chunk_dim"], len(shape), layout["chunk_size"]
    if not -rank <= dim < rank:
        return f"chunk_dim {dim} is outside the {rank}-D chunk its kernel takes {list(shape)}"
    if shape[dim] not in (None, chunk):
        return f"its kernel takes {list(shape)}, not {chunk} features along chunk_dim {dim}"
    owner = forward_owner(host)
    width = declared_width(host, -1, layout["output_index"]) if owner in _WIDTH_LAST else None
    if width is not None and dim % rank != rank - 1 and shape[-1] not in (None, width):
        return (
            f"chunk_dim {dim} leaves the host's {width} features last, but its kernel takes "
            f"{list(shape)}"
        )
    return None
