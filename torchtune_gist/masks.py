"""Gist attention masks (Mu et al., 2023), dense and as FlexAttention ``mask_mod`` / ``BlockMask``.

Semantics (``first`` / ``last`` are the first and last gist positions of a query's document),
on top of causality (``j <= i``), document boundaries and padding:

============  ==========================================================================
mode          query ``i`` after the gist span (``i > last``) may attend to key ``j`` when
============  ==========================================================================
gist          ``j >= first``: the gists and everything after them
neg_control   ``j > last``: nothing of the prompt and no gist (the paper's lower bound)
pos_control   any ``j``: the plain causal mask (the paper's upper bound)
============  ==========================================================================

Queries at or before ``last`` (the prompt and the gists) are plainly causal, and a document
without gist tokens gets the plain causal mask. Masks are True where attention is allowed and
include causality, because torchtune replaces its causal mask with any mask it is given.
Padding keys are never attended; every query attends at least to itself, so softmax never sees
an all-masked row.
"""

from typing import Callable, Collection, List, Literal, Optional, Sequence, Tuple, Union

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from torchtune_gist._checks import is_whole

MaskMode = Literal["gist", "pos_control", "neg_control"]
MASK_MODES: Tuple[str, ...] = ("gist", "pos_control", "neg_control")

_MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _check_inputs(
    tokens: torch.Tensor,
    gist_token_ids: Collection[int],
    mode: str,
    document_ids: Optional[torch.Tensor],
    pad_id: Optional[int],
) -> None:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor of shape [b, s], got {type(tokens).__name__}")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must have shape [b, s], got shape {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must hold integer token ids, got dtype {tokens.dtype}")
    if mode not in MASK_MODES:
        raise ValueError(f"unknown mask mode {mode!r}; expected one of {', '.join(MASK_MODES)}")
    if isinstance(gist_token_ids, torch.Tensor):
        gist_token_ids = gist_token_ids.tolist()
    if is_whole(gist_token_ids) or not isinstance(gist_token_ids, Collection):
        raise TypeError(f"gist_token_ids must be a list of the K gist token ids, got {gist_token_ids!r}")
    if len(gist_token_ids) == 0:
        raise ValueError("gist_token_ids is empty: at least one gist token id is needed")
    if not all(is_whole(t) for t in gist_token_ids):
        raise TypeError(f"gist_token_ids must be integers, got {list(gist_token_ids)!r}")
    gist_token_ids = [int(t) for t in gist_token_ids]
    if pad_id is not None and not is_whole(pad_id):
        raise TypeError(f"pad_id must be an integer token id or None, got {pad_id!r}")
    if pad_id is not None and int(pad_id) in gist_token_ids:
        raise ValueError(
            f"pad_id={pad_id} is one of the gist token ids {gist_token_ids}: the gists would count as padding"
        )
    if document_ids is not None:
        if not isinstance(document_ids, torch.Tensor) or document_ids.shape != tokens.shape:
            shape = tuple(document_ids.shape) if isinstance(document_ids, torch.Tensor) else None
            raise ValueError(f"document_ids must be a tensor shaped like tokens {tuple(tokens.shape)}, got {shape}")
        if document_ids.dtype.is_floating_point or document_ids.dtype == torch.bool:
            raise TypeError(f"document_ids must be integers, got dtype {document_ids.dtype}")
        if document_ids.device != tokens.device:
            raise ValueError(
                f"document_ids are on {document_ids.device} but tokens on {tokens.device}: put both on one device"
            )


