"""SmolLM2's tokenizer in torchtune's ``ModelTokenizer`` interface, on Hugging Face ``tokenizers``.

SmolLM2 uses GPT-2-style byte-level BPE (49152 tokens) with digits split one per token, 17 control
tokens at ids 0..16 (``<|endoftext|>`` = 0, ``<|im_start|>`` = 1, ``<|im_end|>`` = 2, then code/notebook
markers) and the ChatML chat format. It has **no BOS token** (``bos_id`` is ``None``; ``add_bos`` is
accepted and ignored) and **no reserved tokens**: the K gist tokens are K *new* ids just past the
vocabulary, ``49152 .. 49152 + K - 1`` (see :func:`smollm2_gist_token_ids`). They are inserted as ids,
never as text, and the models built for them keep a 49152-row output head, so they are never generated.
"""

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from torchtune.data import Message, truncate
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from torchtune_gist._checks import check_whole

SMOLLM2_VOCAB_SIZE = 49152

#: SmolLM2's control tokens, in id order 0..16.
SMOLLM2_CONTROL_TOKENS: Tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<repo_name>",
    "<reponame>",
    "<file_sep>",
    "<filename>",
    "<gh_stars>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<jupyter_script>",
    "<empty_output>",
)

ENDOFTEXT, IM_START, IM_END = SMOLLM2_CONTROL_TOKENS[:3]


def smollm2_gist_token_ids(num_gist_tokens: int, vocab_size: int = SMOLLM2_VOCAB_SIZE) -> List[int]:
    """The gist ids of a vocabulary without reserved tokens: ``vocab_size .. vocab_size + K - 1``.

    Raises:
        ValueError: if ``num_gist_tokens`` is not a whole number >= 1.
    """
    check_whole("num_gist_tokens", num_gist_tokens)
    return list(range(vocab_size, vocab_size + num_gist_tokens))


def build_byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], special_tokens: Sequence[str]) -> Tokenizer:
    """A GPT-2-style byte-level BPE tokenizer with digits split one per token (SmolLM2's ``tokenizer.json``).

    Args:
        tokens (Sequence[str]): the vocabulary in id order (byte-level strings, ``Ġ`` for a space).
        merges (Sequence[str]): the merge rules in priority order, each ``"left right"``.
        special_tokens (Sequence[str]): vocabulary entries to match whole in text and to skip when decoding.

    Returns:
        Tokenizer: a ``tokenizers.Tokenizer`` (``.to_str()`` gives the ``tokenizer.json`` text).

    Raises:
        ValueError: if a merge rule is not two space-separated tokens.
    """
    pairs = []
    for rule in merges:
        pair = tuple(rule.split(" "))
        if len(pair) != 2:
            raise ValueError(f"BPE merge rule {rule!r} is not two space-separated tokens")
        pairs.append(pair)
    tokenizer = Tokenizer(models.BPE({token: i for i, token in enumerate(tokens)}, pairs))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return tokenizer


