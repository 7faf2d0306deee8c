"""The lm-eval model ``torchtune_gist``: a gist-aware torchtune model behind lm-eval's ``LM`` interface.

Every request's context holds :data:`GIST_MARKER` once. The text before it is the prompt, the
text after it the continuation (the input or question; never empty: its last token predicts the first one
scored or generated, where the last gist would read the whole prompt)::

    "Instruction: Reverse the word.\\n<GIST>\\nInput: cat\\nOutput:"
    -> prompt [BOS] enc("Instruction: Reverse the word.\\n") + the K gist ids   (inserted as ids)
       continuation enc("\\nInput: cat\\nOutput:")

which is the token layout of ``torchtune_gist.data`` (BOS when the tokenizer has one). ``mode``
picks what the continuation sees, through the same code (``torchtune_gist.generation.generate``):
``gist`` (the prompt compressed into the K gist keys/values, then dropped), ``pos_control`` (the
full prompt and the gists), ``neg_control`` (neither) or ``truncate`` (the prompt's last K tokens).

``generate_until`` decodes greedily (or samples with ``do_sample``), batched, stops at the
tokenizer's stop tokens or after ``max_gen_toks`` tokens, and cuts the text at the first ``until``
string. Each output is a :class:`GistGeneration`: a ``str`` that also carries the prompt's length,
K, the mode and the example's KV bytes, which the shipped tasks report as metrics. ``loglikelihood`` scores
continuations through the same stores (``torchtune_gist.generation.score_continuations``): in ``gist`` mode the
prompt is compressed and the continuation reads the K cached entries only.
"""

import inspect
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import simple_parse_args_string
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchtune import config as tt_config
from torchtune import training
from tqdm import tqdm

from torchtune_gist._checks import as_positive_int
from torchtune_gist._responses import ResponseLog, file_fingerprint
from torchtune_gist.checkpointing import ADAPTER_FILE, GIST_CONFIG_FILE
from torchtune_gist.eval._tasks import GIST_MARKER
from torchtune_gist.generation import GENERATION_MODES, generate, score_continuations
from torchtune_gist.gist_tokens import gist_token_ids as tokenizer_gist_ids
from torchtune_gist.loading import load_base, load_gist_checkpoint
from torchtune_gist.modules import get_gist_embedding, init_gist_embeddings
from torchtune_gist.training import (
    build_tokenizer,
    check_components,
    check_input_files,
    parse_device,
)

log = logging.getLogger(__name__)

#: Why lm-eval's automatic batch size is refused.
AUTO_BATCH_SIZE_REFUSED = (
    "batch_size=auto is not supported by torchtune_gist (lm-eval finds it by running the model until memory runs out, "
    "which a CPU never reports): give a fixed --batch_size N (8 suits the tiny model on a CPU; a GPU takes more)"
)
_GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k")
#: lm-eval's --model_args cannot override the config's keys.
_CONFIG_EDIT_HINT = (
    "--model_args cannot override a config's keys: point them at the files in a copy of the config (relative paths "
    "are read from the directory lm-eval runs in)"
)


def kept_ratio(mode: str, prompt_tokens: float, num_gist_tokens: int) -> Optional[float]:
    """Prompt tokens per token that ``mode`` keeps of the prompt: the K gists (``gist``), the prompt's last K
    tokens (``truncate``), all of it (``pos_control``: 1.0) or none of it (``neg_control``: ``None``)."""
    kept = {"gist": num_gist_tokens, "truncate": min(num_gist_tokens, prompt_tokens), "pos_control": prompt_tokens}
    return prompt_tokens / kept[mode] if mode in kept and kept[mode] else None


def unknown_model_args(arg_dict: Dict[str, Any]) -> str:
    """What in ``--model_args`` (parsed) :class:`TorchtuneGistLM` does not take, with what it takes, or ``""``
    (Python's own error would name only the first unknown key, from deep inside lm-eval)."""
    takes = [
        n for n in inspect.signature(TorchtuneGistLM.__init__).parameters if n not in ("self", "model", "tokenizer")
    ]
    unknown = [str(k) for k in arg_dict if k not in takes]
    if not unknown:
        return ""
    return f"--model_args {', '.join(unknown)}: torchtune_gist takes no such argument (it takes {', '.join(takes)})"


