"""The gist recipes: by name through ``tune run``, loss goes down, resume is exact, the mask reaches the model."""

import json
import logging
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from torchtune_gist.checkpointing import load_gist_adapter, load_merged_hf, read_gist_adapter_metadata
from torchtune_gist.masks import make_gist_mask
from torchtune_gist.models import lora_gist_llama3_1_tiny
from torchtune_gist.modules import state_dict_name
from torchtune_gist.segment_masks import GistSegmentMask
from torchtune_gist.tiny import write_tiny_base_checkpoint, write_tiny_tokenizer
from torchtune_gist.training import check_input_files

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))

from gist_lora_single_device import GistLoRAFinetuneRecipeSingleDevice, recipe_main  # noqa: E402

SINGLE = REPO / "configs/tiny/gist_lora_single_device.yaml"
DISTRIBUTED = REPO / "configs/tiny/gist_lora_distributed.yaml"


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("assets")
    write_tiny_tokenizer(directory)
    write_tiny_base_checkpoint(directory)
    return directory


def overrides(assets: Path, output_dir: Path, **extra: Any) -> List[str]:
    base = {"assets_dir": str(assets), "output_dir": str(output_dir), "dataset.num_samples": 64}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def load_cfg(path: Path, args: List[str]) -> DictConfig:
    return OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(args))


def run_in_process(cfg: DictConfig, hook=None) -> GistLoRAFinetuneRecipeSingleDevice:
    recipe = GistLoRAFinetuneRecipeSingleDevice(cfg)
    recipe.setup(cfg)
    if hook is not None:
        recipe._model.register_forward_pre_hook(hook, with_kwargs=True)
    recipe.train()
    recipe.cleanup()
    return recipe


def plain_tiny_lora(num_gist_tokens: int, **kwargs: Any) -> torch.nn.Module:
    """A tiny LoRA Llama 3.1 without gist embeddings (for the error test)."""
    from torchtune.models.llama3_1 import lora_llama3_1

    from torchtune_gist.tiny import TINY_LLAMA3_1_ARGS

    return lora_llama3_1(**TINY_LLAMA3_1_ARGS, **kwargs)


