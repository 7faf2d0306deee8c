"""Padded and packed gist collation: per-example masks, padding, positions, labels, packing."""

import functools
from typing import Dict, List

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_mask
from torch.utils.data import DataLoader
from torchtune.models.llama3_1 import llama3_1

from torchtune_gist.data import (
    GistInstructDataset,
    GistInstructTransform,
    PackedGistDataset,
    packed_gist_collate,
    padded_gist_collate,
    padding_fraction,
)
from torchtune_gist.masks import MASK_MODES, make_gist_mask
from torchtune_gist.tiny import TINY_LLAMA3_1_ARGS

GIST = [510, 511]
PAD = 260
IGNORE = -100


def _example(prompt: int, rest: int, gists: bool = True, start: int = 1) -> Dict[str, List[int]]:
    """``prompt`` ids, the gist span (if any), ``rest`` ids; only the last 2 ids are learned."""
    tokens = list(range(start, start + prompt)) + (GIST if gists else []) + list(range(100, 100 + rest))
    labels = [IGNORE] * (len(tokens) - 2) + tokens[-2:]
    return {"tokens": tokens, "labels": labels, "gist_start": prompt}


BATCH = [_example(3, 4), _example(7, 2), _example(5, 3, gists=False), _example(1, 1)]


@pytest.mark.parametrize("mode", MASK_MODES)
def test_padded_batch_matches_per_example_masks(mode):
    out = padded_gist_collate(BATCH, gist_token_ids=GIST, pad_id=PAD, mask_mode=mode)
    s = max(len(ex["tokens"]) for ex in BATCH)
    assert set(out) == {"tokens", "labels", "mask", "input_pos"}
    assert out["tokens"].shape == out["labels"].shape == out["input_pos"].shape == (len(BATCH), s)
    assert out["mask"].shape == (len(BATCH), s, s) and out["mask"].dtype == torch.bool
    for i, ex in enumerate(BATCH):
        n = len(ex["tokens"])
        alone = make_gist_mask(torch.tensor([ex["tokens"]]), GIST, mode=mode)[0]
        assert torch.equal(out["mask"][i, :n, :n], alone)
        assert not out["mask"][i, :n, n:].any()
        assert out["tokens"][i, :n].tolist() == ex["tokens"] and (out["tokens"][i, n:] == PAD).all()
        assert out["labels"][i, :n].tolist() == ex["labels"] and (out["labels"][i, n:] == IGNORE).all()
        assert out["input_pos"][i].tolist() == list(range(s))


def test_padded_gist_mask_blocks_the_prompt():
    out = padded_gist_collate(BATCH[:2], gist_token_ids=GIST, pad_id=PAD)
    # Example 1: prompt 0..6, gists 7..8, then 9, 10. Token 9 sees the gists and itself, not the prompt.
    assert out["mask"][1, 9].tolist()[:11] == [False] * 7 + [True, True, True, False]
    assert out["mask"][1, 8, :9].all()
    # Example 0 (prompt 0..2, gists 3..4): after the gists the prompt is hidden; padding keys too.
    assert not out["mask"][0, 5, :3].any() and out["mask"][0, 5, 3:6].all()
    causal = padded_gist_collate(BATCH[:2], gist_token_ids=GIST, pad_id=PAD, mask_mode="pos_control")["mask"]
    assert causal[1, 9, :10].all()


def test_padded_block_mask_agrees_with_dense():
    dense = padded_gist_collate(BATCH, gist_token_ids=GIST, pad_id=PAD)["mask"]
    out = padded_gist_collate(BATCH, gist_token_ids=GIST, pad_id=PAD, block_mask=True)
    assert isinstance(out["mask"], BlockMask)
    b, s = out["tokens"].shape
    assert torch.equal(create_mask(out["mask"].mask_mod, b, 1, s, s, device="cpu")[:, 0], dense)


def test_pad_to_multiple_of():
    out = padded_gist_collate(BATCH, gist_token_ids=GIST, pad_id=PAD, pad_to_multiple_of=8, block_mask=True)
    plain = padded_gist_collate(BATCH, gist_token_ids=GIST, pad_id=PAD)
    b, s = plain["tokens"].shape
    assert out["tokens"].shape == (b, 16) and s < 16
    assert torch.equal(out["tokens"][:, :s], plain["tokens"]) and (out["tokens"][:, s:] == PAD).all()
    assert torch.equal(out["labels"][:, :s], plain["labels"]) and (out["labels"][:, s:] == -100).all()
    assert out["mask"].shape == (b, 1, 16, 16)
    dense = create_mask(out["mask"].mask_mod, b, 1, 16, 16, device="cpu")[:, 0]
    assert torch.equal(dense[:, :s, :s], plain["mask"]) and not dense[:, :s, s:].any()
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="pad_to_multiple_of"):
            padded_gist_collate(BATCH, gist_token_ids=GIST, pad_id=PAD, pad_to_multiple_of=bad)


