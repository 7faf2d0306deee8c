"""A short variant of ``make demo``: the whole pipeline, fewer steps, smaller contexts."""

import json
from pathlib import Path

import pytest

from torchtune_gist.demo import DemoSettings, run


@pytest.mark.slow
def test_short_demo_produces_table_and_plot_and_gist_beats_negative_control(tmp_path: Path, capsys):
    settings = DemoSettings(
        out=tmp_path / "demo", context_tokens=64, passkey_digits=3, num_gist_tokens=4,
        base_steps=200, gist_steps=200, control_steps=20, eval_samples=60,
    )
    results = run(settings)
    out = capsys.readouterr().out
    assert "| mode | model | exact match |" in out and "Plot:" in out
    png = settings.out / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((settings.out / "results.json").read_text())
    assert saved["rows"] == results["rows"]
    acc = {r["mode"]: r["accuracy"] for r in results["rows"]}
    assert set(acc) == {"gist", "pos_control", "neg_control", "truncate"}
    assert acc["gist"] > acc["neg_control"]
    gist = next(r for r in results["rows"] if r["mode"] == "gist")
    pos = next(r for r in results["rows"] if r["mode"] == "pos_control")
    assert gist["compression_ratio"] == pytest.approx(gist["context_tokens"] / 4)
    assert gist["kv_bytes"] < pos["kv_bytes"]


def test_demo_refuses_a_folder_trained_with_other_settings(tmp_path: Path):
    from torchtune_gist.demo import _tokenizer, check_settings
    from torchtune_gist.tiny import write_tiny_tokenizer

    tokenizer = _tokenizer(write_tiny_tokenizer(tmp_path / "assets")[0].parent)
    check_settings(DemoSettings(out=tmp_path / "demo"), tokenizer)
    check_settings(DemoSettings(out=tmp_path / "demo", eval_samples=7), tokenizer)
    with pytest.raises(ValueError, match=r"context_tokens: 128 -> 256.*--fresh"):
        check_settings(DemoSettings(out=tmp_path / "demo", context_tokens=256), tokenizer)


def test_demo_refuses_contexts_longer_than_the_model(tmp_path: Path):
    from torchtune_gist.demo import _tokenizer, check_settings
    from torchtune_gist.tiny import write_tiny_tokenizer

    tokenizer = _tokenizer(write_tiny_tokenizer(tmp_path / "assets")[0].parent)
    with pytest.raises(ValueError, match="holds 2048 positions"):
        check_settings(DemoSettings(out=tmp_path / "demo", context_tokens=2040), tokenizer)
    assert not (tmp_path / "demo" / "settings.json").exists()


def test_demo_cli_rejects_a_bad_count(capsys):
    from torchtune_gist.demo import main

    with pytest.raises(SystemExit):
        main(["--context-tokens", "0"])
    assert "--context-tokens must be at least 1" in capsys.readouterr().err


def test_long_demo_contexts_learn_the_task_short_first():
    from torchtune_gist.demo import base_phases

    assert base_phases(DemoSettings(context_tokens=64)) == [(64, 300, 2e-3)]
    assert base_phases(DemoSettings(context_tokens=128)) == [(128, 300, 2e-3)]
    assert base_phases(DemoSettings(context_tokens=1024, long_base_steps=150)) == [(128, 300, 2e-3), (1024, 150, 1e-3)]


def test_long_demo_contexts_find_the_gist_route_short_first():
    from torchtune_gist.demo import gist_phases

    assert gist_phases(DemoSettings(context_tokens=128)) == [("gist", 128, 450, 2e-3)]
    assert gist_phases(DemoSettings(context_tokens=1024, long_gist_steps=150)) == [
        ("gist_short", 128, 450, 2e-3), ("gist", 1024, 150, 1e-3)]


def test_demo_cli_reports_impossible_settings_without_a_traceback(tmp_path: Path, capsys):
    from torchtune_gist.demo import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "demo"), "--context-tokens", "2040"])
    assert "the demo model holds 2048 positions" in capsys.readouterr().err
