"""A checkpoint whose expert tensors do not match its config (or the model) is refused at load, not half-loaded."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from ._models import lime, tiny_llama


def _save(tmp_path, shared: bool) -> str:
    model = get_peft_model(tiny_llama(), lime(shared_expert=shared))
    model.save_pretrained(tmp_path)
    return str(tmp_path)


def _flip_config_shared_expert(path: str) -> None:
    cfg_path = os.path.join(path, "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["shared_expert"] = not cfg["shared_expert"]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("saved_shared", [True, False])
def test_shared_expert_mismatch_between_config_and_weights_raises(tmp_path, saved_shared):
    path = _save(tmp_path, saved_shared)
    _flip_config_shared_expert(path)
    with pytest.raises(ValueError, match="shared_expert"):
        PeftModel.from_pretrained(tiny_llama(), path)


def test_missing_expert_tensor_raises_naming_it(tmp_path):
    path = _save(tmp_path, True)
    weights_path = os.path.join(path, "adapter_model.safetensors")
    weights = load_file(weights_path)
    dropped = next(k for k in weights if k.endswith("lime_experts.weight"))
    del weights[dropped]
    save_file(weights, weights_path)
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        PeftModel.from_pretrained(tiny_llama(), path)


def test_matching_checkpoint_loads_exactly(tmp_path):
    model = get_peft_model(tiny_llama(), lime(expert_init_std=0.5)).eval()
    model.save_pretrained(tmp_path)
    x = torch.randint(3, 50, (2, 7))
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, atol=0, rtol=0)
