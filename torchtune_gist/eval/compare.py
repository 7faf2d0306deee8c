"""Put lm-eval runs of the gist model side by side: the paper's comparison of gist against its controls.

Each evaluation (``python -m torchtune_gist.eval run ... --output_path DIR``) writes a ``results_*.json``; this
reads several, labels each run by its ``mode`` (and checkpoint, where two share a mode), and writes one table of
every task's metrics per run, with the share of the control gap each run keeps for each score:
``(run - neg_control) / (pos_control - neg_control)`` (Mu et al. report it for ROUGE-L)::

    python -m torchtune_gist.eval.compare outputs/eval/gist outputs/eval/pos outputs/eval/neg --out outputs/eval

prints the Markdown table and, with ``--out``, writes ``comparison.md`` and ``comparison.png`` there. Where the
per-example scores are beside a results file (lm-eval's ``--log_samples`` files, which ``tune run gist_eleuther_eval``
always writes), each score and gap share gets a 95% bootstrap interval, the runs resampled together (paired).

Runs that scored a task on other documents (another ``--limit``, ``num_samples``, ``context_tokens``, seed, ...; or
per-example files naming other documents) are named under the table, and no gap share is given between them.
"""

import argparse
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from lm_eval.utils import simple_parse_args_string

from torchtune_gist._io import atomic_save_figure, atomic_write_text
from torchtune_gist.eval.bootstrap import BOOTSTRAP_ITERS, Interval, gap_share_interval, mean_interval

#: Metrics that describe what a run held, not how well it scored: no gap share for them.
COST_METRICS = ("compression_ratio", "kv_bytes")

#: Mu et al. (2023), Table 1: LLaMA-7B ROUGE-L (x 100) on the Alpaca+ validation splits, for scale.
PAPER_LLAMA_7B_ROUGE_L = {
    "pos_control": {"seen": 58.0, "unseen": 48.1, "human": 27.0},
    "gist1": {"seen": 57.8, "unseen": 46.6, "human": 23.9},
    "neg_control": {"seen": 31.5, "unseen": 31.4, "human": 14.4},
}


#: The task metadata that chooses the documents a task scores (the rest, e.g. the model's arguments, does not;
#: ``data_dir`` names where the Alpaca+ files were read, which differs from machine to machine for the same files).
DOCUMENT_SETTINGS = ("context_tokens", "depths", "num_samples", "passkey_digits", "seed")

#: Per-example scores of one task: ``{metric: {doc_id: score}}``.
Examples = Dict[str, Dict[str, float]]


@dataclass(frozen=True)
class Run:
    """One lm-eval results file: its label, mode, scores ``{task: {metric: value}}``, the file's ``config`` section
    (the run's settings), the per-example scores found beside it ``{task: {metric: {doc_id: score}}}``, notes
    on per-example files that could not be used, and what chose each task's documents ``{task: {setting: value}}``
    (:func:`task_documents`)."""

    label: str
    mode: str
    path: Path
    scores: Dict[str, Dict[str, float]]
    settings: Dict[str, Any]
    examples: Dict[str, Examples] = field(default_factory=dict)
    notes: Tuple[str, ...] = ()
    documents: Dict[str, Dict[str, Any]] = field(default_factory=dict)


def results_files(paths: Sequence[Path]) -> List[Path]:
    """The results files named, or found under the directories named: lm-eval's ``results_<date>.json`` (its
    ``--output_path``) and ``results.json`` (``tune run gist_eleuther_eval``'s ``output_dir``); each file once, however
    often it is named.

    Raises:
        FileNotFoundError: for a path that is neither, or a directory without results.
    """
    files: Dict[Path, Path] = {}  # resolved path -> the path as found
    for path in map(Path, paths):
        found = [path] if path.is_file() else []
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("results*.json") if p.stem == "results" or p.stem.startswith("results_")
            )
        if not found:
            raise FileNotFoundError(f"{path}: no lm-eval results file (results_*.json or results.json) there")
        for f in found:
            files.setdefault(f.resolve(), f)
    return list(files.values())


def samples_path(results_path: Path, task: str) -> Path:
    """Where lm-eval's ``--log_samples`` puts a task's per-example file beside a results file:
    ``results_<date>.json`` -> ``samples_<task>_<date>.jsonl`` (``results.json`` -> ``samples_<task>.jsonl``)."""
    return results_path.with_name(f"samples_{task}{results_path.stem[len('results') :]}.jsonl")


