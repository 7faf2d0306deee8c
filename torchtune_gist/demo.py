"""``make demo``: the whole gist pipeline on a laptop CPU in minutes.

1. Makes the tiny assets: a byte-level Llama 3 tokenizer and a ~1.1M-parameter Llama 3.1-shaped model.
2. Stage 1: trains that base from scratch, with plain causal attention, to find a passkey in its
   context (answer loss + 0.2 x language-modelling loss on the whole example); at 128-token
   contexts first, then at ``--context-tokens`` when that is longer.
3. Stage 2: freezes the base and trains K gist rows + LoRA with ``tune run gist_lora_single_device``
   under the gist mask, so the passkey must travel through the K gist tokens; the positive control
   is the same recipe with ``mask_mode=pos_control`` (the full context stays visible). A longer
   ``--context-tokens`` is learnt at 128 tokens first, then continued from that adapter
   (the recipe's ``initial_adapter``).
4. Evaluates held-out passkeys with the lm-eval integration: gist, positive control, negative
   control (no context) and truncation (the context's last K tokens), with accuracy, context
   tokens, K, the compression of what each mode keeps and the KV bytes held per example.
5. Writes ``results.json``, ``results.md`` and a PNG plot under ``outputs/demo/`` (``outputs/demo_quick/``
   for ``--quick``).

Stages whose outputs exist are reused, and a gist training stopped by Ctrl-C saves its step and goes on from it, so
an interrupted demo picks up where it stopped (``--fresh`` starts over, deleting only a folder the demo wrote).
Deterministic given ``--seed``.

Stage 1 uses a short loop of its own: torchtune's full fine-tuning recipe writes ``.bin`` files with
``torch.save``, and everything this project writes is safetensors.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.utils.data import DataLoader
from torchtune.data import padded_collate_sft
from torchtune.models.llama3 import llama3_tokenizer
from torchtune.models.llama3_1 import llama3_1
from torchtune.training.lr_schedulers import get_cosine_schedule_with_warmup
from tqdm import tqdm

from torchtune_gist._io import (
    atomic_save_figure,
    atomic_save_safetensors,
    atomic_write_json,
    atomic_write_text,
    unwritable_reason,
)
from torchtune_gist.data import gist_passkey_dataset
from torchtune_gist.tiny import TINY_LLAMA3_1_ARGS, write_tiny_tokenizer
from torchtune_gist.training import latest_checkpoint, wait_for_recipe

REPO = Path(__file__).resolve().parents[1]
QUICK_OUT = REPO / "outputs" / "demo_quick"
TINY_CONFIG = REPO / "configs" / "tiny" / "gist_lora_single_device.yaml"

#: Stage 1 learns the task at contexts up to this long before any longer ``context_tokens``.
SHORT_CONTEXT_TOKENS = 128

#: The demo's base: 4 layers of width 128, 4 heads / 2 KV heads, MLP 512 (about 1.1M parameters).
DEMO_SIZES: Dict[str, int] = dict(num_layers=4, embed_dim=128, num_heads=4, num_kv_heads=2, intermediate_dim=512)


@dataclass
class DemoSettings:
    """What the demo trains and evaluates. The defaults reach the issue's targets on a 2-core CPU."""

    out: Path = REPO / "outputs" / "demo"
    seed: int = 0
    context_tokens: int = 128
    passkey_digits: int = 5
    num_gist_tokens: int = 8
    base_steps: int = 300
    base_lr: float = 2e-3
    long_base_steps: int = 150
    gist_steps: int = 450
    long_gist_steps: int = 150
    control_steps: int = 40
    gist_lr: float = 2e-3
    batch_size: int = 32
    eval_samples: int = 200
    eval_seed: int = 12345


def _tokenizer(assets: Path) -> Any:
    return llama3_tokenizer(
        str(assets / "tiny_tokenizer.model"), special_tokens_path=str(assets / "tiny_special_tokens.json")
    )


