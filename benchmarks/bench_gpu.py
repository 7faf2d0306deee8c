"""GPU benchmarks for a session that has a CUDA GPU (written for one H100; not run without one).

Sections (each figure measured in one run beside its baseline, variants interleaved):

1. ``attention``: bf16 LoRA training steps on a Llama 3.1 8B-shaped stack (``--layers``, default
   the full 32) with the gist mask as a FlexAttention ``BlockMask`` (``make_gist_block_mask``,
   what the recipes use on CUDA) vs the same mask dense through SDPA vs torchtune's plain causal
   path (``mask=None``) vs a causal ``BlockMask``; one example per row and packed rows.
2. ``packing``: the CPU benchmark's batching comparison (batch size 1 vs padded batches vs packed
   rows of the same Alpaca+ records, collated as the recipe does on CUDA: ``BlockMask``s) on the
   8B-shaped stack, where packing is expected to pay.
3. ``memory``: peak memory (allocated and reserved) of ``configs/llama3_1/8B_gist_qlora_single_device.yaml``'s
   model and loss (random weights, activation checkpointing) beside torchtune's stock
   ``llama3_1/8B_qlora_single_device.yaml``'s with the same shapes, at seq 2048 and at the config's
   4 x 512; and a passkey batch as ``configs/llama3_1/8B_gist_passkey_qlora_single_device.yaml``
   trains on (batch 1, a ~3000-token context, K = 16; stock: the same tokens, unpadded).
4. ``decode``: gist-cached vs full-prompt decode on 8B-shaped layers through
   :mod:`torchtune_gist.generation`, and torchtune's stock ``generate`` with ``setup_caches`` at the
   model's full length.

Usage::

    python benchmarks/bench_gpu.py --dry-run     # any machine: parse, print the plan, say whether a GPU is there
    python benchmarks/bench_gpu.py               # on a CUDA GPU: writes benchmarks/results_gpu.json, gpu_*.png,
                                                 # RESULTS.md
    python benchmarks/bench_gpu.py --tiny        # tiny shapes on any device, to check the script
                                                 # (outputs/bench_gpu_tiny)

Needs a CUDA build of torch with the project's pins (torchtune 0.6.1, torchao 0.15). Random weights:
no checkpoint is read. An out-of-memory variant is recorded as such, not fatal.
"""

import argparse
import gc
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from _common import (
    GPU_JSON,
    command_line,
    decode_split,
    fmt,
    forward_stamps,
    load_average,
    machine_info,
    median,
    render_results,
    save_png,
    table,
    write_json,
)

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
SECTIONS = ("attention", "packing", "memory", "decode")

#: torchtune's ``llama3_1_8b`` shape.
LLAMA3_1_8B_ARGS: Dict[str, Any] = dict(
    vocab_size=128_256,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    embed_dim=4096,
    max_seq_len=131072,
    intermediate_dim=14336,
    attn_dropout=0.0,
    norm_eps=1e-5,
    rope_base=500_000,
)
#: ``--tiny``: a shape NF4 can quantise (every weight a multiple of 64 * 256 values), to check the script anywhere.
TINY_ARGS: Dict[str, Any] = dict(
    vocab_size=512,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=256,
    max_seq_len=4096,
    intermediate_dim=512,
    attn_dropout=0.0,
    norm_eps=1e-5,
    rope_base=500_000,
)
#: ``--tiny``: smaller defaults for the options left unset, so the check takes about a minute on a CPU.
TINY_DEFAULTS: Dict[str, Any] = dict(
    train_shapes=[[1, 512], [1, 1024]],
    reps=2,
    pack_examples=16,
    pack_row_lens=[1024, 2048],
    qlora_shapes=[[1, 512]],
    passkey_context=1000,
    prompt_lens=[256, 1024],
    decode_batch=[1, 2],
    new_tokens=8,
)
#: The configs whose model and loss the memory section builds (torchtune's stock one: :func:`stock_qlora_config`).
GIST_QLORA_CONFIG = REPO / "configs" / "llama3_1" / "8B_gist_qlora_single_device.yaml"
GIST_PASSKEY_CONFIG = REPO / "configs" / "llama3_1" / "8B_gist_passkey_qlora_single_device.yaml"
#: Llama 3's special ids start at 128000; the tiny byte tokenizer puts them at 256 (``torchtune_gist.tiny``).
_TINY_TO_LLAMA3 = 128000 - 256


