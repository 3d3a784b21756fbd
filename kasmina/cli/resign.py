"""``kasmina urza resign``'s old keys: the HMAC keyring the version 1 manifests were signed
with, never the command keys (``legacy_keyring``), and which old keys a run without them must
be given (``old_keys_advice``)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from kasmina.cli.common import CLIError

if TYPE_CHECKING:
    from kasmina.utils.keyring import Keyring

__all__ = ["legacy_keyring", "old_keys_advice"]

# What a migration of version 1 (HMAC) manifests needs, and how to do without it.
HMAC_ADVICE = (
    "resign checks each old HMAC signature first: pass --hmac-keys FILE, the keys the "
    "old manifests were signed with (without them, publish the artifacts again instead)"
)
# What a key rotation (version 2 manifests a retiring publisher key signed) needs.
ROTATION_ADVICE = (
    "pass --previous-publishers FILE, the retiring key's public key ({key_id: public_key}, "
    "as 'kasmina keygen --publisher' printed it)"
)


def old_keys_advice(problems: Iterable[str]) -> str | None:
    """What a resign run given no old keys says its failed artifacts need, from why each
    failed to verify under ``--key`` (``problems``): ``--hmac-keys`` for version 1 (HMAC)
    manifests, ``--previous-publishers`` for those another publisher key signed (a key
    rotation), both where there are both (one run each). None where no old key would help (a
    damaged or missing payload, a missing artifact): those are only failures."""
    from kasmina.urza.artifact import LEGACY_HMAC_MESSAGE, UNKNOWN_PUBLISHER_KEY

    problems = list(problems)
    legacy = sum(LEGACY_HMAC_MESSAGE in why for why in problems)
    rotated = sum(f": {UNKNOWN_PUBLISHER_KEY} " in why for why in problems)
    if legacy and rotated:
        return (
            f"{HMAC_ADVICE}; the {rotated} signed by another publisher key need a second run: "
            f"{ROTATION_ADVICE}"
        )
    if legacy:
        return HMAC_ADVICE
    if rotated:
        return (
            f"{rotated} artifact(s) are signed by another publisher key; to re-sign them with "
            f"--key (a key rotation), {ROTATION_ADVICE}"
        )
    return None


def legacy_keyring(args: argparse.Namespace) -> Keyring:
    """The HMAC keyring the old manifests were signed with: ``--hmac-keys FILE``, and never
    the command keyring. Every trainer holds the command keys, so a version 1 manifest signed
    with one proves nothing about who made its payload, and re-signing it would turn a command
    key into a publisher's signature: no fallback to ``$KASMINA_HMAC_KEYS`` (the command keys'
    variable), and a file holding any key of the command keyring (``--command-keys FILE``, that
    variable, or both; one is required, since both keyrings are the same kind of file) is
    refused."""
    from kasmina.utils.keyring import DEFAULT_ENV_VAR, Keyring, hmac_equivalent

    if not args.hmac_keys:
        raise CLIError(HMAC_ADVICE)
    legacy = Keyring.from_file(args.hmac_keys)
    commands = []  # the command keys, each source the operator has: every one is refused
    if args.command_keys:
        commands.append(
            (f"--command-keys {args.command_keys}", Keyring.from_file(args.command_keys))
        )
    if os.environ.get(DEFAULT_ENV_VAR, "").strip():
        commands.append((f"${DEFAULT_ENV_VAR}", Keyring.from_env(DEFAULT_ENV_VAR)))
    if not commands:  # the same file format: without the command keys no check is possible
        raise CLIError(
            "resign refuses the command keys as old keys and must know them to: pass "
            f"--command-keys FILE (the trainers' command keyring) or set ${DEFAULT_ENV_VAR}"
        )
    for where, keyring in commands:
        secrets = {hmac_equivalent(keyring.get(key_id)) for key_id in keyring.key_ids}
        shared = [k for k in legacy.key_ids if hmac_equivalent(legacy.get(k)) in secrets]
        if shared:
            raise CLIError(
                f"--hmac-keys {args.hmac_keys}: key(s) {shared} also sign commands "
                f"({where}); every trainer holds them, so an old manifest they "
                "verify may be anyone's. Publish those artifacts again from their sources"
            )
    return legacy