def tune_run(args: List[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "tune"), "run", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_checkpoint_loads(directory: Path, num_gist_tokens: int) -> None:
    meta = read_gist_adapter_metadata(directory)
    assert meta["num_gist_tokens"] == num_gist_tokens and meta["mask_mode"] == "gist"
    assert json.loads((directory / "hf_merged" / "gist_config.json").read_text())["mask_mode"] == "gist"
    model = lora_gist_llama3_1_tiny(
        ["q_proj", "k_proj", "v_proj", "output_proj"], lora_rank=16, lora_alpha=32, num_gist_tokens=num_gist_tokens
    )
    load_gist_adapter(model, directory)
    assert "tok_embeddings.weight" in load_merged_hf(directory / "hf_merged")


@pytest.mark.slow
def test_single_device_by_name(assets, tmp_path):
    """With activation checkpointing, as the 8B configs train: its wrapped layer names must not reach the files.
    (Resuming by name, with activation checkpointing: tests/test_bench_smoke.py's run of device_check.sh.)"""
    out = tmp_path / "run"
    args = overrides(assets, out, max_steps_per_epoch=3, num_gist_tokens=2, enable_activation_checkpointing=True)
    tune_run(["gist_lora_single_device", "--config", str(SINGLE), *args])
    assert_checkpoint_loads(out / "epoch_0", 2)
    assert list((out / "logs").glob("log_*.txt"))


@pytest.mark.slow
def test_distributed_by_name_two_processes_in_bf16(assets, tmp_path):
    """fp32, the default, trains distributed in the two-node test below."""
    out = tmp_path / "run"
    tune_run(
        [
            "--nproc_per_node",
            "2",
            "gist_lora_distributed",
            "--config",
            str(DISTRIBUTED),
            *overrides(
                assets,
                out,
                max_steps_per_epoch=3,
                mask_format="segments",
                enable_activation_checkpointing=True,
                dtype="bf16",
            ),
        ]
    )
    assert_checkpoint_loads(out / "epoch_0", 4)
    saved = {t.dtype for t in load_file(str(out / "epoch_0" / "gist_adapter.safetensors")).values()}
    assert saved == {torch.bfloat16}


@pytest.mark.slow
def test_two_nodes_checkpoint_once_and_resume_exactly_as_one_node_of_two(assets, tmp_path):
    """``--nnodes 2`` with c10d rendezvous (two launchers on this machine, one process each, both local rank 0)
    writes each checkpoint once, from global rank 0. Resuming its mid-epoch checkpoint on one node of two processes
    (FSDP2: the sharded optimizer state gathered and re-sharded, each rank's data position, dropout on) gives the
    two nodes' losses, read back from the final recipe states."""
    from torchtune_gist.training import read_recipe_progress

    settings = dict(
        max_steps_per_epoch=6,
        save_every_n_steps=3,
        save_merged_hf=False,
        epochs=1,
        **{"dataset.num_samples": 256, "model.lora_dropout": 0.1},
    )
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    launcher = [
        str(Path(sys.executable).parent / "tune"),
        "run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"localhost:{port}",
        "--rdzv_id",
        "gist",
        "gist_lora_distributed",
        "--config",
        str(DISTRIBUTED),
        *overrides(assets, tmp_path / "two_nodes", **settings),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(launcher, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for _ in range(2)
    ]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert sum(log.count("Saved checkpoint to") for log in logs) == 2  # step_3 and epoch_0
    tune_run(
        [
            "--nproc_per_node",
            "2",
            "gist_lora_distributed",
            "--config",
            str(DISTRIBUTED),
            *overrides(
                assets, tmp_path / "resumed", resume_from_checkpoint=tmp_path / "two_nodes" / "step_3", **settings
            ),
        ]
    )
    two_nodes, resumed = (
        read_recipe_progress(tmp_path / d / "epoch_0" / "recipe_state.safetensors")["loss_history"]
        for d in ("two_nodes", "resumed")
    )
    assert [step for step, _ in two_nodes] == list(range(1, 7)) and resumed == two_nodes


def test_bf16_training_follows_fp32(assets, tmp_path):
    """``dtype=bf16``: every parameter, the gist rows included, trains in bf16, with the losses of fp32 to bf16's
    precision."""
    common = dict(max_steps_per_epoch=3, save_merged_hf=False)
    fp32 = run_in_process(load_cfg(SINGLE, overrides(assets, tmp_path / "fp32", **common)))
    bf16 = run_in_process(load_cfg(SINGLE, overrides(assets, tmp_path / "bf16", dtype="bf16", **common)))
    assert {p.dtype for p in bf16._model.parameters()} == {torch.bfloat16}
    assert {t.dtype for t in load_file(str(tmp_path / "bf16" / "epoch_0" / "gist_adapter.safetensors")).values()} == {
        torch.bfloat16
    }
    torch.testing.assert_close(
        [loss for _, loss in bf16.loss_history], [loss for _, loss in fp32.loss_history], atol=0.05, rtol=0.01
    )
    fp32_model = lora_gist_llama3_1_tiny(
        ["q_proj", "k_proj", "v_proj", "output_proj"], lora_rank=16, lora_alpha=32, num_gist_tokens=4
    )
    load_gist_adapter(fp32_model, tmp_path / "bf16" / "epoch_0")
    assert next(fp32_model.parameters()).dtype == torch.float32


def _real_rows(mask: Any, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """What the real (non-padding) queries may attend, ``[n_real, s]``, from a dense or segment mask."""
    return (mask.dense() if isinstance(mask, GistSegmentMask) else mask)[tokens != pad_id]


@pytest.mark.parametrize("mask_format", ["auto", "segments"])
def test_batches_reaching_the_model_carry_the_gist_mask(assets, tmp_path, mask_format):
    seen: List[Dict[str, Any]] = []

    def hook(module, args, kwargs):
        seen.append({"tokens": args[0] if args else kwargs["tokens"], **kwargs})

    cfg = load_cfg(
        SINGLE, overrides(assets, tmp_path, max_steps_per_epoch=2, save_merged_hf=False, mask_format=mask_format)
    )
    recipe = run_in_process(cfg, hook)
    assert len(seen) == 2
    collate = recipe._dataloader.collate_fn.keywords
    assert collate["segment_mask"] and collate["segment_min_len"] == (512 if mask_format == "auto" else 0)
    ids, pad_id = recipe._gist_ids, recipe._tokenizer.pad_id
    for call in seen:
        tokens, mask = call["tokens"], call["mask"]
        # On CPU, auto means segments from 512 positions: these short rows get the dense [b, s, s] tensor.
        assert tokens.shape[1] < 512 and isinstance(mask, GistSegmentMask) == (mask_format == "segments")
        assert isinstance(mask, torch.Tensor) and mask.shape == (*tokens.shape, tokens.shape[1])
        assert torch.equal(
            _real_rows(mask, tokens, pad_id), make_gist_mask(tokens, ids, pad_id=pad_id)[tokens != pad_id]
        )
        row = tokens[0].tolist()
        last_gist = max(i for i, t in enumerate(row) if t in ids)
        first_gist = last_gist - len(ids) + 1
        dense = mask.dense() if isinstance(mask, GistSegmentMask) else mask
        assert not dense[0, last_gist + 1 :, 1:first_gist].any(), "tokens after the gists must not see the prompt"
        assert "input_pos" in call


def test_mask_mode_from_config_reaches_the_model(assets, tmp_path):
    seen = []
    cfg = load_cfg(
        SINGLE,
        overrides(
            assets,
            tmp_path,
            max_steps_per_epoch=1,
            save_merged_hf=False,
            mask_mode="neg_control",
            mask_format="segments",
        ),
    )
    recipe = run_in_process(cfg, lambda m, a, k: seen.append(k["mask"]))
    tokens = next(iter(recipe._dataloader))["tokens"]
    pad_id = recipe._tokenizer.pad_id
    expected = make_gist_mask(tokens, recipe._gist_ids, pad_id=pad_id, mode="neg_control")[tokens != pad_id]
    assert seen and seen[0].mode == "neg_control" and torch.equal(_real_rows(seen[0], tokens, pad_id), expected)


def _write_alpaca_plus_split(directory: Path, split: str, n: int) -> None:
    records = [
        {"instruction": f"Repeat the number {i}.", "input": "", "output": str(i), "source": "alpaca"} for i in range(n)
    ]
    (directory / f"alpaca_plus_{split}.json").write_text(json.dumps(records))


def test_packed_rows_reach_the_model_with_document_masks(assets, tmp_path):
    _write_alpaca_plus_split(tmp_path, "validation_seen", 64)
    seen: List[Dict[str, Any]] = []
    cfg = load_cfg(
        SINGLE,
        overrides(
            assets, tmp_path / "run", max_steps_per_epoch=1, save_merged_hf=False, batch_size=2, mask_format="segments"
        ),
    )
    cfg.dataset = OmegaConf.create(
        {
            "_component_": "torchtune_gist.data.alpaca_plus_dataset",
            "data_dir": str(tmp_path),
            "split": "validation_seen",
            "num_gist_tokens": cfg.num_gist_tokens,
            "max_seq_len": 256,
            "packed": True,
        }
    )
    del cfg.collate_fn
    recipe = run_in_process(cfg, lambda m, a, k: seen.append({"tokens": a[0] if a else k["tokens"], **k}))
    tokens, mask, input_pos = seen[0]["tokens"], seen[0]["mask"], seen[0]["input_pos"]
    starts = (input_pos[0] == 0).nonzero().flatten().tolist()
    assert len(starts) > 2, "a packed row holds several documents"
    document_ids = torch.cumsum((input_pos == 0).long(), dim=1) - 1
    document_ids[tokens == recipe._tokenizer.pad_id] = int(document_ids.max()) + 1
    pad_id = recipe._tokenizer.pad_id
    expected = make_gist_mask(tokens, recipe._gist_ids, pad_id=pad_id, document_ids=document_ids)
    assert torch.equal(_real_rows(mask, tokens, pad_id), expected[tokens != pad_id])
    assert not mask.dense()[0, starts[1] :, : starts[1]].any(), "no attention across documents"


def test_packed_dataset_with_the_padded_collate_is_a_clear_error(assets, tmp_path):
    _write_alpaca_plus_split(tmp_path, "validation_seen", 16)
    cfg = load_cfg(SINGLE, overrides(assets, tmp_path / "run", max_steps_per_epoch=1, save_merged_hf=False))
    cfg.dataset = OmegaConf.create(
        {
            "_component_": "torchtune_gist.data.alpaca_plus_dataset",
            "data_dir": str(tmp_path),
            "split": "validation_seen",
            "num_gist_tokens": cfg.num_gist_tokens,
            "max_seq_len": 256,
            "packed": True,
        }
    )
    with pytest.raises(ValueError, match="packed_gist_collate"):
        GistLoRAFinetuneRecipeSingleDevice(cfg).setup(cfg)


@pytest.mark.slow
def test_training_lowers_the_loss(assets, tmp_path):
    args = overrides(assets, tmp_path, max_steps_per_epoch=40, save_merged_hf=False, **{"dataset.num_samples": 640})
    recipe = run_in_process(load_cfg(SINGLE, args))
    losses = [loss for _, loss in recipe.loss_history]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0


def test_resume_equals_uninterrupted(assets, tmp_path):
    common = {
        "max_steps_per_epoch": 6,
        "save_merged_hf": False,
        "save_every_n_steps": 3,
        "epochs": 2,
        "dataset.num_samples": 128,
    }
    full = run_in_process(load_cfg(SINGLE, overrides(assets, tmp_path / "full", **common)))
    assert [s for s, _ in full.loss_history] == list(range(1, 13))
    for interrupted_at in ("step_3", "step_9"):
        resumed = run_in_process(
            load_cfg(
                SINGLE,
                overrides(
                    assets,
                    tmp_path / f"resumed_{interrupted_at}",
                    resume_from_checkpoint=tmp_path / "full" / interrupted_at,
                    **common,
                ),
            )
        )
        assert resumed.loss_history == full.loss_history, interrupted_at
    latest = run_in_process(
        load_cfg(SINGLE, overrides(assets, tmp_path / "full", resume_from_checkpoint=True, **common))
    )
    assert latest.loss_history == full.loss_history and latest.global_step == 12


def test_resume_is_exact_with_accumulation_dropout_validation_and_a_drawn_seed(assets, tmp_path):
    """``seed: null`` (torchtune's configs' default) draws a seed; the resumed run shuffles with the first run's.
    LoRA dropout draws from the restored generator (a new data-loader iterator draws from its own), and
    validation and gradient accumulation land on the same steps."""
    common = {
        "max_steps_per_epoch": 4,
        "save_merged_hf": False,
        "save_every_n_steps": 2,
        "epochs": 2,
        "seed": "null",
        "gradient_accumulation_steps": 2,
        "run_val_every_n_steps": 2,
        "model.lora_dropout": 0.1,
        "dataset.num_samples": 160,
        "validation_dataset.num_samples": 8,
    }
    full = run_in_process(load_cfg(SINGLE, overrides(assets, tmp_path / "full", **common)))
    assert [s for s, _ in full.loss_history] == list(range(1, 9))
    resumed = run_in_process(
        load_cfg(
            SINGLE,
            overrides(assets, tmp_path / "resumed", resume_from_checkpoint=tmp_path / "full" / "step_6", **common),
        )
    )
    assert resumed.seed == full.seed and resumed.loss_history == full.loss_history


def test_a_signal_saves_a_checkpoint_after_the_step_and_resume_continues_exactly(assets, tmp_path, monkeypatch):
    """SIGTERM (a scheduler's preemption) or Ctrl-C mid-epoch: the step under way finishes, ``step_<N>`` is
    saved at once (the validation due at that step is skipped), ``train`` returns with the signal's number; resuming
    gives the uninterrupted run's losses. Both launches are one command (``resume_from_checkpoint=auto``: a fresh
    start first, the checkpoint then)."""
    import signal

    common = {
        "max_steps_per_epoch": 6,
        "save_merged_hf": False,
        "epochs": 1,
        "dataset.num_samples": 128,
        "resume_from_checkpoint": "auto",
        "run_val_every_n_steps": 4,
        "validation_dataset.num_samples": 8,
    }
    full = run_in_process(load_cfg(SINGLE, overrides(assets, tmp_path / "full", **common)))
    forwards = []

    def preempt_at_step_4(module, args, kwargs):
        forwards.append(1)
        if len(forwards) == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    validations = []
    validate = GistLoRAFinetuneRecipeSingleDevice.validate
    monkeypatch.setattr(
        GistLoRAFinetuneRecipeSingleDevice,
        "validate",
        lambda self: validations.append(self.global_step) or validate(self),
    )
    stopped = run_in_process(load_cfg(SINGLE, overrides(assets, tmp_path / "run", **common)), hook=preempt_at_step_4)
    assert signal.getsignal(signal.SIGTERM) is previous and validations == []
    assert stopped.stop_signal == signal.SIGTERM and stopped.global_step == 4
    assert sorted(d.name for d in (tmp_path / "run").iterdir() if d.is_dir()) == ["logs", "step_4"]
    resumed = run_in_process(load_cfg(SINGLE, overrides(assets, tmp_path / "run", **common)))
    assert resumed.stop_signal is None and resumed.loss_history == full.loss_history


def test_a_second_ctrl_c_stops_at_once_but_not_a_copy_of_the_first():
    import signal

    from torchtune_gist.training import StopRequest

    previous = signal.getsignal(signal.SIGINT)
    with StopRequest(patience=60) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # a launcher passing the terminal's Ctrl-C on: the same request
    assert stop.requested and stop.signum == signal.SIGINT
    with pytest.raises(KeyboardInterrupt), StopRequest(patience=0) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


def test_an_interrupted_save_leaves_the_earlier_checkpoints_whole(assets, tmp_path, monkeypatch):
    """A crash while an epoch's checkpoint is written (here: in the merged export, its last part) leaves no
    ``epoch_0``: resume takes ``step_3`` and writes the epoch's checkpoint whole, merged export included."""
    import torchtune_gist.training._recipe as recipe_module
    from torchtune_gist.training import latest_checkpoint

    common = {"max_steps_per_epoch": 6, "save_every_n_steps": 3, "epochs": 1, "dataset.num_samples": 128}
    cfg = load_cfg(SINGLE, overrides(assets, tmp_path, **common))
    export = recipe_module.export_merged_hf

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe_module, "export_merged_hf", crash)
    with pytest.raises(KeyboardInterrupt):
        run_in_process(cfg)
    assert not (tmp_path / "epoch_0").exists() and latest_checkpoint(tmp_path) == tmp_path / "step_3"
    (tmp_path / ".epoch_0.partial").rename(tmp_path / ".step_5.partial")  # a leftover no later save would overwrite
    monkeypatch.setattr(recipe_module, "export_merged_hf", export)
    resumed = run_in_process(load_cfg(SINGLE, overrides(assets, tmp_path, resume_from_checkpoint=True, **common)))
    assert resumed.global_step == 6
    assert_checkpoint_loads(tmp_path / "epoch_0", 4)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_keep_last_n_step_checkpoints_deletes_older_step_checkpoints_only(assets, tmp_path):
    settings = {"save_every_n_steps": 1, "epochs": 2, "save_merged_hf": False}  # 4 steps an epoch
    cfg = load_cfg(SINGLE, overrides(assets, tmp_path, keep_last_n_step_checkpoints=2, **settings))
    run_in_process(cfg)
    saved = sorted(p.name for p in tmp_path.iterdir() if p.is_dir() and p.name != "logs")
    assert saved == ["epoch_0", "epoch_1", "step_6", "step_7"]  # step_1 .. step_5 deleted as the later ones landed
    with pytest.raises(ValueError, match="keep_last_n_step_checkpoints=0 must be a whole number >= 1"):
        GistLoRAFinetuneRecipeSingleDevice(
            load_cfg(SINGLE, overrides(assets, tmp_path, keep_last_n_step_checkpoints=0))
        )


def test_latest_checkpoint_is_the_one_saved_last_prefers_the_epoch_and_skips_what_it_cannot_read(tmp_path):
    from torchtune_gist.training import RECIPE_STATE_FILE, latest_checkpoint, save_recipe_state

    def checkpoint(name: str, step: int, **progress: float) -> Path:
        save_recipe_state(
            tmp_path / name / RECIPE_STATE_FILE,
            optimizer_state={"state": {}, "param_groups": []},
            progress={"global_step": step, **progress},
            rng_states={},
        )
        (tmp_path / name / "gist_adapter.safetensors").write_bytes(b"")
        return tmp_path / name

    checkpoint("step_6", 6)
    assert latest_checkpoint(tmp_path) == tmp_path / "step_6"
    checkpoint("epoch_0", 6)
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch_0"
    checkpoint(".step_9.partial", 9)  # an interrupted save
    checkpoint("step_12", 12)
    (tmp_path / "step_12" / RECIPE_STATE_FILE).write_bytes(b"truncated")
    assert latest_checkpoint(tmp_path) == tmp_path / "epoch_0"
    # a run started afresh over those, then preempted: auto continues it, not the older run's higher step
    checkpoint("step_20", 20, saved_at=100.0)
    checkpoint("step_4", 4, saved_at=200.0)
    assert latest_checkpoint(tmp_path) == tmp_path / "step_4"


def test_resume_refuses_settings_that_would_train_wrong(assets, tmp_path):
    common = {"max_steps_per_epoch": 4, "save_merged_hf": False, "save_every_n_steps": 2, "epochs": 1}
    run_in_process(load_cfg(SINGLE, overrides(assets, tmp_path, **common)))

    def resume(**changed):
        cfg = load_cfg(
            SINGLE, overrides(assets, tmp_path, resume_from_checkpoint=tmp_path / "step_2", **{**common, **changed})
        )
        GistLoRAFinetuneRecipeSingleDevice(cfg).setup(cfg)

    with pytest.raises(ValueError, match="batch_size was 16, now 8.*initial_adapter="):
        resume(batch_size=8)
    with pytest.raises(ValueError, match="train_lora was True, now False"):
        resume(train_lora=False)
    with pytest.raises(ValueError, match="mask_mode was 'gist', now 'pos_control'"):  # a control would mix masks
        resume(mask_mode="pos_control")
    with pytest.raises(ValueError, match="seed was 0, now 1"):
        resume(seed=1)
    (tmp_path / "step_2" / "recipe_state.safetensors").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="recipe_state.safetensors is not a readable safetensors file"):
        resume()


@pytest.mark.slow
def test_compiled_training_matches_eager(assets, tmp_path):
    """``compile=True`` (model layers and loss): the same losses as eager, through the dense gist mask
    (``mask_format: auto`` picks dense when compiling off CUDA: segment spans would recompile every batch)."""
    common = dict(max_steps_per_epoch=2, save_merged_hf=False)
    eager = run_in_process(load_cfg(SINGLE, overrides(assets, tmp_path / "eager", **common)))
    counters = torch._dynamo.utils.counters
    counters.clear()
    try:
        compiled = run_in_process(load_cfg(SINGLE, overrides(assets, tmp_path / "compiled", compile=True, **common)))
    finally:
        torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] > 0 and compiled._mask_format == "dense"
    assert [step for step, _ in compiled.loss_history] == [step for step, _ in eager.loss_history]
    torch.testing.assert_close(
        [loss for _, loss in compiled.loss_history], [loss for _, loss in eager.loss_history], atol=1e-4, rtol=1e-4
    )


