"""Compress prompts once into their gist keys/values (:class:`GistCache`), save, load and reuse them.

Positions (as the official implementation): a prompt of ``n`` tokens and its K gists take absolute positions
``0 .. n + K - 1``. The cache keeps the gist keys with the RoPE of their original positions and
records ``next_pos = n + K``: whatever follows continues at ``next_pos``; the dropped prompt's
positions are skipped, never reused.
"""

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from torchtune.modules import TransformerDecoder
from torchtune.modules.peft import DoRALinear, LoRALinear

from torchtune_gist._checks import check_whole
from torchtune_gist._io import atomic_save_safetensors
from torchtune_gist.generation._attention import DEFAULT_CHUNK_SIZE, gist_entries, self_attention_modules
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

CACHE_FORMAT = "torchtune-gist-cache"
CACHE_FORMAT_VERSION = "2"  # 2: large weights enter the fingerprint through a sample


#: Weights of more values than this enter the fingerprint through an even sample of about this many
#: (Llama 3.1 8B's first and last attention: 32 MiB hashed per call instead of 336 MiB; 0.06 s instead of 0.6 s on a
#: CPU).
_FINGERPRINT_SAMPLE = 1 << 20
_ADAPTER_PARAMS = ("lora_a.weight", "lora_b.weight", "magnitude")  # LoRALinear / DoRALinear, when ``disabled``
# Rotary embedding attributes that change the rotations (torchtune's RotaryPositionalEmbeddings, Llama3ScaledRoPE).
_ROPE_SETTINGS = ("dim", "base", "scale_factor", "low_freq_factor", "high_freq_factor", "old_context_len")


