"""Control: how a controller's signed commands reach a running model (docs/design.md §5).

- ``auth`` -- HMAC-SHA256 over the deterministic serialisation of an ``AdaptationCommand`` with
  its signature cleared, compared in constant time (``sign_command``, ``CommandVerifier``). The
  verifier checks signature, then freshness, then that the nonce is unseen; a nonce is recorded
  only after the signature passes and forgotten once it leaves the freshness window, so the
  ledger stays bounded under any load.
- ``ledger`` -- ``NonceLedger``: the accepted nonces on disk in the run's directory, so a
  restarted trainer refuses what an earlier process of the run accepted.
- ``commands`` -- semantic validation: a verified ``AdaptationCommand`` becomes a typed
  ``KasminaCommand`` or a rejection reason; ``CommandExecutor`` is the ``Protocol`` the executor
  implements, so nothing here imports the manager.
- ``builders`` -- ``make_*_command`` build commands for controllers, each checked by that
  validation where it is built.
- ``handler`` -- ``LeylineAdaptationHandler``: parse -> signature -> freshness -> nonce ->
  validation -> execute. Any failure is ``False`` with a reason counter and a telemetry event;
  no exception escapes, whatever the bytes; rejections are logged at a bounded rate.
- ``distributed`` -- multi-rank runs: ``DistributedCoordinator`` verifies a command on the rank
  that receives it and applies it on every rank or none at the epoch sync, then checksums the
  replicas and repairs a divergent rank from the majority.
- ``relay`` -- what crosses between ranks at that sync and how a rank judges it: the handler's
  and applier's protocols (``RelayHandler``, ``CommandApplier``), the byte framing of relayed
  commands, the per-rank verdict and the one refusal reason.
- ``replica`` -- what ranks compare and repair: the ``ReplicaState`` protocol, bitwise CRC-32
  checksums (``state_checksum``, ``nested_checksum``) and ``TensorReplica``.
- ``processes`` -- what the coordinator stands on: the parallel wrappers Kasmina refuses (FSDP,
  tensor parallelism, ``DataParallel``), rank/device helpers, ``spawn``, ``init_from_env`` and
  ``shutdown_process_group``.

Imports ``kasmina.utils`` and the root vocabulary; never seeds, isolation, urza or the manager.
Each name is imported from its module: this package re-exports nothing, so a controller that
signs commands (``auth``, ``commands``, ``builders``, ``kasmina.utils.keyring``) never loads
torch, which only ``distributed``, ``replica`` and ``processes`` need.
"""
