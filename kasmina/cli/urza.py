"""``kasmina urza publish|list|verify``: the command line over an Urza store.

Keys come from ``--keys FILE`` (a JSON keyring as ``kasmina keygen --out`` writes it) or the
``KASMINA_HMAC_KEYS`` environment variable. Nothing in a payload is deserialised here: ``verify``
checks the manifest signature, size and SHA-256 only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kasmina.cli.common import PROG, CLIError, one_line, positive_int

if TYPE_CHECKING:  # imported lazily at run time so that --help stays instant
    from torch import nn

    from kasmina.urza.client import UrzaLibraryClient
    from kasmina.utils.keyring import Keyring


def add_urza_parser(sub: argparse._SubParsersAction) -> None:
    urza = sub.add_parser(
        "urza",
        help="publish, list and verify seed artifacts in an Urza store",
        description=(
            "An Urza store is any fsspec URL (a local directory by default) holding signed "
            "torch.export artifacts. HMAC keys come from --keys FILE (a JSON keyring, see "
            "'kasmina keygen') or the KASMINA_HMAC_KEYS environment variable."
        ),
    )
    urza_sub = urza.add_subparsers(dest="urza_command", metavar="<action>", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", required=True, help="store URL or local directory")
        p.add_argument("--keys", help="JSON keyring file (default: $KASMINA_HMAC_KEYS)")

    publish = urza_sub.add_parser(
        "publish",
        help="export a module with torch.export and publish it signed",
        description=(
            "Export a seed module and write its .pt2 payload and signed manifest into the "
            "store. Give either --builtin NAME --dim N (a built-in blueprint) or --factory "
            "MODULE:CALLABLE --input-shape B,D (any importable zero-argument callable "
            "returning an nn.Module; the current directory is importable). Prints the "
            "artifact id on stdout."
        ),
    )
    common(publish)
    what = publish.add_mutually_exclusive_group(required=True)
    what.add_argument("--builtin", help=f"built-in blueprint: {', '.join(_blueprint_names())}")
    what.add_argument("--factory", help="MODULE:CALLABLE returning the nn.Module to export")
    publish.add_argument("--dim", type=positive_int, help="chunk width (with --builtin)")
    publish.add_argument("--hidden", type=positive_int, help="hidden width (with --builtin)")
    publish.add_argument("--input-shape", help="example input shape, e.g. 8,16 (--factory)")
    publish.add_argument("--dtype", default="float32", help="example input dtype (float32)")
    publish.add_argument("--blueprint", help="blueprint name recorded in the manifest")
    publish.add_argument("--artifact-id", help="artifact id (default: <blueprint>-<sha256>)")
    publish.add_argument("--key-id", help="signing key id (default: the keyring's only key)")
    publish.add_argument("--seed", type=int, default=0, help="RNG seed for initial weights (0)")
    publish.set_defaults(func=_cmd_urza_publish)

    listing = urza_sub.add_parser(
        "list",
        help="list the artifacts in a store",
        description=(
            "List artifact ids; when keys are available each manifest's signature is "
            "checked and its blueprint, size and publisher key are shown."
        ),
    )
    common(listing)
    listing.set_defaults(func=_cmd_urza_list)

    verify = urza_sub.add_parser(
        "verify",
        help="verify artifacts (manifest signature, size, SHA-256); non-zero exit on failure",
        description=(
            "Fetch and verify the named artifacts (default: every artifact in the store) "
            "without deserialising any payload. Exit status 1 if any fails."
        ),
    )
    common(verify)
    verify.add_argument("artifact_ids", nargs="*", metavar="ARTIFACT_ID", help="ids to verify")
    verify.set_defaults(func=_cmd_urza_verify)


def _blueprint_names() -> list[str]:
    from kasmina.urza.blueprints import BLUEPRINTS

    return sorted(BLUEPRINTS)


def _optional_keyring(args: argparse.Namespace) -> Keyring | None:
    """``--keys FILE``, else ``$KASMINA_HMAC_KEYS``, else None."""
    from kasmina.utils.keyring import DEFAULT_ENV_VAR, Keyring

    if args.keys:
        return Keyring.from_file(args.keys)
    if os.environ.get(DEFAULT_ENV_VAR, "").strip():
        return Keyring.from_env(DEFAULT_ENV_VAR)
    return None


def _keyring(args: argparse.Namespace) -> Keyring:
    keyring = _optional_keyring(args)
    if keyring is None:
        raise CLIError(
            "no HMAC keys: pass --keys FILE or set KASMINA_HMAC_KEYS (see 'kasmina keygen')"
        )
    return keyring


def _client(args: argparse.Namespace, keyring: Keyring | None) -> UrzaLibraryClient:
    from kasmina.urza.client import UrzaLibraryClient
    from kasmina.utils.keyring import Keyring

    url = args.store
    if "://" not in url and not Path(url).is_dir():
        raise CLIError(f"no Urza store at {url!r} (not a directory)")
    return UrzaLibraryClient(url, keyring if keyring is not None else Keyring({}), retries=0)


def _cmd_urza_publish(args: argparse.Namespace) -> int:
    import torch

    from kasmina.urza.publish import publish_artifact

    keyring = _keyring(args)
    key_id = args.key_id
    if key_id is None:
        if len(keyring) != 1:
            raise CLIError(f"the keyring holds {len(keyring)} keys; choose one with --key-id")
        key_id = keyring.key_ids[0]
    if key_id not in keyring:
        raise CLIError(f"no key {key_id!r} in the keyring")
    dtype = getattr(torch, args.dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CLIError(f"--dtype must be a floating-point torch dtype, got {args.dtype!r}")
    torch.manual_seed(args.seed)
    if args.builtin:
        from kasmina.urza.blueprints import get_blueprint

        blueprint = get_blueprint(args.builtin)
        if args.dim is None:
            raise CLIError("--builtin needs --dim (the chunk width)")
        module = blueprint.build(args.dim, args.hidden)
        shape = _parse_shape(args.input_shape) if args.input_shape else (8, args.dim)
        name = args.blueprint or blueprint.name
    else:
        module = _load_factory(args.factory)
        if not args.input_shape:
            raise CLIError("--factory needs --input-shape (e.g. 8,16)")
        shape = _parse_shape(args.input_shape)
        name = args.blueprint or args.factory.rpartition(":")[2]
    example = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).to(dtype)
    module.eval()
    try:
        manifest = publish_artifact(
            module, [example], args.store, name, keyring, key_id, args.artifact_id
        )
    except (torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError, RuntimeError) as exc:
        raise CLIError(f"torch.export failed: {one_line(exc)[:300]}") from None
    except TypeError as exc:  # the module's forward does not take one example input
        raise CLIError(f"torch.export of {name} failed: {one_line(exc)[:300]}") from None
    print(
        f"published {manifest.artifact_id} ({manifest.blueprint}, {manifest.size} bytes, "
        f"signed by {manifest.key_id!r}) to {args.store}",
        file=sys.stderr,
    )
    print(manifest.artifact_id)
    return 0


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise CLIError(f"bad --input-shape {text!r}: expected comma-separated ints") from None
    if not shape or any(d < 1 for d in shape):
        raise CLIError(f"bad --input-shape {text!r}: dimensions must be positive")
    return shape


def _load_factory(spec: str) -> nn.Module:
    import importlib

    from torch import nn

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CLIError(f"bad --factory {spec!r}: expected MODULE:CALLABLE")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: any error while importing it is theirs
        raise CLIError(f"cannot import {module_name!r}: {one_line(exc)}") from None
    factory = target
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise CLIError(f"{module_name!r} has no attribute {attr!r}")
    try:
        module = factory() if callable(factory) else None
    except Exception as exc:  # the user's callable failed (wrong arguments, its own bug)
        raise CLIError(f"calling {spec} failed: {type(exc).__name__}: {one_line(exc)}") from None
    if not isinstance(module, nn.Module):
        raise CLIError(f"{spec} did not return an nn.Module")
    return module


def _cmd_urza_list(args: argparse.Namespace) -> int:
    from kasmina.errors import ArtifactIntegrityError

    keyring = _optional_keyring(args)
    with _client(args, keyring) as client:
        ids = client.list_artifacts()
        if not ids:
            print(f"no artifacts in {args.store}", file=sys.stderr)
            return 0
        if keyring is None:
            print("(no keys given: manifests not verified)", file=sys.stderr)
        for artifact_id in ids:
            if keyring is None:
                print(artifact_id)
                continue
            try:
                m = client.get_manifest(artifact_id)
            except ArtifactIntegrityError as exc:
                print(f"{artifact_id}  INVALID: {one_line(exc)}")
                continue
            print(f"{artifact_id}  {m.blueprint}  {m.size} bytes  key={m.key_id}")
    return 0


def _cmd_urza_verify(args: argparse.Namespace) -> int:
    from kasmina.errors import ArtifactIntegrityError, ArtifactNotFoundError

    keyring = _keyring(args)
    with _client(args, keyring) as client:
        ids = args.artifact_ids or client.list_artifacts()
        if not ids:
            raise CLIError(f"no artifacts to verify in {args.store}")
        failed = 0
        for artifact_id in ids:
            try:
                client.verify(artifact_id)
            except (ArtifactIntegrityError, ArtifactNotFoundError, ValueError) as exc:
                failed += 1
                print(f"FAILED {artifact_id}: {one_line(exc)}")
            else:
                print(f"ok     {artifact_id}")
    if failed:
        print(
            f"{PROG}: error: {failed} of {len(ids)} artifact(s) failed verification",
            file=sys.stderr,
        )
        return 1
    return 0
