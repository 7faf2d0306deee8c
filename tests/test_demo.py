"""A short variant of ``make demo``: the whole pipeline, fewer steps, smaller contexts."""

import json
import sys
from pathlib import Path

import pytest

from torchtune_gist.demo import DemoSettings, run


@pytest.mark.slow
def test_short_demo_produces_table_and_plot_and_gist_beats_negative_control(tmp_path: Path, capsys):
    settings = DemoSettings(
        out=tmp_path / "demo",
        context_tokens=64,
        passkey_digits=3,
        num_gist_tokens=4,
        base_steps=120,
        gist_steps=60,
        control_steps=10,
        eval_samples=40,  # gist 22.5% [10, 35], no context 0% (2026-12-04)
    )
    results = run(settings)
    out = capsys.readouterr().out
    assert "| mode | model | exact match [95% interval] |" in out and "Plot:" in out
    png = settings.out / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((settings.out / "results.json").read_text())
    assert saved["rows"] == results["rows"]
    acc = {r["mode"]: r["accuracy"] for r in results["rows"]}
    assert set(acc) == {"gist", "pos_control", "neg_control", "truncate"}
    assert acc["gist"] > acc["neg_control"]
    for row in results["rows"]:  # 40 passkeys: a bootstrap interval around each accuracy, tens of points wide for gist
        lo, hi = row["accuracy_interval"]
        assert lo <= row["accuracy"] <= hi and f"{100 * row['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]" in out
    gist_steps = [step for step, _ in saved["loss_curves"]["stage 2: gist"]]
    assert gist_steps == list(range(1, settings.gist_steps + 1))  # the plotted curve, one point per step
    gist_lo, gist_hi = next(r for r in results["rows"] if r["mode"] == "gist")["accuracy_interval"]
    assert acc["gist"] in (0.0, 1.0) or gist_hi - gist_lo > 0.1
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
        ("gist_short", 128, 450, 2e-3),
        ("gist", 1024, 150, 1e-3),
    ]


def test_demo_cli_reports_impossible_settings_without_a_traceback(tmp_path: Path, capsys):
    from torchtune_gist.demo import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "demo"), "--context-tokens", "2040"])
    assert "the demo model holds 2048 positions" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--context-tokens", "40"], "context_tokens=40 is too short: the needle alone is"),
        (["--num-gist-tokens", "250"], "the tokenizer has only 245 reserved special tokens"),
    ],
)
def test_demo_cli_reports_what_the_data_and_tokenizer_cannot_hold(tmp_path: Path, capsys, argv, message):
    from torchtune_gist.demo import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "demo"), *argv])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_demo_fresh_deletes_only_a_folder_the_demo_wrote(tmp_path: Path, capsys):
    from torchtune_gist.demo import _tokenizer, check_settings, main, remove_demo_outputs
    from torchtune_gist.tiny import write_tiny_tokenizer

    foreign = tmp_path / "repo"
    (foreign / "src").mkdir(parents=True)
    (foreign / "settings.json").write_text('{"editor": "vim"}')
    with pytest.raises(SystemExit):
        main(["--out", str(foreign), "--fresh"])
    assert "not a demo output folder" in capsys.readouterr().err
    assert (foreign / "src").is_dir() and (foreign / "settings.json").exists()

    remove_demo_outputs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    remove_demo_outputs(tmp_path / "empty")
    assert (tmp_path / "empty").is_dir()

    tokenizer = _tokenizer(write_tiny_tokenizer(tmp_path / "assets")[0].parent)
    demo = tmp_path / "demo"
    check_settings(DemoSettings(out=demo), tokenizer)
    (demo / "base").mkdir()
    check_settings(DemoSettings(out=demo, context_tokens=256), tokenizer, fresh=True)
    assert not (demo / "base").exists()
    assert json.loads((demo / "settings.json").read_text())["context_tokens"] == 256


