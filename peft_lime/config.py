"""LimeConfig: the configuration of a LiME adapter, a PeftConfig that wraps the config of any PEFT layer tuner."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft import PeftConfig
from peft.utils import PeftType

from .registration import ensure_lime_peft_type

ensure_lime_peft_type()

# Tuners whose layers are not independent (shared matrices owned by the model) or that are not layer tuners at all.
_SHARED_STATE_REASON = (
    "its layers share state owned by the model (shared projection matrices), so LiME cannot wrap one layer at a time"
)


def _jsonable(value: Any) -> Any:
    """Sets -> sorted lists, enums -> values, recursively: what json.dumps accepts and from_peft_type reads back."""
    if isinstance(value, set):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, PeftType) or (hasattr(value, "value") and isinstance(value.value, str)):
        return value.value
    return value


def build_base_config(base: PeftConfig | dict) -> PeftConfig:
    """Rebuild the wrapped tuner's config from its dict form (as saved in adapter_config.json)."""
    if isinstance(base, PeftConfig):
        return base
    if not isinstance(base, dict):
        raise ValueError(f"base must be a PEFT layer-tuner config or its dict form, got {type(base).__name__}")
    if "peft_type" not in base:
        raise ValueError("base: the dict form of the base config needs a 'peft_type' key (e.g. 'LORA')")
    data = dict(base)
    data.pop("runtime_config", None)
    return PeftConfig.from_peft_type(**data)


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
    if getattr(base, "target_parameters", None):
        raise ValueError(
            "base.target_parameters: LiME wraps adapted modules, not bare parameters (e.g. MoE expert weights); "
            "use target_modules"
        )


