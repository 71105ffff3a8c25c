"""Rows and runs of the main job's seed benchmark (benchmarks/main_job_seeds.py).

One run = one (row, lr, seed): a fresh copy of the base LM, the projector and the adapter drawn from ``seed``
(``initial_projector`` / ``wrap_with_adapter``: every row of a seed starts from the same projector and the same LoRA
tensors), the main job's Trainer run (``train``) on the task-balanced training set of that seed, then closed-set
scoring of the requested splits. LiME rows get ``task_ids`` in training (TrainCollator) and in scoring (needed by the
oracle routing modes, and by the task-expert mutual information read on the test split).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..mini_mmt.data import Example, MiniMMT
from ..mini_mmt.scoring import score_examples
from ..mini_mmt.vlm import MiniVLM, ProjectorConfig, PromptEncoder
from .report import routing_summary
from .stats import correct_items
from .train import adapter_config, balanced_train_set, initial_projector, train, wrap_with_adapter

logger = logging.getLogger(__name__)

RANK = 8
EXPERTS = 8
REFERENCE = "LoRA r=8"
LIME = "LiME E=8"
# Oracle routing modes: the route comes from the sample's task id, which must reach every forward.
TASK_MODES = ("task", "task_learned")


@dataclass(frozen=True)
class Row:
    """One benchmark row: plain LoRA ("lora") or LiME over LoRA ("lime") with extra LimeConfig fields ``lime``;
    ``expert_lr_ratio``: LiME's expert vectors train at this multiple of the row's lr (None: the same lr)."""

    name: str
    method: str
    rank: int = RANK
    lime: dict[str, Any] = field(default_factory=dict)
    expert_lr_ratio: Optional[float] = None

    def config(self) -> Any:
        """The PEFT config of this row."""
        return adapter_config(self.method, self.rank, EXPERTS, **self.lime)

    @property
    def needs_task_ids(self) -> bool:
        """True when the routing itself reads the task ids (the oracle rows)."""
        return self.lime.get("routing_mode") in TASK_MODES


def lime_fields() -> set[str]:
    """Fields of this peft_lime's LimeConfig."""
    import peft_lime

    return set(peft_lime.LimeConfig.__dataclass_fields__)


def ablation_rows(num_tasks: int) -> list[Row]:
    """LiME E=8 with one change each: no router (uniform mix), oracle routing by task (one expert per task, or a
    learned mix per task), and the authors' balance schedule with expert vectors at 2.5x the lr."""
    return [
        Row(f"{LIME} uniform routing", "lime", lime={"routing_mode": "uniform"}),
        Row(f"{LIME} oracle task routing", "lime", lime={"routing_mode": "task"}),
        Row(f"{LIME} oracle task mix", "lime", lime={"routing_mode": "task_learned", "num_tasks": num_tasks}),
        Row(
            f"{LIME} reference balance",
            "lime",
            lime={"importance_loss_coef": 0.001, "kl_loss_coef": 0.0001, "balance_interval": 50},
            expert_lr_ratio=2.5,
        ),
    ]


def is_ablation(row: Row) -> bool:
    """True for the LiME E=8 rows that change one thing against LiME E=8 (the ablation rows)."""
    return row.method == "lime" and row.name.startswith(f"{LIME} ")


def inherited_lr(search: dict[str, Any], source: str) -> dict[str, Any]:
    """The lr-search record of a row that trains at ``source``'s chosen lr instead of searching its own."""
    return {"grid": [search["chosen"]], "score": {}, "chosen": search["chosen"], "widened": [],
            "inherited_from": source}