def test_block_masks_are_built_on_the_training_device(assets, tmp_path, monkeypatch):
    """With ``mask_format: block`` (CUDA's), the data loader builds each BlockMask on the recipe's device
    (``batch_to_device`` moves a BlockMask's tables but not the tensors its ``mask_mod`` reads) and pads
    batches to multiples of FlexAttention's block size."""
    from torch.nn.attention.flex_attention import BlockMask

    monkeypatch.setattr(GistLoRAFinetuneRecipeSingleDevice, "_resolve_mask_format", lambda self, fmt: "block")
    cfg = load_cfg(SINGLE, overrides(assets, tmp_path, save_merged_hf=False, **{"tokenizer.max_seq_len": 256}))
    recipe = GistLoRAFinetuneRecipeSingleDevice(cfg)
    with torch._dynamo.config.patch(recompile_limit=8):
        recipe.setup(cfg)
        # Compiled FlexAttention compiles once per batch length: lengths come in multiples of 128 (below), and
        # dynamo may compile each of the model's 2048 / 128 lengths, for training and for validation batches
        # (the tokenizer's max_seq_len does not bound the passkey rows).
        assert torch._dynamo.config.recompile_limit == 32
    collate = recipe._dataloader.collate_fn.keywords
    assert collate["block_mask"] and not collate["segment_mask"] and collate["block_mask_device"] == recipe._device
    batch = next(iter(recipe._dataloader))
    assert isinstance(batch["mask"], BlockMask) and batch["tokens"].shape[1] % 128 == 0
    recipe.cleanup()