@dataclass
class LimeConfig(PeftConfig):
    """Configuration of a LiME (Lightweight Mixture of Experts) adapter.

    LiME keeps ONE adapter per layer, the one described by ``base`` (any PEFT layer tuner config), and multiplies its
    output by a per-token mix of ``num_experts`` vectors chosen by a router without parameters. Attributes that
    PEFT, Transformers or TRL read off a config (``target_modules``, ``modules_to_save``, ``bias``, ...) are
    answered by ``base``.

    Example:
        ```py
        >>> import peft_lime
        >>> from peft import LoraConfig, get_peft_model
        >>> config = peft_lime.LimeConfig(base=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), num_experts=8)
        >>> model = get_peft_model(base_model, config)
        ```
    """

    base: Optional[Union[PeftConfig, dict]] = field(
        default=None,
        metadata={
            "help": "Config of the wrapped PEFT layer tuner (LoraConfig incl. DoRA / rsLoRA, IA3Config, LoHaConfig, "
            "LoKrConfig, ...) or its dict form. Targets, modules_to_save, bias etc. are read from it."
        },
    )
    num_experts: int = field(
        default=8,
        metadata={"help": "Number E of expert vectors per layer. Must not exceed the output width of a target layer."},
    )
    top_k: int = field(default=2, metadata={"help": "Experts kept per token when auto_topk is False."})
    auto_topk: bool = field(
        default=True,
        metadata={"help": "Auto Top-K: keep every expert whose probability is >= auto_topk_threshold * the maximum."},
    )
    auto_topk_threshold: float = field(
        default=0.5, metadata={"help": "Threshold theta in (0, 1] of Auto Top-K, relative to the top probability."}
    )
    max_active_experts: Optional[int] = field(
        default=None, metadata={"help": "Cap on the experts Auto Top-K may keep per token (None: up to E)."}
    )
    selection: Literal["soft", "hard"] = field(
        default="soft",
        metadata={
            "help": "'hard': exact mask of the selected experts. 'soft' (reference default): the mask is replaced by "
            "sigmoid((p - cut) / selection_temperature) so every expert receives gradient."
        },
    )
    selection_temperature: float = field(default=0.5, metadata={"help": "Temperature of the soft selection."})
    n_gram: int = field(default=1, metadata={"help": "Window length n of n-gram routing (1: every token routes alone)."})
    ngram_mode: Literal["causal", "block"] = field(
        default="causal",
        metadata={
            "help": "'causal': token t routes with the mean logits of tokens t-n+1..t of its own sequence (no future "
            "leak, cache-consistent). 'block': blocks of n tokens route with their last token, as in the paper's "
            "code; non-causal, for reproduction only."
        },
    )
    temperature: float = field(default=0.5, metadata={"help": "Softmax temperature tau of the router."})
    routing_gamma: float = field(
        default=0.7, metadata={"help": "Weight gamma in [0, 1] of the adapter output vs the frozen output in routing."}
    )
    routing_norm: Literal["token", "batch"] = field(
        default="token",
        metadata={
            "help": "'token' (default): each token's routed slices are normalised by their own RMS, so routing is "
            "batch-invariant. 'batch': max-abs over the whole batch as in the reference code (batch-dependent)."
        },
    )
    jitter_noise: float = field(
        default=0.1, metadata={"help": "Multiplicative jitter U(1-eps, 1+eps) on router logits, training only."}
    )
    shared_expert: bool = field(
        default=True, metadata={"help": "Add a shared vector p_s with a scalar gate g (init 0) to every token's mix."}
    )
    expert_init_std: float = field(
        default=0.1,
        metadata={
            "help": "Spread sigma of the expert init: vectors start uniform in [1 - sigma, 1 + sigma]; the shared "
            "vector starts N(0, sigma^2)."
        },
    )
    importance_loss_coef: float = field(
        default=0.1, metadata={"help": "Coefficient of the importance (squared CV) balance loss, mean over layers."}
    )
    kl_loss_coef: float = field(
        default=0.01, metadata={"help": "Coefficient of the KL(mean routing || uniform) balance loss, mean over layers."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.LIME
        if self.base is None:
            raise ValueError("base: LimeConfig needs the config of the tuner it wraps, e.g. base=LoraConfig(r=8, ...)")
        object.__setattr__(self, "base", build_base_config(self.base))
        check_base_config(self.base)
        if self.task_type is None and getattr(self.base, "task_type", None) is not None:
            self.task_type = self.base.task_type
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name}: {why}, got {getattr(self, name)!r}")

        for name in ("num_experts", "top_k", "n_gram"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, "must be an integer >= 1")
        if self.top_k > self.num_experts:
            raise bad("top_k", f"must not exceed num_experts={self.num_experts}")
        if not 0.0 < float(self.auto_topk_threshold) <= 1.0:
            raise bad("auto_topk_threshold", "must be in (0, 1]")
        if self.max_active_experts is not None and not (1 <= self.max_active_experts <= self.num_experts):
            raise bad("max_active_experts", f"must be None or in [1, num_experts={self.num_experts}]")
        choices = {"selection": ("soft", "hard"), "ngram_mode": ("causal", "block"), "routing_norm": ("token", "batch")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(name, f"must be one of {allowed}")
        for name in ("selection_temperature", "temperature"):
            if not float(getattr(self, name)) > 0.0:
                raise bad(name, "must be > 0")
        if not 0.0 <= float(self.routing_gamma) <= 1.0:
            raise bad("routing_gamma", "must be in [0, 1]")
        if not 0.0 <= float(self.jitter_noise) < 1.0:
            raise bad("jitter_noise", "must be in [0, 1)")
        for name in ("expert_init_std", "importance_loss_coef", "kl_loss_coef"):
            if float(getattr(self, name)) < 0.0:
                raise bad(name, "must be >= 0")

    # --- delegation to the base config -------------------------------------------------------------------------
    # PEFT, Transformers and TRL read (and TRL even writes) target_modules, modules_to_save, bias, ... directly on the
    # top-level config. Those live on the base config; reads and writes of attributes that LimeConfig does not
    # declare itself go there, and anything the base lacks raises AttributeError as usual.

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup failed, i.e. for attributes LimeConfig does not define.
        if name.startswith("__") or name == "base":
            raise AttributeError(name)
        base = self.__dict__.get("base")
        if isinstance(base, PeftConfig) and hasattr(base, name):
            return getattr(base, name)
        raise AttributeError(
            f"'LimeConfig' object has no attribute {name!r} (nor has its base config {type(base).__name__})"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _OWN_FIELDS or name.startswith("_"):
            object.__setattr__(self, name, value)
            return
        base = self.__dict__.get("base")
        if isinstance(base, PeftConfig) and hasattr(base, name):
            setattr(base, name, value)
        else:
            object.__setattr__(self, name, value)

    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def to_dict(self) -> dict:
        """JSON-ready dict; the base config is serialised by its own to_dict (no sets, no runtime fields)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "base"}
        base_dict = self.base.to_dict()
        base_dict.pop("runtime_config", None)
        out["base"] = base_dict
        return _jsonable(out)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.name in _LIME_FIELDS
        )
        return f"LimeConfig(base={type(self.base).__name__}(...), {shown})"


_OWN_FIELDS = frozenset(f.name for f in dataclasses.fields(LimeConfig))
_LIME_FIELDS = frozenset(_OWN_FIELDS - {f.name for f in dataclasses.fields(PeftConfig)} - {"base"})
