"""Instruction data: exact token layouts, labels, truncation, bad input, Alpaca+ files and rebuild."""

import json
import logging
from pathlib import Path
from typing import List

import pytest
from datasets import Dataset as HFDataset

from torchtune_gist.data import (
    GistInstructDataset,
    GistInstructTransform,
    PackedGistDataset,
    alpaca_plus_dataset,
    build_alpaca_plus_train,
    gist_instruct_dataset,
    split_alpaca_plus,
    truncate_example,
)
from torchtune_gist.data._alpaca_plus import main as alpaca_plus_main
from torchtune_gist.gist_tokens import gist_token_ids

IGNORE = -100
ALPACA_PLUS_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_plus"


def b(text: str) -> List[int]:
    """Ids of ``text`` under the tiny byte-level tokenizer: its UTF-8 bytes."""
    return list(text.encode("utf-8"))


RECORD = {"instruction": "Add the numbers.", "input": "2, 3", "output": "5"}


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("k", [1, 3])
def test_plain_layout_with_input(tiny_tokenizer, k):
    t = tiny_tokenizer
    gists = gist_token_ids(t, k)
    ex = GistInstructTransform(t, num_gist_tokens=k)(RECORD)
    prompt = [t.bos_id] + b("Instruction: Add the numbers.\n") + gists + b("\nInput: 2, 3\nOutput:")
    assert ex["tokens"] == prompt + b("5") + [t.eos_id]
    assert ex["labels"] == [IGNORE] * len(prompt) + b("5") + [t.eos_id]
    assert ex["prompt_len"] == len(prompt)
    assert ex["gist_start"] == 1 + len(b("Instruction: Add the numbers.\n"))
    assert ex["tokens"][ex["gist_start"] : ex["gist_start"] + k] == gists


def test_plain_layout_without_input(tiny_tokenizer):
    t = tiny_tokenizer
    g = gist_token_ids(t, 2)
    ex = GistInstructTransform(t, num_gist_tokens=2)({"instruction": "Say hi.", "input": "", "output": "hi"})
    prompt = [t.bos_id] + b("Instruction: Say hi.\n") + g + b("\nOutput:")
    assert ex["tokens"] == prompt + b("hi") + [t.eos_id]
    assert ex["labels"] == [IGNORE] * len(prompt) + b("hi") + [t.eos_id]


def test_llama3_chat_layout(tiny_tokenizer):
    t = tiny_tokenizer
    g = gist_token_ids(t, 2)
    transform = GistInstructTransform(t, num_gist_tokens=2, template="llama3_chat")
    ex = transform(RECORD)
    user = [t.bos_id, t.start_header_id] + b("user") + [t.end_header_id] + b("\n\nAdd the numbers.")
    assistant = [t.eot_id, t.start_header_id] + b("assistant") + [t.end_header_id] + b("\n\n")
    prompt = user + g + b("\n2, 3") + assistant
    assert ex["tokens"] == prompt + b("5") + [t.eot_id]
    assert ex["labels"] == [IGNORE] * len(prompt) + b("5") + [t.eot_id]
    assert ex["gist_start"] == len(user)
    assert ex["prompt_len"] == len(prompt)
    assert t.bos_id == t.special_tokens["<|begin_of_text|>"] and t.eot_id == t.special_tokens["<|eot_id|>"]

    no_input = transform({"instruction": "Say hi.", "input": "", "output": "hi"})
    prompt = [t.bos_id, t.start_header_id] + b("user") + [t.end_header_id] + b("\n\nSay hi.") + g + assistant
    assert no_input["tokens"] == prompt + b("hi") + [t.eot_id]


def test_train_on_input_never_learns_gists(tiny_tokenizer):
    t = tiny_tokenizer
    ex = GistInstructTransform(t, num_gist_tokens=3, train_on_input=True)(RECORD)
    gs = ex["gist_start"]
    assert ex["labels"][gs : gs + 3] == [IGNORE] * 3
    assert ex["labels"][:gs] == ex["tokens"][:gs]
    assert ex["labels"][gs + 3 :] == ex["tokens"][gs + 3 :]


def test_encode_prompt_is_the_prefix(tiny_tokenizer):
    transform = GistInstructTransform(tiny_tokenizer, num_gist_tokens=2, template="llama3_chat")
    ex = transform(RECORD)
    prompt = transform.encode_prompt(RECORD["instruction"], RECORD["input"])
    assert prompt["tokens"] == ex["tokens"][: ex["prompt_len"]]
    assert prompt["gist_start"] == ex["gist_start"]


