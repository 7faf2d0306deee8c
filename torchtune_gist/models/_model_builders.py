"""Model builders for gist-aware Llama 3.1 (8B, 70B), Llama 3.2 (1B, 3B) and tiny test models.

Every builder takes ``num_gist_tokens`` (K, default 1) and optionally ``gist_token_ids`` (default:
the top K ids, Llama 3's reserved tokens). "Gist rows only" training: ``train_lora: False`` in the
recipes (``set_trainable_params(model, train_lora=False)``); the plain ``gist_*`` builders have no LoRA at all.
"""

from functools import partial
from typing import Any, Dict, List, Optional

from torchtune.modules import TransformerDecoder
from torchtune.modules.peft import LORA_ATTN_MODULES

from torchtune_gist.models._component_builders import (
    gist_llama3_1,
    gist_llama3_2,
    lora_gist_llama3_1,
    lora_gist_llama3_2,
)
from torchtune_gist.tiny import TINY_LLAMA3_1_ARGS

_LLAMA3_1_8B_ARGS: Dict[str, Any] = dict(
    vocab_size=128_256,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    embed_dim=4096,
    max_seq_len=131072,
    intermediate_dim=14336,
    attn_dropout=0.0,
    norm_eps=1e-5,
    rope_base=500_000,
)
_LLAMA3_1_70B_ARGS: Dict[str, Any] = dict(
    vocab_size=128_256,
    num_layers=80,
    num_heads=64,
    num_kv_heads=8,
    embed_dim=8192,
    max_seq_len=131072,
    intermediate_dim=28672,
    attn_dropout=0.0,
    norm_eps=1e-5,
    rope_base=500_000,
)
_LLAMA3_2_1B_ARGS: Dict[str, Any] = dict(
    vocab_size=128_256,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    embed_dim=2048,
    max_seq_len=131072,
    intermediate_dim=8192,
    attn_dropout=0.0,
    norm_eps=1e-5,
    rope_base=500_000,
    scale_factor=32,
)
_LLAMA3_2_3B_ARGS: Dict[str, Any] = dict(
    vocab_size=128_256,
    num_layers=28,
    num_heads=24,
    num_kv_heads=8,
    embed_dim=3072,
    max_seq_len=131072,
    intermediate_dim=8192,
    attn_dropout=0.0,
    norm_eps=1e-5,
    rope_base=500_000,
    scale_factor=32,
)

#: The tiny shape for QLoRA: NF4 quantises in blocks of 64 values with scalers in blocks of 256,
#: so every quantised weight needs a multiple of 64 * 256 elements. Width 256 (4 heads of 64,
#: 2 KV heads) and MLP width 512 satisfy that; the plain tiny shape (width 64) does not.
TINY_QLORA_LLAMA3_1_ARGS: Dict[str, Any] = {**TINY_LLAMA3_1_ARGS, "embed_dim": 256, "intermediate_dim": 512}


def _lora_builder(
    component: Any,
    arch: Dict[str, Any],
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool,
    apply_lora_to_output: bool,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float,
    use_dora: bool,
    quantize_base: bool,
    num_gist_tokens: int,
    gist_token_ids: Optional[List[int]],
    **extra: Any,
) -> TransformerDecoder:
    return component(
        lora_attn_modules=lora_attn_modules,
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        **arch,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        num_gist_tokens=num_gist_tokens,
        gist_token_ids=gist_token_ids,
        **extra,
    )


def gist_llama3_1_8b(num_gist_tokens: int = 1, gist_token_ids: Optional[List[int]] = None) -> TransformerDecoder:
    """Gist-aware Llama 3.1 8B (torchtune's ``llama3_1_8b`` shape).

    Args:
        num_gist_tokens (int): K. Default: 1
        gist_token_ids (Optional[List[int]]): the K gist ids; default the top K ids.

    Returns:
        TransformerDecoder: the model, vocabulary frozen, gist rows trainable.
    """
    return gist_llama3_1(**_LLAMA3_1_8B_ARGS, num_gist_tokens=num_gist_tokens, gist_token_ids=gist_token_ids)


def gist_llama3_1_70b(num_gist_tokens: int = 1, gist_token_ids: Optional[List[int]] = None) -> TransformerDecoder:
    """Gist-aware Llama 3.1 70B (torchtune's ``llama3_1_70b`` shape). Arguments as :func:`gist_llama3_1_8b`."""
    return gist_llama3_1(**_LLAMA3_1_70B_ARGS, num_gist_tokens=num_gist_tokens, gist_token_ids=gist_token_ids)


