"""A trained gist model's weights for inference, from a torchtune config: the base weights through the config's
checkpointer with a gist adapter on top, or a merged Hugging Face export alone. Used by the lm-eval model and
``gist_generate``, so both read the same checkpoints."""

import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from omegaconf import DictConfig
from torch import nn
from torchtune import config, training
from torchtune.modules import TiedLinear
from torchtune.modules.peft import DoRALinear, LoRALinear

from torchtune_gist.checkpointing import (
    ADAPTER_FILE,
    GIST_CONFIG_FILE,
    GIST_KEY,
    HF_CONFIG_FILE,
    HF_WEIGHTS_FILE,
    check_not_merged_export,
    load_gist_adapter,
    load_merged_hf,
)
from torchtune_gist.modules import get_gist_embedding
from torchtune_gist.training import RECIPE_OVERRIDE_HINT, check_base_keys, check_input_files, load_base_weights


def load_base(model: nn.Module, cfg: DictConfig, *, hint: str = RECIPE_OVERRIDE_HINT) -> None:
    """Load the base weights through ``cfg.checkpointer`` (``hint``: how the caller's users point a key elsewhere).

    Raises:
        ValueError: without a checkpointer section, or when it reads a merged export.
        FileNotFoundError: naming the checkpointer's missing files.
    """
    if "checkpointer" not in cfg:
        raise ValueError("the torchtune config has no checkpointer section to load the base weights with")
    check_input_files(cfg, sections=("checkpointer",), hint=hint)
    check_not_merged_export(cfg.checkpointer.get("checkpoint_dir"))
    load_base_weights(model, config.instantiate(cfg.checkpointer).load_checkpoint()[training.MODEL_KEY])


def is_merged_export(directory: Union[str, Path]) -> bool:
    """Whether ``directory`` holds a merged export (:func:`~torchtune_gist.checkpointing.export_merged_hf`)."""
    return all((Path(directory) / f).is_file() for f in (GIST_CONFIG_FILE, HF_CONFIG_FILE, HF_WEIGHTS_FILE))


def load_merged_export(model: nn.Module, directory: Union[str, Path]) -> Dict[str, Any]:
    """Load a merged Hugging Face export into the config's gist-aware model (LoRA/DoRA, if any, switched off);
    returns its ``gist_config.json``.

    The export holds the gist rows in its embedding at the gist ids and the original vocabulary in
    ``output.weight``; a tied model takes its vocabulary from the latter, so that the gist ids keep
    their vocabulary rows as output rows.

    Raises:
        ValueError: if the model quantises its base weights (QLoRA), or was built with other gist ids.
    """
    directory = Path(directory)
    quantized = [n for n, m in model.named_modules() if isinstance(m, (LoRALinear, DoRALinear)) and m._quantize_base]
    if quantized:
        raise ValueError(
            f"{directory} is a merged export, but the config's model quantises its base weights to NF4 "
            f"({quantized[0]}, ...): the merged weights would be quantised again, losing much of the fine-tune. Use a "
            "config with a non-quantised model (e.g. lora_gist_llama3_1_8b instead of qlora_gist_llama3_1_8b), or pass "
            f"the adapter directory (with {ADAPTER_FILE})"
        )
    emb = get_gist_embedding(model)
    saved = json.loads((directory / GIST_CONFIG_FILE).read_text())
    if saved.get("gist_token_ids") != emb.gist_token_ids:
        raise ValueError(
            f"{directory} was exported with gist ids {saved.get('gist_token_ids')}, but the model has "
            f"{emb.gist_token_ids}: set the config's num_gist_tokens to {saved.get('num_gist_tokens')}"
        )
    state = load_merged_hf(directory)
    vocab = state.pop("tok_embeddings.weight")
    output = state.pop("output.weight", None)
    state[GIST_KEY] = vocab[torch.tensor(emb.gist_token_ids)]
    if isinstance(model.output, TiedLinear):
        state["tok_embeddings.weight"] = (vocab if output is None else output)[: emb.num_embeddings]
    else:
        state["tok_embeddings.weight"] = vocab[: emb.num_embeddings]
        if output is not None:
            state["output.weight"] = output[: model.output.weight.shape[0]]
    missing, unexpected = model.load_state_dict(state, strict=False)
    check_base_keys(missing, unexpected)
    for module in model.modules():
        if isinstance(module, (LoRALinear, DoRALinear)):
            module.disabled = True
    return saved


def load_gist_checkpoint(
    model: nn.Module, cfg: DictConfig, checkpoint: Union[str, Path], *, key: str, hint: str = RECIPE_OVERRIDE_HINT
) -> Optional[str]:
    """Load a trained gist model: the base weights (``cfg.checkpointer``) and a gist adapter (a directory holding
    ``gist_adapter.safetensors``, or the file), or a merged export alone (its base weights are the export's).
    ``key`` names the setting that gave ``checkpoint``.

    Returns:
        Optional[str]: the ``mask_mode`` the checkpoint was trained with, if it records one.

    Raises:
        FileNotFoundError: if ``checkpoint`` does not exist.
        ValueError: if it is neither, or does not fit the model.
    """
    directory = Path(checkpoint)
    if not directory.exists():
        raise FileNotFoundError(f"{key}={str(directory)!r} does not exist")
    if directory.is_file() or (directory / ADAPTER_FILE).is_file():
        load_base(model, cfg, hint=hint)
        return load_gist_adapter(model, directory).get("mask_mode")
    if is_merged_export(directory):
        return load_merged_export(model, directory).get("mask_mode")
    raise ValueError(
        f"{key}={str(directory)!r} holds no gist rows: expected {ADAPTER_FILE} or the adapter file itself (base "
        f"weights from the config's checkpointer + gist rows and LoRA) or a merged export ({HF_WEIGHTS_FILE}, "
        f"{HF_CONFIG_FILE}, {GIST_CONFIG_FILE})"
    )
