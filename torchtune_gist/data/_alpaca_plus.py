"""Alpaca+ (Mu et al., 2023): the validation splits from the official files, the train split rebuilt.

The official training file is not redistributed with this project; :func:`build_alpaca_plus_train`
rebuilds it from Stanford Alpaca's ``alpaca_data.json`` (a JSON list) and Self-Instruct's
``all_instances_82K.jsonl`` (one ``{"instruction", "input", "output"}`` object per line), following
the official ``data/create_alpaca_plus_data.py`` of jayelm/gisting:

1. Self-Instruct, grouped by instruction (in order of first appearance): for each instruction with
   2+ instances whose first instance has a non-empty input, that first instance goes to
   ``validation_seen`` (until there are ``num_validation_seen``); every other instance goes to
   training unless its ``(instruction, input)`` was already used (validation or training).
2. Alpaca, in order: a record with a non-empty input whose instruction is not among the training
   instructions goes to ``validation_unseen`` (until there are ``num_validation_unseen``); every
   other record goes to training (no deduplication), adding its instruction to the training
   instructions.

Every record gets ``source`` = ``"self_instruct"`` or ``"alpaca"``. The files are named like the
official ones (``alpaca_plus_{split}.json``), so ``alpaca_plus_dataset(data_dir=out_dir)`` reads them.
"""

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from torchtune_gist._io import atomic_write_json
from torchtune_gist.data._instruct import GistInstructDataset, gist_instruct_dataset
from torchtune_gist.data._packing import PackedGistDataset

ALPACA_PLUS_SPLITS = ("train", "validation_seen", "validation_unseen", "validation_human")
_FIELDS = ("instruction", "input", "output")


def alpaca_plus_filename(split: str) -> str:
    """The file name of an Alpaca+ split, e.g. ``alpaca_plus_validation_seen.json``."""
    if split not in ALPACA_PLUS_SPLITS:
        raise ValueError(f"unknown Alpaca+ split {split!r}; expected one of {', '.join(ALPACA_PLUS_SPLITS)}")
    return f"alpaca_plus_{split}.json"


def _check_records(records: Sequence[Any], name: str) -> None:
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise ValueError(f"{name}: record {i} is not a JSON object")
        for field in _FIELDS:
            if not isinstance(record.get(field), str):
                raise ValueError(f"{name}: record {i}: field {field!r} is missing or not a string")


def split_alpaca_plus(
    alpaca: Sequence[Mapping[str, str]],
    self_instruct: Sequence[Mapping[str, str]],
    *,
    num_validation_seen: int = 1000,
    num_validation_unseen: int = 1000,
) -> Dict[str, List[Dict[str, str]]]:
    """Split Alpaca and Self-Instruct records into Alpaca+ train / validation_seen / validation_unseen.

    Args:
        alpaca (Sequence[Mapping[str, str]]): Stanford Alpaca records, in file order.
        self_instruct (Sequence[Mapping[str, str]]): Self-Instruct instances, in file order.
        num_validation_seen (int): size of ``validation_seen`` (1000 officially).
        num_validation_unseen (int): size of ``validation_unseen`` (1000 officially).

    Returns:
        Dict[str, List[Dict[str, str]]]: ``train``, ``validation_seen``, ``validation_unseen``.

    Raises:
        ValueError: on a malformed record, or an Alpaca training record that repeats a
            ``validation_unseen`` instruction (the official script's sanity check).
    """
    _check_records(alpaca, "alpaca")
    _check_records(self_instruct, "self_instruct")
    by_instruction: Dict[str, List[Dict[str, str]]] = {}
    for record in self_instruct:
        by_instruction.setdefault(record["instruction"], []).append({**record, "source": "self_instruct"})

    train: List[Dict[str, str]] = []
    used = set()
    seen: List[Dict[str, str]] = []
    for instances in by_instruction.values():
        rest = instances
        if len(seen) < num_validation_seen and len(instances) > 1 and instances[0]["input"]:
            seen.append(instances[0])
            used.add((instances[0]["instruction"], instances[0]["input"]))
            rest = instances[1:]
        for record in rest:
            key = (record["instruction"], record["input"])
            if key not in used:
                train.append(record)
                used.add(key)

    train_instructions = {record["instruction"] for record in train}
    unseen: List[Dict[str, str]] = []
    unseen_instructions = set()
    for i, record in enumerate(alpaca):
        record = {**record, "source": "alpaca"}
        if len(unseen) < num_validation_unseen and record["input"] and record["instruction"] not in train_instructions:
            unseen.append(record)
            unseen_instructions.add(record["instruction"])
            continue
        if record["instruction"] in unseen_instructions:
            raise ValueError(
                f"alpaca record {i} would go to training but its instruction is already in validation_unseen"
            )
        train.append(record)
        train_instructions.add(record["instruction"])
    return {"train": train, "validation_seen": seen, "validation_unseen": unseen}