def adapter_count(lm_config: Any, config: Any) -> int:
    """Trainable adapter parameters of ``config`` on a model of ``lm_config``, built on the meta device (no memory,
    no weights drawn)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(lm_config)
        return sum(p.numel() for p in get_peft_model(lm, config).parameters() if p.requires_grad)


def matched_rank(target: int, lm_config: Any) -> int:
    """The LoRA rank whose trainable count comes closest to ``target`` (counts are affine in the rank)."""
    one, two = (adapter_count(lm_config, Row("probe", "lora", rank=r).config()) for r in (1, 2))
    per_rank, fixed = two - one, 2 * one - two
    return max(1, round((target - fixed) / per_rank))


def make_rows(lm_config: Any, num_tasks: int) -> tuple[list[Row], list[str]]:
    """Every row whose LimeConfig fields exist in this peft_lime, and the rows left out with the reason."""
    lime = Row(LIME, "lime")
    rank = matched_rank(adapter_count(lm_config, lime.config()), lm_config)
    rows = [Row(REFERENCE, "lora"), Row(f"LoRA r={rank} (params of {LIME})", "lora", rank=rank), lime]
    skipped = []
    known = lime_fields()
    for row in ablation_rows(num_tasks):
        missing = sorted(set(row.lime) - known)
        if missing:
            skipped.append(f"{row.name} (this peft_lime's LimeConfig has no {', '.join(missing)})")
        else:
            rows.append(row)
    return rows, skipped


def select_rows(rows: list[Row], wanted: Optional[Sequence[str]]) -> list[Row]:
    """The rows named by ``wanted``, plus the reference LoRA r=8 that every difference is taken against; all rows
    when ``wanted`` is empty. An entry that is a row's full name selects that row only ("LiME E=8"); any other
    entry selects the rows whose names start with it ("LiME E=8 oracle" selects both oracle rows)."""
    if not wanted:
        return rows
    names = {r.name for r in rows}

    def picked(name: str) -> bool:
        return any(name == w if w in names else name.startswith(w) for w in wanted)

    return [r for r in rows if r.name == REFERENCE or picked(r.name)]


@dataclass
class Job:
    """What every run shares: the base LM's weights, the data, the encoder and the recipe."""

    lm_config: Any
    base_state: dict[str, torch.Tensor]
    data: MiniMMT
    encoder: PromptEncoder
    projector_config: ProjectorConfig
    recipe: dict[str, Any]  # max_steps, batch_size, warmup_ratio, projector_lr_ratio, logging_steps, train_cap,
    # eval_batch_size
    device: torch.device


def correctness_strings(examples: Sequence[Example], correct: Sequence[int], tasks: Sequence[str]) -> dict[str, str]:
    """Per task (in ``tasks`` order), one character per item of the split in its order: "1" correct, "0" wrong."""
    out = dict.fromkeys(tasks, "")
    for ex, c in zip(examples, correct):
        out[ex.task] += "1" if c else "0"
    return out


def _routing(peft_model: torch.nn.Module, data: MiniMMT) -> dict[str, Any]:
    summary = routing_summary(peft_model, data.tasks)
    agg = summary["aggregate"]
    return {
        "mutual_information": summary["task_expert_mutual_information"],
        "task_usage": summary["per_task_usage"],
        "active_experts": agg.get("active_experts"),
        "routing_entropy": agg.get("routing_entropy"),
    }


def start(row: Row, lm: torch.nn.Module, projector_config: ProjectorConfig, seed: int) -> MiniVLM:
    """The starting point of a run: the seed's projector and ``row``'s adapter on ``lm``, both drawn right after
    ``torch.manual_seed(seed)`` (so every row of a seed shares the projector and the LoRA tensors); LiME rows read
    the batches' ``task_ids`` (oracle routing, per-task telemetry)."""
    import peft_lime

    projector = initial_projector(projector_config, lm, seed)
    peft_model = wrap_with_adapter(lm, row.config(), seed)
    if row.method == "lime":
        peft_lime.enable_task_ids(peft_model)
    return MiniVLM(peft_model, projector)


