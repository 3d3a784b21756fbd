"""``kasmina demo --scenario continual``: new classes arrive after the host has learnt the old.

The data, and what each method sees (the same digits split as the standard demo):

- phase 1: the host (its head already has all ten outputs) trains ``phase1_epochs`` epochs on
  the training digits of the old classes (0-4) only;
- phase 2: the training digits of the new classes (5-9) arrive, and only those: the usual
  class-incremental setting, where the old data is no longer trained on. ``epochs`` epochs.

Three ways to take in the new classes, each scored on the same test split, on the old classes,
the new classes and all of them:

- **Kasmina**: the phase-1 host is frozen (no optimizer, no gradient: its weights stay
  bit-identical, which the run checks) and the controller grows seeds on it through the real
  signed-command path (GERMINATE at the first boundary, ADVANCE through the gates, G5's
  measured benefit, CULL). Only the seeds train, on the phase-2 batches. The controller and
  G5 measure on the validation split of all ten classes (held out, never trained on);
- **fine-tuning**: the same phase-1 host, every weight trained on the same phase-2 batches for
  the same number of steps (Adam, the host's learning rate);
- **static**: an ordinary MLP with the grown model's parameter count, trained from scratch on
  the old and new training digits together (it needs the old data kept) for the same number
  of optimizer steps as phase 1 and phase 2 together, with the same batch size.

The seeds' own forward and backward are extra compute the step count does not show.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import torch

from kasmina.demo.config import NEW_CLASSES, OLD_CLASSES, DemoConfig
from kasmina.demo.data import Digits, accuracy, load_digits_split, steps_per_epoch, with_classes
from kasmina.demo.loop import DemoLoop
from kasmina.demo.models import HostMLP, PlainMLP, matching_widths, plain_parameters, train_plain
from kasmina.demo.report import CONTINUAL_METHODS, ContinualResult

KASMINA, FINE_TUNED, STATIC, PHASE1 = CONTINUAL_METHODS


def split_scores(model: torch.nn.Module, data: Digits) -> dict[str, float]:
    """Test accuracy on the old classes, the new classes and all ten."""
    return {
        "old": accuracy(model, data, with_classes(data.test, data, OLD_CLASSES)),
        "new": accuracy(model, data, with_classes(data.test, data, NEW_CLASSES)),
        "all": accuracy(model, data, data.test),
    }


def run_continual(cfg: DemoConfig, prepared: dict[str, Any]) -> ContinualResult:
    """One seed of the continual scenario (one process)."""
    device = torch.device(cfg.device)
    data = load_digits_split(cfg.seed, device)
    old = replace(data, train=with_classes(data.train, data, OLD_CLASSES))
    kept = [with_classes(old.train, data, (c,))[: cfg.replay] for c in OLD_CLASSES]
    arriving = with_classes(data.train, data, NEW_CLASSES)
    new = replace(data, train=torch.cat([arriving, *kept]).sort().values)

    torch.manual_seed(cfg.seed + 2)
    host = train_plain(HostMLP().to(device), cfg, old, cfg.phase1_epochs, cfg.host_lr, 0, 1)
    phase1 = copy.deepcopy(host.state_dict())
    scores = {PHASE1: split_scores(host, data)}

    grown = HostMLP().to(device)
    grown.load_state_dict(phase1)
    loop = DemoLoop(cfg, prepared, grown, None, new, 0, 1)
    growth = loop.run()
    scores[KASMINA] = split_scores(grown, data)
    unchanged = all(
        torch.equal(value, phase1[f"{name}.{key}"])
        for name, module in zip(("fc1", "fc2", "head"), loop.host_modules(), strict=True)
        for key, value in module.state_dict().items()
    )

    tuned = HostMLP().to(device)
    tuned.load_state_dict(phase1)
    curve = [split_scores(tuned, data)]

    def record(model: torch.nn.Module) -> None:
        curve.append(split_scores(model, data))

    train_plain(tuned, cfg, new, cfg.epochs, cfg.host_lr, 0, 1, on_epoch=record)
    scores[FINE_TUNED] = split_scores(tuned, data)

    phase1_steps = cfg.phase1_epochs * steps_per_epoch(old, cfg)
    phase2_steps = cfg.epochs * steps_per_epoch(new, cfg)
    budget = phase1_steps + phase2_steps
    widths = matching_widths(growth.grown_model_parameters)
    torch.manual_seed(cfg.seed + 3)
    epochs = -(-budget // steps_per_epoch(data, cfg))  # enough epochs; stopped at the budget
    static = PlainMLP(widths).to(device)
    train_plain(static, cfg, data, epochs, cfg.host_lr, 0, 1, max_steps=budget)
    scores[STATIC] = split_scores(static, data)

    return ContinualResult(
        seed=cfg.seed,
        phase1_epochs=cfg.phase1_epochs,
        phase2_epochs=cfg.epochs,
        train_sizes={
            "old": len(old.train),
            "new": len(arriving),
            "replay": len(new.train) - len(arriving),
            "all": len(data.train),
        },
        steps={"phase1": phase1_steps, "phase2": phase2_steps, "static": budget},
        accuracy=scores,
        host_unchanged=unchanged,
        static_widths=list(widths),
        parameters={
            "host": growth.host_parameters,
            "grown": growth.grown_model_parameters,
            "static": plain_parameters(widths),
        },
        fine_tune_curve=curve,
        growth=growth,
    )
