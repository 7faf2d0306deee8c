"""Every shipped config is well-formed for torchtune (what `tune validate` checks) and shares K."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from torchtune import config

from torchtune_gist.training import check_components

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


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
    assert cfg.model.num_gist_tokens == cfg.num_gist_tokens
    if "dataset" in cfg:
        assert cfg.dataset.num_gist_tokens == cfg.num_gist_tokens
    overridden = OmegaConf.merge(cfg, OmegaConf.from_dotlist(["num_gist_tokens=7"]))
    assert overridden.model.num_gist_tokens == 7
