"""Stopping a training run cleanly on SIGINT or SIGTERM."""

import signal
import subprocess
import threading
import time
from typing import Any, Dict, Optional

from torchtune import utils

log = utils.get_logger("INFO")


class StopRequest:
    """While entered (in the main thread), SIGINT and SIGTERM set :attr:`requested` (and :attr:`signum`) instead of
    ending the process: training saves a checkpoint after the optimizer step under way, then returns. A second
    SIGINT at least ``patience`` seconds later raises ``KeyboardInterrupt`` at once (sooner, it is taken for a copy of
    the first, as when a terminal and a launcher both signal a worker). The previous handlers come back on exit."""

    def __init__(self, patience: float = 2.0) -> None:
        self.requested = False
        self.signum: Optional[int] = None
        self._patience = patience
        self._first = 0.0
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            if signum == signal.SIGINT and time.monotonic() - self._first >= self._patience:
                raise KeyboardInterrupt
            return
        self.requested, self.signum, self._first = True, signum, time.monotonic()
        log.warning(
            f"{signal.Signals(signum).name}: stopping after this step with a checkpoint (Ctrl-C again: at once)"
        )

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def wait_for_recipe(proc: subprocess.Popen) -> int:
    """Wait for a recipe run as a child process and return its exit code. On Ctrl-C (which the child gets too, and
    answers by saving a checkpoint after its step) wait for it to finish saving, then re-raise; a second Ctrl-C kills
    it at once. (``subprocess.run`` kills the child 0.25 s after a Ctrl-C, before it can save.)"""
    try:
        return proc.wait()
    except KeyboardInterrupt:
        print("waiting for the training to save a checkpoint (Ctrl-C again: stop at once)", flush=True)
        try:
            proc.wait()
        except KeyboardInterrupt:
            proc.kill()
        raise
