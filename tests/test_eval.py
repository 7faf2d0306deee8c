"""lm-eval integration: scoring, task data, the torchtune_gist model in every mode, loading, the CLI."""

import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import lm_eval
import pytest
import torch
from lm_eval.api.instance import Instance
from omegaconf import OmegaConf
from rouge_score import rouge_scorer
from safetensors.torch import save_file
from torchtune.models.llama3_1 import llama3_1
from torchtune.modules import TiedLinear

from torchtune_gist._io import atomic_save_safetensors
from torchtune_gist.checkpointing import ADAPTER_FILE, export_merged_hf, save_gist_adapter
from torchtune_gist.data import GistInstructTransform, GistPasskeyTransform
from torchtune_gist.eval import (
    GIST_MARKER,
    TASKS_DIR,
    GistGeneration,
    TorchtuneGistLM,
    alpaca_plus_dataset,
    alpaca_plus_doc_to_text,
    alpaca_plus_process_results,
    gist_task_manager,
    kept_ratio,
    passkey_dataset,
    passkey_doc_to_text,
    passkey_exact_match,
    passkey_process_results,
    rouge_scores,
)
from torchtune_gist.generation import GENERATION_MODES, generate
from torchtune_gist.masks import make_gist_mask
from torchtune_gist.models import (
    gist_llama3_1_tiny,
    lora_gist_llama3_1_tiny,
    lora_gist_llama3_2,
    qlora_gist_llama3_1_tiny,
)
from torchtune_gist.tiny import TINY_LLAMA3_1_ARGS
from torchtune_gist.training import load_base_weights

K = 2
SHARED_ALPACA_PLUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_plus"
PASSKEY_SETTINGS = dict(num_samples=4, context_tokens=[128, 160], depths=[0.5], seed=3)
ALL_TASKS = ["gist_passkey", "gist_passkey_ko", "alpaca_plus"]


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    """A random tiny gist model whose attention is scaled up, so that what the mask lets a token see
    decides its next token (at plain init the last token's embedding alone mostly does)."""
    torch.manual_seed(0)
    model = gist_llama3_1_tiny(num_gist_tokens=K).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.output_proj.weight.mul_(10)
            layer.attn.q_proj.weight.mul_(4)
    return model


@pytest.fixture(scope="module")
def alpaca_plus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The official validation files from ../shared/data, or a small stand-in where they are absent."""
    if SHARED_ALPACA_PLUS.is_dir():
        return SHARED_ALPACA_PLUS
    directory = tmp_path_factory.mktemp("alpaca_plus")
    records = [
        {"instruction": "Reverse the word.", "input": "cat", "output": "tac", "source": "alpaca"},
        {"instruction": "Name a primary colour.", "input": "", "output": "Red.", "source": "alpaca"},
        {"instruction": "Add the numbers.", "input": "2, 3", "output": "5", "source": "self_instruct"},
    ]
    for split in ("seen", "unseen", "human"):
        (directory / f"alpaca_plus_validation_{split}.json").write_text(json.dumps(records))
    return directory


@pytest.fixture(scope="module")
def task_manager(tiny_tokenizer: Any, alpaca_plus_dir: Path) -> Any:
    return gist_task_manager(tokenizer=tiny_tokenizer, data_dir=str(alpaca_plus_dir), **PASSKEY_SETTINGS)


def _evaluate(
    lm: TorchtuneGistLM, tasks: List[str], task_manager: Any, limit: int = 2, **kwargs: Any
) -> Dict[str, Any]:
    return lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=task_manager, limit=limit, bootstrap_iters=0, **kwargs
    )


# ----------------------------------------------------------------------------- scoring


def test_rouge_equals_rouge_score() -> None:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    pairs = [
        ("The cat sat on the mat.", "A cat was sitting on a mat."),
        ("Paris is the capital of France.", "The capital of France is Paris."),
        ("", "Something."),
        ("running dogs", "run dog"),
    ]
    for prediction, reference in pairs:
        ours = rouge_scores(prediction, reference)
        theirs = scorer.score(reference, prediction)
        assert ours == {name: theirs[name].fmeasure for name in ("rouge1", "rouge2", "rougeL")}
    assert rouge_scores("running dogs", "run dog") == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}  # stemming on
    assert rouge_scores("Paris is the capital of France.", "The capital of France is Paris.")["rouge1"] == 1.0
    assert rouge_scores("totally unrelated", "The capital of France is Paris.")["rougeL"] == 0.0


@pytest.mark.parametrize(
    "output, expected",
    [
        ("71432", 1.0),
        (" 71432.", 1.0),
        ("The pass key is 71432", 1.0),
        ("71432 then 9", 1.0),
        ("714321", 0.0),
        ("7143", 0.0),
        ("no digits", 0.0),
        ("12 71432", 0.0),
        ("", 0.0),
    ],
)
def test_passkey_exact_match(output: str, expected: float) -> None:
    assert passkey_exact_match(output, "71432") == expected


def test_process_results_report_the_gist_metrics() -> None:
    doc = {"instruction": "x", "input": "", "output": "The capital of France is Paris."}
    plain = alpaca_plus_process_results(doc, ["Paris is the capital of France."])
    assert plain == rouge_scores("Paris is the capital of France.", doc["output"])
    reported = alpaca_plus_process_results(doc, [GistGeneration(" Paris is the capital of France. ", 30, 3, 4096)])
    assert reported == {**plain, "compression_ratio": 10.0, "kv_bytes": 4096.0}

    passkey_doc = {"passkey": "71432", "target_context_tokens": 3000, "compression_ratio": 250.0}
    assert passkey_process_results(passkey_doc, ["71432"]) == {"acc": 1.0, "acc_3000": 1.0}  # another model: no ratio
    assert passkey_process_results(passkey_doc, [GistGeneration("1", 2990, 10, 8)]) == {
        "acc": 0.0,
        "acc_3000": 0.0,
        "compression_ratio": 299.0,
        "kv_bytes": 8.0,
    }
    # The ratio says what each mode keeps of the prompt: all of it, its last K tokens, or nothing.
    ratios = {
        mode: passkey_process_results(passkey_doc, [GistGeneration("1", 2990, 10, 8, mode)]).get("compression_ratio")
        for mode in GENERATION_MODES
    }
    assert ratios == {"gist": 299.0, "truncate": 299.0, "pos_control": 1.0, "neg_control": None}
    assert kept_ratio("truncate", 4, 8) == 1.0


def test_gist_generation_survives_pickling() -> None:
    out = pickle.loads(pickle.dumps(GistGeneration("abc", 12, 4, 100, "pos_control")))
    assert out == "abc" and isinstance(out, GistGeneration)
    assert (out.prompt_tokens, out.num_gist_tokens, out.kv_bytes, out.mode, out.compression_ratio) == (
        12,
        4,
        100,
        "pos_control",
        1.0,
    )


# ----------------------------------------------------------------------------- task data and prompts


def test_prompts_tokenize_like_the_training_data(tiny_model: torch.nn.Module, tiny_tokenizer: Any) -> None:
    lm = TorchtuneGistLM(model=tiny_model, tokenizer=tiny_tokenizer)
    instruct = GistInstructTransform(tiny_tokenizer, num_gist_tokens=K)
    for doc in ({"instruction": "Reverse the word.", "input": "cat"}, {"instruction": "Name a colour.", "input": ""}):
        text = alpaca_plus_doc_to_text(doc)
        assert text.count(GIST_MARKER) == 1
        prompt, continuation = lm.encode_context(text)
        assert (
            prompt + lm.gist_token_ids + continuation
            == instruct.encode_prompt(doc["instruction"], doc["input"])["tokens"]
        )
    assert alpaca_plus_doc_to_text({"instruction": "I", "input": "x"}) == "Instruction: I\n<GIST>\nInput: x\nOutput:"
    assert alpaca_plus_doc_to_text({"instruction": "I", "input": ""}) == "Instruction: I\n<GIST>\nOutput:"

    record = passkey_dataset(passkey_language="en", tokenizer=tiny_tokenizer, **PASSKEY_SETTINGS)["test"][0]
    prompt, continuation = lm.encode_context(passkey_doc_to_text(record))
    expected = GistPasskeyTransform(tiny_tokenizer, num_gist_tokens=K).encode_prompt(
        record["context"], record["question"]
    )
    assert prompt + lm.gist_token_ids + continuation == expected["tokens"]
    assert len(prompt) - 1 == record["context_tokens"]  # BOS excluded


def test_passkey_dataset_settings(tiny_tokenizer: Any) -> None:
    data = passkey_dataset(
        passkey_language="ko",
        tokenizer=tiny_tokenizer,
        num_samples=3,
        context_tokens=[130, 150],
        depths=[0.0, 1.0],
        seed=1,
        num_gist_tokens=5,
        mode="gist",
        batch_size=2,
    )["test"]
    assert len(data) == 3
    assert data["target_context_tokens"] == [130, 150, 130]
    assert data["depth"] == [0.0, 1.0, 0.0]
    assert all("패스키" in c and p in c for c, p in zip(data["context"], data["passkey"]))
    assert all(n <= t for n, t in zip(data["context_tokens"], data["target_context_tokens"]))
    assert data["compression_ratio"] == [n / 5 for n in data["context_tokens"]]
    again = passkey_dataset(
        passkey_language="ko",
        tokenizer=tiny_tokenizer,
        num_samples=3,
        context_tokens=[130, 150],
        depths=[0.0, 1.0],
        seed=1,
    )["test"]
    assert again["context"] == data["context"]


def test_alpaca_plus_dataset_reads_the_split(alpaca_plus_dir: Path) -> None:
    data = alpaca_plus_dataset(alpaca_plus_split="validation_human", data_dir=str(alpaca_plus_dir))["test"]
    records = json.loads((alpaca_plus_dir / "alpaca_plus_validation_human.json").read_text())
    assert len(data) == len(records) and data[0]["instruction"] == records[0]["instruction"]


def test_alpaca_plus_location_from_the_environment(alpaca_plus_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHTUNE_GIST_ALPACA_PLUS", str(alpaca_plus_dir))
    assert len(alpaca_plus_dataset(alpaca_plus_split="validation_seen")["test"]) > 0


def test_shipped_tasks_are_found() -> None:
    tm = gist_task_manager()
    assert {
        "gist_passkey",
        "gist_passkey_ko",
        "alpaca_plus",
        "alpaca_plus_seen",
        "alpaca_plus_unseen",
        "alpaca_plus_human",
    } <= set(tm.all_tasks)
    assert sorted(p.name for p in TASKS_DIR.glob("*.yaml")) == [
        "alpaca_plus.yaml",
        "alpaca_plus_human.yaml",
        "alpaca_plus_seen.yaml",
        "alpaca_plus_unseen.yaml",
        "gist_passkey.yaml",
        "gist_passkey_ko.yaml",
    ]


# ----------------------------------------------------------------------------- the model through the harness


def _reference_outputs(
    model: torch.nn.Module, tokenizer: Any, mode: str, layouts: List[Dict[str, Any]], max_new_tokens: int
) -> List[str]:
    """What the caching helper's ``generate`` gives for token layouts made by the data transforms, one at a time."""
    texts = []
    for layout in layouts:
        cut = layout["gist_start"] + K
        out = generate(
            model,
            [layout["tokens"][:cut]],
            [layout["tokens"][cut:]],
            mode=mode,
            max_new_tokens=max_new_tokens,
            stop_tokens=tokenizer.stop_tokens,
            pad_id=tokenizer.pad_id,
        )
        texts.append(tokenizer.decode([t for t in out.tokens[0] if t not in tokenizer.stop_tokens]))
    return texts


