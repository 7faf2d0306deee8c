"""The gist checkpoint format: the gist adapter file and the merged Hugging Face export.

``gist_adapter.safetensors`` holds the gist rows (``tok_embeddings.gist_embeddings``) and the
LoRA/DoRA weights under their torchtune names, full (unsharded) tensors. Its safetensors
metadata (all strings): ``format`` (``torchtune-gist``), ``base_model``, and JSON values for
``num_gist_tokens``, ``gist_token_ids``, ``vocab_size`` and, when the model has LoRA, the LoRA
settings (``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``lora_attn_modules``,
``apply_lora_to_mlp``, ``apply_lora_to_output``, ``use_dora``, ``quantize_base``), plus any
extra metadata (JSON values).

The merged export is a standard Hugging Face ``LlamaForCausalLM`` checkpoint (``model.safetensors``
+ ``config.json``) with LoRA merged into the base and the gist rows written into the embedding
matrix at the gist ids, and a ``gist_config.json`` (K, ids) so the gist mask can be rebuilt.
"""

import json
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torchtune.models.convert_weights import hf_to_tune, tune_to_hf
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.modules import RotaryPositionalEmbeddings, TiedLinear
from torchtune.modules.peft import DoRALinear, LoRALinear, get_merged_lora_ckpt

from torchtune_gist._io import atomic_copy, atomic_save_safetensors, atomic_write_json
from torchtune_gist.modules import GIST_PARAM_NAME, get_gist_embedding, state_dict_name, trainable_gist_params

ADAPTER_FILE = "gist_adapter.safetensors"
ADAPTER_FORMAT = "torchtune-gist"
HF_WEIGHTS_FILE = "model.safetensors"
HF_CONFIG_FILE = "config.json"
GIST_CONFIG_FILE = "gist_config.json"
GIST_KEY = f"tok_embeddings.{GIST_PARAM_NAME}"

_RAW_METADATA = ("format", "base_model")
_ATTN_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj")


def lora_settings(model: nn.Module) -> Dict[str, Any]:
    """The LoRA/DoRA settings of a model, read from its modules (empty if it has no LoRA).

    Returns:
        Dict[str, Any]: ``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``lora_attn_modules``,
        ``apply_lora_to_mlp``, ``apply_lora_to_output``, ``use_dora``, ``quantize_base``.

    Raises:
        ValueError: if the LoRA modules disagree on rank, alpha, dropout, DoRA or quantisation.
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, DoRALinear))]
    if not found:
        return {}
    per_module = set()
    for _, m in found:
        rank = m.lora_a.out_features
        alpha = m.alpha if isinstance(m, LoRALinear) else m.scaling * rank
        dropout = m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0
        per_module.add((rank, float(alpha), float(dropout), isinstance(m, DoRALinear), bool(m._quantize_base)))
    if len(per_module) > 1:
        raise ValueError(
            f"LoRA modules disagree on (rank, alpha, dropout, use_dora, quantize_base): {sorted(per_module)}"
        )
    rank, alpha, dropout, use_dora, quantize_base = per_module.pop()
    names = [n for n, _ in found]
    return {
        "lora_rank": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "lora_attn_modules": [p for p in _ATTN_LORA_MODULES if any(n.endswith(f".attn.{p}") for n in names)],
        "apply_lora_to_mlp": any(".mlp." in n for n in names),
        "apply_lora_to_output": "output" in names,
        "use_dora": use_dora,
        "quantize_base": quantize_base,
    }


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def gist_adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The gist rows and LoRA/DoRA weights, torchtune names, full tensors on CPU.

    Under FSDP2 every rank must call it (sharded tensors are gathered).

    Raises:
        TypeError: if the model is not gist-aware.
    """
    params = trainable_gist_params(model, train_lora=True)
    return {name: _full(p.detach()).cpu() for name, p in params.items()}


def gist_adapter_path(path_or_dir: Union[str, Path]) -> Path:
    """The adapter file itself, or ``<dir>/gist_adapter.safetensors``.

    Raises:
        FileNotFoundError: if there is no such file.
    """
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no gist adapter at {path}")
    return path


