"""Gist fine-tuning logic shared by the ``gist_lora_single_device`` and ``gist_lora_distributed`` recipes.

The recipes differ only in how the model is built and sharded and how numbers are reduced across
ranks; everything gist-specific lives here once: checking that model, tokenizer and data agree on
the gist tokens, building gist batches (mask mode, padding or packing, ``BlockMask`` on CUDA),
the masked forward and loss, the training loop with gradient accumulation, validation, and
crash-safe checkpoints that resume exactly.

Checkpoint layout (each directory written whole under a hidden temporary name, then renamed into place, so
an interrupted save leaves the earlier checkpoints and never a partial one)::

    <output_dir>/step_<N>/            (every ``save_every_n_steps`` steps, if set, and when stopped by a signal)
    <output_dir>/epoch_<E>/           (end of every epoch)
        gist_adapter.safetensors      gist rows + LoRA weights, with the gist metadata
        recipe_state.safetensors      optimizer state, RNG state, step/epoch, data-loader position, settings
        hf_merged/                    merged Hugging Face export (end of epoch, ``save_merged_hf: True``)

SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) during training finishes the optimizer step under way,
saves ``step_<N>`` and returns; a second Ctrl-C (seconds later) stops at once.
"""

import inspect
import json
import math
import re
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config, training, utils
from torchtune.config._utils import _get_component_from_path
from torchtune.datasets import ConcatDataset
from torchtune.recipe_interfaces import FTRecipeInterface
from torchtune.utils._import_guard import _SUPPORTS_FLEX_ATTENTION
from tqdm import tqdm

from torchtune_gist._checks import as_positive_int, is_whole
from torchtune_gist._io import (
    atomic_save_safetensors,
    leftover_directory_of,
    partial_directory,
    replace_directory,
    unwritable_reason,
)
from torchtune_gist.checkpointing import (
    check_gist_adapter,
    check_not_merged_export,
    export_merged_hf,
    gist_adapter_path,
    gist_adapter_state_dict,
    read_gist_adapter_metadata,
    save_gist_adapter,
)
from torchtune_gist.data import PackedGistDataset, padded_gist_collate
from torchtune_gist.gist_tokens import gist_token_ids
from torchtune_gist.masks import MASK_MODES
from torchtune_gist.modules import get_gist_embedding, initial_gist_rows, output_at, state_dict_name

log = utils.get_logger("INFO")

ADAPTER_FILE = "gist_adapter.safetensors"
RECIPE_STATE_FILE = "recipe_state.safetensors"
_CHECKPOINT_NAME = re.compile(r"^(step|epoch)_(\d+)$")
_TRAINABLE_KEY_PARTS = ("lora_a", "lora_b", "magnitude", "gist_embeddings")
_MODEL_INPUTS = ("tokens", "mask", "input_pos")
# How the gist mask reaches attention: dense [b, s, s], FlexAttention BlockMask, or causal segments.
MASK_FORMATS = ("dense", "block", "segments")
# mask_format=auto without FlexAttention: segments from this row length (CPU SDPA's causal kernel skips key
# blocks of 512, so shorter rows gain nothing from segments and pay their per-row calls), dense below.
SEGMENT_MIN_LEN = 512
# torchtune recipe features (config key, the setting that turns it on) that the gist recipes do not implement.
_UNSUPPORTED_FEATURES = (("enable_activation_offloading", True), ("optimizer_in_bwd", True), ("profiler.enabled", True))
# mask_format=block: padded batches are padded to a multiple of FlexAttention's block size, so that torchtune's
# compiled flex_attention (dynamic=False) compiles once per multiple, not once per batch length.
FLEX_BLOCK_SIZE = 128


def get_device(device: Optional[str]) -> torch.device:
    """torchtune's ``utils.get_device``, but ``cuda`` on a machine without CUDA is a clear error (torchtune
    falls back to the CPU, where a bf16 config then fails with a message about bf16), and so is a name that is
    not a device (``gpu``: torch's own message lists twenty device types)."""
    if device is not None:
        parse_device(device, " (or null to pick one)")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device} but this machine has no CUDA GPU: run on one, or set device=cpu")
    return utils.get_device(device=device)


def parse_device(device: str, hint: str = "") -> torch.device:
    """``torch.device(device)``, or a ValueError naming ``device`` (with ``hint`` after the choices) for a name that is
    not a device."""
    try:
        return torch.device(str(device))
    except RuntimeError:
        raise ValueError(f"device={device!r} is not a device: use cpu, cuda or cuda:N{hint}") from None


def check_setting_types(cfg: DictConfig) -> None:
    """Check the settings torchtune would otherwise reject deep inside its own code, or take silently: ``seed`` (a
    whole number or null), ``optimizer.lr`` and ``clip_grad_norm`` (numbers > 0; the latter may be null),
    ``lr_scheduler.num_warmup_steps`` (a whole number >= 0) and ``checkpointer.model_type`` (one of torchtune's).

    Raises:
        ValueError: naming the key and what it takes.
    """
    seed = cfg.get("seed")
    if seed is not None and not is_whole(seed, 0):
        raise ValueError(f"seed={seed!r} must be a whole number >= 0, or null for a random one")
    numbers = (("optimizer.lr", cfg.get("optimizer", {}).get("lr"), ""),
               ("clip_grad_norm", cfg.get("clip_grad_norm"), ", or null for no clipping"))
    for key, value, alternative in numbers:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ValueError(f"{key}={value!r} must be a number > 0{alternative}")
    warmup = cfg.get("lr_scheduler", {}).get("num_warmup_steps")
    if warmup is not None and not is_whole(warmup, 0):
        raise ValueError(f"lr_scheduler.num_warmup_steps={warmup!r} must be a whole number >= 0")
    model_type = cfg.get("checkpointer", {}).get("model_type")
    known = [m.name for m in training.ModelType]
    if model_type is not None and str(model_type) not in known:
        raise ValueError(f"checkpointer.model_type={model_type!r} is not one of torchtune's model types: {', '.join(known)}")


def check_gist_setup(model: nn.Module, tokenizer: Any, num_gist_tokens: int, mask_mode: str) -> List[int]:
    """Check that model, tokenizer and configuration agree on the gist tokens; return the gist ids.

    Raises:
        ValueError: for an unknown mask mode, a model that is not gist-aware, or a model whose K or
            gist ids differ from the configuration's and the tokenizer's.
    """
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode={mask_mode!r} is not one of {', '.join(MASK_MODES)}")
    emb = get_gist_embedding(model)
    ids = gist_token_ids(tokenizer, num_gist_tokens)
    if emb.num_gist_tokens != num_gist_tokens:
        raise ValueError(
            f"the model has {emb.num_gist_tokens} gist tokens but num_gist_tokens={num_gist_tokens} in the "
            "configuration: set model.num_gist_tokens and dataset.num_gist_tokens from one value"
        )
    if list(emb.gist_token_ids) != ids:
        raise ValueError(f"the model's gist ids {list(emb.gist_token_ids)} differ from the tokenizer's {ids}")
    return ids


