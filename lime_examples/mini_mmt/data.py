"""mini-MMT records and fixed seeded splits: ``TaskInfo``, ``Example``, ``SplitCaps``, ``MiniMMT``.

Splits are made once per task from a seeded shuffle of *split units* (a chatterbot question text, an easy-vqa image,
a scikit-learn row), so a unit never lands in two splits, whatever the caps. Caps then take a label-balanced prefix
of each split: a smaller cap gives a subset of a larger cap's examples, and the test split does not depend on the
training cap. The tasks themselves are built in ``tasks.py``.
"""

from __future__ import annotations

import importlib
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..assets import MissingExtraError

IMAGE_SIZE = 32  # every image reaches the projector as 3 x 32 x 32 floats in [0, 1]
SPLITS = ("train", "validation", "test")
# Fractions of split units per split, for tasks without an official test split.
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)


@dataclass(frozen=True)
class TaskInfo:
    """Static description of one task."""

    task_id: int
    name: str
    modality: str  # "text", "image" or "tabular" (tabular rows are rendered as text)
    package: str  # pip package that provides the data
    module: str  # module imported from that package


TASKS: tuple[TaskInfo, ...] = (
    TaskInfo(0, "chat_topic", "text", "chatterbot-corpus", "chatterbot_corpus"),
    TaskInfo(1, "chat_answer", "text", "chatterbot-corpus", "chatterbot_corpus"),
    TaskInfo(2, "digits", "image", "scikit-learn", "sklearn"),
    TaskInfo(3, "easy_vqa", "image", "easy-vqa", "easy_vqa"),
    TaskInfo(4, "iris", "tabular", "scikit-learn", "sklearn"),
    TaskInfo(5, "wine", "tabular", "scikit-learn", "sklearn"),
    TaskInfo(6, "breast_cancer", "tabular", "scikit-learn", "sklearn"),
)
TASK_BY_NAME = {t.name: t for t in TASKS}
MODALITIES = ("text", "image", "tabular")


@dataclass(frozen=True)
class Example:
    """One prompt with a closed set of candidate answers; the gold answer is one of them."""

    task_id: int
    task: str
    modality: str
    prompt: str
    candidates: tuple[str, ...]
    label: str
    group: str  # split unit: examples sharing a group are always in the same split
    image: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)  # (3, H, W) in [0, 1]

    @property
    def label_index(self) -> int:
        """Index of the gold label in ``candidates``."""
        return self.candidates.index(self.label)


@dataclass(frozen=True)
class SplitCaps:
    """Maximum number of examples per task and split (None: no cap)."""

    train: Optional[int] = 96
    validation: Optional[int] = 16
    test: Optional[int] = 28

    def for_split(self, split: str) -> Optional[int]:
        """The cap of one split."""
        return {"train": self.train, "validation": self.validation, "test": self.test}[split]


@dataclass
class MiniMMT:
    """The loaded suite: examples per split, and the tasks they come from."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]
    tasks: tuple[TaskInfo, ...]

    def split(self, name: str) -> list[Example]:
        """Examples of one split by name."""
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]

    def summary(self) -> dict[str, dict[str, int]]:
        """Number of examples per task and split."""
        out: dict[str, dict[str, int]] = {}
        for name in SPLITS:
            for ex in self.split(name):
                out.setdefault(ex.task, dict.fromkeys(SPLITS, 0))[name] += 1
        return out


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------
def require(task: TaskInfo) -> Any:
    """Import the module a task needs, or raise MissingExtraError naming the pip package to install."""
    try:
        return importlib.import_module(task.module)
    except ImportError as err:
        raise MissingExtraError(
            f"mini-MMT task {task.name!r} needs the pip package {task.package!r}, which is not installed: "
            f"pip install {task.package}  (or pip install -e '.[demo]', or bash scripts/setup.sh)"
        ) from err


def split_units(units: Sequence[str], seed: int, fractions: tuple[float, float, float] = SPLIT_FRACTIONS) -> dict:
    """Assign each unit to a split by a seeded shuffle of the sorted units (deterministic, disjoint)."""
    order = sorted(set(units))
    random.Random(seed).shuffle(order)
    n_train = int(round(fractions[0] * len(order)))
    n_val = int(round(fractions[1] * len(order)))
    out = {}
    for i, unit in enumerate(order):
        out[unit] = "train" if i < n_train else ("validation" if i < n_train + n_val else "test")
    return out


def balanced_take(examples: Sequence[Example], cap: Optional[int], seed: int) -> list[Example]:
    """A label-balanced, seeded selection: round-robin over labels of a seeded shuffle; a prefix for smaller caps."""
    by_label: dict[str, list[Example]] = defaultdict(list)
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    for ex in shuffled:
        by_label[ex.label].append(ex)
    labels = sorted(by_label)
    random.Random(seed + 1).shuffle(labels)
    out: list[Example] = []
    depth = 0
    while len(out) < len(shuffled) and (cap is None or len(out) < cap):
        for label in labels:
            if depth < len(by_label[label]) and (cap is None or len(out) < cap):
                out.append(by_label[label][depth])
        depth += 1
    return out
