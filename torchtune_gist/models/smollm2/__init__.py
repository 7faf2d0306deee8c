"""SmolLM2-135M-Instruct: a real, small Llama-architecture model that runs offline on a CPU.

``python -m torchtune_gist.models.smollm2.convert --output-dir .cache/smollm2`` (or ``make smollm2``)
fetches and converts it once; then::

    model = smollm2_135m()
    model.load_state_dict(safetensors.torch.load_file(".cache/smollm2/model.safetensors"))
    tokenizer = smollm2_tokenizer(".cache/smollm2/tokenizer.json")

Gist ids are K new ids past the 49152-token vocabulary (``tokenizer.gist_token_ids(K)``).
"""

from torchtune_gist.models.smollm2._convert import (
    convert_gguf,
    convert_hf,
    fetch_smollm2_gguf,
    gguf_state_dict,
    gguf_tokenizer_json,
    load_hf_checkpoint,
    prepare_smollm2,
)
from torchtune_gist.models.smollm2._model_builders import (
    SMOLLM2_135M_ARGS,
    gist_smollm2_135m,
    lora_gist_smollm2_135m,
    lora_smollm2_135m,
    smollm2_135m,
    tie_output,
)
from torchtune_gist.models.smollm2._tokenizer import (
    SMOLLM2_VOCAB_SIZE,
    SmolLM2Tokenizer,
    smollm2_gist_token_ids,
    smollm2_tokenizer,
)

__all__ = [
    "SMOLLM2_135M_ARGS",
    "SMOLLM2_VOCAB_SIZE",
    "SmolLM2Tokenizer",
    "convert_gguf",
    "convert_hf",
    "fetch_smollm2_gguf",
    "gguf_state_dict",
    "gguf_tokenizer_json",
    "gist_smollm2_135m",
    "load_hf_checkpoint",
    "lora_gist_smollm2_135m",
    "lora_smollm2_135m",
    "prepare_smollm2",
    "smollm2_135m",
    "smollm2_gist_token_ids",
    "smollm2_tokenizer",
    "tie_output",
]
