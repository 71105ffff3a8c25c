"""LiME on bitsandbytes-quantized backbones (QLoRA 4-bit nf4 / fp4, 8-bit), on CPU.

bitsandbytes 0.50 runs its 4-bit and 8-bit layers on CPU, so these tests exercise the real quantized code paths:
LiME must wrap PEFT's own bnb LoRA layers (never read the packed weights as floats), train, save / load into a
freshly quantized backbone, keep learning when TRL casts the trainable parameters to bf16, and run under SFTTrainer.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("bitsandbytes")

from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from peft.tuners.lora import bnb as lora_bnb  # noqa: E402
from transformers import BitsAndBytesConfig, LlamaForCausalLM  # noqa: E402

import peft_lime  # noqa: E402
from peft_lime import LimeExperts, LimeLayer  # noqa: E402

from ._models import tiny_llama_config  # noqa: E402

# Tiny matmuls gain nothing from threads; on a busy 2-core machine OpenMP spin-waits made them 50x slower.
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 128
TARGETS = ["q_proj", "v_proj", "up_proj"]
KINDS = ["nf4", "fp4", "int8"]
BNB_LORA_LAYER = {"nf4": lora_bnb.Linear4bit, "fp4": lora_bnb.Linear4bit, "int8": lora_bnb.Linear8bitLt}


def _quant_config(kind: str, **extra) -> BitsAndBytesConfig:
    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        **extra,
    )


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    """A tiny fp32 Llama checkpoint on disk, quantized on load by each test."""
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _quantized_backbone(path, kind: str, **extra):
    model = LlamaForCausalLM.from_pretrained(
        path, quantization_config=_quant_config(kind, **extra), dtype=torch.float32
    )
    return prepare_model_for_kbit_training(model)


def _lime_config(**base_kwargs) -> peft_lime.LimeConfig:
    return peft_lime.LimeConfig(base=LoraConfig(r=8, target_modules=TARGETS, **base_kwargs), num_experts=4)


def _batch(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (2, 12), generator=gen)


def _train(model, x, steps: int, lr: float = 1e-2, weight_decay: float = 0.0) -> list[float]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def _experts(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lime_experts" in n}


@pytest.mark.parametrize("kind", KINDS)
def test_lime_wraps_peft_bnb_lora_layers(backbone_dir, kind):
    model = get_peft_model(_quantized_backbone(backbone_dir, kind), _lime_config())
    lime_layers = {n: m for n, m in model.named_modules() if isinstance(m, LimeLayer)}
    assert len(lime_layers) == 2 * len(TARGETS)  # 2 decoder layers x 3 targets
    frozen_cls = {"nf4": "Linear4bit", "fp4": "Linear4bit", "int8": "Linear8bitLt"}[kind]
    for name, layer in lime_layers.items():
        # The base tuner built its own quantized LoRA layer; LiME wraps that one, not the bnb layer itself.
        assert type(layer.base_layer) is BNB_LORA_LAYER[kind], name
        frozen = layer.get_base_layer()
        assert type(frozen).__module__.startswith("bitsandbytes") and type(frozen).__name__ == frozen_cls, name
        assert layer.out_features == frozen.out_features  # width read from the layer, not from the packed storage
        assert isinstance(layer.lime_experts["default"], LimeExperts)
        assert layer.lime_experts["default"].weight.shape == (4, frozen.out_features)
    if kind != "int8":
        weight = lime_layers[next(iter(lime_layers))].get_base_layer().weight
        assert weight.dtype == torch.uint8 and weight.quant_state.quant_type == kind  # really packed 4-bit storage
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n or "lime_experts" in n) for n in trainable)


@pytest.mark.parametrize("kind", KINDS)
def test_training_reduces_loss(backbone_dir, kind):
    model = get_peft_model(_quantized_backbone(backbone_dir, kind), _lime_config())
    before = _experts(model)
    losses = _train(model, _batch(), steps=5)
    assert all(math.isfinite(v) for v in losses)
    # Observed drop ~0.25 nats over 5 AdamW steps at lr 1e-2 on a fixed batch; 0.05 leaves room for jitter noise
    # while still failing if the quantized layers did not pass gradients to the adapter.
    assert losses[-1] < losses[0] - 0.05, losses
    after = _experts(model)
    assert any(not torch.equal(before[n], after[n]) for n in before), "expert vectors never moved"


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_reload_into_fresh_quantized_backbone(backbone_dir, tmp_path, kind):
    model = get_peft_model(_quantized_backbone(backbone_dir, kind), _lime_config())
    _train(model, _batch(), steps=2)  # LoRA B leaves 0 and experts leave their init, so the adapter matters
    x = _batch(seed=1)
    with torch.no_grad():
        expected = model(input_ids=x).logits
        model.disable_adapter_layers()
        plain = model(input_ids=x).logits
        model.enable_adapter_layers()
    assert (expected - plain).abs().max() > 1e-3  # otherwise the round trip would compare backbones only
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(_quantized_backbone(backbone_dir, kind), tmp_path).eval()
    assert any(isinstance(m, LimeLayer) and isinstance(m.base_layer, BNB_LORA_LAYER[kind]) for m in loaded.modules())
    with torch.no_grad():
        got = loaded(input_ids=x).logits
    # Quantizing the same fp32 checkpoint is deterministic and all compute is fp32 (compute_dtype=float32), so the
    # only differences are summation-order noise; 1e-4 absolute on logits of order 1 is far below any adapter effect
    # (checked above to exceed 1e-3).
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_cast_experts_still_learn(backbone_dir, kind):
    """TRL casts trainable parameters of quantized models to bf16; experts stored as P - 1 keep learning at lr 1e-3."""
    model = get_peft_model(_quantized_backbone(backbone_dir, kind), _lime_config(init_lora_weights=False))
    for name, param in model.named_parameters():  # what trl 1.16 SFTTrainer does for quantized models
        if param.requires_grad and "lora_magnitude_vector" not in name:
            param.data = param.data.to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("lime_experts.default.weight")}
    assert before and all(p.dtype == torch.bfloat16 for p in before.values())
    # init_lora_weights=False: B != 0, so the experts get gradient on the very first step. No weight decay, so any
    # change is the gradient's doing.
    _train(model, _batch(), steps=1, lr=1e-3)
    after = {n: p.detach() for n, p in model.named_parameters() if n in before}
    for name in before:
        assert after[name].dtype == torch.bfloat16
        changed = (after[name] != before[name]).float().mean().item()
        # Adam's first step moves every element with non-zero gradient by ~lr = 1e-3; stored deviations are in
        # [-0.1, 0.1] where the bf16 spacing is <= 2**-11 ~ 4.9e-4, so nearly all of them change. Require most.
        assert changed > 0.5, f"{name}: only {changed:.0%} of the expert entries changed"
    # Control: had the vectors been stored as P (near 1.0, bf16 spacing 2**-7 ~ 7.8e-3), the same update is lost.
    p_near_one = (1.0 + before[next(iter(before))].float()).to(torch.bfloat16)
    assert torch.equal((p_near_one.float() + 1e-3).to(torch.bfloat16), p_near_one)


def test_4bit_with_bf16_quant_storage(backbone_dir):
    """bnb_4bit_quant_storage=bfloat16 (what FSDP needs to shard QLoRA weights) still trains LiME and keeps the wrap."""
    model = get_peft_model(
        _quantized_backbone(backbone_dir, "nf4", bnb_4bit_quant_storage=torch.bfloat16), _lime_config()
    )
    layer = next(m for m in model.modules() if isinstance(m, LimeLayer))
    assert isinstance(layer.base_layer, lora_bnb.Linear4bit)
    assert layer.get_base_layer().weight.dtype == torch.bfloat16  # packed 4-bit data viewed as bf16 storage
    assert layer.out_features == layer.get_base_layer().out_features
    losses = _train(model, _batch(), steps=5)
    assert losses[-1] < losses[0] - 0.05, losses  # same margin as test_training_reduces_loss


def _word_tokenizer():
    """A word-level fast tokenizer built offline, with pad / eos / bos tokens (ids 0, 1, 2 like the backbone)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a cat dog bird sat ran flew on over mat log tree big small red blue".split()
    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )


def test_sft_trainer_on_4bit_backbone(backbone_dir, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    texts = ["the cat sat on the mat", "a big dog ran over a log", "the small red bird flew", "a blue dog sat"]
    dataset = Dataset.from_dict({"text": texts * 4})
    model = LlamaForCausalLM.from_pretrained(
        backbone_dir, quantization_config=_quant_config("nf4"), dtype=torch.float32
    )
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        max_length=32,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=_word_tokenizer(), peft_config=_lime_config()
    )
    lime_layers = [m for m in trainer.model.modules() if isinstance(m, LimeLayer)]
    assert lime_layers and all(isinstance(m.base_layer, lora_bnb.Linear4bit) for m in lime_layers)
    experts = {n: p for n, p in trainer.model.named_parameters() if "lime_experts" in n}
    assert all(p.dtype == torch.bfloat16 for p in experts.values())  # TRL's QLoRA cast reached the experts
    before = {n: p.detach().clone() for n, p in experts.items()}

    result = trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert math.isfinite(result.training_loss)
    # LoRA B starts at 0, so the experts get gradient from step 2 on; 2 bf16 Adam steps at lr <= 1e-3 must show.
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before), "expert vectors never moved"