def test_recipe_state_round_trip_and_files_from_before_the_gpu_rng(tmp_path):
    from torchtune_gist._io import atomic_save_safetensors
    from torchtune_gist.training import load_recipe_state, save_recipe_state

    optim = {
        "state": {"w": {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
        "param_groups": [{"lr": 0.1, "params": ["w"]}],
    }
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.arange(4, dtype=torch.uint8)}
    save_recipe_state(tmp_path / "new.safetensors", optimizer_state=optim, progress={"global_step": 3}, rng_states=rng)
    loaded_optim, progress, loaded_rng = load_recipe_state(tmp_path / "new.safetensors")
    assert progress == {"global_step": 3} and torch.equal(loaded_optim["state"]["w"]["exp_avg"], torch.ones(2))
    assert loaded_rng.keys() == rng.keys() and all(torch.equal(loaded_rng[k], rng[k]) for k in rng)
    # A file of an earlier version: one CPU state under "rng_state".
    atomic_save_safetensors(
        {"rng_state": rng["cpu"]},
        tmp_path / "old.safetensors",
        metadata={
            "format": "torchtune-gist-recipe-state",
            "progress": "{}",
            "optim": '{"param_groups": [], "scalars": {}}',
        },
    )
    assert torch.equal(load_recipe_state(tmp_path / "old.safetensors")[2]["cpu"], rng["cpu"])


def test_clear_errors_for_configurations_that_cannot_work(assets, tmp_path):
    def setup(**extra):
        cfg = load_cfg(SINGLE, overrides(assets, extra.pop("output_dir", tmp_path), **extra))
        GistLoRAFinetuneRecipeSingleDevice(cfg).setup(cfg)

    with pytest.raises(ValueError, match="mask_mode='causal'"):
        setup(mask_mode="causal")
    with pytest.raises(ValueError, match="mask_format='sparse'"):
        setup(mask_format="sparse")
    with pytest.raises(ValueError, match="FlexAttention, which torchtune uses on CUDA only"):
        setup(mask_format="block")
    with pytest.raises(ValueError, match="mask_format=segments does not compile"):
        setup(mask_format="segments", compile=True)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA GPU: run on one, or set device=cpu"):
            setup(device="cuda")
    with pytest.raises(ValueError, match="the model has 2 gist tokens but num_gist_tokens=4"):
        setup(**{"model.num_gist_tokens": 2})
    with pytest.raises(TypeError, match="not gist-aware"):
        setup(**{"model._component_": "test_recipes.plain_tiny_lora"})
    with pytest.raises(ValueError, match="no complete checkpoint"):
        setup(resume_from_checkpoint=True, output_dir=tmp_path / "empty")
    with pytest.raises(
        FileNotFoundError, match=r"tokenizer.path: .*nowhere/tiny_tokenizer.model \(relative to the current"
    ):
        setup(assets_dir="nowhere", output_dir=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"checkpointer.checkpoint_files: .*/other.safetensors is not a file"):
        setup(**{"checkpointer.checkpoint_files": ["model.safetensors", "other.safetensors"]})
    assert not (tmp_path / "missing").exists()


def test_component_settings_are_checked_before_anything_is_built(assets, tmp_path, monkeypatch):
    """A stock (not gist-aware) builder, a misspelt key or a component that does not import fails in the recipe's
    constructor, every section named at once, before base weights, data or model are touched."""
    from torchtune import config as tt_config

    monkeypatch.setattr(tt_config, "instantiate", lambda *a, **k: pytest.fail("instantiated before the check"))

    def construct(**extra):
        cfg = load_cfg(SINGLE, overrides(assets, tmp_path, **extra))
        GistLoRAFinetuneRecipeSingleDevice(cfg)

    with pytest.raises(
        ValueError,
        match=r"model._component_=torchtune.models.llama3_1.lora_llama3_1_8b is not a "
        r"gist-aware builder \(it takes no num_gist_tokens\): use one of torchtune_gist.models",
    ):
        construct(**{"model._component_": "torchtune.models.llama3_1.lora_llama3_1_8b"})
    with pytest.raises(ValueError) as e:
        construct(**{"model.lora_rnak": 8, "optimizer.weight_decai": 0.1, "loss._component_": "torch.nn.NoSuchLoss"})
    assert str(e.value).splitlines()[1:] == [
        "  model: torchtune_gist.models.lora_gist_llama3_1_tiny takes no lora_rnak",
        "  optimizer: torch.optim.AdamW takes no weight_decai",
        "  loss._component_=torch.nn.NoSuchLoss cannot be imported: "
        "ModuleNotFoundError(\"No module named 'torch.nn.NoSuchLoss'\") "
        "Are you sure that 'NoSuchLoss' is importable from module 'torch.nn'?",
    ]
    with pytest.raises(ValueError, match=r"dataset\[1\]: torchtune_gist.data.gist_passkey_dataset takes no haystack"):
        cfg = load_cfg(SINGLE, overrides(assets, tmp_path))
        cfg.dataset = [cfg.dataset, {**cfg.dataset, "haystack": 3}]
        GistLoRAFinetuneRecipeSingleDevice(cfg)


def test_misspelt_top_level_keys_are_refused_before_anything_is_built(assets, tmp_path, monkeypatch):
    """A misspelt setting is not ignored: ``resume_from_checkpont=True`` would start afresh and overwrite epoch_0.
    Variables that interpolations read (``assets_dir``, ``num_gist_tokens``) and torchtune's FSDP settings in the
    distributed recipe are not refused."""
    from gist_lora_distributed import GistLoRAFinetuneRecipeDistributed
    from torchtune import config as tt_config

    monkeypatch.setattr(tt_config, "instantiate", lambda *a, **k: pytest.fail("instantiated before the check"))
    with pytest.raises(
        ValueError,
        match=r"gist_lora_single_device does not read resume_from_checkpont \(did you mean resume_from_checkpoint\?\),"
        r" batch_sze \(did you mean batch_size\?\), fsdp_cpu_offload: fix the spelling or remove them",
    ):
        cfg = load_cfg(SINGLE, overrides(assets, tmp_path, resume_from_checkpont=True, batch_sze=2))
        cfg.fsdp_cpu_offload = False
        GistLoRAFinetuneRecipeSingleDevice(cfg)
    with pytest.raises(ValueError, match=r"gist_lora_distributed does not read save_every_n_step \(did you mean"):
        GistLoRAFinetuneRecipeDistributed(load_cfg(DISTRIBUTED, overrides(assets, tmp_path, save_every_n_step=1)))
    cfg = load_cfg(DISTRIBUTED, overrides(assets, tmp_path, my_rank=4, **{"model.lora_rank": "${my_rank}"}))
    assert GistLoRAFinetuneRecipeDistributed(cfg)._batch_size == cfg.batch_size


def test_missing_input_files_are_all_named_with_their_keys(tmp_path):
    (tmp_path / "tok.model").write_text("")
    cfg = OmegaConf.create(
        {
            "tokenizer": {
                "_component_": "x",
                "path": str(tmp_path / "tok.model"),
                "special_tokens_path": "missing.json",
                "max_seq_len": 8,
            },
            "checkpointer": {"checkpoint_dir": str(tmp_path / "base"), "checkpoint_files": ["a.safetensors"]},
        }
    )
    with pytest.raises(FileNotFoundError) as e:
        check_input_files(cfg)
    lines = str(e.value).splitlines()
    assert any(line.strip().startswith("tokenizer.special_tokens_path: missing.json (relative") for line in lines)
    assert any(line.strip() == f"checkpointer.checkpoint_dir: {tmp_path / 'base'} is not a directory" for line in lines)
    assert not any("tokenizer.path" in line for line in lines)
    with pytest.raises(FileNotFoundError) as e:
        check_input_files(cfg, sections=("checkpointer",))
    assert "tokenizer" not in str(e.value)
    (tmp_path / "missing.json").write_text("{}")
    (tmp_path / "base").mkdir()
    with pytest.raises(FileNotFoundError, match=r"checkpointer.checkpoint_files: .*a.safetensors is not a file"):
        check_input_files(OmegaConf.merge(cfg, {"tokenizer": {"special_tokens_path": str(tmp_path / "missing.json")}}))
    (tmp_path / "base" / "a.safetensors").write_text("")
    check_input_files(OmegaConf.merge(cfg, {"tokenizer": {"special_tokens_path": str(tmp_path / "missing.json")}}))


def test_initial_adapter_starts_from_trained_weights_with_a_fresh_schedule(assets, tmp_path, caplog):
    common = {"max_steps_per_epoch": 2, "save_merged_hf": False, "lr_scheduler.num_warmup_steps": 0}
    first = run_in_process(load_cfg(SINGLE, overrides(assets, tmp_path / "short", **common)))
    trained = load_file(str(tmp_path / "short" / "epoch_0" / "gist_adapter.safetensors"))
    assert all(v.abs().sum() > 0 for k, v in trained.items() if "lora_b" in k)
    cfg = load_cfg(
        SINGLE, overrides(assets, tmp_path / "long", initial_adapter=tmp_path / "short" / "epoch_0", **common)
    )
    recipe = GistLoRAFinetuneRecipeSingleDevice(cfg)
    recipe.setup(cfg)
    state = {state_dict_name(n): p.detach() for n, p in recipe._model.named_parameters()}
    for name, value in trained.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0)
    recipe.train()
    assert recipe.global_step == first.global_step == 2

    def setup(**extra):
        bad = load_cfg(SINGLE, overrides(assets, tmp_path / "bad", **extra))
        GistLoRAFinetuneRecipeSingleDevice(bad).setup(bad)

    with pytest.raises(ValueError, match="holds K=4 gist rows; this run has num_gist_tokens=2"):
        setup(initial_adapter=tmp_path / "short" / "epoch_0", num_gist_tokens=2)
    with pytest.raises(ValueError, match="initial_adapter: no gist adapter at"):
        setup(initial_adapter=tmp_path / "nowhere")
    with caplog.at_level(logging.WARNING):
        setup(initial_adapter=tmp_path / "short" / "epoch_0", mask_mode="pos_control")
    assert "was trained with mask_mode=gist; this run trains it on with mask_mode=pos_control" in caplog.text