def save_gist_adapter(
    model: nn.Module,
    directory: Union[str, Path],
    *,
    base_model: str,
    extra_metadata: Optional[Dict[str, Any]] = None,
    state_dict: Optional[Dict[str, torch.Tensor]] = None,
) -> Path:
    """Write ``<directory>/gist_adapter.safetensors`` atomically.

    Args:
        model (nn.Module): a gist-aware model (K, ids and LoRA settings are read from it).
        directory (Union[str, Path]): created if missing.
        base_model (str): what the adapter was trained on (a builder name, a path, a hub id).
        extra_metadata (Optional[Dict[str, Any]]): more metadata, JSON-serialisable values.
        state_dict (Optional[Dict[str, torch.Tensor]]): the full adapter tensors, if already
            gathered (FSDP: gather on every rank with :func:`gist_adapter_state_dict`, save on
            rank 0); default :func:`gist_adapter_state_dict` of ``model``.

    Returns:
        Path: the file written.

    Raises:
        TypeError: if the model is not gist-aware.
        ValueError: if ``extra_metadata`` overrides a reserved key or is not JSON-serialisable,
            or ``state_dict`` has no gist rows.
    """
    emb = get_gist_embedding(model)
    tensors = gist_adapter_state_dict(model) if state_dict is None else state_dict
    if GIST_KEY not in tensors:
        raise ValueError(f"the adapter state dict has no gist rows ({GIST_KEY!r})")
    meta: Dict[str, Any] = {
        "num_gist_tokens": emb.num_gist_tokens,
        "gist_token_ids": emb.gist_token_ids,
        "vocab_size": emb.num_embeddings,
        **lora_settings(model),
    }
    extra = dict(extra_metadata or {})
    clash = sorted(set(extra) & (set(meta) | set(_RAW_METADATA)))
    if clash:
        raise ValueError(f"extra_metadata may not set the reserved keys {clash}")
    meta.update(extra)
    try:
        encoded = {k: json.dumps(v) for k, v in meta.items()}
    except TypeError as e:
        raise ValueError(f"extra_metadata values must be JSON-serialisable: {e}") from e
    encoded.update(format=ADAPTER_FORMAT, base_model=str(base_model))
    return atomic_save_safetensors(tensors, Path(directory) / ADAPTER_FILE, metadata=encoded)


def read_gist_adapter_metadata(path_or_dir: Union[str, Path]) -> Dict[str, Any]:
    """The decoded metadata of a gist adapter file (or of ``<dir>/gist_adapter.safetensors``).

    Raises:
        FileNotFoundError: if there is no such file.
        ValueError: if the file is not a safetensors torchtune-gist adapter.
    """
    path = gist_adapter_path(path_or_dir)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file (a torchtune-gist adapter): {e}") from e
    if raw.get("format") != ADAPTER_FORMAT:
        raise ValueError(
            f"{path} is not a torchtune-gist adapter (safetensors metadata format={raw.get('format')!r}, "
            f"expected {ADAPTER_FORMAT!r})"
        )
    try:
        return {k: v if k in _RAW_METADATA else json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} has malformed torchtune-gist metadata: {e}") from e


