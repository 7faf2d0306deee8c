"""Instruction data with a gist span: the transform, truncation and the dataset builder.

Token layouts (``G`` = the K gist ids, inserted as ids; ``enc`` = the tokenizer without BOS/EOS):

``template="plain"`` (the paper's LLaMA format; BOS first when the tokenizer has one)::

    [BOS] enc("Instruction: {instruction}\\n") G enc("\\nInput: {input}\\nOutput:") | enc("{output}") [EOS]
    [BOS] enc("Instruction: {instruction}\\n") G enc("\\nOutput:")                  | enc("{output}") [EOS]

(the second form when the input is empty).

``template="llama3_chat"`` (Llama 3.1 chat format, headers and ends from special ids)::

    [<|begin_of_text|> <|start_header_id|>] enc("user") [<|end_header_id|>] enc("\\n\\n{instruction}") G
    enc("\\n{input}") [<|eot_id|> <|start_header_id|>] enc("assistant") [<|end_header_id|>] enc("\\n\\n")
    | enc("{output}") [<|eot_id|>]

(``enc("\\n{input}")`` only when the input is non-empty). ``|`` marks ``prompt_len``: labels are
``-100`` before it (unless ``train_on_input``) and on the gist span always; the completion and its
end token are learned.

Truncation policies for examples longer than ``max_seq_len`` (the gist span is never cut):

- ``"output_right"`` (default, as the official code): cut the completion from the right (the end
  token goes with it). A record whose prompt leaves no room for one completion token is dropped (the
  official collator skips it too).
- ``"prompt_left"``: cut instruction tokens from the left (the template's head, ``Instruction:``
  or the user header and ``\\n\\n``, stays, and so does the last token before the gist span). A
  record that does not fit even so is an error.
- ``"drop"``: drop the example.
"""

from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

import numpy as np
from torch.utils.data import Dataset
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.modules.transforms import Transform
from torchtune.utils import get_logger

from torchtune_gist._checks import check_whole
from torchtune_gist.data._common import (
    check_no_gist_in_text,
    check_tokenizer,
    encode_text,
    load_records,
    resolve_gist_ids,
)
from torchtune_gist.data._packing import PackedGistDataset

log = get_logger("INFO")

TEMPLATES = ("plain", "llama3_chat")
TRUNCATION_POLICIES = ("output_right", "prompt_left", "drop")
INSTRUCT_FIELDS = ("instruction", "input", "output")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")


def _column_map(column_map: Optional[Mapping[str, Optional[str]]]) -> Dict[str, Optional[str]]:
    columns: Dict[str, Optional[str]] = {field: field for field in INSTRUCT_FIELDS}
    if column_map is None:
        return columns
    unknown = set(column_map) - set(INSTRUCT_FIELDS)
    if unknown:
        raise ValueError(f"column_map has unknown keys {sorted(unknown)}; expected a subset of {list(INSTRUCT_FIELDS)}")
    for field, column in column_map.items():
        if column is None and field != "input":
            raise ValueError(f"column_map[{field!r}] is None; only 'input' may be mapped to None (no input column)")
        if column is not None and not isinstance(column, str):
            raise ValueError(f"column_map[{field!r}] must be a column name, got {column!r}")
    columns.update(column_map)
    return columns