def empty_gist_dataset(tokenizer: Any, num_gist_tokens: int) -> Any:
    """A gist dataset without examples (for the empty-validation-set error)."""
    from torchtune_gist.data import GistPasskeyDataset, GistPasskeyTransform

    return GistPasskeyDataset([], GistPasskeyTransform(tokenizer, num_gist_tokens=num_gist_tokens))


def _dora_modules(model: torch.nn.Module) -> Dict[str, Any]:
    from torchtune.modules.peft import DoRALinear

    return {name: m for name, m in model.named_modules() if isinstance(m, DoRALinear)}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _assert_magnitudes_are_the_base_row_norms(model: torch.nn.Module, assets: Path) -> None:
    base = load_file(str(assets / "model.safetensors"))
    modules = _dora_modules(model)
    assert modules
    for name, m in modules.items():
        torch.testing.assert_close(_full(m.magnitude.detach()), base[f"{state_dict_name(name)}.weight"].norm(dim=1))


def _write_trained_dora_adapter(recipe: Any, directory: Path) -> Dict[str, torch.Tensor]:
    """Save the recipe model's adapter with every DoRA magnitude changed; return the saved magnitudes."""
    from torchtune_gist.checkpointing import save_gist_adapter

    with torch.no_grad():
        for m in _dora_modules(recipe._model).values():
            m.magnitude.mul_(1.5)
    save_gist_adapter(recipe._model, directory, base_model="tiny")
    return {k: v for k, v in load_file(str(directory / "gist_adapter.safetensors")).items() if k.endswith("magnitude")}


