"""Greedy packing of tokenized gist examples into fixed-length rows (one gist span per document).

Like torchtune's :class:`~torchtune.datasets.PackedDataset` with ``split_across_pack=False``:
examples are taken in order and a row is closed when the next example does not fit; an example is
never split. Each row carries ``document_ids`` (for ``make_gist_mask(..., document_ids=...)``: no
attention across documents) and ``input_pos`` restarting at 0 for each document (padding continues
the last document's positions, clamped, as torchtune does).

Labels: the recipe shifts labels by one (position ``p`` learns ``labels[p + 1]``), so the label at
each document's first position would be the target of the previous document's last token. torchtune
relies on that label being masked (BOS is never learned in its SFT data); here it is set to
``ignore_idx`` explicitly, so no cross-document target can appear even with ``train_on_input``.
Padding labels are ``ignore_idx`` and padding tokens are ``pad_id``.
"""

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.utils import get_logger

from torchtune_gist._checks import check_whole, is_whole
from torchtune_gist.masks import document_ids_from_lengths

log = get_logger("INFO")


def padding_fraction(seq_lens: Sequence[Sequence[int]], max_seq_len: int) -> float:
    """Share of padding in packed rows of ``max_seq_len`` holding documents of ``seq_lens`` (per row).

    Example:
        >>> padding_fraction([[3, 2], [4]], 6)
        0.25
    """
    if not seq_lens:
        return 0.0
    used = sum(int(n) for lens in seq_lens for n in lens)
    return 1.0 - used / (len(seq_lens) * max_seq_len)


class PackedGistDataset(Dataset):
    """Pack a tokenized dataset (items with ``tokens`` and ``labels``) into rows of ``max_seq_len``.

    Items: ``tokens``, ``labels``, ``input_pos``, ``document_ids`` (each a long tensor ``[max_seq_len]``)
    and ``seq_lens`` (``[n_docs]``, padding excluded); collate with :func:`packed_gist_collate`.

    Args:
        ds (Dataset): tokenized examples, each with its own gist span (or none).
        max_seq_len (int): row length.
        pad_id (int): padding token id (the tokenizer's ``pad_id``).
        ignore_idx (int): label of ignored positions. Default -100.
        max_packs (Optional[int]): stop after this many rows.

    Raises:
        ValueError: if an example is longer than ``max_seq_len`` or malformed (naming its index).
    """

    def __init__(
        self,
        ds: Dataset,
        *,
        max_seq_len: int,
        pad_id: int,
        ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX,
        max_packs: Optional[int] = None,
    ) -> None:
        check_whole("max_seq_len", max_seq_len)
        if not is_whole(pad_id):
            raise ValueError(f"pad_id must be an integer token id, got {pad_id!r}")
        self.max_seq_len, self.pad_id, self.ignore_idx = max_seq_len, int(pad_id), ignore_idx
        self.packs: List[Dict[str, torch.Tensor]] = []
        current: List[Dict[str, List[int]]] = []
        used = num_examples = 0
        for index in range(len(ds)):
            if max_packs is not None and len(self.packs) >= max_packs:
                break
            sample = ds[index]
            tokens, labels = [int(t) for t in sample["tokens"]], [int(t) for t in sample["labels"]]
            if not tokens or len(tokens) != len(labels):
                raise ValueError(
                    f"example {index}: tokens ({len(tokens)}) and labels ({len(labels)}) must be non-empty "
                    "and of the same length"
                )
            if len(tokens) > max_seq_len:
                raise ValueError(
                    f"example {index} has {len(tokens)} tokens > max_seq_len={max_seq_len}; examples are never "
                    "split across rows: truncate them first (max_seq_len on the dataset) or raise max_seq_len"
                )
            if used + len(tokens) > max_seq_len:
                self.packs.append(self._pack(current))
                current, used = [], 0
            current.append({"tokens": tokens, "labels": labels})
            used += len(tokens)
            num_examples += 1
        if current and (max_packs is None or len(self.packs) < max_packs):
            self.packs.append(self._pack(current))
        self.padding_fraction = padding_fraction([p["seq_lens"].tolist() for p in self.packs], max_seq_len)
        log.info(
            f"Packed {num_examples} examples into {len(self.packs)} rows of {max_seq_len} tokens; "
            f"padding fraction {self.padding_fraction:.3f}"
        )

    def _pack(self, examples: List[Dict[str, List[int]]]) -> Dict[str, torch.Tensor]:
        tokens: List[int] = []
        labels: List[int] = []
        input_pos: List[int] = []
        for ex in examples:
            tokens += ex["tokens"]
            labels += [self.ignore_idx] + ex["labels"][1:]
            input_pos += range(len(ex["tokens"]))
        seq_lens = [len(ex["tokens"]) for ex in examples]
        num_pad = self.max_seq_len - len(tokens)
        last = input_pos[-1]
        input_pos += [min(last + 1 + i, self.max_seq_len - 1) for i in range(num_pad)]
        return {
            "tokens": torch.tensor(tokens + [self.pad_id] * num_pad, dtype=torch.long),
            "labels": torch.tensor(labels + [self.ignore_idx] * num_pad, dtype=torch.long),
            "input_pos": torch.tensor(input_pos, dtype=torch.long),
            "document_ids": document_ids_from_lengths([seq_lens], self.max_seq_len)[0],
            "seq_lens": torch.tensor(seq_lens, dtype=torch.long),
        }

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return self.packs[index]
