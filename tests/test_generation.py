"""Gist caching: compress once, save/load, generate from K cached entries, and the controls.

The core check: greedy generation from the gist cache equals greedy decoding of the full
sequence (prompt + gists + continuation + generated so far) under the gist mask, recomputed
from scratch at every step with torchtune's own forward; and the check is sharp enough to
fail if positions restarted after the gists or the prompt leaked.
"""

import copy
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchtune.models.llama3_1 import llama3_1, lora_llama3_1

from torchtune_gist.checkpointing import export_merged_hf, load_gist_adapter, save_gist_adapter
from torchtune_gist.data import GistPasskeyTransform
from torchtune_gist.generation import (
    GistCache,
    KVStore,
    compress,
    generate,
    generate_from_cache,
    grouped_query_attention,
    model_fingerprint,
    score_continuations,
    store_attention,
)
from torchtune_gist.generation._generate import _decode
from torchtune_gist.gist_tokens import default_gist_token_ids
from torchtune_gist.masks import make_gist_mask
from torchtune_gist.models import lora_gist_llama3_1_tiny
from torchtune_gist.tiny import TINY_LLAMA3_1_ARGS, TINY_VOCAB_SIZE, write_tiny_base_checkpoint, write_tiny_tokenizer

K = 3
IDS = default_gist_token_ids(TINY_VOCAB_SIZE, K)
ATOL = 1e-4


def _tiny(seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return llama3_1(**{**TINY_LLAMA3_1_ARGS, **overrides}).eval()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return _tiny()


def _example(n_prompt: int, n_cont: int, seed: int) -> Tuple[List[int], List[int]]:
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 256, (n_prompt,), generator=g).tolist() + IDS
    return prompt, torch.randint(0, 256, (n_cont,), generator=g).tolist()


@torch.no_grad()
def reference_greedy(
    model: nn.Module,
    prefix: List[int],
    n_new: int,
    *,
    mode: Optional[str] = "gist",
    positions: Optional[Sequence[int]] = None,
) -> Tuple[List[int], torch.Tensor]:
    """Greedy decoding with no cache: the whole sequence is recomputed by torchtune's forward at every step.

    ``mode=None`` uses torchtune's default causal masking; ``positions`` overrides the positions
    of the first ``len(positions)`` tokens (the rest continue from the last one).
    """
    seq, logits = list(prefix), []
    for _ in range(n_new):
        x = torch.tensor([seq])
        mask = None if mode is None else make_gist_mask(x, IDS, mode=mode)
        pos = None
        if positions is not None:
            pos = list(positions) + [positions[-1] + 1 + i for i in range(len(seq) - len(positions))]
            pos = torch.tensor([pos])
        step = model(x, mask=mask, input_pos=pos)[0, -1]
        logits.append(step)
        seq.append(int(step.index_fill(0, torch.tensor(IDS), float("-inf")).argmax()))
    return seq[len(prefix) :], torch.stack(logits)


BATCH = [(5, 4, 1), (17, 1, 2), (0, 7, 3)]  # (prompt length without gists, continuation length, seed)


def test_gist_cache_generation_equals_full_sequence_under_gist_mask(model):
    examples = [_example(*spec) for spec in BATCH]
    prompts, conts = [p for p, _ in examples], [c for _, c in examples]
    cache = compress(model, prompts, gist_token_ids=IDS)
    batched = generate_from_cache(model, cache, conts, max_new_tokens=6, return_logits=True)
    for i, (prompt, cont) in enumerate(examples):
        ref_tokens, ref_logits = reference_greedy(model, prompt + cont, 6)
        assert batched.tokens[i] == ref_tokens
        torch.testing.assert_close(batched.logits[i], ref_logits, atol=ATOL, rtol=0)
        single = generate_from_cache(
            model, compress(model, [prompt], gist_token_ids=IDS), [cont], max_new_tokens=6, return_logits=True
        )
        assert single.tokens[0] == ref_tokens
        torch.testing.assert_close(single.logits[0], batched.logits[i], atol=1e-5, rtol=0)
    # the decode store holds exactly K + longest continuation + new tokens (the last one is never fed back)
    slots = K + 7 + 6 - 1
    assert batched.kv_slots == slots
    assert batched.kv_bytes == 2 * 2 * 3 * 2 * slots * 16 * 4  # k+v, layers, rows, kv heads, slots, head_dim, fp32


def test_equivalence_check_detects_reused_positions_and_prompt_leaks(model):
    prompt, cont = _example(20, 5, 7)
    ref_tokens, ref_logits = reference_greedy(model, prompt + cont, 4)
    cache = compress(model, [prompt], gist_token_ids=IDS)

    # positions reused: continuing at K (the cache length) instead of the original next position
    reused = GistCache(cache.keys, cache.values, torch.tensor([K]), cache.gist_token_ids, cache.fingerprint)
    wrong = generate_from_cache(model, reused, [cont], max_new_tokens=4, return_logits=True)
    assert (wrong.logits[0][0] - ref_logits[0]).abs().max() > 100 * ATOL
    # and the same mistake made in the full-sequence reference is caught as well
    n = len(prompt)
    _, shifted = reference_greedy(model, prompt + cont, 4, positions=list(range(n)) + list(range(K, K + len(cont))))
    assert (shifted[0] - ref_logits[0]).abs().max() > 100 * ATOL

    # the prompt leaking (full causal attention) changes the logits too
    leak = generate(
        model, [prompt], [cont], mode="pos_control", gist_token_ids=IDS, max_new_tokens=4, return_logits=True
    )
    assert (leak.logits[0][0] - ref_logits[0]).abs().max() > 100 * ATOL

    right = generate_from_cache(model, cache, [cont], max_new_tokens=4, return_logits=True)
    assert right.tokens[0] == ref_tokens
    torch.testing.assert_close(right.logits[0], ref_logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("chunk_size", [512, 2])  # one pass, and chunks (some all padding in the short rows)
def test_controls_match_their_full_sequence_references(model, chunk_size):
    examples = [_example(*spec) for spec in BATCH]
    prompts, conts = [p for p, _ in examples], [c for _, c in examples]
    runs = {
        mode: generate(
            model,
            prompts,
            conts,
            mode=mode,
            gist_token_ids=IDS,
            max_new_tokens=5,
            return_logits=True,
            chunk_size=chunk_size,
        )
        for mode in ("gist", "pos_control", "neg_control", "truncate")
    }
    for i, (prompt, cont) in enumerate(examples):
        for mode in ("gist", "pos_control", "neg_control"):
            tokens, logits = reference_greedy(model, prompt + cont, 5, mode=mode)
            assert runs[mode].tokens[i] == tokens, mode
            torch.testing.assert_close(runs[mode].logits[i], logits, atol=ATOL, rtol=0)
        tokens, logits = reference_greedy(model, prompt[:-K][-K:] + cont, 5, mode=None)
        assert runs["truncate"].tokens[i] == tokens
        torch.testing.assert_close(runs["truncate"].logits[i], logits, atol=ATOL, rtol=0)
    longest = max(len(p) + len(c) for p, c in examples)
    assert runs["pos_control"].kv_slots == longest + 4
    assert runs["neg_control"].kv_slots == 7 + 4
    assert runs["gist"].kv_slots == K + 7 + 4
    assert runs["truncate"].kv_slots == max(len(p[:-K][-K:]) + len(c) for p, c in examples) + 4
    assert runs["gist"].kv_bytes < runs["pos_control"].kv_bytes


@torch.no_grad()
def reference_scores(model: nn.Module, row: List[int], n: int, mode: Optional[str]) -> Tuple[float, bool]:
    """Log-probability of ``row``'s last ``n`` tokens from one full-sequence forward (``mode=None``: causal), and
    whether greedy choice (gists never picked) gives them all."""
    x = torch.tensor([row])
    logits = model(x, mask=None if mode is None else make_gist_mask(x, IDS, mode=mode))[0, -n - 1 : -1]
    targets = x[0, -n:]
    logprob = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).sum()
    greedy = logits.index_fill(-1, torch.tensor(IDS), float("-inf")).argmax(-1)
    return float(logprob), bool((greedy == targets).all())