def _short(keys: List[str], n: int = 5) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_gist_adapter(
    model: nn.Module,
    path: Union[str, Path],
    meta: Dict[str, Any],
    tensors: Dict[str, torch.Tensor],
    *,
    strict: bool = True,
) -> None:
    """Check a gist adapter (its metadata and tensors) against a gist-aware model, before loading it.

    The model may still be on the meta device. ``path`` only names the adapter in the errors.

    Args:
        model (nn.Module): a gist-aware model.
        path (Union[str, Path]): where the adapter was read from.
        meta (Dict[str, Any]): its decoded metadata (:func:`read_gist_adapter_metadata`).
        tensors (Dict[str, torch.Tensor]): its tensors, torchtune names.
        strict (bool): as in :func:`load_gist_adapter`.

    Raises:
        TypeError: if the model is not gist-aware.
        ValueError: if K or the gist ids differ, the gist rows are missing, (strict) LoRA keys are
            missing/unexpected or the LoRA rank, alpha or DoRA differ, or a tensor's shape differs.
    """
    emb = get_gist_embedding(model)
    if meta.get("num_gist_tokens") != emb.num_gist_tokens or meta.get("gist_token_ids") != emb.gist_token_ids:
        raise ValueError(
            f"{path} was trained with num_gist_tokens={meta.get('num_gist_tokens')} and gist ids "
            f"{meta.get('gist_token_ids')}, but the model has num_gist_tokens={emb.num_gist_tokens} and gist ids "
            f"{emb.gist_token_ids}: build the model with the adapter's K (the config's num_gist_tokens)"
        )
    params = trainable_gist_params(model, train_lora=True)
    gist_name = next(k for k in params if k.rsplit(".", 1)[-1] == GIST_PARAM_NAME)
    if gist_name not in tensors:
        raise ValueError(f"{path} has no gist rows under {gist_name!r}")
    if strict:
        missing = sorted(set(params) - set(tensors))
        unexpected = sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match the model's LoRA layout: missing keys [{_short(missing)}], unexpected keys "
                f"[{_short(unexpected)}]; build the model with the adapter's LoRA settings, or pass strict=False"
            )
        checked = ("lora_rank", "lora_alpha", "use_dora")
        differ = {k: (meta.get(k), v) for k, v in lora_settings(model).items() if k in checked and meta.get(k) != v}
        if differ:
            raise ValueError(f"{path} LoRA settings differ from the model's (file, model): {differ}")
    for name in sorted(set(params) & set(tensors)):
        shape, expected = tuple(tensors[name].shape), tuple(params[name].shape)
        if shape != expected:
            raise ValueError(f"{path}: {name} has shape {shape}, the model expects {expected}")


@torch.no_grad()
def load_gist_adapter(model: nn.Module, path_or_dir: Union[str, Path], *, strict: bool = True) -> Dict[str, Any]:
    """Load gist rows (and LoRA/DoRA weights) from a gist adapter into a gist-aware model.

    Args:
        model (nn.Module): a gist-aware model with the same K and gist ids; parameters materialised.
        path_or_dir (Union[str, Path]): the adapter file or the directory holding it.
        strict (bool): require the file's LoRA keys and settings to match the model's exactly.
            With ``False``, only the tensors both sides have are loaded (the gist rows always).

    Returns:
        Dict[str, Any]: the adapter's metadata.

    Raises:
        FileNotFoundError: if there is no adapter file.
        TypeError: if the model is not gist-aware.
        ValueError: if the file is not a torchtune-gist adapter, or as :func:`check_gist_adapter`.
    """
    path = gist_adapter_path(path_or_dir)
    meta = read_gist_adapter_metadata(path)
    tensors = load_file(str(path))
    check_gist_adapter(model, path, meta, tensors, strict=strict)
    params = trainable_gist_params(model, train_lora=True)
    for name in sorted(set(params) & set(tensors)):
        p, t = params[name], tensors[name]
        if p.is_meta:
            raise ValueError(f"{name} is on the meta device: materialise the model before loading the adapter")
        t = t.to(device=p.device, dtype=p.dtype)
        if isinstance(p, DTensor):
            t = distribute_tensor(t, p.device_mesh, p.placements)
        p.copy_(t)
    return meta


