"""Gist fine-tuning logic shared by the ``gist_lora_single_device`` and ``gist_lora_distributed`` recipes.

- :mod:`._settings`: checks of a config made before anything is built (keys, setting types, device, files).
- :mod:`._weights`: base weights and a starting adapter loaded into a gist-aware model, and checked against it.
- :mod:`._loss`: the masked forward and loss of a gist batch.
- :mod:`._state`: recipe state files and the checkpoint directories under ``output_dir``.
- :mod:`._signals`: stopping cleanly, with a checkpoint, on SIGINT or SIGTERM.
- :mod:`._recipe`: :class:`GistFinetuneRecipeBase`, the loop both recipes run.
"""

from torchtune_gist.training._loss import masked_loss
from torchtune_gist.training._recipe import FLEX_BLOCK_SIZE, GistFinetuneRecipeBase
from torchtune_gist.training._settings import (
    FSDP_KEYS,
    GENERATE_KEYS,
    GENERATE_OPTIONAL_KEYS,
    RECIPE_OVERRIDE_HINT,
    build_tokenizer,
    check_components,
    check_dataset_gist_ids,
    check_input_files,
    check_known_keys,
    check_required_keys,
    check_setting_types,
    count_setting,
    flag_setting,
    get_device,
    parse_device,
)
from torchtune_gist.training._signals import StopRequest, wait_for_recipe
from torchtune_gist.training._state import (
    ADAPTER_FILE,
    RECIPE_STATE_FILE,
    latest_checkpoint,
    load_recipe_state,
    read_recipe_progress,
    save_recipe_state,
)
from torchtune_gist.training._weights import (
    StartingAdapter,
    check_base_keys,
    check_gist_setup,
    initialize_dora_magnitudes,
    load_base_weights,
)

__all__ = [
    "ADAPTER_FILE",
    "FLEX_BLOCK_SIZE",
    "FSDP_KEYS",
    "GENERATE_KEYS",
    "GENERATE_OPTIONAL_KEYS",
    "RECIPE_OVERRIDE_HINT",
    "RECIPE_STATE_FILE",
    "GistFinetuneRecipeBase",
    "StartingAdapter",
    "StopRequest",
    "build_tokenizer",
    "check_components",
    "check_base_keys",
    "check_dataset_gist_ids",
    "check_gist_setup",
    "check_input_files",
    "check_known_keys",
    "check_required_keys",
    "check_setting_types",
    "count_setting",
    "flag_setting",
    "get_device",
    "initialize_dora_magnitudes",
    "latest_checkpoint",
    "load_base_weights",
    "load_recipe_state",
    "masked_loss",
    "parse_device",
    "read_recipe_progress",
    "save_recipe_state",
    "wait_for_recipe",
]
