"""Gist-specific modules."""

from torchtune_gist.modules.gist_embedding import (
    GIST_PARAM_NAME,
    GistEmbedding,
    get_gist_embedding,
    init_gist_embeddings,
    initial_gist_rows,
    set_trainable_params,
    state_dict_name,
    trainable_gist_params,
)
from torchtune_gist.modules.output import SelectedOutput, output_at

__all__ = [
    "GIST_PARAM_NAME",
    "GistEmbedding",
    "SelectedOutput",
    "get_gist_embedding",
    "init_gist_embeddings",
    "initial_gist_rows",
    "output_at",
    "set_trainable_params",
    "state_dict_name",
    "trainable_gist_params",
]
