"""What an ``IsolatedOptimizerManager`` records of each optimizer's layout, and how its state is
saved, checked against the live optimizers, loaded and upgraded from an older format.

An ``OptimizerEntry`` is one optimizer with its layout: the seeds promoted into it (the group
and the tensors each added, in order), the groups a user added to the host's (by the
parameters' names in the model), and the group sizes this layout accounts for. ``saved_state``
is ``IsolatedOptimizerManager.state_dict``; ``check_saved_state`` raises unless a saved state
fits the live entries (classes, promotions, added groups, group sizes, shapes, group keys and
state shapes), before ``load_saved_state`` changes anything; ``upgrade_state_dict`` reads a
format-1 state (a promoted seed in a group of its own) as format 2 (docs/design.md §4).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from kasmina.isolation.stepping import group_keys_problem, state_shape_problem
from kasmina.utils.state_io import clone_state

__all__ = [
    "STATE_FORMAT",
    "NamesOf",
    "OptimizerEntry",
    "Promotion",
    "check_saved_state",
    "load_saved_state",
    "saved_state",
    "upgrade_state_dict",
]

# The layout ``state_dict`` records. Format 1 (older checkpoints, still loaded) gave each
# promoted seed a param group of its own and named each group's owner ("groups"); format 2 adds
# a promoted seed to an existing group and records [seed_id, group index, tensor count] per
# promotion, in order ("promoted"), and the model's names of the parameters of each group a user
# added, in order ("added_groups"; absent in older states: none).
STATE_FORMAT = 2

NamesOf = Callable[[list[torch.Tensor]], list[str]]  # the model's names of some parameters


@dataclass
class Promotion:
    """A seed whose parameters joined the host optimizer: the group and the tensors it added."""

    seed_id: str
    group: int
    params: list[torch.Tensor]


@dataclass
class OptimizerEntry:
    """One optimizer and the layout recorded for it."""

    optimizer: torch.optim.Optimizer
    promoted: list[Promotion] = field(default_factory=list)  # the host's, in promotion order
    added: list[list[str]] = field(default_factory=list)  # groups a user added: model names
    restored: bool = False  # its ``defaults`` loaded from a state (an older state has none)
    sizes: list[int] = field(init=False)  # the group sizes this layout accounts for

    def __post_init__(self) -> None:
        self.sizes = [len(group["params"]) for group in self.optimizer.param_groups]

    def params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def shapes(self) -> list[list[int]]:
        return [list(p.shape) for p in self.params()]

    def layout(self) -> list[list[Any]]:
        """The promotions as saved: ``[seed_id, group index, tensor count]`` each, in order."""
        return [[p.seed_id, p.group, len(p.params)] for p in self.promoted]


def saved_state(entries: Mapping[str, OptimizerEntry]) -> dict[str, Any]:
    """Every optimizer's ``state_dict`` plus the layout needed to check it on load (holding
    references to the live state tensors, as torch's does)."""
    return {
        "format": STATE_FORMAT,
        "optimizers": {
            oid: {
                "class": type(entry.optimizer).__name__,
                "promoted": entry.layout(),
                "added_groups": [list(names) for names in entry.added],
                "shapes": entry.shapes(),
                "defaults": dict(entry.optimizer.defaults),  # a group added later takes them
                "state": entry.optimizer.state_dict(),
            }
            for oid, entry in entries.items()
        },
    }


def check_saved_state(
    entries: Mapping[str, OptimizerEntry], state: Mapping[str, Any], names: NamesOf | None
) -> None:
    """Raise ``ValueError`` unless ``state`` matches the layout of ``entries``; with ``names``,
    the host groups added and not yet taken up count, as ``names`` names them."""
    state = upgrade_state_dict(state)
    saved = state.get("optimizers", {})
    if set(saved) != set(entries):
        raise ValueError(
            f"optimizer state is for {sorted(saved)}, live optimizers are {sorted(entries)}"
        )
    for oid, entry in entries.items():
        item = saved[oid]
        if item.get("class") != type(entry.optimizer).__name__:
            raise ValueError(f"optimizer {oid!r}: saved class {item.get('class')!r}")
        promoted = [list(p) for p in item.get("promoted", [])]
        if promoted != entry.layout():
            raise ValueError(f"optimizer {oid!r}: promotions {promoted} != {entry.layout()}")
        added = [list(names) for names in item.get("added_groups", [])]  # absent: older
        groups = entry.optimizer.param_groups[len(entry.sizes) :] if names else []
        live = entry.added + [list(names(list(g["params"]))) for g in groups]
        if added != live:
            raise ValueError(f"optimizer {oid!r}: saved added groups {added} != {live}")
        saved_sizes = [len(g["params"]) for g in item["state"]["param_groups"]]
        live_sizes = [len(g["params"]) for g in entry.optimizer.param_groups]
        if saved_sizes != live_sizes:
            raise ValueError(f"optimizer {oid!r}: group sizes {saved_sizes} != {live_sizes}")
        # Another kernel of as many tensors: its moments loaded, then its step raised.
        shapes = entry.shapes()
        if shapes != item.get("shapes", shapes):  # absent: older
            raise ValueError(f"optimizer {oid!r}: shapes {item['shapes']} != {shapes}")
        for check in (group_keys_problem, state_shape_problem):
            if problem := check(entry.optimizer, item["state"]):
                raise ValueError(f"optimizer {oid!r}: {problem}")


def load_saved_state(entries: Mapping[str, OptimizerEntry], state: Mapping[str, Any]) -> None:
    """Load each entry's saved state from ``state`` (current format, checked by
    ``check_saved_state``): tensors copied, never aliased; the saved ``defaults`` taken for
    the keys the optimizer has."""
    for oid, entry in entries.items():
        item = state["optimizers"][oid]
        defaults = entry.optimizer.defaults
        entry.optimizer.load_state_dict(clone_state(item["state"]))
        saved = item.get("defaults")
        entry.restored = isinstance(saved, Mapping)
        defaults.update({k: v for k, v in clone_state(saved or {}).items() if k in defaults})


def upgrade_state_dict(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """``state`` in the current format (``ValueError`` for one this version cannot read).

    Format 1 kept each promoted seed in a param group of its own. Its groups are merged into
    the first in order: the saved state's parameter numbering (across groups, in order) stays
    valid, and the promoted seeds take the first group's hyperparameters, as they do now."""
    version = state.get("format")
    if version == STATE_FORMAT:
        return state
    if version != 1:
        raise ValueError(f"unsupported optimizer state format {version!r}")
    optimizers: dict[str, Any] = {}
    try:
        for oid, item in (state.get("optimizers") or {}).items():
            tags = list(item.get("groups", []))
            saved = item["state"]
            groups = list(saved["param_groups"])
            if len(tags) != len(groups) or not groups:
                raise ValueError(f"optimizer {oid!r}: {len(tags)} group tags, {len(groups)} groups")
            first = dict(groups[0])
            first["params"] = [index for g in groups for index in g["params"]]
            if all("param_names" in g for g in groups):
                first["param_names"] = [name for g in groups for name in g["param_names"]]
            else:
                first.pop("param_names", None)
            promoted = [[tags[i], 0, len(groups[i]["params"])] for i in range(1, len(tags))]
            merged = {"state": saved["state"], "param_groups": [first]}
            optimizers[oid] = {"class": item.get("class"), "promoted": promoted, "state": merged}
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed optimizer state of format 1: {exc!r}") from None
    return {"format": STATE_FORMAT, "optimizers": optimizers}
