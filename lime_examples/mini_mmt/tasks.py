"""The seven mini-MMT tasks and ``load_mini_mmt``.

Every task has a closed label set and is built from data inside pip packages:

==  ==============  ========  ===========================================  ==========================
id  task            modality  prompt                                       labels
==  ==============  ========  ===========================================  ==========================
0   chat_topic      text      a chatterbot-corpus question                 its category (21 names)
1   chat_answer     text      question + 2 candidate replies               letter A / B
2   digits          image     8x8 handwritten digit (scikit-learn)         0-9
3   easy_vqa        image     64x64 synthetic image + question (easy-vqa)  13 answers
4   iris            tabular   four measurements as deciles (one digit)     3 species
5   wine            tabular   four wine features as deciles                3 cultivars
6   breast_cancer   tabular   four tumour features as deciles              malignant / benign
==  ==============  ========  ===========================================  ==========================

easy-vqa's official test images form the test split; its training images give train and validation. The other
tasks are split by ``data.split_units`` (the three small tables with ``TABULAR_FRACTIONS``: 40 % test). Tabular
deciles are computed on the training rows only.
"""

from __future__ import annotations

import importlib
import logging
import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Optional

import torch

from ..assets import chatterbot_pairs
from .data import (
    IMAGE_SIZE,
    SPLITS,
    TASK_BY_NAME,
    TASKS,
    Example,
    MiniMMT,
    SplitCaps,
    TaskInfo,
    balanced_take,
    require,
    split_units,
)

logger = logging.getLogger(__name__)

# Clipping keeps prompts short: a shuffled multi-task batch is padded to its longest prompt.
MAX_WORDS_QUESTION = 12
MAX_WORDS_CHOICE_QUESTION = 8  # chat_answer: its prompt holds the question and two replies
MAX_WORDS_ANSWER = 4


def _clip_words(text: str, n: int) -> str:
    words = str(text).split()
    return " ".join(words[:n]) + (" ..." if len(words) > n else "")


# --------------------------------------------------------------------------------------------------------------
# Builders: each returns {split: [Example, ...]} before caps
# --------------------------------------------------------------------------------------------------------------
Builder = Callable[[TaskInfo, int], dict[str, list[Example]]]


def _chatterbot_pairs(task: TaskInfo) -> list[tuple[str, str, str]]:
    """(question, answer, category) for every adjacent pair of utterances in the English corpus."""
    require(task)
    return [(p.question, p.answer, p.category) for p in chatterbot_pairs()]


def _build_chat_topic(task: TaskInfo, seed: int) -> dict[str, list[Example]]:
    pairs = _chatterbot_pairs(task)
    cats_of: dict[str, set[str]] = defaultdict(set)
    for q, _, c in pairs:
        cats_of[q].add(c)
    categories = tuple(sorted({c for _, _, c in pairs}))
    assign = split_units(list(cats_of), seed)
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for q in sorted(cats_of):
        if len(cats_of[q]) != 1:  # the same text in two categories has no single gold label
            continue
        prompt = f"Question: {_clip_words(q, MAX_WORDS_QUESTION)}\nTopic:"
        label = next(iter(cats_of[q]))
        out[assign[q]].append(Example(task.task_id, task.name, task.modality, prompt, categories, label, q))
    return out


def _build_chat_answer(task: TaskInfo, seed: int) -> dict[str, list[Example]]:
    pairs = _chatterbot_pairs(task)
    answers_of: dict[str, list[str]] = defaultdict(list)
    for q, a, _ in pairs:
        if a not in answers_of[q]:
            answers_of[q].append(a)
    assign = split_units(list(answers_of), seed)
    letters = ("A", "B")
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for split in SPLITS:
        questions = sorted(q for q in answers_of if assign[q] == split)
        pool = sorted({a for q in questions for a in answers_of[q]})  # distractors come from the same split
        rng = random.Random(f"{seed}-{split}")
        for i, q in enumerate(questions):
            own = set(answers_of[q])
            gold = rng.choice(answers_of[q])
            options = [a for a in pool if a not in own]
            if not options:
                continue
            distractors = rng.sample(options, 1)
            slot = (i + rng.randrange(2)) % 2
            choices = distractors[:slot] + [gold] + distractors[slot:]
            lines = "\n".join(f"{letter}. {_clip_words(c, MAX_WORDS_ANSWER)}" for letter, c in zip(letters, choices))
            prompt = f"Question: {_clip_words(q, MAX_WORDS_CHOICE_QUESTION)}\n{lines}\nBetter reply:"
            out[split].append(Example(task.task_id, task.name, task.modality, prompt, letters, letters[slot], q))
    return out