def read_examples(path: Path) -> Examples:
    """Per-example scores ``{metric: {doc_id: score}}`` of an lm-eval samples file (JSON lines naming their
    ``metrics``).

    Raises:
        ValueError: if a line is not such a record, or a document is scored twice (several filters).
    """
    examples: Examples = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            doc_id, metrics = str(record["doc_id"]), record["metrics"]
            scores = {m: float(record[m]) for m in metrics}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{number} is not an lm-eval sample record with its metrics: {e}") from e
        for metric, score in scores.items():
            if doc_id in examples.setdefault(metric, {}):
                raise ValueError(f"{path}: document {doc_id} is scored twice for {metric} (several filters)")
            examples[metric][doc_id] = score
    return examples


def _examples_beside(path: Path, scores: Dict[str, Dict[str, float]]) -> Tuple[Dict[str, Examples], Tuple[str, ...]]:
    """The per-example scores of each task found beside ``path`` whose means are the results file's scores, and a
    note for each file left out."""
    found, notes = {}, []
    for task, metrics in scores.items():
        file = samples_path(path, task)
        if not file.is_file():
            continue
        try:
            examples = read_examples(file)
        except ValueError as e:
            notes.append(f"{e}: no intervals for {task}")
            continue
        differ = sorted(
            m
            for m, per_doc in examples.items()
            if m in metrics
            and abs(sum(per_doc.values()) / len(per_doc) - metrics[m]) > 1e-6 * max(1.0, abs(metrics[m]))
        )
        if differ:
            notes.append(
                f"{file}: the mean of {', '.join(differ)} is not the results file's (another evaluation?): no "
                f"intervals for {task}"
            )
            continue
        found[task] = examples
    return found, tuple(notes)


