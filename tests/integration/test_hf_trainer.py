"""transformers' ``Trainer`` driving the manager's step (README, "With `transformers.Trainer`").

The README's recipe, run for real on a tiny Llama: ``training_step`` runs ``manager.backward``,
the optimizer is a ``ManagerOptimizer`` and the scheduler a ``ManagerScheduler`` over the host
optimizer, ``manager.end_epoch`` runs from a callback. Checked: a run resumed from Trainer's own
checkpoint ends bit for bit where the uninterrupted run ends (the checkpoint holds the manager's
optimizer moments), and a ROLLBACK applied in a step leaves the tracked scheduler at the
manager's clock (Trainer steps its scheduler after every optimizer step).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kasmina.control.auth import sign_command
from kasmina.control.builders import make_rollback_command, make_seed_command
from kasmina.kd.config import KDConfig
from kasmina.manager.framework import ManagerOptimizer, ManagerScheduler
from kasmina.manager.manager import KasminaKernelManager
from kasmina.urza.blueprints import ResidualMLP
from kasmina.urza.publish import publish_artifact
from kasmina.utils.keyring import Keyring, generate_key
from tests.integration.models import tiny_llama
from tests.manager.helpers import PUBLISHER, make_config, record_activations, run_command

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

KEYS = Keyring({"ctl": generate_key()})


class KasminaTrainer(transformers.Trainer):
    """The README's ``training_step``: the manager runs the backward."""

    def __init__(self, *args: Any, manager: KasminaKernelManager, **kwargs: Any) -> None:
        self.manager = manager
        super().__init__(*args, **kwargs)

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        model.train()
        inputs = self._prepare_inputs(inputs)
        loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        k = n = self.current_gradient_accumulation_steps
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            n = 1  # the loss is normalised by the window's token count already
        kd = self.manager.collect_kd_losses()  # this micro-batch's mean: / k whatever n is
        self.manager.backward(loss / n, kd_loss=None if kd is None else kd / k)
        return loss.detach() / n

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        return grad_norm


class Epochs(transformers.TrainerCallback):
    """``manager.end_epoch`` at each epoch's end; ``commands``: bytes to send after a step."""

    def __init__(self, manager: KasminaKernelManager, commands: dict[int, bytes]) -> None:
        self.manager, self.commands, self.epoch = manager, commands, 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        raw = self.commands.pop(state.global_step, None)
        if raw is not None:
            assert self.manager.handle_adaptation_command(raw)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.manager.end_epoch(self.epoch)
        self.epoch += 1


def _data(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = (torch.arange(6) + int(torch.randint(0, 8, (1,), generator=g))) % 16
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def _trainer(
    tmp_path: Path, name: str, commands: dict[int, bytes] | None = None, **args: Any
) -> tuple[KasminaTrainer, KasminaKernelManager, ManagerScheduler]:
    store = tmp_path / "urza"
    store.mkdir(exist_ok=True)
    config = make_config(tmp_path / name, store, run_id=name, checkpoint_mode="memory")
    manager = KasminaKernelManager(config, keyring=KEYS)
    model = tiny_llama()
    manager.attach(model, ["mlp.down_proj"], 2, 16, host_lr=1e-2, seed_lr=1e-2)
    optimizer = ManagerOptimizer(manager)
    host = manager.optimizers.optimizer("host")
    schedule = torch.optim.lr_scheduler.LambdaLR(host, lambda s: 1.0 / (1 + 0.1 * s))
    manager.track("scheduler", schedule)
    scheduler = ManagerScheduler(schedule, optimizer)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / name / "out"), use_cpu=True, max_grad_norm=0,
        per_device_train_batch_size=4, logging_steps=1, report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, seed=0, save_strategy="steps", **args,
    )  # fmt: skip
    trainer = KasminaTrainer(
        model=model, args=args, train_dataset=_data(20), optimizers=(optimizer, scheduler),
        callbacks=[Epochs(manager, commands or {})], manager=manager,
    )  # fmt: skip
    return trainer, manager, scheduler


