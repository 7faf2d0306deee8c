"""Passkey data: determinism, lengths, needle placement, token layout, labels, bad input."""

import re
from pathlib import Path
from typing import List

import pytest
from omegaconf import OmegaConf
from torchtune.models.llama3 import llama3_tokenizer

from torchtune_gist.data import (
    NEEDLES,
    QUESTIONS,
    GistPasskeyTransform,
    gist_passkey_dataset,
    make_passkey_sample,
    make_passkey_samples,
)
from torchtune_gist.eval._tasks import EVAL_SEED
from torchtune_gist.gist_tokens import gist_token_ids

IGNORE = -100


def b(text: str) -> List[int]:
    return list(text.encode("utf-8"))


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_bos=False, add_eos=False))


def test_sample_is_deterministic(tiny_tokenizer):
    kwargs = dict(context_tokens=400, depth=0.3, seed=7)
    assert make_passkey_sample(tiny_tokenizer, **kwargs) == make_passkey_sample(tiny_tokenizer, **kwargs)
    other = make_passkey_sample(tiny_tokenizer, context_tokens=400, depth=0.3, seed=8)
    assert other["context"] != make_passkey_sample(tiny_tokenizer, **kwargs)["context"]


@pytest.mark.parametrize("language", ["en", "ko"])
@pytest.mark.parametrize("target", [150, 257, 1000, 3000])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_context_length_hits_the_target(tiny_tokenizer, language, target, depth):
    r = make_passkey_sample(tiny_tokenizer, context_tokens=target, depth=depth, seed=target, language=language)
    measured = n_tokens(tiny_tokenizer, r["context"])
    assert r["context_tokens"] == measured
    assert target - 4 <= measured <= target
    assert NEEDLES[language].format(passkey=r["passkey"]) in r["context"]
    assert r["question"] == QUESTIONS[language] and r["answer"] == r["passkey"]


def test_needle_depth_and_passkey_digits(tiny_tokenizer):
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    positions = []
    for depth in depths:
        r = make_passkey_sample(tiny_tokenizer, context_tokens=2000, depth=depth, seed=3, passkey_digits=7)
        assert len(r["passkey"]) == 7 and r["passkey"].isdigit() and r["passkey"][0] != "0"
        needle = NEEDLES["en"].format(passkey=r["passkey"])
        start = r["context"].index(needle)
        positions.append((start + len(needle) / 2) / len(r["context"]))
    first = make_passkey_sample(tiny_tokenizer, context_tokens=2000, depth=0.0, seed=3)
    assert first["context"].startswith("The pass key")
    for depth, pos in zip(depths, positions):
        assert abs(pos - depth) < 0.1, (depth, pos)


def test_samples_cycle_lengths_and_depths(tiny_tokenizer):
    records = make_passkey_samples(
        tiny_tokenizer, 6, context_tokens=[200, 500], depths=[0.0, 1.0, 0.5], seed=1, num_gist_tokens=4
    )
    assert [r["target_context_tokens"] for r in records] == [200, 500] * 3
    assert [r["depth"] for r in records] == [0.0, 1.0, 0.5] * 2
    assert all(r["compression_ratio"] == r["context_tokens"] / 4 for r in records)
    assert len({r["passkey"] for r in records}) > 1
    assert records == make_passkey_samples(
        tiny_tokenizer, 6, context_tokens=[200, 500], depths=[0.0, 1.0, 0.5], seed=1, num_gist_tokens=4
    )
    random_depths = [r["depth"] for r in make_passkey_samples(tiny_tokenizer, 8, context_tokens=200, seed=2)]
    assert all(0.0 <= d <= 1.0 for d in random_depths) and len(set(random_depths)) == 8
    assert make_passkey_samples(tiny_tokenizer, 2, context_tokens=200)[0]["compression_ratio"] is None