def test_collate_in_a_dataloader_with_partial(tiny_tokenizer):
    records = [
        {"instruction": "Add.", "input": "1, 2", "output": "3"},
        {"instruction": "Say something long enough.", "input": "", "output": "ok"},
    ]
    transform = GistInstructTransform(tiny_tokenizer, num_gist_tokens=2)
    ds = GistInstructDataset(records, transform)
    collate = functools.partial(padded_gist_collate, gist_token_ids=ds.gist_token_ids, pad_id=tiny_tokenizer.pad_id)
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate)))
    for i in range(2):
        n = len(ds[i]["tokens"])
        alone = make_gist_mask(torch.tensor([ds[i]["tokens"]]), ds.gist_token_ids)[0]
        assert torch.equal(batch["mask"][i, :n, :n], alone)


@torch.no_grad()
def test_collated_mask_reaches_attention():
    """Through a real torchtune decoder: the collated mask decides what the tokens after the gists see."""
    model = llama3_1(**TINY_LLAMA3_1_ARGS).eval()
    batch = BATCH[:2]
    changed = [
        dict(ex, tokens=[(t + 5) % 256 if i < ex["gist_start"] else t for i, t in enumerate(ex["tokens"])])
        for ex in batch
    ]

    def logits(examples, mode):
        out = padded_gist_collate(examples, gist_token_ids=GIST, pad_id=PAD, mask_mode=mode)
        return model(out["tokens"], mask=out["mask"], input_pos=out["input_pos"])

    out = {
        (name, mode): logits(examples, mode)
        for name, examples in (("orig", batch), ("changed", changed))
        for mode in MASK_MODES
    }
    for i, ex in enumerate(batch):
        upto = slice(0, ex["gist_start"] + len(GIST))
        after = slice(ex["gist_start"] + len(GIST), len(ex["tokens"]))
        # neg_control hides the prompt and the gists: changing the prompt changes nothing after them.
        assert torch.allclose(out["orig", "neg_control"][i, after], out["changed", "neg_control"][i, after], atol=1e-5)
        assert not torch.allclose(out["orig", "pos_control"][i, after], out["changed", "pos_control"][i, after])
        # gist differs from the causal mask exactly after the gist span.
        gist, causal = out["orig", "gist"], out["orig", "pos_control"]
        assert torch.allclose(gist[i, upto], causal[i, upto], atol=1e-5)
        assert not torch.allclose(gist[i, after], causal[i, after], atol=1e-4)


def test_padded_collate_errors():
    with pytest.raises(ValueError, match="empty batch"):
        padded_gist_collate([], gist_token_ids=GIST, pad_id=PAD)
    with pytest.raises(ValueError, match="pad_id=511 is one of the gist token ids"):
        padded_gist_collate(BATCH, gist_token_ids=GIST, pad_id=511)
    with pytest.raises(ValueError, match="unknown mask_mode 'none'"):
        padded_gist_collate(BATCH, gist_token_ids=GIST, pad_id=PAD, mask_mode="none")
    with pytest.raises(ValueError, match="gist_token_ids must be a non-empty list"):
        padded_gist_collate(BATCH, gist_token_ids=[], pad_id=PAD)
    with pytest.raises(ValueError, match="gist_token_ids must be a list of the K gist token ids, got 510"):
        padded_gist_collate(BATCH, gist_token_ids=510, pad_id=PAD)  # a bare id from YAML
    with pytest.raises(ValueError, match="batch example 1: tokens must be integer ids, got dtype torch.float32"):
        padded_gist_collate(
            [BATCH[0], {"tokens": [1.5, 510, 511], "labels": [IGNORE] * 3}], gist_token_ids=GIST, pad_id=PAD
        )
    with pytest.raises(ValueError, match="batch example 1: tokens \\(3\\) and labels \\(2\\)"):
        padded_gist_collate([BATCH[0], {"tokens": [1, 2, 3], "labels": [1, 2]}], gist_token_ids=GIST, pad_id=PAD)
    split_span = {"tokens": [1, 510, 2, 511, 3], "labels": [IGNORE] * 5}
    with pytest.raises(ValueError, match="contiguous span"):
        padded_gist_collate([BATCH[0], split_span], gist_token_ids=GIST, pad_id=PAD)


