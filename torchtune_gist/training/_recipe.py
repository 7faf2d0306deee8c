"""The training loop both gist LoRA recipes run: :class:`GistFinetuneRecipeBase`.

The recipes differ only in how the model is built and sharded and how numbers are reduced across
ranks; the base class does the rest once: checking that model, tokenizer and data agree on the gist
tokens, building gist batches (mask mode, padding or packing, ``BlockMask`` on CUDA), the masked
forward and loss, gradient accumulation, validation, and crash-safe checkpoints that resume exactly.

Checkpoint layout (each directory written whole under a hidden temporary name, then renamed into place, so
an interrupted save leaves the earlier checkpoints and never a partial one)::

    <output_dir>/step_<N>/            (every ``save_every_n_steps`` steps, if set, and when stopped by a signal)
    <output_dir>/epoch_<E>/           (end of every epoch)
        gist_adapter.safetensors      gist rows + LoRA weights, with the gist metadata
        recipe_state.safetensors      optimizer state, RNG state, step/epoch, data-loader position, settings
        hf_merged/                    merged Hugging Face export (end of epoch, ``save_merged_hf: True``)

SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) during training finishes the optimizer step under way,
saves ``step_<N>`` and returns; a second Ctrl-C (seconds later) stops at once.
"""

import math
import signal
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from omegaconf import DictConfig, ListConfig
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from torchtune import config, training, utils
from torchtune.config._utils import _get_component_from_path
from torchtune.datasets import ConcatDataset
from torchtune.recipe_interfaces import FTRecipeInterface
from torchtune.utils._import_guard import _SUPPORTS_FLEX_ATTENTION
from tqdm import tqdm

from torchtune_gist._io import partial_directory, replace_directory, unwritable_reason
from torchtune_gist.checkpointing import (
    check_not_merged_export,
    export_merged_hf,
    gist_adapter_path,
    gist_adapter_state_dict,
    read_gist_adapter_metadata,
    save_gist_adapter,
)
from torchtune_gist.data import PackedGistDataset, padded_gist_collate
from torchtune_gist.masks import MASK_MODES
from torchtune_gist.modules import initial_gist_rows
from torchtune_gist.training._loss import masked_loss
from torchtune_gist.training._settings import (
    TRAINING_KEYS,
    TRAINING_OPTIONAL_KEYS,
    build_tokenizer,
    check_batch_length,
    check_collate_fn,
    check_components,
    check_dataset_gist_ids,
    check_input_files,
    check_known_keys,
    check_required_keys,
    check_setting_types,
    check_supported_features,
    count_setting,
    get_device,
)
from torchtune_gist.training._signals import StopRequest
from torchtune_gist.training._state import (
    ADAPTER_FILE,
    CHECKPOINT_NAME,
    RECIPE_STATE_FILE,
    latest_checkpoint,
    load_recipe_state,
    prune_step_checkpoints,
    read_recipe_progress,
    remove_leftover_checkpoints,
    save_recipe_state,
)
from torchtune_gist.training._weights import StartingAdapter, check_base_shapes, check_gist_setup

log = utils.get_logger("INFO")

# How the gist mask reaches attention: dense [b, s, s], FlexAttention BlockMask, or causal segments.
MASK_FORMATS = ("dense", "block", "segments")
# mask_format=auto without FlexAttention: segments from this row length (CPU SDPA's causal kernel skips key
# blocks of 512, so shorter rows gain nothing from segments and pay their per-row calls), dense below.
SEGMENT_MIN_LEN = 512
# mask_format=block: padded batches are padded to a multiple of FlexAttention's block size, so that torchtune's
# compiled flex_attention (dynamic=False) compiles once per multiple, not once per batch length.
FLEX_BLOCK_SIZE = 128


