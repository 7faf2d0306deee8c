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
(timings do not depend on trained weights); fp32, ``torch.set_num_threads(--threads)``. This file measures;
``_cpu_report.py`` turns the numbers into goals, plots and the RESULTS.md section (``--render-only`` redoes that alone).
"""

import argparse
import gc
import json
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
from _common import (
    CPU_JSON,
    command_line,
    decode_split,
    forward_stamps,
    interleaved,
    load_average,
    machine_info,
    median,
    render_results,
    write_json,
)
from _cpu_report import REUSE_VARIANTS, evaluate_goals, make_plots
from torch.nn.attention.flex_attention import BlockMask
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, padded_collate_sft
from torchtune.generation import generate as torchtune_generate
from torchtune.models.llama3 import llama3_tokenizer
from torchtune.models.llama3_1 import llama3_1
from torchtune.modules.common_utils import delete_kv_caches
from tqdm import tqdm

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
from torchtune_gist.modules import init_gist_embeddings, set_trainable_params
from torchtune_gist.segment_masks import GistSegmentMask
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

    train_shapes: Tuple[
        Tuple[str, Dict[str, int], int, Optional[int]], ...
    ]  # name, shape, batch, passkey context (None: Alpaca+)
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
    memory_in_process: bool  # measure peak memory in this process: quicker, less clean (the smoke test's)


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
    memory_in_process=False,
)

QUICK = Settings(
    train_shapes=(
        ("quick (2L, d64, 4/2 heads), Alpaca+", QUICK_SHAPE, 2, None),
        ("quick, passkey 128", QUICK_SHAPE, 2, 128),
    ),
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
    memory_in_process=True,
)

SECTIONS = ("training", "packing", "inference", "masks")


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
                tokenizer,
                data_dir=data_dir,
                split="validation_seen",
                num_gist_tokens=k,
                max_seq_len=max_len,
                truncation="drop",
                max_examples=max_records,
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


def build_train_model(
    shape: Dict[str, int], k: int, ids: List[int], max_seq_len: int
) -> Tuple[torch.nn.Module, torch.optim.Optimizer]:
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
            ds = gist_passkey_dataset(
                tokenizer, num_gist_tokens=k, num_samples=batch_size, context_tokens=context, seed=0
            )
            examples = [{"tokens": ds[i]["tokens"], "labels": ds[i]["labels"]} for i in range(batch_size)]
            source = f"generated passkey examples, {context}-token contexts"
        model, opt = build_train_model(shape, k, ids, max(s.max_example_len, 2 * (context or 0)))
        gist_collate = partial(padded_gist_collate, gist_token_ids=ids, pad_id=pad)
        variants: Dict[str, Callable[[], Any]] = {
            "gist": lambda: train_step(model, opt, gist_collate(examples)),
            "gist_segments": lambda: train_step(model, opt, gist_collate(examples, segment_mask=True)),
            "causal_none": lambda: train_step(
                model, opt, padded_collate_sft(examples, padding_idx=pad, ignore_idx=IGNORE)
            ),
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
            f"mask=None {row['tokens_per_s']['causal_none']:.0f}, dense causal "
            f"{row['tokens_per_s']['causal_dense']:.0f}; gist segments {row['tokens_per_s']['gist_segments']:.0f}; "
            f"gist/causal(None) = {row['gist_vs_causal_none']:.3f}x (dense mask), "
            f"{row['gist_segments_vs_causal_none']:.3f}x (segments)",
            flush=True,
        )
        shapes.append(row)
        gc.collect()
    return {"num_gist_tokens": k, "shapes": shapes}


def packing_plans(
    examples: List[Dict[str, Any]],
    ids: List[int],
    pad: int,
    *,
    batch_size: int,
    row_lens: Sequence[int],
    segment_row_lens: Sequence[int] = (),
    block_mask_device: Optional[torch.device] = None,
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
    pcollate = partial(
        padded_gist_collate,
        gist_token_ids=ids,
        pad_id=pad,
        **blocks,
        pad_to_multiple_of=FLEX_BLOCK_SIZE if block_mask_device is not None else 1,
    )
    kcollate = partial(packed_gist_collate, gist_token_ids=ids, pad_id=pad, **blocks)
    plans: Dict[str, List[Callable[[], Dict[str, Any]]]] = {
        "batch_size_1": [partial(pcollate, [ex]) for ex in examples],
        f"padded_bs{batch_size}": [
            partial(pcollate, examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)
        ],
    }
    for row_len in row_lens:
        packed = PackedGistDataset(examples, max_seq_len=row_len, pad_id=pad)
        plans[f"packed_{row_len}"] = [partial(kcollate, [packed[i]]) for i in range(len(packed))]
        if row_len in segment_row_lens:
            plans[f"packed_{row_len}_segments"] = [
                partial(kcollate, [packed[i]], segment_mask=True) for i in range(len(packed))
            ]
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
        blocks = mask.kv_num_blocks.sum() + (
            mask.full_kv_num_blocks.sum() if mask.full_kv_num_blocks is not None else 0
        )
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


def packing_summary(
    stats: Dict[str, Dict[str, Any]], times: Dict[str, float], real_total: int
) -> Dict[str, Dict[str, Any]]:
    """Add time, tokens/s and the ratios to batch size 1 to each variant's numbers (and print them)."""
    base = stats["batch_size_1"]
    for name, st in stats.items():
        st["time_s"] = times[name]
        st["tokens_per_s"] = real_total / times[name]
        st["speedup_vs_bs1"] = times["batch_size_1"] / times[name]
        st["qk_pairs_vs_bs1"] = st["qk_pairs"] / base["qk_pairs"]
        print(
            f"{name}: {st['steps']} steps, padding {st['padding_fraction']:.3f}, attention work "
            f"{st['qk_pairs_vs_bs1']:.1f}x, {st['tokens_per_s']:.0f} tokens/s, "
            f"{st['speedup_vs_bs1']:.2f}x batch size 1",
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
        "truncate": lambda: generate(
            model, [prompt], [cont], mode="truncate", max_new_tokens=new_tokens, pad_id=pad_id
        ),
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
            runs[name].append(
                {
                    "kv_bytes": res.kv_bytes,
                    "kv_slots": res.kv_slots,
                    "prefill_s": prefill,
                    "decode_s_per_token": decode,
                    "decode_intervals": n_steps,
                    "e2e_s": t2 - t1,
                }
            )
    out: Dict[str, Any] = {"rounds": rounds}
    for name, results in runs.items():
        out[name] = {
            **sorted(results, key=lambda r: r["decode_s_per_token"])[len(results) // 2],
            "decode_s_per_token_each_round": [r["decode_s_per_token"] for r in results],
        }
    gist = out["gist"]
    gist.update(
        cache_bytes=cache.nbytes,
        compress_s=compress_s,
        e2e_from_cache_s=gist["e2e_s"],
        e2e_s=compress_s + gist["e2e_s"],
    )
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


def inference_grid(name: str, shape: Dict[str, int], s: Settings, ks: Sequence[int], pad_id: int) -> Dict[str, Any]:
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
                cell = {
                    "prompt_len": p,
                    "k": k,
                    **run_cell(model, prompt, cont, k=k, new_tokens=s.new_tokens, pad_id=pad_id, rounds=rounds),
                }
                r = cell["kv_ratio"]
                tqdm.write(
                    f"[{name}] P={p:5d} K={k:2d}: KV gist/full = {cell['gist']['kv_bytes']}/{cell['full']['kv_bytes']} "
                    f"= {r['measured']} == (K+n)/(P+K+n) = ({k}+{n})/({p}+{k}+{n}) = {r['expected']}: {r['exact']}; "
                    f"decode ms/token full {1e3 * cell['full']['decode_s_per_token']:.1f}, "
                    f"gist {1e3 * cell['gist']['decode_s_per_token']:.1f}, trunc "
                    f"{1e3 * cell['truncate']['decode_s_per_token']:.1f}",
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
            layer.attn.kv_cache.k_cache.numel() * 4 + layer.attn.kv_cache.v_cache.numel() * 4 for layer in model.layers
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

    def recompute(inputs: List[List[int]]) -> int:
        return max(generate(model, [prompt], [c], mode="pos_control", **gen_kwargs).kv_bytes for c in inputs)

    def reuse_sequential(inputs: List[List[int]]) -> int:
        cache = compress(model, [prompt], pad_id=pad_id)
        return max(generate_from_cache(model, cache, [c], **gen_kwargs).kv_bytes for c in inputs)

    def reuse_batched(inputs: List[List[int]]) -> int:
        cache = compress(model, [prompt], pad_id=pad_id)
        return generate_from_cache(model, cache, inputs, **gen_kwargs).kv_bytes

    out: Dict[str, Any] = {
        "prompt_len": s.reuse_prompt_len,
        "k": k,
        "inputs": s.reuse_inputs,
        "cont_len": s.cont_len,
        "new_tokens": s.new_tokens,
        "variants": {},
    }
    fns = {
        "recompute_full_prompt": recompute,
        "compress_once_reuse_sequential": reuse_sequential,
        "compress_once_reuse_batched": reuse_batched,
    }
    for fn in fns.values():  # a warm-up on one input each: first-call costs land on no variant
        fn(conts[:1])
    for name in tqdm(REUSE_VARIANTS, desc="reuse many", file=sys.stderr):
        fn = fns[name]
        t0 = time.perf_counter()
        kv = fn(conts)
        dt = time.perf_counter() - t0
        out["variants"][name] = {"time_s": dt, "inputs_per_s": s.reuse_inputs / dt, "kv_bytes_held": kv}
    base = out["variants"]["recompute_full_prompt"]["inputs_per_s"]
    for name, v in out["variants"].items():
        v["speedup"] = v["inputs_per_s"] / base
        print(
            f"reuse: {name}: {v['inputs_per_s']:.2f} inputs/s ({v['speedup']:.2f}x), KV held {v['kv_bytes_held']} "
            "bytes",
            flush=True,
        )
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
        for name, call in (
            ("full", lambda: generate(model, prompts, conts, mode="pos_control", **gen_kwargs)),
            ("gist", lambda: generate_from_cache(model, cache, conts, **gen_kwargs)),
        ):
            with forward_stamps(model) as stamps:
                t0 = time.perf_counter()
                result = call()
            prefill_s, step_s, _ = decode_split(stamps, t0)
            runs[name].append((step_s, prefill_s))
            kv_bytes[name] = result.kv_bytes
    full_decode, full_prefill = sorted(runs["full"])[len(runs["full"]) // 2]
    gist_decode = sorted(runs["gist"])[len(runs["gist"]) // 2][0]
    out = {
        "rows": s.batched_rows,
        "prompt_len": p,
        "k": k,
        "rounds": s.decode_rounds,
        "full": {
            "kv_bytes": kv_bytes["full"],
            "prefill_s": full_prefill,
            "decode_s_per_step": full_decode,
            "decode_s_per_step_each_round": [r[0] for r in runs["full"]],
        },
        "gist": {
            "kv_bytes": kv_bytes["gist"],
            "compress_s": compress_s,
            "decode_s_per_step": gist_decode,
            "decode_s_per_step_each_round": [r[0] for r in runs["gist"]],
        },
        "decode_speedup_gist_vs_full": full_decode / gist_decode,
    }
    print(
        f"[batched] {s.batched_rows} rows x P={p}, K={k}: decode ms/step full {1e3 * full_decode:.1f}, "
        f"gist {1e3 * gist_decode:.1f} ({out['decode_speedup_gist_vs_full']:.2f}x, medians of {s.decode_rounds} "
        f"calls); KV bytes {kv_bytes['full']} vs {kv_bytes['gist']}",
        flush=True,
    )
    return out


def _peak_memory(spec: Dict[str, Any], in_process: bool) -> Dict[str, Any]:
    """``benchmarks/_peak_memory.py``'s measurement of one call, in a fresh process unless ``in_process``."""
    if in_process:
        from _peak_memory import measure

        return measure(spec)
    proc = subprocess.run(
        [sys.executable, str(BENCH_DIR / "_peak_memory.py"), json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"_peak_memory.py failed for {spec}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_cells(what: str, s: Settings, specs: Callable[[int], Dict[str, Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """For each of ``s.memory_prompt_lens``, :func:`_peak_memory` of the two variants ``specs(p)`` names (``{name:
    spec}``, the baseline first) and the baseline's peak and time over the other's."""
    cells = []
    for p in tqdm(s.memory_prompt_lens, desc=f"{what} memory", leave=False):
        (a, spec_a), (b, spec_b) = specs(p).items()
        cell: Dict[str, Any] = {
            "prompt_len": p,
            a: _peak_memory(spec_a, s.memory_in_process),
            b: _peak_memory(spec_b, s.memory_in_process),
        }
        cell[f"peak_ratio_{a}_vs_{b}"] = cell[a]["peak_bytes"] / max(cell[b]["peak_bytes"], 1)
        cell[f"time_ratio_{a}_vs_{b}"] = cell[a]["time_s"] / cell[b]["time_s"]
        print(
            f"  {what}, {s.memory_rows} rows of P={p}: "
            + ", ".join(f"{n} {cell[n]['peak_bytes'] / 2**20:.0f} MiB {cell[n]['time_s']:.2f} s" for n in (a, b)),
            flush=True,
        )
        cells.append(cell)
    return cells


def compress_memory(shape: Dict[str, int], s: Settings, k: int, threads: int) -> Dict[str, Any]:
    """Peak memory and time of ``compress`` in one pass vs in chunks, each call in a fresh process (``--quick``: in
    this one)."""
    base = {
        "op": "compress",
        "arch": _arch(shape, s.infer_max_seq_len),
        "rows": s.memory_rows,
        "k": k,
        "threads": threads,
    }
    cells = _memory_cells(
        "compress",
        s,
        lambda p: {
            "one_pass": {**base, "prompt_len": p, "chunk_size": p + k},
            "chunked": {**base, "prompt_len": p, "chunk_size": s.memory_chunk_size},
        },
    )
    return {"shape": shape, "rows_per_call": s.memory_rows, "k": k, "chunk_size": s.memory_chunk_size, "cells": cells}


def score_memory(shape: Dict[str, int], s: Settings, k: int, threads: int) -> Dict[str, Any]:
    """Peak memory and time of lm-eval's ``loglikelihood`` scoring in ``gist`` mode: ``score_continuations`` (the
    prompt compressed, the continuation read after the K entries, in chunks) vs one full-sequence forward under the
    dense gist mask (the scoring it replaced), each call in a fresh process (``--quick``: in this one)."""
    cont_len, scored = 2 * s.cont_len, s.cont_len  # an input of cont_len / 2 tokens, then the scored answer
    base = {
        "arch": _arch(shape, s.infer_max_seq_len),
        "rows": s.memory_rows,
        "k": k,
        "chunk_size": s.memory_chunk_size,
        "cont_len": cont_len,
        "scored": scored,
        "threads": threads,
    }
    cells = _memory_cells(
        "score",
        s,
        lambda p: {
            "dense": {**base, "op": "score_dense", "prompt_len": p},
            "stores": {**base, "op": "score", "prompt_len": p},
        },
    )
    return {
        "shape": shape,
        "rows_per_call": s.memory_rows,
        "k": k,
        "chunk_size": s.memory_chunk_size,
        "cont_len": cont_len,
        "scored": scored,
        "cells": cells,
    }


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
        "max_seq_len": s.infer_max_seq_len,
        "batch_size": 1,
        "shapes": {"gqa": main, "mha": attn},
        "stock": stock,
        "reuse": reuse,
        "batched": batched,
        "compress_memory": memory,
        "score_memory": scoring,
    }


# ---------------------------------------------------------------------------------------------
# Masks


def _packed_rows(
    b: int, s: int, doc_len: int, ids: List[int], gen: torch.Generator
) -> Tuple[torch.Tensor, torch.Tensor]:
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
        batch = {
            "tokens": packed,
            "labels": labels,
            "mask": builds["packed_gist"](),
            "input_pos": torch.arange(seq).expand(b, seq),
        }
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


THREADS_NOTE = (
    "one thread by default (`--threads 1`): the CPU is shared with other jobs, and a two-thread OpenMP team stalls "
    "whenever the other core is busy (measured while developing this script under a load average near 4: the demo "
    "training step took 0.41 s on one thread and 11.8 s on two). Use `--threads 2` on an idle machine."
)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Run the CPU benchmarks, write results_cpu.json, the PNG plots and RESULTS.md."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (seconds), for the smoke test; writes to outputs/bench_quick by default",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: benchmarks/, or outputs/bench_quick with --quick)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1, see RESULTS.md)")
    parser.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA_DIR, help=f"Alpaca+ folder (default {DEFAULT_DATA_DIR})"
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: redo goals, plots and RESULTS.md from --out's results_cpu.json",
    )
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
            "section_s": {},
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
                t_section = time.perf_counter()
                res[name] = runs[name]()
                res["meta"]["section_s"][name] = time.perf_counter() - t_section
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