def _curriculum(context_tokens: int, steps: int, long_steps: int, lr: float) -> List[Tuple[int, int, float]]:
    """``(context tokens, steps, peak lr)`` per phase: ``steps`` at contexts of at most ``SHORT_CONTEXT_TOKENS``,
    then, for a longer ``context_tokens``, ``long_steps`` at that length at half the lr."""
    short = min(context_tokens, SHORT_CONTEXT_TOKENS)
    phases = [(short, steps, lr)]
    if context_tokens > short:
        phases.append((context_tokens, long_steps, lr / 2))
    return phases


def base_phases(settings: DemoSettings) -> List[Tuple[int, int, float]]:
    """Stage 1's curriculum: ``(context tokens, steps, peak lr)`` per phase.

    The base learns the task at contexts of at most ``SHORT_CONTEXT_TOKENS`` first; a longer demo context
    continues from there for ``long_base_steps`` at half the lr (trained from scratch at 1,024 tokens,
    400 steps left the answer at chance; from the short base it is learnt within 20 steps).
    """
    return _curriculum(settings.context_tokens, settings.base_steps, settings.long_base_steps, settings.base_lr)


def train_base(settings: DemoSettings, assets: Path, out_dir: Path) -> List[Tuple[int, float]]:
    """Stage 1: train the tiny base from scratch with causal attention; write ``model.safetensors``.

    Plain causal training (torchtune's ``padded_collate_sft``, no mask), answer loss + 0.2 x the
    language-modelling loss, through the phases of ``base_phases``.

    Returns:
        List[Tuple[int, float]]: ``(step, answer loss)`` pairs (also written beside the checkpoint).
    """
    torch.manual_seed(settings.seed)
    tokenizer = _tokenizer(assets)
    model = llama3_1(**{**TINY_LLAMA3_1_ARGS, **DEMO_SIZES})
    collate = partial(padded_collate_sft, padding_idx=tokenizer.pad_id)
    history: List[Tuple[int, float]] = []
    for phase, (context_tokens, steps, lr) in enumerate(base_phases(settings)):
        data = gist_passkey_dataset(
            tokenizer,
            num_gist_tokens=0,
            num_samples=steps * settings.batch_size,
            context_tokens=context_tokens,
            passkey_digits=settings.passkey_digits,
            seed=settings.seed + 1 + 2 * phase,
        )
        loader = DataLoader(
            data,
            batch_size=settings.batch_size,
            shuffle=True,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(settings.seed),
        )
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=20, num_training_steps=steps)
        for batch in tqdm(loader, desc=f"stage 1: causal base, {context_tokens}-token contexts", total=steps):
            logits = model(batch["tokens"])[:, :-1]
            answer = F.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100)
            lm_targets = batch["tokens"][:, 1:].masked_fill(batch["tokens"][:, 1:] == tokenizer.pad_id, -100)
            loss = answer + 0.2 * F.cross_entropy(logits.transpose(1, 2), lm_targets, ignore_index=-100)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            history.append((len(history) + 1, float(answer)))
    atomic_save_safetensors(
        model.state_dict(), out_dir / "model.safetensors", metadata={"loss_history": json.dumps(history)}
    )
    return history


def gist_phases(settings: DemoSettings) -> List[Tuple[str, int, int, float]]:
    """Stage 2's curriculum: ``(run name, context tokens, steps, peak lr)`` per phase.

    As in stage 1, the gist route is found at contexts of at most ``SHORT_CONTEXT_TOKENS`` first; a
    longer demo context continues from that adapter (the recipe's ``initial_adapter``) for
    ``long_gist_steps`` at half the lr. The last phase's run is named ``gist``.
    """
    phases = _curriculum(settings.context_tokens, settings.gist_steps, settings.long_gist_steps, settings.gist_lr)
    names = ["gist_short", "gist"][-len(phases) :]
    return [(name, *phase) for name, phase in zip(names, phases)]