def _gray_to_rgb(img: torch.Tensor, size: int) -> torch.Tensor:
    """(h, w) in [0, 1] -> (3, size, size), nearest upsampling (keeps the strokes sharp)."""
    x = img[None, None].float()
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="nearest")
    return x[0].expand(3, size, size).contiguous()


def _build_digits(task: TaskInfo, seed: int) -> dict[str, list[Example]]:
    datasets = importlib.import_module(f"{require(task).__name__}.datasets")
    bunch = datasets.load_digits()
    units = [f"digits:{i}" for i in range(len(bunch.target))]
    assign = split_units(units, seed)
    labels = tuple(str(d) for d in range(10))
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    images = torch.as_tensor(bunch.images) / 16.0
    for i, unit in enumerate(units):
        image = _gray_to_rgb(images[i], IMAGE_SIZE)
        ex = Example(task.task_id, task.name, task.modality, "Which digit is shown?\nDigit:", labels,
                     str(int(bunch.target[i])), unit, image)
        out[assign[unit]].append(ex)
    return out


def _load_png(path: str, size: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB").resize((size, size), Image.BOX)
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return data.view(size, size, 3).permute(2, 0, 1).float() / 255.0


class _LazyImage:
    """Image paths resolved to tensors only for the examples that survive the caps."""

    def __init__(self, path: str) -> None:
        self.path = path


def _build_easy_vqa(task: TaskInfo, seed: int) -> dict[str, list[Example]]:
    evqa = require(task)
    answers = tuple(evqa.get_answers())
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    train_q = evqa.get_train_questions()
    train_paths = evqa.get_train_image_paths()
    assign = split_units([f"easy_vqa:train:{i}" for i in sorted(set(train_q[2]))], seed, (0.85, 0.15, 0.0))
    for (texts, labels, image_ids), paths, official in (
        (train_q, train_paths, "train"),
        (evqa.get_test_questions(), evqa.get_test_image_paths(), "test"),
    ):
        for text, label, image_id in zip(texts, labels, image_ids):
            unit = f"easy_vqa:{official}:{image_id}"
            split = assign[unit] if official == "train" else "test"
            prompt = f"Question: {text}\nAnswer:"
            ex = Example(task.task_id, task.name, task.modality, prompt, answers, label, unit,
                         _LazyImage(paths[image_id]))  # type: ignore[arg-type]
            out[split].append(ex)
    return out


# Tabular rows become a few one-digit tokens: each feature is replaced by its decile (0-9) among the task's TRAINING
# rows, so a number costs two tokens (space, digit) and "larger than" is an order on digits the LM already has. Feature subsets are
# the classic separating features. The small tables give 40% of their rows to the test split (at least 60 items).
TABULAR_FRACTIONS = (0.5, 0.1, 0.4)
_TABULAR = {
    "iris": dict(
        loader="load_iris",
        title="Iris",
        features=((0, "sepal length"), (1, "width"), (2, "petal length"), (3, "width")),
        labels=("setosa", "versicolor", "virginica"),
        cue="Species",
    ),
    "wine": dict(
        loader="load_wine",
        title="Wine",
        features=((0, "alcohol"), (6, "flavanoids"), (9, "color"), (12, "proline")),
        # The three cultivars of the UCI wine data (Forina et al., PARVUS): classes 0, 1, 2.
        labels=("barolo", "grignolino", "barbera"),
        cue="Cultivar",
    ),
    "breast_cancer": dict(
        loader="load_breast_cancer",
        title="Tumor",
        features=((0, "radius"), (1, "texture"), (23, "worst area"), (27, "concavity")),
        labels=("malignant", "benign"),
        cue="Diagnosis",
    ),
}


def decile_edges(values: torch.Tensor) -> torch.Tensor:
    """(n_rows, n_features) -> (9, n_features): the 10 %, 20 %, ..., 90 % quantiles of each column."""
    return torch.quantile(values.double(), torch.linspace(0.1, 0.9, 9, dtype=torch.float64), dim=0)


def to_deciles(row: torch.Tensor, edges: torch.Tensor) -> list[int]:
    """Decile (0-9) of each feature of one row, given ``decile_edges`` of the training rows."""
    return [int(torch.searchsorted(edges[:, j].contiguous(), row[j].double(), right=True)) for j in range(len(row))]


def _build_tabular(task: TaskInfo, seed: int) -> dict[str, list[Example]]:
    datasets = importlib.import_module(f"{require(task).__name__}.datasets")
    spec = _TABULAR[task.name]
    bunch = getattr(datasets, spec["loader"])()
    columns = [j for j, _ in spec["features"]]
    table = torch.as_tensor(bunch.data)[:, columns]
    units = [f"{task.name}:{i}" for i in range(len(bunch.target))]
    assign = split_units(units, seed, TABULAR_FRACTIONS)
    edges = decile_edges(table[[i for i, u in enumerate(units) if assign[u] == "train"]])  # training rows only
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for i, unit in enumerate(units):
        bins = to_deciles(table[i], edges)
        text = " ".join(f"{name} {b}" for (_, name), b in zip(spec["features"], bins))
        prompt = f"{spec['title']}: {text}\n{spec['cue']}:"
        ex = Example(task.task_id, task.name, task.modality, prompt, spec["labels"],
                     spec["labels"][int(bunch.target[i])], unit)
        out[assign[unit]].append(ex)
    return out


BUILDERS: dict[str, Builder] = {
    "chat_topic": _build_chat_topic,
    "chat_answer": _build_chat_answer,
    "digits": _build_digits,
    "easy_vqa": _build_easy_vqa,
    "iris": _build_tabular,
    "wine": _build_tabular,
    "breast_cancer": _build_tabular,
}


def _materialise(ex: Example) -> Example:
    if isinstance(ex.image, _LazyImage):
        return Example(ex.task_id, ex.task, ex.modality, ex.prompt, ex.candidates, ex.label, ex.group,
                       _load_png(ex.image.path, IMAGE_SIZE))
    return ex


def load_mini_mmt(
    tasks: Optional[Iterable[str]] = None,
    caps: Optional[SplitCaps] = None,
    seed: int = 0,
) -> MiniMMT:
    """Build mini-MMT.

    Args:
        tasks: task names to include (default: all of ``TASKS``); task ids stay those of ``TASKS``.
        caps: per-task caps of each split (default ``SplitCaps()``).
        seed: seed of the splits and of the balanced selection. Keep it fixed to compare runs: the training seed
            of a run is a separate thing.

    Raises:
        MissingExtraError: a task's data package is not installed (the message names the pip package).
        ValueError: an unknown task name.
    """
    names = list(tasks) if tasks is not None else [t.name for t in TASKS]
    unknown = [n for n in names if n not in TASK_BY_NAME]
    if unknown:
        raise ValueError(f"tasks: unknown mini-MMT task(s) {unknown}; known: {[t.name for t in TASKS]}")
    caps = caps or SplitCaps()
    chosen = tuple(TASK_BY_NAME[n] for n in sorted(set(names), key=lambda n: TASK_BY_NAME[n].task_id))
    per_split: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for task in chosen:
        built = BUILDERS[task.name](task, seed)
        for split in SPLITS:
            taken = balanced_take(built[split], caps.for_split(split), seed + task.task_id)
            per_split[split].extend(_materialise(ex) for ex in taken)
        logger.info("mini-MMT %s: %s", task.name, {s: len(built[s]) for s in SPLITS})
    return MiniMMT(per_split["train"], per_split["validation"], per_split["test"], chosen)
