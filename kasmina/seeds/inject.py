"""Put seeds into any ``nn.Module`` by module name, and take them out again.

Like PEFT's injection by module name: each matching submodule is replaced, in its parent, by a
:class:`~kasmina.seeds.layer.KasminaLayer` wrapping it; ``detach`` puts the originals back, so
the model is the one you started with (its parameters were never copied). All slots share one
:class:`~kasmina.seeds.table.GPUStateTensor`, so one fused launch updates every seed of the model.

While attached, a wrapped module's parameters appear in ``state_dict`` under ``<name>.host.``.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

import torch
from torch import nn

from kasmina.kd.config import KDConfig
from kasmina.kd.loss import sum_kd_losses
from kasmina.seeds.layer import KasminaLayer
from kasmina.seeds.seed import GradientIsolatedSeed
from kasmina.seeds.table import GPUStateTensor

if TYPE_CHECKING:
    from kasmina.utils.telemetry import TelemetryReporter


def _matches(name: str, targets: Sequence[str]) -> bool:
    # A target matches a full name, a dotted suffix ("fc" matches "encoder.fc"), or is an
    # fnmatch pattern over full names ("blocks.*.mlp.fc1").
    return any(name == t or name.endswith("." + t) or fnmatchcase(name, t) for t in targets)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def attach(
    model: nn.Module,
    targets: str | Sequence[str],
    seeds_per_layer: int,
    chunk_size: int,
    *,
    kd_config: KDConfig | None = None,
    state: GPUStateTensor | None = None,
    embargo_epochs: int = 0,
    telemetry: TelemetryReporter | None = None,
) -> list[KasminaLayer]:
    """Wrap every submodule named by ``targets`` in a KasminaLayer; returns the slots in order.

    Each slot gets ``seeds_per_layer`` DORMANT seeds of ``chunk_size`` features (their product
    must equal the module's output features). The slots share ``state`` (default: a new table of
    ``len(slots) * seeds_per_layer`` seeds on the model's device); slot ``i`` holds rows
    ``i * seeds_per_layer ...`` and REGION_ID ``i``. Raises ``ValueError``, leaving the model
    untouched, when nothing matches, a match is already a slot or nested in another match.
    """
    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns:
        raise ValueError("attach needs at least one target name or pattern")
    names = [
        name
        for name, module in model.named_modules()
        if name and _matches(name, patterns) and not isinstance(module, KasminaLayer)
    ]
    if not names:
        raise ValueError(f"no submodule of {type(model).__name__} matches {patterns}")
    for name in names:
        inside = [other for other in names if name.startswith(other + ".")]
        inside += [
            n
            for n, m in model.named_modules()
            if isinstance(m, KasminaLayer) and name.startswith(n + ".")
        ]
        if inside:
            raise ValueError(f"{name!r} is nested inside {inside[0]!r}; target one of them")
    total = len(names) * seeds_per_layer
    if state is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        state = GPUStateTensor(total, device, embargo_epochs=embargo_epochs, telemetry=telemetry)
    elif state.num_seeds < total:
        raise ValueError(f"state table has {state.num_seeds} seeds, attach needs {total}")
    # Build every slot before touching the model, so a bad shape leaves it unchanged.
    layers = [
        KasminaLayer(
            model.get_submodule(name),
            seeds_per_layer,
            chunk_size,
            kd_config=kd_config,
            state=state,
            state_offset=i * seeds_per_layer,
            layer_id=name,
            region_id=i,
        )
        for i, name in enumerate(names)
    ]
    for name, layer in zip(names, layers, strict=True):
        parent, attr = _parent(model, name)
        setattr(parent, attr, layer)
    return layers


def kasmina_layers(model: nn.Module) -> list[KasminaLayer]:
    """Every KasminaLayer in ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, KasminaLayer)]


def detach(model: nn.Module) -> list[KasminaLayer]:
    """Put every wrapped module back in place of its KasminaLayer; returns the removed slots."""
    slots = [(name, m) for name, m in model.named_modules() if isinstance(m, KasminaLayer)]
    if any(name == "" for name, _ in slots):
        raise ValueError("the model itself is a KasminaLayer; use its .host")
    for name, layer in slots:
        parent, attr = _parent(model, name)
        setattr(parent, attr, layer.host)
    return [layer for _, layer in slots]


def collect_kd_losses(model: nn.Module) -> torch.Tensor | None:
    """Sum (and clear) the KD losses of every slot and stand-alone seed in ``model``, or None."""
    losses = []
    for module in model.modules():
        if isinstance(module, KasminaLayer):
            loss = module.get_and_clear_kd_losses()
        elif isinstance(module, GradientIsolatedSeed):
            loss = module.get_and_clear_kd_losses()
        else:
            continue
        if loss is not None:
            losses.append(loss)
    return sum_kd_losses(losses)