def run_gist_recipe(
    settings: DemoSettings,
    assets: Path,
    base_dir: Path,
    out_dir: Path,
    mask_mode: str,
    steps: int,
    context_tokens: int,
    lr: float,
    initial_adapter: Optional[Path] = None,
) -> None:
    """Stage 2 through torchtune's CLI: ``tune run gist_lora_single_device`` on the tiny config."""
    overrides = {
        "assets_dir": assets,
        "output_dir": out_dir,
        "checkpointer.checkpoint_dir": base_dir,
        "num_gist_tokens": settings.num_gist_tokens,
        "mask_mode": mask_mode,
        "dataset.num_samples": steps * settings.batch_size,
        "dataset.context_tokens": context_tokens,
        "dataset.passkey_digits": settings.passkey_digits,
        "dataset.seed": settings.seed + 2,
        "validation_dataset.context_tokens": context_tokens,
        "batch_size": settings.batch_size,
        "optimizer.lr": lr,
        "lr_scheduler.num_warmup_steps": 10,
        "seed": settings.seed,
        "save_merged_hf": False,
        "log_every_n_steps": 10,
        **{f"model.{k}": v for k, v in DEMO_SIZES.items()},
    }
    if latest_checkpoint(out_dir) is not None:  # an interrupted run: go on from its last checkpoint
        overrides["resume_from_checkpoint"] = True
    elif initial_adapter is not None:
        overrides["initial_adapter"] = initial_adapter
    cmd = [
        sys.executable,
        "-m",
        "torchtune._cli.tune",
        "run",
        "gist_lora_single_device",
        "--config",
        str(TINY_CONFIG),
        *(f"{k}={v}" for k, v in overrides.items()),
    ]
    print(
        f"\n$ tune run gist_lora_single_device --config {TINY_CONFIG.relative_to(REPO)} mask_mode={mask_mode} "
        f"dataset.context_tokens={context_tokens} ...",
        flush=True,
    )
    rc = wait_for_recipe(subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}))
    if rc:
        raise subprocess.CalledProcessError(rc, cmd)


def recipe_loss_history(run_dir: Path) -> List[Tuple[int, float]]:
    """The ``(step, loss)`` history stored in a gist run's final recipe state."""
    with safe_open(str(run_dir / "epoch_0" / "recipe_state.safetensors"), framework="pt") as f:
        return [tuple(x) for x in json.loads(f.metadata()["progress"])["loss_history"]]


def chained_loss_history(run_dirs: Sequence[Path]) -> List[Tuple[int, float]]:
    """The ``(step, loss)`` histories of runs that continue one another, numbered on from one run to the next."""
    curve: List[Tuple[int, float]] = []
    for run_dir in run_dirs:
        offset = len(curve)
        curve += [(offset + step, loss) for step, loss in recipe_loss_history(run_dir)]
    return curve


def base_loss_history(base_dir: Path) -> List[Tuple[int, float]]:
    with safe_open(str(base_dir / "model.safetensors"), framework="pt") as f:
        return [tuple(x) for x in json.loads(f.metadata()["loss_history"])]


def evaluate(settings: DemoSettings, assets: Path, base_dir: Path, run_dir: Path, mode: str) -> Dict[str, Any]:
    """Score held-out passkeys through lm-eval in ``mode``; returns accuracy (with its 95% bootstrap interval) and the
    gist statistics."""
    import lm_eval

    from torchtune_gist.checkpointing import load_gist_adapter
    from torchtune_gist.eval import TorchtuneGistLM, gist_task_manager
    from torchtune_gist.eval.bootstrap import mean_interval
    from torchtune_gist.models import lora_gist_llama3_1_tiny

    tokenizer = _tokenizer(assets)
    model = lora_gist_llama3_1_tiny(
        ["q_proj", "k_proj", "v_proj", "output_proj"],
        lora_rank=16,
        lora_alpha=32,
        num_gist_tokens=settings.num_gist_tokens,
        **DEMO_SIZES,
    )
    with safe_open(str(base_dir / "model.safetensors"), framework="pt") as f:
        model.load_state_dict({k: f.get_tensor(k) for k in f.keys()}, strict=False)
    load_gist_adapter(model, run_dir / "epoch_0")
    lm = TorchtuneGistLM(model=model, tokenizer=tokenizer, mode=mode, batch_size=50)  # the task sets max_gen_toks (16)
    manager = gist_task_manager(
        tokenizer=tokenizer,
        context_tokens=settings.context_tokens,
        num_samples=settings.eval_samples,
        passkey_digits=settings.passkey_digits,
        seed=settings.eval_seed,
        num_gist_tokens=settings.num_gist_tokens,
    )
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["gist_passkey"], task_manager=manager, log_samples=True, verbosity="ERROR"
    )
    metrics = results["results"]["gist_passkey"]
    interval = mean_interval([sample["acc"] for sample in results["samples"]["gist_passkey"]])
    stats = lm.stats
    return {
        "mode": mode,
        "accuracy": metrics["acc,none"],
        "accuracy_interval": None if interval is None else list(interval),  # as results.json holds it
        "context_tokens": stats["mean_prompt_tokens"],
        "num_gist_tokens": settings.num_gist_tokens,
        "compression_ratio": stats["mean_compression_ratio"],
        "kv_bytes": stats["mean_kv_bytes"],
    }


