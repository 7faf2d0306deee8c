"""lm-eval integration: the ``torchtune_gist`` model and the gist tasks (passkey, Alpaca+).

Importing this package registers the model with lm-eval. From the command line use
``python -m torchtune_gist.eval`` with lm-eval's own arguments (it adds the shipped tasks to
``--include_path``)::

    python -m torchtune_gist.eval run --model torchtune_gist \\
        --model_args config=configs/llama3_1/8B_gist_lora.yaml,checkpoint_dir=/tmp/out/epoch_2,mode=gist \\
        --tasks alpaca_plus --metadata data_dir=/data/alpaca_plus --device cuda

From Python, pass a :class:`TorchtuneGistLM` to ``lm_eval.simple_evaluate`` with
``task_manager=gist_task_manager(...)``. ``python -m torchtune_gist.eval.compare`` puts the results files of several
runs (gist and the controls) side by side, with the share of the control gap each keeps.
"""

from torchtune_gist.eval._model import (
    GistGeneration,
    TorchtuneGistLM,
    kept_ratio,
    load_config,
    load_tokenizer,
    response_settings,
)
from torchtune_gist.eval._tasks import (
    ALPACA_PLUS_ENV,
    ALPACA_PLUS_URL,
    GIST_MARKER,
    ROUGE_TYPES,
    TASKS_DIR,
    GistPasskeyTask,
    alpaca_plus_dataset,
    alpaca_plus_doc_to_text,
    alpaca_plus_process_results,
    check_task_settings,
    gist_task_manager,
    passkey_dataset,
    passkey_doc_to_text,
    passkey_exact_match,
    passkey_process_results,
    rouge_scores,
)

__all__ = [
    "ALPACA_PLUS_ENV",
    "ALPACA_PLUS_URL",
    "GIST_MARKER",
    "ROUGE_TYPES",
    "TASKS_DIR",
    "GistGeneration",
    "GistPasskeyTask",
    "TorchtuneGistLM",
    "alpaca_plus_dataset",
    "alpaca_plus_doc_to_text",
    "alpaca_plus_process_results",
    "check_task_settings",
    "gist_task_manager",
    "kept_ratio",
    "load_config",
    "load_tokenizer",
    "response_settings",
    "passkey_dataset",
    "passkey_doc_to_text",
    "passkey_exact_match",
    "passkey_process_results",
    "rouge_scores",
]
