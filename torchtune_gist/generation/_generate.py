"""Generation from a gist cache, and the same generation under the evaluation's controls.

Every mode runs the same decoding loop over a :class:`KVStore` sized to exactly what the mode
holds, so tokens, logits and KV bytes compare apples to apples:

============  ==========================================================  ====================
mode          what the continuation and the new tokens attend to          KV slots per row
============  ==========================================================  ====================
gist          the K cached gist entries and themselves                    K + cont + new - 1
pos_control   the whole prompt, the gists and themselves (plain causal)   prompt + K + cont + new - 1
neg_control   themselves only (neither the prompt nor the gists)          cont + new - 1
truncate      the prompt's last K tokens (gists dropped) and themselves   K + cont + new - 1
============  ==========================================================  ====================

(the last new token is never fed back, hence ``- 1``). Positions: ``gist`` and ``neg_control``
continue at the original absolute positions ``len(prompt + gists) + i``, exactly as in training
under the gist and negative-control masks (RoPE being relative, the negative control's offset
changes nothing but rounding); ``pos_control`` uses positions ``0 ..`` over the full sequence;
``truncate`` is a fresh sequence ``prompt[-K:] + continuation`` at positions ``0 ..``, what a
reader with a K-token budget for the prompt would run (BOS, part of the prompt, is kept only when the
prompt fits in K: the gist cache holds no BOS entry either).

Gist ids are never emitted: their logits are set to ``-inf`` in :func:`_next_token` before
greedy choice or sampling (``suppress_token_ids``). The returned logits are the model's raw ones.
"""

import math
from dataclasses import dataclass
from typing import List, Literal, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torchtune.generation import sample
from torchtune.modules import TransformerDecoder

from torchtune_gist._checks import check_whole, is_whole
from torchtune_gist.generation._attention import (
    DEFAULT_CHUNK_SIZE,
    KVStore,
    decode_step_logits,
    last_logits,
    prefill,
    store_attention,
)
from torchtune_gist.generation._cache import GistCache, check_architecture, compress
from torchtune_gist.generation._inputs import (
    check_gist_suffix,
    check_max_position,
    check_pad_id,
    check_token_range,
    left_pad,
    model_device_dtype,
    resolve_gist_token_ids,
    token_rows,
)

GenerationMode = Literal["gist", "pos_control", "neg_control", "truncate"]
GENERATION_MODES: Tuple[str, ...] = ("gist", "pos_control", "neg_control", "truncate")

_Rows = Union[Sequence[Sequence[int]], torch.Tensor]


@dataclass
class GenerationOutput:
    """What a generation call returns.

    Args:
        tokens (List[List[int]]): per example, the new tokens, up to and including the first stop token.
        kv_bytes (int): bytes of keys/values held while generating (all layers, the whole batch).
        kv_slots (int): KV entries per layer and row that were held.
        row_kv_bytes (List[int]): per example, the bytes of its own entries (all layers): what its mode
            kept of the prompt, its continuation and its new tokens but the last, without a batch's padding.
        logits (Optional[List[torch.Tensor]]): per example, fp32 ``[len(tokens[i]), vocab]``: the
            model's raw next-token logits at each step (before gist suppression, temperature and
            top-k); only with ``return_logits=True``.
    """

    tokens: List[List[int]]
    kv_bytes: int
    kv_slots: int
    row_kv_bytes: List[int]
    logits: Optional[List[torch.Tensor]] = None


def _check_continuations(rows: List[List[int]], gist_token_ids: Sequence[int]) -> None:
    gist = set(gist_token_ids)
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(
                f"continuations[{i}] is empty: a continuation (at least one token, e.g. the input or the "
                "'Output:' cue) is needed; the first new token is predicted from its last token"
            )
        if gist.intersection(row):
            raise ValueError(
                f"continuations[{i}] holds gist token ids {sorted(gist.intersection(row))}: the gist span belongs at "
                "the end of the prompt, once (a second span is a layout the model never saw)"
            )


def _check_sampling(max_new_tokens: int, temperature: float, top_k: Optional[int]) -> None:
    check_whole("max_new_tokens", max_new_tokens)
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    check_whole("top_k", top_k, optional=True)