def compression_cell(row: Dict[str, Any]) -> str:
    """The table's compression entry: ``1x (full)``, ``-`` (nothing kept) or the ratio."""
    if row["compression_ratio"] is None:
        return "-"
    return "1x (full)" if row["mode"] == "pos_control" else f"{row['compression_ratio']:.1f}x"


def _percent(value: float, interval: Optional[Sequence[float]]) -> str:
    """``98.5%``, with ``[96.5, 100.0]`` after it where there is an interval."""
    return f"{100 * value:.1f}%" + ("" if interval is None else f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]")


def results_table(rows: List[Dict[str, Any]]) -> str:
    """A Markdown table of the evaluation rows."""
    lines = [
        "| mode | model | exact match [95% interval] | context tokens | K | compression | KV bytes held / example |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['model']} | {_percent(r['accuracy'], r['accuracy_interval'])} | "
            f"{r['context_tokens']:.0f} | {r['num_gist_tokens']} "
            f"| {compression_cell(r)} | {r['kv_bytes']:,.0f} |"
        )
    return "\n".join(lines)


def plot(rows: List[Dict[str, Any]], curves: Dict[str, List[Tuple[int, float]]], path: Path) -> Path:
    """Accuracy by mode (with compression ratios) beside the training loss curves, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"gist": "tab:green", "pos_control": "tab:blue", "neg_control": "tab:red", "truncate": "tab:orange"}
    intervals = [r["accuracy_interval"] or (r["accuracy"],) * 2 for r in rows]
    errors = [
        [100 * (r["accuracy"] - lo) for r, (lo, _) in zip(rows, intervals)],
        [100 * (hi - r["accuracy"]) for r, (_, hi) in zip(rows, intervals)],
    ]
    bars = ax1.bar(
        [r["mode"] for r in rows],
        [100 * r["accuracy"] for r in rows],
        color=[colors[r["mode"]] for r in rows],
        yerr=errors,
        capsize=4,
        error_kw={"elinewidth": 1},
    )
    for bar, r, (_, hi) in zip(bars, rows, intervals):
        kv = f"{r['kv_bytes'] / 1024:.0f} KiB KV"
        ratio = f"{r['compression_ratio']:.0f}x, " if r["mode"] in ("gist", "truncate") else ""
        ax1.annotate(
            f"{100 * r['accuracy']:.1f}%\n{ratio}{kv}",
            (bar.get_x() + bar.get_width() / 2, 100 * hi),
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax1.set_ylim(0, 119)
    ax1.set_ylabel("passkey exact match (%)")
    ax1.set_title("Held-out passkeys: context compressed into K gist tokens (95% intervals)")
    for name, curve in curves.items():
        ax2.plot([s for s, _ in curve], [loss for _, loss in curve], label=name)
    ax2.set_yscale("log")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("training loss (answer tokens)")
    ax2.set_title("Training loss")
    ax2.legend()
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


class DemoSettingsError(ValueError):
    """Settings the demo cannot run with (the command line reports them without a traceback)."""


def _training_settings(settings: DemoSettings) -> Dict[str, Any]:
    """The settings that shape the trained weights (evaluation settings may change between runs)."""
    skip = {"out", "eval_samples", "eval_seed"}
    return {k: v for k, v in asdict(settings).items() if k not in skip}


def _is_demo_record(path: Path) -> bool:
    """Whether ``path`` is a ``settings.json`` the demo wrote."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(found, dict) and {"context_tokens", "num_gist_tokens", "base_steps", "gist_steps"} <= found.keys()


