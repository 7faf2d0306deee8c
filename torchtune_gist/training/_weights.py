"""Loading base weights and a starting adapter into a gist-aware model, and checking that they fit it."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from torchtune_gist.checkpointing import check_gist_adapter
from torchtune_gist.gist_tokens import gist_token_ids
from torchtune_gist.masks import MASK_MODES
from torchtune_gist.modules import get_gist_embedding, state_dict_name

_TRAINABLE_KEY_PARTS = ("lora_a", "lora_b", "magnitude", "gist_embeddings")


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
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {shapes[k]}"
        for k, v in adapter_state_dict.items()
        if k in shapes and tuple(v.shape) != shapes[k]
    ]
    if unknown or wrong:
        raise ValueError(
            f"the gist/LoRA checkpoint does not fit the model: unknown keys {unknown[:8]}, shape mismatches {wrong[:8]}"
        )


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