def _weights(trainer: KasminaTrainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items() if v.is_floating_point()}


def test_a_run_resumed_from_trainers_checkpoint_ends_where_the_whole_run_ends(
    tmp_path: Path,
) -> None:
    """Two epochs of 20 samples at batch 4, two batches a step (the last window of an epoch
    holds one: ``current_gradient_accumulation_steps``), checkpointed at step 3 by Trainer; a
    new manager and model resumed from that checkpoint end bit for bit where the whole run
    did. (With a stand-in optimizer whose ``state_dict`` was its own, the host's Adam moments
    restarted from nothing and the weights ended up to 0.1 apart.)"""
    run = dict(num_train_epochs=2, gradient_accumulation_steps=2, save_steps=3)
    whole, manager, _ = _trainer(tmp_path, "whole", **run)
    whole.train()
    expected = _weights(whole)
    host = manager.optimizers.optimizer("host")
    steps = int(next(iter(host.state.values()))["step"])
    assert whole.state.global_step == steps == 6
    manager.close()
    resumed, manager, _ = _trainer(tmp_path, "resumed", **run)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "out" / "checkpoint-3"))
    got = _weights(resumed)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    host = manager.optimizers.optimizer("host")
    assert int(next(iter(host.state.values()))["step"]) == steps
    manager.close()


class Distilling(KasminaTrainer):
    """The recipe, with teacher logits for each micro-batch (a fixed table over the tokens)."""

    teacher = torch.randn(128, 128, generator=torch.Generator().manual_seed(3)) * 3

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        self.manager.set_teacher_logits(self.teacher[inputs["input_ids"]])
        return super().training_step(model, inputs, num_items_in_batch)