@pytest.mark.parametrize("mode", GENERATION_MODES)
def test_every_task_in_every_mode(
    mode: str, tiny_model: torch.nn.Module, tiny_tokenizer: Any, task_manager: Any
) -> None:
    """All tasks run; metrics are in range; outputs equal the caching helper's ``generate`` (nothing added or
    dropped)."""
    lm = TorchtuneGistLM(model=tiny_model, tokenizer=tiny_tokenizer, mode=mode, batch_size=2)
    out = _evaluate(lm, ALL_TASKS, task_manager, gen_kwargs={"max_gen_toks": 3}, log_samples=True)
    results, samples = out["results"], out["samples"]
    for task in ("gist_passkey", "gist_passkey_ko"):
        r = results[task]
        assert r["sample_len"] == 2
        assert 0.0 <= r["acc,none"] <= 1.0 and "acc_128,none" in r and "acc_160,none" in r
        docs = [s["doc"] for s in samples[task]]
        mean_context = sum(d["context_tokens"] for d in docs) / len(docs)
        if mode == "neg_control":
            assert "compression_ratio,none" not in r
        else:
            assert r["compression_ratio,none"] == pytest.approx(1.0 if mode == "pos_control" else mean_context / K)
        assert r["kv_bytes,none"] > 0
    for split in ("seen", "unseen", "human"):
        r = results[f"alpaca_plus_{split}"]
        assert r["sample_len"] == 2
        assert all(0.0 <= r[f"{m},none"] <= 1.0 for m in ("rouge1", "rouge2", "rougeL"))
    assert {"rouge1,none", "rouge2,none", "rougeL,none"} <= set(results["alpaca_plus"])
    stats = lm.stats
    assert stats["mode"] == mode and stats["generations"] == 10 and stats["num_gist_tokens"] == K

    instruct = GistInstructTransform(tiny_tokenizer, num_gist_tokens=K)
    passkey = GistPasskeyTransform(tiny_tokenizer, num_gist_tokens=K)
    layouts = [instruct.encode_prompt(s["doc"]["instruction"], s["doc"]["input"]) for s in samples["alpaca_plus_seen"]]
    layouts += [passkey.encode_prompt(s["doc"]["context"], s["doc"]["question"]) for s in samples["gist_passkey"]]
    harness = [s["resps"][0][0] for s in samples["alpaca_plus_seen"] + samples["gist_passkey"]]
    assert harness == _reference_outputs(tiny_model, tiny_tokenizer, mode, layouts, max_new_tokens=3)


def test_kv_bytes_follow_the_mode(tiny_model: torch.nn.Module, tiny_tokenizer: Any) -> None:
    context = "Instruction: " + "Count the words in this sentence. " * 4 + "\n<GIST>\nInput: one two\nOutput:"
    request = Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 2}), 0)
    kv = {}
    for mode in GENERATION_MODES:
        out = TorchtuneGistLM(model=tiny_model, tokenizer=tiny_tokenizer, mode=mode).generate_until([request])[0]
        kv[mode] = out.kv_bytes
    prompt_tokens = len(tiny_tokenizer.encode(context.split(GIST_MARKER)[0], add_bos=False, add_eos=False))
    per_slot = 2 * 2 * 2 * (64 // 4) * 4  # keys + values, 2 layers, 2 KV heads, head_dim 16, fp32
    # gist and truncate hold K prompt slots, neg_control none, pos_control the whole prompt (+ BOS) and the gists.
    assert kv["gist"] == kv["truncate"] == kv["neg_control"] + K * per_slot
    assert kv["pos_control"] == kv["gist"] + (prompt_tokens + 1) * per_slot


def test_compile_model_arg_sends_generate_until_steps_through_torch_compile(
    tiny_model: torch.nn.Module, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--model_args compile=True`` (a string from lm-eval's command line) reaches generation; the texts are the
    same (torch.compile is recorded here and the step run eagerly; the compiled step is tested in test_generation)."""
    from torchtune_gist.generation._attention import decode_step_logits

    context = "Instruction: Say the word twice.\n<GIST>\nInput: cat\nOutput:"
    request = Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 3}), 0)
    eager = TorchtuneGistLM(model=tiny_model, tokenizer=tiny_tokenizer).generate_until([request])
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append(fn) or fn)
    lm = TorchtuneGistLM(model=tiny_model, tokenizer=tiny_tokenizer, compile="True")
    assert lm.generate_until([request]) == eager and compiled == [decode_step_logits]
    with pytest.raises(ValueError, match="compile='yes': give True or False"):
        TorchtuneGistLM(model=tiny_model, tokenizer=tiny_tokenizer, compile="yes")


def test_kv_bytes_per_example_do_not_depend_on_the_batch(tiny_model: torch.nn.Module, tiny_tokenizer: Any) -> None:
    """Each example reports its own entries: batched beside longer rows, it holds what it held alone."""
    contexts = [
        "Instruction: " + "Count the words. " * n + "\n<GIST>\nInput: " + "x " * (4 - n) + "\nOutput:"
        for n in range(1, 5)
    ]
    requests = [
        Instance("generate_until", {}, (c, {"until": [], "max_gen_toks": 3}), i) for i, c in enumerate(contexts)
    ]
    for mode in GENERATION_MODES:
        alone = [
            TorchtuneGistLM(model=tiny_model, tokenizer=tiny_tokenizer, mode=mode).generate_until([r])[0]
            for r in requests
        ]
        batched = TorchtuneGistLM(model=tiny_model, tokenizer=tiny_tokenizer, mode=mode, batch_size=4).generate_until(
            requests
        )
        assert batched == alone
        assert [o.kv_bytes for o in batched] == [o.kv_bytes for o in alone], mode


def test_progress_bars_count_the_requests(
    tiny_model: torch.nn.Module, tiny_tokenizer: Any, capsys: pytest.CaptureFixture
) -> None:
    """Generation and scoring show lm-eval's usual progress bars (requests done / all), unless disable_tqdm."""
    lm = TorchtuneGistLM(model=tiny_model, tokenizer=tiny_tokenizer, batch_size=2)
    context = "Instruction: Say hi.\n<GIST>\nOutput:"
    lm.generate_until(
        [Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 2}), i) for i in range(3)]
    )
    lm.loglikelihood([_instance(context, " hi")] * 3)
    err = capsys.readouterr().err
    assert (
        "Running generate_until requests: 100%" in err
        and "Running loglikelihood requests: 100%" in err
        and "3/3" in err
    )
    lm.generate_until(
        [Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 2}), 0)], disable_tqdm=True
    )
    lm.loglikelihood([_instance(context, " hi")], disable_tqdm=True)
    assert "Running" not in capsys.readouterr().err