class GistFinetuneRecipeBase(FTRecipeInterface):
    """Training loop, data, checkpoints and logging shared by the gist LoRA recipes.

    Subclasses build the model (:meth:`_setup_model`) and say how to reduce numbers across ranks and
    gather optimizer and model state (:meth:`_all_reduce`, :meth:`_full_state_dict`,
    :meth:`_optimizer_state_dict`, :meth:`_load_optimizer_state_dict`).

    Config keys (torchtune's where they share a name; no other key is read):

    - components: ``model``, ``tokenizer``, ``checkpointer`` (base weights), ``dataset`` (one or a list),
      ``validation_dataset`` (optional), ``collate_fn`` (a gist collator: ``torchtune_gist.data.padded_gist_collate``
      or ``packed_gist_collate``; default: the one that fits the dataset), ``optimizer``, ``lr_scheduler``,
      ``loss``, ``metric_logger``;
    - training: ``device``, ``dtype``, ``seed``, ``epochs``, ``max_steps_per_epoch``, ``batch_size``, ``shuffle``,
      ``gradient_accumulation_steps``, ``clip_grad_norm``, ``compile``, ``enable_activation_checkpointing``,
      ``run_val_every_n_steps`` (needs ``validation_dataset``), ``log_every_n_steps``, ``log_peak_memory_stats``;
    - checkpoints: ``output_dir``, ``save_every_n_steps``, ``keep_last_n_step_checkpoints`` (delete older ``step_N``
      checkpoints as new ones are saved; epoch checkpoints stay; default: keep all), ``save_merged_hf``,
      ``resume_from_checkpoint``
      (True: the latest complete checkpoint under ``output_dir``; ``auto``: that, or a fresh start when there is none,
      one command for a first launch and every requeue; or a checkpoint directory),
      ``base_model_name`` (recorded in the adapter; default ``model._component_``), ``initial_adapter`` (a gist
      adapter file or checkpoint directory whose weights this run starts from, with a fresh optimizer and
      schedule: train on short contexts first, then on long ones);
    - gist: ``num_gist_tokens`` (K; interpolate it into ``model.num_gist_tokens`` and ``dataset.num_gist_tokens``),
      ``mask_mode`` (``gist`` / ``pos_control`` / ``neg_control``), ``train_lora`` (False: gist rows alone),
      ``mask_format`` (``auto``: FlexAttention ``block`` masks on CUDA, else causal ``segments`` for batches of
      512 positions and more and ``dense`` below; or one of ``dense``, ``segments``, ``block`` always).

    torchtune features these recipes do not implement (``enable_activation_offloading``, ``optimizer_in_bwd``,
    ``profiler.enabled``) are refused when turned on, and any other top-level key is refused unless an interpolation
    reads it (a misspelt ``resume_from_checkpont`` would otherwise start afresh).
    """

    #: The recipe's name for ``tune run`` and the top-level keys it reads (a subclass adds its own).
    recipe_name = "gist_lora_single_device"
    config_keys: Tuple[str, ...] = TRAINING_KEYS + TRAINING_OPTIONAL_KEYS

    def __init__(self, cfg: DictConfig) -> None:
        check_required_keys(cfg, TRAINING_KEYS, "a gist training recipe", "configs/llama3_1/8B_gist_lora.yaml")
        check_known_keys(cfg, self.config_keys, self.recipe_name)
        check_components(cfg)
        check_supported_features(cfg)
        check_setting_types(cfg)
        self._device = get_device(cfg.device)
        self._dtype = training.get_dtype(cfg.dtype, device=self._device)
        if self._dtype == torch.float16:
            raise ValueError("fp16 training is not supported: use bf16 or fp32")
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self._is_rank_zero = self.rank == 0
        self._output_dir = Path(cfg.output_dir)
        self._num_gist_tokens = count_setting(cfg, "num_gist_tokens")
        self._mask_mode = str(cfg.get("mask_mode", "gist"))
        if self._mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode={self._mask_mode!r} is not one of {', '.join(MASK_MODES)}")
        self._compile = bool(cfg.get("compile", False))
        self._mask_format = self._resolve_mask_format(str(cfg.get("mask_format", "auto")))
        self._train_lora = bool(cfg.get("train_lora", True))
        self._log_every_n_steps = count_setting(cfg, "log_every_n_steps", default=1)
        self._log_peak_memory_stats = bool(cfg.get("log_peak_memory_stats", False)) and self._device.type == "cuda"
        self.seed = training.set_seed(seed=cfg.seed)
        self.total_epochs = count_setting(cfg, "epochs")
        self.max_steps_per_epoch = count_setting(cfg, "max_steps_per_epoch", optional=True)
        self._gradient_accumulation_steps = count_setting(cfg, "gradient_accumulation_steps")
        self._batch_size = count_setting(cfg, "batch_size")
        self._clip_grad_norm = cfg.get("clip_grad_norm", None)
        self._save_every_n_steps = count_setting(cfg, "save_every_n_steps", optional=True)
        self._keep_last_n_step_checkpoints = count_setting(cfg, "keep_last_n_step_checkpoints", optional=True)
        self._save_merged_hf = bool(cfg.get("save_merged_hf", False))
        self._run_val_every_n_steps = count_setting(cfg, "run_val_every_n_steps", optional=True)
        self._resume_from_checkpoint = cfg.get("resume_from_checkpoint", False)
        self._enable_activation_checkpointing = bool(cfg.get("enable_activation_checkpointing", False))
        self._base_model_name = str(cfg.get("base_model_name", cfg.model._component_))
        self._base_checkpoint_dir = cfg.checkpointer.get("checkpoint_dir")
        self.epochs_run = 0
        self.global_step = 0
        self._batches_into_epoch = 0
        self.loss_history: List[Tuple[int, float]] = []
        self.stop_signal: Optional[int] = None  # set by train() when a signal stopped it

    # Hooks for the recipes.
    def _resolve_mask_format(self, mask_format: str) -> str:
        """``auto``: FlexAttention ``BlockMask``s where torchtune uses FlexAttention (CUDA); else, compiled,
        dense; else ``auto`` (segments for batches of ``SEGMENT_MIN_LEN`` positions and more, dense below)."""
        flex = self._device.type == "cuda" and _SUPPORTS_FLEX_ATTENTION
        if mask_format == "auto":
            return "block" if flex else "dense" if self._compile else "auto"
        if mask_format not in MASK_FORMATS:
            raise ValueError(f"mask_format={mask_format!r} is not one of auto, {', '.join(MASK_FORMATS)}")
        if mask_format == "block" and not flex:
            raise ValueError(
                "mask_format=block needs FlexAttention, which torchtune uses on CUDA only: use segments or dense"
            )
        if mask_format == "segments" and self._compile:
            raise ValueError(
                "mask_format=segments does not compile (its per-row spans would recompile every batch): "
                "use mask_format=dense (or auto) with compile=True, or compile=False"
            )
        return mask_format

    def _setup_model(
        self, cfg_model: DictConfig, base_state_dict: Dict[str, torch.Tensor], adapter: StartingAdapter
    ) -> nn.Module:
        """Build the model (:meth:`_build_model`), load base weights and ``adapter.state_dict``, set what trains."""
        raise NotImplementedError

    def _build_model(
        self,
        cfg_model: DictConfig,
        device: torch.device,
        adapter: StartingAdapter,
        base_state_dict: Dict[str, torch.Tensor],
    ) -> nn.Module:
        """Instantiate the model on ``device``; check it against the tokenizer, the gist settings, the base weights'
        shapes and the adapter to load (:meth:`StartingAdapter.check`)."""
        with training.set_default_dtype(self._dtype), device:
            model = config.instantiate(cfg_model)
        self._gist_ids = check_gist_setup(model, self._tokenizer, self._num_gist_tokens, self._mask_mode)
        check_base_shapes(model, base_state_dict)
        adapter.check(model)
        return model

    def _all_reduce(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def _from_rank_zero(self, value: Any) -> Any:
        """Rank 0's ``value`` (a picklable object) on every rank."""
        return value

    def _gather_objects(self, value: Any) -> List[Any]:
        """Every rank's ``value`` (a picklable object), in rank order, on every rank."""
        return [value]

    def _full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """The full model state dict for the merged export; ``None``: read it from the model."""
        return None

    def _optimizer_state_dict(self) -> Dict[str, Any]:
        """The optimizer state keyed by parameter names, on the CPU."""
        return get_optimizer_state_dict(
            self._model, self._optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def _load_optimizer_state_dict(self, full_sd: Dict[str, Any]) -> None:
        set_optimizer_state_dict(self._model, self._optimizer, full_sd)

    def _log_info(self, message: str) -> None:
        utils.log_rank_zero(log, message)

    # Setup.
    def setup(self, cfg: DictConfig) -> None:
        """Build the tokenizer, model, optimizer, loss, data, scheduler; restore state when resuming."""
        check_input_files(cfg)
        check_not_merged_export(cfg.checkpointer.get("checkpoint_dir"))
        problem = unwritable_reason(self._output_dir, directory=True)
        if problem:
            raise ValueError(f"output_dir: {problem}: give a directory (created if missing)")
        if self._is_rank_zero:
            self._metric_logger = config.instantiate(cfg.metric_logger)
            self._metric_logger.log_config(cfg)
            for leftover in remove_leftover_checkpoints(self._output_dir):
                log.warning(f"removed {leftover}, left by an interrupted save")
        self._tokenizer = build_tokenizer(cfg)

        resume = self._find_resume_checkpoint()
        adapter: Optional[StartingAdapter] = None
        if resume is not None:
            if cfg.get("initial_adapter"):
                log.warning(
                    f"initial_adapter is ignored: resuming from {resume} (give the next stage its own output_dir)"
                )
            saved_seed = read_recipe_progress(resume / RECIPE_STATE_FILE).get("seed")
            if cfg.seed is None and saved_seed is not None:  # seed: null drew one; the data order needs the first run's
                self.seed = training.set_seed(seed=saved_seed)
            path = resume / ADAPTER_FILE
            adapter = StartingAdapter(
                load_file(str(path)), "resume_from_checkpoint", path, read_gist_adapter_metadata(path)
            )
            self._log_info(f"Resuming from {resume}")
        elif cfg.get("initial_adapter"):
            adapter = self._load_initial_adapter(cfg.initial_adapter)
        base_sd = self._load_base_state_dict(cfg.checkpointer)
        if adapter is None:
            if "tok_embeddings.weight" not in base_sd:
                raise ValueError("the base checkpoint has no 'tok_embeddings.weight': cannot initialise the gist rows")
            rows = initial_gist_rows(base_sd["tok_embeddings.weight"], self._num_gist_tokens)
            adapter = StartingAdapter({"tok_embeddings.gist_embeddings": rows})
        self._model = self._setup_model(cfg.model, base_sd, adapter)
        del base_sd, adapter

        self._optimizer = config.instantiate(cfg.optimizer, [p for p in self._model.parameters() if p.requires_grad])
        self._loss_fn = config.instantiate(cfg.loss)
        if self._compile:
            self._loss_fn = training.compile_loss(self._loss_fn, verbose=self._is_rank_zero)
        if self._loss_fn.__class__.__name__ == "CEWithChunkedOutputLoss":
            self._model.set_num_output_chunks(self._loss_fn.num_output_chunks)

        self._dataloader = self._setup_data(cfg, "dataset", shuffle=cfg.shuffle, drop_last=True)
        self._val_dataloader = (
            self._setup_data(cfg, "validation_dataset", shuffle=False, drop_last=False)
            if cfg.get("validation_dataset") is not None
            else None
        )
        if self._mask_format == "block":
            if self._model.max_seq_len % FLEX_BLOCK_SIZE:
                raise ValueError(
                    f"mask_format=block pads batches to multiples of {FLEX_BLOCK_SIZE}, beyond the model's "
                    f"max_seq_len={self._model.max_seq_len}: use a multiple of {FLEX_BLOCK_SIZE}, or mask_format=dense"
                )
            self._allow_flex_recompiles(self._model.max_seq_len)
        self._settings = {
            "train_lora": self._train_lora,
            "mask_mode": self._mask_mode,
            "batch_size": self._batch_size,
            "gradient_accumulation_steps": self._gradient_accumulation_steps,
            "world_size": self.world_size,
            "shuffle": bool(cfg.shuffle),
            "num_examples": len(self._dataloader.dataset),
            "seed": self.seed,
        }
        self._steps_per_epoch = len(self._dataloader) // self._gradient_accumulation_steps
        if self.max_steps_per_epoch is not None:
            self._steps_per_epoch = min(self._steps_per_epoch, self.max_steps_per_epoch)
        if self._steps_per_epoch < 1:
            raise ValueError(
                f"the dataset gives {len(self._dataloader)} batches per rank, fewer than gradient_accumulation_steps="
                f"{self._gradient_accumulation_steps}: use more data or a smaller batch"
            )
        if resume is not None:
            self._restore(resume)
        total_steps = self.total_epochs * self._steps_per_epoch
        warmup = cfg.lr_scheduler.get("num_warmup_steps")
        if isinstance(warmup, int) and warmup > total_steps and self._is_rank_zero:
            log.warning(
                f"lr_scheduler.num_warmup_steps={warmup} is more than the run's {total_steps} steps: the lr never "
                "reaches its peak"
            )
        self._lr_scheduler = config.instantiate(
            cfg.lr_scheduler, self._optimizer, num_training_steps=total_steps, last_epoch=self.global_step - 1
        )
        self._ignore_index = self._loss_fn.ignore_index

    def _load_initial_adapter(self, path_or_dir: str) -> StartingAdapter:
        """Gist rows and LoRA weights to start from (a curriculum: short contexts first, then long ones).

        Only the weights: the optimizer, the lr schedule and the step count start afresh.

        K is checked here, before the base loads; the rest of its metadata against the model once built
        (:meth:`_build_model`).

        Raises:
            ValueError: a missing file, a file that is not a gist adapter, or one trained with another K.
        """
        try:
            path = gist_adapter_path(path_or_dir)
            meta = read_gist_adapter_metadata(path)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"initial_adapter: {e}") from e
        k = meta.get("num_gist_tokens")
        if k != self._num_gist_tokens:
            raise ValueError(
                f"initial_adapter {path} holds K={k} gist rows; this run has num_gist_tokens={self._num_gist_tokens}"
            )
        self._log_info(f"Starting from the gist adapter {path}")
        trained = meta.get("mask_mode")
        if trained is not None and trained != self._mask_mode and self._is_rank_zero:
            log.warning(
                f"initial_adapter {path} was trained with mask_mode={trained}; this run trains it on with mask_mode="
                f"{self._mask_mode} (the paper's controls are trained in their own mode from the start)"
            )
        return StartingAdapter(load_file(str(path)), "initial_adapter", path, meta)

    def _find_resume_checkpoint(self) -> Optional[Path]:
        """The checkpoint to resume from, as rank 0 sees it (every rank reads that one), or ``None``."""
        setting = self._resume_from_checkpoint
        latest = str(setting).lower() in ("true", "auto")
        if not setting or latest:
            found, present = None, []
            if self._is_rank_zero and self._output_dir.is_dir():
                present = sorted(
                    d.name for d in self._output_dir.iterdir() if d.is_dir() and CHECKPOINT_NAME.match(d.name)
                )
                found = latest_checkpoint(self._output_dir) if setting and present else None
            found, present = self._from_rank_zero((None if found is None else str(found), present))
            if not setting:
                if present:
                    self._log_info(
                        f"output_dir {self._output_dir} already holds {', '.join(present)}: this run's checkpoints "
                        "replace those of the same name (resume_from_checkpoint=auto would continue the newest instead)"
                    )
                return None
            if found is None and present:
                raise ValueError(
                    f"resume_from_checkpoint={setting}: {self._output_dir} holds {', '.join(present)} but no complete, "
                    "readable checkpoint (see the warnings above): move them away to start afresh, or set "
                    "resume_from_checkpoint to a checkpoint directory"
                )
            if found is None:
                if str(setting).lower() == "auto":
                    self._log_info(f"resume_from_checkpoint=auto: no checkpoint in {self._output_dir}, starting afresh")
                    return None
                raise ValueError(
                    f"resume_from_checkpoint is set but {self._output_dir} holds no complete checkpoint "
                    "(resume_from_checkpoint=auto starts afresh then)"
                )
            path = Path(found)
        else:
            path = Path(setting)
        missing = [name for name in (ADAPTER_FILE, RECIPE_STATE_FILE) if not (path / name).exists()]
        missing_by_rank = self._gather_objects(missing)  # every rank raises together, none waits in a collective
        if any(missing_by_rank):
            rank, names = next((r, m) for r, m in enumerate(missing_by_rank) if m)
            where = f" on rank {rank} (output_dir must be on a filesystem every node sees)" if rank else ""
            raise ValueError(f"cannot resume from {path}: {', '.join(names)} missing{where}")
        return path

    def _check_resume_settings(self, path: Path, saved: Dict[str, Any]) -> None:
        """Refuse a resume whose settings differ from the checkpoint's where they would train silently wrong:
        ``train_lora`` and ``mask_mode`` always; mid-epoch, what fixes the data order and position."""
        keys = ["train_lora", "mask_mode"]
        if self._batches_into_epoch:
            keys += ["batch_size", "gradient_accumulation_steps", "world_size", "shuffle", "num_examples", "seed"]
        changed = [
            f"{k} was {saved[k]!r}, now {self._settings[k]!r}"
            for k in keys
            if k in saved and saved[k] != self._settings[k]
        ]
        if changed:
            raise ValueError(
                f"cannot resume from {path}: {'; '.join(changed)}. Resume with the checkpoint's settings, or start a "
                f"new run from its weights with initial_adapter={path}"
            )

    def _load_base_state_dict(self, cfg_checkpointer: DictConfig) -> Dict[str, torch.Tensor]:
        checkpointer = config.instantiate(cfg_checkpointer, should_load_recipe_state=False)
        return checkpointer.load_checkpoint()[training.MODEL_KEY]

    def _setup_data(self, cfg: DictConfig, key: str, *, shuffle: bool, drop_last: bool) -> StatefulDataLoader:
        """The loader of the dataset(s) under config key ``key``, checked against the model's gist ids.

        Raises:
            ValueError: for datasets that disagree with the model on the gist ids, mix packed and unpacked
                rows, or are empty; or for a ``collate_fn`` that is not a gist collator (or does not fit).
        """
        listed = isinstance(cfg[key], ListConfig)
        cfg_parts = list(cfg[key]) if listed else [cfg[key]]
        names = [f"{key}[{i}]" for i in range(len(cfg_parts))] if listed else [key]
        parts = [config.instantiate(c, self._tokenizer) for c in cfg_parts]
        for part, cfg_part, name in zip(parts, cfg_parts, names):
            check_dataset_gist_ids(part, cfg_part, name, self._gist_ids)
        packed = {isinstance(d, PackedGistDataset) for d in parts}
        if len(packed) > 1:
            raise ValueError("the datasets must be all packed or all unpacked (set `packed` the same in each)")
        packed_rows = packed.pop()
        ds = ConcatDataset(parts) if len(parts) > 1 else parts[0]
        if len(ds) == 0:
            raise ValueError(f"{key} is empty: give it examples (or remove it)")
        collate_kwargs: Dict[str, Any] = {}
        if not packed_rows:
            collate_kwargs["ignore_idx"] = self._loss_fn.ignore_index
            if self._mask_format == "block":
                collate_kwargs["pad_to_multiple_of"] = FLEX_BLOCK_SIZE
        default_collate = (
            "torchtune_gist.data.packed_gist_collate" if packed_rows else "torchtune_gist.data.padded_gist_collate"
        )
        collate_name = cfg.get("collate_fn") or default_collate
        collate_fn = _get_component_from_path(collate_name)
        if packed_rows and collate_fn is padded_gist_collate:
            raise ValueError(
                "packed datasets need torchtune_gist.data.packed_gist_collate (or no collate_fn), "
                "not padded_gist_collate: it would let documents in a row attend to each other"
            )
        collate_kwargs.update(
            gist_token_ids=self._gist_ids,
            pad_id=self._tokenizer.pad_id,
            mask_mode=self._mask_mode,
            block_mask=self._mask_format == "block",
            block_mask_device=self._device,
            segment_mask=self._mask_format in ("segments", "auto"),
            segment_min_len=SEGMENT_MIN_LEN if self._mask_format == "auto" else 0,
        )
        check_collate_fn(collate_fn, collate_name, collate_kwargs)
        sampler = StatefulDistributedSampler(
            ds, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle, seed=self.seed
        )
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, which torch 2.13 deprecates
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            return StatefulDataLoader(
                dataset=ds,
                batch_size=self._batch_size,
                sampler=sampler,
                collate_fn=partial(collate_fn, **collate_kwargs),
                drop_last=drop_last,
                generator=torch.Generator().manual_seed(
                    self.seed
                ),  # a new iterator's draw leaves the global generator alone
            )

    def _allow_flex_recompiles(self, max_seq_len: int) -> None:
        """Let torchtune's compiled flex_attention (``dynamic=False``) compile for every padded batch length.

        Batches come in up to ``max_seq_len / 128`` lengths (and the validation batches' as many again), bounded by
        the model's ``max_seq_len`` (which :func:`check_batch_length` enforces; the tokenizer's does not bound passkey
        rows); past ``torch._dynamo.config.recompile_limit`` (8) dynamo would run FlexAttention unfused.
        """
        lengths = 2 * math.ceil(max_seq_len / FLEX_BLOCK_SIZE)
        if torch._dynamo.config.recompile_limit < lengths:
            torch._dynamo.config.recompile_limit = lengths
            self._log_info(
                f"torch._dynamo.config.recompile_limit raised to {lengths}: one flex_attention compile per length"
            )

    def _rng_states(self) -> Dict[str, torch.Tensor]:
        """Every rank's generators, which a resumed run continues (LoRA dropout draws from them): the CPU's and,
        training there, the GPU's; rank 0's under ``cpu`` / ``cuda``, rank r's under ``cpu.rank<r>`` /
        ``cuda.rank<r>`` (gathered: call on every rank)."""
        own = {"cpu": torch.get_rng_state()}
        if self._device.type == "cuda":
            own["cuda"] = torch.cuda.get_rng_state(self._device)
        states: Dict[str, torch.Tensor] = {}
        for rank, rank_states in enumerate(self._gather_objects(own)):
            states.update({(name if rank == 0 else f"{name}.rank{rank}"): t for name, t in rank_states.items()})
        return states

    def _restore(self, path: Path) -> None:
        optim_sd, progress, rng = load_recipe_state(path / RECIPE_STATE_FILE)
        if progress["num_gist_tokens"] != self._num_gist_tokens:
            raise ValueError(
                f"{path} was trained with K={progress['num_gist_tokens']}, the config says {self._num_gist_tokens}"
            )
        self.epochs_run, self.global_step = progress["epochs_run"], progress["global_step"]
        self._batches_into_epoch = progress["batches_into_epoch"]
        self._check_resume_settings(path, progress.get("settings", {}))
        self._load_optimizer_state_dict(optim_sd)
        suffix = f".rank{self.rank}" if self.rank else ""
        if f"cpu{suffix}" in rng:  # else a checkpoint of another world size, or from before ranks' states were saved
            torch.set_rng_state(rng[f"cpu{suffix}"])
            if self._device.type == "cuda" and f"cuda{suffix}" in rng:
                torch.cuda.set_rng_state(rng[f"cuda{suffix}"], self._device)
        self.loss_history = [tuple(x) for x in progress.get("loss_history", [])]
        if progress.get("dataloader") is not None:
            self._dataloader.load_state_dict(progress["dataloader"])

    # Training.
    def _batches(self, epoch: int) -> Iterator[Tuple[int, Dict[str, Any]]]:
        self._dataloader.sampler.set_epoch(epoch)
        start = self._batches_into_epoch
        for idx, batch in enumerate(self._dataloader, start=start):
            if idx // self._gradient_accumulation_steps >= self._steps_per_epoch:
                return
            check_batch_length(batch, self._model.max_seq_len, "dataset")
            utils.batch_to_device(batch, self._device)
            yield idx, batch

    def _stop_requested(self, local: bool) -> bool:
        """Whether any rank was asked to stop (every rank gets the same answer, so all stop at one step)."""
        if self.world_size == 1:
            return local
        return bool(self._all_reduce(torch.tensor(int(local), device=self._device)).item())

    def train(self) -> None:
        """Train for the configured epochs, checkpointing as configured; on SIGINT / SIGTERM save ``step_<N>`` after
        the step under way and return, with :attr:`stop_signal` set to the signal's number (any rank's)."""
        if self._device.type == "cuda":
            training.cleanup_before_training()
        with StopRequest() as stop:
            self._train(stop)

    def _train(self, stop: StopRequest) -> None:
        if self.epochs_run >= self.total_epochs:
            self._log_info(
                f"nothing to train: the run's epochs={self.total_epochs} are all done (raise epochs to train on)"
            )
            return
        self._optimizer.zero_grad(set_to_none=True)
        running_loss, num_tokens = (
            torch.zeros((), device=self._device),
            torch.zeros((), device=self._device, dtype=torch.long),
        )
        for epoch in range(self.epochs_run, self.total_epochs):
            t0 = time.perf_counter()
            pbar = tqdm(
                total=self._steps_per_epoch,
                initial=self._batches_into_epoch // self._gradient_accumulation_steps,
                disable=not self._is_rank_zero,
                desc=f"epoch {epoch + 1}/{self.total_epochs}",
            )
            for idx, batch in self._batches(epoch):
                loss_sum, n = masked_loss(self._model, batch, self._loss_fn, self._ignore_index)
                loss_sum.backward()
                running_loss += loss_sum.detach()
                num_tokens += n
                self._batches_into_epoch = idx + 1
                if self._batches_into_epoch % self._gradient_accumulation_steps:
                    continue
                total_tokens = self._all_reduce(num_tokens.clone())
                total_loss = self._all_reduce(running_loss.clone())
                training.scale_grads(self._model, self.world_size / total_tokens.clamp(min=1))
                if self._clip_grad_norm is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        self._model.parameters(), max_norm=float(self._clip_grad_norm)
                    )
                    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2: every rank takes part in the gather
                        grad_norm = grad_norm.full_tensor()
                self._optimizer.step()
                self._optimizer.zero_grad(set_to_none=True)
                self._lr_scheduler.step()
                self.global_step += 1
                loss = (total_loss / total_tokens.clamp(min=1)).item()
                self.loss_history.append((self.global_step, loss))
                pbar.update(1)
                pbar.set_postfix(loss=f"{loss:.4f}")
                if self.global_step % self._log_every_n_steps == 0 and self._is_rank_zero:
                    elapsed = time.perf_counter() - t0
                    metrics = {
                        "loss": loss,
                        "lr": training.get_lr(self._optimizer),
                        "tokens_per_second_per_gpu": float(total_tokens) / (elapsed * self.world_size),
                    }
                    if self._clip_grad_norm is not None:
                        metrics["grad_norm"] = float(grad_norm)
                    if self._log_peak_memory_stats:
                        metrics.update(training.get_memory_stats(device=self._device))
                    self._metric_logger.log_dict(metrics, step=self.global_step)
                running_loss.zero_()
                num_tokens.zero_()
                if self._stop_requested(stop.requested):
                    # The quick way out: the validation due now is skipped, the merged export waits for the epoch's end.
                    self.save_checkpoint(f"step_{self.global_step}", end_of_epoch=False)
                    self._from_rank_zero(None)  # every rank waits until rank 0 has published it
                    pbar.close()
                    self.stop_signal = stop.signum or int(signal.SIGTERM)
                    self._log_info(
                        f"Stopped at step {self.global_step}: resume_from_checkpoint=True continues from "
                        f"step_{self.global_step}"
                    )
                    return
                if self._run_val_every_n_steps and self.global_step % self._run_val_every_n_steps == 0:
                    self.validate()
                epoch_done = self._batches_into_epoch // self._gradient_accumulation_steps >= self._steps_per_epoch
                if not epoch_done and self._save_every_n_steps and self.global_step % self._save_every_n_steps == 0:
                    self.save_checkpoint(f"step_{self.global_step}", end_of_epoch=False)
                t0 = time.perf_counter()  # the next step's throughput leaves validation and saving out
            pbar.close()
            self.epochs_run = epoch + 1
            self._batches_into_epoch = 0
            self.save_checkpoint(f"epoch_{epoch}", end_of_epoch=True)

    @torch.no_grad()
    def validate(self) -> float:
        """Mean validation loss per supervised token over the validation split (every example, the last
        partial batch included; across N ranks the sampler repeats up to N - 1 examples so each rank runs as many
        forward passes, which FSDP's gathers need)."""
        if self._val_dataloader is None:
            raise ValueError("validate() needs a validation_dataset in the config")
        self._model.eval()
        total, tokens = torch.zeros((), device=self._device), torch.zeros((), device=self._device, dtype=torch.long)
        for batch in self._val_dataloader:
            check_batch_length(batch, self._model.max_seq_len, "validation_dataset")
            utils.batch_to_device(batch, self._device)
            loss_sum, n = masked_loss(self._model, batch, self._loss_fn, self._ignore_index)
            total += loss_sum
            tokens += n
        self._model.train()
        val_loss = (self._all_reduce(total) / self._all_reduce(tokens).clamp(min=1)).item()
        if self._is_rank_zero:
            self._metric_logger.log_dict({"val_loss": val_loss}, step=self.global_step)
        return val_loss

    def save_checkpoint(self, name: str, *, end_of_epoch: bool) -> None:
        """Write the gist adapter and the recipe state (and the merged export at epoch ends)."""
        adapter = gist_adapter_state_dict(self._model)
        optim_sd = self._optimizer_state_dict()
        full_sd = self._full_state_dict() if end_of_epoch and self._save_merged_hf else None
        rng_states = self._rng_states()
        if not self._is_rank_zero:
            return
        directory = self._output_dir / name
        partial_dir = partial_directory(directory)
        save_gist_adapter(
            self._model,
            partial_dir,
            base_model=self._base_model_name,
            state_dict=adapter,
            extra_metadata={"mask_mode": self._mask_mode},
        )
        progress = {
            "epochs_run": self.epochs_run,
            "global_step": self.global_step,
            "batches_into_epoch": self._batches_into_epoch,
            "num_gist_tokens": self._num_gist_tokens,
            "seed": self.seed,
            "loss_history": self.loss_history,
            "dataloader": None if end_of_epoch else self._dataloader.state_dict(),
            "settings": self._settings,
            "saved_at": time.time(),  # resume_from_checkpoint=True/auto continue the checkpoint saved last
        }
        save_recipe_state(
            partial_dir / RECIPE_STATE_FILE, optimizer_state=optim_sd, progress=progress, rng_states=rng_states
        )
        if end_of_epoch and self._save_merged_hf:
            export_merged_hf(
                self._model,
                partial_dir / "hf_merged",
                state_dict=full_sd,
                base_model=self._base_model_name,
                base_dir=self._base_checkpoint_dir,
                mask_mode=self._mask_mode,
            )
        replace_directory(partial_dir, directory)
        self._log_info(f"Saved checkpoint to {directory}")
        if self._keep_last_n_step_checkpoints is not None:
            for pruned in prune_step_checkpoints(self._output_dir, self._keep_last_n_step_checkpoints):
                self._log_info(f"Removed {pruned} (keep_last_n_step_checkpoints={self._keep_last_n_step_checkpoints})")

    def run(self, cfg: DictConfig) -> Optional[int]:
        """``setup``, ``train`` and, whatever happens, ``cleanup``: a recipe's main. Returns the shell's exit code for
        a signal that stopped training (after its checkpoint), else ``None``."""
        try:
            self.setup(cfg)
            self.train()
        finally:
            self.cleanup()
        return 128 + self.stop_signal if self.stop_signal else None

    def cleanup(self) -> None:
        """Close the metric logger (safe after a failed or interrupted setup)."""
        if getattr(self, "_metric_logger", None) is not None:
            self._metric_logger.close()
