"""Batches with task ids: what a collator must add so LiME can report routing per task."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class TaskIdsCollator:
    """Wraps any data collator and adds a ``task_ids`` tensor (one id per sample) to the batches it builds.

    The task id is popped from every example (key ``task_key``) before the inner collator sees it, so collators that
    pad every key (``DataCollatorWithPadding``) or read only some (TRL's) are unaffected. ``task_ids`` reaches LiME's
    per-task telemetry through ``peft_lime.enable_task_ids`` (``LimeRoutingCallback`` installs it) and never reaches
    the base model.

    Trainers drop dataset columns that the base model's ``forward`` does not accept before collation: keep the task
    column with ``remove_unused_columns=False`` in ``TrainingArguments`` / ``SFTConfig`` (and drop other raw columns
    such as text yourself if the inner collator cannot handle them).

    Per-sample ids do not describe packed or padding-free rows (several samples share one row); such batches are
    left without ``task_ids`` and per-task statistics are then not recorded.

    Args:
        collator: the collator to wrap (e.g. ``DataCollatorWithPadding(tokenizer)`` or TRL's collator).
        task_key: the example key holding the integer task id.
    """

    def __init__(self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]], task_key: str = "task_id") -> None:
        self.collator = collator
        self.task_key = task_key

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        examples = [dict(ex) for ex in examples]
        tasks = [ex.pop(self.task_key, None) for ex in examples]
        batch = self.collator(examples)
        if all(t is not None for t in tasks):
            rows = batch["input_ids"].shape[0] if "input_ids" in batch else len(examples)
            if rows == len(examples):  # packed / padding-free rows hold several samples: no per-row task
                batch["task_ids"] = torch.tensor([int(t) for t in tasks], dtype=torch.long)
        return batch
