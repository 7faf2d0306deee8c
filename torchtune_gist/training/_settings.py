"""Checks of a recipe config made before anything is built: keys, setting types, devices, input files, the
tokenizer, the collator, the datasets' gist ids and batch lengths. Each names the config key to change."""

import difflib
import inspect
import re
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchtune import config, training, utils
from torchtune.config._errors import InstantiationError
from torchtune.config._utils import _get_component_from_path, _has_component

from torchtune_gist._checks import as_positive_int, is_whole

# torchtune recipe features (config key, the setting that turns it on) that the gist recipes do not implement.
_UNSUPPORTED_FEATURES = (("enable_activation_offloading", True), ("optimizer_in_bwd", True), ("profiler.enabled", True))


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
    numbers = (
        ("optimizer.lr", cfg.get("optimizer", {}).get("lr"), ""),
        ("clip_grad_norm", cfg.get("clip_grad_norm"), ", or null for no clipping"),
    )
    for key, value, alternative in numbers:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ValueError(f"{key}={value!r} must be a number > 0{alternative}")
    warmup = cfg.get("lr_scheduler", {}).get("num_warmup_steps")
    if warmup is not None and not is_whole(warmup, 0):
        raise ValueError(f"lr_scheduler.num_warmup_steps={warmup!r} must be a whole number >= 0")
    model_type = cfg.get("checkpointer", {}).get("model_type")
    known = [m.name for m in training.ModelType]
    if model_type is not None and str(model_type) not in known:
        raise ValueError(
            f"checkpointer.model_type={model_type!r} is not one of torchtune's model types: {', '.join(known)}"
        )


#: The top-level keys each recipe reads without a default; the others are optional.
TRAINING_KEYS = (
    "model",
    "tokenizer",
    "checkpointer",
    "dataset",
    "optimizer",
    "lr_scheduler",
    "loss",
    "metric_logger",
    "output_dir",
    "num_gist_tokens",
    "epochs",
    "batch_size",
    "gradient_accumulation_steps",
    "shuffle",
    "seed",
    "device",
    "dtype",
)
GENERATE_KEYS = (
    "model",
    "tokenizer",
    "checkpointer",
    "num_gist_tokens",
    "prompt_transform",
    "max_new_tokens",
    "temperature",
    "device",
    "dtype",
)

#: The optional top-level keys of the gist training recipes (torchtune's unsupported features are read to refuse them).
TRAINING_OPTIONAL_KEYS = (
    "validation_dataset",
    "collate_fn",
    "max_steps_per_epoch",
    "clip_grad_norm",
    "compile",
    "enable_activation_checkpointing",
    "run_val_every_n_steps",
    "log_every_n_steps",
    "log_peak_memory_stats",
    "save_every_n_steps",
    "keep_last_n_step_checkpoints",
    "save_merged_hf",
    "resume_from_checkpoint",
    "base_model_name",
    "initial_adapter",
    "mask_mode",
    "train_lora",
    "mask_format",
    "enable_activation_offloading",
    "optimizer_in_bwd",
    "profiler",
)
#: torchtune's FSDP settings, which the distributed recipe reads.
FSDP_KEYS = ("fsdp_cpu_offload", "fsdp_reshard_after_forward", "custom_sharded_layers")
#: The optional top-level keys of gist_generate.
GENERATE_OPTIONAL_KEYS = (
    "gist_checkpoint_dir",
    "prompt",
    "prompt_file",
    "input",
    "input_file",
    "inputs_file",
    "batch_size",
    "top_k",
    "compile",
    "save_cache",
    "load_cache",
    "outputs_file",
    "seed",
)

_INTERPOLATION = re.compile(r"\$\{\s*([A-Za-z_][\w-]*)")


