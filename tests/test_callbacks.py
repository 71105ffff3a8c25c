"""Issue 3: LimeRoutingCallback. Log keys in log_history and TensorBoard, figures, per-task routing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

import peft_lime
from tests._models import VOCAB, lime, tiny_llama
from tests._trainer_utils import sentences, word_tokenizer
from trainer_callbacks import LimeRoutingCallback

trl = pytest.importorskip("trl")
pytest.importorskip("tensorboard")

KEYS = ("routing_entropy", "active_experts", "importance_loss", "kl_loss", "aux_loss", "load_imbalance")
PNG = b"\x89PNG\r\n\x1a\n"


def _check_ranges(entry: dict, E: int, imp_coef: float, kl_coef: float) -> None:
    values = {k: entry[f"lime/{k}"] for k in KEYS}
    assert all(isinstance(v, float) and math.isfinite(v) for v in values.values()), values
    assert 0.0 <= values["routing_entropy"] <= 1.0
    assert 1.0 <= values["active_experts"] <= E
    assert values["importance_loss"] >= -1e-6 and values["kl_loss"] >= -1e-6
    assert 1.0 <= values["load_imbalance"] <= E
    expected_aux = imp_coef * values["importance_loss"] + kl_coef * values["kl_loss"]
    assert values["aux_loss"] == pytest.approx(expected_aux, rel=1e-6, abs=1e-9)


def _events(output_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dirs = {p.parent for p in output_dir.rglob("events.out.tfevents.*")}
    assert len(run_dirs) == 1, run_dirs
    acc = EventAccumulator(str(run_dirs.pop()), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_sft_trainer_logs_routing_to_history_tensorboard_and_pngs(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    E, imp_coef, kl_coef = 4, 0.1, 0.01
    out = tmp_path / "sft"
    args = SFTConfig(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        logging_steps=2,
        save_strategy="no",
        report_to=["tensorboard"],
        use_cpu=True,
        bf16=False,
        max_length=24,
        dataloader_num_workers=0,
    )
    callback = LimeRoutingCallback()
    trainer = SFTTrainer(
        model=tiny_llama(0),
        args=args,
        train_dataset=Dataset.from_dict({"text": sentences(64)}),
        processing_class=word_tokenizer(),
        peft_config=peft_lime.LimeConfig(
            base=lime().base, num_experts=E, importance_loss_coef=imp_coef, kl_loss_coef=kl_coef
        ),
        callbacks=[callback],
    )
    # placed before the report_to integrations, so TensorBoard sees the keys it adds
    assert trainer.callback_handler.callbacks[0] is callback
    experts_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lime_experts" in n}
    trainer.train()

    assert peft_lime.find_lime_model(trainer.model).routing_context.aux_loss_scale == pytest.approx(0.5)
    experts_after = dict(trainer.model.named_parameters())
    moved = max((experts_after[n].detach() - p).abs().max().item() for n, p in experts_before.items())
    assert moved > 1e-4, "expert vectors did not change during SFTTrainer training"

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4, 6]
    for entry in logs:
        _check_ranges(entry, E, imp_coef, kl_coef)
    # the final summary entry is left alone
    final = trainer.state.log_history[-1]
    assert "train_runtime" in final and not any(k.startswith("lime/") for k in final)
    assert not any(k.startswith("lime/layer/") for h in logs for k in h)  # per-layer keys only when asked

    events = _events(out)
    for key in KEYS:
        series = events.Scalars(f"train/lime/{key}")  # TensorBoardCallback prefixes training logs with train/
        assert [e.step for e in series] == [2, 4, 6]
        for e, entry in zip(series, logs):
            assert e.value == pytest.approx(entry[f"lime/{key}"], rel=1e-5, abs=1e-7)
    assert {"lime/routing_heatmap", "lime/active_experts"} <= set(events.Tags()["images"])

    for name in ("lime_routing_heatmap.png", "lime_active_experts.png"):
        path = out / name
        assert path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 2000
    assert not (out / "lime_task_expert_usage.png").exists()  # no task ids in this run


def test_per_layer_keys_and_added_after_init(tmp_path):
    """trainer.add_callback after construction still lands first; per_layer=True logs every wrapped layer."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from tests.test_training import _common_args, _token_dataset

    model = get_peft_model(tiny_llama(0), lime())
    args = _common_args(str(tmp_path), max_steps=2, optim="adamw_torch", learning_rate=1e-3, report_to=["tensorboard"])
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**args),
        train_dataset=_token_dataset(),
        data_collator=DataCollatorForLanguageModeling(word_tokenizer(), mlm=False),
    )
    callback = LimeRoutingCallback(per_layer=True, plot_steps=1)
    trainer.add_callback(callback)
    trainer.train()
    assert trainer.callback_handler.callbacks[0] is callback
    layer_names = [n.removeprefix("base_model.model.") for n, m in model.named_modules() if hasattr(m, "lime_stats")]
    assert len(layer_names) == 4
    for entry in (h for h in trainer.state.log_history if "loss" in h):
        for name in layer_names:
            assert 0.0 <= entry[f"lime/layer/{name}/routing_entropy"] <= 1.0
            assert 1.0 <= entry[f"lime/layer/{name}/active_experts"] <= 4
        mean = sum(entry[f"lime/layer/{n}/routing_entropy"] for n in layer_names) / len(layer_names)
        assert entry["lime/routing_entropy"] == pytest.approx(mean, rel=1e-6)
    assert "train/lime/active_experts" in _events(tmp_path).Tags()["scalars"]
    assert (tmp_path / "lime_routing_heatmap-step1.png").is_file() and (
        tmp_path / "lime_routing_heatmap.png"
    ).is_file()


