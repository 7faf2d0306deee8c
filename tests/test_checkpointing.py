"""The gist adapter file (save, metadata, load, mismatches) and the merged Hugging Face export."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import fully_shard
from torchtune.models.llama3 import llama3
from torchtune.models.llama3_1 import llama3_1
from torchtune.models.llama3_2 import llama3_2

from torchtune_gist.checkpointing import (
    ADAPTER_FILE,
    export_merged_hf,
    gist_adapter_state_dict,
    load_gist_adapter,
    load_merged_hf,
    read_gist_adapter_metadata,
    save_gist_adapter,
)
from torchtune_gist.masks import make_gist_mask
from torchtune_gist.models import (
    TINY_QLORA_LLAMA3_1_ARGS,
    add_gist_embedding,
    gist_llama3_1_tiny,
    gist_llama3_2,
    lora_gist_llama3_1_tiny,
    qlora_gist_llama3_1_tiny,
)
from torchtune_gist.modules import init_gist_embeddings
from torchtune_gist.tiny import TINY_LLAMA3_1_ARGS, TINY_VOCAB_SIZE

GIST_IDS = [510, 511]
LORA_MODULES = ["q_proj", "k_proj", "v_proj"]


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Make the adapter weights non-trivial (LoRA B starts at zero, gist rows at the mean)."""
    for m in model.modules():
        if hasattr(m, "initialize_dora_magnitude"):
            m.initialize_dora_magnitude()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name or "gist_embeddings" in name or "magnitude" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _tokens(gist_ids=GIST_IDS) -> torch.Tensor:
    tokens = torch.randint(0, 256, (2, 14))
    tokens[0, 5:7] = torch.tensor(gist_ids)
    tokens[1, 3:5] = torch.tensor(gist_ids)
    return tokens


def _logits(model: torch.nn.Module, tokens: torch.Tensor, gist_ids=GIST_IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, mask=make_gist_mask(tokens, gist_ids))


def _lora_model(**kwargs) -> torch.nn.Module:
    return _perturb(lora_gist_llama3_1_tiny(LORA_MODULES, num_gist_tokens=2, **kwargs))


def test_adapter_round_trip(tmp_path: Path):
    model = _lora_model(apply_lora_to_mlp=True)
    path = save_gist_adapter(model, tmp_path, base_model="tiny", extra_metadata={"step": 3, "note": "x"})
    assert path == tmp_path / ADAPTER_FILE
    stored = load_file(str(path))
    assert set(stored) == set(gist_adapter_state_dict(model))
    assert "tok_embeddings.gist_embeddings" in stored and "layers.0.mlp.w1.lora_a.weight" in stored
    assert not any(k.endswith(".attn.q_proj.weight") or k == "tok_embeddings.weight" for k in stored)

    meta = read_gist_adapter_metadata(tmp_path)
    assert meta["format"] == "torchtune-gist" and meta["base_model"] == "tiny"
    assert meta["num_gist_tokens"] == 2 and meta["gist_token_ids"] == GIST_IDS and meta["vocab_size"] == 512
    assert meta["lora_rank"] == 8 and meta["lora_alpha"] == 16 and meta["lora_attn_modules"] == LORA_MODULES
    assert meta["apply_lora_to_mlp"] and not meta["apply_lora_to_output"] and not meta["use_dora"]
    assert meta["step"] == 3 and meta["note"] == "x"

    fresh = lora_gist_llama3_1_tiny(LORA_MODULES, num_gist_tokens=2, apply_lora_to_mlp=True).eval()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if k not in stored}, strict=False)
    tokens = _tokens()
    assert not torch.allclose(_logits(fresh, tokens), _logits(model, tokens))
    load_gist_adapter(fresh, path)
    assert torch.equal(_logits(fresh, tokens), _logits(model, tokens))


def test_gist_rows_only_adapter(tmp_path: Path):
    model = _perturb(gist_llama3_1_tiny(num_gist_tokens=2))
    save_gist_adapter(model, tmp_path, base_model="tiny")
    assert set(load_file(str(tmp_path / ADAPTER_FILE))) == {"tok_embeddings.gist_embeddings"}
    assert "lora_rank" not in read_gist_adapter_metadata(tmp_path)
    fresh = gist_llama3_1_tiny(num_gist_tokens=2)
    load_gist_adapter(fresh, tmp_path)
    assert torch.equal(fresh.tok_embeddings.gist_embeddings, model.tok_embeddings.gist_embeddings)