def test_demo_runs_stage_2_through_the_running_python(tmp_path: Path, monkeypatch, capsys):
    import runpy

    from torchtune_gist import demo

    monkeypatch.setattr(sys, "argv", ["tune", "run", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("torchtune._cli.tune", run_name="__main__")
    assert exit_info.value.code == 0 and "tune run" in capsys.readouterr().out
    calls = []

    class Recipe:
        def __init__(self, cmd, **kwargs):
            calls.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(demo.subprocess, "Popen", Recipe)
    demo.run_gist_recipe(DemoSettings(), tmp_path, tmp_path, tmp_path / "run", "gist", 2, 64, 1e-3)
    assert calls[0][:5] == [sys.executable, "-m", "torchtune._cli.tune", "run", "gist_lora_single_device"]


@pytest.mark.parametrize(
    "argv, out",
    [([], "outputs/demo"), (["--quick"], "outputs/demo_quick"), (["--quick", "--out", "elsewhere"], "elsewhere")],
)
def test_demo_quick_has_its_own_output_folder(monkeypatch, argv, out):
    from torchtune_gist import demo

    seen = []
    monkeypatch.setattr(demo, "run", lambda settings, fresh: seen.append(settings))
    demo.main(argv)
    expected = Path(out) if out == "elsewhere" else demo.REPO / out
    assert seen[0].out == expected


def test_demo_table_shows_what_each_mode_keeps():
    from torchtune_gist.demo import results_table
    from torchtune_gist.eval import kept_ratio

    def row(mode: str) -> dict:
        return {
            "mode": mode,
            "model": "m",
            "accuracy": 1.0,
            "accuracy_interval": [1.0, 1.0],
            "context_tokens": 128.0,
            "num_gist_tokens": 8,
            "compression_ratio": kept_ratio(mode, 128.0, 8),
            "kv_bytes": 1024.0,
        }

    assert kept_ratio("truncate", 4.0, 8) == 1.0
    cells = {
        line.split("|")[1].strip(): line.split("|")[6].strip()
        for line in results_table([row(m) for m in ("gist", "pos_control", "neg_control", "truncate")]).splitlines()[2:]
    }
    assert cells == {"gist": "16.0x", "pos_control": "1x (full)", "neg_control": "-", "truncate": "16.0x"}


def test_a_gist_stage_stopped_by_ctrl_c_is_waited_for_and_goes_on_from_its_checkpoint(tmp_path: Path, monkeypatch):
    """Ctrl-C reaches the recipe too: the demo waits while it saves its step (subprocess.run would kill it 0.25 s
    later), and the next run resumes that checkpoint instead of starting the stage over."""
    from torchtune_gist import demo
    from torchtune_gist.training import RECIPE_STATE_FILE, save_recipe_state

    calls, waits = [], []

    class Recipe:
        def __init__(self, cmd, **kwargs):
            calls.append(cmd)

        def wait(self):
            waits.append(1)
            if len(waits) == 1:
                raise KeyboardInterrupt  # the terminal's Ctrl-C, while the recipe saves step_N
            return 0

        def kill(self):
            raise AssertionError("killed before it saved")

    monkeypatch.setattr(demo.subprocess, "Popen", Recipe)
    args = (
        DemoSettings(out=tmp_path),
        tmp_path / "assets",
        tmp_path / "base",
        tmp_path / "gist",
        "gist",
        10,
        128,
        1e-3,
    )
    with pytest.raises(KeyboardInterrupt):
        demo.run_gist_recipe(*args, initial_adapter=tmp_path / "earlier")
    assert len(waits) == 2 and any(a.startswith("initial_adapter=") for a in calls[0])
    save_recipe_state(
        tmp_path / "gist" / "step_3" / RECIPE_STATE_FILE,
        optimizer_state={"state": {}, "param_groups": []},
        progress={"global_step": 3},
        rng_states={},
    )
    (tmp_path / "gist" / "step_3" / "gist_adapter.safetensors").write_bytes(b"")
    demo.run_gist_recipe(*args, initial_adapter=tmp_path / "earlier")
    assert "resume_from_checkpoint=True" in calls[1] and not any(a.startswith("initial_adapter=") for a in calls[1])
