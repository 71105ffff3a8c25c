"""The main job's parts (``examples/demo.py``): training set-up, paired-bootstrap statistics, routing report and figures.

- ``train``: adapter configs (LiME or plain LoRA), the seeded starting weights (projector, adapter) every method of a
  seed shares, the task-balanced training set, the Trainer run.
- ``stats``: per-item correctness, distinct predictions per task, the task-stratified paired bootstrap.
- ``report``: routing telemetry grouped by task and modality, and the figures written next to results.json.
"""

from .stats import correct_items, distinct_predictions, paired_bootstrap
from .train import adapter_config, balanced_train_set, initial_projector, train, wrap_with_adapter

__all__ = [
    "adapter_config",
    "balanced_train_set",
    "correct_items",
    "distinct_predictions",
    "initial_projector",
    "paired_bootstrap",
    "train",
    "wrap_with_adapter",
]
