"""Checking and padding the token inputs of compression and generation."""

from typing import Any, List, Optional, Sequence, Tuple

import torch
from torchtune.modules import TransformerDecoder

from torchtune_gist._checks import is_whole


def resolve_gist_token_ids(model: TransformerDecoder, gist_token_ids: Optional[Sequence[int]]) -> List[int]:
    """The gist ids to use: ``gist_token_ids`` if given, else ``model.tok_embeddings.gist_token_ids``.

    Raises:
        ValueError: if neither is available, the ids are empty or repeated, or they disagree
            with the model's own gist ids.
        TypeError: if ``model`` is not a torchtune decoder or an id is not an integer.
    """
    if not isinstance(model, TransformerDecoder):
        raise TypeError(f"expected a torchtune TransformerDecoder, got {type(model).__name__}")
    own = getattr(model.tok_embeddings, "gist_token_ids", None)
    if gist_token_ids is None:
        if own is None:
            raise ValueError("gist_token_ids is required: the model's tok_embeddings has no gist_token_ids attribute")
        gist_token_ids = own
    ids = gist_token_ids.tolist() if isinstance(gist_token_ids, torch.Tensor) else list(gist_token_ids)
    if not ids:
        raise ValueError("gist_token_ids is empty: at least one gist token is needed")
    if not all(is_whole(t) for t in ids):
        raise TypeError(f"gist_token_ids must be integers, got {ids!r}")
    ids = [int(t) for t in ids]
    if len(set(ids)) != len(ids):
        raise ValueError(f"gist_token_ids must be distinct, got {ids!r}")
    if own is not None and list(own) != ids:
        raise ValueError(f"gist_token_ids {ids} differ from the model's gist ids {list(own)}")
    return ids


def token_rows(rows: Any, name: str) -> List[List[int]]:
    """``rows`` (a list of token-id sequences or a ``[b, s]`` tensor) as a non-empty list of int lists.

    Raises:
        TypeError: if ``rows`` is not a batch of integer sequences.
        ValueError: if the batch is empty.
    """
    if isinstance(rows, torch.Tensor):
        if rows.dim() != 2:
            raise TypeError(
                f"{name} must be a [b, s] tensor or a list of token-id lists, got shape {tuple(rows.shape)}"
            )
        rows = rows.tolist()
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
        raise TypeError(f"{name} must be a list of token-id lists, got {type(rows).__name__}")
    out = []
    for i, row in enumerate(rows):
        row = row.tolist() if isinstance(row, torch.Tensor) else row
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise TypeError(f"{name}[{i}] must be a sequence of token ids, got {type(row).__name__}")
        if not all(is_whole(t) for t in row):
            raise TypeError(f"{name}[{i}] must hold integer token ids")
        out.append([int(t) for t in row])
    if not out:
        raise ValueError(f"{name} is empty")
    return out


def check_token_range(
    model: TransformerDecoder, rows: List[List[int]], gist_token_ids: Sequence[int], name: str
) -> None:
    """Raise a ValueError if a token id is negative or beyond the model's vocabulary (gist ids excepted)."""
    vocab = getattr(model.tok_embeddings, "num_embeddings", None)
    allowed = set(gist_token_ids)
    for i, row in enumerate(rows):
        bad = [t for t in row if t < 0 or (vocab is not None and t >= vocab and t not in allowed)]
        if bad:
            raise ValueError(f"{name}[{i}] has token ids outside the model's vocabulary of {vocab}: {bad[:5]}")


def check_pad_id(model: TransformerDecoder, pad_id: int) -> None:
    """Raise a ValueError if ``pad_id`` is not a token id of the model's vocabulary."""
    vocab = getattr(model.tok_embeddings, "num_embeddings", None)
    if not is_whole(pad_id) or pad_id < 0 or (vocab is not None and pad_id >= vocab):
        raise ValueError(f"pad_id={pad_id!r} is not a token id of the model's vocabulary of {vocab}")


def check_gist_suffix(prompts: List[List[int]], gist_token_ids: Sequence[int]) -> None:
    """Check that every prompt ends with the whole gist span ``gist_token_ids`` and has no other gist token.

    Raises:
        ValueError: naming the first bad row: no gist span, a span of another length (a batch
            mixing different K), a span out of order, or gist tokens elsewhere in the prompt.
    """
    ids = list(gist_token_ids)
    k, gist = len(ids), set(ids)
    for i, row in enumerate(prompts):
        at = [j for j, t in enumerate(row) if t in gist]
        if not at:
            raise ValueError(f"prompts[{i}] has no gist span: each prompt must end with the K={k} gist tokens {ids}")
        if at != list(range(len(row) - len(at), len(row))):
            raise ValueError(
                f"prompts[{i}] has gist tokens at positions {at} (length {len(row)}): the gist span must be "
                "contiguous and at the end of the prompt"
            )
        if len(at) != k:
            raise ValueError(f"prompts[{i}] ends with {len(at)} gist tokens but K={k} gist tokens {ids} are expected")
        if row[-k:] != ids:
            raise ValueError(f"prompts[{i}] ends with gist tokens {row[-k:]}, expected exactly {ids} in order")


def check_max_position(model: TransformerDecoder, last_position: int, what: str) -> None:
    """Raise a ValueError if absolute position ``last_position`` is beyond the model's ``max_seq_len``."""
    if last_position >= model.max_seq_len:
        raise ValueError(f"{what} reaches position {last_position}, beyond the model's max_seq_len={model.max_seq_len}")


def left_pad(
    rows: List[List[int]], start_pos: Sequence[int], pad_id: int, device: torch.device
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad ``rows`` so their last tokens align; row ``i``'s tokens take positions ``start_pos[i] + j``.

    Returns:
        Tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ``tokens [b, s]`` (long), ``input_pos [b, s]``
        (long; padding takes the row's first position, it is never attended) and ``valid [b, s]`` (bool).
    """
    s = max(len(r) for r in rows)
    tokens = torch.tensor([[pad_id] * (s - len(r)) + r for r in rows], dtype=torch.long, device=device)
    valid = torch.tensor([[False] * (s - len(r)) + [True] * len(r) for r in rows], device=device)
    offset = torch.as_tensor(list(start_pos), dtype=torch.long, device=device).unsqueeze(-1)
    input_pos = offset + (valid.long().cumsum(-1) - 1).clamp(min=0)
    return tokens, input_pos, valid


def model_device_dtype(model: TransformerDecoder) -> Tuple[torch.device, torch.dtype]:
    """The device and compute dtype (that of the token embedding) of ``model``."""
    weight = next(p for p in model.tok_embeddings.parameters() if p.is_floating_point())
    return weight.device, weight.dtype
