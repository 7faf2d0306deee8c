"""Correctness checks of the CUDA-only paths, for a session that is lent a GPU (``benchmarks/device_check.sh``).

Each check prints PASS or FAIL with its numbers; the exit status is the number of failures. On a machine
without CUDA it runs what the CPU can (no FlexAttention backward there), to check the script itself.

1. ``block_mask``: bf16 LoRA training step of a tiny gist model through torchtune's attention with the
   gist mask as a FlexAttention ``BlockMask`` (torchtune's compiled ``flex_attention``) vs the dense mask
   vs segments: same loss and gradients, every mask mode on padded batches, the gist mode on packed rows.
2. ``generation``: grouped-query generation on the device in bf16: ``compress`` + ``generate_from_cache``
   gives the tokens ``generate(mode="gist")`` gives, and the KV bytes are (K + n) / (P + K + n) of the full prompt's.
3. ``qlora``: a tiny NF4 QLoRA gist model trains a step on the device, with activation checkpointing.

Usage::

    python benchmarks/gpu_smoke.py [--only block_mask,generation,qlora]
"""

import argparse
import math
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torchtune import modules, training, utils
from torchtune.utils._import_guard import _SUPPORTS_FLEX_ATTENTION

from torchtune_gist.data import PackedGistDataset, packed_gist_collate, padded_gist_collate
from torchtune_gist.generation import compress, generate, generate_from_cache
from torchtune_gist.masks import MASK_MODES
from torchtune_gist.models import gist_llama3_1_tiny, lora_gist_llama3_1_tiny
from torchtune_gist.modules import set_trainable_params
from torchtune_gist.tiny import TINY_VOCAB_SIZE
from torchtune_gist.training import FLEX_BLOCK_SIZE, masked_loss

CHECKS = ("block_mask", "generation", "qlora")
K = 4
GIST = list(range(TINY_VOCAB_SIZE - K, TINY_VOCAB_SIZE))
PAD, IGNORE = 0, -100