@pytest.mark.parametrize("chunk_size", [512, 2])
def test_scores_match_full_sequence_references_in_every_mode(model, chunk_size):
    examples = [_example(*spec) for spec in [(5, 4, 1), (17, 2, 2), (0, 7, 3)]]
    prompts, conts = [p for p, _ in examples], [c for _, c in examples]
    counts = [3, 1, 5]
    for mode in ("gist", "pos_control", "neg_control", "truncate"):
        scores = score_continuations(
            model, prompts, conts, counts, mode=mode, gist_token_ids=IDS, chunk_size=chunk_size
        )
        for (prompt, cont), n, (logprob, greedy) in zip(examples, counts, scores):
            row = prompt[:-K][-K:] + cont if mode == "truncate" else prompt + cont
            ref_logprob, ref_greedy = reference_scores(model, row, n, None if mode == "truncate" else mode)
            assert logprob == pytest.approx(ref_logprob, abs=1e-4) and greedy == ref_greedy, mode
    # a continuation made of the greedy tokens is greedy, and its log-probability is the generated logits'
    prompt, cont = _example(12, 3, 9)
    out = generate(model, [prompt], [cont], mode="gist", gist_token_ids=IDS, max_new_tokens=4, return_logits=True)
    ((logprob, greedy),) = score_continuations(
        model, [prompt], [cont + out.tokens[0]], [4], mode="gist", gist_token_ids=IDS
    )
    expected = torch.log_softmax(out.logits[0], -1).gather(-1, torch.tensor(out.tokens[0])[:, None]).sum()
    assert greedy and logprob == pytest.approx(float(expected), abs=1e-4)


def test_scoring_from_the_gist_cache_holds_k_entries_not_the_prompt(model, monkeypatch):
    capacities: List[int] = []
    empty = KVStore.empty.__func__

    def recording(cls, model, batch_size, capacity, **kwargs):
        capacities.append(capacity)
        return empty(cls, model, batch_size, capacity, **kwargs)

    monkeypatch.setattr(KVStore, "empty", classmethod(recording))
    prompt, cont = _example(40, 6, 4)
    score_continuations(model, [prompt], [cont], [2], mode="gist", gist_token_ids=IDS)
    assert capacities == [K + 6]
    capacities.clear()
    score_continuations(model, [prompt], [cont], [2], mode="pos_control", gist_token_ids=IDS)
    assert capacities == [len(prompt) + 6]


def test_bad_score_requests_are_refused(model):
    prompt, cont = _example(5, 3, 1)
    for counts, match in (
        ([0], r"num_scored\[0\]=0 must be at least 1"),
        ([3], r"below the continuation's 3 tokens"),
        ([1, 1], "1 prompts, 1 continuations and 2 num_scored"),
    ):
        with pytest.raises(ValueError, match=match):
            score_continuations(model, [prompt], [cont], counts, mode="gist", gist_token_ids=IDS)
    with pytest.raises(ValueError, match="unknown mode 'gists'"):
        score_continuations(model, [prompt], [cont], [1], mode="gists", gist_token_ids=IDS)


def test_fingerprint_samples_large_weights_and_still_tells_models_apart(monkeypatch):
    """Large weights are hashed through an even sample (cheap per ``compress``); a retrained model still differs."""
    import torchtune_gist.generation._cache as cache_module

    monkeypatch.setattr(cache_module, "_FINGERPRINT_SAMPLE", 100)  # every tiny weight is "large" here
    model = _tiny()
    first = model_fingerprint(model, IDS)["weights_sha256"]
    assert model_fingerprint(model, IDS)["weights_sha256"] == first
    with torch.no_grad():
        model.layers[0].attn.q_proj.weight[-1].add_(0.01)  # the last row only: the sample spans the whole weight
    assert model_fingerprint(model, IDS)["weights_sha256"] != first


def test_fingerprint_skips_switched_off_adapters_and_records_rope(model):
    """A merged export's model holds freshly drawn, switched-off LoRA weights: they must not make its caches
    unusable in the next process. Other RoPE settings over the same weights rotate keys otherwise: refused."""

    def lora_model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        m = lora_gist_llama3_1_tiny(["q_proj", "v_proj"], lora_rank=4, lora_alpha=8, num_gist_tokens=K).eval()
        m.load_state_dict({k: v for k, v in model.state_dict().items() if "tok_embeddings" not in k}, strict=False)
        return m

    a, b = lora_model(0), lora_model(1)
    b.tok_embeddings.load_state_dict(a.tok_embeddings.state_dict())
    ids = a.tok_embeddings.gist_token_ids
    assert model_fingerprint(a, ids)["weights_sha256"] != model_fingerprint(b, ids)["weights_sha256"]
    with_adapters = compress(a, [[1, 2] + ids], gist_token_ids=ids)
    assert with_adapters.fingerprint["unmerged_adapters"] is True
    for m in (a, b):
        for module in m.modules():
            if hasattr(module, "disabled"):
                module.disabled = True
    assert model_fingerprint(a, ids)["weights_sha256"] == model_fingerprint(b, ids)["weights_sha256"]
    compress(a, [[1, 2] + ids], gist_token_ids=ids).check_compatible(b)
    with pytest.raises(ValueError, match="LoRA adapters applied beside the base weights, and this model has none"):
        with_adapters.check_compatible(b)  # as a merged export of a's checkpoint loads

    cache = compress(model, [_example(5, 1, 8)[0]], gist_token_ids=IDS)
    assert cache.fingerprint["rope"] == {
        "class": "Llama3ScaledRoPE",
        "dim": 16,
        "base": 500000,
        "scale_factor": 8,
        "low_freq_factor": 1,
        "high_freq_factor": 4,
        "old_context_len": 8192,
    }
    other_rope = _tiny(rope_base=10_000)
    assert model_fingerprint(other_rope, IDS)["weights_sha256"] == cache.fingerprint["weights_sha256"]
    with pytest.raises(ValueError, match="rotary embeddings .* rotated otherwise"):
        cache.check_compatible(other_rope)
    with pytest.raises(ValueError, match="rotary embeddings"):
        generate_from_cache(other_rope, cache, [[4]], max_new_tokens=2)
    older = GistCache(
        cache.keys, cache.values, cache.next_pos, IDS, {k: v for k, v in cache.fingerprint.items() if k != "rope"}
    )
    older.check_compatible(model)  # a cache saved before RoPE settings were recorded


