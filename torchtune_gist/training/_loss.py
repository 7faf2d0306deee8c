"""The masked forward and loss of a gist batch."""

from typing import Any, Dict, Tuple

import torch
from torch import nn

from torchtune_gist.modules import output_at

_MODEL_INPUTS = ("tokens", "mask", "input_pos")


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
