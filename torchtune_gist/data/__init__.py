"""Gist data: instruction and passkey datasets and transforms, Alpaca+, padded and packed collation."""

from torchtune_gist.data._alpaca_plus import (
    ALPACA_PLUS_SPLITS,
    alpaca_plus_dataset,
    alpaca_plus_filename,
    build_alpaca_plus_train,
    split_alpaca_plus,
)
from torchtune_gist.data._collate import packed_gist_collate, padded_gist_collate
from torchtune_gist.data._instruct import (
    TEMPLATES,
    TRUNCATION_POLICIES,
    GistInstructDataset,
    GistInstructTransform,
    gist_instruct_dataset,
    truncate_example,
)
from torchtune_gist.data._packing import PackedGistDataset, padding_fraction
from torchtune_gist.data._passkey import (
    FILLER_SENTENCES,
    NEEDLES,
    QUESTIONS,
    GistPasskeyDataset,
    GistPasskeyTransform,
    gist_passkey_dataset,
    make_passkey_sample,
    make_passkey_samples,
)

__all__ = [
    "ALPACA_PLUS_SPLITS",
    "FILLER_SENTENCES",
    "NEEDLES",
    "QUESTIONS",
    "TEMPLATES",
    "TRUNCATION_POLICIES",
    "GistInstructDataset",
    "GistInstructTransform",
    "GistPasskeyDataset",
    "GistPasskeyTransform",
    "PackedGistDataset",
    "alpaca_plus_dataset",
    "alpaca_plus_filename",
    "build_alpaca_plus_train",
    "gist_instruct_dataset",
    "gist_passkey_dataset",
    "make_passkey_sample",
    "make_passkey_samples",
    "packed_gist_collate",
    "padded_gist_collate",
    "padding_fraction",
    "split_alpaca_plus",
    "truncate_example",
]