def test_dora_magnitude_starts_from_the_base_and_a_trained_one_survives(assets, tmp_path):
    """A fresh DoRA run starts with magnitude = the base weight's row norms (DoRA = LoRA = the base at step 0);
    an initial adapter's trained magnitude is not overwritten by that initialisation."""
    common = {"save_merged_hf": False, "model.use_dora": True}
    cfg = load_cfg(SINGLE, overrides(assets, tmp_path / "fresh", **common))
    fresh = GistLoRAFinetuneRecipeSingleDevice(cfg)
    fresh.setup(cfg)
    _assert_magnitudes_are_the_base_row_norms(fresh._model, assets)
    trained = _write_trained_dora_adapter(fresh, tmp_path / "trained")
    fresh.cleanup()
    cfg = load_cfg(SINGLE, overrides(assets, tmp_path / "next", initial_adapter=tmp_path / "trained", **common))
    resumed = GistLoRAFinetuneRecipeSingleDevice(cfg)
    resumed.setup(cfg)
    state = {state_dict_name(n): p.detach() for n, p in resumed._model.named_parameters()}
    assert all(torch.equal(state[k], v) for k, v in trained.items())
    resumed.cleanup()


def test_distributed_dora_magnitude_is_initialised_before_the_adapter_loads(assets, tmp_path):
    """The FSDP2 recipe (one CPU process, gloo): the same two properties as on one device."""
    import torch.distributed as dist
    from gist_lora_distributed import GistLoRAFinetuneRecipeDistributed

    common = {"save_merged_hf": False, "model.use_dora": True}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        cfg = load_cfg(DISTRIBUTED, overrides(assets, tmp_path / "fresh", **common))
        fresh = GistLoRAFinetuneRecipeDistributed(cfg)
        fresh.setup(cfg)
        _assert_magnitudes_are_the_base_row_norms(fresh._model, assets)
        trained = _write_trained_dora_adapter(fresh, tmp_path / "trained")
        fresh._metric_logger.close()
        cfg = load_cfg(
            DISTRIBUTED, overrides(assets, tmp_path / "next", initial_adapter=tmp_path / "trained", **common)
        )
        resumed = GistLoRAFinetuneRecipeDistributed(cfg)
        resumed.setup(cfg)
        state = {state_dict_name(n): _full(p.detach()) for n, p in resumed._model.named_parameters()}
        assert all(torch.equal(state[k], v) for k, v in trained.items())
        resumed._metric_logger.close()
    finally:
        dist.destroy_process_group()


