"""Gist masks as causal segments: the gist rule by slicing, so SDPA's causal kernel does the work.

With a dense ``[b, s, s]`` mask, CPU SDPA computes every query-key block and then masks it; with
``is_causal=True`` it skips the upper triangle. Every gist mode is a few causal blocks per document
(``a``/``e``: the document's first and past-the-end positions, ``f``/``l``: its first and last gist):

============  =====================================================================
mode          causal SDPA calls per document (queries = keys = the slice)
============  =====================================================================
gist          ``[a, l]`` (prompt and gists), then ``[f, e)`` keeping the queries after ``l``
neg_control   ``[a, l]``, then ``(l, e)``
pos_control   ``[a, e)`` (also any document without gists)
============  =====================================================================

so a gist step computes less attention than a causal one, and a packed row no more than its
documents would alone. CPU SDPA's causal kernel skips key blocks of 512, so this pays for rows of
about 512 positions and more (``benchmarks/RESULTS.md``: passkey rows of 1,058 tokens train nearly
as fast as with plain causal attention, where the dense gist mask loses about a quarter of the
throughput; the crossover lies between 418 and 546 positions); for short rows the dense mask is as
fast, and the recipes' ``mask_format: auto`` keeps it there. :class:`GistSegmentMask` carries this layout as a
``[b, s, s]`` bool tensor subclass without storage: torchtune passes it to ``F.scaled_dot_product_attention`` as
``attn_mask`` (after ``mask[:, None]``), which it intercepts the way :class:`torch.nn.attention.bias.CausalBias`
does. Non-padding queries get exactly the dense mask's attention
(:func:`~torchtune_gist.masks.make_gist_mask`); padding queries (which no query attends and no label
reads) get zeros. Padding must be a suffix of each row, and each document one run of positions.
"""

from typing import Any, Collection, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from torchtune_gist.masks import MaskMode, _check_inputs, gist_span_bounds

# One document: (start, end, first gist, last gist); first = last + 1 = 0 when it has no gist.
Span = Tuple[int, int, int, int]


