"""FlexAttention ``BlockMask``s give the dense gist mask's attention through torchtune's attention layers.

torchtune dispatches a ``BlockMask`` to FlexAttention only on CUDA; here each layer's attention call is
swapped for the same dispatch on the CPU (FlexAttention runs forward-only there, uncompiled), so the
masks the collators build for CUDA training are checked end to end without a GPU.
"""

import warnings
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from torchtune_gist.data import PackedGistDataset, packed_gist_collate, padded_gist_collate
from torchtune_gist.masks import MASK_MODES
from torchtune_gist.models import gist_llama3_1_tiny
from torchtune_gist.tiny import TINY_VOCAB_SIZE

K = 3
GIST = list(range(TINY_VOCAB_SIZE - K, TINY_VOCAB_SIZE))
PAD = 0


def _flex_or_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[object], dropout_p: float, is_causal: bool
) -> torch.Tensor:
    """torchtune's CUDA attention call (``_sdpa_or_flex_attention``): FlexAttention for a BlockMask, else SDPA."""
    if isinstance(mask, BlockMask):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
            return flex_attention(q, k, v, block_mask=mask)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, None] if mask is not None else None, dropout_p=dropout_p, is_causal=is_causal
    )


def _examples() -> list:
    """Rows of 100 to 300 tokens (several 128-token blocks, partial and full), gists at varied places; one without."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n, gist_at in ((300, 40), (190, 150), (100, None), (257, 0)):
        tokens = torch.randint(1, 256, (n,), generator=g).tolist()
        if gist_at is not None:
            tokens[gist_at : gist_at + K] = GIST
        out.append({"tokens": tokens, "labels": tokens})
    return out


@pytest.fixture
def flex_model(monkeypatch: pytest.MonkeyPatch) -> torch.nn.Module:
    torch.manual_seed(0)
    model = gist_llama3_1_tiny(num_gist_tokens=K, num_heads=4, num_kv_heads=2).eval()
    for layer in model.layers:
        monkeypatch.setattr(layer.attn, "_attention_call", _flex_or_sdpa)
    return model


@pytest.mark.parametrize("mode", MASK_MODES)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_the_model_under_block_masks_equals_the_model_under_the_dense_mask(flex_model, mode, packed):
    if packed:
        rows = PackedGistDataset(_examples(), max_seq_len=512, pad_id=PAD)
        collate = lambda **kw: packed_gist_collate([rows[i] for i in range(len(rows))], **kw)  # noqa: E731
    else:
        collate = lambda **kw: padded_gist_collate(_examples(), **kw)  # noqa: E731
    dense = collate(gist_token_ids=GIST, pad_id=PAD, mask_mode=mode)
    blocks = collate(gist_token_ids=GIST, pad_id=PAD, mask_mode=mode, block_mask=True)
    assert isinstance(blocks["mask"], BlockMask) and not isinstance(dense["mask"], BlockMask)
    with torch.no_grad():
        out = flex_model(blocks["tokens"], mask=blocks["mask"], input_pos=blocks["input_pos"])
        ref = flex_model(dense["tokens"], mask=dense["mask"], input_pos=dense["input_pos"])
    real = dense["tokens"] != PAD
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)


def test_block_masks_carry_the_gist_rule(flex_model):
    """Not causal attention in disguise: after the gists, the gist mode changes what the model computes."""
    batch = {
        mode: padded_gist_collate(_examples()[:1], gist_token_ids=GIST, pad_id=PAD, mask_mode=mode, block_mask=True)
        for mode in MASK_MODES
    }
    with torch.no_grad():
        outs = {mode: flex_model(b["tokens"], mask=b["mask"], input_pos=b["input_pos"]) for mode, b in batch.items()}
        causal = flex_model(batch["gist"]["tokens"])
    after = slice(40 + K, None)
    torch.testing.assert_close(outs["pos_control"], causal, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outs["gist"][:, after], causal[:, after], atol=1e-3)
    assert not torch.allclose(outs["neg_control"][:, after], outs["gist"][:, after], atol=1e-3)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_block_masks_are_built_on_the_device_attention_runs_on(packed):
    """``BlockMask.to`` moves the block tables, not the tensors ``mask_mod`` reads: the collators build the
    whole mask on ``block_mask_device`` (the recipe's training device). ``meta`` stands in for a GPU."""
    if packed:
        rows = PackedGistDataset(_examples(), max_seq_len=512, pad_id=PAD)
        batch = packed_gist_collate(
            [rows[0]], gist_token_ids=GIST, pad_id=PAD, block_mask=True, block_mask_device="meta"
        )
    else:
        batch = padded_gist_collate(
            _examples(), gist_token_ids=GIST, pad_id=PAD, block_mask=True, block_mask_device="meta"
        )
    mask = batch["mask"]
    read_by_mask_mod = [c.cell_contents for c in mask.mask_mod.__closure__ if isinstance(c.cell_contents, torch.Tensor)]
    assert read_by_mask_mod and all(t.device.type == "meta" for t in read_by_mask_mod)
    assert mask.kv_num_blocks.device.type == "meta" and mask.kv_indices.device.type == "meta"
    assert batch["tokens"].device.type == "cpu"  # the rest of the batch moves with the recipe's batch_to_device
