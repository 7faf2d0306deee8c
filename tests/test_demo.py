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