class FirstGradients(transformers.TrainerCallback):
    """The gradients of ``params`` as the first optimizer step finds them."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params, self.grads = params, None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.grads is None:
            self.grads = [p.grad.clone() for p in self.params]


def _distilling_step(tmp_path: Path, artifact: str, batch: int, steps: int) -> list[torch.Tensor]:
    """One optimizer step of the recipe over 8 samples, ``steps`` micro-batches of ``batch``, a
    seed of the second block's ``down_proj`` distilling through the head: the first step's
    gradients of the seed and of a host layer."""
    name = f"kd{steps}"
    kd = KDConfig(temperature=2.0, alpha=1.0)
    config = make_config(
        tmp_path / name, tmp_path / "urza", run_id=name, checkpoint_mode="memory",
        kd_enabled=True, kd=kd,
    )  # fmt: skip
    manager = KasminaKernelManager(config, keyring=KEYS)
    model = tiny_llama()
    manager.attach(model, ["layers.1.mlp.down_proj"], 2, 16, host_lr=1e-2, seed_lr=1e-2)
    record_activations(model, torch.zeros(4, 6, dtype=torch.long))
    seed_id = "model.layers.1.mlp.down_proj[0]"
    germinate = make_seed_command("germinate", seed_id, artifact, {})
    assert run_command(manager, sign_command(germinate, KEYS, "ctl").SerializeToString())
    manager.set_kd_head(model.lm_head.weight)
    seed = manager.seed(seed_id)
    watch = FirstGradients([*seed.seed_parameters(), model.model.layers[0].mlp.down_proj.weight])
    optimizer = ManagerOptimizer(manager)
    schedule = torch.optim.lr_scheduler.LambdaLR(manager.optimizers.optimizer("host"), lambda s: 1)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / name / "out"), use_cpu=True, max_grad_norm=0, max_steps=1,
        per_device_train_batch_size=batch, gradient_accumulation_steps=steps, report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, seed=0, save_strategy="no",
    )  # fmt: skip
    trainer = Distilling(
        model=model, args=args, train_dataset=_data(8), callbacks=[watch], manager=manager,
        optimizers=(optimizer, ManagerScheduler(schedule, optimizer)),
    )  # fmt: skip
    trainer.train()
    assert trainer.model_accepts_loss_kwargs  # the loss normalised by the window's tokens
    manager.close()
    assert watch.grads is not None
    return watch.grads


def test_the_recipes_kd_gradient_does_not_grow_with_the_accumulation_steps(tmp_path: Path) -> None:
    """A causal LM normalises its loss by the window's token count (``num_items_in_batch``), so
    the recipe divides it by 1; it divided the seeds' KD losses, each its own micro-batch's
    mean, by that 1 too, and the seed's KD gradient grew with ``gradient_accumulation_steps``
    (twice the one-batch gradient at 2). One batch of 8 and two of 4 now give the same
    first-step gradients, the distilling seed's and the host's."""
    store = tmp_path / "urza"
    store.mkdir()
    torch.manual_seed(1)
    mlp = ResidualMLP(16, 16)
    artifact = publish_artifact(mlp, [torch.randn(4, 6, 16)], str(store), "mlp", PUBLISHER)
    whole = _distilling_step(tmp_path, artifact.artifact_id, 8, 1)
    accumulated = _distilling_step(tmp_path, artifact.artifact_id, 4, 2)
    for a, b in zip(whole, accumulated, strict=True):
        torch.testing.assert_close(b, a)


def test_a_rollback_in_a_step_leaves_the_scheduler_at_the_managers_clock(tmp_path: Path) -> None:
    """A ROLLBACK to epoch 0's checkpoint, sent after step 8 and applied at step 9's safe
    point, puts the tracked scheduler back with the weights; Trainer then steps the scheduler
    as after every step, and ``ManagerScheduler`` skips that one step, so the scheduler ends
    where the manager's clock does (it ran one ahead for the rest of the run)."""
    rollback = sign_command(make_rollback_command(0), KEYS, "ctl").SerializeToString()
    trainer, manager, scheduler = _trainer(
        tmp_path, "rollback", commands={8: rollback}, num_train_epochs=3, save_steps=100
    )
    trainer.train()
    assert any(entry[1] == "rollback" and entry[2] for entry in manager.command_log)
    assert trainer.state.global_step == 15  # Trainer's own count goes on
    assert manager.state.global_step == 15 - 9 + 5  # back to epoch 0's end, then on
    assert scheduler.scheduler.last_epoch == manager.state.global_step
    manager.close()


def test_manager_optimizer_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    """A closure (the backward is the manager's), a state saved with other optimizers (here
    with a seed optimizer the manager does not hold), a scheduler that steps on a metric (the
    framework would step it without one) and a manager without a host optimizer are refused,
    nothing loaded."""
    trainer, manager, _ = _trainer(tmp_path, "refusals")
    optimizer = trainer.optimizer
    with pytest.raises(ValueError, match="no closure"):
        optimizer.step(lambda: torch.zeros(()))
    saved = optimizer.state_dict()
    foreign = {
        **saved,
        "optimizers": {**saved["optimizers"], "seed:x": saved["optimizers"]["host"]},
    }
    with pytest.raises(ValueError, match="optimizer state is for"):
        optimizer.load_state_dict(foreign)
    assert optimizer.param_groups is manager.optimizers.optimizer("host").param_groups
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(manager.optimizers.optimizer("host"))
    with pytest.raises(TypeError, match="steps on a metric"):
        ManagerScheduler(plateau, optimizer)  # Trainer would call its step() without one
    manager.close()
    config = make_config(tmp_path / "hostless", tmp_path / "urza", run_id="hostless")
    with KasminaKernelManager(config, keyring=KEYS) as manager:
        manager.attach(tiny_llama(), ["mlp.down_proj"], 2, 16, host_lr=None)
        with pytest.raises(ValueError, match="has none"):
            ManagerOptimizer(manager)
