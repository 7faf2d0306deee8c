"""Segment masks give the dense gist mask's attention, through torchtune's own SDPA call."""

import pytest
import torch
import torch.nn.functional as F

from torchtune_gist.data import packed_gist_collate, padded_gist_collate
from torchtune_gist.masks import MASK_MODES, make_gist_mask
from torchtune_gist.models import lora_gist_llama3_1_tiny
from torchtune_gist.modules import set_trainable_params
from torchtune_gist.segment_masks import GistSegmentMask, make_gist_segment_mask
from torchtune_gist.tiny import TINY_VOCAB_SIZE
from torchtune_gist.training import masked_loss

K = 2
GIST = list(range(TINY_VOCAB_SIZE - K, TINY_VOCAB_SIZE))
PAD = 0
IGNORE = -100


def _padded_tokens() -> torch.Tensor:
    """Four rows: gists mid-row with padding, gists first, gists last, no gists at all."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 256, (4, 14), generator=g)
    tokens[0, 4:6] = torch.tensor(GIST)
    tokens[0, 11:] = PAD
    tokens[1, 0:2] = torch.tensor(GIST)
    tokens[2, 12:14] = torch.tensor(GIST)
    return tokens


def _packed() -> tuple:
    """Two packed rows: documents with and without gists, and padding as its own last document."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 256, (2, 16), generator=g)
    docs = torch.tensor([[0] * 6 + [1] * 5 + [2] * 3 + [3] * 2, [0] * 9 + [1] * 7])
    tokens[0, 2:4] = torch.tensor(GIST)
    tokens[0, 8:10] = torch.tensor(GIST)
    tokens[0, 14:] = PAD
    tokens[1, 9:11] = torch.tensor(GIST)
    return tokens, docs


@pytest.mark.parametrize("mode", MASK_MODES)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_segments_attend_exactly_like_the_dense_mask(mode, packed):
    tokens, docs = _packed() if packed else (_padded_tokens(), None)
    dense = make_gist_mask(tokens, GIST, pad_id=PAD, mode=mode, document_ids=docs)
    segments = make_gist_segment_mask(tokens, GIST, pad_id=PAD, mode=mode, document_ids=docs)
    real = tokens != PAD
    assert isinstance(segments, GistSegmentMask) and segments.shape == dense.shape
    assert torch.equal(segments.dense()[real], dense[real])

    b, s = tokens.shape
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(b, 4, s, 8, generator=g, requires_grad=True) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=segments[:, None, :, :])
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None])
    keep = real[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-6, rtol=1e-5)
    assert not out[~keep].any()  # padding queries: zeros
    weights = torch.randn(out.shape, generator=g) * keep
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_grouped_query_heads():
    tokens = _padded_tokens()
    segments = make_gist_segment_mask(tokens, GIST, pad_id=PAD)
    dense = make_gist_mask(tokens, GIST, pad_id=PAD)
    q, k, v = torch.randn(4, 4, 14, 8), torch.randn(4, 2, 14, 8), torch.randn(4, 2, 14, 8)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=segments[:, None], enable_gqa=True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None], enable_gqa=True)
    real = (tokens != PAD)[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], ref[real], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", MASK_MODES)
def test_the_model_under_segments_equals_the_model_under_the_dense_mask(mode):
    """Through torchtune's attention: same loss and same gradients as the dense mask, per mode."""
    torch.manual_seed(0)
    model = lora_gist_llama3_1_tiny(["q_proj", "k_proj", "v_proj"], num_gist_tokens=K)
    set_trainable_params(model)
    examples = [{"tokens": row[row != PAD].tolist(), "labels": row[row != PAD].tolist()} for row in _padded_tokens()]
    results = []
    for segment_mask in (False, True):
        batch = padded_gist_collate(
            examples, gist_token_ids=GIST, pad_id=PAD, mask_mode=mode, segment_mask=segment_mask
        )
        assert isinstance(batch["mask"], GistSegmentMask) == segment_mask
        model.zero_grad()
        loss, _ = masked_loss(model, batch, torch.nn.CrossEntropyLoss(ignore_index=IGNORE), IGNORE)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (dense_loss, dense_grads), (seg_loss, seg_grads) = results
    torch.testing.assert_close(seg_loss, dense_loss, atol=1e-5, rtol=1e-5)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(seg_grads[name], grad, atol=1e-5, rtol=1e-4)


