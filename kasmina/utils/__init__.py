"""Domain-free utilities: the parts of Kasmina that know nothing of seeds, kernels or commands.

Telemetry and logs:

- ``telemetry`` -- ``TelemetryReporter`` builds Leyline ``TelemetryPacket``s and fans them out to
  sinks (an in-memory ring buffer, a JSONL file). Every sink is bounded and a failing sink never
  reaches the caller; prepared ``Event``s keep the per-event cost to one dict build.
- ``jsonl_sink`` -- ``JsonlFileSink``: one JSON object per packet per line, in a bounded pair of
  files, checked before each line to still be the file the path names.
- ``orphans`` -- the sinks of an owner collected unclosed (a manager dropped without
  ``close``): queued where the collection lands, taken off their reporter and closed later.
- ``perfstats`` -- ``LatencyStats``, a bounded window of latencies with p50/mean/last, and the
  docs/design.md §8 latency targets the manager reports against.
- ``ratelimit`` -- bounded logging: the level of a repeating kind's ``count``-th line, and text
  an untrusted source wrote cut to a line's length.

Files, keys and signatures:

- ``atomic`` -- atomic files, without torch: written to a temporary name beside the target,
  fsync'd and moved into place with ``os.replace``, so a reader sees the old file or the new one
  and never half of one; a key put in place without overwriting; killed writes' leftovers.
- ``files`` -- ``open_regular_fd``, ``open_regular_file``, ``read_regular_file``,
  ``read_text_file``: local regular files only, for key, config, checkpoint, model, store and
  telemetry files alike. A FIFO, a device or a directory is refused at once with
  ``kasmina.errors.NotARegularFileError`` (never blocked on), and a whole-file read stops at a
  size limit.
- ``state_io`` -- signed state files: ``CheckpointSigner`` writes checkpoints (atomically)
  behind an HMAC'd manifest (SHA-256, size, epoch, run id) and verifies it before any byte
  reaches ``torch.load(weights_only=True)``; ``clone_state`` detaches snapshots from live tensors.
- ``signed_json`` -- JSON for signed documents: one canonical encoding (``canonical_json``) and
  a strict parser (``strict_json_loads``), shared by Urza and checkpoint manifests.
- ``keyring`` -- ``Keyring``: secret keys by ``key_id``, loaded from a mapping, an environment
  variable or a file (never from code), never shown in ``repr`` or logs.
- ``locks`` -- ``lock_exclusive``: an advisory ``flock`` on a lock file, so that one live process
  owns a run's nonce ledger or disk checkpoints; the kernel drops it when its owner dies.

Tensors, autograd and the process:

- ``flags`` -- ``read_flags``: the step's device-side verdicts (0-d bools) read back in one
  transfer per device, where reading them one by one would cost a GPU round trip each.
- ``memory`` -- ``byte_span``, ``ByteRanges``: which tensors' bytes intersect, the one test of
  shared memory (one owner per parameter, one manager per model, an artifact's tied tensors);
  ``span_signature``: whether a range kept is still its tensor's.
- ``autograd_nodes`` -- facts about autograd nodes that the graph walks (isolation checks, the KD
  cut) share, a backward that fills the leaves' gradients without running their
  accumulators, where ``DistributedDataParallel`` may hook them, and the engine's own entry
  for the guarded seed backward (``engine_grad``).
- ``grad_modes`` -- ``training_tensors``: what a safe point makes (a kernel copy, a restored
  optimizer state) is made outside ``torch.inference_mode``, even when the caller is inside it.
- ``modules`` -- a measurement's forwards that leave the user's model and process as they were:
  ``in_eval_mode`` (each module's mode put back), ``hooks_held`` (no hook of the model's runs),
  ``rng_forked`` (the global RNG stream not moved).
- ``conversions`` -- a count of module conversions (``to``, ``half``, ``cuda``) through a seed,
  so that optimizers look for state to move only when it moved.
- ``interrupts`` -- ``interrupts_deferred``: a Ctrl-C that arrives during the commit of an
  all-or-nothing change is delivered when the commit is done, not half-way through it.
- ``process_group`` -- ``process_group_active``: whether this process is one rank of a
  ``torch.distributed`` process group, the one test of it.
- ``checks`` -- the one check of a scalar argument or setting (``check_real``,
  ``check_positive``, ``check_non_negative``, ``check_int``, ``check_positive_int``): no bool,
  NaN or string taken for a number, NumPy numbers stored as Python ones; without torch.

Only the root vocabulary (``kasmina.stages``, ``kasmina.errors``, ``kasmina.leyline``) sits below
this package; everything else may use it. Nothing here imports another Kasmina package. Each name
is imported from its module (``kasmina.utils.keyring.Keyring``; ``Keyring`` and ``generate_key``
are ``kasmina.Keyring`` and ``kasmina.generate_key`` to users): this package re-exports nothing,
so a controller that reads only its keyring does not load torch with ``state_io``.
"""
