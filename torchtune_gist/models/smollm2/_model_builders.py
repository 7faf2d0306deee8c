"""SmolLM2-135M(-Instruct) model builders: a Llama model with plain RoPE and a tied output head.

Built with torchtune's plain ``llama3`` / ``lora_llama3`` component builders (``llama3_1`` and
``llama3_2`` would scale RoPE, which SmolLM2 does not use), then the output head is replaced by a
``TiedLinear`` reading ``tok_embeddings.weight`` (``[49152, 576]``); checkpoints have no ``output.weight``.

The gist forms replace ``tok_embeddings`` with a ``GistEmbedding`` whose K gist ids are new ids past the
vocabulary (``49152 .. 49152 + K - 1``); the vocabulary stays frozen under ``tok_embeddings.weight``
and the re-tied output head keeps its 49152 rows, so gist ids are never generated.
"""

from typing import Any, Dict, List

from torchtune.models.llama3._component_builders import llama3, lora_llama3
from torchtune.modules import TiedLinear, TransformerDecoder
from torchtune.modules.peft import LORA_ATTN_MODULES

from torchtune_gist.models._component_builders import add_gist_embedding
from torchtune_gist.models.smollm2._tokenizer import SMOLLM2_VOCAB_SIZE, smollm2_gist_token_ids

#: Arguments of torchtune's ``llama3`` component builder for SmolLM2-135M (read from the GGUF file).
SMOLLM2_135M_ARGS: Dict[str, Any] = dict(
    vocab_size=SMOLLM2_VOCAB_SIZE,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    embed_dim=576,
    max_seq_len=8192,
    intermediate_dim=1536,
    attn_dropout=0.0,
    norm_eps=1e-5,
    rope_base=100_000,
)


def tie_output(model: TransformerDecoder) -> TransformerDecoder:
    """Make ``model.output`` a ``TiedLinear`` over ``model.tok_embeddings`` (in place; returns ``model``).

    Call it again whenever ``tok_embeddings`` is replaced: ``TiedLinear`` holds the module it was given.
    """
    del model.output
    model.output = TiedLinear(model.tok_embeddings)
    return model


def smollm2_135m() -> TransformerDecoder:
    """SmolLM2-135M: 30 layers, width 576, 9 query / 3 key-value heads, FFN 1536, vocabulary 49152,
    RoPE base 100000, context 8192, tied embeddings (about 134.5M parameters).

    Returns:
        TransformerDecoder: the model; ``model(tokens [b, s])`` gives logits ``[b, s, 49152]``.
    """
    return tie_output(llama3(**SMOLLM2_135M_ARGS))


def lora_smollm2_135m(
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
) -> TransformerDecoder:
    """SmolLM2-135M with LoRA adapters (torchtune's ``lora_llama3``); the tied output head takes no LoRA.

    There is no QLoRA form: NF4 needs weights of a multiple of 64 x 256 elements, and the 576 x 576
    attention weights are not.

    Args:
        lora_attn_modules (List[LORA_ATTN_MODULES]): attention projections to adapt, any of
            ``{"q_proj", "k_proj", "v_proj", "output_proj"}``.
        apply_lora_to_mlp (bool): adapt the MLP too. Default: False.
        lora_rank (int): rank of each adapter. Default: 8.
        lora_alpha (float): adapter scaling. Default: 16.
        lora_dropout (float): dropout on the adapter input. Default: 0.0.
        use_dora (bool): DoRA instead of LoRA. Default: False.

    Returns:
        TransformerDecoder: the model; base weights load from a :func:`smollm2_135m` checkpoint.
    """
    model = lora_llama3(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=False,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        **SMOLLM2_135M_ARGS,
    )
    return tie_output(model)


def gist_smollm2_135m(num_gist_tokens: int = 1) -> TransformerDecoder:
    """:func:`smollm2_135m` with K gist tokens (ids ``49152 .. 49152 + K - 1``; rows start as the vocabulary mean).

    Args:
        num_gist_tokens (int): K. Default: 1.

    Returns:
        TransformerDecoder: the gist-aware model; logits ``[b, s, 49152]``. After loading base weights
        (``strict=False``: only ``tok_embeddings.gist_embeddings`` is missing), call
        ``init_gist_embeddings(model)`` to set the gist rows to the loaded vocabulary's mean.
    """
    return add_gist_embedding(smollm2_135m(), num_gist_tokens, smollm2_gist_token_ids(num_gist_tokens))


def lora_gist_smollm2_135m(
    lora_attn_modules: List[LORA_ATTN_MODULES],
    apply_lora_to_mlp: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    *,
    num_gist_tokens: int = 1,
) -> TransformerDecoder:
    """:func:`lora_smollm2_135m` with K gist tokens, as :func:`gist_smollm2_135m`.

    Args:
        lora_attn_modules .. use_dora: as in :func:`lora_smollm2_135m`.
        num_gist_tokens (int): K. Default: 1.

    Returns:
        TransformerDecoder: the gist-aware LoRA model.
    """
    model = lora_smollm2_135m(
        lora_attn_modules,
        apply_lora_to_mlp=apply_lora_to_mlp,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
    )
    return add_gist_embedding(model, num_gist_tokens, smollm2_gist_token_ids(num_gist_tokens))