def test_generating_from_a_cache_of_other_gist_ids_is_refused():
    """generate_from_cache compares the cache's gist ids with a gist model's own, as check_compatible does."""
    gist_model = lora_gist_llama3_1_tiny(["q_proj"], lora_rank=4, lora_alpha=8, num_gist_tokens=K).eval()
    ids = gist_model.tok_embeddings.gist_token_ids
    cache = compress(gist_model, [[1, 2] + ids], gist_token_ids=ids)
    swapped = GistCache(cache.keys, cache.values, cache.next_pos, ids[::-1], cache.fingerprint)
    with pytest.raises(ValueError, match="but the model's gist tokens are K=3"):
        generate_from_cache(gist_model, swapped, [[4]], max_new_tokens=2)
    generate_from_cache(gist_model, cache, [[4]], max_new_tokens=2)


def test_cache_holds_k_entries_per_layer_equal_to_torchtunes_kv_cache(model):
    prompts = [_example(9, 1, 1)[0], _example(4, 1, 2)[0]]
    cache = compress(model, prompts, gist_token_ids=IDS)
    assert cache.num_layers == 2 and cache.num_gist_tokens == K and cache.batch_size == 2
    for t in (*cache.keys, *cache.values):
        assert t.shape == (2, 2, K, 16)
    assert (
        cache.nbytes
        == sum(t.numel() * t.element_size() for t in (*cache.keys, *cache.values))
        == 2 * 2 * 2 * 2 * K * 16 * 4
    )
    assert cache.next_pos.tolist() == [len(p) for p in prompts]
    # the gist keys are torchtune's own cached keys (after RoPE) at the original positions
    for row, prompt in enumerate(prompts):
        ref = copy.deepcopy(model)
        ref.setup_caches(batch_size=1, dtype=torch.float32, decoder_max_seq_len=len(prompt))
        x = torch.tensor([prompt])
        with torch.no_grad():
            ref(x, mask=make_gist_mask(x, IDS), input_pos=torch.arange(len(prompt))[None])
        for layer, attn in enumerate(a.attn for a in ref.layers):
            torch.testing.assert_close(cache.keys[layer][row], attn.kv_cache.k_cache[0, :, -K:], atol=1e-5, rtol=0)
            torch.testing.assert_close(cache.values[layer][row], attn.kv_cache.v_cache[0, :, -K:], atol=1e-5, rtol=0)


def test_save_load_round_trip_and_compatibility_checks(model, tmp_path):
    prompt, cont = _example(11, 3, 4)
    cache = compress(model, [prompt], gist_token_ids=IDS, model_id="tiny-seed0")
    path = cache.save(tmp_path / "c" / "cache.safetensors")
    loaded = GistCache.load(path)
    assert loaded.gist_token_ids == IDS and loaded.fingerprint == cache.fingerprint
    assert all(torch.equal(a, b) for a, b in zip(loaded.keys + loaded.values, cache.keys + cache.values))
    assert torch.equal(loaded.next_pos, cache.next_pos)
    loaded.check_compatible(model, gist_token_ids=IDS, model_id="tiny-seed0")
    first = generate_from_cache(model, cache, [cont], max_new_tokens=5, return_logits=True)
    again = generate_from_cache(model, loaded, [cont], max_new_tokens=5, return_logits=True)
    assert first.tokens == again.tokens and torch.equal(first.logits[0], again.logits[0])

    with pytest.raises(ValueError, match="different weights"):
        loaded.check_compatible(_tiny(seed=1), gist_token_ids=IDS)
    with pytest.raises(ValueError, match="K=3 gist tokens .* but K=2"):
        loaded.check_compatible(model, gist_token_ids=default_gist_token_ids(TINY_VOCAB_SIZE, 2))
    with pytest.raises(ValueError, match="not 'other'"):
        loaded.check_compatible(model, model_id="other")
    deeper = _tiny(num_layers=3)
    with pytest.raises(ValueError, match="num_layers"):
        loaded.check_compatible(deeper, gist_token_ids=IDS)
    with pytest.raises(ValueError, match="num_layers"):
        generate_from_cache(deeper, loaded, [cont], max_new_tokens=2)

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a gist cache"):
        GistCache.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError):
        GistCache.load(tmp_path / "missing.safetensors")


