"""Shared fixtures: the tiny byte-level Llama 3 tokenizer, made in code (no downloads)."""

from pathlib import Path
from typing import Tuple

import pytest
import torch
from torchtune.models.llama3 import llama3_tokenizer
from torchtune.models.llama3._tokenizer import Llama3Tokenizer

from torchtune_gist.tiny import write_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_files(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Path]:
    """Paths of the tiny tiktoken file and its special-tokens JSON."""
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_files: Tuple[Path, Path]) -> Llama3Tokenizer:
    """torchtune's Llama 3 tokenizer over a 512-token byte vocabulary."""
    model_path, special_path = tiny_tokenizer_files
    return llama3_tokenizer(str(model_path), special_tokens_path=str(special_path))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
