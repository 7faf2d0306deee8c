"""Which token ids are gist tokens.

Llama 3 reserves 250-odd special tokens for fine-tuning (``<|reserved_special_token_N|>``); their
embeddings are untrained in the released weights. The K gist tokens are the K reserved tokens with
the **highest ids**, in ascending order: for Llama 3.1's vocabulary, ids ``128256 - K .. 128255``.
Taking them from the top keeps the low reserved ids free for other uses and makes the choice depend
only on K. Gist ids are always inserted as ids, never as text (Llama 3's tokenizer encodes
special-token strings found in text as plain text).

A tokenizer without reserved tokens (SmolLM2) provides its own ``gist_token_ids(k)`` method.
"""

import re
from typing import Any, List

from torchtune_gist._checks import check_whole

_RESERVED = re.compile(r"^<\|reserved_special_token_\d+\|>$")


def gist_token_ids(tokenizer: Any, num_gist_tokens: int) -> List[int]:
    """The ``num_gist_tokens`` gist ids for ``tokenizer``, ascending.

    Args:
        tokenizer (Any): a torchtune Llama 3 tokenizer (``special_tokens`` mapping), or any tokenizer
            with a ``gist_token_ids(k)`` method.
        num_gist_tokens (int): K, at least 1.

    Returns:
        List[int]: K distinct token ids.

    Raises:
        ValueError: if K is not a whole number >= 1, the tokenizer has no reserved tokens, or
            fewer than K.
    """
    check_whole("num_gist_tokens", num_gist_tokens)
    own = getattr(tokenizer, "gist_token_ids", None)
    if callable(own):
        return list(own(num_gist_tokens))
    special = getattr(tokenizer, "special_tokens", None)
    if not isinstance(special, dict):
        raise ValueError(
            f"{type(tokenizer).__name__} has no special_tokens mapping and no gist_token_ids(k) method: "
            "cannot choose gist token ids for it"
        )
    reserved = sorted(tid for name, tid in special.items() if _RESERVED.match(name))
    if not reserved:
        raise ValueError(f"{type(tokenizer).__name__} has no <|reserved_special_token_N|> tokens to use as gist tokens")
    if num_gist_tokens > len(reserved):
        raise ValueError(
            f"num_gist_tokens={num_gist_tokens} but the tokenizer has only {len(reserved)} reserved special tokens"
        )
    return reserved[-num_gist_tokens:]


def default_gist_token_ids(vocab_size: int, num_gist_tokens: int) -> List[int]:
    """Gist ids for a model with a Llama 3 vocabulary layout: the top ``num_gist_tokens`` ids.

    Matches :func:`gist_token_ids` for Llama 3 tokenizers up to K = 243 (their reserved tokens fill
    ids 128013-128255; beyond, the tokenizer's next reserved ids are 128003 and 128002) and for the tiny
    test tokenizer, whose reserved tokens fill the top of the vocabulary.
    """
    check_whole("num_gist_tokens", num_gist_tokens)
    if num_gist_tokens >= vocab_size:
        raise ValueError(f"num_gist_tokens={num_gist_tokens} does not fit a vocabulary of {vocab_size}")
    return list(range(vocab_size - num_gist_tokens, vocab_size))
