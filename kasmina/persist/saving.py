"""``kasmina.save``: one self-contained file for a grown model (docs/design.md §6a).

What the body holds, and why each part is there:

- ``slots``: each slot's module name and layout (``num_seeds``, ``chunk_size``, ``chunk_dim``,
  ``output_index``, its rows in the shared table, ``fault_limit``): the loader re-attaches the
  same slots to a fresh host and refuses a host they do not fit;
- ``table``: the shared state table (stages, alphas, gates, embargoes), restored as it was:
  the slots' rows alone, re-based from row 0 (a slot detached keeps its rows, §6a);
- ``weights``: the attached model's ``state_dict`` without the seeds' kernel weights: host
  weights under ``<slot>.host.``, each seed's alpha and extra state;
- ``seeds``: per seed, the artifact its kernel came from and the kernel's trained weights;
- ``artifacts``: per artifact, its signed manifest and its payload, stored once however many
  seeds share it. The program is shipped as it was published, never re-exported: only the
  publisher's signature may vouch for code, and the trained weights travel as plain tensors.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kasmina.persist.format import FORMAT_VERSION, SavedModelError, write_saved
from kasmina.seeds.inject import kasmina_layers
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.outputs import checked_chunk_dim
from kasmina.stages import StateColumn
from kasmina.urza.kernel import GPUKernel
from kasmina.utils.state_io import clone_state, unreadable_entry

logger = logging.getLogger(__name__)

__all__ = ["save", "slot_layout"]

KERNEL_PREFIX = "kernel."


def slot_layout(name: str, slot: KasminaLayer) -> dict[str, Any]:
    """The layout a slot exposes, as plain values (attributes a slot version does not have
    take the defaults that version behaved as)."""
    first = slot.seeds[0]
    return {
        "name": name,
        "num_seeds": int(slot.num_seeds),
        "chunk_size": int(slot.chunk_size),
        "chunk_dim": int(vars(slot).get("chunk_dim", -1)),
        "output_index": int(vars(slot).get("output_index", 0)),
        "state_offset": int(first.state_index),
        "region_id": int(slot.state_table.state_tensor[first.state_index, StateColumn.REGION_ID]),
        "fault_limit": int(first.fault_limit),
        "host_class": f"{type(slot.host).__module__}.{type(slot.host).__qualname__}",
    }


def uncompiled(model: nn.Module, *, data_parallel: bool = True) -> nn.Module:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) compiled or a
    ``DistributedDataParallel`` wraps (unwrapped as far as they nest), else ``model``. A
    wrapper names every submodule under its own prefix (``_orig_mod.``, ``module.``): a file
    saved from it named slots that a plain model of the same architecture does not have.
    Saving and loading go through the module itself, so a file moves between compiled,
    data-parallel and plain models either way (``data_parallel=False``: DDP is left on). A
    TorchScript module (``torch.jit.script``/``trace``) is a ``SavedModelError``: slots can
    neither be read from one nor put in place in one."""
    if isinstance(model, torch.jit.ScriptModule):
        raise SavedModelError(
            f"{type(model).__name__} is a TorchScript module (torch.jit.script or trace), whose "
            "slots can neither be saved nor put in place: save or load the nn.Module it was "
            "made from"
        )
    while True:
        inner = model._modules.get("_orig_mod")
        if inner is not None and isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            model = inner
        elif data_parallel and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def save(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` (host, slots, seeds, kernels) to ``path`` atomically; returns the path.

    Every kernel a seed holds must be a verified Urza artifact (a ``GPUKernel`` loaded by the
    manager or by ``kasmina.load``), because the loader accepts no program without its
    publisher's signature. Raises ``SavedModelError`` otherwise, when ``model`` has no
    slots (a plain model is saved with ``torch.save(model.state_dict())``), or when its state
    holds a value ``kasmina.load`` cannot read back (a module's extra state holding a NumPy
    array). Nothing is written then, and a failure while writing leaves any previous file at
    ``path`` as it was. A ``torch.compile`` of the model is saved as the model it compiled
    (:func:`uncompiled`).

    It reads the live model: call it on the training thread between steps. A change of a seed's
    stage or kernel while it reads (a command a manager applied on the training thread, met by a
    save on another thread) is a ``SavedModelError``, nothing written: the file would hold a
    seed's kernel from before the change and its state from after, which ``kasmina.load``
    refuses. Weights rewritten in place meanwhile (a step) it cannot see.
    """
    model = uncompiled(model)
    slots = [(name, m) for name, m in model.named_modules() if isinstance(m, KasminaLayer)]
    if not slots:
        raise SavedModelError(f"{type(model).__name__} has no Kasmina slots to save")
    if any(name == "" for name, _ in slots):
        raise SavedModelError("the model itself is a KasminaLayer; save the model around it")
    table = slots[0][1].state_table
    if any(slot.state_table is not table for _, slot in slots):
        raise SavedModelError("all slots must share one state table (kasmina.attach does this)")
    if len(kasmina_layers(model)) != len(slots):
        raise SavedModelError("nested slots cannot be saved")
    layouts = {name: _fitting_layout(name, slot) for name, slot in slots}
    rows, offsets = _rows(slots)
    before = _lifecycle(table, slots)
    artifacts: dict[str, dict[str, Any]] = {}
    seeds: list[dict[str, Any]] = []
    kernel_keys: set[str] = set()
    for name, slot in slots:
        for k, seed in enumerate(slot.seeds):
            prefix = f"{name}.seeds.{k}."
            entry: dict[str, Any] = {"seed_id": seed.seed_id, "slot": name, "index": k}
            kernel = seed.kernel
            if kernel is not None:
                artifact_id = _artifact_of(seed.seed_id, kernel, artifacts)
                entry["artifact_id"] = artifact_id
                entry["kernel_state"] = clone_state(kernel.state_dict(), "cpu")
                kernel_keys.update(prefix + KERNEL_PREFIX + key for key in kernel.state_dict())
            seeds.append(entry)
    weights = {
        key: value
        for key, value in clone_state(model.state_dict(), "cpu").items()
        if key not in kernel_keys
    }
    body = {
        "format_version": FORMAT_VERSION,
        "slots": [layouts[name] | {"state_offset": offsets[name]} for name, _ in slots],
        "table": {
            "state_tensor": table.state_tensor.detach().cpu()[rows],
            "embargo_epochs": int(table.embargo_epochs),
        },
        "weights": weights,
        "seeds": seeds,
        "artifacts": artifacts,
    }
    problem = unreadable_entry(weights)
    if problem is not None:  # kasmina.load reads plain data only (weights_only=True)
        raise SavedModelError(
            f"the model's state holds what kasmina.load could not read back ({problem}): "
            "nothing written; make that module's get_extra_state return tensors, numbers, "
            "strings and lists or dicts of them"
        )
    if _lifecycle(table, slots) != before:
        raise SavedModelError(
            "a seed's stage or kernel changed while the model was read (a command applied on "
            "the training thread?): nothing written; save on the training thread between steps"
        )
    written = write_saved(path, body)
    logger.info(
        "saved %d slot(s), %d kernel(s) of %d artifact(s) to %s",
        len(slots),
        sum("artifact_id" in s for s in seeds),
        len(artifacts),
        written,
    )
    return written


def _fitting_layout(name: str, slot: KasminaLayer) -> dict[str, Any]:
    """``slot_layout``, once checked against what its host declares now, as ``kasmina.load``
    checks it: a host resized since ``attach`` (``resize_token_embeddings`` under a tied head's
    slot, whose seeds then sit out) made a file that no model of its architecture would load."""
    layout = slot_layout(name, slot)
    try:
        checked_chunk_dim(
            slot.host,
            layout["num_seeds"],
            layout["chunk_size"],
            layout["chunk_dim"],
            layout["output_index"],
            name,
        )
    except ValueError as exc:
        raise SavedModelError(
            f"slot {name!r} no longer fits its host ({exc}), so kasmina.load would refuse the "
            "file: detach the slot (kasmina.detach(model, only=[...])) or attach one at the "
            "host's width, then save"
        ) from exc
    return layout


def _rows(slots: list[tuple[str, KasminaLayer]]) -> tuple[torch.Tensor, dict[str, int]]:
    """The table rows the slots use, in order, and each slot's first row among them. A table
    may hold rows no slot in the model uses (a slot ``kasmina.detach(model, only=...)`` removed
    keeps its rows, §6a; the model was refused for good): only the slots' rows are saved,
    re-based from row 0, as ``kasmina.load`` rebuilds a table of exactly the slots' rows."""
    spans = sorted((int(slot.seeds[0].state_index), name, slot) for name, slot in slots)
    rows: list[int] = []
    offsets: dict[str, int] = {}
    for first, name, slot in spans:
        indices = [int(seed.state_index) for seed in slot.seeds]
        if indices != list(range(first, first + len(indices))) or (rows and first <= rows[-1]):
            raise SavedModelError(f"slot {name!r}: its state rows {indices} overlap or have gaps")
        offsets[name] = len(rows)
        rows += indices
    return torch.tensor(rows, dtype=torch.long), offsets


def _lifecycle(table: Any, slots: list[tuple[str, KasminaLayer]]) -> tuple[Any, ...]:
    """The seeds' stages and kernels (not the alphas a GRAFTING step moves): a save that reads
    the same before and after read no half-applied command."""
    stages = table.state_tensor[:, StateColumn.LIFECYCLE_STAGE].tolist()
    return (stages, [id(seed.kernel) for _, slot in slots for seed in slot.seeds])


def _artifact_of(seed_id: str, kernel: nn.Module, artifacts: dict[str, dict[str, Any]]) -> str:
    """Record ``kernel``'s artifact in ``artifacts`` (once per id); returns its id."""
    if not isinstance(kernel, GPUKernel) or kernel.payload is None or kernel.released:
        raise SavedModelError(
            f"seed {seed_id}: its kernel is not a verified Urza artifact "
            f"({type(kernel).__name__}); kasmina.save ships only programs a publisher signed"
        )
    manifest = kernel.manifest
    if not manifest.verified:
        raise SavedModelError(
            f"seed {seed_id}: kernel manifest {manifest.artifact_id!r} is unverified"
        )
    artifacts.setdefault(
        manifest.artifact_id, {"manifest": manifest.to_json(), "payload": kernel.payload}
    )
    return manifest.artifact_id
