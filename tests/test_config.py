"""LimeConfig: validation, serialisation, delegation to the base config, registration with PEFT."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, PeftConfig, PromptTuningConfig, VeraConfig
from peft.utils import PeftType

import peft_lime
from peft_lime import LimeConfig

from ._models import lime, tiny_llama


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_experts", 0),
        ("num_experts", -3),
        ("top_k", 9),
        ("top_k", 0),
        ("auto_topk_threshold", 0.0),
        ("auto_topk_threshold", 1.5),
        ("n_gram", 0),
        ("selection", "medium"),
        ("ngram_mode", "sliding"),
        ("routing_norm", "layer"),
        ("temperature", 0.0),
        ("selection_temperature", -1.0),
        ("routing_gamma", 1.5),
        ("jitter_noise", -0.1),
        ("max_active_experts", 9),
        ("importance_loss_coef", -1.0),
    ],
)
def test_bad_values_raise_naming_the_field(field, value):
    kwargs = {"num_experts": 8, field: value}
    with pytest.raises(ValueError, match=rf"^{field}:"):
        LimeConfig(base=LoraConfig(target_modules=["q_proj"]), **kwargs)


def test_base_is_required_and_must_be_a_layer_tuner():
    with pytest.raises(ValueError, match="^base:"):
        LimeConfig()
    with pytest.raises(ValueError, match="^base:.*prompt learning"):
        LimeConfig(base=PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="^base:.*share state"):
        LimeConfig(base=VeraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="^base:"):
        LimeConfig(base=LimeConfig(base=LoraConfig(target_modules=["q_proj"])))
    with pytest.raises(ValueError, match="^base:"):
        LimeConfig(base={"r": 8})  # dict without peft_type


def test_num_experts_wider_than_layer_raises_at_get_peft_model():
    from peft import get_peft_model

    # v_proj of the tiny Llama has 16 output features (2 KV heads x 8)
    with pytest.raises(ValueError, match="^num_experts:.*16"):
        get_peft_model(tiny_llama(), lime(num_experts=17, top_k=1))


def test_delegates_base_attributes_reads_and_writes():
    config = LimeConfig(base=LoraConfig(r=8, target_modules=["q_proj"], bias="lora_only", modules_to_save=["lm_head"]))
    assert config.target_modules == {"q_proj"}
    assert config.bias == "lora_only"
    assert config.modules_to_save == ["lm_head"]
    config.modules_to_save = ["score"]  # TRL writes these on the top-level config
    assert config.base.modules_to_save == ["score"]
    assert config.r == 8
    with pytest.raises(AttributeError, match="no attribute 'not_a_field'"):
        _ = config.not_a_field
    # IA3 has no `bias`: LimeConfig must not invent one
    ia3 = LimeConfig(base=IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    with pytest.raises(AttributeError):
        _ = ia3.lora_dropout


@pytest.mark.parametrize(
    "base",
    [
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True),
        LoraConfig(r=4, target_modules=["q_proj"], use_rslora=True),
        IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
        LoHaConfig(r=4, target_modules=["q_proj"]),
        LoKrConfig(r=4, target_modules=["q_proj"]),
    ],
    ids=["dora", "rslora", "ia3", "loha", "lokr"],
)
def test_json_round_trip_rebuilds_base(tmp_path, base):
    config = LimeConfig(base=base, num_experts=4, n_gram=3, selection="hard")
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LIME"
    assert data["base"]["peft_type"] == base.peft_type.value
    assert isinstance(data["base"]["target_modules"], list)
    assert "runtime_config" not in data["base"]
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LimeConfig)
    assert type(loaded.base) is type(base)
    assert loaded.base.target_modules == base.target_modules
    assert (loaded.num_experts, loaded.n_gram, loaded.selection) == (4, 3, "hard")


def test_task_type_taken_from_base():
    config = LimeConfig(base=LoraConfig(target_modules=["q_proj"], task_type="CAUSAL_LM"))
    assert config.task_type == "CAUSAL_LM"


def test_registration_is_idempotent_and_complete():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    peft_lime.register_lime()
    peft_lime.register_lime()
    member = PeftType("LIME")
    assert member is PeftType.LIME is PeftType["LIME"]
    assert pickle.loads(pickle.dumps(member)) is member
    assert json.dumps({"t": member}) == '{"t": "LIME"}'
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is LimeConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is peft_lime.LimeModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == "lime_"
    assert sum(m.value == "LIME" for m in PeftType) == 1


def test_config_pickles_and_deepcopies():
    import copy

    config = lime(n_gram=2)
    for clone in (pickle.loads(pickle.dumps(config)), copy.deepcopy(config)):
        assert clone.to_dict() == config.to_dict()
        assert clone.target_modules == config.target_modules
    assert torch.is_tensor(torch.zeros(1))  # sanity: torch imported for the pickling of PeftType inside configs
