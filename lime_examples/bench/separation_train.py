"""Rows, training and scoring of the separation benchmark (benchmarks/separation.py) on all-MiniLM-L6-v2.

Every row trains under ONE protocol: each micro-batch holds a single task, every optimizer step accumulates one
micro-batch of each task (in a shuffled order), the loss is the cross-entropy over the example's own task's labels
(the head spans the union of the label sets, in modules_to_save) divided by the number of tasks, AdamW with a linear
warm-up over the first 10% of steps then cosine decay, gradient clipping at 1.0. The per-task upper bound sends each
micro-batch through its task's own LoRA (and head): every adapter sees exactly the micro-batches of its task.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from .baselines.common import AuxLossCollector
from .baselines.molora import AUX_LOSS_COEF, MoLoraLinear
from .digit_tasks import DigitSuite, Example, task_order
from .harness import trainable_parameters

logger = logging.getLogger(__name__)

TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
RANK = 8
WARMUP_FRACTION = 0.1
EVAL_BATCH = 256
CALIBRATION_SEED = 100_000  # routing-centroid calibration streams: seed + this, never a training stream's seed


@dataclass(frozen=True)
class Row:
    """One benchmark row: ``kind`` is "lora", "lime", "molora" or "per_task" (one LoRA per task)."""

    name: str
    kind: str
    rank: int = RANK
    lime: dict[str, Any] = field(default_factory=dict)
    experts: int = 8
    top_k: int = 2
    # Learning rate of LiME's expert vectors relative to the adapter's (the authors train them at 2.5x).
    expert_lr_scale: float = 1.0

    @property
    def needs_task_ids(self) -> bool:
        """The oracle routing modes read each sample's task id in training and evaluation."""
        return self.lime.get("routing_mode") in ("task", "task_learned")


@dataclass
class Config:
    """What besides (row, lr, seed) decides a run's result."""

    steps: int
    micro_batch: int
    threads: int = 1


def load_base(num_labels: int) -> nn.Module:
    """all-MiniLM-L6-v2 with a classification head of ``num_labels`` outputs, in eval mode (dropout off)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from lime_examples.assets import minilm_dir

    hf_logging.set_verbosity_error()  # the head is "missing from the checkpoint" by design
    return AutoModelForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=num_labels)


def _lora_config(rank: int) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), modules_to_save=["classifier"])


def _fresh(base: nn.Module) -> nn.Module:
    """A copy of the backbone with a freshly initialised head (BERT's init), drawn from the current torch seed."""
    model = copy.deepcopy(base)
    nn.init.normal_(model.classifier.weight, std=0.02)
    nn.init.zeros_(model.classifier.bias)
    return model


def _wrap_molora(model: nn.Module, row: Row) -> AuxLossCollector:
    """MoLoRA-style experts on the TARGETS of the encoder (matched by qualified-name suffix, pooler excluded)."""
    model.requires_grad_(False)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and ".encoder." in f".{name}" and any(name.endswith(t) for t in TARGETS)
    ]
    for name, module in found:
        parent_name, child = name.rsplit(".", 1)
        wrapped = MoLoraLinear(module, row.rank, 2 * row.rank, row.experts, row.top_k)
        setattr(model.get_submodule(parent_name), child, wrapped)
    model.classifier.requires_grad_(True)
    return AuxLossCollector(model, AUX_LOSS_COEF)


