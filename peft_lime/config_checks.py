"""Checks behind LimeConfig's validation: one helper per kind of field, each raising ValueError("<field>: ...").

The value helpers also normalise what they accept (numpy scalars, ints given for floats) to plain Python values, so
a checked config serialises to JSON as is.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from typing import Any, Optional

import numpy as np
from peft import PeftConfig
from peft.utils import PeftType

# Values of LimeConfig.balance_scope: the tokens the load-balance losses are computed over (see balance.py).
BALANCE_SCOPES = ("micro_batch", "global")
# Values of LimeConfig.routing_mode: the paper's router, and the ablations that measure what it adds (routing_modes.py).
ROUTING_MODES = ("token", "centroid", "uniform", "task", "task_learned")

# Tuners whose layers are not independent (shared matrices owned by the model) or that are not layer tuners at all.
_SHARED_STATE_REASON = (
    "its layers share state owned by the model (shared projection matrices), so LiME cannot wrap one layer at a time"
)


# Layer tuners LiME refuses although their layers could be wrapped: the tuner's own model does part of its method.
_UNSUPPORTED_REASONS = {
    PeftType.ADALORA: "AdaLoRA's rank allocation (update_and_allocate) and orthogonal regularisation belong to "
    "AdaLoraModel, which LiME does not run, and its SVD-form layers (lora_E, ranknum) have no LiME delta; use a "
    "LoraConfig (LoRA, rsLoRA or DoRA) as base",
}


def _bad(name: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"{name}: must be {expected}, got {value!r}")


def _bounds(lo: Optional[float], hi: Optional[float], lo_open: bool, hi_open: bool) -> str:
    """' in (0, 1]', ' >= 0', ... : the accepted range in the words of the error messages."""
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {hi}"
    return ""


def check_int(name: str, value: Any, lo: int = 1, optional: bool = False) -> Optional[int]:
    """An integer >= lo (Python or numpy, never a bool or a float), returned as a plain int; None if optional."""
    if optional and value is None:
        return None
    expected = f"{'None or ' if optional else ''}an integer >= {lo}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise _bad(name, expected, value)
    return int(value)


def check_float(
    name: str,
    value: Any,
    lo: Optional[float] = None,
    hi: Optional[float] = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """A finite real number (int, float or numpy scalar; not a bool or a string) within the bounds, as a float."""
    expected = "a finite number" + _bounds(lo, hi, lo_open, hi_open)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _bad(name, expected, value)
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        raise _bad(name, expected, value) from None
    if not math.isfinite(number):
        raise _bad(name, expected, value)
    if lo is not None and (number <= lo if lo_open else number < lo):
        raise _bad(name, expected, value)
    if hi is not None and (number >= hi if hi_open else number > hi):
        raise _bad(name, expected, value)
    return number


def check_bool(name: str, value: Any) -> bool:
    """True or False (numpy's bool too); strings such as "false" and ints are refused rather than read as truthy."""
    if not isinstance(value, (bool, np.bool_)):
        raise _bad(name, "a bool (True or False)", value)
    return bool(value)


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise _bad(name, "one of " + ", ".join(repr(a) for a in allowed), value)
    return value


def check_routing_mode(config: Any) -> None:
    """routing_mode, num_tasks and balance_interval of a LimeConfig, checked together (ValueError naming the field)."""
    config.routing_mode = check_choice("routing_mode", config.routing_mode, ROUTING_MODES)
    config.num_tasks = check_int("num_tasks", config.num_tasks, optional=True)
    if config.routing_mode == "task_learned" and config.num_tasks is None:
        raise ValueError("num_tasks: routing_mode='task_learned' learns one mix per task and needs num_tasks, got None")
    config.balance_interval = check_int("balance_interval", config.balance_interval)
    if config.balance_interval > 1 and config.balance_scope != "micro_batch":
        raise ValueError(
            f"balance_interval: {config.balance_interval} applies the balance losses on one micro-batch in "
            f"{config.balance_interval}, which only balance_scope='micro_batch' supports (the global scope's window "
            "needs every micro-batch)"
        )


def build_base_config(base: PeftConfig | dict) -> PeftConfig:
    """Rebuild the wrapped tuner's config from its dict form (as saved in adapter_config.json)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if isinstance(base, PeftConfig):
        return base
    if not isinstance(base, dict):
        raise ValueError(f"base: must be a PEFT layer-tuner config or its dict form, got {type(base).__name__}")
    if "peft_type" not in base:
        raise ValueError("base: the dict form of the base config needs a 'peft_type' key (e.g. 'LORA')")
    peft_type = base["peft_type"]
    try:
        known = peft_type in PEFT_TYPE_TO_CONFIG_MAPPING
    except TypeError:  # unhashable, e.g. a list
        known = False
    if not known:
        names = ", ".join(sorted(str(t.value) for t in PEFT_TYPE_TO_CONFIG_MAPPING if t != PeftType.LIME))
        raise ValueError(f"base: unknown peft_type {peft_type!r}; known PEFT types: {names}")
    data = dict(base)
    data.pop("runtime_config", None)
    check_base_keys(PEFT_TYPE_TO_CONFIG_MAPPING[peft_type], data)
    try:
        return PeftConfig.from_peft_type(**data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"base: the {peft_type} config could not be built from its dict form: {exc}") from exc


def check_base_keys(config_cls: type, data: dict) -> None:
    """Refuse keys that ``config_cls`` has no field for. PEFT drops them with a warning (meant for configs saved by a
    newer PEFT), so a misspelled "lora_alph" would silently leave lora_alpha at its default."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(str(key) for key in data if key not in fields)
    if not unknown:
        return
    hints = [f"{close[0]!r} for {key!r}" for key in unknown if (close := difflib.get_close_matches(key, fields, n=1))]
    raise ValueError(
        f"base: unknown key(s) {unknown} for {config_cls.__name__}"
        + (f" (did you mean {', '.join(hints)}?)" if hints else "")
        + "; if the config was saved by a newer PEFT, upgrade peft"
    )


def revalidate_config(config: Any) -> None:
    """Run a LimeConfig's checks again, where LimeModel builds its layers: fields set after construction
    (``config.temperature = 0``) were never checked and would fail deep inside a forward, not naming the field."""
    object.__setattr__(config, "base", build_base_config(config.base))  # bypasses delegation, as __post_init__ does
    check_base_config(config.base)
    config._validate()


def check_base_config(base: PeftConfig) -> None:
    """Refuse base configs that LiME cannot wrap, saying why."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    peft_type = base.peft_type
    if peft_type == PeftType.LIME:
        raise ValueError("base: a LiME config cannot wrap another LiME config")
    if base.is_prompt_learning or base.is_adaption_prompt:
        raise ValueError(
            f"base: {type(base).__name__} is prompt learning, not a layer tuner; LiME modulates the output of adapted "
            "layers and needs a layer tuner such as LoraConfig, IA3Config, LoHaConfig or LoKrConfig"
        )
    tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    if tuner_cls is None:
        raise ValueError(f"base: unknown PEFT type {peft_type!r}")
    if getattr(tuner_cls, "uses_shared_state", False):
        raise ValueError(f"base: {type(base).__name__} cannot be wrapped by LiME: {_SHARED_STATE_REASON}")
    if peft_type in _UNSUPPORTED_REASONS:
        raise ValueError(f"base: {type(base).__name__} cannot be wrapped by LiME: {_UNSUPPORTED_REASONS[peft_type]}")
    if getattr(base, "target_parameters", None):
        raise ValueError(
            "base.target_parameters: LiME wraps adapted modules, not bare parameters (e.g. MoE expert weights): a fused "
            "experts parameter has no per-token layer output to route and modulate outside the MoE block's own "
            "forward. Use target_modules instead, e.g. the attention projections or a shared expert's Linear layers"
        )