def remove_demo_outputs(out: Path) -> None:
    """``--fresh``: delete ``out`` if it holds a demo's outputs (its ``settings.json``); a missing or empty folder is
    left.

    Raises:
        DemoSettingsError: ``out`` is not a folder, or holds files but no demo ``settings.json``.
    """
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise DemoSettingsError(f"--out {out} is not a folder; --fresh deletes only a folder the demo wrote")
    if not _is_demo_record(out / "settings.json"):
        if any(out.iterdir()):
            raise DemoSettingsError(
                f"--out {out} is not a demo output folder (no demo settings.json); --fresh deletes only a "
                "folder the demo wrote: pick another --out"
            )
        return
    shutil.rmtree(out)


def check_settings(settings: DemoSettings, tokenizer: Any, fresh: bool = False) -> None:
    """Refuse settings the data, tokenizer or tiny model cannot hold, and outputs of a run with other settings.

    Stages whose outputs exist are reused, so a run in a folder trained with other settings would
    silently mix them; ``settings.json`` records what the folder's weights were trained with. With
    ``fresh``, earlier outputs are deleted (``remove_demo_outputs``) once the settings pass.

    Raises:
        DemoSettingsError: a context too short for the needle, more gist tokens than the tokenizer
            reserves, an example longer than the model's ``max_seq_len``, ``settings.out`` holding the
            outputs of a run with other training settings, or ``fresh`` on a folder the demo did not write.
    """
    try:
        example = gist_passkey_dataset(
            tokenizer,
            num_gist_tokens=settings.num_gist_tokens,
            num_samples=1,
            context_tokens=settings.context_tokens,
            passkey_digits=settings.passkey_digits,
            seed=settings.seed,
        )[0]
    except ValueError as e:
        raise DemoSettingsError(str(e)) from e
    max_seq_len = TINY_LLAMA3_1_ARGS["max_seq_len"]
    if len(example["tokens"]) > max_seq_len:
        raise DemoSettingsError(
            f"context_tokens={settings.context_tokens} makes {len(example['tokens'])}-token examples; the demo model "
            f"holds {max_seq_len} positions: use a shorter context"
        )
    if fresh:
        remove_demo_outputs(Path(settings.out))
    record = Path(settings.out) / "settings.json"
    wanted = _training_settings(settings)
    if record.exists():
        found = json.loads(record.read_text())
        if found != wanted:
            changed = ", ".join(f"{k}: {found.get(k)!r} -> {v!r}" for k, v in wanted.items() if found.get(k) != v)
            raise DemoSettingsError(
                f"{settings.out} holds a demo trained with other settings ({changed}); "
                "pass --fresh to start over, or another --out"
            )
    else:
        atomic_write_json(wanted, record)