def check_base_keys(missing: List[str], unexpected: List[str]) -> None:
    """Check a base-model load: only gist rows and LoRA weights may be missing, nothing unexpected.

    Raises:
        ValueError: naming the offending keys.
    """
    bad_missing = [k for k in missing if not any(part in k for part in _TRAINABLE_KEY_PARTS)]
    if bad_missing or unexpected:
        raise ValueError(
            "the base checkpoint does not fit the model: "
            f"missing base weights {bad_missing[:8]}{'...' if len(bad_missing) > 8 else ''}, "
            f"unexpected keys {list(unexpected)[:8]}{'...' if len(unexpected) > 8 else ''}"
        )


def check_base_shapes(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """Refuse base weights of another model size before anything loads them.

    Raises:
        ValueError: naming the first mismatched weights and the two config keys that must agree.
    """
    ours = {**dict(model.named_parameters()), **dict(model.named_buffers())}  # not state_dict(): QLoRA's dequantises
    wrong = [
        f"{k}: checkpoint {list(v.shape)} vs model {list(ours[k].shape)}"
        for k, v in state_dict.items()
        if k in ours and tuple(v.shape) != tuple(ours[k].shape)
    ]
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise ValueError(
            f"the base checkpoint does not fit the model: {'; '.join(wrong[:3])}{more}. The checkpointer "
            "(checkpointer.checkpoint_dir) and the model builder (model._component_) must be of the same model size"
        )


def initialize_dora_magnitudes(model: nn.Module) -> None:
    """Set every DoRA magnitude from the loaded base weights (and the LoRA weights), as torchtune's recipes do.

    Call it after the base weights load and before an adapter loads (a trained magnitude then wins).
    """
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "initialize_dora_magnitude"):
                m.initialize_dora_magnitude()


def load_base_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """Load base weights into a gist-aware model (gist rows and LoRA stay as they are) and initialise DoRA.

    Raises:
        ValueError: as :func:`check_base_keys`.
    """
    check_base_shapes(model, state_dict)
    check_base_keys(*model.load_state_dict(state_dict, strict=False))
    initialize_dora_magnitudes(model)


#: The top-level keys each recipe reads without a default; the others are optional.
TRAINING_KEYS = (
    "model", "tokenizer", "checkpointer", "dataset", "optimizer", "lr_scheduler", "loss", "metric_logger",
    "output_dir", "num_gist_tokens", "epochs", "batch_size", "gradient_accumulation_steps", "shuffle", "seed",
    "device", "dtype",
)
GENERATE_KEYS = ("model", "tokenizer", "checkpointer", "num_gist_tokens", "prompt_transform", "max_new_tokens",
                 "temperature", "device", "dtype")


def check_required_keys(cfg: DictConfig, keys: Tuple[str, ...], recipe: str, example: str) -> None:
    """Raise naming every key of ``keys`` the config lacks (a generation config given to a training recipe, or the
    other way round), before anything reads them.

    Raises:
        ValueError: naming the missing keys, the recipe and a config to start from.
    """
    missing = [key for key in keys if key not in cfg]
    if missing:
        raise ValueError(
            f"the config has no {', '.join(missing)}, which {recipe} reads: is it a config for another recipe? "
            f"Start from one like {example}"
        )


def check_supported_features(cfg: DictConfig) -> None:
    """Refuse torchtune recipe features that the gist recipes do not implement (rather than ignore them).

    Raises:
        ValueError: naming the config key to remove.
    """
    for key, on in _UNSUPPORTED_FEATURES:
        if OmegaConf.select(cfg, key, default=None) == on:
            raise ValueError(
                f"{key}={on} is a torchtune recipe feature that the gist recipes do not implement: "
                f"remove {key} from the config or set it to {not on}"
            )
    if cfg.get("run_val_every_n_steps") and cfg.get("validation_dataset") is None:
        raise ValueError(
            f"run_val_every_n_steps={cfg.run_val_every_n_steps} but no validation_dataset is configured: "
            "add a validation_dataset or set run_val_every_n_steps=null"
        )


def _missing_path_message(key: str, value: str, want_dir: bool) -> Optional[str]:
    path = Path(value)
    if path.is_dir() if want_dir else path.is_file():
        return None
    where = "" if path.is_absolute() else f" (relative to the current directory {Path.cwd()})"
    what = "a directory" if want_dir else "a file"
    return f"{key}: {value}{where} is not {what}"


#: How to point a recipe's config key at a file: ``tune run`` takes overrides after the config.
RECIPE_OVERRIDE_HINT = "or point a key elsewhere on the command line (KEY=PATH)"


def check_input_files(
    cfg: DictConfig, sections: Tuple[str, ...] = ("tokenizer", "checkpointer"), *, hint: str = RECIPE_OVERRIDE_HINT
) -> None:
    """Check that the files a config reads exist before anything is built: the tokenizer's files (its keys ending
    in ``path`` or ``file``) and the checkpointer's ``checkpoint_dir`` and ``checkpoint_files`` (when a list).
    ``hint`` says how the caller's users point a key elsewhere.

    Raises:
        FileNotFoundError: naming every missing file with its config key and how to point the key elsewhere.
    """
    problems = []
    tokenizer = cfg.get("tokenizer") if "tokenizer" in sections else None
    for key, value in (tokenizer or {}).items():
        if isinstance(value, str) and key != "_component_" and key.endswith(("path", "file")):
            problems.append(_missing_path_message(f"tokenizer.{key}", value, want_dir=False))
    checkpointer = cfg.get("checkpointer") if "checkpointer" in sections else None
    if checkpointer is not None and checkpointer.get("checkpoint_dir") is not None:
        directory = str(checkpointer.checkpoint_dir)
        problems.append(_missing_path_message("checkpointer.checkpoint_dir", directory, want_dir=True))
        files = checkpointer.get("checkpoint_files")
        if problems[-1] is None and isinstance(files, (list, ListConfig)):
            problems += [
                _missing_path_message("checkpointer.checkpoint_files", str(Path(directory) / str(f)), want_dir=False)
                for f in files
            ]
    problems = [p for p in problems if p is not None]
    if problems:
        raise FileNotFoundError(
            "\n  ".join(["the config names files that are not there:", *problems])
            + f"\nThe config's header comments say how to make or download them; {hint}."
        )


