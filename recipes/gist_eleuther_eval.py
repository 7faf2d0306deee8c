"""Evaluate gist models with lm-eval the paper's way: the gist run and its controls in one command, side by side.

Usage::

    tune run gist_eleuther_eval --config configs/llama3_1/8B_gist_eval.yaml
    tune run gist_eleuther_eval --config configs/tiny/gist_eval.yaml limit=4

Like torchtune's ``eleuther_eval``, with the ``torchtune_gist`` lm-eval model and the shipped tasks. Each entry of
``runs`` (``mode``: gist / pos_control / neg_control / truncate; ``checkpoint_dir``: the gist adapter or merged
export, none for the base model's controls; ``name``: default the mode) is evaluated on ``tasks`` with the config's
``model``, ``tokenizer`` and ``checkpointer`` (the base weights); ``metadata`` goes to the tasks (``data_dir``,
``num_samples``, ``context_tokens``, ...).

Each run's results are written to ``output_dir/<name>/results.json`` as it finishes, with each task's per-example
scores and answers beside it (``samples_<task>.jsonl``: lm-eval's sample records without the documents). A run whose
results are there (for the same mode, checkpoint and base weight files, model, tokenizer and checkpointer sections,
dtype, max_gen_toks, tasks, limit and metadata: other settings are refused before anything is evaluated, naming
every such run and what changed) is not evaluated again; a run
interrupted midway goes on from the responses it had computed (``responses.jsonl`` in its folder, deleted once its
results are saved). Delete a run's ``results.json``, or use another ``output_dir``, to redo it. Last,
``output_dir/comparison.md`` and ``comparison.png`` put the runs side by side with each score's share of the control gap
and paired 95% bootstrap intervals (:mod:`torchtune_gist.eval.compare`).
"""

import difflib
import gc
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Tuple

import lm_eval
import torch
from lm_eval.utils import make_table
from omegaconf import DictConfig, OmegaConf
from torchtune import config, utils
from torchtune.recipe_interfaces import EvalRecipeInterface

from torchtune_gist._cli import user_errors
from torchtune_gist._io import atomic_write_json, atomic_write_text, unwritable_reason
from torchtune_gist.eval import TorchtuneGistLM, check_task_settings, gist_task_manager, response_settings
from torchtune_gist.eval.compare import (
    comparison_rows,
    document_metadata,
    load_run,
    plot,
    render_markdown,
    samples_path,
)
from torchtune_gist.generation import GENERATION_MODES
from torchtune_gist.training import (
    check_components,
    check_input_files,
    check_known_keys,
    check_required_keys,
    count_setting,
    flag_setting,
)

log = utils.get_logger("INFO")

#: The top-level keys the recipe reads: required, then optional.
EVAL_KEYS = ("model", "tokenizer", "checkpointer", "runs", "tasks", "output_dir")
EVAL_OPTIONAL_KEYS = ("metadata", "limit", "batch_size", "max_gen_toks", "device", "dtype", "compile")

#: Each run's responses as they are computed (an interrupted run goes on from them), deleted once its results are saved.
RESPONSES_FILE = "responses.jsonl"

#: What a per-example record keeps of lm-eval's (the document itself, a whole haystack perhaps, is left out).
SAMPLE_FIELDS = ("doc_id", "target", "filtered_resps", "filter", "metrics")