def _parse_shapes(text: str) -> List[List[int]]:
    try:
        shapes = [[int(x) for x in item.lower().split("x")] for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCHxSEQ[,BATCHxSEQ...], got {text!r}") from None
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected BATCHxSEQ[,BATCHxSEQ...] of positive integers, got {text!r}")
    return shapes


def _parse_ints(text: str) -> List[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan and whether a CUDA GPU is present; measure nothing"
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help=(
            "tiny model and shapes on any device (checks the script in about a minute; writes to "
            "outputs/bench_gpu_tiny)"
        ),
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default benchmarks/, or outputs/bench_gpu_tiny with --tiny)",
    )
    p.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections, run in this order (default all: {','.join(SECTIONS)})",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=32,
        help="decoder layers of the 8B-shaped stack for attention/decode (default 32, the full depth)",
    )
    p.add_argument(
        "--train-shapes",
        type=_parse_shapes,
        default=[[1, 2048], [1, 8192]],
        help="BATCHxSEQ of the attention section (default 1x2048,1x8192)",
    )
    p.add_argument("--doc-len", type=int, default=256, help="document length of the packed rows (default 256)")
    p.add_argument("--k", type=int, default=10, help="gist tokens in the attention and decode sections (default 10)")
    p.add_argument("--reps", type=int, default=10, help="timed steps per variant (default 10)")
    p.add_argument("--pack-examples", type=int, default=64, help="Alpaca+ examples in the packing section (default 64)")
    p.add_argument(
        "--pack-row-lens", type=_parse_ints, default=[2048, 4096], help="packed row lengths (default 2048,4096)"
    )
    p.add_argument(
        "--qlora-shapes",
        type=_parse_shapes,
        default=[[1, 2048], [4, 512]],
        help="BATCHxSEQ of the memory section (default 1x2048,4x512)",
    )
    p.add_argument("--passkey-context", type=int, default=3000, help="passkey context tokens (default 3000)")
    p.add_argument(
        "--passkey-k", type=int, default=16, help="gist tokens of the passkey batch (default 16, the passkey config's)"
    )
    p.add_argument(
        "--prompt-lens",
        type=_parse_ints,
        default=[1024, 4096, 16384],
        help="decode prompt lengths (default 1024,4096,16384)",
    )
    p.add_argument("--decode-batch", type=_parse_ints, default=[1, 8], help="decode batch sizes (default 1,8)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per decode measurement (default 32)")
    p.add_argument(
        "--update",
        action="store_true",
        help="keep the other sections of --out's results_gpu.json and replace only those run (recorded in the "
        "report's header)",
    )
    p.add_argument(
        "--decode-compile",
        action="store_true",
        help="also decode full prompt and gist cache with compile=True (torch.compile of each step; about a minute "
        "of compiling per new shape)",
    )
    p.add_argument(
        "--stock-cache-len",
        type=int,
        default=None,
        help="slots of torchtune's stock KV cache (default: the model's max_seq_len)",
    )
    return p


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _peak_reserved_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(err: BaseException) -> bool:
    """An allocation failure: the caching allocator's, or cuBLAS's workspace (``CUBLAS_STATUS_ALLOC_FAILED``)."""
    text = str(err).lower()
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in text or "alloc_failed" in text


def _arch(args: argparse.Namespace, **overrides: Any) -> Dict[str, Any]:
    base = TINY_ARGS if args.tiny else LLAMA3_1_8B_ARGS
    return {**base, **overrides}


def weight_bytes_per_step(arch: Dict[str, Any], bytes_per_value: int = 2) -> int:
    """Bytes of weights a decode step reads: every layer's projections and norms, the final norm and the output
    projection (one embedding row, negligible, left out)."""
    d, heads, kv_heads = arch["embed_dim"], arch["num_heads"], arch["num_kv_heads"]
    head_dim = d // heads
    layer = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim + 3 * d * arch["intermediate_dim"] + 2 * d
    return bytes_per_value * (arch["num_layers"] * layer + d + arch["vocab_size"] * d)


def _gist_ids(vocab_size: int, k: int) -> List[int]:
    from torchtune_gist.gist_tokens import default_gist_token_ids

    return list(default_gist_token_ids(vocab_size, k))