def test_column_map(tiny_tokenizer):
    t = tiny_tokenizer
    mapped = GistInstructTransform(t, column_map={"instruction": "q", "input": "ctx", "output": "a"})
    assert mapped({"q": "Add the numbers.", "ctx": "2, 3", "a": "5"}) == GistInstructTransform(t)(RECORD)
    no_input = GistInstructTransform(t, column_map={"input": None})
    assert (
        no_input({"instruction": "Say hi.", "output": "hi"})["tokens"]
        == GistInstructTransform(t)({"instruction": "Say hi.", "input": "", "output": "hi"})["tokens"]
    )


# ----------------------------------------------------------------------------- truncation


def _long_record() -> dict:
    return {"instruction": "I" * 40, "input": "x", "output": "O" * 30}


def test_truncate_output_right(tiny_tokenizer):
    t = tiny_tokenizer
    ex = GistInstructTransform(t, num_gist_tokens=2)(_long_record())
    cut = truncate_example(ex, max_seq_len=ex["prompt_len"] + 5, truncation="output_right")
    assert cut["tokens"] == ex["tokens"][: ex["prompt_len"] + 5]
    assert cut["labels"][ex["prompt_len"] :] == b("O" * 5)
    assert cut["gist_start"] == ex["gist_start"] and cut["prompt_len"] == ex["prompt_len"]


def test_truncate_prompt_left_keeps_head_and_gists(tiny_tokenizer):
    t = tiny_tokenizer
    g = gist_token_ids(t, 2)
    ex = GistInstructTransform(t, num_gist_tokens=2)(_long_record())
    cut = truncate_example(ex, max_seq_len=len(ex["tokens"]) - 30, truncation="prompt_left")
    # BOS and "Instruction:" stay; of the 42 bytes " " + 40 "I" + "\n" the first 30 are cut.
    assert cut["tokens"][: 1 + len(b("Instruction:"))] == [t.bos_id] + b("Instruction:")
    rest = ex["tokens"][ex["gist_start"] + 2 :]
    assert cut["tokens"] == [t.bos_id] + b("Instruction:") + b("I" * 11 + "\n") + g + rest
    assert cut["gist_start"] == ex["gist_start"] - 30 and cut["prompt_len"] == ex["prompt_len"] - 30
    assert cut["tokens"][cut["gist_start"] : cut["gist_start"] + 2] == g
    assert cut["labels"][cut["prompt_len"] :] == ex["labels"][ex["prompt_len"] :]


def test_truncate_drop_and_errors(tiny_tokenizer):
    ex = GistInstructTransform(tiny_tokenizer, num_gist_tokens=2)(_long_record())
    assert truncate_example(ex, max_seq_len=len(ex["tokens"]), truncation="drop") == ex
    assert truncate_example(ex, max_seq_len=10, truncation="drop") is None
    assert truncate_example(ex, max_seq_len=ex["prompt_len"], truncation="output_right") is None  # no output token left
    assert (
        len(truncate_example(ex, max_seq_len=ex["prompt_len"] + 1, truncation="output_right")["tokens"])
        == ex["prompt_len"] + 1
    )
    with pytest.raises(ValueError, match="cannot fit"):
        truncate_example(ex, max_seq_len=30, truncation="prompt_left")
    with pytest.raises(ValueError, match="unknown truncation"):
        truncate_example(ex, max_seq_len=30, truncation="middle")


def test_dataset_counts_truncated_and_dropped(tiny_tokenizer, caplog):
    t = tiny_tokenizer
    short = {"instruction": "Hi.", "input": "", "output": "ok"}
    records = [short, _long_record(), short, {"instruction": "I" * 200, "input": "", "output": "x"}]
    transform = GistInstructTransform(t)
    max_len = len(transform(_long_record())["tokens"]) - 5
    with caplog.at_level(logging.INFO):
        ds = GistInstructDataset(records, transform, max_seq_len=max_len, truncation="drop", name="toy")
    assert (len(ds), ds.num_dropped, ds.num_truncated) == (2, 2, 0)
    assert [ds[i]["index"] for i in range(len(ds))] == [0, 2]
    assert "toy: 2 examples from 4 records; 0 truncated (drop), 2 dropped" in caplog.text

    ds = GistInstructDataset(records, transform, max_seq_len=max_len, truncation="output_right")  # record 3: no room
    assert (len(ds), ds.num_dropped, ds.num_truncated) == (3, 1, 1)  # for its output, skipped as the official code does
    assert all(len(ds[i]["tokens"]) <= max_len for i in range(3)) and [ds[i]["index"] for i in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="no examples"):
        GistInstructDataset([_long_record()], transform, max_seq_len=10, truncation="drop")


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "record, error, match",
    [
        ({"input": "", "output": "x"}, ValueError, "record 1: missing field 'instruction'"),
        ({"instruction": "Hi", "input": ""}, ValueError, "record 1: missing field 'output'"),
        (
            {"instruction": "Hi", "output": "x"},
            ValueError,
            r"record 1: missing field 'input' \(data without inputs: column_map",
        ),
        ({"instruction": "  ", "input": "", "output": "x"}, ValueError, "record 1: field 'instruction' is empty"),
        ({"instruction": "Hi", "input": "", "output": 5}, TypeError, "record 1: field 'output' must be a string"),
        ({"instruction": None, "input": "", "output": "x"}, ValueError, "record 1: missing field 'instruction'"),
    ],
)
def test_bad_records_name_the_index(tiny_tokenizer, record, error, match):
    with pytest.raises(error, match=match):
        GistInstructDataset([RECORD, record], GistInstructTransform(tiny_tokenizer))