def _arch(model: nn.Module) -> Dict[str, Any]:
    """Hugging Face Llama config fields read from a torchtune decoder."""
    emb = get_gist_embedding(model)
    attn = model.layers[0].attn
    rope = attn.pos_embeddings
    if isinstance(rope, Llama3ScaledRoPE):
        rope_scaling: Optional[Dict[str, Any]] = {
            "factor": float(rope.scale_factor),
            "low_freq_factor": float(rope.low_freq_factor),
            "high_freq_factor": float(rope.high_freq_factor),
            "original_max_position_embeddings": int(rope.old_context_len),
            "rope_type": "llama3",
        }
    elif isinstance(rope, RotaryPositionalEmbeddings):
        rope_scaling = None
    else:
        raise ValueError(f"cannot export RoPE of type {type(rope).__name__} to a Hugging Face Llama config")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_size": attn.embed_dim,
        "num_attention_heads": attn.num_heads,
        "num_key_value_heads": attn.num_kv_heads,
        "head_dim": attn.head_dim,
        "num_hidden_layers": len(model.layers),
        "intermediate_size": int(model.layers[0].mlp.w1.weight.shape[0]),
        "vocab_size": emb.num_embeddings,
        "rope_theta": float(rope.base),
        "rope_scaling": rope_scaling,
        "rms_norm_eps": float(model.norm.eps),
        "max_position_embeddings": int(model.max_seq_len),
        "tie_word_embeddings": isinstance(model.output, TiedLinear),
    }


def _model_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's parameters by state-dict name, on the CPU (NF4 weights stay NF4; the merge runs there, not on
    a GPU that still holds the training state; torchtune's state-dict hooks are skipped)."""
    state = {}
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            raise ValueError(
                "the model is sharded: gather a full state dict on every rank first (e.g. "
                "torchtune.training.gather_cpu_state_dict) and pass it as state_dict="
            )
        state[state_dict_name(name)] = p.detach().cpu()
    return state


@torch.no_grad()
def merged_hf_state_dict(
    model: nn.Module,
    state_dict: Optional[Dict[str, torch.Tensor]] = None,
    *,
    dtype: Optional[torch.dtype] = None,
) -> Dict[str, Any]:
    """Merge LoRA and the gist rows into a plain Llama state dict (torchtune names).

    LoRA/DoRA is merged in fp32, one module at a time, with torchtune's ``get_merged_lora_ckpt``;
    NF4 weights are dequantised. The gist rows overwrite the embedding rows of the gist ids; ids beyond the
    vocabulary enlarge the embedding to ``max(ids) + 1`` rows (unused rows zero). The output head
    keeps the vocabulary: a tied model is untied (``output.weight`` = the original vocabulary), and
    an enlarged vocabulary gets zero output rows, so the logits of the original V tokens are
    exactly the gist model's and the K extra logits (ids beyond V) are 0.

    Args:
        model (nn.Module): the gist-aware model (LoRA settings and tying are read from it).
        state_dict (Optional[Dict[str, torch.Tensor]]): a full state dict of ``model`` (e.g.
            gathered from FSDP shards); default: the model's own parameters.
        dtype (Optional[torch.dtype]): output dtype; default the vocabulary's dtype.

    Returns:
        Dict[str, Any]: ``state_dict`` (torchtune names, CPU, no LoRA or gist keys, always with an
        untied ``output.weight``) and ``vocab_size`` (rows of the exported embedding).

    Raises:
        ValueError: if the state dict lacks the gist rows, or the model is sharded and no
            ``state_dict`` is given.
    """
    emb = get_gist_embedding(model)
    state = dict(state_dict) if state_dict is not None else _model_state_dict(model)
    if GIST_KEY not in state or "tok_embeddings.weight" not in state:
        raise ValueError(f"the state dict has no {GIST_KEY!r} / 'tok_embeddings.weight': is it a gist model's?")
    vocab = state.pop("tok_embeddings.weight")
    gist_rows = state.pop(GIST_KEY)
    dtype = dtype or vocab.dtype
    settings = lora_settings(model)
    lora_keys = [k for k in state if ".lora_a." in k or ".lora_b." in k or k.endswith(".magnitude")]
    if lora_keys:
        if not settings:
            raise ValueError(f"the state dict has LoRA weights ({lora_keys[0]}, ...) but the model has no LoRA")
        modules = sorted({k.rsplit(".lora_", 1)[0] if ".lora_" in k else k[: -len(".magnitude")] for k in lora_keys})
        for m in modules:  # one module at a time: an 8B model's fp32 copies all at once would take ~28 GB
            work = {k: state.pop(k).to(torch.float32).clone() for k in lora_keys if k.startswith(f"{m}.")}
            work[f"{m}.weight"] = state.pop(f"{m}.weight").to(torch.float32).clone()
            merged_module = get_merged_lora_ckpt(work, rank=settings["lora_rank"], alpha=settings["lora_alpha"])
            state.update({k: v.to(dtype) for k, v in merged_module.items()})
    merged = {k: v.to(dtype).cpu() for k, v in state.items()}
    base_vocab, width = vocab.shape
    new_vocab = max(base_vocab, max(emb.gist_token_ids) + 1)
    embedding = torch.zeros(new_vocab, width, dtype=dtype)
    embedding[:base_vocab] = vocab.to(dtype)
    output = merged.pop("output.weight", None)
    if output is None:
        output = embedding[:base_vocab].clone()
    if new_vocab > base_vocab:
        output = torch.cat([output, torch.zeros(new_vocab - base_vocab, width, dtype=dtype)])
    embedding[torch.tensor(emb.gist_token_ids)] = gist_rows.to(dtype).cpu()
    merged["tok_embeddings.weight"] = embedding
    merged["output.weight"] = output
    return {"state_dict": merged, "vocab_size": new_vocab}