def test_active_experts_histogram_counts_valid_tokens():
    model = get_peft_model(tiny_llama(0), lime(num_experts=4))
    ids = torch.randint(3, VOCAB, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # padding never counts
    mask[2, :4] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    stats = peft_lime.get_routing_stats(model, reset=True)
    for layer in stats["layers"].values():
        hist = layer["active_histogram"]
        assert len(hist) == 5 and hist[0] == 0.0  # 0..E experts; every token selects at least one
        assert sum(hist) == pytest.approx(float(mask.sum()))
        assert sum(k * c for k, c in enumerate(hist)) / sum(hist) == pytest.approx(layer["active_experts"])
    assert sum(stats["aggregate"]["active_histogram"]) == pytest.approx(4 * float(mask.sum()))


# --- per-task routing ---------------------------------------------------------------------------------------------
TASKS = ("animals", "colours", "places")


def _task_dataset(n_per_task: int, seed: int = 0, first_id: int = 0):
    """Three tasks with disjoint vocabularies, so a router that reads the frozen output separates them."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    bands = [(4, 35), (35, 68), (68, VOCAB)]
    rows = {"input_ids": [], "task_id": []}
    for task, (lo, hi) in enumerate(bands):
        for _ in range(n_per_task):
            length = int(torch.randint(6, 14, (1,), generator=gen))
            rows["input_ids"].append(torch.randint(lo, hi, (length,), generator=gen).tolist())
            rows["task_id"].append(first_id + task)
    return Dataset.from_dict(rows)


def _task_trainer(tmp_path: Path, remove_unused_columns: bool, callback: LimeRoutingCallback, **overrides):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from tests.test_training import _common_args

    model = get_peft_model(tiny_llama(0), lime(num_experts=4, routing_gamma=0.3))
    args = _common_args(
        str(tmp_path),
        max_steps=4,
        optim="adamw_torch",
        learning_rate=1e-2,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        per_device_eval_batch_size=6,
        remove_unused_columns=remove_unused_columns,  # False keeps the task_id column for the collator
        **overrides,
    )
    collator = peft_lime.TaskIdsCollator(DataCollatorForLanguageModeling(word_tokenizer(), mlm=False))
    return Trainer(
        model=model,
        args=TrainingArguments(**args),
        train_dataset=_task_dataset(8),
        eval_dataset=_task_dataset(2, seed=1, first_id=3),  # evaluation-only task ids 3..5
        data_collator=collator,
        callbacks=[callback],
    )


def test_per_task_usage_and_mutual_information(tmp_path):
    callback = LimeRoutingCallback(task_names=TASKS)
    trainer = _task_trainer(tmp_path, remove_unused_columns=False, callback=callback)
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for entry in logs:
        _check_ranges(entry, 4, 0.1, 0.01)
        mi = entry["lime/task_expert_mi"]
        assert 0.0 < mi <= math.log(3) + 1e-9  # nats, bounded by H(task) <= log 3
        for task in TASKS:
            usage = [entry[f"lime/task/{task}/expert_{i}"] for i in range(4)]
            assert sum(usage) == pytest.approx(1.0, abs=1e-5) and min(usage) >= 0.0
    # evaluation logs carry no routing keys, and evaluation forwards (tasks 3..5) did not leak into the training
    # statistics logged after them
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 2 and not any(k.startswith("lime/") for h in evals for k in h)
    assert not any(k.startswith(("lime/task/3/", "lime/task/4/", "lime/task/5/")) for h in logs for k in h)
    print("task-expert MI per log (nats):", [round(h["lime/task_expert_mi"], 5) for h in logs])

    summary = callback.run_summary()
    assert sorted(summary["task_usage"]) == [0, 1, 2]
    print("run MI (nats):", summary["task_expert_mutual_information"])
    assert summary["task_expert_mutual_information"] > 0.0
    # the tasks route differently: their usage rows are not all the same
    rows = torch.tensor([summary["task_usage"][t] for t in range(3)])
    assert (rows.max(0).values - rows.min(0).values).max() > 1e-3
    png = tmp_path / "lime_task_expert_usage.png"
    assert png.is_file() and png.read_bytes()[:8] == PNG

    # task_ids reaches the telemetry but not the base model: a direct call with task_ids works too
    ids = torch.randint(4, 35, (2, 6))
    with torch.no_grad(), peft_lime.recording_routing_stats(trainer.model):  # eval mode: recorded when asked
        out = trainer.model(input_ids=ids, attention_mask=torch.ones_like(ids), task_ids=torch.tensor([0, 2]))
    assert torch.isfinite(out.logits).all()
    tasks_seen = peft_lime.get_routing_stats(trainer.model, reset=True)["aggregate"]["task_usage"]
    assert sorted(tasks_seen) == [0, 2]


def test_remove_unused_columns_drops_task_ids(tmp_path):
    """Documented requirement: with remove_unused_columns=True the Trainer drops task_id before the collator."""
    callback = LimeRoutingCallback(plots=False)
    trainer = _task_trainer(tmp_path, remove_unused_columns=True, callback=callback)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all("lime/routing_entropy" in h for h in logs)
    assert not any("lime/task_expert_mi" in h for h in logs)


@pytest.mark.parametrize("sync_ranks", [True, False])
def test_statistics_are_synced_across_ranks_before_each_read(tmp_path, monkeypatch, sync_ranks):
    """The callback sums the ranks' statistics (sync_routing_stats, tested on 2 ranks in test_distributed) right
    before it reads them: at each training log and at train end, never for evaluation logs; sync_ranks=False never."""
    events = []
    real_sync, real_read = peft_lime.sync_routing_stats, peft_lime.get_routing_stats

    def sync(model, group=None):
        events.append("sync")
        return real_sync(model, group)  # a single process: returns False, leaves the statistics alone

    def read(model, *args, **kwargs):
        events.append("read")
        return real_read(model, *args, **kwargs)

    monkeypatch.setattr(peft_lime, "sync_routing_stats", sync)
    monkeypatch.setattr(peft_lime, "get_routing_stats", read)
    trainer = _task_trainer(tmp_path, remove_unused_columns=False, callback=LimeRoutingCallback(sync_ranks=sync_ranks))
    trainer.train()
    reads = 2 + 1  # two training logs (steps 2 and 4) and train end; the two evaluation logs read nothing
    assert events == (["sync", "read"] * reads if sync_ranks else ["read"] * reads)
    assert all("lime/routing_entropy" in h for h in trainer.state.log_history if "loss" in h)


# --- console output (issue 16) --------------------------------------------------------------------------------------
COMPACT = {"loss", "lr", "routing_entropy", "active_experts", "task_expert_mi"}


def _console_logs(capsys) -> list[dict]:
    """The dicts the Trainer printed (ProgressCallback above its bar, or PrinterCallback), from captured stdout."""
    import ast

    out = capsys.readouterr().out
    return [ast.literal_eval(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("disable_tqdm", [False, True])  # ProgressCallback / PrinterCallback
def test_console_is_compact_by_default(tmp_path, capsys, disable_tqdm):
    callback = LimeRoutingCallback(task_names=TASKS, plots=False)
    assert callback.console == "compact"
    trainer = _task_trainer(tmp_path, remove_unused_columns=False, callback=callback, disable_tqdm=disable_tqdm)
    capsys.readouterr()
    trainer.train()
    printed = _console_logs(capsys)
    train_lines = [d for d in printed if "loss" in d]
    assert len(train_lines) == 2  # logging_steps=2, max_steps=4: one line per log
    assert all(set(d) == COMPACT for d in train_lines), train_lines
    assert any("eval_loss" in d for d in printed)  # evaluation logs still print, with their own keys
    assert not any(k.startswith("lime/") for d in printed for k in d)
    # only the console is filtered: the history (and report_to) keep every key
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(f"lime/task/{TASKS[0]}/expert_0" in h and "grad_norm" in h for h in logs)


@pytest.mark.parametrize("console", ["full", "off"])
def test_console_full_and_off(tmp_path, capsys, console):
    trainer = _task_trainer(
        tmp_path, remove_unused_columns=False, callback=LimeRoutingCallback(task_names=TASKS, plots=False,
                                                                             console=console)
    )
    capsys.readouterr()
    trainer.train()
    train_lines = [d for d in _console_logs(capsys) if "loss" in d]
    assert len(train_lines) == 2 and all("grad_norm" in d for d in train_lines)
    if console == "full":  # what transformers prints by default: every key, per-task routing included
        assert all(f"lime/task/{TASKS[2]}/expert_3" in d and "lime/routing_entropy" in d for d in train_lines)
    else:
        assert not any(k.startswith("lime/") for d in train_lines for k in d)
    assert all("lime/routing_entropy" in h for h in trainer.state.log_history if "loss" in h)


def test_console_mode_is_validated_and_filter_installs_once():
    from transformers.trainer_callback import ProgressCallback

    from trainer_callbacks import CONSOLE_MODES
    from trainer_callbacks.console import console_logs, install_console_filter

    assert CONSOLE_MODES == ("compact", "full", "off")
    with pytest.raises(ValueError, match="console"):
        LimeRoutingCallback(console="verbose")
    with pytest.raises(ValueError, match="console"):
        console_logs({"loss": 1.0}, "quiet")
    progress = ProgressCallback()
    original = progress.on_log
    assert install_console_filter([progress, LimeRoutingCallback()], "off") == 1
    assert install_console_filter([progress], "compact") == 1  # a second install only changes the mode
    assert progress.on_log.on_log == original and progress.on_log.mode == "compact"
    logs = {"loss": 1.0, "learning_rate": 0.1, "grad_norm": 2.0, "lime/routing_entropy": 0.5, "lime/task/a/expert_0": 1}
    assert console_logs(logs, "compact") == {"loss": 1.0, "lr": 0.1, "routing_entropy": 0.5}
    assert console_logs(logs, "off") == {"loss": 1.0, "learning_rate": 0.1, "grad_norm": 2.0}
    assert console_logs(logs, "full") == logs
