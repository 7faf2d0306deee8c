"""Put lm-eval runs of the gist model side by side: the paper's comparison of gist against its controls.

Each evaluation (``python -m torchtune_gist.eval run ... --output_path DIR``) writes a ``results_*.json``; this
reads several, labels each run by its ``mode`` (and checkpoint, where two share a mode), and writes one table of
every task's metrics per run, with the share of the control gap each run keeps for each score:
``(run - neg_control) / (pos_control - neg_control)`` (Mu et al. report it for ROUGE-L)::

    python -m torchtune_gist.eval.compare outputs/eval/gist outputs/eval/pos outputs/eval/neg --out outputs/eval

prints the Markdown table and, with ``--out``, writes ``comparison.md`` and ``comparison.png`` there.
"""

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from lm_eval.utils import simple_parse_args_string

from torchtune_gist._io import atomic_save_figure, atomic_write_text

#: Metrics that describe what a run held, not how well it scored: no gap share for them.
COST_METRICS = ("compression_ratio", "kv_bytes")


@dataclass(frozen=True)
class Run:
    """One lm-eval results file: its label, mode, scores ``{task: {metric: value}}`` and the file's ``config``
    section (the run's settings)."""

    label: str
    mode: str
    path: Path
    scores: Dict[str, Dict[str, float]]
    settings: Dict[str, Any]


def results_files(paths: Sequence[Path]) -> List[Path]:
    """The ``results_*.json`` files named, or found under the directories named (lm-eval's ``--output_path``).

    Raises:
        FileNotFoundError: for a path that is neither, or a directory without results.
    """
    files = []
    for path in map(Path, paths):
        found = [path] if path.is_file() else sorted(path.rglob("results_*.json")) if path.is_dir() else []
        if not found:
            raise FileNotFoundError(f"{path}: no lm-eval results file (results_*.json) there")
        files += found
    return files


def load_run(path: Path) -> Run:
    """Read one lm-eval results file written for the ``torchtune_gist`` model.

    Raises:
        ValueError: if it is not lm-eval's results JSON of a ``torchtune_gist`` run.
    """
    try:
        record = json.loads(Path(path).read_text())
        config, results = record["config"], record["results"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not an lm-eval results file: {e}") from e
    if config.get("model") != "torchtune_gist":
        raise ValueError(f"{path} is a run of the model {config.get('model')!r}, not torchtune_gist")
    model_args = config.get("model_args") or {}
    if isinstance(model_args, str):
        model_args = simple_parse_args_string(model_args)
    mode = str(model_args.get("mode", "gist"))
    scores = {
        task: {
            key.split(",")[0]: float(value)
            for key, value in metrics.items()
            if "," in key and "_stderr," not in key and isinstance(value, (int, float))
        }
        for task, metrics in results.items()
    }
    label = f"{mode} ({model_args['checkpoint_dir']})" if model_args.get("checkpoint_dir") else mode
    return Run(label, mode, Path(path), scores, config)


def label_runs(runs: List[Run]) -> List[Run]:
    """Label each run by its mode alone where no other run shares it."""
    modes = [r.mode for r in runs]
    return [replace(r, label=r.mode) if modes.count(r.mode) == 1 else r for r in runs]


def gap_share(value: float, pos: float, neg: float) -> Optional[float]:
    """``(value - neg) / (pos - neg)``: 1 keeps all the positive control's lead over the negative one, 0 none;
    ``None`` where the controls tie."""
    return None if pos == neg else (value - neg) / (pos - neg)


def comparison_rows(runs: Sequence[Run]) -> List[Dict[str, Any]]:
    """One row per task and metric: each run's value and, for scores, each run's gap share when exactly one
    ``pos_control`` and one ``neg_control`` run scored that task."""
    rows = []
    tasks = sorted({task for run in runs for task in run.scores})
    for task in tasks:
        metrics = sorted({m for run in runs for m in run.scores.get(task, {})})
        controls = {mode: [r for r in runs if r.mode == mode and task in r.scores] for mode in ("pos_control", "neg_control")}
        for metric in metrics:
            values = {r.label: r.scores.get(task, {}).get(metric) for r in runs}
            row: Dict[str, Any] = {"task": task, "metric": metric, "values": values, "gap_share": {}}
            pos, neg = controls["pos_control"], controls["neg_control"]
            if metric not in COST_METRICS and len(pos) == 1 and len(neg) == 1:
                p, n = pos[0].scores[task].get(metric), neg[0].scores[task].get(metric)
                if p is not None and n is not None:
                    row["gap_share"] = {
                        r.label: gap_share(v, p, n)
                        for r in runs if r.mode not in ("pos_control", "neg_control") and (v := values[r.label]) is not None
                    }
            rows.append(row)
    return rows


def _cell(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def render_markdown(runs: Sequence[Run], rows: Sequence[Dict[str, Any]]) -> str:
    """The comparison as a Markdown table, with the files it was read from."""
    shared = [r.label for r in runs if r.mode not in ("pos_control", "neg_control")]
    header = ["task", "metric", *[r.label for r in runs], *[f"gap share: {label}" for label in shared]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["task"], row["metric"], *[_cell(row["values"][r.label]) for r in runs]]
        cells += [_cell(row["gap_share"].get(label)) for label in shared]
        lines.append("| " + " | ".join(cells) + " |")
    sources = "\n".join(f"- {r.label}: `{r.path}`" for r in runs)
    note = (
        "Gap share = (run - neg_control) / (pos_control - neg_control), per score: 1 keeps all of the full prompt's lead "
        "over no prompt, 0 none. compression_ratio = prompt tokens per token kept; kv_bytes = keys/values held per example."
    )
    return "\n".join([*lines, "", note, "", "Runs:", sources, ""])


def plot(runs: Sequence[Run], rows: Sequence[Dict[str, Any]], path: Path) -> Path:
    """Bar chart of every score (cost metrics left out), one bar per run, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = [row for row in rows if row["metric"] not in COST_METRICS]
    ratios = {row["task"]: row["values"] for row in rows if row["metric"] == "compression_ratio"}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(scores) * max(1, len(runs)) / 2), 4))
    width = 0.8 / max(1, len(runs))
    for i, run in enumerate(runs):
        xs = [j + i * width for j in range(len(scores))]
        heights = [float("nan") if row["values"][run.label] is None else row["values"][run.label] for row in scores]
        ratio = next((values[run.label] for values in ratios.values() if values.get(run.label) is not None), None)
        ax.bar(xs, heights, width, label=run.label if ratio is None else f"{run.label} ({ratio:.3g}x compression)")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(scores))])
    ax.set_xticklabels([f"{row['task']}\n{row['metric']}" for row in scores], fontsize=8)
    ax.set_ylabel("score")
    ax.set_title("lm-eval scores by mode")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=min(3, len(runs)), frameon=False)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Read the runs named on the command line, print the table; with ``--out``, write it and the plot."""
    parser = argparse.ArgumentParser(
        prog="python -m torchtune_gist.eval.compare", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("results", nargs="+", type=Path, help="results_*.json files or lm-eval --output_path directories")
    parser.add_argument("--out", type=Path, default=None, help="directory for comparison.md and comparison.png")
    args = parser.parse_args(argv)
    try:
        runs = label_runs([load_run(f) for f in results_files(args.results)])
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    rows = comparison_rows(runs)
    report = render_markdown(runs, rows)
    print(report)
    if args.out is not None:
        atomic_write_text(report, args.out / "comparison.md")
        plot(runs, rows, args.out / "comparison.png")
        print(f"Wrote {args.out / 'comparison.md'} and {args.out / 'comparison.png'}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