def test_an_empty_output_is_learned_as_the_end_token_alone(tiny_tokenizer):
    t = tiny_tokenizer
    ex = GistInstructDataset([RECORD, {"instruction": "Hi", "input": "", "output": ""}], GistInstructTransform(t))[1]
    assert ex["tokens"][ex["prompt_len"] :] == [t.eos_id]
    assert [x for x in ex["labels"] if x != IGNORE] == [t.eos_id]


def test_llama3_chat_strips_fields_like_torchtune(tiny_tokenizer):
    transform = GistInstructTransform(tiny_tokenizer, num_gist_tokens=2, template="llama3_chat")
    padded = {"instruction": "  Add the numbers.\n", "input": " 2, 3 ", "output": "5 \n"}
    assert transform(padded) == transform(RECORD)
    assert transform.encode_prompt(" Add the numbers. ", "2, 3\n") == transform.encode_prompt(
        "Add the numbers.", "2, 3"
    )


def test_null_input_means_no_input(tiny_tokenizer):
    transform = GistInstructTransform(tiny_tokenizer)
    with_null = transform({"instruction": "Say hi.", "input": None, "output": "hi"})
    assert with_null == transform({"instruction": "Say hi.", "input": "", "output": "hi"})


def test_bad_settings(tiny_tokenizer):
    t = tiny_tokenizer
    with pytest.raises(ValueError, match="unknown template 'alpaca'"):
        GistInstructTransform(t, template="alpaca")
    with pytest.raises(ValueError, match="num_gist_tokens=1000 but the tokenizer has only"):
        GistInstructTransform(t, num_gist_tokens=1000)
    with pytest.raises(ValueError, match="num_gist_tokens must be a whole number >= 1"):
        GistInstructTransform(t, num_gist_tokens=0)
    with pytest.raises(ValueError, match="column_map has unknown keys"):
        GistInstructTransform(t, column_map={"prompt": "x"})
    with pytest.raises(ValueError, match="only 'input' may be mapped to None"):
        GistInstructTransform(t, column_map={"output": None})


class _NoReservedTokenizer:
    """A tokenizer with the usual ids but no reserved special tokens."""

    bos_id, eos_id, pad_id = 1, 2, 0
    special_tokens = {"<|begin_of_text|>": 1, "<|end_of_text|>": 2}

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        return list(text.encode())


class _LeakyTokenizer(_NoReservedTokenizer):
    """Encodes the text 'GIST' to the id 511, which is a gist id."""

    special_tokens = {**_NoReservedTokenizer.special_tokens, "<|reserved_special_token_0|>": 511}

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        return [511 if text == "GIST" else c for c in text.encode()]


def test_tokenizer_without_reserved_ids():
    with pytest.raises(ValueError, match="no <\\|reserved_special_token_N\\|> tokens"):
        GistInstructTransform(_NoReservedTokenizer())
    with pytest.raises(ValueError, match="has no start_header_id"):
        GistInstructTransform(_LeakyTokenizer(), template="llama3_chat")


def test_text_that_encodes_to_a_gist_id_is_rejected():
    transform = GistInstructTransform(_LeakyTokenizer())
    assert transform({"instruction": "Hi", "input": "", "output": "ok"})["tokens"].count(511) == 1
    with pytest.raises(ValueError, match="record 0: the output text encodes to a gist token id"):
        GistInstructDataset([{"instruction": "Hi", "input": "", "output": "GIST"}], transform)


# ----------------------------------------------------------------------------- files


