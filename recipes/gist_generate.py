"""Generate with a gist-compressed prompt: compress the prompt into K gist tokens once, then answer from them.

Usage::

    tune run gist_generate --config configs/tiny/gist_generate.yaml \\
        prompt="The pass key is 4242. Remember it." input="What is the pass key?"
    tune run gist_generate --config configs/tiny/gist_generate.yaml prompt_file=haystack.txt \\
        input="What is the pass key?"
    tune run gist_generate --config configs/llama3_1/8B_gist_generate.yaml \\
        prompt="Translate to French." input="The cat sleeps." save_cache=/tmp/translate.safetensors
    tune run gist_generate --config configs/llama3_1/8B_gist_generate.yaml \\
        load_cache=/tmp/translate.safetensors input="The dog barks."
    tune run gist_generate --config configs/llama3_1/8B_gist_generate.yaml \\
        prompt="Translate to French." inputs_file=sentences.txt   # compress once, answer every line
    tune run gist_generate --config configs/llama3_1/8B_gist_generate.yaml \\
        prompt="Translate to French." inputs_file=sentences.txt outputs_file=french.jsonl   # resumable, as JSON lines

The base weights come through a torchtune checkpointer, the gist rows and LoRA weights from
``gist_checkpoint_dir`` (a checkpoint directory with the ``gist_adapter.safetensors`` the gist fine-tuning recipes
write, or the file); or ``gist_checkpoint_dir`` is a merged export (``hf_merged/``), which holds all the weights.
``prompt_transform`` lays out the tokens exactly as in training (``GistInstructTransform``:
``prompt`` is the instruction, ``input`` the input; ``GistPasskeyTransform``: ``prompt`` is the
context, ``input`` the question). Everything before the gist span is compressed; the rest is
the continuation that is fed after the cached gist entries. A saved cache is reused with
``load_cache`` (``prompt`` is then ignored) after checking that it was made by this model with this prompt layout.

OmegaConf reads ``prompt=...`` / ``input=...`` on the command line as YAML: newlines fold, `` #``
starts a comment (refused: the text would be cut), ``Note: x`` becomes a mapping and ``12345`` a number; tune
refuses a value holding ``=``. Quote such text for YAML (``'prompt="12345"'``), or put it in a file:
``prompt_file=PATH`` / ``input_file=PATH`` (UTF-8, taken as is but for one final newline; a file replaces the
config's ``prompt`` / ``input``; two ways to give one text on the same command line are refused).
``inputs_file=PATH`` (one input per line, blank lines skipped; it replaces the config's ``input``) answers many
inputs from the one compressed prompt, ``batch_size`` (default 8) at a time: the prompt is compressed once, whatever
the count.
``outputs_file=PATH`` also writes the answers there, one JSON object per line and input (``input``, ``output``,
``kv_bytes``), once all are answered; meanwhile each batch's answers are appended to ``PATH.partial``, and the same
command run again after an interruption answers only the inputs not answered yet (greedy answers are then those of an
uninterrupted run; sampled ones are new draws). Other settings (prompt, weights, model, sampling) start it over,
the old answers moved to ``PATH.partial.previous`` (``.previous.2``, ... where taken).

Prints the output (for several inputs, each after a ``[i/n] input`` line, as each batch finishes), the compression
ratio (prompt tokens / K) and the KV bytes each answer held while generating, with the gist cache and as a
full-prompt run would hold them.
"""

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training, utils
from tqdm import tqdm

from torchtune_gist._cli import user_errors
from torchtune_gist._io import atomic_write_text, unwritable_reason
from torchtune_gist._responses import ResponseLog, file_fingerprint
from torchtune_gist.checkpointing import check_not_merged_export
from torchtune_gist.generation import GistCache, compress, generate_from_cache
from torchtune_gist.loading import load_base, load_gist_checkpoint
from torchtune_gist.modules import init_gist_embeddings
from torchtune_gist.training import (
    GENERATE_KEYS,
    GENERATE_OPTIONAL_KEYS,
    build_tokenizer,
    check_components,
    check_dataset_gist_ids,
    check_gist_setup,
    check_input_files,
    check_known_keys,
    check_required_keys,
    check_setting_types,
    count_setting,
    flag_setting,
    get_device,
)