def gist_span_bounds(
    tokens: torch.Tensor,
    gist_token_ids: Collection[int],
    *,
    document_ids: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-position bounds of the gist span of the position's document.

    Args:
        tokens (torch.Tensor): token ids, shape ``[b, s]``.
        gist_token_ids (Collection[int]): ids that count as gist tokens.
        document_ids (Optional[torch.Tensor]): ``[b, s]`` ids of packed documents; ``None`` means
            one document per row.

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: ``first`` and ``last``, each ``[b, s]`` (long): the first
        and last gist position of each position's document, or ``0`` and ``-1`` for documents
        without gist tokens (which makes every mode plainly causal there).

    Raises:
        ValueError: if a document's gist tokens are not one contiguous span.
    """
    b, s = tokens.shape
    ids = torch.as_tensor(list(gist_token_ids), dtype=tokens.dtype, device=tokens.device)
    is_gist = torch.isin(tokens, ids)
    pos = torch.arange(s, device=tokens.device).expand(b, s)
    if document_ids is None:
        doc = torch.zeros(b, s, dtype=torch.long, device=tokens.device)
    else:
        doc = torch.unique(document_ids, return_inverse=True)[1].view(b, s)
    n_docs = int(doc.max()) + 1 if doc.numel() else 1
    big = torch.full((b, n_docs), s, dtype=torch.long, device=tokens.device)
    first_doc = big.scatter_reduce(1, doc, torch.where(is_gist, pos, s), reduce="amin")
    last_doc = torch.full_like(big, -1).scatter_reduce(1, doc, torch.where(is_gist, pos, -1), reduce="amax")
    count_doc = torch.zeros_like(big).scatter_add(1, doc, is_gist.long())
    has_gist = count_doc > 0
    broken = has_gist & (count_doc != last_doc - first_doc + 1)
    if broken.any():
        row, d = (int(x) for x in broken.nonzero()[0])
        where = "" if document_ids is None else f", document {d}"
        at = pos[row][is_gist[row] & (doc[row] == d)].tolist()
        raise ValueError(
            f"gist tokens must form one contiguous span per example; row {row}{where} has gist tokens at positions {at}"
        )
    first_doc = torch.where(has_gist, first_doc, 0)
    return first_doc.gather(1, doc), last_doc.gather(1, doc)


def _allowed(
    q: torch.Tensor,
    kv: torch.Tensor,
    first_q: torch.Tensor,
    last_q: torch.Tensor,
    mode: str,
) -> torch.Tensor:
    """The gist rule for broadcastable query/key positions and the query's span bounds."""
    causal = kv <= q
    if mode == "pos_control":
        return causal
    after = q > last_q
    if mode == "gist":
        return causal & ~(after & (kv < first_q))
    return causal & ~(after & (kv <= last_q))


def make_gist_mask(
    tokens: torch.Tensor,
    gist_token_ids: Collection[int],
    *,
    pad_id: Optional[int] = None,
    mode: MaskMode = "gist",
    document_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Build the dense gist attention mask, causality included.

    Args:
        tokens (torch.Tensor): token ids, shape ``[b, s]``.
        gist_token_ids (Collection[int]): ids that count as gist tokens.
        pad_id (Optional[int]): padding id; padding keys are never attended. ``None``: no padding.
        mode (MaskMode): ``"gist"``, ``"pos_control"`` or ``"neg_control"``.
        document_ids (Optional[torch.Tensor]): ``[b, s]`` ids of packed documents (no attention
            across documents, one gist span per document); ``None`` means one document per row.

    Returns:
        torch.Tensor: bool mask of shape ``[b, s, s]``, True where query ``i`` may attend to key ``j``.

    Raises:
        ValueError: on a bad shape or mode, or gist tokens that are not contiguous.
        TypeError: on non-integer tokens or ids.

    Example:
        >>> make_gist_mask(torch.tensor([[1, 2, 9, 9, 3, 4]]), {9})[0].int()
        tensor([[1, 0, 0, 0, 0, 0],
                [1, 1, 0, 0, 0, 0],
                [1, 1, 1, 0, 0, 0],
                [1, 1, 1, 1, 0, 0],
                [0, 0, 1, 1, 1, 0],
                [0, 0, 1, 1, 1, 1]], dtype=torch.int32)
    """
    _check_inputs(tokens, gist_token_ids, mode, document_ids, pad_id)
    b, s = tokens.shape
    first, last = gist_span_bounds(tokens, gist_token_ids, document_ids=document_ids)
    q = torch.arange(s, device=tokens.device).view(1, s, 1)
    kv = q.view(1, 1, s)
    mask = _allowed(q, kv, first.unsqueeze(-1), last.unsqueeze(-1), mode).expand(b, s, s).clone()
    if document_ids is not None:
        mask &= document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)
    if pad_id is not None:
        mask &= (tokens != pad_id).unsqueeze(1)
        mask |= torch.eye(s, dtype=torch.bool, device=tokens.device)
    return mask


def gist_mask_mod(
    tokens: torch.Tensor,
    gist_token_ids: Collection[int],
    *,
    pad_id: Optional[int] = None,
    mode: MaskMode = "gist",
    document_ids: Optional[torch.Tensor] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> _MaskMod:
    """The gist mask as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool``.

    Same arguments and semantics as :func:`make_gist_mask`; the returned function closes over
    ``[b, s]`` tensors on ``device`` (default ``tokens.device``).
    """
    _check_inputs(tokens, gist_token_ids, mode, document_ids, pad_id)
    device = device if device is not None else tokens.device
    first, last = (t.to(device) for t in gist_span_bounds(tokens, gist_token_ids, document_ids=document_ids))
    not_pad = (tokens != pad_id).to(device) if pad_id is not None else None
    docs = document_ids.to(device) if document_ids is not None else None

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        allowed = _allowed(q_idx, kv_idx, first[b, q_idx], last[b, q_idx], mode)
        if docs is not None:
            allowed = allowed & (docs[b, q_idx] == docs[b, kv_idx])
        if not_pad is not None:
            allowed = (allowed & not_pad[b, kv_idx]) | (q_idx == kv_idx)
        return allowed

    return mask_mod


def make_gist_block_mask(
    tokens: torch.Tensor,
    gist_token_ids: Collection[int],
    *,
    pad_id: Optional[int] = None,
    mode: MaskMode = "gist",
    document_ids: Optional[torch.Tensor] = None,
    block_size: Union[int, Tuple[int, int]] = 128,
    device: Optional[Union[str, torch.device]] = None,
) -> BlockMask:
    """The gist mask as a FlexAttention ``BlockMask`` (for CUDA training with FlexAttention).

    Same arguments and semantics as :func:`make_gist_mask`. The mask is shared by all heads.
    Build it on the device attention runs on: ``BlockMask.to`` moves the block tables but not the
    ``[b, s]`` tensors its ``mask_mod`` reads, so a mask built on the CPU and moved to a GPU fails there.

    Args:
        device (Optional[Union[str, torch.device]]): where the mask and the tensors its ``mask_mod``
            reads live. Default ``tokens.device``.

    Returns:
        BlockMask: for ``[b, 1, s, s]`` attention on ``device``.
    """
    device = device if device is not None else tokens.device
    mask_mod = gist_mask_mod(tokens, gist_token_ids, pad_id=pad_id, mode=mode, document_ids=document_ids, device=device)
    b, s = tokens.shape
    return create_block_mask(mask_mod, b, None, s, s, device=device, BLOCK_SIZE=block_size)


def document_ids_from_lengths(seq_lens: Sequence[Sequence[int]], seq_len: Optional[int] = None) -> torch.Tensor:
    """Document ids ``[b, s]`` for packed rows given each row's document lengths.

    Positions past a row's documents (padding) get an id of their own.

    Args:
        seq_lens (Sequence[Sequence[int]]): per row, the lengths of its packed documents.
        seq_len (Optional[int]): row length ``s``; defaults to the longest row.

    Returns:
        torch.Tensor: long tensor ``[b, s]``.
    """
    totals = [int(sum(lens)) for lens in seq_lens]
    s = seq_len if seq_len is not None else max(totals, default=0)
    if any(t > s for t in totals):
        raise ValueError(f"packed documents ({max(totals)} tokens) exceed the row length {s}")
    rows: List[torch.Tensor] = []
    for lens in seq_lens:
        lens_t = torch.as_tensor([int(n) for n in lens], dtype=torch.long)
        if (lens_t <= 0).any():
            raise ValueError(f"document lengths must be positive, got {list(lens)}")
        ids = torch.repeat_interleave(torch.arange(len(lens_t)), lens_t)
        rows.append(torch.cat([ids, torch.full((s - ids.numel(),), len(lens_t), dtype=torch.long)]))
    return torch.stack(rows) if rows else torch.zeros(0, s, dtype=torch.long)
