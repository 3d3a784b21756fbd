"""What the demo shows at the end: a plain-text report and a PNG plot (matplotlib, Agg).

Kept apart from the training loop so that the loop stays readable and the report can be
rebuilt from a saved ``DemoResult`` (``result.json`` in the output directory).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kasmina.stages import SeedStage
from kasmina.utils.atomic import atomic_write


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_acc: float  # what the controller sees
    alphas: dict[str, float] = field(default_factory=dict)
    stages: dict[str, str] = field(default_factory=dict)
    test_acc: float = 0.0  # recorded for the report; never shown to the controller
    test_groups: dict[str, float] = field(default_factory=dict)  # continual: old / new classes


@dataclass
class DemoResult:
    """Everything the demo measured; ``to_json``-able and compared across runs for determinism."""

    seed: int
    world_size: int
    teacher_test_acc: float
    baseline_test_acc: float  # the same host, same epochs, no seeds
    acc_before_growth: float  # the grown host's test accuracy at the first germination
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
    grown_parameters: int  # fossilized (ACTIVE) seeds
    host_parameters: int
    wall_s: float = 0.0
    blending_parameters: int = 0  # seeds still grafting or stabilizing at the end
    first_germination_epoch: int | None = None
    # The static same-size network: an ordinary MLP with the grown model's parameter count.
    static_test_acc: float = 0.0
    static_widths: list[int] = field(default_factory=list)
    static_parameters: int = 0
    baseline_curve: list[float] = field(default_factory=list)  # test accuracy per epoch
    static_curve: list[float] = field(default_factory=list)
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)  # timings, this machine

    @property
    def grown_model_parameters(self) -> int:
        """Host plus every seed that shapes its output at the end."""
        return self.host_parameters + self.grown_parameters + self.blending_parameters

    def metrics(self) -> dict[str, float]:
        """The test accuracies a ``--repeats`` summary averages, by model."""
        return {
            "teacher (not a competitor)": self.teacher_test_acc,
            "never-grown host": self.baseline_test_acc,
            "grown host, before growth": self.acc_before_growth,
            "grown host": self.acc_after_growth,
            "static same-size net": self.static_test_acc,
        }

    def gains(self) -> dict[str, float]:
        return {
            "grown - never-grown": self.acc_after_growth - self.baseline_test_acc,
            "grown - static same-size": self.acc_after_growth - self.static_test_acc,
        }

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
        for timing in TIMING_FIELDS:
            data.pop(timing, None)
        return data


# Fields that are measured time, not results: left out of fingerprints (determinism checks).
TIMING_FIELDS = ("wall_s", "targets")


def _pct(x: float) -> str:
    return f"{100.0 * x:5.1f}%"


def _points(x: float) -> str:
    return f"{100.0 * x:+.1f} points"


def _row(label: str, acc: float, width: int = 72) -> str:
    return f"  {label:<{width}}{_pct(acc)}"


def format_report(result: DemoResult) -> str:
    """The end-of-run table (plain text, fits 100 columns)."""
    lines = _accuracy_lines(result)
    lines += _timeline_lines(result)
    lines += _decision_lines(result)
    lines += _command_lines(result)
    lines += _counter_lines(result)
    lines += format_targets(result.targets)
    return "\n".join(lines)


def _accuracy_lines(r: DemoResult) -> list[str]:
    """The run's header and every model's test accuracy, with the grown host's margins."""
    germinated = r.first_germination_epoch
    before = (
        f"grown host at the first germination (epoch {germinated} boundary)"
        if germinated is not None
        else "grown host (it never germinated a seed)"
    )
    widths = "x".join(str(w) for w in r.static_widths)
    return [
        "Kasmina demo: morphogenetic training on the digits dataset",
        f"  ranks: {r.world_size}   rng seed: {r.seed}   wall time: {r.wall_s:.1f} s",
        "",
        "Test accuracy: every model on the same held-out test split; the hosts and the static",
        f"net train {len(r.epochs)} epoch{'s' * (len(r.epochs) != 1)} on the same batches "
        "with Adam",
        _row(
            "teacher: 128x128 MLP, "
            + ("distilled into the head's seeds" if r.kd_steps else "no head seed grew to learn")
            + " (not a competitor)",
            r.teacher_test_acc,
        ),
        _row(f"never-grown host ({r.host_parameters:,} parameters)", r.baseline_test_acc),
        _row(before, r.acc_before_growth),
        _row(
            f"grown host ({r.grown_model_parameters:,} parameters with its seeds)",
            r.acc_after_growth,
        ),
        _row(
            f"static {widths} MLP of the grown size ({r.static_parameters:,} parameters)",
            r.static_test_acc,
        ),
        f"  grown minus never-grown: {_points(r.acc_after_growth - r.baseline_test_acc)};  "
        f"grown minus static: {_points(r.acc_after_growth - r.static_test_acc)}",
        f"  seed parameters: fossilized {r.grown_parameters:,}, still blending "
        f"{r.blending_parameters:,}. The never-grown host and the static net",
        "  train without the teacher. The controller sees the validation split only.",
    ]


