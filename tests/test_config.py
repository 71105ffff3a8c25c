"""LimeConfig: validation, serialisation, delegation to the base config, registration with PEFT."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle

import numpy as np
import pytest
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


def _lime_fields_annotated(*annotations: str) -> list[str]:
    """LimeConfig's own fields whose annotation (a string: the module uses postponed annotations) is one of these."""
    inherited = {f.name for f in dataclasses.fields(PeftConfig)}
    return [f.name for f in dataclasses.fields(LimeConfig) if f.name not in inherited and f.type in annotations]


FLOAT_FIELDS = _lime_fields_annotated("float")
INT_FIELDS = _lime_fields_annotated("int", "Optional[int]")
BOOL_FIELDS = _lime_fields_annotated("bool")


def test_field_lists_cover_the_config():
    # Guards the annotation-based lists above: if an annotation is rewritten they must not silently shrink.
    assert len(FLOAT_FIELDS) == 8
    assert sorted(INT_FIELDS) == ["balance_interval", "max_active_experts", "n_gram", "num_experts", "num_tasks", "top_k"]
    assert sorted(BOOL_FIELDS) == ["auto_topk", "shared_expert"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", "0.5"),
        ("routing_gamma", "0.7"),
        ("selection_temperature", "0.5"),
        ("auto_topk_threshold", "0.5"),
        ("jitter_noise", "0.1"),
        ("expert_init_std", None),
        ("kl_loss_coef", True),  # a bool is not a number here
        ("temperature", [0.5]),
        ("max_active_experts", 2.5),
        ("max_active_experts", "2"),
        ("num_experts", "8"),
        ("num_experts", 4.0),
        ("num_experts", True),
        ("top_k", np.bool_(True)),
        ("n_gram", 2.0),
        ("n_gram", None),
    ],
)
def test_wrong_types_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: must be"):
        LimeConfig(base=LoraConfig(target_modules=["q_proj"]), **{field: value})


@pytest.mark.parametrize(
    "value", [math.nan, math.inf, -math.inf, np.float32("nan")], ids=["nan", "inf", "-inf", "np-nan"]
)
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_non_finite_floats_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: must be a finite number"):
        LimeConfig(base=LoraConfig(target_modules=["q_proj"]), **{field: value})


@pytest.mark.parametrize("value", ["false", "no", "True", 0, 1, None, 1.0])
@pytest.mark.parametrize("field", BOOL_FIELDS)
def test_bool_fields_refuse_non_bools(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: must be a bool"):
        LimeConfig(base=LoraConfig(target_modules=["q_proj"]), **{field: value})


def test_numpy_scalars_are_accepted_and_stored_as_python_values(tmp_path):
    config = LimeConfig(
        base=LoraConfig(target_modules=["q_proj"]),
        num_experts=np.int64(4),
        top_k=np.int32(2),
        n_gram=np.uint8(2),
        max_active_experts=np.int16(3),
        num_tasks=np.int64(3),
        balance_interval=np.int32(5),
        temperature=np.float32(0.25),
        routing_gamma=1,  # an int is a valid float value
        auto_topk=np.bool_(False),
        shared_expert=np.bool_(True),
    )
    for name in INT_FIELDS:
        assert type(getattr(config, name)) is int, name
    for name in FLOAT_FIELDS:
        assert type(getattr(config, name)) is float, name
    for name in BOOL_FIELDS:
        assert type(getattr(config, name)) is bool, name
    assert (config.num_experts, config.top_k, config.n_gram, config.max_active_experts) == (4, 2, 2, 3)
    assert (config.num_tasks, config.balance_interval) == (3, 5)
    assert (config.temperature, config.routing_gamma, config.auto_topk) == (0.25, 1.0, False)
    json.dumps(config.to_dict())
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()


def test_unknown_base_peft_type_raises_naming_base():
    with pytest.raises(ValueError, match=r"^base: unknown peft_type 'NOPE'.*\bLORA\b"):
        LimeConfig(base={"peft_type": "NOPE", "r": 8})
    with pytest.raises(ValueError, match=r"^base: unknown peft_type"):
        LimeConfig(base={"peft_type": ["LORA"]})  # unhashable
    with pytest.raises(ValueError, match="^base: must be"):
        LimeConfig(base="LORA")
    # the base tuner's own refusal of its dict form is reported under `base` too
    with pytest.raises(ValueError, match="^base: .*layers_to_transform"):
        LimeConfig(base={"peft_type": "LORA", "target_modules": ["q_proj"], "layers_pattern": "layers"})
    # the dict form with a known type still works, whether the type is a string or the enum member
    assert isinstance(LimeConfig(base={"peft_type": PeftType.LORA, "target_modules": ["q_proj"]}).base, LoraConfig)


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
