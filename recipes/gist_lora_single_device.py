"""Gist LoRA / QLoRA fine-tuning on one device (GPU or CPU).

Trains K gist embeddings (and LoRA adapters, unless ``train_lora: False``) on a frozen base so that
everything after the gist span reads the prompt only through the gists. With a QLoRA config
(NF4 base), Llama 3.1 8B is meant for one 24 GB GPU (the NF4 base holds about 5.7 GiB; the peak has not
yet been measured on a GPU: benchmarks/RESULTS.md).

Usage::

    tune run gist_lora_single_device --config configs/llama3_1/8B_gist_qlora_single_device.yaml
    tune run gist_lora_single_device --config configs/tiny/gist_lora_single_device.yaml num_gist_tokens=4

Everything gist-specific (batches with the gist mask, checks, the training loop, checkpoints that
resume exactly) lives in :mod:`torchtune_gist.training`; this file builds the model.
"""

import sys
from typing import Dict, Optional

import torch
from omegaconf import DictConfig
from torch import nn
from torchtune import config, modules, training

from torchtune_gist._cli import user_errors
from torchtune_gist.modules import set_trainable_params
from torchtune_gist.training import GistFinetuneRecipeBase, StartingAdapter, load_base_weights


class GistLoRAFinetuneRecipeSingleDevice(GistFinetuneRecipeBase):
    """Single-device gist LoRA/QLoRA recipe. Config keys: those listed in :class:`GistFinetuneRecipeBase`
    (``model``, ``tokenizer``, ``checkpointer``, ``dataset``, ``validation_dataset``, ``collate_fn``, ``optimizer``,
    ``lr_scheduler``, ``loss``, ``metric_logger``, ``device``, ``dtype``, ``seed``, ``epochs``,
    ``max_steps_per_epoch``, ``batch_size``, ``shuffle``, ``gradient_accumulation_steps``, ``clip_grad_norm``,
    ``compile``, ``enable_activation_checkpointing``, ``run_val_every_n_steps``, ``log_every_n_steps``,
    ``log_peak_memory_stats``, ``output_dir``, ``save_every_n_steps``, ``keep_last_n_step_checkpoints``,
    ``save_merged_hf``, ``resume_from_checkpoint``, ``base_model_name``, ``initial_adapter``, ``num_gist_tokens``,
    ``mask_mode``, ``train_lora``, ``mask_format``); nothing else is read. torchtune's ``enable_activation_offloading``,
    ``optimizer_in_bwd`` and ``profiler`` are not implemented (an error when turned on)."""

    def _setup_model(
        self, cfg_model: DictConfig, base_state_dict: Dict[str, torch.Tensor], adapter: StartingAdapter
    ) -> nn.Module:
        model = self._build_model(cfg_model, self._device, adapter, base_state_dict)
        load_base_weights(model, base_state_dict)
        model.load_state_dict(adapter.state_dict, strict=False)
        set_trainable_params(model, train_lora=self._train_lora)
        if self._enable_activation_checkpointing:
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        if self._compile:
            training.compile_model(model)
        if self._log_peak_memory_stats:
            training.log_memory_stats(training.get_memory_stats(device=self._device))
        return model


@config.parse
def recipe_main(cfg: DictConfig) -> Optional[int]:
    """Entry point: ``tune run gist_lora_single_device --config ...``."""
    with user_errors("gist_lora_single_device"):
        if training.is_distributed():
            raise RuntimeError(
                "gist_lora_single_device trains in one process, but a launcher started several (each would train "
                "alone and write the same checkpoints): use tune run --nproc_per_node N gist_lora_distributed --config"
            )
        config.log_config(recipe_name="GistLoRAFinetuneRecipeSingleDevice", cfg=cfg)
        return GistLoRAFinetuneRecipeSingleDevice(cfg=cfg).run(cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