def _timeline_lines(result: DemoResult) -> list[str]:
    """Each seed's artifacts and the stages it entered, by epoch."""
    lines = ["", "Seed timelines (epoch boundary: stage entered)"]
    for seed_id, timeline in result.timelines.items():
        artifacts = ", ".join(result.artifacts.get(seed_id, [])) or "-"
        lines.append(f"  {seed_id:<8} {artifacts}")
        steps = "  ".join(f"{epoch}:{stage}" for epoch, stage in timeline) or "(never germinated)"
        lines.extend(_wrap(steps, indent="      "))
    return lines


def _decision_lines(result: DemoResult) -> list[str]:
    """What the controller decided, and when."""
    lines = ["", "Controller decisions"]
    lines += [f"  {epoch:>3}  {seed:<8} {why}" for epoch, seed, why in result.decisions] or [
        "  (none: no plateau)"
    ]
    return lines


def _command_lines(result: DemoResult) -> list[str]:
    """The signed commands' outcomes, and the adversarial ones' refusals."""
    cmd = result.commands
    rejected = {k.split(":", 1)[1]: v for k, v in cmd.items() if k.startswith("rejected:")}
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(rejected.items())) or "none"
    lines = [
        "",
        "Commands (signed AdaptationCommand bytes through the LeylineAdaptationHandler)",
        f"  accepted {cmd.get('accepted', 0)} (executed {cmd.get('executed', 0)}, "
        f"refused by a gate or the seed's state {cmd.get('failed', 0)}), "
        f"rejected {cmd.get('rejected', 0)}: {reasons}",
    ]
    for kind, outcomes in result.adversarial.items():
        refused = sum(1 for ok in outcomes if not ok)
        lines.append(f"  {kind:<9} sent {len(outcomes)}, refused {refused}")
    return lines


def _counter_lines(result: DemoResult) -> list[str]:
    """The kernel cache's, isolation's, KD's and the ranks' counters."""
    cache, iso = result.cache, result.isolation
    return [
        "",
        f"Kernel cache: hits {cache.get('hits', 0)}, misses {cache.get('misses', 0)}, "
        f"evictions {cache.get('evictions', 0)}",
        f"Gradient isolation: {iso.get('seed_steps', 0)} seed-steps verified (leak flags + "
        f"autograd-graph walk), {iso.get('violations', 0)} violations, "
        f"{iso.get('breaker_trips', 0)} breaker trips",
        f"Knowledge distillation: {result.kd_steps} steps with a KD loss",
        f"Ranks: {result.distributed.get('syncs', 0)} epoch syncs ("
        + (
            "commands broadcast, state checksums compared"
            if result.world_size > 1
            else "one rank: nothing to broadcast or compare"
        )
        + f"), {result.distributed.get('divergences', 0)} divergences",
    ]


