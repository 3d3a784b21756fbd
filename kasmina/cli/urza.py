"""``kasmina urza publish|list|verify|resign``: the command line over an Urza store.

Artifacts are signed with an Ed25519 publisher key: ``publish`` and ``resign`` take the private
key file (``--key FILE``, as ``kasmina keygen --publisher --out FILE`` writes it, or
``$KASMINA_PUBLISHER_KEY_FILE``). ``list`` and ``verify`` need only public keys: ``--publishers
FILE`` (a JSON object of key id -> public key, what ``keygen --publisher`` prints), or ``--key
FILE`` for a publisher checking its own store. HMAC keyrings (``--keys``) no longer sign or
verify artifacts; ``resign`` reads one (``--hmac-keys``) only to check an old manifest before
re-signing it. Nothing in a payload is deserialised here: ``verify`` checks the manifest
signature, size and SHA-256 only.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from kasmina.cli.common import (
    PROG,
    CLIError,
    bounded_int,
    one_line,
    positive_int,
    redacted,
    say,
    shown_store,
)
from kasmina.cli.publish_checks import (
    check_builtin_size,
    check_example_size,
    check_module_size,
    check_payload_size,
    load_factory,
    parse_shape,
)
from kasmina.cli.resign import legacy_keyring, old_keys_advice

if TYPE_CHECKING:  # imported lazily at run time so that --help stays instant
    import torch
    from torch import nn

    from kasmina.urza.artifact import TensorSpec
    from kasmina.urza.client import UrzaLibraryClient
    from kasmina.urza.keys import PublisherKey, TrustedPublishers
    from kasmina.utils.keyring import Keyring

# Names the publisher's private key file when --key is not given.
PUBLISHER_KEY_ENV = "KASMINA_PUBLISHER_KEY_FILE"
# --seed of publish: what torch.manual_seed takes, non-negative.
MAX_SEED = 2**63 - 1
# The names of kasmina.urza.blueprints.BLUEPRINTS, sorted, repeated here for --help: importing
# that module imports torch, and the parser is built for every command, --help included.
# tests/cli/test_cli_inputs.py checks that the two agree.
BUILTIN_BLUEPRINTS = ("affine-shift", "residual-mlp", "residual-mlp-narrow")


def add_urza_parser(sub: argparse._SubParsersAction) -> None:
    urza = sub.add_parser(
        "urza",
        help="publish, list, verify and re-sign seed artifacts in an Urza store",
        description=(
            "An Urza store is any fsspec URL (a local directory by default) holding "
            "torch.export artifacts signed with Ed25519. Publishing takes a publisher's private "
            "key (--key FILE, see 'kasmina keygen --publisher'); listing and verifying need only "
            "public keys (--publishers FILE)."
        ),
    )
    urza_sub = urza.add_subparsers(dest="urza_command", metavar="<action>", required=True)

    def store(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", required=True, help="store URL or local directory")
        # The retired HMAC option, kept only to answer it with what to use instead.
        p.add_argument("--keys", help=argparse.SUPPRESS)

    def signer(p: argparse.ArgumentParser) -> None:
        p.add_argument("--key", help=f"publisher private key file (default: ${PUBLISHER_KEY_ENV})")
        p.add_argument(
            "--key-id", help="key id, for a plain PEM or raw key file that does not name one"
        )

    def verifier(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--publishers",
            help="JSON file of trusted publisher public keys {key_id: public_key}",
        )
        p.add_argument("--key", help="or: a publisher private key file (its public half is used)")
        p.add_argument("--key-id", help=argparse.SUPPRESS)

    publish = urza_sub.add_parser(
        "publish",
        help="export a module with torch.export and publish it signed",
        description=(
            "Export a seed module and write its .pt2 payload and Ed25519-signed manifest into "
            "the store. Give either --builtin NAME --dim N (a built-in blueprint) or --factory "
            "MODULE:CALLABLE --input-shape B,D (any importable zero-argument callable "
            "returning an nn.Module; the current directory is importable). The example input "
            "must have the rank of the slot's activations: a --builtin one is 8,DIM unless "
            "--input-shape says otherwise (B,L,DIM for a sequence model's [B, L, H] slot). "
            "Prints the artifact id on stdout."
        ),
    )
    store(publish)
    signer(publish)
    what = publish.add_mutually_exclusive_group(required=True)
    what.add_argument("--builtin", help=f"built-in blueprint: {', '.join(BUILTIN_BLUEPRINTS)}")
    what.add_argument("--factory", help="MODULE:CALLABLE returning the nn.Module to export")
    publish.add_argument("--dim", type=positive_int, help="chunk width (with --builtin)")
    publish.add_argument("--hidden", type=positive_int, help="hidden width (with --builtin)")
    publish.add_argument(
        "--input-shape",
        help="example input shape, e.g. 8,16; its rank must be the slot's activations' (needed "
        "with --factory; with --builtin 8,DIM by default, e.g. 8,16,DIM for [B, L, H] slots)",
    )
    publish.add_argument(
        "--dtype",
        default="float32",
        help="the kernel's dtype: a --builtin is built in it, a --factory module must run in "
        "it (float32)",
    )
    publish.add_argument("--blueprint", help="blueprint name recorded in the manifest")
    publish.add_argument(
        "--artifact-id",
        help="artifact id (default: <blueprint>-<first 16 hex digits of the payload's SHA-256>)",
    )
    publish.add_argument(
        "--seed",
        type=bounded_int(0, MAX_SEED),
        default=0,
        help="RNG seed for initial weights, 0 to 2**63-1 (0)",
    )
    publish.set_defaults(func=_cmd_urza_publish)

    listing = urza_sub.add_parser(
        "list",
        help="list the artifacts in a store",
        description=(
            "List artifact ids; when public keys are given each manifest's signature is "
            "checked and its blueprint, size and publisher key are shown."
        ),
    )
    store(listing)
    verifier(listing)
    listing.set_defaults(func=_cmd_urza_list)

    verify = urza_sub.add_parser(
        "verify",
        help="verify artifacts (manifest signature, size, SHA-256); non-zero exit on failure",
        description=(
            "Fetch and verify the named artifacts (default: every artifact in the store) "
            "without deserialising any payload. Exit status 1 if any fails."
        ),
    )
    store(verify)
    verifier(verify)
    verify.add_argument("artifact_ids", nargs="*", metavar="ARTIFACT_ID", help="ids to verify")
    verify.set_defaults(func=_cmd_urza_verify)

    resign = urza_sub.add_parser(
        "resign",
        help="re-sign artifacts with a publisher key (HMAC migration, publisher key rotation)",
        description=(
            "Sign manifests again with the publisher key (--key), replacing them: manifests "
            "signed with HMAC (manifest version 1), each old signature checked with the old "
            "keyring (--hmac-keys; never a command key, which every trainer holds), or manifests "
            "signed by a publisher key being retired, checked with its public key "
            "(--previous-publishers). Each payload is checked against its manifest first; the "
            "ids stay. Artifacts already signed by this key are left alone. Exit status 1 if "
            "any fails."
        ),
    )
    store(resign)
    signer(resign)
    resign.add_argument(
        "--hmac-keys", help="JSON keyring the old manifests were signed with (not the command keys)"
    )
    resign.add_argument(
        "--previous-publishers",
        help="JSON file of the retiring publisher public keys {key_id: public_key} (rotation)",
    )
    resign.add_argument(
        "--command-keys",
        help="the trainers' command keyring (JSON), whose keys are refused as old keys "
        "(needed unless $KASMINA_HMAC_KEYS holds it)",
    )
    resign.add_argument(
        "artifact_ids", nargs="*", metavar="ARTIFACT_ID", help="ids to re-sign (default: all)"
    )
    resign.set_defaults(func=_cmd_urza_resign)


def _refuse_hmac_keys(args: argparse.Namespace) -> None:
    if args.keys:
        raise CLIError(
            "--keys (an HMAC keyring) no longer signs or verifies artifacts: publish with "
            "--key PUBLISHER_KEY_FILE ('kasmina keygen --publisher --out FILE'), verify with "
            "--publishers FILE; migrate old manifests with 'kasmina urza resign'"
        )


def _publisher_key(args: argparse.Namespace) -> PublisherKey | None:
    """``--key FILE``, else ``$KASMINA_PUBLISHER_KEY_FILE``, else None."""
    from kasmina.urza.keys import PublisherKey

    path = args.key or os.environ.get(PUBLISHER_KEY_ENV, "").strip()
    if not path:
        return None
    return PublisherKey.from_file(path, args.key_id)


def _signing_key(args: argparse.Namespace) -> PublisherKey:
    _refuse_hmac_keys(args)
    key = _publisher_key(args)
    if key is None:
        raise CLIError(
            f"no publisher key: pass --key FILE or set {PUBLISHER_KEY_ENV} "
            "(create one with 'kasmina keygen --publisher --out FILE')"
        )
    return key


def _optional_publishers(args: argparse.Namespace) -> TrustedPublishers | None:
    """``--publishers FILE`` and/or the public half of ``--key FILE``; None without either."""
    from kasmina.urza.keys import TrustedPublishers

    _refuse_hmac_keys(args)
    publishers = None
    if args.publishers:
        publishers = TrustedPublishers.from_file(args.publishers)
    key = _publisher_key(args) if args.key else None
    if key is not None:
        own = key.trusted_publishers()
        publishers = own if publishers is None else publishers.merged(own)
    return publishers


def _check_store(args: argparse.Namespace, *, writes: bool, may_create: bool = False) -> None:
    """Refuse a ``--store`` no command can use: an empty one (not the current directory), a
    URL naming no location, a local one that is not a directory (missing too, unless
    ``may_create``), and for commands that write, a ``memory://`` store, which ends with
    this process, or an ``http(s)://`` one, which Urza only reads. Remote stores answer
    later. Each message shows the URL without its credentials and query (``shown_store``)."""
    url = args.store
    shown = shown_store(url)
    _, sep, rest = url.partition("://")
    if not url.strip() or (sep and not rest.strip()):
        raise CLIError(f"--store {shown!r} is empty: give a local directory or a store URL")
    if writes and any(part.strip().startswith("memory:") for part in url.split("::")):
        raise CLIError(
            f"--store {shown!r} is a memory:// store, which lives only as long as this process: "
            f"what 'urza {args.urza_command}' wrote there would be gone when it exits; use a "
            "directory or a persistent store URL"
        )
    schemes = ("http://", "https://")
    if writes and any(part.strip().lower().startswith(schemes) for part in url.split("::")):
        raise CLIError(
            f"--store {shown!r} is an HTTP store, which Urza only reads: "
            f"'urza {args.urza_command}' writes to the directory or object store it serves "
            "(give that instead)"
        )
    from fsspec.implementations.local import LocalFileSystem

    from kasmina.urza.artifact import open_store

    try:
        fs, root = open_store(url)
    except Exception as exc:  # a missing fsspec backend, a malformed URL
        raise CLIError(f"cannot open the store {shown!r}: {redacted(one_line(exc), url)}") from None
    local = isinstance(fs, LocalFileSystem)
    if local and not fs.isdir(root) and (fs.exists(root) or not may_create):
        raise CLIError(f"no Urza store at {shown!r} (not a directory)")


def _client(
    args: argparse.Namespace, publishers: TrustedPublishers | None, *, checked: bool = False
) -> UrzaLibraryClient:
    """A client of ``--store``, checked first (``_check_store``) unless the command has
    ``checked`` it already."""
    from kasmina.urza.client import UrzaLibraryClient
    from kasmina.urza.keys import TrustedPublishers

    if not checked:
        _check_store(args, writes=False)
    trusted = publishers if publishers is not None else TrustedPublishers()
    return UrzaLibraryClient(args.store, trusted, retries=0)


def _cmd_urza_publish(args: argparse.Namespace) -> int:
    import torch

    from kasmina.urza.publish import publish_payload

    _check_publish_arguments(args)
    _check_store(args, writes=True, may_create=True)
    publisher = _signing_key(args)
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CLIError(f"--dtype must be a floating-point torch dtype, got {args.dtype!r}")
    module, shape, name = _publish_module(args, dtype)
    example = _run_example(args, module, shape, dtype, name)
    check_module_size(module, name)
    payload, input_spec = _export(module, example, name)
    check_payload_size(len(payload), name)
    # The store's errors (a file in the way, an id taken) are its own: main reports them.
    manifest = publish_payload(
        payload, args.store, name, publisher, args.artifact_id, input_spec=input_spec
    )
    print(
        f"published {manifest.artifact_id} ({manifest.blueprint}, {manifest.size} bytes, "
        f"signed by {manifest.key_id!r}) to {shown_store(args.store)}",
        file=sys.stderr,
    )
    print(manifest.artifact_id)
    return 0


def _check_publish_arguments(args: argparse.Namespace) -> None:
    """Refuse an option of ``publish`` given empty, a ``--builtin``'s width given with
    ``--factory``, and an ``--artifact-id`` that is no id."""
    from kasmina.urza.artifact import validate_artifact_id

    if args.factory is not None:  # its module has its own widths: the flag would be ignored
        for flag, value in (("--dim", args.dim), ("--hidden", args.hidden)):
            if value is not None:
                raise CLIError(
                    f"{flag} is a --builtin blueprint's width; a --factory module has its own"
                )
    if args.blueprint == "":  # given empty: never replaced by the default name
        raise CLIError("--blueprint is empty: give the blueprint name to record, or omit it")
    if args.input_shape == "":  # given empty ("$SHAPE" unset): never replaced by (8, DIM)
        raise CLIError(
            "--input-shape is empty: give the example input's shape (e.g. 8,16), or omit it for "
            "--builtin's 8,DIM"
        )
    if args.artifact_id is not None:  # given, even empty: never replaced by a generated one
        try:
            validate_artifact_id(args.artifact_id)
        except ValueError as exc:
            raise CLIError(f"--artifact-id: {one_line(exc)}") from None


def _publish_module(
    args: argparse.Namespace, dtype: torch.dtype
) -> tuple[nn.Module, tuple[int, ...], str]:
    """The module to publish (a ``--builtin`` blueprint's, built from ``--seed``, or the
    ``--factory``'s), its example input's shape and the blueprint name to record."""
    import torch

    torch.manual_seed(args.seed)
    if args.builtin:
        from kasmina.urza.blueprints import get_blueprint

        blueprint = get_blueprint(args.builtin)
        if args.dim is None:
            raise CLIError("--builtin needs --dim (the chunk width)")
        if args.hidden is not None and not blueprint.has_hidden:
            raise CLIError(f"--hidden: {blueprint.name} has no hidden width")
        check_builtin_size(blueprint, args, dtype)
        shape = (8, args.dim) if args.input_shape is None else parse_shape(args.input_shape)
        name = args.blueprint or blueprint.name
        check_example_size(shape, dtype)
        torch.manual_seed(args.seed)  # as if the meta-device probe had not run
        try:
            module = blueprint.build(args.dim, args.hidden)
        except (RuntimeError, MemoryError) as exc:  # too large for this machine after all
            raise CLIError(f"cannot build {name}: {one_line(exc)}") from None
    else:
        module = load_factory(args.factory)  # the user's errors: one line there
        if args.input_shape is None:
            raise CLIError("--factory needs --input-shape (e.g. 8,16)")
        shape = parse_shape(args.input_shape)
        name = args.blueprint or args.factory.rpartition(":")[2]
        check_example_size(shape, dtype)
    return module, shape, name


def _run_example(
    args: argparse.Namespace,
    module: nn.Module,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    name: str,
) -> torch.Tensor:
    """The example input (from ``--seed``), once ``module`` ran on it: an artifact signed as
    taking this input must run on it (the export did not check)."""
    import torch

    try:
        generator = torch.Generator().manual_seed(args.seed)
        example = torch.randn(shape, generator=generator).to(dtype)
    except (RuntimeError, MemoryError) as exc:
        raise CLIError(f"cannot make the example input: {one_line(exc)}") from None
    from kasmina.seeds.side_effects import kept_buffers

    # It runs in the module's own mode, the one it is exported in (a train-mode factory's batch
    # norm and dropout stay live in the seed), its buffers (batch-norm statistics) put back.
    try:
        if args.builtin:
            module.to(dtype)  # its parameters in the dtype its input is: the kernel runs in it
        with torch.no_grad(), kept_buffers(module):
            module(example)
    except (Exception, MemoryError, SystemExit) as exc:  # the user's forward: one line
        raise CLIError(
            f"{name} does not run on a {args.dtype} input of shape {list(shape)}: "
            f"{one_line(exc)[:300]}"
        ) from None
    return example


def _export(
    module: nn.Module, example: torch.Tensor, name: str
) -> tuple[bytes, tuple[TensorSpec, ...]]:
    """``module`` exported on ``example``: its payload and input spec; a failure is one line."""
    # Imported before the export, not looked up in its except clause: a Ctrl-C inside the
    # export's first import of torch._dynamo left it half initialised, and the lookup then
    # raised AttributeError over the KeyboardInterrupt (a traceback instead of exit 130).
    from torch._dynamo.exc import Unsupported, UserError

    from kasmina.urza.publish import export_payload

    try:
        with _quiet_torch_logs():
            return export_payload(module, [example])
    except (Unsupported, UserError, RuntimeError, MemoryError) as exc:
        raise CLIError(f"torch.export failed: {one_line(exc)[:300]}") from None
    except (Exception, SystemExit) as exc:  # the user's forward, traced: any error is one line
        # (a TypeError where it takes no one example input, an attribute the eager run did
        # not reach, an exit(): a silent exit 0 would read as a publish that succeeded)
        raise CLIError(
            f"torch.export of {name} failed: {type(exc).__name__}: {one_line(exc)[:300]}"
        ) from None


class _Discard:
    """A text stream that keeps nothing (``os.devnull`` without a file descriptor)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        return None


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Silence torch's loggers, and its prints to stderr, while exporting (restored after): a
    failed export logs its own traceback (fake_tensor, dynamo) and prints the partial graph of a
    data-dependent branch before raising, and the CLI reports it in one line."""
    torch_loggers = [logging.getLogger("torch")] + [
        logger
        for name, logger in logging.root.manager.loggerDict.items()
        if name.startswith("torch.") and isinstance(logger, logging.Logger) and logger.level
    ]
    levels = [logger.level for logger in torch_loggers]
    for logger in torch_loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        with contextlib.redirect_stderr(_Discard()):  # type: ignore[arg-type]
            yield
    finally:
        for logger, level in zip(torch_loggers, levels, strict=True):
            logger.setLevel(level)


def _cmd_urza_list(args: argparse.Namespace) -> int:
    from kasmina.errors import ArtifactIntegrityError, ArtifactNotFoundError, UrzaUnavailableError

    publishers = _optional_publishers(args)
    with _client(args, publishers) as client:
        ids = client.list_artifacts()
        if not ids:
            print(f"no artifacts in {shown_store(args.store)}", file=sys.stderr)
            return 0
        if publishers is None:
            print("(no public keys given: manifests not verified)", file=sys.stderr)
        for artifact_id in ids:
            if publishers is None:
                print(artifact_id)
                continue
            try:
                m = client.get_manifest(artifact_id)
            except (ArtifactIntegrityError, ArtifactNotFoundError, UrzaUnavailableError) as exc:
                why = redacted(one_line(exc), args.store)
                say(f"{artifact_id}  INVALID: {why}")  # unreadable too: go on
                continue
            say(f"{artifact_id}  {m.blueprint}  {m.size} bytes  key={m.key_id}")
    return 0


def _cmd_urza_verify(args: argparse.Namespace) -> int:
    publishers = _optional_publishers(args)
    if publishers is None:
        raise CLIError(
            "no publisher public keys: pass --publishers FILE (what 'kasmina keygen "
            "--publisher' prints) or --key PUBLISHER_KEY_FILE"
        )
    with _client(args, publishers) as client:
        ids = args.artifact_ids or client.list_artifacts()
        if not ids:
            raise CLIError(f"no artifacts to verify in {shown_store(args.store)}")
        failed = 0
        for artifact_id in ids:
            problem = _verify_problem(client, artifact_id, args.store)
            failed += problem is not None  # an I/O error on its file too: the others go on
            ok = problem is None
            say(f"ok     {artifact_id}" if ok else f"FAILED {artifact_id}: {problem}")
    return _summary(failed, len(ids), "failed verification")


def _verify_problem(client: UrzaLibraryClient, artifact_id: str, store: str) -> str | None:
    """Why the artifact does not verify under the client's publishers (redacted for the store
    URL ``store``), or None."""
    from kasmina.errors import ArtifactIntegrityError, ArtifactNotFoundError, UrzaUnavailableError

    try:
        client.verify(artifact_id)
    except (ArtifactIntegrityError, ArtifactNotFoundError, UrzaUnavailableError, ValueError) as e:
        return redacted(one_line(e), store)
    return None


def _cmd_urza_resign(args: argparse.Namespace) -> int:
    from kasmina.errors import ArtifactIntegrityError
    from kasmina.urza.keys import TrustedPublishers
    from kasmina.urza.publish import resign_artifact

    _check_store(args, writes=True)  # before the keys: a store no key can help is named first
    publisher = _signing_key(args)
    old: Keyring | TrustedPublishers | None = None  # none needed where --key signed them all
    if args.previous_publishers:
        if args.hmac_keys:
            raise CLIError("pass --hmac-keys (a migration) or --previous-publishers, not both")
        old = TrustedPublishers.from_file(args.previous_publishers)
    elif args.hmac_keys:
        old = legacy_keyring(args)
    with _client(args, publisher.trusted_publishers(), checked=True) as client:
        ids = args.artifact_ids or client.list_artifacts()
        if not ids:
            raise CLIError(f"no artifacts to re-sign in {shown_store(args.store)}")
        if old is None:  # a second run, an idempotent CI step: nothing to do, or say what
            problems = {i: p for i in ids if (p := _verify_problem(client, i, args.store))}
            for artifact_id in ids:
                why = problems.get(artifact_id)
                ok = f"ok     {artifact_id} (already signed by {publisher.key_id!r})"
                say(ok if why is None else f"FAILED {artifact_id}: {why}")
            if not problems:
                return 0
            advice = old_keys_advice(problems.values())  # which old keys would help, if any
            if advice is not None:
                raise CLIError(advice)
            return _summary(len(problems), len(ids), "could not be re-signed")
    failed = 0
    for artifact_id in ids:
        try:
            manifest = resign_artifact(args.store, artifact_id, publisher, old)
        except (ArtifactIntegrityError, OSError, ValueError) as exc:
            failed += 1
            say(f"FAILED {artifact_id}: {redacted(one_line(exc), args.store)}")
        except Exception as exc:  # a store's own write error (fsspec backends raise their own)
            failed += 1
            why = redacted(f"{type(exc).__name__}: {one_line(exc)}", args.store)
            say(f"FAILED {artifact_id}: {why}")
        else:
            print(f"ok     {artifact_id} (signed by {manifest.key_id!r})")
    return _summary(failed, len(ids), "could not be re-signed")


def _summary(failed: int, total: int, what: str) -> int:
    if failed:
        print(f"{PROG}: error: {failed} of {total} artifact(s) {what}", file=sys.stderr)
        return 1
    return 0
