"""The scalar checks every entry shares (``kasmina.utils.checks``): a bool, a string, a tensor or
NaN is no number, a NumPy number or a ``Fraction`` is taken as its Python value, and a symbolic
size or float under ``torch.compile`` passes as it is."""

from __future__ import annotations

import enum
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from kasmina.utils.checks import (
    check_int,
    check_non_negative,
    check_positive,
    check_positive_int,
    check_real,
)

INF, NAN = float("inf"), float("nan")
NOT_NUMBERS = [True, False, np.bool_(True), "0.5", None, torch.tensor(0.5), [1.0], 1j]


class Level(enum.IntEnum):
    HIGH = 3


@pytest.mark.parametrize("value", NOT_NUMBERS)
@pytest.mark.parametrize("check", [check_real, check_positive, check_non_negative])
def test_a_float_check_refuses_what_is_no_real_number(check, value) -> None:
    with pytest.raises(ValueError, match=r"^x must be a float, got "):
        check("x", value)


@pytest.mark.parametrize(
    ("value", "want"),
    [
        (0.5, 0.5),
        (3, 3),
        (np.float32(0.5), 0.5),
        (np.float64(2.0), 2.0),
        (np.int64(3), 3.0),
        (Fraction(1, 2), 0.5),
        (Level.HIGH, 3.0),
    ],
)
def test_a_real_number_is_taken_as_a_plain_python_number(value, want) -> None:
    for check in (check_real, check_positive, check_non_negative):
        got = check("x", value)
        assert got == want and type(got) in (int, float), (check, value)
    assert type(check_real("x", 3)) is int and type(check_real("x", np.int64(3))) is float


def test_the_bounds_of_the_float_checks() -> None:
    assert check_real("x", NAN) != check_real("x", NAN) and check_real("x", -INF) == -INF
    assert check_non_negative("x", 0) == 0 and check_non_negative("x", 0.0) == 0.0
    for value in (0, 0.0, -1e-300, NAN, INF, -INF, 10**400):
        with pytest.raises(ValueError, match=r"^x must be finite and > 0, got "):
            check_positive("x", value)
    for value in (-1, -1e-300, NAN, INF, 10**400):
        with pytest.raises(ValueError, match=r"^x must be finite and >= 0, got "):
            check_non_negative("x", value)
    with pytest.raises(ValueError, match="x must be a float"):
        check_real("x", Fraction(10**400))  # float() overflows


def test_the_largest_finite_float_is_in_range_and_one_past_it_is_not() -> None:
    """The upper bound is a float's range itself: its largest finite value is a number like any
    other (``0 < value <= max``), as is the int equal to it; only past it is a value refused."""
    big = sys.float_info.max
    assert check_positive("x", big) == big and check_non_negative("x", big) == big
    assert check_positive_int("n", int(big)) == int(big)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        check_positive_int("n", int(big) + 1)


@pytest.mark.parametrize(
    "value",
    [
        True,
        np.bool_(True),
        torch.tensor(True),
        1.0,
        np.float32(2.0),
        Fraction(2),
        "2",
        None,
        torch.tensor(2.0),
        torch.tensor([1, 2]),
        NAN,
    ],
)
def test_an_int_check_refuses_what_is_no_integer(value) -> None:
    with pytest.raises(ValueError, match=r"^n must be an int >= 1, got "):
        check_positive_int("n", value)


def test_an_integer_is_taken_as_a_plain_int_within_its_bounds() -> None:
    for value in (3, np.int64(3), np.int32(3), torch.tensor(3), Level.HIGH):
        got = check_positive_int("n", value)
        assert got == 3 and type(got) is int
    assert check_int("n", 0, 0) == 0 and check_int("n", 5, 0, 5) == 5
    with pytest.raises(ValueError, match=r"^n must be an int >= 0, got -1$"):
        check_int("n", -1, 0)
    with pytest.raises(ValueError, match=r"^n must be an int in \[0, 5\], got 6$"):
        check_int("n", 6, 0, 5)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        check_positive_int("n", 10**400)  # no count: past a float's range
    assert check_int("n", 10**400, 0, 10**401) == 10**400  # within a bound given


def test_checks_load_neither_torch_nor_numpy() -> None:
    """A controller that signs commands checks its ledger's and telemetry's settings without
    paying for torch (``tests/test_layering.py``)."""
    code = (
        "import sys\n"
        "from kasmina.utils.checks import check_int, check_positive, check_real\n"
        "from fractions import Fraction\n"
        "assert check_int('n', 3, 1) == 3 and check_positive('x', Fraction(1, 2)) == 0.5\n"
        "for bad in (True, 'x'):\n"
        "    try:\n"
        "        check_real('x', bad)\n"
        "    except ValueError:\n"
        "        pass\n"
        "heavy = [m for m in ('torch', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_symbolic_sizes_and_floats_pass_under_torch_compile() -> None:
    """``dynamic=True``: the size is a ``SymInt``, the float (with ``specialize_float`` off) a
    ``SymFloat``; both pass through the checks without a graph break, for three sizes."""

    def scaled(x: torch.Tensor, t: float) -> torch.Tensor:
        n = check_positive_int("n", x.shape[0])
        m = check_int("m", x.shape[0] - 1, 0)
        return x * check_positive("t", t) * check_real("t", t) * n + m

    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(specialize_float=False):
            fn = torch.compile(scaled, fullgraph=True, dynamic=True, backend="eager")
            for k in (3, 5, 7):
                x = torch.ones(k)
                torch.testing.assert_close(fn(x, 0.5 * k), scaled(x, 0.5 * k))
    finally:
        torch._dynamo.reset()
