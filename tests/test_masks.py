"""Gist masks against a brute-force reference written straight from the official implementation's rule (masks.py's
docstring)."""

import random
from typing import List, Optional, Sequence, Set

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from torchtune_gist.masks import (
    MASK_MODES,
    document_ids_from_lengths,
    gist_mask_mod,
    make_gist_block_mask,
    make_gist_mask,
)

G = 900  # gist ids used in these tests: 900 .. 924
PAD = 0


def reference_mask(
    row: Sequence[int], gist_ids: Set[int], pad_id: Optional[int], mode: str, docs: Optional[Sequence[int]] = None
) -> List[List[bool]]:
    """Python loops over the semantics table: the specification, not an implementation."""
    s = len(row)
    docs = list(docs) if docs is not None else [0] * s
    out = [[False] * s for _ in range(s)]
    for i in range(s):
        gists = [p for p in range(s) if docs[p] == docs[i] and row[p] in gist_ids]
        for j in range(s):
            if j > i or docs[j] != docs[i]:
                continue
            if pad_id is not None and row[j] == pad_id:
                continue
            ok = True
            if gists and mode != "pos_control":
                first, last = min(gists), max(gists)
                if i > last:
                    ok = j >= first if mode == "gist" else j > last
            out[i][j] = ok
        out[i][i] = True
    return out


def random_doc(rng: random.Random, length: int) -> List[int]:
    """A document of ``length`` tokens, with a contiguous gist span at a random place, or none."""
    doc = [rng.randrange(1, 500) for _ in range(length)]
    if rng.random() < 0.8:
        k = rng.randint(1, min(25, length))
        start = rng.randint(0, length - k)
        doc[start : start + k] = [G + rng.randrange(25) for _ in range(k)]
    return doc


def random_batch(rng: random.Random):
    b, s = rng.randint(1, 8), rng.randint(1, 300)
    rows, lengths = [], []
    left = rng.random() < 0.5
    for _ in range(b):
        n = rng.randint(1, s)
        row = random_doc(rng, n)
        pad = [PAD] * (s - n)
        rows.append(pad + row if left else row + pad)
        lengths.append(n)
    return torch.tensor(rows), lengths


GIST_IDS = set(range(G, G + 25))


@pytest.mark.parametrize("seed", range(60))
def test_dense_matches_reference_on_random_padded_batches(seed):
    rng = random.Random(seed)
    tokens, _ = random_batch(rng)
    for mode in MASK_MODES:
        got = make_gist_mask(tokens, GIST_IDS, pad_id=PAD, mode=mode)
        want = torch.tensor([reference_mask(r, GIST_IDS, PAD, mode) for r in tokens.tolist()])
        assert got.dtype == torch.bool and got.shape == want.shape
        assert torch.equal(got, want), f"seed {seed} mode {mode}"


@pytest.mark.parametrize("seed", range(40))
def test_packed_matches_reference(seed):
    rng = random.Random(1000 + seed)
    b, s = rng.randint(1, 4), rng.randint(2, 200)
    rows, lens = [], []
    for _ in range(b):
        row, row_lens = [], []
        while len(row) < s - 1 and rng.random() < 0.9:
            n = rng.randint(1, min(60, s - len(row)))
            row += random_doc(rng, n)
            row_lens.append(n)
        rows.append(row + [PAD] * (s - len(row)))
        lens.append(row_lens)
    tokens = torch.tensor(rows)
    docs = document_ids_from_lengths(lens, s)
    for mode in MASK_MODES:
        got = make_gist_mask(tokens, GIST_IDS, pad_id=PAD, mode=mode, document_ids=docs)
        want = torch.tensor([reference_mask(r, GIST_IDS, PAD, mode, d) for r, d in zip(tokens.tolist(), docs.tolist())])
        assert torch.equal(got, want), f"seed {seed} mode {mode}"


