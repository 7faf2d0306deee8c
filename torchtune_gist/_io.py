"""Crash-safe file writing: everything the project writes goes to a temporary name, then is renamed.

Files are fsynced before the rename and written under a name that carries the host and process id, so a later
write of the same file removes what a killed process left (:func:`temporary_sibling`); whole directories (a
checkpoint: adapter, recipe state, merged export) are written under a hidden temporary name and published by
:func:`replace_directory`.
"""

import glob
import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

import torch
from safetensors.torch import save_file


def unwritable_reason(path: Union[str, Path], *, directory: bool) -> Optional[str]:
    """Why ``path`` cannot be written as a directory (``directory=True``) or a file, or ``None``: it exists as the
    other kind, a parent of it is a file, or this process may not write there (a read-only mount, another user's
    folder, a folder that takes no files such as ``/proc``). Creates nothing but one temporary file, removed at once, in
    the nearest existing folder."""
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        return f"{path} is a {'file' if directory else 'directory'}, not a {'directory' if directory else 'file'}"
    blocking = next((parent for parent in path.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        return f"{path} lies under {blocking}, which is a file"
    existing = path if path.is_dir() else next(parent for parent in path.parents if parent.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"this process may not write in {existing} (read-only, or another user's)"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        return f"this process cannot create files in {existing} ({e.strerror or e})"
    return None


def _new_file_mode() -> int:
    """The mode ``open`` gives a new file under the process's umask (safetensors writes ``0o600``)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def temporary_sibling(path: Union[str, Path]) -> Iterator[Path]:
    """A hidden name beside ``path`` to write into before renaming it to ``path``: ``.NAME.tmp-HOST-PID``.

    Creates the parent directory. Temporary files for the same ``path`` that a process on this host left when it was
    killed mid-write (its pid no longer runs) are removed first; the yielded one is removed on exit unless renamed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-{socket.gethostname()}-"
    for leftover in path.parent.glob(f"{glob.escape(prefix)}*"):
        pid = leftover.name[len(prefix) :]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            leftover.unlink(missing_ok=True)
    tmp = path.with_name(f"{prefix}{os.getpid()}")
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save_safetensors(
    tensors: Dict[str, torch.Tensor], path: Union[str, Path], metadata: Optional[Dict[str, str]] = None
) -> Path:
    """Write ``tensors`` as safetensors to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    with temporary_sibling(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, path)
    return path


def atomic_write_text(text: str, path: Union[str, Path]) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    with temporary_sibling(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return path


def atomic_save_figure(fig: Any, path: Union[str, Path], **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure as PNG to ``path`` atomically (temporary file, rename); ``savefig_kwargs`` go to
    ``fig.savefig``. The caller closes the figure."""
    path = Path(path)
    with temporary_sibling(path) as tmp:
        fig.savefig(tmp, format="png", **savefig_kwargs)
        os.replace(tmp, path)
    return path


def atomic_write_json(obj: Any, path: Union[str, Path]) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def atomic_copy(src: Union[str, Path], path: Union[str, Path]) -> Path:
    """Copy the file ``src`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    with temporary_sibling(path) as tmp:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return path


def _fsync_directory(path: Path) -> None:
    """Make the renames inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_PARTIAL_SUFFIX = ".partial"
_OLD_SUFFIX = ".old"


def leftover_directory_of(name: str) -> Optional[str]:
    """The directory name whose interrupted :func:`replace_directory` or :func:`partial_directory` left a hidden
    directory called ``name`` (``".step_3.partial"`` -> ``"step_3"``), or ``None`` for any other name."""
    for suffix in (_PARTIAL_SUFFIX, _OLD_SUFFIX):
        if name.startswith(".") and name.endswith(suffix) and len(name) > len(suffix) + 1:
            return name[1 : -len(suffix)]
    return None


def partial_directory(path: Union[str, Path]) -> Path:
    """A fresh, empty hidden directory beside ``path`` to write its contents into before :func:`replace_directory`.
    One left by an interrupted run is removed first."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{_PARTIAL_SUFFIX}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def replace_directory(src: Union[str, Path], path: Union[str, Path]) -> Path:
    """Put the finished directory ``src`` at ``path``, replacing an older one there.

    A crash at any point leaves ``path`` either the old directory, the new one, or absent (the new one then waits
    under its hidden name, and :func:`finish_replace` puts it in place): never a mix of the two.
    """
    src, path = Path(src), Path(path)
    for directory in [src, *(d for d in src.rglob("*") if d.is_dir())]:
        _fsync_directory(directory)  # the entries inside, before the directory becomes visible
    old = path.with_name(f".{path.name}{_OLD_SUFFIX}")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(src, path)
    _fsync_directory(path.parent)
    if old.exists():
        shutil.rmtree(old)
    return path


def finish_replace(path: Union[str, Path]) -> Optional[Path]:
    """Finish a :func:`replace_directory` that a crash cut between its two renames (``path`` absent, the old directory
    at ``.NAME.old``, the finished new one at ``.NAME.partial``): the new one is put at ``path`` (the old one, should
    the new one be gone). Returns ``path`` when it did, else ``None``."""
    path = Path(path)
    old, new = (path.with_name(f".{path.name}{suffix}") for suffix in (_OLD_SUFFIX, _PARTIAL_SUFFIX))
    if path.exists() or not old.is_dir():
        return None
    os.replace(new if new.is_dir() else old, path)
    _fsync_directory(path.parent)
    return path
