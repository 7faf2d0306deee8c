"""Collate gist examples into model batches with the gist attention mask.

Both collators return exactly ``tokens [b, s]``, ``labels [b, s]``, ``mask`` and ``input_pos [b, s]``
(so a recipe can call ``model(**batch)`` after popping ``labels``). ``mask`` is the dense bool
``[b, s, s]`` mask from :func:`~torchtune_gist.masks.make_gist_mask` (causality and padding included),
a FlexAttention ``BlockMask`` from :func:`~torchtune_gist.masks.make_gist_block_mask` with
``block_mask=True`` (CUDA only for training; build it there with ``block_mask_device``), or a
:class:`~torchtune_gist.segment_masks.GistSegmentMask` with ``segment_mask=True`` (causal SDPA per
segment: the fast choice where FlexAttention is not available, e.g. on CPU). Use them as a config ``collate_fn`` through
``functools.partial(padded_gist_collate, gist_token_ids=..., pad_id=..., mask_mode=...)``.
"""

from typing import Any, Collection, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask
from torch.nn.utils.rnn import pad_sequence
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

from torchtune_gist._checks import check_whole, is_whole
from torchtune_gist.masks import MASK_MODES, make_gist_block_mask, make_gist_mask
from torchtune_gist.segment_masks import GistSegmentMask, make_gist_segment_mask

_Mask = Union[torch.Tensor, BlockMask, GistSegmentMask]


def _ids(values: Sequence[int], what: str) -> torch.Tensor:
    """``values`` as a long tensor, or a ValueError naming ``what`` for values that are not integers."""
    ids = torch.as_tensor(values)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{what} must be integer ids, got dtype {ids.dtype}")
    return ids.long()


def _check_settings(gist_token_ids: Collection[int], pad_id: int, mask_mode: str) -> Tuple[List[int], int]:
    """The gist ids and ``pad_id`` as Python ints, or a ValueError naming the bad setting."""
    if mask_mode not in MASK_MODES:
        raise ValueError(f"unknown mask_mode {mask_mode!r}; expected one of {', '.join(MASK_MODES)}")
    ids = gist_token_ids.tolist() if isinstance(gist_token_ids, torch.Tensor) else gist_token_ids
    if is_whole(ids) or isinstance(ids, str) or not isinstance(ids, Collection):
        raise ValueError(f"gist_token_ids must be a list of the K gist token ids, got {gist_token_ids!r}")
    ids = list(ids)
    if not ids or not all(is_whole(t) for t in ids):
        raise ValueError(f"gist_token_ids must be a non-empty list of integer ids, got {gist_token_ids!r}")
    ids = [int(t) for t in ids]
    if not is_whole(pad_id):
        raise ValueError(f"pad_id must be an integer token id, got {pad_id!r}")
    if pad_id in ids:
        raise ValueError(f"pad_id={pad_id} is one of the gist token ids {ids}")
    return ids, int(pad_id)


def _mask(
    tokens: torch.Tensor,
    ids: List[int],
    pad_id: int,
    mask_mode: str,
    block_mask: bool,
    segment_mask: bool,
    segment_min_len: int,
    block_mask_device: Optional[Union[str, torch.device]],
    **kwargs: Any,
) -> _Mask:
    if block_mask and segment_mask:
        raise ValueError("ask for either block_mask or segment_mask, not both")
    if block_mask:
        return make_gist_block_mask(tokens, ids, pad_id=pad_id, mode=mask_mode, device=block_mask_device, **kwargs)
    build = make_gist_segment_mask if segment_mask and tokens.shape[1] >= segment_min_len else make_gist_mask
    return build(tokens, ids, pad_id=pad_id, mode=mask_mode, **kwargs)