class GistGeneration(str):
    """Generated text that also carries what the gist model held for it.

    Attributes:
        prompt_tokens (int): tokens before the gist span (BOS excluded): what the gists compress.
        num_gist_tokens (int): K.
        kv_bytes (int): bytes of this example's own keys/values while generating, in this mode (what the
            mode kept of the prompt, the continuation and the new tokens; a batch's padding excluded).
        mode (str): the generation mode.

    lm-eval casts a task's target to its result's type (``type(result)(target)``) before a built-in metric
    compares them, so one built from text alone is allowed: its counts are ``None``.
    """

    prompt_tokens: Optional[int]
    num_gist_tokens: Optional[int]
    kv_bytes: Optional[int]
    mode: str

    def __new__(
        cls,
        text: str,
        prompt_tokens: Optional[int] = None,
        num_gist_tokens: Optional[int] = None,
        kv_bytes: Optional[int] = None,
        mode: str = "gist",
    ) -> "GistGeneration":
        obj = super().__new__(cls, text)
        obj.prompt_tokens, obj.num_gist_tokens, obj.kv_bytes, obj.mode = prompt_tokens, num_gist_tokens, kv_bytes, mode
        return obj

    def __getnewargs__(
        self,
    ) -> Tuple[str, Optional[int], Optional[int], Optional[int], str]:  # pickling (lm-eval's --use_cache)
        return str(self), self.prompt_tokens, self.num_gist_tokens, self.kv_bytes, self.mode

    @property
    def compression_ratio(self) -> Optional[float]:
        """:func:`kept_ratio` of this mode: ``prompt_tokens / K`` for ``gist`` (and ``truncate``), 1.0 for
        ``pos_control``, ``None`` for ``neg_control``."""
        return kept_ratio(self.mode, self.prompt_tokens, self.num_gist_tokens)


def load_config(path: Union[str, Path, DictConfig]) -> DictConfig:
    """Read a torchtune YAML config (or check one already read, e.g. by a recipe).

    Raises:
        FileNotFoundError: if there is no such file.
        ValueError: if it lacks a ``model`` or ``tokenizer`` section, or a component does not take its settings
            (:func:`~torchtune_gist.training.check_components`).
    """
    if isinstance(path, DictConfig):
        cfg, path = path, "(given)"
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"torchtune config {path} not found")
        cfg = OmegaConf.load(path)
    missing = [s for s in ("model", "tokenizer") if s not in cfg]
    if missing:
        raise ValueError(f"torchtune config {path} has no {' or '.join(missing)} section")
    check_components(cfg)
    return cfg


def load_tokenizer(config_path: Union[str, Path]) -> Any:
    """The tokenizer of a torchtune config (its ``tokenizer`` section, instantiated)."""
    cfg = load_config(config_path)
    check_input_files(cfg, sections=("tokenizer",), hint=_CONFIG_EDIT_HINT)
    return build_tokenizer(cfg)


def response_settings(
    cfg: DictConfig, checkpoint_dir: Optional[str], mode: str, dtype: str, max_gen_toks: int
) -> Dict[str, Any]:
    """What a response of ``TorchtuneGistLM(config=cfg, ...)`` depends on (the ``responses=`` log's header, and what
    ``gist_eleuther_eval`` checks before reusing a run's results): the mode, the checkpoint's and the base weights'
    files (names, sizes, mtimes), the model, tokenizer and checkpointer sections, dtype and ``max_gen_toks``."""
    sections = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "tokenizer", "checkpointer")}
    return {
        "mode": mode,
        "checkpoint_dir": checkpoint_dir,
        "checkpoint_files": file_fingerprint(checkpoint_dir),
        "base_files": file_fingerprint(cfg.checkpointer.get("checkpoint_dir")),
        **sections,
        "dtype": dtype,
        "max_gen_toks": max_gen_toks,
    }


def _load_weights(model: nn.Module, cfg: DictConfig, checkpoint_dir: Optional[str], mode: str) -> None:
    """Load the base weights and the gist rows (adapter or merged export); warn when ``mode`` is not the mask
    mode the checkpoint was trained with."""
    if checkpoint_dir is None:
        if mode == "gist":
            raise ValueError(
                "mode='gist' needs trained gist rows: pass checkpoint_dir=<a directory with "
                f"{ADAPTER_FILE}, or a merged export with {GIST_CONFIG_FILE}>"
            )
        load_base(model, cfg, hint=_CONFIG_EDIT_HINT)
        init_gist_embeddings(model)
        return
    directory = Path(checkpoint_dir)
    trained = load_gist_checkpoint(model, cfg, directory, key="checkpoint_dir", hint=_CONFIG_EDIT_HINT)
    if trained is not None and mode != "truncate" and trained != mode:
        log.warning(
            "mode=%r reads %s, trained with mask_mode=%r: an ablation, not the paper's %s (a model trained with "
            "mask_mode=%s)",
            mode,
            directory,
            trained,
            "gist model" if mode == "gist" else "control",
            mode,
        )


