"""Smoke tests of the benchmark scripts: they run and write their outputs (no timing goals are checked here)."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench_quick")
    proc = _run(str(BENCH / "bench_cpu.py"), "--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_quick_writes_json_with_every_section(quick_run: Path) -> None:
    res = json.loads((quick_run / "results_cpu.json").read_text())
    assert res["meta"]["quick"] is True
    assert res["meta"]["machine"]["torch_threads"] == 1
    for section in ("training", "packing", "inference", "masks"):
        assert section in res, section
    train = res["training"]["shapes"][0]
    assert set(train["tokens_per_s"]) == {"gist", "gist_segments", "causal_none", "causal_dense"}
    variants = res["packing"]["variants"]
    assert variants["batch_size_1"]["padding_fraction"] == 0
    assert any(name.startswith("packed_") for name in variants)
    for name, v in variants.items():  # segments compute each document alone: less attention than the dense packed row
        if name.endswith("_segments"):
            assert v["qk_pairs"] < variants[name.removesuffix("_segments")]["qk_pairs"]
    for v in variants.values():  # every variant holds the same real tokens
        assert v["token_slots"] * (1 - v["padding_fraction"]) == pytest.approx(res["packing"]["real_tokens"])
    assert res["inference"]["stock"] and res["inference"]["reuse"]["variants"]
    for section, variants in (("compress_memory", ("one_pass", "chunked")), ("score_memory", ("dense", "stores"))):
        for cell in res["inference"][section]["cells"]:  # each call measured in its own process
            for variant in variants:
                assert cell[variant]["time_s"] > 0 and cell[variant]["baseline_rss_bytes"] > 0
    assert res["masks"]["sizes"]
    assert {g["met"] for g in res["goals"]} <= {True, False} and len(res["goals"]) >= 4


def test_quick_kv_ratio_is_exact(quick_run: Path) -> None:
    res = json.loads((quick_run / "results_cpu.json").read_text())
    cells = res["inference"]["shapes"]["gqa"]["cells"] + res["inference"]["shapes"]["mha"]["cells"]
    assert cells
    for c in cells:
        n, p, k = c["kv_ratio"]["n"], c["prompt_len"], c["k"]
        assert c["gist"]["kv_bytes"] * (p + k + n) == c["full"]["kv_bytes"] * (k + n)
        assert c["truncate"]["kv_bytes"] == c["gist"]["kv_bytes"]
        assert c["gist"]["cache_bytes"] < c["gist"]["kv_bytes"]
    b = res["inference"]["batched"]
    n = b["rows"] * res["inference"]["shapes"]["gqa"]["n"]
    assert b["full"]["kv_bytes"] * (b["k"] * b["rows"] + n) == b["gist"]["kv_bytes"] * (
        (b["prompt_len"] + b["k"]) * b["rows"] + n
    )


def test_quick_writes_markdown_and_plots(quick_run: Path) -> None:
    report = (quick_run / "RESULTS.md").read_text()
    assert "## CPU" in report and "### Goals" in report and "torch.set_num_threads(1)" in report
    assert "No GPU was lent" in report
    res = json.loads((quick_run / "results_cpu.json").read_text())
    expected = {
        "train_throughput.png",
        "packing.png",
        "kv_bytes.png",
        "decode.png",
        "reuse_many.png",
        "compress_memory.png",
        "score_memory.png",
    }
    assert set(res["plots"]) == expected
    for name in expected:
        assert (quick_run / name).read_bytes()[:8] == PNG_MAGIC, name
        assert f"({name})" in report
    assert not list(quick_run.glob(".*tmp*")), "temporary files left behind"


def _script(monkeypatch: pytest.MonkeyPatch, name: str) -> ModuleType:
    """The benchmark script ``name`` as a module (``benchmarks/`` on the path: the scripts import their siblings)."""
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module(name)


def test_render_only_rebuilds_the_report_from_json(quick_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (quick_run / "RESULTS.md").unlink()
    before = json.loads((quick_run / "results_cpu.json").read_text())
    _script(monkeypatch, "bench_cpu").main(["--render-only", "--out", str(quick_run)])
    after = json.loads((quick_run / "results_cpu.json").read_text())
    assert after["inference"] == before["inference"] and after["goals"] == before["goals"]
    assert "### Goals" in (quick_run / "RESULTS.md").read_text()


def test_bytes_read_ratio_weighs_the_prompts_kv_against_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights of 100 bytes, 1 KV byte per entry, K=2, 2 continuation and 4 new tokens (4 entries held halfway)."""
    ratio = _script(monkeypatch, "_cpu_report").bytes_read_ratio
    shape = {"weight_bytes": 100, "kv_bytes_per_token": 1, "cont_len": 2, "new_tokens": 4}
    assert ratio(shape, prompt_len=96, k=2) == pytest.approx((100 + 96 + 6) / (100 + 6))
    assert ratio(shape, prompt_len=96, k=2, rows=4) == pytest.approx((100 + 4 * 102) / (100 + 4 * 6))