class Adapted:
    """A row's trainable model(s): one model, or one per task for the per-task upper bound."""

    def __init__(self, row: Row, base: nn.Module, num_tasks: int) -> None:
        from peft import get_peft_model

        import peft_lime

        self.row, self.aux = row, None
        if row.kind == "per_task":
            self.models = [get_peft_model(_fresh(base), _lora_config(row.rank)) for _ in range(num_tasks)]
        elif row.kind == "lora":
            self.models = [get_peft_model(_fresh(base), _lora_config(row.rank))]
        elif row.kind == "lime":
            config = peft_lime.LimeConfig(base=_lora_config(row.rank), num_experts=row.experts, **row.lime)
            self.models = [get_peft_model(_fresh(base), config)]
            peft_lime.set_aux_loss_scale(self.models[0], 1.0 / num_tasks)  # averaged over the micro-batches
            peft_lime.enable_task_ids(self.models[0])
            # Routing statistics are telemetry (no effect on routing or on the balance loss): read on the test set
            # only (``predict``), not recorded in the training forwards.
            peft_lime.set_routing_stats_mode(self.models[0], "off")
        elif row.kind == "molora":
            model = _fresh(base)
            self.aux = _wrap_molora(model, row)
            self.models = [model]
        else:
            raise ValueError(f"row.kind: unknown {row.kind!r}")

    def model_for(self, task: int) -> nn.Module:
        return self.models[task if len(self.models) > 1 else 0]

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.models for p in m.parameters() if p.requires_grad]

    def trainable(self) -> int:
        return sum(trainable_parameters(m) for m in self.models)

    def train(self, mode: bool = True) -> None:
        for m in self.models:
            m.train(mode)


def trainable_count(row: Row, base: nn.Module, num_tasks: int) -> int:
    """Trainable parameters of a row (built once, not trained)."""
    return Adapted(row, base, num_tasks).trainable()


def matched_rank(kind: str, target: int, base: nn.Module, num_tasks: int, **kw: Any) -> int:
    """The rank at which a "lora" or "molora" row's trainable count comes closest to ``target``."""
    one, two = (trainable_count(Row("probe", kind, rank=r, **kw), base, num_tasks) for r in (1, 2))
    per_rank, fixed = two - one, 2 * one - two
    return max(1, round((target - fixed) / per_rank))


def encode(tok: Any, batch: Sequence[Example]) -> dict[str, torch.Tensor]:
    return dict(tok([ex.text for ex in batch], padding=True, return_tensors="pt"))


