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


def test_only_our_own_checks_end_a_recipe_with_a_message_instead_of_a_traceback(monkeypatch, capsys):
    """A check of ours names the key to change: its message is the whole story. An error from torch or Python itself
    may be a bug: its traceback stays."""
    import torch

    from torchtune_gist._cli import TRACEBACK_ENV, user_errors
    from torchtune_gist.training import count_setting

    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as e, user_errors("prog"):
        count_setting({"epochs": 0}, "epochs")
    assert e.value.code == 1 and capsys.readouterr().err.startswith("prog: epochs=0 must be a whole number >= 1\n")
    with pytest.raises(ValueError, match="invalid literal"), user_errors("prog"):
        int("x")
    with pytest.raises(RuntimeError, match="size mismatch|inconsistent"), user_errors("prog"):
        torch.zeros(2) @ torch.zeros(3)
    monkeypatch.setenv("RANK", "1")  # under a launcher each rank names itself
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit), user_errors("prog"):
        count_setting({"epochs": 0}, "epochs")
    assert capsys.readouterr().err.startswith("prog (rank 1): epochs=0 must be")
    monkeypatch.setenv(TRACEBACK_ENV, "1")
    with pytest.raises(ValueError, match="epochs=0"), user_errors("prog"):
        count_setting({"epochs": 0}, "epochs")
    with pytest.raises(SystemExit) as e, user_errors("prog", on_interrupt="The answers are kept."):
        raise KeyboardInterrupt
    assert e.value.code == 130 and "prog: stopped. The answers are kept." in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt), user_errors("prog"):  # training handles its own signals
        raise KeyboardInterrupt