def test_packing_ceiling_removes_the_per_step_cost_from_batch_size_1(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps of 20 ms plus 1 ms per token slot: 100 one-token steps take 2.1 s, of which 0.1 s are tokens."""
    report = _script(monkeypatch, "_cpu_report")
    variants = {
        name: {"steps": steps, "token_slots": slots, "time_s": 0.02 * steps + 0.001 * slots}
        for name, steps, slots in (("batch_size_1", 100, 100), ("packed_8_segments", 13, 104), ("packed_4", 25, 100))
    }
    variants["packed_4"]["time_s"] = 99.0  # a dense packed row (attention over the whole row): left out of the fit
    assert report.step_cost_fit(variants) == pytest.approx((0.02, 0.001))
    assert report.packing_ceiling(variants) == pytest.approx(21.0)


def test_weight_bytes_per_step_counts_llama3_1_8b_but_its_embedding(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the embedding table added back, the count is Llama 3.1 8B's published 8,030,261,248 parameters."""
    bench_gpu = _script(monkeypatch, "bench_gpu")
    arch = {**bench_gpu.LLAMA3_1_8B_ARGS, "num_layers": 32}
    embedding = arch["vocab_size"] * arch["embed_dim"]
    assert bench_gpu.weight_bytes_per_step(arch) == 2 * (8_030_261_248 - embedding)


def test_quick_run_records_each_sections_seconds(quick_run: Path) -> None:
    meta = json.loads((quick_run / "results_cpu.json").read_text())["meta"]
    assert set(meta["section_s"]) == {"training", "packing", "inference", "masks"}
    assert sum(meta["section_s"].values()) <= meta["duration_s"]
    assert "; by section: " in (quick_run / "RESULTS.md").read_text()


def test_bench_cpu_rejects_unknown_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as e:
        _script(monkeypatch, "bench_cpu").main(["--quick", "--only", "nonsense", "--out", str(tmp_path)])
    assert e.value.code == 2 and "unknown sections" in capsys.readouterr().err


def test_bench_gpu_dry_run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    assert _script(monkeypatch, "bench_gpu").main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing measured" in out
    if not torch.cuda.is_available():
        assert "no GPU" in out


def test_gpu_report_lists_the_notes_added_to_its_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """What later runs of a GPU session found is added to results_gpu.json as ``notes`` and shown with the run."""
    machine = {"date": "2026-12-04 15:51 UTC", "cuda": "NVIDIA H200", "cpu_model": "x", "cores": 16, "torch": "2.11"}
    res = {"meta": {"machine": machine, "tiny": False, "command": "bench_gpu.py", "duration_s": 1.0}}
    report = _script(monkeypatch, "bench_gpu").render_gpu_markdown(
        {**res, "notes": ["cuDNN rebuilt its plan", "second"]}
    )
    assert "### Findings of the same session\n\n- cuDNN rebuilt its plan\n- second\n" in report
    assert "Findings" not in _script(monkeypatch, "bench_gpu").render_gpu_markdown(res)


def test_gpu_report_shows_compiled_decoding_and_the_runs_that_updated_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second call (``--update``) replaces only its sections and is named in the header; compiled decode rows get
    their own columns (ms per token, full / gist compiled, and what compiling gains the gist cache)."""
    bench_gpu = _script(monkeypatch, "bench_gpu")
    machine = {"date": "2026-12-04 15:51 UTC", "cuda": "NVIDIA H200", "cpu_model": "x", "cores": 16, "torch": "2.11"}
    update = {"machine": {**machine, "date": "2026-12-05 10:00 UTC"}, "command": "bench_gpu.py --update"}
    arch = {**bench_gpu.LLAMA3_1_8B_ARGS, "num_layers": 8}
    row = {"batch": 8, "prompt_len": 16384, "stock": {"error": "out of memory"}}
    for method, ms, kv in (("full", 9.0, 4_000_000_000), ("gist", 8.0, 8_000_000)):
        row[method] = {"decode_s_per_token": ms / 1e3, "kv_bytes": kv}
    row["full_compiled"] = {"decode_s_per_token": 0.006}
    row["gist_compiled"] = {"decode_s_per_token": 0.002}
    report = bench_gpu.render_gpu_markdown(
        {
            "meta": {"machine": machine, "tiny": False, "command": "bench_gpu.py", "duration_s": 1.0},
            "updates": [{**update, "sections": ["decode"], "duration_s": 2.0}],
            "decode": {"arch": arch, "dtype": "torch.bfloat16", "k": 10, "new_tokens": 16, "rows": [row]},
        }
    )
    assert "- Updated 2026-12-05 10:00 UTC on NVIDIA H200 (torch 2.11), sections decode measured again" in report
    assert "| full compiled ms/tok | gist compiled ms/tok | compiled full / gist | gist: eager / compiled |" in report
    assert "| 9 | 8 | out of memory | 1.12x |" in report and "| 6 | 2 | 3.00x | 4.00x |" in report


def test_bench_gpu_update_keeps_the_sections_it_does_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench_gpu = _script(monkeypatch, "bench_gpu")
    first = json.loads((BENCH / "results_gpu.json").read_text())  # the H200 run's
    (tmp_path / "results_gpu.json").write_text(json.dumps(first))
    assert bench_gpu.main(["--tiny", "--only", "decode", "--update", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results_gpu.json").read_text())
    assert res["attention"] == first["attention"] and res["meta"] == first["meta"]
    assert res["decode"]["arch"]["num_layers"] != first["decode"]["arch"]["num_layers"]  # the tiny run's
    assert [u["sections"] for u in res["updates"]] == [["decode"]] and res["updates"][0]["duration_s"] > 0
    fresh = tmp_path / "fresh"  # nothing to update there: a run of its own
    assert bench_gpu.main(["--tiny", "--only", "decode", "--update", "--out", str(fresh)]) == 0
    assert "updates" not in json.loads((fresh / "results_gpu.json").read_text())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_bench_gpu_measures_nothing_without_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert _script(monkeypatch, "bench_gpu").main(["--out", str(tmp_path)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "results_gpu.json").exists()


@pytest.mark.slow
def test_device_check_runs_every_step(tmp_path: Path) -> None:
    """The one-call GPU check (smoke checks, recipes by name, bench_gpu.py), whole, on this device at tiny sizes:
    it must not first break on a lent GPU."""
    env = {
        **os.environ,
        "PY": sys.executable,
        "DEVICE": "cuda" if torch.cuda.is_available() else "cpu",
        "DTYPE": "bf16" if torch.cuda.is_available() else "fp32",
        "BENCH_ARGS": "--tiny",
        "OUT": str(tmp_path / "out"),
        "TINY": str(tmp_path / "tiny"),
        "TIME_SCALE": "4",
    }  # the steps' limits are sized for a GPU; a busy 2-core CPU needs more
    proc = subprocess.run(
        ["bash", str(BENCH / "device_check.sh")], cwd=REPO, capture_output=True, text=True, env=env, timeout=1800
    )
    out = tmp_path / "out"
    summary = (out / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stdout[-3000:]
    steps = ["smoke", "tiny_assets", "single_device", "resume", "distributed", "generate", "eval", "bench"]
    assert [line.split()[:2] for line in summary.splitlines()] == [[step, "rc=0"] for step in steps]
    for mode in ("gist", "truncate", "pos_control"):
        assert json.loads((out / "eval" / mode / "results.json").read_text())["config"]["model_args"]["mode"] == mode
    res = json.loads((out / "results_gpu.json").read_text())
    assert res["meta"]["tiny"] is True and {"attention", "packing", "memory", "decode"} <= set(res)
    assert "tiny shapes: a check of the script" in (out / "RESULTS.md").read_text()


def test_bench_gpu_rejects_bad_shapes(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        _script(monkeypatch, "bench_gpu").main(["--dry-run", "--train-shapes", "2x"])
    assert e.value.code == 2 and "BATCHxSEQ" in capsys.readouterr().err


def _study_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("smollm2_study", BENCH / "smollm2_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_gap_share_and_its_interval() -> None:
    study = _study_module()
    pos, neg = [1.0, 0.8, 0.9, 0.7] * 10, [0.2, 0.1, 0.3, 0.2] * 10
    gist = [n + 0.5 * (p - n) for p, n in zip(pos, neg)]
    got = study.gap_share(gist, pos, neg)
    assert got["share"] == pytest.approx(0.5)
    assert got["lo"] <= 0.5 <= got["hi"]
    assert study.gap_share(pos, pos, neg)["share"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same"):
        study.gap_share(gist[:3], pos, neg)


def test_study_final_checkpoint_follows_epochs(tmp_path: Path) -> None:
    study = _study_module()
    one = study.Training("a", study.ALPACA_CONFIG, {"num_gist_tokens": 1})
    three = study.Training("b", study.ALPACA_CONFIG, {"num_gist_tokens": 1, "epochs": 3})
    assert one.final_dir(tmp_path) == tmp_path / "epoch_0"
    assert three.final_dir(tmp_path) == tmp_path / "epoch_2"


def test_study_runs_extras_only_when_asked() -> None:
    study = _study_module()
    args = study.argparse.Namespace(only=None, extras=False)
    chosen = [t.name for t in study.PARTS["alpaca"].trainings if study._selected(t.name, t.extra, args)]
    assert chosen == ["gist1", "pos1", "neg1"]
    args.extras = True
    assert all(study._selected(t.name, t.extra, args) for t in study.PARTS["alpaca"].trainings)
    args.only = ["gist5"]
    assert [t.name for t in study.PARTS["alpaca"].trainings if study._selected(t.name, t.extra, args)] == ["gist5"]


class _FailedTraining:
    """A stand-in for the recipe's process: exits 1 at once."""

    def wait(self) -> int:
        return 1


def test_study_training_gets_the_dtype_and_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = _study_module()
    commands = []

    monkeypatch.setattr(study.subprocess, "Popen", lambda cmd, **kw: commands.append(cmd) or _FailedTraining())
    training = study.Training("gist1", study.ALPACA_CONFIG, {"num_gist_tokens": 1})
    with pytest.raises(RuntimeError, match="failed"):
        study.train(study.PARTS["alpaca"], training, tmp_path, threads=1, dtype="bf16")
    assert "dtype=bf16" in commands[0] and not any(c.startswith("seed=") for c in commands[0])
    passkey = study.PARTS["passkey"].trainings[0]
    with pytest.raises(RuntimeError, match="failed"):
        study.train(study.PARTS["passkey"], passkey, tmp_path, threads=1, seed=3)
    assert {"seed=3", "dataset.seed=3"} <= set(commands[1])
    with pytest.raises(RuntimeError, match="failed"):
        study.train(study.PARTS["alpaca"], training, tmp_path, threads=1, seed=3)
    assert "seed=3" in commands[2] and "dataset.seed=3" not in commands[2]
    with pytest.raises(SystemExit):
        study.main(["--seed", "3"])


def test_study_long_context_training_starts_from_the_short_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = _study_module()
    commands = []
    monkeypatch.setattr(study.subprocess, "Popen", lambda cmd, **kw: commands.append(cmd) or _FailedTraining())
    part = study.PARTS["passkey"]
    long = next(t for t in part.trainings if t.start_from is not None)
    with pytest.raises(RuntimeError, match="has not run"):
        study.train(part, long, tmp_path, threads=1)
    assert commands == []
    adapter = tmp_path / long.start_from / "epoch_0" / study.ADAPTER
    adapter.parent.mkdir(parents=True)
    adapter.touch()
    with pytest.raises(RuntimeError, match="failed"):
        study.train(part, long, tmp_path, threads=1)
    assert f"initial_adapter={adapter}" in commands[0] and f"context_tokens=[{study.LONG_CONTEXT}]" in commands[0]


def test_study_reuses_an_evaluation_only_for_the_same_settings_and_checkpoint(tmp_path: Path) -> None:
    study = _study_module()
    adapter = tmp_path / "gist8" / "epoch_0" / study.ADAPTER
    adapter.parent.mkdir(parents=True)
    adapter.touch()
    settings = {"limits": {"gist_passkey": 100}, "max_gen_toks": 128, "dtype": "fp32"}
    path = tmp_path / "eval.json"
    assert not study._reusable(path, settings, str(adapter.parent))
    path.write_text(json.dumps({**settings, "tasks": {}}))
    os.utime(adapter, (path.stat().st_mtime - 10,) * 2)
    assert study._reusable(path, settings, str(adapter.parent))
    assert study._reusable(path, settings, None)
    assert not study._reusable(path, {**settings, "max_gen_toks": 512}, str(adapter.parent))
    assert not study._reusable(path, {**settings, "data_dir": "/elsewhere"}, str(adapter.parent))
    os.utime(adapter, (path.stat().st_mtime + 10,) * 2)  # retrained after the evaluation
    assert not study._reusable(path, settings, str(adapter.parent))


def test_a_ctrl_c_during_a_study_training_waits_for_its_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recipe gets the terminal's Ctrl-C too and saves step_N before exiting: the study waits for it, then stops."""
    study = _study_module()

    class Interrupted:
        waits = 0

        def wait(self) -> int:
            Interrupted.waits += 1
            if Interrupted.waits == 1:
                raise KeyboardInterrupt
            return 130

        def kill(self) -> None:
            raise AssertionError("killed before its checkpoint")

    monkeypatch.setattr(study.subprocess, "Popen", lambda cmd, **kw: Interrupted())
    training = study.Training("gist1", study.ALPACA_CONFIG, {"num_gist_tokens": 1})
    with pytest.raises(KeyboardInterrupt):
        study.train(study.PARTS["alpaca"], training, tmp_path, threads=1)
    assert Interrupted.waits == 2


def test_decode_split_counts_every_prefill_chunk_as_prefill() -> None:
    """A long prompt's prefill runs in chunks, each a forward: only the trailing one-token forwards are decode steps
    (counting the chunks as steps put the prefill of one chunk in the prefill column and chunks in the decode
    median)."""
    sys.path.insert(0, str(BENCH))
    try:
        from _common import decode_split
    finally:
        sys.path.remove(str(BENCH))
    stamps = [(1.0, 512), (2.0, 512), (3.0, 8), (3.1, 1), (3.2, 1), (3.35, 1)]  # two chunks, the continuation, 3 steps
    prefill, step, n = decode_split(stamps, 0.5)
    assert prefill == pytest.approx(2.6) and step == pytest.approx(0.125) and n == 2
    assert decode_split([(1.0, 1), (2.0, 1), (2.5, 1)], 0.0) == (2.0, 0.5, 1)  # a one-token prompt is still the prefill
    with pytest.raises(ValueError, match="at least two decode steps"):
        decode_split([(1.0, 512), (2.0, 1)], 0.0)
