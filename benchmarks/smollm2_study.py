"""A small real quality study of gist compression on SmolLM2-135M-Instruct, on a CPU.

Two parts, each a few LoRA-gist trainings (``tune run gist_lora_single_device``) and lm-eval evaluations
(``torchtune_gist.eval``) with greedy decoding::

    python benchmarks/smollm2_study.py                    # everything, then the report
    python benchmarks/smollm2_study.py --parts alpaca     # one part
    python benchmarks/smollm2_study.py --report-only      # tables and plots from what exists

1. ``alpaca``: instruction compression. Train on Alpaca+ ``validation_seen`` (1000 records), evaluate
   ROUGE on the first ``--unseen-limit`` / ``--human-limit`` records of ``validation_unseen`` and
   ``validation_human`` (instructions never seen in training). Models, each trained one epoch with the
   same recipe and evaluated in its own mode: gist-1 (``mask_mode=gist``), the positive control
   (``pos_control``: the full prompt stays visible) and the negative control (``neg_control``: no prompt).
   With ``--extras``: gist-2, gist-5, gist-1 trained three epochs, and the untrained base with the full prompt.
2. ``passkey``: compress a haystack of 64, 128 or 256 tokens into K=8 gist tokens (8x, 16x, 32x),
   then answer "What is the pass key?". Exact-match accuracy per length and depth of the gist model
   with compression, with no context (negative control), with only the context's last K tokens
   (``truncate``) and with the full context; the positive control (trained and evaluated with the full
   context); the untrained base with the full context. With ``--extras``, the long-context curriculum:
   the gist model trained 50 more steps on 1,024-token haystacks from its adapter (``initial_adapter``),
   evaluated on ``--long-samples`` 1,024-token haystacks (128x) beside the same model before those steps,
   the controls and truncation; and gist models with K = 1, 2 and 4, trained alike (``smollm2_passkey_k.png``).

Each part takes about 16 minutes alone on a 2-core Xeon with both threads (``--threads``, default every
core; ``benchmarks/smollm2_study.md`` has the measured costs, and 53-54 minutes on a slower 2-core EPYC
before the loss and decoding speed-ups); two parts can also run side by side with ``--threads 1`` each,
at about twice the time.

Every stage is skipped when its output exists (trainings: the last epoch's ``gist_adapter.safetensors``;
evaluations: ``eval/<model>_<mode>.json``, redone when its sample sizes differ from the command
line's), so an interrupted study resumes where it stopped; a
training that stopped midway resumes from its last ``step_N`` checkpoint when it has one.
Outputs go under ``--out`` (default ``outputs/smollm2``); plots to ``benchmarks/smollm2_*.png`` for the default
``--out``, else beside the outputs (``--plots-dir`` to choose).
Trainings run as ``tune run`` subprocesses.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"
DEFAULT_OUT = "outputs/smollm2"
ALPACA_CONFIG = "configs/smollm2/gist_lora_alpaca.yaml"
PASSKEY_CONFIG = "configs/smollm2/gist_lora_passkey.yaml"
ADAPTER = "gist_adapter.safetensors"
BASE = "base"
ALPACA_TASKS = ("alpaca_plus_unseen", "alpaca_plus_human")
LONG_CONTEXT = 1024  # haystack tokens of the passkey part's long-context stages
LONG_EVAL_CONTEXTS = (1024, 2048, 4096)  # haystacks the long-context model is read at (128x, 256x, 512x at K=8)
PASSKEY_K_SWEEP = (1, 2, 4)  # gist models trained beside gist-8 (extras): how few gists still hold the passkey


@dataclass(frozen=True)
class Training:
    """One ``tune run gist_lora_single_device`` training.

    Args:
        name (str): folder name under the part's output folder.
        config (str): the torchtune config.
        overrides (Dict[str, Any]): ``key=value`` overrides (``num_gist_tokens``, ``mask_mode``, ...).
        extra (bool): run only with ``--extras`` (or when named by ``--only``).
        start_from (Optional[str]): another training of the part whose final adapter this one starts from
            (the recipe's ``initial_adapter``: its weights, a fresh optimizer and schedule).
    """

    name: str
    config: str
    overrides: Dict[str, Any] = field(default_factory=dict)
    extra: bool = False
    start_from: Optional[str] = None

    def final_dir(self, run_dir: Path) -> Path:
        """The last epoch's checkpoint folder under ``run_dir`` (``epochs`` from the overrides or the config)."""
        from omegaconf import OmegaConf

        epochs = self.overrides.get("epochs", OmegaConf.load(ROOT / self.config).epochs)
        return run_dir / f"epoch_{int(epochs) - 1}"


@dataclass(frozen=True)
class Evaluation:
    """One lm-eval evaluation of a model (a training's ``name``, or :data:`BASE`) in a generation mode
    (``extra``: run only with ``--extras`` or when named by ``--only``; ``context``: passkey haystacks of that
    many tokens, ``--long-samples`` of them, instead of ``--passkey-context-tokens``)."""

    model: str
    mode: str
    extra: bool = False
    context: Optional[int] = None

    @property
    def name(self) -> str:
        return f"{self.model}_{self.mode}" + (f"_{self.context}" if self.context else "")


@dataclass(frozen=True)
class Part:
    """A part of the study: its trainings and evaluations."""

    name: str
    config: str
    trainings: Tuple[Training, ...]
    evaluations: Tuple[Evaluation, ...]


PARTS = {
    "alpaca": Part(
        "alpaca",
        ALPACA_CONFIG,
        (
            Training("gist1", ALPACA_CONFIG, {"num_gist_tokens": 1, "mask_mode": "gist"}),
            Training("pos1", ALPACA_CONFIG, {"num_gist_tokens": 1, "mask_mode": "pos_control"}),
            Training("neg1", ALPACA_CONFIG, {"num_gist_tokens": 1, "mask_mode": "neg_control"}),
            Training("gist2", ALPACA_CONFIG, {"num_gist_tokens": 2, "mask_mode": "gist"}, extra=True),
            Training("gist5", ALPACA_CONFIG, {"num_gist_tokens": 5, "mask_mode": "gist"}, extra=True),
            Training("gist1_3ep", ALPACA_CONFIG, {"num_gist_tokens": 1, "mask_mode": "gist", "epochs": 3}, extra=True),
        ),
        (
            Evaluation("gist1", "gist"),
            Evaluation("pos1", "pos_control"),
            Evaluation("neg1", "neg_control"),
            Evaluation(BASE, "pos_control", extra=True),
            Evaluation("gist2", "gist", extra=True),
            Evaluation("gist5", "gist", extra=True),
            Evaluation("gist1_3ep", "gist", extra=True),
        ),
    ),
    "passkey": Part(
        "passkey",
        PASSKEY_CONFIG,
        (
            Training("gist8", PASSKEY_CONFIG, {"num_gist_tokens": 8, "mask_mode": "gist"}),
            # The positive control reads the passkey straight from the context: its loss is below 0.05 from
            # step 8, so 60 steps (240 examples, the same warmup and cosine decay) stand for the gist model's 300.
            Training(
                "pos8", PASSKEY_CONFIG, {"num_gist_tokens": 8, "mask_mode": "pos_control", "dataset.num_samples": 240}
            ),
            # The long-context curriculum (extra): gist8's adapter, then 50 steps on 1,024-token haystacks (128x).
            Training(
                "gist8_long",
                PASSKEY_CONFIG,
                {
                    "num_gist_tokens": 8,
                    "mask_mode": "gist",
                    "context_tokens": [LONG_CONTEXT],
                    "dataset.num_samples": 200,
                    "optimizer.lr": 1e-3,
                },
                extra=True,
                start_from="gist8",
            ),
            *(
                Training(f"gist{k}", PASSKEY_CONFIG, {"num_gist_tokens": k, "mask_mode": "gist"}, extra=True)
                for k in PASSKEY_K_SWEEP
            ),
        ),
        (
            Evaluation("gist8", "gist"),
            Evaluation("gist8", "pos_control"),
            Evaluation("gist8", "neg_control"),
            Evaluation("gist8", "truncate"),
            Evaluation("pos8", "pos_control"),
            Evaluation(BASE, "pos_control"),
            Evaluation("gist8", "gist", extra=True, context=LONG_CONTEXT),
            *(
                Evaluation("gist8_long", mode, extra=True, context=n)
                for n in LONG_EVAL_CONTEXTS
                for mode in ("gist", "neg_control", "truncate")
            ),
            Evaluation("pos8", "pos_control", extra=True, context=LONG_CONTEXT),
            Evaluation("pos8", "pos_control", extra=True, context=LONG_EVAL_CONTEXTS[-1]),
            *(Evaluation(f"gist{k}", "gist", extra=True) for k in PASSKEY_K_SWEEP),
        ),
    ),
}


def _atomic_json(obj: Any, path: Path) -> None:
    from torchtune_gist._io import atomic_write_json

    atomic_write_json(obj, path)


# ------------------------------------------------------------------------------------ training


def train(
    part: Part,
    training: Training,
    out_dir: Path,
    threads: int,
    dtype: str = "fp32",
    seed: Optional[int] = None,
    data_dir: Optional[Path] = None,
) -> Path:
    """Run one training unless its final adapter exists; resume from a ``step_N`` checkpoint if any.
    ``seed``, when given, replaces the config's training seed and its generated data's seed (``dataset.seed``);
    ``data_dir``, the config's Alpaca+ folder (where it reads one).

    The log (``train.log``) gets ``start <unix time>`` / ``end <unix time> rc <code> cpu <seconds>``
    lines around the recipe's output (cpu: the subprocess's user + system time); each (re)start appends.

    Returns:
        Path: the run's output folder.

    Raises:
        RuntimeError: if the recipe fails (see ``train.log``).
    """
    from omegaconf import OmegaConf

    from torchtune_gist.training import latest_checkpoint, wait_for_recipe

    run_dir = out_dir / training.name
    if (training.final_dir(run_dir) / ADAPTER).is_file():
        print(f"[skip] training {run_dir} (done)")
        return run_dir
    overrides = {"output_dir": str(run_dir), "dtype": dtype, **training.overrides}
    config = OmegaConf.load(ROOT / training.config)
    if seed is not None:
        overrides["seed"] = seed
        if OmegaConf.select(config, "dataset.seed") is not None:
            overrides["dataset.seed"] = seed
    if data_dir is not None and "data_dir" in config:
        overrides["data_dir"] = str(data_dir)
    if training.start_from is not None:
        start = next(t for t in part.trainings if t.name == training.start_from)
        initial = start.final_dir(out_dir / start.name) / ADAPTER
        if not initial.is_file():
            raise RuntimeError(
                f"training {training.name} starts from {training.start_from}, which has not run: {initial} is missing"
            )
        overrides["initial_adapter"] = str(initial)
    run_dir.mkdir(parents=True, exist_ok=True)
    if latest_checkpoint(run_dir) is not None:
        overrides["resume_from_checkpoint"] = True
    cmd = [sys.executable, "-m", "torchtune._cli.tune", "run", "gist_lora_single_device", "--config", training.config]
    cmd += [f"{k}={v}" for k, v in overrides.items()]
    print(f"[run] {' '.join(cmd)}  (log: {run_dir / 'train.log'})", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(run_dir / "train.log", "a") as log:
        log.write(f"start {time.time():.0f}\n")
        log.flush()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        rc = wait_for_recipe(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        log.write(f"end {time.time():.0f} rc {rc} cpu {cpu:.0f}\n")
    if rc != 0 or not (training.final_dir(run_dir) / ADAPTER).is_file():
        raise RuntimeError(f"training {training.name} failed (exit code {rc}); see {run_dir / 'train.log'}")
    return run_dir


def train_seconds(run_dir: Path) -> Tuple[Optional[float], Optional[float]]:
    """Wall-clock and CPU seconds of the training's (re)starts that ended, from the ``start`` / ``end``
    lines (CPU ``None`` when a line lacks it)."""
    wall, cpu, start = 0.0, 0.0, None
    log = run_dir / "train.log"
    if not log.is_file():
        return None, None
    for line in log.read_text(errors="replace").splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "start" and words[1].isdigit():
            start = float(words[1])
        elif len(words) >= 2 and words[0] == "end" and words[1].isdigit() and start is not None:
            wall, start = wall + float(words[1]) - start, None
            cpu = cpu + float(words[5]) if cpu is not None and len(words) >= 6 and words[4] == "cpu" else None
    return wall or None, cpu or None


def loss_history(final_dir: Path) -> List[Tuple[int, float]]:
    """``(step, training loss)`` of a finished run, from its final recipe state (survives resumes)."""
    from safetensors import safe_open

    with safe_open(str(final_dir / "recipe_state.safetensors"), framework="pt") as f:
        progress = json.loads((f.metadata() or {})["progress"])
    return [(int(s), float(v)) for s, v in progress["loss_history"]]


# ---------------------------------------------------------------------------------- evaluation


def _samples(result: Dict[str, Any], task: str, metrics: Sequence[str]) -> List[Dict[str, Any]]:
    rows = []
    for s in result["samples"][task]:
        resp = s["filtered_resps"][0]
        rows.append(
            {
                "doc_id": s["doc_id"],
                "prediction": str(resp),
                "target": s["target"],
                "prompt_tokens": getattr(resp, "prompt_tokens", None),
                **{m: s[m] for m in metrics if m in s},
            }
        )
    return sorted(rows, key=lambda r: r["doc_id"])


def evaluate(part: Part, evaluation: Evaluation, out_dir: Path, args: argparse.Namespace) -> Path:
    """Run one evaluation unless its JSON exists; write metrics, per-example outputs and timings.

    Returns:
        Path: ``<out_dir>/eval/<model>_<mode>.json``.
    """
    import lm_eval
    import torch

    from torchtune_gist.eval import TorchtuneGistLM, gist_task_manager

    path = out_dir / "eval" / f"{evaluation.name}.json"
    limits = _limits(part, evaluation, args)
    training = next((t for t in part.trainings if t.name == evaluation.model), part.trainings[0])
    checkpoint = None if evaluation.model == BASE else str(training.final_dir(out_dir / evaluation.model))
    settings = {"limits": limits, "max_gen_toks": args.max_gen_toks, "dtype": args.dtype}
    if part.name == "alpaca":
        settings["data_dir"] = str(args.data_dir)
    if _reusable(path, settings, checkpoint):
        print(f"[skip] evaluation {path} (done)")
        return path
    torch.set_num_threads(args.threads)
    overrides = training.overrides
    config = _config_with(part.config, {"num_gist_tokens": overrides["num_gist_tokens"]}, out_dir)
    start = time.perf_counter()
    lm = TorchtuneGistLM(
        config=str(config),
        checkpoint_dir=checkpoint,
        mode=evaluation.mode,
        batch_size=_eval_batch_size(evaluation, args),
        max_gen_toks=args.max_gen_toks,
        dtype=args.dtype,
    )
    record: Dict[str, Any] = {
        "model": evaluation.model,
        "mode": evaluation.mode,
        "checkpoint": checkpoint,
        "num_gist_tokens": lm.num_gist_tokens,
        **settings,
        "tasks": {},
    }
    if part.name == "alpaca":
        tm = gist_task_manager(data_dir=args.data_dir)
        for task in ALPACA_TASKS:
            t0 = time.perf_counter()
            result = lm_eval.simple_evaluate(
                model=lm, tasks=[task], task_manager=tm, limit=limits[task], log_samples=True
            )
            record["tasks"][task] = {
                "metrics": _metrics(result["results"][task]),
                "samples": _samples(result, task, ("rouge1", "rouge2", "rougeL")),
                "seconds": time.perf_counter() - t0,
            }
    else:
        tm = gist_task_manager(
            tokenizer=lm.tokenizer,
            context_tokens=limits["context_tokens"],
            depths=[0.0, 0.25, 0.5, 0.75, 1.0],
            num_samples=limits["gist_passkey"],
            passkey_digits=5,
            seed=args.passkey_eval_seed,
            num_gist_tokens=lm.num_gist_tokens,
        )
        t0 = time.perf_counter()
        result = lm_eval.simple_evaluate(model=lm, tasks=["gist_passkey"], task_manager=tm, log_samples=True)
        samples = _samples(result, "gist_passkey", ("acc",))
        depth = {int(s["doc_id"]): s["doc"]["depth"] for s in result["samples"]["gist_passkey"]}
        length = {int(s["doc_id"]): s["doc"]["target_context_tokens"] for s in result["samples"]["gist_passkey"]}
        for s in samples:
            s["depth"], s["target_context_tokens"] = depth[int(s["doc_id"])], length[int(s["doc_id"])]
        record["tasks"]["gist_passkey"] = {
            "metrics": _metrics(result["results"]["gist_passkey"]),
            "samples": samples,
            "seconds": time.perf_counter() - t0,
        }
    record["stats"] = lm.stats
    record["seconds"] = time.perf_counter() - start
    _atomic_json(record, path)
    print(f"[done] {path} in {record['seconds']:.0f} s", flush=True)
    return path


def _reusable(path: Path, settings: Mapping[str, Any], checkpoint: Optional[str]) -> bool:
    """Whether the saved evaluation at ``path`` answers this one: the same samples, generation settings and
    data, written after the checkpoint it read (a retrained model is evaluated again)."""
    if not path.is_file():
        return False
    record = json.loads(path.read_text())
    if any(record.get(key) != value for key, value in settings.items()):
        return False
    adapter = Path(checkpoint) / ADAPTER if checkpoint is not None else None
    return adapter is None or not adapter.is_file() or path.stat().st_mtime >= adapter.stat().st_mtime


def _eval_batch_size(evaluation: Evaluation, args: argparse.Namespace) -> int:
    """``--eval-batch-size``, scaled down past 1,024-token haystacks to keep the tokens of a batch (and its memory)."""
    return max(1, args.eval_batch_size * 1024 // max(evaluation.context or 0, 1024))


def _limits(part: Part, evaluation: Evaluation, args: argparse.Namespace) -> Dict[str, Any]:
    """The sample sizes an evaluation uses (what decides whether a saved one is reused)."""
    if part.name == "alpaca":
        return {"alpaca_plus_unseen": args.unseen_limit, "alpaca_plus_human": args.human_limit}
    if evaluation.context:
        return {
            "gist_passkey": args.long_samples,
            "context_tokens": [evaluation.context],
            "seed": args.passkey_eval_seed,
        }
    return {
        "gist_passkey": args.passkey_samples,
        "context_tokens": list(args.passkey_context_tokens),
        "seed": args.passkey_eval_seed,
    }


def _metrics(results: Mapping[str, Any]) -> Dict[str, float]:
    return {k.split(",")[0]: float(v) for k, v in results.items() if "," in k and isinstance(v, (int, float))}


def _config_with(config: str, values: Mapping[str, Any], out_dir: Path) -> Path:
    """A copy of ``config`` with top-level ``values`` set (what a ``key=value`` override does)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / config)
    for k, v in values.items():
        cfg[k] = v
    path = out_dir / "configs" / f"{Path(config).stem}_k{values['num_gist_tokens']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    from torchtune_gist._io import atomic_write_text

    atomic_write_text(OmegaConf.to_yaml(cfg), path)
    return path


# -------------------------------------------------------------------------------------- report


def _load(out_dir: Path, name: str) -> Optional[Dict[str, Any]]:
    path = out_dir / "eval" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def gap_share(gist: Sequence[float], pos: Sequence[float], neg: Sequence[float]) -> Dict[str, float]:
    """``(gist - neg) / (pos - neg)`` of per-example scores (same examples), with a paired 95% bootstrap interval."""
    from torchtune_gist.eval import compare
    from torchtune_gist.eval.bootstrap import gap_share_interval

    share = compare.gap_share(*(sum(x) / len(x) for x in (gist, pos, neg)))
    lo, hi = gap_share_interval(gist, pos, neg) or (float("nan"),) * 2
    return {"share": float("nan") if share is None else share, "lo": lo, "hi": hi}


def _ratio(value: Optional[float]) -> str:
    """A compression ratio for a table: ``-`` where the mode keeps nothing of the prompt (``neg_control``)."""
    return "-" if value is None else f"{value:.1f}x"


def alpaca_report(out_dir: Path, args: argparse.Namespace) -> Dict[str, Any]:
    """Tables (printed as Markdown) and numbers of the Alpaca+ part."""
    from torchtune_gist.eval.compare import PAPER_LLAMA_7B_ROUGE_L
    from torchtune_gist.eval.compare import gap_share as share_of_gap

    rows = [
        ("neg1_neg_control", "negative control (trained, no prompt)"),
        ("gist1_gist", "gist-1 (trained, prompt compressed)"),
        ("gist2_gist", "gist-2 (trained, prompt compressed)"),
        ("gist5_gist", "gist-5 (trained, prompt compressed)"),
        ("gist1_3ep_gist", "gist-1, 3 epochs (trained 3x longer than the rest)"),
        ("pos1_pos_control", "positive control (trained, full prompt)"),
        ("base_pos_control", "base, untrained, full prompt"),
    ]
    summary: Dict[str, Any] = {"rows": {}}
    print(
        "\n| model | split | ROUGE-1 | ROUGE-2 | ROUGE-L | compression (prompt tok / tok kept) | KV MB/example | "
        "eval s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, label in rows:
        rec = _load(out_dir, name)
        if rec is None:
            continue
        summary["rows"][name] = {}
        for task in ALPACA_TASKS:
            t = rec["tasks"][task]
            m = t["metrics"]
            summary["rows"][name][task] = m
            print(
                f"| {label} | {task.split('_')[-1]} (n={len(t['samples'])}) | {100 * m['rouge1']:.1f} | "
                f"{100 * m['rouge2']:.1f} | {100 * m['rougeL']:.1f} ± {100 * m['rougeL_stderr']:.1f} | "
                f"{_ratio(m.get('compression_ratio'))} | {m.get('kv_bytes', float('nan')) / 1e6:.2f} | "
                f"{t['seconds']:.0f} |"
            )
    p, q = (_load(out_dir, n) for n in ("pos1_pos_control", "neg1_neg_control"))
    gists = [
        (n, g) for n in ("gist1_gist", "gist2_gist", "gist5_gist", "gist1_3ep_gist") for g in [_load(out_dir, n)] if g
    ]
    if p and q and gists:
        print(
            "\n| gist model | split | neg | gist | pos | share of the control gap kept (95% bootstrap) | LLaMA-7B "
            "gist-1 (paper) |"
        )
        print("|---|---|---|---|---|---|---|")
        summary["share"] = {}
        for name, g in gists:
            for task in ALPACA_TASKS:
                split = task.split("_")[-1]
                per = [[s["rougeL"] for s in r["tasks"][task]["samples"]] for r in (g, p, q)]
                sh = gap_share(*per)
                summary["share"].setdefault(name, {})[task] = sh
                paper = PAPER_LLAMA_7B_ROUGE_L
                paper_share = share_of_gap(
                    paper["gist1"][split], paper["pos_control"][split], paper["neg_control"][split]
                )
                print(
                    f"| {name.removesuffix('_gist')} | {split} | {100 * sum(per[2]) / len(per[2]):.1f} | "
                    f"{100 * sum(per[0]) / len(per[0]):.1f} | {100 * sum(per[1]) / len(per[1]):.1f} | "
                    f"{100 * sh['share']:.0f}% [{100 * sh['lo']:.0f}%, {100 * sh['hi']:.0f}%] | "
                    f"{100 * paper_share:.0f}% ({paper['neg_control'][split]} / {paper['gist1'][split]} / "
                    f"{paper['pos_control'][split]}) |"
                )
    return summary


def passkey_report(out_dir: Path, args: argparse.Namespace) -> Dict[str, Any]:
    """Tables (printed as Markdown) and numbers of the passkey part: accuracy per haystack length and per depth."""
    rows = [
        ("gist8_neg_control", "negative control: no context"),
        ("gist8_truncate", "truncate: the context's last K tokens"),
        ("gist8_gist", "gist-8: context compressed into 8 gists"),
        *(
            (f"gist{k}_gist", f"gist-{k}: context compressed into {k} gist{'s' * (k > 1)} ({64 // k}x-{256 // k}x)")
            for k in PASSKEY_K_SWEEP
        ),
        ("gist8_pos_control", "full context, gist-trained model"),
        ("pos8_pos_control", "positive control: full context, trained with it"),
        ("base_pos_control", "base, untrained, full context"),
        (f"gist8_gist_{LONG_CONTEXT}", "gist-8 (trained on 64-256 tokens) compressing longer haystacks"),
        *(
            (f"gist8_long_{mode}_{n}", f"gist-8 after the long-context curriculum, {label}, {n} tokens")
            for n in LONG_EVAL_CONTEXTS
            for mode, label in (
                ("gist", "compressed into 8 gists"),
                ("neg_control", "no context"),
                ("truncate", "the context's last K tokens"),
            )
        ),
        *(
            (f"pos8_pos_control_{n}", f"positive control (trained on 64-256 tokens), full context, {n} tokens")
            for n in (LONG_CONTEXT, LONG_EVAL_CONTEXTS[-1])
        ),
    ]
    summary: Dict[str, Any] = {"rows": {}}
    depths = (0.0, 0.25, 0.5, 0.75, 1.0)
    recs = {name: _load(out_dir, name) for name, _ in rows}
    if not any(recs.values()):
        return summary
    lengths = sorted(
        {s["target_context_tokens"] for r in recs.values() if r for s in r["tasks"]["gist_passkey"]["samples"]}
    )
    k = next((r["num_gist_tokens"] for r in recs.values() if r), 1)

    def acc(samples: List[Dict[str, Any]]) -> Optional[float]:
        return sum(s["acc"] for s in samples) / len(samples) if samples else None

    def pct(x: Optional[float]) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    print(
        "\n| mode | all | "
        + " | ".join(f"{n} tok ({n / k:.0f}x)" for n in lengths)
        + " | "
        + " | ".join(f"depth {d}" for d in depths)
        + " | KV MB/example | eval s |"
    )
    print("|---|---|" + "---|" * (len(lengths) + len(depths)) + "---|---|")
    for name, label in rows:
        rec = recs[name]
        if rec is None:
            continue
        t = rec["tasks"]["gist_passkey"]
        samples = t["samples"]
        by_len = {n: acc([s for s in samples if s["target_context_tokens"] == n]) for n in lengths}
        by_depth = {d: acc([s for s in samples if abs(s["depth"] - d) < 1e-9]) for d in depths}
        m = t["metrics"]
        summary["rows"][name] = {
            **m,
            "n": len(samples),
            "num_gist_tokens": rec["num_gist_tokens"],
            "by_length": {str(n): v for n, v in by_len.items()},
            "by_depth": {str(d): v for d, v in by_depth.items()},
        }
        print(
            f"| {label} | {pct(m['acc'])} (n={len(samples)}) | "
            + " | ".join(pct(v) for v in by_len.values())
            + " | "
            + " | ".join(pct(v) for v in by_depth.values())
            + f" | {m.get('kv_bytes', float('nan')) / 1e6:.2f} | {t['seconds']:.0f} |"
        )
    summary["lengths"], summary["num_gist_tokens"] = lengths, k
    return summary


def _smoothed(history: List[Tuple[int, float]], window: int = 5) -> List[Tuple[int, float]]:
    """``(step, mean of the loss over the last window steps)``."""
    losses = [loss for _, loss in history]
    return [
        (step, sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]))
        for i, (step, _) in enumerate(history)
    ]


def plots(out_dir: Path, summary: Dict[str, Any], plots_dir: Path) -> None:
    """``smollm2_rouge.png``, ``smollm2_passkey.png`` and ``smollm2_loss.png`` in ``plots_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alpaca = summary.get("alpaca", {}).get("rows", {})
    if alpaca:
        names = [
            n
            for n in (
                "neg1_neg_control",
                "gist1_gist",
                "gist2_gist",
                "gist5_gist",
                "gist1_3ep_gist",
                "pos1_pos_control",
                "base_pos_control",
            )
            if n in alpaca
        ]
        labels = {
            "neg1_neg_control": "neg control",
            "gist1_gist": "gist-1",
            "gist2_gist": "gist-2",
            "gist5_gist": "gist-5",
            "gist1_3ep_gist": "gist-1, 3 epochs",
            "pos1_pos_control": "pos control",
            "base_pos_control": "base (untrained)",
        }
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            vals = [100 * alpaca[n][t]["rougeL"] for t in ALPACA_TASKS]
            errs = [100 * alpaca[n][t]["rougeL_stderr"] for t in ALPACA_TASKS]
            ax.bar(
                [x + i * width for x in range(len(ALPACA_TASKS))], vals, width, yerr=errs, capsize=3, label=labels[n]
            )
        ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(ALPACA_TASKS))])
        ax.set_xticklabels([t.replace("alpaca_plus_", "") for t in ALPACA_TASKS])
        ax.set_ylabel("ROUGE-L")
        ax.set_title("SmolLM2-135M-Instruct, Alpaca+ (trained on validation_seen)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plots_dir / "smollm2_rouge.png", dpi=110)
        plt.close(fig)
    passkey = summary.get("passkey", {}).get("rows", {})
    if passkey:
        series = {
            "gist-8 (compressed)": ["gist8_gist"],
            "full context, gist-trained model": ["gist8_pos_control"],
            "full context (pos. control, trained)": [
                "pos8_pos_control",
                f"pos8_pos_control_{LONG_CONTEXT}",
                f"pos8_pos_control_{LONG_EVAL_CONTEXTS[-1]}",
            ],
            "last 8 tokens only": ["gist8_truncate", *(f"gist8_long_truncate_{n}" for n in LONG_EVAL_CONTEXTS)],
            "no context (neg. control)": [
                "gist8_neg_control",
                *(f"gist8_long_neg_control_{n}" for n in LONG_EVAL_CONTEXTS),
            ],
            "untrained base, full context": ["base_pos_control"],
            "gist-8 at longer haystacks, before the curriculum": [f"gist8_gist_{LONG_CONTEXT}"],
            "gist-8 after the long-context curriculum": [f"gist8_long_gist_{n}" for n in LONG_EVAL_CONTEXTS],
        }
        lengths, k = summary["passkey"]["lengths"], summary["passkey"]["num_gist_tokens"]
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, names in series.items():
            xy = [
                (n / k, 100 * y)
                for name in names
                if name in passkey
                for n in lengths
                for y in [passkey[name]["by_length"][str(n)]]
                if y is not None
            ]
            if xy:
                long = names[0][-1].isdigit()
                ax.plot(
                    *zip(*xy),
                    marker="*" if long else "o",
                    markersize=9 if long else 6,
                    label=label,
                    linestyle="-" if names[0].startswith("gist8_gist") or long else "--",
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks([n / k for n in lengths])
        ax.set_xticklabels([f"{n / k:.0f}x\n({n} tok)" for n in lengths])
        ax.set_ylim(-5, 105)
        ax.set_xlabel("compression ratio (haystack tokens / K)")
        ax.set_ylabel("passkey exact match (%)")
        ax.set_title(f"SmolLM2-135M-Instruct, passkey, K={k}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(plots_dir / "smollm2_passkey.png", dpi=110)
        plt.close(fig)
        sweep = [k for k in (*PASSKEY_K_SWEEP, 8) if f"gist{k}_gist" in passkey]
        if len(sweep) > 1:
            fig, (ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4))
            short = sorted(
                {n for k in sweep for n in lengths if passkey[f"gist{k}_gist"]["by_length"].get(str(n)) is not None}
            )
            for k in sweep:
                row = passkey[f"gist{k}_gist"]
                xy = [
                    (n / k, 100 * row["by_length"][str(n)]) for n in short if row["by_length"].get(str(n)) is not None
                ]
                ax.plot(*zip(*xy), marker="o", label=f"K={k} ({64 // k}x-{256 // k}x)")
            ax.set_xscale("log", base=2)
            ax.set_xticks([2**i for i in range(3, 9)])
            ax.set_xticklabels([f"{2**i}x" for i in range(3, 9)])
            ax.set_ylim(-5, 105)
            ax.set_xlabel(f"compression ratio (haystack tokens / K; haystacks of {', '.join(map(str, short))} tokens)")
            ax.set_ylabel("passkey exact match (%)")
            ax.set_title("SmolLM2-135M-Instruct, passkey through K gists (each K trained alike)")
            ax.legend(fontsize=8)
            trainings = {t.name: t for t in PARTS["passkey"].trainings}
            for k in sweep:
                final = trainings[f"gist{k}"].final_dir(out_dir / "passkey" / f"gist{k}")
                if (final / ADAPTER).is_file():
                    loss_ax.plot(*zip(*_smoothed(loss_history(final))), label=f"K={k}")
            loss_ax.set_xlabel("step")
            loss_ax.set_ylabel("training loss (5-step mean)")
            loss_ax.set_title("passkey training loss per answer token")
            loss_ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(plots_dir / "smollm2_passkey_k.png", dpi=110)
            plt.close(fig)
    runs = [
        (part, t)
        for part in PARTS.values()
        for t in part.trainings
        if (t.final_dir(out_dir / part.name / t.name) / ADAPTER).is_file()
    ]
    if runs:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for part, t in runs:
            hist = loss_history(t.final_dir(out_dir / part.name / t.name))
            ax = axes[0 if part.name == "alpaca" else 1]
            steps, losses = zip(*hist)
            (line,) = ax.plot(steps, losses, alpha=0.25)
            ax.plot(*zip(*_smoothed(hist)), color=line.get_color(), label=f"{t.name} ({t.overrides['mask_mode']})")
        for ax, title in zip(axes, ("Alpaca+ seen (loss per output token)", "passkey (loss per answer token)")):
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.set_ylabel("training loss (5-step mean)")
            if ax.lines:
                ax.legend()
        fig.tight_layout()
        fig.savefig(plots_dir / "smollm2_loss.png", dpi=110)
        plt.close(fig)


def _plots_dir(out_dir: Path, args: argparse.Namespace) -> Path:
    """``--plots-dir`` if given; else ``benchmarks/`` for the default ``--out`` (the committed plots), else
    ``out_dir``."""
    if args.plots_dir:
        plots_dir = Path(args.plots_dir)
    else:
        plots_dir = BENCH_DIR if out_dir == ROOT / DEFAULT_OUT else out_dir
    plots_dir.mkdir(parents=True, exist_ok=True)
    return plots_dir


def report(out_dir: Path, args: argparse.Namespace) -> Dict[str, Any]:
    """Print the tables, write ``summary.json`` and the plots."""
    summary: Dict[str, Any] = {}
    if (out_dir / "alpaca").is_dir():
        summary["alpaca"] = alpaca_report(out_dir / "alpaca", args)
    if (out_dir / "passkey").is_dir():
        summary["passkey"] = passkey_report(out_dir / "passkey", args)
    summary["trainings"] = {}
    for part in PARTS.values():
        for t in part.trainings:
            run_dir = out_dir / part.name / t.name
            if (t.final_dir(run_dir) / ADAPTER).is_file():
                hist = loss_history(t.final_dir(run_dir))
                first, last = hist[: min(5, len(hist))], hist[-min(5, len(hist)) :]
                wall, cpu = train_seconds(run_dir)
                summary["trainings"][f"{part.name}/{t.name}"] = {
                    "steps": len(hist),
                    "seconds": wall,
                    "cpu_seconds": cpu,
                    "loss_first5": sum(v for _, v in first) / len(first),
                    "loss_last5": sum(v for _, v in last) / len(last),
                }
    print(
        "\n| training | steps | wall s | CPU s | loss (first 5 steps) | loss (last 5 steps) |\n"
        "|---|---|---|---|---|---|"
    )
    for name, t in summary["trainings"].items():
        wall, cpu = (f"{x:.0f}" if x else "-" for x in (t["seconds"], t["cpu_seconds"]))
        print(f"| {name} | {t['steps']} | {wall} | {cpu} | {t['loss_first5']:.3f} | {t['loss_last5']:.3f} |")
    _atomic_json(summary, out_dir / "summary.json")
    plots(out_dir, summary, _plots_dir(out_dir, args))
    return summary


def _selected(name: str, extra: bool, args: argparse.Namespace) -> bool:
    """Whether a stage runs: named by ``--only``, or (without ``--only``) not extra unless ``--extras``."""
    return name in args.only if args.only is not None else args.extras or not extra


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=["alpaca", "passkey"])
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (relative to the repository)")
    parser.add_argument(
        "--plots-dir", default=None, help="where the PNGs go (default: benchmarks/ for the default --out, else --out)"
    )
    parser.add_argument("--only", nargs="*", default=None, help="only these stages (training names or <model>_<mode>)")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--unseen-limit", type=int, default=200, help="first N records of validation_unseen")
    parser.add_argument("--human-limit", type=int, default=100, help="first N records of validation_human")
    parser.add_argument(
        "--data-dir",
        default=str(ROOT.parent / "shared" / "data" / "alpaca_plus"),
        help="folder with the Alpaca+ validation files",
    )
    parser.add_argument("--max-gen-toks", type=int, default=128)
    parser.add_argument(
        "--eval-batch-size",
        type=int,
        default=64,
        help="requests decoded together (batch-1 CPU decoding is bound by reading the weights)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="CPU threads of each training and evaluation (1 when two parts run side by side)",
    )
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="training and evaluation dtype (bf16: use another --out; CPUs with AMX run it faster)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="training seed and generated training data's seed, instead of the configs' (use another --out)",
    )
    parser.add_argument(
        "--extras",
        action="store_true",
        help="also the extra stages: gist-2, gist-5, gist-1 for 3 epochs, the untrained base on Alpaca+; passkey "
        f"gist-1, -2, -4; the passkey curriculum to {LONG_CONTEXT}-token haystacks",
    )
    parser.add_argument("--passkey-samples", type=int, default=150, help="spread evenly over lengths and depths")
    parser.add_argument("--passkey-context-tokens", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--passkey-eval-seed", type=int, default=1234)
    parser.add_argument(
        "--long-samples",
        type=int,
        default=100,
        help=f"passkey examples of the long-context evaluations ({LONG_CONTEXT}-token haystacks)",
    )
    args = parser.parse_args(argv)
    if args.threads < 1 or args.eval_batch_size < 1:
        parser.error("--threads and --eval-batch-size must be positive")
    if args.seed is not None and args.out == DEFAULT_OUT:
        parser.error(f"--seed {args.seed} trains other models: give them another --out than {DEFAULT_OUT}")
    os.chdir(ROOT)  # the configs' paths are relative to the repository
    out_dir = ROOT / args.out
    if not args.report_only:
        for name in args.parts:
            part = PARTS[name]
            for t in part.trainings:
                if _selected(t.name, t.extra, args):
                    train(part, t, out_dir / part.name, args.threads, args.dtype, args.seed, Path(args.data_dir))
            for e in part.evaluations:
                if _selected(e.name, e.extra, args):
                    evaluate(part, e, out_dir / part.name, args)
    report(out_dir, args)


if __name__ == "__main__":
    main()