def _nothing_after_marker(i: int) -> str:
    return (
        f"request {i}: nothing follows {GIST_MARKER!r}; the text after the gists (the input, the question, or at "
        "least the 'Output:' cue) is needed to predict the first token"
    )


def _positive_int(name: str, value: Any) -> int:
    count = as_positive_int(value)
    if count is None:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return count


def _resolve_device(device: Optional[str]) -> torch.device:
    if device is None:
        return torch.device("cpu")
    dev = parse_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        log.warning("device=%s requested but CUDA is not available: running on the CPU", device)
        return torch.device("cpu")
    return dev


@register_model("torchtune_gist")
class TorchtuneGistLM(LM):
    """A gist-aware torchtune model for lm-eval (module docstring: request format and modes).

    Built either from a torchtune config (``config``: a YAML with ``model``, ``tokenizer`` and
    ``checkpointer`` sections) and ``checkpoint_dir`` (a gist adapter file or a directory with
    ``gist_adapter.safetensors``, loaded on top of the checkpointer's base weights, or a merged Hugging
    Face export with ``gist_config.json``, which needs a non-quantised model), or from an already built
    ``model`` and ``tokenizer``.

    Args:
        config (Union[str, DictConfig, None]): path of the torchtune config, or the config itself.
        checkpoint_dir (Optional[str]): the gist checkpoint (a directory, or the adapter file). May be
            omitted outside ``gist`` mode (base weights, gist rows at their initial values).
        model (Optional[nn.Module]): a built gist-aware ``TransformerDecoder`` (instead of ``config``).
        tokenizer (Any): its tokenizer (with ``model``).
        mode (str): ``gist``, ``pos_control``, ``neg_control`` or ``truncate``. Default ``gist``.
        batch_size (Union[int, str]): requests per forward. Default 1.
        device (Optional[str]): with ``config``; default the config's ``device`` (else the CPU). lm-eval passes
            ``--device`` (which wins over the config; ``python -m torchtune_gist.eval`` passes the config's when it is
            not given, where lm-eval would pass ``cuda:0``); ``device`` in ``--model_args`` wins over both (as do its
            ``batch_size`` and ``max_batch_size``).
            CUDA falls back to the CPU (with a warning) when absent. A given ``model`` stays where it is.
        dtype (Optional[str]): with ``config``: ``fp32``, ``bf16``, ``fp16``. Default: the config's ``dtype`` (else
            ``fp32``).
        max_gen_toks (Union[int, str]): new tokens per request when the request sets none. Default 512.
        max_batch_size (Optional[int]): lm-eval's cap for ``batch_size=auto``, which this model does not
            support: an error when given (use ``batch_size``).
        responses (Optional[str]): with ``config``: a JSON-lines file each response is written to as it is
            computed; a later evaluation with the same settings (:func:`response_settings`) reads the responses there
            instead of computing them again, so an interrupted evaluation goes on where it stopped
            (:class:`~torchtune_gist._responses.ResponseLog`).
        compile (Union[bool, str]): run each decoding step of ``generate_until`` through ``torch.compile``
            (:func:`~torchtune_gist.generation.generate`'s ``compile``). Default False.

    Raises:
        ValueError: on an unknown mode, a bad batch size, ``max_batch_size``, both or neither of ``config`` and
            ``model``, a model whose gist ids differ from the tokenizer's, a checkpoint without gist rows, a
            merged export with a QLoRA config, or ``responses`` with ``model``.
        FileNotFoundError: if the config is missing.
        TypeError: if the model is not gist-aware.
    """

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: Dict[str, Any], additional_config: Optional[Dict[str, Any]] = None
    ) -> "TorchtuneGistLM":
        """lm-eval's way in: ``--model_args`` values win over the ``--device`` / ``--batch_size`` /
        ``--max_batch_size`` values lm-eval adds (it adds ``--device``'s default ``cuda:0`` even when not given,
        so ``device`` in ``--model_args`` would otherwise be a duplicate keyword argument)."""
        problem = unknown_model_args(arg_dict)
        if problem:
            raise ValueError(problem)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: Optional[Dict[str, Any]] = None
    ) -> "TorchtuneGistLM":
        """As :meth:`create_from_arg_obj`, from lm-eval's ``key=value,key=value`` string."""
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def __init__(
        self,
        config: Union[str, DictConfig, None] = None,
        checkpoint_dir: Optional[str] = None,
        *,
        model: Optional[nn.Module] = None,
        tokenizer: Any = None,
        mode: str = "gist",
        batch_size: Union[int, str] = 1,
        device: Optional[str] = None,
        dtype: Optional[str] = None,
        max_gen_toks: Union[int, str] = 512,
        max_batch_size: Optional[int] = None,
        responses: Optional[str] = None,
        compile: Union[bool, str] = False,
    ) -> None:
        super().__init__()
        if max_batch_size is not None:
            raise ValueError(
                f"max_batch_size={max_batch_size} caps lm-eval's batch_size=auto, which torchtune_gist does not "
                "support: give a fixed --batch_size N instead"
            )
        if mode not in GENERATION_MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(GENERATION_MODES)}")
        self.mode = mode
        if str(batch_size).startswith("auto"):
            raise ValueError(AUTO_BATCH_SIZE_REFUSED)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        if str(compile).lower() not in ("true", "false"):
            raise ValueError(f"compile={compile!r}: give True or False")
        self.compile = str(compile).lower() == "true"
        if (config is None) == (model is None):
            raise ValueError("give either config=<torchtune config> (with checkpoint_dir) or model= and tokenizer=")
        if responses is not None and model is not None:
            raise ValueError(
                "responses= needs config= (with checkpoint_dir): the settings a logged response was made with are "
                "told from the config and the checkpoint's files, not from a model passed in"
            )
        self._responses: Optional[ResponseLog] = None
        if model is None:
            cfg = load_config(config)
            check_input_files(cfg, sections=("tokenizer",), hint=_CONFIG_EDIT_HINT)
            tokenizer = build_tokenizer(cfg)
            self._device = _resolve_device(device or cfg.get("device"))
            dtype = dtype or cfg.get("dtype", "fp32")
            with training.set_default_dtype(training.get_dtype(dtype, self._device)), self._device:
                model = tt_config.instantiate(cfg.model)
            _load_weights(model, cfg, checkpoint_dir, mode)
            if responses is not None:
                self._responses = ResponseLog(
                    responses, response_settings(cfg, checkpoint_dir, mode, dtype, self.max_gen_toks)
                )
        elif tokenizer is None:
            raise ValueError("tokenizer is required with model=")
        else:
            self._device = next(model.parameters()).device
        self.model = model.eval()
        self.tokenizer = tokenizer
        emb = get_gist_embedding(model)
        self.gist_token_ids: List[int] = list(emb.gist_token_ids)
        expected = tokenizer_gist_ids(tokenizer, emb.num_gist_tokens)
        if expected != self.gist_token_ids:
            raise ValueError(f"the model's gist ids {self.gist_token_ids} differ from the tokenizer's {expected}")
        bos = getattr(tokenizer, "bos_id", None)
        self._bos: List[int] = [] if bos is None else [bos]
        self._stop_tokens = list(getattr(tokenizer, "stop_tokens", None) or [tokenizer.eos_id])
        pad = getattr(tokenizer, "pad_id", None)
        self._pad_id = 0 if pad is None else pad
        self._records: List[Tuple[int, int]] = []

    @property
    def num_gist_tokens(self) -> int:
        """K."""
        return len(self.gist_token_ids)

    @property
    def response_log(self) -> Optional[ResponseLog]:
        """The log of ``responses=``, if one was given."""
        return self._responses

    def _logged(self, kind: str, request: Instance) -> Optional[Any]:
        """The response logged for ``request`` by an earlier evaluation (JSON form), or ``None``."""
        return None if self._responses is None else self._responses.get(kind, request.args)

    def _done(self, kind: str, request: Instance, response: Any, logged: Any) -> None:
        """Hand a computed response to lm-eval's cache hook and, in its JSON form ``logged``, to the log."""
        self.cache_hook.add_partial(kind, request.args, response)
        if self._responses is not None:
            self._responses.add(kind, request.args, logged)

    @property
    def stats(self) -> Dict[str, Any]:
        """Running statistics over every generated output so far.

        Returns:
            Dict[str, Any]: ``mode``, ``num_gist_tokens``, ``generations``, ``mean_prompt_tokens``,
            ``mean_compression_ratio`` (:func:`kept_ratio` of the mean prompt), ``mean_kv_bytes`` and
            ``max_kv_bytes`` (per example).
        """
        n = len(self._records)
        prompts = [p for p, _ in self._records]
        kv = [b for _, b in self._records]
        return {
            "mode": self.mode,
            "num_gist_tokens": self.num_gist_tokens,
            "generations": n,
            "mean_prompt_tokens": sum(prompts) / n if n else None,
            "mean_compression_ratio": kept_ratio(self.mode, sum(prompts) / n, self.num_gist_tokens) if n else None,
            "mean_kv_bytes": sum(kv) / n if n else None,
            "max_kv_bytes": max(kv, default=None),
        }

    def _encode(self, text: str) -> List[int]:
        return list(self.tokenizer.encode(text, add_bos=False, add_eos=False))

    def _split(self, context: str) -> Tuple[List[int], str]:
        """``([BOS] + enc(text before the marker), text after the marker)``."""
        if not isinstance(context, str) or context.count(GIST_MARKER) != 1:
            found = context.count(GIST_MARKER) if isinstance(context, str) else "no"
            raise ValueError(
                f"a torchtune_gist request context must contain the gist marker {GIST_MARKER!r} exactly once, where "
                f"the gist tokens go (found {found}; few-shot contexts, lm-eval's --num_fewshot, are not supported): "
                f"{str(context)[:120]!r}"
            )
        before, after = context.split(GIST_MARKER)
        return self._bos + self._encode(before), after

    def encode_context(self, context: str) -> Tuple[List[int], List[int]]:
        """Split a request context at :data:`GIST_MARKER` and tokenize both sides.

        Returns:
            Tuple[List[int], List[int]]: the prompt ``[BOS] + enc(before)`` (the gist ids go after
            it) and the continuation ``enc(after)``.

        Raises:
            ValueError: if the context does not hold the marker exactly once.
        """
        prompt, after = self._split(context)
        return prompt, self._encode(after)

    def _gen_settings(self, gen_kwargs: Dict[str, Any]) -> Tuple[Tuple[str, ...], int, float, Optional[int]]:
        unknown = sorted(set(gen_kwargs) - set(_GEN_KWARGS))
        if unknown:
            raise ValueError(
                f"unsupported generation arguments {unknown}; torchtune_gist takes {', '.join(_GEN_KWARGS)}"
            )
        until = gen_kwargs.get("until") or []
        until = (until,) if isinstance(until, str) else tuple(until)
        max_gen_toks = _positive_int("max_gen_toks", gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        temperature = float(gen_kwargs.get("temperature", 1.0)) if gen_kwargs.get("do_sample") else 0.0
        top_k = gen_kwargs.get("top_k")
        return until, max_gen_toks, temperature, top_k

    def _text(self, tokens: List[int], until: Sequence[str]) -> str:
        if tokens and tokens[-1] in self._stop_tokens:
            tokens = tokens[:-1]
        text = self.tokenizer.decode(tokens)
        cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
        return text[:cut]

    def generate_until(self, requests: List[Instance], disable_tqdm: bool = False) -> List[str]:
        """Generate for each request (``args = (context, gen_kwargs)``); see the module docstring.

        Returns:
            List[str]: :class:`GistGeneration` texts, in request order.

        Raises:
            ValueError: for a context without exactly one marker, an empty continuation,
                unsupported generation arguments or sequences beyond the model's ``max_seq_len``.
        """
        items = []
        outputs: List[Optional[GistGeneration]] = [None] * len(requests)
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            prompt, continuation = self.encode_context(context)
            if not continuation:
                raise ValueError(_nothing_after_marker(i))
            length = len(prompt) + self.num_gist_tokens + len(continuation)
            if length > self.model.max_seq_len:
                raise ValueError(
                    f"request {i}: its context takes {length} positions with the gists, beyond the model's max_seq_len="
                    f"{self.model.max_seq_len}: evaluate shorter contexts (gist_passkey: --metadata "
                    "'{\"context_tokens\": [N, ...]}') or use a model built with a larger max_seq_len"
                )
            settings = self._gen_settings(dict(gen_kwargs))
            logged = self._logged("generate_until", request)
            if logged is None:
                items.append((i, prompt, continuation, settings))
            else:
                outputs[i] = GistGeneration(*logged)
                self._records.append((outputs[i].prompt_tokens, outputs[i].kv_bytes))
        groups: Dict[Tuple[Any, ...], List[Tuple[int, List[int], List[int]]]] = defaultdict(list)
        for i, prompt, continuation, settings in items:
            groups[settings].append((i, prompt, continuation))
        k = self.num_gist_tokens
        done = len(requests) - len(items)  # responses logged by an earlier evaluation
        with tqdm(
            total=len(requests), initial=done, disable=disable_tqdm, desc="Running generate_until requests"
        ) as bar:
            for (until, max_gen_toks, temperature, top_k), group in groups.items():
                group.sort(key=lambda x: len(x[1]) + len(x[2]), reverse=True)
                for start in range(0, len(group), self.batch_size):
                    batch = group[start : start + self.batch_size]
                    out = generate(
                        self.model,
                        [p + self.gist_token_ids for _, p, _ in batch],
                        [c for _, _, c in batch],
                        mode=self.mode,
                        gist_token_ids=self.gist_token_ids,
                        max_new_tokens=max_gen_toks,
                        temperature=temperature,
                        top_k=top_k,
                        stop_tokens=self._stop_tokens,
                        pad_id=self._pad_id,
                        compile=self.compile,
                    )
                    for (i, prompt, _), tokens, kv_bytes in zip(batch, out.tokens, out.row_kv_bytes):
                        n_prompt = len(prompt) - len(self._bos)
                        outputs[i] = GistGeneration(self._text(tokens, until), n_prompt, k, kv_bytes, self.mode)
                        self._records.append((n_prompt, kv_bytes))
                        self._done("generate_until", requests[i], outputs[i], list(outputs[i].__getnewargs__()))
                    bar.update(len(batch))
        log.info("torchtune_gist %s", self.stats)
        return outputs

    def _scored_request(self, i: int, context: str, continuation: str) -> Tuple[List[int], List[int], int]:
        """Request ``i`` as :func:`score_continuations` takes it: the prompt with the gist ids, the continuation
        (the text after the marker, then the scored text) and how many of its last tokens are scored.

        Raises:
            ValueError: if nothing follows the marker (the last gist would predict the continuation's first token,
                and its output reads the whole prompt: no gist cache holds it).
        """
        prompt, after = self._split(context)
        after_ids = self._encode(after)
        if not after_ids:
            raise ValueError(_nothing_after_marker(i))
        whole = self._encode(after + continuation)
        scored = whole[len(after_ids) :] if whole[: len(after_ids)] == after_ids else self._encode(continuation)
        if not scored:
            raise ValueError(f"request {i}: the continuation to score is empty")
        return prompt + self.gist_token_ids, after_ids + scored, len(scored)

    def loglikelihood(self, requests: List[Instance], disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        """Log-probability of each continuation after its context, read as generation reads it in this mode.

        The context holds :data:`GIST_MARKER`; the prompt ``[BOS] prompt G`` is compressed (``gist``) or kept
        as the mode keeps it, and ``after continuation`` follows, in chunks; logits only where tokens are scored.

        Returns:
            List[Tuple[float, bool]]: ``(logprob, is_greedy)`` per request (greedy with the gist ids
            never chosen, as in generation).
        """
        rows = [self._scored_request(i, *request.args) for i, request in enumerate(requests)]
        results: List[Optional[Tuple[float, bool]]] = [None] * len(rows)
        for i, request in enumerate(requests):
            logged = self._logged("loglikelihood", request)
            if logged is not None:
                results[i] = (float(logged[0]), bool(logged[1]))
        todo = [i for i in range(len(rows)) if results[i] is None]
        order = sorted(todo, key=lambda i: len(rows[i][0]) + len(rows[i][1]), reverse=True)
        done = len(rows) - len(todo)
        with tqdm(total=len(rows), initial=done, disable=disable_tqdm, desc="Running loglikelihood requests") as bar:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                prompts, continuations, counts = zip(*(rows[i] for i in chunk))
                scores = score_continuations(
                    self.model,
                    prompts,
                    continuations,
                    counts,
                    mode=self.mode,
                    gist_token_ids=self.gist_token_ids,
                    pad_id=self._pad_id,
                )
                for i, result in zip(chunk, scores):
                    results[i] = result
                    self._done("loglikelihood", requests[i], result, [float(result[0]), bool(result[1])])
                bar.update(len(chunk))
        return results

    def loglikelihood_rolling(self, requests: List[Instance], disable_tqdm: bool = False) -> List[float]:
        """Not supported: rolling perplexity has no prompt to compress into gist tokens."""
        raise NotImplementedError(
            "torchtune_gist does not implement loglikelihood_rolling: perplexity tasks have no prompt to compress "
            "into gist tokens; use generate_until or loglikelihood tasks whose context holds the gist marker"
        )
