"""Responses a run has computed (an evaluation's, ``gist_generate``'s answers), kept as they come so an interrupted
run goes on where it stopped.

A JSON-lines file: the first line records what the responses depend on (``settings``: the mode, the checkpoint's
files, the model config, ...); each further line holds one response, keyed by a hash of the request. A file made
with other settings is moved aside to ``<file>.previous`` (``.previous.2``, ... where that is taken) and started
over, with a warning naming what changed and where the old responses went: a setting changed by mistake costs no
work. A last line cut short by a kill is dropped. JSON only: nothing is unpickled.
"""

import hashlib
import itertools
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

from torchtune_gist._io import atomic_write_text

log = logging.getLogger(__name__)


def request_key(kind: str, args: Tuple[Any, ...]) -> str:
    """A stable hash of a request: its kind (``generate_until``, ``loglikelihood``) and arguments."""
    text = json.dumps([kind, list(args)], sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def file_fingerprint(path: Union[str, Path, None]) -> Optional[Dict[str, Tuple[int, int]]]:
    """``{name: (size, mtime_ns)}`` of a file, or of the files directly in a directory; ``None`` for no path."""
    if path is None:
        return None
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


class ResponseLog:
    """The responses logged for one evaluation's ``settings``, read from ``path`` and appended to it.

    Args:
        path: the JSON-lines file (created with its folder when missing).
        settings: what the responses depend on (JSON-able); a file made with other settings is moved to the first
            free ``<path>.previous``, ``<path>.previous.2``, ... (if it holds responses) and started over.
    """

    def __init__(self, path: Union[str, Path], settings: Dict[str, Any]) -> None:
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings, default=str))
        self._responses: Dict[str, Any] = {}
        lines = list(self._read())
        if lines:
            header, *entries = lines
            saved = header.get("settings") if isinstance(header, dict) else None
            if saved == self.settings:
                self._responses = {e["key"]: e["response"] for e in entries if isinstance(e, dict) and "key" in e}
            else:
                changed = sorted(
                    k for k in {**(saved or {}), **self.settings} if (saved or {}).get(k) != self.settings.get(k)
                )
                kept = ""
                if entries:
                    previous = self._free_previous_path()
                    os.replace(self.path, previous)
                    kept = (
                        f" (the old file is now {previous}; rename it back and run with its settings to go on from it)"
                    )
                log.warning(
                    "%s holds %d responses made with other %s: starting over%s",
                    self.path,
                    len(entries),
                    ", ".join(changed) or "settings",
                    kept,
                )
        lines = [{"settings": self.settings}] + [{"key": k, "response": r} for k, r in self._responses.items()]
        atomic_write_text("".join(json.dumps(line) + "\n" for line in lines), self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        if self._responses:
            log.info("%s: %d responses logged earlier are reused", self.path, len(self._responses))

    def _free_previous_path(self) -> Path:
        """``<file>.previous``, or ``<file>.previous.N`` for the first N >= 2 not taken."""
        base = self.path.with_name(self.path.name + ".previous")
        return next(p for n in itertools.count(1) if not (p := base if n == 1 else Path(f"{base}.{n}")).exists())

    def _read(self) -> Iterator[Any]:
        """The file's whole lines as JSON (a line cut short, by a kill mid-write, ends the reading)."""
        if not self.path.is_file():
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    return

    def __len__(self) -> int:
        return len(self._responses)

    def get(self, kind: str, args: Tuple[Any, ...]) -> Optional[Any]:
        """The logged response to a request, or ``None``."""
        return self._responses.get(request_key(kind, args))

    def add(self, kind: str, args: Tuple[Any, ...], response: Any) -> None:
        """Log a response (JSON-able) and write it out at once."""
        key = request_key(kind, args)
        self._responses[key] = response
        self._file.write(json.dumps({"key": key, "response": response}) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file; the responses stay readable through :meth:`get`."""
        self._file.close()

    def remove(self) -> None:
        """Close and delete the file (once the evaluation's results are saved, so a rerun computes afresh)."""
        self.close()
        self.path.unlink(missing_ok=True)
