"""The ``kasmina`` command line: ``demo``, ``keygen``, ``bench`` and
``urza publish|list|verify|resign``.

- ``main`` -- the entry point (``kasmina`` script and ``python -m kasmina``): builds the parser,
  runs a subcommand, and turns a ``CLIError`` or a Kasmina error into one line on stderr and a
  non-zero exit status instead of a traceback.
- ``urza`` -- the artifact-store subcommands: publish a blueprint or a module factory as an
  artifact signed with an Ed25519 publisher key, list a store, verify every artifact's hash and
  signature with publisher public keys, re-sign artifacts signed with the retired HMAC scheme.
- ``common`` -- what the subcommands share: the program name, ``CLIError``, argument parsers.

The CLI is the top of the import order: it may use every package, and nothing imports it. It is
the one place (with the demo) that prints; library code logs.
"""