def format_targets(targets: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The manager's performance targets as ``validate_performance_targets`` timed them."""
    if not targets:
        return []
    threads = next(iter(targets.values())).get("threads", 1)
    lines = [
        "",
        "Manager performance targets (validate_performance_targets, timed here on "
        f"{threads} CPU thread{'s' * (threads != 1)}; the GPU kernel rows are make bench-gpu's)",
    ]
    for name, t in targets.items():
        verdict = "met" if t["met"] else "MISSED"
        if t["measured"] < 0:  # a paired difference of timings, as it came out
            verdict += " (below this machine's noise)"
        lines.append(
            f"  {name:<32} {t['measured']:>10.2f} {t['unit']:<5} target <= {t['target']:g}  "
            f"{verdict}"
        )
    return lines


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
    ax_acc.plot(epochs, [r.test_acc for r in result.epochs], marker=".", label="grown host")
    if result.baseline_curve:
        ax_acc.plot(epochs, result.baseline_curve, color="black", label="never-grown host")
    if result.static_curve:
        widths = "x".join(str(w) for w in result.static_widths)
        label = f"static {widths} net (grown size)"
        ax_acc.plot(epochs, result.static_curve, color="tab:orange", label=label)
    ax_acc.axhline(
        result.teacher_test_acc, linestyle="--", color="grey", label="teacher (not a competitor)"
    )
    for epoch, _, why in result.decisions:
        if why.startswith("germinate"):
            ax_acc.axvline(epoch + 0.5, color="green", alpha=0.3)
    ax_acc.set_ylabel("test accuracy")
    ax_acc.legend(loc="lower right", fontsize=8)
    ax_acc.set_title(
        "Kasmina demo: test accuracy (green: germinations), seed alpha, lifecycle stage"
    )
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
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    """``fig`` as the PNG ``path``, whole or not at all (a temporary file renamed over it): a
    save that failed part way (a full disk) left an empty or truncated demo.png."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=100), private=False)
    finally:
        plt.close(fig)
    return path


# ------------------------------------------------------------------------ continual scenario

# Kasmina, fine-tuning, the static net, and the reference every forgetting is measured from.
CONTINUAL_METHODS = (
    "Kasmina: frozen host + grown seeds",
    "fine-tuned host",
    "static same-size net, from scratch",
    "host after phase 1 (old classes)",
)


@dataclass
class ContinualResult:
    """One seed of ``--scenario continual`` (see ``kasmina.demo.continual``)."""

    seed: int
    phase1_epochs: int
    phase2_epochs: int
    train_sizes: dict[str, int]  # training digits: old classes, new classes, all
    steps: dict[str, int]  # optimizer steps: phase 1, phase 2, the static net's
    accuracy: dict[str, dict[str, float]]  # method -> test accuracy on old / new / all
    host_unchanged: bool  # the frozen host's weights bit-identical after phase 2
    static_widths: list[int]
    parameters: dict[str, int]  # host, grown (host + seeds), static
    fine_tune_curve: list[dict[str, float]]  # old / new / all after each phase-2 epoch
    growth: DemoResult  # the Kasmina run of phase 2: decisions, timelines, commands
    wall_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ContinualResult:
        values = dict(data)
        values["growth"] = DemoResult.from_json(values["growth"])
        return cls(**values)

    def fingerprint(self) -> dict[str, Any]:
        data = self.to_json()
        data.pop("wall_s")
        data["growth"] = self.growth.fingerprint()
        return data

    def forgetting(self, method: str) -> float:
        """Old-class test accuracy lost since phase 1 (positive: forgotten)."""
        phase1 = self.accuracy[CONTINUAL_METHODS[3]]["old"]
        return phase1 - self.accuracy[method]["old"]

    def metrics(self) -> dict[str, float]:
        return {
            f"{method}: {group}": self.accuracy[method][group]
            for method in CONTINUAL_METHODS
            for group in ("old", "new", "all")
        }

    def gains(self) -> dict[str, float]:
        kasmina, tuned, static, _ = CONTINUAL_METHODS
        acc = self.accuracy
        return {
            "forgetting (old-class drop), Kasmina": self.forgetting(kasmina),
            "forgetting (old-class drop), fine-tuned": self.forgetting(tuned),
            "Kasmina - fine-tuned, all classes": acc[kasmina]["all"] - acc[tuned]["all"],
            "Kasmina - static, all classes": acc[kasmina]["all"] - acc[static]["all"],
        }


def format_continual(result: ContinualResult) -> str:
    r, g = result, result.growth
    kasmina, tuned, static, phase1 = CONTINUAL_METHODS
    widths = "x".join(str(w) for w in r.static_widths)
    sizes, steps = r.train_sizes, r.steps
    replay = sizes.get("replay", 0)
    phase2 = (
        f"the {sizes['new']} training digits of classes 5-9 and {replay} kept digits of 0-4"
        if replay
        else f"only the {sizes['new']} training digits of classes 5-9"
    )
    lines = [
        "Kasmina demo, continual scenario: digits 0-4 first, digits 5-9 later",
        f"  rng seed: {r.seed}   wall time: {r.wall_s:.1f} s",
        "",
        "What each method sees",
        f"  phase 1: the host trains {r.phase1_epochs} epochs on the {sizes['old']} training "
        f"digits of classes 0-4 ({steps['phase1']} steps)",
        f"  phase 2: {phase2}, {r.phase2_epochs} epochs ({steps['phase2']} steps), for",
        "    Kasmina (host frozen: no optimizer, no gradient; only the grown seeds train) and",
        "    fine-tuning (every host weight trains); the same batches for both",
        f"  static: a {widths} MLP ({r.parameters['static']:,} parameters; the grown model has "
        f"{r.parameters['grown']:,}), from scratch",
        f"    on all {sizes['all']} training digits at once for {steps['static']} steps "
        "(phase 1 + phase 2)",
        "  The controller and gate G5 measure on the validation split of all ten classes.",
        "",
        f"Test accuracy (same test split)      {'old 0-4':>8} {'new 5-9':>8} {'all':>8}",
    ]
    for method in (phase1, kasmina, tuned, static):
        acc = r.accuracy[method]
        lines.append(
            f"  {method:<36}{_pct(acc['old']):>8} {_pct(acc['new']):>8} {_pct(acc['all']):>8}"
        )
    lines += [
        f"  forgetting (old-class drop since phase 1): Kasmina {_points(r.forgetting(kasmina))}, "
        f"fine-tuned {_points(r.forgetting(tuned))}",
        f"  host weights after phase 2: "
        f"{'bit-identical to phase 1' if r.host_unchanged else 'CHANGED'}",
        "",
        "Controller decisions (phase 2)",
    ]
    lines += [f"  {epoch:>3}  {seed:<8} {why}" for epoch, seed, why in g.decisions] or ["  (none)"]
    cmd, iso = g.commands, g.isolation
    lines += [
        "",
        f"Commands: accepted {cmd.get('accepted', 0)} (executed {cmd.get('executed', 0)}), "
        f"rejected {cmd.get('rejected', 0)} (the adversary's)",
        f"Gradient isolation: {iso.get('seed_steps', 0)} seed-steps verified, "
        f"{iso.get('violations', 0)} violations",
    ]
    return "\n".join(lines)


def plot_continual(result: ContinualResult, path: Path) -> Path:
    """Old- and new-class test accuracy through phase 2, Kasmina against fine-tuning; the
    static net's final accuracies as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kasmina, tuned, static, _ = CONTINUAL_METHODS
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    titles = {"old": "old classes 0-4", "new": "new classes 5-9"}
    records = result.growth.epochs
    for ax, (group, title) in zip(axes, titles.items(), strict=True):
        grown = [r.test_groups.get(group, 0.0) for r in records]
        ax.plot([r.epoch for r in records], grown, marker=".", label=kasmina)
        tuned_curve = [c[group] for c in result.fine_tune_curve]
        ax.plot(range(len(tuned_curve)), tuned_curve, label=tuned)
        ax.axhline(result.accuracy[static][group], linestyle=":", color="black", label=static)
        ax.set_title(f"test accuracy, {title}")
        ax.set_xlabel("phase-2 epoch")
    axes[0].set_ylabel("test accuracy")
    axes[0].set_ylim(-0.02, 1.02)
    axes[1].legend(loc="lower right", fontsize=8)
    return _save(fig, path)


# --------------------------------------------------------------------------------- --repeats


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summarize(results: Sequence[DemoResult | ContinualResult]) -> dict[str, Any]:
    """Per metric and per paired gain: every run's value, the mean and the sample sd."""

    def table(rows: Sequence[Mapping[str, float]]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name in rows[0]:
            values = [row[name] for row in rows]
            mean, sd = mean_sd(values)
            out[name] = {"mean": mean, "sd": sd, "values": values}
        return out

    return {
        "seeds": [r.seed for r in results],
        "accuracy": table([r.metrics() for r in results]),
        "paired": table([r.gains() for r in results]),
    }


def format_repeats(scenario: str, summary: Mapping[str, Any], wall_s: float) -> str:
    seeds = summary["seeds"]
    n = len(seeds)
    lines = [
        f"Kasmina demo, {scenario} scenario: {n} runs, rng seeds {seeds[0]}..{seeds[-1]} "
        f"(wall time {wall_s:.0f} s)",
        "",
        f"Test accuracy, mean ± sd over the {n} runs (sample sd, in points)",
    ]
    if scenario == "continual":
        lines += _continual_table(summary["accuracy"])
    else:
        width = max(len(name) for name in summary["accuracy"]) + 2
        for name, s in summary["accuracy"].items():
            values = " ".join(f"{100 * v:5.1f}" for v in s["values"])
            lines.append(
                f"  {name:<{width}}{100 * s['mean']:5.1f}% ± {100 * s['sd']:4.1f}   [{values}]"
            )
    lines += ["", "Paired differences (the same rng seed on both sides), mean ± sd, in points"]
    width = max(len(name) for name in summary["paired"]) + 2
    for name, s in summary["paired"].items():
        values = " ".join(f"{100 * v:+5.1f}" for v in s["values"])
        lines.append(
            f"  {name:<{width}}{100 * s['mean']:+5.1f} ± {100 * s['sd']:4.1f}   [{values}]"
        )
    return "\n".join(lines)


def _continual_table(accuracy: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Methods down, old / new / all classes across, each cell mean ± sd."""
    groups = ("old", "new", "all")
    lines = [f"  {'':<36}" + "".join(f"{name:>15}" for name in ("old 0-4", "new 5-9", "all"))]
    for method in (CONTINUAL_METHODS[3], *CONTINUAL_METHODS[:3]):
        cells = []
        for group in groups:
            s = accuracy[f"{method}: {group}"]
            cells.append(f"{100 * s['mean']:6.1f}% ± {100 * s['sd']:4.1f}")
        lines.append(f"  {method:<36}" + "".join(f"{c:>15}" for c in cells))
    return lines
