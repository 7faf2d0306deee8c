"""Gist-aware builders: the information barrier through the real model, training, QLoRA, meta, bf16."""

from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torchao.dtypes.nf4tensor import NF4Tensor
from torchtune.models.llama3 import llama3
from torchtune.modules import TiedLinear
from torchtune.modules.peft import LoRALinear

from torchtune_gist.masks import make_gist_mask
from torchtune_gist.models import (
    add_gist_embedding,
    gist_llama3_1,
    gist_llama3_1_8b,
    gist_llama3_1_70b,
    gist_llama3_1_tiny,
    gist_llama3_2,
    gist_llama3_2_1b,
    gist_llama3_2_3b,
    lora_gist_llama3_1_8b,
    lora_gist_llama3_1_70b,
    lora_gist_llama3_1_tiny,
    lora_gist_llama3_2_1b,
    lora_gist_llama3_2_3b,
    qlora_gist_llama3_1_8b,
    qlora_gist_llama3_1_tiny,
)
from torchtune_gist.modules import GistEmbedding, init_gist_embeddings, set_trainable_params
from torchtune_gist.tiny import TINY_LLAMA3_1_ARGS

GIST_IDS = [510, 511]
PROMPT, REST = 6, 6
AFTER = slice(PROMPT + len(GIST_IDS), None)


def _tokens(batch: int = 2) -> torch.Tensor:
    """``prompt + gists + rest`` rows of byte ids; row 1 has a shorter prompt (gists earlier)."""
    rows = []
    for b in range(batch):
        prompt = torch.randint(0, 256, (PROMPT - b,))
        rest = torch.randint(0, 256, (REST + b,))
        rows.append(torch.cat([prompt, torch.tensor(GIST_IDS), rest]))
    return torch.stack(rows)


def _change_prompt(tokens: torch.Tensor) -> torch.Tensor:
    changed = tokens.clone()
    changed[:, 0] = (changed[:, 0] + 1) % 256
    changed[:, 2] = (changed[:, 2] + 7) % 256
    return changed


MaskFn = Callable[[torch.Tensor], Optional[torch.Tensor]]


@torch.no_grad()
def _after_gist_logits_unchanged(model: torch.nn.Module, mask_fn: MaskFn) -> bool:
    """Whether every logit after the gist span is bit-identical when prompt tokens change."""
    tokens = _tokens()
    changed = _change_prompt(tokens)
    a = model(tokens, mask=mask_fn(tokens))
    b = model(changed, mask=mask_fn(changed))
    return all(torch.equal(a[r, PROMPT - r + len(GIST_IDS) :], b[r, PROMPT - r + len(GIST_IDS) :]) for r in range(2))


def _gist_mask(mode: str) -> MaskFn:
    return lambda tokens: make_gist_mask(tokens, GIST_IDS, mode=mode)


def _causal_mask(tokens: torch.Tensor) -> torch.Tensor:
    b, s = tokens.shape
    return torch.tril(torch.ones(s, s, dtype=torch.bool)).expand(b, s, s)


@pytest.fixture
def model() -> torch.nn.Module:
    return gist_llama3_1_tiny(num_gist_tokens=len(GIST_IDS)).eval()


def test_neg_control_blocks_the_prompt(model):
    assert _after_gist_logits_unchanged(model, _gist_mask("neg_control"))


def test_the_barrier_check_detects_a_leak(model):
    """The check above bites: with a causal mask, or no mask at all, the prompt leaks."""
    assert not _after_gist_logits_unchanged(model, _causal_mask)
    assert not _after_gist_logits_unchanged(model, lambda tokens: None)


def test_gist_mask_lets_the_prompt_through_the_gists_only(model):
    assert not _after_gist_logits_unchanged(model, _gist_mask("gist"))
    one_layer = gist_llama3_1(**{**TINY_LLAMA3_1_ARGS, "num_layers": 1}, num_gist_tokens=len(GIST_IDS)).eval()
    # With one layer the prompt needs two hops (prompt -> gist -> later token): it cannot arrive.
    assert _after_gist_logits_unchanged(one_layer, _gist_mask("gist"))
    assert not _after_gist_logits_unchanged(one_layer, _causal_mask)


def test_the_gist_rows_feed_the_tokens_after_the_gists(model):
    tokens = _tokens()
    mask = make_gist_mask(tokens, GIST_IDS, mode="gist")
    with torch.no_grad():
        before = model(tokens, mask=mask)
        model.tok_embeddings.gist_embeddings.add_(1.0)
        after = model(tokens, mask=mask)
    assert torch.equal(before[0, :PROMPT], after[0, :PROMPT])
    assert not torch.allclose(before[0, AFTER], after[0, AFTER])


def test_pos_control_equals_plain_causal(model):
    tokens = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(
            model(tokens, mask=make_gist_mask(tokens, GIST_IDS, mode="pos_control")), model(tokens)
        )


def _frozen_state(model: torch.nn.Module):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens, mask=make_gist_mask(tokens, GIST_IDS))
    labels = tokens.clone()
    labels[:, : PROMPT + len(GIST_IDS)] = -100
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())