def _next_token(
    logits: torch.Tensor,
    suppress: torch.Tensor,
    temperature: float,
    top_k: Optional[int],
    rng: Optional[torch.Generator],
) -> torch.Tensor:
    """Pick the next token ``[b]`` from logits ``[b, vocab]``; ``suppress`` ids (the gists) get ``-inf``."""
    scores = logits.index_fill(-1, suppress, float("-inf"))
    if temperature == 0:
        return scores.argmax(-1)
    q = torch.empty_like(scores).exponential_(1, generator=rng)
    return sample(scores, temperature=temperature, top_k=top_k, q=q).squeeze(-1).long()


@torch.no_grad()
def _decode(
    model: TransformerDecoder,
    store: KVStore,
    rows: List[List[int]],
    start_pos: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: Optional[int],
    stop_tokens: Optional[Sequence[int]],
    suppress_token_ids: Sequence[int],
    pad_id: int,
    rng: Optional[torch.Generator],
    return_logits: bool,
    chunk_size: int,
    compile: bool = False,
) -> GenerationOutput:
    """Feed ``rows`` (row ``i`` at positions ``start_pos[i] + j``, ``chunk_size`` tokens per pass) after what ``store``
    holds, then decode, one step at a time through :func:`decode_step_logits` (compiled with ``compile``).

    Rows that emit a stop token leave the batch (and the store) once a quarter of the rows still
    decoding have finished, so a batch no longer runs every row until its longest answer ends.
    """
    device = store.valid.device
    b = len(rows)
    kv_bytes = store.nbytes
    slot_bytes = kv_bytes // (b * store.capacity)
    kept = store.valid.sum(-1).tolist()  # what the mode kept of each prompt
    tokens, input_pos, valid = left_pad(rows, start_pos, pad_id, device)
    next_pos = input_pos[:, -1] + 1
    stop = torch.tensor(sorted(set(stop_tokens or ())), dtype=torch.long, device=device)
    lengths = torch.full((b,), max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    active = torch.arange(b, device=device)  # the batch rows still decoding, in the store's row order
    step_logits = torch.compile(decode_step_logits, fullgraph=True) if compile else decode_step_logits
    steps: List[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = []
    with store_attention(model, store):
        logits = last_logits(model, prefill(model, store, tokens, input_pos, valid, chunk_size))
        suppress = torch.tensor(
            sorted(t for t in set(suppress_token_ids) if t < logits.shape[-1]), dtype=torch.long, device=device
        )
        for step in range(max_new_tokens):
            token = _next_token(logits, suppress, temperature, top_k, rng)
            steps.append((active, token, logits if return_logits else None))
            if step == max_new_tokens - 1:
                break
            if len(stop):  # bookkeeping on the device; one host sync a step (none without stop tokens)
                stopping = torch.isin(token, stop) & ~done[active]
                lengths[active] = torch.where(stopping, step + 1, lengths[active])
                done[active] = done[active] | stopping
                live = ~done[active]
                n_live = int(live.sum())
                if n_live == 0:
                    break
                if 4 * n_live <= 3 * len(active):
                    # A quarter of the rows or more have finished: drop them from the store and the batch.
                    keep = live.nonzero().squeeze(1)
                    store.keep_rows(keep)
                    active, token = active[keep], token[keep]
            mask = store.step_mask()
            logits = step_logits(model, token[:, None], (next_pos[active] + step)[:, None], mask)
            store.advance(1)
    out = torch.full((b, len(steps)), pad_id, dtype=torch.long, device=device)
    for step, (rows_at, token, _) in enumerate(steps):
        out[rows_at, step] = token
    n_new = lengths.tolist()
    logits_out = None
    if return_logits:
        stacked = torch.zeros(b, len(steps), steps[0][2].shape[-1], dtype=steps[0][2].dtype, device=device)
        for step, (rows_at, _, step_logits) in enumerate(steps):
            stacked[rows_at, step] = step_logits
        logits_out = [stacked[i, : n_new[i]] for i in range(b)]
    return GenerationOutput(
        tokens=[row[: n_new[i]] for i, row in enumerate(out.tolist())],
        kv_bytes=kv_bytes,
        kv_slots=store.capacity,
        row_kv_bytes=[(kept[i] + len(rows[i]) + n_new[i] - 1) * slot_bytes for i in range(b)],
        logits=logits_out,
    )


def _new_store(model: TransformerDecoder, num_rows: int, slots: int, cache: Optional[GistCache] = None) -> KVStore:
    """A store of ``num_rows`` rows with ``slots`` free slots, after ``cache``'s K entries when one is given (a 1-row
    cache in every row)."""
    device, dtype = model_device_dtype(model)
    k = 0 if cache is None else cache.num_gist_tokens
    store = KVStore.empty(model, num_rows, k + slots, dtype=dtype, device=device)
    if cache is not None:
        store.append(cache.keys, cache.values)
    return store


def _mode_inputs(
    model: TransformerDecoder, prompts: _Rows, continuations: _Rows, mode: str, gist_token_ids: Optional[Sequence[int]]
) -> Tuple[List[int], List[List[int]], List[List[int]]]:
    """The gist ids, prompt rows and continuation rows of :func:`generate` and :func:`score_continuations`, checked.

    Raises:
        ValueError: for an unknown mode, prompts without their gist span at the end, mismatched batch sizes or
            empty continuations.
    """
    if mode not in GENERATION_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(GENERATION_MODES)}")
    ids = resolve_gist_token_ids(model, gist_token_ids)
    prompt_rows = token_rows(prompts, "prompts")
    cont_rows = token_rows(continuations, "continuations")
    if len(prompt_rows) != len(cont_rows):
        raise ValueError(f"{len(prompt_rows)} prompts but {len(cont_rows)} continuations")
    check_gist_suffix(prompt_rows, ids)
    _check_continuations(cont_rows, ids)
    return ids, prompt_rows, cont_rows


def _control_rows(
    mode: str, prompt_rows: List[List[int]], cont_rows: List[List[int]], k: int
) -> Tuple[List[List[int]], List[int]]:
    """The rows a control mode (not ``gist``) feeds from an empty store, and their first positions."""
    if mode == "pos_control":
        return [p + c for p, c in zip(prompt_rows, cont_rows)], [0] * len(cont_rows)
    if mode == "neg_control":
        return cont_rows, [len(p) for p in prompt_rows]
    return [p[:-k][-k:] + c for p, c in zip(prompt_rows, cont_rows)], [0] * len(cont_rows)


def generate_from_cache(
    model: TransformerDecoder,
    cache: GistCache,
    continuations: _Rows,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    stop_tokens: Optional[Sequence[int]] = None,
    pad_id: int = 0,
    rng: Optional[torch.Generator] = None,
    suppress_token_ids: Optional[Sequence[int]] = None,
    return_logits: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    compile: bool = False,
) -> GenerationOutput:
    """Generate after compressed prompts: the continuations and new tokens see only the K gist entries and themselves.

    The KV held is the K cached entries + the longest continuation + ``max_new_tokens - 1``,
    never the prompt; continuation token ``j`` of row ``i`` takes position ``cache.next_pos[i] + j``.
    Continuations of different lengths are left-padded (padding is never attended).

    Args:
        model (TransformerDecoder): the model that made ``cache`` (in eval mode). Only the cache's
            shape is checked here; call :meth:`GistCache.check_compatible` after loading a cache.
        cache (GistCache): one row per continuation, or a single row reused for every
            continuation (compress once, reuse many). Cast to the model's dtype and device.
        continuations (_Rows): per example, the non-empty token ids that follow the gist span.
        max_new_tokens (int): at most this many new tokens per example.
        temperature (float): 0 for greedy decoding, else the (finite, positive) sampling temperature.
        top_k (Optional[int]): sample among the top-k tokens only.
        stop_tokens (Optional[Sequence[int]]): an example stops after emitting one of these.
        pad_id (int): token id written into padding slots (any valid id; never attended).
        rng (Optional[torch.Generator]): generator for sampling.
        suppress_token_ids (Optional[Sequence[int]]): ids never emitted; default the cache's gist ids.
        return_logits (bool): also return each step's raw logits.
        chunk_size (int): continuation tokens per forward pass before decoding (bounds the
            attention mask and activations of a long continuation; the result is the same).
        compile (bool): run each decoding step through ``torch.compile`` (fewer kernel launches a step: what bounds
            decoding on a GPU; traced once per batch size and store size, so it pays over many new tokens).

    Returns:
        GenerationOutput: new tokens per example, KV bytes and slots held, optionally logits.

    Raises:
        ValueError: for an empty continuation, a batch size that does not match the cache, a
            cache from a model of another shape, bad sampling settings, positions beyond
            ``max_seq_len``, or a ``chunk_size`` that is not a whole number >= 1.
    """
    rows = token_rows(continuations, "continuations")
    _check_continuations(rows, cache.gist_token_ids)
    check_token_range(model, rows, cache.gist_token_ids, "continuations")
    check_pad_id(model, pad_id)
    check_architecture(cache, model)
    _check_sampling(max_new_tokens, temperature, top_k)
    if cache.batch_size not in (1, len(rows)):
        raise ValueError(
            f"{len(rows)} continuations for a gist cache of {cache.batch_size} rows (expected {cache.batch_size} or a "
            "1-row cache)"
        )
    start = cache.next_pos.expand(len(rows)).tolist()
    check_max_position(model, max(p + len(r) for p, r in zip(start, rows)) + max_new_tokens - 2, "generation")
    store = _new_store(model, len(rows), max(len(r) for r in rows) + max_new_tokens - 1, cache)
    return _decode(
        model,
        store,
        rows,
        start,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        stop_tokens=stop_tokens,
        suppress_token_ids=cache.gist_token_ids if suppress_token_ids is None else suppress_token_ids,
        pad_id=pad_id,
        rng=rng,
        return_logits=return_logits,
        chunk_size=chunk_size,
        compile=compile,
    )


def generate(
    model: TransformerDecoder,
    prompts: _Rows,
    continuations: _Rows,
    *,
    mode: GenerationMode,
    gist_token_ids: Optional[Sequence[int]] = None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    stop_tokens: Optional[Sequence[int]] = None,
    pad_id: int = 0,
    rng: Optional[torch.Generator] = None,
    suppress_token_ids: Optional[Sequence[int]] = None,
    return_logits: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    compile: bool = False,
) -> GenerationOutput:
    """Generate under one of the evaluation's modes (see the module docstring's table).

    Args:
        model (TransformerDecoder): the model (in eval mode).
        prompts (_Rows): per example, the prompt's token ids followed by exactly the gist span.
        continuations (_Rows): per example, the non-empty token ids that follow the gist span.
        mode (GenerationMode): ``"gist"``, ``"pos_control"``, ``"neg_control"`` or ``"truncate"``.
        gist_token_ids (Optional[Sequence[int]]): the K gist ids; default the model's own.
        max_new_tokens, temperature, top_k, stop_tokens, pad_id, rng, return_logits, chunk_size, compile: as
            in :func:`generate_from_cache` (``chunk_size`` also for the prompt: compressed in ``gist``
            mode, prefilled in the others).
        suppress_token_ids (Optional[Sequence[int]]): ids never emitted; default the gist ids (every mode).

    Returns:
        GenerationOutput: new tokens per example and the KV bytes held by this mode.

    Raises:
        ValueError: for an unknown mode, prompts without their gist span at the end, mismatched
            batch sizes, empty continuations, bad sampling settings, positions beyond ``max_seq_len``
            or a ``chunk_size`` that is not a whole number >= 1.
    """
    ids, prompt_rows, cont_rows = _mode_inputs(model, prompts, continuations, mode, gist_token_ids)
    suppress = ids if suppress_token_ids is None else suppress_token_ids
    sampling = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        stop_tokens=stop_tokens,
        pad_id=pad_id,
        rng=rng,
        suppress_token_ids=suppress,
        return_logits=return_logits,
        chunk_size=chunk_size,
        compile=compile,
    )
    if mode == "gist":
        cache = compress(model, prompt_rows, gist_token_ids=ids, pad_id=pad_id, chunk_size=chunk_size)
        return generate_from_cache(model, cache, cont_rows, **sampling)
    rows, start = _control_rows(mode, prompt_rows, cont_rows, len(ids))
    check_token_range(model, prompt_rows + cont_rows, ids, "prompts and continuations")
    check_pad_id(model, pad_id)
    _check_sampling(max_new_tokens, temperature, top_k)
    check_max_position(model, max(p + len(r) for p, r in zip(start, rows)) + max_new_tokens - 2, "generation")
    store = _new_store(model, len(rows), max(len(r) for r in rows) + max_new_tokens - 1)
    return _decode(model, store, rows, start, **sampling)