def test_segments_carry_the_gist_rule():
    """The segment path is not plain causal attention: the gist mode changes what queries after the gists read."""
    torch.manual_seed(0)
    model = lora_gist_llama3_1_tiny(["q_proj", "v_proj"], num_gist_tokens=K).eval()
    tokens = _padded_tokens()[0:1, :11]  # gists at 4 and 5, no padding
    outs = {mode: model(tokens, mask=make_gist_segment_mask(tokens, GIST, mode=mode)) for mode in MASK_MODES}
    causal = model(tokens)
    torch.testing.assert_close(outs["pos_control"], causal, atol=1e-5, rtol=1e-5)
    after = slice(6, None)  # queries after the gist span
    assert not torch.allclose(outs["gist"][:, after], causal[:, after], atol=1e-3)
    assert not torch.allclose(outs["neg_control"][:, after], outs["gist"][:, after], atol=1e-3)


def test_packed_collate_builds_segments():
    tokens, docs = _packed()
    rows = [
        {"tokens": t.tolist(), "labels": t.tolist(), "input_pos": list(range(16)), "document_ids": d.tolist()}
        for t, d in zip(tokens, docs)
    ]
    batch = packed_gist_collate(rows, gist_token_ids=GIST, pad_id=PAD, segment_mask=True)
    dense = make_gist_mask(tokens, GIST, pad_id=PAD, document_ids=docs)
    real = tokens != PAD
    assert torch.equal(batch["mask"].dense()[real], dense[real])
    with pytest.raises(ValueError, match="either"):
        packed_gist_collate(rows, gist_token_ids=GIST, pad_id=PAD, segment_mask=True, block_mask=True)


def test_bad_layouts_and_unsupported_uses_are_clear_errors():
    tokens = _padded_tokens()
    inner_pad = tokens.clone()
    inner_pad[3, 2] = PAD
    with pytest.raises(ValueError, match="right padding"):
        make_gist_segment_mask(inner_pad, GIST, pad_id=PAD)
    tokens2, docs = _packed()
    split = docs.clone()
    split[1, -1] = 0
    with pytest.raises(ValueError, match="several runs"):
        make_gist_segment_mask(tokens2, GIST, pad_id=PAD, document_ids=split)
    mask = make_gist_segment_mask(tokens, GIST, pad_id=PAD)
    assert mask.to("cpu").spans == mask.spans and mask.dim() == 3 and mask[:, None].shape == (4, 1, 14, 14)
    with pytest.raises(TypeError, match="GistSegmentMask"):
        mask.float()
    with pytest.raises(TypeError, match="GistSegmentMask"):
        mask & mask
    with pytest.raises(ValueError, match="is_causal"):
        q = torch.randn(4, 2, 14, 8)
        F.scaled_dot_product_attention(q, q, q, attn_mask=mask[:, None], is_causal=True)


def test_segment_min_len_chooses_per_batch():
    examples = [{"tokens": row[row != PAD].tolist(), "labels": row[row != PAD].tolist()} for row in _padded_tokens()]
    short = padded_gist_collate(examples, gist_token_ids=GIST, pad_id=PAD, segment_mask=True, segment_min_len=15)
    long = padded_gist_collate(examples, gist_token_ids=GIST, pad_id=PAD, segment_mask=True, segment_min_len=14)
    assert not isinstance(short["mask"], GistSegmentMask) and isinstance(long["mask"], GistSegmentMask)
