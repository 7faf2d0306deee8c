"""Helpers shared by the gist datasets: gist ids, loading local/hub data, tokenizer checks."""

from typing import Any, Dict, List, Optional

from datasets import Dataset as HFDataset
from datasets import load_dataset
from datasets.exceptions import DatasetGenerationError

from torchtune_gist._checks import check_whole, is_whole
from torchtune_gist.gist_tokens import gist_token_ids


def resolve_gist_ids(tokenizer: Any, num_gist_tokens: int, *, allow_zero: bool = False) -> List[int]:
    """The gist ids for ``tokenizer`` (``[]`` for ``num_gist_tokens=0`` when ``allow_zero``).

    Raises:
        ValueError: on a bad K, a tokenizer without reserved ids, or fewer reserved ids than K.
    """
    if allow_zero and is_whole(num_gist_tokens) and num_gist_tokens == 0:
        return []
    return gist_token_ids(tokenizer, num_gist_tokens)


def encode_text(tokenizer: Any, text: str) -> List[int]:
    """Token ids of ``text`` without BOS/EOS."""
    return list(tokenizer.encode(text, add_bos=False, add_eos=False))


def check_tokenizer(tokenizer: Any, attrs: List[str]) -> None:
    """Raise a ``ValueError`` naming the first of ``attrs`` (or ``encode``) the tokenizer lacks."""
    if not callable(getattr(tokenizer, "encode", None)):
        raise ValueError(f"{type(tokenizer).__name__} has no encode(text, add_bos=..., add_eos=...) method")
    for attr in attrs:
        if getattr(tokenizer, attr, None) is None:
            raise ValueError(f"{type(tokenizer).__name__} has no {attr}, which this template needs")


def check_no_gist_in_text(tokens: List[int], gist_ids: List[int], what: str) -> None:
    """Raise if encoded text produced a gist id (the gist span must come only from inserted ids)."""
    gist_set = set(gist_ids)
    if any(t in gist_set for t in tokens):
        raise ValueError(f"the {what} text encodes to a gist token id; gist ids must only be inserted as ids")


def load_records(
    source: str,
    *,
    data_files: Optional[Any] = None,
    split: str = "train",
    max_examples: Optional[int] = None,
    **load_dataset_kwargs: Dict[str, Any],
) -> HFDataset:
    """Load a ``datasets.Dataset`` with ``load_dataset(source, data_files=..., split=...)``.

    Raises:
        ValueError: if the file cannot be parsed or ``max_examples`` is not a whole number >= 1.
    """
    check_whole("max_examples", max_examples, optional=True)
    try:
        data = load_dataset(source, data_files=data_files, split=split, **load_dataset_kwargs)
    except DatasetGenerationError as err:
        cause = err.__cause__ or err
        raise ValueError(f"could not read {data_files or source!r}: {cause}") from err
    if max_examples is not None and max_examples < len(data):
        data = data.select(range(max_examples))
    return data
