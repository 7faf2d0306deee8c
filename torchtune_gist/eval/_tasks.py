"""The lm-eval tasks' Python side: dataset builders, prompts, scoring and the passkey task class.

The task YAMLs in ``tasks/`` refer to these functions with ``!function``. Every prompt holds
:data:`GIST_MARKER` exactly where the K gist tokens go; the ``torchtune_gist`` model splits the
prompt there (what precedes is compressed, what follows is the continuation).

Task settings come from the YAML ``metadata`` and can be overridden with lm-eval's ``--metadata``
(or ``TaskManager(metadata=...)``). lm-eval hands a ``custom_dataset`` builder every metadata key,
``--model_args`` included, so the builders take ``**unused``; one of those that reads like a misspelt setting
(``contxt_tokens``) is refused rather than ignored.

Metrics (all aggregated with a mean):

- ``alpaca_plus_*``: ``rouge1``, ``rouge2``, ``rougeL`` (F1 from rouge-score with stemming, in
  ``[0, 1]``: multiply by 100 to compare with the paper's tables).
- ``gist_passkey*``: ``acc`` (exact match of the first number in the output with the passkey) and
  ``acc_{L}`` for each target context length ``L``.
- both: ``compression_ratio`` (prompt tokens before the gists per token the mode keeps of them: / K for
  ``gist`` and ``truncate``, 1.0 for ``pos_control``, none for ``neg_control``) and ``kv_bytes`` (each
  example's own keys/values while generating, independent of the batch size), as reported by the
  ``torchtune_gist`` model with each output (see :class:`torchtune_gist.eval.GistGeneration`); other
  models report neither.
"""

import difflib
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import datasets
from lm_eval.api.metrics import mean
from lm_eval.api.task import ConfigurableTask
from rouge_score import rouge_scorer, tokenizers

from torchtune_gist.data import alpaca_plus_filename, make_passkey_samples
from torchtune_gist.data._alpaca_plus import read_json_list

#: Where the gist tokens go in a task's prompt; the model splits the prompt here.
GIST_MARKER = "<GIST>"
#: The shipped task YAMLs (pass to ``--include_path`` / ``TaskManager(include_path=...)``).
TASKS_DIR = Path(__file__).parent / "tasks"
#: Environment variable naming the Alpaca+ data location (a directory or a URL prefix).
ALPACA_PLUS_ENV = "TORCHTUNE_GIST_ALPACA_PLUS"
#: The official Alpaca+ evaluation files (jayelm/gisting, ``data/alpaca_plus/``).
ALPACA_PLUS_URL = "https://raw.githubusercontent.com/jayelm/gisting/main/data/alpaca_plus"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")

# The tokenizer is given, not defaulted: rouge-score logs its default through absl, which then configures the root
# logger (logging.basicConfig) on import, and every torchtune log line of the importing program would print twice.
_SCORER = rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=tokenizers.DefaultTokenizer(use_stemmer=True))
_NUMBER = re.compile(r"\d+")


def rouge_scores(prediction: str, reference: str) -> Dict[str, float]:
    """ROUGE-1/2/L F1 of ``prediction`` against ``reference`` (rouge-score, Porter stemming).

    Returns:
        Dict[str, float]: ``rouge1``, ``rouge2``, ``rougeL`` in ``[0, 1]``.
    """
    scores = _SCORER.score(reference, prediction)
    return {name: scores[name].fmeasure for name in ROUGE_TYPES}


def passkey_exact_match(prediction: str, passkey: str) -> float:
    """1.0 if the first number in ``prediction`` is exactly ``passkey``, else 0.0."""
    found = _NUMBER.search(prediction)
    return float(found is not None and found.group() == str(passkey))


def _gist_metrics(response: str) -> Dict[str, float]:
    """``compression_ratio`` (what the mode kept of the prompt; none for ``neg_control``) and ``kv_bytes``, as
    the ``torchtune_gist`` model reports them with its response; nothing for another model's plain text."""
    metrics = {}
    ratio = getattr(response, "compression_ratio", None)
    if ratio is not None:
        metrics["compression_ratio"] = float(ratio)
    kv_bytes = getattr(response, "kv_bytes", None)
    if kv_bytes is not None:
        metrics["kv_bytes"] = float(kv_bytes)
    return metrics


# ----------------------------------------------------------------------------------- Alpaca+


#: The settings the gist tasks' builders read from the task metadata.
TASK_SETTINGS = (
    "data_dir",
    "tokenizer",
    "config",
    "context_tokens",
    "depths",
    "num_samples",
    "passkey_digits",
    "seed",
    "num_gist_tokens",
)