def test_unreadable_cache_files_and_a_missing_cuda_are_clear_errors(model, tmp_path, monkeypatch):
    path = compress(model, [_example(5, 1, 6)[0]], gist_token_ids=IDS).save(tmp_path / "cache.safetensors")
    data = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.txt").write_text("not a cache\n")
    (tmp_path / "empty.bin").write_bytes(b"")
    for name in ("truncated.safetensors", "text.txt", "empty.bin"):
        with pytest.raises(ValueError, match=f"{tmp_path / name} is not a readable safetensors file"):
            GistCache.load(tmp_path / name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda': CUDA is not available"):
        GistCache.load(path, device="cuda")


def test_a_cache_from_another_dtype_names_the_dtypes(model):
    cache = compress(model, [_example(5, 1, 7)[0]], gist_token_ids=IDS)
    with pytest.raises(ValueError, match="made by a model in torch.float32, but this model runs in torch.bfloat16"):
        cache.check_compatible(copy.deepcopy(model).to(torch.bfloat16))
    with pytest.raises(ValueError, match="different weights"):
        cache.check_compatible(_tiny(seed=1))


def test_a_cache_built_without_a_fingerprint(model):
    """Generation checks only its shapes (naming what they hold); check_compatible says it cannot check the weights."""
    prompt, cont = _example(7, 2, 8)
    cache = compress(model, [prompt], gist_token_ids=IDS)
    bare = GistCache(cache.keys, cache.values, cache.next_pos, IDS)
    out, expected = (generate_from_cache(model, c, [cont], max_new_tokens=3) for c in (bare, cache))
    assert out.tokens == expected.tokens
    with pytest.raises(
        ValueError,
        match=r"with \{'num_layers': 2, 'num_kv_heads': 2, 'head_dim': 16\}, but this model has "
        r"\{'num_layers': 3, 'num_kv_heads': 2, 'head_dim': 16\}",
    ):
        generate_from_cache(_tiny(num_layers=3), bare, [cont], max_new_tokens=2)
    with pytest.raises(ValueError, match="no fingerprint of the model that made it"):
        bare.check_compatible(model)


def test_select_takes_row_indices_or_a_boolean_mask(model):
    cache = compress(model, [[1] + IDS, [2, 3] + IDS, [4, 5, 6] + IDS], gist_token_ids=IDS)
    by_index = cache.select([0, 2])
    for mask in ([True, False, True], torch.tensor([True, False, True])):
        chosen = cache.select(mask)
        assert chosen.next_pos.tolist() == [1 + K, 3 + K]
        assert all(torch.equal(a, b) for a, b in zip(chosen.keys + chosen.values, by_index.keys + by_index.values))
    assert cache.select(torch.tensor([2, 0, 2])).next_pos.tolist() == [3 + K, 1 + K, 3 + K]
    with pytest.raises(ValueError, match=r"a boolean row mask must have shape \[3\], got \(2,\)"):
        cache.select([True, False])
    for rows in ([False, False, False], [], [0.0, 1.0], [3]):
        with pytest.raises(ValueError, match="rows must be"):
            cache.select(rows)


def test_model_gist_ids_are_the_default(model):
    gist_model = copy.deepcopy(model)
    gist_model.tok_embeddings.gist_token_ids = IDS
    prompt, cont = _example(6, 2, 5)
    cache = compress(gist_model, [prompt])
    assert cache.gist_token_ids == IDS
    cache.check_compatible(gist_model)
    with pytest.raises(ValueError, match="differ from the model's gist ids"):
        compress(gist_model, [prompt[:-K] + IDS[1:]], gist_token_ids=IDS[1:])
    with pytest.raises(ValueError, match="gist_token_ids is required"):
        compress(model, [prompt])


@pytest.mark.parametrize(
    "prompts, conts, match",
    [
        ([[1, 2, 3]], [[4]], "has no gist span"),
        ([[1, IDS[0], 2] + IDS], [[4]], "contiguous and at the end"),
        ([[1] + IDS + [2]], [[4]], "contiguous and at the end"),
        ([[1, 2] + IDS, [1] + IDS[1:]], [[4], [5]], r"prompts\[1\] ends with 2 gist tokens but K=3"),
        ([[1] + IDS[::-1]], [[4]], "expected exactly"),
        ([[1] + IDS], [[]], r"continuations\[0\] is empty"),
        ([[1] + IDS], [[4, IDS[0]]], r"continuations\[0\] holds gist token ids"),
        ([[1] + IDS], [[4], [5]], "1 prompts but 2 continuations"),
        ([[1, 9999] + IDS], [[4]], "outside the model's vocabulary"),
        ([[1] + IDS], "text", "must be a list of token-id lists"),
    ],
)
def test_bad_inputs_are_refused_clearly(model, prompts, conts, match):
    with pytest.raises((ValueError, TypeError), match=match):
        generate(model, prompts, conts, mode="gist", gist_token_ids=IDS, max_new_tokens=2)


def test_bad_cache_uses_are_refused_clearly(model):
    cache = compress(model, [[1, 2] + IDS, [3] + IDS], gist_token_ids=IDS)
    with pytest.raises(ValueError, match="3 continuations for a gist cache of 2 rows"):
        generate_from_cache(model, cache, [[1], [2], [3]], max_new_tokens=2)
    other_k = compress(model, [[1] + IDS[1:]], gist_token_ids=IDS[1:])
    with pytest.raises(ValueError, match="cannot mix gist spans"):
        GistCache.cat([cache, other_k])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_from_cache(model, cache, [[1], [2]], max_new_tokens=0)
    for temperature in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            generate_from_cache(model, cache, [[1], [2]], max_new_tokens=2, temperature=temperature)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate_from_cache(model, cache, [[1], [2]], max_new_tokens=TINY_LLAMA3_1_ARGS["max_seq_len"])
    with pytest.raises(ValueError, match="rows must be"):
        cache.select([2])
    with pytest.raises(ValueError, match="unknown mode"):
        generate(model, [[1] + IDS], [[2]], mode="gisted", gist_token_ids=IDS, max_new_tokens=2)
    with pytest.raises(TypeError, match="expected a torchtune TransformerDecoder, got Linear"):
        compress(nn.Linear(2, 2), [[1] + IDS], gist_token_ids=IDS)


def test_one_cache_reused_for_many_continuations(model):
    prompt, _ = _example(8, 1, 6)
    conts = [_example(0, n, 10 + n)[1] for n in (1, 3, 5)]
    cache = compress(model, [prompt], gist_token_ids=IDS)
    shared = generate_from_cache(model, cache, conts, max_new_tokens=4, return_logits=True)
    repeated = generate_from_cache(model, cache.repeat(3), conts, max_new_tokens=4, return_logits=True)
    assert shared.tokens == repeated.tokens
    for i, cont in enumerate(conts):
        tokens, logits = reference_greedy(model, prompt + cont, 4)
        assert shared.tokens[i] == tokens
        torch.testing.assert_close(shared.logits[i], logits, atol=ATOL, rtol=0)
    two = GistCache.cat([cache, compress(model, [_example(3, 1, 9)[0]], gist_token_ids=IDS)])
    assert torch.equal(two.select([0]).keys[0], cache.keys[0]) and two.select([1, 1]).next_pos.tolist() == [3 + K] * 2


def test_gist_ids_are_never_generated(model):
    biased = copy.deepcopy(model)
    head = nn.Linear(64, TINY_VOCAB_SIZE, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.output.weight)
        head.bias.zero_()
        head.bias[IDS[1]] = 1e4
    biased.output = head
    prompt, cont = _example(5, 2, 8)
    cache = compress(biased, [prompt], gist_token_ids=IDS)
    unsuppressed = generate_from_cache(biased, cache, [cont], max_new_tokens=4, suppress_token_ids=())
    assert unsuppressed.tokens[0] == [IDS[1]] * 4  # the bias works...
    for out in (
        generate_from_cache(biased, cache, [cont], max_new_tokens=4),
        generate_from_cache(
            biased, cache, [cont], max_new_tokens=4, temperature=1.0, rng=torch.Generator().manual_seed(0)
        ),
        generate(biased, [prompt], [cont], mode="pos_control", gist_token_ids=IDS, max_new_tokens=4),
    ):
        assert len(out.tokens[0]) == 4 and not set(out.tokens[0]) & set(IDS)  # ...and is overruled


def test_attention_swap_is_restored(model):
    originals = [layer.attn for layer in model.layers]
    prompt, cont = _example(4, 2, 1)
    generate(model, [prompt], [cont], mode="gist", gist_token_ids=IDS, max_new_tokens=2)
    assert [layer.attn for layer in model.layers] == originals
    store = KVStore.empty(model, 1, 8, dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(KeyError):
        with store_attention(model, store):
            assert all(layer.attn is not a for layer, a in zip(model.layers, originals))
            with pytest.raises(RuntimeError, match="already generating"):
                with store_attention(model, store):
                    pass
            raise KeyError("boom")
    assert all(layer.attn is a for layer, a in zip(model.layers, originals))


def test_compression_holds_one_layer_of_prompt_entries_at_a_time(model, monkeypatch):
    stores: List[int] = []
    init = KVStore.__init__

    def recording(self, keys, values):
        stores.append(len(keys))
        init(self, keys, values)

    monkeypatch.setattr(KVStore, "__init__", recording)
    cache = compress(model, [_example(40, 1, 3)[0], _example(9, 1, 4)[0]], gist_token_ids=IDS)
    assert stores == [1] * len(model.layers)  # a store per layer, each of one layer (not one of every layer)
    assert cache.num_layers == len(model.layers)


def test_long_inputs_attend_in_chunks(model, monkeypatch):
    queries: List[int] = []
    attend = grouped_query_attention

    def recording(q, k, v, mask):
        queries.append(mask.shape[1])
        return attend(q, k, v, mask)

    monkeypatch.setattr("torchtune_gist.generation._attention.grouped_query_attention", recording)
    prompt, cont = _example(30, 9, 5)  # 33 prompt tokens, 9 continuation tokens
    compress(model, [prompt], gist_token_ids=IDS, chunk_size=8)
    assert queries == [8, 8, 8, 8, 1] * len(model.layers)
    queries.clear()
    generate(model, [prompt], [cont], mode="pos_control", gist_token_ids=IDS, max_new_tokens=2, chunk_size=16)
    assert queries == [16] * 2 * len(model.layers) + [10] * len(model.layers) + [1] * len(model.layers)


@pytest.mark.parametrize("chunk_size", [0, -4, 2.5, True, "512"])
def test_a_bad_chunk_size_is_refused(model, chunk_size):
    prompt, cont = _example(4, 2, 1)
    with pytest.raises(ValueError, match="chunk_size must be a whole number >= 1"):
        compress(model, [prompt], gist_token_ids=IDS, chunk_size=chunk_size)
    with pytest.raises(ValueError, match="chunk_size must be a whole number >= 1"):
        generate(
            model, [prompt], [cont], mode="pos_control", gist_token_ids=IDS, max_new_tokens=2, chunk_size=chunk_size
        )


def test_a_larger_allocated_store_changes_nothing(model):
    prompt, cont = _example(10, 3, 2)
    cache = compress(model, [prompt], gist_token_ids=IDS)
    exact = generate_from_cache(model, cache, [cont], max_new_tokens=5, return_logits=True)
    store = KVStore.empty(model, 1, exact.kv_slots + 1000, dtype=torch.float32, device=torch.device("cpu"))
    store.append(cache.keys, cache.values)
    big = _decode(
        model,
        store,
        [cont],
        cache.next_pos.tolist(),
        max_new_tokens=5,
        temperature=0.0,
        top_k=None,
        stop_tokens=None,
        suppress_token_ids=IDS,
        pad_id=0,
        rng=None,
        return_logits=True,
        chunk_size=512,
    )
    assert big.tokens == exact.tokens and big.kv_slots == exact.kv_slots + 1000
    torch.testing.assert_close(big.logits[0], exact.logits[0], atol=1e-6, rtol=0)


def test_grouped_query_attention_matches_expanded_heads():
    q, k, v = torch.randn(2, 8, 3, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    mask = torch.rand(2, 3, 5) > 0.3
    mask[..., 0] = True
    expanded = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1), attn_mask=mask[:, None]
    )
    torch.testing.assert_close(grouped_query_attention(q, k, v, mask), expanded, atol=1e-6, rtol=0)


def test_grouped_query_attention_takes_the_cuda_efficient_kernels_layout(monkeypatch):
    """CUDA's memory-efficient SDPA kernel (what a bool mask gets) returns ``[b, h, m, d]`` with ``[b, m, h, d]``
    strides; folding the query groups back must not assume a contiguous result."""
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def transposed_layout(*args, **kwargs):
        return sdpa(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)

    q, k, v = torch.randn(2, 8, 3, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    mask = torch.rand(2, 3, 5) > 0.3
    mask[..., 0] = True
    want = grouped_query_attention(q, k, v, mask)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", transposed_layout)
    torch.testing.assert_close(grouped_query_attention(q, k, v, mask), want, atol=0, rtol=0)


def test_cached_attention_keeps_cudnn_sdpa_out(model, monkeypatch):
    """cuDNN's SDPA builds a plan for every new key length, i.e. at every decoding step of a growing cache (about
    50 ms a step on an H200): every attention call of compression and generation must run with it disabled."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    cudnn_enabled: List[bool] = []

    def recording(*args, **kwargs):
        cudnn_enabled.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    prompt, cont = _example(6, 2, 3)
    generate_from_cache(model, compress(model, [prompt], gist_token_ids=IDS), [cont], max_new_tokens=3)
    assert cudnn_enabled and not any(cudnn_enabled)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored afterwards


def test_stop_tokens_and_sampling(model):
    examples = [_example(6, 2, 3), _example(9, 4, 4)]
    prompts, conts = [p for p, _ in examples], [c for _, c in examples]
    cache = compress(model, prompts, gist_token_ids=IDS)
    greedy = generate_from_cache(model, cache, conts, max_new_tokens=6)
    stop = greedy.tokens[0][2]
    assert stop not in greedy.tokens[1] and stop not in greedy.tokens[0][:2]
    stopped = generate_from_cache(model, cache, conts, max_new_tokens=6, stop_tokens=[stop])
    assert stopped.tokens == [greedy.tokens[0][:3], greedy.tokens[1]]
    forwards = []
    hook = model.tok_embeddings.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        alone = generate_from_cache(model, cache.select([0]), conts[:1], max_new_tokens=6, stop_tokens=[stop])
    finally:
        hook.remove()
    assert alone.tokens == [greedy.tokens[0][:3]] and len(forwards) == 3  # the continuation and 2 steps, no more
    top1 = generate_from_cache(
        model, cache, conts, max_new_tokens=6, temperature=0.8, top_k=1, rng=torch.Generator().manual_seed(1)
    )
    assert top1.tokens == greedy.tokens
    runs = [
        generate_from_cache(
            model, cache, conts, max_new_tokens=6, temperature=1.0, rng=torch.Generator().manual_seed(5)
        ).tokens
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_finished_rows_leave_the_decoding_batch(model):
    examples = [_example(6 + i, 2 + i, 20 + i) for i in range(8)]
    prompts, conts = [p for p, _ in examples], [c for _, c in examples]
    cache = compress(model, prompts, gist_token_ids=IDS)
    greedy = generate_from_cache(model, cache, conts, max_new_tokens=8, return_logits=True)
    # Row 0 stops at its 2nd token and would emit a stop token again at its 3rd (its length must stay 2);
    # rows 1 and 2 stop at their 5th, and then three of eight rows have finished.
    stops = greedy.tokens[0][1:3] + [greedy.tokens[1][4], greedy.tokens[2][4]]
    batch_sizes: List[int] = []
    hook = model.layers[0].register_forward_pre_hook(lambda _, args: batch_sizes.append(args[0].shape[0]))
    try:
        stopped = generate_from_cache(model, cache, conts, max_new_tokens=8, stop_tokens=stops, return_logits=True)
    finally:
        hook.remove()
    assert len(stopped.tokens[0]) == 2
    for row, full, logits, full_logits in zip(stopped.tokens, greedy.tokens, stopped.logits, greedy.logits):
        n = min([full.index(t) + 1 for t in stops if t in full], default=len(full))
        assert row == full[:n]
        torch.testing.assert_close(logits, full_logits[:n], atol=ATOL, rtol=0)
    assert batch_sizes[0] == 8 and batch_sizes[-1] < 8  # the stopped rows were dropped, not decoded on
    assert stopped.kv_bytes == greedy.kv_bytes


def _tiny_qlora() -> nn.Module:
    """NF4 base weights with LoRA on every attention projection, as the 8B QLoRA configs build them (seed 0)."""
    torch.manual_seed(0)
    return lora_llama3_1(
        lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
        lora_rank=4,
        lora_alpha=8,
        quantize_base=True,
        **{**TINY_LLAMA3_1_ARGS, "embed_dim": 256, "intermediate_dim": 512},
    ).eval()


def test_lora_and_nf4_layers_are_used_as_they_are():
    lora = _tiny_qlora()
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.5)
    prompt, cont = _example(7, 3, 11)
    out = generate(lora, [prompt], [cont], mode="gist", gist_token_ids=IDS, max_new_tokens=4, return_logits=True)
    tokens, logits = reference_greedy(lora, prompt + cont, 4)
    assert out.tokens[0] == tokens
    torch.testing.assert_close(out.logits[0], logits, atol=ATOL, rtol=0)
    cache = compress(lora, [prompt], gist_token_ids=IDS)
    with torch.no_grad():
        lora.layers[-1].attn.k_proj.lora_b.weight.add_(0.1)
    with pytest.raises(ValueError, match="different weights"):
        cache.check_compatible(lora, gist_token_ids=IDS)


@pytest.mark.slow
def test_compiled_decoding_matches_eager_and_is_traced_once(model):
    """``compile=True`` runs each decoding step through torch.compile: the same tokens and logits as eager decoding,
    and the step's shapes do not change with the cache's length, so all its steps, and a second generation of the
    same sizes, reuse one traced graph. Also with stop tokens (a row leaves the batch) and on NF4 weights with LoRA."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    for mode, seed in (("gist", 21), ("pos_control", 22)):
        prompts, conts = zip(*(_example(7 + i, 2 + i, seed + i) for i in range(2)))
        kwargs = dict(mode=mode, gist_token_ids=IDS, max_new_tokens=7, return_logits=True)
        eager = generate(model, list(prompts), list(conts), **kwargs)
        compiled = generate(model, list(prompts), list(conts), compile=True, **kwargs)
        assert compiled.tokens == eager.tokens
        for a, b in zip(compiled.logits, eager.logits):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    traced = counters["stats"]["unique_graphs"]
    assert 1 <= traced <= 2  # one step graph, at most one more once the store's size is marked dynamic
    prompts, conts = zip(*(_example(7 + i, 2 + i, 40 + i) for i in range(2)))
    kwargs = dict(mode="gist", gist_token_ids=IDS, max_new_tokens=7)
    eager = generate(model, list(prompts), list(conts), **kwargs)
    assert generate(model, list(prompts), list(conts), compile=True, **kwargs).tokens == eager.tokens
    assert counters["stats"]["unique_graphs"] == traced
    stop = [t for t in eager.tokens[0][1:] if t not in eager.tokens[1]][:1]  # row 0 stops, then leaves the batch
    assert stop
    stopped = generate(model, list(prompts), list(conts), stop_tokens=stop, **kwargs)
    assert generate(model, list(prompts), list(conts), stop_tokens=stop, compile=True, **kwargs) == stopped
    assert len(stopped.tokens[0]) < 7 == len(stopped.tokens[1])
    qlora = _tiny_qlora()
    kwargs = dict(mode="gist", gist_token_ids=IDS, max_new_tokens=5, return_logits=True)
    eager = generate(qlora, [prompts[0]], [conts[0]], **kwargs)
    compiled = generate(qlora, [prompts[0]], [conts[0]], compile=True, **kwargs)
    assert compiled.tokens == eager.tokens
    torch.testing.assert_close(compiled.logits[0], eager.logits[0], atol=ATOL, rtol=0)


REPO = Path(__file__).resolve().parents[1]


def _tiny_gist_model(assets: Path, adapter: Optional[Path] = None) -> nn.Module:
    """The model of configs/tiny/gist_generate.yaml: base weights from ``assets``, gist adapter from ``adapter``."""
    model = lora_gist_llama3_1_tiny(
        lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"], lora_rank=16, lora_alpha=32, num_gist_tokens=4
    )
    model.load_state_dict(load_file(str(assets / "model.safetensors")), strict=False)
    if adapter is not None:
        load_gist_adapter(model, adapter)
    return model.eval()


def _trained_tiny_adapter(tmp_path: Path) -> Tuple[Path, torch.nn.Module]:
    """Tiny assets under ``tmp_path / "assets"`` and a model with random (non-zero) LoRA and gist rows, saved as a
    gist adapter in ``tmp_path / "adapter"``."""
    assets = tmp_path / "assets"
    write_tiny_tokenizer(assets)
    write_tiny_base_checkpoint(assets)
    trained = _tiny_gist_model(assets)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_b" in name or "gist_embeddings" in name:
                p.normal_(0, 0.3)
    save_gist_adapter(trained, tmp_path / "adapter", base_model="tiny")
    return assets, trained


@pytest.mark.slow
def test_gist_generate_recipe_runs_by_name(tmp_path, tiny_tokenizer):
    assets, trained = _trained_tiny_adapter(tmp_path)
    cache_path = tmp_path / "cache.safetensors"
    prompt, question = "The sky is blue. The pass key is 4242. Remember it.", "What is the pass key?"

    def tune_run(*overrides: str) -> Tuple[str, str]:
        """Run the recipe by name; return its stdout (the generated text) and its log (stderr)."""
        cmd = [
            str(Path(sys.executable).parent / "tune"),
            "run",
            "gist_generate",
            "--config",
            str(REPO / "configs/tiny/gist_generate.yaml"),
            f"assets_dir={assets}",
            f"output_dir={tmp_path / 'out'}",
            f"gist_checkpoint_dir={tmp_path / 'adapter'}",
            f"input={question}",
            "max_new_tokens=6",
            *overrides,
        ]
        done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout, done.stderr

    text, log = tune_run(f"prompt={prompt}", f"save_cache={cache_path}")
    model = _tiny_gist_model(assets, tmp_path / "adapter")
    encoded = GistPasskeyTransform(tiny_tokenizer, num_gist_tokens=4).encode_prompt(prompt, question)
    n_prompt, cont = encoded["gist_start"], encoded["tokens"][encoded["gist_start"] + 4 :]
    assert encoded["tokens"][0] == tiny_tokenizer.bos_id
    assert (
        f"Compression: {n_prompt - 1} prompt tokens (BOS aside) -> K=4 gist tokens ({(n_prompt - 1) / 4:.1f}x)" in log
    )

    # the saved cache is what compress() gives on the same model, and the text is what generate_from_cache gives
    ids = encoded["tokens"][n_prompt : n_prompt + 4]
    expected = compress(model, [encoded["tokens"][: n_prompt + 4]], gist_token_ids=ids)
    saved = GistCache.load(cache_path)
    saved.check_compatible(model)
    for a, b in zip(saved.keys + saved.values, expected.keys + expected.values):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    out = generate_from_cache(model, expected, [cont], max_new_tokens=6, stop_tokens=tiny_tokenizer.stop_tokens)
    stops = set(tiny_tokenizer.stop_tokens)
    assert text == tiny_tokenizer.decode([t for t in out.tokens[0] if t not in stops]) + "\n"
    slots = 4 + len(cont) + len(out.tokens[0]) - 1  # the gists, the question, the new tokens but the last
    assert (
        f"with the gist cache ({slots} slots)" in log and f"with the full prompt ({slots - 4 + n_prompt} slots)" in log
    )

    # reusing the saved cache (no prompt) reports the same compression and gives the same text
    text_again, log_again = tune_run(f"load_cache={cache_path}", "prompt=null")
    assert text_again == text
    assert f"Compression: {n_prompt - 1} prompt tokens" in log_again and "Compressed" not in log_again


def _gist_generate_error(monkeypatch, capsys, *overrides: str) -> str:
    """What ``tune run gist_generate`` on the tiny config with ``overrides`` prints as it stops with exit status 1."""
    import gist_generate

    config = str(REPO / "configs/tiny/gist_generate.yaml")
    monkeypatch.setattr(sys, "argv", ["gist_generate", "--config", config, *overrides])
    with pytest.raises(SystemExit) as stop:
        gist_generate.recipe_main()
    assert stop.value.code == 1
    return capsys.readouterr().err


def test_gist_generate_refuses_a_prompt_cut_at_a_yaml_comment(monkeypatch, capsys):
    """``prompt="a # b"`` reaches the recipe as ``a``: refused before anything loads, with the two ways out."""
    import gist_generate
    from omegaconf import OmegaConf

    assert (
        "prompt='Keep 12 # not a comment' was read as 'Keep 12': YAML takes ' #' and what follows for a comment"
        in _gist_generate_error(monkeypatch, capsys, "prompt=Keep 12 # not a comment")
    )
    for argv, cfg in (
        (['prompt="a # b"'], {"prompt": "a # b"}),  # quoted for YAML: read whole
        (["prompt=a#b"], {"prompt": "a#b"}),  # no space before '#': no comment
        (["input=x # y"], {"input": "x # y", "prompt": "p"}),  # set otherwise, e.g. by an interpolation
    ):
        gist_generate.check_no_comment_cut(argv, OmegaConf.create(cfg))
    with pytest.raises(ValueError, match="input='x # y' was read as 'x'"):
        gist_generate.check_no_comment_cut(["input=x # y"], OmegaConf.create({"input": "x"}))


def test_gist_generate_refuses_two_sources_of_one_text(monkeypatch, capsys):
    """``input=`` beside ``inputs_file=`` would answer the file and drop ``input`` silently: refused, naming both."""
    import gist_generate

    assert "input= and inputs_file= on one command line: inputs_file would be used and input ignored" in (
        _gist_generate_error(monkeypatch, capsys, "input=What is it?", "inputs_file=questions.txt")
    )
    with pytest.raises(ValueError, match="prompt= and prompt_file= on one command line: prompt_file would be used"):
        gist_generate.check_one_source_per_text(["prompt_file=p.txt", "prompt=x"])
    gist_generate.check_one_source_per_text(["prompt=x", "inputs_file=q.txt", "input_file_note=1"])


def _generate_recipe(assets: Path, tmp_path: Path, settings: dict, dotlist: Sequence[str] = ()):
    """``GistGenerateRecipe`` on configs/tiny/gist_generate.yaml, in this process, with ``settings`` merged in
    (and ``dotlist`` read as the command line would be)."""
    from gist_generate import GistGenerateRecipe  # the recipes are installed as top-level modules
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(
        OmegaConf.load(REPO / "configs/tiny/gist_generate.yaml"),
        {"assets_dir": str(assets), "output_dir": str(tmp_path / "out"), "max_new_tokens": 4, **settings},
        OmegaConf.from_dotlist(list(dotlist)),
    )
    return GistGenerateRecipe(cfg), cfg


def test_gist_generate_reads_prompt_and_input_files_and_refuses_yaml_parsed_text(tmp_path, capsys):
    assets = tmp_path / "assets"
    write_tiny_tokenizer(assets)
    write_tiny_base_checkpoint(assets)
    prompt = "Line one.\nNote: the pass key is 12345 # not a comment\n  indented"
    question = "What is the pass key?\n"
    (tmp_path / "prompt.txt").write_text(prompt + "\n", encoding="utf-8")
    (tmp_path / "input.txt").write_text(question + "\n", encoding="utf-8")
    texts = []
    for settings in (
        {"prompt": prompt, "input": question},
        {
            "prompt_file": str(tmp_path / "prompt.txt"),
            "input_file": str(tmp_path / "input.txt"),
        },  # files replace the config's texts
    ):
        recipe, cfg = _generate_recipe(assets, tmp_path, settings)
        assert (recipe._prompt, recipe._inputs) == (prompt, [question])
        recipe.setup(cfg)
        texts.append(recipe.generate(cfg))
    assert texts[0] == texts[1]

    with pytest.raises(FileNotFoundError, match="prompt_file=.*missing.txt: no such file"):
        _generate_recipe(assets, tmp_path, {"prompt_file": str(tmp_path / "missing.txt")})
    with pytest.raises(ValueError, match="prompt was read as int 12345, not text.*prompt_file=PATH"):
        _generate_recipe(assets, tmp_path, {}, ["prompt=12345"])
    with pytest.raises(ValueError, match="input was read as DictConfig .*Note.*input_file=PATH"):
        _generate_recipe(assets, tmp_path, {}, ["input=Note: x"])


def test_gist_generate_answers_every_line_of_inputs_file_from_one_compression(tmp_path, monkeypatch, capsys):
    """inputs_file: the prompt is compressed once; each answer, batched with padding, equals the one a run with that
    input alone gives."""
    import gist_generate

    assets = tmp_path / "assets"
    write_tiny_tokenizer(assets)
    write_tiny_base_checkpoint(assets)
    questions = ["What is the pass key?", "", "Say the pass key, digit by digit, please.", "Key?"]
    (tmp_path / "inputs.txt").write_text("\n".join(questions) + "\n", encoding="utf-8")
    calls, printed_before_batch, answer = [], [], gist_generate.generate_from_cache

    def answering(*args, **kwargs):
        printed_before_batch.append(capsys.readouterr().out.count("/3] "))
        return answer(*args, **kwargs)

    monkeypatch.setattr(gist_generate, "compress", lambda *a, **k: calls.append(1) or compress(*a, **k))
    monkeypatch.setattr(gist_generate, "generate_from_cache", answering)
    recipe, cfg = _generate_recipe(assets, tmp_path, {"inputs_file": str(tmp_path / "inputs.txt"), "batch_size": 2})
    recipe.setup(cfg)
    texts = recipe.generate(cfg)
    assert len(calls) == 1 and recipe._inputs == [q for q in questions if q]
    assert printed_before_batch == [0, 2]  # the first batch's answers are out before the second batch runs
    monkeypatch.undo()
    alone = []
    for question in recipe._inputs:
        single, single_cfg = _generate_recipe(assets, tmp_path, {"input": question})
        single.setup(single_cfg)
        alone += single.generate(single_cfg)
    assert texts == alone
    assert "[3/3] Key?" in capsys.readouterr().out
    (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="inputs_file=.*blank.txt holds no input"):
        _generate_recipe(assets, tmp_path, {"inputs_file": str(tmp_path / "blank.txt")})
    with pytest.raises(ValueError, match="batch_size=0 must be a whole number >= 1"):
        _generate_recipe(assets, tmp_path, {"batch_size": 0})


def test_gist_generate_compile_sends_each_decoding_step_through_torch_compile(tmp_path, monkeypatch):
    """``compile=True`` reaches generation: the step function goes to torch.compile (recorded here and run eagerly;
    the compiled step itself is tested above), and the answer is the same."""
    from torchtune_gist.generation._attention import decode_step_logits

    assets = tmp_path / "assets"
    write_tiny_tokenizer(assets)
    write_tiny_base_checkpoint(assets)
    recipe, cfg = _generate_recipe(assets, tmp_path, {})
    recipe.setup(cfg)
    eager = recipe.generate(cfg)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append((fn, kwargs)) or fn)
    recipe, cfg = _generate_recipe(assets, tmp_path, {"compile": True})
    recipe.setup(cfg)
    assert recipe.generate(cfg) == eager
    assert compiled == [(decode_step_logits, {"fullgraph": True})]


def test_gist_generate_outputs_file_goes_on_where_an_interrupted_run_stopped(tmp_path, monkeypatch, caplog):
    """outputs_file: Ctrl-C in the second batch keeps the first batch's answers in PATH.partial; the same command again
    computes only the rest and writes what an uninterrupted run writes; another prompt starts over."""
    import gist_generate

    assets = tmp_path / "assets"
    write_tiny_tokenizer(assets)
    write_tiny_base_checkpoint(assets)
    questions = ["What is the pass key?", "Key?", "Say the pass key.", "The key, please.", "Pass key?"]
    (tmp_path / "inputs.txt").write_text("\n".join(questions) + "\n", encoding="utf-8")
    answer, computed = gist_generate.generate_from_cache, []

    def run(out: Path, interrupt_at: Optional[int] = None, **settings) -> None:
        def answering(model, cache, rows, **kwargs):
            if len(computed) == interrupt_at:
                raise KeyboardInterrupt
            computed.append(len(rows))
            return answer(model, cache, rows, **kwargs)

        monkeypatch.setattr(gist_generate, "generate_from_cache", answering)
        computed.clear()
        recipe, cfg = _generate_recipe(
            assets,
            tmp_path,
            {"inputs_file": str(tmp_path / "inputs.txt"), "batch_size": 2, "outputs_file": str(out), **settings},
        )
        recipe.setup(cfg)
        recipe.generate(cfg)

    def lines(path: Path) -> List[dict]:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]

    whole = tmp_path / "whole.jsonl"
    run(whole)
    expected = lines(whole)
    assert [e["input"] for e in expected] == questions and all(e["kv_bytes"] > 0 for e in expected)
    assert not gist_generate.partial_path(str(whole)).exists()

    out = tmp_path / "answers" / "resumed.jsonl"
    partial = gist_generate.partial_path(str(out))
    with pytest.raises(KeyboardInterrupt):
        run(out, interrupt_at=1)
    assert not out.exists() and len(lines(partial)) == 1 + 2  # the settings, then the first batch's answers
    with open(partial, "a", encoding="utf-8") as f:
        f.write('{"key": "a line cut short by a ki')
    run(out)
    assert computed == [2, 1] and lines(out) == expected and not partial.exists()

    with pytest.raises(KeyboardInterrupt):
        run(out, interrupt_at=1)
    with caplog.at_level(logging.WARNING):
        run(out, prompt="Another prompt. The pass key is 1111.")
    assert computed == [2, 2, 1] and "prompt_sha256" in caplog.text
    with pytest.raises(ValueError, match="outputs_file: .* is a directory, not a file"):
        _generate_recipe(assets, tmp_path, {"outputs_file": str(tmp_path)})


