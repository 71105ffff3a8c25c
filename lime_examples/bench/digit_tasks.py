"""Synthetic multi-task classification over digit strings: same inputs, conflicting label mappings, shared labels.

An input is a task word followed by ``num_digits`` digits separated by spaces ("red 4 7 1 9 3"), so every digit is
one BERT token and the task is visible to the model. Every task answers with labels from ONE shared set ("a", "b",
"c"), each with its own rule, so the same digit string maps to different labels under different tasks: one shared
adapter has to condition everything on the task word, while an adapter per task does not. Test sets are as large as
wanted (fresh strings), validation and test strings never occur in training, and training draws fresh strings each
step (no example is seen twice), so a run's training data is a function of its seed only.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Digits = tuple[int, ...]
LABELS = ("a", "b", "c")


@dataclass(frozen=True)
class DigitTask:
    """One task: the word that names it in the input, its labels (a prefix of LABELS) and its rule."""

    name: str
    word: str
    labels: tuple[str, ...]
    rule: Callable[[Digits], int]  # index into ``labels``
    description: str


def _mod3(perm: tuple[int, int, int]) -> Callable[[int], int]:
    return lambda value: perm[value % 3]


_M012, _M201, _M120 = _mod3((0, 1, 2)), _mod3((2, 0, 1)), _mod3((1, 2, 0))

# Every rule maps onto the same labels, so the mappings conflict on shared inputs.
TASKS: dict[str, DigitTask] = {
    t.name: t
    for t in (
        DigitTask("last_mod3", "red", LABELS, lambda d: _M012(d[-1]), "last digit mod 3 (0,1,2 -> a,b,c)"),
        DigitTask("first_mod3", "blue", LABELS, lambda d: _M201(d[0]), "first digit mod 3 (0,1,2 -> c,a,b)"),
        DigitTask("second_mod3", "green", LABELS, lambda d: _M120(d[1]), "second digit mod 3 (0,1,2 -> b,c,a)"),
        DigitTask(
            "first_vs_last",
            "gold",
            LABELS,
            lambda d: 0 if d[0] > d[-1] else (1 if d[0] < d[-1] else 2),
            "first digit >, <, = last digit -> a, b, c",
        ),
        DigitTask("last_parity", "pink", LABELS[:2], lambda d: d[-1] % 2, "last digit even -> a, odd -> b"),
        DigitTask("first_parity", "gray", LABELS[:2], lambda d: 1 - d[0] % 2, "first digit even -> b, odd -> a"),
        DigitTask("sevens_parity", "brown", LABELS[:2], lambda d: d.count(7) % 2, "number of 7s even -> a, odd -> b"),
        DigitTask("sum_mod3", "black", LABELS, lambda d: _M120(sum(d)), "digit sum mod 3 (0,1,2 -> b,c,a)"),
        DigitTask(
            "max_bucket",
            "white",
            LABELS,
            lambda d: 0 if max(d) <= 6 else (1 if max(d) <= 8 else 2),
            "largest digit <= 6 -> a, 7-8 -> b, 9 -> c",
        ),
    )
}


@dataclass(frozen=True)
class Example:
    """One item: task index (position in the benchmark's task list), digits, input text and gold label."""

    task: int
    digits: Digits
    text: str
    label: str


def render(task: DigitTask, digits: Digits) -> str:
    """The model input: the task word, then the digits separated by spaces."""
    return task.word + " " + " ".join(str(d) for d in digits)


def make_example(tasks: Sequence[DigitTask], t: int, digits: Digits) -> Example:
    task = tasks[t]
    return Example(t, digits, render(task, digits), task.labels[task.rule(digits)])


class DigitSuite:
    """Validation and test sets (``per_task`` each, the same digit strings under every task) and a training stream.

    Args:
        task_names: keys of ``TASKS``, in the order that defines the task indices.
        num_digits: digits per input.
        val_per_task / test_per_task: items per task of each split.
        data_seed: seed of the validation and test strings.
    """

    def __init__(
        self, task_names: Sequence[str], num_digits: int, val_per_task: int, test_per_task: int, data_seed: int = 0
    ) -> None:
        if len(set(task_names)) != len(task_names) or any(n not in TASKS for n in task_names):
            raise ValueError(f"task_names: unknown or repeated names in {list(task_names)}; known: {sorted(TASKS)}")
        if 10**num_digits < 4 * (val_per_task + test_per_task):
            raise ValueError(f"num_digits={num_digits} leaves too few distinct strings for the held-out splits")
        self.tasks = [TASKS[n] for n in task_names]
        self.num_digits = num_digits
        rng = random.Random(f"digit-suite-{data_seed}")
        held_out: set[Digits] = set()
        strings = []
        while len(strings) < val_per_task + test_per_task:
            digits = tuple(rng.randrange(10) for _ in range(num_digits))
            if digits not in held_out:
                held_out.add(digits)
                strings.append(digits)
        self.held_out = frozenset(held_out)
        self.validation = self._items(strings[:val_per_task])
        self.test = self._items(strings[val_per_task:])

    def _items(self, strings: Sequence[Digits]) -> list[Example]:
        return [make_example(self.tasks, t, d) for t in range(len(self.tasks)) for d in strings]

    @property
    def labels(self) -> list[str]:
        """The union of the tasks' label sets (the classification head's outputs), in LABELS order."""
        used = {label for task in self.tasks for label in task.labels}
        return [label for label in LABELS if label in used]

    def task_label_ids(self) -> list[list[int]]:
        """Per task, the head indices of its own labels."""
        index = {label: i for i, label in enumerate(self.labels)}
        return [[index[label] for label in task.labels] for task in self.tasks]

    def train_stream(self, seed: int, micro_batch: int) -> Callable[[int], list[Example]]:
        """``draw(task)`` -> a fresh micro-batch of one task; the sequence of draws is a function of ``seed`` only."""
        rng = random.Random(f"digit-train-{seed}")

        def draw(t: int) -> list[Example]:
            out = []
            while len(out) < micro_batch:
                digits = tuple(rng.randrange(10) for _ in range(self.num_digits))
                if digits not in self.held_out:
                    out.append(make_example(self.tasks, t, digits))
            return out

        return draw


def task_order(seed: int, step: int, num_tasks: int) -> list[int]:
    """The shuffled order of the single-task micro-batches of one optimizer step (same for every method)."""
    order = list(range(num_tasks))
    random.Random(f"task-order-{seed}-{step}").shuffle(order)
    return order


def majority_baseline(examples: Sequence[Example], num_tasks: int) -> list[float]:
    """Per task, the accuracy of always answering the task's most frequent test label (the floor)."""
    out = []
    for t in range(num_tasks):
        labels = [ex.label for ex in examples if ex.task == t]
        out.append(max(labels.count(v) for v in set(labels)) / len(labels))
    return out
