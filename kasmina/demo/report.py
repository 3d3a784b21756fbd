"""What the demo shows at the end: a plain-text report and a PNG plot (matplotlib, Agg).

Kept apart from the training loop so that the loop stays readable and the report can be
rebuilt from a saved ``DemoResult`` (``result.json`` in the output directory).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kasmina.stages import SeedStage


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_acc: float
    alphas: dict[str, float] = field(default_factory=dict)
    stages: dict[str, str] = field(default_factory=dict)


@dataclass
class DemoResult:
    """Everything the demo measured; ``to_json``-able and compared across runs for determinism."""

    seed: int
    world_size: int
    teacher_test_acc: float
    baseline_test_acc: float  # the same host, same epochs, no seeds
    acc_before_growth: float  # test accuracy when the first seed was germinated
    acc_after_growth: float
    epochs: list[EpochRecord]
    timelines: dict[str, list[tuple[int, str]]]  # seed -> [(epoch boundary, stage entered)]
    artifacts: dict[str, list[str]]  # seed -> artifact ids it was grown from, in order
    decisions: list[tuple[int, str, str]]  # controller's (epoch, seed, reason), ADVANCEs aside
    commands: dict[str, int]  # handler stats: accepted, executed, rejected:<reason>, ...
    adversarial: dict[str, list[bool]]  # forged / replayed / tampered / stale -> results
    cache: dict[str, Any]
    isolation: dict[str, int]
    kd_steps: int
    distributed: dict[str, int]  # epoch syncs and divergent ranks seen by the coordinator
    grown_parameters: int
    host_parameters: int
    wall_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DemoResult:
        values = dict(data)
        values["epochs"] = [EpochRecord(**r) for r in values["epochs"]]
        values["timelines"] = {k: [tuple(e) for e in v] for k, v in values["timelines"].items()}
        values["decisions"] = [tuple(d) for d in values["decisions"]]
        return cls(**values)

    def fingerprint(self) -> dict[str, Any]:
        """The parts a fixed RNG seed must reproduce exactly (everything but the wall time)."""
        data = self.to_json()
        data.pop("wall_s")
        return data


def _pct(x: float) -> str:
    return f"{100.0 * x:5.1f}%"


def format_report(result: DemoResult) -> str:
    """The end-of-run table (plain text, fits 100 columns)."""
    lines = [
        "Kasmina demo: morphogenetic training on the digits dataset",
        f"  ranks: {result.world_size}   rng seed: {result.seed}   wall time: "
        f"{result.wall_s:.1f} s",
        "",
        "Accuracy (held-out test set)",
        f"  teacher (distilled into the head's seeds)   {_pct(result.teacher_test_acc)}",
        f"  host when the first seed germinated         {_pct(result.acc_before_growth)}",
        f"  host after growth                           {_pct(result.acc_after_growth)}",
        f"  same host, same epochs, never grown         {_pct(result.baseline_test_acc)}",
        f"  parameters: host {result.host_parameters:,}, fossilized seeds "
        f"{result.grown_parameters:,}",
        "",
        "Seed timelines (epoch boundary: stage entered)",
    ]
    for seed_id, timeline in result.timelines.items():
        artifacts = ", ".join(result.artifacts.get(seed_id, [])) or "-"
        lines.append(f"  {seed_id:<8} {artifacts}")
        steps = "  ".join(f"{epoch}:{stage}" for epoch, stage in timeline) or "(never germinated)"
        lines.extend(_wrap(steps, indent="      "))
    lines += ["", "Controller decisions"]
    lines += [f"  {epoch:>3}  {seed:<8} {why}" for epoch, seed, why in result.decisions] or [
        "  (none: no plateau)"
    ]
    cmd = result.commands
    rejected = {k.split(":", 1)[1]: v for k, v in cmd.items() if k.startswith("rejected:")}
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(rejected.items())) or "none"
    lines += [
        "",
        "Commands (signed AdaptationCommand bytes through the LeylineAdaptationHandler)",
        f"  accepted {cmd.get('accepted', 0)} (executed {cmd.get('executed', 0)}, "
        f"refused by a gate or the seed's state {cmd.get('failed', 0)}), "
        f"rejected {cmd.get('rejected', 0)}: {reasons}",
    ]
    for kind, outcomes in result.adversarial.items():
        refused = sum(1 for ok in outcomes if not ok)
        lines.append(f"  {kind:<9} sent {len(outcomes)}, refused {refused}")
    cache, iso = result.cache, result.isolation
    lines += [
        "",
        f"Kernel cache: hits {cache.get('hits', 0)}, misses {cache.get('misses', 0)}, "
        f"evictions {cache.get('evictions', 0)}",
        f"Gradient isolation: {iso.get('seed_steps', 0)} seed-steps verified (leak flags + "
        f"autograd-graph walk), {iso.get('violations', 0)} violations, "
        f"{iso.get('breaker_trips', 0)} breaker trips",
        f"Knowledge distillation: {result.kd_steps} steps with a KD loss",
        f"Ranks: {result.distributed.get('syncs', 0)} epoch syncs (commands broadcast, state "
        f"checksums compared), {result.distributed.get('divergences', 0)} divergences",
    ]
    return "\n".join(lines)


def _wrap(text: str, indent: str, width: int = 96) -> list[str]:
    out, line = [], indent
    for word in text.split("  "):
        if len(line) + len(word) + 2 > width and line.strip():
            out.append(line.rstrip())
            line = indent
        line += word + "  "
    if line.strip():
        out.append(line.rstrip())
    return out


def plot(result: DemoResult, path: Path) -> Path:
    """Accuracy, alpha and stage per seed over epochs, in one PNG.

    Accuracy and alpha are measured at the end of epoch ``e`` and drawn at ``x = e``. Commands
    and lifecycle ticks act at the boundary after epoch ``e`` -- the epoch the report's timeline
    prints -- which is drawn at ``x = e + 0.5`` (the green germination lines); the stage a seed
    trained in during epoch ``e`` spans ``e - 0.5 .. e + 0.5``, so each stage step sits on the
    boundary the timeline names.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r.epoch for r in result.epochs]
    seeds = [sid for sid, timeline in result.timelines.items() if timeline]
    fig, (ax_acc, ax_alpha, ax_stage) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    ax_acc.plot(epochs, [r.val_acc for r in result.epochs], marker=".", label="host (validation)")
    ax_acc.axhline(result.teacher_test_acc, linestyle="--", color="grey", label="teacher (test)")
    ax_acc.axhline(
        result.baseline_test_acc, linestyle=":", color="black", label="never-grown host (test)"
    )
    for epoch, _, why in result.decisions:
        if why.startswith("germinate"):
            ax_acc.axvline(epoch + 0.5, color="green", alpha=0.3)
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend(loc="lower right")
    ax_acc.set_title("Kasmina demo: accuracy (green: germinations), seed alpha, lifecycle stage")
    for seed_id in seeds:
        ax_alpha.plot(epochs, [r.alphas.get(seed_id, 0.0) for r in result.epochs], label=seed_id)
        ax_stage.step(
            epochs,
            [SeedStage[r.stages.get(seed_id, "DORMANT")].value for r in result.epochs],
            where="mid",
            label=seed_id,
        )
    ax_alpha.set_ylabel("alpha")
    ax_alpha.set_ylim(-0.05, 1.05)
    if seeds:
        ax_alpha.legend(loc="upper left")
        ax_stage.legend(loc="upper left")
    ax_stage.set_yticks([s.value for s in SeedStage], [s.name for s in SeedStage], fontsize=7)
    ax_stage.set_xlabel("epoch (stage changes at the boundary after epoch e, drawn at e + 0.5)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def stage_counts(records: Sequence[EpochRecord]) -> Mapping[str, int]:
    """How many epochs any seed spent in each stage (for summaries and tests)."""
    counts: dict[str, int] = {}
    for record in records:
        for stage in record.stages.values():
            counts[stage] = counts.get(stage, 0) + 1
    return counts
