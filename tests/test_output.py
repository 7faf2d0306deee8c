"""The training loss projects onto the vocabulary only where a label is, and loses nothing by it."""

from typing import List

import pytest
import torch
import torch.nn.functional as F

from torchtune_gist.masks import make_gist_mask
from torchtune_gist.models import lora_gist_llama3_1_tiny
from torchtune_gist.models.smollm2 import tie_output
from torchtune_gist.modules import output_at, set_trainable_params
from torchtune_gist.tiny import TINY_VOCAB_SIZE
from torchtune_gist.training import masked_loss

K = 2
IGNORE = -100


def _model(tied: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = lora_gist_llama3_1_tiny(["q_proj", "v_proj"], num_gist_tokens=K)
    if tied:
        tie_output(model)
    set_trainable_params(model)
    return model


def _batch() -> dict:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (2, 12), generator=g)
    gist_ids = list(range(TINY_VOCAB_SIZE - K, TINY_VOCAB_SIZE))
    tokens[:, 5 : 5 + K] = torch.tensor(gist_ids)
    labels = torch.full_like(tokens, IGNORE)
    labels[0, 8:] = tokens[0, 8:]
    labels[1, 10:] = tokens[1, 10:]
    return {"tokens": tokens, "labels": labels, "mask": make_gist_mask(tokens, gist_ids, mode="gist")}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_masked_loss_equals_the_loss_over_full_logits(tied):
    model, batch = _model(tied), _batch()
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=IGNORE)
    projection = model.output
    rows: List[int] = []
    # A TiedLinear is not a module and takes no hook: the untied case checks what the projection sees.
    handle = None if tied else projection.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[0]))
    loss_sum, n = masked_loss(model, batch, loss_fn, IGNORE)
    if handle is not None:
        handle.remove()
        assert rows == [int(n)]  # the projection saw the labelled rows only, flattened
    assert model.output is projection
    loss_sum.backward()
    fast = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    logits = model(batch["tokens"], mask=batch["mask"])
    assert logits.shape == (2, 12, TINY_VOCAB_SIZE)  # the full path is back after the context
    shifted = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], IGNORE)], 1)
    reference = F.cross_entropy(
        logits.reshape(-1, TINY_VOCAB_SIZE), shifted.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    reference.backward()
    assert int(n) == int((shifted != IGNORE).sum()) == 6
    torch.testing.assert_close(loss_sum, reference, atol=1e-5, rtol=1e-5)
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(fast[k], p.grad, atol=1e-6, rtol=1e-4)


def test_a_batch_without_labels_gives_zero_loss_with_a_graph():
    model, batch = _model(False), _batch()
    batch["labels"].fill_(IGNORE)
    loss_sum, n = masked_loss(model, batch, torch.nn.CrossEntropyLoss(ignore_index=IGNORE), IGNORE)
    assert int(n) == 0 and float(loss_sum) == 0.0
    loss_sum.backward()


def test_output_at_is_restored_and_refuses_chunked_or_nested_use():
    model = _model(False)
    names = [k for k, _ in model.named_parameters()]
    positions = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(KeyError):
        with output_at(model, positions):
            assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (3, TINY_VOCAB_SIZE)
            with pytest.raises(RuntimeError, match="already restricted"):
                with output_at(model, positions):
                    pass
            raise KeyError("boom")
    assert [k for k, _ in model.named_parameters()] == names
    model.set_num_output_chunks(2)
    with pytest.raises(ValueError, match="chunked"):
        with output_at(model, positions):
            pass