def build_tokenizer(cfg: DictConfig) -> Any:
    """The config's ``tokenizer`` section, instantiated.

    Raises:
        ValueError: naming the section's component and files when the tokenizer cannot read them (a file of another
            kind: a ``tokenizer.json`` given to the Llama 3 tokenizer, weights, a malformed special-tokens file).
    """
    section = cfg.tokenizer
    try:
        return config.instantiate(section)
    except Exception as e:  # tiktoken, json and the tokenizers library each raise their own kind
        files = ", ".join(
            f"tokenizer.{key}={value}" for key, value in section.items() if isinstance(value, str) and key != "_component_"
        )
        raise ValueError(
            f"{section.get('_component_')} could not be built from {files or 'its settings'}: {e}\n"
            "Is each file the kind this tokenizer reads? (Llama 3.1: original/tokenizer.model; SmolLM2: tokenizer.json)"
        ) from e


def count_setting(cfg: DictConfig, key: str, *, default: Optional[int] = None, optional: bool = False) -> Optional[int]:
    """``cfg[key]`` as a whole number >= 1 (``default`` when absent; ``None`` allowed when ``optional``).

    Raises:
        ValueError: naming the key, for anything else (0, -1, 2.5, "abc", True).
    """
    value = cfg.get(key, default)
    if value is None and optional:
        return None
    count = as_positive_int(value)
    if count is None:
        raise ValueError(f"{key}={value!r} must be a whole number >= 1" + (" (or null)" if optional else ""))
    return count


