"""Issue 3: LiME under real trainers. Aux loss on every path, expert learning rate, resume from checkpoint.

Every run is a tiny Llama on CPU; one optimizer step unless the test is about more.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model

import peft_lime
from tests._models import lime, tiny_llama
from tests._trainer_utils import conversations, sentences, word_tokenizer
from trainer_callbacks import LimeRoutingCallback

trl = pytest.importorskip("trl")

PATHS = [
    "trainer",
    "trainer_grad_accum",
    "trainer_ckpt_reentrant",
    "trainer_ckpt",
    "sft",
    "sft_packing",
    "sft_assistant",
]


def _token_dataset(n: int = 16, seed: int = 0, identical: bool = False):
    from datasets import Dataset

    tok = word_tokenizer()
    texts = sentences(1, seed) * n if identical else sentences(n, seed)
    return Dataset.from_dict({"input_ids": [tok(t)["input_ids"] for t in texts]})


def _lm_collator():
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(word_tokenizer(), mlm=False)


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def _common_args(out: str, **overrides) -> dict:
    args = dict(
        output_dir=out,
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=0.5,
        optim="sgd",  # the update is proportional to the gradient, so a changed aux term shows in it
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # no clipping: it would rescale the gradient differently in the two runs
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        seed=0,
    )
    args.update(overrides)
    return args


def _run(path: str, coef: float, tmp_path, **config_overrides) -> tuple[dict, dict, object]:
    """One optimizer step on ``path`` with both balance coefficients set to ``coef``: (params before, after, trainer)."""
    config = lime(importance_loss_coef=coef, kl_loss_coef=coef, **config_overrides)
    out = str(tmp_path / f"{path}-{coef}")
    if path.startswith("trainer"):
        from transformers import Trainer, TrainingArguments

        extra = {}
        dataset = _token_dataset()
        if path == "trainer_grad_accum":
            extra = dict(gradient_accumulation_steps=2, per_device_train_batch_size=2)
        elif path.startswith("trainer_ckpt"):
            extra = dict(
                gradient_checkpointing=True,
                gradient_checkpointing_kwargs={"use_reentrant": path.endswith("reentrant")},
            )
        model = get_peft_model(tiny_llama(0), config)
        if path == "trainer_ckpt_reentrant":
            model.enable_input_require_grads()  # reentrant checkpointing needs inputs that require grad (PEFT docs)
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**_common_args(out, **extra)),
            train_dataset=dataset,
            data_collator=_lm_collator(),
            callbacks=[LimeRoutingCallback(plots=False)],  # sets the aux scale to 1 / accumulation steps
        )
    else:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        extra = dict(max_length=24)
        if path == "sft_assistant":
            dataset = Dataset.from_dict({"messages": conversations(16)})
            extra.update(assistant_only_loss=True)
        else:
            dataset = Dataset.from_dict({"text": sentences(16)})
        if path == "sft_packing":
            extra.update(packing=True, packing_strategy="bfd")  # BFD packing is padding-free
        trainer = SFTTrainer(
            model=tiny_llama(0),
            args=SFTConfig(**_common_args(out, bf16=False, **extra)),
            train_dataset=dataset,
            processing_class=word_tokenizer(),
            peft_config=config,
        )
    before = _trainable(trainer.model)
    trainer.train()
    return before, _trainable(trainer.model), trainer


def _max_diff(a: dict, b: dict, key: str = "") -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a if key in n)


@pytest.mark.parametrize("path", PATHS)
def test_aux_coefficients_change_first_update(path, tmp_path):
    before, off, trainer = _run(path, 0.0, tmp_path)
    _, on, _ = _run(path, 10.0, tmp_path)
    if path == "sft_packing":  # padding-free batches: one packed row whose sequences restart at position 0
        batch = next(iter(trainer.get_train_dataloader()))
        assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
        assert int((batch["position_ids"][0] == 0).sum()) > 1
    if path == "sft_assistant":
        batch = next(iter(trainer.get_train_dataloader()))
        assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
    # the step moved the adapter and the expert vectors
    assert _max_diff(before, off, "lora_") > 1e-4
    assert _max_diff(before, off, "lime_experts") > 1e-6
    # the balance loss reached the gradient: same seed and data, different coefficients, different first update
    assert _max_diff(off, on, "lora_") > 1e-3, path
    assert all(math.isfinite(v.abs().max().item()) for v in on.values())


@pytest.mark.parametrize("path", ["trainer", "sft"])
def test_first_update_is_deterministic(path, tmp_path):
    """Baseline for the test above: the same coefficients give the same update, so a difference means the aux term."""
    _, a, _ = _run(path, 10.0, tmp_path / "a")
    _, b, _ = _run(path, 10.0, tmp_path / "b")
    assert _max_diff(a, b) == 0.0


def test_gradient_accumulation_scales_aux_like_lm_loss(tmp_path):
    """Two identical micro-batches with accumulation 2 must update exactly like one of them without accumulation.

    Holds for the LM loss (token-normalised across micro-batches) and, with the aux gradient scaled by 1/2, for the
    balance loss; an unscaled aux term would count twice. Jitter off so both micro-batches route identically.
    """
    from transformers import Trainer, TrainingArguments

    def step(ga: int, coef: float, callback: bool = True) -> dict:
        model = get_peft_model(tiny_llama(0), lime(importance_loss_coef=coef, kl_loss_coef=coef, jitter_noise=0.0))
        args = _common_args(str(tmp_path / f"ga{ga}-{coef}"), per_device_train_batch_size=2)
        args["gradient_accumulation_steps"] = ga
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**args),
            train_dataset=_token_dataset(identical=True),
            data_collator=_lm_collator(),
            callbacks=[LimeRoutingCallback(plots=False)] if callback else None,
        )
        trainer.train()
        scale = peft_lime.find_lime_model(model).routing_context.aux_loss_scale
        assert scale == pytest.approx(1.0 / ga if callback else 1.0)
        return _trainable(model)

    ga1, ga2 = step(1, 10.0), step(2, 10.0)
    aux_effect = _max_diff(ga1, step(1, 0.0), "lora_")
    assert aux_effect > 1e-3  # the aux term matters at this coefficient ...
    assert _max_diff(ga1, ga2) < 1e-5  # ... and accumulation reproduces the single-batch update
    # Without the callback (aux scale left at 1) the balance gradient would count once per micro-batch.
    assert _max_diff(ga1, step(2, 10.0, callback=False)) > 1e-3


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_same_update(reentrant, tmp_path):
    """With checkpointing the aux gradient arrives once per micro-batch: same update as without."""
    _, plain, _ = _run("trainer", 10.0, tmp_path / "plain", jitter_noise=0.0)
    path = "trainer_ckpt_reentrant" if reentrant else "trainer_ckpt"
    _, ckpt, _ = _run(path, 10.0, tmp_path / "ckpt", jitter_noise=0.0)
    assert _max_diff(plain, ckpt) < 1e-5


# --- expert learning rate ---------------------------------------------------------------------------------------
def test_lime_optimizer_param_groups():
    model = get_peft_model(tiny_llama(0), lime())
    opt = peft_lime.lime_optimizer(model, lr=1e-3, weight_decay=0.1, expert_lr=5e-3, expert_weight_decay=0.01)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"adapter", "lime_experts"}  # LoRA has no bias / norm parameters here
    assert groups["adapter"]["lr"] == 1e-3 and groups["adapter"]["weight_decay"] == 0.1
    assert groups["lime_experts"]["lr"] == 5e-3 and groups["lime_experts"]["weight_decay"] == 0.01
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("lime_experts" in names[id(p)] for p in groups["lime_experts"]["params"])
    assert all("lora_" in names[id(p)] for p in groups["adapter"]["params"])
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_trainable
    # experts: weight, shared vector and gate of each of the 4 wrapped layers
    assert len(groups["lime_experts"]["params"]) == 12


@pytest.mark.parametrize("trainer_kind", ["trainer", "sft"])
def test_expert_learning_rate_trains(trainer_kind, tmp_path):
    """expert_lr=0 freezes the experts while the adapter trains; the scheduler keeps the groups' lr ratio."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments
    from trl import SFTConfig, SFTTrainer

    model = get_peft_model(tiny_llama(0), lime())
    frozen_experts = peft_lime.lime_optimizer(model, lr=1e-2, expert_lr=0.0)
    common = _common_args(str(tmp_path / trainer_kind), max_steps=3, lr_scheduler_type="linear", optim="adamw_torch")
    if trainer_kind == "trainer":
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**common),
            train_dataset=_token_dataset(),
            data_collator=_lm_collator(),
            optimizers=(frozen_experts, None),
        )
    else:
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(**common, bf16=False, max_length=24),
            train_dataset=Dataset.from_dict({"text": sentences(16)}),
            processing_class=word_tokenizer(),
            optimizers=(frozen_experts, None),
        )
    before = _trainable(model)
    trainer.train()
    after = _trainable(model)
    assert _max_diff(before, after, "lime_experts") == 0.0
    assert _max_diff(before, after, "lora_") > 1e-3

    # A faster expert learning rate, through optimizer_cls_and_kwargs (no optimizer built by the user)
    model2 = get_peft_model(tiny_llama(0), lime())
    groups = peft_lime.lime_param_groups(model2, lr=1e-3, expert_lr=1e-2)
    trainer2 = Trainer(
        model=model2,
        args=TrainingArguments(**{**common, "output_dir": str(tmp_path / "cls_kwargs")}),
        train_dataset=_token_dataset(),
        data_collator=_lm_collator(),
        optimizer_cls_and_kwargs=(torch.optim.AdamW, {"params": groups}),
    )
    before2 = _trainable(model2)
    trainer2.train()
    lrs = {g["name"]: g["lr"] for g in trainer2.optimizer.param_groups}
    assert lrs["lime_experts"] == pytest.approx(10 * lrs["adapter"])  # linear decay scales both groups
    assert _max_diff(before2, _trainable(model2), "lime_experts") > 1e-3