class SmolLM2Tokenizer(ModelTokenizer, Transform):
    """SmolLM2's tokenizer: byte-level BPE and ChatML turns.

    ``tokenize_messages`` writes each message as ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` (the
    Hugging Face chat template; unlike that template it adds no default system message). Special-token
    strings found in text stay text (unlike Hugging Face's tokenizer, like torchtune's Llama 3 tokenizer).

    Attributes:
        bos_id (None): SmolLM2 has no BOS token.
        eos_id (int): ``<|im_end|>`` (2), the end of a chat turn.
        pad_id (int): ``<|endoftext|>`` (0), not ``<|im_end|>``: torchtune's generation treats every
            ``pad_id`` in a prompt as padding, and ChatML prompts contain ``<|im_end|>``.
        stop_tokens (List[int]): ``[<|im_end|>, <|endoftext|>]``.
        special_tokens (Dict[str, int]): the 17 control tokens.
        max_seq_len (Optional[int]): ``tokenize_messages`` truncates to this length.

    Args:
        tokenizer (Tokenizer): a ``tokenizers.Tokenizer`` holding SmolLM2's vocabulary.
        max_seq_len (Optional[int]): see above. Default: None.

    Raises:
        ValueError: if the vocabulary lacks ``<|endoftext|>``, ``<|im_start|>`` or ``<|im_end|>``.
    """

    def __init__(self, tokenizer: Tokenizer, max_seq_len: Optional[int] = None):
        # Special-token strings inside text stay text, as torchtune's Llama 3 tokenizer keeps them: a literal
        # "<|endoftext|>" in data must not become the padding id that the gist masks find padding by.
        tokenizer.encode_special_tokens = True
        self._tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        added = tokenizer.get_added_tokens_decoder()
        self.special_tokens: Dict[str, int] = {tok.content: i for i, tok in sorted(added.items()) if tok.special}
        missing = [t for t in (ENDOFTEXT, IM_START, IM_END) if t not in self.special_tokens]
        if missing:
            raise ValueError(f"not a SmolLM2 tokenizer: special tokens {missing} are missing")
        self.bos_id: Optional[int] = None
        self.eos_id = self.special_tokens[IM_END]
        self.pad_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IM_START]
        self.stop_tokens = [self.eos_id, self.pad_id]

    @property
    def vocab_size(self) -> int:
        """Number of tokens in the vocabulary (49152); gist ids start here."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def gist_token_ids(self, num_gist_tokens: int) -> List[int]:
        """K new ids just past the vocabulary: ``vocab_size .. vocab_size + K - 1``."""
        return smollm2_gist_token_ids(num_gist_tokens, self.vocab_size)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        """Token ids of ``text``; ``add_bos`` is ignored (no BOS), ``add_eos`` appends ``eos_id``."""
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, token_ids: List[int], skip_special_tokens: bool = True) -> str:
        """Text of ``token_ids``. Gist ids (``>= vocab_size``) are skipped with the special tokens,
        else written ``<|gist_n|>`` (n counted from ``vocab_size``).

        Raises:
            ValueError: if an id is negative.
        """
        ids = [int(i) for i in token_ids]
        if any(i < 0 for i in ids):
            raise ValueError(f"token ids must be non-negative, got {min(ids)}")
        pieces, run = [], []
        for i in ids + [None]:
            if i is not None and i < self.vocab_size:
                run.append(i)
                continue
            if run:
                pieces.append(self._tokenizer.decode(run, skip_special_tokens=skip_special_tokens))
                run = []
            if i is not None and not skip_special_tokens:
                pieces.append(f"<|gist_{i - self.vocab_size}|>")
        return "".join(pieces)

    def tokenize_message(self, message: Message, add_end_tokens: bool = True) -> List[int]:
        """One ChatML turn: ``<|im_start|>{role}\\n{content}`` and, with ``add_end_tokens``, ``<|im_end|>\\n``.

        Raises:
            ValueError: if the message holds non-text content.
        """
        kinds = {item["type"] for item in message.content} - {"text"}
        if kinds:
            raise ValueError(f"SmolLM2 messages hold text only; the {message.role!r} message has {sorted(kinds)}")
        tokens = [self.im_start_id] + self.encode(f"{message.role}\n{message.text_content}", add_eos=False)
        if add_end_tokens:
            tokens += [self.eos_id] + self.encode("\n", add_eos=False)
        return tokens

    def tokenize_messages(
        self, messages: List[Message], *, add_end_tokens: bool = True
    ) -> Tuple[List[int], List[bool]]:
        """Token ids and loss masks (``True`` = not trained on) of a ChatML conversation.

        Args:
            messages (List[Message]): the turns; each token takes its message's ``masked`` flag.
            add_end_tokens (bool): close the last turn with ``<|im_end|>\\n``; False leaves it open for
                generation (end with an empty assistant message for ``<|im_start|>assistant\\n``). Default: True.

        Returns:
            Tuple[List[int], List[bool]]: the ids and the masks, both truncated to ``max_seq_len``.
        """
        tokens: List[int] = []
        mask: List[bool] = []
        for i, message in enumerate(messages):
            ids = self.tokenize_message(message, add_end_tokens=add_end_tokens or i < len(messages) - 1)
            tokens += ids
            mask += [message.masked] * len(ids)
            if self.max_seq_len and len(tokens) >= self.max_seq_len:
                break
        if self.max_seq_len:
            tokens = truncate(tokens, self.max_seq_len, self.eos_id if add_end_tokens else None)
            mask = truncate(mask, self.max_seq_len, True if add_end_tokens else None)
        return tokens, mask

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        """Replace ``sample["messages"]`` with ``tokens`` and ``mask`` (end tokens left off for inference)."""
        messages = sample.pop("messages")
        sample["tokens"], sample["mask"] = self.tokenize_messages(messages, add_end_tokens=not inference)
        return sample


def smollm2_tokenizer(path: Union[str, Path], max_seq_len: Optional[int] = None) -> SmolLM2Tokenizer:
    """SmolLM2's tokenizer from a ``tokenizer.json``: the one ``prepare_smollm2`` writes from the GGUF
    file, or Hugging Face's ``HuggingFaceTB/SmolLM2-135M-Instruct`` one.

    Args:
        path (Union[str, Path]): the ``tokenizer.json`` file.
        max_seq_len (Optional[int]): ``tokenize_messages`` truncates to this length. Default: None.

    Returns:
        SmolLM2Tokenizer: the tokenizer.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if it is not a SmolLM2 tokenizer.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    return SmolLM2Tokenizer(Tokenizer.from_file(str(path)), max_seq_len=max_seq_len)
