"""Component builders for gist-aware Llama 3.1 / 3.2 decoders.

Each builder builds torchtune's model with the same arguments, then replaces ``tok_embeddings``
by a :class:`~torchtune_gist.modules.GistEmbedding` that shares the vocabulary weight
(:func:`add_gist_embedding`). Everything else, state-dict names included, is torchtune's.
"""

from typing import List, Optional, Sequence

from torch import nn
from torchtune.models.llama3_1 import llama3_1, lora_llama3_1
from torchtune.models.llama3_2 import llama3_2, lora_llama3_2
from torchtune.modules import TiedLinear, TransformerDecoder
from torchtune.modules.peft import LORA_ATTN_MODULES

from torchtune_gist.gist_tokens import default_gist_token_ids
from torchtune_gist.modules import GistEmbedding


def add_gist_embedding(
    model: TransformerDecoder,
    num_gist_tokens: int = 1,
    gist_token_ids: Optional[Sequence[int]] = None,
) -> TransformerDecoder:
    """Replace ``model.tok_embeddings`` by a :class:`GistEmbedding` sharing its weight (in place).

    A tied output (``TiedLinear``) is re-tied to the new module, so logits keep using the vocabulary.
    The gist rows start as the mean of the vocabulary at build time (uninitialised on the meta
    device): call ``init_gist_embeddings`` again after loading base weights.

    Args:
        model (TransformerDecoder): a torchtune decoder whose ``tok_embeddings`` is an ``nn.Embedding``.
        num_gist_tokens (int): K, at least 1.
        gist_token_ids (Optional[Sequence[int]]): the K gist ids; default
            ``default_gist_token_ids(V, K)`` (the top K ids, Llama 3's reserved tokens). Ids
            ``V .. V+K-1`` extend the vocabulary for models without reserved tokens.

    Returns:
        TransformerDecoder: ``model``, now gist-aware.

    Raises:
        TypeError: if ``model.tok_embeddings`` is not an ``nn.Embedding``.
        ValueError: if K or the ids are invalid, or ``len(gist_token_ids) != num_gist_tokens``.
    """
    old = model.tok_embeddings
    if not isinstance(old, nn.Embedding):
        raise TypeError(f"expected model.tok_embeddings to be an nn.Embedding, got {type(old).__name__}")
    vocab_size = old.weight.shape[0]
    if gist_token_ids is None:
        gist_token_ids = default_gist_token_ids(vocab_size, num_gist_tokens)
    elif len(gist_token_ids) != num_gist_tokens:
        raise ValueError(
            f"num_gist_tokens={num_gist_tokens} but {len(gist_token_ids)} gist_token_ids were given: "
            f"{list(gist_token_ids)}"
        )
    model.tok_embeddings = GistEmbedding.from_embedding(old, gist_token_ids)
    if isinstance(model.output, TiedLinear) and model.output.tied_module is old:
        model.output = TiedLinear(model.tok_embeddings)
    return model


def gist_llama3_1(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    max_seq_len: int,
    attn_dropout: float = 0.0,
    rope_base: int = 500_000,
    intermediate_dim: Optional[int] = None,
    norm_eps: float = 1e-5,
    scale_factor: int = 8,
    *,
    num_gist_tokens: int = 1,
    gist_token_ids: Optional[List[int]] = None,
) -> TransformerDecoder:
    """torchtune's :func:`~torchtune.models.llama3_1.llama3_1` with a :class:`GistEmbedding`.

    Args:
        vocab_size (int) .. scale_factor (int): as in torchtune's ``llama3_1``.
        num_gist_tokens (int): K. Default: 1
        gist_token_ids (Optional[List[int]]): the K gist ids; default the top K ids.

    Returns:
        TransformerDecoder: the gist-aware Llama 3.1 model (vocabulary frozen, gist rows trainable).
    """
    model = llama3_1(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        attn_dropout=attn_dropout,
        rope_base=rope_base,
        intermediate_dim=intermediate_dim,
        norm_eps=norm_eps,
        scale_factor=scale_factor,
    )
    return add_gist_embedding(model, num_gist_tokens, gist_token_ids)