# --- resume ----------------------------------------------------------------------------------------------------
class _StopAt:
    """Callback stopping training after ``step`` optimizer steps (the LR schedule still plans max_steps)."""

    def __new__(cls, step: int):
        from transformers import TrainerCallback

        class StopAt(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= step:
                    control.should_training_stop = True
                    control.should_save = True

        return StopAt()


def test_resume_reproduces_uninterrupted_run(tmp_path):
    from transformers import Trainer, TrainingArguments

    def make(out: str, save: bool, callbacks=None) -> Trainer:
        args = _common_args(
            out,
            max_steps=6,
            per_device_train_batch_size=2,
            learning_rate=5e-3,
            optim="adamw_torch",
            lr_scheduler_type="linear",
            save_strategy="steps" if save else "no",
            save_steps=3,
        )
        # jitter on (default): routing noise comes from torch's RNG, which the checkpoint must restore
        model = get_peft_model(tiny_llama(0), lime())
        return Trainer(
            model=model,
            args=TrainingArguments(**args),
            train_dataset=_token_dataset(n=12),
            data_collator=_lm_collator(),
            callbacks=callbacks,
        )

    full = make(str(tmp_path / "full"), save=False)
    full.train()
    reference = _trainable(full.model)

    first = make(str(tmp_path / "split"), save=True, callbacks=[_StopAt(3)])
    first.train()
    assert first.state.global_step == 3
    ckpt = tmp_path / "split" / "checkpoint-3"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()
    halfway = _trainable(first.model)
    assert _max_diff(halfway, reference) > 1e-3  # stopping early really left a different adapter

    resumed = make(str(tmp_path / "split"), save=False)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 6
    final = _trainable(resumed.model)
    assert set(final) == set(reference)
    assert _max_diff(final, reference, "lime_experts") < 1e-4
    assert _max_diff(final, reference) < 1e-4
