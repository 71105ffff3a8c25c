"""mini-MMT: a small, fully offline multimodal multi-task suite for fine-tuning LMs with LiME.

Modelled on the paper's MMT-47 benchmark at toy scale: text, image and tabular tasks with closed label sets, scored
by log-likelihood of each candidate answer. Everything ships inside pip packages (see ``tasks.py``).

- ``data``: the ``Example`` record, task descriptions, fixed seeded splits.
- ``tasks``: the seven tasks and ``load_mini_mmt``.
- ``vlm``: a LLaVA-style patch projector that places image embeddings at placeholder tokens of the LM's input.
- ``scoring``: batched log-likelihood scoring of candidates, per-task and macro accuracy.
"""

from ..assets import MissingExtraError
from .data import TASKS, Example, MiniMMT, SplitCaps, TaskInfo
from .scoring import accuracy_report, score_examples
from .tasks import load_mini_mmt
from .vlm import MiniVLM, PatchProjector, PromptEncoder, TrainCollator, load_projector, save_projector

__all__ = [
    "TASKS",
    "Example",
    "MiniMMT",
    "MiniVLM",
    "MissingExtraError",
    "PatchProjector",
    "PromptEncoder",
    "SplitCaps",
    "TaskInfo",
    "TrainCollator",
    "accuracy_report",
    "load_mini_mmt",
    "load_projector",
    "save_projector",
    "score_examples",
]
