"""Output projection at selected positions only: logits where a label is, not at every position.

Most positions of a gist batch carry no label (the prompt, the haystack, the gists, padding), yet a
decoder's forward projects every one of them onto the vocabulary, which is a fifth of a
SmolLM2-135M step's matrix work plus a ``[b, s, vocab]`` fp32 softmax. torchtune 0.6.1's
:class:`~torchtune.modules.TransformerDecoder` has no switch to skip its output layer, so
:func:`output_at` swaps ``model.output`` for the length of one forward pass, as
:func:`torchtune_gist.generation.store_attention` swaps attention. The projection module itself
(``nn.Linear``, ``LoRALinear``, ``TiedLinear``) is called unchanged, so FSDP2 still gathers and
frees its parameters with the root module's.
"""

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn
from torchtune.modules import TransformerDecoder


class SelectedOutput(nn.Module):
    """``projection(h[positions])``: the output projection at the True positions of ``positions`` only.

    Args:
        projection (Any): the model's output projection (``nn.Module`` or ``TiedLinear``).
        positions (torch.Tensor): bool ``[b, s]``.
    """

    def __init__(self, projection: Any, positions: torch.Tensor) -> None:
        super().__init__()
        self.projection = projection
        self.positions = positions

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """
        Args:
            h (torch.Tensor): the final-norm hidden states ``[b, s, d]``.

        Returns:
            torch.Tensor: ``[n, vocab]`` for the ``n`` selected positions, in row-major order.
        """
        return self.projection(h[self.positions])


@contextmanager
def output_at(model: TransformerDecoder, positions: torch.Tensor) -> Iterator[None]:
    """Within the context, ``model(...)`` returns fp32 logits ``[n, vocab]`` at the ``n`` True positions of
    ``positions``.

    Args:
        model (TransformerDecoder): a decoder with chunked output off (``num_output_chunks == 0``).
        positions (torch.Tensor): bool ``[b, s]``, the shape of the tokens fed to the model.

    Raises:
        ValueError: if the model returns chunked logits.
        RuntimeError: if the output projection is already swapped.
    """
    if getattr(model, "num_output_chunks", 0):
        raise ValueError("output_at needs whole logits: the model returns chunked output (num_output_chunks > 0)")
    original = model.output
    if isinstance(original, SelectedOutput):
        raise RuntimeError("the model's output projection is already restricted to selected positions")
    model.output = SelectedOutput(original, positions)
    try:
        yield
    finally:
        if not isinstance(original, nn.Module):  # TiedLinear: a plain attribute, not a child module
            del model.output
        model.output = original
