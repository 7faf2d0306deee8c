"""Gist LoRA fine-tuning on many devices with FSDP2 (one or many nodes through torchrun).

Usage::

    tune run --nproc_per_node 4 gist_lora_distributed --config configs/llama3_1/8B_gist_lora.yaml
    tune run --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        gist_lora_distributed --config configs/llama3_1/8B_gist_lora.yaml
    tune run --nproc_per_node 2 gist_lora_distributed --config configs/tiny/gist_lora_distributed.yaml  # CPU, gloo

The model is built on the meta device, sharded with ``fully_shard`` and filled from full state
dicts, as in torchtune's distributed LoRA recipe. On CPU the process group is gloo and no CUDA call
is made. Everything gist-specific lives in :mod:`torchtune_gist.training`.
"""

import sys
import time
from functools import partial
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torchtune import config, modules, training
from torchtune.modules.peft import DoRALinear, LoRALinear

from torchtune_gist._cli import user_errors
from torchtune_gist.modules import set_trainable_params
from torchtune_gist.training import (
    FSDP_KEYS,
    GistFinetuneRecipeBase,
    StartingAdapter,
    check_base_keys,
    initialize_dora_magnitudes,
)


class GistLoRAFinetuneRecipeDistributed(GistFinetuneRecipeBase):
    """FSDP2 gist LoRA recipe. Config keys: those of the single-device recipe, listed in
    :class:`GistFinetuneRecipeBase` (components, training, checkpoint and gist settings, ``mask_format``,
    ``initial_adapter``, ``base_model_name`` included), plus torchtune's FSDP settings ``fsdp_cpu_offload``,
    ``fsdp_reshard_after_forward`` and ``custom_sharded_layers``; nothing else is read. torchtune's
    ``enable_activation_offloading``, ``optimizer_in_bwd`` and ``profiler`` are not implemented (an error when
    turned on)."""

    recipe_name = "gist_lora_distributed"
    config_keys = GistFinetuneRecipeBase.config_keys + FSDP_KEYS

    def setup(self, cfg: DictConfig) -> None:
        self._fsdp_cpu_offload = bool(cfg.get("fsdp_cpu_offload", False))
        self._reshard_after_forward = bool(cfg.get("fsdp_reshard_after_forward", True))
        self._custom_sharded_layers = cfg.get("custom_sharded_layers", None)
        super().setup(cfg)

    def _setup_model(
        self, cfg_model: DictConfig, base_state_dict: Dict[str, torch.Tensor], adapter: StartingAdapter
    ) -> nn.Module:
        start = time.perf_counter()
        model = self._build_model(cfg_model, torch.device("meta"), adapter, base_state_dict)
        set_trainable_params(model, train_lora=self._train_lora)
        if self._compile:
            training.compile_model(model, verbose=self._is_rank_zero)
        if self._enable_activation_checkpointing:
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        training.shard_model(
            model=model,
            shard_conditions=[partial(training.get_shard_conditions, names_to_match=self._custom_sharded_layers)],
            cpu_offload=self._fsdp_cpu_offload,
            reshard_after_forward=self._reshard_after_forward,
        )
        with training.set_default_dtype(self._dtype), self._device:
            for m in model.modules():
                if isinstance(m, (LoRALinear, DoRALinear)) and m.lora_a.weight.is_meta:
                    m.to_empty(device="cpu" if self._fsdp_cpu_offload else self._device)
                    m.initialize_parameters()
                if hasattr(m, "rope_init"):
                    m.rope_init()
        missing, unexpected = training.load_from_full_model_state_dict(
            model, base_state_dict, self._device, cpu_offload=self._fsdp_cpu_offload
        )
        check_base_keys(missing, unexpected)
        initialize_dora_magnitudes(model)  # before the adapter loads: a resumed or initial magnitude wins
        training.load_from_full_model_state_dict(
            model, adapter.state_dict, self._device, cpu_offload=self._fsdp_cpu_offload
        )
        training.validate_no_params_on_meta_device(model)
        self._log_info(f"Model built, sharded and loaded in {time.perf_counter() - start:.2f} s")
        if self._log_peak_memory_stats:
            training.log_memory_stats(training.get_memory_stats(device=self._device))
        dist.barrier()
        return model

    def _all_reduce(self, value: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(value)
        return value

    def _from_rank_zero(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _gather_objects(self, value: Any) -> List[Any]:
        gathered: List[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def _full_state_dict(self) -> Dict[str, torch.Tensor]:
        return training.gather_cpu_state_dict(self._model, self._is_rank_zero, device=self._device)

    def _optimizer_state_dict(self) -> Dict[str, Any]:
        return training.get_full_optimizer_state_dict(
            self._model, self._optimizer, self._is_rank_zero, device=self._device
        )

    def _load_optimizer_state_dict(self, full_sd: Dict[str, Any]) -> None:
        training.load_from_full_optimizer_state_dict(self._model, self._optimizer, full_sd, self._device)

    def cleanup(self) -> None:
        super().cleanup()
        dist.destroy_process_group()


@config.parse
def recipe_main(cfg: DictConfig) -> Optional[int]:
    """Entry point: ``tune run --nproc_per_node N gist_lora_distributed --config ...``."""
    with user_errors("gist_lora_distributed"):
        if not training.is_distributed():
            raise RuntimeError(
                "gist_lora_distributed must be launched by a distributed launcher: "
                "tune run --nproc_per_node N gist_lora_distributed --config ..."
            )
        dist.init_process_group("cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo")
        if cfg.get("fsdp_cpu_offload", False) or not torch.cuda.is_available():
            training.set_torch_num_threads()
        config.log_config(recipe_name="GistLoRAFinetuneRecipeDistributed", cfg=cfg)
        return GistLoRAFinetuneRecipeDistributed(cfg=cfg).run(cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