class GistInstructTransform(Transform):
    """Tokenize an instruction record into ``prompt + gist span + completion`` (layouts: module docstring).

    Args:
        tokenizer (Any): a torchtune Llama 3 tokenizer (or one with ``encode``, ``bos_id``, ``eos_id``
            and reserved/gist ids; ``llama3_chat`` also needs the header and ``eot_id`` ids).
        num_gist_tokens (int): K, at least 1.
        template (str): ``"plain"`` or ``"llama3_chat"``.
        column_map (Optional[Mapping[str, Optional[str]]]): maps ``instruction`` / ``input`` /
            ``output`` to the record's column names; ``{"input": None}`` for data without inputs.
        train_on_input (bool): also learn the prompt tokens (never the gist tokens). Default False.

    Raises:
        ValueError: on an unknown template, a bad K, a tokenizer without the needed ids, or a bad column_map.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        num_gist_tokens: int = 1,
        template: str = "plain",
        column_map: Optional[Mapping[str, Optional[str]]] = None,
        train_on_input: bool = False,
    ) -> None:
        _check_choice("template", template, TEMPLATES)
        needed = ["eos_id"] if template == "plain" else ["bos_id", "start_header_id", "end_header_id", "eot_id"]
        check_tokenizer(tokenizer, needed)
        self.tokenizer = tokenizer
        self.template = template
        self.train_on_input = train_on_input
        self.gist_token_ids = resolve_gist_ids(tokenizer, num_gist_tokens)
        self.num_gist_tokens = num_gist_tokens
        self._columns = _column_map(column_map)
        if template == "plain":
            bos = getattr(tokenizer, "bos_id", None)
            self._head = [] if bos is None else [bos]
            self._instruction_head = encode_text(tokenizer, "Instruction:")
            self._end = [tokenizer.eos_id]
        else:
            t = tokenizer
            self._head = [t.bos_id, t.start_header_id, *encode_text(t, "user"), t.end_header_id]
            self._instruction_head = encode_text(t, "\n\n")
            self._assistant = [
                t.eot_id,
                t.start_header_id,
                *encode_text(t, "assistant"),
                t.end_header_id,
                *encode_text(t, "\n\n"),
            ]
            self._end = [t.eot_id]

    def _encode(self, text: str, what: str) -> List[int]:
        tokens = encode_text(self.tokenizer, text)
        check_no_gist_in_text(tokens, self.gist_token_ids, what)
        return tokens

    def _fields(self, sample: Mapping[str, Any]) -> Dict[str, str]:
        if not isinstance(sample, Mapping):
            raise TypeError(f"a record must be a mapping of fields, got {type(sample).__name__}")
        values = {}
        for field in INSTRUCT_FIELDS:
            column = self._columns[field]
            if column is None:
                values[field] = ""
                continue
            mapped = "" if column == field else f" (column_map maps {field!r} to it)"
            value = sample.get(column)
            if value is None and field == "input" and column in sample:
                value = ""
            if value is None:
                hint = " (data without inputs: column_map={'input': None})" if field == "input" else ""
                raise ValueError(f"missing field {column!r}{mapped}{hint}")
            if not isinstance(value, str):
                raise TypeError(f"field {column!r}{mapped} must be a string, got {type(value).__name__}")
            if field == "instruction" and not value.strip():
                raise ValueError(f"field {column!r}{mapped} is empty")
            values[field] = value
        return values

    def encode_prompt(self, instruction: str, input: str = "") -> Dict[str, Any]:
        """Tokens of the prompt only (up to ``prompt_len``), for generation and caching (``llama3_chat``
        strips the instruction and input, as torchtune's Llama 3 tokenizer strips message text).

        Returns:
            Dict[str, Any]: ``tokens`` (List[int]), ``gist_start`` (index of the first gist id),
            ``instruction_start`` (index of the first instruction token that truncation may cut).
        """
        head = self._head
        if self.template == "llama3_chat":
            instruction, input = instruction.strip(), input.strip()
        if self.template == "plain":
            pre = self._encode(f"Instruction: {instruction}\n", "instruction")
            post = self._encode(f"\nInput: {input}\nOutput:" if input else "\nOutput:", "input")
        else:
            pre = self._encode(f"\n\n{instruction}", "instruction")
            post = (self._encode(f"\n{input}", "input") if input else []) + self._assistant
        n_head = len(self._instruction_head) if pre[: len(self._instruction_head)] == self._instruction_head else 0
        return {
            "tokens": head + pre + self.gist_token_ids + post,
            "gist_start": len(head) + len(pre),
            "instruction_start": len(head) + n_head,
        }

    def __call__(self, sample: Mapping[str, Any]) -> Dict[str, Any]:
        """Tokenize one record.

        Returns:
            Dict[str, Any]: ``tokens`` and ``labels`` (List[int], same length), ``gist_start``,
            ``prompt_len`` (tokens before the completion) and ``instruction_start``.

        An empty output is learned as the end token alone (Stanford Alpaca has such records; the official
        code trains them so). ``llama3_chat`` strips each field, as torchtune's Llama 3 tokenizer does.

        Raises:
            ValueError: on a missing field or an empty instruction, or text that encodes to a gist id.
            TypeError: on a non-string field.
        """
        fields = self._fields(sample)
        prompt = self.encode_prompt(fields["instruction"], fields["input"])
        output = fields["output"].strip() if self.template == "llama3_chat" else fields["output"]
        completion = self._encode(output, "output") + self._end
        prompt_tokens = prompt["tokens"]
        gist_start, k = prompt["gist_start"], self.num_gist_tokens
        if self.train_on_input:
            prompt_labels = list(prompt_tokens)
            prompt_labels[gist_start : gist_start + k] = [CROSS_ENTROPY_IGNORE_IDX] * k
        else:
            prompt_labels = [CROSS_ENTROPY_IGNORE_IDX] * len(prompt_tokens)
        return {
            "tokens": prompt_tokens + completion,
            "labels": prompt_labels + completion,
            "gist_start": gist_start,
            "prompt_len": len(prompt_tokens),
            "instruction_start": prompt["instruction_start"],
        }


def truncate_example(example: Mapping[str, Any], *, max_seq_len: int, truncation: str) -> Optional[Dict[str, Any]]:
    """Fit a transformed example into ``max_seq_len`` tokens by ``truncation`` (see the module docstring).

    Args:
        example (Mapping[str, Any]): output of :class:`GistInstructTransform`.
        max_seq_len (int): the longest allowed example.
        truncation (str): ``"output_right"``, ``"prompt_left"`` or ``"drop"``.

    Returns:
        Optional[Dict[str, Any]]: the example (cut if needed), or ``None`` when dropped.

    Raises:
        ValueError: if ``prompt_left`` cannot fit the example without cutting the gist span, the input or the output.
    """
    _check_choice("truncation", truncation, TRUNCATION_POLICIES)
    tokens, labels = list(example["tokens"]), list(example["labels"])
    n, prompt_len, gist_start = len(tokens), example["prompt_len"], example["gist_start"]
    if n <= max_seq_len:
        return dict(example)
    if truncation == "drop" or (truncation == "output_right" and prompt_len >= max_seq_len):
        return None
    if truncation == "output_right":
        return {**example, "tokens": tokens[:max_seq_len], "labels": labels[:max_seq_len]}
    excess, start = n - max_seq_len, example["instruction_start"]
    cuttable = gist_start - 1 - start
    if excess > cuttable:
        raise ValueError(
            f"the example is {n} tokens; cutting the instruction (at most {max(cuttable, 0)} tokens) cannot fit "
            f"max_seq_len={max_seq_len} without cutting the gist span, the input or the output; use "
            "truncation='drop' to skip such records or raise max_seq_len"
        )
    return {
        **example,
        "tokens": tokens[:start] + tokens[start + excess :],
        "labels": labels[:start] + labels[start + excess :],
        "gist_start": gist_start - excess,
        "prompt_len": prompt_len - excess,
    }


class GistInstructDataset(Dataset):
    """Instruction records tokenized (eagerly, so bad records fail at once) with a gist span.

    Items: ``tokens``, ``labels`` (List[int]), ``gist_start``, ``prompt_len`` and ``index`` (the record's
    position in the source). ``num_truncated`` / ``num_dropped`` count over-long records.

    Args:
        records (Iterable[Mapping[str, Any]]): source records (a ``datasets.Dataset`` or a list of dicts).
        transform (GistInstructTransform): the tokenizing transform.
        max_seq_len (Optional[int]): the longest example; ``None`` for no limit.
        truncation (str): ``"output_right"``, ``"prompt_left"`` or ``"drop"``.
        name (str): how errors and the log line name the data.

    Raises:
        ValueError: naming the record index, for a bad record; or when no example is left.
    """

    def __init__(
        self,
        records: Iterable[Mapping[str, Any]],
        transform: GistInstructTransform,
        *,
        max_seq_len: Optional[int] = None,
        truncation: str = "output_right",
        name: str = "instruction data",
    ) -> None:
        _check_choice("truncation", truncation, TRUNCATION_POLICIES)
        check_whole("max_seq_len", max_seq_len, optional=True)
        self.max_seq_len, self.truncation = max_seq_len, truncation
        self.gist_token_ids = transform.gist_token_ids
        self.num_truncated = self.num_dropped = 0
        self._examples: List[Dict[str, Any]] = []
        num_records = 0
        for index, record in enumerate(records):
            num_records += 1
            try:
                full = transform(record)
                example = full
                if max_seq_len is not None:
                    example = truncate_example(full, max_seq_len=max_seq_len, truncation=truncation)
            except (ValueError, TypeError) as err:
                raise type(err)(f"{name}: record {index}: {err}") from err
            if example is None:
                self.num_dropped += 1
                continue
            self.num_truncated += len(example["tokens"]) < len(full["tokens"])
            self._examples.append(
                {
                    "tokens": np.asarray(example["tokens"], dtype=np.int32),
                    "labels": np.asarray(example["labels"], dtype=np.int32),
                    "gist_start": example["gist_start"],
                    "prompt_len": example["prompt_len"],
                    "index": index,
                }
            )
        if not self._examples:
            raise ValueError(
                f"{name}: no examples: {num_records} records, {self.num_dropped} dropped as longer than "
                f"max_seq_len={max_seq_len}"
            )
        log.info(
            f"{name}: {len(self._examples)} examples from {num_records} records; {self.num_truncated} truncated "
            f"({truncation}), {self.num_dropped} dropped (max_seq_len={max_seq_len})"
        )

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        example = self._examples[index]
        return {**example, "tokens": example["tokens"].tolist(), "labels": example["labels"].tolist()}


def gist_instruct_dataset(
    tokenizer: Any,
    *,
    source: str,
    data_files: Optional[Any] = None,
    split: str = "train",
    num_gist_tokens: int = 1,
    template: str = "plain",
    column_map: Optional[Mapping[str, Optional[str]]] = None,
    train_on_input: bool = False,
    max_seq_len: Optional[int] = None,
    truncation: str = "output_right",
    max_examples: Optional[int] = None,
    packed: bool = False,
    **load_dataset_kwargs: Dict[str, Any],
) -> Union[GistInstructDataset, PackedGistDataset]:
    """Instruction data with K gist tokens after the instruction, from local files or the hub.

    ``source`` and ``data_files`` go to ``datasets.load_dataset`` (e.g. ``source="json",
    data_files="train.jsonl"``, or ``"parquet"``, or a hub name). Layouts, labels and truncation:
    see :mod:`torchtune_gist.data._instruct`.

    Args:
        tokenizer (Any): the model tokenizer (torchtune Llama 3 style).
        source (str): ``load_dataset`` path or builder name.
        data_files (Optional[Any]): local file(s).
        split (str): split to load. Default ``"train"``.
        num_gist_tokens (int): K.
        template (str): ``"plain"`` or ``"llama3_chat"``.
        column_map (Optional[Mapping[str, Optional[str]]]): field -> column names.
        train_on_input (bool): also learn the prompt (never the gists).
        max_seq_len (Optional[int]): the longest example; ``None`` uses ``tokenizer.max_seq_len`` if set.
        truncation (str): ``"output_right"``, ``"prompt_left"`` or ``"drop"``.
        max_examples (Optional[int]): use only the first records.
        packed (bool): pack examples into rows of ``max_seq_len`` (:class:`PackedGistDataset`).
        **load_dataset_kwargs (Dict[str, Any]): passed to ``load_dataset``.

    Returns:
        Union[GistInstructDataset, PackedGistDataset]: the dataset.

    Raises:
        ValueError: on a bad setting, a malformed file, or a bad record (naming its index).
    """
    transform = GistInstructTransform(
        tokenizer,
        num_gist_tokens=num_gist_tokens,
        template=template,
        column_map=column_map,
        train_on_input=train_on_input,
    )
    _check_choice("truncation", truncation, TRUNCATION_POLICIES)
    if max_seq_len is None:
        max_seq_len = getattr(tokenizer, "max_seq_len", None)
    check_whole("max_seq_len", max_seq_len, optional=True)
    if packed and max_seq_len is None:
        raise ValueError("packed=True needs max_seq_len (or a tokenizer with max_seq_len set)")
    records = load_records(source, data_files=data_files, split=split, max_examples=max_examples, **load_dataset_kwargs)
    ds = GistInstructDataset(
        records, transform, max_seq_len=max_seq_len, truncation=truncation, name=str(data_files or source)
    )
    if packed:
        return PackedGistDataset(ds, max_seq_len=max_seq_len, pad_id=tokenizer.pad_id)
    return ds