log = utils.get_logger("INFO")


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def read_text_setting(cfg: DictConfig, key: str) -> Optional[str]:
    """The text of the UTF-8 file named by ``<key>_file`` (less one final newline) if set, else of config
    key ``key`` (``prompt`` / ``input``); ``None`` if neither is set.

    Raises:
        ValueError: if ``key`` was read as something other than text.
        FileNotFoundError: if the ``<key>_file`` does not exist.
    """
    file_key = f"{key}_file"
    value, path = cfg.get(key), cfg.get(file_key)
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{file_key}={path}: no such file")
        return Path(path).read_text(encoding="utf-8").removesuffix("\n")
    if value is not None and not isinstance(value, str):
        raise ValueError(
            f"{key} was read as {type(value).__name__} {value!r}, not text: OmegaConf parses command-line values "
            f"as YAML; quote the text ('{key}=\"...\"') or put it in a file and pass {file_key}=PATH"
        )
    return value


def check_no_comment_cut(argv: List[str], cfg: DictConfig) -> None:
    """Refuse a ``prompt=`` / ``input=`` command-line text that YAML cut at `` #`` (the rest read as a comment).

    Raises:
        ValueError: naming the text, what was kept of it, and the two ways to pass it whole.
    """
    for key in ("prompt", "input"):
        given = [arg.split("=", 1)[1] for arg in argv if arg.startswith(f"{key}=")]
        value = cfg.get(key)
        if not given or not isinstance(value, str) or " #" not in given[-1]:
            continue
        raw = given[-1]
        if value != raw and raw.split(" #", 1)[0].strip() == value.strip():
            raise ValueError(
                f"{key}={raw!r} was read as {value!r}: YAML takes ' #' and what follows for a comment; quote the "
                f"text ('{key}=\"...\"') or put it in a file and pass {key}_file=PATH"
            )


#: Command-line keys that each give the same text; one of a group wins silently over the others, so only one is taken.
TEXT_SOURCES: Tuple[Tuple[str, ...], ...] = (("prompt", "prompt_file"), ("input", "input_file", "inputs_file"))


def check_one_source_per_text(argv: List[str]) -> None:
    """Refuse a command line that gives the prompt, or the input, more than one way (``input=`` beside
    ``inputs_file=``: the file's lines would be answered and ``input`` dropped without a word).

    Raises:
        ValueError: naming the keys given and which one would be used.
    """
    for group in TEXT_SOURCES:
        given = [key for key in group if any(arg.lstrip("+").startswith(f"{key}=") for arg in argv)]
        if len(given) > 1:
            raise ValueError(
                f"{' and '.join(f'{key}=' for key in given)} on one command line: {given[-1]} would be used and "
                f"{' and '.join(given[:-1])} ignored; give one of them"
            )


def read_inputs(cfg: DictConfig, single: str) -> List[str]:
    """The lines of ``inputs_file`` (UTF-8, blank lines skipped) if set, else ``[single]``.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it holds no input.
    """
    if cfg.get("inputs_file") is None:
        return [single]
    lines = [line.rstrip("\r") for line in read_text_setting(cfg, "inputs").split("\n") if line.strip()]
    if not lines:
        raise ValueError(f"inputs_file={cfg.inputs_file} holds no input: one input per line")
    return lines


def prompt_layout(cfg: DictConfig) -> Dict[str, Any]:
    """What lays the tokens out around the gist span: ``prompt_transform``'s component and ``template`` (if set).
    Recorded in a saved cache: a continuation fed in another layout than its prompt's would read garbage."""
    section = OmegaConf.to_container(cfg.prompt_transform, resolve=True)
    return {k: section[k] for k in ("_component_", "template") if k in section}


def partial_path(outputs_file: str) -> Path:
    """Where the answers of an ``outputs_file`` run are logged until all are answered: ``<outputs_file>.partial``."""
    return Path(f"{outputs_file}.partial")


def answer_settings(cfg: DictConfig, prompt: Optional[str]) -> Dict[str, Any]:
    """What an answer depends on besides its input: the prompt (a hash) or the loaded cache's file, the weights'
    files, the model, tokenizer, checkpointer and prompt layout sections, dtype and the sampling settings."""
    sections = {
        k: OmegaConf.to_container(cfg[k], resolve=True)
        for k in ("model", "tokenizer", "checkpointer", "prompt_transform")
    }
    load_cache = cfg.get("load_cache")
    return {
        "prompt_sha256": None if load_cache else hashlib.sha256((prompt or "").encode()).hexdigest(),
        "load_cache": file_fingerprint(load_cache) if load_cache else None,
        "base_files": file_fingerprint(cfg.checkpointer.get("checkpoint_dir")),
        "gist_checkpoint_files": file_fingerprint(cfg.get("gist_checkpoint_dir") or None),
        **sections,
        **{k: cfg.get(k) for k in ("dtype", "max_new_tokens", "temperature", "top_k", "seed")},
    }