def test_token_layout_and_answer_only_labels(tiny_tokenizer):
    t = tiny_tokenizer
    ds = gist_passkey_dataset(t, num_gist_tokens=3, num_samples=2, context_tokens=300, seed=5)
    record = ds.records[1]
    ex = ds[1]
    g = gist_token_ids(t, 3)
    prompt = [t.bos_id] + b(record["context"]) + g + b("\nWhat is the pass key?\n")
    assert ex["tokens"] == prompt + b(record["passkey"]) + [t.eos_id]
    assert ex["labels"] == [IGNORE] * len(prompt) + b(record["passkey"]) + [t.eos_id]
    assert ex["gist_start"] == 1 + record["context_tokens"] and ex["prompt_len"] == len(prompt)
    assert ex["compression_ratio"] == record["context_tokens"] / 3 == record["compression_ratio"]


def test_label_options_and_no_gists(tiny_tokenizer):
    t = tiny_tokenizer
    record = make_passkey_sample(t, context_tokens=120, depth=0.5, seed=0)
    g = gist_token_ids(t, 2)
    full = GistPasskeyTransform(t, num_gist_tokens=2, answer_only_loss=False, train_on_context=True)(record)
    gs = full["gist_start"]
    assert full["labels"][:gs] == full["tokens"][:gs]
    assert full["labels"][gs : gs + 2] == [IGNORE, IGNORE] and full["tokens"][gs : gs + 2] == g
    assert full["labels"][gs + 2 :] == full["tokens"][gs + 2 :]

    plain = GistPasskeyTransform(t, num_gist_tokens=0, train_on_context=True)(record)
    assert not set(plain["tokens"]) & set(gist_token_ids(t, 200))
    assert plain["tokens"] == [t.bos_id] + b(record["context"]) + b("\nWhat is the pass key?\n") + b(
        record["passkey"]
    ) + [t.eos_id]
    q = plain["gist_start"]
    assert plain["labels"][:q] == plain["tokens"][:q]
    assert plain["labels"][q : plain["prompt_len"]] == [IGNORE] * (plain["prompt_len"] - q)
    assert plain["compression_ratio"] is None


def test_korean_dataset(tiny_tokenizer):
    ds = gist_passkey_dataset(tiny_tokenizer, num_gist_tokens=2, num_samples=1, context_tokens=600, language="ko")
    ex = ds[0]
    tail = bytes(ex["tokens"][ex["gist_start"] + 2 : -1]).decode("utf-8")
    assert tail == f"\n패스키는 무엇입니까?\n{ds.records[0]['passkey']}"


def test_examples_longer_than_max_seq_len_are_refused_not_truncated(tiny_tokenizer, tiny_tokenizer_files):
    """A cut-off answer would teach nothing: every example's exact length is checked up front (from its measured
    context, so long haystacks are not tokenized twice), and again on access."""
    ds = gist_passkey_dataset(
        tiny_tokenizer, num_gist_tokens=2, num_samples=6, context_tokens=[100, 300], max_seq_len=400
    )
    assert [ds.transform.num_tokens(r) for r in ds.records] == [len(ds[i]["tokens"]) for i in range(6)]
    assert max(len(ds[i]["tokens"]) for i in range(6)) <= 400
    with pytest.raises(
        ValueError,
        match=(
            r"3 of 6 passkey examples are longer than max_seq_len=200 .*example 1 with 3\d\d tokens \(\d+ of context\) "
            r"first.*context_tokens"
        ),
    ):
        gist_passkey_dataset(
            tiny_tokenizer, num_gist_tokens=2, num_samples=6, context_tokens=[100, 300], max_seq_len=200
        )
    one_length = gist_passkey_dataset(tiny_tokenizer, num_gist_tokens=2, num_samples=6, context_tokens=100)
    lengths = [len(one_length[i]["tokens"]) for i in range(6)]
    assert lengths[0] < max(lengths)  # the measured contexts of one target differ by a token or two
    with pytest.raises(ValueError, match=f"example {lengths.index(max(lengths))} with {max(lengths)} tokens"):
        gist_passkey_dataset(
            tiny_tokenizer, num_gist_tokens=2, num_samples=6, context_tokens=100, max_seq_len=lengths[0]
        )
    bounded = llama3_tokenizer(str(tiny_tokenizer_files[0]), str(tiny_tokenizer_files[1]), max_seq_len=200)
    with pytest.raises(ValueError, match="longer than max_seq_len=200"):  # the tokenizer's bound is the default
        gist_passkey_dataset(bounded, num_gist_tokens=2, num_samples=1, context_tokens=300)
    ds = gist_passkey_dataset(bounded, num_gist_tokens=2, num_samples=2, context_tokens=100)
    ds.max_seq_len = 50
    with pytest.raises(ValueError, match="passkey example 1 has"):
        ds[1]


