"""The strict JSON parser signed documents are read with (``utils.signed_json``)."""

from __future__ import annotations

import math

import pytest

from kasmina.utils.signed_json import canonical_json, strict_json_loads


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", '{"a": NaN}'])
def test_the_non_finite_constants_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="non-finite number"):
        strict_json_loads(text)


@pytest.mark.parametrize("text", ["1e400", "-1e400", '{"score": 1.5e999}', "[0.5, 2E+309]"])
def test_a_number_past_a_floats_range_is_refused_as_a_constant_is(text: str) -> None:
    """``1e400`` parsed as ``inf``: the reader saw a non-finite number the constants' check
    exists to keep out, and ``canonical_json`` could not write it back (a caller refused it
    later, or compared it as inf)."""
    with pytest.raises(ValueError, match="non-finite number"):
        strict_json_loads(text)


def test_finite_numbers_and_allow_nan_read_as_before() -> None:
    assert strict_json_loads('{"a": 1.7976931348623157e308, "b": 5e-324, "c": 1e-400}') == {
        "a": 1.7976931348623157e308,
        "b": 5e-324,
        "c": 0.0,  # an underflow is a finite number, as every reader rounds it
    }
    assert canonical_json(strict_json_loads('{"x": 0.1}')) == b'{"x":0.1}'
    loose = strict_json_loads('{"a": 1e400, "b": NaN}', allow_nan=True)
    assert loose["a"] == math.inf and math.isnan(loose["b"])
    with pytest.raises(ValueError, match="duplicate key"):
        strict_json_loads('{"a": 1, "a": 2}')