def test_validation_covers_every_example(assets, tmp_path):
    """The last partial validation batch counts (a split smaller than a batch is not a loss of 0.0)."""
    cfg = load_cfg(
        SINGLE,
        overrides(assets, tmp_path, save_merged_hf=False, batch_size=16, **{"validation_dataset.num_samples": 5}),
    )
    recipe = GistLoRAFinetuneRecipeSingleDevice(cfg)
    recipe.setup(cfg)
    assert [len(b["tokens"]) for b in recipe._val_dataloader] == [5]
    assert recipe.validate() > 0.0
    recipe.cleanup()


def test_setup_shows_no_deprecation_from_torchdata(assets, tmp_path):
    """torchdata's loader calls ``torch.set_vital``, which torch deprecates: a warning at every start that no user
    can act on."""
    cfg = load_cfg(SINGLE, overrides(assets, tmp_path / "run", max_steps_per_epoch=1, save_merged_hf=False))
    recipe = GistLoRAFinetuneRecipeSingleDevice(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe.setup(cfg)
    recipe.cleanup()
    assert not [w for w in caught if "set_vital" in str(w.message)]


def test_setup_refuses_configs_that_would_train_wrong(assets, tmp_path):
    """Settings that used to train silently wrong, be ignored, or fail only later, are errors at setup."""
    _write_alpaca_plus_split(tmp_path, "validation_seen", 16)

    def setup(cfg_changes: Optional[Dict[str, Any]] = None, **extra: Any) -> None:
        cfg = load_cfg(
            SINGLE, overrides(assets, tmp_path / "run", max_steps_per_epoch=1, save_merged_hf=False, **extra)
        )
        for key, value in (cfg_changes or {}).items():
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
        GistLoRAFinetuneRecipeSingleDevice(cfg).setup(cfg)

    # torchtune features these recipes do not implement
    for key in ("enable_activation_offloading", "optimizer_in_bwd", "profiler.enabled"):
        with pytest.raises(
            ValueError, match=f"{key}=True is a torchtune recipe feature that the gist recipes do not implement"
        ):
            setup(**{key: True})
    # validation
    with pytest.raises(ValueError, match="run_val_every_n_steps=2 but no validation_dataset"):
        setup({"validation_dataset": None}, run_val_every_n_steps=2)
    with pytest.raises(ValueError, match="validation_dataset is empty"):
        setup({"validation_dataset": {"_component_": "test_recipes.empty_gist_dataset", "num_gist_tokens": 4}})
    # the data's gist span must be the model's
    with pytest.raises(ValueError, match=r"dataset lays out 2 gist tokens .* the model has 4.*num_gist_tokens"):
        setup(**{"dataset.num_gist_tokens": 2})
    with pytest.raises(ValueError, match=r"validation_dataset lays out 3 gist tokens"):
        setup(**{"validation_dataset.num_gist_tokens": 3})
    packed = {
        "_component_": "torchtune_gist.data.alpaca_plus_dataset",
        "data_dir": str(tmp_path),
        "split": "validation_seen",
        "num_gist_tokens": 2,
        "max_seq_len": 256,
        "packed": True,
    }
    with pytest.raises(ValueError, match=r"dataset\[1\].num_gist_tokens=2, but the model has 4 gist tokens"):
        setup({"dataset": [{**packed, "num_gist_tokens": 4}, packed], "collate_fn": None})
    # a collator that cannot build the gist mask
    with pytest.raises(
        ValueError,
        match="collate_fn=torchtune.data.padded_collate_sft does not take gist_token_ids.*padded_gist_collate",
    ):
        setup(collate_fn="torchtune.data.padded_collate_sft")


def test_user_mistakes_are_named_before_training(assets, tmp_path):
    """Counts, paths and inputs a user gets wrong are refused with the key to change, not a torch traceback."""

    def recipe(**extra: Any) -> GistLoRAFinetuneRecipeSingleDevice:
        settings = {"max_steps_per_epoch": 2, "save_merged_hf": False, **extra}
        cfg = load_cfg(SINGLE, overrides(assets, settings.pop("output_dir", tmp_path / "run"), **settings))
        r = GistLoRAFinetuneRecipeSingleDevice(cfg)
        r.setup(cfg)
        return r

    for key, value in (
        ("gradient_accumulation_steps", 0),
        ("max_steps_per_epoch", 0),
        ("log_every_n_steps", 0),
        ("epochs", 0),
        ("batch_size", 2.5),
        ("num_gist_tokens", "abc"),
        ("save_every_n_steps", -1),
    ):
        with pytest.raises(ValueError, match=f"{key}={value!r} must be a whole number >= 1"):
            recipe(**{key: value})
    # settings torchtune and torch would reject with their own internals' messages (a TypeError in torch.optim, ...)
    for key, value, message in (
        ("device", "gpu", "device='gpu' is not a device: use cpu, cuda"),
        ("seed", "abc", "seed='abc' must be a whole number >= 0, or null"),
        ("optimizer.lr", "abc", "optimizer.lr='abc' must be a number > 0"),
        ("optimizer.lr", 0, "optimizer.lr=0 must be a number > 0"),
        ("clip_grad_norm", "abc", "clip_grad_norm='abc' must be a number > 0, or null for no clipping"),
        ("lr_scheduler.num_warmup_steps", -3, "lr_scheduler.num_warmup_steps=-3 must be a whole number >= 0"),
        (
            "checkpointer.model_type",
            "LAMA3",
            "checkpointer.model_type='LAMA3' is not one of torchtune's model types: .*LLAMA3,",
        ),
    ):
        with pytest.raises(ValueError, match=message):
            recipe(**{key: value})
    generate_cfg = OmegaConf.load(REPO / "configs/tiny/gist_generate.yaml")
    with pytest.raises(
        ValueError,
        match=(
            "the config has no dataset, optimizer, lr_scheduler, loss, metric_logger, epochs, batch_size, "
            "gradient_accumulation_steps, shuffle, which a gist training recipe reads"
        ),
    ):
        GistLoRAFinetuneRecipeSingleDevice(generate_cfg)
    # a tokenizer file of another kind: tiktoken's and json's messages do not name the file or the key
    with pytest.raises(
        ValueError,
        match=(
            r"llama3_tokenizer could not be built from .*tokenizer.special_tokens_path=.*tiny_tokenizer.model: "
            r"Expecting value"
        ),
    ):
        recipe(**{"tokenizer.special_tokens_path": str(assets / "tiny_tokenizer.model")})
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="output_dir: .*a_file is a file, not a directory"):
        recipe(output_dir=tmp_path / "a_file")
    with pytest.raises(
        ValueError,
        match=(
            r"base checkpoint does not fit the model: layers.0.attn.k_proj.weight: checkpoint \[32, 64\] vs model "
            r"\[128, 256\];.*model._component_"
        ),
    ):
        recipe(**{"model._component_": "torchtune_gist.models.qlora_gist_llama3_1_tiny"})
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").symlink_to(assets / "model.safetensors")
    (export / "gist_config.json").write_text("{}")
    with pytest.raises(ValueError, match="is a torchtune-gist merged export"):
        recipe(**{"checkpointer.checkpoint_dir": export})
    long_rows = recipe(**{"dataset.context_tokens": 3000})
    with pytest.raises(
        ValueError,
        match="a dataset batch has rows of 30.. tokens, beyond the model's max_seq_len=2048: .*dataset.context_tokens",
    ):
        long_rows.train()

    broken = tmp_path / "broken"
    (broken / "epoch_0").mkdir(parents=True)
    (broken / "epoch_0" / "gist_adapter.safetensors").write_text("")
    (broken / "epoch_0" / "recipe_state.safetensors").write_text("not safetensors")
    with pytest.raises(ValueError, match="holds epoch_0 but no complete, readable checkpoint"):
        recipe(output_dir=broken, resume_from_checkpoint="auto")