def document_metadata(configs: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """lm-eval's task ``configs`` cut to the :data:`DOCUMENT_SETTINGS` of each task's metadata, in the results
    file's layout (``{task: {"metadata": {...}}}``): what a results file needs to say which documents it scored."""
    return {
        task: {"metadata": {k: v for k, v in (cfg.get("metadata") or {}).items() if k in DOCUMENT_SETTINGS}}
        for task, cfg in configs.items()
    }


def task_documents(record: Dict[str, Any], task: str) -> Dict[str, Any]:
    """What chose the documents a results file's ``task`` scored, as far as the file records it: ``examples``
    (lm-eval's effective count, after ``--limit``) and the task metadata's :data:`DOCUMENT_SETTINGS`."""
    documents = {}
    count = (record.get("n-samples") or {}).get(task)
    if isinstance(count, dict) and "effective" in count:
        documents["examples"] = count["effective"]
    metadata = ((record.get("configs") or {}).get(task) or {}).get("metadata") or {}
    documents.update({k: metadata[k] for k in DOCUMENT_SETTINGS if k in metadata})
    return documents


def load_run(path: Path) -> Run:
    """Read one lm-eval results file written for the ``torchtune_gist`` model, and the per-example scores beside it.

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
    examples, notes = _examples_beside(Path(path), scores)
    documents = {task: task_documents(record, task) for task in results}
    return Run(label, mode, Path(path), scores, config, examples, notes, documents)


def label_runs(runs: List[Run]) -> List[Run]:
    """Label each run by its mode alone where no other run shares it, else by mode and checkpoint; runs that still
    share a label (two results files of one model: other tasks, or a rerun) are numbered ``#2``, ``#3``... in order."""
    modes = [r.mode for r in runs]
    runs = [replace(r, label=r.mode) if modes.count(r.mode) == 1 else r for r in runs]
    seen: Dict[str, int] = {}
    numbered = []
    for r in runs:
        seen[r.label] = seen.get(r.label, 0) + 1
        numbered.append(r if seen[r.label] == 1 else replace(r, label=f"{r.label} #{seen[r.label]}"))
    return numbered


def _document_ids(run: Run, task: str) -> Optional[frozenset]:
    per_metric = run.examples.get(task)
    return frozenset(next(iter(per_metric.values()))) if per_metric else None


def document_differences(runs: Sequence[Run], task: str) -> List[str]:
    """How the ``runs`` that scored ``task`` differ in the documents they scored (empty: the same, as far as their
    files tell): each recorded setting of :func:`task_documents` with a value per run, and ``documents`` where their
    per-example files name other documents."""
    scoring = [r for r in runs if task in r.scores]
    known = set.intersection(*(set(r.documents.get(task, {})) for r in scoring)) if scoring else set()
    differences = []
    for key in sorted(known, key=lambda k: (k != "examples", k)):
        values = [r.documents[task][key] for r in scoring]
        if len({json.dumps(v, sort_keys=True) for v in values}) > 1:
            differences.append(f"{key}: " + ", ".join(f"{r.label} {v}" for r, v in zip(scoring, values)))
    ids = {r.label: _document_ids(r, task) for r in scoring}
    if len({i for i in ids.values() if i is not None}) > 1:
        named = ", ".join(label for label, i in ids.items() if i is not None)
        differences.append(f"documents: the per-example files of {named} name other documents")
    return differences


def gap_share(value: float, pos: float, neg: float) -> Optional[float]:
    """``(value - neg) / (pos - neg)``: 1 keeps all the positive control's lead over the negative one, 0 none;
    ``None`` where the controls tie."""
    return None if pos == neg else (value - neg) / (pos - neg)


def _paired(runs: Sequence[Run], task: str, metric: str) -> Optional[List[List[float]]]:
    """The runs' per-example scores in one document order, or ``None`` unless every run has them for the same
    documents."""
    per_run = [run.examples.get(task, {}).get(metric) for run in runs]
    if any(per_doc is None for per_doc in per_run) or len({frozenset(per_doc) for per_doc in per_run}) != 1:
        return None
    docs = sorted(per_run[0])
    return [[per_doc[d] for d in docs] for per_doc in per_run]


def comparison_rows(runs: Sequence[Run], *, iters: int = BOOTSTRAP_ITERS, seed: int = 0) -> List[Dict[str, Any]]:
    """One row per task and metric: each run's value and, for scores, each run's gap share when exactly one
    ``pos_control`` and one ``neg_control`` run scored that task, on the same documents as the run
    (:func:`document_differences`); with ``iters`` > 0, bootstrap intervals of the scores (``intervals``) and gap
    shares (``gap_share_intervals``) where the per-example scores allow."""
    rows = []
    tasks = sorted({task for run in runs for task in run.scores})
    for task in tasks:
        metrics = sorted({m for run in runs for m in run.scores.get(task, {})})
        controls = {
            mode: [r for r in runs if r.mode == mode and task in r.scores] for mode in ("pos_control", "neg_control")
        }
        pos, neg = controls["pos_control"], controls["neg_control"]
        one_pair = len(pos) == 1 and len(neg) == 1
        same_documents = {  # the runs that scored the controls' documents: the only ones given a gap share
            r.label for r in runs if one_pair and not document_differences([r, pos[0], neg[0]], task)
        }
        for metric in metrics:
            values = {r.label: r.scores.get(task, {}).get(metric) for r in runs}
            row: Dict[str, Any] = {
                "task": task,
                "metric": metric,
                "values": values,
                "gap_share": {},
                "intervals": {},
                "gap_share_intervals": {},
            }
            if metric in COST_METRICS:
                rows.append(row)
                continue
            if iters > 0:
                row["intervals"] = {
                    r.label: mean_interval(list(per_doc.values()), iters=iters, seed=seed)
                    for r in runs
                    if (per_doc := r.examples.get(task, {}).get(metric))
                }
            if one_pair:
                p, n = pos[0].scores[task].get(metric), neg[0].scores[task].get(metric)
                if p is not None and n is not None:
                    shared = [
                        r
                        for r in runs
                        if r.mode not in ("pos_control", "neg_control")
                        and values[r.label] is not None
                        and r.label in same_documents
                    ]
                    row["gap_share"] = {r.label: gap_share(values[r.label], p, n) for r in shared}
                    paired = {r.label: _paired([r, pos[0], neg[0]], task, metric) for r in shared} if iters > 0 else {}
                    row["gap_share_intervals"] = {
                        label: gap_share_interval(*scores, iters=iters, seed=seed)
                        for label, scores in paired.items()
                        if scores
                    }
            rows.append(row)
    return rows


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _cell(value: Optional[float], interval: Optional[Interval] = None) -> str:
    if value is None:
        return "-"
    return _number(value) if interval is None else f"{_number(value)} [{_number(interval[0])}, {_number(interval[1])}]"


def render_markdown(runs: Sequence[Run], rows: Sequence[Dict[str, Any]]) -> str:
    """The comparison as a Markdown table, with the files it was read from."""
    shared = [r.label for r in runs if r.mode not in ("pos_control", "neg_control")]
    header = ["task", "metric", *[r.label for r in runs], *[f"gap share: {label}" for label in shared]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row["task"],
            row["metric"],
            *[_cell(row["values"][r.label], row["intervals"].get(r.label)) for r in runs],
        ]
        cells += [_cell(row["gap_share"].get(label), row["gap_share_intervals"].get(label)) for label in shared]
        lines.append("| " + " | ".join(cells) + " |")
    sources = "\n".join(f"- {r.label}: `{r.path}`" + "".join(f"\n  - {note}" for note in r.notes) for r in runs)
    differences = {task: document_differences(runs, task) for task in sorted({row["task"] for row in rows})}
    warnings = [
        f"**{task} was scored on other documents by some runs** (not comparable; no gap share between them): "
        + "; ".join(found)
        for task, found in differences.items()
        if found
    ]
    note = (
        "Gap share = (run - neg_control) / (pos_control - neg_control), per score: 1 keeps all of the full prompt's "
        "lead over no prompt, 0 none. compression_ratio = prompt tokens per token kept; kv_bytes = keys/values held "
        "per example."
    )
    if any(row["intervals"] for row in rows):
        note += (
            " [low, high]: 95% bootstrap interval over the examples (runs and controls resampled together); scores "
            "without one had no per-example scores beside their results (lm-eval's --log_samples)."
        )
    reference = paper_reference(rows)
    return "\n".join(
        [
            *lines,
            "",
            *[w + "\n" for w in warnings],
            note,
            "",
            *([reference, ""] if reference else []),
            "Runs:",
            sources,
            "",
        ]
    )


def paper_reference(rows: Sequence[Dict[str, Any]]) -> str:
    """The paper's LLaMA-7B ROUGE-L for the Alpaca+ splits among ``rows`` (Markdown; empty if none)."""
    paper = PAPER_LLAMA_7B_ROUGE_L
    splits = [
        split
        for split in paper["gist1"]
        if any(r["task"] == f"alpaca_plus_{split}" and r["metric"] == "rougeL" for r in rows)
    ]
    if not splits:
        return ""
    lines = [
        "Mu et al. (2023), LLaMA-7B, ROUGE-L (x 100), for scale:",
        "",
        "| split | neg_control | gist-1 | pos_control | gap share: gist-1 |",
        "|---|---|---|---|---|",
    ]
    for split in splits:
        neg, gist, pos = (paper[key][split] for key in ("neg_control", "gist1", "pos_control"))
        lines.append(f"| alpaca_plus_{split} | {neg} | {gist} | {pos} | {_number(gap_share(gist, pos, neg))} |")
    return "\n".join(lines)


def plot(runs: Sequence[Run], rows: Sequence[Dict[str, Any]], path: Path) -> Path:
    """Bar chart of every score (cost metrics left out), one bar per run with its bootstrap interval where there is
    one, written atomically as PNG."""
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
        intervals = [row["intervals"].get(run.label) for row in scores]
        errors = None
        if any(intervals):
            errors = [
                [max(0.0, h - i[0]) if i else float("nan") for h, i in zip(heights, intervals)],  # rounding:
                [max(0.0, i[1] - h) if i else float("nan") for h, i in zip(heights, intervals)],
            ]  # never < 0
        ratio = next((values[run.label] for values in ratios.values() if values.get(run.label) is not None), None)
        ax.bar(
            xs,
            heights,
            width,
            yerr=errors,
            capsize=3,
            error_kw={"elinewidth": 1},
            label=run.label if ratio is None else f"{run.label} ({ratio:.3g}x compression)",
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(scores))])
    ax.set_xticklabels([f"{row['task']}\n{row['metric']}" for row in scores], fontsize=8)
    ax.set_ylabel("score")
    ax.set_title(
        "lm-eval scores by mode" + (" (95% bootstrap intervals)" if any(row["intervals"] for row in scores) else "")
    )
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=min(3, len(runs)), frameon=False)
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Read the runs named on the command line, print the table; with ``--out``, write it and the plot."""
    parser = argparse.ArgumentParser(
        prog="python -m torchtune_gist.eval.compare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "results", nargs="+", type=Path, help="results_*.json files or lm-eval --output_path directories"
    )
    parser.add_argument("--out", type=Path, default=None, help="directory for comparison.md and comparison.png")
    parser.add_argument(
        "--bootstrap-iters",
        type=int,
        default=BOOTSTRAP_ITERS,
        help=f"resamples for the 95%% intervals (default {BOOTSTRAP_ITERS}; 0: no intervals)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling (default 0)")
    args = parser.parse_args(argv)
    if args.bootstrap_iters < 0:
        parser.error(f"--bootstrap-iters={args.bootstrap_iters} must be >= 0")
    try:
        runs = label_runs([load_run(f) for f in results_files(args.results)])
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    rows = comparison_rows(runs, iters=args.bootstrap_iters, seed=args.seed)
    report = render_markdown(runs, rows)
    print(report)
    if args.out is not None:
        atomic_write_text(report, args.out / "comparison.md")
        plot(runs, rows, args.out / "comparison.png")
        print(f"Wrote {args.out / 'comparison.md'} and {args.out / 'comparison.png'}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