def test_builder_reads_jsonl_and_parquet(tiny_tokenizer, tmp_path):
    records = [RECORD, {"instruction": "Say hi.", "input": "", "output": "hi"}, RECORD]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    parquet = tmp_path / "data.parquet"
    HFDataset.from_list(records).to_parquet(str(parquet))
    expected = GistInstructTransform(tiny_tokenizer, num_gist_tokens=2)(records[1])
    for source, path in (("json", jsonl), ("parquet", parquet)):
        ds = gist_instruct_dataset(tiny_tokenizer, source=source, data_files=str(path), num_gist_tokens=2)
        assert len(ds) == 3
        assert ds[1]["tokens"] == expected["tokens"] and ds[1]["labels"] == expected["labels"]
    assert len(gist_instruct_dataset(tiny_tokenizer, source="json", data_files=str(jsonl), max_examples=2)) == 2
    packed = gist_instruct_dataset(tiny_tokenizer, source="json", data_files=str(jsonl), max_seq_len=200, packed=True)
    assert isinstance(packed, PackedGistDataset) and len(packed) == 1


def test_builder_errors(tiny_tokenizer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORD) + '\n{"instruction": \n')
    with pytest.raises(ValueError, match="could not read .*bad.jsonl"):
        gist_instruct_dataset(tiny_tokenizer, source="json", data_files=str(bad))
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(RECORD) + "\n")
    with pytest.raises(ValueError, match="unknown truncation"):
        gist_instruct_dataset(tiny_tokenizer, source="json", data_files=str(good), truncation="left")
    with pytest.raises(ValueError, match="max_seq_len must be a whole number >= 1"):
        gist_instruct_dataset(tiny_tokenizer, source="json", data_files=str(good), max_seq_len=0)
    with pytest.raises(ValueError, match="packed=True needs max_seq_len"):
        gist_instruct_dataset(tiny_tokenizer, source="json", data_files=str(good), packed=True)
    with pytest.raises(ValueError, match="good.jsonl: record 0: missing field 'prompt'"):
        gist_instruct_dataset(tiny_tokenizer, source="json", data_files=str(good), column_map={"instruction": "prompt"})


@pytest.mark.parametrize(
    "split, size", [("validation_seen", 1000), ("validation_unseen", 1000), ("validation_human", 252)]
)
def test_alpaca_plus_validation_files_load(tiny_tokenizer, split, size):
    path = ALPACA_PLUS_DIR / f"alpaca_plus_{split}.json"
    records = json.loads(path.read_text())
    assert len(records) == size
    ds = alpaca_plus_dataset(tiny_tokenizer, data_dir=ALPACA_PLUS_DIR, split=split, num_gist_tokens=1, max_examples=4)
    assert len(ds) == 4
    for i in range(4):
        expected = GistInstructTransform(tiny_tokenizer)(records[i])
        assert ds[i]["tokens"] == expected["tokens"]
        completion = bytes(ds[i]["tokens"][ds[i]["prompt_len"] : -1]).decode("utf-8")
        assert completion == records[i]["output"]


def test_alpaca_plus_bad_split_and_missing_train(tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="unknown Alpaca\\+ split 'test'"):
        alpaca_plus_dataset(tiny_tokenizer, data_dir=ALPACA_PLUS_DIR, split="test")
    with pytest.raises(FileNotFoundError, match="python -m torchtune_gist.data.alpaca_plus"):
        alpaca_plus_dataset(tiny_tokenizer, data_dir=tmp_path, split="train")


# ----------------------------------------------------------------------------- Alpaca+ rebuild


def _si(instruction: str, input: str, output: str = "o") -> dict:
    return {"instruction": instruction, "input": input, "output": output}


SELF_INSTRUCT = [
    _si("A", "a1"),
    _si("B", "b1"),
    _si("A", "a2"),
    _si("C", ""),
    _si("C", "c2"),
    _si("A", "a1", "dup"),
    _si("D", "d1"),
    _si("D", "d2"),
    _si("E", "e1"),
    _si("E", "e2"),
]
ALPACA = [_si("A", "x"), _si("F", ""), _si("G", "g1"), _si("H", "h1"), _si("G", "")]


