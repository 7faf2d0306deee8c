"""Recipe state files (optimizer, RNG, progress) and the checkpoint directories under ``output_dir``."""

import json
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from torchtune import utils

from torchtune_gist._io import atomic_save_safetensors, finish_replace, leftover_directory_of

log = utils.get_logger("INFO")

ADAPTER_FILE = "gist_adapter.safetensors"
RECIPE_STATE_FILE = "recipe_state.safetensors"
CHECKPOINT_NAME = re.compile(r"^(step|epoch)_(\d+)$")


def _flatten_optimizer_state(state: Dict[str, Any]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    tensors, scalars = {}, {}
    for fqn, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{fqn}.{name}"] = value
            else:
                scalars[f"{fqn}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer_state(tensors: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> Dict[str, Any]:
    state: Dict[str, Dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            fqn, name = key[len("optim.") :].rsplit(".", 1)
            state.setdefault(fqn, {})[name] = value
    for key, value in meta["scalars"].items():
        fqn, name = key.rsplit(".", 1)
        state.setdefault(fqn, {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_recipe_state(
    path: Path, *, optimizer_state: Dict[str, Any], progress: Dict[str, Any], rng_states: Dict[str, torch.Tensor]
) -> None:
    """Write optimizer state, RNG states (``cpu``, and ``cuda`` when training there) and progress (JSON) to one
    safetensors file, atomically."""
    tensors, optim_meta = _flatten_optimizer_state(optimizer_state)
    tensors.update({f"rng_state.{device}": state for device, state in rng_states.items()})
    metadata = {
        "format": "torchtune-gist-recipe-state",
        "progress": json.dumps(progress),
        "optim": json.dumps(optim_meta),
    }
    atomic_save_safetensors(tensors, path, metadata=metadata)


def _read_recipe_state(path: Path, *, tensors: bool) -> Tuple[Dict[str, str], Dict[str, torch.Tensor]]:
    """The metadata of a file written by :func:`save_recipe_state` and, if ``tensors``, its tensors.

    Raises:
        ValueError: if ``path`` is unreadable or not a recipe state file.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "torchtune-gist-recipe-state":
                raise ValueError(f"{path} is not a torchtune-gist recipe state file")
            return meta, ({k: f.get_tensor(k) for k in f.keys()} if tensors else {})
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e


def read_recipe_progress(path: Path) -> Dict[str, Any]:
    """The progress (step, epoch, seed, settings, ...) of a file written by :func:`save_recipe_state`, without
    reading its tensors.

    Raises:
        ValueError: if ``path`` is unreadable or not a recipe state file.
    """
    return json.loads(_read_recipe_state(path, tensors=False)[0]["progress"])


def load_recipe_state(path: Path) -> Tuple[Dict[str, Any], Dict[str, Any], Dict[str, torch.Tensor]]:
    """Read ``(optimizer_state, progress, rng_states)`` written by :func:`save_recipe_state`.

    Raises:
        ValueError: if ``path`` is unreadable or not a recipe state file.
    """
    meta, tensors = _read_recipe_state(path, tensors=True)
    rng = {k.split(".", 1)[1]: tensors.pop(k) for k in list(tensors) if k.startswith("rng_state.")}
    if "rng_state" in tensors:  # files written before the GPU's state was saved too
        rng["cpu"] = tensors.pop("rng_state")
    return _unflatten_optimizer_state(tensors, json.loads(meta["optim"])), json.loads(meta["progress"]), rng


def remove_leftover_checkpoints(output_dir: Path) -> List[Path]:
    """Delete what interrupted saves left under ``output_dir`` (``.step_N.partial``, ``.epoch_E.old``, ...), after
    putting in place a checkpoint whose save a crash cut between its two renames (:func:`finish_replace`);
    returns what was deleted."""
    for old in Path(output_dir).glob(".*.old"):
        name = leftover_directory_of(old.name)
        if name and CHECKPOINT_NAME.match(name) and finish_replace(Path(output_dir) / name):
            log.warning(f"put {Path(output_dir) / name} in place: a crash had cut its save short between two renames")
    leftovers = [
        d
        for d in Path(output_dir).glob(".*")
        if d.is_dir() and CHECKPOINT_NAME.match(leftover_directory_of(d.name) or "")
    ]
    for d in leftovers:
        shutil.rmtree(d)
    return leftovers


def prune_step_checkpoints(output_dir: Path, keep: int) -> List[Path]:
    """Delete all but the ``keep`` step checkpoints (``step_<N>``) under ``output_dir`` saved last; epoch checkpoints
    stay. Returns what was deleted."""
    steps = []
    for directory in Path(output_dir).glob("step_*"):
        match = CHECKPOINT_NAME.match(directory.name)
        if match is None or not directory.is_dir():
            continue
        try:
            progress = read_recipe_progress(directory / RECIPE_STATE_FILE)
        except (FileNotFoundError, ValueError):
            progress = {}
        steps.append(((float(progress.get("saved_at", 0.0)), int(match.group(2))), directory))
    pruned = [directory for _, directory in sorted(steps)[: max(0, len(steps) - keep)]]
    for directory in pruned:
        shutil.rmtree(directory)
    return pruned


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    """The complete checkpoint directory (``step_<N>`` or ``epoch_<E>``) under ``output_dir`` saved last, if any
    (a run started afresh over an older run's checkpoints is continued, not the older run's higher step); among
    checkpoints of before ``saved_at`` was recorded, the highest global step; at equal steps the epoch's.
    Unreadable ones are skipped with a warning."""
    best: Tuple[Tuple[float, int, bool], Optional[Path]] = ((-1.0, -1, False), None)
    for state_file in Path(output_dir).glob(f"*/{RECIPE_STATE_FILE}"):
        match = CHECKPOINT_NAME.match(state_file.parent.name)
        if match is None or not (state_file.parent / ADAPTER_FILE).exists():
            continue
        try:
            progress = read_recipe_progress(state_file)
        except ValueError as e:
            log.warning(f"skipping {state_file.parent}: {e}")
            continue
        key = (float(progress.get("saved_at", 0.0)), progress.get("global_step", -1), match.group(1) == "epoch")
        if key > best[0]:
            best = (key, state_file.parent)
    return best[1]