@torch.no_grad()
def score_continuations(
    model: TransformerDecoder,
    prompts: _Rows,
    continuations: _Rows,
    num_scored: Sequence[int],
    *,
    mode: GenerationMode,
    gist_token_ids: Optional[Sequence[int]] = None,
    pad_id: int = 0,
    suppress_token_ids: Optional[Sequence[int]] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> List[Tuple[float, bool]]:
    """Score the last ``num_scored[i]`` tokens of each continuation, read as :func:`generate` reads under ``mode``.

    In ``gist`` mode the prompts are compressed first and the continuations read only the K cached entries, so
    scoring holds what generation holds; logits are computed only at the positions that predict scored tokens.

    Args:
        model (TransformerDecoder): the model (in eval mode).
        prompts (_Rows): per example, the prompt's token ids followed by exactly the gist span.
        continuations (_Rows): per example, the token ids that follow the gist span, the scored ones last.
        num_scored (Sequence[int]): per example, how many of the continuation's last tokens to score: at least 1
            and fewer than the continuation (its first token is predicted by the last gist, whose output no cache
            keeps).
        mode, gist_token_ids, pad_id, chunk_size: as in :func:`generate`.
        suppress_token_ids (Optional[Sequence[int]]): ids greedy decoding never picks; default the gist ids.

    Returns:
        List[Tuple[float, bool]]: per example, the scored tokens' summed log-probability and whether greedy
        decoding would produce exactly them.

    Raises:
        ValueError: as :func:`generate`, or for a ``num_scored`` outside ``1 .. len(continuation) - 1``.
    """
    ids, prompt_rows, cont_rows = _mode_inputs(model, prompts, continuations, mode, gist_token_ids)
    if len(num_scored) != len(cont_rows):
        raise ValueError(f"{len(prompt_rows)} prompts, {len(cont_rows)} continuations and {len(num_scored)} num_scored")
    for i, (n, row) in enumerate(zip(num_scored, cont_rows)):
        if not is_whole(n, 1) or n >= len(row):
            raise ValueError(f"num_scored[{i}]={n!r} must be at least 1 and below the continuation's {len(row)} tokens")
    check_token_range(model, prompt_rows + cont_rows, ids, "prompts and continuations")
    check_pad_id(model, pad_id)
    if mode == "gist":
        start = [len(p) for p in prompt_rows]
        rows = cont_rows
    else:
        rows, start = _control_rows(mode, prompt_rows, cont_rows, len(ids))
    check_max_position(model, max(p + len(r) for p, r in zip(start, rows)) - 1, "scoring")
    cache = (
        compress(model, prompt_rows, gist_token_ids=ids, pad_id=pad_id, chunk_size=chunk_size)
        if mode == "gist"
        else None
    )
    store = _new_store(model, len(rows), max(len(r) for r in rows), cache)
    tokens, input_pos, valid = left_pad(rows, start, pad_id, store.valid.device)
    s = tokens.shape[1]
    predicting = torch.zeros_like(valid)  # left padding aligns the rows' ends: the scored tokens are the last n
    for i, n in enumerate(num_scored):
        predicting[i, s - n - 1 : s - 1] = True
    targets = tokens[:, 1:][predicting[:, :-1]]
    with store_attention(model, store):
        h = prefill(model, store, tokens, input_pos, valid, chunk_size, keep=predicting)
    logits = model.output(model.norm(h)).float()
    picked = F.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    suppress = [t for t in (ids if suppress_token_ids is None else suppress_token_ids) if t < logits.shape[-1]]
    greedy = logits.index_fill(
        -1, torch.tensor(suppress, dtype=torch.long, device=logits.device), float("-inf")
    ).argmax(-1)
    counts = list(num_scored)
    return [(float(p.sum()), bool(g.all())) for p, g in zip(picked.split(counts), (greedy == targets).split(counts))]