def run(settings: DemoSettings, fresh: bool = False) -> Dict[str, Any]:
    """Run (or resume) every stage; returns the results written to ``results.json``."""
    out = Path(settings.out)
    assets, base_dir = out / "assets", out / "base"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        write_tiny_tokenizer(scratch)
        check_settings(settings, _tokenizer(Path(scratch)), fresh=fresh)
    write_tiny_tokenizer(assets)
    if not (base_dir / "model.safetensors").exists():
        train_base(settings, assets, base_dir)
    previous: Optional[Path] = None
    gist_runs = []
    for name, context_tokens, steps, lr in gist_phases(settings):
        run_dir = out / name
        if not (run_dir / "epoch_0" / "gist_adapter.safetensors").exists():
            run_gist_recipe(
                settings, assets, base_dir, run_dir, "gist", steps, context_tokens, lr, initial_adapter=previous
            )
        previous = run_dir / "epoch_0"
        gist_runs.append(run_dir)
    runs = {"gist": out / "gist", "pos_control": out / "pos_control"}
    if not (runs["pos_control"] / "epoch_0" / "gist_adapter.safetensors").exists():
        run_gist_recipe(
            settings,
            assets,
            base_dir,
            runs["pos_control"],
            "pos_control",
            settings.control_steps,
            settings.context_tokens,
            settings.gist_lr,
        )
    print("\nEvaluating held-out passkeys through lm-eval ...", flush=True)
    plan = [
        ("gist", "gist", "gist-trained"),
        ("pos_control", "pos_control", "pos_control-trained"),
        ("gist", "neg_control", "gist-trained"),
        ("gist", "truncate", "gist-trained"),
    ]
    rows = []
    for run_name, mode, label in tqdm(plan, desc="evaluation"):
        rows.append({**evaluate(settings, assets, base_dir, runs[run_name], mode), "model": label})
    curves = {
        "stage 1: causal base": base_loss_history(base_dir),
        "stage 2: gist": chained_loss_history(gist_runs),
        "stage 2: pos_control": recipe_loss_history(runs["pos_control"]),
    }
    png = plot(rows, curves, out / "demo.png")
    table = results_table(rows)
    results = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "rows": rows,
        "loss_curves": curves,
        "seconds": time.perf_counter() - start,
    }
    atomic_write_json(results, out / "results.json")
    atomic_write_text(table + "\n", out / "results.md")
    print("\n" + table)
    print(f"\nPlot: {png}\nResults: {out / 'results.json'} ({results['seconds']:.0f} s)")
    return results


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m torchtune_gist.demo [--out DIR] [--fresh] [--seed N] [--quick] [--context-tokens N] ...``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        help=f"output folder (default {DemoSettings.out.relative_to(REPO)}; "
        f"{QUICK_OUT.relative_to(REPO)} with --quick)",
    )
    parser.add_argument("--seed", type=int, default=DemoSettings.seed)
    parser.add_argument("--fresh", action="store_true", help="delete earlier demo outputs in --out and start over")
    parser.add_argument("--quick", action="store_true", help="a few steps of everything (a smoke test, not a result)")
    parser.add_argument(
        "--context-tokens", type=int, default=DemoSettings.context_tokens, help="haystack length in tokens"
    )
    parser.add_argument("--num-gist-tokens", type=int, default=DemoSettings.num_gist_tokens, help="K")
    parser.add_argument("--batch-size", type=int, default=DemoSettings.batch_size)
    parser.add_argument("--base-steps", type=int, default=DemoSettings.base_steps, help="stage 1 (causal base) steps")
    parser.add_argument(
        "--long-base-steps",
        type=int,
        default=DemoSettings.long_base_steps,
        help="stage 1 steps at --context-tokens after the 128-token ones (when longer)",
    )
    parser.add_argument("--gist-steps", type=int, default=DemoSettings.gist_steps, help="stage 2 (gist) steps")
    parser.add_argument(
        "--long-gist-steps",
        type=int,
        default=DemoSettings.long_gist_steps,
        help="stage 2 steps at --context-tokens after the 128-token ones (when longer)",
    )
    args = parser.parse_args(argv)
    counts = (
        "context_tokens",
        "num_gist_tokens",
        "batch_size",
        "base_steps",
        "long_base_steps",
        "gist_steps",
        "long_gist_steps",
    )
    for name in counts:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    out = args.out if args.out is not None else QUICK_OUT if args.quick else DemoSettings.out
    problem = unwritable_reason(out, directory=True)
    if problem:
        parser.error(f"--out: {problem}")
    settings = DemoSettings(out=out, seed=args.seed, **{name: getattr(args, name) for name in counts})
    if args.quick:
        settings = replace(
            settings,
            base_steps=30,
            long_base_steps=10,
            gist_steps=20,
            long_gist_steps=10,
            control_steps=10,
            eval_samples=40,
        )
    try:
        run(settings, fresh=args.fresh)
    except DemoSettingsError as e:
        parser.error(str(e))


if __name__ == "__main__":
    main()