def test_gist_generate_refuses_a_cache_compressed_in_another_prompt_layout(tmp_path):
    """A cache saved with the passkey layout, loaded with the instruction layout: the input would follow the gists
    in a layout the prompt was not compressed for."""
    assets = tmp_path / "assets"
    write_tiny_tokenizer(assets)
    write_tiny_base_checkpoint(assets)
    cache_path = tmp_path / "cache.safetensors"
    recipe, cfg = _generate_recipe(assets, tmp_path, {"save_cache": str(cache_path)})
    recipe.setup(cfg)
    recipe.generate(cfg)
    assert GistCache.load(cache_path).fingerprint["prompt_layout"] == {
        "_component_": "torchtune_gist.data.GistPasskeyTransform"
    }
    instruct = {"_component_": "torchtune_gist.data.GistInstructTransform", "num_gist_tokens": 4, "template": "plain"}
    recipe, cfg = _generate_recipe(assets, tmp_path, {"load_cache": str(cache_path), "prompt_transform": instruct})
    recipe.setup(cfg)
    with pytest.raises(
        ValueError, match="was compressed with prompt_transform .*GistPasskeyTransform.* this config lays"
    ):
        recipe.generate(cfg)


def test_gist_generate_refuses_a_prompt_transform_with_another_k(tmp_path):
    """With load_cache, a transform laying out another K would silently cut the continuation: setup refuses it."""
    assets = tmp_path / "assets"
    write_tiny_tokenizer(assets)
    write_tiny_base_checkpoint(assets)
    recipe, cfg = _generate_recipe(assets, tmp_path, {}, ["prompt_transform.num_gist_tokens=2"])
    with pytest.raises(ValueError, match=r"prompt_transform lays out 2 gist tokens .* but the model has 4"):
        recipe.setup(cfg)


