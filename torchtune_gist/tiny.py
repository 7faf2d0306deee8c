"""Tiny, offline assets for tests and the demo: a byte-level Llama 3 tokenizer and a tiny Llama 3.1 shape.

The tokenizer has a 512-token vocabulary: the 256 bytes (ids 0..255) and Llama 3's 256 special
tokens moved from ``128000 + n`` to ``256 + n``, so that torchtune's ``llama3_tokenizer`` reads it
unchanged and the reserved special tokens (and thus the gist ids) sit at the top of the
vocabulary exactly as in the real Llama 3.1 vocabulary.
"""

import argparse
import base64
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torchtune.models.llama3._tokenizer import LLAMA3_SPECIAL_TOKENS
from torchtune.models.llama3_1 import llama3_1

from torchtune_gist._io import atomic_save_safetensors, atomic_write_text, unwritable_reason

TINY_VOCAB_SIZE = 512
_LLAMA3_FIRST_SPECIAL_ID = 128000
_TINY_FIRST_SPECIAL_ID = 256

TIKTOKEN_FILE = "tiny_tokenizer.model"
SPECIAL_TOKENS_FILE = "tiny_special_tokens.json"

#: Arguments of torchtune's ``llama3_1`` component builder for a tiny model that runs on a CPU.
TINY_LLAMA3_1_ARGS: Dict[str, Any] = dict(
    vocab_size=TINY_VOCAB_SIZE,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=64,
    max_seq_len=2048,
    intermediate_dim=128,
    attn_dropout=0.0,
    norm_eps=1e-5,
    rope_base=500_000,
)


def tiny_special_tokens() -> Dict[str, int]:
    """Llama 3's special tokens mapped to ids ``256..511`` (every free slot is a reserved token)."""
    moved = {
        name: tid - _LLAMA3_FIRST_SPECIAL_ID + _TINY_FIRST_SPECIAL_ID
        for name, tid in LLAMA3_SPECIAL_TOKENS.items()
        if tid - _LLAMA3_FIRST_SPECIAL_ID < TINY_VOCAB_SIZE - _TINY_FIRST_SPECIAL_ID
    }
    free = sorted(set(range(_TINY_FIRST_SPECIAL_ID, TINY_VOCAB_SIZE)) - set(moved.values()))
    missing = [name for name in LLAMA3_SPECIAL_TOKENS if name not in moved]
    moved.update(zip(missing, free))
    return moved


def write_tiny_tokenizer(directory: Union[str, Path]) -> Tuple[Path, Path]:
    """Write the byte-level tiktoken file and the special-tokens JSON into ``directory``.

    Returns:
        Tuple[Path, Path]: paths for ``llama3_tokenizer(path, special_tokens_path=...)``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_path, special_path = directory / TIKTOKEN_FILE, directory / SPECIAL_TOKENS_FILE
    ranks = "".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256))
    added = [{"content": name, "id": tid} for name, tid in sorted(tiny_special_tokens().items(), key=lambda x: x[1])]
    atomic_write_text(ranks, model_path)
    atomic_write_text(json.dumps({"added_tokens": added}, indent=1), special_path)
    return model_path, special_path


def write_tiny_base_checkpoint(directory: Union[str, Path], *, seed: int = 0, **overrides: Any) -> Path:
    """Write a randomly initialised tiny Llama 3.1 base model (torchtune names) as ``model.safetensors``.

    Args:
        directory (Union[str, Path]): where to write.
        seed (int): initialisation seed.
        **overrides (Any): changes to :data:`TINY_LLAMA3_1_ARGS`.

    Returns:
        Path: the checkpoint file, readable by ``FullModelTorchTuneCheckpointer``.
    """
    torch.manual_seed(seed)
    model = llama3_1(**{**TINY_LLAMA3_1_ARGS, **overrides})
    return atomic_save_safetensors(model.state_dict(), Path(directory) / "model.safetensors")


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m torchtune_gist.tiny [--out DIR]``: write the tiny tokenizer and a random tiny base model."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument(
        "--out", default="outputs/tiny/assets", help="directory to write into (default: outputs/tiny/assets)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    problem = unwritable_reason(args.out, directory=True)
    if problem:
        parser.error(f"--out: {problem}")
    for path in (*write_tiny_tokenizer(args.out), write_tiny_base_checkpoint(args.out, seed=args.seed)):
        print(path)


if __name__ == "__main__":
    main()
