"""The shared argument checks behind every "must be a whole number" message."""

import numpy as np
import pytest

from torchtune_gist._checks import as_positive_int, check_whole, is_whole


@pytest.mark.parametrize("value", [True, False, 2.5, "3", None, 0, -1])
def test_check_whole_refuses_what_is_not_a_whole_number_at_least_one(value):
    with pytest.raises(ValueError, match=r"^chunk_size must be a whole number >= 1, got "):
        check_whole("chunk_size", value)


def test_check_whole_takes_numpy_integers_a_minimum_and_optional_none():
    check_whole("n", np.int64(3))
    check_whole("k", 0, 0)
    check_whole("top_k", None, optional=True)
    with pytest.raises(ValueError, match=r"top_k must be a whole number >= 1 or None, got 0"):
        check_whole("top_k", 0, optional=True)
    assert is_whole(-5) and not is_whole(-5, 0) and not is_whole(np.float32(1.0))


def test_as_positive_int_reads_command_line_digits():
    assert as_positive_int(" 12 ") == 12 and as_positive_int(np.int32(2)) == 2
    assert [as_positive_int(v) for v in ("0", "abc", "-1", 2.5, True, 0)] == [None] * 6