def run_once(row: Row, job: Job, lr: float, seed: int, splits: Sequence[str]) -> dict[str, Any]:
    """Train ``row`` at ``lr`` from the starting weights of ``seed``; score ``splits`` ("validation", "test")."""
    import peft_lime

    from ..assets import fresh_base

    lime = row.method == "lime"
    vlm = start(row, fresh_base(job.lm_config, job.base_state, job.device), job.projector_config, seed)
    peft_model, projector = vlm.lm, vlm.projector
    r = job.recipe
    settings = {"max_steps": r["max_steps"], "batch_size": r["batch_size"], "lr": lr, "seed": seed,
                "projector_lr": r["projector_lr_ratio"] * lr, "warmup_ratio": r["warmup_ratio"],
                "logging_steps": r["logging_steps"]}
    if row.expert_lr_ratio is not None:
        settings["expert_lr"] = row.expert_lr_ratio * lr
    train_set = balanced_train_set(job.data.train, r["train_cap"], seed)
    names = {t.task_id: t.name for t in job.data.tasks}
    with tempfile.TemporaryDirectory() as tmp:
        info = train(vlm, job.encoder, train_set, names, settings, Path(tmp), job.device.type == "cuda", "off")
    grad_norms = [[h["step"], h["grad_norm"]] for h in info["log_history"] if "grad_norm" in h]
    out: dict[str, Any] = {
        "method": row.name, "lr": lr, "seed": seed,
        "trainable": sum(p.numel() for p in peft_model.parameters() if p.requires_grad),
        "projector_params": sum(p.numel() for p in projector.parameters()),
        "train_s": info["seconds"], "train_loss": info["train_loss"], "steps": info["steps"],
        "grad_norms": grad_norms,  # [step, norm before clipping]
        "warmup_steps": max(1, round(r["warmup_ratio"] * r["max_steps"])),
    }
    task_names = [t.name for t in job.data.tasks]
    for split in splits:
        examples = job.data.split(split)
        routing = lime and split == "test"
        if routing:
            peft_lime.reset_routing_stats(peft_model)
        t0 = time.perf_counter()
        with peft_lime.recording_routing_stats(peft_model) if routing else contextlib.nullcontext():
            scores = score_examples(vlm, job.encoder, examples, batch_size=r["eval_batch_size"],
                                    with_task_ids=lime, progress=False)
        out[f"{split}_eval_s"] = time.perf_counter() - t0
        out[split] = correctness_strings(examples, correct_items(examples, scores), task_names)
        if routing:
            out["routing"] = _routing(peft_model, job.data)
    return out


def validation_score(run: dict[str, Any]) -> float:
    """Validation macro accuracy of a run, in items: macro x number of validation items (so ``choose_lr``'s
    tolerance of one item means about one item of an average-size task), rounded against float noise."""
    strings = list(run["validation"].values())
    macro = sum(s.count("1") / len(s) for s in strings) / len(strings)
    return round(macro * sum(len(s) for s in strings), 6)


def search_lr(row: Row, lrs: Sequence[float], max_widen: int, search_seed: int,
              run: Callable[[Row, float, int, tuple[str, ...]], dict[str, Any]]) -> dict[str, Any]:
    """Grid search with the search seed on validation, widened by one point at an edge (up to ``max_widen``
    times); the lowest lr within one item of the best is chosen (lime_examples.bench.paired_stats)."""
    from ..bench.paired_stats import choose_lr, grid_edge, widen
    from ..bench.separation_report import fmt_lr

    grid, score, widened = sorted(lrs), {}, []
    while True:
        for lr in grid:
            if lr not in score:
                score[lr] = validation_score(run(row, lr, search_seed, ("validation",)))
        chosen = choose_lr(score)
        side = grid_edge(chosen, grid)
        if side is None:
            break
        if len(widened) >= max_widen:
            widened.append(f"still at the {side} edge after {max_widen} widenings")
            logger.warning("%s: lr %s at the %s edge of %s", row.name, fmt_lr(chosen), side, grid)
            break
        new = widen(grid, side)
        widened.append(f"{side}: + {fmt_lr(new)}")
        grid = sorted(grid + [new])
    return {"grid": grid, "score": {str(k): v for k, v in score.items()}, "chosen": chosen, "widened": widened}
