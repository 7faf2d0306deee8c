"""``python -m torchtune_gist.eval ...``: lm-eval's command line with the ``torchtune_gist`` model
registered and the shipped tasks on the include path. Takes exactly lm-eval's arguments
(``run``, ``ls``, ``validate``; a user's own ``--include_path`` is kept next to ours). Refuses, with a
message, the ``run`` options the gist model cannot honour: ``--num_fewshot`` (one prompt per request is
compressed), ``--apply_chat_template`` (the tasks lay prompts out as training did), a ``--limit`` below 1,
``--model_args`` keys the model does not take and ``--metadata`` keys that read like misspelt task settings; and,
before the evaluation rather than after it, an ``--output_path`` that cannot be written. A ``torchtune_gist`` run's
files land in ``--output_path``'s subfolder named after its mode and checkpoint (lm-eval names it after a
``pretrained=`` argument, and draws a random name without one); without ``--device`` it runs on its config's
``device`` (lm-eval would put its own default, ``cuda:0``, in its place)."""

import argparse
import sys
from pathlib import Path
from typing import Any, Dict

from lm_eval._cli import HarnessCLI
from lm_eval.utils import sanitize_model_name, setup_logging, simple_parse_args_string
from omegaconf import OmegaConf

from torchtune_gist._io import unwritable_reason
from torchtune_gist.eval import TASKS_DIR, check_task_settings
from torchtune_gist.eval._model import AUTO_BATCH_SIZE_REFUSED, unknown_model_args


def refused_option(args: argparse.Namespace) -> str:
    """What in lm-eval's parsed ``args`` the torchtune_gist model cannot honour or lm-eval could not write, or ``""``.

    lm-eval writes ``--output_path`` (a directory, or a ``.json`` file name) only after the evaluation, and a path it
    cannot create is then logged, not raised: the results file would be lost.
    """
    if getattr(args, "num_fewshot", None):
        return (
            f"--num_fewshot {args.num_fewshot} is not supported: a gist request compresses one prompt (few-shot "
            "examples would put one gist marker per example in a context)"
        )
    if getattr(args, "apply_chat_template", None):
        return (
            "--apply_chat_template is not supported: the gist tasks lay prompts out as the gist training data "
            "did (a chat format belongs in the torchtune config's tokenizer and prompt template)"
        )
    model_args = getattr(args, "model_args", None)
    if getattr(args, "model", None) == "torchtune_gist":
        if str(getattr(args, "batch_size", "")).startswith("auto"):
            return f"--batch_size {args.batch_size}: {AUTO_BATCH_SIZE_REFUSED}"
        problem = unknown_model_args(model_args) if isinstance(model_args, dict) else ""
        if problem:
            return problem
    metadata = getattr(args, "metadata", None)
    if isinstance(metadata, dict):
        try:
            check_task_settings(metadata)
        except ValueError as e:
            return f"--metadata: {e}"
    limit = getattr(args, "limit", None)
    if limit is not None and limit <= 0:
        return f"--limit {limit:g} leaves no examples: give a count >= 1 or a fraction in (0, 1]"
    output_path = getattr(args, "output_path", None)
    if output_path:
        directory = Path(output_path).parent if Path(output_path).suffix == ".json" else Path(output_path)
        problem = unwritable_reason(directory, directory=True)
        if problem:
            return f"--output_path {output_path}: {problem}"
    return ""


def _model_args(model_args: Any) -> Dict[str, Any]:
    return model_args if isinstance(model_args, dict) else simple_parse_args_string(model_args or "")


def default_device(model_args: Any) -> str:
    """The device of a ``torchtune_gist`` run given no ``--device``: ``device`` in ``--model_args``, else the
    torchtune config's ``device``, else ``cpu``."""
    args = _model_args(model_args)
    if args.get("device"):
        return str(args["device"])
    config = Path(str(args.get("config", "")))
    device = OmegaConf.load(config).get("device") if config.is_file() else None
    return str(device or "cpu")


def run_folder(model_args: Any) -> str:
    """The ``--output_path`` subfolder of a ``torchtune_gist`` run: ``<mode>`` or ``<mode>__<checkpoint_dir>``, the
    path written as lm-eval writes a model name (``/`` -> ``__``)."""
    args = _model_args(model_args)
    checkpoint = str(args.get("checkpoint_dir") or "")
    return "__".join(
        part for part in (str(args.get("mode", "gist")), sanitize_model_name(checkpoint).strip("_")) if part
    )


def main() -> None:
    """Parse ``sys.argv`` with lm-eval's parser, add the task directory, run the subcommand."""
    setup_logging()
    parser = HarnessCLI()
    args = parser.parse_args()
    problem = refused_option(args)
    if problem:
        sys.exit(f"python -m torchtune_gist.eval: {problem}")
    if getattr(args, "model", None) == "torchtune_gist":
        output_path = getattr(args, "output_path", None)
        if output_path and Path(output_path).suffix != ".json":
            args.output_path = str(Path(output_path) / run_folder(args.model_args) / "results.json")
        if hasattr(args, "device") and not args.device:
            args.device = default_device(args.model_args)
    if hasattr(args, "include_path"):
        args.include_path = [str(TASKS_DIR)] + ([args.include_path] if args.include_path else [])
    parser.execute(args)


if __name__ == "__main__":
    main()
