"""LimeConfig: the configuration of a LiME adapter, a PeftConfig that wraps the config of any PEFT layer tuner."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft import PeftConfig
from peft.utils import PeftType

from .config_checks import (
    BALANCE_SCOPES,
    build_base_config,
    check_base_config,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_routing_mode,
)
from .peft_type import ensure_lime_peft_type

ensure_lime_peft_type()


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
    n_gram: int = field(
        default=1, metadata={"help": "Window length n of n-gram routing (1: every token routes alone)."}
    )
    ngram_mode: Literal["causal", "block", "prefix"] = field(
        default="causal",
        metadata={
            "help": "'causal': token t routes with the mean logits of tokens t-n+1..t of its own sequence (no future "
            "leak, cache-consistent). 'block': blocks of n tokens route with their last token, as in the paper's "
            "code; non-causal, for reproduction only. 'prefix': every token routes with the mean logits of its "
            "sequence's first min(t + 1, n) tokens, i.e. by how the sequence opens (a task word, an instruction): "
            "a sequence-level route, causal and cache-consistent (peft_lime/prefix_pooling.py)."
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
        default=0.01,
        metadata={"help": "Coefficient of the KL(mean routing || uniform) balance loss, mean over layers."},
    )
    balance_scope: Literal["micro_batch", "global"] = field(
        default="micro_batch",
        metadata={
            "help": "Tokens the balance losses are computed over. 'micro_batch' (default): the valid tokens of each "
            "forward, as in the paper. 'global': routing statistics summed over the gradient-accumulation window and "
            "all data-parallel ranks (Qiu et al. 2025, as in Qwen3-MoE), so a micro-batch or a sequence that holds "
            "one task is no longer pushed to uniform routing on its own. Costs one all-reduce of E+1 floats per layer "
            "call under data parallelism; runs eagerly under torch.compile. See peft_lime.balance."
        },
    )

    routing_mode: Literal["token", "centroid", "uniform", "task", "task_learned"] = field(
        default="token",
        metadata={
            "help": "Where a token's mixing weights come from. 'token' (default): the paper's parameter-free router "
            "on the first E channels of the token's frozen and adapter outputs. 'centroid': cosine of the token's "
            "whole frozen output (centred) to E fixed centroids fitted by peft_lime.fit_routing_centroids on a "
            "calibration pass (no trainable parameters; combine with n_gram to pool over the sequence causally; with "
            "ngram_mode='prefix' only the opening's logits are computed). "
            "The others are ablations that measure what routing adds: "
            "'uniform': every token mixes all experts equally (no router; experts act as one learned output scale). "
            "'task': oracle routing, each token goes to expert (task id mod E) of its sample's task. 'task_learned': "
            "oracle routing with a learned softmax mix per task (num_tasks x E logits per layer, init 0). Both task "
            "modes need task ids on every call (peft_lime.enable_task_ids, then model(..., task_ids=...))."
        },
    )
    num_tasks: Optional[int] = field(
        default=None, metadata={"help": "Number of tasks of routing_mode='task_learned' (its per-task logits)."}
    )
    balance_interval: int = field(
        default=1,
        metadata={
            "help": "Apply the balance losses on one training micro-batch in this many (1: every micro-batch). The "
            "authors' scripts apply them on one micro-batch in 50 (with coefficients 0.001 / 0.0001, i.e. their "
            "0.01 balance factor times importance 0.1 / kl 0.01). balance_scope='micro_batch' only."
        },
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
        """Check every LiME field, raising ValueError("<field>: must be ..."), and store it as a plain Python value."""
        self.num_experts = check_int("num_experts", self.num_experts)
        self.top_k = check_int("top_k", self.top_k)
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k: must not exceed num_experts={self.num_experts}, got {self.top_k!r}")
        self.auto_topk = check_bool("auto_topk", self.auto_topk)
        self.auto_topk_threshold = check_float("auto_topk_threshold", self.auto_topk_threshold, 0, 1, lo_open=True)
        self.max_active_experts = check_int("max_active_experts", self.max_active_experts, optional=True)
        if self.max_active_experts is not None and self.max_active_experts > self.num_experts:
            raise ValueError(
                f"max_active_experts: must not exceed num_experts={self.num_experts}, got {self.max_active_experts!r}"
            )
        self.selection = check_choice("selection", self.selection, ("soft", "hard"))
        self.selection_temperature = check_float("selection_temperature", self.selection_temperature, 0, lo_open=True)
        self.n_gram = check_int("n_gram", self.n_gram)
        self.ngram_mode = check_choice("ngram_mode", self.ngram_mode, ("causal", "block", "prefix"))
        self.temperature = check_float("temperature", self.temperature, 0, lo_open=True)
        self.routing_gamma = check_float("routing_gamma", self.routing_gamma, 0, 1)
        self.routing_norm = check_choice("routing_norm", self.routing_norm, ("token", "batch"))
        self.jitter_noise = check_float("jitter_noise", self.jitter_noise, 0, 1, hi_open=True)
        self.shared_expert = check_bool("shared_expert", self.shared_expert)
        for name in ("expert_init_std", "importance_loss_coef", "kl_loss_coef"):
            setattr(self, name, check_float(name, getattr(self, name), 0))
        self.balance_scope = check_choice("balance_scope", self.balance_scope, BALANCE_SCOPES)
        check_routing_mode(self)

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

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs: Any) -> dict:
        """PEFT's reader; a file that is not JSON (a truncated adapter_config.json) gives an error naming the file."""
        try:
            return super().from_json_file(path_json_file, **kwargs)
        except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError name no file
            raise ValueError(f"{path_json_file}: not a valid JSON config, truncated or damaged? ({exc})") from exc

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