def test_worked_example_from_design():
    a, b_, c, d, g = 1, 2, 3, 4, G
    tokens = torch.tensor([[a, b_, g, g + 1, c, d]])
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(make_gist_mask(tokens, {g, g + 1})[0], expected)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert torch.equal(make_gist_mask(tokens, {g, g + 1}, mode="pos_control")[0], causal)
    neg = causal.clone()
    neg[4:, :4] = False
    assert torch.equal(make_gist_mask(tokens, {g, g + 1}, mode="neg_control")[0], neg)


def test_row_without_gist_is_causal_and_padding_rows_see_themselves():
    tokens = torch.tensor([[5, 6, 7, PAD, PAD], [PAD, PAD, 5, G, 6]])
    m = make_gist_mask(tokens, {G}, pad_id=PAD)
    assert torch.equal(m[0, :3, :3], torch.ones(3, 3, dtype=torch.bool).tril())
    assert not m[0, :, 3:].triu(1).any() and m[0, 3, 3] and m[0, 4, 4] and not m[0, 4, 3]
    assert m[1, 0, 0] and m[1, 1, 1] and not m[1, 2, :2].any()
    assert m.sum(-1).min() >= 1


def test_mask_mod_and_block_mask_match_dense():
    rng = random.Random(7)
    for _ in range(12):
        tokens, _ = random_batch(rng)
        b, s = tokens.shape
        docs = document_ids_from_lengths([[s // 2, s - s // 2]] * b, s) if s > 1 and rng.random() < 0.5 else None
        for mode in MASK_MODES:
            dense = make_gist_mask(tokens, GIST_IDS, pad_id=PAD, mode=mode, document_ids=docs)
            mod = gist_mask_mod(tokens, GIST_IDS, pad_id=PAD, mode=mode, document_ids=docs)
            assert torch.equal(create_mask(mod, b, None, s, s, device="cpu")[:, 0], dense)
            block = 16
            bm = make_gist_block_mask(tokens, GIST_IDS, pad_id=PAD, mode=mode, document_ids=docs, block_size=block)
            assert torch.equal(_block_mask_to_dense(bm, b, s, block), dense)


def _block_mask_to_dense(bm, b: int, s: int, block: int) -> torch.Tensor:
    """Element-wise view of a BlockMask: full blocks are all True, partial blocks apply mask_mod."""
    n = (s + block - 1) // block
    partial = _blocks(bm.kv_num_blocks, bm.kv_indices, b, n)
    full = _blocks(bm.full_kv_num_blocks, bm.full_kv_indices, b, n) if bm.full_kv_num_blocks is not None else None
    q = torch.arange(s).view(s, 1)
    kv = torch.arange(s).view(1, s)
    out = torch.zeros(b, s, s, dtype=torch.bool)
    for bi in range(b):
        mod = bm.mask_mod(torch.tensor(bi), torch.tensor(0), q, kv)
        blk_partial = partial[bi].repeat_interleave(block, 0).repeat_interleave(block, 1)[:s, :s]
        out[bi] = blk_partial & mod
        if full is not None:
            out[bi] |= full[bi].repeat_interleave(block, 0).repeat_interleave(block, 1)[:s, :s]
    return out


def _blocks(num: torch.Tensor, idx: torch.Tensor, b: int, n: int) -> torch.Tensor:
    out = torch.zeros(b, n, n, dtype=torch.bool)
    for bi in range(b):
        for qb in range(n):
            for k in range(int(num[bi, 0, qb])):
                out[bi, qb, int(idx[bi, 0, qb, k])] = True
    return out


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(tokens=torch.tensor([[1, G, 2, G]])), ValueError, "row 0 has gist tokens at positions \\[1, 3\\]"),
        (dict(tokens=torch.tensor([[1, 2, 3], [G, 5, G]])), ValueError, "row 1"),
        (dict(tokens=torch.tensor([1, 2, 3])), ValueError, "shape \\[b, s\\]"),
        (dict(tokens=torch.zeros(2, 3, 4, dtype=torch.long)), ValueError, "shape \\[b, s\\]"),
        (dict(tokens=torch.rand(2, 3)), TypeError, "integer token ids"),
        (dict(tokens=[[1, 2, 3]]), TypeError, "torch.Tensor"),
        (dict(tokens=torch.tensor([[1, G]]), mode="gisty"), ValueError, "unknown mask mode 'gisty'"),
        (dict(tokens=torch.tensor([[1, G]]), gist_token_ids=[]), ValueError, "empty"),
        (dict(tokens=torch.tensor([[1, G]]), gist_token_ids=[1.5]), TypeError, "integers"),
        (dict(tokens=torch.tensor([[1, G]]), gist_token_ids=G), TypeError, f"a list of the K gist token ids, got {G}"),
        (dict(tokens=torch.tensor([[1, G]]), pad_id=G), ValueError, "the gists would count as padding"),
        (dict(tokens=torch.tensor([[1, G]]), pad_id="0"), TypeError, "pad_id must be an integer token id"),
        (dict(tokens=torch.tensor([[1, G]]), document_ids=torch.zeros(1, 3, dtype=torch.long)), ValueError, "shaped"),
        (
            dict(tokens=torch.tensor([[1, G]]), document_ids=torch.zeros(1, 2, dtype=torch.long, device="meta")),
            ValueError,
            "one device",
        ),
    ],
)
def test_bad_inputs_are_clear_errors(kwargs, exc, match):
    kwargs.setdefault("gist_token_ids", {G})
    for fn in (make_gist_mask, gist_mask_mod):
        with pytest.raises(exc, match=match):
            fn(
                kwargs["tokens"],
                kwargs["gist_token_ids"],
                **{k: v for k, v in kwargs.items() if k not in ("tokens", "gist_token_ids")},
            )


