"""Cached attention whose cost follows what the cache holds, swapped into a torchtune model.

torchtune's stock cached attention attends over its whole allocated ``KVCache`` and expands the
keys/values of every allocated slot for grouped-query attention at every step (a full copy per
layer per token), so decoding slows down with the *allocated* length. Here each layer's
attention is temporarily replaced (:func:`store_attention`) by :class:`StoreAttention`, which
reuses the layer's own ``q_proj``/``k_proj``/``v_proj``, RoPE, optional q/k norms and
``output_proj`` (so LoRA and NF4 layers work unchanged), writes keys (after RoPE) and values into
a :class:`KVStore` sized to exactly what generation needs, and attends over the filled slots only,
without any GQA copy: the query heads that share a key/value head are folded into the query axis.

A slot of the store is a cache entry, not a position: positions are given per token
(``input_pos [b, s]``), so cached gist keys keep the RoPE positions they were computed at and
later tokens may continue at any absolute position.

Long inputs go through in chunks of ``chunk_size`` tokens (:func:`prefill`), so the attention
mask, the attention scores and the MLP's activations of a forward pass grow with the chunk, not
with the prompt. Compression keeps only the gists' entries, so :func:`gist_entries` goes layer by
layer, each through a store of its own layer only: the prompt's keys and values are never held for
more than one layer at a time.
"""

from contextlib import ExitStack, contextmanager
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torchtune.modules import MultiHeadAttention, TransformerDecoder, TransformerSelfAttentionLayer

from torchtune_gist._checks import check_whole
from torchtune_gist.generation._inputs import model_device_dtype

#: Tokens per forward pass when prefilling a prompt (:func:`prefill`, :func:`gist_entries`).
DEFAULT_CHUNK_SIZE = 512

#: The SDPA kernels cached attention may use: all but cuDNN's, which builds an execution plan for every new key
#: length, and a growing cache has a new one at every decoding step (about 50 ms a step on an H200, 2026-12-04,
#: against 9 ms for a whole step of 8 Llama 3.1 8B-shaped layers without it).
CACHED_ATTENTION_BACKENDS = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
    SDPBackend.OVERRIDEABLE,
]


def self_attention_modules(model: TransformerDecoder) -> List[MultiHeadAttention]:
    """The self-attention module of every layer of ``model``, in order.

    Raises:
        TypeError: if ``model`` is not a torchtune decoder made of self-attention layers.
        RuntimeError: if the model is already attending through a store (nested :func:`store_attention`).
    """
    if not isinstance(model, TransformerDecoder):
        raise TypeError(f"expected a torchtune TransformerDecoder, got {type(model).__name__}")
    modules = []
    for i, layer in enumerate(model.layers):
        attn = getattr(layer, "attn", None)
        if isinstance(attn, StoreAttention):
            raise RuntimeError("the model is already generating through a KV store (nested store_attention)")
        if not isinstance(layer, TransformerSelfAttentionLayer) or not isinstance(attn, MultiHeadAttention):
            raise TypeError(
                f"layer {i} is a {type(layer).__name__} with {type(attn).__name__} attention; gist caching "
                "supports torchtune TransformerSelfAttentionLayer with MultiHeadAttention only"
            )
        modules.append(attn)
    return modules