def test_mismatched_k_or_ids_are_rejected(tmp_path: Path):
    save_gist_adapter(_lora_model(), tmp_path, base_model="tiny")
    with pytest.raises(ValueError, match="num_gist_tokens=2.*num_gist_tokens=3"):
        load_gist_adapter(lora_gist_llama3_1_tiny(LORA_MODULES, num_gist_tokens=3), tmp_path)
    other_ids = lora_gist_llama3_1_tiny(LORA_MODULES, num_gist_tokens=2, gist_token_ids=[300, 301])
    with pytest.raises(ValueError, match=r"\[300, 301\]"):
        load_gist_adapter(other_ids, tmp_path)


def test_lora_layout_mismatches_are_rejected(tmp_path: Path):
    save_gist_adapter(_lora_model(), tmp_path, base_model="tiny")
    more_lora = lora_gist_llama3_1_tiny(LORA_MODULES, num_gist_tokens=2, apply_lora_to_output=True)
    with pytest.raises(ValueError, match="missing keys.*output.lora_a"):
        load_gist_adapter(more_lora, tmp_path)
    no_lora = gist_llama3_1_tiny(num_gist_tokens=2)
    with pytest.raises(ValueError, match="unexpected keys.*lora"):
        load_gist_adapter(no_lora, tmp_path)
    load_gist_adapter(no_lora, tmp_path, strict=False)
    saved = load_file(str(tmp_path / ADAPTER_FILE))["tok_embeddings.gist_embeddings"]
    assert torch.equal(no_lora.tok_embeddings.gist_embeddings, saved)
    other_alpha = lora_gist_llama3_1_tiny(LORA_MODULES, num_gist_tokens=2, lora_alpha=32)
    with pytest.raises(ValueError, match="lora_alpha"):
        load_gist_adapter(other_alpha, tmp_path)


def test_foreign_files_are_rejected(tmp_path: Path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / ADAPTER_FILE), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a torchtune-gist adapter"):
        load_gist_adapter(gist_llama3_1_tiny(num_gist_tokens=2), tmp_path)
    with pytest.raises(FileNotFoundError):
        read_gist_adapter_metadata(tmp_path / "missing")
    with pytest.raises(ValueError, match="reserved"):
        save_gist_adapter(gist_llama3_1_tiny(), tmp_path, base_model="x", extra_metadata={"num_gist_tokens": 5})
    with pytest.raises(ValueError, match="no gist rows"):
        save_gist_adapter(gist_llama3_1_tiny(), tmp_path, base_model="x", state_dict={"x": torch.zeros(1)})


def test_unreadable_adapter_files_are_value_errors_naming_the_path(tmp_path: Path):
    path = save_gist_adapter(gist_llama3_1_tiny(num_gist_tokens=2), tmp_path / "good", base_model="tiny")
    data = path.read_bytes()
    for name, content in (("truncated", data[: len(data) // 2]), ("text", b"not an adapter\n"), ("empty", b"")):
        bad = tmp_path / name / ADAPTER_FILE
        bad.parent.mkdir()
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=f"{bad} is not a readable safetensors file"):
            read_gist_adapter_metadata(bad.parent)
        with pytest.raises(ValueError, match=f"{bad} is not a readable safetensors file"):
            load_gist_adapter(gist_llama3_1_tiny(num_gist_tokens=2), bad)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"apply_lora_to_mlp": True, "apply_lora_to_output": True}, {"use_dora": True}],
    ids=["lora", "lora_mlp_output", "dora"],
)
def test_merged_export_matches_the_gist_model(tmp_path: Path, kwargs):
    model = _lora_model(**kwargs)
    export_merged_hf(model, tmp_path, num_heads=4, num_kv_heads=2, dim=64, extra_config={"eos_token_id": 1})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (64, 4, 2)
    assert (config["num_hidden_layers"], config["intermediate_size"], config["vocab_size"]) == (2, 128, 512)
    assert config["rope_theta"] == 500_000 and config["rms_norm_eps"] == 1e-5 and config["eos_token_id"] == 1
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["rope_scaling"]["factor"] == 8
    assert config["max_position_embeddings"] == 2048 and config["tie_word_embeddings"] is False
    assert json.loads((tmp_path / "gist_config.json").read_text())["gist_token_ids"] == GIST_IDS
    hf = load_file(str(tmp_path / "model.safetensors"))
    assert "model.embed_tokens.weight" in hf and not any("lora" in k or "magnitude" in k for k in hf)

    plain = llama3_1(**TINY_LLAMA3_1_ARGS).eval()
    plain.load_state_dict(load_merged_hf(tmp_path), strict=True)
    tokens = _tokens()
    torch.testing.assert_close(_logits(plain, tokens), _logits(model, tokens), atol=1e-5, rtol=1e-5)