def test_non_contiguous_span_in_a_packed_document_names_it():
    tokens = torch.tensor([[1, G, 2, 3, G, 4, G]])
    docs = document_ids_from_lengths([[3, 4]])
    make_gist_mask(tokens[:, :3], {G})
    with pytest.raises(ValueError, match="row 0, document 1"):
        make_gist_mask(tokens, {G}, document_ids=docs)


def test_document_ids_from_lengths():
    assert document_ids_from_lengths([[2, 1], [3]], 4).tolist() == [[0, 0, 1, 2], [0, 0, 0, 1]]
    with pytest.raises(ValueError, match="exceed"):
        document_ids_from_lengths([[3, 3]], 4)
    with pytest.raises(ValueError, match="positive"):
        document_ids_from_lengths([[0, 3]], 4)


def test_numpy_integer_gist_ids_are_taken_as_ints() -> None:
    """Ids read from numpy arrays (np.int64) work wherever gist or pad ids are given, and are stored as Python ints."""
    import numpy as np

    from torchtune_gist.data import padded_gist_collate
    from torchtune_gist.modules import GistEmbedding

    ids = [8, 9]
    np_ids = list(np.array(ids))
    tokens = torch.tensor([[1, 2, 8, 9, 3, 4]])
    assert torch.equal(make_gist_mask(tokens, np_ids), make_gist_mask(tokens, ids))
    row = {"tokens": [1, 2, 8, 9, 3, 4], "labels": [-100] * 4 + [3, 4]}
    assert torch.equal(
        padded_gist_collate([row], gist_token_ids=np_ids, pad_id=np.int64(0))["mask"],
        padded_gist_collate([row], gist_token_ids=ids, pad_id=0)["mask"],
    )
    from torchtune_gist.data import PackedGistDataset

    assert PackedGistDataset([row], max_seq_len=8, pad_id=np.int64(0)).pad_id == 0
    emb = GistEmbedding(8, 4, np_ids)
    assert emb.gist_token_ids == ids and all(type(t) is int for t in emb.gist_token_ids)
    with pytest.raises(TypeError, match="must be integers"):
        make_gist_mask(tokens, [8.0, 9.0])
