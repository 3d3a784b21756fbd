"""The ``kasmina`` command line: demo, Urza store tools, key generation, benchmarks.

User mistakes (a missing file, a bad store, a malformed key) end with one ``kasmina: error:``
line on stderr and exit status 1; argparse usage errors exit 2. Subcommands import their
dependencies lazily so that ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from kasmina.errors import KasminaError

PROG = "kasmina"


class CLIError(Exception):
    """A user mistake, reported as one line."""


# ------------------------------------------------------------------------------------ keygen


def _cmd_keygen(args: argparse.Namespace) -> int:
    from kasmina.auth import Keyring, generate_key

    key_id = args.key_id
    if not key_id or any(c in key_id for c in ",: \t\n"):
        raise CLIError(f"invalid key id {key_id!r}: use a non-empty id without ',', ':' or spaces")
    key = generate_key(args.bytes)
    keys: dict[str, bytes] = {}
    if args.out is not None:
        out = Path(args.out)
        if out.exists():
            if not args.append:
                raise CLIError(f"{out} exists; pass --append to add a key or choose another file")
            existing = Keyring.from_file(out)
            if key_id in existing and not args.force:
                raise CLIError(f"{out} already holds key {key_id!r}; pass --force to replace it")
            keys = {k: existing.get(k) or b"" for k in existing.key_ids}
        keys[key_id] = key
        _write_private(out, json.dumps({k: v.hex() for k, v in keys.items()}, indent=2) + "\n")
        print(f"wrote key {key_id!r} to {out} ({len(keys)} key(s), mode 0600)", file=sys.stderr)
    else:
        keys[key_id] = key
    exported = ",".join(f"{k}:{v.hex()}" for k, v in keys.items())
    print(f"export KASMINA_HMAC_KEYS={exported}")
    return 0


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ------------------------------------------------------------------------------------- bench


def _repo_root() -> Path:
    """The source checkout holding perf/ (benchmarks are not installed with the package)."""
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (base / "perf").is_dir():
            return base
    raise CLIError("no perf/ directory found: run 'kasmina bench' from a Kasmina source checkout")


def _cmd_bench(args: argparse.Namespace) -> int:
    root = _repo_root()
    if args.gpu:
        script = root / "perf" / "bench_gpu.py"
        if not script.is_file():
            raise CLIError(f"{script} not found")
        cmd = [sys.executable, str(script), *args.extra]
    else:
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            str(root / "perf"),
            "-q",
            "--benchmark-only",
            "--benchmark-columns=min,median,mean,ops",
            *args.extra,
        ]
    return subprocess.call(cmd, cwd=root)


# -------------------------------------------------------------------------------------- demo


def _cmd_demo(args: argparse.Namespace) -> int:
    from kasmina.demo import DemoConfig, run_demo_cli

    config = DemoConfig(
        epochs=args.epochs,
        num_seeds=args.seeds,
        device=args.device,
        out_dir=Path(args.out),
        seed=args.seed,
        nproc=args.nproc,
        progress=not args.no_progress,
    )
    return run_demo_cli(config)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# -------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Kasmina grows a neural network while it trains by grafting seed modules, on "
            "signed controller commands. Run 'kasmina <command> --help' for details."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    demo = sub.add_parser(
        "demo",
        help="run a complete morphogenetic training run on the digits dataset (CPU, < 2 min)",
        description=(
            "Train a small MLP on scikit-learn's bundled handwritten digits; a controller sends "
            "signed commands to germinate seeds on plateaus, carries them through the lifecycle "
            "gates, culls one that does not help, and distils a teacher into them. Writes "
            "report.txt, telemetry.jsonl, a PNG plot and an Urza store into --out."
        ),
    )
    demo.add_argument("--epochs", type=_positive_int, default=30, help="training epochs (30)")
    demo.add_argument("--seeds", type=_positive_int, default=3, help="seed slots to grow (3)")
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (cpu)")
    demo.add_argument("--out", default="kasmina-demo", help="output directory (./kasmina-demo)")
    demo.add_argument("--seed", type=int, default=0, help="RNG seed; same seed, same run (0)")
    demo.add_argument(
        "--nproc", type=_positive_int, default=1, help="data-parallel processes on loopback (1)"
    )
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(func=_cmd_demo)

    _add_urza_parser(sub)

    keygen = sub.add_parser(
        "keygen",
        help="generate an HMAC key for signing controller commands",
        description=(
            "Generate a random HMAC-SHA256 key. Prints an 'export KASMINA_HMAC_KEYS=...' line "
            "(the format Keyring.from_env reads); with --out also writes a JSON keyring file "
            "(mode 0600, the format Keyring.from_file reads). Status goes to stderr."
        ),
    )
    keygen.add_argument("--key-id", default="default", help="id of the new key (default)")
    keygen.add_argument("--out", help="keyring JSON file to write")
    keygen.add_argument("--append", action="store_true", help="add to an existing --out file")
    keygen.add_argument("--force", action="store_true", help="replace a key with the same id")
    keygen.add_argument("--bytes", type=_positive_int, default=32, help="key length (32)")
    keygen.set_defaults(func=_cmd_keygen)

    bench = sub.add_parser(
        "bench",
        help="run the benchmarks in perf/ (pytest-benchmark), or the GPU table with --gpu",
        description=(
            "Run the CPU benchmarks (pytest perf/ --benchmark-only), each printed beside its "
            "target; --gpu runs perf/bench_gpu.py instead (needs CUDA). Extra arguments after "
            "'--' go to pytest or the GPU script. Run from a source checkout."
        ),
    )
    bench.add_argument("--gpu", action="store_true", help="run the GPU table (perf/bench_gpu.py)")
    bench.add_argument("extra", nargs=argparse.REMAINDER, help="arguments passed through")
    bench.set_defaults(func=_cmd_bench)
    return parser


def _add_urza_parser(sub: argparse._SubParsersAction) -> None:
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
    publish.add_argument("--dim", type=_positive_int, help="chunk width (with --builtin)")
    publish.add_argument("--hidden", type=_positive_int, help="hidden width (with --builtin)")
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
    from kasmina.blueprints import BLUEPRINTS

    return sorted(BLUEPRINTS)


# -------------------------------------------------------------------------------------- urza


def _keyring(args: argparse.Namespace, required: bool = True):  # -> Keyring | None
    from kasmina.auth import DEFAULT_ENV_VAR, Keyring

    if args.keys:
        return Keyring.from_file(args.keys)
    if os.environ.get(DEFAULT_ENV_VAR, "").strip():
        return Keyring.from_env(DEFAULT_ENV_VAR)
    if not required:
        return None
    raise CLIError(
        f"no HMAC keys: pass --keys FILE or set {DEFAULT_ENV_VAR} (see 'kasmina keygen')"
    )


def _client(args: argparse.Namespace, keyring, must_exist: bool = True):  # -> UrzaLibraryClient
    from kasmina.auth import Keyring
    from kasmina.urza import UrzaLibraryClient

    url = args.store
    if "://" not in url and must_exist and not Path(url).is_dir():
        raise CLIError(f"no Urza store at {url!r} (not a directory)")
    return UrzaLibraryClient(url, keyring if keyring is not None else Keyring({}), retries=0)


def _cmd_urza_publish(args: argparse.Namespace) -> int:
    import torch

    from kasmina.urza import publish_artifact

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
        from kasmina.blueprints import get_blueprint

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
        raise CLIError(f"torch.export failed: {_one_line(exc)[:300]}") from None
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


def _load_factory(spec: str):  # -> nn.Module
    import importlib

    from torch import nn

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CLIError(f"bad --factory {spec!r}: expected MODULE:CALLABLE")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target = importlib.import_module(module_name)
    except ImportError as exc:
        raise CLIError(f"cannot import {module_name!r}: {exc}") from None
    factory = target
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise CLIError(f"{module_name!r} has no attribute {attr!r}")
    module = factory() if callable(factory) else None
    if not isinstance(module, nn.Module):
        raise CLIError(f"{spec} did not return an nn.Module")
    return module


def _cmd_urza_list(args: argparse.Namespace) -> int:
    from kasmina.errors import ArtifactIntegrityError

    keyring = _keyring(args, required=False)
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
                print(f"{artifact_id}  INVALID: {_one_line(exc)}")
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
                print(f"FAILED {artifact_id}: {_one_line(exc)}")
            else:
                print(f"ok     {artifact_id}")
    if failed:
        print(
            f"{PROG}: error: {failed} of {len(ids)} artifact(s) failed verification",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "extra", None) and args.extra[0] == "--":
        args.extra = args.extra[1:]
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, KasminaError, OSError, ValueError, KeyError) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    text = " ".join(text.split()) or type(exc).__name__
    return text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