def test_merged_export_carries_the_base_folders_token_ids_and_files(tmp_path: Path):
    """As torchtune's checkpointer: the export names the base's special tokens and brings its tokenizer along."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(
        json.dumps({"bos_token_id": 128000, "eos_token_id": [128001, 128009], "vocab_size": 9})
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (base / name).write_text("{}")
    for name in (
        "model-00001-of-00004.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "adapter_config.json",
        ".tokenizer.json.tmp-host-123",
        "README.md",
    ):
        (base / name).write_text("not for the export")
    (base / "original").mkdir()
    out = export_merged_hf(gist_llama3_1_tiny(), tmp_path / "out", base_dir=base, extra_config={"eos_token_id": 128009})
    config = json.loads((out / "config.json").read_text())
    assert (
        config["bos_token_id"] == 128000
        and config["eos_token_id"] == 128009
        and config["vocab_size"] == TINY_VOCAB_SIZE
    )
    assert sorted(f.name for f in out.iterdir()) == sorted(
        [
            "config.json",
            "gist_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ]
    )


def test_merged_export_of_a_qlora_model(tmp_path: Path):
    model = _perturb(qlora_gist_llama3_1_tiny(LORA_MODULES, num_gist_tokens=2))
    export_merged_hf(model, tmp_path)
    plain = llama3_1(**TINY_QLORA_LLAMA3_1_ARGS).eval()
    plain.load_state_dict(load_merged_hf(tmp_path), strict=True)
    tokens = _tokens()
    torch.testing.assert_close(_logits(plain, tokens), _logits(model, tokens), atol=1e-5, rtol=1e-5)


def test_merged_export_unties_a_tied_model(tmp_path: Path):
    args = {**TINY_LLAMA3_1_ARGS, "scale_factor": 32}
    model = _perturb(gist_llama3_2(**args, num_gist_tokens=2))
    export_merged_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["rope_scaling"]["factor"] == 32
    plain = llama3_2(**args, tie_word_embeddings=False).eval()
    plain.load_state_dict(load_merged_hf(tmp_path), strict=True)
    tokens = _tokens()
    torch.testing.assert_close(_logits(plain, tokens), _logits(model, tokens), atol=1e-5, rtol=1e-5)


def test_merged_export_with_gist_ids_beyond_the_vocabulary(tmp_path: Path):
    args = {k: v for k, v in TINY_LLAMA3_1_ARGS.items()}
    model = _perturb(add_gist_embedding(llama3(**args), 2, [512, 513]))
    export_merged_hf(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["vocab_size"] == 514 and config["rope_scaling"] is None
    gist_config = json.loads((tmp_path / "gist_config.json").read_text())
    assert gist_config["base_vocab_size"] == 512 and gist_config["vocab_size"] == 514
    plain = llama3(**{**args, "vocab_size": 514}).eval()
    plain.load_state_dict(load_merged_hf(tmp_path), strict=True)
    tokens = _tokens([512, 513])
    merged, ours = _logits(plain, tokens, [512, 513]), _logits(model, tokens, [512, 513])
    torch.testing.assert_close(merged[..., :512], ours, atol=1e-5, rtol=1e-5)
    assert torch.equal(merged[..., 512:], torch.zeros_like(merged[..., 512:]))


def test_export_checks_given_shapes(tmp_path: Path):
    with pytest.raises(ValueError, match="num_heads=32"):
        export_merged_hf(gist_llama3_1_tiny(), tmp_path, num_heads=32)


def test_fsdp2_sharded_init_save_and_load(tmp_path: Path):
    """Gist rows under FSDP2 (one CPU process, gloo): init from the sharded vocabulary, load, gather."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = _lora_model()
        save_gist_adapter(model, tmp_path / "trained", base_model="tiny")
        reference = gist_adapter_state_dict(model)
        mean = model.tok_embeddings.weight.mean(0)
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        init_gist_embeddings(model)
        torch.testing.assert_close(model.tok_embeddings.gist_embeddings.full_tensor()[1], mean)
        load_gist_adapter(model, tmp_path / "trained")
        gathered = gist_adapter_state_dict(model)
        assert set(gathered) == set(reference)
        assert all(torch.equal(gathered[k], reference[k]) for k in reference)
        resaved = load_file(str(save_gist_adapter(model, tmp_path / "resaved", base_model="tiny", state_dict=gathered)))
        assert all(torch.equal(resaved[k], reference[k]) for k in reference)
    finally:
        dist.destroy_process_group()