def _instance(context: str, continuation: str) -> Instance:
    return Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)


@pytest.mark.parametrize("mode", GENERATION_MODES)
def test_loglikelihood_matches_step_by_step_generation(
    mode: str, tiny_model: torch.nn.Module, tiny_tokenizer: Any
) -> None:
    """The full-sequence gist mask scores continuations exactly as the KV-cache path predicts them."""
    lm = TorchtuneGistLM(model=tiny_model, tokenizer=tiny_tokenizer, mode=mode, batch_size=2)
    requests = [
        ("Instruction: Say hi.\n<GIST>\nOutput:", " hi"),
        ("Instruction: Reverse the word.\n<GIST>\nInput: cat\nOutput:", " tac"),
    ]
    scored = lm.loglikelihood([_instance(*r) for r in requests])
    gist = torch.tensor(lm.gist_token_ids)
    for (context, continuation), (logprob, is_greedy) in zip(requests, scored):
        prompt, after = lm.encode_context(context)
        target = tiny_tokenizer.encode(continuation, add_bos=False, add_eos=False)
        total, greedy = 0.0, True
        for j, token in enumerate(target):
            step = generate(
                tiny_model,
                [prompt + lm.gist_token_ids],
                [after + target[:j]],
                mode=mode,
                max_new_tokens=1,
                return_logits=True,
            ).logits[0][0]
            total += float(torch.log_softmax(step.float(), -1)[token])
            greedy &= int(step.index_fill(-1, gist, float("-inf")).argmax()) == token
        assert logprob == pytest.approx(total, abs=1e-4)
        assert is_greedy == greedy


def test_the_mask_reaches_the_model(tiny_model: torch.nn.Module, tiny_tokenizer: Any) -> None:
    """Changing the prompt changes the score with gists or the full prompt, never under the negative control."""
    a = _instance("Instruction: Reverse the word.\n<GIST>\nInput: cat\nOutput:", " tac")
    b = _instance("Instruction: Repeat this word.\n<GIST>\nInput: cat\nOutput:", " tac")  # same length, same last K
    c = _instance("Instruction: Reverse the word!\n<GIST>\nInput: cat\nOutput:", " tac")  # last K tokens differ
    scores = {}
    for mode in GENERATION_MODES:
        lm = TorchtuneGistLM(model=tiny_model, tokenizer=tiny_tokenizer, mode=mode)
        scores[mode] = [lp for lp, _ in lm.loglikelihood([a, b, c])]
    assert scores["neg_control"][0] == pytest.approx(scores["neg_control"][1], abs=1e-5)
    assert scores["neg_control"][0] == pytest.approx(scores["neg_control"][2], abs=1e-5)
    assert scores["truncate"][0] == pytest.approx(scores["truncate"][1], abs=1e-5)
    assert abs(scores["truncate"][0] - scores["truncate"][2]) > 1e-3
    for mode in ("gist", "pos_control"):
        assert abs(scores[mode][0] - scores[mode][1]) > 1e-3
    assert abs(scores["gist"][0] - scores["neg_control"][0]) > 1e-3


def test_until_cuts_the_output(tiny_model: torch.nn.Module, tiny_tokenizer: Any) -> None:
    lm = TorchtuneGistLM(model=tiny_model, tokenizer=tiny_tokenizer)
    context = "Instruction: Say hi.\n<GIST>\nOutput:"
    full = lm.generate_until([Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 8}), 0)])[0]
    assert len(full) > 2
    stop = full[2]
    cut = lm.generate_until([Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 8}), 0)])[0]
    assert cut == full[: full.index(stop)]


# ----------------------------------------------------------------------------- loading from a config and a checkpoint


def _write_checkpoints(
    root: Path, tokenizer_files: Tuple[Path, Path], use_dora: bool = False
) -> Tuple[Path, Path, torch.nn.Module]:
    """A tiny torchtune config, base weights, a gist adapter (K=2, LoRA or DoRA on q/v) and its merged export."""
    torch.manual_seed(1)
    base = llama3_1(**TINY_LLAMA3_1_ARGS)
    atomic_save_safetensors(base.state_dict(), root / "base" / "model.safetensors")
    trained = lora_gist_llama3_1_tiny(lora_attn_modules=["q_proj", "v_proj"], num_gist_tokens=K, use_dora=use_dora)
    load_base_weights(trained, base.state_dict())
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora" in name or "gist" in name:
                p.normal_(0, 0.5)
    save_gist_adapter(trained, root / "epoch_0", base_model="tiny", extra_metadata={"mask_mode": "gist"})
    export_merged_hf(trained, root / "epoch_0" / "hf_merged", mask_mode="gist")
    model_path, special_path = tokenizer_files
    config = f"""
tokenizer:
  _component_: torchtune.models.llama3.llama3_tokenizer
  path: {model_path}
  special_tokens_path: {special_path}
model:
  _component_: torchtune_gist.models.lora_gist_llama3_1_tiny
  lora_attn_modules: [q_proj, v_proj]
  num_gist_tokens: {K}
  use_dora: {use_dora}
checkpointer:
  _component_: torchtune.training.FullModelTorchTuneCheckpointer
  checkpoint_dir: {root / "base"}
  checkpoint_files: [model.safetensors]
  output_dir: {root / "out"}
  model_type: LLAMA3
"""
    (root / "tiny.yaml").write_text(config)
    return root / "tiny.yaml", root / "epoch_0", trained.eval()


@pytest.fixture(scope="module")
def checkpoints(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_files: Tuple[Path, Path]
) -> Tuple[Path, Path, torch.nn.Module]:
    return _write_checkpoints(tmp_path_factory.mktemp("ckpt"), tiny_tokenizer_files)


def test_loads_base_adapter_and_merged_export(
    checkpoints: Tuple[Path, Path, torch.nn.Module], tiny_tokenizer: Any
) -> None:
    config, ckpt, trained = checkpoints
    lm = TorchtuneGistLM(config=str(config), checkpoint_dir=str(ckpt), device="cpu")
    loaded, expected = lm.model.state_dict(), trained.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.items())
    merged = TorchtuneGistLM(config=str(config), checkpoint_dir=str(ckpt / "hf_merged"), device="cpu")
    direct = TorchtuneGistLM(model=trained, tokenizer=tiny_tokenizer)
    requests = [_instance("Instruction: Reverse the word.\n<GIST>\nInput: cat\nOutput:", " tac")]
    ours, theirs = lm.loglikelihood(requests)[0][0], direct.loglikelihood(requests)[0][0]
    assert ours == theirs
    assert merged.loglikelihood(requests)[0][0] == pytest.approx(theirs, abs=1e-4)