def lora_gist_llama3_1_8b(
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    num_gist_tokens: int = 1,
    gist_token_ids: Optional[List[int]] = None,
) -> TransformerDecoder:
    """Gist-aware Llama 3.1 8B with LoRA (arguments and defaults as torchtune's ``lora_llama3_1_8b``).

    Args:
        lora_attn_modules (List[LORA_ATTN_MODULES]): attention projections with LoRA, from
            ``{"q_proj", "k_proj", "v_proj", "output_proj"}``.
        apply_lora_to_mlp (bool): LoRA on the MLP too. Default: False
        apply_lora_to_output (bool): LoRA on the output projection too. Default: False
        lora_rank (int): LoRA rank. Default: 8
        lora_alpha (float): LoRA scaling. Default: 16
        lora_dropout (float): LoRA dropout. Default: 0.0
        use_dora (bool): DoRA instead of LoRA. Default: False
        quantize_base (bool): NF4 base weights under LoRA (QLoRA). Default: False
        num_gist_tokens (int): K. Default: 1
        gist_token_ids (Optional[List[int]]): the K gist ids; default the top K ids.

    Returns:
        TransformerDecoder: the model.
    """
    return _lora_builder(
        lora_gist_llama3_1,
        _LLAMA3_1_8B_ARGS,
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        lora_rank,
        lora_alpha,
        lora_dropout,
        use_dora,
        quantize_base,
        num_gist_tokens,
        gist_token_ids,
    )


def lora_gist_llama3_1_70b(
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    num_gist_tokens: int = 1,
    gist_token_ids: Optional[List[int]] = None,
) -> TransformerDecoder:
    """Gist-aware Llama 3.1 70B with LoRA. Arguments as :func:`lora_gist_llama3_1_8b`."""
    return _lora_builder(
        lora_gist_llama3_1,
        _LLAMA3_1_70B_ARGS,
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        lora_rank,
        lora_alpha,
        lora_dropout,
        use_dora,
        quantize_base,
        num_gist_tokens,
        gist_token_ids,
    )


def lora_gist_llama3_2_1b(
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    num_gist_tokens: int = 1,
    gist_token_ids: Optional[List[int]] = None,
    tie_word_embeddings: bool = True,
) -> TransformerDecoder:
    """Gist-aware Llama 3.2 1B with LoRA; output tied to the vocabulary by default.

    Arguments as :func:`lora_gist_llama3_1_8b`, plus ``tie_word_embeddings`` (torchtune's
    ``lora_llama3_2_1b`` rejects ``apply_lora_to_output`` for tied embeddings).
    """
    return _lora_builder(
        lora_gist_llama3_2,
        _LLAMA3_2_1B_ARGS,
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        lora_rank,
        lora_alpha,
        lora_dropout,
        use_dora,
        quantize_base,
        num_gist_tokens,
        gist_token_ids,
        tie_word_embeddings=tie_word_embeddings,
    )


def lora_gist_llama3_2_3b(
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    num_gist_tokens: int = 1,
    gist_token_ids: Optional[List[int]] = None,
    tie_word_embeddings: bool = True,
) -> TransformerDecoder:
    """Gist-aware Llama 3.2 3B with LoRA. Arguments as :func:`lora_gist_llama3_2_1b`."""
    return _lora_builder(
        lora_gist_llama3_2,
        _LLAMA3_2_3B_ARGS,
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        lora_rank,
        lora_alpha,
        lora_dropout,
        use_dora,
        quantize_base,
        num_gist_tokens,
        gist_token_ids,
        tie_word_embeddings=tie_word_embeddings,
    )


def gist_llama3_2_1b(
    num_gist_tokens: int = 1, gist_token_ids: Optional[List[int]] = None, tie_word_embeddings: bool = True
) -> TransformerDecoder:
    """Gist-aware Llama 3.2 1B; output tied to the (frozen) vocabulary by default."""
    return gist_llama3_2(
        **_LLAMA3_2_1B_ARGS,
        tie_word_embeddings=tie_word_embeddings,
        num_gist_tokens=num_gist_tokens,
        gist_token_ids=gist_token_ids,
    )


def gist_llama3_2_3b(
    num_gist_tokens: int = 1, gist_token_ids: Optional[List[int]] = None, tie_word_embeddings: bool = True
) -> TransformerDecoder:
    """Gist-aware Llama 3.2 3B; output tied to the (frozen) vocabulary by default."""
    return gist_llama3_2(
        **_LLAMA3_2_3B_ARGS,
        tie_word_embeddings=tie_word_embeddings,
        num_gist_tokens=num_gist_tokens,
        gist_token_ids=gist_token_ids,
    )


