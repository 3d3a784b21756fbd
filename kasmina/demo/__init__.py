"""``kasmina demo``: a complete morphogenetic training run that shows every part working.

A narrow MLP trains on scikit-learn's bundled digits with DORMANT seed slots. A controller
watches validation accuracy and, on a plateau, sends signed ``AdaptationCommand`` bytes through
the real handler: seeds germinate from a local Urza store, train in isolation, distil from a
teacher, blend in and fossilize, or are culled. An adversary sends forged, replayed, tampered and
stale commands, which are refused. The run ends with a report, a telemetry file and a plot, and
runs the same way on two gloo ranks (``--nproc 2`` or torchrun). The grown host is scored on the
test split beside the never-grown host and a static MLP of the grown size; ``--repeats N`` gives
mean ± sd over rng seeds, and ``--scenario continual`` adds new classes to a trained host.

The modules, in their one-way order (nothing imports ``kasmina.demo`` itself)::

    run -> continual -> loop -> {controller, report, models, data} -> config

- ``config`` -- ``DemoConfig`` and the demo's constants (slots, seed plan, key ids, KD settings).
- ``data`` -- the digits split, per-rank batches, accuracy and loss.
- ``models`` -- the host MLP, the teacher, the host's slots, plain training.
- ``controller`` -- the plateau controller (a stand-in for a real one) and the adversary.
- ``loop`` -- ``DemoLoop``: one rank's epochs, steps and epoch-boundary commands.
- ``continual`` -- the continual scenario: Kasmina, fine-tuning and a static net on new classes.
- ``report`` -- ``DemoResult``, ``ContinualResult``, the reports, plots and ``--repeats`` summary.
- ``run`` -- keys and store preparation, the output directory, ranks, torchrun and repeats.

The demo sits above the manager in the import order and may use every library package; only
the CLI imports it. It may print and draw; the library only logs.
"""
