"""GistEmbedding: lookup, gradients, init, meta-device construction, trainable-parameter helpers."""

import pytest
import torch
from torch import nn
from torchtune.models.llama3_1 import llama3_1
from torchtune.modules.peft import get_adapter_params

from torchtune_gist.models import gist_llama3_1_tiny, lora_gist_llama3_1_tiny
from torchtune_gist.modules import (
    GistEmbedding,
    get_gist_embedding,
    init_gist_embeddings,
    initial_gist_rows,
    set_trainable_params,
    trainable_gist_params,
)
from torchtune_gist.tiny import TINY_LLAMA3_1_ARGS


@pytest.mark.parametrize("gist_ids", [[8, 9], [10, 11], [3, 10]], ids=["inside", "beyond", "mixed"])
def test_lookup_uses_gist_rows_for_gist_ids_and_vocabulary_otherwise(gist_ids):
    emb = GistEmbedding(10, 4, gist_ids)
    with torch.no_grad():
        emb.gist_embeddings.copy_(torch.tensor([[100.0] * 4, [200.0] * 4]))
    tokens = torch.tensor([[0, gist_ids[0], 5, gist_ids[1]], [gist_ids[1], 1, 2, 7]])
    out = emb(tokens)
    assert out.shape == (2, 4, 4)
    for b in range(2):
        for s in range(4):
            t = int(tokens[b, s])
            want = emb.gist_embeddings[gist_ids.index(t)] if t in gist_ids else emb.weight[t]
            assert torch.equal(out[b, s], want)


def test_gradients_reach_only_the_gist_rows_and_only_from_gist_positions():
    emb = GistEmbedding(10, 4, [8, 9])
    assert not emb.weight.requires_grad and emb.gist_embeddings.requires_grad
    emb(torch.tensor([[1, 8, 8, 2]])).sum().backward()
    assert emb.weight.grad is None
    assert torch.equal(emb.gist_embeddings.grad, torch.tensor([[2.0] * 4, [0.0] * 4]))


def test_init_sets_gist_rows_to_the_vocabulary_mean():
    emb = GistEmbedding(10, 4, [9])
    with torch.no_grad():
        emb.weight.copy_(torch.arange(40.0).view(10, 4))
        emb.gist_embeddings.zero_()
    init_gist_embeddings(emb)
    assert torch.equal(emb.gist_embeddings, torch.tensor([[18.0, 19.0, 20.0, 21.0]]))
    rows = initial_gist_rows(emb.weight.to(torch.bfloat16), 3)
    assert rows.shape == (3, 4) and rows.dtype == torch.bfloat16


def test_built_model_starts_at_the_vocabulary_mean():
    model = gist_llama3_1_tiny(num_gist_tokens=3)
    emb = get_gist_embedding(model)
    expected = model.tok_embeddings.weight.mean(0).expand(3, -1)
    torch.testing.assert_close(emb.gist_embeddings, expected)


@pytest.mark.parametrize(
    "ids, error",
    [([], ValueError), ([5, 5], ValueError), ([12], ValueError), ([-1], ValueError), ([1.0], TypeError)],
)
def test_bad_gist_ids_are_rejected(ids, error):
    with pytest.raises(error, match="gist"):
        GistEmbedding(10, 4, ids)


def test_get_gist_embedding_rejects_plain_models():
    with pytest.raises(TypeError, match="not gist-aware"):
        get_gist_embedding(llama3_1(**TINY_LLAMA3_1_ARGS))


def test_meta_build_then_to_empty_load_base_and_init():
    base = llama3_1(**TINY_LLAMA3_1_ARGS)
    with torch.device("meta"):
        model = gist_llama3_1_tiny(num_gist_tokens=2)
    assert all(p.is_meta for p in model.parameters())
    with pytest.raises(ValueError, match="meta device"):
        init_gist_embeddings(model)
    model.to_empty(device="cpu")
    result = model.load_state_dict(base.state_dict(), strict=False)
    assert result.missing_keys == ["tok_embeddings.gist_embeddings"] and result.unexpected_keys == []
    for m in model.modules():
        if hasattr(m, "rope_init"):
            m.rope_init()
    init_gist_embeddings(model)
    torch.testing.assert_close(model.tok_embeddings.gist_embeddings, base.tok_embeddings.weight.mean(0).expand(2, -1))
    tokens = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(model(tokens), base(tokens))


def test_gist_rows_materialise_from_meta_after_the_vocabulary_is_loaded():
    with torch.device("meta"):
        emb = GistEmbedding(10, 4, [9])
    emb.weight = nn.Parameter(torch.randn(10, 4), requires_grad=False)
    init_gist_embeddings(emb)
    assert not emb.gist_embeddings.is_meta and emb.gist_embeddings.requires_grad
    torch.testing.assert_close(emb.gist_embeddings[0], emb.weight.mean(0))


def test_adapter_protocol_exposes_the_gist_rows_to_torchtune():
    model = lora_gist_llama3_1_tiny(["q_proj", "v_proj"])
    names = set(get_adapter_params(model))
    assert "tok_embeddings.gist_embeddings" in names
    assert "layers.0.attn.q_proj.lora_a.weight" in names


@pytest.mark.parametrize("train_lora", [True, False])
def test_set_trainable_params_freezes_everything_else(train_lora):
    model = lora_gist_llama3_1_tiny(["q_proj", "v_proj"])
    params = set_trainable_params(model, train_lora=train_lora)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(params) == set(trainable_gist_params(model, train_lora=train_lora))
    assert "tok_embeddings.gist_embeddings" in trainable
    assert any("lora" in n for n in trainable) == train_lora
    assert "tok_embeddings.weight" not in trainable


def test_bf16():
    emb = GistEmbedding(10, 4, [9], dtype=torch.bfloat16)
    out = emb(torch.tensor([[1, 9]]))
    assert out.dtype == torch.bfloat16 and torch.equal(out[0, 1], emb.gist_embeddings[0])