def _examples(lengths: Sequence[int], seed: int = 0) -> List[Dict[str, List[int]]]:
    """Rows with the gist span a quarter in, labels after it (the recipe's layout)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        tokens = torch.randint(1, 256, (n,), generator=g).tolist()
        at = n // 4
        tokens[at : at + K] = GIST
        out.append({"tokens": tokens, "labels": [IGNORE] * (at + K) + tokens[at + K :]})
    return out


def _step(model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_sum, n = masked_loss(model, batch, torch.nn.CrossEntropyLoss(ignore_index=IGNORE), IGNORE)
    (loss_sum / n).backward()
    grads = {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}
    return {"loss": (loss_sum / n).detach().float(), **grads}


def _max_rel_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)) for k in b)


def check_block_mask(device: torch.device, dtype: torch.dtype) -> bool:
    flex = device.type == "cuda" and _SUPPORTS_FLEX_ATTENTION
    torch.manual_seed(0)
    with training.set_default_dtype(dtype), device:
        model = lora_gist_llama3_1_tiny(
            ["q_proj", "k_proj", "v_proj", "output_proj"],
            num_gist_tokens=K,
            num_heads=4,
            num_kv_heads=2,
            embed_dim=128,
            intermediate_dim=256,
        )
    set_trainable_params(model)
    ok = True
    examples = _examples([300, 190, 520, 77])
    packed_rows = PackedGistDataset(examples, max_seq_len=1024, pad_id=PAD)
    layouts: Dict[str, Callable[..., Dict[str, torch.Tensor]]] = {
        "padded": lambda **kw: padded_gist_collate(examples, gist_token_ids=GIST, pad_id=PAD, ignore_idx=IGNORE, **kw),
        "packed": lambda **kw: packed_gist_collate(
            [packed_rows[i] for i in range(len(packed_rows))], gist_token_ids=GIST, pad_id=PAD, **kw
        ),
    }
    # Each (layout, mode) pair compiles FlexAttention anew (the mode is a constant of mask_mod): the packed
    # layout is checked in the gist mode alone, to keep the compiles few.
    for layout, collate in layouts.items():
        for mode in MASK_MODES if layout == "padded" else ("gist",):
            results = {}
            formats = {"dense": {}, "segments": {"segment_mask": True}}
            if flex:
                extra = {"pad_to_multiple_of": FLEX_BLOCK_SIZE} if layout == "padded" else {}
                formats["block"] = {"block_mask": True, "block_mask_device": device, **extra}
            for name, kwargs in formats.items():
                batch = collate(mask_mode=mode, **kwargs)
                utils.batch_to_device(batch, device)
                results[name] = _step(model, batch)
            for name in results:
                if name == "dense":
                    continue
                diff = _max_rel_diff(results[name], results["dense"])
                # bf16 alone moves these gradients by about 1e-2 (bf16 vs fp32, same mask, on a CPU); another
                # mask mode moves them by about 0.9: 0.1 tells the two apart.
                passed = diff < (1e-1 if dtype == torch.bfloat16 else 1e-4)
                ok &= passed
                print(
                    f"  {'PASS' if passed else 'FAIL'} {layout} {mode} {name} vs dense: loss "
                    f"{float(results[name]['loss']):.4f} vs {float(results['dense']['loss']):.4f}, largest relative "
                    f"gradient difference {diff:.2e}"
                )
    if not flex:
        print("  (no FlexAttention here: BlockMasks not checked)")
    return ok


def check_generation(device: torch.device, dtype: torch.dtype) -> bool:
    torch.manual_seed(0)
    with training.set_default_dtype(dtype), device:
        model = gist_llama3_1_tiny(num_gist_tokens=K, num_heads=8, num_kv_heads=2, embed_dim=128).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 256, (n,), generator=g).tolist() + GIST for n in (200, 57, 131)]
    conts = [torch.randint(1, 256, (n,), generator=g).tolist() for n in (5, 9, 3)]
    cache = compress(model, prompts, gist_token_ids=GIST)
    ours = generate_from_cache(model, cache, conts, max_new_tokens=12)
    ref = generate(model, prompts, conts, mode="gist", gist_token_ids=GIST, max_new_tokens=12)
    full = generate(model, prompts, conts, mode="pos_control", gist_token_ids=GIST, max_new_tokens=12)
    same = ours.tokens == ref.tokens
    print(
        f"  {'PASS' if same else 'FAIL'} gist cache tokens == gist-mode generate tokens (3 rows, grouped-query 8/2 "
        f"heads, {dtype})"
    )
    ratio = ours.kv_bytes / full.kv_bytes
    print(f"  INFO KV bytes held: gist {ours.kv_bytes:,}, full prompt {full.kv_bytes:,} ({ratio:.3f})")
    return same


def check_qlora(device: torch.device, dtype: torch.dtype) -> bool:
    torch.manual_seed(0)
    with training.set_default_dtype(dtype), device:
        model = lora_gist_llama3_1_tiny(
            ["q_proj", "v_proj"],
            apply_lora_to_mlp=True,
            quantize_base=True,
            num_gist_tokens=K,
            embed_dim=256,
            num_heads=4,
            num_kv_heads=2,
            intermediate_dim=512,
        )
    params = set_trainable_params(model)
    training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    opt = torch.optim.AdamW(params.values(), lr=1e-3)
    batch = padded_gist_collate(_examples([256, 200]), gist_token_ids=GIST, pad_id=PAD, ignore_idx=IGNORE)
    utils.batch_to_device(batch, device)
    losses = []
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        loss_sum, n = masked_loss(model, batch, torch.nn.CrossEntropyLoss(ignore_index=IGNORE), IGNORE)
        (loss_sum / n).backward()
        opt.step()
        losses.append(float(loss_sum.detach() / n))
    passed = all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    print(
        f"  {'PASS' if passed else 'FAIL'} NF4 QLoRA gist steps with activation checkpointing: losses "
        f"{['%.3f' % x for x in losses]}"
    )
    return passed


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated checks (default all: {','.join(CHECKS)})")
    args = p.parse_args(argv)
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(only) - set(CHECKS))
    if unknown:
        p.error(f"unknown checks {unknown}; choose from {', '.join(CHECKS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(
        f"device {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}, {dtype}, torch "
        f"{torch.__version__}"
    )
    checks = {"block_mask": check_block_mask, "generation": check_generation, "qlora": check_qlora}
    failures = 0
    for name in only:
        t0 = time.perf_counter()
        print(f"[{name}]", flush=True)
        try:
            passed = checks[name](device, dtype)
        except Exception as err:  # a check that crashes is a failure to report, not the end of the others
            print(f"  FAIL {type(err).__name__}: {err}")
            passed = False
        failures += not passed
        print(f"[{name}] {'PASS' if passed else 'FAIL'} in {time.perf_counter() - t0:.1f} s", flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(main())