def test_a_config_mistake_through_tune_run_ends_with_its_message_not_a_traceback(assets, tmp_path):
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "tune"), "run", "gist_lora_single_device", "--config", str(SINGLE)]
        + overrides(assets, tmp_path, batch_size=-1, resume_from_checkpont=True),
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "gist_lora_single_device: gist_lora_single_device does not read resume_from_checkpont" in proc.stderr


def test_the_single_device_recipe_refuses_several_processes(assets, tmp_path, monkeypatch, capsys):
    """Under a launcher of several processes (torchrun's environment, as `tune run --nproc_per_node 2` sets it), the
    single-device recipe stops before training: each process would train alone and write the same checkpoints."""
    for key, value in {"MASTER_ADDR": "localhost", "MASTER_PORT": "29500", "WORLD_SIZE": "2", "RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["gist_lora_single_device", "--config", str(SINGLE), *overrides(assets, tmp_path)])
    with pytest.raises(SystemExit) as e:
        recipe_main()
    assert e.value.code == 1 and "use tune run --nproc_per_node N gist_lora_distributed" in capsys.readouterr().err
    assert not (tmp_path / "epoch_0").exists()


@pytest.mark.parametrize(
    "model_kwargs, match",
    [({"lora_alpha": 8}, "LoRA settings differ"), ({"gist_token_ids": [300, 301, 302, 303]}, "gist ids")],
    ids=["lora_alpha", "gist_ids"],
)
def test_initial_adapter_metadata_is_checked_like_load_gist_adapter(assets, tmp_path, model_kwargs, match):
    """Same K and shapes, but another LoRA alpha or other gist ids: refused, as ``load_gist_adapter`` refuses it."""
    from torchtune_gist.checkpointing import save_gist_adapter

    settings = {
        "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"],
        "lora_rank": 16,
        "lora_alpha": 32,
        "num_gist_tokens": 4,
    }
    save_gist_adapter(lora_gist_llama3_1_tiny(**{**settings, **model_kwargs}), tmp_path / "other", base_model="tiny")
    cfg = load_cfg(
        SINGLE, overrides(assets, tmp_path / "run", save_merged_hf=False, initial_adapter=tmp_path / "other")
    )
    with pytest.raises(ValueError, match=f"initial_adapter: .*{match}"):
        GistLoRAFinetuneRecipeSingleDevice(cfg).setup(cfg)
