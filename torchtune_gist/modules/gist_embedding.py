"""Token embedding with K trainable gist rows on top of a frozen vocabulary.

The base vocabulary stays the parameter ``weight`` (``[V, d]``), so the state-dict key of a
model's embedding is still ``tok_embeddings.weight``, base checkpoints load unchanged and
torchtune's ``TiedLinear(model.tok_embeddings)`` (which reads ``.weight``) keeps working. The K
gist rows are ``gist_embeddings`` (``[K, d]``). Gist ids may lie inside the vocabulary (Llama 3's
reserved tokens) or beyond it (``V .. V+K-1`` for vocabularies without reserved tokens); either
way a gist id takes its gist row and never its vocabulary row.

``GistEmbedding`` implements torchtune's ``AdapterModule`` protocol (``adapter_params``), so
``torchtune.modules.peft.get_adapter_params`` returns the gist rows next to the LoRA weights.
"""

from typing import Dict, List, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.distributed.tensor import DTensor, distribute_tensor
from torchtune.modules.peft import get_adapter_params

from torchtune_gist._checks import is_whole

GIST_PARAM_NAME = "gist_embeddings"


def _check_gist_token_ids(gist_token_ids: Sequence[int], num_embeddings: int) -> List[int]:
    ids = list(gist_token_ids)
    if not ids:
        raise ValueError("gist_token_ids is empty: at least one gist token is needed")
    if not all(is_whole(t) for t in ids):
        raise TypeError(f"gist_token_ids must be integers, got {ids!r}")
    ids = [int(t) for t in ids]
    if len(set(ids)) != len(ids):
        raise ValueError(f"gist_token_ids must be distinct, got {ids!r}")
    limit = num_embeddings + len(ids)
    bad = [t for t in ids if not 0 <= t < limit]
    if bad:
        raise ValueError(
            f"gist token ids {bad} are out of range: with a vocabulary of {num_embeddings} and "
            f"{len(ids)} gist tokens, ids must lie in [0, {limit})"
        )
    return ids


class GistEmbedding(nn.Module):
    """A frozen token embedding plus K trainable gist rows.

    Args:
        num_embeddings (int): vocabulary size V (rows of ``weight``).
        embedding_dim (int): embedding width d.
        gist_token_ids (Sequence[int]): the K gist ids, distinct, each in ``[0, V + K)``.
            Row ``k`` of ``gist_embeddings`` is the embedding of ``gist_token_ids[k]``.
        device (Union[str, torch.device, None]): where to allocate the parameters.
        dtype (torch.dtype | None): parameter dtype.

    Raises:
        ValueError: if the ids are empty, repeated or out of range.
        TypeError: if an id is not an integer.

    Attributes:
        weight (nn.Parameter): the vocabulary ``[V, d]``, ``requires_grad=False``.
        gist_embeddings (nn.Parameter): the gist rows ``[K, d]``, trainable.
        gist_token_ids (List[int]): the K gist ids.
        num_gist_tokens (int): K.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        gist_token_ids: Sequence[int],
        *,
        device: Union[str, torch.device, None] = None,
        dtype: Union[torch.dtype, None] = None,
    ) -> None:
        super().__init__()
        self.gist_token_ids = _check_gist_token_ids(gist_token_ids, num_embeddings)
        self.num_gist_tokens = len(self.gist_token_ids)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, **factory), requires_grad=False)
        self.gist_embeddings = nn.Parameter(torch.empty(self.num_gist_tokens, embedding_dim, **factory))
        self._ids_by_device: Dict[torch.device, torch.Tensor] = {}
        self.reset_parameters()

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, gist_token_ids: Sequence[int]) -> "GistEmbedding":
        """Wrap an existing embedding, sharing (not copying) its weight, which is frozen.

        The gist rows are set to the vocabulary mean, or left uninitialised on the meta device.
        """
        weight = embedding.weight
        with torch.device("meta"):
            module = cls(weight.shape[0], weight.shape[1], gist_token_ids, dtype=weight.dtype)
        module.weight = weight
        weight.requires_grad_(False)
        module.gist_embeddings = nn.Parameter(torch.empty_like(module.gist_embeddings, device=weight.device))
        if not weight.is_meta:
            init_gist_embeddings(module)
        return module

    def reset_parameters(self) -> None:
        """``nn.Embedding``'s init for the vocabulary (N(0, 1)), then the gist rows to its mean."""
        if self.weight.is_meta:
            return
        with torch.no_grad():
            nn.init.normal_(self.weight)
        init_gist_embeddings(self)

    def adapter_params(self) -> List[str]:
        """Names of the trainable parameters (torchtune's ``AdapterModule`` protocol)."""
        return [GIST_PARAM_NAME]

    def _ids_on(self, device: torch.device) -> torch.Tensor:
        """The gist ids as a tensor on ``device``, cached (not a buffer: ``to_empty`` would wipe it)."""
        ids = self._ids_by_device.get(device)
        if ids is None:
            ids = torch.tensor(self.gist_token_ids, dtype=torch.long, device=device)
            self._ids_by_device[device] = ids
        return ids

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """
        Args:
            tokens (torch.Tensor): token ids, shape ``[b, s]`` (any leading shape works).

        Returns:
            torch.Tensor: embeddings ``[b, s, d]``: the gist row for gist ids, the vocabulary row otherwise.
        """
        match = tokens.unsqueeze(-1) == self._ids_on(tokens.device)
        is_gist = match.any(-1)
        base = F.embedding(torch.where(is_gist, 0, tokens), self.weight)
        gist = F.embedding(match.int().argmax(-1), self.gist_embeddings).to(base.dtype)
        return torch.where(is_gist.unsqueeze(-1), gist, base)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, gist_token_ids={self.gist_token_ids}"