def check_task_settings(unused: Mapping[str, Any]) -> None:
    """Refuse a metadata key that the builders do not read but is close to one they do (``contxt_tokens``,
    ``depth``): it would otherwise be ignored and the task run on its defaults. Other keys (lm-eval's, any model's
    ``--model_args``) pass, since lm-eval hands the builders all of them.

    Raises:
        ValueError: naming each such key and the setting it is close to.
    """
    unknown = [key for key in unused if key not in TASK_SETTINGS]  # another task's setting is fine
    close = {key: difflib.get_close_matches(key, TASK_SETTINGS, n=1, cutoff=0.8) for key in unknown}
    misspelt = [f"{key} (did you mean {match[0]}?)" for key, match in close.items() if match]
    if misspelt:
        raise ValueError(
            f"the gist tasks read no metadata {', '.join(misspelt)}: fix the spelling in --metadata (or the config's "
            f"metadata). Their settings: {', '.join(TASK_SETTINGS)}"
        )


def _read_alpaca_plus(location: str, split: str) -> List[Dict[str, Any]]:
    name = alpaca_plus_filename(split)
    if re.match(r"^[a-z]+://", location):
        url = f"{location.rstrip('/')}/{name}"
        try:
            return list(datasets.load_dataset("json", data_files=url, split="train"))
        except OSError as err:
            raise FileNotFoundError(
                f"cannot read Alpaca+ {url} ({err}): offline, set the task metadata data_dir "
                f"(--metadata data_dir=DIR) or ${ALPACA_PLUS_ENV} to a directory holding {name}"
            ) from err
    path = Path(location).expanduser() / name
    if not path.is_file():
        raise FileNotFoundError(
            f"Alpaca+ file {path} not found: set the task metadata data_dir (--metadata data_dir=DIR) or "
            f"${ALPACA_PLUS_ENV} to a directory holding {name}, or to a URL prefix such as {ALPACA_PLUS_URL}"
        )
    records = read_json_list(path)
    for i, record in enumerate(records):
        bad = [
            f
            for f in ("instruction", "input", "output")
            if not isinstance(record, dict) or not isinstance(record.get(f), str)
        ]
        if bad:
            raise ValueError(f"{path}: record {i} lacks string field(s) {bad}")
    return records


def alpaca_plus_dataset(
    *, alpaca_plus_split: str, data_dir: Optional[str] = None, **unused: Any
) -> datasets.DatasetDict:
    """An Alpaca+ validation split as lm-eval's ``custom_dataset`` (split ``test``).

    Args:
        alpaca_plus_split (str): ``validation_seen``, ``validation_unseen`` or ``validation_human``.
        data_dir (Optional[str]): a directory holding ``alpaca_plus_{split}.json`` or a URL prefix;
            default ``$TORCHTUNE_GIST_ALPACA_PLUS``, else the official files at :data:`ALPACA_PLUS_URL`.
        **unused (Any): other task metadata (lm-eval passes all of it, model arguments included).

    Returns:
        datasets.DatasetDict: ``{"test": records with instruction, input, output, source}``.

    Raises:
        FileNotFoundError: if a local file is missing.
        ValueError: on an unknown split, a malformed file or a misspelt setting.
    """
    check_task_settings(unused)
    location = data_dir or os.environ.get(ALPACA_PLUS_ENV) or ALPACA_PLUS_URL
    records = _read_alpaca_plus(str(location), alpaca_plus_split)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})


def alpaca_plus_doc_to_text(doc: Mapping[str, Any]) -> str:
    """The paper's plain template with :data:`GIST_MARKER` where the gists go.

    ``Instruction: {instruction}\\n<GIST>\\nInput: {input}\\nOutput:`` (without the ``Input:`` line
    when the input is empty), matching ``torchtune_gist.data``'s ``template="plain"`` token layout.
    """
    tail = f"\nInput: {doc['input']}\nOutput:" if doc["input"] else "\nOutput:"
    return f"Instruction: {doc['instruction']}\n{GIST_MARKER}{tail}"


def alpaca_plus_process_results(doc: Mapping[str, Any], results: Sequence[str]) -> Dict[str, float]:
    """ROUGE-1/2/L of the generated output against the reference, and the gist metrics."""
    response = results[0]
    return {**rouge_scores(response.strip(), doc["output"]), **_gist_metrics(response)}


# ----------------------------------------------------------------------------------- passkey


# The passkey tasks' default seed: the training configs generate their records with seed 0.
EVAL_SEED = 1234


def _as_list(value: Union[int, float, Sequence[Any], None]) -> Optional[List[Any]]:
    if value is None or isinstance(value, (list, tuple)):
        return None if value is None else list(value)
    return [value]