def _tiny_arch(base: Dict[str, Any], **sizes: Optional[int]) -> Dict[str, Any]:
    return {**base, **{k: v for k, v in sizes.items() if v is not None}}


def gist_llama3_1_tiny(
    num_gist_tokens: int = 1,
    gist_token_ids: Optional[List[int]] = None,
    num_layers: Optional[int] = None,
    embed_dim: Optional[int] = None,
    num_heads: Optional[int] = None,
    num_kv_heads: Optional[int] = None,
    intermediate_dim: Optional[int] = None,
) -> TransformerDecoder:
    """Gist-aware tiny Llama 3.1 (``TINY_LLAMA3_1_ARGS``: 512-token vocabulary, 2 layers, width 64)
    for tests, the demo and CPU configs. Arguments as :func:`gist_llama3_1_8b`; the sizes, when
    given, replace those of ``TINY_LLAMA3_1_ARGS`` (the demo uses 4 layers of width 128)."""
    arch = _tiny_arch(
        TINY_LLAMA3_1_ARGS,
        num_layers=num_layers,
        embed_dim=embed_dim,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_dim=intermediate_dim,
    )
    return gist_llama3_1(**arch, num_gist_tokens=num_gist_tokens, gist_token_ids=gist_token_ids)


def lora_gist_llama3_1_tiny(
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    num_gist_tokens: int = 1,
    gist_token_ids: Optional[List[int]] = None,
    num_layers: Optional[int] = None,
    embed_dim: Optional[int] = None,
    num_heads: Optional[int] = None,
    num_kv_heads: Optional[int] = None,
    intermediate_dim: Optional[int] = None,
) -> TransformerDecoder:
    """Gist-aware tiny Llama 3.1 with LoRA. Arguments as :func:`lora_gist_llama3_1_8b`, sizes as
    :func:`gist_llama3_1_tiny`.

    With ``quantize_base=True`` the NF4-compatible shape ``TINY_QLORA_LLAMA3_1_ARGS`` (width 256,
    MLP 512) is used instead of ``TINY_LLAMA3_1_ARGS`` (width 64), which NF4 cannot quantise.
    """
    arch = _tiny_arch(
        TINY_QLORA_LLAMA3_1_ARGS if quantize_base else TINY_LLAMA3_1_ARGS,
        num_layers=num_layers,
        embed_dim=embed_dim,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_dim=intermediate_dim,
    )
    return _lora_builder(
        lora_gist_llama3_1,
        arch,
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        lora_rank,
        lora_alpha,
        lora_dropout,
        use_dora,
        quantize_base,
        num_gist_tokens,
        gist_token_ids,
    )


qlora_gist_llama3_1_8b = partial(lora_gist_llama3_1_8b, quantize_base=True)
qlora_gist_llama3_1_8b.__doc__ = """Gist-aware Llama 3.1 8B with QLoRA (NF4 base weights under LoRA).
See :func:`lora_gist_llama3_1_8b` for the arguments."""

qlora_gist_llama3_1_70b = partial(lora_gist_llama3_1_70b, quantize_base=True)
qlora_gist_llama3_1_70b.__doc__ = """Gist-aware Llama 3.1 70B with QLoRA (NF4 base weights under LoRA).
See :func:`lora_gist_llama3_1_70b` for the arguments."""

qlora_gist_llama3_2_1b = partial(lora_gist_llama3_2_1b, quantize_base=True)
qlora_gist_llama3_2_1b.__doc__ = """Gist-aware Llama 3.2 1B with QLoRA (NF4 base weights under LoRA).
See :func:`lora_gist_llama3_2_1b` for the arguments."""

qlora_gist_llama3_2_3b = partial(lora_gist_llama3_2_3b, quantize_base=True)
qlora_gist_llama3_2_3b.__doc__ = """Gist-aware Llama 3.2 3B with QLoRA (NF4 base weights under LoRA).
See :func:`lora_gist_llama3_2_3b` for the arguments."""

qlora_gist_llama3_1_tiny = partial(lora_gist_llama3_1_tiny, quantize_base=True)
qlora_gist_llama3_1_tiny.__doc__ = """Gist-aware tiny Llama 3.1 with QLoRA, in the NF4-compatible shape
``TINY_QLORA_LLAMA3_1_ARGS`` (width 256, MLP 512). See :func:`lora_gist_llama3_1_tiny`."""
