"""Gist caching: compress prompts once into K gist keys/values, save and reuse them, generate from them.

- :func:`compress` runs prompts (each ending with its gist span) and keeps the gist positions'
  keys/values of every layer as a :class:`GistCache` (saved and loaded as safetensors).
- :func:`generate_from_cache` generates after a cache, holding only K + continuation + new tokens.
- :func:`generate` runs the evaluation's modes (``gist``, ``pos_control``, ``neg_control``,
  ``truncate``) through the same decoding loop, reporting the KV bytes each holds.
- :func:`score_continuations` scores continuations under the same modes through the same stores
  (the log-probabilities lm-eval's ``loglikelihood`` asks for).

Decoding attends over the filled cache slots only and never copies keys/values for grouped-query
attention (see ``_attention.py``), so its cost follows what the cache holds. Prompts go through in
chunks of ``chunk_size`` tokens (default :data:`DEFAULT_CHUNK_SIZE`), and :func:`compress` holds one
layer's prompt keys/values at a time, so the memory a long prompt needs grows with the chunk and
one layer, not with the square of the prompt or the model's depth.
"""

from torchtune_gist.generation._attention import DEFAULT_CHUNK_SIZE, KVStore, grouped_query_attention, store_attention
from torchtune_gist.generation._cache import GistCache, compress, model_fingerprint
from torchtune_gist.generation._generate import (
    GENERATION_MODES,
    GenerationMode,
    GenerationOutput,
    generate,
    generate_from_cache,
    score_continuations,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "GENERATION_MODES",
    "GenerationMode",
    "GenerationOutput",
    "GistCache",
    "KVStore",
    "compress",
    "generate",
    "generate_from_cache",
    "grouped_query_attention",
    "model_fingerprint",
    "score_continuations",
    "store_attention",
]