def _example_tokens(b: int, s: int, k: int, vocab: int, *, doc_len: Optional[int], gen: torch.Generator):
    """Rows of ``s`` random tokens: one example per row (gist span a quarter in), or packed documents of ``doc_len``."""
    from torchtune_gist.masks import document_ids_from_lengths

    ids = torch.tensor(_gist_ids(vocab, k))
    tokens = torch.randint(0, min(vocab - 256, 128000), (b, s), generator=gen)  # no special or gist ids
    labels = tokens.clone()
    if doc_len is None:
        tokens[:, s // 4 : s // 4 + k] = ids
        labels[:, : s // 4 + k] = -100
        return tokens, labels, None
    lens = [doc_len] * (s // doc_len) + ([s % doc_len] if s % doc_len else [])
    start = 0
    for n in lens:
        if n > 2 * k:
            g = start + n // 3
            tokens[:, g : g + k] = ids
            labels[:, start : g + k] = -100
        start += n
    return tokens, labels, document_ids_from_lengths([lens] * b, s)


def bench_attention(
    args: argparse.Namespace, device: torch.device, save: Callable[[Dict[str, Any]], None]
) -> Dict[str, Any]:
    """bf16 LoRA training steps: gist BlockMask vs dense gist SDPA vs mask=None vs causal BlockMask."""
    from torchtune import training
    from torchtune.utils._import_guard import _SUPPORTS_FLEX_ATTENTION

    from torchtune_gist.masks import make_gist_block_mask, make_gist_mask
    from torchtune_gist.models import lora_gist_llama3_1
    from torchtune_gist.modules import set_trainable_params
    from torchtune_gist.training import masked_loss

    k = args.k
    arch = _arch(args, num_layers=min(args.layers, _arch(args)["num_layers"]))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with training.set_default_dtype(dtype), device:
        model = lora_gist_llama3_1(
            ["q_proj", "k_proj", "v_proj", "output_proj"], **arch, lora_rank=16, lora_alpha=32, num_gist_tokens=k
        )
    params = set_trainable_params(model)
    opt = torch.optim.AdamW(params.values(), lr=1e-5, fused=device.type == "cuda")
    loss_fn = torch.nn.CrossEntropyLoss(
        ignore_index=-100
    )  # the 8B configs' loss: projections at labelled positions only
    ids = _gist_ids(arch["vocab_size"], k)
    gen = torch.Generator().manual_seed(0)
    out: Dict[str, Any] = {
        "arch": arch,
        "dtype": str(dtype),
        "k": k,
        "flex_available": bool(_SUPPORTS_FLEX_ATTENTION),
        "params": sum(p.numel() for p in model.parameters()),
        "rows": [],
    }

    def step(batch: Dict[str, Any]) -> None:
        loss_sum, n = masked_loss(model, batch, loss_fn, -100)
        (loss_sum / n.clamp(min=1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)

    for b, s in args.train_shapes:
        for layout, doc_len in (("one example per row", None), (f"packed, documents of {args.doc_len}", args.doc_len)):
            tokens, labels, docs = _example_tokens(b, s, k, arch["vocab_size"], doc_len=doc_len, gen=gen)
            tokens, labels = tokens.to(device), labels.to(device)
            docs = docs.to(device) if docs is not None else None
            input_pos = torch.arange(s, device=device).expand(b, s)
            base = {"tokens": tokens, "labels": labels}
            makers: Dict[str, Callable[[], Dict[str, Any]]] = {
                "causal_none": lambda: dict(base),
                "gist_dense_sdpa": lambda: {
                    **base,
                    "input_pos": input_pos,
                    "mask": make_gist_mask(tokens, ids, document_ids=docs),
                },
            }
            if _SUPPORTS_FLEX_ATTENTION:
                makers["gist_block_mask"] = lambda: {
                    **base,
                    "input_pos": input_pos,
                    "mask": make_gist_block_mask(tokens, ids, document_ids=docs),
                }
                makers["causal_block_mask"] = lambda: {
                    **base,
                    "input_pos": input_pos,
                    "mask": make_gist_block_mask(tokens, ids, document_ids=docs, mode="pos_control"),
                }
            row: Dict[str, Any] = {"batch": [b, s], "layout": layout, "variants": {}}
            times: Dict[str, List[float]] = {n: [] for n in makers}
            mask_s: Dict[str, List[float]] = {n: [] for n in makers}
            peaks: Dict[str, float] = {}
            failed: Dict[str, str] = {}
            for rep in range(args.reps + 2):  # two warm-up rounds (FlexAttention compiles on its first call)
                for name, make in makers.items():
                    if name in failed:
                        continue
                    try:
                        _reset_peak(device)
                        t0 = time.perf_counter()
                        batch = make()
                        _sync(device)
                        t1 = time.perf_counter()
                        step(batch)
                        t2 = time.perf_counter()
                    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
                        if not _is_oom(err):
                            raise
                        failed[name] = "out of memory"
                        opt.zero_grad(set_to_none=True)
                        _free(device)
                        continue
                    if rep == 0:
                        row["variants"].setdefault(name, {})["first_step_s"] = t2 - t0
                    if rep >= 2:
                        times[name].append(t2 - t1)
                        mask_s[name].append(t1 - t0)
                    peak = _peak_gib(device)
                    if peak is not None:
                        peaks[name] = max(peaks.get(name, 0.0), peak)
                    del batch
            base_t = median(times["causal_none"]) if times.get("causal_none") else None
            for name in makers:
                v = row["variants"].setdefault(name, {})
                if name in failed:
                    v["error"] = failed[name]
                    continue
                t = median(times[name])
                v.update(
                    step_s=times[name],
                    median_step_s=t,
                    median_mask_s=median(mask_s[name]),
                    tokens_per_s=b * s / t,
                    peak_gib=peaks.get(name),
                )
                if base_t is not None:
                    v["vs_causal_none"] = base_t / t
            print(
                f"[attention] {b}x{s} {layout}: "
                + ", ".join(
                    f"{n} {v.get('tokens_per_s', 0):.0f} tok/s" if "error" not in v else f"{n} {v['error']}"
                    for n, v in row["variants"].items()
                ),
                flush=True,
            )
            out["rows"].append(row)
            save(out)
            _free(device)
    return out


def bench_packing(
    args: argparse.Namespace, device: torch.device, save: Callable[[Dict[str, Any]], None]
) -> Dict[str, Any]:
    """Batch size 1 vs padded vs packed rows (BlockMasks on CUDA) on the 8B-shaped LoRA stack, same examples."""
    from bench_cpu import DEFAULT_DATA_DIR, load_examples, packing_plans, packing_summary, run_plans
    from torchtune import training, utils
    from torchtune.models.llama3 import llama3_tokenizer

    from torchtune_gist.models import lora_gist_llama3_1
    from torchtune_gist.modules import set_trainable_params
    from torchtune_gist.tiny import write_tiny_tokenizer
    from torchtune_gist.training import masked_loss

    k = 4
    with tempfile.TemporaryDirectory() as tmp:
        model_path, special_path = write_tiny_tokenizer(tmp)
        tok = llama3_tokenizer(str(model_path), special_tokens_path=str(special_path))
        examples, source = load_examples(tok, DEFAULT_DATA_DIR, args.pack_examples, 512, k)
    shift = 0 if args.tiny else _TINY_TO_LLAMA3  # byte ids stay, special and gist ids move to Llama 3's
    remap = lambda seq: [x + shift if x >= 256 else x for x in seq]  # noqa: E731
    examples = [{"tokens": remap(ex["tokens"]), "labels": remap(ex["labels"])} for ex in examples]
    arch = _arch(args, num_layers=min(args.layers, _arch(args)["num_layers"]))
    ids, pad = _gist_ids(arch["vocab_size"], k), tok.pad_id + shift
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with training.set_default_dtype(dtype), device:
        model = lora_gist_llama3_1(
            ["q_proj", "k_proj", "v_proj", "output_proj"], **arch, lora_rank=16, lora_alpha=32, num_gist_tokens=k
        )
    params = set_trainable_params(model)
    opt = torch.optim.AdamW(params.values(), lr=1e-5, fused=device.type == "cuda")
    loss_fn = torch.nn.CrossEntropyLoss(
        ignore_index=-100
    )  # the 8B configs' loss: projections at labelled positions only

    def step(batch: Dict[str, Any]) -> None:
        utils.batch_to_device(batch, device)
        loss_sum, n = masked_loss(model, batch, loss_fn, -100)
        (loss_sum / n.clamp(min=1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)

    plans, stats = packing_plans(
        examples,
        ids,
        pad,
        batch_size=8,
        row_lens=args.pack_row_lens,
        block_mask_device=device if device.type == "cuda" else None,
    )
    times = run_plans(plans, step, rounds=4, desc="packing", warm_every_shape=True)  # compiles stay out of the timings
    real_total = sum(len(ex["tokens"]) for ex in examples)
    return {
        "data": source,
        "examples": len(examples),
        "real_tokens": real_total,
        "arch": arch,
        "dtype": str(dtype),
        "block_mask": device.type == "cuda",
        "variants": packing_summary(stats, times, real_total),
    }


def _passkey_batches(args: argparse.Namespace, device: torch.device) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """A passkey example of ``--passkey-context`` tokens (byte tokenizer text), ids moved to Llama 3's layout,
    as two batches: collated as the gist recipe does (on CUDA a BlockMask, padded to 128) and as torchtune's
    stock recipe would (tokens and labels only, unpadded)."""
    from torchtune.models.llama3 import llama3_tokenizer

    from torchtune_gist.data import gist_passkey_dataset, padded_gist_collate
    from torchtune_gist.tiny import write_tiny_tokenizer
    from torchtune_gist.training import FLEX_BLOCK_SIZE

    k = args.passkey_k
    with tempfile.TemporaryDirectory() as tmp:
        model_path, special_path = write_tiny_tokenizer(tmp)
        tok = llama3_tokenizer(str(model_path), special_tokens_path=str(special_path))
        ex = gist_passkey_dataset(tok, num_gist_tokens=k, num_samples=1, context_tokens=args.passkey_context, seed=0)[0]
    shift = 0 if args.tiny else _TINY_TO_LLAMA3  # specials (BOS, EOS, gists) keep their Llama 3 roles
    remap = lambda seq: [t + shift if t >= 256 else t for t in seq]  # noqa: E731
    ids = _gist_ids(_arch(args)["vocab_size"], k)
    collate = partial(
        padded_gist_collate,
        [{"tokens": remap(ex["tokens"]), "labels": remap(ex["labels"])}],
        gist_token_ids=ids,
        pad_id=tok.pad_id + shift,
    )
    blocks = device.type == "cuda"
    gist = collate(
        block_mask=blocks, block_mask_device=device, pad_to_multiple_of=FLEX_BLOCK_SIZE if blocks else 1
    )  # as the recipe pads BlockMask batches
    stock = collate()
    stock = {"tokens": stock["tokens"], "labels": stock["labels"]}
    to_device = lambda batch: {k_: (v.to(device) if isinstance(v, torch.Tensor) else v) for k_, v in batch.items()}  # noqa: E731
    return to_device(gist), to_device(stock)


def _qlora_peak(
    builder: Callable[[], torch.nn.Module],
    make_batch: Callable[[], Dict[str, Any]],
    device: torch.device,
    *,
    gist: bool,
    loss_fn: torch.nn.Module,
    steps: int = 3,
) -> Dict[str, Any]:
    """Peak memory and step time of a QLoRA model (built by ``builder``) over ``steps`` optimizer steps."""
    from torchtune import modules, training
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    from torchtune_gist.modules import set_trainable_params as set_gist_trainable
    from torchtune_gist.training import masked_loss

    _free(device)
    _reset_peak(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    with training.set_default_dtype(dtype), device:
        model = builder()
    if gist:
        params = set_gist_trainable(model)
    else:
        params = get_adapter_params(model)
        set_trainable_params(model, params)
    training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    _sync(device)
    build_s = time.perf_counter() - t0
    model_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    opt = torch.optim.AdamW(params.values(), lr=2e-4, fused=device.type == "cuda")
    if hasattr(loss_fn, "num_output_chunks"):
        model.set_num_output_chunks(loss_fn.num_output_chunks)
    _reset_peak(device)
    times = []
    try:
        for _ in range(steps):
            batch = make_batch()
            t1 = time.perf_counter()
            loss_sum, n = masked_loss(model, batch, loss_fn, -100)
            (loss_sum / n.clamp(min=1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            times.append(time.perf_counter() - t1)
        result = {
            "model_gib": model_gib,
            "peak_gib": _peak_gib(device),
            "peak_reserved_gib": _peak_reserved_gib(device),
            "build_s": build_s,
            "step_s": times,
            "median_step_s": median(times[1:] or times),
        }
    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
        if not _is_oom(err):
            raise
        result = {"model_gib": model_gib, "error": "out of memory", "build_s": build_s}
    del model, opt
    _free(device)
    return result


def _print_memory_row(row: Dict[str, Any]) -> None:
    items = [
        f"{n}: peak {v['peak_gib']} GiB" if "peak_gib" in v else f"{n}: {v['error']}"
        for n, v in row.items()
        if isinstance(v, dict)
    ]
    print(f"[memory] {row['batch'][0]}x{row['batch'][1]}: " + "; ".join(items), flush=True)


def _model_and_loss(
    path: Path, tiny: bool, **model_overrides: Any
) -> Tuple[Callable[[], torch.nn.Module], torch.nn.Module, Dict[str, Any]]:
    """A config's model builder (its LoRA settings; ``tiny``: on the tiny shape) and loss, and the LoRA settings."""
    from omegaconf import OmegaConf
    from torchtune import config as tt_config
    from torchtune.config._utils import _get_component_from_path

    cfg = OmegaConf.load(path)
    kwargs = {
        k: v
        for k, v in OmegaConf.to_container(cfg.model, resolve=False).items()
        if k not in ("_component_", "num_gist_tokens")
    }
    kwargs.update(model_overrides)
    component = str(cfg.model._component_)
    if tiny:  # the same family's generic builder on the tiny shape (8B -> TINY_ARGS), NF4 as the config
        generic = component.replace("qlora_gist_llama3_1_8b", "lora_gist_llama3_1").replace(
            "qlora_llama3_1_8b", "lora_llama3_1"
        )
        builder = partial(_get_component_from_path(generic), **TINY_ARGS, quantize_base=True, **kwargs)
    else:
        builder = partial(_get_component_from_path(component), **kwargs)
    return builder, tt_config.instantiate(cfg.loss), kwargs


def stock_qlora_config() -> Path:
    """torchtune's own ``llama3_1/8B_qlora_single_device.yaml`` (installed with torchtune's recipes)."""
    import torchtune

    return (
        Path(torchtune.__file__).resolve().parents[1]
        / "recipes"
        / "configs"
        / "llama3_1"
        / "8B_qlora_single_device.yaml"
    )


def bench_memory(
    args: argparse.Namespace, device: torch.device, save: Callable[[Dict[str, Any]], None]
) -> Dict[str, Any]:
    """Peak memory: our 8B gist QLoRA config vs torchtune's stock 8B QLoRA config, same shapes; and the passkey batch.

    Each side as its config trains: its LoRA settings and its loss (ours: ``CrossEntropyLoss`` through
    ``masked_loss``, the output projection only at labelled positions; stock: ``CEWithChunkedOutputLoss`` over
    every position); activation checkpointing for both (both configs enable it)."""
    from torchtune_gist.masks import make_gist_block_mask, make_gist_mask

    vocab = _arch(args)["vocab_size"]
    gist_path, passkey_path, stock_path = GIST_QLORA_CONFIG, GIST_PASSKEY_CONFIG, stock_qlora_config()
    stock_builder, stock_loss, stock_lora = _model_and_loss(stock_path, args.tiny)
    gist_builder, gist_loss, gist_lora = _model_and_loss(gist_path, args.tiny, num_gist_tokens=1)
    gen = torch.Generator().manual_seed(1)
    rows: List[Dict[str, Any]] = []
    result = {
        "lora": {"gist": gist_lora, "stock": stock_lora},
        "activation_checkpointing": True,
        "loss": {"gist": type(gist_loss).__name__, "stock": type(stock_loss).__name__},
        "rows": rows,
    }
    for b, s in args.qlora_shapes:
        tokens, labels, _ = _example_tokens(b, s, 1, vocab, doc_len=None, gen=gen)
        tokens, labels = tokens.to(device), labels.to(device)
        ids = _gist_ids(vocab, 1)
        build_mask = make_gist_block_mask if device.type == "cuda" else make_gist_mask

        def gist_batch() -> Dict[str, Any]:
            return {
                "tokens": tokens,
                "labels": labels,
                "input_pos": torch.arange(s, device=device).expand(b, s),
                "mask": build_mask(tokens, ids),
            }

        row = {
            "batch": [b, s],
            f"gist ({gist_path.name}, K=1)": _qlora_peak(
                gist_builder, gist_batch, device, gist=True, loss_fn=gist_loss
            ),
            f"stock ({stock_path.name}, mask=None)": _qlora_peak(
                stock_builder, lambda: {"tokens": tokens, "labels": labels}, device, gist=False, loss_fn=stock_loss
            ),
        }
        _print_memory_row(row)
        rows.append(row)
        save(result)
    passkey, stock_pk = _passkey_batches(args, device)
    pk_builder, pk_loss, _ = _model_and_loss(passkey_path, args.tiny, num_gist_tokens=args.passkey_k)
    rows.append(
        {
            "batch": [int(n) for n in passkey["tokens"].shape],
            "passkey": (
                f"context {args.passkey_context} tokens, K={args.passkey_k}; stock unpadded: "
                f"{stock_pk['tokens'].shape[1]} tokens"
            ),
            f"gist ({passkey_path.name}, K={args.passkey_k})": _qlora_peak(
                pk_builder, lambda: passkey, device, gist=True, loss_fn=pk_loss
            ),
            f"stock ({stock_path.name}, mask=None)": _qlora_peak(
                stock_builder, lambda: stock_pk, device, gist=False, loss_fn=stock_loss
            ),
        }
    )
    _print_memory_row(rows[-1])
    return result


def _compiled_decode(
    model: torch.nn.Module,
    prompts: List[List[int]],
    conts: List[List[int]],
    method: str,
    t_new: int,
    device: torch.device,
) -> Dict[str, Any]:
    """Per-token decode with ``compile=True``: the time of a call of ``2 + t_new`` new tokens less that of a call of 2,
    over ``t_new`` (stamps inside a compiled step would break its graph). Both calls run once first, untimed
    (``warmup_s``): a store of a new size may compile the step again."""
    from torchtune_gist.generation import compress, generate, generate_from_cache

    cache = compress(model, prompts) if method == "gist" else None

    def call(n: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        if cache is None:
            generate(model, prompts, conts, mode="pos_control", max_new_tokens=n, compile=True)
        else:
            generate_from_cache(model, cache, conts, max_new_tokens=n, compile=True)
        _sync(device)
        return time.perf_counter() - t0

    try:
        warmup = call(2) + call(2 + t_new)
        short, long = call(2), call(2 + t_new)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
        if not _is_oom(err):
            raise
        return {"error": "out of memory"}
    return {"decode_s_per_token": (long - short) / t_new, "warmup_s": warmup, "timed_by": "difference of two calls"}


def bench_decode(
    args: argparse.Namespace, device: torch.device, save: Callable[[Dict[str, Any]], None]
) -> Dict[str, Any]:
    """Per-token decode from the gist cache vs the full prompt vs torchtune's stock cache, 8B-shaped layers."""
    from torchtune import training
    from torchtune.generation import generate as torchtune_generate
    from torchtune.modules.common_utils import delete_kv_caches

    from torchtune_gist.generation import DEFAULT_CHUNK_SIZE, compress, generate, generate_from_cache
    from torchtune_gist.models import gist_llama3_1

    k = args.k
    arch = _arch(args, num_layers=min(args.layers, _arch(args)["num_layers"]))
    if args.tiny:
        arch["max_seq_len"] = max(arch["max_seq_len"], max(args.prompt_lens) + k + 8 + args.new_tokens)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with training.set_default_dtype(dtype), device:
        model = gist_llama3_1(**arch, num_gist_tokens=k).eval()
    ids = list(model.tok_embeddings.gist_token_ids)
    gen = torch.Generator().manual_seed(2)
    cont_len, t_new = 8, args.new_tokens

    def sync() -> None:
        _sync(device)

    rows: List[Dict[str, Any]] = []
    result = {"arch": arch, "dtype": str(dtype), "k": k, "cont_len": cont_len, "new_tokens": t_new, "rows": rows}
    for bsz in args.decode_batch:
        for p in args.prompt_lens:
            prompts = [
                torch.randint(0, 128000 if not args.tiny else 256, (p,), generator=gen).tolist() + ids
                for _ in range(bsz)
            ]
            conts = [
                torch.randint(0, 128000 if not args.tiny else 256, (cont_len,), generator=gen).tolist()
                for _ in range(bsz)
            ]
            row: Dict[str, Any] = {"batch": bsz, "prompt_len": p}
            for method in ("full", "gist", "stock"):
                try:
                    _reset_peak(device)
                    with forward_stamps(model, sync=sync) as stamps:
                        sync()
                        t0 = time.perf_counter()
                        if method == "full":
                            res = generate(model, prompts, conts, mode="pos_control", max_new_tokens=t_new)
                            kv, extra = res.kv_bytes, {}
                        elif method == "gist":
                            cache = compress(model, prompts)
                            sync()
                            t_c = time.perf_counter()
                            stamps.clear()
                            res = generate_from_cache(model, cache, conts, max_new_tokens=t_new)
                            kv, extra = res.kv_bytes, {"compress_s": t_c - t0, "cache_bytes": cache.nbytes}
                            t0 = t_c
                            del cache
                        else:
                            slots = args.stock_cache_len or arch["max_seq_len"]
                            try:
                                with device:  # torchtune's KVCache allocates on the default device
                                    model.setup_caches(batch_size=bsz, dtype=dtype, decoder_max_seq_len=slots)
                                kv = sum(
                                    layer.attn.kv_cache.k_cache.nbytes + layer.attn.kv_cache.v_cache.nbytes
                                    for layer in model.layers
                                )
                                torchtune_generate(
                                    model,
                                    torch.tensor([a + c for a, c in zip(prompts, conts)], device=device),
                                    max_generated_tokens=t_new,
                                    pad_id=-1,
                                    temperature=0.0,
                                )
                            finally:
                                if model.caches_are_setup():  # also after an out-of-memory error half-way through
                                    delete_kv_caches(model)
                            extra = {"cache_slots": slots}
                        sync()
                        t1 = time.perf_counter()
                    prefill, decode, n = decode_split(stamps, t0)
                    row[method] = {
                        "kv_bytes": kv,
                        "prefill_s": prefill,
                        "decode_s_per_token": decode,
                        "decode_intervals": n,
                        "e2e_s": t1 - t0,
                        "peak_gib": _peak_gib(device),
                        **extra,
                    }
                except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
                    if not _is_oom(err):
                        raise
                    row[method] = {"error": "out of memory"}
                _free(device)
            for name, chunk in (("compress_chunked", DEFAULT_CHUNK_SIZE), ("compress_one_pass", p + k)):
                try:
                    _reset_peak(device)
                    sync()
                    t0 = time.perf_counter()
                    compress(model, prompts, chunk_size=chunk)
                    sync()
                    row[name] = {"time_s": time.perf_counter() - t0, "peak_gib": _peak_gib(device), "chunk_size": chunk}
                except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
                    if not _is_oom(err):
                        raise
                    row[name] = {"error": "out of memory", "chunk_size": chunk}
                _free(device)
            if args.decode_compile:
                for method in ("full", "gist"):
                    row[f"{method}_compiled"] = _compiled_decode(model, prompts, conts, method, t_new, device)
                    _free(device)
            if "decode_s_per_token" in row.get("full", {}) and "decode_s_per_token" in row.get("gist", {}):
                row["decode_speedup_gist_vs_full"] = (
                    row["full"]["decode_s_per_token"] / row["gist"]["decode_s_per_token"]
                )
            print(
                f"[decode] batch {bsz}, P={p}: "
                + ", ".join(
                    f"{m} {1e3 * row[m]['decode_s_per_token']:.2f} ms/tok"
                    if "decode_s_per_token" in row[m]
                    else f"{m} {row[m]['error']}"
                    for m in ("full", "gist", "stock", "full_compiled", "gist_compiled")
                    if m in row
                ),
                flush=True,
            )
            rows.append(row)
            save(result)
    del model
    _free(device)
    return result


def make_gpu_plots(res: Dict[str, Any], out: Path) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    if "attention" in res and res["attention"]["rows"]:
        rows = res["attention"]["rows"]
        names = list(dict.fromkeys(n for r in rows for n in r["variants"]))
        fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(rows)), 4))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            vals = [r["variants"].get(name, {}).get("tokens_per_s", 0) for r in rows]
            ax.bar([j + i * width for j in range(len(rows))], vals, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
        ax.set_xticklabels([f"{r['batch'][0]}x{r['batch'][1]}\n{r['layout']}" for r in rows], fontsize=7)
        ax.set_ylabel("training tokens/s")
        ax.legend(fontsize=7)
        ax.set_title(f"bf16 LoRA step, 8B-shaped, {res['attention']['arch']['num_layers']} layers", fontsize=9)
        files.append(save_png(fig, out / "gpu_train.png").name)
    if "decode" in res and res["decode"]["rows"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for bsz in sorted({r["batch"] for r in res["decode"]["rows"]}):
            rows = [r for r in res["decode"]["rows"] if r["batch"] == bsz]
            for method, style in (("full", "o-"), ("gist", "s-"), ("stock", "^:")):
                pts = [
                    (r["prompt_len"], 1e3 * r[method]["decode_s_per_token"])
                    for r in rows
                    if "decode_s_per_token" in r[method]
                ]
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{method}, batch {bsz}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt length")
        ax.set_ylabel("decode ms / token")
        ax.legend(fontsize=7)
        files.append(save_png(fig, out / "gpu_decode.png").name)
    return files


def render_gpu_markdown(res: Optional[Dict[str, Any]]) -> str:
    """The GPU section of RESULTS.md (``res`` is ``results_gpu.json``, or ``None`` when no GPU run exists).

    ``res["notes"]``, markdown lines added to the file after a run (what further runs of the same session found), is
    rendered as a list under the run's date and command.
    """
    if res is None:
        return (
            "## GPU\n\n"
            "**No GPU was lent in the session that wrote these benchmarks, so `benchmarks/bench_gpu.py` has not been "
            "run. No GPU figure is given here, and none is estimated or invented.** A session lent one runs "
            "`benchmarks/device_check.sh` in one call (after `make gpu-kit` here; it was checked end to end on a CPU): "
            "correctness of the CUDA-only paths (`benchmarks/gpu_smoke.py`: BlockMask training against the dense mask, "
            "grouped-query generation, NF4 QLoRA), the recipes and the lm-eval evaluation by name on CUDA, then this "
            "script in the time left. The script measures: peak memory (allocated and reserved) of "
            "`configs/llama3_1/8B_gist_qlora_single_device.yaml`'s model and loss (random weights) beside torchtune's "
            "stock `llama3_1/8B_qlora_single_device.yaml`'s on the same shapes, and the passkey config's batch (one "
            "~3000-token context, K = 16); the gist mask as FlexAttention `BlockMask`s vs dense SDPA masks vs "
            "torchtune's plain causal path in bf16 LoRA steps on a Llama 3.1 8B-shaped stack (`--layers N`); "
            "gist-cached vs full-prompt decode on 8B-shaped layers, beside torchtune's stock cache; batch size 1 vs "
            "padded batches vs packed rows (BlockMasks). Its numbers land in `results_gpu.json` and in this section.\n"
        )
    m = res["meta"]
    mach = m["machine"]
    out = [
        "## GPU" + (" (tiny shapes: a check of the script, not a measurement)" if m["tiny"] else ""),
        "",
        f"- Date: {mach['date']}; device: {mach['cuda'] or 'cpu'}; host CPU {mach['cpu_model']} ({mach['cores']} "
        f"cores); torch {mach['torch']}",
        f"- Command: `{m['command']}` ("
        + (
            f"{fmt(m['duration_s'])} s)"
            if "duration_s" in m
            else "cut short: the sections below finished, the rest did not)"
        ),
    ]
    for u in res.get("updates", []):
        out.append(
            f"- Updated {u['machine']['date']} on {u['machine']['cuda'] or 'cpu'} (torch {u['machine']['torch']}), "
            f"sections {', '.join(u['sections'])} measured again: `{u['command']}`"
            + (f" ({fmt(u['duration_s'])} s)" if "duration_s" in u else " (cut short)")
        )
    out.append("")
    if res.get("notes"):
        out += ["### Findings of the same session", "", *(f"- {n}" for n in res["notes"]), ""]
    if "attention" in res:
        a = res["attention"]
        out += [
            "### Gist mask in training: FlexAttention BlockMask vs dense SDPA vs plain causal "
            f"({a['arch']['num_layers']} layers of Llama 3.1 8B's shape, {a['dtype']}, LoRA rank 16 on q/k/v/output, "
            f"K={a['k']}; FlexAttention available: {a['flex_available']})",
            "",
            table(
                ["batch", "layout", "variant", "tokens/s", "vs mask=None", "mask build ms", "peak GiB", "note"],
                [
                    [
                        f"{r['batch'][0]}x{r['batch'][1]}",
                        r["layout"],
                        n,
                        v.get("tokens_per_s"),
                        f"{v['vs_causal_none']:.3f}x" if "vs_causal_none" in v else None,
                        1e3 * v["median_mask_s"] if "median_mask_s" in v else None,
                        v.get("peak_gib"),
                        v.get("error"),
                    ]
                    for r in a["rows"]
                    for n, v in r["variants"].items()
                ],
            ),
            "",
        ]
    if "packing" in res:
        pk = res["packing"]
        out += [
            f"### Batching and packing ({pk['arch']['num_layers']} layers of Llama 3.1 8B's shape, {pk['dtype']}, "
            f"LoRA; {pk['examples']} examples, {pk['real_tokens']:,} real tokens; BlockMasks: {pk['block_mask']})",
            "",
            table(
                ["variant", "steps", "padding", "tokens/s", "vs batch size 1"],
                [
                    [
                        n,
                        v["steps"],
                        f"{100 * v['padding_fraction']:.1f}%",
                        v["tokens_per_s"],
                        f"{v['speedup_vs_bs1']:.2f}x",
                    ]
                    for n, v in pk["variants"].items()
                ],
            ),
            "",
        ]
    if "memory" in res:
        rows = []
        for r in res["memory"]["rows"]:
            for n, v in r.items():
                if isinstance(v, dict):
                    rows.append(
                        [
                            f"{r['batch'][0]}x{r['batch'][1]}" + (f" ({r['passkey']})" if "passkey" in r else ""),
                            n,
                            v.get("model_gib"),
                            v.get("peak_gib"),
                            v.get("peak_reserved_gib"),
                            v.get("median_step_s"),
                            v.get("error"),
                        ]
                    )
        mem = res["memory"]
        out += [
            "### Peak memory, 8B QLoRA single device (random weights, activation checkpointing; each side its "
            f"config's LoRA settings and loss: gist {mem['loss']['gist']}, stock {mem['loss']['stock']})",
            "",
            table(
                ["batch", "config", "after build GiB", "peak allocated GiB", "peak reserved GiB", "step s", "note"],
                rows,
            ),
            "",
        ]
    if "decode" in res:
        d = res["decode"]
        weights = weight_bytes_per_step(d["arch"], 2 if "bfloat16" in d["dtype"] else 4)
        compiled = [m for m in ("full_compiled", "gist_compiled") if any(m in r for r in d["rows"])]

        def ms(r: Dict[str, Any], m: str) -> Any:
            return (
                1e3 * r[m]["decode_s_per_token"] if "decode_s_per_token" in r.get(m, {}) else r.get(m, {}).get("error")
            )

        def ratio(r: Dict[str, Any], a: str, b: str) -> Optional[str]:
            if "decode_s_per_token" in r.get(a, {}) and "decode_s_per_token" in r.get(b, {}):
                return f"{r[a]['decode_s_per_token'] / r[b]['decode_s_per_token']:.2f}x"
            return None

        out += [
            f"### Decode on 8B-shaped layers ({d['arch']['num_layers']} layers, {d['dtype']}, K={d['k']}, "
            f"{d['new_tokens']} new tokens)",
            "",
            table(
                [
                    "batch",
                    "P",
                    "full ms/tok",
                    "gist ms/tok",
                    "stock ms/tok",
                    "full / gist",
                    "bytes read, full / gist",
                    "KV full",
                    "KV gist",
                    "KV stock",
                ]
                + [f"{m.replace('_', ' ')} ms/tok" for m in compiled]
                + (["compiled full / gist", "gist: eager / compiled"] if len(compiled) == 2 else []),
                [
                    [r["batch"], r["prompt_len"]]
                    + [ms(r, m) for m in ("full", "gist", "stock")]
                    + [ratio(r, "full", "gist")]
                    + [
                        f"{(weights + r['full']['kv_bytes']) / (weights + r['gist']['kv_bytes']):.2f}x"
                        if "kv_bytes" in r["full"] and "kv_bytes" in r["gist"]
                        else None
                    ]
                    + [r[m].get("kv_bytes") for m in ("full", "gist", "stock")]
                    + [ms(r, m) for m in compiled]
                    + (
                        [ratio(r, "full_compiled", "gist_compiled"), ratio(r, "gist", "gist_compiled")]
                        if len(compiled) == 2
                        else []
                    )
                    for r in d["rows"]
                ],
            ),
            "",
            f"Bytes read: the weights a step reads ({weights / 1e9:.2f} GB: every layer and the output projection) "
            "plus the KV held, full prompt over gist cache, what a memory-bound step would gain; a step bound by "
            "kernel launches gains nothing."
            + (
                " Compiled: `compile=True` (each decoding step through `torch.compile`), timed as the difference of "
                "two calls (2 and 2 + new tokens), after an untimed call of each length (compiling)."
                if compiled
                else ""
            ),
            "",
        ]
        if any("compress_chunked" in r for r in d["rows"]):
            out += [
                "Compression alone (`compress`), layer by layer in chunks of 512 tokens vs in one pass "
                "(`chunk_size` >= P); peak = `torch.cuda.max_memory_allocated` during the call, weights included:",
                "",
                table(
                    ["batch", "P", "chunked s", "chunked peak GiB", "one pass s", "one pass peak GiB"],
                    [
                        [r["batch"], r["prompt_len"]]
                        + [
                            r[m].get(f) if f in r[m] else r[m].get("error")
                            for m in ("compress_chunked", "compress_one_pass")
                            for f in ("time_s", "peak_gib")
                        ]
                        for r in d["rows"]
                        if "compress_chunked" in r
                    ],
                ),
                "",
            ]
    out += [f"![{p}]({p})\n" for p in res.get("plots", [])]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tiny:
        for name, value in TINY_DEFAULTS.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    has_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if has_gpu else "cpu")
    print(
        f"CUDA GPU: {torch.cuda.get_device_name(0) if has_gpu else 'none (no GPU: nothing to measure without --tiny)'}"
    )
    print(
        f"sections: {', '.join(only)}; shape: {'tiny' if args.tiny else f'Llama 3.1 8B, {args.layers} layers'}; "
        f"train shapes {args.train_shapes}; QLoRA shapes {args.qlora_shapes}; passkey {args.passkey_context} tokens, "
        f"K={args.passkey_k}; decode P {args.prompt_lens}, batch {args.decode_batch}"
    )
    if args.dry_run:
        print("dry run: nothing measured")
        return 0
    if not has_gpu and not args.tiny:
        print(
            "no CUDA GPU on this machine: bench_gpu.py measures nothing here (use --dry-run or --tiny)", file=sys.stderr
        )
        return 2
    out = args.out or (REPO / "outputs" / "bench_gpu_tiny" if args.tiny else BENCH_DIR)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    this_run = {
        "machine": machine_info(torch.get_num_threads()),
        "command": command_line(),
        "tiny": args.tiny,
        "load_before": load_average(),
    }
    res: Dict[str, Any] = {"meta": this_run}
    updating = args.update and (out / GPU_JSON).is_file()
    if updating:
        res = json.loads((out / GPU_JSON).read_text())
        res.setdefault("updates", []).append({**this_run, "sections": []})  # each as it starts replacing the old
        this_run = res["updates"][-1]
    runs = {"attention": bench_attention, "packing": bench_packing, "memory": bench_memory, "decode": bench_decode}
    # torchtune compiles flex_attention with dynamic=False: one compile per shape, and the attention section
    # alone has 8; past the limit dynamo would run FlexAttention unfused and the figures would not be its own.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)

    def save(name: str, partial: Dict[str, Any]) -> None:
        res[name] = partial
        write_json(res, out / GPU_JSON)  # after every row: a run cut short keeps what it measured

    for name in only:  # in the order given
        if updating:
            this_run["sections"].append(name)
        res[name] = runs[name](args, device, partial(save, name))
        _free(device)  # the section's models are gone with its frame
        torch._dynamo.reset()
        write_json(res, out / GPU_JSON)
    this_run["duration_s"] = time.perf_counter() - t_start
    res["plots"] = make_gpu_plots(res, out)
    write_json(res, out / GPU_JSON)
    report = render_results(out)
    print(f"wrote {out / GPU_JSON} and {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