def read_json_list(path: Path) -> List[Any]:
    """Read a JSON file holding a list of records; a clear ValueError naming the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _read_jsonl(path: Path) -> List[Any]:
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {line_no} is not valid JSON: {err}") from err
    return records


def build_alpaca_plus_train(
    alpaca_json: Union[str, Path],
    self_instruct_jsonl: Union[str, Path],
    out_dir: Union[str, Path],
    *,
    num_validation_seen: int = 1000,
    num_validation_unseen: int = 1000,
    overwrite: bool = False,
) -> Dict[str, int]:
    """Rebuild the Alpaca+ train split (and the seen/unseen validation splits it excludes).

    Writes ``alpaca_plus_train.json``, ``alpaca_plus_validation_seen.json`` and
    ``alpaca_plus_validation_unseen.json`` into ``out_dir`` atomically (procedure: module docstring).

    Args:
        alpaca_json (Union[str, Path]): Stanford Alpaca's ``alpaca_data.json``.
        self_instruct_jsonl (Union[str, Path]): Self-Instruct's ``all_instances_82K.jsonl``.
        out_dir (Union[str, Path]): output folder.
        num_validation_seen (int): size of ``validation_seen`` (1000 officially).
        num_validation_unseen (int): size of ``validation_unseen`` (1000 officially).
        overwrite (bool): replace existing output files. Default False.

    Returns:
        Dict[str, int]: the number of records per split.

    Raises:
        ValueError: on a malformed source file or record, or existing outputs without ``overwrite``.
        FileNotFoundError: if a source file is missing.
    """
    out_dir = Path(out_dir)
    names = ("train", "validation_seen", "validation_unseen")
    targets = {split: out_dir / alpaca_plus_filename(split) for split in names}
    existing = [str(p) for p in targets.values() if p.exists()]
    if existing and not overwrite:
        raise ValueError(f"output files exist: {', '.join(existing)} (pass overwrite=True / --overwrite)")
    splits = split_alpaca_plus(
        read_json_list(Path(alpaca_json)),
        _read_jsonl(Path(self_instruct_jsonl)),
        num_validation_seen=num_validation_seen,
        num_validation_unseen=num_validation_unseen,
    )
    for split, path in targets.items():
        atomic_write_json(splits[split], path)
    return {split: len(records) for split, records in splits.items()}


def alpaca_plus_dataset(
    tokenizer: Any,
    *,
    data_dir: Union[str, Path],
    split: str = "validation_seen",
    num_gist_tokens: int = 1,
    template: str = "plain",
    train_on_input: bool = False,
    max_seq_len: Optional[int] = None,
    truncation: str = "output_right",
    max_examples: Optional[int] = None,
    packed: bool = False,
) -> Union[GistInstructDataset, PackedGistDataset]:
    """An Alpaca+ split as gist instruction data (see :func:`gist_instruct_dataset`).

    Args:
        tokenizer (Any): the model tokenizer.
        data_dir (Union[str, Path]): folder with ``alpaca_plus_{split}.json`` (the official
            validation files; ``alpaca_plus_train.json`` from :func:`build_alpaca_plus_train`).
        split (str): ``"train"``, ``"validation_seen"``, ``"validation_unseen"`` or ``"validation_human"``.
        num_gist_tokens (int): K.
        template (str): ``"plain"`` or ``"llama3_chat"``.
        train_on_input (bool): also learn the prompt.
        max_seq_len (Optional[int]): the longest example (512 officially, 768 for ``validation_human``).
        truncation (str): ``"output_right"``, ``"prompt_left"`` or ``"drop"``.
        max_examples (Optional[int]): use only the first records.
        packed (bool): pack into rows of ``max_seq_len``.

    Returns:
        Union[GistInstructDataset, PackedGistDataset]: the dataset.

    Raises:
        ValueError: on an unknown split or another bad setting.
        FileNotFoundError: if the split's file is missing.
    """
    path = Path(data_dir) / alpaca_plus_filename(split)
    if not path.is_file():
        hint = (
            " (rebuild it: python -m torchtune_gist.data.alpaca_plus --alpaca alpaca_data.json "
            "--self-instruct all_instances_82K.jsonl --out DIR)"
            if split == "train"
            else f" (the official file: https://raw.githubusercontent.com/jayelm/gisting/main/data/alpaca_plus/{path.name})"
        )
        raise FileNotFoundError(f"Alpaca+ {split} file not found: {path}{hint}")
    return gist_instruct_dataset(
        tokenizer,
        source="json",
        data_files=str(path),
        num_gist_tokens=num_gist_tokens,
        template=template,
        train_on_input=train_on_input,
        max_seq_len=max_seq_len,
        truncation=truncation,
        max_examples=max_examples,
        packed=packed,
    )


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, int]:
    """CLI: ``python -m torchtune_gist.data.alpaca_plus --alpaca A --self-instruct S --out DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m torchtune_gist.data.alpaca_plus", description="Rebuild the Alpaca+ training split."
    )
    parser.add_argument("--alpaca", required=True, help="Stanford Alpaca alpaca_data.json")
    parser.add_argument("--self-instruct", required=True, help="Self-Instruct all_instances_82K.jsonl")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-validation-seen", type=int, default=1000)
    parser.add_argument("--num-validation-unseen", type=int, default=1000)
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = parser.parse_args(argv)
    try:
        counts = build_alpaca_plus_train(
            args.alpaca,
            args.self_instruct,
            args.out,
            num_validation_seen=args.num_validation_seen,
            num_validation_unseen=args.num_validation_unseen,
            overwrite=args.overwrite,
        )
    except (OSError, ValueError, TypeError) as err:
        parser.error(str(err))
    print(json.dumps(counts))
    return counts
