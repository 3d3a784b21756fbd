"""The ``kasmina`` command line: ``demo``, ``keygen``, ``bench``, ``runs list|prune`` and
``urza publish|list|verify|resign``.

- ``main`` -- the entry point (``kasmina`` script and ``python -m kasmina``): builds the parser,
  runs a subcommand, and turns a ``CLIError`` or a Kasmina error into one line on stderr and a
  non-zero exit status instead of a traceback.
- ``urza`` -- the artifact-store subcommands: publish a blueprint or a module factory as an
  artifact signed with an Ed25519 publisher key, list a store, verify every artifact's hash and
  signature with publisher public keys, re-sign artifacts signed with the retired HMAC scheme.
- ``publish_checks`` -- what ``urza publish`` checks before it builds, exports or signs
  anything: the example input, a built-in module's size, the user's ``--factory``, the size of
  what it would sign.
- ``resign`` -- ``urza resign``'s old keys: the HMAC keyring version 1 manifests were signed
  with, and which old keys a run without them must be given.
- ``runs`` -- ``kasmina runs list|prune``: the run directories earlier trainers left under a
  runs root.
- ``common`` -- what the subcommands share: the program name, ``CLIError``, argument parsers.

The CLI is the top of the import order: it may use every package, and nothing imports it. It is
the one place (with the demo) that prints; library code logs.
"""