# ----------------------------------------------------------------------------- packing

DOCS = [
    _example(3, 4, start=1),
    _example(2, 2, start=20),
    _example(6, 5, gists=False, start=40),
    _example(4, 3, start=60),
    _example(9, 9, start=80),
]


def test_packing_is_greedy_and_never_splits():
    packed = PackedGistDataset(DOCS, max_seq_len=20, pad_id=PAD)
    lens = [len(d["tokens"]) for d in DOCS]  # 9, 6, 11, 9, 20
    assert [row["seq_lens"].tolist() for row in packed] == [[9, 6], [11, 9], [20]]
    assert packed.padding_fraction == pytest.approx(padding_fraction([[9, 6], [11, 9], [20]], 20))
    assert packed.padding_fraction == pytest.approx(1 - sum(lens) / 60)
    assert padding_fraction([[3, 2], [4]], 6) == pytest.approx(0.25)
    row = packed[0]
    assert row["tokens"].tolist() == DOCS[0]["tokens"] + DOCS[1]["tokens"] + [PAD] * 5
    assert row["document_ids"].tolist() == [0] * 9 + [1] * 6 + [2] * 5
    assert row["input_pos"].tolist()[:15] == list(range(9)) + list(range(6))
    assert len(PackedGistDataset(DOCS, max_seq_len=20, pad_id=PAD, max_packs=2)) == 2


def test_packed_labels_have_no_cross_document_target():
    docs = [dict(d, labels=list(d["tokens"])) for d in DOCS]  # every position learned (train_on_input)
    packed = PackedGistDataset(docs, max_seq_len=20, pad_id=PAD)
    for row in packed:
        labels, doc = row["labels"], row["document_ids"]
        shifted = labels[1:]  # what the recipe trains position p to predict
        boundary = doc[1:] != doc[:-1]
        assert (shifted[boundary] == IGNORE).all()
        start = 0
        for n in row["seq_lens"].tolist():
            assert labels[start + 1 : start + n].tolist() == row["tokens"][start + 1 : start + n].tolist()
            start += n
        assert (labels[start:] == IGNORE).all()


@pytest.mark.parametrize("mode", MASK_MODES)
def test_packed_mask_blocks_match_per_document_masks(mode):
    packed = PackedGistDataset(DOCS, max_seq_len=20, pad_id=PAD)
    out = packed_gist_collate([packed[0], packed[1], packed[2]], gist_token_ids=GIST, pad_id=PAD, mask_mode=mode)
    assert set(out) == {"tokens", "labels", "mask", "input_pos"}
    assert out["mask"].shape == (3, 20, 20)
    for r in range(3):
        start = 0
        for n in packed[r]["seq_lens"].tolist():
            tokens = out["tokens"][r, start : start + n]
            alone = make_gist_mask(tokens.unsqueeze(0), GIST, mode=mode)[0]
            rows = out["mask"][r, start : start + n]
            assert torch.equal(rows[:, start : start + n], alone)
            assert not rows[:, :start].any() and not rows[:, start + n :].any()
            assert out["input_pos"][r, start : start + n].tolist() == list(range(n))
            start += n
        pad_rows = out["mask"][r, start:]
        assert torch.equal(pad_rows[:, start:], torch.eye(20 - start, dtype=torch.bool))
        assert not pad_rows[:, :start].any()
    blocks = packed_gist_collate([packed[0]], gist_token_ids=GIST, pad_id=PAD, mask_mode=mode, block_mask=True)
    assert torch.equal(create_mask(blocks["mask"].mask_mod, 1, 1, 20, 20, device="cpu")[:, 0], out["mask"][:1])


def test_packing_errors():
    with pytest.raises(ValueError, match="example 4 has 20 tokens > max_seq_len=19"):
        PackedGistDataset(DOCS, max_seq_len=19, pad_id=PAD)
    with pytest.raises(ValueError, match="example 0: tokens \\(2\\) and labels \\(1\\)"):
        PackedGistDataset([{"tokens": [1, 2], "labels": [1]}], max_seq_len=8, pad_id=PAD)
    packed = PackedGistDataset(DOCS, max_seq_len=20, pad_id=PAD)
    short = PackedGistDataset(DOCS[:1], max_seq_len=10, pad_id=PAD)
    with pytest.raises(ValueError, match="same length"):
        packed_gist_collate([packed[0], short[0]], gist_token_ids=GIST, pad_id=PAD)