def export_merged_hf(
    model: nn.Module,
    directory: Union[str, Path],
    *,
    state_dict: Optional[Dict[str, torch.Tensor]] = None,
    dtype: Optional[torch.dtype] = None,
    num_heads: Optional[int] = None,
    num_kv_heads: Optional[int] = None,
    dim: Optional[int] = None,
    base_model: Optional[str] = None,
    extra_config: Optional[Dict[str, Any]] = None,
    base_dir: Optional[Union[str, Path]] = None,
    mask_mode: Optional[str] = None,
) -> Path:
    """Write a standard Hugging Face Llama checkpoint with LoRA and the gist rows merged in.

    Files: ``model.safetensors`` (HF names, via torchtune's ``tune_to_hf``), ``config.json``
    (``LlamaForCausalLM``; shape, RoPE (with Llama 3.1 scaling) and norm read from the model) and
    ``gist_config.json`` (``num_gist_tokens``, ``gist_token_ids``, ``base_vocab_size``,
    ``vocab_size``, ``base_model``, ``mask_mode``). See :func:`merged_hf_state_dict` for what is merged and how
    the output head is kept exact.

    Args:
        model (nn.Module): the gist-aware model.
        directory (Union[str, Path]): created if missing.
        state_dict (Optional[Dict[str, torch.Tensor]]): a full state dict (needed for sharded models).
        dtype (Optional[torch.dtype]): weight dtype; default the vocabulary's.
        num_heads (Optional[int]): checked against the model's, if given.
        num_kv_heads (Optional[int]): checked against the model's, if given.
        dim (Optional[int]): checked against the model's width, if given.
        base_model (Optional[str]): recorded in ``gist_config.json``.
        extra_config (Optional[Dict[str, Any]]): more ``config.json`` fields (e.g. ``bos_token_id``,
            ``eos_token_id``); they override the inferred ones.
        base_dir (Optional[Union[str, Path]]): the base model's Hugging Face folder: the special-token ids
            of its ``config.json`` carry over (``extra_config`` still wins) and its other non-weight files
            (tokenizer, generation config) are copied beside the export, as torchtune's checkpointer does.
        mask_mode (Optional[str]): the mask mode the model was trained with, recorded in ``gist_config.json``.

    Returns:
        Path: ``directory``.

    Raises:
        ValueError: if a given shape argument differs from the model's, or see :func:`merged_hf_state_dict`.
    """
    config = _arch(model)
    for arg, value, key in (
        ("num_heads", num_heads, "num_attention_heads"),
        ("num_kv_heads", num_kv_heads, "num_key_value_heads"),
        ("dim", dim, "hidden_size"),
    ):
        if value is not None and value != config[key]:
            raise ValueError(f"{arg}={value} but the model has {key}={config[key]}")
    merged = merged_hf_state_dict(model, state_dict, dtype=dtype)
    weights = merged["state_dict"]
    config.update(
        vocab_size=merged["vocab_size"],
        tie_word_embeddings=False,
        torch_dtype=str(weights["tok_embeddings.weight"].dtype).removeprefix("torch."),
    )
    base_files = _base_model_files(Path(base_dir)) if base_dir is not None else []
    if base_dir is not None and (Path(base_dir) / HF_CONFIG_FILE).is_file():
        base_config = json.loads((Path(base_dir) / HF_CONFIG_FILE).read_text())
        config.update({k: base_config[k] for k in _SPECIAL_TOKEN_KEYS if k in base_config})
    config.update(extra_config or {})
    hf = tune_to_hf(
        weights,
        num_heads=config["num_attention_heads"],
        num_kv_heads=config["num_key_value_heads"],
        dim=config["hidden_size"],
        head_dim=config["head_dim"],
    )
    emb = get_gist_embedding(model)
    directory = Path(directory)
    atomic_save_safetensors(hf, directory / HF_WEIGHTS_FILE, metadata={"format": "pt"})
    atomic_write_json(config, directory / HF_CONFIG_FILE)
    atomic_write_json(
        {
            "num_gist_tokens": emb.num_gist_tokens,
            "gist_token_ids": emb.gist_token_ids,
            "base_vocab_size": emb.num_embeddings,
            "vocab_size": merged["vocab_size"],
            "base_model": base_model,
            "mask_mode": mask_mode,
        },
        directory / GIST_CONFIG_FILE,
    )
    for file in base_files:
        atomic_copy(file, directory / file.name)
    return directory