def get_gist_embedding(model: nn.Module) -> GistEmbedding:
    """The ``GistEmbedding`` of a gist-aware model (or the module itself if it is one).

    Raises:
        TypeError: if ``model`` has no ``GistEmbedding`` as ``tok_embeddings``.
    """
    if isinstance(model, GistEmbedding):
        return model
    emb = getattr(model, "tok_embeddings", None)
    if not isinstance(emb, GistEmbedding):
        raise TypeError(
            f"{type(model).__name__} is not gist-aware: its tok_embeddings is {type(emb).__name__}, not "
            "GistEmbedding; build it with a torchtune_gist.models builder or add_gist_embedding()"
        )
    return emb


def initial_gist_rows(vocab_weight: torch.Tensor, num_gist_tokens: int) -> torch.Tensor:
    """The paper's initial gist rows: K copies of the mean vocabulary row.

    Pure function, for use on a full base state dict (e.g. before loading it into a sharded model).

    Args:
        vocab_weight (torch.Tensor): the vocabulary ``[V, d]``.
        num_gist_tokens (int): K.

    Returns:
        torch.Tensor: ``[K, d]`` in ``vocab_weight``'s dtype (mean accumulated in fp32).
    """
    mean = torch.mean(vocab_weight, dim=0, dtype=torch.float32)
    if isinstance(mean, DTensor):
        mean = mean.full_tensor()
    return mean.to(vocab_weight.dtype).expand(num_gist_tokens, -1).clone()


@torch.no_grad()
def init_gist_embeddings(model_or_module: nn.Module) -> None:
    """Set the gist rows to the mean of the vocabulary rows (call after loading base weights).

    Materialises the gist rows on the vocabulary's device when they are still on the meta device
    (torchtune builds on meta, then loads base weights). FSDP2-sharded gist rows must be
    materialised already (or loaded through the full state dict, see :func:`initial_gist_rows`).

    Raises:
        TypeError: if the model is not gist-aware.
        ValueError: if the vocabulary is still on the meta device, or sharded gist rows are.
    """
    emb = get_gist_embedding(model_or_module)
    weight = emb.weight
    if weight.is_meta:
        raise ValueError("the vocabulary (tok_embeddings.weight) is on the meta device: load the base weights first")
    rows = initial_gist_rows(weight, emb.num_gist_tokens)
    gist = emb.gist_embeddings
    if gist.is_meta:
        if isinstance(gist, DTensor):
            raise ValueError(
                "the gist rows are sharded and still on the meta device: put "
                "initial_gist_rows(base_state_dict['tok_embeddings.weight'], K) into the full state dict "
                "under 'tok_embeddings.gist_embeddings' and load it with the base weights instead"
            )
        gist = nn.Parameter(torch.empty_like(gist, device=weight.device), requires_grad=gist.requires_grad)
        emb.gist_embeddings = gist
    if isinstance(gist, DTensor):
        rows = distribute_tensor(rows.to(gist.device), gist.device_mesh, gist.placements)
    gist.copy_(rows)


def state_dict_name(name: str) -> str:
    """A parameter name from ``named_parameters`` as the model's state dict spells it.

    Activation checkpointing wraps layers, so ``named_parameters`` says ``layers.0._checkpoint_wrapped_module.attn...``
    where ``state_dict`` (and every checkpoint) says ``layers.0.attn...``.
    """
    return name.replace(_CHECKPOINT_PREFIX, "")


def trainable_gist_params(model: nn.Module, *, train_lora: bool = True) -> Dict[str, nn.Parameter]:
    """The parameters a gist recipe trains: the gist rows, and LoRA/DoRA weights if ``train_lora``.

    Returns:
        Dict[str, nn.Parameter]: state-dict names (:func:`state_dict_name`) to parameters.

    Raises:
        TypeError: if the model is not gist-aware.
    """
    get_gist_embedding(model)
    params = {state_dict_name(k): v for k, v in get_adapter_params(model).items()}
    if not train_lora:
        params = {k: v for k, v in params.items() if k.rsplit(".", 1)[-1] == GIST_PARAM_NAME}
    return params


def set_trainable_params(model: nn.Module, *, train_lora: bool = True) -> Dict[str, nn.Parameter]:
    """Freeze every parameter but the gist rows (and the LoRA/DoRA weights if ``train_lora``).

    Returns:
        Dict[str, nn.Parameter]: the trainable parameters, as :func:`trainable_gist_params`.
    """
    params = trainable_gist_params(model, train_lora=train_lora)
    for name, p in model.named_parameters():
        p.requires_grad_(state_dict_name(name) in params)
    return params
