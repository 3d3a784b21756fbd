"""Exceptions raised by Kasmina's public API."""

from __future__ import annotations


class KasminaError(Exception):
    """Base class of every Kasmina error."""


class ArtifactIntegrityError(KasminaError):
    """An Urza artifact's hash, size, manifest or signature did not verify; nothing was loaded."""


class KernelInputRefused(KasminaError):
    """A seed kernel's exported program refused a call's input in its own input checks (the
    conditions ``torch.export`` recorded on the input's sizes: a range, an even sequence length
    for a kernel that pools pairs of tokens, the branch it took): a call it cannot take, not a
    fault, which a seed sits out as one its signed input shape rules out. ``count``: how many
    calls that check has refused (rate-limited logs)."""

    def __init__(self, message: str, count: int = 1) -> None:
        super().__init__(message)
        self.count = count


class UrzaUnavailableError(KasminaError):
    """Urza could not be reached (after retries), or its circuit breaker is open."""


class ArtifactNotFoundError(KasminaError):
    """The requested artifact id is not in the store."""


class GradientIsolationViolationError(KasminaError):
    """A seed's gradient leaked into the host (or the reverse) often enough to trip the breaker."""


class IllegalTransitionError(KasminaError):
    """A lifecycle transition outside docs/design.md §3's table was requested."""


class ParameterOverlapError(KasminaError):
    """A seed's parameters overlap the host's (or another seed's) optimizer parameters."""


class CheckpointIntegrityError(KasminaError):
    """A checkpoint's manifest, HMAC, run id, epoch, size or SHA-256 did not verify, so none of
    its bytes reached ``torch.load``: the file was damaged, tampered with, truncated, swapped for
    another epoch's, or belongs to another run."""


class CheckpointUnavailableError(KasminaError):
    """No checkpoint can serve the request: none of that epoch is kept (the message names the
    nearest kept ones), or this run keeps none at all (``checkpoint_mode="off"``)."""


class NotARegularFileError(KasminaError, ValueError):
    """``path`` names something other than a regular file (``kind``: "a FIFO", ...), refused
    before anything blocks on it; a ``ValueError`` too, as a bad path argument is."""

    def __init__(self, path: str, kind: str, what: str = "file") -> None:
        super().__init__(f"{what} {path} is not a regular file ({kind})")
        self.path, self.kind = path, kind