class _WithoutMetadataHint(logging.Filter):
    """Drops lm-eval's hint to pass task settings with ``--metadata`` (its command line's flag): this recipe takes
    them from its config's ``metadata``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


def sample_lines(samples: List[Dict[str, Any]]) -> str:
    """lm-eval's per-example records of one task as JSON lines: :data:`SAMPLE_FIELDS` and each metric's score."""
    keep = [{**{k: s[k] for k in SAMPLE_FIELDS if k in s}, **{m: s[m] for m in s.get("metrics", ())}} for s in samples]
    return "".join(json.dumps(record, default=str, ensure_ascii=False) + "\n" for record in keep)


def parse_runs(runs: Any) -> List[Dict[str, Any]]:
    """``runs`` as ``[{"name", "mode", "checkpoint_dir"}]`` with unique names.

    Raises:
        ValueError: naming the entry that is not a mapping with a known ``mode``, an unknown key, a gist run without a
            ``checkpoint_dir``, or a repeated name.
    """
    if not isinstance(runs, (list, tuple)) or not runs:
        raise ValueError(f"runs must be a list of {{mode, checkpoint_dir, name}} entries, got {runs!r}")
    parsed = []
    for i, run in enumerate(runs):
        if not isinstance(run, dict) or run.get("mode") not in GENERATION_MODES:
            raise ValueError(f"runs[{i}]={run!r} needs a mode, one of {', '.join(GENERATION_MODES)}")
        unknown = sorted(set(run) - {"mode", "checkpoint_dir", "name"})
        if unknown:
            raise ValueError(f"runs[{i}] has {', '.join(unknown)}: an entry takes mode, checkpoint_dir and name")
        if run["mode"] == "gist" and not run.get("checkpoint_dir"):
            raise ValueError(f"runs[{i}]: mode gist needs a checkpoint_dir (the trained gist rows)")
        parsed.append(
            {
                "name": str(run.get("name") or run["mode"]),
                "mode": run["mode"],
                "checkpoint_dir": run.get("checkpoint_dir"),
            }
        )
    names = [r["name"] for r in parsed]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"runs share the names {', '.join(repeated)}: give each entry its own name")
    return parsed


def check_tasks(tasks: List[str]) -> None:
    """Refuse names that are not shipped tasks here, before any model loads (lm-eval would refuse them only once the
    first run's model had been built).

    Raises:
        ValueError: naming each unknown task, the shipped task it is closest to, and the shipped tasks.
    """
    known = gist_task_manager().all_tasks
    unknown = [task for task in tasks if task not in known]
    if not tasks or unknown:
        named = [
            f"{task} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(task, known, n=1)) else task
            for task in unknown
        ]
        raise ValueError(
            f"tasks: {', '.join(named) + ' is not a' if named else 'no'} task this recipe evaluates; it evaluates "
            f"{', '.join(known)}"
        )


def setting_changes(pairs: List[Tuple[str, Any, Any]]) -> List[str]:
    """``key: old -> new`` for each ``(key, old, new)`` that differs; mappings compared key by key
    (``metadata.num_samples: 150 -> 2``); a file fingerprint (``*_files``) is only said to have changed."""
    changes = []
    for key, old, new in pairs:
        if old == new:
            continue
        if key.endswith("_files"):
            changes.append(f"{key}: changed since (the files were rewritten)")
        elif isinstance(old, dict) and isinstance(new, dict):
            changes += setting_changes([(f"{key}.{k}", old.get(k), new.get(k)) for k in sorted({**old, **new})])
        else:
            changes.append(f"{key}: {_short(old)} -> {_short(new)}")
    return changes


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


class GistEleutherEvalRecipe(EvalRecipeInterface):
    """lm-eval over several runs of a gist model. Config keys: ``model``, ``tokenizer``, ``checkpointer``, ``runs``,
    ``tasks``, ``metadata``, ``limit``, ``batch_size``, ``max_gen_toks``, ``compile``, ``output_dir``, ``device``,
    ``dtype``; any other top-level key is refused unless an interpolation reads it."""

    config_keys = EVAL_KEYS + EVAL_OPTIONAL_KEYS

    def __init__(self, cfg: DictConfig) -> None:
        check_required_keys(cfg, EVAL_KEYS, "gist_eleuther_eval", "configs/llama3_1/8B_gist_eval.yaml")
        check_known_keys(cfg, self.config_keys, "gist_eleuther_eval")
        check_components(cfg)
        self._runs = parse_runs(OmegaConf.to_container(cfg.runs, resolve=True))
        self._tasks = [str(t) for t in (cfg.tasks if OmegaConf.is_list(cfg.tasks) else [cfg.tasks])]
        check_tasks(self._tasks)
        self._metadata = OmegaConf.to_container(cfg.get("metadata") or OmegaConf.create({}), resolve=True)
        check_task_settings(self._metadata)
        self._limit = cfg.get("limit")
        if self._limit is not None and (
            isinstance(self._limit, bool) or not isinstance(self._limit, (int, float)) or self._limit <= 0
        ):
            raise ValueError(
                f"limit={self._limit!r} must be a count >= 1, a fraction in (0, 1], or null for every example"
            )
        self._batch_size = count_setting(cfg, "batch_size", default=8)
        self._max_gen_toks = count_setting(cfg, "max_gen_toks", default=256)
        self._compile = flag_setting(cfg, "compile")
        self._output_dir = Path(cfg.output_dir)

    def setup(self, cfg: DictConfig) -> None:
        """Check the config's files and ``output_dir`` before the first model loads."""
        check_input_files(cfg)
        for run in self._runs:
            if run["checkpoint_dir"] is not None and not Path(run["checkpoint_dir"]).exists():
                raise FileNotFoundError(f"runs: {run['name']}'s checkpoint_dir={run['checkpoint_dir']} does not exist")
        problem = unwritable_reason(self._output_dir, directory=True)
        if problem:
            raise ValueError(f"output_dir: {problem}")
        self._cfg = cfg
        stale = [f"{self._results_path(run)}: {changes}" for run in self._runs if (changes := self._changes(run))]
        if stale:
            raise ValueError(
                "\n  ".join(
                    [
                        "results of these runs were made with other settings than this config's (delete a results.json "
                        "to evaluate its run again, or give this evaluation another output_dir):",
                        *stale,
                    ]
                )
            )

    def _results_path(self, run: Dict[str, Any]) -> Path:
        return self._output_dir / run["name"] / "results.json"

    def _settings(self, run: Dict[str, Any]) -> Dict[str, Any]:
        """What a run's results depend on, recorded in its ``results.json``."""
        evaluated_with = response_settings(
            self._cfg, run["checkpoint_dir"], run["mode"], self._cfg.get("dtype", "fp32"), self._max_gen_toks
        )
        return {
            "model": "torchtune_gist",
            "model_args": {"mode": run["mode"], "checkpoint_dir": run["checkpoint_dir"]},
            "tasks": self._tasks,
            "limit": self._limit,
            "metadata": self._metadata,
            "evaluated_with": json.loads(json.dumps(evaluated_with, default=str)),
        }

    def _changes(self, run: Dict[str, Any]) -> str:
        """How a run's saved results' settings differ from this config's (``key: old -> new; ...``); empty if they
        do not, or there are no results yet."""
        path = self._results_path(run)
        if not path.is_file():
            return ""
        saved, now = load_run(path).settings, self._settings(run)
        before = saved.get("evaluated_with")  # results written before the recipe recorded them say nothing of these
        pairs = [(k, saved.get(k), now[k]) for k in now if k != "evaluated_with"]
        pairs += [(k, before.get(k), now["evaluated_with"].get(k)) for k in sorted(before or {})]
        return "; ".join(setting_changes(pairs))

    def evaluate(self) -> str:
        """Evaluate each run not evaluated yet, then write and return the comparison (Markdown)."""
        for run in self._runs:
            path = self._results_path(run)
            settings = self._settings(run)
            if path.is_file():
                log.info(f"{run['name']}: {path} is there, not evaluated again")
                continue
            log.info(f"{run['name']}: mode={run['mode']}, checkpoint_dir={run['checkpoint_dir']}")
            lm = TorchtuneGistLM(
                config=self._cfg,
                checkpoint_dir=run["checkpoint_dir"],
                mode=run["mode"],
                batch_size=self._batch_size,
                max_gen_toks=self._max_gen_toks,
                responses=str(path.with_name(RESPONSES_FILE)),
                compile=self._compile,
            )
            task_log, hint = logging.getLogger("lm_eval.api.task"), _WithoutMetadataHint()
            task_log.addFilter(hint)
            try:
                results = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=self._tasks,
                    limit=self._limit,
                    log_samples=True,
                    task_manager=gist_task_manager(tokenizer=lm.tokenizer, **self._metadata),
                )
            finally:
                task_log.removeFilter(hint)
            print(make_table(results))
            for task, samples in results["samples"].items():
                atomic_write_text(sample_lines(samples), samples_path(path, task))
            record = {
                "results": results["results"],
                "higher_is_better": results["higher_is_better"],
                "n-samples": results["n-samples"],
                "configs": document_metadata(results["configs"]),
                "config": settings,
            }
            atomic_write_json(record, path)
            lm.response_log.remove()  # the results hold them now; deleting results.json redoes the run afresh
            del lm, results  # free the run's model before the next one loads
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        runs = [replace(load_run(self._output_dir / r["name"] / "results.json"), label=r["name"]) for r in self._runs]
        rows = comparison_rows(runs)
        report = render_markdown(runs, rows)
        atomic_write_text(report, self._output_dir / "comparison.md")
        plot(runs, rows, self._output_dir / "comparison.png")
        print(report)
        log.info(f"Wrote {self._output_dir / 'comparison.md'} and {self._output_dir / 'comparison.png'}")
        return report


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point: ``tune run gist_eleuther_eval --config ...``."""
    kept = (
        f"Each run's responses so far are kept in its folder under {cfg.get('output_dir')} ({RESPONSES_FILE}): the "
        "same command goes on where it stopped."
    )
    with user_errors("gist_eleuther_eval", on_interrupt=kept):
        config.log_config(recipe_name="GistEleutherEvalRecipe", cfg=cfg)
        recipe = GistEleutherEvalRecipe(cfg=cfg)
        recipe.setup(cfg=cfg)
        recipe.evaluate()


if __name__ == "__main__":
    sys.exit(recipe_main())