def check_collate_fn(collate_fn: Callable[..., Any], name: str, kwargs: Dict[str, Any]) -> None:
    """Check that ``collate_fn`` takes the keyword arguments the gist recipes pass (``gist_token_ids``, ...).

    Raises:
        ValueError: naming ``collate_fn`` and the two gist collators.
    """
    params = inspect.signature(collate_fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    missing = [k for k in kwargs if k not in params]
    if missing:
        raise ValueError(
            f"collate_fn={name} does not take {', '.join(missing)}: the gist recipes build the gist mask in the "
            "collator; set collate_fn to torchtune_gist.data.padded_gist_collate (packed datasets: "
            "torchtune_gist.data.packed_gist_collate), or remove collate_fn"
        )


def check_dataset_gist_ids(dataset: Any, cfg_dataset: DictConfig, key: str, model_ids: List[int]) -> None:
    """Check that a dataset lays out the model's gist ids: its ``gist_token_ids`` (the gist datasets'), or else
    (packed datasets) the ``num_gist_tokens`` of its config; a dataset with neither is not checked.

    Raises:
        ValueError: naming both values and the fix.
    """
    ids = getattr(dataset, "gist_token_ids", None)
    fix = f"set {key}.num_gist_tokens and model.num_gist_tokens from one num_gist_tokens (${{num_gist_tokens}})"
    if ids is not None:
        if list(ids) != list(model_ids):
            raise ValueError(
                f"{key} lays out {len(ids)} gist tokens {list(ids)}, but the model has {len(model_ids)} "
                f"{list(model_ids)}: {fix}"
            )
    elif cfg_dataset.get("num_gist_tokens") is not None and cfg_dataset.num_gist_tokens != len(model_ids):
        raise ValueError(f"{key}.num_gist_tokens={cfg_dataset.num_gist_tokens}, but the model has {len(model_ids)} gist tokens: {fix}")


def check_adapter_state(model: nn.Module, adapter_state_dict: Dict[str, torch.Tensor]) -> None:
    """Check that gist rows / LoRA weights to load fit ``model`` (names and shapes).

    Raises:
        TypeError: if the model is not gist-aware.
        ValueError: naming the keys that the model lacks or whose shapes differ (for instance a
            checkpoint trained with another K).
    """
    get_gist_embedding(model)
    shapes = {state_dict_name(n): tuple(p.shape) for n, p in model.named_parameters()}
    unknown = [k for k in adapter_state_dict if k not in shapes]
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {shapes[k]}" for k, v in adapter_state_dict.items() if k in shapes and tuple(v.shape) != shapes[k]]
    if unknown or wrong:
        raise ValueError(f"the gist/LoRA checkpoint does not fit the model: unknown keys {unknown[:8]}, shape mismatches {wrong[:8]}")


@dataclass(frozen=True)
class StartingAdapter:
    """The gist rows and LoRA weights a run starts from.

    Fresh gist rows carry no file; an ``initial_adapter`` or a resumed checkpoint also carries the config key that
    named it, its path and its safetensors metadata (K, gist ids, LoRA rank, alpha and DoRA), checked in full.
    """

    state_dict: Dict[str, torch.Tensor]
    key: Optional[str] = None
    path: Optional[Path] = None
    metadata: Optional[Dict[str, Any]] = None

    def check(self, model: nn.Module) -> None:
        """Raise ``ValueError`` (naming the config key) if ``model`` cannot load these weights."""
        if self.path is None:
            check_adapter_state(model, self.state_dict)
            return
        try:
            check_gist_adapter(model, self.path, self.metadata or {}, self.state_dict)
        except ValueError as e:
            raise ValueError(f"{self.key}: {e}") from e


def check_batch_length(batch: Dict[str, Any], max_seq_len: int, key: str) -> None:
    """Refuse a batch longer than the model's ``max_seq_len`` before the forward pass (torchtune's error names
    neither the data nor the settings to change).

    Raises:
        ValueError: naming ``key``'s settings that bound the row length.
    """
    length = batch["tokens"].shape[-1]
    if length > max_seq_len:
        raise ValueError(
            f"a {key} batch has rows of {length} tokens, beyond the model's max_seq_len={max_seq_len}: bound the rows "
            f"with {key}.max_seq_len (instruction data: longer records are truncated or dropped, see {key}.truncation) "
            f"or a smaller {key}.context_tokens (passkey data), or use a model built with a larger max_seq_len"
        )


def model_inputs(batch: Dict[str, Any]) -> Dict[str, Any]:
    """The keys of a gist batch that the model takes (``tokens``, ``mask``, ``input_pos``)."""
    return {k: batch[k] for k in _MODEL_INPUTS if k in batch}


def masked_loss(
    model: nn.Module, batch: Dict[str, Any], loss_fn: nn.Module, ignore_index: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward a gist batch (mask and positions included) and return ``(sum of losses, tokens)``.

    Labels are aligned with tokens and shifted here, torchtune's convention. The output projection
    runs only where a label is (:func:`~torchtune_gist.modules.output_at`), unless the model returns
    chunked logits for ``CEWithChunkedOutputLoss``. ``loss_fn`` averages over its labelled positions.
    """
    labels = batch["labels"]
    labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], ignore_index)], dim=1)
    labelled = labels != ignore_index
    num_tokens = labelled.sum()
    if getattr(model, "num_output_chunks", 0):
        return loss_fn(model(**model_inputs(batch)), labels) * num_tokens, num_tokens
    with output_at(model, labelled):
        logits = model(**model_inputs(batch))
    if logits.shape[0] == 0:
        return logits.sum(), num_tokens
    return loss_fn(logits, labels[labelled]) * num_tokens, num_tokens


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
    metadata = {"format": "torchtune-gist-recipe-state", "progress": json.dumps(progress), "optim": json.dumps(optim_meta)}
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
    """Delete what interrupted saves left under ``output_dir`` (``.step_N.partial``, ``.epoch_E.old``, ...);
    returns them."""
    leftovers = [
        d for d in Path(output_dir).glob(".*") if d.is_dir() and _CHECKPOINT_NAME.match(leftover_directory_of(d.name) or "")
    ]
    for d in leftovers:
        shutil.rmtree(d)
    return leftovers


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    """The complete checkpoint directory (``step_<N>`` or ``epoch_<E>``) under ``output_dir`` with the highest
    global step, if any; at equal steps the epoch's. Unreadable ones are skipped with a warning."""
    best: Tuple[Tuple[int, bool], Optional[Path]] = ((-1, False), None)
    for state_file in Path(output_dir).glob(f"*/{RECIPE_STATE_FILE}"):
        match = _CHECKPOINT_NAME.match(state_file.parent.name)
        if match is None or not (state_file.parent / ADAPTER_FILE).exists():
            continue
        try:
            step = read_recipe_progress(state_file).get("global_step", -1)
        except ValueError as e:
            log.warning(f"skipping {state_file.parent}: {e}")
            continue
        key = (step, match.group(1) == "epoch")
        if key > best[0]:
            best = (key, state_file.parent)
    return best[1]


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
        log.warning(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint (Ctrl-C again: at once)")

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class GistFinetuneRecipeBase(FTRecipeInterface):
    """Training loop, data, checkpoints and logging shared by the gist LoRA recipes.

    Subclasses build the model (:meth:`_setup_model`) and say how to reduce numbers across ranks and
    gather optimizer and model state (:meth:`_all_reduce`, :meth:`_full_state_dict`,
    :meth:`_optimizer_state_dict`, :meth:`_load_optimizer_state_dict`).

    Config keys (torchtune's where they share a name; no other key is read):

    - components: ``model``, ``tokenizer``, ``checkpointer`` (base weights), ``dataset`` (one or a list),
      ``validation_dataset`` (optional), ``collate_fn`` (a gist collator: ``torchtune_gist.data.padded_gist_collate``
      or ``packed_gist_collate``; default: the one that fits the dataset), ``optimizer``, ``lr_scheduler``,
      ``loss``, ``metric_logger``;
    - training: ``device``, ``dtype``, ``seed``, ``epochs``, ``max_steps_per_epoch``, ``batch_size``, ``shuffle``,
      ``gradient_accumulation_steps``, ``clip_grad_norm``, ``compile``, ``enable_activation_checkpointing``,
      ``run_val_every_n_steps`` (needs ``validation_dataset``), ``log_every_n_steps``, ``log_peak_memory_stats``;
    - checkpoints: ``output_dir``, ``save_every_n_steps``, ``save_merged_hf``, ``resume_from_checkpoint``
      (True: the latest complete checkpoint under ``output_dir``; ``auto``: that, or a fresh start when there is none,
      one command for a first launch and every requeue; or a checkpoint directory),
      ``base_model_name`` (recorded in the adapter; default ``model._component_``), ``initial_adapter`` (a gist
      adapter file or checkpoint directory whose weights this run starts from, with a fresh optimizer and
      schedule: train on short contexts first, then on long ones);
    - gist: ``num_gist_tokens`` (K; interpolate it into ``model.num_gist_tokens`` and ``dataset.num_gist_tokens``),
      ``mask_mode`` (``gist`` / ``pos_control`` / ``neg_control``), ``train_lora`` (False: gist rows alone),
      ``mask_format`` (``auto``: FlexAttention ``block`` masks on CUDA, else causal ``segments`` for batches of
      512 positions and more and ``dense`` below; or one of ``dense``, ``segments``, ``block`` always).

    torchtune features these recipes do not implement (``enable_activation_offloading``, ``optimizer_in_bwd``,
    ``profiler.enabled``) are refused when turned on.
    """

    def __init__(self, cfg: DictConfig) -> None:
        check_required_keys(cfg, TRAINING_KEYS, "a gist training recipe", "configs/llama3_1/8B_gist_lora.yaml")
        check_supported_features(cfg)
        check_setting_types(cfg)
        self._device = get_device(cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        if self._dtype == torch.float16:
            raise ValueError("fp16 training is not supported: use bf16 or fp32")
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self._is_rank_zero = self.rank == 0
        self._output_dir = Path(cfg.output_dir)
        self._num_gist_tokens = count_setting(cfg, "num_gist_tokens")
        self._mask_mode = str(cfg.get("mask_mode", "gist"))
        if self._mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode={self._mask_mode!r} is not one of {', '.join(MASK_MODES)}")
        self._compile = bool(cfg.get("compile", False))
        self._mask_format = self._resolve_mask_format(str(cfg.get("mask_format", "auto")))
        self._train_lora = bool(cfg.get("train_lora", True))
        self._log_every_n_steps = count_setting(cfg, "log_every_n_steps", default=1)
        self._log_peak_memory_stats = bool(cfg.get("log_peak_memory_stats", False)) and self._device.type == "cuda"
        self.seed = training.set_seed(seed=cfg.seed)
        self.total_epochs = count_setting(cfg, "epochs")
        self.max_steps_per_epoch = count_setting(cfg, "max_steps_per_epoch", optional=True)
        self._gradient_accumulation_steps = count_setting(cfg, "gradient_accumulation_steps")
        self._batch_size = count_setting(cfg, "batch_size")
        self._clip_grad_norm = cfg.get("clip_grad_norm", None)
        self._save_every_n_steps = count_setting(cfg, "save_every_n_steps", optional=True)
        self._save_merged_hf = bool(cfg.get("save_merged_hf", False))
        self._run_val_every_n_steps = count_setting(cfg, "run_val_every_n_steps", optional=True)
        self._resume_from_checkpoint = cfg.get("resume_from_checkpoint", False)
        self._enable_activation_checkpointing = bool(cfg.get("enable_activation_checkpointing", False))
        self._base_model_name = str(cfg.get("base_model_name", cfg.model._component_))
        self._base_checkpoint_dir = cfg.checkpointer.get("checkpoint_dir")
        self.epochs_run = 0
        self.global_step = 0
        self._batches_into_epoch = 0
        self.loss_history: List[Tuple[int, float]] = []
        self.stop_signal: Optional[int] = None  # set by train() when a signal stopped it

    # Hooks for the recipes.
    def _resolve_mask_format(self, mask_format: str) -> str:
        """``auto``: FlexAttention ``BlockMask``s where torchtune uses FlexAttention (CUDA); else, compiled,
        dense; else ``auto`` (segments for batches of ``SEGMENT_MIN_LEN`` positions and more, dense below)."""
        flex = self._device.type == "cuda" and _SUPPORTS_FLEX_ATTENTION
        if mask_format == "auto":
            return "block" if flex else "dense" if self._compile else "auto"
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format={mask_format!r} is not one of auto, {', '.join(MASK_FORMATS)}")
        if mask_format == "block" and not flex:
            raise ValueError("mask_format=block needs FlexAttention, which torchtune uses on CUDA only: use segments or dense")
        if mask_format == "segments" and self._compile:
            raise ValueError(
                "mask_format=segments does not compile (its per-row spans would recompile every batch): "
                "use mask_format=dense (or auto) with compile=True, or compile=False"
            )
        return mask_format

    def _setup_model(self, cfg_model: DictConfig, base_state_dict: Dict[str, torch.Tensor], adapter: StartingAdapter) -> nn.Module:
        """Build the model (:meth:`_build_model`), load base weights and ``adapter.state_dict``, set what trains."""
        raise NotImplementedError

    def _build_model(
        self, cfg_model: DictConfig, device: torch.device, adapter: StartingAdapter, base_state_dict: Dict[str, torch.Tensor]
    ) -> nn.Module:
        """Instantiate the model on ``device``; check it against the tokenizer, the gist settings, the base weights'
        shapes and the adapter to load (:meth:`StartingAdapter.check`)."""
        with training.set_default_dtype(self._dtype), device:
            model = config.instantiate(cfg_model)
        self._gist_ids = check_gist_setup(model, self._tokenizer, self._num_gist_tokens, self._mask_mode)
        check_base_shapes(model, base_state_dict)
        adapter.check(model)
        return model

    def _all_reduce(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def _from_rank_zero(self, value: Any) -> Any:
        """Rank 0's ``value`` (a picklable object) on every rank."""
        return value

    def _gather_objects(self, value: Any) -> List[Any]:
        """Every rank's ``value`` (a picklable object), in rank order, on every rank."""
        return [value]

    def _full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """The full model state dict for the merged export; ``None``: read it from the model."""
        return None

    def _optimizer_state_dict(self) -> Dict[str, Any]:
        """The optimizer state keyed by parameter names, on the CPU."""
        return get_optimizer_state_dict(self._model, self._optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _load_optimizer_state_dict(self, full_sd: Dict[str, Any]) -> None:
        set_optimizer_state_dict(self._model, self._optimizer, full_sd)

    def _log_info(self, message: str) -> None:
        utils.log_rank_zero(log, message)

    # Setup.
    def setup(self, cfg: DictConfig) -> None:
        """Build the tokenizer, model, optimizer, loss, data, scheduler; restore state when resuming."""
        check_input_files(cfg)
        check_not_merged_export(cfg.checkpointer.get("checkpoint_dir"))
        problem = unwritable_reason(self._output_dir, directory=True)
        if problem:
            raise ValueError(f"output_dir: {problem}: give a directory (created if missing)")
        if self._is_rank_zero:
            self._metric_logger = config.instantiate(cfg.metric_logger)
            self._metric_logger.log_config(cfg)
            for leftover in remove_leftover_checkpoints(self._output_dir):
                log.warning(f"removed {leftover}, left by an interrupted save")
        self._tokenizer = build_tokenizer(cfg)

        resume = self._find_resume_checkpoint()
        adapter: Optional[StartingAdapter] = None
        if resume is not None:
            if cfg.get("initial_adapter"):
                log.warning(f"initial_adapter is ignored: resuming from {resume} (give the next stage its own output_dir)")
            saved_seed = read_recipe_progress(resume / RECIPE_STATE_FILE).get("seed")
            if cfg.seed is None and saved_seed is not None:  # seed: null drew one; the data order needs the first run's
                self.seed = training.set_seed(seed=saved_seed)
            path = resume / ADAPTER_FILE
            adapter = StartingAdapter(load_file(str(path)), "resume_from_checkpoint", path, read_gist_adapter_metadata(path))
            self._log_info(f"Resuming from {resume}")
        elif cfg.get("initial_adapter"):
            adapter = self._load_initial_adapter(cfg.initial_adapter)
        base_sd = self._load_base_state_dict(cfg.checkpointer)
        if adapter is None:
            if "tok_embeddings.weight" not in base_sd:
                raise ValueError("the base checkpoint has no 'tok_embeddings.weight': cannot initialise the gist rows")
            rows = initial_gist_rows(base_sd["tok_embeddings.weight"], self._num_gist_tokens)
            adapter = StartingAdapter({"tok_embeddings.gist_embeddings": rows})
        self._model = self._setup_model(cfg.model, base_sd, adapter)
        del base_sd, adapter

        self._optimizer = config.instantiate(cfg.optimizer, [p for p in self._model.parameters() if p.requires_grad])
        self._loss_fn = config.instantiate(cfg.loss)
        if self._compile:
            self._loss_fn = training.compile_loss(self._loss_fn, verbose=self._is_rank_zero)
        if self._loss_fn.__class__.__name__ == "CEWithChunkedOutputLoss":
            self._model.set_num_output_chunks(self._loss_fn.num_output_chunks)

        self._dataloader = self._setup_data(cfg, "dataset", shuffle=cfg.shuffle, drop_last=True)
        self._val_dataloader = (
            self._setup_data(cfg, "validation_dataset", shuffle=False, drop_last=False)
            if cfg.get("validation_dataset") is not None
            else None
        )
        if self._mask_format == "block":
            if self._model.max_seq_len % FLEX_BLOCK_SIZE:
                raise ValueError(
                    f"mask_format=block pads batches to multiples of {FLEX_BLOCK_SIZE}, beyond the model's "
                    f"max_seq_len={self._model.max_seq_len}: use a multiple of {FLEX_BLOCK_SIZE}, or mask_format=dense"
                )
            self._allow_flex_recompiles(self._model.max_seq_len)
        self._settings = {
            "train_lora": self._train_lora,
            "batch_size": self._batch_size,
            "gradient_accumulation_steps": self._gradient_accumulation_steps,
            "world_size": self.world_size,
            "shuffle": bool(cfg.shuffle),
            "num_examples": len(self._dataloader.dataset),
            "seed": self.seed,
        }
        self._steps_per_epoch = len(self._dataloader) // self._gradient_accumulation_steps
        if self.max_steps_per_epoch is not None:
            self._steps_per_epoch = min(self._steps_per_epoch, self.max_steps_per_epoch)
        if self._steps_per_epoch < 1:
            raise ValueError(
                f"the dataset gives {len(self._dataloader)} batches per rank, fewer than gradient_accumulation_steps="
                f"{self._gradient_accumulation_steps}: use more data or a smaller batch"
            )
        if resume is not None:
            self._restore(resume)
        total_steps = self.total_epochs * self._steps_per_epoch
        warmup = cfg.lr_scheduler.get("num_warmup_steps")
        if isinstance(warmup, int) and warmup > total_steps and self._is_rank_zero:
            log.warning(f"lr_scheduler.num_warmup_steps={warmup} is more than the run's {total_steps} steps: the lr never reaches its peak")
        self._lr_scheduler = config.instantiate(
            cfg.lr_scheduler, self._optimizer, num_training_steps=total_steps, last_epoch=self.global_step - 1
        )
        self._ignore_index = self._loss_fn.ignore_index

    def _load_initial_adapter(self, path_or_dir: str) -> StartingAdapter:
        """Gist rows and LoRA weights to start from (a curriculum: short contexts first, then long ones).

        Only the weights: the optimizer, the lr schedule and the step count start afresh.

        K is checked here, before the base loads; the rest of its metadata against the model once built
        (:meth:`_build_model`).

        Raises:
            ValueError: a missing file, a file that is not a gist adapter, or one trained with another K.
        """
        try:
            path = gist_adapter_path(path_or_dir)
            meta = read_gist_adapter_metadata(path)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"initial_adapter: {e}") from e
        k = meta.get("num_gist_tokens")
        if k != self._num_gist_tokens:
            raise ValueError(f"initial_adapter {path} holds K={k} gist rows; this run has num_gist_tokens={self._num_gist_tokens}")
        self._log_info(f"Starting from the gist adapter {path}")
        return StartingAdapter(load_file(str(path)), "initial_adapter", path, meta)

    def _find_resume_checkpoint(self) -> Optional[Path]:
        """The checkpoint to resume from, as rank 0 sees it (every rank reads that one), or ``None``."""
        setting = self._resume_from_checkpoint
        latest = str(setting).lower() in ("true", "auto")
        if not setting or latest:
            found, present = None, []
            if self._is_rank_zero and self._output_dir.is_dir():
                present = sorted(d.name for d in self._output_dir.iterdir() if d.is_dir() and _CHECKPOINT_NAME.match(d.name))
                found = latest_checkpoint(self._output_dir) if setting and present else None
            found, present = self._from_rank_zero((None if found is None else str(found), present))
            if not setting:
                if present:
                    self._log_info(
                        f"output_dir {self._output_dir} already holds {', '.join(present)}: this run's checkpoints replace "
                        "those of the same name (resume_from_checkpoint=auto would continue the newest instead)"
                    )
                return None
            if found is None and present:
                raise ValueError(
                    f"resume_from_checkpoint={setting}: {self._output_dir} holds {', '.join(present)} but no complete, "
                    "readable checkpoint (see the warnings above): move them away to start afresh, or set "
                    "resume_from_checkpoint to a checkpoint directory"
                )
            if found is None:
                if str(setting).lower() == "auto":
                    self._log_info(f"resume_from_checkpoint=auto: no checkpoint in {self._output_dir}, starting afresh")
                    return None
                raise ValueError(
                    f"resume_from_checkpoint is set but {self._output_dir} holds no complete checkpoint "
                    "(resume_from_checkpoint=auto starts afresh then)"
                )
            path = Path(found)
        else:
            path = Path(setting)
        missing = [name for name in (ADAPTER_FILE, RECIPE_STATE_FILE) if not (path / name).exists()]
        missing_by_rank = self._gather_objects(missing)  # every rank raises together, none waits in a collective
        if any(missing_by_rank):
            rank, names = next((r, m) for r, m in enumerate(missing_by_rank) if m)
            where = f" on rank {rank} (output_dir must be on a filesystem every node sees)" if rank else ""
            raise ValueError(f"cannot resume from {path}: {', '.join(names)} missing{where}")
        return path

    def _check_resume_settings(self, path: Path, saved: Dict[str, Any]) -> None:
        """Refuse a resume whose settings differ from the checkpoint's where they would train silently wrong:
        ``train_lora`` always; mid-epoch, what fixes the data order and position."""
        keys = ["train_lora"]
        if self._batches_into_epoch:
            keys += ["batch_size", "gradient_accumulation_steps", "world_size", "shuffle", "num_examples", "seed"]
        changed = [f"{k} was {saved[k]!r}, now {self._settings[k]!r}" for k in keys if k in saved and saved[k] != self._settings[k]]
        if changed:
            raise ValueError(
                f"cannot resume from {path}: {'; '.join(changed)}. Resume with the checkpoint's settings, or start a "
                f"new run from its weights with initial_adapter={path}"
            )

    def _load_base_state_dict(self, cfg_checkpointer: DictConfig) -> Dict[str, torch.Tensor]:
        checkpointer = config.instantiate(cfg_checkpointer, should_load_recipe_state=False)
        return checkpointer.load_checkpoint()[training.MODEL_KEY]

    def _setup_data(self, cfg: DictConfig, key: str, *, shuffle: bool, drop_last: bool) -> StatefulDataLoader:
        """The loader of the dataset(s) under config key ``key``, checked against the model's gist ids.

        Raises:
            ValueError: for datasets that disagree with the model on the gist ids, mix packed and unpacked
                rows, or are empty; or for a ``collate_fn`` that is not a gist collator (or does not fit).
        """
        listed = isinstance(cfg[key], ListConfig)
        cfg_parts = list(cfg[key]) if listed else [cfg[key]]
        names = [f"{key}[{i}]" for i in range(len(cfg_parts))] if listed else [key]
        parts = [config.instantiate(c, self._tokenizer) for c in cfg_parts]
        for part, cfg_part, name in zip(parts, cfg_parts, names):
            check_dataset_gist_ids(part, cfg_part, name, self._gist_ids)
        packed = {isinstance(d, PackedGistDataset) for d in parts}
        if len(packed) > 1:
            raise ValueError("the datasets must be all packed or all unpacked (set `packed` the same in each)")
        packed_rows = packed.pop()
        ds = ConcatDataset(parts) if len(parts) > 1 else parts[0]
        if len(ds) == 0:
            raise ValueError(f"{key} is empty: give it examples (or remove it)")
        collate_kwargs: Dict[str, Any] = {}
        if not packed_rows:
            collate_kwargs["ignore_idx"] = self._loss_fn.ignore_index
            if self._mask_format == "block":
                collate_kwargs["pad_to_multiple_of"] = FLEX_BLOCK_SIZE
        default_collate = "torchtune_gist.data.packed_gist_collate" if packed_rows else "torchtune_gist.data.padded_gist_collate"
        collate_name = cfg.get("collate_fn") or default_collate
        collate_fn = _get_component_from_path(collate_name)
        if packed_rows and collate_fn is padded_gist_collate:
            raise ValueError(
                "packed datasets need torchtune_gist.data.packed_gist_collate (or no collate_fn), "
                "not padded_gist_collate: it would let documents in a row attend to each other"
            )
        collate_kwargs.update(
            gist_token_ids=self._gist_ids,
            pad_id=self._tokenizer.pad_id,
            mask_mode=self._mask_mode,
            block_mask=self._mask_format == "block",
            block_mask_device=self._device,
            segment_mask=self._mask_format in ("segments", "auto"),
            segment_min_len=SEGMENT_MIN_LEN if self._mask_format == "auto" else 0,
        )
        check_collate_fn(collate_fn, collate_name, collate_kwargs)
        sampler = StatefulDistributedSampler(ds, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle, seed=self.seed)
        return StatefulDataLoader(
            dataset=ds,
            batch_size=self._batch_size,
            sampler=sampler,
            collate_fn=partial(collate_fn, **collate_kwargs),
            drop_last=drop_last,
            generator=torch.Generator().manual_seed(self.seed),  # a new iterator's draw leaves the global generator alone
        )

    def _allow_flex_recompiles(self, max_seq_len: int) -> None:
        """Let torchtune's compiled flex_attention (``dynamic=False``) compile for every padded batch length.

        Batches come in up to ``max_seq_len / 128`` lengths (and the validation batches' as many again), bounded by
        the model's ``max_seq_len`` (which :func:`check_batch_length` enforces; the tokenizer's does not bound passkey
        rows); past ``torch._dynamo.config.recompile_limit`` (8) dynamo would run FlexAttention unfused.
        """
        lengths = 2 * math.ceil(max_seq_len / FLEX_BLOCK_SIZE)
        if torch._dynamo.config.recompile_limit < lengths:
            torch._dynamo.config.recompile_limit = lengths
            self._log_info(f"torch._dynamo.config.recompile_limit raised to {lengths}: one flex_attention compile per length")

    def _rng_states(self) -> Dict[str, torch.Tensor]:
        """Every rank's generators, which a resumed run continues (LoRA dropout draws from them): the CPU's and,
        training there, the GPU's; rank 0's under ``cpu`` / ``cuda``, rank r's under ``cpu.rank<r>`` /
        ``cuda.rank<r>`` (gathered: call on every rank)."""
        own = {"cpu": torch.get_rng_state()}
        if self._device.type == "cuda":
            own["cuda"] = torch.cuda.get_rng_state(self._device)
        states: Dict[str, torch.Tensor] = {}
        for rank, rank_states in enumerate(self._gather_objects(own)):
            states.update({(name if rank == 0 else f"{name}.rank{rank}"): t for name, t in rank_states.items()})
        return states

    def _restore(self, path: Path) -> None:
        optim_sd, progress, rng = load_recipe_state(path / RECIPE_STATE_FILE)
        if progress["num_gist_tokens"] != self._num_gist_tokens:
            raise ValueError(f"{path} was trained with K={progress['num_gist_tokens']}, the config says {self._num_gist_tokens}")
        self.epochs_run, self.global_step = progress["epochs_run"], progress["global_step"]
        self._batches_into_epoch = progress["batches_into_epoch"]
        self._check_resume_settings(path, progress.get("settings", {}))
        self._load_optimizer_state_dict(optim_sd)
        suffix = f".rank{self.rank}" if self.rank else ""
        if f"cpu{suffix}" in rng:  # else a checkpoint of another world size, or from before ranks' states were saved
            torch.set_rng_state(rng[f"cpu{suffix}"])
            if self._device.type == "cuda" and f"cuda{suffix}" in rng:
                torch.cuda.set_rng_state(rng[f"cuda{suffix}"], self._device)
        self.loss_history = [tuple(x) for x in progress.get("loss_history", [])]
        if progress.get("dataloader") is not None:
            self._dataloader.load_state_dict(progress["dataloader"])

    # Training.
    def _batches(self, epoch: int) -> Iterator[Tuple[int, Dict[str, Any]]]:
        self._dataloader.sampler.set_epoch(epoch)
        start = self._batches_into_epoch
        for idx, batch in enumerate(self._dataloader, start=start):
            if idx // self._gradient_accumulation_steps >= self._steps_per_epoch:
                return
            check_batch_length(batch, self._model.max_seq_len, "dataset")
            utils.batch_to_device(batch, self._device)
            yield idx, batch

    def _stop_requested(self, local: bool) -> bool:
        """Whether any rank was asked to stop (every rank gets the same answer, so all stop at one step)."""
        if self.world_size == 1:
            return local
        return bool(self._all_reduce(torch.tensor(int(local), device=self._device)).item())

    def train(self) -> None:
        """Train for the configured epochs, checkpointing as configured; on SIGINT / SIGTERM save ``step_<N>`` after
        the step under way and return, with :attr:`stop_signal` set to the signal's number (any rank's)."""
        if self._device.type == "cuda":
            training.cleanup_before_training()
        with StopRequest() as stop:
            self._train(stop)

    def _train(self, stop: StopRequest) -> None:
        if self.epochs_run >= self.total_epochs:
            self._log_info(f"nothing to train: the run's epochs={self.total_epochs} are all done (raise epochs to train on)")
            return
        self._optimizer.zero_grad(set_to_none=True)
        running_loss, num_tokens = torch.zeros((), device=self._device), torch.zeros((), device=self._device, dtype=torch.long)
        t0 = time.perf_counter()
        for epoch in range(self.epochs_run, self.total_epochs):
            pbar = tqdm(
                total=self._steps_per_epoch,
                initial=self._batches_into_epoch // self._gradient_accumulation_steps,
                disable=not self._is_rank_zero,
                desc=f"epoch {epoch + 1}/{self.total_epochs}",
            )
            for idx, batch in self._batches(epoch):
                loss_sum, n = masked_loss(self._model, batch, self._loss_fn, self._ignore_index)
                loss_sum.backward()
                running_loss += loss_sum.detach()
                num_tokens += n
                self._batches_into_epoch = idx + 1
                if self._batches_into_epoch % self._gradient_accumulation_steps:
                    continue
                total_tokens = self._all_reduce(num_tokens.clone())
                total_loss = self._all_reduce(running_loss.clone())
                training.scale_grads(self._model, self.world_size / total_tokens.clamp(min=1))
                if self._clip_grad_norm is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(self._model.parameters(), max_norm=float(self._clip_grad_norm))
                self._optimizer.step()
                self._optimizer.zero_grad(set_to_none=True)
                self._lr_scheduler.step()
                self.global_step += 1
                loss = (total_loss / total_tokens.clamp(min=1)).item()
                self.loss_history.append((self.global_step, loss))
                pbar.update(1)
                pbar.set_postfix(loss=f"{loss:.4f}")
                if self.global_step % self._log_every_n_steps == 0 and self._is_rank_zero:
                    elapsed = time.perf_counter() - t0
                    metrics = {
                        "loss": loss,
                        "lr": training.get_lr(self._optimizer),
                        "tokens_per_second_per_gpu": float(total_tokens) / (elapsed * self.world_size),
                    }
                    if self._clip_grad_norm is not None:
                        metrics["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
                    if self._log_peak_memory_stats:
                        metrics.update(training.get_memory_stats(device=self._device))
                    self._metric_logger.log_dict(metrics, step=self.global_step)
                running_loss.zero_()
                num_tokens.zero_()
                t0 = time.perf_counter()
                if self._stop_requested(stop.requested):
                    # The quick way out: the validation due now is skipped, the merged export waits for the epoch's end.
                    self.save_checkpoint(f"step_{self.global_step}", end_of_epoch=False)
                    self._from_rank_zero(None)  # every rank waits until rank 0 has published it
                    pbar.close()
                    self.stop_signal = stop.signum or int(signal.SIGTERM)
                    self._log_info(f"Stopped at step {self.global_step}: resume_from_checkpoint=True continues from step_{self.global_step}")
                    return
                if self._run_val_every_n_steps and self.global_step % self._run_val_every_n_steps == 0:
                    self.validate()
                epoch_done = self._batches_into_epoch // self._gradient_accumulation_steps >= self._steps_per_epoch
                if not epoch_done and self._save_every_n_steps and self.global_step % self._save_every_n_steps == 0:
                    self.save_checkpoint(f"step_{self.global_step}", end_of_epoch=False)
            pbar.close()
            self.epochs_run = epoch + 1
            self._batches_into_epoch = 0
            self.save_checkpoint(f"epoch_{epoch}", end_of_epoch=True)

    @torch.no_grad()
    def validate(self) -> float:
        """Mean validation loss per supervised token over the validation split (every example, the last
        partial batch included)."""
        if self._val_dataloader is None:
            raise ValueError("validate() needs a validation_dataset in the config")
        self._model.eval()
        total, tokens = torch.zeros((), device=self._device), torch.zeros((), device=self._device, dtype=torch.long)
        for batch in self._val_dataloader:
            check_batch_length(batch, self._model.max_seq_len, "validation_dataset")
            utils.batch_to_device(batch, self._device)
            loss_sum, n = masked_loss(self._model, batch, self._loss_fn, self._ignore_index)
            total += loss_sum
            tokens += n
        self._model.train()
        val_loss = (self._all_reduce(total) / self._all_reduce(tokens).clamp(min=1)).item()
        if self._is_rank_zero:
            self._metric_logger.log_dict({"val_loss": val_loss}, step=self.global_step)
        return val_loss

    def save_checkpoint(self, name: str, *, end_of_epoch: bool) -> None:
        """Write the gist adapter and the recipe state (and the merged export at epoch ends)."""
        adapter = gist_adapter_state_dict(self._model)
        optim_sd = self._optimizer_state_dict()
        full_sd = self._full_state_dict() if end_of_epoch and self._save_merged_hf else None
        rng_states = self._rng_states()
        if not self._is_rank_zero:
            return
        directory = self._output_dir / name
        partial_dir = partial_directory(directory)
        save_gist_adapter(
            self._model, partial_dir, base_model=self._base_model_name, state_dict=adapter, extra_metadata={"mask_mode": self._mask_mode}
        )
        progress = {
            "epochs_run": self.epochs_run,
            "global_step": self.global_step,
            "batches_into_epoch": self._batches_into_epoch,
            "num_gist_tokens": self._num_gist_tokens,
            "seed": self.seed,
            "loss_history": self.loss_history,
            "dataloader": None if end_of_epoch else self._dataloader.state_dict(),
            "settings": self._settings,
        }
        save_recipe_state(partial_dir / RECIPE_STATE_FILE, optimizer_state=optim_sd, progress=progress, rng_states=rng_states)
        if end_of_epoch and self._save_merged_hf:
            export_merged_hf(self._model, partial_dir / "hf_merged", state_dict=full_sd, base_model=self._base_model_name,
                             base_dir=self._base_checkpoint_dir, mask_mode=self._mask_mode)
        replace_directory(partial_dir, directory)
        self._log_info(f"Saved checkpoint to {directory}")

    def run(self, cfg: DictConfig) -> Optional[int]:
        """``setup``, ``train`` and, whatever happens, ``cleanup``: a recipe's main. Returns the shell's exit code for
        a signal that stopped training (after its checkpoint), else ``None``."""
        try:
            self.setup(cfg)
            self.train()
        finally:
            self.cleanup()
        return 128 + self.stop_signal if self.stop_signal else None

    def cleanup(self) -> None:
        """Close the metric logger (safe after a failed or interrupted setup)."""
        if getattr(self, "_metric_logger", None) is not None:
            self._metric_logger.close()
