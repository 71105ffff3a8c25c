"""What the Trainer's console line shows of the LiME keys: ``"compact"``, ``"full"`` or ``"off"``.

transformers prints every key of every log (``ProgressCallback`` above its tqdm bar, ``PrinterCallback`` without one).
With per-task and per-layer routing keys that is dozens of numbers per line. ``LimeRoutingCallback(console=...)``
hands those two callbacks a filtered copy of ``logs`` instead; the logs themselves (``trainer.state.log_history``,
TensorBoard and every other ``report_to`` target) keep every key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from transformers.trainer_callback import PrinterCallback, ProgressCallback, TrainerCallback

CONSOLE_MODES = ("compact", "full", "off")
# compact training lines: these keys only, under these names
COMPACT_KEYS = (
    ("loss", "loss"),
    ("learning_rate", "lr"),
    ("lime/routing_entropy", "routing_entropy"),
    ("lime/active_experts", "active_experts"),
    ("lime/task_expert_mi", "task_expert_mi"),
)


def check_console_mode(mode: str) -> str:
    """``mode`` if it is one of ``CONSOLE_MODES``; ValueError naming the argument otherwise."""
    if mode not in CONSOLE_MODES:
        raise ValueError(f"console: expected one of {CONSOLE_MODES}, got {mode!r}")
    return mode


def console_logs(logs: Mapping[str, Any], mode: str) -> dict[str, Any]:
    """The part of one log the console shows.

    ``"full"``: every key (transformers' default). ``"compact"``: a training log (it has ``loss``) becomes loss, lr,
    routing entropy, active experts and task-expert MI; other logs (evaluation, the final summary) keep their own keys.
    ``"off"``: every key but the ``lime/*`` ones.
    """
    check_console_mode(mode)
    if mode == "full":
        return dict(logs)
    if mode == "compact" and "loss" in logs:
        return {short: logs[key] for key, short in COMPACT_KEYS if key in logs}
    return {k: v for k, v in logs.items() if not k.startswith("lime/")}


class _FilteredOnLog:
    """Stands in for a printing callback's bound ``on_log`` (as an instance attribute): passes it filtered logs."""

    def __init__(self, on_log: Any, mode: str) -> None:
        self.on_log = on_log
        self.mode = mode

    def __call__(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> Any:
        if logs is not None:
            logs = console_logs(logs, self.mode)
        return self.on_log(args, state, control, logs=logs, **kwargs)


def install_console_filter(callbacks: Iterable[TrainerCallback], mode: str) -> int:
    """Filter the console output of the Trainer's printing callbacks in ``callbacks`` (idempotent: a second call only
    changes the mode). Returns how many callbacks print."""
    check_console_mode(mode)
    found = 0
    for cb in callbacks:
        if not isinstance(cb, (ProgressCallback, PrinterCallback)):
            continue
        found += 1
        current = cb.__dict__.get("on_log")
        if isinstance(current, _FilteredOnLog):
            current.mode = mode
        else:
            cb.on_log = _FilteredOnLog(cb.on_log, mode)
    return found
