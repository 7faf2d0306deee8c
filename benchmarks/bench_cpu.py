"""``make bench``: CPU numbers for what gist compression costs in training and saves at inference.

Every figure is measured in this one run beside its baseline, and goals compare ratios of numbers
measured together (variants interleaved step by step, medians), never numbers from other runs.

1. Training cost of the gist mask: tokens/s of the recipe's step (``masked_loss``, backward, AdamW
   on LoRA + gist rows, collation included) with the dense gist mask vs plain causal attention
   (``mask=None`` through torchtune's ``padded_collate_sft``) vs a dense causal mask.
   Goal: gist >= 0.9x the ``mask=None`` throughput.
2. Batching and packing: tokens/s and padding of batch size 1 vs padded batches vs packed rows on
   the same Alpaca+ records (the same real tokens). Goal: packing >= 3x batch size 1, < 10% padding.
3. Inference through :mod:`torchtune_gist.generation`: KV bytes, prefill/compress time, per-token
   decode and end-to-end latency for the full prompt (``pos_control``) vs the gist cache vs
   truncation over prompt lengths and K; torchtune's stock decode over a cache allocated at the
   model's full length; compress once and reuse many vs recomputing the prompt; the peak memory of
   ``compress`` in one pass vs in chunks (each call in a fresh process). Goals: the KV
   bytes ratio is exactly ``(K + n) / (P + K + n)``; decode at 4096-token prompts >= 2x faster from
   the gist cache than from the full prompt.
4. Mask construction (dense gist and packed) at ``[8, 2048, 2048]`` and ``[4, 4096, 4096]`` as a
   share of one training step of the demo-shaped model on that batch.

Usage::

    .venv/bin/python benchmarks/bench_cpu.py           # full run: benchmarks/RESULTS.md, results_cpu.json, *.png
    .venv/bin/python benchmarks/bench_cpu.py --quick   # seconds, small sizes: outputs/bench_quick/

Models are random-init Llama 3.1-shaped torchtune decoders over the tiny 512-token byte vocabulary
(timings do not depend on trained weights); fp32, ``torch.set_num_threads(--threads)``.
"""

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.nn.attention.flex_attention import BlockMask
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_sft
from torchtune.generation import generate as torchtune_generate
from torchtune.models.llama3 import llama3_tokenizer
from torchtune.models.llama3_1 import llama3_1
from torchtune.modules.common_utils import delete_kv_caches
from tqdm import tqdm

from _common import (
    CPU_JSON,
    decode_split,
    fmt,
    forward_stamps,
    interleaved,
    load_average,
    machine_info,
    command_line,
    median,
    render_results,
    save_png,
    table,
    write_json,
)
from torchtune_gist.data import (
    PackedGistDataset,
    alpaca_plus_dataset,
    gist_passkey_dataset,
    packed_gist_collate,
    padded_gist_collate,
)
from torchtune_gist.generation import DEFAULT_CHUNK_SIZE, compress, generate, generate_from_cache
from torchtune_gist.gist_tokens import gist_token_ids
from torchtune_gist.masks import document_ids_from_lengths, make_gist_mask
from torchtune_gist.models import gist_llama3_1, lora_gist_llama3_1
from torchtune_gist.segment_masks import GistSegmentMask
from torchtune_gist.modules import init_gist_embeddings, set_trainable_params
from torchtune_gist.tiny import TINY_LLAMA3_1_ARGS, write_tiny_tokenizer
from torchtune_gist.training import FLEX_BLOCK_SIZE, masked_loss

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data" / "alpaca_plus"
IGNORE = CROSS_ENTROPY_IGNORE_IDX
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "output_proj"]

#: The demo's model (``torchtune_gist.demo``): 4 layers, width 128, 4 heads / 2 KV heads, MLP 512 (~1.1M parameters).
DEMO_SHAPE: Dict[str, int] = dict(num_layers=4, embed_dim=128, num_heads=4, num_kv_heads=2, intermediate_dim=512)
#: A larger training shape: Llama-like width 512 with 4:1 grouped-query attention.
WIDE_SHAPE: Dict[str, int] = dict(num_layers=4, embed_dim=512, num_heads=8, num_kv_heads=2, intermediate_dim=1536)
#: The main inference shape: Llama 3.1's layout (4:1 GQA, head size 64) at 8 layers of width 512 (~24M parameters).
GQA_SHAPE: Dict[str, int] = dict(num_layers=8, embed_dim=512, num_heads=8, num_kv_heads=2, intermediate_dim=1536)
#: The same with one KV head per query head: 4x the KV bytes per token, where attention dominates decoding.
MHA_SHAPE: Dict[str, int] = dict(num_layers=8, embed_dim=512, num_heads=8, num_kv_heads=8, intermediate_dim=1536)
#: ``--quick`` (smoke test) shapes.
QUICK_SHAPE: Dict[str, int] = dict(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, intermediate_dim=128)
QUICK_MHA_SHAPE: Dict[str, int] = {**QUICK_SHAPE, "num_kv_heads": 4}


@dataclass(frozen=True)
class Settings:
    """Sizes of one run (``FULL`` or ``QUICK``)."""

    train_shapes: Tuple[Tuple[str, Dict[str, int], int, Optional[int]], ...]  # name, shape, batch, passkey context (None: Alpaca+)
    demo_shape: Dict[str, int]  # the model of the packing and mask sections
    train_reps: Tuple[int, ...]  # timed steps per variant, per shape
    max_example_len: int
    num_gist_tokens_train: int
    pack_examples: int
    pad_batch_size: int
    pack_row_lens: Tuple[int, ...]
    pack_rounds: int
    infer_shape: Dict[str, int]
    attn_shape: Dict[str, int]
    infer_max_seq_len: int
    prompt_lens: Tuple[int, ...]
    ks: Tuple[int, ...]
    attn_k: int
    cont_len: int
    new_tokens: int
    stock_prompt_lens: Tuple[int, ...]
    reuse_prompt_len: int
    reuse_k: int
    reuse_inputs: int
    batched_rows: int
    decode_rounds: int
    mask_sizes: Tuple[Tuple[int, int], ...]
    mask_reps: int
    mask_doc_len: int
    memory_prompt_lens: Tuple[int, ...]
    memory_rows: int
    memory_chunk_size: int


FULL = Settings(
    train_shapes=(
        ("demo (4L, d128, 4/2 heads), Alpaca+", DEMO_SHAPE, 8, None),
        ("wide (4L, d512, 8/2 heads), Alpaca+", WIDE_SHAPE, 2, None),
        ("demo (4L, d128, 4/2 heads), passkey 384", DEMO_SHAPE, 2, 384),
        ("demo (4L, d128, 4/2 heads), passkey 512", DEMO_SHAPE, 2, 512),
        ("demo (4L, d128, 4/2 heads), passkey 1024", DEMO_SHAPE, 2, 1024),
    ),
    train_reps=(10, 4, 8, 8, 5),
    demo_shape=DEMO_SHAPE,
    max_example_len=512,
    num_gist_tokens_train=4,
    pack_examples=128,
    pad_batch_size=8,
    pack_row_lens=(512, 1024, 2048),
    pack_rounds=4,
    infer_shape=GQA_SHAPE,
    attn_shape=MHA_SHAPE,
    infer_max_seq_len=8192,
    prompt_lens=(256, 512, 1024, 2048, 4096),
    ks=(1, 2, 5, 10, 25),
    attn_k=10,
    cont_len=8,
    new_tokens=32,
    stock_prompt_lens=(256, 1024),
    reuse_prompt_len=1024,
    reuse_k=10,
    reuse_inputs=8,
    batched_rows=4,
    decode_rounds=3,
    mask_sizes=((8, 2048), (4, 4096)),
    mask_reps=3,
    mask_doc_len=200,
    memory_prompt_lens=(1024, 2048, 4096),
    memory_rows=2,
    memory_chunk_size=DEFAULT_CHUNK_SIZE,
)

QUICK = Settings(
    train_shapes=(("quick (2L, d64, 4/2 heads), Alpaca+", QUICK_SHAPE, 2, None), ("quick, passkey 128", QUICK_SHAPE, 2, 128)),
    train_reps=(2, 2),
    demo_shape=QUICK_SHAPE,
    max_example_len=256,
    num_gist_tokens_train=4,
    pack_examples=8,
    pad_batch_size=4,
    pack_row_lens=(256, 512),
    pack_rounds=2,
    infer_shape=QUICK_SHAPE,
    attn_shape=QUICK_MHA_SHAPE,
    infer_max_seq_len=256,
    prompt_lens=(32, 64),
    ks=(1, 2),
    attn_k=2,
    cont_len=4,
    new_tokens=4,
    stock_prompt_lens=(32,),
    reuse_prompt_len=32,
    reuse_k=2,
    reuse_inputs=2,
    batched_rows=2,
    decode_rounds=2,
    mask_sizes=((2, 128),),
    mask_reps=1,
    mask_doc_len=40,
    memory_prompt_lens=(64,),
    memory_rows=2,
    memory_chunk_size=16,
)

SECTIONS = ("training", "packing", "inference", "masks")
REUSE_VARIANTS = ("recompute_full_prompt", "compress_once_reuse_sequential", "compress_once_reuse_batched")


def _arch(shape: Dict[str, int], max_seq_len: int) -> Dict[str, Any]:
    return {**TINY_LLAMA3_1_ARGS, **shape, "max_seq_len": max_seq_len}