def test_split_alpaca_plus_follows_the_official_procedure():
    splits = split_alpaca_plus(ALPACA[:4], SELF_INSTRUCT, num_validation_seen=2, num_validation_unseen=1)
    key = lambda rs: [(r["instruction"], r["input"], r["source"]) for r in rs]  # noqa: E731
    # A (3 instances, first input non-empty) and D go to validation_seen; C's first input is empty;
    # E would qualify but the quota (2) is full.
    assert key(splits["validation_seen"]) == [("A", "a1", "self_instruct"), ("D", "d1", "self_instruct")]
    # Alpaca: A is a training instruction, F has no input, G (with input) is unseen; then the quota is full.
    assert key(splits["validation_unseen"]) == [("G", "g1", "alpaca")]
    # The rest in order; the duplicate (A, a1, "dup") of the validation example is dropped.
    self_instruct_rest = [("A", "a2"), ("B", "b1"), ("C", ""), ("C", "c2"), ("D", "d2"), ("E", "e1"), ("E", "e2")]
    assert key(splits["train"]) == [(i, x, "self_instruct") for i, x in self_instruct_rest] + [
        ("A", "x", "alpaca"),
        ("F", "", "alpaca"),
        ("H", "h1", "alpaca"),
    ]
    assert all(r["output"] == "o" for r in splits["train"])


def test_split_alpaca_plus_unseen_instruction_reused_in_training_is_an_error():
    with pytest.raises(ValueError, match="alpaca record 4 .* already in validation_unseen"):
        split_alpaca_plus(ALPACA, SELF_INSTRUCT, num_validation_seen=2, num_validation_unseen=1)


def test_build_alpaca_plus_train_files_and_cli(tiny_tokenizer, tmp_path):
    alpaca = [_si("A", "x"), _si("F", ""), _si("G", "g1"), _si("H", "h1")]
    (tmp_path / "alpaca_data.json").write_text(json.dumps(alpaca))
    (tmp_path / "all_instances.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SELF_INSTRUCT))
    out = tmp_path / "out"
    counts = build_alpaca_plus_train(
        tmp_path / "alpaca_data.json",
        tmp_path / "all_instances.jsonl",
        out,
        num_validation_seen=2,
        num_validation_unseen=1,
    )
    assert counts == {"train": 10, "validation_seen": 2, "validation_unseen": 1}
    train = json.loads((out / "alpaca_plus_train.json").read_text())
    seen = json.loads((out / "alpaca_plus_validation_seen.json").read_text())
    assert {(r["instruction"], r["input"]) for r in train}.isdisjoint({(r["instruction"], r["input"]) for r in seen})
    assert {r["instruction"] for r in seen} <= {r["instruction"] for r in train}
    ds = alpaca_plus_dataset(tiny_tokenizer, data_dir=out, split="train")
    assert len(ds) == 10
    with pytest.raises(ValueError, match="output files exist"):
        build_alpaca_plus_train(tmp_path / "alpaca_data.json", tmp_path / "all_instances.jsonl", out)
    cli = alpaca_plus_main(
        [
            "--alpaca",
            str(tmp_path / "alpaca_data.json"),
            "--self-instruct",
            str(tmp_path / "all_instances.jsonl"),
            "--out",
            str(out),
            "--num-validation-seen",
            "2",
            "--num-validation-unseen",
            "1",
            "--overwrite",
        ]
    )
    assert cli == counts


def test_alpaca_plus_cli_reports_bad_sources_without_a_traceback(tmp_path, capsys):
    (tmp_path / "alpaca.json").write_text('{"instruction": ')
    for alpaca, match in ((tmp_path / "missing.json", "missing.json"), (tmp_path / "alpaca.json", "not valid JSON")):
        with pytest.raises(SystemExit) as exit_info:
            alpaca_plus_main(
                ["--alpaca", str(alpaca), "--self-instruct", str(tmp_path / "si.jsonl"), "--out", str(tmp_path / "o")]
            )
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "error:" in err and match in err and "Traceback" not in err


def test_build_alpaca_plus_train_malformed_sources(tmp_path):
    (tmp_path / "alpaca.json").write_text(json.dumps([_si("A", "x")]))
    (tmp_path / "si.jsonl").write_text(json.dumps(_si("A", "a")) + "\nnot json\n")
    with pytest.raises(ValueError, match="si.jsonl: line 2 is not valid JSON"):
        build_alpaca_plus_train(tmp_path / "alpaca.json", tmp_path / "si.jsonl", tmp_path / "out")
    (tmp_path / "si.jsonl").write_text(json.dumps({"instruction": "A", "input": "a"}) + "\n")
    with pytest.raises(ValueError, match="self_instruct: record 0: field 'output' is missing"):
        build_alpaca_plus_train(tmp_path / "alpaca.json", tmp_path / "si.jsonl", tmp_path / "out")
    (tmp_path / "alpaca.json").write_text('{"instruction": ')
    with pytest.raises(ValueError, match="alpaca.json: not valid JSON"):
        build_alpaca_plus_train(tmp_path / "alpaca.json", tmp_path / "si.jsonl", tmp_path / "out")