_SPECIAL_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# What a Hugging Face model folder holds besides weights and config.json that a merged export needs to be used.
_BASE_FILE_PATTERNS = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "*.jinja", "*.tiktoken")


def _base_model_files(base_dir: Path) -> List[Path]:
    """The base folder's tokenizer and generation files (top level), for a merged export to carry."""
    return sorted(
        f
        for f in base_dir.iterdir()
        if f.is_file() and not f.name.startswith(".") and any(fnmatch(f.name, pat) for pat in _BASE_FILE_PATTERNS)
    )


def check_not_merged_export(base_checkpoint_dir: Optional[Union[str, Path]]) -> None:
    """Raise a ValueError if a base checkpoint folder is a merged export of :func:`export_merged_hf`.

    Its LoRA is folded in and its gist rows sit in the vocabulary (which the gist embedding does not read), so
    a gist adapter loaded on top would apply LoRA twice, and no adapter would leave the gist rows untrained.
    """
    if base_checkpoint_dir is not None and (Path(base_checkpoint_dir) / GIST_CONFIG_FILE).is_file():
        raise ValueError(
            f"checkpointer.checkpoint_dir={str(base_checkpoint_dir)!r} is a torchtune-gist merged export (it holds "
            f"{GIST_CONFIG_FILE}), not a base model: point the checkpointer at the base model, and pass the export "
            "(or its checkpoint's adapter) as gist_checkpoint_dir to gist_generate, as checkpoint_dir to lm-eval's "
            "--model_args or a gist_eleuther_eval run"
        )


def load_merged_hf(directory: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Read a checkpoint written by :func:`export_merged_hf` back into torchtune names.

    Returns:
        Dict[str, torch.Tensor]: a state dict for torchtune's plain Llama builder of the same shape
        (with ``vocab_size`` and tying from ``config.json``).

    Raises:
        FileNotFoundError: if ``config.json`` or ``model.safetensors`` is missing.
    """
    directory = Path(directory)
    for name in (HF_CONFIG_FILE, HF_WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"no {name} in {directory}")
    config = json.loads((directory / HF_CONFIG_FILE).read_text())
    return hf_to_tune(
        load_file(str(directory / HF_WEIGHTS_FILE)),
        num_heads=config["num_attention_heads"],
        num_kv_heads=config["num_key_value_heads"],
        dim=config["hidden_size"],
        head_dim=config.get("head_dim"),
    )