def test_responses_log_lets_an_interrupted_evaluation_go_on_where_it_stopped(
    checkpoints: Tuple[Path, Path, torch.nn.Module],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from torchtune_gist.eval import _model

    config, ckpt, trained = checkpoints
    contexts = [
        f"Instruction: Repeat {w} twice.\n<GIST>\nInput: {w}{'!' * i}\nOutput:"
        for i, w in enumerate(["cat", "dog", "sun", "owl", "bee"])
    ]
    generate_requests = [
        Instance("generate_until", {}, (c, {"until": ["\n"], "max_gen_toks": 4}), i) for i, c in enumerate(contexts)
    ]
    score_requests = [_instance(c, " yes") for c in contexts[:3]]
    settings = {"config": str(config), "checkpoint_dir": str(ckpt), "device": "cpu", "batch_size": 2}
    reference = TorchtuneGistLM(**settings)
    expected, expected_scores = reference.generate_until(generate_requests), reference.loglikelihood(score_requests)

    real, batches = _model.generate, []

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        batches.append(len(args[1]))
        if len(batches) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second batch
        return real(*args, **kwargs)

    log_file = tmp_path / "responses.jsonl"
    monkeypatch.setattr(_model, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        TorchtuneGistLM(**settings, responses=str(log_file)).generate_until(generate_requests)
    with open(log_file, "a") as f:
        f.write('{"key": "0123", "resp')  # a line cut short by a kill
    batches.clear()
    monkeypatch.setattr(_model, "generate", lambda *a, **kw: batches.append(len(a[1])) or real(*a, **kw))
    lm = TorchtuneGistLM(**settings, responses=str(log_file))
    assert len(lm.response_log) == 2  # the first batch's
    outputs = lm.generate_until(generate_requests)
    assert sum(batches) == 3  # only the requests not logged are generated
    assert outputs == expected and all(
        (o.prompt_tokens, o.kv_bytes, o.mode) == (e.prompt_tokens, e.kv_bytes, e.mode)
        for o, e in zip(outputs, expected)
    )
    assert lm.loglikelihood(score_requests) == expected_scores

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a logged request was computed again")

    monkeypatch.setattr(_model, "generate", fail)
    monkeypatch.setattr(_model, "score_continuations", fail)
    again = TorchtuneGistLM(**settings, responses=str(log_file))
    assert (
        again.generate_until(generate_requests) == expected and again.loglikelihood(score_requests) == expected_scores
    )

    logged = log_file.read_text()
    with caplog.at_level(logging.WARNING):
        other = TorchtuneGistLM(**{**settings, "mode": "truncate"}, responses=str(log_file))
    previous = log_file.with_name(log_file.name + ".previous")
    assert (
        f"{log_file} holds 8 responses made with other mode: starting over (the old file is now {previous}"
        in caplog.text
        and len(other.response_log) == 0
    )
    assert previous.read_text() == logged  # a setting changed by mistake loses no work
    other.response_log.add("generate_until", ("a request",), "its response")
    TorchtuneGistLM(**{**settings, "mode": "neg_control"}, responses=str(log_file))  # a second change
    assert previous.read_text() == logged and len(Path(f"{previous}.2").read_text().splitlines()) == 1 + 1
    with pytest.raises(ValueError, match="responses= needs config="):
        TorchtuneGistLM(model=trained, tokenizer=reference.tokenizer, responses=str(log_file))


def test_reading_a_checkpoint_in_another_mode_than_it_was_trained_warns(
    checkpoints: Tuple[Path, Path, torch.nn.Module], caplog: pytest.LogCaptureFixture
) -> None:
    """The paper's controls are models trained in their own mode; reading a gist model without its gists is not."""
    config, ckpt, _ = checkpoints
    for directory in (ckpt, ckpt / "hf_merged"):
        for mode, warned in (("gist", False), ("truncate", False), ("pos_control", True), ("neg_control", True)):
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                TorchtuneGistLM(config=str(config), checkpoint_dir=str(directory), mode=mode, device="cpu")
            message = (
                f"mode='{mode}' reads {directory}, trained with mask_mode='gist': an ablation, not the paper's control"
            )
            assert (message in caplog.text) == warned, (directory, mode, caplog.text)


def test_checkpoint_dir_may_name_the_adapter_file(checkpoints: Tuple[Path, Path, torch.nn.Module]) -> None:
    config, ckpt, trained = checkpoints
    lm = TorchtuneGistLM(config=str(config), checkpoint_dir=str(ckpt / ADAPTER_FILE), device="cpu")
    expected = trained.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in lm.model.state_dict().items())


def test_a_merged_export_as_the_base_checkpoint_is_refused(
    checkpoints: Tuple[Path, Path, torch.nn.Module], tmp_path: Path
) -> None:
    """LoRA would apply twice on top of an export that already holds it."""
    config, ckpt, _ = checkpoints
    text = config.read_text().replace(
        f"checkpoint_dir: {config.parent / 'base'}", f"checkpoint_dir: {ckpt / 'hf_merged'}"
    )
    (tmp_path / "on_export.yaml").write_text(text)
    with pytest.raises(ValueError, match="is a torchtune-gist merged export .* not a base model"):
        TorchtuneGistLM(config=str(tmp_path / "on_export.yaml"), checkpoint_dir=str(ckpt), device="cpu")


def _tokenizer_section(tokenizer_files: Tuple[Path, Path]) -> str:
    model_path, special_path = tokenizer_files
    return f"""
tokenizer:
  _component_: torchtune.models.llama3.llama3_tokenizer
  path: {model_path}
  special_tokens_path: {special_path}
"""


def test_merged_export_of_a_tied_model_scores_as_the_trained_model(
    tmp_path: Path, tiny_tokenizer_files: Tuple[Path, Path], tiny_tokenizer: Any
) -> None:
    """The export writes the gist rows into the embedding at the gist ids; the tied head must still use the
    vocabulary rows there, so every logit (the gist ids' included) is the trained model's."""
    arch = {k: v for k, v in TINY_LLAMA3_1_ARGS.items() if k != "attn_dropout"}
    lora = dict(lora_attn_modules=["q_proj", "v_proj"], lora_rank=4, lora_alpha=8.0)
    torch.manual_seed(1)
    trained = lora_gist_llama3_2(**arch, **lora, num_gist_tokens=K).eval()
    assert isinstance(trained.output, TiedLinear)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_b" in name or "gist" in name:
                p.normal_(0, 0.5)
    export_merged_hf(trained, tmp_path / "hf_merged")
    model_section = "\n".join(
        ["model:", "  _component_: torchtune_gist.models.lora_gist_llama3_2", f"  num_gist_tokens: {K}"]
        + [f"  {k}: {v}" for k, v in {**arch, **lora}.items()]
    )
    (tmp_path / "tied.yaml").write_text(model_section + _tokenizer_section(tiny_tokenizer_files))
    merged = TorchtuneGistLM(
        config=str(tmp_path / "tied.yaml"), checkpoint_dir=str(tmp_path / "hf_merged"), device="cpu"
    )
    ids = trained.tok_embeddings.gist_token_ids
    tokens = torch.tensor([[5, 6, 7] + ids + [8, 9]])
    mask = make_gist_mask(tokens, ids)
    with torch.no_grad():
        torch.testing.assert_close(merged.model(tokens, mask=mask), trained(tokens, mask=mask), atol=1e-5, rtol=1e-5)
    requests = [_instance("Instruction: Reverse the word.\n<GIST>\nInput: cat\nOutput:", " tac")]
    expected = TorchtuneGistLM(model=trained, tokenizer=tiny_tokenizer).loglikelihood(requests)[0][0]
    assert merged.loglikelihood(requests)[0][0] == pytest.approx(expected, abs=1e-4)


def test_merged_export_is_refused_by_a_qlora_config(tmp_path: Path, tiny_tokenizer_files: Tuple[Path, Path]) -> None:
    """Loading merged weights into NF4 modules would quantise the fine-tune away: refused, naming both ways out."""
    lora = ["q_proj", "v_proj"]
    export_merged_hf(qlora_gist_llama3_1_tiny(lora, num_gist_tokens=K), tmp_path / "hf_merged")
    model_section = (
        f"model:\n  _component_: torchtune_gist.models.qlora_gist_llama3_1_tiny\n"
        f"  lora_attn_modules: {lora}\n  num_gist_tokens: {K}\n"
    )
    (tmp_path / "qlora.yaml").write_text(model_section + _tokenizer_section(tiny_tokenizer_files))
    with pytest.raises(ValueError, match="quantises its base weights to NF4.*non-quantised model.*adapter directory"):
        TorchtuneGistLM(config=str(tmp_path / "qlora.yaml"), checkpoint_dir=str(tmp_path / "hf_merged"), device="cpu")


def test_a_config_whose_model_section_the_builder_does_not_take_is_refused(
    tmp_path: Path, tiny_tokenizer_files: Tuple[Path, Path]
) -> None:
    section = (
        f"model:\n  _component_: torchtune_gist.models.gist_llama3_1_tiny\n  num_gist_tokens: {K}\n  lora_rank: 8\n"
    )
    (tmp_path / "bad.yaml").write_text(section + _tokenizer_section(tiny_tokenizer_files))
    with pytest.raises(ValueError, match="model: torchtune_gist.models.gist_llama3_1_tiny takes no lora_rank"):
        TorchtuneGistLM(config=str(tmp_path / "bad.yaml"), device="cpu")


def test_dora_loads_from_the_base_the_adapter_and_the_merged_export(
    tmp_path: Path, tiny_tokenizer_files: Tuple[Path, Path], tiny_tokenizer: Any
) -> None:
    """DoRA: base weights alone give magnitude = the base's row norms (the model is the base); the adapter and
    the merged export (DoRA switched off, its magnitude folded into the weights) score as the trained model."""
    from torchtune.modules.peft import DoRALinear

    config, ckpt, trained = _write_checkpoints(tmp_path, tiny_tokenizer_files, use_dora=True)
    base = TorchtuneGistLM(config=str(config), mode="pos_control", device="cpu")
    dora = {n: m for n, m in base.model.named_modules() if isinstance(m, DoRALinear)}
    assert dora
    for m in dora.values():
        torch.testing.assert_close(m.magnitude, m.weight.norm(dim=1))
    requests = [_instance("Instruction: Reverse the word.\n<GIST>\nInput: cat\nOutput:", " tac")]
    expected = TorchtuneGistLM(model=trained, tokenizer=tiny_tokenizer).loglikelihood(requests)[0][0]
    adapter = TorchtuneGistLM(config=str(config), checkpoint_dir=str(ckpt), device="cpu")
    merged = TorchtuneGistLM(config=str(config), checkpoint_dir=str(ckpt / "hf_merged"), device="cpu")
    assert adapter.loglikelihood(requests)[0][0] == expected
    assert merged.loglikelihood(requests)[0][0] == pytest.approx(expected, abs=1e-4)


def test_dtype_defaults_to_the_configs(checkpoints: Tuple[Path, Path, torch.nn.Module], tmp_path: Path) -> None:
    config, ckpt, _ = checkpoints
    bf16 = tmp_path / "bf16.yaml"
    bf16.write_text(config.read_text() + "\ndtype: bf16\n")
    assert next(TorchtuneGistLM(config=str(bf16), checkpoint_dir=str(ckpt)).model.parameters()).dtype == torch.bfloat16
    lm = TorchtuneGistLM(config=str(bf16), checkpoint_dir=str(ckpt), dtype="fp32")
    assert next(lm.model.parameters()).dtype == torch.float32


def test_bad_settings_give_clear_errors(
    checkpoints: Tuple[Path, Path, torch.nn.Module],
    tiny_model: torch.nn.Module,
    tiny_tokenizer: Any,
    task_manager: Any,
    tmp_path: Path,
) -> None:
    config, ckpt, _ = checkpoints
    with pytest.raises(ValueError, match="unknown mode 'gists'"):
        TorchtuneGistLM(model=tiny_model, tokenizer=tiny_tokenizer, mode="gists")
    with pytest.raises(ValueError, match="batch_size=auto is not supported by torchtune_gist"):
        TorchtuneGistLM(model=tiny_model, tokenizer=tiny_tokenizer, batch_size="auto")
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1, got 0"):
        TorchtuneGistLM(model=tiny_model, tokenizer=tiny_tokenizer, batch_size=0)
    with pytest.raises(ValueError, match="needs trained gist rows"):
        TorchtuneGistLM(config=str(config), mode="gist")
    with pytest.raises(ValueError, match="holds no gist rows"):
        TorchtuneGistLM(config=str(config), checkpoint_dir=str(tmp_path), mode="gist")
    no_rows = tmp_path / "no_rows"
    no_rows.mkdir()
    save_file(
        {"layers.0.attn.q_proj.lora_a.weight": torch.zeros(8, 64)},
        str(no_rows / ADAPTER_FILE),
        metadata={
            "format": "torchtune-gist",
            "base_model": "tiny",
            "num_gist_tokens": str(K),
            "gist_token_ids": json.dumps(tiny_model.tok_embeddings.gist_token_ids),
        },
    )
    with pytest.raises(ValueError, match="no gist rows"):
        TorchtuneGistLM(config=str(config), checkpoint_dir=str(no_rows))
    with pytest.raises(FileNotFoundError, match="not found"):
        TorchtuneGistLM(config=str(tmp_path / "missing.yaml"), checkpoint_dir=str(ckpt))
    elsewhere = tmp_path / "elsewhere.yaml"
    OmegaConf.save(OmegaConf.merge(OmegaConf.load(config), {"tokenizer": {"path": "gone/tok.model"}}), elsewhere)
    with pytest.raises(
        FileNotFoundError,
        match=r"(?s)tokenizer.path: gone/tok.model \(relative .*--model_args cannot override a config's keys",
    ):
        TorchtuneGistLM(config=str(elsewhere), checkpoint_dir=str(ckpt))

    lm = TorchtuneGistLM(model=tiny_model, tokenizer=tiny_tokenizer)
    with pytest.raises(ValueError, match="gist marker"):
        lm.generate_until([Instance("generate_until", {}, ("no marker here", {"until": []}), 0)])
    with pytest.raises(ValueError, match="unsupported generation arguments"):
        lm.generate_until([Instance("generate_until", {}, ("a<GIST>b", {"top_p": 0.9}), 0)])
    with pytest.raises(ValueError, match="nothing follows"):
        lm.generate_until([Instance("generate_until", {}, ("a<GIST>", {}), 0)])
    with pytest.raises(
        ValueError,
        match=(
            r"request 0: its context takes \d+ positions with the gists, beyond the model's max_seq_len=2048: "
            r".*context_tokens"
        ),
    ):
        lm.generate_until([Instance("generate_until", {}, ("word " * 2100 + "<GIST> b", {}), 0)])
    for mode in GENERATION_MODES:  # the last gist would score the continuation's first token, reading the prompt
        with pytest.raises(ValueError, match="request 1: nothing follows"):
            TorchtuneGistLM(model=tiny_model, tokenizer=tiny_tokenizer, mode=mode).loglikelihood(
                [_instance("a<GIST> b", " c"), _instance("Instruction: Reverse the word.\n<GIST>", "\nOutput: tac")]
            )
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        lm.loglikelihood_rolling([])

    empty = gist_task_manager(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="alpaca_plus_validation_seen.json not found"):
        _evaluate(lm, ["alpaca_plus_seen"], empty)
    with pytest.raises(ValueError, match="need a tokenizer"):
        _evaluate(lm, ["gist_passkey"], gist_task_manager(num_samples=2))
    misspelt = gist_task_manager(tokenizer=tiny_tokenizer, num_samples=2, contxt_tokens=[96], depth=0.5)
    with pytest.raises(
        ValueError,
        match=r"the gist tasks read no metadata contxt_tokens \(did you mean context_tokens\?\), depth \(did you "
        r"mean depths\?\)",
    ):
        _evaluate(lm, ["gist_passkey"], misspelt)
    with pytest.raises(ValueError, match=r"read no metadata contxt_tokens"):  # the Alpaca+ tasks take the same care
        _evaluate(lm, ["alpaca_plus_seen"], misspelt)


def test_task_metadata_that_other_models_pass_is_not_refused(tiny_tokenizer: Any) -> None:
    """lm-eval hands a builder every ``--model_args`` key too: an hf or vLLM model's must not read as misspelt."""
    other_models_args = {"pretrained": "x", "max_length": 64, "dtype": "bfloat16", "revision": "main", "version": 1.0}
    other_models_args.update({"max_model_len": 64, "tensor_parallel_size": 1, "mode": "gist", "checkpoint_dir": "c"})
    records = passkey_dataset(
        passkey_language="en", tokenizer=tiny_tokenizer, num_samples=1, context_tokens=96, **other_models_args
    )["test"]
    assert records[0]["target_context_tokens"] == 96


def test_the_command_line_refuses_what_the_gist_model_cannot_honour(tmp_path: Path) -> None:
    from argparse import Namespace

    from torchtune_gist.eval.__main__ import default_device, refused_option, run_folder

    assert refused_option(Namespace(num_fewshot=None, limit=None)) == ""
    # --output_path's subfolder per run: lm-eval would draw a random name for a model without pretrained=
    assert (
        run_folder({"mode": "pos_control", "checkpoint_dir": "/ckpt/pos/epoch_2"}) == "pos_control__ckpt__pos__epoch_2"
    )
    assert run_folder("config=c.yaml,mode=neg_control") == "neg_control" and run_folder({"config": "c"}) == "gist"
    # without --device: the config's device, not lm-eval's cuda:0 (a cpu config would run on the GPU unannounced)
    (tmp_path / "on_cpu.yaml").write_text("device: cpu\n")
    (tmp_path / "unset.yaml").write_text("dtype: fp32\n")
    assert default_device(f"config={tmp_path / 'on_cpu.yaml'},mode=gist") == "cpu"
    assert default_device({"config": str(tmp_path / "on_cpu.yaml"), "device": "cuda:1"}) == "cuda:1"
    assert default_device({"config": str(tmp_path / "unset.yaml")}) == "cpu"
    assert refused_option(Namespace(num_fewshot=0, limit=0.5)) == ""
    assert "--num_fewshot 2 is not supported" in refused_option(Namespace(num_fewshot=2, limit=None))
    assert "--apply_chat_template is not supported" in refused_option(Namespace(apply_chat_template=True))
    for limit in (0.0, -3.0):
        assert "leaves no examples" in refused_option(Namespace(limit=limit))
    (tmp_path / "a_file").write_text("")
    for output_path in ("a_file", "a_file/results", "a_file/results.json"):
        assert "a_file" in refused_option(Namespace(output_path=str(tmp_path / output_path)))
    for output_path in ("results", "results.json", "new/results.json"):
        assert refused_option(Namespace(output_path=str(tmp_path / output_path))) == ""
    misspelt = {"config": "c.yaml", "checkpint_dir": "x", "mdoe": "gist"}
    assert refused_option(Namespace(model="torchtune_gist", model_args=misspelt)) == (
        "--model_args checkpint_dir, mdoe: torchtune_gist takes no such argument (it takes config, checkpoint_dir, "
        "mode, batch_size, device, dtype, max_gen_toks, max_batch_size, responses, compile)"
    )
    assert refused_option(Namespace(model="hf", model_args=misspelt)) == ""
    for auto in ("auto", "auto:4"):  # lm-eval would build the model first, then fail inside its constructor
        assert refused_option(Namespace(model="torchtune_gist", batch_size=auto)).startswith(
            f"--batch_size {auto}: batch_size=auto is not supported by torchtune_gist"
        )
    assert "--metadata: the gist tasks read no metadata contxt_tokens (did you mean context_tokens?)" in (
        refused_option(Namespace(metadata={"contxt_tokens": [96], "num_samples": 2}))
    )
    with pytest.raises(ValueError, match="--model_args checkpint_dir, mdoe: torchtune_gist takes no such argument"):
        TorchtuneGistLM.create_from_arg_string("config=c.yaml,checkpint_dir=x,mdoe=gist")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torchtune_gist.eval",
            "run",
            "--model",
            "torchtune_gist",
            "--tasks",
            "gist_passkey",
            "--num_fewshot",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and proc.stderr.strip().endswith(
        "few-shot examples would put one gist marker per example in a context)"
    )


def test_model_args_win_over_lm_evals_own_device_and_batch_size(
    checkpoints: Tuple[Path, Path, torch.nn.Module],
) -> None:
    """lm-eval adds its --device (default cuda:0) and --batch_size to every model's arguments."""
    config, ckpt, _ = checkpoints
    lm_eval_adds = {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"}
    lm = TorchtuneGistLM.create_from_arg_string(
        f"config={config},checkpoint_dir={ckpt},device=cpu,batch_size=3", lm_eval_adds
    )
    assert lm.batch_size == 3 and lm._device == torch.device("cpu")
    lm = TorchtuneGistLM.create_from_arg_obj(
        {"config": str(config), "checkpoint_dir": str(ckpt)}, {**lm_eval_adds, "batch_size": 2}
    )
    assert lm.batch_size == 2
    with pytest.raises(ValueError, match="device='gpu' is not a device: use cpu, cuda or cuda:N"):
        TorchtuneGistLM.create_from_arg_string(f"config={config},checkpoint_dir={ckpt},device=gpu", lm_eval_adds)


# ----------------------------------------------------------------------------- the command line


@pytest.mark.slow
def test_cli_runs_a_task(checkpoints: Tuple[Path, Path, torch.nn.Module], tmp_path: Path) -> None:
    config, ckpt, _ = checkpoints
    out_dir = tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "torchtune_gist.eval",
        "run",
        "--model",
        "torchtune_gist",
        "--model_args",
        f"config={config},checkpoint_dir={ckpt},mode=gist,max_gen_toks=4",
        "--tasks",
        "gist_passkey",
        "--limit",
        "2",
        "--device",
        "cpu",
        "--batch_size",
        "2",
        "--output_path",
        str(out_dir),
        "--log_samples",
        "--metadata",
        json.dumps({"num_samples": 2, "context_tokens": [96], "depths": [0.5]}),
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gist_passkey" in proc.stdout
    files = list(out_dir.rglob("results_*.json"))
    assert len(files) == 1 and files[0].parent.name.startswith("gist__") and files[0].parent.name.endswith(ckpt.name)
    saved = json.loads(files[0].read_text())
    result = saved["results"]["gist_passkey"]
    assert (
        result["sample_len"] == 2 and int(saved["config"]["batch_size"]) == 2
    )  # as README: --batch_size, not in model_args
    assert 0.0 <= result["acc,none"] <= 1.0 and 0.0 <= result["acc_96,none"] <= 1.0
    assert 40 < result["compression_ratio,none"] <= 96 / K
    from torchtune_gist.eval import compare

    report = compare.main([str(out_dir)])
    assert f"| gist_passkey | acc | {result['acc,none']:.4g} [" in report  # from its --log_samples file
    assert "Mu et al." not in report  # the paper's ROUGE-L only beside Alpaca+ scores


def _results_file(path: Path, model_args: Any, scores: Dict[str, float], model: str = "torchtune_gist") -> Path:
    """A results file laid out as lm-eval writes it (``metric,filter`` keys, stderr beside each)."""
    results = {"name": "alpaca_plus_human", "alias": "alpaca_plus_human", "sample_len": 3}
    for metric, value in scores.items():
        results[f"{metric},none"], results[f"{metric}_stderr,none"] = value, 0.01
    record = {
        "results": {"alpaca_plus_human": results},
        "config": {"model": model, "model_args": model_args},
        "higher_is_better": {"alpaca_plus_human": {"rougeL": True, "compression_ratio": True}},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def test_compare_puts_runs_side_by_side_with_the_share_of_the_control_gap(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from torchtune_gist.eval import compare

    _results_file(
        tmp_path / "gist" / "m" / "results_1.json",
        {"mode": "gist", "checkpoint_dir": "g"},
        {"rougeL": 0.4, "compression_ratio": 20.0},
    )
    _results_file(
        tmp_path / "pos" / "results_2.json", {"mode": "pos_control"}, {"rougeL": 0.6, "compression_ratio": 1.0}
    )
    _results_file(tmp_path / "neg" / "results_3.json", {"mode": "neg_control"}, {"rougeL": 0.2})
    _results_file(
        tmp_path / "trunc" / "results_4.json", "config=c.yaml,mode=truncate", {"rougeL": 0.3, "compression_ratio": 20.0}
    )
    report = compare.main(
        [str(tmp_path / d) for d in ("gist", "pos", "neg", "trunc")] + ["--out", str(tmp_path / "cmp")]
    )
    lines = report.splitlines()
    assert (
        lines[0]
        == "| task | metric | gist | pos_control | neg_control | truncate | gap share: gist | gap share: truncate |"
    )
    assert "| alpaca_plus_human | rougeL | 0.4 | 0.6 | 0.2 | 0.3 | 0.5 | 0.25 |" in lines
    assert "| alpaca_plus_human | compression_ratio | 20 | 1 | - | 20 | - | - |" in lines
    assert "| alpaca_plus_human | 14.4 | 23.9 | 27.0 | 0.754 |" in lines  # the paper's LLaMA-7B, for scale
    assert (tmp_path / "cmp" / "comparison.md").read_text() == report
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:4] == b"\x89PNG"

    _results_file(tmp_path / "gist2" / "results_5.json", {"mode": "gist", "checkpoint_dir": "h"}, {"rougeL": 0.5})
    runs = compare.label_runs(
        [compare.load_run(f) for f in compare.results_files([tmp_path / "gist", tmp_path / "gist2"])]
    )
    assert [r.label for r in runs] == ["gist (g)", "gist (h)"]
    assert compare.results_files([tmp_path / "gist", tmp_path / "gist" / "m" / "results_1.json"]) == [
        tmp_path / "gist" / "m" / "results_1.json"
    ]  # one run named twice is one run
    _results_file(tmp_path / "pos2" / "results_7.json", {"mode": "pos_control"}, {"rougeL": 0.5})  # e.g. another task
    report = compare.main([str(tmp_path / d) for d in ("pos", "pos2")] + ["--out", str(tmp_path / "cmp2")])
    assert "| alpaca_plus_human | rougeL | 0.6 | 0.5 |" in report and "| pos_control | pos_control #2 |" in report
    _results_file(tmp_path / "hf" / "results_6.json", {"pretrained": "x"}, {"rougeL": 0.5}, model="hf")
    for bad, message in (
        (tmp_path / "hf", "a run of the model 'hf', not torchtune_gist"),
        (tmp_path / "nowhere", "no lm-eval results file"),
    ):
        with pytest.raises(SystemExit) as e:
            compare.main([str(bad)])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_compare_names_runs_scored_on_other_documents_and_gives_them_no_gap_share(tmp_path: Path) -> None:
    """A gist run of 2 passkey examples at 96 tokens beside controls of 150 at 1,000-3,000 tokens: side by side the
    numbers read as a comparison they are not."""
    from torchtune_gist.eval import compare

    def results(name: str, mode: str, rouge: float, examples: int, metadata: Dict[str, Any]) -> Path:
        path = _results_file(tmp_path / name / "results_1.json", {"mode": mode}, {"rougeL": rouge})
        record = json.loads(path.read_text())
        record["n-samples"] = {"alpaca_plus_human": {"original": 150, "effective": examples}}
        record["configs"] = {"alpaca_plus_human": {"metadata": {"version": 1.0, "mode": mode, **metadata}}}
        path.write_text(json.dumps(record))
        return path

    same = {"num_samples": 150, "context_tokens": [1000, 2000]}
    results("pos", "pos_control", 0.6, 150, same)
    results("neg", "neg_control", 0.2, 150, same)
    results("gist", "gist", 0.4, 150, same)
    results("short", "truncate", 0.5, 2, {"num_samples": 150, "context_tokens": [96]})
    report = compare.main([str(tmp_path / d) for d in ("gist", "pos", "neg", "short")])
    assert "| alpaca_plus_human | rougeL | 0.4 | 0.6 | 0.2 | 0.5 | 0.5 | - |" in report
    assert (
        "**alpaca_plus_human was scored on other documents by some runs** (not comparable; no gap share between "
        "them): examples: gist 150, pos_control 150, neg_control 150, truncate 2; context_tokens: gist [1000, 2000], "
        "pos_control [1000, 2000], neg_control [1000, 2000], truncate [96]"
    ) in report
    report = compare.main([str(tmp_path / d) for d in ("gist", "pos", "neg")])
    assert "other documents" not in report and "| 0.4 | 0.6 | 0.2 | 0.5 |" in report  # the model's args differ: fine


def test_bootstrap_intervals_are_paired_and_as_wide_as_the_sampling_error() -> None:
    from torchtune_gist.eval.bootstrap import gap_share_interval, mean_interval, resampled_means

    coin = [1.0, 0.0] * 200  # mean 0.5 over 400 examples: a 95% half-width of about 1.96 * sqrt(0.25 / 400) = 0.049
    lo, hi = mean_interval(coin)
    assert lo < 0.5 < hi and 0.04 < (hi - lo) / 2 < 0.058
    # each example's run score sits halfway between its controls, examples of very different difficulty: resampled
    # together the share is 0.5 in every resample; resampled apart it would wander with the examples drawn
    pos = [0.1 + 0.8 * ((7 * i) % 50) / 49 for i in range(50)]
    neg = [p - 0.1 for p in pos]
    run = [p - 0.05 for p in pos]
    lo, hi = gap_share_interval(run, pos, neg)
    assert abs(lo - 0.5) < 1e-9 and abs(hi - 0.5) < 1e-9
    assert gap_share_interval(run, pos, pos) is None  # controls tie in every resample
    assert mean_interval([0.5, float("nan"), 1.0]) is None
    assert (resampled_means([pos, neg], iters=300, seed=3) == resampled_means([pos, neg], iters=300, seed=3)).all()
    with pytest.raises(ValueError, match="need the same examples, got 50, 50 and 49 scores"):
        gap_share_interval(run, pos, neg[:-1])


def _samples_file(results_path: Path, task: str, scores: Dict[str, List[float]], first_doc: int = 0) -> None:
    """Per-example scores laid out as lm-eval's --log_samples writes them beside a results file."""
    from torchtune_gist.eval.compare import samples_path

    records = [
        {
            "doc_id": first_doc + i,
            "doc": {"input": "x"},
            "target": "y",
            "filter": "none",
            "metrics": list(scores),
            **{metric: values[i] for metric, values in scores.items()},
        }
        for i in range(len(next(iter(scores.values()))))
    ]
    samples_path(results_path, task).write_text("".join(json.dumps(r) + "\n" for r in records))


def test_compare_gives_paired_bootstrap_intervals_from_per_example_scores(tmp_path: Path) -> None:
    from torchtune_gist.eval import compare

    task = "alpaca_plus_human"
    pos = [0.4 + 0.4 * (i % 5) / 4 for i in range(50)]  # mean 0.6
    per_run = {"gist": [p - 0.2 for p in pos], "pos_control": pos, "neg_control": [p - 0.4 for p in pos]}
    for i, (mode, scores) in enumerate(per_run.items()):
        path = _results_file(tmp_path / mode / f"results_{i}.json", {"mode": mode}, {"rougeL": sum(scores) / 50})
        _samples_file(path, task, {"rougeL": scores})
    path = _results_file(tmp_path / "truncate" / "results_3.json", {"mode": "truncate"}, {"rougeL": 0.3})
    _samples_file(path, task, {"rougeL": [0.3] * 50}, first_doc=1)  # other documents: no paired gap share
    runs = [tmp_path / m for m in (*per_run, "truncate")]

    report = compare.main([str(r) for r in runs] + ["--out", str(tmp_path / "cmp")])
    row = next(line for line in report.splitlines() if line.startswith(f"| {task} | rougeL |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    gist, share, truncate_share = cells[2], cells[6], cells[7]
    lo, hi = (float(x) for x in gist.removeprefix("0.4 [").removesuffix("]").split(", "))
    assert lo < 0.4 < hi and hi - lo > 0.05
    assert share == "0.5 [0.5, 0.5]"  # every example keeps half the gap: paired resamples agree
    assert truncate_share == "-" and cells[5] == "0.3 [0.3, 0.3]"  # scored on other documents than the controls
    assert (
        f"**{task} was scored on other documents by some runs** (not comparable; no gap share between them): "
        "documents: the per-example files of gist, pos_control, neg_control, truncate name other documents"
    ) in report
    assert "95% bootstrap interval" in report and (tmp_path / "cmp" / "comparison.png").is_file()
    assert "[" not in compare.main([str(r) for r in runs] + ["--bootstrap-iters", "0"]).split("\n\n")[0]

    _samples_file(tmp_path / "gist" / "results_0.json", task, {"rougeL": [0.9] * 50})  # not this evaluation's
    report = compare.main([str(r) for r in runs])
    assert (
        f"{tmp_path / 'gist' / ('samples_' + task + '_0.jsonl')}: the mean of rougeL is not the results file's"
        in report
    )
    assert f"| {task} | rougeL | 0.4 | 0.6 [" in report and "| 0.5 | - |" in report

    path = _results_file(tmp_path / "flat" / "results_8.json", {"mode": "gist"}, {"rougeL": 0.7})
    _samples_file(path, task, {"rougeL": [0.7] * 3})  # the resampled means round to just below 0.7
    assert "| 0.7 [0.7, 0.7] |" in compare.main([str(tmp_path / "flat"), "--out", str(tmp_path / "cmp3")])
    assert (tmp_path / "cmp3" / "comparison.png").is_file()  # error bars clamped at 0, not a matplotlib error


def test_eval_recipe_runs_gist_and_controls_by_name_and_resumes(
    checkpoints: Tuple[Path, Path, torch.nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tune run gist_eleuther_eval: each run's results file, then the comparison; a rerun evaluates only the runs
    whose results are missing."""
    import lm_eval
    from gist_eleuther_eval import GistEleutherEvalRecipe

    config, ckpt, _ = checkpoints
    settings = {
        "output_dir": str(tmp_path / "eval"),
        "tasks": ["gist_passkey"],
        "batch_size": 2,
        "max_gen_toks": 4,
        "metadata": {"num_samples": 2, "context_tokens": [96]},
        "device": "cpu",
        "dtype": "fp32",
        "runs": [
            {"mode": "gist", "checkpoint_dir": str(ckpt)},
            {"mode": "pos_control", "checkpoint_dir": str(ckpt)},
            {"mode": "neg_control", "checkpoint_dir": str(ckpt), "name": "no_prompt"},
        ],
    }
    cfg = OmegaConf.merge(OmegaConf.load(config), settings)
    OmegaConf.save(cfg, tmp_path / "eval.yaml")
    cmd = [
        str(Path(sys.executable).parent / "tune"),
        "run",
        "gist_eleuther_eval",
        "--config",
        str(tmp_path / "eval.yaml"),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "eval" / "comparison.md").read_text()
    assert report.splitlines()[0] == "| task | metric | gist | pos_control | no_prompt | gap share: gist |"
    gist_record = json.loads((tmp_path / "eval" / "gist" / "results.json").read_text())
    gist = gist_record["results"]["gist_passkey"]
    documents = gist_record["configs"]["gist_passkey"]["metadata"]  # what compare checks runs share
    assert documents["num_samples"] == 2 and documents["context_tokens"] == [96] and documents["seed"] == 1234
    assert f"| gist_passkey | acc | {gist['acc,none']:.4g} [" in report and report in proc.stdout
    from torchtune_gist.eval import compare

    assert f"| gist_passkey | acc | {gist['acc,none']:.4g} [" in compare.main(
        [str(tmp_path / "eval")]
    )  # its results.json files
    samples = (tmp_path / "eval" / "gist" / "samples_gist_passkey.jsonl").read_text().splitlines()
    assert len(samples) == 2 and set(json.loads(samples[0])) >= {"doc_id", "filtered_resps", "acc"}
    assert (tmp_path / "eval" / "comparison.png").is_file()
    # once: importing torchtune_gist.eval must not give the root logger a handler (rouge-score's absl logging did)
    assert proc.stderr.count(f"gist: mode=gist, checkpoint_dir={ckpt}") == 1
    assert "--metadata" not in proc.stderr  # lm-eval's hint names its command line's flag, not this recipe's config

    (tmp_path / "eval" / "no_prompt" / "results.json").unlink()
    evaluated = []
    real = lm_eval.simple_evaluate
    monkeypatch.setattr(
        lm_eval,
        "simple_evaluate",
        lambda **kw: evaluated.append((kw["model"].mode, kw["model"].response_log.path)) or real(**kw),
    )
    recipe = GistEleutherEvalRecipe(cfg)
    recipe.setup(cfg)
    assert recipe.evaluate() == report and evaluated == [
        ("neg_control", tmp_path / "eval" / "no_prompt" / "responses.jsonl")
    ]
    assert not list((tmp_path / "eval").rglob("responses.jsonl"))  # removed once each run's results were saved

    bad_runs = [
        ([{"mode": "gists"}], "runs\\[0\\]=.* needs a mode"),
        ([{"mode": "gist", "ckpt": "x"}], "runs\\[0\\] has ckpt"),
        ([{"mode": "gist"}], "runs\\[0\\]: mode gist needs a checkpoint_dir"),
        (
            [{"mode": "gist", "checkpoint_dir": "x"}, {"mode": "gist", "checkpoint_dir": "y"}],
            "runs share the names gist",
        ),
    ]
    for runs, message in bad_runs:
        with pytest.raises(ValueError, match=message):
            GistEleutherEvalRecipe(OmegaConf.merge(cfg, {"runs": runs}))
    with pytest.raises(ValueError, match="limit=0 must be a count >= 1, a fraction in"):
        GistEleutherEvalRecipe(OmegaConf.merge(cfg, {"limit": 0}))
    with pytest.raises(ValueError, match="compile='yes': give True or False"):
        GistEleutherEvalRecipe(OmegaConf.merge(cfg, {"compile": "yes"}))
    with pytest.raises(ValueError, match=r"gist_eleuther_eval does not read max_gen_token \(did you mean max_gen_toks"):
        GistEleutherEvalRecipe(OmegaConf.merge(cfg, {"max_gen_token": 5}))
    with pytest.raises(
        ValueError,
        match=r"tasks: gist_pasky \(did you mean gist_passkey\?\), rouge is not a task this recipe evaluates; it "
        r"evaluates alpaca_plus, alpaca_plus_human,",
    ):
        GistEleutherEvalRecipe(OmegaConf.merge(cfg, {"tasks": ["gist_pasky", "rouge", "gist_passkey"]}))
    with pytest.raises(ValueError, match=r"tasks: no task this recipe evaluates"):
        GistEleutherEvalRecipe(OmegaConf.merge(cfg, {"tasks": []}))
    with pytest.raises(ValueError, match=r"read no metadata contxt_tokens \(did you mean context_tokens"):
        GistEleutherEvalRecipe(OmegaConf.merge(cfg, {"metadata": {"contxt_tokens": [96]}}))
    # results of other settings: every stale run named at once, with what changed, before any model loads
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kw: pytest.fail("evaluated before the check"))
    changed = OmegaConf.merge(cfg, {"limit": 1, "metadata": {"num_samples": 3}})
    with pytest.raises(ValueError) as e:
        GistEleutherEvalRecipe(changed).setup(changed)
    assert str(e.value).splitlines()[1:] == [
        f"  {tmp_path / 'eval' / name / 'results.json'}: limit: null -> 1; metadata.num_samples: 2 -> 3"
        for name in ("gist", "pos_control", "no_prompt")
    ]
    changed = OmegaConf.merge(cfg, {"max_gen_toks": 5, "dtype": "bf16"})  # what the answers depend on, beyond the runs
    with pytest.raises(ValueError, match=r"gist/results.json: dtype: \"fp32\" -> \"bf16\"; max_gen_toks: 4 -> 5\n"):
        GistEleutherEvalRecipe(changed).setup(changed)


def test_alpaca_plus_offline_names_the_data_dir_settings() -> None:
    with pytest.raises(
        FileNotFoundError, match=r"cannot read Alpaca\+ .*--metadata data_dir=DIR.*TORCHTUNE_GIST_ALPACA_PLUS"
    ):
        alpaca_plus_dataset(alpaca_plus_split="validation_seen", data_dir="http://127.0.0.1:9/alpaca_plus")


def test_max_batch_size_is_a_clear_error(tiny_model: torch.nn.Module, tiny_tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="batch_size=auto, which torchtune_gist does not support"):
        TorchtuneGistLM(model=tiny_model, tokenizer=tiny_tokenizer, max_batch_size=8)


def test_a_users_generate_until_task_scores_gist_generations_with_lm_evals_own_metric(tmp_path):
    """lm-eval casts the target to the result's type (``type(result)(target)``) before ``exact_match``: a
    ``GistGeneration`` must be buildable from text alone (the cast raised a TypeError after every answer)."""
    from lm_eval.tasks import TaskManager

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"q": "Say yes.", "a": "yes"}) + "\n")
    (tmp_path / "mygen.yaml").write_text(
        "task: mygen\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        'test_split: test\noutput_type: generate_until\ndoc_to_text: "{{q}}\\n<GIST>\\nAnswer:"\n'
        'doc_to_target: "{{a}}"\nmetric_list:\n  - metric: exact_match\n'
    )
    task = lm_eval.tasks.get_task_dict(["mygen"], TaskManager(include_path=str(tmp_path)))["mygen"]
    doc = next(iter(task.test_docs()))
    assert task.process_results(doc, [GistGeneration("yes", 2, 1, 96)]) == {"exact_match": 1.0}
    assert task.process_results(doc, [GistGeneration("no", 2, 1, 96)]) == {"exact_match": 0.0}
    assert GistGeneration("yes").prompt_tokens is None