def _shape_name(shape: Dict[str, int]) -> str:
    return (
        f"{shape['num_layers']}L, d{shape['embed_dim']}, {shape['num_heads']}/{shape['num_kv_heads']} heads, "
        f"MLP {shape['intermediate_dim']} (LoRA rank 16)"
    )


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _section_header(name: str) -> None:
    print(f"\n== {name} == (load average {load_average()})", flush=True)


# ---------------------------------------------------------------------------------------------
# Data and training steps


def load_examples(tokenizer: Any, data_dir: Path, n: int, max_len: int, k: int) -> Tuple[List[Dict[str, Any]], str]:
    """The first ``n`` Alpaca+ ``validation_seen`` examples (gist span of K) of at most ``max_len`` tokens.

    Falls back to generated passkey examples of mixed lengths when the Alpaca+ files are absent.
    """
    if (data_dir / "alpaca_plus_validation_seen.json").is_file():
        for max_records in (4 * n + 16, None):  # records longer than max_len are dropped: read a margin first
            ds = alpaca_plus_dataset(
                tokenizer, data_dir=data_dir, split="validation_seen", num_gist_tokens=k, max_seq_len=max_len,
                truncation="drop", max_examples=max_records,
            )
            if len(ds) >= n:
                break
        source = f"Alpaca+ validation_seen ({data_dir}), first {n} records of <= {max_len} tokens, tiny byte tokenizer"
    else:
        lengths = [max_len // 8, max_len // 4, max_len // 2, (3 * max_len) // 4]
        ds = gist_passkey_dataset(tokenizer, num_gist_tokens=k, num_samples=n, context_tokens=lengths, seed=0)
        source = f"generated passkey examples, contexts of {lengths} tokens (Alpaca+ not found at {data_dir})"
    if len(ds) < n:
        raise ValueError(f"{source}: only {len(ds)} examples, {n} needed")
    return [{"tokens": ds[i]["tokens"], "labels": ds[i]["labels"]} for i in range(n)], source


def build_train_model(shape: Dict[str, int], k: int, ids: List[int], max_seq_len: int) -> Tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The recipe's model (LoRA on q/k/v/output, rank 16, gist rows trainable) and its AdamW."""
    torch.manual_seed(0)
    model = lora_gist_llama3_1(
        LORA_MODULES, **_arch(shape, max_seq_len), lora_rank=16, lora_alpha=32, num_gist_tokens=k, gist_token_ids=ids
    )
    params = set_trainable_params(model)
    model.train()
    return model, torch.optim.AdamW(params.values(), lr=1e-5)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: Dict[str, Any]) -> None:
    """One optimizer step of the recipe on one batch: ``masked_loss``, backward, AdamW."""
    loss_sum, n = masked_loss(model, batch, _LOSS, IGNORE)
    (loss_sum / n.clamp(min=1)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


_LOSS = torch.nn.CrossEntropyLoss(ignore_index=IGNORE)


def _real_tokens(batch: Dict[str, Any], pad_id: int) -> int:
    return int((batch["tokens"] != pad_id).sum())


def bench_training(s: Settings, tokenizer: Any, data_dir: Path) -> Dict[str, Any]:
    """Section 1: the gist mask vs ``mask=None`` vs a dense causal mask, same model, data and optimizer."""
    _section_header("1. training cost of the gist mask")
    k, pad = s.num_gist_tokens_train, tokenizer.pad_id
    ids = gist_token_ids(tokenizer, k)
    shapes = []
    for (name, shape, batch_size, context), reps in zip(s.train_shapes, s.train_reps):
        if context is None:
            examples, source = load_examples(tokenizer, data_dir, batch_size, s.max_example_len, k)
        else:
            ds = gist_passkey_dataset(tokenizer, num_gist_tokens=k, num_samples=batch_size, context_tokens=context, seed=0)
            examples = [{"tokens": ds[i]["tokens"], "labels": ds[i]["labels"]} for i in range(batch_size)]
            source = f"generated passkey examples, {context}-token contexts"
        model, opt = build_train_model(shape, k, ids, max(s.max_example_len, 2 * (context or 0)))
        gist_collate = partial(padded_gist_collate, gist_token_ids=ids, pad_id=pad)
        variants: Dict[str, Callable[[], Any]] = {
            "gist": lambda: train_step(model, opt, gist_collate(examples)),
            "gist_segments": lambda: train_step(model, opt, gist_collate(examples, segment_mask=True)),
            "causal_none": lambda: train_step(model, opt, padded_collate_sft(examples, padding_idx=pad, ignore_idx=IGNORE)),
            "causal_dense": lambda: train_step(model, opt, gist_collate(examples, mask_mode="pos_control")),
        }
        probe = gist_collate(examples)
        real, (b, seq) = _real_tokens(probe, pad), tuple(probe["tokens"].shape)
        with tqdm(total=(reps + 1) * len(variants), desc=f"train {name}", file=sys.stderr) as bar:
            times = interleaved(variants, reps=reps, warmup=1, progress=bar)
        med = {v: median(t) for v, t in times.items()}
        row = {
            "name": name,
            "shape": shape,
            "params": _num_params(model),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "batch": [b, seq],
            "real_tokens_per_step": real,
            "data": source,
            "step_s": times,
            "median_step_s": med,
            "tokens_per_s": {v: real / t for v, t in med.items()},
            "gist_vs_causal_none": med["causal_none"] / med["gist"],
            "gist_vs_causal_dense": med["causal_dense"] / med["gist"],
            "gist_segments_vs_causal_none": med["causal_none"] / med["gist_segments"],
        }
        print(
            f"{name}: batch {b}x{seq}, {real} real tokens; tokens/s gist {row['tokens_per_s']['gist']:.0f}, "
            f"mask=None {row['tokens_per_s']['causal_none']:.0f}, dense causal {row['tokens_per_s']['causal_dense']:.0f}; "
            f"gist segments {row['tokens_per_s']['gist_segments']:.0f}; gist/causal(None) = {row['gist_vs_causal_none']:.3f}x "
            f"(dense mask), {row['gist_segments_vs_causal_none']:.3f}x (segments)",
            flush=True,
        )
        shapes.append(row)
        gc.collect()
    return {"num_gist_tokens": k, "shapes": shapes}


def packing_plans(
    examples: List[Dict[str, Any]], ids: List[int], pad: int, *, batch_size: int, row_lens: Sequence[int],
    segment_row_lens: Sequence[int] = (), block_mask_device: Optional[torch.device] = None,
) -> Tuple[Dict[str, List[Callable[[], Dict[str, Any]]]], Dict[str, Dict[str, Any]]]:
    """Batch size 1, padded batches (data order) and packed rows of each length over the same examples;
    packed rows of ``segment_row_lens`` also with segment masks (``packed_<L>_segments``). With
    ``block_mask_device``, every mask is a ``BlockMask`` built on that device (the GPU benchmark's).

    Returns:
        Tuple: per variant, the list of its steps (each collates its batch when called), and per
        variant its static numbers: steps, token slots, padding fraction and ``qk_pairs`` (the
        query-key pairs a dense ``[b, s, s]`` mask makes attention compute, summed over steps).

    Raises:
        AssertionError: if a variant does not hold exactly the examples' real tokens.
    """
    blocks = {"block_mask": block_mask_device is not None, "block_mask_device": block_mask_device}
    # As the recipe: BlockMask batches padded to FlexAttention's block size (one compile per multiple of 128).
    pcollate = partial(padded_gist_collate, gist_token_ids=ids, pad_id=pad, **blocks,
                       pad_to_multiple_of=FLEX_BLOCK_SIZE if block_mask_device is not None else 1)
    kcollate = partial(packed_gist_collate, gist_token_ids=ids, pad_id=pad, **blocks)
    plans: Dict[str, List[Callable[[], Dict[str, Any]]]] = {
        "batch_size_1": [partial(pcollate, [ex]) for ex in examples],
        f"padded_bs{batch_size}": [partial(pcollate, examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)],
    }
    for row_len in row_lens:
        packed = PackedGistDataset(examples, max_seq_len=row_len, pad_id=pad)
        plans[f"packed_{row_len}"] = [partial(kcollate, [packed[i]]) for i in range(len(packed))]
        if row_len in segment_row_lens:
            plans[f"packed_{row_len}_segments"] = [partial(kcollate, [packed[i]], segment_mask=True) for i in range(len(packed))]
    real_total = sum(len(ex["tokens"]) for ex in examples)
    stats: Dict[str, Dict[str, Any]] = {}
    for name, plan in plans.items():
        slots = real = qk_pairs = 0
        for make in plan:
            batch = make()
            slots += batch["tokens"].numel()
            real += int((batch["tokens"] != pad).sum())
            qk_pairs += _qk_pairs(batch)
        if real != real_total:
            raise AssertionError(f"{name} holds {real} real tokens, expected {real_total}")
        stats[name] = {
            "steps": len(plan),
            "token_slots": slots,
            "padding_fraction": 1 - real / slots,
            "qk_pairs": qk_pairs,
        }
    return plans, stats


def _qk_pairs(batch: Dict[str, Any]) -> int:
    """Query-key pairs the attention calls of a batch span: ``b * s^2`` for a dense mask, the blocks' squares
    for segments, the computed (partial and full) blocks' areas for a ``BlockMask``."""
    mask = batch["mask"]
    if isinstance(mask, GistSegmentMask):
        return sum((end - ka) ** 2 for _, _, ka, end in mask.blocks())
    if isinstance(mask, BlockMask):
        blocks = mask.kv_num_blocks.sum() + (mask.full_kv_num_blocks.sum() if mask.full_kv_num_blocks is not None else 0)
        return int(blocks) * mask.BLOCK_SIZE[0] * mask.BLOCK_SIZE[1]
    b, s = batch["tokens"].shape
    return b * s * s


def run_plans(
    plans: Dict[str, List[Callable[[], Dict[str, Any]]]],
    step: Callable[[Dict[str, Any]], None],
    *,
    rounds: int,
    desc: str,
    warm_every_shape: bool = False,
) -> Dict[str, float]:
    """Seconds each variant takes for all its steps (collation included), after one warm-up step each
    (``warm_every_shape``: one per distinct batch shape, so that compiling for a new shape stays out of the timings).

    The variants take turns in ``rounds`` chunks (a round runs 1/rounds of every variant's steps), so a
    change of machine load during the run hits every variant alike.
    """
    for plan in plans.values():
        if not warm_every_shape:
            step(plan[0]())
            continue
        seen = set()
        for make in plan:
            batch = make()
            if tuple(batch["tokens"].shape) not in seen:
                seen.add(tuple(batch["tokens"].shape))
                step(batch)
    times = {name: 0.0 for name in plans}
    with tqdm(total=sum(len(p) for p in plans.values()), desc=desc, file=sys.stderr) as bar:
        for r in range(rounds):
            for name, plan in plans.items():
                lo, hi = (len(plan) * r) // rounds, (len(plan) * (r + 1)) // rounds
                t0 = time.perf_counter()
                for make in plan[lo:hi]:
                    step(make())
                times[name] += time.perf_counter() - t0
                bar.update(hi - lo)
    return times


def packing_summary(stats: Dict[str, Dict[str, Any]], times: Dict[str, float], real_total: int) -> Dict[str, Dict[str, Any]]:
    """Add time, tokens/s and the ratios to batch size 1 to each variant's numbers (and print them)."""
    base = stats["batch_size_1"]
    for name, st in stats.items():
        st["time_s"] = times[name]
        st["tokens_per_s"] = real_total / times[name]
        st["speedup_vs_bs1"] = times["batch_size_1"] / times[name]
        st["qk_pairs_vs_bs1"] = st["qk_pairs"] / base["qk_pairs"]
        print(
            f"{name}: {st['steps']} steps, padding {st['padding_fraction']:.3f}, attention work {st['qk_pairs_vs_bs1']:.1f}x, "
            f"{st['tokens_per_s']:.0f} tokens/s, {st['speedup_vs_bs1']:.2f}x batch size 1",
            flush=True,
        )
    return stats


def bench_packing(s: Settings, tokenizer: Any, data_dir: Path) -> Dict[str, Any]:
    """Section 2: batch size 1 vs padded batches vs packed rows over the same examples."""
    _section_header("2. batching and packing")
    k, pad = s.num_gist_tokens_train, tokenizer.pad_id
    ids = gist_token_ids(tokenizer, k)
    examples, source = load_examples(tokenizer, data_dir, s.pack_examples, s.max_example_len, k)
    model, opt = build_train_model(s.demo_shape, k, ids, max(*s.pack_row_lens, s.max_example_len))
    plans, stats = packing_plans(
        examples, ids, pad, batch_size=s.pad_batch_size, row_lens=s.pack_row_lens, segment_row_lens=s.pack_row_lens
    )
    times = run_plans(plans, lambda batch: train_step(model, opt, batch), rounds=s.pack_rounds, desc="packing")
    real_total = sum(len(ex["tokens"]) for ex in examples)
    return {
        "data": source,
        "examples": len(examples),
        "real_tokens": real_total,
        "model": _shape_name(s.demo_shape),
        "collation_included": True,
        "variants": packing_summary(stats, times, real_total),
    }


# ---------------------------------------------------------------------------------------------
# Inference


class GistModels:
    """Gist models for several K over one set of random base weights (only the gist rows differ)."""

    def __init__(self, shape: Dict[str, int], max_seq_len: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.arch = _arch(shape, max_seq_len)
        self.base = llama3_1(**self.arch).state_dict()

    def get(self, k: int) -> torch.nn.Module:
        model = gist_llama3_1(**self.arch, num_gist_tokens=k)
        missing, unexpected = model.load_state_dict(self.base, strict=False)
        if unexpected or missing != ["tok_embeddings.gist_embeddings"]:
            raise AssertionError(f"unexpected base load: missing {missing}, unexpected {unexpected}")
        init_gist_embeddings(model)
        return model.eval()


def _rand_ids(n: int, gen: torch.Generator) -> List[int]:
    return torch.randint(0, 256, (n,), generator=gen).tolist()


def _kv_bytes_per_slot(model: torch.nn.Module) -> int:
    a = model.layers[0].attn
    return 2 * len(model.layers) * a.num_kv_heads * a.head_dim * 4


def run_cell(
    model: torch.nn.Module, prompt: List[int], cont: List[int], *, k: int, new_tokens: int, pad_id: int, rounds: int = 1
) -> Dict[str, Any]:
    """Full prompt vs gist cache vs truncation for one prompt: KV bytes and times, all through the package.

    With ``rounds`` > 1 the three generations run that many times, interleaved (the prompt is compressed once),
    and each variant's call with the median decode time counts.
    """
    t0 = time.perf_counter()
    cache = compress(model, [prompt], pad_id=pad_id)
    compress_s = time.perf_counter() - t0
    calls = {
        "full": lambda: generate(model, [prompt], [cont], mode="pos_control", max_new_tokens=new_tokens, pad_id=pad_id),
        "truncate": lambda: generate(model, [prompt], [cont], mode="truncate", max_new_tokens=new_tokens, pad_id=pad_id),
        "gist": lambda: generate_from_cache(model, cache, [cont], max_new_tokens=new_tokens, pad_id=pad_id),
    }
    runs: Dict[str, List[Dict[str, Any]]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            with forward_stamps(model) as stamps:
                t1 = time.perf_counter()
                res = call()
                t2 = time.perf_counter()
            prefill, decode, n_steps = decode_split(stamps, t1)
            runs[name].append({"kv_bytes": res.kv_bytes, "kv_slots": res.kv_slots, "prefill_s": prefill,
                               "decode_s_per_token": decode, "decode_intervals": n_steps, "e2e_s": t2 - t1})
    out: Dict[str, Any] = {"rounds": rounds}
    for name, results in runs.items():
        out[name] = {**sorted(results, key=lambda r: r["decode_s_per_token"])[len(results) // 2],
                     "decode_s_per_token_each_round": [r["decode_s_per_token"] for r in results]}
    gist = out["gist"]
    gist.update(cache_bytes=cache.nbytes, compress_s=compress_s, e2e_from_cache_s=gist["e2e_s"], e2e_s=compress_s + gist["e2e_s"])
    p, n = len(prompt) - k, len(cont) + new_tokens - 1
    measured = Fraction(out["gist"]["kv_bytes"], out["full"]["kv_bytes"])
    expected = Fraction(k + n, p + k + n)
    out["kv_ratio"] = {"measured": str(measured), "expected": str(expected), "n": n, "exact": measured == expected}
    out["kv_truncate_equals_gist"] = out["truncate"]["kv_bytes"] == out["gist"]["kv_bytes"]
    if measured != expected or not out["kv_truncate_equals_gist"]:
        raise AssertionError(
            f"P={p} K={k}: gist/full KV bytes {measured} != (K+n)/(P+K+n) = {expected}, or truncation "
            f"holds {out['truncate']['kv_bytes']} bytes vs gist {out['gist']['kv_bytes']}"
        )
    out["decode_speedup_gist_vs_full"] = out["full"]["decode_s_per_token"] / out["gist"]["decode_s_per_token"]
    return out


def inference_grid(
    name: str, shape: Dict[str, int], s: Settings, ks: Sequence[int], pad_id: int
) -> Dict[str, Any]:
    """Run :func:`run_cell` for every prompt length and K on one model shape."""
    models = GistModels(shape, s.infer_max_seq_len)
    gen = torch.Generator().manual_seed(1)
    cells = []
    n = s.cont_len + s.new_tokens - 1
    with tqdm(total=len(ks) * len(s.prompt_lens), desc=f"inference {name}", file=sys.stderr) as bar:
        for k in ks:
            model = models.get(k)
            ids = model.tok_embeddings.gist_token_ids
            for p in s.prompt_lens:
                prompt, cont = _rand_ids(p, gen) + list(ids), _rand_ids(s.cont_len, gen)
                rounds = s.decode_rounds if p == max(s.prompt_lens) else 1  # the cells the decode goals read
                cell = {"prompt_len": p, "k": k,
                        **run_cell(model, prompt, cont, k=k, new_tokens=s.new_tokens, pad_id=pad_id, rounds=rounds)}
                r = cell["kv_ratio"]
                tqdm.write(
                    f"[{name}] P={p:5d} K={k:2d}: KV gist/full = {cell['gist']['kv_bytes']}/{cell['full']['kv_bytes']} = "
                    f"{r['measured']} == (K+n)/(P+K+n) = ({k}+{n})/({p}+{k}+{n}) = {r['expected']}: {r['exact']}; "
                    f"decode ms/token full {1e3 * cell['full']['decode_s_per_token']:.1f}, "
                    f"gist {1e3 * cell['gist']['decode_s_per_token']:.1f}, trunc {1e3 * cell['truncate']['decode_s_per_token']:.1f}",
                    file=sys.stdout,
                )
                cells.append(cell)
                bar.update(1)
            del model
            gc.collect()
    m = models.get(ks[0])
    return {
        "shape": shape,
        "params": _num_params(m),
        "kv_bytes_per_token": _kv_bytes_per_slot(m),
        "weight_bytes": 4 * _num_params(m),
        "cont_len": s.cont_len,
        "new_tokens": s.new_tokens,
        "n": n,
        "cells": cells,
    }


def stock_decode(shape: Dict[str, int], s: Settings, k: int, pad_id: int) -> List[Dict[str, Any]]:
    """torchtune's ``generate`` with ``setup_caches`` at the model's full ``max_seq_len`` (plain causal)."""
    models = GistModels(shape, s.infer_max_seq_len)
    model = models.get(k)
    ids = list(model.tok_embeddings.gist_token_ids)
    gen = torch.Generator().manual_seed(1)
    out = []
    for p in tqdm(s.stock_prompt_lens, desc="torchtune stock decode", file=sys.stderr):
        prompt = torch.tensor([_rand_ids(p, gen) + ids + _rand_ids(s.cont_len, gen)])
        model.setup_caches(batch_size=1, dtype=torch.float32, decoder_max_seq_len=s.infer_max_seq_len)
        kv_bytes = sum(
            l.attn.kv_cache.k_cache.numel() * 4 + l.attn.kv_cache.v_cache.numel() * 4 for l in model.layers
        )
        with forward_stamps(model) as stamps:
            t0 = time.perf_counter()
            torchtune_generate(model, prompt, max_generated_tokens=s.new_tokens, pad_id=pad_id, temperature=0.0)
            t1 = time.perf_counter()
        delete_kv_caches(model)
        prefill, decode, n_steps = decode_split(stamps, t0)
        row = {
            "prompt_len": p,
            "k": k,
            "cache_slots": s.infer_max_seq_len,
            "kv_bytes": kv_bytes,
            "prefill_s": prefill,
            "decode_s_per_token": decode,
            "decode_intervals": n_steps,
            "e2e_s": t1 - t0,
        }
        tqdm.write(f"[stock torchtune] P={p}: cache {s.infer_max_seq_len} slots, decode {1e3 * decode:.1f} ms/token")
        out.append(row)
    return out


def reuse_many(shape: Dict[str, int], s: Settings, pad_id: int) -> Dict[str, Any]:
    """One prompt, many inputs: recompute the full prompt per input vs compress once and reuse the cache."""
    models = GistModels(shape, s.infer_max_seq_len)
    k = s.reuse_k
    model = models.get(k)
    ids = list(model.tok_embeddings.gist_token_ids)
    gen = torch.Generator().manual_seed(2)
    prompt = _rand_ids(s.reuse_prompt_len, gen) + ids
    conts = [_rand_ids(s.cont_len, gen) for _ in range(s.reuse_inputs)]
    gen_kwargs = dict(max_new_tokens=s.new_tokens, pad_id=pad_id)

    def recompute() -> int:
        return max(generate(model, [prompt], [c], mode="pos_control", **gen_kwargs).kv_bytes for c in conts)

    def reuse_sequential() -> int:
        cache = compress(model, [prompt], pad_id=pad_id)
        return max(generate_from_cache(model, cache, [c], **gen_kwargs).kv_bytes for c in conts)

    def reuse_batched() -> int:
        cache = compress(model, [prompt], pad_id=pad_id)
        return generate_from_cache(model, cache, conts, **gen_kwargs).kv_bytes

    out: Dict[str, Any] = {
        "prompt_len": s.reuse_prompt_len,
        "k": k,
        "inputs": s.reuse_inputs,
        "cont_len": s.cont_len,
        "new_tokens": s.new_tokens,
        "variants": {},
    }
    fns = {"recompute_full_prompt": recompute, "compress_once_reuse_sequential": reuse_sequential, "compress_once_reuse_batched": reuse_batched}
    for name in tqdm(REUSE_VARIANTS, desc="reuse many", file=sys.stderr):
        fn = fns[name]
        t0 = time.perf_counter()
        kv = fn()
        dt = time.perf_counter() - t0
        out["variants"][name] = {"time_s": dt, "inputs_per_s": s.reuse_inputs / dt, "kv_bytes_held": kv}
    base = out["variants"]["recompute_full_prompt"]["inputs_per_s"]
    for name, v in out["variants"].items():
        v["speedup"] = v["inputs_per_s"] / base
        print(f"reuse: {name}: {v['inputs_per_s']:.2f} inputs/s ({v['speedup']:.2f}x), KV held {v['kv_bytes_held']} bytes", flush=True)
    return out


def batched_decode(shape: Dict[str, int], s: Settings, k: int, pad_id: int) -> Dict[str, Any]:
    """Decode of ``s.batched_rows`` rows, each with its own prompt of the longest length: full prompt vs gist cache.

    The weights are read once per step for the whole batch while every row brings its own prompt KV, so this is
    where the prompt's KV weighs most beside the weights. Each side runs ``s.decode_rounds`` times, interleaved
    (one call's median step varied by a third between calls); the median call counts.
    """
    model = GistModels(shape, s.infer_max_seq_len).get(k)
    ids = list(model.tok_embeddings.gist_token_ids)
    gen = torch.Generator().manual_seed(3)
    p = max(s.prompt_lens)
    prompts = [_rand_ids(p, gen) + ids for _ in range(s.batched_rows)]
    conts = [_rand_ids(s.cont_len, gen) for _ in range(s.batched_rows)]
    gen_kwargs = dict(max_new_tokens=s.new_tokens, pad_id=pad_id)
    t0 = time.perf_counter()
    cache = compress(model, prompts, pad_id=pad_id)
    compress_s = time.perf_counter() - t0
    runs: Dict[str, List[Tuple[float, float]]] = {"full": [], "gist": []}
    kv_bytes: Dict[str, int] = {}
    for _ in range(s.decode_rounds):
        for name, call in (("full", lambda: generate(model, prompts, conts, mode="pos_control", **gen_kwargs)),
                           ("gist", lambda: generate_from_cache(model, cache, conts, **gen_kwargs))):
            with forward_stamps(model) as stamps:
                t0 = time.perf_counter()
                result = call()
            prefill_s, step_s, _ = decode_split(stamps, t0)
            runs[name].append((step_s, prefill_s))
            kv_bytes[name] = result.kv_bytes
    full_decode, full_prefill = sorted(runs["full"])[len(runs["full"]) // 2]
    gist_decode = sorted(runs["gist"])[len(runs["gist"]) // 2][0]
    out = {
        "rows": s.batched_rows, "prompt_len": p, "k": k, "rounds": s.decode_rounds,
        "full": {"kv_bytes": kv_bytes["full"], "prefill_s": full_prefill, "decode_s_per_step": full_decode,
                 "decode_s_per_step_each_round": [r[0] for r in runs["full"]]},
        "gist": {"kv_bytes": kv_bytes["gist"], "compress_s": compress_s, "decode_s_per_step": gist_decode,
                 "decode_s_per_step_each_round": [r[0] for r in runs["gist"]]},
        "decode_speedup_gist_vs_full": full_decode / gist_decode,
    }
    print(
        f"[batched] {s.batched_rows} rows x P={p}, K={k}: decode ms/step full {1e3 * full_decode:.1f}, "
        f"gist {1e3 * gist_decode:.1f} ({out['decode_speedup_gist_vs_full']:.2f}x, medians of {s.decode_rounds} calls); "
        f"KV bytes {kv_bytes['full']} vs {kv_bytes['gist']}",
        flush=True,
    )
    return out


def _peak_memory(spec: Dict[str, Any]) -> Dict[str, Any]:
    """``benchmarks/_peak_memory.py``'s measurement of one call, in a fresh process."""
    proc = subprocess.run([sys.executable, str(BENCH_DIR / "_peak_memory.py"), json.dumps(spec)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"_peak_memory.py failed for {spec}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_cells(what: str, s: Settings, specs: Callable[[int], Dict[str, Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """For each of ``s.memory_prompt_lens``, :func:`_peak_memory` of the two variants ``specs(p)`` names (``{name:
    spec}``, the baseline first) and the baseline's peak and time over the other's."""
    cells = []
    for p in tqdm(s.memory_prompt_lens, desc=f"{what} memory", leave=False):
        (a, spec_a), (b, spec_b) = specs(p).items()
        cell: Dict[str, Any] = {"prompt_len": p, a: _peak_memory(spec_a), b: _peak_memory(spec_b)}
        cell[f"peak_ratio_{a}_vs_{b}"] = cell[a]["peak_bytes"] / max(cell[b]["peak_bytes"], 1)
        cell[f"time_ratio_{a}_vs_{b}"] = cell[a]["time_s"] / cell[b]["time_s"]
        print(f"  {what}, {s.memory_rows} rows of P={p}: " + ", ".join(
            f"{n} {cell[n]['peak_bytes'] / 2**20:.0f} MiB {cell[n]['time_s']:.2f} s" for n in (a, b)), flush=True)
        cells.append(cell)
    return cells


def compress_memory(shape: Dict[str, int], s: Settings, k: int, threads: int) -> Dict[str, Any]:
    """Peak memory and time of ``compress`` in one pass vs in chunks, each call in a fresh process."""
    base = {"op": "compress", "arch": _arch(shape, s.infer_max_seq_len), "rows": s.memory_rows, "k": k, "threads": threads}
    cells = _memory_cells("compress", s, lambda p: {
        "one_pass": {**base, "prompt_len": p, "chunk_size": p + k},
        "chunked": {**base, "prompt_len": p, "chunk_size": s.memory_chunk_size},
    })
    return {"shape": shape, "rows_per_call": s.memory_rows, "k": k, "chunk_size": s.memory_chunk_size, "cells": cells}


def score_memory(shape: Dict[str, int], s: Settings, k: int, threads: int) -> Dict[str, Any]:
    """Peak memory and time of lm-eval's ``loglikelihood`` scoring in ``gist`` mode: ``score_continuations`` (the
    prompt compressed, the continuation read after the K entries, in chunks) vs one full-sequence forward under the
    dense gist mask (the scoring it replaced), each call in a fresh process."""
    cont_len, scored = 2 * s.cont_len, s.cont_len  # an input of cont_len / 2 tokens, then the scored answer
    base = {"arch": _arch(shape, s.infer_max_seq_len), "rows": s.memory_rows, "k": k, "chunk_size": s.memory_chunk_size,
            "cont_len": cont_len, "scored": scored, "threads": threads}
    cells = _memory_cells("score", s, lambda p: {
        "dense": {**base, "op": "score_dense", "prompt_len": p},
        "stores": {**base, "op": "score", "prompt_len": p},
    })
    return {"shape": shape, "rows_per_call": s.memory_rows, "k": k, "chunk_size": s.memory_chunk_size,
            "cont_len": cont_len, "scored": scored, "cells": cells}


def bench_inference(s: Settings, tokenizer: Any, threads: int) -> Dict[str, Any]:
    """Section 3: KV bytes, prefill/compress, decode and latency; stock decode; reuse many; compression and scoring
    memory."""
    _section_header("3. inference")
    pad = tokenizer.pad_id
    main = inference_grid("gqa", s.infer_shape, s, s.ks, pad)
    attn = inference_grid("mha", s.attn_shape, s, (s.attn_k,), pad)
    stock = stock_decode(s.infer_shape, s, s.attn_k, pad)
    reuse = reuse_many(s.infer_shape, s, pad)
    batched = batched_decode(s.infer_shape, s, s.attn_k, pad)
    memory = compress_memory(s.infer_shape, s, s.attn_k, threads)
    scoring = score_memory(s.infer_shape, s, s.attn_k, threads)
    return {
        "max_seq_len": s.infer_max_seq_len, "batch_size": 1, "shapes": {"gqa": main, "mha": attn}, "stock": stock,
        "reuse": reuse, "batched": batched, "compress_memory": memory, "score_memory": scoring,
    }


# ---------------------------------------------------------------------------------------------
# Masks


def _packed_rows(b: int, s: int, doc_len: int, ids: List[int], gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """``b`` rows of ``s`` tokens packed with documents of ``doc_len`` tokens, each with its gist span a third in."""
    lens = [doc_len] * (s // doc_len) + ([s % doc_len] if s % doc_len else [])
    tokens = torch.randint(0, 256, (b, s), generator=gen)
    start = 0
    for n in lens:
        if n > len(ids) + 1:
            g = start + n // 3
            tokens[:, g : g + len(ids)] = torch.tensor(ids)
        start += n
    return tokens, document_ids_from_lengths([lens] * b, s)


def bench_masks(s: Settings, tokenizer: Any) -> Dict[str, Any]:
    """Section 4: building the dense gist mask (one example per row, and packed rows) vs a training step."""
    _section_header("4. mask construction")
    k, pad = s.num_gist_tokens_train, tokenizer.pad_id
    ids = gist_token_ids(tokenizer, k)
    model, opt = build_train_model(s.demo_shape, k, ids, max(seq for _, seq in s.mask_sizes))
    gen = torch.Generator().manual_seed(3)
    rows = []
    for b, seq in tqdm(s.mask_sizes, desc="masks", file=sys.stderr):
        single = torch.randint(0, 256, (b, seq), generator=gen)
        single[:, seq // 4 : seq // 4 + k] = torch.tensor(ids)
        packed, docs = _packed_rows(b, seq, s.mask_doc_len, ids, gen)
        builds = {
            "dense_gist": lambda: make_gist_mask(single, ids, pad_id=pad),
            "packed_gist": lambda: make_gist_mask(packed, ids, pad_id=pad, document_ids=docs),
        }
        times = interleaved(builds, reps=s.mask_reps, warmup=1)
        labels = packed.clone()
        batch = {"tokens": packed, "labels": labels, "mask": builds["packed_gist"](), "input_pos": torch.arange(seq).expand(b, seq)}
        t0 = time.perf_counter()
        train_step(model, opt, batch)
        step = time.perf_counter() - t0
        del batch
        row = {
            "batch": [b, seq],
            "mask_bytes": b * seq * seq,
            "build_s": times,
            "median_build_s": {n: median(t) for n, t in times.items()},
            "train_step_s": step,
        }
        row["share_of_step"] = {n: t / step for n, t in row["median_build_s"].items()}
        print(
            f"[{b}, {seq}, {seq}]: dense gist mask {row['median_build_s']['dense_gist']:.3f} s, packed "
            f"{row['median_build_s']['packed_gist']:.3f} s; demo-model step {step:.2f} s; share "
            f"{100 * row['share_of_step']['dense_gist']:.1f}% / {100 * row['share_of_step']['packed_gist']:.1f}%",
            flush=True,
        )
        rows.append(row)
        gc.collect()
    return {"model": _shape_name(s.demo_shape), "doc_len": s.mask_doc_len, "num_gist_tokens": k, "sizes": rows}


# ---------------------------------------------------------------------------------------------
# Goals, plots, report


def _fastest_ratio(step_s: Dict[str, List[float]], gist: str = "gist") -> float:
    """``mask=None`` / gist of the fastest step of each: a second estimate, less sensitive to bursts of load."""
    return min(step_s["causal_none"]) / min(step_s[gist])


def _spread(step_s: Dict[str, List[float]]) -> float:
    """Half the interquartile range of the step times over their median, the worst variant's."""
    out = 0.0
    for times in step_s.values():
        q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
        out = max(out, (q[2] - q[0]) / 2 / q[1])
    return out


def _variant_order(name: str) -> Tuple[int, int]:
    """batch_size_1, padded_bsN, packed_L and packed_L_segments (by L): JSON stores variants sorted by name."""
    if name == "batch_size_1":
        return (0, 0, 0)
    parts = name.split("_")
    number = int("".join(c for c in parts[1] if c.isdigit()))
    return (1 if parts[0] == "padded" else 2, number, int(parts[-1] == "segments"))


def evaluate_goals(res: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Each goal with its target, the measured value and whether it was met."""
    goals = []
    if "training" in res:
        for row in res["training"]["shapes"]:
            dense, segments = row["gist_vs_causal_none"], row["gist_segments_vs_causal_none"]
            r, variant = max((dense, "gist"), (segments, "gist_segments"))
            goals.append({
                "goal": f"training, {row['name']}: gist tokens/s vs causal (mask=None), medians, the faster gist mask format",
                "target": ">= 0.9x",
                "measured": f"{r:.3f}x with {'segments' if variant == 'gist_segments' else 'the dense mask'} (dense {dense:.3f}x, "
                f"segments {segments:.3f}x; fastest steps: {_fastest_ratio(row['step_s'], variant):.3f}x; step times spread "
                f"+-{100 * _spread(row['step_s']):.0f}%)",
                "met": r >= 0.9,
            })
    if "packing" in res:
        packed = {n: v for n, v in res["packing"]["variants"].items() if n.startswith("packed_")}
        lean = {n: v for n, v in packed.items() if v["padding_fraction"] < 0.1}
        name, pk = max((lean or packed).items(), key=lambda item: item[1]["speedup_vs_bs1"])
        goals.append({
            "goal": "packing tokens/s vs batch size 1, with < 10% padding (best packed row length under 10% padding)",
            "target": ">= 3x, < 10% padding",
            "measured": f"{name}: {pk['speedup_vs_bs1']:.2f}x, {100 * pk['padding_fraction']:.1f}% padding"
            + ("" if lean else " (no row length gave < 10% padding)"),
            "met": pk["speedup_vs_bs1"] >= 3 and pk["padding_fraction"] < 0.1,
        })
    if "inference" in res:
        inf = res["inference"]
        cells = [c for sh in inf["shapes"].values() for c in sh["cells"]]
        goals.append({
            "goal": "KV bytes gist / full prompt == (K + n) / (P + K + n) exactly, every P and K (and truncation == gist)",
            "target": "exact", "measured": f"{sum(c['kv_ratio']['exact'] and c['kv_truncate_equals_gist'] for c in cells)}/{len(cells)} exact",
            "met": all(c["kv_ratio"]["exact"] and c["kv_truncate_equals_gist"] for c in cells),
        })
        for name, sh in inf["shapes"].items():
            longest = max(c["prompt_len"] for c in sh["cells"])
            speedups = [c["decode_speedup_gist_vs_full"] for c in sh["cells"] if c["prompt_len"] == longest]
            r = median(speedups)
            spread = f" (K cells: {min(speedups):.2f}-{max(speedups):.2f}x)" if len(speedups) > 1 else ""
            goals.append({
                "goal": f"decode at {longest}-token prompts, {name} shape: full-prompt / gist-cache ms per token",
                "target": ">= 2x", "measured": f"{r:.2f}x{spread}", "met": r >= 2,
            })
        if "batched" in inf:
            b = inf["batched"]
            r = b["decode_speedup_gist_vs_full"]
            goals.append({
                "goal": f"decode at {b['prompt_len']}-token prompts, gqa shape, {b['rows']} rows per batch (each its own "
                "prompt): full-prompt / gist-cache ms per step",
                "target": ">= 2x", "measured": f"{r:.2f}x (K={b['k']})", "met": r >= 2,
            })
    return goals


def make_plots(res: Dict[str, Any], out: Path) -> List[str]:
    """Write the PNG plots; return their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    if "training" in res:
        shapes = res["training"]["shapes"]
        cols = min(3, len(shapes))
        rows = -(-len(shapes) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 4.2 * rows), squeeze=False, layout="constrained")
        for ax in axes.flat[len(shapes):]:
            ax.axis("off")
        labels = {"causal_none": "causal\nmask=None", "causal_dense": "causal\ndense mask", "gist": "gist\ndense mask",
                  "gist_segments": "gist\nsegments"}
        for ax, row in zip(axes.flat, shapes):
            names = list(labels)
            vals = [row["tokens_per_s"][n] for n in names]
            bars = ax.bar([labels[n] for n in names], vals, color=["#888", "#aab", "#c44", "#e83"])
            base = row["tokens_per_s"]["causal_none"]
            for bar, v in zip(bars, vals):
                ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v / base:.2f}x", ha="center", va="bottom")
            ax.set_title(f"{row['name']}\nbatch {row['batch'][0]}x{row['batch'][1]}", fontsize=9)
            ax.set_ylabel("training tokens/s (real tokens)")
            ax.tick_params(axis="x", labelsize=8)
        fig.suptitle("Training step throughput (CPU, fp32)")
        files.append(save_png(fig, out / "train_throughput.png").name)
    if "packing" in res:
        pk = res["packing"]["variants"]
        names = sorted(pk, key=_variant_order)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
        colors = ["#888" if n == "batch_size_1" else "#aab" if n.startswith("padded") else "#e83" if n.endswith("segments")
                  else "#4a4" for n in names]
        bars = a1.bar(names, [pk[n]["tokens_per_s"] for n in names], color=colors)
        for bar, n in zip(bars, names):
            a1.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{pk[n]['speedup_vs_bs1']:.1f}x", ha="center", va="bottom")
        a1.set_ylabel("training tokens/s (real tokens)")
        a2.bar(names, [100 * pk[n]["padding_fraction"] for n in names], color=colors)
        a2.axhline(10, color="k", ls="--", lw=0.8)
        a2.set_ylabel("padding %")
        for ax in (a1, a2):
            ax.tick_params(axis="x", labelsize=8, labelrotation=40)
            plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")
        fig.suptitle(f"Same {res['packing']['examples']} examples ({res['packing']['real_tokens']:,} real tokens)")
        files.append(save_png(fig, out / "packing.png").name)
    if "inference" in res:
        inf = res["inference"]
        main = inf["shapes"]["gqa"]
        ks = sorted({c["k"] for c in main["cells"]})
        k_ref = inf["shapes"]["mha"]["cells"][0]["k"]
        fig, ax = plt.subplots(figsize=(6, 4))
        full = [c for c in main["cells"] if c["k"] == k_ref]
        ax.plot([c["prompt_len"] for c in full], [c["full"]["kv_bytes"] for c in full], "o-", color="k", label=f"full prompt (K={k_ref})")
        for k in ks:
            cs = [c for c in main["cells"] if c["k"] == k]
            ax.plot([c["prompt_len"] for c in cs], [c["gist"]["kv_bytes"] for c in cs], "s-", label=f"gist cache, K={k}")
        ax.plot([c["prompt_len"] for c in full], [c["truncate"]["kv_bytes"] for c in full], "x--", color="gray", label=f"truncation, K={k_ref}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt length P (tokens)")
        ax.set_ylabel("KV bytes held while generating")
        ax.set_title(f"KV bytes, gqa shape, n = {main['n']} continuation + generated tokens", fontsize=9)
        ax.legend(fontsize=7)
        files.append(save_png(fig, out / "kv_bytes.png").name)

        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
        for ax, (name, sh) in zip(axes, inf["shapes"].items()):
            cs = [c for c in sh["cells"] if c["k"] == k_ref]
            x = [c["prompt_len"] for c in cs]
            for key, style, label in (("full", "o-k", "full prompt"), ("gist", "s-r", "gist cache"), ("truncate", "x--", "truncation")):
                ax.plot(x, [1e3 * c[key]["decode_s_per_token"] for c in cs], style, label=label)
            if name == "gqa" and inf["stock"]:
                ax.plot([r["prompt_len"] for r in inf["stock"]], [1e3 * r["decode_s_per_token"] for r in inf["stock"]], "^:b",
                        label=f"torchtune stock, cache {inf['max_seq_len']} slots")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("prompt length P (tokens)")
            ax.set_ylabel("decode ms / token (batch 1)")
            ax.set_title(f"{name}: {sh['shape']['num_heads']} heads / {sh['shape']['num_kv_heads']} KV heads, K={k_ref}", fontsize=9)
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7)
        files.append(save_png(fig, out / "decode.png").name)

        rv = inf["reuse"]["variants"]
        names = list(REUSE_VARIANTS)
        fig, ax = plt.subplots(figsize=(6, 3.6))
        bars = ax.bar(["recompute\nfull prompt", "compress once,\nreuse (sequential)", "compress once,\nreuse (batched)"],
                      [rv[n]["inputs_per_s"] for n in names], color=["#888", "#c44", "#a22"])
        for bar, n in zip(bars, names):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{rv[n]['speedup']:.1f}x", ha="center", va="bottom")
        ax.set_ylabel("inputs / s")
        r = inf["reuse"]
        ax.set_title(f"One {r['prompt_len']}-token prompt, {r['inputs']} inputs, {r['new_tokens']} new tokens each", fontsize=9)
        files.append(save_png(fig, out / "reuse_many.png").name)

        if "compress_memory" in inf:
            cm = inf["compress_memory"]
            variants = (("one_pass", "o-k", "one pass"), ("chunked", "s-r", f"chunks of {cm['chunk_size']}"))
            title = f"compress: {cm['rows_per_call']} prompts per call, K={cm['k']}, gqa shape (CPU, fp32)"
            files.append(_memory_plot(cm["cells"], variants, "compress time (s)", title, out / "compress_memory.png"))
        if "score_memory" in inf:
            sm = inf["score_memory"]
            variants = (("dense", "o-k", "one forward, dense gist mask"), ("stores", "s-r", "score_continuations"))
            title = (f"loglikelihood (gist mode): {sm['rows_per_call']} requests per call, {sm['scored']} of "
                     f"{sm['cont_len']} continuation tokens scored, K={sm['k']}, gqa shape (CPU, fp32)")
            files.append(_memory_plot(sm["cells"], variants, "scoring time (s)", title, out / "score_memory.png"))
    return files


def _memory_plot(cells: List[Dict[str, Any]], variants: Sequence[Tuple[str, str, str]], time_label: str, title: str,
                 path: Path) -> str:
    """Peak memory and time against the prompt length, one line per ``(key, style, label)`` variant."""
    import matplotlib.pyplot as plt  # after make_plots chose the Agg backend

    x = [c["prompt_len"] for c in cells]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    for key, style, label in variants:
        a1.plot(x, [c[key]["peak_bytes"] / 2**20 for c in cells], style, label=label)
        a2.plot(x, [c[key]["time_s"] for c in cells], style, label=label)
    for ax, ylabel in ((a1, "peak memory above baseline (MiB)"), (a2, time_label)):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length P (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_png(fig, path).name


def _ms(x: float) -> str:
    return fmt(1e3 * x)


def render_cpu_markdown(res: Dict[str, Any]) -> str:
    """The CPU section of RESULTS.md from ``results_cpu.json``."""
    m = res["meta"]
    mach = m["machine"]
    la0, la1 = m.get("load_before"), m.get("load_after")
    loaded = any(la is not None and la[0] > mach["cores"] for la in (la0, la1)) or any(
        la is not None and la[0] > mach["cores"] for la in m.get("load_sections", {}).values()
    )
    out = [
        "## CPU" + (" (quick smoke run: sizes too small to mean anything)" if m["quick"] else ""),
        "",
        f"- Date: {mach['date']}",
        f"- Machine: {mach['cpu_model']}, {mach['cores']} cores, {mach['memory_gib']} GiB; torch {mach['torch']} "
        f"(Python {mach['python']}), fp32; `torch.set_num_threads({mach['torch_threads']})`.",
        f"- Command: `{m['command']}` ({fmt(m['duration_s'])} s)",
        f"- Load average (1/5/15 min) before: {la0}, after: {la1}, at each section: {m.get('load_sections')}. "
        + ("**The machine was loaded** (other jobs shared the CPU during the run): absolute numbers are low and noisy; "
           "ratios compare variants measured side by side, interleaved." if loaded else "The machine was otherwise idle."),
        f"- Threads: {m['threads_note']}",
        "- Method: every comparison is measured in this run, variants interleaved (A B C A B C ...) after a warm-up, "
        "medians of the timed repetitions; goals are ratios of numbers measured together.",
        "",
        "### Goals",
        "",
        table(["goal", "target", "measured", "met"], [[g["goal"], g["target"], g["measured"], g["met"]] for g in res["goals"]]),
        "",
    ]
    if "training" in res:
        tr = res["training"]
        out += [
            "### 1. Training cost of the gist mask",
            "",
            f"One optimizer step of the recipe (`masked_loss`, backward, AdamW on LoRA q/k/v/output rank 16 + K={tr['num_gist_tokens']} "
            "gist rows), collation included (as the recipe's data loader does it in-process): `padded_gist_collate` (gist: dense "
            "`[b, s, s]` gist mask; gist segments: `segment_mask=True`, the recipe's `mask_format: segments`, causal SDPA per "
            "segment; dense causal: `mask_mode=pos_control`) or torchtune's `padded_collate_sft` (`mask=None`: "
            "torchtune's causal SDPA path, `is_causal=True`). Same model, batch and optimizer; tokens/s counts real tokens.",
            "",
            table(
                ["shape", "params", "batch", "real tokens", "data", "mask=None tok/s", "dense causal tok/s", "gist tok/s",
                 "gist segments tok/s", "gist / mask=None", "gist segments / mask=None", "gist / dense causal",
                 "gist / mask=None, fastest steps", "step-time spread"],
                [[r["name"], r["params"], f"{r['batch'][0]}x{r['batch'][1]}", r["real_tokens_per_step"], r["data"],
                  r["tokens_per_s"]["causal_none"], r["tokens_per_s"]["causal_dense"], r["tokens_per_s"]["gist"],
                  r["tokens_per_s"]["gist_segments"], f"{r['gist_vs_causal_none']:.3f}x", f"{r['gist_segments_vs_causal_none']:.3f}x",
                  f"{r['gist_vs_causal_dense']:.3f}x", f"{_fastest_ratio(r['step_s']):.3f}x", f"+-{100 * _spread(r['step_s']):.0f}%"]
                 for r in tr["shapes"]],
            ),
            "",
            "Ratios are of median step times (the goal) and, as a check, of the fastest step of each variant; the "
            "spread is half the interquartile range of a variant's step times over its median (the worst variant's), "
            "a rough measure of how far load alone moves a median. Median step seconds: " + "; ".join(
                f"{r['name']}: " + ", ".join(f"{k} {v:.4f}" for k, v in r["median_step_s"].items()) for r in tr["shapes"]
            ) + ". On CPU, SDPA with `is_causal=True` skips the upper triangle (in key blocks of 512); with any explicit "
            "mask it computes every block and applies the mask, so both dense masks cost the same and the gap to `mask=None` "
            "grows with the attention share of the step (longer rows, wider models). Segments cut the gist mask into causal "
            "SDPA calls per row (prompt and gists; gists and what follows), which skip the masked blocks too: for rows of "
            "512 tokens and more they come close to `mask=None`; for short rows the per-row calls cost more than they skip "
            "and the dense mask is the faster choice (the recipe's `mask_format: auto` picks segments from 512 positions on "
            "CPU, dense below). On CUDA the gist mask goes through FlexAttention "
            "`BlockMask`s, which skip masked blocks (see the GPU section).",
            "",
            "![training throughput](train_throughput.png)",
            "",
        ]
    if "packing" in res:
        pk = res["packing"]
        out += [
            "### 2. Batching and packing",
            "",
            f"{pk['examples']} examples ({pk['data']}), {pk['real_tokens']:,} real tokens, processed once by each variant "
            f"({pk['model']}; one optimizer step per batch; collation with the gist mask included; variants interleaved in "
            "chunks). Padded batches keep the data order (no length bucketing); packed rows hold whole examples "
            "(`PackedGistDataset`, no attention across documents, one gist span per document), with the dense mask or, "
            "`packed_<L>_segments`, with segment masks (`segment_mask=True`).",
            "",
            table(
                ["variant", "steps", "token slots", "padding", "attention work (q-k pairs) vs bs 1", "time s", "tokens/s",
                 "vs batch size 1"],
                [[n, v["steps"], v["token_slots"], f"{100 * v['padding_fraction']:.1f}%", f"{v['qk_pairs_vs_bs1']:.1f}x",
                  v["time_s"], v["tokens_per_s"], f"{v['speedup_vs_bs1']:.2f}x"]
                 for n, v in sorted(pk["variants"].items(), key=lambda item: _variant_order(item[0]))],
            ),
            "",
            "Attention work counts the query-key pairs the attention calls span: `b * s^2` per step for a dense `[b, s, s]` "
            "mask (a packed row computes attention between all its documents and masks most of it away, so its attention "
            "work grows with the row length), the sum of the causal blocks' squares for segment masks (which compute each "
            "document alone). On a CPU a step's cost follows its arithmetic, and a batch-size-1 step of a few hundred "
            "tokens already keeps the core busy, so packing saves only per-step overhead and padding: with dense masks it "
            "pays more for the masked-away attention than it saves, with segments it gains a little. On a GPU, batch "
            "size 1 leaves the device mostly idle and FlexAttention `BlockMask`s skip the masked blocks, which is where "
            "packing pays (`bench_gpu.py` measures the attention side).",
            "",
            "![packing](packing.png)",
            "",
        ]
    if "inference" in res:
        out += _render_inference(res["inference"])
    if "masks" in res:
        mk = res["masks"]
        out += [
            "### 4. Mask construction cost",
            "",
            f"`make_gist_mask` for one example per row (gist span a quarter in) and for packed rows (documents of "
            f"{mk['doc_len']} tokens, each with its own K={mk['num_gist_tokens']} span; `document_ids`), as a share of one "
            f"training step of the demo-shaped model ({mk['model']}) on the packed batch of that size (one step, timed "
            "once; the model is already warm from smaller batches). The dense `[b, s, s]` mask is built once per batch "
            "by the collator and shared by all layers.",
            "",
            table(
                ["mask", "bool bytes", "dense gist build s", "packed gist build s", "train step s", "dense share", "packed share"],
                [[f"[{r['batch'][0]}, {r['batch'][1]}, {r['batch'][1]}]", r["mask_bytes"], r["median_build_s"]["dense_gist"],
                  r["median_build_s"]["packed_gist"], r["train_step_s"], f"{100 * r['share_of_step']['dense_gist']:.1f}%",
                  f"{100 * r['share_of_step']['packed_gist']:.1f}%"] for r in mk["sizes"]],
            ),
            "",
        ]
    return "\n".join(out)


def _render_inference(inf: Dict[str, Any]) -> List[str]:
    main, attn = inf["shapes"]["gqa"], inf["shapes"]["mha"]
    n = main["n"]
    out = [
        "### 3. Inference: full prompt vs gist cache vs truncation",
        "",
        f"Batch 1, fp32, greedy; continuation of {main['cont_len']} tokens and {main['new_tokens']} new tokens, so "
        f"n = {n} continuation + generated tokens held beside the prompt's KV (the last new token is never fed back). "
        "Everything goes through `torchtune_gist.generation`: full prompt = `generate(mode='pos_control')`, gist = "
        "`compress` then `generate_from_cache`, truncation = `generate(mode='truncate')` (the prompt's last K tokens). "
        "Prefill = from the call to the first decode step (includes the first token); decode = median time between "
        "decode forwards (one whole step each); end-to-end for gist includes `compress`."
        + (f" At the longest prompt (the cells the decode goals read) the three run {rounds} times, interleaved, and "
           "each variant's call with the median decode time counts (single calls varied by a third between reruns)."
           if (rounds := max(c.get("rounds", 1) for c in main["cells"])) > 1 else ""),
        "",
    ]
    for name, sh, why in (
        ("gqa", main, "Llama 3.1's layout: grouped-query attention"),
        ("mha", attn, "one KV head per query head: more KV bytes per token"),
    ):
        out += [
            f"#### Shape `{name}`: {sh['shape']['num_layers']} layers, width {sh['shape']['embed_dim']}, "
            f"{sh['shape']['num_heads']} heads / {sh['shape']['num_kv_heads']} KV heads of size "
            f"{sh['shape']['embed_dim'] // sh['shape']['num_heads']}, MLP {sh['shape']['intermediate_dim']} "
            f"({sh['params']:,} parameters, {sh['weight_bytes'] / 2**20:.0f} MiB of fp32 weights; {sh['kv_bytes_per_token']:,} "
            f"KV bytes per token) — {why}",
            "",
            table(
                ["P", "K", "KV full", "KV gist", "KV trunc", "gist/full (exact)", "== (K+n)/(P+K+n)", "prefill full ms",
                 "compress ms", "prefill trunc ms", "decode full ms/tok", "decode gist ms/tok", "decode trunc ms/tok",
                 "full / gist decode", "e2e full ms", "e2e gist ms (incl. compress)", "e2e gist from cache ms", "e2e trunc ms"],
                [[c["prompt_len"], c["k"], c["full"]["kv_bytes"], c["gist"]["kv_bytes"], c["truncate"]["kv_bytes"],
                  c["kv_ratio"]["measured"], c["kv_ratio"]["exact"], _ms(c["full"]["prefill_s"]), _ms(c["gist"]["compress_s"]),
                  _ms(c["truncate"]["prefill_s"]), _ms(c["full"]["decode_s_per_token"]), _ms(c["gist"]["decode_s_per_token"]),
                  _ms(c["truncate"]["decode_s_per_token"]), f"{c['decode_speedup_gist_vs_full']:.2f}x", _ms(c["full"]["e2e_s"]),
                  _ms(c["gist"]["e2e_s"]), _ms(c["gist"]["e2e_from_cache_s"]), _ms(c["truncate"]["e2e_s"])]
                 for c in sh["cells"]],
            ),
            "",
        ]
    weights = main["weight_bytes"]
    longest = max(c["prompt_len"] for c in main["cells"])
    kv_long = main["kv_bytes_per_token"] * longest
    kv_long_mha = attn["kv_bytes_per_token"] * longest
    out += [
        "Where the time goes: a batch-1 decode step reads every weight once "
        f"({weights / 2**20:.0f} MiB here) plus the KV it attends to. At P = {longest} the full prompt's KV is "
        f"{kv_long / 2**20:.0f} MiB in the `gqa` shape ({kv_long / weights:.2f}x the weights) and "
        f"{kv_long_mha / 2**20:.0f} MiB in the `mha` shape ({kv_long_mha / attn['weight_bytes']:.2f}x its weights), so the "
        "gist cache can at best remove that share of the step: batch-1 decoding stays "
        "weight-bound while the prompt's KV is small beside the weights, and the gain grows with the KV heads, the "
        "prompt length and the batch (KV is per row, weights are shared), where attention dominates. Fixed per-step "
        "costs (Python, per-layer dispatch) also count against both equally.",
        "",
        "![KV bytes](kv_bytes.png)",
        "",
        "![decode](decode.png)",
        "",
    ]
    if "batched" in inf:
        b = inf["batched"]
        out += [
            f"#### Batched decode: {b['rows']} rows, each with its own {b['prompt_len']}-token prompt, K={b['k']} (`gqa` shape)",
            "",
            table(
                ["variant", "KV bytes held", "prefill / compress ms", "decode ms/step (all rows)", "full / gist decode"],
                [["full prompt", b["full"]["kv_bytes"], _ms(b["full"]["prefill_s"]), _ms(b["full"]["decode_s_per_step"]), "1.00x"],
                 ["gist cache", b["gist"]["kv_bytes"], _ms(b["gist"]["compress_s"]), _ms(b["gist"]["decode_s_per_step"]),
                  f"{b['decode_speedup_gist_vs_full']:.2f}x"]],
            ),
            "",
            "A decode step reads the weights once for all rows, and each row's own prompt KV: with several rows (a server's "
            "usual case) the prompts' KV outweighs the weights and dropping it pays most."
            + (f" Each side ran {b['rounds']} times, interleaved; the table gives the median call (median steps per call: "
               f"full {', '.join(_ms(x) for x in b['full']['decode_s_per_step_each_round'])} ms, gist "
               f"{', '.join(_ms(x) for x in b['gist']['decode_s_per_step_each_round'])} ms)." if "rounds" in b else ""),
            "",
        ]
    if inf["stock"]:
        out += [
            f"#### torchtune's stock decode (`torchtune.generation.generate`, `setup_caches` at the model's full "
            f"`max_seq_len` = {inf['max_seq_len']} slots, `gqa` shape, plain causal)",
            "",
            table(
                ["P", "cache slots", "KV bytes", "prefill ms", "decode ms/tok", "ours, full prompt: decode ms/tok", "stock / ours"],
                [[r["prompt_len"], r["cache_slots"], r["kv_bytes"], _ms(r["prefill_s"]), _ms(r["decode_s_per_token"]),
                  _ms(ours), f"{r['decode_s_per_token'] / ours:.2f}x"]
                 for r in inf["stock"]
                 for ours in [next(c["full"]["decode_s_per_token"] for c in main["cells"]
                                   if c["prompt_len"] == r["prompt_len"] and c["k"] == r["k"])]],
            ),
            "",
            "torchtune's cached attention attends over every allocated slot and expands the keys/values of all of them "
            "for grouped-query attention at every step, so its per-token cost follows the allocated length, not the prompt.",
            "",
        ]
    r = inf["reuse"]
    out += [
        f"#### Compress once, reuse many (`gqa` shape, one {r['prompt_len']}-token prompt, K={r['k']}, {r['inputs']} inputs "
        f"of {r['cont_len']} tokens, {r['new_tokens']} new tokens each; compression time included)",
        "",
        table(
            ["variant", "time s", "inputs/s", "speedup", "KV bytes held (largest call)"],
            [[n, v["time_s"], v["inputs_per_s"], f"{v['speedup']:.2f}x", v["kv_bytes_held"]]
             for n, v in ((n, r["variants"][n]) for n in REUSE_VARIANTS)],
        ),
        "",
        "![reuse many](reuse_many.png)",
        "",
    ]
    if "compress_memory" in inf:
        cm = inf["compress_memory"]
        out += [
            f"#### Memory of `compress`: one pass vs chunks of {cm['chunk_size']} tokens (`gqa` shape, {cm['rows_per_call']} "
            f"prompts per call, K={cm['k']})",
            "",
            _memory_table(cm["cells"], ("one_pass", "one pass"), ("chunked", "chunked")),
            "",
            "Each call runs in a fresh process (`benchmarks/_peak_memory.py`); peak = the resident set's high-water mark "
            "above the resident set just before the call. `compress` goes layer by layer (one layer's prompt keys/values "
            "held at a time) and, within a layer, `chunk_size` tokens per pass; one pass = `chunk_size` >= the prompt. A "
            "pass of `c` tokens over `t` cached ones builds a `[b, c, t]` mask (folded to `[b, 1, g*c, t]` for grouped-query "
            "attention) and scores of that size, so one pass grows with the square of the prompt, chunks with the prompt. "
            "Chunks also skip the masked upper half of the score matrix a single pass computes.",
            "",
            "![compress memory](compress_memory.png)",
            "",
        ]
    if "score_memory" in inf:
        sm = inf["score_memory"]
        out += [
            f"#### Memory of lm-eval's `loglikelihood` scoring (gist mode): one full-sequence forward vs "
            f"`score_continuations` (`gqa` shape, {sm['rows_per_call']} requests per call, {sm['scored']} of "
            f"{sm['cont_len']} continuation tokens scored, K={sm['k']}, chunks of {sm['chunk_size']})",
            "",
            _memory_table(sm["cells"], ("dense", "dense forward"), ("stores", "score_continuations")),
            "",
            "Same process protocol as above. The dense forward is how `loglikelihood` scored before "
            "`score_continuations`: one pass over `[BOS] prompt G continuation` under the `[b, s, s]` gist mask (logits "
            "only at the scored positions). `score_continuations` compresses the prompt as `compress` does, then feeds "
            "the continuation after the K gist entries and computes logits only where tokens are scored: the scores "
            "are the same (tests/test_generation.py compares them with full-sequence references).",
            "",
            "![score memory](score_memory.png)",
            "",
        ]
    return out


def _memory_table(cells: List[Dict[str, Any]], baseline: Tuple[str, str], other: Tuple[str, str]) -> str:
    """The table of :func:`_memory_cells`' cells; ``baseline`` and ``other`` are ``(key, column label)``."""
    (a, la), (b, lb) = baseline, other
    return table(
        ["P", f"{la}: peak MiB", f"{lb}: peak MiB", f"{la} / {lb} (memory)", f"{la} s", f"{lb} s", f"{la} / {lb} (time)"],
        [[c["prompt_len"], fmt(c[a]["peak_bytes"] / 2**20), fmt(c[b]["peak_bytes"] / 2**20),
          f"{c[f'peak_ratio_{a}_vs_{b}']:.2f}x", fmt(c[a]["time_s"]), fmt(c[b]["time_s"]), f"{c[f'time_ratio_{a}_vs_{b}']:.2f}x"]
         for c in cells],
    )


THREADS_NOTE = (
    "one thread by default (`--threads 1`): the CPU is shared with other jobs, and a two-thread OpenMP team stalls "
    "whenever the other core is busy (measured while developing this script under a load average near 4: the demo "
    "training step took 0.41 s on one thread and 11.8 s on two). Use `--threads 2` on an idle machine."
)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the CPU benchmarks, write results_cpu.json, the PNG plots and RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for the smoke test; writes to outputs/bench_quick by default")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: benchmarks/, or outputs/bench_quick with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1, see RESULTS.md)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help=f"Alpaca+ folder (default {DEFAULT_DATA_DIR})")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})")
    parser.add_argument("--render-only", action="store_true", help="measure nothing: redo goals, plots and RESULTS.md from --out's results_cpu.json")
    args = parser.parse_args(argv)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    out = args.out or (REPO / "outputs" / "bench_quick" if args.quick else BENCH_DIR)
    out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        if not (out / CPU_JSON).is_file():
            parser.error(f"--render-only: no {CPU_JSON} in {out}")
        res = json.loads((out / CPU_JSON).read_text())
        return _finish(res, out)
    s = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    res: Dict[str, Any] = {
        "meta": {
            "machine": machine_info(args.threads),
            "command": command_line(),
            "quick": args.quick,
            "settings": asdict(s),
            "load_before": load_average(),
            "load_sections": {},
            "threads_note": THREADS_NOTE,
        }
    }
    with tempfile.TemporaryDirectory() as tmp:
        model_path, special_path = write_tiny_tokenizer(tmp)
        tokenizer = llama3_tokenizer(str(model_path), special_tokens_path=str(special_path))
        runs = {
            "training": lambda: bench_training(s, tokenizer, args.data_dir),
            "packing": lambda: bench_packing(s, tokenizer, args.data_dir),
            "inference": lambda: bench_inference(s, tokenizer, args.threads),
            "masks": lambda: bench_masks(s, tokenizer),
        }
        for name in SECTIONS:
            if name in only:
                res["meta"]["load_sections"][name] = load_average()
                res[name] = runs[name]()
    res["meta"]["load_after"] = load_average()
    res["meta"]["duration_s"] = time.perf_counter() - t_start
    return _finish(res, out)


def _finish(res: Dict[str, Any], out: Path) -> Dict[str, Any]:
    """Goals, plots, ``results_cpu.json`` and ``RESULTS.md`` from the measured numbers."""
    res["goals"] = evaluate_goals(res)
    res["plots"] = make_plots(res, out)
    write_json(res, out / CPU_JSON)
    report = render_results(out)
    print("\nGoals:")
    for g in res["goals"]:
        print(f"  [{'met' if g['met'] else 'NOT met'}] {g['goal']}: {g['measured']} (target {g['target']})")
    print(f"\nWrote {out / CPU_JSON}, {report} and {', '.join(res['plots'])} in {res['meta']['duration_s']:.0f} s")
    return res


if __name__ == "__main__":
    main()