class GistGenerateRecipe:
    """Generation from a gist cache. Config keys: ``model``, ``tokenizer``, ``checkpointer``,
    ``gist_checkpoint_dir``, ``num_gist_tokens``, ``prompt_transform``, ``prompt`` or ``prompt_file``,
    ``input`` or ``input_file`` or ``inputs_file``, ``batch_size``, ``max_new_tokens``, ``temperature``, ``top_k``,
    ``compile``, ``save_cache``, ``load_cache``, ``outputs_file``, ``device``, ``dtype``, ``seed``; any other
    top-level key is refused unless an interpolation reads it."""

    config_keys = GENERATE_KEYS + GENERATE_OPTIONAL_KEYS

    def __init__(self, cfg: DictConfig) -> None:
        check_required_keys(cfg, GENERATE_KEYS, "gist_generate", "configs/llama3_1/8B_gist_generate.yaml")
        check_known_keys(cfg, self.config_keys, "gist_generate")
        check_components(cfg)
        self._prompt = read_text_setting(cfg, "prompt")
        self._inputs = read_inputs(cfg, read_text_setting(cfg, "input") or "")
        self._batch_size = count_setting(cfg, "batch_size", default=8)
        self._compile = flag_setting(cfg, "compile")
        check_setting_types(cfg)
        for key in ("save_cache", "outputs_file"):
            problem = cfg.get(key) and unwritable_reason(cfg[key], directory=False)
            if problem:
                raise ValueError(f"{key}: {problem}")
        self._device = get_device(cfg.device)
        self._dtype = training.get_dtype(dtype=cfg.dtype, device=self._device)
        self._seed = training.set_seed(seed=cfg.get("seed", None))

    def setup(self, cfg: DictConfig) -> None:
        """Build the model, load base weights and the gist adapter, build the tokenizer and prompt layout.

        Raises:
            ValueError: if the model, the tokenizer, ``num_gist_tokens`` and the prompt transform disagree
                on the gist tokens, or the checkpointer reads a merged export.
        """
        check_input_files(cfg)
        check_not_merged_export(cfg.checkpointer.get("checkpoint_dir"))
        with training.set_default_dtype(self._dtype), self._device:
            model = config.instantiate(cfg.model)
        if cfg.get("gist_checkpoint_dir"):
            trained = load_gist_checkpoint(model, cfg, cfg.gist_checkpoint_dir, key="gist_checkpoint_dir") or "gist"
            if trained != "gist":
                log.warning(
                    f"{cfg.gist_checkpoint_dir} was trained with mask_mode={trained}: its gists were not trained to "
                    "hold the prompt"
                )
        else:
            load_base(model, cfg)
            init_gist_embeddings(model)
            log.warning("gist_checkpoint_dir is not set: the gist rows are untrained (the vocabulary mean)")
        self._model = model.eval()
        self._tokenizer = build_tokenizer(cfg)
        self._gist_ids = check_gist_setup(model, self._tokenizer, cfg.num_gist_tokens, "gist")
        self._transform = config.instantiate(cfg.prompt_transform, self._tokenizer)
        check_dataset_gist_ids(self._transform, cfg.prompt_transform, "prompt_transform", self._gist_ids)

    def _answer(
        self, cfg: DictConfig, cache: GistCache, continuations: List[List[int]], log_file: Optional[ResponseLog]
    ) -> Tuple[List[Dict[str, Any]], int]:
        """Answer each input (``continuations``: its tokens after the gist span) from ``cache``, ``batch_size`` at a
        time, printing the answers as each batch finishes; inputs answered in ``log_file`` are read from it, the others
        added to it.

        Returns:
            Tuple[List[Dict[str, Any]], int]: each input's ``{"output": text, "kv_bytes": n}`` and how many were
            computed (not read from the log).
        """
        answers = [None if log_file is None else log_file.get("answer", (x,)) for x in self._inputs]
        todo = [i for i, answer in enumerate(answers) if answer is None]
        rng = torch.Generator(device=self._device).manual_seed(self._seed)
        stops = set(self._tokenizer.stop_tokens)
        n = len(answers)
        batches = [todo[start : start + self._batch_size] for start in range(0, len(todo), self._batch_size)]
        for batch in tqdm(batches, desc="answering", disable=len(batches) <= 1):
            out = generate_from_cache(
                self._model,
                cache.repeat(len(batch)),
                [continuations[i] for i in batch],
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_k=cfg.get("top_k", None),
                stop_tokens=self._tokenizer.stop_tokens,
                pad_id=self._tokenizer.pad_id,
                rng=rng,
                compile=self._compile,
            )
            for i, tokens, kv_bytes in zip(batch, out.tokens, out.row_kv_bytes):
                text = self._tokenizer.decode([t for t in tokens if t not in stops])
                answers[i] = {"output": text, "kv_bytes": kv_bytes}
                if log_file is not None:
                    log_file.add("answer", (self._inputs[i],), answers[i])
                tqdm.write(text if n == 1 else f"[{i + 1}/{n}] {self._inputs[i]}\n{text}")
        return answers, len(todo)

    @torch.no_grad()
    def generate(self, cfg: DictConfig) -> List[str]:
        """Compress (or load) the prompt once, answer every input from it, and report the compression.

        Returns:
            List[str]: the generated text of each input.

        Raises:
            ValueError: without ``prompt`` (or ``prompt_file``) and ``load_cache``, or for a cache made by another model
                or with another prompt layout.
        """
        k = len(self._gist_ids)
        if cfg.get("load_cache"):
            cache = GistCache.load(cfg.load_cache, device=self._device)
            cache.check_compatible(self._model)
            if cache.batch_size != 1:
                raise ValueError(
                    f"{cfg.load_cache} holds {cache.batch_size} compressed prompts; gist_generate takes one"
                )
            saved, layout = cache.fingerprint.get("prompt_layout"), prompt_layout(cfg)
            if saved is not None and saved != layout:
                raise ValueError(
                    f"{cfg.load_cache} was compressed with prompt_transform {saved}, this config lays the input out "
                    f"with {layout}: use the prompt_transform that made the cache, or compress the prompt again"
                )
            encoded = [self._transform.encode_prompt("", user_input) for user_input in self._inputs]
            n_prompt = int(cache.next_pos[0]) - k
        else:
            if not self._prompt:
                raise ValueError("set prompt=... or prompt_file=PATH (the text to compress), or load_cache=PATH")
            encoded = [self._transform.encode_prompt(self._prompt, user_input) for user_input in self._inputs]
            n_prompt = encoded[0]["gist_start"]
            t0 = time.perf_counter()
            cache = compress(self._model, [encoded[0]["tokens"][: n_prompt + k]], gist_token_ids=self._gist_ids)
            cache.fingerprint["prompt_layout"] = prompt_layout(cfg)
            log.info(f"Compressed the prompt into {k} gist tokens in {time.perf_counter() - t0:.2f} s")
        if cfg.get("save_cache"):
            log.info(f"Saved the gist cache to {cache.save(cfg.save_cache)}")
        log_file = None
        if cfg.get("outputs_file"):
            log_file = ResponseLog(partial_path(cfg.outputs_file), answer_settings(cfg, self._prompt))
        t0 = time.perf_counter()
        answers, computed = self._answer(cfg, cache, [e["tokens"][e["gist_start"] + k :] for e in encoded], log_file)
        log.info(f"Generated {computed} answer(s) in {time.perf_counter() - t0:.2f} s from one compressed prompt")
        texts = [a["output"] for a in answers]
        held = [a["kv_bytes"] for a in answers]
        if log_file is not None:
            lines = [json.dumps({"input": x, **a}, ensure_ascii=False) + "\n" for x, a in zip(self._inputs, answers)]
            log.info(f"Wrote the {len(lines)} answer(s) to {atomic_write_text(''.join(lines), cfg.outputs_file)}")
            log_file.remove()
        slot_bytes = cache.nbytes // k  # one entry of one row, every layer
        slots = round(sum(held) / len(held) / slot_bytes)
        each = "" if len(texts) == 1 else ", per answer (mean)"
        n_text = n_prompt - int(encoded[0]["tokens"][:1] == [self._tokenizer.bos_id])  # as lm-eval's runs count it
        log.info(f"Compression: {n_text} prompt tokens (BOS aside) -> K={k} gist tokens ({n_text / k:.1f}x)")
        log.info(
            f"KV held while generating{each}: {_kib(slots * slot_bytes)} with the gist cache ({slots} slots), "
            f"{_kib((slots - k + n_prompt) * slot_bytes)} with the full prompt ({slots - k + n_prompt} slots); the "
            f"gist cache itself: {_kib(cache.nbytes)}"
        )
        return texts


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point: ``tune run gist_generate --config ...``."""
    outputs_file = cfg.get("outputs_file")
    kept = (
        f"The answers so far are kept in {partial_path(outputs_file)}: the same command answers only the rest."
        if outputs_file
        else "(outputs_file=PATH keeps the answers of an interrupted run.)"
    )
    with user_errors("gist_generate", on_interrupt=kept):
        check_one_source_per_text(sys.argv[1:])
        check_no_comment_cut(sys.argv[1:], cfg)
        config.log_config(recipe_name="GistGenerateRecipe", cfg=cfg)
        recipe = GistGenerateRecipe(cfg=cfg)
        recipe.setup(cfg=cfg)
        recipe.generate(cfg=cfg)


if __name__ == "__main__":
    sys.exit(recipe_main())