class KVStore:
    """Per-layer key/value buffers ``[b, n_kv, capacity, h_d]`` filled left to right.

    Every slot also has a validity flag (``valid [b, capacity]``): padding slots are written but
    never attended. ``fill`` slots are in use; a forward pass of ``s`` tokens writes slots
    ``fill .. fill + s - 1`` of every layer and then :meth:`advance` moves ``fill`` on.

    A one-token decoding step (:meth:`step_mask`) instead writes at ``cursor``, a tensor, and attends over every slot
    (those not filled yet are not valid): its shapes do not change from step to step, so a compiled step
    (:func:`decode_step_logits` under ``torch.compile``) is traced once, not at every new length.

    Args:
        keys (List[torch.Tensor]): per layer ``[b, n_kv, capacity, h_d]``.
        values (List[torch.Tensor]): per layer, same shapes.
    """

    def __init__(self, keys: List[torch.Tensor], values: List[torch.Tensor]) -> None:
        self.keys = keys
        self.values = values
        b, _, capacity, _ = keys[0].shape
        self.valid = torch.zeros(b, capacity, dtype=torch.bool, device=keys[0].device)
        self.fill = 0
        self.cursor = torch.zeros(1, dtype=torch.long, device=keys[0].device)
        self.stepping = False

    @classmethod
    def empty(
        cls, model: TransformerDecoder, batch_size: int, capacity: int, *, dtype: torch.dtype, device: torch.device
    ) -> "KVStore":
        """Allocate a store for every layer of ``model``."""
        return cls.for_layers(self_attention_modules(model), batch_size, capacity, dtype=dtype, device=device)

    @classmethod
    def for_layers(
        cls,
        modules: List[MultiHeadAttention],
        batch_size: int,
        capacity: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> "KVStore":
        """Allocate a store for the attention ``modules`` (store layer ``i`` is ``modules[i]``'s)."""
        shapes = [(batch_size, a.num_kv_heads, capacity, a.head_dim) for a in modules]
        keys = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        values = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        return cls(keys, values)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held by the key and value buffers (what the store costs, filled or not)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def append(self, keys: List[torch.Tensor], values: List[torch.Tensor]) -> None:
        """Copy precomputed entries (e.g. gist keys/values ``[b, n_kv, n, h_d]`` per layer) into the next slots.

        They are cast to the store's dtype and device and are valid in every row.
        """
        n = keys[0].shape[2]
        self._check_room(n)
        for buf, new in zip((*self.keys, *self.values), (*keys, *values)):
            buf[:, :, self.fill : self.fill + n] = new
        self.valid[:, self.fill : self.fill + n] = True
        self.fill += n

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (long ``[b']``, in the new order), freeing the others' entries."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.valid = self.valid.index_select(0, rows)

    def attention_mask(self, new_valid: torch.Tensor) -> torch.Tensor:
        """Record which of the next ``s`` slots are real tokens and build their attention mask.

        Args:
            new_valid (torch.Tensor): bool ``[b, s]``, False for padding.

        Returns:
            torch.Tensor: bool ``[b, s, fill + s]``: query ``i`` (slot ``fill + i``) attends to the
            valid slots up to its own, and always to itself (so no softmax row is empty).
        """
        b, s = new_valid.shape
        self._check_room(s)
        self.stepping = False
        end = self.fill + s
        self.valid[:, self.fill : end] = new_valid
        query_slot = torch.arange(self.fill, end, device=new_valid.device).unsqueeze(-1)
        key_slot = torch.arange(end, device=new_valid.device)
        mask = (key_slot <= query_slot) & self.valid[:, None, :end]
        return mask | (key_slot == query_slot)

    def step_mask(self) -> torch.Tensor:
        """Start a one-token decoding step at slot ``fill``: its keys/values go to ``cursor`` and it attends over
        every slot of the store, the valid ones (all of them up to its own: slots fill left to right).

        Returns:
            torch.Tensor: bool ``[b, 1, capacity]``.
        """
        self._check_room(1)
        self.stepping = True
        self.cursor.fill_(self.fill)
        self.valid[:, self.fill] = True
        return self.valid[:, None, :]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` ``[b, n_kv, s, h_d]`` at the next ``s`` slots; return the filled views (in a decoding
        step: write at ``cursor`` and return the whole buffers)."""
        if self.stepping:
            self.keys[layer].index_copy_(2, self.cursor, k)
            self.values[layer].index_copy_(2, self.cursor, v)
            return self.keys[layer], self.values[layer]
        end = self.fill + k.shape[2]
        self.keys[layer][:, :, self.fill : end] = k
        self.values[layer][:, :, self.fill : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, s: int) -> None:
        """Mark the ``s`` slots written by the last forward pass as used."""
        self.fill += s

    def _check_room(self, s: int) -> None:
        if self.fill + s > self.capacity:
            raise RuntimeError(f"KV store overflow: {self.fill} + {s} slots needed, {self.capacity} allocated")


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention for grouped-query heads without expanding keys and values.

    The ``g = n_h / n_kv`` query heads sharing a key/value head (torchtune groups them
    consecutively) are folded into the query axis, so ``k``/``v`` are read as they are.

    Args:
        q (torch.Tensor): queries ``[b, n_h, s, h_d]``.
        k (torch.Tensor): keys ``[b, n_kv, t, h_d]``.
        v (torch.Tensor): values ``[b, n_kv, t, h_d]``.
        mask (torch.Tensor): bool ``[b, s, t]``, True where query ``i`` attends to key ``j``.

    Returns:
        torch.Tensor: ``[b, n_h, s, h_d]``.
    """
    b, n_h, s, h_d = q.shape
    n_kv, t = k.shape[1], k.shape[2]
    g = n_h // n_kv
    q = q.reshape(b, n_kv, g * s, h_d)
    mask = mask[:, None, None].expand(b, 1, g, s, t).reshape(b, 1, g * s, t)
    with sdpa_kernel(CACHED_ATTENTION_BACKENDS):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.reshape(b, n_h, s, h_d)  # not view: CUDA's memory-efficient kernel returns a transposed layout


class StoreAttention(nn.Module):
    """A layer's ``MultiHeadAttention`` computed against a :class:`KVStore` (inference only).

    Args:
        attn (MultiHeadAttention): the layer's attention; its projections, RoPE and norms are used as-is.
        store (KVStore): where keys and values are cached.
        layer (int): this layer's index in the store.
    """

    def __init__(self, attn: MultiHeadAttention, store: KVStore, layer: int) -> None:
        super().__init__()
        self.attn = attn
        self.store = store
        self.layer = layer

    def forward(
        self,
        x: torch.Tensor,
        y: Optional[torch.Tensor] = None,
        *,
        mask: torch.Tensor,
        input_pos: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            x (torch.Tensor): queries' input ``[b, s, d]``.
            y (Optional[torch.Tensor]): keys'/values' input ``[b, s, d]``; ``x`` if None.
            mask (torch.Tensor): bool ``[b, s, fill + s]`` from :meth:`KVStore.attention_mask`.
            input_pos (torch.Tensor): absolute positions ``[b, s]``.

        Returns:
            torch.Tensor: ``[b, s, d]``.
        """
        a = self.attn
        y = x if y is None else y
        b, s, _ = x.shape
        q = a.q_proj(x).view(b, s, a.num_heads, a.head_dim)
        k = a.k_proj(y).view(b, s, a.num_kv_heads, a.head_dim)
        v = a.v_proj(y).view(b, s, a.num_kv_heads, a.head_dim)
        if a.pos_embeddings is not None:
            q = a.pos_embeddings(q, input_pos=input_pos)
            k = a.pos_embeddings(k, input_pos=input_pos)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if a.q_norm is not None:
            q, k = a.q_norm(q), a.k_norm(k)
        keys, values = self.store.write(self.layer, k, v)
        out = grouped_query_attention(q, keys, values, mask)
        return a.output_proj(out.transpose(1, 2).reshape(b, s, -1))


@contextmanager
def _layer_through_store(layer: nn.Module, store: KVStore, index: int) -> Iterator[None]:
    """Within the context, ``layer`` attends through ``store``'s layer ``index``; restored on exit."""
    attn = layer.attn
    layer.attn = StoreAttention(attn, store, index)
    try:
        yield
    finally:
        layer.attn = attn


@contextmanager
def store_attention(model: TransformerDecoder, store: KVStore) -> Iterator[None]:
    """Within the context, every layer of ``model`` attends through ``store``; restored on exit.

    Raises:
        TypeError: for a model that is not a decoder of self-attention layers.
        RuntimeError: if the model is already attending through a store.
    """
    self_attention_modules(model)
    with ExitStack() as stack:
        for i, layer in enumerate(model.layers):
            stack.enter_context(_layer_through_store(layer, store, i))
        yield


def forward_through_store(
    model: TransformerDecoder,
    store: KVStore,
    tokens: torch.Tensor,
    input_pos: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """Run ``tokens`` through the layers of ``model`` (inside :func:`store_attention`), caching them.

    The final norm and output projection are not applied (see :func:`last_logits`), so a long
    prompt never materialises ``[b, s, vocab]`` logits.

    Args:
        model (TransformerDecoder): the model, its attention swapped for ``store``.
        store (KVStore): the store; the tokens take its next ``s`` slots.
        tokens (torch.Tensor): ``[b, s]`` token ids.
        input_pos (torch.Tensor): ``[b, s]`` absolute positions.
        valid (torch.Tensor): bool ``[b, s]``, False for padding.

    Returns:
        torch.Tensor: the last layer's hidden states ``[b, s, d]``.
    """
    h = _through_layers(model, tokens, store.attention_mask(valid), input_pos)
    store.advance(tokens.shape[1])
    return h


def _through_layers(
    model: TransformerDecoder, tokens: torch.Tensor, mask: torch.Tensor, input_pos: torch.Tensor
) -> torch.Tensor:
    """The last layer's hidden states ``[b, s, d]`` of ``tokens [b, s]`` (embeddings, then every layer)."""
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        h = layer(h, mask=mask, input_pos=input_pos)
    return h


def decode_step_logits(
    model: TransformerDecoder, token: torch.Tensor, input_pos: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """One decoding step through the layers of ``model`` (inside :func:`store_attention`, after
    :meth:`KVStore.step_mask`): fp32 next-token logits ``[b, vocab]``.

    Args:
        model (TransformerDecoder): the model, its attention swapped for the store.
        token (torch.Tensor): ``[b, 1]`` token ids.
        input_pos (torch.Tensor): ``[b, 1]`` absolute positions.
        mask (torch.Tensor): bool ``[b, 1, capacity]`` from :meth:`KVStore.step_mask`.
    """
    return last_logits(model, _through_layers(model, token, mask, input_pos))


def _chunks(s: int, chunk_size: int) -> List[slice]:
    check_whole("chunk_size", chunk_size)
    return [slice(start, min(start + chunk_size, s)) for start in range(0, s, chunk_size)]


def prefill(
    model: TransformerDecoder,
    store: KVStore,
    tokens: torch.Tensor,
    input_pos: torch.Tensor,
    valid: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    keep: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`forward_through_store` in chunks of ``chunk_size`` tokens: the same entries and outputs.

    Args:
        keep (Optional[torch.Tensor]): bool ``[b, s]``, the positions whose hidden states to return.

    Returns:
        torch.Tensor: the last layer's hidden states of the last chunk ``[b, c, d]``; with ``keep``, those at its
        positions ``[n, d]``, in row-major order (as ``h[keep]`` would give).

    Raises:
        ValueError: for a ``chunk_size`` that is not a whole number >= 1.
    """
    kept, where = [], []
    for part in _chunks(tokens.shape[1], chunk_size):
        h = forward_through_store(model, store, tokens[:, part], input_pos[:, part], valid[:, part])
        if keep is not None:
            kept.append(h[keep[:, part]])
            rows, cols = keep[:, part].nonzero(as_tuple=True)
            where.append(rows * tokens.shape[1] + cols + part.start)
    if keep is None:
        return h
    return torch.cat(kept)[torch.cat(where).argsort()]


def gist_entries(
    model: TransformerDecoder,
    tokens: torch.Tensor,
    input_pos: torch.Tensor,
    valid: torch.Tensor,
    keep: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Run ``tokens`` through ``model`` layer by layer and keep every layer's keys/values of the last ``keep`` slots.

    Causal attention, padding never attended (as :func:`prefill`). Each layer runs all its chunks
    through a store of that layer alone before the next layer starts, so what is held at once is
    one layer's keys/values ``[b, n_kv, s, h_d]``, the hidden states ``[b, s, d]`` (updated in
    place) and one chunk's activations. The final norm and output projection are never run.

    Args:
        model (TransformerDecoder): a decoder of self-attention layers.
        tokens (torch.Tensor): ``[b, s]`` token ids.
        input_pos (torch.Tensor): ``[b, s]`` absolute positions.
        valid (torch.Tensor): bool ``[b, s]``, False for padding.
        keep (int): how many of the last slots to keep (the gist span).
        chunk_size (int): tokens per forward pass of a layer.

    Returns:
        Tuple[List[torch.Tensor], List[torch.Tensor]]: keys and values, per layer ``[b, n_kv, keep, h_d]``.

    Raises:
        ValueError: for a ``chunk_size`` that is not a whole number >= 1.
    """
    modules = self_attention_modules(model)
    parts = _chunks(tokens.shape[1], chunk_size)
    b, s = tokens.shape
    device, dtype = model_device_dtype(model)
    h = model.tok_embeddings(tokens)
    keys, values = [], []
    for layer, attn in zip(model.layers, modules):
        store = KVStore.for_layers([attn], b, s, dtype=dtype, device=device)
        with _layer_through_store(layer, store, 0):
            for part in parts:
                mask = store.attention_mask(valid[:, part])
                h[:, part] = layer(h[:, part], mask=mask, input_pos=input_pos[:, part])
                store.advance(part.stop - part.start)
        keys.append(store.keys[0][:, :, -keep:].clone())
        values.append(store.values[0][:, :, -keep:].clone())
    return keys, values


def last_logits(model: TransformerDecoder, h: torch.Tensor) -> torch.Tensor:
    """fp32 next-token logits ``[b, vocab]`` from the hidden state of the last slot of ``h [b, s, d]``."""
    return model.output(model.norm(h[:, -1])).float()