def padded_gist_collate(
    batch: Sequence[Mapping[str, Any]],
    *,
    gist_token_ids: Collection[int],
    pad_id: int,
    ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX,
    mask_mode: str = "gist",
    block_mask: bool = False,
    segment_mask: bool = False,
    segment_min_len: int = 0,
    block_mask_device: Optional[Union[str, torch.device]] = None,
    pad_to_multiple_of: int = 1,
) -> Dict[str, _Mask]:
    """Right-pad a batch of examples and build the gist mask (each row its own gist span, or none).

    Args:
        batch (Sequence[Mapping[str, Any]]): examples with ``tokens`` and ``labels`` (same lengths);
            other keys are ignored.
        gist_token_ids (Collection[int]): the gist ids.
        pad_id (int): padding token id.
        ignore_idx (int): label padding. Default -100.
        mask_mode (str): ``"gist"``, ``"pos_control"`` or ``"neg_control"``.
        block_mask (bool): return a FlexAttention ``BlockMask`` instead of a dense mask.
        segment_mask (bool): return a ``GistSegmentMask`` instead of a dense mask, for batches of at
            least ``segment_min_len`` positions.
        segment_min_len (int): below this many positions, the dense mask even with ``segment_mask``. Default 0.
        block_mask_device (Optional[Union[str, torch.device]]): the device to build the ``BlockMask`` on,
            the one attention runs on (``BlockMask.to`` does not move what its ``mask_mod`` reads).
            Default: the tokens' device (the CPU in a data loader).
        pad_to_multiple_of (int): pad ``s`` up to a multiple of this (as torchtune's ``padded_collate_sft``):
            compiled FlexAttention compiles once per distinct ``s``, so BlockMask batches use 128. Default 1.

    Returns:
        Dict[str, _Mask]: ``tokens [b, s]``, ``labels [b, s]``,
        ``mask [b, s, s]`` (or ``BlockMask`` / ``GistSegmentMask``), ``input_pos [b, s]`` (``0..s-1`` per row).

    Raises:
        ValueError: on an empty batch, bad settings, mismatched tokens/labels, or a broken gist span.
    """
    ids, pad_id = _check_settings(gist_token_ids, pad_id, mask_mode)
    if len(batch) == 0:
        raise ValueError("cannot collate an empty batch")
    check_whole("pad_to_multiple_of", pad_to_multiple_of)
    for i, example in enumerate(batch):
        n_tok, n_lab = len(example["tokens"]), len(example["labels"])
        if n_tok == 0 or n_tok != n_lab:
            raise ValueError(f"batch example {i}: tokens ({n_tok}) and labels ({n_lab}) must be non-empty and equal")
    tokens = pad_sequence(
        [_ids(ex["tokens"], f"batch example {i}: tokens") for i, ex in enumerate(batch)],
        batch_first=True,
        padding_value=pad_id,
    )
    labels = pad_sequence(
        [_ids(ex["labels"], f"batch example {i}: labels") for i, ex in enumerate(batch)],
        batch_first=True,
        padding_value=ignore_idx,
    )
    extra = -tokens.shape[1] % pad_to_multiple_of
    if extra:
        tokens = F.pad(tokens, (0, extra), value=pad_id)
        labels = F.pad(labels, (0, extra), value=ignore_idx)
    b, s = tokens.shape
    return {
        "tokens": tokens,
        "labels": labels,
        "mask": _mask(tokens, ids, pad_id, mask_mode, block_mask, segment_mask, segment_min_len, block_mask_device),
        "input_pos": torch.arange(s).expand(b, s).clone(),
    }


def packed_gist_collate(
    batch: Sequence[Mapping[str, Any]],
    *,
    gist_token_ids: Collection[int],
    pad_id: int,
    mask_mode: str = "gist",
    block_mask: bool = False,
    segment_mask: bool = False,
    segment_min_len: int = 0,
    block_mask_device: Optional[Union[str, torch.device]] = None,
) -> Dict[str, _Mask]:
    """Stack rows of :class:`~torchtune_gist.data.PackedGistDataset` and build the packed gist mask.

    No attention crosses documents; each document has its own gist span (or none).

    Args:
        batch (Sequence[Mapping[str, Any]]): packed rows (``tokens``, ``labels``, ``input_pos``,
            ``document_ids``, all of one length).
        gist_token_ids (Collection[int]): the gist ids.
        pad_id (int): padding token id.
        mask_mode (str): ``"gist"``, ``"pos_control"`` or ``"neg_control"``.
        block_mask (bool): return a FlexAttention ``BlockMask`` instead of a dense mask.
        segment_mask (bool): return a ``GistSegmentMask`` instead of a dense mask, for batches of at
            least ``segment_min_len`` positions.
        segment_min_len (int): below this many positions, the dense mask even with ``segment_mask``. Default 0.
        block_mask_device (Optional[Union[str, torch.device]]): the device to build the ``BlockMask`` on,
            the one attention runs on (``BlockMask.to`` does not move what its ``mask_mod`` reads).
            Default: the tokens' device (the CPU in a data loader).

    Returns:
        Dict[str, _Mask]: ``tokens``, ``labels``, ``input_pos`` ``[b, s]``
        (positions restart at 0 per document) and ``mask`` ``[b, s, s]`` (or ``BlockMask`` / ``GistSegmentMask``).

    Raises:
        ValueError: on an empty batch, bad settings, or rows of different lengths.
    """
    ids, pad_id = _check_settings(gist_token_ids, pad_id, mask_mode)
    if len(batch) == 0:
        raise ValueError("cannot collate an empty batch")
    lengths = {len(row["tokens"]) for row in batch}
    if len(lengths) != 1:
        raise ValueError(f"packed rows must all have the same length, got lengths {sorted(lengths)}")
    out = {
        key: torch.stack([torch.as_tensor(row[key], dtype=torch.long) for row in batch])
        for key in ("tokens", "labels", "input_pos", "document_ids")
    }
    document_ids = out.pop("document_ids")
    out["mask"] = _mask(
        out["tokens"],
        ids,
        pad_id,
        mask_mode,
        block_mask,
        segment_mask,
        segment_min_len,
        block_mask_device,
        document_ids=document_ids,
    )
    return out
