from torchtune.models.llama3._tokenizer import LLAMA3_SPECIAL_TOKENS

from torchtune_gist.tiny import TINY_VOCAB_SIZE, tiny_special_tokens


def test_tiny_tokenizer_round_trips_bytes(tiny_tokenizer):
    text = "Instruction: find the key 12345.\n세계 🙂"
    ids = tiny_tokenizer.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tiny_tokenizer.bos_id and ids[-1] == tiny_tokenizer.eos_id
    assert all(0 <= i < 256 for i in ids[1:-1])
    assert tiny_tokenizer.decode(ids) == text


def test_tiny_special_tokens_mirror_llama3_layout(tiny_tokenizer):
    special = tiny_special_tokens()
    assert set(special) == set(LLAMA3_SPECIAL_TOKENS)
    assert sorted(special.values()) == list(range(256, TINY_VOCAB_SIZE))
    assert tiny_tokenizer.bos_id == 256 and tiny_tokenizer.eos_id == 257 and tiny_tokenizer.eot_id == 265
    assert special["<|reserved_special_token_244|>"] == TINY_VOCAB_SIZE - 1