def passkey_dataset(
    *,
    passkey_language: str,
    tokenizer: Any = None,
    config: Optional[str] = None,
    context_tokens: Union[int, Sequence[int]] = 3000,
    depths: Union[float, Sequence[float], None] = None,
    num_samples: int = 100,
    passkey_digits: int = 5,
    seed: int = EVAL_SEED,
    num_gist_tokens: Optional[int] = None,
    **unused: Any,
) -> datasets.DatasetDict:
    """Passkey records generated locally (``torchtune_gist.data.make_passkey_samples``), split ``test``.

    Lengths are counted in the model's tokens, so a tokenizer is needed: ``tokenizer`` (an object,
    e.g. ``TaskManager(metadata={"tokenizer": tok})``) or ``config``, a torchtune config whose
    ``tokenizer`` section is instantiated (through ``python -m torchtune_gist.eval`` lm-eval passes
    the model's ``config=`` argument here by itself).

    Args:
        passkey_language (str): ``en`` or ``ko`` (set by the task YAML).
        tokenizer (Any): the model's tokenizer.
        config (Optional[str]): path of a torchtune config with a ``tokenizer`` section.
        context_tokens (Union[int, Sequence[int]]): context length(s) in tokens, used in turn.
        depths (Union[float, Sequence[float], None]): needle depth(s) in ``[0, 1]``, used in turn;
            ``None``: random.
        num_samples (int): number of records.
        passkey_digits (int): passkey length.
        seed (int): generation seed; not a training dataset's (records of one seed overlap). Default
            :data:`EVAL_SEED`.
        num_gist_tokens (Optional[int]): K, for the records' own ``compression_ratio``.
        **unused (Any): other task metadata (lm-eval passes all of it).

    Returns:
        datasets.DatasetDict: ``{"test": records}`` with ``context``, ``question``, ``answer``,
        ``passkey``, ``depth``, ``context_tokens``, ``target_context_tokens``, ``compression_ratio``.

    Raises:
        ValueError: without a tokenizer, or on a bad or misspelt setting.
    """
    check_task_settings(unused)
    if tokenizer is None:
        if config is None:
            raise ValueError(
                "the passkey tasks count context lengths in the model's tokens and need a tokenizer: pass "
                "model_args config=<torchtune config> (python -m torchtune_gist.eval does), --metadata "
                "config=<torchtune config>, or TaskManager(metadata={'tokenizer': tokenizer})"
            )
        from torchtune_gist.eval._model import load_tokenizer

        tokenizer = load_tokenizer(config)
    records = make_passkey_samples(
        tokenizer,
        num_samples,
        context_tokens=_as_list(context_tokens),
        depths=_as_list(depths),
        passkey_digits=passkey_digits,
        language=passkey_language,
        seed=seed,
        num_gist_tokens=num_gist_tokens,
    )
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})


def passkey_doc_to_text(doc: Mapping[str, Any]) -> str:
    """``{context}<GIST>\\n{question}\\n``: the passkey training layout with the marker for the gists."""
    return f"{doc['context']}{GIST_MARKER}\n{doc['question']}\n"


def passkey_process_results(doc: Mapping[str, Any], results: Sequence[str]) -> Dict[str, float]:
    """``acc``, ``acc_{L}`` (L = the record's target context length) and the gist metrics."""
    response = results[0]
    acc = passkey_exact_match(response, doc["passkey"])
    return {"acc": acc, f"acc_{doc['target_context_tokens']}": acc, **_gist_metrics(response)}


class GistPasskeyTask(ConfigurableTask):
    """lm-eval's YAML task plus a mean-aggregated ``acc_{L}`` for each context length ``L`` in its data."""

    def __init__(self, config: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(config={k: v for k, v in (config or {}).items() if k != "class"})

    def _length_metrics(self) -> List[str]:
        return [f"acc_{n}" for n in sorted(set(self.dataset["test"]["target_context_tokens"]))]

    def aggregation(self) -> Dict[str, Any]:
        return {**super().aggregation(), **{name: mean for name in self._length_metrics()}}

    def higher_is_better(self) -> Dict[str, bool]:
        return {**super().higher_is_better(), **{name: True for name in self._length_metrics()}}


def gist_task_manager(
    include_path: Union[str, Path, Sequence[Union[str, Path]], None] = None,
    *,
    include_defaults: bool = False,
    **metadata: Any,
) -> Any:
    """An lm-eval ``TaskManager`` that knows the shipped tasks, with ``metadata`` for them.

    Args:
        include_path (Union[str, Path, Sequence[Union[str, Path]], None]): more task directories.
        include_defaults (bool): also index lm-eval's built-in tasks (slow: thousands of YAMLs).
        **metadata (Any): task settings, e.g. ``tokenizer``, ``context_tokens``, ``data_dir``.

    Returns:
        lm_eval.tasks.TaskManager: for ``simple_evaluate(..., task_manager=...)``.

    Example:
        >>> tm = gist_task_manager(tokenizer=lm.tokenizer, num_samples=4, context_tokens=[64])
        >>> lm_eval.simple_evaluate(model=lm, tasks=["gist_passkey"], task_manager=tm, limit=2)
    """
    from lm_eval.tasks import TaskManager

    extra = (
        [] if include_path is None else [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
    )
    return TaskManager(
        include_path=[str(TASKS_DIR), *map(str, extra)], include_defaults=include_defaults, metadata=metadata
    )
