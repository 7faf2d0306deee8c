"""Every shipped config is well-formed for torchtune (what `tune validate` checks) and shares K."""

import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf
from torchtune import config

from torchtune_gist.training import check_components, check_known_keys

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
sys.path.insert(0, str(REPO / "recipes"))


def recipe_class(cfg: DictConfig) -> type:
    """The recipe a shipped config is for: eval (``runs``), generation (``prompt_transform``) or training."""
    from gist_eleuther_eval import GistEleutherEvalRecipe
    from gist_generate import GistGenerateRecipe
    from gist_lora_distributed import GistLoRAFinetuneRecipeDistributed

    if "runs" in cfg:
        return GistEleutherEvalRecipe
    return GistGenerateRecipe if "prompt_transform" in cfg else GistLoRAFinetuneRecipeDistributed


def test_configs_exist():
    names = {str(p.relative_to(p.parents[1])) for p in CONFIGS}
    assert {
        "llama3_1/8B_gist_lora.yaml",
        "llama3_1/8B_gist_qlora_single_device.yaml",
        "llama3_1/8B_gist_passkey_qlora_single_device.yaml",
        "tiny/gist_lora_single_device.yaml",
        "tiny/gist_lora_distributed.yaml",
        "tiny/gist_eval.yaml",
        "llama3_1/8B_gist_eval.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_validates_and_k_is_one_value(path: Path):
    cfg = OmegaConf.load(path)
    config.validate(cfg)
    check_components(cfg)  # stricter than torchtune's: every section's keys against its component's signature
    check_known_keys(cfg, recipe_class(cfg).config_keys, path.name)  # and no top-level key the recipe ignores
    assert cfg.model.num_gist_tokens == cfg.num_gist_tokens
    if "dataset" in cfg:
        assert cfg.dataset.num_gist_tokens == cfg.num_gist_tokens
    overridden = OmegaConf.merge(cfg, OmegaConf.from_dotlist(["num_gist_tokens=7"]))
    assert overridden.model.num_gist_tokens == 7