def test_gist_generate_answers_from_a_merged_export_as_from_its_adapter(tmp_path):
    """``gist_checkpoint_dir`` may be the ``hf_merged/`` export the training recipes write (lm-eval reads it too): it
    holds every weight, LoRA folded in, and answers as the adapter on the base does."""
    assets, trained = _trained_tiny_adapter(tmp_path)
    export_merged_hf(trained, tmp_path / "hf_merged", mask_mode="gist")
    settings = {"prompt": "The sky is blue. The pass key is 4242.", "input": "What is the pass key?"}
    answers = {}
    for name in ("adapter", "hf_merged"):
        recipe, cfg = _generate_recipe(assets, tmp_path, {**settings, "gist_checkpoint_dir": str(tmp_path / name)})
        recipe.setup(cfg)
        answers[name] = recipe.generate(cfg)
    assert answers["hf_merged"] == answers["adapter"] and answers["adapter"][0]
    recipe, cfg = _generate_recipe(assets, tmp_path, {**settings, "gist_checkpoint_dir": str(assets)})
    with pytest.raises(ValueError, match="gist_checkpoint_dir=.*assets' holds no gist rows: expected"):
        recipe.setup(cfg)
    recipe, cfg = _generate_recipe(assets, tmp_path, {**settings, "gist_checkpoint_dir": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match="gist_checkpoint_dir=.*nope' does not exist"):
        recipe.setup(cfg)


def test_gist_generate_refuses_a_merged_export_as_the_base(tmp_path):
    assets = tmp_path / "assets"
    write_tiny_tokenizer(assets)
    write_tiny_base_checkpoint(assets)
    (assets / "gist_config.json").write_text("{}")  # what export_merged_hf writes beside the weights
    recipe, cfg = _generate_recipe(assets, tmp_path, {})
    with pytest.raises(ValueError, match="is a torchtune-gist merged export"):
        recipe.setup(cfg)


@pytest.mark.parametrize(
    "dotlist, message",
    [
        (["device=gpu"], "device='gpu' is not a device"),
        (["seed=abc"], "seed='abc' must be a whole number >= 0"),
        (["compile=maybe"], "compile='maybe': give True or False"),
        (["max_new_token=4"], r"gist_generate does not read max_new_token \(did you mean max_new_tokens\?\)"),
    ],
)
def test_gist_generate_names_a_bad_device_seed_or_key(tmp_path, dotlist, message):
    with pytest.raises(ValueError, match=message):
        _generate_recipe(tmp_path / "assets", tmp_path, {}, dotlist)


def test_gist_generate_names_what_a_training_config_lacks(tmp_path):
    from gist_generate import GistGenerateRecipe
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "configs/tiny/gist_lora_single_device.yaml")
    with pytest.raises(
        ValueError, match="the config has no prompt_transform, max_new_tokens, temperature, which gist_generate reads"
    ):
        GistGenerateRecipe(cfg)


def test_gist_generate_checks_component_settings_first(tmp_path):
    with pytest.raises(
        ValueError, match="prompt_transform: torchtune_gist.data.GistPasskeyTransform takes no num_gists"
    ):
        _generate_recipe(tmp_path / "assets", tmp_path, {}, ["prompt_transform.num_gists=2"])


def test_gist_generate_without_an_adapter_initialises_dora_from_the_base(tmp_path):
    """No gist_checkpoint_dir with a DoRA model: magnitude = the base's row norms, so the model is the base."""
    from torchtune.modules.peft import DoRALinear

    assets = tmp_path / "assets"
    write_tiny_tokenizer(assets)
    write_tiny_base_checkpoint(assets)
    recipe, cfg = _generate_recipe(assets, tmp_path, {"model": {"use_dora": True}})
    recipe.setup(cfg)
    base = load_file(str(assets / "model.safetensors"))
    dora = {n: m for n, m in recipe._model.named_modules() if isinstance(m, DoRALinear)}
    assert dora
    for name, m in dora.items():
        torch.testing.assert_close(m.magnitude, base[f"{name}.weight"].norm(dim=1))