@pytest.mark.parametrize("train_lora", [True, False])
def test_training_updates_only_gist_rows_and_lora(train_lora):
    model = lora_gist_llama3_1_tiny(["q_proj", "v_proj"], num_gist_tokens=len(GIST_IDS))
    trainable = set_trainable_params(model, train_lora=train_lora)
    frozen = _frozen_state(model)
    start = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    tokens = _tokens()
    for _ in range(3):
        optimizer.zero_grad()
        _loss(model, tokens).backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
        optimizer.step()
    assert "tok_embeddings.weight" in frozen and "layers.0.attn.q_proj.weight" in frozen
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert not torch.equal(model.tok_embeddings.gist_embeddings, start["tok_embeddings.gist_embeddings"])
    lora_b = "layers.1.attn.v_proj.lora_b.weight"
    assert (lora_b in trainable) == train_lora
    if train_lora:
        assert not torch.equal(trainable[lora_b], start[lora_b])


def test_qlora_tiny_forward_backward_on_cpu():
    model = qlora_gist_llama3_1_tiny(
        ["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True, num_gist_tokens=len(GIST_IDS)
    )
    assert isinstance(model.layers[0].attn.q_proj.weight, NF4Tensor)
    assert isinstance(model.layers[0].mlp.w1.weight, NF4Tensor)
    trainable = set_trainable_params(model)
    _loss(model, _tokens()).backward()
    grad = model.tok_embeddings.gist_embeddings.grad
    assert grad is not None and grad.abs().sum() > 0
    assert trainable["layers.0.attn.q_proj.lora_b.weight"].grad.abs().sum() > 0
    assert trainable["layers.0.mlp.w1.lora_b.weight"].grad.abs().sum() > 0
    assert model.layers[0].attn.q_proj.weight.grad is None


def test_bf16_forward():
    model = gist_llama3_1_tiny(num_gist_tokens=len(GIST_IDS))
    tokens = _tokens()
    mask = make_gist_mask(tokens, GIST_IDS)
    with torch.no_grad():
        ref = model(tokens, mask=mask)
        model.to(torch.bfloat16)
        assert model.tok_embeddings(tokens).dtype == torch.bfloat16
        out = model(tokens, mask=mask)  # torchtune returns fp32 logits
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.1)


LORA = (["q_proj", "v_proj"],)


@pytest.mark.parametrize(
    "builder, args, embed_dim, tied",
    [
        (gist_llama3_1_8b, (), 4096, False),
        (gist_llama3_1_70b, (), 8192, False),
        (lora_gist_llama3_1_8b, LORA, 4096, False),
        (lora_gist_llama3_1_70b, LORA, 8192, False),
        (qlora_gist_llama3_1_8b, LORA, 4096, False),
        (gist_llama3_2_1b, (), 2048, True),
        (gist_llama3_2_3b, (), 3072, True),
        (lora_gist_llama3_2_1b, LORA, 2048, True),
        (lora_gist_llama3_2_3b, LORA, 3072, True),
    ],
)
def test_large_builders_construct_on_meta(builder, args, embed_dim, tied):
    with torch.device("meta"):
        model = builder(*args, num_gist_tokens=4)
    emb = model.tok_embeddings
    assert isinstance(emb, GistEmbedding)
    assert emb.gist_token_ids == [128252, 128253, 128254, 128255]
    assert emb.weight.shape == (128_256, embed_dim) and emb.gist_embeddings.shape == (4, embed_dim)
    assert all(p.is_meta for p in model.parameters())
    assert isinstance(model.output, TiedLinear) == tied
    if tied:
        assert model.output.tied_module is emb
    if args:
        assert isinstance(model.layers[0].attn.q_proj, LoRALinear)


@pytest.mark.parametrize(
    "build",
    [
        lambda: gist_llama3_1_tiny(num_gist_tokens=2),
        lambda: lora_gist_llama3_1_tiny(["q_proj", "v_proj"], num_gist_tokens=2),
        lambda: qlora_gist_llama3_1_tiny(["q_proj", "v_proj"], num_gist_tokens=2),
    ],
    ids=["gist", "lora", "qlora"],
)
def test_tiny_builders_on_meta_then_to_empty_and_init(build):
    with torch.device("meta"):
        model = build()
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.tok_embeddings.weight.normal_()
    for m in model.modules():
        if hasattr(m, "rope_init"):
            m.rope_init()
        if isinstance(m, LoRALinear):
            m.initialize_parameters()
    init_gist_embeddings(model)
    torch.testing.assert_close(model.tok_embeddings.gist_embeddings[1], model.tok_embeddings.weight.mean(0))
    assert model.tok_embeddings.gist_token_ids == GIST_IDS


def test_tied_output_is_retied_to_the_gist_embedding():
    model = gist_llama3_2(**{**TINY_LLAMA3_1_ARGS, "scale_factor": 32}, num_gist_tokens=2)
    assert model.output.tied_module is model.tok_embeddings
    tokens = _tokens()
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(2.0)  # the output must read the live vocabulary
        h = model.norm(model.layers[1](model.layers[0](model.tok_embeddings(tokens))))
        torch.testing.assert_close(model(tokens), h @ model.tok_embeddings.weight.T)


def test_add_gist_embedding_with_ids_beyond_the_vocabulary():
    base = llama3(**{k: v for k, v in TINY_LLAMA3_1_ARGS.items()})
    model = add_gist_embedding(base, 2, [512, 513])
    tokens = torch.tensor([[1, 2, 512, 513, 3]])
    logits = model(tokens, mask=make_gist_mask(tokens, [512, 513]))
    assert logits.shape == (1, 5, 512)
    with pytest.raises(ValueError, match="2 gist_token_ids"):
        add_gist_embedding(llama3(**TINY_LLAMA3_1_ARGS), 3, [510, 511])
    with pytest.raises(TypeError, match="nn.Embedding"):
        add_gist_embedding(model, 1)
