"""Adapter lifecycle: save / load, several named adapters, every supported base tuner, other architectures."""

from __future__ import annotations

import json

import pytest
import torch
from peft import (
    AutoPeftModelForCausalLM,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftModel,
    get_peft_model,
)
from safetensors.torch import load_file

from peft_lime import LimeLayer

from ._models import VOCAB, lime, lora, tiny_bert_classifier, tiny_llama

BASES = {
    "lora": lambda: lora(target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": lambda: lora(use_rslora=True),
    "dora": lambda: lora(use_dora=True, target_modules=["q_proj", "up_proj"]),
    "ia3": lambda: IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
    ),
    "loha": lambda: LoHaConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False),
    "lokr": lambda: LoKrConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False),
}


def _logits(model, x, **kw):
    with torch.no_grad():
        return model(input_ids=x, **kw).logits


def _train_one_step(model, x):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("base_name", list(BASES))
def test_round_trip_gives_identical_logits(tmp_path, base_name):
    x = torch.randint(3, VOCAB, (2, 7))
    model = get_peft_model(tiny_llama(seed=3), lime(BASES[base_name](), n_gram=2))
    _train_one_step(model, x)  # so that experts differ from their initial values
    expected = _logits(model, x)
    model.save_pretrained(tmp_path)

    files = sorted(p.name for p in tmp_path.iterdir())
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LIME"
    assert config["base"]["peft_type"] == BASES[base_name]().peft_type.value
    weights = load_file(tmp_path / "adapter_model.safetensors")
    assert any("lime_experts" in k for k in weights)
    assert not any(".default." in k for k in weights)  # adapter name stripped like PEFT does

    loaded = PeftModel.from_pretrained(tiny_llama(seed=3), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, x), expected, rtol=0, atol=1e-6)


def test_automodel_loading(tmp_path):
    base = tiny_llama(seed=4)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, lime())
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    x = torch.randint(3, VOCAB, (1, 5))
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(loaded, x), _logits(model.eval(), x), rtol=0, atol=1e-6)


def test_two_named_adapters_round_trip_and_switch(tmp_path):
    x = torch.randint(3, VOCAB, (2, 6))
    model = get_peft_model(tiny_llama(seed=5), lime(num_experts=4), adapter_name="a")
    model.add_adapter("b", lime(num_experts=2, n_gram=3, selection="hard"))
    lime_layer = next(m for m in model.modules() if isinstance(m, LimeLayer))
    assert set(lime_layer.lime_experts) == {"a", "b"}
    assert set(lime_layer.base_layer.lora_A) == {"a", "b"}
    model.set_adapter("a")
    out_a = _logits(model.eval(), x)
    model.set_adapter("b")
    out_b = _logits(model, x)
    assert (out_a - out_b).abs().max() > 1e-4
    model.save_pretrained(tmp_path)  # non-default adapters are written to sub-folders a/ and b/

    loaded = PeftModel.from_pretrained(tiny_llama(seed=5), tmp_path / "a", adapter_name="a")
    loaded.load_adapter(tmp_path / "b", adapter_name="b")
    loaded.eval()
    loaded.set_adapter("a")
    torch.testing.assert_close(_logits(loaded, x), out_a, rtol=0, atol=1e-6)
    loaded.set_adapter("b")
    torch.testing.assert_close(_logits(loaded, x), out_b, rtol=0, atol=1e-6)

    loaded.delete_adapter("b")
    assert set(next(m for m in loaded.modules() if isinstance(m, LimeLayer)).lime_experts) == {"a"}
    torch.testing.assert_close(_logits(loaded, x), out_a, rtol=0, atol=1e-6)


def test_mixing_base_tuner_types_is_refused():
    model = get_peft_model(tiny_llama(), lime())
    with pytest.raises(ValueError, match="^base:.*same tuner type"):
        model.add_adapter("other", lime(IA3Config(target_modules=["q_proj"], feedforward_modules=[])))


@pytest.mark.parametrize("base_name", ["dora", "ia3", "loha", "lokr"])
def test_other_base_tuners_forward_backward(base_name):
    model = get_peft_model(tiny_llama(), lime(BASES[base_name]()))
    model.train()
    x = torch.randint(3, VOCAB, (2, 6))
    model(input_ids=x, labels=x).loss.backward()
    experts = [p for n, p in model.named_parameters() if n.endswith("lime_experts.default.weight")]
    assert experts and all(p.grad is not None and p.grad.abs().sum() > 0 for p in experts)


def test_lime_with_unit_modulation_equals_plain_base_tuner():
    """With every expert vector at 1 and the gate at 0, LiME must reproduce its base adapter exactly."""
    x = torch.randint(3, VOCAB, (2, 6))
    for name in ("lora", "dora", "ia3", "loha"):
        torch.manual_seed(11)
        plain = get_peft_model(tiny_llama(seed=9), BASES[name]()).eval()
        torch.manual_seed(11)
        wrapped = get_peft_model(tiny_llama(seed=9), lime(BASES[name](), n_gram=2)).eval()
        with torch.no_grad():
            for m in wrapped.modules():
                if isinstance(m, LimeLayer):
                    for experts in m.lime_experts.values():
                        experts.weight.zero_()  # stored as P - 1
                        experts.gate.zero_()
        torch.testing.assert_close(_logits(wrapped, x), _logits(plain, x), rtol=1e-5, atol=1e-6)


def test_bert_classifier_with_modules_to_save(tmp_path):
    base_cfg = LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS")
    model = get_peft_model(tiny_bert_classifier(seed=2), lime(base_cfg))
    x = torch.randint(3, VOCAB, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    labels = torch.tensor([0, 1, 2])
    model.train()
    model(input_ids=x, attention_mask=mask, labels=labels).loss.backward()
    assert any("classifier" in n and p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    model.eval()
    expected = _logits(model, x, attention_mask=mask)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_bert_classifier(seed=2), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded, x, attention_mask=mask), expected, rtol=0, atol=1e-6)
    # padding invariance in the encoder: row 2 alone, unpadded
    alone = _logits(loaded, x[2:, :2], attention_mask=mask[2:, :2])
    torch.testing.assert_close(alone, expected[2:], rtol=0, atol=1e-5)