def _schedule(steps: int) -> Any:
    warmup = max(1, round(WARMUP_FRACTION * steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def _param_groups(adapted: Adapted, lr: float) -> list[dict[str, Any]]:
    """One group, or two when the row trains LiME's expert vectors at their own lr (``Row.expert_lr_scale``)."""
    if adapted.row.expert_lr_scale == 1.0:
        return [{"params": adapted.parameters()}]
    named = [(n, p) for m in adapted.models for n, p in m.named_parameters() if p.requires_grad]
    experts = [p for n, p in named if ".lime_experts." in n]
    return [
        {"params": [p for n, p in named if ".lime_experts." not in n]},
        {"params": experts, "lr": lr * adapted.row.expert_lr_scale},
    ]


def train(adapted: Adapted, suite: DigitSuite, tok: Any, lr: float, seed: int, cfg: Config) -> dict[str, Any]:
    """The shared protocol (module docstring); returns train seconds and the mean loss of the last 10% of steps."""
    num_tasks = len(suite.tasks)
    label_ids = suite.task_label_ids()
    index = {label: i for i, label in enumerate(suite.labels)}
    masks = []
    for own in label_ids:
        mask = torch.full((len(index),), float("-inf"))
        mask[own] = 0.0
        masks.append(mask)
    params = adapted.parameters()
    opt = torch.optim.AdamW(_param_groups(adapted, lr), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg.steps))
    draw = suite.train_stream(seed, cfg.micro_batch)
    adapted.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        step_loss = 0.0
        for t in task_order(seed, step, num_tasks):
            batch = draw(t)
            y = torch.tensor([index[ex.label] for ex in batch])
            inputs = encode(tok, batch)
            if adapted.row.needs_task_ids:
                inputs["task_ids"] = torch.full((len(batch),), t, dtype=torch.long)
            logits = adapted.model_for(t)(**inputs).logits + masks[t]
            loss = torch.nn.functional.cross_entropy(logits, y) / num_tasks
            total = loss
            if adapted.aux is not None:
                extra = adapted.aux()
                if extra is not None:
                    total = loss + extra / num_tasks
            total.backward()
            step_loss += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
    tail = losses[-max(1, cfg.steps // 10) :]
    return {"train_s": time.perf_counter() - t0, "loss_last": sum(tail) / len(tail)}


@torch.no_grad()
def predict(
    adapted: Adapted, suite: DigitSuite, tok: Any, examples: Sequence[Example], routing: bool = False
) -> tuple[list[str], Optional[dict[str, Any]]]:
    """Predicted label of every example (arg-max over its own task's labels), in order; with ``routing`` (LiME rows)
    also the routing statistics of these forwards with the task ids (mutual information, per-task usage)."""
    import peft_lime

    adapted.train(False)
    labels, label_ids = suite.labels, suite.task_label_ids()
    preds: list[str] = [""] * len(examples)
    by_task: dict[int, list[int]] = {}
    for i, ex in enumerate(examples):
        by_task.setdefault(ex.task, []).append(i)
    model = adapted.models[0]
    if routing:
        peft_lime.reset_routing_stats(model)
    ctx = peft_lime.recording_routing_stats(model) if routing else contextlib.nullcontext()
    with ctx:
        for t, idx in by_task.items():
            for start in range(0, len(idx), EVAL_BATCH):
                chunk = idx[start : start + EVAL_BATCH]
                batch = encode(tok, [examples[i] for i in chunk])
                if routing or adapted.row.needs_task_ids:
                    batch["task_ids"] = torch.full((len(chunk),), t, dtype=torch.long)
                logits = adapted.model_for(t)(**batch).logits[:, label_ids[t]]
                for i, j in zip(chunk, logits.argmax(-1).tolist()):
                    preds[i] = labels[label_ids[t][j]]
    stats = None
    if routing:
        agg = peft_lime.get_routing_stats(model, reset=True)["aggregate"]
        stats = {
            "mutual_information": agg["task_expert_mutual_information"],
            "task_usage": {str(k): v for k, v in agg["task_usage"].items()},
            "active_experts": agg["active_experts"],
            "routing_entropy": agg["routing_entropy"],
        }
    return preds, stats


def run_once(
    row: Row, base: nn.Module, suite: DigitSuite, tok: Any, lr: float, seed: int, cfg: Config, splits: Sequence[str]
) -> dict[str, Any]:
    """Train ``row`` with (lr, seed) and predict the requested splits ("validation", "test")."""
    import peft_lime

    torch.manual_seed(seed)
    adapted = Adapted(row, base, len(suite.tasks))
    if row.lime.get("routing_mode") == "centroid":  # unlabelled calibration draws, apart from the training stream
        draw = suite.train_stream(CALIBRATION_SEED + seed, cfg.micro_batch)
        batches = [encode(tok, draw(t)) for _ in range(4) for t in range(len(suite.tasks))]
        peft_lime.fit_routing_centroids(adapted.models[0], batches, seed=seed)
    out: dict[str, Any] = {"method": row.name, "lr": lr, "seed": seed, "trainable": adapted.trainable()}
    out.update(train(adapted, suite, tok, lr, seed, cfg))
    for split in splits:
        examples = getattr(suite, split)
        preds, stats = predict(adapted, suite, tok, examples, routing=row.kind == "lime" and split == "test")
        out[split] = per_task_strings(preds, len(suite.tasks), examples)
        if stats is not None:
            out["routing"] = stats
    return out


def per_task_strings(preds: Sequence[str], num_tasks: int, examples: Sequence[Example]) -> list[str]:
    """Predictions as one string per task (labels are single characters), in the split's item order."""
    out = [""] * num_tasks
    for p, ex in zip(preds, examples):
        out[ex.task] += p
    return out


def untrained_routing(row: Row, base: nn.Module, suite: DigitSuite, tok: Any) -> dict[str, Any]:
    """Routing statistics of a LiME row before any training, on the test set (the mutual information the token
    content alone gives: the reference for what training added)."""
    torch.manual_seed(0)
    adapted = Adapted(row, base, len(suite.tasks))
    return predict(adapted, suite, tok, suite.test, routing=True)[1] or {}
