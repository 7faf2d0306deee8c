"""How the recipes end on a user's mistake: with the message one of our checks wrote, not a traceback.

An error raised by this package's or a recipe's own code (a check naming the config key to change) is printed as one
message with exit status 1; an error raised anywhere else (torch, torchtune, a library) keeps its traceback, as a bug
report needs it. ``TORCHTUNE_GIST_TRACEBACK=1`` shows every traceback.
"""

import os
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

#: Set to 1 to see the traceback of every error.
TRACEBACK_ENV = "TORCHTUNE_GIST_TRACEBACK"
#: The modules whose errors are messages: the recipes (``__main__`` when ``tune run`` runs one) and this package.
_RECIPE_MODULES = (
    "__main__",
    "gist_lora_single_device",
    "gist_lora_distributed",
    "gist_generate",
    "gist_eleuther_eval",
)


def raised_by_us(error: BaseException) -> bool:
    """Whether ``error`` was raised in this package's or a recipe's code (its traceback's last frame is there)."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", ""))
    return module in _RECIPE_MODULES or module == "torchtune_gist" or module.startswith("torchtune_gist.")


@contextmanager
def user_errors(program: str, *, on_interrupt: Optional[str] = None) -> Iterator[None]:
    """Exit with status 1 and the message of a ``ValueError``, ``TypeError``, ``RuntimeError`` or ``OSError`` that
    :func:`raised_by_us` (under a launcher of several processes, each names its rank: a mistake in one rank's data is
    that rank's alone); with ``on_interrupt``, exit with status 130 and that message on Ctrl-C. Other errors propagate
    with their traceback."""
    try:
        yield
    except KeyboardInterrupt:
        if on_interrupt is None:
            raise
        print(f"\n{program}: stopped. {on_interrupt}", file=sys.stderr)
        sys.exit(130)
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        if not raised_by_us(e) or os.environ.get(TRACEBACK_ENV) == "1":
            raise
        rank = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"{program}{rank}: {e}\n({TRACEBACK_ENV}=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)
