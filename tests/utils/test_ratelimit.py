from __future__ import annotations

import logging

from kasmina.utils.ratelimit import rarely


def test_rarely_is_loud_for_the_first_and_every_nth() -> None:
    loud = [n for n in range(1, 301) if rarely(n, 100) == logging.WARNING]
    assert loud == [1, 100, 200, 300]
    assert rarely(2, 100) == logging.DEBUG and rarely(1, 100, logging.ERROR) == logging.ERROR