def lora_gist_llama3_1(
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    max_seq_len: int,
    intermediate_dim: Optional[int] = None,
    attn_dropout: float = 0.0,
    norm_eps: float = 1e-5,
    rope_base: int = 500_000,
    scale_factor: int = 8,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    num_gist_tokens: int = 1,
    gist_token_ids: Optional[List[int]] = None,
) -> TransformerDecoder:
    """torchtune's :func:`~torchtune.models.llama3_1.lora_llama3_1` with a :class:`GistEmbedding`.

    Args:
        lora_attn_modules .. quantize_base: as in torchtune's ``lora_llama3_1`` (LoRA on the
            attention projections, optionally the MLP and the output; DoRA; NF4 base for QLoRA).
        num_gist_tokens (int): K. Default: 1
        gist_token_ids (Optional[List[int]]): the K gist ids; default the top K ids.

    Returns:
        TransformerDecoder: the gist-aware LoRA Llama 3.1 model.
    """
    model = lora_llama3_1(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        intermediate_dim=intermediate_dim,
        attn_dropout=attn_dropout,
        norm_eps=norm_eps,
        rope_base=rope_base,
        scale_factor=scale_factor,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
    )
    return add_gist_embedding(model, num_gist_tokens, gist_token_ids)


def gist_llama3_2(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    max_seq_len: int,
    attn_dropout: float = 0.0,
    rope_base: int = 500_000,
    intermediate_dim: Optional[int] = None,
    norm_eps: float = 1e-5,
    scale_factor: int = 32,
    tie_word_embeddings: bool = True,
    *,
    num_gist_tokens: int = 1,
    gist_token_ids: Optional[List[int]] = None,
) -> TransformerDecoder:
    """torchtune's :func:`~torchtune.models.llama3_2.llama3_2` with a :class:`GistEmbedding`.

    With ``tie_word_embeddings`` the output stays tied to the (frozen) vocabulary; gist ids keep
    their vocabulary row as output row.

    Args:
        vocab_size (int) .. tie_word_embeddings (bool): as in torchtune's ``llama3_2``.
        num_gist_tokens (int): K. Default: 1
        gist_token_ids (Optional[List[int]]): the K gist ids; default the top K ids.

    Returns:
        TransformerDecoder: the gist-aware Llama 3.2 model.
    """
    model = llama3_2(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        attn_dropout=attn_dropout,
        rope_base=rope_base,
        intermediate_dim=intermediate_dim,
        norm_eps=norm_eps,
        scale_factor=scale_factor,
        tie_word_embeddings=tie_word_embeddings,
    )
    return add_gist_embedding(model, num_gist_tokens, gist_token_ids)


def lora_gist_llama3_2(
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    max_seq_len: int,
    intermediate_dim: Optional[int] = None,
    attn_dropout: float = 0.0,
    norm_eps: float = 1e-5,
    rope_base: int = 500_000,
    scale_factor: int = 32,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    tie_word_embeddings: bool = True,
    num_gist_tokens: int = 1,
    gist_token_ids: Optional[List[int]] = None,
) -> TransformerDecoder:
    """torchtune's :func:`~torchtune.models.llama3_2.lora_llama3_2` with a :class:`GistEmbedding`.

    Args:
        lora_attn_modules .. tie_word_embeddings: as in torchtune's ``lora_llama3_2``
            (``apply_lora_to_output`` is rejected there for tied embeddings).
        num_gist_tokens (int): K. Default: 1
        gist_token_ids (Optional[List[int]]): the K gist ids; default the top K ids.

    Returns:
        TransformerDecoder: the gist-aware LoRA Llama 3.2 model.
    """
    model = lora_llama3_2(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        intermediate_dim=intermediate_dim,
        attn_dropout=attn_dropout,
        norm_eps=norm_eps,
        rope_base=rope_base,
        scale_factor=scale_factor,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        tie_word_embeddings=tie_word_embeddings,
    )
    return add_gist_embedding(model, num_gist_tokens, gist_token_ids)