def test_bad_settings(tiny_tokenizer):
    t = tiny_tokenizer
    with pytest.raises(ValueError, match="unknown language 'fr'"):
        make_passkey_sample(t, context_tokens=200, depth=0.5, seed=0, language="fr")
    with pytest.raises(ValueError, match="depth must be a number in \\[0, 1\\]"):
        make_passkey_sample(t, context_tokens=200, depth=1.5, seed=0)
    with pytest.raises(ValueError, match="context_tokens=20 is too short"):
        make_passkey_sample(t, context_tokens=20, depth=0.5, seed=0)
    with pytest.raises(ValueError, match="passkey_digits must be a whole number >= 1"):
        make_passkey_sample(t, context_tokens=200, depth=0.5, seed=0, passkey_digits=0)
    with pytest.raises(ValueError, match="num_gist_tokens=999 but the tokenizer has only"):
        gist_passkey_dataset(t, num_gist_tokens=999, num_samples=1, context_tokens=200)
    with pytest.raises(ValueError, match="num_samples must be a whole number >= 1"):
        gist_passkey_dataset(t, num_gist_tokens=1, num_samples=0, context_tokens=200)
    with pytest.raises(ValueError, match="depths must be None"):
        make_passkey_samples(t, 1, context_tokens=200, depths=[])
    with pytest.raises(ValueError, match="field 'answer' is missing or empty"):
        GistPasskeyTransform(t, num_gist_tokens=1)({"context": "x", "question": "q", "answer": ""})


def test_eval_records_never_repeat_training_records(tiny_tokenizer):
    """The passkey tasks' seed differs from every training config's, so no eval haystack was trained on."""
    root = Path(__file__).resolve().parents[1]
    for task in ("gist_passkey.yaml", "gist_passkey_ko.yaml"):
        text = (root / "torchtune_gist" / "eval" / "tasks" / task).read_text()
        assert int(re.search(r"^  seed: (\d+)", text, re.M).group(1)) == EVAL_SEED
    configs = [p for p in (root / "configs").rglob("*.yaml") if "gist_passkey_dataset" in p.read_text()]
    train_seeds = {OmegaConf.load(p).dataset.seed for p in configs}
    assert configs and EVAL_SEED not in train_seeds

    def seeds(seed: int, depths=None) -> set:
        return {
            r["seed"] for r in make_passkey_samples(tiny_tokenizer, 40, context_tokens=64, depths=depths, seed=seed)
        }

    evaluation = seeds(EVAL_SEED, depths=[0.0, 0.5, 1.0])
    for seed in train_seeds:
        assert not evaluation & seeds(seed)
    assert seeds(0, depths=[0.0, 0.5, 1.0]) & seeds(0)  # what one seed for both would do


@pytest.mark.parametrize("seed", [None, 1.5, True, "0"])
def test_seed_must_be_an_integer(tiny_tokenizer, seed):
    with pytest.raises(ValueError, match="seed must be an integer"):
        make_passkey_samples(tiny_tokenizer, 2, context_tokens=64, seed=seed)
