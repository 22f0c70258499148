"""Assertions shared by the tests."""

import pytest

from atoms.errors import InputError


def one_line_error(fn, *match: str) -> str:
    """``fn()`` raises a one-line InputError containing every string in ``match``."""
    with pytest.raises(InputError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for m in match:
        assert m in msg, msg
    return msg