class GistSegmentMask(torch.Tensor):
    """A gist attention mask ``[b, s, s]`` (or ``[b, 1, s, s]`` after ``mask[:, None]``) held as segments.

    Build it with :func:`make_gist_segment_mask`. Only ``F.scaled_dot_product_attention(q, k, v,
    attn_mask=mask)``, ``mask[:, None]``, ``.to(device)`` and :meth:`dense` are supported; any other
    operation raises ``TypeError``.

    Args:
        spans (Sequence[Sequence[Span]]): per row, its documents in order.
        pad_start (Sequence[int]): per row, where its padding begins (``s`` for none).
        mode (str): ``"gist"``, ``"pos_control"`` or ``"neg_control"``.
        seq_len (int): ``s``.
        device (torch.device): the device of the tensors it will meet.
        heads_dim (bool): whether the shape has the head dimension ``[b, 1, s, s]``.
    """

    spans: Tuple[Tuple[Span, ...], ...]
    pad_start: Tuple[int, ...]
    mode: str

    @staticmethod
    def __new__(
        cls,
        spans: Sequence[Sequence[Span]],
        pad_start: Sequence[int],
        mode: str,
        seq_len: int,
        device: torch.device,
        heads_dim: bool = False,
    ) -> "GistSegmentMask":
        shape = (len(spans), 1, seq_len, seq_len) if heads_dim else (len(spans), seq_len, seq_len)
        self = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=torch.bool, device=device)
        self.spans = tuple(tuple(row) for row in spans)
        self.pad_start = tuple(pad_start)
        self.mode = mode
        return self

    def _with(self, *, device: Optional[torch.device] = None, heads_dim: Optional[bool] = None) -> "GistSegmentMask":
        return GistSegmentMask(
            self.spans,
            self.pad_start,
            self.mode,
            self.shape[-1],
            device or self.device,
            self.dim() == 4 if heads_dim is None else heads_dim,
        )

    def blocks(self) -> List[Tuple[int, int, int, int]]:
        """The causal attention calls as ``(row, first query, first key, end)``: queries ``[q0, end)`` of
        the row attend causally within keys ``[k0, end)`` (query ``i`` to keys ``k0 .. i``)."""
        return [
            (r, *block)
            for r, row in enumerate(self.spans)
            for a, e, f, last in row
            for block in _blocks(a, e, f, last, self.mode)
        ]

    def dense(self) -> torch.Tensor:
        """The equivalent dense bool mask ``[b, s, s]``: what each query attends (padding queries: themselves)."""
        b, s = len(self.spans), self.shape[-1]
        out = torch.eye(s, dtype=torch.bool).repeat(b, 1, 1)
        for r, qa, ka, end in self.blocks():
            out[r, qa:end, ka:end] = torch.ones(end - ka, end - ka, dtype=torch.bool).tril()[qa - ka :]
        return out.to(self.device)

    def __repr__(self) -> str:  # type: ignore[override]
        return (
            f"GistSegmentMask(shape={tuple(self.shape)}, mode={self.mode!r}, spans={self.spans}, "
            f"pad_start={self.pad_start})"
        )

    @classmethod
    def __torch_function__(
        cls, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _segment_attention(*args, **kwargs)
        if func is torch.Tensor.__getitem__ and _is_head_unsqueeze(args[1]):
            return args[0]._with(heads_dim=True)
        if func is torch.Tensor.to:
            device = next(
                (torch.device(a) for a in (*args[1:], kwargs.get("device")) if isinstance(a, (str, torch.device))), None
            )
            return args[0]._with(device=device)
        if func in (torch.Tensor.dim, torch.Tensor.size) or getattr(func, "__name__", "") in ("__get__", "__repr__"):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        raise TypeError(
            f"GistSegmentMask supports only scaled_dot_product_attention, mask[:, None] and .to(); got {func}"
        )

    @classmethod
    def __torch_dispatch__(
        cls, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None
    ) -> Any:
        raise TypeError(f"GistSegmentMask holds no elements ({func}); use .dense() for a dense mask")


def _is_head_unsqueeze(index: Any) -> bool:
    """Whether ``index`` is ``[:, None]`` or ``[:, None, :, :]``, how torchtune adds the head dimension."""
    full = slice(None)
    return (
        isinstance(index, tuple)
        and len(index) >= 2
        and index[0] == full
        and index[1] is None
        and all(i == full for i in index[2:])
    )


def _blocks(a: int, e: int, f: int, last: int, mode: str) -> List[Tuple[int, int, int]]:
    """The causal blocks of one document as ``(first query, first key, end)``: queries ``[q0, end)``
    attend causally within keys ``[k0, end)`` (query ``i`` to keys ``k0 .. i``)."""
    if last < f or mode == "pos_control":
        return [(a, a, e)]
    blocks = [(a, a, last + 1)]
    if last + 1 < e:
        blocks.append((last + 1, f if mode == "gist" else last + 1, e))
    return blocks


def _segment_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: GistSegmentMask,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` under a :class:`GistSegmentMask`: causal SDPA per block.

    Args:
        query (torch.Tensor): ``[b, h, s, d]``.
        key (torch.Tensor): ``[b, h_kv, s, d]``.
        value (torch.Tensor): ``[b, h_kv, s, d_v]``.
        attn_mask (GistSegmentMask): the layout, ``[b, s, s]`` or ``[b, 1, s, s]``.

    Returns:
        torch.Tensor: ``[b, h, s, d_v]``; zeros at padding queries.
    """
    if is_causal:
        raise ValueError("is_causal=True with a GistSegmentMask: the mask already holds causality")
    b, h, s, _ = query.shape
    pieces: List[List[torch.Tensor]] = [[] for _ in range(b)]
    for r, qa, ka, end in attn_mask.blocks():
        out = F.scaled_dot_product_attention(
            query[r : r + 1, :, ka:end],
            key[r : r + 1, :, ka:end],
            value[r : r + 1, :, ka:end],
            dropout_p=dropout_p,
            is_causal=True,
            scale=scale,
            enable_gqa=enable_gqa,
        )
        pieces[r].append(out[:, :, qa - ka :])
    for r, row in enumerate(pieces):
        pad = s - attn_mask.pad_start[r]
        if pad:
            row.append(value.new_zeros(1, h, pad, value.shape[-1]))
    return torch.cat([torch.cat(row, dim=2) for row in pieces], dim=0)


def make_gist_segment_mask(
    tokens: torch.Tensor,
    gist_token_ids: Collection[int],
    *,
    pad_id: Optional[int] = None,
    mode: MaskMode = "gist",
    document_ids: Optional[torch.Tensor] = None,
) -> GistSegmentMask:
    """The gist mask of :func:`~torchtune_gist.masks.make_gist_mask` as a :class:`GistSegmentMask`.

    Args:
        tokens (torch.Tensor): token ids ``[b, s]``.
        gist_token_ids (Collection[int]): ids that count as gist tokens.
        pad_id (Optional[int]): padding id; padding must be a suffix of each row. ``None``: no padding.
        mode (MaskMode): ``"gist"``, ``"pos_control"`` or ``"neg_control"``.
        document_ids (Optional[torch.Tensor]): ``[b, s]`` ids of packed documents, each one run of
            positions; ``None`` means one document per row.

    Returns:
        GistSegmentMask: ``[b, s, s]``, on the device of ``tokens``.

    Raises:
        ValueError: on a bad shape or mode, gist tokens that are not contiguous, padding inside a
            row, or a document split into several runs.
    """
    _check_inputs(tokens, gist_token_ids, mode, document_ids, pad_id)
    b, s = tokens.shape
    first, last = (t.tolist() for t in gist_span_bounds(tokens, gist_token_ids, document_ids=document_ids))
    is_pad = (tokens == pad_id).tolist() if pad_id is not None else [[False] * s for _ in range(b)]
    docs = document_ids.tolist() if document_ids is not None else [[0] * s for _ in range(b)]
    spans, pad_start = [], []
    for r in range(b):
        end = s
        while end > 0 and is_pad[r][end - 1]:
            end -= 1
        if any(is_pad[r][:end]):
            raise ValueError(
                f"row {r} has padding (pad_id={pad_id}) before its last real token: segment masks need right padding"
            )
        row: List[Span] = []
        seen = set()
        a = 0
        while a < end:
            e = a + 1
            while e < end and docs[r][e] == docs[r][a]:
                e += 1
            if docs[r][a] in seen:
                raise ValueError(f"row {r}: document {docs[r][a]} is split into several runs of positions")
            seen.add(docs[r][a])
            row.append((a, e, first[r][a], last[r][a]))
            a = e
        spans.append(row)
        pad_start.append(end)
    return GistSegmentMask(spans, pad_start, mode, s, tokens.device)
