"""Passkey retrieval ("needle in a haystack") data for gist compression of long contexts.

A record holds a haystack of filler sentences (English or Korean) with a needle ("The pass key is
71432. Remember it. ...") hidden at a ``depth`` (0 = start, 1 = end, a fraction of the haystack's
tokens), a ``question`` and the ``answer`` (the passkey digits). Generation is deterministic in
``seed``; the context is cut or extended, whole filler words first and then characters of one last
word, to ``context_tokens`` tokens of the given tokenizer (at most the target, within a few tokens).

Token layout (``G`` = the K gist ids; no ``G`` when K = 0, for plain causal stage-1 training)::

    [BOS] enc(context) G enc("\\n{question}\\n") | enc(answer) [EOS]

``|`` marks ``prompt_len``. Labels: the answer and EOS; with ``answer_only_loss=False`` the question
too; with ``train_on_context=True`` the context too. Gist tokens are never learned.
"""

import random
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Union

from torch.utils.data import Dataset
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.modules.transforms import Transform

from torchtune_gist._checks import check_whole, is_whole
from torchtune_gist.data._common import check_no_gist_in_text, check_tokenizer, encode_text, resolve_gist_ids

LANGUAGES = ("en", "ko")

FILLER_SENTENCES: Dict[str, Sequence[str]] = {
    "en": (
        "The grass is green.",
        "The sky is blue.",
        "The sun is yellow.",
        "Here we go.",
        "There and back again.",
        "The river runs to the sea.",
        "Birds sing in the morning.",
        "The wind is calm today.",
        "A cat sleeps by the window.",
        "The road is long and quiet.",
    ),
    "ko": (
        "풀은 초록색이다.",
        "하늘은 파랗다.",
        "해는 노랗다.",
        "자, 가자.",
        "갔다가 다시 돌아온다.",
        "강물은 바다로 흐른다.",
        "새들이 아침에 노래한다.",
        "오늘은 바람이 잔잔하다.",
        "고양이가 창가에서 잔다.",
        "길은 길고 조용하다.",
    ),
}
NEEDLES: Dict[str, str] = {
    "en": "The pass key is {passkey}. Remember it. {passkey} is the pass key.",
    "ko": "패스키는 {passkey}입니다. 꼭 기억하세요. 패스키는 {passkey}입니다.",
}
QUESTIONS: Dict[str, str] = {"en": "What is the pass key?", "ko": "패스키는 무엇입니까?"}
_SENTENCE_END = (".", "!", "?")


def _check_seed(seed: Any) -> None:
    if not is_whole(seed):
        raise ValueError(f"seed must be an integer (the records are deterministic in it), got {seed!r}")


def _check_depth(depth: Any) -> None:
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a number in [0, 1], got {depth!r}")


def _words(rng: random.Random, language: str) -> Iterator[str]:
    sentences = FILLER_SENTENCES[language]
    while True:
        yield from rng.choice(sentences).split(" ")


