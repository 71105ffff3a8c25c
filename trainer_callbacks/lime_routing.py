"""LimeRoutingCallback: LiME routing telemetry for transformers' Trainer and TRL's trainers, without subclassing them."""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

from peft import PeftModel
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import CallbackHandler

import peft_lime
from peft_lime.telemetry import SCALAR_KEYS as LAYER_KEYS
from peft_lime.telemetry import mean_task_usage, task_expert_mutual_information

from .console import check_console_mode, install_console_filter
from .run_totals import RunTotals

logger = logging.getLogger(__name__)

# Logged from the aggregate: the per-layer scalars averaged over layers, plus the configured aux loss.
SCALAR_KEYS = (*LAYER_KEYS, "aux_loss")
FIGURES = {
    "routing_heatmap": "lime_routing_heatmap.png",
    "active_experts": "lime_active_experts.png",
    "task_expert_usage": "lime_task_expert_usage.png",
}


class LimeRoutingCallback(TrainerCallback):
    """A [`TrainerCallback`] that logs LiME routing statistics and draws routing figures.

    At every logging step it adds to the Trainer's ``logs`` (hence to ``trainer.state.log_history`` and to every
    ``report_to`` integration) the routing statistics aggregated over all optimizer steps and micro-batches since the
    previous log, padding excluded: ``lime/routing_entropy`` (normalised by log E), ``lime/active_experts``,
    ``lime/importance_loss``, ``lime/kl_loss``, ``lime/aux_loss``, ``lime/load_imbalance``; with per-task batches also
    ``lime/task_expert_mi`` (nats) and ``lime/task/<task>/expert_<i>`` (mean routing probability). Statistics are
    accumulated on the device by the LiME layers and read once per log, so training steps never wait on the host.

    At train end (and every ``plot_steps`` steps if set) it writes PNG figures to ``args.output_dir``: the routing
    heatmap (layers x experts), the Auto Top-K histogram (experts per token) and, with task ids, the task x expert
    specialisation figure; they also go to TensorBoard as images when it is a ``report_to`` target.

    At train begin it sets the LiME aux-loss scale to 1 / ``gradient_accumulation_steps`` (so the balance loss is
    averaged over micro-batches like the LM loss) and, unless ``capture_task_ids=False``, installs
    ``peft_lime.enable_task_ids`` on the PeftModel so a ``task_ids`` batch entry reaches the telemetry.

    Args:
        per_layer (`bool`, *optional*, defaults to `False`):
            Also log ``lime/layer/<name>/<statistic>`` for every wrapped layer.
        per_task (`bool`, *optional*, defaults to `True`):
            Log expert usage per task when batches carry ``task_ids``.
        task_names (`Mapping[int, str]` or `Sequence[str]`, *optional*):
            Names of the task ids, used in log keys and figures.
        plots (`bool`, *optional*, defaults to `True`):
            Write the figures at train end.
        plot_steps (`int`, *optional*):
            Also write them (suffixed ``-step<N>``) at logging steps that are multiples of ``plot_steps``.
        capture_task_ids (`bool`, *optional*, defaults to `True`):
            Install the ``task_ids`` pre-hook on the model at train begin.
        sync_ranks (`bool`, *optional*, defaults to `True`):
            Under DDP / FSDP (torch.distributed initialised, several ranks), sum the statistics over all ranks before
            logging, so every rank logs the routing of the global batch (one all-reduce per log).
        console (`str`, *optional*, defaults to `"compact"`):
            What the Trainer prints for each log (its tqdm bar stays): `"compact"`, one short line per training log
            (loss, lr, routing entropy, active experts, task-expert MI); `"full"`, every key as transformers prints
            by default (per-task and per-layer keys included); `"off"`, the Trainer's own keys without any `lime/*`
            key. Only the console changes: `log_history` and the `report_to` integrations receive every key.
    """

    def __init__(
        self,
        per_layer: bool = False,
        per_task: bool = True,
        task_names: Optional[Union[Mapping[int, str], Sequence[str]]] = None,
        plots: bool = True,
        plot_steps: Optional[int] = None,
        capture_task_ids: bool = True,
        sync_ranks: bool = True,
        console: str = "compact",
    ) -> None:
        self.console = check_console_mode(console)
        if plot_steps is not None and plot_steps < 1:
            raise ValueError(f"plot_steps: must be None or >= 1, got {plot_steps}")
        self.per_layer = per_layer
        self.per_task = per_task
        if task_names is not None and not isinstance(task_names, Mapping):
            task_names = dict(enumerate(task_names))
        self.task_names: dict[int, str] = dict(task_names or {})
        self.plots = plots
        self.plot_steps = plot_steps
        self.capture_task_ids = capture_task_ids
        self.sync_ranks = sync_ranks
        self._handler: Optional[CallbackHandler] = None
        self._model = None
        self._totals = RunTotals()
        self._own_tb_writer = None
        self.written_figures: list[str] = []

    # --- callback order -------------------------------------------------------------------------------------
    def _move_first(self) -> None:
        """Put this callback first in the Trainer's callback list and filter what its printing callbacks show.

        Callbacks passed to ``Trainer(callbacks=...)`` come after the ``report_to`` integrations, which would then
        see ``logs`` before this callback adds the LiME keys. Callbacks receive no reference to the Trainer, so the
        handler is read from the caller's frame (``CallbackHandler.call_event``). The list is replaced, not
        mutated, because ``call_event`` is iterating over it right now.
        """
        frame = sys._getframe(1)
        for _ in range(4):
            if frame is None:
                break
            owner = frame.f_locals.get("self")
            if isinstance(owner, CallbackHandler) and any(cb is self for cb in owner.callbacks):
                self._handler = owner
                install_console_filter(owner.callbacks, self.console)
                if owner.callbacks[0] is not self:
                    owner.callbacks = [self] + [cb for cb in owner.callbacks if cb is not self]
                return
            frame = frame.f_back
        if self._handler is None:
            logger.warning(
                "LimeRoutingCallback could not find the Trainer's callback list: report_to integrations that run "
                "before it will not receive the lime/* keys (trainer.state.log_history still does)."
            )

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._move_first()

    # --- training -------------------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._handler is None:  # added with trainer.add_callback after __init__
            self._move_first()
        model = kwargs.get("model")
        try:
            lime_model = peft_lime.find_lime_model(model)
        except ValueError:
            logger.warning("LimeRoutingCallback: the model has no LiME adapter; nothing will be logged")
            self._model = None
            return
        self._model = model
        peft_lime.set_aux_loss_scale(lime_model, 1.0 / max(int(args.gradient_accumulation_steps), 1))
        if self.capture_task_ids and not getattr(model, "_lime_task_ids_hook", None):
            if isinstance(model, PeftModel):
                # PeftModel.forward consumes task_ids itself; the pre-hook reads them first. Marked so that
                # repeated train() calls do not stack hooks.
                model.__dict__["_lime_task_ids_hook"] = peft_lime.enable_task_ids(model)
        if isinstance(model, PeftModel):
            # save_pretrained / push_to_hub of this model (Trainer checkpoints, the final save) write the LiME section
            # of the model card; per instance, nothing is patched globally.
            peft_lime.enable_lime_model_card(model)
        # Statistics recorded before training (a pre-train evaluation, a manual forward) are not part of the run.
        peft_lime.reset_routing_stats(model)
        self._totals = RunTotals()

    def _set_recording(self, enabled: bool) -> None:
        if self._model is not None:
            peft_lime.set_routing_stats_enabled(self._model, enabled)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._set_recording(True)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # Between optimizer steps the Trainer may evaluate; those forwards must not count as training routing.
        self._set_recording(False)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        # Training logs carry "loss"; evaluation logs and the final summary do not (they are left alone).
        if self._model is None or logs is None or "loss" not in logs:
            return
        new = self._collect()
        if not new:
            return
        logs.update(new)
        # Trainer.log appends a copy of logs to log_history before calling on_log: update that copy too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            if "loss" in state.log_history[-1]:
                state.log_history[-1].update(new)
        if self.plot_steps and state.global_step % self.plot_steps == 0:
            self._write_figures(args, state, suffix=f"-step{state.global_step}")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self._model is None:
            return
        self._collect()  # steps after the last log still count for the figures
        self._set_recording(True)  # evaluation after training records as usual
        if self.plots:
            self._write_figures(args, state)
        if self._own_tb_writer is not None:
            self._own_tb_writer.close()
            self._own_tb_writer = None

    # --- statistics -----------------------------------------------------------------------------------------
    def _task_name(self, task: int) -> str:
        return self.task_names.get(task, str(task))

    def _collect(self) -> dict[str, float]:
        """Read and reset the layers' statistics (one device sync per layer); returns the log entries."""
        if self.sync_ranks:
            peft_lime.sync_routing_stats(self._model)  # no-op in a single process
        stats = peft_lime.get_routing_stats(self._model, reset=True)
        layers, agg = stats["layers"], stats["aggregate"]
        if not layers or not any(v["tokens"] > 0 for v in layers.values()):
            return {}
        self._totals.add(layers)
        out = {f"lime/{k}": float(agg[k]) for k in SCALAR_KEYS}
        if self.per_layer:
            for name, v in layers.items():
                out.update({f"lime/layer/{name}/{k}": float(v[k]) for k in LAYER_KEYS})
        if agg.get("task_usage"):
            out["lime/task_expert_mi"] = float(agg["task_expert_mutual_information"])
            if self.per_task:
                for task, usage in sorted(agg["task_usage"].items()):
                    name = self._task_name(task)
                    out.update({f"lime/task/{name}/expert_{i}": float(u) for i, u in enumerate(usage)})
        bad = [k for k, v in out.items() if not math.isfinite(v)]
        if bad:
            logger.warning("LimeRoutingCallback: non-finite routing statistics %s", bad)
        return out

    def run_summary(self) -> dict[str, Any]:
        """Token-weighted routing over the whole run so far: layer usage, histogram, task usage and MI (nats)."""
        summaries = self._totals.layer_task_summaries()
        return {
            "layer_usage": self._totals.layer_usage(),
            "active_histogram": list(self._totals.histogram),
            "task_usage": mean_task_usage(summaries),
            "task_expert_mutual_information": task_expert_mutual_information(summaries),
        }

    # --- figures --------------------------------------------------------------------------------------------
    def _tb_writer(self, args: TrainingArguments):
        """TensorBoardCallback's writer when it is a report_to target (our own in its folder as a fallback)."""
        report_to = args.report_to if isinstance(args.report_to, (list, tuple)) else [args.report_to]
        if "tensorboard" not in report_to and "all" not in report_to:
            return None
        from transformers.integrations import TensorBoardCallback

        tb = next(
            (cb for cb in (self._handler.callbacks if self._handler else []) if isinstance(cb, TensorBoardCallback)),
            None,
        )
        if tb is not None and tb.tb_writer is not None:
            return tb.tb_writer
        if self._own_tb_writer is None:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = (tb.logging_dir if tb is not None else None) or os.getenv("TENSORBOARD_LOGGING_DIR")
            self._own_tb_writer = SummaryWriter(log_dir=log_dir or os.path.join(args.output_dir, "runs", "lime"))
        return self._own_tb_writer

    def _write_figures(self, args: TrainingArguments, state: TrainerState, suffix: str = "") -> None:
        if not state.is_world_process_zero:
            return
        from . import plots

        summary = self.run_summary()
        tasks = {self._task_name(t): u for t, u in summary["task_usage"].items()}
        figures = {
            "routing_heatmap": plots.routing_heatmap(summary["layer_usage"]),
            "active_experts": plots.active_experts_histogram(summary["active_histogram"]),
            "task_expert_usage": plots.task_expert_figure(tasks, summary["task_expert_mutual_information"]),
        }
        writer = self._tb_writer(args)
        out_dir = Path(args.output_dir)
        for key, fig in figures.items():
            if fig is None:
                continue
            path = plots.save_figure(fig, out_dir / FIGURES[key].replace(".png", f"{suffix}.png"))
            self.written_figures.append(str(path))
            if writer is not None:
                writer.add_image(f"lime/{key}", plots.figure_to_array(fig), state.global_step, dataformats="HWC")
        if writer is not None:
            writer.flush()