def test_saved_checkpoints_are_readable_like_any_new_file(tmp_path: Path):
    """safetensors creates files ``0o600``; a checkpoint gets the mode the umask gives a new file."""
    import os

    from torchtune_gist._io import atomic_save_safetensors

    old = os.umask(0o022)
    try:
        path = atomic_save_safetensors({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
    assert load_file(path)["w"].tolist() == [1.0, 1.0]


def test_a_write_removes_the_temporary_file_a_killed_writer_left(tmp_path: Path):
    """A process killed between writing and renaming leaves its temporary file beside the target; the next write of
    that file removes it, but keeps one whose process still runs and those of other files."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    from torchtune_gist._io import atomic_save_safetensors

    target = tmp_path / "prompt.gist.safetensors"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom torchtune_gist._io import temporary_sibling\n"
            "with temporary_sibling(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'half')\n    print(tmp, flush=True)\n"
            "    time.sleep(60)",
            str(target),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    left = Path(writer.stdout.readline().strip())
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    writer.stdout.close()
    assert left.read_bytes() == b"half" and left.name == f".{target.name}.tmp-{socket.gethostname()}-{writer.pid}"
    running = left.with_name(f".{target.name}.tmp-{socket.gethostname()}-{os.getppid()}")
    other = left.with_name(f".other.safetensors.tmp-{socket.gethostname()}-{writer.pid}")
    running.write_bytes(b"busy")
    other.write_bytes(b"half")
    atomic_save_safetensors({"w": torch.ones(2)}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, running.name, other.name])


def test_every_atomic_write_reaches_the_disk_before_its_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A power cut after the rename must not leave an empty config or tokenizer file: each writer fsyncs the
    temporary file before renaming it into place."""
    import os

    from torchtune_gist import _io

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(_io.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(_io.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    _io.atomic_write_json({"k": 1}, tmp_path / "a.json")
    _io.atomic_copy(tmp_path / "a.json", tmp_path / "b.json")
    _io.atomic_save_safetensors({"w": torch.ones(2)}, tmp_path / "c.safetensors")
    assert events == ["fsync", "replace"] * 3
    assert (tmp_path / "b.json").read_text() == '{\n  "k": 1\n}\n'


def test_a_directory_replaces_its_older_self_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A checkpoint directory is written under a hidden name and renamed into place; the directory holding it is
    fsynced after the rename; an older one is replaced, never merged."""
    import os

    from torchtune_gist import _io

    target = tmp_path / "step_4"
    target.mkdir()
    (target / "stale.safetensors").write_text("old")
    partial = _io.partial_directory(target)
    assert partial.name == ".step_4.partial" and not any(partial.iterdir())
    assert _io.leftover_directory_of(partial.name) == "step_4" and _io.leftover_directory_of(".step_4.old") == "step_4"
    assert _io.leftover_directory_of("step_4") is None and _io.leftover_directory_of(".partial") is None
    (partial / "new.safetensors").write_text("new")
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        _io.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1]
    )
    _io.replace_directory(partial, target)
    assert [p.name for p in target.iterdir()] == ["new.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_4"] and synced == [str(partial), str(tmp_path)]


def test_a_save_cut_between_its_two_renames_is_put_in_place_at_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The old checkpoint renamed aside, the crash before the new one is renamed in: the next start puts the new one
    (complete: it was finished before the renames) in place instead of deleting both."""
    from torchtune_gist import _io
    from torchtune_gist.training._state import remove_leftover_checkpoints

    target = tmp_path / "step_4"
    target.mkdir()
    (target / "old.safetensors").write_text("old")
    partial = _io.partial_directory(target)
    (partial / "new.safetensors").write_text("new")
    real_replace, calls = _io.os.replace, []

    def crash_on_the_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(_io.os, "replace", crash_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        _io.replace_directory(partial, target)
    monkeypatch.undo()
    assert not target.exists() and sorted(p.name for p in tmp_path.iterdir()) == [".step_4.old", ".step_4.partial"]
    assert remove_leftover_checkpoints(tmp_path) == [tmp_path / ".step_4.old"]
    assert [p.name for p in tmp_path.iterdir()] == ["step_4"] and (target / "new.safetensors").read_text() == "new"
    assert _io.finish_replace(target) is None  # nothing to finish


def test_unwritable_reason_names_a_folder_this_process_may_not_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A read-only output_dir is named before training, not at the first checkpoint hours in."""
    from torchtune_gist import _io

    (tmp_path / "file").write_text("x")
    assert _io.unwritable_reason(tmp_path / "new" / "out.json", directory=False) is None
    assert "lies under" in _io.unwritable_reason(tmp_path / "file" / "out", directory=True)
    monkeypatch.setattr(_io.os, "access", lambda path, mode: Path(path) != tmp_path)  # as on a read-only mount
    for path in (tmp_path, tmp_path / "new" / "out.json"):
        assert (
            _io.unwritable_reason(path, directory=path == tmp_path)
            == f"this process may not write in {tmp_path} (read-only, or another user's)"
        )
    monkeypatch.undo()
    if Path("/proc/self").is_dir():  # a folder that passes os.access for root but takes no files
        assert _io.unwritable_reason("/proc/gist_out/results.json", directory=False).startswith(
            "this process cannot create files in /proc ("
        )
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]  # the probe left nothing behind