def make_passkey_sample(
    tokenizer: Any,
    *,
    context_tokens: int,
    depth: float,
    passkey_digits: int = 5,
    language: str = "en",
    seed: int,
    num_gist_tokens: Optional[int] = None,
) -> Dict[str, Any]:
    """One passkey record, deterministic in its arguments.

    Args:
        tokenizer (Any): the tokenizer whose tokens ``context_tokens`` counts.
        context_tokens (int): target length of the context (haystack + needle) in tokens.
        depth (float): where the needle sits, as a fraction of the haystack (0 = start, 1 = end).
        passkey_digits (int): number of digits of the passkey (the first is non-zero).
        language (str): ``"en"`` or ``"ko"``.
        seed (int): random seed (filler order and passkey).
        num_gist_tokens (Optional[int]): K, for ``compression_ratio``; ``None`` or 0 leaves it ``None``.

    Returns:
        Dict[str, Any]: ``context``, ``question``, ``answer`` (= ``passkey``), ``passkey``, ``depth``,
        ``language``, ``context_tokens`` (measured), ``target_context_tokens`` and
        ``compression_ratio`` (``context_tokens / K``).

    Raises:
        ValueError: on a bad setting, or a target too short to hold the needle.
    """
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; expected one of {', '.join(LANGUAGES)}")
    check_whole("context_tokens", context_tokens)
    check_whole("passkey_digits", passkey_digits)
    _check_depth(depth)
    _check_seed(seed)
    if num_gist_tokens is not None:
        check_whole("num_gist_tokens", num_gist_tokens, 0)
    check_tokenizer(tokenizer, [])
    rng = random.Random(seed)
    passkey = str(rng.randint(1, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(passkey_digits - 1))
    needle = NEEDLES[language].format(passkey=passkey)

    counts: Dict[str, int] = {}

    def count(text: str) -> int:
        if text not in counts:
            counts[text] = len(encode_text(tokenizer, text))
        return counts[text]

    budget = context_tokens - count(" " + needle)
    if budget < 0:
        raise ValueError(
            f"context_tokens={context_tokens} is too short: the needle alone is {count(' ' + needle)} tokens"
        )
    words: List[str] = []
    cumulative: List[int] = [0]
    stream = _words(rng, language)
    word = next(stream)
    while cumulative[-1] + count(" " + word) <= budget:
        words.append(word)
        cumulative.append(cumulative[-1] + count(" " + word))
        word = next(stream)
    boundaries = [0] + [i + 1 for i, w in enumerate(words) if w.endswith(_SENTENCE_END)]
    at = min(boundaries, key=lambda i: abs(cumulative[i] - depth * cumulative[-1]))
    context = " ".join(words[:at] + [needle] + words[at:])
    needle_end = len(" ".join(words[:at] + [needle]))

    n = len(encode_text(tokenizer, context))
    while n > context_tokens and len(context) > needle_end:
        context = context[:-1].rstrip()
        n = len(encode_text(tokenizer, context))
    if n > context_tokens:
        raise ValueError(f"context_tokens={context_tokens} is too short for the needle ({n} tokens)")
    for end in range(len(word), 0, -1):
        if n + count(" " + word[:end]) <= context_tokens:
            longer = f"{context} {word[:end]}"
            n_longer = len(encode_text(tokenizer, longer))
            if n_longer <= context_tokens:
                context, n = longer, n_longer
            break
    k = num_gist_tokens or 0
    return {
        "context": context,
        "question": QUESTIONS[language],
        "answer": passkey,
        "passkey": passkey,
        "depth": float(depth),
        "language": language,
        "context_tokens": n,
        "target_context_tokens": context_tokens,
        "compression_ratio": n / k if k else None,
    }


def make_passkey_samples(
    tokenizer: Any,
    num_samples: int,
    *,
    context_tokens: Union[int, Sequence[int]],
    depths: Optional[Sequence[float]] = None,
    passkey_digits: int = 5,
    language: str = "en",
    seed: int = 0,
    num_gist_tokens: Optional[int] = None,
) -> List[Dict[str, Any]]:
    """``num_samples`` passkey records (see :func:`make_passkey_sample`), deterministic in ``seed``.

    Args:
        tokenizer (Any): the tokenizer whose tokens the lengths count.
        num_samples (int): number of records.
        context_tokens (Union[int, Sequence[int]]): target length, or lengths used in turn.
        depths (Optional[Sequence[float]]): depths used in turn; ``None``: uniform random depths.
        passkey_digits (int): passkey length.
        language (str): ``"en"`` or ``"ko"``.
        seed (int): master seed; record ``i`` gets its own seed drawn from it. Two calls with one seed share
            records (random depths draw twice per record, fixed depths once: record ``2i`` of one is record ``i``
            of the other): training and evaluation data need different seeds (the eval tasks default to 1234,
            the training configs use 0).
        num_gist_tokens (Optional[int]): K, for ``compression_ratio``.

    Returns:
        List[Dict[str, Any]]: the records, each also with ``index`` and ``seed``.
    """
    check_whole("num_samples", num_samples)
    _check_seed(seed)
    lengths = [context_tokens] if isinstance(context_tokens, int) else list(context_tokens)
    if not lengths:
        raise ValueError("context_tokens must be an integer or a non-empty list of integers")
    if depths is not None:
        depths = list(depths)
        if not depths:
            raise ValueError("depths must be None (random) or a non-empty list of numbers in [0, 1]")
        for d in depths:
            _check_depth(d)
    master = random.Random(seed)
    records = []
    for i in range(num_samples):
        sample_seed = master.getrandbits(63)
        depth = depths[i % len(depths)] if depths is not None else master.random()
        record = make_passkey_sample(
            tokenizer,
            context_tokens=lengths[i % len(lengths)],
            depth=depth,
            passkey_digits=passkey_digits,
            language=language,
            seed=sample_seed,
            num_gist_tokens=num_gist_tokens,
        )
        records.append({**record, "index": i, "seed": sample_seed})
    return records


class GistPasskeyTransform(Transform):
    """Tokenize a passkey record (``context``, ``question``, ``answer``) with a gist span.

    Args:
        tokenizer (Any): the tokenizer (``encode``, ``bos_id``, ``eos_id``, reserved ids when K > 0).
        num_gist_tokens (int): K; 0 for no gist span (plain causal training).
        answer_only_loss (bool): learn only the answer and EOS; False also learns the question.
        train_on_context (bool): also learn the context tokens (language modelling on the haystack).

    Raises:
        ValueError: on a bad K or a tokenizer without the needed ids.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        num_gist_tokens: int,
        answer_only_loss: bool = True,
        train_on_context: bool = False,
    ) -> None:
        check_tokenizer(tokenizer, ["eos_id"])
        self.tokenizer = tokenizer
        self.gist_token_ids = resolve_gist_ids(tokenizer, num_gist_tokens, allow_zero=True)
        self.num_gist_tokens = num_gist_tokens
        self.answer_only_loss = answer_only_loss
        self.train_on_context = train_on_context
        bos = getattr(tokenizer, "bos_id", None)
        self._head = [] if bos is None else [bos]

    def _encode(self, text: str, what: str) -> List[int]:
        tokens = encode_text(self.tokenizer, text)
        check_no_gist_in_text(tokens, self.gist_token_ids, what)
        return tokens

    def _field(self, sample: Mapping[str, Any], name: str) -> str:
        value = sample.get(name) if isinstance(sample, Mapping) else None
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"passkey record field {name!r} is missing or empty")
        return value

    def encode_prompt(self, context: str, question: str) -> Dict[str, Any]:
        """Prompt tokens only: ``[BOS] context G "\\n{question}\\n"``.

        Returns:
            Dict[str, Any]: ``tokens`` (List[int]), ``gist_start`` (start of the gist span, which is
            empty when K = 0) and ``question_start``.
        """
        context_ids = self._head + self._encode(context, "context")
        question_ids = self._encode(f"\n{question}\n", "question")
        gist_start = len(context_ids)
        return {
            "tokens": context_ids + self.gist_token_ids + question_ids,
            "gist_start": gist_start,
            "question_start": gist_start + len(self.gist_token_ids),
        }

    def num_tokens(self, sample: Mapping[str, Any]) -> int:
        """The length of ``self(sample)`` for a record of :func:`make_passkey_samples`, from its measured
        ``context_tokens``: only the question and the answer are tokenized (cheap for long haystacks)."""
        question, answer = (self._field(sample, f) for f in ("question", "answer"))
        return (
            len(self._head)
            + int(sample["context_tokens"])
            + len(self.gist_token_ids)
            + len(encode_text(self.tokenizer, f"\n{question}\n"))
            + len(encode_text(self.tokenizer, answer))
            + 1
        )

    def __call__(self, sample: Mapping[str, Any]) -> Dict[str, Any]:
        """Tokenize one record.

        Returns:
            Dict[str, Any]: ``tokens``, ``labels`` (List[int]), ``gist_start``, ``prompt_len``,
            ``context_tokens`` and ``compression_ratio`` (``None`` when K = 0).
        """
        context, question, answer = (self._field(sample, f) for f in ("context", "question", "answer"))
        prompt = self.encode_prompt(context, question)
        tokens = prompt["tokens"]
        completion = self._encode(answer, "answer") + [self.tokenizer.eos_id]
        gist_start, question_start = prompt["gist_start"], prompt["question_start"]
        ignore = CROSS_ENTROPY_IGNORE_IDX
        context_labels = tokens[:gist_start] if self.train_on_context else [ignore] * gist_start
        question_labels = tokens[question_start:]
        if self.answer_only_loss:
            question_labels = [ignore] * len(question_labels)
        labels = context_labels + [ignore] * len(self.gist_token_ids) + question_labels + completion
        n_context = gist_start - len(self._head)
        return {
            "tokens": tokens + completion,
            "labels": labels,
            "gist_start": gist_start,
            "prompt_len": len(tokens),
            "context_tokens": n_context,
            "compression_ratio": n_context / self.num_gist_tokens if self.num_gist_tokens else None,
        }


class GistPasskeyDataset(Dataset):
    """Passkey records tokenized on access; ``records`` keeps the text fields.

    Args:
        records (Sequence[Mapping[str, Any]]): records from :func:`make_passkey_samples`.
        transform (GistPasskeyTransform): the tokenizing transform.
        max_seq_len (Optional[int]): the longest example allowed (an answer cut off would teach nothing, so a longer
            one is refused, not truncated); ``None``: no bound.

    Raises:
        ValueError: on access, for an example longer than ``max_seq_len``.
    """

    def __init__(
        self, records: Sequence[Mapping[str, Any]], transform: GistPasskeyTransform, max_seq_len: Optional[int] = None
    ) -> None:
        check_whole("max_seq_len", max_seq_len, optional=True)
        self.records = list(records)
        self.transform = transform
        self.gist_token_ids = transform.gist_token_ids
        self.max_seq_len = max_seq_len

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        example = self.transform(self.records[index])
        if self.max_seq_len is not None and len(example["tokens"]) > self.max_seq_len:
            raise ValueError(
                f"passkey example {index} has {len(example['tokens'])} tokens ({example['context_tokens']} of "
                f"context), beyond max_seq_len={self.max_seq_len} (the tokenizer's unless given): raise "
                "tokenizer.max_seq_len or lower the dataset's context_tokens"
            )
        return {**example, "index": index}


def gist_passkey_dataset(
    tokenizer: Any,
    *,
    num_gist_tokens: int,
    num_samples: int,
    context_tokens: Union[int, Sequence[int]],
    depths: Optional[Sequence[float]] = None,
    passkey_digits: int = 5,
    language: str = "en",
    seed: int = 0,
    answer_only_loss: bool = True,
    train_on_context: bool = False,
    max_seq_len: Optional[int] = None,
) -> GistPasskeyDataset:
    """Generated passkey retrieval data with K gist tokens between the context and the question.

    Args:
        tokenizer (Any): the model tokenizer.
        num_gist_tokens (int): K; 0 for no gist span (stage-1 causal training).
        num_samples (int): number of examples.
        context_tokens (Union[int, Sequence[int]]): context length target(s) in tokens, used in turn.
        depths (Optional[Sequence[float]]): needle depths used in turn; ``None``: random.
        passkey_digits (int): passkey length. Default 5.
        language (str): ``"en"`` or ``"ko"``.
        seed (int): master seed.
        answer_only_loss (bool): learn only answer + EOS (False: the question too).
        train_on_context (bool): also learn the context.
        max_seq_len (Optional[int]): the longest example allowed; default the tokenizer's ``max_seq_len``
            (``None``: no bound). Every example is checked here (:meth:`GistPasskeyTransform.num_tokens`).

    Returns:
        GistPasskeyDataset: items with ``tokens``, ``labels``, ``gist_start``, ``prompt_len``,
        ``context_tokens``, ``compression_ratio`` and ``index``.

    Raises:
        ValueError: on a bad setting, or an example longer than ``max_seq_len``.
    """
    transform = GistPasskeyTransform(
        tokenizer,
        num_gist_tokens=num_gist_tokens,
        answer_only_loss=answer_only_loss,
        train_on_context=train_on_context,
    )
    records = make_passkey_samples(
        tokenizer,
        num_samples,
        context_tokens=context_tokens,
        depths=depths,
        passkey_digits=passkey_digits,
        language=language,
        seed=seed,
        num_gist_tokens=num_gist_tokens,
    )
    if max_seq_len is None:
        max_seq_len = getattr(tokenizer, "max_seq_len", None)
    if max_seq_len is not None:
        lengths = [transform.num_tokens(record) for record in records]
        too_long = [i for i, n in enumerate(lengths) if n > max_seq_len]
        if too_long:
            i = too_long[0]
            raise ValueError(
                f"{len(too_long)} of {len(records)} passkey examples are longer than max_seq_len={max_seq_len} (the "
                f"tokenizer's unless given), example {i} with {lengths[i]} tokens ({records[i]['context_tokens']} of "
                "context) first: raise tokenizer.max_seq_len or lower the dataset's context_tokens"
            )
    return GistPasskeyDataset(records, transform, max_seq_len)