def _interpolated_keys(node: Any) -> Set[str]:
    """The top-level keys that ``${key...}`` interpolations name anywhere in ``node`` (an unresolved container)."""
    if isinstance(node, dict):
        return set().union(*(_interpolated_keys(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_interpolated_keys(v) for v in node))
    return set(_INTERPOLATION.findall(node)) if isinstance(node, str) else set()


def check_known_keys(cfg: DictConfig, known: Iterable[str], recipe: str) -> None:
    """Refuse top-level keys that ``recipe`` does not read, so that a misspelt setting (``resume_from_checkpont``,
    ``batch_sze``) fails at once instead of being ignored. A key that an interpolation elsewhere reads
    (``num_gist_tokens: 4`` with ``${num_gist_tokens}``; ``data_dir``) is a variable and allowed.

    Raises:
        ValueError: naming each unknown key, with the known key it is closest to.
    """
    known = list(known)
    used = _interpolated_keys(OmegaConf.to_container(cfg, resolve=False))
    unknown = [str(key) for key in cfg.keys() if key not in known and key not in used]
    if not unknown:
        return
    problems = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
        problems.append(f"{key}" + (f" (did you mean {close[0]}?)" if close else ""))
    raise ValueError(
        f"{recipe} does not read {', '.join(problems)}: fix the spelling or remove "
        f"{'it' if len(unknown) == 1 else 'them'} from the config (a key that only ${{...}} interpolations read "
        f"is fine). It reads: {', '.join(sorted(known))}"
    )


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


def _component_sections(cfg: DictConfig) -> List[Tuple[str, DictConfig]]:
    """``(key, section)`` for each top-level section with a ``_component_``, and each such entry of a list."""
    sections = []
    for key, node in cfg.items():
        entries = (
            [(f"{key}[{i}]", n) for i, n in enumerate(node)] if isinstance(node, ListConfig) else [(str(key), node)]
        )
        sections += [(name, n) for name, n in entries if _has_component(n)]
    return sections


def check_components(cfg: DictConfig) -> None:
    """Check every ``_component_`` of the config against its signature before anything is built, so that a misspelt
    key or a builder of another kind fails at once, not after the base weights or the data have loaded: the component
    must import and take each of its section's keys (unless it takes ``**kwargs``). A model builder that takes no
    ``num_gist_tokens`` is named as not gist-aware.

    Raises:
        ValueError: naming each section, its component and the keys it does not take.
    """
    problems = []
    for key, section in _component_sections(cfg):
        path = section.get("_component_")
        try:
            component = _get_component_from_path(path)
            params = inspect.signature(component).parameters.values()
        except InstantiationError as e:
            problems.append(f"{key}._component_={path} cannot be imported: {' '.join(str(e).splitlines()[1:])}")
            continue
        except (TypeError, ValueError):  # a builtin without a signature: nothing to check
            continue
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            continue
        names = {p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
        unknown = [str(k) for k in section if k != "_component_" and k not in names]
        if key == "model" and "num_gist_tokens" in unknown:
            problems.append(
                f"model._component_={path} is not a gist-aware builder (it takes no num_gist_tokens): use one of "
                "torchtune_gist.models (lora_gist_llama3_1_8b, qlora_gist_llama3_1_8b, ...)"
            )
        elif unknown:
            problems.append(f"{key}: {path} takes no {', '.join(unknown)}")
    if problems:
        raise ValueError("\n  ".join(["the config's components do not fit their settings:", *problems]))


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
            f"tokenizer.{key}={value}"
            for key, value in section.items()
            if isinstance(value, str) and key != "_component_"
        )
        raise ValueError(
            f"{section.get('_component_')} could not be built from {files or 'its settings'}: {e}\n"
            "Is each file the kind this tokenizer reads? (Llama 3.1: original/tokenizer.model; SmolLM2: tokenizer.json)"
        ) from e


def flag_setting(cfg: DictConfig, key: str, *, default: bool = False) -> bool:
    """``cfg[key]`` as True or False (``default`` when absent).

    Raises:
        ValueError: naming the key, for anything else ("yes", 1, null).
    """
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{key}={value!r}: give True or False")
    return value


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
        raise ValueError(
            f"{key}.num_gist_tokens={cfg_dataset.num_gist_tokens}, but the model has {len(model_ids)} gist tokens: "
            f"{fix}"
        )


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