def _tensor_bytes(t: torch.Tensor) -> bytes:
    values = t.detach()
    if type(values) is not torch.Tensor:  # a tensor subclass (NF4): dequantise whole
        values = values.to(dtype=torch.float32)
    values = values.reshape(-1)
    if values.numel() > _FINGERPRINT_SAMPLE:
        values = values[:: values.numel() // _FINGERPRINT_SAMPLE]
    return values.to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes()


@torch.no_grad()
def model_fingerprint(
    model: TransformerDecoder, gist_token_ids: Sequence[int], model_id: Optional[str] = None
) -> Dict[str, Any]:
    """A fingerprint of what a gist cache depends on, to refuse caches made by another model.

    Holds the attention shape and a SHA-256 over a few weights: the embeddings of the gist ids
    (the trained gist rows of a gist model) and every parameter (LoRA included unless switched off, NF4
    dequantised) of the first and last layers' attention, read as float32 (an even sample of the large ones: a
    fine-tune or another model changes them throughout); and the rotary embedding's settings.

    Args:
        model (TransformerDecoder): the model.
        gist_token_ids (Sequence[int]): the gist ids.
        model_id (Optional[str]): an optional name for the model, stored and compared as given.

    Returns:
        Dict[str, Any]: JSON-serialisable: ``num_layers``, ``num_heads``, ``num_kv_heads``,
        ``head_dim``, ``rope`` (:func:`rope_settings`), ``weights_sha256``, ``model_id`` and ``unmerged_adapters``
        (whether LoRA/DoRA adapters were applied beside the base weights, not merged into them).
    """
    attns = self_attention_modules(model)
    digest = hashlib.sha256()
    device, _ = model_device_dtype(model)
    digest.update(_tensor_bytes(model.tok_embeddings(torch.tensor([list(gist_token_ids)], device=device))))
    for attn in (attns[0], attns[-1]):
        switched_off = {
            f"{name}.{p}" for name, m in attn.named_modules() if getattr(m, "disabled", False) for p in _ADAPTER_PARAMS
        }
        for name, param in sorted(attn.named_parameters()):
            if name in switched_off:  # a switched-off adapter (a merged export's, freshly initialised) changes nothing
                continue
            digest.update(name.encode())
            digest.update(_tensor_bytes(param))
    return {
        "num_layers": len(attns),
        "num_heads": attns[0].num_heads,
        "num_kv_heads": attns[0].num_kv_heads,
        "head_dim": attns[0].head_dim,
        "rope": rope_settings(attns[0]),
        "weights_sha256": digest.hexdigest(),
        "model_id": model_id,
        "unmerged_adapters": has_unmerged_adapters(model),
    }


def has_unmerged_adapters(model: nn.Module) -> bool:
    """Whether ``model`` applies LoRA/DoRA adapters beside its base weights (not switched off, not merged)."""
    return any(isinstance(m, (LoRALinear, DoRALinear)) and not m.disabled for m in model.modules())


def rope_settings(attn: nn.Module) -> Optional[Dict[str, Any]]:
    """The rotary embedding's class and the settings that set its rotations (not ``max_seq_len``), or ``None``
    for attention without one: two models with the same weights but other RoPE settings make other keys."""
    rope = getattr(attn, "pos_embeddings", None)
    if rope is None:
        return None
    settings = {k: getattr(rope, k) for k in _ROPE_SETTINGS if isinstance(getattr(rope, k, None), (int, float))}
    return {"class": type(rope).__name__, **settings}


@dataclass
class GistCache:
    """The compressed prompts of a batch: the K gist positions' keys and values from every layer.

    Args:
        keys (List[torch.Tensor]): per layer ``[b, n_kv, K, h_d]``, after RoPE (as torchtune caches them).
        values (List[torch.Tensor]): per layer ``[b, n_kv, K, h_d]``.
        next_pos (torch.Tensor): long ``[b]``: the absolute position right after each row's gist span.
        gist_token_ids (List[int]): the K gist ids, in span order.
        fingerprint (Dict[str, Any]): :func:`model_fingerprint` of the model that made the cache
            (:func:`compress` records it), and what a caller adds about the prompt (``gist_generate``: its layout,
            ``prompt_layout``). A cache built without one can be generated from (only its shapes are checked), but
            :meth:`check_compatible` refuses it.

    Raises:
        ValueError: if the tensors' shapes disagree with each other or with K.
    """

    keys: List[torch.Tensor]
    values: List[torch.Tensor]
    next_pos: torch.Tensor
    gist_token_ids: List[int]
    fingerprint: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.keys or len(self.keys) != len(self.values):
            raise ValueError(
                f"a gist cache needs keys and values for every layer, got {len(self.keys)} and {len(self.values)}"
            )
        shape = tuple(self.keys[0].shape)
        if len(shape) != 4:
            raise ValueError(f"gist cache keys must be [b, n_kv, K, head_dim], got {shape}")
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if tuple(k.shape) != shape or tuple(v.shape) != shape:
                raise ValueError(
                    f"gist cache layer {i} has keys {tuple(k.shape)} and values {tuple(v.shape)}, expected {shape}"
                )
        if shape[2] != len(self.gist_token_ids):
            raise ValueError(
                f"gist cache holds {shape[2]} entries per layer but has {len(self.gist_token_ids)} gist ids"
            )
        if tuple(self.next_pos.shape) != (shape[0],):
            raise ValueError(f"next_pos must have shape [{shape[0]}], got {tuple(self.next_pos.shape)}")

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def num_gist_tokens(self) -> int:
        return len(self.gist_token_ids)

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the cached keys and values (``2 * layers * b * n_kv * K * head_dim * itemsize``)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def _replace(self, fn: Any, next_pos: torch.Tensor) -> "GistCache":
        return GistCache(
            [fn(k) for k in self.keys],
            [fn(v) for v in self.values],
            next_pos,
            list(self.gist_token_ids),
            dict(self.fingerprint),
        )

    def select(self, rows: Union[Sequence[int], Sequence[bool], torch.Tensor]) -> "GistCache":
        """The cache of some rows.

        Args:
            rows (Union[Sequence[int], Sequence[bool], torch.Tensor]): row indices (kept in that order; a
                row may repeat), or a boolean mask ``[b]`` of the rows to keep.

        Raises:
            ValueError: for indices outside ``[0, b)``, a mask of another length, or no row selected.
        """
        index = torch.as_tensor(rows, device=self.next_pos.device)
        if index.dtype == torch.bool:
            if tuple(index.shape) != (self.batch_size,):
                raise ValueError(f"a boolean row mask must have shape [{self.batch_size}], got {tuple(index.shape)}")
            index = index.nonzero().squeeze(1)
        if (
            index.is_floating_point()
            or index.dim() != 1
            or index.numel() == 0
            or ((index < 0) | (index >= self.batch_size)).any()
        ):
            raise ValueError(
                f"rows must be a non-empty list of row indices in [0, {self.batch_size}) or a boolean mask selecting "
                f"at least one of the {self.batch_size} rows, got {rows!r}"
            )
        index = index.long()
        return self._replace(lambda t: t.index_select(0, index.to(t.device)), self.next_pos.index_select(0, index))

    def repeat(self, n: int) -> "GistCache":
        """Each row repeated ``n`` times in place (row ``i`` becomes rows ``i*n .. i*n + n - 1``)."""
        check_whole("n", n)
        return self._replace(lambda t: t.repeat_interleave(n, dim=0), self.next_pos.repeat_interleave(n))

    def to(self, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None) -> "GistCache":
        """The cache on ``device`` with keys/values in ``dtype`` (``next_pos`` stays long)."""
        return self._replace(lambda t: t.to(device=device, dtype=dtype), self.next_pos.to(device=device))

    @classmethod
    def cat(cls, caches: Sequence["GistCache"]) -> "GistCache":
        """Concatenate caches of the same model and gist ids along the batch.

        Raises:
            ValueError: if the caches use different gist ids (a batch mixing K) or come from different models.
        """
        if not caches:
            raise ValueError("no caches to concatenate")
        first = caches[0]
        for i, c in enumerate(caches[1:], 1):
            if c.gist_token_ids != first.gist_token_ids:
                raise ValueError(
                    f"caches[{i}] has K={c.num_gist_tokens} gist ids {c.gist_token_ids}, caches[0] has "
                    f"K={first.num_gist_tokens} {first.gist_token_ids}: a batch cannot mix gist spans"
                )
            if c.fingerprint != first.fingerprint:
                raise ValueError(f"caches[{i}] was made by a different model than caches[0]")
        return GistCache(
            [torch.cat([c.keys[i] for c in caches]) for i in range(first.num_layers)],
            [torch.cat([c.values[i] for c in caches]) for i in range(first.num_layers)],
            torch.cat([c.next_pos for c in caches]),
            list(first.gist_token_ids),
            dict(first.fingerprint),
        )

    def check_compatible(
        self,
        model: TransformerDecoder,
        *,
        gist_token_ids: Optional[Sequence[int]] = None,
        model_id: Optional[str] = None,
    ) -> None:
        """Check that this cache was made by ``model`` (same shape and weights) with the expected gist ids.

        Args:
            model (TransformerDecoder): the model to generate with.
            gist_token_ids (Optional[Sequence[int]]): the expected gist ids; defaults to the model's
                own (``model.tok_embeddings.gist_token_ids``) when it has them.
            model_id (Optional[str]): compared with the cache's ``model_id`` when both are set.

        Raises:
            ValueError: naming what differs: K or the gist ids, the architecture, the model id, the dtype or the
                weights; or if the cache has no fingerprint to compare.
        """
        expected = getattr(model.tok_embeddings, "gist_token_ids", None) if gist_token_ids is None else gist_token_ids
        if expected is not None and list(expected) != self.gist_token_ids:
            raise ValueError(
                f"the cache holds K={self.num_gist_tokens} gist tokens {self.gist_token_ids}, but "
                f"K={len(list(expected))} gist tokens {list(expected)} are expected: build the model with "
                f"num_gist_tokens={self.num_gist_tokens} (the K it was compressed with), or compress the prompt again"
            )
        check_architecture(self, model)
        theirs = self.fingerprint.get("model_id")
        if model_id is not None and theirs is not None and model_id != theirs:
            raise ValueError(f"the cache was made by model {theirs!r}, not {model_id!r}")
        recorded = self.fingerprint.get("weights_sha256")
        if recorded is None:
            raise ValueError(
                "the cache has no fingerprint of the model that made it, so its weights cannot be checked: make it "
                "with compress(), or build it with fingerprint=model_fingerprint(model, gist_token_ids)"
            )
        if model_fingerprint(model, self.gist_token_ids)["weights_sha256"] != recorded:
            _, dtype = model_device_dtype(model)
            if dtype != self.dtype:
                raise ValueError(
                    f"the cache was made by a model in {self.dtype}, but this model runs in {dtype}: its weights, "
                    f"rounded to {dtype}, differ from those that made the cache; load the model in {self.dtype} or "
                    "compress the prompts again with this model"
                )
            if self.fingerprint.get("unmerged_adapters") and not has_unmerged_adapters(model):
                raise ValueError(
                    "the cache was made by a model with its LoRA adapters applied beside the base weights, and this "
                    "model has none (a merged export, say): merged weights round differently and give other keys "
                    "and values, so compress the prompts again with this model, or load the adapter checkpoint that "
                    "made the cache"
                )
            raise ValueError(
                "the cache was made by a model with different weights (its gist rows or attention weights differ): "
                "compress the prompts again with this model"
            )

    def save(self, path: Union[str, Path]) -> Path:
        """Write the cache as safetensors (atomically), with its gist ids and fingerprint as metadata."""
        tensors = {"next_pos": self.next_pos}
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            tensors[f"keys.{i}"], tensors[f"values.{i}"] = k, v
        metadata = {
            "format": CACHE_FORMAT,
            "version": CACHE_FORMAT_VERSION,
            "num_layers": str(self.num_layers),
            "gist_token_ids": json.dumps(self.gist_token_ids),
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
        }
        return atomic_save_safetensors(tensors, path, metadata=metadata)

    @classmethod
    def load(cls, path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> "GistCache":
        """Read a cache written by :meth:`save`.

        Args:
            path (Union[str, Path]): the file.
            device (Union[str, torch.device]): where the tensors go.

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            ValueError: if the file is not a safetensors gist cache of a known version, is incomplete, or
                ``device`` is a CUDA device and CUDA is not available.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no gist cache at {path}")
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"cannot load the gist cache {path} onto device={str(device)!r}: CUDA is not available")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                if meta.get("format") != CACHE_FORMAT:
                    raise ValueError(
                        f"{path} is not a gist cache (format={meta.get('format')!r}, expected {CACHE_FORMAT!r})"
                    )
                if meta.get("version") != CACHE_FORMAT_VERSION:
                    raise ValueError(
                        f"{path} is a gist cache of version {meta.get('version')!r}; this code reads "
                        f"{CACHE_FORMAT_VERSION!r}"
                    )
                n = int(meta["num_layers"])
                names = set(f.keys())
                missing = sorted(
                    {"next_pos", *(f"{kind}.{i}" for kind in ("keys", "values") for i in range(n))} - names
                )
                if missing:
                    raise ValueError(f"{path} is incomplete: missing {missing[:4]}")
                return cls(
                    [f.get_tensor(f"keys.{i}") for i in range(n)],
                    [f.get_tensor(f"values.{i}") for i in range(n)],
                    f.get_tensor("next_pos"),
                    json.loads(meta["gist_token_ids"]),
                    json.loads(meta["fingerprint"]),
                )
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable safetensors file (a gist cache): {e}") from e


def check_architecture(cache: GistCache, model: TransformerDecoder) -> None:
    """Raise a ValueError if ``model``'s gist ids (when it has them), layers, heads, head size or rotary embedding
    settings differ from those that made ``cache``.

    Layers, KV heads and head size are read from the cache's tensors, the query heads and RoPE settings from its
    fingerprint (not compared when it has none, or a cache from before RoPE was recorded). Cheap (no weights are read);
    :meth:`GistCache.check_compatible` also compares weights.
    """
    own_ids = getattr(model.tok_embeddings, "gist_token_ids", None)
    if own_ids is not None and list(own_ids) != cache.gist_token_ids:
        raise ValueError(
            f"the cache holds K={cache.num_gist_tokens} gist tokens {cache.gist_token_ids}, but the model's gist "
            f"tokens are K={len(list(own_ids))} {list(own_ids)}: compress the prompts again with this model"
        )
    attns = self_attention_modules(model)
    rope = rope_settings(attns[0])
    if "rope" in cache.fingerprint and cache.fingerprint["rope"] != rope:
        raise ValueError(
            f"the cache was made by a model with rotary embeddings {cache.fingerprint['rope']}, but this model's are "
            f"{rope}: its keys are rotated otherwise; compress the prompts again with this model"
        )
    _, num_kv_heads, _, head_dim = cache.keys[0].shape
    theirs = {
        "num_layers": cache.num_layers,
        "num_heads": cache.fingerprint.get("num_heads"),
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
    }
    ours = {
        "num_layers": len(attns),
        "num_heads": attns[0].num_heads,
        "num_kv_heads": attns[0].num_kv_heads,
        "head_dim": attns[0].head_dim,
    }
    if theirs["num_heads"] is None:
        del theirs["num_heads"], ours["num_heads"]
    if theirs != ours:
        raise ValueError(f"the cache was made by a model with {theirs}, but this model has {ours}")


@torch.no_grad()
def compress(
    model: TransformerDecoder,
    prompts: Union[Sequence[Sequence[int]], torch.Tensor],
    *,
    gist_token_ids: Optional[Sequence[int]] = None,
    pad_id: int = 0,
    model_id: Optional[str] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> GistCache:
    """Run prompts through ``model`` once and keep only their gist positions' keys and values.

    Prompts of different lengths are batched with left padding (padding is never attended);
    prompt and gist tokens attend causally (the gist mask restricts only what follows the gists).
    The prompts' own keys/values are held for one layer at a time, during this call only, and
    each layer runs ``chunk_size`` tokens per pass (see ``_attention.gist_entries``): the memory
    compression needs grows with one layer's keys/values, not with the whole model's.

    Args:
        model (TransformerDecoder): the model (in eval mode); any torchtune decoder, LoRA or NF4 included.
        prompts (Union[Sequence[Sequence[int]], torch.Tensor]): per example, the prompt's token ids
            followed by exactly the gist span ``gist_token_ids`` (in order).
        gist_token_ids (Optional[Sequence[int]]): the K gist ids; defaults to ``model.tok_embeddings.gist_token_ids``.
        pad_id (int): token id written into padding slots (any valid id; never attended).
        model_id (Optional[str]): a name for the model, stored in the fingerprint.
        chunk_size (int): prompt tokens per forward pass of a layer (larger: fewer passes, more memory).

    Returns:
        GistCache: ``b`` rows of K entries per layer; ``next_pos[i] = len(prompts[i])``.

    Raises:
        ValueError: for a prompt without the gist span at its end, a non-contiguous span or one of
            another length, token ids outside the vocabulary, a prompt beyond ``max_seq_len``, or a
            ``chunk_size`` that is not a whole number >= 1.
        TypeError: for prompts that are not token-id lists or a model that is not a torchtune decoder.
    """
    ids = resolve_gist_token_ids(model, gist_token_ids)
    rows = token_rows(prompts, "prompts")
    check_gist_suffix(rows, ids)
    check_token_range(model, rows, ids, "prompts")
    check_pad_id(model, pad_id)
    lengths = [len(r) for r in rows]
    check_max_position(model, max(lengths) - 1, "a prompt")
    device, _ = model_device_dtype(model)
    tokens, input_pos, valid = left_pad(rows, [0] * len(rows), pad_id, device)
    keys, values = gist_entries(model, tokens, input_pos, valid, len(ids), chunk_size)
    return GistCache(
        keys=keys,
        values=values,
        next_pos=torch.tensor(lengths, dtype=torch.long, device=device),
        gist_token_ids=ids,
        fingerprint=model_fingerprint(model, ids, model_id),
    )
