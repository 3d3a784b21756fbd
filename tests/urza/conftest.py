"""Fixtures of the Urza tests: a publisher's key, and what a trainer trusts of it."""

from __future__ import annotations

import pytest

from kasmina.urza.keys import PublisherKey, TrustedPublishers


@pytest.fixture(scope="module")
def publisher() -> PublisherKey:
    return PublisherKey.generate("pub")


@pytest.fixture(scope="module")
def trusted(publisher: PublisherKey) -> TrustedPublishers:
    """What a trainer holds: the publisher's public key only (a module may hold more)."""
    return publisher.trusted_publishers()
